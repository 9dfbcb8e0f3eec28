"""SQLite changes that are all-or-nothing and safe to cancel (aiosqlite, so asyncio only).

Every change runs inside ``BEGIN IMMEDIATE ... COMMIT`` on a connection opened without Python's
implicit transactions; ``savepoint()`` scopes nest inside. Any exit but success rolls back.
Cancellation while a statement runs aborts exactly that connection's statement with a
progress-handler flag (``interrupt()`` could hit the next statement), drains aiosqlite's queue,
then rolls back, shielded and time-bounded; if that cleanup fails the connection is closed and
replaced, never reused in an unknown state. An interrupted statement may have rolled back the
whole transaction (SQLite does that), so after any error the transaction is treated as gone.
Queries run on separate read-only connections (``mode=ro``, ``query_only``, a read-only
authorizer), so nothing sent to ``query`` can write. Parameters are always bound.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import quote

import aiosqlite
import anyio
import anyio.to_thread

from atomictools.engine.changes import idempotency, markers
from atomictools.engine.changes.model import Params, Statement
from atomictools.engine.changes.sqlstep import shortened
from atomictools.engine.config import Durability
from atomictools.engine.db.calls import DatabaseCalls, check_max_rows
from atomictools.engine.db.dberrors import (
    DatabaseBusyError,
    DatabaseError,
    StatementError,
    commit_failed,
    primary_code,
    translate,
)
from atomictools.engine.db.pinned import PinnedDirectory, open_descriptors
from atomictools.engine.db.sqlguard import SqlGuard
from atomictools.engine.durable.steps import crash_point
from atomictools.engine.errors import (
    AtomicToolsError,
    InvalidArgumentError,
    ReadOnlyError,
)
from atomictools.engine.history.recording import History
from atomictools.engine.results import Progress, StatementResult

logger = logging.getLogger("atomictools.engine.db.database")

T = TypeVar("T")
PROGRESS_STEPS = 1000
"""SQLite VM steps between checks of the abort flag: small enough to stop a query at once."""
CLEANUP_SECONDS = 5.0
MARKER_DROP_SECONDS = 0.5
"""The most a finished change set spends deleting its marker (else the next set does)."""
# Defined below this layer (dberrors, changes.model, results), documented here too.
__all__ = ["DatabaseError", "Params", "Statement", "StatementError", "StatementResult"]
STATEMENT_ERRORS = (sqlite3.Error, OverflowError, ValueError)
"""What a bad statement or parameter raises (an int beyond 64 bits is an OverflowError)."""
BATCH_SECONDS = 0.02
"""How long one worker call runs statements before progress is reported."""
MAX_READERS = 4


@dataclass(frozen=True, slots=True)
class QueryResult:
    """Rows of a read-only query. Caveat: at most ``max_rows`` (``truncated`` says so)."""

    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    truncated: bool
    """True when more rows existed than ``max_rows``."""


@dataclass(frozen=True, slots=True)
class ColumnInfo:
    name: str
    type: str
    not_null: bool
    default: str | None
    primary_key: int


@dataclass(frozen=True, slots=True)
class TableInfo:
    """A table's or view's schema: its columns and the SQL that created it."""

    name: str
    type: str
    sql: str | None
    columns: tuple[ColumnInfo, ...] = ()


def _text_or_bytes(raw: bytes) -> str | bytes:
    """TEXT that is not valid UTF-8 comes back as its bytes (lossless) instead of failing."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


