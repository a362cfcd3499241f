"""The real actor against the embedded Postgres: loading, racing increments, crashes, snapshots."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest

from campaignstats.actor.actor import ActorConfig
from campaignstats.actor.mailbox import Mailbox
from campaignstats.actor.messages import Ask, Message, Tell
from campaignstats.actor.supervisor import SupervisorGaveUp
from campaignstats.db.demo import fill_demo
from campaignstats.db.source import PostgresSource
from campaignstats.errors import ActorStopped, BadMessage, InternalError, Invalid, Overloaded
from campaignstats.model import CampaignStats, Increment
from campaignstats.requests import Increments, Stats
from campaignstats.service import StatsService

from .conftest import truncate_all
from .helpers import completed, loaded, memory_of, wait_for
from .recount import recount


@pytest.fixture
async def service_factory(module_dsn: str) -> AsyncIterator[Callable[..., StatsService]]:
    started: list[StatsService] = []

    def make(config: ActorConfig | None = None, **options: object) -> StatsService:
        service = StatsService(PostgresSource(module_dsn), config or ActorConfig(), **options)  # type: ignore[arg-type]
        started.append(service)
        return service

    yield make
    for service in started:
        await service.stop()


class World:
    """A small Proca-shaped world: one org, live campaigns 1 and 2, a page each."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.person = 0

    async def setup(self) -> None:
        await truncate_all(self.conn)
        await self.conn.execute("INSERT INTO orgs (id, name) VALUES (1, 'org')")
        await self.conn.execute(
            "INSERT INTO campaigns (id, name, status) VALUES (1, 'one', 1), (2, 'two', 1)"
        )
        await self.conn.execute(
            "INSERT INTO action_pages (id, name, campaign_id, org_id) VALUES (1, 'p1', 1, 1), "
            "(2, 'p2', 2, 1)"
        )

    async def sign(self, campaign: int, area: str | None = "DE") -> Increment:
        """A new supporter's accepted action, committed; returns the increment to announce."""
        self.person += 1
        async with self.conn.transaction():
            sid = await self.conn.fetchval(
                "INSERT INTO supporters (campaign_id, action_page_id, fingerprint, area, "
                "processing_status, dupe_rank) VALUES ($1, $1, $2, $3, 3, 0) RETURNING id",
                campaign,
                self.person.to_bytes(8, "big"),
                area,
            )
            aid = await self.conn.fetchval(
                "INSERT INTO actions (supporter_id, action_type, campaign_id, action_page_id, "
                "processing_status) VALUES ($1, 'register', $2, $2, 3) RETURNING id",
                sid,
                campaign,
            )
        return Increment(campaign, 1, "register", area, True, 1, aid)


@pytest.fixture
async def world(conn: asyncpg.Connection) -> World:
    w = World(conn)
    await w.setup()
    return w


async def test_start_loads_every_campaign_from_the_database(
    conn: asyncpg.Connection, service_factory: Callable[..., StatsService]
) -> None:
    await truncate_all(conn)
    await fill_demo(conn, actions=5_000, seed=3, progress=False)
    service = service_factory()
    await service.start()
    await wait_for(lambda: loaded(service))
    expected = await recount(conn)
    assert await memory_of(service, list(expected)) == expected
    info = await service.info()
    assert info["last_calculation"]["kind"] == "all"
    assert info["last_calculation"]["max_action_id"] == 5_000
    assert info["campaigns"] == len(expected)


