"""Review of replicas and shards (docs/scale.md): each test here failed when it was written.

Real sockets, real servers (in this process, as tests/test_shards.py does), the routing clients
as a backend uses them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg

from campaignstats.actor.actor import ActorConfig
from campaignstats.client import AsyncStatsClient, ServerUnavailable
from campaignstats.client.routing import AsyncRoutingClient, RoutingClient
from campaignstats.db.source import PostgresSource
from campaignstats.errors import BadMessage, Invalid
from campaignstats.model import Increment
from campaignstats.server import ServerConfig, StatsServer
from campaignstats.service import StatsService
from campaignstats.shards import Shard, shard_of

from .helpers import Raw, Running, Start, loaded, wait_for

# campaign ids that no database row holds (their counts are the servers' memory only)
ON_0, ON_1 = 8, 6  # shard_of(8, 2) == 0, shard_of(6, 2) == 1: the lower id on shard 1
assert (shard_of(ON_0, 2), shard_of(ON_1, 2)) == (0, 1)
LONE = 777


@contextlib.asynccontextmanager
async def hung_replicas(where: Path, n: int) -> AsyncIterator[list[str]]:
    """Replicas that accept connections and never answer (a stopped process, a partition)."""
    held: list[asyncio.StreamWriter] = []
    stop = asyncio.Event()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await stop.wait()
        writer.close()

    paths = [where / f"hung{i}.sock" for i in range(n)]
    servers = [await asyncio.start_unix_server(hang, str(path)) for path in paths]
    try:
        yield [f"unix://{path}" for path in paths]
    finally:
        stop.set()
        for server in servers:
            server.close()
        await asyncio.sleep(0.1)


# -- the journal -------------------------------------------------------------------------------


async def test_a_replica_restarted_before_the_next_acknowledgement_loses_the_unacked_increments(
    start: Start, module_dsn: str
) -> None:
    """A replica that dies and comes back at the same address (systemd's Restart=, a container
    restarted) before the client's next acknowledging flush: the single client reconnects on
    its own, the routing client's ``flush`` then comes back from the *new* incarnation, and the
    journal is acknowledged, although the increments lived only in the memory of the one that
    died. They are lost for good, while docs/scale.md says that "nothing unacknowledged is
    lost when a replica dies" and that a flush acknowledges "everything before it applied".

    Should: an acknowledgement count only when the flush came back on the connection that
    carried the journaled changes (the routing client can compare the single client's
    ``connections``/``dropped`` before and after, or the single client can expose a connection
    generation); otherwise the journal is given again, as at a failover. The window is
    ``ack_interval`` (0.25 s by default; long here so that the test is deterministic)."""
    first = await start()
    url = f"unix://{first.unix}"
    again: list[tuple[StatsService, StatsServer]] = []
    try:
        async with AsyncRoutingClient([url], ack_interval=3600) as routing:
            for _ in range(5):
                routing.increment(LONE, 1, "register", "DE", True)

            async def applied() -> bool:
                return (await routing.stats(LONE))["supporters"] == 5

            await wait_for(applied)
            # the replica dies and its supervisor starts it again, at the same address
            await first.server.close()
            await first.service.stop()
            service = StatsService(PostgresSource(module_dsn), ActorConfig(sync_interval=3600))
            await service.start()
            await wait_for(lambda: loaded(service))
            server = StatsServer(service, ServerConfig(port=0, unix_path=first.unix))
            await server.start()
            again.append((service, server))

            await routing.flush()  # "every shard has applied everything given to it"
            assert routing.statistics().unacked == 0
            assert (await routing.stats(LONE))["supporters"] == 5, (
                "the journal was acknowledged by a replica that never got it"
            )
    finally:
        for service, server in again:
            await server.close()
            await service.stop()


async def test_the_blocking_client_discards_unprotected_increments_never_sent_at_a_failover(
    start: Start, tmp_path: Path
) -> None:
    """With ``max_unacked`` below the queue size, docs/scale.md says what a full journal
    forgets is "still sent, only not re-sent at a failover". But ``_Shard.fail_over`` clears
    the failed client's whole queue (``failed._queue.clear()``), increments that were never
    written anywhere included (the first replica never accepted a connection): 40 of 50
    increments vanish, neither counted by the live replica nor counted as ``dropped``.

    Should: at a failover, move what the failed client still holds unsent to the next client
    (and re-give only the journaled entries that were not in its queue), or at least count
    what is discarded in ``dropped``."""
    running = await start()
    dead = f"unix://{tmp_path / 'nobody-listens.sock'}"
    live = f"unix://{running.unix}"

    def blocking() -> tuple[int, Any]:
        with RoutingClient([dead, live], connect_timeout=1, max_unacked=10) as routing:
            routing.increment_many([Increment(LONE, 1, "register", "DE", True)] * 50)
            routing.flush()
            return routing.stats(LONE)["supporters"], routing.statistics()

    supporters, stats = await asyncio.to_thread(blocking)
    assert stats.failovers == 1
    assert supporters + stats.dropped == 50, (
        f"{supporters} counted, {stats.dropped} dropped, {stats.unprotected} unprotected: "
        f"{50 - supporters - stats.dropped} increments vanished without a trace"
    )


async def test_a_metrics_update_queued_for_a_dead_replica_is_silently_thrown_away_at_failover(
    start: Start, tmp_path: Path
) -> None:
    """Custom metrics are "routed but not journaled" (docs/scale.md), so a failover cannot
    re-send them; but one that was never sent (the replica was down all along) is still in
    the failed client's queue, and ``_Shard.fail_over`` clears that queue: the update is lost,
    and nothing counts it (``dropped`` stays 0). A backend that calls ``metric()`` then
    ``flush()`` gets a successful flush and no update anywhere.

    Should: move the failed client's unsent metrics updates (those still queued, never
    written) to the next replica's client, or count them as dropped."""
    running = await start()
    dead = f"unix://{tmp_path / 'nobody-listens.sock'}"
    live = f"unix://{running.unix}"

    def blocking() -> tuple[dict[str, Any], Any]:
        with RoutingClient([dead, live], connect_timeout=1) as routing:
            routing.metric(LONE, incr={"views": 1})
            routing.flush()  # fails over to the live replica, and returns: "applied"
            return routing.metrics(LONE), routing.statistics()

    metrics, stats = await asyncio.to_thread(blocking)
    assert stats.failovers == 1
    # a counter's value is under "counters" (docs/metrics.md, "Reading them")
    views = metrics.get("total", {}).get("counters", {}).get("views")
    assert views == 1 or stats.dropped == 1, (
        f"the update was neither applied ({metrics}) nor counted as dropped ({stats.dropped})"
    )


