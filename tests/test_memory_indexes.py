"""The per-campaign indexes kept small (docs/design.md, "Memory"): ``org_campaigns`` as arrays
of ids, and the sets of moved and touched campaigns that become "every campaign" once they list
more than a quarter of them. Each answers what the plain sets answered."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from campaignstats.model import (
    CalculationResult,
    CampaignStats,
    Increment,
    StatsState,
    TxSnapshot,
)
from campaignstats.orgindex import BUCKET_BITS, SLACK, OrgCampaigns
from campaignstats.ranking import COLLAPSE_MIN
from tests.test_ranking import NOW, scan

org_ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 4), st.integers(1, 30)),
        st.tuples(st.just("forget"), st.frozensets(st.integers(1, 30), max_size=12), st.none()),
    ),
    max_size=300,
)


@settings(max_examples=200, deadline=None)
@given(org_ops)
def test_the_org_index_lists_the_same_campaigns_as_a_dict_of_sets(
    ops: list[tuple[str, Any, Any]],
) -> None:
    index = OrgCampaigns()
    reference: dict[int, set[int]] = {}
    for op, a, b in ops:
        if op == "add":
            index.add(a, b)
            reference.setdefault(a, set()).add(b)
        else:
            index.forget(a)
            for org in list(reference):
                reference[org] -= a
                if not reference[org]:
                    del reference[org]
        assert index.as_dict() == reference
        for org in range(1, 6):
            assert index.campaigns(org) == reference.get(org, set())
        assert len(index) == len(reference)
        # Repeats are kept within twice the distinct ids (plus the slack) by deduplication.
        for org, ids in reference.items():
            assert index.held(org) <= 2 * len(ids) + SLACK + 1


#: org ids over several buckets of orgs of one campaign (256 ids each), and past what an
#: ``array('q')`` holds (kept in the dict then)
spread_orgs = st.one_of(
    st.integers(1, 3 * (1 << BUCKET_BITS)),
    st.sampled_from([1 << 40, (1 << 40) + 1, 2**63 - 2, 2**63 - 1, 2**63, 2**70]),
)
spread_ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), spread_orgs, st.integers(1, 30)),
        st.tuples(st.just("add"), spread_orgs, st.integers(1, 30)),
        st.tuples(st.just("forget"), st.frozensets(st.integers(1, 30), max_size=12), st.none()),
        st.tuples(
            st.just("steps"),
            st.frozensets(st.integers(1, 30), min_size=1, max_size=12),
            st.integers(1, 3),  # orgs per step (a bucket is looked at whole)
        ),
    ),
    max_size=150,
)


@settings(max_examples=200, deadline=None)
@given(spread_ops, st.randoms(use_true_random=False))
def test_orgs_of_one_campaign_kept_in_buckets_list_the_same_campaigns_as_a_dict_of_sets(
    ops: list[tuple[str, Any, Any]], rng: random.Random
) -> None:
    index = OrgCampaigns()
    reference: dict[int, set[int]] = {}

    def add(org: int, cid: int) -> None:
        index.add(org, cid)
        reference.setdefault(org, set()).add(cid)

    def forget(gone: frozenset[int]) -> None:
        for org in list(reference):
            reference[org] -= gone
            if not reference[org]:
                del reference[org]

    for op, a, b in ops:
        if op == "add":
            add(a, b)
        elif op == "forget":
            index.forget(a)
            forget(a)
        else:  # in steps, with campaigns coming back in orgs old and new between them
            back: set[int] = set()
            steps = index.forget_steps(set(a), lambda cid: cid not in back, b)  # noqa: B023
            while next(steps, 0):
                if rng.random() < 0.3:
                    cid = rng.choice(sorted(a))
                    back.add(cid)
                    # It comes back in the orgs that still list it (those the steps did not
                    # reach yet), and in one more: one that lists a campaign still gone when
                    # there is one (it leaves its bucket then), or any.
                    kept = {org for org, ids in index.as_dict().items() if cid in ids}
                    for org in list(reference):
                        if org not in kept and cid in reference[org]:
                            reference[org].discard(cid)
                            if not reference[org]:
                                del reference[org]
                    gone_in = [o for o, ids in index.as_dict().items() if ids & (a - back)]
                    add(rng.choice(gone_in or [*reference, 7, 1 << 40]), cid)
            forget(a - back)
        assert index.as_dict() == reference
        assert sorted(index) == sorted(reference)  # each org once
        assert len(index) == len(reference)
        for org in {*reference, 5, 1 << 40, 2**70}:
            assert index.campaigns(org) == reference.get(org, set())
            assert (index.held(org) > 0) == (org in reference)
        for org, ids in reference.items():
            assert index.held(org) <= 2 * len(ids) + SLACK + 1


def test_org_stats_stays_exact_and_its_index_small_over_many_merges() -> None:
    state = StatsState()
    state.clock = lambda: NOW
    state.apply_many([Increment(c, 7, "sign", None, True) for c in range(1, 51)])
    for round_ in range(40):  # every merge notes each org of each merged campaign again
        truth = {c: CampaignStats(2, {"sign": 2}, {}, {7: 1, 8: 1}) for c in range(1, 51)}
        state.merge(CalculationResult("ids", truth, round_))
    assert state.org_stats(7)["campaigns"] == dict.fromkeys(range(1, 51), 1)
    assert state.org_stats(8)["supporters"] == 50
    for org in (7, 8):
        assert state.org_campaigns.held(org) <= 2 * 50 + SLACK + 1


def test_forgetting_campaigns_takes_them_out_of_the_org_index() -> None:
    state = StatsState()
    state.clock = lambda: NOW
    state.apply_many([Increment(c, 1 + c % 2, "sign", None, True) for c in range(1, 11)])
    state.start_journal()
    result = CalculationResult(
        "all",
        {c: CampaignStats(1, {"sign": 1}, {}, {1 + c % 2: 1}) for c in (2, 3)},
        10,
        snapshot=TxSnapshot(400, 400),
    )
    state.merge(result)
    assert sorted(state.forget_absent(result)) == [1, 4, 5, 6, 7, 8, 9, 10]
    state.stop_journal()
    assert state.org_campaigns.as_dict() == {1: {2}, 2: {3}}
    assert state.org_stats(2) == {"supporters": 1, "actions": 0, "campaigns": {3: 1}}


MANY = COLLAPSE_MIN + 200  # campaigns: enough that the sets collapse


def _many(state: StatsState) -> None:
    """Every campaign gets a supporter, in the actor's slices of 250."""
    incs = [Increment(c, 1, "sign", None, True) for c in range(1, MANY + 1)]
    for i in range(0, len(incs), 250):
        state.apply_many(incs[i : i + 250])


