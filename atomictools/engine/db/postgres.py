"""PostgreSQL behind the same five database tools, with the same guarantees as SQLite.

- Every change is one transaction (``BEGIN`` ... ``COMMIT``); any exit but success rolls back.
  Each statement is classified by PostgreSQL's own parser first (``pgguard``), so what would
  end or escape the transaction is refused before anything runs.
- ``query`` runs in a ``READ ONLY`` transaction on a connection of its own, with a statement
  timeout: a write hidden in a function fails inside PostgreSQL, not in a pattern match.
- A cancel (or the tool deadline) sends PostgreSQL's cancel request for exactly that backend,
  then rolls back, shielded and bounded (``pgconn.guarded``); the deadline is also the
  transaction's ``statement_timeout``, in case this process cannot send the request.
- An idempotency key is a row of ours in the same database and transaction as the change, so
  a retry that reaches another server (another machine) is applied once. A connection lost
  during COMMIT is said as "outcome unknown: retry with the same idempotency_key".
- A role that is (or may become) a superuser is refused unless ``allow_superuser``.

asyncio only (psycopg's async connections wait on asyncio).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import psycopg
from psycopg import errors as pgerrors
from psycopg.pq import TransactionStatus
from psycopg.types.string import TextLoader

from atomictools.engine.changes import idempotency, markers, pgmarkers
from atomictools.engine.changes.model import Params, Statement
from atomictools.engine.changes.sqlstep import shortened
from atomictools.engine.db import pgconn, pgguard
from atomictools.engine.db.calls import DatabaseCalls, check_max_rows
from atomictools.engine.db.database import ColumnInfo, QueryResult, TableInfo
from atomictools.engine.db.dberrors import (
    DatabaseUnavailableError,
    StatementError,
)
from atomictools.engine.db.pgconn import Conn
from atomictools.engine.errors import (
    AtomicToolsError,
    CommitUnknownError,
    DatabaseError,
    InvalidArgumentError,
    PermissionDeniedError,
    ReadOnlyError,
)
from atomictools.engine.history.recording import History
from atomictools.engine.results import Progress, StatementResult

logger = logging.getLogger("atomictools.engine.db.postgres")

T = TypeVar("T")
POOL_SIZE = 4
QUERY_TIMEOUT = 60.0
"""The statement timeout of a query when the call has no earlier deadline."""
COMMIT_SECONDS = 30.0
"""How long a COMMIT may take before its outcome is called unknown."""
BATCH_SECONDS = 0.05
DEADLINE_MARGIN = 1.0
"""Seconds the server's statement timeout runs past the call's deadline."""
KEY_TABLE = idempotency.KEY_TABLE
_KEY_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS {} (scope TEXT NOT NULL, key TEXT NOT NULL, "
    "fingerprint TEXT NOT NULL, result TEXT NOT NULL, created DOUBLE PRECISION NOT NULL, "
    "expires DOUBLE PRECISION NOT NULL, PRIMARY KEY (scope, key))"
)
_MARKER_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS {} (txid TEXT PRIMARY KEY, "
    "record TEXT NOT NULL, created DOUBLE PRECISION NOT NULL)"
)
_SUPERUSER = (
    "SELECT EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolsuper "
    "AND pg_has_role(session_user, r.oid, 'MEMBER'))"
)
"""The session's role is a superuser, or a member of one (``SET ROLE`` would make it one)."""


class _Replay(Exception):  # not an error: leaves the transaction, rolling back
    """The key was used already: its first call's results, stored with it."""

    def __init__(self, stored: str) -> None:
        super().__init__("replay")
        self.stored = stored


def _timeout_ms(default: float | None) -> int:
    """The call's deadline (or ``default``) as PostgreSQL's ``statement_timeout``, in
    milliseconds (0: none). A backstop: the server stops the statement even if this process
    cannot ask; it goes off a little after the deadline, so that the call's own cancellation
    (a cancel request, then a rollback) is what the caller sees."""
    remaining = anyio.current_effective_deadline() - anyio.current_time()
    if math.isinf(remaining):
        return 0 if default is None else int(default * 1000)
    backstop = remaining + DEADLINE_MARGIN
    if default is not None:
        backstop = min(backstop, default)
    return max(1, int(backstop * 1000))


