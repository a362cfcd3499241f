"""apply_many's fast path for plain increments leaves the state apply_each leaves, key for key.

``StatsState.apply_many`` takes a batch of plain increments (no ``at``, no ``page``, no id a
merged calculation may have counted) through ``_apply_plain``, and the rest through
``apply_each``, the general per-increment path. Random sequences of batches (limits on keys and
campaigns hit mid-batch, overflowing counts, pages, decrements, a journal started, folded and
merged, horizons from merged calculations) are applied to two states, one through
``apply_many`` and one through ``apply_each``, as Increments or as the server's codec decodes
them; after every step the whole states must be equal, down to the order of the keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from campaignstats.journal import EarlyHorizon, Fold
from campaignstats.model import (
    MAX_ID,
    CalculationResult,
    CampaignStats,
    Horizon,
    Increment,
    StatsState,
    TxSnapshot,
)
from campaignstats.protocol import Batch, ServerCodec
from campaignstats.timeline import Timeline

NOW = 1_800_000_000.0
#: the calculation of a test case: what its snapshot saw (the fold and the merge share it)
SNAPSHOT = TxSnapshot(100, 110, frozenset({103, 105}))

increments = st.builds(
    Increment,
    campaign_id=st.integers(1, 5),
    org_id=st.integers(1, 4),
    action_type=st.sampled_from(["sign", "share", "mail", "donate"]),
    area=st.sampled_from([None, "DE", "FR", "PL"]),
    new_supporter=st.booleans(),
    count=st.sampled_from([1, 1, 1, 2, 7, MAX_ID // 2, MAX_ID]),
    action_id=st.one_of(st.none(), st.none(), st.sampled_from([1, 4, 5, 8, 9, 10, 11, 12, 13])),
    txid=st.one_of(st.none(), st.none(), st.none(), st.integers(95, 115)),
    at=st.one_of(
        st.none(), st.none(), st.none(), st.sampled_from([NOW - 7200, NOW - 30, NOW + 60])
    ),
    page=st.one_of(st.none(), st.none(), st.none(), st.integers(1, 4)),
    messages=st.sampled_from([0, 0, 0, 3, MAX_ID]),
)
#: mostly plain batches (the fast path), some with an increment that is not plain
plain = increments.map(lambda inc: inc._replace(at=None, page=None, txid=None))
batches = st.lists(st.one_of(plain, plain, plain, increments), min_size=1, max_size=12)

steps = st.one_of(
    st.tuples(st.just("incs"), batches),
    st.tuples(st.just("incs"), batches),
    st.tuples(st.just("incs"), batches),
    st.tuples(st.just("decs"), batches),
    st.tuples(st.just("start_journal"), st.sampled_from([None, (1, 2), (3,)])),
    st.tuples(st.just("fold"), st.none()),
    st.tuples(st.just("merge"), st.dictionaries(st.integers(1, 5), st.integers(0, 5))),
    st.tuples(st.just("merge"), st.dictionaries(st.integers(1, 5), st.integers(0, 5))),
    st.tuples(st.just("stop_journal"), st.none()),
    st.tuples(st.just("tick"), st.sampled_from([1.0, 61.0, 3600.0])),
)


def _calculation(max_action_id: int, window_low: int) -> Horizon:
    return Horizon(max_action_id, window_low, frozenset(), SNAPSHOT, NOW - 10)


def _result(
    counts: dict[int, int], max_action_id: int, window_low: int, uncounted: frozenset[int]
) -> CalculationResult:
    campaigns = {
        cid: CampaignStats(n, {"sign": n} if n else {}, {}, {1: n} if n else {})
        for cid, n in counts.items()
    }
    return CalculationResult(
        "ids",
        campaigns,
        max_action_id,
        window_low=window_low,
        uncounted_ids=uncounted,
        snapshot=SNAPSHOT,
        taken_at=NOW - 10,
    )


def _fold(fold: Fold | None) -> Any:
    if fold is None:
        return None
    pages = None if fold.pages is None else {k: _fold(v) for k, v in fold.pages.items()}
    return (
        fold.supporters,
        fold.messages,
        fold.increments,
        list(fold.action.items()),
        list(fold.area.items()),
        list(fold.org.items()),
        list(fold.minutes.items()),
        pages,
    )


def _timeline(timeline: Timeline) -> Any:
    series = timeline._series
    return (
        None if series is None else [(s.unit, s.keep, s.data.tolist()) for s in series],
        timeline.minute,
        timeline.pending_s,
        timeline.pending_a,
        timeline.last_action_at,
    )


def _stats(stats: CampaignStats) -> Any:
    return (
        stats.supporters,
        list(stats.action.items()),
        list(stats.area.items()),
        list(stats.org.items()),
        stats.extra_supporters,
        stats.messages,
    )


def snapshot(state: StatsState) -> dict[str, Any]:
    """Everything a StatsState holds, in a form that compares key for key and in order."""
    return {
        "campaigns": [(cid, _stats(s)) for cid, s in state.campaigns.items()],
        "timelines": [(cid, _timeline(t)) for cid, t in state.timelines.items()],
        "pages": [
            (p, ps.campaign_id, ps.org_id, _stats(ps.stats)) for p, ps in state.pages.items()
        ],
        "page_timelines": [(p, _timeline(t)) for p, t in state.page_timelines.items()],
        "pages_of": state.pages_of,
        "org_pages": state.org_pages,
        "org_campaigns": state.org_campaigns,
        "touched": state.touched,
        "ranked": state.ranking.dirty,
        "journal": None
        if state.journal is None
        else [(cid, list(entries)) for cid, entries in state.journal.items()],
        "journal_folds": None
        if state.journal_folds is None
        else [(cid, _fold(f)) for cid, f in state.journal_folds.items()],
        "journal_horizon": state.journal_horizon,
        "journal_only": state.journal_only,
        "journal_size": state.journal_size,
        "journal_overflow": state.journal_overflow,
        "seen": state.seen,
        "counted_now": state.counted_now,
        "counters": (
            state.applied,
            state.decremented,
            state.clamped,
            state.already_counted,
            state.page_mismatches,
            state.pages_over_limit,
        ),
    }


def decoded(batch: list[Increment]) -> list[Any]:
    """``batch`` as the server's codec hands it to the actor: msgspec items (v1 arrays for the
    plain ones, maps for the others)."""
    items: list[Any] = []
    for inc in batch:
        if inc.txid is None and inc.at is None and inc.page is None and not inc.messages:
            items.append(list(inc[:7]))
        else:
            items.append(
                {
                    "campaign": inc.campaign_id,
                    "org": inc.org_id,
                    "type": inc.action_type,
                    "area": inc.area,
                    "new": inc.new_supporter,
                    "count": inc.count,
                    "action": inc.action_id,
                    "txid": inc.txid,
                    "at": inc.at,
                    "page": inc.page,
                    "messages": inc.messages,
                }
            )
    [message] = ServerCodec().receive_data(msgpack.packb(["incs", items]))
    assert isinstance(message, Batch)
    assert not message.rejected
    return list(message.items)


@dataclass(frozen=True)
class Setting:
    """The limits and the calculation under which a program runs."""

    max_keys: int
    max_campaigns: int | None
    journal_limit: int
    window: tuple[int, int]  # the calculation's window: its lowest and highest action id
    uncounted: frozenset[int]  # ids in the window that the calculation did not count
    as_decoded: bool  # the batches as the server's codec decodes them, or as Increments


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    program=st.lists(steps, min_size=1, max_size=14),
    setting=st.builds(
        Setting,
        max_keys=st.sampled_from([1, 2, 3, 10_000]),
        max_campaigns=st.sampled_from([None, 2, 4]),
        journal_limit=st.sampled_from([6, 40, 5_000_000]),
        window=st.sampled_from([(0, 10), (4, 12), (8, 8), (0, 0)]),
        uncounted=st.frozensets(st.integers(1, 14), max_size=6),
        as_decoded=st.booleans(),
    ),
)
def test_apply_many_leaves_the_state_apply_each_leaves_after_any_sequence_of_batches(
    program: list[tuple[str, Any]], setting: Setting
) -> None:
    run_both_ways(program, setting)


def run_both_ways(
    program: list[tuple[str, Any]],
    setting: Setting,
    given_as: Callable[[list[Any]], Iterable[Any]] = lambda batch: batch,
) -> None:
    """Run ``program`` on a state through ``apply_many`` (each batch passed as ``given_as``
    makes it) and on one through ``apply_each``; after every step the states are equal."""
    window_low, max_action_id = setting.window
    clock = [NOW]
    fast = StatsState(max_keys=setting.max_keys, max_campaigns=setting.max_campaigns)
    each = StatsState(max_keys=setting.max_keys, max_campaigns=setting.max_campaigns)
    for state in (fast, each):
        state.clock = lambda: clock[0]
        state.journal_limit = setting.journal_limit
    for op, arg in program:
        if op in ("incs", "decs"):
            batch = decoded(arg) if setting.as_decoded and arg else arg
            if op == "decs":
                fast.apply_many(batch, decrement=True)
                each.apply_many(batch, decrement=True)
            else:
                assert fast.apply_many(given_as(batch)) == each.apply_each(batch)
        elif op == "start_journal":
            for state in (fast, each):
                state.start_journal(arg)
        elif op == "fold":
            for state in (fast, each):
                state.fold_journal(EarlyHorizon(_calculation(max_action_id, window_low)))
        elif op == "merge":
            result = _result(arg, max_action_id, window_low, setting.uncounted)
            if fast.journal_fits(result):
                assert fast.merge(result) == each.merge(result)
                for state in (fast, each):
                    state.stop_journal()
        elif op == "stop_journal":
            for state in (fast, each):
                state.stop_journal()
        else:
            clock[0] += arg
        assert snapshot(fast) == snapshot(each), op


def test_a_batch_whose_middle_increment_has_a_page_is_applied_in_order_around_it() -> None:
    """The fast path hands the rest of a batch to the general path at the first increment that
    is not plain: the rejections keep their indexes in the whole batch."""
    batch = [
        Increment(1, 1, "sign", None, True),
        Increment(1, 1, "share", None, False),
        Increment(1, 2, "mail", None, False, page=9),
        Increment(1, 1, "sign", None, True),
        Increment(1, 1, "donate", None, False),
    ]
    fast, each = StatsState(max_keys=2), StatsState(max_keys=2)
    fast.clock = each.clock = lambda: NOW
    rejected = fast.apply_many(batch)
    assert rejected == each.apply_each(batch)
    assert rejected == [
        (2, "campaign 1: over 2 action types"),
        (4, "campaign 1: over 2 action types"),
    ]
    assert snapshot(fast) == snapshot(each)
    assert fast.stats(1)["action"] == {"sign": 2, "share": 1}


def test_an_increment_a_merged_calculation_may_have_counted_goes_the_general_way() -> None:
    """After a merge, an increment of a merged campaign whose action id is inside the
    snapshot's window is skipped (counted) or recorded (not counted), exactly as apply_each
    does; one above the window, or of another campaign, stays on the fast path."""
    fast, each = StatsState(), StatsState()
    for state in (fast, each):
        state.clock = lambda: NOW
        state.merge(_result({1: 2}, 10, 4, frozenset({9})))
    batch = [
        Increment(1, 1, "sign", None, True, action_id=11),  # above the window: applied
        Increment(1, 1, "sign", None, True, action_id=10),  # counted by the snapshot: skipped
        Increment(1, 1, "sign", None, True, action_id=9),  # not counted: applied, recorded
        Increment(2, 1, "sign", None, True, action_id=10),  # no horizon: applied
    ]
    assert fast.apply_many(batch) == each.apply_each(batch) == []
    assert snapshot(fast) == snapshot(each)
    assert fast.already_counted == 1
    assert fast.counted_now == {1: {9: True}}
    assert fast.stats(1)["supporters"] == 2 + 2
