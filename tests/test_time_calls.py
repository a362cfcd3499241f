"""history, recent and top from end to end: both clients over a real socket, the service, and
the codec's checks (docs/protocol.md, "Additions")."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import msgpack
import pytest

from campaignstats.client import AsyncStatsClient, StatsClient
from campaignstats.errors import BadMessage, Invalid
from campaignstats.protocol import Call, Rejected, ServerCodec
from campaignstats.requests import History, Recent, Top

from .helpers import Running

CAMPAIGN = 9001  # not in the module's database: only the increments below count


async def test_history_recent_and_top_answer_through_both_clients(server: Running) -> None:
    now = time.time()
    hour_ago = now - 3600 * 3
    aio = AsyncStatsClient(f"unix://{server.unix}")
    blocking = StatsClient(f"unix://{server.unix}")
    try:
        aio.increment(CAMPAIGN, 1, "sign", "DE", True, at=hour_ago)
        aio.increment(CAMPAIGN, 1, "sign", "DE", True)
        aio.increment(CAMPAIGN, 1, "share", None, False, 2)
        await aio.flush()
        history = await aio.history(CAMPAIGN, "hour")
        assert history["unit"] == "hour"
        assert history["buckets"] == [
            [int(hour_ago) // 3600 * 3600, 1, 1],
            [int(now) // 3600 * 3600, 1, 3],
        ]
        assert await asyncio.to_thread(blocking.history, CAMPAIGN, "hour") == history
        only_now = await aio.history(CAMPAIGN, "minute", start=now - 600)
        assert [b[1:] for b in only_now["buckets"]] == [[1, 3]]
        recent = await aio.recent(CAMPAIGN, "Pacific/Kiritimati")
        assert recent["last_hour"] == [1, 3]
        assert recent["last_7_days"] == [2, 4]
        assert recent["today"][0] + recent["yesterday"][0] == 2
        assert recent["last_action_at"] >= now - 5
        assert await asyncio.to_thread(blocking.recent, CAMPAIGN, "Pacific/Kiritimati") == recent
        top = await aio.top("last_hour", 5)
        assert [CAMPAIGN, 1] in top
        assert await asyncio.to_thread(blocking.top, "last_hour", 5) == top
        with pytest.raises(Invalid):
            await aio.recent(CAMPAIGN, "Mars/Olympus")
        with pytest.raises(Invalid):
            await asyncio.to_thread(blocking.top, "yesterday")
    finally:
        await aio.close()
        blocking.close()


async def test_the_service_answers_the_same_calls(server: Running) -> None:
    service = server.service
    assert await service.history(424242, "day") == {"unit": "day", "buckets": []}
    empty = await service.recent(424242, "Etc/GMT+12")
    assert empty["today"] == [0, 0]
    assert empty["last_action_at"] is None
    assert isinstance(await service.top("supporters", 3), list)
    with pytest.raises(Invalid):
        await service.history(1, "week")


def _parse(msg: list[object]) -> object:
    codec = ServerCodec()
    (parsed,) = codec.receive_data(msgpack.packb(msg))
    return parsed


def test_the_codec_reads_the_calls_and_refuses_bad_options() -> None:
    assert _parse(["history", 1, 7, {"unit": "day", "from": 10, "to": 20.5}]) == Call(
        1, History(7, "day", 10, 20.5)
    )
    assert _parse(["recent", 2, 7, {}]) == Call(2, Recent(7, "UTC"))
    assert _parse(["top", 3, {"by": "today"}]) == Call(3, Top("today", 10))
    for msg, error in (
        (["history", 4, 7, {"unit": "week"}], Invalid),
        (["history", 4, 7, {"unit": "day", "page": 0}], Invalid),
        (["history", 4, 7, {"unit": "day", "page": "3"}], BadMessage),
        (["history", 4, 7, {"when": 1}], BadMessage),
        (["history", 4, 7, {"from": "yesterday"}], BadMessage),
        (["recent", 4, 7, {"tz": "../../etc/passwd"}], Invalid),
        (["top", 4, {"limit": 0}], Invalid),
        (["top", 4, {"limit": 1001}], Invalid),
        (["top", 4, {"by": 3}], BadMessage),
        (["history", 4, 0, {}], Invalid),
    ):
        parsed = _parse(msg)
        assert isinstance(parsed, Rejected), msg
        assert isinstance(parsed.error, error), msg


async def _cli(*args: str) -> str:
    """``campaignstats ARGS`` in a process of its own (it configures logging); its stdout."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "campaignstats.cli",
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_the_cli_prints_history_as_a_text_chart_and_recent_and_top(server: Running) -> None:
    now = time.time()
    cid = 9002
    aio = AsyncStatsClient(f"unix://{server.unix}")
    try:
        for back, n in ((0, 3), (86400, 1), (3 * 86400, 2)):
            for _ in range(n):
                aio.increment(cid, 1, "sign", None, True, at=now - back)
        await aio.flush()
    finally:
        await aio.close()
    url = f"unix://{server.unix}"
    lines = (await _cli("history", str(cid), "--unit", "day", "--url", url)).splitlines()
    assert lines[0].split() == ["UTC", "supporters", "actions"]
    rows = [line.split() for line in lines[1:]]
    assert [row[1:3] for row in rows] == [["2", "2"], ["1", "1"], ["3", "3"]]
    assert [len(row[3]) for row in rows] == [27, 13, 40]  # bars scaled to the largest day
    assert rows[-1][0] == time.strftime("%Y-%m-%d", time.gmtime(now))
    recent = json.loads(await _cli("recent", str(cid), "--tz", "Asia/Kolkata", "--url", url))
    assert recent["last_7_days"] == [6, 6]
    out = await _cli("top", "--by", "supporters", "--limit", "1000", "--url", url)
    assert [str(cid), "6"] in [line.split() for line in out.splitlines()]
