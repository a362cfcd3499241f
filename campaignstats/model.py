"""The counting model: per-campaign state, increments, calculation results and the exact merge.

Plain Python with no I/O and no event loop (shared/DESIGN.md, "Per-campaign state"). Only the actor
task mutates a live :class:`StatsState`; tests call :meth:`StatsState.apply` directly.

Semantics follow Proca's ``Proca.Server.Stats.increment/5``, with two deliberate differences from
its code: ``area`` and ``org`` move only for a new supporter (Proca seeds a new area with 1 even
for a returning supporter), and no zero-valued keys are created, so that memory and a recount from
the database compare equal key for key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

from campaignstats.errors import BadMessage, Invalid, ProtocolError

#: Wire STATS map: ``{"supporters", "action", "area", "org", "extra_supporters"}``.
WireStats = dict[str, Any]

DEFAULT_MAX_KEYS = 10_000
DEFAULT_JOURNAL_LIMIT = 5_000_000  # increments: about 500 MB at worst
MAX_ID = 2**63 - 1
DEFAULT_MAX_STRING = 64  # bytes of UTF-8, for action_type and area


class Increment(NamedTuple):
    """One change, as the wire and the embedding API carry it (docs/protocol.md, "Increments").

    The same fields describe an increment and a decrement (its exact inverse); which one it is
    depends on the message that carries it, never on the fields. The first seven are the v1
    array form, in order; the rest only travel in the map form (or as keyword arguments).
    """

    campaign_id: int
    org_id: int
    action_type: str
    area: str | None = None
    new_supporter: bool = False
    count: int = 1  # type: ignore[assignment]  # the wire's name; shadows tuple.count
    action_id: int | None = None
    #: pg_current_xact_id() of the transaction that made the change count (or stop counting)
    txid: int | None = None
    #: when the change happened, epoch seconds (from the backend's clock)
    at: float | None = None
    #: the action page it was made on
    page: int | None = None
    #: mail-to-target messages it sent (Proca #312)
    messages: int = 0


#: the map form's keys, and the Increment field each one fills
MAP_KEYS: dict[str, str] = {
    "campaign": "campaign_id",
    "org": "org_id",
    "type": "action_type",
    "area": "area",
    "new": "new_supporter",
    "count": "count",
    "action": "action_id",
    "txid": "txid",
    "at": "at",
    "page": "page",
    "messages": "messages",
}

#: the latest ``at`` accepted: a little after the year 9999, so that a timestamp in milliseconds
#: (a common mistake) is refused rather than filed ten thousand years ahead
MAX_AT = 253_402_300_800.0


def _utf8_length(text: str) -> int:
    """Bytes of ``text`` in UTF-8; -1 when it cannot be encoded (a lone surrogate)."""
    try:
        return len(text.encode())
    except UnicodeEncodeError:
        return -1


def _optional_id(value: object, name: str) -> ProtocolError | None:
    if value is None:
        return None
    if type(value) is not int:
        return BadMessage(f"{name} must be an integer or nil")
    if not 0 < value <= MAX_ID:
        return Invalid(f"{name} must be between 1 and 2**63-1")
    return None


def check_increment(inc: Increment, max_string: int = DEFAULT_MAX_STRING) -> ProtocolError | None:
    """Why ``inc`` is not a valid increment (or decrement), or None when it is.

    The one validator: the wire codec (on its slow path), the embedding API and the clients all
    call it. A wrong type is :class:`BadMessage`, a value out of range :class:`Invalid` (the
    wire codes ``bad_message`` and ``invalid``).
    """
    cid, org_id, action_type, area, new_supporter, count, action_id, txid, at, page, messages = inc
    if type(cid) is not int or type(org_id) is not int:
        return BadMessage("campaign_id and org_id must be integers")
    if not (0 < cid <= MAX_ID and 0 < org_id <= MAX_ID):
        return Invalid(f"ids must be between 1 and 2**63-1 (campaign_id={cid}, org_id={org_id})")
    if type(action_type) is not str:
        return BadMessage("action_type must be a string")
    if not 0 < _utf8_length(action_type) <= max_string:
        return Invalid(f"action_type must be 1 to {max_string} bytes of UTF-8")
    if area is not None:
        if type(area) is not str:
            return BadMessage("area must be a string or nil")
        if not 0 < _utf8_length(area) <= max_string:
            return Invalid(f"area must be 1 to {max_string} bytes of UTF-8")
    if type(new_supporter) is not bool:
        return BadMessage("new_supporter must be a boolean")
    if type(count) is not int:
        return BadMessage("count must be an integer")
    if not 0 < count <= MAX_ID:
        return Invalid("count must be >= 1")
    error = (
        _optional_id(action_id, "action_id")
        or _optional_id(txid, "txid")
        or _optional_id(page, "page")
    )
    if error is not None:
        return error
    if at is not None:
        if type(at) is not float and type(at) is not int:
            return BadMessage("at must be a number (epoch seconds) or nil")
        if not 0 <= at <= MAX_AT or at != at:
            return Invalid("at must be epoch seconds between 0 and the year 9999")
    if type(messages) is not int:
        return BadMessage("messages must be an integer")
    if not 0 <= messages <= MAX_ID:
        return Invalid("messages must be >= 0")
    return None


def increment_from_map(item: Mapping[Any, Any]) -> Increment | ProtocolError:
    """The map form of an increment (docs/protocol.md) as an :class:`Increment`, or why not.

    ``campaign``, ``org`` and ``type`` are required; an unknown key is ``bad_message``. Only the
    shape is checked here; :func:`check_increment` checks the values.
    """
    fields: dict[str, Any] = {}
    for key, value in item.items():
        name = MAP_KEYS.get(key) if type(key) is str else None
        if name is None:
            return BadMessage(f"unknown increment key {str(key)[:40]!r}")
        fields[name] = value
    for required in ("campaign", "org", "type"):
        if MAP_KEYS[required] not in fields:
            return BadMessage(f"an increment map needs {required!r}")
    if fields.get("count", 1) is None:  # nil means the default, as for the optional ids
        fields["count"] = 1
    if fields.get("messages", 0) is None:
        fields["messages"] = 0
    if fields.get("new_supporter", False) is None:
        fields["new_supporter"] = False
    return Increment(**fields)


class IncrementLike(Protocol):
    """What :meth:`StatsState.apply_many` reads: an :class:`Increment`, or the wire codec's
    decoded item (same fields, validated)."""

    @property
    def campaign_id(self) -> int: ...
    @property
    def org_id(self) -> int: ...
    @property
    def action_type(self) -> str: ...
    @property
    def area(self) -> str | None: ...
    @property
    def new_supporter(self) -> bool: ...
    @property
    def count(self) -> int: ...
    @property
    def action_id(self) -> int | None: ...
    @property
    def txid(self) -> int | None: ...
    @property
    def at(self) -> float | None: ...
    @property
    def page(self) -> int | None: ...
    @property
    def messages(self) -> int: ...


#: what a calculation covers: every campaign, the live ones, or a list of campaign ids
Scope = Literal["all", "live"] | Sequence[int]


def scope_name(scope: Scope) -> str:
    """``"all"``, ``"live"`` or ``"ids"``: how logs and ``info`` name a scope."""
    return scope if isinstance(scope, str) else "ids"


@dataclass(slots=True)
class CampaignStats:
    """Counts of one campaign. ``supporters`` and ``org`` include ``extra_supporters``."""

    supporters: int = 0
    action: dict[str, int] = field(default_factory=dict)
    area: dict[str, int] = field(default_factory=dict)
    org: dict[int, int] = field(default_factory=dict)
    extra_supporters: int = 0

    def copy(self) -> CampaignStats:
        return CampaignStats(
            self.supporters,
            dict(self.action),
            dict(self.area),
            dict(self.org),
            self.extra_supporters,
        )

    def to_wire(self) -> WireStats:
        """The STATS map of the wire. Copies, so the caller may keep it while the state moves on."""
        return {
            "supporters": self.supporters,
            "action": dict(self.action),
            "area": dict(self.area),
            "org": dict(self.org),
            "extra_supporters": self.extra_supporters,
        }

    @classmethod
    def from_wire(cls, stats: Mapping[str, Any]) -> CampaignStats:
        return cls(
            int(stats["supporters"]),
            dict(stats["action"]),
            dict(stats["area"]),
            dict(stats["org"]),
            int(stats["extra_supporters"]),
        )

    def add(self, inc: IncrementLike) -> None:
        """Apply one increment with no limit checks (used when replaying a journal)."""
        self.action[inc.action_type] = self.action.get(inc.action_type, 0) + inc.count
        if inc.new_supporter:
            self.supporters += 1
            self.org[inc.org_id] = self.org.get(inc.org_id, 0) + 1
            if inc.area is not None:
                self.area[inc.area] = self.area.get(inc.area, 0) + 1


def empty_wire_stats() -> WireStats:
    """STATS of an unknown campaign: all zeros and empty maps (a fresh copy)."""
    return CampaignStats().to_wire()


@dataclass(slots=True)
class CampaignDrift:
    """How far memory was from the truth (database value plus unseen increments) at a merge.

    Positive numbers mean memory counted more than the truth.
    """

    campaign_id: int
    supporters: int
    actions: int

    @property
    def is_zero(self) -> bool:
        return self.supporters == 0 and self.actions == 0


@dataclass(slots=True)
class CalculationResult:
    """What one calculation read from Postgres, in one snapshot.

    ``campaigns`` has an entry for every covered campaign, zero or not: a covered campaign that is
    missing from the result has no supporters in the database, which is itself a fact to merge.
    """

    kind: str  # "all", "live" or "ids"
    campaigns: dict[int, CampaignStats]
    max_action_id: int
    started_at: float = 0.0  # wall clock, seconds since the epoch
    duration: float = 0.0  # seconds
    rows: int = 0  # rows read from the database
    #: action ids at or below ``max_action_id`` that the snapshot did not see (in-flight or
    #: rolled-back transactions: gaps among the newest ids); their increments are not in it
    invisible_ids: frozenset[int] = frozenset()


class StatsState:
    """All campaigns' counts, with the journal the exact merge needs.

    ``journal`` is ``None`` when no calculation is running. While one runs it maps a campaign id to
    the increments applied to that campaign since the calculation started, so that each covered
    campaign can become "database value + increments the snapshot could not contain".
    """

    __slots__ = (
        "already_counted",
        "applied",
        "campaigns",
        "journal",
        "journal_limit",
        "journal_only",
        "journal_overflow",
        "journal_size",
        "max_campaigns",
        "max_keys",
        "seen",
    )

    def __init__(
        self, *, max_keys: int = DEFAULT_MAX_KEYS, max_campaigns: int | None = None
    ) -> None:
        self.campaigns: dict[int, CampaignStats] = {}
        self.journal: dict[int, list[IncrementLike]] | None = None
        #: campaigns worth journaling (the calculation's scope when known), None: all
        self.journal_only: frozenset[int] | None = None
        #: the journal is bounded: past this many increments it is dropped, and the calculation
        #: it was for cannot be merged exactly (it is then treated as failed and retried)
        self.journal_limit = DEFAULT_JOURNAL_LIMIT
        self.journal_size = 0
        self.journal_overflow = False
        #: per campaign, what its last merged calculation saw: (max action id, invisible ids).
        #: An increment whose action the database value already holds is not applied again.
        self.seen: dict[int, tuple[int, frozenset[int]]] = {}
        self.max_keys = max_keys
        self.max_campaigns = max_campaigns
        self.applied = 0  # increments applied since start (each counts once, whatever its count)
        self.already_counted = 0  # increments skipped: a merged calculation had counted them

    # -- increments -----------------------------------------------------------------------------

    def apply(self, inc: Increment) -> None:
        """Apply one increment, or raise :class:`Invalid` and change nothing."""
        rejected = self.apply_many((inc,))
        if rejected:
            raise Invalid(rejected[0][1])

    def apply_many(self, incs: Iterable[IncrementLike]) -> list[tuple[int, str]]:
        """Apply a batch; returns ``(index, reason)`` for each rejected increment.

        Increments are validated by the codec already; what is checked here depends on the state:
        the cap on distinct keys per campaign and on campaigns in total. A rejected increment
        changes nothing. This is the hot path: lookups are hoisted and no object is allocated per
        increment unless a new key or campaign appears.
        """
        campaigns = self.campaigns
        journal = self.journal
        only = self.journal_only
        journaled = 0
        max_keys = self.max_keys
        seen = self.seen
        rejected: list[tuple[int, str]] = []
        applied = 0
        for i, inc in enumerate(incs):
            # By attribute: the codec's msgspec items and Increment tuples both have them, so a
            # decoded batch is applied as it is, with no copy per increment.
            cid = inc.campaign_id
            action_id = inc.action_id
            if action_id is not None and seen:
                horizon = seen.get(cid)
                if horizon is not None and action_id <= horizon[0] and action_id not in horizon[1]:
                    # Announced after a calculation that already counted it: applying it would
                    # count it twice.
                    self.already_counted += 1
                    continue
            org_id, action_type, area = inc.org_id, inc.action_type, inc.area
            new_supporter, count = inc.new_supporter, inc.count
            stats = campaigns.get(cid)
            if stats is None:
                if self.max_campaigns is not None and len(campaigns) >= self.max_campaigns:
                    rejected.append(
                        (i, f"campaign {cid}: over the limit of {self.max_campaigns} campaigns")
                    )
                    continue
                stats = campaigns[cid] = CampaignStats()
            action = stats.action
            n = action.get(action_type)
            if n is None:
                if len(action) >= max_keys:
                    rejected.append((i, f"campaign {cid}: over {max_keys} action types"))
                    continue
                n = 0
            total = n + count
            if total > MAX_ID:  # a total must stay a MessagePack int64
                rejected.append((i, f"campaign {cid}: {action_type!r} count would overflow"))
                continue
            if new_supporter:
                org = stats.org
                o = org.get(org_id)
                if o is None:
                    if len(org) >= max_keys:
                        rejected.append((i, f"campaign {cid}: over {max_keys} orgs"))
                        continue
                    o = 0
                if area is not None:
                    areas = stats.area
                    a = areas.get(area)
                    if a is None:
                        if len(areas) >= max_keys:
                            rejected.append((i, f"campaign {cid}: over {max_keys} areas"))
                            continue
                        a = 0
                    areas[area] = a + 1
                org[org_id] = o + 1
                stats.supporters += 1
            action[action_type] = total
            applied += 1
            if journal is not None and (only is None or cid in only):
                entries = journal.get(cid)
                if entries is None:
                    journal[cid] = [inc]
                else:
                    entries.append(inc)
                journaled += 1
        self.applied += applied
        if journaled:
            self.journal_size += journaled
            if self.journal_size > self.journal_limit:
                self.journal = None
                self.journal_overflow = True
        return rejected

    # -- queries --------------------------------------------------------------------------------

    def stats(self, campaign_id: int) -> WireStats:
        stats = self.campaigns.get(campaign_id)
        return empty_wire_stats() if stats is None else stats.to_wire()

    # -- the exact merge (shared/DESIGN.md, "The actor") ----------------------------------------

    def start_journal(self, only: Iterable[int] | None = None) -> None:
        """Start recording increments; called when a calculation starts, before its snapshot.

        ``only``: the campaigns the calculation covers, when known in advance (a list of ids).
        """
        self.journal = {}
        self.journal_only = None if only is None else frozenset(only)
        self.journal_size = 0
        self.journal_overflow = False

    def stop_journal(self) -> None:
        self.journal = None
        self.journal_only = None

    def merge(
        self, result: CalculationResult, campaign_ids: Iterable[int] | None = None
    ) -> list[CampaignDrift]:
        """Make each covered campaign equal to its database value plus the unseen increments.

        Unseen increments are the journaled ones the snapshot could not contain: those with an
        ``action_id`` above ``result.max_action_id`` or among its invisible ids, and all of
        those without an action id. From then on, an increment of this campaign whose action the
        snapshot held is skipped (see :meth:`apply_many`), so no increment counts twice.
        ``campaign_ids`` selects a part of the result, so that the actor can merge a large result
        in slices and keep serving between them; the journal keeps recording meanwhile, so a
        campaign merged in a later slice also gets the increments that arrived in between.
        Returns the non-zero drifts.
        """
        journal = self.journal or {}
        max_id = result.max_action_id
        invisible = result.invisible_ids
        horizon = (max_id, invisible)
        ids = result.campaigns.keys() if campaign_ids is None else campaign_ids
        drifts: list[CampaignDrift] = []
        for cid in ids:
            truth = result.campaigns[cid].copy()
            for inc in journal.get(cid, ()):
                aid = inc.action_id
                if aid is None or aid > max_id or aid in invisible:
                    truth.add(inc)
            before = self.campaigns.get(cid)
            # Drift only means something for a campaign memory had loaded before (from a merge or
            # a snapshot); increments alone before the first load are not "drift".
            if before is not None and cid in self.seen:
                drift = CampaignDrift(
                    cid,
                    before.supporters - truth.supporters,
                    sum(before.action.values()) - sum(truth.action.values()),
                )
                if not drift.is_zero:
                    drifts.append(drift)
            self.campaigns[cid] = truth
            self.seen[cid] = horizon
        return drifts

    def replace_all(self, campaigns: Mapping[int, CampaignStats]) -> None:
        """Load a snapshot file's content (before any calculation)."""
        self.campaigns = {cid: stats.copy() for cid, stats in campaigns.items()}
        # Loaded, so drift is measured at the first merge; a horizon of 0 skips nothing.
        self.seen = dict.fromkeys(campaigns, (0, frozenset()))
