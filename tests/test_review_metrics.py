"""The adversarial review's findings on the custom metrics (issue 14): each test failed before
its fix (docs/metrics.md, "Durability" and "Integration").

Each docstring says what was wrong and what should happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import time
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest

from campaignstats.actor.actor import ActorConfig
from campaignstats.actor.metrics import MetricsConfig
from campaignstats.metrics import log as mlog
from campaignstats.metrics.store import MetricsStore
from campaignstats.metrics.update import make_update

from .helpers import Raw, Start

pytestmark = pytest.mark.timeout(120)


def _store_with(path: Path, n: int) -> None:
    store = MetricsStore.open(path, fsync="always")
    for _ in range(n):
        store.apply(make_update(1, incr={"views": 1}, at=1.7e9))
        store.commit()  # acknowledged, one record each
    store.log.close()


# -- the log and the snapshot --------------------------------------------------------------------


def test_a_corrupt_record_in_the_middle_does_not_drop_the_acknowledged_records_after_it(
    tmp_path: Path,
) -> None:
    """A bit flip in record 3 of 10 makes ``scan`` stop there (log.py, ``scan``: the first
    checksum mismatch ends the good part) and ``MetricsLog.open`` truncates the file at that
    record: the 7 intact, acknowledged records after it are dropped (only copied aside). The
    contract cuts a *torn or corrupt tail*; a damaged record whose length field is intact is not
    the tail. It should be skipped (counted and warned) and the records after it replayed, or the
    server should refuse to start (Redis refuses a log corrupt in the middle), never silently
    lose acknowledged updates: views should be 9 (or the open should fail), not 2."""
    path = tmp_path / "m.aof"
    _store_with(path, 10)
    data = bytearray(path.read_bytes())
    pos = len(mlog.MAGIC)
    for _ in range(2):
        (n, _crc) = struct.unpack_from("<II", data, pos)
        pos += 8 + n
    (n, _crc) = struct.unpack_from("<II", data, pos)
    data[pos + 8 + n - 1] ^= 0xFF  # one byte of record 3's payload
    path.write_bytes(bytes(data))
    store = MetricsStore.open(path, fsync="always")
    try:
        assert store.metrics(1)["total"]["counters"] == {"views": 9}
    finally:
        store.log.close()


def test_a_log_of_a_newer_format_is_not_wiped_at_start(tmp_path: Path) -> None:
    """A log whose header is a later format (``CSMLOG2``: written by a newer release, then the
    server downgraded) is treated as garbage: ``scan`` answers "bad header", ``MetricsLog.open``
    copies it aside and replaces the log by an empty one (log.py, ``open``, ``good == 0``), and
    the server starts with no metrics. Every metric since the last snapshot is gone from the
    live state, and the next compaction writes a snapshot without them. A file that *is* a
    metrics log of an unknown version should make the open fail with a clear error (as for a
    newer snapshot of the counts), leaving the file untouched."""
    path = tmp_path / "m.aof"
    _store_with(path, 5)
    original = path.read_bytes().replace(b"CSMLOG1\n", b"CSMLOG2\n", 1)
    path.write_bytes(original)
    with contextlib.suppress(Exception):
        MetricsStore.open(path, fsync="always").log.close()
    assert path.read_bytes() == original, "the newer log was replaced by an empty one"


def test_a_snapshot_of_a_newer_format_is_not_discarded(tmp_path: Path) -> None:
    """``load_snapshot`` treats a snapshot whose ``format`` is newer than it knows as damaged
    (store.py, ``load_snapshot``: ``format != SNAPSHOT_FORMAT`` raises inside the ``try``), moves
    it aside and starts from nothing: after a downgrade every compacted metric is gone, and the
    next compaction writes a snapshot without them. An unknown *format* is not damage: the open
    should fail with a clear error and leave the snapshot in place."""
    path = tmp_path / "m.aof"
    store = MetricsStore.open(path, fsync="always")
    store.apply(make_update(1, incr={"views": 5}, at=1.7e9))
    store.close(snapshot=True)
    snap = tmp_path / "m.aof.snapshot"
    raw = msgpack.unpackb(snap.read_bytes())
    raw["format"] = 2
    snap.write_bytes(msgpack.packb(raw))
    with contextlib.suppress(Exception):
        MetricsStore.open(path, fsync="always").log.close()
    assert snap.exists(), "the newer snapshot was moved aside and the metrics start empty"


# -- the server ---------------------------------------------------------------------------------


def _config(tmp_path: Path, **metrics: Any) -> ActorConfig:
    metrics.setdefault("appendonly", tmp_path / "metrics.aof")
    return ActorConfig(sync_interval=3600, publish_interval=0.3, metrics=MetricsConfig(**metrics))


class _FullDisk:
    """``os`` for the log module whose ``write`` fails with ENOSPC while ``full`` (a full disk)."""

    def __init__(self) -> None:
        self.full = True

    def write(self, fd: int, data: Any) -> int:
        if self.full:
            raise OSError(28, "No space left on device")
        return os.write(fd, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


async def test_http_metrics_ingest_is_not_answered_with_an_error_for_updates_it_keeps(
    start: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/http.md: once a batch is queued it "is never answered with an error ... (a retry
    would count it twice)". When the metrics log cannot be written (a full disk), the actor has
    already applied the updates and keeps their records buffered (log.py, ``commit``: "the
    records stay buffered, the next commit tries again"); the ``flush`` raises the ``OSError``
    (actor.py ``_flush``), which ``_ingest`` (http/app.py, only ``TimeoutError``/``Overloaded``
    caught around ``service.flush()``) turns into a 5xx. The client retries, and once the disk
    has room both copies are written: views 2, for one page view. The answer should be ``202``
    (with ``"pending": true`` or a flag saying it is not durable yet), never an error for an
    update the server keeps; or the update must be dropped from the state and the buffer."""
    from campaignstats.http import HttpConfig, HttpServer, app

    running = await start(_config(tmp_path))
    server = HttpServer(app(running.service, HttpConfig()), "127.0.0.1", 0)
    await server.start()
    disk = _FullDisk()
    monkeypatch.setattr(mlog, "os", disk)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            body = [{"campaign": 51, "incr": {"views": 1}}]
            first = await client.post("/v1/metrics", json=body)
            if first.status_code != 202:  # what a client does with an error: retry later
                disk.full = False
                await client.post("/v1/metrics", json=body)
            disk.full = False
            await running.service.flush()
            counters = (await client.get("/v1/campaigns/51/metrics")).json()["total"]["counters"]
        assert first.status_code == 202, f"answered {first.status_code}: {first.text}"
        assert counters == {"views": 1}
    finally:
        await server.close()


