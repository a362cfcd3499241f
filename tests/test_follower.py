"""Following the database, for real: a cluster of its own with wal_level=logical.

The writer changes only Postgres (the way Proca does: inserted new and accepted later, rejected,
deleted, inserted accepted at once, a second action of the same person, a supporter rejected);
the counts must equal a brute-force recount within a second of each commit, with calculations
merging all along, and never go backwards except by a real removal. The parser is tested on
bytes captured from the same real server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from campaignstats.actor.actor import ActorConfig
from campaignstats.db.embedded import EmbeddedPostgres, create_database, with_database
from campaignstats.db.schema import init_db
from campaignstats.db.source import PostgresSource
from campaignstats.follower import Follower, FollowError, drop_slot, list_slots
from campaignstats.follower.changes import (
    ActionRow,
    Assembler,
    IdentityError,
    Plan,
    RowChange,
    SupporterRow,
    Transaction,
    full_xid,
    plan,
)
from campaignstats.follower.pgoutput import (
    Begin,
    Commit,
    DecodeError,
    Decoder,
    Delete,
    Insert,
    Relation,
    Truncate,
    Update,
)
from campaignstats.model import CampaignStats
from campaignstats.service import StatsService

from .helpers import loaded, memory_of, throwaway_cluster, wait_for
from .recount import recount

CAMPAIGNS = (1, 2)


@pytest.fixture(scope="module")
def logical_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    with throwaway_cluster(tmp_path_factory, "follow", logical=True) as pg:
        yield pg


@pytest.fixture
async def dsn(logical_cluster: EmbeddedPostgres) -> AsyncIterator[str]:
    admin = logical_cluster.dsn()
    await create_database(admin, "follow", drop_existing=True)
    dsn = with_database(admin, "follow")
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
        await drop_slot(admin, slot["slot_name"])


async def _capture(dsn: str) -> list[bytes]:
    """Changes of every kind, made on the real server, and the pgoutput bytes it sent."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("ALTER TABLE actions REPLICA IDENTITY FULL")
        await conn.execute("CREATE PUBLICATION cap FOR TABLE actions, supporters")
        await conn.execute("SELECT pg_create_logical_replication_slot('cap', 'pgoutput')")
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO supporters (id, campaign_id, action_page_id, fingerprint, area, "
                "processing_status, dupe_rank) VALUES (100, 1, 1, '\\x00ff10', NULL, 3, 0)"
            )
            await conn.execute(
                "INSERT INTO actions (id, supporter_id, action_type, campaign_id, "
                "action_page_id, processing_status) VALUES (100, 100, 'régister', 1, 1, 0)"
            )
            xid = await conn.fetchval("SELECT pg_current_xact_id()::text::bigint")
        await conn.execute("UPDATE actions SET processing_status = 3 WHERE id = 100")
        await conn.execute("UPDATE supporters SET area = 'DE' WHERE id = 100")  # default identity
        await conn.execute("DELETE FROM actions WHERE id = 100")
        await conn.execute("TRUNCATE actions CASCADE")
        rows = await conn.fetch(
            "SELECT data FROM pg_logical_slot_peek_binary_changes('cap', NULL, NULL, "
            "'proto_version', '1', 'publication_names', 'cap')"
        )
        await conn.execute("SELECT pg_drop_replication_slot('cap')")
        await conn.execute("DROP PUBLICATION cap")
        await conn.execute("TRUNCATE supporters CASCADE")
        return [xid.to_bytes(8, "big"), *(bytes(r[0]) for r in rows)]
    finally:
        await conn.close()


