"""Custom metrics: updates per second through the model and the log, and bytes per unique set.

    python -m bench.metrics [--runs 5] [--updates 200000] [--batch 1000]

* **updates/s**: pre-validated UPDATEs (a mix: counters with and without dims, gauges, members,
  seen) applied in batches through :class:`~campaignstats.metrics.store.MetricsStore`
  (``apply_many`` then ``commit``: the model, the log's encoding and one ``write`` per batch), for
  each fsync policy, in a temporary directory; also the model alone, and the validator's rate.
* **bytes per unique set**: the serialized size (what the snapshot and the log's rewrite hold)
  and the resident memory per set (RSS growth over many sets, divided), at 10**2 to 10**6
  members.

Medians of ``--runs`` runs (bench/_harness.py); the machine and the figures go to
bench/results/metrics.json.

    python -m bench.metrics --compaction [--runs 5] [--campaigns 2000 20000]

* **compaction**: a state of N campaigns with unique sets (a CPC sketch each, and a dimension
  of three keys with small sets) behind its log; (1) in the store: the copy taken at once on the
  owner's thread (``begin_compaction()``), the same copy in slices (``sliced=True`` then
  ``step(SLICE_BUDGET)`` until done: the total and the longest slice) and the file's write;
  (2) in a running service (an actor whose calculation never ends, one metric cast a
  millisecond on random campaigns): the longest stall of the event loop while a periodic
  compaction runs (a task sleeping 0.5 ms measures how late it wakes), and the compaction's
  time from its start to its finish (``info()["metrics"]["last_compaction"]``). Medians of
  ``--runs`` runs, to bench/results/metrics-compaction.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack

from bench._harness import append_result, machine, rss_bytes, summary
from campaignstats.metrics import MetricsState, MetricsStore, MetricUpdate, UniqueSet
from campaignstats.metrics.update import make_update, update_from_map


def workload(n: int, seed: int = 1) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    countries = ["de", "fr", "es", "it", "pl", "nl", "be", "at"]
    items: list[dict[str, Any]] = []
    for i in range(n):
        cid = rng.randrange(1, 200)
        kind = i % 5
        if kind == 0:
            items.append({"campaign": cid, "incr": {"shares": 1}})
        elif kind == 1:
            items.append(
                {"campaign": cid, "dims": {"country": rng.choice(countries)}, "incr": {"clicks": 1}}
            )
        elif kind == 2:
            items.append({"campaign": cid, "gauge": {"online": rng.random() * 100}})
        elif kind == 3:
            items.append({"campaign": cid, "member": {"visitors": f"v{rng.randrange(10**6)}"}})
        else:
            items.append({"campaign": cid, "seen": ["visit"]})
    return items


def checked(items: list[dict[str, Any]]) -> list[MetricUpdate]:
    out = []
    for item in items:
        update = update_from_map(item)
        assert isinstance(update, MetricUpdate)
        out.append(update)
    return out


def run_store(updates: list[MetricUpdate], batch: int, policy: str | None) -> float:
    """Updates per second; ``policy`` None: the model alone, no log."""
    with tempfile.TemporaryDirectory() as tmp:
        if policy is None:
            state = MetricsState()
            now = time.time()
            started = time.perf_counter()
            for update in updates:
                state.apply(update, now)
            return len(updates) / (time.perf_counter() - started)
        store = MetricsStore.open(Path(tmp) / "m.log", fsync=policy)  # type: ignore[arg-type]
        started = time.perf_counter()
        for i in range(0, len(updates), batch):
            store.apply_many(updates[i : i + batch])
            store.commit()
        elapsed = time.perf_counter() - started
        store.log.close()
        return len(updates) / elapsed


def unique_bytes(members: int, sets: int) -> dict[str, float]:
    """Measured in a fresh interpreter: memory freed by earlier work would hide the growth."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.metrics", "--unique-child", str(members), str(sets)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    result: dict[str, float] = json.loads(out.splitlines()[-1])
    return result


