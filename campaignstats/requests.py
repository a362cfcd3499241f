"""One request vocabulary: the typed requests that the wire, the service and the actor all speak.

A request has one name from end to end. The server session decodes ``["stats", 7, 42]`` into
``Stats(42)`` (the ``req_id`` stays with the session, which owns reply order), the service puts
that same object in the actor's mailbox, and the actor finds its handler in a table keyed by the
type. A client session encodes the same object back into the wire form with :meth:`wire_args`.
Nothing here does I/O; nothing here knows about asyncio or sockets (docs/design.md, "The house").

Casts (no reply) are :class:`Increments`, :class:`Decrements` and :class:`MetricUpdates`;
everything else is a call.
``READS`` lists the calls that only read: they may be served ahead of queued increments, but
never ahead of the same producer's own earlier writes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from campaignstats.errors import BadMessage, Invalid, ProtocolError
from campaignstats.goals import GoalsSpec, check_goals
from campaignstats.metrics.update import MetricUpdate
from campaignstats.model import MAX_AT, MAX_ID, IncrementLike, Scope


@dataclass(frozen=True, slots=True)
class Increments:
    """A cast: a batch of increments (one mailbox message per socket read, not per item)."""

    items: Sequence[IncrementLike]

    op: ClassVar[str] = "incs"


@dataclass(frozen=True, slots=True)
class Decrements:
    """A cast: a batch of decrements, each the exact inverse of the same increment."""

    items: Sequence[IncrementLike]

    op: ClassVar[str] = "decs"


@dataclass(frozen=True, slots=True)
class MetricUpdates:
    """A cast: custom metrics updates (docs/metrics.md), each checked by the one validator
    (:func:`campaignstats.metrics.update.update_from_map`). On the wire each is one
    ``["metric", UPDATE]``; the consecutive ones of a socket read travel as one batch."""

    items: Sequence[MetricUpdate]

    op: ClassVar[str] = "metric"


Cast = Increments | Decrements | MetricUpdates


@dataclass(frozen=True, slots=True)
class Stats:
    campaign_id: int

    op: ClassVar[str] = "stats"

    def wire_args(self) -> tuple[Any, ...]:
        return (self.campaign_id,)


@dataclass(frozen=True, slots=True)
class StatsMany:
    campaign_ids: Sequence[int]

    op: ClassVar[str] = "stats_many"

    def wire_args(self) -> tuple[Any, ...]:
        return (list(self.campaign_ids),)


@dataclass(frozen=True, slots=True)
class Flush:
    """Answered once every message before it, from the same producer, has been applied."""

    #: when the metrics log cannot be written: keep the changes not written (buffered, the
    #: next commit retries) and raise ``MetricsPending`` (HTTP answers 202 ``pending``), rather
    #: than drop them (the socket's ``flush``: not acknowledged, not kept; docs/metrics.md)
    keep_metrics: bool = False

    op: ClassVar[str] = "flush"

    def wire_args(self) -> tuple[Any, ...]:
        return ()


@dataclass(frozen=True, slots=True)
class Info:
    op: ClassVar[str] = "info"

    def wire_args(self) -> tuple[Any, ...]:
        return ()


@dataclass(frozen=True, slots=True)
class Resync:
    scope: Scope

    op: ClassVar[str] = "resync"

    def wire_args(self) -> tuple[Any, ...]:
        scope = self.scope
        return (scope if isinstance(scope, str) else list(scope),)


@dataclass(frozen=True, slots=True)
class Subscribe:
    """``subscriber`` is filled in by whoever delivers the updates (the server's connection, an
    embedding application's :class:`~campaignstats.actor.subscriptions.Subscription`); the wire
    form carries only the campaign."""

    campaign_id: int
    subscriber: Any = None

    op: ClassVar[str] = "sub"

    def wire_args(self) -> tuple[Any, ...]:
        return (self.campaign_id,)


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    campaign_id: int | None  # None: every campaign of this subscriber (never on the wire)
    subscriber: Any = None

    op: ClassVar[str] = "unsub"

    def wire_args(self) -> tuple[Any, ...]:
        return (self.campaign_id,)


@dataclass(frozen=True, slots=True)
class GetMetrics:
    """A campaign's custom metrics: ``{"total": VALUES, "dims": {...}}`` (docs/metrics.md)."""

    campaign_id: int

    op: ClassVar[str] = "metrics"

    def wire_args(self) -> tuple[Any, ...]:
        return (self.campaign_id,)


@dataclass(frozen=True, slots=True)
class ResetMetrics:
    """Drop one metric name's values (``name``), or all of a campaign's (None); guards stay.
    Answered ``{"found": bool}``: whether there was something to drop."""

    campaign_id: int
    name: str | None = None

    op: ClassVar[str] = "reset_metrics"

    def wire_args(self) -> tuple[Any, ...]:
        return (self.campaign_id, self.name)


@dataclass(frozen=True, slots=True)
class SetGuard:
    """Guard one metric name of a campaign (docs/metrics.md, "Guards and reset"): no update after
    ``deadline`` (epoch seconds), none more often than ``min_period`` seconds per key; both None
    removes the guard. Answered ``{"deadline": number|nil, "min_period": number|nil}``, the
    guard now in force. On the wire ``{"deadline", "min_period"}``."""

    campaign_id: int
    name: str
    deadline: float | None = None
    min_period: float | None = None

    op: ClassVar[str] = "guard"

    def wire_args(self) -> tuple[Any, ...]:
        return (
            self.campaign_id,
            self.name,
            {"deadline": self.deadline, "min_period": self.min_period},
        )


@dataclass(frozen=True, slots=True)
class History:
    """Non-zero buckets of one unit in ``[start, end)`` (docs/protocol.md, "history"); on the
    wire ``{"unit", "from", "to"}``. Build it with :func:`history_request` to have it checked."""

    campaign_id: int
    unit: str = "hour"
    start: float | None = None
    end: float | None = None
    #: an action page of the campaign: its buckets instead of the campaign's
    page: int | None = None

    op: ClassVar[str] = "history"

    def wire_args(self) -> tuple[Any, ...]:
        opts: dict[str, Any] = {"unit": self.unit}
        if self.start is not None:
            opts["from"] = self.start
        if self.end is not None:
            opts["to"] = self.end
        if self.page is not None:
            opts["page"] = self.page
        return (self.campaign_id, opts)


@dataclass(frozen=True, slots=True)
class GetPageStats:
    """STATS of one action page plus ``campaign_id`` (docs/protocol.md, "page_stats"). Build
    it with :func:`page_stats_request` to have the id checked."""

    page_id: int

    op: ClassVar[str] = "page_stats"

    def wire_args(self) -> tuple[Any, ...]:
        return (self.page_id,)


@dataclass(frozen=True, slots=True)
class GetOrgStats:
    """What one org collected over its campaigns (docs/protocol.md, "org_stats"). Build it
    with :func:`org_stats_request` to have the id checked."""

    org_id: int

    op: ClassVar[str] = "org_stats"

    def wire_args(self) -> tuple[Any, ...]:
        return (self.org_id,)


@dataclass(frozen=True, slots=True)
class Recent:
    """Last hour, today and yesterday in ``tz``, last 7 days, last action (docs/protocol.md,
    "recent")."""

    campaign_id: int
    tz: str = "UTC"

    op: ClassVar[str] = "recent"

    def wire_args(self) -> tuple[Any, ...]:
        return (self.campaign_id, {"tz": self.tz})


@dataclass(frozen=True, slots=True)
class Top:
    """The leading campaigns by ``supporters``, ``last_hour`` or ``today`` (docs/protocol.md,
    "top")."""

    by: str = "supporters"
    limit: int = 10

    op: ClassVar[str] = "top"

    def wire_args(self) -> tuple[Any, ...]:
        return ({"by": self.by, "limit": self.limit},)


@dataclass(frozen=True, slots=True)
class SetGoals:
    """Replace a campaign's goals (docs/protocol.md, "set_goals"); answered nil. Build it with
    :func:`set_goals_request` to have it checked."""

    campaign_id: int
    spec: GoalsSpec
    op: ClassVar[str] = "set_goals"

    def wire_args(self) -> tuple[Any, ...]:
        supporters = self.spec.supporters
        area = self.spec.area
        return (
            self.campaign_id,
            {
                "supporters": None if supporters is None else list(supporters),
                "area": None if area is None else dict(area),
            },
        )


@dataclass(frozen=True, slots=True)
class GetGoals:
    """A campaign's goals and what it reached (docs/protocol.md, "get_goals")."""

    campaign_id: int
    op: ClassVar[str] = "get_goals"

    def wire_args(self) -> tuple[Any, ...]:
        return (self.campaign_id,)


def set_goals_request(campaign_id: int, opts: Any) -> SetGoals | ProtocolError:
    """``set_goals``'s campaign id and map checked (:func:`campaignstats.goals.check_goals`)."""
    checked = check_id("set_goals", "campaign_id", campaign_id)
    if isinstance(checked, ProtocolError):
        return checked
    spec = check_goals(opts)
    return spec if isinstance(spec, ProtocolError) else SetGoals(campaign_id, spec)


UNITS = ("minute", "hour", "day")
TOP_BY = ("supporters", "last_hour", "today")
MAX_TOP = 1000


def _opts(op: str, opts: Any, keys: tuple[str, ...]) -> Mapping[str, Any] | ProtocolError:
    if opts is None:
        return {}
    if type(opts) is not dict:
        return BadMessage(f"{op}: options must be a map")
    for key in opts:
        if key not in keys:
            return BadMessage(f"{op}: unknown option {str(key)[:40]!r}")
    return opts


def _time(op: str, name: str, value: Any) -> float | ProtocolError | None:
    if value is None:
        return None
    if type(value) is not int and type(value) is not float:
        return BadMessage(f"{op}: {name} must be epoch seconds or nil")
    if not 0 <= value <= MAX_AT:  # also refuses NaN
        return Invalid(f"{op}: {name} must be epoch seconds between 0 and the year 9999")
    return value


def check_id(op: str, name: str, value: Any) -> int | ProtocolError:
    """An id of the wire (1 to 2**63-1): not an integer is ``bad_message``, out of range
    ``invalid``."""
    if type(value) is not int:
        return BadMessage(f"{op}: {name} must be an integer")
    if not 0 < value <= MAX_ID:
        return Invalid(f"{op}: {name} must be between 1 and 2**63-1")
    return value


def page_stats_request(page_id: Any) -> GetPageStats | ProtocolError:
    checked = check_id("page_stats", "page_id", page_id)
    return checked if isinstance(checked, ProtocolError) else GetPageStats(checked)


def org_stats_request(org_id: Any) -> GetOrgStats | ProtocolError:
    checked = check_id("org_stats", "org_id", org_id)
    return checked if isinstance(checked, ProtocolError) else GetOrgStats(checked)


def history_request(campaign_id: int, opts: Any) -> History | ProtocolError:
    """``history``'s options checked: ``unit`` minute|hour|day (default hour), ``from`` and
    ``to`` epoch seconds or nil, ``page`` an action page id or nil."""
    checked = _opts("history", opts, ("unit", "from", "to", "page"))
    if isinstance(checked, ProtocolError):
        return checked
    unit = checked.get("unit", "hour")
    if unit is None:
        unit = "hour"
    if type(unit) is not str:
        return BadMessage("history: unit must be a string")
    if unit not in UNITS:
        return Invalid("history: unit must be minute, hour or day")
    page = checked.get("page")
    if page is not None:
        page = check_id("history", "page", page)
        if isinstance(page, ProtocolError):
            return page
    start = _time("history", "from", checked.get("from"))
    if isinstance(start, ProtocolError):
        return start
    end = _time("history", "to", checked.get("to"))
    if isinstance(end, ProtocolError):
        return end
    return History(campaign_id, unit, start, end, page)


#: the longest throttle period a guard takes (a year): a larger one is surely a unit mistake
MAX_GUARD_PERIOD = 366 * 86_400.0


def guard_request(
    campaign_id: int, name: Any, opts: Any, max_string: int
) -> SetGuard | ProtocolError:
    """``guard``'s campaign, name and options checked: ``campaign_id`` 1 to 2**63-1 (as the
    codec checks it), ``name`` 1 to ``max_string`` bytes of UTF-8 (strict: a lone surrogate is
    no UTF-8), ``deadline`` epoch seconds or nil, ``min_period`` seconds (more than 0, at most a
    year) or nil."""
    if type(campaign_id) is not int:
        return BadMessage("guard: campaign must be an integer")
    if not 0 < campaign_id <= MAX_ID:
        return Invalid("guard: campaign must be between 1 and 2**63-1")
    if type(name) is not str:
        return BadMessage("guard: name must be a string")
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        size = -1
    if not 0 < size <= max_string:
        return Invalid(f"guard: name must be 1 to {max_string} bytes of UTF-8")
    checked = _opts("guard", opts, ("deadline", "min_period"))
    if isinstance(checked, ProtocolError):
        return checked
    deadline = _time("guard", "deadline", checked.get("deadline"))
    if isinstance(deadline, ProtocolError):
        return deadline
    period = checked.get("min_period")
    if period is not None:
        if type(period) is not int and type(period) is not float:
            return BadMessage("guard: min_period must be seconds or nil")
        if not 0 < period <= MAX_GUARD_PERIOD:  # also refuses NaN
            return Invalid("guard: min_period must be more than 0 and at most a year of seconds")
    return SetGuard(campaign_id, name, deadline, None if period is None else float(period))


def recent_request(campaign_id: int, opts: Any) -> Recent | ProtocolError:
    """``recent``'s options checked: ``tz`` an IANA time zone name (default UTC)."""
    checked = _opts("recent", opts, ("tz",))
    if isinstance(checked, ProtocolError):
        return checked
    tz = checked.get("tz", "UTC")
    if tz is None:
        tz = "UTC"
    if type(tz) is not str:
        return BadMessage("recent: tz must be a string")
    if not valid_tz(tz):
        return Invalid(f"recent: unknown time zone {tz[:64]!r}")
    return Recent(campaign_id, tz)


def valid_tz(name: str) -> bool:
    if not 0 < len(name) <= 64 or name.startswith(("/", ".")) or ".." in name:
        return False
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


def top_request(opts: Any) -> Top | ProtocolError:
    """``top``'s options checked: ``by`` supporters|last_hour|today, ``limit`` 1 to 1,000."""
    checked = _opts("top", opts, ("by", "limit"))
    if isinstance(checked, ProtocolError):
        return checked
    by = checked.get("by", "supporters")
    limit = checked.get("limit", 10)
    by = "supporters" if by is None else by
    limit = 10 if limit is None else limit
    if type(by) is not str:
        return BadMessage("top: by must be a string")
    if by not in TOP_BY:
        return Invalid("top: by must be supporters, last_hour or today")
    if type(limit) is not int:
        return BadMessage("top: limit must be an integer")
    if not 0 < limit <= MAX_TOP:
        return Invalid(f"top: limit must be 1 to {MAX_TOP}")
    return Top(by, limit)


Request = (
    Stats
    | StatsMany
    | Flush
    | Info
    | Resync
    | Subscribe
    | Unsubscribe
    | GetMetrics
    | ResetMetrics
    | SetGuard
    | History
    | Recent
    | Top
    | SetGoals
    | GetGoals
    | GetPageStats
    | GetOrgStats
)

#: read-only requests: they may take the mailbox's read lane
READS: tuple[type, ...] = (
    Stats,
    StatsMany,
    Info,
    GetMetrics,
    History,
    Recent,
    Top,
    GetGoals,
    GetPageStats,
    GetOrgStats,
)

__all__ = [
    "READS",
    "Cast",
    "Decrements",
    "Flush",
    "GetGoals",
    "GetMetrics",
    "GetOrgStats",
    "GetPageStats",
    "History",
    "Increments",
    "Info",
    "MetricUpdates",
    "Recent",
    "Request",
    "ResetMetrics",
    "Resync",
    "SetGoals",
    "SetGuard",
    "Stats",
    "StatsMany",
    "Subscribe",
    "Top",
    "Unsubscribe",
]
