"""A failed commit's rollback drops every connection's unwritten metric casts; each connection
whose casts it dropped is told at its next ``flush``, once (docs/metrics.md, "A failed commit").
Real connections to one server whose metrics log cannot be written (a full disk, as in
tests/test_review_metrics.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from campaignstats.actor.actor import ActorConfig
from campaignstats.actor.metrics import MetricsConfig
from campaignstats.metrics import log as mlog

from .helpers import Raw, Start

pytestmark = pytest.mark.timeout(120)


class FullDisk:
    """``os`` for the log module whose ``write`` fails with ENOSPC while ``full``."""

    def __init__(self) -> None:
        self.full = False

    def write(self, fd: int, data: Any) -> int:
        if self.full:
            raise OSError(28, "No space left on device")
        return os.write(fd, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def config(tmp_path: Path) -> ActorConfig:
    metrics = MetricsConfig(appendonly=tmp_path / "metrics.aof", snapshot_interval=None)
    return ActorConfig(sync_interval=3600, metrics=metrics)


async def views(raw: Raw, req: int, campaign: int) -> int | None:
    """The campaign's ``views`` counter, read by ``raw`` (after its own casts: a read never
    overtakes its connection's writes)."""
    reply = await raw.call("metrics", req, campaign)
    assert reply[0] == "ok", reply
    counters: dict[str, int] = reply[2]["total"]["counters"]
    return counters.get("views")


def incr(campaign: int, n: int) -> list[Any]:
    return ["metric", {"campaign": campaign, "incr": {"views": n}}]


async def test_a_connection_whose_casts_another_ones_failed_flush_dropped_is_told_once(
    start: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = await start(config(tmp_path))
    disk = FullDisk()
    monkeypatch.setattr(mlog, "os", disk)
    a, b, c = [await Raw.unix(running.unix) for _ in range(3)]
    try:
        await b.send(incr(61, 1))
        assert await b.call("flush", 1) == ["ok", 1, None]  # B's last successful flush
        disk.full = True  # from here the idle actor's commits fail: records stay buffered
        await b.send(incr(61, 2))
        assert await views(b, 2, 61) == 3  # applied, not written
        await a.send(incr(60, 1))
        failed = await a.call("flush", 1)
        assert failed[:3] == ["err", 1, "internal"], failed  # A: dropped, not kept
        disk.full = False  # the disk has room again: what follows fails for B's sake only
        assert await views(b, 3, 61) == 1  # B's 2 went with A's rollback
        await b.send(incr(61, 4))  # sent after the drop, before B hears of it: not kept either
        told = await b.call("flush", 4)
        assert told[:3] == ["err", 4, "internal"], told
        assert "since its last successful flush were not kept" in told[3]
        assert await views(b, 5, 61) == 1
        await b.send(incr(61, 2), incr(61, 4))  # what a client does: send them again
        assert await b.call("flush", 6) == ["ok", 6, None]  # told once
        assert await views(b, 7, 61) == 7  # counted once
        assert await c.call("flush", 1) == ["ok", 1, None]  # sent nothing: told nothing
        assert await a.call("flush", 2) == ["ok", 2, None]  # told by its own failed flush
        assert await views(a, 3, 60) is None
        info = (await running.service.info())["metrics"]
        assert info["casts_not_kept"] == 1
        assert info["producers_not_kept"] == 0
    finally:
        for raw in (a, b, c):
            await raw.close()


async def test_a_connection_whose_casts_were_written_before_the_failure_is_not_told(
    start: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only unwritten casts are dropped: B's casts written by a commit before A's failure (an
    idle actor commits what it applied) stay kept, and B's next flush succeeds."""
    running = await start(config(tmp_path))
    disk = FullDisk()
    monkeypatch.setattr(mlog, "os", disk)
    a, b = await Raw.unix(running.unix), await Raw.unix(running.unix)
    try:
        await b.send(incr(62, 5))
        assert await views(b, 1, 62) == 5
        await running.service.flush()  # the embedding process's flush commits B's cast too
        disk.full = True
        await a.send(incr(63, 1))
        assert (await a.call("flush", 1))[:3] == ["err", 1, "internal"]
        disk.full = False
        assert await b.call("flush", 2) == ["ok", 2, None]
        assert await views(b, 3, 62) == 5
    finally:
        await a.close()
        await b.close()


async def test_the_embedding_api_and_other_connections_are_not_refused_after_a_rollback(
    start: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the connections whose casts were dropped are owed the error: the embedding
    process's casts (and the HTTP ingest's, which share its producer) and a new connection's
    are applied and flushed as usual while B has not flushed yet."""
    running = await start(config(tmp_path))
    disk = FullDisk()
    monkeypatch.setattr(mlog, "os", disk)
    a, b = await Raw.unix(running.unix), await Raw.unix(running.unix)
    try:
        disk.full = True
        await b.send(incr(64, 1))
        assert await views(b, 1, 64) == 1
        await a.send(incr(65, 1))
        assert (await a.call("flush", 1))[:3] == ["err", 1, "internal"]
        disk.full = False
        running.service.metric(66, incr={"views": 3})
        await running.service.flush()
        d = await Raw.unix(running.unix)
        try:
            await d.send(incr(66, 4))
            assert await d.call("flush", 1) == ["ok", 1, None]
            assert await views(d, 2, 66) == 7
        finally:
            await d.close()
        assert (await running.service.info())["metrics"]["producers_not_kept"] == 1  # B
        assert (await b.call("flush", 3))[:3] == ["err", 3, "internal"]
    finally:
        await a.close()
        await b.close()
