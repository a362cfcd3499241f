"""The socket server from the outside: raw MessagePack over real TCP and Unix sockets.

Nothing here uses our clients: each test writes the bytes a client in any language would write
(docs/protocol.md) and reads what comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import msgpack
import pytest

from campaignstats.actor.actor import ActorConfig
from campaignstats.actor.messages import Ask, Message
from campaignstats.protocol import Limits
from campaignstats.requests import Stats
from campaignstats.service import StatsService

from .helpers import Raw, Running, Start, wait_for

pytestmark = pytest.mark.timeout(60)


async def connect(running: Running, transport: str) -> Raw:
    return await (Raw.tcp(running.port) if transport == "tcp" else Raw.unix(running.unix))


STATS_KEYS = {"supporters", "action", "area", "org", "extra_supporters", "messages"}


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_every_op_of_the_protocol_works_over_tcp_and_unix_sockets(
    server: Running, transport: str
) -> None:
    c = await connect(server, transport)
    try:
        reply = await c.call("hello", 1, {"protocol": 1, "client": "raw-test"})
        assert reply[:2] == ["ok", 1]
        assert reply[2]["protocol"] == 1
        assert reply[2]["server"].startswith("campaignstats ")
        assert await c.call("ping", 2) == ["ok", 2, "pong"]
        await c.send(
            ["inc", 900, 7, "register", "DE", True],
            ["inc", 900, 7, "mail2target", None, False, 10],
            ["inc", 900, 8, "register", "FR", True, 1, None],
            ["incs", [[900, 8, "share", None, False], [901, 7, "register", None, True, 2, None]]],
        )
        assert await c.call("flush", 3) == ["ok", 3, None]
        ok, rid, stats = await c.call("stats", 4, 900)
        assert (ok, rid) == ("ok", 4)
        assert stats == {
            "supporters": 2,
            "action": {"register": 2, "mail2target": 10, "share": 1},
            "area": {"DE": 1, "FR": 1},
            "org": {7: 1, 8: 1},
            "extra_supporters": 0,
            "messages": 0,
        }
        ok, _, many = await c.call("stats_many", 5, [900, 901, 999_999])
        assert ok == "ok"
        assert set(many) == {900, 901, 999_999}
        assert many[901]["action"] == {"register": 2}
        assert many[999_999] == {
            "supporters": 0, "action": {}, "area": {}, "org": {}, "extra_supporters": 0,
            "messages": 0,
        }  # fmt: skip
        ok, _, info = await c.call("info", 6)
        assert ok == "ok"
        for key in ("version", "uptime", "campaigns", "increments_applied", "rejected", "mailbox"):
            assert key in info
        assert info["server"]["connections"] >= 1
        assert info["calculations"]["loaded"] is True
        assert (await c.call("resync", 7, "live"))[2] in ({"started": True}, {"started": False})
        await wait_for(lambda: _idle(server.service))
        assert await c.call("resync", 8, [900, 901]) == ["ok", 8, {"started": True}]
        assert await c.call("resync", 9, "all") in (
            ["ok", 9, {"started": False}],  # the one before may still be running
            ["ok", 9, {"started": True}],
        )
        assert await c.call("sub", 10, 900) == ["ok", 10, None]
        assert await c.call("unsub", 11, 900) == ["ok", 11, None]
    finally:
        await c.close()


async def _idle(service: StatsService) -> bool:
    return (await service.info())["calculations"]["running"] is None


async def test_replies_come_in_call_order_and_flush_waits_for_earlier_increments(
    server: Running,
) -> None:
    c = await Raw.tcp(server.port)
    try:
        batch = [[910, 1, "register", None, True]] * 5_000
        await c.send(
            ["stats", 1, 910],
            ["ping", 2],
            ["incs", batch],
            ["incs", batch],
            ["flush", 3],
            ["stats", 4, 910],
            ["ping", 5],
            ["info", 6],
            ["unknown-op", 7],
            ["stats", 8, 910],
        )
        replies = await c.recv(8)  # casts get no reply
        assert [r[1] for r in replies] == [1, 2, 3, 4, 5, 6, 7, 8]
        assert replies[0][2]["supporters"] == 0  # before the increments
        assert replies[3][2]["supporters"] == 10_000  # after the flush: all applied
        assert replies[6][:3] == ["err", 7, "bad_message"]
        assert replies[7][2]["supporters"] == 10_000
    finally:
        await c.close()


async def test_every_error_code_is_sent_with_the_request_id_when_there_is_one(
    start: Start,
) -> None:
    def crash_on_666(msg: Message) -> None:
        if isinstance(msg, Ask) and msg.request == Stats(666):
            raise RuntimeError("injected")

    running = await start(ActorConfig(sync_interval=3600, fault_hook=crash_on_666))
    c = await Raw.tcp(running.port)
    try:
        assert await c.call("stats", 1, 666) == [
            "err", 1, "internal",
            "the stats actor crashed while answering: RuntimeError('injected')",
        ]  # fmt: skip
        cases = [
            ({"not": "an array"}, [None, "bad_message"]),
            ([], [None, "bad_message"]),
            (["nope", 2], [2, "bad_message"]),
            (["stats", 3], [3, "bad_message"]),
            (["stats", 4, "900"], [4, "bad_message"]),
            (["stats", 5, True], [5, "bad_message"]),
            (["stats", 6, 0], [6, "invalid"]),
            (["stats", 7, 2**63], [7, "invalid"]),
            (["inc", 1, 1, "register", None], [None, "bad_message"]),
            (["inc", 1, 1, "", None, True], [None, "invalid"]),
            (["inc", 1, 1, "x" * 65, None, True], [None, "invalid"]),
            (["inc", 1, 1, "register", None, True, 0], [None, "invalid"]),
            (["inc", 0, 1, "register", None, True], [None, "invalid"]),
            (["inc", 1, 1, "register", None, "yes"], [None, "bad_message"]),
            (["resync", 8, "everything"], [8, "invalid"]),
            (["hello", 9, {"protocol": 2}], [9, "invalid"]),
            (["stats_many", 10, list(range(1, 10_002))], [10, "invalid"]),
            (["incs", [[1, 1, "a", None, True]] * 10_001], [None, "invalid"]),
        ]
        for message, (rid, code) in cases:
            reply = await c.call(*message) if isinstance(message, list) else None
            if reply is None:
                await c.send(message)
                [reply] = await c.recv()
            assert reply[:3] == ["err", rid, code], (message, reply)
            assert isinstance(reply[3], str)
            assert reply[3]
        assert await c.call("ping", 11) == ["ok", 11, "pong"]  # the connection goes on
        await c.send_bytes(b"\xc1\xc1\xc1")
        [reply] = await c.recv()
        assert reply[:3] == ["err", None, "bad_frame"]
        assert await c.is_closed()
    finally:
        await c.close()
    assert (await running.service.stats_many([1]))[1]["action"] == {}  # nothing was applied


async def test_an_incs_batch_applies_its_valid_items_and_names_each_rejected_index(
    start: Start,
) -> None:
    running = await start(ActorConfig(sync_interval=3600, max_keys=3))
    c = await Raw.tcp(running.port)
    try:
        await c.send(
            ["incs", [
                [920, 1, "a", None, True],
                [0, 1, "a", None, True],  # codec: id out of range
                [920, 1, "b", None, True],
                [920, 1, "c", None, False],
                [920, 1, "d", None, False],  # state: a fourth action type in this campaign
                [920, 1, "a", "DE", True, 2],
            ]]
        )  # fmt: skip
        # One error for the message, whoever refused which item (the codec [1], the state [4]).
        [error] = await c.recv(1)
        assert error[:3] == ["err", None, "invalid"]
        text = error[3]
        assert text.startswith("incs items rejected (2): [1] ")
        assert ("[1]" in text, "[4]" in text) == (True, True)
        assert ("[0]" in text, "[2]" in text) == (False, False)
        assert await c.call("flush", 1) == ["ok", 1, None]
        assert c.pending == []  # and no second error
        stats = (await c.call("stats", 2, 920))[2]
        assert stats["action"] == {"a": 3, "b": 1, "c": 1}
        assert stats["supporters"] == 3
        assert stats["area"] == {"DE": 1}
    finally:
        await c.close()


async def test_a_message_over_the_size_limit_is_a_bad_frame_and_closes_the_connection(
    start: Start,
) -> None:
    running = await start(limits=Limits(max_message=64 << 10))
    c = await Raw.tcp(running.port)
    other = await Raw.tcp(running.port)
    try:
        big = ["incs", [[930, 1, "x" * 60, None, True]] * 2_000]  # valid items, 138 KB in all
        assert len(msgpack.packb(big)) > 64 << 10
        await c.send(big)
        [reply] = await c.recv()
        assert reply[:3] == ["err", None, "bad_frame"]
        assert await c.is_closed()
        assert await other.call("stats", 1, 930) == [
            "ok", 1, {"supporters": 0, "action": {}, "area": {}, "org": {}, "extra_supporters": 0,
            "messages": 0},
        ]  # fmt: skip
    finally:
        await c.close()
        await other.close()


async def test_with_a_token_the_first_message_must_be_a_hello_that_carries_it(
    start: Start,
) -> None:
    running = await start(token="s3cret")
    silent = await Raw.tcp(running.port)
    wrong = await Raw.tcp(running.port)
    right = await Raw.unix(running.unix)
    try:
        await silent.send(["inc", 940, 1, "register", None, True], ["ping", 1])
        [reply] = await silent.recv()
        assert reply[:3] == ["err", None, "unauthorized"]
        assert await silent.is_closed()
        reply = await wrong.call("hello", 1, {"protocol": 1, "token": "guess"})
        assert reply[:3] == ["err", 1, "unauthorized"]
        assert await wrong.is_closed()
        assert (await right.call("hello", 1, {"protocol": 1, "token": "s3cret"}))[0] == "ok"
        assert (await right.call("stats", 2, 940))[2]["action"] == {}  # the cast did nothing
        ok, _, info = await right.call("info", 3)
        assert ok == "ok"
        assert "s3cret" not in repr(info)
        assert info["server"]["unauthorized"] == 2
    finally:
        for c in (silent, wrong, right):
            await c.close()


async def test_connections_over_the_limit_get_overloaded_and_are_closed(start: Start) -> None:
    running = await start(max_connections=2)
    a, b = await Raw.tcp(running.port), await Raw.tcp(running.port)
    try:
        assert await a.call("ping", 1) == ["ok", 1, "pong"]
        assert await b.call("ping", 1) == ["ok", 1, "pong"]
        c = await Raw.tcp(running.port)
        [reply] = await c.recv()
        assert reply[:3] == ["err", None, "overloaded"]
        assert await c.is_closed()
        await c.close()
        await a.close()
        await asyncio.sleep(0.1)
        d = await Raw.tcp(running.port)  # a slot is free again
        assert await d.call("ping", 2) == ["ok", 2, "pong"]
        await d.close()
    finally:
        await a.close()
        await b.close()


async def test_subscribers_get_pubs_at_most_once_per_interval_until_they_unsubscribe(
    server: Running,
) -> None:
    sub = await Raw.tcp(server.port)
    writer = await Raw.tcp(server.port)
    try:
        assert await sub.call("sub", 1, 950) == ["ok", 1, None]
        loop = asyncio.get_running_loop()
        end = loop.time() + 1.0
        sent = 0
        while loop.time() < end:  # ~100 changes in 1 s; the interval is 0.3 s
            await writer.send(
                ["inc", 950, 1, "share", None, False], ["inc", 951, 1, "x", None, False]
            )
            sent += 1
            await asyncio.sleep(0.01)
        assert await writer.call("flush", 1) == ["ok", 1, None]
        await asyncio.sleep(0.5)
        pubs: list[Any] = []
        with contextlib.suppress(TimeoutError):
            while True:
                pubs.extend(await sub.recv(1, within=0.4))
        assert all(p[0] == "pub" and p[1] == 950 for p in pubs)
        assert 2 <= len(pubs) <= 6, pubs
        assert pubs[-1][2]["action"] == {"share": sent}
        assert await sub.call("unsub", 2, 950) == ["ok", 2, None]
        await writer.send(["inc", 950, 1, "share", None, False])
        with pytest.raises(TimeoutError):
            await sub.recv(1, within=0.8)
    finally:
        await sub.close()
        await writer.close()


async def test_a_client_that_floods_without_reading_does_not_slow_down_another(
    start: Start,
) -> None:
    running = await start(max_output=256 << 10, mailbox_size=16)
    flooder = await Raw.tcp(running.port)
    other = await Raw.tcp(running.port)
    try:
        calls = b"".join(
            msgpack.packb(["stats_many", i, list(range(1, 200))]) for i in range(2_000)
        )
        incs = msgpack.packb(["incs", [[960, 1, "share", None, False]] * 1_000])

        async def flood() -> None:
            for _ in range(200):  # bounded: 200 rounds of calls and increments, never reading
                flooder.writer.write(calls + incs * 5)
                with contextlib.suppress(TimeoutError, ConnectionError):
                    await asyncio.wait_for(flooder.writer.drain(), 0.05)

        flooding = asyncio.create_task(flood())
        worst = 0.0
        loop = asyncio.get_running_loop()
        for i in range(50):
            t0 = loop.time()
            assert await other.call("ping", i) == ["ok", i, "pong"]
            worst = max(worst, loop.time() - t0)
            await asyncio.sleep(0.01)
        flooding.cancel()
        # Generous bound: this is not a speed test, it proves the flood does not block others.
        assert worst < 0.5, worst
        _, _, info = await other.call("info", 99)
        assert info["server"]["closed_slow_readers"] >= 1
    finally:
        await flooder.close()
        await other.close()


async def test_the_unix_socket_is_group_only_and_removed_on_close(start: Start) -> None:
    running = await start()
    assert running.unix.exists()
    assert oct(running.unix.stat().st_mode & 0o777) == oct(0o660)
    await running.server.close()
    assert not running.unix.exists()


NODE_CHECK = r"""
import net from "node:net";
import { encode, decodeMulti } from "@msgpack/msgpack";
const port = Number(process.argv[2]);
const sock = net.connect(port, "127.0.0.1");
const replies = [];
let buffer = Buffer.alloc(0);
sock.on("data", (d) => {
  buffer = Buffer.concat([buffer, d]);
  try {
    for (const m of decodeMulti(buffer)) replies.push(m);
    buffer = Buffer.alloc(0);
  } catch (e) { /* wait for the rest */ }
  if (replies.length >= 3) {
    console.log(JSON.stringify(replies, (k, v) => (v instanceof Map ? Object.fromEntries(v) : v)));
    sock.end();
  }
});
sock.on("connect", () => {
  sock.write(encode(["hello", 1, { protocol: 1, client: "node-check" }]));
  sock.write(encode(["inc", 970, 3, "register", "PL", true]));
  sock.write(encode(["incs", [[970, 4, "share", null, false, 2],
                              [970, 3, "register", null, true, 1, 12345]]]));
  sock.write(encode(["flush", 2]));
  sock.write(encode(["stats", 3, 970]));
});
"""


@pytest.fixture(scope="session")
def node_msgpack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node is not available")
    folder = tmp_path_factory.mktemp("node")
    done = subprocess.run(
        [npm, "install", "--silent", "--no-audit", "--no-fund", "@msgpack/msgpack@3"],
        cwd=folder,
        capture_output=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"npm could not install @msgpack/msgpack: {done.stderr.decode()[-300:]}")
    (folder / "check.mjs").write_text(NODE_CHECK)
    return folder


async def test_a_nodejs_client_speaking_the_protocol_gets_the_same_counts(
    server: Running, node_msgpack: Path
) -> None:
    proc = await asyncio.create_subprocess_exec(
        "node", "check.mjs", str(server.port), cwd=node_msgpack, stdout=subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    hello, flushed, stats = json.loads(out)
    assert hello[0] == "ok"
    assert flushed == ["ok", 2, None]
    assert stats[:2] == ["ok", 3]
    assert stats[2] == {
        "supporters": 2,
        "action": {"register": 2, "share": 2},
        "area": {"PL": 1},
        "org": {"3": 2},
        "extra_supporters": 0,
        "messages": 0,
    }


async def test_an_idle_connection_is_closed_but_a_subscriber_is_not(start: Start) -> None:
    running = await start(idle_timeout=0.4)
    idle = await Raw.tcp(running.port)
    half = await Raw.tcp(running.port)
    subscriber = await Raw.tcp(running.port)
    try:
        assert await idle.call("ping", 1) == ["ok", 1, "pong"]
        assert await subscriber.call("sub", 1, 990) == ["ok", 1, None]
        await half.send_bytes(msgpack.packb(["stats", 1, 990])[:-1])  # half a message, stalled
        assert await idle.is_closed(within=5)
        assert await half.is_closed(within=5)
        assert await subscriber.call("ping", 2) == ["ok", 2, "pong"]
        ok, _, info = await subscriber.call("info", 3)
        assert ok == "ok"
        assert info["server"]["closed_idle"] == 2
    finally:
        for c in (idle, half, subscriber):
            await c.close()


async def test_a_new_campaign_over_the_campaign_cap_is_invalid_and_others_keep_counting(
    start: Start,
) -> None:
    running = await start(ActorConfig(sync_interval=3600, max_campaigns=1_000_000))
    c = await Raw.tcp(running.port)
    try:
        known = running.service.supervisor.actor
        assert known is not None
        known.state.max_campaigns = len(known.state.campaigns) + 1  # room for one more
        await c.send(["inc", 995, 1, "register", None, True])
        await c.send(["inc", 996, 1, "register", None, True])  # one too many
        [error] = await c.recv()
        assert error[:3] == ["err", None, "invalid"]
        assert "campaign" in error[3]
        await c.send(["inc", 995, 1, "register", None, True])
        assert await c.call("flush", 1) == ["ok", 1, None]
        many = (await c.call("stats_many", 2, [995, 996]))[2]
        assert many[995]["supporters"] == 2
        assert many[996]["supporters"] == 0
        info = (await c.call("info", 3))[2]
        assert info["rejected"] >= 1
    finally:
        await c.close()


async def test_a_thousand_concurrent_connections_are_all_answered_and_counts_are_exact(
    server: Running,
) -> None:
    async def one(i: int) -> None:
        c = await Raw.tcp(server.port)
        try:
            await c.send(["incs", [[998, 1 + i % 50, "share", None, i % 3 == 0]] * 10])
            assert await c.call("flush", i) == ["ok", i, None]
            ok, _, stats = await c.call("stats", i, 998)
            assert ok == "ok"
            assert stats["action"]["share"] >= 10
        finally:
            await c.close()

    async with asyncio.timeout(60):
        for start_at in range(0, 1_000, 250):  # 250 at a time: the sandbox's open-files limit
            await asyncio.gather(*(one(i) for i in range(start_at, start_at + 250)))
    stats = await server.service.stats(998)
    assert stats["action"] == {"share": 10_000}
    assert stats["supporters"] == 10 * len(range(0, 1_000, 3))


async def test_a_client_that_disconnects_mid_message_changes_nothing_and_harms_no_one(
    server: Running,
) -> None:
    other = await Raw.tcp(server.port)
    try:
        for _ in range(20):
            quitter = await Raw.tcp(server.port)
            whole = msgpack.packb(["incs", [[985, 1, "register", None, True]] * 50])
            await quitter.send_bytes(whole[: len(whole) // 2])
            await quitter.close()
        assert await other.call("flush", 1) == ["ok", 1, None]
        ok, _, stats = await other.call("stats", 2, 985)
        assert ok == "ok"
        assert stats["supporters"] == 0
        _, _, info = await other.call("info", 3)
        assert info["server"]["connections"] == 1
    finally:
        await other.close()


# -- review findings ------------------------------------------------------------------------------


class FakeTransport(asyncio.Transport):
    """Just enough of a transport to drive a Connection by hand, callback by callback."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


