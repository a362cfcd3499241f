"""A/B of the full calculation: this tree's ``calculate()`` against an earlier commit's.

    python -m bench.calculation_ab --base 3fb2bf4,e63bcc7 --actions 1000000 --runs 5

The machine is shared and noisy, so both run in the same process on the same demo database (built
once by bench/calculation.py's ``ensure_database``), alternately, with one untimed warm-up each,
and the figures are medians. The base commit's ``db/`` modules (``calculation.py``,
``queries.py`` and what they import) are read with ``git show`` into a temporary package and run
against this tree's model (their result type only gained fields since). 3fb2bf4 is the last
commit before the time buckets.

What each figure is (every one printed with the load average before and after the runs):

- wall: seconds of one ``calculate()`` call, as the caller waits for it;
- database CPU: user + system CPU seconds of the two database backends (``/proc/<pid>/stat``)
  during the call, both connections added up: the work the calculation asks of Postgres, less
  sensitive than wall time to the other load of a shared machine; also given per connection
  (main, helper), whose larger one bounds the wall time on two cores;
- client CPU: this process's own CPU seconds during the call (reading and folding the rows);
- the ratio of medians (each tree's median over its runs, divided), and the median and min of the
  per-pair ratios: run ``i`` of this tree against run ``i`` of each base, which ran next to
  it (the order alternates every round), so a slow spell of the machine weighs on both sides of
  a pair rather than on one tree's median.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from bench._harness import summary
from bench.calculation import ensure_database
from campaignstats.db.calculation import calculate
from campaignstats.db.embedded import EmbeddedPostgres


def load_base(commit: str, into: Path) -> Any:
    """The commit's ``calculate``, as the module ``calc_<commit>.calculation``."""
    package = into / f"calc_{commit}"
    package.mkdir()
    (package / "__init__.py").write_text("")
    listed = subprocess.run(
        ["git", "ls-tree", "--name-only", commit, "campaignstats/db/"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    # calculation.py, queries.py and what they import from the package (shared_people.py)
    names = [p.rsplit("/", 1)[1] for p in listed if p.endswith(".py")]
    for name in names:
        text = subprocess.run(
            ["git", "show", f"{commit}:campaignstats/db/{name}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        (package / name).write_text(text)
    if str(into) not in sys.path:
        sys.path.insert(0, str(into))
    return importlib.import_module(f"calc_{commit}.calculation").calculate


def backend_cpu(pids: list[int]) -> float:
    """CPU seconds the database backends of ``pids`` have used (user + system, from /proc):
    less sensitive than wall time to the other load of a shared machine."""
    return sum(backend_cpus(pids))


def backend_cpus(pids: list[int]) -> list[float]:
    """CPU seconds (user + system, from /proc) each database backend of ``pids`` has used."""
    per: list[float] = []
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        per.append((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return per


def client_cpu() -> float:
    """This process's CPU seconds (user + system)."""
    t = os.times()
    return t.user + t.system


def pair_ratios(ours: list[float], base: list[float]) -> list[float]:
    """Run ``i`` of one tree over run ``i`` of the base: the two ran next to each other."""
    return [a / b for a, b in zip(ours, base, strict=True) if b > 0]


def load() -> str:
    """The load average (1, 5, 15 minutes), as uptime prints it."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


Figures = dict[str, list[float]]


async def run(
    args: argparse.Namespace, bases: dict[str, Any]
) -> tuple[Figures, Figures, dict[str, list[list[float]]], Figures]:
    import asyncpg

    pg = EmbeddedPostgres(args.data_dir)
    admin = pg.start()
    names = [*bases, "ours"]
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    per_conn: dict[str, list[list[float]]] = {name: [] for name in names}
    client: dict[str, list[float]] = {name: [] for name in names}
    try:
        dsn = await ensure_database(admin, args.actions, args.seed)
        conns = [await asyncpg.connect(dsn) for _ in range(2)]
        pids = [conn.get_server_pid() for conn in conns]
        try:

            def runner(calc: Any) -> Callable[[], Awaitable[Any]]:
                return lambda: calc(conns[0], args.scope, helper_conn=conns[1])

            runners = {name: runner(calc) for name, calc in bases.items()}
            runners["ours"] = runner(calculate)
            for name in names:
                await runners[name]()  # warm-up, untimed
            for i in range(args.runs):
                for name in names if i % 2 == 0 else names[::-1]:
                    c, py, t = backend_cpus(pids), client_cpu(), time.perf_counter()
                    await runners[name]()
                    times[name].append(time.perf_counter() - t)
                    py_after, c_after = client_cpu(), backend_cpus(pids)
                    used = [b - a for a, b in zip(c, c_after, strict=True)]
                    cpu[name].append(sum(used))
                    per_conn[name].append(used)
                    client[name].append(py_after - py)
        finally:
            for conn in conns:
                await conn.close()
    finally:
        pg.close()
    return times, cpu, per_conn, client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--base", default="3fb2bf4", help="the commits to compare against, comma-separated"
    )
    parser.add_argument("--actions", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--scope", choices=("all", "live"), default="all")
    parser.add_argument("--data-dir", default="/tmp/calcbench")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory() as tmp:
        bases = {c: load_base(c, Path(tmp)) for c in args.base.split(",")}
        load_before = load()
        times, cpu, per_conn, client = asyncio.run(run(args, bases))
        load_after = load()
    print(f"{args.actions:,} actions, scope {args.scope}, {args.runs} runs, interleaved")
    print(f"load average before: {load_before}; after: {load_after}")
    print(f"{'':8s}{'median':>9s}{'min':>9s}{'max':>9s}")
    for name in times:
        s = summary(times[name])
        print(f"{name:8s}{s['median']:9.3f}{s['min']:9.3f}{s['max']:9.3f}")
    first = next(iter(bases))
    for name in times:
        ratio = summary(times[name])["median"] / summary(times[first])["median"]
        print(f"{name} / {first} (medians): {ratio:.2f}")
    print("runs:", {k: [round(t, 3) for t in v] for k, v in times.items()})
    print("database CPU seconds per calculation (both connections), medians:")
    for name in cpu:
        ratio = summary(cpu[name])["median"] / summary(cpu[first])["median"]
        print(f"  {name:8s}{summary(cpu[name])['median']:7.2f}  ({ratio:.2f} x {first})")
    print("cpu runs:", {k: [round(t, 2) for t in v] for k, v in cpu.items()})
    print("per connection (main, helper) and client CPU seconds, medians:")
    for name in cpu:
        main_s = statistics.median(u[0] for u in per_conn[name])
        helper_s = statistics.median(u[1] for u in per_conn[name])
        py = statistics.median(client[name])
        print(f"  {name:8s}main {main_s:6.2f}  helper {helper_s:6.2f}  client {py:6.2f}")
    print("per-pair ratios of ours (run i against the base's run i): median, min, each")
    for base in bases:
        for what, runs in (("wall", times), ("database CPU", cpu)):
            ratios = pair_ratios(runs["ours"], runs[base])
            print(
                f"  ours / {base} {what:13s} {statistics.median(ratios):.2f}"
                f"  {min(ratios):.2f}   {[round(r, 2) for r in ratios]}"
            )


if __name__ == "__main__":
    main()
