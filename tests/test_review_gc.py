"""Review of the garbage collector's policy and the merge step's rule (campaignstats.actor.gcpolicy,
StatsActor._merge_step; docs/design.md, "The garbage collector", "Merging in slices")."""

from __future__ import annotations

import asyncio
import gc
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from campaignstats.actor.actor import ActorConfig
from campaignstats.actor.gcpolicy import COLLECT_DELAY, HELD_THRESHOLD, PASS_SPACING, GcPolicy
from campaignstats.actor.messages import Ask, Message
from campaignstats.db.source import PostgresSource
from campaignstats.errors import InternalError
from campaignstats.requests import Stats
from campaignstats.service import StatsService

from .helpers import completed, wait_for
from .test_gc_policy import GatedSource

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def thresholds() -> Iterator[tuple[int, int, int]]:
    """The process's thresholds before the test, put back after it whatever happened."""
    before = gc.get_threshold()
    yield before
    gc.set_threshold(*before)


async def _passes(service: StatsService) -> int:
    return int((await service.info())["gc"]["passes"])


async def test_two_services_of_one_process_holding_the_collector_leave_its_thresholds_as_they_were(
    module_dsn: str, thresholds: tuple[int, int, int]
) -> None:
    """The collector is the process's: one service's merge must not give back the threshold that
    the other's calculation still holds, nor the other put back the held value for good."""
    young, middle, _ = thresholds
    sources = [GatedSource(module_dsn), GatedSource(module_dsn)]
    services = [
        StatsService(source, ActorConfig(sync_interval=3600, gc_policy=True)) for source in sources
    ]
    first, second = services
    for service in services:
        await service.start()
    try:
        await wait_for(lambda: all(source.started == 1 for source in sources))
        assert gc.get_threshold() == (young, middle, HELD_THRESHOLD)
        sources[0].gate.set()
        await first.loaded()
        await wait_for(lambda: _passes_are(first, 1))
        # the second service's calculation still runs: still no automatic full pass
        assert gc.get_threshold() == (young, middle, HELD_THRESHOLD)
        sources[1].gate.set()
        await second.loaded()
        await wait_for(lambda: _passes_are(second, 1))
        assert gc.get_threshold() == thresholds
    finally:
        for source in sources:
            source.gate.set()
        for service in services:
            await service.stop(10)
    assert gc.get_threshold() == thresholds


async def _passes_are(service: StatsService, n: int) -> bool:
    return await _passes(service) == n


async def test_thresholds_the_embedding_process_sets_while_a_calculation_runs_stay_in_force(
    module_dsn: str, thresholds: tuple[int, int, int]
) -> None:
    """The policy puts back the oldest generation's threshold that it raised, not a copy of all
    three taken before: a process that tuned its collector meanwhile keeps its own setting."""
    source = GatedSource(module_dsn)
    service = StatsService(source, ActorConfig(sync_interval=3600, gc_policy=True))
    await service.start()
    try:
        await wait_for(lambda: source.started == 1)
        assert gc.get_threshold()[2] == HELD_THRESHOLD
        gc.set_threshold(5_000, 20, 30)  # the process's own choice, made now
        source.gate.set()
        await service.loaded()
        await wait_for(lambda: _passes_are(service, 1))
        assert gc.get_threshold() == (5_000, 20, 30)
    finally:
        source.gate.set()
        await service.stop(10)
    assert gc.get_threshold() == (5_000, 20, 30)


# -- the merge step's rule ------------------------------------------------------------------------

SMALL = 20_000
LARGE_PAGES = 20_000


