"""One test per finding of the review of the exact-merge round: each failed before its fix."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

from campaignstats.actor.actor import ActorConfig
from campaignstats.actor.snapshot import load_snapshot, save_snapshot
from campaignstats.cli import main
from campaignstats.errors import CalculationError, UsageError
from campaignstats.model import CalculationResult, CampaignStats, Scope, scope_name
from campaignstats.service import StatsService

from .helpers import wait_for


class FailingSource:
    """A database that is always down."""

    def __init__(self) -> None:
        self.calls = 0

    async def calculate(self, scope: Scope) -> CalculationResult:
        self.calls += 1
        raise CalculationError("database down (injected)")


class ScriptedSource:
    """The first calculation finds an empty database; the later ones wait until released."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()

    async def calculate(self, scope: Scope) -> CalculationResult:
        self.calls += 1
        if self.calls > 1:
            await self.release.wait()
        return CalculationResult(scope_name(scope), {}, 0, started_at=time.time())


@pytest.fixture
async def services() -> AsyncIterator[Callable[..., StatsService]]:
    started: list[StatsService] = []

    def make(source: Any, config: ActorConfig, **options: Any) -> StatsService:
        service = StatsService(source, config, **options)
        started.append(service)
        return service

    yield make
    for service in started:
        await service.stop(timeout=5)


async def test_the_backoff_survives_more_than_1025_failed_calculations_in_a_row(
    services: Callable[..., StatsService],
) -> None:
    # 2 ** 1024 overflows a float: before the fix, failure 1,025 (17 hours of outage at the
    # default backoff) crashed the actor, which restarted from zero.
    source = FailingSource()
    config = ActorConfig(sync_interval=1e-4, backoff_initial=1e-6, backoff_max=1e-5)
    service = services(source, config)
    await service.start()
    await wait_for(lambda: source.calls > 1_100, timeout=60)
    info = await service.info()
    assert info["restarts"] == 0
    assert info["calculations"]["failed"] > 1_100


@pytest.mark.parametrize("interval", ["0", "-1", "nan", "inf"])
def test_serve_refuses_a_sync_interval_that_is_not_positive(
    interval: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: 0 spun a core and logged 40,000 "skipped" warnings a second.
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--sync-interval", interval])
    assert exit_info.value.code == 2
    assert "positive number of seconds" in capsys.readouterr().err


def test_the_embedding_api_refuses_a_sync_interval_that_is_not_positive() -> None:
    with pytest.raises(UsageError, match="sync_interval"):
        ActorConfig(sync_interval=0)
    with pytest.raises(UsageError, match="publish_interval"):
        ActorConfig(publish_interval=-1)


def _write(path: Path, rows: list[Any], fmt: int = 2) -> None:
    path.write_bytes(msgpack.packb({"format": fmt, "saved_at": 0, "campaigns": rows}))


@pytest.mark.parametrize(
    "rows",
    [
        [[1, None, {}, {}, {}, 0, 0]],  # a None count
        [[1, 3, {"sign": "3"}, {}, {}, 0, 0]],  # a count that is a string
        [[1, 3, {7: 3}, {}, {}, 0, 0]],  # an action type that is not a string
        [[0, 3, {}, {}, {}, 0, 0]],  # campaign id 0
        [[1, -3, {}, {}, {}, 0, 0]],  # a negative count
        [[1, 3]],  # a short row
    ],
)
def test_a_snapshot_that_decodes_but_holds_wrong_values_is_ignored(
    tmp_path: Path, rows: list[Any]
) -> None:
    path = tmp_path / "snap"
    _write(path, rows)
    assert load_snapshot(path) is None


def test_a_snapshot_that_cannot_be_read_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "snap"
    path.mkdir()  # reading a directory raises IsADirectoryError, not FileNotFoundError
    assert load_snapshot(path) is None


def test_a_first_format_snapshot_is_still_read(tmp_path: Path) -> None:
    path = tmp_path / "snap"
    _write(path, [[4, 2, {"sign": 2}, {"DE": 1}, {7: 2}, 0]], fmt=1)
    assert load_snapshot(path) == {4: CampaignStats(2, {"sign": 2}, {"DE": 1}, {7: 2}, 0, 0)}


async def test_a_damaged_snapshot_does_not_keep_the_service_from_starting(
    tmp_path: Path, services: Callable[..., StatsService]
) -> None:
    # Before: the actor crashed at its first increment of the campaign, after every restart,
    # until the supervisor gave up.
    path = tmp_path / "snap"
    _write(path, [[1, None, {"sign": None}, {}, {}, 0, 0]])
    service = services(ScriptedSource(), ActorConfig(sync_interval=3600, snapshot_path=path))
    await service.start()
    service.increment(1, 1, "sign", None, True)
    assert (await service.stats(1))["supporters"] == 1
    assert (await service.info())["restarts"] == 0


def test_a_snapshot_write_that_fails_leaves_no_temporary_file_and_the_old_one_intact(
    tmp_path: Path,
) -> None:
    path = tmp_path / "snap"
    save_snapshot(path, {1: CampaignStats(1, {"sign": 1})})
    before = path.read_bytes()
    # A full disk, played by a file size limit in a child process: the write fails with EFBIG.
    script = (
        "import resource, signal, sys\n"
        "from pathlib import Path\n"
        "from campaignstats.actor.snapshot import save_snapshot\n"
        "from campaignstats.model import CampaignStats\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "big = {i: CampaignStats(i, {'sign': i}) for i in range(1, 5000)}\n"
        "try:\n"
        "    save_snapshot(Path(sys.argv[1]), big)\n"
        "except OSError as exc:\n"
        "    print(exc.errno)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert done.stdout.strip() == "27"  # EFBIG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap"]
    assert path.read_bytes() == before


async def test_a_restarted_actor_keeps_its_counts_rather_than_an_old_snapshot_file(
    tmp_path: Path, services: Callable[..., StatsService]
) -> None:
    path = tmp_path / "snap"
    save_snapshot(path, {1: CampaignStats(100, {"sign": 100}, {}, {1: 100})})  # days old
    crash = False

    def hook(message: object) -> None:
        if crash:
            raise RuntimeError("injected crash")

    source = ScriptedSource()
    config = ActorConfig(sync_interval=3600, snapshot_path=path, fault_hook=hook)
    service = services(source, config)
    await service.start()
    await wait_for(lambda: source.calls == 1)
    for _ in range(3):
        service.increment(1, 1, "sign", None, True)
    assert (await service.stats(1))["supporters"] == 103  # the file, then three more
    crash = True
    with pytest.raises(Exception, match="crashed"):
        await service.stats(1)
    crash = False
    # The new actor's full calculation is held back, so what it answers is what it kept.
    assert (await service.info())["restarts"] == 1
    assert (await service.stats(1))["supporters"] == 103
    source.release.set()
