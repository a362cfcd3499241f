"""The supervisor: restarts the actor when it crashes, within a restart intensity (as in OTP).

The mailbox, the subscriptions and the client connections belong to the supervisor, so they
survive a restart. The message that crashed the actor is logged and dropped (a call waiting on
it gets :class:`~campaignstats.errors.InternalError`); the new actor rebuilds its state from the
snapshot file, if any, and a full calculation. The custom metrics and their open log are kept
(in the :class:`~campaignstats.actor.actor.Lifetime`) once their state passes its own check, else
they are reloaded from their files. More than ``max_restarts`` crashes within ``window`` seconds
means something is badly wrong: :class:`SupervisorGaveUp` is raised, and the process exits
non-zero so that systemd (or the like) restarts it whole.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

import structlog

from campaignstats.errors import InternalError, StatsError
from campaignstats.model import StatsState

from .actor import ActorConfig, Lifetime, Source, StatsActor, open_outbox
from .mailbox import Mailbox
from .messages import Ask, Stop
from .metrics import MetricsKeeper
from .subscriptions import Registry

log = structlog.get_logger(__name__)


class SupervisorGaveUp(StatsError):
    """The actor crashed more often than the restart intensity allows."""


class Supervisor:
    def __init__(
        self,
        mailbox: Mailbox,
        source: Source,
        config: ActorConfig,
        *,
        max_restarts: int = 5,
        window: float = 60.0,
    ) -> None:
        self.mailbox = mailbox
        self.source = source
        self.config = config
        self.registry = Registry()
        self.lifetime = Lifetime()
        self.max_restarts = max_restarts
        self.window = window
        self.actor: StatsActor | None = None
        self._crashes: deque[float] = deque()

    def open_metrics(self) -> None:
        """Open the custom metrics (their log and snapshot) unless open: a failure (an
        ``OSError`` naming the path, a :class:`~campaignstats.metrics.log.LogError`) is raised
        to the caller, once, before any actor runs."""
        if self.lifetime.metrics is None:
            self.lifetime.metrics = MetricsKeeper(self.config.metrics)
        open_outbox(self.config, self.lifetime)

    async def run(self) -> None:
        """Run actors until one stops cleanly; raise :class:`SupervisorGaveUp` past the limit."""
        gave_up: SupervisorGaveUp | None = None
        # The task group owns the calculation tasks; each catches its own errors, and a dead
        # actor cancels its own (StatsActor.abandon), so the group never waits on an orphan.
        async with asyncio.TaskGroup() as tasks:
            incarnation = 0
            inherited: StatsState | None = None
            while gave_up is None:
                actor = StatsActor(
                    self.mailbox,
                    self.source,
                    self.registry,
                    self.config,
                    tasks.create_task,
                    self.lifetime,
                    incarnation,
                    inherited,
                )
                self.actor = actor
                try:
                    await actor.run()
                    return
                except Exception as exc:
                    if isinstance(actor.current, Stop):
                        # Stopping is what was asked: do not start a new actor for it.
                        log.error("actor.crashed_while_stopping", error=repr(exc), exc_info=exc)
                        actor.save_after_crash()
                        if self.lifetime.metrics is not None:
                            self.lifetime.metrics.close()
                        return
                    gave_up = self._on_crash(actor, exc)
                    inherited = _trusted(actor)
                incarnation += 1
        if self.lifetime.metrics is not None:
            # What was accepted is written and fsynced; no compaction of a suspect state.
            self.lifetime.metrics.close(snapshot=False)
        raise gave_up

    def _on_crash(self, actor: StatsActor, exc: Exception) -> SupervisorGaveUp | None:
        message = actor.current
        if isinstance(message, Ask) and not message.reply.done():
            message.reply.set_exception(
                InternalError(f"the stats actor crashed while answering: {exc!r}")
            )
        self.lifetime.loaded.clear()  # the next actor starts from scratch
        self.lifetime.applied_before_restarts += actor.state.applied
        self.lifetime.rejected_before_restarts += actor.rejected
        now = time.monotonic()
        self._crashes.append(now)
        while self._crashes and self._crashes[0] < now - self.window:
            self._crashes.popleft()
        log.error(
            "actor.crashed",
            error=repr(exc),
            message=_describe(message),
            crashes_in_window=len(self._crashes),
            exc_info=exc,
        )
        if len(self._crashes) > self.max_restarts:
            log.critical("actor.giving_up", max_restarts=self.max_restarts, window=self.window)
            gave_up = SupervisorGaveUp(
                f"the stats actor crashed {len(self._crashes)} times in {self.window:.0f} s"
            )
            gave_up.__cause__ = exc
            return gave_up
        self.lifetime.restarts += 1
        log.warning("actor.restarting", restarts=self.lifetime.restarts)
        return None


def _trusted(actor: StatsActor) -> StatsState | None:
    """The dead actor's counts, for its successor, when they can be trusted.

    The state only changes inside ``apply_many`` and ``merge``, and each increment is applied
    whole or not at all, so a crash elsewhere leaves sound counts: keeping them beats going back
    to a snapshot file that may be days old. They are checked all the same (every count a
    non-negative integer); a state that fails the check is dropped. The calculation the dead
    actor was running is abandoned with its journal; the new actor starts a full one.
    """
    state = actor.state
    problem = state.check()
    if problem is not None:
        log.error("actor.counts_dropped", reason=problem)
        return None
    state.stop_journal()
    state.applied = 0  # already added to the lifetime's total
    return state


def _describe(message: object) -> str:
    text = repr(message)
    return text if len(text) <= 300 else text[:300] + "..."
