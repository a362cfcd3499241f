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
  periodic (or size-triggered) compaction and the archive. A compaction copies the state on the
  actor in slices (:meth:`copy_step`, at most ``SLICE_BUDGET`` per actor turn, copy-on-write by
  campaign in between), then the snapshot file is written in one worker thread, and the
  compaction is finished on the actor at a later tick. The archive's copy of the state is
  taken the same way (after the compaction's, one copy at a time), its files written in the
  same thread.
* Who sent what: a batch of metric casts names its producer (``origin``, a socket connection).
  A failed commit whose changes are dropped (:class:`MetricsNotKept`) remembers the producers
  whose casts it dropped; each one's next ``flush`` fails once, saying so, and its casts in
  between are not applied (they are not kept either: docs/metrics.md, "A failed commit").
* :meth:`close` at a graceful stop: waits for a write in flight, compacts, closes the log.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from campaignstats.errors import InternalError, StatsError
from campaignstats.metrics.archive import Archiver
from campaignstats.metrics.log import FSYNC_POLICIES, FsyncPolicy
from campaignstats.metrics.model import Applied, MetricsState, StateCopy
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
#: seconds a compaction's copy may take of one actor turn (plus one campaign)
SLICE_BUDGET = 0.004
#: seconds the actor serves its mailbox (or waits) between two slices of a copy
SLICE_GAP = 0.002


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
        #: the compaction whose state is being copied in slices (:meth:`copy_step`)
        self._copying: Compaction | None = None
        #: monotonic time of the next slice of that copy
        self.next_slice_at = 0.0
        #: the last compaction's timings, for ``info``; those of the copy under way
        self.last_compaction: dict[str, Any] | None = None
        self._timing: dict[str, Any] = {}
        #: the compaction whose snapshot file is being written, and that write
        self._compaction: tuple[Compaction, concurrent.futures.Future[None]] | None = None
        self._archive: concurrent.futures.Future[list[Path]] | None = None
        #: the archive's copy of the state being taken in slices, and its wall-clock time
        self._archive_copy: tuple[StateCopy, float] | None = None
        #: wall-clock time before which a failed archive is not tried again
        self._archive_retry_at = 0.0
        self._next_snapshot = time.monotonic() + (config.snapshot_interval or 0)
        #: monotonic time of the first uncommitted change; None: everything is committed
        self.dirty_since: float | None = None
        self.commit_errors = 0
        self.compaction_errors = 0
        #: producer (``origin``) -> the log seq of its last cast applied since the last
        #: successful commit (written if ``log.written_seq`` has reached it)
        self._unwritten: dict[int, int] = {}
        #: producers whose casts a failed commit dropped: their next flush fails, once
        self._not_kept: set[int] = set()
        #: cast batches not applied because their producer is owed that failure
        self.casts_not_kept = 0
        self.archive_errors = 0
        self.closed = False

    # -- changes --------------------------------------------------------------------------------

    def apply_many(
        self, updates: Sequence[MetricUpdate] | Any, origin: int | None = None
    ) -> list[Applied]:
        """Apply one batch of casts. ``origin``: the producer that sent it (a socket
        connection), or None (the embedding API, the HTTP ingest). A producer owed a failed
        flush (its casts were dropped) is not applied to until that flush: an empty result."""
        store = self.store
        if store is not None:
            if origin is not None and origin in self._not_kept:
                # Its flush will say "not kept since your last successful flush": keep none.
                self.casts_not_kept += 1
                return []
            before = store.log.next_seq
            results = store.apply_many(updates)
            if store.log.next_seq != before:
                if origin is not None:
                    self._unwritten[origin] = store.log.next_seq - 1
                if self.dirty_since is None:
                    self.dirty_since = time.monotonic()
            return results
        now = time.time()
        apply = self.state.apply
        return [apply(update, now) for update in updates]

    def reset(self, campaign_id: int, name: str | None, origin: int | None = None) -> bool:
        """Drop metric values; answered once durable by the policy. ``origin``: the calling
        producer, told by this call's error when the commit fails (not again at its flush)."""
        if self.store is None:
            return self.state.reset(campaign_id, name)
        found = self.store.reset(campaign_id, name)
        self.commit(drop_on_error=True, origin=origin)
        return found

    def set_guard(
        self,
        campaign_id: int,
        name: str,
        deadline: float | None,
        min_period: float | None,
        origin: int | None = None,
    ) -> dict[str, float | None]:
        """Guard (or, both None, unguard) a metric; answered once durable, like a reset."""
        if self.store is None:
            self.state.set_guard(campaign_id, name, deadline, min_period)
        else:
            self.store.set_guard(campaign_id, name, deadline, min_period)
            self.commit(drop_on_error=True, origin=origin)
        return {"deadline": deadline, "min_period": min_period}

    def flush(self, origin: int | None = None, *, keep: bool = False) -> None:
        """A ``flush`` from ``origin``: commit (:meth:`commit`, dropping on error unless
        ``keep``). A producer whose casts an earlier failed commit dropped gets
        :class:`MetricsNotKept` instead, once (docs/metrics.md, "A failed commit")."""
        if origin is not None and origin in self._not_kept:
            self._not_kept.discard(origin)
            log.warning("metrics.flush_not_kept", origin=origin)
            raise MetricsNotKept(
                "the metrics log could not be written: this connection's metric updates since "
                "its last successful flush were not kept (send them again)"
            )
        self.commit(drop_on_error=not keep, origin=origin)

    def commit(self, *, drop_on_error: bool = False, origin: int | None = None) -> None:
        """Write what is buffered. When the log cannot be written nothing is acknowledged and
        this raises: with ``drop_on_error`` :class:`MetricsNotKept` after dropping every change
        not written from the state and the buffer (a retry then counts once), the producers
        whose casts were dropped (but ``origin``, told now) told at their next flush; without,
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
            self._abandon_copy()  # a copy of a state about to be dropped
            written = store.log.written_seq  # what is in the file stays
            told = {o for o, seq in self._unwritten.items() if seq > written and o != origin}
            self._unwritten.clear()
            pending, self._compaction = self._compaction, None
            if pending is not None:  # a snapshot being written holds only committed changes
                with contextlib.suppress(Exception):
                    pending[1].result()
            dropped = store.rollback()
            self.state = store.state
            self.dirty_since = None
            self._not_kept |= told
            if told:
                log.warning("metrics.casts_dropped", producers=len(told), origin=origin)
            raise MetricsNotKept(
                f"the metrics log cannot be written ({exc}): the {dropped} changes not written "
                "were dropped, not kept (send them again)"
            ) from exc
        self._unwritten.clear()
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
        info["casts_not_kept"] = self.casts_not_kept
        info["producers_not_kept"] = len(self._not_kept)
        info["last_compaction"] = self.last_compaction
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
        if self._copying is not None:
            return  # copied in slices (copy_step)
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
                finishing = time.monotonic()
                store.finish_compaction(compaction)  # the log's rewrite, on the actor
                timing = self._timing
                timing["finish_seconds"] = round(time.monotonic() - finishing, 4)
                timing["seconds"] = round(time.monotonic() - timing.pop("began"), 4)
                self.last_compaction = timing
            return
        interval = self.config.snapshot_interval
        periodic = interval is not None and now >= self._next_snapshot
        if self._archive_copy is not None:
            return  # one copy of the state at a time: after the archive's
        if periodic or store.compaction_due():
            if interval is not None:
                self._next_snapshot = now + interval
            began = time.monotonic()
            compaction = store.begin_compaction(sliced=True)
            self._timing = {
                "seq": compaction.mark.seq,
                "campaigns": compaction.copy.remaining,
                "began": began,
                "slices": 0,
                "longest_slice": 0.0,
                "copy_seconds": 0.0,
            }
            self._copying = compaction
            self.next_slice_at = began
            self.copy_step(began)

    @property
    def copying(self) -> bool:
        """A copy of the state (a compaction's, the archive's) is under way: call
        :meth:`copy_step` at ``next_slice_at``."""
        return self._copying is not None or self._archive_copy is not None

    def copy_step(self, now: float) -> None:
        """One slice of a compaction's copy (``now`` monotonic): at most ``SLICE_BUDGET``
        seconds (plus one campaign); the next one ``SLICE_GAP`` later. The last one hands the
        copy to the worker thread, which writes the file. Never raises (logged)."""
        compaction, store = self._copying, self.store
        if compaction is None or store is None:
            self._archive_step(now)
            return
        started = time.perf_counter()
        try:
            done = compaction.step(SLICE_BUDGET)
        except Exception as exc:  # a state that cannot be serialized: logged, retried later
            self._abandon_copy()
            self.compaction_errors += 1
            log.error("metrics.compaction_copy_failed", error=repr(exc))
            return
        spent = time.perf_counter() - started
        timing = self._timing
        timing["slices"] += 1
        timing["copy_seconds"] = round(timing["copy_seconds"] + spent, 4)
        timing["longest_slice"] = round(max(timing["longest_slice"], spent), 4)
        self.next_slice_at = now + spent + SLICE_GAP
        if done:
            self._copying = None
            future = self._pool().submit(write_snapshot, store.snapshot_path, compaction)
            self._compaction = (compaction, future)

    def _abandon_copy(self) -> None:
        compaction, self._copying = self._copying, None
        if compaction is not None:
            compaction.copy.abandon()
        archive, self._archive_copy = self._archive_copy, None
        if archive is not None:
            archive[0].abandon()  # the archive is still due: copied again at a later tick

    def _archive_step(self, now: float) -> None:
        """One slice of the archive's copy; the last one hands it to the worker thread, which
        restores it and writes the files."""
        if self._archive_copy is None:
            return
        copy, at = self._archive_copy
        started = time.perf_counter()
        try:
            done = copy.step(SLICE_BUDGET, time.perf_counter)
        except Exception as exc:  # logged; tried again at the next period's start
            self._abandon_copy()
            self._archive_failed(exc)
            return
        self.next_slice_at = now + time.perf_counter() - started + SLICE_GAP
        if not done:
            return
        self._archive_copy = None
        archiver, pieces, limits = self.archiver, copy.pieces(), self.config.limits
        assert archiver is not None
        self._archive = self._pool().submit(
            lambda: archiver.run(MetricsState.restore(b"".join(pieces), limits), at)
        )

    def _archive_failed(self, error: BaseException) -> None:
        # Retried at the next period, not at every tick: each try copies the state on the actor
        # (docs/metrics.md, "Integration").
        assert self.archiver is not None
        self.archive_errors += 1
        period = self.archiver.period
        self._archive_retry_at = (time.time() // period + 1) * period
        log.error("metrics.archive_failed", error=repr(error), retry_at=self._archive_retry_at)

    def _archive_tick(self) -> None:
        archiver = self.archiver
        assert archiver is not None
        if self._archive_copy is not None:
            return  # copied in slices (copy_step)
        if self._archive is not None:
            if not self._archive.done():
                return
            error = self._archive.exception()
            self._archive = None
            if error is not None:
                self._archive_failed(error)
        now = time.time()
        if now < self._archive_retry_at or not archiver.due(now) or self._copying is not None:
            return  # (one copy of the state at a time: after the compaction's)
        # The state as of now, copied on the actor in slices (copy-on-write, like a
        # compaction's); the thread restores it and builds the rows.
        self._archive_copy = (self.state.begin_copy(), now)
        self.next_slice_at = time.monotonic()

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
            skipped = MetricsState.restore(self.state.snapshot(), self.config.limits).skipped_rows
            if not skipped:
                return True
            log.error("metrics.state_dropped", error=skipped[0], rows=len(skipped))
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
        self._abandon_copy()  # not written yet: the next compaction starts over
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
    "SLICE_BUDGET",
    "SLICE_GAP",
    "TICK",
    "MetricsConfig",
    "MetricsKeeper",
    "MetricsNotKept",
    "MetricsPending",
]
