"""Benchmark: commit-to-visible latency when following the database (docs/follow.md).

    python -m bench.follow --rates 500 5000 --seconds 10 --data-dir /tmp/followbench

An embedded Postgres with wal_level=logical; the stats service and the follower in this process;
writers in a forked process commit one action per transaction (a new supporter and its accepted
action, in one statement, the way a Proca signature lands) at a fixed rate, spread over
``--writers`` connections, each on a campaign of its own so that its commits are ordered. Each
commit's time is taken when its statement returns; this process polls the counts every
millisecond and notes when each campaign's count first reaches each value. Latency = first seen
- commit returned (a little under the true figure: the commit happened before its reply).
Percentiles are bench/_harness.py's (nearest rank). Every loop is bounded by ``--seconds``.
Results go to bench/results/follow.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import time
from typing import Any

import structlog

from bench._harness import append_result, fork, machine, percentiles
from campaignstats.actor.actor import ActorConfig
from campaignstats.db.embedded import EmbeddedPostgres, create_database, with_database
from campaignstats.db.schema import init_db
from campaignstats.db.source import PostgresSource
from campaignstats.follower import Follower, drop_slot
from campaignstats.service import StatsService

_SIGN = """
WITH s AS (
    INSERT INTO supporters (campaign_id, action_page_id, fingerprint, area, processing_status,
                            dupe_rank)
    VALUES ($1, $1, $2, 'DE', 3, 0) RETURNING id)
