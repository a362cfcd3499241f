"""The supporter counts split by supporter id over two connections (docs/design.md, "The
calculation's split"): a person whose fingerprint is on supporter rows on both sides of the split
is counted once, in campaigns, orgs, areas, pages and buckets, as the reference says.

The split is pinned (supporter id 500) so that the delicate person surely straddles it; the
reference is the brute-force recount (tests/recount.py) and the page reference SQL of
tests/test_pages.py.
"""

from __future__ import annotations

import time
from dataclasses import replace

import asyncpg

from campaignstats.db.calculation import calculate
from campaignstats.db.queries import PROCA_QUERIES
from campaignstats.db.shared_people import combine

from .conftest import truncate_all
from .recount import recount, recount_timelines
from .test_pages import StateReader, check_against_reference, state_of
from .test_time_calculation import views

SPLIT = 500
SPLIT_AT_500 = replace(
    PROCA_QUERIES, supporter_split_id=f"SELECT ({SPLIT} + 0 * $1::float8)::bigint"
)
F = b"F" * 8  # the person on both sides of the split
G = b"G" * 8  # a person with two rows, both above it
# page -> (campaign, org)
PAGES = {1: (1, 1), 2: (1, 2), 3: (2, 1), 4: (2, 3), 5: (1, 1)}
# supporter id -> (fingerprint, area, processing_status, dupe_rank)
SUPPORTERS = {
    10: (F, "DE", 3, 0),
    20: (F, "FR", 3, 0),
    30: (F, "IT", 3, 1),  # not first-ranked: not counted, yet it makes F shared
    600: (F, None, 3, 0),
    700: (F, "DE", 3, 0),
    800: (G, "FR", 3, 0),
    900: (G, "FR", 3, 0),
    40: (b"a" * 8, "DE", 3, 0),
    50: (b"b" * 8, None, 3, 0),
    650: (b"c" * 8, "FR", 3, 0),
    660: (b"d" * 8, "DE", 0, 0),  # not accepted
}
# (supporter, page, seconds ago, processing_status): F's first action is on the high side in
# campaign 1 (months ago) and on the low side in campaign 2 (minutes ago vs. days ago), and on
# pages 1 and 3 both sides act, at times in other buckets
ACTIONS = [
    (10, 1, 2 * 86400, 3),
    (10, 3, 120, 4),
    (20, 2, 3600 * 5, 3),
    (20, 3, 86400 * 40, 3),
    (30, 5, 86400 * 300, 3),
    (600, 1, 86400 * 200, 3),
    (600, 4, 60, 3),
    (700, 3, 86400 * 3, 4),
    (700, 2, 30, 2),  # rejected: not counted
    (700, 5, 86400 * 10, 3),
    (800, 1, 600, 3),
    (900, 1, 86400 * 120, 3),
    (900, 4, 86400, 3),
    (40, 1, 10, 3),
    (50, 3, 86400 * 100, 3),
    (650, 2, 7200, 3),
    (660, 1, 5, 3),
]


async def load_straddling_person(conn: asyncpg.Connection) -> None:
    await truncate_all(conn)
    await conn.executemany(
        "INSERT INTO orgs (id, name) VALUES ($1, $2)", [(i, f"org{i}") for i in (1, 2, 3)]
    )
    await conn.executemany(
        "INSERT INTO campaigns (id, name, status) VALUES ($1, $2, 1)", [(1, "c1"), (2, "c2")]
    )
    await conn.executemany(
        "INSERT INTO action_pages (id, name, campaign_id, org_id) VALUES ($1, $2, $3, $4)",
        [(p, f"p{p}", c, o) for p, (c, o) in PAGES.items()],
    )
    await conn.executemany(
        "INSERT INTO supporters (id, campaign_id, action_page_id, fingerprint, area, "
        "processing_status, dupe_rank) VALUES ($1, 1, 1, $2, $3, $4, $5)",
        [(sid, *row) for sid, row in SUPPORTERS.items()],
    )
    await conn.executemany(
        "INSERT INTO actions (id, supporter_id, action_type, campaign_id, action_page_id, "
        "processing_status, inserted_at) VALUES ($1, $2, 'register', $3, $4, $5, "
        "(now() AT TIME ZONE 'UTC') - make_interval(secs => $6))",
        [
            (i + 1, sid, PAGES[page][0], page, status, ago)
            for i, (sid, page, ago, status) in enumerate(ACTIONS)
        ],
    )


