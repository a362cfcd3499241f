"""The mechanisms of the second performance round's batch API and bounded reads (no timing:
speed is bench/'s).

- ``increment_many`` checks a whole batch in one call; a batch with anything wrong goes item by
  item: the same counts, the same local refusals (same error, same index, nothing queued), the
  same server errors, in order with the other changes, through both clients.
- The server reads at most ``read_size`` bytes at a time: whatever that size, a stream gives the
  same items, errors and answers, and a connection's query never overtakes its own increments.

No Postgres: the service runs on a source that finds an empty database.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest

from campaignstats.client import AsyncStatsClient, StatsClient
from campaignstats.client._batch import v1_items
from campaignstats.errors import StatsError, UsageError
from campaignstats.loops import runner
from campaignstats.model import MAX_ID, Increment, StatsState, check_increment
from campaignstats.protocol import ClientCodec
from campaignstats.server import ServerConfig, StatsServer
from campaignstats.sessions.client import wire_item

from .helpers import Raw
from .test_perf_paths import started

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def serving(read_size: int | None = None, **config: Any) -> AsyncIterator[StatsServer]:
    service = await started(**config)
    options = {} if read_size is None else {"read_size": read_size}
    srv = StatsServer(service, ServerConfig(host="127.0.0.1", port=0, **options))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.close(5)
        await service.stop(5)


# -- the batch check ------------------------------------------------------------------------------

VALID = [
    Increment(1, 2, "register", "DE", True),
    Increment(MAX_ID, MAX_ID, "x" * 64, "y" * 64, False, MAX_ID, MAX_ID),  # every bound
    Increment(3, 4, "signé", None, True, 7, 12),  # non-ASCII, within 64 bytes
    Increment(5, 6, "é" * 32, "ü" * 32, False),  # 64 bytes exactly, in 32 characters
    Increment(7, 8, "share", None, False, 1, None, messages=0),
]


def test_a_valid_batch_checked_at_once_gives_the_wire_items_of_each_checked_alone() -> None:
    for batch in (VALID, VALID[:1], VALID * 300):
        assert all(check_increment(inc) is None for inc in batch)
        assert v1_items(batch, 64) == [wire_item(inc) for inc in batch]
    assert v1_items([], 64) is None  # nothing to check: the caller's loop makes []


class Kind(enum.IntEnum):
    TEN = 10


class Text(str):
    pass


#: (the bad item, the exception increment() would raise, a piece of its message)
BAD: list[tuple[Any, type[Exception], str]] = [
    (Increment(0, 1, "register"), StatsError, "between 1 and 2**63-1"),
    (Increment(1, MAX_ID + 1, "register"), StatsError, "between 1 and 2**63-1"),
    (Increment(True, 1, "register"), StatsError, "must be integers"),
    (Increment(1.0, 1, "register"), StatsError, "must be integers"),  # type: ignore[arg-type]
    (Increment("1", 1, "register"), StatsError, "must be integers"),  # type: ignore[arg-type]
    (Increment(1, 1, ""), StatsError, "1 to 64 bytes"),
    (Increment(1, 1, "x" * 65), StatsError, "1 to 64 bytes"),
    (Increment(1, 1, "register", "é" * 33), StatsError, "1 to 64 bytes"),  # 33 chars, 66 bytes
    (Increment(1, 1, "\ud800"), StatsError, "1 to 64 bytes"),  # no UTF-8 for a lone surrogate
    (Increment(1, 1, 5), StatsError, "action_type must be a string"),  # type: ignore[arg-type]
    (Increment(1, 1, "register", 5), StatsError, "area must be"),  # type: ignore[arg-type]
    (Increment(1, 1, "register", "", True), StatsError, "1 to 64 bytes"),
    (Increment(1, 1, "register", None, 1), StatsError, "boolean"),  # type: ignore[arg-type]
    (Increment(1, 1, "register", None, True, 0), StatsError, "count"),
    (Increment(1, 1, "register", None, True, True), StatsError, "count"),
    (Increment(1, 1, "register", None, True, 1, 0), StatsError, "action_id"),
    (Increment(1, 1, "register", None, True, 1, -3), StatsError, "action_id"),
    (Increment(1, 1, "register", None, True, 1, "7"), StatsError, "action_id"),  # type: ignore
    (Increment(1, 1, "register", txid=0), StatsError, "txid"),
    (Increment(1, 1, "register", at=-1.0), StatsError, "at must be"),
    (Increment(1, 1, "register", at=float("nan")), StatsError, "at must be"),
    (Increment(1, 1, "register", messages=-1), StatsError, "messages"),
    ((1, 1, "register", None, True), UsageError, "is a tuple, not an Increment"),
    (None, UsageError, "is a NoneType, not an Increment"),
]


@pytest.mark.parametrize("cls", [AsyncStatsClient, StatsClient])
@pytest.mark.parametrize(("bad", "error", "reason"), BAD)
def test_a_bad_item_anywhere_in_a_batch_is_refused_as_alone_by_index_and_nothing_is_queued(
    cls: type, bad: Any, error: type[Exception], reason: str
) -> None:
    client = cls("tcp://127.0.0.1:9", close_timeout=0)
    try:
        if type(bad) is Increment:
            alone = check_increment(bad)
            assert alone is not None
            assert reason in str(alone)
        for index in (0, 3, 999):
            batch = [*VALID * 200][:1000]
            batch[index] = bad
            with pytest.raises(error, match=f"item {index}") as raised:
                client.increment_many(batch)
            assert reason in str(raised.value)
            if type(bad) is Increment:  # the same error as increment() gets, named by index
                assert str(raised.value) == f"item {index}: {check_increment(bad)}"
                assert type(raised.value) is type(check_increment(bad))
            assert client.statistics().queued == 0
        client.increment_many(VALID)  # and a good batch after it is taken
        assert client.statistics().queued == len(VALID)
    finally:
        if cls is StatsClient:
            client.close()


def test_the_batch_check_follows_the_servers_string_limit_and_leaves_extra_fields_to_maps() -> None:
    assert v1_items([Increment(1, 1, "x" * 8)], 8) is not None
    assert v1_items([Increment(1, 1, "x" * 9)], 8) is None  # then refused item by item
    assert v1_items([Increment(1, 1, "éé" * 2)], 8) is not None  # 8 bytes
    assert v1_items([Increment(1, 1, "é" * 5)], 8) is None  # 10 bytes in 5 characters
    # Valid, but not v1 alone: the item-by-item path sends those as maps.
    for extra in ({"txid": 5}, {"at": 1.7e9}, {"page": 3}, {"messages": 2}):
        inc = Increment(1, 1, "register", **extra)  # type: ignore[arg-type]
        assert check_increment(inc) is None
        assert v1_items([*VALID, inc], 64) is None
        assert type(wire_item(inc)) is dict


def test_an_int_or_str_subclass_passes_the_batch_check_as_its_value() -> None:
    # The one difference from the item-by-item check, on purpose (client/_batch.py): the wire
    # carries the value, and a server takes it.
    batch = [Increment(Kind.TEN, 1, Text("register"), "DE", True)]
    items = v1_items(batch, 64)
    assert items is not None
    data = ClientCodec().cast("incs", items)
    assert msgpack.unpackb(data) == ["incs", [[10, 1, "register", "DE", True, 1, None]]]


def test_the_client_codec_writes_the_bytes_msgpack_writes() -> None:
    items: list[Any] = [wire_item(inc) for inc in VALID]
    items.append({"campaign": 1, "org": 2, "type": "x", "at": 1.7e9, "txid": 2**62})
    assert ClientCodec().cast("incs", items) == msgpack.packb(["incs", items])
    assert ClientCodec().cast("decs", items[:1]) == msgpack.packb(["decs", items[:1]])


# -- through both clients, over a real server -----------------------------------------------------


def changes(cid: int) -> list[tuple[str, list[Increment]]]:
    """increment_many, decrement_many and single changes, in an order where a decrement that
    overtook its increment would be clamped at zero and change the totals."""
    many = [
        Increment(
            cid,
            1 + i % 3,
            ("register", "share", "signé")[i % 3],
            "DE" if i % 4 else None,
            i % 2 == 0,
            1 + i % 2,
            i + 1,
        )
        for i in range(2_500)
    ]
    return [
        ("increment_many", many[:1_500]),
        ("decrement_many", many[:700]),
        ("increment", [Increment(cid, 9, "register", "FR", True, txid=77, page=3)]),
        ("increment_many", [*many[1_500:], Increment(cid, 9, "mail", None, True, messages=4)]),
        ("decrement_many", many[1_500:1_600]),
        ("decrement", [Increment(cid, 9, "register", "FR", True, txid=77, page=3)]),
    ]


def expected(cid: int) -> dict[str, Any]:
    state = StatsState()
    for op, items in changes(cid):
        for inc in items:
            state.apply(inc, decrement=op.startswith("decrement"))
    return state.stats(cid)


@pytest.mark.parametrize("cls", [AsyncStatsClient, StatsClient])
async def test_batches_count_in_order_with_single_changes_through_both_clients(cls: type) -> None:
    async with asyncio.timeout(30), serving(max_campaigns=20) as srv:
        client = cls(f"tcp://127.0.0.1:{srv.port}", timeout=10)

        async def call(name: str, *args: Any) -> Any:
            method = getattr(client, name)
            if cls is AsyncStatsClient:
                return await method(*args)
            return await asyncio.to_thread(method, *args)

        try:
            await call("ping")
            for op, items in changes(5):
                if op.endswith("_many"):
                    getattr(client, op)(items)
                else:
                    for inc in items:
                        getattr(client, op)(*inc[:7], txid=inc.txid, page=inc.page)
            await call("flush")
            got = await call("stats", 5)
            assert got == expected(5)
            assert got["messages"] == 4
            # The server's refusals come back as before: campaigns 2 to 21 fit the server's 20
            # (5 is one already), 22 to 25 are refused in one error of the one incs message.
            client.increment_many([Increment(c, 1, "register", None, True) for c in range(2, 26)])
            await call("flush")
            stats = client.statistics()
            assert (stats.server_errors, stats.dropped, stats.queued) == (1, 0, 0)
            many = await call("stats_many", list(range(2, 26)))
            assert [cid for cid in range(2, 26) if many[cid]["supporters"]] == list(range(2, 22))
        finally:
            if cls is AsyncStatsClient:
                await client.close()
            else:
                await asyncio.to_thread(client.close)


# -- bounded reads --------------------------------------------------------------------------------


def stream() -> bytes:
    """incs batches with invalid items, single incs and decs, calls in between, a flush."""
    messages: list[Any] = []
    for k in range(12):
        batch: list[Any] = [[1 + (k + i) % 9, 1, "register", "DE", i % 2 == 0] for i in range(700)]
        batch[k * 13] = [0, 1, "register", None, True]  # invalid: named by its index
        messages.append(["incs", batch])
        messages.append(["inc", 3, 1, "share", None, True])
        messages.append(["inc", 3, 1, "", None, True])  # invalid alone
        messages.append(["dec", 1 + k % 9, 1, "register", "DE", True])
        messages.append(["stats", 100 + k, 1 + k % 9])
    messages.append(["flush", 999])
    return b"".join(msgpack.packb(m) for m in messages)


async def play(read_size: int | None) -> tuple[list[Any], list[Any]]:
    """The replies to calls in order, and the errors about casts (sorted: they are answered
    when known, a refused ``inc`` at once and an ``incs`` item once the actor has judged the
    rest, so their order depends on where reads end; docs/protocol.md, "Errors of casts")."""
    async with serving(read_size) as srv:
        assert srv.port is not None
        if read_size is not None:
            assert len(srv.read_buffer) == read_size
        conn = await Raw.tcp(srv.port)
        try:
            await conn.send_bytes(stream())
            replies: list[Any] = []
            while not replies or replies[-1][:2] != ["ok", 999]:
                replies.extend(await conn.recv(1, within=20))
            replies.append(await conn.call("stats_many", 1, list(range(1, 10))))
            errors = sorted((r for r in replies if r[0] == "err"), key=repr)
            return [r for r in replies if r[0] != "err"], errors
        finally:
            await conn.close()


async def test_a_stream_read_in_pieces_of_any_size_gives_the_same_counts_errors_and_answers() -> (
    None
):
    async with asyncio.timeout(50):
        whole = await play(None)  # the default: 32 KiB
        for size in (64, 1_000, 4_096, 256 << 10):
            assert await play(size) == whole, size
    answers, errors = whole
    assert len(errors) == 24  # each incs names its one bad item, each bad inc its own
    assert sum(r[3].startswith("incs items rejected (1): [") for r in errors) == 12
    assert sum(r[3].startswith("action_type must be") for r in errors) == 12
    assert [r[1] for r in answers] == [*range(100, 112), 999, 1]  # calls answered in order
    totals = answers[-1][2]
    assert sum(s["action"].get("register", 0) for s in totals.values()) == 12 * 699 - 12


async def test_a_query_after_a_large_batch_read_in_small_pieces_sees_all_of_it() -> None:
    async with asyncio.timeout(50), serving(read_size=512, apply_slice=50) as srv:
        assert srv.port is not None
        writer, reader = await Raw.tcp(srv.port), await Raw.tcp(srv.port)
        seen: list[int] = []
        stop = asyncio.Event()

        async def watch() -> None:  # another connection querying all along
            rid = 0
            while not stop.is_set() and rid < 10_000:
                rid += 1
                seen.append((await reader.call("stats", rid, 7))[2]["action"].get("register", 0))

        watcher = asyncio.create_task(watch())
        try:
            for round_ in range(1, 9):
                batch = [[7, 1, "register", None, False, 1]] * 3_000  # 60 slices, ~60 reads
                await writer.send(["incs", batch], ["stats", round_, 7])
                [reply] = await writer.recv(within=20)
                assert reply[:2] == ["ok", round_]
                assert reply[2]["action"] == {"register": 3_000 * round_}
        finally:
            stop.set()
            await watcher
            await writer.close()
            await reader.close()
        assert seen == sorted(seen)
        assert seen


def test_reads_bounded_on_uvloop_give_what_they_give_on_asyncio() -> None:
    # libuv reads a stream up to 32 times in a row when each read fills the buffer; the
    # connection pauses after a full read to let the loop turn: the stream means the same.
    pytest.importorskip("uvloop")
    name, run = runner("uvloop")
    assert name == "uvloop"
    on_uvloop = [run(play(size)) for size in (64, 4_096, None)]
    on_asyncio = asyncio.run(play(None))
    assert on_uvloop == [on_asyncio] * 3


async def test_a_read_size_under_one_byte_is_refused_at_construction() -> None:
    service = await started()
    try:
        with pytest.raises(ValueError, match="read_size"):
            StatsServer(service, ServerConfig(port=0, read_size=0))
    finally:
        await service.stop(5)
