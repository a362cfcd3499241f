"""Custom metrics of campaigns: the state, ``apply``, the query, guards, reset, snapshot bytes.

Pure Python with no I/O and no clock: every call that needs the time takes ``now`` (epoch
seconds), so tests and the log's replay decide it. The log (:mod:`campaignstats.metrics.log`) and
the files (:mod:`campaignstats.metrics.store`) are apart. A resync from Postgres never touches this
state: the server is its only truth (docs/metrics.md).

Per campaign, a metric name may hold a counter (``incr`` adds, ``set`` replaces), a gauge (the
last value set in each 6-minute bucket), a unique set (:class:`~.uniques.UniqueSet`, all-time and
per UTC day) and a last-seen stamp. Each lives in *scopes*: the campaign's total, and with
``dims`` each dimension's total and each of its keys. An update is applied the same way to every
scope it touches: its total, and for each of its dimensions that dimension's total and key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack

from campaignstats.errors import Invalid, ProtocolError
from campaignstats.metrics.uniques import UniqueSet, union
from campaignstats.metrics.update import DEFAULT_LIMITS, MAX_ID, MIN_INT, MetricLimits, MetricUpdate

#: seconds of a gauge bucket (statshub's 6-minute gauges)
BUCKET = 360
#: seconds of a unique set's day (UTC)
DAY = 86_400
SNAPSHOT_FORMAT = 1
#: throttle entries a campaign holds before the expired ones are first swept; after a sweep the
#: next one waits until the entries have doubled (amortized: docs/metrics.md, "Guards and reset")
_THROTTLE_SWEEP = 4_096
#: how far ahead of the server's clock an update's ``at`` may be (clocks drift; a larger lead is
#: a mistake that would push the kept gauge buckets and daily sets out for good)
MAX_AHEAD = 300.0

Number = int | float
#: the ``metrics`` reply's VALUES map
WireValues = dict[str, dict[str, Any]]


class Unique:
    """A unique metric in one scope: all its members, and the members of each UTC day."""

    __slots__ = ("all", "days")

    def __init__(self) -> None:
        self.all = UniqueSet()
        self.days: dict[int, UniqueSet] = {}  # day number (epoch seconds // DAY) -> members


class Values:
    """The metrics of one scope."""

    __slots__ = ("counters", "gauges", "last_seen", "uniques")

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}
        self.gauges: dict[str, dict[int, Number]] = {}  # bucket start -> last value set in it
        self.uniques: dict[str, Unique] = {}
        self.last_seen: dict[str, float] = {}

    def __bool__(self) -> bool:
        return bool(self.counters or self.gauges or self.uniques or self.last_seen)

    def names(self) -> set[str]:
        return {*self.counters, *self.gauges, *self.uniques, *self.last_seen}

    def discard(self, name: str) -> int:
        """Drop every value of ``name``; returns the unique sets dropped (0 or 1)."""
        self.counters.pop(name, None)
        self.gauges.pop(name, None)
        self.last_seen.pop(name, None)
        return 0 if self.uniques.pop(name, None) is None else 1

    def to_wire(self, now: float) -> WireValues:
        current = _bucket(now)
        gauges: dict[str, Number] = {}
        for name, buckets in self.gauges.items():
            past = [b for b in buckets if b <= current]
            if past:  # a value set for a bucket still to come is not the gauge's value yet
                gauges[name] = buckets[max(past)]
        return {
            "counters": dict(self.counters),
            "gauges": gauges,
            "uniques": {name: u.all.estimate() for name, u in self.uniques.items()},
            "last_seen": dict(self.last_seen),
        }


@dataclass(frozen=True, slots=True)
class Guard:
    """stat_trek's guards on one metric name: no update after ``deadline`` (epoch seconds), and
    none of one key (the name under the same dims) within ``min_period`` seconds of the last."""

    deadline: float | None = None
    min_period: float | None = None


class CampaignMetrics:
    """One campaign's metrics, guards and bookkeeping."""

    __slots__ = (
        "dim_totals",
        "dims",
        "guards",
        "names",
        "throttle",
        "throttle_expiry",
        "throttle_sweep_at",
        "total",
        "unique_series",
    )

    def __init__(self) -> None:
        self.total = Values()
        self.dims: dict[str, dict[str, Values]] = {}
        self.dim_totals: dict[str, Values] = {}
        self.names: set[str] = set()
        self.unique_series = 0
        self.guards: dict[str, Guard] = {}
        #: (name, dims) -> when an update of it was last applied; only for throttled names
        self.throttle: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        #: the throttle's size past which it is swept next, and when its soonest entry kept by
        #: the last sweep expires (a full throttle is swept again only from then)
        self.throttle_sweep_at = _THROTTLE_SWEEP
        self.throttle_expiry = 0.0

    def carry_throttle(self, other: CampaignMetrics) -> None:
        """Take ``other``'s throttle memory (the same campaign in a state being replaced)."""
        self.throttle = other.throttle
        self.throttle_sweep_at = other.throttle_sweep_at
        self.throttle_expiry = other.throttle_expiry

    def scopes(self) -> Iterator[tuple[str | None, str | None, Values]]:
        """``(dim, key, values)`` of every scope: ``(None, None, total)``, ``(dim, None,
        dimension total)`` and ``(dim, key, key's values)``."""
        yield None, None, self.total
        for dim, total in self.dim_totals.items():
            yield dim, None, total
            for key, values in self.dims.get(dim, {}).items():
                yield dim, key, values

    def is_empty(self) -> bool:
        return not self.total and not self.dims and not self.guards


