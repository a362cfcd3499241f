"""Idle campaigns' lazy timelines folded into their packed form (docs/design.md, "Memory",
round 4): the sweep moves a packed campaign's timeline (while its counts are all in one minute)
into its bytes, so that the state holds no Timeline and no ``timelines`` entry for it; reads
rebuild a copy; the first write unpacks the campaign and puts the timeline back. Every read
answers as a state that never packs (the property test of tests/test_packing.py runs the
sweep too; here, each case by name)."""

from __future__ import annotations

from pathlib import Path

from campaignstats.actor.snapshot import load_snapshot, save_snapshot
from campaignstats.model import (
    CalculationResult,
    CampaignStats,
    FoldedCampaignStats,
    Increment,
    PackedCampaignStats,
    StatsState,
)
from campaignstats.timeline import Timeline

from .test_apply_paths import NOW
from .test_packing import _counts, _reads

PACK_IDLE = 60.0


def _twins() -> tuple[StatsState, StatsState, list[float]]:
    """A state that packs and one that never does, on one clock, with the same changes:
    campaign 1's actions in one minute (a lazy timeline), campaign 2's in two (series), and
    campaign 3's in one minute, taken back."""
    clock = [NOW]
    packing, plain = StatsState(), StatsState()
    packing.pack_idle = PACK_IDLE
    for state in (packing, plain):
        state.clock = lambda: clock[0]
        state.apply_many(
            [
                Increment(1, 7, "sign", "DE", True),
                Increment(1, 8, "share", None, False, count=3),
                Increment(2, 7, "sign", "FR", True),
                Increment(2, 7, "sign", "FR", True, at=NOW - 120),
                Increment(3, 9, "sign", None, True),
            ]
        )
        state.apply_many([Increment(3, 9, "sign", None, True)], decrement=True)
    clock[0] += PACK_IDLE + 1
    return packing, plain, clock


def test_the_sweep_folds_a_lazy_timeline_into_the_packed_form_and_leaves_one_with_series() -> None:
    packing, plain, clock = _twins()
    before = _reads(packing)
    packing.pack_idle_campaigns(list(packing.campaigns), clock[0])
    assert type(packing.campaigns[1]) is FoldedCampaignStats
    assert type(packing.campaigns[3]) is FoldedCampaignStats  # an empty minute, its time kept
    assert type(packing.campaigns[2]) is PackedCampaignStats  # series: kept as it is
    assert set(packing.timelines) == {2}  # no entry, and no Timeline, for 1 and 3
    assert _reads(packing) == _reads(plain) == before
    assert _counts(packing) == _counts(plain)
    # its maps' bytes are those of a campaign packed without its timeline
    plain_packed = plain.campaigns[1].packed_copy()
    assert packing.campaigns[1].packed == plain_packed.packed
    assert packing.check() is None
    assert packing.campaigns[1] == plain.campaigns[1]


def test_a_write_to_a_folded_campaign_puts_its_timeline_back_and_counts_as_if_never_packed() -> (
    None
):
    packing, plain, clock = _twins()
    packing.pack_idle_campaigns(list(packing.campaigns), clock[0])
    folded = packing.campaigns[1]
    for state in (packing, plain):
        state.apply_many([Increment(1, 7, "sign", "DE", True)])  # another minute: series
        state.apply_many([Increment(3, 9, "sign", None, True, at=NOW)], decrement=True)
    assert type(folded) is CampaignStats
    assert type(packing.campaigns[3]) is CampaignStats  # a decrement unpacks too
    assert set(packing.timelines) == {1, 2, 3}
    assert _reads(packing) == _reads(plain)
    assert _counts(packing) == _counts(plain)
    assert packing.timelines[1].views(clock[0]) == plain.timelines[1].views(clock[0])


def test_reads_of_a_folded_campaign_leave_it_folded(tmp_path: Path) -> None:
    packing, _, clock = _twins()
    packing.pack_idle_campaigns(list(packing.campaigns), clock[0])
    for _ in range(2):
        _reads(packing)
        packing.org_stats(7)
        packing.campaigns[1].to_wire()
        packing.campaigns[1].copy()
        save_snapshot(tmp_path / "snapshot", packing.campaigns)
    assert type(packing.campaigns[1]) is FoldedCampaignStats
    assert set(packing.timelines) == {2}
    # the snapshot file holds the counts, as for any campaign (no timeline)
    loaded = load_snapshot(tmp_path / "snapshot", packed=True)
    assert loaded == packing.campaigns
    assert all(type(s) is PackedCampaignStats for s in (loaded or {}).values())


def test_a_campaign_a_merge_installed_packed_is_folded_at_the_next_sweep() -> None:
    packing, plain, clock = _twins()
    packing.pack_idle_campaigns(list(packing.campaigns), clock[0])
    in_db = Timeline()
    in_db.add(NOW - 3600, 1, 1)  # its action, an hour before: one minute (lazy)
    result = CalculationResult(
        "ids", {1: CampaignStats(1, {"sign": 1}, {"DE": 1}, {7: 1})}, 10, timelines={1: in_db}
    )
    for state in (packing, plain):
        state.merge(result)
    assert type(packing.campaigns[1]) is PackedCampaignStats  # idle: installed packed
    assert 1 in packing.timelines  # the merge's timeline, not folded yet
    assert _reads(packing) == _reads(plain)
    packing.pack_idle_campaigns(list(packing.campaigns), clock[0])
    assert type(packing.campaigns[1]) is FoldedCampaignStats
    assert 1 not in packing.timelines
    assert _reads(packing) == _reads(plain)
    assert _counts(packing) == _counts(plain)


def test_a_folded_campaign_no_longer_in_its_state_puts_no_timeline_there_when_unpacked() -> None:
    packing, _, clock = _twins()
    packing.pack_idle_campaigns(list(packing.campaigns), clock[0])
    gone = packing.campaigns.pop(1)  # as forget_absent drops it
    assert gone.action == {"sign": 1, "share": 3}  # unpacked: its maps are all there
    assert 1 not in packing.timelines
    assert packing.timeline_of(1) is None


def test_top_reads_a_folded_timeline_as_the_timeline_itself_answers() -> None:
    packing, plain, clock = _twins()
    packing.pack_idle_campaigns(list(packing.campaigns), clock[0])
    for cid in (1, 3):
        stats = packing.campaigns[cid]
        assert isinstance(stats, FoldedCampaignStats)
        timeline = plain.timelines[cid]
        assert stats.folded_timeline().views(clock[0]) == timeline.views(clock[0])
        minute = int(NOW) // 60
        for unit in (60, 3600, 86400):
            at = minute * 60 // unit
            for lo, hi in ((at, at + 1), (at - 5, at), (at + 1, at + 9), (at - 59, at + 1)):
                want = timeline.unit_total(unit, lo, hi)[0]
                assert stats.folded_supporters(unit, lo, hi) == want, (cid, unit, lo, hi)
    for by in ("last_hour", "today"):
        assert packing.top(by, 10) == plain.top(by, 10)
