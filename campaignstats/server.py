"""The socket server: TCP and Unix listeners speaking shared/PROTOCOL.md to the stats actor.

Each connection is an :class:`asyncio.Protocol`: bytes go through the pure
:class:`~campaignstats.protocol.ServerCodec`, and every read becomes at most a few mailbox
messages: the increments of a read travel as one batch, split only where a call must keep its
place between them (a ``flush`` after increments is answered after they are applied).

Replies keep call order per connection: each call takes a slot in a FIFO, and a slot is written
only when every slot before it is. Writes never block: what a client does not read piles up in
the transport's buffer, which is bounded: past ``max_output`` bytes, error replies to casts and
``pub`` updates are dropped (and counted), and a connection whose call replies cannot be
delivered is closed. When the mailbox is full, the connection stops reading its socket until the
actor catches up (TCP then pushes back on the client), so memory stays flat under any load.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import socket
import stat
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import structlog

from campaignstats._version import __version__
from campaignstats.actor.messages import (
    READS,
    Ask,
    Flush,
    GetInfo,
    GetStats,
    GetStatsMany,
    Increments,
    Message,
    Resync,
    Subscribe,
    Unsubscribe,
)
from campaignstats.errors import (
    BadFrame,
    InternalError,
    Invalid,
    Overloaded,
    ProtocolError,
    StatsError,
    Unauthorized,
)
from campaignstats.model import IncrementLike, WireStats
from campaignstats.protocol import (
    PROTOCOL_VERSION,
    FlushReq,
    Hello,
    Incs,
    InfoReq,
    Limits,
    Ping,
    Rejected,
    ResyncReq,
    ServerCodec,
    StatsManyReq,
    StatsReq,
    SubReq,
    UnsubReq,
)
from campaignstats.service import StatsService

log = structlog.get_logger(__name__)

DEFAULT_PORT = 7400
_LOG_EVERY = 10.0  # seconds between two logs of rejected messages from one connection
_LINGER = 2.0  # seconds a connection closed on an error still drains its input


@dataclass(slots=True)
class ServerConfig:
    host: str | None = "127.0.0.1"  # None: no TCP listener
    port: int = DEFAULT_PORT
    unix_path: Path | None = None
    unix_mode: int = 0o660
    token: str | None = None
    limits: Limits = field(default_factory=Limits)
    max_connections: int = 10_000
    max_output: int = 4 << 20  # bytes a client may leave unread before we drop or disconnect
    #: seconds without a byte from a client before its connection is closed (0: never);
    #: connections with subscriptions wait for pubs and are exempt
    idle_timeout: float = 900.0


@dataclass(slots=True)
class ServerCounters:
    connections_total: int = 0
    rejected_messages: int = 0
    dropped_errors: int = 0
    dropped_pubs: int = 0
    closed_slow: int = 0
    bad_frames: int = 0
    refused_connections: int = 0
    unauthorized: int = 0
    closed_idle: int = 0


class _Slot:
    """A reply's place in a connection's FIFO."""

    __slots__ = ("data", "future", "req_id", "transform")

    def __init__(
        self,
        req_id: int,
        future: asyncio.Future[Any] | None = None,
        data: bytes | None = None,
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        self.req_id = req_id
        self.future = future
        self.data = data
        self.transform = transform


class Connection(asyncio.Protocol):
    """One client. Also a subscriber: the actor pushes ``pub`` updates through :meth:`push`."""

    def __init__(self, server: StatsServer) -> None:
        self.server = server
        self.service = server.service
        self.codec = ServerCodec(server.config.limits)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.authenticated = server.config.token is None
        self.closed = False
        self._replies: deque[_Slot] = deque()
        self._backlog: deque[Message] = deque()  # waiting for room in the mailbox
        self._drainer: asyncio.Task[None] | None = None
        self._subscribed = False
        self._last_sequence = 0  # of this connection's last message in the mailbox's normal lane
        self.last_active = time.monotonic()
        self._last_log = 0.0
        self._unlogged = 0

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (asyncio's or uvloop's, which do not share a class).
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        server = self.server
        server.counters.connections_total += 1
        if len(server.connections) >= server.config.max_connections:
            server.counters.refused_connections += 1
            log.warning("connection.refused", peer=self.peer, reason="too many connections")
            self._write_error(None, Overloaded("too many connections"))
            self.close_after_error()
            return
        server.connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        log.debug("connection.open", peer=self.peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self._drainer is not None:
            self._drainer.cancel()
        if self._subscribed:
            self.service.unwatch_nowait(self)
        for slot in self._replies:
            if slot.future is not None:
                slot.future.cancel()
        self._replies.clear()
        self._backlog.clear()
        if exc is not None:
            log.info("connection.lost", peer=self.peer, error=str(exc))
        else:
            log.debug("connection.closed", peer=self.peer)

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        try:
            messages = self.codec.receive_data(data)
        except BadFrame as exc:
            self._bad_frame(exc)
            return
        batch: list[IncrementLike] | None = None
        segments: list[tuple[int, Incs]] | None = None
        for msg in messages:
            kind = type(msg)
            if not self.authenticated and kind is not Hello:
                self._refuse(msg)
                return
            if kind is Incs:
                if msg.rejected:  # type: ignore[union-attr]
                    self._reject_items(msg)  # type: ignore[arg-type]
                if not msg.items:  # type: ignore[union-attr]
                    continue
                if batch is None:
                    batch, segments = [], []
                segments.append((len(batch), msg))  # type: ignore[union-attr,arg-type]
                batch.extend(msg.items)  # type: ignore[union-attr]
                continue
            if batch is not None:
                self._submit(Increments(batch, self._rejection_reporter(segments or [])))
                batch = segments = None
            if kind is Rejected:
                self._on_rejected(msg)  # type: ignore[arg-type]
            else:
                self._on_call(msg)
            if self.closed:
                return
        if batch is not None:
            self._submit(Increments(batch, self._rejection_reporter(segments or [])))
        if self.codec.error is not None:  # bad bytes after the messages just handled
            self._bad_frame(self.codec.error)

    def _bad_frame(self, exc: BadFrame) -> None:
        self.server.counters.bad_frames += 1
        self._log_rejected("bad_frame", str(exc))
        self._write_error(None, exc)
        self.close_after_error()

    # -- calls -----------------------------------------------------------------------------------

    def _on_call(self, msg: Any) -> None:
        kind = type(msg)
        if kind is StatsReq:
            self._ask(msg.req_id, GetStats(msg.campaign_id))
        elif kind is StatsManyReq:
            self._ask(msg.req_id, GetStatsMany(msg.campaign_ids))
        elif kind is FlushReq:
            self._ask(msg.req_id, Flush())
        elif kind is Ping:
            self._reply_now(msg.req_id, "pong")
        elif kind is InfoReq:
            self._ask(msg.req_id, GetInfo(), self.server.add_info)
        elif kind is ResyncReq:
            self._ask(msg.req_id, Resync(msg.scope))
        elif kind is SubReq:
            self._subscribed = True
            self._ask(msg.req_id, Subscribe(msg.campaign_id, self))
        elif kind is UnsubReq:
            self._ask(msg.req_id, Unsubscribe(msg.campaign_id, self))
        elif kind is Hello:
            self._hello(msg)

    def _hello(self, msg: Hello) -> None:
        token = self.server.config.token
        if token is not None and not (
            msg.token is not None and hmac.compare_digest(msg.token.encode(), token.encode())
        ):
            self._refuse(msg)
            return
        self.authenticated = True
        log.debug("connection.hello", peer=self.peer, client=msg.client)
        self._reply_now(
            msg.req_id, {"protocol": PROTOCOL_VERSION, "server": f"campaignstats {__version__}"}
        )

    def _refuse(self, msg: Any) -> None:
        self.server.counters.unauthorized += 1
        log.warning("connection.unauthorized", peer=self.peer)
        req_id = getattr(msg, "req_id", None)
        self._write_error(req_id, Unauthorized("a hello with the server's token must come first"))
        self.close_after_error()

    def _ask(
        self, req_id: int, request: Any, transform: Callable[[Any], Any] | None = None
    ) -> None:
        if not self.service.running:
            self._reply_error_in_order(req_id, InternalError("the stats actor is not running"))
            return
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        slot = _Slot(req_id, future=future, transform=transform)
        self._replies.append(slot)
        future.add_done_callback(self._on_reply_ready)
        if (
            isinstance(request, READS)
            and not self._backlog
            and self.service.mailbox.taken_up_to(self._last_sequence)
        ):
            # Ahead of other connections' queued increments; never ahead of this connection's
            # own (read your writes). The reply order is kept by the slots anyway.
            try:
                self.service.mailbox.put_read_nowait(Ask(request, future))
                return
            except Overloaded:
                pass
        self._submit(Ask(request, future))

    def _reply_now(self, req_id: int, result: Any) -> None:
        if self._replies:  # keep the order behind calls still waiting on the actor
            self._replies.append(_Slot(req_id, data=self.codec.ok(req_id, result)))
        else:
            self._write_reply(self.codec.ok(req_id, result))

    def _reply_error_in_order(self, req_id: int, error: ProtocolError) -> None:
        data = self.codec.err(req_id, error)
        if self._replies:
            self._replies.append(_Slot(req_id, data=data))
        else:
            self._write_reply(data)

    def _on_reply_ready(self, _: asyncio.Future[Any]) -> None:
        replies = self._replies
        while replies:
            slot = replies[0]
            if slot.future is not None and not slot.future.done():
                return
            replies.popleft()
            self._write_reply(self._encode_reply(slot))
            if self.closed:
                return

    def _encode_reply(self, slot: _Slot) -> bytes:
        if slot.future is None:
            return slot.data  # type: ignore[return-value]
        codec = self.codec
        if slot.future.cancelled():
            return codec.err(slot.req_id, InternalError("cancelled"))
        if (exc := slot.future.exception()) is not None:
            error = exc if isinstance(exc, ProtocolError) else InternalError(str(exc))
            return codec.err(slot.req_id, error)
        try:
            result = slot.future.result()
            if slot.transform is not None:
                result = slot.transform(result)
            return codec.ok(slot.req_id, result)
        except Exception as exc:  # e.g. a count past what MessagePack can carry
            log.exception("reply.encode_failed", peer=self.peer)
            return codec.err(slot.req_id, InternalError(f"cannot encode the reply: {exc!r}"))

    # -- increments and backpressure -------------------------------------------------------------

    def _submit(self, message: Message) -> None:
        if self._backlog:
            self._backlog.append(message)
            return
        try:
            self._last_sequence = self.service.mailbox.put_nowait(message)
        except Overloaded:
            # Stop reading: the client's writes now wait in its kernel buffers, not in our memory.
            self._backlog.append(message)
            if self.transport is not None:
                self.transport.pause_reading()
            self._drainer = asyncio.get_running_loop().create_task(self._drain_backlog())

    async def _drain_backlog(self) -> None:
        try:
            while self._backlog:
                self._last_sequence = await self.service.mailbox.put(self._backlog[0])
                self._backlog.popleft()
        finally:
            self._drainer = None
        if not self.closed and self.transport is not None and not self.server.closing:
            self.transport.resume_reading()

    def _rejection_reporter(
        self, segments: list[tuple[int, Incs]]
    ) -> Callable[[list[tuple[int, str]]], None]:
        """Map the actor's rejections (indices into the read's batch) back to each message."""

        def report(rejected: list[tuple[int, str]]) -> None:
            if self.closed:
                return
            starts = [start for start, _ in segments]
            per_message: dict[int, list[tuple[int, str]]] = {}
            for index, reason in rejected:
                n = bisect_right(starts, index) - 1
                start, msg = segments[n]
                per_message.setdefault(n, []).append((_original_index(msg, index - start), reason))
            for n, items in per_message.items():
                msg = segments[n][1]
                self._write_error(None, _items_error(items, single=msg.single))

        return report

    def _reject_items(self, msg: Incs) -> None:
        self._log_rejected("invalid", f"{len(msg.rejected)} incs items")
        self._write_error(None, _items_error(msg.rejected, single=msg.single))

    def _on_rejected(self, msg: Rejected) -> None:
        self._log_rejected(msg.error.code, str(msg.error))
        if msg.req_id is None:
            self._write_error(None, msg.error)
        else:
            self._reply_error_in_order(msg.req_id, msg.error)

    def _log_rejected(self, code: str, reason: str) -> None:
        self.server.counters.rejected_messages += 1
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY:  # one line per connection per period
            log.warning(
                "message.rejected",
                peer=self.peer,
                code=code,
                reason=reason,
                since_last=self._unlogged,
            )
            self._last_log = now
            self._unlogged = 0
        else:
            self._unlogged += 1

    # -- writing ---------------------------------------------------------------------------------

    def push(self, campaign_id: int, stats: WireStats) -> None:
        """A subscribed campaign changed (called by the actor)."""
        if self.closed or self.transport is None:
            return
        if self.transport.get_write_buffer_size() > self.server.config.max_output:
            self.server.counters.dropped_pubs += 1
            return
        self.transport.write(self.codec.pub(campaign_id, stats))

    def _write_error(self, req_id: int | None, error: ProtocolError) -> None:
        """An error reply to a cast or an unreadable message: best effort."""
        transport = self.transport
        if self.closed or transport is None:
            return
        if transport.get_write_buffer_size() > self.server.config.max_output:
            self.server.counters.dropped_errors += 1
            return
        transport.write(self.codec.err(req_id, error))

    def _write_reply(self, data: bytes) -> None:
        transport = self.transport
        if self.closed or transport is None:
            return
        if transport.get_write_buffer_size() > self.server.config.max_output:
            # Replies to calls must not be dropped; a client that does not read them is gone.
            self.server.counters.closed_slow += 1
            log.warning("connection.closed_slow_reader", peer=self.peer)
            transport.abort()
            return
        transport.write(data)

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    @property
    def drainer(self) -> asyncio.Task[None] | None:
        return self._drainer

    def stop_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    @property
    def subscribed(self) -> bool:
        return self._subscribed

    @property
    def busy(self) -> bool:
        """Waiting on the actor (replies or a backlog): not idle, whatever the clock says."""
        return bool(self._replies or self._backlog)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    def close_after_error(self) -> None:
        """Close after a fatal error reply, making sure the peer can read that reply.

        Closing a socket with unread input makes the kernel send a reset, which destroys the
        reply on its way. So: send the reply and our end of stream (half-close), keep reading and
        discarding what the peer still sends, and drop the connection a moment later.
        """
        transport = self.transport
        if transport is None or self.closed:
            return
        self.closed = True  # no more replies or processing
        self.data_received = self._discard  # type: ignore[method-assign]
        if transport.can_write_eof():
            transport.write_eof()
            asyncio.get_running_loop().call_later(_LINGER, transport.abort)
        else:
            transport.close()

    def _discard(self, data: bytes) -> None:
        pass


def _original_index(msg: Incs, position: int) -> int:
    """The index in the client's ``incs`` of the ``position``-th item that passed the codec."""
    if not msg.rejected:
        return position
    skipped = {i for i, _ in msg.rejected}
    seen = -1
    for i in range(len(msg.items) + len(msg.rejected)):
        if i not in skipped:
            seen += 1
            if seen == position:
                return i
    return position


