"""Benchmark: ingest, raw capacity, query latency and memory, against Redis in the same run.

    python -m bench.run            # full: about 5-8 minutes on 2 cores
    python -m bench.run --quick    # smoke version, 1-2 minutes
    python -m bench.run --uvloop   # the server on uvloop
    python -m bench.run --queries-only   # the query latency rows alone, with their targets
    python -m bench.run --ingest-only    # the ingest rows alone: ceilings, increment_many, raw incs
    make bench                     # installs what the bench needs, then python -m bench.run

A real server process (bench/_server.py: StatsService + StatsServer on 127.0.0.1, with an
in-bench source whose calculation returns an empty result at once, so the actor is loaded) and
client processes forked from this one. The workload (bench/_data.py) is generated with a fixed
seed and encoded before any clock starts. Every figure counts only if the totals it produced
match the totals of the same increments applied to a StatsState here (for Redis: the hashes,
read back with HGETALL). Redis runs on a loopback port without persistence, and is stopped at
the end. What the bench needs beyond the server is installed before it runs, never by it: the
[bench] extra (redis-py, hiredis, matplotlib, uvloop, py-spy) and Debian's redis-server, both
by ``make bench``.

Forking, timing and percentiles are bench/_harness.py: latency percentiles are nearest-rank.

Prints a table (median, min-max over the runs, ratio ours/peer of the medians), writes JSON to
bench/results/run-<date>.json (a list: each run appends) and a PNG chart beside it.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from bench import _data, _harness, _redis, _workers
from bench._harness import RESULTS, percentiles, summary
from bench._report import chart, table

SEED = 42


@dataclass(frozen=True)
class Params:
    runs: int
    n_client: int  # workload 1: StatsClient.increment() per increment
    n_batch: int  # workload 2: ClientCodec batches
    n_raw: int  # workload 3 (incs of 100+) and the in-process ceiling
    n_small: int  # workload 3: single inc and incs of 10
    n_queries: int
    n_redis_pipe: int
    n_redis_rt: int
    n_redis_raw: int
    memory_sizes: tuple[int, ...]
    profile_seconds: float
    limit: float  # seconds any one timed loop may take


FULL = Params(
    3,
    500_000,
    1_000_000,
    1_000_000,
    200_000,
    20_000,
    200_000,
    20_000,
    500_000,
    (10_000, 100_000),
    6.0,
    60.0,
)
QUICK = Params(
    2, 50_000, 100_000, 100_000, 30_000, 3_000, 30_000, 3_000, 100_000, (10_000, 100_000), 3.0, 20.0
)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.p = QUICK if args.quick else FULL
        self.t0 = time.monotonic()
        self.metrics: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []
        self._expected: dict[tuple[int, int], _data.Totals] = {}

    # -- plumbing -------------------------------------------------------------------------------

    def say(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:5.0f}s] {msg}", flush=True)

    def expected(self, n: int, parts: int = 1) -> _data.Totals:
        key = (n, parts)
        if key not in self._expected:
            self._expected[key] = _data.expected(self.items[:n])
        return self._expected[key]

    def child(self, fn: Any, *args: Any, limit: float | None = None) -> dict[str, Any]:
        return _harness.in_child(fn, *args, timeout=limit or self.p.limit + 30)

    def start(self, fn: Any, *args: Any) -> _harness.Waiter:
        """Run ``fn(*args)`` in a forked process; returns a function that waits for its result."""
        return _harness.fork(fn, *args)

    def record(
        self, key: str, label: str, unit: str, values: list[float], oks: list[bool], **extra: Any
    ) -> None:
        ok = bool(oks) and all(oks)
        self.metrics[key] = {
            "label": label,
            "unit": unit,
            "values": values,
            "ok": ok,
            "summary": summary(values),
            **extra,
        }

    def throughput(
        self, key: str, label: str, runs: list[dict[str, Any]], oks: list[bool], **extra: Any
    ) -> None:
        rates = [r["n"] / r["seconds"] for r in runs if "seconds" in r]
        self.record(key, label, "inc/s", rates, oks, **extra)

    def totals_ours(self) -> _data.Totals:
        wire = _workers.raw_call(self.port, "stats_many", list(range(1, _data.CAMPAIGNS + 1)))
        return _data.wire_totals(wire)

    def run_ours(self, key: str, label: str, n: int, fn: Any, *args: Any) -> None:
        """``runs`` times: snapshot, the child, snapshot; the delta must equal the expected."""
        runs: list[dict[str, Any]] = []
        oks: list[bool] = []
        for i in range(self.p.runs):
            before = self.totals_ours()
            r = self.child(fn, self.port, *args)
            ok = "error" not in r and not r.get("cut") and not r.get("dropped")
            if ok:
                got = _data.delta(self.totals_ours(), before)
                ok = _data.same(got, self.expected(r["n"] if r["n"] < n else n))
            runs.append(r)
            oks.append(ok)
            rate = f"{r['n'] / r['seconds']:,.0f} inc/s" if "seconds" in r else r.get("error")
            self.say(
                f"  {label} run {i + 1}/{self.p.runs}: {rate}, totals "
                f"{'match' if ok else 'DO NOT MATCH / cut / error: ' + str(r)[:200]}"
            )
        self.throughput(key, label, runs, oks, runs_raw=[_strip(r) for r in runs])

    # -- the run --------------------------------------------------------------------------------

    def prepare(self) -> None:
        p = self.p
        n = max(p.n_client, p.n_batch, p.n_raw, p.n_small, p.n_redis_raw, p.n_redis_pipe)
        self.say(f"generating {n:,} increments (seed {SEED}) and encoding the streams...")
        self.items = _data.generate(n, SEED)
        raw = self.items[: p.n_raw]
        small = self.items[: p.n_small]
        self.streams: dict[tuple[int, int], list[bytes]] = {}
        for batch, conns in (
            (1, 1),
            (1, 16),
            (10, 1),
            (100, 1),
            (1000, 1),
            (1000, 4),
            (1000, 16),
            (10000, 1),
        ):
            src = small if batch <= 10 else raw
            parts = _data.split(src, conns) if conns > 1 else [src]
            self.streams[batch, conns] = [_data.encode_incs(part, batch) for part in parts]
        mb = len(self.streams[1000, 1][0]) / len(raw)
        self.say(
            f"  incs-1000 stream: {len(self.streams[1000, 1][0]) / 1e6:.1f} MB, "
            f"{mb:.1f} bytes/increment"
        )
        self.expected(p.n_raw)

    def in_process(self, memory: bool = True) -> None:
        p = self.p
        stream = self.streams[1000, 1][0]
        self.say(f"workload 5: in-process ceiling over the incs-1000 stream ({p.n_raw:,} items)")
        for mode, key in (
            ("decode", "ceiling.decode"),
            ("decode+apply", "ceiling.decode_apply"),
            ("codec+apply", "ceiling.codec_apply"),
        ):
            runs, oks = [], []
            for _ in range(p.runs):
                r = self.child(_workers.ceiling, stream, p.n_raw, mode)
                ok = "error" not in r and (
                    r["totals"] is None or _data.same(r.pop("totals"), self.expected(p.n_raw))
                )
                runs.append(r)
                oks.append(ok)
            self.throughput(key, f"in-process: msgpack {mode}", runs, oks)
            self.say(
                f"  {mode}: {_med(self.metrics[key]):,.0f} inc/s, totals "
                f"{'match' if all(oks) else 'DO NOT MATCH'}"
            )
        if not memory:
            return
        self.say(
            "workload 6: memory per campaign (StatsState, typical campaign: 10 supporters, "
            "5 action types, 10 areas, 3 orgs)"
        )
        for size in p.memory_sizes:
            r = self.child(_workers.memory, size)
            self.record(
                f"mem.{size}",
                f"memory per campaign, {size:,} campaigns",
                "B",
                [r["bytes_per_campaign"]] if "error" not in r else [],
                ["error" not in r],
            )
            self.say(f"  {size:,} campaigns: {r.get('bytes_per_campaign', r.get('error'))} B each")

    def client_batches(self) -> None:
        """Workload 2: increments through ``StatsClient.increment_many()``, and what the client
        process alone could carry: increments per second of its own CPU (checking, queueing,
        encoding, writing), whatever the server and the machine allowed."""
        p = self.p
        self.say(
            f"workload 2: {p.n_batch:,} increments through StatsClient.increment_many() "
            "in batches of 1,000, then flush()"
        )
        self.run_ours(
            "client.batches",
            "client: increment_many() of 1,000, flush",
            p.n_batch,
            _workers.client_batches,
            self.items[: p.n_batch],
            1000,
            p.limit,
        )
        runs = self.metrics["client.batches"]["runs_raw"]
        self.record(
            "client.batches.cpu",
            "client: increment_many() of 1,000, per s of client CPU",
            "inc/s",
            [r["n"] / r["cpu"] for r in runs if r.get("cpu")],
            [bool(r.get("cpu")) for r in runs],
        )

    def ingest_only(self) -> None:
        """``--ingest-only``: the ingest rows alone (workload 2, and workload 3's incs of 1,000
        on 1 and 16 connections; the in-process ceilings were measured before the server
        started); no latency, no memory, no Redis, no profile."""
        p = self.p
        self.client_batches()
        for conns in (1, 16):
            self.run_ours(
                f"raw.b1000.c{conns}",
                f"raw: incs of 1,000, {conns} conn",
                p.n_raw,
                _workers.raw_blast,
                self.streams[1000, conns],
                p.n_raw,
                p.limit,
            )

    def start_server(self) -> None:
        cmd = [sys.executable, "-m", "bench._server", "--port", "0"]
        if self.args.uvloop:
            cmd.append("--uvloop")
        self.server = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent
        )
        assert self.server.stdout is not None
        line = self.server.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"the server did not start: {line!r}")
        self.port = int(line.split()[1])
        self.say(
            f"server pid {self.server.pid} on 127.0.0.1:{self.port}"
            f"{' (uvloop)' if self.args.uvloop else ''}"
        )

    def stop_server(self) -> None:
        self.server.terminate()
        try:
            self.server.wait(20)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()

    def ours(self) -> None:
        p = self.p
        self.say(f"workload 1: StatsClient.increment() x {p.n_client:,}, then flush()")
        self.run_ours(
            "client.per_inc",
            "client: increment() per increment, flush",
            p.n_client,
            _workers.client_per_increment,
            self.items[: p.n_client],
            p.limit,
        )
        self.client_batches()
        self.say("workload 3: raw capacity, pre-encoded streams, then flush")
        for (batch, conns), streams in self.streams.items():
            n = p.n_small if batch <= 10 else p.n_raw
            what = "single inc" if batch == 1 else f"incs of {batch:,}"
            self.run_ours(
                f"raw.b{batch}.c{conns}",
                f"raw: {what}, {conns} conn",
                n,
                _workers.raw_blast,
                streams,
                n,
                p.limit,
            )
        self.latency_ours()

    def queries_only(self) -> None:
        """``--queries-only``: the 1-connection ingest (it fills the campaigns and sets the
        load's rate), then the query rows; no Redis, no profile."""
        p = self.p
        streams = self.streams[1000, 1]
        self.run_ours(
            "raw.b1000.c1",
            "raw: incs of 1,000, 1 conn",
            p.n_raw,
            _workers.raw_blast,
            streams,
            p.n_raw,
            p.limit,
        )
        self.latency_ours()

    def latency_ours(self) -> None:
        p = self.p
        self.say(f"workload 4: stats() latency, {p.n_queries:,} sequential calls, idle")
        self._latency("lat.idle", "query stats(), idle", _workers.query_latency, None)
        self._latency(
            "lat.aio.idle", "query AsyncStatsClient.stats(), idle", _workers.aio_query_latency, None
        )
        self._latency(
            "lat.raw.idle",
            "query, one connection, no pool, idle",
            _workers.raw_query_latency,
            None,
        )
        self._latency(
            "lat.socket.idle",
            "query, bare socket + unpackb, idle",
            _workers.socket_query_latency,
            None,
        )
        self._latency(
            "lat.ping.idle",
            "ping (no actor), bare socket, idle",
            functools.partial(_workers.socket_query_latency, op="ping"),
            None,
        )
        best = max(_med(self.metrics.get("raw.b1000.c1")), _med(self.metrics.get("client.batches")))
        rate = best / 2
        self.say(
            f"  ... and while another process sends incs of 1,000 at {rate:,.0f} inc/s "
            "(half the best 1-connection ingest rate)"
        )
        batches = [
            _data.encode_incs(self.items[i : i + 1000], 1000) for i in range(0, p.n_raw, 1000)
        ]
        self._latency(
            "lat.load",
            "query stats(), under load",
            _workers.query_latency,
            (_workers.paced_load, batches, 1000, rate),
        )
        self._latency(
            "lat.aio.load",
            "query AsyncStatsClient.stats(), under load",
            _workers.aio_query_latency,
            (_workers.paced_load, batches, 1000, rate),
        )
        self._latency(
            "lat.raw.load",
            "query, one connection, no pool, under load",
            _workers.raw_query_latency,
            (_workers.paced_load, batches, 1000, rate),
        )

    def _latency(
        self, key: str, label: str, fn: Any, load: tuple[Any, ...] | None, port: int | None = None
    ) -> None:
        port = self.port if port is None else port
        per: dict[str, list[float]] = collections.defaultdict(list)
        oks: list[bool] = []
        loads: list[dict[str, Any]] = []
        for i in range(self.p.runs):
            wait_load = None
            if load is not None:
                stop = _harness.event()
                wait_load = self.start(load[0], port, *load[1:], stop, self.p.limit)
                time.sleep(0.5)
            r = self.child(fn, port, self.p.n_queries, SEED + i, self.p.limit)
            if wait_load is not None:
                stop.set()
                lr = wait_load(self.p.limit + 30)
                loads.append(lr)
            ok = "error" not in r and not r.get("cut")
            oks.append(ok)
            for name, value in percentiles(r.get("latencies", [])).items():
                per[name].append(value)
            extra = f", load {loads[-1].get('rate', 0):,.0f} inc/s" if loads else ""
            self.say(
                f"  {label} run {i + 1}: p50 {per['p50'][-1]:.0f} µs, p99 "
                f"{per['p99'][-1]:.0f} µs, p99.9 {per['p99.9'][-1]:.0f} µs{extra}"
            )
        for name, values in per.items():
            self.record(
                f"{key}.{name}",
                f"{label} {name}",
                "µs",
                values,
                oks,
                load=[_strip(x) for x in loads],
            )

    def profile(self) -> None:
        """py-spy on the server while one connection blasts incs of 1,000, then single incs."""
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(exe).exists():
            self.notes.append("py-spy is not installed (the [bench] extra): no profile")
            self.say("py-spy is not installed (the [bench] extra): profile skipped")
            return
        self.profiles: dict[str, Any] = {}
        secs = self.p.profile_seconds
        for name, stream in (
            ("incs-1000", self.streams[1000, 1][0]),
            ("single inc", self.streams[1, 1][0]),
        ):
            out = Path(f"/tmp/bench-pyspy-{os.getpid()}-{name.replace(' ', '_')}.txt")
            self.say(f"profiling the server with py-spy for {secs:.0f} s under {name} load...")
            wait = self.start(_workers.blast_for, self.port, stream, secs + 1.5)
            time.sleep(0.5)
            r = subprocess.run(
                [
                    exe,
                    "record",
                    "-p",
                    str(self.server.pid),
                    "-d",
                    str(int(secs)),
                    "-r",
                    "250",
                    "-f",
                    "raw",
                    "-o",
                    str(out),
                    "--nonblocking",
                ],
                capture_output=True,
                text=True,
            )
            wait(self.p.limit + 30)
            if r.returncode != 0 or not out.exists():
                self.notes.append(f"py-spy failed: {r.stderr.strip()[:200]}")
                self.say(f"  py-spy failed: {r.stderr.strip()[:200]}")
                return
            top = _collapse(out.read_text())
            out.unlink()
            self.profiles[name] = top
            self.say(f"  {name}: self time, top functions (% of busy samples):")
            for fn, pct in top["self"][:8]:
                self.say(f"    {pct:5.1f}%  {fn}")

    def redis(self) -> None:
        p = self.p
        problem = _redis.ensure_redis(self.say)
        if problem:
            self.notes.append(f"no Redis peer: {problem}")
            self.say(f"no Redis peer: {problem}")
            return
        with _redis.redis_server() as port:
            self.say(f"redis-server on 127.0.0.1:{port} (no persistence)")
            self.say(f"Redis: redis-py pipelines of 1,000 increments ({p.n_redis_pipe:,})")
            self._run_redis(
                "redis.pipeline",
                "Redis: redis-py pipeline of 1,000",
                port,
                p.n_redis_pipe,
                _redis.pipeline,
                self.items[: p.n_redis_pipe],
                1000,
                p.limit,
            )
            self.say(f"Redis: one round trip per increment ({p.n_redis_rt:,})")
            self._run_redis(
                "redis.roundtrip",
                "Redis: redis-py, 1 round trip/increment",
                port,
                p.n_redis_rt,
                _redis.roundtrip,
                self.items[: p.n_redis_rt],
                p.limit,
            )
            raw = self.items[: p.n_redis_raw]
            for conns in (1, 16):
                parts = _data.split(raw, conns) if conns > 1 else [raw]
                streams = [_redis.encode_resp(part) for part in parts]
                ncmds = sum(c for _, c in streams)
                self.say(
                    f"Redis: pre-encoded RESP HINCRBY stream, {conns} conn "
                    f"({p.n_redis_raw:,} increments = {ncmds:,} commands)"
                )
                self._run_redis(
                    f"redis.raw.c{conns}",
                    f"Redis: RESP stream, {conns} conn",
                    port,
                    p.n_redis_raw,
                    _redis.raw_blast,
                    streams,
                    p.n_redis_raw,
                    p.limit,
                    cmds_per_inc=ncmds / p.n_redis_raw,
                )
            for conns in (1, 16):
                r = _redis.redis_benchmark(port, 200_000 if p is QUICK else 2_000_000, conns, 1000)
                if r:
                    self.record(
                        f"redis.bench.c{conns}",
                        f"redis-benchmark HINCRBY -P 1000 -c {conns}",
                        "cmd/s",
                        [r["commands_per_s"]],
                        [True],
                        **r,
                    )
                    self.say(
                        f"  redis-benchmark HINCRBY -P 1000 -c {conns}: "
                        f"{r['commands_per_s']:,.0f} commands/s"
                    )
            # State for the latency test: the same 1,000 campaigns as ours hold.
            _redis.flushall(port)
            self.child(_redis.pipeline, port, self.items[: p.n_redis_pipe], 1000, p.limit)
            self.say(f"Redis: HGETALL latency, {p.n_queries:,} sequential calls, idle")
            self._latency("redis.lat.idle", "Redis HGETALL, idle", _redis.latency, None, port)
            rate = _med(self.metrics.get("redis.pipeline")) / 2
            self.say(
                f"  ... and while another process sends pipelines at {rate:,.0f} inc/s "
                "(half its redis-py pipeline rate)"
            )
            self._latency(
                "redis.lat.load",
                "Redis HGETALL, under load",
                _redis.latency,
                (_redis.paced_load, self.items[: p.n_redis_pipe], 1000, rate),
                port,
            )
            for size in p.memory_sizes:
                r = self.child(_redis.memory, port, size)
                self.record(
                    f"redis.mem.{size}",
                    f"Redis used_memory/hash, {size:,}",
                    "B",
                    [r["bytes_per_campaign"]] if "error" not in r else [],
                    ["error" not in r],
                )
                self.say(
                    f"  Redis {size:,} hashes: {r.get('bytes_per_campaign', r.get('error'))} B each"
                )
        self.say("redis-server stopped")

    def _run_redis(
        self, key: str, label: str, port: int, n: int, fn: Any, *args: Any, **extra: Any
    ) -> None:
        runs, oks = [], []
        for i in range(self.p.runs):
            _redis.flushall(port)
            r = self.child(fn, port, *args)
            ok = "error" not in r and not r.get("cut")
            if ok:
                ok = _data.same(_redis.totals(port), self.expected(r["n"] if r["n"] < n else n))
            runs.append(r)
            oks.append(ok)
            rate = f"{r['n'] / r['seconds']:,.0f} inc/s" if "seconds" in r else r.get("error")
            self.say(
                f"  {label} run {i + 1}/{self.p.runs}: {rate}, totals "
                f"{'match' if ok else 'DO NOT MATCH / cut / error: ' + str(r)[:200]}"
            )
        self.throughput(key, label, runs, oks, runs_raw=[_strip(r) for r in runs], **extra)


def _med(m: dict[str, Any] | None) -> float:
    return float(m["summary"]["median"]) if m else 0.0


def _strip(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k not in ("latencies", "totals")}


def _collapse(raw: str) -> dict[str, Any]:
    """py-spy's raw (collapsed) stacks to self and inclusive shares per function."""
    selfs: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";")[1:]]  # the first is the process/thread
        if not frames:
            continue
        total += n
        selfs[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return {"samples": 0, "self": [], "inclusive": []}

    def pct(c: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(f, round(100 * v / total, 1)) for f, v in c.most_common(25)]

    return {"samples": total, "self": pct(selfs), "inclusive": pct(incl)}


def _frame(frame: str) -> str:
    """``fn (path/to/file.py:123)`` to ``fn (file.py)``, so lines of one function add up."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = path.split("/")
    short = "/".join(parts[-2:]) if "campaignstats" in path else parts[-1]
    return f"{name} ({short})"


def machine(args: argparse.Namespace) -> dict[str, Any]:
    return _harness.machine(
        msgpack=".".join(map(str, msgpack.version)),
        server_loop="uvloop" if args.uvloop else "asyncio",
    )


def targets(metrics: dict[str, dict[str, Any]]) -> list[tuple[str, str, bool | None]]:
    def med(key: str) -> float | None:
        m = metrics.get(key)
        return float(m["summary"]["median"]) if m and m["ok"] else None

    out: list[tuple[str, str, bool | None]] = []

    def check(name: str, value: float | None, goal: float, unit: str, higher: bool) -> None:
        if value is None:
            out.append((name, "not measured (or totals did not match)", None))
            return
        met = value >= goal if higher else value <= goal
        out.append(
            (
                name,
                f"{value:,.1f} {unit} (target {'>=' if higher else '<='} {goal:,.0f} {unit})",
                met,
            )
        )

    check(
        "batched via client (increment_many of 1,000)",
        med("client.batches"),
        1_000_000,
        "inc/s",
        True,
    )
    check("per-increment increment()", med("client.per_inc"), 300_000, "inc/s", True)
    # The ceiling is the fastest in-process way to decode and apply the same stream: plain
    # msgpack plus building increments, or our codec (msgspec validates while it decodes).
    ceilings = [c for c in (med("ceiling.decode_apply"), med("ceiling.codec_apply")) if c]
    ceiling = max(ceilings) if ceilings else None
    for key, label in (("raw.b1000.c1", "1 conn"), ("raw.b1000.c16", "16 conns")):
        raw = med(key)
        share = 100 * raw / ceiling if raw and ceiling else None
        check(f"raw capacity incs-1000 {label} / in-process ceiling", share, 75, "%", True)
    # The query targets hold for stats() through either client (docs/design.md, "Queries
    # inline"; README, "Measured").
    for client, key in (("StatsClient", "lat"), ("AsyncStatsClient", "lat.aio")):
        check(f"query p50 idle, {client}", med(f"{key}.idle.p50"), 60, "µs", False)
        check(f"query p99 idle, {client}", med(f"{key}.idle.p99"), 150, "µs", False)
        check(f"query p99 under load, {client}", med(f"{key}.load.p99"), 1000, "µs", False)
    return out


ROWS: list[tuple[str, str | None]] = [
    ("client.per_inc", "redis.roundtrip"),
    ("client.batches", "redis.pipeline"),
    ("client.batches.cpu", None),
    ("raw.b1.c1", "redis.raw.c1"),
    ("raw.b1.c16", "redis.raw.c16"),
    ("raw.b10.c1", None),
    ("raw.b100.c1", None),
    ("raw.b1000.c1", "redis.raw.c1"),
    ("raw.b1000.c4", None),
    ("raw.b1000.c16", "redis.raw.c16"),
    ("raw.b10000.c1", None),
    ("ceiling.decode", None),
    ("ceiling.decode_apply", None),
    ("ceiling.codec_apply", None),
    ("lat.idle.p50", "redis.lat.idle.p50"),
    ("lat.idle.p99", "redis.lat.idle.p99"),
    ("lat.idle.p99.9", "redis.lat.idle.p99.9"),
    ("lat.load.p50", "redis.lat.load.p50"),
    ("lat.load.p99", "redis.lat.load.p99"),
    ("lat.load.p99.9", "redis.lat.load.p99.9"),
    ("lat.aio.idle.p50", "redis.lat.idle.p50"),
    ("lat.aio.idle.p99", "redis.lat.idle.p99"),
    ("lat.aio.load.p50", "redis.lat.load.p50"),
    ("lat.aio.load.p99", "redis.lat.load.p99"),
    ("lat.raw.idle.p50", "redis.lat.idle.p50"),
    ("lat.raw.idle.p99", "redis.lat.idle.p99"),
    ("lat.raw.load.p50", "redis.lat.load.p50"),
    ("lat.raw.load.p99", "redis.lat.load.p99"),
    ("lat.socket.idle.p50", "redis.lat.idle.p50"),
    ("lat.socket.idle.p99", "redis.lat.idle.p99"),
    ("lat.ping.idle.p50", "redis.lat.idle.p50"),
    ("lat.ping.idle.p99", "redis.lat.idle.p99"),
    ("mem.10000", "redis.mem.10000"),
    ("mem.100000", "redis.mem.100000"),
    ("redis.bench.c1", None),
    ("redis.bench.c16", None),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke version, 1-2 minutes")
    parser.add_argument("--uvloop", action="store_true", help="run the server on uvloop")
    parser.add_argument("--runs", type=int, help="runs of each workload (default 3, quick 2)")
    parser.add_argument("--no-redis", action="store_true")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument(
        "--queries-only",
        action="store_true",
        help="only the query latency rows (after the 1-connection ingest that sets their load)",
    )
    parser.add_argument(
        "--ingest-only",
        action="store_true",
        help="only the ingest rows: the in-process ceilings, increment_many, raw incs of 1,000",
    )
    args = parser.parse_args()
    bench = Bench(args)
    if args.runs:
        bench.p = Params(**{**bench.p.__dict__, "runs": args.runs})
    if args.uvloop and importlib.util.find_spec("uvloop") is None:
        sys.exit("--uvloop: uvloop is not installed (pip install -e '.[bench]', or make bench)")
    date = dt.datetime.now()
    info = machine(args)
    bench.say(
        f"{date:%Y-%m-%d %H:%M}  {info['cpu']}, {info['cores']} cores, Python "
        f"{info['python']}, msgpack {info['msgpack']}, server on {info['server_loop']}"
        f"{', QUICK' if args.quick else ''}"
    )
    bench.prepare()
    if args.queries_only:
        bench.start_server()
        try:
            bench.queries_only()
        finally:
            bench.stop_server()
    elif args.ingest_only:
        bench.in_process(memory=False)
        bench.start_server()
        try:
            bench.ingest_only()
        finally:
            bench.stop_server()
    else:
        bench.in_process()
        bench.start_server()
        try:
            bench.ours()
            if not args.no_profile:
                bench.profile()
        finally:
            bench.stop_server()
        if not args.no_redis:
            bench.redis()

    m = bench.metrics
    print()
    print(
        f"campaignstats bench, {date:%Y-%m-%d %H:%M}: {info['cpu']}, {info['cores']} cores "
        f"(client and server share them), Python {info['python']}, server loop "
        f"{info['server_loop']}, {bench.p.runs} runs each{' (QUICK)' if args.quick else ''}"
    )
    print(
        "ratio = ours / Redis, medians of the same run (throughput: higher is better; "
        "latency and memory: lower is better); ok = totals matched in every run"
    )
    print(table(m, ROWS))
    print()
    goals = targets(m)
    if args.queries_only:
        goals = [goal for goal in goals if goal[0].startswith("query")]
    if args.ingest_only:
        goals = [goal for goal in goals if not goal[0].startswith("query")]
    for name, text, met in goals:
        mark = "MET " if met else ("MISS" if met is not None else " -- ")
        print(f"  [{mark}] {name}: {text}")
    for note in bench.notes:
        print(f"  note: {note}")

    RESULTS.mkdir(exist_ok=True)
    suffix = ("-quick" if args.quick else "") + ("-uvloop" if args.uvloop else "")
    suffix += "-ingest" if args.ingest_only else ""
    stem = f"run-{date:%Y-%m-%d}{suffix}"
    chart_msg = chart(m, RESULTS / f"{stem}.png")
    print(chart_msg)
    out = {
        "date": date.isoformat(timespec="seconds"),
        "machine": info,
        "params": bench.p.__dict__,
        "seed": SEED,
        "source": "in-bench EmptySource (calculation returns an empty result: actor loaded)",
        "elapsed_seconds": round(time.monotonic() - bench.t0, 1),
        "metrics": m,
        "targets": [{"target": n, "value": t, "met": met} for n, t, met in goals],
        "profile": getattr(bench, "profiles", None),
        "notes": bench.notes,
    }
    path = _harness.append_result(stem, out)
    print(f"results appended to {path}; total {time.monotonic() - bench.t0:.0f} s")


if __name__ == "__main__":
    main()