async def test_pgoutput_decodes_bytes_captured_from_a_real_server(dsn: str) -> None:
    captured = await _capture(dsn)
    xid = int.from_bytes(captured[0], "big")
    decoder = Decoder()
    msgs = [decoder.decode(data) for data in captured[1:]]
    kinds = [type(m).__name__ for m in msgs]
    assert kinds[:5] == ["Begin", "Relation", "Insert", "Relation", "Insert"]
    begin = msgs[0]
    assert isinstance(begin, Begin)
    # 32 bits on the wire; pg_current_xact_id() is the xid8 (epoch << 32 | xid)
    assert begin.xid == xid & 0xFFFF_FFFF
    assert full_xid(begin.xid, xid + 5) == xid
    sup = msgs[2]
    assert isinstance(sup, Insert)
    assert sup.relation.name == "supporters"
    assert sup.new["fingerprint"] == "\\x00ff10"
    assert sup.new["area"] is None
    act = msgs[4]
    assert isinstance(act, Insert)
    assert act.new["action_type"] == "régister"
    assert act.new["processing_status"] == "0"
    commit = msgs[5]
    assert isinstance(commit, Commit)
    assert commit.commit_lsn == begin.final_lsn
    assert commit.end_lsn > commit.commit_lsn
    updates = [m for m in msgs if isinstance(m, Update)]
    assert updates[0].old_kind == "O"  # REPLICA IDENTITY FULL: the whole old row
    assert updates[0].old is not None
    assert (updates[0].old["processing_status"], updates[0].new["processing_status"]) == (
        "0",
        "3",
    )
    assert updates[1].relation.name == "supporters"
    assert updates[1].old is None  # default identity, key unchanged: no old row
    deletes = [m for m in msgs if isinstance(m, Delete)]
    assert deletes[0].old_kind == "O"
    assert deletes[0].old["id"] == "100"
    truncates = [m for m in msgs if isinstance(m, Truncate)]
    assert "actions" in [r.name for r in truncates[0].relations]
    assert truncates[0].cascade
    assert all(
        isinstance(m, Relation | Begin | Commit | Insert | Update | Delete | Truncate) for m in msgs
    )
    # Transactions: the Update of supporters without its old row is refused with the fix.
    assembler = Assembler()
    first_update = msgs.index(updates[1])
    for m in msgs[:first_update]:
        assembler.feed(m)
    with pytest.raises(ValueError, match="REPLICA IDENTITY FULL"):
        assembler.feed(updates[1])
    # Damaged bytes are refused, never half-read.
    with pytest.raises(DecodeError):
        decoder.decode(captured[3][:-3])
    with pytest.raises(DecodeError):
        Decoder().decode(captured[3])  # an Insert before its Relation
    with pytest.raises(DecodeError):
        decoder.decode(b"Z")


def test_full_xid_crosses_epochs() -> None:
    epoch = 7 << 32
    assert full_xid(10, epoch + 20) == epoch + 10
    assert full_xid(0xFFFF_FFF0, epoch + 5) == epoch - 16  # from the previous epoch
    assert full_xid(5, epoch - 16) == epoch + 5  # just after the reference
    assert full_xid(123, 1000) == 123


