"""The durable metrics: the pure state (:class:`~.model.MetricsState`) behind its log and
snapshot file (docs/metrics.md, "Durability"), Redis-style.

* :meth:`MetricsStore.open` loads the snapshot file (if any), then replays the log's records
  written after it.
* :meth:`MetricsStore.apply` (and ``reset``, ``set_guard``) changes the state and appends what
  was accepted to the log; :meth:`MetricsStore.commit` writes the log (and fsyncs by the
  policy): **a change is acknowledged when the commit that covers it returns**. The owner commits
  once per batch of changes, before any reply that promises them.
* :meth:`MetricsStore.tick`, about every second: the ``everysec`` fsync of a quiet log.
* :meth:`MetricsStore.compact` writes the state to the snapshot file atomically and rewrites the
  log without what the snapshot holds (Redis's AOF rewrite). In steps for an owner that must not
  stall: :meth:`begin_compaction` (on the owner's thread), with ``sliced=True`` then
  :meth:`Compaction.step` on later turns of the owner until it is done (copy-on-write by
  campaign: :class:`~.model.StateCopy`), :func:`write_snapshot` (anywhere),
  :meth:`finish_compaction` (on the owner's thread).

Nothing here runs a thread or reads a clock but through the ``clock`` and ``monotonic`` given.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import msgpack
import structlog

from campaignstats.errors import ProtocolError
from campaignstats.files import atomic_write
from campaignstats.metrics.log import (
    MAX_RECORD,
    FsyncPolicy,
    LogError,
    Mark,
    MetricsLog,
    Record,
    scan,
)
from campaignstats.metrics.model import Applied, MetricsState, StateCopy
from campaignstats.metrics.update import (
    DEFAULT_LIMITS,
    MetricLimits,
    MetricUpdate,
    update_from_map,
)

log = structlog.get_logger(__name__)

SNAPSHOT_FORMAT = 1
#: Redis's auto-aof-rewrite-min-size and -percentage: rewrite once the log is this large and has
#: doubled since the last rewrite
REWRITE_MIN_SIZE = 64 * 1024 * 1024
REWRITE_GROWTH = 1.0
#: the update's own bounds for the log's replay: a record was checked when it was accepted, and
#: a limit lowered since must not lose it (docs/metrics.md, "Limits")
_REPLAY_BOUNDS = MetricLimits(
    max_string=MAX_RECORD, max_names=MAX_RECORD, max_dims=MAX_RECORD, max_members=MAX_RECORD
)


class Compaction:
    """A snapshot of the state at one log seq (``mark``), being copied or copied."""

    __slots__ = ("copy", "mark", "saved_at")

    def __init__(self, mark: Mark, copy: StateCopy, saved_at: float) -> None:
        self.mark = mark
        self.copy = copy
        self.saved_at = saved_at

    @property
    def done(self) -> bool:
        """Every campaign is copied: the file can be written (anywhere)."""
        return self.copy.done

    def step(self, budget: float, clock: Callable[[], float] = time.perf_counter) -> bool:
        """On the owner's thread: copy campaigns for about ``budget`` seconds; True when done."""
        return self.copy.step(budget, clock)

    def pieces(self) -> list[bytes]:
        """The snapshot file's content in pieces (once :attr:`done`)."""
        state = self.copy.pieces()
        size = sum(map(len, state))
        packb = msgpack.packb
        head = b"".join(
            (
                msgpack.Packer().pack_map_header(4),
                packb("format"),
                packb(SNAPSHOT_FORMAT),
                packb("seq"),
                packb(self.mark.seq),
                packb("saved_at"),
                packb(self.saved_at),
                packb("state"),
                _bin_header(size),
            )
        )
        return [head, *state]

    @property
    def data(self) -> bytes:
        """The snapshot file's content (once :attr:`done`)."""
        return b"".join(self.pieces())


def _bin_header(size: int) -> bytes:
    """MessagePack's header of a ``bin`` of ``size`` bytes (what ``packb`` writes for one)."""
    if size < 1 << 8:
        return b"\xc4" + size.to_bytes(1, "big")
    if size < 1 << 16:
        return b"\xc5" + size.to_bytes(2, "big")
    return b"\xc6" + size.to_bytes(4, "big")


def snapshot_path_for(log_path: Path) -> Path:
    return log_path.with_name(log_path.name + ".snapshot")


def write_snapshot(path: Path, compaction: Compaction) -> None:
    """Write the snapshot file atomically (temporary file, fsync, rename, fsync of the dir),
    piece by piece (no joined copy of the whole state)."""
    pieces = compaction.pieces()
    atomic_write(path, lambda f: f.writelines(pieces))


