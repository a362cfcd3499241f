"""The stats actor: one task that owns all counts and is the only code that mutates them.

Everything reaches it through the :class:`~campaignstats.actor.mailbox.Mailbox`. It also owns the
schedule of calculations (start, every ``sync_interval``, retries with backoff), the exact merge of
their results, the drift measurement, and the throttled change notifications. It also owns the
custom metrics (:class:`~campaignstats.actor.metrics.MetricsKeeper`, docs/metrics.md), which no
calculation touches.

Time is handled without timer tasks: the loop knows its next deadlines (next calculation, next
publication) and waits on the mailbox at most until the nearest one.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import structlog

from campaignstats._version import __version__
from campaignstats.errors import ActorStopped, CalculationError, InternalError, UsageError
from campaignstats.goals import Event, GoalKeeper
from campaignstats.journal import EarlyHorizon
from campaignstats.model import (
    DEFAULT_MAX_KEYS,
    DEFAULT_PACK_IDLE,
    DEFAULT_PACK_INTERVAL,
    CalculationResult,
    CampaignDrift,
    Scope,
    StatsState,
    WireStats,
    scope_name,
)
from campaignstats.requests import (
    READS,
    Decrements,
    Flush,
    GetGoals,
    GetMetrics,
    GetOrgStats,
    GetPageStats,
    History,
    Increments,
    Info,
    MetricUpdates,
    Recent,
    Request,
    ResetMetrics,
    Resync,
    SetGoals,
    SetGuard,
    Stats,
    StatsMany,
    Subscribe,
    Top,
    Unsubscribe,
)
from campaignstats.shards import Refused, Shard, ShardFilter
from campaignstats.webhooks import Outbox, WebhookConfig

from .gcpolicy import GcPolicy
from .mailbox import Mailbox
from .messages import Ask, CalculationDone, CalculationFailed, Message, Stop, Tell
from .metrics import COMMIT_DELAY, TICK, MetricsConfig, MetricsKeeper
from .packing import Packing
from .snapshot import load_snapshot_with_goals, save_snapshot
from .subscriptions import DEFAULT_PUBLISH_INTERVAL, Registry

#: seconds between two looks at the campaigns that grew (docs/design.md, "Goals and milestones")
GOALS_TICK = 0.1
#: campaigns looked at in one step (a few milliseconds)
GOALS_SLICE = 5_000
#: campaigns merged between two looks at the clock (ActorConfig.merge_budget): one, so that a
#: step ends at most one campaign past the budget (4 measured 8-14 ms steps at the 5M demo); a
#: step also stops before a campaign as long as the longest so far would take it past
MERGE_GROUP = 1


class NotNow:
    """What :meth:`StatsActor.read` returns when its door is closed: ask through the mailbox."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NOT_NOW"


#: the read door is closed (see :meth:`StatsActor.read`)
NOT_NOW = NotNow()

log = structlog.get_logger(__name__)


class Source(Protocol):
    """Where calculations come from (:class:`campaignstats.db.source.PostgresSource`)."""

    async def calculate(self, scope: Scope) -> CalculationResult: ...


class HorizonSource(Protocol):
    """A source that tells what its snapshot holds as soon as it is taken, so that the
    journal is folded from then on (campaignstats.journal); it says so with
    ``reports_horizon = True``."""

    async def calculate(
        self, scope: Scope, *, on_horizon: Callable[[EarlyHorizon], None] | None = None
    ) -> CalculationResult: ...


@dataclass(slots=True)
class ActorConfig:
    sync_interval: float = 60.0  # seconds between calculations of live campaigns
    snapshot_path: Path | None = None
    max_keys: int = DEFAULT_MAX_KEYS
    max_campaigns: int | None = None
    publish_interval: float = DEFAULT_PUBLISH_INTERVAL
    backoff_initial: float = 1.0
    backoff_max: float = 30.0
    merge_slice: int = 2_000  # campaigns merged per step; the loop serves messages in between
    #: seconds of merging per step, at most (checked every MERGE_GROUP campaigns): a result of a
    #: few hundred campaigns with long histories is merged in steps of a few ms, not one of 0.2 s
    merge_budget: float = 0.005
    #: increments of one batch applied per step; queries are served between steps (a batch's
    #: own producer's queries still wait for all of it: docs/design.md, "Queries first")
    apply_slice: int = 250
    #: the custom metrics: log, fsync policy, snapshots, archive, limits (docs/metrics.md)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    #: the goals' durable log (events fired, goals set, deliveries; campaignstats.webhooks);
    #: None: kept in memory and in the snapshot only
    goals_log: Path | None = None
    #: where milestone and quorum events are posted (docs/design.md, "Webhooks")
    webhooks: WebhookConfig = field(default_factory=WebhookConfig)
    #: this server's part of the campaigns (``serve --shard K/N``, docs/scale.md); None: all
    shard: Shard | None = None
    #: no automatic full pass of the garbage collector while a calculation runs or merges, one
    #: full pass after (campaignstats.actor.gcpolicy; docs/design.md, "Memory"): the process's
    #: collector, so ``serve``'s choice (``--no-gc-policy``), off for an embedding process
    gc_policy: bool = False
    #: seconds with no change after which a campaign's counts are packed, 0: never; and
    #: seconds between two sweeps that pack them (campaignstats.actor.packing;
    #: docs/design.md, "Memory", round 3)
    pack_idle: float = DEFAULT_PACK_IDLE
    pack_interval: float = DEFAULT_PACK_INTERVAL
    #: test-only: called with every message before it is handled; raising crashes the actor
    fault_hook: Callable[[Message], None] | None = None

    def __post_init__(self) -> None:
        # A zero interval would start a calculation on every loop turn: a spinning core and
        # tens of thousands of "skipped" warnings a second.
        names = ("sync_interval", "publish_interval", "backoff_initial", "backoff_max")
        for name in (*names, "merge_budget"):
            value = getattr(self, name)
            if not value > 0 or value == float("inf"):
                raise UsageError(f"{name} must be a positive number of seconds, not {value!r}")
        if not 0 <= self.pack_idle < float("inf"):
            raise UsageError(f"pack_idle must be 0 or a positive number, not {self.pack_idle!r}")
        if not 0 < self.pack_interval < float("inf"):
            raise UsageError(
                f"pack_interval must be a positive number of seconds, not {self.pack_interval!r}"
            )
        if self.merge_slice < 1:
            raise UsageError(f"merge_slice must be at least 1, not {self.merge_slice!r}")
        if self.apply_slice < 1:
            raise UsageError(f"apply_slice must be at least 1, not {self.apply_slice!r}")
        problem = self.metrics.check() or self.webhooks.check()
        if problem is not None:
            raise UsageError(problem)
        if self.webhooks.urls and self.goals_log is None:
            raise UsageError(
                "webhooks need a durable outbox: give goals_log (serve: --snapshot, the outbox "
                "is kept beside it)"
            )