class _Connection:
    """One aiosqlite connection with its guard and its abort flag."""

    def __init__(self, conn: aiosqlite.Connection, guard: SqlGuard, token: str) -> None:
        self.conn = conn
        self.guard = guard
        self.abort = threading.Event()
        self.token = token

    def progress(self) -> int:
        """SQLite's progress handler: a non-zero return aborts the running statement."""
        return 1 if self.abort.is_set() else 0

    @classmethod
    async def open(
        cls,
        target: str,
        *,
        uri: bool,
        read_only: bool,
        synchronous: str,
        busy_timeout: float,
        check: Callable[[], None] | None = None,
    ) -> _Connection:
        """A configured connection. ``check`` runs right after the database file is opened
        (before anything is read or written through it) and again once every file the
        connection needs (``-wal``, ``-shm``) is open; it raises to refuse the connection."""
        conn = await aiosqlite.connect(target, uri=uri, isolation_level=None, timeout=busy_timeout)
        conn.text_factory = _text_or_bytes
        try:
            if check is not None:
                check()
            if not read_only:
                # Two processes opening a new database at once both switch it to WAL; SQLite
                # answers one of them "locked" at once (its deadlock guard skips the busy wait).
                await until_not_busy(lambda: conn.execute("PRAGMA journal_mode=WAL"), busy_timeout)
                await conn.execute(f"PRAGMA synchronous={synchronous}")
            await conn.execute("PRAGMA foreign_keys=ON")
            if read_only:
                await conn.execute("PRAGMA query_only=ON")
            if check is not None:
                await conn.execute("SELECT count(*) FROM sqlite_master")  # opens -wal, -shm
                check()
            if not read_only:
                # The writer waits for other writers in begin(), on the event loop, where a
                # cancel can reach it; SQLite's own busy wait could not be interrupted.
                await conn.execute("PRAGMA busy_timeout=0")
            guard = SqlGuard(read_only=read_only)
            await conn.set_authorizer(guard)
            self = cls(conn, guard, secrets.token_hex(16))
            await conn.set_progress_handler(self.progress, PROGRESS_STEPS)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await conn.close()
            raise
        return self

    async def in_worker(self, func: Callable[..., T], *args: Any) -> T:
        """Run ``func(*args)`` in the connection's own thread, in order with its statements.

        aiosqlite's queue is the only way to reach that thread; ``_execute`` is how its own
        methods do it (not public, stable for years).
        """
        run = cast(Callable[..., Awaitable[T]], self.conn._execute)
        return await run(func, *args)

    async def internal(self, sql: str) -> None:
        """Run one of our own transaction-control statements (which users may not send).

        The guard lets exactly this statement's transaction action through. SQLite asks the
        authorizer only when it prepares a statement, so a cached copy of our COMMIT would run
        unchecked if a user sent the same text: a fresh random nonce in a comment makes every
        such text single-use and unguessable (and the guard refuses to read ``sqlite_stmt``,
        which lists prepared statements).
        """
        self.guard.allow_control = True
        try:
            await self.conn.execute(f"{sql} /* atomictools {secrets.token_hex(16)} */")
        finally:
            self.guard.allow_control = False

    async def drain(self) -> None:
        """Abort whatever statement of ours still runs and wait until the queue is empty.

        The flag aborts only this connection's statements, and is cleared by a call queued
        behind them, so it cannot hit a later statement. Call it shielded.
        """
        self.abort.set()
        try:
            # Any queued call runs after what is queued before it: this one is the marker.
            await self.conn.set_progress_handler(self.progress, PROGRESS_STEPS)
        finally:
            self.abort.clear()

    async def settle(self) -> bool:
        """After a failure or cancel: stop what runs, drain the queue, roll back. Shielded.

        Returns False when the connection could not be brought back to a known, idle state.
        """
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_SECONDS):
            try:
                await self.drain()
                if self.conn.in_transaction:
                    await self.internal("ROLLBACK")
            except sqlite3.Error:
                logger.warning("rolling back failed", exc_info=True)
                return False
            return not self.conn.in_transaction
        return False

    async def close(self) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_SECONDS):
            try:
                await self.conn.close()
            except Exception:  # closing a broken connection: nothing more to save
                logger.warning("closing a database connection failed", exc_info=True)


