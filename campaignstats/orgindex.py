"""Org -> the campaigns that have (or had) it in their ``org`` map: the index ``org_stats`` walks
instead of every campaign (docs/protocol.md, "org_stats"; docs/design.md, "Memory").

Plain Python, no I/O. An org of one campaign (most orgs: real campaigns have their own) is one
pair ``org, campaign`` in an ``array('q')`` of the orgs of one campaign whose ids share a
*bucket* (``org_id >> BUCKET_BITS``: 256 consecutive ids), sorted by org id: 16 bytes an org
where a dict entry of its own cost about 76 (the entry, its share of the table, and the org id's
int object: docs/design.md, "Memory", round 4). Org ids are a database's serial ids, so a bucket
holds many; ids a bucket apart from any other cost more than before (a bucket of one pair, about
150 bytes). An org of more campaigns is one ``array('q')`` of their ids instead of a set: 8
bytes an entry instead of a set's 27 to 53 (a hash table kept at most 60% full, resized by 2x or
4x), and no int object held. Entries are appended when a campaign gains the org (a new key on
the hot path; every org of a merged campaign), so an array may hold an id more than once: it is
checked for repeats when it has grown to twice its length at the last check (plus ``SLACK``),
and rebuilt (sorted, each id once) only when it holds some, which keeps it within about 2x of
its distinct ids at an amortised O(1) per append. An array still in ascending order (``_clean``
equal to its length: campaigns joining in the order of their ids) holds no repeat and is never
checked. Readers get the distinct ids.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Set

#: appends allowed past twice the deduplicated length before the next deduplication (so that
#: an org of one campaign merged again and again is not deduplicated at every merge)
SLACK = 8
#: orgs of one campaign are kept in buckets of 2**BUCKET_BITS consecutive org ids
BUCKET_BITS = 8
#: what an ``array('q')`` holds: an org or a campaign id outside it is kept in the dict (an org
#: with such a campaign and others: a list of their ids)
_Q_MIN, _Q_MAX = -(2**63), 2**63 - 1
#: what a forget step counts a bucket as, at least (in orgs): looking at one costs a lookup, a
#: copy of its campaigns and a set check, about what 16 orgs' share of a full bucket costs; at
#: one org a bucket (ids 256 apart), counted as one, a step took 4 to 20 times its budget
BUCKET_WEIGHT = 16


def _held(ids: Iterable[int]) -> array[int] | list[int]:
    """An ``array('q')`` of ``ids``; a list when one is past what an array holds."""
    ids = list(ids)
    try:
        return array("q", ids)
    except OverflowError:
        return ids


def _position(pairs: array[int], org_id: int) -> int:
    """Index in ``pairs`` (``org, campaign`` interleaved, by ascending org) of the pair of
    ``org_id``, or of where it would go."""
    if not pairs or pairs[-2] < org_id:
        return len(pairs)  # past the last: a new org's id is the highest, commonly
    # A strided view of the org ids, bisected in C (as campaignstats.timeline does); the views
    # go when the call returns, so the array can grow again.
    return 2 * bisect_left(memoryview(pairs)[0::2], org_id)


class OrgCampaigns:
    """``org_id -> campaign ids`` (a superset: a campaign stays listed after its count for the
    org went back to zero, until it is forgotten)."""

    __slots__ = ("_clean", "_ids", "_single_count", "_singles")

    def __init__(self) -> None:
        #: per org of several campaigns, an array of their ids; an org of one campaign that
        #: was not put in a bucket (one that more campaigns had, and an id no array holds), its
        #: campaign's id
        self._ids: dict[int, int | array[int] | list[int]] = {}
        #: per org with an array, the array's length when it was last deduplicated
        self._clean: dict[int, int] = {}
        #: the other orgs of one campaign: per bucket (``org_id >> BUCKET_BITS``), their
        #: ``org, campaign`` pairs interleaved in one array, by ascending org id
        self._singles: dict[int, array[int]] = {}
        self._single_count = 0  # pairs in the buckets

    def _single(self, org_id: int) -> int | None:
        """The campaign of ``org_id`` when the org is in a bucket."""
        pairs = self._singles.get(org_id >> BUCKET_BITS)
        if pairs is None:
            return None
        i = _position(pairs, org_id)
        return pairs[i + 1] if i < len(pairs) and pairs[i] == org_id else None

    def add(self, org_id: int, campaign_id: int) -> None:
        ids = self._ids.get(org_id)
        if ids is None:
            if not _Q_MIN <= org_id <= _Q_MAX:
                self._ids[org_id] = campaign_id  # no array can hold it
                return
            key = org_id >> BUCKET_BITS
            pairs = self._singles.get(key)
            i = -1 if pairs is None else _position(pairs, org_id)
            if pairs is None or i == len(pairs) or pairs[i] != org_id:  # new to the index
                if not _Q_MIN <= campaign_id <= _Q_MAX:
                    self._ids[org_id] = campaign_id  # no array can hold it
                elif pairs is None:
                    self._singles[key] = array("q", (org_id, campaign_id))
                    self._single_count += 1
                else:
                    pairs[i:i] = array("q", (org_id, campaign_id))
                    self._single_count += 1
                return
            ids = pairs[i + 1]
            if ids == campaign_id:
                return
            # A second campaign: the org leaves its bucket for an array of its own.
            del pairs[i : i + 2]
            if not pairs:
                del self._singles[key]
            self._single_count -= 1
            pair = (ids, campaign_id) if ids < campaign_id else (campaign_id, ids)
            self._ids[org_id] = _held(pair)
            self._clean[org_id] = 2
            return
        if isinstance(ids, int):
            if ids != campaign_id:
                pair = (ids, campaign_id) if ids < campaign_id else (campaign_id, ids)
                self._ids[org_id] = _held(pair)  # ascending (see below)
                self._clean[org_id] = 2
            return
        last = ids[-1]
        if last == campaign_id:
            return  # the commonest repeat: the same campaign again (its pages, a merge)
        clean = self._clean[org_id]
        if campaign_id > last and clean == len(ids):
            # Still ascending, so still distinct: nothing to deduplicate, ever (a new campaign
            # joining; a sort of the whole org at each doubling fell in one increment).
            try:
                ids.append(campaign_id)
            except OverflowError:  # no array can hold it (a try costs nothing on this path)
                ids = self._ids[org_id] = [*ids, campaign_id]
            self._clean[org_id] = clean + 1
            return
        try:
            ids.append(campaign_id)
        except OverflowError:
            ids = self._ids[org_id] = [*ids, campaign_id]
        if len(ids) > 2 * clean + SLACK:
            distinct = set(ids)
            if len(distinct) == len(ids):
                # Nothing repeated (campaigns joining out of order, the commonest case): the
                # array stays as it is, known distinct but not ascending (one below its length:
                # see above), and is looked at again when it has doubled. Sorting and copying
                # it cost twice the check (callgrind).
                self._clean[org_id] = len(ids) - 1
                return
            self._ids[org_id] = _held(sorted(distinct))
            self._clean[org_id] = len(distinct)

    def campaigns(self, org_id: int) -> Set[int]:
        """The distinct campaigns listed for ``org_id`` (empty for an unknown org)."""
        ids = self._ids.get(org_id)
        if ids is None:
            single = self._single(org_id)
            return frozenset() if single is None else {single}
        return {ids} if isinstance(ids, int) else set(ids)

    def forget(self, campaign_ids: Set[int]) -> None:
        """Take ``campaign_ids`` out of every org; an org left with none goes."""
        self._forget_singles(list(self._singles), campaign_ids)
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
        # The buckets first, then the orgs of the dict as they are when the buckets are done:
        # an org leaves its bucket for the dict when a second campaign joins it (between two
        # steps), never the other way, so none is missed. A bucket is looked at whole.
        # (The keys in C: the first step's work must grow as little as it can with the orgs
        # held; a bucket's size is read when a step comes to it. A list of every bucket's size
        # took 15 ms at 300,000 buckets of one org.)
        buckets = list(self._singles)
        in_buckets = self._single_count  # orgs in the buckets not looked at yet (about)
        orgs: list[int] | None = None
        i = start = 0
        gone = campaign_ids
        while True:
            gone = {cid for cid in gone if still_gone(cid)}
            if not gone:
                return
            budget, first = orgs_per_step, i
            singles = self._singles
            while i < len(buckets) and budget > 0:
                pairs = singles.get(buckets[i])
                n = 0 if pairs is None else len(pairs) // 2
                budget -= max(n, BUCKET_WEIGHT)  # a bucket costs at least its look
                in_buckets -= n
                i += 1
            if first < i:
                self._forget_singles(buckets[first:i], gone)
            # while buckets are left, some orgs are: never 0 (it ends the steps)
            in_buckets = 0 if i == len(buckets) else max(in_buckets, 1)
            if budget > 0:  # every bucket looked at: the dict's orgs
                if orgs is None:
                    orgs = list(self._ids)
                self._forget_in(orgs[start : start + budget], gone)
                start += budget
            left = in_buckets + (len(self._ids) if orgs is None else max(0, len(orgs) - start))
            yield left
            if not left and orgs is not None:
                return

    def _forget_singles(self, buckets: Iterable[int], campaign_ids: Set[int]) -> None:
        """Take ``campaign_ids`` out of the ``buckets`` still held; a bucket left with no pair
        goes."""
        for key in buckets:
            pairs = self._singles.get(key)
            if pairs is None or campaign_ids.isdisjoint(pairs[1::2]):
                continue  # none of them in it (a check in C)
            kept = array("q")
            for i in range(0, len(pairs), 2):
                if pairs[i + 1] not in campaign_ids:
                    kept.append(pairs[i])
                    kept.append(pairs[i + 1])
            self._single_count -= (len(pairs) - len(kept)) // 2
            if kept:
                self._singles[key] = kept
            else:
                del self._singles[key]

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
                self._ids[org_id] = _held(kept)
                self._clean[org_id] = len(kept)

    def held(self, org_id: int) -> int:
        """Entries held for ``org_id``, repeats included (what its array costs)."""
        ids = self._ids.get(org_id)
        if ids is None:
            return 0 if self._single(org_id) is None else 1
        return 1 if isinstance(ids, int) else len(ids)

    def as_dict(self) -> dict[int, set[int]]:
        """``{org_id: {campaign_id, ...}}``: for tests and comparisons."""
        return {org_id: set(self.campaigns(org_id)) for org_id in self}

    def containers(self) -> list[object]:
        """The objects this index holds (bench.memory sizes them; an id that is also a key of
        the campaigns is counted there; the org ids that are keys of the dict are not counted:
        an org of one campaign is in a bucket, and those of more are few)."""
        return [
            self._ids,
            self._clean,
            *self._ids.values(),
            self._singles,
            *self._singles,
            *self._singles.values(),
        ]

    def __len__(self) -> int:
        return len(self._ids) + self._single_count

    def __iter__(self) -> Iterator[int]:
        yield from self._ids
        for pairs in self._singles.values():
            yield from pairs[0::2]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, OrgCampaigns):
            return self.as_dict() == other.as_dict()
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"OrgCampaigns({self.as_dict()!r})"
