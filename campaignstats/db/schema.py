"""``init-db``: create the Proca-compatible tables and indexes that are missing (schema.sql)."""

from __future__ import annotations

from importlib.resources import files
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    import asyncpg

log = structlog.get_logger(__name__)

TABLES = ("orgs", "campaigns", "action_pages", "supporters", "actions")


def schema_sql() -> str:
    return files("campaignstats.db").joinpath("schema.sql").read_text(encoding="utf-8")


async def init_db(conn: asyncpg.Connection) -> list[str]:
    """Create what is missing, in one transaction; returns the tables that were created.

    Never drops or alters an existing object, so it is safe against a live Proca database.
    """
    async with conn.transaction():
        # One init-db at a time: a second one waits, then finds everything in place.
        await conn.execute("SELECT pg_advisory_xact_lock(7400)")
        before = await existing_tables(conn)
        await conn.execute(schema_sql())
        created = [t for t in TABLES if t not in before]
    log.info("init_db.done", created=created)
    return created


async def existing_tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
        "AND tablename = ANY($1::text[])",
        list(TABLES),
    )
    return {r[0] for r in rows}


async def is_empty(conn: asyncpg.Connection) -> bool:
    """True when the schema is missing or holds no action."""
    if "actions" not in await existing_tables(conn):
        return True
    return not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM actions)")
