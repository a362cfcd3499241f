"""Benchmark: our full calculation against Proca's own queries, on the same demo database.

    python -m bench.calculation --actions 1000000 --runs 5 --data-dir /tmp/calcbench

Builds the demo database once (named by actions and seed) in an embedded Postgres under
``--data-dir`` and reuses it afterwards. Runs Proca's queries (bench/proca_queries.py, sequential on
one connection) and ours (``calculate()``, with a helper connection unless ``--no-helper``)
alternately, checks that the org, action and extra-supporter maps agree, prints a table and writes
JSON to bench/results/calculation-<date>.json. Medians, min and max are bench/_harness.py's, as in
every benchmark here.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import resource
import time
from typing import Any

import structlog

from bench._harness import append_result, machine, summary
from bench.proca_queries import proca_calculate
from campaignstats.db.calculation import calculate
from campaignstats.db.demo import fill_demo
from campaignstats.db.embedded import EmbeddedPostgres, create_database, with_database
from campaignstats.db.schema import init_db
from campaignstats.model import CampaignStats


async def ensure_database(admin_dsn: str, actions: int, seed: int) -> str:
    """The DSN of a demo database of ``actions`` actions; built (and vacuumed) on first use."""
    import asyncpg

    name = f"calcbench_{actions}_s{seed}"
    await create_database(admin_dsn, name)
    dsn = with_database(admin_dsn, name)
    conn = await asyncpg.connect(dsn)
    try:
        await init_db(conn)
        have = await conn.fetchval("SELECT coalesce(max(id), 0) FROM actions")
        if have != actions:
            if have:
                await conn.execute(
                    "TRUNCATE orgs, campaigns, action_pages, supporters, actions CASCADE"
                )
            print(f"building {name} ({actions:,} actions)...", flush=True)
            await fill_demo(conn, actions=actions, seed=seed, progress=False)
            # As autovacuum would leave it: visibility map set, statistics fresh.
            await conn.execute(
                "VACUUM (ANALYZE) orgs, campaigns, action_pages, supporters, actions"
            )
    finally:
        await conn.close()
    return dsn


def compare(ours: dict[int, CampaignStats], proca: dict[int, CampaignStats]) -> list[str]:
    """Differences in the comparable maps (org, action, extra_supporters)."""
    problems = []
    if set(ours) != set(proca):
        problems.append(f"campaigns differ: {sorted(set(ours) ^ set(proca))[:5]}")
    for cid in sorted(set(ours) & set(proca)):
        a, b = ours[cid], proca[cid]
        for field in ("org", "action", "extra_supporters"):
            if getattr(a, field) != getattr(b, field):
                problems.append(f"campaign {cid}: {field} differs")
    return problems


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import asyncpg

    pg = EmbeddedPostgres(args.data_dir)
    admin = pg.start()
    try:
        dsn = await ensure_database(admin, args.actions, args.seed)
        conn = await asyncpg.connect(dsn)
        helper = None if args.no_helper else await asyncpg.connect(dsn)
        proca_conn = await asyncpg.connect(dsn)
        try:
            proca_times: list[float] = []
            our_times: list[float] = []
            problems: list[str] = []
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            rss_peak = rss_before
            # One untimed warm-up of each, so that both start with the same cache.
            await proca_calculate(proca_conn, args.scope)
            await calculate(conn, args.scope, helper_conn=helper)
            for i in range(args.runs):
                order = ("proca", "ours") if i % 2 == 0 else ("ours", "proca")
                for who in order:
                    t = time.perf_counter()
                    if who == "proca":
                        proca = await proca_calculate(proca_conn, args.scope)
                        proca_times.append(time.perf_counter() - t)
                    else:
                        result = await calculate(conn, args.scope, helper_conn=helper)
                        our_times.append(time.perf_counter() - t)
                        rss_peak = max(rss_peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
                problems += compare(result.campaigns, proca)
        finally:
            await conn.close()
            await proca_conn.close()
            if helper is not None:
                await helper.close()
    finally:
        pg.close()
    p, o = summary(proca_times), summary(our_times)
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "actions": args.actions,
        "seed": args.seed,
        "scope": args.scope,
        "runs": args.runs,
        "helper_connection": not args.no_helper,
        "proca_seconds": p,
        "ours_seconds": o,
        "ratio_median": p["median"] / o["median"],
        "peak_rss_mb_during_ours": rss_peak / 1024,
        "rss_mb_before": rss_before / 1024,
        "mismatches": sorted(set(problems)),
        "proca_times": proca_times,
        "our_times": our_times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--actions", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--scope", choices=("all", "live"), default="all")
    parser.add_argument("--data-dir", default="/tmp/calcbench")
    parser.add_argument("--no-helper", action="store_true", help="ours on one connection only")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    out = asyncio.run(run(args))
    p, o = out["proca_seconds"], out["ours_seconds"]
    m = out["machine"]
    print(f"\n{out['date']}  {m['cpu']}, {m['cores']} cores")
    print(
        f"{out['actions']:,} actions, scope {out['scope']}, {out['runs']} runs, "
        f"helper connection: {out['helper_connection']}"
    )
    print(f"{'':8s}{'median':>9s}{'min':>9s}{'max':>9s}")
    for name, s in (("proca", p), ("ours", o)):
        print(f"{name:8s}{s['median']:9.3f}{s['min']:9.3f}{s['max']:9.3f}")
    print(f"ratio (proca / ours, medians): {out['ratio_median']:.2f}x")
    print(f"peak RSS of this process: {out['peak_rss_mb_during_ours']:.0f} MB")
    print("maps equal (org, action, extra)" if not out["mismatches"] else out["mismatches"])
    path = append_result(f"calculation-{dt.date.today().isoformat()}", out)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
