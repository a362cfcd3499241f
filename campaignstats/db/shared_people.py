"""The people who share a fingerprint, counted distinct after every part of the supporter query.

The streaming supporter query (:mod:`campaignstats.db.queries`) is split by supporter id range
over two connections. A fingerprint held by one supporter row is one person in one range, so
those people come as partial counts to add up. A fingerprint held by several supporter rows (a
"shared" one: a few percent of the people) may have rows in both ranges, so the query returns
each such person's rows as they are (level 7: one per campaign, org, page and area, with the
bucket of their first counted action there) and :func:`combine` counts them here, distinct by
fingerprint over all the parts, into the same partial-count rows (docs/design.md, "The
calculation's split").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

#: the level of a shared person's row in the supporter query's result
SHARED = 7

#: (campaign_id, key, area, count, level, bucket start): the partial counts _Built reads
Row = tuple[Any, Any, Any, int, int, Any]


def combine(rows: Iterable[Sequence[Any]]) -> list[Row]:
    """The rows with their level-7 rows replaced by the shared people's counts.

    A level-7 row is (campaign_id, page, area, 1, 7, bucket start, org, fingerprint). From them:
    level 0 to 4, the distinct fingerprints per campaign, (campaign, org), (campaign, area),
    (campaign, page), (campaign, page, area) (areas that are NULL left out, as for everyone);
    level 5 and 6, each person per campaign and per (campaign, page) in their earliest bucket
    (the bucket of a later time is never earlier, so this is the bucket of their first counted
    action over all their rows). Rows of other levels pass unchanged (their first six fields).
    """
    out: list[Row] = []
    shared = Combiner()
    for r in rows:
        if len(r) <= 6 or r[4] != SHARED:
            out.append((r[0], r[1], r[2], r[3], r[4], r[5]))
        else:
            shared.add(r)
    out.extend(shared.rows())
    return out


class Combiner:
    """The shared people's level-7 rows counted as they arrive, in any order and over any
    number of parts (what :func:`combine` does with them): memory holds one entry per distinct
    (level, campaign, key, area, fingerprint), and :meth:`rows` gives the partial-count rows."""

    __slots__ = ("_counts", "_first_c", "_first_p", "_in_time", "_seen")

    def __init__(self) -> None:
        self._seen: set[tuple[Any, ...]] = set()  # (level, campaign, key, area, fingerprint)
        self._counts: Counter[tuple[Any, Any, Any, Any]] = Counter()
        #: (campaign, fingerprint) and (campaign, page, fingerprint) -> earliest bucket
        self._first_c: dict[tuple[Any, ...], int] = {}
        self._first_p: dict[tuple[Any, ...], int] = {}
        #: (5, campaign, None, bucket) and (6, campaign, page, bucket) -> people
        self._in_time: Counter[tuple[int, Any, Any, int]] = Counter()

    def add(self, r: Sequence[Any]) -> None:
        """One level-7 row."""
        cid, page, area, _, _, start, org, fp = r[:8]
        seen, counts = self._seen, self._counts
        keys = [(0, cid, None, None), (1, cid, org, None), (3, cid, page, None)]
        if area is not None:
            keys.append((2, cid, None, area))
            keys.append((4, cid, page, area))
        for key in keys:
            one = (*key, fp)
            if one not in seen:
                seen.add(one)
                counts[key] += 1
        # Each person in the bucket of their earliest row so far (moved when an earlier comes).
        in_time = self._in_time
        for first, key_t, where in (
            (self._first_c, (cid, fp), (5, cid, None)),
            (self._first_p, (cid, page, fp), (6, cid, page)),
        ):
            held = first.get(key_t)
            if held is None or start < held:
                first[key_t] = start
                if held is not None:
                    in_time[(*where, held)] -= 1
                in_time[(*where, start)] += 1

    def rows(self) -> Iterator[Row]:
        """The shared people's partial counts (levels 0 to 6), once every part has come."""
        for (level, cid, key, area), n in self._counts.items():
            yield (cid, key, area, n, level, None)
        for (level, cid, key, start), n in self._in_time.items():
            if n:
                yield (cid, key, None, n, level, start)
