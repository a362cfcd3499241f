"""The garbage collector's policy (campaignstats.actor.gcpolicy; docs/design.md, "Memory"): no
automatic full pass while a calculation runs or merges, one full pass after, nothing leaked;
off with ``serve --no-gc-policy`` and for an embedding process unless asked for.

No timing here: the stalls it removes are measured by ``bench.merge_stall``.
"""

from __future__ import annotations

import asyncio
import gc
import os
import re
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

import pytest

from campaignstats.actor.actor import ActorConfig
from campaignstats.actor.gcpolicy import HELD_THRESHOLD
from campaignstats.client import AsyncStatsClient
from campaignstats.db.calculation import _Pacer, _uncounted_ids
from campaignstats.db.source import PostgresSource
from campaignstats.errors import CalculationError
from campaignstats.model import CalculationResult, Scope
from campaignstats.service import StatsService

from .helpers import serve_process, wait_for

pytestmark = pytest.mark.timeout(90)

#: the info's ``gc`` entry of a process whose collector the policy leaves alone
LEFT_ALONE = {
    "enabled": False,
    "holding": False,
    "passes": 0,
    "collected": 0,
    "last_pass": None,
    "seconds": 0.0,
}


class GatedSource:
    """Postgres, but each calculation waits until the test opens the gate; ``fail`` makes the
    next one fail instead."""

    def __init__(self, dsn: str) -> None:
        self.inner = PostgresSource(dsn)
        self.gate = asyncio.Event()
        self.started = 0
        self.fail = False

    async def calculate(self, scope: Scope) -> CalculationResult:
        self.started += 1
        await self.gate.wait()
        self.gate.clear()
        if self.fail:
            raise CalculationError("the test's database is down")
        return await self.inner.calculate(scope)


class Node:
    """A cycle's member, watched through a weak reference."""

    def __init__(self) -> None:
        self.other: Node | None = None


def old_cycle() -> weakref.ref[Node]:
    """A reference cycle that only a full pass can free: it is reachable until it has moved to
    the oldest generation (the young ones collected with it alive), then dropped."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    gc.collect(1)  # a and b survive it: now in the oldest generation
    watch = weakref.ref(a)
    del a, b
    return watch


def full_passes_during_churn() -> int:
    """Allocate (and free) enough tracked objects to call for a full pass of the collector as
    Python decides it (ten collections of the middle generation, and survivors a quarter of what
    the last full pass left: docs/design.md, "Memory"); returns how many full passes ran."""
    passes: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2:
            passes.append(1)

    gc.callbacks.append(count)
    try:
        pile = [[i] for i in range(max(100_000, len(gc.get_objects()) // 3))]
        del pile
    finally:
        gc.callbacks.remove(count)
    return len(passes)


@pytest.fixture
def thresholds() -> Any:
    """The process's thresholds before the test, checked after it (and put back if not)."""
    before = gc.get_threshold()
    yield before
    after = gc.get_threshold()
    gc.set_threshold(*before)
    assert after == before, "the test left the collector's thresholds changed"


@pytest.fixture
async def gated(
    module_dsn: str, thresholds: tuple[int, int, int]
) -> AsyncIterator[tuple[StatsService, GatedSource]]:
    source = GatedSource(module_dsn)
    # no retry of a failed calculation within a test (it would hold the collector again)
    config = ActorConfig(sync_interval=3600, backoff_initial=600, backoff_max=600, gc_policy=True)
    service = StatsService(source, config)
    await service.start()
    try:
        yield service, source
    finally:
        source.gate.set()
        await service.stop(10)


async def gc_info(service: StatsService) -> dict[str, Any]:
    info: dict[str, Any] = (await service.info())["gc"]
    return info


async def test_no_full_pass_runs_while_a_calculation_runs_and_one_after_its_merge_frees_old_cycles(
    gated: tuple[StatsService, GatedSource], thresholds: tuple[int, int, int]
) -> None:
    service, source = gated
    await wait_for(lambda: source.started == 1)
    # The calculation runs: the oldest generation's threshold is out of reach, the young ones
    # as they were.
    young, middle, _ = thresholds
    assert gc.get_threshold() == (young, middle, HELD_THRESHOLD)
    held = await gc_info(service)
    assert held["enabled"] is True
    assert held["holding"] is True
    assert held["passes"] == 0
    watch = old_cycle()
    # Allocations that call for full passes (they run one without the policy: see the
    # embedding test below): none runs, the old cycle stays.
    assert full_passes_during_churn() == 0
    assert watch() is not None
    source.gate.set()
    await service.loaded()
    # The merge is done: one full pass, in a turn of its own, frees the cycle; the thresholds
    # are back.
    await wait_for(lambda: watch() is None)
    after = await gc_info(service)
    assert after["holding"] is False
    assert after["passes"] == 1
    assert after["collected"] >= 2
    assert gc.get_threshold() == thresholds


