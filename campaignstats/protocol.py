"""The wire codec of shared/PROTOCOL.md: bytes in, typed messages out, and back. No sockets.

In the manner of h11: :class:`ServerCodec` turns what a client sent into messages
(:meth:`~ServerCodec.receive_data`, then :meth:`~ServerCodec.next_messages`) and the server's
answers into bytes; :class:`ClientCodec` does the same from the client's side. Both are fed bytes
in any chunking; MessagePack values delimit themselves, so the same stream gives the same messages
whether it arrives whole or one byte at a time.

Every field is validated here, once: a message that comes out of :class:`ServerCodec` is well
typed and in range. A message that is valid MessagePack but not a valid message comes out as a
:class:`Rejected` carrying the error to send back (the connection goes on); bytes that are not
MessagePack, or a value over the size limit, raise :class:`~campaignstats.errors.BadFrame`, after
which the connection must be closed.
"""

from __future__ import annotations

import functools
import reprlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, NamedTuple

import msgpack
import msgspec

from campaignstats.errors import BadFrame, BadMessage, Invalid, ProtocolError
from campaignstats.model import (
    DEFAULT_MAX_STRING,
    MAX_ID,
    Increment,
    IncrementLike,
    WireStats,
    check_increment,
)

PROTOCOL_VERSION = 1
DEFAULT_MAX_MESSAGE = 1 << 20  # bytes
DEFAULT_MAX_BATCH = 10_000  # items in one incs, ids in one stats_many or resync
_FEED_CHUNK = 1 << 16


@dataclass(frozen=True, slots=True)
class Limits:
    max_message: int = DEFAULT_MAX_MESSAGE
    max_batch: int = DEFAULT_MAX_BATCH
    max_string: int = DEFAULT_MAX_STRING


# -- client to server -----------------------------------------------------------------------------


class Incs(NamedTuple):
    """``inc`` or ``incs``: the valid increments, and the rejected items' (index, reason)."""

    items: Sequence[IncrementLike]  # Increment, or the fast path's msgspec items (same fields)
    rejected: list[tuple[int, str]]
    single: bool  # an ``inc`` (errors name no index) rather than an ``incs``


class Hello(NamedTuple):
    req_id: int
    protocol: int
    token: str | None
    client: str | None


class Ping(NamedTuple):
    req_id: int


class StatsReq(NamedTuple):
    req_id: int
    campaign_id: int


class StatsManyReq(NamedTuple):
    req_id: int
    campaign_ids: list[int]


class FlushReq(NamedTuple):
    req_id: int


class InfoReq(NamedTuple):
    req_id: int


class ResyncReq(NamedTuple):
    req_id: int
    scope: str | list[int]


class SubReq(NamedTuple):
    req_id: int
    campaign_id: int


class UnsubReq(NamedTuple):
    req_id: int
    campaign_id: int


class Rejected(NamedTuple):
    """A readable value that is not a valid message: answer ``err`` and go on."""

    req_id: int | None
    error: ProtocolError


Call = Hello | Ping | StatsReq | StatsManyReq | FlushReq | InfoReq | ResyncReq | SubReq | UnsubReq
ClientMessage = Incs | Call | Rejected

# -- server to client -----------------------------------------------------------------------------


class Ok(NamedTuple):
    req_id: int
    result: Any


class Err(NamedTuple):
    req_id: int | None
    code: str
    message: str

    def exception(self) -> ProtocolError:
        """The typed exception for this error (one class per wire code)."""
        return ProtocolError.from_code(self.code, self.message)


class Pub(NamedTuple):
    campaign_id: int
    stats: WireStats


ServerMessage = Ok | Err | Pub

# -- decoding -------------------------------------------------------------------------------------


