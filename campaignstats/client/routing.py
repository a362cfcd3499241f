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
connection, or :class:`~campaignstats.errors.CallTimeout`), the shard moves to the next URL of
its list and the call is made again there (each replica once per call; calls are reads or
idempotent). Increments are never lost on the way: every increment and decrement given to a
shard is also kept in its *journal* until a ``flush`` on the replica that received it has come
back (the server has applied everything before it). A background task (a thread for the
blocking front) flushes every ``ack_interval`` seconds and forgets what was acknowledged; at a
failover the whole journal, acknowledged by nobody, is given to the next replica. What the
dead replica applied died with it. The next replica may already hold some of those changes
(from its own follower of the database): why that is safe with ``txid`` or ``action_id``, and
what is not without them, is in docs/scale.md, "Failover".

The journal is bounded (``max_unacked``, by default the client's queue size): past it, the
oldest entries are forgotten and counted in ``unprotected`` (they are still sent, only not
re-sent at a failover). Custom metrics updates are routed but not journaled.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from campaignstats.client._common import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    DEFAULT_QUEUE_SIZE,
    Backoff,
    RateLimitedLog,
    log,
    parse_url,
)
from campaignstats.client.aio import AsyncStatsClient
from campaignstats.client.blocking import StatsClient
from campaignstats.errors import CallTimeout, ClientClosed, ServerUnavailable, UsageError
from campaignstats.model import Increment, WireStats
from campaignstats.shards import group_by_shard, shard_of

#: seconds between two acknowledging flushes of a shard's journal
DEFAULT_ACK_INTERVAL = 0.25

#: how many campaigns' owners a routing client remembers
_OWNERS_KEPT = 1 << 16

#: the errors that mean "this replica is not there": the next one is tried
_GONE = (ServerUnavailable, CallTimeout, ConnectionError)

_T = TypeVar("_T")
_C = TypeVar("_C", AsyncStatsClient, StatsClient)


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


@dataclass(frozen=True, slots=True)
class RoutingStatistics:
    """A routing client's counters at one moment."""

    shards: int
    replicas: list[str]  # the replica each shard talks to now
    unacked: int  # increments kept until a replica acknowledges them
    acknowledged: int  # increments a replica has applied (its flush came back)
    failovers: int
    resent: int  # increments given again to the next replica at failovers
    unprotected: int  # forgotten by a full journal before any acknowledgement
    dropped: int  # given up by the replicas' clients (their queue full, or closed)
    server_errors: int  # err replies to casts (e.g. wrong_shard items)