def _run_batch(
    c: _Connection, statements: Sequence[Statement], start: int, seconds: float
) -> tuple[list[StatementResult], tuple[int, Exception] | None]:
    """In aiosqlite's worker thread: run statements from ``start`` for about ``seconds``.

    Returns the results so far and, on failure, the failing statement's 1-based index and
    error. Stops early when the abort flag is up (the call was cancelled).
    """
    raw: sqlite3.Connection = c.conn._conn
    results: list[StatementResult] = []
    deadline = time.monotonic() + seconds
    for index in range(start, len(statements)):
        statement = statements[index]
        try:
            cursor = raw.execute(statement.sql, statement.params or ())
        except STATEMENT_ERRORS as err:
            return results, (index + 1, err)
        results.append(StatementResult(cursor.rowcount, cursor.lastrowid))
        cursor.close()
        if c.abort.is_set() or time.monotonic() > deadline:
            break
    return results, None


def _lookup_key(c: _Connection, receipt: idempotency.Receipt) -> str | None:
    """In the worker thread, inside the transaction: the key's stored results, if any."""
    raw: sqlite3.Connection = c.conn._conn
    try:
        idempotency.ensure_table(raw)
        return idempotency.lookup(raw, receipt)
    except sqlite3.Error as err:
        raise _key_table_error(err) from err


def _record_key(c: _Connection, receipt: idempotency.Receipt, results: str) -> None:
    try:
        idempotency.insert(c.conn._conn, receipt, results)
    except sqlite3.Error as err:
        raise _key_table_error(err) from err


def _as_engine(c: _Connection, func: Callable[..., T], *args: Any) -> T:
    """In the worker thread: run one of our own bookkeeping calls past the guard, which
    refuses users' statements on our tables (see ``SqlGuard.protected``)."""
    c.guard.allow_control = True
    try:
        return func(c.conn._conn, *args)
    finally:
        c.guard.allow_control = False


def _key_table_error(err: sqlite3.Error) -> DatabaseError:
    return DatabaseError(
        f"the idempotency key could not be looked up or recorded in table "
        f"{idempotency.KEY_TABLE} ({err}); the transaction was rolled back; check that table "
        "or call without idempotency_key"
    )


class Transaction:
    """The open write transaction given by ``Database.transaction()``."""

    xid: str | None = None
    """SQLite has no transaction ids: recovery decides from the marker alone."""

    def __init__(self, database: Database, connection: _Connection) -> None:
        self._db = database
        self._c = connection
        self._savepoints = 0

    def ensure_open(self) -> None:
        """Refuse to go on once SQLite itself rolled the transaction back (after an error).

        Otherwise a later statement would run in autocommit mode, outside any transaction.
        """
        if not self._c.conn.in_transaction:
            raise DatabaseError(
                f"the transaction on {self._db.name} was rolled back after an earlier error; "
                "nothing was committed; start a new transaction"
            )

    async def execute(self, sql: str, params: Params = None) -> StatementResult:
        """Run one statement (several in one string are refused) and report its effect."""
        self.ensure_open()
        cursor = await self._db._run(self._c, sql, params)
        try:
            return StatementResult(rowcount=cursor.rowcount, lastrowid=cursor.lastrowid)
        finally:
            await cursor.close()

    async def run_all(
        self, statements: Sequence[Statement], progress: Progress | None = None
    ) -> list[StatementResult]:
        """Run statements in order; the first failure raises ``StatementError`` naming it."""
        results: list[StatementResult] = []
        total = len(statements)
        while len(results) < total:
            self.ensure_open()
            # Many statements per worker call: a thread hop per statement would cost more
            # than the statement. A cancel still stops the running one (the abort flag).
            batch, failure = await self._c.in_worker(
                _run_batch, self._c, statements, len(results), BATCH_SECONDS
            )
            results.extend(batch)
            if failure is not None:
                index, err = failure
                sql = statements[index - 1].sql
                raise self._db._statement_error(self._c, err, sql, index, total) from err
            if progress is not None:
                await progress(len(results), total)
        return results

    async def run(self, statements: Sequence[Statement]) -> list[StatementResult]:
        """A change set's database step (``SqlTransaction``): its statements, in order."""
        for statement in statements:
            if not isinstance(statement.sql, str) or not statement.sql.strip():
                raise InvalidArgumentError("a statement's SQL is empty")
        return await self.run_all(statements)

    async def mark(self, txid: str, record: str) -> None:
        """The change set's marker, in this transaction: its COMMIT is the set's commit point."""
        self.ensure_open()
        try:
            await self._c.in_worker(_as_engine, self._c, markers.insert, txid, record)
        except sqlite3.Error as err:
            raise translate(err, self._db.name, self._db.path, "mark a change set in") from err

    async def query(self, sql: str, params: Params = None, *, max_rows: int = 1000) -> QueryResult:
        """Read inside the transaction (sees its own uncommitted changes)."""
        self.ensure_open()
        cursor = await self._db._run(self._c, sql, params)
        return await _fetch(cursor, max_rows)

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[Transaction]:
        """A nested scope: an exception inside undoes only the scope's work, then propagates."""
        self.ensure_open()
        self._savepoints += 1
        name = f"sp_{self._c.token}_{self._savepoints}"
        await self._c.internal(f"SAVEPOINT {name}")
        try:
            yield self
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._c.drain()
                if self._c.conn.in_transaction:  # else SQLite already undid everything
                    await self._c.internal(f"ROLLBACK TO {name}")
                    await self._c.internal(f"RELEASE {name}")
            raise
        else:
            self.ensure_open()
            await self._c.internal(f"RELEASE {name}")


