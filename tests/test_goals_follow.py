"""A milestone reached through the database's replication stream (docs/follow.md): no
increments, no resync; the follower's changes reach the goal, and it fires once."""

from __future__ import annotations

import asyncio

import asyncpg

from .helpers import wait_for
from .test_follower import dsn, following, logical_cluster

__all__ = ["dsn", "logical_cluster"]  # the fixtures, used by name


async def test_a_goal_reached_through_the_follower_fires_once(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        async with following(dsn, 3600.0, slot="t_goals") as (service, _, _):
            await service.set_goals(2, [3, 6])
            watching = await service.subscribe(2)
            for person in range(7):  # one commit each, as Proca writes them
                async with conn.transaction():
                    sid = await conn.fetchval(
                        "INSERT INTO supporters (campaign_id, action_page_id, fingerprint, "
                        "area, processing_status, dupe_rank) VALUES (2, 3, $1, 'DE', 3, 0) "
                        "RETURNING id",
                        person.to_bytes(4, "big"),
                    )
                    await conn.execute(
                        "INSERT INTO actions (supporter_id, action_type, campaign_id, "
                        "action_page_id, processing_status) VALUES ($1, 'register', 2, 3, 3)",
                        sid,
                    )
            fired: list[int] = []
            async with asyncio.timeout(20):
                async for kind, cid, data in watching.feed():
                    if kind == "event":
                        assert cid == 2
                        fired.append(int(data["threshold"]))
                    if fired == [3, 6]:
                        break
            goals = await service.get_goals(2)
            assert goals["reached"] == [3, 6]

            async def all_seven() -> bool:  # the 7th commit may come in a later round
                return (await service.stats(2))["supporters"] == 7

            await wait_for(all_seven)
            assert (await service.info())["goals"]["fired"] == 2
            watching.close()
    finally:
        await conn.close()
