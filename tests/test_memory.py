"""What a campaign costs in memory (docs/design.md, "Memory"): one string object per distinct
action type or area for the whole state, and a timeline whose three series exist only once it
holds more than one minute, answering every query as if they existed."""

from __future__ import annotations

from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from campaignstats.model import CalculationResult, CampaignStats, Increment, StatsState
from campaignstats.timeline import DAY, HOUR, MINUTE, Series, Timeline, recent

NOW = 1_750_000_000.0


def fresh(text: str) -> str:
    """An equal string that is another object (as each decoded message makes its own)."""
    copy = (text + ".")[:-1]
    assert copy is not text
    return copy


def keys(stats: CampaignStats) -> list[str]:
    return [*stats.action, *stats.area]


def test_equal_action_types_and_areas_of_different_campaigns_are_one_object() -> None:
    state = StatsState()
    for cid in (1, 2, 3):
        state.apply(Increment(cid, 1, fresh("petition"), fresh("DE"), True))
        state.apply(Increment(cid, 1, fresh("share"), fresh("FR"), True))
    first = keys(state.campaigns[1])
    for cid in (2, 3):
        assert all(a is b for a, b in zip(first, keys(state.campaigns[cid]), strict=True))


def test_a_merged_calculation_and_a_loaded_snapshot_hold_interned_keys_too() -> None:
    state = StatsState()
    state.apply(Increment(1, 1, "petition", "DE", True))
    held = keys(state.campaigns[1])
    result = CalculationResult(
        "ids",
        {2: CampaignStats(1, {fresh("petition"): 1}, {fresh("DE"): 1}, {1: 1})},
        max_action_id=0,
    )
    state.merge(result)
    assert all(a is b for a, b in zip(held, keys(state.campaigns[2]), strict=True))
    # A snapshot file's campaigns (actor/snapshot.py builds them, one string per row read).
    loaded = StatsState()
    loaded.replace_all({3: CampaignStats(1, {fresh("petition"): 1}, {fresh("DE"): 1}, {1: 1})})
    assert all(a is b for a, b in zip(held, keys(loaded.campaigns[3]), strict=True))


def test_replayed_and_page_counts_use_the_interned_keys() -> None:
    state = StatsState()
    state.apply(Increment(1, 1, "petition", "DE", True))
    held = keys(state.campaigns[1])
    state.apply(Increment(2, 1, fresh("petition"), fresh("DE"), True, page=5))
    assert all(a is b for a, b in zip(held, keys(state.pages[5].stats), strict=True))
    stats = CampaignStats()
    stats.add(Increment(3, 1, fresh("petition"), fresh("DE"), True))
    assert all(a is b for a, b in zip(held, keys(stats), strict=True))


