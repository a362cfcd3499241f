"""Every SQL statement campaignstats runs against the source database, in one place.

A deployment whose tables are named differently builds its own :class:`Queries` (for instance
``dataclasses.replace(PROCA_QUERIES, action_counts=...)``) and passes it to the server; nothing else
in the package writes SQL for the calculation.

Each calculation query takes ``$1``, an array of campaign ids, or NULL for every campaign; the
filter is written so that the planner sees a plain ``= ANY($1)`` it can push into index scans.

Status codes (Proca): supporters.processing_status 3 = accepted; actions.processing_status
3 = accepted, 4 = delivered; campaigns.status 1 = live.
"""

from __future__ import annotations

from dataclasses import dataclass

# The rows every supporter count starts from: one per (campaign, org, area, fingerprint) reached by
# an accepted or delivered action of an accepted, first-ranked supporter. DISTINCT happens first,
# on narrow rows, so the three counts below aggregate a set that is already small: that is what
# makes the calculation several times faster than counting DISTINCT fingerprints per group.
_SUPPORTER_ROWS = """
    SELECT DISTINCT a.campaign_id, ap.org_id, s.area, s.fingerprint
    FROM actions a
    JOIN supporters s ON s.id = a.supporter_id
    JOIN action_pages ap ON ap.id = a.action_page_id
    WHERE a.processing_status IN (3, 4)
      AND s.processing_status = 3
      AND s.dupe_rank = 0
      AND ($1::bigint[] IS NULL OR a.campaign_id = ANY($1::bigint[]))
"""


@dataclass(frozen=True, slots=True)
class Queries:
    """The SQL of one calculation. Every statement runs in the same snapshot."""

    #: ids of the campaigns a calculation covers, by scope
    all_campaigns: str
    live_campaigns: str
    existing_campaigns: str  # $1: ids asked for; returns those that exist
    #: the highest action id the snapshot sees (increments above it are replayed after a merge)
    max_action_id: str
    #: (campaign_id, org_id, area, supporters, level): level 0 = campaign, 1 = org, 2 = area
    supporter_counts: str
    #: (campaign_id, org_id, extra_supporters)
    extra_supporters: str
    #: (campaign_id, action_type, count)
    action_counts: str


PROCA_QUERIES = Queries(
    all_campaigns="SELECT id FROM campaigns",
    live_campaigns="SELECT id FROM campaigns WHERE status = 1",
    existing_campaigns="SELECT id FROM campaigns WHERE id = ANY($1::bigint[])",
    max_action_id="SELECT coalesce(max(id), 0) FROM actions",
    supporter_counts=f"""
    WITH rows AS MATERIALIZED ({_SUPPORTER_ROWS}),
    per_campaign AS (
        SELECT campaign_id, NULL::bigint AS org_id, NULL::text AS area, count(*) AS n, 0 AS level
        FROM (SELECT DISTINCT campaign_id, fingerprint FROM rows) d
        GROUP BY campaign_id
    ),
    per_org AS (
        SELECT campaign_id, org_id, NULL::text, count(*), 1
        FROM (SELECT DISTINCT campaign_id, org_id, fingerprint FROM rows) d
        GROUP BY campaign_id, org_id
    ),
    per_area AS (
        SELECT campaign_id, NULL::bigint, area, count(*), 2
        FROM (SELECT DISTINCT campaign_id, area, fingerprint FROM rows WHERE area IS NOT NULL) d
        GROUP BY campaign_id, area
    )
    SELECT * FROM per_campaign UNION ALL SELECT * FROM per_org UNION ALL SELECT * FROM per_area
    """,
    extra_supporters="""
    SELECT campaign_id, org_id, sum(extra_supporters)::bigint
    FROM action_pages
    WHERE extra_supporters <> 0
      AND ($1::bigint[] IS NULL OR campaign_id = ANY($1::bigint[]))
    GROUP BY campaign_id, org_id
    """,
    action_counts="""
    SELECT campaign_id, action_type, count(*)
    FROM actions
    WHERE processing_status IN (3, 4) AND NOT testing
      AND ($1::bigint[] IS NULL OR campaign_id = ANY($1::bigint[]))
    GROUP BY campaign_id, action_type
    """,
)
