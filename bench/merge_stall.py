"""Event-loop stalls while a real service calculates and merges, on a demo database.

    python -m bench.merge_stall --actions 5000000 --calculations 3 --data-dir /tmp/pages-calcbench

Runs the stats service in this process (``StatsService`` with a ``PostgresSource`` on the demo
database of bench/calculation.py, as ``serve`` does), with increments arriving during each
calculation (``--rate`` per second, bounded: they are journaled and replayed by the merge), and a
probe task that sleeps 1 ms at a time and records how late it wakes: the longest lateness is the
longest stall of the event loop. Figures per calculation: the longest stall while the calculation
ran (it folds its rows in this loop, a chunk at a time), the longest stall that began while the
result was merged (from the result's arrival to the end of the merge: the service's
``calculation.merged`` log event, captured here, minus ``last_calculation.merge_duration``), and
the actor's own longest merge step (``longest_merge_step``: one step of at most
``merge_budget`` seconds, run without yielding). On a loaded machine a stall also holds the time
the process waited for a core.

The service runs with the gc policy, as ``serve`` does (``--no-gc-policy``: without it;
campaignstats.actor.gcpolicy), calculations 0.2 s apart. Every pass of the garbage collector is
recorded (``gc.callbacks``): per window, the passes of each generation and the longest, and the
collector's time inside the longest stall; and the stalls and full passes in the 100 ms after
each merge, where the policy's own pass runs. The figures are worked out once the probe has
stopped (going through its samples in the loop would stall what it measures).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import random
import time
from typing import Any

import structlog

from bench._harness import append_result, machine
from bench.calculation import ensure_database
from campaignstats.actor.actor import ActorConfig
from campaignstats.db.embedded import EmbeddedPostgres
from campaignstats.db.source import PostgresSource
from campaignstats.service import StatsService

PROBE_INTERVAL = 0.001


class Probe:
    """Wakes every millisecond and records (when, how late, the CPU time this thread used
    meanwhile) for each wake-up: the lateness holds the time the process waited for a core on
    a loaded machine, the CPU time only the work that held the event loop."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []
        self.running = True

    async def run(self) -> None:
        while self.running:
            t = time.perf_counter()
            c = time.thread_time()
            await asyncio.sleep(PROBE_INTERVAL)
            now = time.perf_counter()
            self.samples.append((now, now - t - PROBE_INTERVAL, time.thread_time() - c))

    def worst(self, since: float, until: float) -> tuple[float, float, float] | None:
        """The sample of the longest stall that began in [since, until]: (woke at, lateness,
        CPU time)."""
        inside = [s for s in self.samples if since <= s[0] - s[1] - PROBE_INTERVAL <= until]
        return max(inside, key=lambda s: s[1], default=None)

    def longest(self, since: float, until: float, *, cpu: bool = False) -> float:
        """The longest lateness (``cpu``: the longest CPU time between two wake-ups) of a
        wake-up late by a stall that began in [since, until]."""
        return max(
            (
                busy if cpu else lag
                for t, lag, busy in self.samples
                if since <= t - lag - PROBE_INTERVAL <= until
            ),
            default=0.0,
        )


class GcPasses:
    """Every pass of Python's garbage collector (``gc.callbacks``): (start, end, generation,
    objects collected), perf_counter seconds, to tell which stalls held one."""

    def __init__(self) -> None:
        self.passes: list[tuple[float, float, int, int]] = []
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.passes.append(
                (self._start, time.perf_counter(), info["generation"], info["collected"])
            )

    def within(self, since: float, until: float, generation: int) -> list[float]:
        """The durations of the passes of ``generation`` that began in [since, until]."""
        return [
            end - start
            for start, end, gen, _ in self.passes
            if gen == generation and since <= start <= until
        ]

    def during(self, woke: float, lateness: float) -> float:
        """Seconds of gc passes inside the stall that ended with a wake-up at ``woke``, late by
        ``lateness``."""
        began = woke - lateness - PROBE_INTERVAL
        return sum(max(0.0, min(end, woke) - max(start, began)) for start, end, _, _ in self.passes)


class Events:
    """When the service logged each event (perf_counter), kept here instead of printed: the
    merge's end is ``calculation.merged``, its start that minus the merge's duration."""

    def __init__(self) -> None:
        self.at: dict[str, list[float]] = {}

    def __call__(self, logger: Any, method: str, event_dict: Any) -> Any:
        self.at.setdefault(str(event_dict.get("event")), []).append(time.perf_counter())
        raise structlog.DropEvent


