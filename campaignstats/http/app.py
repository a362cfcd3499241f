"""The ASGI application over the service (docs/http.md): JSON reads, event streams, the widget,
the JSON ingest, health and metrics.

It is an adapter, like the socket server: every answer comes from :class:`StatsService`, every
increment goes through the one validator (``campaignstats.model``), every metrics update through
its own (``campaignstats.metrics.update``). Routes that belong to later work (pages,
orgs) are absent: 404, not stubs.

``StatsHttpApp`` is a plain ASGI callable: ``campaignstats serve`` runs it with uvicorn in the
actor's event loop (``campaignstats.http.server``), and an asyncio application that embeds the
service mounts it (``app.mount("/stats", campaignstats.http.app(service))``) and awaits
:meth:`StatsHttpApp.close` when it stops, which ends the event streams.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import msgspec
import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from campaignstats.actor.metrics import MetricsPending
from campaignstats.errors import (
    ActorStopped,
    BadFrame,
    BadMessage,
    Invalid,
    Overloaded,
    ProtocolError,
    StatsError,
    Unauthorized,
    WrongShard,
)
from campaignstats.http.events import RETRY_MS, EventHub, Stream, encode_event, stats_body
from campaignstats.http.ops import Metrics, is_ready
from campaignstats.metrics.update import MetricUpdate, update_from_map
from campaignstats.model import (
    DEFAULT_MAX_STRING,
    MAX_ID,
    Increment,
    check_increment,
    increment_from_map,
)
from campaignstats.service import StatsService

log = structlog.get_logger(__name__)

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode
_DIGITS = re.compile(r"[0-9]+")
#: the counter reads, answered before the router (StatsHttpApp._hot_read)
_HOT = re.compile(r"/v1/campaigns/([0-9]{1,19})(/count)?")

InfoHook = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """What the HTTP side needs to know; ``serve`` fills it from its options."""

    #: writes need ``Authorization: Bearer TOKEN`` when set (the socket server's token)
    token: str | None = None
    #: ``Cache-Control: public, max-age=N`` of the reads
    max_age: int = 1
    #: origins allowed to read from a browser; ``*`` for any
    cors_origins: tuple[str, ...] = ("*",)
    #: bytes of one ingest body (the socket's message limit)
    max_message: int = 1 << 20
    #: items of one ingest body, ids of one batch read
    max_batch: int = 10_000
    #: bytes of UTF-8 of action types and areas; None: the service's own limit
    max_string: int | None = None
    #: open event streams; more get 503
    max_streams: int = 10_000
    #: events waiting for a slow reader before it is dropped
    stream_queue: int = 16
    #: seconds between keep-alive comments on event streams
    keepalive: float = 15.0
    #: seconds a request waits for the service
    timeout: float = 10.0
    #: the demo page (``GET /``) shows this many of the busiest campaigns
    demo_size: int = 10


_STREAM_HEADERS = {
    "cache-control": "no-cache",
    "x-accel-buffering": "no",  # nginx in front: do not buffer events
}


def error_body(code: str, message: str) -> bytes:
    return _encode({"error": code, "message": message})


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    all_headers = {"cache-control": "no-store"}
    if headers:
        all_headers.update(headers)
    return Response(error_body(code, message), status, all_headers, media_type="application/json")


def _number(text: str | None, name: str) -> float | None:
    """Epoch seconds from a query parameter (empty or absent: None)."""
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise BadMessage(f"{name} must be a number (epoch seconds), not {text[:40]!r}") from None
    return int(value) if value.is_integer() else value


def parse_id(text: str, name: str) -> int:
    """An id from a path or a query: decimal digits, 1 to 2**63-1."""
    if not _DIGITS.fullmatch(text):
        raise BadMessage(f"{name} must be a decimal integer, not {text[:40]!r}")
    # Decimal digits but too many of them is out of range (``invalid``), as 2**63 is; the
    # length is checked first so that no huge string is converted.
    value = int(text) if len(text.lstrip("0")) <= 19 else MAX_ID + 1
    if not 0 < value <= MAX_ID:
        raise Invalid(f"{name} must be between 1 and 2**63-1")
    return value


def _etag(body: bytes) -> str:
    return '"' + hashlib.blake2b(body, digest_size=10).hexdigest() + '"'


def _matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110's weak comparison: a proxy may have marked our strong tag weak."""
    if if_none_match.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == etag for tag in if_none_match.split(","))


