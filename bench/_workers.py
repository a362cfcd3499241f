"""What the bench's client processes do: each function runs in a forked child and returns a dict.

The harness (forking, the timing loop, percentiles) is bench/_harness.py. Every loop is bounded
by its input and by a deadline (``limit`` seconds): a loop cut by the deadline says so (``cut``)
and its figure does not count.
"""

from __future__ import annotations

import gc
import random
import socket
import threading
import time
from typing import Any

import msgpack

from bench._data import ACTION_TYPES, AREAS, Item
from bench._harness import rss_bytes, time_each
from campaignstats.actor.packing import Packing  # imported before any RSS is read
from campaignstats.client import StatsClient
from campaignstats.client._common import Address
from campaignstats.client.blocking import _Connection
from campaignstats.model import Increment, StatsState
from campaignstats.protocol import ServerCodec
from campaignstats.requests import Flush, Stats
from campaignstats.sessions.client import ClientSession, Event, ServerError

_RECV = 1 << 16


def _touch(items: list[Any]) -> None:
    """Touch every object once, so that copy-on-write faults after fork happen before timing."""
    for item in items:
        if type(item) is tuple:
            len(item)


def _connect(port: int) -> _Connection:
    """One connection of our blocking client (socket, session, hello done), for the workloads
    that write pre-encoded bytes: the server's raw capacity, measured through our own client's
    connection rather than a copy of it."""
    return _Connection.open(Address("tcp", "127.0.0.1", port), ClientSession(), 120)


def _flush(conn: _Connection, timeout: float = 120) -> int:
    """``flush`` on ``conn``; returns the errors about casts (rejected items) seen meanwhile."""
    errors: list[Event] = []
    conn.call(Flush(), time.monotonic() + timeout, errors.append)
    return sum(isinstance(event, ServerError) for event in errors)


def raw_call(port: int, op: str, *args: Any) -> Any:
    """One call through a fresh StatsClient (no threads for calls: safe before forking)."""
    with StatsClient(f"tcp://127.0.0.1:{port}", timeout=120) as client:
        return getattr(client, op)(*args)


# -- our server -------------------------------------------------------------------------------


def client_per_increment(port: int, items: list[Item], limit: float) -> dict[str, Any]:
    """Workload 1: StatsClient.increment() once per increment, then flush()."""
    client = StatsClient(f"tcp://127.0.0.1:{port}", queue_size=len(items) + 1, timeout=120)
    client.ping()  # connected before the clock starts
    _touch(items)
    inc = client.increment
    n = 0
    cut = False
    t0 = time.perf_counter()
    deadline = t0 + limit
    for start in range(0, len(items), 10_000):
        for item in items[start : start + 10_000]:
            inc(*item)
        n = min(start + 10_000, len(items))
        if time.perf_counter() > deadline:
            cut = n < len(items)
            break
    client.flush(timeout=120)
    seconds = time.perf_counter() - t0
    stats = client.statistics()
    client.close()
    return {"n": n, "seconds": seconds, "dropped": stats.dropped, "cut": cut}


