"""Review of goals, milestones, area quorums, events and webhooks (issue 13): each test is a
finding, and fails while the bug is there."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from campaignstats.actor.actor import ActorConfig
from campaignstats.db.source import PostgresSource
from campaignstats.service import StatsService

from .helpers import Start, lines_run, loaded, wait_for
from .test_goals import Signatures
from .test_http import Events, Http, http, make_http, send_and_flush, socket_peer
from .test_webhooks import Receiver, Server, receiver, servers, signatures

__all__ = ["http", "make_http", "receiver", "servers", "signatures"]  # fixtures, used by name


@pytest.fixture
async def services(module_dsn: str) -> AsyncIterator[Callable[..., StatsService]]:
    started: list[StatsService] = []

    def make(**config: Any) -> StatsService:
        config.setdefault("sync_interval", 3600)
        config.setdefault("publish_interval", 0.05)
        service = StatsService(PostgresSource(module_dsn), ActorConfig(**config))
        started.append(service)
        return service

    yield make
    for service in started:
        await service.stop(timeout=10)


# -- server-sent events -------------------------------------------------------------------------


async def test_an_event_stream_gets_every_quorum_event_when_27_member_states_cross_at_once(
    http: Http,
) -> None:
    """A European Citizens' Initiative has a quorum in each of the 27 member states. When one
    batch (or one resync) takes them all over their quorum, the actor fires 27 ``quorum`` events
    at once; the stream's pump offers them to each stream without yielding, and the stream's
    queue (``stream_queue``, 16) overflows, so every browser following the campaign is dropped
    as a "slow reader" and loses the events. Each of the 27 events should reach the stream (a
    burst of goal events is not a slow reader: the events are few and bounded by the goals)."""
    raw = await socket_peer(http)
    areas = {f"A{i:02}": 1 for i in range(27)}
    try:
        assert (await raw.call("set_goals", 1, 990, {"area": areas}))[0] == "ok"
        async with http.client.stream("GET", "/v1/campaigns/990/events") as r:
            events = Events(r)
            assert (await events.next())[0] == "stats"
            await send_and_flush(
                raw, ["incs", [[990, 7, "register", area, True] for area in areas]]
            )
            quorums: list[str] = []
            while len(quorums) < 27:
                try:
                    event, data = await events.next(within=5)
                except (EOFError, TimeoutError, httpx.HTTPError) as exc:
                    raise AssertionError(
                        f"the stream ended after {len(quorums)} of 27 quorum events "
                        f"(dropped as slow: {http.app.hub.counters.dropped_slow})"
                    ) from exc
                if event == "quorum":
                    quorums.append(str(data["area"]))
            assert sorted(quorums) == sorted(areas)
        assert http.app.hub.counters.dropped_slow == 0
    finally:
        await raw.close()


# -- first sight --------------------------------------------------------------------------------


async def test_goals_set_for_a_campaign_created_later_fire_when_it_appears_after_a_restart(
    signatures: Signatures, services: Callable[..., StatsService], tmp_path: Path
) -> None:
    """An organiser sets goals [2, 4] for campaign 3 before it exists in the database (no row,
    no supporters), and the server stops cleanly: the snapshot holds the goals. The campaign is
    created and gets 5 supporters while the server is down. At the next start the first
    calculation "baselines" campaign 3 silently, because it has no row in the snapshot's counts,
    although the server has a record of it (its goals, in the snapshot): thresholds set as goals
    and crossed for the first time never fire. A campaign whose goals the server holds is not
    unknown; 2 and 4 should fire once each, as they would had the server not restarted."""
    snapshot = tmp_path / "stats.snapshot"
    service = services(snapshot_path=snapshot)
    await service.start()
    await wait_for(lambda: loaded(service))
    await service.set_goals(3, [2, 4], None)
    await service.stop()
    conn = signatures.conn
    await conn.execute("INSERT INTO campaigns (id, name, status) VALUES (3, 'three', 1)")
    await conn.execute(
        "INSERT INTO action_pages (id, name, campaign_id, org_id) VALUES (3, 'p3', 3, 1)"
    )
    await signatures.add(3, 5)  # while the server is down
    again = services(snapshot_path=snapshot)
    await again.start()
    await wait_for(lambda: loaded(again))
    await again.flush()
    goals = await again.get_goals(3)
    assert goals["reached"] == [2, 4]
    assert (await again.info())["goals"]["fired"] == 2, "reached silently: never fired"


async def test_a_milestone_crossed_while_a_killed_server_was_down_is_delivered_after_restart(
    module_dsn: str,
    tmp_path: Path,
    receiver: Receiver,
    signatures: Signatures,
    servers: list[Server],
) -> None:
    """Campaign 1 fires milestone 2 (delivered to the webhook), then the server is killed
    (``kill -9``: no snapshot). While it is down the campaign passes 4 in the database. At the
    restart the outbox is replayed (the goals and "2 reached" come back), but the first full
    calculation treats campaign 1 as never seen and records 4 as reached silently: the webhook
    never gets 4, a threshold lost rather than delivered once. The outbox is a record of the
    campaign: it should be checked, not baselined, and 4 delivered once."""
    await receiver.start()
    server = Server(module_dsn, tmp_path / "stats.snapshot", f"http://127.0.0.1:{receiver.port}/h")
    servers.append(server)
    await server.start()
    raw = await server.client()
    await server.wait_loaded(raw)
    assert (await raw.call("set_goals", 3, 1, {"supporters": [2, 4]}))[0] == "ok"
    for inc in await signatures.add(1, 2):
        await raw.send(["inc", *inc[:7]])
    assert (await raw.call("flush", 4))[0] == "ok"
    await wait_for(lambda: receiver.thresholds() == [2], timeout=30)

    async def acknowledged() -> bool:  # the delivery is in the outbox: 2 is not owed again
        return bool((await raw.call("info", 9))[2]["goals"]["webhooks"]["pending"] == 0)

    await wait_for(acknowledged, timeout=10)
    await raw.close()
    await server.stop(signal.SIGKILL)
    await signatures.add(1, 3)  # 5 supporters: 4 is crossed while the server is down
    await server.start()
    raw = await server.client()
    await server.wait_loaded(raw)
    assert (await raw.call("get_goals", 5, 1))[2]["reached"] == [2, 4]
    await asyncio.sleep(3)  # the sender's retries are at most 2 s apart (--webhook-retry-max)
    assert sorted(set(receiver.thresholds())) == [2, 4], (
        "4 was recorded as reached and never delivered"
    )
    await raw.close()
    await server.stop()


# -- webhooks -----------------------------------------------------------------------------------

_MILESTONE = {
    "type": "milestone",
    "metric": "supporters",
    "threshold": 100,
    "value": 100,
    "at": 1.0,
}


class _Trickler:
    """A receiver that reads the POST, then answers one header line every 0.3 s, forever."""

    def __init__(self) -> None:
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.decode("latin-1").split("\r\n"):
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\n")
            while True:
                await writer.drain()
                await asyncio.sleep(0.3)
                writer.write(b"X-Slow: a\r\n")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in self.writers:
                writer.close()
            await self.server.wait_closed()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_receiver_that_trickles_its_answer_is_timed_out_and_retried(
    tmp_path: Path,
) -> None:
    """docs/design.md, "Webhooks": a failure is "not 2xx, a refused connection, a timeout of
    10 s" (``WebhookConfig.timeout``: "seconds per POST"). httpx's timeout is per socket read,
    not per request: a receiver (or a proxy in front of it) that answers one header line every
    0.3 s never trips a 1 s timeout, and the webhook's worker waits on that one POST forever;
    every later event for that webhook waits behind it, and nothing is counted as failed. The
    POST should be abandoned after ``timeout`` seconds in all, counted as failed and retried
    (an overall deadline, e.g. ``asyncio.timeout`` around the POST)."""
    from campaignstats.webhooks import Outbox, WebhookConfig, WebhookSender

    trickler = _Trickler()
    await trickler.start()
    url = f"http://127.0.0.1:{trickler.port}/h"
    outbox = Outbox(tmp_path / "goals.events", (url,))
    sender = WebhookSender(
        outbox, WebhookConfig((url,), None, timeout=1.0, backoff_initial=0.1, backoff_max=0.2)
    )
    task = asyncio.create_task(sender.run())
    try:
        outbox.fire([(1, _MILESTONE)])
        await asyncio.sleep(6)
        assert outbox.counters.failed >= 1, "after 6 s the 1 s POST has not timed out"
        assert trickler.connections >= 2, "the POST was never retried"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await trickler.stop()
        outbox.close()
        gc.collect()  # sockets cut mid-answer: their warnings belong to this test


class _Streamer:
    """A receiver that answers 200 at once, then a chunked body of 64 KiB chunks, without end
    (up to ``limit`` bytes, so that the test cannot eat the machine)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sent = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        chunk = b"%x\r\n" % 65536 + b"x" * 65536 + b"\r\n"
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            while self.sent < self.limit:
                writer.write(chunk)
                self.sent += 65536
                await writer.drain()
                await asyncio.sleep(0.002)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in self.writers:
                writer.close()
            await self.server.wait_closed()