class PgTransaction:
    """The open write transaction given by ``PgDatabase.transaction()``."""

    def __init__(self, database: PgDatabase, conn: Conn) -> None:
        self._db = database
        self._conn = conn
        self.xid: str | None = None
        """The server's transaction id, once a change set asked for it (``set_transaction``)."""

    def ensure_open(self) -> None:
        if self._conn.closed or self._conn.info.transaction_status != TransactionStatus.INTRANS:
            raise DatabaseError(
                f"the transaction on {self._db.name} was rolled back after an earlier error; "
                "nothing was committed; start a new transaction"
            )

    async def execute(self, sql: str, params: Params = None) -> StatementResult:
        """Run one statement (several in one string are refused) and report its effect."""
        return (await self.run_all([Statement(sql, params)]))[0]

    async def run_all(
        self, statements: Sequence[Statement], progress: Progress | None = None
    ) -> list[StatementResult]:
        """Classify every statement first (nothing runs if one is refused), then run them in
        order; the first failure raises ``StatementError`` naming it."""
        total = len(statements)
        prepared = [self._db.prepare(s, i, total) for i, s in enumerate(statements, start=1)]
        results: list[StatementResult] = []
        while len(results) < total:
            self.ensure_open()
            batch, failure = await pgconn.guarded(
                self._conn, functools.partial(self._run_batch, prepared, len(results))
            )
            results.extend(batch)
            if failure is not None:
                raise self._db.statement_error(failure, statements, len(results) + 1)
            if progress is not None:
                await progress(len(results), total)
        return results

    async def run(self, statements: Sequence[Statement]) -> list[StatementResult]:
        """A change set's database step (``SqlTransaction``)."""
        return await self.run_all(statements)

    async def _run_batch(
        self, prepared: list[pgguard.Prepared], start: int
    ) -> tuple[list[StatementResult], psycopg.Error | None]:
        """Statements from ``start`` for about ``BATCH_SECONDS``, in one guarded call (a
        cancel stops the running statement, which ends the batch with its error)."""
        done: list[StatementResult] = []
        deadline = time.monotonic() + BATCH_SECONDS
        cursor = psycopg.AsyncRawCursor(self._conn)
        try:
            for item in prepared[start:]:
                try:
                    await cursor.execute(item.sql, item.params or None, prepare=False)
                except psycopg.Error as err:
                    return done, err
                done.append(StatementResult(cursor.rowcount, None))
                if time.monotonic() > deadline:
                    break
        finally:
            await cursor.close()
        return done, None

    async def query(self, sql: str, params: Params = None, *, max_rows: int = 1000) -> QueryResult:
        """Read inside the transaction (sees its own uncommitted changes)."""
        self.ensure_open()
        item = self._db.prepare(Statement(sql, params), None, 1)
        return await pgconn.guarded(self._conn, lambda: _fetch(self._conn, item, max_rows))

    async def mark(self, txid: str, record: str) -> None:
        """The change set's marker, in this transaction (see ``markers``); markers of this
        host's sets whose record is gone go too. Other hosts' markers are theirs to drop."""
        self.ensure_open()
        if self.xid is not None:
            self._db._xids[txid] = self.xid
        await pgconn.guarded(
            self._conn, lambda: _insert_marker(self._conn, self._db.marker_table, txid, record)
        )


async def _fetch(conn: Conn, item: pgguard.Prepared, max_rows: int) -> QueryResult:
    """At most ``max_rows`` rows (and whether there were more). A SELECT goes through a
    server-side cursor, so only those rows cross the wire and sit in memory, however large
    the result; SHOW and EXPLAIN (which a cursor cannot hold) answer a few rows anyway."""
    cursor: psycopg.AsyncRawCursor[tuple[Any, ...]] | psycopg.AsyncRawServerCursor[tuple[Any, ...]]
    if item.kind == "SelectStmt":
        cursor = psycopg.AsyncRawServerCursor(conn, "atomictools_rows")
        await cursor.execute(item.sql, item.params or None)
    else:
        cursor = psycopg.AsyncRawCursor(conn)
        await cursor.execute(item.sql, item.params or None, prepare=False)
    try:
        rows = await cursor.fetchmany(max_rows + 1) if cursor.description else []
        columns = tuple(d.name for d in cursor.description or ())
    finally:
        await cursor.close()
    truncated = len(rows) > max_rows
    return QueryResult(columns, tuple(tuple(r) for r in rows[:max_rows]), truncated)


