"""Adversarial review (rcalc4): Postgres failing in the middle of a calculation's stream, on
either connection. The calculation must end with a CalculationError naming the cause, promptly,
and leave the surviving connection out of any transaction and usable; a later calculation
equals the recount."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from campaignstats.db.calculation import calculate
from campaignstats.errors import CalculationError

from .recount import recount
from .test_pages import demo_database

SUPPORTER_QUERY = "%WITH x AS%"


@dataclass
class Calculating:
    """A calculation of the demo database running on ``main`` and ``helper``, read one row at a
    time, and a third connection that watches and strikes."""

    main: asyncpg.Connection
    helper: asyncpg.Connection
    observer: asyncpg.Connection
    task: asyncio.Future[Any]

    def target(self, victim: str) -> asyncpg.Connection:
        return self.main if victim == "main" else self.helper

    async def until_streaming(self, pid: int) -> None:
        """Until backend ``pid`` is reading the supporter query by cursor."""
        async with asyncio.timeout(30):
            while not await self.observer.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND query LIKE $2",
                pid,
                SUPPORTER_QUERY,
            ):
                await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def calculating(conn: asyncpg.Connection, module_dsn: str) -> AsyncIterator[Calculating]:
    await demo_database(conn)
    main = await asyncpg.connect(module_dsn)
    helper = await asyncpg.connect(module_dsn)
    observer = await asyncpg.connect(module_dsn)
    task = asyncio.ensure_future(calculate(main, "all", helper_conn=helper, chunk_rows=1))
    try:
        yield Calculating(main, helper, observer, task)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, CalculationError):
            await task
        for c in (main, helper, observer):
            await c.close()


async def _hit_when_streaming(calc: Calculating, pid: int, function: str) -> None:
    """``function`` (pg_terminate_backend or pg_cancel_backend) on ``pid`` once it is reading
    the supporter query by cursor; a cancel again and again until the calculation ends (one
    that reaches the backend between two fetches, idle, does nothing)."""
    await calc.until_streaming(pid)
    assert await calc.observer.fetchval(f"SELECT {function}($1)", pid)
    while function == "pg_cancel_backend" and not calc.task.done():
        await calc.observer.fetchval(f"SELECT {function}($1)", pid)
        await asyncio.sleep(0.002)


@pytest.mark.parametrize("victim", ["main", "helper"])
@pytest.mark.parametrize("function", ["pg_terminate_backend", "pg_cancel_backend"])
async def test_a_connection_killed_or_cancelled_mid_stream_fails_it_and_frees_the_other(
    conn: asyncpg.Connection, module_dsn: str, victim: str, function: str
) -> None:
    async with calculating(conn, module_dsn) as calc:
        main, helper, observer = calc.main, calc.helper, calc.observer
        target = calc.target(victim)
        other = helper if victim == "main" else main
        await _hit_when_streaming(calc, target.get_server_pid(), function)
        with pytest.raises(CalculationError) as failed:
            await asyncio.wait_for(calc.task, 30)
        text = str(failed.value).lower()
        if function == "pg_cancel_backend":
            assert "cancel" in text
        else:  # Postgres's FATAL message, or the socket closed before the client read it
            assert "terminat" in text or "closed in the middle of operation" in text, text
        # The other connection ended its transaction and still works.
        assert not other.is_closed()
        assert not other.is_in_transaction()
        assert await other.fetchval("SELECT 1") == 1
        if function == "pg_cancel_backend":
            assert not target.is_in_transaction()
            again = await calculate(main, "all", helper_conn=helper)
        else:
            again = await calculate(other, "all")
        assert again.campaigns == await recount(observer)


@pytest.mark.parametrize("victim", ["main", "helper"])
async def test_a_calculation_cancelled_by_its_caller_mid_stream_leaves_both_connections_idle(
    conn: asyncpg.Connection, module_dsn: str, victim: str
) -> None:
    async with calculating(conn, module_dsn) as calc:
        main, helper, observer = calc.main, calc.helper, calc.observer
        await calc.until_streaming(calc.target(victim).get_server_pid())
        calc.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(calc.task, 30)
        for c in (main, helper):
            assert not c.is_closed()
            assert not c.is_in_transaction()
        # Neither backend is left in a transaction either.
        states = await observer.fetch(
            "SELECT state FROM pg_stat_activity WHERE pid = ANY($1::int[])",
            [main.get_server_pid(), helper.get_server_pid()],
        )
        assert sorted(r[0] for r in states) == ["idle", "idle"]
        again = await calculate(main, "all", helper_conn=helper)
        assert again.campaigns == await recount(observer)
