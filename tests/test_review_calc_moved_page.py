"""Adversarial review (rcalc4): a page moved to another campaign counts each person once, in
the bucket of their first counted action on it, whatever campaign their actions' rows name
(docs/design.md, "A page moved to another campaign": "Not exact yet ... would count once per
campaign in the page (reasoned from the query, not tested)")."""

from __future__ import annotations

import asyncpg
import pytest

from campaignstats.db.calculation import calculate

from .test_calculation import load
from .test_pages import StateReader, check_against_reference, state_of


@pytest.mark.xfail(
    strict=True,
    reason="the supporter queries group a page's people by (campaign, page): a person with "
    "counted actions on a moved page under both campaigns counts twice in the page (its "
    "supporters, areas, org and buckets); the fix changes the streaming query's windows (a "
    "second partition by supporter and page) and the read-whole/by-list equivalence, too "
    "large for this review's time and its cost unmeasured",
)
@pytest.mark.parametrize("helper", [False, True])
@pytest.mark.parametrize("scope", ["all", "ids"])
async def test_a_person_acting_on_a_page_before_and_after_its_move_counts_once_on_the_page(
    conn: asyncpg.Connection, module_dsn: str, helper: bool, scope: str
) -> None:
    await load(
        conn,
        statuses=[1, 1],
        pages=[(0, 0, 0), (1, 1, 0)],
        supporters=[(0, 1, "DE", 3, 0)],
        actions=[(0, 0, "register", 3, False), (0, 0, "share", 3, False)],
    )
    # The page moves to campaign 2; the person's second action names the new campaign.
    await conn.execute("UPDATE action_pages SET campaign_id = 2 WHERE id = 1")
    await conn.execute(
        "UPDATE actions SET campaign_id = 2, inserted_at = inserted_at + interval '1 day' "
        "WHERE id = 2"
    )
    helper_conn = await asyncpg.connect(module_dsn) if helper else None
    try:
        result = await calculate(conn, "all" if scope == "all" else [1, 2], helper_conn=helper_conn)
    finally:
        if helper_conn is not None:
            await helper_conn.close()
    page = result.pages[1].stats
    assert page.supporters == 1
    assert page.area == {"DE": 1}
    await check_against_reference(conn, StateReader(state_of(result)))