class PgDatabase(DatabaseCalls):
    """A PostgreSQL database (``postgresql://`` URL) with the guarantees of ``Database``.

    Guarantee: a change is one transaction, committed whole or not at all, also when the call
    is cancelled or times out (the server's statement is stopped); queries cannot write.
    Caveat: asyncio only; ``StatementResult.lastrowid`` is always None (use ``RETURNING``); a
    change set's PostgreSQL step needs the role to read its marker table at recovery.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str | None = None,
        read_only: bool = False,
        allow_superuser: bool = False,
        idempotency_ttl: float = idempotency.DEFAULT_TTL_SECONDS,
        query_timeout: float = QUERY_TIMEOUT,
        pool_size: int = POOL_SIZE,
    ) -> None:
        self._conninfo = pgconn.url_conninfo(url)
        self.url = pgconn.shown_url(url)
        self.name = name or self.url
        self.read_only = read_only
        self.allow_superuser = allow_superuser
        self.idempotency_ttl = idempotency_ttl
        self.query_timeout = query_timeout
        self._writers = pgconn.Pool(
            lambda: self._connect(read_only=False), pool_size, self._unavailable
        )
        self._readers = pgconn.Pool(
            lambda: self._connect(read_only=True), pool_size, self._unavailable
        )
        self._checked = False
        self._key_table_ready = False
        self._marker_table_ready = False
        self.key_table = KEY_TABLE
        self.marker_table = markers.MARKER_TABLE
        """Our tables, in full once the first connection told their schema."""
        self._xids: dict[str, str] = {}
        """Change sets whose COMMIT is under way: their server transaction ids."""
        self.history: History | None = None
        self.kind = "postgres"

    @property
    def path(self) -> str:
        """Where the database is, as a change set's record names it (no password)."""
        return self.url

    async def __aenter__(self) -> PgDatabase:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._writers.close()
            await self._readers.close()

    # -- connections ------------------------------------------------------------------------

    async def _connect(self, *, read_only: bool) -> Conn:
        try:
            with anyio.fail_after(pgconn.GRACE_SECONDS * 5):
                conn: Conn = await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True, prepare_threshold=None
                )
            _exact_text(conn)
        except (psycopg.OperationalError, TimeoutError) as err:
            raise self._unavailable(err) from err
        try:
            if not self._checked:
                await self._refuse_superuser(conn)
                await self._check_session(conn)
                self._checked = True
        except BaseException:
            await pgconn.close_quietly(conn)
            raise
        return conn

    async def _check_session(self, conn: Conn) -> None:
        """Strings read as the guard reads them, and the schema our tables live in (named in
        full: a ``SET LOCAL search_path`` in a transaction must not redirect our statements)."""
        cursor = await conn.execute(
            "SELECT current_setting('standard_conforming_strings'), current_schema()"
        )
        row = await cursor.fetchone()
        assert row is not None
        if row[0] != "on":
            raise DatabaseError(
                f"PostgreSQL database {self.name} has standard_conforming_strings off, so the "
                "server would read string literals otherwise than the statement guard does; "
                "turn it on (ALTER DATABASE ... SET standard_conforming_strings = on)"
            )
        if row[1] is None:
            raise DatabaseError(
                f"PostgreSQL database {self.name}: the role's search_path names no schema it "
                "can use; give it one (ALTER ROLE ... SET search_path = ...)"
            )
        schema = '"' + str(row[1]).replace('"', '""') + '"'
        self.key_table = f"{schema}.{KEY_TABLE}"
        self.marker_table = f"{schema}.{markers.MARKER_TABLE}"

    def _unavailable(self, err: BaseException) -> DatabaseUnavailableError:
        """The server could not be reached, or went away before the call's first statement."""
        return DatabaseUnavailableError(
            f"cannot reach PostgreSQL database {self.name} ({self.url}): "
            f"{_first_line(err) or 'timed out'}; check that the server runs, the URL, and the "
            "password (PGPASSWORD or a passfile)"
        )

    async def _refuse_superuser(self, conn: Conn) -> None:
        if self.allow_superuser:
            return
        cursor = await conn.execute(_SUPERUSER)
        row = await cursor.fetchone()
        if row is not None and row[0]:
            raise PermissionDeniedError(
                f"PostgreSQL database {self.name}: the role {conn.info.user!r} is a superuser "
                "or a member of one, and an agent's SQL would run with every power over the "
                "server; connect as a role with only the privileges the tools need (see the "
                "README), or pass --allow-superuser"
            )

    # -- statements -------------------------------------------------------------------------

    def prepare(
        self, statement: Statement, index: int | None, total: int, *, read_only: bool = False
    ) -> pgguard.Prepared:
        """``pgguard``'s verdict on one statement, as this database's error if refused."""
        if not isinstance(statement.sql, str) or not statement.sql.strip():
            raise InvalidArgumentError("the SQL statement is empty")
        try:
            return pgguard.prepare(statement.sql, statement.params, read_only=read_only)
        except pgguard.PgStatementError as err:
            where = f"statement {index} of {total}" if index is not None else "the statement"
            raise StatementError(
                f"{where} ({shortened(statement.sql)}) was refused: {err}",
                index=index,
                sql=statement.sql,
            ) from None

    def statement_error(
        self, err: psycopg.Error, statements: Sequence[Statement], index: int
    ) -> AtomicToolsError:
        """A failed statement, said with PostgreSQL's own words (and its hint)."""
        sql = statements[index - 1].sql
        where = f"statement {index} of {len(statements)}"
        if isinstance(err, pgerrors.QueryCanceled):
            reason = (
                "it ran past the call's deadline (statement_timeout)"
                if "timeout" in _first_line(err)
                else "it was cancelled"
            )
        elif isinstance(err, pgerrors.InsufficientPrivilege):
            reason = f"{_first_line(err)}; the role needs that privilege (see the README)"
        else:
            reason = _first_line(err)
            hint = err.diag.message_hint if err.diag is not None else None
            if hint:
                reason += f" (hint: {hint})"
        return StatementError(f"{where} ({shortened(sql)}) failed: {reason}", index=index, sql=sql)

    # -- writes -----------------------------------------------------------------------------

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PgTransaction]:
        """``BEGIN`` ... ``COMMIT``; any exit but success rolls everything back."""
        if self.read_only:
            raise ReadOnlyError(f"database {self.name} is read-only; it can be queried only")
        timeout = _timeout_ms(None)
        async with self._writers.connection(lambda c: _begin(c, "BEGIN", timeout)) as conn:
            tx = PgTransaction(self, conn)
            committed = False
            try:
                yield tx
                tx.ensure_open()
                await self._commit(conn)
                committed = True
            finally:
                if not committed:
                    await _rollback(conn)

    async def _commit(self, conn: Conn) -> None:
        """COMMIT, shielded and bounded; a connection lost meanwhile: the outcome is unknown."""
        with anyio.CancelScope(shield=True):
            error: BaseException | None = None
            with anyio.move_on_after(COMMIT_SECONDS) as scope:
                try:
                    await conn.execute("COMMIT")
                except psycopg.Error as err:
                    error = err
            if (
                scope.cancelled_caught
                or conn.broken
                or conn.closed
                or (isinstance(error, psycopg.OperationalError) and error.sqlstate is None)
                or isinstance(error, pgerrors.AdminShutdown)
            ):
                await pgconn.close_quietly(conn)
                raise CommitUnknownError(
                    f"COMMIT on PostgreSQL database {self.name}: outcome unknown; retry with "
                    "the same idempotency_key (it returns the first result if the commit "
                    "happened, and runs once if it did not), or check with Database.query. "
                    "The server did not answer the COMMIT "
                    f"({_first_line(error) if error else 'timed out'})"
                ) from error
            if error is not None:  # refused at COMMIT (a deferred constraint): rolled back
                raise DatabaseError(
                    f"COMMIT on PostgreSQL database {self.name} was refused: {_first_line(error)}"
                ) from error

    async def run_statements(
        self,
        statements: Sequence[Statement],
        *,
        progress: Progress | None = None,
        idempotency_key: str | None = None,
    ) -> list[StatementResult]:
        """Several statements in one transaction: all of them or none. With
        ``idempotency_key`` the key's row commits with them, in this database."""
        if not statements:
            raise InvalidArgumentError("statements is empty; give at least one {sql, params}")
        total = len(statements)
        for index, statement in enumerate(statements, start=1):
            self.prepare(statement, index, total)  # refused before anything runs
        receipt = None
        if idempotency_key is not None:
            receipt = idempotency.Receipt(
                store=self.url,
                scope="",
                key=idempotency.check_key(idempotency_key),
                fingerprint=idempotency.fingerprint([[s.sql, s.params] for s in statements]),
                ttl=self.idempotency_ttl,
            )
            await self._ensure_key_table()
        try:
            async with self.transaction() as tx:
                if receipt is not None:
                    stored = await pgconn.guarded(
                        tx._conn, lambda: _claim_key(tx._conn, self.key_table, receipt)
                    )
                    if stored is not None:
                        raise _Replay(stored)  # rolled back: nothing of this call is kept
                results = await tx.run_all(statements, progress)
                if receipt is not None:
                    done = json.dumps([[r.rowcount, r.lastrowid] for r in results])
                    await pgconn.guarded(
                        tx._conn, lambda: _record_key(tx._conn, self.key_table, receipt, done)
                    )
        except _Replay as replay:
            return [StatementResult(*pair) for pair in json.loads(replay.stored)]
        await self._audit(statements, results)
        return results

    async def _ensure_key_table(self) -> None:
        if not self._key_table_ready:
            await self._ensure_table(_KEY_SCHEMA, KEY_TABLE, "idempotency keys")
            self._key_table_ready = True

    async def _ensure_table(self, schema: str, table: str, what: str) -> None:
        """One of our tables, made once in its own transaction (two servers may race: fine)."""
        if table == markers.MARKER_TABLE and self._marker_table_ready:
            return
        async with self._writers.connection() as conn:
            full = self.key_table if table == KEY_TABLE else self.marker_table
            try:
                await pgconn.guarded(conn, lambda: conn.execute(schema.format(full)))
            except (pgerrors.UniqueViolation, pgerrors.DuplicateTable):
                pass  # another server made it at the same moment
            except pgerrors.InsufficientPrivilege as err:
                raise PermissionDeniedError(
                    f"PostgreSQL database {self.name}: the role may not create the table "
                    f"{table} that {what} need ({_first_line(err)}); create it once as its "
                    "owner (the README gives the SQL)"
                ) from err
        if table == markers.MARKER_TABLE:
            self._marker_table_ready = True

    # -- a change set's database part (``SqlDatabase``) ---------------------------------------

    @asynccontextmanager
    async def set_transaction(self) -> AsyncIterator[PgTransaction]:
        """The write transaction of a change set's database steps, with its transaction id
        (recovery asks the server about it: committed, aborted, or still committing)."""
        await self._ensure_table(_MARKER_SCHEMA, markers.MARKER_TABLE, "change-set markers")
        async with self.transaction() as tx:
            cursor = await pgconn.guarded(
                tx._conn, lambda: tx._conn.execute("SELECT pg_current_xact_id()::text")
            )
            row = await cursor.fetchone()
            tx.xid = str(row[0]) if row is not None else None
            yield tx

    async def decide_marker(self, txid: str, record: str) -> bool:
        """After a COMMIT whose answer was lost: once the server has ended that transaction
        (``pg_xact_status``), is the set's marker there? Raises when it cannot tell."""
        xid = self._xids.pop(txid, None)
        found = False
        with anyio.CancelScope(shield=True):
            try:
                async with self._writers.connection() as conn:
                    found = await pgconn.guarded(
                        conn, lambda: _decide(conn, self.marker_table, txid, xid)
                    )
            except (psycopg.Error, AtomicToolsError) as err:
                raise DatabaseError(
                    f"cannot tell whether the change set committed on {self.name}: "
                    f"{_first_line(err)}"
                ) from err
        return found

    async def drop_marker(self, txid: str) -> None:
        """After the set is over (bounded; a later set or recovery drops it otherwise)."""
        self._xids.pop(txid, None)
        with anyio.CancelScope(shield=True), anyio.move_on_after(pgconn.GRACE_SECONDS):
            try:
                async with self._writers.connection() as conn:
                    await pgconn.guarded(
                        conn,
                        lambda: conn.execute(
                            f"DELETE FROM {self.marker_table} WHERE txid = %s", [txid]
                        ),
                    )
            except (psycopg.Error, AtomicToolsError) as err:
                logger.info("database %s: marker %s stays for now: %s", self.name, txid, err)

    # -- reads ------------------------------------------------------------------------------

    async def query(self, sql: str, params: Params = None, *, max_rows: int = 1000) -> QueryResult:
        """A read in a ``READ ONLY`` transaction on a reader connection, at most ``max_rows``
        rows, stopped at the call's deadline or after ``query_timeout``."""
        check_max_rows(max_rows)
        item = self.prepare(Statement(sql, params), None, 1, read_only=True)
        return await self._read(lambda conn: _fetch(conn, item, max_rows), sql)

    async def _read(self, work: Callable[[Conn], Awaitable[T]], sql: str) -> T:
        timeout = _timeout_ms(self.query_timeout)
        async with self._readers.connection(
            lambda c: _begin(c, "BEGIN READ ONLY", timeout)
        ) as conn:

            async def run() -> T:
                try:
                    return await work(conn)
                finally:
                    if not conn.closed:
                        await conn.execute("ROLLBACK")

            try:
                return await pgconn.guarded(conn, run)
            except pgerrors.ReadOnlySqlTransaction as err:
                raise StatementError(
                    f"the statement ({shortened(sql)}) would write ({_first_line(err)}); "
                    "Database.query only reads: use Database.execute",
                    index=None,
                    sql=sql,
                ) from err
            except psycopg.Error as err:
                raise self.statement_error(err, [Statement(sql)], 1) from err

    async def schema(self, table: str | None = None) -> list[TableInfo]:
        """Schemas' tables, views and indexes, tables and views with their columns (a table
        outside ``public`` is named ``schema.table``); with ``table``, that one alone. Our own
        bookkeeping tables are not listed."""

        async def describe(conn: Conn) -> list[TableInfo]:
            return await _describe(conn, table)

        found = await self._read(describe, "schema")
        if table is not None and not found:
            raise DatabaseError(f"no table or view named {table!r} in {self.name}")
        return found


