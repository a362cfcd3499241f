"""The HTTP side (docs/http.md) from the outside: uvicorn on 127.0.0.1:0, httpx as the client,
the socket server beside it on the same service, and real Postgres underneath.

Every read is compared with the socket's answer for the same campaign (a bare MessagePack peer,
tests/helpers.py ``Raw``), so the two doors cannot drift apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from campaignstats.actor.actor import ActorConfig
from campaignstats.actor.snapshot import save_snapshot
from campaignstats.db.source import PostgresSource
from campaignstats.http import HttpConfig, HttpServer, StatsHttpApp, app
from campaignstats.model import CalculationResult, CampaignStats, Scope
from campaignstats.service import StatsService

from .helpers import Raw, Running, Start, wait_for

pytestmark = pytest.mark.timeout(60)


@dataclass
class Http:
    client: httpx.AsyncClient
    server: HttpServer
    app: StatsHttpApp
    running: Running | None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"


MakeHttp = Callable[..., Awaitable[Http]]


@pytest.fixture
async def make_http(start: Start) -> AsyncIterator[MakeHttp]:
    made: list[Http] = []

    async def make(
        running: Running | None = None,
        service: StatsService | None = None,
        **config: Any,
    ) -> Http:
        if running is None and service is None:
            running = await start()
        target = service if service is not None else running.service  # type: ignore[union-attr]
        hook = running.server.add_info if running is not None else None
        stats_app = app(target, HttpConfig(**config), info_hook=hook)
        server = HttpServer(stats_app, "127.0.0.1", 0)
        await server.start()
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=10)
        h = Http(client, server, stats_app, running)
        made.append(h)
        return h

    yield make
    for h in made:
        await h.client.aclose()
        await h.server.close()


@pytest.fixture
async def http(make_http: MakeHttp) -> Http:
    return await make_http()


async def socket_peer(h: Http) -> Raw:
    assert h.running is not None
    return await Raw.tcp(h.running.port)


async def send_and_flush(raw: Raw, *messages: Any) -> None:
    await raw.send(*messages)
    assert (await raw.call("flush", 99))[:2] == ["ok", 99]


def as_json(stats: dict[Any, Any]) -> dict[str, Any]:
    """A socket STATS as the JSON reads write it: org keys become strings."""
    return json.loads(json.dumps(stats))


# -- reads ------------------------------------------------------------------------------------


async def test_every_read_route_answers_what_the_socket_answers_for_the_same_campaign(
    http: Http,
) -> None:
    raw = await socket_peer(http)
    try:
        await send_and_flush(
            raw,
            ["inc", 900, 7, "register", "DE", True],
            ["inc", 900, 7, "mail2target", None, False, 10],
            ["inc", 900, 8, "register", "FR", True, 1, None],
            ["incs", [[901, 7, "register", None, True, 2, None]]],
        )
        [_, _, stats] = await raw.call("stats", 1, 900)
        [_, _, many] = await raw.call("stats_many", 2, [900, 901, 999_999])
    finally:
        await raw.close()

    one = await http.client.get("/v1/campaigns/900")
    assert one.status_code == 200
    assert one.headers["content-type"] == "application/json"
    assert one.json() == {"campaign_id": 900, **as_json(stats)}
    assert one.json()["org"] == {"7": 1, "8": 1}

    batch = await http.client.get("/v1/campaigns", params={"ids": "900,901,999999"})
    assert batch.status_code == 200
    assert batch.json() == {str(cid): as_json(s) for cid, s in many.items()}
    assert batch.json()["999999"]["supporters"] == 0  # unknown: all zeros, as on the socket

    count = await http.client.get("/v1/campaigns/900/count")
    assert count.json() == {"campaign_id": 900, "supporters": stats["supporters"]}

    others = await http.client.get("/v1/campaigns/900", params={"exclude_org": "7"})
    assert others.json() == {
        "campaign_id": 900,
        **as_json(stats),
        "supporters_by_others": stats["supporters"] - stats["org"][7],
    }
    nobody = await http.client.get("/v1/campaigns/900", params={"exclude_org": "12345"})
    assert nobody.json()["supporters_by_others"] == stats["supporters"]


async def test_reads_carry_cache_control_and_an_etag_and_answer_304_while_it_matches(
    make_http: MakeHttp,
) -> None:
    h = await make_http(max_age=5)
    raw = await socket_peer(h)
    try:
        await send_and_flush(raw, ["inc", 910, 7, "register", None, True])
        for path in ("/v1/campaigns/910", "/v1/campaigns/910/count", "/v1/campaigns?ids=910"):
            first = await h.client.get(path)
            assert first.headers["cache-control"] == "public, max-age=5"
            etag = first.headers["etag"]
            assert re.fullmatch(r'"[0-9a-f]+"', etag)
            same = await h.client.get(path, headers={"if-none-match": etag})
            assert same.status_code == 304
            assert same.content == b""
            assert same.headers["etag"] == etag
            assert same.headers["cache-control"] == "public, max-age=5"
            weak = await h.client.get(path, headers={"if-none-match": f'"x", W/{etag}'})
            assert weak.status_code == 304
            other = await h.client.get(path, headers={"if-none-match": '"nope"'})
            assert other.status_code == 200
        etag = (await h.client.get("/v1/campaigns/910")).headers["etag"]
        await send_and_flush(raw, ["inc", 910, 7, "register", None, True])
        changed = await h.client.get("/v1/campaigns/910", headers={"if-none-match": etag})
        assert changed.status_code == 200
        assert changed.headers["etag"] != etag
        assert changed.json()["supporters"] == 2
    finally:
        await raw.close()


async def test_cors_allows_any_origin_by_default_on_reads_streams_and_errors(http: Http) -> None:
    origin = {"origin": "https://petition.example"}
    for path in ("/v1/campaigns/1", "/v1/campaigns/1/count", "/v1/campaigns/x", "/nowhere"):
        r = await http.client.get(path, headers=origin)
        assert r.headers["access-control-allow-origin"] == "*", path
    async with http.client.stream("GET", "/v1/campaigns/1/events", headers=origin) as r:
        assert r.headers["access-control-allow-origin"] == "*"
    pre = await http.client.options(
        "/v1/increments",
        headers={
            **origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
    )
    assert pre.status_code == 204
    assert pre.headers["access-control-allow-origin"] == "*"
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()


async def test_cors_with_configured_origins_answers_only_those(make_http: MakeHttp) -> None:
    h = await make_http(cors_origins=("https://a.example", "https://b.example"))
    ok = await h.client.get("/v1/campaigns/1", headers={"origin": "https://b.example"})
    assert ok.headers["access-control-allow-origin"] == "https://b.example"
    assert "origin" in ok.headers["vary"].lower()
    other = await h.client.get("/v1/campaigns/1", headers={"origin": "https://evil.example"})
    assert other.status_code == 200
    assert "access-control-allow-origin" not in other.headers
    assert "origin" in other.headers["vary"].lower()


async def test_malformed_ids_and_parameters_are_400_with_the_wire_error_codes(http: Http) -> None:
    cases = {
        "/v1/campaigns/abc": "bad_message",
        "/v1/campaigns/-1": "bad_message",
        "/v1/campaigns/1.5": "bad_message",
        "/v1/campaigns/0": "invalid",
        "/v1/campaigns/9223372036854775808": "invalid",
        "/v1/campaigns/0/count": "invalid",
        "/v1/campaigns/x/events": "bad_message",
        "/v1/campaigns": "bad_message",
        "/v1/campaigns?ids=": "bad_message",
        "/v1/campaigns?ids=1,x": "bad_message",
        "/v1/campaigns?ids=1,0": "invalid",
        "/v1/campaigns/1?exclude_org=x": "bad_message",
        "/v1/campaigns/1?exclude_org=0": "invalid",
    }
    for path, code in cases.items():
        r = await http.client.get(path)
        assert r.status_code == 400, path
        assert r.headers["content-type"] == "application/json"
        body = r.json()
        assert body["error"] == code, path
        assert isinstance(body["message"], str)
        assert body["message"]


async def test_an_unknown_route_or_method_is_a_json_error(http: Http) -> None:
    for path in ("/v1/nothing/1", "/v1/campaigns/1/nothing"):
        r = await http.client.get(path)
        assert r.status_code == 404, path
        assert r.json()["error"] == "bad_message"
    wrong_method = await http.client.post("/v1/campaigns/1")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"] == "bad_message"


# -- writes -----------------------------------------------------------------------------------


async def test_json_ingest_applies_valid_items_and_names_each_rejected_one(http: Http) -> None:
    items: list[Any] = [
        {"campaign": 920, "org": 7, "type": "register", "area": "DE", "new": True},
        {
            "campaign": 920,
            "org": 7,
            "type": "share",
            "count": 3,
            "action": 11,
            "txid": 5,
            "at": 1_700_000_000.5,
            "page": 4,
            "messages": 2,
        },
        {"campaign": 920, "org": 7, "type": ""},  # invalid: empty type
        {"campaign": 920, "org": 7},  # bad_message: no type
        {"campaign": 920, "org": 7, "type": "x", "colour": "red"},  # unknown key
        [920, 7, "register", None, True],  # the array form is the socket's, not JSON's
        {"campaign": 0, "org": 7, "type": "register"},
    ]
    r = await http.client.post("/v1/increments", json=items)
    assert r.status_code == 202
    body = r.json()
    assert body["accepted"] == 2
    assert [index for index, _ in body["rejected"]] == [2, 3, 4, 5, 6]
    assert all(isinstance(message, str) and message for _, message in body["rejected"])
    raw = await socket_peer(http)
    try:
        [_, _, stats] = await raw.call("stats", 1, 920)
        assert stats["action"] == {"register": 1, "share": 3}
        assert stats["supporters"] == 1
        assert stats["messages"] == 2
        got = (await http.client.get("/v1/campaigns/920")).json()
        assert got == {"campaign_id": 920, **as_json(stats)}

        dec = await http.client.post(
            "/v1/decrements",
            json=[{"campaign": 920, "org": 7, "type": "register", "area": "DE", "new": True}],
        )
        assert dec.status_code == 202
        assert dec.json() == {"accepted": 1, "rejected": []}
        [_, _, after] = await raw.call("stats", 2, 920)
        assert after["supporters"] == 0
        assert after["action"] == {"share": 3}
    finally:
        await raw.close()


async def test_json_ingest_reports_items_refused_by_a_per_campaign_limit(
    start: Start, make_http: MakeHttp
) -> None:
    running = await start(ActorConfig(sync_interval=3600, publish_interval=0.3, max_keys=2))
    h = await make_http(running)
    items = [{"campaign": 930, "org": 7, "type": f"t{i}"} for i in range(4)]
    r = await h.client.post("/v1/increments", json=items)
    assert r.status_code == 202
    assert r.json()["accepted"] == 2
    assert [index for index, _ in r.json()["rejected"]] == [2, 3]


async def test_json_ingest_errors_are_json_400_401_and_413(make_http: MakeHttp) -> None:
    h = await make_http(token="s3cret", max_message=1000, max_batch=3)
    item = {"campaign": 940, "org": 7, "type": "register"}
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic s3cret"}):
        r = await h.client.post("/v1/increments", json=[item], headers=headers)
        assert r.status_code == 401
        assert r.json()["error"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
    auth = {"authorization": "Bearer s3cret", "content-type": "application/json"}
    cases: list[tuple[bytes, int, str]] = [
        (b"[{", 400, "bad_frame"),
        (b"not json", 400, "bad_frame"),
        (b'{"campaign": 1}', 400, "bad_message"),
        (json.dumps([item] * 4).encode(), 400, "invalid"),
        (b"[" + b" " * 1000 + b"]", 413, "bad_frame"),
    ]
    for content, status, code in cases:
        r = await h.client.post("/v1/decrements", content=content, headers=auth)
        assert r.status_code == status, content[:20]
        assert r.json()["error"] == code
        assert r.json()["message"]

    # Over the limit without a Content-Length (chunked): cut off while reading.
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b" " * 100

    r = await h.client.post("/v1/increments", content=chunks(), headers=auth)
    assert r.status_code == 413
    ok = await h.client.post("/v1/increments", json=[item], headers=auth)
    assert ok.status_code == 202
    assert ok.json() == {"accepted": 1, "rejected": []}


# -- operations -------------------------------------------------------------------------------


class GatedSource:
    """Postgres, but the first calculation waits until the test opens the gate."""

    def __init__(self, dsn: str) -> None:
        self.inner = PostgresSource(dsn)
        self.gate = asyncio.Event()

    async def calculate(self, scope: Scope) -> CalculationResult:
        await self.gate.wait()
        return await self.inner.calculate(scope)


async def test_readyz_is_503_until_the_first_full_calculation_then_200(
    module_dsn: str, make_http: MakeHttp
) -> None:
    source = GatedSource(module_dsn)
    service = StatsService(source, ActorConfig(sync_interval=3600))
    await service.start()
    try:
        h = await make_http(service=service)
        assert (await h.client.get("/healthz")).status_code == 200
        before = await h.client.get("/readyz")
        assert before.status_code == 503
        assert before.json()["ready"] is False
        # Queries are answered meanwhile (zeros), only readiness waits.
        assert (await h.client.get("/v1/campaigns/1/count")).status_code == 200
        source.gate.set()
        await service.loaded()
        after = await h.client.get("/readyz")
        assert after.status_code == 200
        assert after.json() == {"ready": True}
    finally:
        await service.stop()


async def test_readyz_is_200_at_once_with_a_snapshot_while_the_database_is_not_there(
    module_dsn: str, make_http: MakeHttp, tmp_path: Path
) -> None:
    path = tmp_path / "snap"
    save_snapshot(path, {1: CampaignStats(5, {"register": 5}, {}, {1: 5})})
    source = GatedSource(module_dsn)  # the database "is not there" until the gate opens
    service = StatsService(source, ActorConfig(sync_interval=3600, snapshot_path=path))
    await service.start()
    try:
        h = await make_http(service=service)
        ready = await h.client.get("/readyz")
        assert ready.status_code == 200
        assert (await h.client.get("/v1/campaigns/1/count")).json()["supporters"] == 5
    finally:
        source.gate.set()
        await service.stop()


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_metrics_are_prometheus_text_read_from_info_at_scrape_time(http: Http) -> None:
    raw = await socket_peer(http)
    try:
        await send_and_flush(raw, ["incs", [[950, 7, "register", None, True]] * 5])
        await raw.send(["inc", 0, 7, "register", None, True])
        assert (await raw.recv())[0][2] == "invalid"  # rejected, and counted
    finally:
        await raw.close()
    await http.client.get("/v1/campaigns/950")
    await http.client.get("/v1/campaigns/nope")
    r = await http.client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    values = metric_values(r.text)
    assert http.running is not None
    info = await http.running.service.info()
    names = {name for name, _ in values}
    assert all(name.startswith("campaignstats_") for name in names)
    for name in (
        "campaignstats_increments_applied_total",
        "campaignstats_increments_rejected_total",
        "campaignstats_mailbox_depth",
        "campaignstats_last_calculation_duration_seconds",
        "campaignstats_drift_supporters",
        "campaignstats_subscriptions",
        "campaignstats_ready",
    ):
        assert name in names, name
    assert values[("campaignstats_increments_applied_total", ())] == info["increments_applied"]
    assert values[("campaignstats_increments_rejected_total", ())] >= 1
    assert values[("campaignstats_calculations_total", (("outcome", "completed"),))] >= 1
    assert ("campaignstats_connections", (("listener", "socket"),)) in values
    route = "/v1/campaigns/{campaign_id}"
    assert values[("campaignstats_http_requests_total", (("route", route), ("status", "200")))] == 1
    assert values[("campaignstats_http_requests_total", (("route", route), ("status", "400")))] == 1


# -- event streams ----------------------------------------------------------------------------


class Events:
    """An event stream read line by line: (event, data) pairs and comment lines."""

    def __init__(self, response: httpx.Response) -> None:
        self.lines = response.aiter_lines()
        self.comments: list[str] = []

    async def next(self, within: float = 5.0) -> tuple[str, dict[str, Any]]:
        event, data = "message", ""
        async with asyncio.timeout(within):
            async for line in self.lines:
                if line.startswith(":"):
                    self.comments.append(line)
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data += line[5:].strip()
                elif line == "" and data:
                    return event, json.loads(data)
        raise EOFError("the stream ended")


async def test_an_event_stream_starts_with_the_current_stats_then_sends_each_change(
    http: Http,
) -> None:
    raw = await socket_peer(http)
    try:
        await send_and_flush(raw, ["inc", 960, 7, "register", "DE", True])
        async with http.client.stream("GET", "/v1/campaigns/960/events") as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["cache-control"] == "no-cache"
            events = Events(r)
            event, first = await events.next()
            [_, _, stats] = await raw.call("stats", 1, 960)
            assert event == "stats"
            assert first == {"campaign_id": 960, **as_json(stats)}
            # How soon a change reaches the stream is measured in bench/ (bench.http), not here.
            for n in (2, 3):
                await raw.send(["inc", 960, 8, "register", None, True])
                event, change = await events.next(within=10)
                assert event == "stats"
                assert change["supporters"] == n
    finally:
        await raw.close()


async def test_event_streams_send_keep_alive_comments(make_http: MakeHttp) -> None:
    h = await make_http(keepalive=0.2)
    async with h.client.stream("GET", "/v1/campaigns/961/events") as r:
        events = Events(r)
        await events.next()
        with contextlib.suppress(TimeoutError):
            await events.next(within=0.9)
        assert len(events.comments) >= 2
        assert events.comments[0] == ": keep-alive"


async def test_a_slow_reader_is_dropped_and_the_others_keep_receiving(
    start: Start, make_http: MakeHttp
) -> None:
    running = await start(ActorConfig(sync_interval=3600, publish_interval=0.05))
    h = await make_http(running, stream_queue=2)
    raw = await socket_peer(h)
    # Big events fill the slow reader's socket quickly: 3,000 areas, about 40 KB of STATS.
    areas = [[970, 7, "register", f"AREA-{i:05}", True] for i in range(3000)]
    await send_and_flush(raw, ["incs", areas])
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(slow, ("127.0.0.1", h.server.port or 0))
    await loop.sock_sendall(
        slow, b"GET /v1/campaigns/970/events HTTP/1.1\r\nHost: x\r\n\r\n"
    )  # ... and never read
    try:
        async with h.client.stream("GET", "/v1/campaigns/970/events") as r:
            events = Events(r)
            await events.next()
            deadline = time.monotonic() + 30
            n = 0
            while h.app.hub.counters.dropped_slow == 0:
                assert time.monotonic() < deadline, "the slow reader was never dropped"
                n += 1
                await raw.send(["inc", 970, 7, "share", None, False])
                _event, data = await events.next(within=3)  # the fast reader keeps up
                assert data["action"]["share"] >= n - 1
            assert h.app.hub.streams == 1  # the fast reader's
            # The slow reader's connection is closed: reading it all ends in EOF.
            async with asyncio.timeout(10):
                while await loop.sock_recv(slow, 1 << 16):
                    pass
            await raw.send(["inc", 970, 7, "share", None, False])
            await events.next(within=3)
    finally:
        slow.close()
        await raw.close()
    metrics = metric_values((await h.client.get("/metrics")).text)
    assert metrics[("campaignstats_http_event_streams_dropped_total", ())] == 1


async def test_closing_the_http_server_ends_open_event_streams_promptly(
    make_http: MakeHttp,
) -> None:
    h = await make_http()
    async with h.client.stream("GET", "/v1/campaigns/980/events") as r:
        events = Events(r)
        await events.next()
        t0 = time.monotonic()
        await h.server.close()
        with pytest.raises((EOFError, httpx.ReadError, httpx.RemoteProtocolError)):
            await events.next(within=5)
    assert time.monotonic() - t0 < 3
    assert h.app.hub.streams == 0


async def test_a_reader_that_leaves_is_forgotten_with_its_subscription(http: Http) -> None:
    assert http.running is not None
    service = http.running.service
    base = (await service.info())["subscriptions"]
    async with http.client.stream("GET", "/v1/campaigns/985/events") as r:
        await Events(r).next()
        async with http.client.stream("GET", "/v1/campaigns/985/events") as r2:
            await Events(r2).next()
            assert http.app.hub.streams == 2
            assert (await service.info())["subscriptions"] == base + 1  # one per campaign
    await wait_for(lambda: http.app.hub.streams == 0, timeout=5)
    await wait_for(lambda: _subscriptions(service, base), timeout=5)


async def _subscriptions(service: StatsService, expected: int) -> bool:
    return bool((await service.info())["subscriptions"] == expected)


async def open_raw_stream(port: int, campaign_id: int) -> tuple[asyncio.StreamReader, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /v1/campaigns/{campaign_id}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def read_until(reader: asyncio.StreamReader, needle: bytes) -> None:
    buffer = b""
    while needle not in buffer:
        chunk = await reader.read(1 << 16)
        if not chunk:
            raise EOFError
        buffer = buffer[-len(needle) :] + chunk


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_thousand_concurrent_streams_on_one_campaign_all_receive_a_change(
    http: Http,
) -> None:
    port = http.server.port or 0
    streams = []
    for batch in range(10):
        streams += await asyncio.gather(*(open_raw_stream(port, 990) for _ in range(100)))
        del batch
    try:
        async with asyncio.timeout(30):
            await asyncio.gather(*(read_until(r, b'"supporters":0') for r, _ in streams))
        assert http.app.hub.streams == 1000
        raw = await socket_peer(http)
        try:
            t0 = time.monotonic()
            await raw.send(["inc", 990, 7, "register", None, True])
            async with asyncio.timeout(10):
                await asyncio.gather(*(read_until(r, b'"supporters":1') for r, _ in streams))
            elapsed = time.monotonic() - t0
        finally:
            await raw.close()
        assert elapsed < 5, elapsed
    finally:
        for _, writer in streams:
            writer.close()


# -- the command ------------------------------------------------------------------------------


async def test_serve_starts_http_beside_the_socket_and_stops_both_on_sigterm(
    module_dsn: str, tmp_path: Path
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "campaignstats.cli", "--log-format", "json", "serve",
        "--dsn", module_dsn, "--port", "0", "--http-port", "0", "--http-max-age", "7",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "CAMPAIGNSTATS_TOKEN"},
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        url = None
        async with asyncio.timeout(30):
            while url is None:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    assert proc.stderr is not None
                    error = (await proc.stderr.read()).decode()[-2000:]
                    raise AssertionError(f"serve exited before printing the URL: {error}")
                if m := re.search(r"demo page: (http://127\.0\.0\.1:\d+)/", line):
                    url = m.group(1)
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            await wait_for(lambda: _ready(client), timeout=20)
            r = await client.get("/v1/campaigns/1")
            assert r.headers["cache-control"] == "public, max-age=7"
            page = await client.get("/")
            assert page.status_code == 200
            assert "/widget.js" in page.text
            async with client.stream("GET", "/v1/campaigns/1/events") as events:
                await Events(events).next()
                proc.send_signal(signal.SIGTERM)
                async with asyncio.timeout(15):
                    assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _ready(client: httpx.AsyncClient) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return (await client.get("/readyz")).status_code == 200
    return False


async def test_the_app_mounts_under_a_prefix_in_a_starlette_application(http: Http) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    assert http.running is not None
    stats_app = app(http.running.service, HttpConfig())
    outer = Starlette(routes=[Mount("/stats", app=stats_app)])
    server = HttpServer(stats_app, "127.0.0.1", 0)
    server.config.app = outer  # the embedding application serves it, under /stats
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            direct = await http.client.get("/v1/campaigns/1")
            for path in ("/stats/v1/campaigns/1", "/stats/v1/campaigns/1?exclude_org=2"):
                r = await client.get(path)
                assert r.status_code == 200, path
                assert r.json()["campaign_id"] == 1
            assert (await client.get("/stats/v1/campaigns/1")).content == direct.content
            assert (await client.get("/stats/v1/campaigns/1/count")).status_code == 200
            page = await client.get("/stats/")
            assert '<script src="/stats/widget.js"' in page.text
            assert (await client.get("/stats/widget.js")).status_code == 200
            async with client.stream("GET", "/stats/v1/campaigns/1/events") as events:
                assert (await Events(events).next())[0] == "stats"
            assert (await client.get("/stats/v1/campaigns/top")).status_code == 200
    finally:
        await server.close()


async def test_history_recent_and_top_are_read_as_json(http: Http) -> None:
    now = time.time()
    cid = 7_000_001
    items = [
        {"campaign": cid, "org": 1, "type": "sign", "new": True, "at": now - 7200},
        {"campaign": cid, "org": 1, "type": "sign", "new": True},
    ]
    r = await http.client.post("/v1/increments", json=items)
    assert r.status_code == 202

    async def counted() -> bool:
        body = (await http.client.get(f"/v1/campaigns/{cid}/history?unit=day")).json()
        return bool(sum(b[1] for b in body["buckets"]) == 2)

    await wait_for(counted)
    r = await http.client.get(f"/v1/campaigns/{cid}/history?unit=hour&from={int(now) - 3600}")
    assert r.status_code == 200
    assert r.headers["etag"]
    assert r.json() == {"unit": "hour", "buckets": [[int(now) // 3600 * 3600, 1, 1]]}
    r = await http.client.get(f"/v1/campaigns/{cid}/recent?tz=America/Los_Angeles")
    assert r.json()["last_hour"] == [1, 1]
    assert r.json()["last_7_days"] == [2, 2]
    r = await http.client.get("/v1/campaigns/top?by=last_hour&limit=1000")
    assert {"campaign_id": cid, "value": 1} in r.json()
    for path, code in (
        (f"/v1/campaigns/{cid}/history?unit=week", "invalid"),
        (f"/v1/campaigns/{cid}/history?from=soon", "bad_message"),
        (f"/v1/campaigns/{cid}/recent?tz=Nowhere/Land", "invalid"),
        ("/v1/campaigns/top?by=yesterday", "invalid"),
        ("/v1/campaigns/top?limit=5000", "invalid"),
    ):
        r = await http.client.get(path)
        assert r.status_code == 400, path
        assert r.json()["error"] == code, path


async def test_the_demo_page_shows_the_busiest_campaigns_whatever_their_ids(http: Http) -> None:
    raw = await socket_peer(http)
    try:
        await send_and_flush(
            raw,
            ["incs", [[5_000_001, 7, "register", None, True]] * 3],
            ["incs", [[42_424, 7, "register", None, True]] * 2],
        )
    finally:
        await raw.close()
    page = (await http.client.get("/")).text
    first = page.index('campaign="5000001"')
    assert first < page.index('campaign="42424"')  # the busier one first
