"""The wire codec of docs/protocol.md, in memory: no sockets, no event loop.

Bytes go into :class:`ServerCodec` (and :class:`ClientCodec`) whole, in random chunks and one byte
at a time; Hypothesis writes the messages, the cut points and the garbage. A decoded message is
compared by ``repr`` as well as ``==``, so that ``True`` never passes for ``1``, nor a tuple for a
list.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any, NamedTuple

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from campaignstats.errors import (
    ERRORS_BY_CODE,
    BadFrame,
    BadMessage,
    InternalError,
    Invalid,
    ProtocolError,
)
from campaignstats.model import MAX_ID, Increment
from campaignstats.protocol import (
    PROTOCOL_VERSION,
    Batch,
    Call,
    ClientCodec,
    ClientMessage,
    Err,
    Hello,
    Limits,
    Ok,
    Ping,
    Pub,
    Rejected,
    ServerCodec,
)
from campaignstats.requests import Flush, Info, Resync, Stats, StatsMany, Subscribe, Unsubscribe

pytestmark = pytest.mark.timeout(60)


def examples(n: int) -> settings:
    # No example database: these tests must leave nothing behind in the working tree.
    return settings(
        max_examples=n,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


# -- helpers --------------------------------------------------------------------------------------


def pack(value: Any) -> bytes:
    return msgpack.packb(value)  # type: ignore[no-any-return]


def decode(data: bytes, limits: Limits | None = None) -> list[ClientMessage]:
    codec = ServerCodec(limits)
    out = messages_of(codec.receive_data(data))
    codec.receive_data(b"")  # the end of the stream: raises an error found after some values
    return out


def decode_in_chunks(
    data: bytes, cuts: Sequence[int], limits: Limits | None = None
) -> list[ClientMessage]:
    codec = ServerCodec(limits)
    bounds = [0, *sorted(cuts), len(data)]
    out: list[ClientMessage] = []
    for start, end in pairwise(bounds):
        out.extend(messages_of(codec.receive_data(data[start:end])))
    codec.receive_data(b"")
    return out


def decode_bytewise(data: bytes, limits: Limits | None = None) -> list[ClientMessage]:
    return decode_in_chunks(data, range(1, len(data)), limits)


def decode_one(value: Any, limits: Limits | None = None) -> ClientMessage:
    messages = decode(pack(value), limits)
    assert len(messages) == 1
    return messages[0]


def messages_of(decoded: list[ClientMessage]) -> list[Any]:
    """What the codec gave, one entry per message sent: single ``inc`` (or ``dec``) messages in a
    row come out as one Batch marked single, one item per message (one decode for a read),
    which is taken apart here; each entry :func:`plain`."""
    out: list[Any] = []
    for message in decoded:
        if type(message) is Batch and message.single and len(message.items) > 1:
            out.extend(plain(message._replace(items=[item])) for item in message.items)
        else:
            out.append(plain(message))
    return out


def plain(message: Any) -> Any:
    """The codec's fast path gives msgspec items with Increment's fields (read by attribute, as
    apply_many reads them): compare as Increments."""
    if type(message) is Batch:
        items = [as_increment(i) for i in message.items]
        return message._replace(items=items)
    return message


def comparable(message: object) -> object:
    """Exceptions compare by identity: a Rejected is compared by its req_id, class and text."""
    if type(message) is Rejected:
        return ("Rejected", message.req_id, type(message.error), str(message.error))
    return (type(message), repr(message))


def assert_same(actual: object, expected: object) -> None:
    assert actual == expected
    assert repr(actual) == repr(expected)  # types too: bool is not int, list is not tuple


def assert_rejected(message: ClientMessage, req_id: int | None, error: type[ProtocolError]) -> None:
    assert type(message) is Rejected, message
    assert message.req_id == req_id
    assert type(message.req_id) is type(req_id)
    assert type(message.error) is error, message.error
    assert str(message.error)  # the text that goes into the err reply


def outcome(decoder: Callable[[], list[ClientMessage]]) -> list[object] | type[BadFrame]:
    """The messages, or BadFrame; any other exception escapes and fails the test."""
    try:
        return [comparable(m) for m in decoder()]
    except BadFrame:
        return BadFrame


# -- strategies -----------------------------------------------------------------------------------

ids = st.integers(1, MAX_ID)
req_ids = st.integers(-(2**63), 2**64 - 1)  # anything MessagePack can carry: the client picks
counts = st.integers(1, MAX_ID)
# 1 to 64 bytes of UTF-8: up to 16 characters of any width, or longer strings of narrow ones.
wire_strings = st.one_of(
    st.text(min_size=1, max_size=16),
    st.text(st.sampled_from("aé€😀"), min_size=1, max_size=64).filter(
        lambda s: len(s.encode()) <= 64
    ),
    st.text(st.characters(max_codepoint=127), min_size=17, max_size=64),
)
campaign_id_lists = st.lists(ids, max_size=20)


class Case(NamedTuple):
    """One valid client message: the value on the wire, the typed message, ClientCodec's bytes."""

    value: list[Any]
    expected: ClientMessage
    client_bytes: bytes | None


@st.composite
def increment_fields(draw: st.DrawFn, n_fields: int | None = None) -> tuple[list[Any], Increment]:
    n = draw(st.sampled_from([5, 6, 7])) if n_fields is None else n_fields
    cid, org, action_type = draw(ids), draw(ids), draw(wire_strings)
    area, new = draw(st.none() | wire_strings), draw(st.booleans())
    fields: list[Any] = [cid, org, action_type, area, new]
    count, action_id = 1, None  # the defaults of the 5- and 6-field forms
    if n >= 6:
        count = draw(counts)
        fields.append(count)
    if n == 7:
        action_id = draw(st.none() | ids)
        fields.append(action_id)
    return fields, Increment(cid, org, action_type, area, new, count, action_id)


def inc_case(n_fields: int) -> st.SearchStrategy[Case]:
    return increment_fields(n_fields).map(
        lambda fi: Case(["inc", *fi[0]], Batch([fi[1]], [], True), ClientCodec().inc(fi[0]))
    )


@st.composite
def incs_case(draw: st.DrawFn) -> Case:
    pairs = draw(st.lists(increment_fields(), max_size=30))
    items = [fields for fields, _ in pairs]
    return Case(
        ["incs", items], Batch([inc for _, inc in pairs], [], False), ClientCodec().incs(items)
    )