# -- SQL helpers ---------------------------------------------------------------------------


async def _begin(conn: Conn, begin: str, timeout_ms: int) -> None:
    """Open the transaction and set its statement timeout (a query: it also takes the
    snapshot, after which a READ ONLY transaction cannot be made writable)."""
    await conn.execute(begin)
    await conn.execute("SELECT set_config('statement_timeout', %s, true)", [f"{timeout_ms}ms"])


async def _rollback(conn: Conn) -> None:
    """Shielded, bounded; a connection left unclean is closed by its pool."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(pgconn.GRACE_SECONDS):
        if not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
            try:
                await conn.execute("ROLLBACK")
            except psycopg.Error as err:
                logger.info("rollback failed: %s", err)


async def _claim_key(conn: Conn, table: str, receipt: idempotency.Receipt) -> str | None:
    """In the transaction: take the key (a concurrent call with it waits here until this one
    ends), or return the stored results of the call that took it first."""
    now = time.time()
    await conn.execute(
        f"DELETE FROM {table} WHERE scope = %s AND key = %s AND expires <= %s",
        [receipt.scope, receipt.key, now],
    )
    cursor = await conn.execute(
        f"INSERT INTO {table} (scope, key, fingerprint, result, created, expires) "
        "VALUES (%s, %s, %s, '', %s, %s) ON CONFLICT (scope, key) DO NOTHING",
        [receipt.scope, receipt.key, receipt.fingerprint, now, now + receipt.ttl],
    )
    if cursor.rowcount == 1:
        return None
    cursor = await conn.execute(
        f"SELECT fingerprint, result FROM {table} WHERE scope = %s AND key = %s",
        [receipt.scope, receipt.key],
    )
    row = await cursor.fetchone()
    if row is None:  # expired and deleted by another call meanwhile: extremely rare
        raise DatabaseError(f"idempotency key {receipt.key!r} changed while it was read; retry")
    if row[0] != receipt.fingerprint:
        raise idempotency.IdempotencyKeyReusedError(
            f"idempotency_key {receipt.key!r} was already used for a call with other arguments; "
            "repeat that call exactly to get its result, or use a new key for a new call"
        )
    return str(row[1])


async def _record_key(conn: Conn, table: str, receipt: idempotency.Receipt, results: str) -> None:
    await conn.execute(
        f"UPDATE {table} SET result = %s WHERE scope = %s AND key = %s",
        [results, receipt.scope, receipt.key],
    )


_DESCRIBE = """
SELECT n.nspname, c.relname, c.relkind,
       CASE WHEN c.relkind IN ('v', 'm') THEN pg_get_viewdef(c.oid, true)
            WHEN c.relkind = 'i' THEN pg_get_indexdef(c.oid) END
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'i', 'f')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%%'
  AND c.relname NOT LIKE 'atomictools%%'
