"""Every SQL statement campaignstats runs against the source database, in one place.

A deployment whose tables are named differently builds its own :class:`Queries` (for instance
``dataclasses.replace(PROCA_QUERIES, action_counts=...)``) and passes it to the server; nothing else
in the package writes SQL for the calculation.

Each calculation query takes ``$1``, an array of campaign ids, or NULL for every campaign; the
filter is written so that the planner sees a plain ``= ANY($1)`` it can push into index scans.
The supporter queries also take ``$2``/``$3``, a half-open range ``[$2, $3)`` (NULL = unbounded),
which lets two connections share the work: of ``supporters.id`` for the streaming query (each
range then reads only its own supporters' actions; the people who share a fingerprint come as
rows that :mod:`campaignstats.db.shared_people` counts distinct over all ranges), of
``supporters.fingerprint`` for the hashing one (people are disjoint across fingerprint ranges, so
its counts add up exactly).

Status codes (Proca): supporters.processing_status 3 = accepted; actions.processing_status
3 = accepted, 4 = delivered; campaigns.status 1 = live.
"""

from __future__ import annotations

from dataclasses import dataclass

# Accepted, first-ranked supporters in the fingerprint range [$2, $3) (NULL: unbounded), for the
# hashing plan.
_SUPPORTER_FILTER = """
      s.processing_status = 3 AND s.dupe_rank = 0
      AND ($2::bytea IS NULL OR s.fingerprint >= $2::bytea)
      AND ($3::bytea IS NULL OR s.fingerprint < $3::bytea)
"""
_ACTION_FILTER = """
      a.processing_status IN (3, 4)
      AND ($1::bigint[] IS NULL OR a.campaign_id = ANY($1::bigint[]))
"""

# Buckets in time (docs/design.md, "Time"). `inserted_at` is `timestamp without time zone` holding
# UTC: date_bin and extract(epoch) on it read it as UTC whatever the session's TimeZone. $2 and
# $3 are the cutoffs (timestamps, UTC, aligned on an hour and a day) above which a count is kept
# by the minute and by the hour: each row is one bucket of the finest unit its time is kept in.
# The bucket of a later time is never earlier (the cutoffs are aligned), so the bucket of a
# person's first action is the earliest bucket of their actions.
#
# date_bin, not date_trunc: the same start (a minute, hour or day of a timestamp without time
# zone), by integer arithmetic instead of a calendar conversion per row (date_trunc's CASE cost
# the action buckets about 0.3 s of CPU over 4.1M rows at the 5M-action demo). Its origin is
# never later than the time: Postgres 16's date_bin puts a time before its origin that lies
# exactly on a boundary one bin too early. So the minutes count from $2 and the hours from $3
# (aligned, and never above a time of their branch), the days from the lowest timestamp there
# is (a midnight). The difference must fit in 64 bits of microseconds (292,000 years; date_bin
# does not check): the cutoffs are years 1 to 9999 (Python datetimes), so only a time past the
# year 290,000 takes date_trunc. tests/test_calc_buckets.py compares it with date_trunc,
# boundaries and extremes included.
_BUCKET = """
CASE WHEN {t} >= '290000-01-01'::timestamp THEN date_trunc('minute', {t})
     WHEN {t} >= $2::timestamp THEN date_bin('1 minute', {t}, $2::timestamp)
     WHEN {t} >= $3::timestamp THEN date_bin('1 hour', {t}, $3::timestamp)
     ELSE date_bin('1 day', {t}, '4714-11-24 00:00:00 BC'::timestamp) END
"""
# In the supporter queries, whose $2/$3 are a range (of fingerprints or supporter ids), the
# cutoffs are $4/$5.
_SUPPORTER_BUCKET = _BUCKET.replace("$2", "$4").replace("$3", "$5")

# Accepted, first-ranked supporters with an id in [$2, $3) (NULL: unbounded), for the streaming
# plan; the same bounds on the actions' supporter_id, so that each half reads only its own
# supporters' actions from the index (their first key).
_SUPPORTER_ID_FILTER = """
      s.processing_status = 3 AND s.dupe_rank = 0
      AND ($2::bigint IS NULL OR s.id >= $2::bigint)
      AND ($3::bigint IS NULL OR s.id < $3::bigint)
      AND ($2::bigint IS NULL OR a.supporter_id >= $2::bigint)
      AND ($3::bigint IS NULL OR a.supporter_id < $3::bigint)
"""

