"""What the calls of every database backend (SQLite, PostgreSQL) share, written once: one
statement as a batch of one, the history's audit entry after a commit, a query's row limit."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anyio
import anyio.to_thread

from atomictools.engine.changes.model import Params, Statement
from atomictools.engine.changes.sqlstep import audit_of
from atomictools.engine.errors import AtomicToolsError, InvalidArgumentError, TooLargeError
from atomictools.engine.history.recording import History
from atomictools.engine.results import Progress, StatementResult

logger = logging.getLogger("atomictools.engine.db")
MAX_ROWS_LIMIT = 100_000


def check_max_rows(max_rows: int) -> None:
    """A query's row limit must be usable (a reply of millions of rows is not)."""
    if max_rows < 1:
        raise InvalidArgumentError(f"max_rows must be at least 1, not {max_rows}")
    if max_rows > MAX_ROWS_LIMIT:
        raise TooLargeError(f"max_rows {max_rows} is more than the limit of {MAX_ROWS_LIMIT}")


class DatabaseCalls:
    """The base of ``Database`` and ``PgDatabase``: each provides ``run_statements``."""

    name: str
    history: History | None

    async def run_statements(
        self,
        statements: Sequence[Statement],
        *,
        progress: Progress | None = None,
        idempotency_key: str | None = None,
    ) -> list[StatementResult]:
        raise NotImplementedError

    async def execute(
        self, sql: str, params: Params = None, *, idempotency_key: str | None = None
    ) -> StatementResult:
        """One statement in its own transaction."""
        batch = [Statement(sql, params)]
        return (await self.run_statements(batch, idempotency_key=idempotency_key))[0]

    async def _audit(
        self, statements: Sequence[Statement], results: Sequence[StatementResult]
    ) -> None:
        """The history's audit entry of a committed call: which database, what ran, how many
        rows changed. After the commit, so a failure here is logged, never raised."""
        history = self.history
        if history is None or not history.enabled:
            return
        audit = audit_of(self.name, statements, results)
        op = "db_execute" if len(statements) == 1 else "db_transaction"
        with anyio.CancelScope(shield=True):
            try:
                await anyio.to_thread.run_sync(
                    history.store.record_audit, op, self.name, audit["statements"], audit["rows"]
                )
            except AtomicToolsError as err:
                logger.warning("the history's audit entry for %s failed: %s", self.name, err)
