"""Soak: the server under steady load for a long time, with Postgres restarted under it.

    python -m bench.soak                      # 30 minutes, 100 connections, 2 Postgres restarts
    python -m bench.soak --minutes 1 --rate 1000 --connections 20 --restarts 1

A real server process (``campaignstats serve``, a calculation every 10 s) on an embedded
Postgres of its own. A loader writes every action to Postgres first (so that the database holds
the truth) and then announces it with its action id through one of N AsyncStatsClient
connections; subscribers follow the busiest campaigns; a prober queries a random campaign every
50 ms. Every second the sampler records the server's RSS, its mailbox depth and the latency of a
query. Postgres is stopped and started again ``--restarts`` times, evenly spaced. At the end the
server's counts must equal the calculation from the database, campaign by campaign.

Results: bench/results/soak-<date>.json (summary, samples, merges, the probe's samples),
soak-<date>-server.csv (the probe's samples, flat), and a PNG chart when matplotlib (the
[bench] extra) is installed. Percentiles are nearest-rank (bench/_harness.py), as in every
benchmark here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from bench._harness import RESULTS, free_port, machine, percentile, rss_bytes
from campaignstats.client import AsyncStatsClient
from campaignstats.db.calculation import calculate
from campaignstats.db.embedded import EmbeddedPostgres, create_database, with_database
from campaignstats.db.schema import init_db

CAMPAIGNS = 200
ORGS = 20
AREAS = ["DE", "FR", "IT", "ES", "PL", None]
TYPES = ["register", "share", "mail2target", "petition", "donate"]


@dataclass
class Sample:
    t: float
    rss_mb: float
    mailbox: int
    query_ms: float
    applied: int


@dataclass
class SoakReport:
    started: str
    seconds: float
    rate: int
    connections: int
    restarts: int
    actions_written: int
    increments_dropped_by_clients: int
    pubs_received: int
    calculations: dict[str, Any] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    mismatched_campaigns: list[int] = field(default_factory=list)
    #: the probe's samples from inside the server (bench/_soak_probe.py)
    server_samples: list[dict[str, Any]] = field(default_factory=list)
    #: each merged calculation as ``info`` reported it (``last_calculation``), with its time
    merges: list[dict[str, Any]] = field(default_factory=list)
    #: ``info``'s ``packing`` at the end: the idle sweeps and what the last one packed
    packing: dict[str, Any] | None = None

    @property
    def exact(self) -> bool:
        return not self.mismatched_campaigns

    def summary(self) -> dict[str, Any]:
        rss = [s.rss_mb for s in self.samples]
        lat = sorted(s.query_ms for s in self.samples if s.query_ms >= 0)
        depth = [s.mailbox for s in self.samples]
        half = len(rss) // 2
        return {
            "seconds": round(self.seconds, 1),
            "actions_written_and_announced": self.actions_written,
            "rate_per_second": round(self.actions_written / self.seconds) if self.seconds else 0,
            "connections": self.connections,
            "postgres_restarts": self.restarts,
            "rss_mb_first_half_median": round(statistics.median(rss[:half] or rss), 1),
            "rss_mb_second_half_median": round(statistics.median(rss[half:] or rss), 1),
            "rss_mb_max": round(max(rss), 1) if rss else None,
            "mailbox_depth_max": max(depth) if depth else None,
            "query_ms_p50": round(percentile(lat, 50), 3) if lat else None,
            "query_ms_p99": round(percentile(lat, 99), 3) if lat else None,
            "query_ms_max": round(lat[-1], 3) if lat else None,
            "calculations": self.calculations,
            "client_drops": self.increments_dropped_by_clients,
            "pubs_received": self.pubs_received,
            "exact": self.exact,
            "mismatched_campaigns": self.mismatched_campaigns[:10],
            "rss_after_first_minute": self.flatness(),
            "journal_at_merges": _journal_figures(self.merges),
            "packing": self.packing,
        }

    def flatness(self, after: float = 60.0, within: float = 0.10) -> dict[str, Any]:
        """RSS at the start, after ``after`` seconds, and its median and maximum from then on;
        flat when the maximum is within ``within`` of the value at ``after``."""
        rss = [(s.t, s.rss_mb) for s in self.samples if s.rss_mb > 0]
        if not rss:
            return {}
        later = [mb for t, mb in rss if t >= after] or [rss[-1][1]]
        base = later[0]
        peak = max(later)
        return {
            "start_mb": round(rss[0][1], 1),
            "at_first_minute_mb": round(base, 1),
            "median_mb": round(statistics.median(later), 1),
            "max_mb": round(peak, 1),
            "end_mb": round(rss[-1][1], 1),
            "max_over_first_minute": round(peak / base, 3) if base else None,
            "flat_within_10pct": peak <= base * (1 + within),
        }


def _journal_figures(merges: list[dict[str, Any]]) -> dict[str, Any]:
    """The journal's size at the merges: changes kept one by one, folded keys, in all."""
    journals = [m["journal"] for m in merges if isinstance(m.get("journal"), dict)]
    out: dict[str, Any] = {"merges": len(merges)}
    for key in ("listed", "folded_keys", "size"):
        values = [j[key] for j in journals if key in j]
        if values:
            out[f"{key}_max"] = max(values)
            out[f"{key}_median"] = statistics.median(values)
    return out


