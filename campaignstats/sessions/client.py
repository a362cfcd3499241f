"""The client's side of the protocol as a sans-IO state machine (docs/protocol.md).

In the manner of h11's ``Connection``: :class:`ClientSession` turns requests into bytes
(:meth:`~ClientSession.connect`, :meth:`~ClientSession.send`, :meth:`~ClientSession.send_changes`)
and the server's bytes into events (:meth:`~ClientSession.receive_data`, then
:meth:`~ClientSession.next_event` until it returns None). It never touches a socket, a thread or an
event loop: the asyncio and the blocking clients are adapters that move the bytes and wait, each in
its own way (docs/design.md, "The house").

What it owns:

* hello: the first message of every connection, the check of its reply, and what the reply says
  about the server (its ``ops`` and ``limits``; defaults when an older server does not say);
* request ids and pending calls: replies come in call order, so each reply must answer the oldest
  pending call; anything else is a :class:`~campaignstats.errors.RemoteProtocolError`. A call its
  caller gave up on (:meth:`~ClientSession.abandon`) still takes its place in that order, and its
  reply is swallowed;
* errors: an ``err`` reply becomes the exception class of its code; a call pending when the
  connection is lost fails with :class:`~campaignstats.errors.ServerUnavailable`;
* subscriptions, across connections: a session outlives its connections, and
  :meth:`~ClientSession.connect` re-sends the ``sub`` of every campaign still wanted, followed by
  one ``stats_many`` whose answer comes out as :class:`Update` events (a value that changed while
  the connection was down is not missed);
* encoding increments and decrements: the v1 array form when an increment carries only the v1
  fields, else the map form; batches as ``incs``/``decs`` cut at the server's ``max_batch`` and
  ``max_message``; metrics updates as one ``["metric", UPDATE]`` each (the wire has no batch
  form: the server batches what one read brings).

States: ``IDLE`` (no connection) -> :meth:`connect` -> ``GREETING`` (hello sent) -> the hello's
answer -> ``READY``; a refused hello or a protocol violation -> ``BROKEN``; from any state,
:meth:`connection_lost` -> ``IDLE``.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from campaignstats._version import __version__
from campaignstats.errors import (
    BadFrame,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    ServerUnavailable,
    StatsError,
)
from campaignstats.model import Increment, WireStats
from campaignstats.protocol import (
    PROTOCOL_VERSION,
    CallRequest,
    ClientCodec,
    Err,
    EventMessage,
    Hello,
    Limits,
    Ok,
    Pub,
)
from campaignstats.requests import (
    GetGoals,
    GetMetrics,
    GetOrgStats,
    GetPageStats,
    History,
    Info,
    Recent,
    ResetMetrics,
    Resync,
    SetGuard,
    Stats,
    StatsMany,
    Subscribe,
    Top,
    Unsubscribe,
)

__all__ = [
    "CLIENT_NAME",
    "V1_OPS",
    "ClientSession",
    "Event",
    "Failed",
    "Measure",
    "Ready",
    "Reply",
    "ServerError",
    "SessionState",
    "Undo",
    "Update",
    "WireItem",
    "wire_item",
]

CLIENT_NAME = f"campaignstats-python/{__version__}"

#: what a server that does not list its ops understands (protocol 1 before the additions)
V1_OPS = frozenset(
    (
        "inc",
        "incs",
        "hello",
        "ping",
        "stats",
        "stats_many",
        "flush",
        "info",
        "resync",
        "sub",
        "unsub",
    )
)

#: An increment as the wire carries it: the v1 array ``(campaign_id, org_id, action_type, area,
#: new_supporter, count, action_id)`` or the map form (docs/protocol.md, "Additions").
WireItem = tuple[Any, ...] | dict[str, Any]


# -- events ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    """The server accepted the hello. ``ops`` and ``limits`` are what it said, or the v1 set and
    the protocol's defaults when it did not say (an older server)."""

    server: str
    ops: frozenset[str]
    limits: Limits


@dataclass(frozen=True, slots=True)
class Reply:
    """A call succeeded. ``result`` is already in its Python shape: ``bool`` for a resync."""

    req_id: int
    request: CallRequest
    result: Any


