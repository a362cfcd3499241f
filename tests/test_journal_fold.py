"""The journal folded (campaignstats/journal.py; docs/design.md, "The journal, folded").

Once a calculation's snapshot is taken, the changes it decides are folded into one running net
per campaign instead of kept one by one. The merge must give exactly what it gives when nothing
is folded (the replay of the whole list), whatever the stream: increments and decrements with
and without txid, action id or ``at``, inside and outside the snapshot, on pages and in buckets.
And the journal's size is then bounded by keys, not by changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from campaignstats.actor.actor import ActorConfig
from campaignstats.db.calculation import calculate
from campaignstats.db.source import PostgresSource
from campaignstats.journal import EarlyHorizon
from campaignstats.model import (
    AT_AHEAD,
    CalculationResult,
    CampaignStats,
    Horizon,
    Increment,
    PageStats,
    StatsState,
    TxSnapshot,
)
from campaignstats.service import StatsService
from campaignstats.timeline import Timeline

from .conftest import truncate_all
from .helpers import completed, loaded, memory_of, wait_for
from .recount import recount

NOW = 1_750_000_000.0
SNAPSHOT = TxSnapshot(10, 20, frozenset({12, 15}))
TAKEN_AT = NOW - 100
MAX_ACTION_ID = 50
WINDOW_LOW = 30
UNCOUNTED = frozenset({33, 40})
#: each page has one org; page 10 is campaign 1's in the database, page 13 campaign 2's
PAGE_ORG = {10: 1, 11: 2, 12: 1, 13: 2}


def early() -> EarlyHorizon:
    return EarlyHorizon(Horizon(MAX_ACTION_ID, WINDOW_LOW, frozenset(), SNAPSHOT, TAKEN_AT))


changes = st.builds(
    lambda cid, typ, area, new, count, aid, txid, at, page, messages, dec: (
        Increment(
            cid,
            PAGE_ORG[page] if page is not None else 1 + (count % 2),
            typ,
            area,
            new,
            count,
            aid,
            txid,
            at,
            page,
            messages,
        ),
        dec,
    ),
    st.sampled_from([1, 2]),
    st.sampled_from(["a", "b"]),
    st.sampled_from(["DE", None]),
    st.booleans(),
    st.integers(1, 3),
    # below the window, inside it (uncounted, counted), above the highest
    st.sampled_from([None, None, 10, 33, 35, 40, 45, 60, 61]),
    # seen (below xmin; below xmax, not in progress), unseen (in progress, above xmax)
    st.sampled_from([None, None, 5, 14, 12, 25]),
    # before the snapshot's clock (held), after it, a little ahead of the clock, too far ahead
    st.sampled_from([None, None, NOW - 3600, NOW - 50, NOW - 1, NOW + 30, NOW + 600]),
    st.sampled_from([None, None, 10, 11, 12, 13]),
    st.integers(0, 2),
    st.booleans(),
)


def database(db: list[Increment], *, with_campaign_2: bool) -> CalculationResult:
    """A calculation's result: what applying ``db`` gives, with the pages and buckets."""
    truth = StatsState()
    truth.clock = lambda: TAKEN_AT
    truth.apply_many(db)
    campaigns: dict[int, CampaignStats] = {
        cid: truth.campaigns[cid] for cid in (1, 2) if cid in truth.campaigns
    }
    campaigns.setdefault(1, CampaignStats())
    if with_campaign_2:
        campaigns.setdefault(2, CampaignStats())
    else:
        campaigns.pop(2, None)
    pages = {pid: ps for pid, ps in truth.pages.items() if ps.campaign_id in campaigns}
    pages.setdefault(10, PageStats(1, PAGE_ORG[10]))
    if with_campaign_2:
        pages.setdefault(13, PageStats(2, PAGE_ORG[13]))
    return CalculationResult(
        "all",
        campaigns,
        MAX_ACTION_ID,
        uncounted_ids=UNCOUNTED,
        window_low=WINDOW_LOW,
        snapshot=SNAPSHOT,
        taken_at=TAKEN_AT,
        timelines={cid: truth.timelines[cid] for cid in campaigns if cid in truth.timelines},
        pages=pages,
        page_timelines={p: truth.page_timelines[p] for p in pages if p in truth.page_timelines},
    )


