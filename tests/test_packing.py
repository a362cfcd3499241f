"""Idle campaigns packed (docs/design.md, "Memory", round 3).

A packed campaign keeps its three maps as one MessagePack ``bytes``; its first write unpacks
it, reads leave it packed. Random programs of increments, decrements, journals, merges, packs
and sweeps run on a state that packs and on one that never does: after every step every read
answers the same and the states hold the same counts, key for key and in order. Then the
sweep, the merge, the snapshot file, a restarted actor's check and a real server process.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from campaignstats.actor.actor import ActorConfig
from campaignstats.actor.packing import Packing
from campaignstats.actor.snapshot import load_snapshot, save_snapshot
from campaignstats.client import AsyncStatsClient
from campaignstats.errors import UsageError
from campaignstats.goals import GoalKeeper, GoalsSpec
from campaignstats.journal import EarlyHorizon
from campaignstats.model import (
    CalculationResult,
    CampaignStats,
    Increment,
    PackedCampaignStats,
    StatsState,
)
from campaignstats.service import StatsService

from .helpers import serve_process, wait_for
from .test_apply_paths import (
    NOW,
    _calculation,
    _result,
    _timeline,
    batches,
    decoded,
    snapshot,
)

PACK_IDLE = 60.0

pack_steps = st.one_of(
    st.tuples(st.just("incs"), batches),
    st.tuples(st.just("incs"), batches),
    st.tuples(st.just("decs"), batches),
    st.tuples(st.just("start_journal"), st.sampled_from([None, (1, 2), (3,)])),
    st.tuples(st.just("fold"), st.none()),
    st.tuples(st.just("merge"), st.dictionaries(st.integers(1, 5), st.integers(0, 5))),
    st.tuples(st.just("stop_journal"), st.none()),
    st.tuples(st.just("tick"), st.sampled_from([1.0, 61.0, 3600.0])),
    st.tuples(st.just("pack"), st.frozensets(st.integers(1, 6))),
    st.tuples(st.just("pack"), st.frozensets(st.integers(1, 6))),
    st.tuples(st.just("sweep"), st.none()),
)


def _counts(state: StatsState) -> Any:
    """The state as test_apply_paths compares it, its campaigns read through ``maps``, and the
    timelines through ``timeline_of`` (an idle campaign's is folded into its packed form:
    ``timelines`` has no entry for it, and one put back goes after the others)."""
    timelines = {
        cid: state.timeline_of(cid) for cid in sorted({*state.campaigns, *state.timelines})
    }
    held = state.campaigns
    state.campaigns = {
        cid: CampaignStats(
            s.supporters, *(dict(m) for m in s.maps()), s.extra_supporters, s.messages
        )
        for cid, s in held.items()
    }
    try:
        counts = snapshot(state)
    finally:
        state.campaigns = held
    counts["timelines"] = [(cid, _timeline(t)) for cid, t in timelines.items() if t is not None]
    return counts


def _reads(state: StatsState) -> Any:
    """Every answer a client can get about the counts of these campaigns."""
    return {
        "stats": {cid: state.stats(cid) for cid in range(1, 7)},
        "org_stats": {org: state.org_stats(org) for org in range(1, 5)},
        "top": {by: state.top(by, 10) for by in ("supporters", "last_hour", "today")},
        "history": {
            (cid, unit): state.history(cid, unit, None, None)
            for cid in range(1, 7)
            for unit in ("minute", "hour", "day")
        },
        "recent": {
            (cid, tz): state.recent(cid, tz)
            for cid in range(1, 7)
            for tz in ("UTC", "Pacific/Kiritimati")
        },
    }


def _packed(state: StatsState) -> set[int]:
    return {cid for cid, s in state.campaigns.items() if s.packed is not None}


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    program=st.lists(pack_steps, min_size=1, max_size=16),
    as_decoded=st.booleans(),
    window=st.sampled_from([(0, 10), (4, 12), (0, 0)]),
)
def test_a_state_that_packs_answers_every_read_as_one_that_never_packs(
    program: list[tuple[str, Any]], as_decoded: bool, window: tuple[int, int]
) -> None:
    window_low, max_action_id = window
    clock = [NOW]
    packing, plain = StatsState(), StatsState()
    packing.pack_idle = PACK_IDLE
    for state in (packing, plain):
        state.clock = lambda: clock[0]
    for op, arg in program:
        if op in ("incs", "decs"):
            batch = decoded(arg) if as_decoded and arg else arg
            for state in (packing, plain):
                state.apply_many(batch, decrement=op == "decs")
        elif op == "start_journal":
            for state in (packing, plain):
                state.start_journal(arg)
        elif op == "fold":
            for state in (packing, plain):
                state.fold_journal(EarlyHorizon(_calculation(max_action_id, window_low)))
        elif op == "merge":
            result = _result(arg, max_action_id, window_low, frozenset({9}))
            if plain.journal_fits(result):
                was_packed = _packed(packing)
                assert packing.merge(result) == plain.merge(result)
                # A campaign packed before its merge is installed packed.
                assert was_packed & set(result.campaigns) <= _packed(packing)
                for state in (packing, plain):
                    state.stop_journal()
        elif op == "tick":
            clock[0] += arg
        elif op == "pack":
            for cid in arg:
                stats = packing.campaigns.get(cid)
                if stats is not None:
                    stats.pack()
        else:
            packing.pack_idle_campaigns(list(packing.campaigns), clock[0])
        packed = _packed(packing)
        assert _reads(packing) == _reads(plain), op
        assert _packed(packing) == packed, "a read unpacked a campaign"
        assert _counts(packing) == _counts(plain), op
        for cid, stats in packing.campaigns.items():
            for counts in stats.maps():
                assert all(n > 0 for n in counts.values()), (cid, counts)
        assert packing.check() is None


def test_a_packed_campaign_holds_no_dicts_and_its_first_write_unpacks_it() -> None:
    state = StatsState()
    state.clock = lambda: NOW
    state.apply_many([Increment(1, 7, "sign", "DE", True), Increment(1, 8, "share", None, False)])
    stats = state.campaigns[1]
    wire = stats.to_wire()
    assert stats.pack() is True
    assert stats.pack() is False  # packed already
    assert isinstance(stats.packed, bytes)
    assert type(stats) is PackedCampaignStats
    for name in ("area", "org"):  # the slots themselves: unset, no dict is held
        with pytest.raises(AttributeError):
            CampaignStats.__dict__[name].__get__(stats, CampaignStats)
    assert CampaignStats.__dict__["action"].__get__(stats, CampaignStats) is stats.packed
    assert stats.to_wire() == wire
    assert stats.packed is not None
    state.apply_many([Increment(1, 9, "sign", "FR", True)])
    assert stats.packed is None
    assert type(stats) is CampaignStats
    assert state.stats(1) == {
        "supporters": 2,
        "action": {"sign": 2, "share": 1},
        "area": {"DE": 1, "FR": 1},
        "org": {7: 1, 9: 1},
        "extra_supporters": 0,
        "messages": 0,
    }
    # the keys are interned again, as the hot path interns them
    assert next(iter(stats.action)) is sys.intern("sign")


def test_a_decrement_of_a_packed_campaign_takes_back_exactly_what_an_unpacked_one_would() -> None:
    packed, plain = StatsState(), StatsState()
    for state in (packed, plain):
        state.clock = lambda: NOW
        state.apply_many([Increment(1, 7, "sign", "DE", True, count=2)])
    packed.campaigns[1].pack()
    for state in (packed, plain):
        state.apply_many([Increment(1, 7, "sign", "DE", True, count=2)], decrement=True)
    assert packed.stats(1) == plain.stats(1)
    assert packed.stats(1)["action"] == {}  # no zero-valued key
    assert packed.clamped == plain.clamped


def test_reads_leave_a_packed_campaign_packed(tmp_path: Path) -> None:
    state = StatsState()
    state.clock = lambda: NOW
    state.apply_many([Increment(1, 7, "sign", "DE", True), Increment(2, 7, "share", "FR", True)])
    for stats in state.campaigns.values():
        stats.pack()
    keeper = GoalKeeper()
    keeper.set_goals(1, GoalsSpec(supporters=(1,), area={"DE": 1}), state.campaigns[1])
    assert state.stats(1)["area"] == {"DE": 1}
    assert state.org_stats(7)["campaigns"] == {1: 1, 2: 1}
    assert state.top("supporters", 5) == [[1, 1], [2, 1]]
    assert keeper.check([1, 2], state.campaigns, NOW) == []  # reached at first sight
    assert keeper.goals(1)["areas_reached"] == ["DE"]
    assert state.check() is None
    assert state.campaigns[1] == CampaignStats(1, {"sign": 1}, {"DE": 1}, {7: 1})
    assert "packed" in repr(state.campaigns[1])
    save_snapshot(tmp_path / "s.msgpack", state.campaigns)
    assert _packed(state) == {1, 2}


def test_the_sweep_packs_idle_campaigns_and_leaves_busy_ones() -> None:
    state = StatsState()
    clock = [NOW]
    state.clock = lambda: clock[0]
    state.pack_idle = 300.0
    state.apply_many([Increment(cid, 1, "sign", None, True) for cid in (1, 2, 3)])
    state.campaigns[4] = CampaignStats(1, {"sign": 1}, {}, {1: 1})  # no timeline: a loaded one
    clock[0] += 200
    state.apply_many([Increment(2, 1, "sign", None, True)])  # busy
    clock[0] += 150  # 1 and 3: idle for 350 s; 2: for 150 s
    packing = Packing(idle_after=300.0, interval=60.0)
    packing.schedule(0.0)
    packing.start_if_due(state, 59.0)
    assert packing.sweep is None  # not due yet
    packing.start_if_due(state, 60.0)
    assert packing.sweep is not None
    while not packing.step(state):
        pass
    assert _packed(state) == {1, 3, 4}
    assert packing.info()["packed"] == 3
    assert packing.info()["last_sweep"]["packed_now"] == 3
    # a write unpacks; the next sweep, before the campaign is idle again, leaves it
    state.apply_many([Increment(1, 1, "share", None, False)])
    packing.start_if_due(state, 120.0)
    while not packing.step(state):
        pass
    assert _packed(state) == {3, 4}


def test_a_sweep_with_packing_off_packs_nothing() -> None:
    state = StatsState()
    state.clock = lambda: NOW
    state.apply_many([Increment(1, 1, "sign", None, True)])
    assert state.pack_idle_campaigns([1], NOW + 10_000) == (0, 0)
    packing = Packing(idle_after=0.0)
    packing.start_if_due(state, 10_000.0)
    assert packing.sweep is None
    assert _packed(state) == set()


def test_the_actor_refuses_a_negative_pack_idle() -> None:
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(UsageError, match="pack_idle"):
            ActorConfig(pack_idle=bad)


def _merge_result(campaigns: dict[int, CampaignStats]) -> CalculationResult:
    return CalculationResult("ids", campaigns, 0)


def test_a_merge_leaves_an_idle_campaign_packed_and_a_changed_one_unpacked() -> None:
    state = StatsState()
    clock = [NOW]
    state.clock = lambda: clock[0]
    state.pack_idle = 300.0
    state.apply_many([Increment(cid, 1, "sign", "DE", True) for cid in (1, 2)])
    for stats in state.campaigns.values():
        stats.pack()
    state.start_journal()
    state.apply_many([Increment(2, 1, "share", None, False)])  # 2 changes meanwhile
    truth = {cid: CampaignStats(1, {"sign": 1}, {"DE": 1}, {1: 1}) for cid in (1, 2, 3)}
    state.merge(_merge_result(truth))
    assert state.campaigns[1].packed is not None  # idle before, idle after
    assert state.campaigns[2].packed is None  # written meanwhile
    assert state.campaigns[3].packed is not None  # new to memory, never an action: idle
    assert state.stats(1) == truth[1].to_wire()
    assert state.stats(2)["action"] == {"sign": 1, "share": 1}
    assert state.stats(3) == truth[3].to_wire()
    assert state.org_stats(1)["campaigns"] == {1: 1, 2: 1, 3: 1}


def test_a_first_merge_installs_unpacked_a_campaign_with_recent_actions() -> None:
    from campaignstats.timeline import Timeline

    state = StatsState()
    state.clock = lambda: NOW
    state.pack_idle = 300.0
    recent, old = Timeline(), Timeline()
    recent.add(NOW - 10, True, 1)
    old.add(NOW - 3600, True, 1)
    truth = {cid: CampaignStats(1, {"sign": 1}, {}, {1: 1}) for cid in (1, 2)}
    result = CalculationResult("ids", truth, 0, timelines={1: recent, 2: old})
    state.merge(result)
    assert _packed(state) == {2}


def test_the_snapshot_file_round_trips_packed_campaigns(tmp_path: Path) -> None:
    state = StatsState()
    state.clock = lambda: NOW
    state.apply_many(
        [Increment(1, 7, "sign", "DE", True, messages=2), Increment(2, 8, "share", None, False)]
    )
    state.apply_many([Increment(3, 7, "sign", None, True)])
    state.apply_many([Increment(3, 7, "sign", None, True)], decrement=True)  # empty maps
    for cid in (1, 3):
        state.campaigns[cid].pack()
    path = tmp_path / "snapshot.msgpack"
    save_snapshot(path, state.campaigns)
    loaded = load_snapshot(path)
    assert loaded is not None
    assert loaded == state.campaigns
    again = StatsState()
    again.pack_idle = 300.0
    again.replace_all(loaded)
    assert _packed(again) == {1, 2, 3}  # loaded counts are idle: installed packed
    assert {cid: again.stats(cid) for cid in (1, 2, 3)} == {
        cid: state.stats(cid) for cid in (1, 2, 3)
    }
    assert again.org_stats(7) == state.org_stats(7)
    assert again.check() is None
    off = StatsState()
    off.replace_all(loaded)
    assert _packed(off) == set()  # packing off: as before


def test_check_names_a_packed_campaign_whose_bytes_do_not_decode() -> None:
    state = StatsState()
    state.campaigns[5] = CampaignStats.from_packed(1, b"\xc1")  # never valid MessagePack
    problem = state.check()
    assert problem is not None
    assert problem.startswith("campaign 5: its packed maps do not decode")
    state.campaigns[5] = CampaignStats.from_packed(1, b"\x93\x80\x80\x81\xa1x\x01")  # org "x"
    assert state.check() == "campaign 5: org['x'] is 1"


# -- the actor ------------------------------------------------------------------------------------


async def _wait_packed(client: AsyncStatsClient, at_least: int) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        info = await client.info()
        packing = info["packing"]
        if not packing["running"] and (packing["packed"] or 0) >= at_least:
            return info
        assert time.monotonic() < deadline, packing
        await asyncio.sleep(0.1)


async def test_a_server_with_a_short_pack_idle_answers_the_same_before_and_after_packing(
    module_dsn: str, tmp_path: Path
) -> None:
    snapshot_path = tmp_path / "snapshot.msgpack"
    proc, port = await serve_process(
        "--dsn", module_dsn, "--host", "127.0.0.1", "--port", "0", "--no-http",
        "--sync-interval", "3600", "--pack-idle", "0.5", "--snapshot", str(snapshot_path),
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    ids = list(range(900_001, 900_021))
    try:
        async with AsyncStatsClient(f"tcp://127.0.0.1:{port}") as client:
            deadline = time.monotonic() + 30
            while not (await client.info())["calculations"]["loaded"]:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            for cid in ids:
                for j in range(6):
                    client.increment(cid, 1 + j % 3, ("sign", "share")[j % 2], f"A{j}", True)
            await client.flush()
            before = await client.stats_many(ids)
            in_time = await _time_reads(client, ids[:3])
            info = await _wait_packed(client, len(ids))
            assert info["packing"]["idle_after"] == 0.5
            assert info["packing"]["packed"] >= len(ids)
            assert await client.stats_many(ids) == before
            # their timelines folded into the packed form (docs/design.md, "Memory", round 4)
            assert await _time_reads(client, ids[:3]) == in_time
            assert (await client.org_stats(1))["supporters"] == sum(
                s["org"].get(1, 0) for s in before.values()
            )
            # increments into packed campaigns
            for cid in ids:
                client.increment(cid, 1, "sign", "A0", True)
            await client.flush()
            after = await client.stats_many(ids)
            in_time_after = await _time_reads(client, ids[:3])
            for cid in ids[:3]:  # the write put the timeline back, and counted in it
                days = in_time_after[("history", cid)]
                assert sum(b[1] for b in days) == sum(b[1] for b in in_time[("history", cid)]) + 1
            for cid in ids:
                assert after[cid]["supporters"] == before[cid]["supporters"] + 1
                assert after[cid]["action"]["sign"] == before[cid]["action"]["sign"] + 1
                assert after[cid]["area"]["A0"] == before[cid]["area"]["A0"] + 1
                assert after[cid]["org"][1] == before[cid]["org"][1] + 1
            await _wait_packed(client, len(ids))  # idle again, packed again
            assert await client.stats_many(ids) == after
            assert await _time_reads(client, ids[:3]) == in_time_after
    finally:
        if proc.returncode is None:
            proc.terminate()
            async with asyncio.timeout(15):
                await proc.wait()
    loaded = load_snapshot(snapshot_path)  # written at stop, packed campaigns included
    assert loaded is not None
    assert {cid: loaded[cid].to_wire() for cid in ids} == after


async def _time_reads(client: AsyncStatsClient, ids: list[int]) -> dict[Any, Any]:
    """What a client reads of these campaigns' timelines: their day buckets, their recent
    figures, and the leaders by the last hour and today."""
    reads: dict[Any, Any] = {}
    for cid in ids:
        reads["history", cid] = (await client.history(cid, "day"))["buckets"]
        reads["recent", cid] = await client.recent(cid, "UTC")
    for by in ("last_hour", "today"):
        reads["top", by] = await client.top(by, 50)
    return reads


class _EmptyDatabase:
    """The first calculation finds nothing (no transaction snapshot: nothing is forgotten);
    the later ones wait, so that what an actor answers is what it holds."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()

    async def calculate(self, scope: Any) -> CalculationResult:
        self.calls += 1
        if self.calls > 1:
            await self.release.wait()
        return CalculationResult("all" if scope == "all" else "live", {}, 0)


