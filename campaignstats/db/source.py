"""Where the actor gets the truth: a calculation on a fresh connection to Postgres each time.

A fresh connection per calculation keeps the actor independent of the database's life: a
restarted Postgres, a killed backend or a network blip costs one failed calculation, retried
with backoff, and never a stale pooled connection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from campaignstats.errors import CalculationError
from campaignstats.model import CalculationResult

from .calculation import DEFAULT_STATEMENT_TIMEOUT, Scope, calculate, scope_kind
from .queries import PROCA_QUERIES, Queries


@dataclass(slots=True)
class PostgresSource:
    dsn: str
    queries: Queries = field(default=PROCA_QUERIES)
    statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT
    connect_timeout: float = 10.0

    async def calculate(self, scope: Scope) -> CalculationResult:
        import asyncpg

        try:
            conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise CalculationError(
                f"{scope_kind(scope)} calculation: cannot connect: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            return await calculate(
                conn, scope, queries=self.queries, statement_timeout=self.statement_timeout
            )
        finally:
            try:
                await conn.close(timeout=5)
            except Exception:  # the server may already be gone; the socket is closed anyway
                conn.terminate()