async def test_increments_racing_with_calculations_end_equal_to_the_database_and_never_decrease(
    world: World, service_factory: Callable[..., StatsService]
) -> None:
    service = service_factory(ActorConfig(sync_interval=0.03))
    await service.start()
    await wait_for(lambda: loaded(service))
    seen: list[tuple[int, int]] = []
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            stats = await service.stats(1)
            seen.append((stats["supporters"], sum(stats["action"].values())))
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    # At least 300 signatures, and on until 3 calculations have completed among them (a fast
    # database signs 300 within two calculations); bounded.
    for i in range(3_000):
        inc = await world.sign(1 + i % 2, area="DE" if i % 3 else None)
        service.increment(*inc)
        if i % 20 == 0:
            await service.resync("live")
            if i >= 300 and await completed(service) >= 3:
                break
    done.set()
    await watcher
    await service.flush()
    calculations = await completed(service)
    assert calculations >= 3, "the increments did not race with calculations"
    # Exact already, before one more calculation settles everything:
    expected = await recount(world.conn)
    assert await memory_of(service, [1, 2]) == expected
    assert seen == sorted(seen), "a count went back"
    await wait_for(lambda: completed(service), timeout=5)
    await wait_for(lambda: _more(service, calculations + 1))
    assert await memory_of(service, [1, 2]) == expected
    drift = (await service.info())["last_calculation"]["drift"]
    assert drift["campaigns"] == 0


async def _more(service: StatsService, n: int) -> bool:
    return await completed(service) >= n


async def test_an_increment_announced_after_the_calculation_counted_it_is_not_counted_twice(
    world: World, service_factory: Callable[..., StatsService]
) -> None:
    service = service_factory(ActorConfig(sync_interval=3600))
    await service.start()
    await wait_for(lambda: loaded(service))
    late = await world.sign(1)  # committed, but its announcement is slow
    assert await service.resync("live")
    await wait_for(lambda: _more(service, 2))
    assert (await service.stats(1))["supporters"] == 1
    service.increment(*late)
    on_time = await world.sign(1)
    service.increment(*on_time)
    await service.flush()
    assert (await service.stats(1))["supporters"] == 2
    assert await memory_of(service, [1, 2]) == await recount(world.conn)


async def test_a_crash_is_restarted_and_loses_nothing_else_in_the_mailbox(
    world: World, service_factory: Callable[..., StatsService]
) -> None:
    def crash_on_campaign_666(msg: Message) -> None:
        if isinstance(msg, Tell) and msg.cast.items[0].campaign_id == 666:
            raise RuntimeError("injected crash")
        if isinstance(msg, Ask) and msg.request == Stats(666):
            raise RuntimeError("injected crash in a call")

    service = service_factory(ActorConfig(sync_interval=3600, fault_hook=crash_on_campaign_666))
    await service.start()
    await wait_for(lambda: loaded(service))
    before = [await world.sign(1) for _ in range(3)]
    after = [await world.sign(2) for _ in range(3)]
    # All queued in one go, so they sit in the mailbox together when the crash happens.
    for inc in before:
        service.increment(*inc)
    service.mailbox.put_nowait(Tell(Increments((Increment(666, 1, "boom"),))))
    for inc in after:
        service.increment(*inc)
    anonymous = Increment(2, 1, "share")  # no action id, not in the database: memory only
    service.increment(*anonymous)
    await service.flush()
    info = await service.info()
    assert info["restarts"] == 1
    await wait_for(lambda: loaded(service))
    memory = await memory_of(service, [1, 2])
    expected = await recount(world.conn)
    expected[2].action["share"] = 1
    assert memory == expected
    assert (await memory_of(service, [666]))[666] == CampaignStats()  # the crash was dropped
    with pytest.raises(InternalError, match="crashed"):
        await service.stats(666)
    assert (await service.info())["restarts"] == 2
    await wait_for(lambda: loaded(service))  # rebuilt from the database once more
    assert (await service.stats(1))["supporters"] == 3


async def test_too_many_crashes_in_the_window_make_the_supervisor_give_up(
    world: World, service_factory: Callable[..., StatsService]
) -> None:
    def always(msg: Message) -> None:
        if isinstance(msg, Tell):
            raise RuntimeError("injected crash")

    service = service_factory(ActorConfig(sync_interval=3600, fault_hook=always), max_restarts=2)
    await service.start()
    for _ in range(3):
        service.increment(1, 1, "register")
    with pytest.raises(SupervisorGaveUp):
        await asyncio.wait_for(service.wait(), 10)
    assert not service.running
    with pytest.raises(ActorStopped):
        await service.stats(1)


