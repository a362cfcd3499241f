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
from collections.abc import Iterable, Sequence
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
    seen: set[tuple[Any, ...]] = set()  # (level, campaign, key, area, fingerprint)
    first_c: dict[tuple[Any, Any], int] = {}  # (campaign, fingerprint) -> earliest bucket
    first_p: dict[tuple[Any, Any, Any], int] = {}  # (campaign, page, fingerprint) -> same
    for r in rows:
        if len(r) <= 6 or r[4] != SHARED:
            out.append((r[0], r[1], r[2], r[3], r[4], r[5]))
            continue
        cid, page, area, _, _, start, org, fp = r[:8]
        seen.add((0, cid, None, None, fp))
        seen.add((1, cid, org, None, fp))
        seen.add((3, cid, page, None, fp))
        if area is not None:
            seen.add((2, cid, None, area, fp))
            seen.add((4, cid, page, area, fp))
        key_c = (cid, fp)
        if start < first_c.get(key_c, start + 1):
            first_c[key_c] = start
        key_p = (cid, page, fp)
        if start < first_p.get(key_p, start + 1):
            first_p[key_p] = start
    counts = Counter((level, cid, key, area) for level, cid, key, area, _ in seen)
    out.extend((cid, key, area, n, level, None) for (level, cid, key, area), n in counts.items())
    in_time: Counter[tuple[int, Any, Any, int]] = Counter()
    for (cid, _), start in first_c.items():
        in_time[5, cid, None, start] += 1
    for (cid, page, _), start in first_p.items():
        in_time[6, cid, page, start] += 1
    out.extend((cid, key, None, n, level, start) for (level, cid, key, start), n in in_time.items())
    return out
