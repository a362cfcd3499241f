"""Proca's own full calculation, as plain SQL, run the way Proca runs it (for comparison only).

From fixthestatusquo/proca-server, lib/proca/server/stats.ex (``do_calculate/2``), Ecto queries
written out as SQL, plus the area query of an earlier version (archive-proca-backend, commit
09b100ee; /tmp/proca_research.md section 2 (B)), which the current Proca no longer runs.

Proca runs the statements one after the other on one connection, in READ COMMITTED: only the org
supporters query is inside a transaction, for its ``SET LOCAL work_mem = '256MB'``. The results are
folded into the same shape as :class:`campaignstats.model.CampaignStats` so that the org, action
and extra-supporter maps can be compared. ``supporters`` is Proca's sum of the per-org counts
(someone who signed through two orgs' pages counts twice) and ``area`` follows Proca's old area
semantics, so neither is expected to equal ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from campaignstats.model import CampaignStats

if TYPE_CHECKING:
    import asyncpg

ORG_WORK_MEM = "256MB"

# The filter Ecto adds for calculate_live/0: "a.campaign_id = ANY($1)" (Ecto's `in ^ids`).
_FILTER = "{alias}.campaign_id = ANY($1::bigint[])"

ORG_SUPPORTERS = """
SELECT r.campaign_id, r.org_id, count(r.fingerprint)
FROM (
    SELECT DISTINCT a.campaign_id, ap.org_id, s.fingerprint
    FROM actions a
    JOIN supporters s ON a.supporter_id = s.id
    JOIN action_pages ap ON a.action_page_id = ap.id
    WHERE s.processing_status = 3
      AND a.processing_status IN (3, 4)
      AND s.dupe_rank = 0
      {filter}
) r
GROUP BY r.campaign_id, r.org_id
"""

CAMPAIGN_IDS = "SELECT id FROM campaigns"
LIVE_CAMPAIGN_IDS = "SELECT id FROM campaigns WHERE status = 1"

EXTRA_SUPPORTERS = """
SELECT ap.campaign_id, ap.org_id, sum(ap.extra_supporters)
FROM action_pages ap
WHERE ap.extra_supporters <> 0
  {filter}
GROUP BY ap.campaign_id, ap.org_id
"""

ACTION_COUNTS = """
SELECT a.campaign_id, a.action_type, count(a.id)
FROM actions a
WHERE a.processing_status IN (3, 4) AND NOT a.testing
  {filter}
GROUP BY a.campaign_id, a.action_type
"""

# Earlier Proca (archive-proca-backend 09b100ee): one row per (campaign, fingerprint), the earliest
# action's, then counted per area of that action's supporter.
AREA_SUPPORTERS = """
SELECT f.campaign_id, s.area, count(s.fingerprint)
FROM (
    SELECT DISTINCT ON (a.campaign_id, s1.fingerprint) a.*
    FROM actions a
    JOIN supporters s1 ON a.supporter_id = s1.id
    WHERE s1.processing_status IN (3, 4)
      AND a.processing_status IN (3, 4)
      AND s1.area IS NOT NULL
      {filter}
    ORDER BY a.campaign_id, s1.fingerprint, a.inserted_at
) f
JOIN supporters s ON s.id = f.supporter_id
GROUP BY f.campaign_id, s.area
"""


def _sql(template: str, alias: str, filtered: bool) -> str:
    return template.format(filter=("AND " + _FILTER.format(alias=alias)) if filtered else "")


async def proca_calculate(
    conn: asyncpg.Connection, scope: str | Sequence[int] = "all", *, with_area: bool = True
) -> dict[int, CampaignStats]:
    """Proca's ``calculate/0`` (scope "all"), ``calculate_live/0`` ("live"), or ids."""
    if scope == "all":
        ids: list[int] | None = None
    elif scope == "live":
        ids = [r[0] for r in await conn.fetch(LIVE_CAMPAIGN_IDS)]
    else:
        ids = list(scope)  # type: ignore[arg-type]
    if ids == []:
        return {}
    filtered = ids is not None
    args = (ids,) if filtered else ()

    async with conn.transaction():
        await conn.execute(f"SET LOCAL work_mem = '{ORG_WORK_MEM}'")
        org_rows = await conn.fetch(_sql(ORG_SUPPORTERS, "a", filtered), *args)
    campaign_ids = [r[0] for r in await conn.fetch(CAMPAIGN_IDS)] if ids is None else ids
    extra_rows = await conn.fetch(_sql(EXTRA_SUPPORTERS, "ap", filtered), *args)
    action_rows = await conn.fetch(_sql(ACTION_COUNTS, "a", filtered), *args)
    area_rows = await conn.fetch(_sql(AREA_SUPPORTERS, "a", filtered), *args) if with_area else []

    result = {cid: CampaignStats() for cid in campaign_ids}
    for cid, org_id, n in org_rows:
        stats = result.setdefault(cid, CampaignStats())
        stats.supporters += n
        stats.org[org_id] = n
    for cid, org_id, extra in extra_rows:
        stats = result.setdefault(cid, CampaignStats())
        stats.supporters += extra
        stats.extra_supporters += extra
        stats.org[org_id] = stats.org.get(org_id, 0) + extra
    for cid, action_type, n in action_rows:
        result.setdefault(cid, CampaignStats()).action[action_type] = n
    for cid, area, n in area_rows:
        result.setdefault(cid, CampaignStats()).area[area] = n
    return result
