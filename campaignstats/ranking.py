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

Both sets are bounded (docs/design.md, "Memory"): once more than a quarter of the campaigns
(and more than ``COLLAPSE_MIN``) are in one, listing them costs more memory than it saves work
(a set entry costs 27 to 53 bytes, and a call would walk a quarter of the campaigns anyway),
so the set is dropped for a flag that says "every campaign" (:meth:`SupporterRanking.bound`;
an hour's set becomes None in ``StatsState.touched``).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Collection, Iterable

#: hours of candidate sets kept: today (UTC) is at most 24 of them, the last hour 2
TOUCHED_HOURS = 26
#: a set of campaigns this large or smaller is never collapsed into "every campaign"
COLLAPSE_MIN = 1024


def too_many(listed: int, campaigns: int) -> bool:
    """Whether a set of ``listed`` campaigns out of ``campaigns`` is better as a flag."""
    return listed > COLLAPSE_MIN and listed * 4 > campaigns


def _no_campaigns() -> Collection[int]:
    return ()


class SupporterRanking:
    """Campaigns ordered by a figure that the caller reads on demand (total supporters).

    A heap of ``(-value, campaign_id)`` with lazy deletion: a campaign whose value moved gets a
    new entry and its old one stays behind, recognised as stale (it no longer matches
    ``values``) when it reaches the top, and dropped then; the heap is rebuilt when stale
    entries outnumber the live ones.
    """

    __slots__ = (
        "all_for_goals",
        "all_for_top",
        "dirty",
        "everyone",
        "heap",
        "owed",
        "taken",
        "values",
    )

    def __init__(self, everyone: Callable[[], Collection[int]] = _no_campaigns) -> None:
        #: every campaign there is (read only when the moved ones were too many to list)
        self.everyone = everyone
        self.heap: list[tuple[int, int]] = []
        self.values: dict[int, int] = {}  # the live value of each campaign in the heap
        self.dirty: set[int] = set()  # campaigns whose value may have moved since
        #: moved campaigns handed to the goals (take_moved) and not refreshed yet
        self.taken: set[int] = set()
        #: moved campaigns refreshed (a ``top`` call) and not handed to the goals yet
        self.owed: set[int] = set()
        #: every campaign may have moved, for :meth:`refresh` and for :meth:`take_moved`: set
        #: by :meth:`bound` instead of listing most campaigns in ``dirty``
        self.all_for_top = False
        self.all_for_goals = False

    @property
    def moved(self) -> bool:
        """Some campaign moved that :meth:`take_moved` has not handed out yet."""
        return bool(self.dirty or self.owed or self.all_for_goals)

    def bound(self, campaigns: int) -> None:
        """When ``dirty`` lists too many of the ``campaigns`` (:func:`too_many`), every
        campaign has moved for both readers instead: the set is dropped but for the ids that
        are no longer campaigns (forgotten: their entries must still go)."""
        if too_many(len(self.dirty), campaigns):
            self.dirty = self._gone(self.dirty)
            self.taken = self._gone(self.taken)
            self.owed = self._gone(self.owed)
            self.all_for_top = self.all_for_goals = True
            return
        # Each reader's own backlog too: on a server the goals take the moved campaigns a few
        # times a second, long before ``dirty`` lists a quarter of them, and what ``top`` is
        # owed (``taken``) then grows until the next ``top``; the other way round, ``owed``.
        if too_many(len(self.taken), campaigns):
            self.taken = self._gone(self.taken)
            self.all_for_top = True
        if too_many(len(self.owed), campaigns):
            self.owed = self._gone(self.owed)
            self.all_for_goals = True

    def _gone(self, ids: Iterable[int]) -> set[int]:
        """Those of ``ids`` that are no longer campaigns: what a flag for "every campaign"
        does not cover (a forgotten campaign's entry must still go)."""
        everyone = self.everyone()
        return {cid for cid in ids if cid not in everyone}

    def take_moved(self) -> set[int]:
        """The campaigns that may have moved since the last call, for a second reader (the
        goals: campaignstats.goals), at no cost to the hot path; still owed to :meth:`refresh`.
        Each reader gets every moved campaign, whichever looks first."""
        moved, self.dirty = self.dirty, set()
        if not self.all_for_top:
            self.taken |= moved
        if self.all_for_goals:
            self.all_for_goals = False
            moved |= self.owed  # forgotten campaigns, kept listed by bound
            self.owed = set()
            moved.update(self.everyone())
            return moved
        if self.owed:
            moved |= self.owed
            self.owed = set()
        return moved

    def refresh(self, value_of: Callable[[int], int]) -> None:
        dirty, self.dirty = self.dirty, set()
        if not self.all_for_goals:
            self.owed |= dirty  # the goals have not seen these: take_moved hands them out
        else:  # the goals get every campaign: owed only the ids that are not (forgotten ones)
            self.owed |= self._gone(dirty)
        if self.taken:
            dirty |= self.taken
            self.taken = set()
        values, heap = self.values, self.heap
        if self.all_for_top:
            self.all_for_top = False
            dirty.update(self.everyone())
            dirty.update(values)  # a campaign gone since has its entry dropped
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
