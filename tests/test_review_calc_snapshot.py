"""Adversarial review (rcalc4): a calculation split over two connections reads one snapshot. A
writer commits new people, actions and rejections the whole time; undoing afterwards exactly
the transactions the result's snapshot does not see gives a database whose recount equals the
result (each committed change is in every statement of both connections, or in none)."""

from __future__ import annotations

import asyncio
import random
import time

import asyncpg
import pytest

from campaignstats.db.calculation import calculate

from .helpers import wait_for
from .recount import recount, recount_timelines
from .test_pages import demo_database
from .test_time_calculation import views


async def _write(dsn: str, stop: asyncio.Event, done: list[tuple[int, list[str]]]) -> None:
    """Transactions until ``stop``: each inserts a person and an action, or rejects a counted
    action; ``done`` gets each one's txid and the statements that undo it."""
    rnd = random.Random(7)
    conn = await asyncpg.connect(dsn)
    try:
        pages = await conn.fetch("SELECT id, campaign_id FROM action_pages")
        n = 0
        while not stop.is_set():
            n += 1
            async with conn.transaction():
                txid = await conn.fetchval("SELECT txid_current()")
                page, cid = rnd.choice(pages)
                if n % 3:
                    sid = await conn.fetchval(
                        "INSERT INTO supporters (campaign_id, action_page_id, fingerprint, area,"
                        " processing_status, dupe_rank) VALUES ($1, $2, $3, 'PL', 3, 0)"
                        " RETURNING id",
                        cid,
                        page,
                        rnd.randbytes(16),
                    )
                    aid = await conn.fetchval(
                        "INSERT INTO actions (supporter_id, action_type, campaign_id,"
                        " action_page_id, processing_status) VALUES ($1, 'register', $2, $3, 3)"
                        " RETURNING id",
                        sid,
                        cid,
                        page,
                    )
                    undo = [
                        f"DELETE FROM actions WHERE id = {aid}",
                        f"DELETE FROM supporters WHERE id = {sid}",
                    ]
                else:
                    aid = await conn.fetchval(
                        "UPDATE actions SET processing_status = 2 WHERE id = ("
                        " SELECT id FROM actions WHERE processing_status = 3"
                        " ORDER BY id LIMIT 1 OFFSET $1) RETURNING id",
                        rnd.randrange(1000),
                    )
                    undo = [f"UPDATE actions SET processing_status = 3 WHERE id = {aid}"]
            done.append((int(txid), undo))
            await asyncio.sleep(0.002)
    finally:
        await conn.close()


@pytest.mark.parametrize("chunk_rows", [3, 5_000])
async def test_changes_committed_during_a_split_calculation_are_in_all_its_statements_or_none(
    conn: asyncpg.Connection, module_dsn: str, chunk_rows: int
) -> None:
    await demo_database(conn)
    helper = await asyncpg.connect(module_dsn)
    stop = asyncio.Event()
    done: list[tuple[int, list[str]]] = []
    writer = asyncio.ensure_future(_write(module_dsn, stop, done))
    try:
        # commits before the snapshot, and after it (not a fixed sleep: a loaded machine's
        # writer may not have committed one in it)
        await wait_for(lambda: len(done) >= 3)
        result = await calculate(conn, "all", helper_conn=helper, chunk_rows=chunk_rows)
        after = len(done)
        await wait_for(lambda: len(done) >= after + 3)
    finally:
        stop.set()
        await writer
        await helper.close()
    assert result.snapshot is not None
    unseen = [undo for txid, undo in done if not result.snapshot.sees(txid)]
    seen = len(done) - len(unseen)
    # the writer committed both before the snapshot and during or after it
    assert unseen
    assert seen
    for undo in reversed(unseen):
        for statement in undo:
            await conn.execute(statement)
    now = time.time()
    assert result.campaigns == await recount(conn)
    assert views(result.timelines, now) == views(await recount_timelines(conn), now)
