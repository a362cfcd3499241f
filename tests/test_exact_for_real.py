"""Exact for real, against the embedded Postgres: the way Proca changes actions.

Proca inserts an action as ``new`` (or ``confirming``, double opt-in) and accepts it later in
another transaction, and may reject it later still (a bounced email, "reject my signature",
moderation). The increment is announced once the action counts, with an ``action_id`` already
below the highest id of the last snapshot; the decrement once it stops counting. Meanwhile
calculations run every 100 ms. The counts must never move backwards except by a rejection, and
must equal the database right after a ``flush``, without waiting for a repair.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import asyncpg
import pytest

from campaignstats.actor.actor import ActorConfig
from campaignstats.db.queries import PROCA_QUERIES
from campaignstats.db.source import PostgresSource
from campaignstats.service import StatsService

from .conftest import truncate_all
from .helpers import completed, loaded, memory_of, wait_for
from .recount import recount


class Proca:
    """A backend that changes actions the way Proca does, each change in its own transaction."""

    def __init__(self, conn: asyncpg.Connection, service: StatsService, with_txid: bool) -> None:
        self.conn = conn
        self.service = service
        self.with_txid = with_txid
        self.person = 0
        self.pending: list[tuple[int, str]] = []  # (action id, area): inserted "new"
        self.counted: list[tuple[int, str]] = []
        self.rejections = 0

    async def setup(self) -> None:
        await truncate_all(self.conn)
        await self.conn.execute("INSERT INTO orgs (id, name) VALUES (1, 'org')")
        await self.conn.execute("INSERT INTO campaigns (id, name, status) VALUES (1, 'c', 1)")
        await self.conn.execute(
            "INSERT INTO action_pages (id, name, campaign_id, org_id) VALUES (1, 'p', 1, 1)"
        )

    async def insert_new(self, area: str) -> None:
        """A signature waiting for its double opt-in: in the database, not counted."""
        self.person += 1
        async with self.conn.transaction():
            sid = await self.conn.fetchval(
                "INSERT INTO supporters (campaign_id, action_page_id, fingerprint, area, "
                "processing_status, dupe_rank) VALUES (1, 1, $1, $2, 3, 0) RETURNING id",
                self.person.to_bytes(8, "big"),
                area,
            )
            aid = await self.conn.fetchval(
                "INSERT INTO actions (supporter_id, action_type, campaign_id, action_page_id, "
                "processing_status) VALUES ($1, 'register', 1, 1, 1) RETURNING id",
                sid,
            )
        self.pending.append((aid, area))

    async def _set_status(self, aid: int, status: int) -> int:
        async with self.conn.transaction():
            await self.conn.execute(
                "UPDATE actions SET processing_status = $2 WHERE id = $1", aid, status
            )
            txid: int = await self.conn.fetchval("SELECT pg_current_xact_id()::text::bigint")
        return txid

    async def accept(self, rng: random.Random) -> None:
        aid, area = self.pending.pop(rng.randrange(len(self.pending)))
        txid = await self._set_status(aid, 3)
        self.service.increment(
            1, 1, "register", area, True, action_id=aid, txid=txid if self.with_txid else None
        )
        self.counted.append((aid, area))

    async def reject(self, rng: random.Random) -> None:
        aid, area = self.counted.pop(rng.randrange(len(self.counted)))
        self.rejections += 1  # counted before the commit: the watcher may see it at once
        txid = await self._set_status(aid, 2)
        self.service.decrement(
            1, 1, "register", area, True, action_id=aid, txid=txid if self.with_txid else None
        )


@pytest.fixture
async def service(module_dsn: str) -> AsyncIterator[StatsService]:
    service = StatsService(PostgresSource(module_dsn), ActorConfig(sync_interval=0.1))
    await service.start()
    yield service
    await service.stop()


@pytest.mark.parametrize("with_txid", [True, False], ids=["txid", "action_id_only"])
async def test_actions_accepted_and_rejected_later_are_exact_while_calculations_run(
    conn: asyncpg.Connection, service: StatsService, with_txid: bool
) -> None:
    proca = Proca(conn, service, with_txid)
    await proca.setup()
    await service.resync("all")
    await wait_for(lambda: loaded(service))
    rng = random.Random(12)
    samples: list[int] = []
    rejections_at_sample: list[int] = []
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            rejections_at_sample.append(proca.rejections)
            samples.append((await service.stats(1))["supporters"])
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    calculations_before = await completed(service)
    for step in range(240):
        roll = rng.random()
        if roll < 0.45 or not (proca.pending or proca.counted):
            await proca.insert_new(rng.choice(["DE", "FR", "PL"]))
        elif roll < 0.85 and proca.pending:
            await proca.accept(rng)
        elif proca.counted:
            await proca.reject(rng)
        if step % 40 == 39:
            # let a calculation finish between the changes, however busy the machine
            seen = await completed(service)

            async def another(seen: int = seen) -> bool:
                return await completed(service) > seen

            await wait_for(another)
    await service.flush()
    memory = await memory_of(service, [1])
    done.set()
    await watcher
    # Equal to the database right after the flush, before any repair...
    assert memory == await recount(conn, [1])
    # ...with calculations merged all along (so the exactness came from the merge)...
    assert await completed(service) - calculations_before >= 5
    # ...and never backwards but for rejections: what the samples lost adds up to no more
    # than the rejections committed by then.
    lost = 0
    pairs = zip(samples, samples[1:], rejections_at_sample[1:], strict=False)
    for before, after, rejections in pairs:
        lost += max(0, before - after)
        assert lost <= rejections, (before, after, lost, rejections)
    assert proca.rejections > 0
    assert proca.counted


SLOW_START = replace(
    PROCA_QUERIES,
    max_action_id="SELECT (SELECT coalesce(max(id), 0) FROM actions) FROM pg_sleep(1)",
)


async def test_id_less_increments_queued_while_the_server_was_down_count_once(
    conn: asyncpg.Connection, module_dsn: str
) -> None:
    """They arrive during the first calculation, which already holds their actions: ``at``
    (older than the snapshot) says so; without it they would count twice until the next one."""
    proca = Proca(conn, None, with_txid=False)  # type: ignore[arg-type]
    await proca.setup()
    for area in ["DE", "FR", "DE"]:
        await proca.insert_new(area)
    await conn.execute("UPDATE actions SET processing_status = 3")
    happened_at = time.time() - 30  # while the server was down
    service = StatsService(
        PostgresSource(module_dsn, queries=SLOW_START), ActorConfig(sync_interval=3600)
    )
    await service.start()
    try:
        await asyncio.sleep(0.3)  # the first calculation is running (and journaling)
        for _, area in proca.pending:
            service.increment(1, 1, "register", area, True, at=happened_at)
        service.increment(1, 1, "share", None, False, at=time.time() + 5)  # after it: counted
        await wait_for(lambda: loaded(service))
        stats = await service.stats(1)
        assert stats["supporters"] == 3
        assert stats["action"] == {"register": 3, "share": 1}
        # Late ones too: an at older than the merged snapshot is already in it.
        service.increment(1, 1, "register", "PL", True, at=happened_at)
        await service.flush()
        assert (await service.stats(1))["supporters"] == 3
        assert (await service.info())["already_counted"] == 1
    finally:
        await service.stop()


async def test_messages_are_counted_from_the_database_and_carried_by_increments(
    conn: asyncpg.Connection, module_dsn: str
) -> None:
    service = StatsService(PostgresSource(module_dsn), ActorConfig(sync_interval=3600))
    await service.start()
    try:
        await _messages_scenario(conn, service)
    finally:
        await service.stop()


async def _messages_scenario(conn: asyncpg.Connection, service: StatsService) -> None:
    proca = Proca(conn, service, with_txid=True)
    await proca.setup()
    await proca.insert_new("DE")
    aid = proca.pending[0][0]
    await conn.execute("UPDATE actions SET processing_status = 3")
    await conn.execute(
        "INSERT INTO messages (action_id) SELECT $1 FROM generate_series(1, 10)", aid
    )
    await wait_for(lambda: loaded(service))  # the first calculation may predate the rows
    await wait_for(lambda: service.resync("all"))  # started once none is running
    await wait_for(lambda: _messages(service, 10))
    service.increment(1, 1, "mail2target", None, False, messages=4)
    await service.flush()
    stats = await service.stats(1)
    assert stats["messages"] == 14
    assert stats["action"]["mail2target"] == 1  # count stays action rows


async def _messages(service: StatsService, n: int) -> bool:
    stats = await service.stats(1)
    return bool(stats["messages"] == n)
