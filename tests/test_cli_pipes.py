"""The command-line client in a shell pipeline: a reader that stops reading early
(``campaignstats stats --json ... | head``) is not the server being unreachable."""

from __future__ import annotations

import asyncio
import os
import sys

from .helpers import Running


async def _cli(running: Running, *args: str, read: bool) -> tuple[int, bytes, bytes]:
    """``campaignstats ARGS --url ...`` in a process of its own; with ``read`` False its stdout
    is a pipe whose reader has gone before it writes."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "campaignstats.cli",
        *args,
        "--url",
        f"tcp://127.0.0.1:{running.port}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # as in a user's shell: stdout block-buffered (this machine sets PYTHONUNBUFFERED)
        env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    if read:
        out, err = await proc.communicate()
        return await proc.wait(), out, err
    transport = proc._transport  # type: ignore[attr-defined]
    transport.get_pipe_transport(1).close()  # the reader goes away, as `head` does
    err = await proc.stderr.read()
    return await proc.wait(), b"", err


async def test_a_reader_that_goes_away_ends_the_command_quietly_not_as_an_unreachable_server(
    server: Running,
) -> None:
    ids = [str(cid) for cid in range(1, 5_001)]  # the JSON is far larger than a pipe's buffer
    rc, out, err = await _cli(server, "stats", "--json", *ids, read=True)
    assert rc == 0, err
    assert len(out) > 200_000
    rc, _, err = await _cli(server, "stats", "--json", *ids, read=False)
    assert b"cannot reach the server" not in err, err
    assert b"Traceback" not in err, err
    assert b"Exception ignored" not in err, err
    assert rc == 141  # as a process SIGPIPE ended


async def test_a_server_that_is_not_there_is_still_said_to_be_unreachable(server: Running) -> None:
    port = server.port
    await server.server.close()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "campaignstats.cli",
        "info",
        "--url",
        f"tcp://127.0.0.1:{port}",
        "--timeout",
        "2",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 1
    assert b"cannot reach the server" in err, err


async def test_a_short_output_whose_reader_has_gone_ends_quietly_too(server: Running) -> None:
    # The output fits in stdout's buffer: the print succeeds, the flush at exit does not.
    rc, _, err = await _cli(server, "stats", "--json", "1", read=False)
    assert b"Exception ignored" not in err, err
    assert b"Traceback" not in err, err
    assert rc == 141, err


async def test_info_whose_reader_has_gone_ends_quietly(server: Running) -> None:
    rc, _, err = await _cli(server, "info", read=False)
    assert b"Exception ignored" not in err, err
    assert rc == 141, err
