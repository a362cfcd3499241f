"""Review of the command-line changes (cli.py): a client command whose stdout reader has
gone, serve's start-up and its options."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from campaignstats.client import StatsClient
from campaignstats.errors import Invalid, UsageError

from .helpers import Running, processes_using

# -- signals ------------------------------------------------------------------------------------


def _sigint_as_in_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def _signalled(
    args: list[str], data_dir: Path, wait_for: bytes, sig: int, *, on_stderr: bool = False
) -> tuple[int | None, bytes, list[str]]:
    """Runs ``campaignstats ARGS``, sends ``sig`` once ``wait_for`` is printed (on stdout, or on
    stderr), and returns its status, what it printed and the processes of ``data_dir`` still
    running once it ended (found before they are killed: none is left to the next test)."""
    environ = {k: v for k, v in os.environ.items() if k != "CAMPAIGNSTATS_TOKEN"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "campaignstats.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=environ,
        # Ctrl-C as in a terminal: a suite started in the background by a shell (`cmd &`)
        # ignores SIGINT, and its children inherit that (a command then rightly ignores it)
        preexec_fn=_sigint_as_in_a_terminal,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stderr is not None
    stream = proc.stderr if on_stderr else proc.stdout
    seen = b""
    try:
        async with asyncio.timeout(90):
            while wait_for not in seen:
                chunk = await stream.read(4096)
                assert chunk, f"ended before {wait_for!r}: {seen[-2000:]!r}"
                seen += chunk
        proc.send_signal(sig)
        async with asyncio.timeout(90):
            out, err = await proc.communicate()
        await asyncio.sleep(0.5)  # a Postgres told to stop by it, stopping
        return proc.returncode, seen + out + err, processes_using(data_dir)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for line in processes_using(data_dir):  # never leave a Postgres to the next test
            os.kill(int(line.split(":")[0]), signal.SIGKILL)


@pytest.mark.timeout(240)
async def test_a_sigterm_during_the_first_calculation_stops_serve_cleanly(tmp_path: Path) -> None:
    """A signal after the demo data, while the first calculation runs: serve stops with 0, its
    snapshot written, its Unix socket removed, the embedded Postgres stopped."""
    data_dir = tmp_path / "pg"
    sock = tmp_path / "s.sock"
    snapshot = tmp_path / "snap.bin"
    args = [
        "serve", "--data-dir", str(data_dir), "--demo-if-empty", "20000", "--port", "0",
        "--no-http", "--unix", str(sock), "--snapshot", str(snapshot),
    ]  # fmt: skip
    rc, text, running = await _signalled(
        args, data_dir, b"calculation.started", signal.SIGTERM, on_stderr=True
    )
    assert rc == 0, text[-3000:]
    assert running == []
    assert not sock.exists()
    assert b"Traceback" not in text, text[-3000:]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_while_demo_loads_leaves_no_embedded_postgres_behind(
    tmp_path: Path, sig: int
) -> None:
    """``campaignstats demo`` on the embedded Postgres (README: ``campaignstats demo --actions
    1000000``): serve was fixed so that a SIGTERM while it loads demo data stops the Postgres
    it started (tests/test_review_outside.py); the demo command itself must too, and leave
    nothing loaded (one transaction)."""
    data_dir = tmp_path / "pg"
    args = ["demo", "--data-dir", str(data_dir), "--actions", "2000000"]
    rc, text, running = await _signalled(args, data_dir, b"demo:", sig, on_stderr=True)
    assert running == [], f"status {rc}: {text[-2000:]!r}"
    assert b"Traceback" not in text, text[-3000:]
    # stopped by the signal, not after loading the 2,000,000 actions (status 0)
    assert rc == (130 if sig == signal.SIGINT else 143), text[-2000:]


# -- options ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option",
    [
        # Postgres' statement_timeout is an int of milliseconds: past 2**31-1 ms (24.8 days)
        # every calculation failed ('Value exceeds integer range'), as 0 did before the review
        ("serve", "--statement-timeout", "3000000"),
        ("calculate", "--statement-timeout", "1e12"),
        # under a millisecond it was sent as statement_timeout = 0: no timeout at all
        ("serve", "--statement-timeout", "0.0004"),
        ("calculate", "--statement-timeout", "0.0009"),
        # past what a MessagePack reader takes: an OverflowError traceback on every connection
        # (no client could say hello), the server running on
        ("serve", "--max-message", "99999999999999999999"),
    ],
    ids=lambda option: " ".join(option),
)
@pytest.mark.timeout(60)
async def test_an_option_past_what_it_can_mean_is_refused_by_name(
    module_dsn: str, option: tuple[str, str, str]
) -> None:
    """The outside review's range checks (tests/test_review_outside.py) stop at the low end;
    values too large (or too small for the unit they are sent in) started a server that
    failed every calculation, had no timeout, or answered no connection. Each must be refused
    at once, naming the option (status 2)."""
    command, *rest = option
    environ = {k: v for k, v in os.environ.items() if k != "CAMPAIGNSTATS_TOKEN"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "campaignstats.cli", command, "--dsn", module_dsn, *rest,
        *(["--port", "0", "--no-http"] if command == "serve" else []),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=environ,
    )  # fmt: skip
    try:
        async with asyncio.timeout(20):  # a server that started instead runs until killed
            _, err = await proc.communicate()
    except TimeoutError:
        err = b"(still running)"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = err.decode(errors="replace")
    assert proc.returncode == 2, text[-2000:]
    assert f"argument {rest[0]}" in text, text[-2000:]
    assert "Traceback" not in text, text[-2000:]


@pytest.mark.parametrize(
    "option",
    [
        ("serve", "--statement-timeout", "0.001"),
        ("serve", "--statement-timeout", "2147483"),
        ("calculate", "--statement-timeout", "60"),
        ("serve", "--max-message", str(1 << 20)),
    ],
    ids=lambda option: " ".join(option),
)
def test_the_ends_of_those_ranges_and_the_defaults_are_taken(option: tuple[str, str, str]) -> None:
    from campaignstats.cli import build_parser

    args = build_parser().parse_args(list(option))
    assert getattr(args, option[1].lstrip("-").replace("-", "_")) == float(option[2])


@pytest.mark.parametrize(
    "option",
    [
        # a cap of 0 or less: 'over the limit of -1 campaigns' for every increment, as the
        # review found for the other limits of 0 (--max-keys, --max-batch ...)
        ("serve", "--max-campaigns", "0"),
        ("serve", "--max-campaigns", "-1"),
        # refused only once the embedded Postgres had started, as a failed command (status 1,
        # 'archive_every must be at least 1 second'), not by the option's name
        ("serve", "--archive-every", "0"),
    ],
    ids=lambda option: " ".join(option),
)
@pytest.mark.timeout(60)
async def test_a_limit_the_review_left_unchecked_is_refused_by_name_too(
    module_dsn: str, option: tuple[str, str, str]
) -> None:
    await test_an_option_past_what_it_can_mean_is_refused_by_name(module_dsn, option)


# -- the client ---------------------------------------------------------------------------------


async def test_a_messages_count_past_the_largest_is_told_its_range_not_at_least_zero(
    server: Running,
) -> None:
    """docs/protocol.md: ``messages`` is an int, 0 to 2**63-1. One past it was refused as
    'messages must be >= 0' (the count had the same wrong message, fixed in 3138843)."""

    def use() -> int:
        client = StatsClient(f"tcp://127.0.0.1:{server.port}")
        try:
            with pytest.raises(Invalid, match=r"messages must be between 0 and 2\*\*63-1"):
                client.increment(1, 1, "petition", messages=2**63)
            with pytest.raises(Invalid, match=r"messages must be between 0 and 2\*\*63-1"):
                client.increment(1, 1, "petition", messages=-1)
            client.increment(1, 1, "petition", messages=2**63 - 1)
            client.flush()
            return client.stats(1, timeout=5)["messages"]
        finally:
            client.close()

    assert await asyncio.to_thread(use) == 2**63 - 1


@pytest.mark.parametrize("timeout", [float("nan"), float("inf")])
def test_a_client_timeout_that_is_not_a_finite_number_is_a_usage_error(timeout: float) -> None:
    """'timeouts must be positive' let NaN and infinity through: the first call then ended in
    'ValueError: Invalid value NaN' or 'OverflowError: cannot convert float infinity to
    integer' (``campaignstats info --timeout inf``: a traceback)."""
    with pytest.raises(UsageError, match="timeouts"):
        StatsClient("tcp://127.0.0.1:9", timeout=timeout)