def test_a_timeline_with_one_minute_holds_no_series_and_answers_every_query() -> None:
    state = StatsState()
    state.clock = lambda: NOW
    for _ in range(10):
        state.apply(Increment(1, 1, "sign", "DE", True, at=NOW - 5))
    timeline = state.timelines[1]
    timeline.flush()
    assert timeline._series is None
    minute = int(NOW - 5) // MINUTE * MINUTE
    assert timeline.history("minute", None, None, NOW) == [[minute, 10, 10]]
    assert timeline.history("hour", None, None, NOW) == [[minute // HOUR * HOUR, 10, 10]]
    assert timeline.history("day", None, None, NOW) == [[minute // DAY * DAY, 10, 10]]
    assert timeline.nbytes() == 3 * 24
    figures = recent(timeline, NOW, ZoneInfo("Europe/Berlin"))
    assert figures["last_hour"] == figures["today"] == figures["last_7_days"] == [10, 10]
    assert state.top("last_hour", 5) == [[1, 10]]
    assert state.top("today", 5) == [[1, 10]]
    assert timeline._series is None  # reading created nothing
    state.apply(Increment(1, 1, "sign", "DE", True, at=NOW - 5 * MINUTE))
    timeline.flush()
    assert timeline._series is not None
    assert timeline.history("minute", None, None, NOW) == [
        [minute - 5 * MINUTE, 1, 1],
        [minute, 10, 10],
    ]


def test_a_decrement_of_a_one_minute_timeline_keeps_it_without_series() -> None:
    state = StatsState()
    state.clock = lambda: NOW
    state.apply(Increment(1, 1, "sign", "DE", True, count=3, at=NOW - 5))
    # One in its minute, one in another minute of the last 48 hours (nothing there to take).
    state.apply(Increment(1, 1, "sign", "DE", True, at=NOW - 5), decrement=True)
    state.apply(Increment(1, 1, "sign", "DE", False, at=NOW - HOUR), decrement=True)
    timeline = state.timelines[1]
    assert timeline._series is None
    minute = int(NOW - 5) // MINUTE * MINUTE
    assert timeline.history("minute", None, None, NOW) == [[minute, 0, 2]]
    assert timeline.nbytes() == 3 * 24
    state.apply(Increment(1, 1, "sign", "DE", False, count=2, at=NOW - 5), decrement=True)
    assert timeline.history("day", None, None, NOW) == []
    assert timeline.nbytes() == 0
    assert timeline._series is None


#: a change: ("add" or "take", seconds before NOW, supporters, actions)
changes = st.lists(
    st.tuples(
        st.sampled_from(["add", "add", "take"]),
        st.sampled_from([0, 10, 59, 61, 3_000, 4 * HOUR, 3 * DAY, 100 * DAY]),
        st.integers(0, 3),
        st.integers(0, 3),
    ),
    max_size=25,
)


@settings(max_examples=300, deadline=None)
@given(changes)
def test_a_lazy_timeline_answers_as_one_whose_series_exist_from_the_start(
    steps: list[tuple[str, int, int, int]],
) -> None:
    lazy, eager = Timeline(), Timeline()
    eager._materialize()
    for op, back, s, a in steps:
        t = NOW - back
        if op == "add":
            lazy.add(t, s, a)
            eager.add(t, s, a)
        else:
            assert lazy.take(t, s, a, NOW) == eager.take(t, s, a, NOW)  # clamped alike
        assert lazy.views(NOW) == eager.views(NOW)
        assert lazy.nbytes() == eager.nbytes()
        assert lazy.last_action == eager.last_action
        assert lazy.copy().views(NOW) == eager.views(NOW)
        for tz in ("UTC", "America/New_York"):
            assert recent(lazy, NOW, ZoneInfo(tz)) == recent(eager, NOW, ZoneInfo(tz))


class ReferenceSeries:
    """What a series means, in a plain dict: bucket index -> [supporters, actions]."""

    def __init__(self, keep: int | None) -> None:
        self.keep = keep
        self.buckets: dict[int, list[int]] = {}

    def add(self, index: int, s: int, a: int) -> None:
        newest = max(self.buckets, default=None)
        if newest is not None and self.keep is not None and index <= newest - self.keep:
            return  # older than what is kept
        bucket = self.buckets.setdefault(index, [0, 0])
        bucket[0] += s
        bucket[1] += a
        if self.keep is not None:
            for old in [i for i in self.buckets if i <= max(self.buckets) - self.keep]:
                del self.buckets[old]

    def take(self, index: int, s: int, a: int) -> None:
        bucket = self.buckets.get(index)
        if bucket is not None:
            bucket[0], bucket[1] = max(0, bucket[0] - s), max(0, bucket[1] - a)
            if bucket == [0, 0]:
                del self.buckets[index]

    def rows(self) -> list[tuple[int, int, int]]:
        return [(i, s, a) for i, (s, a) in sorted(self.buckets.items()) if s or a]


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([None, 1, 5]),
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 12), st.integers(0, 3), st.integers(0, 3)),
        max_size=40,
    ),
)
def test_a_series_in_one_array_holds_what_a_dict_of_buckets_holds(
    keep: int | None, steps: list[tuple[bool, int, int, int]]
) -> None:
    series, reference = Series(MINUTE, keep), ReferenceSeries(keep)
    for add, index, s, a in steps:
        if add:
            series.add(index, s, a)
            reference.add(index, s, a)
        else:
            series.take(index, s, a)
            reference.take(index, s, a)
        assert series.rows() == reference.rows()
        assert list(series.keys) == sorted(reference.buckets)
        for lo in range(0, 14, 3):
            expected = [r for r in reference.rows() if lo <= r[0] < lo + 4]
            assert list(series.buckets(lo, lo + 4)) == expected
            assert series.total(lo, lo + 4) == (
                sum(r[1] for r in expected),
                sum(r[2] for r in expected),
            )
            assert series.get(lo) == tuple(reference.buckets.get(lo, (0, 0)))
    assert series.copy().rows() == series.rows()
