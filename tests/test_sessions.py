"""The server session in memory, alone and against the client session: no sockets, no event loop.

A tiny in-memory "actor" answers the server session's calls, so that both sessions can be driven
against each other byte for byte (hello, reply order, pipelining, errors, subscriptions), in the
manner of h11's tests.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from campaignstats.errors import BadMessage, Invalid, Unauthorized
from campaignstats.model import Increment, StatsState
from campaignstats.protocol import DEFAULT_MAX_BATCH, Limits
from campaignstats.requests import (
    Decrements,
    Flush,
    Increments,
    Info,
    Resync,
    Stats,
    StatsMany,
    Subscribe,
    Unsubscribe,
)
from campaignstats.sessions.client import (
    ClientSession,
    Failed,
    Ready,
    Reply,
    ServerError,
    Update,
    wire_item,
)
from campaignstats.sessions.server import (
    CallReceived,
    CastReceived,
    Closing,
    Event,
    Greeted,
    MessageRejected,
    ServerSession,
    SessionState,
)

pytestmark = pytest.mark.timeout(30)


def pack(*values: Any) -> bytes:
    return b"".join(msgpack.packb(v) for v in values)


def replies(data: bytes) -> list[Any]:
    unpacker = msgpack.Unpacker(strict_map_key=False, raw=False)
    unpacker.feed(data)
    return list(unpacker)


def of(events: list[Event], kind: type) -> list[Any]:
    return [e for e in events if type(e) is kind]


# -- the server session alone ---------------------------------------------------------------------


def test_the_hello_reply_lists_the_ops_and_the_limits() -> None:
    session = ServerSession(Limits(max_message=4096, max_batch=100, max_string=32))
    events = session.receive_data(pack(["hello", 1, {"protocol": 1, "client": "t"}]))
    assert events == [Greeted("t")]
    [reply] = replies(session.data_to_send())
    assert reply[:2] == ["ok", 1]
    assert reply[2]["protocol"] == 1
    assert reply[2]["server"].startswith("campaignstats ")
    assert reply[2]["limits"] == {"max_message": 4096, "max_batch": 100, "max_string": 32}
    assert set(reply[2]["ops"]) == {
        "hello", "ping", "stats", "stats_many", "flush", "info", "resync", "sub", "unsub",
        "inc", "incs", "dec", "decs", "metric", "metrics", "reset_metrics",
        "history", "recent", "top",
        "page_stats", "org_stats",
    }  # fmt: skip


def test_with_a_token_anything_before_a_good_hello_is_unauthorized_and_closes() -> None:
    for first in (["ping", 5], ["inc", 1, 1, "a", None, True], ["hello", 5, {"protocol": 1}]):
        session = ServerSession(token="s3cret")
        events = session.receive_data(pack(first, ["ping", 6]))
        assert [type(e) for e in events] == [Closing]
        assert type(events[0].error) is Unauthorized  # type: ignore[union-attr]
        [reply] = replies(session.data_to_send())
        assert reply[:3] == ["err", 5 if first[0] != "inc" else None, "unauthorized"]
        assert session.state is SessionState.CLOSING
        assert session.receive_data(pack(["ping", 7])) == []  # nothing more is read
        assert session.data_to_send() == b""
    good = ServerSession(token="s3cret")
    events = good.receive_data(pack(["hello", 1, {"protocol": 1, "token": "s3cret"}], ["ping", 2]))
    assert events == [Greeted(None)]
    assert [r[:2] for r in replies(good.data_to_send())] == [["ok", 1], ["ok", 2]]
    assert good.state is SessionState.OPEN


def test_replies_leave_in_call_order_whatever_order_the_answers_come_in() -> None:
    session = ServerSession()
    events = session.receive_data(
        pack(["stats", 1, 10], ["ping", 2], ["stats_many", 3, [10, 11]], ["flush", 4])
    )
    calls = of(events, CallReceived)
    assert [c.request for c in calls] == [Stats(10), StatsMany([10, 11]), Flush()]
    assert session.data_to_send() == b""  # the ping waits behind the stats
    session.answer(calls[2].slot, None)
    session.answer(calls[1].slot, {10: {}, 11: {}})
    assert session.data_to_send() == b""
    session.answer(calls[0].slot, {"supporters": 1})
    assert replies(session.data_to_send()) == [
        ["ok", 1, {"supporters": 1}],
        ["ok", 2, "pong"],
        ["ok", 3, {10: {}, 11: {}}],
        ["ok", 4, None],
    ]
    assert session.pending_calls == 0


def test_a_failed_call_is_answered_with_its_code_and_one_without_a_code_is_internal() -> None:
    session = ServerSession()
    calls = of(session.receive_data(pack(["resync", 1, "all"], ["info", 2])), CallReceived)
    assert [c.request for c in calls] == [Resync("all"), Info()]
    session.fail(calls[0].slot, Invalid("no"))
    session.fail(calls[1].slot, RuntimeError("boom"))
    assert replies(session.data_to_send()) == [
        ["err", 1, "invalid", "no"],
        ["err", 2, "internal", "boom"],
    ]


def test_a_wrong_call_is_answered_in_its_place_and_the_stream_goes_on() -> None:
    session = ServerSession()
    events = session.receive_data(pack(["stats", 1, 5], ["stats", 2, 0], ["nope", 3]))
    [call] = of(events, CallReceived)
    assert [e.code for e in of(events, MessageRejected)] == ["invalid", "bad_message"]
    assert session.data_to_send() == b""  # both errors wait behind call 1
    session.answer(call.slot, {})
    assert [r[:3] for r in replies(session.data_to_send())] == [
        ["ok", 1, {}],
        ["err", 2, "invalid"],
        ["err", 3, "bad_message"],
    ]


def test_the_casts_of_one_read_travel_as_one_batch_cut_only_where_a_call_or_the_kind_changes() -> (
    None
):
    session = ServerSession()
    a, b, c = [1, 1, "a", None, True], [2, 1, "b", None, False], [3, 1, "c", "DE", True]
    events = session.receive_data(
        pack(
            ["inc", *a],
            ["incs", [b, c]],
            ["inc", {"campaign": 4, "org": 1, "type": "d", "txid": 9}],
            ["flush", 1],
            ["incs", [a]],
            ["decs", [b]],
            ["dec", *c],
        )
    )
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["CastReceived", "CallReceived", "CastReceived", "CastReceived"]
    first, _, second, third = events
    assert type(first.cast) is Increments  # type: ignore[union-attr]
    assert [i.campaign_id for i in first.cast.items] == [1, 2, 3, 4]  # type: ignore[union-attr]
    assert first.cast.items[3].txid == 9  # type: ignore[union-attr]
    assert type(second.cast) is Increments  # type: ignore[union-attr]
    assert type(third.cast) is Decrements  # type: ignore[union-attr]
    assert [i.campaign_id for i in third.cast.items] == [2, 3]  # type: ignore[union-attr]


def test_items_refused_by_the_actor_are_named_in_each_messages_own_numbering() -> None:
    session = ServerSession()
    good = [1, 1, "a", None, True]
    bad = [0, 1, "a", None, True]
    events = session.receive_data(
        pack(
            ["incs", [good, bad, good, good]],  # the codec refuses item 1
            ["inc", *good],
            ["incs", [good, good]],
        )
    )
    [rejected] = of(events, MessageRejected)
    assert rejected.code == "invalid"
    [cast] = of(events, CastReceived)
    assert cast.origin.held  # the codec's error waits for the actor's verdict on the rest
    assert session.data_to_send() == b""
    assert len(cast.cast.items) == 3 + 1 + 2
    # The actor refuses batch items 1 (message 0, item 2), 3 (the inc) and 5 (message 2, item 1).
    session.cast_rejected(cast.origin, [(1, "over"), (3, "full"), (5, "later")])
    errors = replies(session.data_to_send())
    assert [e[:3] for e in errors] == [["err", None, "invalid"]] * 3
    assert errors[0][3].startswith("incs items rejected (2): [1] ")  # one error per message
    assert errors[0][3].endswith("; [2] over")
    assert errors[1][3] == "full"  # an inc names no index
    assert errors[2][3] == "incs items rejected (1): [1] later"


def test_items_refused_by_the_codec_are_answered_once_the_actor_refused_none() -> None:
    session = ServerSession()
    events = session.receive_data(pack(["incs", [[1, 1, "a", None, True], [1, 1, "", None, 1]]]))
    [cast] = of(events, CastReceived)
    assert session.data_to_send() == b""
    session.cast_rejected(cast.origin, [])
    [error] = replies(session.data_to_send())
    assert error[:3] == ["err", None, "invalid"]
    assert error[3].startswith("incs items rejected (1): [1] ")


def test_a_message_whose_items_were_all_refused_by_the_codec_is_answered_at_once() -> None:
    session = ServerSession()
    events = session.receive_data(pack(["incs", [[0, 1, "a", None, True]]]))
    assert of(events, CastReceived) == []
    [error] = replies(session.data_to_send())
    assert error[3].startswith("incs items rejected (1): [0] ")


def test_decrements_refused_by_the_actor_are_reported_as_decs() -> None:
    session = ServerSession()
    [cast] = session.receive_data(pack(["decs", [[1, 1, "a", None, True]] * 2]))
    assert type(cast) is CastReceived
    session.cast_rejected(cast.origin, [(1, "no")])
    [error] = replies(session.data_to_send())
    assert error[3] == "decs items rejected (1): [1] no"


def test_bytes_that_are_not_messagepack_are_answered_bad_frame_after_the_messages_before() -> None:
    session = ServerSession()
    events = session.receive_data(pack(["ping", 1]) + b"\xc1garbage")
    assert [type(e) for e in events] == [MessageRejected, Closing]
    assert [r[:3] for r in replies(session.data_to_send())] == [
        ["ok", 1, "pong"],
        ["err", None, "bad_frame"],
    ]
    assert session.counters.bad_frames == 1
    assert session.receive_data(pack(["ping", 2])) == []


def test_cast_errors_and_pubs_are_dropped_while_the_peer_reads_nothing_but_replies_are_not() -> (
    None
):
    unread = [0]
    session = ServerSession(max_output=100, unsent=lambda: unread[0])
    unread[0] = 101
    events = session.receive_data(pack(["inc", 0, 1, "a", None, True], ["stats", 1, 5]))
    session.pub(5, {"supporters": 1})
    [call] = of(events, CallReceived)
    session.answer(call.slot, {"supporters": 1})
    assert replies(session.data_to_send()) == [["ok", 1, {"supporters": 1}]]
    assert (session.counters.dropped_errors, session.counters.dropped_pubs) == (1, 1)
    unread[0] = 0
    session.pub(5, {"supporters": 2})
    assert replies(session.data_to_send()) == [["pub", 5, {"supporters": 2}]]


def test_sub_and_unsub_carry_the_sessions_subscriber_to_the_actor() -> None:
    me = object()
    session = ServerSession(subscriber=me)
    events = session.receive_data(pack(["sub", 1, 7], ["unsub", 2, 7]))
    assert [e.request for e in of(events, CallReceived)] == [
        Subscribe(7, me),
        Unsubscribe(7, me),
    ]
    assert session.subscribed


def test_a_reply_that_cannot_be_encoded_is_answered_internal_in_its_place() -> None:
    session = ServerSession()
    [call] = of(session.receive_data(pack(["stats", 1, 5])), CallReceived)
    session.answer(call.slot, {"supporters": 2**64})
    [reply] = replies(session.data_to_send())
    assert reply[:3] == ["err", 1, "internal"]


def test_after_the_connection_is_lost_nothing_more_is_sent() -> None:
    session = ServerSession()
    [call] = of(session.receive_data(pack(["stats", 1, 5])), CallReceived)
    session.connection_lost()
    session.answer(call.slot, {})
    session.pub(5, {})
    assert session.data_to_send() == b""


# -- the two sessions against each other ----------------------------------------------------------


class Actor:
    """Answers a server session's events from a StatsState, at once or when told."""

    def __init__(self) -> None:
        self.state = StatsState()
        self.subscribers: dict[int, list[Any]] = {}
        self.held: list[CallReceived] = []

    def handle(self, session: ServerSession, events: list[Event], hold: bool = False) -> None:
        for event in events:
            if type(event) is CastReceived:
                rejected = self.state.apply_many(
                    event.cast.items, decrement=type(event.cast) is Decrements
                )
                if rejected or event.origin.held:
                    session.cast_rejected(event.origin, rejected)
            elif type(event) is CallReceived:
                if hold:
                    self.held.append(event)
                else:
                    self.answer(session, event)

    def answer(self, session: ServerSession, event: CallReceived) -> None:
        request = event.request
        if type(request) is Stats:
            session.answer(event.slot, self.state.stats(request.campaign_id))
        elif type(request) is StatsMany:
            session.answer(event.slot, {cid: self.state.stats(cid) for cid in request.campaign_ids})
        elif type(request) is Subscribe:
            self.subscribers.setdefault(request.campaign_id, []).append(request.subscriber)
            session.answer(event.slot, None)
        elif type(request) is Resync:
            session.fail(event.slot, Invalid("not today"))
        else:
            session.answer(event.slot, None)