@st.composite
def hello_case(draw: st.DrawFn) -> Case:
    rid = draw(req_ids)
    opts: dict[str, Any] = {"protocol": PROTOCOL_VERSION}
    token = draw(st.none() | st.text())
    client = draw(st.none() | st.text())
    # An optional field may be left out or sent as nil.
    if token is not None or draw(st.booleans()):
        opts["token"] = token
    if client is not None or draw(st.booleans()):
        opts["client"] = client
    keys = draw(st.permutations(list(opts)))
    opts = {k: opts[k] for k in keys}
    return Case(
        ["hello", rid, opts],
        Call(rid, Hello(PROTOCOL_VERSION, token, client)),
        ClientCodec().call("hello", rid, opts),
    )


def no_arg_case(op: str, kind: Callable[[], Any]) -> st.SearchStrategy[Case]:
    return req_ids.map(lambda rid: Case([op, rid], Call(rid, kind()), ClientCodec().call(op, rid)))


def one_arg_case(
    op: str, args: st.SearchStrategy[Any], kind: Callable[[Any], Any]
) -> st.SearchStrategy[Case]:
    return st.tuples(req_ids, args).map(
        lambda ra: Case([op, *ra], Call(ra[0], kind(ra[1])), ClientCodec().call(op, *ra))
    )


VALID_CASES: dict[str, st.SearchStrategy[Case]] = {
    "inc with 5 fields": inc_case(5),
    "inc with 6 fields": inc_case(6),
    "inc with 7 fields": inc_case(7),
    "incs": incs_case(),
    "hello": hello_case(),
    "ping": no_arg_case("ping", Ping),
    "stats": one_arg_case("stats", ids, Stats),
    "stats_many": one_arg_case("stats_many", campaign_id_lists, StatsMany),
    "flush": no_arg_case("flush", Flush),
    "info": no_arg_case("info", Info),
    "resync all": one_arg_case("resync", st.just("all"), Resync),
    "resync live": one_arg_case("resync", st.just("live"), Resync),
    "resync ids": one_arg_case("resync", st.lists(ids, min_size=1, max_size=20), Resync),
    "sub": one_arg_case("sub", ids, Subscribe),
    "unsub": one_arg_case("unsub", ids, Unsubscribe),
}
valid_cases = st.one_of(*VALID_CASES.values())

# Any MessagePack value (no NaN, so that equality holds after a round trip).
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text() | st.integers(-(2**63), 2**64 - 1), inner, max_size=5)
    ),
    max_leaves=20,
)
# What a client may send: mostly valid messages, and readable values that are no message at all.
wire_values = st.one_of(
    valid_cases.map(lambda c: c.value),
    msgpack_values,
    st.tuples(
        st.sampled_from(["inc", "incs", "ping", "stats", "resync", "hello"]), msgpack_values
    ).map(list),
)
streams = st.lists(wire_values, max_size=12).map(lambda vs: b"".join(pack(v) for v in vs))


# -- 1. valid messages round-trip -----------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VALID_CASES))
@examples(40)
@given(data=st.data())
def test_every_valid_client_message_decodes_to_a_typed_message_with_exactly_its_fields(
    variant: str, data: st.DataObject
) -> None:
    case = data.draw(VALID_CASES[variant])
    wire = pack(case.value)
    assert case.client_bytes == wire  # ClientCodec writes what any MessagePack library writes
    assert_same(decode(wire), [case.expected])


def test_an_inc_without_count_and_action_id_gets_count_1_and_no_action_id() -> None:
    [message] = decode(pack(["inc", 3, 4, "share", None, False]))
    assert message == Batch([Increment(3, 4, "share", None, False, 1, None)], [], True)
    [message] = decode(pack(["inc", 3, 4, "share", "DE", True, 5]))
    assert message == Batch([Increment(3, 4, "share", "DE", True, 5, None)], [], True)


@examples(50)
@given(cases=st.lists(valid_cases, max_size=10))
def test_a_stream_of_valid_messages_decodes_to_the_same_messages_in_the_same_order(
    cases: list[Case],
) -> None:
    wire = b"".join(pack(c.value) for c in cases)
    assert_same(decode(wire), [c.expected for c in cases])


# -- 2. chunking does not matter ------------------------------------------------------------------


@examples(150)
@given(wire=streams, data=st.data())
def test_a_stream_gives_the_same_messages_whole_in_random_chunks_and_byte_by_byte(
    wire: bytes, data: st.DataObject
) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=20), label="cuts")
    whole = [comparable(m) for m in decode(wire)]
    assert [comparable(m) for m in decode_in_chunks(wire, cuts)] == whole
    assert [comparable(m) for m in decode_bytewise(wire)] == whole


@examples(100)
@given(values=st.lists(wire_values, min_size=1, max_size=8), data=st.data())
def test_a_stream_cut_anywhere_gives_exactly_the_messages_completed_before_the_cut(
    values: list[Any], data: st.DataObject
) -> None:
    frames = [pack(v) for v in values]
    wire = b"".join(frames)
    cut = data.draw(st.integers(0, len(wire)), label="cut")
    ends = [sum(len(f) for f in frames[: i + 1]) for i in range(len(frames))]
    complete = sum(1 for end in ends if end <= cut)
    codec = ServerCodec()
    head = messages_of(codec.receive_data(wire[:cut]))
    tail = messages_of(codec.receive_data(wire[cut:]))
    assert len(head) == complete
    assert [comparable(m) for m in head + tail] == [comparable(m) for m in decode(wire)]


# -- 3. garbage is BadFrame and nothing else ------------------------------------------------------


@examples(300)
@given(garbage=st.binary(max_size=300))
def test_arbitrary_bytes_decode_into_messages_or_raise_bad_frame_and_nothing_else(
    garbage: bytes,
) -> None:
    whole = outcome(lambda: decode(garbage))
    # Whether the stream is broken does not depend on how it arrives.
    bytewise = outcome(lambda: decode_bytewise(garbage))
    assert (whole is BadFrame) == (bytewise is BadFrame)
    if whole is not BadFrame:
        assert bytewise == whole


mutations = st.lists(
    st.tuples(st.sampled_from(["flip", "insert", "delete"]), st.integers(0), st.integers(0, 255)),
    min_size=1,
    max_size=6,
)