async def test_a_failed_calculation_releases_the_collector_too(
    gated: tuple[StatsService, GatedSource], thresholds: tuple[int, int, int]
) -> None:
    service, source = gated
    await wait_for(lambda: source.started == 1)
    assert gc.get_threshold()[2] == HELD_THRESHOLD
    watch = old_cycle()
    source.fail = True
    source.gate.set()
    await wait_for(lambda: watch() is None)
    info = await service.info()
    assert info["calculations"]["failed"] == 1
    assert info["gc"]["holding"] is False
    assert info["gc"]["passes"] == 1
    assert gc.get_threshold() == thresholds


async def test_a_service_stopped_mid_calculation_puts_the_thresholds_back(
    module_dsn: str, thresholds: tuple[int, int, int]
) -> None:
    source = GatedSource(module_dsn)
    service = StatsService(source, ActorConfig(sync_interval=3600, gc_policy=True))
    await service.start()
    try:
        await wait_for(lambda: source.started == 1)
        assert gc.get_threshold()[2] == HELD_THRESHOLD
    finally:
        await service.stop(10)
    assert gc.get_threshold() == thresholds


async def test_an_embedding_process_keeps_its_collector_as_it_is_unless_it_asks(
    module_dsn: str, thresholds: tuple[int, int, int]
) -> None:
    source = GatedSource(module_dsn)
    service = StatsService(source, ActorConfig(sync_interval=3600))
    await service.start()
    try:
        await wait_for(lambda: source.started == 1)
        assert gc.get_threshold() == thresholds
        # the allocations that run no full pass while the policy holds them run one here
        watch = old_cycle()
        assert full_passes_during_churn() >= 1
        assert watch() is None
        source.gate.set()
        await service.loaded()
        assert await gc_info(service) == LEFT_ALONE
    finally:
        await service.stop(10)


def test_a_calculation_started_before_the_due_pass_does_not_cancel_it(
    thresholds: tuple[int, int, int],
) -> None:
    """Calculations back to back (a resync right after a merge) still get a full pass each: the
    due pass runs while the next one holds, which keeps holding after it."""
    from campaignstats.actor.gcpolicy import COLLECT_DELAY, GcPolicy

    policy = GcPolicy(True)
    try:
        policy.hold()
        now = time.monotonic()
        policy.release(now)
        watch = old_cycle()
        policy.hold()  # the next calculation, before the pass
        assert policy.collect_if_due(now + COLLECT_DELAY)
        assert watch() is None
        assert policy.holding
        assert gc.get_threshold()[2] == HELD_THRESHOLD
        policy.release(now)
        # due once the first pass is nine times its length behind (PASS_SPACING)
        assert policy.due_at is not None
        assert policy.collect_if_due(policy.due_at)
        assert not policy.holding
        assert policy.passes == 2
        assert gc.get_threshold() == thresholds
    finally:
        policy.close()


# -- a real server process ------------------------------------------------------------------------


