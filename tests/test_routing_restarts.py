"""The routing client's journal across reconnections (docs/scale.md, "Failover"): a new
connection to the same server process gives nothing again; a negative ``max_unacked`` is
refused. Real servers in this process, real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

import pytest

from campaignstats.client import StatsClient
from campaignstats.client.routing import AsyncRoutingClient, RoutingClient
from campaignstats.errors import ServerUnavailable, UsageError

from .helpers import Running, Start, wait_for

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


async def test_going_back_to_a_replica_left_for_being_slow_gives_it_nothing_it_had(
    start: Start,
) -> None:
    """Both replicas stall (their event loop, this test's, blocked longer than two calls'
    timeouts): the shard leaves the first for the second, then the second for the first. The
    first is the same process when the client comes back to it: it is not given the journal
    it had applied already."""
    first, second = await start(), await start()
    urls = [f"unix://{first.unix}", f"unix://{second.unix}"]
    stall = threading.Event()

    async def stall_the_servers_once() -> None:
        while not stall.is_set():
            await asyncio.sleep(0.01)
        time.sleep(2.5)  # noqa: ASYNC251 (on purpose: no server answers meanwhile)

    def blocking() -> tuple[int, Any]:
        with RoutingClient(urls, ack_interval=3600, timeout=0.5, connect_timeout=0.5) as routing:
            for _ in range(5):
                routing.increment(LONE, 1, "register", "DE", True)
            deadline = time.monotonic() + 10
            while routing.stats(LONE)["supporters"] != 5 and time.monotonic() < deadline:
                time.sleep(0.02)
            stall.set()
            time.sleep(0.1)
            with contextlib.suppress(ServerUnavailable):
                routing.stats(LONE)  # the first times out, then the second: back to the first
            time.sleep(2.5)  # the stall is over
            routing.flush()
            stats = routing.statistics()
        with StatsClient(urls[0]) as single:
            return int(single.stats(LONE)["supporters"]), stats

    staller = asyncio.create_task(stall_the_servers_once())
    supporters, stats = await asyncio.to_thread(blocking)
    await staller
    assert stats.failovers == 2
    assert stats.replicas == [urls[0]]
    assert supporters == 5, f"the first replica counted {supporters} of 5 increments"
    assert stats.unacked == 0
