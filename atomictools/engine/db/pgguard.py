"""Which SQL may run where on PostgreSQL, decided by PostgreSQL's own parser (never by prefix
matching).

``prepare`` takes one statement as a caller wrote it and returns what to send: the text with
PostgreSQL's native ``$1..$n`` placeholders, the values in ``$n`` order, and what kind of
statement it is. Or it refuses the statement with a message that says what to do instead.

Both steps use libpg_query (through pglast), which is the server's own scanner and grammar:
- Placeholders are the tools' contract shared with SQLite: ``?`` or ``?NNN`` with a list,
  ``:name`` with a mapping. PostgreSQL's native ``$n`` also works, with a list. They are found
  among the scanner's tokens, so string literals, ``E''`` strings, dollar-quoted bodies,
  comments, quoted identifiers, ``::`` casts, ``:=`` and array slices are never touched.
- The statement is judged on its parse tree. ``WITH d AS (DELETE ...) SELECT`` is seen to
  delete, and ``set_config('role', ...)`` is found deep in a subquery.

Two policies, like SQLite's guard. Every connection refuses what would:
- escape the tool's transaction;
- outlive the call on the shared connection (session settings, LISTEN, prepared statements,
  cursors, temporary objects, session advisory locks);
- undo the tool's own guards (role, read-only mode, isolation, timeouts);
- reach outside the database (COPY, server files, other servers, other sessions);
- or change the server or its roles for every agent.
A read (``Database.query``) also admits only statements that read.

This is the first line of defence, not the only one. The parser sees the statement, not what
the functions it calls do inside: a user-defined function can run what the statement itself
could not. So the database also runs reads in a READ ONLY transaction under a deadline, and
refuses a role that is, or can become, a superuser.

The scanner reads string literals as PostgreSQL does with ``standard_conforming_strings`` on
(its default since 9.1), so no statement may turn it off, and a database where it is off must
not be used: there ``'\\'`` would end differently for the server than for this guard.

Pure and synchronous: no I/O, no connection, no checkpoint, nothing to clean up. Judging a
statement takes tens of microseconds (10 to 100 µs), well under a millisecond. PostgreSQL's
parser hands over its tree as JSON; the JSON reader notes the few nodes that matter while it
builds the tree, so the tree is never walked again (pglast's Python node objects alone would
cost more than all of this). The scanner runs only when params are given and the text holds a
``?`` or a colon.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pglast.parser import ParseError, Token, parse_sql_json, scan

from atomictools.engine.changes.markers import MARKER_TABLE

_WHO = "would change the role the statements run as"
_MODE = "would change the transaction mode the tool chose (read-only or isolation level)"
_LIMITS = "would change the time limits the tool enforces on the call (some end the session)"
GUARDED_SETTINGS: dict[str, str] = {
    "role": _WHO,
    "session_authorization": _WHO,
    "transaction_read_only": _MODE,
    "default_transaction_read_only": _MODE,
    "transaction_isolation": _MODE,
    "default_transaction_isolation": _MODE,
    "statement_timeout": _LIMITS,
    "lock_timeout": _LIMITS,
    "idle_in_transaction_session_timeout": _LIMITS,
    "transaction_timeout": _LIMITS,
    "session_replication_role": "would switch off triggers and foreign-key checks",
    "standard_conforming_strings": (
        "would change how the server reads string literals, and this guard reads them as "
        "PostgreSQL does by default"
    ),
}
"""Settings no statement may change (SET, SET LOCAL, RESET, set_config(), a function's SET
clause), each with the reason."""

_FILES = "reads or writes the database server's file system"
_SERVER = "controls the server or other sessions"
_REMOTE = "connects to another database"
BLOCKED_FUNCTIONS: dict[str, str] = {
    **dict.fromkeys(
        ["pg_read_file", "pg_read_binary_file", "pg_stat_file", "lo_import", "lo_export"], _FILES
    ),
    **dict.fromkeys(
        [
            "pg_terminate_backend",
            "pg_cancel_backend",
            "pg_reload_conf",
            "pg_rotate_logfile",
            "pg_promote",
            "pg_switch_wal",
            "pg_create_restore_point",
            "pg_backup_start",
            "pg_backup_stop",
            "pg_log_backend_memory_contexts",
        ],
        _SERVER,
    ),
}
"""Functions that reach outside the database, matched by name in any schema and any case."""
BLOCKED_FUNCTION_PREFIXES: tuple[tuple[str, str], ...] = (
    ("pg_ls_", _FILES),
    ("pg_file_", _FILES),
    ("dblink", _REMOTE),
)
SESSION_LOCK_FUNCTIONS: dict[str, str] = {
    "pg_advisory_lock": "pg_advisory_xact_lock",
    "pg_advisory_lock_shared": "pg_advisory_xact_lock_shared",
    "pg_try_advisory_lock": "pg_try_advisory_xact_lock",
    "pg_try_advisory_lock_shared": "pg_try_advisory_xact_lock_shared",
}
"""Session-level advisory locks (they outlive the transaction) and their transaction-level
twins."""
CHANGING_FUNCTIONS: dict[str, str] = {
    "nextval": "advances a sequence",
    "setval": "sets a sequence",
    "pg_notify": "sends a notification",
}
"""Functions that make a SELECT more than a read. A READ ONLY transaction refuses the
sequence functions itself but lets a notification go out."""

_TRANSACTION = (
    "is not allowed: the tool owns the transaction; send the statements as one list to "
    "Database.transaction (or as one change set's sql step) instead"
)
_TRANSACTION_LABELS = {
    "TRANS_STMT_BEGIN": "BEGIN",
    "TRANS_STMT_START": "START TRANSACTION",
    "TRANS_STMT_COMMIT": "COMMIT (or END)",
    "TRANS_STMT_ROLLBACK": "ROLLBACK (or ABORT)",
    "TRANS_STMT_SAVEPOINT": "SAVEPOINT",
    "TRANS_STMT_RELEASE": "RELEASE SAVEPOINT",
    "TRANS_STMT_ROLLBACK_TO": "ROLLBACK TO SAVEPOINT",
    "TRANS_STMT_PREPARE": "PREPARE TRANSACTION",
    "TRANS_STMT_COMMIT_PREPARED": "COMMIT PREPARED",
    "TRANS_STMT_ROLLBACK_PREPARED": "ROLLBACK PREPARED",
}
_PREPARED = (
    "prepared statements would outlive this call on the shared connection; send the statement "
    "itself with params (the server binds them; they are never pasted into the text)"
)
_CURSORS = (
    "cursors are not available (one WITH HOLD would outlive this call on the shared "
    "connection); send the SELECT to Database.query, whose max_rows bounds the rows returned"
)
_DATABASES = (
    "the tools work inside the database they were given; creating, dropping and configuring "
    "databases is the operator's job"
)
_ROLES = (
    "roles and their memberships decide who can do what on the whole server, for every agent "
    "and user, so role management is the operator's job (GRANT and REVOKE of privileges on "
    "objects are allowed)"
)
_TABLESPACES = "tablespaces are directories of the server's file system; they are the operator's"
_SERVERS = (
    "it connects this database to another server (and may store its password); that is the "
    "operator's job"
)
REFUSED_KINDS: dict[str, tuple[str, str]] = {
    "DoStmt": (
        "DO",
        "an anonymous code block can end the tool's transaction, change the role, or run SQL "
        "built at run time that this check never sees; send its statements as plain SQL (a "
        "list to Database.transaction)",
    ),
    "CallStmt": (
        "CALL",
        "a procedure can COMMIT, ROLLBACK or change the role inside the tool's transaction; "
        "send the procedure's statements as a list to Database.transaction",
    ),
    "ListenStmt": (
        "LISTEN",
        "it would keep listening on the shared connection after this call, and the tools "
        "deliver no notifications; listen on a connection of your own",
    ),
    "UnlistenStmt": ("UNLISTEN", "the tools never LISTEN, so there is nothing to stop"),
    "PrepareStmt": ("PREPARE", _PREPARED),
    "ExecuteStmt": ("EXECUTE", _PREPARED),
    "DeallocateStmt": ("DEALLOCATE", _PREPARED),
    "DeclareCursorStmt": ("DECLARE CURSOR", _CURSORS),
    "FetchStmt": ("FETCH or MOVE", _CURSORS),
    "ClosePortalStmt": ("CLOSE", _CURSORS),
    "DiscardStmt": (
        "DISCARD",
        "it would reset the shared connection, the tool's own settings included",
    ),
    "LoadStmt": ("LOAD", "it loads a shared library into the server process"),
    "AlterSystemStmt": (
        "ALTER SYSTEM",
        "it changes the server's configuration for every database and user; that is the "
        "operator's job",
    ),
    "VacuumStmt": (
        "VACUUM",
        "VACUUM cannot run inside a transaction block, and the tool runs every statement in "
        "one; run it with psql (ANALYZE alone is allowed)",
    ),
    "CheckPointStmt": ("CHECKPOINT", "it is server administration, the operator's job"),
    "CreatedbStmt": ("CREATE DATABASE", _DATABASES),
    "DropdbStmt": ("DROP DATABASE", _DATABASES),
    "AlterDatabaseStmt": ("ALTER DATABASE", _DATABASES),
    "AlterDatabaseSetStmt": ("ALTER DATABASE ... SET", _DATABASES),
    "AlterDatabaseRefreshCollStmt": ("ALTER DATABASE ... REFRESH COLLATION VERSION", _DATABASES),
    "CreateRoleStmt": ("CREATE ROLE (or USER, GROUP)", _ROLES),
    "AlterRoleStmt": ("ALTER ROLE (or USER, GROUP)", _ROLES),
    "AlterRoleSetStmt": ("ALTER ROLE ... SET", _ROLES),
    "DropRoleStmt": ("DROP ROLE (or USER, GROUP)", _ROLES),
    "GrantRoleStmt": ("GRANT or REVOKE of a role membership", _ROLES),
    "ReassignOwnedStmt": ("REASSIGN OWNED", _ROLES),
    "DropOwnedStmt": ("DROP OWNED", _ROLES),
    "CreateTableSpaceStmt": ("CREATE TABLESPACE", _TABLESPACES),
    "DropTableSpaceStmt": ("DROP TABLESPACE", _TABLESPACES),
    "AlterTableSpaceOptionsStmt": ("ALTER TABLESPACE", _TABLESPACES),
    "CreateFdwStmt": ("CREATE FOREIGN DATA WRAPPER", _SERVERS),
    "AlterFdwStmt": ("ALTER FOREIGN DATA WRAPPER", _SERVERS),
    "CreateForeignServerStmt": ("CREATE SERVER", _SERVERS),
    "AlterForeignServerStmt": ("ALTER SERVER", _SERVERS),
    "CreateUserMappingStmt": ("CREATE USER MAPPING", _SERVERS),
    "AlterUserMappingStmt": ("ALTER USER MAPPING", _SERVERS),
    "ImportForeignSchemaStmt": ("IMPORT FOREIGN SCHEMA", _SERVERS),
    "CreateSubscriptionStmt": ("CREATE SUBSCRIPTION", _SERVERS),
    "AlterSubscriptionStmt": ("ALTER SUBSCRIPTION", _SERVERS),
    "DropSubscriptionStmt": ("DROP SUBSCRIPTION", _SERVERS),
}
"""Statements refused on every connection: their label and why, with what to do instead."""
_SERVER_OBJECTS = {
    "OBJECT_DATABASE": ("database", _DATABASES),
    "OBJECT_ROLE": ("role", _ROLES),
    "OBJECT_TABLESPACE": ("tablespace", _TABLESPACES),
}
"""Object types whose renaming or change of owner counts as server administration."""

_LABELS = {
    "SelectStmt": "SELECT",
    "VariableSetStmt": "SET",
    "VariableShowStmt": "SHOW",
    "IndexStmt": "CREATE INDEX",
    "ViewStmt": "CREATE VIEW",
    "RuleStmt": "CREATE RULE",
    "CreateStmt": "CREATE TABLE",
    "CreateSeqStmt": "CREATE SEQUENCE",
    "AlterSeqStmt": "ALTER SEQUENCE",
    "CreateTrigStmt": "CREATE TRIGGER",
    "DefineStmt": "CREATE (aggregate, operator or type)",
    "CompositeTypeStmt": "CREATE TYPE",
    "RenameStmt": "ALTER ... RENAME",
    "AlterOwnerStmt": "ALTER ... OWNER TO",
    "GrantStmt": "GRANT or REVOKE",
    "ExplainStmt": "EXPLAIN",
}
_READ_KINDS = frozenset({"SelectStmt", "VariableShowStmt", "ExplainStmt"})
_WRITE_NODES = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})
_WRITE_VERBS = {
    "InsertStmt": "inserts rows",
    "UpdateStmt": "updates rows",
    "DeleteStmt": "deletes rows",
    "MergeStmt": "merges rows",
    "NotifyStmt": "sends a notification",
    "VariableSetStmt": "changes a setting",
    "LockStmt": "locks tables",
}
_OFF = frozenset({"false", "off", "no", "f", "n", "0"})
_TRUE = frozenset({"true", "on", "yes", "t", "y", "1"})
_SURVEYED = frozenset(
    {
        "FuncCall",
        "ParamRef",
        "VariableSetStmt",
        "lockingClause",
        "intoClause",
        "relname",
        "newname",
        "String",
        *_WRITE_NODES,
    }
)


@dataclass(frozen=True, slots=True)
class Prepared:
    """One statement, ready to send."""

    sql: str
    """The SQL to send, with native ``$1..$n`` placeholders."""
    params: tuple[Any, ...]
    """Positional values in ``$n`` order (``()`` when none)."""
    kind: str
    """PostgreSQL's name for the statement (the parse node), e.g. ``SelectStmt``."""
    reads_only: bool
    """A plain read: SELECT, VALUES or TABLE without a data-modifying WITH, a locking clause
    (FOR UPDATE/SHARE), INTO or a call of ``CHANGING_FUNCTIONS``; SHOW; EXPLAIN (without
    ANALYZE) of such a read."""


