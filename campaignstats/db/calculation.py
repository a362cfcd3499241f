"""The full calculation: every count recomputed from Postgres in one read-only snapshot.

All statements of one calculation run in one ``READ ONLY, REPEATABLE READ`` transaction, so the
counts and the highest action id describe the same instant; each statement is bounded by
``statement_timeout``. The SQL itself lives in :mod:`campaignstats.db.queries`.

Memory is bounded by the result (rows per campaign x org / area / action type), never by the size
of the tables: all aggregation happens in Postgres.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar, cast

import structlog

from campaignstats.errors import CalculationError
from campaignstats.journal import EarlyHorizon
from campaignstats.model import (
    CalculationResult,
    CampaignStats,
    Horizon,
    PageStats,
    Scope,
    TxSnapshot,
    scope_name,
)
from campaignstats.timeline import DAY, HOUR, MINUTE, MINUTES_KEPT, Timeline

from . import shared_people
from .queries import PROCA_QUERIES, Queries

if TYPE_CHECKING:
    import asyncpg

log = structlog.get_logger(__name__)
A = TypeVar("A")
B = TypeVar("B")

DEFAULT_STATEMENT_TIMEOUT = 60.0  # seconds, per statement
#: how far below the highest action id the calculation knows, id by id, which actions it counted
#: (docs/design.md, "Exact by action id"): a late change carrying only an action id in that
#: window is settled exactly; below it, it is applied and the next calculation confirms it
ACTION_WINDOW = 100_000
#: rows read at a time from a big result (see _stream)
CHUNK_ROWS = 5_000
#: rows of a chunk folded between two turns of the event loop (a few ms of Python at most: the
#: calculation runs in the actor's loop, which must never stall 20 ms)
FOLD_PART = 500
#: seconds of Python between two turns of the event loop in the calculation's other loops
STEP_BUDGET = 0.004
#: a list of campaigns (``live``, or a shard's) holding at least this share of the actions
#: (``Queries.listed_action_share``, from the planner's statistics; without them, this share
#: of all the campaigns) is not given to the action buckets and supporter counts: they read
#: every campaign (the plan of ``all``) and the rows of the others are dropped as they are
#: folded. Given a long list, the planner costs ``campaign_id = ANY($1)`` as a comparison per
#: element and row, prefers reading actions_campaign_id_index (each row then fetched from the
#: table, in campaign order), and took 2-3 times as long as reading everything at the
#: 5M-action demo (docs/design.md, "A long list of campaigns"). A list holding a small share
#: of the actions still gains from that index, however many campaigns it names: many small
#: live campaigns beside a big closed one read whole took 2.5-4 times as long as read by
#: their list (tests/test_review_calc_read_all.py).
READ_ALL_SHARE = 0.5


async def calculate(
    conn: asyncpg.Connection,
    scope: Scope = "all",
    *,
    queries: Queries = PROCA_QUERIES,
    statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT,
    work_mem: str = "256MB",
    helper_conn: asyncpg.Connection | None = None,
    owns: Callable[[int], bool] | None = None,
    on_horizon: Callable[[EarlyHorizon], None] | None = None,
    chunk_rows: int = CHUNK_ROWS,
    read_all_share: float = READ_ALL_SHARE,
) -> CalculationResult:
    """Recompute the covered campaigns' counts; raises :class:`CalculationError` on any failure.

    ``scope`` is ``"all"``, ``"live"`` (campaigns with status live) or a list of campaign ids (of
    which those that exist in ``campaigns`` are covered).

    With ``helper_conn`` (a second, idle connection to the same database), the supporter counts are
    split by supporter id range (by fingerprint range for a list of ids) over both connections,
    which run at the same time in the same snapshot: ``conn`` exports it
    (``pg_export_snapshot()``) and the helper's transaction adopts it (``SET TRANSACTION
    SNAPSHOT``), both ``REPEATABLE READ READ ONLY``.

    ``owns`` (a shard's, docs/scale.md) keeps the covered campaigns it owns: the rest of the
    statements get them as their list of ids, whatever the scope.

    ``on_horizon`` is told what the snapshot holds as soon as that is known (its transactions,
    its clock, its highest action id: all but the window's ids), so that the actor can fold
    its journal from then on (campaignstats.journal).

    The big results (the action buckets, the supporter counts) are read ``chunk_rows`` rows at a
    time and folded as they arrive: memory holds the counts, never the rows.

    ``read_all_share``: when ``live`` or a shard's list holds at least that share of the
    actions (estimated from the planner's statistics; without them, of the campaigns), those
    two statements read every campaign and the rows of the others are dropped here (see
    READ_ALL_SHARE); the counts are the same either way.
    """
    import asyncpg

    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, not {chunk_rows!r}")
    kind = scope_name(scope)
    if not isinstance(scope, str) and not all(isinstance(c, int) for c in scope):
        raise TypeError("scope must be 'all', 'live' or a sequence of campaign ids")
    started_at = time.time()
    t0 = time.perf_counter()
    reading = _Reading(chunk_rows, statement_timeout)
    settings = (
        f"statement_timeout = {int(statement_timeout * 1000)}",
        f"work_mem = '{_safe_setting(work_mem)}'",
        # The filter "$1 IS NULL OR id = ANY($1)" needs a plan made for the actual value.
        "plan_cache_mode = force_custom_plan",
        *queries.settings,
    )
    # Buckets: by the minute from this hour's start back to what memory keeps by the minute,
    # by the hour from today's start back 90 days, by the day before (docs/design.md, "Time").
    minute_cutoff = (int(started_at) // HOUR + 1) * HOUR - MINUTES_KEPT
    hour_cutoff = (int(started_at) // DAY - 90) * DAY
    cutoffs = (_naive_utc(minute_cutoff), _naive_utc(hour_cutoff))
    unit_cutoffs = (minute_cutoff, hour_cutoff)
    supporter_sql = queries.supporter_counts if kind != "ids" else queries.supporter_counts_by_ids
    streaming = kind != "ids"  # the streaming supporter query, else the hashing one
    supporter_settings = queries.supporter_settings if streaming else ()
    try:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(
                conn.transaction(isolation="repeatable_read", readonly=True)
            )
            # The first statement of the transaction takes its snapshot: record which
            # transactions it sees, and when (the database's clock).
            tx_snapshot_text, taken_at = await conn.fetchrow(queries.snapshot_info)
            snapshot = None
            if helper_conn is not None:
                snapshot = await conn.fetchval("SELECT pg_export_snapshot()")
            await _set_local(conn, settings)
            every = 0  # how many campaigns there are (for "all" and "live")
            if kind == "all":
                covered = [r[0] for r in await conn.fetch(queries.all_campaigns)]
                every = len(covered)
                ids: list[int] | None = None
            elif kind == "live":
                covered = [r[0] for r in await conn.fetch(queries.live_campaigns)]
                every = await conn.fetchval(queries.campaign_count)
                ids = covered
            else:
                ids = sorted(set(cast("Sequence[int]", scope)))
                covered = [r[0] for r in await conn.fetch(queries.existing_campaigns, ids)]
                ids = covered
            if owns is not None:
                covered = [cid for cid in covered if owns(cid)]
                ids = covered
            built = _Built(_campaigns_of(covered), {}, *unit_cutoffs)
            # What the two big statements are given as $1, and how their rows are folded.
            big_ids = ids
            Fold = Callable[[list[asyncpg.Record]], None]
            fold_actions: Fold = built.fold_actions
            fold_supporters: Fold = built.fold_supporters
            if streaming and ids:
                listed: float | None = await conn.fetchval(queries.listed_action_share, ids)
                if listed is None:  # no statistics: the share of the campaigns
                    listed = len(ids) / max(every, len(ids))
                if listed >= read_all_share:
                    big_ids = None
                    fold_actions = _keeping(set(ids), fold_actions)
                    fold_supporters = _keeping(set(ids), fold_supporters)
            max_action_id = await conn.fetchval(queries.max_action_id)
            low = max(0, max_action_id - ACTION_WINDOW)
            if on_horizon is not None:
                tx = TxSnapshot.parse(tx_snapshot_text)
                early = Horizon(int(max_action_id), low, frozenset(), tx, float(taken_at))
                on_horizon(EarlyHorizon(early))
            # the runs of ids in the window that the snapshot does not count (a few rows)
            recent_rows: list[asyncpg.Record] = []
            message_rows: list[asyncpg.Record] = []
            has_messages = bool(await conn.fetchval(queries.messages_table))
            if helper_conn is None or ids == []:  # else the helper reads them, first thing
                recent_rows = await conn.fetch(
                    queries.recent_uncounted_action_runs, low, max_action_id
                )
                if ids != [] and has_messages:
                    message_rows = await conn.fetch(queries.message_counts, ids)
            extra_rows: list[asyncpg.Record] = []
            page_rows: list[asyncpg.Record] = []
            streamed = 0  # action bucket and supporter rows, folded as they arrived
            if ids != [] and helper_conn is None:
                extra_rows = await conn.fetch(queries.extra_supporters, ids)
                page_rows = await conn.fetch(queries.page_orgs, ids)
                built.page_orgs = _page_orgs_of(page_rows)
                streamed += await _stream(
                    conn, queries.action_buckets, (big_ids, *cutoffs), fold_actions, reading
                )
                await _set_local(conn, supporter_settings)
                shared_args = await _shared_args(conn, queries, streaming)
                streamed += await _stream(
                    conn,
                    supporter_sql,
                    (big_ids, None, None, *cutoffs, *shared_args),
                    fold_supporters,
                    reading,
                )
            elif ids != [] and helper_conn is not None:
                await stack.enter_async_context(
                    helper_conn.transaction(isolation="repeatable_read", readonly=True)
                )
                await helper_conn.execute(
                    f"SET TRANSACTION SNAPSHOT '{_safe_setting(str(snapshot))}'"
                )
                await _set_local(helper_conn, settings)
                # Where the two connections split the supporters: a fingerprint for the hashing
                # query, a supporter id for the streaming one (docs/design.md, "The
                # calculation's split"); None: the main connection counts them whole.
                split: bytes | int | None = queries.fingerprint_split
                if streaming:
                    share = queries.supporter_split
                    split = None
                    if share is not None:
                        split = await conn.fetchval(queries.supporter_split_id, share)

                Rows = list[asyncpg.Record]
                helper = helper_conn
                # What the helper reads first and the main connection's half waits for: the
                # pages (the supporter rows of pages are folded by them) and the shared
                # fingerprints (the supporter query's $6). No wait between two rounds: each
                # connection goes on with its next statement (docs/design.md, "The
                # calculation's split").
                loop = asyncio.get_running_loop()
                ready: asyncio.Future[tuple[object, ...]] = loop.create_future()
                # A helper's failure is raised by _both, whether or not the main part waited.
                ready.add_done_callback(lambda f: f.cancelled() or f.exception())

                async def main_part() -> int:
                    if split is None:  # the main connection counts the supporters whole
                        await _set_local(conn, supporter_settings)
                        shared = await _shared_args(conn, queries, streaming)
                        await asyncio.shield(ready)
                        return await _stream(
                            conn,
                            supporter_sql,
                            (big_ids, None, None, *cutoffs, *shared),
                            fold_supporters,
                            reading,
                        )
                    n = await _stream(
                        conn,
                        queries.action_buckets,
                        (big_ids, *cutoffs),
                        fold_actions,
                        reading,
                    )
                    shared = await asyncio.shield(ready)
                    await _set_local(conn, supporter_settings)
                    return n + await _stream(
                        conn,
                        supporter_sql,
                        (big_ids, None, split, *cutoffs, *shared),
                        fold_supporters,
                        reading,
                    )

                async def helper_part() -> tuple[Rows, Rows, Rows, int]:
                    nonlocal recent_rows
                    try:
                        pages = await helper.fetch(queries.page_orgs, ids)
                        built.page_orgs = _page_orgs_of(pages)
                        extra = await helper.fetch(queries.extra_supporters, ids)
                        recent_rows = await helper.fetch(
                            queries.recent_uncounted_action_runs, low, max_action_id
                        )
                        messages: Rows = []
                        if has_messages:
                            messages = await helper.fetch(queries.message_counts, ids)
                        shared: tuple[object, ...] = ()
                        if split is not None:
                            await _set_local(helper, supporter_settings)
                            shared = await _shared_args(helper, queries, streaming)
                    except BaseException as exc:
                        if isinstance(exc, Exception):
                            ready.set_exception(exc)
                        else:
                            ready.cancel()
                        raise
                    ready.set_result(shared)
                    if split is None:
                        n = await _stream(
                            helper,
                            queries.action_buckets,
                            (big_ids, *cutoffs),
                            fold_actions,
                            reading,
                        )
                    else:
                        n = await _stream(
                            helper,
                            supporter_sql,
                            (big_ids, split, None, *cutoffs, *shared),
                            fold_supporters,
                            reading,
                        )
                    return extra, pages, messages, n

                n_main, helper_out = await _both(main_part(), helper_part())
                extra_rows, page_rows, message_rows, n_helper = helper_out
                streamed += n_main + n_helper
    except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
        # A connection lost mid-query surfaces as the rollback's InterfaceError; the reason
        # worth logging (admin shutdown, terminated backend...) is the error it interrupted.
        cause = exc.__context__ if isinstance(exc, asyncpg.InterfaceError) else None
        reason = cause if isinstance(cause, asyncpg.PostgresError | OSError) else exc
        raise CalculationError(
            f"{kind} calculation failed: {type(reason).__name__}: {reason}"
        ) from reason

    # Every loop from here on takes turns with the event loop (a few ms each): see _Pacer.
    pacer = _Pacer()
    # Ids below the highest that these counts do not hold: transactions still running (or rolled
    # back) when the snapshot was taken, and actions not accepted yet.
    uncounted = await _uncounted_ids(recent_rows, pacer)
    campaigns = built.campaigns
    # The people who share a fingerprint, counted distinct over both connections' rows.
    shared_rows = built.shared.rows()
    while part := list(itertools.islice(shared_rows, FOLD_PART)):
        built.fold_supporters(part)
        await pacer.step()
    built.extras(extra_rows)
    built.messages(message_rows)
    await built.flush(pacer)
    rows = len(covered) + streamed + len(extra_rows) + len(page_rows) + len(message_rows)
    duration = time.perf_counter() - t0
    log.info(
        "calculation.done",
        kind=kind,
        campaigns=len(campaigns),
        rows=rows,
        max_action_id=max_action_id,
        helper=helper_conn is not None,
        duration=round(duration, 3),
    )
    return CalculationResult(
        kind,
        campaigns,
        int(max_action_id),
        started_at,
        duration,
        rows,
        uncounted_ids=uncounted,
        window_low=low,
        snapshot=TxSnapshot.parse(tx_snapshot_text),
        taken_at=float(taken_at),
        messages_counted=has_messages,
        timelines=built.timelines,
        pages=built.pages,
        page_timelines=built.page_timelines,
    )


class _Built:
    """The covered campaigns, their pages and both's buckets, folded from the rows of one
    calculation as they arrive, a chunk at a time (docs/design.md, "Action pages and orgs" and
    "Time"): memory holds the folded counts, never the whole result."""

    def __init__(
        self,
        campaigns: dict[int, CampaignStats],
        page_orgs: dict[int, tuple[int, int]],
        minute_cutoff: int,
        hour_cutoff: int,
    ) -> None:
        self.campaigns = campaigns
        self.page_orgs = page_orgs  # page -> (campaign, org); set before any supporter row
        self.minute_cutoff = minute_cutoff
        self.hour_cutoff = hour_cutoff
        self.timelines: dict[int, Timeline] = {}
        self.pages: dict[int, PageStats] = {}
        self.page_timelines: dict[int, Timeline] = {}
        #: the shared people's rows (level 7), counted distinct as they come, whichever part
        self.shared = shared_people.Combiner()
        # The action buckets, summed by (campaign, page, bucket start) and (campaign, page,
        # action type) as they arrive, with the latest action per (campaign, page): filed into
        # the campaigns, pages and timelines by flush(), each timeline's buckets in order.
        # Keyed by (campaign, page), one small dict each of plain ints and strings: the
        # garbage collector skips those, however many buckets they hold.
        self._action_buckets: dict[tuple[int, int], dict[int, int]] = {}
        self._action_types: dict[tuple[int, int], dict[str, int]] = {}
        self._action_last: dict[tuple[int, int], float] = {}
        # The supporters' buckets (levels 5 and 6), summed by campaign and by page as they
        # arrive (in Postgres' hash order), and filed with the action buckets, oldest first:
        # added to the timelines row by row, each out-of-order bucket was a bisect and an
        # insertion into the series (docs/measurements.md, "The calculation's budget").
        self._supporter_buckets: defaultdict[int, dict[int, int]] = defaultdict(dict)
        self._page_supporter_buckets: defaultdict[int, dict[int, int]] = defaultdict(dict)

    def unit(self, start: int) -> int:
        if start >= self.minute_cutoff:
            return MINUTE
        return HOUR if start >= self.hour_cutoff else DAY

    def page(self, page: int) -> PageStats | None:
        """The page's counts (created at its first row). A page counts the actions made on it
        whatever their campaign column says (a page moved to another campaign keeps them); its
        campaign is the page's own (docs/design.md, "Action pages and orgs"). None when that
        campaign is not covered or the page's row is gone (a foreign key: not in one snapshot)."""
        ps = self.pages.get(page)
        if ps is None:
            where = self.page_orgs.get(page)
            if where is None or where[0] not in self.campaigns:
                return None
            ps = self.pages[page] = PageStats(where[0], where[1])
        return ps

    @staticmethod
    def timeline(timelines: dict[int, Timeline], key: int) -> Timeline:
        timeline = timelines.get(key)
        if timeline is None:
            timeline = timelines[key] = Timeline()
        return timeline

    def fold_supporters(self, rows: Sequence[Sequence[Any]]) -> None:
        """Add up one chunk of the supporter query's partial counts; a shared person's row
        (level 7) goes to :attr:`shared`, counted once every part has come."""
        campaigns = self.campaigns
        for row in rows:
            cid, key, area, n, level, start = row[:6]
            # Partial counts (disjoint sets of people): add them up. A page's levels (3, 4, 6)
            # need only the page's campaign covered, whatever the row's campaign.
            if level in (0, 1, 2, 5):
                stats = campaigns.get(cid)
                if stats is None:  # an action whose campaign row is missing: nothing covers it
                    continue
                if level == 0:
                    stats.supporters += n
                elif level == 1:
                    stats.org[key] = stats.org.get(key, 0) + n
                elif level == 2:
                    stats.area[area] = stats.area.get(area, 0) + n
                else:
                    starts = self._supporter_buckets[cid]
                    starts[start] = starts.get(start, 0) + n
            elif level == shared_people.SHARED:
                self.shared.add(row)
            else:
                ps = self.page(key)
                if ps is None:
                    continue
                if level == 3:
                    ps.stats.supporters += n
                    ps.stats.org[ps.org_id] = ps.stats.org.get(ps.org_id, 0) + n
                elif level == 4:
                    ps.stats.area[area] = ps.stats.area.get(area, 0) + n
                else:
                    starts = self._page_supporter_buckets[key]
                    starts[start] = starts.get(start, 0) + n

    def extras(self, rows: Sequence[asyncpg.Record]) -> None:
        for cid, page, org_id, extra in rows:
            stats = self.campaigns.get(cid)
            ps = self.page(page)
            for counts in (stats, None if ps is None else ps.stats):
                if counts is None:
                    continue
                counts.extra_supporters += extra
                counts.supporters += extra
                counts.org[org_id] = counts.org.get(org_id, 0) + extra

    def fold_actions(self, rows: Sequence[Sequence[Any]]) -> None:
        """Sum one chunk of the action buckets (filed by :meth:`flush`). A row is one
        (campaign, page, action type, bucket): the same (campaign, page, bucket) comes once per
        action type, so the timelines get a quarter of the rows, each bucket once."""
        buckets, types, latest = self._action_buckets, self._action_types, self._action_last
        for cid, page, action_type, start, n, last in rows:
            pair = (cid, page)
            starts = buckets.get(pair)
            if starts is None:
                starts = buckets[pair] = {}
                types[pair] = {}
                latest[pair] = last
            elif last > latest[pair]:
                latest[pair] = last
            starts[start] = starts.get(start, 0) + n
            kinds = types[pair]
            kinds[action_type] = kinds.get(action_type, 0) + n

    async def _file_actions(self, pacer: _Pacer) -> None:
        campaigns = self.campaigns
        for (cid, page), kinds in self._action_types.items():
            await pacer.step()
            stats = campaigns.get(cid)
            ps = self.page(page)
            for action_type, n in kinds.items():
                if stats is not None:
                    stats.action[action_type] = stats.action.get(action_type, 0) + n
                if ps is not None:
                    ps.stats.action[action_type] = ps.stats.action.get(action_type, 0) + n
        # Per timeline, its buckets summed over pages (a campaign's) or campaigns (a moved
        # page's), then added oldest first: each an append, never an insertion.
        by_campaign: dict[int, dict[int, int]] = {}
        by_page: dict[int, dict[int, int]] = {}
        for (cid, page), summed in self._action_buckets.items():
            await pacer.step()  # a big result must not stall the actor's event loop
            for by_key, key, counted in (
                (by_campaign, cid, cid in campaigns),
                (by_page, page, self.page(page) is not None),
            ):
                if not counted:
                    continue
                starts = by_key.get(key)
                if starts is None:
                    by_key[key] = dict(summed)
                    continue
                for start, n in summed.items():
                    starts[start] = starts.get(start, 0) + n
        self._action_buckets = {}
        # Each timeline's buckets, supporters and actions together, oldest first.
        for timelines, by_key, people in (
            (self.timelines, by_campaign, self._supporter_buckets),
            (self.page_timelines, by_page, self._page_supporter_buckets),
        ):
            for key in by_key.keys() | people.keys():
                timeline = self.timeline(timelines, key)
                acted = by_key.get(key, {})
                joined = people.get(key, {})
                for i, start in enumerate(sorted(acted.keys() | joined.keys())):
                    if not i % 64:
                        await pacer.step()
                    unit = self.unit(start)
                    timeline.add_bucket(unit, start, joined.get(start, 0), acted.get(start, 0))
        self._supporter_buckets = defaultdict(dict)
        self._page_supporter_buckets = defaultdict(dict)
        for (cid, page), last in self._action_last.items():
            await pacer.step()
            for timelines, key in ((self.timelines, cid), (self.page_timelines, page)):
                held = timelines.get(key)
                if held is not None and last > held.last_action_at:
                    held.last_action_at = last

    def messages(self, rows: Sequence[asyncpg.Record]) -> None:
        for cid, page, n in rows:
            stats = self.campaigns.get(cid)
            if stats is not None:
                stats.messages += n
            ps = self.page(page)
            if ps is not None:
                ps.stats.messages += n

    async def flush(self, pacer: _Pacer) -> None:
        await self._file_actions(pacer)
        # Every page of a covered campaign, counted or not: its campaign is known to page_stats.
        for i, page in enumerate(self.page_orgs):
            if not i % 64:
                await pacer.step()
            self.page(page)
        for timelines in (self.timelines, self.page_timelines):
            for i, timeline in enumerate(timelines.values()):
                if not i % 64:
                    await pacer.step()
                timeline.flush()


@dataclass(frozen=True, slots=True)
class _Reading:
    """How _stream reads a big result: ``chunk`` rows at a time, the whole statement within
    ``timeout`` seconds (the server's statement_timeout bounds each fetch of a cursor only)."""

    chunk: int
    timeout: float


async def _stream(
    conn: asyncpg.Connection,
    sql: str,
    args: Sequence[object],
    fold: Callable[[list[asyncpg.Record]], None],
    reading: _Reading,
) -> int:
    """Run ``sql`` and fold its rows ``chunk`` at a time, as they arrive (a
    cursor, in the calculation's transaction); returns how many rows there were. Memory holds two
    chunks, never the whole result, and folding one chunk is one short step of the event loop.
    The next chunk is asked for before this one is folded, so Postgres sends it meanwhile."""
    chunk = reading.chunk
    # A cursor's statement runs fetch by fetch, and Postgres' statement_timeout counts each
    # fetch on its own: the statement as a whole is bounded here, by the same timeout.
    deadline = time.monotonic() + reading.timeout

    def fetch() -> asyncio.Future[list[asyncpg.Record]]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CalculationError(_timed_out(sql, reading.timeout))
        rows: Awaitable[list[asyncpg.Record]] = cursor.fetch(chunk, timeout=left)
        return asyncio.ensure_future(rows)

    cursor = await conn.cursor(sql, *args)
    count = 0
    pending = fetch()
    try:
        while True:
            try:
                rows = await pending
            except TimeoutError:
                raise CalculationError(_timed_out(sql, reading.timeout)) from None
            more = len(rows) == chunk
            if more:
                pending = fetch()
                await asyncio.sleep(0)  # the request goes out before the fold
            # A chunk is folded in parts, the event loop served in between (FOLD_PART).
            for at in range(0, len(rows), FOLD_PART):
                if at:
                    await asyncio.sleep(0)
                fold(rows[at : at + FOLD_PART])
            count += len(rows)
            if not more:
                return count
    finally:
        if not pending.done():  # the fold failed: the transaction ends with the error
            pending.cancel()


def _timed_out(sql: str, timeout: float) -> str:
    first = " ".join(sql.split())[:60]
    return f"statement timeout: a statement read by cursor ran over {timeout:g} s: {first}..."


class _Pacer:
    """Turns of the event loop between the steps of a long loop: :meth:`step` yields once
    ``STEP_BUDGET`` seconds have passed since the last turn (the actor serves its clients in
    the same loop)."""

    __slots__ = ("_since",)

    def __init__(self) -> None:
        self._since = time.perf_counter()

    async def step(self) -> None:
        if time.perf_counter() - self._since >= STEP_BUDGET:
            await asyncio.sleep(0)
            self._since = time.perf_counter()


#: ids of the window added to the uncounted set between two looks at the pacer
UNCOUNTED_PART = 2_000


async def _uncounted_ids(runs: Sequence[Sequence[int]], pacer: _Pacer) -> frozenset[int]:
    """The ids of the runs ``(first, last)``, taking turns with the event loop: up to the whole
    window (100,000 ids in thousands of runs) took 15-90 ms in one step; the set is built
    ``UNCOUNTED_PART`` ids at a time, and its frozen copy is one step of a few ms."""
    ids: set[int] = set()
    part = 0
    for first, last in runs:
        for start in range(first, last + 1, UNCOUNTED_PART):
            stop = min(start + UNCOUNTED_PART, last + 1)
            ids.update(range(start, stop))
            part += stop - start + 16  # a run costs a little whatever its length
            if part >= UNCOUNTED_PART:
                part = 0
                await pacer.step()
    return frozenset(ids)


async def _shared_args(
    conn: asyncpg.Connection, queries: Queries, streaming: bool
) -> tuple[object, ...]:
    """The streaming supporter query's last argument, the shared fingerprints ($6); none for the
    hashing one."""
    if not streaming:
        return ()
    return (await conn.fetchval(queries.shared_fingerprints),)


async def _both(first: Awaitable[A], second: Awaitable[B]) -> tuple[A, B]:
    """Both results. When one part fails, the other is cancelled (its statement too) instead
    of being waited for; either way both have ended before either transaction does."""
    tasks = [asyncio.ensure_future(first), asyncio.ensure_future(second)]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        # Cancelled from outside, or one failed: end the other part, and wait for it to end.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    failed = [t.exception() for t in tasks if not t.cancelled() and t.exception() is not None]
    if failed:
        raise cast("BaseException", failed[0])
    return cast("A", tasks[0].result()), cast("B", tasks[1].result())


def _keeping(
    campaigns: set[int], fold: Callable[[list[asyncpg.Record]], None]
) -> Callable[[list[asyncpg.Record]], None]:
    """``fold`` of the rows whose campaign (their first column) is one of ``campaigns``: what
    the statement's own filter on ``actions.campaign_id`` would have kept. Every row of the two
    big statements carries its actions' campaign, and everything they compute is per campaign
    (per supporter and campaign in the supporter query), so dropping a campaign's rows here
    gives the rows the filter would have given."""

    def folding(rows: list[asyncpg.Record]) -> None:
        fold([row for row in rows if row[0] in campaigns])

    return folding


def _campaigns_of(covered: Sequence[int]) -> dict[int, CampaignStats]:
    return {cid: CampaignStats() for cid in covered}


def _page_orgs_of(page_rows: Sequence[Sequence[Any]]) -> dict[int, tuple[int, int]]:
    """page -> (campaign, org), from ``page_orgs``' rows."""
    return {r[0]: (r[1], r[2]) for r in page_rows}


def _naive_utc(epoch: int) -> datetime:
    """A ``timestamp without time zone`` parameter holding UTC, as Proca's columns do."""
    return datetime.fromtimestamp(epoch, UTC).replace(tzinfo=None)


async def _set_local(conn: asyncpg.Connection, settings: Sequence[str]) -> None:
    """SET LOCAL each ``name = value``: they last until the end of the transaction."""
    if settings:
        await conn.execute(";".join(f"SET LOCAL {s}" for s in settings))


def _safe_setting(value: str) -> str:
    if not value.replace(" ", "").replace("-", "").isalnum():
        raise ValueError(f"not a plain setting value: {value!r}")
    return value