def mutate(wire: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(wire)
    for op, where, byte in ops:
        if op == "insert":
            buf.insert(where % (len(buf) + 1), byte)
        elif buf and op == "flip":
            buf[where % len(buf)] ^= byte or 0x80
        elif buf:
            del buf[where % len(buf)]
    return bytes(buf)


@examples(300)
@given(wire=streams, ops=mutations)
def test_a_mutated_valid_stream_decodes_into_messages_or_raises_bad_frame_and_nothing_else(
    wire: bytes, ops: list[tuple[str, int, int]]
) -> None:
    broken = mutate(wire, ops)
    whole = outcome(lambda: decode(broken))
    bytewise = outcome(lambda: decode_bytewise(broken))
    assert (whole is BadFrame) == (bytewise is BadFrame)
    if whole is not BadFrame:
        assert bytewise == whole


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\xc1", id="the one byte MessagePack never uses"),
        pytest.param(b"\xa2\xff\xfe", id="a str that is not UTF-8"),
        pytest.param(b"\x92\xa4ping\xa1\xc3", id="a non-UTF-8 str inside a message"),
        pytest.param(b"\x81\x91\x01\x01", id="a map with an array as key"),
        pytest.param(b"\x81\x80\x01", id="a map with a map as key"),
        pytest.param(b"\xc7\x03\xff\x00\x00\x00", id="a timestamp of 3 bytes"),
        pytest.param(b"\xdd\xff\xff\xff\xff", id="an array header of 2**32-1 items"),
        pytest.param(b"\xdf\xff\xff\xff\xff", id="a map header of 2**32-1 pairs"),
        pytest.param(pack(["ping", 1]) + b"\xc1", id="garbage after a valid message"),
    ],
)
def test_bytes_that_are_not_messagepack_are_bad_frame(garbage: bytes) -> None:
    with pytest.raises(BadFrame):
        decode(garbage)
    with pytest.raises(BadFrame):
        decode_bytewise(garbage)


def test_after_bad_frame_the_codec_raises_again_instead_of_resynchronising() -> None:
    codec = ServerCodec()
    with pytest.raises(BadFrame):
        codec.receive_data(b"\xc1")
    with pytest.raises(BadFrame):
        codec.receive_data(pack(["ping", 1]))


# Deep nesting stays under MessagePack's own limit of 1024 levels, so this reaches the parser.
DEEP = b"\x91" * 1000 + b"\xc0"  # [[[...[nil]...]]]


def test_a_deeply_nested_value_is_rejected_or_bad_frame_never_another_exception() -> None:
    try:
        [message] = decode(DEEP)
    except BadFrame:
        return
    assert_rejected(message, None, BadMessage)


# -- 4. every error code, with its exact class ----------------------------------------------------

E4 = 2**63  # one over MAX_ID
BAD_MESSAGES: list[Any] = [
    # (value, req_id of the Rejected, error class)
    pytest.param(5, None, BadMessage, id="not an array: int"),
    pytest.param("ping", None, BadMessage, id="not an array: str"),
    pytest.param(None, None, BadMessage, id="not an array: nil"),
    pytest.param({"op": "ping"}, None, BadMessage, id="not an array: map"),
    pytest.param([], None, BadMessage, id="empty array"),
    pytest.param(["nope"], None, BadMessage, id="unknown op, no req_id"),
    pytest.param(["nope", 7], 7, BadMessage, id="unknown op keeps its req_id"),
    pytest.param(["PING", 7], 7, BadMessage, id="ops are case sensitive"),
    pytest.param([b"ping", 7], 7, BadMessage, id="op as bin, not str"),
    pytest.param([1, 7], 7, BadMessage, id="op as int"),
    pytest.param([["ping"], 7], 7, BadMessage, id="op as array"),
    pytest.param(["nope", True], None, BadMessage, id="unknown op with a bool req_id"),
    # calls: req_id
    pytest.param(["ping"], None, BadMessage, id="ping without req_id"),
    pytest.param(["ping", "1"], None, BadMessage, id="req_id as str"),
    pytest.param(["ping", 1.0], None, BadMessage, id="req_id as float"),
    pytest.param(["ping", True], None, BadMessage, id="req_id as bool"),
    pytest.param(["ping", None], None, BadMessage, id="req_id as nil"),
    # calls: field count
    pytest.param(["ping", 4, 5], 4, BadMessage, id="ping with a field"),
    pytest.param(["flush", 4, None], 4, BadMessage, id="flush with a field"),
    pytest.param(["info", 4, {}], 4, BadMessage, id="info with a field"),
    pytest.param(["stats", 4], 4, BadMessage, id="stats without campaign"),
    pytest.param(["stats", 4, 1, 2], 4, BadMessage, id="stats with two campaigns"),
    pytest.param(["sub", 4], 4, BadMessage, id="sub without campaign"),
    pytest.param(["unsub", 4, 1, 1], 4, BadMessage, id="unsub with two fields"),
    pytest.param(["stats_many", 4], 4, BadMessage, id="stats_many without ids"),
    pytest.param(["resync", 4], 4, BadMessage, id="resync without scope"),
    pytest.param(["hello", 4], 4, BadMessage, id="hello without map"),
    pytest.param(["hello", 4, {"protocol": 1}, 5], 4, BadMessage, id="hello with two fields"),
    # calls: field types
    pytest.param(["stats", 4, "1"], 4, BadMessage, id="campaign_id as str"),
    pytest.param(["stats", 4, True], 4, BadMessage, id="campaign_id as bool"),
    pytest.param(["stats", 4, 1.0], 4, BadMessage, id="campaign_id as float"),
    pytest.param(["sub", 4, None], 4, BadMessage, id="sub campaign_id as nil"),
    pytest.param(["unsub", 4, [1]], 4, BadMessage, id="unsub campaign_id as array"),
    pytest.param(["stats_many", 4, 1], 4, BadMessage, id="stats_many ids as int"),
    pytest.param(["stats_many", 4, [1, "2"]], 4, BadMessage, id="stats_many id as str"),
    pytest.param(["stats_many", 4, [1, True]], 4, BadMessage, id="stats_many id as bool"),
    pytest.param(["resync", 4, 5], 4, BadMessage, id="resync scope as int"),
    pytest.param(["resync", 4, None], 4, BadMessage, id="resync scope as nil"),
    pytest.param(["resync", 4, b"all"], 4, BadMessage, id="resync scope as bin"),
    pytest.param(["resync", 4, [True]], 4, BadMessage, id="resync id as bool"),
    pytest.param(["hello", 4, [1]], 4, BadMessage, id="hello options as array"),
    pytest.param(["hello", 4, {}], 4, BadMessage, id="hello without protocol"),
    pytest.param(["hello", 4, {"protocol": "1"}], 4, BadMessage, id="hello protocol as str"),
    pytest.param(["hello", 4, {"protocol": True}], 4, BadMessage, id="hello protocol as bool"),
    pytest.param(["hello", 4, {"protocol": 1, "token": 5}], 4, BadMessage, id="token as int"),
    pytest.param(["hello", 4, {"protocol": 1, "client": b"x"}], 4, BadMessage, id="client as bin"),
    # calls: out of range
    pytest.param(["stats", 4, 0], 4, Invalid, id="campaign_id 0"),
    pytest.param(["stats", 4, -1], 4, Invalid, id="campaign_id -1"),
    pytest.param(["stats", 4, E4], 4, Invalid, id="campaign_id 2**63"),
    pytest.param(["sub", 4, 0], 4, Invalid, id="sub campaign_id 0"),
    pytest.param(["unsub", 4, 2**64 - 1], 4, Invalid, id="unsub campaign_id 2**64-1"),
    pytest.param(["stats_many", 4, [1, 0]], 4, Invalid, id="stats_many id 0"),
    pytest.param(["stats_many", 4, [E4]], 4, Invalid, id="stats_many id 2**63"),
    pytest.param(["resync", 4, "some"], 4, Invalid, id="resync unknown scope"),
    pytest.param(["resync", 4, "ALL"], 4, Invalid, id="resync scope is case sensitive"),
    pytest.param(["resync", 4, ""], 4, Invalid, id="resync empty scope"),
    pytest.param(["resync", 4, []], 4, Invalid, id="resync no ids"),
    pytest.param(["resync", 4, [0]], 4, Invalid, id="resync id 0"),
    pytest.param(["resync", 4, [E4]], 4, Invalid, id="resync id 2**63"),
    pytest.param(["hello", 4, {"protocol": 2}], 4, Invalid, id="hello protocol 2"),
    pytest.param(["hello", 4, {"protocol": 0}], 4, Invalid, id="hello protocol 0"),
    # casts: the req_id is always None
    pytest.param(["inc", 1, 1, "a", None], None, BadMessage, id="inc with 4 fields"),
    pytest.param(["inc", 1, 1, "a", None, True, 1, 1, 9], None, BadMessage, id="inc 8 fields"),
    pytest.param(["inc"], None, BadMessage, id="inc without fields"),
    pytest.param(["incs"], None, BadMessage, id="incs without items"),
    pytest.param(["incs", 5], None, BadMessage, id="incs items as int"),
    pytest.param(["incs", {"a": 1}], None, BadMessage, id="incs items as map"),
    pytest.param(["incs", [], []], None, BadMessage, id="incs with two fields"),
]