@dataclass(frozen=True, slots=True)
class Failed:
    """A call failed: the server's typed error, or ServerUnavailable when the connection went."""

    req_id: int
    request: CallRequest
    error: StatsError


@dataclass(frozen=True, slots=True)
class Update:
    """New stats of a subscribed campaign (a ``pub``, or the refresh after a reconnection)."""

    campaign_id: int
    stats: WireStats


@dataclass(frozen=True, slots=True)
class GoalEvent:
    """A subscribed campaign reached a goal: ``event`` is the EVENT map of docs/protocol.md
    ("Events"), a milestone or a quorum."""

    campaign_id: int
    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ServerError:
    """An ``err`` no call waits for: a rejected cast (an ``incs`` item, say) or a re-subscription
    the server refused. Worth counting and logging; nobody is there to raise it to."""

    error: ProtocolError


Event = Ready | Reply | Failed | Update | GoalEvent | ServerError


@dataclass(frozen=True, slots=True)
class Undo:
    """A decrement waiting in a client's queue beside increments (order between them matters:
    a count never goes below zero, so a decrement must not overtake its increment)."""

    item: WireItem


@dataclass(frozen=True, slots=True)
class Measure:
    """A metrics update waiting in a client's queue: its UPDATE map, already validated
    (docs/metrics.md, "The update")."""

    item: dict[str, Any]


class SessionState(enum.Enum):
    IDLE = "idle"  # no connection
    GREETING = "greeting"  # hello sent, its answer not yet in
    READY = "ready"
    BROKEN = "broken"  # hello refused, or the server broke the protocol: drop the connection


@dataclass(slots=True)
class _Pending:
    req_id: int
    request: CallRequest
    internal: bool = False  # sent by the session itself (re-subscription): no caller waits
    abandoned: bool = False  # its caller gave up: swallow the reply when it comes


# -- increments -----------------------------------------------------------------------------------


def wire_item(inc: Increment) -> WireItem:
    """The wire form of an increment: the v1 array when it has only the v1 fields, else a map
    holding only the fields that differ from their defaults."""
    cid, org, action_type, area, new, count, action_id, txid, at, page, messages = inc
    if txid is None and at is None and page is None and messages == 0:
        return (cid, org, action_type, area, new, count, action_id)
    item: dict[str, Any] = {"campaign": cid, "org": org, "type": action_type}
    if area is not None:
        item["area"] = area
    if new:
        item["new"] = True
    if count != 1:
        item["count"] = count
    if action_id is not None:
        item["action"] = action_id
    if txid is not None:
        item["txid"] = txid
    if at is not None:
        item["at"] = at
    if page is not None:
        item["page"] = page
    if messages:
        item["messages"] = messages
    return item


def _as_array(item: WireItem) -> tuple[Any, ...]:
    """A map item in the v1 array form, for a server that takes no maps (its extra fields lost)."""
    if type(item) is not dict:
        return item  # type: ignore[return-value]
    return (
        item["campaign"],
        item["org"],
        item["type"],
        item.get("area"),
        item.get("new", False),
        item.get("count", 1),
        item.get("action"),
    )


def _check_limits(value: Any) -> Limits:
    """The hello's ``limits``, each missing or unusable one replaced by the protocol default."""
    default = Limits()
    if type(value) is not dict:
        return default

    def pick(name: str, fallback: int) -> int:
        n = value.get(name)
        return n if type(n) is int and n > 0 else fallback

    return Limits(
        pick("max_message", default.max_message),
        pick("max_batch", default.max_batch),
        pick("max_string", default.max_string),
    )


