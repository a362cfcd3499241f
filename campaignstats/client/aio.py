"""The asyncio client: :class:`AsyncStatsClient`, for FastAPI, aiohttp and other asyncio code.

    async with AsyncStatsClient("tcp://stats.internal:7400", token="...") as stats:
        stats.increment(campaign_id=1, org_id=2, action_type="register", new_supporter=True)
        print(await stats.stats(1))

Three layers, as in asyncpg: :class:`_Connection` is the asyncio protocol of one socket (bytes to
messages through :class:`~campaignstats.protocol.ClientCodec`, replies to the futures waiting for
them); the sender task turns the increment queue into ``incs`` batches and keeps a connection up;
the public methods are calls with a timeout. Everything runs in one event loop, so none of it needs
a lock: ``increment()`` must be called from the loop's thread (use the blocking client elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, Final

from campaignstats.client._common import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    DEFAULT_BATCH_SIZE,
    DEFAULT_CLOSE_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_QUEUE_SIZE,
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
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

__all__ = ["AsyncStatsClient", "Subscription"]

_IGNORED: Final = None  # a pending slot whose reply nobody waits for (re-subscriptions)


class _Connection(asyncio.Protocol):
    """One socket to the server: writes frames, reads replies, resolves the calls' futures.

    Replies come in call order, but they are matched by ``req_id`` anyway: a call that timed out
    has left ``pending``, and its late reply must not be taken for the next call's.
    """

    def __init__(self, client: AsyncStatsClient) -> None:
        self._client = client
        self.codec = ClientCodec()
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, asyncio.Future[Any] | None] = {}
        self.alive = False
        self._loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[None] = self._loop.create_future()
        self._paused = False
        self._resumed: asyncio.Future[None] | None = None

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.alive = True

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.codec.receive_data(data)
        except BadFrame as exc:
            # The stream cannot be trusted past this point: drop the connection, reconnect.
            self._client._warn("client.bad_frame", error=str(exc))
            self.abort()
            return
        pending = self.pending
        client = self._client
        for msg in messages:
            if isinstance(msg, Pub):
                client._on_pub(msg.campaign_id, msg.stats)
                continue
            if msg.req_id is None:  # an error about a cast: an increment was rejected
                if isinstance(msg, Err):
                    client._on_server_error(msg)
                continue
            if msg.req_id not in pending:
                continue  # the reply to a call that timed out or was cancelled
            future = pending.pop(msg.req_id)
            if isinstance(msg, Ok):
                if future is not None and not future.done():
                    future.set_result(msg.result)
            elif future is None:
                client._on_server_error(msg)
            elif not future.done():
                future.set_exception(msg.exception())

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        error = ServerUnavailable(
            f"connection to {self._client.options.address} lost" + (f": {exc}" if exc else "")
        )
        for future in self.pending.values():
            if future is not None and not future.done():
                future.set_exception(error)
        self.pending.clear()
        self._wake_writers()
        if not self.lost.done():
            self.lost.set_result(None)
        self._client._on_connection_lost(self)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_writers()

    # -- used by the client ---------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Queue bytes on the transport; raises at once if the connection is gone."""
        if not self.alive or self.transport is None:
            raise ServerUnavailable(f"not connected to {self._client.options.address}")
        self.transport.write(data)

    def call(self, op: str, req_id: int, *args: Any) -> asyncio.Future[Any]:
        """Send a call; the future gets its result, or its typed error."""
        self.send(self.codec.call(op, req_id, *args))
        future: asyncio.Future[Any] = self._loop.create_future()
        self.pending[req_id] = future
        return future

    def call_ignored(self, op: str, req_id: int, *args: Any) -> None:
        """Send a call whose reply nobody awaits (an error reply is logged)."""
        self.send(self.codec.call(op, req_id, *args))
        self.pending[req_id] = _IGNORED

    async def drain(self) -> None:
        """Wait while the transport's buffer is over its high-water mark (the server is slow)."""
        if self._paused and self.alive:
            if self._resumed is None or self._resumed.done():
                self._resumed = self._loop.create_future()
            # shield: one waiter being cancelled must not cancel the future the others wait on
            await asyncio.shield(self._resumed)
        if not self.alive:
            raise ServerUnavailable(f"connection to {self._client.options.address} lost")

    def _wake_writers(self) -> None:
        if self._resumed is not None and not self._resumed.done():
            self._resumed.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class Subscription:
    """Updates of one campaign: ``async for campaign_id, stats in client.subscribe(7): ...``.

    The ``sub`` is sent when iteration starts (or on ``async with``, which also guarantees that
    no update after it is missed). Like the server's own subscriptions it keeps only the newest
    stats: a consumer slower than the updates skips intermediate values instead of making memory
    grow. After a reconnection the client subscribes again and pushes the campaign's current
    stats, so a value that changed while the connection was down is not kept. Iteration ends when
    the subscription or the client is closed.
    """

    def __init__(self, client: AsyncStatsClient, campaign_id: int) -> None:
        self.campaign_id = campaign_id
        self._client = client
        self._latest: WireStats | None = None
        self._event = asyncio.Event()
        self._started = False
        self._closed = False

    async def start(self) -> None:
        """Send ``sub`` and wait for the server to confirm it; raises like any call."""
        if not self._started:
            if self._closed:
                raise ClientClosed("this subscription is closed")
            await self._client._subscribe(self)
            self._started = True

    def _push(self, stats: WireStats) -> None:
        self._latest = stats
        self._event.set()

    def _end(self) -> None:
        self._closed = True
        self._event.set()

    async def aclose(self) -> None:
        """Stop the updates (sends ``unsub`` when no other subscription wants this campaign)."""
        if not self._closed:
            self._end()
            if self._started:
                await self._client._unsubscribe(self)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> tuple[int, WireStats]:
        if not self._started and not self._closed:
            await self.start()
        while self._latest is None:
            if self._closed:
                raise StopAsyncIteration
            self._event.clear()
            await self._event.wait()
        stats, self._latest = self._latest, None
        return self.campaign_id, stats

    async def __aenter__(self) -> Subscription:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncStatsClient(IncrementQueue):
    """Sends increments to a campaignstats server and queries it, in an asyncio program.

    ``increment()`` never waits and never fails because the server is down: increments go to a
    bounded queue that a background task sends in ``incs`` batches, reconnecting with backoff;
    when the queue is full, increments are dropped and counted (``dropped``). Delivery is at most
    once: a batch being written when the connection dies is counted as dropped, never sent
    twice; the server's periodic resync from the database repairs the counts.

    The calls (:meth:`stats`, :meth:`flush`, ...) do raise: :class:`ServerUnavailable` (a
    :class:`ConnectionError`) when there is no connection, :class:`CallTimeout` (a
    :class:`TimeoutError`) when the server does not answer in time, and the typed
    :class:`~campaignstats.errors.ProtocolError` subclass of the server's ``err`` reply.

    Every (re)connection starts with ``hello`` (with ``token`` if given). Nothing connects until
    the first increment or call, so the client can be built before the server is up.
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
        self._idle = True  # the sender waits for work (or is not started): increment() wakes it
        self._closed = False
        self._wakeup = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._conn: _Connection | None = None
        self._connect_lock = asyncio.Lock()
        self._req_ids = itertools.count(1)
        self._subscriptions: dict[int, set[Subscription]] = {}
        self._warn = RateLimitedLog().warning
        self.sent = 0
        self.dropped = 0
        self.server_errors = 0
        self.connections = 0

    # -- life cycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncStatsClient:
        self._ensure_sender()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Push what is queued (for at most ``close_timeout`` seconds), then disconnect.

        Never raises because the server is down: increments that cannot be delivered in time are
        counted as dropped. Subscriptions end. Closing twice is harmless.
        """
        if self._closed:
            return
        self._closed = True
        sender, self._sender = self._sender, None
        if sender is not None:
            # Stopped first, so that the final flush alone owns the queue.
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        if self._queue:
            try:
                await self._flush(closing=True)
            except (StatsError, OSError) as exc:
                log.warning("client.close_flush_failed", error=str(exc), queued=len(self._queue))
            if self._queue:
                left = len(self._queue)
                self._queue.clear()
                self._drop(left, "client.closed")
        for subscriptions in self._subscriptions.values():
            for subscription in subscriptions:
                subscription._end()
        self._subscriptions.clear()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await asyncio.shield(conn.lost)

    @property
    def closed(self) -> bool:
        return self._closed

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(
            queued=len(self._queue),
            queue_size=self._queue_size,
            sent=self.sent,
            dropped=self.dropped,
            server_errors=self.server_errors,
            connected=self._conn is not None and self._conn.alive,
            connections=self.connections,
        )

    # -- increments (the hot path is IncrementQueue.increment) ----------------------------------

    def _wake(self) -> None:
        if self._sender is None:
            try:
                self._ensure_sender()
            except RuntimeError:
                return  # no running loop yet: the queue is sent once the client is used in one
        self._wakeup.set()

    def _drop(self, n: int, reason: str) -> None:
        self.dropped += n
        self._warn(reason, dropped=n, total_dropped=self.dropped, queue_size=self._queue_size)

    def _ensure_sender(self) -> None:
        """Start the sender task in the running loop (RuntimeError outside of one)."""
        if self._sender is None and not self._closed:
            self._sender = asyncio.get_running_loop().create_task(
                self._send_loop(), name="campaignstats-client-sender"
            )

    async def _send_loop(self) -> None:
        """Forever: wait for increments, get a connection, write them in batches.

        Never dies of an error (only of cancellation by :meth:`close`): a dead sender would turn
        every later increment into a silent drop.
        """
        backoff = Backoff(self.options.backoff_min, self.options.backoff_max)
        queue = self._queue
        batch_size = self.options.batch_size
        while True:
            try:
                if not queue and not self._wants_connection():
                    self._wakeup.clear()
                    self._idle = True
                    await self._wakeup.wait()
                    self._idle = False
                    continue
                try:
                    conn = await self._connection()
                except (StatsError, OSError) as exc:
                    delay = backoff.next()
                    self._warn(
                        "client.server_unavailable",
                        address=str(self.options.address),
                        error=str(exc) or type(exc).__name__,
                        retry_in=delay,
                        queued=len(queue),
                    )
                    # Wait out the delay, but go at once if a call managed to connect meanwhile.
                    self._wakeup.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await self._wakeup.wait()
                    continue
                backoff.reset()
                # Nothing awaits between taking a batch and writing it, so a flush() can never
                # overtake increments that left the queue before it.
                while queue and conn.alive:
                    batch = take_batch(queue, batch_size)
                    conn.send(conn.codec.incs(batch))
                    self.sent += len(batch)
                    try:
                        await conn.drain()
                    except ServerUnavailable:
                        # Part of it may have reached the server: never resend (at most once).
                        self.sent -= len(batch)
                        self._drop(len(batch), "client.connection_lost_while_sending")
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("client.sender_failed")
                await asyncio.sleep(backoff.next())

    def _wants_connection(self) -> bool:
        """Subscriptions need a connection even when there is nothing to send."""
        return bool(self._subscriptions) and (self._conn is None or not self._conn.alive)

    # -- connection -----------------------------------------------------------------------------

    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and conn.alive:
            return conn
        async with self._connect_lock:
            conn = self._conn
            if conn is not None and conn.alive:
                return conn
            conn = await self._open()
            self._conn = conn
            self._wakeup.set()  # a sender waiting out its backoff can go now
            return conn

    async def _open(self) -> _Connection:
        """Connect and say hello; raises ServerUnavailable, ConnectTimeout or the hello's error."""
        options = self.options
        address = options.address
        loop = asyncio.get_running_loop()
        conn = _Connection(self)
        try:
            async with asyncio.timeout(options.connect_timeout):
                if address.kind == "tcp":
                    await loop.create_connection(lambda: conn, address.host_or_path, address.port)
                else:
                    await loop.create_unix_connection(lambda: conn, address.host_or_path)
                await conn.call("hello", next(self._req_ids), options.hello())
        except BaseException as exc:
            conn.abort()
            if isinstance(exc, StatsError):
                raise  # the hello's typed error (unauthorized...), or the connection lost
            if isinstance(exc, TimeoutError):
                raise ConnectTimeout(
                    f"no connection to {address} within {options.connect_timeout} s"
                ) from None
            if isinstance(exc, OSError):
                raise ServerUnavailable(f"cannot connect to {address}: {exc}") from exc
            raise
        self.connections += 1
        if self.connections > 1:
            log.info("client.reconnected", address=str(address), connections=self.connections)
        if self._subscriptions:
            self._resubscribe(conn)
        return conn

    def _resubscribe(self, conn: _Connection) -> None:
        """Subscribe again on a new connection, and push the current stats of those campaigns."""
        ids = list(self._subscriptions)
        for cid in ids:
            conn.call_ignored("sub", next(self._req_ids), cid)
        for start in range(0, len(ids), DEFAULT_MAX_BATCH):
            future = conn.call(
                "stats_many", next(self._req_ids), ids[start : start + DEFAULT_MAX_BATCH]
            )
            future.add_done_callback(self._push_current)

    def _push_current(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            return  # the connection went away again; the next one will retry
        for cid, stats in future.result().items():
            self._on_pub(cid, stats)

    def _on_connection_lost(self, conn: _Connection) -> None:
        if self._conn is conn:
            self._conn = None
            if not self._closed:
                self._warn("client.connection_lost", address=str(self.options.address))
                self._wakeup.set()  # reconnect if there is something to send or subscriptions

    def _on_pub(self, campaign_id: int, stats: WireStats) -> None:
        for subscription in self._subscriptions.get(campaign_id, ()):
            subscription._push(stats)

    def _on_server_error(self, err: Err) -> None:
        self.server_errors += 1
        self._warn("client.server_error", code=err.code, error=err.message)

    # -- calls ----------------------------------------------------------------------------------

    async def _call(self, op: str, *args: Any) -> Any:
        if self._closed:
            raise ClientClosed("the client is closed")
        timeout = self.options.timeout
        if self._queue:
            self._ensure_sender()
        conn: _Connection | None = None
        req_id = next(self._req_ids)
        try:
            async with asyncio.timeout(timeout):
                conn = await self._connection()
                future = conn.call(op, req_id, *args)
                await conn.drain()
                return await future
        except StatsError:
            raise  # before TimeoutError: ConnectTimeout is both
        except TimeoutError:
            raise CallTimeout(
                f"no answer to {op} from {self.options.address} in {timeout} s"
            ) from None
        finally:
            if conn is not None:
                conn.pending.pop(req_id, None)

    async def stats(self, campaign_id: int) -> WireStats:
        """The STATS map of one campaign (zeros and empty maps for an unknown one)."""
        result: WireStats = await self._call("stats", campaign_id)
        return result

    async def stats_many(self, campaign_ids: Iterable[int]) -> dict[int, WireStats]:
        """STATS of several campaigns; more ids than the server takes at once are split."""
        ids = list(campaign_ids)
        result: dict[int, WireStats] = {}
        for start in range(0, max(len(ids), 1), DEFAULT_MAX_BATCH):
            part = await self._call("stats_many", ids[start : start + DEFAULT_MAX_BATCH])
            result.update(part)
        return result

    async def flush(self) -> None:
        """Send every queued increment, then return once the server has applied all of them.

        Raises when the server is down or slow (the increments stay queued for the sender unless
        they were already written to a connection that died).
        """
        if self._closed:
            raise ClientClosed("the client is closed")
        await self._flush()

    async def _flush(self, *, closing: bool = False) -> None:
        timeout = self.options.close_timeout if closing else self.options.timeout
        conn: _Connection | None = None
        req_id = next(self._req_ids)
        try:
            async with asyncio.timeout(timeout):
                conn = await self._connection()
                # All of it in one go, with no await in between: the sender cannot interleave,
                # and the flush call lands after the last increment.
                queue = self._queue
                batch_size = self.options.batch_size
                incs = conn.codec.incs
                written = 0
                while queue:
                    batch = take_batch(queue, batch_size)
                    conn.send(incs(batch))
                    written += len(batch)
                future = conn.call("flush", req_id)
                self.sent += written
                try:
                    await conn.drain()
                except ServerUnavailable:
                    self.sent -= written
                    self._drop(written, "client.connection_lost_while_sending")
                    raise
                await future
        except StatsError:
            raise
        except TimeoutError:
            raise CallTimeout(
                f"no answer to flush from {self.options.address} in {timeout} s"
            ) from None
        finally:
            if conn is not None:
                conn.pending.pop(req_id, None)

    async def info(self) -> dict[str, Any]:
        """What the server says about itself (version, uptime, calculations, connections...)."""
        result: dict[str, Any] = await self._call("info")
        return result

    async def resync(self, scope: str | Sequence[int] = "all") -> bool:
        """Start a calculation from the database (``"all"``, ``"live"`` or campaign ids).

        Returns whether it started (False: one is already running). It does not wait for the
        calculation to finish.
        """
        wire_scope = check_scope(scope if isinstance(scope, str) else tuple(scope))
        result = await self._call("resync", wire_scope)
        return bool(result["started"])

    async def ping(self) -> float:
        """A round trip to the server; returns how long it took, in seconds."""
        start = time.perf_counter()
        await self._call("ping")
        return time.perf_counter() - start

    # -- subscriptions --------------------------------------------------------------------------

    def subscribe(self, campaign_id: int) -> Subscription:
        """Updates of ``campaign_id`` (at most one per second), as an async iterator."""
        if self._closed:
            raise ClientClosed("the client is closed")
        return Subscription(self, campaign_id)

    async def _subscribe(self, subscription: Subscription) -> None:
        cid = subscription.campaign_id
        await self._connection()  # connected first: a new connection re-subscribes what is known
        subscriptions = self._subscriptions.setdefault(cid, set())
        first = not subscriptions
        subscriptions.add(subscription)
        if first:
            try:
                await self._call("sub", cid)
            except BaseException:
                subscriptions.discard(subscription)
                if not subscriptions:
                    del self._subscriptions[cid]
                raise
        self._ensure_sender()  # it keeps the connection up for the subscriptions

    async def _unsubscribe(self, subscription: Subscription) -> None:
        cid = subscription.campaign_id
        subscriptions = self._subscriptions.get(cid)
        if subscriptions is None:
            return
        subscriptions.discard(subscription)
        if not subscriptions:
            del self._subscriptions[cid]
            conn = self._conn
            if conn is not None and conn.alive and not self._closed:
                with contextlib.suppress(StatsError):
                    conn.call_ignored("unsub", next(self._req_ids), cid)
