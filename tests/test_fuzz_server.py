"""Fuzzing the live server: random and mutated messages over many connections.

Every reply must be well-formed, the server must stay up, and the counts must equal what the
valid messages alone give, computed here with the pure codec and model on the same bytes. Items
come as v1 arrays and as maps; decrements are left out, because with them the totals would
depend on how the connections interleave (a count never goes below zero).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

import msgpack
import pytest

from campaignstats.errors import BadFrame
from campaignstats.model import StatsState
from campaignstats.protocol import Batch, ServerCodec

from .helpers import Raw, Running, Start

pytestmark = pytest.mark.timeout(120)

CAMPAIGNS = range(50_001, 50_011)  # not in the database: only these messages touch them
OPS = ["inc", "incs", "ping", "stats", "stats_many", "flush", "info", "sub", "unsub", "resync"]
CODES = {"bad_frame", "bad_message", "invalid", "unauthorized", "overloaded", "internal"}


def valid_item(rng: random.Random) -> list[Any]:
    item: list[Any] = [
        rng.choice(CAMPAIGNS),
        rng.randint(1, 5),
        rng.choice(["register", "share", "mail2target", "é€😀"]),
        rng.choice([None, "DE", "FR"]),
        rng.random() < 0.6,
    ]
    if rng.random() < 0.5:
        item.append(rng.randint(1, 3))
        if rng.random() < 0.5:
            item.append(rng.choice([None, rng.randint(1, 10**9)]))
    return item


def valid_map(rng: random.Random) -> dict[Any, Any]:
    """The map form of an item (docs/protocol.md, "Additions"), with some optional keys."""
    cid, org, action_type, area, new, *rest = valid_item(rng)
    item: dict[Any, Any] = {"campaign": cid, "org": org, "type": action_type}
    optional = {
        "area": area,
        "new": new,
        "count": rest[0] if rest else None,
        "txid": rng.randint(1, 10**9),
        "at": rng.choice([1_700_000_000, 1_700_000_000.5]),
        "page": rng.randint(1, 99),
        "messages": rng.randint(0, 3),
    }
    for key in rng.sample(sorted(optional), rng.randint(0, len(optional))):
        item[key] = optional[key]
    return item


def any_item(rng: random.Random) -> Any:
    return valid_map(rng) if rng.random() < 0.3 else valid_item(rng)


def junk(rng: random.Random) -> Any:
    return rng.choice([0, -1, 2**63, True, None, "", "x" * 70, b"bin", 1.5, [], {}, [1], {"a": 1}])


def message(rng: random.Random, req_id: int) -> Any:
    op = rng.choice(OPS)
    if op == "inc":
        msg: list[Any] = (
            ["inc", valid_map(rng)] if rng.random() < 0.3 else ["inc", *valid_item(rng)]
        )
    elif op == "incs":
        msg = ["incs", [any_item(rng) for _ in range(rng.randint(0, 30))]]
    elif op in ("stats", "sub", "unsub"):
        msg = [op, req_id, rng.choice(CAMPAIGNS)]
    elif op == "stats_many":
        msg = [op, req_id, rng.sample(list(CAMPAIGNS), 3)]
    elif op == "resync":
        msg = [op, req_id, rng.choice(["live", [1, 2], "all"])]
    else:
        msg = [op, req_id]
    roll = rng.random()
    if roll < 0.15 and len(msg) > 1:  # a field of the wrong type or out of range
        msg[rng.randrange(1, len(msg))] = junk(rng)
    elif roll < 0.2 and msg[0] == "incs" and msg[1]:
        msg[1][rng.randrange(len(msg[1]))][rng.randrange(5)] = junk(rng)
    elif roll < 0.23:
        msg = junk(rng)
    return msg


def stream(rng: random.Random, n: int) -> bytes:
    data = bytearray(b"".join(msgpack.packb(message(rng, i)) for i in range(n)))
    if rng.random() < 0.3:  # a mutated byte somewhere: may or may not break the framing
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def applied_by(data: bytes) -> list[Any]:
    """The increments a server reading ``data`` applies: the codec's, until a bad frame."""
    codec = ServerCodec()
    items: list[Any] = []
    with contextlib.suppress(BadFrame):
        for msg in codec.receive_data(data):
            if type(msg) is Batch and not msg.decrement:
                items.extend(msg.items)
        if codec.error is not None:
            raise codec.error
    return items


def well_formed(reply: Any) -> bool:
    if not isinstance(reply, list) or not reply:
        return False
    if reply[0] == "ok":
        return len(reply) == 3 and isinstance(reply[1], int)
    if reply[0] == "err":
        return (
            len(reply) == 4
            and (reply[1] is None or isinstance(reply[1], int))
            and reply[2] in CODES
            and isinstance(reply[3], str)
        )
    if reply[0] == "pub":
        return len(reply) == 3 and reply[1] in CAMPAIGNS and isinstance(reply[2], dict)
    return False


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_and_mutated_messages_never_break_the_server_or_the_counts(
    start: Start, seed: int
) -> None:
    running: Running = await start()
    rng = random.Random(seed)
    streams = [stream(rng, rng.randint(20, 120)) for _ in range(12)]

    async def client(data: bytes) -> list[Any]:
        c = await Raw.tcp(running.port)
        try:
            for start_at in range(0, len(data), 97):  # odd chunks, split mid-message
                c.writer.write(data[start_at : start_at + 97])
            await c.writer.drain()
            replies: list[Any] = []
            with contextlib.suppress(TimeoutError, ConnectionError):
                while True:  # until the server closes, or falls silent
                    replies.extend(await c.recv(1, within=0.5))
            return replies
        finally:
            await c.close()

    results = await asyncio.gather(*(client(d) for d in streams))
    for replies in results:
        assert all(well_formed(r) for r in replies), [r for r in replies if not well_formed(r)]

    expected = StatsState()
    for data in streams:
        expected.apply_many(applied_by(data))
    checker = await Raw.tcp(running.port)
    try:
        assert await checker.call("flush", 1) == ["ok", 1, None]
        ok, _, many = await checker.call("stats_many", 2, list(CAMPAIGNS))
        assert ok == "ok"
        assert many == {cid: expected.stats(cid) for cid in CAMPAIGNS}
    finally:
        await checker.close()