def _items_error(items: list[tuple[int, str]], *, single: bool) -> Invalid:
    if single:
        return Invalid(items[0][1])
    shown = "; ".join(f"[{i}] {reason}" for i, reason in items[:50])
    more = f"; and {len(items) - 50} more" if len(items) > 50 else ""
    return Invalid(f"incs items rejected ({len(items)}): {shown}{more}")


class StatsServer:
    """TCP and/or Unix-socket listeners in front of a :class:`StatsService`."""

    def __init__(self, service: StatsService, config: ServerConfig | None = None, **kw: Any):
        self.service = service
        self.config = config or ServerConfig(**kw)
        self.connections: set[Connection] = set()
        self.counters = ServerCounters()
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None
        self.closing = False
        self.port: int | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        config = self.config
        if config.host is not None:
            server = await loop.create_server(
                lambda: Connection(self), config.host, config.port, reuse_address=True
            )
            self._servers.append(server)
            self.port = server.sockets[0].getsockname()[1]
            log.info("server.listening", transport="tcp", host=config.host, port=self.port)
        if config.unix_path is not None:
            path = Path(config.unix_path)
            _remove_stale_socket(path)
            server = await loop.create_unix_server(lambda: Connection(self), str(path))
            os.chmod(path, config.unix_mode)
            self._servers.append(server)
            log.info("server.listening", transport="unix", path=str(path))
        if not self._servers:
            raise ValueError("nothing to listen on: give a host or a Unix socket path")
        if config.idle_timeout > 0:
            self._sweeper = asyncio.create_task(self._close_idle(config.idle_timeout))

    async def _close_idle(self, timeout: float) -> None:
        while True:
            await asyncio.sleep(min(timeout / 4, 5.0))
            limit = time.monotonic() - timeout
            for conn in list(self.connections):
                if conn.last_active < limit and not conn.subscribed and not conn.busy:
                    self.counters.closed_idle += 1
                    log.info("connection.closed_idle", peer=conn.peer, idle_timeout=timeout)
                    conn.close()

    async def close(self) -> None:
        """Stop accepting and close every connection (the service keeps running)."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for server in self._servers:
            server.close()
        # What connections decoded but could not queue yet (the mailbox was full) has been
        # received: hand it to the actor before closing, within a bound.
        for conn in self.connections:
            conn.stop_reading()
        drainers = [c.drainer for c in self.connections if c.drainer is not None]
        if drainers:
            await asyncio.wait(drainers, timeout=10)
            lost = sum(conn.backlog for conn in self.connections)
            if lost:
                log.error("server.close_backlog_lost", messages=lost)
        for conn in list(self.connections):
            conn.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
        self._servers.clear()
        if self.config.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.unix_path)
        log.info("server.closed")

    def add_info(self, info: dict[str, Any]) -> dict[str, Any]:
        counters = self.counters
        info = dict(info)
        info["server"] = {
            "connections": len(self.connections),
            "connections_total": counters.connections_total,
            "rejected_messages": counters.rejected_messages,
            "dropped_errors": counters.dropped_errors,
            "dropped_pubs": counters.dropped_pubs,
            "closed_slow_readers": counters.closed_slow,
            "bad_frames": counters.bad_frames,
            "refused_connections": counters.refused_connections,
            "unauthorized": counters.unauthorized,
            "closed_idle": counters.closed_idle,
            "auth": self.config.token is not None,  # never the token itself
            "limits": {
                "max_message": self.config.limits.max_message,
                "max_batch": self.config.limits.max_batch,
                "max_string": self.config.limits.max_string,
                "max_connections": self.config.max_connections,
                "max_output": self.config.max_output,
                "idle_timeout": self.config.idle_timeout,
            },
        }
        info["rejected"] = info.get("rejected", 0) + counters.rejected_messages
        return info


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by a dead server; refuse to steal a live one's."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StatsError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink()
        return
    finally:
        probe.close()
    raise StatsError(f"another server is listening on {path}")
