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
from typing import Any

import pytest

from campaignstats.client import StatsClient
from campaignstats.errors import Invalid
from campaignstats.http import HttpConfig, HttpServer, app

# ruff: noqa: F811  (the fixtures of tests/test_http.py, imported, are parameters here)
from .helpers import Raw, Running, processes_using, serve_process
from .test_http import Http, http, make_http  # noqa: F401

pytestmark = pytest.mark.timeout(90)

TOO_LARGE = "99999999999999999999"  # 20 digits: past 2**64, so not even a MessagePack integer


async def _cli(running: Running, *args: str) -> tuple[int, str]:
    """``campaignstats ARGS --url ...`` in a process of its own: its status and its stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "campaignstats.cli", *args,
        "--url", f"tcp://127.0.0.1:{running.port}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "CAMPAIGNSTATS_TOKEN"},
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
        assert processes_using(data_dir) == []
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for line in processes_using(data_dir):  # never leave a Postgres to the next test
            os.kill(int(line.split(":")[0]), signal.SIGKILL)


async def test_http_server_runs_and_closes_an_application_that_mounts_the_stats_app(
    server: Running,
) -> None:
    """docs/http.md, "Embedding": mount the stats app in the application's own (FastAPI,
    Starlette) and serve that "with uvicorn in this event loop"; ``HttpServer(app, host, port)``
    "runs an app with uvicorn inside the running event loop". With the mounting application it
    served, but its ``close()`` raised ``AttributeError: 'Starlette' object has no attribute
    'close'`` (it called the stats app's ``close()`` on whatever it was given), so a program
    doing what the page says ended in a traceback at shutdown."""
    import httpx
    from starlette.applications import Starlette
    from starlette.routing import Mount

    stats_app = app(server.service, HttpConfig())
    api = Starlette(routes=[Mount("/stats", app=stats_app)])
    http_server = HttpServer(api, "127.0.0.1", 0)
    await http_server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_server.port}") as client:
            r = await client.get("/stats/v1/campaigns/1/count")
            assert r.json() == {"campaign_id": 1, "supporters": 0}
    finally:
        await stats_app.close()  # the application's part, as the page says
        await http_server.close()


async def test_history_of_a_page_of_another_campaign_names_the_campaign_the_page_is_in(
    server: Running,
) -> None:
    """README: ``campaignstats history 1 --page 5  # page 5's supporters and actions by day``.
    On the demo data page 5 is campaign 2's, and the command printed "no supporters or
    actions in that range", as if page 5 had none: a page is looked up within the campaign
    given. When the page is known under another campaign, the command must say which."""
    raw = await Raw.tcp(server.port)
    try:
        item = {"campaign": 2, "org": 1, "type": "sign", "new": True, "page": 5}
        await raw.send(["inc", item])
        assert (await raw.call("flush", 1))[:2] == ["ok", 1]
    finally:
        await raw.close()
    rc, out = await _cli_out(server, "history", "1", "--page", "5")
    assert rc == 0
    assert "campaign 2" in out, out
    rc, out = await _cli_out(server, "history", "2", "--page", "5")
    assert rc == 0
    assert out.splitlines()[0].split() == ["UTC", "supporters", "actions"]


async def test_top_prints_what_its_columns_are(server: Running) -> None:
    """``campaignstats top`` printed bare number pairs (``1  12,889``) where ``stats`` prints a
    header: nothing said which number is the campaign and which the count (supporters, last
    hour or today, as ``--by`` chose)."""
    raw = await Raw.tcp(server.port)
    try:
        await raw.send(["inc", {"campaign": 3, "org": 1, "type": "sign", "new": True}])
        assert (await raw.call("flush", 1))[:2] == ["ok", 1]
    finally:
        await raw.close()
    rc, out = await _cli_out(server, "top", "--by", "today")
    assert rc == 0
    lines = [line.split() for line in out.splitlines()]
    assert lines[0] == ["campaign", "today"], out
    assert ["3", "1"] in lines[1:]


async def _cli_out(running: Running, *args: str) -> tuple[int, str]:
    """``campaignstats ARGS --url ...``: its status and its stdout."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "campaignstats.cli", *args,
        "--url", f"tcp://127.0.0.1:{running.port}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    out, _ = await proc.communicate()
    return await proc.wait(), out.decode()


@pytest.mark.parametrize(
    ("given", "said"), [("wrong", "wrong token"), (None, "needs a token")], ids=["wrong", "none"]
)
async def test_a_client_with_a_wrong_or_no_token_is_told_which_not_to_send_a_hello_first(
    start: Any, given: str | None, said: str
) -> None:
    """``campaignstats stats 1 --token wrong`` against a server with a token said "a hello
    with the server's token must come first": the client had sent a hello first, with a token.
    A wrong token must be called wrong, and a missing one missing."""
    running = await start(token="sekret")
    rc, err = await _cli(running, "stats", "1", *(["--token", given] if given else []))
    assert rc == 1
    assert said in err, err
    assert "must come first" not in err, err


@pytest.mark.parametrize(
    "option",
    [
        ("serve", "--port", "70000"),
        ("serve", "--http-port", "-1"),
        ("serve", "--mailbox-size", "0"),
        ("serve", "--max-connections", "0"),
        ("serve", "--max-message", "0"),
        ("serve", "--max-batch", "0"),
        ("serve", "--max-string", "0"),
        ("serve", "--max-keys", "0"),
        ("serve", "--max-output", "-1"),
        ("serve", "--statement-timeout", "0"),
        ("serve", "--idle-timeout", "-1"),
        ("calculate", "--statement-timeout", "-1"),
    ],
    ids=lambda option: " ".join(option),
)
async def test_an_option_out_of_its_range_is_refused_by_name_before_anything_starts(
    module_dsn: str, option: tuple[str, str, str]
) -> None:
    """``serve --port 70000`` listened on port 4464 (70000 modulo 65536) and said so;
    ``--mailbox-size 0`` and ``--http-port -1`` ended in tracebacks; ``--statement-timeout 0``
    started a server whose every calculation failed ("ran over 0 s"), retried for ever; a limit
    of 0 (``--max-batch``, ``--max-string``, ``--max-message``, ``--max-keys``,
    ``--max-connections``) started a server that refused everything. Like ``--sync-interval``
    and ``--http-max-age``, each must be refused at once, naming the option (status 2)."""
    command, *rest = option
    environ = {k: v for k, v in os.environ.items() if k != "CAMPAIGNSTATS_TOKEN"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "campaignstats.cli", command, "--dsn", module_dsn, *rest,
        *(["--port", "0", "--no-http"] if command == "serve" and rest[0] != "--port" else []),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=environ,
    )  # fmt: skip
    try:
        async with asyncio.timeout(30):  # a server that started instead runs until killed
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = err.decode(errors="replace")
    assert proc.returncode == 2, text
    assert f"argument {rest[0]}" in text, text
    assert "Traceback" not in text, text


async def test_run_py_started_by_another_python_runs_in_the_projects_venv() -> None:
    """run.py's docstring and README: ``python run.py`` works once ``.venv`` exists, as it
    re-executes itself there. It compared the two interpreters' resolved paths, and a venv's
    ``python`` is a symlink to the very interpreter that made it: started by that one
    (``python3 run.py``, the usual case), it never re-executed and said "campaignstats is not
    installed here: run `make run`" with ``.venv`` in place."""
    root = Path(__file__).resolve().parents[1]
    base = getattr(sys, "_base_executable", None)
    if base is None or not (root / ".venv" / "bin" / "python").exists():
        pytest.skip("needs the project's .venv and the interpreter it was made from")
    environ = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    proc = await asyncio.create_subprocess_exec(
        base, str(root / "run.py"), "--help",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=environ, cwd="/",
    )  # fmt: skip
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "usage: campaignstats serve" in text, text


async def test_serve_with_no_tcp_and_no_unix_socket_says_what_is_missing(module_dsn: str) -> None:
    """``serve --no-tcp`` ("listen on the Unix socket only") without ``--unix PATH`` started
    the database side, then ended in a traceback (``ValueError: nothing to listen on``). It
    must be refused at once, naming ``--unix``, with status 2."""
    environ = {k: v for k, v in os.environ.items() if k != "CAMPAIGNSTATS_TOKEN"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "campaignstats.cli", "serve", "--dsn", module_dsn,
        "--no-tcp", "--no-http",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=environ,
    )  # fmt: skip
    _, err = await proc.communicate()
    text = err.decode(errors="replace")
    assert proc.returncode == 2, text
    assert "--unix" in text, text
    assert "Traceback" not in text, text


def _ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
async def test_the_command_serve_prints_to_query_it_works_on_an_ipv6_host(module_dsn: str) -> None:
    """``serve --host ::1`` printed ``listening on tcp://::1:PORT`` and ``query it:
    campaignstats stats 1 --url tcp://::1:PORT``; run as printed, that command failed with
    "bad port in 'tcp://::1:PORT'" (an IPv6 address in a URL is written in brackets, as the
    HTTP line beside it was)."""
    environ = {k: v for k, v in os.environ.items() if k != "CAMPAIGNSTATS_TOKEN"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "campaignstats.cli", "serve", "--dsn", module_dsn,
        "--host", "::1", "--port", "0", "--no-http",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=environ,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(30):
            while "query it:" not in (line := (await proc.stdout.readline()).decode()):
                assert line, "serve ended before listening"
        command = line.split("query it:", 1)[1].split()
        assert command[:3] == ["campaignstats", "stats", "1"], line
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "campaignstats.cli", *command[1:],
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=environ,
        )  # fmt: skip
        out, err = await client.communicate()
        assert client.returncode == 0, err.decode(errors="replace")
        assert "supporters" in out.decode()
    finally:
        proc.terminate()
        await proc.wait()


@pytest.mark.parametrize(
    "command",
    [
        ("slots",),
        ("calculate", "1"),
        ("init-db",),
        ("demo", "--actions", "10"),
        ("serve", "--follow", "--slot", "rux", "--port", "0", "--no-http"),
    ],
)
async def test_a_database_command_that_cannot_reach_the_database_does_not_blame_a_server(
    command: tuple[str, ...],
) -> None:
    """``campaignstats calculate 1 --dsn postgresql://...`` (and ``slots``, ``init-db``,
    ``demo``, and ``serve --follow``, which sets its slot up first) with the database down said
    "cannot reach the server": these commands talk to no campaignstats server (or are it), so a
    user goes looking for one. They must say it is the database they cannot reach."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "campaignstats.cli", *command,
        "--dsn", "postgresql://nobody@127.0.0.1:1/nothing",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    text = err.decode(errors="replace")
    assert proc.returncode == 1, text
    assert "cannot reach the database" in text, text
    assert "cannot reach the server" not in text, text


@pytest.mark.parametrize("which", ["--port", "--http-port"])
async def test_serve_on_a_port_already_taken_says_so_in_one_line(
    module_dsn: str, which: str
) -> None:
    """A port in use (a second ``make run``, another program on 7400) ended ``serve`` in a
    traceback: ``OSError: [Errno 98] error while attempting to bind ...`` for the socket, and
    ``OSError: cannot listen on 127.0.0.1:7401`` from deep in the HTTP server. It must be one
    line saying it cannot listen there, and stop what it had started."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        ports = ["--port", port, "--no-http"] if which == "--port" else ["--port", "0"]
        if which == "--http-port":
            ports += ["--http-port", port]
        environ = {k: v for k, v in os.environ.items() if k != "CAMPAIGNSTATS_TOKEN"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "campaignstats.cli", "serve", "--dsn", module_dsn, *ports,
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
    assert proc.returncode == 1, text
    assert "cannot listen" in text, text
    assert port in text, text
    assert "Traceback" not in text, text


async def test_a_count_past_the_largest_says_so_instead_of_asking_for_at_least_one(
    server: Running,
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "campaignstats.cli", "inc", "1", "7", "register",
        "--count", "99999999999999999999", "--url", f"tcp://127.0.0.1:{server.port}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode != 0
    assert b"count must be between 1 and 2**63-1" in err, err
    assert (await server.service.stats(1))["supporters"] == 0  # nothing applied
