"""Idle campaigns packed: the actor's sweep (docs/design.md, "Memory", round 3).

Every ``interval`` seconds the actor goes over every campaign, a slice at a time between mailbox
messages (as a merge does), and packs each unpacked campaign whose last action is older than
``idle_after`` seconds (:meth:`StatsState.pack_idle_campaigns`). A packed campaign is unpacked by
its next write, whatever path makes it; reads leave it packed. Packing changes no count, so a
wrong guess of "idle" costs an unpack later, never exactness.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from campaignstats.model import DEFAULT_PACK_IDLE, DEFAULT_PACK_INTERVAL, StatsState

#: campaigns looked at in one step at most (a step also stops at its time budget)
PACK_SLICE = 5_000
#: campaigns looked at between two looks at the clock when none is packed (one packed is
#: followed by a look at the clock: packing one takes 2 us to milliseconds, by its keys)
PACK_GROUP = 250


@dataclass(slots=True)
class _Sweep:
    ids: list[int]  # the campaigns when it started (one created since waits for the next)
    started: float  # perf_counter
    done: int = 0
    packed_now: int = 0  # campaigns this sweep packed
    packed: int = 0  # campaigns packed once looked at (packed before, or by this sweep)
    steps: int = 0
    longest_step: float = 0.0


@dataclass(slots=True)
class Packing:
    """When to sweep, the sweep under way, and what the last one did (``info``'s ``packing``)."""

    idle_after: float = DEFAULT_PACK_IDLE  # 0: never pack
    interval: float = DEFAULT_PACK_INTERVAL
    budget: float = 0.005  # seconds of one step, at most (plus one campaign packed)
    next_at: float = 0.0  # monotonic: when the next sweep starts
    sweep: _Sweep | None = None
    sweeps: int = 0
    last: dict[str, Any] | None = field(default=None)

    @property
    def enabled(self) -> bool:
        return self.idle_after > 0

    def schedule(self, now: float) -> None:
        """The first sweep, one interval from ``now`` (monotonic)."""
        self.next_at = now + self.interval

    def start_if_due(self, state: StatsState, now: float) -> None:
        """Start a sweep when one is due and none runs (``now``: monotonic)."""
        if not self.enabled or self.sweep is not None or now < self.next_at:
            return
        self.next_at = now + self.interval
        self.sweep = _Sweep(list(state.campaigns), time.perf_counter())

    def step(self, state: StatsState) -> bool:
        """One slice of the sweep under way; True when it is finished."""
        sweep = self.sweep
        assert sweep is not None
        t0 = time.perf_counter()
        sweep.steps += 1
        ids = sweep.ids
        end = min(len(ids), sweep.done + PACK_SLICE)
        now = state.clock()  # idle is judged on the state's clock, which files the changes
        # The clock is read after each campaign packed (one of many keys takes milliseconds:
        # a group of 250 read once was a stall of 150-200 ms), and between groups of those
        # looked at and left (packed already, or busy: about 0.1 us each).
        deadline = t0 + self.budget
        while sweep.done < end:
            done, packed_now, packed = state.pack_idle_slice(
                ids, sweep.done, min(sweep.done + PACK_GROUP, end), now, deadline
            )
            sweep.packed_now += packed_now
            sweep.packed += packed
            sweep.done = done
            if time.perf_counter() >= deadline:
                break
        sweep.longest_step = max(sweep.longest_step, time.perf_counter() - t0)
        if sweep.done < len(ids):
            return False
        self.sweep = None
        self.sweeps += 1
        self.last = {
            "campaigns": len(ids),
            "packed_now": sweep.packed_now,
            "packed": sweep.packed,
            "steps": sweep.steps,
            "duration": round(time.perf_counter() - sweep.started, 4),
            "longest_step": round(sweep.longest_step, 4),
        }
        return True

    def info(self) -> dict[str, Any]:
        """``info``'s ``packing``: ``packed`` is the campaigns packed at the end of the last
        sweep (None before the first; a write since may have unpacked some)."""
        return {
            "idle_after": self.idle_after,
            "interval": self.interval,
            "packed": None if self.last is None else self.last["packed"],
            "sweeps": self.sweeps,
            "running": self.sweep is not None,
            "last_sweep": self.last,
        }
