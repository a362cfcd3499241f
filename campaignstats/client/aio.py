"""The asyncio client: :class:`AsyncStatsClient`, for FastAPI, aiohttp and other asyncio code.

    async with AsyncStatsClient("tcp://stats.internal:7400", token="...") as stats:
        stats.increment(campaign_id=1, org_id=2, action_type="register", new_supporter=True)
        print(await stats.stats(1))

An adapter over :class:`~campaignstats.sessions.client.ClientSession`, which owns the protocol
(hello, request ids, reply order, subscriptions across reconnections, encoding increments): this
module only moves bytes between one socket and the session and waits, the asyncio way. One
connection carries everything (calls are pipelined on it, replies come in call order); a sender
task turns the increment queue into ``incs`` batches and keeps the connection up. Everything runs
in one event loop, so none of it needs a lock: ``increment()`` must be called from the loop's
thread (use the blocking client elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Iterable, Mapping
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
from campaignstats.protocol import CallRequest, Hello, Ping
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
    SessionState,
    Update,
)

__all__ = ["AsyncStatsClient", "Subscription"]


class _Connection(asyncio.Protocol):
    """One socket: hands what it reads to the client, and lets writers wait for the buffer."""

    def __init__(self, client: AsyncStatsClient) -> None:
        self._client = client
        self.transport: asyncio.Transport | None = None
        self.alive = False
        self._loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[None] = self._loop.create_future()
        self._paused = False
        self._resumed: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.alive = True

    def data_received(self, data: bytes) -> None:
        self._client._receive(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        self._wake_writers()
        if not self.lost.done():
            self.lost.set_result(None)
        self._client._lost(self)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_writers()

    def write(self, data: bytes) -> None:
        if not self.alive or self.transport is None:
            raise ServerUnavailable("connection to the server lost")
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport's buffer is over its high-water mark (the server is slow)."""
        if self._paused and self.alive:
            if self._resumed is None or self._resumed.done():
                self._resumed = self._loop.create_future()
            # shield: one waiter being cancelled must not cancel the future the others wait on
            await asyncio.shield(self._resumed)
        if not self.alive:
            raise ServerUnavailable("connection to the server lost")

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
    grow. After a reconnection the session subscribes again and pushes the campaign's current
    stats, so a value that changed while the connection was down is not missed. Iteration ends
    when the subscription or the client is closed.
    """

    def __init__(self, client: AsyncStatsClient, campaign_id: int) -> None:
        self.campaign_id = campaign_id
        self._client = client
        self._latest: WireStats | None = None
        #: milestone and quorum events, in order (docs/protocol.md, "Events"); bounded: past
        #: it the oldest unread ones go
        self._events: deque[dict[str, Any]] = deque(maxlen=MAX_PENDING_EVENTS)
        self._event = asyncio.Event()
        self._started = False
        self._closed = False

    async def start(self, *, timeout: float | None = None) -> None:
        """Send ``sub`` and wait for the server to confirm it; raises like any call."""
        if not self._started:
            if self._closed:
                raise ClientClosed("this subscription is closed")
            await self._client._subscribe(self, timeout)
            self._started = True

    def _push(self, stats: WireStats) -> None:
        self._latest = stats
        self._event.set()

    def _push_event(self, event: dict[str, Any]) -> None:
        self._events.append(event)
        self._event.set()

    def _end(self) -> None:
        self._closed = True
        self._event.set()

    async def next_event(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next milestone or quorum EVENT of this campaign (docs/protocol.md, "Events");
        None when ``timeout`` passes first or the subscription ends. Events are kept apart
        from the stats updates, none is skipped (up to a bounded backlog)."""
        if not self._started and not self._closed:
            await self.start()
        try:
            async with asyncio.timeout(timeout):
                while not self._events:
                    if self._closed:
                        return None
                    self._event.clear()
                    await self._event.wait()
        except TimeoutError:
            return None
        return self._events.popleft()

    async def get(self, timeout: float | None = None) -> tuple[int, WireStats] | None:
        """The next update; None when ``timeout`` passes first or the subscription ends."""
        if not self._started and not self._closed:
            await self.start()
        try:
            async with asyncio.timeout(timeout):
                while self._latest is None:
                    if self._closed:
                        return None
                    self._event.clear()
                    await self._event.wait()
        except TimeoutError:
            return None
        stats, self._latest = self._latest, None
        return self.campaign_id, stats

    async def aclose(self) -> None:
        """Stop the updates (sends ``unsub`` when no other subscription wants this campaign)."""
        if not self._closed:
            self._end()
            if self._started:
                self._client._unsubscribe(self)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> tuple[int, WireStats]:
        update = await self.get()
        if update is None:
            raise StopAsyncIteration
        return update

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

    The calls (:meth:`stats`, :meth:`flush`, ...) take an optional ``timeout`` (seconds; the
    client's ``timeout`` by default) and raise :class:`ServerUnavailable` (a
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
        self._session = ClientSession(token=token)
        self._queue: deque[Queued] = deque()
        self._queue_size = queue_size
        self._idle = True  # the sender waits for work (or is not started): increment() wakes it
        self._closed = False
        self._wakeup = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._conn: _Connection | None = None
        self._connect_lock = asyncio.Lock()
        self._waiters: dict[int, asyncio.Future[Any]] = {}
        self._hello: asyncio.Future[Ready] | None = None
        self._subscriptions: dict[int, set[Subscription]] = {}
        self._warn = RateLimitedLog().warning
        self.sent = 0
        self.dropped = 0
        self.server_errors = 0
        self.connections = 0
        #: ``sent`` when the connection in use was opened (the routing layer's journal)
        self.sent_before_connection = 0

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

    async def close(self, timeout: float | None = None) -> None:
        """Push what is queued (for at most ``timeout``, by default ``close_timeout`` seconds),
        then disconnect.

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
            wait = self.options.close_timeout if timeout is None else timeout
            try:
                await self._flush(wait)
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
        conn = self._conn
        if conn is not None:
            conn.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await asyncio.shield(conn.lost)
            self._forget(conn)

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

    def _drop(self, n: int, reason: str, **fields: Any) -> None:
        self.dropped += n
        self._warn(reason, dropped=n, total_dropped=self.dropped, **fields)

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
                    conn = await self._connection(self.options.connect_timeout)
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
                    data, n = self._encode(self._session, take_runs(queue, batch_size))
                    conn.write(data)
                    self.sent += n
                    try:
                        await conn.drain()
                    except ServerUnavailable:
                        # Part of it may have reached the server: never resend (at most once).
                        self.sent -= n
                        self._drop(n, "client.connection_lost_while_sending")
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("client.sender_failed")
                await asyncio.sleep(backoff.next())

    def _wants_connection(self) -> bool:
        """Subscriptions need a connection even when there is nothing to send."""
        return bool(self._subscriptions) and (self._conn is None or not self._conn.alive)

    # -- the connection and the session ---------------------------------------------------------

    async def _connection(self, timeout: float) -> _Connection:
        conn = self._conn
        if conn is not None and conn.alive and self._session.state is SessionState.READY:
            return conn
        async with self._connect_lock:
            conn = self._conn
            if conn is not None and conn.alive and self._session.state is SessionState.READY:
                return conn
            conn = await self._open(min(timeout, self.options.connect_timeout))
            self._wakeup.set()  # a sender waiting out its backoff can go now
            return conn

    async def _open(self, timeout: float) -> _Connection:
        """Connect and say hello; raises ServerUnavailable, ConnectTimeout or the hello's error."""
        address = self.options.address
        loop = asyncio.get_running_loop()
        conn = _Connection(self)
        try:
            async with asyncio.timeout(timeout):
                if address.kind == "tcp":
                    await loop.create_connection(lambda: conn, address.host_or_path, address.port)
                else:
                    await loop.create_unix_connection(lambda: conn, address.host_or_path)
                self._conn = conn
                self._hello = loop.create_future()
                conn.write(self._session.connect())
                ready = await self._hello
        except BaseException as exc:
            conn.abort()
            self._forget(conn)
            if isinstance(exc, StatsError):
                raise  # the hello's typed error (unauthorized...), or the connection lost
            if isinstance(exc, TimeoutError):
                raise ConnectTimeout(f"no connection to {address} within {timeout:.3g} s") from None
            if isinstance(exc, OSError):
                raise ServerUnavailable(f"cannot connect to {address}: {exc}") from exc
            raise
        self._max_string = ready.limits.max_string
        self.connections += 1
        self.sent_before_connection = self.sent
        if self.connections > 1:
            log.info("client.reconnected", address=str(address), connections=self.connections)
        return conn

    def _receive(self, conn: _Connection, data: bytes) -> None:
        if conn is not self._conn:
            return
        session = self._session
        try:
            session.receive_data(data)
            while (event := session.next_event()) is not None:
                self._dispatch(event)
        except RemoteProtocolError as exc:
            # The stream cannot be trusted past this point: drop the connection, reconnect.
            self._warn("client.protocol_error", error=str(exc))
            conn.abort()
            self._forget(conn)

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, Reply):
            future = self._waiters.pop(event.req_id, None)
            if future is not None and not future.done():
                future.set_result(event.result)
        elif isinstance(event, Failed):
            if isinstance(event.request, Hello):
                future = self._hello
            else:
                future = self._waiters.pop(event.req_id, None)
            if future is not None and not future.done():
                future.set_exception(event.error)
        elif isinstance(event, Update):
            for subscription in self._subscriptions.get(event.campaign_id, ()):
                subscription._push(event.stats)
        elif isinstance(event, GoalEvent):
            for subscription in self._subscriptions.get(event.campaign_id, ()):
                subscription._push_event(event.event)
        elif isinstance(event, Ready):
            if self._hello is not None and not self._hello.done():
                self._hello.set_result(event)
        elif isinstance(event, ServerError):
            self.server_errors += 1
            self._warn("client.server_error", code=event.error.code, error=str(event.error))

    def _lost(self, conn: _Connection) -> None:
        if conn is self._conn:
            self._forget(conn)
            if not self._closed:
                self._warn("client.connection_lost", address=str(self.options.address))
                self._wakeup.set()  # reconnect if there is something to send or subscriptions

    def _forget(self, conn: _Connection) -> None:
        """Done with ``conn``: every call waiting on it fails, and the session is idle again."""
        if conn is not self._conn:
            return
        self._conn = None
        for failed in self._session.connection_lost():
            self._dispatch(failed)
        error = ServerUnavailable(f"connection to {self.options.address} lost")
        if self._hello is not None and not self._hello.done():
            self._hello.set_exception(error)
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(error)
        self._waiters.clear()

    # -- calls ----------------------------------------------------------------------------------

    async def _call(self, request: CallRequest, timeout: float | None = None) -> Any:
        if self._closed:
            raise ClientClosed("the client is closed")
        seconds = call_timeout(timeout, self.options.timeout)
        if self._queue:
            self._ensure_sender()
        try:
            async with asyncio.timeout(seconds):
                conn = await self._connection(seconds)
                req_id, data = self._session.send(request)
                future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                self._waiters[req_id] = future
                try:
                    conn.write(data)
                    await conn.drain()
                    return await future
                finally:
                    if self._waiters.pop(req_id, None) is not None:
                        self._session.abandon(req_id)  # cancelled or timed out: never answered
        except StatsError:
            raise  # before TimeoutError: ConnectTimeout is both
        except TimeoutError:
            raise CallTimeout(
                f"no answer to {request.op} from {self.options.address} in {seconds} s"
            ) from None

    async def stats(self, campaign_id: int, *, timeout: float | None = None) -> WireStats:
        """The STATS map of one campaign (zeros and empty maps for an unknown one)."""
        result: WireStats = await self._call(Stats(campaign_id), timeout)
        return result

    async def stats_many(
        self, campaign_ids: Iterable[int], *, timeout: float | None = None
    ) -> dict[int, WireStats]:
        """STATS of several campaigns; more ids than the server takes at once are split."""
        ids = list(campaign_ids)
        step = self._session.limits.max_batch
        result: dict[int, WireStats] = {}
        for start in range(0, max(len(ids), 1), step):
            result.update(await self._call(StatsMany(ids[start : start + step]), timeout))
        return result

    async def flush(self, *, timeout: float | None = None) -> None:
        """Send every queued increment, then return once the server has applied all of them.

        Raises when the server is down or slow (the increments stay queued for the sender unless
        they were already written to a connection that died).
        """
        if self._closed:
            raise ClientClosed("the client is closed")
        await self._flush(call_timeout(timeout, self.options.timeout))

    async def _flush(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                conn = await self._connection(timeout)
                # All of it in one go, with no await in between: the sender cannot interleave,
                # and the flush call lands after the last increment.
                queue = self._queue
                batch_size = self.options.batch_size
                written = 0
                while queue:
                    data, n = self._encode(self._session, take_runs(queue, batch_size))
                    conn.write(data)
                    written += n
                req_id, data = self._session.send(Flush())
                future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                self._waiters[req_id] = future
                conn.write(data)
                self.sent += written
                try:
                    try:
                        await conn.drain()
                    except ServerUnavailable:
                        self.sent -= written
                        self._drop(written, "client.connection_lost_while_sending")
                        raise
                    await future
                finally:
                    if self._waiters.pop(req_id, None) is not None:
                        self._session.abandon(req_id)
        except StatsError:
            raise
        except TimeoutError:
            raise CallTimeout(
                f"no answer to flush from {self.options.address} in {timeout} s"
            ) from None

    async def info(self, *, timeout: float | None = None) -> dict[str, Any]:
        """What the server says about itself (version, uptime, calculations, connections...)."""
        result: dict[str, Any] = await self._call(Info(), timeout)
        return result

    async def resync(
        self, scope: str | Iterable[int] = "all", *, timeout: float | None = None
    ) -> bool:
        """Start a calculation from the database (``"all"``, ``"live"`` or campaign ids).

        Returns whether it started (False: one is already running). It does not wait for the
        calculation to finish.
        """
        started: bool = await self._call(Resync(check_scope(scope)), timeout)
        return started

    async def metrics(self, campaign_id: int, *, timeout: float | None = None) -> dict[str, Any]:
        """A campaign's custom metrics: ``{"total": VALUES, "dims": {dim: {key: VALUES,
        "total": VALUES}}}`` (docs/metrics.md). Updates still queued here are not in it:
        :meth:`flush` first to read your own."""
        result: dict[str, Any] = await self._call(GetMetrics(campaign_id), timeout)
        return result

    async def history(
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
        result: dict[str, Any] = await self._call(request, timeout)
        return result

    async def page_stats(self, page_id: int, *, timeout: float | None = None) -> dict[str, Any]:
        """STATS of one action page plus ``"campaign_id"`` (docs/protocol.md, "page_stats"):
        the campaign's counts restricted to the page's actions; zeros for an unknown page."""
        result: dict[str, Any] = await self._call(page_stats_call(page_id), timeout)
        return result

    async def org_stats(self, org_id: int, *, timeout: float | None = None) -> dict[str, Any]:
        """``{"supporters", "actions", "campaigns": {campaign_id: supporters}}``: what one org
        collected over its campaigns (docs/protocol.md, "org_stats")."""
        result: dict[str, Any] = await self._call(org_stats_call(org_id), timeout)
        return result

    async def recent(
        self, campaign_id: int, tz: str = "UTC", *, timeout: float | None = None
    ) -> dict[str, Any]:
        """``{"last_hour", "today", "yesterday", "last_7_days"}`` as ``[supporters, actions]``
        (today and yesterday in ``tz``, an IANA name) and ``"last_action_at"``."""
        result: dict[str, Any] = await self._call(
            _checked(recent_request(campaign_id, {"tz": tz})), timeout
        )
        return result

    async def top(
        self, by: str = "supporters", limit: int = 10, *, timeout: float | None = None
    ) -> list[list[int]]:
        """``[[campaign_id, value], ...]``, highest first, by ``supporters``, ``last_hour``
        or ``today`` (UTC); ``limit`` 1 to 1,000."""
        result: list[list[int]] = await self._call(
            _checked(top_request({"by": by, "limit": limit})), timeout
        )
        return result

    async def set_goals(
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
        await self._call(_checked(goals_request(campaign_id, supporters, area)), timeout)

    async def get_goals(self, campaign_id: int, *, timeout: float | None = None) -> dict[str, Any]:
        """``{"supporters", "reached", "next", "area", "areas_reached"}`` (docs/protocol.md)."""
        result: dict[str, Any] = await self._call(GetGoals(campaign_id), timeout)
        return result

    async def reset_metrics(
        self, campaign_id: int, name: str | None = None, *, timeout: float | None = None
    ) -> bool:
        """Drop one metric's values (``name``) or all of a campaign's (guards stay); returns
        whether there was something to drop."""
        found: bool = await self._call(ResetMetrics(campaign_id, name), timeout)
        return found

    async def set_guard(
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
        guard: dict[str, float | None] = await self._call(
            _checked(guard_request(campaign_id, name, opts, GUARD_MAX_STRING)), timeout
        )
        return guard

    async def ping(self, *, timeout: float | None = None) -> float:
        """A round trip to the server; returns how long it took, in seconds."""
        start = time.perf_counter()
        await self._call(Ping(), timeout)
        return time.perf_counter() - start

    # -- subscriptions --------------------------------------------------------------------------

    def subscribe(self, campaign_id: int) -> Subscription:
        """Updates of ``campaign_id`` (at most one per second), as an async iterator."""
        if self._closed:
            raise ClientClosed("the client is closed")
        return Subscription(self, campaign_id)

    async def _subscribe(self, subscription: Subscription, timeout: float | None) -> None:
        cid = subscription.campaign_id
        subscriptions = self._subscriptions.setdefault(cid, set())
        first = not subscriptions
        subscriptions.add(subscription)
        if first:
            try:
                await self._call(Subscribe(cid), timeout)
            except BaseException:
                subscriptions.discard(subscription)
                if not subscriptions:
                    del self._subscriptions[cid]
                raise
        self._ensure_sender()  # it keeps the connection up for the subscriptions

    def _unsubscribe(self, subscription: Subscription) -> None:
        cid = subscription.campaign_id
        subscriptions = self._subscriptions.get(cid)
        if subscriptions is None:
            return
        subscriptions.discard(subscription)
        if subscriptions:
            return
        del self._subscriptions[cid]
        conn = self._conn
        if conn is not None and conn.alive and self._session.state is SessionState.READY:
            req_id, data = self._session.send(Unsubscribe(cid))
            self._session.abandon(req_id)  # nobody waits for it
            conn.write(data)
        else:
            self._session.forget_subscription(cid)


_R = TypeVar("_R")


def _checked(request: _R | ProtocolError) -> _R:
    """A request built by a checker of campaignstats.requests, or its error raised here."""
    if isinstance(request, ProtocolError):
        raise request
    return request
