"""Query latency A/B: queries answered inline (the actor's read door) against the mailbox path.

    python -m bench.latency                      # 3 rounds, asyncio and uvloop, about 3 minutes
    python -m bench.latency --rounds 5 --loops asyncio --queries 10000

Each round starts a fresh server process (bench/_server.py) for every configuration, in turn
(loop x ``--inline-reads`` on/off), so that the configurations share the machine's state of the
moment; it loads the same 100,000 increments (1,000 campaigns) into it, then times, from a
forked client process:

- ``stats()`` through :class:`~campaignstats.client.StatsClient` (the README's row), idle;
- ``stats()`` through :class:`~campaignstats.client.AsyncStatsClient`, idle;
- ``stats`` over a bare socket (no client), idle, and ``ping`` (answered without the actor);
- ``stats()`` through ``StatsClient`` while another process sends ``incs`` of 1,000 at half
  the server's one-connection rate (measured once at the start, on the mailbox path).

``--base DIR`` (a copy of another commit's tree: ``git archive <commit> | tar -x -C DIR``)
runs every configuration a second time with that tree's server, in turn with this tree's (the
order reversed every other round); the clients are this tree's either way.

Prints, per configuration, the median over the rounds of each percentile (nearest-rank, of
``--queries`` sequential calls after 500 warm-up calls), the min-max, the load average before
and after, and the targets (README, "Measured"). Appends the figures to
bench/results/latency-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import importlib.util
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench import _data, _harness, _workers
from bench._harness import percentiles

SEED = 42
ROOT = Path(__file__).parent.parent

#: (row, label, target µs or None): the targets of the query rows
TARGETS: dict[str, float] = {
    "client.idle.p50": 60,
    "client.idle.p99": 150,
    "client.load.p99": 1000,
}
ROWS = [
    ("client.idle", "stats() via StatsClient, idle"),
    ("aio.idle", "stats() via AsyncStatsClient, idle"),
    ("socket.idle", "stats over a bare socket, idle"),
    ("ping.idle", "ping over a bare socket (no actor), idle"),
    ("client.load", "stats() via StatsClient, at half load"),
]


def start_server(
    loop: str, inline: bool, extra: list[str] | None = None, tree: Path = ROOT
) -> _harness.TreeServer:
    """The bench's server of ``tree`` on ``loop``, answering reads inline or through the mailbox."""
    args = ["--loop", loop, *(extra or [])]
    if not inline:
        args.append("--no-inline-reads")
    return _harness.TreeServer(tree, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--queries", type=int, default=5_000, help="timed calls per run")
    parser.add_argument("--loops", default="asyncio,uvloop", help="comma-separated")
    parser.add_argument("--rate", type=float, help="load in inc/s (default: half of measured)")
    parser.add_argument("--limit", type=float, default=30.0, help="seconds a timed loop may take")
    parser.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="ARGS",
        help="server options to compare, e.g. --server '--read-size 8192' (repeatable; each is "
        "run with inline reads on and off; default: the server's defaults)",
    )
    parser.add_argument(
        "--work", default=",".join(k for k, _ in ROWS), help="rows to measure, comma-separated"
    )
    parser.add_argument("--inline-only", action="store_true", help="skip the mailbox runs")
    parser.add_argument(
        "--base",
        type=Path,
        help="a copy of another commit's tree (git archive): its server runs each configuration "
        "too, in turn with this tree's (the clients are this tree's)",
    )
    args = parser.parse_args()
    loops = [name for name in args.loops.split(",") if name]
    if "uvloop" in loops and importlib.util.find_spec("uvloop") is None:
        sys.exit("uvloop is not installed (pip install -e '.[bench]')")
    variants = args.server or [""]
    modes = (True,) if args.inline_only else (False, True)
    trees = [ROOT] if args.base is None else [args.base.resolve(), ROOT]
    configs = [
        (loop, inline, v, tree)
        for loop in loops
        for v in variants
        for inline in modes
        for tree in trees
    ]
    t0 = time.monotonic()

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - t0:5.0f}s] {msg}", flush=True)

    items = _data.generate(200_000, SEED)
    fill = [_data.encode_incs(items[:100_000], 1000)]
    batches = [_data.encode_incs(items[i : i + 1000], 1000) for i in range(0, 200_000, 1000)]
    load_before = os.getloadavg()
    say(f"load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")

    rate = args.rate
    if rate is None:
        server = start_server(loops[0], False)
        try:
            r = _harness.in_child(
                _workers.raw_blast, server.port, [b"".join(batches)], 200_000, 60, timeout=90
            )
        finally:
            server.stop()
        rate = r["n"] / r["seconds"] / 2
        say(f"one connection, incs of 1,000: {2 * rate:,.0f} inc/s; load at {rate:,.0f} inc/s")

    Config = tuple[str, bool, str, Path]
    runs: dict[Config, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))

    def named(loop: str, inline: bool, variant: str, tree: Path = ROOT) -> str:
        return (
            f"{loop}, {'inline' if inline else 'mailbox'}"
            + (f", {variant}" if variant else "")
            + ("" if tree == ROOT else f", server of {tree}")
        )

    failures: list[str] = []
    for round_ in range(args.rounds):
        order = configs if round_ % 2 == 0 else configs[::-1]  # neither always first
        for loop, inline, variant, tree in order:
            name = named(loop, inline, variant, tree)
            server = start_server(loop, inline, variant.split(), tree)
            try:
                _harness.in_child(_workers.raw_blast, server.port, fill, 100_000, 60, timeout=90)
                seed = SEED + round_
                ping = functools.partial(_workers.socket_query_latency, op="ping")
                work: list[tuple[str, Any, tuple[Any, ...] | None]] = [
                    ("client.idle", _workers.query_latency, None),
                    ("aio.idle", _workers.aio_query_latency, None),
                    ("socket.idle", _workers.socket_query_latency, None),
                    ("ping.idle", ping, None),
                    ("client.load", _workers.query_latency, (batches, 1000, rate)),
                ]
                line = []
                wanted = args.work.split(",")
                for key, fn, load in (w for w in work if w[0] in wanted):
                    wait_load = None
                    if load is not None:
                        stop = _harness.event()
                        wait_load = _harness.fork(
                            _workers.paced_load, server.port, *load, stop, args.limit
                        )
                        time.sleep(0.5)
                    r = _harness.in_child(
                        fn, server.port, args.queries, seed, args.limit, timeout=args.limit + 30
                    )
                    if wait_load is not None:
                        stop.set()
                        wait_load(args.limit + 30)
                    if "error" in r or r.get("cut"):
                        failures.append(f"{name} {key} round {round_ + 1}: {r.get('error', 'cut')}")
                        continue
                    for p, value in percentiles(r["latencies"]).items():
                        runs[loop, inline, variant, tree][f"{key}.{p}"].append(value)
                    got = runs[loop, inline, variant, tree]
                    line.append(f"{key} {got[key + '.p50'][-1]:.0f}/{got[key + '.p99'][-1]:.0f}")
                say(f"round {round_ + 1} {name}: " + ", ".join(line) + " µs (p50/p99)")
            finally:
                server.stop()
    load_after = os.getloadavg()
    say(f"load average {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")

    print()
    print(
        f"query latency, medians of {args.rounds} rounds (min-max), {args.queries:,} calls "
        f"each, µs; load at {rate:,.0f} inc/s; {os.cpu_count()} cores, load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    table: dict[str, Any] = {}
    for loop, inline, variant, tree in configs:
        got = runs[loop, inline, variant, tree]
        name = named(loop, inline, variant, tree)
        table[name] = {}
        print(f"  {name}")
        for key, label in ROWS:
            cells = []
            for p in ("p50", "p99", "p99.9"):
                values = got.get(f"{key}.{p}", [])
                if not values:
                    cells.append(f"{p} --")
                    continue
                med = statistics.median(values)
                table[name][f"{key}.{p}"] = {"median": med, "values": values}
                cells.append(f"{p} {med:,.0f} ({min(values):,.0f}-{max(values):,.0f})")
            print(f"    {label:45s} " + ", ".join(cells))
        for key, goal in TARGETS.items():
            values = got.get(key, [])
            if values:
                med = statistics.median(values)
                mark = "MET " if med <= goal else "MISS"
                print(f"    [{mark}] {key}: {med:,.0f} µs (target <= {goal:,.0f} µs)")
    for failure in failures:
        print(f"  failed: {failure}")
    out = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": _harness.machine(),
        "rounds": args.rounds,
        "queries": args.queries,
        "rate": rate,
        "loadavg": {"before": load_before, "after": load_after},
        "table": table,
        "failures": failures,
    }
    path = _harness.append_result(f"latency-{dt.date.today():%Y-%m-%d}", out)
    print(f"appended to {path}; {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
