"""The Redis peer: the same counters as one hash per campaign, updated with HINCRBY.

Campaign ``c`` is the hash ``c:<c>`` with fields ``s`` (supporters), ``a:<type>``, ``r:<area>``
and ``o:<org>``. An increment is one HINCRBY (a returning supporter) to four (a new one with an
area). redis-py and hiredis are the [bench] extra and redis-server a Debian package, all
bench-only: ``make bench`` installs them; :func:`ensure_redis` only checks.
"""

from __future__ import annotations

import contextlib
import importlib.util
import random
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

from bench._data import CAMPAIGNS, Item, Totals
from bench._harness import free_port, time_each
from bench._workers import typical_campaign, varied_campaign


def ensure_redis(say: Any) -> str | None:
    """Why Redis cannot be benchmarked, or None when redis-server and redis-py are here.

    Nothing is installed at run time: redis-py and hiredis are the [bench] extra, redis-server
    is Debian's package (``make bench`` installs both when missing).
    """
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (apt-get install redis-server, or make bench)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "redis-py is not installed (pip install -e '.[bench]', or make bench)"
    if importlib.util.find_spec("hiredis") is None:
        say("hiredis is not installed: redis-py parses replies in Python (slower peer)")
    return None


@contextlib.contextmanager
def redis_server() -> Iterator[int]:
    """A throwaway redis-server on a loopback port, no persistence; stopped on exit."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
            "--protected-mode",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import redis

        r = redis.Redis(port=port)
        for _ in range(100):
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            raise RuntimeError("redis-server did not start")
        r.close()
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def commands(item: Item) -> list[tuple[str, str, int]]:
    cid, org, action_type, area, new, count, _ = item
    key = f"c:{cid}"
    out = [(key, f"a:{action_type}", count)]
    if new:
        out.append((key, "s", 1))
        out.append((key, f"o:{org}", 1))
        if area is not None:
            out.append((key, f"r:{area}", 1))
    return out


def flushall(port: int) -> None:
    import redis

    r = redis.Redis(port=port)
    r.flushall()
    r.close()


def totals(port: int) -> Totals:
    import redis

    r = redis.Redis(port=port)
    pipe = r.pipeline(transaction=False)
    for cid in range(1, CAMPAIGNS + 1):
        pipe.hgetall(f"c:{cid}")
    out: Totals = {}
    for cid, h in zip(range(1, CAMPAIGNS + 1), pipe.execute(), strict=True):
        if not h:
            continue
        action: dict[str, int] = {}
        area: dict[str, int] = {}
        org: dict[int, int] = {}
        for f, v in h.items():
            name = f.decode()
            if name.startswith("a:"):
                action[name[2:]] = int(v)
            elif name.startswith("r:"):
                area[name[2:]] = int(v)
            elif name.startswith("o:"):
                org[int(name[2:])] = int(v)
        out[cid] = (int(h.get(b"s", 0)), action, area, org)
    r.close()
    return out


# -- workloads (each runs in a forked child) ---------------------------------------------------


def pipeline(port: int, items: list[Item], per_exec: int, limit: float) -> dict[str, Any]:
    """Synchronous redis-py pipelines of ``per_exec`` increments (the fastest redis-py mode)."""
    import redis

    r = redis.Redis(port=port)
    r.ping()
    n = 0
    cut = False
    t0 = time.perf_counter()
    deadline = t0 + limit
    for start in range(0, len(items), per_exec):
        pipe = r.pipeline(transaction=False)
        hincrby = pipe.hincrby
        for item in items[start : start + per_exec]:
            for key, field, by in commands(item):
                hincrby(key, field, by)
        pipe.execute()
        n = min(start + per_exec, len(items))
        if time.perf_counter() > deadline:
            cut = n < len(items)
            break
    seconds = time.perf_counter() - t0
    r.close()
    return {"n": n, "seconds": seconds, "cut": cut}


def roundtrip(port: int, items: list[Item], limit: float) -> dict[str, Any]:
    """One round-trip per increment: its 1 to 4 HINCRBYs in one non-transactional pipeline."""
    import redis

    r = redis.Redis(port=port)
    r.ping()
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + limit
    for item in items:
        cmds = commands(item)
        if len(cmds) == 1:
            r.hincrby(*cmds[0])
        else:
            pipe = r.pipeline(transaction=False)
            for c in cmds:
                pipe.hincrby(*c)
            pipe.execute()
        n += 1
        if n % 1000 == 0 and time.perf_counter() > deadline:
            break
    seconds = time.perf_counter() - t0
    r.close()
    return {"n": n, "seconds": seconds, "cut": n < len(items)}


def _resp(key: str, field: str, by: int) -> bytes:
    k, f, b = key.encode(), field.encode(), str(by).encode()
    return b"*4\r\n$7\r\nHINCRBY\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(k),
        k,
        len(f),
        f,
        len(b),
        b,
    )


def encode_resp(items: list[Item]) -> tuple[bytes, int]:
    """The HINCRBY commands of ``items`` as one pre-encoded RESP stream, and their count."""
    cmds = [_resp(*c) for item in items for c in commands(item)]
    return b"".join(cmds), len(cmds)


def raw_blast(port: int, streams: list[tuple[bytes, int]], n: int, limit: float) -> dict[str, Any]:
    """Pre-encoded RESP streams, one per connection; a reader thread per connection counts the
    replies (one line each) until all have come back."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=limit) for _ in streams]
    barrier = threading.Barrier(2 * len(streams) + 1)
    failures: list[str] = []

    def write(sock: socket.socket, stream: bytes) -> None:
        barrier.wait()
        try:
            sock.sendall(stream)
        except Exception as exc:
            failures.append(repr(exc))

    def read(sock: socket.socket, expect: int) -> None:
        barrier.wait()
        got = 0
        try:
            while got < expect:
                data = sock.recv(1 << 16)
                if not data:
                    raise ConnectionError("closed")
                got += data.count(b"\n")
        except Exception as exc:
            failures.append(repr(exc))

    threads = []
    for sock, (stream, ncmds) in zip(socks, streams, strict=True):
        threads.append(threading.Thread(target=write, args=(sock, stream)))
        threads.append(threading.Thread(target=read, args=(sock, ncmds)))
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(limit + 5)
    seconds = time.perf_counter() - t0
    for sock in socks:
        sock.close()
    return {"n": n, "seconds": seconds, "cut": bool(failures), "failures": failures[:3]}