async def _one_large_campaign_then_many_small(conn: asyncpg.Connection) -> None:
    """Campaign 1 with ``LARGE_PAGES`` pages of one signature each (its merge copies them all:
    well over any step's budget), then ``SMALL`` campaigns of one page and one signature."""
    await conn.execute(
        "TRUNCATE actions, supporters, action_pages, campaigns, orgs RESTART IDENTITY CASCADE"
    )
    await conn.execute("INSERT INTO orgs (name) VALUES ('org')")
    await conn.execute(
        "INSERT INTO campaigns (name, org_id) SELECT 'c' || i, 1 FROM generate_series(1, $1) i",
        SMALL + 1,
    )
    await conn.execute(
        "INSERT INTO action_pages (name, campaign_id, org_id) "
        "SELECT 'p' || i, CASE WHEN i <= $1::int THEN 1 ELSE i - $1::int + 1 END, 1 "
        "FROM generate_series(1, $1::int + $2::int) i",
        LARGE_PAGES,
        SMALL,
    )
    await conn.execute(
        "INSERT INTO supporters (campaign_id, action_page_id, fingerprint, area, "
        "processing_status, dupe_rank) "
        "SELECT campaign_id, id, int8send(id), 'DE', 3, 0 FROM action_pages"
    )
    await conn.execute(
        "INSERT INTO actions (supporter_id, action_type, campaign_id, action_page_id, "
        "processing_status) SELECT id, 'register', campaign_id, action_page_id, 3 FROM supporters"
    )


async def test_one_campaign_over_the_budget_does_not_make_every_later_step_merge_one_campaign(
    conn: asyncpg.Connection, module_dsn: str
) -> None:
    """The step rule stops before a campaign when the longest so far would take the step past
    the budget. A longest campaign over the budget (a large campaign's pages) then stopped every
    later step after its first campaign: a merge of N campaigns took N steps, each a turn of the
    event loop, however small the rest."""
    await _one_large_campaign_then_many_small(conn)
    config = ActorConfig(sync_interval=3600, merge_budget=0.005)
    service = StatsService(PostgresSource(module_dsn), config)
    await service.start()
    try:
        await service.loaded()
        last = (await service.info())["last_calculation"]
        assert last["campaigns"] == SMALL + 1
        assert last["longest_merge_step"] > config.merge_budget  # the large campaign's step
        assert last["merge_steps"] < (SMALL + 1) / 10
        stats = await service.stats_many([1, 2, SMALL + 1])
        assert [stats[c]["supporters"] for c in (1, 2, SMALL + 1)] == [LARGE_PAGES, 1, 1]
    finally:
        await service.stop(10)


async def test_every_key_of_info_is_named_in_the_protocol_document(module_dsn: str) -> None:
    """docs/protocol.md's "Info" lists what ``info`` answers, and says keys may be added: an added
    key is named there too (``gc`` was not)."""
    doc = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    service = StatsService(PostgresSource(module_dsn), ActorConfig(sync_interval=3600))
    await service.start()
    try:
        await service.loaded()
        info = await service.info()
    finally:
        await service.stop(10)
    assert [key for key in info if f"`{key}`" not in doc and f'"{key}"' not in doc] == []


async def test_an_actor_crash_mid_calculation_leaves_the_hold_to_its_successors_calculation(
    module_dsn: str, thresholds: tuple[int, int, int]
) -> None:
    """The dead actor's calculation is abandoned while it holds the collector: the restarted
    actor's first calculation holds it on, and its end gives it back, with the pass."""

    def crash_on_666(msg: Message) -> None:
        if isinstance(msg, Ask) and msg.request == Stats(666):
            raise RuntimeError("injected crash")

    source = GatedSource(module_dsn)
    config = ActorConfig(sync_interval=3600, gc_policy=True, fault_hook=crash_on_666)
    service = StatsService(source, config)
    await service.start()
    try:
        await wait_for(lambda: source.started == 1)
        with pytest.raises(InternalError):
            await service.stats(666)
        await wait_for(lambda: source.started == 2)  # the new actor's full calculation
        assert (await service.info())["restarts"] == 1
        assert gc.get_threshold()[2] == HELD_THRESHOLD
        source.gate.set()
        await service.loaded()
        await wait_for(lambda: _passes_are(service, 1))
        assert gc.get_threshold() == thresholds
        assert (await service.info())["gc"]["holding"] is False
    finally:
        source.gate.set()
        await service.stop(10)
    assert gc.get_threshold() == thresholds


