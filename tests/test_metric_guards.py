"""Guards over the wire and the metrics' settings of ``serve`` (docs/metrics.md, "Guards and
reset" and "Limits"): the ``guard`` call over a real socket, its bad input refused with the
wire's codes and changing nothing, guards that survive a SIGKILL of a real server process, the
``campaignstats guard`` command, the ``--metrics-*`` limits of ``serve``, and an update's ``at``
too far ahead (or a gauge too old to keep) refused whole.
"""

from __future__ import annotations

import asyncio
import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from campaignstats.actor.actor import ActorConfig
from campaignstats.actor.metrics import MetricsConfig
from campaignstats.client import AsyncStatsClient
from campaignstats.errors import Invalid

from .helpers import Raw, Start
from .test_metrics_wire import _serve

pytestmark = pytest.mark.timeout(90)


def config(tmp_path: Path) -> ActorConfig:
    return ActorConfig(
        sync_interval=3600, metrics=MetricsConfig(appendonly=tmp_path / "metrics.aof")
    )


async def _counters(raw: Raw, req_id: int, cid: int) -> dict[str, int]:
    reply = await raw.call("metrics", req_id, cid)
    counters: dict[str, int] = reply[2]["total"]["counters"]
    return counters


async def test_a_deadline_guard_refuses_the_metrics_updates_and_counts_the_refusals(
    start: Start, tmp_path: Path
) -> None:
    running = await start(config(tmp_path))
    raw = await Raw.unix(running.unix)
    try:
        hello = await raw.call("hello", 1, {"protocol": 1})
        assert "guard" in hello[2]["ops"]
        past = time.time() - 10
        reply = await raw.call("guard", 2, 4, "signups", {"deadline": past})
        assert reply == ["ok", 2, {"deadline": past, "min_period": None}]
        await raw.send(
            ["metric", {"campaign": 4, "incr": {"signups": 1, "views": 1}}],
            ["metric", {"campaign": 4, "incr": {"signups": 1}}],
            ["flush", 3],
        )
        first, second, flushed = await raw.recv(3)
        # each message naming the guarded metric gets its error; the other names still count
        assert first[:3] == ["err", None, "invalid"]
        assert "signups" in first[3]
        assert second[:3] == ["err", None, "invalid"]
        assert flushed == ["ok", 3, None]
        assert await _counters(raw, 4, 4) == {"views": 1}
        info = (await raw.call("info", 5))[2]["metrics"]
        assert info["refused"]["deadline"] == 2
        # both None removes the guard
        cleared = await raw.call("guard", 6, 4, "signups", {})
        assert cleared == ["ok", 6, {"deadline": None, "min_period": None}]
        await raw.send(["metric", {"campaign": 4, "incr": {"signups": 1}}], ["flush", 7])
        assert await raw.recv(1) == [["ok", 7, None]]
        assert await _counters(raw, 8, 4) == {"views": 1, "signups": 1}
    finally:
        await raw.close()


async def test_a_throttle_guard_refuses_a_second_update_of_one_key_inside_its_period(
    start: Start, tmp_path: Path
) -> None:
    running = await start(config(tmp_path))
    async with AsyncStatsClient(f"unix://{running.unix}") as client:
        guard = await client.set_guard(5, "partner", min_period=3600)
        assert guard == {"deadline": None, "min_period": 3600.0}
        client.metric(5, set={"partner": 1200})
        client.metric(5, set={"partner": 1300})  # inside the hour: refused
        client.metric(5, set={"partner": 1400}, dims={"org": "campact"})  # another key
        await client.flush()
        assert client.statistics().server_errors == 1
        reply = await client.metrics(5)
        assert reply["total"]["counters"] == {"partner": 1400}
        assert reply["dims"]["org"]["campact"]["counters"] == {"partner": 1400}
    info = await running.service.info()
    assert info["metrics"]["refused"]["throttle"] == 1


@pytest.mark.parametrize(
    ("args", "code"),
    [
        pytest.param([4, 7, {"deadline": 1.0}], "bad_message", id="a name that is no string"),
        pytest.param([4, "", {"deadline": 1.0}], "invalid", id="an empty name"),
        pytest.param([4, "x" * 65, {"deadline": 1.0}], "invalid", id="a name too long"),
        pytest.param([4, "n", {"deadline": -1}], "invalid", id="a negative deadline"),
        pytest.param([4, "n", {"deadline": math.nan}], "invalid", id="a NaN deadline"),
        pytest.param([4, "n", {"deadline": "soon"}], "bad_message", id="a string deadline"),
        pytest.param([4, "n", {"min_period": 0}], "invalid", id="a zero period"),
        pytest.param([4, "n", {"min_period": 1e9}], "invalid", id="a period over a year"),
        pytest.param([4, "n", {"period": 5}], "bad_message", id="an unknown option"),
        pytest.param([4, "n", [1, 2]], "bad_message", id="options that are no map"),
        pytest.param([0, "n", {"deadline": 1.0}], "invalid", id="campaign 0"),
        pytest.param([4, "n"], "bad_message", id="a missing argument"),
    ],
)
async def test_a_bad_guard_is_refused_with_the_wire_code_and_guards_nothing(
    start: Start, tmp_path: Path, args: list[Any], code: str
) -> None:
    running = await start(config(tmp_path))
    raw = await Raw.unix(running.unix)
    try:
        reply = await raw.call("guard", 1, *args)
        assert reply[:3] == ["err", 1, code]
        await raw.send(["metric", {"campaign": 4, "incr": {"n": 1}}], ["flush", 2])
        assert await raw.recv(1) == [["ok", 2, None]]
        assert await _counters(raw, 3, 4) == {"n": 1}
    finally:
        await raw.close()
    info = await running.service.info()
    assert info["metrics"]["refused"] == {"deadline": 0, "throttle": 0}
    assert info["metrics"]["log"]["written_seq"] == 1  # the update, no guard


