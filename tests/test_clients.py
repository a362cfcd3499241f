"""Both clients against the real StatsServer over real sockets: one behaviour suite, run twice.

Every test that takes ``make_client`` runs against the asyncio and the blocking client: the same
calls, options, errors and timeouts. The server runs in the test's event loop, so the blocking
client's calls run in a worker thread (:class:`Driver`); its ``increment()`` never blocks and is
called directly, like a web view would. Every test uses campaign ids of its own: the service (and
its counts) is shared by the module.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from campaignstats.actor.actor import ActorConfig
from campaignstats.client import (
    CLIENT_NAME,
    AsyncStatsClient,
    BlockingSubscription,
    CallTimeout,
    ServerUnavailable,
    StatsClient,
    blocking,
)
from campaignstats.client import Subscription as AsyncSubscription
from campaignstats.client._common import parse_url
from campaignstats.db.source import PostgresSource
from campaignstats.errors import BadMessage, Invalid, StatsError, Unauthorized
from campaignstats.model import Increment
from campaignstats.protocol import Call, Hello, Ping, ServerCodec
from campaignstats.server import StatsServer
from campaignstats.service import StatsService

_campaign_ids = itertools.count(10_000)


def new_campaign() -> int:
    return next(_campaign_ids)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def eventually(check: Callable[[], Awaitable[bool] | bool]) -> None:
    """Poll until ``check`` holds; the test's own ``asyncio.timeout`` bounds the wait."""
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
async def service(module_dsn: str) -> AsyncIterator[StatsService]:
    service = StatsService(
        PostgresSource(module_dsn), ActorConfig(sync_interval=3600, publish_interval=0.1)
    )
    await service.start()
    try:
        async with asyncio.timeout(20):
            await eventually(lambda: _loaded(service))
        yield service
    finally:
        await service.stop()


async def _loaded(service: StatsService) -> bool:
    return bool((await service.info())["calculations"]["loaded"])


async def actions(service: StatsService, campaign_id: int) -> dict[str, int]:
    """What the server holds, asked of the service directly (not through a client)."""
    result: dict[str, int] = (await service.stats(campaign_id))["action"]
    return result


@pytest.fixture
def socket_dir() -> Any:
    # Short: a Unix socket path is limited to about 100 bytes, and pytest's tmp_path is long.
    with tempfile.TemporaryDirectory(prefix="cs-", dir="/tmp") as path:
        yield Path(path)


@contextlib.asynccontextmanager
async def running_server(service: StatsService, **options: Any) -> AsyncIterator[StatsServer]:
    options.setdefault("port", 0)
    server = StatsServer(service, **options)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def tcp_url(server: StatsServer) -> str:
    return f"tcp://127.0.0.1:{server.port}"


class Driver:
    """Drives either client from an async test: the blocking one's calls run in a thread."""

    def __init__(self, client: AsyncStatsClient | StatsClient) -> None:
        self.client = client

    def increment(self, *args: Any, **kwargs: Any) -> None:
        self.client.increment(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)  # increment_many, decrement... never block

    async def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        method = getattr(self.client, name)
        if isinstance(self.client, AsyncStatsClient):
            return await method(*args, **kwargs)
        return await asyncio.to_thread(method, *args, **kwargs)

    def subscribe(self, campaign_id: int) -> SubscriptionDriver:
        return SubscriptionDriver(self.client.subscribe(campaign_id))

    async def close(self) -> None:
        await self.call("close")

    @property
    def queued(self) -> int:
        return self.client.statistics().queued

    @property
    def sent(self) -> int:
        return self.client.statistics().sent

    @property
    def dropped(self) -> int:
        return self.client.statistics().dropped

    @property
    def connected(self) -> bool:
        return self.client.statistics().connected