def _result(request: CallRequest, result: Any) -> Any:
    """A call's result in its Python shape; raises RemoteProtocolError on a shape no server
    sends."""
    if type(request) is Stats:  # the commonest call first
        if type(result) is not dict:
            raise RemoteProtocolError(f"stats answered a {type(result).__name__}")
        return result
    if isinstance(request, Resync):
        if type(result) is not dict or type(result.get("started")) is not bool:
            raise RemoteProtocolError(f"resync answered {result!r:.80}")
        return result["started"]
    if isinstance(request, ResetMetrics):
        if type(result) is not dict or type(result.get("found")) is not bool:
            raise RemoteProtocolError(f"reset_metrics answered {result!r:.80}")
        return result["found"]
    if isinstance(request, SetGuard):
        if type(result) is not dict or not {"deadline", "min_period"} <= result.keys():
            raise RemoteProtocolError(f"guard answered {result!r:.80}")
        return result
    if isinstance(request, Top) and type(result) is not list:
        raise RemoteProtocolError(f"top answered a {type(result).__name__}")
    if (
        isinstance(request, Stats | Info | GetMetrics | History | Recent | GetGoals)
        and type(result) is not dict
    ) or (isinstance(request, GetPageStats | GetOrgStats) and type(result) is not dict):
        raise RemoteProtocolError(f"{request.op} answered a {type(result).__name__}")
    if isinstance(request, StatsMany) and type(result) is not dict:
        raise RemoteProtocolError(f"stats_many answered a {type(result).__name__}")
    return result


# -- the session ----------------------------------------------------------------------------------