def _rss_mb(pid: int) -> float:
    try:
        return rss_bytes(pid) / 2**20
    except OSError:  # the server is gone: the sample says 0, the exactness check says why
        return 0.0


async def _setup(dsn: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        await init_db(conn)
        await conn.execute(
            "TRUNCATE actions, supporters, action_pages, campaigns, orgs RESTART IDENTITY CASCADE"
        )
        await conn.executemany(
            "INSERT INTO orgs (id, name) VALUES ($1, $2)",
            [(i, f"org {i}") for i in range(1, ORGS + 1)],
        )
        await conn.executemany(
            "INSERT INTO campaigns (id, name, status) VALUES ($1, $2, $3)",
            [(i, f"campaign {i}", 1 if i % 10 else 2) for i in range(1, CAMPAIGNS + 1)],
        )
        await conn.executemany(
            "INSERT INTO action_pages (id, name, campaign_id, org_id, extra_supporters) "
            "VALUES ($1, $2, $1, $3, $4)",
            [
                (i, f"page {i}", 1 + i % ORGS, 100 if i % 7 == 0 else 0)
                for i in range(1, CAMPAIGNS + 1)
            ],
        )
    finally:
        await conn.close()
    return list(range(1, CAMPAIGNS + 1))


class Loader:
    """Writes actions to Postgres, then announces each through the clients, at a steady rate."""

    def __init__(self, dsn: str, clients: list[AsyncStatsClient], rate: int, seed: int) -> None:
        self.dsn = dsn
        self.clients = clients
        self.rate = rate
        self.rng = random.Random(seed)
        self.weights = [1 / (i + 1) for i in range(CAMPAIGNS)]
        self.written = 0
        self.person = 0
        self.errors: list[str] = []

    async def run(self, stop: asyncio.Event) -> None:
        batch = max(1, self.rate // 20)  # 20 batches a second
        conn: asyncpg.Connection | None = None
        next_at = time.monotonic()
        while not stop.is_set():
            next_at += batch / self.rate
            delay = next_at - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(self.dsn, timeout=2)
                await self._write(conn, batch)
            except Exception as exc:  # whatever a restarting Postgres raises
                # Postgres is restarting: nothing written, nothing announced; try again later.
                self.errors.append(type(exc).__name__)
                if conn is not None:
                    conn.terminate()
                conn = None
                next_at = time.monotonic() + 0.2
                await asyncio.sleep(0.2)
        if conn is not None:
            await conn.close()

    async def _write(self, conn: asyncpg.Connection, n: int) -> None:
        rng = self.rng
        campaigns = rng.choices(range(1, CAMPAIGNS + 1), self.weights, k=n)
        rows = []
        for cid in campaigns:
            self.person += 1
            new = rng.random() < 0.6
            rows.append(
                (cid, self.person.to_bytes(8, "big"), rng.choice(AREAS), new, rng.choice(TYPES))
            )
        async with conn.transaction():
            supporter_ids = await conn.fetch(
                "INSERT INTO supporters (campaign_id, action_page_id, fingerprint, area, "
                "processing_status, dupe_rank) "
                "SELECT c, c, f, a, 3, CASE WHEN n THEN 0 ELSE 1 END "
                "FROM unnest($1::bigint[], $2::bytea[], $3::text[], $4::bool[]) AS u(c, f, a, n) "
                "RETURNING id",
                [r[0] for r in rows],
                [r[1] for r in rows],
                [r[2] for r in rows],
                [r[3] for r in rows],
            )
            action_ids = await conn.fetch(
                "INSERT INTO actions (supporter_id, action_type, campaign_id, action_page_id, "
                "processing_status) SELECT s, t, c, c, 3 "
                "FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS u(s, t, c) RETURNING id",
                [r[0] for r in supporter_ids],
                [r[4] for r in rows],
                [r[0] for r in rows],
            )
        # Committed: now announce. dupe_rank 1 marks a returning person: not a new supporter.
        for i, ((cid, _, area, new, action_type), aid) in enumerate(
            zip(rows, action_ids, strict=True)
        ):
            client = self.clients[i % len(self.clients)]
            client.increment(
                cid, 1 + cid % ORGS, action_type, area if new else None, new, 1, aid[0]
            )
        self.written += n


async def soak(
    *,
    seconds: float,
    rate: int,
    connections: int,
    restarts: int,
    data_dir: Path,
    seed: int = 1,
    progress: bool = True,
    probe_every: float | None = 5.0,
    pack_idle: float | None = None,
) -> SoakReport:
    pg = EmbeddedPostgres(data_dir)
    admin = pg.start()
    await create_database(admin, "soak", drop_existing=True)
    dsn = with_database(admin, "soak")
    campaigns = await _setup(dsn)
    port = free_port()
    log_fd = os.open(data_dir / "server.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    probe_out = data_dir / "server-samples.jsonl"
    probe_out.unlink(missing_ok=True)
    entry = ["-m", "campaignstats.cli"]
    env = None
    if probe_every is not None:
        entry = ["-m", "bench._soak_probe", str(probe_out), str(probe_every)]
        root = str(Path(__file__).resolve().parents[1])  # where `bench` is importable from
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH")) if p
        )}  # fmt: skip
    server = await asyncio.create_subprocess_exec(
        sys.executable, *entry, "--log-format", "json",
        "--log-level", "warning", "serve", "--dsn", dsn, "--port", str(port),
        "--sync-interval", "10",
        "--no-http",  # the soak is about the socket server; and port 7401 may be taken
        *(["--pack-idle", str(pack_idle)] if pack_idle is not None else []),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=log_fd,
        env=env,
    )  # fmt: skip
    os.close(log_fd)  # the server has its own copy
    url = f"tcp://127.0.0.1:{port}"
    report = SoakReport(
        datetime.now().isoformat(timespec="seconds"), 0, rate, connections, restarts, 0, 0, 0
    )
    clients = [AsyncStatsClient(url, queue_size=50_000) for _ in range(connections)]
    probe = AsyncStatsClient(url)
    try:
        async with asyncio.timeout(60):
            while True:
                with contextlib.suppress(Exception):
                    await probe.ping()
                    if (await probe.info())["calculations"]["loaded"]:
                        break
                await asyncio.sleep(0.2)
        stop = asyncio.Event()
        loader = Loader(dsn, clients, rate, seed)
        pubs = 0

        async def subscriber(cid: int) -> None:
            nonlocal pubs
            async with clients[cid % connections].subscribe(cid) as updates:
                async for _ in updates:
                    pubs += 1

        async def prober() -> None:
            rng = random.Random(seed + 1)
            while not stop.is_set():
                with contextlib.suppress(Exception):
                    await probe.stats(rng.choice(campaigns))
                await asyncio.sleep(0.05)

        t0 = time.monotonic()
        restart_at = [t0 + seconds * (k + 1) / (restarts + 1) for k in range(restarts)]
        tasks = [asyncio.create_task(loader.run(stop)), asyncio.create_task(prober())]
        tasks += [asyncio.create_task(subscriber(cid)) for cid in campaigns[:5]]
        while (now := time.monotonic()) < t0 + seconds:
            try:
                info = await probe.info()
                q0 = time.perf_counter()
                await probe.stats(1)
                query_ms = (time.perf_counter() - q0) * 1000
            except Exception:
                info, query_ms = {"mailbox": {"depth": -1}, "increments_applied": -1}, -1.0
            merged = info.get("last_calculation")
            if merged and (
                not report.merges or report.merges[-1]["started_at"] != merged.get("started_at")
            ):
                report.merges.append({"t": round(now - t0, 1), **merged})
            report.samples.append(
                Sample(round(now - t0, 1), _rss_mb(server.pid), info["mailbox"]["depth"], query_ms,
                       info["increments_applied"])
            )  # fmt: skip
            if restart_at and now >= restart_at[0]:
                restart_at.pop(0)
                pg.stop(mode="fast")
                await asyncio.sleep(3)
                pg.start()
            if progress:
                last = report.samples[-1]
                print(
                    f"\r{now - t0:7.0f}/{seconds:.0f} s  written {loader.written:>9,}  "
                    f"rss {last.rss_mb:6.1f} MB  mailbox {last.mailbox:>5}  "
                    f"query {query_ms:7.3f} ms",
                    end="", file=sys.stderr, flush=True,
                )  # fmt: skip
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
        stop.set()
        await tasks[0]
        for task in tasks[1:]:
            task.cancel()
        report.seconds = time.monotonic() - t0
        report.actions_written = loader.written
        for client in clients:
            await client.flush()
        report.increments_dropped_by_clients = sum(c.statistics().dropped for c in clients)
        report.pubs_received = pubs
        # One more calculation after the last write; then memory must equal the database.
        async with asyncio.timeout(120):
            before = (await probe.info())["calculations"]["completed"]
            while not await probe.resync("all"):
                await asyncio.sleep(0.2)
            while (await probe.info())["calculations"]["completed"] <= before:
                await asyncio.sleep(0.2)
        info = await probe.info()
        report.calculations = {
            k: info["calculations"][k] for k in ("completed", "failed", "skipped")
        }
        report.packing = info.get("packing")  # what the idle sweeps did (docs/protocol.md)
        memory = await probe.stats_many(campaigns)
        conn = await asyncpg.connect(dsn)
        try:
            truth = (await calculate(conn, "all")).campaigns
        finally:
            await conn.close()
        report.mismatched_campaigns = [
            cid for cid in campaigns if memory[cid] != truth[cid].to_wire()
        ]
    finally:
        for client in [*clients, probe]:
            with contextlib.suppress(Exception):
                await client.close()
        server.terminate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait(), 30)
        pg.close()
        if probe_out.exists():
            for line in probe_out.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    report.server_samples.append(json.loads(line))
    if progress:
        print(file=sys.stderr)
    return report