def unique_bytes_here(members: int, sets: int) -> dict[str, float]:
    gc.collect()
    before = rss_bytes()
    kept = []
    serialized = 0
    for s in range(sets):
        u = UniqueSet()
        batch = [f"{s}-{i}" for i in range(min(members, 10_000))]
        for start in range(0, members, 10_000):
            u.add(batch if start == 0 else [f"{s}-{i}" for i in range(start, start + 10_000)])
        serialized += len(msgpack.packb(u.to_state()))
        kept.append(u)
    rss = (rss_bytes() - before) / sets
    return {"members": members, "serialized_bytes": serialized / sets, "rss_bytes": rss}


# -- compaction ---------------------------------------------------------------------------------


def build_state(path: Path, campaigns: int) -> int:
    """A metrics log and snapshot of ``campaigns`` campaigns with unique sets; their bytes."""
    store = MetricsStore.open(path, fsync="no")
    now = time.time()
    countries = ("de", "fr", "es")
    for cid in range(1, campaigns + 1):
        members = [f"v{cid}-{i}" for i in range(200)]  # past 128: a CPC sketch
        store.apply(make_update(cid, incr={"views": 200}, member={"visitors": members}, at=now))
        for country in countries:
            people = [f"p{i}" for i in range(5)]
            store.apply(
                make_update(
                    cid, dims={"country": country}, incr={"clicks": 1}, member={"people": people}
                )
            )
    store.close(snapshot=True)
    return path.with_name(path.name + ".snapshot").stat().st_size


def store_compaction(path: Path) -> dict[str, float]:
    """The compaction's parts in the store alone (no actor): at once, in slices, the write."""
    from campaignstats.metrics.store import write_snapshot

    store = MetricsStore.open(path, fsync="no")
    out: dict[str, float] = {}
    started = time.perf_counter()
    compaction = store.begin_compaction()  # the copy at once, as an owner without slices
    out["copy_at_once"] = time.perf_counter() - started
    started = time.perf_counter()
    write_snapshot(store.snapshot_path, compaction)
    out["write"] = time.perf_counter() - started
    store.finish_compaction(compaction)
    try:
        from campaignstats.actor.metrics import SLICE_BUDGET

        sliced = store.begin_compaction(sliced=True)
    except (ImportError, TypeError):  # a release without slices
        store.log.close()
        return out
    longest = total = 0.0
    slices = 0
    done = False
    while not done:
        started = time.perf_counter()
        done = sliced.step(SLICE_BUDGET)
        spent = time.perf_counter() - started
        total += spent
        longest = max(longest, spent)
        slices += 1
    out.update(copy_sliced_total=total, copy_longest_slice=longest, slices=slices)
    store.log.close()
    return out


class _NeverDone:
    """A calculation source that never answers: the actor serves its mailbox meanwhile."""

    async def calculate(self, scope: Any) -> Any:
        await asyncio.Event().wait()


async def service_compaction(path: Path, campaigns: int) -> dict[str, Any]:
    """The longest event-loop stall while a running service compacts, and the compaction's
    total time; one metric cast a millisecond meanwhile, on random campaigns."""
    from campaignstats.actor.actor import ActorConfig
    from campaignstats.actor.metrics import MetricsConfig
    from campaignstats.service import StatsService

    config = ActorConfig(
        sync_interval=3600,
        metrics=MetricsConfig(appendonly=path, appendfsync="no", snapshot_interval=2.0),
    )
    service = StatsService(_NeverDone(), config)
    await service.start()
    await service.flush()  # the log is loaded
    gaps: list[float] = []
    stop = asyncio.Event()

    async def probe() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            await asyncio.sleep(0.0005)
            gaps.append(time.perf_counter() - started - 0.0005)

    async def load() -> None:
        rng = random.Random(7)
        for _ in range(60_000):  # bounded: at most a minute
            if stop.is_set():
                return
            service.metric(rng.randrange(1, campaigns + 1), incr={"views": 1})
            await asyncio.sleep(0.001)

    tasks = [asyncio.create_task(probe()), asyncio.create_task(load())]
    started = time.perf_counter()
    info: dict[str, Any] = {}
    while time.perf_counter() - started < 30:  # bounded: one compaction is due after 2 s
        await asyncio.sleep(0.05)
        info = (await service.info())["metrics"]
        if info["compactions"] >= 1:
            break
    stop.set()
    await asyncio.gather(*tasks)
    await service.stop()
    gaps.sort()
    return {
        "longest_stall": gaps[-1] if gaps else math.nan,
        "p99_stall": gaps[int(len(gaps) * 0.99)] if gaps else math.nan,
        "compactions": info.get("compactions"),
        "last_compaction": info.get("last_compaction"),
    }