class Pair:
    """A client session and a server session joined by in-memory byte pipes."""

    def __init__(self, token: str | None = None, client_token: str | None = None) -> None:
        self.client = ClientSession(token=client_token)
        self.server = ServerSession(token=token, subscriber=self)
        self.actor = Actor()
        self.to_server = self.client.connect()

    def push(self, campaign_id: int, stats: Any) -> None:
        self.server.pub(campaign_id, stats)

    def run(self, hold: bool = False, bytewise: bool = False) -> list[Any]:
        """Deliver what each side sent until both are quiet; the client's events."""
        events: list[Any] = []
        while True:
            data, self.to_server = self.to_server, b""
            chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
            for chunk in chunks:
                self.actor.handle(self.server, self.server.receive_data(chunk), hold)
            back = self.server.data_to_send()
            if not back and not data:
                return events
            if back:
                self.client.receive_data(back)
                while (event := self.client.next_event()) is not None:
                    events.append(event)

    def call(self, request: Any) -> int:
        req_id, data = self.client.send(request)
        self.to_server += data
        return req_id


@pytest.mark.parametrize("bytewise", [False, True])
def test_a_client_session_greets_a_server_session_and_learns_its_ops_and_limits(
    bytewise: bool,
) -> None:
    pair = Pair()
    [ready] = pair.run(bytewise=bytewise)
    assert type(ready) is Ready
    assert {"dec", "decs", "incs"} <= ready.ops
    assert ready.limits.max_batch == DEFAULT_MAX_BATCH


