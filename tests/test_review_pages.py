"""Review of action pages and orgs: each test here fails because of a bug (docs/design.md,
"Action pages and orgs"; /work/shared/PROTOCOL.md, ``page_stats`` and ``org_stats``)."""

from __future__ import annotations

import asyncpg

from campaignstats.client.routing import AsyncRoutingClient, RoutingClient
from campaignstats.db.calculation import calculate
from campaignstats.db.schema import init_db
from campaignstats.model import Increment, StatsState

from .conftest import truncate_all
from .helpers import Start, completed, wait_for
from .test_pages import StateReader, check_against_reference, state_of


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
    """On a database without a messages table (a Proca schema without it), the calculation says
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


def test_org_campaigns_keeps_every_forgotten_campaign_forever() -> None:
    """``org_campaigns`` (org -> campaigns that had it) only grows: forget_absent deletes a
    campaign, its pages and timeline, but leaves the campaign in ``org_campaigns`` of each of
    its orgs (and the org's key). Increments naming campaigns and orgs that are not in the
    database are forgotten at every calculation, yet each round leaves max_campaigns x
    max_keys entries behind for good: memory grows without bound under the limits that are
    meant to bound it, and every org_stats walks the dead campaigns. forget_absent should take
    a forgotten campaign out of ``org_campaigns`` (dropping an org left with none)."""
    from campaignstats.model import CalculationResult, TxSnapshot

    state = StatsState(max_keys=10, max_campaigns=10)
    state.clock = lambda: 1_750_000_000.0
    for r in range(20):
        state.apply_many(
            [
                Increment(1_000 * r + c, 100_000 * r + 10 * c + o, "sign", None, True)
                for c in range(10)
                for o in range(10)
            ]
        )
        state.start_journal()  # a calculation that finds none of these campaigns
        result = CalculationResult("all", {}, 10, snapshot=TxSnapshot(400, 400))
        state.merge(result)
        assert len(state.forget_absent(result)) == 10
        state.stop_journal()
    assert state.campaigns == {}
    entries = sum(len(cids) for cids in state.org_campaigns.as_dict().values())
    assert entries == 0, f"{entries} entries for {len(state.org_campaigns)} orgs, no campaign"


async def test_a_page_moved_to_another_campaign_loses_its_actions_in_the_calculation(
    conn: asyncpg.Connection,
) -> None:
    """After ``UPDATE action_pages SET campaign_id`` (a page moved to another campaign), the
    page's existing actions still say their old campaign. The calculation counts a row for a
    page only when the row's campaign is the page's (``_Build.page``: ``where[0] != cid`` gives
    None), so page 5 reads all zeros (and its org's ``actions`` 0), while the reference SQL of
    tests/test_pages.py, the page's counted actions whatever their campaign column, says one
    supporter and one action. The page should count the actions made on it (``action_page_id``)
    as the reference does, or the definition and docs should say otherwise."""
    await init_db(conn)  # the messages table, should an earlier test have dropped it
    await truncate_all(conn)
    await conn.execute(
        "INSERT INTO orgs (id, name) VALUES (1, 'o1');"
        "INSERT INTO campaigns (id, name, status) VALUES (1, 'c1', 1), (2, 'c2', 1);"
        "INSERT INTO action_pages (id, name, campaign_id, org_id) VALUES (5, 'p5', 1, 1);"
        "INSERT INTO supporters (id, campaign_id, action_page_id, fingerprint, area, "
        "processing_status, dupe_rank) VALUES (1, 1, 5, 'f', 'DE', 3, 0);"
        "INSERT INTO actions (supporter_id, action_type, campaign_id, action_page_id, "
        "processing_status) VALUES (1, 'register', 1, 5, 3);"
        "UPDATE action_pages SET campaign_id = 2 WHERE id = 5;"
    )
    state = state_of(await calculate(conn, "all"))
    await check_against_reference(conn, StateReader(state))