def compaction_bench(runs: int, sizes: list[int]) -> None:
    result: dict[str, Any] = {"machine": machine(), "runs": runs, "campaigns": {}}
    for campaigns in sizes:
        store_runs: list[dict[str, float]] = []
        service_runs: list[dict[str, Any]] = []
        for _ in range(runs):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "m.log"
                snapshot_bytes = build_state(path, campaigns)
                store_runs.append(store_compaction(path))
                gc.collect()
                service_runs.append(asyncio.run(service_compaction(path, campaigns)))
        figures: dict[str, Any] = {"snapshot_bytes": snapshot_bytes}
        for key in store_runs[0]:
            figures[key] = summary([r[key] for r in store_runs])
        for key in ("longest_stall", "p99_stall"):
            figures[key] = summary([r[key] for r in service_runs])
        totals = [r["last_compaction"]["seconds"] for r in service_runs if r["last_compaction"]]
        if totals:
            figures["compaction_seconds"] = summary(totals)
            figures["service_longest_slice"] = summary(
                [r["last_compaction"]["longest_slice"] for r in service_runs]
            )
        figures["service_runs"] = service_runs
        result["campaigns"][campaigns] = figures
        print(f"{campaigns:,} campaigns ({snapshot_bytes:,} snapshot bytes), medians of {runs}:")
        for key, value in figures.items():
            if isinstance(value, dict) and "median" in value:
                median, low, high = value["median"], value["min"], value["max"]
                print(f"  {key:24} {median:.4f} (min {low:.4f}, max {high:.4f})")
    print("written to", append_result("metrics-compaction", result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--updates", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--compaction", action="store_true", help="the compaction's stalls")
    parser.add_argument("--campaigns", type=int, nargs="+", default=[2_000, 20_000])
    parser.add_argument("--unique-child", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.unique_child:
        print(json.dumps(unique_bytes_here(*args.unique_child)))
        return
    if args.compaction:
        compaction_bench(args.runs, args.campaigns)
        return
    items = workload(args.updates)
    rates: dict[str, list[float]] = {"validate": []}
    for _ in range(args.runs):
        started = time.perf_counter()
        updates = checked(items)
        rates["validate"].append(len(items) / (time.perf_counter() - started))
        for policy in (None, "no", "everysec", "always"):
            name = "model only" if policy is None else f"model + log, fsync {policy}"
            rates.setdefault(name, []).append(run_store(updates, args.batch, policy))
    throughput = {name: summary(values) for name, values in rates.items()}
    sizes = [
        unique_bytes(n, sets)
        for n, sets in ((10**2, 2000), (10**3, 500), (10**4, 200), (10**5, 50), (10**6, 10))
    ]
    result = {
        "machine": machine(),
        "updates": args.updates,
        "batch": args.batch,
        "runs": args.runs,
        "updates_per_second": throughput,
        "unique_set_bytes": sizes,
    }
    for name, s in throughput.items():
        print(f"{name:32} median {s['median']:>12,.0f} updates/s (min {s['min']:,.0f})")
    for row in sizes:
        print(
            f"unique set of {row['members']:>9,} members: {row['serialized_bytes']:>8,.0f} B "
            f"serialized, {row['rss_bytes']:>8,.0f} B resident"
        )
    print("written to", append_result("metrics", result))


if __name__ == "__main__":
    main()
