"""A compaction copies the metrics state in slices, copy-on-write by campaign (docs/metrics.md,
"Compaction"): the snapshot file is the state at the compaction's log seq whatever changed while
it was copied, a restart from the files equals the live state, and a kill before the copy is
written loses nothing."""

from __future__ import annotations

import asyncio
import csv
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from campaignstats.actor.actor import ActorConfig
from campaignstats.actor.metrics import MetricsConfig, MetricsKeeper
from campaignstats.metrics import MetricsState, MetricsStore, UniqueSet
from campaignstats.metrics.log import MAGIC, encode_record, scan
from campaignstats.metrics.store import load_snapshot, write_snapshot
from campaignstats.metrics.update import make_update

from .helpers import Raw, Start, wait_for

pytestmark = pytest.mark.timeout(120)

T0 = 1_767_225_600.0  # the fixed clock of the stores below


def rows(state: MetricsState) -> dict[int, Any]:
    """Every campaign's metrics and guards as the snapshot holds them, by campaign; a sketch as
    its estimate (its bytes depend on the order its first members were added in, which a set's
    order decides: it differs between processes)."""
    data = msgpack.unpackb(state.snapshot(), strict_map_key=False)
    return {row[0]: _estimates(row[1:]) for row in data["campaigns"]}


def _estimates(value: Any) -> Any:
    if isinstance(value, list) and len(value) == 2 and value[0] == 1 and type(value[1]) is bytes:
        return ["sketch", UniqueSet.from_state(value).estimate()]
    if isinstance(value, list):
        return [_estimates(v) for v in value]
    if isinstance(value, dict):
        return {k: _estimates(v) for k, v in value.items()}
    return value


def open_store(path: Path) -> MetricsStore:
    return MetricsStore.open(path, fsync="no", clock=lambda: T0)


def populate(store: MetricsStore, campaigns: int) -> None:
    """Counters, dimensions, gauges, seen stamps, unique sets (some past 128 members: sketches)
    and guards."""
    for cid in range(1, campaigns + 1):
        members = [f"m{cid}-{i}" for i in range(40 if cid % 3 else 300)]
        store.apply(make_update(cid, incr={"views": cid}, member={"visitors": members}))
        store.apply(
            make_update(cid, dims={"country": "de"}, incr={"clicks": 1}, gauge={"online": cid})
        )
        store.apply(make_update(cid, dims={"country": "fr"}, seen=["visit"], set={"goal": 9}))
        if cid % 4 == 0:
            store.set_guard(cid, "goal", deadline=T0 + 3600)
    store.commit()


def change(store: MetricsStore, cid: int, campaigns: int, step: int) -> None:
    """One change of campaign ``cid`` (an update, a reset of a name or of everything, a guard),
    or a new campaign."""
    kind = step % 6
    if kind == 0:
        store.apply(make_update(cid, incr={"views": 1000}, member={"visitors": [f"new{step}"]}))
    elif kind == 1:
        store.apply(make_update(cid, dims={"country": "es"}, incr={"clicks": 5}))
    elif kind == 2:
        store.reset(cid, "views")
    elif kind == 3:
        store.reset(cid)  # everything: a campaign without guards is dropped from the state
    elif kind == 4:
        store.set_guard(cid, "views", min_period=60)
    else:
        # created after the compaction's seq: not in its snapshot
        store.apply(make_update(campaigns + step, incr={"views": 1}))


def replayed_up_to(log_records: list[Any], seq: int, directory: Path) -> MetricsState:
    """The state rebuilt by replaying the log's records up to ``seq`` (no snapshot)."""
    path = directory / "upto.log"
    path.write_bytes(MAGIC + b"".join(encode_record(*r) for r in log_records if r.seq <= seq))
    store = open_store(path)
    store.log.close()
    return store.state


def sliced_compaction_with_changes(store: MetricsStore, campaigns: int) -> tuple[int, list[Any]]:
    """A compaction copied one campaign per step, with changes of campaigns copied and not
    copied yet in between; returns its seq and the log's records before the rewrite."""
    rng = random.Random(14)
    compaction = store.begin_compaction(sliced=True)
    hit = {"waiting": 0, "copied": 0}
    step = 0
    while True:
        for _ in range(3):
            cid = rng.randrange(1, campaigns + 1)
            if step % 6 != 5:
                hit["waiting" if compaction.copy.waiting(cid) else "copied"] += 1
            change(store, cid, campaigns, step)
            step += 1
        if compaction.step(0.0):  # a zero budget: one campaign per step
            break
    # Both kinds of campaign were changed while the copy was under way (copy-on-write).
    assert hit["waiting"] > 0, hit
    assert hit["copied"] > 0, hit
    store.commit()
    records = scan(store.log.path.read_bytes()).records
    write_snapshot(store.snapshot_path, compaction)
    store.finish_compaction(compaction)
    return compaction.mark.seq, records


def test_a_sliced_compaction_with_changes_in_between_holds_the_state_at_its_seq(
    tmp_path: Path,
) -> None:
    store = open_store(tmp_path / "m.log")
    populate(store, 60)
    seq, records = sliced_compaction_with_changes(store, 60)
    assert any(r.seq > seq for r in records)  # changes were made after the seq
    snapshot, snapshot_seq = load_snapshot(store.snapshot_path, store.state.limits)
    expected = replayed_up_to(records, seq, tmp_path)
    assert snapshot_seq == seq
    assert rows(snapshot) == rows(expected)
    assert snapshot.applied == expected.applied
    assert rows(snapshot) != rows(store.state)  # the live state moved on
    store.log.close()


