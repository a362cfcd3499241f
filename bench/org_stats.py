"""Benchmark: ``org_stats`` over an org's campaigns, unpacked and packed (docs/design.md,
"Memory", round 3).

    python -m bench.org_stats                   # an org in 10,000 campaigns, 7 runs each
    python -m bench.org_stats --campaigns 20000 --runs 9

In one process, on StatsState directly: every campaign has the org, five orgs of its own, six
action types and six areas. Then ``org_stats`` of the shared org, timed in CPU seconds, with the
campaigns unpacked (hot) and then packed (idle; read through the org map alone, which leaves
them packed), and the same with every packed campaign's three maps decoded (what it did before
the org map was read alone). Prints medians and bests per read and per campaign.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

from campaignstats.model import Increment, StatsState

NOW = 1_750_000_000.0


def filled(campaigns: int) -> StatsState:
    state = StatsState()
    state.clock = lambda: NOW
    state.apply_many(
        [
            Increment(cid, 1 if i == 0 else 1_000 + cid * 10 + i, f"action-{i}", f"AR{i}", True)
            for cid in range(1, campaigns + 1)
            for i in range(6)
        ]
    )
    return state


def timed(read: Callable[[], object], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.process_time()
        read()
        out.append(time.process_time() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--campaigns", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    if args.campaigns < 1 or args.runs < 1:
        parser.error("--campaigns and --runs are at least 1")
    state = filled(args.campaigns)
    want = state.org_stats(1)
    hot = timed(lambda: state.org_stats(1), args.runs)
    state.pack_idle = 300.0
    state.pack_idle_campaigns(list(state.campaigns), NOW + 1_000)
    assert state.packed_count() == args.campaigns
    assert state.org_stats(1) == want
    idle = timed(lambda: state.org_stats(1), args.runs)
    assert state.packed_count() == args.campaigns  # read, not unpacked

    def decoding_all() -> dict[int, int]:  # the read before the org map was read alone
        return {
            cid: n
            for cid in state.org_campaigns.campaigns(1)
            if (n := state.campaigns[cid].maps()[2].get(1, 0))
        }

    assert decoding_all() == want["campaigns"]
    before = timed(decoding_all, args.runs)
    print(
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC, load "
        f"{os.getloadavg()[0]:.2f}: org_stats of an org in {args.campaigns:,} campaigns, "
        f"{args.runs} runs each, CPU time"
    )
    for name, secs in (
        ("unpacked (hot)", hot),
        ("packed, the org map alone", idle),
        ("packed, all three maps", before),
    ):
        med, best = statistics.median(secs), min(secs)
        print(
            f"  {name:26} {1e3 * med:8.2f} ms (best {1e3 * best:.2f}), "
            f"{1e6 * med / args.campaigns:.2f} µs per campaign"
        )


if __name__ == "__main__":
    main()