@dataclass(slots=True)
class Lifetime:
    """What outlives one actor incarnation: kept by the supervisor."""

    started_at: float = field(default_factory=time.time)
    #: set while the live actor has completed a full calculation since it started
    loaded: asyncio.Event = field(default_factory=asyncio.Event)
    restarts: int = 0
    #: numbers every calculation of every incarnation, so that a result meant for a dead actor
    #: (still in the mailbox after a restart) is never taken for the new actor's own
    generation: int = 0
    applied_before_restarts: int = 0
    rejected_before_restarts: int = 0
    #: the custom metrics and their open log: kept across restarts (opened by the first actor)
    metrics: MetricsKeeper | None = None
    #: goals and what was reached (campaignstats.goals), and their durable log
    goals: GoalKeeper = field(default_factory=GoalKeeper)
    outbox: Outbox | None = None
    #: the snapshot's goals and the log have been read into ``goals`` (by the first actor)
    goals_started: bool = False
    #: the garbage collector's policy (campaignstats.actor.gcpolicy): created by the first
    #: actor, so that a calculation's held passes are released by the actor that merges next
    gc: GcPolicy | None = None


@dataclass(slots=True)
class _Merge:
    result: CalculationResult
    ids: Iterator[int]
    t0: float
    drifts: list[CampaignDrift] = field(default_factory=list)
    longest_step: float = 0.0
    #: steps taken so far (``info``'s ``last_calculation.merge_steps``)
    steps: int = 0
    #: the longest one campaign's merge took so far: a step stops early enough for another
    longest_campaign: float = 0.0


def open_outbox(config: ActorConfig, lifetime: Lifetime) -> None:
    """Open the goals' durable log unless open (an OSError or LogError names its path)."""
    if lifetime.outbox is None and (config.goals_log is not None or config.webhooks.urls):
        lifetime.outbox = Outbox(config.goals_log, config.webhooks.urls)


@dataclass(slots=True)
class _Slicing:
    """A batch of increments (or decrements) being applied a slice at a time."""

    tell: Tell
    items: Sequence[Any]  # this shard's items of the batch
    decrement: bool
    foreign: Refused | None  # the items of other shards' campaigns, refused
    done: int = 0  # items applied so far
    rejected: list[tuple[int, str]] = field(default_factory=list)