def test_a_pass_due_after_one_merge_is_not_put_off_by_the_next_calculations_release(
    thresholds: tuple[int, int, int],
) -> None:
    """Calculations back to back: each release set the pass COLLECT_DELAY after itself, so
    calculations that each ended within COLLECT_DELAY of the last put the pass off for as long
    as they came (3,176 calculations in 10 s, one pass), the threshold held all along."""
    policy = GcPolicy(True)
    try:
        now = time.monotonic()
        policy.hold()
        policy.release(now)
        policy.hold()  # the next calculation
        policy.release(now + COLLECT_DELAY * 0.8)  # and its end, before the pass
        assert policy.collect_if_due(now + COLLECT_DELAY)
        assert policy.passes == 1
    finally:
        policy.close()
    assert gc.get_threshold() == thresholds


async def test_a_resync_of_a_few_campaigns_runs_no_full_pass_of_the_collector_after_it(
    module_dsn: str, thresholds: tuple[int, int, int]
) -> None:
    """A full pass walks the whole state (26 ms at 100,000 campaigns): one after each
    calculation of a few campaigns (``resync [ids]``, the follower's page changes), each a few
    ms of Postgres, doubled what a client asking for them cost the event loop, with nothing held
    back to make up for (such a calculation allocates little)."""
    service = StatsService(
        PostgresSource(module_dsn), ActorConfig(sync_interval=3600, gc_policy=True)
    )
    await service.start()
    try:
        await service.loaded()
        await wait_for(lambda: _passes_are(service, 1))  # after the full calculation
        for _ in range(5):
            done = await completed(service)
            assert await service.resync([1, 2])
            assert gc.get_threshold() == thresholds  # nothing held for it
            await wait_for(lambda d=done: _completed_more(service, d))  # type: ignore[misc]
        await asyncio.sleep(COLLECT_DELAY * 5)
        assert (await service.info())["gc"]["passes"] == 1
    finally:
        await service.stop(10)
    assert gc.get_threshold() == thresholds


async def _completed_more(service: StatsService, before: int) -> bool:
    return await completed(service) > before


async def test_calculations_failing_back_to_back_spend_at_most_a_fifth_of_the_time_in_full_passes(
    thresholds: tuple[int, int, int],
) -> None:
    """Postgres down and ``resync "all"`` asked for again and again (each calculation fails at
    once): one full pass after each failure, each as long as the whole state takes to walk (43
    ms at 100,000 campaigns), kept the event loop in the collector most of the time (p99 lag
    46 ms there, 3 ms without the policy). Passes are spaced so that they take at most a tenth
    of the time."""
    with socket.socket() as s:  # a port nothing listens on: every connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    source = PostgresSource(f"postgresql://nobody@127.0.0.1:{port}/none")
    config = ActorConfig(sync_interval=3600, gc_policy=True, backoff_initial=600, backoff_max=600)
    service = StatsService(source, config)
    await service.start()
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3.0:
            await service.resync("all")
            await asyncio.sleep(0.001)
        info = await service.info()
        elapsed = time.monotonic() - t0
        assert info["calculations"]["failed"] >= 20
        policy = info["gc"]
        assert policy["passes"] >= 1
        # Each pass starts at least PASS_SPACING times the one before's length after its end,
        # so n passes in ``elapsed`` take at most (elapsed + PASS_SPACING * the last one) /
        # (PASS_SPACING + 1): a tenth of the time once the last pass is short beside it. The
        # rule, not a share of the clock, which a loaded machine's one long pass would break.
        bound = (elapsed + PASS_SPACING * policy["last_pass"]) / (PASS_SPACING + 1)
        assert policy["seconds"] <= bound + 0.01, (policy, elapsed)
    finally:
        await service.stop(10)
    assert gc.get_threshold() == thresholds
