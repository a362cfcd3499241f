"""The server's side of the protocol as a sans-IO state machine (docs/protocol.md).

In the manner of h11's ``Connection``: :class:`ServerSession` turns a client's bytes into events
(:meth:`~ServerSession.receive_data`) and the answers into bytes (:meth:`~ServerSession.answer`,
:meth:`~ServerSession.fail`, :meth:`~ServerSession.pub`, then
:meth:`~ServerSession.data_to_send`). It never touches a socket or an event loop: the socket
server is an adapter that moves the bytes, hands the requests to the service and waits
(docs/design.md, "The house").

What it owns:

* hello and auth: with a token, the first message must be a ``hello`` carrying it (compared in
  constant time); anything else is answered ``unauthorized`` and the session is
  :attr:`~SessionState.CLOSING`. The ``hello`` reply lists the ops and the limits.
* request ids and reply order: each call gets a :class:`Slot` in a FIFO; replies leave in call
  order whatever order the answers come in (``ping`` is answered here, in its place).
* casts: the increments (or decrements, or metrics updates) of one :meth:`receive_data`
  travel as one batch (one mailbox message per read, not per item), cut only where a call must
  keep its place between them or the kind changes. Items the codec refused are answered at
  once; items the actor refuses later come back through :meth:`cast_rejected` with indices into
  that batch, and are named in each message's own numbering.
* errors: a readable but wrong message is answered ``err`` and the stream goes on; bytes that
  are not MessagePack are answered ``bad_frame`` and the session is ``CLOSING``. Error replies to
  casts and ``pub`` updates are best effort: they are dropped (and counted) while the peer has
  more than ``max_output`` bytes unread, as the adapter reports through ``unsent``.
"""

from __future__ import annotations

import enum
import hmac
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from campaignstats._version import __version__
from campaignstats.errors import (
    BadFrame,
    InternalError,
    Invalid,
    ProtocolError,
    Unauthorized,
)
from campaignstats.model import WireStats
from campaignstats.protocol import (
    PROTOCOL_VERSION,
    Batch,
    Call,
    Hello,
    Limits,
    Ping,
    Rejected,
    ServerCodec,
)
from campaignstats.requests import (
    Cast,
    Decrements,
    Increments,
    MetricUpdates,
    Request,
    Subscribe,
    Unsubscribe,
)

__all__ = [
    "CallReceived",
    "CastOrigin",
    "CastReceived",
    "Closing",
    "Event",
    "Greeted",
    "MessageRejected",
    "ServerSession",
    "SessionCounters",
    "SessionState",
    "Slot",
]

SERVER_NAME = f"campaignstats {__version__}"
_SHOWN_ITEMS = 50  # rejected items named in one error message


class SessionState(enum.Enum):
    GREETING = "greeting"  # a token is required and no hello has carried it yet
    OPEN = "open"
    CLOSING = "closing"  # a fatal error is in the output: send it, then close
    CLOSED = "closed"  # the connection is gone: nothing more is sent


@dataclass(slots=True)
class SessionCounters:
    """What sessions count; the server shares one instance between its connections."""

    rejected_messages: int = 0
    dropped_errors: int = 0
    dropped_pubs: int = 0
    bad_frames: int = 0
    unauthorized: int = 0


class Slot:
    """A call's place among the replies: answer it with :meth:`ServerSession.answer` or
    :meth:`ServerSession.fail`, once."""

    __slots__ = ("data", "req_id")

    def __init__(self, req_id: int, data: bytes | None = None) -> None:
        self.req_id = req_id
        self.data = data  # the encoded reply, once known


class CastOrigin:
    """Where a cast's items came from: the messages of one read, in order. Hand it back with
    :meth:`ServerSession.cast_rejected` (nothing is computed unless items are refused).

    ``held``: some of these messages had items the codec refused; their error waits for the
    actor's verdict on the rest, so that each message gets one error naming all its refused
    items. Ask the actor to report even when it refuses nothing.
    """

    __slots__ = ("held", "messages")

    def __init__(self, messages: list[Batch], held: bool) -> None:
        self.messages = messages
        self.held = held


def _op(message: Batch) -> str:
    if message.metric:
        return "metric"
    return ("dec" if message.decrement else "inc") + ("" if message.single else "s")


def _kind(message: Batch) -> tuple[bool, bool]:
    """Casts of one kind travel together: increments, decrements, metrics updates."""
    return message.metric, message.decrement


