"""Where a query's time goes under load: the kernel and the scheduler, or the server's callbacks.

    python -m bench.latency_tail [--rate 150000] [--queries 5000] [--loop asyncio|uvloop]

The server runs in this process (the bench's empty source, 100,000 increments loaded first);
a forked process sends ``incs`` of 1,000 at ``--rate`` increments/s (bench/_workers.py
``paced_load``, the load of ``bench.run``'s "at half load" rows), and another forked process
sends ``stats`` over a bare socket, one at a time, each with its own ``req_id``. Both this
process and the query client read one clock (``time.perf_counter``, CLOCK_MONOTONIC on Linux,
the same for every process), so each query's round trip splits into:

- ``to server``: from the client's ``send`` to the start of the server's read callback for it
  (the loopback, the server process waiting for a core, the event loop finishing what it was
  doing: a read of ``incs`` being decoded, a slice being applied);
- ``in server``: the read callback itself (decode, the inline answer, the write);
- ``back``: from the end of that callback to the client holding the reply (the loopback, the
  client waiting for a core).

Also: how long the server's other callbacks took meanwhile (each read of the load's ``incs``,
decoded whole in its callback; each slice of 250 the actor applies), the CPU time of the
server and of the machine (``/proc/stat``), and the load average. Percentiles are nearest-rank.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import socket
import sys
import time
from typing import Any

import msgpack
import structlog

from bench import _data, _harness, _workers
from bench._harness import percentiles
from bench._server import EmptySource
from campaignstats.actor.actor import ActorConfig, StatsActor
from campaignstats.loops import LOOPS, runner
from campaignstats.model import Increment
from campaignstats.server import DEFAULT_READ_SIZE, Connection, ServerConfig, StatsServer
from campaignstats.service import StatsService

#: per query req_id: (start, end) of the server's read callback
QUERIES: dict[int, tuple[float, float]] = {}
#: durations (s) of the other read callbacks, and of the actor's slices
OTHER: dict[str, list[float]] = {"load read": [], "slice": []}


def instrument() -> None:
    clock = time.perf_counter
    buffer_updated = Connection.buffer_updated
    apply_slice = StatsActor._apply_slice

    def timed_read(self: Connection, nbytes: int) -> None:
        small = nbytes < 64  # a stats call: its req_id names it
        req_id = None
        if small:
            try:
                value = msgpack.unpackb(self._buffer[:nbytes])
                req_id = value[1] if type(value) is list and value[0] == "stats" else None
            except Exception:
                req_id = None
        t = clock()
        buffer_updated(self, nbytes)
        end = clock()
        if req_id is not None:
            QUERIES[req_id] = (t, end)
        elif not small:
            OTHER["load read"].append(end - t)

    def timed_slice(self: StatsActor) -> None:
        t = clock()
        apply_slice(self)
        OTHER["slice"].append(clock() - t)

    Connection.buffer_updated = timed_read  # type: ignore[method-assign]
    StatsActor._apply_slice = timed_slice  # type: ignore[method-assign]


def query_client(port: int, n: int, limit: float) -> dict[str, Any]:
    """``stats`` calls over a bare socket, req_id k for the k-th; (k, sent, received) each."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=limit)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(msgpack.packb(["hello", 0, {"protocol": 1}]))
    sock.recv(1 << 16)
    rng = random.Random(7)
    clock = time.perf_counter
    out: list[tuple[int, float, float]] = []
    deadline = clock() + limit
    for k in range(1, n + 1):
        data = msgpack.packb(["stats", k, rng.randint(1, 1000)])
        t = clock()
        sock.sendall(data)
        reply = sock.recv(1 << 16)
        end = clock()
        assert msgpack.unpackb(reply, strict_map_key=False)[1] == k
        out.append((k, t, end))
        if end > deadline:
            break
    sock.close()
    return {"samples": out}


def _cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the machine since boot."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


