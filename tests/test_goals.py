"""Goals, milestones and area quorums (docs/design.md, "Goals and milestones"): each threshold
fires once, ever, in ascending order, whatever brought the count there; bad goals are refused
with the wire's error and change nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from campaignstats.actor.actor import ActorConfig
from campaignstats.client.aio import AsyncStatsClient
from campaignstats.client.blocking import StatsClient
from campaignstats.db.source import PostgresSource
from campaignstats.errors import BadMessage, Invalid
from campaignstats.goals import DEFAULT_LADDER, GoalKeeper, GoalsSpec, check_goals
from campaignstats.model import CampaignStats, Increment
from campaignstats.protocol import ServerCodec
from campaignstats.requests import SetGoals
from campaignstats.service import StatsService

from .conftest import truncate_all
from .helpers import Running, Start, loaded, wait_for

# -- the pure model ---------------------------------------------------------------------------


def _stats(supporters: int, area: dict[str, int] | None = None) -> CampaignStats:
    return CampaignStats(supporters, {"sign": supporters}, dict(area or {}), {1: supporters})


def _loaded_keeper() -> GoalKeeper:
    keeper = GoalKeeper()
    keeper.mark_loaded()
    return keeper


def test_the_default_ladder_is_procas_from_100_to_five_million() -> None:
    assert DEFAULT_LADDER[:4] == (100, 200, 500, 1_000)
    assert DEFAULT_LADDER[-1] == 5_000_000
    assert list(DEFAULT_LADDER) == sorted(set(DEFAULT_LADDER))


def test_a_jump_past_several_thresholds_fires_each_once_in_ascending_order() -> None:
    keeper = _loaded_keeper()
    campaigns = {1: _stats(99)}
    assert keeper.check([1], campaigns, 0.0) == []
    campaigns[1] = _stats(1_200)
    events = keeper.check([1], campaigns, 5.0)
    assert [e["threshold"] for _, e in events] == [100, 200, 500, 1_000]
    assert events[0] == (
        1,
        {"type": "milestone", "metric": "supporters", "threshold": 100, "value": 1_200, "at": 5.0},
    )
    assert keeper.check([1], campaigns, 6.0) == []


def test_a_count_that_dips_and_recovers_fires_nothing_again() -> None:
    keeper = _loaded_keeper()
    campaigns = {1: _stats(100)}
    assert [e["threshold"] for _, e in keeper.check([1], campaigns, 0.0)] == [100]
    campaigns[1] = _stats(99)
    assert keeper.check([1], campaigns, 0.0) == []
    campaigns[1] = _stats(150)
    assert keeper.check([1], campaigns, 0.0) == []


def test_before_the_first_full_calculation_an_unknown_campaign_is_baselined_silently() -> None:
    keeper = GoalKeeper()
    campaigns = {1: _stats(5_500), 2: _stats(10)}
    # increments of a campaign the server has no record of yet: not checked
    assert keeper.check([1], campaigns, 0.0) == []
    # the first calculation's merge: what is passed is recorded, no event
    assert keeper.merged([1, 2], campaigns, 0.0) == []
    assert keeper.goals(1)["reached"] == [100, 200, 500, 1_000, 2_000, 5_000]
    keeper.mark_loaded()
    campaigns[2] = _stats(100)
    assert [e["threshold"] for _, e in keeper.check([2], campaigns, 0.0)] == [100]


def test_set_goals_records_thresholds_already_passed_without_an_event() -> None:
    keeper = _loaded_keeper()
    campaigns = {1: _stats(300, {"DE": 10})}
    keeper.set_goals(1, GoalsSpec((250, 400), {"DE": 5, "FR": 3}), campaigns[1])
    assert keeper.check([1], campaigns, 0.0) == []
    assert keeper.goals(1) == {
        "supporters": [250, 400],
        "reached": [250],
        "next": 400,
        "area": {"DE": 5, "FR": 3},
        "areas_reached": ["DE"],
    }
    campaigns[1] = _stats(400, {"DE": 11, "FR": 3})
    events = keeper.check([1], campaigns, 1.0)
    assert [(e["type"], e["threshold"]) for _, e in events] == [("milestone", 400), ("quorum", 3)]
    assert events[1][1] == {"type": "quorum", "area": "FR", "threshold": 3, "value": 3, "at": 1.0}


def test_the_keepers_memory_survives_its_snapshot_form() -> None:
    keeper = _loaded_keeper()
    campaigns = {1: _stats(250, {"DE": 2})}
    keeper.set_goals(1, GoalsSpec(None, {"DE": 2}), None)
    keeper.check([1], campaigns, 0.0)
    again = GoalKeeper()
    again.load_snapshot(keeper.to_snapshot())
    again.mark_loaded()
    assert again.goals(1) == keeper.goals(1)
    assert again.check([1], campaigns, 0.0) == []


def test_a_bad_entry_of_the_snapshots_goals_costs_that_entry_and_no_other() -> None:
    keeper = GoalKeeper()
    problems = keeper.load_snapshot(
        {
            "custom": [[0, [7]], [1, [2, 4]], [2, [5, 3]], "junk"],
            "quorums": [[1, {"DE": 3}], [3, {"FR": -1}]],
            "reached": [[1, [2]], [4, ["x"]]],
            "area_reached": [[1, {"DE": [3]}], [5, {7: [1]}]],
        }
    )
    assert len(problems) == 6
    assert keeper.info()["snapshot_entries_skipped"] == 6
    assert keeper.goals(1) == {
        "supporters": [2, 4],
        "reached": [2],
        "next": 4,
        "area": {"DE": 3},
        "areas_reached": ["DE"],
    }
    assert keeper.goals(2)["supporters"] == list(DEFAULT_LADDER)
    assert keeper.goals(4)["reached"] == []
    assert 5 not in keeper.area_reached


def test_before_the_first_calculation_a_campaign_with_a_record_is_checked_not_baselined() -> None:
    keeper = GoalKeeper()
    keeper.load_snapshot({"custom": [[1, [2, 4]]]})
    keeper.remember(2, {"type": "milestone", "metric": "supporters", "threshold": 100})
    campaigns = {1: _stats(5), 2: _stats(250), 3: _stats(250)}
    events = keeper.merged([1, 2, 3], campaigns, 1.0)
    assert [(cid, e["threshold"]) for cid, e in events] == [(1, 2), (1, 4), (2, 200)]
    assert keeper.goals(3)["reached"] == [100, 200]  # no record of it: its first sight


@pytest.mark.parametrize(
    ("goals", "error", "words"),
    [
        ({"supporters": [100, 50]}, Invalid, "ascending"),
        ({"supporters": [100, 100]}, Invalid, "duplicates"),
        ({"supporters": [0]}, Invalid, "1 to 2**63-1"),
        ({"supporters": [-5, 10]}, Invalid, "1 to 2**63-1"),
        ({"supporters": list(range(1, 102))}, Invalid, "at most 100"),
        ({"supporters": ["100"]}, BadMessage, "list of integers"),
        ({"supporters": 100}, BadMessage, "list of integers"),
        ({"area": {"x" * 65: 10}}, Invalid, "1 to 64 bytes"),
        ({"area": {"": 10}}, Invalid, "1 to 64 bytes"),
        ({"area": {"DE": 0}}, Invalid, "1 to 2**63-1"),
        ({"area": {f"a{i}": 1 for i in range(101)}}, Invalid, "at most 100 areas"),
        ({"area": ["DE"]}, BadMessage, "map"),
        ({"goal": [1]}, BadMessage, "unknown key"),
        ([100], BadMessage, "a map"),
    ],
)
def test_bad_goals_are_refused_by_the_codec_with_the_wire_error(
    goals: Any, error: type[Exception], words: str
) -> None:
    checked = check_goals(goals)
    assert isinstance(checked, error)
    assert words in str(checked)
    codec = ServerCodec()
    import msgpack

    (message,) = codec.receive_data(msgpack.packb(["set_goals", 1, 7, goals]))
    assert type(message).__name__ == "Rejected"
    assert isinstance(message.error, error)


def test_good_goals_decode_into_one_typed_request() -> None:
    import msgpack

    (call,) = ServerCodec().receive_data(
        msgpack.packb(["set_goals", 3, 7, {"supporters": [10, 20], "area": {"DE": 5}}])
    )
    assert call.request == SetGoals(7, GoalsSpec((10, 20), {"DE": 5}))


# -- against the real database ----------------------------------------------------------------


class Signatures:
    """Campaigns 1 and 2 of one org; supporters added straight into the tables."""

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

    async def add(self, campaign: int, n: int, area: str = "DE") -> list[Increment]:
        """``n`` new supporters with their accepted actions, committed; their increments."""
        first = self.person + 1
        self.person += n
        async with self.conn.transaction():
            rows = await self.conn.fetch(
                "WITH s AS (INSERT INTO supporters (campaign_id, action_page_id, fingerprint, "
                "area, processing_status, dupe_rank) SELECT $1, $1, int8send(g), $2, 3, 0 "
                "FROM generate_series($3::bigint, $4::bigint) g RETURNING id) "
                "INSERT INTO actions (supporter_id, action_type, campaign_id, action_page_id, "
                "processing_status) SELECT id, 'register', $1, $1, 3 FROM s RETURNING id",
                campaign,
                area,
                first,
                self.person,
            )
        return [Increment(campaign, 1, "register", area, True, 1, r["id"]) for r in rows]


@pytest.fixture
async def signatures(conn: asyncpg.Connection) -> Signatures:
    s = Signatures(conn)
    await s.setup()
    return s


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


async def _events(subscription: Any, n: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(20):
        async for kind, _, data in subscription.feed():
            if kind == "event":
                out.append(data)
                if len(out) == n:
                    return out
    return out


async def test_milestones_fire_once_through_increments_and_never_again_after_a_resync(
    signatures: Signatures, services: Callable[..., StatsService]
) -> None:
    await signatures.add(1, 150)  # old news: passed before the server ever saw campaign 1
    service = services()
    await service.start()
    await wait_for(lambda: loaded(service))
    assert (await service.get_goals(1))["reached"] == [100]  # recorded, no event
    watching = await service.subscribe(1)
    incs = await signatures.add(1, 60)
    for inc in incs:
        service.increment(*inc)
    events = await _events(watching, 1)
    assert events[0]["type"] == "milestone"
    assert events[0]["threshold"] == 200
    assert events[0]["value"] >= 200
    # A resync reaches the same counts: nothing fires again; a dip and a recovery neither.
    assert await service.resync("all")
    await wait_for(lambda: _completed(service, 2))
    service.decrement(*incs[-1])
    service.increment(*incs[-1])
    await service.flush()
    assert (await service.info())["goals"]["fired"] == 1
    goals = await service.get_goals(1)
    assert goals["reached"] == [100, 200]
    assert goals["next"] == 500
    watching.close()


async def _completed(service: StatsService, n: int) -> bool:
    return int((await service.info())["calculations"]["completed"]) >= n


async def test_a_calculation_that_finds_a_campaign_past_thresholds_fires_them_in_order(
    signatures: Signatures, services: Callable[..., StatsService]
) -> None:
    service = services()
    await service.start()
    await wait_for(lambda: loaded(service))
    await service.set_goals(2, [10, 20, 30], {"DE": 25, "FR": 5})
    watching = await service.subscribe(2)
    await signatures.add(2, 27, "DE")  # written by another backend: no increments
    await signatures.add(2, 6, "FR")
    assert await service.resync([2])
    events = await _events(watching, 5)
    assert [(e["type"], e["threshold"]) for e in events] == [
        ("milestone", 10),
        ("milestone", 20),
        ("milestone", 30),
        ("quorum", 5),
        ("quorum", 25),
    ]
    assert [e.get("area") for e in events[3:]] == ["FR", "DE"]
    assert all(e["value"] == 33 for e in events[:3])
    goals = await service.get_goals(2)
    assert goals["areas_reached"] == ["DE", "FR"]
    assert goals["next"] is None
    watching.close()


async def test_bad_set_goals_is_refused_on_the_wire_and_changes_nothing(
    start: Start, signatures: Signatures
) -> None:
    running: Running = await start()
    async with AsyncStatsClient(f"unix://{running.unix}") as client:
        await client.set_goals(1, [50, 60], {"DE": 3})
        before = await client.get_goals(1)
        for supporters, area in (([60, 50], None), ([5, 5], None), ([0], None), (None, {"": 1})):
            with pytest.raises(Invalid):
                await client.set_goals(1, supporters, area)
        # the same through a raw message, past the client's own check
        raw_error = await _raw_set_goals(running, {"supporters": [-1]})
        assert raw_error[2] == "invalid"
        assert await client.get_goals(1) == before

    def with_the_blocking_client() -> dict[str, Any]:
        with StatsClient(f"unix://{running.unix}") as blocking:
            with pytest.raises(Invalid):
                blocking.set_goals(1, list(range(1, 200)))
            return blocking.get_goals(1)

    assert await asyncio.to_thread(with_the_blocking_client) == before


async def _raw_set_goals(running: Running, goals: Any) -> list[Any]:
    from .helpers import Raw

    raw = await Raw.unix(running.unix)
    try:
        await raw.call("hello", 1, {"protocol": 1})
        reply: list[Any] = await raw.call("set_goals", 2, 1, goals)
        return reply
    finally:
        await raw.close()


async def test_socket_subscribers_get_event_messages_through_both_clients(
    start: Start, signatures: Signatures
) -> None:
    running: Running = await start()
    subscribed = asyncio.Event()
    loop = asyncio.get_running_loop()

    def blocking_subscriber() -> list[int]:
        with StatsClient(f"unix://{running.unix}") as blocking, blocking.subscribe(1) as bsub:
            loop.call_soon_threadsafe(subscribed.set)
            got = [bsub.next_event(10), bsub.next_event(10)]
            return [e["threshold"] for e in got if e is not None]

    async with AsyncStatsClient(f"unix://{running.unix}") as client:
        await client.set_goals(1, [3, 5], None)
        async with client.subscribe(1) as sub:
            in_thread = asyncio.create_task(asyncio.to_thread(blocking_subscriber))
            await asyncio.wait_for(subscribed.wait(), 10)
            client.increment_many(await signatures.add(1, 5))
            await client.flush()
            first = await sub.next_event(timeout=10)
            second = await sub.next_event(timeout=10)
            assert first is not None
            assert second is not None
            assert (first["threshold"], second["threshold"]) == (3, 5)
            assert first["type"] == "milestone"
            assert first["metric"] == "supporters"
            assert await in_thread == [3, 5]


async def test_goals_and_what_was_reached_are_kept_in_the_snapshot(
    signatures: Signatures, services: Callable[..., StatsService], tmp_path: Path
) -> None:
    snapshot = tmp_path / "stats.snapshot"
    service = services(snapshot_path=snapshot)
    await service.start()
    await wait_for(lambda: loaded(service))
    await service.set_goals(1, [2, 4], None)
    for inc in await signatures.add(1, 4):
        service.increment(*inc)
    await service.flush()
    assert (await service.get_goals(1))["reached"] == [2, 4]
    await service.stop()
    # the count dips in the database while the server is down, then recovers
    await signatures.conn.execute(
        "UPDATE supporters SET processing_status = 1 WHERE id IN (SELECT max(id) FROM supporters)"
    )
    again = services(snapshot_path=snapshot)
    await again.start()
    await wait_for(lambda: loaded(again))
    goals = await again.get_goals(1)
    assert goals["supporters"] == [2, 4]
    assert goals["reached"] == [2, 4]
    assert (await again.info())["goals"]["fired"] == 0


def test_top_stays_right_when_the_goals_take_the_moved_campaigns_first() -> None:
    from campaignstats.model import StatsState

    state = StatsState()
    state.apply_many([Increment(c, 1, "sign", None, True) for c in (1, 2, 2, 3, 3, 3)])
    assert state.ranking.take_moved() == {1, 2, 3}
    assert state.ranking.take_moved() == set()  # taken once
    state.apply_many([Increment(1, 1, "sign", None, True)] * 3)
    assert state.top("supporters", 2) == [[1, 4], [3, 3]]


class NinetyNine:
    """A database where campaigns 1..n each have 99 supporters."""

    def __init__(self, n: int) -> None:
        self.n = n

    async def calculate(self, scope: Any) -> Any:
        import time

        from campaignstats.model import CalculationResult, scope_name

        campaigns = {cid: _stats(99) for cid in range(1, self.n + 1)}
        return CalculationResult(scope_name(scope), campaigns, 0, started_at=time.time())


async def test_more_campaigns_than_one_step_reach_a_goal_at_once_and_each_fires_once() -> None:
    from campaignstats.actor.actor import GOALS_SLICE

    n = GOALS_SLICE + 1_500
    service = StatsService(NinetyNine(n), ActorConfig(sync_interval=3600))
    await service.start()
    try:
        await wait_for(lambda: loaded(service))
        assert (await service.info())["goals"]["fired"] == 0  # old news, recorded silently
        await service.send([Increment(cid, 1, "sign", None, True) for cid in range(1, n + 1)])

        async def fired() -> int:
            return int((await service.info())["goals"]["fired"])

        await wait_for(lambda: _equals(fired(), n))
        assert (await service.get_goals(n))["reached"] == [100]
        assert await fired() == n
    finally:
        await service.stop()


async def _equals(value: Any, expected: int) -> bool:
    return bool(await value == expected)


async def _cli(*args: str) -> tuple[int, str]:
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "campaignstats.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_the_goals_command_sets_and_prints_and_refuses_bad_thresholds(
    start: Start,
) -> None:
    import json

    running: Running = await start()
    url = f"unix://{running.unix}"
    code, out = await _cli("goals", "5", "--set", "10,20", "--area", "DE=3,FR=4", "--url", url)
    assert code == 0
    assert "supporters goals: 10, 20" in out
    assert "DE=3, FR=4" in out
    assert (await _cli("goals", "5", "--set", "20,10", "--url", url))[0] == 1
    assert (await _cli("goals", "5", "--area", "DE", "--url", url))[0] == 2
    code, out = await _cli("goals", "5", "--json", "--url", url)
    assert code == 0
    assert json.loads(out) == {
        "supporters": [10, 20],
        "reached": [],
        "next": 10,
        "area": {"DE": 3, "FR": 4},
        "areas_reached": [],
    }
    assert (await _cli("goals", "5", "--ladder", "--url", url))[0] == 0
    assert (await running.service.get_goals(5))["supporters"] == list(DEFAULT_LADDER)


def test_the_client_session_turns_event_messages_into_goal_events_for_its_subscriptions() -> None:
    from campaignstats.errors import RemoteProtocolError
    from campaignstats.requests import Subscribe
    from campaignstats.sessions.client import GoalEvent

    from .test_client_session import feed, pack, ready

    session = ready()
    req_id, _ = session.send(Subscribe(7))
    event = {"type": "milestone", "metric": "supporters", "threshold": 100, "value": 101, "at": 1.0}
    got = feed(
        session,
        pack(["ok", req_id, None], ["event", 7, event], ["event", 8, event]),
        bytewise=True,
    )
    assert got[1:] == [GoalEvent(7, event)]  # campaign 8 is not subscribed: dropped
    session.receive_data(pack(["event", 7, "not a map"]))
    with pytest.raises(RemoteProtocolError, match="malformed event"):
        session.next_event()


class Counts:
    """A database whose campaign 1 has ``supporters`` (changed by the test between calls)."""

    def __init__(self, supporters: int) -> None:
        self.supporters = supporters

    async def calculate(self, scope: Any) -> Any:
        import time

        from campaignstats.model import CalculationResult, scope_name

        return CalculationResult(
            scope_name(scope), {1: _stats(self.supporters)}, 0, started_at=time.time()
        )


async def test_an_old_format_snapshot_is_the_baseline_so_an_upgrade_fires_nothing_old(
    tmp_path: Path,
) -> None:
    import msgpack

    path = tmp_path / "stats.snapshot"
    row = [1, 5_500, {"sign": 5_500}, {}, {1: 5_500}, 0, 0]  # format 2: no goals in it
    path.write_bytes(msgpack.packb({"format": 2, "saved_at": 0, "campaigns": [row]}))
    source = Counts(5_600)
    service = StatsService(source, ActorConfig(sync_interval=3600, snapshot_path=path))
    await service.start()
    try:
        await wait_for(lambda: loaded(service))
        assert (await service.info())["goals"]["fired"] == 0
        assert (await service.get_goals(1))["next"] == 10_000
        source.supporters = 10_100  # crossed while the server was down, say
        assert await service.resync("all")
        await wait_for(lambda: _completed(service, 2))
        await service.flush()
        assert (await service.info())["goals"]["fired"] == 1
        assert (await service.get_goals(1))["reached"][-1] == 10_000
    finally:
        await service.stop()
    data = msgpack.unpackb(path.read_bytes(), strict_map_key=False)
    assert data["format"] == 3
    assert [1, [100, 200, 500, 1_000, 2_000, 5_000, 10_000]] in data["goals"]["reached"]


async def test_a_crash_while_stopping_fires_the_goals_reached_before_the_snapshot_is_written(
    signatures: Signatures, services: Callable[..., StatsService], tmp_path: Path
) -> None:
    """The snapshot's counts are the next start's silent baseline: a threshold crossed by the
    last increments before a stop must fire even when the actor crashes handling the stop."""
    from campaignstats.actor.messages import Stop
    from campaignstats.actor.snapshot import load_snapshot_with_goals

    def crash_on_stop(message: object) -> None:
        if isinstance(message, Stop):
            raise RuntimeError("injected crash while stopping")

    snapshot = tmp_path / "stats.snapshot"
    service = services(snapshot_path=snapshot, fault_hook=crash_on_stop)
    await service.start()
    await wait_for(lambda: loaded(service))
    await service.set_goals(1, [2])
    for inc in await signatures.add(1, 3):
        service.increment(*inc)
    await service.stop()  # the increments and the stop in one turn: no goals tick in between
    loaded_ = load_snapshot_with_goals(snapshot)
    assert loaded_ is not None
    campaigns, goals = loaded_
    assert campaigns[1].supporters == 3
    assert goals is not None
    assert [1, [2]] in goals["reached"], "the snapshot was written before 2 fired"
