"""The counting model: per-campaign state, increments, calculation results and the exact merge.

Plain Python with no I/O and no event loop (docs/design.md, "Per-campaign state"). Only the actor
task mutates a live :class:`StatsState`; tests call :meth:`StatsState.apply` directly.

Semantics follow Proca's ``Proca.Server.Stats.increment/5``, with two deliberate differences from
its code: ``area`` and ``org`` move only for a new supporter (Proca seeds a new area with 1 even
for a returning supporter), and no zero-valued keys are created, so that memory and a recount from
the database compare equal key for key.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple, Protocol
from zoneinfo import ZoneInfo

from campaignstats.errors import BadMessage, Invalid, ProtocolError
from campaignstats.journal import EarlyHorizon, Fold, apply_page
from campaignstats.orgindex import OrgCampaigns
from campaignstats.ranking import TOUCHED_HOURS, SupporterRanking, leaders, too_many
from campaignstats.timeline import BUCKET_MAX, DAY, HOUR, MINUTE, Timeline, recent


def _interned_strings_are_freed() -> bool:
    """Whether ``sys.intern`` forgets a string once nothing else holds it: not on CPython
    3.12, whose interned strings are immortal (PEP 683; mortal again from 3.13)."""
    probe = sys.intern("".join(("campaignstats", ".intern-probe")))  # a string made now
    return sys.getrefcount(probe) < 1 << 28  # immortal: 2**30 - 1 or more (32-bit builds)


#: where interned strings would stay for ever: at most this many keys are shared, the first
#: ones seen (an action type or an area is any string a client sends)
SHARED_KEYS_MAX = 1024
_shared_keys: dict[str, str] = {}


def _share(key: str) -> str:
    held = _shared_keys.get(key)
    if held is not None:
        return held
    if len(_shared_keys) < SHARED_KEYS_MAX:
        _shared_keys[key] = key
    return key


#: one str object per distinct action type or area for the whole process, not one per campaign
#: (docs/design.md, "Memory"): ``sys.intern``, which forgets a string once nothing holds it;
#: on a Python where it would keep every string any client ever sent, a bounded table
intern: Callable[[str], str] = sys.intern if _interned_strings_are_freed() else _share

#: Wire STATS map: ``{"supporters", "action", "area", "org", "extra_supporters"}``.
WireStats = dict[str, Any]

DEFAULT_MAX_KEYS = 10_000
#: orgs looked at per step when forgotten campaigns leave the org index (about 6 ms at 300,000
#: orgs: docs/design.md, "Memory")
FORGET_ORGS_PER_STEP = 20_000
DEFAULT_JOURNAL_LIMIT = 5_000_000  # changes kept one by one (about 200 bytes each) + folded keys
MAX_ID = 2**63 - 1
DEFAULT_MAX_STRING = 64  # bytes of UTF-8, for action_type and area
#: idle campaigns packed (docs/design.md, "Memory", round 3): seconds with no change after
#: which a campaign is packed (``serve --pack-idle``), and seconds between two sweeps, at most
DEFAULT_PACK_IDLE = 300.0
DEFAULT_PACK_INTERVAL = 60.0


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
        return Invalid(f"count must be between 1 and 2**63-1 (count={count})")
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
        return Invalid(f"messages must be between 0 and 2**63-1 (messages={messages})")
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


#: classes of items whose ``txid``, ``at`` and ``page`` are None and ``messages`` 0 for every
#: instance (class attributes: the wire codec's v1 array items register theirs): the plain
#: path does not read them (docs/design.md, "Per-campaign state")
PLAIN_ITEM_TYPES: set[type[Any]] = set()

#: what a calculation covers: every campaign, the live ones, or a list of campaign ids
Scope = Literal["all", "live"] | Sequence[int]


def scope_name(scope: Scope) -> str:
    """``"all"``, ``"live"`` or ``"ids"``: how logs and ``info`` name a scope."""
    return scope if isinstance(scope, str) else "ids"


#: the three maps of a campaign, as :meth:`CampaignStats.maps` gives them
Maps = tuple[dict[str, int], dict[str, int], dict[int, int]]

#: the packed form of three empty maps (a MessagePack array of three empty maps): one bytes
#: object for every empty packed campaign
_EMPTY_PACKED = b"\x93\x80\x80\x80"
_pack: Callable[[object], bytes] | None = None


def _unpackb_first(data: bytes) -> Any:
    import msgpack

    return msgpack.unpackb(data)


#: msgpack.unpackb (set at the first pack): a folded timeline is read through it
_unpackb: Callable[[bytes], Any] = _unpackb_first


def _packb(maps: tuple[object, ...]) -> bytes:
    """MessagePack of a campaign's three maps (or of a folded timeline's four numbers). msgpack
    is imported at the first pack: the model imports with the standard library alone
    (tests/test_review_memory.py runs it so)."""
    global _pack, _unpackb
    if _pack is None:
        import msgpack

        _pack = msgpack.Packer().pack  # resets after every call: one for the process
        _unpackb = msgpack.unpackb
    return _pack(maps)


def _unpack_maps(packed: bytes) -> Maps:
    """The three maps of a packed campaign, as fresh dicts (keys not interned)."""
    import msgpack  # only a packed campaign gets here (see _packb)

    action, area, org = msgpack.unpackb(packed, strict_map_key=False)
    return action, area, org


@dataclass(slots=True, eq=False)
class CampaignStats:
    """Counts of one campaign. ``supporters`` and ``org`` include ``extra_supporters``.

    An idle campaign may be *packed* (docs/design.md, "Memory", round 3): its three maps are
    then one MessagePack ``bytes`` (``packed``) and it holds no dict. It is then of the class
    :class:`PackedCampaignStats`, whose ``action``, ``area`` and ``org`` unpack it for good
    (its class back to this one) and return the dict: every write path stays exact, and costs
    nothing more while unpacked (this class has no hook: its slot reads are the interpreter's
    fastest). Code that only reads uses :meth:`maps` or :meth:`to_wire`, which leave a packed
    campaign packed.
    """

    supporters: int = 0
    action: dict[str, int] = field(default_factory=dict)
    area: dict[str, int] = field(default_factory=dict)
    org: dict[int, int] = field(default_factory=dict)
    extra_supporters: int = 0
    messages: int = 0

    #: the three maps as MessagePack while packed (:class:`PackedCampaignStats`), else None
    packed: ClassVar[bytes | None] = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CampaignStats):
            return NotImplemented
        return (
            self.supporters == other.supporters
            and self.extra_supporters == other.extra_supporters
            and self.messages == other.messages
            and self.maps() == other.maps()
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, as the dataclass had it

    def __repr__(self) -> str:
        action, area, org = self.maps()
        return (
            f"CampaignStats(supporters={self.supporters!r}, action={action!r}, area={area!r}, "
            f"org={org!r}, extra_supporters={self.extra_supporters!r}, "
            f"messages={self.messages!r}{', packed' if self.packed is not None else ''})"
        )

    @staticmethod
    def from_packed(
        supporters: int, packed: bytes, extra_supporters: int = 0, messages: int = 0
    ) -> CampaignStats:
        """A packed campaign: no dict is made."""
        stats = PackedCampaignStats.__new__(PackedCampaignStats)
        stats.supporters = supporters
        stats.extra_supporters = extra_supporters
        stats.messages = messages
        _MAPS_SLOT.__set__(stats, _EMPTY_PACKED if packed == _EMPTY_PACKED else packed)
        return stats

    def maps(self) -> Maps:
        """``(action, area, org)`` for reading: the live dicts, or, while packed, fresh ones
        decoded for the caller (the campaign stays packed). Never change them."""
        packed = self.packed
        if packed is None:
            return self.action, self.area, self.org
        return _unpack_maps(packed)

    def pack(self) -> bool:
        """Keep the three maps as one MessagePack ``bytes`` (empty ones too: three empty dicts
        cost 192 bytes); False when packed already."""
        if self.packed is not None:
            return False
        packed = _packb((self.action, self.area, self.org))
        del self.area, self.org
        # The bytes live in the ``action`` slot, which PackedCampaignStats reads as ``packed``.
        _MAPS_SLOT.__set__(self, _EMPTY_PACKED if packed == _EMPTY_PACKED else packed)
        self.__class__ = PackedCampaignStats
        return True

    def unpack(self) -> None:
        """Install the maps again (keys interned, as the hot path interns them)."""
        packed = self.packed
        if packed is None:
            return
        action, area, org = _unpack_maps(packed)
        self.__class__ = CampaignStats
        self.action = {intern(k): n for k, n in action.items()}
        self.area = {intern(k): n for k, n in area.items()}
        self.org = org

    def packed_copy(self) -> CampaignStats:
        """A packed copy (the same bytes when packed already)."""
        packed = self.packed
        if packed is None:
            packed = _packb((self.action, self.area, self.org))
        return CampaignStats.from_packed(
            self.supporters, packed, self.extra_supporters, self.messages
        )

    def copy(self) -> CampaignStats:
        """A copy whose keys are interned (a calculation's come one per database row); a
        packed campaign's copy is packed (the bytes are shared)."""
        if self.packed is not None:
            return self.packed_copy()
        return CampaignStats(
            self.supporters,
            {intern(k): n for k, n in self.action.items()},
            {intern(k): n for k, n in self.area.items()},
            dict(self.org),
            self.extra_supporters,
            self.messages,
        )

    def to_wire(self) -> WireStats:
        """The STATS map of the wire. Copies, so the caller may keep it while the state moves on;
        a packed campaign stays packed."""
        packed = self.packed
        if packed is None:
            action, area, org = dict(self.action), dict(self.area), dict(self.org)
        else:
            action, area, org = _unpack_maps(packed)  # fresh dicts already
        return {
            "supporters": self.supporters,
            "action": action,
            "area": area,
            "org": org,
            "extra_supporters": self.extra_supporters,
            "messages": self.messages,
        }

    @classmethod
    def from_wire(cls, stats: Mapping[str, Any]) -> CampaignStats:
        """From a STATS map, with its keys interned (the merge builds a campaign's new counts
        through it: docs/design.md, "Memory")."""
        return cls(
            int(stats["supporters"]),
            {intern(k): n for k, n in stats["action"].items()},
            {intern(k): n for k, n in stats["area"].items()},
            dict(stats["org"]),
            int(stats["extra_supporters"]),
            int(stats.get("messages", 0)),
        )

    def add(self, inc: IncrementLike) -> None:
        """Apply one increment with no limit checks (used when replaying a journal)."""
        action, key = self.action, inc.action_type
        n = action.get(key)
        if n is None:
            action[intern(key)] = inc.count
        else:
            action[key] = n + inc.count
        if inc.new_supporter:
            self.supporters += 1
            self.org[inc.org_id] = self.org.get(inc.org_id, 0) + 1
            area = inc.area
            if area is not None:
                areas = self.area
                a = areas.get(area)
                if a is None:
                    areas[intern(area)] = 1
                else:
                    areas[area] = a + 1
        if inc.messages:
            self.messages += inc.messages

    def subtract(self, inc: IncrementLike) -> bool:
        """Take one increment back (docs/design.md, "Counts that go down").

        No count goes below zero and a key whose count reaches zero disappears, so memory and a
        recount compare equal key for key. Returns True when some count had to be clamped (it
        held less than the decrement takes back).
        """
        clamped = _take(self.action, inc.action_type, inc.count)
        if inc.new_supporter:
            # Offline supporters are in ``supporters`` too, and no change takes them back.
            if self.supporters > self.extra_supporters:
                self.supporters -= 1
            else:
                clamped = True
            clamped = _take(self.org, inc.org_id, 1) or clamped
            if inc.area is not None:
                clamped = _take(self.area, inc.area, 1) or clamped
        if inc.messages:
            if self.messages >= inc.messages:
                self.messages -= inc.messages
            else:
                self.messages = 0
                clamped = True
        return clamped


#: the ``action`` slot itself: a packed campaign keeps its bytes there
_MAPS_SLOT: Any = CampaignStats.__dict__["action"]


def _unpacked(name: str) -> Any:
    def read(self: CampaignStats) -> Any:
        self.unpack()  # its class is CampaignStats from here: the slot is read directly
        return getattr(self, name)

    read.__name__ = name
    return property(read, doc=f"``{name}``, after unpacking the campaign for good")


class PackedCampaignStats(CampaignStats):
    """A packed :class:`CampaignStats` (the same slots: an object changes class in place).
    Its maps are the MessagePack bytes in ``packed`` (kept in the ``action`` slot; ``area``
    and ``org`` are unset); reading ``action``, ``area`` or ``org`` unpacks it."""

    __slots__ = ()

    if not TYPE_CHECKING:  # mypy keeps the dict types of CampaignStats for these names
        action = _unpacked("action")
        area = _unpacked("area")
        org = _unpacked("org")

        @property
        def packed(self) -> bytes:
            return _MAPS_SLOT.__get__(self, CampaignStats)

    def __reduce__(self) -> tuple[Any, ...]:
        # copy, deepcopy and pickle: the default state is read slot by slot through the
        # properties (which unpack) and set back through them (which have no setter)
        return (
            CampaignStats.from_packed,
            (self.supporters, self.packed, self.extra_supporters, self.messages),
        )


#: the ``area`` and ``org`` slots: a packed campaign with its timeline folded in keeps its state
#: and its id there (:class:`FoldedCampaignStats`)
_AREA_SLOT: Any = CampaignStats.__dict__["area"]
_ORG_SLOT: Any = CampaignStats.__dict__["org"]


class FoldedCampaignStats(PackedCampaignStats):
    """A packed campaign whose lazy timeline is folded into its bytes too (docs/design.md,
    "Memory", round 4): its state's ``timelines`` holds no entry and no :class:`Timeline` for
    it. The ``action`` slot holds the maps' MessagePack followed by one MessagePack array of the
    timeline's four numbers (:meth:`Timeline.lazy_state`; the minute as a uint32, in the four
    bytes before the last) and the array's own length in bytes (its last byte); ``packed`` is
    the maps' bytes alone (a copy). The ``area`` slot holds the :class:`StatsState` and ``org``
    the campaign's id: the first write unpacks it as any packed campaign, and puts its timeline
    back in the state's ``timelines``. Reads of the timeline rebuild a copy
    (:meth:`StatsState.timeline_of`)."""

    __slots__ = ()

    if not TYPE_CHECKING:

        @property
        def packed(self) -> bytes:
            raw = _MAPS_SLOT.__get__(self, CampaignStats)
            return raw[: -raw[-1]]

    def folded_state(self) -> tuple[int, int, int, float]:
        """The folded timeline's :meth:`Timeline.lazy_state`."""
        raw = _MAPS_SLOT.__get__(self, CampaignStats)
        supporters, actions, last, minute, _ = _unpackb(raw[-raw[-1] :])
        return minute, supporters, actions, last

    def folded_timeline(self) -> Timeline:
        """A copy of the folded timeline, to read."""
        return Timeline.from_lazy_state(*self.folded_state())

    def folded_supporters(self, unit: int, lo: int, hi: int) -> int:
        """``folded_timeline().unit_total(unit, lo, hi)[0]`` without building the timeline
        (``top`` by the last hour or today asks it of every candidate): the lazy branch of
        :meth:`Timeline.unit_total`. The minute is read first, in its four bytes: most idle
        campaigns' is out of the range."""
        raw = _MAPS_SLOT.__get__(self, CampaignStats)
        if not lo <= int.from_bytes(raw[-5:-1], "big") * MINUTE // unit < hi:
            return 0
        supporters, actions, _, _, _ = _unpackb(raw[-raw[-1] :])
        return min(supporters, BUCKET_MAX) if supporters or actions else 0

    def unpack(self) -> None:
        state = _AREA_SLOT.__get__(self, CampaignStats)
        cid = _ORG_SLOT.__get__(self, CampaignStats)
        timeline = self.folded_timeline()
        CampaignStats.unpack(self)  # its class is CampaignStats from here, its slots the maps
        if state.campaigns.get(cid) is self and cid not in state.timelines:
            state.timelines[cid] = timeline


def _take(counts: dict[Any, int], key: Any, n: int) -> bool:
    """Subtract ``n`` from ``counts[key]``, dropping the key at zero; True if clamped."""
    have = counts.get(key, 0)
    if have > n:
        counts[key] = have - n
        return False
    if have:
        del counts[key]
    return have < n


def empty_wire_stats() -> WireStats:
    """STATS of an unknown campaign: all zeros and empty maps (a fresh copy)."""
    return CampaignStats().to_wire()


@dataclass(slots=True)
class PageStats:
    """Counts of one action page (docs/design.md, "Action pages and orgs"): the campaign's
    semantics restricted to the page's actions. ``stats.org`` holds at most the page's org."""

    campaign_id: int
    org_id: int
    stats: CampaignStats = field(default_factory=CampaignStats)

    def copy(self) -> PageStats:
        return PageStats(self.campaign_id, self.org_id, self.stats.copy())

    def to_wire(self) -> WireStats:
        wire = self.stats.to_wire()
        wire["campaign_id"] = self.campaign_id
        return wire


def empty_page_stats() -> WireStats:
    """STATS of an unknown page: all zeros, ``campaign_id`` 0 (no campaign)."""
    wire = empty_wire_stats()
    wire["campaign_id"] = 0
    return wire


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


# -- what a calculation's snapshot saw -------------------------------------------------------------

#: an ``at`` this much older than a snapshot is taken as seen by it; closer than that, a change
#: is replayed (the next calculation confirms), since the backend's clock and the database's
#: may disagree by a little
AT_MARGIN = 1.0  # seconds
#: an ``at`` up to this far ahead of the server's clock is filed in its own bucket, as the
#: database files it: Proca's ``timestamp(0)`` rounds ``inserted_at`` to the nearest second (up
#: to half a second after the clock that made it), and clocks disagree by a little. Further
#: ahead, a change is filed at its arrival (a far-future minute would push the kept minutes out)
AT_AHEAD = 60.0  # seconds


@dataclass(frozen=True, slots=True)
class TxSnapshot:
    """``pg_current_snapshot()`` of a calculation: which transactions its counts include.

    A transaction id is visible (its changes are in the counts) iff it is below ``xmin``, or
    below ``xmax`` and not among ``xip``, the transactions still in progress when it was taken.
    """

    xmin: int
    xmax: int
    xip: frozenset[int] = frozenset()

    @classmethod
    def parse(cls, text: str) -> TxSnapshot:
        """From Postgres's text form ``xmin:xmax:xip,xip,...``."""
        xmin, xmax, xip = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x))

    def sees(self, txid: int) -> bool:
        return txid < self.xmin or (txid < self.xmax and txid not in self.xip)


