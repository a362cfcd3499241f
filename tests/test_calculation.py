"""The calculation from Postgres equals a brute-force recount of the same rows (recount.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from campaignstats.db.calculation import ACTION_WINDOW, calculate
from campaignstats.db.demo import fill_demo
from campaignstats.model import CalculationResult, CampaignStats

from .conftest import truncate_all
from .recount import recount

NOW = datetime(2025, 6, 1)

pages_st = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 2), st.sampled_from([0, 0, 0, 5, 40])),
    min_size=1,
    max_size=6,
)
supporters_st = st.lists(
    st.tuples(
        st.integers(0, 20),  # page index (mod len)
        st.integers(0, 5),  # fingerprint: a small pool, so people repeat
        st.sampled_from([None, "DE", "FR", "IT"]),
        st.integers(0, 3),  # processing_status
        st.sampled_from([None, 0, 0, 0, 1, 2]),  # dupe_rank
    ),
    max_size=25,
)
actions_st = st.lists(
    st.tuples(
        st.integers(0, 40),  # supporter index (mod len)
        st.integers(0, 20),  # page index (mod len)
        st.sampled_from(["register", "share", "mail2target"]),
        st.integers(0, 5),  # processing_status, 5 = repeat
        st.booleans(),  # testing
    ),
    max_size=50,
)


async def load(
    conn: asyncpg.Connection,
    statuses: list[int],
    pages: list[tuple[int, int, int]],
    supporters: list[tuple[int, int, str | None, int, int | None]],
    actions: list[tuple[int, int, str, int, bool]],
) -> None:
    await truncate_all(conn)
    await conn.executemany(
        "INSERT INTO orgs (id, name) VALUES ($1, $2)", [(i + 1, f"org{i}") for i in range(3)]
    )
    await conn.executemany(
        "INSERT INTO campaigns (id, name, status) VALUES ($1, $2, $3)",
        [(i + 1, f"c{i}", s) for i, s in enumerate(statuses)],
    )
    page_rows = [
        (i + 1, f"p{i}", c % len(statuses) + 1, o + 1, extra)
        for i, (c, o, extra) in enumerate(pages)
    ]
    await conn.executemany(
        "INSERT INTO action_pages (id, name, campaign_id, org_id, extra_supporters) "
        "VALUES ($1, $2, $3, $4, $5)",
        page_rows,
    )
    supporter_rows = []
    for i, (p, fp, area, status, rank) in enumerate(supporters):
        page = page_rows[p % len(page_rows)]
        supporter_rows.append((i + 1, page[2], page[0], bytes([fp]) * 8, area, status, rank, NOW))
    await conn.executemany(
        "INSERT INTO supporters (id, campaign_id, action_page_id, fingerprint, area, "
        "processing_status, dupe_rank, inserted_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        supporter_rows,
    )
    action_rows = []
    for i, (s, p, action_type, status, testing) in enumerate(actions):
        page = page_rows[p % len(page_rows)]
        supporter_id = supporter_rows[s % len(supporter_rows)][0] if supporter_rows else None
        action_rows.append((i + 1, supporter_id, action_type, page[2], page[0], status, testing))
    await conn.executemany(
        "INSERT INTO actions (id, supporter_id, action_type, campaign_id, action_page_id, "
        "processing_status, testing) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        action_rows,
    )


# Seconds back from now for action id i: a spread over minutes, hours, days and months.
SPREAD = """
UPDATE actions SET inserted_at = (now() AT TIME ZONE 'UTC') - make_interval(secs =>
    CASE id % 4 WHEN 0 THEN (id * $1) % 3600
                WHEN 1 THEN (id * $1) % 172800
                WHEN 2 THEN (id * $1) % 8000000
                ELSE (id * $1) % 60000000 END)
"""


@dataclass(frozen=True)
class SmallDatabase:
    """A small database drawn whole: campaigns of these statuses, their pages, supporters and
    actions (see :func:`load`), the actions' times spread by ``spread`` (SPREAD)."""

    statuses: list[int]
    pages: list[tuple[int, int, int]]
    supporters: list[tuple[int, int, str | None, int, int | None]]
    actions: list[tuple[int, int, str, int, bool]]
    spread: int

    async def load(self, conn: asyncpg.Connection) -> None:
        await load(conn, self.statuses, self.pages, self.supporters, self.actions)
        await conn.execute(SPREAD, self.spread)