# -- closing the asyncio front -----------------------------------------------------------------


async def test_closing_the_async_routing_client_leaves_its_acknowledging_task_running(
    server: Running,
) -> None:
    """``AsyncRoutingClient.close()`` cancels the acknowledging task, then flushes; the flush
    goes through ``_on_shard``, which calls ``_start()``, which sees no task and ``_closed``
    still False, and creates a new one. That task outlives the client: it wakes every
    ``ack_interval`` forever, and when a journal is left (a replica down at close) it calls
    ``_on_shard`` on the closed client every time and logs ``client.acknowledge_failed`` with
    ClientClosed's traceback, four times a second, until the loop ends ("Task was destroyed
    but it is pending").

    Should: no acknowledging task after ``close()`` (mark the client closing before the final
    flush, or let ``_on_shard`` not start the task then)."""
    async with AsyncRoutingClient([f"unix://{server.unix}"]) as routing:
        routing.increment(LONE, 1, "register", "DE", True)
    await asyncio.sleep(0.05)
    left = [
        t
        for t in asyncio.all_tasks()
        if t.get_name() == "campaignstats-routing-acks" and not t.done()
    ]
    for task in left:  # this test's own cleanup
        task.cancel()
    assert left == [], "an acknowledging task still runs after close()"


async def test_closing_the_async_routing_client_raises_timeout_when_replicas_hang(
    tmp_path: Path,
) -> None:
    """``AsyncRoutingClient.close()`` wraps its last flush in ``asyncio.wait_for(..., 2.0)``
    and suppresses only ``ServerUnavailable``, ``CallTimeout`` and ``ConnectionError``; the
    ``TimeoutError`` of ``wait_for`` is none of them. With replicas that accept connections
    and do not answer (a stopped process, a partition: two of them take 2 x 2 s of
    ``connect_timeout``), ``close()`` raises TimeoutError out of ``async with``, and the
    client is left half closed: ``_closed`` is still False, no replica client is closed, and
    calls are still accepted.

    Should: ``close()`` never raise because servers are slow or gone (as the single clients'
    ``close()`` promises); suppress the timeout too, then close every client."""
    async with hung_replicas(tmp_path, 2) as urls:
        routing = AsyncRoutingClient(urls)
        routing.increment(LONE, 1, "register", "DE", True)
        try:
            async with asyncio.timeout(20):
                await routing.close()
        except TimeoutError as exc:
            raise AssertionError(f"close() raised {exc!r}") from exc
        finally:
            routing._closed = True  # this test's own cleanup (close() may have left it open)
            for task in asyncio.all_tasks():
                if task.get_name() == "campaignstats-routing-acks":
                    task.cancel()
            for shard in routing._shards:
                await shard.client.close(timeout=0)


