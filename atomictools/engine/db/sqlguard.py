"""Which SQL may run where, decided by SQLite's authorizer callback (never by keyword sniffing).

SQLite asks the authorizer about every action while it prepares a statement, so the check
sees what the statement really does: ``VACUUM INTO 'file'`` shows up as an ATTACH (in a write
transaction SQLite refuses any VACUUM first), a pragma as its name and value. Two policies
exist: the writer's (everything a change needs, but not what would escape the tool's
transaction, this database file or this call) and the reader's (reading only). A denial
records its reason so the error can say what to do instead.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field

from atomictools.engine.changes.markers import MARKER_TABLE

# Functions that reach outside the database: loading code, reading or writing files.
BLOCKED_FUNCTIONS = frozenset({"load_extension", "readfile", "writefile", "fts3_tokenizer", "edit"})
# Pragmas that would change how (or whether) commits are made durable, or corrupt the schema.
BLOCKED_WRITE_PRAGMAS = frozenset(
    {
        "journal_mode",
        "synchronous",
        "writable_schema",
        "locking_mode",
        "temp_store_directory",
        "data_store_directory",
    }
)
# Pragmas a change may set. Any other assignment is refused: the writer connection is shared
# by every later call, so a setting (query_only, ignore_check_constraints, heap limits, ...)
# would outlive the call that made it.
WRITABLE_PRAGMAS = frozenset({"user_version", "application_id", "incremental_vacuum", "optimize"})
_TEMP_OBJECTS = frozenset(
    {
        sqlite3.SQLITE_CREATE_TEMP_INDEX,
        sqlite3.SQLITE_CREATE_TEMP_TABLE,
        sqlite3.SQLITE_CREATE_TEMP_TRIGGER,
        sqlite3.SQLITE_CREATE_TEMP_VIEW,
    }
)
# Pragmas that take an argument but only read.
READ_PRAGMAS_WITH_ARGUMENT = frozenset(
    {
        "table_info",
        "table_xinfo",
        "table_list",
        "index_list",
        "index_info",
        "index_xinfo",
        "foreign_key_list",
        "foreign_key_check",
        "integrity_check",
        "quick_check",
    }
)
_SCHEMA_TABLES = frozenset({"sqlite_master", "sqlite_schema", "sqlite_temp_master"})
_READ_ACTIONS = frozenset({sqlite3.SQLITE_READ, sqlite3.SQLITE_SELECT, sqlite3.SQLITE_RECURSIVE})
_ACTION_NAMES = {
    getattr(sqlite3, f"SQLITE_{name}"): name.replace("_", " ")
    for name in [
        "CREATE_INDEX",
        "CREATE_TABLE",
        "CREATE_TEMP_INDEX",
        "CREATE_TEMP_TABLE",
        "CREATE_TEMP_TRIGGER",
        "CREATE_TEMP_VIEW",
        "CREATE_TRIGGER",
        "CREATE_VIEW",
        "DELETE",
        "DROP_INDEX",
        "DROP_TABLE",
        "DROP_TEMP_INDEX",
        "DROP_TEMP_TABLE",
        "DROP_TEMP_TRIGGER",
        "DROP_TEMP_VIEW",
        "DROP_TRIGGER",
        "DROP_VIEW",
        "INSERT",
        "TRANSACTION",
        "UPDATE",
        "ALTER_TABLE",
        "REINDEX",
        "ANALYZE",
        "CREATE_VTABLE",
        "DROP_VTABLE",
        "SAVEPOINT",
    ]
}


_MARKER_ACTIONS_BY_TABLE = frozenset(
    {
        sqlite3.SQLITE_INSERT,
        sqlite3.SQLITE_UPDATE,
        sqlite3.SQLITE_DELETE,
        sqlite3.SQLITE_DROP_TABLE,
        sqlite3.SQLITE_CREATE_TABLE,
        sqlite3.SQLITE_CREATE_VIEW,
    }
)
"""Actions whose first argument is the table they change."""
_MARKER_ACTIONS_ON_TABLE = frozenset(
    {
        sqlite3.SQLITE_ALTER_TABLE,
        sqlite3.SQLITE_CREATE_INDEX,
        sqlite3.SQLITE_CREATE_TRIGGER,
        sqlite3.SQLITE_DROP_INDEX,
        sqlite3.SQLITE_DROP_TRIGGER,
    }
)
"""Actions whose second argument is the table they change (or hang a trigger on)."""


def _changes_marker_table(action: int, arg1: str | None, arg2: str | None) -> bool:
    """A user's statement that would change the markers recovery decides from."""
    if action in _MARKER_ACTIONS_BY_TABLE:
        return (arg1 or "").lower() == MARKER_TABLE
    if action in _MARKER_ACTIONS_ON_TABLE:
        return (arg2 or "").lower() == MARKER_TABLE
    return False


