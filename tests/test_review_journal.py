"""Review of the journal folded (campaignstats/journal.py; docs/design.md, "The journal,
folded"): real Postgres, a real actor, a calculation held open after its snapshot is taken,
and the merge compared with a straight recount of the database."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from campaignstats.actor.actor import ActorConfig
from campaignstats.actor.messages import Ask, Message
from campaignstats.db.source import PostgresSource
from campaignstats.errors import CalculationError, InternalError
from campaignstats.journal import EarlyHorizon
from campaignstats.model import CalculationResult
from campaignstats.requests import Stats
from campaignstats.service import StatsService

from .conftest import truncate_all
from .helpers import completed, loaded, memory_of, wait_for
from .recount import recount, recount_timelines
from .test_journal_fold import Gated


async def _setup(conn: asyncpg.Connection) -> None:
    await truncate_all(conn)
    await conn.execute("INSERT INTO orgs (id, name) VALUES (1, 'org')")
    await conn.execute("INSERT INTO campaigns (id, name, status) VALUES (1, 'c', 1)")
    await conn.execute(
        "INSERT INTO action_pages (id, name, campaign_id, org_id) VALUES (1, 'p', 1, 1)"
    )


async def _txid(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT pg_current_xact_id()::text::bigint"))


async def _sign(conn: asyncpg.Connection, person: int, area: str, status: int = 3) -> int:
    """A signature (its action in ``status``) committed in its own transaction: its id."""
    async with conn.transaction():
        sid = await conn.fetchval(
            "INSERT INTO supporters (campaign_id, action_page_id, fingerprint, area, "
            "processing_status, dupe_rank) VALUES (1, 1, $1, $2, 3, 0) RETURNING id",
            person.to_bytes(8, "big"),
            area,
        )
        aid: int = await conn.fetchval(
            "INSERT INTO actions (supporter_id, action_type, campaign_id, action_page_id, "
            "processing_status) VALUES ($1, 'register', 1, 1, $2) RETURNING id",
            sid,
            status,
        )
    return aid


async def _set_status(conn: asyncpg.Connection, aid: int, status: int) -> int:
    """Change an action's status in its own transaction: that transaction's id."""
    async with conn.transaction():
        await conn.execute("UPDATE actions SET processing_status = $2 WHERE id = $1", aid, status)
        return await _txid(conn)


@pytest.fixture
async def gated(module_dsn: str) -> AsyncIterator[tuple[Gated, StatsService]]:
    source = Gated(PostgresSource(module_dsn))
    source.release.set()
    service = StatsService(source, ActorConfig(sync_interval=3600))
    yield source, service
    source.release.set()
    await service.stop()


async def test_rejections_acceptances_and_repeats_after_a_real_snapshot_merge_to_the_recount(
    conn: asyncpg.Connection, gated: tuple[Gated, StatsService]
) -> None:
    source, service = gated
    await _setup(conn)
    early = [await _sign(conn, n, "DE") for n in range(1, 5)]
    pending = await _sign(conn, 5, "AT", status=0)  # in the window, not counted yet
    await service.start()
    await wait_for(lambda: loaded(service))
    before = await completed(service)
    source.release.clear()
    source.told.clear()
    assert await service.resync("all")
    await asyncio.wait_for(source.told.wait(), 20)

    def inc(area: str, aid: int | None, txid: int | None, *, dec: bool = False) -> None:
        call = service.decrement if dec else service.increment
        call(1, 1, "register", area, True, action_id=aid, txid=txid, page=1)

    # a counted action rejected, then accepted again, then rejected: listed (in the window)
    inc("DE", early[0], await _set_status(conn, early[0], 2), dec=True)
    inc("DE", early[0], await _set_status(conn, early[0], 3))
    inc("DE", early[0], await _set_status(conn, early[0], 2), dec=True)
    # an action of the window accepted after the snapshot: listed
    inc("AT", pending, await _set_status(conn, pending, 3))
    # a late repeat of an action the snapshot holds (its id only, counted): dropped at merge
    inc("DE", early[1], None)
    # a new signature, rejected, announced rejection first (both folded: above the highest id)
    fresh = await _sign(conn, 6, "FR")
    accepted = await _txid(conn)  # a transaction after the snapshot (not the insert's own)
    rejected = await _set_status(conn, fresh, 2)
    inc("FR", fresh, rejected, dec=True)
    inc("FR", fresh, accepted)
    # a new signature announced by its id only, and one by its time only
    inc("PL", await _sign(conn, 7, "PL"), None)
    await _sign(conn, 8, "PL")
    service.increment(1, 1, "register", "PL", True, at=time.time() + 5, page=1)  # after it
    await service.flush()
    source.release.set()

    async def merged() -> bool:
        return await completed(service) > before

    await wait_for(merged)
    info = (await service.info())["last_calculation"]["journal"]
    assert info["folded_campaigns"] == 1
    assert await memory_of(service, [1]) == await recount(conn, [1])
    # and the next calculation finds nothing to correct
    done = await completed(service)
    assert await service.resync("all")

    async def again() -> bool:
        return await completed(service) > done

    await wait_for(again)
    drift = (await service.info())["last_calculation"]["drift"]
    assert drift["campaigns"] == 0


class FailsAfterHorizon:
    """A real PostgresSource whose first calculation fails once its snapshot's horizon is told
    (a database that goes away half-way); the next ones run normally."""

    reports_horizon = True

    def __init__(self, inner: PostgresSource) -> None:
        self.inner = inner
        self.fail = asyncio.Event()
        self.told = asyncio.Event()
        self.release = asyncio.Event()

    async def calculate(self, scope: Any, *, on_horizon: Any = None) -> CalculationResult:
        def tell(horizon: EarlyHorizon) -> None:
            if on_horizon is not None:
                on_horizon(horizon)
            self.told.set()

        result = await self.inner.calculate(scope, on_horizon=tell)
        await self.release.wait()
        if self.fail.is_set():
            self.fail.clear()
            raise CalculationError("the database went away")
        return result


async def test_a_calculation_failing_after_its_horizon_leaves_no_fold_behind(
    conn: asyncpg.Connection, module_dsn: str
) -> None:
    await _setup(conn)
    first = await _sign(conn, 1, "DE")
    source = FailsAfterHorizon(PostgresSource(module_dsn))
    source.release.set()
    service = StatsService(source, ActorConfig(sync_interval=3600, backoff_initial=0.05))
    try:
        await service.start()
        await wait_for(lambda: loaded(service))
        source.release.clear()
        source.told.clear()
        source.fail.set()
        failed_before = (await service.info())["calculations"]["failed"]
        assert await service.resync("all")
        await asyncio.wait_for(source.told.wait(), 20)
        # folded by the failing calculation's horizon: must not leak into the retry's merge
        second = await _sign(conn, 2, "FR")
        service.increment(1, 1, "register", "FR", True, action_id=second, page=1)
        service.increment(1, 1, "register", "DE", True, action_id=first, page=1)  # a repeat
        await service.flush()
        source.release.set()

        async def failed() -> bool:
            return (await service.info())["calculations"]["failed"] > failed_before

        await wait_for(failed)
        done = await completed(service)
        await service.resync("all")  # or the retry after the failure

        async def merged() -> bool:
            return await completed(service) > done

        await wait_for(merged)
        assert await memory_of(service, [1]) == await recount(conn, [1])
    finally:
        source.release.set()
        await service.stop()


# -- a decrement's `at` is the time of the action it takes back, not of the rejection ---------


async def _sign_at(conn: asyncpg.Connection, person: int, at: float) -> int:
    """An accepted signature made at ``at`` (epoch seconds): its action id."""
    async with conn.transaction():
        sid = await conn.fetchval(
            "INSERT INTO supporters (campaign_id, action_page_id, fingerprint, area, "
            "processing_status, dupe_rank) VALUES (1, 1, $1, 'DE', 3, 0) RETURNING id",
            person.to_bytes(8, "big"),
        )
        aid: int = await conn.fetchval(
            "INSERT INTO actions (supporter_id, action_type, campaign_id, action_page_id, "
            "processing_status, inserted_at) VALUES ($1, 'register', 1, 1, 3, "
            "to_timestamp($2) AT TIME ZONE 'UTC') RETURNING id",
            sid,
            at,
        )
    return aid


async def test_a_rejection_announced_with_the_actions_time_takes_the_count_down_at_once(
    conn: asyncpg.Connection, module_dsn: str
) -> None:
    """docs/protocol.md: a decrement carries the same fields as the increment it takes back,
    ``at`` being "when the action happened". A rejection made after the last calculation of an
    action made an hour before it is not held by that calculation's snapshot, yet its ``at`` is
    older than the snapshot's clock: "Exact by time" took it as held, skipped it
    (``already_counted``), and the count stayed up until the next calculation."""
    await _setup(conn)
    an_hour_ago = time.time() - 3600
    aid = await _sign_at(conn, 1, an_hour_ago)
    service = StatsService(PostgresSource(module_dsn), ActorConfig(sync_interval=3600))
    try:
        await service.start()
        await wait_for(lambda: loaded(service))
        assert (await service.stats(1))["supporters"] == 1
        await _set_status(conn, aid, 2)  # rejected, after the snapshot
        service.decrement(1, 1, "register", "DE", True, at=an_hour_ago, page=1)
        await service.flush()
        assert (await service.stats(1))["supporters"] == 0
        assert await memory_of(service, [1]) == await recount(conn, [1])
        assert (await service.info())["already_counted"] == 0
    finally:
        await service.stop()


async def test_a_rejection_with_the_actions_time_after_the_snapshot_is_kept_by_the_merge(
    conn: asyncpg.Connection, gated: tuple[Gated, StatsService]
) -> None:
    """The same rejection announced while a calculation runs, once its snapshot is taken: the
    fold dropped it as held (its ``at`` is older than the snapshot's clock), and the merge left
    the database's count, which still holds the action."""
    source, service = gated
    await _setup(conn)
    an_hour_ago = time.time() - 3600
    aid = await _sign_at(conn, 1, an_hour_ago)
    await service.start()
    await wait_for(lambda: loaded(service))
    before = await completed(service)
    source.release.clear()
    source.told.clear()
    assert await service.resync("all")
    await asyncio.wait_for(source.told.wait(), 20)
    await _set_status(conn, aid, 2)  # rejected, after the snapshot
    service.decrement(1, 1, "register", "DE", True, at=an_hour_ago, page=1)
    await service.flush()
    source.release.set()

    async def merged() -> bool:
        return await completed(service) > before

    await wait_for(merged)
    assert await memory_of(service, [1]) == await recount(conn, [1])


async def test_the_buckets_after_a_folded_merge_equal_the_recount_of_the_database(
    conn: asyncpg.Connection, gated: tuple[Gated, StatsService]
) -> None:
    """Signatures and rejections at their own times (hours and minutes ago, now), after a real
    snapshot, folded: the merged minute and hour buckets equal a row-by-row recount."""
    source, service = gated
    await _setup(conn)
    now = float(int(time.time()))
    old = [await _sign_at(conn, n, now - 3 * 3600 - n) for n in (1, 2)]
    await _sign_at(conn, 3, now - 1800)
    await service.start()
    await wait_for(lambda: loaded(service))
    before = await completed(service)
    source.release.clear()
    source.told.clear()
    assert await service.resync("all")
    await asyncio.wait_for(source.told.wait(), 20)

    def change(at: float, aid: int | None, txid: int | None, *, dec: bool = False) -> None:
        call = service.decrement if dec else service.increment
        call(1, 1, "register", "DE", True, action_id=aid, txid=txid, at=at, page=1)

    change(now - 3 * 3600 - 1, old[0], await _set_status(conn, old[0], 2), dec=True)
    fresh = await _sign_at(conn, 4, now - 600)
    change(now - 600, fresh, None)
    change(now - 600, fresh, await _set_status(conn, fresh, 2), dec=True)
    change(now - 7200, await _sign_at(conn, 6, now - 7200), None)
    change(now - 60, await _sign_at(conn, 7, now - 60), None)
    await service.flush()
    source.release.set()

    async def merged() -> bool:
        return await completed(service) > before

    await wait_for(merged)
    assert await memory_of(service, [1]) == await recount(conn, [1])
    truth = (await recount_timelines(conn))[1]
    start, end = now - 4 * 3600, now + 3600
    for unit in ("minute", "hour"):
        mine = (await service.history(1, unit, start, end))["buckets"]
        assert mine == truth.history(unit, start, end, time.time()), unit


async def test_an_actor_restarted_after_its_calculations_horizon_merges_the_next_one_exactly(
    conn: asyncpg.Connection, module_dsn: str
) -> None:
    """The actor crashes while its calculation waits with changes folded by that calculation's
    horizon: the new actor's calculation folds by its own, and its merge equals the recount."""

    def crash(msg: Message) -> None:
        if isinstance(msg, Ask) and msg.request == Stats(666):
            raise RuntimeError("injected crash in a call")

    source = Gated(PostgresSource(module_dsn))
    source.release.set()
    service = StatsService(source, ActorConfig(sync_interval=3600, fault_hook=crash))
    try:
        await _setup(conn)
        first = await _sign(conn, 1, "DE")
        await service.start()
        await wait_for(lambda: loaded(service))
        source.release.clear()
        source.told.clear()
        assert await service.resync("all")
        await asyncio.wait_for(source.told.wait(), 20)
        second = await _sign(conn, 2, "FR")
        service.increment(1, 1, "register", "FR", True, action_id=second, page=1)  # folded
        service.increment(1, 1, "register", "DE", True, action_id=first, page=1)  # a repeat
        await service.flush()
        source.told.clear()
        with pytest.raises(InternalError):
            await service.stats(666)
        await asyncio.wait_for(source.told.wait(), 20)  # the new actor's calculation
        third = await _sign(conn, 3, "PL")
        service.increment(1, 1, "register", "PL", True, action_id=third, page=1)
        await service.flush()
        source.release.set()

        async def merged() -> bool:
            calculations = (await service.info())["calculations"]
            return calculations["running"] is None and calculations["completed"] >= 1

        await wait_for(merged)
        assert (await service.info())["restarts"] == 1
        assert (await service.stats(1))["supporters"] == 3
        assert await memory_of(service, [1]) == await recount(conn, [1])
    finally:
        source.release.set()
        await service.stop()
