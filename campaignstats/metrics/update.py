"""The metrics UPDATE (docs/metrics.md, "The update"): its typed form, limits, one validator.

Pure Python, no I/O. :func:`update_from_map` is the only place an UPDATE is checked: the wire
codec, the embedding API and the log's replay all go through it. A wrong shape or type is
:class:`~campaignstats.errors.BadMessage`, a value out of range
:class:`~campaignstats.errors.Invalid` (the wire codes ``bad_message`` and ``invalid``), and an
update that fails changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from campaignstats.errors import BadMessage, Invalid, ProtocolError

MAX_ID = 2**63 - 1
MIN_INT = -(2**63)
#: as for increments (docs/protocol.md, "The item"): past the year 9999 is a timestamp in ms
MAX_AT = 253_402_300_800.0
#: a dimension key that would collide with the per-dimension total of the ``metrics`` reply
RESERVED_KEY = "total"

#: the keys of an UPDATE map
UPDATE_KEYS = frozenset({"campaign", "dims", "incr", "set", "gauge", "member", "seen", "at"})


@dataclass(frozen=True, slots=True)
class MetricLimits:
    """Bounds on what one campaign's metrics may hold (docs/metrics.md, "Limits").

    An update that would pass one of the per-campaign bounds is refused whole (``invalid``) and
    counted; the update's own bounds (string lengths, members per update) are checked by the
    validator.
    """

    #: bytes of UTF-8 of a metric name, a dimension, a key or a member
    max_string: int = 64
    #: distinct metric names in one campaign (a name may hold a counter, a gauge, a unique set
    #: and a last-seen stamp at once; it counts once)
    max_names: int = 100
    #: distinct dimensions in one campaign (and so in one update)
    max_dims: int = 8
    #: distinct keys of one dimension in one campaign
    max_keys: int = 1_000
    #: members of one name in one update
    max_members: int = 1_000
    #: unique sets (a name in one scope: the total, a dimension's total, a key) in one campaign;
    #: each holds its all-time set and up to ``unique_days`` daily sets
    max_unique_series: int = 1_000
    #: campaigns holding metrics; None: no limit
    max_campaigns: int | None = None
    #: gauge buckets kept per gauge (6-minute buckets: 24 is the last 2.4 hours)
    gauge_buckets: int = 24
    #: daily unique sets kept per unique metric (31: a month's figure can be merged)
    unique_days: int = 31
    #: keys (a throttled name under one combination of dims) a campaign's throttle guards
    #: remember; a new key past it is refused (``throttle_full``) until one expires
    max_throttle_keys: int = 10_000


DEFAULT_LIMITS = MetricLimits()


class MetricUpdate(NamedTuple):
    """A checked UPDATE. Empty maps and tuples stand for the keys the map left out."""

    campaign_id: int
    dims: dict[str, str]
    incr: dict[str, int]
    set: dict[str, int]
    gauge: dict[str, int | float]
    member: dict[str, tuple[str, ...]]
    seen: tuple[str, ...]
    #: epoch seconds; None: the time the server applies it (the log records the time used)
    at: float | None = None

    def names(self) -> frozenset[str]:
        """Every metric name the update touches."""
        return frozenset(
            (*self.incr, *self.set, *self.gauge, *self.member, *self.seen),
        )

    def to_map(self) -> dict[str, Any]:
        """The UPDATE map of the wire, leaving out what is empty (what the log stores)."""
        out: dict[str, Any] = {"campaign": self.campaign_id}
        if self.dims:
            out["dims"] = dict(self.dims)
        if self.incr:
            out["incr"] = dict(self.incr)
        if self.set:
            out["set"] = dict(self.set)
        if self.gauge:
            out["gauge"] = dict(self.gauge)
        if self.member:
            out["member"] = {name: list(members) for name, members in self.member.items()}
        if self.seen:
            out["seen"] = list(self.seen)
        if self.at is not None:
            out["at"] = self.at
        return out

    def only(self, names: frozenset[str], at: float | None) -> MetricUpdate:
        """The same update restricted to ``names``, with ``at`` (what is applied and logged)."""
        return MetricUpdate(
            self.campaign_id,
            self.dims,
            {n: v for n, v in self.incr.items() if n in names},
            {n: v for n, v in self.set.items() if n in names},
            {n: v for n, v in self.gauge.items() if n in names},
            {n: v for n, v in self.member.items() if n in names},
            tuple(n for n in self.seen if n in names),
            at,
        )


def make_update(
    campaign_id: int,
    *,
    dims: Mapping[str, str] | None = None,
    incr: Mapping[str, int] | None = None,
    set: Mapping[str, int] | None = None,  # the wire's name
    gauge: Mapping[str, int | float] | None = None,
    member: Mapping[str, str | list[str] | tuple[str, ...]] | None = None,
    seen: list[str] | tuple[str, ...] | None = None,
    at: float | None = None,
    limits: MetricLimits = DEFAULT_LIMITS,
) -> MetricUpdate:
    """A checked update from keyword arguments (the embedding API); raises the validator's error."""
    item: dict[str, Any] = {"campaign": campaign_id}
    for key, value in (
        ("dims", dims),
        ("incr", incr),
        ("set", set),
        ("gauge", gauge),
        ("member", None if member is None else {k: _listed(v) for k, v in member.items()}),
        ("seen", None if seen is None else list(seen)),
        ("at", at),
    ):
        if value is not None:
            item[key] = value
    result = update_from_map(item, limits)
    if isinstance(result, ProtocolError):
        raise result
    return result