class SubscriptionDriver:
    """Drives either client's subscription: ``start``, ``get`` and ``close`` awaited alike."""

    def __init__(self, subscription: AsyncSubscription | BlockingSubscription) -> None:
        self.subscription = subscription

    async def start(self) -> None:
        if isinstance(self.subscription, AsyncSubscription):
            await self.subscription.start()
        else:
            await asyncio.to_thread(self.subscription.start)

    async def get(self, timeout: float | None = None) -> tuple[int, dict[str, Any]] | None:
        if isinstance(self.subscription, AsyncSubscription):
            return await self.subscription.get(timeout)
        return await asyncio.to_thread(self.subscription.get, timeout)

    async def close(self) -> None:
        if isinstance(self.subscription, AsyncSubscription):
            await self.subscription.aclose()
        else:
            await asyncio.to_thread(self.subscription.close)


MakeClient = Callable[..., Driver]


@pytest.fixture(params=["asyncio", "blocking"])
async def make_client(request: pytest.FixtureRequest) -> AsyncIterator[MakeClient]:
    made: list[Driver] = []

    def make(url: str, **options: Any) -> Driver:
        options.setdefault("backoff_max", 0.1)
        options.setdefault("connect_timeout", 1.0)
        cls = AsyncStatsClient if request.param == "asyncio" else StatsClient
        driver = Driver(cls(url, **options))
        made.append(driver)
        return driver

    yield make
    for driver in made:
        await driver.close()


# -- without a server ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [AsyncStatsClient, StatsClient])
def test_invalid_arguments_to_increment_raise_at_once_and_queue_nothing(cls: type) -> None:
    client = cls("tcp://127.0.0.1:9")
    with pytest.raises(Invalid):
        client.increment(0, 1, "register")
    with pytest.raises(Invalid):
        client.increment(1, 1, "")
    with pytest.raises(Invalid):
        client.increment(1, 1, "x" * 65)
    with pytest.raises(Invalid):
        client.increment(1, 1, "register", "é" * 33)  # 66 bytes: the slow path counts bytes
    with pytest.raises(Invalid):
        client.increment(1, 1, "\ud800")  # a lone surrogate has no UTF-8: it would poison a batch
    with pytest.raises(Invalid):
        client.increment(1, 1, "register", count=0)
    with pytest.raises(BadMessage):
        client.increment(1, 1, 5)
    with pytest.raises(BadMessage):
        client.increment(1, 1, "register", new_supporter=1)
    assert client.statistics().queued == 0


@pytest.mark.parametrize("cls", [AsyncStatsClient, StatsClient])
def test_a_wrong_url_or_an_oversized_batch_is_refused_at_construction(cls: type) -> None:
    with pytest.raises(ValueError, match="unsupported"):
        cls("http://localhost:7400")
    with pytest.raises(ValueError, match="path"):
        cls("unix://")
    with pytest.raises(ValueError, match="batch_size"):
        cls("tcp://localhost", batch_size=10_001)


def test_urls_default_to_port_7400_and_accept_unix_paths() -> None:
    assert parse_url("tcp://stats.internal") == ("tcp", "stats.internal", 7400)
    assert parse_url("tcp://[::1]:7500") == ("tcp", "::1", 7500)
    assert parse_url("unix:///run/cs.sock") == ("unix", "/run/cs.sock", 0)


# -- outages ---------------------------------------------------------------------------------------


async def test_increments_queued_before_the_server_starts_are_delivered_once_it_is_up(
    service: StatsService, make_client: MakeClient
) -> None:
    async with asyncio.timeout(15):
        port = free_port()
        cid = new_campaign()
        client = make_client(f"tcp://127.0.0.1:{port}")
        for _ in range(10):
            client.increment(cid, 1, "register", "DE", True)
        await asyncio.sleep(0.3)  # the sender tries, fails, backs off, and keeps the queue
        assert (client.queued, client.dropped) == (10, 0)

        async with running_server(service, port=port):
            # No flush: the sender delivers on its own once the server is there.
            await eventually(lambda: client.sent == 10)
            await eventually(lambda: _equals(actions(service, cid), {"register": 10}))
        assert client.dropped == 0