class ClientSession:
    """One client's protocol state, across any number of connections (one at a time)."""

    def __init__(self, *, token: str | None = None, client: str = CLIENT_NAME) -> None:
        self._hello = Hello(PROTOCOL_VERSION, token, client)
        self.state = SessionState.IDLE
        #: what the last hello answer said (defaults until one came)
        self.server: str | None = None
        self.ops: frozenset[str] = V1_OPS
        self._listed_ops = False  # the server listed its ops: it speaks the additions
        self.limits = Limits()
        #: campaigns to keep subscribed, re-sent on every new connection
        self.subscriptions: set[int] = set()
        self._req_ids = itertools.count(1)
        self._pending: deque[_Pending] = deque()
        self._codec = ClientCodec()
        self._inbox: deque[Pub | EventMessage | Ok | Err | RemoteProtocolError] = deque()
        self._outbox: deque[Event] = deque()

    # -- what the server takes ------------------------------------------------------------------

    @property
    def accepts_maps(self) -> bool:
        """Whether the server takes map-form items: any server that lists its ops does."""
        return self._listed_ops

    @property
    def accepts_decrements(self) -> bool:
        return "decs" in self.ops

    @property
    def pending(self) -> int:
        """Calls sent and not yet answered (abandoned ones included: their replies will come)."""
        return len(self._pending)

    # -- connection life cycle ------------------------------------------------------------------

    def connect(self) -> bytes:
        """The first bytes of a new connection: ``hello``, then the ``sub`` of every campaign still
        subscribed and one ``stats_many`` per ``max_batch`` of them (pipelined: the server answers
        in order, and nothing else may be sent until :class:`Ready` comes out)."""
        if self.state is not SessionState.IDLE:
            raise LocalProtocolError(f"connect() in state {self.state.value}")
        self.state = SessionState.GREETING
        self._codec = ClientCodec()
        data = [self._call(self._hello, internal=True)[1]]
        ids = sorted(self.subscriptions)
        for cid in ids:
            data.append(self._call(Subscribe(cid), internal=True)[1])
        step = self.limits.max_batch
        for start in range(0, len(ids), step):
            data.append(self._call(StatsMany(ids[start : start + step]), internal=True)[1])
        return b"".join(data)

    def connection_lost(self) -> list[Failed]:
        """The connection is gone (closed, reset, or dropped by the adapter after an error).

        Returns a :class:`Failed` for every call a caller still waits for; the session is
        ``IDLE`` again, and keeps its subscriptions for the next :meth:`connect`.
        """
        failed = [
            Failed(p.req_id, p.request, ServerUnavailable("connection to the server lost"))
            for p in self._pending
            if not p.internal and not p.abandoned
        ]
        self._pending.clear()
        self._inbox.clear()
        self._outbox.clear()
        self.state = SessionState.IDLE
        return failed

    # -- calls ----------------------------------------------------------------------------------

    def send(self, request: CallRequest) -> tuple[int, bytes]:
        """A call: its ``req_id`` (its :class:`Reply` or :class:`Failed` carries it) and bytes."""
        if self.state is not SessionState.READY:
            raise LocalProtocolError(f"a call in state {self.state.value}")
        if isinstance(request, Hello):
            raise LocalProtocolError("hello is sent by connect()")
        sent = self._call(request)  # first: a request that cannot be encoded changes nothing
        if isinstance(request, Subscribe):
            self.subscriptions.add(request.campaign_id)  # its pubs may come before its reply
        elif isinstance(request, Unsubscribe) and request.campaign_id is not None:
            self.subscriptions.discard(request.campaign_id)
        return sent

    def _call(self, request: CallRequest, *, internal: bool = False) -> tuple[int, bytes]:
        req_id = next(self._req_ids)
        data = self._codec.call(request.op, req_id, *request.wire_args())
        self._pending.append(_Pending(req_id, request, internal))
        return req_id, data

    def abandon(self, req_id: int) -> None:
        """The caller of ``req_id`` gave up (a timeout, a cancellation): its reply will be
        swallowed when it comes. A subscription whose caller gave up is not kept."""
        for pending in self._pending:
            if pending.req_id == req_id:
                pending.abandoned = True
                if isinstance(pending.request, Subscribe):
                    self.subscriptions.discard(pending.request.campaign_id)
                return

    def forget_subscription(self, campaign_id: int) -> None:
        """Stop re-subscribing ``campaign_id`` on new connections (no ``unsub`` is sent: use
        when the connection is not there to send it on)."""
        self.subscriptions.discard(campaign_id)

    # -- increments and decrements --------------------------------------------------------------

    def send_changes(self, items: Sequence[WireItem], *, decrement: bool = False) -> bytes:
        """``incs`` (or ``decs``) messages for ``items``, cut at the server's limits.

        Items are :func:`wire_item` forms, already validated. A server that takes no map-form
        items (an older one) gets them as v1 arrays, without their txid, time, page and messages
        (still counted, no longer exactly merged). Decrements to a server that does not list
        ``decs`` raise :class:`~campaignstats.errors.LocalProtocolError`: the adapter drops them.
        """
        if self.state is not SessionState.READY:
            raise LocalProtocolError(f"increments in state {self.state.value}")
        if decrement and not self.accepts_decrements:
            raise LocalProtocolError(f"{self.server or 'the server'} takes no decrements")
        if not self.accepts_maps:
            items = [_as_array(item) for item in items]
        op = "decs" if decrement else "incs"
        step = self.limits.max_batch
        if len(items) <= step:
            return self._batch(op, items)
        return b"".join(self._batch(op, items[i : i + step]) for i in range(0, len(items), step))

    def _batch(self, op: str, items: Sequence[WireItem]) -> bytes:
        data = self._codec.cast(op, items)
        if len(data) <= self.limits.max_message or len(items) < 2:
            return data
        half = len(items) // 2  # long strings and maps: halve until each message fits
        return self._batch(op, items[:half]) + self._batch(op, items[half:])

    def send_metrics(self, updates: Sequence[dict[str, Any]]) -> bytes:
        """One ``["metric", UPDATE]`` message per update (validated maps). A server that does
        not list ``metric`` raises :class:`~campaignstats.errors.LocalProtocolError`: the
        adapter drops them."""
        if self.state is not SessionState.READY:
            raise LocalProtocolError(f"metrics in state {self.state.value}")
        if "metric" not in self.ops:
            raise LocalProtocolError(f"{self.server or 'the server'} takes no metrics")
        metric = self._codec.metric
        return b"".join([metric(update) for update in updates])

    def send_queued(self, runs: Iterable[tuple[bool, Sequence[WireItem]]]) -> bytes:
        """:meth:`send_changes` for runs of ``(decrement, items)`` taken from a client's queue."""
        return b"".join(self.send_changes(items, decrement=dec) for dec, items in runs)

    # -- receiving ------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the server, in any chunking; then call :meth:`next_event` until None."""
        if self.state is SessionState.IDLE:
            raise LocalProtocolError("data received with no connection")
        codec = self._codec
        try:
            self._inbox.extend(codec.receive_data(data))
        except BadFrame as exc:
            self._inbox.append(RemoteProtocolError(str(exc)))
            return
        if codec.error is not None:  # bad bytes after good messages: those come first
            self._inbox.append(RemoteProtocolError(str(codec.error)))

    def next_event(self) -> Event | None:
        """The next event, or None when more bytes are needed.

        Raises :class:`~campaignstats.errors.RemoteProtocolError` when the server broke the
        protocol (the events before the violation came out first): drop the connection, then
        call :meth:`connection_lost`.
        """
        while True:
            if self._outbox:
                return self._outbox.popleft()
            if self.state is SessionState.BROKEN or not self._inbox:
                return None
            message = self._inbox.popleft()
            try:
                event = self._handle(message)
            except RemoteProtocolError:
                self.state = SessionState.BROKEN
                raise
            if event is not None:
                return event

    def _handle(self, message: Pub | EventMessage | Ok | Err | RemoteProtocolError) -> Event | None:
        if isinstance(message, RemoteProtocolError):
            raise message
        if isinstance(message, EventMessage):
            if self.state is not SessionState.READY:
                raise RemoteProtocolError("an event before the hello was answered")
            if type(message.campaign_id) is not int or type(message.event) is not dict:
                raise RemoteProtocolError(f"a malformed event: {message!r:.80}")
            if message.campaign_id in self.subscriptions:
                return GoalEvent(message.campaign_id, message.event)
            return None
        if isinstance(message, Pub):
            if self.state is not SessionState.READY:
                raise RemoteProtocolError("a pub before the hello was answered")
            if type(message.campaign_id) is not int or type(message.stats) is not dict:
                raise RemoteProtocolError(f"a malformed pub: {message!r:.80}")
            if message.campaign_id in self.subscriptions:
                return Update(message.campaign_id, message.stats)
            return None  # unsubscribed meanwhile
        if message.req_id is None:
            if not isinstance(message, Err):
                raise RemoteProtocolError("an ok reply without a req_id")
            error = message.exception()
            if self.state is SessionState.GREETING:
                # Refused before the hello was read (overloaded: too many connections).
                return self._hello_failed(error)
            return ServerError(error)
        if not self._pending or self._pending[0].req_id != message.req_id:
            expected = self._pending[0].req_id if self._pending else None
            raise RemoteProtocolError(f"a reply to call {message.req_id!r}, expected {expected}")
        pending = self._pending.popleft()
        request = pending.request
        if isinstance(request, Hello):
            if isinstance(message, Err):
                return self._hello_failed(message.exception())
            return self._ready(message.result)
        if isinstance(message, Err):
            error = message.exception()
            if isinstance(request, Subscribe):
                self.subscriptions.discard(request.campaign_id)
            if pending.abandoned:
                return None
            return (
                ServerError(error) if pending.internal else Failed(message.req_id, request, error)
            )
        try:
            result = _result(request, message.result)
        except RemoteProtocolError as exc:
            if pending.internal or pending.abandoned:
                return ServerError(exc)
            return Failed(message.req_id, request, exc)
        if pending.internal:
            if isinstance(request, StatsMany):  # the refresh after a reconnection
                self._outbox.extend(
                    Update(cid, stats)
                    for cid, stats in result.items()
                    if cid in self.subscriptions and type(stats) is dict
                )
            return None
        if pending.abandoned:
            return None
        return Reply(message.req_id, request, result)

    def _hello_failed(self, error: ProtocolError) -> Failed:
        self.state = SessionState.BROKEN
        pending = self._pending[0] if self._pending else None
        req_id = pending.req_id if pending is not None else 0
        self._pending.clear()
        return Failed(req_id, self._hello, error)

    def _ready(self, result: Any) -> Ready:
        if type(result) is not dict or result.get("protocol") != PROTOCOL_VERSION:
            raise RemoteProtocolError(f"hello answered {result!r:.80}")
        server = result.get("server")
        ops = result.get("ops")
        self.server = server if type(server) is str else "unknown server"
        if isinstance(ops, list) and all(type(op) is str for op in ops):
            self.ops, self._listed_ops = frozenset(ops), True
        else:
            self.ops, self._listed_ops = V1_OPS, False
        self.limits = _check_limits(result.get("limits"))
        self.state = SessionState.READY
        return Ready(self.server, self.ops, self.limits)
