"""The fixes of the second metrics review's findings, beyond tests/test_review_metrics2.py: the
edges of each fix (docs/metrics.md). Pure state where the behaviour is the state's; a real
snapshot file and log where it is about the files."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import msgpack
import pytest

from campaignstats.actor.actor import ActorConfig
from campaignstats.actor.metrics import MetricsConfig
from campaignstats.errors import Invalid
from campaignstats.metrics import log as mlog
from campaignstats.metrics import make_update
from campaignstats.metrics.model import MetricsState
from campaignstats.metrics.store import MetricsStore, snapshot_path_for
from campaignstats.metrics.update import MetricLimits
from campaignstats.requests import guard_request

from .helpers import Raw, Start

NOW = 1_800_000_000.0


def test_a_snapshot_row_that_cannot_be_read_costs_its_campaign_only(tmp_path: Path) -> None:
    state = MetricsState()
    state.apply(make_update(5, incr={"views": 3}), NOW)
    state.apply(make_update(6, incr={"views": 4}), NOW)
    raw = msgpack.unpackb(state.snapshot(), strict_map_key=False)
    raw["campaigns"][0][0] = 0  # what a guard on campaign 0 once wrote
    data = msgpack.packb(raw)
    restored = MetricsState.restore(data)
    assert len(restored.campaigns) == 1
    assert len(restored.skipped_rows) == 1
    assert "campaign id" in restored.skipped_rows[0]
    # the same through the files: the other campaign loads, the skip is counted in info
    log = tmp_path / "m.aof"
    file = {"format": 1, "seq": 0, "saved_at": NOW, "state": data}
    snapshot_path_for(log).write_bytes(msgpack.packb(file))
    store = MetricsStore.open(log)
    try:
        assert len(store.state.campaigns) == 1
        assert store.info()["snapshot_rows_skipped"] == 1
    finally:
        store.log.close()


@pytest.mark.parametrize("campaign", [0, -1, 2**63, True])
def test_a_guard_on_a_campaign_id_out_of_range_is_refused_by_the_state(campaign: int) -> None:
    state = MetricsState()
    with pytest.raises(Invalid):
        state.set_guard(campaign, "views", NOW + 60, None)
    assert state.campaigns == {}
    request = guard_request(campaign, "views", {"deadline": NOW + 60}, 64)
    assert isinstance(request, Exception)


@pytest.mark.parametrize("name", ["", "\ud800", 7])
def test_a_guard_name_that_no_log_can_hold_is_refused_by_the_state(name: str) -> None:
    state = MetricsState()
    with pytest.raises(Invalid):
        state.set_guard(1, name, NOW + 60, None)
    assert state.campaigns == {}


@pytest.mark.parametrize("deadline", [math.nan, math.inf, "soon"])
def test_a_guard_deadline_that_is_not_a_finite_number_is_refused(deadline: float) -> None:
    state = MetricsState()
    with pytest.raises(Invalid):
        state.set_guard(1, "views", deadline, None)
    assert state.campaigns == {}


def test_a_state_with_a_lower_limit_replays_what_a_higher_one_accepted() -> None:
    limits = MetricLimits(max_names=2, max_string=8, max_campaigns=1)
    state = MetricsState(limits)
    wide = make_update(9, incr={"a": 1, "b": 2, "c": 3}, at=NOW)
    assert state.replay(wide) is None
    assert state.replay(make_update(10, incr={"long-name-x": 1}, at=NOW)) is None
    state.set_guard(11, "x", NOW, None, growth=False)
    assert set(state.campaigns) == {9, 10, 11}
    # new growth is still refused
    assert state.apply(make_update(9, incr={"d": 1}), NOW).error is not None
    with pytest.raises(Invalid):
        state.set_guard(12, "x", NOW, None)


def test_a_throttle_full_of_live_keys_refuses_a_new_key_until_one_expires() -> None:
    state = MetricsState(MetricLimits(max_throttle_keys=3))
    state.set_guard(1, "signups", None, 60)
    for key in "abc":
        assert not state.apply(make_update(1, dims={"k": key}, incr={"signups": 1}), NOW).refused
    refused = state.apply(make_update(1, dims={"k": "d"}, incr={"signups": 1}), NOW + 1)
    assert refused.refused == {"signups": "throttle_full"}
    assert state.info()["refused"]["throttle_full"] == 1
    assert "d" not in state.campaigns[1].dims["k"]
    # a known key is still judged by its period, an unguarded name still applies
    again = state.apply(make_update(1, dims={"k": "a"}, incr={"signups": 1, "views": 1}), NOW + 2)
    assert again.refused == {"signups": "throttle"}
    # once the period has passed, the entries expire and a new key is remembered
    later = state.apply(make_update(1, dims={"k": "d"}, incr={"signups": 1}), NOW + 61)
    assert later.refused == {}
    assert later.error is None
    assert len(state.campaigns[1].throttle) == 1


def test_a_replayed_member_older_than_the_kept_days_joins_no_daily_set_either() -> None:
    state = MetricsState()
    old = NOW - 400 * 86_400
    assert state.replay(make_update(1, member={"visitors": "x"}, at=old), NOW) is None
    unique = state.campaigns[1].total.uniques["visitors"]
    assert unique.all.estimate() == 1
    assert unique.days == {}
    # a recent day still gets its daily set
    assert state.replay(make_update(1, member={"visitors": "y"}, at=NOW - 86_400), NOW) is None
    assert list(unique.days) == [int((NOW - 86_400) // 86_400)]


def test_a_gauge_for_a_bucket_the_state_can_keep_is_applied() -> None:
    state = MetricsState(MetricLimits(gauge_buckets=3))
    bucket = int(NOW // 360) * 360
    now = bucket + 200.0
    assert state.apply(make_update(1, gauge={"online": 5}), now).error is None
    assert state.apply(make_update(1, gauge={"online": 7}, at=now + 250), now).error is None
    previous = state.apply(make_update(1, gauge={"online": 6}, at=bucket - 350.0), now)
    assert previous.error is None
    assert sorted(state.campaigns[1].total.gauges["online"]) == [bucket - 360, bucket, bucket + 360]
    # now full, all newer: the one before is refused as too old, counted
    older = state.apply(make_update(1, gauge={"online": 1}, at=bucket - 700.0), now)
    assert older.error is not None
    assert "every bucket kept" in str(older.error)
    assert state.info()["rejected"]["too_old"] == 1


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


@pytest.mark.timeout(120)
async def test_a_connection_told_by_its_own_failed_reset_is_not_told_again_at_its_flush(
    start: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = MetricsConfig(appendonly=tmp_path / "metrics.aof", snapshot_interval=None)
    running = await start(ActorConfig(sync_interval=3600, metrics=metrics))
    disk = FullDisk()
    monkeypatch.setattr(mlog, "os", disk)
    b = await Raw.unix(running.unix)
    try:
        await b.send(["metric", {"campaign": 91, "incr": {"views": 2, "old": 1}}])
        assert await b.call("flush", 1) == ["ok", 1, None]
        disk.full = True
        await b.send(["metric", {"campaign": 91, "incr": {"views": 3}}])
        failed = await b.call("reset_metrics", 2, 91, "old")
        assert failed[:3] == ["err", 2, "internal"], failed
        assert "send them again" in failed[3]
        disk.full = False
        await b.send(["metric", {"campaign": 91, "incr": {"views": 3}}])
        assert (await b.call("reset_metrics", 3, 91, "old"))[:3] == ["ok", 3, {"found": True}]
        assert await b.call("flush", 4) == ["ok", 4, None]
        reply = await b.call("metrics", 5, 91)
        assert reply[2]["total"]["counters"] == {"views": 5}
        assert (await running.service.info())["metrics"]["casts_not_kept"] == 0
    finally:
        await b.close()