async def _equals(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


async def test_a_down_server_never_raises_into_increment_but_calls_raise_connection_errors(
    make_client: MakeClient,
) -> None:
    async with asyncio.timeout(15):
        client = make_client(f"tcp://127.0.0.1:{free_port()}", queue_size=100)
        cid = new_campaign()
        for _ in range(1000):
            client.increment(cid, 1, "register")
        assert (client.queued, client.dropped) == (100, 900)  # the queue is bounded

        for call, args in [("stats", (cid,)), ("flush", ()), ("ping", ())]:
            with pytest.raises(ServerUnavailable) as raised:
                await client.call(call, *args)
            assert isinstance(raised.value, ConnectionError)
            assert isinstance(raised.value, StatsError)

        await client.close()  # gives up on what is queued, quietly
        assert (client.queued, client.dropped) == (0, 1000)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_the_client_reconnects_after_a_server_restart_and_later_increments_arrive(
    service: StatsService, make_client: MakeClient, socket_dir: Path, transport: str
) -> None:
    async with asyncio.timeout(15):
        cid = new_campaign()
        if transport == "tcp":
            options: dict[str, Any] = {"port": free_port()}
            url = f"tcp://127.0.0.1:{options['port']}"
        else:
            options = {"host": None, "unix_path": socket_dir / "stats.sock"}
            url = f"unix://{options['unix_path']}"
        client = make_client(url)

        async with running_server(service, **options):
            for _ in range(5):
                client.increment(cid, 1, "register", None, True)
            await client.call("flush")
            assert (await client.call("stats", cid))["action"] == {"register": 5}
        # Stopped: the server closed the connection, and the client noticed.
        await eventually(lambda: not client.connected)
        for _ in range(5):
            client.increment(cid, 1, "register", None, True)
        await asyncio.sleep(0.2)  # a few failed attempts while nobody listens

        async with running_server(service, **options):
            await eventually(lambda: client.sent == 10)
            await client.call("flush")
            stats = await client.call("stats", cid)
        assert stats["action"] == {"register": 10}
        assert stats["supporters"] == 10
        assert client.dropped == 0


# -- a server that does not answer -----------------------------------------------------------------


class Fake:
    """A raw server: ``answer(message)`` gives the reply's result, or None for no reply at all."""

    def __init__(self, answer: Callable[[Any], Any | None]) -> None:
        self.answer = answer
        self.port = 0
        self.connections: list[list[Any]] = []  # the messages received, per connection
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        codec = ServerCodec()
        received: list[Any] = []
        self.connections.append(received)
        self.writers.append(writer)
        try:
            while data := await reader.read(1 << 16):
                for msg in codec.receive_data(data):
                    request = msg.request if isinstance(msg, Call) else msg
                    received.append(request)
                    result = self.answer(request)
                    if result is not None and isinstance(msg, Call):
                        writer.write(codec.ok(msg.req_id, result))
        except ConnectionError:
            pass
        finally:
            writer.close()

    def hang_up(self) -> None:
        for writer in self.writers:
            writer.close()


def fake_server(
    answer: Callable[[Any], Any | None],
) -> contextlib.AbstractAsyncContextManager[Fake]:
    return serving(Fake(answer))


FakeT = TypeVar("FakeT", bound=Fake)


@contextlib.asynccontextmanager
async def serving(fake: FakeT) -> AsyncIterator[FakeT]:
    """``fake`` (a :class:`Fake` or a subclass with its own ``handle``) listening on 127.0.0.1."""
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    fake.port = server.sockets[0].getsockname()[1]
    try:
        yield fake
    finally:
        server.close()
        fake.hang_up()
        await server.wait_closed()
        # A connection accepted as the server closed gets its handler a moment later: close
        # it too, or its transport is collected unclosed in some later test (a warning there).
        await asyncio.sleep(0.05)
        fake.hang_up()


def hello_only(msg: Any) -> Any | None:
    return {"protocol": 1, "server": "fake"} if isinstance(msg, Hello) else None


def hello_and_ping(msg: Any) -> Any | None:
    return hello_only(msg) or ("pong" if isinstance(msg, Ping) else None)


async def test_a_call_times_out_when_the_server_accepts_and_never_answers(
    make_client: MakeClient,
) -> None:
    async with asyncio.timeout(10), fake_server(lambda msg: None) as fake:
        client = make_client(f"tcp://127.0.0.1:{fake.port}", connect_timeout=0.3, timeout=1.0)
        start = time.monotonic()
        with pytest.raises(TimeoutError) as raised:
            await client.call("ping")
        assert isinstance(raised.value, StatsError)
        assert time.monotonic() - start < 1.5


async def test_a_call_times_out_when_the_server_answers_hello_but_not_the_call(
    make_client: MakeClient,
) -> None:
    async with asyncio.timeout(10), fake_server(hello_only) as fake:
        client = make_client(f"tcp://127.0.0.1:{fake.port}", timeout=0.3, close_timeout=0.2)
        start = time.monotonic()
        with pytest.raises(CallTimeout) as raised:
            await client.call("stats", 1)
        assert isinstance(raised.value, TimeoutError)
        assert time.monotonic() - start < 1.0
        client.increment(1, 1, "register")  # still never raises
        await client.close()  # the final flush times out, quietly


async def test_every_connection_starts_with_a_hello_carrying_the_token(
    make_client: MakeClient,
) -> None:
    async with asyncio.timeout(10), fake_server(hello_and_ping) as fake:
        client = make_client(f"tcp://127.0.0.1:{fake.port}", token="s3cret")
        await client.call("ping")
        fake.hang_up()
        await eventually(lambda: not client.connected)
        await client.call("ping")
    assert len(fake.connections) == 2
    for messages in fake.connections:
        assert isinstance(messages[0], Hello)
        assert (messages[0].protocol, messages[0].token, messages[0].client) == (
            1,
            "s3cret",
            CLIENT_NAME,
        )
        assert isinstance(messages[1], Ping)


# -- the real server -------------------------------------------------------------------------------


async def test_an_error_reply_raises_the_exception_class_of_its_code(
    service: StatsService, make_client: MakeClient
) -> None:
    async with asyncio.timeout(10), running_server(service) as server:
        client = make_client(tcp_url(server))
        with pytest.raises(Invalid):
            await client.call("stats", 0)
        with pytest.raises(Invalid):
            await client.call("stats_many", [1, 0])
        assert await client.call("ping") >= 0  # the connection goes on after an error


async def test_a_wrong_token_makes_calls_raise_unauthorized_but_not_increments(
    service: StatsService, make_client: MakeClient
) -> None:
    async with asyncio.timeout(10), running_server(service, token="s3cret") as server:
        good = make_client(tcp_url(server), token="s3cret")
        bad = make_client(tcp_url(server), token="guess")
        assert await good.call("ping") >= 0
        bad.increment(1, 1, "register")
        with pytest.raises(Unauthorized):
            await bad.call("stats", 1)


async def test_every_call_works_over_a_unix_socket(
    service: StatsService, make_client: MakeClient, socket_dir: Path
) -> None:
    path = socket_dir / "stats.sock"
    async with asyncio.timeout(10), running_server(service, host=None, unix_path=path):
        client = make_client(f"unix://{path}")
        cid, other = new_campaign(), new_campaign()
        client.increment(cid, 7, "register", "DE", True)
        client.increment(cid, 7, "mail", "DE", False, 10, 12345)
        await client.call("flush")
        expected = {
            "supporters": 1,
            "action": {"register": 1, "mail": 10},
            "area": {"DE": 1},
            "org": {7: 1},
            "extra_supporters": 0,
            "messages": 0,
        }
        assert await client.call("stats", cid) == expected
        many = await client.call("stats_many", [cid, other])
        assert many[cid] == expected
        assert many[other]["supporters"] == 0
        assert "server" in await client.call("info")
        assert await client.call("ping") >= 0
        assert isinstance(await client.call("resync", [other]), bool)
        with pytest.raises(ValueError, match="scope"):
            await client.call("resync", "everything")


async def test_close_pushes_the_increments_still_queued(
    service: StatsService, make_client: MakeClient
) -> None:
    async with asyncio.timeout(10), running_server(service) as server:
        client = make_client(tcp_url(server), batch_size=100)
        cid = new_campaign()
        for i in range(2_500):
            client.increment(cid, 1, "register", count=1 + i % 2)
        await client.close()
        assert await actions(service, cid) == {"register": 3_750}
        assert client.dropped == 0


async def test_the_blocking_client_takes_increments_from_many_threads_at_once(
    service: StatsService,
) -> None:
    threads_n, per_thread = 8, 5_000
    async with asyncio.timeout(30), running_server(service) as server:
        client = StatsClient(tcp_url(server))
        cid = new_campaign()
        start = threading.Barrier(threads_n)

        def work(t: int) -> None:
            start.wait()
            for i in range(per_thread):
                client.increment(cid, 100 + t, f"type{t}", "DE" if i % 2 else None, i % 5 == 0)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            await asyncio.to_thread(thread.join)
        await asyncio.to_thread(client.flush)
        stats = await asyncio.to_thread(client.stats, cid)
        await asyncio.to_thread(client.close)

    assert stats["action"] == {f"type{t}": per_thread for t in range(threads_n)}
    assert stats["supporters"] == threads_n * per_thread // 5
    assert stats["org"] == {100 + t: per_thread // 5 for t in range(threads_n)}
    assert stats["area"] == {"DE": threads_n * per_thread // 10}  # odd multiples of 5
    assert (client.sent, client.dropped) == (threads_n * per_thread, 0)


async def test_subscribe_yields_the_new_stats_of_a_campaign_that_changes(
    service: StatsService, make_client: MakeClient
) -> None:
    async with asyncio.timeout(10), running_server(service) as server:
        client = make_client(tcp_url(server))
        cid = new_campaign()
        updates = client.subscribe(cid)
        await updates.start()  # confirmed: no update after this is missed
        client.increment(cid, 1, "register", "FR", True)
        await client.call("flush")
        update = await updates.get(timeout=5)
        assert update is not None
        got, stats = update
        assert got == cid
        assert (stats["supporters"], stats["area"]) == (1, {"FR": 1})
        assert await updates.get(timeout=0.2) is None  # nothing new: the wait times out
        await updates.close()
        assert await updates.get() is None  # a closed subscription ends


async def test_a_subscription_survives_a_server_restart(
    service: StatsService, make_client: MakeClient
) -> None:
    port = free_port()
    cid = new_campaign()
    client = make_client(f"tcp://127.0.0.1:{port}")
    async with asyncio.timeout(15):
        async with running_server(service, port=port):
            updates = client.subscribe(cid)
            await updates.start()
        async with running_server(service, port=port):
            client.increment(cid, 1, "register", None, True)
            await client.call("flush")
            # Re-subscribed on a new connection; the current stats come as an update.
            while True:
                update = await updates.get(timeout=5)
                assert update is not None
                if update[1]["supporters"] == 1:
                    break
        await updates.close()


async def test_a_per_call_timeout_overrides_the_clients(make_client: MakeClient) -> None:
    async with asyncio.timeout(10), fake_server(hello_only) as fake:
        client = make_client(f"tcp://127.0.0.1:{fake.port}", timeout=30)
        start = time.monotonic()
        for call, args in [("ping", ()), ("stats", (1,)), ("info", ()), ("flush", ())]:
            with pytest.raises(CallTimeout):
                await client.call(call, *args, timeout=0.2)
        assert time.monotonic() - start < 3
        with pytest.raises(ValueError, match="timeout"):
            await client.call("ping", timeout=0)


def hello_with_limits(msg: Any) -> Any | None:
    if isinstance(msg, Hello):
        return {"protocol": 1, "server": "fake", "limits": {"max_string": 8}}
    return "pong" if isinstance(msg, Ping) else None


async def test_the_string_limit_comes_from_the_servers_hello(make_client: MakeClient) -> None:
    async with asyncio.timeout(10), fake_server(hello_with_limits) as fake:
        client = make_client(f"tcp://127.0.0.1:{fake.port}")
        client.increment(1, 1, "x" * 20)  # before any hello: the protocol default (64)
        await client.call("ping")
        client.increment(1, 1, "x" * 8)
        with pytest.raises(Invalid, match="8 bytes"):
            client.increment(1, 1, "x" * 9)


async def test_batches_decrements_and_the_map_form_reach_the_server(
    service: StatsService, make_client: MakeClient
) -> None:
    async with asyncio.timeout(10), running_server(service) as server:
        client = make_client(tcp_url(server))
        cid = new_campaign()
        await client.call("ping")
        client.increment_many(
            [Increment(cid, 1, "register", "DE", True, action_id=i + 1) for i in range(10)]
        )
        client.increment(cid, 2, "mail", None, True, txid=10**6, page=cid, messages=4, at=1.7e9)
        client.decrement(cid, 1, "register", "DE", True)
        client.decrement_many([Increment(cid, 2, "mail", None, True, messages=4)])
        await client.call("flush")
        stats = await client.call("stats", cid)
        assert stats["action"] == {"register": 9}
        assert (stats["supporters"], stats["area"], stats["org"]) == (9, {"DE": 9}, {1: 9})
        assert stats["messages"] == 0
        assert client.dropped == 0
        with pytest.raises(Invalid, match="item 1"):
            client.increment_many([Increment(cid, 1, "a"), Increment(cid, 1, "")])


def test_closed_blocking_clients_leave_no_fork_or_exit_hook_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Review finding: each StatsClient registered an at-fork and an atexit hook that nothing
    # removed, so a process making and closing clients grew both lists for ever.
    registered: list[object] = []
    monkeypatch.setattr(os, "register_at_fork", lambda **hooks: registered.append(hooks))
    monkeypatch.setattr(atexit, "register", lambda *args, **kw: registered.append(args))
    for _ in range(100):
        StatsClient("tcp://127.0.0.1:9").close()
    assert registered == []
    assert not any(c.closed for c in blocking._live)


def test_a_forked_child_starts_with_an_empty_queue_and_its_own_connections() -> None:
    script = """
import os, sys
from campaignstats.client import StatsClient
client = StatsClient("tcp://127.0.0.1:9", backoff_min=5, backoff_max=5)
client.increment(1, 1, "register")
pid = os.fork()
if pid == 0:
    s = client.statistics()
    os._exit(0 if (s.queued, s.sent, s.dropped) == (0, 0, 0) else 3)
_, status = os.waitpid(pid, 0)
assert client.statistics().queued == 1
client.close(timeout=0.1)
sys.exit(os.waitstatus_to_exitcode(status))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()


async def test_metric_updates_are_queued_like_increments_and_read_back_with_metrics(
    service: StatsService, make_client: MakeClient
) -> None:
    """docs/metrics.md, "Integration": ``metric()`` checked here, sent in the background in
    order with increments; ``flush()`` covers it; ``metrics()`` and ``reset_metrics()`` calls."""
    async with asyncio.timeout(10), running_server(service) as server:
        client = make_client(tcp_url(server))
        cid = new_campaign()
        client.increment(cid, 1, "register", None, True)
        client.metric(cid, incr={"views": 2}, member={"visitors": ["a", "b"]})
        client.metric(cid, dims={"source": "mail"}, incr={"views": 1}, member={"visitors": "a"})
        client.metric(cid, set={"partner": 5000}, seen=["views"], at=1.7e9)
        with pytest.raises(Invalid):
            client.metric(cid, incr={"views": 1}, at=1.7e12)  # milliseconds: a caller's bug
        with pytest.raises(BadMessage):
            client.metric(cid, incr={"views": "1"})
        await client.call("flush")
        reply = await client.call("metrics", cid)
        assert reply["total"]["counters"] == {"views": 3, "partner": 5000}
        assert reply["total"]["uniques"] == {"visitors": 2}
        assert reply["total"]["last_seen"] == {"views": 1.7e9}
        assert reply["dims"]["source"]["mail"]["counters"] == {"views": 1}
        assert (await client.call("stats", cid))["supporters"] == 1
        assert await client.call("reset_metrics", cid, "partner") is True
        assert await client.call("reset_metrics", cid, "nothing") is False
        reply = await client.call("metrics", cid)
        assert reply["total"]["counters"] == {"views": 3}
        assert client.dropped == 0
