"""A/B of the full calculation: this tree's ``calculate()`` against an earlier commit's.

    python -m bench.calculation_ab --base 3fb2bf4,e63bcc7 --actions 1000000 --runs 5

The machine is shared and noisy, so both run in the same process on the same demo database (built
once by bench/calculation.py's ``ensure_database``), alternately, with one untimed warm-up each,
and the figures are medians. The base commit's ``db/`` modules (``calculation.py``,
``queries.py`` and what they import) are read with ``git show`` into a temporary package and run
against this tree's model (their result type only gained fields since). 3fb2bf4 is the last
commit before the time buckets.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
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
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def run(
    args: argparse.Namespace, bases: dict[str, Any]
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    import asyncpg

    pg = EmbeddedPostgres(args.data_dir)
    admin = pg.start()
    names = [*bases, "ours"]
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
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
                    c, t = backend_cpu(pids), time.perf_counter()
                    await runners[name]()
                    times[name].append(time.perf_counter() - t)
                    cpu[name].append(backend_cpu(pids) - c)
        finally:
            for conn in conns:
                await conn.close()
    finally:
        pg.close()
    return times, cpu


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
        times, cpu = asyncio.run(run(args, bases))
    print(f"{args.actions:,} actions, scope {args.scope}, {args.runs} runs, interleaved")
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


if __name__ == "__main__":
    main()