def test_a_wrong_token_fails_the_hello_and_the_server_closes() -> None:
    pair = Pair(token="s3cret", client_token="guess")
    [failed] = pair.run()
    assert type(failed) is Failed
    assert type(failed.error) is Unauthorized
    assert pair.server.state is SessionState.CLOSING


@pytest.mark.parametrize("bytewise", [False, True])
def test_pipelined_calls_answered_out_of_order_come_back_in_order(bytewise: bool) -> None:
    pair = Pair()
    pair.run()
    pair.to_server += pair.client.send_changes(
        [wire_item(Increment(1, 7, "register", "DE", True)), wire_item(Increment(2, 7, "share"))]
    )
    ids = [pair.call(Stats(1)), pair.call(StatsMany([1, 2])), pair.call(Stats(2))]
    assert pair.run(hold=True, bytewise=bytewise) == []
    for event in reversed(pair.actor.held):  # the actor answers the last call first
        pair.actor.answer(pair.server, event)
    events = pair.run()
    assert [e.req_id for e in events] == ids
    assert events[0].result["supporters"] == 1
    assert events[1].result[2]["action"] == {"share": 1}


def test_a_call_error_and_a_cast_error_reach_the_client_as_typed_errors() -> None:
    pair = Pair()
    pair.run()
    rid = pair.call(Resync("all"))
    pair.to_server += pack(["incs", [[1, 1, "a", None, True], [1, 1, "", None, True]]])
    events = pair.run()
    errors = [e for e in events if type(e) is ServerError]
    [failed] = [e for e in events if type(e) is Failed]
    assert failed.req_id == rid
    assert type(failed.error) is Invalid
    assert [type(e.error) for e in errors] == [Invalid]
    assert "[1]" in str(errors[0].error)
    assert pair.actor.state.stats(1)["action"] == {"a": 1}  # the good item was applied


