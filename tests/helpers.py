"""Helpers shared by the test modules: polling, a bare protocol peer, a running server, a server
process, the lines a piece of code runs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import msgpack
import pytest

from campaignstats.db.embedded import EmbeddedPostgres
from campaignstats.model import CampaignStats
from campaignstats.server import StatsServer
from campaignstats.service import StatsService

#: tmpfs, where the test clusters live when it has room: on this machine's disk (ext4 mounted
#: with ``discard``) deleting a file that holds data costs about 4 ms, and the suite's cluster
#: holds tens of thousands of files by its end (a database per module): its deletion took 51 s
_SHM = Path("/dev/shm")
_SHM_ROOM = 4 * 2**30


def _cluster_parent(tmp_path_factory: pytest.TempPathFactory, name: str) -> tuple[Path, bool]:
    """A fresh directory for a test cluster, and whether it is ours to remove (on tmpfs)."""
    try:
        room = os.statvfs(_SHM)
        if room.f_bavail * room.f_frsize >= _SHM_ROOM and os.access(_SHM, os.W_OK):
            return Path(tempfile.mkdtemp(prefix=f"campaignstats-{name}-", dir=_SHM)), True
    except OSError:
        pass
    return tmp_path_factory.mktemp(name), False


@contextlib.contextmanager
def throwaway_cluster(
    tmp_path_factory: pytest.TempPathFactory, name: str, *, logical: bool = False
) -> Iterator[EmbeddedPostgres]:
    """A started Postgres cluster of the test's own, deleted at the end (with ``logical``:
    ``wal_level = logical``, for the follower)."""
    parent, ours = _cluster_parent(tmp_path_factory, name)
    pg = EmbeddedPostgres(parent, delete_on_close=True)
    pg.start()
    try:
        if logical:
            pg.enable_logical_replication()
        yield pg
    finally:
        try:
            pg.start()  # a test may have left it stopped: pgserver then deletes nothing
        finally:
            pg.close()
            if ours:
                shutil.rmtree(parent, ignore_errors=True)


async def wait_for(predicate: Callable[[], object], timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not await _maybe_await(predicate()):
            await asyncio.sleep(0.02)


async def _maybe_await(value: object) -> object:
    if asyncio.iscoroutine(value):
        return await value
    return value


async def loaded(service: StatsService) -> bool:
    return bool((await service.info())["calculations"]["loaded"])


async def completed(service: StatsService) -> int:
    return int((await service.info())["calculations"]["completed"])


async def memory_of(service: StatsService, ids: list[int]) -> dict[int, CampaignStats]:
    many = await service.stats_many(ids)
    return {cid: CampaignStats.from_wire(stats) for cid, stats in many.items()}


class Raw:
    """A bare protocol peer: msgpack in, msgpack out, nothing else."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.unpacker = msgpack.Unpacker(strict_map_key=False)
        self.pending: list[Any] = []

    @classmethod
    async def tcp(cls, port: int) -> Raw:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    @classmethod
    async def unix(cls, path: Path) -> Raw:
        return cls(*await asyncio.open_unix_connection(str(path)))

    async def send(self, *messages: Any) -> None:
        self.writer.write(b"".join(msgpack.packb(m) for m in messages))
        await self.writer.drain()

    async def send_bytes(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self, n: int = 1, within: float = 5.0) -> list[Any]:
        async with asyncio.timeout(within):
            while len(self.pending) < n:
                data = await self.reader.read(1 << 16)
                if not data:
                    raise ConnectionResetError(f"closed after {self.pending!r}")
                self.unpacker.feed(data)
                self.pending.extend(self.unpacker)
        out, self.pending = self.pending[:n], self.pending[n:]
        return out

    async def call(self, *message: Any) -> Any:
        await self.send(list(message))
        [reply] = await self.recv()
        return reply

    async def is_closed(self, within: float = 5.0) -> bool:
        async with asyncio.timeout(within):
            while True:
                data = await self.reader.read(1 << 16)
                if not data:
                    return True
                self.unpacker.feed(data)
                self.pending.extend(self.unpacker)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


@dataclass
class Running:
    service: StatsService
    server: StatsServer
    unix: Path

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port


Start = Callable[..., Awaitable[Running]]


#: what ``campaignstats serve`` prints once its TCP listener is open
LISTENING = re.compile(r"listening on tcp://127\.0\.0\.1:(\d+)")


async def serve_process(
    *args: str,
    env: Mapping[str, str] | None = None,
    stderr: int = asyncio.subprocess.PIPE,
) -> tuple[asyncio.subprocess.Process, int]:
    """``campaignstats serve ARGS`` in a process of its own, and its TCP port once it listens.

    It runs without ``CAMPAIGNSTATS_TOKEN`` (the tests' peers send none), with ``env`` added.
    Its stdout is a pipe the caller may go on reading; if it exits before listening, the error
    carries the end of its stderr (when that is a pipe)."""
    environ = {k: v for k, v in os.environ.items() if k != "CAMPAIGNSTATS_TOKEN"}
    environ.update(env or {})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "campaignstats.cli", "serve", *args,
        stdout=asyncio.subprocess.PIPE, stderr=stderr, env=environ,
    )  # fmt: skip
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        while True:
            line = (await proc.stdout.readline()).decode()
            if not line:
                error = ""
                if proc.stderr is not None:
                    error = (await proc.stderr.read()).decode(errors="replace")[-2000:]
                code = await proc.wait()
                raise AssertionError(f"serve exited before listening ({code}): {error}")
            if m := LISTENING.search(line):
                return proc, int(m.group(1))


T = TypeVar("T")


def lines_run(code: Path, work: Callable[[], T]) -> tuple[T, int]:
    """``work()``'s result, and how many lines of the Python files under ``code`` it ran.

    A count of the work done that is the same on every run and every machine: the tests that
    guard how an operation grows with its input compare these, never seconds (a timed test
    flakes on a loaded machine; speed is measured in bench/)."""
    where = str(code)
    lines = 0

    def count(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal lines
        if event == "line":
            lines += 1
        return count

    def enter(frame: FrameType, event: str, arg: object) -> Any:
        return count if frame.f_code.co_filename.startswith(where) else None

    previous = sys.gettrace()
    sys.settrace(enter)
    try:
        result = work()
    finally:
        sys.settrace(previous)
    return result, lines


def processes_using(path: Path) -> list[str]:
    """The command lines of the processes that name ``path`` (an embedded Postgres names its
    data directory): what a stopped command left running."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(path) in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found
