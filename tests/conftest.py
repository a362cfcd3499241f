"""Fixtures: one embedded Postgres cluster per test session, one fresh database per test module."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from campaignstats.actor.actor import ActorConfig
from campaignstats.db.embedded import EmbeddedPostgres, create_database, with_database
from campaignstats.db.schema import init_db
from campaignstats.db.source import PostgresSource
from campaignstats.server import ServerConfig, StatsServer
from campaignstats.service import StatsService

from .helpers import Running, Start, loaded, throwaway_cluster, wait_for


@pytest.fixture(scope="session")
def pg_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    with throwaway_cluster(tmp_path_factory, "pg") as pg:
        yield pg


@pytest.fixture(scope="module")
async def module_dsn(pg_cluster: EmbeddedPostgres, request: pytest.FixtureRequest) -> str:
    """A fresh database for this test module, with the schema created."""
    name = "t_" + re.sub(r"[^a-z0-9_]", "_", request.module.__name__.rsplit(".", 1)[-1].lower())
    admin = pg_cluster.dsn()
    await create_database(admin, name, drop_existing=True)
    dsn = with_database(admin, name)
    conn = await asyncpg.connect(dsn)
    try:
        await init_db(conn)
    finally:
        await conn.close()
    return dsn


@pytest.fixture
async def conn(module_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(module_dsn)
    yield conn
    await conn.close()


async def truncate_all(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "TRUNCATE actions, supporters, action_pages, campaigns, orgs RESTART IDENTITY CASCADE"
    )


@pytest.fixture
async def start(module_dsn: str, tmp_path: Path) -> AsyncIterator[Start]:
    running: list[Running] = []

    async def make(
        config: ActorConfig | None = None, mailbox_size: int = 10_000, **server: Any
    ) -> Running:
        service = StatsService(
            PostgresSource(module_dsn),
            config or ActorConfig(sync_interval=3600, publish_interval=0.3),
            mailbox_size=mailbox_size,
        )
        await service.start()
        await wait_for(lambda: loaded(service))
        unix = tmp_path / f"s{len(running)}.sock"
        srv = StatsServer(service, ServerConfig(port=0, unix_path=unix, **server))
        await srv.start()
        r = Running(service, srv, unix)
        running.append(r)
        return r

    yield make
    for r in running:
        await r.server.close()
        await r.service.stop()


@pytest.fixture
async def server(start: Start) -> Running:
    return await start()