class PgStatementError(ValueError):
    """A statement refused before it reached the server. The message says what was refused
    and what to do instead; ``kind`` is the statement's parse node when it was parsed."""

    def __init__(self, message: str, *, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind


def prepare(
    sql: str, params: Sequence[Any] | Mapping[str, Any] | None, *, read_only: bool
) -> Prepared:
    """``sql`` (exactly one statement) with its placeholders translated to ``$n``, or
    ``PgStatementError``. ``read_only``: also refuse anything but a read."""
    if not isinstance(sql, str):
        raise PgStatementError(f"the SQL must be text, not {type(sql).__name__}")
    if "\0" in sql:
        raise PgStatementError(
            "the SQL holds a NUL character, where the server would cut the text short; remove it"
        )
    translation = _translate(sql, params)
    kind, body, tree = _parse_one(translation)
    label = _label(kind, body)
    refusal = _refusal(kind, body, tree)
    if refusal is not None:
        raise PgStatementError(refusal, kind=kind)
    not_a_read = _read_problem(kind, body, tree)
    if read_only and not_a_read is not None:
        raise PgStatementError(
            f"Database.query only reads, and this statement ({label}) {not_a_read}: "
            "use Database.execute",
            kind=kind,
        )
    if not_a_read is not None and tree.names_markers:
        raise PgStatementError(
            f"{label} is not allowed here: the table {MARKER_TABLE} holds atomictools' "
            "change-set commit markers (recovery decides from them); it can be read with "
            "Database.query, not changed",
            kind=kind,
        )
    problem = translation.problem or _numbering_problem(translation, tree.params)
    if problem is not None:
        raise PgStatementError(problem, kind=kind)
    return Prepared(translation.sql, translation.values, kind, not_a_read is None)


# -- placeholders ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Mark:
    """A placeholder in the caller's text, found by PostgreSQL's scanner."""

    style: str
    """``?``, ``?NNN``, ``:name`` or ``$n``."""
    start: int
    end: int
    """Where the placeholder itself is: ``=?`` is one operator token, of which only ``?`` is."""
    key: str
    """The name of a ``:name``, the number of a ``?NNN``, else empty."""


@dataclass(slots=True)
class _Translation:
    """The SQL as it will be sent, and how it was derived from the caller's."""

    original: str
    sql: str
    values: tuple[Any, ...] = ()
    style: str | None = None
    """``?``, ``?NNN``, ``:name``, ``$n``; None without params or without placeholders."""
    problem: str | None = None
    """A mismatch of placeholders and values, reported once the statement itself passed."""
    edits: list[tuple[int, int, int, int]] = field(default_factory=list)
    """(start, end) in the caller's text and (start, end) in ours, for each replacement."""

    def original_index(self, index: int) -> int:
        """Where an index into the translated text was in the caller's text."""
        for start, end, new_start, new_end in reversed(self.edits):
            if index >= new_end:
                return end + index - new_end
            if index >= new_start:
                return start
        return index


_PARAMS_TYPE = (
    "params must be a list (for ? or $n placeholders) or a mapping (for :name ones), not {}"
)
_JSONB_HINT = (
    " (with a list of params every ? is a placeholder: for jsonb's ? operator write "
    "jsonb_exists(doc, key), or use :name placeholders with a mapping)"
)


def _translate(sql: str, params: Sequence[Any] | Mapping[str, Any] | None) -> _Translation:
    """``?``, ``?NNN`` (params a list) or ``:name`` (a mapping) rewritten as ``$n``."""
    if params is None:
        return _Translation(sql, sql)
    if isinstance(params, str | bytes) or not isinstance(params, Mapping | Sequence):
        raise PgStatementError(_PARAMS_TYPE.format(type(params).__name__))
    if not params:
        return _Translation(sql, sql)
    try:
        # Every placeholder but $n holds a ? or a colon: without them, skip the scanner.
        marks = _marks(sql) if "?" in sql or ":" in sql else []
    except ParseError:
        return _Translation(sql, sql)  # the parser reports the error, with its position
    if isinstance(params, Mapping):
        return _translate_named(sql, params, marks)
    return _translate_positional(sql, params, marks)


def _translate_named(sql: str, params: Mapping[str, Any], marks: list[_Mark]) -> _Translation:
    if any(mark.style == "$n" for mark in marks):
        raise PgStatementError(
            "the statement mixes $n placeholders with :name ones; use one style: :name with "
            "params as a mapping, or ? (or $n) with params as a list"
        )
    names: dict[str, int] = {}
    used = [mark for mark in marks if mark.style == ":name"]  # a ? here is jsonb's operator
    t = _rewrite(sql, used, lambda mark: names.setdefault(mark.key, len(names) + 1))
    t.style = ":name"
    missing = [name for name in names if name not in params]
    unused = [str(key) for key in params if key not in names]
    if not names:
        t.problem = (
            f"params is a mapping of {_values(len(params))}, but the statement has no :name "
            "placeholders; write :name where each value goes"
        )
    elif missing:
        t.problem = (
            f"params has no value for {', '.join(':' + name for name in missing)} (it holds "
            f"{', '.join(sorted(map(str, params)))}); give one value per :name"
        )
    elif unused:
        t.problem = (
            f"params holds {', '.join(unused)}, which the statement does not use; give "
            "exactly the values of its :name placeholders"
        )
    else:
        t.values = tuple(params[name] for name in names)
    return t


def _translate_positional(sql: str, params: Sequence[Any], marks: list[_Mark]) -> _Translation:
    named = [mark.key for mark in marks if mark.style == ":name"]
    if named:
        raise PgStatementError(
            f"the statement uses :{named[0]}, a :name placeholder, but params is a list; pass "
            "params as a mapping for :name placeholders (a list goes with ?)"
        )
    styles = sorted({mark.style for mark in marks}, key=("?", "?NNN", "$n").index)
    if len(styles) > 1:
        raise PgStatementError(
            f"the statement mixes {' and '.join(styles)} placeholders; use one style (?, "
            "?NNN or $n) with params as a list"
        )
    count = 0

    def number(mark: _Mark) -> int:
        nonlocal count
        count += 1
        return int(mark.key) if mark.key else count

    t = _rewrite(sql, [mark for mark in marks if mark.style != "$n"], number)
    t.values = tuple(params)
    t.style = styles[0] if styles else "$n"  # or none at all: the parse tree tells
    if t.style == "?" and count != len(params):
        t.problem = (
            f"the statement has {count} ? placeholder{'s' * (count != 1)} but params holds "
            f"{_values(len(params))}; give one value per ?"
        )
        if count > len(params):
            t.problem += _JSONB_HINT
    return t


def _rewrite(sql: str, marks: list[_Mark], number: Callable[[_Mark], int]) -> _Translation:
    """``sql`` with each mark replaced by ``$n``; the text between marks is kept as it is."""
    t = _Translation(sql, sql)
    pieces: list[str] = []
    pos = length = 0
    for mark in marks:
        pieces.append(sql[pos : mark.start])
        length += mark.start - pos
        text = f"${number(mark)}"
        pieces.append(text)
        t.edits.append((mark.start, mark.end, length, length + len(text)))
        length += len(text)
        pos = mark.end
    pieces.append(sql[pos:])
    t.sql = "".join(pieces)
    return t


_OPERAND_START = frozenset(
    {
        *(f"ASCII_{ord(char)}" for char in "(,:[+-*/%^<>="),
        "Op",
        "LESS_EQUALS",
        "GREATER_EQUALS",
        "NOT_EQUALS",
        "VALUE_P",
    }
)
"""Tokens after which an operand begins: inside JSON_OBJECT(...), ``:name`` after one of these
is a placeholder, after anything else (``'key':value``) the colon separates a key from its
value."""
_JSON_OBJECTS = frozenset({"JSON_OBJECT", "JSON_OBJECTAGG"})


def _marks(sql: str) -> list[_Mark]:
    """Every placeholder of any style in ``sql``. A ``?`` operator token (``?``, ``=?``,
    ``<>?``...; not jsonb's ``?|``, ``?&``, ``@?``) is one, with a number right after it a
    ``?NNN``; ``:name`` (no gap) is one, except as an array slice bound (``a[1:n]``) or a key
    separator in JSON_OBJECT; ``::`` and ``:=`` are tokens of their own."""
    tokens = scan(sql)
    marks: list[_Mark] = []
    frames: list[str] = []
    skip = False
    for i, tok in enumerate(tokens):
        if skip:
            skip = False
            continue
        name = tok.name
        prev = tokens[i - 1] if i else None
        following = tokens[i + 1] if i + 1 < len(tokens) else None
        if name in ("ASCII_40", "ASCII_91"):
            frames.append(_frame(name, prev, frames))
        elif name in ("ASCII_41", "ASCII_93"):
            if frames:
                frames.pop()
        elif name == "PARAM":
            marks.append(_Mark("$n", tok.start, tok.end + 1, ""))
        elif name == "Op" and _ends_in_placeholder(sql[tok.start : tok.end + 1]):
            if following and following.name == "ICONST" and following.start == tok.end + 1:
                number = sql[following.start : following.end + 1]
                marks.append(_Mark("?NNN", tok.end, following.end + 1, str(int(number))))
                skip = True
            else:
                marks.append(_Mark("?", tok.end, tok.end + 1, ""))
        elif name == "ASCII_58" and _is_named(sql, prev, tok, following, frames):
            assert following is not None
            key = sql[following.start : following.end + 1]
            marks.append(_Mark(":name", tok.start, following.end + 1, key))
            skip = True
    return marks


def _ends_in_placeholder(operator: str) -> bool:
    return operator.endswith("?") and "?" not in operator[:-1] and operator != "@?"


def _frame(name: str, prev: Token | None, frames: list[str]) -> str:
    """What an opening bracket starts: an array constructor, a subscript, the arguments of
    JSON_OBJECT, or another parenthesis."""
    before = prev.name if prev else ""
    if name == "ASCII_40":
        return "json" if before in _JSON_OBJECTS else "("
    inside_array = bool(frames) and frames[-1] == "array"
    if before == "ARRAY" or (inside_array and before in ("ASCII_91", "ASCII_44")):
        return "array"
    return "subscript"


def _is_named(
    sql: str, prev: Token | None, colon: Token, following: Token | None, frames: list[str]
) -> bool:
    if following is None or following.start != colon.end + 1:
        return False
    if following.name == "IDENT":
        if sql[following.start] == '"':
            return False  # :"x" is no placeholder name
    elif following.kind == "NO_KEYWORD":
        return False
    frame = frames[-1] if frames else ""
    if frame == "subscript":
        return False
    if frame == "json":
        return prev is None or prev.name in _OPERAND_START or prev.kind == "RESERVED_KEYWORD"
    return True


def _values(count: int) -> str:
    return f"{count} value{'s' * (count != 1)}"


def _numbering_problem(t: _Translation, used: set[int]) -> str | None:
    """$n (or ?NNN) numbers without a value, values without a number, or $n without params."""
    if t.style is None:
        if used and not t.values:
            return (
                f"the statement uses ${min(used)} but no params were given; pass one value "
                "per placeholder"
            )
        return None
    sign = "?" if t.style == "?NNN" else "$"
    count = len(t.values)
    if not used and count:
        return (
            f"params holds {_values(count)}, but the statement has no placeholders; write ? "
            "(or $n) where each value goes"
        )
    missing = sorted(n for n in used if not 1 <= n <= count)
    if missing:
        return (
            f"{sign}{missing[0]} has no value: params holds {_values(count)} "
            f"({sign}1 to {sign}{count})"
        )
    unused = [n for n in range(1, count + 1) if n not in used]
    if unused:
        return (
            f"params holds {_values(count)}, but the statement never uses "
            f"{', '.join(f'{sign}{n}' for n in unused)}; give exactly one value per number"
        )
    return None


# -- parsing ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Tree:
    """What a walk over the whole parse tree found."""

    calls: list[dict[str, Any]] = field(default_factory=list)
    params: set[int] = field(default_factory=set)
    settings: list[dict[str, Any]] = field(default_factory=list)
    writes: bool = False
    locks: bool = False
    into: bool = False
    names_markers: bool = False


def _parse_one(t: _Translation) -> tuple[str, dict[str, Any], _Tree]:
    """The statement's kind, its node, and what its whole tree holds, in one pass: the JSON
    reader hands every node to ``noted`` as it builds it, so no second walk is needed."""
    nodes: list[dict[str, Any]] = []

    def noted(node: dict[str, Any]) -> dict[str, Any]:
        if not _SURVEYED.isdisjoint(node):
            nodes.append(node)
        return node

    try:
        parsed = json.loads(parse_sql_json(t.sql), object_hook=noted)
    except ParseError as err:
        if t.problem is not None:
            raise PgStatementError(t.problem) from None
        raise PgStatementError(_syntax_message(t, err)) from None
    statements = parsed.get("stmts", [])
    if len(statements) != 1:
        if not statements:
            raise PgStatementError("the SQL holds no statement (it is empty or only comments)")
        raise PgStatementError(
            f"the SQL holds {len(statements)} statements, and this call runs one: send "
            "several statements as a list to Database.transaction"
        )
    (kind, body), *_ = statements[0]["stmt"].items()
    return kind, body, _survey(nodes)


def _syntax_message(t: _Translation, err: ParseError) -> str:
    """PostgreSQL's message, placed in the caller's text (not in our translation of it)."""
    message = str(err.args[0]) if err.args else str(err)
    location = err.args[1] if len(err.args) > 1 else None
    where = hint = ""
    if isinstance(location, int):
        index = t.original_index(location)
        line = t.original.count("\n", 0, index) + 1
        column = index - (t.original.rfind("\n", 0, index) + 1) + 1
        where = f" (line {line}, column {column})"
        for start, end, new_start, new_end in t.edits:
            if new_start <= location < new_end:
                ours, theirs = t.sql[new_start:new_end], t.original[start:end]
                message = message.replace(f'"{ours}', f'"{theirs}', 1)
            if t.style == "?" and new_start <= location and not t.sql[new_end:location].strip():
                hint = _JSONB_HINT  # right at or after a ?: was it jsonb's operator?
    if t.style is None and not t.values and _has_placeholder_syntax(t.original):
        hint = " (placeholders such as ? or :name need params: a list for ?, a mapping for :name)"
    return f"PostgreSQL cannot parse the statement: {message}{where}{hint}"


def _has_placeholder_syntax(sql: str) -> bool:
    try:
        return any(mark.style in ("?", ":name") for mark in _marks(sql))
    except ParseError:
        return False


def _survey(nodes: list[dict[str, Any]]) -> _Tree:
    """What the nodes that hold a surveyed key say. Node names are keys of the JSON tree, and
    a literal is a value, so no literal can pose as a node."""
    tree = _Tree()
    for node in nodes:
        for key in _SURVEYED.intersection(node):
            value = node[key]
            if key == "FuncCall":
                tree.calls.append(value)
            elif key == "ParamRef":
                tree.params.add(value.get("number", 0))
            elif key == "VariableSetStmt":
                tree.settings.append(value)
            elif key == "lockingClause":
                tree.locks = True
            elif key == "intoClause":
                tree.into = True
            elif key in _WRITE_NODES:
                tree.writes = True
            elif key == "String":
                tree.names_markers |= str(value.get("sval", "")).lower() == MARKER_TABLE
            elif isinstance(value, str):  # relname, newname
                tree.names_markers |= value.lower() == MARKER_TABLE
    return tree


# -- the rules -------------------------------------------------------------------------------


def _refusal(kind: str, body: dict[str, Any], tree: _Tree) -> str | None:
    """Why no connection may run this statement, or None."""
    if kind == "TransactionStmt":
        what = _TRANSACTION_LABELS.get(body.get("kind", ""), "transaction control")
        return f"{what} {_TRANSACTION}"
    if kind in REFUSED_KINDS and (kind != "VacuumStmt" or body.get("is_vacuumcmd")):
        label, why = REFUSED_KINDS[kind]
        return f"{label} is not allowed: {why}"
    if kind == "CopyStmt":
        return _copy_refusal(body)
    if kind in ("RenameStmt", "AlterOwnerStmt"):
        object_type = body.get("renameType") or body.get("objectType") or ""
        if object_type in _SERVER_OBJECTS:
            what, why = _SERVER_OBJECTS[object_type]
            action = f"renaming a {what}" if kind == "RenameStmt" else f"changing a {what}'s owner"
            return f"ALTER {what.upper()} ({action}) is not allowed: {why}"
    found = (_set_refusal(body) if kind == "VariableSetStmt" else None) or _temporary_refusal(
        kind, body
    )
    if found is not None:
        return found
    for setting in tree.settings:  # a function's SET clause, ALTER FUNCTION ... SET
        name = str(setting.get("name", "")).lower()
        if name in GUARDED_SETTINGS:
            return (
                f"{_label(kind, body)} is not allowed: setting {name} (in its SET clause) "
                f"{GUARDED_SETTINGS[name]}"
            )
    for call in tree.calls:
        found = _call_refusal(call)
        if found is not None:
            return f"{_label(kind, body)} is not allowed: {found}"
    return None


def _set_refusal(body: dict[str, Any]) -> str | None:
    set_kind = body.get("kind", "")
    name = str(body.get("name", ""))
    if set_kind == "VAR_RESET_ALL":
        return (
            "RESET ALL is not allowed: it would also reset the tool's own settings (its "
            "deadline, its transaction mode); RESET one setting by name"
        )
    if set_kind == "VAR_SET_MULTI":  # SET TRANSACTION ..., SET SESSION CHARACTERISTICS ...
        return (
            f"SET {name} is not allowed: it would change the mode of the tool's transactions "
            "(read-only, isolation level), which the tool chooses"
        )
    if name.lower() in GUARDED_SETTINGS:
        verb = "RESET" if set_kind == "VAR_RESET" else "SET"
        return f"{verb} {name} is not allowed: it {GUARDED_SETTINGS[name.lower()]}"
    if set_kind != "VAR_RESET" and not body.get("is_local"):
        return (
            f"SET {name} without LOCAL is not allowed: the setting would outlive this call on "
            f"the shared connection and change every later call; write SET LOCAL {name} ..., "
            "which lasts until this call's transaction ends"
        )
    return None


def _copy_refusal(body: dict[str, Any]) -> str:
    direction = "FROM" if body.get("is_from") else "TO"
    if body.get("is_program"):
        label, reason = f"COPY ... {direction} PROGRAM", "it runs a shell command on the server"
    elif body.get("filename"):
        label, reason = f"COPY ... {direction} a file", f"it {_FILES}"
    else:
        label = f"COPY ... {'FROM STDIN' if direction == 'FROM' else 'TO STDOUT'}"
        reason = (
            "it needs the COPY protocol, which the tools do not speak (the connection would be "
            "left stuck)"
        )
    return (
        f"{label} is not allowed: {reason}; load rows with INSERT ... VALUES (several rows per "
        "statement, or a list to Database.transaction) and read them with SELECT"
    )


_CREATED = {
    "CreateStmt": ("relation", "table"),
    "ViewStmt": ("view", "view"),
    "CreateSeqStmt": ("sequence", "sequence"),
}
"""Statements that create a relation: the field that names it, and what it is."""


def _temporary_refusal(kind: str, body: dict[str, Any]) -> str | None:
    """A temporary object outlives the call on the shared connection, unless ON COMMIT DROP."""
    if kind in ("CreateTableAsStmt", "SelectStmt"):
        into = body.get("into") or body.get("intoClause")
        if not into:
            return None
        relation, on_commit, what = into.get("rel", {}), into.get("onCommit"), "table"
    elif kind in _CREATED:
        key, what = _CREATED[kind]
        relation, on_commit = body.get(key, {}), body.get("oncommit")
    elif kind == "CreateFunctionStmt":
        names = [str(part.get("String", {}).get("sval", "")) for part in body.get("funcname", [])]
        relation, on_commit, what = (
            {"schemaname": names[0] if len(names) > 1 else ""},
            None,
            "function",
        )
    else:
        return None
    schema = str(relation.get("schemaname", "")).lower()
    if relation.get("relpersistence") != "t" and not schema.startswith("pg_temp"):
        return None
    if on_commit == "ONCOMMIT_DROP":
        return None
    fix = (
        "add ON COMMIT DROP, or use a regular table" if what == "table" else f"use a regular {what}"
    )
    return (
        f"a temporary {what} ({_label(kind, body)}) is not allowed: it would outlive this call "
        f"on the shared connection; {fix}"
    )


def _call_refusal(call: dict[str, Any]) -> str | None:
    name = _function_name(call)
    if name in BLOCKED_FUNCTIONS:
        return f"the function {name}() {BLOCKED_FUNCTIONS[name]}"
    for prefix, reason in BLOCKED_FUNCTION_PREFIXES:
        if name.startswith(prefix):
            return f"the function {name}() {reason}"
    if name in SESSION_LOCK_FUNCTIONS:
        return (
            f"{name}() takes a session-level lock that would outlive this call on the shared "
            f"connection; use {SESSION_LOCK_FUNCTIONS[name]}(), released when the "
            "transaction ends"
        )
    if name == "set_config":
        return _set_config_refusal(call.get("args", []))
    return None


def _set_config_refusal(args: list[Any]) -> str | None:
    setting = _string_literal(args[0]) if args else None
    if setting is None:
        return (
            "set_config() with a setting name that is not a string literal could change a "
            "guarded setting (the role, the read-only mode, a time limit); write the name as "
            "a literal"
        )
    if setting.lower() in GUARDED_SETTINGS:
        return f"set_config('{setting}', ...) {GUARDED_SETTINGS[setting.lower()]}"
    local = _literal(args[2]) if len(args) > 2 else None
    if local is not True and str(local).lower() not in _TRUE:
        return (
            f"set_config('{setting}', ..., false) would outlive this call on the shared "
            "connection; pass true as the third argument (the setting then lasts until this "
            "call's transaction ends)"
        )
    return None


def _function_name(call: dict[str, Any]) -> str:
    parts = call.get("funcname", [])
    last = parts[-1].get("String", {}) if parts else {}
    return str(last.get("sval", "")).lower()


def _literal(node: Any) -> Any:
    """The value of a constant (``A_Const``), or None."""
    if not isinstance(node, dict) or "A_Const" not in node:
        return None
    const = node["A_Const"]
    if "sval" in const:
        return str(const["sval"].get("sval", ""))
    if "boolval" in const:
        return bool(const["boolval"].get("boolval", False))
    if "ival" in const:
        return int(const["ival"].get("ival", 0))
    return None


def _string_literal(node: Any) -> str | None:
    value = _literal(node)
    return value if isinstance(value, str) else None


def _read_problem(kind: str, body: dict[str, Any], tree: _Tree) -> str | None:
    """Why this statement is not a plain read, or None."""
    if kind not in _READ_KINDS:
        return _WRITE_VERBS.get(kind, "is not a read")
    if kind == "ExplainStmt":
        if any(_analyzes(option) for option in body.get("options", [])):
            return "runs the statement it explains (EXPLAIN ANALYZE)"
        query = body.get("query", {})
        inner = next(iter(query), "")
        if inner != "SelectStmt":
            return f"explains a {_label(inner, query.get(inner, {}))}, which is not a read"
    if tree.writes:
        return "changes rows in its WITH clause"
    if tree.locks:
        return "locks rows (FOR UPDATE or FOR SHARE)"
    if tree.into:
        return "creates a table (SELECT INTO)"
    for call in tree.calls:
        name = _function_name(call)
        if name in CHANGING_FUNCTIONS:
            return f"calls {name}(), which {CHANGING_FUNCTIONS[name]}"
    return None


def _analyzes(option: dict[str, Any]) -> bool:
    element = option.get("DefElem", {})
    if element.get("defname") != "analyze":
        return False
    arg = element.get("arg")
    if not arg:
        return True
    if "String" in arg:
        return str(arg["String"].get("sval", "")).lower() not in _OFF
    if "Integer" in arg:
        return bool(arg["Integer"].get("ival", 0))
    return True


def _label(kind: str, body: dict[str, Any]) -> str:
    """How the statement reads to a person: SELECT, CREATE TABLE, ..."""
    if kind == "SelectStmt" and "valuesLists" in body:
        return "VALUES"
    if kind == "SelectStmt" and "intoClause" in body:
        return "SELECT INTO"
    if kind == "VacuumStmt" and not body.get("is_vacuumcmd"):
        return "ANALYZE"
    if kind == "DropStmt":
        return "DROP " + str(body.get("removeType", "")).removeprefix("OBJECT_").replace("_", " ")
    if kind in _LABELS:
        return _LABELS[kind]
    if kind in REFUSED_KINDS:
        return REFUSED_KINDS[kind][0]
    words = re.findall(r"[A-Z][a-z]*", kind.removesuffix("Stmt"))
    return " ".join(words).upper() or kind
