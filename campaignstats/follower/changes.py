"""From committed transactions to increments and decrements: pure, no I/O (docs/follow.md).

* :class:`Assembler` turns decoded pgoutput messages into :class:`Transaction` objects (one per
  commit, with the typed rows of the tables the counts depend on).
* :func:`plan` turns the visible transactions of one round into increments and decrements, each
  carrying its transaction's ``txid``. Action counts come from the rows of the stream alone (old
  and new row, REPLICA IDENTITY FULL). Whether a supporter is new to the campaign is decided by
  the database: the follower reads, in one snapshot, the rows of every person a round touches,
  and :func:`plan` takes the round's changes back from those rows to get the state before the
  round, then replays the transactions one by one, so each transaction's effect on the distinct
  counts (supporters, org, area) is exact and carries its own txid.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from campaignstats.model import Increment

from .pgoutput import (
    UNCHANGED,
    Begin,
    Commit,
    Delete,
    Insert,
    Message,
    Relation,
    Row,
    Truncate,
    Update,
)

#: Proca's codes (campaignstats.db.queries): counted actions, accepted supporters
ACTION_COUNTED = frozenset((3, 4))
SUPPORTER_ACCEPTED = 3

#: the tables whose changes move the counts; the follower's publication lists them
TABLES = ("actions", "supporters", "action_pages", "campaigns", "messages")
#: the tables whose Update and Delete must carry the whole old row (and messages, where present)
FULL_IDENTITY_TABLES = ("actions", "supporters", "action_pages")


class IdentityError(ValueError):
    """An Update or Delete without the old row: the table's REPLICA IDENTITY is not FULL."""


@dataclass(frozen=True, slots=True)
class ActionRow:
    id: int
    supporter_id: int | None
    action_type: str
    campaign_id: int
    action_page_id: int
    processing_status: int
    testing: bool

    @property
    def counted(self) -> bool:
        """In the action counts (``action``): accepted or delivered, and not a test."""
        return self.processing_status in ACTION_COUNTED and not self.testing

    @property
    def counts_supporter(self) -> bool:
        """Makes its supporter count (the calculation does not look at ``testing`` there)."""
        return self.processing_status in ACTION_COUNTED


@dataclass(frozen=True, slots=True)
class SupporterRow:
    id: int
    fingerprint: bytes
    area: str | None
    processing_status: int
    dupe_rank: int | None

    @property
    def counts(self) -> bool:
        return self.processing_status == SUPPORTER_ACCEPTED and self.dupe_rank == 0


@dataclass(frozen=True, slots=True)
class PageRow:
    id: int
    campaign_id: int
    org_id: int
    extra_supporters: int


@dataclass(frozen=True, slots=True)
class MessageRow:
    """A mail-to-target message (Proca #312): STATS ``messages`` counts those of counted actions."""

    id: int
    action_id: int


TypedRow = ActionRow | SupporterRow | PageRow | MessageRow


@dataclass(frozen=True, slots=True)
class RowChange:
    table: str
    old: TypedRow | None  # None: an insert
    new: TypedRow | None  # None: a delete


@dataclass(slots=True)
class Transaction:
    xid: int  # 32 bits, from Begin
    commit_lsn: int
    end_lsn: int
    commit_time: float
    changes: list[RowChange] = field(default_factory=list)
    #: tables truncated by this transaction
    truncated: tuple[str, ...] = ()
    #: campaigns rows changed (inserted, status changed, deleted): nothing to count
    campaign_changes: int = 0


def _text(row: Row, name: str) -> str:
    value = row.get(name)
    if value is None or value is UNCHANGED:
        raise IdentityError(f"column {name} missing from the row")
    return str(value)


def _opt_int(row: Row, name: str) -> int | None:
    value = row.get(name)
    if value is UNCHANGED:
        raise IdentityError(f"column {name} missing from the row")
    return None if value is None else int(str(value))


def _bytea(text: str) -> bytes:
    if not text.startswith("\\x"):
        raise ValueError("bytea not in hex format (bytea_output = hex is needed)")
    return bytes.fromhex(text[2:])


