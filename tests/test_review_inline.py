"""Review of the queries answered inline (docs/design.md, "Queries inline"): what the read
callback's answers must keep of the mailbox path's contracts.

No Postgres: the service runs on a source that finds an empty database (as in
tests/test_inline_reads.py); the sockets are real.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgpack
import pytest

from campaignstats.server import ServerConfig, StatsServer
from campaignstats.service import StatsService

from .helpers import Raw, wait_for
from .test_perf_paths import started

pytestmark = pytest.mark.timeout(120)

#: areas of the campaign queried below: its STATS is a few KB
AREAS = 300


@contextlib.asynccontextmanager
async def unix_server(
    service: StatsService, path: Path, **config: object
) -> AsyncIterator[StatsServer]:
    server = StatsServer(service, ServerConfig(host=None, unix_path=path, **config))  # type: ignore[arg-type]
    await server.start()
    try:
        yield server
    finally:
        await server.close(5)


async def fill_wide_campaign(path: Path, cid: int) -> int:
    """Campaign ``cid`` with AREAS areas; returns the size of its encoded ``stats`` reply."""
    conn = await Raw.unix(path)
    try:
        await conn.send(["incs", [[cid, 3, "register", f"A{i:04d}", True] for i in range(AREAS)]])
        assert await conn.call("flush", 1) == ["ok", 1, None]
        reply = await conn.call("stats", 2, cid)
        assert len(reply[2]["area"]) == AREAS
        return len(msgpack.packb(reply))
    finally:
        await conn.close()


# -- the output bound -----------------------------------------------------------------------------


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "mailbox"])
async def test_a_client_that_pipelines_queries_without_reading_is_closed_past_max_output(
    tmp_path: Path, inline: bool
) -> None:
    # README, "Bounds": a connection's output is bounded by --max-output; docs/protocol.md: a
    # client that does not read its replies does not make the server grow memory. Through the
    # mailbox each answer is written as it comes and the slow reader is closed past the bound;
    # one read of small queries answered inline must not pile up a multiple of it unchecked.
    max_output = 64 << 10
    service = await started()
    try:
        path = tmp_path / "s.sock"
        async with unix_server(service, path, max_output=max_output, inline_reads=inline) as server:
            reply_size = await fill_wide_campaign(path, 1)
            n = 2_000
            stream = b"".join(msgpack.packb(["stats", rid, 1]) for rid in range(1, n + 1))
            assert len(stream) < server.config.read_size  # one read (or a few)
            assert n * reply_size > 40 * max_output  # replies of 2 MB or so
            slow = await Raw.unix(path)  # sends, never reads
            try:
                before = server.counters.closed_slow
                await slow.send_bytes(stream)
                deadline = time.monotonic() + 10
                held = 0
                while time.monotonic() < deadline:
                    if server.counters.closed_slow > before:
                        break
                    for conn in list(server.connections):
                        if conn.transport is not None and not conn.closed:
                            held = max(held, conn.transport.get_write_buffer_size())
                    await asyncio.sleep(0.01)
                assert server.counters.closed_slow == before + 1, (
                    f"not closed; the server holds {held:,} bytes of replies for it "
                    f"(max_output {max_output:,})"
                )
                # What it held before the close: the bound and a reply or so, not the read's all.
                assert held <= 2 * max_output + 2 * reply_size
            finally:
                await slow.close()
    finally:
        await service.stop(5)


async def test_queries_inline_after_a_slow_readers_close_are_not_answered_into_memory(
    tmp_path: Path,
) -> None:
    # Once the connection is closed as a slow reader (its transport aborted), the rest of the
    # read's queries have nobody to go to: through the mailbox their answers are dropped
    # (Connection._answered); inline they must not be computed and kept either.
    max_output = 64 << 10
    service = await started()
    try:
        path = tmp_path / "s.sock"
        async with unix_server(service, path, max_output=max_output) as server:
            await fill_wide_campaign(path, 1)
            n = 2_000
            stream = b"".join(msgpack.packb(["stats", rid, 1]) for rid in range(1, n + 1))
            slow = await Raw.unix(path)
            try:
                before = server.counters.reads_inline
                await slow.send_bytes(stream)
                await wait_for(lambda: server.counters.closed_slow > 0, 10)
                await asyncio.sleep(0.1)
                answered = server.counters.reads_inline - before
                assert answered < n // 2, f"{answered} of {n} answered for a closed connection"
            finally:
                await slow.close()
    finally:
        await service.stop(5)


# -- read-only queries must not take what the goals are owed --------------------------------------


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "mailbox"])
async def test_a_top_query_right_after_increments_does_not_lose_the_milestone_they_reached(
    tmp_path: Path, inline: bool
) -> None:
    # ``top`` is read-only (it may be answered inline, or in the read lane), but refreshing
    # the supporters' ranking took the set of moved campaigns that the goals look at
    # (SupporterRanking.take_moved): the milestone was then never reached, not even by
    # get_goals, until the campaign moved again (docs/protocol.md, "Goals and events").
    service = await started()
    try:
        path = tmp_path / "s.sock"
        async with unix_server(service, path, inline_reads=inline):
            watcher, writer = await Raw.unix(path), await Raw.unix(path)
            try:
                assert await watcher.call("set_goals", 1, 1, {"supporters": [5]}) == [
                    "ok",
                    1,
                    None,
                ]
                assert await watcher.call("sub", 2, 1) == ["ok", 2, None]
                items = [[1, 3, "register", "DE", True] for _ in range(5)]
                await writer.send(["incs", items], ["top", 1, {"by": "supporters", "limit": 3}])
                assert await writer.recv() == [["ok", 1, [[1, 5]]]]
                goals = await writer.call("get_goals", 2, 1)
                assert goals[2]["reached"] == [5], goals
                pushed = await watcher.recv(2, within=5)  # the pub and the event, any order
                events = [m for m in pushed if m[0] == "event"]
                assert [e[2]["threshold"] for e in events] == [5], pushed
            finally:
                await watcher.close()
                await writer.close()
    finally:
        await service.stop(5)


# -- counters -------------------------------------------------------------------------------------


async def test_info_tells_how_many_queries_were_answered_inline(tmp_path: Path) -> None:
    # ServerCounters.reads_inline is counted (commit 3e8e6f8: "counted in reads_inline") but
    # reached no one: info's ``server`` map, the operators' view of the listener, left it out,
    # so nobody could tell whether the inline path is taken in production.
    service = await started()
    try:
        path = tmp_path / "s.sock"
        async with unix_server(service, path) as server:
            conn = await Raw.unix(path)
            try:
                for rid in range(1, 4):
                    assert (await conn.call("stats", rid, 1))[0] == "ok"
                info = (await conn.call("info", 9))[2]
                assert info["server"]["reads_inline"] == server.counters.reads_inline == 4
            finally:
                await conn.close()
    finally:
        await service.stop(5)
