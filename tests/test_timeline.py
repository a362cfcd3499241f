"""Buckets in time in memory: history, recent figures in any time zone, compact storage, and
changes that move them (docs/design.md, "Time"; docs/protocol.md, "history" and "recent")."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from campaignstats.model import CalculationResult, CampaignStats, Increment, StatsState
from campaignstats.timeline import DAY, HOUR, Timeline, day_starts, recent


def ts(text: str, tz: str = "UTC") -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).timestamp()


NOW = ts("2025-06-01T12:30:00")


def state_at(now: float) -> StatsState:
    state = StatsState()
    state.clock = lambda: now
    return state


def test_an_increment_lands_in_the_minute_hour_and_day_of_its_at_or_of_its_arrival() -> None:
    state = state_at(NOW)
    state.apply(Increment(1, 1, "sign", "DE", True, at=ts("2025-06-01T12:10:30")))
    state.apply(Increment(1, 1, "share", None, False, count=3))  # arrives now
    state.apply(Increment(1, 1, "sign", None, True, at=ts("2025-05-20T08:00:00")))
    timeline = state.timelines[1]
    assert timeline.history("minute", None, None, NOW) == [
        [int(ts("2025-06-01T12:10:00")), 1, 1],
        [int(ts("2025-06-01T12:30:00")), 0, 3],
    ]
    assert timeline.history("hour", None, None, NOW) == [
        [int(ts("2025-05-20T08:00:00")), 1, 1],
        [int(ts("2025-06-01T12:00:00")), 1, 4],
    ]
    assert timeline.history("day", None, None, NOW) == [
        [int(ts("2025-05-20")), 1, 1],
        [int(ts("2025-06-01")), 1, 4],
    ]
    # from inclusive, to exclusive
    start = int(ts("2025-06-01T12:10:00"))
    assert timeline.history("minute", start, start + 60, NOW) == [[start, 1, 1]]
    assert timeline.history("minute", start + 1, None, NOW) == [
        [int(ts("2025-06-01T12:30:00")), 0, 3]
    ]
    assert timeline.history("minute", None, start, NOW) == []
    assert timeline.last_action == NOW


def test_an_at_in_the_future_is_filed_at_the_arrival() -> None:
    state = state_at(NOW)
    state.apply(Increment(1, 1, "sign", None, True, at=NOW + 3 * DAY))
    assert state.timelines[1].history("day", None, None, NOW) == [[int(ts("2025-06-01")), 1, 1]]


def test_a_decrement_takes_back_from_the_bucket_of_its_at_clamped_at_zero() -> None:
    state = state_at(NOW)
    at = ts("2025-06-01T09:00:00")
    state.apply(Increment(1, 1, "sign", None, True, count=2, at=at))
    state.apply(Increment(1, 1, "sign", None, True, at=at), decrement=True)
    assert state.timelines[1].history("hour", None, None, NOW) == [[int(at), 0, 1]]
    state.apply(Increment(1, 1, "sign", None, True, count=5, at=at), decrement=True)
    assert state.timelines[1].history("hour", None, None, NOW) == []
    assert state.stats(1)["supporters"] == 0


def test_minutes_are_kept_48_hours_hours_90_days_days_for_ever() -> None:
    state = state_at(NOW)
    for back in (10 * 60, 47 * HOUR, 49 * HOUR, 80 * DAY, 95 * DAY, 900 * DAY):
        state.apply(Increment(1, 1, "sign", None, True, at=NOW - back))
    timeline = state.timelines[1]
    assert len(timeline.history("minute", None, None, NOW)) == 2
    assert len(timeline.history("hour", None, None, NOW)) == 4
    assert len(timeline.history("day", None, None, NOW)) == 5  # 47 and 49 hours back: May 30


def test_storage_is_compact_and_lazy() -> None:
    """A campaign pays for the buckets where it was active, not for 48 hours of minutes."""
    state = state_at(NOW)
    state.apply(Increment(1, 1, "sign", None, True, at=NOW - 5 * DAY))
    timeline = state.timelines[1]
    timeline.flush()
    assert timeline.nbytes() == 3 * 24  # one minute, one hour, one day
    for i in range(1000):
        state.apply(Increment(1, 1, "sign", None, True, at=NOW - i * 0.5))
    timeline.flush()
    assert len(timeline.minutes.keys) == 10  # 500 seconds back: 9 or 10 minutes
    # Activity in every hour of 60 days keeps minutes for the last 50 hours only.
    state = state_at(NOW)
    for h in range(60 * 24):
        state.apply(Increment(2, 1, "sign", None, True, at=NOW - h * HOUR))
    timeline = state.timelines[2]
    timeline.flush()
    assert len(timeline.minutes.keys) == 50
    assert len(timeline.hours.keys) == 60 * 24
    assert len(timeline.days.keys) == 61


def test_recent_figures() -> None:
    state = state_at(NOW)
    for back, n in ((30, 1), (59 * 60, 2), (61 * 60, 4), (13 * HOUR, 8), (6 * DAY, 16)):
        state.apply(Increment(1, 1, "sign", None, True, count=n, at=NOW - back))
    figures = recent(state.timelines[1], NOW, ZoneInfo("UTC"))
    assert figures["last_hour"] == [2, 3]
    assert figures["today"] == [3, 7]
    assert figures["yesterday"] == [1, 8]
    assert figures["last_7_days"] == [5, 31]
    assert figures["last_action_at"] == NOW - 30
    assert recent(None, NOW, ZoneInfo("UTC"))["today"] == [0, 0]


def _today_yesterday(events: list[str], now: str, tz: str) -> tuple[list[int], list[int]]:
    state = state_at(ts(now, tz))
    for event in events:
        state.apply(Increment(1, 1, "sign", None, True, at=ts(event, tz)))
    figures = recent(state.timelines[1], ts(now, tz), ZoneInfo(tz))
    return figures["today"], figures["yesterday"]  # type: ignore[return-value]


def test_today_and_yesterday_around_midnight_in_utc_plus_14() -> None:
    events = ["2025-06-01T00:00:00", "2025-05-31T23:59:00", "2025-05-31T00:00:00"]
    events += ["2025-05-30T23:59:00"]
    assert _today_yesterday(events, "2025-06-01T00:30:00", "Pacific/Kiritimati") == (
        [1, 1],
        [2, 2],
    )
    assert (
        day_starts(ts("2025-06-01T00:30:00", "Pacific/Kiritimati"), ZoneInfo("Pacific/Kiritimati"))[
            0
        ]
        == datetime(2025, 5, 31, 10, tzinfo=UTC).timestamp()
    )


def test_today_and_yesterday_around_midnight_in_utc_minus_12() -> None:
    events = ["2025-06-01T00:00:00", "2025-05-31T23:59:00", "2025-05-31T00:00:00"]
    events += ["2025-05-30T23:59:00"]
    assert _today_yesterday(events, "2025-06-01T00:30:00", "Etc/GMT+12") == ([1, 1], [2, 2])
    assert _today_yesterday(events[1:], "2025-05-31T23:59:30", "Etc/GMT+12") == ([2, 2], [1, 1])


def test_today_and_yesterday_across_a_dst_change() -> None:
    # Berlin springs forward on 2025-03-30 (a 23-hour day) and falls back on 2025-10-26 (25).
    tz = "Europe/Berlin"
    events = ["2025-03-29T00:00:00", "2025-03-29T23:59:00", "2025-03-30T00:00:00"]
    events += ["2025-03-30T03:30:00", "2025-03-28T23:59:00"]
    assert _today_yesterday(events, "2025-03-30T23:59:00", tz) == ([2, 2], [2, 2])
    today, yesterday = day_starts(ts("2025-03-30T23:59:00", tz), ZoneInfo(tz))
    assert today - yesterday == 24 * HOUR
    today, _ = day_starts(ts("2025-03-31T12:00:00", tz), ZoneInfo(tz))
    assert today - yesterday == 47 * HOUR  # the 30th had 23 hours
    events = ["2025-10-25T23:59:00", "2025-10-26T00:00:00", "2025-10-26T23:59:00"]
    events += ["2025-10-27T00:00:00"]
    assert _today_yesterday(events, "2025-10-27T00:01:00", tz) == ([1, 1], [2, 2])
    # 02:30 happens twice that night: both instants are today
    first = datetime(2025, 10, 26, 2, 30, fold=0, tzinfo=ZoneInfo(tz)).timestamp()
    second = datetime(2025, 10, 26, 2, 30, fold=1, tzinfo=ZoneInfo(tz)).timestamp()
    state = state_at(second + 60)
    state.apply(Increment(1, 1, "sign", None, True, at=first))
    state.apply(Increment(1, 1, "sign", None, True, at=second))
    assert recent(state.timelines[1], second + 60, ZoneInfo(tz))["today"] == [2, 2]


def test_a_merge_replays_changes_without_at_in_the_bucket_of_their_arrival() -> None:
    clock = [NOW]
    state = StatsState()
    state.clock = lambda: clock[0]
    state.start_journal()
    state.apply(Increment(1, 1, "sign", None, True))  # arrives at NOW
    clock[0] = NOW + 2 * HOUR
    db = Timeline()
    db.add(NOW - DAY, 1, 1)
    state.merge(
        CalculationResult(
            "all", {1: CampaignStats(1, {"sign": 1}, {}, {1: 1})}, 0, timelines={1: db}
        )
    )
    assert state.timelines[1].history("hour", None, None, clock[0]) == [
        [int(NOW - DAY) // HOUR * HOUR, 1, 1],
        [int(NOW) // HOUR * HOUR, 1, 1],
    ]
    assert state.stats(1)["supporters"] == 2