async def _serve(module_dsn: str, *extra: str) -> tuple[asyncio.subprocess.Process, int]:
    return await serve_process(
        "--dsn", module_dsn, "--host", "127.0.0.1", "--port", "0", "--no-http", *extra,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        async with asyncio.timeout(15):
            await proc.wait()


async def _calculations(port: int, calculations: int) -> dict[str, Any]:
    """The server's info once it has completed ``calculations`` (asking for them one after the
    other) and its collector has settled (the pass after the last merge has run)."""
    async with AsyncStatsClient(f"tcp://127.0.0.1:{port}") as client:
        deadline = time.monotonic() + 30
        while True:
            info = await client.info()
            done, running = info["calculations"]["completed"], info["calculations"]["running"]
            policy = info["gc"]
            settled = not policy["enabled"] or (policy["passes"] >= done and not policy["holding"])
            if running is None and settled:
                if done >= calculations:
                    return info
                await client.resync("all")
            assert time.monotonic() < deadline, info
            await asyncio.sleep(0.05)


async def test_serve_holds_full_passes_during_calculations_and_runs_one_after_each_merge(
    module_dsn: str,
) -> None:
    proc, port = await _serve(module_dsn)
    try:
        info = await _calculations(port, 3)
        policy = info["gc"]
        assert policy["enabled"] is True
        assert policy["holding"] is False
        assert policy["passes"] == info["calculations"]["completed"] >= 3
    finally:
        await _stop(proc)
    assert proc.returncode == 0


async def test_serve_with_no_gc_policy_leaves_the_collector_alone(module_dsn: str) -> None:
    proc, port = await _serve(module_dsn, "--no-gc-policy")
    try:
        info = await _calculations(port, 2)
        assert info["gc"] == LEFT_ALONE
    finally:
        await _stop(proc)
    assert proc.returncode == 0


# -- the calculation's uncounted ids, a part at a time --------------------------------------------


@pytest.mark.parametrize(
    "runs",
    [
        [],
        [(5, 5)],
        [(1, 100_000)],
        [(i, i) for i in range(0, 40_000, 2)],
        [(10, 12), (20, 4_019), (4_021, 4_021), (9_000, 13_001)],
    ],
    ids=["none", "one id", "one long run", "many single ids", "mixed"],
)
async def test_the_uncounted_ids_built_in_parts_are_every_id_of_every_run(
    runs: list[tuple[int, int]],
) -> None:
    expected = frozenset(i for first, last in runs for i in range(first, last + 1))
    assert await _uncounted_ids(runs, _Pacer()) == expected


# -- the other interpreters on the machine ------------------------------------------------------

_ON_ANOTHER_PYTHON = """
import gc, importlib.util, sys, time, weakref
spec = importlib.util.spec_from_file_location("gcpolicy", sys.argv[1])
policy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(policy)

class Node:
    pass

def old_cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    gc.collect(1)
    watch = weakref.ref(a)
    del a, b
    return watch

def full_passes_during_churn():
    passes = []
    def count(phase, info):
        if phase == "start" and info["generation"] == 2:
            passes.append(1)
    gc.callbacks.append(count)
    pile = [[i] for i in range(max(200_000, len(gc.get_objects()) // 3))]
    del pile
    gc.callbacks.remove(count)
    return len(passes)

state = [{"k": [i]} for i in range(100_000)]  # long-lived objects, as a service's
before = gc.get_threshold()
p = policy.GcPolicy(True)
p.hold()
watch = old_cycle()
held = full_passes_during_churn()
alive = watch() is not None
p.release(time.monotonic())
time.sleep(policy.COLLECT_DELAY)
ran = p.collect_if_due(time.monotonic())
print(held, alive, ran, watch() is None, gc.get_threshold() == before)
"""


def _other_pythons() -> list[str]:
    root = "/root/.pyenv/versions"
    if not os.path.isdir(root):
        return []
    found = []
    for name in sorted(os.listdir(root)):
        python = os.path.join(root, name, "bin", "python")
        if re.fullmatch(r"3\.1[2-9]\.\d+", name) and os.path.exists(python):
            found.append(python)
    return found


@pytest.mark.skipif(not _other_pythons(), reason="no Python 3.12+ interpreter on this machine")
@pytest.mark.parametrize("python", _other_pythons())
async def test_the_policy_holds_full_passes_and_frees_old_cycles_on_later_pythons_too(
    python: str, tmp_path: Any
) -> None:
    """3.12 and 3.13 decide full passes as 3.11 does (the oldest generation's threshold and the
    survivors' quarter); the policy freezes nothing, so no version keeps a cycle past its pass."""
    import structlog

    import campaignstats.actor.gcpolicy as module

    script = tmp_path / "check.py"
    script.write_text(_ON_ANOTHER_PYTHON)
    # structlog is pure Python: the other interpreter imports it from this environment
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(structlog.__file__))}
    proc = await asyncio.create_subprocess_exec(
        python, str(script), module.__file__,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-2000:]
    held, alive, ran, freed, restored = out.decode().split()[-5:]
    assert (held, alive) == ("0", "True"), "a full pass ran while held"
    assert (ran, freed, restored) == ("True", "True", "True")
