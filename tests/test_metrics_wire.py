"""Custom metrics end to end (docs/metrics.md, "Integration"; docs/protocol.md, "Metrics"): the
``metric`` cast and the ``metrics`` and ``reset_metrics`` calls over a real socket, the HTTP
routes, the actor's log (a ``flush`` reply means acknowledged: with ``appendfsync always`` a
server killed with SIGKILL right after it loses nothing), a resync that never touches metrics,
a crash-restart that keeps them, and invalid updates refused with the wire's codes.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from campaignstats.actor.actor import ActorConfig
from campaignstats.actor.messages import Message, Tell
from campaignstats.actor.metrics import MetricsConfig
from campaignstats.http import HttpConfig, HttpServer, app
from campaignstats.metrics.update import MetricLimits
from campaignstats.requests import MetricUpdates

from .helpers import Raw, Start, completed, serve_process, wait_for

pytestmark = pytest.mark.timeout(90)

EMPTY: dict[str, Any] = {"counters": {}, "gauges": {}, "uniques": {}, "last_seen": {}}


def config(tmp_path: Path, **metrics: Any) -> ActorConfig:
    metrics.setdefault("appendonly", tmp_path / "metrics.aof")
    return ActorConfig(sync_interval=3600, publish_interval=0.3, metrics=MetricsConfig(**metrics))


async def test_metric_casts_over_the_socket_are_answered_by_metrics(
    start: Start, tmp_path: Path
) -> None:
    running = await start(config(tmp_path))
    raw = await Raw.unix(running.unix)
    try:
        hello = await raw.call("hello", 1, {"protocol": 1})
        assert {"metric", "metrics", "reset_metrics"} <= set(hello[2]["ops"])
        await raw.send(
            ["metric", {"campaign": 7, "incr": {"views": 2}, "member": {"visitors": ["a", "b"]}}],
            ["metric", {"campaign": 7, "dims": {"source": "mail"}, "incr": {"views": 3},
                        "member": {"visitors": "a"}}],
            ["metric", {"campaign": 7, "set": {"partner": 1200}, "seen": ["views"],
                        "at": 1.7e9}],
            ["metric", {"campaign": 7, "gauge": {"online": 4.5}}],
        )  # fmt: skip
        assert await raw.call("flush", 2) == ["ok", 2, None]
        [ok, rid, reply] = await raw.call("metrics", 3, 7)
        assert (ok, rid) == ("ok", 3)
        total = reply["total"]
        assert total["counters"] == {"views": 5, "partner": 1200}
        assert total["uniques"] == {"visitors": 2}
        assert total["last_seen"] == {"views": 1.7e9}
        assert total["gauges"] == {"online": 4.5}
        mail = reply["dims"]["source"]
        assert mail["mail"]["counters"] == {"views": 3}
        assert mail["total"]["counters"] == {"views": 3}
        assert mail["mail"]["uniques"] == {"visitors": 1}
        assert (await raw.call("metrics", 4, 8))[2] == {"total": EMPTY, "dims": {}}
        # reset, an addition named like the rest: one name, then all of the campaign's
        assert await raw.call("reset_metrics", 5, 7, "partner") == ["ok", 5, {"found": True}]
        assert "partner" not in (await raw.call("metrics", 6, 7))[2]["total"]["counters"]
        assert await raw.call("reset_metrics", 7, 7, None) == ["ok", 7, {"found": True}]
        assert (await raw.call("metrics", 8, 7))[2] == {"total": EMPTY, "dims": {}}
        assert await raw.call("reset_metrics", 9, 7, None) == ["ok", 9, {"found": False}]
        info = (await raw.call("info", 10))[2]["metrics"]
        assert info["applied"] == 4
        assert info["log"]["fsync"] == "everysec"
        assert info["log"]["written_seq"] == 6  # 4 updates and 2 resets
    finally:
        await raw.close()


@pytest.mark.parametrize(
    ("update", "code"),
    [
        pytest.param({"campaign": 9, "incr": {"v": 1}, "colour": "red"}, "bad_message",
                     id="unknown key"),
        pytest.param({"campaign": 9, "incr": {"v": "1"}}, "bad_message", id="a string count"),
        pytest.param(["campaign", 9], "bad_message", id="not a map"),
        pytest.param({"campaign": 0, "incr": {"v": 1}}, "invalid", id="campaign 0"),
        pytest.param({"campaign": 9, "incr": {"v": 1}, "at": 1.7e12}, "invalid",
                     id="at in milliseconds"),
        pytest.param({"campaign": 9, "dims": {"src": "total"}, "incr": {"v": 1}}, "invalid",
                     id="the reserved key"),
        pytest.param({"campaign": 9}, "invalid", id="changes nothing"),
        pytest.param({"campaign": 9, "incr": {"v": 1}, "set": {"v": 2}}, "invalid",
                     id="incr and set of one counter"),
    ],
)  # fmt: skip
async def test_an_invalid_update_gets_the_casts_error_and_changes_nothing(
    start: Start, tmp_path: Path, update: Any, code: str
) -> None:
    running = await start(config(tmp_path))
    raw = await Raw.unix(running.unix)
    try:
        await raw.send(["metric", update], ["flush", 1])
        err, ok = await raw.recv(2)
        assert err[:3] == ["err", None, code]
        assert ok == ["ok", 1, None]
        assert (await raw.call("metrics", 2, 9))[2] == {"total": EMPTY, "dims": {}}
        await raw.send(["metric"], ["metric", {"campaign": 9, "incr": {"v": 1}}, 2])
        assert (await raw.recv(2))[0][:3] == ["err", None, "bad_message"]
    finally:
        await raw.close()
    info = await running.service.info()
    assert info["metrics"]["applied"] == 0
    assert info["metrics"]["log"]["written_seq"] == 0


async def test_a_limit_refuses_the_whole_update_after_the_codec_with_invalid(
    start: Start, tmp_path: Path
) -> None:
    running = await start(config(tmp_path, limits=MetricLimits(max_names=2)))
    raw = await Raw.unix(running.unix)
    try:
        await raw.send(
            ["metric", {"campaign": 3, "incr": {"a": 1, "b": 1}}],
            ["metric", {"campaign": 3, "incr": {"a": 1, "c": 1}}],  # a third name
            ["flush", 1],
        )
        err, ok = await raw.recv(2)
        assert err[:3] == ["err", None, "invalid"]
        assert ok == ["ok", 1, None]
        reply = (await raw.call("metrics", 2, 3))[2]
        assert reply["total"]["counters"] == {"a": 1, "b": 1}  # the refused one changed nothing
        info = (await raw.call("info", 3))[2]["metrics"]
        assert info["rejected"] == {"names": 1}
    finally:
        await raw.close()


async def test_a_resync_never_touches_metrics(start: Start, tmp_path: Path) -> None:
    running = await start(config(tmp_path))
    service = running.service
    service.metric(21, incr={"views": 10}, member={"visitors": ["x", "y", "z"]})
    await service.flush()
    before = await service.metrics(21)
    done = await completed(service)
    assert await service.resync("all")
    await wait_for(lambda: _more(service, done))
    assert await service.metrics(21) == before
    assert before["total"]["counters"] == {"views": 10}


async def _more(service: Any, done: int) -> bool:
    return await completed(service) > done


async def test_a_crash_restart_keeps_the_metrics_and_their_log(
    start: Start, tmp_path: Path
) -> None:
    crashes: list[int] = []

    def crash_once(message: Message) -> None:
        cast = message.cast if type(message) is Tell else None
        ids = [u.campaign_id for u in cast.items] if type(cast) is MetricUpdates else []
        if 666 in ids and not crashes:
            crashes.append(1)
            raise RuntimeError("boom")

    cfg = config(tmp_path)
    cfg.fault_hook = crash_once
    running = await start(cfg)
    service = running.service
    service.metric(31, incr={"views": 4})
    await service.flush()
    service.metric(666, incr={"views": 1})  # crashes the actor
    service.metric(31, incr={"views": 1})
    await service.flush()
    info = await service.info()
    assert info["restarts"] == 1
    assert (await service.metrics(31))["total"]["counters"] == {"views": 5}
    assert info["metrics"]["log"]["written_seq"] == 2  # the same open log, going on
    await running.server.close()
    await service.stop()
    # and what it wrote is what a fresh server reads
    again = await start(config(tmp_path))
    assert (await again.service.metrics(31))["total"]["counters"] == {"views": 5}


async def test_http_writes_metrics_and_reads_them_as_the_socket_does(
    start: Start, tmp_path: Path
) -> None:
    running = await start(config(tmp_path))
    stats_app = app(running.service, HttpConfig(token="s3cret"))
    server = HttpServer(stats_app, "127.0.0.1", 0)
    await server.start()
    raw = await Raw.unix(running.unix)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            body = [
                {"campaign": 41, "incr": {"views": 1}, "member": {"visitors": "v1"}},
                {"campaign": 41, "incr": {"views": 1}, "oops": 1},
                {"campaign": 41, "dims": {"country": "DE"}, "incr": {"views": 2}},
                {"campaign": 41, "at": 1.7e12, "seen": ["views"]},
            ]
            assert (await client.post("/v1/metrics", json=body)).status_code == 401
            auth = {"authorization": "Bearer s3cret"}
            r = await client.post("/v1/metrics", json=body, headers=auth)
            assert r.status_code == 202
            answer = r.json()
            assert answer["accepted"] == 2
            assert [i for i, _ in answer["rejected"]] == [1, 3]
            r = await client.get("/v1/campaigns/41/metrics")
            assert r.status_code == 200
            assert r.headers["cache-control"].startswith("public, max-age=")
            assert r.headers["etag"]
            again = await client.get(
                "/v1/campaigns/41/metrics", headers={"if-none-match": r.headers["etag"]}
            )
            assert again.status_code == 304
            # the socket says the same
            socket_reply = (await raw.call("metrics", 1, 41))[2]
            assert r.json() == socket_reply
            assert socket_reply["total"]["counters"] == {"views": 3}
            assert socket_reply["dims"]["country"]["DE"]["counters"] == {"views": 2}
            # and a socket write is read over HTTP
            await raw.send(["metric", {"campaign": 41, "incr": {"views": 10}}])
            assert await raw.call("flush", 2) == ["ok", 2, None]
            r = await client.get("/v1/campaigns/41/metrics")
            assert r.json()["total"]["counters"] == {"views": 13}
            assert (await client.get("/v1/campaigns/x/metrics")).status_code == 400
    finally:
        await raw.close()
        await server.close()


# -- a real server process, killed -----------------------------------------------------------------


async def _serve(module_dsn: str, log: Path, *extra: str) -> tuple[Any, int]:
    return await serve_process(
        "--dsn", module_dsn, "--port", "0", "--no-http", "--appendonly", str(log), *extra
    )


async def test_a_flush_reply_means_durable_a_sigkill_after_it_loses_nothing(
    module_dsn: str, tmp_path: Path
) -> None:
    log = tmp_path / "m.aof"
    proc, port = await _serve(module_dsn, log, "--appendfsync", "always")
    try:
        raw = await Raw.tcp(port)
        sent = 0
        for round_ in range(20):
            await raw.send(
                *(
                    ["metric", {"campaign": 51, "incr": {"n": 1}, "member": {"u": f"m{sent + i}"}}]
                    for i in range(50)
                )
            )
            sent += 50
            assert await raw.call("flush", round_ + 1) == ["ok", round_ + 1, None]
        proc.send_signal(signal.SIGKILL)  # at once after the flush reply
        await proc.wait()
        await raw.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    proc, port = await _serve(module_dsn, log, "--appendfsync", "always")
    try:
        raw = await Raw.tcp(port)
        reply = (await raw.call("metrics", 1, 51))[2]
        assert reply["total"]["counters"] == {"n": sent}
        assert reply["total"]["uniques"] == {"u": pytest.approx(sent, rel=0.02)}
        await raw.close()
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert Path(str(log) + ".snapshot").exists()  # compacted at the graceful stop
