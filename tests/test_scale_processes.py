"""Replicas and shards as real server processes on one database they all follow (docs/scale.md).

Each server is ``campaignstats serve`` in a process of its own, on a Unix socket, following a
cluster of this module's with ``wal_level = logical``: a shard pair against one unsharded
server, and a client failing over when a replica is killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from campaignstats.client import AsyncStatsClient, ServerUnavailable
from campaignstats.client.routing import AsyncRoutingClient, RoutingClient
from campaignstats.db.embedded import EmbeddedPostgres, create_database, with_database
from campaignstats.db.schema import init_db
from campaignstats.follower import drop_slot, list_slots
from campaignstats.model import CampaignStats, Increment
from campaignstats.shards import shard_of

from .helpers import throwaway_cluster, wait_for
from .recount import recount

pytestmark = pytest.mark.slow

CAMPAIGNS = range(1, 21)


@pytest.fixture(scope="module")
def logical_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    with throwaway_cluster(tmp_path_factory, "scale", logical=True) as pg:
        yield pg


@pytest.fixture
async def dsn(logical_cluster: EmbeddedPostgres) -> AsyncIterator[str]:
    admin = logical_cluster.dsn()
    await create_database(admin, "scale", drop_existing=True)
    dsn = with_database(admin, "scale")
    conn = await asyncpg.connect(dsn)
    try:
        await init_db(conn)
        await conn.execute(
            "INSERT INTO orgs (id, name) VALUES (1, 'a'), (2, 'b');"
            "INSERT INTO campaigns (id, name, status) "
            "SELECT i, 'c' || i, 1 FROM generate_series(1, 20) i;"
            "INSERT INTO action_pages (id, name, campaign_id, org_id) "
            "SELECT i, 'p' || i, i, 1 + i % 2 FROM generate_series(1, 20) i;"
            "ALTER TABLE actions REPLICA IDENTITY FULL;"
            "ALTER TABLE supporters REPLICA IDENTITY FULL;"
            "ALTER TABLE action_pages REPLICA IDENTITY FULL;"
            "DO $$ BEGIN IF to_regclass('messages') IS NOT NULL THEN "
            "ALTER TABLE messages REPLICA IDENTITY FULL; END IF; END $$;"
        )
    finally:
        await conn.close()
    yield dsn
    for slot in await list_slots(admin):
        await drop_slot(admin, slot["slot_name"])


async def sign(conn: asyncpg.Connection, person: int, campaign: int, status: int = 3) -> int:
    """One signature, the way Proca writes it: a supporter and an action, one transaction."""
    async with conn.transaction():
        sid = await conn.fetchval(
            "INSERT INTO supporters (campaign_id, action_page_id, fingerprint, area, "
            "processing_status, dupe_rank) VALUES ($1, $1, $2, $3, 3, 0) RETURNING id",
            campaign,
            person.to_bytes(4, "big"),
            ("DE", "FR", None)[person % 3],
        )
        aid: int = await conn.fetchval(
            "INSERT INTO actions (supporter_id, action_type, campaign_id, action_page_id, "
            "processing_status) VALUES ($1, 'register', $2, $2, $3) RETURNING id",
            sid,
            campaign,
            status,
        )
    return aid


class Server:
    """``campaignstats serve`` in a process of its own, on a Unix socket."""

    def __init__(self, proc: asyncio.subprocess.Process, sock: Path, log: Path) -> None:
        self.proc = proc
        self.sock = sock
        self.log = log

    @property
    def url(self) -> str:
        return f"unix://{self.sock}"

    @classmethod
    async def start(cls, dsn: str, where: Path, name: str, *options: str) -> Server:
        sock, log = where / f"{name}.sock", where / f"{name}.log"
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "campaignstats.cli", "--log-format", "json",
                "serve", "--dsn", dsn, "--no-http", "--no-tcp", "--unix", str(sock),
                "--sync-interval", "3600", "--follow", "--slot", name, *options,
                stdout=out, stderr=out, start_new_session=True,
            )  # fmt: skip
        server = cls(proc, sock, log)
        try:
            await wait_for(server.ready, timeout=60)
        except TimeoutError:
            await server.stop()
            raise AssertionError(f"{name} did not start: {log.read_text()[-3000:]}") from None
        return server

    async def ready(self) -> bool:
        if self.proc.returncode is not None:
            raise AssertionError(f"the server exited: {self.log.read_text()[-3000:]}")
        if not self.sock.exists():
            return False
        try:
            async with AsyncStatsClient(self.url, timeout=2) as client:
                info = await client.info()
        except (ServerUnavailable, OSError):
            return False
        follower = info.get("follower", {})
        return bool(info["calculations"]["loaded"] and follower.get("running"))

    def kill(self) -> None:
        """SIGKILL: no goodbye, no snapshot, no slot released cleanly."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(30):
                    await self.proc.wait()
            except TimeoutError:
                self.kill()
                await self.proc.wait()


