"""The journal folded: what a calculation's snapshot cannot hold, summed as it arrives.

docs/design.md, "The exact merge" and "The journal, folded". While a calculation runs, the
actor journals every change of a covered campaign, so that the merge can make the campaign
"database value + the changes the snapshot could not contain". Kept one by one, that is about
200 bytes per change for as long as the calculation runs (60,000 changes for a 12-second
calculation at 5,000/s), and Python's allocator keeps the memory they took.

Most of those changes are decided as soon as the snapshot is taken: its transaction ids, its
clock and its highest action id are known then (:class:`EarlyHorizon`, reported by the
calculation right after it reads them), and only the action ids of the window below the
highest need the rest of the calculation (which of them the snapshot counted). From that
moment a change that the early horizon decides is either dropped (the snapshot holds it) or
added to its campaign's :class:`Fold`: one running total per campaign of what the snapshot
cannot contain (totals by key, buckets by minute, the same per page). The others stay in the
list, in order, as before; the merge replays the list into a fold of its own and adds the
running one.

A fold is a sum, so the merge applies each campaign's unseen changes as one net change per
count: increments first, then decrements, each count clamped at zero once, at the end (not
after each decrement, which would depend on the order the changes were announced in).

Plain Python with no I/O (the ground floor, beside campaignstats.model): the model calls it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from campaignstats.model import CampaignStats, Horizon, IncrementLike, PageStats
    from campaignstats.timeline import Timeline

#: one minute's bucket in a fold: net supporters, actions added, actions taken, the latest
#: time of an increment in it (-1: none), the time of its first decrement (-1: none)
_S, _A_IN, _A_OUT, _T_IN, _T_OUT = range(5)


@dataclass(frozen=True, slots=True)
class EarlyHorizon:
    """What a calculation's snapshot is known to hold as soon as it is taken: everything of
    its :class:`~campaignstats.model.Horizon` but which action ids of the window it counted.

    ``horizon`` is that horizon with an empty ``uncounted``: it is only ever asked about
    changes whose action id is outside the window, for which ``uncounted`` plays no part.
    """

    horizon: Horizon

    def decides(self, change: IncrementLike, decrement: bool) -> bool | None:
        """Whether the snapshot holds ``change`` (True: it does; False: the merge must add
        it), or None when only the whole result can say: a change whose action id is inside
        the window and whose transaction id, if any, the snapshot does not see."""
        horizon = self.horizon
        aid = change.action_id
        if aid is not None and horizon.knows(aid):
            txid = change.txid
            snapshot = horizon.snapshot
            if txid is None or snapshot is None or not snapshot.sees(txid):
                return None
        return horizon.reflects(change, decrement, None)

    def fits(self, horizon: Horizon) -> bool:
        """Whether the calculation's result describes the same snapshot."""
        early = self.horizon
        return (
            early.snapshot == horizon.snapshot
            and early.taken_at == horizon.taken_at
            and early.max_action_id == horizon.max_action_id
            and early.window_low == horizon.window_low
        )


def _bump(counts: dict[object, int], key: object, n: int) -> int:
    """Add ``n`` to ``counts[key]``; 1 when the key is new (the journal's size counts keys)."""
    have = counts.get(key)
    if have is None:
        counts[key] = n
        return 1
    counts[key] = have + n
    return 0


