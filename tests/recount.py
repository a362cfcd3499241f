"""A brute-force recount in Python of the rows of a Proca-shaped database (the test oracle).

Written from docs/design.md, "The truth in Postgres", as plainly as possible, with no SQL
aggregation: every table is read whole and the rules are applied row by row.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC

import asyncpg

from campaignstats.model import CampaignStats
from campaignstats.timeline import Timeline

SUPPORTER_ACCEPTED = 3
ACTION_COUNTED = (3, 4)  # accepted, delivered


async def recount(
    conn: asyncpg.Connection, campaign_ids: Iterable[int] | None = None
) -> dict[int, CampaignStats]:
    campaigns = [r["id"] for r in await conn.fetch("SELECT id FROM campaigns")]
    if campaign_ids is not None:
        wanted = set(campaign_ids)
        campaigns = [c for c in campaigns if c in wanted]
    pages = {r["id"]: r for r in await conn.fetch("SELECT * FROM action_pages")}
    supporters = {r["id"]: r for r in await conn.fetch("SELECT * FROM supporters")}
    actions = await conn.fetch("SELECT * FROM actions")

    people: dict[int, set[bytes]] = defaultdict(set)
    people_by_org: dict[tuple[int, int], set[bytes]] = defaultdict(set)
    people_by_area: dict[tuple[int, str], set[bytes]] = defaultdict(set)
    action_counts: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for a in actions:
        counted = a["processing_status"] in ACTION_COUNTED
        if counted and not a["testing"]:
            action_counts[a["campaign_id"]][a["action_type"]] += 1
        s = supporters.get(a["supporter_id"])
        if not counted or s is None:
            continue
        if s["processing_status"] != SUPPORTER_ACCEPTED or s["dupe_rank"] != 0:
            continue
        cid = a["campaign_id"]
        fp = bytes(s["fingerprint"])
        people[cid].add(fp)
        people_by_org[cid, pages[a["action_page_id"]]["org_id"]].add(fp)
        if s["area"] is not None:
            people_by_area[cid, s["area"]].add(fp)

    result = {cid: CampaignStats() for cid in campaigns}
    for cid, fps in people.items():
        if cid in result:
            result[cid].supporters = len(fps)
    for (cid, org), fps in people_by_org.items():
        if cid in result:
            result[cid].org[org] = len(fps)
    for (cid, area), fps in people_by_area.items():
        if cid in result:
            result[cid].area[area] = len(fps)
    for cid, counts in action_counts.items():
        if cid in result:
            result[cid].action = dict(counts)
    has_messages = await conn.fetchval("SELECT to_regclass('messages') IS NOT NULL")
    if has_messages:
        counted_actions = {
            a["id"]: a["campaign_id"]
            for a in actions
            if a["processing_status"] in ACTION_COUNTED and not a["testing"]
        }
        for m in await conn.fetch("SELECT action_id FROM messages"):
            cid = counted_actions.get(m["action_id"])
            if cid is not None and cid in result:
                result[cid].messages += 1
    for page in pages.values():
        stats = result.get(page["campaign_id"])
        if stats is not None and page["extra_supporters"]:
            stats.extra_supporters += page["extra_supporters"]
            stats.supporters += page["extra_supporters"]
            stats.org[page["org_id"]] = stats.org.get(page["org_id"], 0) + page["extra_supporters"]
    return result


async def recount_timelines(conn: asyncpg.Connection) -> dict[int, Timeline]:
    """Buckets per campaign (docs/design.md, "Time"), row by row: each counted, non-testing
    action at its ``inserted_at``; each person counted in a campaign at the first counted action
    of their fingerprint there. ``inserted_at`` is naive UTC: read as UTC here by hand."""
    supporters = {r["id"]: r for r in await conn.fetch("SELECT * FROM supporters")}
    actions = await conn.fetch("SELECT * FROM actions ORDER BY id")
    timelines: dict[int, Timeline] = defaultdict(Timeline)
    first: dict[tuple[int, bytes], float] = {}
    for a in actions:
        if a["processing_status"] not in ACTION_COUNTED:
            continue
        t = a["inserted_at"].replace(tzinfo=UTC).timestamp()
        cid = a["campaign_id"]
        if not a["testing"]:
            timelines[cid].add(t, 0, 1)
        s = supporters.get(a["supporter_id"])
        if s is None or s["processing_status"] != SUPPORTER_ACCEPTED or s["dupe_rank"] != 0:
            continue
        key = (cid, bytes(s["fingerprint"]))
        first[key] = min(first.get(key, t), t)
    for (cid, _), t in first.items():
        timelines[cid].add(t, 1, 0)
    return dict(timelines)
