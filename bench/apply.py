"""Micro-bench of the server's ingest path in this process: decode, then StatsState.apply_many.

    python -m bench.apply                  # 1,000,000 items, 5 runs, the bench's workload
    python -m bench.apply --n 200000 --runs 3 --profile

The workload is bench.run's (bench/_data.py: 1,000 Zipf-skewed campaigns, seed 42), encoded as
``incs`` of 1,000 and decoded by the server's codec (msgspec items, as the actor receives them)
before any clock starts. Then, each on a fresh StatsState:

* ``decode``: ``ServerCodec.receive_data`` over the stream in 64 KiB reads (what the server does
  per read), the items kept;
* ``apply``: ``apply_many`` on the decoded items in slices of 250 (the actor's ``apply_slice``);
* ``apply, per item``: the per-item path (``StatsState.apply_each``, the general path and the
  reference the batched one is tested against), in the same slices;
* ``apply, journal``: ``apply`` while a calculation's journal records every campaign.

Times are this process's CPU time (the machine is shared: wall time measures the neighbours
too). Prints, per mode, the median and the best of increments per CPU second and µs per
increment, and the ratio of the batched apply to the per-item one (same run, interleaved).
Every apply's totals are compared with the per-item path's, key for key. ``--profile`` prints
cProfile's top functions for one apply run.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench import _data
from campaignstats.model import StatsState
from campaignstats.protocol import Batch, ServerCodec

_RECV = 1 << 16
SLICE = 250  # ActorConfig.apply_slice


def decoded(stream: bytes) -> list[Any]:
    """The items of every ``incs`` message in ``stream``, as the server's codec decodes them."""
    codec = ServerCodec()
    items: list[Any] = []
    for i in range(0, len(stream), _RECV):
        for msg in codec.receive_data(stream[i : i + _RECV]):
            assert isinstance(msg, Batch)
            items.extend(msg.items)
    return items


def time_decode(stream: bytes) -> float:
    codec = ServerCodec()
    chunks = [stream[i : i + _RECV] for i in range(0, len(stream), _RECV)]
    gc.collect()
    t0 = time.process_time()
    for chunk in chunks:
        codec.receive_data(chunk)
    return time.process_time() - t0


def _slices(items: Sequence[Any]) -> list[Sequence[Any]]:
    return [items[i : i + SLICE] for i in range(0, len(items), SLICE)]


def time_apply(slices: list[Sequence[Any]], how: str) -> tuple[float, dict[int, tuple[Any, ...]]]:
    state = StatsState()
    if how == "journal":
        state.start_journal()
    apply: Callable[[Sequence[Any]], object] = (
        state.apply_each if how == "each" else state.apply_many
    )
    gc.collect()
    t0 = time.process_time()
    for part in slices:
        apply(part)
    seconds = time.process_time() - t0
    totals = {
        cid: (s.supporters, dict(s.action), dict(s.area), dict(s.org), s.messages)
        for cid, s in state.campaigns.items()
    }
    return seconds, totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="increments (default 1M)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="cProfile one batched apply")
    args = parser.parse_args()
    items = _data.generate(args.n, 42)
    stream = _data.encode_incs(items, 1000)
    decoded_items = decoded(stream)
    assert len(decoded_items) == args.n
    slices = _slices(decoded_items)
    print(
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC, load {os.getloadavg()[0]:.2f}, "
        f"{args.n:,} increments, slices of {SLICE}, {args.runs} runs (interleaved)"
    )
    modes = ("decode", "apply", "apply, per item", "apply, journal")
    secs: dict[str, list[float]] = {mode: [] for mode in modes}
    reference = None
    for _ in range(args.runs):
        secs["decode"].append(time_decode(stream))
        for mode, how in (
            ("apply", "many"),
            ("apply, per item", "each"),
            ("apply, journal", "journal"),
        ):
            seconds, totals = time_apply(slices, how)
            if reference is None:
                reference = time_apply(slices, "each")[1]
            if totals != reference:
                raise SystemExit(f"{mode}: the totals differ from the per-item path's")
            secs[mode].append(seconds)
    for mode in modes:
        values = secs[mode]
        med = statistics.median(values)
        best = min(values)
        print(
            f"  {mode:16} {args.n / med:>11,.0f} inc/s  {1e6 * med / args.n:6.3f} µs/inc  "
            f"(best {args.n / best:,.0f} inc/s, {1e6 * best / args.n:.3f} µs/inc)"
        )
    for pick in (statistics.median, min):
        ratio = pick(secs["apply, per item"]) / pick(secs["apply"])
        print(f"  apply_many / apply_each, {pick.__name__}s: {ratio:.2f}x as fast")
    print("  totals equal to apply_each's in every run")
    print(f"  load average after: {os.getloadavg()[0]:.2f}")
    if args.profile:
        state = StatsState()
        profiler = cProfile.Profile()
        profiler.enable()
        for part in slices:
            state.apply_many(part)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