@pytest.mark.parametrize(("value", "req_id", "error"), BAD_MESSAGES)
def test_a_readable_but_wrong_message_is_rejected_with_the_exact_error_class(
    value: Any, req_id: int | None, error: type[ProtocolError]
) -> None:
    assert_rejected(decode_one(value), req_id, error)


def test_a_rejected_message_does_not_stop_the_stream() -> None:
    wire = pack(["nope", 1]) + pack(["stats", 2, 0]) + pack(["ping", 3])
    messages = decode(wire)
    assert_rejected(messages[0], 1, BadMessage)
    assert_rejected(messages[1], 2, Invalid)
    assert messages[2] == Call(3, Ping())


GOOD = [1, 2, "sign", "DE", True, 1, 10]  # a valid 7-field increment
# Each field replaced by a value of the wrong type: BadMessage. None is allowed in area/action_id.
WRONG_TYPES: dict[int, list[Any]] = {
    0: ["1", 1.0, True, None, b"\x01", [1], {}],
    1: ["1", 1.0, False, None, b"\x01", [1], {}],
    2: [1, b"sign", None, True, ["sign"], {}],
    3: [1, b"DE", True, ["DE"], {}],
    4: [1, 0, None, "true", [True]],
    5: ["1", 1.0, True, None, b"\x01"],
    6: ["10", 10.0, True, b"\x01", [10]],
}
OUT_OF_RANGE: dict[int, list[Any]] = {
    0: [0, -1, E4, 2**64 - 1, -(2**63)],
    1: [0, -5, E4],
    2: ["", "a" * 65, "😀" * 17, "é" * 33, "a" + "😀" * 16],
    3: ["", "a" * 65, "😀" * 17, "€" * 22],
    5: [0, -1, E4],
    6: [0, -1, E4],
}


@examples(150)
@given(data=st.data())
def test_an_increment_with_a_wrongly_typed_field_is_bad_message_with_no_req_id(
    data: st.DataObject,
) -> None:
    field = data.draw(st.sampled_from(sorted(WRONG_TYPES)), label="field")
    bad = data.draw(st.sampled_from(WRONG_TYPES[field]), label="value")
    item = [*GOOD[:field], bad, *GOOD[field + 1 :]]
    assert_rejected(decode_one(["inc", *item]), None, BadMessage)
    [batch] = decode(pack(["incs", [GOOD, item]]))
    assert type(batch) is Batch
    assert batch.items == [Increment(*GOOD)]
    assert [i for i, _ in batch.rejected] == [1]


@examples(150)
@given(data=st.data())
def test_an_increment_with_a_field_out_of_range_is_invalid_with_no_req_id(
    data: st.DataObject,
) -> None:
    field = data.draw(st.sampled_from(sorted(OUT_OF_RANGE)), label="field")
    bad = data.draw(st.sampled_from(OUT_OF_RANGE[field]), label="value")
    item = [*GOOD[:field], bad, *GOOD[field + 1 :]]
    assert_rejected(decode_one(["inc", *item]), None, Invalid)


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("a" * 64, True),
        ("a" * 65, False),
        ("😀" * 16, True),  # 16 characters of 4 bytes: exactly 64 bytes
        ("😀" * 17, False),  # 68 bytes
        ("😀" * 15 + "aaaa", True),  # 19 characters, 64 bytes
        ("😀" * 15 + "aaaaa", False),  # 20 characters, 65 bytes
        ("é" * 32, True),
        ("é" * 33, False),
        ("€" * 21, True),  # 63 bytes
        ("€" * 22, False),  # 66 bytes
        ("", False),
    ],
)
def test_action_type_and_area_are_limited_to_64_bytes_of_utf8_not_64_characters(
    text: str, valid: bool
) -> None:
    for item in ([1, 2, text, None, False], [1, 2, "sign", text, True]):
        message = decode_one(["inc", *item])
        if valid:
            assert message == Batch([Increment(*item)], [], True)
        else:
            assert_rejected(message, None, Invalid)