# -- what a shard serves -----------------------------------------------------------------------


async def test_a_shard_started_with_an_unsharded_snapshot_puts_foreign_campaigns_in_top(
    start: Start, tmp_path: Path, module_dsn: str, conn: asyncpg.Connection
) -> None:
    """A shard started with the snapshot of the server it replaces (the move from one server
    to two, or from N to N+1 shards) loads every campaign of the file: ``replace_all`` is not
    restricted to the shard, and no calculation removes a campaign it does not cover. The
    foreign campaigns are then served: each shard's ``top`` lists them, so the routing
    client's merged ``top`` names campaign 6 twice, and ``info`` counts them. docs/scale.md
    says they would be "refused and never served".

    Should: the actor restrict a loaded snapshot to the shard (``ShardFilter.owned`` on its
    campaigns, timelines and goals) as the calculation's result already is
    (``ShardFilter.restrict``)."""
    snapshot = tmp_path / "whole.snapshot"
    whole = await start(ActorConfig(sync_interval=3600, snapshot_path=snapshot))
    async with AsyncStatsClient(f"unix://{whole.unix}") as client:
        for _ in range(3):
            client.increment(ON_1, 1, "register", "DE", True)
        client.increment(ON_0, 1, "register", "DE", True)
        await client.flush()
    await whole.server.close()
    await whole.service.stop()  # writes the snapshot
    assert snapshot.exists()
    copies = [tmp_path / f"shard{k}.snapshot" for k in (0, 1)]
    for copy in copies:
        shutil.copy(snapshot, copy)
    # A start-up calculation of the database forgets the campaigns it does not find
    # (``calculation.campaigns_gone``), the foreign ones included: what a shard serves until it
    # ends is what its snapshot gave it. The calculation is held here by a lock on the tables.
    started: list[tuple[StatsService, StatsServer]] = []
    try:
        async with conn.transaction():
            await conn.execute(
                "LOCK TABLE campaigns, actions, supporters, action_pages IN ACCESS EXCLUSIVE MODE"
            )
            for k in (0, 1):
                service = StatsService(
                    PostgresSource(module_dsn),
                    ActorConfig(sync_interval=3600, snapshot_path=copies[k], shard=Shard(k, 2)),
                )
                await service.start()
                server = StatsServer(
                    service, ServerConfig(port=0, unix_path=tmp_path / f"shard{k}.sock")
                )
                await server.start()
                started.append((service, server))
            topology = [[f"unix://{tmp_path / f'shard{k}.sock'}"] for k in (0, 1)]
            async with AsyncRoutingClient(topology) as r:
                assert await r.stats_many([ON_0, ON_1]) == {
                    ON_0: (await r.stats(ON_0)),
                    ON_1: (await r.stats(ON_1)),
                }
                top = await r.top("supporters", 10)
                infos = await r.info()
    finally:
        for service, server in started:
            await server.close()
            await service.stop()
    assert top == [[ON_1, 3], [ON_0, 1]], f"merged top {top}"
    assert [i["campaigns"] for i in infos] == [1, 1]


