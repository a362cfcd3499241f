"""init-db is idempotent and never drops anything; demo data is reproducible and fast to load."""

from __future__ import annotations

import asyncpg

from campaignstats.db.demo import fill_demo
from campaignstats.db.embedded import EmbeddedPostgres, create_database, with_database
from campaignstats.db.schema import TABLES, init_db

from .conftest import truncate_all

CATALOG = """
SELECT c.relname, c.relkind, c.oid::int,
       coalesce(pg_get_indexdef(c.oid), ''),
       (SELECT string_agg(a.attname || ':' || format_type(a.atttypid, a.atttypmod)
                          || ':' || a.attnotnull, ',' ORDER BY a.attnum)
        FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public'
ORDER BY c.relname
"""


async def test_init_db_twice_changes_nothing_the_second_time(conn: asyncpg.Connection) -> None:
    await init_db(conn)  # the fixture ran it once already
    before = await conn.fetch(CATALOG)
    constraints = await conn.fetch("SELECT conname, oid::int FROM pg_constraint ORDER BY 1")
    assert await init_db(conn) == []
    assert await conn.fetch(CATALOG) == before
    assert await conn.fetch("SELECT conname, oid::int FROM pg_constraint ORDER BY 1") == constraints
    assert {r[0] for r in before} >= set(TABLES)


async def test_init_db_keeps_existing_rows(conn: asyncpg.Connection) -> None:
    await truncate_all(conn)
    await fill_demo(conn, actions=500, seed=1, progress=False)
    counts = await conn.fetchval("SELECT count(*) FROM actions")
    await init_db(conn)
    assert await conn.fetchval("SELECT count(*) FROM actions") == counts == 500


DUMP = {
    table: f"SELECT md5(string_agg(t::text, '|' ORDER BY t.id)) FROM {table} t" for table in TABLES
}


async def dump(conn: asyncpg.Connection) -> dict[str, str]:
    return {table: await conn.fetchval(sql) for table, sql in DUMP.items()}


async def test_demo_with_the_same_seed_gives_the_same_data(
    pg_cluster: EmbeddedPostgres, conn: asyncpg.Connection
) -> None:
    admin = pg_cluster.dsn()
    await create_database(admin, "t_demo_twin", drop_existing=True)
    twin = await asyncpg.connect(with_database(admin, "t_demo_twin"))
    try:
        await init_db(twin)
        await truncate_all(conn)
        first = await fill_demo(conn, actions=3_000, seed=11, progress=False)
        second = await fill_demo(twin, actions=3_000, seed=11, progress=False)
        assert (first.campaigns, first.supporters) == (second.campaigns, second.supporters)
        assert await dump(conn) == await dump(twin)
        await truncate_all(twin)
        await fill_demo(twin, actions=3_000, seed=12, progress=False)
        assert await dump(conn) != await dump(twin)
    finally:
        await twin.close()


async def test_demo_appends_after_existing_rows_and_keeps_sequences_usable(
    conn: asyncpg.Connection,
) -> None:
    await truncate_all(conn)
    await fill_demo(conn, actions=1_000, seed=1, progress=False)
    await fill_demo(conn, actions=1_000, seed=1, progress=False)
    assert await conn.fetchval("SELECT count(*) FROM actions") == 2_000
    assert await conn.fetchval("SELECT count(DISTINCT campaign_id) FROM actions") > 3
    new_id = await conn.fetchval("INSERT INTO orgs (name) VALUES ('after demo') RETURNING id")
    assert new_id == await conn.fetchval("SELECT max(id) FROM orgs")