def typed_row(table: str, row: Row) -> TypedRow:
    """The columns the counts depend on, converted from pgoutput's text format."""
    if table == "actions":
        return ActionRow(
            int(_text(row, "id")),
            _opt_int(row, "supporter_id"),
            _text(row, "action_type"),
            int(_text(row, "campaign_id")),
            int(_text(row, "action_page_id")),
            int(_text(row, "processing_status")),
            _text(row, "testing") == "t",
        )
    if table == "supporters":
        area = row.get("area")
        if area is UNCHANGED:
            raise IdentityError("column area missing from the row")
        return SupporterRow(
            int(_text(row, "id")),
            _bytea(_text(row, "fingerprint")),
            None if area is None else str(area),
            int(_text(row, "processing_status")),
            _opt_int(row, "dupe_rank"),
        )
    if table == "messages":
        return MessageRow(int(_text(row, "id")), int(_text(row, "action_id")))
    if table == "action_pages":
        return PageRow(
            int(_text(row, "id")),
            int(_text(row, "campaign_id")),
            int(_text(row, "org_id")),
            int(_text(row, "extra_supporters")),
        )
    raise ValueError(f"no typed row for table {table}")


@dataclass(slots=True)
class Assembler:
    """Collects the messages of one transaction; :meth:`feed` returns it at its Commit."""

    tables: tuple[str, ...] = TABLES
    _current: Transaction | None = None

    def feed(self, msg: Message) -> Transaction | None:
        if isinstance(msg, Begin):
            self._current = Transaction(msg.xid, msg.final_lsn, 0, msg.commit_time)
            return None
        if isinstance(msg, Commit):
            txn = self._current
            self._current = None
            if txn is None:
                raise ValueError("Commit without Begin")
            txn.end_lsn = msg.end_lsn
            txn.commit_lsn = msg.commit_lsn
            return txn
        txn = self._current
        if isinstance(msg, Insert | Update | Delete):
            if txn is None:
                raise ValueError("a change outside a transaction")
            self._change(txn, msg)
        elif isinstance(msg, Truncate) and txn is not None:
            names = tuple(r.name for r in msg.relations if r.name in self.tables)
            txn.truncated = (*txn.truncated, *names)
        return None

    def _change(self, txn: Transaction, msg: Insert | Update | Delete) -> None:
        table = msg.relation.name
        if table not in self.tables:
            return
        if table == "campaigns":
            txn.campaign_changes += 1  # the counts do not depend on a campaign's row
            return
        if isinstance(msg, Insert):
            txn.changes.append(RowChange(table, None, typed_row(table, msg.new)))
        elif isinstance(msg, Update):
            if msg.old_kind != "O" or msg.old is None:
                raise IdentityError(_identity_hint(msg.relation))
            txn.changes.append(
                RowChange(table, typed_row(table, msg.old), typed_row(table, msg.new))
            )
        else:
            if msg.old_kind != "O":
                raise IdentityError(_identity_hint(msg.relation))
            txn.changes.append(RowChange(table, typed_row(table, msg.old), None))


def _identity_hint(rel: Relation) -> str:
    return (
        f"an update or delete of {rel.name} came without its old row; run "
        f"ALTER TABLE {rel.namespace}.{rel.name} REPLICA IDENTITY FULL;"
    )


# -- the database's answer about the people a round touches -----------------------------------


def full_xid(xid32: int, reference: int) -> int:
    """The 64-bit ``xid8`` (as ``pg_current_xact_id()`` and ``pg_current_snapshot()`` give it) of
    a 32-bit xid from pgoutput's Begin, given a recent xid8 ``reference`` (a snapshot's ``xmax``):
    the one value with these low 32 bits within 2**31 of the reference (Postgres keeps every live
    xid within 2**31 of the next one, so this is unambiguous)."""
    full = (reference & ~0xFFFF_FFFF) | (xid32 & 0xFFFF_FFFF)
    if full > reference + 2**31:
        full -= 2**32
    elif full <= reference - 2**31:
        full += 2**32
    return full


