"""The stats service in-process: the embedding API, and the only door to the actor's mailbox.

    async with campaignstats.open_stats(dsn="postgresql://...") as stats:
        stats.increment(campaign_id=1, org_id=2, action_type="register", new_supporter=True)
        print(await stats.stats(1))

:class:`StatsService` owns the mailbox and the supervisor; every method is a message to the actor.
``increment``, ``decrement`` and ``metric`` never wait (they raise
:class:`~campaignstats.errors.Overloaded` when the mailbox is full); ``send`` and the calls wait
for room.

Everything that puts messages in the mailbox does it through a :class:`Producer`: the embedding
process has one, and the socket server takes one per connection (:meth:`StatsService.producer`).
A producer keeps its messages in order and its reads behind its own writes (docs/design.md,
"Queries first"); that logic lives here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog

from campaignstats.actor.actor import NOT_NOW, ActorConfig, Source
from campaignstats.actor.mailbox import DEFAULT_MAILBOX_SIZE, Mailbox
from campaignstats.actor.messages import Ask, Message, RejectedCallback, Stop, Tell
from campaignstats.actor.subscriptions import Subscriber, Subscription
from campaignstats.actor.supervisor import Supervisor
from campaignstats.errors import ActorStopped, Invalid, Overloaded, UsageError
from campaignstats.metrics.update import MetricUpdate, make_update
from campaignstats.model import (
    DEFAULT_MAX_STRING,
    Increment,
    IncrementLike,
    WireStats,
    check_increment,
)
from campaignstats.requests import (
    READS,
    Cast,
    Decrements,
    Flush,
    GetGoals,
    GetMetrics,
    Increments,
    Info,
    MetricUpdates,
    Request,
    ResetMetrics,
    Resync,
    Stats,
    StatsMany,
    Subscribe,
    Unsubscribe,
    guard_request,
    history_request,
    org_stats_request,
    page_stats_request,
    recent_request,
    set_goals_request,
    top_request,
)
from campaignstats.webhooks import WebhookSender

log = structlog.get_logger(__name__)

DEFAULT_CALL_TIMEOUT = 10.0


class TaskHost:
    """A task group that stays open from :meth:`start` to :meth:`close`.

    ``asyncio.TaskGroup`` is entered and left by one task, while the service and the server have
    a start/stop life cycle: a host task holds the group open, and every background task is
    created in it (:meth:`spawn`), so none outlives :meth:`close` unnoticed and none is orphaned.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._group: asyncio.TaskGroup | None = None
        self._host: asyncio.Task[None] | None = None
        self._release: asyncio.Future[None] | None = None

    async def start(self) -> None:
        if self._host is not None:
            raise RuntimeError(f"{self.name} already started")
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._release = loop.create_future()
        self._host = asyncio.create_task(self._hold(ready, self._release), name=self.name)
        self._host.add_done_callback(_retrieve)
        await ready

    async def _hold(self, ready: asyncio.Future[None], release: asyncio.Future[None]) -> None:
        async with asyncio.TaskGroup() as group:
            self._group = group
            ready.set_result(None)
            await release
        self._group = None

    @property
    def open(self) -> bool:
        return self._group is not None and self._release is not None and not self._release.done()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        if self._group is None or not self.open:
            coro.close()
            raise RuntimeError(f"{self.name} is not running")
        return self._group.create_task(coro, name=name)

    async def close(self, timeout: float) -> bool:
        """Let the tasks end for up to ``timeout`` seconds, then cancel them; True if they ended
        in time. Never waits more than ``timeout`` (a task that ignores cancellation is left to
        end on its own, logged)."""
        host = self._host
        if host is None or host.done():
            return True
        if self._release is not None and not self._release.done():
            self._release.set_result(None)
        done, _ = await asyncio.wait({host}, timeout=timeout)
        if done:
            return True
        host.cancel()
        log.error("tasks.cancelled_at_close", host=self.name, timeout=timeout)
        return False


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a host task's error as seen (the tasks' own errors are reported by their owners)."""
    if not task.cancelled():
        task.exception()


#: numbers the producers of :meth:`StatsService.producer` (the socket's connections)
_ORIGINS = itertools.count(1)


class Producer:
    """One ordered stream of messages into the mailbox: a connection, or the embedding process.

    Its messages reach the actor in the order they were given. Read-only calls (``READS``) may
    take the mailbox's read lane, ahead of other producers' queued increments, but only once the
    actor has taken this producer's last message: a query never overtakes its own writes.

    Two ways to give it a message. The embedding API waits for room (:meth:`put`) or raises
    (:meth:`put_nowait`). The socket server never waits in a protocol callback: :meth:`cast` and
    :meth:`call` keep what the full mailbox cannot take in a backlog, in order; the server then
    stops reading its socket and awaits :meth:`drain`.
    """

    __slots__ = ("_backlog", "_door", "_last", "_mailbox", "origin")

    def __init__(
        self,
        mailbox: Mailbox,
        origin: int | None = None,
        door: Callable[[Request], Any] | None = None,
    ) -> None:
        self._mailbox = mailbox
        #: names this producer in its messages (a socket connection's number: docs/metrics.md,
        #: "A failed commit"); None: the embedding process
        self.origin = origin
        self._last = 0  # sequence number of this producer's last message in the normal lane
        self._backlog: deque[Message] = deque()
        #: the actor's read door (:meth:`StatsService.read_door`), for :meth:`read_now`
        self._door = door

    # -- the embedding API's way: wait, or raise --------------------------------------------------

    def put_nowait(self, message: Message) -> None:
        """Queue ``message``, or raise Overloaded (mailbox full) or ActorStopped."""
        if self._backlog:
            raise Overloaded("the stats mailbox is full")
        self._last = self._mailbox.put_nowait(message)

    async def put(self, message: Message) -> None:
        """Queue ``message``, waiting for room."""
        await self.drain()
        self._last = await self._mailbox.put(message)

    def read_now(self, request: Request) -> Any:
        """Answer a read-only call at once through the actor's read door, with no message and
        no task switch (docs/design.md, "Queries inline"), when the rule of the read lane
        allows it: nothing of this producer's is waiting (no backlog, and the actor has taken,
        whole, the last message this producer put in the normal lane). Returns
        :data:`~campaignstats.actor.actor.NOT_NOW` when it may not (or the door is closed):
        then :meth:`call` it. Raises the error the actor would have answered with."""
        if (
            self._door is None
            or self._backlog
            or not isinstance(request, READS)
            or not self._mailbox.taken_up_to(self._last)
        ):
            return NOT_NOW
        return self._door(request)

    def read_lane(self, ask: Ask) -> bool:
        """Put a read-only call in the read lane if it may go there; False: it may not."""
        if (
            isinstance(ask.request, READS)
            and not self._backlog
            and self._mailbox.taken_up_to(self._last)
        ):
            try:
                self._mailbox.put_read_nowait(ask)
                return True
            except Overloaded:
                pass
        return False

    # -- the socket server's way: never wait, keep a backlog ---------------------------------------

    def cast(
        self,
        cast: Cast,
        on_rejected: RejectedCallback | None = None,
        report_empty: bool = False,
    ) -> None:
        """Queue a batch; raises only ActorStopped. ``on_rejected`` is called with the items
        the actor refuses, if any (always, with ``report_empty``)."""
        message = Tell(cast, on_rejected, report_empty, self.origin)
        if self._backlog:
            self._backlog.append(message)
            return
        try:  # inline: this is the hot path of the socket server, once per read
            self._last = self._mailbox.put_nowait(message)
        except Overloaded:
            self._backlog.append(message)

    def call(
        self, request: Request, then: Callable[[asyncio.Future[Any]], None] | None = None
    ) -> asyncio.Future[Any]:
        """Queue a call; its answer (or error) goes to the returned future. Cancel the future
        to give up: the actor then skips the request. Raises only ActorStopped. ``then`` is
        called by the actor with the future as soon as it has answered (see :class:`Ask`)."""
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        ask = Ask(request, reply, self.origin, then)
        if not self.read_lane(ask):
            self._submit(ask)
        return reply

    def _submit(self, message: Message) -> None:
        if self._backlog:
            self._backlog.append(message)
            return
        try:
            self._last = self._mailbox.put_nowait(message)
        except Overloaded:
            self._backlog.append(message)

    @property
    def backlog(self) -> int:
        """Messages waiting for room in the mailbox (stop producing while there are any)."""
        return len(self._backlog)

    async def drain(self) -> None:
        """Wait until the backlog is in the mailbox (one drainer at a time)."""
        backlog = self._backlog
        while backlog:
            self._last = await self._mailbox.put(backlog[0])
            backlog.popleft()

    def close(self) -> int:
        """Drop the backlog (its calls are cancelled); returns how many messages were dropped."""
        dropped = len(self._backlog)
        for message in self._backlog:
            if isinstance(message, Ask):
                message.reply.cancel()
        self._backlog.clear()
        return dropped


class StatsService:
    def __init__(
        self,
        source: Source,
        config: ActorConfig | None = None,
        *,
        mailbox_size: int = DEFAULT_MAILBOX_SIZE,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        max_restarts: int = 5,
        restart_window: float = 60.0,
        max_string: int = DEFAULT_MAX_STRING,
    ) -> None:
        self.config = config or ActorConfig()
        self._mailbox = Mailbox(mailbox_size)
        self.supervisor = Supervisor(
            self._mailbox, source, self.config, max_restarts=max_restarts, window=restart_window
        )
        self.call_timeout = call_timeout
        self.max_string = max_string
        self._tasks = TaskHost("campaignstats-service")
        self._task: asyncio.Task[None] | None = None
        #: posts milestone and quorum events to the webhooks (campaignstats.webhooks)
        self._webhooks: asyncio.Task[None] | None = None
        #: the embedding process's own stream: its reads never overtake its writes
        self._producer = Producer(self._mailbox)

    # -- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("already started")
        # Before any actor runs: a metrics log that cannot be opened (its path, a later format)
        # is raised here once, with its path, not taken for actor crashes (docs/metrics.md).
        self.supervisor.open_metrics()
        await self._tasks.start()
        self._task = self._tasks.spawn(self._supervise(), name="campaignstats-supervisor")
        outbox = self.supervisor.lifetime.outbox
        if outbox is not None and self.config.webhooks.urls:
            sender = WebhookSender(outbox, self.config.webhooks)
            self._webhooks = self._tasks.spawn(sender.run(), name="campaignstats-webhooks")

    async def _supervise(self) -> None:
        try:
            await self.supervisor.run()
        finally:
            gc = self.supervisor.lifetime.gc
            if gc is not None:  # the collector's thresholds as they were (a held pass too)
                gc.close()
            # Whatever is still queued will never be answered: say so instead of hanging callers.
            self._mailbox.close()
            self._fail_queued()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self, timeout: float = 30.0) -> None:
        """Apply what the mailbox holds, write the snapshot (if configured), stop.

        Takes at most ``timeout`` seconds: past it the actor is cancelled (logged).
        """
        task = self._task
        if task is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if not task.done():
            try:
                async with asyncio.timeout_at(deadline):
                    await self._mailbox.put(Stop())
                    await asyncio.wait({task})
            except TimeoutError:
                log.error("service.stop_timeout", timeout=timeout)
            except ActorStopped:
                pass  # it stopped on its own meanwhile
        if self._webhooks is not None:
            # What is not delivered stays in the outbox, delivered after the next start.
            self._webhooks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({self._webhooks}, timeout=max(0.0, deadline - loop.time()))
        await self._tasks.close(max(0.0, deadline - loop.time()))
        if self.supervisor.lifetime.outbox is not None:
            self.supervisor.lifetime.outbox.close()

    async def loaded(self) -> None:
        """Wait until a full calculation has been merged (memory then matches the database).

        Queries are answered before that, from the snapshot file or from zeros; wrap this in
        ``asyncio.timeout()`` if the database may be down.
        """
        await self.supervisor.lifetime.loaded.wait()

    async def wait(self) -> None:
        """Wait until the supervisor ends; raises its error (e.g. it gave up restarting)."""
        if self._task is not None:
            await asyncio.wait({self._task})
            if not self._task.cancelled() and (error := self._task.exception()) is not None:
                raise error

    def _fail_queued(self) -> None:
        dropped = 0
        while (msg := self._mailbox.get_nowait()) is not None:
            if isinstance(msg, Ask) and not msg.reply.done():
                msg.reply.set_exception(ActorStopped("the stats actor has stopped"))
            elif isinstance(msg, Tell):
                dropped += len(msg.cast.items)
        if dropped:
            log.warning("service.increments_dropped_at_stop", increments=dropped)
        if self._mailbox.statistics().blocked_producers:
            # Producers that were waiting for room enqueue now that there is some: fail theirs too.
            asyncio.get_running_loop().call_later(0.01, self._fail_queued)

    # -- the mailbox ----------------------------------------------------------------------------

    def producer(self, *, inline_reads: bool = True) -> Producer:
        """A stream of messages of its own (one per connection of the socket server), named
        by a number of its own. With ``inline_reads``, its :meth:`Producer.read_now` answers
        read-only calls through the actor's read door; without, it always says NOT_NOW."""
        return Producer(self._mailbox, next(_ORIGINS), self.read_door if inline_reads else None)

    def read_door(self, request: Request) -> Any:
        """The live actor's read door (:meth:`~campaignstats.actor.actor.StatsActor.read`):
        a read-only request answered now, or NOT_NOW when no actor is serving."""
        actor = self.supervisor.actor
        if actor is None:
            return NOT_NOW
        return actor.read(request)

    @property
    def mailbox(self) -> Mailbox:
        """The mailbox itself, for tests and introspection; producers are the way in."""
        return self._mailbox

    # -- increments and decrements --------------------------------------------------------------

    def increment(
        self,
        campaign_id: int,
        org_id: int,
        action_type: str,
        area: str | None = None,
        new_supporter: bool = False,
        count: int = 1,
        action_id: int | None = None,
        txid: int | None = None,
        at: float | None = None,
        page: int | None = None,
        messages: int = 0,
    ) -> None:
        """Count one action, without waiting. Raises Invalid (or BadMessage for a wrong type),
        Overloaded or ActorStopped."""
        inc = Increment(
            campaign_id,
            org_id,
            action_type,
            area,
            new_supporter,
            count,
            action_id,
            txid,
            at,
            page,
            messages,
        )
        self._cast_one(Increments((self._checked(inc),)))

    def decrement(
        self,
        campaign_id: int,
        org_id: int,
        action_type: str,
        area: str | None = None,
        new_supporter: bool = False,
        count: int = 1,
        action_id: int | None = None,
        txid: int | None = None,
        at: float | None = None,
        page: int | None = None,
        messages: int = 0,
    ) -> None:
        """Take one action back (the exact inverse of the same :meth:`increment`), without
        waiting. Raises as :meth:`increment` does."""
        inc = Increment(
            campaign_id,
            org_id,
            action_type,
            area,
            new_supporter,
            count,
            action_id,
            txid,
            at,
            page,
            messages,
        )
        self._cast_one(Decrements((self._checked(inc),)))

    def _checked(self, inc: Increment) -> Increment:
        error = check_increment(inc, self.max_string)
        if error is not None:
            raise error
        return inc

    def _cast_one(self, cast: Cast) -> None:
        self._check_running()
        self._producer.put_nowait(Tell(cast))

    async def send(
        self,
        items: Sequence[Increment] | Cast,
        on_rejected: RejectedCallback | None = None,
        *,
        decrement: bool = False,
    ) -> None:
        """Queue a batch, waiting while the mailbox is full: increments, or decrements with
        ``decrement=True`` (or pass an :class:`~campaignstats.requests.Increments` or
        :class:`~campaignstats.requests.Decrements` as it is). Each item is validated first: an
        invalid one raises and nothing is queued. ``on_rejected`` hears of the items the state
        refused, as ``(index, reason)``.
        """
        if isinstance(items, Increments | Decrements):
            changes: Increments | Decrements = items
        elif isinstance(items, MetricUpdates):
            await self.send_metrics(items.items, on_rejected)
            return
        else:
            changes = Decrements(items) if decrement else Increments(items)
        for inc in changes.items:
            self._checked(inc if isinstance(inc, Increment) else _increment_of(inc))
        self._check_running()
        await self._producer.put(Tell(changes, on_rejected))

    # -- custom metrics (docs/metrics.md) -------------------------------------------------------

    def metric(
        self,
        campaign_id: int,
        *,
        dims: Mapping[str, str] | None = None,
        incr: Mapping[str, int] | None = None,
        set: Mapping[str, int] | None = None,  # the wire's name
        gauge: Mapping[str, int | float] | None = None,
        member: Mapping[str, str | list[str] | tuple[str, ...]] | None = None,
        seen: list[str] | tuple[str, ...] | None = None,
        at: float | None = None,
    ) -> None:
        """One metrics update (the UPDATE of docs/protocol.md as keywords), without waiting.

        Checked by the one validator first: raises Invalid or BadMessage (a bug in the caller),
        Overloaded or ActorStopped. A limit or a guard that refuses it is counted in
        ``info()["metrics"]``. Durable (by the fsync policy) once a later :meth:`flush` returns.
        """
        update = make_update(
            campaign_id,
            dims=dims,
            incr=incr,
            set=set,
            gauge=gauge,
            member=member,
            seen=seen,
            at=at,
            limits=self.config.metrics.limits,
        )
        self._cast_one(MetricUpdates((update,)))

    async def send_metrics(
        self, updates: Sequence[MetricUpdate], on_rejected: RejectedCallback | None = None
    ) -> None:
        """Queue checked updates (:func:`~campaignstats.metrics.update.make_update`,
        ``update_from_map``) as one message, waiting while the mailbox is full. ``on_rejected``
        hears of the updates the state refused (a limit, a guard), as ``(index, reason)``."""
        for i, update in enumerate(updates):
            if not isinstance(update, MetricUpdate):
                raise UsageError(f"item {i} is a {type(update).__name__}, not a MetricUpdate")
        self._check_running()
        await self._producer.put(Tell(MetricUpdates(list(updates)), on_rejected))

    async def metrics(self, campaign_id: int) -> dict[str, Any]:
        """``{"total": VALUES, "dims": {dim: {key: VALUES, "total": VALUES}}}``."""
        result: dict[str, Any] = await self.call(GetMetrics(campaign_id))
        return result

    async def reset_metrics(self, campaign_id: int, name: str | None = None) -> bool:
        """Drop one metric's values (``name``) or all of a campaign's; guards stay. Returns
        whether there was something to drop; durable (by the fsync policy) when it returns."""
        result = await self.call(ResetMetrics(campaign_id, name))
        return bool(result["found"])

    async def set_guard(
        self,
        campaign_id: int,
        name: str,
        *,
        deadline: float | None = None,
        min_period: float | None = None,
    ) -> dict[str, float | None]:
        """Guard metric ``name`` (docs/metrics.md, "Guards and reset"): refuse its updates after
        ``deadline`` (epoch seconds) or more often than ``min_period`` seconds per key; both
        None removes the guard. Durable (by the fsync policy) when it returns."""
        opts = {"deadline": deadline, "min_period": min_period}
        request = guard_request(campaign_id, name, opts, self.config.metrics.limits.max_string)
        if isinstance(request, Exception):
            raise request
        result: dict[str, float | None] = await self.call(request)
        return result

    # -- calls ----------------------------------------------------------------------------------

    async def call(self, request: Request, timeout: float | None = None) -> Any:
        self._check_running()
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        ask = Ask(request, reply)
        async with asyncio.timeout(self.call_timeout if timeout is None else timeout):
            if not self._producer.read_lane(ask):
                await self._producer.put(ask)  # waiting for room counts too
            return await reply

    async def stats(self, campaign_id: int) -> WireStats:
        result: WireStats = await self.call(Stats(campaign_id))
        return result

    async def stats_many(self, campaign_ids: Sequence[int]) -> dict[int, WireStats]:
        result: dict[int, WireStats] = await self.call(StatsMany(list(campaign_ids)))
        return result

    async def history(
        self,
        campaign_id: int,
        unit: str = "hour",
        start: float | None = None,
        end: float | None = None,
        page: int | None = None,
    ) -> dict[str, Any]:
        """``{"unit", "buckets": [[start, supporters, actions], ...]}``: the non-zero buckets
        of ``unit`` (minute, hour, day) starting in ``[start, end)`` (docs/protocol.md,
        "history"), of the campaign or of one of its action pages (``page``). Raises
        :class:`~campaignstats.errors.Invalid` for a bad unit, time or page."""
        opts = {"unit": unit, "from": start, "to": end, "page": page}
        request = history_request(campaign_id, opts)
        if isinstance(request, Exception):
            raise request
        result: dict[str, Any] = await self.call(request)
        return result

    async def page_stats(self, page_id: int) -> WireStats:
        """STATS of one action page plus ``"campaign_id"`` (docs/protocol.md, "page_stats");
        zeros for an unknown page. Raises the wire's error for a bad id."""
        request = page_stats_request(page_id)
        if isinstance(request, Exception):
            raise request
        result: WireStats = await self.call(request)
        return result

    async def org_stats(self, org_id: int) -> dict[str, Any]:
        """``{"supporters", "actions", "campaigns": {campaign_id: supporters}}`` of one org
        (docs/protocol.md, "org_stats"); zeros for an unknown org."""
        request = org_stats_request(org_id)
        if isinstance(request, Exception):
            raise request
        result: dict[str, Any] = await self.call(request)
        return result

    async def recent(self, campaign_id: int, tz: str = "UTC") -> dict[str, Any]:
        """Last hour, today and yesterday in ``tz`` (IANA), last 7 days, ``last_action_at``."""
        request = recent_request(campaign_id, {"tz": tz})
        if isinstance(request, Exception):
            raise request
        result: dict[str, Any] = await self.call(request)
        return result

    async def top(self, by: str = "supporters", limit: int = 10) -> list[list[int]]:
        """``[[campaign_id, value], ...]``, highest first, by ``supporters``, ``last_hour`` or
        ``today`` (UTC)."""
        request = top_request({"by": by, "limit": limit})
        if isinstance(request, Exception):
            raise request
        result: list[list[int]] = await self.call(request)
        return result

    async def set_goals(
        self,
        campaign_id: int,
        supporters: Sequence[int] | None = None,
        area: Mapping[str, int] | None = None,
    ) -> None:
        """Replace a campaign's goals: ``supporters`` thresholds (None: the default ladder) and
        ``area`` quorums (None: none); docs/protocol.md, "set_goals". Raises
        :class:`~campaignstats.errors.Invalid` (or ``BadMessage``) and changes nothing when
        they are not valid."""
        opts = {
            "supporters": None if supporters is None else list(supporters),
            "area": None if area is None else dict(area),
        }
        request = set_goals_request(campaign_id, opts)
        if isinstance(request, Exception):
            raise request
        await self.call(request)

    async def get_goals(self, campaign_id: int) -> dict[str, Any]:
        """``{"supporters", "reached", "next", "area", "areas_reached"}`` (docs/protocol.md,
        "get_goals")."""
        result: dict[str, Any] = await self.call(GetGoals(campaign_id))
        return result

    async def flush(self, *, keep_metrics: bool = False) -> None:
        """Return once everything queued before this call has been applied (and the metrics
        committed; when their log cannot be written see :class:`~campaignstats.requests.Flush`)."""
        await self.call(Flush(keep_metrics))

    async def info(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(Info())
        return result

    async def resync(self, scope: str | Sequence[int] = "all") -> bool:
        """Start a calculation (``all``, ``live`` or ids); False when one is already running."""
        if scope == "all" or scope == "live":
            result = await self.call(Resync("all" if scope == "all" else "live"))
        elif isinstance(scope, str):
            raise Invalid("scope must be 'all', 'live' or a list of campaign ids")
        else:
            result = await self.call(Resync(list(scope)))
        return bool(result["started"])

    async def watch(self, campaign_id: int, subscriber: Subscriber) -> None:
        await self.call(Subscribe(campaign_id, subscriber))

    async def unwatch(self, campaign_id: int | None, subscriber: Subscriber) -> None:
        await self.call(Unsubscribe(campaign_id, subscriber))

    def unwatch_nowait(self, subscriber: Subscriber) -> None:
        """Forget a subscriber everywhere (a closed connection), at once and whatever the load.

        The registry belongs to the supervisor and lives on this event loop, so this needs no
        mailbox round trip that a full mailbox could lose.
        """
        self.supervisor.registry.remove(None, subscriber)

    async def subscribe(self, *campaign_ids: int) -> Subscription:
        """Updates of these campaigns, at most once per second each, as an async iterator."""
        subscription = Subscription(on_close=self.unwatch_nowait)
        for cid in campaign_ids:
            await self.watch(cid, subscription)
        return subscription

    def _check_running(self) -> None:
        if not self.running:
            raise ActorStopped("the stats service is not running")


def _increment_of(inc: IncrementLike) -> Increment:
    """Any item with an increment's fields, as an Increment (for the one validator)."""
    return Increment(
        inc.campaign_id,
        inc.org_id,
        inc.action_type,
        inc.area,
        inc.new_supporter,
        inc.count,
        inc.action_id,
        inc.txid,
        inc.at,
        inc.page,
        inc.messages,
    )


@contextlib.asynccontextmanager
async def open_stats(
    dsn: str | None = None,
    *,
    data_dir: Path | str = ".campaignstats",
    sync_interval: float = 60.0,
    snapshot_path: Path | str | None = None,
    statement_timeout: float = 60.0,
    config: ActorConfig | None = None,
    **service_options: Any,
) -> AsyncIterator[StatsService]:
    """Run the stats service in this event loop for the duration of the block.

    ``dsn`` is a Postgres URL; without one, the embedded Postgres in ``data_dir`` is used.
    """
    from campaignstats.db.embedded import resolve_dsn
    from campaignstats.db.source import PostgresSource

    dsn, embedded = await resolve_dsn(dsn, data_dir)
    base = config or ActorConfig()
    config = replace(
        base,
        sync_interval=sync_interval,
        snapshot_path=Path(snapshot_path) if snapshot_path is not None else base.snapshot_path,
    )
    service = StatsService(
        PostgresSource(dsn, statement_timeout=statement_timeout), config, **service_options
    )
    await service.start()
    try:
        yield service
    finally:
        await service.stop()
        if embedded is not None:
            embedded.close()
