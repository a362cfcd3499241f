"""Pages are keys of their campaign (docs/design.md, "Action pages and orgs"): past ``max_keys``
pages, a change naming a new page counts in its campaign only, when applied and when replayed."""

from __future__ import annotations

from campaignstats.model import CalculationResult, CampaignStats, Increment, StatsState, TxSnapshot


def _state() -> StatsState:
    state = StatsState(max_keys=3, max_campaigns=10)
    state.clock = lambda: 1_750_000_000.0
    return state


def test_a_new_page_past_max_keys_counts_in_its_campaign_only_and_in_info() -> None:
    state = _state()
    rejected = state.apply_many([Increment(7, 1, "sign", None, True, page=p) for p in range(1, 6)])
    assert rejected == []
    assert state.campaigns[7].supporters == 5
    assert sorted(state.pages) == [1, 2, 3]
    assert state.pages_over_limit == 2
    # a page memory holds still counts, at the limit
    state.apply_many([Increment(7, 1, "sign", None, True, page=2)])
    assert state.pages[2].stats.supporters == 2
    assert state.pages_over_limit == 2


def test_the_merge_replays_no_new_page_past_max_keys() -> None:
    state = _state()
    state.start_journal()
    state.apply_many([Increment(8, 1, "sign", None, True, page=p) for p in range(11, 16)])
    result = CalculationResult("all", {8: CampaignStats()}, 10, snapshot=TxSnapshot(400, 400))
    state.merge(result)
    state.stop_journal()
    assert state.campaigns[8].supporters == 5  # the campaign replays every change
    assert sorted(state.pages) == [11, 12, 13]
    assert sum(ps.stats.supporters for ps in state.pages.values()) == 3


def test_forget_absent_drops_an_org_left_with_no_campaign_and_keeps_the_others() -> None:
    state = _state()
    state.apply_many([Increment(1, 50, "sign", None, True), Increment(2, 50, "sign", None, True)])
    state.apply_many([Increment(2, 51, "sign", None, True)])
    state.start_journal()
    result = CalculationResult("all", {1: CampaignStats()}, 10, snapshot=TxSnapshot(400, 400))
    state.merge(result)
    assert state.forget_absent(result) == [2]
    state.stop_journal()
    assert state.org_campaigns.as_dict() == {50: {1}}


def test_a_change_the_campaign_refuses_counts_nothing_in_the_page_figures() -> None:
    state = StatsState(max_keys=1, max_campaigns=1)
    state.clock = lambda: 1_750_000_000.0
    state.apply_many([Increment(7, 1, "sign", None, True, page=1)])
    rejected = state.apply_many(
        [
            Increment(8, 1, "sign", None, True, page=2),  # over max_campaigns
            Increment(7, 1, "share", None, False, page=3),  # over max_keys action types
            Increment(7, 2, "sign", None, True, page=1),  # over max_keys orgs
        ]
    )
    assert [i for i, _ in rejected] == [0, 1, 2]
    assert (state.pages_over_limit, state.page_mismatches) == (0, 0)
    assert sorted(state.pages) == [1]
    assert state.pages[1].stats.supporters == 1
