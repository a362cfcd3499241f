"""The counting model without an event loop: apply(), limits, the wire conversion, the merge."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from campaignstats.errors import Invalid
from campaignstats.model import (
    CalculationResult,
    CampaignStats,
    Increment,
    StatsState,
    empty_wire_stats,
)


def test_a_new_supporter_moves_supporters_area_org_and_action() -> None:
    state = StatsState()
    state.apply(Increment(1, 7, "register", "DE", True))
    assert state.stats(1) == {
        "supporters": 1,
        "action": {"register": 1},
        "area": {"DE": 1},
        "org": {7: 1},
        "extra_supporters": 0,
        "messages": 0,
    }


def test_a_returning_supporter_moves_only_the_action_count() -> None:
    state = StatsState()
    state.apply(Increment(1, 7, "register", "DE", True))
    state.apply(Increment(1, 8, "share", "FR", False))
    stats = state.stats(1)
    assert stats["supporters"] == 1
    assert stats["action"] == {"register": 1, "share": 1}
    assert stats["area"] == {"DE": 1}  # no zero-valued FR, unlike Proca's code
    assert stats["org"] == {7: 1}


def test_count_adds_that_many_actions_but_one_supporter() -> None:
    state = StatsState()
    state.apply(Increment(3, 1, "mail2target", None, True, count=10))
    assert state.stats(3)["action"] == {"mail2target": 10}
    assert state.stats(3)["supporters"] == 1
    assert state.stats(3)["area"] == {}


def test_an_unknown_campaign_has_zeros_and_empty_maps() -> None:
    assert StatsState().stats(42) == empty_wire_stats()
    assert empty_wire_stats() == {
        "supporters": 0, "action": {}, "area": {}, "org": {}, "extra_supporters": 0, "messages": 0,
    }  # fmt: skip


def test_wire_stats_are_copies_that_later_increments_do_not_change() -> None:
    state = StatsState()
    state.apply(Increment(1, 1, "register", "DE", True))
    before = state.stats(1)
    state.apply(Increment(1, 1, "register", "DE", True))
    assert before["action"] == {"register": 1}
    assert CampaignStats.from_wire(state.stats(1)) == state.campaigns[1]


def test_a_new_key_over_the_per_campaign_limit_is_rejected_and_changes_nothing() -> None:
    state = StatsState(max_keys=2)
    state.apply(Increment(1, 1, "a", "DE", True))
    state.apply(Increment(1, 2, "b", "FR", True))
    before = state.campaigns[1].copy()
    for bad in (
        Increment(1, 1, "c", None, False),  # a third action type
        Increment(1, 3, "a", None, True),  # a third org
        Increment(1, 1, "a", "IT", True),  # a third area
    ):
        with pytest.raises(Invalid):
            state.apply(bad)
    assert state.campaigns[1] == before
    state.apply(Increment(1, 1, "a", "DE", True))  # existing keys keep counting
    assert state.campaigns[1].supporters == 3


def test_apply_many_applies_the_valid_items_and_names_the_rejected_ones() -> None:
    state = StatsState(max_keys=1)
    rejected = state.apply_many(
        [Increment(1, 1, "a"), Increment(1, 1, "b"), Increment(1, 1, "a", count=2)]
    )
    assert [i for i, _ in rejected] == [1]
    assert state.stats(1)["action"] == {"a": 3}
    assert state.applied == 2


def test_a_new_campaign_over_the_campaign_cap_is_rejected_and_existing_ones_keep_counting() -> None:
    state = StatsState(max_campaigns=1)
    state.apply(Increment(1, 1, "a"))
    with pytest.raises(Invalid):
        state.apply(Increment(2, 1, "a"))
    assert 2 not in state.campaigns
    state.apply(Increment(1, 1, "a"))
    assert state.stats(1)["action"] == {"a": 2}


increments = st.builds(
    Increment,
    campaign_id=st.integers(1, 4),
    org_id=st.integers(1, 3),
    action_type=st.sampled_from(["register", "share", "mail2target"]),
    area=st.sampled_from([None, "DE", "FR"]),
    new_supporter=st.booleans(),
    count=st.integers(1, 5),
    action_id=st.none() | st.integers(1, 100),
    txid=st.none(),
    at=st.none(),
    page=st.none(),
    messages=st.integers(0, 3),
)


@given(st.lists(increments, max_size=60))
def test_the_totals_are_the_sums_of_the_increments(incs: list[Increment]) -> None:
    state = StatsState()
    state.apply_many(incs)
    for cid in {i.campaign_id for i in incs}:
        mine = [i for i in incs if i.campaign_id == cid]
        stats = state.stats(cid)
        assert stats["supporters"] == sum(i.new_supporter for i in mine)
        assert sum(stats["action"].values()) == sum(i.count for i in mine)
        assert sum(stats["org"].values()) == stats["supporters"]
        assert stats["messages"] == sum(i.messages for i in mine)
        assert sum(stats["area"].values()) == sum(
            i.new_supporter and i.area is not None for i in mine
        )


@given(
    db=st.lists(increments, max_size=40),
    journaled=st.lists(increments, max_size=40),
    max_action_id=st.integers(0, 100),
)
def test_merge_gives_the_database_value_plus_the_increments_the_snapshot_could_not_see(
    db: list[Increment], journaled: list[Increment], max_action_id: int
) -> None:
    # "The database" is what applying `db` gives; the calculation saw those plus the journaled
    # increments whose action id is at or below its highest action id.
    seen = [i for i in journaled if i.action_id is not None and i.action_id <= max_action_id]
    truth = StatsState()
    truth.apply_many(db + seen)
    covered = {cid: truth.campaigns.get(cid, CampaignStats()).copy() for cid in range(1, 5)}

    state = StatsState()
    state.apply_many(db)  # memory before the calculation agrees with the database
    state.start_journal()
    state.apply_many(journaled)
    drifts = state.merge(CalculationResult("all", covered, max_action_id))
    state.stop_journal()

    expected = StatsState()
    expected.apply_many(db + journaled)
    for cid in range(1, 5):
        assert state.stats(cid) == expected.stats(cid) or (
            cid not in expected.campaigns and state.stats(cid) == empty_wire_stats()
        )
    assert drifts == []


def test_merge_measures_drift_and_the_database_wins() -> None:
    state = StatsState()
    state.merge(CalculationResult("all", {1: CampaignStats()}, max_action_id=0))  # loaded once
    state.apply_many([Increment(1, 1, "a", None, True)] * 5)  # memory: 5 supporters, 5 actions
    state.start_journal()
    state.apply(Increment(1, 1, "a", None, True, action_id=11))  # after the snapshot
    state.apply(Increment(1, 1, "a", None, True, action_id=9))  # inside the snapshot
    db = CampaignStats(supporters=3, action={"a": 3}, org={1: 3})  # 9 is one of these 3
    drifts = state.merge(CalculationResult("all", {1: db}, max_action_id=10))
    assert state.stats(1)["supporters"] == 4
    assert state.stats(1)["action"] == {"a": 4}
    assert [(d.campaign_id, d.supporters, d.actions) for d in drifts] == [(1, 3, 3)]


def test_merging_in_slices_replays_increments_that_arrive_between_slices() -> None:
    state = StatsState()
    state.start_journal()
    result = CalculationResult("all", {1: CampaignStats(), 2: CampaignStats()}, max_action_id=0)
    state.merge(result, [1])
    state.apply(Increment(1, 1, "a"))  # campaign 1 already merged: applied once
    state.apply(Increment(2, 1, "a"))  # campaign 2 not yet merged: replayed by its slice
    state.merge(result, [2])
    state.stop_journal()
    assert state.stats(1)["action"] == {"a": 1}
    assert state.stats(2)["action"] == {"a": 1}


def test_merge_leaves_campaigns_outside_the_result_alone() -> None:
    state = StatsState()
    state.apply(Increment(5, 1, "a", None, True))
    state.start_journal()
    state.merge(CalculationResult("live", {1: CampaignStats(supporters=2)}, 0))
    assert state.stats(5)["supporters"] == 1
    assert state.stats(1)["supporters"] == 2


def test_increments_before_the_first_load_are_not_reported_as_drift() -> None:
    state = StatsState()
    state.apply(Increment(1, 1, "a", None, True))
    state.start_journal()
    db = CampaignStats(supporters=9, action={"a": 9}, org={1: 9})
    assert state.merge(CalculationResult("all", {1: db}, max_action_id=10)) == []


def test_an_increment_the_merged_calculation_already_counted_is_skipped() -> None:
    state = StatsState()
    state.merge(CalculationResult("all", {1: CampaignStats()}, 10, uncounted_ids=frozenset({7})))
    state.apply(Increment(1, 1, "a", action_id=5))  # counted by the calculation: skipped
    state.apply(Increment(1, 1, "a", action_id=7))  # invisible to its snapshot: applied
    state.apply(Increment(1, 1, "a", action_id=11))  # newer than the snapshot: applied
    state.apply(Increment(1, 1, "a"))  # no action id: applied
    state.apply(Increment(2, 1, "a", action_id=5))  # another campaign, never merged: applied
    assert state.stats(1)["action"] == {"a": 3}
    assert state.stats(2)["action"] == {"a": 1}
    assert state.already_counted == 1


def test_an_increment_that_would_overflow_a_count_is_rejected() -> None:
    state = StatsState()
    state.apply(Increment(1, 1, "a", count=2**63 - 2))
    with pytest.raises(Invalid, match="overflow"):
        state.apply(Increment(1, 1, "a", count=2))
    assert state.stats(1)["action"] == {"a": 2**63 - 2}


def test_a_journal_over_its_limit_is_dropped_and_flagged() -> None:
    state = StatsState()
    state.journal_limit = 3
    state.start_journal()
    state.apply_many([Increment(1, 1, "a")] * 3)
    assert state.journal is not None
    assert not state.journal_overflow
    state.apply(Increment(1, 1, "a"))
    assert state.journal is None
    assert state.journal_overflow
    assert state.stats(1)["action"] == {"a": 4}  # counting goes on


def test_a_journal_for_some_campaigns_records_only_those() -> None:
    state = StatsState()
    state.start_journal(only=[2])
    state.apply_many([Increment(1, 1, "a"), Increment(2, 1, "a"), Increment(2, 1, "b")])
    # Without ``at``, each is journaled with its arrival, the time of its bucket.
    assert state.journal is not None
    assert list(state.journal) == [2]
    assert [entry.change for entry in state.journal[2]] == [  # type: ignore[union-attr]
        Increment(2, 1, "a"),
        Increment(2, 1, "b"),
    ]
    assert state.journal_size == 2


def test_a_decrement_is_the_exact_inverse_of_the_same_increment() -> None:
    state = StatsState()
    keep = Increment(1, 7, "register", "DE", True, messages=2)
    gone = Increment(1, 8, "share", "FR", True, count=3, messages=1)
    state.apply(keep)
    state.apply(gone)
    state.apply(gone, decrement=True)
    after = StatsState()
    after.apply(keep)
    assert state.stats(1) == after.stats(1)  # keys at zero gone: FR, org 8, share
    assert state.clamped == 0
    assert state.decremented == 1


def test_a_decrement_never_takes_a_count_below_zero_and_says_so() -> None:
    state = StatsState()
    state.apply(Increment(1, 7, "register", "DE", True))
    state.apply(Increment(1, 7, "register", "DE", True, count=2), decrement=True)
    state.apply(Increment(2, 7, "register"), decrement=True)  # an unknown campaign
    assert state.stats(1) == empty_wire_stats()
    assert 2 not in state.campaigns  # nothing created for it
    assert state.clamped == 2
