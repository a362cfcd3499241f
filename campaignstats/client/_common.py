"""What the asyncio and the blocking client share: URLs, options, the increment queue, warnings.

Nothing here does I/O, and nothing here speaks the protocol: that is the client session's job
(:mod:`campaignstats.sessions.client`). The two clients differ only in how they wait (an event
loop, or the caller's thread), so everything that does not wait lives here once: parsing
``tcp://`` and ``unix://`` URLs, the options, reconnection backoff, rate-limited warnings, and the
hot path of ``increment()``.

Layering (docs/design.md, "The house"): a client imports the session, the codec, the requests,
the errors and the model, never the actor, the service or the server.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypeVar
from urllib.parse import unquote, urlsplit

import structlog

from campaignstats.client._batch import v1_items
from campaignstats.errors import LocalProtocolError, ProtocolError, UsageError
from campaignstats.metrics.update import DEFAULT_LIMITS as METRIC_LIMITS
from campaignstats.metrics.update import make_update
from campaignstats.model import DEFAULT_MAX_STRING, MAX_ID, Increment, Scope, check_increment
from campaignstats.protocol import DEFAULT_MAX_BATCH
from campaignstats.requests import (
    GetOrgStats,
    GetPageStats,
    History,
    SetGoals,
    history_request,
    org_stats_request,
    page_stats_request,
    set_goals_request,
)
from campaignstats.sessions.client import ClientSession, Measure, Undo, WireItem, wire_item

#: the bytes of a guard's name a client checks: a guard names a metric, so the bound of
#: ``metric()``'s names (the metrics' ``max_string``, not the hello's, which is the increments')
GUARD_MAX_STRING = METRIC_LIMITS.max_string

log = structlog.get_logger("campaignstats.client")

DEFAULT_URL = "tcp://127.0.0.1:7400"
DEFAULT_PORT = 7400
DEFAULT_TIMEOUT = 5.0  # seconds, for a call (connecting included)
DEFAULT_CONNECT_TIMEOUT = 2.0  # seconds, for the socket connect plus the hello round trip
DEFAULT_QUEUE_SIZE = 100_000  # increments waiting for the sender
DEFAULT_BATCH_SIZE = 1_000  # increments in one ``incs``
DEFAULT_CLOSE_TIMEOUT = 1.0  # seconds that close() spends pushing what is still queued
BACKOFF_MIN = 0.05
BACKOFF_MAX = 5.0
WARN_INTERVAL = 10.0  # seconds between two warnings of the same kind

#: what a client's queue holds: an increment's wire item, a decrement's (wrapped in Undo), or a
#: metrics update's map (wrapped in Measure)
Queued = WireItem | Undo | Measure

#: the kinds of run :func:`take_runs` cuts the queue into
INC, DEC, METRIC = "inc", "dec", "metric"
_NEVER = object()  # no queue entry is this


# -- addresses ----------------------------------------------------------------------------------


class Address(NamedTuple):
    """Where the server listens: ``("tcp", host, port)`` or ``("unix", path, 0)``."""

    kind: Literal["tcp", "unix"]
    host_or_path: str
    port: int

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix://{self.host_or_path}"
        host = self.host_or_path
        return f"tcp://[{host}]:{self.port}" if ":" in host else f"tcp://{host}:{self.port}"


def parse_url(url: str) -> Address:
    """``tcp://host[:port]`` (port 7400 by default) or ``unix:///path/to/socket``.

    A wrong URL raises :class:`~campaignstats.errors.UsageError` (a ValueError) at construction:
    it is a configuration bug, better found at start-up than on the first increment.
    """
    parts = urlsplit(url)
    if parts.scheme == "unix":
        path = unquote(parts.netloc + parts.path)
        if not path:
            raise UsageError(f"no socket path in {url!r}", hint="unix:///path/to/socket")
        return Address("unix", path, 0)
    if parts.scheme == "tcp":
        try:
            port = parts.port
        except ValueError as exc:
            raise UsageError(f"bad port in {url!r}") from exc
        if not parts.hostname:
            raise UsageError(f"no host in {url!r}", hint="tcp://host:port")
        return Address("tcp", parts.hostname, DEFAULT_PORT if port is None else port)
    raise UsageError(f"unsupported URL {url!r}", hint="tcp://host:port or unix:///path")


# -- options ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """Settings shared by both clients, checked once at construction."""

    address: Address
    token: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    queue_size: int = DEFAULT_QUEUE_SIZE
    batch_size: int = DEFAULT_BATCH_SIZE
    backoff_min: float = BACKOFF_MIN
    backoff_max: float = BACKOFF_MAX
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT

    def __post_init__(self) -> None:
        # NaN fails every comparison, and infinity cannot be a poll's milliseconds
        if not (
            0 < self.timeout < _INF
            and 0 < self.connect_timeout < _INF
            and 0 <= self.close_timeout < _INF
        ):
            raise UsageError("timeouts must be positive numbers of seconds (finite)")
        if self.queue_size < 1:
            raise UsageError("queue_size must be at least 1")
        if not 1 <= self.batch_size <= DEFAULT_MAX_BATCH:
            # Batches are also cut at the limit the server announces; this bound is the default.
            raise UsageError(f"batch_size must be 1 to {DEFAULT_MAX_BATCH}")
        if not 0 < self.backoff_min <= self.backoff_max:
            raise UsageError("backoff must satisfy 0 < backoff_min <= backoff_max")


_INF = float("inf")


def call_timeout(timeout: float | None, default: float) -> float:
    """A per-call timeout, or the client's."""
    if timeout is None:
        return default
    if not 0 < timeout < _INF:
        raise UsageError(f"timeout must be a positive number of seconds, not {timeout!r}")
    return timeout


