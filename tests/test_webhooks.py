"""Webhooks (docs/design.md, "Webhooks"): a real receiver on 127.0.0.1 gets signed deliveries,
retried while it answers 500 or is down, and each threshold exactly once across restarts of a
real server process, a ``kill -9`` between the event and its delivery included."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from campaignstats.webhooks import (
    GIVE_UP_AFTER,
    Outbox,
    WebhookConfig,
    WebhookSender,
    redact_url,
)

from .helpers import Raw, serve_process, wait_for
from .test_goals import Signatures

SECRET = "s3cret-for-tests"


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def event(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


@dataclass
class Receiver:
    """A minimal HTTP/1.1 server: records every POST, answers ``statuses`` in turn (then 200)."""

    port: int
    statuses: list[int] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            status = self.statuses.pop(0) if self.statuses else 200
            self.deliveries.append(Delivery(headers, body, status))
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def delivered(self) -> list[Delivery]:
        return [d for d in self.deliveries if d.status == 200]

    def thresholds(self) -> list[int]:
        return [d.event["threshold"] for d in self.delivered()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver(_free_port())
    yield r
    await r.stop()


@pytest.fixture
async def signatures(conn: asyncpg.Connection) -> Signatures:
    s = Signatures(conn)
    await s.setup()
    return s


class Server:
    """A real ``campaignstats serve`` process."""

    def __init__(self, module_dsn: str, snapshot: Path, hook: str) -> None:
        self.args = [
            "--dsn", module_dsn, "--port", "0", "--no-http", "--snapshot", str(snapshot),
            "--webhook", hook, "--sync-interval", "3600", "--webhook-retry-max", "2",
        ]  # fmt: skip
        self.proc: Any = None
        self.port = 0

    async def start(self, stderr: int = asyncio.subprocess.DEVNULL) -> None:
        self.proc, self.port = await serve_process(
            *self.args,
            env={"CAMPAIGNSTATS_WEBHOOK_SECRET": SECRET},  # the secret through its variable
            stderr=stderr,
        )
        # keep reading its output, so that a full pipe never blocks it
        self._drain = asyncio.create_task(self._read_rest())

    async def _read_rest(self) -> None:
        assert self.proc.stdout is not None
        while await self.proc.stdout.readline():
            pass

    async def client(self) -> Raw:
        raw = await Raw.tcp(self.port)
        assert (await raw.call("hello", 1, {"protocol": 1}))[0] == "ok"
        return raw

    async def wait_loaded(self, raw: Raw) -> None:
        async def loaded() -> bool:
            info = (await raw.call("info", 2))[2]
            return bool(info["calculations"]["loaded"])

        await wait_for(loaded, timeout=30)

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)
            async with asyncio.timeout(30):
                code = await self.proc.wait()
            if sig == signal.SIGTERM:
                assert code == 0
        self.proc = None


@pytest.fixture
async def servers() -> AsyncIterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:
        if s.proc is not None and s.proc.returncode is None:
            s.proc.kill()
            await s.proc.wait()


async def _sign(server: Server, signatures: Signatures, campaign: int, n: int) -> None:
    """``n`` supporters in the database, announced as increments (on a connection of their own:
    no event message comes between the flush and its reply)."""
    raw = await server.client()
    for inc in await signatures.add(campaign, n):
        await raw.send(["inc", *inc[:7]])
    assert (await raw.call("flush", 9))[0] == "ok"
    await raw.close()


def _check_signed(delivery: Delivery) -> None:
    expected = "sha256=" + hmac.new(SECRET.encode(), delivery.body, hashlib.sha256).hexdigest()
    assert delivery.headers["x-campaignstats-signature"] == expected
    assert delivery.headers["content-type"] == "application/json"
    assert delivery.headers["x-campaignstats-event-id"] == delivery.event["id"]


async def _delivered(raw: Raw, n: int) -> bool:
    """Whether the server has counted ``n`` deliveries as acknowledged (and owes none)."""
    hooks = (await raw.call("info", 99))[2]["goals"]["webhooks"]
    return bool(hooks["delivered"] == n and hooks["pending"] == 0)


async def test_deliveries_are_signed_retried_after_a_500_and_never_repeated_after_a_restart(
    module_dsn: str,
    tmp_path: Path,
    receiver: Receiver,
    signatures: Signatures,
    servers: list[Server],
) -> None:
    receiver.statuses = [500]  # the first attempt fails
    await receiver.start()
    server = Server(module_dsn, tmp_path / "stats.snapshot", f"http://127.0.0.1:{receiver.port}/h")
    servers.append(server)
    await server.start()
    raw = await server.client()
    await server.wait_loaded(raw)
    assert (await raw.call("set_goals", 3, 1, {"supporters": [3, 5], "area": {"DE": 4}}))[0] == "ok"
    await _sign(server, signatures, 1, 5)
    await wait_for(lambda: len(receiver.delivered()) == 3, timeout=30)
    assert receiver.deliveries[0].status == 500
    assert receiver.deliveries[1].body == receiver.deliveries[0].body  # the same event, again
    events = [d.event for d in receiver.delivered()]
    assert [(e["type"], e["threshold"]) for e in events] == [
        ("milestone", 3),
        ("milestone", 5),
        ("quorum", 4),
    ]
    assert events[0]["campaign_id"] == 1
    assert events[0]["metric"] == "supporters"
    assert events[2]["area"] == "DE"
    for delivery in receiver.delivered():
        _check_signed(delivery)
    # The receiver records a delivery before the server reads its 200: wait for the server's count.
    await wait_for(lambda: _delivered(raw, 3), timeout=30)
    info = (await raw.call("info", 4))[2]["goals"]
    assert info["fired"] == 3
    assert info["webhooks"]["delivered"] == 3
    assert info["webhooks"]["failed"] >= 1
    assert info["webhooks"]["pending"] == 0
    await raw.close()

    # A graceful restart from the snapshot, then a resync, a dip and a recovery: nothing again.
    await server.stop()
    await server.start()
    raw = await server.client()
    await server.wait_loaded(raw)
    assert (await raw.call("get_goals", 5, 1))[2]["reached"] == [3, 5]
    incs = await signatures.add(1, 1)
    await raw.send(["dec", *incs[0][:7]], ["inc", *incs[0][:7]])
    assert (await raw.call("resync", 6, "all"))[2] == {"started": True}
    # A new threshold, reached: it is delivered after anything else still owed, so once it is
    # in, any repeat of the old ones would be in too.
    assert (await raw.call("set_goals", 7, 1, {"supporters": [3, 5, 8]}))[0] == "ok"
    await _sign(server, signatures, 1, 2)
    await wait_for(lambda: receiver.thresholds()[-1:] == [8], timeout=30)
    assert receiver.thresholds() == [3, 5, 4, 8]
    assert (await raw.call("info", 8))[2]["goals"]["fired"] == 1  # only 8 since the restart
    ids = [d.event["id"] for d in receiver.delivered()]
    assert len(set(ids)) == len(ids)
    await raw.close()
    await server.stop()


async def test_an_event_fired_before_a_kill_9_is_delivered_after_the_restart_exactly_once(
    module_dsn: str,
    tmp_path: Path,
    receiver: Receiver,
    signatures: Signatures,
    servers: list[Server],
) -> None:
    # The receiver is down: the delivery cannot happen before the kill.
    snapshot = tmp_path / "stats.snapshot"
    server = Server(module_dsn, snapshot, f"http://127.0.0.1:{receiver.port}/h")
    servers.append(server)
    await server.start()
    raw = await server.client()
    await server.wait_loaded(raw)
    assert (await raw.call("set_goals", 3, 1, {"supporters": [2]}))[0] == "ok"
    assert (await raw.call("sub", 4, 1)) == ["ok", 4, None]
    await _sign(server, signatures, 1, 2)
    # The event reaches a subscriber only once it is in the outbox, fsynced.
    async with asyncio.timeout(20):
        while True:
            [message] = await raw.recv(within=20)
            if message[0] == "event":
                break
    assert message[1] == 1
    assert message[2]["threshold"] == 2
    await raw.close()
    await server.stop(signal.SIGKILL)
    assert not snapshot.exists()  # killed: no snapshot was written, only the outbox
    owed = Outbox(Path(str(snapshot) + ".events"), (f"http://127.0.0.1:{receiver.port}/h",))
    assert [o.event["threshold"] for o in owed.owed.values()] == [2]
    owed.close()

    await receiver.start()
    await server.start()
    raw = await server.client()
    await wait_for(lambda: receiver.thresholds() == [2], timeout=30)
    await server.wait_loaded(raw)
    # the goals set before the kill came back from the outbox (no snapshot was written)
    goals = (await raw.call("get_goals", 4, 1))[2]
    assert goals["supporters"] == [2]
    assert goals["reached"] == [2]
    # Reached stays reached after the restart's calculation: a later goal is the next delivery.
    assert (await raw.call("set_goals", 5, 1, {"supporters": [2, 3]}))[0] == "ok"
    await _sign(server, signatures, 1, 1)
    await wait_for(lambda: receiver.thresholds()[-1:] == [3], timeout=30)
    assert receiver.thresholds() == [2, 3]
    _check_signed(receiver.delivered()[0])
    await raw.close()
    await server.stop()


async def test_a_receiver_that_is_down_gets_the_event_once_it_comes_up(
    module_dsn: str,
    tmp_path: Path,
    receiver: Receiver,
    signatures: Signatures,
    servers: list[Server],
) -> None:
    server = Server(module_dsn, tmp_path / "stats.snapshot", f"http://127.0.0.1:{receiver.port}/h")
    servers.append(server)
    await server.start()
    raw = await server.client()
    await server.wait_loaded(raw)
    assert (await raw.call("set_goals", 3, 1, {"supporters": [2]}))[0] == "ok"
    await _sign(server, signatures, 1, 2)

    async def failed_twice() -> bool:
        hooks = (await raw.call("info", 4))[2]["goals"]["webhooks"]
        return bool(hooks["failed"] >= 2 and hooks["pending"] == 1)

    await wait_for(failed_twice, timeout=30)  # refused, retried, refused again
    await receiver.start()
    await wait_for(lambda: receiver.thresholds() == [2], timeout=30)
    _check_signed(receiver.delivered()[0])
    await wait_for(lambda: _delivered(raw, 1), timeout=30)
    hooks = (await raw.call("info", 5))[2]["goals"]["webhooks"]
    assert hooks["delivered"] == 1
    assert hooks["pending"] == 0
    await raw.close()
    await server.stop()


# -- the outbox file ----------------------------------------------------------------------------

HOOK = "http://127.0.0.1:9/h"


def _milestone(threshold: int) -> dict[str, Any]:
    return {
        "type": "milestone",
        "metric": "supporters",
        "threshold": threshold,
        "value": 7,
        "at": 1.0,
    }


def test_a_torn_tail_of_the_outbox_is_cut_off_with_a_warning_and_the_rest_is_kept(
    tmp_path: Path,
) -> None:
    path = tmp_path / "goals.events"
    outbox = Outbox(path, (HOOK,))
    outbox.fire([(1, _milestone(100)), (1, _milestone(200))])
    outbox.close()
    whole = path.read_bytes()
    path.write_bytes(whole[:-5])  # kill -9 in the middle of the second record
    again = Outbox(path, (HOOK,))
    assert [o.event["threshold"] for o in again.owed.values()] == [100]
    assert list(tmp_path.glob("goals.events.bad-*")), "the torn bytes are copied aside"
    again.fire([(1, _milestone(200))])  # appended after the cut: a sound file again
    again.close()
    third = Outbox(path, (HOOK,))
    assert [o.event["threshold"] for o in third.owed.values()] == [100, 200]
    third.close()


def test_compaction_keeps_only_what_is_still_owed_and_a_delivery_is_remembered(
    tmp_path: Path,
) -> None:
    path = tmp_path / "goals.events"
    other = "http://127.0.0.1:10/h"
    outbox = Outbox(path, (HOOK, other))
    outbox.fire([(1, _milestone(100)), (2, _milestone(100))])
    first = outbox.next_for(HOOK)
    assert first is not None
    assert first.campaign_id == 1
    outbox.delivered(first, HOOK)
    outbox.delivered(first, other)
    outbox.close()
    reopened = Outbox(path, (HOOK, other))
    assert [o.campaign_id for o in reopened.owed.values()] == [2]
    size = path.stat().st_size
    reopened.compact()
    assert path.stat().st_size < size
    reopened.close()
    # a webhook no longer configured is owed nothing after a restart
    last = Outbox(path, (HOOK,))
    assert [(o.campaign_id, o.targets) for o in last.owed.values()] == [(2, {HOOK})]
    assert last.info()["pending"] == 1
    last.close()


async def _serve_exit(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "campaignstats.cli", "serve", "--no-http", "--no-tcp", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, (out + err).decode()


async def test_serve_refuses_a_webhook_without_a_snapshot_or_with_a_bad_url(tmp_path: Path) -> None:
    code, text = await _serve_exit("--webhook", HOOK)
    assert code == 2
    assert "--webhook needs --snapshot" in text
    code, text = await _serve_exit(
        "--webhook", "ftp://example.org/h", "--snapshot", str(tmp_path / "s"),
        "--dsn", "postgresql://nobody@127.0.0.1:1/none",
    )  # fmt: skip
    assert code == 2  # a usage error, as a missing --snapshot
    assert "a webhook must be an http:// or https:// URL" in text
    assert not (tmp_path / "s.events").exists()  # refused before anything was opened
    code, text = await _serve_exit(
        "--webhook", "hooktoken@example.org/h", "--snapshot", str(tmp_path / "s"),
        "--dsn", "postgresql://nobody@127.0.0.1:1/none",
    )  # fmt: skip
    assert code == 2
    assert "(one was not a URL)" in text  # not '://hooktoken@...', a URL it never was
    assert "hooktoken" not in text
    code, text = await _serve_exit(
        "--webhook", "http://hookuser:pw-never-shown@[::1/h", "--snapshot", str(tmp_path / "s"),
        "--dsn", "postgresql://nobody@127.0.0.1:1/none",
    )  # fmt: skip
    assert code == 2
    assert "a webhook URL is malformed" in text
    assert "pw-never-shown" not in text
    assert not (tmp_path / "s.events").exists()


def test_a_webhook_url_is_logged_without_its_password_or_query() -> None:
    assert redact_url("https://user:pa55@example.org:8443/h?token=t0k#f") == (
        "https://user:***@example.org:8443/h?***"
    )
    assert redact_url("https://T0KEN@example.org/h") == "https://***@example.org/h"
    assert redact_url("http://127.0.0.1:9/h") == "http://127.0.0.1:9/h"


async def test_an_event_a_webhook_refuses_with_a_4xx_is_parked_as_dead_and_the_next_one_goes(
    tmp_path: Path, receiver: Receiver
) -> None:
    """A 4xx other than 408 and 429, GIVE_UP_AFTER times in a row: the event is dead for that
    webhook (counted, remembered across a restart), and the events behind it are delivered; a
    429 is retried as long as it takes."""
    receiver.statuses = [400] * GIVE_UP_AFTER + [429] * (GIVE_UP_AFTER + 1)
    await receiver.start()
    url = f"http://127.0.0.1:{receiver.port}/h"
    path = tmp_path / "goals.events"
    outbox = Outbox(path, (url,))
    sender = WebhookSender(
        outbox, WebhookConfig((url,), None, timeout=5.0, backoff_initial=0.01, backoff_max=0.02)
    )
    task = asyncio.create_task(sender.run())
    try:
        outbox.fire([(1, _milestone(100)), (1, _milestone(200))])
        await wait_for(lambda: outbox.info()["pending"] == 0, timeout=30)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        outbox.close()
    assert [(d.event["threshold"], d.status) for d in receiver.deliveries] == [
        *[(100, 400)] * GIVE_UP_AFTER,
        *[(200, 429)] * (GIVE_UP_AFTER + 1),
        (200, 200),
    ]
    info = outbox.info()
    assert (info["dead"], info["delivered"], info["failed"]) == (1, 1, 2 * GIVE_UP_AFTER + 1)
    again = Outbox(path, (url,))
    assert again.owed == {}, "a dead event is owed no more after a restart"
    again.close()