def test_an_unknown_op_is_a_typed_error_and_the_connection_goes_on() -> None:
    pair = Pair()
    pair.run()
    pair.to_server += pack(["nope"])
    [error] = pair.run()
    assert type(error) is ServerError
    assert type(error.error) is BadMessage
    rid = pair.call(Stats(3))
    [reply] = pair.run()
    assert type(reply) is Reply
    assert reply.req_id == rid


def test_a_subscription_delivers_pubs_as_updates() -> None:
    pair = Pair()
    pair.run()
    rid = pair.call(Subscribe(9))
    [reply] = pair.run()
    assert type(reply) is Reply
    assert reply.req_id == rid
    assert pair.actor.subscribers[9] == [pair]
    pair.actor.state.apply_many([Increment(9, 1, "a", "PL", True)])
    pair.push(9, pair.actor.state.stats(9))
    [update] = pair.run()
    assert type(update) is Update
    assert update.campaign_id == 9
    assert update.stats["area"] == {"PL": 1}


def test_decrements_and_map_items_from_the_client_session_are_applied_by_the_server() -> None:
    pair = Pair()
    pair.run()
    inc = Increment(5, 2, "register", "FR", True, 3, None, 77, 1_700_000_000.0, 4, 2)
    pair.to_server += pair.client.send_changes([wire_item(inc), wire_item(inc)])
    pair.to_server += pair.client.send_changes([wire_item(inc)], decrement=True)
    pair.call(Stats(5))
    [reply] = pair.run()
    assert reply.result["action"] == {"register": 3}
    assert reply.result["supporters"] == 1
