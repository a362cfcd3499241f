"""The leading campaigns, kept current as counts move (docs/protocol.md, "top").

Plain Python, no I/O. A ``top`` call must not scan every campaign (a server holds hundreds of
thousands), so:

* by total supporters: a sorted list of ``(-supporters, campaign_id)`` and the set of campaigns
  whose supporters moved since the last call (the hot path only adds to that set, for a new
  supporter). A call re-files those few, by bisection, before it reads the head of the list;
  when more than an eighth of the list moved (after a calculation) it is sorted again whole.
* by the last hour or by today: the only campaigns that can have a non-zero figure are those
  that got a supporter in that time. The hot path notes each campaign that gets one in the set of
  its UTC hour (the last 26 hours are kept); a call computes the figure of those candidates only,
  from their buckets.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from collections.abc import Callable, Iterable

#: hours of candidate sets kept: today (UTC) is at most 24 of them, the last hour 2
TOUCHED_HOURS = 26


class SupporterRanking:
    """Campaigns ordered by a figure that the caller reads on demand (total supporters)."""

    __slots__ = ("dirty", "order", "values")

    def __init__(self) -> None:
        self.order: list[tuple[int, int]] = []  # (-value, campaign_id), ascending
        self.values: dict[int, int] = {}  # the value each campaign is filed under
        self.dirty: set[int] = set()  # campaigns whose value may have moved since

    def refresh(self, value_of: Callable[[int], int]) -> None:
        dirty, self.dirty = self.dirty, set()
        if not dirty:
            return
        values, order = self.values, self.order
        if len(dirty) * 8 > len(order):
            for cid in dirty:
                n = value_of(cid)
                if n > 0:
                    values[cid] = n
                else:
                    values.pop(cid, None)
            self.order = sorted((-n, cid) for cid, n in values.items())
            return
        for cid in dirty:
            old = values.get(cid)
            new = value_of(cid)
            if old == new or (old is None and new <= 0):
                continue
            if old is not None:
                i = bisect_left(order, (-old, cid))
                del order[i]
            if new > 0:
                values[cid] = new
                insort(order, (-new, cid))
            else:
                del values[cid]

    def head(self, limit: int) -> list[list[int]]:
        return [[cid, -negative] for negative, cid in self.order[:limit]]


def leaders(
    candidates: Iterable[int], value_of: Callable[[int], int], limit: int
) -> list[list[int]]:
    """The ``limit`` candidates with the highest non-zero value, highest first (ties: lower
    campaign id first)."""
    best = heapq.nsmallest(limit, ((-value_of(cid), cid) for cid in candidates))
    return [[cid, -negative] for negative, cid in best if negative < 0]
