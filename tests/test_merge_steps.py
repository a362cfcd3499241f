"""The actor merges a calculation's result a few campaigns at a time, within ``merge_budget``
seconds per step, and serves what arrives between two steps (docs/design.md, "The actor"). The
merge stays exact: changes applied between steps land in campaigns merged before or after them,
and the journal keeps the not-yet-merged ones exact.
"""

from __future__ import annotations

import asyncpg
import pytest

from campaignstats.actor.actor import MERGE_GROUP, ActorConfig
from campaignstats.db.source import PostgresSource
from campaignstats.errors import UsageError
from campaignstats.service import StatsService

from .helpers import completed, loaded, memory_of, wait_for
from .recount import recount
from .test_pages import SLOW, Backend, check_against_reference, demo_database


async def test_a_merge_in_steps_of_a_few_campaigns_with_signups_between_them_stays_exact(
    conn: asyncpg.Connection, module_dsn: str
) -> None:
    await demo_database(conn)
    campaigns = await conn.fetchval("SELECT count(*) FROM campaigns")
    assert campaigns > MERGE_GROUP  # two steps at least
    # A budget no step can meet: every step merges MERGE_GROUP campaigns, then yields.
    config = ActorConfig(sync_interval=3600, merge_budget=1e-9)
    service = StatsService(PostgresSource(module_dsn, queries=SLOW), config)
    await service.start()
    try:
        await wait_for(lambda: loaded(service))
        backend = Backend(conn, service)
        targets = [
            tuple(r)
            for r in await conn.fetch(
                "SELECT campaign_id, id, org_id FROM action_pages ORDER BY campaign_id, id"
            )
        ]
        done = await completed(service)
        assert await service.resync("all")
        # People sign up while the calculation runs and while its result is merged, until it is
        # (bounded: the calculation sleeps 2 s in its snapshot).
        signed = 0
        while await completed(service) == done and signed < 2_000:
            cid, page, org = targets[signed % len(targets)]
            await backend.sign(cid, page, org, ["DE", None, "FR"][signed % 3])
            signed += 1
        await wait_for(lambda: _completed_more(service, done))
        await service.flush()
        info = await service.info()
        assert info["last_calculation"]["campaigns"] == campaigns
        ids = [r[0] for r in await conn.fetch("SELECT id FROM campaigns")]
        assert await memory_of(service, ids) == await recount(conn)
        await check_against_reference(conn, service)
    finally:
        await service.stop()


async def _completed_more(service: StatsService, before: int) -> bool:
    return await completed(service) > before


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_a_merge_budget_that_is_not_a_positive_number_of_seconds_is_refused(bad: float) -> None:
    with pytest.raises(UsageError, match="merge_budget must be a positive number of seconds"):
        ActorConfig(merge_budget=bad)
