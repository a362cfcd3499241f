"""The mechanisms of the socket path's second performance round (no timing: speed is bench/'s).

- A large batch is applied in slices, queries served between them, and never a query before the
  increments its own connection sent before it.
- Single ``inc`` frames that arrive together are decoded together, with the same counts and the
  same per-frame errors as one at a time, however the stream is cut into reads.

No Postgres: the service runs on a source that finds an empty database.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest

from campaignstats.actor.actor import ActorConfig
from campaignstats.actor.mailbox import Mailbox
from campaignstats.actor.messages import Ask, Tell
from campaignstats.client import StatsClient
from campaignstats.client._common import Address
from campaignstats.client.blocking import _Connection
from campaignstats.errors import BadFrame, CallTimeout, Invalid, Overloaded, UsageError
from campaignstats.loops import runner
from campaignstats.model import CalculationResult, Increment, scope_name
from campaignstats.protocol import Batch, ClientCodec, ServerCodec
from campaignstats.requests import Increments, Stats
from campaignstats.server import ServerConfig, StatsServer
from campaignstats.service import StatsService
from campaignstats.sessions.client import ClientSession
from campaignstats.sessions.server import CastReceived, ServerSession

from .helpers import Raw, loaded, wait_for
from .test_review_house import ThreadServer

pytestmark = pytest.mark.timeout(60)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class EmptySource:
    async def calculate(self, scope: Any) -> CalculationResult:
        return CalculationResult(scope_name(scope), {}, 0, started_at=time.time())


async def started(**config: Any) -> StatsService:
    service = StatsService(EmptySource(), ActorConfig(sync_interval=3600, **config))
    await service.start()
    await wait_for(lambda: loaded(service))
    return service


@contextlib.asynccontextmanager
async def serving(**config: Any) -> AsyncIterator[StatsServer]:
    service = await started(**config)
    srv = StatsServer(service, ServerConfig(host="127.0.0.1", port=0))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.close(5)
        await service.stop(5)


@pytest.fixture
async def server() -> AsyncIterator[StatsServer]:
    async with serving(apply_slice=50, max_campaigns=20) as srv:
        yield srv


def inc(cid: int, new: bool = True) -> list[Any]:
    return ["inc", cid, 1, "register", "DE", new]


# -- applying in slices ---------------------------------------------------------------------------


async def test_a_batch_applied_in_slices_is_seen_whole_by_its_sender_and_in_part_by_others() -> (
    None
):
    service = await started(apply_slice=10)
    try:
        writer, other = service.producer(), service.producer()
        writer.cast(Increments(tuple(Increment(1, 1, "register", None, True) for _ in range(100))))
        for _ in range(1_000):  # until the actor is between two slices of it
            if service.mailbox.partial:
                break
            await asyncio.sleep(0)
        assert service.mailbox.partial
        own, theirs = writer.call(Stats(1)), other.call(Stats(1))
        seen_by_other = (await theirs)["supporters"]
        assert 0 < seen_by_other < 100  # served between two slices
        assert (await own)["supporters"] == 100  # never before its own increments
        assert not service.mailbox.partial
        assert (await service.stats(1))["supporters"] == 100
    finally:
        await service.stop(5)


async def test_a_connection_s_query_after_its_large_batch_always_sees_all_of_it(
    server: StatsServer,
) -> None:
    assert server.port is not None
    writer, reader = await Raw.tcp(server.port), await Raw.tcp(server.port)
    mailbox = server.service.mailbox
    seen: list[int] = []
    stop = asyncio.Event()

    async def watch() -> None:  # another connection, querying while the batches are applied
        rid = 0
        while not stop.is_set() and rid < 10_000:
            rid += 1
            reply = await reader.call("stats", rid, 7)
            seen.append(reply[2]["action"].get("register", 0))

    watcher = asyncio.create_task(watch())
    try:
        for round_ in range(1, 11):
            batch = [[7, 1, "register", None, False, 1]] * 2_000  # 40 slices of 50
            if round_ % 2:  # the batch and the query in one write: the query right behind it
                await writer.send(["incs", batch], ["stats", round_, 7])
            else:  # the query once the actor is in the middle of the batch
                await writer.send(["incs", batch])
                for _ in range(10_000):
                    if mailbox.partial:
                        break
                    await asyncio.sleep(0)
                await writer.send(["stats", round_, 7])
            [reply] = await writer.recv()
            assert reply[:2] == ["ok", round_]
            assert reply[2]["action"] == {"register": 2_000 * round_}
    finally:
        stop.set()
        await watcher
        await writer.close()
        await reader.close()
    assert seen == sorted(seen)  # other connections see counts only grow
    assert seen[-1] <= 20_000


# -- single inc frames, one read ------------------------------------------------------------------


GOOD_AND_BAD = [
    inc(1),
    inc(2, new=False),
    ["inc", 0, 1, "register", "DE", True],  # campaign 0: invalid
    inc(1),
    ["inc", 3, 1, "register", "DE", "yes"],  # new_supporter not a bool
    inc(3, new=False),
    ["inc", 3, 1, "x" * 80, None, False],  # action type over 64 bytes
    inc(2),
    ["dec", 2, 1, "register", "DE", True],
    ["dec", 1, 1, "register", "DE", True],
    inc(4),
]


def session_outcome(cuts: list[bytes]) -> tuple[list[Any], list[Any]]:
    """The items the actor would get (flattened, in order) and the replies, for the reads."""
    session = ServerSession()
    items: list[Any] = []
    for data in cuts:
        for event in session.receive_data(data):
            if type(event) is CastReceived:
                kind = type(event.cast).__name__
                items.extend((kind, i.campaign_id, i.new_supporter) for i in event.cast.items)
    replies = list(msgpack.Unpacker(io.BytesIO(session.data_to_send()), strict_map_key=False))
    return items, replies


def test_single_frames_give_the_same_items_and_errors_whole_one_by_one_and_cut_anywhere() -> None:
    frames = [msgpack.packb(m) for m in GOOD_AND_BAD]
    stream = b"".join(frames)
    whole = session_outcome([stream])
    assert whole == session_outcome(frames)  # one frame per read
    for cut in range(1, len(stream)):  # every byte boundary
        assert session_outcome([stream[:cut], stream[cut:]]) == whole, cut
    assert session_outcome([stream[i : i + 1] for i in range(len(stream))]) == whole
    items, replies = whole
    assert [i[1] for i in items] == [1, 2, 1, 3, 2, 2, 1, 4]
    # each bad frame is refused alone, with the error it gets on its own
    assert [(r[0], r[2]) for r in replies] == [
        ("err", "invalid"),
        ("err", "bad_message"),
        ("err", "invalid"),
    ]


def test_a_long_run_of_single_frames_in_one_read_is_one_batch_for_the_actor() -> None:
    stream = b"".join(msgpack.packb(inc(1 + i % 7)) for i in range(3_000))
    session = ServerSession()
    events = session.receive_data(stream)
    assert len(events) == 1
    assert type(events[0]) is CastReceived
    assert len(events[0].cast.items) == 3_000
    codec = ServerCodec()
    head = codec.receive_data(stream[:-5])  # the last frame incomplete
    tail = codec.receive_data(stream[-5:])
    assert [len(m.items) for m in head if type(m) is Batch] == [2_999]
    assert [len(m.items) for m in tail if type(m) is Batch] == [1]


def test_an_inc_frame_whose_strings_look_like_an_op_is_decoded_like_any_other() -> None:
    # "inc" as an action type, and as an area: the guess of where frames start is wrong, and
    # the decode that checks it says so; the frames then go one by one.
    messages = [["inc", 1, 1, "inc", "inc", True], inc(2), ["inc", 3, 1, "inc", None, False]] * 40
    # ... and a dec among them, whose place an "inc" in a string makes up for in the count
    messages[5:5] = [["dec", 2, 1, "register", "DE", True]]
    stream = b"".join(msgpack.packb(m) for m in messages)
    items, replies = session_outcome([stream])
    assert replies == []
    assert items == session_outcome([msgpack.packb(m) for m in messages])[0]  # one per read
    assert [i[0] for i in items].count("Decrements") == 1
    assert [i[1] for i in items if i[0] == "Increments"] == [1, 2, 3] * 40
    # a dec between two incs, and as many "inc" strings as it takes for the count to match
    sneaky = [["inc", 1, 1, "inc", None, True], ["dec", 1, 1, "register", "DE", True]]
    sneaky += [inc(2)] * 20 + [inc(3)]  # over 256 bytes: the read is guessed at
    frames = [msgpack.packb(m) for m in sneaky]
    assert session_outcome([b"".join(frames)]) == session_outcome(frames)
    assert session_outcome([b"".join(frames)])[0][1] == ("Decrements", 1, True)


async def test_many_single_frames_in_one_write_count_and_fail_as_one_at_a_time() -> None:
    """Over a socket: the same stream in one write, then a frame per write (each applied before
    the next is sent), gives the same counts and the same errors. The server takes 20
    campaigns: the actor refuses the frames of the 21st and later, each answered on its own."""
    messages = [*GOOD_AND_BAD, *(inc(100 + i) for i in range(20))]  # 4 campaigns, then 20

    async def play(one_by_one: bool) -> tuple[list[Any], list[Any]]:
        async with serving(max_campaigns=20) as srv:
            assert srv.port is not None
            conn = await Raw.tcp(srv.port)
            if one_by_one:
                for m in messages:
                    await conn.send(m, ["flush", 0])
            else:
                await conn.send(*messages, ["flush", 0])
            errors: list[Any] = []
            flushes = len(messages) if one_by_one else 1
            while flushes:
                [reply] = await conn.recv()
                if reply[0] == "ok":
                    flushes -= 1
                else:
                    errors.append(reply)
            ids = [1, 2, 3, 4, *range(100, 120)]
            many = await conn.call("stats_many", 1, ids)
            await conn.close()
            return errors, many

    together, apart = await play(False), await play(True)
    assert together == apart
    errors, many = together
    assert [e[2] for e in errors] == ["invalid", "bad_message", "invalid"] + ["invalid"] * 4
    assert all("over the limit of 20 campaigns" in e[3] for e in errors[3:])  # the actor's
    assert many[2][1]["supporters"] == 1  # two incs, one dec
    assert many[2][116]["supporters"] == 0  # refused


# -- the event loop -------------------------------------------------------------------------------


def test_the_asyncio_loop_is_asyncio_s_own_and_auto_takes_uvloop_only_when_installed() -> None:
    name, run = runner("asyncio")
    assert (name, run) == ("asyncio", asyncio.run)

    async def loop_class() -> str:
        return type(asyncio.get_running_loop()).__module__

    name, run = runner("auto")
    try:
        import uvloop  # noqa: F401
    except ModuleNotFoundError:
        assert name == "asyncio"
    else:
        assert name == "uvloop"
        assert run(loop_class()).startswith("uvloop")
    with pytest.raises(UsageError):
        runner("trio")


def test_serve_with_loop_uvloop_and_no_uvloop_says_what_to_install() -> None:
    probe = (
        "import sys; sys.modules['uvloop'] = None\n"
        "from campaignstats.cli import main\n"
        "sys.exit(main(['serve', '--loop', 'uvloop', '--no-http', '--port', '0']))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PYTHONPATH")}
    env["PYTHONPATH"] = REPO
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, env=env
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-600:]
    assert "uvloop is not installed" in output, output[-600:]
    assert "pip install uvloop" in output
    assert "Traceback" not in output


# -- the clients ----------------------------------------------------------------------------------

SERVER_MESSAGES = [
    ["ok", 1, {"supporters": 3, "action": {"register": 3}, "area": {}, "org": {1: 3}}],
    ["err", 2, "invalid", "campaign_id must be between 1 and 2**63-1"],
    ["pub", 7, {"supporters": 1}],
    ["ok", 3, "pong"],
]


def client_messages(reads: list[bytes]) -> list[Any]:
    codec = ClientCodec()
    out: list[Any] = []
    for data in reads:
        out.extend(codec.receive_data(data))
    return out


def test_the_client_codec_reads_the_same_replies_whole_split_or_several_in_one_read() -> None:
    frames = [msgpack.packb(m) for m in SERVER_MESSAGES]
    stream = b"".join(frames)
    one_per_read = client_messages(frames)  # the fast path: one whole reply per read
    assert [type(m).__name__ for m in one_per_read] == ["Ok", "Err", "Pub", "Ok"]
    assert client_messages([stream]) == one_per_read
    for cut in range(1, len(stream)):
        assert client_messages([stream[:cut], stream[cut:]]) == one_per_read, cut
    # bad bytes, alone or after a good reply, are refused however they come
    bad = b"\xc1"  # never used in MessagePack
    for reads in ([bad], [frames[0] + bad], [frames[0], bad]):
        with pytest.raises(BadFrame):
            client_messages([*reads, b""])  # the end of the stream raises what was found
    with pytest.raises(BadFrame):  # a value that is not a server message
        ClientCodec().receive_data(msgpack.packb(["nope", 1]))


def test_a_blocking_write_to_a_server_that_stops_reading_times_out_at_its_deadline() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted: list[socket.socket] = []

    def serve() -> None:  # answers the hello, then never reads again
        conn, _ = listener.accept()
        accepted.append(conn)
        conn.recv(1 << 16)
        conn.sendall(msgpack.packb(["ok", 1, {"protocol": 1, "server": "fake"}]))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        conn = _Connection.open(Address("tcp", "127.0.0.1", port), ClientSession(), 5)
        thread.join(5)
        start = time.monotonic()
        with pytest.raises(CallTimeout):
            conn.write(b"\x00" * (64 << 20), start + 0.5)  # far more than the kernel buffers
        assert 0.4 < time.monotonic() - start < 3.0
        assert conn.closed  # a stream cut mid-write is never used again
    finally:
        for sock in accepted:
            sock.close()
        listener.close()


def test_the_blocking_client_answers_and_fails_as_before_over_a_real_server() -> None:
    """Same answers and same errors through the pool's non-blocking connections."""
    server = ThreadServer()
    try:
        with StatsClient(f"tcp://127.0.0.1:{server.port}", timeout=5) as client:
            client.increment(5, 1, "register", "DE", True)
            client.flush()
            assert client.stats(5)["supporters"] == 1
            assert client.stats_many([5, 6])[6]["supporters"] == 0
            with pytest.raises(Invalid):
                client.stats(0)
            assert client.stats(5)["action"] == {"register": 1}  # the connection goes on
            assert client.ping() > 0
    finally:
        server.stop()


def test_the_mailbox_bounds_the_increments_it_holds_not_only_its_messages() -> None:
    """A read of single frames is one message of thousands of items, and the actor takes large
    ones a slice at a time while connections keep reading: without a bound on items, 10,000
    such messages could wait in memory."""
    mailbox = Mailbox(capacity=10, items=100)
    batch = Tell(Increments(tuple(Increment(1, 1, "register") for _ in range(80))))
    mailbox.put_nowait(batch)
    mailbox.put_nowait(batch)  # 80 < 100 before it: one large message still gets in
    assert mailbox.statistics().items == 160
    with pytest.raises(Overloaded):
        mailbox.put_nowait(batch)
    loop = asyncio.new_event_loop()
    try:
        mailbox.put_read_nowait(Ask(Stats(1), loop.create_future()))  # queries are not held back
    finally:
        loop.close()
    assert mailbox.get_nowait() is not batch  # the read lane first
    assert mailbox.get_nowait() is batch
    assert mailbox.statistics().items == 80
    mailbox.put_nowait(batch)  # room again
    assert mailbox.statistics().depth == 2
