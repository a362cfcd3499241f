"""Counts in time: per-campaign buckets of supporters and actions (docs/design.md, "Time").

Plain Python with no I/O, like :mod:`campaignstats.model`. Three series of UTC buckets:

* minutes, kept for the last 50 hours (at least 48, and "yesterday" in any time zone);
* hours, kept for the last 91 days (at least 90);
* days, for the campaign's whole life.

Storage is compact and lazy (docs/design.md, "Memory"): a series is one ``array('q')`` of its
non-zero buckets in ascending order, each an index and two counts, so a campaign pays 24 bytes
for each minute, hour or day in which it was active and nothing for the others. A series drops
the buckets that fall out of its retention as newer ones are appended. The current minute's
counts are summed in two plain ints first (:meth:`Timeline.add`), which keeps the hot path to a
few attribute updates; and while all of a timeline's counts are in one minute, those two ints
are the whole timeline: its three series are created when a second minute comes.

Times are epoch seconds (UTC); a bucket is named by its start. Counts never go below zero in
a bucket: a decrement that finds less there than it takes back is clamped, as the totals are.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left
from collections.abc import Iterator
from datetime import date, datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

MINUTE = 60
HOUR = 3600
DAY = 86400

Unit = Literal["minute", "hour", "day"]
UNIT_SECONDS: dict[str, int] = {"minute": MINUTE, "hour": HOUR, "day": DAY}

#: minute buckets are kept for this long behind the newest
MINUTES_KEPT = 50 * HOUR
#: hour buckets are kept for this long behind the newest
HOURS_KEPT = 91 * DAY
#: a bucket sums every action type, so two counts the totals accept can overflow an int64
#: bucket: it saturates here instead (the wire's largest integer)
BUCKET_MAX = 2**63 - 1


#: buckets kept behind the newest, per series (one int object shared by every series)
MINUTE_KEEP = MINUTES_KEPT // MINUTE
HOUR_KEEP = HOURS_KEPT // HOUR


class Series:
    """The non-zero buckets of one unit, in one sorted ``array('q')`` (see the module doc):
    ``data`` holds ``index, supporters, actions`` for each bucket, by ascending index (bucket
    start // unit). One array rather than one for the indexes and one for the counts: an array
    costs 64 bytes before its first item, and most series hold a few buckets. Appending the
    newest bucket, the common case, is O(1); an older one is a bisection and an insertion."""

    __slots__ = ("data", "keep", "unit")

    def __init__(self, unit: int, keep: int | None) -> None:
        self.unit = unit  # seconds per bucket
        self.keep = keep  # buckets kept behind the newest (None: all)
        self.data: array[int] = array("q")

    @property
    def keys(self) -> array[int]:
        """The indexes of the buckets, ascending (a copy)."""
        return self.data[0::3]

    @property
    def newest(self) -> int:
        data = self.data
        return data[-3] if data else -(2**62)

    def _find(self, index: int) -> int:
        """Position (in buckets) of the first bucket whose index is ``index`` or more."""
        data = self.data
        if not data or data[-3] < index:
            return len(data) // 3  # past the newest: the common case, and no view to make
        if data[0] >= index:
            return 0
        # A strided view of the indexes, bisected in C; the temporary views go when the call
        # returns (nothing else holds them), so the array can grow again.
        return bisect_left(memoryview(data)[0::3], index)

    def keeps(self, index: int) -> bool:
        """Whether the bucket of ``index`` is within what this series keeps."""
        return self.keep is None or index > self.newest - self.keep

    def add(self, index: int, supporters: int, actions: int) -> None:
        """Add to the bucket of ``index``."""
        data = self.data
        if data and data[-3] == index:
            data[-2] = min(data[-2] + supporters, BUCKET_MAX)
            data[-1] = min(data[-1] + actions, BUCKET_MAX)
            return
        if not data or index > data[-3]:
            data.append(index)
            data.append(min(supporters, BUCKET_MAX))
            data.append(min(actions, BUCKET_MAX))
            keep = self.keep
            if keep is not None and data[0] <= index - keep:
                cut = self._find(index - keep + 1)
                del data[: 3 * cut]
            return
        if not self.keeps(index):
            return  # older than what this series keeps
        i = 3 * self._find(index)
        if data[i] == index:
            data[i + 1] = min(data[i + 1] + supporters, BUCKET_MAX)
            data[i + 2] = min(data[i + 2] + actions, BUCKET_MAX)
        else:
            data.insert(i, min(actions, BUCKET_MAX))
            data.insert(i, min(supporters, BUCKET_MAX))
            data.insert(i, index)

    def get(self, index: int) -> tuple[int, int]:
        data = self.data
        i = 3 * self._find(index)
        if i < len(data) and data[i] == index:
            return data[i + 1], data[i + 2]
        return 0, 0

    def take(self, index: int, supporters: int, actions: int) -> None:
        """Subtract from the bucket of ``index`` (clamped at zero; the caller has checked that
        it holds that much, Timeline.take). A bucket that reaches zero is dropped."""
        data = self.data
        i = 3 * self._find(index)
        if i < len(data) and data[i] == index:
            s = max(0, data[i + 1] - supporters)
            a = max(0, data[i + 2] - actions)
            if s or a:
                data[i + 1], data[i + 2] = s, a
            else:
                del data[i : i + 3]

    def buckets(self, lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
        """``(index, supporters, actions)`` of non-zero buckets with ``lo <= index < hi``,
        ascending."""
        data = self.data
        for i in range(3 * self._find(lo), 3 * self._find(hi), 3):
            s, a = data[i + 1], data[i + 2]
            if s or a:
                yield data[i], s, a

    def total(self, lo: int, hi: int) -> tuple[int, int]:
        i, j = self._find(lo), self._find(hi)
        if i == j:
            return 0, 0
        part = self.data[3 * i : 3 * j]
        return min(sum(part[1::3]), BUCKET_MAX), min(sum(part[2::3]), BUCKET_MAX)

    def copy(self) -> Series:
        new = Series(self.unit, self.keep)
        new.data = array("q", self.data)
        return new

    def nbytes(self) -> int:
        """Bytes of the array's items (what it holds; allocation slack aside)."""
        return len(self.data) * 8

    def rows(self) -> list[tuple[int, int, int]]:
        """Every non-zero bucket, for the snapshot file and for comparisons."""
        return list(self.buckets(-(2**62), 2**62))


#: the minute :meth:`Timeline.add` filed last: its int object, shared
_recent_minute = -1


class Timeline:
    """One campaign's (or page's) counts in time: minutes, hours and days, and the last action.

    ``add``/``take`` move all three series together, so that a sum over the days of a range
    equals the sum over its hours and minutes wherever they are kept.

    Lazy (docs/design.md, "Memory"): while every count is in one minute, that minute's two
    ints are the whole timeline (one minute, its hour and its day); the three series are
    created when a second minute comes, or a bucket of an hour or a day, or a decrement. Most
    campaigns of a server are small, and three series cost about 700 bytes before they hold
    anything.
    """

    __slots__ = ("_series", "last_action_at", "minute", "pending_a", "pending_s")

    def __init__(self) -> None:
        #: minutes, hours and days; None while the pending minute is the only bucket
        self._series: tuple[Series, Series, Series] | None = None
        self.last_action_at: float = -1.0  # -1: none (see last_action)
        # The hot path: counts of the current minute are summed here, in two ints, and filed
        # into the three series when another minute comes or anything reads them (flush).
        self.minute = -1
        self.pending_s = 0
        self.pending_a = 0

    @property
    def last_action(self) -> float | None:
        """When the last counted action happened (epoch seconds), None before any."""
        return None if self.last_action_at < 0 else self.last_action_at

    def add(self, t: float, supporters: int, actions: int) -> None:
        """Count ``supporters`` and ``actions`` at time ``t`` (epoch seconds, >= 0)."""
        m = int(t) // MINUTE
        if m != self.minute:
            if self.pending_s or self.pending_a:
                self._materialize()  # a second minute: the series are needed now
                self.flush()
            # One int object for the minute that every campaign of the moment shares (one per
            # timeline was 32 bytes each: docs/design.md, "Memory").
            global _recent_minute
            if m == _recent_minute:
                m = _recent_minute
            else:
                _recent_minute = m
            self.minute = m
        self.pending_s += supporters
        self.pending_a += actions
        if actions and t > self.last_action_at:
            self.last_action_at = t

    def lazy_state(self) -> tuple[int, int, int, float] | None:
        """``(minute, supporters, actions, last_action_at)`` while the pending minute is the
        whole timeline (what an idle campaign's packed form keeps of it: docs/design.md,
        "Memory", round 4), else None."""
        if self._series is not None:
            return None
        return self.minute, self.pending_s, self.pending_a, self.last_action_at

    @classmethod
    def from_lazy_state(
        cls, minute: int, supporters: int, actions: int, last_action_at: float
    ) -> Timeline:
        """The timeline whose :meth:`lazy_state` this is."""
        timeline = cls()
        timeline.minute = minute
        timeline.pending_s = supporters
        timeline.pending_a = actions
        timeline.last_action_at = last_action_at
        return timeline

    def _materialize(self) -> tuple[Series, Series, Series]:
        """The three series, created (empty) on first need; the pending minute stays pending
        until :meth:`flush` files it."""
        series = self._series
        if series is None:
            series = self._series = (
                Series(MINUTE, MINUTE_KEEP),
                Series(HOUR, HOUR_KEEP),
                Series(DAY, None),
            )
        return series

    def flush(self) -> None:
        """File the pending minute's counts into the series (while there are none, the
        pending minute is the only bucket and stays where it is)."""
        s, a = self.pending_s, self.pending_a
        series = self._series
        if (s or a) and series is not None:
            m = self.minute
            minutes, hours, days = series
            minutes.add(m, s, a)
            hours.add(m // 60, s, a)
            days.add(m // 1440, s, a)
            self.pending_s = self.pending_a = 0

    def _filed(self) -> tuple[Series, Series, Series]:
        """The series with everything filed (created if needed): for changes other than the
        pending minute's sums."""
        series = self._materialize()
        self.flush()
        return series

    @property
    def minutes(self) -> Series:
        return self.series_for(MINUTE)

    @property
    def hours(self) -> Series:
        return self.series_for(HOUR)

    @property
    def days(self) -> Series:
        return self.series_for(DAY)

    def take(self, t: float, supporters: int, actions: int, now: float) -> bool:
        """Take back what ``add(t, ...)`` counted; True when clamped.

        At most what the bucket of ``t`` holds in the finest series every server keeps for it
        at ``now`` (minutes for the last 48 hours, hours for 90 days: what :meth:`history`
        answers from, and what a calculation rebuilds) is taken, and the same from the coarser
        ones, so that an hour stays the sum of its minutes and a day the sum of its hours.

        A lazy timeline (its pending minute the only bucket) stays lazy when the change is in
        that minute, or in another minute of the last 48 hours (nothing there to take).
        """
        m = int(t) // MINUTE
        if self._series is None and (m == self.minute or t >= now - 48 * HOUR):
            s = min(supporters, self.pending_s) if m == self.minute else 0
            a = min(actions, self.pending_a) if m == self.minute else 0
            self.pending_s -= s
            self.pending_a -= a
            return s < supporters or a < actions
        minutes, hours, days = self._filed()
        levels = ((minutes, m), (hours, m // 60), (days, m // 1440))
        finest = 0 if t >= now - 48 * HOUR else 1 if t >= now - 90 * DAY else 2
        series, index = levels[finest]
        have_s, have_a = series.get(index)
        s, a = min(supporters, have_s), min(actions, have_a)
        if s or a:
            for series, index in levels:
                series.take(index, s, a)
        return s < supporters or a < actions

    def add_bucket(self, unit: int, start: int, supporters: int, actions: int) -> None:
        """Count a whole bucket read from the database: a minute bucket goes into all three
        series, an hour bucket into hours and days, a day bucket into days only (the
        calculation sends the finest unit each range is kept in)."""
        if unit == MINUTE:
            self.add(start, supporters, actions)
            return
        _, hours, days = self._materialize()
        if unit == HOUR:
            hours.add(start // HOUR, supporters, actions)
        days.add(start // DAY, supporters, actions)

    def copy(self) -> Timeline:
        self.flush()
        new = Timeline()
        series = self._series
        if series is not None:
            new._series = (series[0].copy(), series[1].copy(), series[2].copy())
        new.minute = self.minute
        new.pending_s = self.pending_s
        new.pending_a = self.pending_a
        new.last_action_at = self.last_action_at
        return new

    def nbytes(self) -> int:
        """Bytes of the buckets held, 24 each (a pending minute alone stands for three: its
        minute, hour and day)."""
        self.flush()
        series = self._series
        if series is None:
            return 3 * 24 if self.pending_s or self.pending_a else 0
        return sum(s.nbytes() for s in series)

    def views(self, now: float) -> dict[str, list[list[int]]]:
        """Every bucket a query can see at ``now``, by unit: what two timelines must agree on
        to be the same (what they hold beyond their retention may differ)."""
        return {unit: self.history(unit, None, None, now) for unit in ("minute", "hour", "day")}

    # -- queries --------------------------------------------------------------------------------

    def series_for(self, unit: int) -> Series:
        """The series of ``unit`` (seconds), everything filed: to read, not to change (while
        the pending minute is the only bucket, a new series holding it)."""
        self.flush()
        series = self._series
        if series is not None:
            return series[0] if unit == MINUTE else series[1] if unit == HOUR else series[2]
        alone = Series(unit, MINUTE_KEEP if unit == MINUTE else HOUR_KEEP if unit == HOUR else None)
        if self.pending_s or self.pending_a:
            alone.add(self.minute * MINUTE // unit, self.pending_s, self.pending_a)
        return alone

    def unit_total(self, unit: int, lo: int, hi: int) -> tuple[int, int]:
        """``series_for(unit).total(lo, hi)`` (bucket indexes ``lo <= index < hi``), without
        building a series to read a lazy timeline: ``top`` and ``recent`` ask it of many."""
        self.flush()
        series = self._series
        if series is not None:
            return (
                series[0] if unit == MINUTE else series[1] if unit == HOUR else series[2]
            ).total(lo, hi)
        s, a = self.pending_s, self.pending_a
        if (s or a) and lo <= self.minute * MINUTE // unit < hi:
            return min(s, BUCKET_MAX), min(a, BUCKET_MAX)
        return 0, 0

    def history(
        self, unit: str, start: float | None, end: float | None, now: float
    ) -> list[list[int]]:
        """``[[bucket start, supporters, actions], ...]``: non-zero buckets of ``unit`` whose
        start is in ``[start, end)``, ascending (docs/protocol.md, "history").

        Minutes are answered for the last 48 hours only and hours for the last 90 days (what
        every server keeps, whatever its own history), so an answer does not depend on when the
        server last recalculated.
        """
        seconds = UNIT_SECONDS[unit]
        lo = -(2**62) if start is None else math.ceil(start / seconds)
        hi = 2**62 if end is None else math.ceil(end / seconds)
        if unit == "minute":
            lo = max(lo, (math.floor(now) - 48 * HOUR) // MINUTE)
        elif unit == "hour":
            lo = max(lo, (math.floor(now) - 90 * DAY) // HOUR)
        series = self.series_for(seconds)
        return [[i * seconds, s, a] for i, s, a in series.buckets(lo, hi)]

    def total(self, start: float, end: float, now: float) -> tuple[int, int]:
        """Supporters and actions in buckets starting in ``[start, end)``, read from the finest
        series that holds ``start`` (minutes within the last 49 hours, hours within 90 days)."""
        # Minutes as long as every server holds them (the calculation files them from at most
        # 49 hours back): "yesterday" can start 49 hours ago, at a half hour in some zones.
        if start >= now - 49 * HOUR:
            unit = MINUTE
        elif start >= now - 90 * DAY:
            unit = HOUR
        else:
            unit = DAY
        return self.unit_total(unit, math.ceil(start / unit), math.ceil(end / unit))


def day_starts(now: float, tz: ZoneInfo) -> tuple[float, float]:
    """Epoch seconds of the start of today and of yesterday in ``tz``, at ``now``.

    Midnight is the first instant of the local date: where a DST change skips midnight, the
    day starts at the change.
    """
    local = datetime.fromtimestamp(now, tz)
    return _start_of(local.date(), tz), _start_of(local.date() - timedelta(days=1), tz)


def _start_of(day: date, tz: ZoneInfo) -> float:
    # fold=0: an ambiguous midnight is its first occurrence; a midnight skipped by DST is read
    # with the offset before the change, which is the instant of the change itself.
    return datetime.combine(day, time(), tzinfo=tz).timestamp()


def recent(timeline: Timeline | None, now: float, tz: ZoneInfo) -> dict[str, object]:
    """The derived figures of docs/protocol.md, "recent": ``[supporters, actions]`` for the
    last hour (the 60 minute buckets ending with the current one), today and yesterday in
    ``tz``, the last 7 days (the 168 hour buckets ending with the current one), and
    ``last_action_at``."""
    if timeline is None:
        zero = [0, 0]
        return {
            "last_hour": zero,
            "today": list(zero),
            "yesterday": list(zero),
            "last_7_days": list(zero),
            "last_action_at": None,
        }
    minute_now = math.floor(now) // MINUTE
    hour_now = minute_now // 60
    today, yesterday = day_starts(now, tz)
    return {
        "last_hour": list(timeline.unit_total(MINUTE, minute_now - 59, minute_now + 1)),
        "today": list(timeline.total(today, now + 1, now)),
        "yesterday": list(timeline.total(yesterday, today, now)),
        "last_7_days": list(timeline.unit_total(HOUR, hour_now - 167, hour_now + 1)),
        "last_action_at": timeline.last_action,
    }
