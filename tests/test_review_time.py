"""The findings of the adversarial review of the time buckets (history, recent, top), one test
each: each failed before its fix and says what must happen."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from campaignstats.client import AsyncStatsClient
from campaignstats.model import CalculationResult, CampaignStats, Increment, StatsState
from campaignstats.timeline import HOUR, MINUTE, Timeline

from .helpers import Running


def ts(text: str, tz: str = "UTC") -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).timestamp()


NOW = ts("2025-06-01T12:30:00")


def state_at(now: float) -> StatsState:
    state = StatsState()
    state.clock = lambda: now
    return state


def calculated(at: float, unit: int, now: float, max_action_id: int = 10) -> CalculationResult:
    """What the calculation returns for one campaign with one accepted action (one supporter)
    at ``at``, filed (as calculation._timelines does) in a bucket of ``unit``."""
    timeline = Timeline()
    timeline.add_bucket(unit, int(at) // unit * unit, 1, 1)
    timeline.last_action_at = at
    timeline.flush()
    stats = CampaignStats(1, {"sign": 1}, {}, {1: 1})
    return CalculationResult("all", {1: stats}, max_action_id, now, 0.1, 1, timelines={1: timeline})


def day_sums(state: StatsState, cid: int) -> tuple[int, int]:
    buckets = state.history(cid, "day", None, None)["buckets"]
    return sum(b[1] for b in buckets), sum(b[2] for b in buckets)


def test_a_decrement_of_an_old_action_after_a_calculation_takes_it_out_of_its_buckets() -> None:
    """After a calculation, a campaign whose only activity is 22 days old holds it in an hour
    bucket and a day bucket, and no minute chunk at all. A decrement of that action (``at`` its
    time) brings the totals to 0 but leaves the buckets at 1 supporter / 1 action:
    Timeline.take (timeline.py:189-198) picks the minute series because ``Series.keeps`` says
    yes for an empty series (``newest`` is -2**62), reads (0, 0) there and takes nothing from
    hours or days. The day buckets no longer add up to the totals until the next calculation.
    It should take the action back from the hour and day buckets it was filed in."""
    state = state_at(NOW)
    old = ts("2025-05-10T08:20:00")
    state.merge(calculated(old, HOUR, NOW))
    assert day_sums(state, 1) == (1, 1)
    state.apply(Increment(1, 1, "sign", None, True, at=old), decrement=True)
    assert state.stats(1)["supporters"] == 0
    assert day_sums(state, 1) == (0, 0)
    assert state.history(1, "hour", None, None)["buckets"] == []


def test_a_decrement_journaled_during_a_calculation_is_replayed_into_old_buckets() -> None:
    """The same through the exact merge: a decrement of a 22-day-old action (its id above the
    snapshot's, so unseen) journaled while the calculation ran is replayed on the database's
    timeline by Timeline.take (model.py:862), which finds nothing in the empty minute series
    and clamps. Totals after the merge: 0 supporters; buckets: still 1/1. It should be 0/0."""
    state = state_at(NOW)
    old = ts("2025-05-10T08:20:00")
    state.start_journal()
    state.apply(Increment(1, 1, "sign", None, True, action_id=11, at=old), decrement=True)
    state.merge(calculated(old, HOUR, NOW, max_action_id=10))
    state.stop_journal()
    assert state.stats(1)["supporters"] == 0
    assert day_sums(state, 1) == (0, 0)


def test_a_decrement_in_the_last_hours_of_the_minute_retention_after_a_calculation() -> None:
    """At 12:05 the calculation files by the minute only from 50 h before the next hour
    (calculation.py:75, minute_cutoff = 11:00 two days ago) and by the hour before that, while
    the minute series, its newest chunk 12:00, says it keeps 200 chunks back, from 10:15 two
    days ago (Series.keeps, timeline.py:80). An action at 10:20 two days ago (an hour bucket
    from the calculation) is decremented: take() reads the empty minute bucket and takes
    nothing from the hour and day. It should take it from the hour and day buckets."""
    now = ts("2025-06-01T12:05:00")
    action_at = ts("2025-05-30T10:20:00")  # 49 h 45 min before now: inside keeps, before cutoff
    state = state_at(now)
    result = calculated(action_at, HOUR, now)
    # some activity now, so the minute series has a current chunk (as any live campaign does)
    result.timelines[1].add_bucket(MINUTE, int(now) // 60 * 60, 1, 1)
    result.timelines[1].flush()
    result.campaigns[1] = CampaignStats(2, {"sign": 2}, {}, {1: 2})
    state.merge(result)
    assert day_sums(state, 1) == (2, 2)
    state.apply(Increment(1, 1, "sign", None, True, at=action_at), decrement=True)
    assert state.stats(1)["supporters"] == 1
    assert day_sums(state, 1) == (1, 1)


def test_bucket_actions_overflowing_int64_do_not_break_the_campaign() -> None:
    """The validator accepts counts up to 2**63-1 and apply_many keeps each action type's total
    within int64 (model.py:596), but the bucket sums every type into one ``array('q')`` cell.
    Two accepted increments of 2**62 (types "a" and "b") make the pending minute 2**63; filing
    it (timeline.py:179, Timeline.flush) raises OverflowError on every read (history, recent,
    top) and in apply_many for the next change of that campaign in another minute, after that
    change was already added to the totals (so stats move but ``applied`` does not, and the
    batch's remaining items are not applied). The pending minute is never cleared, so the
    campaign stays broken. Either refuse the increment like the totals' overflow, or saturate
    the bucket: no exception."""
    clock = [1_750_000_000.0]
    state = StatsState()
    state.clock = lambda: clock[0]
    state.apply_many([Increment(1, 1, "a", count=2**62), Increment(1, 1, "b", count=2**62)])
    state.history(1, "day", None, None)  # raises OverflowError today
    clock[0] += 120
    state.apply_many([Increment(1, 1, "c"), Increment(2, 1, "a")])
    assert state.stats(2)["action"] == {"a": 1}


@pytest.mark.parametrize(
    ("tz", "day"),
    [("Australia/Lord_Howe", "2025-04-07"), ("Australia/Adelaide", "2025-04-07")],
)
def test_yesterday_after_a_long_day_in_a_half_hour_zone(tz: str, day: str) -> None:
    """The day after DST ends in a zone whose midnight is on a half hour (Lord Howe +10:30/+11,
    Adelaide +9:30/+10:30), yesterday (24.5 or 25 h long) began more than 48 h ago late in the
    evening. Timeline.total (timeline.py:253) then reads the hour series from
    ceil(start / 3600): yesterday loses its first half hour and gains the first half hour of
    today. One action at 00:10 today: yesterday must be [0, 0]; both zones answer [1, 1]
    (today's action counted in today and in yesterday; an action at 00:10 yesterday in
    Adelaide is left out of yesterday: /tmp/r13/lordhowe.py). The minutes are held for 50 h
    precisely so that
    yesterday is exact (timeline.py module doc): total() should use them whenever the minute
    series keeps ``start`` rather than only within 48 h."""
    zone = ZoneInfo(tz)
    now = datetime.fromisoformat(day + "T23:50:00").replace(tzinfo=zone).timestamp()
    state = state_at(now)
    today_action = ts(day + "T00:10:00", tz)
    state.apply(Increment(1, 1, "sign", None, True, at=today_action))
    recent = state.recent(1, tz)
    assert recent["today"] == [1, 1]
    assert recent["yesterday"] == [0, 0]


async def test_a_history_call_after_a_huge_count_is_answered(server: Running) -> None:
    """End to end: two valid increments of 2**62 ("a" and "b") to one campaign, then
    ``history``: the server answers an internal error (the OverflowError of
    test_bucket_actions_overflowing_int64_do_not_break_the_campaign) instead of the buckets,
    and keeps doing so for that campaign. Should answer the buckets: a bucket sums every action
    type, and saturates at the wire's largest integer (campaignstats/timeline.py, BUCKET_MAX)."""
    client = AsyncStatsClient(f"unix://{server.unix}")
    try:
        client.increment_many(
            [Increment(9131, 1, "a", count=2**62), Increment(9131, 1, "b", count=2**62)]
        )
        await client.flush()
        stats = await client.stats(9131)
        assert stats["action"] == {"a": 2**62, "b": 2**62}
        history = await client.history(9131, "day")
        assert [b[1:] for b in history["buckets"]] == [[0, 2**63 - 1]]
    finally:
        await client.close()