async def test_a_sub_still_in_the_mailbox_when_its_connection_closes_registers_nothing(
    server: Running,
) -> None:
    from campaignstats.server import Connection

    conn = Connection(server.server)
    conn.connection_made(FakeTransport())
    # Read and closed in one go: the sub is still in the mailbox when the connection goes.
    conn.data_received(msgpack.packb(["sub", 1, 4242]))
    conn.connection_lost(None)
    await server.service.flush()  # the actor has handled the sub by now
    assert server.service.supervisor.registry.count() == 0
    assert 4242 not in server.service.supervisor.registry.watchers


async def test_replies_to_a_peer_that_went_away_are_not_written_and_nothing_floods_the_log(
    server: Running, caplog: pytest.LogCaptureFixture
) -> None:
    c = await Raw.unix(server.unix)
    await c.send(*[["stats", i, 1] for i in range(300)])  # one read's worth of calls
    await c.close()  # gone before the replies come
    await wait_for(lambda: not server.server.connections)
    await server.service.flush()
    await asyncio.sleep(0.1)
    flood = [r for r in caplog.records if "socket.send() raised exception" in r.getMessage()]
    assert flood == []


async def test_a_producer_woken_for_room_then_cancelled_passes_the_room_to_the_next() -> None:
    from campaignstats.actor.mailbox import Mailbox
    from campaignstats.actor.messages import Tell
    from campaignstats.requests import Increments

    mailbox = Mailbox(1)
    mailbox.put_nowait(Tell(Increments(())))
    first = asyncio.create_task(mailbox.put(Tell(Increments(()))))
    second = asyncio.create_task(mailbox.put(Tell(Increments(()))))
    await asyncio.sleep(0)  # both wait for room
    assert mailbox.statistics().blocked_producers == 2
    assert mailbox.get_nowait() is not None  # room for one: the first producer is woken...
    first.cancel()  # ...and cancelled before it could take the room
    await asyncio.wait_for(second, 1.0)  # the second one gets it instead of waiting for ever
    assert first.cancelled()
    assert mailbox.statistics().depth == 1


