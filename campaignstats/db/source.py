"""Where the actor gets the truth: a calculation on a fresh connection to Postgres each time.

A fresh connection per calculation keeps the actor independent of the database's life: a
restarted Postgres, a killed backend or a network blip costs one failed calculation, retried
with backoff, and never a stale pooled connection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from campaignstats.errors import CalculationError
from campaignstats.journal import EarlyHorizon
from campaignstats.model import CalculationResult, Scope, scope_name

from .calculation import DEFAULT_STATEMENT_TIMEOUT, calculate
from .queries import PROCA_QUERIES, Queries

if TYPE_CHECKING:
    import asyncpg


@dataclass(slots=True)
class PostgresSource:
    dsn: str
    queries: Queries = field(default=PROCA_QUERIES)
    statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT
    connect_timeout: float = 10.0
    #: split the supporter counts over two connections sharing one snapshot (about 1.6x faster
    #: on 2 cores); costs a second connection during calculations only
    parallel: bool = True
    #: a shard's ownership test (docs/scale.md): calculations cover its campaigns only
    owns: Callable[[int], bool] | None = None
    #: it tells the actor what its snapshot holds as soon as it is taken (the journal folds)
    reports_horizon: ClassVar[bool] = True

    async def calculate(
        self, scope: Scope, *, on_horizon: Callable[[EarlyHorizon], None] | None = None
    ) -> CalculationResult:
        """One calculation; ``on_horizon``: see :func:`campaignstats.db.calculation.calculate`."""
        import asyncpg

        conns: list[asyncpg.Connection] = []
        try:
            for _ in range(2 if self.parallel else 1):
                conns.append(
                    await asyncpg.connect(
                        self.dsn,
                        timeout=self.connect_timeout,
                        # statement_timeout is enforced by the server; this one also ends a
                        # query whose connection died silently (failover, NAT), which would
                        # otherwise keep the calculation "running" for ever
                        command_timeout=self.statement_timeout + 10,
                    )
                )
        except BaseException as exc:  # cancelled too: never leave a connection behind
            await _close_all(conns)
            if not isinstance(
                exc, OSError | asyncpg.PostgresError | asyncpg.InterfaceError | TimeoutError
            ):
                raise
            raise CalculationError(
                f"{scope_name(scope)} calculation: cannot connect: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            return await calculate(
                conns[0],
                scope,
                queries=self.queries,
                statement_timeout=self.statement_timeout,
                helper_conn=conns[1] if len(conns) > 1 else None,
                owns=self.owns,
                on_horizon=on_horizon,
            )
        finally:
            await _close_all(conns)


async def _close_all(conns: list[asyncpg.Connection]) -> None:
    for conn in conns:
        # terminate(), not close(): it cannot be interrupted by a cancellation half-way, and a
        # connection that has finished (or failed) its work has nothing to say goodbye with.
        conn.terminate()