# The streaming plan, for "all" and "live". Counting distinct fingerprints with hash tables of one
# entry per person is what makes Proca's query slow (about 1 us per row on 2 cores). Instead:
#
# * $6, the shared fingerprints (``shared_fingerprints``, run once before the parts): those held
#   by two or more accepted, first-ranked supporter rows. Every other counted person has exactly
#   one such row, so for those people "distinct fingerprint" = "distinct supporter id", and a
#   supporter id range holds whole people. (Shared fingerprints are few where a fingerprint has
#   one first-ranked row: none in the demo.)
# * The join is a merge join of campaignstats_counted_actions_index (supporter_id first, an
#   index-only scan of exactly the counted actions of the id range, with their time) with
#   supporters_pkey, so rows arrive ordered by supporter id: `x` is one row per (supporter,
#   campaign, org, page) with the supporter's first counted action on that page (`tp`),
#   deduplicated by a tiny per-supporter sort. In `y` (one window, no further sort), `first_c`
#   marks the first row of each (supporter, campaign), which carries the supporter's area, `tc`
#   is their first counted action in the campaign, and `first_o` marks the first row of each
#   (supporter, campaign, org).
# * `g` groups the rows three ways in one pass (grouping sets), pk = the fingerprint for shared
#   people and NULL for the rest: (campaign, org, page, area, pk) for the counts, (campaign,
#   bucket of tc) and (campaign, page, bucket of tp) for the supporters in time. The counts of
#   the non-shared people are sums over g. A shared person's supporter rows may lie in both id
#   ranges, so their rows are returned as they are (level 7, a few per shared person: their
#   earliest bucket per (campaign, org, page, area)) and the caller counts them distinct over
#   all ranges (campaignstats.db.shared_people).
#
# Rows: (campaign_id, key, area, count, level, bucket start in epoch seconds, org, fingerprint);
# level 0 = campaign, 1 = org (key), 2 = area, 3 = page (key), 4 = page area (key, area), 5 = the
# campaign's supporters in a bucket, 6 = a page's (key) supporters in a bucket: partial counts of
# the non-shared people (org and fingerprint NULL). Level 7: a shared person (fingerprint) on a
# page (key) of an org, with an area, and the bucket of their first counted action there (count
# 1). $2/$3: the supporter id range [$2, $3) (NULL = unbounded); $4/$5: the cutoffs of the
# buckets (see _BUCKET); $6: the shared fingerprints.
_STREAMING_SUPPORTER_COUNTS = f"""
WITH x AS (
    SELECT DISTINCT ON (s.id, a.campaign_id, ap.org_id, a.action_page_id)
           s.id AS sid, a.campaign_id AS c, ap.org_id AS org, a.action_page_id AS page, s.area,
           CASE WHEN s.fingerprint IN (SELECT unnest($6::bytea[]))
                THEN s.fingerprint END AS pk,
           a.inserted_at AS tp
    FROM actions a
    JOIN supporters s ON s.id = a.supporter_id
    JOIN action_pages ap ON ap.id = a.action_page_id
    WHERE {_ACTION_FILTER} AND {_SUPPORTER_ID_FILTER}
    ORDER BY s.id, a.campaign_id, ap.org_id, a.action_page_id, a.inserted_at
),
y AS (
    SELECT c, org, page, area, pk, tp,
           row_number() OVER w = 1 AS first_c,
           org IS DISTINCT FROM lag(org) OVER w AS first_o,
           min(tp) OVER w AS tc
    FROM x
    WINDOW w AS (PARTITION BY sid, c ORDER BY org, page
                 ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
),
g AS MATERIALIZED (
    SELECT c, org, page, area, pk, bc, bp, GROUPING(org, area, bc, bp) AS gs,
           count(*) AS n, count(*) FILTER (WHERE first_o) AS n_org,
           count(*) FILTER (WHERE first_c) AS n_c, min(b) AS first_b
    FROM (
        SELECT c, org, page, area, pk, first_c, first_o,
               CASE WHEN first_c AND pk IS NULL THEN {_SUPPORTER_BUCKET.format(t="tc")} END AS bc,
               CASE WHEN pk IS NULL THEN {_SUPPORTER_BUCKET.format(t="tp")} END AS bp,
               {_SUPPORTER_BUCKET.format(t="tp")} AS b
        FROM y
    ) z
    GROUP BY GROUPING SETS ((c, org, page, area, pk), (c, bc), (c, page, bp))
),
counts AS (SELECT * FROM g WHERE gs = 3 AND pk IS NULL)
SELECT c, NULL::bigint, NULL::text, sum(n_c)::bigint, 0, NULL::bigint, NULL::bigint,
       NULL::bytea
FROM counts GROUP BY c
UNION ALL
SELECT c, org, NULL, sum(n_org)::bigint, 1, NULL, NULL, NULL FROM counts GROUP BY c, org
UNION ALL
SELECT c, NULL, area, sum(n_c)::bigint, 2, NULL, NULL, NULL FROM counts WHERE area IS NOT NULL
GROUP BY c, area
UNION ALL
SELECT c, page, NULL, sum(n)::bigint, 3, NULL, NULL, NULL FROM counts GROUP BY c, page
UNION ALL
SELECT c, page, area, sum(n)::bigint, 4, NULL, NULL, NULL FROM counts WHERE area IS NOT NULL
GROUP BY c, page, area
UNION ALL
SELECT c, NULL, NULL, n, 5, extract(epoch FROM bc)::bigint, NULL, NULL
FROM g WHERE gs = 13 AND bc IS NOT NULL
UNION ALL
SELECT c, page, NULL, n, 6, extract(epoch FROM bp)::bigint, NULL, NULL
FROM g WHERE gs = 14 AND bp IS NOT NULL
UNION ALL
SELECT c, page, area, 1, 7, extract(epoch FROM first_b)::bigint, org, pk
FROM g WHERE gs = 3 AND pk IS NOT NULL
"""