def load_snapshot(path: Path, limits: MetricLimits) -> tuple[MetricsState, int]:
    """The state in the snapshot file and the last log seq it holds; empty when missing.

    A damaged file is moved aside (``<path>.bad-<time>``) with an error and the state starts
    empty: the log's records after it are still replayed, and none is applied twice. A
    campaign's row that cannot be read is skipped with a warning
    (``metrics.snapshot.row_skipped``; :attr:`MetricsState.skipped_rows`). A snapshot
    of another ``format`` (a later release's) is not damage: :class:`LogError`, file untouched.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return MetricsState(limits), 0
    try:
        data = msgpack.unpackb(raw)
    except Exception:
        data = None
    version = data.get("format") if type(data) is dict else None
    if type(version) is int and version != SNAPSHOT_FORMAT:  # a later release's: not damage
        raise LogError(
            f"{path}: a metrics snapshot of an unknown format {version} (this release "
            f"reads {SNAPSHOT_FORMAT}); the file is left as it is"
        )
    try:
        if type(data) is not dict or data.get("format") != SNAPSHOT_FORMAT:
            raise ValueError("not a metrics snapshot")
        seq = data["seq"]
        if type(seq) is not int or seq < 0 or type(data["state"]) is not bytes:
            raise ValueError("bad seq or state")
        state = MetricsState.restore(data["state"], limits)
    except Exception as exc:
        aside = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%dT%H%M%S')}")
        os.replace(path, aside)
        log.error(
            "metrics.snapshot.unreadable", path=str(path), error=repr(exc), moved_to=str(aside)
        )
        return MetricsState(limits), 0
    for why in state.skipped_rows:  # one campaign lost, not the file
        log.warning("metrics.snapshot.row_skipped", path=str(path), error=why)
    return state, seq


class MetricsStore:
    """The metrics state with its log and snapshot file. One owner calls it (the actor)."""

    def __init__(
        self,
        state: MetricsState,
        metrics_log: MetricsLog,
        snapshot_path: Path,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rewrite_min_size: int = REWRITE_MIN_SIZE,
        rewrite_growth: float = REWRITE_GROWTH,
    ) -> None:
        self.state = state
        self.log = metrics_log
        self.snapshot_path = snapshot_path
        self._clock = clock
        self._monotonic = monotonic
        self.rewrite_min_size = rewrite_min_size
        self.rewrite_growth = rewrite_growth
        self._size_after_rewrite = metrics_log.size
        self.compactions = 0
        self.replay_rejected = 0
        #: campaigns' rows of the snapshot that could not be read at open (skipped)
        self.snapshot_rows_skipped = len(state.skipped_rows)

    @classmethod
    def open(
        cls,
        log_path: Path,
        *,
        snapshot_path: Path | None = None,
        fsync: FsyncPolicy = "everysec",
        limits: MetricLimits = DEFAULT_LIMITS,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rewrite_min_size: int = REWRITE_MIN_SIZE,
        rewrite_growth: float = REWRITE_GROWTH,
    ) -> MetricsStore:
        """Load the snapshot file, replay the log after it, and open the log for appending."""
        started = time.perf_counter()
        snapshot_path = snapshot_path or snapshot_path_for(log_path)
        state, snapshot_seq = load_snapshot(snapshot_path, limits)
        metrics_log, records = MetricsLog.open(log_path, fsync, monotonic)
        store = cls(
            state,
            metrics_log,
            snapshot_path,
            clock,
            monotonic,
            rewrite_min_size,
            rewrite_growth,
        )
        replayed = store._replay(r for r in records if r.seq > snapshot_seq)
        metrics_log.next_seq = max(metrics_log.next_seq, snapshot_seq + 1)
        metrics_log.written_seq = metrics_log.synced_seq = metrics_log.next_seq - 1
        log.info(
            "metrics.loaded",
            log=str(log_path),
            snapshot_seq=snapshot_seq,
            replayed=replayed,
            replay_rejected=store.replay_rejected,
            campaigns=len(state.campaigns),
            seconds=round(time.perf_counter() - started, 3),
        )
        return store

    def _replay(self, records: Iterable[Record]) -> int:
        state = self.state
        now = self._clock()
        n = 0
        for seq, kind, body in records:
            n += 1
            error: Exception | None
            try:
                if kind == "u":
                    update = update_from_map(body, _REPLAY_BOUNDS)
                    error = (
                        update if isinstance(update, ProtocolError) else state.replay(update, now)
                    )
                elif kind == "r":
                    state.reset(*body)
                    error = None
                elif kind == "g":
                    state.set_guard(*body, growth=False)
                    error = None
                else:
                    raise ValueError(f"unknown record kind {kind!r}")
            except (TypeError, ValueError, ProtocolError) as exc:
                error = exc
            if error is not None:
                # A record that does not decode, a counter's overflow (or a bug): the record
                # stays in the log.
                self.replay_rejected += 1
                log.warning("metrics.replay.rejected", seq=seq, kind=kind, error=str(error))
        return n

    # -- changes ----------------------------------------------------------------------------------

    def apply(self, update: MetricUpdate) -> Applied:
        """Apply a checked update now; what was applied is logged (not acknowledged yet)."""
        result = self.state.apply(update, self._clock())
        if result.update is not None:
            self.log.append("u", result.update.to_map())
        return result

    def apply_map(self, item: Mapping[str, Any] | object) -> Applied:
        """Check an UPDATE map and apply it; a bad one changes nothing (``error`` says why)."""
        update = update_from_map(item, self.state.limits)
        if isinstance(update, ProtocolError):
            return Applied(None, {}, update)
        return self.apply(update)

    def apply_many(self, updates: Iterable[MetricUpdate]) -> list[Applied]:
        now = self._clock()
        apply = self.state.apply
        append = self.log.append
        results = []
        for update in updates:
            result = apply(update, now)
            if result.update is not None:
                append("u", result.update.to_map())
            results.append(result)
        return results

    def reset(self, campaign_id: int, name: str | None = None) -> bool:
        found = self.state.reset(campaign_id, name)
        if found:
            self.log.append("r", [campaign_id, name])
        return found

    def set_guard(
        self,
        campaign_id: int,
        name: str,
        deadline: float | None = None,
        min_period: float | None = None,
    ) -> None:
        self.state.set_guard(campaign_id, name, deadline, min_period)
        self.log.append("g", [campaign_id, name, deadline, min_period])

    def commit(self) -> int:
        """Write the log (fsync by the policy): every change before this call is acknowledged
        when it returns. Returns the last log seq written."""
        return self.log.commit(self._monotonic())

    def rollback(self) -> int:
        """Drop the changes not written (after a failed :meth:`commit`): the buffered records
        are forgotten and the state is rebuilt from the files (the snapshot, then the log's
        records after it), i.e. as of the last commit that succeeded. Returns the records
        dropped. Costs a reload: for a failure, not a habit.

        What the files do not hold is carried over from the state replaced: the throttle
        guards' memory of each campaign still there (dropping it would let every throttled
        key through at once), and the counts of ``info`` (they count what happened: a count
        never goes back)."""
        dropped = self.log.discard()
        old = self.state
        old.abandon_copy()  # a compaction's copy of the state dropped here
        state, snapshot_seq = load_snapshot(self.snapshot_path, old.limits)
        records = scan(self.log.path.read_bytes()).records
        self.state = state
        self._replay(r for r in records if r.seq > snapshot_seq)
        for cid, c in state.campaigns.items():
            was = old.campaigns.get(cid)
            if was is not None and was.throttle:
                c.carry_throttle(was)
        state.applied = max(state.applied, old.applied)
        state.refused = old.refused
        state.rejected = old.rejected
        log.warning("metrics.rolled_back", records_dropped=dropped, seq=self.log.written_seq)
        return dropped

    def tick(self) -> bool:
        """About every second: the ``everysec`` fsync when one is due. True if it fsynced."""
        return self.log.tick(self._monotonic())

    # -- queries ----------------------------------------------------------------------------------

    def metrics(self, campaign_id: int) -> dict[str, Any]:
        return self.state.metrics(campaign_id, self._clock())

    def info(self) -> dict[str, Any]:
        return {
            **self.state.info(),
            "log": {
                "path": str(self.log.path),
                "fsync": self.log.policy,
                "bytes": self.log.size,
                "written_seq": self.log.written_seq,
                "synced_seq": self.log.synced_seq,
                "fsyncs": self.log.fsyncs,
            },
            "compactions": self.compactions,
            "replay_rejected": self.replay_rejected,
            "snapshot_rows_skipped": self.snapshot_rows_skipped,
        }

    # -- compaction -------------------------------------------------------------------------------

    def compaction_due(self) -> bool:
        """Redis's rule: the log is over ``rewrite_min_size`` and has grown by
        ``rewrite_growth`` (1.0: doubled) since the last rewrite."""
        size = self.log.size
        return size >= self.rewrite_min_size and size >= self._size_after_rewrite * (
            1 + self.rewrite_growth
        )

    def begin_compaction(self, *, sliced: bool = False) -> Compaction:
        """On the owner's thread: commit, and the snapshot of the state as of now (the log's
        last seq). At once, or with ``sliced`` copy-on-write by campaign: the owner then calls
        :meth:`Compaction.step` on later turns until it is done, and may change the state
        meanwhile (a campaign not copied yet is copied before it changes)."""
        self.commit()
        mark = self.log.mark()
        compaction = Compaction(mark, self.state.begin_copy(), self._clock())
        if not sliced:
            compaction.step(float("inf"))
        return compaction

    def finish_compaction(self, compaction: Compaction) -> None:
        """On the owner's thread, once the snapshot file is written: drop what it holds from
        the log."""
        self.log.drop_through(compaction.mark)
        self._size_after_rewrite = self.log.size
        self.compactions += 1
        log.info(
            "metrics.compacted",
            snapshot=str(self.snapshot_path),
            seq=compaction.mark.seq,
            snapshot_bytes=sum(map(len, compaction.pieces())),
            log_bytes=self.log.size,
        )

    def compact(self) -> None:
        """The three steps at once (periodic snapshots and the log rewrite)."""
        compaction = self.begin_compaction()
        write_snapshot(self.snapshot_path, compaction)
        self.finish_compaction(compaction)

    def close(self, snapshot: bool = True) -> None:
        """Commit and fsync the log, compact when asked (at a graceful stop), close."""
        if snapshot:
            self.compact()
        self.log.close()