async def _fetch(cursor: aiosqlite.Cursor, max_rows: int) -> QueryResult:
    try:
        # A list of tuples (no row factory is set), typed by aiosqlite as Iterable[Row].
        rows = cast(list[tuple[Any, ...]], await cursor.fetchmany(max_rows + 1))
        columns = tuple(d[0] for d in cursor.description or ())
    finally:
        await cursor.close()
    truncated = len(rows) > max_rows
    del rows[max_rows:]
    # sqlite3's rows are tuples already: the result holds them, not copies of them.
    return QueryResult(columns, tuple(rows), truncated)


def is_busy(err: sqlite3.OperationalError) -> bool:
    """Another connection holds a lock this statement needs: SQLITE_BUSY or SQLITE_LOCKED,
    or one of their extended codes (``SQLITE_BUSY_RECOVERY``, ``SQLITE_BUSY_SNAPSHOT``, ...)."""
    return primary_code(err) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


async def until_not_busy(attempt: Callable[[], Awaitable[object]], seconds: float) -> None:
    """Run ``attempt`` again while SQLite answers busy, for up to ``seconds``; then raise.

    The wait is a cancellable sleep between attempts on the event loop, not SQLite's busy
    handler (which no cancel can interrupt, and which its deadlock guard sometimes skips).
    """
    deadline = anyio.current_time() + seconds
    pause = 0.001
    while True:
        try:
            await attempt()
            return
        except sqlite3.OperationalError as err:
            if not is_busy(err) or anyio.current_time() >= deadline:
                raise
        await anyio.sleep(pause)
        pause = min(pause * 2, 0.05)


_ENVIRONMENT_CODES = {
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_CORRUPT,
    sqlite3.SQLITE_NOTADB,
    sqlite3.SQLITE_CANTOPEN,
    sqlite3.SQLITE_BUSY,
    sqlite3.SQLITE_LOCKED,
}
"""Failures of the disk or of another process, not of the statement: said with their fix."""