@dataclass
class Run:
    """One state through a calculation: memory, the journal, the merge (in two slices)."""

    fold_at: int | None  # the change at which the snapshot's horizon is told; None: never
    state: StatsState = field(default_factory=StatsState)
    gone: list[int] = field(default_factory=list)
    #: per campaign, the campaign of each page memory held when that campaign was merged
    pages_at_merge: dict[int, dict[int, int]] = field(default_factory=dict)
    #: per campaign, what its merge made of it (before anything else is applied)
    after_merge: dict[int, dict[str, Any]] = field(default_factory=dict)

    def play(
        self,
        before: list[tuple[Increment, bool]],
        during: list[tuple[Increment, bool]],
        between: list[tuple[Increment, bool]],
        result: CalculationResult,
    ) -> None:
        state = self.state
        state.clock = lambda: NOW
        for inc, dec in before:
            state.apply_many([inc], decrement=dec)
        state.start_journal()
        for i, (inc, dec) in enumerate(during):
            if i == self.fold_at:
                state.fold_journal(early())
            state.apply_many([inc], decrement=dec)
        if self.fold_at is not None and self.fold_at >= len(during):
            state.fold_journal(early())
        assert state.journal_fits(result)
        self.pages_at_merge[1] = {pid: ps.campaign_id for pid, ps in state.pages.items()}
        state.merge(result, [1])
        self.after_merge[1] = merged(state, 1)
        for inc, dec in between:  # campaign 2 is merged in a later slice
            state.apply_many([inc], decrement=dec)
        self.pages_at_merge[2] = {pid: ps.campaign_id for pid, ps in state.pages.items()}
        state.merge(result, [c for c in result.campaigns if c != 1])
        if 2 in result.campaigns:
            self.after_merge[2] = merged(state, 2)
        self.gone = state.forget_absent(result)
        state.stop_journal()

    def seen(self) -> dict[str, Any]:
        state = self.state
        return {
            "stats": {cid: state.stats(cid) for cid in (1, 2)},
            "pages": {pid: state.page_stats(pid) for pid in PAGE_ORG},
            "history": {cid: state.history(cid, "minute", NOW - 7200, NOW + 60) for cid in (1, 2)},
            "page_history": {
                pid: state.history(ps.campaign_id, "minute", NOW - 7200, NOW + 60, page=pid)
                for pid, ps in state.pages.items()
            },
            "last_action": {cid: timeline.last_action for cid, timeline in state.timelines.items()},
            "clamped": state.clamped,
            "already_counted": state.already_counted,
            "gone": self.gone,
        }


def filed_at(inc: Increment) -> float:
    """The time of a change's bucket, as apply_many files it (the clock is NOW): its ``at``,
    unless it has none or is more than AT_AHEAD ahead of the clock (docs/design.md, "Time")."""
    if inc.at is None or inc.at > NOW + AT_AHEAD:
        return NOW
    return inc.at