async def send_increments(
    service: StatsService, pages: list[tuple[int, int, int]], rate: float, until: asyncio.Event
) -> int:
    """``rate`` increments a second on the demo's pages until ``until`` is set; at most
    ``rate`` x 600 in all (bounded)."""
    sent = 0
    step = 0.01
    per_step = max(1, round(rate * step))
    limit = int(rate * 600)
    while not until.is_set() and sent < limit:
        for _ in range(per_step):
            cid, org, page = random.choice(pages)
            service.increment(cid, org, "register", new_supporter=True, page=page, at=time.time())
            sent += 1
        await asyncio.sleep(step)
    return sent


def _figures(
    probe: Probe,
    passes: GcPasses,
    last: dict[str, Any],
    sent: int,
    started: float,
    merge_from: float,
    merged_at: float,
) -> dict[str, Any]:
    """One calculation's figures: its stalls while calculating and while merging, their CPU
    time, and the garbage collector's passes in each window."""
    windows = {"calculating": (started, merge_from), "merging": (merge_from, merged_at)}
    gc_figures: dict[str, Any] = {}
    for name, (since, until) in windows.items():
        worst = probe.worst(since, until)
        gc_figures[f"gc_in_longest_stall_{name}_ms"] = (
            0.0 if worst is None else 1000 * passes.during(worst[0], worst[1])
        )
        for generation in (0, 1, 2):
            took = passes.within(since, until, generation)
            gc_figures[f"gc{generation}_passes_{name}"] = len(took)
            gc_figures[f"gc{generation}_longest_{name}_ms"] = 1000 * max(took, default=0.0)
    return {
        "calculation_s": last["duration"],
        "rows": last["rows"],
        "campaigns": last["campaigns"],
        "increments_sent": sent,
        "merge_s": last["merge_duration"],
        "longest_merge_step_ms": 1000 * last["longest_merge_step"],
        "merge_steps": last.get("merge_steps"),
        "longest_stall_merging_ms": 1000 * probe.longest(merge_from, merged_at),
        "longest_stall_calculating_ms": 1000 * probe.longest(started, merge_from),
        "longest_cpu_stall_calculating_ms": 1000 * probe.longest(started, merge_from, cpu=True),
        "longest_cpu_stall_merging_ms": 1000 * probe.longest(merge_from, merged_at, cpu=True),
        **gc_figures,
    }


