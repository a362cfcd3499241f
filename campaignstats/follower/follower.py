"""Following the database: counts made live from Postgres's logical replication (docs/follow.md).

The follower owns a logical replication slot (``pgoutput``, one slot per server) and polls it
from asyncio with ``pg_logical_slot_peek_binary_changes``; the slot is advanced
(``pg_replication_slot_advance``) only once the changes are applied by the actor. Each round:

1. one ``REPEATABLE READ`` snapshot ``Q`` and the WAL insert position ``X`` at that instant;
2. the slot's transactions that committed before ``X``: every transaction ``Q`` sees is among
   them; the few ``Q`` does not see yet (committing at that instant) wait for the next round;
3. in ``Q``, the rows of every person those transactions touch, so that whether a supporter is
   new to the campaign is decided by the database (campaignstats.follower.changes.plan);
4. the increments and decrements, each with its transaction's txid, go to the service
   (``send``, then ``flush``: applied), then the slot is advanced past them.

Start-up order (docs/follow.md, "Start-up"): the slot first, then a full calculation whose
snapshot is taken after it, then the stream from the slot's position. Transactions visible to a
snapshot taken right after the slot (:attr:`Follower.start_snapshot`) are skipped: the calculation
holds them; the others are journaled while it runs and the txid merge keeps or drops each one.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from campaignstats.model import Increment, TxSnapshot

from .changes import (
    FULL_IDENTITY_TABLES,
    TABLES,
    ActionRow,
    Assembler,
    IdentityError,
    MessageRow,
    PageRow,
    Plan,
    RowChange,
    SupporterRow,
    Transaction,
    full_xid,
    plan,
)
from .lock import holder, try_lock, unlock
from .pgoutput import Decoder
from .sql import FOLLOWER_QUERIES, FollowerQueries

if TYPE_CHECKING:
    import asyncpg

log = structlog.get_logger(__name__)

DEFAULT_PUBLICATION = "campaignstats"
DEFAULT_POLL_INTERVAL = 0.02  # seconds between rounds that found nothing
DEFAULT_MAX_CHANGES = 50_000  # changes per round (memory bound; whole transactions)
_NAME = re.compile(r"^[a-z0-9_]{1,63}$")
_MAX_PAGES_CACHED = 1_000_000


class FollowError(RuntimeError):
    """The database cannot be followed as it is; the message says which command fixes it."""


class SlotBusy(FollowError):
    """Another server follows this slot (it holds the slot's advisory lock, lock.py)."""


class Service(Protocol):
    """What the follower needs of campaignstats.service.StatsService (its public API)."""

    async def send(
        self, items: Sequence[Increment], on_rejected: Any = None, *, decrement: bool = False
    ) -> None: ...

    async def flush(self) -> None: ...

    async def resync(self, scope: str | Sequence[int] = "all") -> bool: ...


def default_slot_name() -> str:
    """``campaignstats_<host name>``: stable across restarts of this machine's server."""
    host = re.sub(r"[^a-z0-9_]", "_", socket.gethostname().lower()) or "server"
    return f"campaignstats_{host}"[:63]


def check_name(name: str, what: str) -> str:
    if not _NAME.match(name):
        raise FollowError(f"{what} {name!r}: use 1 to 63 lowercase letters, digits or _")
    return name


@dataclass(slots=True)
class FollowerStats:
    """What ``status()`` reports (for ``info`` and the HTTP metrics)."""

    rounds: int = 0
    transactions: int = 0  # applied
    increments: int = 0
    decrements: int = 0
    skipped_at_start: int = 0  # held by the start-up calculation
    deferred: int = 0  # in the last round: committed, not yet visible
    truncated_rounds: int = 0  # rounds that hit max_changes (catching up)
    inexact: int = 0  # org/area splits left to the next calculation
    unknown_pages: int = 0
    truncations: int = 0  # TRUNCATE of a followed table: a full calculation was asked for
    extra_supporters_changes: int = 0  # not followed yet (docs/follow.md)
    errors: int = 0
    last_error: str | None = None
    lag_bytes: int | None = None
    lag_seconds: float = 0.0
    #: commit to applied, of the newest transaction of the last round that applied some
    last_latency: float | None = None
    last_round_seconds: float = 0.0
    confirmed_lsn: int = 0
    running: bool = False
    stopped_by: str | None = None
    #: seconds spent, in total, per phase of a round (where a slow round's time goes)
    seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("peek", "people", "apply", "advance"), 0.0)
    )