class _People:
    """Supporter and action rows of the people of one round, indexed for membership queries."""

    def __init__(self, supporters: Iterable[SupporterRow], actions: Iterable[ActionRow]) -> None:
        self.sup: dict[int, SupporterRow] = {}
        self.act: dict[int, ActionRow] = {}
        self.sids_by_fp: dict[bytes, set[int]] = {}
        self.aids_by_sid: dict[int, set[int]] = {}
        for s in supporters:
            self.put(s)
        for a in actions:
            self.put(a)

    def put(self, row: TypedRow) -> None:
        if isinstance(row, SupporterRow):
            self.drop_supporter(row.id)
            self.sup[row.id] = row
            self.sids_by_fp.setdefault(row.fingerprint, set()).add(row.id)
        elif isinstance(row, ActionRow):
            self.drop_action(row.id)
            self.act[row.id] = row
            if row.supporter_id is not None:
                self.aids_by_sid.setdefault(row.supporter_id, set()).add(row.id)

    def drop(self, row: TypedRow) -> None:
        if isinstance(row, SupporterRow):
            self.drop_supporter(row.id)
        elif isinstance(row, ActionRow):
            self.drop_action(row.id)

    def drop_supporter(self, sid: int) -> None:
        old = self.sup.pop(sid, None)
        if old is not None:
            self.sids_by_fp.get(old.fingerprint, set()).discard(sid)

    def drop_action(self, aid: int) -> None:
        old = self.act.pop(aid, None)
        if old is not None and old.supporter_id is not None:
            self.aids_by_sid.get(old.supporter_id, set()).discard(aid)

    def pairs_of(self, row: TypedRow) -> set[tuple[int, bytes]]:
        """The (campaign, fingerprint) pairs whose membership this row takes part in."""
        if isinstance(row, ActionRow):
            s = self.sup.get(row.supporter_id) if row.supporter_id is not None else None
            return set() if s is None else {(row.campaign_id, s.fingerprint)}
        if isinstance(row, SupporterRow):
            return {
                (self.act[aid].campaign_id, row.fingerprint)
                for aid in self.aids_by_sid.get(row.id, ())
            }
        return set()

    def membership(
        self, campaign_id: int, fingerprint: bytes, org_of: Callable[[int], int | None]
    ) -> tuple[frozenset[int], frozenset[str]]:
        """(orgs, areas) through which the person counts in the campaign; no orgs: not counted."""
        orgs: set[int] = set()
        areas: set[str] = set()
        for sid in self.sids_by_fp.get(fingerprint, ()):
            s = self.sup[sid]
            if not s.counts:
                continue
            for aid in self.aids_by_sid.get(sid, ()):
                a = self.act[aid]
                if a.campaign_id != campaign_id or not a.counts_supporter:
                    continue
                org = org_of(a.action_page_id)
                if org is None:
                    continue
                orgs.add(org)
                if s.area is not None:
                    areas.add(s.area)
        return frozenset(orgs), frozenset(areas)

    def some_type(self, campaign_id: int, fingerprint: bytes) -> str | None:
        for sid in self.sids_by_fp.get(fingerprint, ()):
            for aid in self.aids_by_sid.get(sid, ()):
                a = self.act[aid]
                if a.campaign_id == campaign_id:
                    return a.action_type
        return None


@dataclass(slots=True)
class Plan:
    increments: list[Increment] = field(default_factory=list)
    decrements: list[Increment] = field(default_factory=list)
    #: membership changes the Increment type cannot express (a person counted through one more
    #: org without becoming new to the campaign): supporters stay exact, the org split waits for
    #: the next calculation
    inexact: int = 0
    #: actions whose page's org is unknown (page deleted): left to the next calculation
    unknown_pages: int = 0
    #: what to send, in order: runs of (decrement?, changes). Transactions come in commit order,
    #: each one's increments before its decrements (then no count of a transaction goes below
    #: zero on the way, as the database's counts before and after it are not negative)
    steps: list[tuple[bool, list[Increment]]] = field(default_factory=list)

    def _add(self, items: list[Increment], decrement: bool) -> None:
        if not items:
            return
        (self.decrements if decrement else self.increments).extend(items)
        if self.steps and self.steps[-1][0] == decrement:
            self.steps[-1][1].extend(items)
        else:
            self.steps.append((decrement, list(items)))


