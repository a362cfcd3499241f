"""The follower's fixes after the review, beyond tests/test_review_follow.py: the slot's lock as
an operator meets it (the message, the command line), page changes recalculated, and what the
plan sends (commit order, commit time, no action id). Real Postgres clusters with
wal_level=logical, as in tests/test_follower.py."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from campaignstats.actor.actor import ActorConfig
from campaignstats.db.embedded import EmbeddedPostgres, create_database, with_database
from campaignstats.db.schema import init_db
from campaignstats.db.source import PostgresSource
from campaignstats.follower import Follower, SlotBusy, drop_slot, list_slots
from campaignstats.follower.changes import ActionRow, RowChange, Transaction, plan
from campaignstats.service import StatsService

from .helpers import loaded, memory_of, throwaway_cluster, wait_for
from .recount import recount

CAMPAIGNS = (1, 2)


@pytest.fixture(scope="module")
def logical_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    with throwaway_cluster(tmp_path_factory, "follower_ops", logical=True) as pg:
        yield pg


@pytest.fixture
async def dsn(logical_cluster: EmbeddedPostgres) -> AsyncIterator[str]:
    admin = logical_cluster.dsn()
    await create_database(admin, "ops", drop_existing=True)
    dsn = with_database(admin, "ops")
    conn = await asyncpg.connect(dsn)
    try:
        await init_db(conn)
        await conn.execute(
            "INSERT INTO orgs (id, name) VALUES (1, 'a'), (2, 'b');"
            "INSERT INTO campaigns (id, name, status) VALUES (1, 'c1', 1), (2, 'c2', 1);"
            "INSERT INTO action_pages (id, name, campaign_id, org_id) VALUES"
            " (1, 'p1', 1, 1), (2, 'p2', 1, 2), (3, 'p3', 2, 1);"
        )
    finally:
        await conn.close()
    yield dsn
    for slot in await list_slots(admin):
        with contextlib.suppress(Exception):
            await drop_slot(admin, slot["slot_name"], wait=2)


@contextlib.asynccontextmanager
async def following(dsn: str, slot: str) -> AsyncIterator[tuple[StatsService, Follower]]:
    follower = Follower(dsn, slot=slot, configure=True, poll_interval=0.01)
    await follower.prepare()
    service = StatsService(PostgresSource(dsn), ActorConfig(sync_interval=3600))
    await service.start()
    task = asyncio.create_task(follower.run(service, full_calculation_pending=True))
    try:
        await wait_for(lambda: loaded(service))
        yield service, follower
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await service.stop()


async def _sign(conn: asyncpg.Connection, fp: bytes, page: int = 1) -> None:
    async with conn.transaction():
        sid = await conn.fetchval(
            "INSERT INTO supporters (campaign_id, action_page_id, fingerprint, area, "
            "processing_status, dupe_rank) VALUES (1, $1, $2, 'DE', 3, 0) RETURNING id",
            page,
            fp,
        )
        await conn.execute(
            "INSERT INTO actions (supporter_id, action_type, campaign_id, action_page_id, "
            "processing_status) VALUES ($1, 'register', 1, $2, 3)",
            sid,
            page,
        )


async def _cli(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "campaignstats.cli", "--log-format", "json", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_a_second_server_on_a_followed_slot_is_refused_with_the_holders_pid(
    dsn: str,
) -> None:
    async with following(dsn, "o_shared") as (_, first):
        assert first.status()["running"]
        conn = await asyncpg.connect(dsn)
        try:
            holders = {
                r[0]
                for r in await conn.fetch(
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
                )
            }
        finally:
            await conn.close()
        assert len(holders) == 1
        with pytest.raises(SlotBusy, match=rf"followed by another server \(pid {holders.pop()}"):
            await Follower(dsn, slot="o_shared", configure=True).prepare()
    # once the first has stopped, the slot is free again
    await Follower(dsn, slot="o_shared", configure=True).prepare()


async def test_slots_drop_on_the_command_line_refuses_a_running_servers_slot(dsn: str) -> None:
    async with following(dsn, "o_running"):
        code, _, err = await _cli("slots", "--dsn", dsn, "--drop", "o_running")
        assert code == 1
        assert "followed by a running server" in err
        assert "stop that server first" in err
        assert "o_running" in {s["slot_name"] for s in await list_slots(dsn)}
    code, out, _ = await _cli("slots", "--dsn", dsn, "--drop", "o_running")  # stopped: dropped
    assert (code, out.strip()) == (0, "dropped slot o_running")


async def test_slots_drop_from_another_database_refuses_a_running_servers_slot_too(
    dsn: str, logical_cluster: EmbeddedPostgres
) -> None:
    admin = logical_cluster.dsn()  # the cluster's postgres database, not the slot's
    async with following(dsn, "o_elsewhere"):
        with pytest.raises(SlotBusy, match="followed by a running server"):
            await drop_slot(admin, "o_elsewhere", wait=1)
        assert "o_elsewhere" in {s["slot_name"] for s in await list_slots(admin)}
    assert await drop_slot(admin, "o_elsewhere", wait=5)


async def test_a_pages_extra_supporters_and_org_changes_are_counted_by_a_calculation(
    dsn: str,
) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await _sign(conn, b"one", page=1)
        async with following(dsn, "o_pages") as (service, _):
            await conn.execute("UPDATE action_pages SET extra_supporters = 12 WHERE id = 2")
            truth = await recount(conn, CAMPAIGNS)
            assert truth[1].extra_supporters == 12
            await _equal_soon(service, truth)
            await conn.execute("UPDATE action_pages SET org_id = 2 WHERE id = 1")
            truth = await recount(conn, CAMPAIGNS)
            assert list(truth[1].org) == [2]  # page 1's supporter, now through org 2
            await _equal_soon(service, truth)
    finally:
        await conn.close()


async def _equal_soon(service: StatsService, truth: object) -> None:
    with contextlib.suppress(TimeoutError):
        await wait_for(lambda: _same(service, truth), timeout=5)
    assert await memory_of(service, list(CAMPAIGNS)) == truth


async def _same(service: StatsService, truth: object) -> bool:
    return await memory_of(service, list(CAMPAIGNS)) == truth


def test_the_plan_sends_transactions_in_commit_order_at_their_commit_time_without_action_ids() -> (
    None
):
    counted = ActionRow(5, None, "register", 1, 1, 3, False)
    rejected = ActionRow(5, None, "register", 1, 1, 2, False)
    txns = [
        Transaction(10, 0, 0, 1000.0, [RowChange("actions", counted, rejected)]),
        Transaction(11, 0, 0, 1001.5, [RowChange("actions", rejected, counted)]),
    ]
    out = plan(txns, [], [counted], {1: 7}.get, lambda xid: xid + 2**32)
    sent = [
        (dec, [(i.txid, i.at, i.action_id, i.org_id) for i in items]) for dec, items in out.steps
    ]
    assert sent == [
        (True, [(2**32 + 10, 1000.0, None, 7)]),  # the rejection first, as committed
        (False, [(2**32 + 11, 1001.5, None, 7)]),
    ]