async def test_the_merged_top_breaks_ties_by_shard_order_not_by_campaign_id(start: Start) -> None:
    """An unsharded server orders ``top`` ties by the lower campaign id first
    (``SupporterRanking``'s heap of ``(-value, campaign_id)``, ``ranking.leaders``); the
    routing client's ``_merge_top`` merges by value alone, so on a tie the shard listed first
    wins. With campaigns 6 (shard 1) and 8 (shard 0) at one supporter each, the unsharded
    server's ``top(limit=1)`` is campaign 6 and the shard pair's is campaign 8: not the same
    leaders, although a shard pair is meant to answer as one server.

    Should: merge by ``(-value, campaign_id)`` (``heapq.merge(..., key=lambda p: (-p[1],
    p[0]))``)."""
    whole = await start()
    shard0 = await start(ActorConfig(sync_interval=3600, shard=Shard(0, 2)))
    shard1 = await start(ActorConfig(sync_interval=3600, shard=Shard(1, 2)))
    async with (
        AsyncStatsClient(f"unix://{whole.unix}") as single,
        AsyncRoutingClient([[f"unix://{shard0.unix}"], [f"unix://{shard1.unix}"]]) as routing,
    ):
        for cid in (ON_0, ON_1):
            single.increment(cid, 1, "register", "DE", True)
            routing.increment(cid, 1, "register", "DE", True)
        await single.flush()
        await routing.flush()
        assert await single.top("supporters", 2) == [[ON_1, 1], [ON_0, 1]]
        assert await routing.top("supporters", 1) == await single.top("supporters", 1)
        assert await routing.top("supporters", 2) == await single.top("supporters", 2)


# -- the routing clients' calls ----------------------------------------------------------------


async def test_the_routing_clients_lack_the_goals_metrics_guard_and_decrement_many_calls(
    start: Start,
) -> None:
    """``RoutingClient`` says it has "the calls of StatsClient" (and ``AsyncRoutingClient``
    those of ``AsyncStatsClient``), but it has no ``set_goals``, ``get_goals``,
    ``reset_metrics``, ``set_guard``, ``ping`` or ``decrement_many``. On a sharded
    deployment there is then no way to set a campaign's goals or guards from a backend but to
    compute the owner by hand and open a single client to it (any other shard answers an
    ``invalid`` error naming the owner): the widget's ``goal="auto"`` and the webhooks depend
    on them.

    Should: route them like the other per-campaign calls (``_on_shard(self._owner(cid),
    ...)``), and ``decrement_many`` like ``increment_many`` (journaled as decrements)."""
    shard0 = await start(ActorConfig(sync_interval=3600, shard=Shard(0, 2)))
    shard1 = await start(ActorConfig(sync_interval=3600, shard=Shard(1, 2)))
    topology = [[f"unix://{shard0.unix}"], [f"unix://{shard1.unix}"]]

    def blocking() -> list[str]:
        with RoutingClient(topology) as routing:
            missing = [
                name
                for name in (
                    "set_goals",
                    "get_goals",
                    "reset_metrics",
                    "set_guard",
                    "ping",
                    "decrement_many",
                )
                if not hasattr(routing, name)
            ]
            if not missing:
                for cid in (ON_0, ON_1):
                    routing.set_goals(cid, [5, 10])  # type: ignore[attr-defined]
                    assert routing.get_goals(cid)["supporters"] == [5, 10]  # type: ignore[attr-defined]
            return missing

    assert await asyncio.to_thread(blocking) == []
    async with AsyncRoutingClient(topology) as routing:
        missing = [
            name
            for name in ("set_goals", "get_goals", "reset_metrics", "set_guard", "ping")
            if not hasattr(routing, name)
        ]
        assert missing == []


