"""A sans-IO decoder of Postgres's logical replication protocol (``pgoutput``, protocol version 1).

Bytes in, typed messages out: no socket, no event loop, no database driver. Each message of the
output plugin (one row of ``pg_logical_slot_peek_binary_changes``, or one ``XLogData`` payload of
the streaming protocol) goes to :meth:`Decoder.decode`. The format is Postgres's "Logical
Replication Message Formats" (chapter 55.9 in the Postgres 16 manual); the messages this project
needs are Begin, Commit, Relation, Insert, Update, Delete and Truncate, and the decoder also reads
Origin and Type (skipped by the follower). Column values arrive in Postgres's text format and are
kept as ``str`` (``None`` for SQL NULL, :data:`UNCHANGED` for an unchanged TOASTed value): the
caller converts the few columns it reads (docs/follow.md).

The decoder keeps the relations it was told about (a Relation message precedes the first change
of a table in every decoding session), so that a change names its table and columns.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "UNCHANGED",
    "Begin",
    "Column",
    "Commit",
    "DecodeError",
    "Decoder",
    "Delete",
    "Insert",
    "Message",
    "Origin",
    "Relation",
    "Row",
    "Truncate",
    "TypeMessage",
    "Update",
    "pg_time_to_epoch",
]

#: microseconds between the Unix epoch and Postgres's epoch (2000-01-01 UTC)
_PG_EPOCH_US: Final = 946_684_800 * 1_000_000


class _Unchanged:
    """A TOASTed value the change did not touch: Postgres does not send it again."""

    _instance: _Unchanged | None = None

    def __new__(cls) -> _Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = _Unchanged()

#: one row: column name -> text value, None (NULL) or UNCHANGED
Row = dict[str, "str | _Unchanged | None"]


class DecodeError(ValueError):
    """Bytes that are not a pgoutput message this decoder understands."""


def pg_time_to_epoch(pg_us: int) -> float:
    """A pgoutput timestamp (microseconds since 2000-01-01 UTC) as Unix epoch seconds."""
    return (pg_us + _PG_EPOCH_US) / 1_000_000


@dataclass(frozen=True, slots=True)
class Begin:
    #: LSN of the transaction's commit record
    final_lsn: int
    #: commit time, epoch seconds
    commit_time: float
    #: the transaction id, 32 bits (no epoch): see campaignstats.follower.changes.full_xid
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    flags: int
    #: LSN of the commit record
    commit_lsn: int
    #: LSN just past the commit record: where a slot may be advanced to once it is applied
    end_lsn: int
    commit_time: float


@dataclass(frozen=True, slots=True)
class Origin:
    lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_oid: int
    type_modifier: int
    #: part of the replica identity (the key an Update or Delete names the row by)
    key: bool


@dataclass(frozen=True, slots=True)
class Relation:
    relation_id: int
    namespace: str
    name: str
    #: REPLICA IDENTITY: "d" default (primary key), "n" nothing, "f" full, "i" index
    replica_identity: str
    columns: tuple[Column, ...]


@dataclass(frozen=True, slots=True)
class TypeMessage:
    type_oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    relation: Relation
    new: Row


@dataclass(frozen=True, slots=True)
class Update:
    relation: Relation
    #: the old row: all columns with REPLICA IDENTITY FULL ("O"), only the key columns when the
    #: key changed ("K"), None otherwise
    old: Row | None
    #: "O" (full old row), "K" (old key only) or None
    old_kind: str | None
    new: Row


@dataclass(frozen=True, slots=True)
class Delete:
    relation: Relation
    old: Row
    #: "O" (full old row) or "K" (key only)
    old_kind: str


@dataclass(frozen=True, slots=True)
class Truncate:
    relations: tuple[Relation, ...]
    cascade: bool
    restart_identity: bool


Message = Begin | Commit | Origin | Relation | TypeMessage | Insert | Update | Delete | Truncate

_I8 = struct.Struct(">b")
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_U64 = struct.Struct(">Q")


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _take(self, s: struct.Struct) -> int:
        try:
            (value,) = s.unpack_from(self.data, self.pos)
        except struct.error as exc:
            raise DecodeError(f"message truncated at byte {self.pos}") from exc
        self.pos += s.size
        return int(value)

    def i8(self) -> int:
        return self._take(_I8)

    def i16(self) -> int:
        return self._take(_I16)

    def i32(self) -> int:
        return self._take(_I32)

    def u32(self) -> int:
        return self._take(_U32)

    def i64(self) -> int:
        return self._take(_I64)

    def u64(self) -> int:
        return self._take(_U64)

    def byte(self) -> str:
        if self.pos >= len(self.data):
            raise DecodeError(f"message truncated at byte {self.pos}")
        b = self.data[self.pos]
        self.pos += 1
        return chr(b)

    def string(self) -> str:
        end = self.data.find(b"\x00", self.pos)
        if end < 0:
            raise DecodeError(f"unterminated string at byte {self.pos}")
        text = self.data[self.pos : end].decode()
        self.pos = end + 1
        return text

    def raw(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise DecodeError(f"value of {n} bytes truncated at byte {self.pos}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def end(self) -> None:
        if self.pos != len(self.data):
            raise DecodeError(f"{len(self.data) - self.pos} bytes left after the message")


@dataclass(slots=True)
class Decoder:
    """Decodes one pgoutput message at a time; remembers the relations it has seen."""

    relations: dict[int, Relation] = field(default_factory=dict)

    def decode(self, data: bytes) -> Message:
        if not data:
            raise DecodeError("empty message")
        r = _Reader(bytes(data))
        kind = r.byte()
        msg: Message
        if kind == "B":
            final_lsn = r.u64()
            ts = r.i64()
            xid = r.u32()
            msg = Begin(final_lsn, pg_time_to_epoch(ts), xid)
        elif kind == "C":
            flags = r.i8()
            commit_lsn = r.u64()
            end_lsn = r.u64()
            ts = r.i64()
            msg = Commit(flags, commit_lsn, end_lsn, pg_time_to_epoch(ts))
        elif kind == "O":
            msg = Origin(r.u64(), r.string())
        elif kind == "R":
            msg = self._relation(r)
        elif kind == "Y":
            msg = TypeMessage(r.u32(), r.string(), r.string())
        elif kind == "I":
            rel = self._rel(r.u32())
            if r.byte() != "N":
                raise DecodeError("Insert without a new tuple")
            msg = Insert(rel, self._tuple(r, rel))
        elif kind == "U":
            rel = self._rel(r.u32())
            tag = r.byte()
            old: Row | None = None
            old_kind: str | None = None
            if tag in ("K", "O"):
                old_kind = tag
                old = self._tuple(r, rel)
                tag = r.byte()
            if tag != "N":
                raise DecodeError(f"Update without a new tuple (got {tag!r})")
            msg = Update(rel, old, old_kind, self._tuple(r, rel))
        elif kind == "D":
            rel = self._rel(r.u32())
            tag = r.byte()
            if tag not in ("K", "O"):
                raise DecodeError(f"Delete without an old tuple (got {tag!r})")
            msg = Delete(rel, self._tuple(r, rel), tag)
        elif kind == "T":
            n = r.i32()
            options = r.i8()
            rels = tuple(self._rel(r.u32()) for _ in range(n))
            msg = Truncate(rels, bool(options & 1), bool(options & 2))
        else:
            raise DecodeError(f"unknown pgoutput message {kind!r}")
        r.end()
        return msg

    def _relation(self, r: _Reader) -> Relation:
        relid = r.u32()
        namespace = r.string()
        name = r.string()
        ident = r.byte()
        columns = []
        for _ in range(r.i16()):
            flags = r.i8()
            columns.append(Column(r.string(), r.u32(), r.i32(), bool(flags & 1)))
        rel = Relation(relid, namespace, name, ident, tuple(columns))
        self.relations[relid] = rel
        return rel

    def _rel(self, relid: int) -> Relation:
        rel = self.relations.get(relid)
        if rel is None:
            raise DecodeError(f"a change of relation {relid} before its Relation message")
        return rel

    def _tuple(self, r: _Reader, rel: Relation) -> Row:
        n = r.i16()
        if n != len(rel.columns):
            raise DecodeError(
                f"{rel.name}: a tuple of {n} columns, the relation has {len(rel.columns)}"
            )
        row: Row = {}
        for col in rel.columns:
            kind = r.byte()
            if kind == "n":
                row[col.name] = None
            elif kind == "u":
                row[col.name] = UNCHANGED
            elif kind == "t":
                row[col.name] = r.raw(r.i32()).decode()
            elif kind == "b":
                raise DecodeError("binary column values are not supported (use binary 'false')")
            else:
                raise DecodeError(f"unknown tuple value kind {kind!r}")
        return row