small_databases = st.builds(
    SmallDatabase,
    statuses=st.lists(st.integers(0, 3), min_size=1, max_size=4),
    pages=pages_st,
    supporters=supporters_st,
    actions=actions_st,
    spread=st.integers(1, 100_000),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    statuses=st.lists(st.integers(0, 3), min_size=1, max_size=4),
    pages=pages_st,
    supporters=supporters_st,
    actions=actions_st,
)
def test_the_calculation_equals_a_brute_force_recount_of_any_small_database(
    module_dsn: str,
    statuses: list[int],
    pages: list[tuple[int, int, int]],
    supporters: list[tuple[int, int, str | None, int, int | None]],
    actions: list[tuple[int, int, str, int, bool]],
) -> None:
    async def check() -> None:
        conn = await asyncpg.connect(module_dsn)
        try:
            await load(conn, statuses, pages, supporters, actions)
            expected = await recount(conn)
            result = await calculate(conn, "all")
            assert result.campaigns == expected
            assert result.max_action_id == len(actions)
            assert result.uncounted_ids == await uncounted_by_sql(conn, result)
            live = [i + 1 for i, s in enumerate(statuses) if s == 1]
            result = await calculate(conn, "live")
            assert result.campaigns == await recount(conn, live)
            result = await calculate(conn, [1, 3, 99])
            assert result.campaigns == await recount(conn, [1, 3])
        finally:
            await conn.close()

    # Hypothesis drives a plain function; each example runs on its own short event loop.
    asyncio.run(check())


async def uncounted_by_sql(conn: asyncpg.Connection, result: CalculationResult) -> frozenset[int]:
    """The ids of the window the calculation should call uncounted, straight from the tables:
    every id in it but those of counted (accepted, not testing) actions."""
    low = max(0, result.max_action_id - ACTION_WINDOW)
    counted = await conn.fetch(
        "SELECT id FROM actions WHERE id > $1 AND processing_status IN (3, 4) AND NOT testing",
        low,
    )
    return frozenset(range(low + 1, result.max_action_id + 1)) - {r[0] for r in counted}


@pytest.fixture(scope="module")
async def demo_db(module_dsn: str) -> str:
    conn = await asyncpg.connect(module_dsn)
    try:
        await truncate_all(conn)
        await fill_demo(conn, actions=50_000, seed=7, progress=False)
    finally:
        await conn.close()
    return module_dsn


async def test_the_calculation_equals_a_brute_force_recount_of_a_50000_action_demo(
    demo_db: str,
) -> None:
    conn = await asyncpg.connect(demo_db)
    try:
        expected = await recount(conn)
        result = await calculate(conn, "all")
        assert result.campaigns == expected
        assert result.max_action_id == await conn.fetchval("SELECT max(id) FROM actions")
        # the window's uncounted ids, read as runs (rejected, pending and testing actions)
        assert result.uncounted_ids == await uncounted_by_sql(conn, result)
        assert result.uncounted_ids
        # The demo holds every case the rules care about; check they are really there.
        facts = await conn.fetchrow(
            """SELECT
                 (SELECT count(*) FROM supporters WHERE dupe_rank IS NULL) AS null_rank,
                 (SELECT count(*) FROM supporters WHERE dupe_rank > 0) AS repeated,
                 (SELECT count(DISTINCT processing_status) FROM supporters) AS s_statuses,
                 (SELECT count(DISTINCT processing_status) FROM actions) AS a_statuses,
                 (SELECT count(*) FROM actions WHERE testing) AS testing,
                 (SELECT count(*) FROM supporters WHERE area IS NULL) AS null_area,
                 (SELECT count(*) FROM campaigns c WHERE NOT EXISTS
                    (SELECT 1 FROM actions a WHERE a.campaign_id = c.id)) AS without_actions,
                 (SELECT count(*) FROM action_pages p WHERE extra_supporters > 0 AND NOT EXISTS
                    (SELECT 1 FROM actions a JOIN action_pages q ON q.id = a.action_page_id
                     WHERE q.org_id = p.org_id)) AS offline_only_org_pages"""
        )
        assert all(v > 0 for v in facts.values()), dict(facts)
        assert facts["s_statuses"] == 4
        assert facts["a_statuses"] == 6
        live = await conn.fetch("SELECT id FROM campaigns WHERE status = 1")
        result = await calculate(conn, "live")
        assert result.campaigns == await recount(conn, [r[0] for r in live])
        assert result.kind == "live"
    finally:
        await conn.close()


async def test_an_org_with_only_extra_supporters_is_counted_in_org_and_supporters(
    demo_db: str,
) -> None:
    conn = await asyncpg.connect(demo_db)
    try:
        row = await conn.fetchrow(
            "SELECT campaign_id, org_id, sum(extra_supporters) AS extra FROM action_pages "
            "WHERE name LIKE '%/offline' GROUP BY 1, 2 LIMIT 1"
        )
        result = await calculate(conn, [row["campaign_id"]])
        stats: CampaignStats = result.campaigns[row["campaign_id"]]
        assert stats.org[row["org_id"]] == row["extra"]
        assert stats.extra_supporters >= row["extra"]
        assert stats.supporters >= stats.extra_supporters
    finally:
        await conn.close()


async def test_a_statement_timeout_fails_the_calculation_with_a_clear_error(demo_db: str) -> None:
    from campaignstats.errors import CalculationError

    conn = await asyncpg.connect(demo_db)
    try:
        with pytest.raises(CalculationError, match=r"QueryCanceledError|statement timeout"):
            await calculate(conn, "all", statement_timeout=0.001)
        # The connection is still usable afterwards: the transaction was rolled back.
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
