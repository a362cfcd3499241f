"""Review of the custom metrics' latest round (guards over the wire, ``serve --metrics-*``
limits, the time checks, the sliced compaction, the rollback's notice): each test is a finding
and fails because of a bug. Real sockets; real server processes where it is about processes."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from campaignstats.actor.actor import ActorConfig
from campaignstats.actor.metrics import MetricsConfig
from campaignstats.client import AsyncStatsClient
from campaignstats.errors import Invalid
from campaignstats.metrics import log as mlog
from campaignstats.metrics import make_update
from campaignstats.metrics.model import BUCKET, MetricsState
from campaignstats.metrics.store import MetricsStore
from campaignstats.metrics.update import MetricLimits
from campaignstats.protocol import Limits

from .helpers import Raw, Start
from .test_metrics_wire import _serve

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


async def counters(raw: Raw, req: int, campaign: int) -> dict[str, int]:
    reply = await raw.call("metrics", req, campaign)
    assert reply[0] == "ok", reply
    result: dict[str, int] = reply[2]["total"]["counters"]
    return result


async def rollback(running: Any, disk: FullDisk, campaign: int) -> None:
    """Another connection's flush fails on a full disk: the store rolls back (reloads its
    state from the files), then the disk has room again."""
    a = await Raw.unix(running.unix)
    try:
        disk.full = True
        await a.send(["metric", {"campaign": campaign, "incr": {"other": 1}}])
        failed = await a.call("flush", 1)
        assert failed[:3] == ["err", 1, "internal"], failed
    finally:
        disk.full = False
        await a.close()


async def test_acknowledged_updates_still_in_the_log_survive_a_restart_with_a_lower_limit(
    module_dsn: str, tmp_path: Path
) -> None:
    """docs/metrics.md ("Limits") says lowering a ``--metrics-*`` limit "refuses only the
    updates that would grow past it". But the log's replay at start judges every record by the
    new limits (``MetricsState.replay`` -> ``_check_limits``; ``update_from_map`` for the
    update's own bounds): an acknowledged update whose record is still in the log (a SIGKILL
    before the next compaction) is rejected at replay (``replay_rejected``) and lost, for good
    at the next compaction. The snapshot's campaigns load whatever the limits, so the same
    values survive or vanish depending on whether a compaction came first. What should happen:
    replayed records were accepted once and are applied as they were (the limits bound growth
    from new updates, not the replay of acknowledged ones)."""
    log = tmp_path / "lowered.aof"
    proc, port = await _serve(module_dsn, log, "--appendfsync", "always")
    try:
        raw = await Raw.tcp(port)
        await raw.send(["metric", {"campaign": 71, "incr": {"a": 1, "b": 2, "c": 3}}])
        assert await raw.call("flush", 1) == ["ok", 1, None]  # acknowledged: durable
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        await raw.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    proc, port = await _serve(
        module_dsn, log, "--appendfsync", "always", "--metrics-max-names", "2"
    )
    try:
        raw = await Raw.tcp(port)
        try:
            held = await counters(raw, 1, 71)
            info = (await raw.call("info", 2))[2]["metrics"]
        finally:
            await raw.close()
        assert held == {"a": 1, "b": 2, "c": 3}, info["replay_rejected"]
    finally:
        proc.kill()
        await proc.wait()


async def test_another_connections_failed_flush_does_not_reset_a_throttle_guard(
    start: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A throttle guard (min_period 3600) let one ``set`` of ``partner`` through; a second one
    within the hour must be refused. But when any other connection's ``flush`` fails (a full
    disk), ``MetricsStore.rollback`` rebuilds the state from the files and the throttle's
    memory (``CampaignMetrics.throttle``, not logged) starts empty for every campaign: the
    next update of every throttled key passes at once. docs/metrics.md only allows that after a
    restart ("after a restart the first update of a key passes"), and this campaign's write
    had been committed and kept. What should happen: the rollback keeps the throttle's memory
    of the campaigns (e.g. carry ``throttle`` from the old state into the reloaded one, at
    least for what was written; dropping entries only loosens nothing)."""
    running = await start(config(tmp_path))
    disk = FullDisk()
    monkeypatch.setattr(mlog, "os", disk)
    b = await Raw.unix(running.unix)
    try:
        assert (await b.call("guard", 1, 81, "partner", {"min_period": 3600}))[0] == "ok"
        await b.send(["metric", {"campaign": 81, "set": {"partner": 1200}}])
        assert await b.call("flush", 2) == ["ok", 2, None]  # written and kept
        await b.send(["metric", {"campaign": 81, "set": {"partner": 1300}}], ["flush", 3])
        refused, flushed = await b.recv(2)
        assert refused[:3] == ["err", None, "invalid"], refused  # the throttle holds
        assert flushed == ["ok", 3, None]
        await rollback(running, disk, 82)
        await b.send(["metric", {"campaign": 81, "set": {"partner": 1400}}], ["flush", 4])
        replies = await b.recv(1)
        if replies[0][:2] != ["ok", 4]:
            replies += await b.recv(1)
        # still inside the hour: refused, the partner total set an hour ago unchanged
        assert await counters(b, 5, 81) == {"partner": 1200}, replies
        assert replies[0][:3] == ["err", None, "invalid"], replies
    finally:
        await b.close()


