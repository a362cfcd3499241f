"""The ``campaignstats`` command line.

Every subcommand takes its database from ``--dsn``, else ``DATABASE_URL``, else the embedded
Postgres kept in ``--data-dir`` (started on demand, so one command works on a fresh machine).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import select
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from campaignstats._version import __version__
from campaignstats.db.embedded import DEFAULT_DATA_DIR, resolve_dsn
from campaignstats.follower import commands as follow_commands
from campaignstats.logs import configure_logging
from campaignstats.metrics.update import DEFAULT_LIMITS as DEFAULT_METRIC_LIMITS
from campaignstats.metrics.update import MetricLimits
from campaignstats.model import DEFAULT_PACK_IDLE, DEFAULT_PACK_INTERVAL, Scope

log = structlog.get_logger(__name__)

EPILOG = """\
database (serve, init-db, demo, calculate, slots): --dsn URL, else $DATABASE_URL, else an
embedded Postgres in --data-dir. Client commands (stats, inc, dec, metric, metrics, guard,
history, recent, top, page, org, info, goals, resync) take --url (default:
$CAMPAIGNSTATS_URL, else tcp://127.0.0.1:7400).
examples:
  campaignstats serve --snapshot stats.snapshot --appendonly metrics.aof
  campaignstats stats 1 2 3
  campaignstats inc 1 7 register --area DE --new-supporter --action-id 1234
  campaignstats metric 1 --incr views=1 --member visitors=ab12 --dim source=newsletter
  campaignstats metrics 1
  campaignstats history 1 --unit day
  campaignstats recent 1 --tz Europe/Berlin
  campaignstats top --by last_hour
  campaignstats resync live
  campaignstats demo --actions 1000000 --seed 1
  campaignstats calculate live        (offline: from the database, no server)
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
    p.add_argument(
        "--statement-timeout",
        type=_statement_timeout,
        default=60.0,
        metavar="SECONDS",
        help="per SQL statement (default: %(default)s)",
    )
    p = sub.add_parser(
        "serve",
        help="run the stats server",
        description="Run the stats server: load the counts from Postgres, take increments and "
        "queries over MessagePack (TCP and/or a Unix socket), resync periodically. SIGTERM or "
        "SIGINT stops it gracefully (queued increments applied, snapshot written).",
    )
    _add_db_options(p)
    p.add_argument("--host", default="127.0.0.1", help="TCP address (default: %(default)s)")
    p.add_argument("--port", type=_port, default=7400, help="TCP port (default: %(default)s)")
    p.add_argument("--no-tcp", action="store_true", help="listen on the Unix socket only")
    p.add_argument("--unix", type=Path, metavar="PATH", help="also listen on this Unix socket")
    p.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop: uvloop when it is installed (auto), or asyncio's own; logged at start "
        "(default: %(default)s)",
    )
    http = p.add_argument_group("HTTP (docs/http.md): JSON reads, event streams, widget, metrics")
    http.add_argument(
        "--http-port",
        type=_port,
        default=7401,
        metavar="PORT",
        help="HTTP port, on --host (default: %(default)s)",
    )
    http.add_argument("--no-http", action="store_true", help="serve no HTTP")
    http.add_argument(
        "--http-max-age",
        type=_non_negative_int,
        default=1,
        metavar="SECONDS",
        help="Cache-Control max-age of the JSON reads (default: %(default)s)",
    )
    http.add_argument(
        "--cors-origin",
        action="append",
        metavar="ORIGIN",
        help="an origin allowed to read from a browser; repeat for several (default: any, *)",
    )
    p.add_argument(
        "--sync-interval",
        type=_positive_seconds,
        default=60.0,
        metavar="SECONDS",
        help="seconds between calculations of live campaigns (default: %(default)s)",
    )
    p.add_argument(
        "--snapshot",
        type=Path,
        metavar="PATH",
        help="snapshot file (read at start, written at stop)",
    )
    metrics = p.add_argument_group("custom metrics (docs/metrics.md): durable on their own")
    metrics.add_argument(
        "--appendonly",
        type=Path,
        metavar="PATH",
        help="the metrics' append-only log (its snapshot beside it, PATH.snapshot); "
        "without it metrics live in memory only",
    )
    metrics.add_argument(
        "--appendfsync",
        choices=("always", "everysec", "no"),
        default="everysec",
        help="fsync of the log: always (every commit: nothing acknowledged is lost), everysec "
        "(a power loss loses at most the last second), no (the kernel decides) "
        "(default: %(default)s)",
    )
    metrics.add_argument(
        "--snapshot-interval",
        type=_seconds_or_zero,
        default=300.0,
        metavar="SECONDS",
        help="seconds between metrics snapshots (the log compacted into them); 0: only at stop "
        "and when the log has doubled (default: %(default)s)",
    )
    metrics.add_argument(
        "--archive-dir",
        type=Path,
        metavar="DIR",
        help="write the metrics as Parquet (the archive extra) or CSV files here",
    )
    metrics.add_argument(
        "--archive-every",
        type=_at_least_one,
        default=600,
        metavar="SECONDS",
        help="one archive file per period of this many seconds (default: %(default)s)",
    )
    metrics.add_argument(
        "--metrics-max-campaigns",
        type=_positive_int,
        metavar="N",
        help="campaigns that may hold metrics (default: no limit)",
    )
    for field, text in _METRIC_LIMIT_OPTIONS.items():
        metrics.add_argument(
            f"--metrics-{field.replace('_', '-')}",
            dest=f"metrics_{field}",
            type=_positive_int,
            default=getattr(DEFAULT_METRIC_LIMITS, field),
            metavar="N",
            help=f"{text} (default: %(default)s)",
        )
    hooks = p.add_argument_group(
        'webhooks (docs/design.md, "Webhooks"): milestone and quorum events, POSTed as JSON'
    )
    hooks.add_argument(
        "--webhook",
        action="append",
        default=[],
        metavar="URL",
        help="POST every milestone and quorum event here; repeat for several. Needs --snapshot: "
        "the outbox (PATH.events) is kept beside it, so no event is lost across a restart",
    )
    hooks.add_argument(
        "--webhook-secret",
        default=os.environ.get("CAMPAIGNSTATS_WEBHOOK_SECRET"),
        metavar="SECRET",
        help="sign each POST: X-Campaignstats-Signature: sha256=<hex HMAC-SHA256 of the body> "
        "(default: $CAMPAIGNSTATS_WEBHOOK_SECRET)",
    )
    hooks.add_argument(
        "--webhook-retry-max",
        type=_positive_seconds,
        default=300.0,
        metavar="SECONDS",
        help="longest wait between two attempts of a failing delivery; retries start at 1 s "
        "and double, with jitter (default: %(default)s)",
    )
    p.add_argument(
        "--token",
        default=os.environ.get("CAMPAIGNSTATS_TOKEN"),
        help="require this token in hello (default: $CAMPAIGNSTATS_TOKEN)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow listening on a non-loopback address without a token",
    )
    p.add_argument(
        "--statement-timeout",
        type=_statement_timeout,
        default=60.0,
        metavar="SECONDS",
        help="per SQL statement of a calculation (default: %(default)s)",
    )
    p.add_argument(
        "--mailbox-size",
        type=_at_least_one,
        default=10_000,
        metavar="N",
        help="bounded mailbox, in messages (default: %(default)s)",
    )
    limits = p.add_argument_group("limits (rejected input gets an error and changes nothing)")
    limits.add_argument(
        "--max-connections",
        type=_at_least_one,
        default=10_000,
        metavar="N",
        help="open connections (and event streams); more get overloaded (default: %(default)s)",
    )
    limits.add_argument(
        "--idle-timeout",
        type=_seconds_or_zero,
        default=900.0,
        metavar="SECONDS",
        help="close connections silent this long, subscribers excepted; 0: never "
        "(default: %(default)s)",
    )
    limits.add_argument(
        "--max-message",
        type=_message_bytes,
        default=1 << 20,
        metavar="BYTES",
        help="bytes of one message or HTTP body (default: %(default)s)",
    )
    limits.add_argument(
        "--max-batch",
        type=_at_least_one,
        default=10_000,
        metavar="N",
        help="items per incs (default: %(default)s)",
    )
    limits.add_argument(
        "--max-string",
        type=_at_least_one,
        default=64,
        metavar="BYTES",
        help="bytes of UTF-8 of an action type or area (default: %(default)s)",
    )
    limits.add_argument(
        "--max-output",
        type=_at_least_one,
        default=4 << 20,
        metavar="BYTES",
        help="unread replies per connection before pubs and cast errors are dropped and "
        "connections closed (default: %(default)s)",
    )
    limits.add_argument(
        "--max-keys",
        type=_at_least_one,
        default=10_000,
        metavar="N",
        help="distinct action types, areas or orgs per campaign (default: %(default)s)",
    )
    limits.add_argument(
        "--max-campaigns",
        type=_at_least_one,
        default=None,
        metavar="N",
        help="campaigns in memory; increments creating more are invalid (default: no cap)",
    )
    p.add_argument(
        "--pack-idle",
        type=_seconds_or_zero,
        default=DEFAULT_PACK_IDLE,
        metavar="SECONDS",
        help="keep the counts of a campaign with no change for this long packed in a few bytes, "
        "unpacked by its next change; reads leave it packed; 0: never pack "
        '(default: %(default)s; docs/design.md, "Memory")',
    )
    p.add_argument(
        "--no-gc-policy",
        action="store_true",
        help="leave Python's garbage collector as it is: by default, what is alive at start is "
        "frozen and no full pass runs while a calculation of all or the live campaigns runs or "
        "merges, one runs after "
        '(docs/design.md, "Memory")',
    )
    p.add_argument(
        "--demo-if-empty",
        type=_positive_int,
        default=0,
        metavar="N",
        help="on an empty embedded database, create the schema and N demo actions first",
    )
    p.add_argument(
        "--shard",
        type=_shard,
        metavar="K/N",
        help="serve shard K of N (0 <= K < N): only the campaigns that rendezvous hashing gives "
        "to K; the others are refused, naming their owner (docs/scale.md)",
    )
    follow_commands.add_follow_options(p)
    follow_commands.add_slots_command(sub, _add_db_options)

    client_help = (
        "server URL: tcp://host:port or unix:///path (default: $CAMPAIGNSTATS_URL or %(default)s)"
    )
    for name, text in (
        ("stats", "print the stats of campaigns"),
        ("inc", "send one increment"),
        ("dec", "send one decrement (the exact inverse of the same increment)"),
        ("metric", "send one custom metrics update (docs/metrics.md)"),
        ("metrics", "print the custom metrics of campaigns"),
        ("guard", "guard a custom metric: refuse its updates after a deadline or too often"),
        ("history", "print a campaign's supporters and actions by minute, hour or day"),
        ("recent", "print a campaign's last hour, today, yesterday and last 7 days"),
        ("top", "print the leading campaigns by supporters, last hour or today"),
        ("page", "print the stats of one action page (JSON)"),
        ("org", "print what one org collected over its campaigns (JSON)"),
        ("info", "print what the server says about itself"),
        (
            "goals",
            "print a campaign's goals and what it reached, or set them (--set, --area, --ladder)",
        ),
        ("resync", "ask the server for a calculation now (all, live or campaign ids)"),
    ):
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        p.add_argument(
            "--url",
            default=os.environ.get("CAMPAIGNSTATS_URL", "tcp://127.0.0.1:7400"),
            help=client_help,
        )
        p.add_argument("--token", default=os.environ.get("CAMPAIGNSTATS_TOKEN"))
        p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS")
        if name in ("stats", "metrics"):
            p.add_argument("campaign_ids", type=int, nargs="+", metavar="ID")
            p.add_argument("--json", action="store_true", help="print JSON")
        elif name == "metric":
            p.add_argument("campaign_id", type=int)
            for flag, what in (
                ("--incr", "add N to counter NAME"),
                ("--set", "set counter NAME to N"),
                ("--gauge", "set gauge NAME to a number"),
                ("--member", "add a member to the unique set NAME"),
                ("--dim", "count under dimension DIM's KEY too (DIM=KEY)"),
            ):
                p.add_argument(
                    flag, action="append", default=[], metavar="NAME=VALUE", help=f"{what}; repeat"
                )
            p.add_argument("--seen", action="append", default=[], metavar="NAME", help="stamp NAME")
            p.add_argument("--at", type=float, help="the time of the update, epoch seconds")
        elif name == "guard":
            p.add_argument("campaign_id", type=int)
            p.add_argument("name", help="the metric name to guard")
            p.add_argument(
                "--deadline",
                type=float,
                metavar="EPOCH",
                help="refuse the metric's updates after this time (epoch seconds)",
            )
            p.add_argument(
                "--min-period",
                type=float,
                metavar="SECONDS",
                help="refuse an update of one key sooner than this after the last",
            )
            p.add_argument(
                "--clear", action="store_true", help="remove the metric's guard (no options)"
            )
        elif name in ("inc", "dec"):
            p.add_argument("campaign_id", type=int)
            p.add_argument("org_id", type=int)
            p.add_argument("action_type")
            p.add_argument("--area")
            p.add_argument("--new-supporter", action="store_true")
            p.add_argument("--count", type=int, default=1, help="action rows (default: 1)")
            p.add_argument("--action-id", type=int, help="the action's database id")
            p.add_argument(
                "--txid",
                type=int,
                help="pg_current_xact_id() of the transaction that made the change",
            )
            p.add_argument("--at", type=float, help="when it happened, epoch seconds")
            p.add_argument("--page", type=int, help="the action page id")
            p.add_argument("--messages", type=int, default=0, help="mail-to-target messages")
        elif name == "resync":
            p.add_argument("scope", nargs="*", default=["all"], metavar="SCOPE")
        elif name == "history":
            p.add_argument("campaign_id", type=int)
            p.add_argument("--unit", choices=("minute", "hour", "day"), default="day")
            p.add_argument("--from", dest="start", type=float, help="epoch seconds, inclusive")
            p.add_argument("--to", dest="end", type=float, help="epoch seconds, exclusive")
            p.add_argument("--page", type=int, help="an action page of the campaign instead")
            p.add_argument("--json", action="store_true", help="print JSON")
        elif name == "recent":
            p.add_argument("campaign_id", type=int)
            p.add_argument("--tz", default="UTC", help="IANA time zone of today and yesterday")
        elif name == "top":
            p.add_argument(
                "--by", choices=("supporters", "last_hour", "today"), default="supporters"
            )
            p.add_argument("--limit", type=int, default=10)
        elif name == "goals":
            p.add_argument("campaign_id", type=int)
            p.add_argument(
                "--set",
                dest="thresholds",
                metavar="N,N,...",
                help="supporters thresholds, ascending (e.g. 1000,5000,10000); replaces the goals",
            )
            p.add_argument(
                "--ladder",
                action="store_true",
                help="back to the default ladder (100, 200, 500, 1,000 ... 5,000,000)",
            )
            p.add_argument(
                "--area",
                metavar="AREA=N,...",
                help="area quorums (e.g. DE=72000,FR=55000); with --set or --ladder, or alone",
            )
            p.add_argument("--json", action="store_true", help="print JSON")
        elif name in ("page", "org"):
            p.add_argument("id", type=int, metavar="ID")

    # The logging options after the command too (``serve --log-format json``, ``python run.py
    # --log-format json``); SUPPRESS: given before the command and not after, the first holds.
    for command in sub.choices.values():
        logging_options = command.add_argument_group("logging (also before the command)")
        logging_options.add_argument(
            "--log-format", choices=["json", "console", "auto"], default=argparse.SUPPRESS
        )
        logging_options.add_argument(
            "--log-level", choices=["debug", "info", "warning", "error"], default=argparse.SUPPRESS
        )
    return parser


