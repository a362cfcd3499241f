"""What the asyncio and the blocking client share: errors, URLs, options, the increment queue.

Nothing here does I/O. The two clients differ only in how they wait (an event loop or threads),
so everything that does not wait lives here once: parsing ``tcp://`` and ``unix://`` URLs, the
hello payload, reconnection backoff, rate-limited warnings, and the hot path of ``increment()``.

Layering (shared/DESIGN.md): a client imports the codec, the errors and the model, never the
actor, the service or the server.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple
from urllib.parse import unquote, urlsplit

import structlog

from campaignstats._version import __version__
from campaignstats.errors import (
    Invalid,
)
from campaignstats.model import DEFAULT_MAX_STRING, MAX_ID, Increment, check_increment
from campaignstats.protocol import DEFAULT_MAX_BATCH, PROTOCOL_VERSION

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

CLIENT_NAME = f"campaignstats-python/{__version__}"

#: An increment as queued and sent: the wire item of ``incs``
#: ``(campaign_id, org_id, action_type, area, new_supporter, count, action_id)``.
Item = tuple[int, int, str, str | None, bool, int, int | None]

# An ASCII string has one byte per character, so the hot path can check its length without
# encoding it; anything else (and every failure) goes through check_increment.
_MAX_STRING = DEFAULT_MAX_STRING


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

    A wrong URL raises :class:`ValueError` at construction: it is a configuration bug, better
    found at start-up than on the first increment.
    """
    parts = urlsplit(url)
    if parts.scheme == "unix":
        path = unquote(parts.netloc + parts.path)
        if not path:
            raise ValueError(f"no socket path in {url!r} (expected unix:///path/to/socket)")
        return Address("unix", path, 0)
    if parts.scheme == "tcp":
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"bad port in {url!r}") from exc
        if not parts.hostname:
            raise ValueError(f"no host in {url!r} (expected tcp://host:port)")
        return Address("tcp", parts.hostname, DEFAULT_PORT if port is None else port)
    raise ValueError(f"unsupported URL {url!r}: use tcp://host:port or unix:///path")


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
        if self.timeout <= 0 or self.connect_timeout <= 0 or self.close_timeout < 0:
            raise ValueError("timeouts must be positive")
        if self.queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        if not 1 <= self.batch_size <= DEFAULT_MAX_BATCH:
            # The server rejects a whole ``incs`` over its limit: a bigger batch would lose it all.
            raise ValueError(f"batch_size must be 1 to {DEFAULT_MAX_BATCH}")
        if not 0 < self.backoff_min <= self.backoff_max:
            raise ValueError("backoff must satisfy 0 < backoff_min <= backoff_max")

    def hello(self) -> dict[str, Any]:
        """The map of ``hello``, the first message on every connection."""
        payload: dict[str, Any] = {"protocol": PROTOCOL_VERSION, "client": CLIENT_NAME}
        if self.token is not None:
            payload["token"] = self.token
        return payload


def check_scope(scope: str | list[int] | tuple[int, ...]) -> str | list[int]:
    """The wire form of a resync scope; a wrong one is the caller's bug (:class:`ValueError`)."""
    if isinstance(scope, str):
        if scope not in ("all", "live"):
            raise ValueError("scope is 'all', 'live' or a list of campaign ids")
        return scope
    return list(scope)


# -- reconnecting -------------------------------------------------------------------------------


class Backoff:
    """Delays between connection attempts: ``minimum`` doubling up to ``maximum``.

    The sender uses it so that a down server costs a few connection attempts per second at first
    and one every ``maximum`` seconds after a while; a success resets it.
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

    queued: int  # increments waiting for the sender
    queue_size: int  # the bound of that queue
    sent: int  # increments written to a connection
    dropped: int  # increments given up: queue full, connection lost mid-write, or closed
    server_errors: int  # ``err`` replies to casts (e.g. an ``incs`` item the server rejected)
    connected: bool
    connections: int  # connections established so far (1 + reconnections)


# -- the increment queue ------------------------------------------------------------------------


def take_batch(queue: deque[Item], size: int) -> list[Item]:
    """Pop up to ``size`` items from the left.

    Pops one by one instead of swapping the deque: other threads may be appending to it at
    this very moment, and an append to a deque that was just swapped out would be lost.
    """
    popleft = queue.popleft
    return [popleft() for _ in range(min(size, len(queue)))]


class IncrementQueue:
    """The hot path both clients share: validate, append to a bounded deque, maybe wake.

    ``increment()`` is called once per action on a web request, and is meant to sustain some
    300,000 calls per second: it builds one tuple, checks the common case inline (the slower
    :func:`~campaignstats.model.check_increment` only runs to explain a failure, or for
    non-ASCII strings), appends, and calls :meth:`_wake` only when the sender said it is idle.
    Everything else (batching, the socket, reconnecting) belongs to the sender.

    Subclasses provide :meth:`_wake` and :meth:`_drop`, and set ``_idle`` to True whenever their
    sender is about to wait for work (and before checking the queue one last time, so that an
    append racing with it is never left unsent).
    """

    _queue: deque[Item]
    _queue_size: int
    _idle: bool
    _closed: bool

    def increment(
        self,
        campaign_id: int,
        org_id: int,
        action_type: str,
        area: str | None = None,
        new_supporter: bool = False,
        count: int = 1,
        action_id: int | None = None,
    ) -> None:
        """Count one action; returns at once and never raises because the server is down.

        Invalid arguments raise (:class:`~campaignstats.errors.Invalid` or
        :class:`~campaignstats.errors.BadMessage`): that is a bug in the caller, and the server
        would reject the increment anyway. A valid increment is queued and sent in a batch by the
        background sender. When the queue is full (the server down or slower than the callers)
        the increment is dropped, counted in ``dropped``, and a warning is logged now and then;
        the server's periodic resync from the database repairs the counts.
        """
        if not (
            type(campaign_id) is int
            and 0 < campaign_id <= MAX_ID
            and type(org_id) is int
            and 0 < org_id <= MAX_ID
            and type(action_type) is str
            and 0 < len(action_type) <= _MAX_STRING
            and action_type.isascii()
            and (
                area is None
                or (type(area) is str and 0 < len(area) <= _MAX_STRING and area.isascii())
            )
            and type(new_supporter) is bool
            and type(count) is int
            and 0 < count <= MAX_ID
            and (action_id is None or (type(action_id) is int and 0 < action_id <= MAX_ID))
        ):
            inc = Increment(campaign_id, org_id, action_type, area, new_supporter, count, action_id)
            try:
                error = check_increment(inc)
            except UnicodeEncodeError:
                # A lone surrogate: no UTF-8 for it, so the batch it joined could not be packed.
                error = Invalid("action_type and area must be valid Unicode (no lone surrogates)")
            if error is not None:
                raise error
        queue = self._queue
        if len(queue) >= self._queue_size or self._closed:
            self._drop(1, "client.queue_full" if not self._closed else "client.closed")
            return
        queue.append((campaign_id, org_id, action_type, area, new_supporter, count, action_id))
        if self._idle:
            self._wake()

    def _wake(self) -> None:
        raise NotImplementedError

    def _drop(self, n: int, reason: str) -> None:
        raise NotImplementedError