# The hashing plan, for a list of campaign ids: the ids reach actions_campaign_id_index, and the
# rows of a few campaigns are cheap to hash on the fingerprint directly. The same rows as the
# streaming plan.
_HASHING_SUPPORTER_COUNTS = f"""
WITH rows AS MATERIALIZED (
    SELECT a.campaign_id AS c, ap.org_id AS org, a.action_page_id AS page, s.area,
           s.fingerprint AS fp, min(a.inserted_at) AS t
    FROM actions a
    JOIN supporters s ON s.id = a.supporter_id
    JOIN action_pages ap ON ap.id = a.action_page_id
    WHERE {_ACTION_FILTER} AND {_SUPPORTER_FILTER}
    GROUP BY 1, 2, 3, 4, 5
)
SELECT c, NULL::bigint, NULL::text, count(DISTINCT fp), 0, NULL::bigint FROM rows GROUP BY c
UNION ALL
SELECT c, org, NULL, count(DISTINCT fp), 1, NULL FROM rows GROUP BY c, org
UNION ALL
SELECT c, NULL, area, count(DISTINCT fp), 2, NULL FROM rows WHERE area IS NOT NULL
GROUP BY c, area
UNION ALL
SELECT c, page, NULL, count(DISTINCT fp), 3, NULL FROM rows GROUP BY c, page
UNION ALL
SELECT c, page, area, count(DISTINCT fp), 4, NULL FROM rows WHERE area IS NOT NULL
GROUP BY c, page, area
UNION ALL
SELECT c, NULL, NULL, count(*), 5, extract(epoch FROM b)::bigint
FROM (SELECT c, {_SUPPORTER_BUCKET.format(t="min(t)")} AS b FROM rows GROUP BY c, fp) p
GROUP BY c, b
UNION ALL
SELECT c, page, NULL, count(*), 6, extract(epoch FROM b)::bigint
FROM (SELECT c, page, {_SUPPORTER_BUCKET.format(t="min(t)")} AS b FROM rows GROUP BY c, page, fp) p
GROUP BY c, page, b
"""