def latency(port: int, n: int, seed: int, limit: float) -> dict[str, Any]:
    """Sequential HGETALL of random campaigns with redis-py (hiredis parser); µs."""
    import redis

    r = redis.Redis(port=port)
    rng = random.Random(seed)
    keys = [f"c:{rng.randint(1, CAMPAIGNS)}" for _ in range(n)]
    result = time_each(r.hgetall, keys, limit)
    r.close()
    return result


def paced_load(
    port: int, items: list[Item], per_exec: int, rate: float, stop: Any, limit: float
) -> dict[str, Any]:
    """redis-py pipelines of ``per_exec`` increments at ``rate`` increments/s until ``stop``."""
    import redis

    r = redis.Redis(port=port)
    cmd_batches = [
        [c for item in items[i : i + per_exec] for c in commands(item)]
        for i in range(0, len(items), per_exec)
    ]
    interval = per_exec / rate
    sent = 0
    k = 0
    t0 = time.perf_counter()
    while not stop.is_set() and time.perf_counter() - t0 < limit:
        pipe = r.pipeline(transaction=False)
        for c in cmd_batches[k % len(cmd_batches)]:
            pipe.hincrby(*c)
        pipe.execute()
        k += 1
        sent += per_exec
        ahead = t0 + k * interval - time.perf_counter()
        if ahead > 0:
            time.sleep(ahead)
    elapsed = time.perf_counter() - t0
    r.close()
    return {"sent": sent, "seconds": elapsed, "rate": sent / elapsed}


def memory(port: int, campaigns: int, varied: bool = False) -> dict[str, Any]:
    """used_memory growth of Redis holding ``campaigns`` typical campaigns (as in our test;
    ``varied``: with their own orgs and areas, bench._workers.varied_campaign)."""
    import redis

    make = varied_campaign if varied else typical_campaign

    r = redis.Redis(port=port)
    r.flushall()
    before = int(r.info("memory")["used_memory"])
    pipe = r.pipeline(transaction=False)
    for cid in range(1, campaigns + 1):
        fields: dict[str | bytes, int] = {}
        for item in make(cid):
            for _, field, by in commands(item):
                fields[field] = fields.get(field, 0) + by
        pipe.hset(f"c:{cid}", mapping=fields)  # type: ignore[arg-type]  # Mapping is invariant
        if cid % 1000 == 0:
            pipe.execute()
            pipe = r.pipeline(transaction=False)
    pipe.execute()
    after = int(r.info("memory")["used_memory"])
    assert r.dbsize() == campaigns
    r.flushall()
    r.close()
    return {"campaigns": campaigns, "bytes_per_campaign": (after - before) / campaigns}


def redis_benchmark(port: int, n: int, clients: int, pipeline: int) -> dict[str, Any] | None:
    """``redis-benchmark`` HINCRBY on 1,000 random hashes: commands/s (not increments/s)."""
    exe = shutil.which("redis-benchmark")
    if exe is None:
        return None
    cmd = [
        exe,
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-n",
        str(n),
        "-r",
        str(CAMPAIGNS),
        "-c",
        str(clients),
        "-P",
        str(pipeline),
        "-q",
        "HINCRBY",
        "c:__rand_int__",
        "a:register",
        "1",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    found = re.findall(r"([\d.]+) requests per second", out)
    if not found:
        return None
    return {"commands_per_s": float(found[-1]), "clients": clients, "pipeline": pipeline, "n": n}