ORDER BY n.nspname, c.relkind, c.relname
"""
_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       pg_get_expr(d.adbin, d.adrelid),
       COALESCE((SELECT k.n FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)
                 WHERE k.attnum = a.attnum), 0)
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""
_KINDS = {"r": "table", "p": "table", "f": "table", "v": "view", "m": "view", "i": "index"}


async def _describe(conn: Conn, table: str | None) -> list[TableInfo]:
    cursor = await conn.execute(_DESCRIBE)
    found = []
    for schema, name, kind, sql in await cursor.fetchall():
        shown = name if schema == "public" else f"{schema}.{name}"
        if table is not None and table not in (shown, f"{schema}.{name}"):
            continue
        if table is not None and kind == "i":
            continue
        columns: tuple[ColumnInfo, ...] = ()
        if kind != "i":
            described = await conn.execute(_COLUMNS, [schema, name])
            columns = tuple(
                ColumnInfo(c[0], c[1], bool(c[2]), c[3], int(c[4]))
                for c in await described.fetchall()
            )
        found.append(TableInfo(name=shown, type=_KINDS[kind], sql=sql, columns=columns))
    return found


async def _insert_marker(conn: Conn, table: str, txid: str, record: str) -> None:
    here = pgmarkers.host_record(record)
    cursor = await conn.execute(
        f"SELECT txid, record FROM {table} WHERE record LIKE %s",
        [pgmarkers.host_prefix() + "%"],
    )
    stale = [t for t, r in await cursor.fetchall() if pgmarkers.record_gone(str(r))]
    if stale:
        await conn.execute(f"DELETE FROM {table} WHERE txid = ANY(%s)", [stale])
    await conn.execute(
        f"INSERT INTO {table} (txid, record, created) VALUES (%s, %s, %s)",
        [txid, here, time.time()],
    )


async def _decide(conn: Conn, table: str, txid: str, xid: str | None) -> bool:
    """Wait (bounded) until the server has ended the transaction, then read the marker."""
    if xid is not None:
        deadline = time.monotonic() + COMMIT_SECONDS
        while True:
            cursor = await conn.execute("SELECT pg_xact_status(%s::xid8)", [xid])
            row = await cursor.fetchone()
            if row is None or row[0] != "in progress":
                break
            if time.monotonic() > deadline:
                raise DatabaseError(f"transaction {xid} is still committing on the server")
            await anyio.sleep(0.05)
    try:
        cursor = await conn.execute(f"SELECT 1 FROM {table} WHERE txid = %s", [txid])
    except pgerrors.UndefinedTable:
        return False
    return await cursor.fetchone() is not None


_AS_TEXT = ("interval", "date", "time", "timetz", "timestamp", "timestamptz", "json", "jsonb")
"""Types read as PostgreSQL's own text: Python's types would lose what JSON cannot say
(an interval's months, infinity, BC dates, a json number's digits)."""


def _exact_text(conn: Conn) -> None:
    for name in _AS_TEXT:
        conn.adapters.register_loader(name, TextLoader)


def _first_line(err: BaseException | None) -> str:
    return str(err).strip().splitlines()[0] if err is not None and str(err).strip() else ""
