"""The engine: atomic, cancellation-safe changes to files and SQLite databases.

It knows nothing about MCP, the command line or any wire format. This module is its public API:
the layers above it (``atomictools.server``, ``atomictools.cli``) import only from here, never
from the folders below (checked by the import-linter contracts in ``pyproject.toml``):

- ``durable``: the pending file, fsync, temp names, locks, steps (what makes one change atomic);
- ``reads`` and ``text``: reading, listing, decoding, exact-match edits;
- ``changes``: every file change, one pipeline (checks, direct and journaled commits, the
  journal record, recovery, idempotency);
- ``history``: every change recorded with what it replaced, for ``Workspace.undo``;
- ``db``: SQLite work inside savepoints, the statement guard, the database catalog;
- ``workspace``: the object that joins them for a caller.
"""

import importlib

from atomictools.engine.changes.idempotency import DEFAULT_TTL_SECONDS, MAX_KEY_LENGTH
from atomictools.engine.changes.model import MAX_CHANGES, Change
from atomictools.engine.changes.recovery_report import RecoveryReport, UnfinishedSet
from atomictools.engine.config import STATE_DIR_ENV, Durability, Limits, MiB
from atomictools.engine.db.catalog import DatabaseCatalog
from atomictools.engine.db.database import (
    Database,
    Params,
    QueryResult,
    Statement,
    StatementResult,
    TableInfo,
    Transaction,
)
from atomictools.engine.db.dberrors import CommitUnknownError, DatabaseError
from atomictools.engine.durable.steps import CRASH_ENV, CRASH_SIGNAL_ENV
from atomictools.engine.durable.tempfiles import is_temp_name
from atomictools.engine.durable.writer import AtomicWriter
from atomictools.engine.errors import (
    AlreadyExistsError,
    AtomicToolsError,
    ConcurrentChangeError,
    ConflictError,
    DiskFullError,
    DurabilityUnknownError,
    EditAmbiguousError,
    EditError,
    EditNotFoundError,
    FileSystemError,
    InvalidArgumentError,
    InvalidPathError,
    NotFoundError,
    NotUndoableError,
    OutsideRootsError,
    PartlyDoneError,
    PermissionDeniedError,
    PreconditionFailedError,
    ReadOnlyError,
    RecoveryNeededError,
    StateDirError,
    TextEncodingError,
    TooLargeError,
    WrongTypeError,
    from_os_error,
    spelled,
)
from atomictools.engine.history.model import (
    HistoryEntry,
    PathChange,
    parse_duration,
    parse_since,
)
from atomictools.engine.history.recording import DEFAULT_MAX_AGE as DEFAULT_HISTORY_MAX_AGE
from atomictools.engine.history.recording import DEFAULT_MAX_BYTES as DEFAULT_HISTORY_MAX_BYTES
from atomictools.engine.results import (
    BytesRead,
    ChangeOutcome,
    ChangeSetResult,
    CopyResult,
    DeleteResult,
    DirEntry,
    DirListing,
    EditResult,
    FileInfo,
    MkdirResult,
    MoveResult,
    Progress,
    RestoredPath,
    SearchResult,
    TextRead,
    TreeNode,
    UndoResult,
    WriteResult,
)
from atomictools.engine.text.edits import Edit
from atomictools.engine.workspace import (
    ChangeSet,
    Workspace,
    atomic_write,
    atomic_writer,
    recover,
)

__all__ = [
    "CRASH_ENV",
    "CRASH_SIGNAL_ENV",
    "DEFAULT_HISTORY_MAX_AGE",
    "DEFAULT_HISTORY_MAX_BYTES",
    "DEFAULT_TTL_SECONDS",
    "MAX_CHANGES",
    "MAX_KEY_LENGTH",
    "STATE_DIR_ENV",
    "AlreadyExistsError",
    "AtomicToolsError",
    "AtomicWriter",
    "BytesRead",
    "Change",
    "ChangeOutcome",
    "ChangeSet",
    "ChangeSetResult",
    "CommitUnknownError",
    "ConcurrentChangeError",
    "ConflictError",
    "CopyResult",
    "Database",
    "DatabaseCatalog",
    "DatabaseError",
    "DeleteResult",
    "DirEntry",
    "DirListing",
    "DiskFullError",
    "Durability",
    "DurabilityUnknownError",
    "Edit",
    "EditAmbiguousError",
    "EditError",
    "EditNotFoundError",
    "EditResult",
    "FileInfo",
    "FileSystemError",
    "HistoryEntry",
    "InvalidArgumentError",
    "InvalidPathError",
    "Limits",
    "MiB",
    "MkdirResult",
    "MoveResult",
    "NotFoundError",
    "NotUndoableError",
    "OutsideRootsError",
    "Params",
    "PartlyDoneError",
    "PathChange",
    "PermissionDeniedError",
    "PreconditionFailedError",
    "Progress",
    "QueryResult",
    "ReadOnlyError",
    "RecoveryNeededError",
    "RecoveryReport",
    "RestoredPath",
    "SearchResult",
    "StateDirError",
    "Statement",
    "StatementResult",
    "TableInfo",
    "TextEncodingError",
    "TextRead",
    "TooLargeError",
    "Transaction",
    "TreeNode",
    "UndoResult",
    "UnfinishedSet",
    "Workspace",
    "WriteResult",
    "WrongTypeError",
    "atomic_write",
    "atomic_writer",
    "from_os_error",
    "is_temp_name",
    "parse_duration",
    "parse_since",
    "recover",
    "spelled",
]


def __getattr__(name: str) -> object:
    """``PgDatabase`` (a PostgreSQL database behind the same calls as ``Database``) is
    imported on first use: its driver is the optional ``atomictools[postgres]`` extra."""
    if name == "PgDatabase":
        module = importlib.import_module("atomictools.engine.db.postgres")
        return module.PgDatabase
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
