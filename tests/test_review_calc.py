"""The findings of the adversarial review of the calculation read by cursor (calc2), one test
each. Each failed before its fix; each docstring says what was wrong and what must happen."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import asyncpg
import pytest

from campaignstats.db.calculation import calculate
from campaignstats.db.queries import PROCA_QUERIES
from campaignstats.errors import CalculationError

from .recount import recount
from .test_pages import demo_database

#: the action buckets, each row 50 ms late: every fetch of one row is far within a 1 s
#: statement_timeout, the statement as a whole far beyond it
SLOW_ROWS = replace(
    PROCA_QUERIES,
    action_buckets=(
        f"SELECT q.* FROM ({PROCA_QUERIES.action_buckets}) q WHERE pg_sleep(0.05)::text = ''"
    ),
)


@pytest.mark.parametrize("with_helper", [False, True], ids=["one-connection", "two-connections"])
async def test_a_statement_read_by_cursor_is_bounded_by_the_statement_timeout_as_a_whole(
    conn: asyncpg.Connection, module_dsn: str, with_helper: bool
) -> None:
    """statement_timeout is documented as bounding each statement of the calculation. Read by
    cursor, a statement runs fetch by fetch, and Postgres times each fetch on its own: a
    statement of many slow chunks ran for ever (here, thousands of rows of 50 ms each against
    a 1 s timeout). The statement as a whole must fail the calculation once over the timeout."""
    await demo_database(conn)
    helper = await asyncpg.connect(module_dsn) if with_helper else None
    try:
        t0 = time.monotonic()
        with pytest.raises(CalculationError, match="statement timeout"):
            await asyncio.wait_for(
                calculate(
                    conn,
                    "all",
                    helper_conn=helper,
                    queries=SLOW_ROWS,
                    statement_timeout=1.0,
                    chunk_rows=1,
                ),
                30,
            )
        assert time.monotonic() - t0 < 10
        # Both connections are usable afterwards, and the next calculation is exact.
        result = await calculate(conn, "all", helper_conn=helper)
        assert result.campaigns == await recount(conn)
    finally:
        if helper is not None:
            await helper.close()


def _slow(sql: str) -> str:
    """``sql`` with each row 20 ms late."""
    return f"SELECT q.* FROM ({sql}) q WHERE pg_sleep(0.02)::text = ''"


async def test_a_failure_on_the_main_connection_ends_the_calculation_without_waiting_for_the_helper(
    conn: asyncpg.Connection, module_dsn: str
) -> None:
    """The two connections' parts were gathered to the end whatever happened: when the main
    connection failed at its first big statement, the calculation still waited for the helper
    to read its whole half of the supporters (here about a minute of slow rows; 5-10 s at the
    5M demo) before reporting the failure and retrying. The failure must end the other part at
    once, and both connections stay usable."""
    await demo_database(conn)
    queries = replace(
        PROCA_QUERIES,
        action_buckets="SELECT 1 FROM no_such_table WHERE $1::bigint[] IS NULL "
        "AND $2::timestamp IS NULL AND $3::timestamp IS NULL",
        supporter_counts=_slow(PROCA_QUERIES.supporter_counts),
    )
    helper = await asyncpg.connect(module_dsn)
    try:
        t0 = time.monotonic()
        with pytest.raises(CalculationError, match="no_such_table"):
            await asyncio.wait_for(
                calculate(conn, "all", helper_conn=helper, queries=queries, chunk_rows=1), 120
            )
        assert time.monotonic() - t0 < 5
        result = await calculate(conn, "all", helper_conn=helper)
        assert result.campaigns == await recount(conn)
    finally:
        await helper.close()


@pytest.mark.parametrize("with_helper", [False, True], ids=["one-connection", "two-connections"])
async def test_the_uncounted_action_ids_of_the_window_are_exactly_those_not_counted(
    conn: asyncpg.Connection, module_dsn: str, with_helper: bool
) -> None:
    """The newest action ids are read by cursor into one bit each (a set of 100,000 ints was
    walked by every full pass of the garbage collector): the ids of the window the counts do
    not hold are still exactly the gaps and the actions not accepted (or testing)."""
    await demo_database(conn)
    await conn.execute("DELETE FROM actions WHERE id % 97 = 0")  # gaps in the ids
    helper = await asyncpg.connect(module_dsn) if with_helper else None
    try:
        result = await calculate(conn, "all", helper_conn=helper, chunk_rows=333)
    finally:
        if helper is not None:
            await helper.close()
    top = await conn.fetchval("SELECT max(id) FROM actions")
    counted = {
        r[0]
        for r in await conn.fetch(
            "SELECT id FROM actions WHERE id > $1 AND processing_status IN (3, 4) AND NOT testing",
            result.window_low,
        )
    }
    assert result.max_action_id == top
    assert result.uncounted_ids == frozenset(range(result.window_low + 1, top + 1)) - counted
    assert any(i % 97 == 0 for i in result.uncounted_ids)
    assert len(result.uncounted_ids) > len(range(result.window_low + 1, top + 1)) // 97