#: goal events a subscription keeps unread before the oldest go
MAX_PENDING_EVENTS = 1_000


def goals_request(
    campaign_id: int, supporters: Iterable[int] | None, area: Mapping[str, int] | None
) -> SetGoals | ProtocolError:
    """A ``set_goals`` request, checked as the server checks it (docs/protocol.md)."""
    opts = {
        "supporters": None if supporters is None else list(supporters),
        "area": None if area is None else dict(area),
    }
    return set_goals_request(campaign_id, opts)


def check_scope(scope: str | Iterable[int]) -> Scope:
    """A resync scope: ``"all"``, ``"live"`` or campaign ids (UsageError otherwise)."""
    if isinstance(scope, str):
        if scope not in ("all", "live"):
            raise UsageError("scope is 'all', 'live' or a list of campaign ids")
        return scope  # type: ignore[return-value]
    return list(scope)


# -- reconnecting -------------------------------------------------------------------------------


class Backoff:
    """Delays between connection attempts: ``minimum`` doubling up to ``maximum``.

    A down server costs a few connection attempts per second at first and one every ``maximum``
    seconds after a while; a success resets it.
    """

    __slots__ = ("_next", "maximum", "minimum")

    def __init__(self, minimum: float = BACKOFF_MIN, maximum: float = BACKOFF_MAX) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self._next = minimum

    def next(self) -> float:
        delay = self._next
        self._next = min(delay * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self._next = self.minimum


class RateLimitedLog:
    """Warnings that cannot flood the log: at most one per event per ``interval`` seconds.

    A web backend with the stats server down would otherwise log once per request; instead the
    first occurrence is logged at once, later ones are counted and reported with the next line.
    """

    __slots__ = ("_last", "_suppressed", "interval")

    def __init__(self, interval: float = WARN_INTERVAL) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, event: str, **fields: Any) -> None:
        now = time.monotonic()
        last = self._last.get(event)
        if last is not None and now - last < self.interval:
            self._suppressed[event] = self._suppressed.get(event, 0) + 1
            return
        self._last[event] = now
        suppressed = self._suppressed.pop(event, 0)
        if suppressed:
            fields["suppressed"] = suppressed
        log.warning(event, **fields)


# -- statistics ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientStatistics:
    """A client's counters at one moment (in the manner of anyio's ``statistics()``)."""

    queued: int  # increments and decrements waiting for the sender
    queue_size: int  # the bound of that queue
    sent: int  # written to a connection
    dropped: int  # given up: queue full, connection lost mid-write, refused, or closed
    server_errors: int  # ``err`` replies nobody waited for (e.g. an ``incs`` item rejected)
    connected: bool
    connections: int  # connections established so far


# -- the increment queue ------------------------------------------------------------------------


def take_runs(queue: deque[Queued], size: int) -> list[tuple[str, list[Any]]]:
    """Pop up to ``size`` entries from the left, as runs of ``(kind, items)`` in order: kind
    :data:`INC`, :data:`DEC` or :data:`METRIC`, items the wire forms.

    Pops one by one instead of swapping the deque: other threads may be appending to it at
    this very moment, and an append to a deque that was just swapped out would be lost.
    """
    # popleft called by C until the count is reached (only the sender and flush take, one at a
    # time: nothing else can empty the queue under it)
    batch = list(itertools.islice(iter(queue.popleft, _NEVER), min(size, len(queue))))
    if not batch:
        return []
    types = set(map(type, batch))
    if Undo not in types and Measure not in types:
        return [(INC, batch)]  # no Undo, no Measure: all increments' wire items
    runs: list[tuple[str, list[Any]]] = []
    for entry in batch:
        if isinstance(entry, Undo | Measure):
            kind, item = (DEC if isinstance(entry, Undo) else METRIC), entry.item
        else:
            kind, item = INC, entry
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(item)
        else:
            runs.append((kind, [item]))
    return runs


