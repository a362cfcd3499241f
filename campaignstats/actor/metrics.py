"""The actor's custom metrics: the :class:`~campaignstats.metrics.store.MetricsStore` and its
timers (docs/metrics.md, "Integration").

:class:`MetricsKeeper` is what the actor calls; only the actor's task calls it. It outlives an
actor incarnation (the supervisor keeps it in the :class:`~campaignstats.actor.actor.Lifetime`),
so a crash-restart keeps the metrics and their open log, after a check of the state
(:meth:`MetricsKeeper.check`). A calculation from Postgres never touches it.

* Without a log path the metrics live in memory only (an embedding test, a demo): the same
  answers, nothing durable.
* With one: updates are applied and buffered; :meth:`commit` writes them (one ``write``, the
  fsync by the policy). The actor commits before it answers a ``flush`` (so a ``flush`` reply
  means "acknowledged": durable by the policy), when its mailbox is empty, and at most
  ``COMMIT_DELAY`` after the first uncommitted update under a steady load.
* :meth:`tick`, from the actor's one-second timer: the ``everysec`` fsync of a quiet log, the
  periodic (or size-triggered) compaction and the archive. The snapshot file and the archive
  files are written in one worker thread (files only; the state is copied to bytes on the actor
  first), and the compaction is finished on the actor at a later tick.
* :meth:`close` at a graceful stop: waits for a write in flight, compacts, closes the log.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from campaignstats.errors import InternalError, StatsError
from campaignstats.metrics.archive import Archiver
from campaignstats.metrics.log import FSYNC_POLICIES, FsyncPolicy
from campaignstats.metrics.model import Applied, MetricsState
from campaignstats.metrics.store import Compaction, MetricsStore, write_snapshot
from campaignstats.metrics.update import DEFAULT_LIMITS, MetricLimits, MetricUpdate

log = structlog.get_logger(__name__)


class MetricsNotKept(InternalError):
    """A ``flush`` (or ``reset_metrics``) whose commit failed: the changes not written were
    dropped from the state and the log's buffer. Not acknowledged, not kept: send them again."""


class MetricsPending(StatsError):
    """A commit failed and its changes are kept, buffered (the next commit retries): accepted,
    not durable yet (HTTP's ``202`` with ``"pending": true``)."""