def test_a_restart_from_the_files_after_a_sliced_compaction_and_more_updates_equals_the_live_state(
    tmp_path: Path,
) -> None:
    store = open_store(tmp_path / "m.log")
    populate(store, 60)
    sliced_compaction_with_changes(store, 60)
    rng = random.Random(3)
    for step in range(50):
        change(store, rng.randrange(1, 61), 60, step)
    store.commit()
    live = rows(store.state)
    store.log.close()
    restarted = open_store(tmp_path / "m.log")
    restarted.log.close()
    assert rows(restarted.state) == live


def test_a_state_copied_in_slices_is_the_state_copied_at_once(tmp_path: Path) -> None:
    store = open_store(tmp_path / "m.log")
    populate(store, 25)
    at_once = store.state.snapshot()
    copy = store.state.begin_copy()
    while not copy.step(0.0, lambda: 0.0):
        pass
    restored = MetricsState.restore(b"".join(copy.pieces()))
    assert rows(restored) == rows(MetricsState.restore(at_once)) == rows(store.state)
    store.log.close()


CHILD = textwrap.dedent(
    """
    import os, random, sys, time
    from pathlib import Path
    import msgpack
    from tests.test_metrics_compaction import T0, change, open_store, populate, rows

    store = open_store(Path(sys.argv[1]))
    populate(store, 80)
    compaction = store.begin_compaction(sliced=True)
    rng = random.Random(5)
    for step in range(40):  # half of the campaigns copied, changes committed in between
        change(store, rng.randrange(1, 81), 80, step)
        store.commit()
        compaction.step(0.0)
    assert not compaction.done
    Path(sys.argv[2]).write_bytes(msgpack.packb(rows(store.state)))
    print("ready", flush=True)
    time.sleep(60)
    """
)


def test_a_kill_while_the_state_is_copied_in_slices_loses_nothing(tmp_path: Path) -> None:
    log_path, expected_path = tmp_path / "m.log", tmp_path / "expected"
    root = Path(__file__).resolve().parent.parent
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(log_path), str(expected_path)],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert child.stdout is not None
        for line in child.stdout:  # structlog's lines, then ours
            if line.strip() == "ready":
                break
        else:
            pytest.fail("the child ended before it was ready")
        os.kill(child.pid, signal.SIGKILL)  # the compaction unfinished, its file never written
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
    assert not (tmp_path / "m.log.snapshot").exists()
    expected = msgpack.unpackb(expected_path.read_bytes(), strict_map_key=False)
    store = open_store(log_path)
    store.log.close()
    assert rows(store.state) == expected


async def test_a_server_compacting_while_metrics_arrive_restarts_from_its_files_equal(
    start: Start, tmp_path: Path
) -> None:
    """A running server with periodic compactions, casts arriving over a socket meanwhile: once
    a compaction is finished and everything flushed, the files (copied aside as a kill would
    leave them) load to the live state."""
    log_path = tmp_path / "metrics.aof"
    running = await start(
        ActorConfig(
            sync_interval=3600,
            metrics=MetricsConfig(appendonly=log_path, snapshot_interval=0.5),
        )
    )
    service = running.service
    for cid in range(1, 301):
        members = [f"m{cid}-{i}" for i in range(150)]
        service.metric(cid, member={"visitors": members}, dims={"country": "de"}, incr={"n": 1})
    await service.flush()
    raw = await Raw.unix(running.unix)
    rng = random.Random(9)
    try:
        for req in range(1, 2_001):  # bounded: casts until two compactions have finished
            cid = rng.randrange(1, 320)
            await raw.send(["metric", {"campaign": cid, "incr": {"n": 1}, "member": {"v": "x"}}])
            assert await raw.call("flush", req) == ["ok", req, None]
            if (await service.info())["metrics"]["compactions"] >= 2:
                break
            await asyncio.sleep(0.005)
        info = (await service.info())["metrics"]
        assert info["compactions"] >= 2
        assert info["last_compaction"]["slices"] >= 1
        live = {cid: await service.metrics(cid) for cid in range(1, 320)}
        aside = tmp_path / "aside"
        aside.mkdir()
        for name in ("metrics.aof", "metrics.aof.snapshot"):
            (aside / name).write_bytes((tmp_path / name).read_bytes())
    finally:
        await raw.close()
    store = MetricsStore.open(aside / "metrics.aof")
    store.log.close()
    assert {cid: store.metrics(cid) for cid in range(1, 320)} == live
    await wait_for(lambda: service.running)


def test_the_archive_copies_the_state_in_slices_and_exports_it_as_of_the_copys_start(
    tmp_path: Path,
) -> None:
    """The archive's copy of the state is taken like a compaction's (docs/metrics.md,
    "Integration"): changes made while it is copied are not in the file."""
    keeper = MetricsKeeper(
        MetricsConfig(appendonly=tmp_path / "m.aof", archive_dir=tmp_path / "archive")
    )
    assert keeper.archiver is not None
    keeper.archiver.fmt = "csv"
    try:
        for cid in range(1, 41):
            keeper.apply_many([make_update(cid, incr={"views": cid})])
        keeper.tick(time.monotonic())
        assert keeper.copying
        steps = 0
        while keeper.copying and steps < 1_000:  # bounded
            keeper.apply_many([make_update(1 + steps % 40, incr={"views": 1000})])
            keeper.copy_step(time.monotonic())
            steps += 1
        assert not keeper.copying
        assert keeper._archive is not None
        [written] = keeper._archive.result(timeout=60)
    finally:
        keeper.close(snapshot=False)
    with written.open() as f:
        exported = {
            int(row["campaign_id"]): int(row["count"])
            for row in csv.DictReader(f)
            if row["kind"] == "counter" and not row["dim"]
        }
    assert exported == {cid: cid for cid in range(1, 41)}