class Database(DatabaseCalls):
    """One SQLite database file: one writer at a time, concurrent readers.

    ``async with Database(path) as db:`` then ``async with db.transaction() as tx:``, or the
    one-call helpers ``execute``, ``run_statements``, ``query`` and ``schema``. Guarantee: a
    change commits whole or not at all; an error, a cancel or a deadline rolls it back (in
    WAL mode, with the statement interrupted, not left running). Caveats: one process's
    writers queue behind each other and SQLite's busy timeout across processes; ``query``
    refuses anything that writes; a failed COMMIT says its outcome is unknown
    (``CommitUnknownError``) instead of guessing.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        name: str | None = None,
        durability: Durability | str = Durability.FULL,
        read_only: bool = False,
        busy_timeout: float = 5.0,
        create: bool = True,
        idempotency_ttl: float = idempotency.DEFAULT_TTL_SECONDS,
        pinned: PinnedDirectory | None = None,
    ) -> None:
        """``pinned``: the database's directory, opened by the sandbox (taken over and closed
        with the database); SQLite then opens the file through it (see ``pinned``)."""
        self.path = Path(os.path.abspath(os.fspath(path)))
        self._pinned = pinned
        self.name = name or self.path.name
        self.durability = Durability(durability)
        self.read_only = read_only
        self.busy_timeout = busy_timeout
        self.create = create
        self.idempotency_ttl = idempotency_ttl
        self._writer: _Connection | None = None
        self._readers: list[_Connection] = []
        self._reader_count = 0
        self._write_lock = anyio.Lock()
        self._reader_slots = anyio.Semaphore(MAX_READERS)
        self.history: History | None = None
        """Where ``run_statements`` records an audit entry after each commit (not undoable)."""
        self.kind = "sqlite"

    async def __aenter__(self) -> Database:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            if self._writer is not None:
                await self._writer.close()
                self._writer = None
            while self._readers:
                await self._readers.pop().close()
            if self._pinned is not None:
                self._pinned.close()

    # -- connections ------------------------------------------------------------------------

    def _exists(self) -> bool:
        return self._pinned.exists() if self._pinned is not None else self.path.is_file()

    def _check_exists(self) -> None:
        if not self.create and not self._exists():
            raise DatabaseError(f"database {self.name} ({self.path}) does not exist")

    async def _open(self, *, read_only: bool, synchronous: str) -> _Connection:
        """A new connection; one that opened a file outside a pinned directory is refused."""
        pinned = self._pinned
        check: Callable[[], None] | None = None
        if pinned is None:
            target = f"file:{quote(str(self.path))}?mode=ro" if read_only else str(self.path)
            uri = read_only
        else:
            before = open_descriptors()
            target, uri = pinned.uri("ro" if read_only else "rw"), True

            def check() -> None:
                pinned.check(open_descriptors() - before)

        return await _Connection.open(
            target,
            uri=uri,
            read_only=read_only,
            synchronous=synchronous,
            busy_timeout=self.busy_timeout,
            check=check,
        )

    async def _writer_connection(self) -> _Connection:
        if self._writer is None:
            self._check_exists()
            sync = "FULL" if self.durability is Durability.FULL else "NORMAL"
            try:
                self._writer = await self._open(read_only=False, synchronous=sync)
            except sqlite3.Error as err:
                raise translate(err, self.name, self.path, "open") from err
        return self._writer

    @asynccontextmanager
    async def _reader(self) -> AsyncIterator[_Connection]:
        async with self._reader_slots:
            if self._readers:
                reader = self._readers.pop()
            else:
                if not self._exists():
                    if self.read_only or not self.create:
                        raise DatabaseError(f"database {self.name} ({self.path}) does not exist")
                    await self._writer_connection()  # creates it
                try:
                    reader = await self._open(read_only=True, synchronous="FULL")
                except sqlite3.Error as err:
                    raise translate(err, self.name, self.path, "open (to read)") from err
            healthy = False
            try:
                yield reader
                healthy = True
            finally:
                if not healthy:
                    healthy = await reader.settle()
                if healthy:
                    self._readers.append(reader)
                else:
                    await reader.close()

    async def _run(
        self, c: _Connection, sql: str, params: Params, index: int | None = None, total: int = 1
    ) -> aiosqlite.Cursor:
        """Execute one statement, turning SQLite's errors into clear ones."""
        if not isinstance(sql, str) or not sql.strip():
            raise InvalidArgumentError("the SQL statement is empty")
        try:
            return await c.conn.execute(sql, params if params is not None else ())
        except STATEMENT_ERRORS as err:
            raise self._statement_error(c, err, sql, index, total) from err

    def _statement_error(
        self, c: _Connection, err: Exception, sql: str, index: int | None, total: int
    ) -> AtomicToolsError:
        where = f"statement {index} of {total}" if index is not None else "the statement"
        denied = c.guard.take_denial()
        message = str(err)
        if denied:
            reason = denied
        elif isinstance(err, sqlite3.ProgrammingError) and "one statement" in message:
            reason = "it holds more than one statement; send them as a list to Database.transaction"
        elif isinstance(err, sqlite3.ProgrammingError) and "bindings" in message:
            reason = f"{message}; give one parameter per placeholder"
        elif "interrupted" in message:
            reason = "it was interrupted (the call was cancelled or timed out)"
        elif isinstance(err, sqlite3.Error) and primary_code(err) in _ENVIRONMENT_CODES:
            reason = translate(err, self.name, self.path, "change").message
        else:
            reason = message
        return StatementError(f"{where} ({shortened(sql)}) failed: {reason}", index=index, sql=sql)

    # -- writes -----------------------------------------------------------------------------

    @asynccontextmanager
    async def transaction(self, *, wait: bool = True) -> AsyncIterator[Transaction]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; any exit but success rolls everything back.

        ``wait=False``: if another process holds the write lock, fail at once (busy)."""
        if self.read_only:
            raise ReadOnlyError(f"database {self.name} is read-only; it can be queried only")
        async with self._write_lock:
            c = await self._writer_connection()
            committed = False
            reusable = True
            try:
                await self._begin(c, self.busy_timeout if wait else 0.0)
                tx = Transaction(self, c)
                yield tx
                tx.ensure_open()
                with anyio.CancelScope(shield=True):
                    try:
                        await c.internal("COMMIT")
                    except sqlite3.Error as err:
                        reusable = False  # its state after a failed COMMIT is not known
                        if primary_code(err) == sqlite3.SQLITE_FULL:  # the WAL append failed
                            raise translate(err, self.name, self.path, "commit to") from err
                        raise commit_failed(err, self.name, self.path) from err
                committed = True
                crash_point("db.committed")
            except sqlite3.Error as err:  # our own SAVEPOINT/RELEASE, or the key table
                raise translate(err, self.name, self.path, "change") from err
            finally:
                if not committed:
                    clean = await c.settle()  # stop, drain, roll back: shielded, time-bounded
                    if not (clean and reusable):
                        logger.warning("database %s: connection replaced", self.name)
                        await c.close()
                        self._writer = None

    async def _begin(self, c: _Connection, seconds: float) -> None:
        """``BEGIN IMMEDIATE``, waiting up to ``seconds`` for another process's writer.

        The wait is a cancellable sleep between attempts, not SQLite's busy handler.
        """
        try:
            await until_not_busy(lambda: c.internal("BEGIN IMMEDIATE"), seconds)
        except sqlite3.OperationalError as err:
            if not is_busy(err):
                raise translate(err, self.name, self.path, "start a transaction on") from err
            raise DatabaseBusyError(
                f"cannot start a transaction on {self.name}: {err} (another process "
                f"held the write lock for {self.busy_timeout:g} s); retry"
            ) from err

    async def run_statements(
        self,
        statements: Sequence[Statement],
        *,
        progress: Progress | None = None,
        idempotency_key: str | None = None,
    ) -> list[StatementResult]:
        """Several statements in one transaction: all of them or none.

        With ``idempotency_key``, the key's record is written in the same transaction (to a
        table in this database), so a repeat returns the first results and changes nothing,
        even after a crash between the commit and the reply.
        """
        if not statements:
            raise InvalidArgumentError("statements is empty; give at least one {sql, params}")
        for statement in statements:
            if not isinstance(statement.sql, str) or not statement.sql.strip():
                raise InvalidArgumentError("a statement's SQL is empty")
        receipt = None
        if idempotency_key is not None:
            receipt = idempotency.Receipt(
                store=str(self.path),
                scope="",
                key=idempotency.check_key(idempotency_key),
                fingerprint=idempotency.fingerprint([[s.sql, s.params] for s in statements]),
                ttl=self.idempotency_ttl,
            )
        async with self.transaction() as tx:
            if receipt is not None:
                stored = await tx._c.in_worker(_lookup_key, tx._c, receipt)
                if stored is not None:
                    return [StatementResult(*pair) for pair in json.loads(stored)]
            results = await tx.run_all(statements, progress)
            if receipt is not None:
                stored = json.dumps([[r.rowcount, r.lastrowid] for r in results])
                await tx._c.in_worker(_record_key, tx._c, receipt, stored)
        await self._audit(statements, results)
        return results

    # -- a change set's database part (``SqlDatabase``) ---------------------------------------

    @asynccontextmanager
    async def set_transaction(self) -> AsyncIterator[Transaction]:
        """The write transaction of a change set's database steps (see ``sqlstep``): no audit
        entry of its own, since the set's history entry carries it."""
        async with self.transaction() as tx:
            yield tx

    async def decide_marker(self, txid: str, record: str) -> bool:
        """After the set's COMMIT reported an error: did it commit? Read and made final in a
        write transaction on a fresh connection (see ``markers.decide``); shielded.

        Raises ``DatabaseError`` when it cannot tell (then recovery decides later).
        """
        found: bool | None = None
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(CLEANUP_SECONDS + self.busy_timeout),
        ):
            try:
                async with self.transaction() as tx:
                    found = await tx._c.in_worker(_as_engine, tx._c, markers.decide, txid, record)
            except sqlite3.Error as err:
                raise translate(err, self.name, self.path, "read the change set marker of") from err
        if found is None:
            raise DatabaseError(f"reading the change set marker of {self.name} took too long")
        return found

    async def drop_marker(self, txid: str) -> None:
        """After the set is over, if the database is free at once: another writer (here or in
        another process) must not hold up the reply; the next set drops it instead."""
        if self._write_lock.locked():
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(MARKER_DROP_SECONDS):
            try:
                async with self.transaction(wait=False) as tx:
                    await tx._c.in_worker(_as_engine, tx._c, markers.delete, txid)
            except (AtomicToolsError, sqlite3.Error) as err:
                logger.info(
                    "database %s: marker %s stays for the next set: %s", self.name, txid, err
                )

    # -- reads ------------------------------------------------------------------------------

    async def query(self, sql: str, params: Params = None, *, max_rows: int = 1000) -> QueryResult:
        """A read-only query on a read-only connection, at most ``max_rows`` rows."""
        check_max_rows(max_rows)
        async with self._reader() as reader:
            cursor = await self._run(reader, sql, params)
            return await _fetch(cursor, max_rows)

    async def schema(self, table: str | None = None) -> list[TableInfo]:
        """Tables, views, indexes and triggers, tables and views with their columns; with
        ``table``, that table or view alone. Our own bookkeeping (the idempotency key and
        change-set marker tables) is not listed."""
        async with self._reader() as reader:
            if table is None:
                listing = await self._run(
                    reader,
                    "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' "
                    "AND name NOT LIKE ? AND name NOT LIKE ? ORDER BY type, name",
                    (f"{idempotency.KEY_TABLE}%", f"{markers.MARKER_TABLE}%"),
                )
                found = (await _fetch(listing, 100_000)).rows
            else:
                described = await self._run(
                    reader,
                    "SELECT type, name, sql FROM sqlite_master WHERE name = ? AND type IN "
                    "('table', 'view') AND name NOT LIKE ? AND name NOT LIKE ?",
                    (table, f"{idempotency.KEY_TABLE}%", f"{markers.MARKER_TABLE}%"),
                )
                found = (await _fetch(described, 1)).rows
                if not found:
                    raise DatabaseError(f"no table or view named {table!r} in {self.name}")
            objects = []
            for kind, name, sql in found:
                columns: tuple[ColumnInfo, ...] = ()
                if kind in ("table", "view"):
                    columns = await self._columns(reader, name)
                objects.append(TableInfo(name=name, type=kind, sql=sql, columns=columns))
            return objects

    async def _columns(self, reader: _Connection, table: str) -> tuple[ColumnInfo, ...]:
        cursor = await self._run(
            reader,
            'SELECT name, type, "notnull", dflt_value, pk FROM pragma_table_info(?)',
            (table,),
        )
        rows = (await _fetch(cursor, 100_000)).rows
        return tuple(ColumnInfo(c[0], c[1], bool(c[2]), c[3], int(c[4])) for c in rows)