class _Shard(Generic[_C]):
    """One shard: its replicas, the client of the one in use, and the journal."""

    def __init__(
        self, index: int, urls: list[str], make: Callable[[str], _C], max_unacked: int
    ) -> None:
        self.index = index
        self.urls = urls
        self.make: Callable[[str], _C] = make
        self.current = 0
        self.client: _C = make(urls[0])
        #: (number, decrement?, increment) given to the current client, not acknowledged yet
        self.journal: deque[tuple[int, bool, Increment]] = deque()
        self.numbered = 0  # the number of the last change journaled
        self.max_unacked = max_unacked
        self.acknowledged = 0
        self.failovers = 0
        self.resent = 0
        self.unprotected = 0
        #: the counters of the clients failed over from (closed since)
        self.retired_dropped = 0
        self.retired_errors = 0
        self.lock = threading.Lock()  # the blocking front's threads; uncontended in asyncio

    @property
    def url(self) -> str:
        return self.urls[self.current]

    def put(self, decrement: bool, inc: Increment) -> None:
        """Journal one change and give it to the current replica's client."""
        with self.lock:
            _give(self.client, decrement, inc)  # checked there first: an invalid one raises
            journal = self.journal
            if len(journal) >= self.max_unacked:
                journal.popleft()
                self.unprotected += 1
            self.numbered += 1
            journal.append((self.numbered, decrement, inc))

    def put_many(self, items: list[Increment]) -> None:
        """Journal increments and give them to the current replica's client, in one go."""
        with self.lock:
            self.client.increment_many(items)  # checked there first: an invalid one raises
            journal = self.journal
            number = self.numbered
            journal.extend((number + i, False, inc) for i, inc in enumerate(items, 1))
            self.numbered = number + len(items)
            excess = len(journal) - self.max_unacked
            for _ in range(max(excess, 0)):
                journal.popleft()
            self.unprotected += max(excess, 0)

    def fail_over(self, failed: _C, error: BaseException) -> bool:
        """Move to the next replica, unless another caller did already (then False), and give
        it the journal. The failed client's queue is dropped (the journal holds all of it): the
        caller closes it."""
        with self.lock:
            if self.client is not failed:
                return False
            before = self.url
            self.current = (self.current + 1) % len(self.urls)
            self.client = self.make(self.urls[self.current])
            failed._queue.clear()  # re-sent from the journal instead
            self.retired_dropped += failed.dropped
            self.retired_errors += failed.server_errors
            for _, decrement, inc in self.journal:
                _give(self.client, decrement, inc)
            self.failovers += 1
            self.resent += len(self.journal)
            log.warning(
                "client.failover",
                shard=self.index,
                failed=before,
                next=self.url,
                resent=len(self.journal),
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

    def _setup(
        self,
        shards: str | Sequence[str] | Sequence[Sequence[str]],
        make: Callable[[str], _C],
        max_unacked: int,
    ) -> None:
        topology = parse_topology(shards)
        self._shards = [_Shard(k, urls, make, max_unacked) for k, urls in enumerate(topology)]
        #: owners computed so far (each costs N hashes); cleared when it grows past a bound
        self._owners: dict[int, int] = {}
        self._warn = RateLimitedLog().warning

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
        if k is None:
            if len(owners) >= _OWNERS_KEPT:
                owners.clear()
            k = owners[campaign_id] = shard_of(campaign_id, len(self._shards))
        return k

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
        self._start()
        self._owner(campaign_id).put(False, inc)

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
        self._start()
        self._owner(campaign_id).put(True, inc)

    def increment_many(self, increments: Iterable[Increment]) -> None:
        """Many increments, each to its owner (one batch per shard). An invalid one raises,
        and its shard's batch is not queued (those of other shards may be)."""
        self._start()
        shards = self._shards
        if len(shards) == 1:
            shards[0].put_many(list(increments))
            return
        groups: list[list[Increment]] = [[] for _ in shards]
        index = self._index
        for inc in increments:
            groups[index(inc.campaign_id)].append(inc)
        for shard, group in zip(shards, groups, strict=True):
            if group:
                shard.put_many(group)

    def subscribe(self, campaign_id: int) -> Any:
        """Updates of ``campaign_id``, from its owner's replica in use now (the subscription of
        the single client: it follows that client's reconnections, not a failover)."""
        return self._owner(campaign_id).client.subscribe(campaign_id)

    def metric(self, campaign_id: int, **update: Any) -> None:
        """A custom metrics update, to its campaign's shard (routed, not journaled)."""
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


async def _stats_many(client: AsyncStatsClient, ids: list[int], **kw: Any) -> dict[int, WireStats]:
    return await client.stats_many(ids, **kw)


def _merge_top(results: Iterable[list[list[int]]], limit: int) -> list[list[int]]:
    """The leading campaigns of several shards (each list highest first), highest first."""
    merged = heapq.merge(*results, key=lambda pair: -pair[1])
    return [list(pair) for _, pair in zip(range(limit), merged, strict=False)]


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
        if self._acker is None and not self._closed:
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
                except Exception:
                    log.exception("client.acknowledge_failed", shard=shard.index)

    async def _on_shard(
        self, shard: _Shard[AsyncStatsClient], call: Callable[[AsyncStatsClient], Awaitable[_T]]
    ) -> _T:
        """``call`` on the shard's replica; on the next one when it is gone (each once)."""
        if self._closed:
            raise ClientClosed("the client is closed")
        self._start()
        error: BaseException | None = None
        for _ in range(len(shard.urls)):
            client = shard.client
            try:
                return await call(client)
            except _GONE as exc:
                error = exc
                if shard.fail_over(client, exc):
                    await client.close(timeout=0)
        raise ServerUnavailable(
            f"no replica of shard {shard.index} answered ({', '.join(shard.urls)}): {error}"
        )

    async def _acknowledge(self, shard: _Shard[AsyncStatsClient]) -> None:
        number = shard.numbered  # a flush covers what its client was given before it
        await self._on_shard(shard, _flush_async)
        shard.acknowledged_up_to(number)

    async def flush(self) -> None:
        """Return once every shard has applied everything given to it before the call
        (failing over as needed); raises :class:`ServerUnavailable` if a shard has none left."""
        await asyncio.gather(*(self._acknowledge(s) for s in self._shards))

    async def stats(self, campaign_id: int, **kw: Any) -> WireStats:
        return await self._on_shard(self._owner(campaign_id), lambda c: c.stats(campaign_id, **kw))

    async def stats_many(self, campaign_ids: Iterable[int], **kw: Any) -> dict[int, WireStats]:
        """Split by owner, asked at the same time, joined."""
        groups = group_by_shard(campaign_ids, len(self._shards))
        parts = await asyncio.gather(
            *(
                self._on_shard(self._shards[k], functools.partial(_stats_many, ids=ids, **kw))
                for k, ids in groups.items()
            )
        )
        return {cid: st for part in parts for cid, st in part.items()}

    async def history(self, campaign_id: int, *args: Any, **kw: Any) -> dict[str, Any]:
        return await self._on_shard(
            self._owner(campaign_id), lambda c: c.history(campaign_id, *args, **kw)
        )

    async def recent(self, campaign_id: int, *args: Any, **kw: Any) -> dict[str, Any]:
        return await self._on_shard(
            self._owner(campaign_id), lambda c: c.recent(campaign_id, *args, **kw)
        )

    async def metrics(self, campaign_id: int, **kw: Any) -> dict[str, Any]:
        return await self._on_shard(
            self._owner(campaign_id), lambda c: c.metrics(campaign_id, **kw)
        )

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
        """Acknowledge what can be (briefly), then close every client."""
        if self._closed:
            return
        acker, self._acker = self._acker, None
        if acker is not None:
            acker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await acker
        with contextlib.suppress(*_GONE):
            await asyncio.wait_for(self.flush(), timeout=2.0)
        self._closed = True
        for shard in self._shards:
            await shard.client.close(timeout=0.5)


# -- threads ----------------------------------------------------------------------------------


class RoutingClient(_Routing[StatsClient]):
    """Replicas and shards for threaded code; the calls of :class:`StatsClient`.

    A daemon thread acknowledges the journals every ``ack_interval`` seconds (started with the
    first increment or call); calls run on the caller's thread.
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
        self._stop = threading.Event()
        self._acker: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> RoutingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        if self._acker is not None or self._closed:
            return
        with self._start_lock:
            if self._acker is None:
                self._acker = threading.Thread(
                    target=self._ack_loop, name="campaignstats-routing-acks", daemon=True
                )
                self._acker.start()

    def _ack_loop(self) -> None:
        backoff = Backoff(*self._backoff)
        delay = self.ack_interval
        while not self._stop.wait(delay):
            delay = self.ack_interval
            for shard in self._shards:
                if not shard.journal or self._stop.is_set():
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
                except Exception:
                    log.exception("client.acknowledge_failed", shard=shard.index)

    def _on_shard(self, shard: _Shard[StatsClient], call: Callable[[StatsClient], _T]) -> _T:
        if self._closed:
            raise ClientClosed("the client is closed")
        self._start()
        error: BaseException | None = None
        for _ in range(len(shard.urls)):
            client = shard.client
            try:
                return call(client)
            except _GONE as exc:
                error = exc
                if shard.fail_over(client, exc):
                    client.close(timeout=0)
        raise ServerUnavailable(
            f"no replica of shard {shard.index} answered ({', '.join(shard.urls)}): {error}"
        )

    def _acknowledge(self, shard: _Shard[StatsClient]) -> None:
        number = shard.numbered  # a flush covers what its client was given before it
        self._on_shard(shard, _flush_blocking)
        shard.acknowledged_up_to(number)

    def flush(self) -> None:
        """Return once every shard has applied everything given to it before the call."""
        for shard in self._shards:
            self._acknowledge(shard)

    def stats(self, campaign_id: int, **kw: Any) -> WireStats:
        return self._on_shard(self._owner(campaign_id), lambda c: c.stats(campaign_id, **kw))

    def stats_many(self, campaign_ids: Iterable[int], **kw: Any) -> dict[int, WireStats]:
        """Split by owner and joined (one shard after the other)."""
        result: dict[int, WireStats] = {}
        for k, ids in group_by_shard(campaign_ids, len(self._shards)).items():
            result.update(self._on_shard(self._shards[k], lambda c: c.stats_many(ids, **kw)))  # noqa: B023
        return result

    def history(self, campaign_id: int, *args: Any, **kw: Any) -> dict[str, Any]:
        return self._on_shard(
            self._owner(campaign_id), lambda c: c.history(campaign_id, *args, **kw)
        )

    def recent(self, campaign_id: int, *args: Any, **kw: Any) -> dict[str, Any]:
        return self._on_shard(
            self._owner(campaign_id), lambda c: c.recent(campaign_id, *args, **kw)
        )

    def metrics(self, campaign_id: int, **kw: Any) -> dict[str, Any]:
        return self._on_shard(self._owner(campaign_id), lambda c: c.metrics(campaign_id, **kw))

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
        """Stop acknowledging, acknowledge what can be (briefly), close every client."""
        if self._closed:
            return
        self._stop.set()
        acker = self._acker
        if acker is not None:
            acker.join(timeout=5.0)
        deadline = time.monotonic() + 2.0
        for shard in self._shards:
            if shard.journal and time.monotonic() < deadline:
                with contextlib.suppress(*_GONE):
                    self._acknowledge(shard)
        self._closed = True
        for shard in self._shards:
            shard.client.close(timeout=0.5)


__all__ = [
    "DEFAULT_ACK_INTERVAL",
    "AsyncRoutingClient",
    "RoutingClient",
    "RoutingStatistics",
    "parse_topology",
]
