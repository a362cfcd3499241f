"""Benchmark: the cost of buckets in time and of ``top`` (docs/design.md, "Time").

    python -m bench.timeline                 # about a minute
    python -m bench.timeline --campaigns 100000

In one process, on StatsState directly (no sockets), medians of --runs:

* ingest: ns per increment through ``apply_many`` (batches of 1,000 over 1,000 campaigns), the
  hot path with the buckets; compare with the same script run on a tree before them;
* memory: bytes per campaign of the buckets (tracemalloc), for three activity profiles, and of
  its pages (STATS, buckets, indexes) when its changes name them;
* top: the time of a ``top`` call at --campaigns campaigns after 1,000 changes, by each figure,
  against sorting every campaign (what a scan would cost).

Writes JSON to bench/results/timeline.json (a list: each run appends).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import tracemalloc
from typing import Any

from bench._harness import append_result, machine
from campaignstats.model import Increment, StatsState
from campaignstats.timeline import DAY, HOUR

NOW = 1_750_000_000.0


def ingest(runs: int) -> dict[str, Any]:
    rng = random.Random(1)
    incs = [
        Increment(
            rng.randrange(1, 1001),
            rng.randrange(1, 6),
            rng.choice(["register", "share"]),
            rng.choice([None, "DE", "FR"]),
            rng.random() < 0.7,
        )
        for _ in range(200_000)
    ]
    batches = [incs[i : i + 1000] for i in range(0, len(incs), 1000)]
    times = []
    for _ in range(runs):
        state = StatsState()
        t0 = time.perf_counter()
        for batch in batches:
            state.apply_many(batch)
        times.append((time.perf_counter() - t0) / len(incs) * 1e9)
    return {"ns_per_increment": round(statistics.median(times)), "runs": [round(t) for t in times]}


PROFILES: dict[str, list[float]] = {
    # one action now
    "one action": [0.0],
    # an action every 10 minutes for two days
    "every 10 min, 2 days": [i * 600.0 for i in range(288)],
    # an action every hour for 90 days, and one a day for two years before
    "hourly 90 days + daily 2 years": [i * float(HOUR) for i in range(90 * 24)]
    + [90.0 * DAY + i * DAY for i in range(730)],
}


def memory(campaigns: int) -> dict[str, int]:
    out = {}
    for name, backs in PROFILES.items():
        state = StatsState()
        state.clock = lambda: NOW
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for back in backs:
            state.apply_many(
                [
                    Increment(c, 1, "sign", None, True, at=NOW - back)
                    for c in range(1, campaigns + 1)
                ]
            )
        for timeline in state.timelines.values():
            timeline.flush()
        # The buckets alone: the counts' own dicts measured apart and taken out.
        with_all = tracemalloc.get_traced_memory()[0] - before
        state.timelines.clear()
        without = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        out[name] = round((with_all - without) / campaigns)
    return out


def pages_memory(campaigns: int, per_campaign: int = 4) -> dict[str, int]:
    """Bytes per campaign of its pages (STATS, buckets and indexes; docs/design.md, "Action
    pages and orgs"), ``per_campaign`` pages each, an action every 10 minutes for two days
    spread over them; and what the same changes without ``page`` add to the page state (0)."""
    out = {}
    for with_pages in (True, False):
        state = StatsState()
        state.clock = lambda: NOW
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i, back in enumerate(PROFILES["every 10 min, 2 days"]):
            state.apply_many(
                [
                    Increment(
                        c,
                        1 + i % per_campaign,
                        "sign",
                        "DE",
                        True,
                        at=NOW - back,
                        page=c * per_campaign + i % per_campaign if with_pages else None,
                    )
                    for c in range(1, campaigns + 1)
                ]
            )
        for timeline in state.page_timelines.values():
            timeline.flush()
        with_all = tracemalloc.get_traced_memory()[0] - before
        state.pages.clear()
        state.page_timelines.clear()
        state.pages_of.clear()
        state.org_pages.clear()
        without = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        name = f"{per_campaign} pages, every 10 min, 2 days" if with_pages else "no page"
        out[name] = round((with_all - without) / campaigns)
    return out


def top(campaigns: int, runs: int) -> dict[str, Any]:
    rng = random.Random(2)
    state = StatsState()
    state.clock = lambda: NOW
    batch = [
        Increment(c, 1, "sign", None, True, at=NOW - rng.randrange(0, 90 * DAY))
        for c in range(1, campaigns + 1)
        for _ in range(3)
    ]
    state.apply_many(batch)
    for by in ("supporters", "last_hour", "today"):
        state.top(by, 10)
    out: dict[str, Any] = {"campaigns": campaigns}
    for by in ("supporters", "last_hour", "today"):
        times = []
        for _ in range(runs):
            changes = [
                Increment(rng.randrange(1, campaigns + 1), 1, "sign", None, True)
                for _ in range(1000)
            ]
            state.apply_many(changes)
            t0 = time.perf_counter()
            state.top(by, 10)
            times.append((time.perf_counter() - t0) * 1e3)
        out[f"{by}_ms_after_1000_changes"] = round(statistics.median(times), 3)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sorted((-s.supporters, cid) for cid, s in state.campaigns.items())[:10]
        times.append((time.perf_counter() - t0) * 1e3)
    out["scan_sort_ms"] = round(statistics.median(times), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--campaigns", type=int, default=100_000)
    parser.add_argument("--memory-campaigns", type=int, default=2_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    result: dict[str, Any] = {"machine": machine()}
    result["ingest"] = ingest(args.runs)
    print("ingest:", result["ingest"])
    result["bytes_per_campaign"] = memory(args.memory_campaigns)
    print("buckets, bytes per campaign:", result["bytes_per_campaign"])
    result["page_bytes_per_campaign"] = pages_memory(args.memory_campaigns)
    print("pages, bytes per campaign:", result["page_bytes_per_campaign"])
    result["top"] = top(args.campaigns, args.runs)
    print("top:", result["top"])
    print("written to", append_result("timeline", result))


if __name__ == "__main__":
    main()
