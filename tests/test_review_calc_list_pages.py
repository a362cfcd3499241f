"""Adversarial review (rcalc4): a calculation of a list of campaign ids (the hashing supporter
query, split by fingerprint over two connections) gives every page's counts and history of the
reference SQL, whatever the chunk size and the split. tests/test_pages.py's property compares a
list's page timelines with "all"'s only where the list has one (a page missing from the list's
timelines passed)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from campaignstats.db.calculation import calculate
from campaignstats.db.queries import PROCA_QUERIES

from .test_calculation import SmallDatabase, small_databases
from .test_pages import StateReader, check_against_reference, state_of

SPLITS = [
    PROCA_QUERIES,
    replace(PROCA_QUERIES, fingerprint_split=b"\x00"),
    replace(PROCA_QUERIES, fingerprint_split=b"\xff\xff"),
    replace(PROCA_QUERIES, fingerprint_split=None),
]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    database=small_databases,
    chunk_rows=st.integers(1, 4),
    split=st.sampled_from(SPLITS),
    helper=st.booleans(),
)
def test_every_pages_counts_and_history_of_a_list_of_all_campaigns_equal_the_reference_sql(
    module_dsn: str, database: SmallDatabase, chunk_rows: int, split: object, helper: bool
) -> None:
    assert isinstance(split, type(PROCA_QUERIES))

    async def check() -> None:
        conn = await asyncpg.connect(module_dsn)
        helper_conn = await asyncpg.connect(module_dsn) if helper else None
        try:
            await database.load(conn)
            ids = [r[0] for r in await conn.fetch("SELECT id FROM campaigns")]
            result = await calculate(
                conn, ids, helper_conn=helper_conn, chunk_rows=chunk_rows, queries=split
            )
            await check_against_reference(conn, StateReader(state_of(result)))
        finally:
            await conn.close()
            if helper_conn is not None:
                await helper_conn.close()

    asyncio.run(check())
