"""Action pages and orgs (docs/design.md, "Action pages and orgs"): the calculation, increments
and the exact merge against reference SQL written here, straight from the definitions.

A page's STATS are the campaign's semantics restricted to the page's actions: supporters are the
distinct fingerprints of accepted, first-ranked supporters with a counted action on the page
(as the campaign's ``org`` counts them per org), plus the page's ``extra_supporters``; ``org``
holds the page's org with that count; ``area`` the same distinct count per area; ``action`` the
counted, non-testing actions by type. An org's rollup sums its entries in its campaigns' ``org``
and counts the actions on its pages.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from campaignstats.actor.actor import ActorConfig
from campaignstats.client import AsyncStatsClient, StatsClient
from campaignstats.db.calculation import calculate
from campaignstats.db.demo import fill_demo
from campaignstats.db.queries import PROCA_QUERIES
from campaignstats.db.source import PostgresSource
from campaignstats.errors import BadMessage, Invalid
from campaignstats.http import HttpConfig, HttpServer, app
from campaignstats.model import CalculationResult, StatsState
from campaignstats.service import StatsService

from .conftest import truncate_all
from .helpers import Raw, Running, completed, loaded, wait_for
from .test_calculation import SPREAD, SmallDatabase, small_databases
from .test_follower import dsn, following, logical_cluster  # noqa: F401 (fixtures)
from .test_time_calls import _cli

COUNTED = "a.processing_status IN (3, 4)"
PERSON = "s.processing_status = 3 AND s.dupe_rank = 0"

# -- the reference: plain SQL over the definitions, one statement per figure ------------------

PAGE_SUPPORTERS = f"""
SELECT a.action_page_id, count(DISTINCT s.fingerprint)
FROM actions a JOIN supporters s ON s.id = a.supporter_id
WHERE {COUNTED} AND {PERSON}
GROUP BY a.action_page_id
"""
PAGE_AREAS = f"""
SELECT a.action_page_id, s.area, count(DISTINCT s.fingerprint)
FROM actions a JOIN supporters s ON s.id = a.supporter_id
WHERE {COUNTED} AND {PERSON} AND s.area IS NOT NULL
GROUP BY a.action_page_id, s.area
"""
PAGE_ACTIONS = f"""
SELECT a.action_page_id, a.action_type, count(*)
FROM actions a WHERE {COUNTED} AND NOT a.testing
GROUP BY a.action_page_id, a.action_type
"""
PAGE_MESSAGES = f"""
SELECT a.action_page_id, count(*)
FROM messages m JOIN actions a ON a.id = m.action_id WHERE {COUNTED} AND NOT a.testing
GROUP BY a.action_page_id
"""
ORG_CAMPAIGN_SUPPORTERS = f"""
SELECT org_id, campaign_id, sum(n)::bigint FROM (
    SELECT ap.org_id, a.campaign_id, count(DISTINCT s.fingerprint) AS n
    FROM actions a
    JOIN supporters s ON s.id = a.supporter_id
    JOIN action_pages ap ON ap.id = a.action_page_id
    WHERE {COUNTED} AND {PERSON}
    GROUP BY ap.org_id, a.campaign_id
    UNION ALL
    SELECT org_id, campaign_id, sum(extra_supporters) FROM action_pages GROUP BY 1, 2
) x GROUP BY org_id, campaign_id
"""
ORG_ACTIONS = f"""
SELECT ap.org_id, count(*)
FROM actions a JOIN action_pages ap ON ap.id = a.action_page_id
WHERE {COUNTED} AND NOT a.testing
GROUP BY ap.org_id
"""
# A page's buckets of one unit: each counted, non-testing action at its inserted_at (UTC), each
# person at their first counted action on the page.
PAGE_BUCKETS = f"""
SELECT page, extract(epoch FROM date_trunc($1, t))::bigint AS start,
       sum(s)::bigint, sum(n)::bigint
