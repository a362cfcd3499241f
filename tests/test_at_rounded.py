"""An ``at`` a little ahead of the server's clock keeps its own minute (docs/design.md, "Time").

Proca's ``inserted_at`` is ``timestamp(0)``: Postgres rounds ``now()`` to the nearest second, so
an action made in the last half second of a minute is stored (and announced, with ``at``) in the
next minute, while the server's clock is still in the earlier one. The server used to file such
an ``at`` at its arrival ("never ahead of the server's clock"): one minute before the database's
bucket, in memory and in the merge's replay, and a decrement of it took from the wrong minute.
``tests/test_merge_steps.py`` failed on it about once in 20 runs, when its signups crossed a
minute.

Deterministic here: the action's time is placed 0.4 s before a minute (what ``now()`` would have
been) and the server's clock is fixed 0.3 s before it; memory must equal the reference SQL
(tests/test_pages.py) and the calculation over the same rows.
"""

from __future__ import annotations

import time

import asyncpg

from campaignstats.db.calculation import calculate
from campaignstats.model import AT_AHEAD, Increment, StatsState

from .conftest import truncate_all
from .test_pages import expected_history, state_of


async def _one_page(conn: asyncpg.Connection) -> tuple[int, int, int]:
    """A campaign with one page of one org: (campaign, page, org)."""
    await truncate_all(conn)
    org = await conn.fetchval("INSERT INTO orgs (name) VALUES ('org') RETURNING id")
    cid = await conn.fetchval(
        "INSERT INTO campaigns (name, org_id) VALUES ('campaign', $1) RETURNING id", org
    )
    page = await conn.fetchval(
        "INSERT INTO action_pages (name, campaign_id, org_id) VALUES ('page', $1, $2) RETURNING id",
        cid,
        org,
    )
    return cid, page, org


async def _sign(
    conn: asyncpg.Connection, cid: int, page: int, when: float
) -> tuple[int, int, float]:
    """A new person's supporter and accepted action, as Proca's backend makes them, with
    ``inserted_at`` the value ``now()`` has at ``when``: (action id, txid, stored epoch)."""
    async with conn.transaction():
        sid = await conn.fetchval(
            "INSERT INTO supporters (campaign_id, action_page_id, fingerprint, processing_status, "
            "dupe_rank) VALUES ($1, $2, '\\x01', 3, 0) RETURNING id",
            cid,
            page,
        )
        aid, at = await conn.fetchrow(
            "INSERT INTO actions (supporter_id, action_type, campaign_id, action_page_id, "
            "processing_status, inserted_at) "
            "VALUES ($1, 'register', $2, $3, 3, to_timestamp($4) AT TIME ZONE 'UTC') "
            "RETURNING id, extract(epoch FROM inserted_at)::float8",
            sid,
            cid,
            page,
            when,
        )
        txid = await conn.fetchval("SELECT pg_current_xact_id()::text::bigint")
    return aid, txid, at


def _minute_ago(minutes: int) -> int:
    """The start of a minute a few minutes back: well inside what every server answers."""
    return (int(time.time()) // 60 - minutes) * 60


async def _database_minutes(conn: asyncpg.Connection, cid: int, page: int) -> dict[str, object]:
    """The database's minute buckets of the campaign and of its page: the reference SQL for the
    page, the calculation (the same snapshot's rows) for both."""
    calculated = state_of(await calculate(conn, "all"))
    reference = (await expected_history(conn, "minute")).get(page, [])
    page_buckets = calculated.history(cid, "minute", None, None, page)["buckets"]
    assert page_buckets == reference
    return {"campaign": calculated.history(cid, "minute", None, None)["buckets"], "page": reference}


def _memory_minutes(state: StatsState, cid: int, page: int) -> dict[str, object]:
    return {
        "campaign": state.history(cid, "minute", None, None)["buckets"],
        "page": state.history(cid, "minute", None, None, page)["buckets"],
    }


async def test_an_action_that_postgres_rounded_into_the_next_minute_is_counted_in_that_minute(
    conn: asyncpg.Connection,
) -> None:
    cid, page, org = await _one_page(conn)
    minute = _minute_ago(5)
    aid, txid, at = await _sign(conn, cid, page, minute - 0.4)
    assert at == minute  # timestamp(0): rounded up, into the next minute
    state = StatsState()
    state.clock = lambda: minute - 0.3  # the increment arrives before that minute begins
    state.apply(
        Increment(cid, org, "register", None, True, action_id=aid, txid=txid, at=at, page=page)
    )
    memory = _memory_minutes(state, cid, page)
    assert memory == {"campaign": [[minute, 1, 1]], "page": [[minute, 1, 1]]}
    assert memory == await _database_minutes(conn, cid, page)


async def test_the_merge_replays_such_an_action_in_its_minute_and_its_rejection_takes_it_back(
    conn: asyncpg.Connection,
) -> None:
    cid, page, org = await _one_page(conn)
    minute = _minute_ago(5)
    state = StatsState()
    state.clock = lambda: minute - 0.3
    state.start_journal()
    result = await calculate(conn, "all")  # its snapshot is taken before the action
    aid, txid, at = await _sign(conn, cid, page, minute - 0.4)
    change = Increment(cid, org, "register", None, True, action_id=aid, txid=txid, at=at, page=page)
    state.apply(change)
    state.merge(result)  # replays the journaled increment: not in the snapshot
    state.stop_journal()
    memory = _memory_minutes(state, cid, page)
    assert memory == {"campaign": [[minute, 1, 1]], "page": [[minute, 1, 1]]}
    assert memory == await _database_minutes(conn, cid, page)
    # The action is rejected, in the same minute: its decrement carries the action's time.
    async with conn.transaction():
        await conn.execute("UPDATE actions SET processing_status = 2 WHERE id = $1", aid)
        reject = await conn.fetchval("SELECT pg_current_xact_id()::text::bigint")
    state.apply(change._replace(txid=reject), decrement=True)
    memory = _memory_minutes(state, cid, page)
    assert memory == {"campaign": [], "page": []}
    assert memory == await _database_minutes(conn, cid, page)
    assert state.clamped == 0


def test_an_at_more_than_a_minute_ahead_of_the_server_clock_is_filed_at_its_arrival() -> None:
    now = 1_750_000_020.5
    state = StatsState()
    state.clock = lambda: now
    change = Increment(7, 1, "register", None, True, page=70)
    state.apply(change._replace(at=now - 3600))  # an hour ago: kept in its minute
    state.apply(change._replace(at=now + AT_AHEAD))  # as far ahead as is kept: its own minute
    # A year ahead (a wrong clock) would push every kept minute out: filed at its arrival.
    state.apply(change._replace(at=now + 365 * 86400))
    minute = int(now) // 60 * 60
    ahead = int(now + AT_AHEAD) // 60 * 60
    expected = [[minute - 3600, 1, 1], [minute, 1, 1], [ahead, 1, 1]]
    assert state.history(7, "minute", None, None)["buckets"] == expected
    assert state.history(7, "minute", None, None, 70)["buckets"] == expected
    # A decrement with the same times takes from the same buckets.
    state.apply(change._replace(at=now + 365 * 86400), decrement=True)
    state.apply(change._replace(at=now + AT_AHEAD), decrement=True)
    assert state.history(7, "minute", None, None)["buckets"] == [[minute - 3600, 1, 1]]
    assert state.history(7, "minute", None, None, 70)["buckets"] == [[minute - 3600, 1, 1]]
    assert state.clamped == 0
