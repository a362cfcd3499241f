"""The socket server: TCP and Unix listeners speaking docs/protocol.md in front of the service.

An adapter only (docs/design.md, "The house"): each connection's protocol state lives in a
sans-IO :class:`~campaignstats.sessions.server.ServerSession` (hello and auth, request ids, reply
order, error replies, which rejected item was which), the mailbox is reached only through the
service (one :class:`~campaignstats.service.Producer` per connection), and this module moves
bytes, applies backpressure and waits.

Each connection is an :class:`asyncio.BufferedProtocol` on the loop's own transports (reads of
at most ``read_size`` bytes, into one buffer the server shares), not an anyio stream, on
purpose: the increments of a read reach the mailbox from ``data_received`` with no task switch
and no await (one mailbox message per read). Measured on the 2-core VM (2026-12-01):
a ping-pong of one small message per read over a socketpair costs 57-66 us per read with a
protocol and 89-90 us with an anyio ``SocketStream`` (receive and send awaited); in-process,
``data_received`` costs about 8 us for a read of one ``inc`` (6.5 us before the session layer
was added) and about 300 us for one ``incs`` of 1,000 (unchanged).

A read-only query is answered in the read callback itself when its connection has nothing of
its own still queued (docs/design.md, "Queries inline"): through the service's
:meth:`~campaignstats.service.Producer.read_now` and the actor's read door, with no mailbox
message and no task switch; its reply leaves in the read's one write. Otherwise it goes to the
mailbox and its reply is written in the actor's turn.

Writes never block: what a client does not read piles up in the transport's buffer, which is
bounded: past ``max_output`` bytes, error replies to casts and ``pub`` updates are dropped (and
counted) by the session, and a connection whose call replies cannot be delivered is closed. When
the mailbox is full, the connection stops reading its socket until the actor catches up (TCP then
pushes back on the client), so memory stays flat under any load. Every background task (backlog
drainers, the idle sweeper) belongs to the server's task group.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import structlog

from campaignstats.actor.actor import NOT_NOW
from campaignstats.errors import InternalError, Overloaded, StatsError
from campaignstats.model import WireStats
from campaignstats.protocol import Limits
from campaignstats.requests import READS, Info
from campaignstats.service import StatsService, TaskHost
from campaignstats.sessions.server import (
    CallReceived,
    CastOrigin,
    CastReceived,
    Closing,
    Greeted,
    MessageRejected,
    ServerSession,
    SessionCounters,
    Slot,
)

log = structlog.get_logger(__name__)

DEFAULT_PORT = 7400
#: 32 KiB: about 1,900 of the bench's increments in ``incs`` (17.6 bytes each), where the
#: event loop's own 256 KiB read held 15,000: several ms of decoding for a query to wait out
DEFAULT_READ_SIZE = 32 << 10
_LOG_EVERY = 10.0  # seconds between two logs of rejected messages from one connection
_LINGER = 2.0  # seconds a connection closed on an error still drains its input
_CLOSE_BACKLOG_TIMEOUT = 10.0  # seconds the server's close gives backlogs to reach the actor


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
    #: bytes taken from a socket in one read: what one read decodes on the event loop, while
    #: other connections' queries wait (docs/design.md, "One read, one batch")
    read_size: int = DEFAULT_READ_SIZE
    #: answer read-only queries in the read callback through the actor's read door when the
    #: ordering rule allows it (docs/design.md, "Queries inline"); False: always the mailbox
    inline_reads: bool = True


@dataclass(slots=True)
class ServerCounters(SessionCounters):
    connections_total: int = 0
    closed_slow: int = 0
    refused_connections: int = 0
    closed_idle: int = 0
    #: queries answered in the read callback, through the actor's read door
    reads_inline: int = 0


def _hello_extra(service: StatsService) -> dict[str, Any] | None:
    """A shard announces itself in the hello reply (docs/scale.md)."""
    shard = service.config.shard
    return None if shard is None else {"shard": shard.to_wire()}


class Connection(asyncio.BufferedProtocol):
    """One client. Also a subscriber: the actor pushes ``pub`` updates through :meth:`push`.

    A buffered protocol, so that a read takes at most ``read_size`` bytes (see
    :meth:`buffer_updated`); what a read brings is then handled as a plain protocol would. The
    buffer is the server's, shared by every connection: a read is copied out of it in the same
    callback that filled it, so an idle connection holds no buffer of its own.
    """

    def __init__(self, server: StatsServer) -> None:
        self.server = server
        self.service = server.service
        config = server.config
        self.producer = server.service.producer(inline_reads=config.inline_reads)
        self.session = ServerSession(
            config.limits,
            token=config.token,
            subscriber=self,
            max_output=config.max_output,
            unsent=self._unsent,
            counters=server.counters,
            hello_extra=_hello_extra(server.service),
        )
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.closed = False
        self._discarding = False  # closing after an error: input is read and dropped
        self._write_lost = False  # the peer went away under a write: logged once
        self._calls: set[asyncio.Future[Any]] = set()  # waiting on the actor
        self._drainer: asyncio.Task[None] | None = None
        self.last_active = time.monotonic()
        self._buffer = server.read_buffer
        self._last_log = 0.0
        self._unlogged = 0
        self._events: dict[type[Any], Callable[[Any], None]] = {
            CastReceived: self._cast,
            CallReceived: self._call,
            MessageRejected: self._rejected,
            Greeted: self._greeted,
            Closing: self._closing,
        }

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (asyncio's or uvloop's, which do not share a class).
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        server = self.server
        server.counters.connections_total += 1
        if server.closing:
            # Accepted as the server closed: after its last look at the connections, so no one
            # else would ever close this one.
            self.closed = True
            self.transport.abort()
            return
        if len(server.connections) >= server.config.max_connections:
            server.counters.refused_connections += 1
            log.warning("connection.refused", peer=self.peer, reason="too many connections")
            self.transport.write(self.session.codec.err(None, Overloaded("too many connections")))
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
        if self.session.subscribed:
            self.service.unwatch_nowait(self)
        self.session.connection_lost()
        # Calls still queued are given up: the actor skips them (a ``sub`` registers nothing).
        self.producer.close()
        for call in self._calls:
            call.cancel()
        self._calls.clear()
        if exc is not None:
            log.info("connection.lost", peer=self.peer, error=str(exc))
        else:
            log.debug("connection.closed", peer=self.peer)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        """A read of at most ``read_size`` bytes: decoded and handed on before the loop serves
        anything else, so that is the most a query on another connection waits for (a read
        completes at most the messages that end in it; each is decoded whole)."""
        self.data_received(self._buffer[:nbytes].tobytes())
        if nbytes == len(self._buffer) and self._drainer is None and not self.closed:
            # A full read: more is likely waiting. uvloop (libuv) would read again at once, up
            # to 32 times; pausing until the next turn of the loop serves the others first.
            assert self.transport is not None
            self.transport.pause_reading()
            asyncio.get_running_loop().call_soon(self._read_on)

    def _read_on(self) -> None:
        if self._drainer is None and not self.closed and not self.server.closing:
            assert self.transport is not None
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._discarding or self.closed:
            return
        self.last_active = time.monotonic()
        session = self.session
        handlers = self._events
        for event in session.receive_data(data):
            handlers[type(event)](event)
        if session.has_output:
            self._send()
        if session.closing:
            self.close_after_error()
        elif self.producer.backlog and self._drainer is None and not self.closed:
            # Stop reading: the client's writes now wait in its kernel buffers, not in our memory.
            if self.transport is not None:
                self.transport.pause_reading()
            if self.server.tasks.open:  # else the server is closing: what is held is lost
                self._drainer = self.server.tasks.spawn(self._drain(), name=f"drain {self.peer}")

    # -- events of the session -------------------------------------------------------------------

    def _cast(self, event: CastReceived) -> None:
        try:
            origin = event.origin
            self.producer.cast(
                event.cast, functools.partial(self._cast_rejected, origin), origin.held
            )
        except StatsError as exc:  # the actor has stopped: nothing will apply it
            log.warning("connection.cast_dropped", peer=self.peer, error=str(exc))

    def _cast_rejected(self, origin: CastOrigin, rejected: list[tuple[int, str]]) -> None:
        if not self.closed:
            self.session.cast_rejected(origin, rejected)
            self._send()

    def _call(self, event: CallReceived) -> None:
        slot, request = event.slot, event.request
        if not self.service.running:
            self.session.fail(slot, InternalError("the stats actor is not running"))
            return
        transform = self.server.add_info if type(request) is Info else None
        if self._read_now(slot, request, transform):
            return
        answered = functools.partial(self._answered, slot, transform)
        try:
            # The actor calls ``answered`` as it answers (the reply goes out in its turn of the
            # loop); the done callback covers the answers that do not come from it (a crash, a
            # stop, a cancellation), and does nothing for a slot already answered.
            reply = self.producer.call(request, answered)
        except StatsError as exc:
            self.session.fail(slot, InternalError(str(exc)))
            return
        self._calls.add(reply)
        reply.add_done_callback(answered)

    def _read_now(self, slot: Slot, request: Any, transform: Callable[[Any], Any] | None) -> bool:
        """A read-only query answered here, in the read callback, when the producer may
        (nothing of this connection's is still queued): no message, no task switch, and the
        reply leaves with this read's other output, in one write. False: ask the actor.

        The output bound holds as on the mailbox path, where each answer is written as it comes
        and a slow reader is closed past ``max_output``: once this read's replies and the
        transport's unsent bytes pass it, they are written now (and the next time, a reader
        that took none of them is closed). A query of a connection closed meanwhile is dropped
        (its answer would be, as in :meth:`_answered`); its other calls go on as before.
        """
        if self.closed and isinstance(request, READS):
            return True  # closed as a slow reader earlier in this read: no one to answer
        try:
            result = self.producer.read_now(request)
        except Exception as exc:  # the request's error, as the actor would have answered it
            self.server.counters.reads_inline += 1
            self.session.fail(slot, exc)
        else:
            if result is NOT_NOW:
                return False
            self.server.counters.reads_inline += 1  # before the reply: an info counts itself
            self._reply(slot, transform, result)
        if self.session.output_size + self._unsent() > self.server.config.max_output:
            self._send()
        return True

    def _answered(
        self, slot: Slot, transform: Callable[[Any], Any] | None, reply: asyncio.Future[Any]
    ) -> None:
        self._calls.discard(reply)
        if self.closed or slot.data is not None:  # gone, or answered already
            return
        session = self.session
        if reply.cancelled():
            session.fail(slot, InternalError("cancelled"))
        elif (exc := reply.exception()) is not None:
            session.fail(slot, exc)
        else:
            self._reply(slot, transform, reply.result())
        self._send()

    def _reply(self, slot: Slot, transform: Callable[[Any], Any] | None, result: Any) -> None:
        if transform is None:
            self.session.answer(slot, result)
            return
        try:
            self.session.answer(slot, transform(result))
        except Exception as error:
            log.exception("reply.transform_failed", peer=self.peer)
            self.session.fail(slot, InternalError(repr(error)))

    def _rejected(self, event: MessageRejected) -> None:
        self._log_rejected(event.code, event.reason)

    def _greeted(self, event: Greeted) -> None:
        log.debug("connection.hello", peer=self.peer, client=event.client)

    def _closing(self, event: Closing) -> None:
        if event.error.code == "unauthorized":
            log.warning("connection.unauthorized", peer=self.peer)

    def _log_rejected(self, code: str, reason: str) -> None:
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

    # -- backpressure ----------------------------------------------------------------------------

    async def _drain(self) -> None:
        try:
            await self.producer.drain()
        except StatsError as exc:  # the actor stopped with our backlog still waiting
            dropped = self.producer.close()
            log.warning(
                "connection.backlog_dropped", peer=self.peer, messages=dropped, error=str(exc)
            )
        finally:
            self._drainer = None
        if not self.closed and self.transport is not None and not self.server.closing:
            self.transport.resume_reading()

    # -- writing ---------------------------------------------------------------------------------

    def push(self, campaign_id: int, stats: WireStats) -> None:
        """A subscribed campaign changed (called by the actor)."""
        if not self.closed:
            self.session.pub(campaign_id, stats)
            self._send()

    def push_event(self, campaign_id: int, event: dict[str, Any]) -> None:
        """A subscribed campaign reached a goal (called by the actor; docs/protocol.md)."""
        if not self.closed:
            self.session.event(campaign_id, event)
            self._send()

    def _unsent(self) -> int:
        transport = self.transport
        return 0 if transport is None else transport.get_write_buffer_size()

    def _send(self) -> None:
        data = self.session.data_to_send()
        transport = self.transport
        if not data or transport is None or self.closed:
            return
        if transport.is_closing():
            # The peer went away (a reset seen by an earlier write) and connection_lost has not
            # run yet: asyncio logs a warning for every write from here on, so stop writing.
            if not self._write_lost:
                self._write_lost = True
                log.info("connection.write_after_loss", peer=self.peer)
            return
        if transport.get_write_buffer_size() > self.server.config.max_output:
            # Replies to calls must not be dropped (the session drops what may be): a client that
            # does not read them is gone.
            self.server.counters.closed_slow += 1
            log.warning("connection.closed_slow_reader", peer=self.peer)
            self.closed = True
            transport.abort()
            return
        transport.write(data)

    # -- the server's view -----------------------------------------------------------------------

    @property
    def backlog(self) -> int:
        return self.producer.backlog

    @property
    def drainer(self) -> asyncio.Task[None] | None:
        return self._drainer

    def stop_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    @property
    def subscribed(self) -> bool:
        return self.session.subscribed

    @property
    def busy(self) -> bool:
        """Waiting on the actor (replies or a backlog): not idle, whatever the clock says."""
        return bool(self.session.pending_calls or self.producer.backlog)

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
        if transport is None or self._discarding or self.closed:
            return
        self._discarding = True  # input from now on is read and dropped
        if transport.can_write_eof():
            transport.write_eof()
            asyncio.get_running_loop().call_later(_LINGER, transport.abort)
        else:
            self.closed = True
            transport.close()


class StatsServer:
    """TCP and/or Unix-socket listeners in front of a :class:`StatsService`."""

    def __init__(self, service: StatsService, config: ServerConfig | None = None, **kw: Any):
        self.service = service
        self.config = config or ServerConfig(**kw)
        self.connections: set[Connection] = set()
        if self.config.read_size < 1:
            raise ValueError(f"read_size must be at least 1 byte, not {self.config.read_size}")
        #: every connection's reads land here first (see Connection.buffer_updated)
        self.read_buffer = memoryview(bytearray(self.config.read_size))
        self.counters = ServerCounters()
        #: the server's background tasks: backlog drainers and the idle sweeper
        self.tasks = TaskHost("campaignstats-server")
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None
        self.closing = False
        self.port: int | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        config = self.config
        await self.tasks.start()
        try:
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
        except BaseException:
            for server in self._servers:
                server.close()
            await self.tasks.close(0)
            raise
        if config.idle_timeout > 0:
            self._sweeper = self.tasks.spawn(
                self._close_idle(config.idle_timeout), name="campaignstats-idle-sweeper"
            )

    async def _close_idle(self, timeout: float) -> None:
        while True:
            await asyncio.sleep(min(timeout / 4, 5.0))
            limit = time.monotonic() - timeout
            for conn in list(self.connections):
                if conn.last_active < limit and not conn.subscribed and not conn.busy:
                    self.counters.closed_idle += 1
                    log.info("connection.closed_idle", peer=conn.peer, idle_timeout=timeout)
                    conn.close()

    async def close(self, timeout: float = _CLOSE_BACKLOG_TIMEOUT + 5.0) -> None:
        """Stop accepting and close every connection (the service keeps running).

        Takes at most ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in self._servers:
            server.close()
        # What connections decoded but could not queue yet (the mailbox was full) has been
        # received: hand it to the actor before closing, within a bound.
        for conn in self.connections:
            conn.stop_reading()
        drainers = [c.drainer for c in self.connections if c.drainer is not None]
        if drainers:
            await asyncio.wait(drainers, timeout=min(_CLOSE_BACKLOG_TIMEOUT, timeout / 2))
            lost = sum(conn.backlog for conn in self.connections)
            if lost:
                log.error("server.close_backlog_lost", messages=lost)
        for conn in list(self.connections):
            conn.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), max(0.0, deadline - loop.time()))
        self._servers.clear()
        await self.tasks.close(max(0.0, deadline - loop.time()))
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
            "reads_inline": counters.reads_inline,
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