def _rss() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_receiver_that_answers_200_with_an_endless_body_is_delivered_not_buffered(
    tmp_path: Path,
) -> None:
    """The sender awaits ``client.post(...)``, which reads the whole response body into memory
    before it looks at the status. A receiver (or a misconfigured proxy) that answers ``200 OK``
    and then streams a body without end is never marked delivered (the POST never returns, the
    timeout being per read), and the server's memory grows with every byte it sends, on the
    process that holds every campaign's counts. The status line decides a delivery: the sender
    should stop at the headers (``client.stream`` and close, or a small cap on the body) and
    mark the event delivered."""
    from campaignstats.webhooks import Outbox, WebhookConfig, WebhookSender

    streamer = _Streamer(limit=400 << 20)
    await streamer.start()
    url = f"http://127.0.0.1:{streamer.port}/h"
    outbox = Outbox(tmp_path / "goals.events", (url,))
    sender = WebhookSender(outbox, WebhookConfig((url,), None, timeout=1.0))
    before = _rss()
    task = asyncio.create_task(sender.run())
    try:
        outbox.fire([(1, _MILESTONE)])
        await asyncio.sleep(3)
        grown = _rss() - before
        assert outbox.counters.delivered == 1, (
            f"not delivered after 3 s of a 200 answer; {streamer.sent >> 20} MiB of body sent, "
            f"the process grew by {grown >> 20} MiB"
        )
        assert grown < 50 << 20, f"the process grew by {grown >> 20} MiB"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await streamer.stop()
        outbox.close()
        gc.collect()  # sockets cut mid-answer: their warnings belong to this test