class GaugeReading(NamedTuple):
    """A gauge as 6-minute buckets: ``(bucket start, value)`` of the last complete bucket that
    holds a value, and of the current bucket (None when nothing was set in it yet)."""

    previous: tuple[int, Number] | None
    current: tuple[int, Number] | None


class Applied(NamedTuple):
    """What :meth:`MetricsState.apply` did.

    ``update`` is what was applied, to be logged: the names refused by a guard left out, ``at``
    set to the time used. It is None when nothing was applied: every name refused by a guard, or
    the whole update refused for a limit (``error``, an :class:`Invalid`).
    """

    update: MetricUpdate | None
    refused: dict[str, str]  # name -> "deadline" or "throttle"
    error: ProtocolError | None = None


def _bucket(at: float) -> int:
    return int(at // BUCKET) * BUCKET


class MetricsState:
    """Every campaign's metrics. Only its owner (the actor) mutates a live one."""

    def __init__(self, limits: MetricLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self.campaigns: dict[int, CampaignMetrics] = {}
        #: what ``info`` shows: updates applied, refused by a guard, rejected for a limit
        self.applied = 0
        self.refused: dict[str, int] = {"deadline": 0, "throttle": 0}
        self.rejected: dict[str, int] = {}
        #: the campaigns' rows :meth:`restore` skipped (unreadable), each with why
        self.skipped_rows: list[str] = []
        #: a point-in-time copy being taken campaign by campaign (:meth:`begin_copy`)
        self._copy: StateCopy | None = None

    # -- updates ---------------------------------------------------------------------------------

    def apply(self, update: MetricUpdate, now: float) -> Applied:
        """Apply a checked update at time ``now``, its guards first, then its limits.

        A name refused by a guard is left out and counted (the rest applies); a limit refuses
        the whole update, which then changes nothing.
        """
        c = self.campaigns.get(update.campaign_id)
        refused: dict[str, str] = {}
        names = update.names()
        if c is not None and c.guards:
            dims_key = tuple(sorted(update.dims.items()))
            for name in names:
                guard = c.guards.get(name)
                if guard is None:
                    continue
                if guard.deadline is not None and now > guard.deadline:
                    refused[name] = "deadline"
                elif guard.min_period is not None:
                    last = c.throttle.get((name, dims_key))
                    if last is not None and now - last < guard.min_period:
                        refused[name] = "throttle"
                    elif last is None and len(c.throttle) >= self.limits.max_throttle_keys:
                        if now >= c.throttle_expiry:  # some entry may have expired since
                            self._sweep_throttle(c, now)
                        if len(c.throttle) >= self.limits.max_throttle_keys:
                            refused[name] = "throttle_full"  # a key it cannot remember
            for reason in refused.values():
                self.refused[reason] = self.refused.get(reason, 0) + 1
            if refused:
                names = names - refused.keys()
                if not names:
                    return Applied(None, refused)
        at = now if update.at is None else update.at
        error = self._check_time(update, at, now)
        if error is not None:
            return Applied(None, refused, error)
        effective = update.only(names, at) if refused or update.at is None else update
        error = self._apply(effective, first_day=self._first_day(now))
        if error is not None:
            return Applied(None, refused, error)
        c = self.campaigns[update.campaign_id]
        if c.guards:
            dims_key = tuple(sorted(update.dims.items()))
            for name in names:
                guard = c.guards.get(name)
                if guard is not None and guard.min_period is not None:
                    c.throttle[(name, dims_key)] = now
            if len(c.throttle) > c.throttle_sweep_at:
                self._sweep_throttle(c, now)
        return Applied(effective, refused)

    def replay(self, update: MetricUpdate, now: float | None = None) -> ProtocolError | None:
        """Apply an update the log recorded (``at`` set, guards already passed). It was
        accepted once: the growth limits (names, dims, keys, unique sets, campaigns) are not
        checked again, so lowering one does not lose what was acknowledged (only a counter's
        overflow refuses it). ``now``: the clock that decides which days are too old for a
        daily unique set (None: as the day map's size decides)."""
        first_day = None if now is None else self._first_day(now)
        return self._apply(update, growth=False, first_day=first_day)

    def _first_day(self, now: float) -> int:
        """The oldest day (epoch seconds // DAY) given a daily unique set at ``now``."""
        return int(now // DAY) - self.limits.unique_days + 1

    def _apply(
        self, update: MetricUpdate, *, growth: bool = True, first_day: int | None = None
    ) -> ProtocolError | None:
        error = self._check_limits(update, growth)
        if error is not None:
            return error
        assert update.at is not None
        at = update.at
        copy = self._copy
        if copy is not None:  # copy-on-write: the copy keeps the campaign as it was
            copy.copy_one(update.campaign_id)
        c = self.campaigns.get(update.campaign_id)
        if c is None:
            c = self.campaigns[update.campaign_id] = CampaignMetrics()
        scopes = [c.total]
        for dim, key in update.dims.items():
            total = c.dim_totals.get(dim)
            if total is None:
                total = c.dim_totals[dim] = Values()
                c.dims[dim] = {}
            keys = c.dims[dim]
            values = keys.get(key)
            if values is None:
                values = keys[key] = Values()
            scopes += (total, values)
        limits = self.limits
        bucket = _bucket(at)
        day = int(at // DAY)
        # a day older than the kept ones by the clock joins no daily set (docs/metrics.md)
        daily_kept = first_day is None or day >= first_day
        for values in scopes:
            counters = values.counters
            for name, n in update.incr.items():
                counters[name] = counters.get(name, 0) + n
            counters.update(update.set)
            for name, value in update.gauge.items():
                buckets = values.gauges.get(name)
                if buckets is None:
                    buckets = values.gauges[name] = {}
                _keep(buckets, bucket, value, limits.gauge_buckets)
            for name, members in update.member.items():
                unique = values.uniques.get(name)
                if unique is None:
                    unique = values.uniques[name] = Unique()
                    c.unique_series += 1
                unique.all.add(members)
                if not daily_kept:
                    continue
                daily = unique.days.get(day)
                if daily is None:
                    daily = UniqueSet()
                    if not _keep(unique.days, day, daily, limits.unique_days):
                        daily = None
                if daily is not None:
                    daily.add(members)
            last_seen = values.last_seen
            for name in update.seen:
                if last_seen.get(name, -1.0) < at:
                    last_seen[name] = at
        c.names.update(update.names())
        self.applied += 1
        return None

    def _check_time(self, update: MetricUpdate, at: float, now: float) -> ProtocolError | None:
        """Why ``at`` cannot be kept, or None: more than MAX_AHEAD seconds in the future, or a
        gauge older than its kept buckets (it would be dropped at once). Counted when refused.
        A member older than the kept days still joins the all-time set (docs/metrics.md)."""
        reason = message = ""
        if at > now + MAX_AHEAD:
            reason = "future"
            message = (
                f"at is {at - now:.0f} s ahead of the server's clock (at most {MAX_AHEAD:.0f})"
            )
        elif update.gauge and at < _bucket(now) - (self.limits.gauge_buckets - 1) * BUCKET:
            reason = "too_old"
            kept = self.limits.gauge_buckets * BUCKET
            message = f"a gauge at {at:.0f} is older than the {kept} s of gauge buckets kept"
        elif update.gauge and self._gauge_dropped(update, _bucket(at)):
            reason = "too_old"
            message = f"a gauge at {at:.0f} is older than every bucket kept of a full gauge"
        if not reason:
            return None
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        return Invalid(f"campaign {update.campaign_id}: {message}")

    def _check_limits(self, update: MetricUpdate, growth: bool = True) -> ProtocolError | None:
        """Why ``update`` would pass a per-campaign limit, or None; counted when it would.
        Without ``growth`` only a counter's overflow (what a snapshot could not hold)."""
        cid = update.campaign_id
        c = self.campaigns.get(cid)
        reason: str | None = None
        message = ""
        if growth:
            reason, message = self._growth_error(update, c)
        if c is None:
            c = _EMPTY
        if reason is None and update.incr:
            group = [c.total]
            for dim, key in update.dims.items():
                group += (
                    c.dim_totals.get(dim, _NO_VALUES),
                    c.dims.get(dim, {}).get(key, _NO_VALUES),
                )
            for values in group:
                for name, n in update.incr.items():
                    if not MIN_INT <= values.counters.get(name, 0) + n <= MAX_ID:
                        reason, message = "overflow", f"counter {name!r} would overflow"
        if reason is None:
            return None
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        return Invalid(f"campaign {cid}: {message}")

    def _growth_error(
        self, update: MetricUpdate, c: CampaignMetrics | None
    ) -> tuple[str | None, str]:
        """The growth limit ``update`` would pass (reason, message), or ``(None, "")``."""
        limits = self.limits
        if c is None:
            if limits.max_campaigns is not None and len(self.campaigns) >= limits.max_campaigns:
                return (
                    "campaigns",
                    f"over the limit of {limits.max_campaigns} campaigns with metrics",
                )
            c = _EMPTY
        if len(c.names | update.names()) > limits.max_names:
            return "names", f"over {limits.max_names} metric names"
        new_dims = update.dims.keys() - c.dims.keys()
        if len(c.dims) + len(new_dims) > limits.max_dims:
            return "dims", f"over {limits.max_dims} dimensions"
        for dim, key in update.dims.items():
            keys = c.dims.get(dim, {})
            if key not in keys and len(keys) >= limits.max_keys:
                return "keys", f"over {limits.max_keys} keys of dimension {dim!r}"
        if update.member:
            scopes = [c.total]
            for dim, key in update.dims.items():
                scopes += (
                    c.dim_totals.get(dim, _NO_VALUES),
                    c.dims.get(dim, {}).get(key, _NO_VALUES),
                )
            new = sum(name not in s.uniques for s in scopes for name in update.member)
            if c.unique_series + new > limits.max_unique_series:
                return "unique_series", f"over {limits.max_unique_series} unique sets"
        return None, ""

    def _gauge_dropped(self, update: MetricUpdate, bucket: int) -> bool:
        """Whether a scope the update touches would drop its gauge at once: the gauge's map is
        full and every bucket it holds is newer than ``bucket`` (one ahead of the clock may
        be held)."""
        c = self.campaigns.get(update.campaign_id)
        if c is None:
            return False
        size = self.limits.gauge_buckets
        scopes = [c.total]
        for dim, key in update.dims.items():
            scopes += (c.dim_totals.get(dim, _NO_VALUES), c.dims.get(dim, {}).get(key, _NO_VALUES))
        for values in scopes:
            for name in update.gauge:
                buckets = values.gauges.get(name)
                if (
                    buckets is not None
                    and len(buckets) >= size
                    and bucket not in buckets
                    and bucket < min(buckets)
                ):
                    return True
        return False

    def _sweep_throttle(self, c: CampaignMetrics, now: float) -> None:
        """Drop the expired throttle entries; the next sweep waits until the entries have
        doubled (or, at ``max_throttle_keys``, until the soonest kept one expires)."""
        soonest = float("inf")
        throttle = c.throttle
        guards = c.guards
        for key, last in list(throttle.items()):
            guard = guards.get(key[0])
            if guard is None or guard.min_period is None or now - last >= guard.min_period:
                del throttle[key]
            elif last + guard.min_period < soonest:
                soonest = last + guard.min_period
        c.throttle_sweep_at = max(_THROTTLE_SWEEP, 2 * len(throttle))
        c.throttle_expiry = soonest

    # -- guards and reset --------------------------------------------------------------------------

    def set_guard(
        self,
        campaign_id: int,
        name: str,
        deadline: float | None = None,
        min_period: float | None = None,
        *,
        growth: bool = True,
    ) -> None:
        """Guard metric ``name`` of a campaign; both None removes its guard. Everything is
        checked before anything changes (:class:`Invalid`): a campaign id 1 to 2**63-1, a name
        of valid UTF-8 (what the log and the snapshot can hold) and, with ``growth``, the
        limits on campaigns and guarded names (the log's replay passes ``growth=False``: a
        guard it recorded was accepted once)."""
        if type(campaign_id) is not int or not 0 < campaign_id <= MAX_ID:
            raise Invalid(f"a campaign id must be between 1 and 2**63-1, not {campaign_id!r}")
        if type(name) is not str or _utf8_length(name) < 1:
            raise Invalid(f"a guard's name must be a non-empty string of UTF-8, not {name!r:.40}")
        for value in (deadline, min_period):
            if value is not None and (type(value) not in (int, float) or not math.isfinite(value)):
                raise Invalid(f"a guard's deadline and min_period are numbers, not {value!r}")
        if min_period is not None and not min_period > 0:
            raise Invalid("min_period must be a positive number of seconds")
        if self._copy is not None:
            self._copy.copy_one(campaign_id)
        c = self.campaigns.get(campaign_id)
        if deadline is None and min_period is None:
            if c is not None:
                c.guards.pop(name, None)
                for key in [k for k in c.throttle if k[0] == name]:
                    del c.throttle[key]
                if c.is_empty():
                    del self.campaigns[campaign_id]
            return
        limits = self.limits
        if c is None:
            if (
                growth
                and limits.max_campaigns is not None
                and len(self.campaigns) >= limits.max_campaigns
            ):
                raise Invalid(f"over the limit of {limits.max_campaigns} campaigns with metrics")
            c = self.campaigns[campaign_id] = CampaignMetrics()
        elif growth and name not in c.guards and len(c.guards) >= limits.max_names:
            # a guard names a metric: no more guards than metric names a campaign may hold
            raise Invalid(f"campaign {campaign_id}: over {limits.max_names} guarded names")
        c.guards[name] = Guard(deadline, min_period)

    def reset(self, campaign_id: int, name: str | None = None) -> bool:
        """Drop the values of one metric name, or all of a campaign's (Counter's reset).

        Guards stay. Returns whether there was something to drop.
        """
        c = self.campaigns.get(campaign_id)
        if c is None:
            return False
        if self._copy is not None:
            self._copy.copy_one(campaign_id)
        if name is None:
            found = bool(c.total or c.dims)
            c.total, c.dims, c.dim_totals = Values(), {}, {}
            c.names.clear()
            c.unique_series = 0
        else:
            found = name in c.names
            c.names.discard(name)
            for _, _, values in list(c.scopes()):
                c.unique_series -= values.discard(name)
            for dim in list(c.dims):
                keys = c.dims[dim]
                for key in [k for k, v in keys.items() if not v]:
                    del keys[key]
                if not keys and not c.dim_totals[dim]:
                    del c.dims[dim], c.dim_totals[dim]
        if c.is_empty():
            del self.campaigns[campaign_id]
        return found

    # -- queries ----------------------------------------------------------------------------------

    def metrics(self, campaign_id: int, now: float) -> dict[str, Any]:
        """The ``metrics`` reply: ``{"total": VALUES, "dims": {dim: {key: VALUES, "total":
        VALUES}}}`` (docs/protocol.md, "Calls"). Copies: the caller may keep it."""
        c = self.campaigns.get(campaign_id)
        if c is None:
            return {"total": Values().to_wire(now), "dims": {}}
        dims: dict[str, dict[str, WireValues]] = {}
        for dim, keys in c.dims.items():
            out = {key: values.to_wire(now) for key, values in keys.items()}
            out["total"] = c.dim_totals[dim].to_wire(now)
            dims[dim] = out
        return {"total": c.total.to_wire(now), "dims": dims}

    def _values(self, campaign_id: int, dim: str | None, key: str | None) -> Values | None:
        c = self.campaigns.get(campaign_id)
        if c is None:
            return None
        if dim is None:
            return c.total
        if key is None:
            return c.dim_totals.get(dim)
        return c.dims.get(dim, {}).get(key)

    def gauge(
        self,
        campaign_id: int,
        name: str,
        now: float,
        dim: str | None = None,
        key: str | None = None,
    ) -> GaugeReading:
        """A gauge's last complete bucket and current bucket (``key`` None: the dim's total)."""
        values = self._values(campaign_id, dim, key)
        buckets = {} if values is None else values.gauges.get(name, {})
        current = _bucket(now)
        earlier = [b for b in buckets if b < current]
        previous = max(earlier) if earlier else None
        return GaugeReading(
            None if previous is None else (previous, buckets[previous]),
            (current, buckets[current]) if current in buckets else None,
        )

    def uniques_between(
        self,
        campaign_id: int,
        name: str,
        start: float,
        end: float,
        dim: str | None = None,
        key: str | None = None,
    ) -> UniqueSet:
        """The union of the daily sets of the UTC days starting in ``[start, end)``: a week's
        or a month's distinct members from the days' sets. Days older than the last
        ``unique_days`` are no longer kept."""
        values = self._values(campaign_id, dim, key)
        unique = None if values is None else values.uniques.get(name)
        if unique is None:
            return UniqueSet()
        return union(s for day, s in unique.days.items() if start <= day * DAY < end)

    def info(self) -> dict[str, Any]:
        return {
            "campaigns": len(self.campaigns),
            "applied": self.applied,
            "refused": dict(self.refused),
            "rejected": dict(self.rejected),
        }

    # -- snapshot ---------------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """Every campaign's metrics and guards, and the counts of ``info``, as bytes (at once:
        :meth:`begin_copy` takes the same bytes in slices)."""
        copy = StateCopy(self)
        copy.step(float("inf"), lambda: 0.0)
        return b"".join(copy.pieces())

    def abandon_copy(self) -> None:
        """Drop the copy under way, if any (it will not be used)."""
        if self._copy is not None:
            self._copy.abandon()

    def begin_copy(self) -> StateCopy:
        """Start a copy of the state as it is now, taken campaign by campaign: the owner calls
        :meth:`StateCopy.step` on later turns, and a change of a campaign not copied yet copies
        it first (copy-on-write). One copy at a time; it stops following the state once done
        or abandoned."""
        if self._copy is not None:
            raise RuntimeError("a copy of the metrics state is already being taken")
        copy = StateCopy(self)
        if not copy.done:
            self._copy = copy
        return copy

    @classmethod
    def restore(cls, data: bytes, limits: MetricLimits = DEFAULT_LIMITS) -> MetricsState:
        """The state :meth:`snapshot` wrote; ValueError when ``data`` is not one.

        Checked value by value: a wrong type loaded into the state would fail at the first
        update of that campaign instead of here. A campaign's row that is not one is skipped
        and listed in :attr:`skipped_rows` (the caller logs them): the other campaigns load.
        """
        try:
            raw = msgpack.unpackb(data, strict_map_key=False)
        except Exception as exc:
            raise ValueError(f"not MessagePack: {exc}") from exc
        if type(raw) is not dict or raw.get("format") != SNAPSHOT_FORMAT:
            raise ValueError("not a metrics snapshot, or an unknown format")
        state = cls(limits)
        for i, row in enumerate(_list(raw.get("campaigns"))):
            try:
                cid, c = _campaign_from(row)
            except (TypeError, ValueError) as exc:
                # One bad row costs that campaign, not every campaign of the file.
                state.skipped_rows.append(f"row {i}: {exc}")
                continue
            state.campaigns[cid] = c
        state.applied = _int(raw.get("applied", 0))
        state.refused.update({_str(k): _int(v) for k, v in _dict(raw.get("refused", {})).items()})
        state.rejected = {_str(k): _int(v) for k, v in _dict(raw.get("rejected", {})).items()}
        return state

    def iter_values(self) -> Iterator[tuple[int, str | None, str | None, Values]]:
        """``(campaign_id, dim, key, values)`` of every scope (the archive reads it)."""
        for cid, c in self.campaigns.items():
            for dim, key, values in c.scopes():
                yield cid, dim, key, values


class StateCopy:
    """The bytes of :meth:`MetricsState.snapshot` as of one moment, taken campaign by campaign.

    At the start the campaigns are listed (references, not copies) and the counts of ``info``
    encoded; :meth:`step` serializes campaigns not copied yet until its budget is spent; the state
    calls :meth:`copy_one` before it changes (or drops) a campaign not copied yet. So every row is
    the campaign as it was at the start, whatever happened since, and no step costs more than its
    budget plus one campaign (docs/metrics.md, "Compaction"). A campaign created later is not in
    the copy.
    """

    __slots__ = ("_head", "_pending", "_tail", "rows", "state")

    def __init__(self, state: MetricsState) -> None:
        self.state: MetricsState | None = state
        #: the campaigns not copied yet (C-speed copy of the dict: references only)
        self._pending = state.campaigns.copy()
        self.rows: list[bytes] = []
        packer = msgpack.Packer()
        packb = msgpack.packb
        # The map of the whole snapshot, in the order ``snapshot`` always wrote it.
        self._head: bytes = b"".join(
            (
                packer.pack_map_header(5),
                packb("format"),
                packb(SNAPSHOT_FORMAT),
                packb("campaigns"),
                packer.pack_array_header(len(self._pending)),
            )
        )
        self._tail: bytes = b"".join(
            (
                packb("applied"),
                packb(state.applied),
                packb("refused"),
                packb(state.refused),
                packb("rejected"),
                packb(state.rejected),
            )
        )

    @property
    def done(self) -> bool:
        return not self._pending

    @property
    def remaining(self) -> int:
        """Campaigns not copied yet."""
        return len(self._pending)

    def waiting(self, campaign_id: int) -> bool:
        """Whether the campaign is still to be copied (False once copied, or if it was created
        after the start)."""
        return campaign_id in self._pending

    def copy_one(self, campaign_id: int) -> None:
        """Copy one campaign now if it is not copied yet (before the state changes it)."""
        c = self._pending.pop(campaign_id, None)
        if c is not None:
            self.rows.append(_campaign_row(campaign_id, c))
            if not self._pending:
                self._detach()

    def step(self, budget: float, clock: Callable[[], float]) -> bool:
        """Copy campaigns until ``budget`` seconds of ``clock`` are spent (at least one);
        True once every campaign is copied."""
        pending = self._pending
        rows = self.rows
        deadline = clock() + budget
        while pending:
            cid, c = pending.popitem()  # from the end: O(1), whatever was popped before
            rows.append(_campaign_row(cid, c))
            if clock() >= deadline:
                break
        if pending:
            return False
        self._detach()
        return True

    def abandon(self) -> None:
        """Stop following the state (a copy that will not be used)."""
        self._pending = {}
        self.rows = []
        self._detach()

    def _detach(self) -> None:
        state = self.state
        if state is not None and state._copy is self:
            state._copy = None
        self.state = None

    def pieces(self) -> list[bytes]:
        """The snapshot's bytes in pieces, once :attr:`done` (``b"".join`` them, or write them
        one after the other)."""
        if self._pending:
            raise RuntimeError("the copy is not done")
        return [self._head, *self.rows, self._tail]


_EMPTY = CampaignMetrics()
_NO_VALUES = Values()


def _keep(buckets: dict[int, Any], slot: int, value: Any, size: int) -> bool:
    """Set ``buckets[slot]``, keeping the ``size`` newest slots; False when ``slot`` is older than
    every slot of a full map (then nothing changes)."""
    if slot not in buckets and len(buckets) >= size:
        oldest = min(buckets)
        if slot < oldest:
            return False
        del buckets[oldest]
    buckets[slot] = value
    return True


def _campaign_row(cid: int, c: CampaignMetrics) -> bytes:
    row = [
        cid,
        _values_state(c.total),
        {dim: {k: _values_state(v) for k, v in keys.items()} for dim, keys in c.dims.items()},
        {dim: _values_state(v) for dim, v in c.dim_totals.items()},
        {name: [g.deadline, g.min_period] for name, g in c.guards.items()},
    ]
    data: bytes = msgpack.packb(row)
    return data


def _campaign_from(row: object) -> tuple[int, CampaignMetrics]:
    """A campaign's row of the snapshot (:func:`_campaign_row`); ValueError when not one."""
    cid, total, dims, dim_totals, guards = _list(row, 5)
    if type(cid) is not int or not 0 < cid <= MAX_ID:
        raise ValueError(f"a campaign id must be a positive integer, not {cid!r}")
    c = CampaignMetrics()
    c.total = _values_from(total)
    for dim, keys in _dict(dims).items():
        c.dims[_str(dim)] = {_str(k): _values_from(v) for k, v in _dict(keys).items()}
    for dim, values in _dict(dim_totals).items():
        c.dim_totals[_str(dim)] = _values_from(values)
    if c.dims.keys() != c.dim_totals.keys():
        raise ValueError("every dimension needs its total")
    for name, guard in _dict(guards).items():
        deadline, min_period = _list(guard, 2)
        c.guards[_str(name)] = Guard(_opt_number(deadline), _opt_number(min_period))
    for _, _, values in c.scopes():
        c.names |= values.names()
        c.unique_series += len(values.uniques)
    return cid, c


def _utf8_length(text: str) -> int:
    """Bytes of ``text`` in UTF-8; -1 when it is no UTF-8 (a lone surrogate)."""
    try:
        return len(text.encode())
    except UnicodeEncodeError:
        return -1


def _values_state(v: Values) -> list[Any]:
    return [
        v.counters,
        {name: sorted(b.items()) for name, b in v.gauges.items()},
        {
            name: [u.all.to_state(), [[day, s.to_state()] for day, s in sorted(u.days.items())]]
            for name, u in v.uniques.items()
        },
        v.last_seen,
    ]


def _values_from(state: object) -> Values:
    counters, gauges, uniques, last_seen = _list(state, 4)
    v = Values()
    v.counters = {_str(k): _int(n) for k, n in _dict(counters).items()}
    for name, buckets in _dict(gauges).items():
        v.gauges[_str(name)] = {
            _int(b): _number(x) for b, x in (_list(p, 2) for p in _list(buckets))
        }
    for name, unique in _dict(uniques).items():
        all_state, days = _list(unique, 2)
        u = Unique()
        u.all = UniqueSet.from_state(all_state)
        u.days = {_int(d): UniqueSet.from_state(s) for d, s in (_list(p, 2) for p in _list(days))}
        v.uniques[_str(name)] = u
    v.last_seen = {_str(k): float(_number(t)) for k, t in _dict(last_seen).items()}
    return v


def _list(value: object, size: int | None = None) -> list[Any]:
    if not isinstance(value, list | tuple) or (size is not None and len(value) != size):
        raise ValueError(f"expected an array{'' if size is None else f' of {size}'}")
    return list(value)


def _dict(value: object) -> dict[Any, Any]:
    if type(value) is not dict:
        raise ValueError(f"expected a map, not {type(value).__name__}")
    return value


def _str(value: object) -> str:
    if type(value) is not str:
        raise ValueError(f"expected a string, not {value!r}")
    return value


def _int(value: object) -> int:
    if type(value) is not int:
        raise ValueError(f"expected an integer, not {value!r}")
    return value


def _number(value: object) -> Number:
    if type(value) is not int and type(value) is not float:
        raise ValueError(f"expected a number, not {value!r}")
    return value


def _opt_number(value: object) -> float | None:
    return None if value is None else float(_number(value))
