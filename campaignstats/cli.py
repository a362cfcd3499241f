"""The ``campaignstats`` command line.

Every subcommand takes its database from ``--dsn``, else ``DATABASE_URL``, else the embedded
Postgres kept in ``--data-dir`` (started on demand, so one command works on a fresh machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from campaignstats import __version__
from campaignstats.db.embedded import DEFAULT_DATA_DIR, resolve_dsn
from campaignstats.logs import configure_logging

log = structlog.get_logger(__name__)

EPILOG = """\
database: --dsn URL, else $DATABASE_URL, else an embedded Postgres in --data-dir.
examples:
  campaignstats init-db
  campaignstats demo --actions 1000000 --seed 1
  campaignstats calculate live
"""


def _add_db_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dsn",
        default=os.environ.get("DATABASE_URL"),
        help="Postgres URL (default: $DATABASE_URL, else the embedded Postgres)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="where the embedded Postgres keeps its data (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="campaignstats",
        description="Live counters for campaigning platforms (supporters, actions, areas, orgs).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"campaignstats {__version__}")
    parser.add_argument(
        "--log-format",
        choices=["json", "console", "auto"],
        default="auto",
        help="json lines, or readable console output (default: console on a terminal)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "init-db",
        help="create the Proca-compatible tables and indexes that are missing",
        description="Create the tables campaigns, orgs, action_pages, supporters, actions and "
        "Proca's indexes where they are missing. Never drops or alters anything.",
    )
    _add_db_options(p)

    p = sub.add_parser(
        "demo",
        help="fill the database with realistic demo data",
        description="Add skewed, reproducible demo data (campaigns, orgs, pages, supporters, "
        "actions) by COPY, after the rows already present. Creates the schema if missing.",
    )
    _add_db_options(p)
    p.add_argument(
        "--actions",
        type=_positive_int,
        default=100_000,
        help="actions to add (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=1, help="random seed (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser(
        "calculate",
        help="run the calculation from Postgres once and print the counts",
        description="Recompute counts from the database, as a resync does, without a server. "
        "SCOPE is 'all', 'live' or campaign ids.",
    )
    _add_db_options(p)
    p.add_argument("scope", nargs="*", default=["all"], metavar="SCOPE")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--statement-timeout", type=float, default=60.0, metavar="SECONDS")
    p = sub.add_parser(
        "quickstart",
        help="embedded database, schema, demo data when empty, one calculation (what run.py does)",
        description="Create the schema if missing, add demo data when the database has no "
        "action, run the full calculation and print the busiest campaigns.",
    )
    _add_db_options(p)
    p.add_argument("--demo-actions", type=_positive_int, default=100_000)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def parse_scope(words: Sequence[str]) -> str | list[int]:
    """``all``, ``live`` or campaign ids, as the CLI and ``resync`` take them."""
    if len(words) == 1 and words[0] in ("all", "live"):
        return words[0]
    try:
        ids = [int(w) for w in words]
    except ValueError:
        raise SystemExit(
            f"scope must be 'all', 'live' or campaign ids, not {' '.join(words)!r}"
        ) from None
    if not ids or any(i < 1 for i in ids):
        raise SystemExit("campaign ids must be >= 1")
    return ids


async def _with_db(args: argparse.Namespace) -> Any:
    import asyncpg

    dsn, embedded = await resolve_dsn(args.dsn, args.data_dir)
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            return await COMMANDS[args.command](conn, args)
        finally:
            await conn.close()
    finally:
        if embedded is not None:
            embedded.close()


async def cmd_init_db(conn: Any, args: argparse.Namespace) -> int:
    from campaignstats.db.schema import init_db

    created = await init_db(conn)
    print(f"created: {', '.join(created)}" if created else "schema already in place: nothing to do")
    return 0


async def cmd_demo(conn: Any, args: argparse.Namespace) -> int:
    from campaignstats.db.demo import fill_demo
    from campaignstats.db.schema import init_db

    await init_db(conn)
    summary = await fill_demo(
        conn, actions=args.actions, seed=args.seed, progress=not args.no_progress
    )
    print(
        f"added {summary.actions:,} actions, {summary.supporters:,} supporters, "
        f"{summary.campaigns} campaigns, {summary.orgs} orgs, {summary.action_pages} pages "
        f"in {summary.seconds:.1f} s ({summary.actions_per_second:,.0f} actions/s)"
    )
    return 0


async def cmd_calculate(conn: Any, args: argparse.Namespace) -> int:
    from campaignstats.db.calculation import calculate

    result = await calculate(
        conn, parse_scope(args.scope), statement_timeout=args.statement_timeout
    )
    if args.json:
        out = {str(cid): stats.to_wire() for cid, stats in sorted(result.campaigns.items())}
        print(json.dumps({"max_action_id": result.max_action_id, "campaigns": out}, default=str))
    else:
        print_table(result.campaigns)
        print(
            f"{len(result.campaigns)} campaigns, {result.duration:.3f} s, max action id {result.max_action_id}"
        )
    return 0


def print_table(campaigns: dict[int, Any], limit: int = 20) -> None:
    rows = sorted(campaigns.items(), key=lambda kv: -kv[1].supporters)[:limit]
    print(f"{'campaign':>9} {'supporters':>11} {'extra':>7} {'actions':>9}  top areas")
    for cid, s in rows:
        areas = ", ".join(f"{a} {n}" for a, n in sorted(s.area.items(), key=lambda kv: -kv[1])[:3])
        print(
            f"{cid:>9} {s.supporters:>11,} {s.extra_supporters:>7,} {sum(s.action.values()):>9,}  {areas}"
        )


async def cmd_quickstart(conn: Any, args: argparse.Namespace) -> int:
    from campaignstats.db.calculation import calculate
    from campaignstats.db.demo import fill_demo
    from campaignstats.db.schema import init_db, is_empty

    await init_db(conn)
    if await is_empty(conn):
        print(f"empty database: adding {args.demo_actions:,} demo actions")
        await fill_demo(conn, actions=args.demo_actions, seed=1)
    result = await calculate(conn, "all")
    print_table(result.campaigns)
    print(f"{len(result.campaigns)} campaigns counted in {result.duration:.3f} s")
    return 0


COMMANDS = {
    "init-db": cmd_init_db,
    "demo": cmd_demo,
    "calculate": cmd_calculate,
    "quickstart": cmd_quickstart,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    from campaignstats.errors import StatsError

    try:
        return int(asyncio.run(_with_db(args)))
    except StatsError as exc:
        log.error("command_failed", command=args.command, error=str(exc))
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
