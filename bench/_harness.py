"""The one harness of every benchmark in bench/: forking, timing, percentiles, the machine.

Every figure that bench/ reports goes through here, so that "p99" or "median" means the same
thing in ``bench.run``, ``bench.soak`` and ``bench.calculation``:

- :func:`percentile` is the **nearest-rank** percentile: the smallest sample such that at least
  ``p`` percent of the samples are less than or equal to it (no interpolation: every figure
  reported is a latency that was measured). With 20,000 samples, p99 is the 19,800th smallest.
- :func:`summary` is the median (``statistics.median``: the mean of the two middle values of an
  even count), min and max of the runs of a workload; the bench reports medians of runs.
- :func:`fork` runs a workload in a forked child process (client processes share nothing with
  the parent's threads or event loop) and hands back its result dict; a child that does not
  answer in time is killed and reported as an error, never waited for without bound.
- :func:`time_each` is the one timing loop of the latency workloads.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"

#: The percentiles that latency figures report.
LATENCY_PERCENTILES = (50.0, 99.0, 99.9)

_CTX = mp.get_context("fork")


# -- statistics -----------------------------------------------------------------------------


def percentile(values: Iterable[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile (0 < p <= 100) of ``values``; NaN when empty.

    The sample at rank ``ceil(p / 100 * n)`` (1-based) of the sorted values: p50 of
    ``[1, 2, 3, 4]`` is 2, p99 of 100 samples is the 99th smallest, p100 the largest.
    """
    ordered = sorted(values)
    if not ordered:
        return math.nan
    if not 0 < p <= 100:
        raise ValueError(f"percentile {p} is not in (0, 100]")
    # Rounded first: 99.9 / 100 * 20_000 is 19980.000000000004 in floating point, rank 19,980.
    rank = math.ceil(round(p / 100 * len(ordered), 9))
    return ordered[max(rank, 1) - 1]


def percentiles(
    values: Iterable[float], ps: Sequence[float] = LATENCY_PERCENTILES
) -> dict[str, float]:
    """``{"p50": ..., "p99": ..., "p99.9": ...}`` by :func:`percentile`, from one sort."""
    ordered = sorted(values)
    return {f"p{p:g}": percentile(ordered, p) for p in ps}


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of the runs of one workload (NaN for no runs)."""
    if not values:
        return {"median": math.nan, "min": math.nan, "max": math.nan}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# -- processes --------------------------------------------------------------------------------

Waiter = Callable[[float], dict[str, Any]]


def fork(fn: Callable[..., dict[str, Any]], *args: Any) -> Waiter:
    """Run ``fn(*args)`` in a forked process; returns ``wait(timeout)`` for its result dict.

    An exception in the child comes back as ``{"error": "Type: message"}``; a child with no
    result within ``timeout`` seconds is killed and gives ``{"error": "no result in N s"}``.
    """
    recv, send = _CTX.Pipe(duplex=False)

    def target() -> None:
        try:
            send.send(fn(*args))
        except BaseException as exc:
            send.send({"error": f"{type(exc).__name__}: {exc}"})

    proc = _CTX.Process(target=target, daemon=True)
    proc.start()
    send.close()

    def wait(timeout: float) -> dict[str, Any]:
        if recv.poll(timeout):
            result: dict[str, Any] = recv.recv()
        else:
            result = {"error": f"no result in {timeout:.0f} s"}
            proc.kill()
        proc.join(5)
        recv.close()
        return result

    return wait


def in_child(fn: Callable[..., dict[str, Any]], *args: Any, timeout: float) -> dict[str, Any]:
    """``fn(*args)`` in a forked process, waited for (see :func:`fork`)."""
    return fork(fn, *args)(timeout)


def event() -> Any:
    """An event that forked children share with the parent (to stop a background load)."""
    return _CTX.Event()


# -- timing -----------------------------------------------------------------------------------


def time_each(call: Callable[[Any], object], args: list[Any], limit: float) -> dict[str, Any]:
    """Latency in µs of ``call(arg)`` for each arg, after 500 warm-up calls, within ``limit`` s.

    ``cut`` is true when the deadline stopped the loop before the last arg: such a run does not
    count.
    """
    for arg in args[:500]:
        call(arg)
    clock = time.perf_counter
    out: list[float] = []
    deadline = clock() + limit
    for arg in args:
        t = clock()
        call(arg)
        out.append((clock() - t) * 1e6)
        if t > deadline:
            break
    return {"latencies": out, "cut": len(out) < len(args)}


# -- the machine ------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(**extra: Any) -> dict[str, Any]:
    """What every result file records about where it was measured."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        **extra,
    }


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of ``pid`` (default: this process), from /proc."""
    with open(f"/proc/{pid or 'self'}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- results ----------------------------------------------------------------------------------


def append_result(stem: str, result: dict[str, Any]) -> Path:
    """Append ``result`` to bench/results/<stem>.json (a list: one entry per run)."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{stem}.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    runs = runs if isinstance(runs, list) else [runs]
    runs.append(result)
    path.write_text(json.dumps(runs, indent=1, default=str) + "\n")
    return path


class TreeServer:
    """``python -m bench._server`` of a source tree (this one, or another's for an A/B) in a
    child process, on a free port; ``args`` are more of ``bench._server``'s options."""

    def __init__(self, tree: Path, args: Sequence[str] = ()) -> None:
        env = {**os.environ, "PYTHONPATH": str(tree)}  # that tree's server
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench._server", "--port", "0", *args],
            stdout=subprocess.PIPE,
            text=True,
            cwd=tree,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"the server of {tree} did not start: {line!r}")
        self.port = int(line.split()[1])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
