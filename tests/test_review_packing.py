"""Review of idle campaigns packed (docs/design.md, "Memory", round 3): the sweep's budget with
large campaigns, the snapshot file's memory at save, copies and pickles of a packed campaign."""

from __future__ import annotations

import copy
import pickle
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from bench.org_stats import NOW as ORGS_NOW
from bench.org_stats import filled as org_in_many_campaigns
from campaignstats.actor.packing import Packing
from campaignstats.actor.snapshot import load_snapshot, save_snapshot
from campaignstats.model import CampaignStats, PackedCampaignStats, StatsState

NOW = 1_700_000_000.0


def _large(keys: int) -> CampaignStats:
    return CampaignStats(
        keys,
        {f"action-{i}": i + 1 for i in range(keys)},
        {f"area-{i:05d}": 1 for i in range(keys)},
        {i: 1 for i in range(1, keys + 1)},
    )


def _state_of_large_campaigns(campaigns: int, keys: int) -> StatsState:
    state = StatsState()
    state.clock = lambda: NOW
    state.pack_idle = 300.0
    for cid in range(1, campaigns + 1):
        state.campaigns[cid] = _large(keys)  # loaded, no timeline: idle
    return state


def test_a_sweep_step_with_no_budget_left_packs_one_large_campaign_not_a_group_of_250() -> None:
    state = _state_of_large_campaigns(300, 200)
    packing = Packing(idle_after=300.0, interval=60.0, budget=0.0)
    packing.start_if_due(state, 1e9)
    assert packing.sweep is not None
    packing.step(state)
    assert state.packed_count() == 1
    while not packing.step(state):
        pass
    assert state.packed_count() == 300


def test_saving_a_snapshot_of_packed_campaigns_does_not_unpack_them_all_at_once(
    tmp_path: Path,
) -> None:
    # Every packed campaign was decoded into three fresh dicts, all held until the file was
    # encoded: at shutdown, the memory of every campaign hot again (the peak packing saves).
    state = _state_of_large_campaigns(2_000, 30)
    state.pack_idle_campaigns(list(state.campaigns), NOW)
    assert state.packed_count() == 2_000
    packed_bytes = sum(len(s.packed or b"") for s in state.campaigns.values())
    path = tmp_path / "s.msgpack"
    tracemalloc.start()
    try:
        save_snapshot(path, state.campaigns)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the file's bytes (about the packed bytes) and a list of rows, not the dicts again
    assert peak < 4 * packed_bytes
    loaded = load_snapshot(path)
    assert loaded is not None
    assert loaded == {cid: _large(30) for cid in range(1, 2_001)}
    assert state.packed_count() == 2_000


def test_a_snapshot_mixing_packed_and_unpacked_campaigns_loads_as_it_was_saved(
    tmp_path: Path,
) -> None:
    campaigns = {
        1: CampaignStats(2, {"sign": 2}, {"DE": 1}, {7: 2}, 1, 3),
        2: CampaignStats(1, {"sign": 1, "share": 4}, {}, {9: 1}),
        3: CampaignStats(),
        4: CampaignStats(5, {"ü-sign": 9}, {"ÖS": 5}, {2**62: 5}, 0, 2**40),
    }
    expected = {cid: copy.deepcopy(s) for cid, s in campaigns.items()}
    campaigns[2].pack()
    campaigns[3].pack()
    campaigns[4].pack()
    save_snapshot(tmp_path / "s.msgpack", campaigns, {"goals": {}})
    assert load_snapshot(tmp_path / "s.msgpack") == expected
    assert {cid for cid, s in campaigns.items() if s.packed is not None} == {2, 3, 4}


def test_a_packed_campaign_copies_deep_copies_and_pickles_as_the_same_counts() -> None:
    unpacked = CampaignStats(3, {"sign": 2}, {"DE": 1}, {7: 3}, 1, 4)
    stats = CampaignStats(3, {"sign": 2}, {"DE": 1}, {7: 3}, 1, 4)
    stats.pack()
    for twin in (copy.copy(stats), copy.deepcopy(stats), pickle.loads(pickle.dumps(stats))):
        assert twin == unpacked
        assert type(twin) is PackedCampaignStats  # a copy of a packed campaign stays packed
        twin.action["share"] = 1  # and its first write unpacks it
        assert twin.to_wire()["action"] == {"sign": 2, "share": 1}
    assert type(stats) is PackedCampaignStats  # the original was left packed
    assert stats == unpacked


def test_org_stats_of_an_org_in_many_packed_campaigns_reads_their_org_maps_alone() -> None:
    # It decoded each packed campaign's three maps to read one org's count: about 9x the
    # unpacked read (89 ms against 12 ms for an org in 20,000 campaigns on the loaded host,
    # one stall of the actor). Now one reader skips the action and area maps in C
    # (StatsState._packed_org; timed by `python -m bench.org_stats`, not here).
    state = org_in_many_campaigns(2_000)
    orgs = [1, *(1_000 + cid * 10 + i for cid in (1, 77, 2_000) for i in range(1, 6))]
    want = {org: state.org_stats(org) for org in orgs}
    state.pack_idle = 300.0
    state.pack_idle_campaigns(list(state.campaigns), ORGS_NOW + 1_000)
    assert state.packed_count() == 2_000
    for _ in range(2):  # the reader's second use starts where its first left
        assert {org: state.org_stats(org) for org in orgs} == want
    assert state.packed_count() == 2_000  # read, not unpacked
    assert want[1]["supporters"] == 2_000


