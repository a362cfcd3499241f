"""The client session in memory: no sockets, no threads, no event loop.

The server's side is played with plain MessagePack, so these tests say what the session does with
bytes exactly as docs/protocol.md describes them, whole or one byte at a time.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from campaignstats.errors import (
    Invalid,
    LocalProtocolError,
    Overloaded,
    RemoteProtocolError,
    ServerUnavailable,
    Unauthorized,
)
from campaignstats.model import Increment
from campaignstats.protocol import CallRequest, Limits, Ping
from campaignstats.requests import Flush, Info, Resync, Stats, StatsMany, Subscribe, Unsubscribe
from campaignstats.sessions.client import (
    CLIENT_NAME,
    V1_OPS,
    ClientSession,
    Event,
    Failed,
    Ready,
    Reply,
    ServerError,
    SessionState,
    Update,
    wire_item,
)

STATS = {"supporters": 1, "action": {"a": 1}, "area": {}, "org": {7: 1}, "extra_supporters": 0}
OPS = [*sorted(V1_OPS), "dec", "decs"]


def pack(*messages: Any) -> bytes:
    return b"".join(msgpack.packb(m) for m in messages)


def unpack(data: bytes) -> list[Any]:
    return list(msgpack.Unpacker(__import__("io").BytesIO(data), strict_map_key=False))


def hello_reply(req_id: int = 1, **extra: Any) -> bytes:
    return pack(["ok", req_id, {"protocol": 1, "server": "campaignstats 9.9.9", **extra}])


def feed(session: ClientSession, data: bytes, *, bytewise: bool = False) -> list[Event]:
    events: list[Event] = []
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    for chunk in chunks:
        session.receive_data(chunk)
        while (event := session.next_event()) is not None:
            events.append(event)
    return events


def ready(**extra: Any) -> ClientSession:
    session = ClientSession(token="s3cret")
    session.connect()
    [event] = feed(session, hello_reply(**extra))
    assert isinstance(event, Ready)
    return session


# -- hello ----------------------------------------------------------------------------------------


def test_connect_sends_hello_with_protocol_token_and_client_name() -> None:
    session = ClientSession(token="s3cret")
    assert unpack(session.connect()) == [
        ["hello", 1, {"protocol": 1, "token": "s3cret", "client": CLIENT_NAME}]
    ]
    assert session.state is SessionState.GREETING


def test_the_hello_reply_gives_the_servers_ops_and_limits() -> None:
    limits = {"max_message": 4096, "max_batch": 3, "max_string": 16}
    session = ready(ops=OPS, limits=limits)
    assert session.state is SessionState.READY
    assert session.limits == Limits(4096, 3, 16)
    assert session.accepts_decrements
    assert session.accepts_maps
    assert session.server == "campaignstats 9.9.9"


def test_an_older_server_that_lists_no_ops_or_limits_gets_the_protocol_defaults() -> None:
    session = ready()
    assert session.limits == Limits()
    assert session.ops == V1_OPS
    assert not session.accepts_decrements
    assert not session.accepts_maps


def test_unusable_limits_fall_back_one_by_one_to_the_defaults() -> None:
    session = ready(limits={"max_batch": 0, "max_string": "64", "max_message": 100})
    assert session.limits == Limits(max_message=100)


def test_a_refused_hello_fails_with_the_class_of_its_code_and_breaks_the_session() -> None:
    session = ClientSession(token="wrong")
    session.connect()
    [event] = feed(session, pack(["err", 1, "unauthorized", "bad token"]))
    assert isinstance(event, Failed)
    assert isinstance(event.error, Unauthorized)
    assert session.state is SessionState.BROKEN
    with pytest.raises(LocalProtocolError):
        session.send(Ping())


def test_a_server_refusing_the_connection_before_reading_hello_fails_the_hello() -> None:
    session = ClientSession()
    session.connect()
    [event] = feed(session, pack(["err", None, "overloaded", "too many connections"]))
    assert isinstance(event, Failed)
    assert isinstance(event.error, Overloaded)


@pytest.mark.parametrize(
    "reply",
    [["ok", 1, "hi"], ["ok", 1, {"protocol": 2}], ["ok", 2, {"protocol": 1}], ["pub", 1, STATS]],
    ids=["not a map", "another protocol", "wrong req_id", "pub before hello"],
)
def test_a_hello_answered_outside_the_protocol_is_a_remote_protocol_error(reply: Any) -> None:
    session = ClientSession()
    session.connect()
    session.receive_data(pack(reply))
    with pytest.raises(RemoteProtocolError):
        session.next_event()
    assert session.state is SessionState.BROKEN


def test_calls_before_the_hello_is_answered_are_a_local_protocol_error() -> None:
    session = ClientSession()
    with pytest.raises(LocalProtocolError):
        session.send(Ping())
    session.connect()
    with pytest.raises(LocalProtocolError):
        session.send(Ping())
    with pytest.raises(LocalProtocolError):
        session.connect()


# -- calls and replies ----------------------------------------------------------------------------


def test_each_call_gets_its_own_req_id_and_its_reply_in_its_python_shape() -> None:
    session = ready()
    requests: list[CallRequest] = [
        Ping(),
        Stats(5),
        StatsMany([5, 6]),
        Flush(),
        Info(),
        Resync("live"),
    ]
    sent = [session.send(r) for r in requests]
    wire = unpack(b"".join(data for _, data in sent))
    assert wire == [
        ["ping", 2],
        ["stats", 3, 5],
        ["stats_many", 4, [5, 6]],
        ["flush", 5],
        ["info", 6],
        ["resync", 7, "live"],
    ]
    replies = pack(
        ["ok", 2, "pong"],
        ["ok", 3, STATS],
        ["ok", 4, {5: STATS, 6: STATS}],
        ["ok", 5, None],
        ["ok", 6, {"server": "x"}],
        ["ok", 7, {"started": False}],
    )
    events = feed(session, replies)
    assert events == [
        Reply(2, requests[0], "pong"),
        Reply(3, requests[1], STATS),
        Reply(4, requests[2], {5: STATS, 6: STATS}),
        Reply(5, requests[3], None),
        Reply(6, requests[4], {"server": "x"}),
        Reply(7, requests[5], False),
    ]
    assert session.pending == 0


def test_an_err_reply_fails_its_call_with_the_class_of_its_code() -> None:
    session = ready()
    req_id, _ = session.send(Stats(0))
    [event] = feed(session, pack(["err", req_id, "invalid", "campaign_id must be >= 1"]))
    assert isinstance(event, Failed)
    assert event.req_id == req_id
    assert type(event.error) is Invalid
    assert str(event.error) == "campaign_id must be >= 1"


def test_a_reply_out_of_call_order_is_a_remote_protocol_error() -> None:
    session = ready()
    _first, _ = session.send(Ping())
    second, _ = session.send(Ping())
    session.receive_data(pack(["ok", second, "pong"]))
    with pytest.raises(RemoteProtocolError):
        session.next_event()


def test_an_abandoned_call_keeps_its_place_and_its_reply_is_swallowed() -> None:
    session = ready()
    late, _ = session.send(Stats(1))
    session.abandon(late)
    now, _ = session.send(Ping())
    events = feed(session, pack(["ok", late, STATS], ["ok", now, "pong"]))
    assert events == [Reply(now, Ping(), "pong")]


def test_an_err_about_a_cast_is_a_server_error_event() -> None:
    session = ready()
    [event] = feed(session, pack(["err", None, "invalid", "incs: items 3 rejected"]))
    assert isinstance(event, ServerError)
    assert isinstance(event.error, Invalid)


def test_a_malformed_result_fails_the_call_but_not_the_connection() -> None:
    session = ready()
    bad, _ = session.send(Resync("all"))
    good, _ = session.send(Ping())
    events = feed(session, pack(["ok", bad, "yes"], ["ok", good, "pong"]))
    assert isinstance(events[0], Failed)
    assert isinstance(events[0].error, RemoteProtocolError)
    assert events[1] == Reply(good, Ping(), "pong")


def test_garbage_after_good_replies_gives_those_replies_first_then_raises() -> None:
    session = ready()
    req_id, _ = session.send(Ping())
    session.receive_data(pack(["ok", req_id, "pong"]) + b"\xc1")
    assert session.next_event() == Reply(req_id, Ping(), "pong")
    with pytest.raises(RemoteProtocolError):
        session.next_event()


def test_connection_lost_fails_every_waiting_call_and_the_session_can_connect_again() -> None:
    session = ready()
    waiting, _ = session.send(Info())
    gone, _ = session.send(Ping())
    session.abandon(gone)
    [failed] = session.connection_lost()
    assert failed.req_id == waiting
    assert isinstance(failed.error, ServerUnavailable)
    assert session.state is SessionState.IDLE
    assert unpack(session.connect())[0][0] == "hello"


# -- subscriptions --------------------------------------------------------------------------------


def test_pubs_of_subscribed_campaigns_are_updates_and_others_are_dropped() -> None:
    session = ready()
    req_id, data = session.send(Subscribe(7))
    assert unpack(data) == [["sub", req_id, 7]]
    events = feed(session, pack(["ok", req_id, None], ["pub", 7, STATS], ["pub", 8, STATS]))
    assert events == [Reply(req_id, Subscribe(7), None), Update(7, STATS)]
    unsub, _ = session.send(Unsubscribe(7))
    assert feed(session, pack(["pub", 7, STATS], ["ok", unsub, None])) == [
        Reply(unsub, Unsubscribe(7), None)
    ]


def test_a_refused_subscription_is_not_kept_for_the_next_connection() -> None:
    session = ready()
    req_id, _ = session.send(Subscribe(7))
    feed(session, pack(["err", req_id, "invalid", "no"]))
    assert session.subscriptions == set()


def test_a_new_connection_resubscribes_and_pushes_the_current_stats() -> None:
    session = ready(limits={"max_batch": 2})
    for cid in (5, 6, 7):
        req_id, _ = session.send(Subscribe(cid))
        feed(session, pack(["ok", req_id, None]))
    session.connection_lost()
    wire = unpack(session.connect())
    assert wire == [
        ["hello", 5, {"protocol": 1, "token": "s3cret", "client": CLIENT_NAME}],
        ["sub", 6, 5],
        ["sub", 7, 6],
        ["sub", 8, 7],
        ["stats_many", 9, [5, 6]],
        ["stats_many", 10, [7]],
    ]
    replies = pack(
        ["ok", 5, {"protocol": 1, "server": "s", "limits": {"max_batch": 2}}],
        ["ok", 6, None],
        ["ok", 7, None],
        ["err", 8, "internal", "no room"],
        ["ok", 9, {5: STATS, 6: STATS}],
        ["ok", 10, {7: STATS}],
    )
    events = feed(session, replies, bytewise=True)
    assert isinstance(events[0], Ready)
    assert isinstance(events[1], ServerError)  # the refused re-subscription is reported...
    assert events[2:] == [Update(5, STATS), Update(6, STATS)]  # ...and no longer pushed
    assert session.subscriptions == {5, 6}


# -- increments -----------------------------------------------------------------------------------


def test_an_increment_with_only_v1_fields_goes_as_the_v1_array() -> None:
    assert wire_item(Increment(1, 2, "register", "DE", True, 3, 99)) == (
        1,
        2,
        "register",
        "DE",
        True,
        3,
        99,
    )


def test_an_increment_with_the_new_fields_goes_as_a_map_of_the_non_default_ones() -> None:
    inc = Increment(1, 2, "mail", None, False, 1, None, txid=77, at=1.5, page=4, messages=10)
    assert wire_item(inc) == {
        "campaign": 1,
        "org": 2,
        "type": "mail",
        "txid": 77,
        "at": 1.5,
        "page": 4,
        "messages": 10,
    }


def test_batches_are_cut_at_the_servers_max_batch_and_decrements_go_as_decs() -> None:
    session = ready(ops=OPS, limits={"max_batch": 2})
    items = [wire_item(Increment(1, 1, "a", txid=i + 1)) for i in range(5)]
    wire = unpack(session.send_changes(items))
    assert [(op, len(batch)) for op, batch in wire] == [("incs", 2), ("incs", 2), ("incs", 1)]
    assert wire[2][1] == [{"campaign": 1, "org": 1, "type": "a", "txid": 5}]
    wire = unpack(session.send_queued([(True, items[:1]), (False, items[1:2])]))
    assert [op for op, _ in wire] == ["decs", "incs"]


def test_a_batch_over_the_servers_max_message_is_halved_until_each_part_fits() -> None:
    session = ready(limits={"max_message": 300})
    items = [(1, 1, "x" * 40, "y" * 40, True, 1, None) for _ in range(10)]
    data = session.send_changes(items)
    wire = unpack(data)
    assert sum(len(batch) for _, batch in wire) == 10
    assert all(len(msgpack.packb(message)) <= 300 for message in wire)


def test_an_older_server_gets_map_items_as_arrays_and_no_decrements() -> None:
    session = ready()
    item = wire_item(Increment(1, 2, "a", "DE", True, 2, 9, txid=5))
    assert unpack(session.send_changes([item])) == [["incs", [[1, 2, "a", "DE", True, 2, 9]]]]
    with pytest.raises(LocalProtocolError):
        session.send_changes([item], decrement=True)


# -- any chunking ---------------------------------------------------------------------------------


@given(cuts=st.lists(st.integers(0, 400), max_size=20))
def test_the_same_bytes_give_the_same_events_in_any_chunking(cuts: list[int]) -> None:
    def run(chunks: list[bytes]) -> list[Any]:
        session = ClientSession()
        session.connect()
        events: list[Event] = []
        for chunk in chunks:
            session.receive_data(chunk)
            while (event := session.next_event()) is not None:
                events.append(event)
                if isinstance(event, Ready):
                    for request in (Subscribe(7), Stats(7), Ping()):
                        session.send(request)
        # exceptions compare by identity: compare their class and text
        return [
            (type(e.error), str(e.error)) if isinstance(e, ServerError | Failed) else e
            for e in events
        ]

    wire = hello_reply() + pack(
        ["ok", 2, None], ["pub", 7, STATS], ["ok", 3, STATS], ["err", None, "invalid", "x"]
    )
    wire += pack(["ok", 4, "pong"])
    whole = run([wire])
    assert len(whole) == 6
    assert run([wire[i : i + 1] for i in range(len(wire))]) == whole
    points = sorted({min(c, len(wire)) for c in cuts})
    assert (
        run([wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]) == whole
    )
