"""Review of apply_many's fast path for plain increments (StatsState._apply_plain; docs/design.md,
"The hot path") against the general path it stands for, apply_each.

tests/test_apply_paths.py compares the two over batches of at most 12 increments: in its 300
examples the fast path ran at least 5 increments before handing over only about a dozen times,
took a whole batch that named an action of a merged campaign about 8 times, and the clock only
moved forward by at most an hour. Here the batches are longer and mostly plain (long runs on
the fast path before the handover, and whole batches on it with merged horizons in ``seen``), the
clock also goes back (within the hour, and by more than a day: the ``touched`` sets) and jumps a
day, the journal bound is tiny (0 and 1: the overflow decided by the fast part, the rest's or
both), and batches are given as lists, tuples, generators or the codec's decoded items.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from campaignstats.actor.actor import ActorConfig
from campaignstats.client.aio import AsyncStatsClient
from campaignstats.model import Increment, StatsState

from .conftest import truncate_all
from .helpers import Start, completed, loaded, memory_of, wait_for
from .recount import recount
from .test_apply_paths import (
    NOW,
    Setting,
    _result,
    increments,
    plain,
    run_both_ways,
    snapshot,
)

#: mostly plain, so that the fast path runs a long way before an increment hands the rest over
long_batches = st.one_of(
    st.lists(st.one_of(*([plain] * 12), increments), min_size=0, max_size=48),
    st.tuples(
        st.lists(plain, min_size=5, max_size=40),
        st.lists(increments, max_size=3),
        st.lists(plain, max_size=10),
    ).map(lambda parts: parts[0] + parts[1] + parts[2]),
)

steps = st.one_of(
    st.tuples(st.just("incs"), long_batches),
    st.tuples(st.just("incs"), long_batches),
    st.tuples(st.just("incs"), long_batches),
    st.tuples(st.just("incs"), long_batches),
    st.tuples(st.just("decs"), long_batches),
    st.tuples(st.just("start_journal"), st.sampled_from([None, (1, 2), (3,), ()])),
    st.tuples(st.just("fold"), st.none()),
    st.tuples(st.just("merge"), st.dictionaries(st.integers(1, 5), st.integers(0, 5))),
    st.tuples(st.just("merge"), st.dictionaries(st.integers(1, 5), st.integers(0, 5))),
    st.tuples(st.just("stop_journal"), st.none()),
    st.tuples(
        st.just("tick"),
        st.sampled_from([0.5, 61.0, 3600.0, 86_400.0, 30 * 3600.0, -61.0, -3600.0, -90_000.0]),
    ),
)


def _given_as(batch: list[Any], how: str) -> Iterable[Any]:
    if how == "tuple":
        return tuple(batch)
    if how == "generator":
        return (inc for inc in batch)
    return batch


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    program=st.lists(steps, min_size=1, max_size=16),
    setting=st.builds(
        Setting,
        max_keys=st.sampled_from([1, 2, 3, 10_000]),
        max_campaigns=st.sampled_from([None, 1, 2, 4]),
        journal_limit=st.sampled_from([0, 1, 6, 40, 5_000_000]),
        window=st.sampled_from([(0, 10), (4, 12), (8, 8), (0, 0), (10, 13)]),
        uncounted=st.frozensets(st.integers(1, 14), max_size=6),
        as_decoded=st.booleans(),
    ),
    how=st.sampled_from(["list", "tuple", "generator"]),
)
def test_long_mostly_plain_batches_leave_the_state_apply_each_leaves_whatever_the_clock_does(
    program: list[tuple[str, Any]], setting: Setting, how: str
) -> None:
    run_both_ways(program, setting, lambda batch: _given_as(batch, how))


def test_a_long_plain_run_after_a_merge_then_a_repeat_inside_the_window_is_counted_once() -> None:
    """200 plain increments of a merged campaign, their action ids above the snapshot's highest
    (the fast path, the horizon in ``seen``), while a journal lists every change, then an
    increment of an action the snapshot counted (skipped) and one it did not (recorded), and a
    journal bound that only the whole batch crosses: the state is apply_each's, key for key."""
    fast, each = StatsState(), StatsState()
    for state in (fast, each):
        state.clock = lambda: NOW
        state.merge(_result({1: 3}, 10, 4, frozenset({9})))
        state.start_journal()
        state.journal_limit = 201  # the fast part (200) fits; with the rest's 1 more it does not
    batch = [Increment(1, 1, "sign", "DE", True, action_id=11 + i) for i in range(200)]
    batch += [
        Increment(1, 1, "sign", "DE", True, action_id=10),  # counted by the snapshot: skipped
        Increment(1, 1, "sign", "DE", True, action_id=9),  # not counted: applied, recorded
        Increment(2, 1, "sign", None, True),  # plain again, after the handover
    ]
    assert fast.apply_many(batch) == each.apply_each(batch) == []
    assert snapshot(fast) == snapshot(each)
    assert fast.stats(1)["supporters"] == 3 + 200 + 1
    assert fast.already_counted == 1
    assert fast.counted_now == {1: {9: True}}
    assert fast.journal is None
    assert fast.journal_overflow
    assert fast.journal_size == 202


