"""The routing clients' ``page_stats`` and ``org_stats`` over two shard servers (docs/scale.md):
a page read from the shard that knows it, an org's rollup added up over both shards."""

from __future__ import annotations

import asyncio
from typing import Any

from campaignstats.actor.actor import ActorConfig
from campaignstats.client.routing import AsyncRoutingClient, RoutingClient
from campaignstats.model import Increment
from campaignstats.shards import Shard, shard_of

from .helpers import Start

ORG = 9_701


def _one_campaign_per_shard() -> tuple[int, int]:
    """Two campaign ids (in no database row), the first owned by shard 0/2, the second by 1/2."""
    ids = range(9_801, 9_900)
    return next(c for c in ids if shard_of(c, 2) == 0), next(c for c in ids if shard_of(c, 2) == 1)


async def test_the_routing_clients_read_a_page_from_its_shard_and_add_up_an_org_over_shards(
    start: Start,
) -> None:
    shard0 = await start(ActorConfig(sync_interval=3600, shard=Shard(0, 2)))
    shard1 = await start(ActorConfig(sync_interval=3600, shard=Shard(1, 2)))
    topology = f"unix://{shard0.unix};unix://{shard1.unix}"
    c0, c1 = _one_campaign_per_shard()
    page0, page1, unknown = 9_901, 9_902, 9_903
    changes = [
        Increment(c0, ORG, "sign", "DE", True, page=page0),
        Increment(c0, ORG, "share", None, False, page=page0),
        Increment(c1, ORG, "sign", "FR", True, page=page1),
        Increment(c1, ORG, "sign", "FR", True, page=page1),
        Increment(c1, ORG + 1, "sign", None, True),  # another org: not in ORG's rollup
    ]
    async with AsyncRoutingClient(topology) as routing:
        routing.increment_many(changes)
        await routing.flush()
        pages = [await routing.page_stats(p) for p in (page0, page1, unknown)]
        org = await routing.org_stats(ORG)
        nobody = await routing.org_stats(ORG + 2)

    assert [(p["campaign_id"], p["supporters"]) for p in pages] == [(c0, 1), (c1, 2), (0, 0)]
    assert pages[0]["action"] == {"sign": 1, "share": 1}
    assert org == {"supporters": 3, "actions": 4, "campaigns": {c0: 1, c1: 2}}
    assert nobody == {"supporters": 0, "actions": 0, "campaigns": {}}

    def blocking() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        with RoutingClient(topology) as routing:
            read = [routing.page_stats(p) for p in (page0, page1, unknown)]
            return read, routing.org_stats(ORG)

    assert await asyncio.to_thread(blocking) == (pages, org)
