"""The stats service in-process: the embedding API, and what the socket server runs on.

    async with campaignstats.open_stats(dsn="postgresql://...") as stats:
        stats.increment(campaign_id=1, org_id=2, action_type="register", new_supporter=True)
        print(await stats.stats(1))

:class:`StatsService` owns the mailbox and the supervisor task; every method is a message to the
actor. ``increment`` never waits (it raises :class:`~campaignstats.errors.Overloaded` when the
mailbox is full); ``send`` waits for room, which is how the socket server applies backpressure.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import structlog

from campaignstats.actor.actor import ActorConfig, Source
from campaignstats.actor.mailbox import DEFAULT_MAILBOX_SIZE, Mailbox
from campaignstats.actor.messages import (
    READS,
    Ask,
    Flush,
    GetInfo,
    GetStats,
    GetStatsMany,
    Increments,
    RejectedCallback,
    Request,
    Resync,
    Stop,
    Subscribe,
    Unsubscribe,
)
from campaignstats.actor.subscriptions import Subscriber, Subscription
from campaignstats.actor.supervisor import Supervisor
from campaignstats.errors import ActorStopped, Invalid, Overloaded
from campaignstats.model import DEFAULT_MAX_STRING, Increment, WireStats, check_increment

if TYPE_CHECKING:
    from campaignstats.model import Scope

log = structlog.get_logger(__name__)

DEFAULT_CALL_TIMEOUT = 10.0


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
        self.mailbox = Mailbox(mailbox_size)
        self.supervisor = Supervisor(
            self.mailbox, source, self.config, max_restarts=max_restarts, window=restart_window
        )
        self.call_timeout = call_timeout
        self.max_string = max_string
        self._task: asyncio.Task[None] | None = None
        #: this process's last message in the normal lane: its reads never overtake its writes
        self._last_sequence = 0

    # -- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("already started")
        self._task = asyncio.create_task(self.supervisor.run(), name="campaignstats-supervisor")
        self._task.add_done_callback(self._on_supervisor_done)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self, timeout: float = 30.0) -> None:
        """Apply what the mailbox holds, write the snapshot (if configured), stop."""
        task = self._task
        if task is None or task.done():
            return
        await self.mailbox.put(Stop())
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            log.error("service.stop_timeout", timeout=timeout)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def loaded(self) -> None:
        """Wait until a full calculation has been merged (memory then matches the database).

        Queries are answered before that, from the snapshot file or from zeros; wrap this in
        ``asyncio.timeout()`` if the database may be down.
        """
        await self.supervisor.lifetime.loaded.wait()

    async def wait(self) -> None:
        """Wait until the supervisor ends; raises its error (e.g. it gave up restarting)."""
        if self._task is not None:
            await self._task

    def _on_supervisor_done(self, task: asyncio.Task[None]) -> None:
        # Whatever is still queued will never be answered: say so instead of hanging callers.
        self.mailbox.close()
        self._fail_queued()

    def _fail_queued(self) -> None:
        dropped = 0
        while (msg := self.mailbox.get_nowait()) is not None:
            if isinstance(msg, Ask) and not msg.reply.done():
                msg.reply.set_exception(ActorStopped("the stats actor has stopped"))
            elif isinstance(msg, Increments):
                dropped += len(msg.items)
        if dropped:
            log.warning("service.increments_dropped_at_stop", increments=dropped)
        if self.mailbox.statistics().blocked_producers:
            # Producers that were waiting for room enqueue now that there is some: fail theirs too.
            asyncio.get_running_loop().call_later(0.01, self._fail_queued)

    # -- increments -----------------------------------------------------------------------------

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
        """Count one action, without waiting. Raises Invalid, Overloaded or ActorStopped."""
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
        error = check_increment(inc, self.max_string)
        if error is not None:
            raise error
        self._check_running()
        self._last_sequence = self.mailbox.put_nowait(Increments((inc,)))

    async def send(
        self, increments: Sequence[Increment], on_rejected: RejectedCallback | None = None
    ) -> None:
        """Queue a batch of already validated increments, waiting while the mailbox is full."""
        self._check_running()
        self._last_sequence = await self.mailbox.put(Increments(increments, on_rejected))

    # -- calls ----------------------------------------------------------------------------------

    async def call(self, request: Request, timeout: float | None = None) -> Any:
        self._check_running()
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        async with asyncio.timeout(self.call_timeout if timeout is None else timeout):
            ask = Ask(request, reply)
            if isinstance(request, READS) and self.mailbox.taken_up_to(self._last_sequence):
                try:
                    self.mailbox.put_read_nowait(ask)
                except Overloaded:
                    self._last_sequence = await self.mailbox.put(ask)
            else:
                self._last_sequence = await self.mailbox.put(ask)  # waiting for room counts too
            return await reply

    async def stats(self, campaign_id: int) -> WireStats:
        result: WireStats = await self.call(GetStats(campaign_id))
        return result

    async def stats_many(self, campaign_ids: Sequence[int]) -> dict[int, WireStats]:
        result: dict[int, WireStats] = await self.call(GetStatsMany(list(campaign_ids)))
        return result

    async def flush(self) -> None:
        """Return once everything queued before this call has been applied."""
        await self.call(Flush())

    async def info(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(GetInfo())
        return result

    async def resync(self, scope: str | Sequence[int] = "all") -> bool:
        """Start a calculation (``all``, ``live`` or ids); False when one is already running."""
        if scope == "all" or scope == "live":
            result = await self.call(Resync(cast("Scope", scope)))
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