def _chart(report: SoakReport, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    t = [s.t for s in report.samples]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    axes[0].plot(t, [s.rss_mb for s in report.samples])
    axes[0].set_ylabel("server RSS (MB)")
    axes[1].plot(t, [s.mailbox for s in report.samples])
    axes[1].set_ylabel("mailbox depth")
    axes[2].plot(t, [s.query_ms for s in report.samples])
    axes[2].set_ylabel("query (ms)")
    axes[2].set_xlabel("seconds")
    fig.suptitle(f"campaignstats soak: {report.rate}/s, {report.connections} connections, "
                 f"{report.restarts} Postgres restarts")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path)
    return True


def _flat(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, list):
            out[prefix + key] = " ".join(str(v) for v in value)
        else:
            out[prefix + key] = value
    return out


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    flat = [_flat(r) for r in rows]
    columns = list(dict.fromkeys(k for r in flat for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(flat)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument(
        "--rate", type=int, default=5_000, help="actions written and announced per second"
    )
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--restarts", type=int, default=2, help="Postgres restarts during the run")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument(
        "--probe-every", type=float, default=5.0,
        help="seconds between the probe's samples inside the server (0: no probe)",
    )  # fmt: skip
    parser.add_argument(
        "--pack-idle", type=float, default=None, metavar="SECONDS",
        help="the server's --pack-idle (default: serve's); a fraction of a second packs and "
        "unpacks the campaigns of the tail all the time, merges included (docs/design.md, Memory)",
    )  # fmt: skip
    args = parser.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="soak-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(
        soak(seconds=args.minutes * 60, rate=args.rate, connections=args.connections,
             restarts=args.restarts, data_dir=data_dir,
             probe_every=args.probe_every or None, pack_idle=args.pack_idle)
    )  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now().strftime("%Y-%m-%d-%H%M")
    out = RESULTS / f"soak-{stamp}.json"
    where = machine()
    samples = [asdict(s) for s in report.samples]
    out.write_text(
        json.dumps(
            {"machine": where, "summary": report.summary(), "samples": samples,
             "merges": report.merges, "server_samples": report.server_samples},
            indent=1,
        )
    )  # fmt: skip
    if report.server_samples:
        _write_csv(report.server_samples, RESULTS / f"soak-{stamp}-server.csv")
    chart = RESULTS / f"soak-{stamp}.png"
    print(json.dumps({"machine": where, **report.summary()}, indent=2))
    print(
        f"results: {out}"
        + (f", chart: {chart}" if _chart(report, chart) else " (no matplotlib: no chart)")
    )
    return 0 if report.exact else 1


if __name__ == "__main__":
    sys.exit(main())