async def test_a_person_with_rows_on_both_sides_of_the_split_is_counted_once_everywhere(
    conn: asyncpg.Connection, module_dsn: str
) -> None:
    await load_straddling_person(conn)
    # The case is the delicate one: F has counted rows on both sides, in both campaigns.
    sides = await conn.fetch(
        "SELECT a.campaign_id, bool_or(s.id < $1) AS low, bool_or(s.id >= $1) AS high "
        "FROM actions a JOIN supporters s ON s.id = a.supporter_id "
        "WHERE s.fingerprint = $2 AND s.dupe_rank = 0 AND a.processing_status IN (3, 4) "
        "GROUP BY 1 ORDER BY 1",
        SPLIT,
        F,
    )
    assert [tuple(r) for r in sides] == [(1, True, True), (2, True, True)]
    helper = await asyncpg.connect(module_dsn)
    try:
        split = await calculate(conn, "all", helper_conn=helper, queries=SPLIT_AT_500)
    finally:
        await helper.close()
    whole = await calculate(conn, "all")
    now = time.time()
    expected = await recount(conn)
    assert split.campaigns == expected
    assert whole.campaigns == expected
    # Org 1 of campaign 1 (pages 1 and 5): F once (rows 10, 600 and 700, both sides), G, 40.
    assert split.campaigns[1].org[1] == 3
    timelines = await recount_timelines(conn)
    assert views(split.timelines, now) == views(timelines, now)
    assert views(whole.timelines, now) == views(timelines, now)
    await check_against_reference(conn, StateReader(state_of(split)))
    await check_against_reference(conn, StateReader(state_of(whole)))


def test_shared_peoples_rows_are_counted_distinct_and_in_their_earliest_bucket() -> None:
    f, g = b"f", b"g"
    rows = [
        (1, None, None, 3, 0, None),  # a partial count passes unchanged
        # (campaign, page, area, 1, 7, bucket, org, fingerprint), from two parts
        (1, 10, "DE", 1, 7, 300, 100, f),
        (1, 11, "FR", 1, 7, 200, 100, f),
        (1, 10, None, 1, 7, 100, 100, f),
        (1, 12, "DE", 1, 7, 400, 101, g),
        (2, 20, "DE", 1, 7, 500, 100, f),
    ]
    out = sorted(combine(rows), key=repr)
    assert out == sorted(
        [
            (1, None, None, 3, 0, None),
            (1, None, None, 2, 0, None),  # f and g
            (2, None, None, 1, 0, None),
            (1, 100, None, 1, 1, None),
            (1, 101, None, 1, 1, None),
            (2, 100, None, 1, 1, None),
            (1, None, "DE", 2, 2, None),
            (1, None, "FR", 1, 2, None),
            (2, None, "DE", 1, 2, None),
            (1, 10, None, 1, 3, None),
            (1, 11, None, 1, 3, None),
            (1, 12, None, 1, 3, None),
            (2, 20, None, 1, 3, None),
            (1, 10, "DE", 1, 4, None),
            (1, 11, "FR", 1, 4, None),
            (1, 12, "DE", 1, 4, None),
            (2, 20, "DE", 1, 4, None),
            (1, None, None, 1, 5, 100),  # f's earliest in campaign 1
            (1, None, None, 1, 5, 400),  # g's
            (2, None, None, 1, 5, 500),
            (1, 10, None, 1, 6, 100),
            (1, 11, None, 1, 6, 200),
            (1, 12, None, 1, 6, 400),
            (2, 20, None, 1, 6, 500),
        ],
        key=repr,
    )
