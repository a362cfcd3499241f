"""The follower's SQL, in one place (the calculation's is campaignstats.db.queries).

A deployment whose tables are named differently replaces :data:`FOLLOWER_QUERIES` with
``dataclasses.replace(...)``, as it does for the calculation.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FollowerQueries:
    #: the first statement of a round's snapshot: (pg_current_snapshot() as text, the WAL insert
    #: position, the WAL flush position, the slot's lag in bytes, the WAL the slot retains in
    #: bytes); $1 the slot. Both positions are read before the round's peek.
    round_start: str
    #: the changes of the slot up to an LSN, at most N (rounded up to whole transactions):
    #: $1 slot, $2 upto_lsn, $3 upto_nchanges, $4 publication
    peek: str
    advance: str  # $1 slot, $2 LSN
    #: writes a running-transactions record, from which the slot's restart point can move on
    #: (Postgres writes one every 15 s by itself)
    log_snapshot: str
    #: in one statement, the people of a round: every supporter row with the fingerprint of a
    #: supporter named by id ($1) or a fingerprint given ($2), as (0, id, fingerprint, area,
    #: processing_status, dupe_rank, NULL...), and those supporters' counted actions, as
    #: (1, id, NULL, NULL, processing_status, NULL, supporter_id, action_type, campaign_id,
    #: action_page_id, testing). ``= ANY(ARRAY(...))``: index scans of
    #: supporters_fingerprint_index and actions_partial_processing_status_index
    #: (``IN (subquery)`` gets a hash join over the whole table)
    people: str
    #: (id, org_id) of these action pages ($1)
    page_orgs: str
    #: these actions ($1), whatever their status: (id, supporter_id, action_type, campaign_id,
    #: action_page_id, processing_status, testing, messages) (messages_action_id_index)
    mailed_actions: str
    #: settings of the follower's connections. Its queries are lookups by arrays of keys, for
    #: which an index scan is always right; statistics of a table that grew fast (or a generic
    #: plan made while it was small) would otherwise pick a scan of the whole table every round.
    settings: tuple[tuple[str, str], ...] = (
        ("enable_seqscan", "off"),
        ("enable_hashjoin", "off"),
        ("plan_cache_mode", "force_custom_plan"),
        ("jit", "off"),
        # A database's or role's own settings must not stop the follower: a peek decodes a big
        # transaction whole (no statement_timeout can be right for it), and pgoutput writes
        # bytea in the session's format, which changes.typed_row reads as hex.
        ("statement_timeout", "0"),
        ("bytea_output", "hex"),
    )


FOLLOWER_QUERIES = FollowerQueries(
    round_start="""
    SELECT pg_current_snapshot()::text, pg_current_wal_insert_lsn(), pg_current_wal_flush_lsn(),
           (SELECT pg_current_wal_lsn() - confirmed_flush_lsn
            FROM pg_replication_slots WHERE slot_name = $1)::bigint,
           (SELECT pg_current_wal_lsn() - restart_lsn
            FROM pg_replication_slots WHERE slot_name = $1)::bigint
    """,
    peek="""
    SELECT data FROM pg_logical_slot_peek_binary_changes(
        $1, $2::pg_lsn, $3, 'proto_version', '1', 'publication_names', $4)
    """,
    advance="SELECT end_lsn FROM pg_replication_slot_advance($1, $2::pg_lsn)",
    log_snapshot="SELECT pg_log_standby_snapshot()",
    people="""
    WITH s AS MATERIALIZED (
        SELECT s.id, s.fingerprint, s.area, s.processing_status, s.dupe_rank
        FROM supporters s
        WHERE s.fingerprint = ANY(ARRAY(
            SELECT fingerprint FROM supporters WHERE id = ANY($1::bigint[])
            UNION SELECT unnest($2::bytea[]))))
    SELECT 0, id, fingerprint, area, processing_status, dupe_rank,
           NULL::bigint, NULL::text, NULL::bigint, NULL::bigint, NULL::boolean
    FROM s
    UNION ALL
    SELECT 1, a.id, NULL, NULL, a.processing_status, NULL,
           a.supporter_id, a.action_type, a.campaign_id, a.action_page_id, a.testing
    FROM actions a
    WHERE a.supporter_id = ANY(ARRAY(SELECT id FROM s)) AND a.processing_status IN (3, 4)
    """,
    page_orgs="SELECT id, org_id FROM action_pages WHERE id = ANY($1::bigint[])",
    mailed_actions="""
    SELECT a.id, a.supporter_id, a.action_type, a.campaign_id, a.action_page_id,
           a.processing_status, a.testing,
           (SELECT count(*) FROM messages m WHERE m.action_id = a.id)
    FROM actions a WHERE a.id = ANY($1::bigint[])
    """,
)
