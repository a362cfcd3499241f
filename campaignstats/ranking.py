"""The leading campaigns, kept current as counts move (docs/protocol.md, "top").

Plain Python, no I/O. A ``top`` call must not scan every campaign (a server holds hundreds of
thousands), so:

* by total supporters: a heap of ``(-supporters, campaign_id)`` and the set of campaigns whose
  supporters moved since the last call (the hot path only adds to that set, for a new
  supporter). A call pushes those few again before it pops the head (see SupporterRanking);
  when more than a quarter moved (after a calculation) the heap is rebuilt whole.
* by the last hour or by today: the only campaigns that can have a non-zero figure are those
  that got a supporter in that time. The hot path notes each campaign that gets one in the set of
  its UTC hour (the last 26 hours are kept); a call computes the figure of those candidates only,
  from their buckets.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable

#: hours of candidate sets kept: today (UTC) is at most 24 of them, the last hour 2
TOUCHED_HOURS = 26


class SupporterRanking:
    """Campaigns ordered by a figure that the caller reads on demand (total supporters).

    A heap of ``(-value, campaign_id)`` with lazy deletion: a campaign whose value moved gets a
    new entry and its old one stays behind, recognised as stale (it no longer matches
    ``values``) when it reaches the top, and dropped then; the heap is rebuilt when stale
    entries outnumber the live ones.
    """

    __slots__ = ("dirty", "heap", "owed", "taken", "values")

    def __init__(self) -> None:
        self.heap: list[tuple[int, int]] = []
        self.values: dict[int, int] = {}  # the live value of each campaign in the heap
        self.dirty: set[int] = set()  # campaigns whose value may have moved since
        #: moved campaigns handed to the goals (take_moved) and not refreshed yet
        self.taken: set[int] = set()
        #: moved campaigns refreshed (a ``top`` call) and not handed to the goals yet
        self.owed: set[int] = set()

    @property
    def moved(self) -> bool:
        """Some campaign moved that :meth:`take_moved` has not handed out yet."""
        return bool(self.dirty or self.owed)

    def take_moved(self) -> set[int]:
        """The campaigns that may have moved since the last call, for a second reader (the
        goals: campaignstats.goals), at no cost to the hot path; still owed to :meth:`refresh`.
        Each reader gets every moved campaign, whichever looks first."""
        moved, self.dirty = self.dirty, set()
        self.taken |= moved
        if self.owed:
            moved |= self.owed
            self.owed = set()
        return moved

    def refresh(self, value_of: Callable[[int], int]) -> None:
        dirty, self.dirty = self.dirty, set()
        self.owed |= dirty  # the goals have not seen these: take_moved hands them out
        if self.taken:
            dirty |= self.taken
            self.taken = set()
        values, heap = self.values, self.heap
        bulk = len(dirty) * 4 > len(values)
        for cid in dirty:
            new = value_of(cid)
            if new == values.get(cid, 0):
                continue
            if new > 0:
                values[cid] = new
                if not bulk:
                    heapq.heappush(heap, (-new, cid))
            else:
                del values[cid]
        if bulk or len(heap) > 2 * len(values) + 64:
            self.heap = [(-n, cid) for cid, n in values.items()]
            heapq.heapify(self.heap)

    def head(self, limit: int) -> list[list[int]]:
        heap, values = self.heap, self.values
        best: list[tuple[int, int]] = []
        while heap and len(best) < limit:
            entry = heapq.heappop(heap)
            negative, cid = entry
            if values.get(cid) == -negative and (not best or best[-1] != entry):
                best.append(entry)  # live (a stale or repeated entry is dropped for good)
        for entry in best:
            heapq.heappush(heap, entry)
        return [[cid, -negative] for negative, cid in best]


def leaders(
    candidates: Iterable[int], value_of: Callable[[int], int], limit: int
) -> list[list[int]]:
    """The ``limit`` candidates with the highest non-zero value, highest first (ties: lower
    campaign id first)."""
    best = heapq.nsmallest(limit, ((-value_of(cid), cid) for cid in candidates))
    return [[cid, -negative] for negative, cid in best if negative < 0]
