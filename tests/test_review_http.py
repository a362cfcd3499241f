"""The findings of the adversarial review of the HTTP face (docs/http.md), one test each.

Each failed before its fix; each docstring says what was wrong and what must happen. The fixtures
are those of tests/test_http.py (uvicorn on 127.0.0.1:0, real Postgres).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from campaignstats.actor.actor import ActorConfig
from campaignstats.cli import build_parser
from campaignstats.db.source import PostgresSource
from campaignstats.http import HttpConfig, app
from campaignstats.service import StatsService

# ruff: noqa: F811  (the fixtures of tests/test_http.py, imported, are parameters here)
from .test_http import (  # noqa: F401
    Http,
    MakeHttp,
    http,
    make_http,
    send_and_flush,
    socket_peer,
)

pytestmark = pytest.mark.timeout(60)


def _metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(name)


async def test_head_on_the_event_stream_does_not_hold_a_stream_open_forever(http: Http) -> None:
    """Starlette answers HEAD on every GET route, so ``HEAD /v1/campaigns/1/events`` runs
    ``_EventStream``: uvicorn sends the headers, drops the body, and the response never
    completes. The stream stays counted against ``max_streams`` (and subscribed) for as long as
    the client keeps the connection, and the next request on that keep-alive connection hangs
    behind it (here: ReadTimeout). A HEAD should get the headers and a finished, empty
    response, and hold no stream."""
    r = await http.client.head("/v1/campaigns/1/events")
    assert r.status_code == 200
    await asyncio.sleep(0.3)
    assert http.app.hub.streams == 0, "a HEAD request holds an event stream"
    after = await http.client.get("/v1/campaigns/1/count", timeout=3)  # same connection
    assert after.status_code == 200


async def test_deeply_nested_json_in_the_ingest_is_a_400_json_error_not_a_500(
    http: Http,
) -> None:
    """10 kB of ``[[[[...]]]]`` (well under the 1 MiB limit) makes msgspec raise RecursionError,
    which ``_ingest`` does not catch (it catches ``msgspec.DecodeError`` only): the answer is
    Starlette's ``500 Internal Server Error`` in text/plain, with a traceback in the log, for
    any client of an ingest without a token. It should be ``400`` with
    ``{"error": "bad_frame", ...}`` like any body that cannot be decoded."""
    r = await http.client.post(
        "/v1/increments",
        content=b"[" * 5000 + b"]" * 5000,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"] in ("bad_frame", "bad_message")


async def test_items_rejected_by_the_json_ingest_count_in_the_rejected_metric(http: Http) -> None:
    """``campaignstats_increments_rejected_total`` is read from ``info["rejected"]``: the
    actor's rejections plus the socket server's. Items the HTTP ingest rejects itself (it
    validates before sending) are never counted anywhere, so an operator sees 0 rejections
    while a PHP backend's every item is refused with 202. HTTP.md, Operations: metrics of
    "increments applied and rejected". The HTTP side should add its rejections (as the socket
    server does in ``add_info``)."""
    before = _metric(
        (await http.client.get("/metrics")).text, "campaignstats_increments_rejected_total"
    )
    r = await http.client.post(
        "/v1/increments", json=[{"campaign": 0, "org": 1, "type": "register"}, 5]
    )
    assert r.status_code == 202
    assert len(r.json()["rejected"]) == 2
    after = _metric(
        (await http.client.get("/metrics")).text, "campaignstats_increments_rejected_total"
    )
    assert after == before + 2


class _BusyActor:
    """A service whose actor is busy (a long merge step): the batch is queued at once, and
    the flush that waits for it to be applied takes longer than the request's timeout."""

    def __init__(self) -> None:
        self.queued: list[Any] = []

    async def send(self, items: Any, on_rejected: Any = None, *, decrement: bool = False) -> None:
        self.queued.extend(items)

    async def flush(self) -> None:
        await asyncio.sleep(5)


async def test_an_ingest_that_times_out_after_queueing_its_batch_is_not_a_retryable_503() -> None:
    """``_ingest`` wraps both ``service.send`` (queueing) and ``service.flush`` (waiting for the
    batch to be applied) in one ``asyncio.timeout``: when the flush is slow, the client gets
    ``503 overloaded`` ("did not answer in time") although its batch is already in the mailbox
    and will be applied. A backend that retries on 503 (what 503 invites) counts every
    supporter twice. The timeout should bound only the wait for room in the mailbox; once the
    batch is queued the answer must say so (202, perhaps without the state's refusals), never
    a 503 that reads as "nothing happened"."""
    busy = _BusyActor()
    stats_app = app(busy, HttpConfig(timeout=0.2))  # type: ignore[arg-type]
    try:
        transport = httpx.ASGITransport(app=stats_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            r = await client.post(
                "/v1/increments", json=[{"campaign": 1, "org": 1, "type": "register"}]
            )
    finally:
        await stats_app.close()
    assert len(busy.queued) == 1  # the batch was handed to the actor
    assert r.status_code != 503, r.text


async def test_an_embedded_app_validates_items_with_the_services_max_string(
    make_http: MakeHttp, module_dsn: str
) -> None:
    """``campaignstats.http.app(service)`` validates with ``HttpConfig.max_string`` (default
    64), the service with its own ``max_string``. With a service that is stricter, one long
    action type makes ``service.send`` raise ``Invalid`` for the whole batch: ``400`` and the
    valid item is not applied, instead of ``202`` with that one item in ``rejected``. The app
    should validate with the service's limit (default ``HttpConfig.max_string`` to
    ``service.max_string``)."""
    service = StatsService(
        PostgresSource(module_dsn), ActorConfig(sync_interval=3600), max_string=8
    )
    await service.start()
    try:
        h = await make_http(service=service)
        r = await h.client.post(
            "/v1/increments",
            json=[
                {"campaign": 5, "org": 1, "type": "register"},
                {"campaign": 5, "org": 1, "type": "a-long-action-type"},
            ],
        )
        assert r.status_code == 202, r.text
        assert r.json()["accepted"] == 1
        assert [i for i, _ in r.json()["rejected"]] == [1]
    finally:
        await h.server.close()
        await service.stop()


async def test_the_json_ingest_refuses_a_cross_site_simple_post(http: Http) -> None:
    """Without a token (the default on loopback) the ingest takes any body whatever its
    ``Content-Type``. A ``text/plain`` POST is a CORS "simple request": any web page open in a
    browser on the same machine can send one to ``http://127.0.0.1:7401/v1/increments`` with
    no preflight, and the counts move (and with ``Access-Control-Allow-Origin: *`` it can even
    read the 202). Requiring ``Content-Type: application/json`` (415 otherwise) forces the
    preflight the server controls; the socket has no such drive-by path."""
    r = await http.client.post(
        "/v1/increments",
        content=json.dumps([{"campaign": 5, "org": 1, "type": "register", "new": True}]),
        headers={"content-type": "text/plain", "origin": "https://evil.example"},
    )
    assert r.status_code == 415, r.text


def test_a_negative_http_max_age_is_refused() -> None:
    """``--http-max-age`` is ``type=int`` with no check: ``-5`` is taken and every read then
    carries ``Cache-Control: public, max-age=-5``, which is not valid (delta-seconds are
    non-negative; caches treat it as malformed). It should be refused like the other
    non-negative options (``_positive_int`` or a >= 0 check)."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--http-max-age", "-5"])