def test_the_moved_and_touched_sets_become_a_flag_when_most_campaigns_are_in_them() -> None:
    state = StatsState()
    state.clock = lambda: NOW
    _many(state)
    assert state.ranking.all_for_top
    assert state.ranking.all_for_goals
    assert len(state.ranking.dirty) * 4 <= MANY  # the set was dropped at the collapse
    hour = int(NOW) // 3600
    assert state.touched[hour] is None
    # Every campaign is answered for: the goals get them all, top finds the leaders.
    assert state.ranking.take_moved() == set(range(1, MANY + 1))
    state.apply_many([Increment(5, 1, "sign", None, True)] * 3)
    for by in ("supporters", "last_hour", "today"):
        assert state.top(by, 3) == scan(state, by, 3), by
    assert state.top("supporters", 1) == [[5, 4]]
    assert state.ranking.take_moved() == {5}
    assert not state.ranking.all_for_top
    assert not state.ranking.all_for_goals


def test_a_campaign_forgotten_after_the_collapse_leaves_the_ranking() -> None:
    state = StatsState()
    state.clock = lambda: NOW
    _many(state)
    state.apply_many([Increment(MANY, 1, "sign", None, True)] * 5)
    assert state.top("supporters", 1) == [[MANY, 6]]
    _many(state)  # collapsed again
    state.start_journal()
    kept = {c: CampaignStats(1, {"sign": 1}, {}, {1: 1}) for c in range(1, MANY)}
    result = CalculationResult("all", kept, 10, snapshot=TxSnapshot(400, 400))
    state.merge(result)
    assert state.forget_absent(result) == [MANY]
    state.stop_journal()
    assert MANY not in state.campaigns
    assert state.top("supporters", 2) == scan(state, "supporters", 2)
    assert all(cid != MANY for cid, _ in state.top("supporters", MANY))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 8))
@example(193, 1)  # top while the goals were owed every campaign dropped the moved non-campaigns
def test_top_and_the_goals_see_every_move_whether_the_sets_collapsed_or_not(
    seed: int, limit: int
) -> None:
    rng = random.Random(seed)
    state = StatsState()
    state.clock = lambda: NOW
    # New supporters since the goals last looked (a reference): a decrement of a campaign
    # memory does not hold counts too (the goals were always handed those ids).
    moved: set[int] = set()
    for _ in range(12):
        size = rng.choice((1, 20, 250, 900))
        ids = [rng.randint(1, MANY + 300) for _ in range(size)]
        decrement = rng.random() < 0.2
        incs = [Increment(c, rng.randint(1, 3), "sign", None, rng.random() < 0.8) for c in ids]
        state.apply_many(incs, decrement=decrement)
        moved.update(i.campaign_id for i in incs if i.new_supporter)
        what = rng.random()
        if what < 0.3:
            for by in ("supporters", "last_hour", "today"):
                assert state.top(by, limit) == scan(state, by, limit), by
        elif what < 0.6:
            assert state.ranking.take_moved() >= moved
            moved = set()
    assert state.ranking.take_moved() >= moved
    for by in ("supporters", "last_hour", "today"):
        assert state.top(by, limit) == scan(state, by, limit), by


def test_an_org_that_campaigns_join_out_of_order_is_not_copied_while_it_holds_no_repeat() -> None:
    index = OrgCampaigns()
    order = random.Random(7).sample(range(1, 2_001), 2_000)
    index.add(1, order[0])
    index.add(1, order[1])
    first = index._ids[1]  # the array, once the org has two campaigns
    for cid in order[2:]:
        index.add(1, cid)
    assert index._ids[1] is first  # checked at each doubling, never sorted and copied
    assert index.campaigns(1) == set(order)
    assert index.held(1) == 2_000
    for cid in order + order:  # repeats (campaigns that lost the org and gained it again)
        index.add(1, cid)
    assert index._ids[1] is not first  # a check found them: rebuilt, each id once
    assert index.held(1) <= 2 * 2_000 + SLACK + 1
    assert index.campaigns(1) == set(order)
