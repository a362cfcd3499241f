"""The findings of a review from outside: README.md and docs/*.md followed as a new user would,
every command and example run as written, and what happened compared with what they promise.

Each test failed before its fix; its docstring says what was wrong and what must happen.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from campaignstats.client import StatsClient
from campaignstats.errors import Invalid

# ruff: noqa: F811  (the fixtures of tests/test_http.py, imported, are parameters here)
from .helpers import Running, serve_process
from .test_http import Http, http, make_http  # noqa: F401

pytestmark = pytest.mark.timeout(90)

TOO_LARGE = "99999999999999999999"  # 20 digits: past 2**64, so not even a MessagePack integer


async def _cli(running: Running, *args: str) -> tuple[int, str]:
    """``campaignstats ARGS --url ...`` in a process of its own: its status and its stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "campaignstats.cli", *args,
        "--url", f"tcp://127.0.0.1:{running.port}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    return await proc.wait(), err.decode(errors="replace")


# -- HTTP ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        f"/v1/campaigns/{TOO_LARGE}",
        f"/v1/campaigns/{TOO_LARGE}/count",
        f"/v1/campaigns/{TOO_LARGE}/goals",
        f"/v1/pages/{TOO_LARGE}",
        f"/v1/campaigns?ids=1,{TOO_LARGE}",
        f"/v1/campaigns/1?exclude_org={TOO_LARGE}",
    ],
)
async def test_an_id_of_decimal_digits_past_the_range_is_invalid_over_http_not_a_bad_message(
    http: Http, path: str
) -> None:
    """docs/http.md: "an id that is not decimal digits is ``bad_message``, an id out of 1 to
    2**63-1 ... is ``invalid``". An id of 20 digits was answered ``bad_message``, "campaign id
    must be a decimal integer, not '99999999999999999999'": it is one, only too large (19
    digits past 2**63-1 were ``invalid`` already)."""
    r = await http.client.get(path)
    assert r.status_code == 400
    assert r.json()["error"] == "invalid", r.json()
    assert "decimal integer" not in r.json()["message"]


# -- the command line and the clients -----------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("stats", TOO_LARGE),
        ("metrics", TOO_LARGE),
        ("history", TOO_LARGE),
        ("recent", TOO_LARGE),
        ("goals", TOO_LARGE),
        ("resync", TOO_LARGE),
    ],
)
async def test_a_client_command_given_an_id_too_large_for_the_wire_says_so_without_a_traceback(
    server: Running, args: tuple[str, ...]
) -> None:
    """``campaignstats stats 99999999999999999999`` ended in a traceback from msgpack's packer
    (``OverflowError: Integer value out of range``), where ``stats 9223372036854775808`` says
    "campaign ids must be between 1 and 2**63-1". Any id the wire cannot carry is the same
    mistake and must be the same one-line error."""
    rc, err = await _cli(server, *args)
    assert rc == 1, err
    assert "Traceback" not in err, err
    assert "2**63-1" in err, err


async def test_a_call_with_an_id_too_large_for_the_wire_raises_invalid_and_the_client_goes_on(
    server: Running,
) -> None:
    """The same through the blocking client: ``stats.stats(2**64)`` raised ``OverflowError``
    (no :class:`~campaignstats.errors.StatsError`: a caller catching the library's errors
    missed it), and a ``subscribe`` of such an id was kept for re-subscription. It must raise
    :class:`~campaignstats.errors.Invalid` and leave the client as it was."""

    def use() -> int:
        client = StatsClient(f"tcp://127.0.0.1:{server.port}")
        try:
            with pytest.raises(Invalid, match=r"2\*\*63-1"):
                client.stats(2**64, timeout=5)
            with pytest.raises(Invalid, match=r"2\*\*63-1"):
                client.history(2**70, timeout=5)
            return client.stats(1, timeout=5)["supporters"]
        finally:
            client.close()

    assert await asyncio.to_thread(use) == 0  # the server runs in this test's event loop


async def test_serve_takes_log_format_after_the_command_as_the_readme_lists_it(
    module_dsn: str,
) -> None:
    """README.md's table of ``campaignstats serve`` options (and ``python run.py``, which
    passes its arguments after ``serve``) lists ``--log-format``; ``campaignstats serve
    --log-format json`` failed with "unrecognized arguments" (it was accepted only before the
    command)."""
    proc, _ = await serve_process(
        "--dsn", module_dsn, "--port", "0", "--no-http", "--log-format", "json",
    )  # fmt: skip
    proc.terminate()
    assert await proc.wait() == 0


def _processes_using(path: Path) -> list[str]:
    """The command lines of the processes that name ``path`` (the embedded Postgres names its
    data directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(path) in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


async def test_a_sigterm_while_serve_starts_stops_it_and_leaves_no_embedded_postgres_behind(
    tmp_path: Path,
) -> None:
    """README: "Ctrl-C (or SIGTERM) stops the server gracefully". ``make run`` starts with the
    embedded Postgres and, on first use, loads demo data; a SIGTERM then (systemd, docker
    stop, a supervisor giving up on a slow start) killed the Python process at once, as the
    handler was installed only once it listened, and left the embedded Postgres running with
    no one to stop it (its data directory held by an orphan). A SIGTERM at any time must stop
    ``serve`` and the Postgres it started."""
    data_dir = tmp_path / "pg"
    environ = {k: v for k, v in os.environ.items() if k != "CAMPAIGNSTATS_TOKEN"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "campaignstats.cli", "serve", "--data-dir", str(data_dir),
        "--demo-if-empty", "100000", "--port", "0", "--no-http",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=environ,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(60):
            while b"empty database: adding" not in (line := await proc.stdout.readline()):
                assert line, "serve ended before loading its demo data"
        proc.send_signal(signal.SIGTERM)  # while the demo data is loading
        async with asyncio.timeout(60):
            await proc.communicate()
        assert proc.returncode == 0, "SIGTERM is a graceful stop, not a kill by the signal"
        assert _processes_using(data_dir) == []
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for line in _processes_using(data_dir):  # never leave a Postgres to the next test
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