class Fold:
    """The net of the changes a snapshot cannot contain, of one campaign (or of one page of
    it, keyed by page and org in the campaign's fold): signed totals by key, and per minute
    the supporters' net and the actions added and taken (with the times the buckets need)."""

    __slots__ = (
        "action",
        "area",
        "increments",
        "messages",
        "minutes",
        "org",
        "pages",
        "supporters",
    )

    def __init__(self, *, with_pages: bool = True) -> None:
        self.supporters = 0
        self.messages = 0
        self.action: dict[str, int] = {}
        self.area: dict[str, int] = {}
        self.org: dict[int, int] = {}
        self.minutes: dict[int, list[float]] = {}
        self.increments = 0  # a page is created by an increment only, as when applied
        #: (page, org) -> its fold, in the order of their first change
        self.pages: dict[tuple[int, int], Fold] | None = {} if with_pages else None

    def add(self, change: IncrementLike, decrement: bool, t: float) -> int:
        """Fold one change filed at time ``t`` (its bucket); returns the keys it created."""
        count = change.count
        new = 1 if change.new_supporter else 0
        sign = -1 if decrement else 1
        keys = _bump(self.action, change.action_type, sign * count)  # type: ignore[arg-type]
        if new:
            self.supporters += sign
            keys += _bump(self.org, change.org_id, sign)  # type: ignore[arg-type]
            if change.area is not None:
                keys += _bump(self.area, change.area, sign)  # type: ignore[arg-type]
        if change.messages:
            self.messages += sign * change.messages
        minute = int(t) // 60
        bucket = self.minutes.get(minute)
        if bucket is None:
            bucket = self.minutes[minute] = [0, 0, 0, -1.0, -1.0]
            keys += 1
        if decrement:
            bucket[_S] -= new
            bucket[_A_OUT] += count
            if bucket[_T_OUT] < 0:
                bucket[_T_OUT] = t
        else:
            self.increments += 1
            bucket[_S] += new
            bucket[_A_IN] += count
            if t > bucket[_T_IN]:
                bucket[_T_IN] = t
        pages = self.pages
        if pages is not None and change.page is not None:
            key = (change.page, change.org_id)
            page = pages.get(key)
            if page is None:
                page = pages[key] = Fold(with_pages=False)
                keys += 1
            keys += page.add(change, decrement, t)
        return keys

    def absorb(self, other: Fold) -> None:
        """Add ``other``'s changes, as if they had come after this fold's."""
        self.supporters += other.supporters
        self.messages += other.messages
        self.increments += other.increments
        for mine, theirs in (
            (self.action, other.action),
            (self.area, other.area),
            (self.org, other.org),
        ):
            for key, n in theirs.items():
                _bump(mine, key, n)  # type: ignore[arg-type]
        for minute, (s, a_in, a_out, t_in, t_out) in other.minutes.items():
            bucket = self.minutes.get(minute)
            if bucket is None:
                self.minutes[minute] = [s, a_in, a_out, t_in, t_out]
                continue
            bucket[_S] += s
            bucket[_A_IN] += a_in
            bucket[_A_OUT] += a_out
            bucket[_T_IN] = max(bucket[_T_IN], t_in)
            if bucket[_T_OUT] < 0:
                bucket[_T_OUT] = t_out
        if self.pages is not None and other.pages is not None:
            for page_key, page in other.pages.items():
                held = self.pages.get(page_key)
                if held is None:
                    held = self.pages[page_key] = Fold(with_pages=False)
                held.absorb(page)

    def apply(self, stats: CampaignStats) -> tuple[CampaignStats, int]:
        """``stats`` with this fold's net added, each count clamped at zero (``supporters`` at
        ``extra_supporters``: no change takes offline supporters back) and a key that reaches
        zero dropped; returns the new stats and how many counts were clamped."""
        from campaignstats.model import CampaignStats  # the model imports this module

        wire = stats.to_wire()
        clamped = 0
        supporters = wire["supporters"] + self.supporters
        if supporters < wire["extra_supporters"]:
            clamped += 1
            supporters = wire["extra_supporters"]
        wire["supporters"] = supporters
        for name, delta in (("action", self.action), ("area", self.area), ("org", self.org)):
            counts = wire[name]
            for key, n in delta.items():
                if not n:
                    continue
                value = counts.get(key, 0) + n
                if value > 0:
                    counts[key] = value
                else:
                    counts.pop(key, None)
                    clamped += value < 0
        messages = wire["messages"] + self.messages
        if messages < 0:
            clamped += 1
            messages = 0
        wire["messages"] = messages
        return CampaignStats.from_wire(wire), clamped

    def apply_buckets(self, timeline: Timeline, now: float) -> None:
        """Add this fold's minutes to ``timeline``: what was added first, then what was taken
        (each take clamped by the bucket, as :meth:`Timeline.take` does)."""
        minutes = self.minutes.values()
        for s, a_in, _, t_in, _ in minutes:
            if a_in or s > 0:
                timeline.add(t_in, max(int(s), 0), int(a_in))
        for s, _, a_out, _, t_out in minutes:
            if a_out or s < 0:
                timeline.take(t_out, max(-int(s), 0), int(a_out), now)

    @property
    def keys(self) -> int:
        """Its keys (and its pages' keys): what it costs the journal's size."""
        n = len(self.action) + len(self.area) + len(self.org) + len(self.minutes)
        for page in (self.pages or {}).values():
            n += 1 + page.keys
        return n


def apply_page(
    fold: Fold,
    page: int,
    org_id: int,
    truth: dict[int, PageStats],
    timelines: dict[int, Timeline],
    *,
    campaign_id: int,
    elsewhere: bool,
    max_keys: int,
    now: float,
) -> None:
    """Add one page's fold (its changes under ``org_id``) to the merge's pages of its
    campaign, under the rules a change follows when applied (docs/design.md, "Action pages
    and orgs"): nothing on a page of another campaign (``elsewhere``) or org, and a page the
    truth does not have is created by an increment only, while the campaign has fewer than
    ``max_keys`` pages."""
    from campaignstats.model import PageStats
    from campaignstats.timeline import Timeline

    held = truth.get(page)
    if held is None:
        if elsewhere or not fold.increments or len(truth) >= max_keys:
            return
        held = truth[page] = PageStats(campaign_id, org_id)
    elif held.org_id != org_id:
        return
    stats, _ = fold.apply(held.stats)
    truth[page] = PageStats(held.campaign_id, held.org_id, stats)
    timeline = timelines.get(page)
    if timeline is None:
        if not fold.increments:
            return  # decrements take from buckets that exist; they create none
        timeline = timelines[page] = Timeline()
    fold.apply_buckets(timeline, now)