@dataclass(slots=True)
class Follower:
    dsn: str
    slot: str = field(default_factory=default_slot_name)
    publication: str = DEFAULT_PUBLICATION
    queries: FollowerQueries = FOLLOWER_QUERIES
    poll_interval: float = DEFAULT_POLL_INTERVAL
    max_changes: int = DEFAULT_MAX_CHANGES
    connect_timeout: float = 10.0
    #: set REPLICA IDENTITY FULL on the tables that need it, instead of failing (the embedded
    #: database; a production database is the operator's to alter)
    configure: bool = False
    stats: FollowerStats = field(default_factory=FollowerStats)
    #: a snapshot taken right after the slot: what the start-up calculation holds for sure
    start_snapshot: TxSnapshot | None = None
    _decoder: Decoder = field(default_factory=Decoder)
    #: txids applied beyond the slot's position (a transaction before them was not visible
    #: yet), with their end LSN: skipped when the slot returns them again
    _applied: dict[int, int] = field(default_factory=dict)
    _pages: dict[int, int] = field(default_factory=dict)
    _prepared: bool = False
    #: the messages table exists and is published: STATS messages are followed
    _with_messages: bool = False
    #: past this much WAL retained by the slot, write a running-transactions record so that its
    #: restart point (where every peek starts decoding) catches up (docs/follow.md, "Cost")
    retain_bytes: int = 256 * 1024
    #: a shard's ownership test (docs/scale.md): changes of other campaigns are dropped
    owns: Callable[[int], bool] | None = None
    _restart_logged_at: float = 0.0
    _can_log_snapshot: bool = True
    #: the connection that holds the slot's advisory lock while :meth:`run` runs (lock.py)
    _lock: asyncpg.Connection | None = None
    #: when the last round succeeded (epoch seconds): the lag grows from it while rounds fail
    _last_ok: float = 0.0
    _failing: bool = False
    #: campaigns a page change moved supporters in or out of: calculated again (docs/follow.md)
    _resync: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        check_name(self.slot, "slot")
        check_name(self.publication, "publication")

    # -- start-up -------------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Check the database, create the publication and the slot if missing, and take the
        start snapshot. Call it before the full calculation the stream is merged with starts.
        Raises :class:`FollowError` naming the command that fixes what is missing."""
        import asyncpg

        conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout)
        try:
            await self._check_lock(conn)
            await _check_server(conn, self.configure)
            await self._ensure_publication(conn)
            self._with_messages = bool(
                await conn.fetchval(
                    "SELECT count(*) FROM pg_publication_tables "
                    "WHERE pubname = $1 AND tablename = 'messages'",
                    self.publication,
                )
            )
            await self._ensure_slot(conn)
            self.start_snapshot = TxSnapshot.parse(
                await conn.fetchval("SELECT pg_current_snapshot()::text")
            )
            self.stats.confirmed_lsn = int(
                await conn.fetchval(
                    "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1",
                    self.slot,
                )
            )
        finally:
            await conn.close()
        self._prepared = True
        log.info(
            "follower.prepared",
            slot=self.slot,
            publication=self.publication,
            confirmed_lsn=self.stats.confirmed_lsn,
        )

    async def _check_lock(self, conn: asyncpg.Connection) -> None:
        """Refuse a slot that another server follows (lock.py); the lock is held by :meth:`run`."""
        if self._lock is not None and not self._lock.is_closed():
            return  # ours
        if not await try_lock(conn, self.slot):
            raise SlotBusy(
                f"slot {self.slot} is followed by another server "
                f"({await holder(conn, self.slot) or 'another session'}): give this server its "
                "own --slot (docs/follow.md, 'One server per slot')"
            )
        await unlock(conn, self.slot)

    async def _take_lock(self) -> None:
        """Hold the slot's advisory lock on a connection of its own, or raise :class:`SlotBusy`."""
        import asyncpg

        if self._lock is not None and not self._lock.is_closed():
            return
        self._release_lock()
        conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout)
        try:
            await self._check_lock(conn)
            if not await try_lock(conn, self.slot):
                raise SlotBusy(f"slot {self.slot} was taken by another server meanwhile")
        except BaseException:
            conn.terminate()
            raise
        self._lock = conn

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.terminate()  # the session ends: Postgres releases its locks
            self._lock = None

    async def _resume(self, slot_conn: asyncpg.Connection) -> None:
        """After a reconnection: the slot may be behind what was applied (after a crash, an
        advance not yet checkpointed is lost): move it to where this follower had moved it."""
        at = await slot_conn.fetchval(
            "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1",
            self.slot,
        )
        if at is not None and int(at) < self.stats.confirmed_lsn:
            log.warning(
                "follower.slot_behind",
                slot=self.slot,
                slot_lsn=int(at),
                applied_lsn=self.stats.confirmed_lsn,
                hint="Postgres restarted before a checkpoint; what it returns again is skipped",
            )
            await slot_conn.fetchval(self.queries.advance, self.slot, self.stats.confirmed_lsn)

    async def _ensure_publication(self, conn: asyncpg.Connection) -> None:
        import asyncpg

        # messages only where the database has the table (Proca's mail-to-target messages)
        tables = [t for t in TABLES if t != "messages"]
        if await conn.fetchval("SELECT to_regclass('messages') IS NOT NULL"):
            tables.append("messages")
        have = await conn.fetchval(
            "SELECT count(*) FROM pg_publication WHERE pubname = $1", self.publication
        )
        if not have:
            sql = f"CREATE PUBLICATION {self.publication} FOR TABLE {', '.join(tables)}"
            try:
                await conn.execute(sql)
            except asyncpg.InsufficientPrivilegeError as exc:
                raise FollowError(
                    f"cannot create the publication ({exc}); as the tables' owner run: {sql};"
                ) from exc
            log.info("follower.publication_created", publication=self.publication, tables=tables)
            return
        published = {
            r[0]
            for r in await conn.fetch(
                "SELECT tablename FROM pg_publication_tables WHERE pubname = $1", self.publication
            )
        }
        missing = [t for t in ("actions", "supporters", "action_pages") if t not in published]
        if missing:
            raise FollowError(
                f"publication {self.publication} lacks {', '.join(missing)}; run: "
                f"ALTER PUBLICATION {self.publication} ADD TABLE {', '.join(missing)};"
            )

    async def _ensure_slot(self, conn: asyncpg.Connection) -> None:
        import asyncpg

        row = await conn.fetchrow(
            "SELECT plugin, database FROM pg_replication_slots WHERE slot_name = $1", self.slot
        )
        if row is not None:
            if row["plugin"] != "pgoutput" or row["database"] != await conn.fetchval(
                "SELECT current_database()"
            ):
                raise FollowError(
                    f"slot {self.slot} exists for {row['plugin']} on {row['database']}: choose "
                    f"another --slot, or drop it: campaignstats slots --drop {self.slot}"
                )
            log.info("follower.slot_reused", slot=self.slot)
            return
        try:
            await conn.execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')", self.slot
            )
        except asyncpg.InsufficientPrivilegeError as exc:
            user = await conn.fetchval("SELECT current_user")
            raise FollowError(
                f"cannot create a replication slot ({exc}); as a superuser run: "
                f"ALTER ROLE {user} WITH REPLICATION;"
            ) from exc
        log.info("follower.slot_created", slot=self.slot)

    # -- the stream -----------------------------------------------------------------------------

    async def run(self, service: Service, *, full_calculation_pending: bool) -> None:
        """Follow until cancelled. ``full_calculation_pending``: a full calculation starts after
        :meth:`prepare` without being asked (the service is started after it); otherwise one is
        asked for (``resync("all")``, retried while another runs) before anything is applied.
        Database errors are retried with backoff; anything else (an update without its old row,
        the service stopped) ends it, recorded in :meth:`status` (``running``, ``stopped_by``).
        """
        self.stats.running = True
        self._last_ok = time.time()
        try:
            await self._take_lock()
            await self._run(service, full_calculation_pending)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.stats.stopped_by = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self.stats.running = False
            self._release_lock()

    async def _run(self, service: Service, full_calculation_pending: bool) -> None:
        import asyncpg

        if not self._prepared:
            await self.prepare()
        if not full_calculation_pending:
            await _full_calculation(service)
        delay = 0.5
        while True:
            conns: list[asyncpg.Connection] = []
            try:
                for _ in range(2):
                    conns.append(
                        await asyncpg.connect(
                            self.dsn,
                            timeout=self.connect_timeout,
                            server_settings=dict(self.queries.settings),
                        )
                    )
                await self._take_lock()  # again, if its connection was lost
                await self._resume(conns[1])
                while True:
                    if self._lock is None or self._lock.is_closed():
                        raise SlotBusy("the connection holding the slot's lock was lost")
                    applied = await self.round(service, conns[0], conns[1])
                    delay = 0.5  # only a round that succeeded resets the backoff
                    self._failing = False
                    self._last_ok = time.time()
                    if not applied:
                        await asyncio.sleep(self.poll_interval)
            except IdentityError:
                raise  # the operator must alter the table: retrying cannot help
            except (
                OSError,
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
                TimeoutError,
                SlotBusy,
                ValueError,  # a row this follower could not decode: logged, retried
            ) as exc:
                self.stats.errors += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                self._failing = True
                self.stats.lag_seconds = self._lag_while_failing()
                log.warning(
                    "follower.failed",
                    error=self.stats.last_error,
                    retry_in=delay,
                    lag_seconds=self.stats.lag_seconds,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            finally:
                for c in conns:
                    await _close(c)

    async def round(
        self, service: Service, conn: asyncpg.Connection, slot_conn: asyncpg.Connection
    ) -> int:
        """One round; returns how many transactions it applied."""
        q = self.queries
        t0 = time.perf_counter()
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            row = await conn.fetchrow(q.round_start, self.slot)
            snap_text, insert_lsn, flush_lsn, lag, retained = row
            snapshot = TxSnapshot.parse(snap_text)
            t1 = time.perf_counter()
            rows = await slot_conn.fetch(
                q.peek, self.slot, insert_lsn, self.max_changes, self.publication
            )
            t2 = time.perf_counter()
            truncated = len(rows) >= self.max_changes
            txns = self._transactions(rows)
            visible: list[Transaction] = []
            pending: list[Transaction] = []  # not visible to the snapshot yet
            skipped: list[Transaction] = []
            for txn in txns:
                txid = full_xid(txn.xid, snapshot.xmax)
                if txid in self._applied or txn.end_lsn <= self.stats.confirmed_lsn:
                    skipped.append(txn)  # applied already (returned again after a crash)
                elif self.start_snapshot is not None and self.start_snapshot.sees(txid):
                    skipped.append(txn)
                    self.stats.skipped_at_start += 1
                elif snapshot.sees(txid):
                    visible.append(txn)
                else:
                    pending.append(txn)
            result = None
            if any(t.changes for t in visible):
                result = await self._plan(conn, visible, snapshot)
        t3 = time.perf_counter()
        incs, decs = (result.increments, result.decrements) if result else ([], [])
        owns = self.owns
        for decrement, items in result.steps if result else ():
            if owns is not None:  # a shard: the changes of its own campaigns only
                items = [item for item in items if owns(item.campaign_id)]
            if items:
                await service.send(items, decrement=decrement)  # in commit order
        if incs or decs:
            await service.flush()  # applied: only now may the slot move past them
        now = time.time()
        if visible:
            self.stats.last_latency = now - visible[-1].commit_time
        self._resync.update(_moved_by_pages(visible))
        if self._resync and await service.resync(sorted(self._resync)):
            log.info("follower.page_changed", resync=sorted(self._resync))
            self._resync.clear()
        if any(t.truncated for t in visible):
            self.stats.truncations += 1
            log.warning("follower.truncate", tables=[t.truncated for t in visible if t.truncated])
            await _full_calculation(service)
        t4 = time.perf_counter()
        pending_ids = {id(t) for t in pending}
        for txn in visible:
            self._applied[full_xid(txn.xid, snapshot.xmax)] = txn.end_lsn
        await self._advance(slot_conn, txns, pending_ids, truncated, insert_lsn, flush_lsn)
        if retained is not None and retained > self.retain_bytes:
            await self._move_restart_point(slot_conn)
        s = self.stats
        phases = s.seconds
        phases["peek"] += t2 - t1
        phases["people"] += t3 - t2
        phases["apply"] += t4 - t3
        phases["advance"] += time.perf_counter() - t4
        s.rounds += 1
        s.transactions += len(visible)
        s.increments += len(incs)
        s.decrements += len(decs)
        s.deferred = len(pending)
        s.truncated_rounds += truncated
        s.extra_supporters_changes += sum(
            1
            for txn in visible
            for ch in txn.changes
            if isinstance(ch.old, PageRow)
            and isinstance(ch.new, PageRow)
            and ch.old.extra_supporters != ch.new.extra_supporters
        )
        if result is not None:
            s.inexact += result.inexact
            s.unknown_pages += result.unknown_pages
        s.lag_bytes = None if lag is None else int(lag)
        waiting = [t.commit_time for t in pending]
        s.lag_seconds = round(max(0.0, now - min(waiting)), 3) if waiting else 0.0
        if truncated and txns:
            s.lag_seconds = round(max(s.lag_seconds, now - txns[-1].commit_time), 3)
        s.last_round_seconds = round(time.perf_counter() - t0, 4)
        return len(visible)

    async def _move_restart_point(self, slot_conn: asyncpg.Connection) -> None:
        import asyncpg

        now = time.monotonic()
        if not self._can_log_snapshot or now - self._restart_logged_at < 0.1:
            return
        self._restart_logged_at = now
        try:
            await slot_conn.execute(self.queries.log_snapshot)
        except asyncpg.InsufficientPrivilegeError:
            self._can_log_snapshot = False
            user = await slot_conn.fetchval("SELECT current_user")
            log.warning(
                "follower.cannot_log_snapshot",
                hint="every round decodes up to 15 s of WAL again; as a superuser run: "
                f"GRANT EXECUTE ON FUNCTION pg_log_standby_snapshot() TO {user};",
            )

    def _transactions(self, rows: Sequence[Any]) -> list[Transaction]:
        assembler = Assembler()
        decoder = self._decoder
        out: list[Transaction] = []
        for (data,) in rows:
            txn = assembler.feed(decoder.decode(data))
            if txn is not None:
                out.append(txn)
                for ch in txn.changes:
                    # a deleted page's old row too: its actions' decrements follow it
                    for row in (ch.old, ch.new):
                        if isinstance(row, PageRow):
                            self._pages[row.id] = row.org_id
        return out

    async def _plan(
        self, conn: asyncpg.Connection, visible: list[Transaction], snapshot: TxSnapshot
    ) -> Plan:
        q = self.queries
        sids: set[int] = set()
        fps: set[bytes] = set()
        pages: set[int] = set()
        for txn in visible:
            for ch in txn.changes:
                for row in (ch.old, ch.new):
                    if isinstance(row, ActionRow):
                        if row.supporter_id is not None:
                            sids.add(row.supporter_id)
                        pages.add(row.action_page_id)
                    elif isinstance(row, SupporterRow):
                        fps.add(row.fingerprint)
        supporters: list[SupporterRow] = []
        actions: list[ActionRow] = []
        for r in await conn.fetch(q.people, list(sids), list(fps)):
            if r[0] == 0:
                supporters.append(SupporterRow(r[1], bytes(r[2]), r[3], r[4], r[5]))
            else:
                actions.append(ActionRow(r[1], r[6], r[7], r[8], r[9], r[4], r[10]))
        pages.update(a.action_page_id for a in actions)
        counts: dict[int, int] | None = None
        mailed: list[ActionRow] = []
        if self._with_messages:
            counts, mailed = await self._mail(conn, visible)
            pages.update(a.action_page_id for a in mailed)
        missing = [p for p in pages if p not in self._pages]
        if missing:
            if len(self._pages) > _MAX_PAGES_CACHED:
                self._pages.clear()
            for pid, org in await conn.fetch(q.page_orgs, missing):
                self._pages[pid] = org
        xmax = snapshot.xmax
        return plan(
            visible,
            supporters,
            actions,
            self._pages.get,
            lambda xid: full_xid(xid, xmax),
            message_counts=counts,
            message_actions=mailed,
        )

    async def _mail(
        self, conn: asyncpg.Connection, visible: list[Transaction]
    ) -> tuple[dict[int, int], list[ActionRow]]:
        """Messages and rows, as ``Q`` has them, of the actions the round touches. An action
        inserted in the round needs no query: its state in ``Q`` is the round's own doing."""
        first: dict[int, RowChange] = {}
        last: dict[int, RowChange] = {}
        net: dict[int, int] = {}
        for txn in visible:
            for ch in txn.changes:
                row = ch.new or ch.old
                if isinstance(row, ActionRow):
                    first.setdefault(row.id, ch)
                    last[row.id] = ch
                elif isinstance(row, MessageRow):
                    d = 1 if ch.old is None else -1 if ch.new is None else 0
                    net[row.action_id] = net.get(row.action_id, 0) + d
                    if ch.old is not None and isinstance(ch.new, MessageRow):
                        old = ch.old
                        assert isinstance(old, MessageRow)
                        if old.action_id != ch.new.action_id:  # moved to another action
                            net[old.action_id] = net.get(old.action_id, 0) - 1
                            net[ch.new.action_id] = net.get(ch.new.action_id, 0) + 1
        born = {aid for aid, ch in first.items() if ch.old is None}
        counts = {aid: net.get(aid, 0) for aid in born}
        rows = [r for aid in born if isinstance(r := last[aid].new, ActionRow)]
        ask = sorted((set(first) | set(net)) - born)
        if ask:
            for r in await conn.fetch(self.queries.mailed_actions, ask):
                rows.append(ActionRow(*r[:7]))
                counts[r[0]] = r[7]
        return counts, rows

    async def _advance(
        self,
        slot_conn: asyncpg.Connection,
        txns: list[Transaction],
        pending: set[int],
        truncated: bool,
        insert_lsn: int,
        flush_lsn: int,
    ) -> None:
        """Move the slot past every transaction applied or skipped, up to the first one still
        waiting. With nothing waiting and everything up to the round's insert position read (it
        was flushed before the peek), up to that position: the slot does not hold on to WAL of
        transactions that touch no followed table."""
        target = 0
        blocked = False
        for txn in txns:
            if id(txn) in pending:
                blocked = True
                break
            target = txn.end_lsn
        if not blocked and not truncated and insert_lsn <= flush_lsn:
            target = max(target, insert_lsn)
        if target > self.stats.confirmed_lsn:
            await slot_conn.fetchval(self.queries.advance, self.slot, target)
            self.stats.confirmed_lsn = target
            self._applied = {x: end for x, end in self._applied.items() if end > target}

    def _lag_while_failing(self) -> float:
        """While rounds fail, nothing newer than the last round that succeeded is applied."""
        return round(max(self.stats.lag_seconds, time.time() - self._last_ok), 3)

    def status(self) -> dict[str, Any]:
        """The follower's figures: for ``info`` (``follower``) and the HTTP metrics."""
        s = self.stats
        if self._failing and s.running:
            s.lag_seconds = self._lag_while_failing()
        return {
            "slot": self.slot,
            "running": s.running,
            "stopped_by": s.stopped_by,
            "publication": self.publication,
            "lag_bytes": s.lag_bytes,
            "lag_seconds": s.lag_seconds,
            "last_latency": None if s.last_latency is None else round(s.last_latency, 4),
            "rounds": s.rounds,
            "transactions": s.transactions,
            "increments": s.increments,
            "decrements": s.decrements,
            "skipped_at_start": s.skipped_at_start,
            "deferred": s.deferred,
            "truncated_rounds": s.truncated_rounds,
            "inexact": s.inexact,
            "unknown_pages": s.unknown_pages,
            "truncations": s.truncations,
            "extra_supporters_changes": s.extra_supporters_changes,
            "errors": s.errors,
            "last_error": s.last_error,
            "last_round_seconds": s.last_round_seconds,
            "confirmed_lsn": s.confirmed_lsn,
            "seconds": {k: round(v, 3) for k, v in s.seconds.items()},
        }


async def _close(conn: asyncpg.Connection) -> None:
    """Close gracefully: a peek cut short (the server stopping) is cancelled in Postgres too;
    terminate() would leave it decoding, the slot active, for as long as the peek takes."""
    try:
        await conn.close(timeout=2)
    except BaseException:
        conn.terminate()
        raise


def _moved_by_pages(visible: list[Transaction]) -> set[int]:
    """Campaigns whose counts a page change moved (its org, its campaign or its extra
    supporters): the stream has no rows of the supporters it moves, a calculation has."""
    out: set[int] = set()
    for txn in visible:
        for ch in txn.changes:
            old, new = ch.old, ch.new
            if isinstance(old, PageRow) and isinstance(new, PageRow) and old != new:
                out.update((old.campaign_id, new.campaign_id))
    return out


async def _full_calculation(service: Service) -> None:
    """Start a full calculation, waiting for a running one to end first (it may have taken
    its snapshot too early)."""
    while not await service.resync("all"):  # noqa: ASYNC110 (polls the actor, not a flag)
        await asyncio.sleep(0.1)


# -- checks, and slots for the command line ------------------------------------------------------


async def _check_server(conn: asyncpg.Connection, configure: bool) -> None:
    import asyncpg

    level = await conn.fetchval("SHOW wal_level")
    if level != "logical":
        raise FollowError(
            f"wal_level is {level!r}, logical decoding needs 'logical'; run: "
            "ALTER SYSTEM SET wal_level = logical; and restart Postgres"
        )
    # The right to use slots, asked of Postgres itself (managed services grant it in their own
    # ways, e.g. through a role's membership, which pg_roles.rolreplication does not show): the
    # function checks it before anything else, and this slot does not exist.
    try:
        await conn.fetchval(
            "SELECT pg_replication_slot_advance('campaignstats_rights_check', '0/0'::pg_lsn)"
        )
    except asyncpg.InsufficientPrivilegeError as exc:
        user = await conn.fetchval("SELECT current_user")
        raise FollowError(
            f"role {user} may not use replication slots ({exc}); as a superuser run: "
            f"ALTER ROLE {user} WITH REPLICATION;"
        ) from exc
    except asyncpg.PostgresError:
        pass  # allowed: the check went on to the (absent) slot
    rows = await conn.fetch(
        "SELECT c.relname, c.relreplident FROM pg_class c "
        "WHERE c.oid = ANY(ARRAY[to_regclass('actions'), to_regclass('supporters'), "
        "to_regclass('action_pages'), to_regclass('messages')]::oid[])"
    )
    found = {r[0]: r[1] for r in rows}
    absent = [t for t in FULL_IDENTITY_TABLES if t not in found]
    if absent:
        raise FollowError(f"tables missing: {', '.join(absent)} (campaignstats init-db)")
    full_tables = [*FULL_IDENTITY_TABLES, *(["messages"] if "messages" in found else [])]
    # relreplident is a "char": asyncpg gives it as bytes (b"f"), never as "f"
    not_full = [t for t in full_tables if found[t] not in (b"f", "f")]
    if not_full and configure:
        for t in not_full:
            await conn.execute(f"ALTER TABLE {t} REPLICA IDENTITY FULL")
        log.info("follower.replica_identity_full", tables=not_full)
    elif not_full:
        fix = " ".join(f"ALTER TABLE {t} REPLICA IDENTITY FULL;" for t in not_full)
        raise FollowError(
            "updates and deletes must carry the old row (docs/follow.md, 'Old rows'); run: " + fix
        )


@contextlib.asynccontextmanager
async def _connection(db: str | asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    import asyncpg

    if not isinstance(db, str):
        yield db
        return
    conn = await asyncpg.connect(db, timeout=10)
    try:
        yield conn
    finally:
        await conn.close()


async def list_slots(db: str | asyncpg.Connection) -> list[dict[str, Any]]:
    """Every logical replication slot of the server, with its lag in bytes (``db``: a DSN or
    a connection)."""
    async with _connection(db) as conn:
        rows = await conn.fetch(
            """
            SELECT slot_name, plugin, database, active, confirmed_flush_lsn::text AS confirmed,
                   (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint AS lag_bytes,
                   (pg_current_wal_lsn() - restart_lsn)::bigint AS retained_bytes, wal_status
            FROM pg_replication_slots WHERE slot_type = 'logical' ORDER BY slot_name
            """
        )
        return [dict(r) for r in rows]


async def drop_slot(db: str | asyncpg.Connection, name: str, *, wait: float = 10.0) -> bool:
    """Drop a logical replication slot; False if it did not exist. A slot in use (a follower
    that has just stopped may still be finishing its last read) is waited for up to ``wait``
    seconds. Raises :class:`FollowError` for a slot this command must not drop: a running
    server follows it (it holds the slot's lock, lock.py; stop it first), or it is not a
    logical slot (a standby's physical slot)."""
    import asyncpg

    async with _connection(db) as conn:
        row = await conn.fetchrow(
            "SELECT slot_type, database, database = current_database() AS here "
            "FROM pg_replication_slots WHERE slot_name = $1",
            name,
        )
        if row is None:
            return False
        if row["slot_type"] != "logical":
            raise FollowError(
                f"slot {name} is a {row['slot_type']} slot, not a logical one: not dropped "
                "(campaignstats slots lists those it may drop)"
            )
        # the lock lives in the slot's database: taken there, only read from another one
        locked = row["here"] and await try_lock(conn, name)
        who = None if locked else await holder(conn, name, row["database"])
        if who is not None or (row["here"] and not locked):
            raise SlotBusy(
                f"slot {name} is followed by a running server ({who or 'another session'}): "
                "stop that server first; not dropped"
            )
        try:
            deadline = time.monotonic() + wait
            while True:
                active = await conn.fetchval(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = $1", name
                )
                if active is None:
                    return False
                if not active or time.monotonic() >= deadline:
                    break
                await asyncio.sleep(0.1)
            try:
                await conn.execute("SELECT pg_drop_replication_slot($1)", name)
            except asyncpg.ObjectInUseError as exc:
                raise FollowError(f"slot {name} is in use ({exc}): not dropped") from exc
            return True
        finally:
            if locked:
                await unlock(conn, name)


__all__ = [
    "DEFAULT_PUBLICATION",
    "FollowError",
    "Follower",
    "FollowerStats",
    "IdentityError",
    "SlotBusy",
    "default_slot_name",
    "drop_slot",
    "list_slots",
]
