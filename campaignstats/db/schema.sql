-- A Proca-compatible schema, reduced to the columns campaignstats reads.
-- Column names, types and integer status codes follow Proca's migrations, so that the
-- calculation runs unchanged against a real Proca database. Every statement is idempotent:
-- init-db creates what is missing and never drops or alters anything that exists.
--
-- Status codes:
--   campaigns.status:              0 draft, 1 live, 2 closed, 3 ignored
--   supporters.processing_status:  0 new, 1 confirming, 2 rejected, 3 accepted
--   actions.processing_status:     0 new, 1 confirming, 2 rejected, 3 accepted, 4 delivered, 5 repeat

CREATE TABLE IF NOT EXISTS orgs (
    id          bigserial PRIMARY KEY,
    name        varchar(255) NOT NULL,
    inserted_at timestamp(0) NOT NULL DEFAULT now(),
    updated_at  timestamp(0) NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS campaigns (
    id          bigserial PRIMARY KEY,
    name        varchar(255) NOT NULL,
    org_id      bigint REFERENCES orgs (id) ON DELETE SET NULL,
    status      integer NOT NULL DEFAULT 1,
    inserted_at timestamp(0) NOT NULL DEFAULT now(),
    updated_at  timestamp(0) NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS action_pages (
    id               bigserial PRIMARY KEY,
    name             varchar(255) NOT NULL,
    campaign_id      bigint NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    org_id           bigint NOT NULL REFERENCES orgs (id) ON DELETE CASCADE,
    extra_supporters integer NOT NULL DEFAULT 0,
    inserted_at      timestamp(0) NOT NULL DEFAULT now(),
    updated_at       timestamp(0) NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS supporters (
    id                bigserial PRIMARY KEY,
    campaign_id       bigint NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    action_page_id    bigint NOT NULL REFERENCES action_pages (id) ON DELETE CASCADE,
    fingerprint       bytea NOT NULL,
    area              varchar(32),
    processing_status integer NOT NULL DEFAULT 0,
    dupe_rank         integer,
    inserted_at       timestamp(0) NOT NULL DEFAULT now(),
    updated_at        timestamp(0) NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS actions (
    id                bigserial PRIMARY KEY,
    supporter_id      bigint REFERENCES supporters (id) ON DELETE CASCADE,
    action_type       varchar(255) NOT NULL,
    campaign_id       bigint NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    action_page_id    bigint NOT NULL REFERENCES action_pages (id) ON DELETE CASCADE,
    processing_status integer NOT NULL DEFAULT 0,
    testing           boolean NOT NULL DEFAULT false,
    inserted_at       timestamp(0) NOT NULL DEFAULT now(),
    updated_at        timestamp(0) NOT NULL DEFAULT now()
);

-- The indexes Proca's migrations create on these tables.
-- (Unique indexes on names are left out: campaignstats never reads names.) Proca's foreign keys
-- have no index of their own unless listed here: the calculation must be fast with these alone.
CREATE INDEX IF NOT EXISTS action_pages_campaign_id_index ON action_pages (campaign_id);

CREATE INDEX IF NOT EXISTS supporters_campaign_id_index ON supporters (campaign_id);
CREATE INDEX IF NOT EXISTS supporters_fingerprint_index ON supporters (fingerprint);
CREATE INDEX IF NOT EXISTS supporters_dupe_rank_index ON supporters (dupe_rank);
CREATE INDEX IF NOT EXISTS supporters_action_page_id_index ON supporters (action_page_id);

CREATE INDEX IF NOT EXISTS actions_action_type_index ON actions (action_type);
CREATE INDEX IF NOT EXISTS actions_campaign_id_index ON actions (campaign_id);
CREATE INDEX IF NOT EXISTS actions_action_page_id_index ON actions (action_page_id);
CREATE INDEX IF NOT EXISTS actions_partial_processing_status_index
    ON actions (supporter_id, action_page_id, campaign_id) WHERE processing_status IN (3, 4);
CREATE INDEX IF NOT EXISTS actions_partial_status_inserted_at_index
    ON actions (processing_status, inserted_at) WHERE testing;
CREATE INDEX IF NOT EXISTS partial_inserted_at_id_index
    ON actions (id, inserted_at) WHERE processing_status IN (0, 3);

-- campaignstats' own index, not Proca's: the counted actions with their time, so that the
-- calculation's supporter pass (db/queries.py) reads each counted action's page, campaign and
-- time from the index alone (Proca's index above lacks inserted_at: every action row would be
-- read from the table). On a Proca database, create it CONCURRENTLY (docs/design.md, "The
-- calculation's index"); without it the calculation is exact, only slower.
CREATE INDEX IF NOT EXISTS campaignstats_counted_actions_index
    ON actions (supporter_id, action_page_id, campaign_id) INCLUDE (inserted_at)
    WHERE processing_status IN (3, 4);

-- Proca's mail-to-target messages (one row per message an action sent to a target), reduced to
-- the column campaignstats reads: STATS "messages" counts the messages of counted actions.
CREATE TABLE IF NOT EXISTS messages (
    id          bigserial PRIMARY KEY,
    action_id   bigint NOT NULL REFERENCES actions (id) ON DELETE CASCADE,
    inserted_at timestamp(0) NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS messages_action_id_index ON messages (action_id);