async def test_closing_the_blocking_routing_client_with_hung_replicas_overruns_its_budget(
    tmp_path: Path,
) -> None:
    """``RoutingClient.close()`` gives its last acknowledgement a 2 s budget ("briefly"), but
    the budget is only looked at before each shard: first it joins the acknowledging thread
    for up to 5 s (busy on the hung replicas), then one ``_acknowledge`` tries every replica
    with the full call and connect timeouts. With two replicas that accept and never answer,
    a web worker's shutdown (``atexit``, a request's ``with``) blocks for many seconds.

    Should: one deadline for the whole of ``close()`` (the ack thread stopped without waiting
    for its flush, each replica's flush given only what is left of the 2 s), as the single
    clients' ``close()`` does with its ``close_timeout``."""
    async with hung_replicas(tmp_path, 2) as urls:

        def blocking() -> float:
            routing = RoutingClient(urls)
            routing.increment(LONE, 1, "register", "DE", True)
            time.sleep(0.4)  # the acknowledging thread is at work
            began = time.monotonic()
            routing.close()
            return time.monotonic() - began

        took = await asyncio.to_thread(blocking)
    assert took < 4.0, f"close() took {took:.1f} s"


async def test_a_topology_in_the_wrong_order_acknowledges_increments_every_shard_refused(
    start: Start,
) -> None:
    """Shards listed in the wrong order (a configuration mistake, or N changed on the servers
    and not in one backend): every increment goes to a shard that refuses it, item by item,
    with an ``invalid`` error nobody waits for; ``flush()`` then returns and the journal is
    acknowledged (``unacked`` 0, ``acknowledged`` 2), so the increments are gone without an
    exception, only a rate-limited warning and ``server_errors``. Each server says which
    shard it is in its ``hello`` (``"shard": [K, N]``), and the routing client ignores it.

    Should: check each replica's ``hello`` shard against its place in the topology (and N
    against the topology's length) and refuse to use it (``flush`` and calls raise, nothing is
    acknowledged), so that the mistake shows before any increment is lost."""
    shard0 = await start(ActorConfig(sync_interval=3600, shard=Shard(0, 2)))
    shard1 = await start(ActorConfig(sync_interval=3600, shard=Shard(1, 2)))
    swapped = [[f"unix://{shard1.unix}"], [f"unix://{shard0.unix}"]]
    async with AsyncRoutingClient(swapped) as routing:
        routing.increment(ON_0, 1, "register", "DE", True)
        routing.increment(ON_1, 1, "register", "DE", True)
        flushed = True
        try:
            await routing.flush()
        except Exception:
            flushed = False
        stats = routing.statistics()
    assert not flushed, (
        f"flush() succeeded on a topology the servers contradict; acknowledged "
        f"{stats.acknowledged} increments that {stats.server_errors} refusals threw away"
    )