class _Decoder:
    """MessagePack values from a byte stream, with an exact per-value size limit.

    msgpack's Unpacker consumes the parts of a value it is still building, so the size of a
    value is measured from the stream offset where it started (the end of the previous value),
    across as many feeds as it takes to arrive.
    """

    def __init__(self, max_message: int, *, frames: bool = False) -> None:
        self.max_message = max_message
        #: frames=True: return each value's raw bytes (found with skip(), which builds nothing),
        #: for a decoder that validates while it decodes; else the decoded values
        self._frames = frames
        self._reset()
        #: an error found after some complete values: raised by the next feed
        self.error: BadFrame | None = None

    def _reset(self) -> None:
        """Fresh, small buffers. Called at the start and whenever a read ends on a message
        boundary: an Unpacker's buffer only grows (up to the message limit), so keeping one
        per connection for ever would let each idle connection hold up to a megabyte."""
        self._buf = bytearray()  # frames mode: the stream from offset _base on
        self._base = 0
        self._unpacker = msgpack.Unpacker(
            raw=False,
            strict_map_key=False,
            read_size=4096,
            max_buffer_size=self.max_message + _FEED_CHUNK,
        )
        self._fed = 0  # bytes fed to this unpacker
        self._start = 0  # offset where the value being read starts

    def feed(self, data: bytes) -> list[Any]:
        """Every value completed by ``data``.

        Raises BadFrame on bytes that are not MessagePack or a value over the limit; values
        completed before the bad bytes are returned first, and the error comes with the next
        call, so the outcome does not depend on how the stream was cut into reads.
        """
        if self.error is not None:
            raise self.error
        values: list[Any] = []
        view = memoryview(data)
        try:
            for start in range(0, len(view), _FEED_CHUNK):
                chunk = view[start : start + _FEED_CHUNK]
                try:
                    self._unpacker.feed(chunk)
                except msgpack.BufferFull:
                    raise BadFrame(f"a message is over {self.max_message} bytes") from None
                self._fed += len(chunk)
                if self._frames:
                    self._buf += chunk
                self._drain(values)
        except BadFrame as exc:
            if not values:
                raise
            self.error = exc
            return values
        if self._start == self._fed and self._fed > _FEED_CHUNK:
            self._reset()
        return values

    def _drain(self, values: list[Any]) -> None:
        unpacker = self._unpacker
        max_message = self.max_message
        frames = self._frames
        read = unpacker.skip if frames else unpacker.unpack
        buf, base = self._buf, self._base
        while True:
            try:
                value = read()
            except msgpack.OutOfData:
                break
            except (msgpack.ExtraData, ValueError, TypeError, msgpack.UnpackException) as exc:
                raise BadFrame(f"not MessagePack: {type(exc).__name__} {exc}".strip()) from None
            end = unpacker.tell()
            if end - self._start > max_message:
                raise BadFrame(f"a message is over {max_message} bytes")
            values.append(bytes(buf[self._start - base : end - base]) if frames else value)
            self._start = end
        if frames:
            del buf[: self._start - base]
            self._base = self._start
            if buf and _claimed_size(buf) > max_message:
                # skip() does not check lengths the way unpack() does: refuse a header that
                # announces more than the limit without waiting for the bytes to arrive.
                raise BadFrame(f"a message is over {max_message} bytes")
        if self._fed - self._start > max_message:
            raise BadFrame(f"a message is over {max_message} bytes")


# Headers whose 2- or 4-byte big-endian length follows the first byte (MessagePack spec).
_LENGTH_HEADERS = {
    0xC4: 1, 0xC5: 2, 0xC6: 4,  # bin 8/16/32
    0xD9: 1, 0xDA: 2, 0xDB: 4,  # str 8/16/32
    0xDC: 2, 0xDD: 4,  # array 16/32 (each item is at least one byte)
    0xDE: 2, 0xDF: 4,  # map 16/32 (each pair is at least two bytes)
}  # fmt: skip


def _claimed_size(partial: bytearray) -> int:
    """The least size the value starting ``partial`` announces in its first header (0: n/a)."""
    width = _LENGTH_HEADERS.get(partial[0])
    if width is None or len(partial) < 1 + width:
        return 0
    n = int.from_bytes(partial[1 : 1 + width], "big")
    return n * 2 if partial[0] in (0xDE, 0xDF) else n


_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxstring = 60
_repr.maxother = 60


def _short(value: object) -> str:
    """A bounded repr: a peer's deeply nested value must not cost a deep recursion."""
    return _repr.repr(value)


_INCS_HEAD = b"\x92\xa4incs"  # fixarray of 2, then the fixstr "incs"


@functools.lru_cache(maxsize=8)  # one per set of limits, shared by every connection
def _incs_decoder(limits: Limits) -> msgspec.msgpack.Decoder[Any]:
    """A decoder of ``["incs", [item, ...]]`` whose items pass every type and range check.

    Strings are limited in characters here (msgspec counts characters), and in bytes after.
    """
    ident = Annotated[int, msgspec.Meta(ge=1, le=MAX_ID)]
    text = Annotated[str, msgspec.Meta(min_length=1, max_length=limits.max_string)]
    item = msgspec.defstruct(
        "IncItem",
        [
            ("campaign_id", ident),
            ("org_id", ident),
            ("action_type", text),
            ("area", text | None),
            ("new_supporter", bool),
            ("count", ident, 1),
            ("action_id", ident | None, None),
        ],
        array_like=True,
        forbid_unknown_fields=True,  # an eighth field is an error, as in the slow path
        gc=False,
        # The fields only the map form carries: class attributes, so an array item reads as an
        # Increment does (apply_many reads by attribute) at no cost per item.
        namespace={"txid": None, "at": None, "page": None, "messages": 0},
    )
    return msgspec.msgpack.Decoder(tuple[str, list[item]])  # type: ignore[valid-type]