FROM (
    SELECT a.action_page_id AS page, a.inserted_at AS t, 0 AS s, 1 AS n
    FROM actions a WHERE {COUNTED} AND NOT a.testing
    UNION ALL
    SELECT a.action_page_id, min(a.inserted_at), 1, 0
    FROM actions a JOIN supporters s ON s.id = a.supporter_id
    WHERE {COUNTED} AND {PERSON}
    GROUP BY a.action_page_id, s.fingerprint
) x
GROUP BY page, start
ORDER BY page, start
"""


async def expected_pages(conn: asyncpg.Connection) -> dict[int, dict[str, Any]]:
    pages: dict[int, dict[str, Any]] = {}
    for pid, cid, org, extra in await conn.fetch(
        "SELECT id, campaign_id, org_id, extra_supporters FROM action_pages"
    ):
        pages[pid] = {
            "supporters": extra,
            "action": {},
            "area": {},
            "org": {org: extra} if extra else {},
            "extra_supporters": extra,
            "messages": 0,
            "campaign_id": cid,
        }
    orgs = {r[0]: r[1] for r in await conn.fetch("SELECT id, org_id FROM action_pages")}
    for pid, n in await conn.fetch(PAGE_SUPPORTERS):
        page = pages[pid]
        page["supporters"] += n
        page["org"][orgs[pid]] = page["org"].get(orgs[pid], 0) + n
    for pid, area, n in await conn.fetch(PAGE_AREAS):
        pages[pid]["area"][area] = n
    for pid, action_type, n in await conn.fetch(PAGE_ACTIONS):
        pages[pid]["action"][action_type] = n
    for pid, n in await conn.fetch(PAGE_MESSAGES):
        pages[pid]["messages"] = n
    return pages


async def expected_orgs(conn: asyncpg.Connection) -> dict[int, dict[str, Any]]:
    orgs: dict[int, dict[str, Any]] = {
        r[0]: {"supporters": 0, "actions": 0, "campaigns": {}}
        for r in await conn.fetch("SELECT id FROM orgs")
    }
    for org, cid, n in await conn.fetch(ORG_CAMPAIGN_SUPPORTERS):
        if n:
            orgs[org]["campaigns"][cid] = n
            orgs[org]["supporters"] += n
    for org, n in await conn.fetch(ORG_ACTIONS):
        orgs[org]["actions"] = n
    return orgs


async def expected_history(conn: asyncpg.Connection, unit: str) -> dict[int, list[list[int]]]:
    out: dict[int, list[list[int]]] = defaultdict(list)
    for page, start, s, n in await conn.fetch(PAGE_BUCKETS, unit):
        out[page].append([start, s, n])
    return dict(out)


def state_of(result: CalculationResult) -> StatsState:
    state = StatsState()
    state.merge(result)
    return state


def history_ranges(now: float) -> dict[str, float]:
    """The start of each unit's range that every server answers (docs/protocol.md, "history"),
    aligned on the unit, so that the reference needs no edge rule."""
    return {
        "minute": (int(now) // 60 - 47 * 60) * 60,
        "hour": (int(now) // 3600 - 80 * 24) * 3600,
        "day": 0,
    }


class StateReader:
    """The reads of the service, answered by a state in this process."""

    def __init__(self, state: StatsState) -> None:
        self.state = state

    async def page_stats(self, page: int) -> dict[str, Any]:
        return self.state.page_stats(page)

    async def org_stats(self, org: int) -> dict[str, Any]:
        return self.state.org_stats(org)

    async def history(
        self, cid: int, unit: str, start: float | None, end: float | None, page: int | None
    ) -> dict[str, Any]:
        return self.state.history(cid, unit, start, end, page)


async def check_against_reference(
    conn: asyncpg.Connection, read: StateReader | StatsService
) -> None:
    pages = await expected_pages(conn)
    assert {pid: await read.page_stats(pid) for pid in pages} == pages
    orgs = await expected_orgs(conn)
    assert {org: await read.org_stats(org) for org in orgs} == orgs
    for unit, start in history_ranges(time.time()).items():
        expected = {
            pid: [b for b in buckets if b[0] >= start]
            for pid, buckets in (await expected_history(conn, unit)).items()
        }
        got = {
            pid: (await read.history(pages[pid]["campaign_id"], unit, start, None, pid))["buckets"]
            for pid in pages
        }
        assert {p: b for p, b in got.items() if b} == {p: b for p, b in expected.items() if b}


# -- the calculation --------------------------------------------------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(database=small_databases, helper=st.booleans())
def test_pages_and_orgs_of_any_small_database_equal_the_reference_sql(
    module_dsn: str, database: SmallDatabase, helper: bool
) -> None:
    async def check() -> None:
        conn = await asyncpg.connect(module_dsn)
        helper_conn = await asyncpg.connect(module_dsn) if helper else None
        try:
            await database.load(conn)
            result = await calculate(conn, "all", helper_conn=helper_conn)
            await check_against_reference(conn, StateReader(state_of(result)))
            # A list of campaign ids takes the hashing plan: the same figures for its pages.
            ids = [r[0] for r in await conn.fetch("SELECT id FROM campaigns")]
            by_ids = state_of(await calculate(conn, ids))
            full = state_of(await calculate(conn, "all"))
            assert by_ids.pages == full.pages
            for pid in full.pages:
                assert by_ids.page_timelines.get(pid, None) is None or (
                    by_ids.page_timelines[pid].views(time.time())
                    == full.page_timelines[pid].views(time.time())
                )
        finally:
            await conn.close()
            if helper_conn is not None:
                await helper_conn.close()

    asyncio.run(check())


async def demo_database(conn: asyncpg.Connection) -> None:
    """A demo database spread over minutes, days and months, with repeat people on several
    pages and campaigns, rejected actions and messages."""
    await truncate_all(conn)
    await fill_demo(conn, actions=20_000, seed=5, progress=False)
    await conn.execute(SPREAD, 7919)
    await conn.execute("INSERT INTO messages (action_id) SELECT id FROM actions WHERE id % 7 = 0")
    # Every condition the tests rely on holds in this data.
    repeat = await conn.fetchval(
        "SELECT count(*) FROM (SELECT s.fingerprint FROM supporters s "
        "JOIN actions a ON a.supporter_id = s.id "
        "GROUP BY 1 HAVING count(DISTINCT a.action_page_id) > 1) x"
    )
    assert repeat > 0
    assert await conn.fetchval("SELECT count(*) FROM actions WHERE processing_status = 2") > 0


async def test_pages_orgs_and_page_history_of_a_demo_database_equal_the_reference_sql(
    conn: asyncpg.Connection, module_dsn: str
) -> None:
    await demo_database(conn)
    helper = await asyncpg.connect(module_dsn)
    try:
        state = state_of(await calculate(conn, "all", helper_conn=helper))
    finally:
        await helper.close()
    await check_against_reference(conn, StateReader(state))
    # The campaign's own figures are unchanged by pages: their sums agree where they must.
    for cid, stats in state.campaigns.items():
        pages = [p for p in state.pages.values() if p.campaign_id == cid]
        assert sum(sum(p.stats.action.values()) for p in pages) == sum(stats.action.values())
        assert sum(p.stats.extra_supporters for p in pages) == stats.extra_supporters


# -- increments, then the exact merge -----------------------------------------------------------

SLOW = replace(
    PROCA_QUERIES,
    max_action_id="SELECT (SELECT coalesce(max(id), 0) FROM actions) FROM pg_sleep(2)",
)


@pytest.fixture
async def slow_service(conn: asyncpg.Connection, module_dsn: str) -> AsyncIterator[StatsService]:
    """A server over the demo database, loaded; its calculations sleep a second in their
    snapshot, so that changes can be made during one."""
    await demo_database(conn)
    service = StatsService(
        PostgresSource(module_dsn, queries=SLOW), ActorConfig(sync_interval=3600)
    )
    await service.start()
    await wait_for(lambda: loaded(service))
    yield service
    await service.stop()


class Backend:
    """Signs people up the way Proca's backend does: a new person's supporter and action in one
    transaction, then an increment with its page, txid and time."""

    def __init__(self, conn: asyncpg.Connection, service: StatsService) -> None:
        self.conn = conn
        self.service = service
        self.person = 10_000_000

    async def sign(self, cid: int, page: int, org: int, area: str | None) -> None:
        self.person += 1
        async with self.conn.transaction():
            sid = await self.conn.fetchval(
                "INSERT INTO supporters (campaign_id, action_page_id, fingerprint, area, "
                "processing_status, dupe_rank) VALUES ($1, $2, $3, $4, 3, 0) RETURNING id",
                cid,
                page,
                self.person.to_bytes(8, "big"),
                area,
            )
            aid, at = await self.conn.fetchrow(
                "INSERT INTO actions (supporter_id, action_type, campaign_id, action_page_id, "
                "processing_status) VALUES ($1, 'register', $2, $3, 3) "
                "RETURNING id, extract(epoch FROM inserted_at)::float8",
                sid,
                cid,
                page,
            )
            txid = await self.conn.fetchval("SELECT pg_current_xact_id()::text::bigint")
        self.service.increment(
            cid, org, "register", area, True, action_id=aid, txid=txid, at=at, page=page
        )


async def test_page_increments_with_txids_stay_exact_across_a_calculation_merge(
    conn: asyncpg.Connection, slow_service: StatsService
) -> None:
    service = slow_service
    backend = Backend(conn, service)
    targets = [
        tuple(r)
        for r in await conn.fetch(
            "SELECT campaign_id, id, org_id FROM action_pages ORDER BY id LIMIT 6"
        )
    ]
    for i in range(30):  # before the calculation: counted by memory alone
        cid, page, org = targets[i % len(targets)]
        await backend.sign(cid, page, org, ["DE", None, "FR"][i % 3])
    await service.flush()
    await check_against_reference(conn, service)
    done = await completed(service)
    assert await service.resync("all")
    await asyncio.sleep(0.3)  # the snapshot is taken; the calculation sleeps in it
    for i in range(30):  # during it: not in its snapshot, replayed by the merge
        cid, page, org = targets[i % len(targets)]
        await backend.sign(cid, page, org, ["PL", "DE", None][i % 3])
    await wait_for(lambda: _completed_more(service, done))
    await service.flush()
    await check_against_reference(conn, service)


async def _completed_more(service: StatsService, before: int) -> bool:
    return await completed(service) > before


# -- the calls, from the outside ----------------------------------------------------------------

FAR = 9_100  # campaign, page and org ids far from the module's database: only increments count


async def test_page_and_org_calls_answer_through_both_clients_and_the_service(
    server: Running,
) -> None:
    cid, other, page, page2, org, org2 = FAR + 1, FAR + 2, FAR + 11, FAR + 12, FAR + 21, FAR + 22
    now = time.time()
    aio = AsyncStatsClient(f"unix://{server.unix}")
    blocking = StatsClient(f"unix://{server.unix}")
    try:
        aio.increment(cid, org, "sign", "DE", True, page=page, at=now - 7200)
        aio.increment(cid, org, "sign", None, True, page=page, messages=2)
        aio.increment(cid, org, "share", None, False, 3, page=page)
        aio.increment(cid, org2, "sign", "FR", True, page=page2)
        aio.increment(other, org, "sign", "DE", True, page=FAR + 13)
        aio.increment(cid, org, "sign", "PL", True)  # no page: the campaign's and the org's
        await aio.flush()
        stats = await aio.page_stats(page)
        assert stats == {
            "supporters": 2,
            "action": {"sign": 2, "share": 3},
            "area": {"DE": 1},
            "org": {org: 2},
            "extra_supporters": 0,
            "messages": 2,
            "campaign_id": cid,
        }
        assert await asyncio.to_thread(blocking.page_stats, page) == stats
        assert await server.service.page_stats(page) == stats
        org_stats = await aio.org_stats(org)
        # Its entries in both campaigns' org; the actions of its pages (the page-less one not).
        assert org_stats == {"supporters": 4, "actions": 6, "campaigns": {cid: 3, other: 1}}
        assert await asyncio.to_thread(blocking.org_stats, org) == org_stats
        assert await server.service.org_stats(org) == org_stats
        hours = await aio.history(cid, "hour", page=page)
        assert hours["buckets"] == [
            [(int(now) - 7200) // 3600 * 3600, 1, 1],
            [int(now) // 3600 * 3600, 1, 4],
        ]
        assert await asyncio.to_thread(blocking.history, cid, "hour", page=page) == hours
        assert await server.service.history(cid, "hour", page=page) == hours
        # A page of another campaign has no buckets in this one.
        assert (await aio.history(other, "hour", page=page))["buckets"] == []
        # Unknown page and org: zeros, as for an unknown campaign.
        assert await aio.page_stats(FAR + 99) == {
            "supporters": 0,
            "action": {},
            "area": {},
            "org": {},
            "extra_supporters": 0,
            "messages": 0,
            "campaign_id": 0,
        }
        assert await aio.org_stats(FAR + 99) == {"supporters": 0, "actions": 0, "campaigns": {}}
        # A decrement with the page takes it back from the page too.
        aio.decrement(cid, org, "share", None, False, 3, page=page)
        await aio.flush()
        assert (await aio.page_stats(page))["action"] == {"sign": 2}
        assert (await aio.org_stats(org))["actions"] == 3
    finally:
        await aio.close()
        blocking.close()


async def test_bad_page_and_org_ids_are_refused_with_the_wire_errors_and_change_nothing(
    server: Running,
) -> None:
    cid, page, org = FAR + 31, FAR + 41, FAR + 51
    raw = await Raw.unix(server.unix)
    try:
        await raw.send(["inc", {"campaign": cid, "org": org, "type": "sign", "page": page}])
        assert (await raw.call("flush", 1))[:2] == ["ok", 1]
        before = (await raw.call("page_stats", 2, page))[2]
        org_before = (await raw.call("org_stats", 3, org))[2]
        for op, value, code in (
            ("page_stats", 0, "invalid"),
            ("page_stats", -5, "invalid"),
            ("page_stats", 2**63, "invalid"),
            ("page_stats", "5", "bad_message"),
            ("page_stats", 1.5, "bad_message"),
            ("org_stats", 0, "invalid"),
            ("org_stats", None, "bad_message"),
        ):
            reply = await raw.call(op, 10, value)
            assert reply[:3] == ["err", 10, code], (op, value, reply)
        reply = await raw.call("history", 11, cid, {"page": 0})
        assert reply[:3] == ["err", 11, "invalid"]
        reply = await raw.call("history", 12, cid, {"page": "x"})
        assert reply[:3] == ["err", 12, "bad_message"]
        # Increments naming a bad page: refused whole.
        for item, code in (
            ({"campaign": cid, "org": org, "type": "sign", "page": 0}, "invalid"),
            ({"campaign": cid, "org": org, "type": "sign", "page": -1}, "invalid"),
            ({"campaign": cid, "org": org, "type": "sign", "page": "p"}, "bad_message"),
        ):
            await raw.send(["inc", item], ["flush", 20])
            error, flushed = await raw.recv(2)
            assert error[:3] == ["err", None, code], (item, error)
            assert flushed[:2] == ["ok", 20]
        assert (await raw.call("stats", 19, cid))[2]["action"] == {"sign": 1}
        # A page of another campaign or org: the campaign counts it, the page does not.
        await raw.send(
            ["inc", {"campaign": cid + 1, "org": org, "type": "sign", "page": page}],
            ["inc", {"campaign": cid, "org": org + 1, "type": "sign", "page": page}],
        )
        assert (await raw.call("flush", 24))[:2] == ["ok", 24]
        assert (await raw.call("stats", 25, cid + 1))[2]["action"] == {"sign": 1}
        assert (await raw.call("stats", 26, cid))[2]["action"] == {"sign": 2}
        assert (await raw.call("page_stats", 21, page))[2] == before
        assert (await raw.call("org_stats", 22, org))[2] == org_before
    finally:
        await raw.close()
    aio = AsyncStatsClient(f"unix://{server.unix}")
    try:
        for bad in (0, -1):
            with pytest.raises(Invalid):
                await aio.page_stats(bad)
            with pytest.raises(Invalid):
                await aio.org_stats(bad)
            with pytest.raises(Invalid):
                await aio.history(cid, "day", page=bad)
        with pytest.raises(BadMessage):
            await aio.page_stats("5")  # type: ignore[arg-type]
        with pytest.raises(Invalid):
            await server.service.page_stats(0)
    finally:
        await aio.close()


async def test_http_serves_pages_and_orgs_and_refuses_bad_ids_with_400(
    server: Running,
) -> None:
    cid, page, org = FAR + 61, FAR + 71, FAR + 81
    server.service.increment(cid, org, "sign", "DE", True, page=page)
    await server.service.flush()
    stats_app = app(server.service, HttpConfig())
    http_server = HttpServer(stats_app, "127.0.0.1", 0)
    await http_server.start()
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{http_server.port}", timeout=10
        ) as client:
            r = await client.get(f"/v1/pages/{page}")
            assert r.status_code == 200
            assert r.json() == json.loads(json.dumps(await server.service.page_stats(page)))
            assert r.json()["org"] == {str(org): 1}
            assert "etag" in r.headers
            r = await client.get(f"/v1/orgs/{org}")
            assert r.json() == {"supporters": 1, "actions": 1, "campaigns": {str(cid): 1}}
            r = await client.get(f"/v1/campaigns/{cid}/history?unit=day&page={page}")
            assert [b[1:] for b in r.json()["buckets"]] == [[1, 1]]
            r = await client.get(f"/v1/orgs/{FAR + 99}")
            assert r.json() == {"supporters": 0, "actions": 0, "campaigns": {}}
            for path, code in (
                ("/v1/pages/0", "invalid"),
                ("/v1/pages/abc", "bad_message"),
                ("/v1/pages/-3", "bad_message"),
                ("/v1/orgs/0", "invalid"),
                ("/v1/orgs/9223372036854775808", "invalid"),
                (f"/v1/campaigns/{cid}/history?page=0", "invalid"),
                (f"/v1/campaigns/{cid}/history?page=x", "bad_message"),
            ):
                r = await client.get(path)
                assert r.status_code == 400, path
                assert r.json()["error"] == code, path
    finally:
        await http_server.close()


async def test_the_cli_prints_a_page_an_org_and_a_pages_history(server: Running) -> None:
    cid, page, org = FAR + 91, FAR + 92, FAR + 93
    server.service.increment(cid, org, "sign", "DE", True, page=page)
    server.service.increment(cid, org, "share", None, False, page=page)
    await server.service.flush()
    url = f"unix://{server.unix}"
    page_out = json.loads(await _cli("page", str(page), "--url", url))
    assert page_out["campaign_id"] == cid
    assert page_out["action"] == {"sign": 1, "share": 1}
    org_out = json.loads(await _cli("org", str(org), "--url", url))
    assert org_out == {"supporters": 1, "actions": 2, "campaigns": {str(cid): 1}}
    history = json.loads(
        await _cli("history", str(cid), "--page", str(page), "--json", "--url", url)
    )
    assert [b[1:] for b in history["buckets"]] == [[1, 2]]


# -- the follower -------------------------------------------------------------------------------


async def test_a_row_written_only_to_postgres_moves_its_pages_stats(
    dsn: str,  # noqa: F811 (the follower's fixture)
) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        async with following(dsn, 3600) as (service, _, _):
            assert (await service.page_stats(2))["campaign_id"] == 1  # known, empty
            async with conn.transaction():
                sid = await conn.fetchval(
                    "INSERT INTO supporters (campaign_id, action_page_id, fingerprint, area, "
                    "processing_status, dupe_rank) VALUES (1, 2, 'x', 'DE', 3, 0) RETURNING id"
                )
                aid = await conn.fetchval(
                    "INSERT INTO actions (supporter_id, action_type, campaign_id, "
                    "action_page_id, processing_status) VALUES ($1, 'register', 1, 2, 3) "
                    "RETURNING id",
                    sid,
                )
            await wait_for(lambda: _page_supporters(service, 2, 1), timeout=5)
            page = await service.page_stats(2)
            assert page["action"] == {"register": 1}
            assert page["area"] == {"DE": 1}
            assert page["org"] == {2: 1}
            assert (await service.org_stats(2))["actions"] == 1
            assert (await service.page_stats(1))["action"] == {}  # the other page: untouched
            await conn.execute("UPDATE actions SET processing_status = 2 WHERE id = $1", aid)
            await wait_for(lambda: _page_supporters(service, 2, 0), timeout=5)
            assert (await service.page_stats(2))["action"] == {}
    finally:
        await conn.close()


async def _page_supporters(service: StatsService, page: int, n: int) -> bool:
    return (await service.page_stats(page))["supporters"] == n


# -- the model alone ----------------------------------------------------------------------------


def test_a_change_naming_another_campaigns_page_counts_in_its_campaign_only_also_replayed() -> None:
    from campaignstats.model import CampaignStats, Increment, PageStats, TxSnapshot

    state = StatsState()
    state.clock = lambda: 1_750_000_000.0
    page = PageStats(1, 7, CampaignStats(2, {"sign": 2}, {}, {7: 2}))
    first = CalculationResult(
        "all", {1: CampaignStats(2, {"sign": 2}, {}, {7: 2}), 2: CampaignStats()}, 10
    )
    first.pages = {5: page}
    state.merge(first)
    state.start_journal()
    # During a calculation: one change names page 5 with campaign 2, one with org 8.
    state.apply(Increment(2, 7, "sign", None, True, page=5, txid=500))
    state.apply(Increment(1, 8, "sign", None, True, page=5, txid=501))
    state.apply(Increment(1, 7, "sign", None, True, page=5, txid=502))
    assert state.page_mismatches == 2
    assert state.page_stats(5)["supporters"] == 3
    second = CalculationResult(
        "all",
        {1: CampaignStats(2, {"sign": 2}, {}, {7: 2}), 2: CampaignStats()},
        10,
        snapshot=TxSnapshot(400, 400),
    )
    second.pages = {5: page.copy()}
    state.merge(second)
    # Replayed as applied: every campaign counts its changes, page 5 only its own.
    assert state.stats(2)["supporters"] == 1
    assert state.stats(1)["supporters"] == 4
    assert state.stats(1)["org"] == {7: 3, 8: 1}
    assert state.page_stats(5)["supporters"] == 3
    assert state.page_stats(5)["campaign_id"] == 1
    assert state.org_stats(8) == {"supporters": 1, "actions": 0, "campaigns": {1: 1}}
    # Changes without a page cost the page state nothing.
    before = (len(state.pages), len(state.page_timelines))
    state.apply(Increment(3, 7, "sign", "DE", True))
    assert (len(state.pages), len(state.page_timelines)) == before
