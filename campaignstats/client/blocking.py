"""The blocking client: :class:`StatsClient`, for Django, Flask and other threaded code.

    stats = StatsClient("unix:///run/campaignstats.sock")   # one per process, shared by threads
    stats.increment(campaign_id=1, org_id=2, action_type="register", new_supporter=True)
    stats.stats(1)

One client is meant to be shared by every thread of a process. It holds one connection at a time,
with two daemon threads: the sender, which turns the increment queue into ``incs`` batches and
reconnects with backoff, and the connection's reader, which matches replies to the calls waiting
for them (so calls from many threads share the connection without waiting for each other's
replies). Frames are written under one lock, so they never interleave on the socket.

Forking (gunicorn with ``--preload``, multiprocessing) is handled: a child process starts with an
empty queue and no connection, and opens its own on first use, instead of writing into the
parent's socket from a process that has none of the parent's threads. At interpreter exit, a
client that was not closed is closed (what is queued gets ``close_timeout`` seconds to go out).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import os
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, InvalidStateError
from types import TracebackType
from typing import Any

from campaignstats.client._common import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    DEFAULT_BATCH_SIZE,
    DEFAULT_CLOSE_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_QUEUE_SIZE,
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    Address,
    Backoff,
    ClientOptions,
    ClientStatistics,
    IncrementQueue,
    Item,
    RateLimitedLog,
    check_scope,
    log,
    parse_url,
    take_batch,
)
from campaignstats.errors import (
    BadFrame,
    CallTimeout,
    ClientClosed,
    ConnectTimeout,
    ServerUnavailable,
    StatsError,
)
from campaignstats.model import WireStats
from campaignstats.protocol import DEFAULT_MAX_BATCH, ClientCodec, Err, Ok, Pub

__all__ = ["StatsClient"]

_RECV_SIZE = 1 << 16


def _set_exception(future: Future[Any], error: BaseException) -> None:
    # The reader may resolve a future while another thread fails it: first one wins.
    try:
        if not future.done():
            future.set_exception(error)
    except InvalidStateError:
        pass


class _Connection:
    """One socket and the daemon thread that reads it.

    The reader thread is the only one that closes the socket: closing a descriptor while another
    thread is blocked reading it could make that thread read whatever socket gets the number next.
    Others stop a connection with :meth:`kill`, which shuts the socket down and so wakes the reader.
    """

    def __init__(self, sock: socket.socket, codec: ClientCodec, client: StatsClient) -> None:
        self.sock = sock
        self.codec = codec  # decoding only, by the reader thread, once started
        self.address = client.options.address
        self.pending: dict[int, Future[Any]] = {}
        self.alive = True
        self._lock = threading.Lock()  # alive and pending change together
        self._client = client
        self._reader = threading.Thread(
            target=self._read_loop, name="campaignstats-client-reader", daemon=True
        )

    def start(self) -> None:
        self._reader.start()

    def register(self, req_id: int) -> Future[Any]:
        """A future for the reply to ``req_id``; raises if the connection is already gone."""
        future: Future[Any] = Future()
        with self._lock:
            if not self.alive:
                raise ServerUnavailable(f"connection to {self.address} lost")
            self.pending[req_id] = future
        return future

    def send(self, data: bytes) -> None:
        """Write a whole frame (the caller holds the client's write lock).

        A failure, a timeout included, leaves an unknown part of the frame on the wire, so the
        connection is given up.
        """
        try:
            self.sock.sendall(data)
        except OSError as exc:
            self.kill()
            raise ServerUnavailable(f"connection to {self.address} lost: {exc}") from exc

    def kill(self) -> None:
        """Fail the pending calls and shut the socket down (the reader then closes it)."""
        with self._lock:
            if not self.alive:
                return
            self.alive = False
            pending, self.pending = self.pending, {}
        error = ServerUnavailable(f"connection to {self.address} lost")
        for future in pending.values():
            _set_exception(future, error)
        with contextlib.suppress(OSError):  # already disconnected
            self.sock.shutdown(socket.SHUT_RDWR)

    def join(self, timeout: float) -> None:
        if self._reader.is_alive() and self._reader is not threading.current_thread():
            self._reader.join(timeout)

    def _read_loop(self) -> None:
        client = self._client
        sock = self.sock
        try:
            while self.alive:
                try:
                    data = sock.recv(_RECV_SIZE)
                except TimeoutError:
                    continue  # the socket's timeout is for writes; reading just waits on
                except OSError:
                    break
                if not data:
                    break
                try:
                    messages = self.codec.receive_data(data)
                except BadFrame as exc:
                    client._warn("client.bad_frame", error=str(exc))
                    break
                for msg in messages:
                    if isinstance(msg, Pub):
                        continue  # this client does not subscribe
                    if msg.req_id is None:
                        if isinstance(msg, Err):
                            client._on_server_error(msg)
                        continue
                    future = self.pending.pop(msg.req_id, None)
                    if future is None:
                        continue  # the caller gave up (timeout) before the reply came
                    try:
                        if isinstance(msg, Ok):
                            future.set_result(msg.result)
                        else:
                            future.set_exception(msg.exception())
                    except InvalidStateError:
                        pass
        except Exception:
            log.exception("client.reader_failed")
        finally:
            self.kill()
            sock.close()
            client._on_connection_lost(self)


def _reset_in_child(ref: weakref.ref[StatsClient]) -> None:
    client = ref()
    if client is not None:
        client._reset_after_fork()


def _close_at_exit(ref: weakref.ref[StatsClient]) -> None:
    client = ref()
    if client is not None:
        client.close()


class StatsClient(IncrementQueue):
    """Sends increments to a campaignstats server and queries it, from any number of threads.

    ``increment()`` never blocks for long and never fails because the server is down: it
    appends to a bounded queue that a daemon thread sends in ``incs`` batches, reconnecting with
    backoff; when the queue is full, increments are dropped and counted (``dropped``). Delivery
    is at most once: a batch whose write fails is counted as dropped, never sent twice; the
    server's periodic resync from the database repairs the counts.

    The calls (:meth:`stats`, :meth:`flush`, ...) do raise: :class:`ServerUnavailable` (a
    :class:`ConnectionError`) when there is no connection, :class:`CallTimeout` (a
    :class:`TimeoutError`) when the server does not answer in time, and the typed
    :class:`~campaignstats.errors.ProtocolError` subclass of the server's ``err`` reply.

    Every (re)connection starts with ``hello`` (with ``token`` if given). Nothing connects and no
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
        self._queue: deque[Item] = deque()
        self._queue_size = queue_size
        self._closed = False
        self._req_ids = itertools.count(1)  # next() on a count is atomic under the GIL
        self._warn = RateLimitedLog().warning
        self.sent = 0
        self.dropped = 0
        self.server_errors = 0
        self.connections = 0
        self._init_threading()
        # Neither hook can be unregistered: a dead client's weak reference just does nothing.
        os.register_at_fork(after_in_child=functools.partial(_reset_in_child, weakref.ref(self)))
        # Web apps rarely close their client: push what is queued when the interpreter exits.
        atexit.register(functools.partial(_close_at_exit, weakref.ref(self)))

    def _init_threading(self) -> None:
        self._idle = True  # the sender waits for work (or is not started): increment() wakes it
        self._codec = ClientCodec()  # encoding, under _write_lock
        self._write_lock = threading.Lock()  # one frame at a time on the socket
        self._connect_lock = threading.Lock()  # one connection attempt at a time
        self._state_lock = threading.Lock()  # counters, starting the sender, closing
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._sender: threading.Thread | None = None
        self._conn: _Connection | None = None

    def _reset_after_fork(self) -> None:
        """In a forked child: no threads, no connection, and not the parent's queue.

        The parent's threads do not exist here and its locks may be held forever, so all of them
        are made anew, and the counters start from zero (they describe this process). The queued
        increments are the parent's to send: sending them from here too would count them twice.
        Closing the inherited socket only closes this process's descriptor; the parent's
        connection is unaffected.
        """
        conn = self._conn
        self._init_threading()
        self._queue.clear()
        self.sent = self.dropped = self.server_errors = self.connections = 0  # this process's
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.sock.close()

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
        """Push what is queued (for at most ``timeout``, by default ``close_timeout`` seconds).

        Then stop the sender and disconnect.

        Never raises because the server is down: increments that cannot be delivered in time are
        counted as dropped. Closing twice is harmless.
        """
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        if timeout is None:
            timeout = self.options.close_timeout
        if self._queue:
            try:
                self._flush(timeout)
            except (StatsError, OSError) as exc:
                log.warning("client.close_flush_failed", error=str(exc), queued=len(self._queue))
        self._stopping.set()
        self._wakeup.set()
        sender = self._sender
        if sender is not None and sender is not threading.current_thread():
            sender.join(timeout)
        if self._queue:
            left = len(self._queue)
            self._queue.clear()
            self._drop(left, "client.closed")
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.kill()
            conn.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def statistics(self) -> ClientStatistics:
        conn = self._conn
        return ClientStatistics(
            queued=len(self._queue),
            queue_size=self._queue_size,
            sent=self.sent,
            dropped=self.dropped,
            server_errors=self.server_errors,
            connected=conn is not None and conn.alive,
            connections=self.connections,
        )

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

    def _drop(self, n: int, reason: str) -> None:
        with self._state_lock:
            self.dropped += n
            total = self.dropped
        self._warn(reason, dropped=n, total_dropped=total, queue_size=self._queue_size)

    def _send_loop(self) -> None:
        """Until close(): wait for increments, get a connection, write them in batches.

        Never dies of an error: a dead sender would turn every later increment into a drop.
        """
        backoff = Backoff(self.options.backoff_min, self.options.backoff_max)
        queue = self._queue
        batch_size = self.options.batch_size
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
                try:
                    conn = self._connection(time.monotonic() + self.options.connect_timeout)
                except (StatsError, OSError) as exc:
                    delay = backoff.next()
                    self._warn(
                        "client.server_unavailable",
                        address=str(self.options.address),
                        error=str(exc) or type(exc).__name__,
                        retry_in=delay,
                        queued=len(queue),
                    )
                    wakeup.clear()  # set by close(), or by a call that connected meanwhile
                    wakeup.wait(delay)
                    continue
                backoff.reset()
                # Taken under the write lock, so that a flush() cannot overtake a batch that
                # already left the queue.
                with self._write_lock:
                    batch = take_batch(queue, batch_size)
                    if batch:
                        try:
                            conn.send(self._codec.incs(batch))
                        except ServerUnavailable:
                            self._drop(len(batch), "client.connection_lost_while_sending")
                        else:
                            self.sent += len(batch)
            except Exception:
                log.exception("client.sender_failed")
                stopping.wait(backoff.next())

    # -- connection -----------------------------------------------------------------------------

    def _connection(self, deadline: float) -> _Connection:
        conn = self._conn
        if conn is not None and conn.alive:
            return conn
        address = self.options.address
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self._connect_lock.acquire(timeout=remaining):
            raise ConnectTimeout(f"no connection to {address} in time")
        try:
            conn = self._conn
            if conn is not None and conn.alive:
                return conn
            remaining = min(self.options.connect_timeout, deadline - time.monotonic())
            if remaining <= 0:
                raise ConnectTimeout(f"no connection to {address} in time")
            conn = self._open(address, remaining)
            self._conn = conn
        finally:
            self._connect_lock.release()
        self._wakeup.set()  # a sender waiting out its backoff can go now
        return conn

    def _open(self, address: Address, timeout: float) -> _Connection:
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
        codec = ClientCodec()
        try:
            req_id = next(self._req_ids)
            sock.sendall(codec.call("hello", req_id, self.options.hello()))
            reply: Ok | Err | None = None
            while reply is None:
                sock.settimeout(max(deadline - time.monotonic(), 1e-3))
                data = sock.recv(_RECV_SIZE)
                if not data:
                    raise ServerUnavailable(f"{address} closed the connection during hello")
                for msg in codec.receive_data(data):
                    if not isinstance(msg, Pub) and msg.req_id == req_id:
                        reply = msg
            if isinstance(reply, Err):
                raise reply.exception()
        except BaseException as exc:
            sock.close()
            if isinstance(exc, StatsError):
                raise
            if isinstance(exc, TimeoutError):
                raise ConnectTimeout(f"no answer to hello from {address} in time") from None
            if isinstance(exc, OSError):
                raise ServerUnavailable(f"connection to {address} lost: {exc}") from exc
            raise
        # From now on the timeout bounds writes (a server that stops reading); the reader
        # thread ignores it.
        sock.settimeout(self.options.timeout)
        conn = _Connection(sock, codec, self)
        with self._state_lock:
            self.connections += 1
            connections = self.connections
        if connections > 1:
            log.info("client.reconnected", address=str(address), connections=connections)
        conn.start()
        return conn

    def _on_connection_lost(self, conn: _Connection) -> None:
        if self._conn is conn:
            self._conn = None
            if not self._closed:
                self._warn("client.connection_lost", address=str(self.options.address))

    def _on_server_error(self, err: Err) -> None:
        with self._state_lock:
            self.server_errors += 1
        self._warn("client.server_error", code=err.code, error=err.message)

    # -- calls ----------------------------------------------------------------------------------

    def _lock_for_write(self, deadline: float, op: str) -> None:
        if not self._write_lock.acquire(timeout=max(deadline - time.monotonic(), 0)):
            raise CallTimeout(f"{op}: the connection stayed busy until the timeout")

    def _call(self, op: str, *args: Any, timeout: float | None = None) -> Any:
        if self._closed:
            raise ClientClosed("the client is closed")
        if timeout is None:
            timeout = self.options.timeout
        deadline = time.monotonic() + timeout
        conn = self._connection(deadline)
        req_id = next(self._req_ids)
        future = conn.register(req_id)
        try:
            self._lock_for_write(deadline, op)
            try:
                conn.send(self._codec.call(op, req_id, *args))
            finally:
                self._write_lock.release()
            return future.result(max(deadline - time.monotonic(), 0))
        except StatsError:
            raise  # before TimeoutError: ConnectTimeout is both
        except TimeoutError:
            raise CallTimeout(
                f"no answer to {op} from {self.options.address} in {timeout} s"
            ) from None
        finally:
            conn.pending.pop(req_id, None)

    def stats(self, campaign_id: int, *, timeout: float | None = None) -> WireStats:
        """The STATS map of one campaign (zeros and empty maps for an unknown one)."""
        result: WireStats = self._call("stats", campaign_id, timeout=timeout)
        return result

    def stats_many(
        self, campaign_ids: Iterable[int], *, timeout: float | None = None
    ) -> dict[int, WireStats]:
        """STATS of several campaigns; more ids than the server takes at once are split."""
        ids = list(campaign_ids)
        result: dict[int, WireStats] = {}
        for start in range(0, max(len(ids), 1), DEFAULT_MAX_BATCH):
            result.update(
                self._call("stats_many", ids[start : start + DEFAULT_MAX_BATCH], timeout=timeout)
            )
        return result

    def flush(self, *, timeout: float | None = None) -> None:
        """Send every queued increment, then return once the server has applied all of them.

        Increments queued by any thread before the call are covered. Raises when the server is
        down or slow (the increments stay queued for the sender unless they were already written
        to a connection that died).
        """
        if self._closed:
            raise ClientClosed("the client is closed")
        self._flush(self.options.timeout if timeout is None else timeout)

    def _flush(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        conn = self._connection(deadline)
        req_id = next(self._req_ids)
        future = conn.register(req_id)
        try:
            self._lock_for_write(deadline, "flush")
            try:
                queue = self._queue
                batch_size = self.options.batch_size
                incs = self._codec.incs
                while queue:
                    batch = take_batch(queue, batch_size)
                    try:
                        conn.send(incs(batch))
                    except ServerUnavailable:
                        self._drop(len(batch), "client.connection_lost_while_sending")
                        raise
                    self.sent += len(batch)
                conn.send(self._codec.call("flush", req_id))
            finally:
                self._write_lock.release()
            future.result(max(deadline - time.monotonic(), 0))
        except StatsError:
            raise
        except TimeoutError:
            raise CallTimeout(
                f"no answer to flush from {self.options.address} in {timeout} s"
            ) from None
        finally:
            conn.pending.pop(req_id, None)

    def info(self, *, timeout: float | None = None) -> dict[str, Any]:
        """What the server says about itself (version, uptime, calculations, connections...)."""
        result: dict[str, Any] = self._call("info", timeout=timeout)
        return result

    def resync(self, scope: str | Sequence[int] = "all", *, timeout: float | None = None) -> bool:
        """Start a calculation from the database (``"all"``, ``"live"`` or campaign ids).

        Returns whether it started (False: one is already running). It does not wait for the
        calculation to finish.
        """
        wire_scope = check_scope(scope if isinstance(scope, str) else tuple(scope))
        result = self._call("resync", wire_scope, timeout=timeout)
        return bool(result["started"])

    def ping(self, *, timeout: float | None = None) -> float:
        """A round trip to the server; returns how long it took, in seconds."""
        start = time.perf_counter()
        self._call("ping", timeout=timeout)
        return time.perf_counter() - start
