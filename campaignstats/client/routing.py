"""Replicas and shards for the clients: fail over between replicas, route by shard.

A layer above the single-connection clients, which stay as they are (one URL, one connection,
at most once): :class:`AsyncRoutingClient` holds one :class:`~campaignstats.client.aio.
AsyncStatsClient` per shard, :class:`RoutingClient` one :class:`~campaignstats.client.blocking.
StatsClient`; both take the topology as a list of shards, each a list of replica URLs (or the
string ``"tcp://a:7400,tcp://b:7400;tcp://c:7400"``: shards split by ``;``, replicas by ``,``).

**Routing.** Shard ``k`` of the list is the server started with ``--shard k/N``; every increment
and every call about a campaign goes to :func:`~campaignstats.shards.shard_of` of it, ``stats_many``
is split by owner and joined, ``top`` asks every shard and merges, ``info`` and ``resync`` go to
every shard (docs/scale.md).

**Failover.** A shard's client talks to one replica at a time. When a call or a flush to it
fails for want of a server (:class:`~campaignstats.errors.ServerUnavailable`, a lost or refused
connection, ``overloaded``, or :class:`~campaignstats.errors.CallTimeout`), the shard moves to
the next URL of its list and the call is made again there (each replica once per call; calls
are reads or idempotent); a shard of one URL keeps its client, which reconnects on its own.
Every increment and decrement given to a shard is also kept in its *journal* until a ``flush``
on the replica that received it has come back. A background task (a thread for the blocking
front) flushes every ``ack_interval`` seconds and forgets what was acknowledged. At a failover
the next replica gets what the failed client never sent and the journal's other entries; a
replica found restarted (a new connection, and ``info``'s uptime says a new process) is given
again what went to the process that died. Before its first call on a replica, the client
checks the replica's shard against its place in the topology (:class:`TopologyMismatch`).
Why each of these is safe, and what is not: docs/scale.md, "Failover".

The journal is bounded (``max_unacked``, by default the client's queue size; 0: none): past it,
the oldest entries are forgotten and counted in ``unprotected`` (they are still sent, only not
re-sent at a failover). Custom metrics updates are routed but not journaled.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from campaignstats.client._common import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    DEFAULT_QUEUE_SIZE,
    Backoff,
    Queued,
    RateLimitedLog,
    log,
    parse_url,
)
from campaignstats.client.aio import AsyncStatsClient
from campaignstats.client.blocking import StatsClient
from campaignstats.errors import (
    BadMessage,
    CallTimeout,
    ClientClosed,
    ConnectTimeout,
    Invalid,
    Overloaded,
    ServerUnavailable,
    UsageError,
)
from campaignstats.model import MAX_ID, Increment, WireStats
from campaignstats.sessions.client import Measure
from campaignstats.shards import shard_of

#: seconds between two acknowledging flushes of a shard's journal
DEFAULT_ACK_INTERVAL = 0.25

#: seconds that ``close()`` spends, in all, acknowledging what it can before closing the clients
CLOSE_BUDGET = 2.0

#: how many campaigns' owners a routing client remembers
_OWNERS_KEPT = 1 << 16

#: the errors that mean "this replica is not there": the next one is tried. ``overloaded`` is a
#: replica at its connection limit (or with a full mailbox): it cannot serve this client now.
_GONE = (ServerUnavailable, CallTimeout, ConnectionError, Overloaded)

#: slack on a server's start time computed from ``info``'s ``uptime`` (rounded to 1 ms)
_UPTIME_SLACK = 0.002

_T = TypeVar("_T")
_C = TypeVar("_C", AsyncStatsClient, StatsClient)


class TopologyMismatch(UsageError):
    """A server's ``hello``/``info`` names another shard than its place in the topology."""