def _listed(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def _utf8_length(text: str) -> int:
    try:
        return len(text.encode())
    except UnicodeEncodeError:  # a lone surrogate
        return -1


def _name_error(name: object, what: str, max_string: int) -> ProtocolError | None:
    if type(name) is not str:
        return BadMessage(f"{what} must be a string, not {type(name).__name__}")
    if not 0 < _utf8_length(name) <= max_string:
        return Invalid(f"{what} {name[:40]!r} must be 1 to {max_string} bytes of UTF-8")
    return None


def _map_of(value: object, key: str) -> Mapping[Any, Any] | ProtocolError:
    if not isinstance(value, Mapping):
        return BadMessage(f"{key!r} must be a map, not {type(value).__name__}")
    return value


def update_from_map(
    item: object, limits: MetricLimits = DEFAULT_LIMITS
) -> MetricUpdate | ProtocolError:
    """The UPDATE map (docs/protocol.md, "Metrics update") as a :class:`MetricUpdate`, or why not.

    The one validator. ``campaign`` is required; an optional key holding nil takes its default;
    an unknown key is ``bad_message``. An update must touch at least one metric, and a counter
    cannot be both ``incr`` and ``set`` in one update (which would win is not obvious).
    """
    if not isinstance(item, Mapping):
        return BadMessage(f"an update must be a map, not {type(item).__name__}")
    for key in item:
        if type(key) is not str or key not in UPDATE_KEYS:
            return BadMessage(f"unknown update key {str(key)[:40]!r}")
    max_string = limits.max_string
    cid = item.get("campaign")
    if cid is None:
        return BadMessage("an update needs 'campaign'")
    if type(cid) is not int:
        return BadMessage("campaign must be an integer")
    if not 0 < cid <= MAX_ID:
        return Invalid("campaign must be between 1 and 2**63-1")

    dims: dict[str, str] = {}
    raw = item.get("dims")
    if raw is not None:
        mapping = _map_of(raw, "dims")
        if isinstance(mapping, ProtocolError):
            return mapping
        if len(mapping) > limits.max_dims:
            return Invalid(f"at most {limits.max_dims} dimensions in one update")
        for dim, key in mapping.items():
            error = _name_error(dim, "a dimension", max_string) or _name_error(
                key, f"the key of dimension {str(dim)[:40]!r}", max_string
            )
            if error is not None:
                return error
            if key == RESERVED_KEY:
                return Invalid(f"{RESERVED_KEY!r} is reserved (the dimension's total)")
            dims[dim] = key

    counters: list[dict[str, int]] = []
    for key in ("incr", "set"):
        values: dict[str, int] = {}
        raw = item.get(key)
        if raw is not None:
            mapping = _map_of(raw, key)
            if isinstance(mapping, ProtocolError):
                return mapping
            for name, value in mapping.items():
                error = _name_error(name, "a metric name", max_string)
                if error is not None:
                    return error
                if type(value) is not int:
                    return BadMessage(f"{key}[{name!r}] must be an integer")
                if not MIN_INT <= value <= MAX_ID:
                    return Invalid(f"{key}[{name!r}] must fit in 64 bits")
                values[name] = value
        counters.append(values)
    incr, set_ = counters
    both = incr.keys() & set_.keys()
    if both:
        return Invalid(f"counter {min(both)!r} is both incr and set in one update")

    gauge: dict[str, int | float] = {}
    raw = item.get("gauge")
    if raw is not None:
        mapping = _map_of(raw, "gauge")
        if isinstance(mapping, ProtocolError):
            return mapping
        for name, value in mapping.items():
            error = _name_error(name, "a metric name", max_string)
            if error is not None:
                return error
            if type(value) is int:
                if not MIN_INT <= value <= MAX_ID:
                    return Invalid(f"gauge[{name!r}] must fit in 64 bits")
            elif type(value) is float:
                if not math.isfinite(value):
                    return Invalid(f"gauge[{name!r}] must be a finite number")
            else:
                return BadMessage(f"gauge[{name!r}] must be a number")
            gauge[name] = value

    member: dict[str, tuple[str, ...]] = {}
    raw = item.get("member")
    if raw is not None:
        mapping = _map_of(raw, "member")
        if isinstance(mapping, ProtocolError):
            return mapping
        for name, value in mapping.items():
            error = _name_error(name, "a metric name", max_string)
            if error is not None:
                return error
            members = (value,) if type(value) is str else value
            if not isinstance(members, list | tuple):
                return BadMessage(f"member[{name!r}] must be a string or an array of strings")
            if not 0 < len(members) <= limits.max_members:
                return Invalid(f"member[{name!r}] must hold 1 to {limits.max_members} members")
            for one in members:
                error = _name_error(one, f"a member of {name!r}", max_string)
                if error is not None:
                    return error
            member[name] = tuple(members)

    seen: tuple[str, ...] = ()
    raw = item.get("seen")
    if raw is not None:
        if not isinstance(raw, list | tuple):
            return BadMessage("'seen' must be an array of metric names")
        for name in raw:
            error = _name_error(name, "a metric name", max_string)
            if error is not None:
                return error
        seen = tuple(dict.fromkeys(raw))  # each name once, in order

    at = item.get("at")
    if at is not None:
        if type(at) is not float and type(at) is not int:
            return BadMessage("at must be a number (epoch seconds) or nil")
        if not 0 <= at <= MAX_AT:  # NaN fails this too
            return Invalid("at must be epoch seconds between 0 and the year 9999")
        at = float(at)

    update = MetricUpdate(cid, dims, incr, set_, gauge, member, seen, at)
    names = update.names()
    if not names:
        return Invalid("an update must carry at least one of incr, set, gauge, member, seen")
    if len(names) > limits.max_names:
        return Invalid(f"at most {limits.max_names} metric names in one update")
    return update