class _Units:
    """One transaction's increments (or its decrements), indexed so that planning stays linear
    in the transaction's size: those a new supporter may ride on by (campaign, org), and those
    of an action change by (action, campaign)."""

    __slots__ = ("by_action", "items", "waiting")

    def __init__(self) -> None:
        self.items: list[Increment] = []
        self.waiting: dict[tuple[int, int], deque[int]] = {}
        self.by_action: dict[tuple[int, int], int] = {}

    def add(self, inc: Increment) -> None:
        i = len(self.items)
        self.items.append(inc)
        if not inc.new_supporter:
            self.waiting.setdefault((inc.campaign_id, inc.org_id), deque()).append(i)
        if inc.action_id is not None:
            self.by_action.setdefault((inc.action_id, inc.campaign_id), i)

    def sent(self, at: float | None) -> list[Increment]:
        """The changes as sent: at their commit time (the buckets of a backlog applied late are
        right), without the action id. The txid says exactly whether a calculation holds the
        change (docs/follow.md); an action id would make the actor judge the change by the
        action's state instead, and drop a move or a re-acceptance as a repeat."""
        return [i._replace(action_id=None, at=at) for i in self.items]


def plan(
    transactions: Iterable[Transaction],
    supporters: Iterable[SupporterRow],
    actions: Iterable[ActionRow],
    org_of: Callable[[int], int | None],
    txid_of: Callable[[int], int],
    *,
    message_counts: Mapping[int, int] | None = None,
    message_actions: Iterable[ActionRow] = (),
) -> Plan:
    """Increments and decrements for ``transactions`` (visible, in commit order).

    ``supporters`` and ``actions`` are the database's rows, in one snapshot that sees every one
    of ``transactions`` (and none after them): every supporter row with the fingerprint of a
    person the transactions touch, and those supporters' counted actions. ``org_of`` gives a
    page's org; ``txid_of`` turns a Begin's 32-bit xid into the txid the actor compares.

    Messages (where the table exists): ``message_counts`` is, in the same snapshot, the number of
    messages of each action the transactions touch (by an action change or a message change),
    and ``message_actions`` those actions' rows; None: messages are not followed.
    """
    txns = list(transactions)
    people = _People(supporters, actions)
    mail = None if message_counts is None else _Mail(message_counts, message_actions)
    # Take the round back: the state before its first transaction.
    for txn in reversed(txns):
        _take_back(people, txn)
        if mail is not None:
            mail.take_back(txn)
    out = Plan()
    for txn in txns:
        txid = txid_of(txn.xid)
        # The pairs this transaction touches, named by its rows before and after it (a supporter
        # inserted with its action is only known after): apply, look, take back, look.
        pairs: set[tuple[int, bytes]] = set()
        _apply(people, txn)
        for ch in txn.changes:
            for row in (ch.old, ch.new):
                if row is not None:
                    pairs |= people.pairs_of(row)
        _take_back(people, txn)
        for ch in txn.changes:
            for row in (ch.old, ch.new):
                if row is not None:
                    pairs |= people.pairs_of(row)
        before = {p: people.membership(p[0], p[1], org_of) for p in pairs}
        mailed = set() if mail is None else mail.touched(txn)
        mail_before = {} if mail is None else {a: mail.contribution(a, org_of) for a in mailed}
        incs = _Units()
        decs = _Units()
        _apply(people, txn)
        if mail is not None:
            mail.apply(txn)
        for ch in txn.changes:
            if ch.table == "actions":
                _action_level(ch, txid, org_of, incs, decs, out)
        for p in sorted(pairs):
            new = people.membership(p[0], p[1], org_of)
            if before[p] != new:
                _supporter_units(p, before[p], new, txid, people, incs, decs, out)
        for aid in sorted(mailed):
            assert mail is not None
            _messages(aid, mail_before[aid], mail.contribution(aid, org_of), txid, incs, decs)
        at = txn.commit_time if txn.commit_time > 0 else None
        out._add(incs.sent(at), False)
        out._add(decs.sent(at), True)
    return out