class IncrementQueue:
    """The hot path both clients share: validate, append to a bounded deque, maybe wake.

    ``increment()`` is called once per action on a web request: it builds one tuple, checks the
    common case inline (:func:`~campaignstats.model.check_increment`, the one validator, runs to
    explain a failure, for non-ASCII strings, and for the fields of the map form), appends, and
    calls :meth:`_wake` only when the sender said it is idle. Batching, the socket and
    reconnecting belong to the sender.

    Subclasses provide :meth:`_wake` and :meth:`_drop`, and set ``_idle`` to True whenever their
    sender is about to wait for work (and before checking the queue one last time, so that an
    append racing with it is never left unsent).
    """

    _queue: deque[Queued]
    _queue_size: int
    _idle: bool
    _closed: bool
    #: the longest string the server takes, from its hello (the protocol default until then)
    _max_string: int = DEFAULT_MAX_STRING
    _warn: Any

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
        """Count one action; returns at once and never raises because the server is down.

        ``txid`` is the ``pg_current_xact_id()`` of the transaction that made the action count
        (``SELECT pg_current_xact_id()`` inside it), ``at`` its time in epoch seconds, ``page``
        its action page, ``messages`` the mail-to-target messages it sent. Pass ``action_id``
        or, better, ``txid`` whenever you have them: they make the merge with a calculation
        exact (docs/design.md, "Exact by transaction id").

        Invalid arguments raise (:class:`~campaignstats.errors.Invalid` or
        :class:`~campaignstats.errors.BadMessage`, the errors the server would answer): that is
        a bug in the caller. A valid increment is queued and sent in a batch by the background
        sender. When the queue is full (the server down or slower than the callers) it is
        dropped, counted in ``dropped``, and a warning is logged now and then; the server's
        periodic resync from the database repairs the counts.
        """
        max_string = self._max_string
        if (
            txid is None
            and at is None
            and page is None
            and messages == 0
            and type(campaign_id) is int
            and 0 < campaign_id <= MAX_ID
            and type(org_id) is int
            and 0 < org_id <= MAX_ID
            and type(action_type) is str
            and 0 < len(action_type) <= max_string
            and action_type.isascii()
            and (
                area is None
                or (type(area) is str and 0 < len(area) <= max_string and area.isascii())
            )
            and type(new_supporter) is bool
            and type(count) is int
            and 0 < count <= MAX_ID
            and (action_id is None or (type(action_id) is int and 0 < action_id <= MAX_ID))
        ):
            item: WireItem = (
                campaign_id,
                org_id,
                action_type,
                area,
                new_supporter,
                count,
                action_id,
            )
        else:
            item = self._checked(
                Increment(
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
            )
        queue = self._queue
        if len(queue) >= self._queue_size or self._closed:
            self._drop(1, "client.closed" if self._closed else "client.queue_full")
            return
        queue.append(item)
        if self._idle:
            self._wake()

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
        """Take one action back: the exact inverse of :meth:`increment` with the same fields
        (docs/design.md, "Counts that go down"). Queued like an increment, in order with them;
        a server that takes no decrements gets none (dropped with a warning)."""
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
        self._put([Undo(self._checked(inc))])

    def increment_many(self, increments: Iterable[Increment]) -> None:
        """Count many actions at once: each :class:`~campaignstats.model.Increment` as if
        given to :meth:`increment`, for a fraction of the cost per item.

        All are checked before any is queued: one invalid item raises (naming its index) and
        queues nothing. What does not fit in the queue is dropped and counted.
        """
        self._put(self._checked_many(increments))

    def decrement_many(self, decrements: Iterable[Increment]) -> None:
        """:meth:`decrement` for many, as :meth:`increment_many` does for increments."""
        self._put([Undo(item) for item in self._checked_many(decrements)])

    def metric(
        self,
        campaign_id: int,
        *,
        dims: Mapping[str, str] | None = None,
        incr: Mapping[str, int] | None = None,
        set: Mapping[str, int] | None = None,  # the wire's name
        gauge: Mapping[str, int | float] | None = None,
        member: Mapping[str, str | list[str] | tuple[str, ...]] | None = None,
        seen: list[str] | tuple[str, ...] | None = None,
        at: float | None = None,
    ) -> None:
        """One custom metrics update (docs/metrics.md, "The update"); returns at once.

        ``incr`` adds to counters, ``set`` replaces them, ``gauge`` sets gauges, ``member`` adds
        unique members, ``seen`` stamps last-seen times (``at``, default the server's now);
        with ``dims`` it counts under each dimension's key and total too. Checked here by the
        one validator (a bad argument raises :class:`~campaignstats.errors.Invalid` or
        :class:`~campaignstats.errors.BadMessage`), then queued and sent in the background like
        increments, in order with them. :meth:`flush` returns once the server has applied and
        logged them (durable by its fsync policy).
        """
        update = make_update(
            campaign_id,
            dims=dims,
            incr=incr,
            set=set,
            gauge=gauge,
            member=member,
            seen=seen,
            at=at,
            limits=METRIC_LIMITS,
        )
        self._put([Measure(update.to_map())])

    def _checked(self, inc: Increment) -> WireItem:
        error = check_increment(inc, self._max_string)
        if error is not None:
            raise error
        return wire_item(inc)

    def _checked_many(self, increments: Iterable[Increment]) -> list[WireItem]:
        max_string = self._max_string
        batch = increments if type(increments) is list else list(increments)
        fast = v1_items(batch, max_string)  # the whole batch at once, when all is well
        if fast is not None:
            return fast  # type: ignore[return-value]
        items: list[WireItem] = []
        append = items.append
        for i, inc in enumerate(batch):
            if type(inc) is not Increment:
                raise UsageError(f"item {i} is a {type(inc).__name__}, not an Increment")
            cid, org, action_type, area, new, count, aid, txid, at, page, messages = inc
            if (
                txid is None
                and at is None
                and page is None
                and messages == 0
                and type(cid) is int
                and 0 < cid <= MAX_ID
                and type(org) is int
                and 0 < org <= MAX_ID
                and type(action_type) is str
                and 0 < len(action_type) <= max_string
                and action_type.isascii()
                and (
                    area is None
                    or (type(area) is str and 0 < len(area) <= max_string and area.isascii())
                )
                and type(new) is bool
                and type(count) is int
                and 0 < count <= MAX_ID
                and (aid is None or (type(aid) is int and 0 < aid <= MAX_ID))
            ):
                append((cid, org, action_type, area, new, count, aid))
                continue
            error = check_increment(inc, max_string)
            if error is not None:
                raise type(error)(f"item {i}: {error}")
            append(wire_item(inc))
        return items

    def _put(self, entries: Sequence[Queued]) -> None:
        if not entries:
            return
        queue = self._queue
        if self._closed:
            self._drop(len(entries), "client.closed")
            return
        room = self._queue_size - len(queue)
        if room < len(entries):
            self._drop(len(entries) - max(room, 0), "client.queue_full")
            entries = entries[: max(room, 0)]
        queue.extend(entries)
        if entries and self._idle:
            self._wake()

    def _encode(
        self, session: ClientSession, runs: list[tuple[str, list[Any]]]
    ) -> tuple[bytes, int]:
        """The bytes of runs taken from the queue, and how many items they hold; runs the
        server cannot take (decrements or metrics to an older server) are dropped with a
        warning."""
        parts: list[bytes] = []
        n = 0
        for kind, items in runs:
            try:
                if kind == METRIC:
                    parts.append(session.send_metrics(items))
                else:
                    parts.append(session.send_changes(items, decrement=kind == DEC))
            except LocalProtocolError as exc:
                self._drop(len(items), "client.unsupported_by_server", error=str(exc))
            else:
                n += len(items)
        return b"".join(parts), n

    def _wake(self) -> None:
        raise NotImplementedError

    def _drop(self, n: int, reason: str, **fields: Any) -> None:
        raise NotImplementedError


# -- pages and orgs (docs/protocol.md, "page_stats", "org_stats"): one builder for both clients --


def page_stats_call(page_id: int) -> GetPageStats:
    """The checked ``page_stats`` request; raises the wire's error for a bad id, sending
    nothing."""
    return _raise_error(page_stats_request(page_id))


def org_stats_call(org_id: int) -> GetOrgStats:
    """The checked ``org_stats`` request; raises the wire's error for a bad id."""
    return _raise_error(org_stats_request(org_id))


def history_call(
    campaign_id: int, unit: str, start: float | None, end: float | None, page: int | None
) -> History:
    """The checked ``history`` request (``page``: an action page's buckets)."""
    opts = {"unit": unit, "from": start, "to": end, "page": page}
    return _raise_error(history_request(campaign_id, opts))


_R = TypeVar("_R")


def _raise_error(request: _R | ProtocolError) -> _R:
    if isinstance(request, ProtocolError):
        raise request
    return request
