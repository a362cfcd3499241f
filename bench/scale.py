"""Benchmark: one server against two shards, each following the same database (docs/scale.md).

    python -m bench.scale --runs 3 --increments 200000 --queries 5000

An embedded Postgres with wal_level=logical and 1,000 campaigns; ``campaignstats serve
--follow`` processes on TCP (one unsharded, or ``--shard 0/2`` and ``--shard 1/2``), each on
its own replication slot. Client processes are forked by bench/_harness.py and time themselves:

- ``ingest``: two client processes, each ``increment_many`` of ``--increments`` increments in
  batches of 1,000, then ``flush``; to the one server with a ``StatsClient``, to the pair with a
  ``RoutingClient`` (each increment to its owner, journaled until acknowledged).
- ``query``: two client processes, each ``--queries`` sequential ``stats`` calls of random
  campaigns; the same clients.

Figures are the medians of ``--runs`` runs (bench/_harness.py's ``summary``). The machine has
two cores: the servers, Postgres and the clients share them, so a second shard adds no core;
what this measures is the cost of routing and of a second server process on the same cores,
not the gain of a second machine (docs/scale.md, "How far"). Results go to
bench/results/scale.json. Every loop is bounded by its input and a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench._harness import append_result, fork, free_port, machine, summary
from campaignstats.client import StatsClient
from campaignstats.client.routing import RoutingClient
from campaignstats.db.embedded import EmbeddedPostgres, create_database, with_database
from campaignstats.db.schema import init_db
from campaignstats.model import Increment

CAMPAIGNS = 1_000


def _items(n: int, seed: int) -> list[Increment]:
    rng = random.Random(seed)
    return [
        Increment(rng.randint(1, CAMPAIGNS), rng.randint(1, 20), "register", "DE", i % 3 == 0)
        for i in range(n)
    ]


def _client(urls: list[str]) -> Any:
    if len(urls) == 1:
        return StatsClient(urls[0], queue_size=1_000_000, timeout=120)
    return RoutingClient(
        [[u] for u in urls], queue_size=1_000_000, max_unacked=1_000_000, timeout=120
    )


def ingest(urls: list[str], n: int, seed: int, limit: float) -> dict[str, Any]:
    client = _client(urls)
    client.stats(1)  # connected (every shard: below) before the clock starts
    for cid in range(1, 50):
        client.stats(cid)
    items = _items(n, seed)
    t0 = time.perf_counter()
    deadline = t0 + limit
    done = 0
    for start in range(0, n, 1_000):
        client.increment_many(items[start : start + 1_000])
        done = start + 1_000
        if time.perf_counter() > deadline:
            break
    client.flush()
    seconds = time.perf_counter() - t0
    client.close()
    return {"n": min(done, n), "seconds": seconds, "cut": done < n}


def query(urls: list[str], n: int, seed: int, limit: float) -> dict[str, Any]:
    client = _client(urls)
    rng = random.Random(seed)
    ids = [rng.randint(1, CAMPAIGNS) for _ in range(n)]
    for cid in ids[:200]:
        client.stats(cid)
    t0 = time.perf_counter()
    deadline = t0 + limit
    done = 0
    for cid in ids:
        client.stats(cid)
        done += 1
        if done % 500 == 0 and time.perf_counter() > deadline:
            break
    seconds = time.perf_counter() - t0
    client.close()
    return {"n": done, "seconds": seconds, "cut": done < n}


def _parallel(fn: Any, urls: list[str], n: int, limit: float) -> float:
    """Two client processes at once; total per second (from the slower one's time)."""
    waits = [fork(fn, urls, n, seed, limit) for seed in (1, 2)]
    results = [w(limit + 60) for w in waits]
    for r in results:
        if "error" in r:
            raise RuntimeError(r["error"])
        if r["cut"]:
            raise RuntimeError(f"cut by the deadline: {r}")
    return float(sum(r["n"] for r in results) / max(r["seconds"] for r in results))


async def _database(where: Path) -> tuple[EmbeddedPostgres, str]:
    pg = EmbeddedPostgres(where, delete_on_close=True)
    pg.start()
    pg.enable_logical_replication()
    admin = pg.dsn()
    await create_database(admin, "scale", drop_existing=True)
    dsn = with_database(admin, "scale")
    conn = await asyncpg.connect(dsn)
    try:
        await init_db(conn)
        await conn.execute(
            "INSERT INTO orgs (id, name) SELECT i, 'o' || i FROM generate_series(1, 20) i;"
            f"INSERT INTO campaigns (id, name, status) "
            f"SELECT i, 'c' || i, 1 FROM generate_series(1, {CAMPAIGNS}) i;"
            "ALTER TABLE actions REPLICA IDENTITY FULL;"
            "ALTER TABLE supporters REPLICA IDENTITY FULL;"
            "ALTER TABLE action_pages REPLICA IDENTITY FULL;"
            "DO $$ BEGIN IF to_regclass('messages') IS NOT NULL THEN "
            "ALTER TABLE messages REPLICA IDENTITY FULL; END IF; END $$;"
        )
    finally:
        await conn.close()
    return pg, dsn


def _serve(dsn: str, slot: str, port: int, *options: str) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "campaignstats.cli", "--log-level", "warning",
        "serve", "--dsn", dsn, "--host", "127.0.0.1", "--port", str(port), "--no-http",
        "--follow", "--slot", slot, "--sync-interval", "3600", *options,
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with StatsClient(url, timeout=2) as client:
                info = client.info()
                if info["calculations"]["loaded"] and info.get("follower", {}).get("running"):
                    return
        except (OSError, ConnectionError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not start in {timeout} s")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def measure(dsn: str, args: argparse.Namespace) -> dict[str, Any]:
    """Both layouts side by side (all three servers up all along, each following), their runs
    interleaved, so that the load of the machine weighs on both alike."""
    ports = [free_port() for _ in range(3)]
    procs = [
        _serve(dsn, "bench_one", ports[0]),
        _serve(dsn, "bench_s0", ports[1], "--shard", "0/2"),
        _serve(dsn, "bench_s1", ports[2], "--shard", "1/2"),
    ]
    layouts = {
        "one": [f"tcp://127.0.0.1:{ports[0]}"],
        "two_shards": [f"tcp://127.0.0.1:{p}" for p in ports[1:]],
    }
    runs: dict[str, dict[str, list[float]]] = {
        layout: {"ingest": [], "query": []} for layout in layouts
    }
    try:
        for url in (u for urls in layouts.values() for u in urls):
            _ready(url)
        for _ in range(args.runs):
            for layout, urls in layouts.items():
                runs[layout]["ingest"].append(_parallel(ingest, urls, args.increments, 120))
            for layout, urls in layouts.items():
                runs[layout]["query"].append(_parallel(query, urls, args.queries, 120))
    finally:
        _stop(procs)
    return {
        layout: {
            "ingest_per_s": summary(r["ingest"]),
            "query_per_s": summary(r["query"]),
            "ingest_runs": r["ingest"],
            "query_runs": r["query"],
        }
        for layout, r in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--increments", type=int, default=200_000, help="per client process")
    parser.add_argument("--queries", type=int, default=5_000, help="per client process")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scalebench") as tmp:
        pg, dsn = asyncio.run(_database(Path(tmp)))
        try:
            results = measure(dsn, args)
        finally:
            pg.close()
    load = os.getloadavg()
    record = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(load_average=[round(x, 2) for x in load]),
        "increments_per_client": args.increments,
        "queries_per_client": args.queries,
        "client_processes": 2,
        "results": results,
    }
    path = append_result("scale", record)
    for layout, r in results.items():
        print(
            f"{layout:>10}: ingest {r['ingest_per_s']['median']:,.0f}/s, "
            f"queries {r['query_per_s']['median']:,.0f}/s"
        )
    print(f"load average {load[0]:.2f}; results in {path}")


if __name__ == "__main__":
    main()