#: (campaign, org, action type, messages) of a counted action with messages
_Contribution = tuple[int, int, str, int] | None


class _Mail:
    """Messages per action, and the rows of those actions, for the actions a round touches."""

    def __init__(self, counts: Mapping[int, int], rows: Iterable[ActionRow]) -> None:
        self.n: dict[int, int] = dict(counts)
        self.rows: dict[int, ActionRow] = {r.id: r for r in rows}

    def take_back(self, txn: Transaction) -> None:
        for ch in reversed(txn.changes):
            self._change(ch.new, ch.old)

    def apply(self, txn: Transaction) -> None:
        for ch in txn.changes:
            self._change(ch.old, ch.new)

    def _change(self, gone: TypedRow | None, comes: TypedRow | None) -> None:
        if isinstance(gone, ActionRow):
            self.rows.pop(gone.id, None)
        elif isinstance(gone, MessageRow):
            self.n[gone.action_id] = self.n.get(gone.action_id, 0) - 1
        if isinstance(comes, ActionRow):
            self.rows[comes.id] = comes
        elif isinstance(comes, MessageRow):
            self.n[comes.action_id] = self.n.get(comes.action_id, 0) + 1

    @staticmethod
    def touched(txn: Transaction) -> set[int]:
        ids: set[int] = set()
        for ch in txn.changes:
            for row in (ch.old, ch.new):
                if isinstance(row, ActionRow):
                    ids.add(row.id)
                elif isinstance(row, MessageRow):
                    ids.add(row.action_id)
        return ids

    def contribution(self, aid: int, org_of: Callable[[int], int | None]) -> _Contribution:
        row = self.rows.get(aid)
        n = self.n.get(aid, 0)
        if row is None or not row.counted or n <= 0:
            return None
        org = org_of(row.action_page_id)
        return None if org is None else (row.campaign_id, org, row.action_type, n)


def _messages(
    aid: int,
    before: _Contribution,
    after: _Contribution,
    txid: int,
    incs: _Units,
    decs: _Units,
) -> None:
    """An action's messages in STATS: on its own increment or decrement when it starts or stops
    counting in this transaction, else as an increment and a decrement whose action counts
    cancel out (messages sent, or taken back, for an action counted all along)."""
    if before == after:
        return
    moves: list[tuple[tuple[int, int, str], int]] = []
    if before is not None and after is not None and before[:3] == after[:3]:
        moves.append((after[:3], after[3] - before[3]))
    else:
        if before is not None:
            moves.append((before[:3], -before[3]))
        if after is not None:
            moves.append((after[:3], after[3]))
    for (cid, org, action_type), d in moves:
        same, other = (incs, decs) if d > 0 else (decs, incs)
        n = abs(d)
        i = same.by_action.get((aid, cid))
        if i is not None and not same.items[i].messages:
            same.items[i] = same.items[i]._replace(messages=n)
        else:
            same.add(Increment(cid, org, action_type, messages=n, txid=txid))
            other.add(Increment(cid, org, action_type, txid=txid))


def _apply(people: _People, txn: Transaction) -> None:
    for ch in txn.changes:
        if ch.old is not None:
            people.drop(ch.old)
        if ch.new is not None:
            people.put(ch.new)


def _take_back(people: _People, txn: Transaction) -> None:
    for ch in reversed(txn.changes):
        if ch.new is not None:
            people.drop(ch.new)
        if ch.old is not None:
            people.put(ch.old)


