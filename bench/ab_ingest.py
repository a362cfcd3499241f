"""A/B of single ``inc`` messages on one connection: this tree's server against another tree's,
interleaved, with Redis's HINCRBY stream in the same run.

    python -m bench.ab_ingest --base /tmp/base-tree [--rounds 5] [--n 200000]

``--base`` is a plain copy of another commit (``git archive <commit> | tar -x -C DIR``): its
server runs from there (``python -m bench._server`` with that directory first on the path),
this tree's from here. Each round runs, in an order that alternates from round to round, a
fresh server of each tree and Redis (one redis-server for the whole run, emptied before each
of its runs). Each run sends the pre-encoded stream once to warm the campaigns' keys (as
``bench.run``'s earlier workloads do), then times the same stream again, then a ``flush``
(bench/_workers.py ``raw_blast``, the row "raw: single inc, 1 conn" of ``bench.run``); a run
counts only if the server's totals then equal twice the workload's. Redis gets
``bench.run``'s RESP stream of HINCRBY commands (``--redis-n`` increments, 500,000 as in
``bench.run``), timed until every reply is read, and its hashes are checked the same way.

Prints each run's rate, then per side the median and range, and the ratios of the medians
(each tree against Redis, and this tree against the base); the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from bench import _data, _harness, _redis, _workers

SEED = 42
HERE = Path(__file__).parent.parent


def ours(tree: Path, stream: bytes, n: int, expected: _data.Totals, limit: float) -> float | None:
    server = _harness.TreeServer(tree)
    try:
        warm = _harness.in_child(_workers.raw_blast, server.port, [stream], n, limit, timeout=90)
        r = _harness.in_child(_workers.raw_blast, server.port, [stream], n, limit, timeout=90)
        if "error" in warm or "error" in r or r["cut"] or r["errors"]:
            print(f"    {tree}: failed: {warm} {r}")
            return None
        wire = _workers.raw_call(server.port, "stats_many", list(range(1, _data.CAMPAIGNS + 1)))
        if not _data.same(_data.wire_totals(wire), expected):
            print(f"    {tree}: the totals DO NOT MATCH")
            return None
        return float(r["n"] / r["seconds"])
    finally:
        server.stop()


def redis(
    port: int, stream: tuple[bytes, int], n: int, expected: _data.Totals, limit: float
) -> float | None:
    _redis.flushall(port)
    r = _harness.in_child(_redis.raw_blast, port, [stream], n, limit, timeout=90)
    if "error" in r or r.get("cut"):
        print(f"    redis: failed: {r}")
        return None
    if not _data.same(_redis.totals(port), expected):
        print("    redis: the totals DO NOT MATCH")
        return None
    return float(r["n"] / r["seconds"])


def _summary(values: list[float]) -> str:
    if not values:
        return "no valid run"
    return f"{statistics.median(values):,.0f}/s ({min(values):,.0f}-{max(values):,.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="a copy of the other tree")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=200_000, help="single inc messages per run")
    parser.add_argument("--redis-n", type=int, default=500_000, help="increments for Redis")
    parser.add_argument("--limit", type=float, default=60.0, help="seconds a run may take")
    args = parser.parse_args()
    problem = _redis.ensure_redis(print)
    if problem is not None:
        raise SystemExit(f"no Redis peer: {problem}")
    items = _data.generate(max(args.n, args.redis_n), SEED)
    stream = _data.encode_incs(items[: args.n], 1)
    twice = _data.expected(items[: args.n] * 2)
    resp = _redis.encode_resp(items[: args.redis_n])
    redis_expected = _data.expected(items[: args.redis_n])
    sides = {"base": args.base.resolve(), "this": HERE}
    rates: dict[str, list[float]] = {"base": [], "this": [], "redis": []}
    load0 = os.getloadavg()
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC, load {load0}")
    print(f"  single inc x {args.n:,} on 1 connection; Redis: {resp[1]:,} HINCRBY commands")
    with _redis.redis_server() as port:
        for k in range(args.rounds):
            order = ["base", "this", "redis"] if k % 2 == 0 else ["redis", "this", "base"]
            for side in order:
                if side == "redis":
                    rate = redis(port, resp, args.redis_n, redis_expected, args.limit)
                else:
                    rate = ours(sides[side], stream, args.n, twice, args.limit)
                if rate is not None:
                    rates[side].append(rate)
                shown = "-" if rate is None else f"{rate:,.0f}/s"
                print(f"  round {k + 1}: {side:5} {shown}", flush=True)
    load1 = os.getloadavg()
    print(f"load before {load0}, after {load1}")
    for side, values in rates.items():
        print(f"  {side:5} {_summary(values)}")
    med = {side: statistics.median(v) for side, v in rates.items() if v}
    if "redis" in med:
        for side in ("base", "this"):
            if side in med:
                print(f"  {side} / redis: {med[side] / med['redis']:.2f}x")
    if "base" in med and "this" in med:
        print(f"  this / base: {med['this'] / med['base']:.3f}x")


if __name__ == "__main__":
    main()