@examples(200)
@given(
    # Lone surrogates cannot be encoded to UTF-8, so no MessagePack str can carry them.
    text=st.text(st.sampled_from("aé€😀") | st.characters(exclude_categories=["Cs"]), max_size=70),
    max_string=st.integers(1, 70),
)
def test_a_string_is_accepted_exactly_when_its_utf8_is_1_to_max_string_bytes(
    text: str, max_string: int
) -> None:
    message = decode_one(["inc", 1, 2, text, None, False], Limits(max_string=max_string))
    if 1 <= len(text.encode()) <= max_string:
        assert message == Batch([Increment(1, 2, text)], [], True)
    else:
        assert_rejected(message, None, Invalid)


def test_count_0_is_invalid_and_count_1_is_not() -> None:
    assert_rejected(decode_one(["inc", 1, 2, "a", None, True, 0]), None, Invalid)
    assert decode_one(["inc", 1, 2, "a", None, True, 1]) == Batch(
        [Increment(1, 2, "a", None, True)], [], True
    )


def test_ids_are_1_to_2_63_minus_1_inclusive() -> None:
    assert decode_one(["stats", 9, MAX_ID]) == Call(9, Stats(MAX_ID))
    assert decode_one(["stats", 9, 1]) == Call(9, Stats(1))
    assert decode_one(["inc", MAX_ID, MAX_ID, "a", None, True, MAX_ID, MAX_ID]) == Batch(
        [Increment(MAX_ID, MAX_ID, "a", None, True, MAX_ID, MAX_ID)], [], True
    )


BAD_ITEMS: list[Any] = [
    [0, 1, "a", None, True],
    [1, E4, "a", None, True],
    [1, 1, "", None, True],
    [1, 1, "a" * 65, None, True],
    [1, 1, "😀" * 17, None, True],
    [1, 1, "a", "", True],
    [1, 1, "a", None, True, 0],
    [1, 1, "a", None, True, 1, 0],
    [True, 1, "a", None, True],
    [1, 1, "a", None, 1],
    [1, 1, "a", None],
    [1, 1, "a", None, True, 1, None, 7],
    [],
    "not an array",
    7,
    None,
    {"campaign_id": 1},
]


@examples(150)
@given(
    items=st.lists(
        st.one_of(
            increment_fields().map(lambda fi: (fi[0], fi[1])),
            st.sampled_from(BAD_ITEMS).map(lambda bad: (bad, None)),
        ),
        max_size=20,
    )
)
def test_incs_keeps_the_valid_items_in_order_and_lists_the_index_of_each_bad_one(
    items: list[tuple[Any, Increment | None]],
) -> None:
    [message] = decode(pack(["incs", [wire for wire, _ in items]]))
    assert type(message) is Batch
    assert not message.single
    assert_same(message.items, [inc for _, inc in items if inc is not None])
    bad = [i for i, (_, inc) in enumerate(items) if inc is None]
    assert [i for i, _ in message.rejected] == bad
    assert all(type(reason) is str and reason for _, reason in message.rejected)


def test_incs_with_more_than_max_batch_items_is_invalid_as_a_whole() -> None:
    item = [1, 2, "a", None, True]
    small = Limits(max_batch=3)
    assert decode_one(["incs", [item] * 3], small) == Batch([Increment(*item)] * 3, [], False)
    assert_rejected(decode_one(["incs", [item] * 4], small), None, Invalid)
    # The default limit of PROTOCOL.md: 10,000 items.
    assert len(decode_one(["incs", [item] * 10_000]).items) == 10_000  # type: ignore[union-attr]
    assert_rejected(decode_one(["incs", [item] * 10_001]), None, Invalid)


def test_stats_many_and_resync_with_more_than_max_batch_ids_are_invalid() -> None:
    small = Limits(max_batch=3)
    assert decode_one(["stats_many", 5, [1, 2, 3]], small) == Call(5, StatsMany([1, 2, 3]))
    assert_rejected(decode_one(["stats_many", 5, [1, 2, 3, 4]], small), 5, Invalid)
    assert decode_one(["resync", 6, [1, 2, 3]], small) == Call(6, Resync([1, 2, 3]))
    assert_rejected(decode_one(["resync", 6, [1, 2, 3, 4]], small), 6, Invalid)
    assert_rejected(decode_one(["stats_many", 7, list(range(1, 10_002))]), 7, Invalid)


# -- 4b. the size limit ---------------------------------------------------------------------------

SMALL = Limits(max_message=100)


def hello_of_size(size: int) -> bytes:
    """A valid hello of exactly ``size`` bytes (the client name pads it)."""
    base = len(pack(["hello", 1, {"protocol": 1, "client": ""}]))
    for pad in range(size):
        wire = pack(["hello", 1, {"protocol": 1, "client": "x" * pad}])
        if len(wire) == size:
            return wire
    raise AssertionError(f"no hello of {size} bytes (the smallest is {base})")


def test_a_message_of_exactly_max_message_bytes_is_accepted_whole_and_byte_by_byte() -> None:
    wire = hello_of_size(100)
    expected = [Call(1, Hello(1, None, msgpack.unpackb(wire)[2]["client"]))]
    assert decode(wire, SMALL) == expected
    assert decode_bytewise(wire, SMALL) == expected
    codec = ServerCodec(SMALL)
    assert codec.receive_data(wire[:-1]) == []  # 99 bytes of a message: wait for the rest


def test_a_message_one_byte_over_max_message_is_bad_frame_when_it_arrives_whole() -> None:
    with pytest.raises(BadFrame):
        decode(hello_of_size(101), SMALL)
    with pytest.raises(BadFrame):
        decode(pack(["ping", 1]) + hello_of_size(101), SMALL)


def test_a_partial_message_with_a_long_string_is_bad_frame_long_before_the_rest_arrives() -> None:
    wire = pack(["hello", 1, {"protocol": 1, "client": "x" * 1000}])
    codec = ServerCodec(SMALL)
    assert codec.receive_data(wire[:100]) == []
    with pytest.raises(BadFrame):
        codec.receive_data(wire[100:200])
    with pytest.raises(BadFrame):
        decode(b"\xdb\xff\xff\xff\xff" + b"x" * 200, SMALL)  # a str header of 4 GiB