async def test_a_slow_answer_on_a_shard_of_one_url_counts_every_unacked_increment_twice(
    server: Running,
) -> None:
    """A shard of one URL "fails over" to a new connection to the same server
    (docs/scale.md). The failover is also taken on ``CallTimeout``: a server that stalls
    longer than a call's timeout (a long merge step, a GC pause, a swapped page; here its
    event loop blocked for 1.5 s against a 0.5 s read) is alive and has applied the journal,
    and the whole journal is given to it again: every unacknowledged increment is counted
    twice by the only server there is. The docs' argument ("each replica then counts it once")
    needs a second replica; with one URL the "next replica" is the same one. With the default
    ``ack_interval`` the journal holds the last 0.25 s of increments (thousands at a busy
    site); it is long here so that the test knows which ones are unacknowledged.

    Should: never re-send a journal to the server that may have applied it: on a timeout,
    move to another URL if there is one, and with a single URL (or back to a replica already
    given this journal) re-send only after a reconnection that proves the server restarted
    (or not at all: what it applied, it holds)."""
    url = f"unix://{server.unix}"
    stall = threading.Event()

    async def stall_the_server_once() -> None:
        while not stall.is_set():
            await asyncio.sleep(0.01)
        time.sleep(1.5)  # noqa: ASYNC251 (on purpose: the server's loop stalls, no answer in time)

    def blocking() -> tuple[int, Any]:
        with RoutingClient([url], ack_interval=3600) as routing:
            for _ in range(5):
                routing.increment(LONE, 1, "register", "DE", True)
            deadline = time.monotonic() + 10
            while routing.stats(LONE)["supporters"] != 5 and time.monotonic() < deadline:
                time.sleep(0.02)  # applied (a read acknowledges nothing)
            stall.set()
            time.sleep(0.1)
            with contextlib.suppress(ServerUnavailable):
                routing.stats(LONE, timeout=0.5)
            routing.flush()
            return routing.stats(LONE)["supporters"], routing.statistics()

    staller = asyncio.create_task(stall_the_server_once())
    supporters, stats = await asyncio.to_thread(blocking)
    await staller
    # A shard of one URL keeps its client (which reconnects on its own) and re-sends nothing
    # to a server that answered late: no failover, nothing given twice.
    assert (stats.failovers, stats.resent) == (0, 0)
    assert supporters == 5, f"5 increments, {supporters} counted by the one server"


async def test_the_routing_client_raises_struct_error_for_an_invalid_campaign_id(
    tmp_path: Path,
) -> None:
    """The single clients raise the protocol's errors for a bad argument (``Invalid``: "ids
    must be between 1 and 2**63-1", ``BadMessage``: "must be integers"), as their docstrings
    promise. The routing client hashes the id first (``shard_of`` packs it with
    ``struct.pack(">QQ")``), so with two shards or more ``increment(-1, ...)`` raises
    ``struct.error: int too large to convert`` (for a negative number), and a string id
    ``struct.error: required argument is not an integer``: not a ``StatsError``, and a
    message that misleads. The same for ``stats``, ``increment_many``, ``metric``...

    Should: check the campaign id (``type(cid) is int and 0 < cid <= MAX_ID``) before hashing
    it, and raise the single clients' error."""
    topology = [[f"unix://{tmp_path / 'a.sock'}"], [f"unix://{tmp_path / 'b.sock'}"]]

    def blocking() -> list[str]:
        wrong = []
        with RoutingClient(topology) as routing:
            for bad in (-1, 2**64, "5"):
                try:
                    routing.increment(bad, 1, "register")  # type: ignore[arg-type]
                except (Invalid, BadMessage):
                    continue
                except Exception as exc:
                    wrong.append(f"increment({bad!r}): {type(exc).__name__}: {exc}")
                else:
                    wrong.append(f"increment({bad!r}) accepted")
        return wrong

    assert await asyncio.to_thread(blocking) == []