def client_batches(port: int, items: list[Item], batch: int, limit: float) -> dict[str, Any]:
    """Workload 2: StatsClient.increment_many() with ``batch`` items at a time, then flush().

    Checking, queueing, encoding and sending are all inside the timing.
    """
    client = StatsClient(f"tcp://127.0.0.1:{port}", queue_size=len(items) + 1, timeout=120)
    client.ping()  # connected before the clock starts
    increments = [Increment(*item) for item in items]
    _touch(increments)
    many = client.increment_many
    n = 0
    cut = False
    cpu0 = time.process_time()  # the client's own CPU (caller and sender threads)
    t0 = time.perf_counter()
    deadline = t0 + limit
    for start in range(0, len(increments), batch):
        many(increments[start : start + batch])
        n = min(start + batch, len(increments))
        if (start // batch) % 100 == 99 and time.perf_counter() > deadline:
            cut = n < len(items)
            break
    client.flush(timeout=120)
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    stats = client.statistics()
    client.close()
    return {"n": n, "seconds": seconds, "cpu": cpu, "errors": stats.server_errors, "cut": cut}


def raw_blast(port: int, streams: list[bytes], n: int, limit: float) -> dict[str, Any]:
    """Workload 3: pre-encoded streams, one per connection, then flush on each; one clock."""
    conns = [_connect(port) for _ in streams]
    barrier = threading.Barrier(len(streams) + 1)
    errors: list[int] = []
    failures: list[str] = []

    def blast(conn: _Connection, stream: bytes) -> None:
        barrier.wait()
        try:
            conn.write(stream, time.monotonic() + limit)
            errors.append(_flush(conn, limit))
        except Exception as exc:
            failures.append(repr(exc))

    threads = [threading.Thread(target=blast, args=a) for a in zip(conns, streams, strict=True)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(limit + 5)
    seconds = time.perf_counter() - t0
    for conn in conns:
        conn.close()
    return {
        "n": n,
        "seconds": seconds,
        "errors": sum(errors),
        "cut": bool(failures) or any(t.is_alive() for t in threads),
        "failures": failures[:3],
    }


def blast_for(port: int, stream: bytes, seconds: float) -> dict[str, Any]:
    """Send one pre-encoded stream over and over for ``seconds`` (load for the profiler)."""
    conn = _connect(port)
    t0 = time.perf_counter()
    rounds = 0
    while time.perf_counter() - t0 < seconds:
        conn.write(stream, time.monotonic() + 120)
        rounds += 1
    _flush(conn)
    elapsed = time.perf_counter() - t0
    conn.close()
    return {"rounds": rounds, "seconds": elapsed}


def paced_load(
    port: int, batches: list[bytes], per_batch: int, rate: float, stop: Any, limit: float
) -> dict[str, Any]:
    """Send pre-encoded ``incs`` batches at ``rate`` increments/s until ``stop`` is set."""
    conn = _connect(port)
    interval = per_batch / rate
    sent = 0
    t0 = time.perf_counter()
    k = 0
    while not stop.is_set() and time.perf_counter() - t0 < limit:
        conn.write(batches[k % len(batches)], time.monotonic() + 120)
        k += 1
        sent += per_batch
        ahead = t0 + k * interval - time.perf_counter()
        if ahead > 0:
            time.sleep(ahead)
    elapsed = time.perf_counter() - t0
    _flush(conn)
    conn.close()
    return {"sent": sent, "seconds": elapsed, "rate": sent / elapsed}


def query_latency(port: int, n: int, seed: int, limit: float) -> dict[str, Any]:
    """Workload 4: sequential StatsClient.stats() of random campaigns; latencies in µs."""
    client = StatsClient(f"tcp://127.0.0.1:{port}", timeout=10)
    rng = random.Random(seed)
    cids = [rng.randint(1, 1000) for _ in range(n)]
    result = time_each(client.stats, cids, limit)
    client.close()
    return result


def aio_query_latency(port: int, n: int, seed: int, limit: float) -> dict[str, Any]:
    """Like :func:`query_latency` through :class:`~campaignstats.client.AsyncStatsClient`, on
    asyncio's own loop in this process: the same warm-up, clock and deadline as ``time_each``."""
    import asyncio

    from campaignstats.client import AsyncStatsClient

    rng = random.Random(seed)
    cids = [rng.randint(1, 1000) for _ in range(n)]

    async def run() -> dict[str, Any]:
        client = AsyncStatsClient(f"tcp://127.0.0.1:{port}", timeout=10)
        try:
            stats = client.stats
            for cid in cids[:500]:
                await stats(cid)
            clock = time.perf_counter
            out: list[float] = []
            deadline = clock() + limit
            for cid in cids:
                t = clock()
                await stats(cid)
                out.append((clock() - t) * 1e6)
                if t > deadline:
                    break
            return {"latencies": out, "cut": len(out) < len(cids)}
        finally:
            await client.close()

    return asyncio.run(run())


def raw_query_latency(port: int, n: int, seed: int, limit: float) -> dict[str, Any]:
    """Like :func:`query_latency` on one connection of the client, without its pool: the
    difference between the two figures is what taking and giving back a connection costs."""
    conn = _connect(port)
    rng = random.Random(seed)
    cids = [rng.randint(1, 1000) for _ in range(n)]
    call = conn.call
    monotonic = time.monotonic

    def ignore(event: Event) -> None:
        pass

    def stats(cid: int) -> None:
        call(Stats(cid), monotonic() + 10, ignore)

    result = time_each(stats, cids, limit)
    conn.close()
    return result


def socket_query_latency(
    port: int, n: int, seed: int, limit: float, op: str = "stats"
) -> dict[str, Any]:
    """The floor under :func:`raw_query_latency`: a bare blocking socket (TCP_NODELAY, no
    timeout), pre-encoded ``stats`` requests, the reply read and decoded with one unpackb. With
    ``op="ping"`` the session answers in the server's read callback, without the actor: the
    differences between the figures are the hops (the actor's; our client's session; the pool).
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=limit)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)
    sock.sendall(msgpack.packb(["hello", 1, {"protocol": 1}]))
    unpacker = msgpack.Unpacker(strict_map_key=False)
    while True:  # the hello's reply
        unpacker.feed(sock.recv(_RECV))
        if any(True for _ in unpacker):
            break
    rng = random.Random(seed)
    requests = {
        cid: msgpack.packb([op, 7, cid] if op == "stats" else [op, 7]) for cid in range(1, 1001)
    }
    cids = [rng.randint(1, 1000) for _ in range(n)]
    send, recv, unpackb = sock.sendall, sock.recv, msgpack.unpackb

    def call(cid: int) -> None:
        send(requests[cid])
        unpackb(recv(_RECV), strict_map_key=False)  # a stats reply is one small read

    result = time_each(call, cids, limit)
    sock.close()
    return result


# -- in-process ceiling and memory ------------------------------------------------------------


def ceiling(stream: bytes, n: int, mode: str) -> dict[str, Any]:
    """Workload 5: decode (+ apply) the ``incs`` stream in this process, in 64 KiB reads."""
    chunks = [stream[i : i + _RECV] for i in range(0, len(stream), _RECV)]
    state = StatsState()
    gc.collect()
    t0 = time.perf_counter()
    if mode == "decode":
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        count = 0
        for chunk in chunks:
            unpacker.feed(chunk)
            for msg in unpacker:
                count += len(msg[1])
    elif mode == "decode+apply":
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        apply_many = state.apply_many
        for chunk in chunks:
            unpacker.feed(chunk)
            for msg in unpacker:
                # the dictionary updates need Increment's fields: build them as a server would
                apply_many([Increment(*item) for item in msg[1]])
    elif mode == "codec+apply":
        codec = ServerCodec()
        apply_many = state.apply_many
        for chunk in chunks:
            for msg in codec.receive_data(chunk):
                apply_many(msg.items)  # type: ignore[union-attr, arg-type]
    else:
        raise ValueError(mode)
    seconds = time.perf_counter() - t0
    totals = {
        cid: (s.supporters, dict(s.action), dict(s.area), dict(s.org))
        for cid, s in state.campaigns.items()
    }
    return {"n": n, "seconds": seconds, "totals": totals if mode != "decode" else None}


def typical_campaign(cid: int) -> list[tuple[int, int, str, str | None, bool, int, None]]:
    """10 new supporters: 5 action types, 10 areas, 3 orgs (fresh strings, as decoded)."""
    return [
        (cid, 1 + j % 3, (ACTION_TYPES[j % 5] + ".")[:-1], (AREAS[j] + ".")[:-1], True, 1, None)
        for j in range(10)
    ]


def varied_campaign(cid: int) -> list[tuple[int, int, str, str | None, bool, int, None]]:
    """The typical campaign's counts (10 new supporters, 5 action types, 10 areas, 3 orgs),
    but with key sets of its own, as real campaigns have: 3 orgs no other campaign has (ids
    above 256, as real ones are) and its own 10 of the 30 areas (seeded by the id)."""
    areas = random.Random(cid).sample(AREAS, 10)
    orgs = [100_000 + 3 * cid + k for k in range(3)]
    return [
        (cid, orgs[j % 3], (ACTION_TYPES[j % 5] + ".")[:-1], (areas[j] + ".")[:-1], True, 1, None)
        for j in range(10)
    ]


#: campaigns filled between two sweeps of ``memory(idle=True)``
IDLE_CHUNK = 1_000


def sweep_idle(state: StatsState) -> dict[str, Any]:
    """Advance ``state``'s clock past ``pack_idle`` and run the actor's sweep
    (campaignstats.actor.packing) to its end; returns its figures."""
    now = state.clock() + state.pack_idle + 1
    state.clock = lambda: now
    packing = Packing(idle_after=state.pack_idle)
    packing.start_if_due(state, packing.next_at)
    while not packing.step(state):
        pass
    assert packing.last is not None
    return packing.last


def memory(campaigns: int, varied: bool = False, idle: bool = False) -> dict[str, Any]:
    """Workload 6: RSS growth of a StatsState holding ``campaigns`` typical campaigns
    (``varied``: campaigns with their own orgs and areas, :func:`varied_campaign`).

    ``idle``: every campaign packed, as the actor packs idle ones (docs/design.md, "Memory",
    round 3): the campaigns go idle a thousand at a time (filled, then swept with the clock
    past ``pack_idle``), as on a server, where the memory of the dicts packing frees is
    reused by the next campaigns' (swept all at once at the end, the process keeps what the
    dicts took, and the RSS measures the hot state)."""
    make = varied_campaign if varied else typical_campaign
    gc.collect()
    before = rss_bytes()
    state = StatsState()
    if idle:
        state.clock = lambda: 1_750_000_000.0
        state.pack_idle = 300.0
    for cid in range(1, campaigns + 1):
        state.apply_many([Increment(*item) for item in make(cid)])
        if idle and (cid % IDLE_CHUNK == 0 or cid == campaigns):
            sweep_idle(state)
    gc.collect()
    after = rss_bytes()
    assert len(state.campaigns) == campaigns
    if idle:
        assert state.packed_count() == campaigns
    return {"campaigns": campaigns, "bytes_per_campaign": (after - before) / campaigns}
