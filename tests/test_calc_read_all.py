"""A long list of campaigns (``live``, a shard's) read as ``all`` is read, the other campaigns'
rows dropped as they are folded (``READ_ALL_SHARE`` in campaignstats/db/calculation.py): the
result must be the one the statements' own filter gives, campaigns, pages and buckets alike.

Each test runs the same calculation both ways (``read_all_share`` 0: always read everything;
infinity: always give the statements the list) on one connection and on two, and compares
them with each other and with the brute-force recount (tests/recount.py).
"""

from __future__ import annotations

import math
import time
from typing import Any

import asyncpg
import pytest

from campaignstats.db.calculation import calculate
from campaignstats.db.demo import fill_demo
from campaignstats.db.schema import init_db
from campaignstats.model import CalculationResult, Scope
from campaignstats.shards import Shard, ShardFilter

from .conftest import truncate_all
from .recount import recount
from .test_time_calculation import views

READ_ALL = 0.0
READ_LISTED = math.inf


def summary(result: CalculationResult, now: float) -> dict[str, Any]:
    """Everything a calculation found (but its timing)."""
    return {
        "campaigns": result.campaigns,
        "pages": result.pages,
        "timelines": views(result.timelines, now),
        "page_timelines": views(result.page_timelines, now),
        "max_action_id": result.max_action_id,
        "uncounted_ids": result.uncounted_ids,
    }


async def both_ways(dsn: str, scope: Scope, **kwargs: Any) -> list[dict[str, Any]]:
    """The calculation of ``scope`` read both ways, on one connection and on two."""
    conn = await asyncpg.connect(dsn)
    helper = await asyncpg.connect(dsn)
    try:
        now = time.time()
        out = []
        for share in (READ_ALL, READ_LISTED):
            for helper_conn in (None, helper):
                result = await calculate(
                    conn, scope, helper_conn=helper_conn, read_all_share=share, **kwargs
                )
                out.append(summary(result, now))
        return out
    finally:
        await conn.close()
        await helper.close()


@pytest.fixture(scope="module")
async def demo_db(module_dsn: str) -> str:
    conn = await asyncpg.connect(module_dsn)
    try:
        await truncate_all(conn)
        await fill_demo(conn, actions=30_000, seed=11, progress=False)
    finally:
        await conn.close()
    return module_dsn


async def test_a_live_calculation_read_whole_and_filtered_while_folding_equals_the_filtered_one(
    demo_db: str,
) -> None:
    conn = await asyncpg.connect(demo_db)
    try:
        live = [r[0] for r in await conn.fetch("SELECT id FROM campaigns WHERE status = 1")]
        every = await conn.fetchval("SELECT count(*) FROM campaigns")
        expected = await recount(conn, live)
    finally:
        await conn.close()
    assert 0 < len(live) < every  # a list indeed, and some campaigns left out
    results = await both_ways(demo_db, "live")
    assert all(r == results[0] for r in results[1:])
    assert results[0]["campaigns"] == expected
    assert results[0]["pages"]
    assert results[0]["page_timelines"]


async def test_a_shard_calculation_read_whole_and_filtered_while_folding_equals_the_filtered_one(
    demo_db: str,
) -> None:
    conn = await asyncpg.connect(demo_db)
    try:
        ids = [r[0] for r in await conn.fetch("SELECT id FROM campaigns")]
    finally:
        await conn.close()
    for k in range(2):
        owns = ShardFilter(Shard(k, 2)).owns
        results = await both_ways(demo_db, "all", owns=owns)
        assert all(r == results[0] for r in results[1:])
        assert set(results[0]["campaigns"]) == {c for c in ids if owns(c)}
        conn = await asyncpg.connect(demo_db)
        try:
            assert results[0]["campaigns"] == await recount(conn, sorted(results[0]["campaigns"]))
        finally:
            await conn.close()


async def test_actions_of_a_campaign_left_out_are_dropped_even_on_a_page_of_a_listed_campaign(
    module_dsn: str,
) -> None:
    """Page 5 moved from campaign 1 (not live) to campaign 2 (live): its action still says
    campaign 1, so the statements' filter leaves it out of a live calculation; reading every
    campaign must leave it out too (the row says campaign 1), though the page is counted."""
    conn = await asyncpg.connect(module_dsn)
    try:
        await init_db(conn)
        await truncate_all(conn)
        await conn.execute(
            "INSERT INTO orgs (id, name) VALUES (1, 'o1');"
            "INSERT INTO campaigns (id, name, status) VALUES (1, 'c1', 0), (2, 'c2', 1);"
            "INSERT INTO action_pages (id, name, campaign_id, org_id) "
            "VALUES (5, 'p5', 1, 1), (6, 'p6', 2, 1);"
            "INSERT INTO supporters (id, campaign_id, action_page_id, fingerprint, area, "
            "processing_status, dupe_rank) VALUES (1, 1, 5, 'f', 'DE', 3, 0), "
            "(2, 2, 5, 'g', 'FR', 3, 0), (3, 2, 6, 'g', 'FR', 3, 0);"
            "INSERT INTO actions (supporter_id, action_type, campaign_id, action_page_id, "
            "processing_status) VALUES (1, 'register', 1, 5, 3), (2, 'share', 2, 5, 3), "
            "(3, 'register', 2, 6, 4);"
            "UPDATE action_pages SET campaign_id = 2 WHERE id = 5;"
        )
    finally:
        await conn.close()
    results = await both_ways(module_dsn, "live")
    assert all(r == results[0] for r in results[1:])
    page = results[0]["pages"][5].stats
    assert (page.supporters, page.action, page.area) == (1, {"share": 1}, {"FR": 1})
    campaign = results[0]["campaigns"][2]
    assert (campaign.supporters, campaign.action) == (1, {"share": 1, "register": 1})
    assert set(results[0]["campaigns"]) == {2}
