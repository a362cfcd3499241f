"""The full calculation: every count recomputed from Postgres in one read-only snapshot.

All statements of one calculation run in one ``READ ONLY, REPEATABLE READ`` transaction, so the
counts and the highest action id describe the same instant; each statement is bounded by
``statement_timeout``. The SQL itself lives in :mod:`campaignstats.db.queries`.

Memory is bounded by the result (rows per campaign x org / area / action type), never by the size
of the tables: all aggregation happens in Postgres.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
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
_YIELD_EVERY = 5_000


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
    """
    import asyncpg

    kind = scope_name(scope)
    if not isinstance(scope, str) and not all(isinstance(c, int) for c in scope):
        raise TypeError("scope must be 'all', 'live' or a sequence of campaign ids")
    started_at = time.time()
    t0 = time.perf_counter()
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
            if kind == "all":
                covered = [r[0] for r in await conn.fetch(queries.all_campaigns)]
                ids: list[int] | None = None
            elif kind == "live":
                covered = [r[0] for r in await conn.fetch(queries.live_campaigns)]
                ids = covered
            else:
                ids = sorted(set(cast("Sequence[int]", scope)))
                covered = [r[0] for r in await conn.fetch(queries.existing_campaigns, ids)]
                ids = covered
            if owns is not None:
                covered = [cid for cid in covered if owns(cid)]
                ids = covered
            max_action_id = await conn.fetchval(queries.max_action_id)
            low = max(0, max_action_id - ACTION_WINDOW)
            if on_horizon is not None:
                tx = TxSnapshot.parse(tx_snapshot_text)
                early = Horizon(int(max_action_id), low, frozenset(), tx, float(taken_at))
                on_horizon(EarlyHorizon(early))
            recent_rows: list[asyncpg.Record] = []
            message_rows: list[asyncpg.Record] = []
            has_messages = bool(await conn.fetchval(queries.messages_table))
            if helper_conn is None or ids == []:  # else the helper reads them, in its first round
                recent_rows = await conn.fetch(queries.recent_counted_action_ids, low)
                if ids != [] and has_messages:
                    message_rows = await conn.fetch(queries.message_counts, ids)
            supporter_rows: Sequence[Sequence[Any]] = []
            extra_rows: list[asyncpg.Record] = []
            action_buckets: list[asyncpg.Record] = []
            page_rows: list[asyncpg.Record] = []
            built: _Built | None = None
            buckets_read = 0  # action bucket rows already read into `built`
            if ids != [] and helper_conn is None:
                extra_rows = await conn.fetch(queries.extra_supporters, ids)
                page_rows = await conn.fetch(queries.page_orgs, ids)
                action_buckets = await conn.fetch(queries.action_buckets, ids, *cutoffs)
                await _set_local(conn, supporter_settings)
                shared_args = await _shared_args(conn, queries, streaming)
                supporter_rows = await conn.fetch(
                    supporter_sql, ids, None, None, *cutoffs, *shared_args
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

                # Two rounds, each on both connections at once. The first: the action buckets
                # beside the shared fingerprints (the supporter query's $6), the page lists.
                async def main_first() -> tuple[Rows, tuple[object, ...]]:
                    if split is None:  # the main connection counts the supporters whole
                        await _set_local(conn, supporter_settings)
                        return [], await _shared_args(conn, queries, streaming)
                    return await conn.fetch(queries.action_buckets, ids, *cutoffs), ()

                async def helper_first() -> tuple[Rows, Rows, tuple[object, ...], Rows, Rows]:
                    recent = await helper.fetch(queries.recent_counted_action_ids, low)
                    messages: Rows = []
                    if has_messages:
                        messages = await helper.fetch(queries.message_counts, ids)
                    extra = await helper.fetch(queries.extra_supporters, ids)
                    pages = await helper.fetch(queries.page_orgs, ids)
                    shared: tuple[object, ...] = ()
                    if split is not None:
                        await _set_local(helper, supporter_settings)
                        shared = await _shared_args(helper, queries, streaming)
                    return extra, pages, shared, recent, messages

                (buckets_main, shared_main), first = await _both(main_first(), helper_first())
                extra_rows, page_rows, shared_helper, recent_rows, message_rows = first
                shared_args = shared_main or shared_helper

                # The second: the supporters, split.
                async def main_second() -> Rows:
                    await _set_local(conn, supporter_settings)
                    rows: Rows = await conn.fetch(
                        supporter_sql, ids, None, split, *cutoffs, *shared_args
                    )
                    return rows

                async def helper_second() -> tuple[Rows, Rows]:
                    if split is None:
                        return [], await helper.fetch(queries.action_buckets, ids, *cutoffs)
                    rows = await helper.fetch(
                        supporter_sql, ids, split, None, *cutoffs, *shared_args
                    )
                    return rows, []

                # Meanwhile this process reads the first round's action buckets into memory.
                built = _Built(_campaigns_of(covered), _page_orgs_of(page_rows), *unit_cutoffs)
                (rows_lo, (rows_hi, action_buckets)), _ = await _both(
                    _both(main_second(), helper_second()), built.actions(buckets_main)
                )
                buckets_read = len(buckets_main)
                supporter_rows = [*rows_lo, *rows_hi]
    except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
        # A connection lost mid-query surfaces as the rollback's InterfaceError; the reason
        # worth logging (admin shutdown, terminated backend...) is the error it interrupted.
        cause = exc.__context__ if isinstance(exc, asyncpg.InterfaceError) else None
        reason = cause if isinstance(cause, asyncpg.PostgresError | OSError) else exc
        raise CalculationError(
            f"{kind} calculation failed: {type(reason).__name__}: {reason}"
        ) from reason

    # Ids below the highest that these counts do not hold: transactions still running (or rolled
    # back) when the snapshot was taken, and actions not accepted yet.
    counted = {r[0] for r in recent_rows}
    uncounted = frozenset(range(low + 1, max_action_id + 1)).difference(counted)
    if built is None:
        built = _Built(_campaigns_of(covered), _page_orgs_of(page_rows), *unit_cutoffs)
    campaigns = built.campaigns
    # The people who share a fingerprint, counted distinct over both connections' rows.
    supporter_rows = shared_people.combine(supporter_rows)
    await built.supporters(supporter_rows)
    built.extras(extra_rows)
    await built.actions(action_buckets)  # those not read yet (the order changes no sum)
    built.messages(message_rows)
    built.flush()
    rows = len(covered) + len(supporter_rows) + len(extra_rows) + len(page_rows)
    rows += len(message_rows) + len(action_buckets) + buckets_read
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
    """The covered campaigns, their pages and both's buckets, built from the rows of one
    calculation (docs/design.md, "Action pages and orgs" and "Time")."""

    def __init__(
        self,
        campaigns: dict[int, CampaignStats],
        page_orgs: dict[int, tuple[int, int]],
        minute_cutoff: int,
        hour_cutoff: int,
    ) -> None:
        self.campaigns = campaigns
        self.page_orgs = page_orgs  # page -> (campaign, org)
        self.minute_cutoff = minute_cutoff
        self.hour_cutoff = hour_cutoff
        self.timelines: dict[int, Timeline] = {}
        self.pages: dict[int, PageStats] = {}
        self.page_timelines: dict[int, Timeline] = {}

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

    async def supporters(self, rows: Sequence[shared_people.Row]) -> None:
        campaigns = self.campaigns
        for i, (cid, key, area, n, level, start) in enumerate(rows):
            if i % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)  # a big result must not stall the actor's event loop
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
                    self.timeline(self.timelines, cid).add_bucket(self.unit(start), start, n, 0)
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
                    timeline = self.timeline(self.page_timelines, key)
                    timeline.add_bucket(self.unit(start), start, n, 0)

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

    async def actions(self, rows: Sequence[asyncpg.Record]) -> None:
        for i, (cid, page, action_type, start, n, last) in enumerate(rows):
            if i % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)
            stats = self.campaigns.get(cid)
            ps = self.page(page)
            unit = self.unit(start)
            pairs = []
            if stats is not None:
                pairs.append((stats, self.timeline(self.timelines, cid)))
            if ps is not None:
                pairs.append((ps.stats, self.timeline(self.page_timelines, page)))
            for counts, timeline in pairs:
                counts.action[action_type] = counts.action.get(action_type, 0) + n
                timeline.add_bucket(unit, start, 0, n)
                if last > timeline.last_action_at:
                    timeline.last_action_at = last

    def messages(self, rows: Sequence[asyncpg.Record]) -> None:
        for cid, page, n in rows:
            stats = self.campaigns.get(cid)
            if stats is not None:
                stats.messages += n
            ps = self.page(page)
            if ps is not None:
                ps.stats.messages += n

    def flush(self) -> None:
        # Every page of a covered campaign, counted or not: its campaign is known to page_stats.
        for page in self.page_orgs:
            self.page(page)
        for timeline in self.timelines.values():
            timeline.flush()
        for timeline in self.page_timelines.values():
            timeline.flush()


async def _shared_args(
    conn: asyncpg.Connection, queries: Queries, streaming: bool
) -> tuple[object, ...]:
    """The streaming supporter query's last argument, the shared fingerprints ($6); none for the
    hashing one."""
    if not streaming:
        return ()
    return (await conn.fetchval(queries.shared_fingerprints),)


async def _both(first: Awaitable[A], second: Awaitable[B]) -> tuple[A, B]:
    """Both results; both finish before either transaction ends, even when one fails."""
    results = await asyncio.gather(first, second, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return cast("A", results[0]), cast("B", results[1])


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