# -- the second floor: maps, decrements, hello's ops and limits ------------------------------------


async def test_hello_lists_the_ops_and_limits_and_dec_takes_back_what_inc_counted(
    server: Running,
) -> None:
    c = await Raw.tcp(server.port)
    try:
        ok, _, hello = await c.call("hello", 1, {"protocol": 1})
        assert ok == "ok"
        assert {"inc", "incs", "dec", "decs", "stats", "sub"} <= set(hello["ops"])
        assert hello["limits"] == {"max_message": 1 << 20, "max_batch": 10_000, "max_string": 64}
        item = {"campaign": 950, "org": 3, "type": "register", "area": "IT", "new": True}
        await c.send(
            ["inc", item],
            ["incs", [item, [950, 3, "share", None, False, 2], {**item, "messages": 4}]],
            ["dec", {**item, "txid": 12}],
            ["decs", [[950, 3, "share", None, False]]],
        )
        assert await c.call("flush", 2) == ["ok", 2, None]
        ok, _, stats = await c.call("stats", 3, 950)
        assert stats["supporters"] == 2
        assert stats["action"] == {"register": 2, "share": 1}
        assert stats["area"] == {"IT": 2}
        # An item with an unknown key is refused (one invalid error names it), the rest applied.
        await c.send(["incs", [item, {**item, "colour": "red"}]])
        [error] = await c.recv()
        assert error[:3] == ["err", None, "invalid"]
        assert "[1] unknown increment key 'colour'" in error[3]
        assert (await c.call("stats", 4, 950))[2]["supporters"] == 3
        await c.send(["inc", {**item, "colour": "red"}])
        [error] = await c.recv()
        assert error[:3] == ["err", None, "bad_message"]
    finally:
        await c.close()