@pytest.mark.parametrize("timeout", ["nan", "inf"])
async def test_a_client_command_with_a_timeout_not_finite_says_so_without_a_traceback(
    server: Running, timeout: str
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "campaignstats.cli", "info", "--timeout", timeout,
        "--url", f"tcp://127.0.0.1:{server.port}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    assert b"Traceback" not in err, err
    assert b"timeout" in err, err
    assert proc.returncode in (1, 2), err


# -- listening ----------------------------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_a_unix_socket_another_server_holds_stops_serve_as_a_port_in_use_does(
    module_dsn: str, tmp_path: Path, server: Running
) -> None:
    """A port in use says 'cannot listen: ...' and stops the service, its snapshot written
    (tests/test_review_outside.py). A Unix socket that another server listens on (a second
    ``serve --unix`` on the same path) went another way: 'command_failed' logged, the service
    (started, its first calculation running) abandoned, no snapshot written. It must be the
    same stop, and the other server's socket left in place."""
    assert server.unix is not None
    snapshot = tmp_path / "snap.bin"
    environ = {k: v for k, v in os.environ.items() if k != "CAMPAIGNSTATS_TOKEN"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "campaignstats.cli", "serve", "--dsn", module_dsn, "--port", "0",
        "--no-http", "--unix", str(server.unix), "--snapshot", str(snapshot),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=environ,
    )  # fmt: skip
    try:
        async with asyncio.timeout(60):
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = err.decode(errors="replace")
    assert proc.returncode == 1, text[-2000:]
    assert f"cannot listen: another server is listening on {server.unix}" in text, text[-2000:]
    assert snapshot.exists(), text[-2000:]
    assert server.unix.exists()


