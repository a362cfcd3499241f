"""Org -> the campaigns that have (or had) it in their ``org`` map: the index ``org_stats``
walks instead of every campaign (docs/protocol.md, "org_stats"; docs/design.md, "Memory").

Plain Python, no I/O. An org of one campaign (most orgs: real campaigns have their own) is
that campaign's id, no container (a set of one costs 216 bytes, an array 72); an org of more is
one ``array('q')`` of their ids instead of a set: 8 bytes an entry instead of a set's 27 to 53
(a hash table kept at most 60% full, resized by 2x or 4x), and no int object held. Entries
are appended when a campaign gains the org (a new key on the hot path; every org of a merged
campaign), so an array may hold an id more than once: it is checked for repeats when it has
grown to twice its length at the last check (plus ``SLACK``), and rebuilt (sorted, each id
once) only when it holds some, which keeps it within about 2x of its distinct ids at an
amortised O(1) per append. An array still in ascending order (``_clean`` equal to its length:
campaigns joining in the order of their ids) holds no repeat and is never checked. Readers get
the distinct ids.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Iterator, Set

#: appends allowed past twice the deduplicated length before the next deduplication (so that
#: an org of one campaign merged again and again is not deduplicated at every merge)
SLACK = 8


class OrgCampaigns:
    """``org_id -> campaign ids`` (a superset: a campaign stays listed after its count for the
    org went back to zero, until it is forgotten)."""

    __slots__ = ("_clean", "_ids")

    def __init__(self) -> None:
        #: per org, its campaign's id (one) or an array of their ids (more)
        self._ids: dict[int, int | array[int]] = {}
        #: per org with an array, the array's length when it was last deduplicated
        self._clean: dict[int, int] = {}

    def add(self, org_id: int, campaign_id: int) -> None:
        ids = self._ids.get(org_id)
        if ids is None:
            self._ids[org_id] = campaign_id
            return
        if isinstance(ids, int):
            if ids != campaign_id:
                pair = (ids, campaign_id) if ids < campaign_id else (campaign_id, ids)
                self._ids[org_id] = array("q", pair)  # ascending (see below)
                self._clean[org_id] = 2
            return
        last = ids[-1]
        if last == campaign_id:
            return  # the commonest repeat: the same campaign again (its pages, a merge)
        clean = self._clean[org_id]
        if campaign_id > last and clean == len(ids):
            # Still ascending, so still distinct: nothing to deduplicate, ever (a new campaign
            # joining; a sort of the whole org at each doubling fell in one increment).
            ids.append(campaign_id)
            self._clean[org_id] = clean + 1
            return
        ids.append(campaign_id)
        if len(ids) > 2 * clean + SLACK:
            distinct = set(ids)
            if len(distinct) == len(ids):
                # Nothing repeated (campaigns joining out of order, the commonest case): the
                # array stays as it is, known distinct but not ascending (one below its length:
                # see above), and is looked at again when it has doubled. Sorting and copying
                # it cost twice the check (callgrind).
                self._clean[org_id] = len(ids) - 1
                return
            self._ids[org_id] = array("q", sorted(distinct))
            self._clean[org_id] = len(distinct)

    def campaigns(self, org_id: int) -> Set[int]:
        """The distinct campaigns listed for ``org_id`` (empty for an unknown org)."""
        ids = self._ids.get(org_id)
        if ids is None:
            return frozenset()
        return {ids} if isinstance(ids, int) else set(ids)

    def forget(self, campaign_ids: Set[int]) -> None:
        """Take ``campaign_ids`` out of every org; an org left with none goes."""
        self._forget_in(list(self._ids), campaign_ids)

    def forget_steps(
        self, campaign_ids: Set[int], still_gone: Callable[[int], bool], orgs_per_step: int
    ) -> Iterator[int]:
        """:meth:`forget`, ``orgs_per_step`` orgs at a time: the caller takes one step per turn
        of its loop, and others may read and add between steps (docs/design.md, "Memory").
        Each step yields the orgs left to look at. An id for which ``still_gone`` turns False
        meanwhile (a campaign that came back) is left where it is: the orgs it joined again
        keep it. The orgs are those of when the first step runs; an org added later lists no
        campaign of ``campaign_ids`` that is still gone."""
        if orgs_per_step < 1:
            raise ValueError("orgs_per_step is at least 1")
        orgs = list(self._ids)
        gone = campaign_ids
        for start in range(0, len(orgs), orgs_per_step):
            gone = {cid for cid in gone if still_gone(cid)}
            if not gone:
                return
            self._forget_in(orgs[start : start + orgs_per_step], gone)
            yield max(0, len(orgs) - start - orgs_per_step)

    def _forget_in(self, orgs: Iterable[int], campaign_ids: Set[int]) -> None:
        """Take ``campaign_ids`` out of the ``orgs`` still indexed; an org left with none goes."""
        for org_id in orgs:
            ids = self._ids.get(org_id)
            if ids is None:
                continue
            # An org none of them is in is left as it is (a check in C, no copy).
            if isinstance(ids, int):
                if ids in campaign_ids:
                    del self._ids[org_id]
                continue
            if campaign_ids.isdisjoint(ids):
                continue
            if len(campaign_ids) <= SLACK:  # a few: taken out in place (C scans, no copy)
                removed = 0
                for cid in campaign_ids:
                    while cid in ids:
                        ids.remove(cid)
                        removed += 1
                if len(ids) > 1:
                    # ``_clean`` equal to the length means "ascending" (see add): kept only
                    # when it was (removals keep the order), else below the length.
                    clean = self._clean[org_id]
                    ascending = clean == len(ids) + removed
                    self._clean[org_id] = len(ids) if ascending else min(clean, len(ids) - 1)
                    continue
                kept = list(ids)
            else:
                kept = sorted(set(ids) - campaign_ids)
            del self._clean[org_id]
            if not kept:
                del self._ids[org_id]
            elif len(kept) == 1:
                self._ids[org_id] = kept[0]
            else:
                self._ids[org_id] = array("q", kept)
                self._clean[org_id] = len(kept)

    def held(self, org_id: int) -> int:
        """Entries held for ``org_id``, repeats included (what its array costs)."""
        ids = self._ids.get(org_id)
        if ids is None:
            return 0
        return 1 if isinstance(ids, int) else len(ids)

    def as_dict(self) -> dict[int, set[int]]:
        """``{org_id: {campaign_id, ...}}``: for tests and comparisons."""
        return {org_id: set(self.campaigns(org_id)) for org_id in self._ids}

    def containers(self) -> list[object]:
        """The objects this index holds (bench.memory sizes them; an id that is also a key of
        the campaigns is counted there)."""
        return [self._ids, self._clean, *self._ids.values()]

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[int]:
        return iter(self._ids)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, OrgCampaigns):
            return self.as_dict() == other.as_dict()
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"OrgCampaigns({self.as_dict()!r})"