# -- end to end: a real server, a real socket, real calculations against Postgres --------------


class _Backend:
    """Proca's way with actions (tests/test_exact_for_real.py), announced in batches over a
    socket: actions inserted accepted (their ids above every snapshot's highest: the fast path)
    and actions inserted ``new`` and accepted later (ids inside the window: the general path),
    so that each batch runs the fast path a long way before it hands over."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.person = 0
        self.pending: list[tuple[int, str]] = []
        self.counted: list[tuple[int, str]] = []

    async def setup(self) -> None:
        await truncate_all(self.conn)
        await self.conn.execute("INSERT INTO orgs (id, name) VALUES (1, 'org')")
        await self.conn.execute("INSERT INTO campaigns (id, name, status) VALUES (1, 'c', 1)")
        await self.conn.execute(
            "INSERT INTO action_pages (id, name, campaign_id, org_id) VALUES (1, 'p', 1, 1)"
        )

    async def insert(self, area: str, status: int) -> int:
        self.person += 1
        async with self.conn.transaction():
            sid = await self.conn.fetchval(
                "INSERT INTO supporters (campaign_id, action_page_id, fingerprint, area, "
                "processing_status, dupe_rank) VALUES (1, 1, $1, $2, 3, 0) RETURNING id",
                self.person.to_bytes(8, "big"),
                area,
            )
            aid: int = await self.conn.fetchval(
                "INSERT INTO actions (supporter_id, action_type, campaign_id, action_page_id, "
                "processing_status) VALUES ($1, 'register', 1, 1, $2) RETURNING id",
                sid,
                status,
            )
        return aid

    async def set_status(self, aid: int, status: int) -> None:
        await self.conn.execute(
            "UPDATE actions SET processing_status = $2 WHERE id = $1", aid, status
        )


async def test_batches_of_new_actions_then_late_acceptances_over_a_socket_equal_a_recount(
    conn: asyncpg.Connection, start: Start
) -> None:
    """Each round: actions inserted accepted and actions accepted late, announced in one
    ``increment_many`` (the new ones first), some rejections in a ``decrement_many``, while a
    calculation merges every 100 ms. After a flush memory equals a recount of the database."""
    backend = _Backend(conn)
    await backend.setup()
    running = await start(ActorConfig(sync_interval=0.1, publish_interval=0.3))
    service = running.service
    await service.resync("all")
    await wait_for(lambda: loaded(service))
    rng = random.Random(16)
    areas = ["DE", "FR", "PL"]
    async with AsyncStatsClient(f"unix://{running.unix}") as client:
        before = await completed(service)
        for _ in range(10):
            fresh: list[Increment] = []
            for _ in range(40):
                area = rng.choice(areas)
                aid = await backend.insert(area, 3)
                fresh.append(Increment(1, 1, "register", area, True, action_id=aid))
                backend.counted.append((aid, area))
            late: list[Increment] = []
            for _ in range(min(10, len(backend.pending))):
                aid, area = backend.pending.pop(rng.randrange(len(backend.pending)))
                await backend.set_status(aid, 3)
                late.append(Increment(1, 1, "register", area, True, action_id=aid))
                backend.counted.append((aid, area))
            for _ in range(15):
                area = rng.choice(areas)
                backend.pending.append((await backend.insert(area, 1), area))
            client.increment_many(fresh[::-1] + late)  # highest ids first
            gone: list[Increment] = []
            for _ in range(3):
                aid, area = backend.counted.pop(rng.randrange(len(backend.counted)))
                await backend.set_status(aid, 2)
                gone.append(Increment(1, 1, "register", area, True, action_id=aid))
            client.decrement_many(gone)
            await client.flush()
            seen = await completed(service)

            async def another(seen: int = seen) -> bool:
                return await completed(service) > seen

            await wait_for(another)
        await client.flush()
    assert await memory_of(service, [1]) == await recount(conn, [1])
    assert await completed(service) - before >= 10