#: seconds an update may stay uncommitted while the mailbox never empties
COMMIT_DELAY = 0.05
#: seconds between two calls of :meth:`MetricsKeeper.tick`
TICK = 1.0


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Where and how the metrics are kept (``campaignstats serve --appendonly`` and the rest)."""

    #: the append-only log; None: in memory only
    appendonly: Path | None = None
    appendfsync: FsyncPolicy = "everysec"
    #: seconds between periodic snapshots (compactions); None: at stop and by size only
    snapshot_interval: float | None = 300.0
    #: where the archive files go; None: no archive
    archive_dir: Path | None = None
    archive_every: int = 600
    limits: MetricLimits = DEFAULT_LIMITS

    def check(self) -> str | None:
        """What is wrong with these settings, or None."""
        if self.appendfsync not in FSYNC_POLICIES:
            return f"appendfsync must be one of {', '.join(FSYNC_POLICIES)}"
        interval = self.snapshot_interval
        if interval is not None and not 0 < interval < float("inf"):
            return "snapshot_interval must be a positive number of seconds"
        if self.archive_every < 1:
            return "archive_every must be at least 1 second"
        return None


class MetricsKeeper:
    """The metrics state, behind its store when there is a log. The actor's only door to it."""

    def __init__(self, config: MetricsConfig) -> None:
        self.config = config
        self.store: MetricsStore | None = None
        if config.appendonly is not None:
            self.store = MetricsStore.open(
                config.appendonly, fsync=config.appendfsync, limits=config.limits
            )
            self.state = self.store.state
        else:
            self.state = MetricsState(config.limits)
        self.archiver = (
            Archiver(config.archive_dir, config.archive_every)
            if config.archive_dir is not None
            else None
        )
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        #: the compaction whose snapshot file is being written, and that write
        self._compaction: tuple[Compaction, concurrent.futures.Future[None]] | None = None
        self._archive: concurrent.futures.Future[list[Path]] | None = None
        #: wall-clock time before which a failed archive is not tried again
        self._archive_retry_at = 0.0
        self._next_snapshot = time.monotonic() + (config.snapshot_interval or 0)
        #: monotonic time of the first uncommitted change; None: everything is committed
        self.dirty_since: float | None = None
        self.commit_errors = 0
        self.compaction_errors = 0
        self.archive_errors = 0
        self.closed = False

    # -- changes --------------------------------------------------------------------------------

    def apply_many(self, updates: list[MetricUpdate] | Any) -> list[Applied]:
        store = self.store
        if store is not None:
            results = store.apply_many(updates)
            if self.dirty_since is None and store.log.pending:
                self.dirty_since = time.monotonic()
            return results
        now = time.time()
        apply = self.state.apply
        return [apply(update, now) for update in updates]

    def reset(self, campaign_id: int, name: str | None) -> bool:
        if self.store is None:
            return self.state.reset(campaign_id, name)
        found = self.store.reset(campaign_id, name)
        self.commit(drop_on_error=True)  # a call: answered once durable by the policy
        return found

    def set_guard(
        self, campaign_id: int, name: str, deadline: float | None, min_period: float | None
    ) -> dict[str, float | None]:
        """Guard (or, both None, unguard) a metric; answered once durable, like a reset."""
        if self.store is None:
            self.state.set_guard(campaign_id, name, deadline, min_period)
        else:
            self.store.set_guard(campaign_id, name, deadline, min_period)
            self.commit(drop_on_error=True)
        return {"deadline": deadline, "min_period": min_period}

    def commit(self, *, drop_on_error: bool = False) -> None:
        """Write what is buffered. When the log cannot be written nothing is acknowledged and
        this raises: with ``drop_on_error`` :class:`MetricsNotKept` after dropping every change
        not written from the state and the buffer (a retry then counts once); without,
        :class:`MetricsPending`, the records kept buffered for the next commit
        (docs/metrics.md, "A failed commit")."""
        store = self.store
        if store is None or self.closed:
            return
        try:
            store.commit()
        except OSError as exc:
            self.commit_errors += 1
            if not drop_on_error:
                raise MetricsPending(
                    f"the metrics log cannot be written ({exc}): the updates are kept, not "
                    "durable yet (the next commit retries)"
                ) from exc
            pending, self._compaction = self._compaction, None
            if pending is not None:  # a snapshot being written holds only committed changes
                with contextlib.suppress(Exception):
                    pending[1].result()
            dropped = store.rollback()
            self.state = store.state
            self.dirty_since = None
            raise MetricsNotKept(
                f"the metrics log cannot be written ({exc}): the {dropped} changes not written "
                "were dropped, not kept (send them again)"
            ) from exc
        self.dirty_since = None

    def commit_quietly(self) -> None:
        """:meth:`commit`, a failure logged (the next one tries again)."""
        if self.dirty_since is None:
            return
        try:
            self.commit()
        except MetricsPending as exc:
            log.error("metrics.commit_failed", error=repr(exc.__cause__))

    # -- queries --------------------------------------------------------------------------------

    def metrics(self, campaign_id: int) -> dict[str, Any]:
        return self.state.metrics(campaign_id, time.time())

    def info(self) -> dict[str, Any]:
        store = self.store
        info = store.info() if store is not None else {**self.state.info(), "log": None}
        info["commit_errors"] = self.commit_errors
        info["compaction_errors"] = self.compaction_errors
        if self.archiver is not None:
            info["archive"] = {
                "dir": str(self.archiver.directory),
                "every": self.archiver.period,
                "files": self.archiver.files,
                "exported_until": self.archiver.exported_until,
                "errors": self.archive_errors,
            }
        return info

    # -- timers ---------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """About every second (``now`` monotonic): fsync, compaction, archive. Never raises."""
        store = self.store
        if store is not None and not self.closed:
            try:
                self.commit_quietly()
                store.tick()
                self._compaction_tick(store, now)
            except Exception as exc:  # a full disk must not crash the actor: logged, retried
                log.error("metrics.tick_failed", error=repr(exc))
        if self.archiver is not None:
            self._archive_tick()

    def _compaction_tick(self, store: MetricsStore, now: float) -> None:
        pending = self._compaction
        if pending is not None:
            compaction, written = pending
            if not written.done():
                return
            self._compaction = None
            error = written.exception()
            if error is not None:
                self.compaction_errors += 1
                log.error("metrics.snapshot_write_failed", error=repr(error))
            else:
                store.finish_compaction(compaction)
            return
        interval = self.config.snapshot_interval
        periodic = interval is not None and now >= self._next_snapshot
        if periodic or store.compaction_due():
            if interval is not None:
                self._next_snapshot = now + interval
            compaction = store.begin_compaction()
            future = self._pool().submit(write_snapshot, store.snapshot_path, compaction)
            self._compaction = (compaction, future)

    def _archive_tick(self) -> None:
        archiver = self.archiver
        assert archiver is not None
        if self._archive is not None:
            if not self._archive.done():
                return
            error = self._archive.exception()
            self._archive = None
            if error is not None:
                # Retried at the next period, not at every tick: each try copies the state on
                # the actor (docs/metrics.md, "Integration").
                self.archive_errors += 1
                period = archiver.period
                self._archive_retry_at = (time.time() // period + 1) * period
                log.error(
                    "metrics.archive_failed",
                    error=repr(error),
                    retry_at=self._archive_retry_at,
                )
        now = time.time()
        if now < self._archive_retry_at or not archiver.due(now):
            return
        data = self.state.snapshot()  # a copy taken on the actor; the thread builds the rows
        limits = self.config.limits
        self._archive = self._pool().submit(
            lambda: archiver.run(MetricsState.restore(data, limits), now)
        )

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="campaignstats-metrics"
            )
        return self._executor

    # -- restarts and stop ----------------------------------------------------------------------

    def check(self) -> bool:
        """Whether the state can be trusted by a restarted actor: it must survive a snapshot
        round trip (every value of the right type). When not, it is reloaded from the files
        (what was committed), or starts empty without a log."""
        try:
            MetricsState.restore(self.state.snapshot(), self.config.limits)
            return True
        except Exception as exc:
            log.error("metrics.state_dropped", error=repr(exc))
        self._wait_for_writes()
        if self.store is not None:
            path = self.store.log.path
            self.store.log.close()  # what was buffered was accepted: written, then replayed
            self.store = MetricsStore.open(
                path, fsync=self.config.appendfsync, limits=self.config.limits
            )
            self.state = self.store.state
        else:
            self.state = MetricsState(self.config.limits)
        self.dirty_since = None
        return False

    def _wait_for_writes(self) -> None:
        pending, self._compaction = self._compaction, None
        if pending is not None:
            compaction, written = pending
            try:
                written.result()
            except Exception as exc:
                log.error("metrics.snapshot_write_failed", error=repr(exc))
            else:
                if self.store is not None:
                    self.store.finish_compaction(compaction)
        if self._archive is not None:
            try:
                self._archive.result()
            except Exception as exc:
                log.error("metrics.archive_failed", error=repr(exc))
            self._archive = None

    def close(self, snapshot: bool = True) -> None:
        """At stop: finish a write in flight, compact (``snapshot``), fsync and close the log.
        Never raises (logged)."""
        if self.closed:
            return
        try:
            self._wait_for_writes()
            if self.store is not None:
                self.store.close(snapshot=snapshot)
        except Exception as exc:
            log.error("metrics.close_failed", error=repr(exc))
            if self.store is not None:
                try:
                    self.store.log.close()
                except Exception as again:
                    log.error("metrics.close_failed", error=repr(again))
        finally:
            self.closed = True
            self.dirty_since = None
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None


__all__ = [
    "COMMIT_DELAY",
    "TICK",
    "MetricsConfig",
    "MetricsKeeper",
    "MetricsNotKept",
    "MetricsPending",
]
