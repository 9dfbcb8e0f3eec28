"""The database tools' errors, and SQLite's own errors said in words a user can act on.

SQLite reports a full disk, a read-only file system, a lock held by another process, a damaged
file or an I/O error each with a result code; ``translate`` turns each into an error that names
the database, its file, what happened to the transaction, and the fix. The embedding API and
the tools raise only these (never a bare ``sqlite3`` error).

A COMMIT that fails is special: SQLite may have written the transaction before the error (a
failed ``fdatasync`` after the WAL append), so whether it is committed is unknown, and
``CommitUnknownError`` says so and how to find out. Retrying a call with the same
``idempotencyKey`` is safe: the key's row commits with the change, so the retry returns the
first result if the commit happened and runs the call again if it did not.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from atomictools.engine.errors import AtomicToolsError, CommitUnknownError, DatabaseError

__all__ = ["AtomicToolsError", "CommitUnknownError", "DatabaseError"]


class StatementError(DatabaseError):
    """A statement failed; the transaction it was part of was rolled back."""

    code = "statement_failed"

    def __init__(self, message: str, *, index: int | None, sql: str) -> None:
        self.index = index
        self.sql = sql
        super().__init__(message)


class DatabaseBusyError(DatabaseError):
    """Another process holds the database's lock."""

    code = "database_busy"


class DatabaseFullError(DatabaseError):
    code = "database_disk_full"


class DatabaseReadOnlyError(DatabaseError):
    """The file or its directory cannot be written (read-only file system, permissions)."""

    code = "database_read_only"


class DatabaseUnavailableError(DatabaseError):
    """The file cannot be opened (missing directory, permissions)."""

    code = "database_unavailable"


class DatabaseCorruptError(DatabaseError):
    code = "database_corrupt"


class DatabaseIOError(DatabaseError):
    code = "database_io_error"


_PRIMARY_MASK = 0xFF


def primary_code(err: sqlite3.Error) -> int | None:
    """SQLite's primary result code of an error (the extended code's low byte)."""
    code = getattr(err, "sqlite_errorcode", None)
    return code & _PRIMARY_MASK if isinstance(code, int) else None


def translate(err: sqlite3.Error, name: str, path: Path, action: str) -> DatabaseError:
    """``err`` from SQLite while doing ``action`` ("open", "start a transaction on", ...)."""
    what = f"database {name} ({path})"
    reason = str(err) or type(err).__name__
    code = primary_code(err)
    if code == sqlite3.SQLITE_FULL:
        return DatabaseFullError(
            f"cannot {action} {what}: the disk is full ({reason}); free space on the disk that "
            "holds it, then retry"
        )
    if code == sqlite3.SQLITE_READONLY:
        return DatabaseReadOnlyError(
            f"cannot {action} {what}: it cannot be written ({reason}): its file system is "
            "read-only, or this user may not write the file or its directory (SQLite writes "
            "its -wal and -shm files next to it); fix that, then retry"
        )
    if code in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM, sqlite3.SQLITE_AUTH):
        return DatabaseUnavailableError(
            f"cannot {action} {what}: {reason}; check that the file and its directory exist, "
            "that this user may read and write them (SQLite also creates -wal and -shm files "
            "next to it) and that the file system is not read-only"
        )
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return DatabaseBusyError(
            f"cannot {action} {what}: another process holds its lock ({reason}); retry when "
            "it is done"
        )
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return DatabaseCorruptError(
            f"cannot {action} {what}: the file is damaged or is not a SQLite database "
            f"({reason}); restore it from a backup (sqlite3's .recover can salvage rows)"
        )
    if code == sqlite3.SQLITE_IOERR:
        return DatabaseIOError(
            f"cannot {action} {what}: the disk reported an I/O error ({reason}); check the "
            "disk (dmesg), then retry"
        )
    return DatabaseError(f"cannot {action} {what}: {reason}")


def commit_failed(err: sqlite3.Error, name: str, path: Path) -> CommitUnknownError:
    return CommitUnknownError(
        f"COMMIT on database {name} ({path}) failed ({err}); SQLite may have written the "
        "transaction before the error, so whether it is committed is unknown. Check with "
        "Database.query whether its changes are there; a call made with an idempotency_key can be "
        "retried with the same key (it returns the first result if the commit happened, and "
        "runs again if it did not)"
    )