@contextlib.asynccontextmanager
async def servers(dsn: str, where: Path, *specs: tuple[str, ...]) -> AsyncIterator[list[Server]]:
    started: list[Server] = []
    try:
        for name, *options in specs:
            started.append(await Server.start(dsn, where, name, *options))
        yield started
    finally:
        for server in started:
            await server.stop()


def expected_counts(
    database: dict[int, CampaignStats], increments: list[Increment]
) -> dict[int, CampaignStats]:
    counts = {cid: CampaignStats.from_wire(s.to_wire()) for cid, s in database.items()}
    for inc in increments:
        counts.setdefault(inc.campaign_id, CampaignStats()).add(inc)
    return counts


def as_stats(many: dict[int, Any]) -> dict[int, CampaignStats]:
    return {cid: CampaignStats.from_wire(stats) for cid, stats in many.items()}


def some_increments(n: int, seed: int) -> list[Increment]:
    """Increments of actions the database does not hold (a backend's own counts)."""
    return [
        Increment(
            CAMPAIGNS[(seed * 7 + i) % len(CAMPAIGNS)],
            1 + i % 2,
            ("share", "register", "donate")[i % 3],
            ("DE", "IT", None)[i % 3],
            i % 2 == 0,
        )
        for i in range(n)
    ]


async def test_a_shard_pair_together_equals_one_unsharded_server(dsn: str, tmp_path: Path) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for person in range(60):  # before the servers start: their first calculation
            await sign(conn, person, CAMPAIGNS[person % 20], status=3 if person % 4 else 0)
        async with servers(
            dsn, tmp_path, ("whole",), ("shard0", "--shard", "0/2"), ("shard1", "--shard", "1/2")
        ) as (whole, shard0, shard1):
            # after the calculations: writes to Postgres, followed by all three
            for person in range(60, 160):
                await sign(conn, person, CAMPAIGNS[(person * 3) % 20])
            await conn.execute("UPDATE actions SET processing_status = 3 WHERE id % 4 = 1")
            await conn.execute("UPDATE actions SET processing_status = 2 WHERE id % 10 = 0")
            # and increments: through the routing client to the pair, as they are to the whole
            increments = some_increments(400, seed=1)
            async with (
                AsyncRoutingClient([[shard0.url], [shard1.url]]) as routing,
                AsyncStatsClient(whole.url) as single,
            ):
                routing.increment_many(increments)
                single.increment_many(increments)
                await routing.flush()
                await single.flush()
                expected = expected_counts(await recount(conn), increments)
                ids = list(CAMPAIGNS)

                async def pair_matches() -> bool:
                    return as_stats(await routing.stats_many(ids)) == expected

                async def whole_matches() -> bool:
                    return as_stats(await single.stats_many(ids)) == expected

                await wait_for(pair_matches, timeout=30)
                await wait_for(whole_matches, timeout=30)
                assert await routing.stats_many(ids) == await single.stats_many(ids)
                # each shard holds its own campaigns and nothing else
                infos = await routing.info()
                assert [i["shard"] for i in infos] == [[0, 2], [1, 2]]
                owned = [sum(1 for c in ids if shard_of(c, 2) == k) for k in (0, 1)]
                assert [i["campaigns"] for i in infos] == owned
                assert (await single.info())["campaigns"] == len(ids)
                assert routing.statistics().server_errors == 0
                # the leaders: merged from both shards, the same figures as the whole's
                top = await routing.top("supporters", 5)
                assert [v for _, v in top] == [v for _, v in await single.top("supporters", 5)]
                assert all(expected[cid].supporters == v for cid, v in top)
                # a calculation on every server: the database's counts again, everywhere
                assert await routing.resync("all")
                assert await single.resync("all")
                database = await recount(conn)
                await wait_for(lambda: _equal(routing.stats_many(ids), database), timeout=30)
                await wait_for(lambda: _equal(single.stats_many(ids), database), timeout=30)
        # Each stopped on SIGTERM with nothing left to cancel: its follower, which runs in the
        # server's task group, was stopped before the group was waited for (it was waited for
        # 15 s, then cancelled, and the stop logged as an error).
        for server in (whole, shard0, shard1):
            assert server.proc.returncode == 0
            assert "tasks.cancelled_at_close" not in server.log.read_text()
    finally:
        await conn.close()