@dataclass(frozen=True, slots=True)
class Horizon:
    """What one calculation's snapshot counted, for deciding whether a change is in it.

    * ``snapshot``: exact for any change carrying ``txid`` (docs/design.md, "Exact by
      transaction id").
    * ``max_action_id``, ``window_low`` and ``uncounted``: for changes carrying only
      ``action_id``. Ids in ``(window_low, max_action_id]`` are known one by one: ``uncounted``
      holds those the snapshot did not count (invisible to it, or not accepted yet). Ids at or
      below ``window_low`` are not known: a change about them is applied, and the next
      calculation confirms it.
    * ``taken_at``: the database's clock when the snapshot was taken, for changes carrying only
      ``at``.
    """

    max_action_id: int = 0
    window_low: int = 0
    uncounted: frozenset[int] = frozenset()
    snapshot: TxSnapshot | None = None
    taken_at: float | None = None

    def knows(self, aid: int) -> bool:
        """Whether the snapshot recorded, for action ``aid``, if it counted it."""
        return self.window_low < aid <= self.max_action_id

    def reflects(
        self, inc: IncrementLike, decrement: bool, counted_now: dict[int, bool] | None
    ) -> bool:
        """True when the counts already include the change ``inc``: the snapshot's counts, or
        the changes of known actions counted on top of them since.

        ``counted_now``: for this campaign, the action ids inside the window whose state
        changed since the snapshot (True: counted now). An action is counted now per this map,
        else per the snapshot; an increment of a counted action, or a decrement of one that is
        not, is already in: a repeated announcement, or the second half of a rejection and
        re-acceptance that the snapshot saw whole.
        """
        txid = inc.txid
        if txid is not None and self.snapshot is not None and self.snapshot.sees(txid):
            return True
        aid = inc.action_id
        if aid is not None:
            if aid > self.max_action_id:
                return False  # after the snapshot (a repeat counts again: no record kept)
            if self.window_low < aid:
                counted = aid not in self.uncounted
                if counted_now is not None:
                    counted = counted_now.get(aid, counted)
                return counted != decrement
            if txid is not None and self.snapshot is not None:
                return False  # not seen by the snapshot, and the id tells nothing more
            # below the window: unknown by the id; the time may still say
        elif txid is not None and self.snapshot is not None:
            return False
        # The time says only for an increment: a decrement's ``at`` is the time of the action it
        # takes back (its bucket), not of the rejection, which may come after the snapshot.
        at = inc.at
        if at is not None and self.taken_at is not None and not decrement:
            return at < self.taken_at - AT_MARGIN
        return False


