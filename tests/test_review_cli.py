"""Review of the command-line changes (cli.py): a client command whose stdout reader has
gone, serve's start-up and its options."""

from __future__ import annotations

import asyncio
import os
import sys

from .helpers import Running


async def _cli_reader_gone(running: Running, *args: str) -> tuple[int, bytes]:
    """``campaignstats ARGS --url ...`` whose stdout is a pipe whose reader has gone before it
    writes (``campaignstats stats 1 | true``)."""
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
    assert proc.stderr is not None
    transport = proc._transport  # type: ignore[attr-defined]
    transport.get_pipe_transport(1).close()
    err = await proc.stderr.read()
    return await proc.wait(), err


async def test_a_short_output_whose_reader_has_gone_ends_quietly_too(server: Running) -> None:
    # The output fits in stdout's buffer: the print succeeds, the flush at exit does not.
    rc, err = await _cli_reader_gone(server, "stats", "--json", "1")
    assert b"Exception ignored" not in err, err
    assert b"Traceback" not in err, err
    assert rc == 141, err


async def test_info_whose_reader_has_gone_ends_quietly(server: Running) -> None:
    rc, err = await _cli_reader_gone(server, "info")
    assert b"Exception ignored" not in err, err
    assert rc == 141, err