class Writer:
    """Changes Postgres only, each change its own transaction, the way Proca does."""

    def __init__(self, conn: asyncpg.Connection, rng: random.Random) -> None:
        self.conn = conn
        self.rng = rng
        self.people: list[tuple[int, int]] = []  # (supporter id, campaign)
        self.pending: list[int] = []
        self.counted: list[int] = []
        self.removals = 0  # committed or about to be: a sample may see it at once
        self.person = 0

    async def sign(self, status: int) -> None:
        self.person += 1
        cid = self.rng.choice(CAMPAIGNS)
        page = self.rng.choice((1, 2)) if cid == 1 else 3
        fp = (self.person % 40).to_bytes(4, "big")  # some people sign twice: dupes
        async with self.conn.transaction():
            rank = await self.conn.fetchval(
                "SELECT count(*) FROM supporters WHERE campaign_id = $1 AND fingerprint = $2",
                cid,
                fp,
            )
            sid = await self.conn.fetchval(
                "INSERT INTO supporters (campaign_id, action_page_id, fingerprint, area, "
                "processing_status, dupe_rank) VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
                cid,
                page,
                fp,
                self.rng.choice(["DE", "FR", None]),
                3 if self.rng.random() < 0.85 else 1,  # some confirm their email later
                rank,
            )
            aid = await self.conn.fetchval(
                "INSERT INTO actions (supporter_id, action_type, campaign_id, action_page_id, "
                "processing_status) VALUES ($1, 'register', $2, $3, $4) RETURNING id",
                sid,
                cid,
                page,
                status,
            )
            if self.rng.random() < 0.3:  # mail to targets, sent with the action
                await self.conn.execute(
                    "INSERT INTO messages (action_id) SELECT $1 FROM generate_series(1, $2)",
                    aid,
                    self.rng.randint(1, 3),
                )
        self.people.append((sid, cid))
        (self.counted if status == 3 else self.pending).append(aid)

    async def share(self) -> None:
        """A second action of someone already there: never a new supporter."""
        sid, cid = self.rng.choice(self.people)
        page = await self.conn.fetchval("SELECT action_page_id FROM supporters WHERE id = $1", sid)
        aid = await self.conn.fetchval(
            "INSERT INTO actions (supporter_id, action_type, campaign_id, action_page_id, "
            "processing_status) VALUES ($1, 'share', $2, $3, 3) RETURNING id",
            sid,
            cid,
            page,
        )
        self.counted.append(aid)

    async def accept(self) -> None:
        aid = self.pending.pop(self.rng.randrange(len(self.pending)))
        await self.conn.execute("UPDATE actions SET processing_status = 3 WHERE id = $1", aid)
        self.counted.append(aid)

    async def deliver(self) -> None:
        aid = self.rng.choice(self.counted)
        await self.conn.execute("UPDATE actions SET processing_status = 4 WHERE id = $1", aid)

    async def reject(self) -> None:
        aid = self.counted.pop(self.rng.randrange(len(self.counted)))
        self.removals += 1
        await self.conn.execute("UPDATE actions SET processing_status = 2 WHERE id = $1", aid)

    async def delete(self) -> None:
        aid = self.counted.pop(self.rng.randrange(len(self.counted)))
        self.removals += 1
        await self.conn.execute("DELETE FROM actions WHERE id = $1", aid)

    async def reject_supporter(self) -> None:
        sid, _ = self.rng.choice(self.people)
        self.removals += 1
        await self.conn.execute("UPDATE supporters SET processing_status = 2 WHERE id = $1", sid)

    async def mail(self) -> None:
        """Messages sent later, for an action counted or not."""
        aid = self.rng.choice(self.pending + self.counted)
        await self.conn.execute("INSERT INTO messages (action_id) VALUES ($1), ($1)", aid)

    async def unmail(self) -> None:
        self.removals += 1
        await self.conn.execute(
            "DELETE FROM messages WHERE id = (SELECT min(id) FROM messages WHERE id % 3 = $1)",
            self.rng.randrange(3),
        )

    async def accept_supporter(self) -> None:
        sid, _ = self.rng.choice(self.people)
        await self.conn.execute("UPDATE supporters SET processing_status = 3 WHERE id = $1", sid)

    async def delete_supporter(self) -> None:
        """The person and, by the foreign key's cascade, all their actions."""
        i = self.rng.randrange(len(self.people))
        sid, _ = self.people.pop(i)
        self.removals += 1
        gone = await self.conn.fetch(
            "DELETE FROM supporters WHERE id = $1 RETURNING (SELECT array_agg(id) FROM actions "
            "WHERE supporter_id = $1)",
            sid,
        )
        for aid in gone[0][0] or []:
            for pool in (self.pending, self.counted):
                if aid in pool:
                    pool.remove(aid)

    async def step(self) -> None:
        roll = self.rng.random()
        if roll < 0.25 or not self.people:
            await self.sign(0)
        elif roll < 0.45:
            await self.sign(3)
        elif roll < 0.6 and self.pending:
            await self.accept()
        elif roll < 0.7:
            await self.share()
        elif roll < 0.76 and self.counted:
            await self.deliver()
        elif roll < 0.86 and self.counted:
            await self.reject()
        elif roll < 0.92 and self.counted:
            await self.delete()
        elif roll < 0.95:
            await self.accept_supporter()
        elif roll < 0.97 and len(self.people) > 5:
            await self.delete_supporter()
        elif roll < 0.98:
            await self.reject_supporter()
        elif roll < 0.99 and (self.pending or self.counted):
            await self.mail()
        else:
            await self.unmail()


async def _equal_soon(service: StatsService, conn: asyncpg.Connection) -> None:
    """Memory comes to equal the database after the last commit, with no resync asked (how soon,
    a second at p99, is measured by bench.follow: a bound here would flake on a loaded machine)."""
    truth = await recount(conn, CAMPAIGNS)
    try:
        await wait_for(lambda: _same(service, truth), timeout=10.0)
    except TimeoutError:
        assert await memory_of(service, list(CAMPAIGNS)) == truth


async def _same(service: StatsService, truth: object) -> bool:
    return await memory_of(service, list(CAMPAIGNS)) == truth


