"""Review of action pages and orgs: each test here fails because of a bug (docs/design.md,
"Action pages and orgs"; /work/shared/PROTOCOL.md, ``page_stats`` and ``org_stats``)."""

from __future__ import annotations

import asyncpg

from campaignstats.client.routing import AsyncRoutingClient, RoutingClient
from campaignstats.model import Increment, StatsState

from .helpers import Start, completed, wait_for


def test_increments_naming_ever_new_page_ids_grow_memory_without_any_limit() -> None:
    """A client naming a fresh page id on every increment of one campaign creates a PageStats
    and a Timeline per id, with no limit: max_keys bounds a campaign's action types, orgs and
    areas, max_campaigns the campaigns, but nothing bounds pages (StatsState._page_add). Pages
    of a campaign should be capped like its other keys (max_keys: the increment refused, or at
    least counted in its campaign without creating a page)."""
    state = StatsState(max_keys=100, max_campaigns=10)
    state.clock = lambda: 1_750_000_000.0
    incs = [Increment(1, 7, "sign", None, True, page=1_000 + i) for i in range(5_000)]
    state.apply_many(incs)
    assert len(state.pages) <= state.max_keys
    assert len(state.page_timelines) <= state.max_keys


async def test_the_routing_clients_have_no_page_stats_or_org_stats(start: Start) -> None:
    """docs/scale.md says "The routing clients have the calls of the single ones", but
    AsyncRoutingClient and RoutingClient (client/routing.py) have neither ``page_stats`` nor
    ``org_stats``: a sharded deployment cannot read a page or an org's rollup through them
    (AttributeError), and asking one shard directly gives only that shard's campaigns of the
    org. ``page_stats`` should ask every shard (a page lives on its campaign's owner; the one
    answering a non-zero ``campaign_id`` wins) and ``org_stats`` should sum every shard's
    answer (``supporters``, ``actions``, the union of ``campaigns``)."""
    running = await start()
    url = f"unix://{running.unix}"
    cid, page, org = 9_501, 9_511, 9_521  # in no database row: only increments count
    async with AsyncRoutingClient([url]) as routing:
        routing.increment(cid, org, "sign", "DE", True, page=page)
        await routing.flush()
        assert (await routing.stats(cid))["supporters"] == 1
        assert (await routing.page_stats(page))["supporters"] == 1  # type: ignore[attr-defined]
        assert (await routing.org_stats(org))["supporters"] == 1  # type: ignore[attr-defined]
    assert hasattr(RoutingClient, "page_stats")
    assert hasattr(RoutingClient, "org_stats")


async def test_without_a_messages_table_a_calculation_zeroes_page_messages_but_keeps_the_campaigns(
    start: Start, conn: asyncpg.Connection
) -> None:
    """On a database without a messages table (init-db creates none), the calculation says
    ``messages_counted=False`` and memory is the only record of messages: StatsState.merge
    keeps the campaign's (``truth.messages = before.messages``), but _merge_pages installs the
    result's pages, whose messages are 0, so every page loses its messages at each
    calculation while its campaign keeps them (page_stats["messages"] 0, stats 2). The page's
    messages should be carried over from memory like the campaign's (before the replay)."""
    await conn.execute("DROP TABLE IF EXISTS messages CASCADE")  # a database without one
    await conn.execute(
        "INSERT INTO orgs (id, name) VALUES (61, 'o61');"
        "INSERT INTO campaigns (id, name, status) VALUES (62, 'c62', 1);"
        "INSERT INTO action_pages (id, name, campaign_id, org_id) VALUES (63, 'p63', 62, 61);"
    )
    running = await start()
    service = running.service
    service.increment(62, 61, "sign", None, False, page=63, messages=2)
    await service.flush()
    assert (await service.page_stats(63))["messages"] == 2
    done = await completed(service)
    assert await service.resync("all")
    await wait_for(lambda: _completed_more(service, done))
    assert (await service.stats(62))["messages"] == 2  # the campaign keeps memory's count
    assert (await service.page_stats(63))["messages"] == 2, await service.page_stats(63)


async def _completed_more(service, before: int) -> bool:  # type: ignore[no-untyped-def]
    return await completed(service) > before
