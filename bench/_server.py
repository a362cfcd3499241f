"""The server process of ``python -m bench.run``: StatsService + StatsServer on 127.0.0.1.

    python -m bench._server [--port 0] [--loop asyncio|uvloop|auto] [--source empty|unreachable]
                            [--no-inline-reads] [--read-size N] [--apply-slice N]

Prints ``PORT <n>`` on stdout once it listens, then serves until SIGTERM or SIGINT.

No database is needed. ``--source empty`` (the default) is a tiny in-bench source whose
calculation returns an empty :class:`~campaignstats.model.CalculationResult` at once, so the
actor is "loaded" (its start-up full calculation succeeded) and no journal is kept while the
benchmark runs. ``--source unreachable`` uses a :class:`PostgresSource` on a closed port that
fails within 0.2 s, with a backoff of an hour (the actor then serves as "not loaded").
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from typing import Any

import structlog

from campaignstats.actor.actor import ActorConfig
from campaignstats.loops import LOOPS, runner
from campaignstats.model import CalculationResult
from campaignstats.server import ServerConfig, StatsServer
from campaignstats.service import StatsService


class EmptySource:
    """A database with no campaigns: every calculation succeeds at once with nothing in it."""

    async def calculate(self, scope: Any) -> CalculationResult:
        kind = scope if isinstance(scope, str) else "ids"
        return CalculationResult(kind, {}, 0, started_at=time.time())


async def serve(args: argparse.Namespace) -> None:
    if args.source == "empty":
        source: Any = EmptySource()
    else:
        from campaignstats.db.source import PostgresSource

        source = PostgresSource("postgresql://nobody@127.0.0.1:9/none", connect_timeout=0.2)
    actor = ActorConfig(sync_interval=3600, backoff_initial=3600)
    if args.apply_slice is not None:
        actor.apply_slice = args.apply_slice
    service = StatsService(source, actor)
    await service.start()
    config = ServerConfig(host="127.0.0.1", port=args.port, inline_reads=args.inline_reads)
    if args.read_size is not None:
        config.read_size = args.read_size
    server = StatsServer(service, config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"PORT {server.port}", flush=True)
    await stop.wait()
    await server.close()
    await service.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--loop", choices=LOOPS, default="asyncio", help="as serve --loop")
    parser.add_argument("--uvloop", action="store_const", const="uvloop", dest="loop")
    parser.add_argument("--source", choices=("empty", "unreachable"), default="empty")
    parser.add_argument(
        "--no-inline-reads",
        action="store_false",
        dest="inline_reads",
        help="every query through the mailbox (ServerConfig.inline_reads=False), for A/B runs",
    )
    parser.add_argument("--read-size", type=int, help="ServerConfig.read_size, bytes")
    parser.add_argument("--apply-slice", type=int, help="ActorConfig.apply_slice, increments")
    args = parser.parse_args()
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    _, run = runner(args.loop)
    run(serve(args))


if __name__ == "__main__":
    main()