def _status_of(exc: StatsError) -> int:
    if isinstance(exc, Unauthorized):
        return 401
    if isinstance(exc, WrongShard):  # an Invalid: before the 400s
        return 421  # Misdirected Request: another shard owns it (docs/scale.md)
    if isinstance(exc, BadFrame | BadMessage | Invalid):
        return 400
    if isinstance(exc, Overloaded | ActorStopped):
        return 503
    return 500


class StatsHttpApp:
    """The ASGI application. ``campaignstats.http.app(service)`` builds one."""

    def __init__(
        self,
        service: StatsService,
        config: HttpConfig | None = None,
        *,
        info_hook: InfoHook | None = None,
    ) -> None:
        self.service = service
        self.config = config = config or HttpConfig()
        #: adds what the service does not know to ``info`` (the socket server's connections)
        self.info_hook = info_hook
        self.rejected_items = 0  # refused by the JSON ingest before they reach the service
        self.hub = EventHub(
            service,
            max_pending=config.stream_queue,
            keepalive=config.keepalive,
            max_streams=config.max_streams,
        )
        self.hub.on_drop = self._stop_writer
        self.metrics = Metrics(self.hub)
        self._counted: dict[tuple[str, int], Any] = {}
        self._writers: dict[Stream, asyncio.Task[Any]] = {}
        self._cache_control = f"public, max-age={config.max_age}"
        self._any_origin = "*" in config.cors_origins
        self._origins = frozenset(config.cors_origins)
        static = resources.files("campaignstats.http") / "static"
        self._widget = (static / "widget.js").read_bytes()
        self._widget_etag = _etag(self._widget)
        self._page = (static / "index.html").read_text("utf-8")
        self.app = Starlette(
            routes=[
                Route("/", self.demo_page, methods=["GET"]),
                Route("/widget.js", self.widget, methods=["GET"]),
                Route("/healthz", self.healthz, methods=["GET"]),
                Route("/readyz", self.readyz, methods=["GET"]),
                Route("/metrics", self.prometheus, methods=["GET"]),
                Route("/v1/campaigns", self.campaigns, methods=["GET"]),
                Route("/v1/campaigns/top", self.top, methods=["GET"]),
                Route("/v1/campaigns/{campaign_id}", self.campaign, methods=["GET"]),
                Route("/v1/campaigns/{campaign_id}/history", self.history, methods=["GET"]),
                Route("/v1/pages/{page_id}", self.page, methods=["GET"]),
                Route("/v1/orgs/{org_id}", self.org, methods=["GET"]),
                Route("/v1/campaigns/{campaign_id}/recent", self.recent, methods=["GET"]),
                Route("/v1/campaigns/{campaign_id}/goals", self.goals, methods=["GET"]),
                Route("/v1/campaigns/{campaign_id}/count", self.count, methods=["GET"]),
                Route("/v1/campaigns/{campaign_id}/events", self.events, methods=["GET"]),
                Route("/v1/campaigns/{campaign_id}/metrics", self.metrics_read, methods=["GET"]),
                Route("/v1/increments", self.increments, methods=["POST"]),
                Route("/v1/decrements", self.decrements, methods=["POST"]),
                Route("/v1/metrics", self.metrics_ingest, methods=["POST"]),
            ],
            exception_handlers={
                HTTPException: self._http_error,
                StatsError: self._stats_error,
                TimeoutError: self._timeout,
            },
        )

    # -- ASGI: CORS and the request counter around the routes ---------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "GET" and not scope["query_string"]:
            path = scope["path"]
            root = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root) :]
            hot = _HOT.fullmatch(path)
            if hot is not None and await self._hot_read(scope, send, hot):
                return
        origin = self._allowed_origin(scope)
        if scope["method"] == "OPTIONS" and _header(scope, b"access-control-request-method"):
            await self._preflight(origin, scope, send)
            return
        status = 500

        async def send_with_cors(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if origin is not None:
                    headers = list(message.get("headers", ()))
                    headers.append((b"access-control-allow-origin", origin))
                    headers.append((b"access-control-expose-headers", b"ETag"))
                    if not self._any_origin:
                        headers.append((b"vary", b"Origin"))
                    message = {**message, "headers": headers}
                elif not self._any_origin:
                    message = {
                        **message,
                        "headers": [*message.get("headers", ()), (b"vary", b"Origin")],
                    }
            await send(message)

        try:
            await self.app(scope, receive, send_with_cors)
        finally:
            route = scope.get("route")
            self._count(getattr(route, "path", None) or "unmatched", status)

    async def _hot_read(self, scope: Scope, send: Send, hot: re.Match[str]) -> bool:
        """The counter reads, ``GET /v1/campaigns/{id}`` and ``.../count`` without a query,
        answered without the router: the same bytes and headers as the routes below, for a
        fraction of the cost (bench/http.py). False: let the routes answer (and explain)."""
        campaign_id = int(hot[1])
        if not 0 < campaign_id <= MAX_ID:
            return False
        try:
            stats = await self._stats(campaign_id)
        except (StatsError, TimeoutError):
            return False  # the route asks again and turns the error into its JSON answer
        if hot[2]:
            route = "/v1/campaigns/{campaign_id}/count"
            body = _encode({"campaign_id": campaign_id, "supporters": stats["supporters"]})
        else:
            route = "/v1/campaigns/{campaign_id}"
            body = _encode(stats_body(campaign_id, stats))
        etag = _etag(body).encode()
        headers = [(b"cache-control", self._cache_control.encode()), (b"etag", etag)]
        origin = self._allowed_origin(scope)
        if origin is not None:
            headers.append((b"access-control-allow-origin", origin))
            headers.append((b"access-control-expose-headers", b"ETag"))
        if not self._any_origin:
            headers.append((b"vary", b"Origin"))
        if_none_match = _header(scope, b"if-none-match")
        if if_none_match is not None and _matches(if_none_match.decode("latin-1"), etag.decode()):
            status, body = 304, b""
        else:
            status = 200
            headers.append((b"content-type", b"application/json"))
            headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        self._count(route, status)
        return True

    def _count(self, route: str, status: int) -> None:
        key = (route, status)
        child = self._counted.get(key)
        if child is None:
            child = self._counted[key] = self.metrics.requests.labels(route, str(status))
        child.inc()

    def _allowed_origin(self, scope: Scope) -> bytes | None:
        if self._any_origin:
            return b"*"
        origin = _header(scope, b"origin")
        if origin is not None and origin.decode("latin-1") in self._origins:
            return origin
        return None

    async def _preflight(self, origin: bytes | None, scope: Scope, send: Send) -> None:
        headers = [
            (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
            (b"access-control-allow-headers", b"Authorization, Content-Type, If-None-Match"),
            (b"access-control-max-age", b"600"),
            (b"content-length", b"0"),
        ]
        if origin is not None:
            headers.append((b"access-control-allow-origin", origin))
        if not self._any_origin:
            headers.append((b"vary", b"Origin"))
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        self._count("preflight", 204)

    async def close(self) -> None:
        """End every event stream (each writer finishes its response) and the hub's tasks."""
        await self.hub.close()

    # -- errors ---------------------------------------------------------------------------------

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        # An unknown route is the HTTP form of the wire's unknown op: bad_message.
        message = "no such route" if exc.status_code == 404 else str(exc.detail)
        return error_response(exc.status_code, "bad_message", message, exc.headers)

    async def _stats_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StatsError)
        status = _status_of(exc)
        headers = {"www-authenticate": "Bearer"} if status == 401 else None
        if status == 500:
            log.error("http.internal_error", path=request.url.path, error=repr(exc))
        return error_response(status, exc.code, str(exc) or exc.code, headers)

    async def _timeout(self, request: Request, exc: Exception) -> Response:
        return error_response(503, "overloaded", "the stats service did not answer in time")

    # -- reads ----------------------------------------------------------------------------------

    def _read(
        self, request: Request, body: bytes, media_type: str = "application/json"
    ) -> Response:
        etag = _etag(body)
        headers = {"cache-control": self._cache_control, "etag": etag}
        if_none_match = request.headers.get("if-none-match")
        if if_none_match is not None and _matches(if_none_match, etag):
            return Response(status_code=304, headers=headers)
        return Response(body, 200, headers, media_type=media_type)

    async def _stats(self, campaign_id: int) -> dict[str, Any]:
        # The service's calls carry their own timeout (StatsService.call_timeout).
        return await self.service.stats(campaign_id)

    async def campaign(self, request: Request) -> Response:
        campaign_id = parse_id(request.path_params["campaign_id"], "campaign id")
        exclude = request.query_params.get("exclude_org")
        exclude_org = None if exclude is None else parse_id(exclude, "exclude_org")
        stats = await self._stats(campaign_id)
        body = stats_body(campaign_id, stats)
        if exclude_org is not None:
            # Proca's supporterCountByOthers: the campaign's supporters minus this org's.
            mine = stats["org"].get(exclude_org, 0)
            body["supporters_by_others"] = max(0, stats["supporters"] - mine)
        return self._read(request, _encode(body))

    async def campaigns(self, request: Request) -> Response:
        text = request.query_params.get("ids")
        if not text:
            raise BadMessage("ids is required: ?ids=1,2,3")
        words = text.split(",")
        if len(words) > self.config.max_batch:
            raise Invalid(f"at most {self.config.max_batch} ids")
        ids = list(dict.fromkeys(parse_id(w.strip(), "campaign id") for w in words))
        async with asyncio.timeout(self.config.timeout):
            many = await self.service.stats_many(ids)
        return self._read(request, _encode({str(cid): many[cid] for cid in ids}))

    async def count(self, request: Request) -> Response:
        campaign_id = parse_id(request.path_params["campaign_id"], "campaign id")
        stats = await self._stats(campaign_id)
        return self._read(
            request, _encode({"campaign_id": campaign_id, "supporters": stats["supporters"]})
        )

    async def history(self, request: Request) -> Response:
        """The ``history`` call (docs/protocol.md): ``?unit=hour&from=&to=`` (epoch seconds),
        ``&page=`` for one of the campaign's action pages."""
        campaign_id = parse_id(request.path_params["campaign_id"], "campaign id")
        query = request.query_params
        unit = query.get("unit") or "hour"
        start, end = _number(query.get("from"), "from"), _number(query.get("to"), "to")
        page_text = query.get("page")
        page = None if not page_text else parse_id(page_text, "page")
        async with asyncio.timeout(self.config.timeout):
            result = await self.service.history(campaign_id, unit, start, end, page)
        return self._read(request, _encode(result))

    async def page(self, request: Request) -> Response:
        """The ``page_stats`` call: STATS plus ``campaign_id``, org keys as strings (JSON)."""
        page_id = parse_id(request.path_params["page_id"], "page id")
        async with asyncio.timeout(self.config.timeout):
            result = await self.service.page_stats(page_id)
        return self._read(request, _encode(result))

    async def org(self, request: Request) -> Response:
        """The ``org_stats`` call; campaign ids as strings (JSON)."""
        org_id = parse_id(request.path_params["org_id"], "org id")
        async with asyncio.timeout(self.config.timeout):
            result = await self.service.org_stats(org_id)
        return self._read(request, _encode(result))

    async def recent(self, request: Request) -> Response:
        """The ``recent`` call: ``?tz=Europe/Berlin`` (default UTC)."""
        campaign_id = parse_id(request.path_params["campaign_id"], "campaign id")
        tz = request.query_params.get("tz") or "UTC"
        async with asyncio.timeout(self.config.timeout):
            result = await self.service.recent(campaign_id, tz)
        return self._read(request, _encode(result))

    async def goals(self, request: Request) -> Response:
        """The ``get_goals`` call (docs/http.md): the widget's ``goal="auto"`` reads it."""
        campaign_id = parse_id(request.path_params["campaign_id"], "campaign id")
        async with asyncio.timeout(self.config.timeout):
            result = await self.service.get_goals(campaign_id)
        return self._read(request, _encode(result))

    async def top(self, request: Request) -> Response:
        """The ``top`` call as a trending list: ``[{"campaign_id", "value"}, ...]``."""
        query = request.query_params
        by = query.get("by") or "supporters"
        limit_text = query.get("limit")
        limit = 10 if not limit_text else parse_id(limit_text, "limit")
        async with asyncio.timeout(self.config.timeout):
            leaders = await self.service.top(by, limit)
        body = [{"campaign_id": cid, "value": value} for cid, value in leaders]
        return self._read(request, _encode(body))

    async def metrics_read(self, request: Request) -> Response:
        """The ``metrics`` call as JSON (docs/metrics.md); cacheable like the other reads."""
        campaign_id = parse_id(request.path_params["campaign_id"], "campaign id")
        async with asyncio.timeout(self.config.timeout):
            result = await self.service.metrics(campaign_id)
        return self._read(request, _encode(result))

    # -- the widget and its demo page ---------------------------------------------------------

    async def widget(self, request: Request) -> Response:
        headers = {"cache-control": "public, max-age=300", "etag": self._widget_etag}
        if_none_match = request.headers.get("if-none-match")
        if if_none_match is not None and _matches(if_none_match, self._widget_etag):
            return Response(status_code=304, headers=headers)
        return Response(self._widget, 200, headers, media_type="text/javascript")

    async def demo_page(self, request: Request) -> Response:
        # The busiest campaigns by supporters, whatever their ids (the `top` call).
        async with asyncio.timeout(self.config.timeout):
            top = await self.service.top("supporters", self.config.demo_size)
        busiest = [cid for cid, supporters in top if supporters > 0]
        root = request.scope.get("root_path", "")
        rows = "\n".join(
            f'    <li><span class="name">Campaign {cid}</span>\n'
            f'      <campaign-counter campaign="{cid}" goal="auto"></campaign-counter></li>'
            for cid in busiest
        )
        if not rows:
            rows = "    <li>No campaign has supporters yet.</li>"
        page = self._page.replace("{{root}}", root).replace("{{counters}}", rows)
        return self._read(request, page.encode(), "text/html; charset=utf-8")

    # -- live -----------------------------------------------------------------------------------

    async def events(self, request: Request) -> Response | None:
        campaign_id = parse_id(request.path_params["campaign_id"], "campaign id")
        if request.method == "HEAD":
            # Starlette answers HEAD on every GET route: the headers alone, never a stream
            # that no body will ever end.
            return Response(b"", 200, _STREAM_HEADERS, media_type="text/event-stream")
        stream = await self.hub.open(campaign_id)
        try:
            stats = await self._stats(campaign_id)
        except BaseException:
            self.hub.release(stream)
            raise
        return _EventStream(self, stream, stats)  # type: ignore[return-value]

    def _stop_writer(self, stream: Stream) -> None:
        task = self._writers.get(stream)
        if task is not None:
            task.cancel()  # the writer may wait in send(): only cancelling stops it

    # -- writes ---------------------------------------------------------------------------------

    async def increments(self, request: Request) -> Response:
        return await self._ingest(request, decrement=False)

    async def decrements(self, request: Request) -> Response:
        return await self._ingest(request, decrement=True)

    def _authorize(self, request: Request) -> None:
        token = self.config.token
        if token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, credentials = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            credentials.strip().encode(), token.encode()
        ):
            raise Unauthorized("a valid 'Authorization: Bearer TOKEN' header is required")

    async def _body(self, request: Request) -> bytes:
        limit = self.config.max_message
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise _TooLarge(limit)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _TooLarge(limit)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _ingest(
        self, request: Request, *, decrement: bool, metrics: bool = False
    ) -> Response:
        self._authorize(request)
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":
            # Also what keeps a web page elsewhere from posting here without a preflight: a
            # browser sends text/plain or a form "simple" request cross-site without asking.
            return error_response(
                415, "bad_message", "the body must be application/json (Content-Type)"
            )
        try:
            body = await self._body(request)
        except _TooLarge as exc:
            return error_response(413, "bad_frame", f"the body is over {exc.limit} bytes")
        try:
            items = _decode(body)
        except (msgspec.DecodeError, RecursionError) as exc:  # nesting too deep: RecursionError
            raise BadFrame(f"malformed JSON: {type(exc).__name__}: {exc}"[:300]) from None
        if not isinstance(items, list):
            what = "metrics updates" if metrics else "increment objects"
            raise BadMessage(f"the body must be a JSON array of {what}")
        if len(items) > self.config.max_batch:
            raise Invalid(f"at most {self.config.max_batch} items per request")
        valid: Sequence[Increment] | Sequence[MetricUpdate]
        if metrics:
            valid, positions, rejected = self._validate_metrics(items)
        else:
            valid, positions, rejected = self._validate(items)
        answer: dict[str, Any] = {}
        if valid:
            refused: list[tuple[int, str]] = []
            # Only waiting for room may time out into an error: once the batch is queued it
            # will be applied, and an error would make a client retry it (counted twice).
            async with asyncio.timeout(self.config.timeout):
                if metrics:
                    await self.service.send_metrics(valid, refused.extend)  # type: ignore[arg-type]
                else:
                    await self.service.send(valid, refused.extend, decrement=decrement)  # type: ignore[arg-type]
            try:
                # Once applied, the actor has told us which items the state refused (a limit);
                # metrics updates are committed to their log by then (acknowledged).
                async with asyncio.timeout(self.config.timeout):
                    if metrics:  # kept when its log cannot be written: see below
                        await self.service.flush(keep_metrics=True)
                    else:
                        await self.service.flush()
            except (TimeoutError, Overloaded):
                answer["pending"] = True  # queued, not applied yet: refusals unknown
            except MetricsPending:
                answer["pending"] = True  # applied and kept, its log not written yet
            rejected.extend((positions[i], reason) for i, reason in refused)
            rejected.sort()
        self.rejected_items += len(rejected)
        accepted = len(items) - len(rejected)
        answer = {"accepted": accepted, "rejected": [list(r) for r in rejected], **answer}
        body = _encode(answer)
        return Response(body, 202, {"cache-control": "no-store"}, media_type="application/json")

    def _validate(
        self, items: Sequence[Any]
    ) -> tuple[list[Increment], list[int], list[tuple[int, str]]]:
        valid: list[Increment] = []
        positions: list[int] = []
        rejected: list[tuple[int, str]] = []
        max_string = self.config.max_string
        if max_string is None:
            max_string = getattr(self.service, "max_string", DEFAULT_MAX_STRING)
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                rejected.append((index, "an increment must be a JSON object (the map form)"))
                continue
            inc = increment_from_map(item)
            error: ProtocolError | None = inc if isinstance(inc, ProtocolError) else None
            if isinstance(inc, Increment):
                error = check_increment(inc, max_string)
            if error is not None:
                rejected.append((index, str(error)))
                continue
            assert isinstance(inc, Increment)
            valid.append(inc)
            positions.append(index)
        return valid, positions, rejected

    async def metrics_ingest(self, request: Request) -> Response:
        """``POST /v1/metrics``: a JSON array of UPDATEs, each checked by the one validator of
        the socket's ``metric`` cast; the valid ones applied and logged (a flush: durable by the
        server's fsync policy) before the ``202``, refusals named by index."""
        return await self._ingest(request, decrement=False, metrics=True)

    def _validate_metrics(
        self, items: Sequence[Any]
    ) -> tuple[list[MetricUpdate], list[int], list[tuple[int, str]]]:
        limits = self.service.config.metrics.limits
        valid: list[MetricUpdate] = []
        positions: list[int] = []
        rejected: list[tuple[int, str]] = []
        for index, item in enumerate(items):
            update = update_from_map(item, limits)
            if isinstance(update, ProtocolError):
                rejected.append((index, str(update)))
            else:
                valid.append(update)
                positions.append(index)
        return valid, positions, rejected

    # -- operations -----------------------------------------------------------------------------

    async def _info(self) -> dict[str, Any]:
        async with asyncio.timeout(self.config.timeout):
            info = await self.service.info()
        info = self.info_hook(info) if self.info_hook is not None else info
        # Items the JSON ingest refused never reached the actor: count them with its own.
        info["rejected"] = info.get("rejected", 0) + self.rejected_items
        return info

    async def healthz(self, request: Request) -> Response:
        return Response(b'{"status":"ok"}', 200, {"cache-control": "no-store"}, "application/json")

    async def readyz(self, request: Request) -> Response:
        try:
            ready = is_ready(await self._info())
            why = "no full calculation or snapshot loaded yet"
        except (StatsError, TimeoutError) as exc:
            ready, why = False, f"the stats service does not answer: {exc!r}"
        body = {"ready": True} if ready else {"ready": False, "reason": why}
        return Response(
            _encode(body), 200 if ready else 503, {"cache-control": "no-store"}, "application/json"
        )

    async def prometheus(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        text = self.metrics.render(await self._info())
        return Response(text, 200, {"cache-control": "no-store"}, media_type=CONTENT_TYPE_LATEST)


class _TooLarge(Exception):
    def __init__(self, limit: int) -> None:
        self.limit = limit


class _EventStream:
    """The response of ``GET .../events``: written by hand (an ASGI callable), because it must
    notice the reader leaving while idle and be stoppable while it waits to send."""

    def __init__(self, owner: StatsHttpApp, stream: Stream, stats: dict[str, Any]) -> None:
        self.owner = owner
        self.stream = stream
        self.first = f"retry: {RETRY_MS}\n".encode() + encode_event(
            "stats", stats_body(stream.campaign_id, stats)
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        owner, stream = self.owner, self.stream
        task = asyncio.current_task()
        assert task is not None
        owner._writers[stream] = task
        watcher = asyncio.create_task(_watch_disconnect(receive, stream))
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        *((k.encode(), v.encode()) for k, v in _STREAM_HEADERS.items()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": self.first, "more_body": True})
            pending = stream.pending
            while True:
                await stream.wake.wait()
                stream.wake.clear()
                while pending and not stream.closed:
                    chunk = pending.popleft()
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if stream.closed:
                    break
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not stream.dropped or task.uncancel() > 0:
                raise
            # Dropped as too slow while waiting in send(): return without finishing the
            # response, and the server closes the connection.
        finally:
            watcher.cancel()
            owner._writers.pop(stream, None)
            owner.hub.release(stream)


async def _watch_disconnect(receive: Receive, stream: Stream) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    stream.close()


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def app(
    service: StatsService,
    config: HttpConfig | None = None,
    *,
    info_hook: InfoHook | None = None,
) -> StatsHttpApp:
    """The ASGI application over ``service`` (docs/http.md)."""
    return StatsHttpApp(service, config, info_hook=info_hook)
