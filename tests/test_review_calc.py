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