async def test_a_restarted_actor_keeps_its_predecessors_packed_campaigns(tmp_path: Path) -> None:
    path = tmp_path / "snapshot.msgpack"
    save_snapshot(
        path,
        {
            1: CampaignStats(2, {"sign": 2}, {"DE": 2}, {7: 2}),
            2: CampaignStats(1, {"share": 1}, {}, {8: 1}),
        },
    )
    crash = False

    def hook(message: object) -> None:
        if crash:
            raise RuntimeError("injected crash")

    source = _EmptyDatabase()
    config = ActorConfig(sync_interval=3600, snapshot_path=path, pack_idle=300, fault_hook=hook)
    service = StatsService(source, config)
    await service.start()
    try:
        await wait_for(lambda: source.calls == 1)
        before = await service.stats_many([1, 2])
        actor = service.supervisor.actor
        assert actor is not None
        assert _packed(actor.state) == {1, 2}  # a snapshot file's counts are loaded packed
        crash = True
        with pytest.raises(Exception, match="crashed"):
            await service.stats(1)
        crash = False
        assert (await service.info())["restarts"] == 1
        successor = service.supervisor.actor
        assert successor is not None
        assert successor is not actor
        assert successor.state is actor.state  # kept: check() read the packed campaigns
        assert _packed(successor.state) == {1, 2}
        assert await service.stats_many([1, 2]) == before
        service.increment(1, 7, "sign", "DE", True)
        await service.flush()
        assert (await service.stats(1))["area"] == {"DE": 3}
        assert _packed(successor.state) == {2}
    finally:
        source.release.set()
        await service.stop(timeout=5)
