"""Where the server's time goes while bench.run's workload 2 runs (increment_many of 1,000).

    python -m bench.ingest_profile [--n 1000000] [--seconds 15]

Starts bench/_server.py, runs workload 2 (bench/_workers.client_batches) in a forked child
and samples the server with py-spy (the [bench] extra) meanwhile, then sorts the samples into
the stages of the ingest path by the innermost frame of ours that they are in: socket read,
decode (the codec), the session and the service (queueing), apply_many, the event loop and the
rest. Prints each stage's share of the samples and, from the server's CPU time over the run
(/proc), the µs of server CPU per increment it stands for.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import _data, _harness, _workers

#: stage of a sample: the first rule (innermost frame first) whose text is in a frame
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("apply_many", ("model.py",)),
    ("decode (codec)", ("protocol.py",)),
    ("socket read", ("sock_recv", "recv_into", "_read_ready", "recv (")),
    ("session", ("sessions/",)),
    ("actor, service", ("actor/", "service.py", "mailbox")),
    ("server", ("server.py",)),
    ("event loop", ("asyncio", "selectors", "uvloop")),
]


def stage_of(stack: str) -> str:
    frames = stack.split(";")[::-1]  # innermost first
    for frame in frames:
        for stage, marks in STAGES:
            if any(mark in frame for mark in marks):
                return stage
    return "other"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        sys.exit("py-spy is not installed (the [bench] extra)")
    items = _data.generate(args.n, 42)
    server = subprocess.Popen(
        [sys.executable, "-m", "bench._server", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    assert server.stdout is not None
    try:
        port = int(server.stdout.readline().split()[1])
        out = Path(f"/tmp/bench-ingest-profile-{os.getpid()}.txt")
        cpu0 = cpu_seconds(server.pid)
        wait = _harness.fork(_workers.client_batches, port, items, 1000, 60.0)
        command = [exe, "record", "-p", str(server.pid), "-d", str(int(args.seconds))]
        command += ["-r", "250", "-f", "raw", "-o", str(out), "--nonblocking"]
        spy = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        result = wait(120)
        cpu = cpu_seconds(server.pid) - cpu0
        spy.wait(60)
        print(
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC, load "
            f"{os.getloadavg()[0]:.2f}: workload 2, {result['n']:,} increments in "
            f"{result['seconds']:.2f} s ({result['n'] / result['seconds']:,.0f}/s); server CPU "
            f"{cpu:.2f} s, {1e6 * cpu / result['n']:.2f} µs per increment"
        )
        if not out.exists():
            sys.exit(f"py-spy wrote nothing: {spy.stderr.read() if spy.stderr else ''}")
        stages: collections.Counter[str] = collections.Counter()
        busy = 0
        for line in out.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if "select (selectors" in stack.rsplit(";", 1)[-1]:
                continue  # idle: waiting in the selector
            stages[stage_of(stack)] += int(n)
            busy += int(n)
        out.unlink()
        per_inc = 1e6 * cpu / result["n"]
        print(f"  busy samples: {busy:,} (idle ones in select() left out)")
        for stage, samples in stages.most_common():
            share = samples / busy
            print(f"  {stage:16} {100 * share:5.1f}%  ~{share * per_inc:.2f} µs/inc")
    finally:
        server.terminate()
        server.wait(20)


if __name__ == "__main__":
    main()
