"""Review of memory round 2 (docs/design.md, "Memory"; issue 16): the compact org index, and the
sets of moved and touched campaigns that collapse into an "every campaign" flag."""

from __future__ import annotations

import asyncio

from campaignstats.ranking import COLLAPSE_MIN
from tests.helpers import Raw, wait_for
from tests.conftest import Start


async def test_a_server_that_checks_goals_but_is_never_asked_top_keeps_its_moved_sets_bounded(
    start: Start,
) -> None:
    """The actor hands the moved campaigns to the goals a few times a second (take_moved), so
    they leave ``dirty`` for ``taken`` long before ``dirty`` lists a quarter of the campaigns;
    the bound must hold for what ``top`` is still owed too, or a server that never answers
    ``top`` keeps one set entry per campaign that ever moved (docs/design.md, "Memory": the
    ranking's sets about 1 B per campaign)."""
    running = await start()
    actor = running.service.supervisor.actor
    assert actor is not None
    state = actor.state
    c = await Raw.tcp(running.port)
    try:
        campaigns = 8_000
        chunk = 250
        for first in range(1, campaigns + 1, chunk):
            items = [[cid, 1, "register", None, True] for cid in range(first, first + chunk)]
            await c.send(["incs", items])
            await asyncio.sleep(0.12)  # a goals tick (GOALS_TICK) between the batches
        assert (await c.call("flush", 1))[0] == "ok"
        await wait_for(lambda: len(state.campaigns) >= campaigns)
        await wait_for(lambda: not state.ranking.dirty)  # the goals took the last ones
        ranking = state.ranking
        listed = len(ranking.dirty) + len(ranking.taken) + len(ranking.owed)
        assert listed <= max(COLLAPSE_MIN, len(state.campaigns) // 4) + chunk
        # and top by supporters still sees every campaign
        top = (await c.call("top", 2, {"by": "supporters", "limit": 3}))[2]
        assert len(top) == 3
    finally:
        await c.close()