async def test_the_refusal_counts_of_info_do_not_go_backwards_after_a_rollback(
    start: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``info()["metrics"]["refused"]`` counts the guards' refusals (issue 14: "refused after
    the deadline and inside the period, counted in info") and ``rejected`` the limits' and
    clocks' refusals. Neither is logged, so a rollback (another connection's failed flush:
    ``MetricsStore.rollback`` swaps in a state reloaded from the snapshot) sets them back to
    the snapshot's figures in the same process: a count of refusals decreases, which no
    counter a monitor reads may do. What should happen: the rollback carries ``refused`` and
    ``rejected`` over from the state it replaces (they count what happened, not what is
    kept)."""
    running = await start(config(tmp_path))
    disk = FullDisk()
    monkeypatch.setattr(mlog, "os", disk)
    b = await Raw.unix(running.unix)
    try:
        past = time.time() - 10
        assert (await b.call("guard", 1, 83, "signups", {"deadline": past}))[0] == "ok"
        await b.send(
            ["metric", {"campaign": 83, "incr": {"signups": 1}}],
            ["metric", {"campaign": 83, "incr": {"views": 1}, "at": time.time() + 3600}],
            ["flush", 2],
        )
        deadline, future, flushed = await b.recv(3)
        assert deadline[:3] == future[:3] == ["err", None, "invalid"]
        assert flushed == ["ok", 2, None]
        before = (await running.service.info())["metrics"]
        assert before["refused"]["deadline"] == 1
        assert before["rejected"]["future"] == 1
        await rollback(running, disk, 84)
        after = (await running.service.info())["metrics"]
        assert after["refused"]["deadline"] >= 1
        assert after["rejected"].get("future", 0) >= 1
    finally:
        await b.close()


async def test_a_client_can_guard_every_metric_name_its_server_accepts(
    start: Start, tmp_path: Path
) -> None:
    """With ``serve --max-string 32`` (the increments' strings) and the metrics' own default of
    64 bytes (``--metrics-max-string``), a 40-byte metric name is accepted from the client's
    ``metric()`` (checked against the metric limits) and by the server's ``guard`` (checked
    against ``limits.metrics.max_string``), but ``AsyncStatsClient.set_guard`` (and the
    blocking client's, and so ``campaignstats guard``) checks the name against the hello's
    ``max_string``, the increments' limit, and raises ``Invalid`` without asking: that metric
    cannot be guarded from a client. What should happen: the client checks a guard's name with
    the same bound as its ``metric()`` names (``METRIC_LIMITS.max_string``), or leaves it to
    the server."""
    running = await start(config(tmp_path), limits=Limits(max_string=32))
    name = "n" * 40
    async with AsyncStatsClient(f"unix://{running.unix}") as client:
        client.metric(85, incr={name: 1})
        await client.flush()
        assert (await client.metrics(85))["total"]["counters"] == {name: 1}
        raw = await Raw.unix(running.unix)
        try:  # the server takes this guard
            reply = await raw.call("guard", 1, 86, name, {"min_period": 60})
            assert reply[0] == "ok", reply
        finally:
            await raw.close()
        guard = await client.set_guard(85, name, min_period=60)
        assert guard == {"deadline": None, "min_period": 60.0}


def test_a_gauge_the_state_cannot_keep_is_refused_not_acknowledged_and_dropped() -> None:
    """docs/metrics.md ("Limits", Time): "A gauge older than its kept buckets is refused
    (``too_old``): it would be dropped at once." ``_check_time`` measures "kept" from the
    server's current bucket, but ``_keep`` keeps the ``gauge_buckets`` newest buckets held,
    and an ``at`` up to 300 s ahead may hold the next bucket. So with 2 buckets kept, once
    the current and the next bucket are held, a gauge for the previous bucket passes the check,
    is applied (counted in ``applied``), logged and acknowledged, and ``_keep`` drops it
    silently: nothing says it was not kept. What should happen: refuse it as ``too_old``
    (compare with the oldest bucket the gauge holds when the map is full), or keep it."""
    state = MetricsState(MetricLimits(gauge_buckets=2))
    bucket = 1_800_000_000 // BUCKET * BUCKET
    now = bucket + 200.0  # 160 s before the next bucket
    assert state.apply(make_update(1, gauge={"online": 5}), now).error is None
    ahead = state.apply(make_update(1, gauge={"online": 7}, at=now + 250), now)
    assert ahead.error is None  # within 300 s: the next bucket
    previous = bucket - BUCKET + 10.0  # inside the 2 buckets the check allows
    result = state.apply(make_update(1, gauge={"online": 6}, at=previous), now)
    kept = state.campaigns[1].total.gauges["online"]
    assert result.error is not None or bucket - BUCKET in kept, (result, kept)


async def test_the_embedding_api_refuses_a_guard_on_campaign_zero_that_would_lose_every_metric(
    start: Start, tmp_path: Path
) -> None:
    """``StatsService.set_guard`` checks the name and the options (``guard_request``) but not
    the campaign id, which only the wire's codec checks (``ServerCodec._campaign_id``). A guard
    on campaign 0 (or a negative id) is applied, logged and acknowledged; the next compaction
    (here the graceful stop's) writes it into the snapshot, and at the next start
    ``MetricsState.restore`` refuses the whole file ("a campaign id must be a positive
    integer"): the snapshot is moved aside as unreadable and every campaign's metrics it held
    are gone. (A crash-restart of the actor drops them the same way, in ``check()``.) What
    should happen: ``set_guard`` refuses a campaign id outside 1 to 2**63-1 with ``Invalid``
    (``guard_request`` checks it, as the codec does), and nothing is lost."""
    aof = tmp_path / "metrics.aof"
    running = await start(config(tmp_path))
    running.service.metric(87, incr={"views": 3})
    await running.service.flush()
    refused = False
    try:
        await running.service.set_guard(0, "views", deadline=time.time() + 3600)
    except Invalid:
        refused = True
    await running.server.close()
    await running.service.stop()  # compacts into the snapshot
    store = MetricsStore.open(aof)
    try:
        held = store.state.metrics(87, time.time())["total"]["counters"]
    finally:
        store.log.close()
    assert held == {"views": 3}
    assert refused


def test_a_member_older_than_the_kept_days_joins_no_daily_set() -> None:
    """docs/metrics.md ("Limits", Time): "A member older than the kept days still joins the
    all-time set (the backfill of an old import counts), in no daily set." ``_apply`` puts it
    in a daily set whenever the campaign's day map is not full yet (``_keep`` only refuses a
    day older than every day of a *full* map): a member 400 days old gets a daily set of its
    own, so a week or month figure (``uniques_between``) for a period long past the
    ``unique_days`` kept answers a partial count that depends on how full the map happened to
    be during the import (and the archive exports it). What should happen, as documented: a
    day older than the last ``unique_days`` days (by the server's clock, as the gauges'
    ``too_old`` check) gets no daily set; the member joins the all-time set only."""
    state = MetricsState()
    now = 1_800_000_000.0
    state.apply(make_update(1, member={"visitors": "today"}), now)
    old = now - 400 * 86_400
    result = state.apply(make_update(1, member={"visitors": "backfilled"}, at=old), now)
    assert result.error is None
    assert state.campaigns[1].total.uniques["visitors"].all.estimate() == 2  # all-time: counted
    week = state.uniques_between(1, "visitors", old - 3 * 86_400, old + 4 * 86_400)
    assert week.estimate() == 0


async def test_the_embedding_api_refuses_a_guard_name_that_is_not_utf8(
    start: Start, tmp_path: Path
) -> None:
    """``guard_request`` measures the name with ``encode(errors="surrogatepass")``, so a name
    with a lone surrogate (``"\\ud800"``, which no UTF-8 holds) passes ``StatsService.
    set_guard``'s check, while ``make_update`` refuses the same name for an update.
    ``MetricsStore.set_guard`` changes the state first, then ``log.append`` fails to encode it
    (``UnicodeEncodeError``): the guard is in force but not logged, and the state holds a row
    that MessagePack cannot write, so every compaction's copy fails from then on (the log grows
    without bound, the snapshot is never refreshed). What should happen: the name is refused
    with ``Invalid`` before anything changes (encode strictly, as ``make_update`` does), and
    the compactions go on."""
    metrics = MetricsConfig(appendonly=tmp_path / "metrics.aof", snapshot_interval=1)
    running = await start(ActorConfig(sync_interval=3600, metrics=metrics))
    running.service.metric(88, incr={"views": 1})
    await running.service.flush()
    error: Exception | None = None
    try:
        await running.service.set_guard(88, "\ud800", deadline=time.time() + 3600)
    except Exception as exc:
        error = exc
    await asyncio.sleep(2.5)  # periodic compactions every second
    info = (await running.service.info())["metrics"]
    assert info["compaction_errors"] == 0, (info["compaction_errors"], error)
    assert isinstance(error, Invalid), repr(error)


async def test_a_connection_told_by_its_own_failed_guard_call_is_not_told_again_at_its_flush(
    start: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``guard`` (or ``reset_metrics``) call is answered once written; when the log cannot be
    written its rollback drops every unwritten change and the call answers ``internal``: "the
    N changes not written were dropped, not kept (send them again)" (docs/metrics.md, "A failed
    commit": "a client that sends them again counts them once"). The connection that made the
    call is told then, as a failing ``flush``'s connection is. But ``MetricsKeeper.set_guard``
    and ``reset`` call ``commit(drop_on_error=True)`` without the call's ``origin``, so the
    rollback also puts the calling connection into the owed set: the casts it sends again, as
    told, are discarded (``casts_not_kept``), and its next ``flush`` fails once more, for a
    loss it was already told of. What should happen: the calling connection is left out of
    the owed set like the flushing one (pass ``Ask.origin`` to ``commit`` for ``guard`` and
    ``reset_metrics``); what it sends again is kept and its flush succeeds."""
    running = await start(config(tmp_path))
    disk = FullDisk()
    monkeypatch.setattr(mlog, "os", disk)
    b = await Raw.unix(running.unix)
    try:
        disk.full = True
        await b.send(["metric", {"campaign": 90, "incr": {"views": 2}}])
        assert await counters(b, 1, 90) == {"views": 2}  # applied, not written
        failed = await b.call("guard", 2, 90, "partner", {"min_period": 60})
        assert failed[:3] == ["err", 2, "internal"], failed
        assert "send them again" in failed[3]
        disk.full = False
        # what the error asked for: send them again
        await b.send(["metric", {"campaign": 90, "incr": {"views": 2}}])
        assert (await b.call("guard", 3, 90, "partner", {"min_period": 60}))[0] == "ok"
        flushed = await b.call("flush", 4)
        assert await counters(b, 5, 90) == {"views": 2}, flushed
        assert flushed == ["ok", 4, None]
    finally:
        await b.close()


def test_the_throttle_guards_memory_is_swept_in_amortized_constant_time_per_update(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A throttle guard remembers when each key (the name under one combination of dims) was
    last updated (``CampaignMetrics.throttle``); past ``_THROTTLE_SWEEP`` (4,096) entries,
    ``apply`` sweeps the expired ones, but it does so after *every* update while the count
    stays over 4,096, and with a period of an hour (up to a year) nothing expires: each update
    of the campaign then scans every entry on the actor, which serves every connection. Two
    dimensions of 100 keys each (well within ``max_keys``) are enough: measured here, 4,000
    updates take 0.08 s below the threshold and 4.2 s above it (about 1 ms each, growing with
    the entries; the throttle's size itself is bounded by no limit). What should happen: the
    sweep is amortized (e.g. the next sweep only once the dict has doubled since the last one,
    or expiry kept in time order), so the entries examined stay proportional to the updates."""
    examined = 0
    sweep = MetricsState._sweep_throttle

    def counting(self: MetricsState, c: Any, now: float) -> None:
        nonlocal examined
        examined += len(c.throttle)
        sweep(self, c, now)

    monkeypatch.setattr(MetricsState, "_sweep_throttle", counting)
    state = MetricsState()
    now = 1_800_000_000.0
    state.set_guard(1, "signups", None, 3600)
    n = 8_000
    for i in range(n):
        dims = {"country": str(i // 100), "source": str(i % 100)}
        assert state.apply(make_update(1, dims=dims, incr={"signups": 1}), now).error is None
    assert examined <= 4 * n, f"{examined:,} entries examined for {n:,} updates"
