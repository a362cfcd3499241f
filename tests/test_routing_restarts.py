"""The routing client's journal across reconnections (docs/scale.md, "Failover"): a new
connection to the same server process gives nothing again; a negative ``max_unacked`` is
refused. Real servers in this process, real sockets."""

from __future__ import annotations

import pytest

from campaignstats.client.routing import AsyncRoutingClient, RoutingClient
from campaignstats.errors import UsageError

from .helpers import Running, wait_for

LONE = 777  # no database row holds it: its counts are the server's memory only


async def test_a_lost_connection_to_the_same_server_gives_the_journal_to_nobody_again(
    server: Running,
) -> None:
    async with AsyncRoutingClient([f"unix://{server.unix}"], ack_interval=3600) as routing:
        for _ in range(5):
            routing.increment(LONE, 1, "register", "DE", True)

        async def applied() -> bool:
            return (await routing.stats(LONE))["supporters"] == 5

        await wait_for(applied)
        single = routing._shards[0].client
        connection = single._conn
        assert connection is not None
        connection.abort()  # a network blip: the server process stays
        await wait_for(lambda: single._conn is None)

        await routing.flush()  # on a new connection, to the same process
        stats = routing.statistics()
        assert (stats.unacked, stats.acknowledged, stats.resent) == (0, 5, 0)
        assert (await routing.stats(LONE))["supporters"] == 5
        assert single.connections == 2


def test_a_negative_max_unacked_is_refused_at_construction() -> None:
    with pytest.raises(UsageError, match="max_unacked must be 0"):
        RoutingClient(["unix:///nowhere.sock"], max_unacked=-1)