def test_a_message_whose_one_string_is_over_the_default_1_mib_is_bad_frame() -> None:
    wire = pack(["ping", 1, b"\0" * ((1 << 20) + 100)])
    with pytest.raises(BadFrame):
        decode(wire)


@examples(60)
@given(size=st.integers(101, 400), data=st.data())
def test_a_message_with_a_large_string_over_max_message_is_bad_frame_in_any_chunking(
    size: int, data: st.DataObject
) -> None:
    wire = pack(["hello", 1, {"protocol": 1, "client": "x" * size}])
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=30), label="cuts")
    with pytest.raises(BadFrame):
        decode_in_chunks(wire, cuts, SMALL)


# 20 small increments: 149 bytes, made of many small MessagePack values.
BIG_ARRAY = pack(["incs", [[1, 1, "a", None, True]] * 20])


def test_an_oversized_array_of_many_small_values_is_bad_frame_when_whole() -> None:
    assert len(BIG_ARRAY) == 149
    with pytest.raises(BadFrame):
        decode(BIG_ARRAY, SMALL)


def test_a_message_over_max_message_is_bad_frame_also_when_it_arrives_one_byte_at_a_time() -> None:
    with pytest.raises(BadFrame):
        decode_bytewise(BIG_ARRAY, SMALL)


def test_a_message_over_max_message_is_bad_frame_also_when_it_arrives_in_two_halves() -> None:
    with pytest.raises(BadFrame):
        decode_in_chunks(BIG_ARRAY, [75], SMALL)


def test_a_partial_message_already_over_max_message_is_bad_frame_before_the_rest_arrives() -> None:
    wire = pack(["hello", 1, {"protocol": 1, "client": "x" * 1000}])
    codec = ServerCodec(SMALL)
    assert codec.receive_data(wire[:100]) == []
    # Raised only at byte 130: the bytes of the prefix msgpack has already parsed are not counted.
    with pytest.raises(BadFrame):
        codec.receive_data(wire[100:101])


def test_a_message_just_over_the_default_1_mib_is_bad_frame_when_it_arrives_whole() -> None:
    # 1,048,588 bytes in one receive_data call; the codec feeds msgpack 64 KiB at a time.
    wire = pack(["ping", 1, b"\0" * (1 << 20)])
    with pytest.raises(BadFrame):
        decode(wire)


def test_a_2_mib_message_of_two_strings_is_bad_frame_when_it_arrives_whole() -> None:
    wire = pack(["ping", 1, b"\0" * (1 << 20), b"\0" * (1 << 20)])
    with pytest.raises(BadFrame):
        decode(wire)


def test_a_partial_array_already_over_max_message_is_bad_frame_before_the_rest_arrives() -> None:
    with pytest.raises(BadFrame):
        decode(BIG_ARRAY[:-1], SMALL)  # 148 bytes of a message, the limit is 100


# -- 5. the client's half -------------------------------------------------------------------------

STATS = {
    "supporters": 3,
    "action": {"register": 3, "share": 1, "Ünïcödé 😀": 2},
    "area": {"DE": 2, "FR": 1},
    "org": {7: 2, MAX_ID: 1},  # integer keys
    "extra_supporters": 0,
}
stats_maps = st.fixed_dictionaries(
    {
        "supporters": st.integers(0, MAX_ID),
        "action": st.dictionaries(wire_strings, st.integers(0, MAX_ID), max_size=5),
        "area": st.dictionaries(wire_strings, st.integers(0, MAX_ID), max_size=5),
        "org": st.dictionaries(ids, st.integers(0, MAX_ID), max_size=5),
        "extra_supporters": st.integers(0, MAX_ID),
    }
)


def test_client_codec_decodes_ok_err_and_pub_written_by_server_codec() -> None:
    server = ServerCodec()
    wire = (
        server.ok(1, "pong")
        + server.ok(2, STATS)
        + server.ok(3, {5: STATS, 6: STATS})
        + server.ok(4, None)
        + server.ok(5, {"started": True})
        + server.err(6, Invalid("campaign_id must be between 1 and 2**63-1"))
        + server.err(None, BadMessage("inc takes 5 to 7 fields"))
        + server.pub(7, STATS)
    )
    expected = [
        Ok(1, "pong"),
        Ok(2, STATS),
        Ok(3, {5: STATS, 6: STATS}),
        Ok(4, None),
        Ok(5, {"started": True}),
        Err(6, "invalid", "campaign_id must be between 1 and 2**63-1"),
        Err(None, "bad_message", "inc takes 5 to 7 fields"),
        Pub(7, STATS),
    ]
    assert_same(ClientCodec().receive_data(wire), expected)
    codec = ClientCodec()
    assert_same([m for b in wire for m in codec.receive_data(bytes([b]))], expected)


@examples(100)
@given(
    messages=st.lists(
        st.one_of(
            st.tuples(st.just("ok"), req_ids, msgpack_values),
            st.tuples(st.just("ok"), req_ids, stats_maps),
            st.tuples(st.just("ok"), req_ids, st.dictionaries(ids, stats_maps, max_size=3)),
            st.tuples(
                st.just("err"),
                st.none() | req_ids,
                st.sampled_from(sorted(ERRORS_BY_CODE)),
                st.text(),
            ),
            st.tuples(st.just("pub"), ids, stats_maps),
        ),
        max_size=10,
    ),
    data=st.data(),
)
def test_every_server_message_round_trips_through_client_codec_in_any_chunking(
    messages: list[tuple[Any, ...]], data: st.DataObject
) -> None:
    server = ServerCodec()
    wire = b""
    expected: list[Any] = []
    for op, *rest in messages:
        if op == "ok":
            wire += server.ok(rest[0], rest[1])
            expected.append(Ok(rest[0], rest[1]))
        elif op == "err":
            rid, code, text = rest
            wire += server.err(rid, ERRORS_BY_CODE[code](text))
            expected.append(Err(rid, code, text))
        else:
            wire += server.pub(rest[0], rest[1])
            expected.append(Pub(rest[0], rest[1]))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10), label="cuts"))
    codec = ClientCodec()
    received: list[Any] = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        received.extend(codec.receive_data(wire[start:end]))
    assert_same(received, expected)


