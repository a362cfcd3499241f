"""The metrics' durability (docs/metrics.md, "Durability"): a real process killed by SIGKILL at
random points loses nothing acknowledged with ``always`` and at most the last second with
``everysec``; a torn or corrupt log, a damaged snapshot, a crash between a snapshot and the log's
rewrite all start, with a warning, and never count a change twice."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from campaignstats.metrics import MetricsStore, make_update
from campaignstats.metrics.log import MAGIC, LogError
from campaignstats.metrics.store import write_snapshot

ROOT = Path(__file__).resolve().parent.parent
BATCH = 20

# Applies bounded batches of updates through the store and prints each acknowledged total (the
# counter "n" after the commit that covers it), compacting whenever the store says it is due.
CHILD = f"""
import sys, time
from pathlib import Path
import structlog
from campaignstats.metrics import MetricsStore, make_update

structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout: acks

store = MetricsStore.open(
    Path(sys.argv[1]), fsync=sys.argv[2], rewrite_min_size=20_000, rewrite_growth=0.0
)
n = store.state.metrics(1, 0)["total"]["counters"].get("n", 0)
print(f"start {{n}}", flush=True)
while True:
    store.apply_many(
        make_update(1, dims={{"k": str(i % 7)}}, incr={{"n": 1}}, member={{"u": f"m{{n + i}}"}})
        for i in range({BATCH})
    )
    store.commit()
    n += {BATCH}
    print(f"ack {{n}} {{time.monotonic()}}", flush=True)
    if store.compaction_due():
        store.compact()
    time.sleep(0.002)