class _LoggedServer(Server):
    """A real ``campaignstats serve`` whose log (stderr) lines are kept."""

    lines: list[str]

    async def start(self, stderr: int = asyncio.subprocess.PIPE) -> None:
        await super().start(stderr)
        self._logs = asyncio.create_task(self._read_logs())

    async def _read_logs(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode(errors="replace"))


async def test_the_password_in_a_webhook_url_is_not_written_to_the_logs(
    module_dsn: str,
    tmp_path: Path,
    receiver: Receiver,
    signatures: Signatures,
    servers: list[Server],
) -> None:
    """A webhook URL often carries its credential: ``https://user:password@host/...`` (httpx
    sends it as Basic auth, and the receiver needs it). The sender logs the whole URL at info
    level on every delivery (``webhook.delivered url=...``) and on every failure, so the
    password ends up in the journal and in whatever collects the logs. URLs should be logged
    with the userinfo (and the query) redacted, e.g. ``http://user:***@127.0.0.1:PORT/h``."""
    await receiver.start()
    password = "hunter2-s3cr3t-pw"
    hook = f"http://hookuser:{password}@127.0.0.1:{receiver.port}/h"
    server = _LoggedServer(module_dsn, tmp_path / "stats.snapshot", hook)
    server.lines = []
    servers.append(server)
    await server.start()
    raw = await server.client()
    await server.wait_loaded(raw)
    assert (await raw.call("set_goals", 3, 1, {"supporters": [2]}))[0] == "ok"
    for inc in await signatures.add(1, 2):
        await raw.send(["inc", *inc[:7]])
    assert (await raw.call("flush", 4))[0] == "ok"
    await wait_for(lambda: receiver.thresholds() == [2], timeout=30)
    assert receiver.delivered()[0].headers["authorization"].startswith("Basic ")
    await raw.close()
    await server.stop()
    leaked = [line.strip() for line in server.lines if password in line]
    assert leaked == [], f"the webhook password is in the logs: {leaked[:2]}"


