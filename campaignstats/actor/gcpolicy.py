"""When Python's garbage collector may walk the service's objects (docs/design.md, "Memory").

A full (generation 2) pass walks every object the collector tracks and not frozen: the
service's counts, timelines, pages, rankings and indexes, and while a calculation runs, the
result it builds, of the same size. Left to itself, the collector runs such a pass whenever a
calculation's allocations call for one, inside whatever step of the actor's loop allocated
last: the pass and that step stall the loop together.

The policy, when on (``ActorConfig.gc_policy``, ``serve`` by default):

- while a calculation runs and while its result is merged, no automatic full pass: the
  threshold of the oldest generation is set out of reach (the young generations are still
  collected as usual, so short-lived cycles are freed as they were);
- once the merge is done (or the calculation failed), one full pass at a quiet moment, a turn
  of its own (:meth:`GcPolicy.collect_if_due`), and the threshold as it was (the hold is the
  process's, shared by every policy in it: put back by the last release, :class:`_Process`);
  a later release does not put a due pass off, and passes are spaced (``PASS_SPACING``) so that
  they take at most a tenth of the loop however often calculations end;
- between calculations, the collector as usual; and during a calculation of a few campaigns
  (``resync [ids]``, the follower's page changes), which allocates little: it holds nothing and
  gets no pass of its own (one after each doubled what such calculations cost the loop).

Nothing is frozen by the policy (``serve`` freezes what is alive at start, once): every object
the service creates is walked by every full pass, so a cycle that became garbage at any moment
is freed by the next pass, at the latest the one after the next merge. The policy bounds when
full passes run, never what they free.
"""

from __future__ import annotations

import gc
import time

import structlog

log = structlog.get_logger(__name__)

#: the oldest generation's threshold while full passes are held: full passes need this many
#: collections of the middle generation first (about 7,000 allocations each): never, in
#: practice, within a calculation
HELD_THRESHOLD = 1 << 30
#: seconds from the end of a merge to the full pass: a turn of the event loop of its own
COLLECT_DELAY = 0.01
#: a pass is not due before this many times the last pass's length has passed since its end:
#: the policy's passes take at most a tenth of the loop, however often calculations end (a
#: resync asked again and again while Postgres is down fails each at once)
PASS_SPACING = 9.0


class _Process:
    """The hold on the process's collector, shared by every policy of the process (two services
    embedded in one process): the threshold is raised by the first hold and put back by the
    last release only, and only if it is still the held value (a threshold the process set
    meanwhile stays)."""

    holders = 0
    #: the oldest generation's threshold the first hold replaced
    saved = 0

    @classmethod
    def hold(cls) -> None:
        if cls.holders == 0:
            young, middle, cls.saved = gc.get_threshold()
            gc.set_threshold(young, middle, HELD_THRESHOLD)
        cls.holders += 1

    @classmethod
    def release(cls) -> None:
        cls.holders -= 1
        if cls.holders == 0:
            young, middle, oldest = gc.get_threshold()
            if oldest == HELD_THRESHOLD:
                gc.set_threshold(young, middle, cls.saved)


class GcPolicy:
    """The process's garbage collector around calculations; does nothing when not ``enabled``.

    One per service (kept across actor restarts in the actor's ``Lifetime``): the collector's
    thresholds are the process's."""

    __slots__ = (
        "_calculating",
        "_holding",
        "_last_end",
        "collected",
        "due_at",
        "enabled",
        "last_pass",
        "passes",
        "seconds",
    )

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        #: this policy holds the process's collector (_Process)
        self._holding = False
        #: a calculation runs or merges (from :meth:`hold` to :meth:`release`)
        self._calculating = False
        #: monotonic time the full pass is due (None: none due)
        self.due_at: float | None = None
        #: full passes run by the policy, objects they freed, and the last one's seconds
        self.passes = 0
        self.collected = 0
        self.last_pass: float | None = None
        #: seconds of every pass the policy ran
        self.seconds = 0.0
        #: monotonic time the last pass ended
        self._last_end: float | None = None

    @property
    def holding(self) -> bool:
        return self._holding

    def hold(self) -> None:
        """A calculation starts: no automatic full pass until :meth:`release`."""
        if not self.enabled:
            return
        # A pass still due is not cancelled: it runs meanwhile, a turn of its own early in this
        # calculation, so that one calculation after another never goes without one.
        self._calculating = True
        if not self._holding:
            _Process.hold()
            self._holding = True

    def release(self, now: float) -> None:
        """The merge is done (or the calculation failed): the full pass is due soon."""
        if self._holding:
            self._calculating = False
            if self.due_at is None:  # a pass already due is not put off by a later release
                due = now + COLLECT_DELAY
                if self._last_end is not None and self.last_pass is not None:
                    due = max(due, self._last_end + PASS_SPACING * self.last_pass)
                self.due_at = due

    def collect_if_due(self, now: float) -> bool:
        """Run the due full pass (one step of the loop), restore the thresholds unless another
        calculation has started; True if it ran."""
        if self.due_at is None or now < self.due_at:
            return False
        self.due_at = None
        t0 = time.perf_counter()
        collected = gc.collect()
        took = time.perf_counter() - t0
        self._last_end = time.monotonic()
        if not self._calculating:
            self._restore()
        self.passes += 1
        self.collected += collected
        self.seconds += took
        self.last_pass = took
        log.info("gc.full_pass", collected=collected, seconds=round(took, 4))
        return True

    def close(self) -> None:
        """The service stops: the thresholds as they were, nothing due."""
        self.due_at = None
        self._calculating = False
        self._restore()

    def _restore(self) -> None:
        if self._holding:
            _Process.release()
            self._holding = False

    def info(self) -> dict[str, object]:
        return {
            "enabled": self.enabled,
            "holding": self.holding,
            "passes": self.passes,
            "collected": self.collected,
            "last_pass": None if self.last_pass is None else round(self.last_pass, 4),
            "seconds": round(self.seconds, 4),
        }


__all__ = ["COLLECT_DELAY", "HELD_THRESHOLD", "PASS_SPACING", "GcPolicy"]