async def test_a_full_mailbox_blocks_producers_until_there_is_room() -> None:
    mailbox = Mailbox(2)
    mailbox.put_nowait(Tell(Increments(())))
    await mailbox.put(Tell(Increments(())))
    with pytest.raises(Overloaded):
        mailbox.put_nowait(Tell(Increments(())))
    producer = asyncio.create_task(mailbox.put(Tell(Increments(()))))
    await asyncio.sleep(0.05)
    assert not producer.done()
    assert mailbox.statistics().blocked_producers == 1
    assert mailbox.statistics().depth == 2
    assert await mailbox.get() is not None
    await asyncio.wait_for(producer, 1)
    assert mailbox.statistics().depth == 2
    assert mailbox.statistics().blocked_producers == 0


async def test_increment_rejects_bad_input_and_changes_nothing(
    world: World, service_factory: Callable[..., StatsService]
) -> None:
    service = service_factory(ActorConfig(sync_interval=3600))
    await service.start()
    for bad, error in (
        ((0, 1, "register"), Invalid),
        ((1, 1, ""), Invalid),
        ((1, 1, "x" * 65), Invalid),
        ((1, 1, "register", "DE", "yes"), BadMessage),
        ((1, 1, "register", None, True, 0), Invalid),
        ((1, True, "register"), BadMessage),
    ):
        with pytest.raises(error):
            service.increment(*bad)  # type: ignore[arg-type]
    await service.flush()
    assert (await service.info())["increments_applied"] == 0


async def test_stop_drains_the_mailbox_and_a_restart_from_the_snapshot_answers_at_once(
    world: World, tmp_path: Path, service_factory: Callable[..., StatsService]
) -> None:
    snapshot = tmp_path / "stats.snapshot"
    service = service_factory(ActorConfig(sync_interval=3600, snapshot_path=snapshot))
    await service.start()
    await wait_for(lambda: loaded(service))
    for i in range(500):
        service.increment(7, 3, "register", "FR", True, 1, None)
        service.increment(8, 3, "share", None, False, 2)
        if i == 0:
            assert service.mailbox.depth() > 0
    await service.stop()  # right away: the queued increments must still make it
    assert snapshot.exists()
    assert not list(tmp_path.glob(".*.tmp"))

    unreachable = StatsService(
        PostgresSource("postgresql://nobody@127.0.0.1:9/none", connect_timeout=0.5),
        ActorConfig(sync_interval=3600, snapshot_path=snapshot, backoff_initial=5),
    )
    await unreachable.start()
    try:
        stats = await asyncio.wait_for(unreachable.stats(7), 1)
        assert stats["supporters"] == 500
        assert stats["area"] == {"FR": 500}
        assert stats["org"] == {3: 500}
        assert (await unreachable.stats(8))["action"] == {"share": 1000}
        await wait_for(lambda: _failed(unreachable))
        assert (await unreachable.stats(7))["supporters"] == 500  # still served
    finally:
        await unreachable.stop()


async def _failed(service: StatsService) -> bool:
    return int((await service.info())["calculations"]["failed"]) > 0


async def test_subscribers_get_changes_at_most_once_per_second(
    world: World, service_factory: Callable[..., StatsService]
) -> None:
    service = service_factory(ActorConfig(sync_interval=3600, publish_interval=0.5))
    await service.start()
    await wait_for(lambda: loaded(service))
    subscription = await service.subscribe(1)
    updates: list[tuple[float, dict[str, object]]] = []

    async def consume() -> None:
        async for cid, stats in subscription:
            assert cid == 1
            updates.append((asyncio.get_running_loop().time(), stats))

    consumer = asyncio.create_task(consume())
    loop = asyncio.get_running_loop()
    end = loop.time() + 1.6
    n = 0
    while loop.time() < end:
        service.increment(1, 1, "share")
        service.increment(2, 1, "share")  # not subscribed: never published
        n += 1
        await asyncio.sleep(0.01)
    await service.flush()
    await asyncio.sleep(0.7)
    subscription.close()
    await asyncio.wait_for(consumer, 1)
    assert 2 <= len(updates) <= 5
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(updates)]
    assert all(gap >= 0.4 for gap in gaps), gaps
    assert updates[-1][1]["action"] == {"share": n}


