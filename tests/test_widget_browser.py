"""widget.js in a real headless Chromium, driven over the DevTools protocol (a websocket).

The browser loads pages from the HTTP server (the demo page) and from another origin (a page
of its own, so CORS is exercised by the browser itself), and the test sends increments over
the socket, as a web backend would: the number on the page must follow without a reload.

Chromium comes from Debian's packages: the session fixture installs it with apt-get when it is
missing and the machine allows it (root, or CI=true); elsewhere the tests are skipped, saying
why. ``CAMPAIGNSTATS_WIDGET_PNG=path`` keeps a screenshot of the demo page there.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from campaignstats.actor.actor import ActorConfig
from campaignstats.http import HttpConfig, HttpServer, app

from .helpers import Raw, Running, Start

pytestmark = pytest.mark.timeout(90)


def _install_chromium() -> str | None:
    """The path of chromium, installed from Debian's packages when missing and allowed."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    allowed = os.environ.get("CI") == "true" or os.geteuid() == 0
    if not allowed or shutil.which("apt-get") is None:
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "chromium"]
    if subprocess.run(install, env=env, capture_output=True, timeout=900).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
        subprocess.run(install, env=env, capture_output=True, timeout=900)
    return shutil.which("chromium")


@pytest.fixture(scope="session")
def chromium() -> str:
    path = _install_chromium()
    if path is None:
        pytest.skip(
            "chromium is not installed and cannot be installed here (needs root or CI=true, "
            "and apt-get): apt-get install chromium"
        )
    return path


