"""Where an idle query's time goes inside the server, inline against through the mailbox.

    python -m bench.latency_stages [--queries 5000] [--loop asyncio|uvloop]

Runs the server in this process, on the bench's empty source, with clocks around the stages of
a query (the socket server's own methods, wrapped here, not changed), and a forked client that
sends ``stats`` over a bare socket, one at a time. Per stage, the median and p99 in µs:

- ``read``: the read callback, from its start to its end (inline: decoding, answering and the
  write; through the mailbox: decoding and queueing);
- ``wait``: from the end of the read callback to the actor's answer (the task switch: the
  actor's wake-up and its turn);
- ``answer``: from the actor's answer to the end of the write.

And the client's own round trip (from the forked process). Figures are of this machine at the
moment: run it a few times.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from typing import Any

import structlog

from bench import _harness, _workers
from bench._harness import percentiles
from bench._server import EmptySource
from campaignstats.actor.actor import ActorConfig
from campaignstats.loops import LOOPS, runner
from campaignstats.server import Connection, ServerConfig, StatsServer
from campaignstats.service import StatsService

Marks = dict[str, list[float]]


def instrument(marks: Marks) -> None:
    """Wrap the socket server's read callback and its answer callback with clocks."""
    clock = time.perf_counter
    buffer_updated = Connection.buffer_updated
    answered = Connection._answered
    ends: dict[int, float] = {}

    def timed_read(self: Connection, nbytes: int) -> None:
        t = clock()
        buffer_updated(self, nbytes)
        end = clock()
        marks["read"].append((end - t) * 1e6)
        ends[id(self)] = end

    def timed_answered(self: Connection, *args: Any) -> None:
        t = clock()
        answered(self, *args)
        end = clock()
        read_end = ends.pop(id(self), None)
        if read_end is not None:  # the actor's answer, not the done callback after it
            marks["wait"].append((t - read_end) * 1e6)
            marks["answer"].append((end - t) * 1e6)

    Connection.buffer_updated = timed_read  # type: ignore[method-assign]
    Connection._answered = timed_answered  # type: ignore[method-assign,assignment]


#: the stages' samples of the current run (instrument() appends, measure() reads and clears)
MARKS: Marks = {"read": [], "wait": [], "answer": []}


async def measure(inline: bool, queries: int) -> dict[str, Any]:
    service = StatsService(EmptySource(), ActorConfig(sync_interval=3600))
    await service.start()
    server = StatsServer(service, ServerConfig(host="127.0.0.1", port=0, inline_reads=inline))
    await server.start()
    try:
        wait = _harness.fork(_workers.socket_query_latency, server.port, 500, 1, 30.0)
        await asyncio.to_thread(wait, 60)  # warm-up, not recorded below
        for values in MARKS.values():
            values.clear()
        wait = _harness.fork(_workers.socket_query_latency, server.port, queries, 42, 30.0)
        client = await asyncio.to_thread(wait, 90)
    finally:
        await server.close(5)
        await service.stop(5)
    out = {name: percentiles(values, (50, 99)) for name, values in MARKS.items() if values}
    out["client"] = percentiles(client.get("latencies", []), (50, 99))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=5_000)
    parser.add_argument("--loop", choices=LOOPS, default="asyncio")
    args = parser.parse_args()
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    instrument(MARKS)
    load = os.getloadavg()
    _, run = runner(args.loop)
    results: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for inline in (False, True, False, True):  # alternating, two runs each
        results[inline].append(run(measure(inline, args.queries)))
    print(
        f"{args.loop}, {args.queries:,} bare-socket stats calls per run, "
        f"load average {load[0]:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    for inline, runs in results.items():
        print(f"  {'inline' if inline else 'mailbox'}:")
        for i, got in enumerate(runs, 1):
            cells = ", ".join(f"{name} {v['p50']:.1f}/{v['p99']:.0f}" for name, v in got.items())
            print(f"    run {i}: {cells} (µs, p50/p99)")


if __name__ == "__main__":
    main()