async def test_a_flush_error_does_not_leave_the_update_to_be_written_later(
    start: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The socket: a ``flush`` after a ``metric`` cast while the log cannot be written is
    answered ``internal`` ("nothing is acknowledged"), yet the update stays in the state and in
    the log's buffer and is written by the next commit once the disk has room: a client that
    retries what was not acknowledged counts it twice (views 2 after one view sent twice, once
    refused). Either the failed flush must not have been followed by the write of its update
    (drop it from the state and the buffer: nothing acknowledged, nothing kept), or the error
    must say the update is kept (not a plain ``internal``)."""
    running = await start(_config(tmp_path))
    disk = _FullDisk()
    monkeypatch.setattr(mlog, "os", disk)
    raw = await Raw.unix(running.unix)
    try:
        await raw.send(["metric", {"campaign": 52, "incr": {"views": 1}}])
        first = await raw.call("flush", 1)
        if first[0] != "ok":  # not acknowledged: send it again once the disk has room
            disk.full = False
            await raw.send(["metric", {"campaign": 52, "incr": {"views": 1}}])
            assert (await raw.call("flush", 2))[0] == "ok"
        disk.full = False
        assert (await raw.call("flush", 3))[0] == "ok"
        counters = (await raw.call("metrics", 4, 52))[2]["total"]["counters"]
        assert counters == {"views": 1}, f"first flush answered {first}"
    finally:
        await raw.close()


async def test_an_unusable_log_path_at_start_fails_once_with_the_reason(
    start: Start, tmp_path: Path
) -> None:
    """``--appendonly`` under a path that cannot hold it (here a regular file as its directory):
    ``MetricsKeeper`` is built inside ``StatsActor.run`` (actor.py, ``run``), so the
    ``NotADirectoryError`` is taken for an actor crash: the supervisor restarts the actor five
    times within milliseconds (each one failing the same way), gives up, and the service's
    start raises ``ActorStopped("the stats actor has stopped")``, which names neither the file
    nor the cause (they are only in the log). A configuration error of the metrics should be
    raised once, from ``start()``, with the path and the ``OSError``, before any actor runs."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(Exception) as caught:  # noqa: PT011 (the point is its message)
        async with asyncio.timeout(30):
            await start(_config(tmp_path, appendonly=blocker / "metrics.aof"))
    assert "not-a-dir" in str(caught.value) or "Not a directory" in str(caught.value), repr(
        caught.value
    )


def test_an_unwritable_archive_dir_is_not_retried_with_a_state_copy_every_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``--archive-dir`` unwritable, ``Archiver.run`` raises before it sets
    ``exported_until``, so ``Archiver.due`` stays true and ``MetricsKeeper._archive_tick``
    (actor/metrics.py) takes a full ``state.snapshot()`` on the actor at *every* one-second tick,
    forever, and logs ``metrics.archive_failed`` each time. The copy is the expensive part: 135
    ms on the loop for 2,000 campaigns with one unique metric each (/tmp/r14/stall.py), so a
    broken archive directory costs the event loop a seventh of its time. A failed export should
    back off (retry at the next period, or exponentially), not copy the state every second."""
    from campaignstats.actor.metrics import MetricsKeeper
    from campaignstats.metrics import model

    (tmp_path / "blocker").write_text("x")
    keeper = MetricsKeeper(
        MetricsConfig(
            appendonly=tmp_path / "m.aof",
            archive_dir=tmp_path / "blocker" / "archive",
            archive_every=600,
        )
    )
    keeper.apply_many([make_update(1, incr={"views": 1})])
    copies = 0
    original = model.MetricsState.begin_copy  # the archive's copy, taken in slices

    def counting(self: model.MetricsState) -> model.StateCopy:
        nonlocal copies
        copies += 1
        return original(self)

    monkeypatch.setattr(model.MetricsState, "begin_copy", counting)
    try:
        for _ in range(5):
            keeper.tick(time.monotonic())
            for _ in range(1_000):  # what the actor does between ticks: the copy's slices
                if not keeper.copying:
                    break
                keeper.copy_step(time.monotonic())
            if keeper._archive is not None:
                with contextlib.suppress(Exception):
                    keeper._archive.result()
    finally:
        keeper.close(snapshot=False)
    assert copies <= 2, f"{copies} state copies for 5 ticks of one failing period"