def replayed(
    result: CalculationResult,
    cid: int,
    journaled: list[tuple[Increment, bool]],
    pages_held: dict[int, int],
) -> dict[str, Any]:
    """The reference: the journal replayed change by change with CampaignStats.add and
    subtract and Timeline.add and take, as the merge did before folding, the unseen
    increments first and then the unseen decrements (docs/design.md, "The exact merge")."""
    horizon = result.horizon
    truth = result.campaigns[cid].copy()
    db_timeline = result.timelines.get(cid)
    timeline = Timeline() if db_timeline is None else db_timeline.copy()
    page_truth = {p: ps.copy() for p, ps in result.pages.items() if ps.campaign_id == cid}
    page_timelines = {
        p: result.page_timelines[p].copy() for p in page_truth if p in result.page_timelines
    }
    counted_now: dict[int, bool] = {}
    unseen = []
    for inc, dec in journaled:
        if horizon.reflects(inc, dec, counted_now):
            continue
        unseen.append((inc, dec, filed_at(inc)))
        if inc.action_id is not None and horizon.knows(inc.action_id):
            counted_now[inc.action_id] = not dec
    ordered = [u for u in unseen if not u[1]] + [u for u in unseen if u[1]]
    for change, decrement, t in ordered:
        if decrement:
            truth.subtract(change)
            timeline.take(t, change.new_supporter, change.count, NOW)
        else:
            truth.add(change)
            timeline.add(t, change.new_supporter, change.count)
        page = change.page
        if page is None:
            continue
        pt = page_truth.get(page)
        elsewhere = pt is None and (
            page in result.pages or (page in pages_held and pages_held[page] != cid)
        )
        if elsewhere or (pt is not None and pt.org_id != change.org_id):
            continue
        if decrement:
            if pt is not None:
                pt.stats.subtract(change)
                if page in page_timelines:
                    page_timelines[page].take(t, change.new_supporter, change.count, NOW)
            continue
        if pt is None:
            pt = page_truth[page] = PageStats(cid, change.org_id)
        pt.stats.add(change)
        page_timeline = page_timelines.setdefault(page, Timeline())
        page_timeline.add(t, change.new_supporter, change.count)
    return {
        "stats": truth.to_wire(),
        "pages": {p: ps.to_wire() for p, ps in page_truth.items()},
        "history": timeline.history("minute", NOW - 7200, NOW + 60, NOW),
        "page_history": {
            p: tl.history("minute", NOW - 7200, NOW + 60, NOW)
            for p, tl in page_timelines.items()
            if tl.last_action_at >= 0 or tl.nbytes()
        },
    }


def merged(state: StatsState, cid: int) -> dict[str, Any]:
    """What a merge made of campaign ``cid``, in the reference's terms."""
    pages = sorted(state.pages_of.get(cid, ()))
    return {
        "stats": state.stats(cid),
        "pages": {p: state.page_stats(p) for p in pages},
        "history": state.history(cid, "minute", NOW - 7200, NOW + 60)["buckets"],
        "page_history": {
            p: state.history(cid, "minute", NOW - 7200, NOW + 60, page=p)["buckets"]
            for p in pages
            if p in state.page_timelines
        },
    }


@settings(max_examples=300, deadline=None)
@given(
    db=st.lists(changes.map(lambda c: c[0]), max_size=12),
    before=st.lists(changes, max_size=8),
    during=st.lists(changes, max_size=40),
    between=st.lists(changes, max_size=8),
    fold_at=st.integers(0, 45),
    with_campaign_2=st.booleans(),
)
def test_the_folded_merge_equals_the_replay_of_the_whole_journal(
    db: list[Increment],
    before: list[tuple[Increment, bool]],
    during: list[tuple[Increment, bool]],
    between: list[tuple[Increment, bool]],
    fold_at: int,
    with_campaign_2: bool,
) -> None:
    result = database(db, with_campaign_2=with_campaign_2)
    listed = Run(fold_at=None)
    folded = Run(fold_at=fold_at)
    listed.play(before, during, between, result)
    folded.play(before, during, between, result)
    assert folded.seen() == listed.seen()
    # and both equal the change-by-change replay, increments first
    for cid in result.campaigns:
        journaled = [(inc, dec) for inc, dec in during if inc.campaign_id == cid]
        if cid != 1:
            journaled += [(inc, dec) for inc, dec in between if inc.campaign_id == cid]
        expected = replayed(result, cid, journaled, folded.pages_at_merge[cid])
        assert folded.after_merge[cid] == expected


def test_changes_after_the_snapshot_are_folded_and_the_journal_counts_keys_not_changes() -> None:
    state = StatsState()
    state.clock = lambda: NOW
    state.journal_limit = 40
    state.start_journal()
    state.fold_journal(early())
    for n in range(2_000):  # each a new action, after the snapshot: far more than the limit
        state.apply_many(
            [Increment(1, 1 + n % 2, "register", "DE", True, action_id=100 + n, at=NOW - 5)]
        )
        state.apply_many(
            [Increment(2, 1, "share", None, False, txid=25, page=11, at=NOW - 5)],
            decrement=n % 3 == 0,
        )
    assert not state.journal_overflow
    figures = state.journal_figures()
    assert figures["listed"] == 0
    assert figures["folded_campaigns"] == 2
    # campaign 1: itself, a type, an area, two orgs, a minute; campaign 2: itself, a type, a
    # minute, and its page (the page, a type, a minute)
    assert figures["folded_keys"] == 6 + 3 + 3 == state.journal_size

    unfolded = StatsState()
    unfolded.journal_limit = 40
    unfolded.start_journal()
    unfolded.apply_many([Increment(1, 1, "register", action_id=100 + n) for n in range(41)])
    assert unfolded.journal_overflow  # kept one by one, the same stream overflows