@pytest.mark.parametrize("code", sorted(ERRORS_BY_CODE))
def test_err_exception_is_the_class_registered_for_its_code_with_the_servers_text(
    code: str,
) -> None:
    cls = ERRORS_BY_CODE[code]
    [reply] = ClientCodec().receive_data(ServerCodec().err(9, cls("why it failed")))
    assert reply == Err(9, code, "why it failed")
    error = reply.exception()  # type: ignore[union-attr]
    assert type(error) is cls
    assert error.code == code
    assert str(error) == "why it failed"


def test_every_wire_code_of_protocol_md_has_its_own_class() -> None:
    codes = {"bad_frame", "bad_message", "invalid", "unauthorized", "overloaded", "internal"}
    assert set(ERRORS_BY_CODE) == codes
    assert len({ERRORS_BY_CODE[c] for c in codes}) == len(codes)
    assert all(ERRORS_BY_CODE[c].code == c for c in codes)


def test_an_err_with_an_unknown_code_becomes_internal_error() -> None:
    error = Err(1, "no_such_code", "from a newer server").exception()
    assert type(error) is InternalError
    assert str(error) == "from a newer server"


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(5, id="not an array"),
        pytest.param([], id="empty array"),
        pytest.param(["ok", 1], id="ok without result"),
        pytest.param(["ok", 1, None, 2], id="ok with two results"),
        pytest.param(["err", 1, "invalid"], id="err without message"),
        pytest.param(["pub", 1], id="pub without stats"),
        pytest.param(["inc", 1, 1, "a", None, True], id="a client op"),
    ],
)
def test_a_value_the_server_never_sends_is_bad_frame_for_the_client(value: Any) -> None:
    with pytest.raises(BadFrame):
        ClientCodec().receive_data(pack(value))


def test_garbage_from_the_server_is_bad_frame_for_the_client() -> None:
    with pytest.raises(BadFrame):
        ClientCodec().receive_data(b"\xc1")


def test_a_deeply_nested_value_from_the_server_is_bad_frame_for_the_client() -> None:
    with pytest.raises(BadFrame):
        ClientCodec().receive_data(DEEP)


# -- 6. the additions: map items, decrements, hello's ops -----------------------------------------

MAP_KEYS_OPTIONAL = ("area", "new", "count", "action", "txid", "at", "page", "messages")


@st.composite
def map_items(draw: st.DrawFn) -> tuple[dict[str, Any], Increment]:
    fields: dict[str, Any] = {"campaign": draw(ids), "org": draw(ids), "type": draw(wire_strings)}
    values: dict[str, st.SearchStrategy[Any]] = {
        "area": st.none() | wire_strings,
        "new": st.booleans(),
        "count": counts,
        "action": st.none() | ids,
        "txid": st.none() | ids,
        "at": st.none() | st.integers(0, 2**33) | st.floats(0, 253_402_300_800.0),
        "page": st.none() | ids,
        "messages": st.integers(0, MAX_ID),
    }
    for key in draw(st.lists(st.sampled_from(MAP_KEYS_OPTIONAL), unique=True)):
        fields[key] = draw(values[key])
    keys = draw(st.permutations(list(fields)))
    item = {k: fields[k] for k in keys}
    inc = Increment(
        item["campaign"],
        item["org"],
        item["type"],
        item.get("area"),
        item.get("new", False),
        item.get("count", 1),
        item.get("action"),
        item.get("txid"),
        item.get("at"),
        item.get("page"),
        item.get("messages", 0),
    )
    return item, inc


def as_increment(item: Any) -> Increment:
    if type(item) is Increment:
        return item
    return Increment(*(getattr(item, name) for name in Increment._fields))


def same_increment(actual: Any, expected: Increment) -> None:
    got = as_increment(actual)
    assert got._replace(at=None) == expected._replace(at=None)
    assert (got.at is None) == (expected.at is None)
    if got.at is not None:
        assert float(got.at) == float(expected.at)  # type: ignore[arg-type]


@examples(100)
@given(pairs=st.lists(map_items(), min_size=1, max_size=20), decrement=st.booleans())
def test_map_items_decode_alike_in_a_batch_the_fast_path_and_alone_the_slow_path(
    pairs: list[tuple[dict[str, Any], Increment]], decrement: bool
) -> None:
    op = "decs" if decrement else "incs"
    [batch] = decode(pack([op, [item for item, _ in pairs]]))
    assert type(batch) is Batch
    assert (batch.decrement, batch.single, batch.rejected) == (decrement, False, [])
    for got, (_, expected) in zip(batch.items, pairs, strict=True):
        same_increment(got, expected)
    for item, expected in pairs:
        [single] = decode(pack(["dec" if decrement else "inc", item]))
        assert type(single) is Batch
        assert single.single
        assert single.decrement == decrement
        same_increment(single.items[0], expected)