async def test_the_embedding_api_increments_decrements_and_sends_batches_of_either(
    server: Running,
) -> None:
    from campaignstats.errors import BadMessage, Invalid
    from campaignstats.model import Increment
    from campaignstats.requests import Decrements, Increments

    service = server.service
    service.increment(960, 1, "register", "NL", True, txid=5, at=1_700_000_000, page=3)
    service.increment(960, 1, "register", "NL", True, messages=2)
    service.decrement(960, 1, "register", "NL", True, txid=6)
    await service.send([Increment(960, 2, "share")] * 3)
    await service.send([Increment(960, 2, "share")], decrement=True)
    await service.send(Decrements([Increment(960, 2, "share")]))
    await service.send(Increments([Increment(960, 2, "share")]))
    await service.flush()
    stats = await service.stats(960)
    assert stats["supporters"] == 1
    assert stats["action"] == {"register": 1, "share": 2}
    with pytest.raises(Invalid):
        service.decrement(960, 1, "register", txid=0)
    with pytest.raises(BadMessage):
        service.increment(960, 1, "register", at="noon")  # type: ignore[arg-type]
    with pytest.raises(Invalid):
        await service.send([Increment(960, 1, "")])


async def test_closing_the_server_and_stopping_the_service_leave_no_task_behind(
    start: Start,
) -> None:
    before = asyncio.all_tasks()
    running = await start(idle_timeout=5)
    c = await Raw.tcp(running.port)
    try:
        assert await c.call("ping", 1) == ["ok", 1, "pong"]
        assert len(asyncio.all_tasks() - before) >= 3  # supervisor, sweeper, the task groups
        await running.server.close(timeout=5)
        await running.service.stop(timeout=5)
        await asyncio.sleep(0)
        assert {t for t in asyncio.all_tasks() - before if not t.done()} == set()
    finally:
        await c.close()


async def test_a_campaign_whose_items_were_all_refused_publishes_nothing(start: Start) -> None:
    running = await start(ActorConfig(sync_interval=3600, publish_interval=0.05, max_keys=1))
    c = await Raw.tcp(running.port)
    try:
        assert await c.call("sub", 1, 940) == ["ok", 1, None]
        await c.send(["inc", 940, 1, "a", None, False])
        [pub] = await c.recv(1)
        assert pub[:2] == ["pub", 940]
        await c.send(["inc", 940, 1, "b", None, False])  # over max_keys: refused
        [error] = await c.recv(1)
        assert error[:3] == ["err", None, "invalid"]
        with pytest.raises(TimeoutError):
            await c.recv(1, within=0.5)  # no pub: nothing changed
    finally:
        await c.close()