def test_a_change_the_snapshot_holds_is_dropped_and_one_in_the_window_is_kept_in_order() -> None:
    state = StatsState()
    state.clock = lambda: NOW
    state.start_journal()
    state.apply(Increment(1, 1, "a", action_id=60))  # before the horizon is known: listed
    state.fold_journal(early())
    state.apply(Increment(1, 1, "a", txid=5))  # the snapshot sees it: dropped
    state.apply(Increment(1, 1, "a", at=NOW - 3600))  # older than the snapshot: dropped
    state.apply(Increment(1, 1, "a", action_id=35))  # inside the window: listed, in order
    state.apply(Increment(1, 1, "a", action_id=61, txid=25))  # after it: folded
    figures = state.journal_figures()
    assert figures["listed"] == 2
    assert figures["folded_campaigns"] == 1
    result = database([Increment(1, 1, "a", count=4)], with_campaign_2=False)
    state.merge(result)
    # the database's 4 (among them 35 and the two it holds), plus 60 and 61
    assert state.stats(1)["action"] == {"a": 6}


def test_a_decrement_before_the_increment_it_takes_back_nets_to_nothing_folded_or_not() -> None:
    """The corner folding changes (docs/design.md, "The journal, folded"): a rejection
    announced before the acceptance it takes back, both after the snapshot. Replayed one by
    one, the decrement was clamped at zero and the increment then counted: 1, where the
    database says 0. As one net, clamped once at the end, it is 0, folded or not."""
    for fold in (False, True):
        state = StatsState()
        state.clock = lambda: NOW
        state.start_journal()
        if fold:
            state.fold_journal(early())
        state.apply(Increment(1, 1, "a", "DE", True, action_id=70, txid=27), decrement=True)
        state.apply(Increment(1, 1, "a", "DE", True, action_id=70, txid=26))
        assert state.stats(1)["supporters"] == 1  # memory, until the merge
        state.merge(database([], with_campaign_2=False))
        assert state.stats(1)["supporters"] == 0
        assert state.stats(1)["action"] == {}
        assert state.stats(1)["area"] == {}
        assert state.clamped == 1  # the live decrement; the merge's net clamps nothing


def test_a_net_decrement_larger_than_the_database_value_is_clamped_once() -> None:
    state = StatsState()
    state.clock = lambda: NOW
    state.start_journal()
    state.fold_journal(early())
    state.apply(Increment(1, 1, "a", count=5, action_id=70), decrement=True)
    state.apply(Increment(1, 1, "a", count=1, action_id=71))
    state.merge(database([Increment(1, 1, "a", count=2)], with_campaign_2=False))
    assert state.stats(1)["action"] == {}  # 2 + 1 - 5, clamped at zero
    assert state.clamped == 2  # the live decrement, and the merge's net


def test_a_campaign_created_after_the_snapshot_is_not_forgotten_when_its_change_is_folded() -> None:
    state = StatsState()
    state.clock = lambda: NOW
    state.apply(Increment(3, 1, "a"))  # a campaign the database no longer has
    state.start_journal()
    state.fold_journal(early())
    state.apply(Increment(4, 1, "a", txid=25))  # created after the snapshot: folded
    result = database([], with_campaign_2=False)
    state.merge(result)
    assert state.forget_absent(result) == [3]
    assert state.stats(4)["action"] == {"a": 1}


def test_a_result_from_another_snapshot_than_the_one_told_is_not_merged() -> None:
    state = StatsState()
    state.start_journal()
    state.fold_journal(early())
    other = database([], with_campaign_2=False)
    other.max_action_id = MAX_ACTION_ID + 1
    assert not state.journal_fits(other)
    with pytest.raises(ValueError, match="another snapshot"):
        state.merge(other)


