"""One server per slot: a session advisory lock named after the slot (docs/follow.md, "One server
per slot").

A polled slot is active in Postgres only during a peek, so Postgres does not stop two servers
from following the same slot, and each would advance it past changes the other has not read.
The follower holds this lock on a connection of its own for as long as it runs; a server that
cannot take it refuses to follow, and ``campaignstats slots --drop`` refuses to drop the slot of
a server that holds it. The key is (``LOCK_CLASS``, ``hashtext(slot)``): two slot names with
the same hash share a lock, which makes one of their servers refuse, never lose changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncpg

#: the first half of the key: "csts" (campaignstats slots), so as not to meet other locks
LOCK_CLASS = 0x63737473

_TRY = "SELECT pg_try_advisory_lock($1::int, hashtext($2))"
_UNLOCK = "SELECT pg_advisory_unlock($1::int, hashtext($2))"
_HOLDER = """
SELECT l.pid, coalesce(host(a.client_addr), 'local'), a.application_name
FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
  AND l.database = (SELECT oid FROM pg_database WHERE datname = coalesce($3, current_database()))
  AND l.classid = $1::int::oid AND l.objid = hashtext($2)::oid
LIMIT 1
"""


async def try_lock(conn: asyncpg.Connection, slot: str) -> bool:
    """Take the slot's lock for this session; False when another session holds it."""
    return bool(await conn.fetchval(_TRY, LOCK_CLASS, slot))


async def unlock(conn: asyncpg.Connection, slot: str) -> None:
    await conn.fetchval(_UNLOCK, LOCK_CLASS, slot)


async def holder(conn: asyncpg.Connection, slot: str, database: str | None = None) -> str | None:
    """Who holds the slot's lock in ``database`` (default: this one), for a message:
    ``pid 123 (10.0.0.5, campaignstats)``; None when nobody does."""
    row = await conn.fetchrow(_HOLDER, LOCK_CLASS, slot, database)
    if row is None:
        return None
    pid, host, app = row
    return f"pid {pid} ({host}{', ' + app if app else ''})"