async def _equal(many: Any, expected: dict[int, CampaignStats]) -> bool:
    return as_stats(await many) == expected


async def test_clients_fail_over_when_a_replica_is_killed_and_every_increment_counts(
    dsn: str, tmp_path: Path
) -> None:
    """Two replicas following the database; the client talks to the first. The first is
    killed with SIGKILL while increments are on their way: calls keep answering (from the
    second), and every increment is counted there, those the first had taken but not
    acknowledged included (re-sent from the client's journal). The journal is acknowledged
    only by a flush (``ack_interval`` is long here, so that the test knows which ones are
    unacknowledged: acknowledged ones would live in the dead replica's memory only, being
    increments the database does not hold; docs/scale.md, "Failover")."""
    conn = await asyncpg.connect(dsn)
    try:
        for person in range(40):
            await sign(conn, person, CAMPAIGNS[person % 20])
        database = await recount(conn)
        ids = list(CAMPAIGNS)
        async with servers(dsn, tmp_path, ("a",), ("b",)) as (a, b):
            # the asyncio front
            first = some_increments(300, seed=2)
            then = some_increments(300, seed=3)
            async with AsyncRoutingClient([a.url, b.url], ack_interval=3600) as client:
                client.increment_many(first)
                # a has applied them all (reads do not acknowledge: no flush was asked for)
                await wait_for(
                    lambda: _equal(client.stats_many(ids), expected_counts(database, first))
                )
                assert client.statistics().unacked == len(first)
                a.kill()
                await a.proc.wait()
                assert (await client.stats(1))["supporters"] >= database[1].supporters
                client.increment_many(then)
                await client.flush()
                assert as_stats(await client.stats_many(ids)) == expected_counts(
                    database, first + then
                )
                stats = client.statistics()
                assert (stats.failovers, stats.resent, stats.unacked) == (1, 300, 0)
                assert stats.replicas == [b.url]

            # the blocking front: a new replica in the dead one's place, and b killed next
            async with servers(dsn, tmp_path, ("a2",)) as (a2,):
                more = some_increments(250, seed=4)

                def blocking() -> tuple[dict[int, Any], Any]:
                    with RoutingClient([b.url, a2.url], ack_interval=3600) as routing:
                        routing.increment_many(more[:100])
                        routing.stats(1)
                        b.kill()
                        routing.increment_many(more[100:])
                        routing.flush()
                        return routing.stats_many(ids), routing.statistics()

                many, stats = await asyncio.to_thread(blocking)
                # a2 started after `first` and `then` went to a and b: it has the database's
                # counts and every increment of this client
                assert as_stats(many) == expected_counts(database, more)
                assert stats.failovers == 1
                assert stats.replicas == [a2.url]
                async with AsyncStatsClient(a2.url) as direct:
                    assert as_stats(await direct.stats_many(ids)) == expected_counts(database, more)
    finally:
        await conn.close()