@contextlib.asynccontextmanager
async def following(
    dsn: str, sync_interval: float, slot: str = "t_follow"
) -> AsyncIterator[tuple[StatsService, Follower, asyncio.Task[None]]]:
    follower = Follower(dsn, slot=slot, configure=True, poll_interval=0.01)
    await follower.prepare()  # the slot first...
    service = StatsService(PostgresSource(dsn), ActorConfig(sync_interval=sync_interval))
    await service.start()  # ...then the calculation's snapshot
    task = asyncio.create_task(follower.run(service, full_calculation_pending=True))
    try:
        await wait_for(lambda: loaded(service))
        yield service, follower, task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, IdentityError):  # the last test's
            await task
        await service.stop()


@pytest.mark.parametrize("sync_interval", [3600.0, 0.2], ids=["stream_only", "calculating"])
async def test_counts_follow_commits_without_a_resync(dsn: str, sync_interval: float) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        writer = Writer(conn, random.Random(7))
        for _ in range(20):  # before the server starts: the first calculation holds them
            await writer.step()
        async with following(dsn, sync_interval) as (service, follower, _):
            samples: list[tuple[int, int]] = []
            done = asyncio.Event()

            async def watch() -> None:
                while not done.is_set():
                    removals = writer.removals
                    stats = await service.stats_many(list(CAMPAIGNS))
                    samples.append((sum(s["supporters"] for s in stats.values()), removals))
                    await asyncio.sleep(0.003)

            watcher = asyncio.create_task(watch())
            for i in range(160):
                await writer.step()
                await asyncio.sleep(0.01)  # about 2 s of writes: calculations merge meanwhile
                if i % 20 == 19:
                    await _equal_soon(service, conn)
            await _equal_soon(service, conn)
            # A last step that changed no count leaves memory equal before the follower has
            # read it: wait for the follower's own count of transactions.
            await wait_for(lambda: follower.status()["transactions"] >= 160, timeout=10)
            done.set()
            await watcher
            info = await service.info()
            status = follower.status()
        assert status["transactions"] >= 160
        truth = await recount(conn, CAMPAIGNS)
        assert sum(t.messages for t in truth.values()) > 0  # messages were followed too
        assert status["errors"] == 0
        assert status["inexact"] == 0
        if sync_interval < 1:
            assert info["calculations"]["completed"] >= 3  # merged all along
        # Never backwards but by a real removal (a rejection, a deletion, a supporter rejected).
        lost = 0
        for (before, _), (after, removals) in itertools.pairwise(samples):
            lost += max(0, before - after)
            assert lost <= removals, (before, after, lost, removals)
    finally:
        await conn.close()