@dataclass(slots=True)
class SqlGuard:
    """An authorizer callback plus the reason for its last denial."""

    read_only: bool
    denied: str | None = field(default=None)
    allow_control: bool = False
    """Set by the engine around its own BEGIN/COMMIT/ROLLBACK/SAVEPOINT and its own
    bookkeeping statements (no user SQL pending)."""

    def __call__(
        self,
        action: int,
        arg1: str | None,
        arg2: str | None,
        _database: str | None,
        _trigger: str | None,
    ) -> int:
        reason = self._reason(action, arg1, arg2)
        if reason is None:
            return sqlite3.SQLITE_OK
        self.denied = reason
        return sqlite3.SQLITE_DENY

    def take_denial(self) -> str | None:
        """The reason of the last denial, once (then forgotten)."""
        reason, self.denied = self.denied, None
        return reason

    def _reason(self, action: int, arg1: str | None, arg2: str | None) -> str | None:
        if self.allow_control and action in (sqlite3.SQLITE_TRANSACTION, sqlite3.SQLITE_SAVEPOINT):
            return None
        if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in BLOCKED_FUNCTIONS:
            return f"the function {arg2}() reaches outside the database and is not allowed"
        if action == sqlite3.SQLITE_READ and (arg1 or "").lower() == "sqlite_stmt":
            return "sqlite_stmt shows the connection's internal statements and is not readable"
        if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
            return (
                "ATTACH/DETACH (and VACUUM INTO) would reach another database file; "
                "work on one database per call"
            )
        if self.read_only:
            return self._read_reason(action, arg1, arg2)
        if not self.allow_control and _changes_marker_table(action, arg1, arg2):
            return (
                f"the table {MARKER_TABLE} holds atomictools' change-set commit markers "
                "(recovery decides from them); it can be read, not changed"
            )
        if action in (sqlite3.SQLITE_TRANSACTION, sqlite3.SQLITE_SAVEPOINT):
            return (
                "BEGIN/COMMIT/ROLLBACK/SAVEPOINT/RELEASE are not allowed: the tool owns the "
                "transaction; send all the statements together, as one list, to "
                "Database.transaction (or as one change set's sql step) instead"
            )
        if action == sqlite3.SQLITE_PRAGMA:
            return self._write_pragma_reason((arg1 or "").lower(), arg2)
        if action in _TEMP_OBJECTS:
            return (
                "temporary tables, views, indexes and triggers would outlive this call on the "
                "shared connection; use a regular table"
            )
        return None

    @staticmethod
    def _write_pragma_reason(name: str, value: str | None) -> str | None:
        if name in BLOCKED_WRITE_PRAGMAS:
            return f"PRAGMA {name} would weaken the durability guarantees and is not allowed"
        if value is None or name in READ_PRAGMAS_WITH_ARGUMENT or name in WRITABLE_PRAGMAS:
            return None
        return (
            f"PRAGMA {name} = ... would change the shared connection for every later call; "
            f"only {', '.join(sorted(WRITABLE_PRAGMAS))} may be set"
        )

    @staticmethod
    def _read_reason(action: int, arg1: str | None, arg2: str | None) -> str | None:
        if action in _READ_ACTIONS or action == sqlite3.SQLITE_FUNCTION:
            return None
        if action == sqlite3.SQLITE_UPDATE and arg1 in _SCHEMA_TABLES:
            # SQLite reports this while it sets up a table-valued pragma such as
            # pragma_table_info(?); the connection is read-only, so nothing is written.
            return None
        if action == sqlite3.SQLITE_PRAGMA:
            name = (arg1 or "").lower()
            if arg2 is None or name in READ_PRAGMAS_WITH_ARGUMENT:
                return None
            return f"PRAGMA {arg1} = ... changes the database; Database.query only reads"
        if action in (sqlite3.SQLITE_TRANSACTION, sqlite3.SQLITE_SAVEPOINT):
            return (
                "Database.query only reads, in a transaction of its own: BEGIN/COMMIT/ROLLBACK/"
                "SAVEPOINT/RELEASE are not allowed"
            )
        what = _ACTION_NAMES.get(action, f"action {action}")
        return f"Database.query only reads, and this statement would {what}: use Database.execute"