async def test_a_campaign_holds_no_more_guards_than_metric_names(
    start: Start, tmp_path: Path
) -> None:
    running = await start(config(tmp_path))
    service = running.service
    names = service.config.metrics.limits.max_names
    for i in range(names):
        await service.set_guard(6, f"m{i}", deadline=time.time() + 3600)
    with pytest.raises(Invalid, match="guarded names"):
        await service.set_guard(6, "one-more", deadline=time.time() + 3600)
    # replacing an existing guard is not a new one
    await service.set_guard(6, "m0", min_period=5)


async def test_an_at_far_ahead_of_the_clock_or_a_gauge_too_old_is_refused_whole(
    start: Start, tmp_path: Path
) -> None:
    running = await start(config(tmp_path))
    raw = await Raw.unix(running.unix)
    now = time.time()
    try:
        await raw.send(
            ["metric", {"campaign": 8, "member": {"visitors": "a"}, "at": now + 86_400}],
            ["metric", {"campaign": 8, "gauge": {"online": 3}, "at": now - 86_400}],
            ["metric", {"campaign": 8, "gauge": {"online": 5}, "at": now - 60}],
            ["metric", {"campaign": 8, "member": {"visitors": "b"}, "at": now - 90 * 86_400}],
            ["flush", 1],
        )
        future, old_gauge, flushed = await raw.recv(3)
        assert future[:3] == ["err", None, "invalid"]
        assert "ahead of the server's clock" in future[3]
        assert old_gauge[:3] == ["err", None, "invalid"]
        assert "gauge" in old_gauge[3]
        assert flushed == ["ok", 1, None]
        total = (await raw.call("metrics", 2, 8))[2]["total"]
        # the member older than the kept days still counts in the all-time set
        assert total["uniques"] == {"visitors": 1}
        assert total["gauges"] == {"online": 5}
        info = (await raw.call("info", 3))[2]["metrics"]
        assert info["rejected"] == {"future": 1, "too_old": 1}
    finally:
        await raw.close()


def _cli(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "campaignstats.cli", *args, "--url", f"tcp://127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_guards_and_serve_limits_hold_in_a_real_server_across_a_sigkill(
    module_dsn: str, tmp_path: Path
) -> None:
    log = tmp_path / "g.aof"
    options = ("--appendfsync", "always", "--metrics-max-names", "2")
    proc, port = await _serve(module_dsn, log, *options)
    try:
        done = await asyncio.to_thread(_cli, port, "guard", "9", "closed", "--deadline", "1")
        assert done.returncode == 0, done.stderr
        assert "guarded" in done.stdout
        wrong = await asyncio.to_thread(_cli, port, "guard", "9", "x", "--clear", "--deadline", "1")
        assert wrong.returncode == 2
        assert "--clear" in wrong.stderr
        proc.send_signal(signal.SIGKILL)  # the guard's reply came: it is in the log
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    proc, port = await _serve(module_dsn, log, *options)
    try:
        raw = await Raw.tcp(port)
        try:
            # past the guard's deadline
            await raw.send(["metric", {"campaign": 9, "incr": {"closed": 1}}], ["flush", 1])
            guarded, flushed = await raw.recv(2)
            assert guarded[:3] == ["err", None, "invalid"]
            assert "closed" in guarded[3]
            assert flushed == ["ok", 1, None]
            # a third name: --metrics-max-names 2
            await raw.send(["metric", {"campaign": 9, "incr": {"a": 1, "b": 1, "c": 1}}])
            await raw.send(["metric", {"campaign": 9, "incr": {"a": 1, "b": 1}}], ["flush", 2])
            over, flushed = await raw.recv(2)
            assert over[:3] == ["err", None, "invalid"]
            assert "2 metric names" in over[3]
            assert flushed == ["ok", 2, None]
            assert await _counters(raw, 3, 9) == {"a": 1, "b": 1}
        finally:
            await raw.close()
        cleared = await asyncio.to_thread(_cli, port, "guard", "9", "closed", "--clear")
        assert cleared.returncode == 0, cleared.stderr
        assert "not guarded" in cleared.stdout
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