def test_one_webhook_down_does_not_make_the_others_deliveries_quadratic(tmp_path: Path) -> None:
    """With two webhooks and one of them down for a while, the events owed only to the down
    one stay at the front of ``Outbox.owed``; ``next_for(url)`` scans the whole dict from the
    start for every delivery to the healthy one, so delivering n events costs O(n^2) on the
    event loop that the actor shares (20,000 events: 7 to 10 s here, single calls over 10 ms;
    100,000 would be minutes). It should cost O(1) per delivery (a queue of the owed events
    per webhook, or an index). Counted in lines of the webhooks' code run, not in seconds:
    16 times the events must cost about 16 times the lines, not 256 times."""
    import campaignstats.webhooks
    from campaignstats.webhooks import Outbox

    up, down = "http://127.0.0.1:9/up", "http://127.0.0.1:9/down"
    code = Path(campaignstats.webhooks.__file__)

    def deliver_all(n: int) -> int:
        outbox = Outbox(tmp_path / f"goals-{n}.events", (up, down))
        try:
            outbox.fire([(cid, _MILESTONE) for cid in range(1, n + 1)])

            def to_the_healthy_one() -> int:
                delivered = 0
                while (owed := outbox.next_for(up)) is not None:
                    outbox.delivered(owed, up)
                    delivered += 1
                return delivered

            delivered, lines = lines_run(code, to_the_healthy_one)
        finally:
            outbox.close()
        assert delivered == n
        return lines

    small, large = deliver_all(500), deliver_all(8_000)
    assert large / small < 40, (small, large)


# -- replicas -----------------------------------------------------------------------------------


async def test_the_routing_client_sets_goals_on_every_replica_of_the_campaigns_shard(
    start: Start,
) -> None:
    """docs/design.md, "Webhooks": replicas "each reach the same goals and each deliver them:
    the event id is the same on every server", which holds only when every replica has the
    campaign's goals. The routing clients (the way a backend talks to replicas and shards) have
    no ``set_goals`` and no ``get_goals`` at all: goals can only be set one server at a time,
    by hand, and a replica that is missed keeps the default ladder and fires other milestones
    than its peer (or none). ``AsyncRoutingClient.set_goals`` (and the blocking one) should set
    them on every replica of the owner shard, and ``get_goals`` read them from the owner."""
    from campaignstats.client import AsyncRoutingClient
    from campaignstats.client.aio import AsyncStatsClient

    a, b = await start(), await start()
    urls = [f"unix://{a.unix}", f"unix://{b.unix}"]
    async with AsyncRoutingClient([urls]) as routing:
        set_goals = getattr(routing, "set_goals", None)
        assert set_goals is not None, "AsyncRoutingClient has no set_goals"
        await set_goals(1, [2, 4], {"DE": 3})
        for url in urls:
            async with AsyncStatsClient(url) as one:
                goals = await one.get_goals(1)
                assert (goals["supporters"], goals["area"]) == ([2, 4], {"DE": 3}), url


# -- bad input ----------------------------------------------------------------------------------


async def test_one_bad_campaign_id_given_to_set_goals_does_not_lose_every_campaigns_goals(
    services: Callable[..., StatsService], tmp_path: Path
) -> None:
    """The embedding API's ``StatsService.set_goals`` checks the goals but not the campaign id:
    ``set_goals(0, [7])`` is accepted (the wire refuses id 0 with ``bad_message``) and kept. At
    stop the snapshot's goals part holds campaign 0; at the next start ``GoalKeeper.load_snapshot``
    refuses the id and the actor drops the whole goals part (``snapshot.goals_unreadable``):
    every campaign's goals and quorums are silently back to the default ladder and none. The
    call should raise ``Invalid``/``BadMessage`` as on the wire (``set_goals_request`` checking the
    id), and a bad entry in a snapshot should cost that entry, not every campaign's goals."""
    snapshot = tmp_path / "stats.snapshot"
    service = services(snapshot_path=snapshot)
    await service.start()
    await wait_for(lambda: loaded(service))
    await service.set_goals(1, [2, 4], {"DE": 3})
    refused = None
    try:
        await service.set_goals(0, [7])
    except Exception as exc:  # what should happen: refused, like on the wire
        refused = exc
    await service.stop()
    again = services(snapshot_path=snapshot)
    await again.start()
    await wait_for(lambda: loaded(again))
    goals = await again.get_goals(1)
    assert (goals["supporters"], goals["area"]) == ([2, 4], {"DE": 3}), (
        f"campaign 1's goals were lost at the restart (set_goals(0) refused: {refused!r})"
    )
    assert refused is not None, "set_goals accepted campaign id 0"
