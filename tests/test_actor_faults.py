"""The actor survives its database: down at start, killed backends, timeouts, a restarted cluster.

These tests stop and start Postgres, so they get a cluster of their own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest

from campaignstats.actor.actor import ActorConfig
from campaignstats.db.embedded import EmbeddedPostgres, create_database, with_database
from campaignstats.db.queries import PROCA_QUERIES
from campaignstats.db.schema import init_db
from campaignstats.db.source import PostgresSource
from campaignstats.model import CampaignStats
from campaignstats.service import StatsService

from .helpers import completed, loaded, memory_of, throwaway_cluster, wait_for
from .recount import recount
from .test_actor import World

SLOW = replace(
    PROCA_QUERIES,
    max_action_id="SELECT (SELECT coalesce(max(id), 0) FROM actions) FROM pg_sleep(3)",
)
FAST_RETRIES = dict(backoff_initial=0.05, backoff_max=0.2)


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    with throwaway_cluster(tmp_path_factory, "faults") as pg:
        yield pg


@pytest.fixture
async def dsn(own_cluster: EmbeddedPostgres) -> str:
    own_cluster.start()
    admin = own_cluster.dsn()
    await create_database(admin, "faults", drop_existing=True)
    dsn = with_database(admin, "faults")
    conn = await asyncpg.connect(dsn)
    try:
        await init_db(conn)
        await World(conn).setup()
    finally:
        await conn.close()
    return dsn


@pytest.fixture
async def services() -> AsyncIterator[list[StatsService]]:
    started: list[StatsService] = []
    yield started
    for service in started:
        await service.stop()


async def sign_some(dsn: str, n: int, campaign: int = 1) -> list[tuple]:
    conn = await asyncpg.connect(dsn)
    try:
        world = World(conn)
        world.person = await conn.fetchval("SELECT count(*) FROM supporters")
        return [tuple(await world.sign(campaign)) for _ in range(n)]
    finally:
        await conn.close()


async def truth(dsn: str) -> dict[int, CampaignStats]:
    conn = await asyncpg.connect(dsn)
    try:
        return await recount(conn)
    finally:
        await conn.close()


async def test_postgres_down_at_start_serves_what_it_has_and_loads_when_it_comes_back(
    dsn: str, own_cluster: EmbeddedPostgres, services: list[StatsService]
) -> None:
    await sign_some(dsn, 4)
    own_cluster.stop()
    service = StatsService(PostgresSource(dsn, connect_timeout=1), ActorConfig(**FAST_RETRIES))
    services.append(service)
    await service.start()
    await wait_for(lambda: _failures(service, 2))
    assert (await service.stats(1))["supporters"] == 0  # zeros, served all along
    # Counted meanwhile. It has no row in the database, so the load, which sees the truth,
    # takes it back: memory must end equal to the database.
    service.increment(2, 1, "share")
    await service.flush()
    assert (await service.stats(2))["action"] == {"share": 1}
    info = await service.info()
    assert info["calculations"]["loaded"] is False
    assert "connect" in info["calculations"]["last_error"]
    own_cluster.start()
    await wait_for(lambda: loaded(service))
    assert await memory_of(service, [1, 2]) == await truth(dsn)


async def _failures(service: StatsService, n: int) -> bool:
    return int((await service.info())["calculations"]["failed"]) >= n


async def test_a_backend_killed_mid_calculation_is_retried_and_the_actor_keeps_serving(
    dsn: str, services: list[StatsService]
) -> None:
    await sign_some(dsn, 3)
    source = PostgresSource(dsn, queries=SLOW)
    service = StatsService(source, ActorConfig(**FAST_RETRIES))
    services.append(service)
    await service.start()
    admin = await asyncpg.connect(dsn)
    try:
        async with asyncio.timeout(10):
            while not await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(3)%' "
                "AND pid <> pg_backend_pid()"
            ):
                await asyncio.sleep(0.02)
        service.increment(1, 1, "share")  # the actor answers while the calculation runs
        assert (await asyncio.wait_for(service.stats(1), 0.5))["action"] == {"share": 1}
        source.queries = PROCA_QUERIES  # the retry runs at normal speed
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE query LIKE '%pg_sleep(3)%' AND pid <> pg_backend_pid()"
        )
        assert killed == 1
    finally:
        await admin.close()
    await wait_for(lambda: loaded(service))
    info = await service.info()
    assert info["calculations"]["failed"] == 1
    assert "terminat" in info["calculations"]["last_error"].lower()
    # The share had no row in the database: the journal of the killed calculation is gone
    # with it, and the retry's truth wins.
    assert await memory_of(service, [1, 2]) == await truth(dsn)


async def test_a_statement_timeout_fails_the_calculation_and_is_logged_with_its_cause(
    dsn: str, services: list[StatsService]
) -> None:
    source = PostgresSource(dsn, queries=SLOW, statement_timeout=0.2)
    service = StatsService(source, ActorConfig(**FAST_RETRIES))
    services.append(service)
    await service.start()
    await wait_for(lambda: _failures(service, 1))
    info = await service.info()
    assert "statement timeout" in info["calculations"]["last_error"]
    assert info["calculations"]["running"] in (None, "all")
    source.queries = PROCA_QUERIES
    await wait_for(lambda: loaded(service))
    assert await memory_of(service, [1, 2]) == await truth(dsn)


async def test_the_cluster_stopped_and_restarted_under_a_running_actor(
    dsn: str, own_cluster: EmbeddedPostgres, services: list[StatsService], tmp_path: Path
) -> None:
    service = StatsService(
        PostgresSource(dsn, connect_timeout=1), ActorConfig(sync_interval=0.2, **FAST_RETRIES)
    )
    services.append(service)
    await service.start()
    await wait_for(lambda: loaded(service))
    for inc in await sign_some(dsn, 5):
        service.increment(*inc)
    own_cluster.stop(mode="immediate")
    await wait_for(lambda: _failures(service, 2))
    assert (await service.stats(1))["supporters"] == 5  # memory keeps serving
    own_cluster.start()
    for inc in await sign_some(dsn, 2, campaign=2):
        service.increment(*inc)
    before = await completed(service)
    await wait_for(lambda: _at_least(service, before + 2))
    assert await memory_of(service, [1, 2]) == await truth(dsn)


async def _at_least(service: StatsService, n: int) -> bool:
    return await completed(service) >= n