#: the horizon of a campaign that memory holds from a snapshot file: nothing is known, so
#: nothing is skipped
NO_HORIZON = Horizon()


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
    #: action ids in ``(window_low, max_action_id]`` that the snapshot did not count: in-flight
    #: or rolled-back transactions, and actions not accepted (yet)
    uncounted_ids: frozenset[int] = frozenset()
    window_low: int = 0
    snapshot: TxSnapshot | None = None
    #: the database's clock when the snapshot was taken (epoch seconds)
    taken_at: float | None = None
    #: False when the database has no messages table: memory keeps its own count
    messages_counted: bool = True
    #: per covered campaign with counted actions, its buckets (docs/design.md, "Time")
    timelines: dict[int, Timeline] = field(default_factory=dict)
    #: the action pages of the covered campaigns (with counted actions or extra supporters),
    #: and the buckets of those with counted actions (docs/design.md, "Action pages and orgs")
    pages: dict[int, PageStats] = field(default_factory=dict)
    page_timelines: dict[int, Timeline] = field(default_factory=dict)
    _horizon: Horizon | None = field(default=None, repr=False, compare=False)
    _pages_of: dict[int, list[int]] | None = field(default=None, repr=False, compare=False)

    def pages_of(self, campaign_id: int) -> list[int]:
        """The ids of the result's pages of one campaign (grouped once, for every slice)."""
        if self._pages_of is None:
            grouped: dict[int, list[int]] = {}
            for pid, page in self.pages.items():
                grouped.setdefault(page.campaign_id, []).append(pid)
            self._pages_of = grouped
        return self._pages_of.get(campaign_id, [])

    @property
    def horizon(self) -> Horizon:
        """What this snapshot counted, built once: every slice of a merge, and every campaign
        merged, shares it."""
        if self._horizon is None:
            self._horizon = Horizon(
                self.max_action_id,
                self.window_low,
                self.uncounted_ids,
                self.snapshot,
                self.taken_at,
            )
        return self._horizon


class Decrement(NamedTuple):
    """A decrement in the journal, which keeps increments and decrements in one ordered list."""

    change: IncrementLike
    #: the time of its bucket (its ``at``, or its arrival when it had none)
    t: float | None = None


class Arrived(NamedTuple):
    """An increment in the journal that carried no ``at`` (or one in the future): the time of
    its bucket, its arrival, is kept beside it so that the replay files it where it was filed."""

    change: IncrementLike
    t: float


