"""``top`` from memory: the ranking follows increments, decrements and merges (docs/protocol.md,
"top"), and agrees with a plain sort of every campaign."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from campaignstats.model import CalculationResult, CampaignStats, Increment, StatsState
from campaignstats.timeline import DAY, HOUR, Timeline

NOW = 1_750_000_000.0 - 1_750_000_000.0 % DAY + 10 * HOUR + 30 * 60  # 10:30 UTC


def scan(state: StatsState, by: str, limit: int) -> list[list[int]]:
    """The answer by brute force, every campaign looked at."""
    now = state.clock()
    values = {}
    for cid in state.campaigns:
        timeline = state.timelines.get(cid, Timeline())
        if by == "supporters":
            values[cid] = state.campaigns[cid].supporters
        elif by == "last_hour":
            values[cid] = timeline.total(now - 59 * 60 - now % 60, now + 1, now)[0]
        else:
            values[cid] = timeline.total(now - now % DAY, now + 1, now)[0]
    ranked = sorted((-v, cid) for cid, v in values.items() if v > 0)
    return [[cid, -v] for v, cid in ranked[:limit]]


changes = st.lists(
    st.tuples(
        st.integers(1, 12),  # campaign
        st.booleans(),  # decrement
        st.booleans(),  # new supporter
        st.sampled_from([None, 30.0, 50 * 60.0, 3 * HOUR, 11 * HOUR, 2 * DAY]),  # seconds back
        st.booleans(),  # ask for the top here
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(changes, st.integers(1, 5), st.booleans())
def test_top_equals_a_scan_of_every_campaign_after_any_changes(
    steps: list[tuple[int, bool, bool, float | None, bool]], limit: int, merge: bool
) -> None:
    state = StatsState()
    state.clock = lambda: NOW
    for i, (cid, decrement, new, back, ask) in enumerate(steps):
        at = None if back is None else NOW - back
        state.apply(Increment(cid, 1, "sign", None, new, at=at), decrement=decrement)
        if merge and i == len(steps) // 2:
            # A calculation that found other counts: the ranking follows the merge.
            timeline = Timeline()
            timeline.add(NOW - 120, 7, 7)
            state.merge(
                CalculationResult(
                    "ids",
                    {3: CampaignStats(7, {"sign": 7}, {}, {1: 7})},
                    0,
                    timelines={3: timeline},
                )
            )
        if ask:
            for by in ("supporters", "last_hour", "today"):
                assert state.top(by, limit) == scan(state, by, limit), by
    for by in ("supporters", "last_hour", "today"):
        assert state.top(by, limit) == scan(state, by, limit), by


def test_the_last_hour_forgets_as_time_passes() -> None:
    clock = [NOW]
    state = StatsState()
    state.clock = lambda: clock[0]
    state.apply(Increment(1, 1, "sign", None, True))
    state.apply(Increment(2, 1, "sign", None, True))
    state.apply(Increment(2, 1, "sign", None, True))
    assert state.top("last_hour", 10) == [[2, 2], [1, 1]]
    clock[0] += 61 * 60
    assert state.top("last_hour", 10) == []
    assert state.top("today", 10) == [[2, 2], [1, 1]]
    clock[0] += DAY
    assert state.top("today", 10) == []
    assert state.top("supporters", 1) == [[2, 2]]