"""


def counters(store: MetricsStore) -> tuple[int, dict[str, int]]:
    reply = store.state.metrics(1, time.time())
    keys = reply["dims"].get("k", {})
    per_key = {k: v["counters"]["n"] for k, v in keys.items() if k != "total"}
    return reply["total"]["counters"].get("n", 0), per_key


def run_and_kill(log_path: Path, policy: str, rng: random.Random) -> tuple[list[str], float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(log_path), policy],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().startswith("start")
    time.sleep(rng.uniform(0.05, 1.2))
    killed_at = time.monotonic()
    child.send_signal(signal.SIGKILL)
    lines = child.stdout.read().splitlines()
    child.wait(timeout=10)
    child.stdout.close()
    return lines, killed_at


@pytest.mark.parametrize("policy", ["always", "everysec"])
def test_sigkill_at_random_points_loses_nothing_acknowledged_beyond_the_policy(
    policy: str, tmp_path: Path
) -> None:
    rng = random.Random(policy)
    log_path = tmp_path / "metrics.log"
    compactions_seen = False
    for _ in range(4):
        before = MetricsStore.open(log_path)
        start, _ = counters(before)
        before.log.close()
        lines, killed_at = run_and_kill(log_path, policy, rng)
        acks = [(int(n), float(t)) for _, n, t in (line.split() for line in lines)]
        assert acks, "the child acknowledged nothing before it was killed"
        last = acks[-1][0]
        store = MetricsStore.open(log_path)
        recovered, per_key = counters(store)
        compactions_seen = compactions_seen or store.snapshot_path.exists()
        store.log.close()
        # Never more than was applied: at most the batch being written when the kill came.
        assert recovered <= last + BATCH
        if policy == "always":
            assert recovered >= last
        else:
            # At most the last second: what was acknowledged a second before the kill is there.
            second_before = [n for n, t in acks if t <= killed_at - 1.0]
            assert recovered >= (second_before[-1] if second_before else start)
        # Each update's record is whole or absent: the keys add up to the total.
        assert sum(per_key.values()) == recovered
    assert compactions_seen


def make_store(tmp_path: Path, **options: Any) -> MetricsStore:
    return MetricsStore.open(tmp_path / "m.log", **options)


def fill(store: MetricsStore, n: int) -> None:
    for i in range(n):
        store.apply(make_update(1, incr={"n": 1}, member={"u": f"m{i}"}))
        store.commit()


def test_a_torn_tail_is_cut_with_a_warning_and_the_log_keeps_working(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    fill(store, 5)
    store.log.close()
    path = tmp_path / "m.log"
    os.truncate(path, path.stat().st_size - 3)
    with capture_logs() as logs:
        store = make_store(tmp_path)
    assert [e["problem"] for e in logs if e["event"] == "metrics.log.damaged_tail"] == [
        "torn record"
    ]
    assert counters(store)[0] == 4
    fill(store, 1)
    store.log.close()
    with capture_logs() as logs:
        store = make_store(tmp_path)
    assert not [e for e in logs if e["log_level"] == "warning"]
    assert counters(store)[0] == 5
    assert store.log.next_seq == 6


def test_a_corrupt_record_in_the_middle_is_stepped_over_with_a_warning_and_its_bytes_kept(
    tmp_path: Path,
) -> None:
    store = make_store(tmp_path)
    fill(store, 5)
    store.log.close()
    path = tmp_path / "m.log"
    data = bytearray(path.read_bytes())
    record = (len(data) - len(MAGIC)) // 5  # the five records have the same size
    size_after_2 = len(MAGIC) + 2 * record
    data[size_after_2 + 12] ^= 0xFF  # inside the third record's payload
    path.write_bytes(bytes(data))
    with capture_logs() as logs:
        store = make_store(tmp_path)
    (warning,) = [e for e in logs if e["event"] == "metrics.log.skipped_record"]
    assert warning["problem"] == "checksum mismatch"
    assert warning["offset"] == size_after_2
    assert counters(store)[0] == 4  # one record lost, not the two after it
    assert path.read_bytes() == bytes(data)  # the file is left as it is
    aside = Path(warning["copied_to"]).read_bytes()
    assert aside == bytes(data[size_after_2 : size_after_2 + record])
    fill(store, 1)
    store.log.close()
    assert counters(make_store(tmp_path))[0] == 5


def test_a_corrupt_last_record_is_a_damaged_tail_cut_with_a_warning(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    fill(store, 5)
    store.log.close()
    path = tmp_path / "m.log"
    data = bytearray(path.read_bytes())
    record = (len(data) - len(MAGIC)) // 5
    data[len(MAGIC) + 4 * record + 12] ^= 0xFF
    path.write_bytes(bytes(data))
    with capture_logs() as logs:
        store = make_store(tmp_path)
    (warning,) = [e for e in logs if e["event"] == "metrics.log.damaged_tail"]
    assert warning["problem"] == "checksum mismatch"
    assert counters(store)[0] == 4
    assert path.stat().st_size == len(MAGIC) + 4 * record
    assert Path(warning["copied_to"]).read_bytes() == bytes(data[len(MAGIC) + 4 * record :])
    store.log.close()


def test_damage_in_the_middle_that_cannot_be_stepped_over_refuses_to_open(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    fill(store, 5)
    store.log.close()
    path = tmp_path / "m.log"
    data = bytearray(path.read_bytes())
    record = (len(data) - len(MAGIC)) // 5
    data[len(MAGIC) + 2 * record] ^= 0x01  # the third record's length field: off by one
    path.write_bytes(bytes(data))
    with pytest.raises(LogError, match="cannot be stepped over"):
        make_store(tmp_path)
    assert path.read_bytes() == bytes(data)


def test_a_file_that_is_not_a_log_starts_empty_with_a_warning(tmp_path: Path) -> None:
    (tmp_path / "m.log").write_bytes(b"something else entirely")
    with capture_logs() as logs:
        store = make_store(tmp_path)
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["metrics.log.damaged_tail"]
    assert counters(store)[0] == 0
    fill(store, 1)
    store.log.close()
    assert counters(make_store(tmp_path))[0] == 1


def test_a_crash_between_the_snapshot_and_the_log_rewrite_counts_nothing_twice(
    tmp_path: Path,
) -> None:
    store = make_store(tmp_path)
    fill(store, 3)
    compaction = store.begin_compaction()
    write_snapshot(store.snapshot_path, compaction)  # ... and the process dies here
    fill(store, 2)
    store.log.close()
    store = make_store(tmp_path)
    assert counters(store)[0] == 5
    store.compact()
    fill(store, 1)
    store.log.close()
    store = make_store(tmp_path)
    assert counters(store)[0] == 6
    assert store.log.size < 400  # the log holds only what came after the snapshot


def test_a_damaged_snapshot_is_moved_aside_and_the_log_after_it_replayed(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    fill(store, 3)
    store.compact()
    fill(store, 2)
    store.log.close()
    store.snapshot_path.write_bytes(b"\x00garbage")
    with capture_logs() as logs:
        store = make_store(tmp_path)
    assert [e["event"] for e in logs if e["log_level"] == "error"] == [
        "metrics.snapshot.unreadable"
    ]
    assert counters(store)[0] == 2  # the snapshot's 3 are lost, nothing counts twice
    assert list(tmp_path.glob("m.log.snapshot.bad-*"))


def test_resets_guards_and_refusals_survive_a_restart(tmp_path: Path) -> None:
    clock = [1_800_000_000.0]
    store = make_store(tmp_path, clock=lambda: clock[0])
    store.set_guard(1, "late", deadline=clock[0] + 10)
    store.apply(make_update(1, incr={"a": 1, "b": 1, "late": 1}))
    store.reset(1, "a")
    clock[0] += 20
    assert store.apply(make_update(1, incr={"late": 1})).refused == {"late": "deadline"}
    assert store.apply_map({"campaign": 1, "incr": {"b": "x"}}).error is not None
    store.commit()
    store.log.close()
    store = make_store(tmp_path, clock=lambda: clock[0])
    assert store.metrics(1)["total"]["counters"] == {"b": 1, "late": 1}
    assert store.apply(make_update(1, incr={"late": 1})).refused == {"late": "deadline"}
    assert store.log.next_seq == 4  # guard, update, reset: the refused and the invalid are not


def test_everysec_fsyncs_once_a_second_on_the_callers_clock_and_always_on_every_commit(
    tmp_path: Path,
) -> None:
    now = [100.0]
    store = make_store(tmp_path, monotonic=lambda: now[0])
    fill(store, 3)
    assert store.log.fsyncs == 0
    assert store.log.written_seq == 3
    assert store.log.synced_seq == 0
    now[0] += 1.0
    fill(store, 1)
    assert store.log.fsyncs == 1
    assert store.log.synced_seq == 4
    fill(store, 1)
    now[0] += 0.5
    assert not store.tick()
    now[0] += 0.5
    assert store.tick()  # a quiet log is synced by the tick
    assert store.log.synced_seq == 5
    assert not store.tick()
    store.log.close()
    always = MetricsStore.open(tmp_path / "a.log", fsync="always")
    fill(always, 3)
    assert always.log.fsyncs == 3
    assert always.log.synced_seq == 3
    always.log.close()
    never = MetricsStore.open(tmp_path / "n.log", fsync="no")
    fill(never, 3)
    never.tick()
    assert never.log.fsyncs == 0