def _action_level(
    ch: RowChange,
    txid: int,
    org_of: Callable[[int], int | None],
    incs: _Units,
    decs: _Units,
    out: Plan,
) -> None:
    old, new = ch.old, ch.new
    assert old is None or isinstance(old, ActionRow)
    assert new is None or isinstance(new, ActionRow)
    was = old is not None and old.counted
    now = new is not None and new.counted
    if was and now:
        assert old is not None
        assert new is not None
        if (old.campaign_id, old.action_type, old.action_page_id) == (
            new.campaign_id,
            new.action_type,
            new.action_page_id,
        ):
            return  # accepted -> delivered, or a column the counts do not read
    if was:
        assert old is not None
        org = org_of(old.action_page_id)
        if org is None:
            out.unknown_pages += 1
        else:
            decs.add(
                Increment(
                    old.campaign_id,
                    org,
                    old.action_type,
                    action_id=old.id,
                    txid=txid,
                    page=old.action_page_id,
                )
            )
    if now:
        assert new is not None
        org = org_of(new.action_page_id)
        if org is None:
            out.unknown_pages += 1
        else:
            incs.add(
                Increment(
                    new.campaign_id,
                    org,
                    new.action_type,
                    action_id=new.id,
                    txid=txid,
                    page=new.action_page_id,
                )
            )


def _supporter_units(
    pair: tuple[int, bytes],
    old: tuple[frozenset[int], frozenset[str]],
    new: tuple[frozenset[int], frozenset[str]],
    txid: int,
    people: _People,
    incs: _Units,
    decs: _Units,
    out: Plan,
) -> None:
    """Express one person's membership change as units of ±(supporters, org, area).

    An Increment with ``new_supporter`` moves ``supporters``, one org and one area (or none)
    together. A unit rides on an action change of the same transaction, campaign and org when
    there is one (the ordinary case: an action accepted, a new supporter); otherwise it comes as
    an increment plus a decrement of the same action type whose action counts cancel out.
    """
    cid = pair[0]
    orgs0, areas0 = old
    orgs1, areas1 = new
    d_supp = int(bool(orgs1)) - int(bool(orgs0))
    plus = sorted(orgs1 - orgs0)
    minus = sorted(orgs0 - orgs1)
    plus_areas = sorted(areas1 - areas0)
    minus_areas = sorted(areas0 - areas1)
    if len(plus) - len(minus) != d_supp:
        out.inexact += 1
        if d_supp == 0:
            return
        plus = sorted(orgs1)[:1] if d_supp > 0 else []
        minus = sorted(orgs0)[:1] if d_supp < 0 else []
        plus_areas = sorted(areas1)[:1] if d_supp > 0 else []
        minus_areas = sorted(areas0)[:1] if d_supp < 0 else []
    # An area moved without an org moving: a -unit and a +unit through an org kept.
    common = sorted(orgs0 & orgs1)
    while (len(plus_areas) > len(plus) or len(minus_areas) > len(minus)) and common:
        plus.append(common[0])
        minus.append(common[0])
    if len(plus_areas) > len(plus) or len(minus_areas) > len(minus):
        out.inexact += 1
        plus_areas = plus_areas[: len(plus)]
        minus_areas = minus_areas[: len(minus)]
    action_type = people.some_type(cid, pair[1]) or "supporter"
    for i, org in enumerate(plus):
        area = plus_areas[i] if i < len(plus_areas) else None
        _ride(incs, decs, cid, org, area, txid, action_type)
    for i, org in enumerate(minus):
        area = minus_areas[i] if i < len(minus_areas) else None
        _ride(decs, incs, cid, org, area, txid, action_type)


def _ride(
    same: _Units,
    other: _Units,
    cid: int,
    org: int,
    area: str | None,
    txid: int,
    action_type: str,
) -> None:
    waiting = same.waiting.get((cid, org))
    if waiting:
        i = waiting.popleft()  # the first one, in the order of the transaction's changes
        same.items[i] = same.items[i]._replace(new_supporter=True, area=area)
        return
    same.add(Increment(cid, org, action_type, area, True, txid=txid))
    other.add(Increment(cid, org, action_type, None, False, txid=txid))
