"""Buckets in time from the calculation equal a row-by-row recount (docs/design.md, "Time").

Generated databases spread their actions over the last hour, the last two days and months
back, with repeat supporters (one fingerprint on several rows and actions), rejected and testing
actions and rejected supporters. The calculation runs on a connection whose session time zone is
far from UTC: ``inserted_at`` holds UTC whatever the session says.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from campaignstats.db.calculation import calculate
from campaignstats.db.demo import fill_demo
from campaignstats.timeline import Timeline

from .conftest import truncate_all
from .recount import recount_timelines
from .test_calculation import SPREAD, SmallDatabase, small_databases


def views(timelines: dict[int, Timeline], now: float) -> dict[int, object]:
    return {
        cid: (t.views(now), t.last_action)
        for cid, t in timelines.items()
        if any(t.views(now).values())
    }


async def _check(dsn: str, helper: bool) -> dict[int, Timeline]:
    # Far from UTC, with DST: a session time zone must change nothing.
    settings_ = {"TimeZone": "America/Santiago"}
    conn = await asyncpg.connect(dsn, server_settings=settings_)
    helper_conn = await asyncpg.connect(dsn, server_settings=settings_) if helper else None
    try:
        expected = await recount_timelines(conn)
        now = time.time()
        result = await calculate(conn, "all", helper_conn=helper_conn)
        assert views(result.timelines, now) == views(expected, now)
        some = [*sorted(expected)[:2], 999]
        result = await calculate(conn, some)
        assert views(result.timelines, now) == views(
            {c: t for c, t in expected.items() if c in some}, now
        )
    finally:
        await conn.close()
        if helper_conn is not None:
            await helper_conn.close()
    return expected


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(database=small_databases, helper=st.booleans())
def test_buckets_equal_a_recount_of_any_small_database_spread_over_months(
    module_dsn: str, database: SmallDatabase, helper: bool
) -> None:
    async def check() -> None:
        conn = await asyncpg.connect(module_dsn)
        try:
            await database.load(conn)
        finally:
            await conn.close()
        await _check(module_dsn, helper)

    asyncio.run(check())


async def test_buckets_equal_a_recount_of_a_demo_database_spread_over_months(
    module_dsn: str,
) -> None:
    conn = await asyncpg.connect(module_dsn)
    try:
        await truncate_all(conn)
        await fill_demo(conn, actions=20_000, seed=3, progress=False)
        await conn.execute(SPREAD, 7919)
        repeat = await conn.fetchval(
            "SELECT count(*) FROM (SELECT fingerprint FROM supporters GROUP BY 1 "
            "HAVING count(*) > 1) x"
        )
        assert repeat > 0
    finally:
        await conn.close()
    await _check(module_dsn, helper=False)
    expected = await _check(module_dsn, helper=True)
    now = time.time()
    # Every unit is exercised, with people counted in buckets of their own.
    for unit in ("minute", "hour", "day"):
        rows = [row for t in expected.values() for row in t.views(now)[unit]]
        assert len(rows) > 100, unit
        assert any(s for _, s, _ in rows), unit
        assert any(s == 0 for _, s, _ in rows), unit
