"""The supporters' buckets of a calculation are summed as they arrive and filed with the action
buckets, oldest first (docs/design.md, "Reading the rows"): a timeline with people and no
counted action (only testing ones), and buckets arriving in any order, give what a row-by-row
recount gives."""

from __future__ import annotations

import time

import asyncpg
import pytest

from campaignstats.db.calculation import calculate

from .recount import recount_timelines
from .test_calculation import load
from .test_time_calculation import views

# Seconds back from now per action id: minutes, hours and days apart, ids not in time order.
AGES = {1: 86_400 * 200, 2: 600, 3: 86_400 * 3, 4: 120, 5: 86_400 * 40, 6: 7_200, 7: 300}


async def _database(conn: asyncpg.Connection) -> None:
    # Campaign 2 and page 3 have only a testing action: people in time, no actions.
    await load(
        conn,
        statuses=[1, 1],
        pages=[(0, 0, 0), (0, 1, 0), (1, 2, 0)],
        supporters=[(0, 1, "DE", 3, 0), (0, 2, None, 3, 0), (0, 3, "FR", 3, 0), (2, 4, None, 3, 0)],
        actions=[
            (0, 0, "register", 3, False),
            (1, 0, "register", 4, False),
            (2, 0, "share", 3, False),
            (0, 0, "share", 3, False),
            (3, 2, "register", 3, True),
            (1, 1, "register", 3, True),
            (2, 0, "register", 3, False),
        ],
    )
    await conn.executemany(
        "UPDATE actions SET inserted_at = (now() AT TIME ZONE 'UTC') "
        "- make_interval(secs => $2) WHERE id = $1",
        list(AGES.items()),
    )


@pytest.mark.parametrize("helper", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 5_000])
async def test_people_in_time_without_counted_actions_and_buckets_in_any_order_equal_a_recount(
    conn: asyncpg.Connection, module_dsn: str, helper: bool, chunk_rows: int
) -> None:
    await _database(conn)
    expected = await recount_timelines(conn)
    helper_conn = await asyncpg.connect(module_dsn) if helper else None
    try:
        now = time.time()
        result = await calculate(conn, "all", helper_conn=helper_conn, chunk_rows=chunk_rows)
    finally:
        if helper_conn is not None:
            await helper_conn.close()
    assert views(result.timelines, now) == views(expected, now)
    # Campaign 2: one person, in the bucket of their testing action (40 days ago), no action.
    campaign2 = result.timelines[2].views(now)
    assert [(s, a) for _, s, a in campaign2["day"]] == [(1, 0)]
    # Page 3 (campaign 2's) likewise; page 2 holds only the second supporter's testing
    # action: that person counts there (their first counted action on the page), no action.
    page3 = result.page_timelines[3].views(now)
    assert sum(s for _, s, _ in page3["day"]) == 1
    assert sum(a for _, _, a in page3["day"]) == 0
    page2 = result.page_timelines[2].views(now)
    assert sum(s for _, s, _ in page2["day"]) == 1
    assert sum(a for _, _, a in page2["day"]) == 0
    # Page 1: three people, five actions, over days, hours and minutes.
    page1 = result.page_timelines[1].views(now)
    assert sum(s for _, s, _ in page1["day"]) == 3
    assert sum(a for _, _, a in page1["day"]) == 5