def _goals_log(snapshot: Path | None) -> Path | None:
    """The goals' durable log, beside the snapshot (docs/design.md, "Webhooks")."""
    return None if snapshot is None else snapshot.with_name(snapshot.name + ".events")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


#: Postgres' statement_timeout is an int of milliseconds, and 0 there means none
_STATEMENT_TIMEOUT_RANGE = (0.001, (2**31 - 1) / 1000)

#: the largest --max-message: the longest a MessagePack string, binary or container declares
_MAX_MESSAGE = 2**32 - 1


def _statement_timeout(text: str) -> float:
    value = _positive_seconds(text)
    low, high = _STATEMENT_TIMEOUT_RANGE
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(
            f"must be {low} to {high} seconds (Postgres' statement_timeout, in milliseconds)"
        )
    return value


def _message_bytes(text: str) -> int:
    value = _at_least_one(text)
    if value > _MAX_MESSAGE:
        raise argparse.ArgumentTypeError(f"must be 1 to {_MAX_MESSAGE}")
    return value


def _shard(text: str) -> Any:
    from campaignstats.errors import UsageError
    from campaignstats.shards import Shard

    try:
        return Shard.parse(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be 0 to 65535 (0: any free port)")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _seconds_or_zero(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError("must be 0 or a positive number of seconds")
    return value


def _pairs(
    words: Sequence[str], flag: str, number: Callable[[str], Any] | None = None
) -> dict[str, Any]:
    """``NAME=VALUE`` options as a map (a number when ``number`` is given)."""
    out: dict[str, Any] = {}
    for word in words:
        name, sep, value = word.partition("=")
        if not sep:
            raise SystemExit(f"{flag} takes NAME=VALUE, not {word!r}")
        if flag == "--member":  # a name may take several members
            out.setdefault(name, []).append(value)
            continue
        if number is None:
            out[name] = value
            continue
        try:
            out[name] = number(value)
        except ValueError:
            raise SystemExit(f"{flag} {name}: not a number: {value!r}") from None
    return out


def _gauge_value(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def print_history(reply: dict[str, Any], width: int = 40) -> None:
    """Non-zero buckets as lines of a text chart: UTC start, supporters, actions, and a bar of
    supporters scaled to the largest bucket."""
    buckets = reply["buckets"]
    if not buckets:
        print("no supporters or actions in that range")
        return
    shape = {"minute": "%Y-%m-%d %H:%M", "hour": "%Y-%m-%d %H:00", "day": "%Y-%m-%d"}
    fmt = shape.get(reply["unit"], "%Y-%m-%d %H:%M")
    top = max(max(s for _, s, _ in buckets), 1)
    print(f"{'UTC':<16}  {'supporters':>10}  {'actions':>8}")
    for start, supporters, actions in buckets:
        when = datetime.fromtimestamp(start, UTC).strftime(fmt)
        bar = "#" * round(width * supporters / top) if supporters else ""
        print(f"{when:<16}  {supporters:>10,}  {actions:>8,}  {bar}")


def print_metrics(campaign_id: int, reply: dict[str, Any]) -> None:
    """A campaign's metrics as indented lines: the total, then each dimension and key."""

    def values(label: str, v: dict[str, Any], indent: str) -> None:
        parts = [f"{name}={n:,}" for name, n in sorted(v["counters"].items())]
        parts += [f"{name}~{n:,} unique" for name, n in sorted(v["uniques"].items())]
        parts += [f"{name}:{g} (gauge)" for name, g in sorted(v["gauges"].items())]
        parts += [f"{name} seen {t:.0f}" for name, t in sorted(v["last_seen"].items())]
        print(f"{indent}{label}: {', '.join(parts) or '-'}")

    values(f"campaign {campaign_id}", reply["total"], "")
    for dim, keys in sorted(reply["dims"].items()):
        values(f"{dim} (total)", keys["total"], "  ")
        for key, v in sorted((k, v) for k, v in keys.items() if k != "total"):
            values(f"{dim}={key}", v, "    ")


#: the ``serve --metrics-*`` options: the per-campaign bounds of custom metrics (docs/metrics.md,
#: "Limits"); each is a field of MetricLimits
_METRIC_LIMIT_OPTIONS = {
    "max_string": "bytes of UTF-8 of a metric name, dimension, key or member",
    "max_names": "metric names per campaign",
    "max_dims": "dimensions per campaign",
    "max_keys": "keys of one dimension per campaign",
    "max_members": "members of one name in one update",
    "max_unique_series": "unique sets per campaign",
    "gauge_buckets": "6-minute buckets kept per gauge",
    "unique_days": "daily unique sets kept per unique metric",
}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def parse_scope(words: Sequence[str]) -> Scope:
    """``all``, ``live`` or campaign ids, as the CLI and ``resync`` take them."""
    if words == ["all"]:
        return "all"
    if words == ["live"]:
        return "live"
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
    """A database command (init-db, demo, calculate, slots). SIGTERM stops it as Ctrl-C does,
    where it is, the embedded Postgres it started included (killed by the signal, it left that
    Postgres running); the status is then 143, as for a process the signal ended."""
    import signal

    main = asyncio.current_task()
    assert main is not None
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        main.cancel()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        return await _with_db_connected(args)
    except asyncio.CancelledError:
        if not terminated:
            raise
        return 128 + signal.SIGTERM


async def _with_db_connected(args: argparse.Namespace) -> Any:
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
            f"{len(result.campaigns)} campaigns, {result.duration:.3f} s, "
            f"max action id {result.max_action_id}"
        )
    return 0


def print_table(campaigns: dict[int, Any], limit: int = 20) -> None:
    rows = sorted(campaigns.items(), key=lambda kv: -kv[1].supporters)[:limit]
    print(f"{'campaign':>9} {'supporters':>11} {'extra':>7} {'actions':>9}  top areas")
    for cid, s in rows:
        action, area, _ = s.maps()
        areas = ", ".join(f"{a} {n}" for a, n in sorted(area.items(), key=lambda kv: -kv[1])[:3])
        actions = sum(action.values())
        print(f"{cid:>9} {s.supporters:>11,} {s.extra_supporters:>7,} {actions:>9,}  {areas}")


def _stdout_gone() -> bool:
    """True when stdout is a pipe whose reader has closed it (a broken pipe there is the
    reader's doing, not the server's)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no stdout, or not a file
        return False


def _serve_on_loop(args: argparse.Namespace) -> int:
    """``serve`` on the event loop ``--loop`` names (campaignstats/loops.py)."""
    from campaignstats.loops import runner

    name, run = runner(args.loop)
    log.info("serve.loop", loop=name, asked=args.loop)
    return int(run(serve(args)))


async def serve(args: argparse.Namespace) -> int:
    """``campaignstats serve``. SIGTERM and SIGINT stop it gracefully once it has started, and
    while it starts (the embedded Postgres, demo data, the slot) they stop the start-up where it
    is, the embedded Postgres included (as ``asyncio.run`` does for Ctrl-C)."""
    import signal

    main = asyncio.current_task()
    assert main is not None
    stop = asyncio.Event()
    starting = True

    def on_signal() -> None:
        stop.set()
        if starting:
            main.cancel()

    def started() -> None:  # from here on a signal only sets ``stop``: the graceful stop
        nonlocal starting
        starting = False

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        return await _serve(args, stop, started)
    except asyncio.CancelledError:
        if not stop.is_set():
            raise
        log.info("serve.stopped_while_starting")
        return 0


async def _serve(args: argparse.Namespace, stop: asyncio.Event, started: Callable[[], None]) -> int:
    from campaignstats.actor.actor import ActorConfig
    from campaignstats.actor.metrics import MetricsConfig
    from campaignstats.actor.supervisor import SupervisorGaveUp
    from campaignstats.db.source import PostgresSource
    from campaignstats.errors import StatsError
    from campaignstats.protocol import Limits
    from campaignstats.server import ServerConfig, StatsServer
    from campaignstats.service import StatsService
    from campaignstats.webhooks import WebhookConfig

    host = None if args.no_tcp else args.host
    exposed = args.host if host is not None or not args.no_http else None  # TCP or HTTP
    if exposed is not None and not _is_loopback(exposed) and not args.token:
        if not args.insecure:
            print(
                f"refusing to listen on {exposed} without a token: set --token (or "
                "$CAMPAIGNSTATS_TOKEN), or pass --insecure if the network is trusted",
                file=sys.stderr,
            )
            return 2
        log.warning("serve.insecure", host=exposed, reason="non-loopback address without a token")
    if args.appendonly is None:
        log.warning("serve.metrics_in_memory", hint="--appendonly PATH keeps custom metrics")
    metric_limits = MetricLimits(
        **{field: getattr(args, f"metrics_{field}") for field in _METRIC_LIMIT_OPTIONS},
        max_campaigns=args.metrics_max_campaigns,
    )
    if args.webhook and args.snapshot is None:
        print(
            "--webhook needs --snapshot: the webhooks' outbox is kept beside it (PATH.events), "
            "so that no event is lost across a restart",
            file=sys.stderr,
        )
        return 2
    if args.webhook and not args.webhook_secret:
        log.warning("serve.webhooks_unsigned", hint="--webhook-secret signs each delivery")
    webhooks = WebhookConfig(
        tuple(args.webhook),
        args.webhook_secret.encode() if args.webhook_secret else None,
        backoff_max=args.webhook_retry_max,
    )
    if (problem := webhooks.check()) is not None:  # before anything is opened
        print(f"--webhook: {problem}", file=sys.stderr)
        return 2
    if host is None and args.unix is None:
        print("--no-tcp listens on the Unix socket only: give it --unix PATH", file=sys.stderr)
        return 2
    dsn, embedded = await resolve_dsn(args.dsn, args.data_dir)
    try:
        if embedded is not None:
            await _prepare_embedded(dsn, args.demo_if_empty)
        shard = _shard_filter(args.shard)
        service = StatsService(
            PostgresSource(
                dsn,
                statement_timeout=args.statement_timeout,
                owns=None if shard is None else shard.owns,
            ),
            ActorConfig(
                shard=args.shard,
                sync_interval=args.sync_interval,
                snapshot_path=args.snapshot,
                max_keys=args.max_keys,
                max_campaigns=args.max_campaigns,
                metrics=MetricsConfig(
                    appendonly=args.appendonly,
                    appendfsync=args.appendfsync,
                    snapshot_interval=args.snapshot_interval or None,
                    archive_dir=args.archive_dir,
                    archive_every=args.archive_every,
                    limits=metric_limits,
                ),
                goals_log=_goals_log(args.snapshot),
                webhooks=webhooks,
                gc_policy=not args.no_gc_policy,
                pack_idle=args.pack_idle,
                pack_interval=min(DEFAULT_PACK_INTERVAL, args.pack_idle or DEFAULT_PACK_INTERVAL),
            ),
            mailbox_size=args.mailbox_size,
            max_string=args.max_string,
        )
        server = StatsServer(
            service,
            ServerConfig(
                host=host,
                port=args.port,
                unix_path=args.unix,
                token=args.token,
                limits=Limits(args.max_message, args.max_batch, args.max_string, metric_limits),
                max_connections=args.max_connections,
                max_output=args.max_output,
                idle_timeout=args.idle_timeout,
            ),
        )
        # the slot before the first calculation's snapshot (docs/follow.md, "Start-up")
        follower = await follow_commands.prepare_follower(args, dsn, embedded, server)
        if follower is not None and shard is not None:
            follower.owns = shard.owns  # a shard follows its own campaigns only
        http_server = None if args.no_http else _http_server(args, service, server)
        # What is alive now (modules, classes, configuration) lives as long as the process: the
        # garbage collector's full passes skip it from here on. They run in the actor's event
        # loop, and each walked all of it: 25-46 ms of CPU at the 5M demo, 10-16 ms without it
        # (docs/measurements.md, "Event-loop stalls"); the policy also keeps them out of
        # calculations and merges (campaignstats.actor.gcpolicy).
        if not args.no_gc_policy:
            gc.freeze()
        started()  # a signal from here on is the graceful stop below, once all has started
        await service.start()
        try:
            await server.start()  # closes what it opened when it fails
        except (OSError, StatsError) as exc:  # StatsError: a Unix socket path not ours to take
            return await _cannot_listen(exc, service)
        if http_server is not None:
            try:
                await http_server.start()
            except OSError as exc:
                await server.close()
                return await _cannot_listen(exc, service)
        following = follow_commands.start_following(follower, service, server.tasks)
        where = []
        if host is not None:
            where.append(f"tcp://{_url_host(host)}:{server.port}")
        if args.unix is not None:
            where.append(f"unix://{args.unix.resolve()}")
        print(f"campaignstats {__version__} listening on {', '.join(where)}", flush=True)
        if args.shard is not None:
            print(f"  shard:     {args.shard} (docs/scale.md)", flush=True)
        print(f"  query it:  campaignstats stats 1 --url {where[0]}", flush=True)
        if http_server is not None:
            base = f"http://{_url_host(http_server.config.host)}:{http_server.port}"
            print(f"  HTTP:      {base}/v1/campaigns/1 (docs/http.md)", flush=True)
            print(f"  demo page: {base}/", flush=True)
        print("  stop it:   Ctrl-C (or SIGTERM)", flush=True)
        waiter = asyncio.create_task(stop.wait())
        supervisor = asyncio.create_task(service.wait())
        await asyncio.wait({waiter, supervisor}, return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if supervisor.done():
            error = supervisor.exception()
            log.critical("serve.actor_gave_up", error=str(error))
            code = 70 if isinstance(error, SupervisorGaveUp) else 1
        else:
            log.info("serve.stopping")
        waiter.cancel()
        if http_server is not None:
            await http_server.close()  # ends the event streams, lets requests in flight finish
        # The follower runs in the server's task group, which close() waits for: stopped first
        # (it never ends on its own; the slot keeps what it had not applied for the next start).
        await follow_commands.stop_following(following)
        await server.close()  # stop accepting first, so nothing new arrives while we drain
        await service.stop()
        supervisor.cancel()
        return code
    finally:
        if embedded is not None:
            embedded.close()


async def _cannot_listen(exc: Exception, service: Any) -> int:
    """A listener that cannot open (a port in use, an address not here): one line, and the
    service stopped (its snapshot written, as at any stop)."""
    text = str(exc)
    print(text if text.startswith("cannot listen") else f"cannot listen: {text}", file=sys.stderr)
    await service.stop()
    return 1


def _shard_filter(shard: Any) -> Any:
    from campaignstats.shards import ShardFilter

    return None if shard is None else ShardFilter(shard)


def _http_server(args: argparse.Namespace, service: Any, server: Any) -> Any:
    from campaignstats.http import HttpConfig, HttpServer, app

    config = HttpConfig(
        token=args.token,
        max_age=args.http_max_age,
        cors_origins=tuple(args.cors_origin or ["*"]),
        max_message=args.max_message,
        max_batch=args.max_batch,
        max_string=args.max_string,
        max_streams=args.max_connections,
    )
    return HttpServer(
        app(service, config, info_hook=server.add_info),
        host=args.host if args.host is not None else "127.0.0.1",
        port=args.http_port,
    )


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _prepare_embedded(dsn: str, demo_actions: int) -> None:
    import asyncpg

    from campaignstats.db.demo import fill_demo
    from campaignstats.db.schema import init_db, is_empty

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await init_db(conn)
        if demo_actions and await is_empty(conn):
            print(f"empty database: adding {demo_actions:,} demo actions", flush=True)
            await fill_demo(conn, actions=demo_actions, seed=1)
    finally:
        await conn.close()


def run_client_command(args: argparse.Namespace) -> int:
    from campaignstats.client import StatsClient
    from campaignstats.model import CampaignStats

    with StatsClient(args.url, token=args.token, timeout=args.timeout) as client:
        if args.command == "stats":
            many = client.stats_many(args.campaign_ids)
            if args.json:
                print(json.dumps({str(k): v for k, v in many.items()}, default=str))
            else:
                print_table({cid: CampaignStats.from_wire(st) for cid, st in many.items()})
        elif args.command in ("inc", "dec"):
            send = client.increment if args.command == "inc" else client.decrement
            send(
                args.campaign_id,
                args.org_id,
                args.action_type,
                args.area,
                args.new_supporter,
                args.count,
                args.action_id,
                txid=args.txid,
                at=args.at,
                page=args.page,
                messages=args.messages,
            )
            client.flush()
            # A cast gets no reply when it succeeds; its error, if any, came before the flush's.
            if client.statistics().server_errors:
                print("refused by the server (the warning above says why)", file=sys.stderr)
                return 1
            print("applied")
        elif args.command == "metric":
            client.metric(
                args.campaign_id,
                dims=_pairs(args.dim, "--dim") or None,
                incr=_pairs(args.incr, "--incr", int) or None,
                set=_pairs(args.set, "--set", int) or None,
                gauge=_pairs(args.gauge, "--gauge", _gauge_value) or None,
                member=_pairs(args.member, "--member") or None,
                seen=args.seen or None,
                at=args.at,
            )
            client.flush()
            if client.statistics().server_errors:
                print("refused by the server (the warning above says why)", file=sys.stderr)
                return 1
            print("applied")
        elif args.command == "metrics":
            replies = {cid: client.metrics(cid) for cid in args.campaign_ids}
            if args.json:
                print(json.dumps({str(k): v for k, v in replies.items()}, default=str))
            else:
                for cid, reply in replies.items():
                    print_metrics(cid, reply)
        elif args.command == "guard":
            if args.clear == (args.deadline is not None or args.min_period is not None):
                print("guard: give --deadline and/or --min-period, or --clear", file=sys.stderr)
                return 2
            guard = client.set_guard(
                args.campaign_id, args.name, deadline=args.deadline, min_period=args.min_period
            )
            if guard["deadline"] is None and guard["min_period"] is None:
                print(f"campaign {args.campaign_id}: {args.name!r} is not guarded")
            else:
                print(f"campaign {args.campaign_id}: {args.name!r} guarded: {json.dumps(guard)}")
        elif args.command == "history":
            history = client.history(
                args.campaign_id, args.unit, args.start, args.end, page=args.page
            )
            if args.json:
                print(json.dumps(history))
            else:
                print_history(history)
                if args.page is not None and not history["buckets"]:
                    # A page is looked up within the campaign given: say where it is.
                    owner = client.page_stats(args.page).get("campaign_id")
                    if owner and owner != args.campaign_id:
                        print(
                            f"page {args.page} is an action page of campaign {owner}: "
                            f"campaignstats history {owner} --page {args.page}"
                        )
        elif args.command == "recent":
            print(json.dumps(client.recent(args.campaign_id, args.tz), indent=2))
        elif args.command == "top":
            print(f"{'campaign':>12}  {args.by:>12}")
            for cid, value in client.top(args.by, args.limit):
                print(f"{cid:>12}  {value:>12,}")
        elif args.command == "page":
            print(json.dumps(client.page_stats(args.id), indent=2))
        elif args.command == "org":
            print(json.dumps(client.org_stats(args.id), indent=2))
        elif args.command == "info":
            print(json.dumps(client.info(), indent=2, default=str))
        elif args.command == "goals":
            return _goals_command(client, args)
        elif args.command == "resync":
            started = client.resync(parse_scope(args.scope))
            print("calculation started" if started else "a calculation is already running")
    return 0


def _goals_command(client: Any, args: argparse.Namespace) -> int:
    """``campaignstats goals ID [--set N,N | --ladder] [--area AREA=N,...]``."""
    cid = args.campaign_id
    if args.thresholds is not None or args.ladder or args.area is not None:
        if args.thresholds is not None and args.ladder:
            print("give --set or --ladder, not both", file=sys.stderr)
            return 2
        try:
            current = client.get_goals(cid)
            supporters: list[int] | None
            if args.thresholds is not None:
                supporters = [int(t) for t in args.thresholds.split(",") if t.strip()]
            elif args.ladder:
                supporters = None
            else:  # --area alone keeps the thresholds (the default ladder stays the default)
                from campaignstats.goals import DEFAULT_LADDER

                kept = current["supporters"]
                supporters = None if tuple(kept) == DEFAULT_LADDER else kept
            area = current["area"] if args.area is None else _quorums(args.area)
        except ValueError as exc:
            print(f"not a list of numbers: {exc}", file=sys.stderr)
            return 2
        client.set_goals(cid, supporters, area or None)
    goals = client.get_goals(cid)
    if args.json:
        print(json.dumps(goals))
        return 0
    reached = set(goals["reached"])
    marks = ", ".join(f"{t:,}{' (reached)' if t in reached else ''}" for t in goals["supporters"])
    nxt = goals["next"]
    print(f"campaign {cid}")
    print(f"  supporters goals: {marks or 'none'}")
    print(f"  next:             {'none' if nxt is None else f'{nxt:,}'}")
    if goals["area"]:
        areas = set(goals["areas_reached"])
        quorums = ", ".join(
            f"{a}={t:,}{' (reached)' if a in areas else ''}"
            for a, t in sorted(goals["area"].items())
        )
        print(f"  area quorums:     {quorums}")
        print(f"  areas reached:    {len(areas)} of {len(goals['area'])}")
    return 0


def _quorums(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        area, sep, n = part.partition("=")
        if not sep:
            raise ValueError(f"{part!r} is not AREA=N")
        out[area.strip()] = int(n)
    return out


COMMANDS = {
    "init-db": cmd_init_db,
    "demo": cmd_demo,
    "calculate": cmd_calculate,
    "slots": follow_commands.cmd_slots,
}


#: what ``campaignstats[server]`` adds to the plain (client) install
_SERVER_MODULES = frozenset(
    {
        "anyio",
        "asyncpg",
        "datasketches",
        "httptools",
        "httpx",
        "pgserver",
        "prometheus_client",
        "starlette",
        "tqdm",
        "uvicorn",
    }
)


#: the commands that talk to Postgres, not to a campaignstats server
_DATABASE_COMMANDS = frozenset({"init-db", "demo", "calculate", "slots", "serve"})


def _peer_of(command: str) -> str:
    """What a command that failed to connect could not reach, for its error message."""
    return "database" if command in _DATABASE_COMMANDS else "server"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    from campaignstats.errors import StatsError

    try:
        if args.command in (
            "stats",
            "inc",
            "dec",
            "metric",
            "metrics",
            "guard",
            "history",
            "recent",
            "top",
            "page",
            "org",
            "info",
            "resync",
            "goals",
        ):
            code = run_client_command(args)
            # What is still in stdout's buffer (a short output, block-buffered in a pipe) is
            # written here, where a reader that has gone is handled, not at the exit's flush.
            sys.stdout.flush()
            return code
        if args.command == "serve":
            return _serve_on_loop(args)
        return int(asyncio.run(_with_db(args)))
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.partition(".")[0] not in _SERVER_MODULES:
            raise
        # The plain install is the client only (docs/design.md, "The house").
        print(
            f"campaignstats {args.command} needs the server's dependencies ({exc.name} is "
            "missing): pip install 'campaignstats[server]'",
            file=sys.stderr,
        )
        return 2
    except BrokenPipeError as exc:
        if _stdout_gone():
            # The reader of our output went away (`campaignstats stats ... | head`): stop
            # quietly, as cat does, with the exit status of a process SIGPIPE ended.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 128 + 13
        print(f"cannot reach the {_peer_of(args.command)}: {exc}", file=sys.stderr)
        return 1
    except ConnectionError as exc:
        print(f"cannot reach the {_peer_of(args.command)}: {exc}", file=sys.stderr)
        return 1
    except StatsError as exc:
        log.error("command_failed", command=args.command, error=str(exc))
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