async def test_follower_stopped_and_restarted_loses_and_doubles_nothing(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        writer = Writer(conn, random.Random(3))
        follower = Follower(dsn, slot="t_restart", configure=True, poll_interval=0.01)
        await follower.prepare()
        service = StatsService(PostgresSource(dsn), ActorConfig(sync_interval=3600))
        await service.start()
        try:
            task = asyncio.create_task(follower.run(service, full_calculation_pending=True))
            await wait_for(lambda: loaded(service))
            for _ in range(40):
                await writer.step()
            await _equal_soon(service, conn)
            task.cancel()  # the follower stops; the service keeps serving
            with contextlib.suppress(asyncio.CancelledError):
                await task
            for _ in range(40):  # written while nobody follows
                await writer.step()
            # A new follower on the same slot: what the slot still holds is either in the full
            # calculation it asks for, or replayed on top of it, never both.
            again = Follower(dsn, slot="t_restart", poll_interval=0.01, configure=True)
            task = asyncio.create_task(again.run(service, full_calculation_pending=False))
            for _ in range(40):
                await writer.step()
            await _equal_soon(service, conn)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            await service.stop()
        # The whole server restarted, the slot kept: the same.
        for _ in range(20):
            await writer.step()
        async with following(dsn, 3600, slot="t_restart") as (service, _, _):
            for _ in range(20):
                await writer.step()
            await _equal_soon(service, conn)
    finally:
        await conn.close()


async def test_follow_fails_at_start_with_the_command_that_fixes_it(
    dsn: str, module_dsn: str
) -> None:
    # The session's cluster runs with wal_level = replica.
    with pytest.raises(FollowError, match="ALTER SYSTEM SET wal_level = logical"):
        await Follower(module_dsn, slot="t_nowal").prepare()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("ALTER TABLE actions REPLICA IDENTITY DEFAULT")
        with pytest.raises(FollowError, match="ALTER TABLE actions REPLICA IDENTITY FULL;"):
            await Follower(dsn, slot="t_noident").prepare()
        await conn.execute("CREATE ROLE plain LOGIN")
        plain = dsn.replace("postgres:@", "plain:@")
        with pytest.raises(FollowError, match="ALTER ROLE plain WITH REPLICATION;"):
            await Follower(plain, slot="t_norole", configure=True).prepare()
    finally:
        await conn.execute("DROP ROLE IF EXISTS plain")
        await conn.close()
    assert [s["slot_name"] for s in await list_slots(dsn)] == []


async def _cli(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "campaignstats.cli",
        "--log-format",
        "json",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_serve_follow_refuses_a_database_without_logical_wal(
    module_dsn: str, tmp_path: Path
) -> None:
    code, _, err = await _cli(
        "serve", "--dsn", module_dsn, "--follow", "--no-http", "--no-tcp",
        "--unix", str(tmp_path / "s.sock"),
    )  # fmt: skip
    assert code == 2
    assert "ALTER SYSTEM SET wal_level = logical;" in err


async def test_slots_command_lists_and_drops(dsn: str) -> None:
    await Follower(dsn, slot="t_cli", configure=True).prepare()
    code, out, _ = await _cli("slots", "--dsn", dsn, "--json")
    assert code == 0
    [slot] = json.loads(out)
    assert slot["slot_name"] == "t_cli"
    assert slot["plugin"] == "pgoutput"
    assert slot["lag_bytes"] >= 0
    code, out, _ = await _cli("slots", "--dsn", dsn, "--drop", "t_cli")
    assert (code, out.strip()) == (0, "dropped slot t_cli")
    code, _, err = await _cli("slots", "--dsn", dsn, "--drop", "t_cli")
    assert code == 1
    assert "no slot named t_cli" in err


# -- plan() on its own: the branches a Proca-shaped workload rarely takes ------------------------

_ORGS = {1: 1, 2: 2}


def _txn(xid: int, *changes: RowChange) -> Transaction:
    return Transaction(xid, xid * 100, xid * 100 + 10, 0.0, list(changes))


def _sup(sid: int, area: str | None = "DE", status: int = 3, fp: bytes = b"p") -> SupporterRow:
    return SupporterRow(sid, fp, area, status, 0)


def _act(aid: int, sid: int, page: int = 1, status: int = 3) -> ActionRow:
    return ActionRow(aid, sid, "register", 1, page, status, False)


def _apply_plan(p: Plan) -> CampaignStats:
    stats = CampaignStats()
    for inc in p.increments:
        stats.add(inc)
    for dec in p.decrements:
        stats.subtract(dec)
    return stats


def test_plan_an_area_change_moves_the_person_between_areas_exactly() -> None:
    # After the round: the supporter's area is FR; its action counted all along.
    p = plan(
        [_txn(5, RowChange("supporters", _sup(1, "DE"), _sup(1, "FR")))],
        [_sup(1, "FR")],
        [_act(1, 1)],
        _ORGS.get,
        lambda x: x,
    )
    assert p.inexact == 0
    before = CampaignStats(1, {"register": 1}, {"DE": 1}, {1: 1})
    for inc in p.increments:
        before.add(inc)
    for dec in p.decrements:
        before.subtract(dec)
    assert before == CampaignStats(1, {"register": 1}, {"FR": 1}, {1: 1})
    assert {i.txid for i in [*p.increments, *p.decrements]} == {5}


def test_plan_a_supporter_confirmed_later_counts_without_moving_actions() -> None:
    p = plan(
        [_txn(7, RowChange("supporters", _sup(1, status=1), _sup(1)))],
        [_sup(1)],
        [_act(1, 1)],
        _ORGS.get,
        lambda x: x,
    )
    stats = _apply_plan(p)
    assert (stats.supporters, stats.area, stats.org, stats.action) == (1, {"DE": 1}, {1: 1}, {})


def test_plan_a_second_org_without_a_new_supporter_is_counted_as_inexact() -> None:
    p = plan(
        [_txn(9, RowChange("actions", None, _act(2, 1, page=2)))],
        [_sup(1)],
        [_act(1, 1, page=1), _act(2, 1, page=2)],
        _ORGS.get,
        lambda x: x,
    )
    assert p.inexact == 1
    assert [(i.org_id, i.new_supporter) for i in p.increments] == [(2, False)]
    assert p.decrements == []


def test_plan_two_transactions_of_one_person_in_one_round_each_carry_their_txid() -> None:
    # Inserted new (not counted) then accepted, in one round: the supporter is new once, on
    # the accepting transaction.
    p = plan(
        [
            _txn(
                1,
                RowChange("supporters", None, _sup(1)),
                RowChange("actions", None, _act(1, 1, status=0)),
            ),
            _txn(2, RowChange("actions", _act(1, 1, status=0), _act(1, 1))),
            _txn(3, RowChange("actions", None, _act(2, 1))),
        ],
        [_sup(1)],
        [_act(1, 1), _act(2, 1)],
        _ORGS.get,
        lambda x: x + 1000,
    )
    assert [(i.txid, i.new_supporter, i.area) for i in p.increments] == [
        (1002, True, "DE"),
        (1003, False, None),
    ]
    assert p.decrements == []


async def test_two_servers_each_on_its_own_slot_reach_the_same_counts(dsn: str) -> None:
    """Replicas: nothing coordinates them but Postgres; one going away costs the other nothing."""
    conn = await asyncpg.connect(dsn)
    try:
        writer = Writer(conn, random.Random(11))
        async with following(dsn, 3600, slot="t_replica_a") as (a, _, _):
            async with following(dsn, 0.3, slot="t_replica_b") as (b, _, _):
                for _ in range(60):
                    await writer.step()
                await _equal_soon(a, conn)
                await _equal_soon(b, conn)
            for _ in range(30):
                await writer.step()
            await _equal_soon(a, conn)
        slots = {s["slot_name"] for s in await list_slots(dsn)}
        assert slots == {"t_replica_a", "t_replica_b"}  # kept for their next start
    finally:
        await conn.close()


async def test_an_update_without_its_old_row_stops_the_follower_with_the_fix(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        writer = Writer(conn, random.Random(5))
        async with following(dsn, 3600, slot="t_identity") as (service, follower, task):
            await writer.sign(3)
            await _equal_soon(service, conn)
            assert follower.status()["running"]
            await conn.execute("ALTER TABLE actions REPLICA IDENTITY DEFAULT")
            await conn.execute("UPDATE actions SET processing_status = 2")
            async with asyncio.timeout(10):
                with pytest.raises(IdentityError):
                    await asyncio.shield(task)
            status = follower.status()
            assert not status["running"]
            assert "ALTER TABLE public.actions REPLICA IDENTITY FULL;" in status["stopped_by"]
    finally:
        await conn.close()


async def test_extra_supporters_changes_are_counted_as_not_followed(dsn: str) -> None:
    """docs/follow.md, "Not followed yet": counted in status(), repaired by a calculation."""
    conn = await asyncpg.connect(dsn)
    try:
        async with following(dsn, 3600, slot="t_extra") as (service, follower, _):
            await conn.execute("UPDATE action_pages SET extra_supporters = 5 WHERE id = 1")
            await wait_for(lambda: follower.status()["extra_supporters_changes"] == 1, 5)
            assert (await service.stats(1))["extra_supporters"] == 0
            await service.resync("all")
            await wait_for(lambda: _extra(service, 5), 5)
    finally:
        await conn.close()


async def _extra(service: StatsService, n: int) -> bool:
    return bool((await service.stats(1))["extra_supporters"] == n)


async def test_the_http_metrics_show_the_followers_lag_and_progress(dsn: str) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from campaignstats.http import HttpConfig
    from campaignstats.http import app as http_app

    conn = await asyncpg.connect(dsn)
    try:
        writer = Writer(conn, random.Random(11))
        async with following(dsn, 3600.0, slot="t_follow_metrics") as (service, follower, _):
            for _ in range(10):
                await writer.step()
            await _equal_soon(service, conn)
            # equal counts can come before the last commits (one that changes no count)
            await wait_for(lambda: follower.status()["transactions"] >= 10)

            def with_follower(info: dict[str, object]) -> dict[str, object]:
                info["follower"] = follower.status()  # as serve --follow adds it
                return info

            stats_app = http_app(service, HttpConfig(), info_hook=with_follower)
            text = stats_app.metrics.render(await stats_app._info()).decode()
    finally:
        await conn.close()
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert values["campaignstats_follower_running"] == 1
    assert values["campaignstats_follower_transactions_total"] >= 10
    assert values["campaignstats_follower_errors_total"] == 0
    assert "campaignstats_follower_lag_bytes" in values