async def test_a_blocking_routing_client_inherited_by_a_forked_worker_never_acknowledges(
    server: Running,
) -> None:
    """A ``RoutingClient`` made before a fork (gunicorn ``--preload``, a Celery prefork
    worker, a module-level client in Django settings) has its acknowledging thread in the
    parent only; in the child ``_acker`` is still set, so ``_start()`` never starts one. The
    child's journal is never acknowledged: ``unacked`` climbs to ``max_unacked``, then every
    increment is "unprotected", and the parent's unacknowledged journal, copied into the child,
    is re-sent by the child at its first failover (counted twice). The single clients handle
    the fork (``os.register_at_fork``: "The queued increments are the parent's to send");
    the routing layer above them does not. Its shard locks may also be held at the fork.

    Should: register an after-fork hook for routing clients too: new locks, an empty journal
    and counters, no acknowledging thread (started again by the first call)."""
    url = f"unix://{server.unix}"

    def blocking() -> str:
        routing = RoutingClient([url], ack_interval=0.05)
        try:
            routing.increment(LONE, 1, "register", "DE", True)  # the parent's thread starts
            routing.flush()
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the worker
                try:
                    for _ in range(5):
                        routing.increment(LONE, 1, "register", "DE", True)
                    time.sleep(1.0)  # 20 acknowledgement intervals
                    stats = routing.statistics()
                    os.write(write, f"{stats.unacked} {stats.acknowledged}".encode())
                finally:
                    os._exit(0)
            os.close(write)
            with os.fdopen(read) as pipe:
                answer = pipe.read()
            os.waitpid(pid, 0)
            return answer
        finally:
            routing.close()

    unacked, acknowledged = (int(n) for n in (await asyncio.to_thread(blocking)).split())
    assert unacked == 0, (
        f"the worker's 5 increments are still unacknowledged after 1 s ({acknowledged} "
        f"acknowledged, the parent's)"
    )


async def test_a_replica_refusing_connections_as_overloaded_is_not_failed_over_from(
    start: Start,
) -> None:
    """A replica at its ``max_connections`` answers every new connection with ``overloaded``
    and closes it (docs/protocol.md, "Errors"): it cannot serve this client, the very case
    replicas are for. ``_on_shard`` fails over only on ``ServerUnavailable``, ``CallTimeout``
    and ``ConnectionError``, so the hello's ``Overloaded`` goes straight to the caller while
    the second replica is idle; the acknowledging flush fails the same way (logged as
    ``client.acknowledge_failed`` every interval) and the journal is never handed on.

    Should: treat a refusal at connection time (``Overloaded`` from the hello, and the
    ``internal`` error of an actor that is restarting) as "this replica is not there" and
    try the next one."""
    crowded = await start(max_connections=1)
    other = await start()
    hog = await Raw.unix(crowded.unix)  # the crowded replica's one connection
    try:
        await hog.call("ping", 1)
        async with AsyncRoutingClient(
            [f"unix://{crowded.unix}", f"unix://{other.unix}"]
        ) as routing:
            routing.increment(LONE, 1, "register", "DE", True)
            await routing.flush()
            assert (await routing.stats(LONE))["supporters"] == 1
            assert routing.statistics().replicas == [f"unix://{other.unix}"]
    finally:
        await hog.close()


async def test_max_unacked_zero_makes_every_increment_raise_index_error(server: Running) -> None:
    """``max_unacked=0`` is the natural way to say "no journal" (the single clients' at most
    once, for a backend whose replicas follow the database and that sends nothing the
    database lacks: docs/scale.md advises exactly that). ``_Shard.put`` pops the oldest entry
    when ``len(journal) >= max_unacked``, from an empty journal: ``increment()`` raises
    ``IndexError: pop from an empty deque`` (after having queued the increment), although it
    "never raises because a server is down" and nothing is wrong with the arguments.

    Should: refuse a negative ``max_unacked`` in the constructor (``UsageError``) and take 0
    as "journal nothing" (count each as unprotected, or skip the journal)."""
    url = f"unix://{server.unix}"

    def blocking() -> int:
        with RoutingClient([url], max_unacked=0) as routing:
            routing.increment(LONE, 1, "register", "DE", True)
            routing.flush()
            return int(routing.stats(LONE)["supporters"])

    assert await asyncio.to_thread(blocking) == 1
