"""Forgotten campaigns leave the org index a step at a time (docs/design.md, "Memory"): a
calculation that finds campaigns gone walks every org, 87 ms at 300,000 orgs in one go, so
the actor takes ``forget_orgs_per_step`` orgs per turn of its loop. Meanwhile the index may
still list a forgotten campaign (a superset, as it always was), ``org_stats`` stays exact,
and a campaign that comes back keeps the orgs it joins again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
from hypothesis import given, settings
from hypothesis import strategies as st

import campaignstats
from campaignstats.actor import ActorConfig
from campaignstats.model import (
    CalculationResult,
    CampaignStats,
    Increment,
    StatsState,
    TxSnapshot,
)
from campaignstats.orgindex import BUCKET_BITS, OrgCampaigns

from .conftest import truncate_all
from .helpers import Start, completed, lines_run, wait_for
from .test_ranking import NOW

CODE = Path(campaignstats.__file__).parent


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 12), st.integers(1, 30)), max_size=120),  # before
    st.frozensets(st.integers(1, 30), min_size=1, max_size=12),  # the campaigns forgotten
    st.integers(1, 5),  # orgs per step
    st.lists(st.lists(st.tuples(st.integers(1, 14), st.integers(1, 30)), max_size=4), max_size=15),
)
def test_forgetting_in_steps_takes_out_exactly_the_campaigns_that_stay_gone(
    before: list[tuple[int, int]],
    gone: frozenset[int],
    per_step: int,
    between: list[list[tuple[int, int]]],
) -> None:
    index = OrgCampaigns()
    listed: dict[int, set[int]] = {}
    for org, cid in before:
        index.add(org, cid)
        listed.setdefault(org, set()).add(cid)
    back: set[int] = set()  # a campaign an org gains between steps is a campaign that came back
    added: dict[int, set[int]] = {}
    steps = index.forget_steps(set(gone), lambda cid: cid not in back, per_step)
    for adds in [*between, *[[]] * 40]:  # enough steps for every org
        if next(steps, None) is None:
            break
        for org, cid in adds:
            index.add(org, cid)
            added.setdefault(org, set()).add(cid)
            back.add(cid)
    else:
        raise AssertionError("the steps did not end")
    still_gone = gone - back
    final = index.as_dict()
    for org in set(listed) | set(added):
        kept = (listed.get(org, set()) - gone) | added.get(org, set())
        have = final.get(org, set())
        assert not have & still_gone, (org, have)  # a forgotten campaign is out of every org
        assert kept <= have, (org, kept, have)  # nothing else was lost
        assert have <= listed.get(org, set()) | added.get(org, set())  # nothing was invented
    assert all(final.values())  # an org left with none went


def _many_orgs(orgs: int, spacing: int = 1) -> StatsState:
    """Campaigns 1 and 2 in the database, and one campaign per org that is not: campaign
    ``c``'s org is ``c * spacing``."""
    state = StatsState()
    state.clock = lambda: NOW
    state.apply_many([Increment(c, c * spacing, "sign", None, True) for c in range(1, orgs + 1)])
    state.start_journal()
    return state


def _all_but(state: StatsState, kept: range) -> CalculationResult:
    truth = {c: CampaignStats(1, {"sign": 1}, {}, {c: 1}) for c in kept}
    result = CalculationResult("all", truth, 10, snapshot=TxSnapshot(400, 400))
    state.merge(result)
    return result


def test_a_forget_does_one_step_of_work_however_many_orgs_the_server_holds() -> None:
    runs = []
    for orgs in (4_000, 32_000):
        state = _many_orgs(orgs)
        state.forget_orgs_per_step = 1_000
        result = _all_but(state, range(1, orgs))  # the last campaign is gone
        gone, lines = lines_run(CODE, lambda: state.forget_absent(result))  # noqa: B023
        assert gone == [orgs]
        assert state.org_forgetting is not None  # steps left
        runs.append(lines)
        state.finish_forgetting()
        assert orgs not in state.org_campaigns.as_dict().get(orgs, set())
        assert len(state.org_campaigns) == orgs - 1
    # One step of 1,000 orgs either way: 8x the orgs, the same lines (give or take the
    # handful that depends on which orgs the first step meets).
    assert runs[1] <= runs[0] * 1.05, runs


def test_between_steps_org_stats_stays_exact_and_a_campaign_that_came_back_keeps_its_org() -> None:
    # Orgs a bucket apart (an org of one campaign is kept in a bucket of 256 consecutive ids,
    # looked at whole in one step: campaignstats.orgindex), so that 10 a step are 10 buckets.
    b = 1 << BUCKET_BITS
    state = _many_orgs(200, spacing=b)
    state.forget_orgs_per_step = 10
    result = _all_but(state, range(1, 101))  # 101..200 are gone
    assert state.forget_absent(result) == list(range(101, 201))
    state.stop_journal()
    assert state.org_forgetting is not None
    # Campaign 190 comes back, in its old org and in org 5's, before the steps reach them.
    state.apply_many(
        [Increment(190, 190 * b, "sign", None, True), Increment(190, 5 * b, "sign", None, True)]
    )
    steps = 0
    while True:
        for org in (5 * b, 150 * b, 190 * b):
            want = {c: s.org[org] for c, s in state.campaigns.items() if s.org.get(org)}
            assert state.org_stats(org)["campaigns"] == want
        if not state.forget_step():
            break
        steps += 1
    assert steps >= 10  # it took steps: 200 orgs, 10 a step
    index = state.org_campaigns.as_dict()
    assert index[190 * b] == {190}
    assert index[5 * b] == {5, 190}
    assert all(cid <= 100 or cid == 190 for cids in index.values() for cid in cids)
    assert 150 * b not in index  # an org left with none went


async def test_a_server_takes_forgotten_campaigns_out_of_its_org_index_between_messages(
    start: Start, conn: asyncpg.Connection
) -> None:
    await truncate_all(conn)
    await conn.execute(
        "INSERT INTO orgs (id, name) VALUES (1, 'o1');"
        "INSERT INTO campaigns (id, name, status) VALUES (1, 'c1', 1);"
    )
    running = await start(ActorConfig(sync_interval=3600))
    service = running.service
    actor = service.supervisor.actor
    assert actor is not None
    actor.state.forget_orgs_per_step = 7
    # 300 campaigns the database does not have, each with an org of its own, and org 1's
    for cid in range(1_000, 1_300):
        service.increment(cid, cid, "sign", None, True)
        service.increment(cid, 1, "sign", None, True)
    await service.flush()
    assert (await service.org_stats(1))["supporters"] == 300
    done = await completed(service)
    assert await service.resync("all")
    await wait_for(lambda: _completed_more(service, done))
    # The actor took the remaining steps by itself, between messages and when idle.
    await wait_for(lambda: _forgotten(actor.state))
    assert actor.state.org_campaigns.as_dict() == {}
    assert await service.org_stats(1) == {"supporters": 0, "actions": 0, "campaigns": {}}
    info: dict[str, Any] = await service.info()
    assert info["last_calculation"]["kind"] == "all"


async def _forgotten(state: StatsState) -> bool:
    return state.org_forgetting is None


async def _completed_more(service: Any, before: int) -> bool:
    return await completed(service) > before
