"""Shards: the rendezvous hash, a shard server's refusals, the calculation's filter, ``--shard``.

The shard pair against one unsharded server, and failover, run real server processes: they are
in tests/test_scale_processes.py.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from campaignstats.actor.actor import ActorConfig
from campaignstats.client import AsyncStatsClient, StatsClient
from campaignstats.client.routing import (
    AsyncRoutingClient,
    RoutingClient,
    TopologyMismatch,
    parse_topology,
)
from campaignstats.db.calculation import calculate
from campaignstats.errors import Invalid, ServerUnavailable, UsageError
from campaignstats.http import HttpConfig, HttpServer, app
from campaignstats.model import CampaignStats, Increment
from campaignstats.shards import Shard, ShardFilter, group_by_shard, shard_of, weight

from .helpers import Raw, Start

#: the table of docs/scale.md, "The hash": (campaign id, N) -> K, for clients in other languages
TABLE = {
    (1, 2): 0,
    (2, 2): 0,
    (3, 2): 0,
    (5, 2): 0,
    (10, 2): 1,
    (123456789, 2): 1,
    (3, 3): 2,
    (10, 3): 1,
    (2, 4): 3,
    (1, 5): 4,
    (1000, 5): 4,
    (42, 5): 0,
}


def test_the_hash_gives_the_values_documented_for_other_languages() -> None:
    assert {key: shard_of(*key) for key in TABLE} == TABLE
    # the weight itself, for a reimplementation to check its bytes against
    assert weight(0, 1) == 0xEBAC1B9148EFB974
    assert weight(1, 1) == 0xE06248E581284577


def test_every_campaign_has_exactly_one_owner_and_the_shards_are_balanced() -> None:
    ids = range(1, 20_001)
    for n in (1, 2, 3, 5):
        owners = [[k for k in range(n) if shard_of(cid, n) == k] for cid in ids[:2_000]]
        assert all(len(o) == 1 for o in owners)
        counts = Counter(shard_of(cid, n) for cid in ids)
        assert sorted(counts) == list(range(n))
        for k in range(n):  # within 5% of an even share
            assert abs(counts[k] - len(ids) / n) < 0.05 * len(ids) / n
        filters = [ShardFilter(Shard(k, n)) for k in range(n)]
        assert all(sum(f.owns(cid) for f in filters) == 1 for cid in ids[:2_000])


def test_adding_a_shard_moves_about_one_campaign_in_n_and_only_to_the_new_shard() -> None:
    ids = range(1, 20_001)
    for n in (1, 2, 3, 4, 7):
        before = {cid: shard_of(cid, n) for cid in ids}
        after = {cid: shard_of(cid, n + 1) for cid in ids}
        moved = [cid for cid in ids if before[cid] != after[cid]]
        assert {after[cid] for cid in moved} == {n}  # to the new shard, never between old ones
        assert abs(len(moved) / len(ids) - 1 / (n + 1)) < 0.02


def test_a_shard_spec_is_k_of_n_with_a_clear_error_otherwise() -> None:
    assert Shard.parse("1/3") == Shard(1, 3)
    assert str(Shard.parse(" 0 / 2 ")) == "0/2"
    for text, why in (
        ("2/2", "K must be between 0 and 1"),
        ("3/2", "K must be between 0 and 1"),
        ("0/0", "N must be at least 1"),
        ("-1/2", "a shard is K/N"),
        ("1", "a shard is K/N"),
        ("a/b", "a shard is K/N"),
    ):
        with pytest.raises(UsageError, match=why):
            Shard.parse(text)
    with pytest.raises(UsageError, match="at least 1"):
        shard_of(1, 0)


async def test_serve_refuses_a_bad_shard_with_a_clear_error() -> None:
    for spec, why in (("2/2", "K must be between 0 and 1"), ("x", "a shard is K/N")):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "campaignstats.cli", "serve", "--shard", spec,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(60):
            _, err = await proc.communicate()
        assert proc.returncode == 2
        assert "--shard" in err.decode()
        assert why in err.decode()


def test_topologies_are_checked_and_read_in_every_form() -> None:
    assert parse_topology("tcp://a:1,tcp://b:2;unix:///s") == [
        ["tcp://a:1", "tcp://b:2"],
        ["unix:///s"],
    ]
    assert parse_topology(["tcp://a:1", "tcp://b:2"]) == [["tcp://a:1", "tcp://b:2"]]
    assert parse_topology([["tcp://a:1"], ["tcp://b:2"]]) == [["tcp://a:1"], ["tcp://b:2"]]
    with pytest.raises(UsageError, match="at least one replica"):
        parse_topology("tcp://a:1;")
    with pytest.raises(UsageError, match="twice"):
        parse_topology([["tcp://a:1"], ["tcp://a:1"]])
    with pytest.raises(UsageError):
        parse_topology(["http://a:1"])
    assert group_by_shard([1, 5, 2, 10], 2) == {0: [1, 5, 2], 1: [10]}


# -- a shard server refuses what it does not own --------------------------------------------------

MINE, OTHER = 1, 10  # shard_of(1, 2) == 0, shard_of(10, 2) == 1


async def test_a_shard_refuses_a_campaign_it_does_not_own_and_changes_nothing(
    start: Start,
) -> None:
    running = await start(ActorConfig(sync_interval=3600, shard=Shard(0, 2)))
    raw = await Raw.unix(running.unix)
    try:
        hello = await raw.call("hello", 1, {"protocol": 1})
        assert hello[2]["shard"] == [0, 2]
        before = await raw.call("info", 2)
        assert before[2]["shard"] == [0, 2]

        # Calls: the documented code, naming the owner.
        for req_id, message in enumerate(
            (
                ["stats", OTHER],
                ["stats_many", [MINE, OTHER]],
                ["history", OTHER, {"unit": "hour"}],
                ["recent", OTHER, {}],
                ["metrics", OTHER],
                ["sub", OTHER],
            ),
            start=10,
        ):
            op, *args = message
            reply = await raw.call(op, req_id, *args)
            assert reply[:3] == ["err", req_id, "invalid"], reply  # the contract's codes
            assert f"campaign {OTHER} belongs to shard 1/2" in reply[3]

        # Changes: the other shard's items are refused by index, the rest applied.
        await raw.send(["inc", OTHER, 1, "register", None, True])
        [err] = await raw.recv()
        assert err[:3] == ["err", None, "invalid"]
        assert "belongs to shard 1/2" in err[3]
        await raw.send(
            ["incs", [[MINE, 1, "register", "DE", True], [OTHER, 1, "register", "DE", True]]]
        )
        [err] = await raw.recv()
        assert err[:3] == ["err", None, "invalid"]
        assert "[1] campaign 10 belongs to shard 1/2" in err[3]
        assert "[0]" not in err[3]
        await raw.send(["dec", OTHER, 1, "register", None, False])
        [err] = await raw.recv()
        assert "belongs to shard 1/2" in err[3]
        await raw.send(["metric", {"campaign": OTHER, "incr": {"views": 1}}])
        [err] = await raw.recv()
        assert "belongs to shard 1/2" in err[3]
        assert (await raw.call("flush", 30))[0] == "ok"

        mine = await raw.call("stats", 31, MINE)
        assert CampaignStats.from_wire(mine[2]) == CampaignStats(
            1, {"register": 1}, {"DE": 1}, {1: 1}
        )
        after = (await raw.call("info", 32))[2]
        assert after["campaigns"] == before[2]["campaigns"] + 1  # campaign 1 only
        assert after["increments_applied"] == before[2]["increments_applied"] + 1
        assert after["rejected"] - before[2]["rejected"] == 3  # the changes (not the metric)
    finally:
        await raw.close()

    # The clients raise the typed error; the routing client asks the owner instead.
    async with AsyncStatsClient(f"unix://{running.unix}") as client:
        with pytest.raises(Invalid, match="belongs to shard 1/2"):
            await client.stats(OTHER)
        assert (await client.stats_many([MINE]))[MINE]["supporters"] == 1

    def blocking() -> None:  # in a thread: the server runs in this test's event loop
        with (
            StatsClient(f"unix://{running.unix}") as client,
            pytest.raises(Invalid, match="belongs to shard"),
        ):
            client.stats_many([MINE, OTHER])

    await asyncio.to_thread(blocking)
    # a topology of one shard against a shard server: the routing client checks the server's
    # shard before its first call and refuses the topology (docs/scale.md)
    async with AsyncRoutingClient([f"unix://{running.unix}"]) as routing:
        with pytest.raises(TopologyMismatch, match="is shard 0/2, but the topology lists it"):
            await routing.stats(OTHER)
        # a subscription goes to the owner's replica too
        subscription = routing.subscribe(MINE)
        await subscription.start()
        routing.increment(MINE, 2, "share")
        update = await subscription.get(timeout=10)
        assert update is not None
        assert update[0] == MINE
        assert update[1]["action"] == {"register": 1, "share": 1}
        await subscription.aclose()


async def test_the_calculation_of_a_shard_covers_its_own_campaigns_only(
    module_dsn: str,
) -> None:
    conn = await asyncpg.connect(module_dsn)
    try:
        await conn.execute(
            "INSERT INTO orgs (id, name) VALUES (1, 'o') ON CONFLICT DO NOTHING;"
            "INSERT INTO campaigns (id, name, status) "
            "SELECT i, 'c' || i, 1 FROM generate_series(1, 12) i ON CONFLICT DO NOTHING;"
            "INSERT INTO action_pages (id, name, campaign_id, org_id) "
            "SELECT i, 'p' || i, i, 1 FROM generate_series(1, 12) i ON CONFLICT DO NOTHING;"
            "INSERT INTO supporters (id, campaign_id, action_page_id, fingerprint, area, "
            "processing_status, dupe_rank) SELECT 100 + i, i, i, int4send(i), 'DE', 3, 0 "
            "FROM generate_series(1, 12) i ON CONFLICT DO NOTHING;"
            "INSERT INTO actions (id, supporter_id, action_type, campaign_id, action_page_id, "
            "processing_status) SELECT 100 + i, 100 + i, 'register', i, i, 3 "
            "FROM generate_series(1, 12) i ON CONFLICT DO NOTHING;"
        )
        whole = await calculate(conn, "all")
        for k in (0, 1):
            owns = ShardFilter(Shard(k, 2)).owns
            for scope in ("all", "live", list(range(1, 13))):
                part = await calculate(conn, scope, owns=owns)  # type: ignore[arg-type]
                expected = {c for c in range(1, 13) if shard_of(c, 2) == k}
                assert set(part.campaigns) == expected
                assert all(part.campaigns[c] == whole.campaigns[c] for c in expected)
    finally:
        await conn.close()


async def test_the_blocking_routing_client_sends_each_increment_to_its_owner_and_joins_reads(
    start: Start,
) -> None:
    shard0 = await start(ActorConfig(sync_interval=3600, shard=Shard(0, 2)))
    shard1 = await start(ActorConfig(sync_interval=3600, shard=Shard(1, 2)))
    ids = list(range(101, 141))
    increments = [
        Increment(ids[i % len(ids)], 1 + i % 3, "register", "DE", i % 2 == 0) for i in range(400)
    ]
    expected: dict[int, CampaignStats] = {cid: CampaignStats() for cid in ids}
    for inc in increments:
        expected[inc.campaign_id].add(inc)

    def route() -> tuple[dict[int, Any], list[list[int]], list[dict[str, Any]], Any]:
        topology = f"unix://{shard0.unix};unix://{shard1.unix}"
        with RoutingClient(topology) as routing:
            routing.increment_many(increments[:200])
            for inc in increments[200:]:
                routing.increment(*inc[:5])
            routing.flush()
            return (
                routing.stats_many(ids),
                routing.top("supporters", 3),
                routing.info(),
                (routing.statistics()),
            )

    many, top, infos, stats = await asyncio.to_thread(route)
    assert {cid: CampaignStats.from_wire(s) for cid, s in many.items()} == expected
    assert [i["shard"] for i in infos] == [[0, 2], [1, 2]]
    assert (stats.acknowledged, stats.unacked, stats.server_errors) == (400, 0, 0)
    best = max(expected[c].supporters for c in ids)
    assert top[0][1] == best
    assert all(expected[cid].supporters == v for cid, v in top)
    # each server holds its own campaigns only
    for k, running in enumerate((shard0, shard1)):
        mine = [c for c in ids if shard_of(c, 2) == k]
        held = await running.service.stats_many(mine)
        assert {c: CampaignStats.from_wire(s) for c, s in held.items()} == {
            c: expected[c] for c in mine
        }


async def test_a_shard_answers_http_reads_of_another_shards_campaign_with_421(
    start: Start,
) -> None:
    running = await start(ActorConfig(sync_interval=3600, shard=Shard(0, 2)))
    server = HttpServer(app(running.service, HttpConfig()), "127.0.0.1", 0)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
            other = await http.get(f"/v1/campaigns/{OTHER}")
            assert other.status_code == 421
            assert other.json()["error"] == "invalid"
            assert "belongs to shard 1/2" in other.json()["message"]
            assert (await http.get(f"/v1/campaigns/{MINE}")).status_code == 200
    finally:
        await server.close()


async def test_a_replica_that_refuses_connections_is_skipped_by_both_fronts(
    start: Start, tmp_path: Path
) -> None:
    running = await start()  # campaign 777 is in no database row: its counts are ours only
    dead = f"unix://{tmp_path / 'nobody-listens.sock'}"
    live = f"unix://{running.unix}"
    async with AsyncRoutingClient([dead, live], connect_timeout=1) as routing:
        routing.increment(777, 1, "register", "DE", True)
        await routing.flush()  # failed over to the live one, the journal given to it
        assert (await routing.stats(777))["supporters"] == 1
        stats = routing.statistics()
        assert (stats.failovers, stats.replicas, stats.unacked) == (1, [live], 0)

    def blocking() -> tuple[int, Any]:
        with RoutingClient([dead, live], connect_timeout=1) as routing:
            supporters = routing.stats(777)["supporters"]
            routing.decrement(777, 1, "register", "DE", True)
            routing.flush()
            return supporters, routing.statistics()

    supporters, stats = await asyncio.to_thread(blocking)
    assert supporters == 1
    assert (stats.failovers, stats.replicas) == (1, [live])
    assert (await running.service.stats(777))["supporters"] == 0


async def test_a_batch_applied_in_slices_refuses_the_other_shards_items_by_their_index(
    start: Start,
) -> None:
    """A batch longer than ``apply_slice`` is applied a slice at a time: the other shard's items
    are still refused by their index in the batch as sent, and the rest all count."""
    running = await start(ActorConfig(sync_interval=3600, shard=Shard(0, 2), apply_slice=7))
    owners = [cid for cid in range(1, 200)]
    mine = [cid for cid in owners if shard_of(cid, 2) == 0][:20]
    other = [cid for cid in owners if shard_of(cid, 2) == 1][:20]
    items: list[list[Any]] = []
    expected_refused: list[int] = []
    for i in range(60):
        if i % 3 == 2:
            expected_refused.append(i)
            items.append([other[i % len(other)], 1, "register", None, True])
        else:
            items.append([mine[i % len(mine)], 1, "register", None, True])
    raw = await Raw.unix(running.unix)
    try:
        before = 0  # what the calculation loaded from the suite's database
        for cid in mine:
            before += (await raw.call("stats", 3, cid))[2]["supporters"]
        await raw.send(["incs", items])
        [err] = await raw.recv()
        assert err[:3] == ["err", None, "invalid"]
        for i in expected_refused:
            assert f"[{i}] campaign" in err[3]
        assert (await raw.call("flush", 1))[0] == "ok"
        counted = 0
        for cid in mine:
            reply = await raw.call("stats", 2, cid)
            counted += reply[2]["supporters"]
        assert counted - before == 60 - len(expected_refused)
    finally:
        await raw.close()
    info = await running.service.info()
    assert info["rejected"] == len(expected_refused)


async def test_the_blocking_routing_client_sets_goals_on_every_replica_and_names_the_one_missed(
    start: Start, tmp_path: Path
) -> None:
    """Each replica fires the milestones itself, so set_goals goes to every replica of the
    owner; one that cannot be reached is named in the error, after the others are set."""
    a, b = await start(), await start()
    live = [f"unix://{a.unix}", f"unix://{b.unix}"]
    dead = f"unix://{tmp_path / 'nobody.sock'}"

    def blocking() -> None:
        with RoutingClient([live]) as routing:
            routing.set_goals(1, [2, 4], {"DE": 3})
        with (
            RoutingClient([[live[0], dead]], timeout=2.0) as routing,
            pytest.raises(ServerUnavailable, match=r"nobody\.sock"),
        ):
            routing.set_goals(2, [5])
        for url in live:
            with StatsClient(url) as one:
                goals = one.get_goals(1)
                assert (goals["supporters"], goals["area"]) == ([2, 4], {"DE": 3}), url
        with StatsClient(live[0]) as one:
            assert one.get_goals(2)["supporters"] == [5]

    await asyncio.to_thread(blocking)
