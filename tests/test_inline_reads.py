"""Queries answered inline (docs/design.md, "Queries inline"): the socket server answers a
read-only query in its read callback, through the actor's read door, when nothing of the
connection's own is still queued. No timing here (speed is bench/latency.py's).

- A query answered inline never overtakes its own connection's earlier increments, however the
  byte stream is cut into reads.
- A query between two slices of another connection's large batch sees a consistent state: a
  prefix of that batch, each increment whole.
- Every read-only op gives the same answer, and every error the same reply, inline as through
  the actor's mailbox (two servers in front of one service, one of them with inline reads off).
- The door itself: only read-only requests, and closed while the actor does not serve.

No Postgres: the service runs on a source that finds an empty database.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest

from campaignstats.actor.actor import NOT_NOW, ActorConfig
from campaignstats.client import AsyncStatsClient, StatsClient
from campaignstats.errors import UsageError
from campaignstats.model import Increment
from campaignstats.requests import Flush, Increments, Info, Stats, StatsMany
from campaignstats.server import ServerConfig, StatsServer
from campaignstats.service import StatsService
from campaignstats.shards import Shard

from .helpers import Raw
from .test_perf_paths import EmptySource, started

pytestmark = pytest.mark.timeout(120)


@contextlib.asynccontextmanager
async def fronts(
    service: StatsService, **config: Any
) -> AsyncIterator[tuple[StatsServer, StatsServer]]:
    """Two servers in front of one service: queries answered inline, and through the mailbox."""
    inline = StatsServer(service, ServerConfig(host="127.0.0.1", port=0, **config))
    mailbox = StatsServer(
        service, ServerConfig(host="127.0.0.1", port=0, inline_reads=False, **config)
    )
    await inline.start()
    await mailbox.start()
    try:
        yield inline, mailbox
    finally:
        await inline.close(5)
        await mailbox.close(5)


def packed(*messages: Any) -> bytes:
    return b"".join(msgpack.packb(m) for m in messages)


def wire_inc(cid: int, *, new: bool = True, area: str = "DE", org: int = 3) -> list[Any]:
    return [cid, org, "register", area, new]


# -- ordering: never before the connection's own writes -------------------------------------------


def ordering_stream(cid: int) -> tuple[bytes, dict[int, int]]:
    """Increments of campaign ``cid`` (single frames, batches larger than a slice, decrements)
    with ``stats`` calls between them; and the actions each call must see, by request id."""
    parts: list[Any] = []
    expected: dict[int, int] = {}
    total = 0
    rid = 0

    def query() -> None:
        nonlocal rid
        rid += 1
        parts.append(["stats", rid, cid])
        expected[rid] = total

    query()
    for k in range(1, 4):
        parts.append(["inc", *wire_inc(cid)])
        total += 1
        query()
        parts.append(["incs", [wire_inc(cid, new=False)] * (5 * k)])  # over apply_slice (3)
        total += 5 * k
        query()
        query()  # right behind a query: the first one's place is kept
    parts.append(["decs", [wire_inc(cid, new=False)] * 4])
    total -= 4
    query()
    parts.append(["incs", [wire_inc(cid, new=False)] * 7])
    parts.append(["inc", *wire_inc(cid, new=False)])
    total += 8
    query()
    return packed(*parts), expected


async def play_ordering(port: int, cid: int, cuts: list[int]) -> None:
    """Send the stream cut at ``cuts`` (one write each, the loop turning in between) and check
    that each ``stats`` reply counts exactly the increments sent before it."""
    stream, expected = ordering_stream(cid)
    conn = await Raw.tcp(port)
    try:
        start = 0
        for end in [*cuts, len(stream)]:
            await conn.send_bytes(stream[start:end])
            start = end
            await asyncio.sleep(0)
        replies = await conn.recv(len(expected), within=20)
    finally:
        await conn.close()
    assert [r[1] for r in replies] == sorted(expected)  # in call order
    for reply in replies:
        assert reply[0] == "ok", reply
        assert reply[2]["action"].get("register", 0) == expected[reply[1]], (cuts, reply)


async def test_an_inline_query_never_overtakes_its_connections_increments_however_cut() -> None:
    service = await started(apply_slice=3)
    try:
        cid = 0
        stream, _ = ordering_stream(1)
        for read_size in (1, 2, 5, 13, 64, 32 << 10):
            async with fronts(service, read_size=read_size) as (server, _):
                assert server.port is not None
                cid += 1
                await play_ordering(server.port, cid, [])  # one write, read in pieces
                if read_size == 32 << 10:
                    # Every place a write may end, and two writes cut at every other place.
                    for cut in range(1, len(stream)):
                        cid += 1
                        await play_ordering(server.port, cid, [cut])
                    for cut in range(1, len(stream) - 9, 9):
                        cid += 1
                        await play_ordering(server.port, cid, [cut, cut + 4])
                assert server.counters.reads_inline > 0  # the inline path was taken
    finally:
        await service.stop(5)


# -- between the slices of another connection's batch ---------------------------------------------


def consistent(stats: dict[str, Any]) -> int:
    """The actions of a STATS in which each increment of the batch was applied whole."""
    actions = stats["action"].get("register", 0)
    assert stats["supporters"] == actions
    assert stats["area"].get("DE", 0) == actions
    assert sum(stats["org"].values()) == actions
    return int(actions)


async def test_a_query_between_slices_of_another_connections_batch_sees_a_whole_prefix() -> None:
    service = await started(apply_slice=1)
    try:
        async with fronts(service) as (server, _):
            assert server.port is not None
            writer, reader = await Raw.tcp(server.port), await Raw.tcp(server.port)
            try:
                n = 4_000
                batch = [wire_inc(1 + i % 2, org=1 + i % 5) for i in range(n)]
                await writer.send(["incs", batch])
                mailbox = service.mailbox
                for _ in range(10_000):  # until the actor is between two slices of it
                    if mailbox.partial:
                        break
                    await asyncio.sleep(0)
                assert mailbox.partial
                before = server.counters.reads_inline
                seen: list[tuple[int, int]] = []
                for rid in range(1, 11):
                    reply = await reader.call("stats_many", rid, [1, 2])
                    assert reply[:2] == ["ok", rid]
                    one, two = consistent(reply[2][1]), consistent(reply[2][2])
                    assert one - two in (0, 1)  # a prefix of the batch: 1, 2, 1, 2...
                    seen.append((one, two))
                assert server.counters.reads_inline == before + 10
                assert seen == sorted(seen)
                assert 0 < sum(seen[0]) < n  # served in the middle of the batch
                assert (await writer.call("stats", 1, 1))[2]["supporters"] == n // 2
            finally:
                await writer.close()
                await reader.close()
    finally:
        await service.stop(5)


# -- the same answers and errors as through the actor ---------------------------------------------


def rich_increments() -> list[Any]:
    now = time.time()
    out: list[Any] = []
    for i in range(60):
        out.append(
            {
                "campaign": 1 + i % 3,
                "org": 10 + i % 4,
                "type": ("register", "share", "mail")[i % 3],
                "area": ("DE", "FR", None)[i % 3],
                "new": i % 2 == 0,
                "count": 1 + i % 2,
                "at": now - 600 * i,
                "page": 100 + i % 5,
                "messages": i % 3,
            }
        )
    return out


#: every read-only op of the protocol, with arguments that find something
READ_CALLS: list[list[Any]] = [
    ["stats", 1],
    ["stats", 999],
    ["stats_many", [1, 2, 3, 999]],
    ["page_stats", 101],
    ["page_stats", 999],
    ["org_stats", 10],
    ["history", 1, {"unit": "hour"}],
    ["history", 2, {"unit": "minute", "page": 101}],
    ["recent", 1, {"tz": "Europe/Berlin"}],
    ["top", {"by": "supporters", "limit": 5}],
    ["top", {"by": "today", "limit": 5}],
    ["get_goals", 1],
    ["metrics", 1],
]


async def answers(conn: Raw, calls: list[list[Any]]) -> list[Any]:
    out = []
    for rid, (op, *args) in enumerate(calls, 1):
        out.append(await conn.call(op, rid, *args))
    return out


async def test_every_read_only_op_answers_inline_what_the_actor_answers() -> None:
    service = await started()
    try:
        async with fronts(service) as (inline, mailbox):
            assert inline.port is not None
            assert mailbox.port is not None
            a, b = await Raw.tcp(inline.port), await Raw.tcp(mailbox.port)
            try:
                await a.send(
                    ["incs", rich_increments()], ["metric", {"campaign": 1, "incr": {"x": 2}}]
                )
                await a.send(["set_goals", 1, 1, {"supporters": [5, 10, 1_000]}])
                assert (await a.recv())[0][:2] == ["ok", 1]
                assert (await a.call("flush", 2)) == ["ok", 2, None]
                from_actor = await answers(b, READ_CALLS)
                before = inline.counters.reads_inline
                from_door = await answers(a, READ_CALLS)
                assert inline.counters.reads_inline == before + len(READ_CALLS)
                assert mailbox.counters.reads_inline == 0
                assert from_door == from_actor
                assert all(reply[0] == "ok" for reply in from_door)
                assert from_door[0][2]["supporters"] > 0  # something was found
                info_a, info_b = (await a.call("info", 99))[2], (await b.call("info", 99))[2]
                for info in (info_a, info_b):
                    info.pop("uptime")
                    info.pop("server")  # each front's own counters
                assert info_a == info_b
                assert info_a["increments_applied"] == 60
            finally:
                await a.close()
                await b.close()
    finally:
        await service.stop(5)


async def test_a_query_refused_inline_gets_the_error_the_actor_gives() -> None:
    # Shard 0 of 2: half the campaigns are another shard's, refused with ``invalid``.
    service = StatsService(EmptySource(), ActorConfig(sync_interval=3600, shard=Shard(0, 2)))
    await service.start()
    try:
        async with fronts(service) as (inline, mailbox):
            assert inline.port is not None
            assert mailbox.port is not None
            a, b = await Raw.tcp(inline.port), await Raw.tcp(mailbox.port)
            try:
                calls = [
                    [op, *args]
                    for cid in range(1, 9)
                    for op, *args in (
                        ["stats", cid],
                        ["stats_many", [cid, cid + 1]],
                        ["get_goals", cid],
                        ["recent", cid, {}],
                        ["history", cid, {"unit": "day"}],
                        ["metrics", cid],
                    )
                ]
                calls += [
                    ["stats", 0],  # refused by the codec, before any door
                    ["history", 1, {"unit": "week"}],
                    ["top", {"by": "nothing"}],
                    ["recent", 2, {"tz": "Mars/Olympus"}],
                ]
                from_actor = await answers(b, calls)
                from_door = await answers(a, calls)
                assert from_door == from_actor
                codes = {r[2] for r in from_door if r[0] == "err"}
                assert "invalid" in codes
                assert codes <= {"invalid", "bad_message"}
                assert sum(r[0] == "ok" for r in from_door) > 0
                assert inline.counters.reads_inline > 0
            finally:
                await a.close()
                await b.close()
    finally:
        await service.stop(5)


# -- the door ---------------------------------------------------------------------------------


async def test_the_read_door_answers_only_read_only_requests_and_only_while_serving() -> None:
    service = await started()
    try:
        assert service.read_door(Stats(1))["supporters"] == 0
        assert set(service.read_door(StatsMany([1, 2]))) == {1, 2}
        with pytest.raises(UsageError, match="not a read-only request"):
            service.read_door(Flush())
        producer = service.producer()
        producer.cast(Increments(tuple(Increment(1, 1, "register") for _ in range(600))))
        # Its own batch is queued: not now (it goes to the mailbox, behind the batch).
        assert producer.read_now(Stats(1)) is NOT_NOW
        assert service.producer(inline_reads=False).read_now(Stats(1)) is NOT_NOW
        assert (await producer.call(Stats(1)))["action"] == {"register": 600}
        assert producer.read_now(Stats(1))["action"] == {"register": 600}
        assert producer.read_now(Info())["increments_applied"] == 600
        assert producer.read_now(Flush()) is NOT_NOW  # not read-only: the mailbox
    finally:
        await service.stop(5)
    assert service.read_door(Stats(1)) is NOT_NOW  # stopped


async def test_a_test_fault_hook_sees_every_query_as_a_message() -> None:
    seen: list[Any] = []
    service = await started(fault_hook=seen.append)
    try:
        assert service.read_door(Stats(1)) is NOT_NOW
        async with fronts(service) as (server, _):
            assert server.port is not None
            conn = await Raw.tcp(server.port)
            try:
                assert (await conn.call("stats", 1, 5))[:2] == ["ok", 1]
            finally:
                await conn.close()
            assert server.counters.reads_inline == 0
        assert any(getattr(m, "request", None) == Stats(5) for m in seen)
    finally:
        await service.stop(5)


# -- TCP_NODELAY on both ends ---------------------------------------------------------------------


def nodelay(sock: Any) -> bool:
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


async def test_both_clients_and_the_server_send_small_replies_without_delay() -> None:
    service = await started()
    try:
        async with fronts(service) as (server, _):
            assert server.port is not None
            url = f"tcp://127.0.0.1:{server.port}"
            async with AsyncStatsClient(url) as aio:
                assert (await aio.stats(1))["supporters"] == 0
                conn = aio._conn
                assert conn is not None
                assert conn.transport is not None
                assert nodelay(conn.transport.get_extra_info("socket"))
                # The server's end of this connection, while it is open.
                [connection] = list(server.connections)
                assert connection.transport is not None
                assert nodelay(connection.transport.get_extra_info("socket"))

            def blocking() -> bool:
                with StatsClient(url) as client:
                    client.stats(1)
                    idle = client._pool._idle
                    return len(idle) == 1 and nodelay(idle[0].sock)

            assert await asyncio.to_thread(blocking)
    finally:
        await service.stop(5)
