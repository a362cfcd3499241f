"""Review of the org index's buckets (campaignstats/orgindex.py; docs/design.md, "Memory",
round 4): an org of one campaign is a pair in a bucket of 256 consecutive org ids."""

from __future__ import annotations

from campaignstats.model import FORGET_ORGS_PER_STEP
from campaignstats.orgindex import BUCKET_WEIGHT, OrgCampaigns


def test_an_org_in_a_bucket_keeps_its_campaign_when_a_campaign_past_int64_joins_it() -> None:
    # "an org or a campaign id outside [an array('q')] is kept in the dict": the org's first
    # campaign is in its bucket, and must still be listed once the second one is in the dict
    index = OrgCampaigns()
    index.add(5, 1)
    index.add(5, 2**63)
    assert index.campaigns(5) == {1, 2**63}
    assert index.as_dict() == {5: {1, 2**63}}
    assert sorted(index) == [5]
    assert len(index) == 1
    index.forget({2**63})
    assert index.as_dict() == {5: {1}}


def _steps(spacing: int, gone: set[int], orgs: int) -> tuple[int, OrgCampaigns]:
    """How many steps forgetting ``gone`` takes from ``orgs`` orgs of one campaign each (three
    a campaign), their ids ``spacing`` apart, and the index after them."""
    index = OrgCampaigns()
    for i in range(orgs):
        index.add(1 + i * spacing, 1 + i // 3)
    steps = sum(1 for _ in index.forget_steps(gone, lambda cid: True, FORGET_ORGS_PER_STEP))
    return steps, index


def test_a_forget_step_looks_at_no_more_buckets_than_its_budget_whatever_the_org_ids() -> None:
    # A step looks at FORGET_ORGS_PER_STEP orgs ("about 6 ms at 300,000 orgs"), so that the
    # actor's loop is not stalled between two messages. Orgs whose ids are 256 apart are one to
    # a bucket: a step counted each bucket as its one org and looked at 20,000 buckets, each a
    # lookup, a copy and a set check (22.6 ms of CPU against 1.1 over consecutive ids; 62 ms
    # against 17 when every campaign goes; docs/design.md, "Memory", round 4). A bucket now
    # counts as at least BUCKET_WEIGHT orgs: a count of the steps, not a clock, shows it.
    orgs = 60_000
    for gone in ({1}, set(range(1, orgs // 3 + 1))):
        sparse, index = _steps(256, gone, orgs)
        assert sparse >= orgs * BUCKET_WEIGHT // FORGET_ORGS_PER_STEP, (len(gone), sparse)
        assert index.as_dict() == {
            1 + i * 256: {1 + i // 3} for i in range(orgs) if 1 + i // 3 not in gone
        }
        dense, index = _steps(1, gone, orgs)
        assert dense <= -(-orgs // FORGET_ORGS_PER_STEP) + 1, (len(gone), dense)
        assert index.as_dict() == {
            1 + i: {1 + i // 3} for i in range(orgs) if 1 + i // 3 not in gone
        }