# -- run.py -------------------------------------------------------------------------------------


async def test_run_py_switches_to_the_venv_even_when_the_other_python_can_import_the_cli(
    tmp_path: Path,
) -> None:
    """run.py re-executed itself in ``.venv`` only when ``campaignstats.cli`` failed to
    import. Its own folder is on ``sys.path``, so with the other interpreter able to import
    structlog (a distribution's python3-structlog, a ``pip install --user``) the import
    succeeded and serve ran outside the venv: 'ModuleNotFoundError: No module named msgpack',
    a traceback, with ``.venv`` in place. The switch must go by the interpreter, as the
    comment says."""
    root = Path(__file__).resolve().parents[1]
    base = getattr(sys, "_base_executable", None)
    if base is None or not (root / ".venv" / "bin" / "python").exists():
        pytest.skip("needs the project's .venv and the interpreter it was made from")
    import structlog

    (tmp_path / "structlog").symlink_to(Path(structlog.__file__).parent)
    environ = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    environ["PYTHONPATH"] = str(tmp_path)  # the other python imports structlog, nothing else
    environ.pop("CAMPAIGNSTATS_TOKEN", None)
    proc = await asyncio.create_subprocess_exec(
        base, str(root / "run.py"), "--dsn", "postgresql://nobody@127.0.0.1:1/none",
        "--port", "0", "--no-http",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=environ, cwd="/",
    )  # fmt: skip
    async with asyncio.timeout(60):
        out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    assert "Traceback" not in text, text[-2000:]
    assert "cannot reach the database" in text, text[-2000:]
    assert proc.returncode == 1, text[-2000:]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_a_signal_while_serve_loads_its_demo_data_stops_it_with_nothing_left(
    tmp_path: Path, sig: int
) -> None:
    """The review tested SIGTERM during the demo load; Ctrl-C (SIGINT) is the README's first
    way to stop, and a Unix socket must not be left behind either."""
    data_dir = tmp_path / "pg"
    sock = tmp_path / "s.sock"
    args = [
        "serve", "--data-dir", str(data_dir), "--demo-if-empty", "2000000", "--port", "0",
        "--no-http", "--unix", str(sock),
    ]  # fmt: skip
    rc, text, running = await _signalled(args, data_dir, b"demo:", sig, on_stderr=True)
    assert rc == 0, text[-3000:]
    assert running == []
    assert not sock.exists()
    assert b"Traceback" not in text, text[-3000:]
