"""The findings of the adversarial review of the exact merge, one test each.

Each failed before its fix; each docstring says what was wrong and what must happen. Model-level
tests drive :class:`campaignstats.model.StatsState` directly; the others use the embedded
Postgres of ``tests/conftest.py``.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import asyncpg
import pytest

from campaignstats.actor.actor import ActorConfig
from campaignstats.db.embedded import EmbeddedPostgres, create_database, with_database
from campaignstats.db.schema import init_db
from campaignstats.db.source import PostgresSource
from campaignstats.model import (
    CalculationResult,
    CampaignStats,
    Increment,
    StatsState,
    TxSnapshot,
)
from campaignstats.service import StatsService

from .conftest import truncate_all
from .helpers import Start, completed, loaded, memory_of, wait_for
from .recount import recount

CID = 1
ORG = 5


def _result(
    stats: CampaignStats,
    max_action_id: int,
    *,
    window_low: int = 0,
    uncounted: frozenset[int] = frozenset(),
    snapshot: TxSnapshot | None = None,
    taken_at: float | None = None,
) -> CalculationResult:
    return CalculationResult(
        "all",
        {CID: stats},
        max_action_id,
        uncounted_ids=uncounted,
        window_low=window_low,
        snapshot=snapshot,
        taken_at=taken_at,
    )


def _merged(result: CalculationResult, **state_args: int) -> StatsState:
    state = StatsState(**state_args)
    state.start_journal()
    state.merge(result)
    state.stop_journal()
    return state


def _one(n: int) -> CampaignStats:
    return CampaignStats(n, {"sign": n}, {}, {ORG: n} if n else {})


SIGN_7 = Increment(CID, ORG, "sign", None, True, 1, 7)  # action 7, action id only


# -- the action-id path: a rejection, then a re-acceptance, of an action the snapshot counted -----


def test_reaccepting_a_counted_action_after_its_rejection_counts_it_again() -> None:
    """Action 7 is counted by the last merged snapshot (inside the window). It is rejected
    (``dec``, action_id 7: applied, 1 -> 0), then accepted again (moderation undone: ``inc``,
    action_id 7). ``Horizon.reflects`` only asks "did the snapshot count 7?" (yes) and skips the
    re-acceptance as ``already_counted``: the count stays 0 while the database says 1, until the
    next calculation. The action-id path must never lose a counted action (issue 10).

    Expected: memory 1 after the re-acceptance (a decrement of a snapshot-counted id must be
    remembered, as ``late`` is for the other direction, so that the next increment counts)."""
    state = _merged(_result(_one(1), 10))
    state.apply(SIGN_7, decrement=True)
    assert state.stats(CID)["supporters"] == 0
    state.apply(SIGN_7)
    assert state.stats(CID)["supporters"] == 1, "the re-acceptance was skipped as already counted"


def test_a_repeated_rejection_of_a_counted_action_is_taken_back_once() -> None:
    """A decrement of action 7 (counted by the snapshot) announced twice (a bounce handler and a
    moderator both reject it; the backend sends each rejection) takes 2 back: 2 -> 0 while the
    database says 1. A repeated *increment* of an in-window id is skipped ("a repeated
    announcement is skipped", docs/design.md "Exact by action id"), a repeated decrement is not.

    Expected: the second decrement of the same action id is skipped (already_counted), 1."""
    state = _merged(_result(_one(2), 10))
    state.apply(SIGN_7, decrement=True)
    state.apply(SIGN_7, decrement=True)
    assert state.stats(CID)["supporters"] == 1


def test_a_merge_does_not_replay_a_rejection_that_its_snapshot_already_undid() -> None:
    """The journaled variant, wrong right after a merge (not only between two).

    H1 counted action 7. A calculation starts (journal on). Action 7 is rejected (dec journaled)
    and accepted again: the increment is checked against H1 (counted) and skipped, so it is not
    journaled. The new snapshot H2 is taken after both commits: 7 counted, database = 1. The
    merge replays the journaled decrement (H2 counted 7, so "its rejection was not seen") and
    nothing of the re-acceptance: memory 0, database 1, right after the merge.

    Expected: memory equal to the database (1) after the merge."""
    state = _merged(_result(_one(1), 10))
    state.start_journal()  # calculation 2 starts
    state.apply(SIGN_7, decrement=True)  # rejected
    state.apply(SIGN_7)  # accepted again (skipped today)
    state.merge(_result(_one(1), 10))  # H2: both committed before it, 7 counted
    state.stop_journal()
    assert state.stats(CID)["supporters"] == 1


async def test_real_postgres_reject_then_reaccept_with_action_id_only(
    conn: asyncpg.Connection, module_dsn: str
) -> None:
    """The same against Postgres: one accepted action, a calculation merged, then the action
    rejected (dec) and accepted again (inc), each in its own transaction, announced after commit
    with ``action_id`` only. After a flush memory says 0, the database 1.

    Expected: memory == recount right after the flush (as test_exact_for_real checks for
    accept/reject histories)."""
    await truncate_all(conn)
    await conn.execute("INSERT INTO orgs (id, name) VALUES (1, 'org')")
    await conn.execute("INSERT INTO campaigns (id, name, status) VALUES (1, 'c', 1)")
    await conn.execute(
        "INSERT INTO action_pages (id, name, campaign_id, org_id) VALUES (1, 'p', 1, 1)"
    )
    sid = await conn.fetchval(
        "INSERT INTO supporters (campaign_id, action_page_id, fingerprint, area, "
        "processing_status, dupe_rank) VALUES (1, 1, '\\x01', 'DE', 3, 0) RETURNING id"
    )
    aid = await conn.fetchval(
        "INSERT INTO actions (supporter_id, action_type, campaign_id, action_page_id, "
        "processing_status) VALUES ($1, 'register', 1, 1, 3) RETURNING id",
        sid,
    )
    service = StatsService(PostgresSource(module_dsn), ActorConfig(sync_interval=3600))
    await service.start()
    try:
        await wait_for(lambda: loaded(service))
        assert (await service.stats(1))["supporters"] == 1
        await conn.execute("UPDATE actions SET processing_status = 2 WHERE id = $1", aid)
        service.decrement(1, 1, "register", "DE", True, action_id=aid)
        await conn.execute("UPDATE actions SET processing_status = 3 WHERE id = $1", aid)
        service.increment(1, 1, "register", "DE", True, action_id=aid)
        await service.flush()
        assert await memory_of(service, [1]) == await recount(conn, [1])
    finally:
        await service.stop()


# -- the action-id path: a rejected increment leaves its id in the late set -----------------------


def test_an_increment_refused_by_a_limit_is_not_remembered_as_counted() -> None:
    """``_already_counted`` records an in-window, snapshot-uncounted action id in ``late``
    *before* ``apply_many`` checks the per-campaign limits. When the increment is then refused
    (here: over ``max_keys`` action types) memory did not count it, but ``late`` says it did, so
    a later decrement of that action (its rejection) is applied: supporters 1 -> 0 for a person
    memory never added. Without the stale ``late`` entry the decrement is skipped (the snapshot
    did not count 7: "its rejection was seen").

    Expected: a refused increment leaves ``late`` unchanged; supporters stay 1."""
    state = _merged(
        _result(CampaignStats(1, {"sign": 1}, {}, {ORG: 1}), 10, uncounted=frozenset({7})),
        max_keys=1,
    )
    mail_7 = Increment(CID, ORG, "mail", None, True, 1, 7)
    with pytest.raises(Exception, match="over 1 action types"):
        state.apply(mail_7)
    assert 7 not in state.counted_now.get(CID, {}), "a refused increment was recorded as counted"
    state.apply(mail_7, decrement=True)
    assert state.stats(CID)["supporters"] == 1


# -- at: evidence order --------------------------------------------------------------------------


def test_at_settles_a_change_whose_action_id_is_below_the_window() -> None:
    """docs/design.md: "Whether the snapshot holds a change is decided by the strongest evidence
    the change carries, in this order: txid, action id, its time (at)". An action id at or below
    ``window_low`` is no evidence at all ("unknown"), yet ``Horizon.reflects`` returns False for
    it and never looks at ``at``: an increment queued while the server was down (at = 60 s before
    the snapshot) for an old action (id below the window, e.g. a double opt-in confirmed days
    after signing) counts twice until the next calculation, where ``at`` alone would settle it.

    Expected: an id below the window falls through to ``at``; the change is skipped (1)."""
    taken_at = 1_700_000_000.0
    state = _merged(_result(_one(1), 200_000, window_low=100_000, taken_at=taken_at))
    state.apply(Increment(CID, ORG, "sign", None, True, 1, 5, at=taken_at - 60))
    assert state.stats(CID)["supporters"] == 1


# -- txid wins over action_id, and loses its deduplication -----------------------------------------


def test_a_repeated_announcement_with_txid_and_action_id_counts_once() -> None:
    """Action 7 was inserted ``new`` before the snapshot (uncounted, inside the window), accepted
    after it. With ``action_id`` only, a repeated announcement of its acceptance is skipped
    (the ``late`` set). Adding ``txid`` ("the strongest evidence", "txid wins") removes that:
    ``reflects`` returns ``snapshot.sees(txid)`` (False) and ``needs_late_set`` is False when a
    txid is present, so the same change announced twice counts twice (2 -> 3) until the next
    calculation. Giving the server more evidence makes it less exact.

    Expected: the action id still deduplicates when the txid says "not in the snapshot": 2."""
    result = _result(_one(1), 10, uncounted=frozenset({7}), snapshot=TxSnapshot(100, 100))
    only_id = _merged(result)
    only_id.apply(SIGN_7)
    only_id.apply(SIGN_7)
    assert only_id.stats(CID)["supporters"] == 2  # holds today
    both = _merged(result)
    with_txid = SIGN_7._replace(txid=150)
    both.apply(with_txid)
    both.apply(with_txid)
    assert both.stats(CID)["supporters"] == 2


# -- clamping: supporters include extra_supporters ------------------------------------------


def test_a_clamped_decrement_never_takes_supporters_below_the_offline_ones() -> None:
    """``supporters`` and ``org[org]`` include ``extra_supporters`` (CampaignStats docstring,
    docs/protocol.md STATS). A campaign with 10 offline supporters and no online one gets a
    decrement with ``new_supporter`` (one that memory never counted, e.g. announced before its
    increment): ``subtract`` clamps only at zero, so STATS says supporters 9 and org 9 with
    extra_supporters 10, a state no database can produce.

    Expected: supporters and org[org] clamp at the offline counts (10), and the decrement is
    counted in ``clamped``."""
    state = _merged(_result(CampaignStats(10, {}, {}, {ORG: 10}, extra_supporters=10), 10))
    state.apply(Increment(CID, ORG, "sign", None, True), decrement=True)
    stats = state.stats(CID)
    assert stats["supporters"] >= stats["extra_supporters"] == 10


# -- messages: the database without a messages table -----------------------------------------------


@pytest.fixture
async def no_messages_dsn(pg_cluster: EmbeddedPostgres) -> str:
    admin = pg_cluster.dsn()
    await create_database(admin, "t_review_exact_nomsg", drop_existing=True)
    dsn = with_database(admin, "t_review_exact_nomsg")
    c = await asyncpg.connect(dsn)
    try:
        await init_db(c)
        await c.execute("DROP TABLE messages")
        await c.execute("INSERT INTO orgs (id, name) VALUES (1, 'org')")
        await c.execute("INSERT INTO campaigns (id, name, status) VALUES (1, 'c', 1)")
        await c.execute(
            "INSERT INTO action_pages (id, name, campaign_id, org_id) VALUES (1, 'p', 1, 1)"
        )
    finally:
        await c.close()
    return dsn


async def test_messages_do_not_fall_back_to_zero_at_every_calculation_without_the_table(
    no_messages_dsn: str,
) -> None:
    """A database without Proca's ``messages`` table (an older Proca, or a deployment that does
    not have mail-to-target): increments carry ``messages`` (docs/protocol.md), memory counts
    them, and every calculation (every 60 s) sets ``messages`` back to 0, because the result says
    0 for a table it could not read. The counter is a saw-tooth: it moves backwards with no
    ``dec`` (issue 10: "the counts never move backwards except by a dec").

    Expected: with no messages table the calculation has no opinion on ``messages`` and the merge
    keeps memory's (or: increments' messages are not counted at all). Either way, a merge must not
    take back 4 messages no decrement took back."""
    service = StatsService(PostgresSource(no_messages_dsn), ActorConfig(sync_interval=3600))
    await service.start()
    try:
        await wait_for(lambda: loaded(service))
        service.increment(1, 1, "mail", None, False, messages=4)
        await service.flush()
        before = (await service.stats(1))["messages"]
        n = await completed(service)
        await service.resync("all")
        await wait_for(lambda: completed(service))
        await wait_for(lambda: _completed_more(service, n))
        after = (await service.stats(1))["messages"]
        assert after >= before, f"messages went from {before} to {after} with no decrement"
    finally:
        await service.stop()


async def _completed_more(service: StatsService, n: int) -> bool:
    await asyncio.sleep(0)
    return await completed(service) > n


# -- the command line ------------------------------------------------------------------------------


async def test_the_cli_says_when_the_server_refused_a_change(start: Start) -> None:
    """``campaignstats inc`` printed "applied" and exited 0 for an increment the server refused
    (here: over the limit of one action type per campaign); it must say so and exit 1."""
    running = await start(ActorConfig(sync_interval=3600, max_keys=1))
    url = f"tcp://127.0.0.1:{running.port}"

    async def cli(*args: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "campaignstats.cli",
            *args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    code, out, _ = await cli("inc", "--url", url, "9", "2", "sign")
    assert (code, out.strip()) == (0, "applied")
    code, out, err = await cli("inc", "--url", url, "9", "2", "share")
    assert code == 1
    assert "applied" not in out
    assert "refused by the server" in err
    assert (await running.service.stats(9))["action"] == {"sign": 1}
