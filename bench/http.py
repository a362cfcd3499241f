"""HTTP benchmark: counter reads per second against nginx serving the same JSON, and open event
streams held by one process.

    python -m bench.http                 # about 2 minutes; --quick for a 30-second smoke run
    python -m bench.http --streams 10000 --rounds 3 --duration 10

Needs ``wrk`` and ``nginx`` (Debian packages: ``apt-get install wrk nginx``). In one run:

1. A campaignstats server in a child process (the service on an empty in-bench source, the
   socket server and the HTTP server of ``serve``, on the default asyncio loop as ``serve``
   runs it), with campaign 1 at 12,345 supporters.
2. nginx as a child process with its own configuration in a temporary directory, on 127.0.0.1,
   serving ``/v1/campaigns/1/count`` as a static file holding the very bytes campaignstats
   answers, with the same Cache-Control header (nginx adds its own ETag).
3. ``wrk`` (one thread, ``--connections`` keep-alive connections, ``--duration`` seconds)
   against each, alternating, ``--rounds`` times; the median of each is reported, and the ratio.
   nginx is measured with 1 worker (one process, as campaignstats) and with 2 (``auto`` here).
4. Event streams: a client process opens ``--streams`` streams of campaign 1 (in batches),
   waits for every first event, and the server's RSS before and after gives the memory per
   stream; then one increment goes in over the socket and the time until every stream has it
   is measured.

Results are appended to bench/results/http.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._harness import append_result, free_port, machine, rss_bytes

COUNT_PATH = "/v1/campaigns/1/count"
SUPPORTERS = 12_345


# -- the server process -----------------------------------------------------------------------


async def serve(http_port: int, socket_port: int, max_streams: int) -> None:
    from bench._server import EmptySource
    from campaignstats.actor.actor import ActorConfig
    from campaignstats.http import HttpConfig, HttpServer, app
    from campaignstats.model import Increment
    from campaignstats.server import ServerConfig, StatsServer
    from campaignstats.service import StatsService

    service = StatsService(EmptySource(), ActorConfig(sync_interval=3600))
    await service.start()
    await service.loaded()
    await service.send([Increment(1, 7, "register", "DE", True)] * SUPPORTERS)
    server = StatsServer(service, ServerConfig(host="127.0.0.1", port=socket_port))
    await server.start()
    http = HttpServer(
        app(service, HttpConfig(max_streams=max_streams), info_hook=server.add_info),
        "127.0.0.1",
        http_port,
        backlog=8192,
    )
    await http.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {http.port} {server.port}", flush=True)
    await stop.wait()
    await http.close()
    await server.close()
    await service.stop()


def start_server(max_streams: int) -> tuple[subprocess.Popen[str], int, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.http", "--serve", "--streams", str(max_streams)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if m := re.match(r"READY (\d+) (\d+)", line):
            return proc, int(m.group(1)), int(m.group(2))
    proc.kill()
    raise SystemExit("the campaignstats server did not start")


# -- nginx ------------------------------------------------------------------------------------

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes {workers};
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/tmp;
    proxy_temp_path {root}/tmp;
    fastcgi_temp_path {root}/tmp;
    uwsgi_temp_path {root}/tmp;
    scgi_temp_path {root}/tmp;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        root {root}/www;
        default_type application/json;
        location / {{ add_header Cache-Control "public, max-age=1"; }}
    }}
}}
"""


def start_nginx(root: Path, body: bytes, workers: int) -> tuple[subprocess.Popen[bytes], int]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    target = root / "www" / COUNT_PATH.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(body)
    conf = root / "nginx.conf"
    conf.write_text(NGINX_CONF.format(workers=workers, root=root, port=port))
    proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(root)], stderr=subprocess.DEVNULL)
    wait_listening(port)
    return proc, port


def wait_listening(port: int, timeout: float = 10.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def stop(proc: subprocess.Popen[Any]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- wrk --------------------------------------------------------------------------------------


def wrk(url: str, connections: int, duration: float) -> dict[str, Any]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
        timeout=duration + 60,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50_ms": _ms(p50),
        "p99_ms": _ms(p99),
        "non_2xx": int(errors.group(1)) if errors else 0,
    }


def _ms(m: re.Match[str] | None) -> float | None:
    if m is None:
        return None
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]


# -- event streams ----------------------------------------------------------------------------