# (campaign_id, action page id, action_type, bucket start in epoch seconds, actions, latest
# inserted_at in epoch seconds): the action counts by type, of the campaigns and of their pages
# (their sums), in the same scan.
_ACTION_BUCKETS = f"""
SELECT campaign_id, action_page_id, action_type, extract(epoch FROM b)::bigint, count(*),
       extract(epoch FROM max(t))::float8
FROM (
    SELECT campaign_id, action_page_id, action_type, inserted_at AS t,
           {_BUCKET.format(t="inserted_at")} AS b
    FROM actions
    WHERE processing_status IN (3, 4) AND NOT testing
      AND ($1::bigint[] IS NULL OR campaign_id = ANY($1::bigint[]))
) x
GROUP BY campaign_id, action_page_id, action_type, b
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
    #: (first, last): the runs of action ids in ($1, $2] (the newest ones, up to the highest the
    #: snapshot sees) that the calculation does NOT count: not visible to it (running or rolled
    #: back), or not accepted yet. Runs, not the counted ids one by one: a handful of rows
    #: rather than one per recent action (docs/design.md, "Exact by transaction id")
    recent_uncounted_action_runs: str
    #: (campaign_id, action page id, messages): mail-to-target messages of counted actions; run
    #: only when the database has the table (``messages_table``)
    message_counts: str
    #: returns true when the messages table exists
    messages_table: str
    #: (campaign_id, key, area, supporters, level, bucket start, org, fingerprint): level 0 =
    #: campaign, 1 = org, 2 = area, 3 = page, 4 = page area, 5 = campaign bucket, 6 = page
    #: bucket, 7 = a shared person's row (see _STREAMING_SUPPORTER_COUNTS). Partial counts: rows
    #: with the same (level, key) are added up, after shared_people.combine. $1 ids, [$2, $3)
    #: supporter ids, $4/$5 the buckets' cutoffs, $6 ``shared_fingerprints``. For "all" and
    #: "live".
    supporter_counts: str
    #: (campaign_id, key, area, supporters, level, bucket start) for a list of campaign ids,
    #: levels 0 to 6; [$2, $3) fingerprints
    supporter_counts_by_ids: str
    #: (campaign_id, action page id, org_id, extra_supporters)
    extra_supporters: str
    #: (campaign_id, action_type, count); not run by the calculation since the action buckets
    #: (below) carry the same counts, kept for the callers that run it on its own
    action_counts: str
    #: (campaign_id, page, action_type, bucket start, actions, latest action time): $1 ids,
    #: $2/$3 the cutoffs of minutes and hours (see _BUCKET); the action counts are their sums
    action_buckets: str = _ACTION_BUCKETS
    #: how many campaigns there are (to tell how much of them ``live`` covers, where
    #: ``listed_action_share`` has no statistics to go by)
    campaign_count: str = "SELECT count(*) FROM campaigns"
    #: $1, campaign ids: the share of the actions those campaigns hold, estimated from the
    #: planner's statistics of ``actions.campaign_id`` (pg_stats, no scan) as the planner does:
    #: each listed most common value its frequency, every other listed id an equal part of the
    #: rest; NULL without statistics. It only picks how the list is read (READ_ALL_SHARE in
    #: db/calculation.py), never the counts.
    listed_action_share: str = """
    SELECT least(1.0, coalesce((SELECT sum(f) FROM unnest(mcv, freqs) AS m(v, f)
                                WHERE v = ANY($1::bigint[])), 0)
           + (cardinality($1::bigint[])
              - (SELECT count(*) FROM unnest(mcv) AS m(v) WHERE v = ANY($1::bigint[])))
             * greatest(1.0 - null_frac - coalesce((SELECT sum(f) FROM unnest(freqs) f), 0), 0)
             / greatest(distinct_values - coalesce(cardinality(mcv), 0), 1))::float8
    FROM (SELECT most_common_vals::text::bigint[] AS mcv, most_common_freqs AS freqs,
                 null_frac,
                 CASE WHEN n_distinct >= 0 THEN n_distinct
                      ELSE -n_distinct * (SELECT greatest(reltuples, 0) FROM pg_class
                                          WHERE oid = 'actions'::regclass) END
                   AS distinct_values
          FROM pg_stats
          WHERE tablename = 'actions' AND attname = 'campaign_id'
            AND schemaname = (SELECT relnamespace::regnamespace::text FROM pg_class
                              WHERE oid = 'actions'::regclass)
          ORDER BY inherited LIMIT 1) st
    """
    #: (action page id, campaign_id, org_id) of the covered campaigns' pages: $1 ids
    page_orgs: str = """
    SELECT id, campaign_id, org_id FROM action_pages
    WHERE $1::bigint[] IS NULL OR campaign_id = ANY($1::bigint[])
    """
    #: settings (SET LOCAL) for the whole calculation transaction
    settings: tuple[str, ...] = ("jit = off",)
    #: settings (SET LOCAL) just before ``supporter_counts``: the streaming plan needs the merge
    #: join (its rows come ordered by supporter id); Postgres' parallel workers would only compete
    #: with the helper connection for the same cores
    supporter_settings: tuple[str, ...] = (
        "enable_hashjoin = off",
        "max_parallel_workers_per_gather = 0",
    )
    #: with a helper connection, for ``supporter_counts_by_ids`` (a list of campaign ids): the
    #: fingerprint ranges [lo, hi) each connection counts (their union must be every bytea; the
    #: split only balances the work, exactness does not depend on it). None: no split; the main
    #: connection counts the supporters whole and the helper reads the rest (the action buckets).
    #: 0x90: the main connection also reads the action buckets, so it takes 9/16.
    fingerprint_split: bytes | None = b"\x90"
    #: the fingerprints held by two or more accepted, first-ranked supporter rows, as one array:
    #: ``supporter_counts``' $6 (the people it returns as rows to count distinct)
    shared_fingerprints: str = """
    SELECT coalesce(array_agg(fingerprint), '{}') FROM (
        SELECT fingerprint FROM supporters
        WHERE processing_status = 3 AND dupe_rank = 0
        GROUP BY fingerprint HAVING count(*) > 1
    ) x
    """
    #: with a helper connection, for ``supporter_counts``: the share of the counted actions the
    #: main connection counts (the supporters below ``supporter_split_id``'s answer; the helper
    #: counts the rest). None: no split, the main connection counts the supporters whole.
    #: 0.5: the main connection also reads the action buckets, the helper the shared
    #: fingerprints and then starts its half at once (no rounds since), which left the helper
    #: the longer at 0.42 (5M-action demo, 2026-12-02, load average 2-3: 8.9 s of CPU
    #: against 7.6 s, medians of 7). At 0.5, 0.91x the wall time and 0.92x the database CPU
    #: of 0.42 (5 interleaved pairs, each faster; at 1M no difference: 1.00x, 1.03x of 9);
    #: docs/measurements.md, "The calculation's budget against 3fb2bf4"
    supporter_split: float | None = 0.5
    #: $1, a share in [0, 1]: the supporter id below which about that share of the actions lies,
    #: from the planner's statistics (pg_stats, no scan), else the middle of the supporter ids;
    #: the split only balances the work, exactness does not depend on it
    supporter_split_id: str = """
    SELECT coalesce(
        (SELECT h[1 + round((cardinality(h) - 1) * $1::float8)::int]
         FROM (SELECT histogram_bounds::text::bigint[] AS h FROM pg_stats
               WHERE tablename = 'actions' AND attname = 'supporter_id'
                 AND schemaname = (SELECT relnamespace::regnamespace::text FROM pg_class
                                   WHERE oid = 'actions'::regclass)) st
         WHERE cardinality(h) > 1),
        (SELECT (min(id) + max(id)) / 2 FROM supporters))
    """


PROCA_QUERIES = Queries(
    all_campaigns="SELECT id FROM campaigns",
    live_campaigns="SELECT id FROM campaigns WHERE status = 1",
    existing_campaigns="SELECT id FROM campaigns WHERE id = ANY($1::bigint[])",
    snapshot_info=(
        "SELECT pg_current_snapshot()::text, extract(epoch FROM clock_timestamp())::float8"
    ),
    max_action_id="SELECT coalesce(max(id), 0) FROM actions",
    # The gaps between counted ids, in id order (the primary key's index gives the order): each
    # counted id with the one before it (or $1); then the run after the last counted id, if any.
    recent_uncounted_action_runs="""
    SELECT prev + 1, id - 1 FROM (
      SELECT id, lag(id, 1, $1::bigint) OVER (ORDER BY id) AS prev
      FROM actions
      WHERE id > $1 AND id <= $2 AND processing_status IN (3, 4) AND NOT testing
    ) AS counted
    WHERE id > prev + 1
    UNION ALL
    SELECT coalesce(max(id), $1::bigint) + 1, $2::bigint
    FROM actions
    WHERE id > $1 AND id <= $2 AND processing_status IN (3, 4) AND NOT testing
    HAVING coalesce(max(id), $1::bigint) < $2::bigint
    """,
    messages_table="SELECT to_regclass('messages') IS NOT NULL",
    message_counts="""
    SELECT a.campaign_id, a.action_page_id, count(*)
    FROM messages m
    JOIN actions a ON a.id = m.action_id
    WHERE a.processing_status IN (3, 4) AND NOT a.testing
      AND ($1::bigint[] IS NULL OR a.campaign_id = ANY($1::bigint[]))
    GROUP BY a.campaign_id, a.action_page_id
    """,
    supporter_counts=_STREAMING_SUPPORTER_COUNTS,
    supporter_counts_by_ids=_HASHING_SUPPORTER_COUNTS,
    extra_supporters="""
    SELECT campaign_id, id, org_id, extra_supporters::bigint
    FROM action_pages
    WHERE extra_supporters <> 0
      AND ($1::bigint[] IS NULL OR campaign_id = ANY($1::bigint[]))
    """,
    action_counts="""
    SELECT campaign_id, action_type, count(*)
    FROM actions
    WHERE processing_status IN (3, 4) AND NOT testing
      AND ($1::bigint[] IS NULL OR campaign_id = ANY($1::bigint[]))
    GROUP BY campaign_id, action_type
    """,
)