class Page:
    """One browser tab over the DevTools protocol: calls by id, events ignored."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future[Any]] = {}
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for text in self.ws:
            message = json.loads(text)
            future = self.waiting.pop(message.get("id", -1), None)
            if future is not None and not future.done():
                if "error" in message:
                    future.set_exception(RuntimeError(message["error"]))
                else:
                    future.set_result(message.get("result", {}))

    async def call(self, method: str, **params: Any) -> Any:
        call_id = next(self.ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting[call_id] = future
        await self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        async with asyncio.timeout(20):
            return await future

    async def evaluate(self, expression: str) -> Any:
        result = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    async def wait_for(self, expression: str, within: float = 10.0) -> Any:
        """Poll ``expression`` until it is truthy; returns its value."""
        async with asyncio.timeout(within):
            while not (value := await self.evaluate(expression)):
                await asyncio.sleep(0.05)
        return value

    async def close(self) -> None:
        self.reader.cancel()
        await self.ws.close()


class Browser:
    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port

    @contextlib.asynccontextmanager
    async def page(self, url: str, before_load: str | None = None) -> AsyncIterator[Page]:
        async with httpx.AsyncClient(timeout=10) as client:
            target = (await client.put(f"http://127.0.0.1:{self.port}/json/new?about:blank")).json()
        async with websockets.connect(target["webSocketDebuggerUrl"], max_size=1 << 26) as ws:
            page = Page(ws)
            try:
                await page.call("Page.enable")
                if before_load is not None:
                    await page.call("Page.addScriptToEvaluateOnNewDocument", source=before_load)
                await page.call("Page.navigate", url=url)
                yield page
            finally:
                await page.close()
        async with httpx.AsyncClient(timeout=10) as client:
            await client.get(f"http://127.0.0.1:{self.port}/json/close/{target['id']}")


@pytest.fixture(scope="module")
async def browser(
    chromium: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Browser]:
    profile = tmp_path_factory.mktemp("chromium-profile")
    process = await asyncio.create_subprocess_exec(
        chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--no-first-run", "--no-default-browser-check", "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=900,700",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    port = None
    seen = []
    async with asyncio.timeout(30):
        while port is None:
            line = (await process.stderr.readline()).decode(errors="replace")
            if not line:
                raise RuntimeError(f"chromium exited: {''.join(seen)[-2000:]}")
            seen.append(line)
            if m := re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line):
                port = int(m.group(1))
    drain = asyncio.create_task(process.stderr.read())  # keep its pipe from filling up
    yield Browser(process, port)
    process.terminate()
    async with asyncio.timeout(10):
        await process.wait()
    drain.cancel()


@pytest.fixture
async def site(start: Start) -> AsyncIterator[tuple[Running, str]]:
    """The socket server and the HTTP server on one service, at the production publish pace
    (one change per second per campaign)."""
    running = await start(ActorConfig(sync_interval=3600))
    http = HttpServer(app(running.service, HttpConfig()), "127.0.0.1", 0)
    await http.start()
    yield running, f"http://127.0.0.1:{http.port}"
    await http.close()


async def supporters(running: Running, campaign_id: int, n: int) -> None:
    raw = await Raw.tcp(running.port)
    try:
        await raw.send(["incs", [[campaign_id, 7, "register", None, True]] * n])
        assert (await raw.call("flush", 1))[0] == "ok"
    finally:
        await raw.close()


COUNTER = "document.querySelector('campaign-counter[campaign=\"{cid}\"]')"
SHOWN = COUNTER + ".shadowRoot.querySelector('.value').textContent"


async def test_the_demo_page_shows_the_count_and_an_increment_appears_within_two_seconds(
    browser: Browser, site: tuple[Running, str]
) -> None:
    running, url = site
    await supporters(running, 42, 1234)
    await supporters(running, 43, 50)
    async with browser.page(url + "/") as page:
        counter = COUNTER.format(cid=42)
        assert await page.wait_for(f"{counter} && {counter}.value === 1234")
        assert await page.evaluate(SHOWN.format(cid=42)) == "1,234"  # <html lang="en">
        assert await page.evaluate(f"{counter}.dataset.value") == "1234"
        # The busiest first.
        order = await page.evaluate(
            "[...document.querySelectorAll('campaign-counter')]"
            ".map(c => c.getAttribute('campaign'))"
        )
        assert order == ["42", "43"]
        await page.evaluate(
            "window.updates = []; document.addEventListener('campaign-counter:update',"
            " e => window.updates.push(e.detail))"
        )
        t0 = time.monotonic()
        await supporters(running, 42, 1)
        await page.wait_for(f"{counter}.value === 1235", within=2.0)
        elapsed = time.monotonic() - t0
        assert elapsed < 2.0
        assert await page.evaluate(SHOWN.format(cid=42)) == "1,235"
        assert await page.evaluate("window.updates") == [1235]
        # goal="auto": Proca's ladder, the next goal above 1,235 is 2,000.
        bar = counter + ".shadowRoot.querySelector('.bar')"
        assert await page.evaluate(f"{bar}.getAttribute('aria-valuemax')") == "2000"
        shot = await page.call("Page.captureScreenshot", format="png")
    png = base64.b64decode(shot["data"])
    assert png.startswith(b"\x89PNG")
    if target := os.environ.get("CAMPAIGNSTATS_WIDGET_PNG"):
        Path(target).write_bytes(png)
    print(f"increment on the page after {elapsed:.3f} s")


class OtherOrigin:
    """A page served from another origin (its own port), embedding the widget."""

    def __init__(self, html: str) -> None:
        self.html = html.encode()
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n" % len(self.html) + self.html
            )
            await writer.drain()
        writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


def embedding_page(server: str, body: str, lang: str = "de") -> str:
    return (
        f'<!doctype html><html lang="{lang}"><head><meta charset="utf-8">'
        f'<script src="{server}/widget.js" defer></script></head><body>{body}</body></html>'
    )


async def test_the_widget_on_another_origin_follows_its_language_and_goal(
    browser: Browser, site: tuple[Running, str]
) -> None:
    running, url = site
    await supporters(running, 44, 1234)
    body = '<campaign-counter campaign="44" goal="5000"></campaign-counter>'
    async with OtherOrigin(embedding_page(url, body)) as page_url, browser.page(page_url) as page:
        counter = COUNTER.format(cid=44)
        await page.wait_for(f"{counter} && {counter}.value === 1234")
        assert await page.evaluate(SHOWN.format(cid=44)) == "1.234"  # lang="de"
        bar = counter + ".shadowRoot.querySelector('.bar')"
        assert await page.evaluate(f"{bar}.getAttribute('aria-valuemax')") == "5000"
        await supporters(running, 44, 1)
        await page.wait_for(f"{counter}.value === 1235", within=2.0)
        assert await page.evaluate(SHOWN.format(cid=44)) == "1.235"


async def test_without_event_streams_the_widget_polls_the_count_at_its_poll_interval(
    browser: Browser, site: tuple[Running, str]
) -> None:
    running, url = site
    await supporters(running, 45, 10)
    # 0.2 is taken as the floor of 1 s (the default, 10 s, would make this test wait 10 s)
    body = '<campaign-counter campaign="45" poll="0.2"></campaign-counter>'
    async with (
        OtherOrigin(embedding_page(url, body, lang="en")) as page_url,
        browser.page(page_url, before_load="delete window.EventSource;") as page,
    ):
        counter = COUNTER.format(cid=45)
        await page.wait_for(f"{counter} && {counter}.value === 10")
        assert await page.evaluate("typeof window.EventSource") == "undefined"
        await supporters(running, 45, 1)
        await page.wait_for(f"{counter}.value === 11", within=5.0)  # one poll: 1 s


async def test_goal_auto_reads_the_campaigns_own_goals(
    browser: Browser, site: tuple[Running, str]
) -> None:
    running, url = site
    await running.service.set_goals(46, [50, 300, 1_000])
    await supporters(running, 46, 120)
    body = '<campaign-counter campaign="46" goal="auto"></campaign-counter>'
    async with OtherOrigin(embedding_page(url, body)) as page_url, browser.page(page_url) as page:
        counter = COUNTER.format(cid=46)
        bar = counter + ".shadowRoot.querySelector('.bar')"
        await page.wait_for(f"{counter} && {counter}.value === 120")
        # the campaign's next goal above 120 is 300 (Proca's default ladder would say 200)
        await page.wait_for(f"{bar}.getAttribute('aria-valuemax') === '300'")
        await supporters(running, 46, 200)
        await page.wait_for(f"{bar}.getAttribute('aria-valuemax') === '1000'", within=3.0)
