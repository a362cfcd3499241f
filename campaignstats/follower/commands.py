"""The follower's part of the command line: ``serve --follow`` and ``campaignstats slots``.

campaignstats.cli calls these, so that its own ``serve`` stays a few lines longer only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from .follower import DEFAULT_PUBLICATION, Follower, FollowError, default_slot_name
from .follower import drop_slot as _drop_slot
from .follower import list_slots as _list_slots

if TYPE_CHECKING:
    import asyncpg

    from campaignstats.db.embedded import EmbeddedPostgres
    from campaignstats.service import StatsService, TaskHost

log = structlog.get_logger(__name__)


def add_follow_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group(
        "following the database (docs/follow.md): counts live from logical replication"
    )
    group.add_argument(
        "--follow",
        action="store_true",
        help="follow Postgres's logical replication stream (needs wal_level=logical)",
    )
    group.add_argument(
        "--slot",
        default=None,
        metavar="NAME",
        help=f"this server's replication slot (default: {default_slot_name()})",
    )
    group.add_argument(
        "--publication",
        default=DEFAULT_PUBLICATION,
        metavar="NAME",
        help="the publication on the Proca tables (default: %(default)s)",
    )


def add_slots_command(sub: Any, add_db_options: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser(
        "slots",
        help="list the logical replication slots, or drop one",
        description="List the server's logical replication slots with their lag, or drop one "
        "(--drop NAME). A slot no server reads keeps WAL on the database's disk: drop the "
        "slot of a server that is gone for good.",
    )
    add_db_options(p)
    p.add_argument("--drop", metavar="NAME", help="drop this slot")
    p.add_argument("--json", action="store_true", help="print JSON")


async def cmd_slots(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    if args.drop:
        try:
            dropped = await _drop_slot(conn, args.drop)
        except FollowError as exc:
            print(f"cannot drop the slot: {exc}", file=sys.stderr)
            return 1
        if dropped:
            print(f"dropped slot {args.drop}")
            return 0
        print(f"no slot named {args.drop}", file=sys.stderr)
        return 1
    slots = await _list_slots(conn)
    if args.json:
        print(json.dumps(slots, default=str))
        return 0
    if not slots:
        print("no logical replication slots")
    for s in slots:
        print(
            f"{s['slot_name']:<32} {s['plugin']:<10} {s['database']:<16} "
            f"{'active' if s['active'] else 'idle':<7} lag {s['lag_bytes']} B, "
            f"retains {s['retained_bytes']} B ({s['wal_status']})"
        )
    return 0


async def prepare_follower(
    args: argparse.Namespace, dsn: str, embedded: EmbeddedPostgres | None, server: Any
) -> Follower | None:
    """With ``--follow``: check the database, create the publication and the slot (before the
    service starts its first calculation), and add the follower's figures to ``info`` (the
    socket's and the HTTP's, both read ``server.add_info``). Exits with status 2 and the
    command that fixes it when the database cannot be followed."""
    if not getattr(args, "follow", False):
        return None
    if embedded is not None:
        embedded.enable_logical_replication()
    try:
        follower = Follower(
            dsn,
            slot=args.slot or default_slot_name(),
            publication=args.publication,
            configure=embedded is not None,
        )
        if not args.slot:
            log.warning(
                "follower.default_slot",
                slot=follower.slot,
                hint="the default slot is named after the host name, which changes with each "
                "new container: give --slot so that a restarted server finds its slot",
            )
        await follower.prepare()
    except FollowError as exc:
        print(f"cannot follow the database: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    add_info = server.add_info

    def with_follower(info: dict[str, Any]) -> dict[str, Any]:
        info = add_info(info)
        info["follower"] = follower.status()
        return info

    server.add_info = with_follower
    return follower


def start_following(
    follower: Follower | None, service: StatsService, tasks: TaskHost
) -> asyncio.Task[None] | None:
    """Run the follower in ``tasks`` (the socket server's task group); call once the service
    has started (its first calculation's snapshot comes after the slot)."""
    if follower is None:
        return None
    return tasks.spawn(_follow(follower, service), name="campaignstats-follower")


async def _follow(follower: Follower, service: StatsService) -> None:
    # Its error is logged here rather than raised: in a task group it would cancel the
    # server's other tasks with it.
    try:
        await follower.run(service, full_calculation_pending=True)
    except Exception as error:
        log.critical("follower.stopped", error=f"{type(error).__name__}: {error}")


async def stop_following(task: asyncio.Task[None] | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
