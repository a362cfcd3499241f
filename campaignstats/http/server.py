"""uvicorn in the running event loop: the HTTP side of ``campaignstats serve``.

uvicorn's ``Server.serve()`` takes over SIGINT and SIGTERM, which the command line already
handles (it stops the socket server, the HTTP server and the service in order), so this runs the
same steps without the signal capture: ``startup()``, the once-a-second ``main_loop()`` (it keeps
the ``Date`` header current), and ``shutdown()``, after the event streams have been ended (they
never end on their own, and uvicorn waits for open responses).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import structlog
import uvicorn
from starlette.types import ASGIApp

from campaignstats.http.app import StatsHttpApp
from campaignstats.service import TaskHost

log = structlog.get_logger(__name__)


class _DroppedReaders(logging.Filter):
    """A stream dropped as a slow reader returns without finishing its response, on purpose
    (its socket is full: nothing more can be written); uvicorn logs that as an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "returned without completing response" not in record.getMessage()


class HttpServer:
    def __init__(
        self,
        app: StatsHttpApp | ASGIApp,
        host: str = "127.0.0.1",
        port: int = 7401,
        *,
        backlog: int = 4096,
        graceful_timeout: int = 5,
    ) -> None:
        self.app = app
        self.config = uvicorn.Config(
            app,
            host=host,
            port=port,
            http="httptools",
            ws="none",
            lifespan="off",  # start and stop are ours (close() ends the event streams first)
            log_config=None,  # logging is configured by the entry point, not by a library
            access_log=False,
            server_header=False,
            backlog=backlog,
            timeout_graceful_shutdown=graceful_timeout,
        )
        self._server: uvicorn.Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._tasks = TaskHost("http-server")  # uvicorn's main loop runs in it
        self._filter = _DroppedReaders()

    @property
    def port(self) -> int | None:
        server = self._server
        if server is None or not getattr(server, "servers", None):
            return None
        port: int = server.servers[0].sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("already started")
        config = self.config
        if not config.loaded:
            config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        try:
            await server.startup()
        except SystemExit:  # uvicorn exits when it cannot bind (it has logged why)
            raise OSError(f"cannot listen on {config.host}:{config.port}") from None
        logging.getLogger("uvicorn.error").addFilter(self._filter)
        self._server = server
        await self._tasks.start()
        self._ticker = self._tasks.spawn(server.main_loop(), name="http-server-ticks")
        log.info("http.listening", host=config.host, port=self.port)

    async def close(self) -> None:
        """Stop accepting, end the event streams, let requests in flight finish (bounded by
        ``graceful_timeout``), close."""
        server = self._server
        if server is None:
            return
        self._server = None
        # The stats app's event streams end here; an application that mounts it (docs/http.md,
        # "Embedding") has no close() of its own and ends them with the stats app's.
        close = getattr(self.app, "close", None)
        if close is not None:
            await close()
        server.should_exit = True
        if self._ticker is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        await server.shutdown()
        await self._tasks.close(1.0)
        logging.getLogger("uvicorn.error").removeFilter(self._filter)
        log.info("http.closed")