def parse_topology(shards: str | Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    """Shards, each a list of replica URLs, from any of the accepted forms (checked: every URL
    parses, no shard is empty, no URL appears twice)."""
    if isinstance(shards, str):
        topology = [[u.strip() for u in part.split(",") if u.strip()] for part in shards.split(";")]
    elif all(isinstance(s, str) for s in shards):
        topology = [[str(u) for u in shards]]  # one shard, its replicas
    else:
        topology = [[str(u) for u in s] for s in shards]
    if not topology or any(not replicas for replicas in topology):
        raise UsageError(f"every shard needs at least one replica URL: {shards!r}")
    seen: set[str] = set()
    for replicas in topology:
        for url in replicas:
            parse_url(url)  # raises UsageError with the reason
            if url in seen:
                raise UsageError(f"{url} appears twice in the topology")
            seen.add(url)
    return topology


def _check_campaign_id(campaign_id: Any) -> None:
    """The single clients' error for a bad id, before the id is hashed."""
    if type(campaign_id) is not int:
        raise BadMessage(f"campaign_id must be an integer, not {campaign_id!r:.40}")
    if not 0 < campaign_id <= MAX_ID:
        raise Invalid(f"ids must be between 1 and 2**63-1 (campaign_id={campaign_id})")


@dataclass(frozen=True, slots=True)
class RoutingStatistics:
    """A routing client's counters at one moment."""

    shards: int
    replicas: list[str]  # the replica each shard talks to now
    unacked: int  # increments kept until a replica acknowledges them
    acknowledged: int  # increments a replica has applied (its flush came back)
    failovers: int
    resent: int  # increments given again: to the next replica, or to a restarted one
    unprotected: int  # forgotten by a full journal (or none kept) before any acknowledgement
    dropped: int  # given up by the replicas' clients (their queue full, or closed)
    server_errors: int  # err replies to casts (e.g. items of another shard)


#: a server process's start, as an interval of this machine's clock (from ``info``'s uptime)
_Started = tuple[float, float]


def _started(info: dict[str, Any], before: float, after: float) -> _Started | None:
    uptime = info.get("uptime")
    if not isinstance(uptime, int | float):
        return None  # an older server: restarts go unnoticed, as before
    return (before - uptime - _UPTIME_SLACK, after - uptime + _UPTIME_SLACK)


class _Shard(Generic[_C]):
    """One shard: its replicas, the client of the one in use, and the journal."""

    def __init__(
        self, index: int, count: int, urls: list[str], make: Callable[[str], _C], max_unacked: int
    ) -> None:
        self.index = index
        self.count = count  # shards in the topology
        self.urls = urls
        self.make: Callable[[str], _C] = make
        self.current = 0
        self.client: _C = make(urls[0])
        self.max_unacked = max_unacked
        self._reset()

    def _reset(self) -> None:
        """The journal and counters empty (a new client, or a forked child's)."""
        #: (number, decrement?, increment) given to the current client, not acknowledged yet
        self.journal: deque[tuple[int, bool, Increment]] = deque()
        self.numbered = 0  # the number of the last change journaled
        self.acknowledged = 0
        self.failovers = 0
        self.resent = 0
        self.unprotected = 0
        #: the counters of the clients failed over from (closed since)
        self.retired_dropped = 0
        self.retired_errors = 0
        self.lock = threading.Lock()  # the blocking front's threads; uncontended in asyncio
        #: the client whose server was checked against the topology (None: check on next use)
        self.verified: _C | None = None
        #: when the server in use started, and the client's ``connections`` when last looked
        self.started: _Started | None = None
        self.seen_connections = 0
        #: replicas left while alive (a timeout, overloaded): their index -> the last number
        #: they were given and when their server had started (None: unknown)
        self.left_alive: dict[int, tuple[int, _Started | None]] = {}
        #: back on such a replica: what it had, until its server is known to be the same
        self.returned: tuple[int, _Started | None] | None = None

    def reset_after_fork(self) -> None:
        """In a forked child: the parent's journal is the parent's to acknowledge."""
        self._reset()

    @property
    def url(self) -> str:
        return self.urls[self.current]

    def _journal(self, entries: Iterable[tuple[bool, Increment]]) -> None:
        """Number and keep changes (the caller holds ``lock``); a full journal forgets its
        oldest (``max_unacked`` 0: keeps none)."""
        journal = self.journal
        number = self.numbered
        limit = self.max_unacked
        for decrement, inc in entries:
            number += 1
            if limit == 0:
                self.unprotected += 1
                continue
            if len(journal) >= limit:
                journal.popleft()
                self.unprotected += 1
            journal.append((number, decrement, inc))
        self.numbered = number

    def put(self, decrement: bool, inc: Increment) -> None:
        """Journal one change and give it to the current replica's client."""
        with self.lock:
            _give(self.client, decrement, inc)  # checked there first: an invalid one raises
            self.numbered = number = self.numbered + 1  # as _journal, inline: the hot path
            limit = self.max_unacked
            journal = self.journal
            if len(journal) >= limit:
                self.unprotected += 1
                if limit == 0:
                    return
                journal.popleft()
            journal.append((number, decrement, inc))

    def put_many(self, items: list[Increment], decrement: bool = False) -> None:
        """Journal changes and give them to the current replica's client, in one go."""
        with self.lock:
            client = self.client
            # checked there first: an invalid one raises
            (client.decrement_many if decrement else client.increment_many)(items)
            self._journal((decrement, inc) for inc in items)

    def check(self, info: dict[str, Any]) -> None:
        """Raise :class:`TopologyMismatch` when the server is not this place's shard."""
        said = info.get("shard")
        expected = [self.index, self.count]
        if said is None and self.count == 1:
            return
        if said != expected:
            raise TopologyMismatch(
                f"{self.url} is shard {'(none)' if said is None else '/'.join(map(str, said))}, "
                f"but the topology lists it as shard {self.index}/{self.count}: fix the order "
                f"of the shards (or N) in the client's topology (docs/scale.md)"
            )

    def verified_by(self, client: _C, info: dict[str, Any], before: float, after: float) -> bool:
        """Record what ``info`` (asked between ``before`` and ``after``) says of the client's
        server; True when it is another process than the one seen last (it restarted)."""
        self.check(info)
        now = _started(info, before, after)
        previous = self.started if self.verified is client else None
        returned, self.returned = self.returned, None
        if returned is not None and self.verified is not client:
            mark, then = returned
            if then is None or now is None or now[1] < then[0] or then[1] < now[0]:
                self._give_again(lambda number: number <= mark, "went back to a replica")
        self.verified = client
        self.started = now if now is not None else previous
        self.seen_connections = client.connections
        return (
            previous is not None
            and now is not None
            and (now[1] < previous[0] or previous[1] < now[0])
        )

    def regive(self, reason: str) -> None:
        """The server in use restarted: give its client again what it may have had only in
        the memory of the process that died (the journal, but what was written on the
        connection in use, or waits to be, went to the new process)."""
        with self.lock:
            client = self.client
            since = client.sent - client.sent_before_connection + len(client._queue)
            entries = list(self.journal)
            if since > 0:
                entries = entries[: max(len(entries) - since, 0)]
            for _, decrement, inc in entries:
                _give(client, decrement, inc)
            self.resent += len(entries)
        log.warning(
            "client.replica_restarted",
            shard=self.index,
            url=self.url,
            resent=len(entries),
            reason=reason,
        )

    def _give_again(self, which: Callable[[int], bool], reason: str) -> None:
        """Give the current client again the journal's entries whose number ``which`` picks
        (a replica that had them restarted, or is not known to be the same process)."""
        with self.lock:
            entries = [e for e in self.journal if which(e[0])]
            for _, decrement, inc in entries:
                _give(self.client, decrement, inc)
            self.resent += len(entries)
        log.warning(
            "client.replica_restarted",
            shard=self.index,
            url=self.url,
            resent=len(entries),
            reason=reason,
        )

    def fail_over(self, failed: _C, error: BaseException) -> bool:
        """Move to the next replica, unless another caller did already (then False). The next
        replica's client gets what the failed one never sent (its queue) and the journal's
        entries that were not in that queue: each once. The caller closes the failed one."""
        with self.lock:
            if self.client is not failed:
                return False
            before, left = self.url, self.current
            self.current = (self.current + 1) % len(self.urls)
            client = self.client = self.make(self.urls[self.current])
            self.verified = None
            unsent = _take_all(failed._queue)
            journal = self.journal
            # The failed client was given every change numbered from its first on, in order;
            # its queue holds the newest of them not written yet. The journal's first number
            # splits them: older ones are moved from the queue, newer ones come from the
            # journal (with those already written, which the dead replica may have lost).
            changes = sum(1 for entry in unsent if not isinstance(entry, Measure))
            self.retired_dropped += failed.dropped
            self.retired_errors += failed.server_errors
            # A replica left alive (slow, or full) may have applied what it was written: what
            # it got is remembered, and not given to it again if it is the same process when
            # the client comes back to it (checked at the first call there).
            if isinstance(error, CallTimeout | Overloaded):
                self.left_alive[left] = (self.numbered - changes, self.started)
            else:
                self.left_alive.pop(left, None)
            self.started = None
            self.returned = self.left_alive.pop(self.current, None)
            mark = 0 if self.returned is None else self.returned[0]
            first = journal[0][0] if journal else self.numbered + 1
            number = self.numbered - changes  # the unsent changes' numbers follow it
            moved: list[Queued] = []
            for entry in unsent:
                if isinstance(entry, Measure):
                    moved.append(entry)
                    continue
                number += 1
                if mark < number < first:  # older than the journal, and not had by the next
                    moved.append(entry)
            client._put(moved)
            given = 0
            for number, decrement, inc in journal:
                if number > mark:
                    _give(client, decrement, inc)
                    given += 1
            self.failovers += 1
            self.resent += given
            log.warning(
                "client.failover",
                shard=self.index,
                failed=before,
                next=self.url,
                resent=given,
                moved=len(moved),
                error=str(error) or type(error).__name__,
            )
            return True

    def acknowledged_up_to(self, number: int) -> None:
        """Every change journaled up to ``number`` was applied by a replica."""
        with self.lock:
            journal = self.journal
            while journal and journal[0][0] <= number:
                journal.popleft()
                self.acknowledged += 1


def _take_all(queue: deque[Queued]) -> list[Queued]:
    """Everything in a client's queue, popped one by one (its sender may be popping too:
    each entry goes to one side only)."""
    taken: list[Queued] = []
    with contextlib.suppress(IndexError):
        while queue:
            taken.append(queue.popleft())
    return taken


def _left_for(client: AsyncStatsClient | StatsClient, deadline: float) -> float:
    """What is left of a close's budget for ``client``'s own close; with (almost) nothing
    left, what it still queues is dropped (counted) here, so that its close does not try one
    more connection in no time."""
    left = max(deadline - time.monotonic(), 0.0)
    if left < 0.01:
        unsent = _take_all(client._queue)
        if unsent:
            client._drop(len(unsent), "client.closed")
    return left


def _give(client: AsyncStatsClient | StatsClient, decrement: bool, inc: Increment) -> None:
    send = client.decrement if decrement else client.increment
    send(
        inc.campaign_id,
        inc.org_id,
        inc.action_type,
        inc.area,
        inc.new_supporter,
        inc.count,
        inc.action_id,
        txid=inc.txid,
        at=inc.at,
        page=inc.page,
        messages=inc.messages,
    )


class _Routing(Generic[_C]):
    """What both fronts share: the topology, the owner of a campaign, the counters."""

    _shards: list[_Shard[_C]]
    _closing: bool

    def _setup(
        self,
        shards: str | Sequence[str] | Sequence[Sequence[str]],
        make: Callable[[str], _C],
        max_unacked: int,
    ) -> None:
        if type(max_unacked) is not int or max_unacked < 0:
            raise UsageError(f"max_unacked must be 0 (no journal) or more, not {max_unacked!r}")
        topology = parse_topology(shards)
        n = len(topology)
        self._shards = [_Shard(k, n, urls, make, max_unacked) for k, urls in enumerate(topology)]
        #: owners computed so far (each costs N hashes); cleared when it grows past a bound
        self._owners: dict[int, int] = {}
        self._warn = RateLimitedLog().warning
        self._closing = False  # close() has begun: nothing starts the acknowledgements again

    def _start(self) -> None:
        """Start acknowledging (the front's task or thread), if not started yet."""
        raise NotImplementedError

    @property
    def shard_count(self) -> int:
        return len(self._shards)

    def _owner(self, campaign_id: int) -> _Shard[_C]:
        return self._shards[self._index(campaign_id)]

    def _index(self, campaign_id: int) -> int:
        owners = self._owners
        k = owners.get(campaign_id)
        if k is None or type(campaign_id) is not int:
            _check_campaign_id(campaign_id)  # before hashing: the single clients' errors
            if len(owners) >= _OWNERS_KEPT:
                owners.clear()
            k = owners[campaign_id] = shard_of(campaign_id, len(self._shards))
        return k

    def _groups(self, campaign_ids: Iterable[int]) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = {}
        index = self._index
        for cid in campaign_ids:
            groups.setdefault(index(cid), []).append(cid)
        return groups

    def increment(
        self,
        campaign_id: int,
        org_id: int,
        action_type: str,
        area: str | None = None,
        new_supporter: bool = False,
        count: int = 1,
        action_id: int | None = None,
        *,
        txid: int | None = None,
        at: float | None = None,
        page: int | None = None,
        messages: int = 0,
    ) -> None:
        """Count one action at its campaign's shard (as the single client's ``increment``:
        returns at once, never raises because a server is down)."""
        inc = Increment(
            campaign_id,
            org_id,
            action_type,
            area,
            new_supporter,
            count,
            action_id,
            txid,
            at,
            page,
            messages,
        )
        shard = self._owner(campaign_id)
        self._start()
        shard.put(False, inc)

    def decrement(
        self,
        campaign_id: int,
        org_id: int,
        action_type: str,
        area: str | None = None,
        new_supporter: bool = False,
        count: int = 1,
        action_id: int | None = None,
        *,
        txid: int | None = None,
        at: float | None = None,
        page: int | None = None,
        messages: int = 0,
    ) -> None:
        """Take one action back at its campaign's shard."""
        inc = Increment(
            campaign_id,
            org_id,
            action_type,
            area,
            new_supporter,
            count,
            action_id,
            txid,
            at,
            page,
            messages,
        )
        shard = self._owner(campaign_id)
        self._start()
        shard.put(True, inc)

    def increment_many(self, increments: Iterable[Increment]) -> None:
        """Many increments, each to its owner (one batch per shard). An invalid one raises,
        and its shard's batch is not queued (those of other shards may be)."""
        self._put_many(increments, False)

    def decrement_many(self, decrements: Iterable[Increment]) -> None:
        """Many decrements, each to its owner, journaled as decrements (as
        :meth:`increment_many`)."""
        self._put_many(decrements, True)

    def _put_many(self, changes: Iterable[Increment], decrement: bool) -> None:
        shards = self._shards
        if len(shards) == 1:
            self._start()
            shards[0].put_many(list(changes), decrement)
            return
        groups: list[list[Increment]] = [[] for _ in shards]
        index = self._index
        for i, inc in enumerate(changes):
            if type(inc) is not Increment:
                raise UsageError(f"item {i} is a {type(inc).__name__}, not an Increment")
            groups[index(inc.campaign_id)].append(inc)
        self._start()
        for shard, group in zip(shards, groups, strict=True):
            if group:
                shard.put_many(group, decrement)

    def subscribe(self, campaign_id: int) -> Any:
        """Updates of ``campaign_id``, from its owner's replica in use now (the subscription of
        the single client: it follows that client's reconnections, not a failover)."""
        return self._owner(campaign_id).client.subscribe(campaign_id)

    def metric(self, campaign_id: int, **update: Any) -> None:
        """A custom metrics update, to its campaign's shard (routed, not journaled; one not
        sent yet moves with a failover)."""
        self._owner(campaign_id).client.metric(campaign_id, **update)

    def statistics(self) -> RoutingStatistics:
        shards = self._shards
        return RoutingStatistics(
            shards=len(shards),
            replicas=[s.url for s in shards],
            unacked=sum(len(s.journal) for s in shards),
            acknowledged=sum(s.acknowledged for s in shards),
            failovers=sum(s.failovers for s in shards),
            resent=sum(s.resent for s in shards),
            unprotected=sum(s.unprotected for s in shards),
            dropped=sum(s.client.dropped + s.retired_dropped for s in shards),
            server_errors=sum(s.client.server_errors + s.retired_errors for s in shards),
        )


async def _flush_async(client: AsyncStatsClient) -> None:
    await client.flush()


def _flush_blocking(client: StatsClient) -> None:
    client.flush()


def _merge_top(results: Iterable[list[list[int]]], limit: int) -> list[list[int]]:
    """The leading campaigns of several shards (each list highest first), highest first, ties
    by the lower campaign id (as one server orders them)."""
    merged = heapq.merge(*results, key=lambda pair: (-pair[1], pair[0]))
    return [list(pair) for _, pair in zip(range(limit), merged, strict=False)]


def _page_answer(results: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """A page's STATS from every shard's answer: a page lives on its campaign's owner, the one
    that names a campaign (``campaign_id`` non-zero); zeros when none does (docs/scale.md)."""
    answers = list(results)
    for answer in answers:
        if answer.get("campaign_id"):
            return answer
    return answers[0]  # every shard says it does not know the page: its zeros


def _org_sum(results: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """An org's rollup from every shard's: each shard holds its own campaigns, so the
    ``supporters`` and ``actions`` add up and ``campaigns`` is the union (docs/scale.md)."""
    supporters = actions = 0
    campaigns: dict[Any, int] = {}
    for part in results:
        supporters += part["supporters"]
        actions += part["actions"]
        campaigns.update(part["campaigns"])
    return {
        "supporters": supporters,
        "actions": actions,
        "campaigns": dict(sorted(campaigns.items())),
    }


# -- asyncio ----------------------------------------------------------------------------------


class AsyncRoutingClient(_Routing[AsyncStatsClient]):
    """Replicas and shards for asyncio code; the calls of :class:`AsyncStatsClient`.

        async with AsyncRoutingClient([["tcp://a:7400", "tcp://b:7400"], ["tcp://c:7400"]]) as c:
            c.increment(1, 2, "register", new_supporter=True)
            print(await c.stats(1))

    ``client_options`` go to each replica's :class:`AsyncStatsClient` (``token``, ``timeout``,
    ``queue_size``...).
    """

    def __init__(
        self,
        shards: str | Sequence[str] | Sequence[Sequence[str]],
        *,
        ack_interval: float = DEFAULT_ACK_INTERVAL,
        max_unacked: int | None = None,
        backoff_min: float = BACKOFF_MIN,
        backoff_max: float = BACKOFF_MAX,
        **client_options: Any,
    ) -> None:
        size = client_options.get("queue_size", DEFAULT_QUEUE_SIZE)
        self._setup(
            shards,
            lambda url: AsyncStatsClient(url, **client_options),
            size if max_unacked is None else max_unacked,
        )
        self.ack_interval = ack_interval
        self._backoff = (backoff_min, backoff_max)
        self._acker: asyncio.Task[None] | None = None
        self._closed = False

    async def __aenter__(self) -> AsyncRoutingClient:
        self._start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _start(self) -> None:
        if self._acker is None and not self._closing:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # outside of a loop: started by the first call or ``async with``
            self._acker = loop.create_task(self._ack_loop(), name="campaignstats-routing-acks")

    async def _ack_loop(self) -> None:
        """Acknowledge each shard's journal now and then; a replica found gone is failed over
        from by the flush itself. Waits with backoff while a shard has no replica at all."""
        backoff = Backoff(*self._backoff)
        delay = self.ack_interval
        while True:
            await asyncio.sleep(delay)  # first: what was just given has not arrived yet
            delay = self.ack_interval
            for shard in self._shards:
                if not shard.journal:
                    continue
                try:
                    await self._acknowledge(shard)
                    backoff.reset()
                except _GONE as exc:
                    delay = max(delay, backoff.next())
                    self._warn(
                        "client.no_replica", shard=shard.index, error=str(exc), retry_in=delay
                    )
                except ClientClosed:
                    return
                except TopologyMismatch as exc:  # every call raises it too: said now and then
                    self._warn("client.topology_mismatch", shard=shard.index, error=str(exc))
                except Exception:
                    log.exception("client.acknowledge_failed", shard=shard.index)

    async def _verify(self, shard: _Shard[AsyncStatsClient], client: AsyncStatsClient) -> bool:
        """Ask the client's server what it is (topology, start time); True if it restarted
        since last asked."""
        before = time.time()
        info = await client.info()
        return shard.verified_by(client, info, before, time.time())

    async def _on_shard(
        self, shard: _Shard[AsyncStatsClient], call: Callable[[AsyncStatsClient], Awaitable[_T]]
    ) -> _T:
        """``call`` on the shard's replica; on the next one when it is gone (each once). A
        shard of one URL keeps its client, which reconnects on its own: the server that did
        not answer in time may well have applied what it was given (docs/scale.md)."""
        if self._closed:
            raise ClientClosed("the client is closed")
        self._start()
        error: BaseException | None = None
        for _ in range(len(shard.urls)):
            client = shard.client
            try:
                if shard.verified is not client:
                    await self._verify(shard, client)
                return await call(client)
            except _GONE as exc:
                error = exc
                if len(shard.urls) == 1 or self._closed:
                    break
                if shard.fail_over(client, exc):
                    await client.close(timeout=0)
        raise ServerUnavailable(
            f"no replica of shard {shard.index} answered ({', '.join(shard.urls)}): {error}"
        ) from error

    async def _acknowledge(self, shard: _Shard[AsyncStatsClient]) -> None:
        client = shard.client
        number = shard.numbered  # a flush covers what its client was given before it
        await self._on_shard(shard, _flush_async)
        # Reconnected since last looked at: to the same process, or to one that started since,
        # without what the dead one had not applied.
        reconnected = shard.client is client and client.connections != shard.seen_connections
        if reconnected and await self._verify(shard, client):
            shard.regive("reconnected to a server that restarted")
            number = shard.numbered
            await self._on_shard(shard, _flush_async)
        shard.acknowledged_up_to(number)

    async def flush(self) -> None:
        """Return once every shard has applied everything given to it before the call
        (failing over as needed); raises :class:`ServerUnavailable` if a shard has none left,
        :class:`TopologyMismatch` if a server is not the shard the topology says."""
        await asyncio.gather(*(self._acknowledge(s) for s in self._shards))

    async def _on_owner(
        self, campaign_id: int, call: Callable[[AsyncStatsClient], Awaitable[_T]]
    ) -> _T:
        return await self._on_shard(self._owner(campaign_id), call)

    async def stats(self, campaign_id: int, **kw: Any) -> WireStats:
        return await self._on_owner(campaign_id, lambda c: c.stats(campaign_id, **kw))

    async def stats_many(self, campaign_ids: Iterable[int], **kw: Any) -> dict[int, WireStats]:
        """Split by owner, asked at the same time, joined."""
        groups = self._groups(campaign_ids)

        def ask(ids: list[int]) -> Callable[[AsyncStatsClient], Awaitable[dict[int, WireStats]]]:
            return lambda c: c.stats_many(ids, **kw)

        parts = await asyncio.gather(
            *(self._on_shard(self._shards[k], ask(ids)) for k, ids in groups.items())
        )
        return {cid: st for part in parts for cid, st in part.items()}

    async def page_stats(self, page_id: int, **kw: Any) -> dict[str, Any]:
        """Every shard asked (the client does not know a page's campaign); the answer of the
        shard that knows the page, zeros when none does."""
        return _page_answer(
            await asyncio.gather(
                *(self._on_shard(s, lambda c: c.page_stats(page_id, **kw)) for s in self._shards)
            )
        )

    async def org_stats(self, org_id: int, **kw: Any) -> dict[str, Any]:
        """Every shard's rollup of the org, added up."""
        return _org_sum(
            await asyncio.gather(
                *(self._on_shard(s, lambda c: c.org_stats(org_id, **kw)) for s in self._shards)
            )
        )

    async def history(self, campaign_id: int, *args: Any, **kw: Any) -> dict[str, Any]:
        return await self._on_owner(campaign_id, lambda c: c.history(campaign_id, *args, **kw))

    async def recent(self, campaign_id: int, *args: Any, **kw: Any) -> dict[str, Any]:
        return await self._on_owner(campaign_id, lambda c: c.recent(campaign_id, *args, **kw))

    async def metrics(self, campaign_id: int, **kw: Any) -> dict[str, Any]:
        return await self._on_owner(campaign_id, lambda c: c.metrics(campaign_id, **kw))

    async def set_goals(self, campaign_id: int, *args: Any, **kw: Any) -> None:
        """Replace a campaign's goals (as :meth:`AsyncStatsClient.set_goals`) on EVERY replica
        of its owner: each replica fires the milestones itself, so each must hold the same goals
        (docs/scale.md). The replica in use first; a replica that cannot be reached then raises
        :class:`ServerUnavailable` naming it, after the others are set (call again: setting
        goals is idempotent)."""
        shard = self._owner(campaign_id)
        await self._on_shard(shard, lambda c: c.set_goals(campaign_id, *args, **kw))
        missed: list[str] = []
        for url in shard.urls:
            if url == shard.url:
                continue
            other = shard.make(url)
            try:
                await other.set_goals(campaign_id, *args, **kw)
            except (ServerUnavailable, ConnectTimeout, CallTimeout):
                missed.append(url)
            finally:
                await other.close(timeout=0.5)
        if missed:
            raise ServerUnavailable(f"goals of campaign {campaign_id} not set on {missed}")

    async def get_goals(self, campaign_id: int, **kw: Any) -> dict[str, Any]:
        return await self._on_owner(campaign_id, lambda c: c.get_goals(campaign_id, **kw))

    async def reset_metrics(self, campaign_id: int, *args: Any, **kw: Any) -> bool:
        return await self._on_owner(
            campaign_id, lambda c: c.reset_metrics(campaign_id, *args, **kw)
        )

    async def set_guard(self, campaign_id: int, name: str, **kw: Any) -> dict[str, float | None]:
        return await self._on_owner(campaign_id, lambda c: c.set_guard(campaign_id, name, **kw))

    async def ping(self, **kw: Any) -> float:
        """A round trip to every shard at once; the longest, in seconds."""
        times = await asyncio.gather(
            *(self._on_shard(s, lambda c: c.ping(**kw)) for s in self._shards)
        )
        return max(times)

    async def top(self, by: str = "supporters", limit: int = 10, **kw: Any) -> list[list[int]]:
        """Every shard's leaders, merged."""
        parts = await asyncio.gather(
            *(self._on_shard(s, lambda c: c.top(by, limit, **kw)) for s in self._shards)
        )
        return _merge_top(parts, limit)

    async def info(self, **kw: Any) -> list[dict[str, Any]]:
        """Each shard's ``info`` (of the replica it talks to), in shard order."""
        return list(
            await asyncio.gather(*(self._on_shard(s, lambda c: c.info(**kw)) for s in self._shards))
        )

    async def resync(self, scope: str | Iterable[int] = "all", **kw: Any) -> bool:
        """A calculation on every shard; True if one started on each."""
        ids = None if isinstance(scope, str) else list(scope)
        started = await asyncio.gather(
            *(
                self._on_shard(s, lambda c: c.resync(scope if ids is None else ids, **kw))
                for s in self._shards
            )
        )
        return all(started)

    async def close(self) -> None:
        """Acknowledge what can be (for at most :data:`CLOSE_BUDGET` seconds in all), then
        close every client. Never raises because servers are slow or gone."""
        if self._closed or self._closing:
            return
        self._closing = True  # the last flush must not start the acknowledgements again
        deadline = time.monotonic() + CLOSE_BUDGET
        try:
            acker, self._acker = self._acker, None
            if acker is not None:
                acker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await acker
            if any(shard.journal for shard in self._shards):
                try:
                    async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                        await self.flush()
                except (*_GONE, TimeoutError, TopologyMismatch) as exc:
                    log.warning(
                        "client.close_unacknowledged",
                        unacked=sum(len(s.journal) for s in self._shards),
                        error=str(exc) or type(exc).__name__,
                    )
        finally:
            self._closed = True
            for shard in self._shards:
                left = _left_for(shard.client, deadline)
                with contextlib.suppress(Exception):
                    await shard.client.close(timeout=min(left, 0.5))


# -- threads ----------------------------------------------------------------------------------

_live: weakref.WeakSet[RoutingClient] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for client in list(_live):
        client._reset_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class RoutingClient(_Routing[StatsClient]):
    """Replicas and shards for threaded code; the calls of :class:`StatsClient`.

    A daemon thread acknowledges the journals every ``ack_interval`` seconds (started with the
    first increment or call); calls run on the caller's thread. In a forked child (gunicorn
    ``--preload``) the client starts again with empty journals and no thread: the parent's
    journal is the parent's to acknowledge, and a thread starts with the child's first call.
    """

    def __init__(
        self,
        shards: str | Sequence[str] | Sequence[Sequence[str]],
        *,
        ack_interval: float = DEFAULT_ACK_INTERVAL,
        max_unacked: int | None = None,
        backoff_min: float = BACKOFF_MIN,
        backoff_max: float = BACKOFF_MAX,
        **client_options: Any,
    ) -> None:
        size = client_options.get("queue_size", DEFAULT_QUEUE_SIZE)
        self._setup(
            shards,
            lambda url: StatsClient(url, **client_options),
            size if max_unacked is None else max_unacked,
        )
        self.ack_interval = ack_interval
        self._backoff = (backoff_min, backoff_max)
        self._init_threading()
        self._closed = False
        _live.add(self)

    def _init_threading(self) -> None:
        self._stop = threading.Event()
        self._acker: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def _reset_after_fork(self) -> None:
        """In a forked child: no thread (the parent's does not exist here), new locks, and
        empty journals and counters (the single clients reset themselves likewise)."""
        self._init_threading()
        for shard in self._shards:
            shard.reset_after_fork()

    def __enter__(self) -> RoutingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        if self._acker is not None or self._closing:
            return
        with self._start_lock:
            if self._acker is None and not self._closing:
                self._acker = threading.Thread(
                    target=self._ack_loop, name="campaignstats-routing-acks", daemon=True
                )
                self._acker.start()

    def _ack_loop(self) -> None:
        backoff = Backoff(*self._backoff)
        delay = self.ack_interval
        stop = self._stop
        while not stop.wait(delay):
            delay = self.ack_interval
            for shard in self._shards:
                if not shard.journal or stop.is_set():
                    continue
                try:
                    self._acknowledge(shard)
                    backoff.reset()
                except _GONE as exc:
                    delay = max(delay, backoff.next())
                    self._warn(
                        "client.no_replica", shard=shard.index, error=str(exc), retry_in=delay
                    )
                except ClientClosed:
                    return
                except TopologyMismatch as exc:  # every call raises it too: said now and then
                    self._warn("client.topology_mismatch", shard=shard.index, error=str(exc))
                except Exception:
                    log.exception("client.acknowledge_failed", shard=shard.index)

    def _verify(self, shard: _Shard[StatsClient], client: StatsClient) -> bool:
        before = time.time()
        info = client.info()
        return shard.verified_by(client, info, before, time.time())

    def _on_shard(self, shard: _Shard[StatsClient], call: Callable[[StatsClient], _T]) -> _T:
        if self._closed:
            raise ClientClosed("the client is closed")
        self._start()
        error: BaseException | None = None
        for _ in range(len(shard.urls)):
            client = shard.client
            try:
                if shard.verified is not client:
                    self._verify(shard, client)
                return call(client)
            except _GONE as exc:
                error = exc
                if len(shard.urls) == 1 or self._closing:
                    break
                if shard.fail_over(client, exc):
                    client.close(timeout=0)
        raise ServerUnavailable(
            f"no replica of shard {shard.index} answered ({', '.join(shard.urls)}): {error}"
        ) from error

    def _acknowledge(self, shard: _Shard[StatsClient]) -> None:
        client = shard.client
        number = shard.numbered  # a flush covers what its client was given before it
        self._on_shard(shard, _flush_blocking)
        reconnected = shard.client is client and client.connections != shard.seen_connections
        if reconnected and self._verify(shard, client):
            shard.regive("reconnected to a server that restarted")
            number = shard.numbered
            self._on_shard(shard, _flush_blocking)
        shard.acknowledged_up_to(number)

    def flush(self) -> None:
        """Return once every shard has applied everything given to it before the call."""
        for shard in self._shards:
            self._acknowledge(shard)

    def _on_owner(self, campaign_id: int, call: Callable[[StatsClient], _T]) -> _T:
        return self._on_shard(self._owner(campaign_id), call)

    def stats(self, campaign_id: int, **kw: Any) -> WireStats:
        return self._on_owner(campaign_id, lambda c: c.stats(campaign_id, **kw))

    def stats_many(self, campaign_ids: Iterable[int], **kw: Any) -> dict[int, WireStats]:
        """Split by owner and joined (one shard after the other)."""
        result: dict[int, WireStats] = {}
        for k, ids in self._groups(campaign_ids).items():
            result.update(self._on_shard(self._shards[k], lambda c: c.stats_many(ids, **kw)))  # noqa: B023
        return result

    def page_stats(self, page_id: int, **kw: Any) -> dict[str, Any]:
        """Every shard asked (the client does not know a page's campaign); the answer of the
        shard that knows the page, zeros when none does."""
        return _page_answer(
            self._on_shard(s, lambda c: c.page_stats(page_id, **kw)) for s in self._shards
        )

    def org_stats(self, org_id: int, **kw: Any) -> dict[str, Any]:
        """Every shard's rollup of the org, added up."""
        return _org_sum(
            self._on_shard(s, lambda c: c.org_stats(org_id, **kw)) for s in self._shards
        )

    def history(self, campaign_id: int, *args: Any, **kw: Any) -> dict[str, Any]:
        return self._on_owner(campaign_id, lambda c: c.history(campaign_id, *args, **kw))

    def recent(self, campaign_id: int, *args: Any, **kw: Any) -> dict[str, Any]:
        return self._on_owner(campaign_id, lambda c: c.recent(campaign_id, *args, **kw))

    def metrics(self, campaign_id: int, **kw: Any) -> dict[str, Any]:
        return self._on_owner(campaign_id, lambda c: c.metrics(campaign_id, **kw))

    def set_goals(self, campaign_id: int, *args: Any, **kw: Any) -> None:
        """Replace a campaign's goals (as :meth:`StatsClient.set_goals`) on EVERY replica of
        its owner, as :meth:`AsyncRoutingClient.set_goals` does."""
        shard = self._owner(campaign_id)
        self._on_shard(shard, lambda c: c.set_goals(campaign_id, *args, **kw))
        missed: list[str] = []
        for url in shard.urls:
            if url == shard.url:
                continue
            other = shard.make(url)
            try:
                other.set_goals(campaign_id, *args, **kw)
            except (ServerUnavailable, ConnectTimeout, CallTimeout):
                missed.append(url)
            finally:
                other.close(timeout=0.5)
        if missed:
            raise ServerUnavailable(f"goals of campaign {campaign_id} not set on {missed}")

    def get_goals(self, campaign_id: int, **kw: Any) -> dict[str, Any]:
        return self._on_owner(campaign_id, lambda c: c.get_goals(campaign_id, **kw))

    def reset_metrics(self, campaign_id: int, *args: Any, **kw: Any) -> bool:
        return self._on_owner(campaign_id, lambda c: c.reset_metrics(campaign_id, *args, **kw))

    def set_guard(self, campaign_id: int, name: str, **kw: Any) -> dict[str, float | None]:
        return self._on_owner(campaign_id, lambda c: c.set_guard(campaign_id, name, **kw))

    def ping(self, **kw: Any) -> float:
        """A round trip to every shard, one after the other; the longest, in seconds."""
        return max(self._on_shard(s, lambda c: c.ping(**kw)) for s in self._shards)

    def top(self, by: str = "supporters", limit: int = 10, **kw: Any) -> list[list[int]]:
        parts = [self._on_shard(s, lambda c: c.top(by, limit, **kw)) for s in self._shards]
        return _merge_top(parts, limit)

    def info(self, **kw: Any) -> list[dict[str, Any]]:
        return [self._on_shard(s, lambda c: c.info(**kw)) for s in self._shards]

    def resync(self, scope: str | Iterable[int] = "all", **kw: Any) -> bool:
        ids = None if isinstance(scope, str) else list(scope)
        return all(
            self._on_shard(s, lambda c: c.resync(scope if ids is None else ids, **kw))
            for s in self._shards
        )

    def close(self) -> None:
        """Stop acknowledging, acknowledge what can be, close every client: all of it within
        :data:`CLOSE_BUDGET` seconds (the acknowledging thread is not waited for past it, a
        hung replica is not failed over from). Never raises because servers are slow or gone."""
        if self._closed or self._closing:
            return
        self._closing = True
        _live.discard(self)
        deadline = time.monotonic() + CLOSE_BUDGET

        def remaining() -> float:
            return max(deadline - time.monotonic(), 0.0)

        try:
            self._stop.set()
            acker = self._acker
            if acker is not None and acker is not threading.current_thread():
                acker.join(remaining())
            for shard in self._shards:
                left = remaining()
                if not shard.journal or left <= 0:
                    continue
                number = shard.numbered
                try:
                    shard.client.flush(timeout=left)
                except (*_GONE, ClientClosed) as exc:
                    log.warning(
                        "client.close_unacknowledged",
                        shard=shard.index,
                        unacked=len(shard.journal),
                        error=str(exc) or type(exc).__name__,
                    )
                else:
                    shard.acknowledged_up_to(number)
        finally:
            self._closed = True
            for shard in self._shards:
                left = _left_for(shard.client, deadline)
                with contextlib.suppress(Exception):
                    shard.client.close(timeout=min(left, 0.5))


__all__ = [
    "CLOSE_BUDGET",
    "DEFAULT_ACK_INTERVAL",
    "AsyncRoutingClient",
    "RoutingClient",
    "RoutingStatistics",
    "TopologyMismatch",
    "parse_topology",
]