# -- events ---------------------------------------------------------------------------------------


class CallReceived(NamedTuple):
    """A call for the actor: answer ``slot`` with its result or error (in any order)."""

    slot: Slot
    request: Request


class CastReceived(NamedTuple):
    """Increments, decrements or metrics updates to apply; report the items the actor refuses
    with ``origin``."""

    cast: Cast
    origin: CastOrigin


@dataclass(frozen=True, slots=True)
class MessageRejected:
    """A message was answered with an error (already in the output): for logs and counters."""

    code: str
    reason: str


@dataclass(frozen=True, slots=True)
class Greeted:
    """A hello was accepted."""

    client: str | None


@dataclass(frozen=True, slots=True)
class Closing:
    """A fatal error was answered: send the output, then close the connection."""

    error: ProtocolError


Event = CallReceived | CastReceived | MessageRejected | Greeted | Closing


class ServerSession:
    """One connection's protocol state, from the server's side."""

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        token: str | None = None,
        subscriber: Any = None,
        max_output: int = 4 << 20,
        unsent: Callable[[], int] = lambda: 0,
        counters: SessionCounters | None = None,
        server_name: str = SERVER_NAME,
        hello_extra: dict[str, Any] | None = None,
    ) -> None:
        self.codec = ServerCodec(limits)
        self.limits = self.codec.limits
        self._token = None if token is None else token.encode()
        #: who receives this connection's ``pub`` updates (put into its Subscribe requests)
        self.subscriber = subscriber
        self.max_output = max_output
        #: bytes given to the transport but not yet taken by the peer (the adapter's probe)
        self.unsent = unsent
        self.counters = counters or SessionCounters()
        self.server_name = server_name
        #: more keys for the hello reply (a shard's ``"shard": [K, N]``, docs/scale.md)
        self.hello_extra = hello_extra
        self.state = SessionState.GREETING if token is not None else SessionState.OPEN
        #: a fatal error was answered, or the connection is gone: no more input is read
        self.closing = False
        self.subscribed = False
        self._pending: deque[Slot] = deque()
        self._out: list[bytes] = []
        self._out_size = 0
        self._answer_here: dict[type[Any], Callable[[list[Event], int, Any], Request | None]] = {
            Hello: self._hello,
            Ping: self._ping,
            Subscribe: self._subscribe,
            Unsubscribe: self._unsubscribe,
        }

    # -- bytes in -------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """The events completed by ``data``, in order. Nothing more comes once a
        :class:`Closing` has been returned."""
        if self.closing:
            return []
        events: list[Event] = []
        try:
            messages = self.codec.receive_data(data)
        except BadFrame as exc:
            self._fatal(events, None, exc)
            return events
        run: list[Batch] = []  # consecutive casts of one kind: one batch for the actor
        for msg in messages:
            if self.state is SessionState.GREETING and not (
                isinstance(msg, Call) and type(msg.request) is Hello
            ):
                self._cast_run(events, run)
                if isinstance(msg, Rejected) and msg.op == "hello":
                    # A hello that is malformed or of another protocol: its own error (not
                    # "unauthorized", which would blame a right token), then close.
                    self._close_with(msg.req_id, msg.error)
                    events.append(Closing(msg.error))
                    return events
                self._refuse(events, None if isinstance(msg, Batch) else msg.req_id)
                return events
            if isinstance(msg, Batch):
                if msg.rejected:
                    self._items_refused(events, msg)
                if msg.items:
                    if run and _kind(run[0]) != _kind(msg):
                        self._cast_run(events, run)
                    run.append(msg)
                continue
            self._cast_run(events, run)
            if isinstance(msg, Call):
                self._call(events, msg)
            else:
                self._rejected(events, msg)
            if self.closing:
                return events
        self._cast_run(events, run)
        if self.codec.error is not None:  # bad bytes after the messages just handled
            self._fatal(events, None, self.codec.error)
        return events

    def _cast_run(self, events: list[Event], run: list[Batch]) -> None:
        if not run:
            return
        if len(run) == 1:
            message = run[0]
            items: Sequence[Any] = message.items  # the hot path: no copy
            origin = CastOrigin([message], bool(message.rejected))
        else:
            merged: list[Any] = []
            held = False
            for message in run:
                merged.extend(message.items)
                held = held or bool(message.rejected)
            items = merged
            origin = CastOrigin(run.copy(), held)
        cast: Cast
        if run[0].metric:
            cast = MetricUpdates(items)
        else:
            cast = Decrements(items) if run[0].decrement else Increments(items)
        events.append(CastReceived(cast, origin))
        run.clear()

    def _call(self, events: list[Event], msg: Call) -> None:
        here = self._answer_here.get(type(msg.request), _forward)
        request = here(events, msg.req_id, msg.request)
        if request is None:  # answered here
            return
        slot = Slot(msg.req_id)
        self._pending.append(slot)
        events.append(CallReceived(slot, request))

    # The calls the session answers itself, or completes: each returns the request for the
    # actor, or None when it is answered already.

    def _hello(self, events: list[Event], req_id: int, hello: Hello) -> None:
        token = self._token
        if token is not None and not (
            hello.token is not None and hmac.compare_digest(hello.token.encode(), token)
        ):
            self._refuse(
                events,
                req_id,
                "wrong token in hello"
                if hello.token is not None
                else "this server needs a token in hello",
            )
            return
        self.state = SessionState.OPEN
        self._reply_now(
            req_id,
            {
                "protocol": PROTOCOL_VERSION,
                "server": self.server_name,
                "ops": self.codec.ops,
                "limits": self.limits.to_wire(),
                **(self.hello_extra or {}),
            },
        )
        events.append(Greeted(hello.client))

    def _ping(self, events: list[Event], req_id: int, _: Ping) -> None:
        self._reply_now(req_id, "pong")

    def _subscribe(self, events: list[Event], req_id: int, request: Subscribe) -> Subscribe:
        self.subscribed = True
        return Subscribe(request.campaign_id, self.subscriber)

    def _unsubscribe(self, events: list[Event], req_id: int, request: Unsubscribe) -> Unsubscribe:
        return Unsubscribe(request.campaign_id, self.subscriber)

    def _reply_now(self, req_id: int, result: Any) -> None:
        self._pending.append(Slot(req_id, self.codec.ok(req_id, result)))
        self._flush_replies()

    def _rejected(self, events: list[Event], msg: Rejected) -> None:
        self.counters.rejected_messages += 1
        events.append(MessageRejected(msg.error.code, str(msg.error)))
        if msg.req_id is None:
            self._best_effort(self.codec.err(None, msg.error), errors=True)
        else:  # a call's error keeps its place among the replies
            self._pending.append(Slot(msg.req_id, self.codec.err(msg.req_id, msg.error)))
            self._flush_replies()

    def _items_refused(self, events: list[Event], msg: Batch) -> None:
        self.counters.rejected_messages += 1
        op = _op(msg)
        events.append(MessageRejected("invalid", f"{len(msg.rejected)} {op} items"))
        if not msg.items:  # nothing of it goes to the actor: answer now
            error = _items_error(msg.rejected, single=msg.single, op=op)
            self._best_effort(self.codec.err(None, error), errors=True)
        # else the error is held until the actor has judged the rest (cast_rejected)

    def _refuse(
        self,
        events: list[Event],
        req_id: int | None,
        why: str = "a hello with the server's token must come first",
    ) -> None:
        self.counters.unauthorized += 1
        error = Unauthorized(why)
        self._close_with(req_id, error)
        events.append(Closing(error))

    def _fatal(self, events: list[Event], req_id: int | None, error: ProtocolError) -> None:
        self.counters.bad_frames += 1
        events.append(MessageRejected(error.code, str(error)))
        self._close_with(req_id, error)
        events.append(Closing(error))

    def _close_with(self, req_id: int | None, error: ProtocolError) -> None:
        # The fatal reply goes after the replies already due, so that the peer reads them too;
        # answers still pending are lost with the connection.
        self._flush_replies()
        self._pending.clear()
        self._write(self.codec.err(req_id, error))
        self.state = SessionState.CLOSING
        self.closing = True

    # -- answers in -----------------------------------------------------------------------------

    def answer(self, slot: Slot, result: Any) -> None:
        """The result of a call; it is sent once every call before it is answered."""
        if slot.data is not None or self.state is SessionState.CLOSED:
            return
        try:
            slot.data = self.codec.ok(slot.req_id, result)
        except Exception as exc:  # e.g. a count past what MessagePack can carry
            slot.data = self.codec.err(
                slot.req_id, InternalError(f"cannot encode the reply: {exc!r}")
            )
        self._flush_replies()

    def fail(self, slot: Slot, error: BaseException) -> None:
        """A call failed: its error code (``internal`` for anything that has none)."""
        if slot.data is not None or self.state is SessionState.CLOSED:
            return
        if not isinstance(error, ProtocolError):
            error = InternalError(str(error) or type(error).__name__)
        slot.data = self.codec.err(slot.req_id, error)
        self._flush_replies()

    def cast_rejected(self, origin: CastOrigin, rejected: list[tuple[int, str]]) -> None:
        """Items of a cast the actor refused, by their index in :attr:`CastReceived.cast`
        (an empty list when the origin is ``held`` and the actor refused nothing): one
        ``invalid`` error per message, naming each refused item, by the codec or the actor, in
        that message's own numbering."""
        if self.state is not SessionState.OPEN:
            return
        messages = origin.messages
        refused: list[list[tuple[int, str]] | None] = [
            list(m.rejected) if m.rejected else None for m in messages
        ]
        k = 0
        start, end = 0, len(messages[0].items)
        for index, reason in sorted(rejected):
            while index >= end:
                k += 1
                start, end = end, end + len(messages[k].items)
            message = messages[k]
            position = index - start
            if message.positions is not None:  # the codec refused some: its own numbering
                position = message.positions[position]
            mine = refused[k]
            if mine is None:
                mine = refused[k] = []
            mine.append((position, reason))
        for message, items in zip(messages, refused, strict=True):
            if items and message.single and len(message.items) > 1:
                # single messages decoded together: each refused item is a message of its own
                for _, reason in sorted(items):
                    self._best_effort(self.codec.err(None, Invalid(reason)), errors=True)
            elif items:
                items.sort()
                error = _items_error(items, single=message.single, op=_op(message))
                self._best_effort(self.codec.err(None, error), errors=True)

    def pub(self, campaign_id: int, stats: WireStats) -> None:
        """A subscribed campaign changed: a ``pub``, best effort."""
        if self.state is SessionState.OPEN:
            self._best_effort(self.codec.pub(campaign_id, stats), errors=False)

    def event(self, campaign_id: int, event: dict[str, Any]) -> None:
        """A subscribed campaign reached a goal: an ``event``, best effort like a ``pub``."""
        if self.state is SessionState.OPEN:
            self._best_effort(self.codec.event(campaign_id, event), errors=False)

    def connection_lost(self) -> None:
        """The connection is gone: pending calls will never be answered here."""
        self.state = SessionState.CLOSED
        self.closing = True
        self._pending.clear()
        self._out.clear()
        self._out_size = 0

    # -- bytes out ------------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Everything ready to send, in order; b"" when nothing is."""
        if not self._out:
            return b""
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        self._out_size = 0
        return data

    @property
    def has_output(self) -> bool:
        """Bytes are waiting in :meth:`data_to_send`."""
        return bool(self._out)

    @property
    def output_size(self) -> int:
        """Bytes waiting in :meth:`data_to_send`."""
        return self._out_size

    @property
    def pending_calls(self) -> int:
        """Calls not yet answered (or answered but waiting behind an earlier one)."""
        return len(self._pending)

    def _flush_replies(self) -> None:
        pending = self._pending
        while pending:
            data = pending[0].data
            if data is None:
                return
            pending.popleft()
            self._write(data)

    def _write(self, data: bytes) -> None:
        self._out.append(data)
        self._out_size += len(data)

    def _best_effort(self, data: bytes, *, errors: bool) -> None:
        if self.unsent() + self._out_size > self.max_output:
            if errors:
                self.counters.dropped_errors += 1
            else:
                self.counters.dropped_pubs += 1
            return
        self._write(data)


def _forward(events: list[Event], req_id: int, request: Request) -> Request:
    """A request for the actor, as it is."""
    return request


def _items_error(items: list[tuple[int, str]], *, single: bool, op: str) -> Invalid:
    if single:
        return Invalid(items[0][1])
    shown = "; ".join(f"[{i}] {reason}" for i, reason in items[:_SHOWN_ITEMS])
    more = f"; and {len(items) - _SHOWN_ITEMS} more" if len(items) > _SHOWN_ITEMS else ""
    return Invalid(f"{op} items rejected ({len(items)}): {shown}{more}")