# -- with a real Postgres -----------------------------------------------------------------------


async def _setup(conn: asyncpg.Connection) -> None:
    await truncate_all(conn)
    await conn.execute("INSERT INTO orgs (id, name) VALUES (1, 'org')")
    await conn.execute("INSERT INTO campaigns (id, name, status) VALUES (1, 'c', 1)")
    await conn.execute(
        "INSERT INTO action_pages (id, name, campaign_id, org_id) VALUES (1, 'p', 1, 1)"
    )


async def _sign(conn: asyncpg.Connection, person: int, area: str) -> tuple[int, int]:
    """An accepted signature in its own transaction: its action id and txid."""
    async with conn.transaction():
        sid = await conn.fetchval(
            "INSERT INTO supporters (campaign_id, action_page_id, fingerprint, area, "
            "processing_status, dupe_rank) VALUES (1, 1, $1, $2, 3, 0) RETURNING id",
            person.to_bytes(8, "big"),
            area,
        )
        aid = await conn.fetchval(
            "INSERT INTO actions (supporter_id, action_type, campaign_id, action_page_id, "
            "processing_status) VALUES ($1, 'register', 1, 1, 3) RETURNING id",
            sid,
        )
        txid = await conn.fetchval("SELECT pg_current_xact_id()::text::bigint")
    return aid, txid


async def test_the_calculation_tells_its_horizon_before_its_result_and_the_result_fits(
    conn: asyncpg.Connection,
) -> None:
    await _setup(conn)
    await _sign(conn, 1, "DE")
    told: list[EarlyHorizon] = []
    result = await calculate(conn, "all", on_horizon=told.append)
    assert len(told) == 1
    assert told[0].fits(result.horizon)
    assert told[0].horizon.snapshot == result.snapshot
    assert told[0].horizon.max_action_id == result.max_action_id


@dataclass
class Gated:
    """A PostgresSource whose result waits for ``release`` once its snapshot is taken."""

    inner: PostgresSource
    told: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    reports_horizon = True

    async def calculate(self, scope: Any, *, on_horizon: Any = None) -> CalculationResult:
        def tell(horizon: EarlyHorizon) -> None:
            if on_horizon is not None:
                on_horizon(horizon)
            self.told.set()

        result = await self.inner.calculate(scope, on_horizon=tell)
        await self.release.wait()
        return result


@pytest.fixture
async def gated(module_dsn: str) -> AsyncIterator[tuple[Gated, StatsService]]:
    source = Gated(PostgresSource(module_dsn))
    source.release.set()
    service = StatsService(source, ActorConfig(sync_interval=3600))
    yield source, service
    source.release.set()
    await service.stop()


async def test_changes_committed_after_a_real_snapshot_are_folded_and_the_merge_is_exact(
    conn: asyncpg.Connection, gated: tuple[Gated, StatsService]
) -> None:
    source, service = gated
    await _setup(conn)
    early_signs = [await _sign(conn, n, "DE") for n in range(1, 4)]
    await service.start()
    await wait_for(lambda: loaded(service))
    for aid, txid in early_signs[:2]:
        service.increment(1, 1, "register", "DE", True, action_id=aid, txid=txid)
    before = await completed(service)
    source.release.clear()
    source.told.clear()
    assert await service.resync("all")
    await asyncio.wait_for(source.told.wait(), 20)
    # The snapshot is taken: the third early signature is announced late (the snapshot holds
    # it), five more are committed after it, one of them with its txid only.
    aid, txid = early_signs[2]
    service.increment(1, 1, "register", "DE", True, action_id=aid, txid=txid)
    for n in range(4, 9):
        aid, txid = await _sign(conn, n, "FR")
        service.increment(
            1, 1, "register", "FR", True, action_id=None if n == 8 else aid, txid=txid
        )
    await service.flush()
    source.release.set()

    async def merged() -> bool:
        return await completed(service) > before

    await wait_for(merged)
    journal = (await service.info())["last_calculation"]["journal"]
    assert journal["folded_campaigns"] == 1
    assert journal["listed"] == 0  # all decided by the early horizon
    assert await memory_of(service, [1]) == await recount(conn, [1])
    assert (await service.stats(1))["supporters"] == 8
