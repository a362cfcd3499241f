"""Benchmark: what goals cost (docs/design.md, "Goals and milestones").

    python -m bench.goals              # a few seconds
    python -m bench.goals --runs 15

In one process, on StatsState and GoalKeeper directly (no sockets), best of --runs:

* look: the actor's look ten times a second, ``GoalKeeper.check`` over the campaigns whose
  supporters moved (``SupporterRanking.take_moved``), in ns per moved campaign, for 1,000 and
  100,000 moved campaigns (100,000 is what a full calculation leaves; the actor looks at them
  5,000 at a time: the slice's time is printed too);
* ingest: ns per increment through ``apply_many`` (batches of 1,000 over 1,000 campaigns, 60%
  new supporters), followed by the looks at the tick's pace. The hot path itself has no goals
  code: compare with the same script on a tree before goals (``ingest`` only).

Writes JSON to bench/results/goals.json (a list: each run appends).
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

from bench._harness import append_result, machine
from campaignstats.goals import GoalKeeper
from campaignstats.model import CampaignStats, Increment, StatsState

SLICE = 5_000


def look(runs: int, n: int) -> dict[str, Any]:
    state = StatsState()
    state.campaigns = {
        cid: CampaignStats(150, {"sign": 150}, {"DE": 150}) for cid in range(1, n + 1)
    }
    keeper = GoalKeeper()
    keeper.mark_loaded()
    keeper.check(range(1, n + 1), state.campaigns, 0.0)  # fires 100 once for each
    best = float("inf")
    for _ in range(runs):
        state.ranking.dirty.update(range(1, n + 1))
        t0 = time.perf_counter()
        keeper.check(state.ranking.take_moved(), state.campaigns, 0.0)
        best = min(best, time.perf_counter() - t0)
    per = best / n
    return {
        "moved": n,
        "ns_per_campaign": round(per * 1e9, 1),
        "ms_per_look": round(best * 1e3, 3),
        "ms_per_slice": round(per * min(n, SLICE) * 1e3, 3),
    }


def ingest(runs: int) -> dict[str, Any]:
    rng = random.Random(1)
    incs = [
        Increment(rng.randrange(1, 1001), 1, "sign", rng.choice([None, "DE"]), rng.random() < 0.6)
        for _ in range(200_000)
    ]
    batches = [incs[i : i + 1000] for i in range(0, len(incs), 1000)]
    plain = with_goals = float("inf")
    for _ in range(runs):
        state = StatsState()
        t0 = time.perf_counter()
        for batch in batches:
            state.apply_many(batch)
        plain = min(plain, time.perf_counter() - t0)
        state = StatsState()
        keeper = GoalKeeper()
        keeper.mark_loaded()
        t0 = time.perf_counter()
        for i, batch in enumerate(batches):
            state.apply_many(batch)
            if i % 10 == 9:  # about one look per 10,000 increments: 1M/s and 10 looks a second
                keeper.check(state.ranking.take_moved(), state.campaigns, 0.0)
        with_goals = min(with_goals, time.perf_counter() - t0)
    return {
        "ns_per_increment": round(plain / len(incs) * 1e9, 1),
        "ns_per_increment_with_looks": round(with_goals / len(incs) * 1e9, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    result: dict[str, Any] = {
        "machine": machine(),
        "look": [look(args.runs, n) for n in (1_000, 100_000)],
        "ingest": ingest(args.runs),
    }
    for row in result["look"]:
        print(
            f"look at {row['moved']:>7,} moved campaigns: {row['ns_per_campaign']:>6} ns each, "
            f"{row['ms_per_look']} ms in all, {row['ms_per_slice']} ms per slice of {SLICE:,}"
        )
    ingest_row = result["ingest"]
    print(
        f"apply_many: {ingest_row['ns_per_increment']} ns/increment; with the looks at 1M/s "
        f"pace: {ingest_row['ns_per_increment_with_looks']} ns/increment"
    )
    print(f"written to {append_result('goals', result)}")


if __name__ == "__main__":
    main()
