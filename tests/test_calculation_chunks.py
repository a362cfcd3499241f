"""The calculation reads its big results a chunk at a time and folds them as they arrive, on two
connections that do not wait for each other between statements (docs/design.md, "The
calculation's split"). Whatever the chunk size and however the work is split, the result equals
the reference: the brute-force recount (tests/recount.py) and the pages' reference SQL
(tests/test_pages.py).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from campaignstats.db.calculation import calculate
from campaignstats.db.queries import PROCA_QUERIES
from campaignstats.errors import CalculationError

from .recount import recount, recount_timelines
from .test_calculation import SmallDatabase, small_databases
from .test_pages import StateReader, check_against_reference, demo_database, state_of
from .test_time_calculation import views

#: every way the supporter work can be shared by the two connections: split by supporter id
#: (the middle, all on the helper, all on the main connection), not split (the main connection
#: counts everyone, the helper reads the action buckets), and for a list of ids not split by
#: fingerprint either
SPLITS = [
    PROCA_QUERIES,
    replace(PROCA_QUERIES, supporter_split=0.0),
    replace(PROCA_QUERIES, supporter_split=1.0),
    replace(PROCA_QUERIES, supporter_split=None, fingerprint_split=None),
]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    database=small_databases,
    chunk_rows=st.integers(1, 4),
    split=st.sampled_from(SPLITS),
)
def test_counts_and_buckets_read_a_row_or_a_few_at_a_time_equal_a_recount_of_any_small_database(
    module_dsn: str, database: SmallDatabase, chunk_rows: int, split: object
) -> None:
    """Small databases share fingerprints between supporter rows (a pool of six), so the shared
    people's rows (kept until both halves have come) and the partial counts (folded chunk by
    chunk) are both exercised, with chunk boundaries anywhere."""
    queries = PROCA_QUERIES if not isinstance(split, type(PROCA_QUERIES)) else split

    async def check() -> None:
        conn = await asyncpg.connect(module_dsn)
        helper = await asyncpg.connect(module_dsn)
        try:
            await database.load(conn)
            now = time.time()
            expected_timelines = await recount_timelines(conn)
            for scope, covered in (("all", None), ([1, 3, 99], [1, 3])):
                result = await calculate(
                    conn, scope, helper_conn=helper, chunk_rows=chunk_rows, queries=queries
                )
                assert result.campaigns == await recount(conn, covered)
                expected = {
                    c: t for c, t in expected_timelines.items() if covered is None or c in covered
                }
                assert views(result.timelines, now) == views(expected, now)
        finally:
            await conn.close()
            await helper.close()

    asyncio.run(check())


@pytest.mark.parametrize("queries", SPLITS, ids=["middle", "all-helper", "all-main", "unsplit"])
async def test_pages_and_history_of_a_demo_read_seven_rows_at_a_time_equal_the_reference_sql(
    conn: asyncpg.Connection, module_dsn: str, queries: object
) -> None:
    """Thousands of chunks of action buckets and supporter rows, folded as they come, give the
    pages, orgs and page histories of the reference SQL, and the campaigns' buckets of the
    recount, however the two connections share the work."""
    assert isinstance(queries, type(PROCA_QUERIES))
    await demo_database(conn)
    helper = await asyncpg.connect(module_dsn)
    try:
        now = time.time()
        result = await calculate(conn, "all", helper_conn=helper, chunk_rows=7, queries=queries)
        assert result.rows > 7 * 1_000  # many chunks indeed
    finally:
        await helper.close()
    assert result.campaigns == await recount(conn)
    assert views(result.timelines, now) == views(await recount_timelines(conn), now)
    await check_against_reference(conn, StateReader(state_of(result)))


async def test_a_failing_first_statement_on_the_helper_fails_the_calculation_and_nothing_waits(
    conn: asyncpg.Connection, module_dsn: str
) -> None:
    """The main connection's half waits for what the helper reads first (the pages and the
    shared fingerprints): when the helper fails there, the calculation ends with the helper's
    error instead of waiting for ever, and both connections are usable afterwards."""
    await demo_database(conn)
    broken = replace(PROCA_QUERIES, page_orgs="SELECT id, campaign_id, org_id FROM no_such_table")
    helper = await asyncpg.connect(module_dsn)
    try:
        with pytest.raises(CalculationError, match=r"UndefinedTableError.*no_such_table"):
            # The bound only turns a hang into a failure; a calculation here takes about 1 s.
            await asyncio.wait_for(calculate(conn, "all", helper_conn=helper, queries=broken), 60)
        result = await calculate(conn, "all", helper_conn=helper)
        assert result.campaigns == await recount(conn)
    finally:
        await helper.close()


async def test_a_chunk_size_below_one_row_is_refused_before_any_statement(
    conn: asyncpg.Connection,
) -> None:
    with pytest.raises(ValueError, match="chunk_rows must be at least 1, not 0"):
        await calculate(conn, "all", chunk_rows=0)
