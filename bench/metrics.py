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
"""

from __future__ import annotations

import argparse
import gc
import json
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
from campaignstats.metrics.update import update_from_map


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--updates", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--unique-child", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.unique_child:
        print(json.dumps(unique_bytes_here(*args.unique_child)))
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