def _error(call: Callable[[], object]) -> ValueError:
    try:
        call()
    except ValueError as exc:
        return exc
    raise AssertionError("no error")


def test_a_damaged_packed_campaign_fails_its_org_stats_and_not_the_next_ones() -> None:
    state = org_in_many_campaigns(3)
    want = state.org_stats(1)
    state.pack_idle = 300.0
    state.pack_idle_campaigns(list(state.campaigns), ORGS_NOW + 1_000)
    good = state.campaigns[2].packed
    assert good is not None
    for damaged in (good + b"\x01", good[:-1], b"\x92\x80\x80"):
        state.campaigns[2] = CampaignStats.from_packed(6, damaged, 0, 0)
        theirs = _error(state.campaigns[2].maps)
        ours = _error(lambda: state.org_stats(1))  # msgpack's own, as maps() raises it
        assert (type(ours), str(ours)) == (type(theirs), str(theirs))
        state.campaigns[2] = CampaignStats.from_packed(6, good, 0, 0)
        assert state.org_stats(1) == want


def _varied(cid: int) -> CampaignStats:
    return CampaignStats(
        50,
        {f"action-{i}": cid % 97 + i + 1 for i in range(4)},
        {f"AREA-{(cid * 7 + i) % 3_000}": 5 for i in range(8)},
        {cid * 3 + i: 9 for i in range(3)},
        2,
        cid % 5,
    )


def test_a_snapshot_loaded_for_a_state_that_packs_never_holds_every_campaigns_dicts(
    tmp_path: Path,
) -> None:
    # Loaded as dicts, then packed by replace_all: the dicts of every campaign were alive at
    # once, and the process's RSS stayed the hot state's (1,238 against 1,235 bytes per
    # campaign for 100,000 varied campaigns, packed or not).
    path = tmp_path / "s.msgpack"
    campaigns = {cid: _varied(cid) for cid in range(1, 20_001)}
    save_snapshot(path, campaigns, {"goals": {}})
    size = path.stat().st_size
    tracemalloc.start()
    try:
        loaded = load_snapshot(path, packed=True)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert loaded is not None
    assert all(type(s) is PackedCampaignStats for s in loaded.values())
    assert loaded == campaigns
    # what it holds once loaded (the packed bytes, the objects), and the file's bytes while
    # reading: not every campaign's dicts (the unpacked load peaks at 12.7 times the file, 6.4
    # above what it holds; read row by row, about 4.5 and 1.7 alone, 5.8 and 2.3 in the suite)
    assert peak - held < 4 * size
    assert peak < 8 * size
    state = StatsState()
    state.pack_idle = 300.0
    state.replace_all(loaded)
    assert state.packed_count() == 20_000
    assert state.stats(7) == campaigns[7].to_wire()
    assert state.org_stats(21)["campaigns"] == {7: 9}
    unpacked = load_snapshot(path)  # for a state that never packs: as before
    assert unpacked == campaigns
    assert unpacked is not None
    assert all(type(s) is CampaignStats for s in unpacked.values())


def test_a_damaged_snapshot_loaded_packed_is_refused_as_one_loaded_unpacked(
    tmp_path: Path,
) -> None:
    import msgpack

    bad_rows = [
        [1, 2, {"sign": 2}, {"DE": 1}, {"7": 2}, 0, 0],  # an org id that is not an int
        [1, 2, {"sign": 0}, {}, {}, 0, 0],  # a zero count
        [1, 2, {"sign": 1}, [], {}, 0, 0],  # not a map
        [0, 2, {"sign": 1}, {}, {}, 0, 0],  # not a campaign id
        [1, -1, {"sign": 1}, {}, {}, 0, 0],  # a negative count
    ]
    for i, row in enumerate(bad_rows):
        path = tmp_path / f"bad{i}.msgpack"
        path.write_bytes(msgpack.packb({"format": 3, "saved_at": 0.0, "campaigns": [row]}))
        assert load_snapshot(path) is None
        assert load_snapshot(path, packed=True) is None
    path = tmp_path / "format.msgpack"
    path.write_bytes(msgpack.packb({"format": 99, "campaigns": []}))
    assert load_snapshot(path, packed=True) is None
    path.write_bytes(msgpack.packb([1, 2]))
    assert load_snapshot(path, packed=True) is None
    # formats 1 and 2 (rows of six: no messages) load packed too
    path.write_bytes(
        msgpack.packb({"format": 1, "campaigns": [[3, 2, {"sign": 2}, {"DE": 1}, {7: 2}, 1]]})
    )
    assert load_snapshot(path, packed=True) == {
        3: CampaignStats(2, {"sign": 2}, {"DE": 1}, {7: 2}, 1)
    }
