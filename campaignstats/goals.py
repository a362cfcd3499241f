"""Goals, milestones and area quorums: what a campaign aims at, and what it has reached.

Plain Python, no I/O (docs/design.md, "Goals and milestones"). The actor owns one
:class:`GoalKeeper`; after it applies increments or merges a calculation it asks the keeper which
thresholds the touched campaigns have just reached, and the keeper answers with the EVENT maps of
docs/protocol.md ("Events"), each threshold once, ever, in ascending order. The durable log
(:mod:`campaignstats.webhooks`) and the snapshot keep what was reached across restarts.

Rules (docs/design.md, "Goals and milestones"):

* a threshold that was reached stays reached, whatever the count does later (a dip and a
  recovery fire nothing);
* the first sight of a campaign's counts records the thresholds they already pass, silently:
  a snapshot loaded at start, and, before the first full calculation since start has merged,
  a campaign the server had no record of (a fresh server does not fire a campaign's old
  milestones). After that first full calculation every crossing fires, whatever brought it
  (increments, the follower, a later calculation);
* ``set_goals`` with a threshold the count already passes records it as reached, silently: it
  was never crossed while it was a goal.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from campaignstats.errors import BadMessage, Invalid, ProtocolError
from campaignstats.model import DEFAULT_MAX_STRING, MAX_ID, CampaignStats

#: Proca's default goal ladder, also the widget's (docs/design.md, "Goals and milestones")
DEFAULT_LADDER: tuple[int, ...] = (
    100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000,
    1_000_000, 2_000_000, 5_000_000,
)  # fmt: skip

#: limits of ``set_goals`` (docs/protocol.md, "set_goals")
MAX_THRESHOLDS = 100
MAX_QUORUM_AREAS = 100
MAX_AREA_NAME = DEFAULT_MAX_STRING  # bytes of UTF-8, as an increment's area

#: nothing more to reach
_NEVER = MAX_ID + 1

Event = dict[str, Any]


@dataclass(frozen=True, slots=True)
class GoalsSpec:
    """What ``set_goals`` sets: ``supporters`` None is the default ladder, ``area`` None (or
    empty) no quorum."""

    supporters: tuple[int, ...] | None
    area: Mapping[str, int] | None


def check_goals(opts: Any) -> GoalsSpec | ProtocolError:
    """``set_goals``'s map checked: ``{"supporters": [int, ...] | nil, "area": {str: int} | nil}``.

    Thresholds are 1 to 2**63-1, strictly ascending (no duplicates), at most
    :data:`MAX_THRESHOLDS`; at most :data:`MAX_QUORUM_AREAS` areas, each name 1 to
    :data:`MAX_AREA_NAME` bytes of UTF-8. A wrong type is ``bad_message``, a value out of range
    ``invalid``; either way nothing changes.
    """
    if type(opts) is not dict:
        return BadMessage("set_goals: goals must be a map")
    for key in opts:
        if key not in ("supporters", "area"):
            return BadMessage(f"set_goals: unknown key {str(key)[:40]!r}")
    supporters = opts.get("supporters")
    ladder: tuple[int, ...] | None = None
    if supporters is not None:
        if type(supporters) is not list or any(type(t) is not int for t in supporters):
            return BadMessage("set_goals: supporters must be a list of integers or nil")
        if len(supporters) > MAX_THRESHOLDS:
            return Invalid(f"set_goals: at most {MAX_THRESHOLDS} thresholds, not {len(supporters)}")
        for t in supporters:
            if not 0 < t <= MAX_ID:
                return Invalid(f"set_goals: a threshold must be 1 to 2**63-1, not {t}")
        for a, b in itertools.pairwise(supporters):
            if b <= a:
                return Invalid(
                    f"set_goals: thresholds must be strictly ascending, without duplicates "
                    f"({a} then {b})"
                )
        ladder = tuple(supporters)
    area = opts.get("area")
    quorums: dict[str, int] | None = None
    if area is not None:
        if type(area) is not dict:
            return BadMessage("set_goals: area must be a map of area to threshold, or nil")
        if len(area) > MAX_QUORUM_AREAS:
            return Invalid(f"set_goals: at most {MAX_QUORUM_AREAS} areas, not {len(area)}")
        quorums = {}
        for name, t in area.items():
            if type(name) is not str or type(t) is not int:
                return BadMessage("set_goals: area must map area names to integer thresholds")
            size = _utf8_length(name)
            if not 0 < size <= MAX_AREA_NAME:
                return Invalid(
                    f"set_goals: an area name must be 1 to {MAX_AREA_NAME} bytes of UTF-8, "
                    f"not {name[:40]!r}"
                )
            if not 0 < t <= MAX_ID:
                return Invalid(f"set_goals: area {name!r}: a threshold must be 1 to 2**63-1")
            quorums[name] = t
    return GoalsSpec(ladder, quorums or None)


def _utf8_length(text: str) -> int:
    try:
        return len(text.encode())
    except UnicodeEncodeError:
        return -1


def event_id(campaign_id: int, event: Event) -> str:
    """The event's stable id (the webhooks' ``X-Campaignstats-Event-Id``): each threshold fires
    once, ever, so campaign, kind, area and threshold name it."""
    if event["type"] == "quorum":
        return f"{campaign_id}-quorum-{event['threshold']}-{event['area'].encode().hex()}"
    return f"{campaign_id}-milestone-{event['metric']}-{event['threshold']}"


class GoalKeeper:
    """Every campaign's goals and what each has reached. Only the actor calls it."""

    __slots__ = (
        "_next",
        "area_reached",
        "custom",
        "fired",
        "known",
        "loaded",
        "quorums",
        "reached",
        "skipped",
    )

    def __init__(self) -> None:
        #: thresholds set with ``set_goals`` (absent: the default ladder)
        self.custom: dict[int, tuple[int, ...]] = {}
        #: area quorums set with ``set_goals``
        self.quorums: dict[int, dict[str, int]] = {}
        #: the supporters thresholds each campaign has reached, ever: a sorted tuple (a few
        #: dozen bytes where a set takes 200 to 700; it changes only when a goal is reached)
        self.reached: dict[int, tuple[int, ...]] = {}
        #: per campaign and area, the quorum thresholds reached, ever
        self.area_reached: dict[int, dict[str, set[int]]] = {}
        #: a full calculation has merged since the start: every campaign is checked
        self.loaded = False
        #: before that: the campaigns whose counts the keeper has seen (a snapshot, a merge);
        #: the others are not checked yet (emptied once loaded)
        self.known: set[int] = set()
        self.fired = 0
        #: bad entries of a snapshot's goals part, skipped at load
        self.skipped = 0
        #: per campaign, the supporters value at which it next fires (a cache)
        self._next: dict[int, int] = {}

    # -- goals ----------------------------------------------------------------------------------

    def ladder(self, campaign_id: int) -> tuple[int, ...]:
        return self.custom.get(campaign_id, DEFAULT_LADDER)

    def set_goals(self, campaign_id: int, spec: GoalsSpec, stats: CampaignStats | None) -> None:
        """Set (replace) a campaign's goals. A threshold the counts already pass is recorded as
        reached without an event."""
        if spec.supporters is None:
            self.custom.pop(campaign_id, None)
        else:
            self.custom[campaign_id] = spec.supporters
        if spec.area:
            self.quorums[campaign_id] = dict(spec.area)
        else:
            self.quorums.pop(campaign_id, None)
        if stats is not None:
            self.baseline(campaign_id, stats)
        self._next.pop(campaign_id, None)

    def goals(self, campaign_id: int) -> dict[str, Any]:
        """The answer to ``get_goals`` (docs/protocol.md)."""
        ladder = self.ladder(campaign_id)
        reached = self.reached.get(campaign_id, ())
        quorums = self.quorums.get(campaign_id, {})
        areas = self.area_reached.get(campaign_id, {})
        return {
            "supporters": list(ladder),
            "reached": [t for t in ladder if t in reached],
            "next": next((t for t in ladder if t not in reached), None),
            "area": dict(quorums),
            "areas_reached": sorted(a for a, t in quorums.items() if t in areas.get(a, ())),
        }

    # -- reaching -------------------------------------------------------------------------------

    def baseline(self, campaign_id: int, stats: CampaignStats) -> None:
        """Record what these counts already pass as reached, with no event (first sight)."""
        ladder = self.ladder(campaign_id)
        passed = ladder[: bisect.bisect_right(ladder, stats.supporters)]
        if passed:
            self._reach(campaign_id, passed)
        for area, t in self.quorums.get(campaign_id, {}).items():
            if stats.maps()[1].get(area, 0) >= t:  # a read: a packed campaign stays packed
                self.area_reached.setdefault(campaign_id, {}).setdefault(area, set()).add(t)
        self._next.pop(campaign_id, None)
        if not self.loaded:
            self.known.add(campaign_id)

    def check(
        self, campaign_ids: Iterable[int], campaigns: Mapping[int, CampaignStats], now: float
    ) -> list[tuple[int, Event]]:
        """The events of these campaigns' counts: each threshold reached and not reached before,
        in ascending order (milestones, then quorums by threshold). Campaigns not known yet
        (before the first full calculation) are skipped."""
        events: list[tuple[int, Event]] = []
        nexts = self._next
        quorums = self.quorums
        known = None if self.loaded else self.known
        for cid in campaign_ids:
            stats = campaigns.get(cid)
            if stats is None or (known is not None and cid not in known):
                continue
            at = nexts.get(cid)
            if at is None:
                at = self._next_of(cid)
            if stats.supporters >= at:
                self._milestones(cid, stats, now, events)
            if cid in quorums:
                self._quorums(cid, stats, now, events)
        self.fired += len(events)
        return events

    def merged(
        self, campaign_ids: Iterable[int], campaigns: Mapping[int, CampaignStats], now: float
    ) -> list[tuple[int, Event]]:
        """After a calculation merged these campaigns: before the first full calculation, a
        campaign seen for the first time is baselined (no event); the others are checked."""
        campaign_ids = list(campaign_ids)
        if not self.loaded:
            fresh = [cid for cid in campaign_ids if cid not in self.known]
            for cid in fresh:
                stats = campaigns.get(cid)
                if stats is not None:
                    self.baseline(cid, stats)
        return self.check(campaign_ids, campaigns, now)

    def mark_loaded(self) -> None:
        """The first full calculation has merged: from now on every campaign is checked."""
        self.loaded = True
        self.known = set()

    def _next_of(self, cid: int) -> int:
        reached = self.reached.get(cid, ())
        at = next((t for t in self.ladder(cid) if t not in reached), _NEVER)
        self._next[cid] = at
        return at

    def _milestones(
        self, cid: int, stats: CampaignStats, now: float, events: list[tuple[int, Event]]
    ) -> None:
        value = stats.supporters
        reached = self.reached.get(cid, ())
        new: list[int] = []
        for t in self.ladder(cid):
            if t > value:
                break
            if t not in reached:
                new.append(t)
                events.append(
                    (
                        cid,
                        {
                            "type": "milestone",
                            "metric": "supporters",
                            "threshold": t,
                            "value": value,
                            "at": now,
                        },
                    )
                )
        if new:
            self._reach(cid, new)
        self._next.pop(cid, None)

    def _reach(self, cid: int, thresholds: Iterable[int]) -> None:
        old = self.reached.get(cid, ())
        self.reached[cid] = tuple(sorted({*old, *thresholds}))

    def _quorums(
        self, cid: int, stats: CampaignStats, now: float, events: list[tuple[int, Event]]
    ) -> None:
        counts = stats.maps()[1]  # a read: a packed campaign stays packed
        mine = self.area_reached.get(cid)
        crossed: list[tuple[int, str, int]] = []
        for area, t in self.quorums[cid].items():
            value = counts.get(area, 0)
            if value >= t and (mine is None or t not in mine.get(area, ())):
                crossed.append((t, area, value))
        for t, area, value in sorted(crossed):
            if mine is None:
                mine = self.area_reached[cid] = {}
            mine.setdefault(area, set()).add(t)
            events.append(
                (
                    cid,
                    {"type": "quorum", "area": area, "threshold": t, "value": value, "at": now},
                )
            )

    def remember(self, campaign_id: int, event: Mapping[str, Any]) -> None:
        """An event read back from the durable log: its threshold is reached (and the campaign
        is one the server has a record of)."""
        self.note(campaign_id)
        if event.get("type") == "quorum":
            areas = self.area_reached.setdefault(campaign_id, {})
            areas.setdefault(str(event["area"]), set()).add(int(event["threshold"]))
        else:
            self._reach(campaign_id, (int(event["threshold"]),))
            self._next.pop(campaign_id, None)

    # -- persistence (the snapshot's "goals" part) ----------------------------------------------

    def to_snapshot(self) -> dict[str, Any]:
        return {
            "custom": [[cid, list(t)] for cid, t in self.custom.items()],
            "quorums": [[cid, q] for cid, q in self.quorums.items()],
            "reached": [[cid, list(r)] for cid, r in self.reached.items() if r],
            "area_reached": [
                [cid, {a: sorted(ts) for a, ts in areas.items()}]
                for cid, areas in self.area_reached.items()
                if areas
            ],
        }

    def load_snapshot(self, data: Mapping[str, Any]) -> list[str]:
        """The snapshot's "goals" part, every value checked. A bad entry costs that entry only:
        it is skipped, counted (``snapshot_entries_skipped``) and described in the list returned,
        for the caller to log. Every campaign named is one the server has a record of: before the
        first full calculation it is checked, not baselined (docs/design.md, "First sight")."""
        problems: list[str] = []
        parts = (
            ("custom", self._load_custom),
            ("quorums", self._load_quorums),
            ("reached", self._load_reached),
            ("area_reached", self._load_area_reached),
        )
        for name, load in parts:
            entries = data.get(name) or []
            if type(entries) is not list:
                problems.append(f"{name}: not a list")
                continue
            for entry in entries:
                try:
                    if type(entry) not in (list, tuple) or len(entry) != 2:
                        raise ValueError(
                            f"an entry must be [campaign id, value], not {entry!r:.80}"
                        )
                    cid = _id(entry[0])
                    load(cid, entry[1])
                except (TypeError, ValueError) as exc:
                    self.skipped += 1
                    problems.append(f"{name}: {exc}")
                    continue
                self.note(cid)
        self._next.clear()
        return problems

    def note(self, campaign_id: int) -> None:
        """The server has a record of this campaign (its goals, a threshold it reached): before
        the first full calculation its counts are checked, not taken as a silent baseline."""
        if not self.loaded:
            self.known.add(campaign_id)

    def _load_custom(self, cid: int, ladder: Any) -> None:
        spec = check_goals({"supporters": ladder})
        if isinstance(spec, ProtocolError) or spec.supporters is None:
            raise ValueError(f"campaign {cid}: bad goals {ladder!r:.80}")
        self.custom[cid] = spec.supporters

    def _load_quorums(self, cid: int, quorums: Any) -> None:
        spec = check_goals({"area": quorums})
        if isinstance(spec, ProtocolError):
            raise ValueError(f"campaign {cid}: bad quorums {quorums!r:.80}")
        if spec.area:
            self.quorums[cid] = dict(spec.area)

    def _load_reached(self, cid: int, reached: Any) -> None:
        self._reach(cid, _thresholds(reached))

    def _load_area_reached(self, cid: int, areas: Any) -> None:
        if type(areas) is not dict:
            raise ValueError(f"campaign {cid}: bad reached quorums")
        for area, ts in areas.items():
            if type(area) is not str:
                raise ValueError(f"campaign {cid}: bad area {area!r:.40}")
            _thresholds(ts)
        mine = self.area_reached.setdefault(cid, {})
        for area, ts in areas.items():
            mine.setdefault(area, set()).update(ts)

    def info(self) -> dict[str, int]:
        return {
            "fired": self.fired,
            "custom_goals": len(self.custom),
            "quorums": len(self.quorums),
            "snapshot_entries_skipped": self.skipped,
        }


def _id(value: object) -> int:
    if type(value) is not int or not 0 < value <= MAX_ID:
        raise ValueError(f"a campaign id must be a positive integer, not {value!r}")
    return value


def _thresholds(value: object) -> list[int]:
    if type(value) is not list or any(type(t) is not int or t <= 0 for t in value):
        raise ValueError(f"thresholds must be positive integers, not {value!r:.80}")
    return value


__all__ = [
    "DEFAULT_LADDER",
    "MAX_AREA_NAME",
    "MAX_QUORUM_AREAS",
    "MAX_THRESHOLDS",
    "GoalKeeper",
    "GoalsSpec",
    "check_goals",
    "event_id",
]