async def test_an_action_numbered_below_the_snapshot_but_committed_after_it_is_still_counted(
    world: World, module_dsn: str, service_factory: Callable[..., StatsService]
) -> None:
    service = service_factory(ActorConfig(sync_interval=3600))
    await service.start()
    await wait_for(lambda: loaded(service))
    slow = await asyncpg.connect(module_dsn)
    try:
        tx = slow.transaction()
        await tx.start()  # takes an action id first, commits last
        slow_world = World(slow)
        slow_world.person = 1_000
        late = await slow_world.sign(1)
        quick = await world.sign(1)
        assert quick.action_id is not None
        assert late.action_id is not None
        assert late.action_id < quick.action_id
        service.increment(*quick)
        assert await service.resync("live")
        await wait_for(lambda: _more(service, 2))
        info = await service.info()
        assert info["last_calculation"]["max_action_id"] == quick.action_id
        await tx.commit()
        service.increment(*late)  # below the snapshot's highest id, yet not in it
        await service.flush()
        assert (await service.stats(1))["supporters"] == 2
        assert await memory_of(service, [1, 2]) == await recount(world.conn)
    finally:
        await slow.close()


async def test_the_embedding_example_runs_against_a_real_database(module_dsn: str) -> None:
    import sys

    example = Path(__file__).parent.parent / "examples" / "embedded.py"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(example), "--dsn", module_dsn, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    assert b"campaign 1:" in out
    assert b"update for campaign 1" in out


async def test_a_result_meant_for_a_previous_actor_is_ignored_after_a_restart(
    world: World, service_factory: Callable[..., StatsService]
) -> None:
    from campaignstats.actor.messages import CalculationDone
    from campaignstats.model import CalculationResult

    def crash_on_campaign_666(msg: Message) -> None:
        if isinstance(msg, Tell) and msg.cast.items[0].campaign_id == 666:
            raise RuntimeError("injected crash")

    service = service_factory(ActorConfig(sync_interval=3600, fault_hook=crash_on_campaign_666))
    await service.start()
    await wait_for(lambda: loaded(service))
    await world.sign(1)
    stale = CalculationResult("all", {1: CampaignStats(supporters=100)}, max_action_id=1)
    service.mailbox.put_nowait(Tell(Increments((Increment(666, 1, "boom"),))))
    service.mailbox.put_nowait(CalculationDone(1, stale))  # the first actor's generation
    await service.flush()
    assert (await service.info())["restarts"] == 1
    await wait_for(lambda: loaded(service))
    assert (await service.stats(1))["supporters"] == 1
    assert await memory_of(service, [1, 2]) == await recount(world.conn)


async def test_reads_are_served_ahead_of_queued_increments_but_never_ahead_of_their_own() -> None:
    mailbox = Mailbox(10)
    first = mailbox.put_nowait(Tell(Increments(())))
    second = mailbox.put_nowait(Tell(Increments(())))
    read = Ask(Stats(1), asyncio.get_running_loop().create_future())
    mailbox.put_read_nowait(read)
    assert mailbox.get_nowait() is read  # ahead of both increment batches
    assert not mailbox.taken_up_to(first)
    mailbox.get_nowait()
    assert mailbox.taken_up_to(first)
    assert not mailbox.taken_up_to(second)  # a producer of `second` must still wait its turn
    mailbox.get_nowait()
    assert mailbox.taken_up_to(second)
    assert mailbox.get_nowait() is None


async def test_send_queues_a_batch_and_reports_the_items_the_state_rejected(
    world: World, service_factory: Callable[..., StatsService]
) -> None:
    service = service_factory(ActorConfig(sync_interval=3600, max_keys=2))
    await service.start()
    await wait_for(lambda: loaded(service))
    rejected: list[tuple[int, str]] = []
    batch = [Increment(700, 1, "a"), Increment(700, 1, "b"), Increment(700, 1, "c")]
    await service.send(batch, on_rejected=rejected.extend)
    await service.flush()
    assert [i for i, _ in rejected] == [2]  # a third action type is over max_keys
    assert (await service.stats(700))["action"] == {"a": 1, "b": 1}