async def hold_streams(http_port: int, socket_port: int, n: int, server_pid: int) -> dict[str, Any]:
    """Open ``n`` streams (in batches of 500), wait for each first event, measure, change the
    campaign once, time the fan-out, close."""
    import msgpack

    async def one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
        writer.write(b"GET /v1/campaigns/1/events HTTP/1.1\r\nHost: b\r\n\r\n")
        await writer.drain()
        return reader, writer

    async def until(reader: asyncio.StreamReader, needle: bytes) -> None:
        seen = b""
        while needle not in seen:
            chunk = await reader.read(1 << 16)
            if not chunk:
                raise EOFError("stream closed")
            seen = seen[-len(needle) :] + chunk

    await asyncio.sleep(0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
    writer.write(f"GET {COUNT_PATH} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n".encode())
    answer = await reader.read()
    writer.close()
    now = json.loads(answer.split(b"\r\n\r\n", 1)[1])["supporters"]
    before = rss_bytes(server_pid)
    streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    t0 = time.perf_counter()
    try:
        while len(streams) < n:
            batch = await asyncio.gather(*(one() for _ in range(min(500, n - len(streams)))))
            await asyncio.gather(*(until(r, b'"supporters":%d' % now) for r, _ in batch))
            streams.extend(batch)
        opened = time.perf_counter() - t0
        await asyncio.sleep(1.0)
        after = rss_bytes(server_pid)
        reader, writer = await asyncio.open_connection("127.0.0.1", socket_port)
        t1 = time.perf_counter()
        writer.write(msgpack.packb(["inc", 1, 7, "register", None, True]))
        await writer.drain()
        async with asyncio.timeout(60):
            await asyncio.gather(*(until(r, b'"supporters":%d' % (now + 1)) for r, _ in streams))
        fanout = time.perf_counter() - t1
        writer.close()
    finally:
        for _, w in streams:
            w.close()
    return {
        "streams": n,
        "open_seconds": round(opened, 2),
        "server_rss_before_mb": round(before / 2**20, 1),
        "server_rss_after_mb": round(after / 2**20, 1),
        "bytes_per_stream": round((after - before) / n),
        "change_to_all_streams_seconds": round(fanout, 3),
    }


# -- the run ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if shutil.which("wrk") is None or (
        shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists()
    ):
        raise SystemExit("bench.http needs wrk and nginx: apt-get install wrk nginx")
    server, http_port, socket_port = start_server(args.streams)
    tmp = Path(tempfile.mkdtemp(prefix="bench-http-"))
    tmp.chmod(0o755)  # nginx's workers run as another user and read the file from here
    nginx_procs: list[subprocess.Popen[bytes]] = []
    try:
        import urllib.request

        base = f"http://127.0.0.1:{http_port}"
        with urllib.request.urlopen(base + COUNT_PATH) as r:
            body = r.read()
        assert json.loads(body) == {"campaign_id": 1, "supporters": SUPPORTERS}, body
        nginx1, port1 = start_nginx(tmp / "n1", body, 1)
        nginx2, port2 = start_nginx(tmp / "n2", body, 2)
        nginx_procs += [nginx1, nginx2]
        targets = {
            "campaignstats count": base + COUNT_PATH,
            "campaignstats stats": base + "/v1/campaigns/1",
            "nginx 1 worker": f"http://127.0.0.1:{port1}{COUNT_PATH}",
            "nginx 2 workers": f"http://127.0.0.1:{port2}{COUNT_PATH}",
        }
        for url in targets.values():  # warm up
            wrk(url, args.connections, 1)
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        for i in range(args.rounds):
            for name, url in targets.items():
                result = wrk(url, args.connections, args.duration)
                rounds[name].append(result)
                print(f"round {i + 1}: {name:22} {result['rps']:>10,.0f} req/s", flush=True)
        reads = {
            name: {
                "rps_median": statistics.median(r["rps"] for r in results),
                "p50_ms_median": statistics.median(r["p50_ms"] or 0 for r in results),
                "p99_ms_median": statistics.median(r["p99_ms"] or 0 for r in results),
                "non_2xx": sum(r["non_2xx"] for r in results),
                "rounds": results,
            }
            for name, results in rounds.items()
        }
        ours = reads["campaignstats count"]["rps_median"]
        for name in ("nginx 1 worker", "nginx 2 workers"):
            reads[name]["campaignstats_ratio"] = round(ours / reads[name]["rps_median"], 3)
        for proc in nginx_procs:
            stop(proc)
        nginx_procs.clear()
        streams = []
        for n in args.stream_steps:
            if n > args.streams:
                continue
            result = asyncio.run(hold_streams(http_port, socket_port, n, server.pid))
            print(
                f"{n:>6} streams: {result['bytes_per_stream']:,} B/stream, change to all in "
                f"{result['change_to_all_streams_seconds']} s",
                flush=True,
            )
            streams.append(result)
            time.sleep(1.0)
    finally:
        for proc in nginx_procs:
            stop(proc)
        stop(server)
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(wrk=f"-t1 -c{args.connections} -d{args.duration:g}s"),
        "reads": reads,
        "streams": streams,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--streams", type=int, default=10_000, help="most event streams (at most 10,000)"
    )
    parser.add_argument("--quick", action="store_true", help="1 round of 3 s, 1,000 streams")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.streams = max(1, min(args.streams, 10_000))
    if args.serve:
        from campaignstats.logs import configure_logging

        configure_logging("json", "warning")
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        asyncio.run(serve(0, 0, args.streams + 100))
        return
    if args.quick:
        args.duration, args.rounds, args.streams = 3.0, 1, min(args.streams, 1_000)
    args.stream_steps = [s for s in (1_000, 5_000, 10_000) if s <= args.streams] or [args.streams]
    result = run(args)
    path = append_result("http", result)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1, default=str))
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
