"""Every SQL statement campaignstats runs against the source database, in one place.

A deployment whose tables are named differently builds its own :class:`Queries` (for instance
``dataclasses.replace(PROCA_QUERIES, action_counts=...)``) and passes it to the server; nothing else
in the package writes SQL for the calculation.

Each calculation query takes ``$1``, an array of campaign ids, or NULL for every campaign; the
filter is written so that the planner sees a plain ``= ANY($1)`` it can push into index scans.
The supporter queries also take ``$2``/``$3``, a half-open range ``[$2, $3)`` of
``supporters.fingerprint`` (NULL = unbounded): people are disjoint across fingerprint ranges, so
the counts of several ranges add up exactly, which lets two connections share the work.

Status codes (Proca): supporters.processing_status 3 = accepted; actions.processing_status
3 = accepted, 4 = delivered; campaigns.status 1 = live.
"""

from __future__ import annotations

from dataclasses import dataclass

# Accepted, first-ranked supporters in the fingerprint range [$2, $3) (NULL: unbounded).
_SUPPORTER_FILTER = """
      s.processing_status = 3 AND s.dupe_rank = 0
      AND ($2::bytea IS NULL OR s.fingerprint >= $2::bytea)
      AND ($3::bytea IS NULL OR s.fingerprint < $3::bytea)
"""
_ACTION_FILTER = """
      a.processing_status IN (3, 4)
      AND ($1::bigint[] IS NULL OR a.campaign_id = ANY($1::bigint[]))
"""

# The streaming plan, for "all" and "live". Counting distinct fingerprints with hash tables of one
# entry per person is what makes Proca's query slow (about 1 us per row on 2 cores). Instead:
#
# * `shared`: fingerprints held by two or more supporter rows of any status, read in order from
#   supporters_fingerprint_index (an index-only scan, no hashing). Every other fingerprint belongs
#   to exactly one supporter row, so for those people "distinct fingerprint" = "distinct supporter
#   id".
# * The join is a merge join of actions_partial_processing_status_index (supporter_id first, an
#   index-only scan of exactly the counted actions) with supporters_pkey, so rows arrive ordered by
#   supporter id: (supporter, campaign, org) is deduplicated by a tiny per-supporter sort, and
#   `first_c` marks the first row of each (supporter, campaign), which carries the supporter's area.
# * `g` groups by (campaign, org, area, pk), pk = the fingerprint for shared people and NULL for the
#   rest: a few thousand groups plus one per shared person. The non-shared counts are sums over g;
#   the shared people are counted exactly with DISTINCT pk. Both parts are disjoint sets of people.
#
# Rows: (campaign_id, org_id, area, count, level); level 0 = campaign, 1 = org, 2 = area. A campaign
# or key may come in several rows (non-shared and shared people): the caller adds them up.
_STREAMING_SUPPORTER_COUNTS = f"""
WITH shared AS MATERIALIZED (
    SELECT s.fingerprint
    FROM supporters s
    WHERE ($2::bytea IS NULL OR s.fingerprint >= $2::bytea)
      AND ($3::bytea IS NULL OR s.fingerprint < $3::bytea)
    GROUP BY s.fingerprint
    HAVING count(*) > 1
    ORDER BY s.fingerprint
),
g AS MATERIALIZED (
    SELECT c, org, area, pk, count(*) AS n, count(*) FILTER (WHERE first_c) AS n_first
    FROM (
        SELECT c, org, area, pk,
               (sid IS DISTINCT FROM lag(sid) OVER w OR c <> lag(c) OVER w) AS first_c
        FROM (
            SELECT DISTINCT ON (s.id, a.campaign_id, ap.org_id)
                   s.id AS sid, a.campaign_id AS c, ap.org_id AS org, s.area,
                   CASE WHEN s.fingerprint IN (SELECT fingerprint FROM shared)
                        THEN s.fingerprint END AS pk
            FROM actions a
            JOIN supporters s ON s.id = a.supporter_id
            JOIN action_pages ap ON ap.id = a.action_page_id
            WHERE {_ACTION_FILTER} AND {_SUPPORTER_FILTER}
            ORDER BY s.id, a.campaign_id, ap.org_id
        ) d
        WINDOW w AS (ORDER BY sid, c, org)
    ) x
    GROUP BY c, org, area, pk
)
SELECT c, NULL::bigint, NULL::text, sum(n_first)::bigint, 0 FROM g WHERE pk IS NULL GROUP BY c
UNION ALL
SELECT c, org, NULL, sum(n)::bigint, 1 FROM g WHERE pk IS NULL GROUP BY c, org
UNION ALL
SELECT c, NULL, area, sum(n_first)::bigint, 2 FROM g WHERE pk IS NULL AND area IS NOT NULL
GROUP BY c, area
UNION ALL
SELECT c, NULL, NULL, count(DISTINCT pk), 0 FROM g WHERE pk IS NOT NULL GROUP BY c
UNION ALL
SELECT c, org, NULL, count(DISTINCT pk), 1 FROM g WHERE pk IS NOT NULL GROUP BY c, org
UNION ALL
SELECT c, NULL, area, count(DISTINCT pk), 2 FROM g WHERE pk IS NOT NULL AND area IS NOT NULL
GROUP BY c, area
"""