@examples(50)
@given(
    pairs=st.lists(
        st.one_of(
            map_items(),
            increment_fields().map(lambda fi: (fi[0], fi[1])),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_a_batch_mixing_arrays_and_maps_decodes_every_item(
    pairs: list[tuple[Any, Increment]],
) -> None:
    [batch] = decode(pack(["incs", [item for item, _ in pairs]]))
    assert type(batch) is Batch
    assert batch.rejected == []
    for got, (_, expected) in zip(batch.items, pairs, strict=True):
        same_increment(got, expected)


GOOD_MAP = {"campaign": 1, "org": 2, "type": "sign"}
BAD_MAPS: list[Any] = [
    pytest.param({**GOOD_MAP, "colour": "red"}, BadMessage, id="unknown key"),
    pytest.param({1: 1, **GOOD_MAP}, BadMessage, id="integer key"),
    pytest.param({"org": 2, "type": "sign"}, BadMessage, id="no campaign"),
    pytest.param({"campaign": 1, "type": "sign"}, BadMessage, id="no org"),
    pytest.param({"campaign": 1, "org": 2}, BadMessage, id="no type"),
    pytest.param({**GOOD_MAP, "campaign": 0}, Invalid, id="campaign 0"),
    pytest.param({**GOOD_MAP, "type": ""}, Invalid, id="empty type"),
    pytest.param({**GOOD_MAP, "new": 1}, BadMessage, id="new as int"),
    pytest.param({**GOOD_MAP, "count": 0}, Invalid, id="count 0"),
    pytest.param({**GOOD_MAP, "txid": 0}, Invalid, id="txid 0"),
    pytest.param({**GOOD_MAP, "txid": "7"}, BadMessage, id="txid as str"),
    pytest.param({**GOOD_MAP, "page": E4}, Invalid, id="page 2**63"),
    pytest.param({**GOOD_MAP, "at": -1}, Invalid, id="at before 1970"),
    pytest.param({**GOOD_MAP, "at": float("nan")}, Invalid, id="at NaN"),
    pytest.param({**GOOD_MAP, "at": 1e15}, Invalid, id="at in milliseconds"),
    pytest.param({**GOOD_MAP, "at": "noon"}, BadMessage, id="at as str"),
    pytest.param({**GOOD_MAP, "messages": -1}, Invalid, id="messages -1"),
    pytest.param({**GOOD_MAP, "messages": 1.5}, BadMessage, id="messages as float"),
]


@pytest.mark.parametrize(("item", "error"), BAD_MAPS)
def test_a_wrong_map_item_is_refused_alone_and_named_by_its_index_in_a_batch(
    item: dict[Any, Any], error: type[ProtocolError]
) -> None:
    assert_rejected(decode_one(["inc", item]), None, error)
    assert_rejected(decode_one(["dec", item]), None, error)
    for op, first in (("incs", GOOD_MAP), ("decs", GOOD_MAP), ("incs", GOOD)):  # maps, mixed
        [batch] = decode(pack([op, [first, item, GOOD_MAP]]))
        assert type(batch) is Batch
        assert [i for i, _ in batch.rejected] == [1]
        assert batch.positions == [0, 2]
        assert len(batch.items) == 2


def test_nil_in_an_optional_map_key_is_its_default() -> None:
    item = {**GOOD_MAP, "count": None, "new": None, "messages": None, "area": None}
    [batch] = decode(pack(["incs", [item]]))
    assert batch.items == [Increment(1, 2, "sign")]  # type: ignore[union-attr]


def test_inc_and_dec_take_five_to_seven_fields_or_exactly_one_map() -> None:
    assert_rejected(decode_one(["dec", 1, 1, "a", None]), None, BadMessage)
    assert_rejected(decode_one(["inc", GOOD_MAP, GOOD_MAP]), None, BadMessage)
    assert_rejected(decode_one(["decs", 5]), None, BadMessage)
    [message] = decode(pack(["dec", 1, 2, "sign", None, True, 3]))
    assert message == Batch([Increment(1, 2, "sign", None, True, 3)], [], True, True)


def test_the_codec_lists_every_op_it_understands() -> None:
    assert set(ServerCodec().ops) == {
        "hello", "ping", "stats", "stats_many", "flush", "info", "resync", "sub", "unsub",
        "inc", "incs", "dec", "decs", "metric", "metrics", "reset_metrics", "guard",
        "history", "recent", "top",
        "set_goals", "get_goals",
        "page_stats", "org_stats",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("😀" * 16, True),  # 16 characters, 64 bytes: the short decoders' own
        ("😀" * 15 + "aaaa", True),  # 19 characters, 64 bytes: past the short decoders
        ("😀" * 15 + "aaaaa", False),  # 20 characters, 65 bytes
        ("😀" * 17, False),  # 17 characters, 68 bytes
        ("a" * 64, True),
        ("a" * 65, False),
    ],
)
def test_every_fast_path_limits_strings_in_bytes_whether_or_not_they_are_short(
    text: str, valid: bool
) -> None:
    # A read of single incs (decoded before framing), singles after a call (framed, then one
    # decode for the run), a lone single, and incs: the strings a quarter of the limit long in
    # characters are taken by the short decoders, the others are measured in bytes.
    good = [1, 2, "sign", None, True]
    odd = [1, 2, "sign", text, True]
    singles = [["inc", *good]] * 20 + [["inc", *odd]] + [["inc", *good]] * 20
    streams = [
        b"".join(pack(m) for m in singles),
        pack(["ping", 1]) + b"".join(pack(m) for m in singles),
        pack(["inc", *odd]),
        pack(["incs", [good] * 20 + [odd] + [good] * 20]),
    ]
    for stream in streams:
        messages = decode(stream)
        items = [as_increment(item) for m in messages if type(m) is Batch for item in m.items]
        refused = [m for m in messages if type(m) is Rejected] + [
            m for m in messages if type(m) is Batch and m.rejected
        ]
        if valid:
            assert Increment(*odd) in items
            assert not refused
        else:
            assert Increment(*odd) not in items
            assert len(refused) == 1
            assert "64 bytes" in (
                str(refused[0].error) if type(refused[0]) is Rejected else refused[0].rejected[0][1]
            )


# What an ``ok`` reply may hold: what the actor answers (maps keyed by strings or ids, counts,
# floats, None, lists), nested.
REPLY_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=10) | st.integers(1, MAX_ID), inner, max_size=5)
    ),
    max_leaves=30,
)


@examples(300)
@given(result=REPLY_VALUES, req_id=st.integers(0, 2**32))
def test_an_ok_reply_is_the_bytes_msgpack_writes_and_the_client_reads_it_back(
    result: Any, req_id: int
) -> None:
    wire = ServerCodec().ok(req_id, result)
    assert wire == msgpack.packb(["ok", req_id, result])
    assert ClientCodec().receive_data(wire) == [Ok(req_id, result)]


def test_an_ok_reply_msgspec_cannot_encode_goes_through_msgpack_and_a_huge_count_still_raises() -> (
    None
):
    class Name(str):
        pass

    result = {"action": {Name("sign"): 3}}
    assert ServerCodec().ok(1, result) == msgpack.packb(["ok", 1, {"action": {"sign": 3}}])
    with pytest.raises(OverflowError):
        ServerCodec().ok(1, {"supporters": 2**64})


def test_a_call_read_whole_and_the_same_call_read_byte_by_byte_decode_alike() -> None:
    # One whole call in a read is decoded without framing; cut anywhere, it is framed.
    calls = [
        ["stats", 5, 7],
        ["ping", 6],
        ["stats_many", 7, [1, 2, 3]],
        ["inc", 1, 2, "sign", None, True],
        ["inc", {"campaign_id": 1, "org_id": 2, "action_type": "sign"}],
        ["incs", [[1, 2, "sign", None, True]]],
        ["stats", 8, 0],
        ["stats", "x", 1],
        ["nope", 9],
    ]
    for call in calls:
        wire = pack(call)
        assert_same(
            [comparable(m) for m in decode(wire)],
            [comparable(m) for m in decode_bytewise(wire)],
        )