async def measure(
    rate: float, queries: int, apply_slice: int = 250, read_size: int = DEFAULT_READ_SIZE
) -> dict[str, Any]:
    service = StatsService(EmptySource(), ActorConfig(sync_interval=3600, apply_slice=apply_slice))
    await service.start()
    await service.loaded()
    config = ServerConfig(host="127.0.0.1", port=0, read_size=read_size)
    server = StatsServer(service, config)
    await server.start()
    assert server.port is not None
    items = _data.generate(100_000, 42)
    actor = service.supervisor.actor
    assert actor is not None
    actor.state.apply_many([Increment(*item) for item in items])
    batches = [_data.encode_incs(items[i : i + 1000], 1000) for i in range(0, len(items), 1000)]
    stop = _harness.event()
    try:
        load = None
        if rate > 0:
            load = _harness.fork(_workers.paced_load, server.port, batches, 1000, rate, stop, 60.0)
            await asyncio.sleep(1.0)  # the load running
        for values in OTHER.values():
            values.clear()
        QUERIES.clear()
        busy0, total0 = _cpu()
        cpu0 = time.process_time()
        wall0 = time.perf_counter()
        wait = _harness.fork(query_client, server.port, queries, 30.0)
        client = await asyncio.to_thread(wait, 90)
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
        busy1, total1 = _cpu()
        stop.set()
        sent = await asyncio.to_thread(load, 90) if load is not None else {}
    finally:
        await server.close(5)
        await service.stop(5)
    parts: dict[str, list[float]] = {"round trip": [], "to server": [], "in server": [], "back": []}
    for k, t_sent, t_got in client["samples"]:
        seen = QUERIES.get(k)
        if seen is None:
            continue
        start, end = seen
        parts["round trip"].append((t_got - t_sent) * 1e6)
        parts["to server"].append((start - t_sent) * 1e6)
        parts["in server"].append((end - start) * 1e6)
        parts["back"].append((t_got - end) * 1e6)
    out: dict[str, Any] = {
        name: percentiles(values, (50, 99, 99.9)) for name, values in parts.items()
    }
    for name, values in OTHER.items():
        out[name] = percentiles([v * 1e6 for v in values], (50, 99, 100)) if values else None
    out["server cpu"] = cpu / wall
    out["machine cpu"] = (busy1 - busy0) / max(total1 - total0, 1)
    out["load rate"] = sent.get("rate")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=150_000, help="load, inc/s (0: idle)")
    parser.add_argument("--queries", type=int, default=5_000)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--loop", choices=LOOPS, default="asyncio")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="SLICE,READ",
        help="ActorConfig.apply_slice and ServerConfig.read_size to compare, e.g. 100,16384 "
        "(repeatable: the variants run in turn in every run; default 250,32768)",
    )
    args = parser.parse_args()
    variants = [tuple(int(x) for x in v.split(",")) for v in args.variant] or [
        (250, DEFAULT_READ_SIZE)
    ]
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    instrument()
    _, run = runner(args.loop)
    load = os.getloadavg()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC, {args.loop}, "
        f"load {args.rate:,.0f} inc/s in incs of 1,000, {args.queries:,} bare-socket stats "
        f"per run; load average {load[0]:.2f}"
    )
    for i in range(args.runs):
        for apply_slice, read_size in variants:
            got = run(measure(args.rate, args.queries, apply_slice, read_size))
            print(
                f"  run {i + 1}, slices of {apply_slice}, reads of {read_size:,} B: "
                f"load sent at {got['load rate'] or 0:,.0f}/s; server process "
                f"{got['server cpu']:.0%} of a core, machine {got['machine cpu']:.0%} of its cores"
            )
            for name in ("round trip", "to server", "in server", "back", "load read", "slice"):
                v = got[name]
                if v is None:
                    continue
                cells = ", ".join(f"{k} {x:,.0f}" for k, x in v.items())
                print(f"    {name:10} {cells} (µs)")
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
