"""Review of the "read all" path (``READ_ALL_SHARE`` in campaignstats/db/calculation.py): a
list of campaigns is read as ``all`` is only where that is worth it, that is where the listed
campaigns hold most of the actions, not merely where they are most of the campaigns."""

from __future__ import annotations

import math

import asyncpg

from campaignstats.db.calculation import calculate

from .conftest import truncate_all
from .recount import recount


async def _fill(conn: asyncpg.Connection, big_live: bool) -> None:
    """Campaign 1 holds 20,000 actions (live when ``big_live``); 2-13 are live with 20 each,
    14-16 closed with 20 each: the live campaigns are 12 or 13 of 16 (75% or more)."""
    await truncate_all(conn)
    await conn.execute("INSERT INTO orgs (id, name) VALUES (1, 'o')")
    await conn.execute(
        "INSERT INTO campaigns (id, name, status) SELECT i, 'c' || i, "
        "CASE WHEN i BETWEEN 2 AND 13 OR (i = 1 AND $1) THEN 1 ELSE 0 END "
        "FROM generate_series(1, 16) i",
        big_live,
    )
    await conn.execute(
        "INSERT INTO action_pages (id, name, campaign_id, org_id) "
        "SELECT i, 'p' || i, i, 1 FROM generate_series(1, 16) i"
    )
    await conn.execute(
        "INSERT INTO supporters (id, campaign_id, action_page_id, fingerprint, area, "
        "processing_status, dupe_rank) SELECT i, c, c, int8send(i), 'DE', 3, 0 FROM "
        "(SELECT i, CASE WHEN i <= 20000 THEN 1 ELSE 2 + i % 15 END AS c "
        "FROM generate_series(1, 20300) i) x"
    )
    await conn.execute(
        "INSERT INTO actions (supporter_id, action_type, campaign_id, action_page_id, "
        "processing_status, inserted_at) SELECT id, 'register', campaign_id, campaign_id, 3, "
        "now() - (id % 3000) * interval '1 hour' FROM supporters"
    )
    await conn.execute("ANALYZE")


async def test_a_live_calculation_of_many_small_campaigns_does_not_read_a_big_closed_one(
    module_dsn: str,
) -> None:
    """12 of 16 campaigns are live but hold 240 of 20,300 actions: reading every campaign
    would read (and drop) the closed campaign's 20,000 actions at every sync, 2.5-4x the time
    of the listed read measured with 400k actions in the same shape (0.5-0.9 s listed, 1.4-3.0
    s read whole). The default must read what the list gives, and count the same."""
    conn = await asyncpg.connect(module_dsn)
    try:
        await _fill(conn, big_live=False)
        listed = await calculate(conn, "live", read_all_share=math.inf)
        whole = await calculate(conn, "live", read_all_share=0.0)
        assert whole.rows > listed.rows  # reading all does read the closed campaign's rows
        default = await calculate(conn, "live")
        assert default.rows == listed.rows
        assert default.campaigns == listed.campaigns == await recount(conn, range(2, 14))
    finally:
        await conn.close()


async def test_a_live_calculation_holding_most_actions_is_still_read_whole(module_dsn: str) -> None:
    conn = await asyncpg.connect(module_dsn)
    try:
        await _fill(conn, big_live=True)
        whole = await calculate(conn, "live", read_all_share=0.0)
        default = await calculate(conn, "live")
        assert default.rows == whole.rows
        assert default.campaigns == await recount(conn, range(1, 14))
    finally:
        await conn.close()