# The hashing plan, for a list of campaign ids: the ids reach actions_campaign_id_index, and the
# rows of a few campaigns are cheap to hash on the fingerprint directly.
_HASHING_SUPPORTER_COUNTS = f"""
WITH rows AS MATERIALIZED (
    SELECT DISTINCT a.campaign_id, ap.org_id, s.area, s.fingerprint
    FROM actions a
    JOIN supporters s ON s.id = a.supporter_id
    JOIN action_pages ap ON ap.id = a.action_page_id
    WHERE {_ACTION_FILTER} AND {_SUPPORTER_FILTER}
)
SELECT campaign_id, NULL::bigint, NULL::text, count(*), 0
FROM (SELECT DISTINCT campaign_id, fingerprint FROM rows) d GROUP BY campaign_id
UNION ALL
SELECT campaign_id, org_id, NULL, count(*), 1
FROM (SELECT DISTINCT campaign_id, org_id, fingerprint FROM rows) d GROUP BY campaign_id, org_id
UNION ALL
SELECT campaign_id, NULL, area, count(*), 2
FROM (SELECT DISTINCT campaign_id, area, fingerprint FROM rows WHERE area IS NOT NULL) d
GROUP BY campaign_id, area
"""


# Buckets in time (docs/design.md, "Time"). `inserted_at` is `timestamp without time zone` holding
# UTC: date_trunc and extract(epoch) on it read it as UTC whatever the session's TimeZone. $2 and
# $3 are the cutoffs (timestamps, UTC, aligned on an hour and a day) above which a count is kept
# by the minute and by the hour: each row is one bucket of the finest unit its time is kept in.
_BUCKET = """
CASE WHEN {t} >= $2::timestamp THEN date_trunc('minute', {t})
     WHEN {t} >= $3::timestamp THEN date_trunc('hour', {t})
     ELSE date_trunc('day', {t}) END
"""

# (campaign_id, action_type, bucket start in epoch seconds, actions, latest inserted_at in epoch
# seconds): the action counts by type too (their sums), in the same scan.
_ACTION_BUCKETS = f"""
SELECT campaign_id, action_type, extract(epoch FROM b)::bigint, count(*),
       extract(epoch FROM max(t))::float8
FROM (
    SELECT campaign_id, action_type, inserted_at AS t, {_BUCKET.format(t="inserted_at")} AS b
    FROM actions
    WHERE processing_status IN (3, 4) AND NOT testing
      AND ($1::bigint[] IS NULL OR campaign_id = ANY($1::bigint[]))
) x
GROUP BY campaign_id, action_type, b
"""

# (campaign_id, bucket start in epoch seconds, supporters): each person counted in the campaign
# (the rules of the supporter counts) in the bucket of their first counted action there.
# $4/$5: a half-open range of fingerprints, as for the supporter counts. (Split over two
# connections, each would scan and join the whole tables: it runs whole on the helper.)
_SUPPORTER_BUCKETS = f"""
SELECT c, extract(epoch FROM b)::bigint, count(*)
FROM (
    SELECT c, {_BUCKET.format(t="first")} AS b
    FROM (
        SELECT a.campaign_id AS c, min(a.inserted_at) AS first
        FROM actions a
        JOIN supporters s ON s.id = a.supporter_id
        WHERE {_ACTION_FILTER} AND {_SUPPORTER_FILTER.replace("$2", "$4").replace("$3", "$5")}
        GROUP BY a.campaign_id, s.fingerprint
    ) p
) x
GROUP BY c, b
"""