class StatsActor:
    def __init__(
        self,
        mailbox: Mailbox,
        source: Source,
        registry: Registry,
        config: ActorConfig,
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
        lifetime: Lifetime,
        incarnation: int = 0,
        state: StatsState | None = None,
    ) -> None:
        self.mailbox = mailbox
        self.source = source
        self.registry = registry
        self.config = config
        self.lifetime = lifetime
        self.incarnation = incarnation
        self._spawn = spawn
        #: a restarted actor inherits its predecessor's counts when they can be trusted
        #: (Supervisor), rather than going back to a snapshot file that may be days old
        self._inherited = state is not None
        #: counts were there before the first calculation: a snapshot file, or kept across a
        #: restart (so /readyz can answer ready before the database is reachable)
        self._head_start = self._inherited
        self.state = state or StatsState(
            max_keys=config.max_keys, max_campaigns=config.max_campaigns
        )
        #: idle campaigns packed (campaignstats.actor.packing): the merge and a snapshot's load
        #: read ``pack_idle`` off the state, the sweep packs the rest
        self.state.pack_idle = config.pack_idle
        self.packing = Packing(config.pack_idle, config.pack_interval, config.merge_budget)
        self.rejected = 0
        #: refuses changes and calls of campaigns another shard owns (docs/scale.md)
        self._shard = None if config.shard is None else ShardFilter(config.shard)
        # calculations
        self._generation = -1  # the generation this actor waits for
        self._calc_task: asyncio.Task[None] | None = None
        self._running: tuple[str, float] | None = None  # (kind, wall-clock start)
        self._merge: _Merge | None = None
        self._slicing: _Slicing | None = None
        self._loaded = False  # a full calculation has succeeded since this actor started
        self._next_calc_at = 0.0  # monotonic; 0 = now
        self._failures_in_row = 0
        self.completed = 0
        self.failed = 0
        self.skipped = 0
        self.last_calculation: dict[str, Any] | None = None
        self.last_error: str | None = None
        # notifications
        self._next_publish_at: float | None = None
        self._next_goals_at: float | None = None
        self._goals_backlog: list[int] = []
        if lifetime.gc is None:
            lifetime.gc = GcPolicy(config.gc_policy)
        self.gc: GcPolicy = lifetime.gc
        # custom metrics (opened in run(): a restarted actor keeps its predecessor's)
        self.metrics: MetricsKeeper = lifetime.metrics  # type: ignore[assignment]
        self._next_metrics_tick = 0.0
        #: the message being handled, for the crash report
        self.current: Message | None = None
        #: the read door is open (:meth:`read`): the loop runs and has not stopped
        self._serving = False

    # -- life cycle -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Rebuild the state (snapshot, then a full calculation), then serve until :class:`Stop`."""
        if self.lifetime.metrics is None:
            self.lifetime.metrics = MetricsKeeper(self.config.metrics)
        else:
            self.lifetime.metrics.check()  # kept across the restart, once checked
        self.metrics = self.lifetime.metrics
        open_outbox(self.config, self.lifetime)
        self._next_metrics_tick = time.monotonic() + TICK
        self.mailbox.end_partial()  # a predecessor may have crashed in the middle of a batch
        if self._inherited:
            log.info("actor.kept_counts", campaigns=len(self.state.campaigns))
        elif self.config.snapshot_path is not None:
            # A state that packs gets them packed row by row (never every campaign's dicts)
            loaded = load_snapshot_with_goals(
                self.config.snapshot_path, packed=self.state.pack_idle > 0
            )
            if loaded is not None:
                campaigns, goals = loaded
                if self._shard is not None:  # a file of another layout: only this shard's
                    held = len(campaigns)
                    campaigns, goals = self._shard.restrict_snapshot(campaigns, goals)
                    if len(campaigns) < held:
                        log.info(
                            "snapshot.foreign_campaigns_dropped",
                            shard=str(self._shard.shard),
                            dropped=held - len(campaigns),
                            kept=len(campaigns),
                        )
                self.state.replace_all(campaigns)
                self._head_start = True
                if not self.lifetime.goals_started:
                    self._load_goals(campaigns, goals)
        if not self.lifetime.goals_started:
            self.lifetime.goals_started = True
            if self.lifetime.outbox is not None:
                self.lifetime.outbox.replay_into(self.lifetime.goals)
        if self.state.ranking.moved:  # kept across a restart: looked at soon
            self._next_goals_at = time.monotonic() + GOALS_TICK
        self._start_calculation("all")
        self._next_calc_at = time.monotonic() + self.config.sync_interval
        self.packing.schedule(time.monotonic())
        # The fault hook (tests) sees every message: its queries stay messages.
        self._serving = self.config.fault_hook is None
        try:
            await self._loop()
        finally:
            self._serving = False
            self.abandon()

    def _load_goals(self, campaigns: dict[int, Any], goals: dict[str, Any] | None) -> None:
        """The snapshot's goals part, then its counts as the baseline: what they pass is reached
        (docs/design.md, "Goals and milestones": first sight)."""
        keeper = self.lifetime.goals
        if goals is not None:
            for problem in keeper.load_snapshot(goals):  # a bad entry costs that entry only
                log.error("snapshot.goals_entry_skipped", problem=problem)
        for cid, stats in campaigns.items():
            keeper.baseline(cid, stats)

    def abandon(self) -> None:
        """Cancel this incarnation's calculation (its result would go to a dead state)."""
        if self._calc_task is not None and not self._calc_task.done():
            self._calc_task.cancel()
        self._calc_task = None

    async def _loop(self) -> None:
        mailbox = self.mailbox
        get_nowait = mailbox.get_nowait
        handle = self._handle
        get_read_nowait = mailbox.get_read_nowait
        while True:
            if self.gc.due_at is not None and time.monotonic() >= self.gc.due_at:
                # The collector's full pass after a merge (campaignstats.actor.gcpolicy), in a
                # turn of the loop of its own: not after a step of ours in the same turn.
                await asyncio.sleep(0)
                self.gc.collect_if_due(time.monotonic())
                await asyncio.sleep(0)
                continue
            if self._slicing is not None:
                # A large batch: the queries that came meanwhile (only those: the normal lane
                # waits for the rest of the batch), then one slice, then the event loop. Queries
                # first: one that came in the last turn of the loop does not wait for a slice.
                while (msg := get_read_nowait()) is not None:
                    handle(msg)
                self._apply_slice()
                if self._slicing is not None:
                    await asyncio.sleep(0)
                continue
            if self._merge is not None:
                # Merge one slice, then serve what arrived meanwhile: no long stall, and the
                # journal keeps the not-yet-merged campaigns exact.
                self._merge_step()
                if self._serve_between_steps(merging=True):
                    return
                await asyncio.sleep(0)
                continue
            if self.packing.sweep is not None:
                # Idle campaigns packed a slice at a time, serving what arrived in between, as
                # the merge does (a write to a campaign packed in an earlier slice unpacks it).
                self.packing.step(self.state)
                if self._serve_between_steps(merging=False):
                    return
                await asyncio.sleep(0)
                continue
            msg = get_nowait()
            if msg is None:
                # Idle: what was applied is written before the wait (Redis writes its AOF
                # buffer before going back to its event loop).
                self.metrics.commit_quietly()
                now = time.monotonic()
                self._check_timers(now)
                try:
                    async with asyncio.timeout(self._until_next_deadline(now)):
                        msg = await mailbox.get()
                except TimeoutError:
                    continue
            if handle(msg):
                return
            self._check_timers(time.monotonic())

    def _serve_between_steps(self, *, merging: bool) -> bool:
        """Between two steps of a merge or a sweep: what arrived meanwhile (up to 1,000
        messages), until a large batch begins (its slices come first) or, during a sweep, a
        merge; then the timers. True when a message said to stop."""
        get_nowait = self.mailbox.get_nowait
        for _ in range(1_000):
            msg = get_nowait()
            if msg is None:
                break
            if self._handle(msg):
                return True
            if self._slicing is not None or (not merging and self._merge is not None):
                break
        self._check_timers(time.monotonic())
        return False

    def _until_next_deadline(self, now: float) -> float:
        deadline = min(self._next_calc_at, self._next_metrics_tick)
        if self.metrics.copying:  # a compaction's copy, in slices (docs/metrics.md)
            deadline = min(deadline, self.metrics.next_slice_at)
        if self._next_publish_at is not None:
            deadline = min(deadline, self._next_publish_at)
        if self._next_goals_at is not None:
            deadline = min(deadline, self._next_goals_at)
        if self.gc.due_at is not None:
            deadline = min(deadline, self.gc.due_at)
        if self.packing.enabled:
            deadline = min(deadline, self.packing.next_at)
        if self.state.org_forgetting is not None:  # steps left: the next one at once
            deadline = now
        return max(0.0, deadline - now)

    def _check_timers(self, now: float) -> None:
        if now >= self._next_calc_at:
            self._tick(now)
        if self._next_publish_at is not None and now >= self._next_publish_at:
            self._publish()
        if self._next_goals_at is not None and now >= self._next_goals_at:
            self._check_goals()
        metrics = self.metrics
        if metrics.dirty_since is not None and now - metrics.dirty_since >= COMMIT_DELAY:
            metrics.commit_quietly()  # a steady load never empties the mailbox
        if now >= self._next_metrics_tick:
            self._next_metrics_tick = now + TICK
            metrics.tick(now)
        if metrics.copying and now >= metrics.next_slice_at:
            metrics.copy_step(now)
        self.packing.start_if_due(self.state, now)
        if self.state.org_forgetting is not None:
            self.state.forget_step()  # forgotten campaigns leaving the org index, a step a turn

    # -- messages -------------------------------------------------------------------------------

    def _handle(self, msg: Message) -> bool:
        """Handle one message; True means stop."""
        self.current = msg
        if self.config.fault_hook is not None:
            self.config.fault_hook(msg)
        handler = self._handlers.get(type(msg))
        if handler is None:
            raise InternalError(f"unknown message type {type(msg).__name__}")
        if handler(msg):
            return True  # current stays Stop: a crash from here on is one while stopping
        self.current = None
        return False

    @functools.cached_property
    def _handlers(self) -> dict[type[Any], Callable[[Any], bool | None]]:
        """What each kind of mailbox message is handed to; a true result means stop."""
        return {
            Tell: self._apply,
            Ask: self._answer,
            CalculationDone: self._on_result,
            CalculationFailed: self._on_failure,
            Stop: self._stop,
        }

    def _stop(self, _: Stop) -> bool:
        self._serving = False  # the state is final: what comes later is ActorStopped's
        self._drain_and_stop()
        return True

    def _apply(self, tell: Tell) -> None:
        self._casts[type(tell.cast)](tell)

    @functools.cached_property
    def _casts(self) -> dict[type[Any], Callable[[Any], None]]:
        """What each cast of campaignstats.requests is handed to, by its type."""
        return {
            Increments: self._apply_changes,
            Decrements: self._apply_changes,
            MetricUpdates: self._apply_metrics,
        }

    def _apply_metrics(self, tell: Tell) -> None:
        """Apply metrics updates; a refused one (a limit) or a refused name (a guard) is reported
        like a refused increment item. Committed before the next ``flush`` is answered."""
        items = tell.cast.items
        foreign = None
        if self._shard is not None:  # another shard's campaigns: refused (docs/scale.md)
            items, foreign = self._shard.split(items)
        results = self.metrics.apply_many(items, tell.origin)
        rejected: list[tuple[int, str]] = []
        for i, result in enumerate(results):
            if result.error is not None:
                rejected.append((i, str(result.error)))
            elif result.refused:
                names = ", ".join(f"{n!r} ({why})" for n, why in sorted(result.refused.items()))
                rejected.append((i, f"refused by a guard: {names}"))
        if foreign is not None:
            rejected = foreign.report(rejected)
        if tell.on_rejected is not None and (rejected or tell.report_empty):
            try:
                tell.on_rejected(rejected)
            except Exception:
                log.exception("actor.on_rejected_failed")

    def _flush(self, keep_metrics: bool = False) -> None:
        """Everything before the flush is applied; the metrics are committed (acknowledged), or
        raise (dropped unless ``keep_metrics``: docs/metrics.md, "A failed commit"); a
        producer whose casts an earlier failure dropped is told so, once."""
        self._check_goals(whole=True)  # and the goals it reached have fired
        self.metrics.flush(self._origin(), keep=keep_metrics)

    def _origin(self) -> int | None:
        """The producer (a socket connection) of the call being answered, or None."""
        ask = self.current
        return ask.origin if type(ask) is Ask else None

    def _apply_changes(self, tell: Tell) -> None:
        cast = tell.cast
        assert not isinstance(cast, MetricUpdates)
        items = cast.items
        decrement = type(cast) is Decrements
        foreign = None
        if self._shard is not None:  # items of other shards' campaigns: refused, not applied
            items, foreign = self._shard.split(items)
        if len(items) > self.config.apply_slice:
            # Applied a slice at a time by the loop, queries served in between; the batch
            # counts as taken (for its producer's queries) once its last slice is applied.
            self._slicing = _Slicing(tell, items, decrement, foreign)
            self.mailbox.begin_partial()
            self._apply_slice()
            return
        self._applied(tell, items, foreign, self.state.apply_many(items, decrement=decrement))

    def _apply_slice(self) -> None:
        slicing = self._slicing
        assert slicing is not None
        self.current = slicing.tell  # for the crash report
        start = slicing.done
        end = start + self.config.apply_slice
        part = slicing.items[start:end]
        rejected = self.state.apply_many(part, decrement=slicing.decrement)
        if rejected:
            slicing.rejected.extend((start + i, reason) for i, reason in rejected)
        slicing.done = start + len(part)
        if slicing.done < len(slicing.items):
            self.current = None
            return
        self._slicing = None
        self.mailbox.end_partial()
        self._applied(slicing.tell, slicing.items, slicing.foreign, slicing.rejected)
        self.current = None

    def _applied(
        self,
        tell: Tell,
        items: Sequence[Any],
        foreign: Refused | None,
        rejected: list[tuple[int, str]],
    ) -> None:
        """After a whole batch: count and report what was refused (``rejected`` numbered among
        ``items``, this shard's), mark watched campaigns, wake the goals."""
        reported = rejected if foreign is None else foreign.report(rejected)
        if reported:
            self.rejected += len(reported)
        if self._next_goals_at is None and self.state.ranking.moved:
            self._next_goals_at = time.monotonic() + GOALS_TICK
        if tell.on_rejected is not None and (reported or tell.report_empty):
            try:
                tell.on_rejected(reported)
            except Exception:
                log.exception("actor.on_rejected_failed")
        watchers = self.registry.watchers
        if watchers:
            dirty = self.registry.dirty
            if rejected:  # a campaign whose items were all refused has not changed
                refused = {i for i, _ in rejected}
                for i, inc in enumerate(items):
                    if i not in refused and inc.campaign_id in watchers:
                        dirty.add(inc.campaign_id)
            else:
                for inc in items:
                    if inc.campaign_id in watchers:
                        dirty.add(inc.campaign_id)
            if dirty and self._next_publish_at is None:
                self._next_publish_at = time.monotonic() + self.config.publish_interval

    def _answer(self, ask: Ask) -> None:
        reply = ask.reply
        if reply.done():
            # The caller gave up (timeout, closed connection) before the actor got here: doing
            # the request now would act for nobody, and a ``sub`` would register a subscriber
            # that no one will ever unregister.
            return
        try:
            result = self._call(ask.request)
        except Exception as exc:  # the caller gets the error; the actor keeps running
            reply.set_exception(exc)
        else:
            reply.set_result(result)
        if ask.then is not None:
            try:
                ask.then(reply)
            except Exception:  # the caller's, not the actor's: logged, never a crash
                log.exception("actor.reply_callback_failed")

    # -- the read door (docs/design.md, "Queries inline") -----------------------------------------

    def read(self, request: Request) -> Any:
        """Answer a read-only request (``READS``) now, in the caller's turn of the event loop,
        with the answer the mailbox would give; raises the error it would give. Returns
        :data:`NOT_NOW` when the door is closed (the actor is not serving: not started yet,
        stopping, stopped, or a test's fault hook watches every message).

        The only way into the state from outside the actor's own task, and a narrow one: only
        requests that read, and only while the actor waits in its loop. Its handlers never
        await, so whenever another callback runs, the actor is between two messages or between
        two slices of a batch (each increment applied whole: the state is the one a query in
        the read lane would see there). Whether the caller may overtake what is queued is the
        caller's rule to keep (:meth:`~campaignstats.service.Producer.read_now`).
        """
        if not self._serving:
            return NOT_NOW
        if not isinstance(request, READS):
            raise UsageError(f"{type(request).__name__} is not a read-only request")
        return self._call(request)

    def _call(self, request: Request) -> Any:
        handler = self._requests.get(type(request))
        if handler is None:
            raise InternalError(f"unknown request {type(request).__name__}")
        if self._shard is not None:
            self._shard.check_request(request)  # WrongShard: another shard owns it
        return handler(request)

    @functools.cached_property
    def _requests(self) -> dict[type[Any], Callable[[Any], Any]]:
        """The answer to each request of campaignstats.requests, by its type."""
        return {
            Stats: lambda r: self.state.stats(r.campaign_id),
            StatsMany: lambda r: {cid: self.state.stats(cid) for cid in r.campaign_ids},
            Flush: lambda r: self._flush(r.keep_metrics),
            Info: lambda r: self.info(),
            Resync: lambda r: {"started": self._request_calculation(r.scope)},
            Subscribe: lambda r: self.registry.add(r.campaign_id, r.subscriber),
            Unsubscribe: lambda r: self.registry.remove(r.campaign_id, r.subscriber),
            GetMetrics: lambda r: self.metrics.metrics(r.campaign_id),
            ResetMetrics: lambda r: {
                "found": self.metrics.reset(r.campaign_id, r.name, self._origin())
            },
            SetGuard: lambda r: self.metrics.set_guard(
                r.campaign_id, r.name, r.deadline, r.min_period, self._origin()
            ),
            History: lambda r: self.state.history(r.campaign_id, r.unit, r.start, r.end, r.page),
            GetPageStats: lambda r: self.state.page_stats(r.page_id),
            GetOrgStats: lambda r: self.state.org_stats(r.org_id),
            Recent: lambda r: self.state.recent(r.campaign_id, r.tz),
            Top: lambda r: self.state.top(r.by, r.limit),
            SetGoals: self._set_goals,
            GetGoals: self._get_goals,
        }

    def _get_goals(self, request: GetGoals) -> dict[str, Any]:
        self._check_goals(whole=True)  # what the counts reached so far is in the answer
        return self.lifetime.goals.goals(request.campaign_id)

    def _set_goals(self, request: SetGoals) -> None:
        self._check_goals(whole=True)  # what the counts reached under the old goals fires first
        keeper = self.lifetime.goals
        cid = request.campaign_id
        before = (keeper.custom.get(cid), keeper.quorums.get(cid))
        keeper.set_goals(cid, request.spec, self.state.campaigns.get(cid))
        if self.lifetime.outbox is not None:
            try:
                self.lifetime.outbox.record_goals(cid, request.spec, keeper)
            except OSError as exc:
                # Not durable: not set (the caller gets the error; what was reached stays).
                custom, quorums = before
                keeper.custom.pop(cid, None)
                keeper.quorums.pop(cid, None)
                if custom is not None:
                    keeper.custom[cid] = custom
                if quorums is not None:
                    keeper.quorums[cid] = quorums
                raise InternalError(f"set_goals: the goals log cannot be written: {exc}") from exc
        log.info(
            "goals.set",
            campaign_id=cid,
            supporters=request.spec.supporters,
            area=None if request.spec.area is None else dict(request.spec.area),
        )

    def _check_goals(self, whole: bool = False) -> None:
        """The campaigns whose supporters moved since the last look: which goals they reached.
        A few times a second, not per batch: the hot path already notes the campaigns that move
        (for ``top``), so the goals cost it nothing per increment."""
        self._next_goals_at = None
        state = self.state
        backlog = self._goals_backlog
        moved = state.ranking.take_moved()
        if moved:
            backlog.extend(moved)
        if not backlog:
            return
        if whole or len(backlog) <= GOALS_SLICE:
            ids, self._goals_backlog = backlog, []
        else:
            # After a calculation every merged campaign has moved: look at them a slice at a
            # time, serving messages in between (no long stall).
            ids, self._goals_backlog = backlog[:GOALS_SLICE], backlog[GOALS_SLICE:]
            self._next_goals_at = time.monotonic()
        events = self.lifetime.goals.check(ids, state.campaigns, time.time())
        if events:
            self._fire(events)

    def _fire(self, events: list[tuple[int, Event]]) -> None:
        """Events first reached: made durable (the outbox), then pushed to the subscribers."""
        outbox = self.lifetime.outbox
        if outbox is not None:
            outbox.fire(events)
        watchers = self.registry.watchers
        for cid, event in events:
            log.info("goals.reached", campaign_id=cid, **event)
            for subscriber in list(watchers.get(cid, ())):
                push_event = getattr(subscriber, "push_event", None)
                if push_event is None:
                    continue
                try:
                    push_event(cid, event)
                except Exception:
                    log.exception("subscriber.push_failed", campaign_id=cid)
                    self.registry.remove(None, subscriber)

    def _drain_and_stop(self) -> None:
        """Apply what is already in the mailbox, write the snapshot."""
        drained = 0
        while self._slicing is not None:
            self._apply_slice()
        while (msg := self.mailbox.get_nowait()) is not None:
            if type(msg) is Tell or type(msg) is Ask:
                self._handle(msg)
                drained += 1
                while self._slicing is not None:
                    self._apply_slice()
        self.abandon()
        if self._merge is not None:
            # A half-merged result is still exact per campaign; finish it before saving.
            while self._merge is not None:
                self._merge_step()
        # Goals reached by the last changes fire now: the snapshot's counts are the next
        # start's baseline, which would record them silently.
        self._check_goals(whole=True)
        self.save_snapshot()
        self.metrics.close()
        log.info("actor.stopped", drained=drained, campaigns=len(self.state.campaigns))

    def save_after_crash(self) -> None:
        """The actor crashed while stopping: the goals its last changes reached fire first (the
        snapshot's counts are the next start's silent baseline), if they can, then the
        snapshot is written."""
        try:
            self._check_goals(whole=True)
        except Exception:
            log.exception("goals.check_failed_while_stopping")
        self.save_snapshot()

    def save_snapshot(self) -> None:
        """Write the snapshot file if configured; a failure is logged, never raised."""
        if self.config.snapshot_path is None:
            return
        try:
            save_snapshot(
                self.config.snapshot_path,
                self.state.campaigns,
                self.lifetime.goals.to_snapshot(),
            )
        except Exception as exc:
            log.error("snapshot.save_failed", path=str(self.config.snapshot_path), error=repr(exc))
            return
        if self.lifetime.outbox is not None:
            self.lifetime.outbox.compact()  # the snapshot holds the goals now

    # -- calculations ---------------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        interval = self.config.sync_interval
        self._next_calc_at = max(self._next_calc_at + interval, now + min(interval, 1.0))
        if self._running is not None:
            self.skipped += 1
            log.warning("calculation.skipped", reason="still running", kind=self._running[0])
            return
        self._start_calculation("live" if self._loaded else "all")

    def _request_calculation(self, scope: Any) -> bool:
        if self._running is not None:
            self.skipped += 1
            log.info("calculation.skipped", reason="still running", requested=scope_name(scope))
            return False
        self._start_calculation(scope)
        return True

    def _start_calculation(self, scope: Any) -> None:
        self.lifetime.generation += 1
        generation = self._generation = self.lifetime.generation
        kind = scope_name(scope)
        # Journal from now on: the snapshot is taken after this point, so anything applied from
        # here may or may not be in it, and the merge sorts that out by action id.
        self.state.start_journal(None if isinstance(scope, str) else scope)
        if isinstance(scope, str):  # "all", "live": no full pass until the merge is done
            self.gc.hold()  # (a few campaigns allocate little: the collector as usual)
        self._running = (kind, time.time())
        log.info("calculation.started", kind=kind, generation=generation)
        self._calc_task = self._spawn(self._calculate(generation, scope, kind))

    async def _calculate(self, generation: int, scope: Any, kind: str) -> None:
        """Runs in its own task: the actor keeps serving while Postgres works."""

        def on_horizon(early: EarlyHorizon) -> None:
            # Called by the calculation's task on the loop, between two steps of the actor:
            # only this calculation's journal takes it.
            if generation == self._generation and self._running is not None:
                self.state.fold_journal(early)

        try:
            if getattr(self.source, "reports_horizon", False):
                source = cast(HorizonSource, self.source)
                result = await source.calculate(scope, on_horizon=on_horizon)
            else:
                result = await self.source.calculate(scope)
            if self._shard is not None:  # whatever the source covered: the shard's only
                result = self._shard.restrict(result)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            message: Message = CalculationFailed(generation, kind, exc)
        else:
            message = CalculationDone(generation, result)
        await self.mailbox.put(message)

    def _on_result(self, msg: CalculationDone) -> None:
        if msg.generation != self._generation or self._running is None:
            return  # from a calculation this actor no longer waits for
        if self.state.journal_overflow:
            error = CalculationError(
                f"journal over {self.state.journal_limit} changes and folded keys while the "
                "calculation ran: its result cannot be merged exactly"
            )
            self._on_failure(CalculationFailed(msg.generation, msg.result.kind, error))
            return
        if not self.state.journal_fits(msg.result):
            error = CalculationError(
                "the snapshot the calculation reported before its result is not its result's: "
                "the journal folded by it cannot be merged"
            )
            self._on_failure(CalculationFailed(msg.generation, msg.result.kind, error))
            return
        result = msg.result
        self._merge = _Merge(result, iter(list(result.campaigns)), time.perf_counter())
        self._merge_step()  # small results merge at once

    def _merge_step(self) -> None:
        merge = self._merge
        assert merge is not None
        if self.state.journal_overflow:
            # The rest cannot be merged exactly; unmerged campaigns keep their memory values.
            self._merge = None
            error = CalculationError("journal overflow during the merge: the rest is skipped")
            self._on_failure(CalculationFailed(self._generation, merge.result.kind, error))
            return
        t0 = time.perf_counter()
        merge.steps += 1
        # At most merge_slice campaigns, a few at a time until merge_budget is spent: a step's
        # length is bounded by time, whatever a campaign's pages, buckets and journal cost.
        taken = 0
        while taken < self.config.merge_slice:
            want = min(MERGE_GROUP, self.config.merge_slice - taken)
            ids = [cid for _, cid in zip(range(want), merge.ids, strict=False)]
            if ids:
                taken += len(ids)
                t1 = time.perf_counter()
                self._merge_campaigns(merge, ids)
                merge.longest_campaign = max(merge.longest_campaign, time.perf_counter() - t1)
            if len(ids) < want:  # the result is merged whole
                if taken and time.perf_counter() - t0 >= self.config.merge_budget / 2:
                    break  # finished in the next step (a few ms at the 5M demo); small: now
                merge.longest_step = max(merge.longest_step, time.perf_counter() - t0)
                self._merge = None
                self._finish_calculation(merge)
                return
            # Not one more if the longest campaign so far would take the step past the budget: a
            # step ran the budget plus one large campaign (12 ms of CPU at the 5M demo). Counted
            # as at most half the budget: a campaign longer than the whole budget would otherwise
            # stop every later step after its first campaign (a merge of N campaigns, N steps).
            budget = self.config.merge_budget
            if time.perf_counter() - t0 + min(merge.longest_campaign, budget / 2) >= budget:
                break
        merge.longest_step = max(merge.longest_step, time.perf_counter() - t0)

    def _merge_campaigns(self, merge: _Merge, ids: list[int]) -> None:
        merge.drifts.extend(self.state.merge(merge.result, ids))
        events = self.lifetime.goals.merged(ids, self.state.campaigns, time.time())
        if events:
            self._fire(events)
        watchers = self.registry.watchers
        if watchers:
            self.registry.dirty.update(cid for cid in ids if cid in watchers)
            if self._next_publish_at is None:
                self._next_publish_at = time.monotonic() + self.config.publish_interval

    def _finish_calculation(self, merge: _Merge) -> None:
        result = merge.result
        gone = self.state.forget_absent(result)
        if gone:
            log.info("calculation.campaigns_gone", campaigns=gone[:20], count=len(gone))
        journal = self.state.journal_figures()  # what the merge replayed, for info and the soak
        self.state.stop_journal()
        self.gc.release(time.monotonic())
        self._running = None
        self._calc_task = None
        self.completed += 1
        self._failures_in_row = 0
        if result.kind == "all":
            self._loaded = True
            self.lifetime.loaded.set()
            if not self.lifetime.goals.loaded:
                self.lifetime.goals.mark_loaded()
        drifts = merge.drifts
        drift: dict[str, Any] = {
            "campaigns": len(drifts),
            "supporters": sum(abs(d.supporters) for d in drifts),
            "actions": sum(abs(d.actions) for d in drifts),
            "largest": [
                {"campaign_id": d.campaign_id, "supporters": d.supporters, "actions": d.actions}
                for d in sorted(drifts, key=lambda d: -abs(d.supporters) - abs(d.actions))[:5]
            ],
        }
        self.last_calculation = {
            "kind": result.kind,
            "started_at": result.started_at,
            "duration": round(result.duration, 4),
            "merge_duration": round(time.perf_counter() - merge.t0, 4),
            "longest_merge_step": round(merge.longest_step, 4),
            "merge_steps": merge.steps,
            "rows": result.rows,
            "campaigns": len(result.campaigns),
            "max_action_id": result.max_action_id,
            "drift": drift,
            "journal": journal,
        }
        log.info(
            "calculation.merged",
            kind=result.kind,
            campaigns=len(result.campaigns),
            duration=round(result.duration, 3),
            max_action_id=result.max_action_id,
            drift_campaigns=drift["campaigns"],
            drift_supporters=drift["supporters"],
            drift_actions=drift["actions"],
            largest_drift=drift["largest"][:3],
        )

    def _on_failure(self, msg: CalculationFailed) -> None:
        if msg.generation != self._generation or self._running is None:
            return
        self.state.stop_journal()
        self.gc.release(time.monotonic())
        self._running = None
        self._calc_task = None
        self.failed += 1
        self._failures_in_row += 1
        # The exponent is capped: 2.0 ** 1024 overflows a float, which after about 17 hours of
        # outage would crash the actor.
        doublings = min(self._failures_in_row - 1, 62)
        delay = self.config.backoff_initial * 2.0**doublings
        if delay > self.config.backoff_max * 2:  # 1, 2, 4 ... 30, then the normal interval
            delay = self.config.sync_interval
        else:
            delay = min(delay, self.config.backoff_max)
        self._next_calc_at = time.monotonic() + delay
        self.last_error = str(msg.error)
        log.warning(
            "calculation.failed",
            kind=msg.kind,
            error=str(msg.error),
            cause=repr(msg.error.__cause__) if msg.error.__cause__ else None,
            failures_in_row=self._failures_in_row,
            retry_in=delay,
        )

    # -- notifications --------------------------------------------------------------------------

    def _publish(self) -> None:
        registry = self.registry
        self._next_publish_at = None
        dirty, registry.dirty = registry.dirty, set()
        for cid in dirty:
            subscribers = registry.watchers.get(cid)
            if not subscribers:
                continue
            stats = self.state.stats(cid)
            for subscriber in list(subscribers):
                try:
                    subscriber.push(cid, stats)
                except Exception:
                    log.exception("subscriber.push_failed", campaign_id=cid)
                    registry.remove(None, subscriber)

    # -- info -----------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        lifetime = self.lifetime
        mailbox = self.mailbox.statistics()
        return {
            "version": __version__,
            "uptime": round(time.time() - lifetime.started_at, 3),
            "campaigns": len(self.state.campaigns),
            "increments_applied": lifetime.applied_before_restarts + self.state.applied,
            "rejected": lifetime.rejected_before_restarts + self.rejected,
            "mailbox": {
                "depth": mailbox.depth,
                "capacity": mailbox.capacity,
                "blocked_producers": mailbox.blocked_producers,
            },
            "calculations": {
                "running": self._running[0] if self._running else None,
                "completed": self.completed,
                "failed": self.failed,
                "skipped": self.skipped,
                "last_error": self.last_error,
                "loaded": self._loaded,
                "snapshot_loaded": self._head_start,
            },
            "last_calculation": self.last_calculation,
            "subscriptions": self.registry.count(),
            "restarts": lifetime.restarts,
            "already_counted": self.state.already_counted,
            "decrements_applied": self.state.decremented,
            "clamped": self.state.clamped,
            "page_mismatches": self.state.page_mismatches,
            "pages_over_limit": self.state.pages_over_limit,
            "metrics": self.metrics.info(),
            "goals": {
                **self.lifetime.goals.info(),
                "webhooks": None if self.lifetime.outbox is None else self.lifetime.outbox.info(),
            },
            "shard": None if self.config.shard is None else self.config.shard.to_wire(),
            "gc": self.gc.info(),
            "packing": self.packing.info(),
            "limits": {
                "max_keys": self.config.max_keys,
                "max_campaigns": self.config.max_campaigns,
                "mailbox": mailbox.capacity,
            },
        }

    def stats(self, campaign_id: int) -> WireStats:
        return self.state.stats(campaign_id)


__all__ = ["NOT_NOW", "ActorConfig", "ActorStopped", "Lifetime", "NotNow", "Source", "StatsActor"]