class StatsState:
    """All campaigns' counts, with the journal the exact merge needs.

    ``journal`` is ``None`` when no calculation is running. While one runs it maps a campaign id to
    the changes applied to that campaign since the calculation started, in order (decrements
    wrapped in :class:`Decrement`), so that each covered campaign can become "database value +
    the changes the snapshot could not contain".
    """

    __slots__ = (
        "already_counted",
        "applied",
        "campaigns",
        "clamped",
        "clock",
        "counted_now",
        "decremented",
        "forget_orgs_per_step",
        "journal",
        "journal_folds",
        "journal_horizon",
        "journal_limit",
        "journal_only",
        "journal_overflow",
        "journal_size",
        "max_campaigns",
        "max_keys",
        "org_campaigns",
        "org_forgetting",
        "org_pages",
        "org_reader",
        "pack_idle",
        "page_mismatches",
        "page_timelines",
        "pages",
        "pages_of",
        "pages_over_limit",
        "ranking",
        "seen",
        "timelines",
        "touched",
    )

    def __init__(
        self, *, max_keys: int = DEFAULT_MAX_KEYS, max_campaigns: int | None = None
    ) -> None:
        self.campaigns: dict[int, CampaignStats] = {}
        #: per campaign, its counts in time (docs/design.md, "Time"); created with its first
        #: counted action
        self.timelines: dict[int, Timeline] = {}
        #: the clock that files a change without ``at`` (epoch seconds); tests set their own
        self.clock: Callable[[], float] = time.time
        #: campaigns by total supporters, kept current for ``top`` (campaignstats.ranking)
        self.ranking = self._new_ranking()
        #: per UTC hour (epoch hours), the campaigns that got a supporter in it: the candidates
        #: of ``top`` by the last hour and by today (the last TOUCHED_HOURS hours are kept);
        #: None: too many to list, every campaign is a candidate (campaignstats.ranking)
        self.touched: dict[int, set[int] | None] = {}
        self.journal: dict[int, list[IncrementLike | Decrement | Arrived]] | None = None
        #: once the calculation's snapshot is taken (campaignstats.journal): what it is known to
        #: hold, and per campaign the running net of the changes it cannot contain
        self.journal_horizon: EarlyHorizon | None = None
        self.journal_folds: dict[int, Fold] | None = None
        #: campaigns worth journaling (the calculation's scope when known), None: all
        self.journal_only: frozenset[int] | None = None
        #: the journal is bounded: past this many changes kept one by one and folded keys it
        #: is dropped, and the calculation it was for cannot be merged exactly (it is then
        #: treated as failed and retried)
        self.journal_limit = DEFAULT_JOURNAL_LIMIT
        self.journal_size = 0
        self.journal_overflow = False
        #: per campaign, what its last merged calculation saw: a change that calculation
        #: already counted is not applied again
        self.seen: dict[int, Horizon] = {}
        #: per campaign, the action ids inside its last merged snapshot's window whose state
        #: changed since (True: counted now; see :meth:`Horizon.reflects`); small: only the
        #: actions accepted or rejected since that snapshot with their id announced
        self.counted_now: dict[int, dict[int, bool]] = {}
        #: action pages (docs/design.md, "Action pages and orgs"): only those named by a change
        #: or found by a calculation; a campaign without pages costs nothing here
        self.pages: dict[int, PageStats] = {}
        self.page_timelines: dict[int, Timeline] = {}
        #: campaign -> its pages in ``pages``; org -> its pages; org -> the campaigns that have
        #: (or had) it in their ``org`` (a superset: org_stats leaves zeros out)
        self.pages_of: dict[int, set[int]] = {}
        self.org_pages: dict[int, set[int]] = {}
        #: reads the org map alone of packed campaigns for org_stats (:meth:`_packed_org`)
        self.org_reader: Any = None
        self.org_campaigns = OrgCampaigns()  # arrays of ids (docs/design.md, "Memory")
        #: forgotten campaigns leaving the org index a step at a time (:meth:`forget_step`)
        self.org_forgetting: Iterator[int] | None = None
        self.forget_orgs_per_step = FORGET_ORGS_PER_STEP
        self.max_keys = max_keys
        self.max_campaigns = max_campaigns
        self.applied = 0  # increments applied since start (each counts once, whatever its count)
        self.decremented = 0  # decrements applied
        self.clamped = 0  # decrements that took back more than a count held
        self.already_counted = 0  # changes skipped: a merged calculation had counted them
        #: changes naming a page memory knows under another campaign or org: counted in their
        #: campaign, not in that page
        self.page_mismatches = 0
        #: changes naming a new page of a campaign that has ``max_keys`` pages already: counted
        #: in their campaign, no page created (docs/design.md, "Action pages and orgs")
        self.pages_over_limit = 0
        #: seconds with no change after which a campaign may be packed (docs/design.md,
        #: "Memory", round 3); 0: never packed (here: the merge and a snapshot's load install
        #: idle campaigns packed; the actor's sweep packs the others)
        self.pack_idle = 0.0

    def _new_ranking(self) -> SupporterRanking:
        return SupporterRanking(lambda: self.campaigns.keys())

    def _bound(self, hour: int | None) -> None:
        """After a batch: the sets of moved and touched campaigns become a flag once they list
        too many campaigns (campaignstats.ranking; docs/design.md, "Memory"); ``hour``: the
        hour whose set to look at, None: every hour's (after a merge)."""
        campaigns = len(self.campaigns)
        self.ranking.bound(campaigns)
        touched = self.touched
        for h in touched if hour is None else (hour,):
            listed = touched.get(h)
            if listed is not None and too_many(len(listed), campaigns):
                touched[h] = None

    # -- increments -----------------------------------------------------------------------------

    def apply(self, inc: Increment, *, decrement: bool = False) -> None:
        """Apply one change, or raise :class:`Invalid` and change nothing."""
        rejected = self.apply_many((inc,), decrement=decrement)
        if rejected:
            raise Invalid(rejected[0][1])

    def apply_many(
        self, incs: Iterable[IncrementLike], *, decrement: bool = False
    ) -> list[tuple[int, str]]:
        """Apply a batch; returns ``(index, reason)`` for each rejected increment.

        Increments are validated by the codec already; what is checked here depends on the state:
        the cap on distinct keys per campaign and on campaigns in total. A rejected increment
        changes nothing. This is the hot path: lookups are hoisted and no object is allocated per
        increment unless a new key or campaign appears. Decrements are never rejected (they
        create nothing); see :meth:`_decrement_many`.
        """
        if decrement:
            self._decrement_many(incs)
            return []
        if self.journal_horizon is None:  # no journal, or one that lists every change
            batch = incs if isinstance(incs, list | tuple) else list(incs)
            return self._apply_plain(batch, self.clock())
        return self.apply_each(incs)

    def _apply_plain(self, incs: Sequence[IncrementLike], now: float) -> list[tuple[int, str]]:
        """:meth:`apply_many` for the commonest batch, plain increments (no ``at``, no
        ``page``, and no ``action_id`` or ``txid`` that a merged calculation may have
        counted) while no journal is folded: what :meth:`apply_each` does, in the same order
        with the same checks, without asking what only another kind of increment needs
        (docs/design.md, "Per-campaign state"). From the first increment that is not plain,
        the rest of the batch goes through :meth:`apply_each`."""
        campaigns = self.campaigns
        timelines = self.timelines
        max_keys = self.max_keys
        max_campaigns = self.max_campaigns
        seen = self.seen
        journal = self.journal
        only = self.journal_only
        journaled = 0
        rejected: list[tuple[int, str]] = []
        now_minute = int(now) // 60
        ranked = self.ranking.dirty
        org_in = self.org_campaigns.add  # a frame less than _org_in per new org of a campaign
        touched = self._touched(now_minute // 60)
        if touched is None:  # every campaign counts as touched (collapsed), or the clock went
            touched = set()  # back more than a day (noted nowhere): the notes go nowhere
        new_tuple = tuple.__new__
        rest = -1
        plain = PLAIN_ITEM_TYPES
        for i, inc in enumerate(incs):
            if type(inc) in plain:
                messages = 0
            elif inc.at is not None or inc.page is not None:
                rest = i
                break
            else:
                messages = inc.messages
            cid = inc.campaign_id
            if seen and (inc.action_id is not None or inc.txid is not None):
                horizon = seen.get(cid)
                if horizon is not None and (
                    inc.txid is not None or inc.action_id <= horizon.max_action_id  # type: ignore[operator]
                ):
                    rest = i  # the horizon may skip it, or record it: one by one
                    break
            stats = campaigns.get(cid)
            if stats is None:
                if max_campaigns is not None and len(campaigns) >= max_campaigns:
                    rejected.append(
                        (i, f"campaign {cid}: over the limit of {max_campaigns} campaigns")
                    )
                    continue
                stats = campaigns[cid] = CampaignStats()
            action = stats.action
            action_type = inc.action_type
            n = action.get(action_type)
            if n is None:
                if len(action) >= max_keys:
                    rejected.append((i, f"campaign {cid}: over {max_keys} action types"))
                    continue
                n = 0
                action_type = intern(action_type)
            count = inc.count
            total = n + count
            if total > MAX_ID or (messages and stats.messages + messages > MAX_ID):
                rejected.append((i, f"campaign {cid}: {action_type!r} count would overflow"))
                continue
            new_supporter = inc.new_supporter
            if new_supporter:
                org = stats.org
                org_id = inc.org_id
                o = org.get(org_id)
                if o is None:
                    if len(org) >= max_keys:
                        rejected.append((i, f"campaign {cid}: over {max_keys} orgs"))
                        continue
                    o = 0
                    org_in(org_id, cid)
                area = inc.area
                if area is not None:
                    areas = stats.area
                    a = areas.get(area)
                    if a is None:
                        if len(areas) >= max_keys:
                            rejected.append((i, f"campaign {cid}: over {max_keys} areas"))
                            continue
                        a = 0
                        area = intern(area)
                    areas[area] = a + 1
                org[org_id] = o + 1
                stats.supporters += 1
                ranked.add(cid)
                touched.add(cid)
            action[action_type] = total
            if messages:
                stats.messages += messages
            # Filed at its arrival (it has no ``at``): Timeline.add, inlined, as in apply_each
            timeline = timelines.get(cid)
            if timeline is not None and timeline.minute == now_minute:
                if new_supporter:
                    timeline.pending_s += 1
                timeline.pending_a += count
                if now > timeline.last_action_at:
                    timeline.last_action_at = now
            else:
                if timeline is None:
                    timeline = timelines[cid] = Timeline()
                timeline.add(now, new_supporter, count)
            if journal is not None and (only is None or cid in only):
                # Arrived(inc, now), without the Python-level __new__ of a NamedTuple
                entry = new_tuple(Arrived, (inc, now))
                entries = journal.get(cid)
                if entries is None:
                    journal[cid] = [entry]
                else:
                    entries.append(entry)
                journaled += 1
        # every item before ``rest`` (all, without one) was applied unless rejected: not
        # counted one by one
        self.applied += (len(incs) if rest < 0 else rest) - len(rejected)
        if rest >= 0:
            tail = self.apply_each(incs[rest:], now=now)
            rejected.extend((rest + j, reason) for j, reason in tail)
        if journaled:  # after the rest's: the journal is bounded by the whole batch's size
            self._journaled(journaled)
        self._bound(now_minute // 60)
        return rejected

    def apply_each(
        self, incs: Iterable[IncrementLike], *, now: float | None = None
    ) -> list[tuple[int, str]]:
        """:meth:`apply_many` one increment after the other: the general path (every rule:
        horizons, pages, the journal), and the reference the grouped path is tested against.
        ``now``: the batch's clock (read here when None)."""
        campaigns = self.campaigns
        journal = self.journal
        only = self.journal_only
        journaled = 0
        max_keys = self.max_keys
        seen = self.seen
        rejected: list[tuple[int, str]] = []
        applied = 0
        timelines = self.timelines
        pages = self.pages
        if now is None:
            now = self.clock()
        now_minute = int(now) // 60
        ranked = self.ranking.dirty
        touched_now = self._touched(now_minute // 60)
        if touched_now is None:  # the clock went back more than a day: noted nowhere
            touched_now = set()
        for i, inc in enumerate(incs):
            # By attribute: the codec's msgspec items and Increment tuples both have them, so a
            # decoded batch is applied as it is, with no copy per increment.
            cid = inc.campaign_id
            horizon = None
            if seen and (inc.action_id is not None or inc.txid is not None or inc.at is not None):
                horizon = seen.get(cid)
                if horizon is not None and horizon.reflects(inc, False, self.counted_now.get(cid)):
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
                action_type = intern(action_type)
            total = n + count
            messages = inc.messages
            if total > MAX_ID or stats.messages + messages > MAX_ID:  # totals stay int64
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
                    self._org_in(org_id, cid)
                if area is not None:
                    areas = stats.area
                    a = areas.get(area)
                    if a is None:
                        if len(areas) >= max_keys:
                            rejected.append((i, f"campaign {cid}: over {max_keys} areas"))
                            continue
                        a = 0
                        area = intern(area)
                    areas[area] = a + 1
                org[org_id] = o + 1
                stats.supporters += 1
            action[action_type] = total
            if messages:
                stats.messages += messages
            applied += 1
            # Its bucket: its own time, or its arrival; never more than AT_AHEAD ahead of the
            # server's clock.
            at = inc.at
            if at is None or at > now + AT_AHEAD:
                t, minute = now, now_minute
            else:
                t, minute = at, int(at) // 60
            if new_supporter:
                ranked.add(cid)
                if minute == now_minute:
                    touched_now.add(cid)
                else:
                    touched = self._touched(minute // 60)
                    if touched is not None:
                        touched.add(cid)
            timeline = timelines.get(cid)
            if timeline is not None and timeline.minute == minute:
                # Timeline.add, inlined: most changes land in the minute of the one before.
                if new_supporter:
                    timeline.pending_s += 1
                timeline.pending_a += count
                if t > timeline.last_action_at:
                    timeline.last_action_at = t
            else:
                if timeline is None:
                    timeline = timelines[cid] = Timeline()
                timeline.add(t, new_supporter, count)
            page = inc.page
            if page is not None:  # after the campaign's checks: only an applied change counts
                known = pages.get(page)
                if known is None:
                    if len(self.pages_of.get(cid, ())) >= max_keys:
                        # Pages are keys of their campaign: past max_keys, none is created.
                        self.pages_over_limit += 1
                    else:
                        self._page_add(page, inc, t, None)
                elif known.campaign_id != cid or known.org_id != org_id:
                    # A page of another campaign or org: the campaign counts the change (its
                    # totals must not depend on which client came first), the page does not.
                    self.page_mismatches += 1
                else:
                    self._page_add(page, inc, t, known)
            if horizon is not None:
                self._record(cid, horizon, inc.action_id, True)
            if journal is not None and (only is None or cid in only):
                early = self.journal_horizon
                if early is None or (reflected := early.decides(inc, False)) is None:
                    entry: IncrementLike | Arrived = inc if t == at else Arrived(inc, t)
                    entries = journal.get(cid)
                    if entries is None:
                        journal[cid] = [entry]
                    else:
                        entries.append(entry)
                    journaled += 1
                elif not reflected:
                    journaled += self._fold(cid, inc, False, t)
        self.applied += applied
        if journaled:
            self._journaled(journaled)
        self._bound(None)  # an ``at`` may have touched any kept hour
        return rejected

    def _touched(self, hour: int) -> set[int] | None:
        """The campaigns that got a supporter in ``hour`` (allocated for a new hour), or None
        when that hour is older than what is kept, or when every campaign counts as touched
        in it (too many to list: :meth:`_bound`)."""
        if hour in self.touched:
            return self.touched[hour]
        newest = max(self.touched, default=hour)
        if hour <= newest - TOUCHED_HOURS:
            return None
        touched = self.touched[hour] = set()
        for old in [h for h in self.touched if h <= hour - TOUCHED_HOURS]:
            del self.touched[old]
        return touched

    def _record(self, cid: int, horizon: Horizon, aid: int | None, counted: bool) -> None:
        """Remember that action ``aid`` of campaign ``cid`` is ``counted`` now, when the
        campaign's snapshot knows the action (inside its window)."""
        if aid is None or not horizon.knows(aid):
            return
        changed = self.counted_now.get(cid)
        if changed is None:
            self.counted_now[cid] = {aid: counted}
        else:
            changed[aid] = counted

    def _org_in(self, org_id: int, cid: int) -> None:
        """Note that campaign ``cid`` has (or had) org ``org_id`` in its ``org`` (org_stats)."""
        self.org_campaigns.add(org_id, cid)

    def _page_add(self, page: int, inc: IncrementLike, t: float, ps: PageStats | None) -> None:
        """Count an applied increment in its page ``ps`` too (None: created by this change)."""
        if ps is None:
            ps = PageStats(inc.campaign_id, inc.org_id)
            self._install_page(page, ps)
        ps.stats.add(inc)
        timeline = self.page_timelines.get(page)
        if timeline is None:
            timeline = self.page_timelines[page] = Timeline()
        timeline.add(t, inc.new_supporter, inc.count)

    def _page_take(self, page: int, dec: IncrementLike, t: float, now: float) -> None:
        """Take a decrement from its page: only from a page memory holds, of that campaign."""
        ps = self.pages.get(page)
        if ps is None or ps.campaign_id != dec.campaign_id or ps.org_id != dec.org_id:
            if ps is not None:
                self.page_mismatches += 1
            return
        ps.stats.subtract(dec)
        timeline = self.page_timelines.get(page)
        if timeline is not None:
            timeline.take(t, dec.new_supporter, dec.count, now)

    def _install_page(self, page: int, ps: PageStats) -> None:
        """Put ``ps`` in ``pages`` under ``page``, and in the indexes of its campaign and org."""
        old = self.pages.get(page)
        if old is not None and (old.campaign_id, old.org_id) != (ps.campaign_id, ps.org_id):
            self._drop_page(page)
        self.pages[page] = ps
        self.pages_of.setdefault(ps.campaign_id, set()).add(page)
        self.org_pages.setdefault(ps.org_id, set()).add(page)
        self._org_in(ps.org_id, ps.campaign_id)

    def _drop_page(self, page: int) -> None:
        ps = self.pages.pop(page, None)
        self.page_timelines.pop(page, None)
        if ps is None:
            return
        for index, key in ((self.pages_of, ps.campaign_id), (self.org_pages, ps.org_id)):
            ids = index.get(key)
            if ids is not None:
                ids.discard(page)
                if not ids:
                    del index[key]

    def _decrement_many(self, decs: Iterable[IncrementLike]) -> None:
        campaigns = self.campaigns
        timelines = self.timelines
        now = self.clock()
        journal = self.journal
        only = self.journal_only
        seen = self.seen
        journaled = 0
        for dec in decs:
            cid = dec.campaign_id
            horizon = None
            if seen and (dec.action_id is not None or dec.txid is not None or dec.at is not None):
                horizon = seen.get(cid)
                if horizon is not None and horizon.reflects(dec, True, self.counted_now.get(cid)):
                    self.already_counted += 1
                    continue
                if horizon is not None:
                    self._record(cid, horizon, dec.action_id, False)
            stats = campaigns.get(cid)
            # A decrement of a campaign memory does not hold takes back what is not there:
            # clamped, and no campaign is created for it.
            if stats is None or stats.subtract(dec):
                self.clamped += 1
            # Taken from the bucket of its ``at`` (the time of the action it takes back); with
            # none, from the bucket of its arrival, clamped there like any count.
            at = dec.at
            t = now if at is None or at > now + AT_AHEAD else at
            timeline = timelines.get(cid)
            if timeline is not None:
                timeline.take(t, dec.new_supporter, dec.count, now)
            if dec.page is not None:
                self._page_take(dec.page, dec, t, now)
            if dec.new_supporter:
                self.ranking.dirty.add(cid)
            self.decremented += 1
            if journal is not None and (only is None or cid in only):
                # Journaled even when clamped: the database value it will be replayed on may
                # hold what memory did not. In the same list as the increments, in order: a
                # rejection and a re-acceptance replay in the order they happened.
                early = self.journal_horizon
                if early is None or (reflected := early.decides(dec, True)) is None:
                    entries = journal.get(cid)
                    if entries is None:
                        journal[cid] = [Decrement(dec, t)]
                    else:
                        entries.append(Decrement(dec, t))
                    journaled += 1
                elif not reflected:
                    journaled += self._fold(cid, dec, True, t)
        if journaled:
            self._journaled(journaled)
        self.ranking.bound(len(campaigns))

    def _fold(self, cid: int, change: IncrementLike, decrement: bool, t: float) -> int:
        """Add a change the snapshot cannot contain to its campaign's running fold; returns
        the keys it created (campaignstats.journal)."""
        folds = self.journal_folds
        assert folds is not None  # set with journal_horizon
        fold = folds.get(cid)
        if fold is None:
            fold = folds[cid] = Fold()
            return 1 + fold.add(change, decrement, t)
        return fold.add(change, decrement, t)

    def _journaled(self, n: int) -> None:
        self.journal_size += n
        if self.journal_size > self.journal_limit:
            self.journal = None
            self.journal_folds = None
            self.journal_horizon = None
            self.journal_overflow = True

    # -- queries --------------------------------------------------------------------------------

    def stats(self, campaign_id: int) -> WireStats:
        stats = self.campaigns.get(campaign_id)
        return empty_wire_stats() if stats is None else stats.to_wire()

    def page_stats(self, page: int) -> WireStats:
        """STATS of one action page plus ``campaign_id`` (docs/protocol.md, "page_stats"); an
        unknown page is all zeros with ``campaign_id`` 0."""
        ps = self.pages.get(page)
        return empty_page_stats() if ps is None else ps.to_wire()

    def org_stats(self, org_id: int) -> dict[str, Any]:
        """``{"supporters", "actions", "campaigns": {campaign_id: supporters}}``: the org's
        entries in its campaigns' ``org`` (zeros left out) and the counted actions of its pages
        (docs/protocol.md, "org_stats"). An unknown org is zeros."""
        per_campaign: dict[int, int] = {}
        for cid in self.org_campaigns.campaigns(org_id):
            stats = self.campaigns.get(cid)
            if stats is None:
                continue
            kind = type(stats)
            if kind is CampaignStats:
                orgs = stats.org
            else:  # its bytes as they are in the slot: no copy of a folded one's maps
                orgs = self._packed_org(_MAPS_SLOT.__get__(stats), kind is FoldedCampaignStats)
            n = orgs.get(org_id, 0)
            if n:
                per_campaign[cid] = n
        actions = 0
        for page in self.org_pages.get(org_id, ()):
            actions += sum(self.pages[page].stats.maps()[0].values())
        return {
            "supporters": sum(per_campaign.values()),
            "actions": actions,
            "campaigns": dict(sorted(per_campaign.items())),
        }

    def _packed_org(self, packed: bytes, folded: bool = False) -> dict[int, int]:
        """The org map of a packed campaign, the action and area maps skipped in C: one
        MessagePack reader kept for the state, so that ``org_stats`` over an org's many packed
        campaigns decodes one small map each instead of three (about 0.5 µs a campaign against
        2.5; docs/design.md, "Memory", round 3). The campaign stays packed. ``folded``: the
        bytes of a :class:`FoldedCampaignStats`, its timeline after the maps (one MessagePack
        array too), skipped as well."""
        reader = self.org_reader
        if reader is None:
            import msgpack  # a packed campaign exists, so msgpack was imported already

            reader = self.org_reader = msgpack.Unpacker(strict_map_key=False)
        start = reader.tell()
        try:
            reader.feed(packed)
            if reader.read_array_header() == 3:
                reader.skip()
                reader.skip()
                orgs = reader.unpack()
                if folded:
                    reader.skip()
                if reader.tell() - start == len(packed) and type(orgs) is dict:
                    return orgs
        except Exception:  # any damage: read the long way, whose error says what it is
            pass
        self.org_reader = None  # what a damaged or longer one left in its buffer goes with it
        return _unpack_maps(packed[: -packed[-1]] if folded else packed)[2]

    def history(
        self,
        campaign_id: int,
        unit: str,
        start: float | None,
        end: float | None,
        page: int | None = None,
    ) -> dict[str, Any]:
        """``{"unit", "buckets": [[start, supporters, actions], ...]}`` (docs/protocol.md,
        "history"): an unknown campaign, or one with no action, has no bucket. With ``page``,
        that page's buckets (when it is a page of this campaign)."""
        if page is None:
            timeline = self.timeline_of(campaign_id)
        else:
            ps = self.pages.get(page)
            on_campaign = ps is not None and ps.campaign_id == campaign_id
            timeline = self.page_timelines.get(page) if on_campaign else None
        buckets = [] if timeline is None else timeline.history(unit, start, end, self.clock())
        return {"unit": unit, "buckets": buckets}

    def recent(self, campaign_id: int, tz: str) -> dict[str, object]:
        """docs/protocol.md, "recent": ``tz`` an IANA name (checked by the caller)."""
        return recent(self.timeline_of(campaign_id), self.clock(), ZoneInfo(tz))

    def timeline_of(self, campaign_id: int) -> Timeline | None:
        """A campaign's timeline, to read, never to change: its own, or, for an idle campaign
        whose timeline is folded into its packed form, a copy rebuilt from it (docs/design.md,
        "Memory", round 4); None when it has none."""
        timeline = self.timelines.get(campaign_id)
        if timeline is None:
            stats = self.campaigns.get(campaign_id)
            if type(stats) is FoldedCampaignStats:
                return stats.folded_timeline()
        return timeline

    def top(self, by: str, limit: int) -> list[list[int]]:
        """``[[campaign_id, value], ...]``, highest first: the leading campaigns by total
        supporters, or by new supporters in the last hour or today, UTC (docs/protocol.md,
        "top"). Never a scan of every campaign (campaignstats.ranking)."""
        if by == "supporters":
            campaigns = self.campaigns

            def supporters(cid: int) -> int:
                stats = campaigns.get(cid)
                return 0 if stats is None else stats.supporters

            self.ranking.refresh(supporters)
            return self.ranking.head(limit)
        now = self.clock()
        hour = int(now) // HOUR
        timelines, campaigns = self.timelines, self.campaigns

        def folded(cid: int, unit: int, lo: int, hi: int) -> int:
            """Supporters in ``[lo, hi)`` of a campaign with no timeline of its own: its folded
            one's (docs/design.md, "Memory", round 4), or none."""
            stats = campaigns.get(cid)
            if type(stats) is FoldedCampaignStats:
                return stats.folded_supporters(unit, lo, hi)
            return 0

        if by == "last_hour":
            first_hour, minute = hour - 1, int(now) // 60

            def value(cid: int) -> int:
                timeline = timelines.get(cid)
                if timeline is None:
                    return folded(cid, 60, minute - 59, minute + 1)
                return timeline.unit_total(60, minute - 59, minute + 1)[0]

        elif by == "today":
            day = int(now) // DAY
            first_hour = day * 24

            def value(cid: int) -> int:
                timeline = timelines.get(cid)
                if timeline is None:
                    return folded(cid, DAY, day, day + 1)
                return timeline.unit_total(DAY, day, day + 1)[0]

        else:
            raise ValueError(f"top by {by!r}: 'supporters', 'last_hour' or 'today'")
        candidates: set[int] = set()
        for h in range(first_hour, hour + 1):
            listed = self.touched.get(h, ())
            if listed is None:  # too many to list: every campaign is a candidate
                return leaders(self.campaigns.keys(), value, limit)
            candidates.update(listed)
        return leaders(candidates, value, limit)

    def _touch_recent(self, cid: int, timeline: Timeline, now: float) -> None:
        """After a merge: note the campaign in the hours of the last day where it has
        supporters, so that ``top`` by the last hour or today finds it."""
        hour = int(now) // HOUR
        for h, supporters, _ in timeline.series_for(HOUR).buckets(hour - TOUCHED_HOURS, hour + 1):
            if supporters:
                touched = self._touched(h)
                if touched is not None:
                    touched.add(cid)

    # -- the exact merge (docs/design.md, "The actor" and "Exact by transaction id") -------------

    def start_journal(self, only: Iterable[int] | None = None) -> None:
        """Start recording changes; called when a calculation starts, before its snapshot.

        ``only``: the campaigns the calculation covers, when known in advance (a list of ids).
        """
        self.journal = {}
        self.journal_only = None if only is None else frozenset(only)
        self.journal_size = 0
        self.journal_overflow = False
        self.journal_horizon = None
        self.journal_folds = None

    def stop_journal(self) -> None:
        self.journal = None
        self.journal_only = None
        self.journal_horizon = None
        self.journal_folds = None

    def fold_journal(self, early: EarlyHorizon) -> None:
        """The calculation's snapshot is taken and ``early`` is what it is known to hold:
        from now on a change it decides is dropped or folded into its campaign's running net
        instead of kept (campaignstats.journal; docs/design.md, "The journal, folded").
        What the journal holds already stays as it is."""
        if self.journal is None or self.journal_horizon is not None:
            return  # no calculation (or an overflowed one), or told already
        self.journal_horizon = early
        self.journal_folds = {}

    def journal_fits(self, result: CalculationResult) -> bool:
        """Whether the changes folded so far were decided by ``result``'s own snapshot (else
        the result cannot be merged exactly)."""
        early = self.journal_horizon
        return early is None or early.fits(result.horizon)

    def journal_figures(self) -> dict[str, int]:
        """The journal's size now: changes kept one by one (``listed``), keys of the running
        folds (``folded_keys``) and campaigns folded, and in all (``size``, what
        ``journal_limit`` bounds)."""
        journal = self.journal or {}
        folds = self.journal_folds or {}
        return {
            "listed": sum(len(entries) for entries in journal.values()),
            "folded_keys": sum(1 + fold.keys for fold in folds.values()),
            "folded_campaigns": len(folds),
            "size": self.journal_size,
        }

    def merge(
        self, result: CalculationResult, campaign_ids: Iterable[int] | None = None
    ) -> list[CampaignDrift]:
        """Make each covered campaign equal to its database value plus the unseen changes.

        Unseen changes are the journaled ones the snapshot could not contain
        (:meth:`Horizon.reflects`): a ``txid`` the snapshot does not see; an ``action_id``
        above its highest, or one it did not count; an ``at`` after it; and every change with
        none of these; and, for actions the snapshot knows, a change that the earlier ones
        already made (a repeat). The journal is decided in the order the changes arrived, and
        what the snapshot cannot contain is added as one net per count, clamped at zero once
        (with the running folds: campaignstats.journal). From then on, a change of this
        campaign that the snapshot holds is skipped (see :meth:`apply_many`), so none counts
        twice. ``campaign_ids`` selects a part of the result, so that the actor can merge a
        large result in slices and keep serving between them; the journal keeps recording
        meanwhile, so a campaign merged in a later slice also gets the changes that arrived in
        between. Returns the non-zero drifts.
        """
        if not self.journal_fits(result):
            raise ValueError("the journal was folded by another snapshot than this result's")
        journal = self.journal or {}
        folds = self.journal_folds or {}
        horizon = result.horizon
        ids = result.campaigns.keys() if campaign_ids is None else campaign_ids
        drifts: list[CampaignDrift] = []
        now = self.clock()
        for cid in ids:
            truth = result.campaigns[cid]
            db_timeline = result.timelines.get(cid)
            timeline = Timeline() if db_timeline is None else db_timeline.copy()
            counted_now: dict[int, bool] = {}
            page_truth = {pid: result.pages[pid].copy() for pid in result.pages_of(cid)}
            page_timelines: dict[int, Timeline] = {}
            for pid in page_truth:
                db_page_timeline = result.page_timelines.get(pid)
                if db_page_timeline is not None:
                    page_timelines[pid] = db_page_timeline.copy()
            # The unseen changes as one net per count (campaignstats.journal): the list,
            # decided in the order the changes arrived, then the running fold's. A campaign
            # with none (most of a large result) is the database value as it is: building a
            # fold and copying through it cost about as much again as the rest of its merge.
            entries = journal.get(cid)
            running = folds.get(cid)
            if entries or running is not None:
                truth = self._replay(
                    cid,
                    truth,
                    entries or (),
                    running,
                    result,
                    counted_now,
                    timeline,
                    page_truth,
                    page_timelines,
                    now,
                )
            before = self.campaigns.get(cid)
            before_maps = None if before is None else before.maps()  # read: stays packed
            idle = self._stays_idle(before, bool(entries) or running is not None, timeline, now)
            # Drift only means something for a campaign memory had loaded before (from a merge or
            # a snapshot); increments alone before the first load are not "drift".
            if before is not None and cid in self.seen:
                drift = CampaignDrift(
                    cid,
                    before.supporters - truth.supporters,
                    sum(before_maps[0].values()) - sum(truth.action.values()),  # type: ignore[index]
                )
                if not drift.is_zero:
                    drifts.append(drift)
            # Only the orgs it gains: one it has in memory is listed already (every path that
            # adds an org key notes it), and appending each again at every calculation doubled
            # the org's array, whose deduplication (a sort of all of it) then fell in one slice.
            had = () if before_maps is None else before_maps[2]
            for org_id in truth.org:
                if org_id not in had:
                    self._org_in(org_id, cid)
            if idle:  # an idle campaign stays idle: packed straight from the truth, no dicts
                truth = truth.packed_copy()
            elif truth is result.campaigns[cid]:  # the database value as it is (no replay)
                truth = truth.copy()
            if not result.messages_counted:
                # The database has no messages table: memory is their only record.
                truth.messages = before.messages if before is not None else 0
                for pid, pt in page_truth.items():  # and of each page's, as for its campaign
                    held = self.pages.get(pid)
                    pt.stats.messages = held.stats.messages if held is not None else 0
            self.campaigns[cid] = truth
            self._merge_pages(cid, page_truth, page_timelines)
            if timeline.last_action_at < 0 and not timeline.nbytes():
                self.timelines.pop(cid, None)
            else:
                self.timelines[cid] = timeline
                self._touch_recent(cid, timeline, now)
            self.ranking.dirty.add(cid)
            self.seen[cid] = horizon
            if counted_now:
                self.counted_now[cid] = counted_now
            else:
                self.counted_now.pop(cid, None)
        self._bound(None)
        return drifts

    def _stays_idle(
        self, before: CampaignStats | None, changed: bool, timeline: Timeline, now: float
    ) -> bool:
        """Whether a merge installs a campaign packed (docs/design.md, "Memory", round 3): it
        is packed now (nothing wrote to it since it was packed: a write unpacks), or memory
        did not hold it, nothing was journaled for it (``changed``) and its last action is
        older than ``pack_idle`` (a first calculation). A campaign that memory holds
        unpacked stays unpacked: the sweep decides."""
        if not self.pack_idle:
            return False
        if before is not None:
            return before.packed is not None
        return not changed and timeline.last_action_at < now - self.pack_idle

    def _replay(
        self,
        cid: int,
        truth: CampaignStats,
        entries: Iterable[IncrementLike | Decrement | Arrived],
        running: Fold | None,
        result: CalculationResult,
        counted_now: dict[int, bool],
        timeline: Timeline,
        page_truth: dict[int, PageStats],
        page_timelines: dict[int, Timeline],
        now: float,
    ) -> CampaignStats:
        """Campaign ``cid``'s database value ``truth`` plus its unseen changes: the listed
        ``entries`` decided in the order they arrived (recording in ``counted_now`` the
        actions of the window they changed) and the ``running`` fold, as one net per count,
        clamped once; the same on ``timeline`` and on its pages (docs/design.md, "The journal,
        folded")."""
        horizon = result.horizon
        fold = Fold()
        for entry in entries:
            change: IncrementLike
            t: float | None
            if isinstance(entry, Decrement):
                change, decrement, t = entry.change, True, entry.t
            elif isinstance(entry, Arrived):
                change, decrement, t = entry.change, False, entry.t
            else:
                change, decrement, t = entry, False, entry.at
            if horizon.reflects(change, decrement, counted_now):
                continue
            if t is None:  # journaled before buckets existed: filed as arriving now
                t = now
            fold.add(change, decrement, t)
            aid = change.action_id
            if aid is not None and horizon.knows(aid):
                counted_now[aid] = not decrement
        if running is not None:
            fold.absorb(running)
        truth, clamped = fold.apply(truth)
        self.clamped += clamped
        fold.apply_buckets(timeline, now)
        # The pages replay what the campaign replays (docs/design.md, "Action pages and
        # orgs"): the same changes, the same rules as when they were applied.
        for (page, org_id), page_fold in (fold.pages or {}).items():
            elsewhere = page not in page_truth and (
                page in result.pages or (page in self.pages and self.pages[page].campaign_id != cid)
            )
            apply_page(
                page_fold,
                page,
                org_id,
                page_truth,
                page_timelines,
                campaign_id=cid,
                elsewhere=elsewhere,
                max_keys=self.max_keys,
                now=now,
            )
        return truth

    def forget_absent(self, result: CalculationResult) -> list[int]:
        """After a merge of an ``all`` calculation of a database (one that says which
        transactions it saw: ``result.snapshot``): forget the campaigns it did not find (their
        row is gone: a deleted campaign reads as empty, and the snapshot file forgets it), but
        not one that got a change the snapshot does not hold (created since). A source without
        a snapshot may list only the campaigns it has counts for: nothing is forgotten. Call it
        before the journal stops; returns the campaigns forgotten."""
        if result.kind != "all" or result.snapshot is None:
            return []
        journal = self.journal or {}
        folds = self.journal_folds or {}
        horizon = result.horizon
        gone = []
        for cid in self.campaigns.keys() - result.campaigns.keys():
            if cid in folds:
                continue  # it got a change the snapshot does not hold (folded)
            entries = journal.get(cid, ())
            if any(
                not horizon.reflects(
                    e.change if isinstance(e, Decrement | Arrived) else e,
                    isinstance(e, Decrement),
                    None,
                )
                for e in entries
            ):
                continue
            gone.append(cid)
        for cid in gone:
            del self.campaigns[cid]
            for page in list(self.pages_of.get(cid, ())):
                self._drop_page(page)
            self.timelines.pop(cid, None)
            self.seen.pop(cid, None)
            self.counted_now.pop(cid, None)
            self.ranking.dirty.add(cid)
        if gone:
            # Out of org_stats too: an org left with no campaign goes (memory stays bounded).
            # A walk of every org (87 ms at 300,000 orgs), so a step at a time: the first now,
            # the others between the actor's messages (:meth:`forget_step`). A campaign that
            # comes back meanwhile keeps the orgs it joins again.
            self.finish_forgetting()
            self.org_forgetting = self.org_campaigns.forget_steps(
                set(gone), lambda cid: cid not in self.campaigns, self.forget_orgs_per_step
            )
            self.forget_step()
        return gone

    def forget_step(self) -> bool:
        """One step of taking forgotten campaigns out of the org index (at most
        ``forget_orgs_per_step`` orgs); True while steps remain."""
        steps = self.org_forgetting
        if steps is None:
            return False
        if next(steps, 0) == 0:
            self.org_forgetting = None
            return False
        return True

    def finish_forgetting(self) -> None:
        """Take every remaining step now (before the next forget, and where no loop drives
        the steps)."""
        while self.forget_step():
            pass

    def _merge_pages(
        self, cid: int, truth: dict[int, PageStats], timelines: dict[int, Timeline]
    ) -> None:
        """Make campaign ``cid``'s pages in memory those of ``truth``: a page memory held that
        the database and the replay do not have is dropped (it counts nothing)."""
        for page in list(self.pages_of.get(cid, ())):
            if page not in truth:
                self._drop_page(page)
        for page, ps in truth.items():
            self._install_page(page, ps)
            timeline = timelines.get(page)
            if timeline is None or (timeline.last_action_at < 0 and not timeline.nbytes()):
                self.page_timelines.pop(page, None)
            else:
                self.page_timelines[page] = timeline

    def check(self) -> str | None:
        """What is wrong with the counts, or None: every count a non-negative int, every
        key of the right type. Used before a restarted actor keeps its predecessor's state."""
        for cid, stats in self.campaigns.items():
            if not isinstance(stats, CampaignStats):
                return f"campaign {cid}: not CampaignStats"
            for name in ("supporters", "extra_supporters", "messages"):
                n = getattr(stats, name)
                if type(n) is not int or n < 0:
                    return f"campaign {cid}: {name} is {n!r}"
            packed = stats.packed
            if packed is not None and type(packed) is not bytes:
                return f"campaign {cid}: packed is {type(packed).__name__}"
            try:
                maps = stats.maps()  # a packed campaign stays packed
            except Exception as exc:
                return f"campaign {cid}: its packed maps do not decode ({exc!r})"
            for name, key_type, counts in zip(
                ("action", "area", "org"), (str, str, int), maps, strict=True
            ):
                if type(counts) is not dict:
                    return f"campaign {cid}: {name} is {type(counts).__name__}"
                for key, n in counts.items():
                    if type(key) is not key_type or type(n) is not int or n <= 0:
                        return f"campaign {cid}: {name}[{key!r}] is {n!r}"
        return None

    # -- idle campaigns packed (docs/design.md, "Memory", round 3) --------------------------------

    def pack_idle_campaigns(self, ids: Sequence[int], now: float) -> tuple[int, int]:
        """Pack each of these campaigns that is unpacked and had no change for ``pack_idle``
        seconds before ``now``; returns how many it packed, and how many of them are packed
        now (packed before, or just now). "No change" is read off the
        campaign's timeline (its last action's time, which the hot path keeps anyway); a
        wrong guess (a decrement, which files no action time) only costs an unpack at the
        next write, never a count."""
        _, packed_now, packed = self.pack_idle_slice(ids, 0, len(ids), now, float("inf"))
        return packed_now, packed

    def pack_idle_slice(
        self, ids: Sequence[int], start: int, end: int, now: float, deadline: float
    ) -> tuple[int, int, int]:
        """:meth:`pack_idle_campaigns` of ``ids[start:end]``, stopping after the first campaign
        it packs once ``time.perf_counter()`` has reached ``deadline`` (a campaign of many keys
        takes a millisecond or more to pack: the clock is read after each one packed, not per
        group of campaigns). Returns the index it stopped at, how many it packed, and how many
        of those it looked at are packed now."""
        if not self.pack_idle:
            return end, 0, 0
        campaigns = self.campaigns
        timelines = self.timelines
        idle_before = now - self.pack_idle
        clock = time.perf_counter
        packed_now = packed = 0
        i = start
        while i < end:
            cid = ids[i]
            i += 1
            stats = campaigns.get(cid)
            if stats is None:
                continue  # forgotten since the list was made
            if stats.packed is None:
                timeline = timelines.get(cid)
                if timeline is not None and timeline.last_action_at >= idle_before:
                    continue
                stats.pack()
                if timeline is not None:
                    self._fold_timeline(cid, stats, timeline)
                packed_now += 1
                packed += 1
                if clock() >= deadline:
                    break
                continue
            if type(stats) is PackedCampaignStats:  # packed by a merge or a load: not folded
                timeline = timelines.get(cid)
                if timeline is not None:
                    self._fold_timeline(cid, stats, timeline)
            packed += 1
        return i, packed_now, packed

    def _fold_timeline(self, cid: int, stats: CampaignStats, timeline: Timeline) -> None:
        """Fold a packed campaign's lazy timeline into its packed form (docs/design.md,
        "Memory", round 4): its entry in ``timelines`` goes, and the :class:`Timeline` with it
        (a timeline with series stays as it is). ``cid`` is the campaign's key in
        ``campaigns`` (the same int object, kept in the campaign)."""
        lazy = timeline.lazy_state()
        if lazy is None or type(stats) is not PackedCampaignStats:
            return
        if lazy[1] > MAX_ID or lazy[2] > MAX_ID or not 0 <= lazy[0] < 2**32:
            return  # past what MessagePack's integers carry, or the minute's four bytes
        # One MessagePack array: supporters, actions, the last action's time, the minute as a
        # uint32 (its four bytes at a fixed place: top reads it alone) and the array's own
        # length in bytes, a positive fixint (at most 34), so its last byte says where it
        # starts.
        minute, supporters, actions, last = lazy
        counts = _packb((supporters, actions, last))  # an array of three: one header byte
        length = len(counts) + 6
        tail = b"\x95" + counts[1:] + b"\xce" + minute.to_bytes(4, "big") + bytes((length,))
        raw = _MAPS_SLOT.__get__(stats, CampaignStats) + tail
        _MAPS_SLOT.__set__(stats, raw)
        _AREA_SLOT.__set__(stats, self)
        _ORG_SLOT.__set__(stats, cid)
        stats.__class__ = FoldedCampaignStats
        del self.timelines[cid]

    def packed_count(self) -> int:
        """Campaigns packed now (a scan of every campaign: tests and benchmarks)."""
        return sum(1 for stats in self.campaigns.values() if stats.packed is not None)

    def replace_all(self, campaigns: Mapping[int, CampaignStats]) -> None:
        """Load a snapshot file's content (before any calculation)."""
        # Loaded counts are idle: packed at once when packing is on (docs/design.md, "Memory").
        copy = CampaignStats.packed_copy if self.pack_idle else CampaignStats.copy
        self.campaigns = {cid: copy(stats) for cid, stats in campaigns.items()}
        for cid, stats in campaigns.items():
            for org_id in stats.maps()[2]:
                self._org_in(org_id, cid)
        # Loaded, so drift is measured at the first merge; an empty horizon skips nothing.
        self.seen = dict.fromkeys(campaigns, NO_HORIZON)
        self.counted_now = {}
        self.ranking = self._new_ranking()
        self.ranking.dirty.update(self.campaigns)
        self._bound(None)