@dataclass(frozen=True, slots=True)
class Queries:
    """The SQL of one calculation. Every statement runs in the same snapshot."""

    #: ids of the campaigns a calculation covers, by scope
    all_campaigns: str
    live_campaigns: str
    existing_campaigns: str  # $1: ids asked for; returns those that exist
    #: the first statement of a calculation, which takes its snapshot: (pg_current_snapshot() as
    #: text, the database clock in epoch seconds); docs/design.md, "Exact by transaction id"
    snapshot_info: str
    #: the highest action id the snapshot sees (increments above it are replayed after a merge)
    max_action_id: str
    #: ids of the actions above $1 (the newest ones) that the calculation counts, to find those
    #: it does not (not visible yet, or not accepted yet)
    recent_counted_action_ids: str
    #: (campaign_id, messages): mail-to-target messages of counted actions; run only when the
    #: database has the table (``messages_table``)
    message_counts: str
    #: returns true when the messages table exists
    messages_table: str
    #: (campaign_id, org_id, area, supporters, level): level 0 = campaign, 1 = org, 2 = area.
    #: Partial counts: rows with the same (level, key) are added up. $1 ids, [$2, $3) fingerprints.
    #: Used for the "all" and "live" scopes.
    supporter_counts: str
    #: the same, for a list of campaign ids
    supporter_counts_by_ids: str
    #: (campaign_id, org_id, extra_supporters)
    extra_supporters: str
    #: (campaign_id, action_type, count); not run by the calculation since the action buckets
    #: (below) carry the same counts, kept for the callers that run it on its own
    action_counts: str
    #: (campaign_id, action_type, bucket start, actions, latest action time): $1 ids, $2/$3 the
    #: cutoffs of minutes and hours (see _BUCKET); the action counts are their sums
    action_buckets: str = _ACTION_BUCKETS
    #: (campaign_id, bucket start, supporters): $1 ids, $2/$3 cutoffs, [$4, $5) fingerprints
    supporter_buckets: str = _SUPPORTER_BUCKETS
    #: settings (SET LOCAL) for the whole calculation transaction
    settings: tuple[str, ...] = ("jit = off",)
    #: settings (SET LOCAL) just before ``supporter_counts``: the streaming plan needs the merge
    #: join (its rows come ordered by supporter id); Postgres' parallel workers would only compete
    #: with the helper connection for the same cores
    supporter_settings: tuple[str, ...] = (
        "enable_hashjoin = off",
        "max_parallel_workers_per_gather = 0",
    )
    #: with a helper connection, the fingerprint ranges [lo, hi) each connection counts (their
    #: union must be every bytea; the split only balances the work, exactness does not depend on it)
    #: (0xb0: the helper also counts the supporters' buckets, the heaviest of the rest, so the
    #: main connection takes 11/16 of uniform fingerprints)
    fingerprint_split: bytes = b"\xb0"


PROCA_QUERIES = Queries(
    all_campaigns="SELECT id FROM campaigns",
    live_campaigns="SELECT id FROM campaigns WHERE status = 1",
    existing_campaigns="SELECT id FROM campaigns WHERE id = ANY($1::bigint[])",
    snapshot_info=(
        "SELECT pg_current_snapshot()::text, extract(epoch FROM clock_timestamp())::float8"
    ),
    max_action_id="SELECT coalesce(max(id), 0) FROM actions",
    recent_counted_action_ids=(
        "SELECT id FROM actions WHERE id > $1 AND processing_status IN (3, 4) AND NOT testing"
    ),
    messages_table="SELECT to_regclass('messages') IS NOT NULL",
    message_counts="""
    SELECT a.campaign_id, count(*)
    FROM messages m
    JOIN actions a ON a.id = m.action_id
    WHERE a.processing_status IN (3, 4) AND NOT a.testing
      AND ($1::bigint[] IS NULL OR a.campaign_id = ANY($1::bigint[]))
    GROUP BY a.campaign_id
    """,
    supporter_counts=_STREAMING_SUPPORTER_COUNTS,
    supporter_counts_by_ids=_HASHING_SUPPORTER_COUNTS,
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
