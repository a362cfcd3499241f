"""The blocking client: :class:`StatsClient`, for Django, Flask and other threaded code.

    stats = StatsClient("unix:///run/campaignstats.sock")   # one per process, shared by threads
    stats.increment(campaign_id=1, org_id=2, action_type="register", new_supporter=True)
    stats.stats(1)

An adapter over :class:`~campaignstats.sessions.client.ClientSession`, which owns the protocol:
this module only moves bytes between sockets and sessions and waits, the blocking way. As in
redis-py, a call runs on the caller's own thread, on a connection taken from a small pool (one
socket and one session each, used by one thread at a time) and given back after the reply; there
is no reader thread and no hand-off. Only increments go through the background: ``increment()``
appends to a bounded queue, and one daemon sender thread turns it into ``incs`` batches on a
connection of its own, reconnecting with backoff. :meth:`StatsClient.flush` uses that same
connection (the server's ``flush`` covers what came before it on its connection).

Forking (gunicorn with ``--preload``, multiprocessing) is handled: in a child process every live
client starts with an empty queue and no connection, and opens its own on first use, instead of
writing into the parent's sockets. At interpreter exit, clients not yet closed are closed (what
is queued gets ``close_timeout`` seconds to go out). Both hooks are registered once for the
module, over a weak set of the live clients: a closed client leaves nothing behind.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import select
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar

from campaignstats.client._common import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    DEFAULT_BATCH_SIZE,
    DEFAULT_CLOSE_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_QUEUE_SIZE,
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    GUARD_MAX_STRING,
    MAX_PENDING_EVENTS,
    Address,
    Backoff,
    ClientOptions,
    ClientStatistics,
    IncrementQueue,
    Queued,
    RateLimitedLog,
    call_timeout,
    check_scope,
    goals_request,
    history_call,
    log,
    org_stats_call,
    page_stats_call,
    parse_url,
    take_runs,
)
from campaignstats.errors import (
    CallTimeout,
    ClientClosed,
    ConnectTimeout,
    ProtocolError,
    RemoteProtocolError,
    ServerUnavailable,
    StatsError,
)
from campaignstats.model import WireStats
from campaignstats.protocol import CallRequest, Limits, Ping
from campaignstats.requests import (
    Flush,
    GetGoals,
    GetMetrics,
    Info,
    ResetMetrics,
    Resync,
    Stats,
    StatsMany,
    Subscribe,
    Unsubscribe,
    guard_request,
    recent_request,
    top_request,
)
from campaignstats.sessions.client import (
    ClientSession,
    Event,
    Failed,
    GoalEvent,
    Ready,
    Reply,
    ServerError,
    Update,
)

__all__ = ["StatsClient", "Subscription"]

_RECV_SIZE = 1 << 16

OnEvent = Callable[[Event], None]


def _ignore(event: Event) -> None:
    pass


class _Connection:
    """One socket and its session, used by one thread at a time.

    Any failure on the socket (an error, a timeout mid-write or mid-read) leaves the stream in
    an unknown state, so the connection is closed and never used again.

    The socket is non-blocking once connected, and waits are ``poll()`` calls with the time left
    to the deadline: a call is one poll to see that the idle connection is still there, one send,
    one poll for the reply and one recv. (A socket with a timeout costs a poll before every send
    and recv, and changing the timeout costs a system call of its own.)
    """

    def __init__(self, sock: socket.socket, session: ClientSession, address: Address) -> None:
        self.sock = sock
        self.session = session
        self.address = address
        self.closed = False
        sock.setblocking(False)
        self._readable = select.poll()
        self._readable.register(sock, select.POLLIN)
        self._writable: select.poll | None = None  # made when a send first has to wait
        #: replies are read into this buffer (a bytes object of _RECV_SIZE per recv() would be
        #: allocated and shrunk on every call) and copied out at their own size
        self._buffer = memoryview(bytearray(_RECV_SIZE))

    @classmethod
    def open(cls, address: Address, session: ClientSession, timeout: float) -> _Connection:
        """Connect and say hello; raises ServerUnavailable, ConnectTimeout or the hello's error."""
        deadline = time.monotonic() + timeout
        try:
            if address.kind == "tcp":
                sock = socket.create_connection((address.host_or_path, address.port), timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(timeout)
                    sock.connect(address.host_or_path)
                except BaseException:
                    sock.close()
                    raise
        except TimeoutError:
            raise ConnectTimeout(f"no connection to {address} within {timeout:.3g} s") from None
        except OSError as exc:
            raise ServerUnavailable(f"cannot connect to {address}: {exc}") from exc
        conn = cls(sock, session, address)
        try:
            conn._write(session.connect(), deadline)
            while True:
                event = conn._next(deadline)
                if isinstance(event, Ready):
                    return conn
                if isinstance(event, Failed):
                    raise event.error
        except BaseException as exc:
            conn.close()
            if isinstance(exc, CallTimeout):
                raise ConnectTimeout(f"no answer to hello from {address} in time") from None
            raise

    def _write(self, data: bytes, deadline: float) -> None:
        sock = self.sock
        try:
            sent = _send(sock, data)
            if sent < len(data):  # the kernel's buffer is full: wait for room, until the deadline
                view = memoryview(data)[sent:]
                if self._writable is None:
                    self._writable = select.poll()
                    self._writable.register(sock, select.POLLOUT)
                while view:
                    if not self._writable.poll(_poll_ms(deadline)):
                        raise TimeoutError
                    view = view[_send(sock, view) :]
        except TimeoutError:
            self.close()
            raise CallTimeout(f"{self.address} did not take our bytes in time") from None
        except OSError as exc:
            self.close()
            raise ServerUnavailable(f"connection to {self.address} lost: {exc}") from exc

    def _next(self, deadline: float | None, *, keep: bool = False) -> Event:
        """The next event, reading the socket as needed (until ``deadline``; None: forever).

        A timeout closes the connection (a reply may still come, in a place no one expects),
        unless ``keep``: waiting for a pub that did not come breaks nothing.
        """
        session = self.session
        while True:
            try:
                event = session.next_event()
            except RemoteProtocolError:
                self.close()
                raise
            if event is not None:
                return event
            if self.closed:
                raise ServerUnavailable(f"connection to {self.address} closed")
            try:
                if not self._readable.poll(None if deadline is None else _poll_ms(deadline)):
                    raise TimeoutError
                size = self.sock.recv_into(self._buffer)
            except BlockingIOError:
                continue  # woken for nothing: wait again
            except TimeoutError:
                if not keep:
                    self.close()
                raise CallTimeout(f"no answer from {self.address} in time") from None
            except OSError as exc:
                self.close()
                raise ServerUnavailable(f"connection to {self.address} lost: {exc}") from exc
            if not size:
                self.close()
                raise ServerUnavailable(f"{self.address} closed the connection")
            session.receive_data(self._buffer[:size].tobytes())

    def call(self, request: CallRequest, deadline: float, on_event: OnEvent) -> Any:
        """Send ``request`` and wait for its reply; other events go to ``on_event``."""
        req_id, data = self.session.send(request)
        self._write(data, deadline)
        while True:
            event = self._next(deadline)
            if isinstance(event, Reply | Failed) and event.req_id == req_id:
                if isinstance(event, Failed):
                    raise event.error
                return event.result
            on_event(event)

    def write(self, data: bytes, deadline: float) -> None:
        self._write(data, deadline)

    def poll(self, on_event: OnEvent) -> None:
        """Handle what the server sent meanwhile (errors about casts), without waiting."""
        while self.readable():
            try:
                data = self.sock.recv(_RECV_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError:
                self.close()
                return
            if not data:
                self.close()
                return
            self.session.receive_data(data)
            try:
                while (event := self.session.next_event()) is not None:
                    on_event(event)
            except RemoteProtocolError:
                self.close()
                return

    def readable(self) -> bool:
        if self.closed:
            return False
        try:
            return bool(self._readable.poll(0))
        except (OSError, ValueError):
            self.close()
            return False

    def alive(self) -> bool:
        """Whether the server kept this connection: an idle socket with bytes waiting or at
        end-of-file has been closed by the server (or holds what nobody asked for)."""
        if self.closed:
            return False
        if self.readable():
            self.close()
            return False
        return True

    def looks_connected(self) -> bool:
        """Whether the server has not closed it, found without reading anything (any thread)."""
        if self.closed:
            return False
        try:
            if not select.select([self.sock], [], [], 0)[0]:
                return True
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self.sock.close()


def _send(sock: socket.socket, data: bytes | memoryview) -> int:
    """Bytes taken by a non-blocking send (0 when the kernel's buffer is full)."""
    try:
        return sock.send(data)
    except BlockingIOError:
        return 0


def _poll_ms(deadline: float) -> int:
    """What is left until ``deadline``, in whole milliseconds for poll() (0: do not wait)."""
    return max(math.ceil((deadline - time.monotonic()) * 1000), 0)


class _Pool:
    """Idle connections for the calls (redis-py's pool): a call takes one, or opens one, and
    gives it back after its reply; a connection that failed is closed instead."""

    def __init__(self, open_connection: Callable[[float], _Connection]) -> None:
        self._open = open_connection
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def get(self, timeout: float) -> _Connection:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._open(timeout)
            if conn.alive():
                return conn

    def put(self, conn: _Connection) -> None:
        if not conn.closed:
            with self._lock:
                if not self._closed:
                    self._idle.append(conn)
                    return
            conn.close()  # a call that was in flight while the client closed

    def any_alive(self) -> bool:
        with self._lock:
            return any(conn.looks_connected() for conn in self._idle)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


# -- fork and exit: one hook each for the module, over the live clients ---------------------------

_live: weakref.WeakSet[StatsClient] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for client in list(_live):
        client._reset_after_fork()


def _close_at_exit() -> None:
    for client in list(_live):
        client.close()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_at_exit)


class Subscription:
    """Updates of one campaign, on a connection of its own:

        with client.subscribe(7) as updates:       # confirmed before the block runs
            for campaign_id, stats in updates:      # blocks until the next update
                ...

    Keeps only the newest stats (a slow consumer skips intermediate values). If the connection
    is lost, it reconnects with backoff and subscribes again, and the campaign's current stats
    come as the next update. Iteration ends when the subscription or the client is closed.
    """

    def __init__(self, client: StatsClient, campaign_id: int) -> None:
        self.campaign_id = campaign_id
        self._client = client
        self._session = ClientSession(token=client.options.token)
        self._conn: _Connection | None = None
        self._lock = threading.Lock()  # one reader at a time
        self._started = False
        self._closed = False

    def start(self, *, timeout: float | None = None) -> None:
        """Connect, send ``sub`` and wait for the server to confirm it; raises like any call."""
        if self._started:
            return
        if self._closed:
            raise ClientClosed("this subscription is closed")
        seconds = call_timeout(timeout, self._client.options.timeout)
        deadline = time.monotonic() + seconds
        with self._lock:
            conn = self._connect(seconds)
            try:
                conn.call(Subscribe(self.campaign_id), deadline, self._keep)
            except BaseException:
                conn.close()
                self._session.connection_lost()
                raise
            self._started = True
            self._client._subscriptions.add(self)

    _pushed: WireStats | None = None
    #: milestone and quorum events not read yet (created at the first one)
    _events: deque[dict[str, Any]] | None = None

    def _keep(self, event: Event) -> None:
        if isinstance(event, Update) and event.campaign_id == self.campaign_id:
            self._pushed = event.stats
        elif isinstance(event, GoalEvent) and event.campaign_id == self.campaign_id:
            if self._events is None:
                self._events = deque(maxlen=MAX_PENDING_EVENTS)
            self._events.append(event.event)
        elif isinstance(event, ServerError):
            self._client._on_server_error(event)

    def _connect(self, timeout: float) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        self._session.connection_lost()
        conn = self._conn = _Connection.open(self._client.options.address, self._session, timeout)
        return conn

    def get(self, timeout: float | None = None) -> tuple[int, WireStats] | None:
        """The next update; None when ``timeout`` passes first or the subscription ends."""
        if not self._wait(timeout, lambda: self._pushed is not None):
            return None
        stats, self._pushed = self._pushed, None
        assert stats is not None
        return self.campaign_id, stats

    def next_event(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next milestone or quorum EVENT of this campaign (docs/protocol.md, "Events");
        None when ``timeout`` passes first or the subscription ends. Stats updates that
        arrive meanwhile are kept for :meth:`get`."""
        if not self._wait(timeout, lambda: bool(self._events)):
            return None
        assert self._events is not None
        return self._events.popleft()

    def _wait(self, timeout: float | None, ready: Callable[[], bool]) -> bool:
        """Read the connection until ``ready()``; False on timeout or when closed."""
        if not self._started:
            self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        backoff = Backoff(self._client.options.backoff_min, self._client.options.backoff_max)
        with self._lock:
            while not self._closed:
                conn = self._conn
                try:
                    if conn is None or conn.closed:
                        conn = self._connect(self._client.options.connect_timeout)
                        backoff.reset()
                    if not ready():  # wait for one, then take the newest available
                        self._keep(conn._next(deadline, keep=True))
                    conn.poll(self._keep)
                except CallTimeout:
                    if conn is not None and conn.closed:
                        self._conn = None
                    if deadline is not None and time.monotonic() >= deadline:
                        return False
                except (StatsError, OSError) as exc:
                    if self._closed:
                        break
                    self._client._warn("client.subscription_lost", error=str(exc))
                    delay = backoff.next()
                    if deadline is not None:
                        delay = min(delay, deadline - time.monotonic())
                        if delay <= 0:
                            return False
                    time.sleep(delay)
                    continue
                if ready():
                    return True
        return False

    def close(self) -> None:
        """Stop the updates: ``unsub`` (best effort), then the connection closes."""
        if self._closed:
            return
        self._closed = True
        self._client._subscriptions.discard(self)
        conn = self._conn
        if conn is not None and not conn.closed:
            with contextlib.suppress(StatsError, OSError):
                _, data = self._session.send(Unsubscribe(self.campaign_id))
                conn.sock.sendall(data)
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)  # wakes a reader in get()
        with self._lock:
            if self._conn is not None:
                self._conn.close()

    def __iter__(self) -> Iterator[tuple[int, WireStats]]:
        while (update := self.get()) is not None:
            yield update

    def __enter__(self) -> Subscription:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StatsClient(IncrementQueue):
    """Sends increments to a campaignstats server and queries it, from any number of threads.

    ``increment()`` never blocks for long and never fails because the server is down: it
    appends to a bounded queue that a daemon thread sends in ``incs`` batches, reconnecting with
    backoff; when the queue is full, increments are dropped and counted (``dropped``). Delivery
    is at most once: a batch whose write fails is counted as dropped, never sent twice; the
    server's periodic resync from the database repairs the counts.

    The calls (:meth:`stats`, :meth:`flush`, ...) run on the caller's thread, take an optional
    ``timeout`` (seconds; the client's ``timeout`` by default) and raise
    :class:`ServerUnavailable` (a :class:`ConnectionError`) when there is no connection,
    :class:`CallTimeout` (a :class:`TimeoutError`) when the server does not answer in time, and
    the typed :class:`~campaignstats.errors.ProtocolError` subclass of the server's ``err``.

    Every connection starts with ``hello`` (with ``token`` if given). Nothing connects and no
    thread starts until the first increment or call. The queue bound is exact for one thread;
    racing threads may overshoot it by one increment each.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        backoff_min: float = BACKOFF_MIN,
        backoff_max: float = BACKOFF_MAX,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        self.options = ClientOptions(
            parse_url(url),
            token,
            timeout,
            connect_timeout,
            queue_size,
            batch_size,
            backoff_min,
            backoff_max,
            close_timeout,
        )
        self._queue: deque[Queued] = deque()
        self._queue_size = queue_size
        self._closed = False
        self._warn = RateLimitedLog().warning
        self._limits = Limits()
        self.sent = 0
        self.dropped = 0
        self.server_errors = 0
        self.connections = 0
        #: ``sent`` when the sender's connection in use was opened (the routing layer's journal)
        self.sent_before_connection = 0
        self._subscriptions: weakref.WeakSet[Subscription] = weakref.WeakSet()
        self._init_threading()
        _live.add(self)

    def _init_threading(self) -> None:
        self._idle = True  # the sender waits for work (or is not started): increment() wakes it
        self._state_lock = threading.Lock()  # counters, starting the sender, closing
        self._cast_lock = threading.Lock()  # the sender's connection, shared with flush()
        self._cast_conn: _Connection | None = None
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._sender: threading.Thread | None = None
        self._pool = _Pool(self._open)

    def _reset_after_fork(self) -> None:
        """In a forked child: no threads, no connection, and not the parent's queue.

        The parent's threads do not exist here and its locks may be held forever, so all of them
        are made anew, and the counters start from zero (they describe this process). The queued
        increments are the parent's to send: sending them from here too would count them twice.
        Closing the inherited sockets only closes this process's descriptors; the parent's
        connections are unaffected.
        """
        cast, pool = self._cast_conn, self._pool
        self._init_threading()
        self._queue.clear()
        self.sent = self.dropped = self.server_errors = self.connections = 0  # this process's
        self.sent_before_connection = 0
        if cast is not None:
            cast.close()
        pool.reset_after_fork()

    # -- life cycle -----------------------------------------------------------------------------

    def __enter__(self) -> StatsClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self, timeout: float | None = None) -> None:
        """Push what is queued (for at most ``timeout``, by default ``close_timeout`` seconds),
        then stop the sender and disconnect.

        Never raises because the server is down: increments that cannot be delivered in time are
        counted as dropped. Subscriptions end. Closing twice is harmless.
        """
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        _live.discard(self)
        if timeout is None:
            timeout = self.options.close_timeout
        # One deadline for the whole of it: the flush, the sender's end and its connection.
        deadline = time.monotonic() + timeout

        def remaining() -> float:
            return max(deadline - time.monotonic(), 0.0)

        if self._queue:
            try:
                self._flush(max(remaining(), 1e-3))
            except (StatsError, OSError) as exc:
                log.warning("client.close_flush_failed", error=str(exc), queued=len(self._queue))
        self._stopping.set()
        self._wakeup.set()
        sender = self._sender
        if sender is not None and sender is not threading.current_thread():
            sender.join(remaining())
        if self._queue:
            left = len(self._queue)
            self._queue.clear()
            self._drop(left, "client.closed")
        for subscription in list(self._subscriptions):
            subscription.close()
        if self._cast_lock.acquire(timeout=remaining()):
            try:
                if self._cast_conn is not None:
                    self._cast_conn.close()
                    self._cast_conn = None
            finally:
                self._cast_lock.release()
        self._pool.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def statistics(self) -> ClientStatistics:
        cast = self._cast_conn
        return ClientStatistics(
            queued=len(self._queue),
            queue_size=self._queue_size,
            sent=self.sent,
            dropped=self.dropped,
            server_errors=self.server_errors,
            connected=(cast is not None and cast.looks_connected()) or self._pool.any_alive(),
            connections=self.connections,
        )

    # -- connections ----------------------------------------------------------------------------

    def _open(self, timeout: float) -> _Connection:
        timeout = min(timeout, self.options.connect_timeout)
        session = ClientSession(token=self.options.token)
        conn = _Connection.open(self.options.address, session, timeout)
        self._limits = session.limits
        self._max_string = session.limits.max_string
        with self._state_lock:
            self.connections += 1
        return conn

    def _on_event(self, event: Event) -> None:
        if isinstance(event, ServerError):
            self._on_server_error(event)

    def _on_server_error(self, event: ServerError) -> None:
        with self._state_lock:
            self.server_errors += 1
        self._warn("client.server_error", code=event.error.code, error=str(event.error))

    # -- increments (the hot path is IncrementQueue.increment) ----------------------------------

    def _wake(self) -> None:
        if self._sender is None:
            with self._state_lock:
                if self._sender is None and not self._closed:
                    sender = threading.Thread(
                        target=self._send_loop, name="campaignstats-client-sender", daemon=True
                    )
                    sender.start()
                    self._sender = sender
        self._wakeup.set()

    def _drop(self, n: int, reason: str, **fields: Any) -> None:
        with self._state_lock:
            self.dropped += n
            total = self.dropped
        self._warn(reason, dropped=n, total_dropped=total, **fields)

    def _cast_connection(self, timeout: float) -> _Connection:
        """The sender's connection (the caller holds ``_cast_lock``)."""
        conn = self._cast_conn
        if conn is not None:
            conn.poll(self._on_event)  # errors about earlier casts; notices a closed connection
            if not conn.closed:
                return conn
        self._cast_conn = None
        conn = self._cast_conn = self._open(timeout)
        self.sent_before_connection = self.sent
        return conn

    def _write_queue(self, conn: _Connection, deadline: float) -> int:
        """Write the whole queue on ``conn`` (the caller holds ``_cast_lock``)."""
        queue = self._queue
        batch_size = self.options.batch_size
        written = 0
        while queue:
            data, n = self._encode(conn.session, take_runs(queue, batch_size))
            try:
                conn.write(data, deadline)
            except StatsError:
                # Part of it may have reached the server: never resend (at most once).
                self._drop(n, "client.connection_lost_while_sending")
                raise
            with self._state_lock:
                self.sent += n
            written += n
        return written

    def _send_loop(self) -> None:
        """Until close(): wait for increments, get a connection, write them in batches.

        Never dies of an error: a dead sender would turn every later increment into a drop.
        """
        backoff = Backoff(self.options.backoff_min, self.options.backoff_max)
        queue = self._queue
        wakeup = self._wakeup
        stopping = self._stopping
        while not stopping.is_set():
            try:
                if not queue:
                    # clear, then say idle, then look once more: an increment appended after
                    # the last look sees _idle and sets the event, so none waits unsent.
                    wakeup.clear()
                    self._idle = True
                    if not queue and not stopping.is_set():
                        wakeup.wait()
                    self._idle = False
                    continue
                error: Exception | None = None
                with self._cast_lock:
                    try:
                        conn = self._cast_connection(self.options.connect_timeout)
                        self._write_queue(conn, time.monotonic() + self.options.timeout)
                        conn.poll(self._on_event)
                    except (StatsError, OSError) as exc:
                        error = exc
                if error is None:
                    backoff.reset()
                    continue
                delay = backoff.next()
                self._warn(
                    "client.server_unavailable",
                    address=str(self.options.address),
                    error=str(error) or type(error).__name__,
                    retry_in=delay,
                    queued=len(queue),
                )
                stopping.wait(delay)
            except Exception:
                log.exception("client.sender_failed")
                stopping.wait(backoff.next())

    # -- calls ----------------------------------------------------------------------------------

    def _call(self, request: CallRequest, timeout: float | None = None) -> Any:
        if self._closed:
            raise ClientClosed("the client is closed")
        seconds = call_timeout(timeout, self.options.timeout)
        deadline = time.monotonic() + seconds
        conn = self._pool.get(seconds)
        try:
            result = conn.call(request, deadline, self._on_event)
        except CallTimeout:
            raise CallTimeout(
                f"no answer to {request.op} from {self.options.address} in {seconds} s"
            ) from None
        finally:
            self._pool.put(conn)  # unless it failed: a failed connection is closed
        return result

    def stats(self, campaign_id: int, *, timeout: float | None = None) -> WireStats:
        """The STATS map of one campaign (zeros and empty maps for an unknown one)."""
        result: WireStats = self._call(Stats(campaign_id), timeout)
        return result

    def stats_many(
        self, campaign_ids: Iterable[int], *, timeout: float | None = None
    ) -> dict[int, WireStats]:
        """STATS of several campaigns; more ids than the server takes at once are split."""
        ids = list(campaign_ids)
        step = self._limits.max_batch
        result: dict[int, WireStats] = {}
        for start in range(0, max(len(ids), 1), step):
            result.update(self._call(StatsMany(ids[start : start + step]), timeout))
        return result

    def flush(self, *, timeout: float | None = None) -> None:
        """Send every queued increment, then return once the server has applied all of them.

        Increments queued by any thread before the call are covered. Raises when the server is
        down or slow (the increments stay queued for the sender unless they were already written
        to a connection that died).
        """
        if self._closed:
            raise ClientClosed("the client is closed")
        self._flush(call_timeout(timeout, self.options.timeout))

    def _flush(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if not self._cast_lock.acquire(timeout=timeout):
            raise CallTimeout("flush: the sender's connection stayed busy until the timeout")
        try:
            conn = self._cast_connection(max(deadline - time.monotonic(), 1e-3))
            self._write_queue(conn, deadline)
            conn.call(Flush(), deadline, self._on_event)
        except CallTimeout:
            raise CallTimeout(
                f"no answer to flush from {self.options.address} in {timeout} s"
            ) from None
        finally:
            self._cast_lock.release()

    def info(self, *, timeout: float | None = None) -> dict[str, Any]:
        """What the server says about itself (version, uptime, calculations, connections...)."""
        result: dict[str, Any] = self._call(Info(), timeout)
        return result

    def resync(self, scope: str | Iterable[int] = "all", *, timeout: float | None = None) -> bool:
        """Start a calculation from the database (``"all"``, ``"live"`` or campaign ids).

        Returns whether it started (False: one is already running). It does not wait for the
        calculation to finish.
        """
        started: bool = self._call(Resync(check_scope(scope)), timeout)
        return started

    def metrics(self, campaign_id: int, *, timeout: float | None = None) -> dict[str, Any]:
        """A campaign's custom metrics: ``{"total": VALUES, "dims": {dim: {key: VALUES,
        "total": VALUES}}}`` (docs/metrics.md). Updates still queued here are not in it:
        :meth:`flush` first to read your own."""
        result: dict[str, Any] = self._call(GetMetrics(campaign_id), timeout)
        return result

    def history(
        self,
        campaign_id: int,
        unit: str = "hour",
        start: float | None = None,
        end: float | None = None,
        *,
        page: int | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """The non-zero buckets of ``unit`` (minute, hour, day) starting in ``[start, end)``
        (epoch seconds): ``{"unit": unit, "buckets": [[start, supporters, actions], ...]}``,
        ascending (docs/protocol.md, "history"); with ``page``, that action page's."""
        request = history_call(campaign_id, unit, start, end, page)
        result: dict[str, Any] = self._call(request, timeout)
        return result

    def page_stats(self, page_id: int, *, timeout: float | None = None) -> dict[str, Any]:
        """STATS of one action page plus ``"campaign_id"`` (docs/protocol.md, "page_stats"):
        the campaign's counts restricted to the page's actions; zeros for an unknown page."""
        result: dict[str, Any] = self._call(page_stats_call(page_id), timeout)
        return result

    def org_stats(self, org_id: int, *, timeout: float | None = None) -> dict[str, Any]:
        """``{"supporters", "actions", "campaigns": {campaign_id: supporters}}``: what one org
        collected over its campaigns (docs/protocol.md, "org_stats")."""
        result: dict[str, Any] = self._call(org_stats_call(org_id), timeout)
        return result

    def recent(
        self, campaign_id: int, tz: str = "UTC", *, timeout: float | None = None
    ) -> dict[str, Any]:
        """``{"last_hour", "today", "yesterday", "last_7_days"}`` as ``[supporters, actions]``
        (today and yesterday in ``tz``, an IANA name) and ``"last_action_at"``."""
        result: dict[str, Any] = self._call(
            _checked(recent_request(campaign_id, {"tz": tz})), timeout
        )
        return result

    def top(
        self, by: str = "supporters", limit: int = 10, *, timeout: float | None = None
    ) -> list[list[int]]:
        """``[[campaign_id, value], ...]``, highest first, by ``supporters``, ``last_hour``
        or ``today`` (UTC); ``limit`` 1 to 1,000."""
        result: list[list[int]] = self._call(
            _checked(top_request({"by": by, "limit": limit})), timeout
        )
        return result

    def set_goals(
        self,
        campaign_id: int,
        supporters: Iterable[int] | None = None,
        area: Mapping[str, int] | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        """Replace a campaign's goals: ``supporters`` thresholds (None: the default ladder) and
        ``area`` quorums (None: none); docs/protocol.md, "set_goals". Raises
        :class:`~campaignstats.errors.Invalid` for bad thresholds, and nothing changes."""
        request = goals_request(campaign_id, supporters, area)
        if isinstance(request, ProtocolError):
            raise request
        self._call(request, timeout)

    def get_goals(self, campaign_id: int, *, timeout: float | None = None) -> dict[str, Any]:
        """``{"supporters", "reached", "next", "area", "areas_reached"}`` (docs/protocol.md)."""
        result: dict[str, Any] = self._call(GetGoals(campaign_id), timeout)
        return result

    def reset_metrics(
        self, campaign_id: int, name: str | None = None, *, timeout: float | None = None
    ) -> bool:
        """Drop one metric's values (``name``) or all of a campaign's (guards stay); returns
        whether there was something to drop."""
        found: bool = self._call(ResetMetrics(campaign_id, name), timeout)
        return found

    def set_guard(
        self,
        campaign_id: int,
        name: str,
        *,
        deadline: float | None = None,
        min_period: float | None = None,
        timeout: float | None = None,
    ) -> dict[str, float | None]:
        """Guard metric ``name`` of a campaign (docs/metrics.md, "Guards and reset"): its
        updates are refused after ``deadline`` (epoch seconds) and more often than
        ``min_period`` seconds per key; both None removes the guard. Returns the guard now in
        force; durable (by the server's fsync policy) when it returns."""
        opts = {"deadline": deadline, "min_period": min_period}
        guard: dict[str, float | None] = self._call(
            _checked(guard_request(campaign_id, name, opts, GUARD_MAX_STRING)), timeout
        )
        return guard

    def ping(self, *, timeout: float | None = None) -> float:
        """A round trip to the server; returns how long it took, in seconds."""
        start = time.perf_counter()
        self._call(Ping(), timeout)
        return time.perf_counter() - start

    # -- subscriptions --------------------------------------------------------------------------

    def subscribe(self, campaign_id: int) -> Subscription:
        """Updates of ``campaign_id`` (at most one per second), on a connection of their own."""
        if self._closed:
            raise ClientClosed("the client is closed")
        return Subscription(self, campaign_id)


_R = TypeVar("_R")


def _checked(request: _R | ProtocolError) -> _R:
    """A request built by a checker of campaignstats.requests, or its error raised here."""
    if isinstance(request, ProtocolError):
        raise request
    return request
