"""Review of the garbage collector's policy and the merge step's rule (campaignstats.actor.gcpolicy,
StatsActor._merge_step; docs/design.md, "The garbage collector", "Merging in slices")."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from campaignstats.actor.actor import ActorConfig
from campaignstats.actor.gcpolicy import HELD_THRESHOLD
from campaignstats.service import StatsService

from .helpers import wait_for
from .test_gc_policy import GatedSource

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def thresholds() -> Iterator[tuple[int, int, int]]:
    """The process's thresholds before the test, put back after it whatever happened."""
    before = gc.get_threshold()
    yield before
    gc.set_threshold(*before)


async def _passes(service: StatsService) -> int:
    return int((await service.info())["gc"]["passes"])


async def test_two_services_of_one_process_holding_the_collector_leave_its_thresholds_as_they_were(
    module_dsn: str, thresholds: tuple[int, int, int]
) -> None:
    """The collector is the process's: one service's merge must not give back the threshold that
    the other's calculation still holds, nor the other put back the held value for good."""
    young, middle, _ = thresholds
    sources = [GatedSource(module_dsn), GatedSource(module_dsn)]
    services = [
        StatsService(source, ActorConfig(sync_interval=3600, gc_policy=True)) for source in sources
    ]
    first, second = services
    for service in services:
        await service.start()
    try:
        await wait_for(lambda: all(source.started == 1 for source in sources))
        assert gc.get_threshold() == (young, middle, HELD_THRESHOLD)
        sources[0].gate.set()
        await first.loaded()
        await wait_for(lambda: _passes_are(first, 1))
        # the second service's calculation still runs: still no automatic full pass
        assert gc.get_threshold() == (young, middle, HELD_THRESHOLD)
        sources[1].gate.set()
        await second.loaded()
        await wait_for(lambda: _passes_are(second, 1))
        assert gc.get_threshold() == thresholds
    finally:
        for source in sources:
            source.gate.set()
        for service in services:
            await service.stop(10)
    assert gc.get_threshold() == thresholds


async def _passes_are(service: StatsService, n: int) -> bool:
    return await _passes(service) == n


async def test_thresholds_the_embedding_process_sets_while_a_calculation_runs_stay_in_force(
    module_dsn: str, thresholds: tuple[int, int, int]
) -> None:
    """The policy puts back the oldest generation's threshold that it raised, not a copy of all
    three taken before: a process that tuned its collector meanwhile keeps its own setting."""
    source = GatedSource(module_dsn)
    service = StatsService(source, ActorConfig(sync_interval=3600, gc_policy=True))
    await service.start()
    try:
        await wait_for(lambda: source.started == 1)
        assert gc.get_threshold()[2] == HELD_THRESHOLD
        gc.set_threshold(5_000, 20, 30)  # the process's own choice, made now
        source.gate.set()
        await service.loaded()
        await wait_for(lambda: _passes_are(service, 1))
        assert gc.get_threshold() == (5_000, 20, 30)
    finally:
        source.gate.set()
        await service.stop(10)
    assert gc.get_threshold() == (5_000, 20, 30)
