"""Fixtures: one embedded Postgres cluster per test session, one fresh database per test module."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from campaignstats.db.embedded import EmbeddedPostgres, create_database, with_database
from campaignstats.db.schema import init_db


@pytest.fixture(scope="session")
def pg_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    pg = EmbeddedPostgres(tmp_path_factory.mktemp("pg"), delete_on_close=True)
    pg.start()
    yield pg
    pg.close()


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