def _is_id(value: object) -> bool:
    return type(value) is int and 0 < value <= MAX_ID


def _req_id(msg: list[Any]) -> int | None:
    rid = msg[1] if len(msg) > 1 else None
    return rid if type(rid) is int else None


class ServerCodec:
    """The server's half: client bytes to :data:`ClientMessage`, answers to bytes."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._decoder = _Decoder(self.limits.max_message, frames=True)
        self._incs_decoder = _incs_decoder(self.limits)
        self._pack = msgpack.Packer().pack
        self._parsers: dict[str, Callable[[list[Any]], ClientMessage]] = {
            "inc": self._inc,
            "incs": self._incs,
            "hello": self._hello,
            "ping": self._ping,
            "stats": self._stats,
            "stats_many": self._stats_many,
            "flush": self._flush,
            "info": self._info,
            "resync": self._resync,
            "sub": self._sub,
            "unsub": self._unsub,
        }

    def receive_data(self, data: bytes) -> list[ClientMessage]:
        """All the messages completed by ``data``. Raises BadFrame (then close the connection).

        When bad bytes follow complete messages, the messages come first and :attr:`error`
        holds the BadFrame to answer once they are handled.
        """
        messages: list[ClientMessage] = []
        for frame in self._decoder.feed(data):
            try:
                messages.append(self._frame(frame))
            except BadFrame as exc:
                # As for bad bytes: the messages before it first, the error with the next call.
                if not messages:
                    raise
                self._decoder.error = exc
                break
        return messages

    def _frame(self, frame: bytes) -> ClientMessage:
        if frame.startswith(_INCS_HEAD):
            # The hot path: msgspec decodes and validates a whole valid batch in C, several
            # times faster than msgpack plus checks in Python. Any invalid item sends the whole
            # message down the slow path below, which finds and names each bad one.
            try:
                _, items = self._incs_decoder.decode(frame)
            except (msgspec.DecodeError, ValueError):  # invalid, or not UTF-8: the slow path says
                pass
            else:
                if len(items) <= self.limits.max_batch:
                    incs = self._accept(items)
                    if incs is not None:
                        return incs
        try:
            value = msgpack.unpackb(frame, raw=False, strict_map_key=False)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:  # e.g. invalid UTF-8
            raise BadFrame(f"not MessagePack: {type(exc).__name__} {exc}".strip()) from None
        return self.parse(value)

    def _accept(self, items: list[Any]) -> Incs | None:
        """The increments of a batch msgspec validated; None if a string is over in bytes."""
        max_string = self.limits.max_string
        max_chars = max_string >> 2
        for it in items:
            # msgspec counted characters; only a long string can be over the limit in bytes
            action_type, area = it.action_type, it.area
            if len(action_type) > max_chars and len(action_type.encode()) > max_string:
                return None
            if area is not None and len(area) > max_chars and len(area.encode()) > max_string:
                return None
        return Incs(items, [], False)  # msgspec's items have Increment's fields: no copy

    @property
    def error(self) -> BadFrame | None:
        return self._decoder.error

    def parse(self, msg: Any) -> ClientMessage:
        """A decoded value as a message (the slow path: every check in Python)."""
        if type(msg) is not list or not msg:
            return Rejected(None, BadMessage("a message is a non-empty array"))
        parser = self._parsers.get(msg[0]) if type(msg[0]) is str else None
        if parser is None:
            return Rejected(_req_id(msg), BadMessage(f"unknown op {_short(msg[0])}"))
        return parser(msg)

    # The increments are the hot path: the common case is checked inline, and only a failing
    # item goes through check_increment to find the reason.
    def _item(self, item: Any) -> Increment | ProtocolError:
        if type(item) is not list or not 5 <= len(item) <= 7:
            return BadMessage(
                "an increment is [campaign_id, org_id, action_type, area, new_supporter, "
                "(count), (action_id)]"
            )
        inc = Increment(*item)
        max_chars = self.limits.max_string >> 2  # 4 bytes per character at most in UTF-8
        cid, org, action_type, area, new, count, aid = inc[:7]
        if (
            type(cid) is int
            and 0 < cid <= MAX_ID
            and type(org) is int
            and 0 < org <= MAX_ID
            and type(action_type) is str
            and 0 < len(action_type) <= max_chars
            and (area is None or (type(area) is str and 0 < len(area) <= max_chars))
            and type(new) is bool
            and type(count) is int
            and 0 < count <= MAX_ID
            and (aid is None or (type(aid) is int and 0 < aid <= MAX_ID))
        ):
            return inc  # short strings cannot be over the byte limit, whatever their characters
        return check_increment(inc, self.limits.max_string) or inc

    def _inc(self, msg: list[Any]) -> ClientMessage:
        if not 6 <= len(msg) <= 8:
            return Rejected(None, BadMessage("inc takes 5 to 7 fields"))
        result = self._item(msg[1:])
        if isinstance(result, ProtocolError):
            return Rejected(None, result)
        return Incs([result], [], True)

    def _incs(self, msg: list[Any]) -> ClientMessage:
        if len(msg) != 2 or type(msg[1]) is not list:
            return Rejected(None, BadMessage("incs takes one array of increments"))
        items = msg[1]
        if len(items) > self.limits.max_batch:
            return Rejected(None, Invalid(f"incs holds at most {self.limits.max_batch} items"))
        # Only batches msgspec refused come here (see _frame): check each item to name the bad.
        good: list[Increment] = []
        rejected: list[tuple[int, str]] = []
        for i, item in enumerate(items):
            result = self._item(item)
            if type(result) is Increment:
                good.append(result)
            else:
                rejected.append((i, str(result)))
        return Incs(good, rejected, False)

    def _call(self, msg: list[Any], n_args: int, name: str) -> int | Rejected:
        """The req_id of a call with ``n_args`` fields after it, or why not."""
        rid = _req_id(msg)
        if rid is None:
            return Rejected(None, BadMessage(f"{name}: req_id must be an integer"))
        if len(msg) != 2 + n_args:
            return Rejected(rid, BadMessage(f"{name} takes {n_args} field(s) after req_id"))
        return rid

    def _hello(self, msg: list[Any]) -> ClientMessage:
        rid = self._call(msg, 1, "hello")
        if type(rid) is not int:
            return rid  # type: ignore[return-value]
        opts = msg[2]
        if type(opts) is not dict:
            return Rejected(rid, BadMessage("hello takes a map"))
        protocol, token, client = opts.get("protocol"), opts.get("token"), opts.get("client")
        if type(protocol) is not int:
            return Rejected(rid, BadMessage("hello: protocol must be an integer"))
        if token is not None and type(token) is not str:
            return Rejected(rid, BadMessage("hello: token must be a string"))
        if client is not None and type(client) is not str:
            return Rejected(rid, BadMessage("hello: client must be a string"))
        if protocol != PROTOCOL_VERSION:
            return Rejected(rid, Invalid(f"protocol {protocol} is not supported (1 is)"))
        return Hello(rid, protocol, token, client)

    def _ping(self, msg: list[Any]) -> ClientMessage:
        rid = self._call(msg, 0, "ping")
        return Ping(rid) if type(rid) is int else rid  # type: ignore[return-value]

    def _flush(self, msg: list[Any]) -> ClientMessage:
        rid = self._call(msg, 0, "flush")
        return FlushReq(rid) if type(rid) is int else rid  # type: ignore[return-value]

    def _info(self, msg: list[Any]) -> ClientMessage:
        rid = self._call(msg, 0, "info")
        return InfoReq(rid) if type(rid) is int else rid  # type: ignore[return-value]

    def _one_campaign(self, msg: list[Any], name: str, kind: type) -> ClientMessage:
        rid = self._call(msg, 1, name)
        if type(rid) is not int:
            return rid  # type: ignore[return-value]
        cid = msg[2]
        if type(cid) is not int:
            return Rejected(rid, BadMessage(f"{name}: campaign_id must be an integer"))
        if not _is_id(cid):
            return Rejected(rid, Invalid(f"{name}: campaign_id must be between 1 and 2**63-1"))
        return kind(rid, cid)  # type: ignore[no-any-return]

    def _stats(self, msg: list[Any]) -> ClientMessage:
        return self._one_campaign(msg, "stats", StatsReq)

    def _sub(self, msg: list[Any]) -> ClientMessage:
        return self._one_campaign(msg, "sub", SubReq)

    def _unsub(self, msg: list[Any]) -> ClientMessage:
        return self._one_campaign(msg, "unsub", UnsubReq)

    def _ids(self, rid: int, ids: Any, name: str) -> list[int] | Rejected:
        if type(ids) is not list or not all(type(i) is int for i in ids):
            return Rejected(rid, BadMessage(f"{name}: campaign ids must be an array of integers"))
        if len(ids) > self.limits.max_batch:
            return Rejected(rid, Invalid(f"{name}: at most {self.limits.max_batch} ids"))
        if not all(_is_id(i) for i in ids):
            return Rejected(rid, Invalid(f"{name}: campaign ids must be between 1 and 2**63-1"))
        return ids

    def _stats_many(self, msg: list[Any]) -> ClientMessage:
        rid = self._call(msg, 1, "stats_many")
        if type(rid) is not int:
            return rid  # type: ignore[return-value]
        ids = self._ids(rid, msg[2], "stats_many")
        return ids if isinstance(ids, Rejected) else StatsManyReq(rid, ids)

    def _resync(self, msg: list[Any]) -> ClientMessage:
        rid = self._call(msg, 1, "resync")
        if type(rid) is not int:
            return rid  # type: ignore[return-value]
        scope = msg[2]
        if scope in ("all", "live"):
            return ResyncReq(rid, scope)
        if type(scope) is str:
            return Rejected(rid, Invalid("resync: scope is 'all', 'live' or campaign ids"))
        ids = self._ids(rid, scope, "resync")
        if isinstance(ids, Rejected):
            return ids
        if not ids:
            return Rejected(rid, Invalid("resync: give at least one campaign id"))
        return ResyncReq(rid, ids)

    # -- encoding answers ----------------------------------------------------------------------

    def ok(self, req_id: int, result: Any) -> bytes:
        return self._pack(["ok", req_id, result])  # type: ignore[no-any-return]

    def err(self, req_id: int | None, error: ProtocolError) -> bytes:
        return self._pack(["err", req_id, error.code, str(error)])  # type: ignore[no-any-return]

    def pub(self, campaign_id: int, stats: WireStats) -> bytes:
        return self._pack(["pub", campaign_id, stats])  # type: ignore[no-any-return]


class ClientCodec:
    """The client's half: requests to bytes, server bytes to :data:`ServerMessage`."""

    def __init__(self, max_message: int = 64 << 20) -> None:
        # Replies (stats_many, info) can be larger than requests; the limit only guards memory.
        self._decoder = _Decoder(max_message)
        self._pack = msgpack.Packer().pack

    def receive_data(self, data: bytes) -> list[ServerMessage]:
        """The messages completed by ``data``, in any chunking.

        Raises :class:`~campaignstats.errors.BadFrame` when the server sends bytes or a value
        the protocol does not allow: the stream cannot be trusted past that point (the client
        session reports it as a :class:`~campaignstats.errors.RemoteProtocolError`).
        """
        out: list[ServerMessage] = []
        for value in self._decoder.feed(data):
            op = value[0] if type(value) is list and value else None
            if op == "ok" and len(value) == 3:
                out.append(Ok(value[1], value[2]))
            elif op == "err" and len(value) == 4:
                out.append(Err(value[1], value[2], value[3]))
            elif op == "pub" and len(value) == 3:
                out.append(Pub(value[1], value[2]))
            else:
                error = BadFrame(f"unexpected message from the server: {_short(value)}")
                if not out:
                    raise error
                # As for bad bytes: the messages before it first, the error with the next call
                # (and in :attr:`error` at once, for a caller that wants to know now).
                self._decoder.error = error
                break
        return out

    @property
    def error(self) -> BadFrame | None:
        """A violation found after the messages last returned: the connection must go."""
        return self._decoder.error

    def call(self, op: str, req_id: int, *args: Any) -> bytes:
        return self._pack([op, req_id, *args])  # type: ignore[no-any-return]

    def inc(self, inc: Sequence[Any]) -> bytes:
        return self._pack(["inc", *inc])  # type: ignore[no-any-return]

    def incs(self, items: Sequence[Sequence[Any]]) -> bytes:
        """One ``incs`` message (the caller keeps batches within the server's limit)."""
        return self._pack(["incs", items])  # type: ignore[no-any-return]

    def cast(self, op: str, items: Sequence[Any]) -> bytes:
        """One ``incs`` or ``decs`` message; each item is the v1 array or the map form."""
        return self._pack([op, items])  # type: ignore[no-any-return]