async def run(args: argparse.Namespace, events: Events) -> dict[str, Any]:
    import asyncpg

    pg = EmbeddedPostgres(args.data_dir)
    admin = pg.start()
    try:
        dsn = await ensure_database(admin, args.actions, args.seed)
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch("SELECT campaign_id, org_id, id FROM action_pages")
        finally:
            await conn.close()
        pages = [(r[0], r[1], r[2]) for r in rows]
        # One calculation at start ("all"), then one per resync: never one by the clock.
        config = ActorConfig(sync_interval=86_400.0, gc_policy=not args.no_gc_policy)
        service = StatsService(PostgresSource(dsn), config)
        probe = Probe()
        passes = GcPasses()
        gc.callbacks.append(passes)
        probe_task = asyncio.create_task(probe.run())
        #: per calculation: last_calculation, increments sent, its start, its merge's start, end
        raw: list[tuple[dict[str, Any], int, float, float, float]] = []
        if not args.no_freeze:
            gc.freeze()  # as serve does before the service starts
        await service.start()
        try:
            for i in range(args.calculations):
                if i > 0:
                    # a pause as between two calculations of a server (seconds apart at least):
                    # the policy's pass after the merge runs in it
                    await asyncio.sleep(0.2)
                started = time.perf_counter()
                if i > 0:
                    assert await service.resync("all")
                done = asyncio.Event()
                sender = asyncio.create_task(send_increments(service, pages, args.rate, done))
                while True:
                    info = await service.info()
                    if info["calculations"]["completed"] > i:
                        break
                    await asyncio.sleep(0.005)
                done.set()
                sent = await sender
                last = info["last_calculation"]
                merged_at = events.at["calculation.merged"][i]
                # the figures are worked out once the probe has stopped: going through its
                # samples here would stall the loop it measures (tens of ms at 5M)
                raw.append((last, sent, started, merged_at - last["merge_duration"], merged_at))
            await asyncio.sleep(0.5)
            # the policy's passes: how many, the objects they freed (cycles), the last one's time
            quiet: dict[str, Any] = {"gc_policy_passes": (await service.info()).get("gc")}
        finally:
            probe.running = False
            await probe_task
            gc.callbacks.remove(passes)
            await service.stop()
    finally:
        pg.close()
    runs = [_figures(probe, passes, *r) for r in raw]
    # The policy's full pass runs just after each merge (campaignstats.actor.gcpolicy:
    # COLLECT_DELAY), before the next calculation: the full passes and the stalls that began in
    # the 100 ms after each merge's end.
    after = [(end, end + 0.1) for *_, end in raw]
    quiet.update(
        {
            "longest_stall_after_ms": 1000 * max(probe.longest(a, b) for a, b in after),
            "longest_cpu_stall_after_ms": 1000
            * max(probe.longest(a, b, cpu=True) for a, b in after),
            "gc2_longest_after_ms": 1000
            * max((t for a, b in after for t in passes.within(a, b, 2)), default=0.0),
        }
    )
    return {
        "machine": machine(),
        "actions": args.actions,
        "rate": args.rate,
        "gc_freeze": not args.no_freeze,
        "gc_policy": not args.no_gc_policy,
        "runs": runs,
        **quiet,
        "longest_stall_merging_ms": max(r["longest_stall_merging_ms"] for r in runs),
        "longest_merge_step_ms": max(r["longest_merge_step_ms"] for r in runs),
        "longest_stall_calculating_ms": max(r["longest_stall_calculating_ms"] for r in runs),
        "longest_cpu_stall_calculating_ms": max(
            r["longest_cpu_stall_calculating_ms"] for r in runs
        ),
        "load_average": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--actions", type=int, default=5_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--calculations", type=int, default=3)
    parser.add_argument("--rate", type=float, default=1000.0, help="increments per second")
    parser.add_argument("--data-dir", default="/tmp/calcbench")
    parser.add_argument(
        "--no-freeze", action="store_true", help="no gc.freeze() before the start (serve does)"
    )
    parser.add_argument(
        "--no-gc-policy",
        action="store_true",
        help="full gc passes whenever allocations call for them (serve holds them while a "
        "calculation runs or merges, and runs one after: campaignstats.actor.gcpolicy)",
    )
    args = parser.parse_args()
    if args.calculations < 1 or args.rate <= 0:
        parser.error("--calculations and --rate must be positive")
    events = Events()
    structlog.configure(
        processors=[events], wrapper_class=structlog.make_filtering_bound_logger(logging.INFO)
    )
    out = asyncio.run(run(args, events))
    for i, r in enumerate(out["runs"]):
        print(
            f"calculation {i + 1}: {r['calculation_s']:.2f} s, {r['rows']:,} rows, "
            f"{r['campaigns']} campaigns, {r['increments_sent']:,} increments during it; "
            f"merge {1000 * r['merge_s']:.1f} ms, "
            f"longest step {r['longest_merge_step_ms']:.1f} ms; "
            f"longest stall merging {r['longest_stall_merging_ms']:.1f} ms, "
            f"calculating {r['longest_stall_calculating_ms']:.1f} ms; "
            f"of which CPU of this process: merging {r['longest_cpu_stall_merging_ms']:.1f} ms, "
            f"calculating {r['longest_cpu_stall_calculating_ms']:.1f} ms; "
            f"gc in the longest stall: merging {r['gc_in_longest_stall_merging_ms']:.1f} ms, "
            f"calculating {r['gc_in_longest_stall_calculating_ms']:.1f} ms; full gc passes "
            f"calculating {r['gc2_passes_calculating']} (longest "
            f"{r['gc2_longest_calculating_ms']:.1f} ms), merging {r['gc2_passes_merging']} "
            f"(longest {r['gc2_longest_merging_ms']:.1f} ms)"
        )
    print(
        f"just after the merges (100 ms each): longest stall {out['longest_stall_after_ms']:.1f}"
        f" ms ({out['longest_cpu_stall_after_ms']:.1f} ms of CPU), "
        f"longest full gc pass {out['gc2_longest_after_ms']:.1f} ms; the policy's passes: "
        f"{out['gc_policy_passes']}"
    )
    path = append_result("merge_stall", out)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