INSERT INTO actions (supporter_id, action_type, campaign_id, action_page_id, processing_status)
SELECT id, 'register', $1, $1, 3 FROM s
"""


async def _write(dsn: str, rate: float, seconds: float, writers: int) -> dict[str, Any]:
    import asyncpg

    conns = [await asyncpg.connect(dsn) for _ in range(writers)]
    commits: list[list[float]] = [[] for _ in range(writers)]
    start = time.time() + 0.2
    per_writer = rate / writers

    async def writer(w: int) -> None:
        conn = conns[w]
        k = 0
        while True:
            due = start + k / per_writer
            if due > start + seconds:
                return
            delay = due - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            fp = os.urandom(16)
            await conn.execute(_SIGN, w + 1, fp)
            commits[w].append(time.time())
            k += 1

    await asyncio.gather(*(writer(w) for w in range(writers)))
    for c in conns:
        await c.close()
    return {"commits": commits, "start": start}


def _writer_process(dsn: str, rate: float, seconds: float, writers: int) -> dict[str, Any]:
    return asyncio.run(_write(dsn, rate, seconds, writers))


async def _prepare(data_dir: str, writers: int) -> tuple[EmbeddedPostgres, str]:
    import asyncpg

    pg = EmbeddedPostgres(data_dir)
    admin = pg.start()
    pg.enable_logical_replication()
    for slot in ("bench_follow",):
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE slot_name = $1",
                slot,
            )
        finally:
            await conn.close()
    await create_database(admin, "followbench", drop_existing=True)
    dsn = with_database(admin, "followbench")
    conn = await asyncpg.connect(dsn)
    try:
        await init_db(conn)
        await conn.execute("INSERT INTO orgs (id, name) VALUES (1, 'org')")
        for c in range(1, writers + 1):
            await conn.execute("INSERT INTO campaigns (id, name) VALUES ($1, 'c')", c)
            await conn.execute(
                "INSERT INTO action_pages (id, name, campaign_id, org_id) VALUES ($1, 'p', $1, 1)",
                c,
            )
    finally:
        await conn.close()
    return pg, dsn


async def measure(
    dsn: str, rate: float, seconds: float, writers: int, retain_bytes: int = 256 * 1024
) -> dict[str, Any]:
    follower = Follower(dsn, slot="bench_follow", configure=True, retain_bytes=retain_bytes)
    await follower.prepare()
    service = StatsService(PostgresSource(dsn), ActorConfig(sync_interval=60))
    await service.start()
    task = asyncio.create_task(follower.run(service, full_calculation_pending=True))
    campaigns = list(range(1, writers + 1))
    try:
        async with asyncio.timeout(30):
            await service.loaded()
        base = {c: (await service.stats(c))["action"].get("register", 0) for c in campaigns}
        seen: dict[int, list[float]] = {c: [] for c in campaigns}
        wait = fork(_writer_process, dsn, rate, seconds, writers)
        cpu0 = time.process_time()
        deadline = time.time() + seconds + 10
        expected = int(rate / writers * seconds) + 1
        while time.time() < deadline:  # bounded
            now = time.time()
            many = await service.stats_many(campaigns)
            for c in campaigns:
                n = many[c]["action"].get("register", 0) - base[c]
                while len(seen[c]) < n:
                    seen[c].append(now)
            if all(len(seen[c]) >= expected for c in campaigns):
                break
            await asyncio.sleep(0.001)
        cpu = time.process_time() - cpu0
        written = wait(seconds + 30)
        status = follower.status()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await service.stop()
        await _drop(dsn)
    latencies: list[float] = []
    missing = 0
    for w, commits in enumerate(written["commits"]):
        for k, t_commit in enumerate(commits):
            got = seen[w + 1]
            if k < len(got):
                latencies.append(max(0.0, got[k] - t_commit))
            else:
                missing += 1
    total = sum(len(c) for c in written["commits"])
    # Commits never seen in the bounded window count as later than 1 s: the share within 1 s
    # is the honest figure when the follower falls behind (the percentiles are of those seen).
    within = sum(1 for x in latencies if x <= 1.0) / total if total else float("nan")
    return {
        "rate_asked": rate,
        "retain_bytes": retain_bytes,
        "rate_written": round(total / seconds, 1),
        "commits": total,
        "not_seen": missing,
        "within_1s": round(within, 4),
        "load_average": os.getloadavg(),
        "seen_per_campaign": [len(seen[c]) for c in campaigns],
        "written_per_campaign": [len(c) for c in written["commits"]],
        "latency_s": {k: round(v, 4) for k, v in percentiles(latencies).items()},
        "max_s": round(max(latencies), 4) if latencies else None,
        "server_cpu_s_per_s": round(cpu / seconds, 3),
        "follower": {
            k: status[k]
            for k in (
                "rounds",
                "transactions",
                "last_round_seconds",
                "lag_bytes",
                "inexact",
                "seconds",
            )
        },
    }


async def _drop(dsn: str) -> None:
    await drop_slot(dsn, "bench_follow")


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    pg, dsn = await _prepare(args.data_dir, args.writers)
    try:
        runs = []
        for rate in args.rates:
            result = await measure(dsn, rate, args.seconds, args.writers, args.retain_bytes)
            print(
                f"{rate:>6} actions/s: written {result['rate_written']}/s, "
                f"p50 {result['latency_s']['p50'] * 1000:.1f} ms, "
                f"p99 {result['latency_s']['p99'] * 1000:.1f} ms, "
                f"max {(result['max_s'] or 0) * 1000:.1f} ms, not seen {result['not_seen']}, "
                f"within 1 s {result['within_1s']:.2%}, load {result['load_average'][0]:.1f}, "
                f"server process CPU {result['server_cpu_s_per_s']} s/s, "
                f"rounds {result['follower']['rounds']}"
            )
            runs.append(result)
    finally:
        pg.close()
    return {"bench": "follow", "at": time.time(), "machine": machine(), "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[500.0, 5000.0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--data-dir", default="/tmp/followbench")
    parser.add_argument(
        "--retain-bytes",
        type=int,
        default=256 * 1024,
        help="WAL retained by the slot before the follower logs a running-transactions record "
        "(a huge value: Postgres's own record every 15 s only)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    result = asyncio.run(main_async(args))
    print("written to", append_result("follow", result))


if __name__ == "__main__":
    main()
