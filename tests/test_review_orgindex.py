"""Review of the org index's buckets (campaignstats/orgindex.py; docs/design.md, "Memory",
round 4): an org of one campaign is a pair in a bucket of 256 consecutive org ids."""

from __future__ import annotations

import gc
import time

from campaignstats.model import FORGET_ORGS_PER_STEP
from campaignstats.orgindex import OrgCampaigns


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


def _worst_step_cpu(spacing: int, gone: set[int], orgs: int = 300_000) -> float:
    """The CPU seconds of the longest step of forgetting ``gone`` from ``orgs`` orgs of one
    campaign each (three a campaign), their ids ``spacing`` apart."""
    index = OrgCampaigns()
    for i in range(orgs):
        index.add(1 + i * spacing, 1 + i // 3)
    steps = index.forget_steps(gone, lambda cid: True, FORGET_ORGS_PER_STEP)
    worst = 0.0
    gc.disable()
    try:
        while True:
            t0 = time.process_time()
            left = next(steps, 0)
            worst = max(worst, time.process_time() - t0)
            if not left:
                return worst
    finally:
        gc.enable()


def test_a_forget_step_over_orgs_a_bucket_apart_costs_about_one_over_consecutive_orgs() -> None:
    # A step looks at FORGET_ORGS_PER_STEP orgs ("about 6 ms at 300,000 orgs"), so that the
    # actor's loop is not stalled between two messages. Orgs whose ids are 256 apart are one to
    # a bucket: a step then looked at 20,000 buckets, each a lookup, a copy and a set check
    # (and a new array when one of its campaigns is gone), 4 to 20 times the CPU of a step
    # over consecutive org ids (22.6 ms against 1.1; 62 ms against 17 when every campaign goes).
    # The first step lists the buckets (as it listed the orgs before buckets: about 6 ms at
    # 300,000, whatever their ids): 10 ms of slack.
    for gone in ({1}, set(range(1, 100_001))):
        dense = _worst_step_cpu(1, gone)
        sparse = _worst_step_cpu(256, gone)
        assert sparse <= 2 * dense + 0.010, (len(gone), sparse, dense)
