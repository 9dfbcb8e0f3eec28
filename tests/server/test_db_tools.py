"""The five SQLite tools end to end through the SDK's ``mcp.Client``: correctness, cancellation,
``--tool-timeout`` and SIGKILL of the server in the middle of a transaction.

* Correctness: each ``check_*`` drives one tool (or one concern) and runs in memory,
  ``Client(create_server(...), mode=...)``, one test per check, and over real stdio
  (``python -m atomictools serve --root DIR --db main=DIR/main.db``), all checks in one session,
  both in the legacy protocol era (2025 handshake) and the SDK's default (2026-07-28). What is
  committed is read back with plain ``sqlite3``, from outside the server.
* Read-only serving (``--read-only`` / ``Workspace(read_only=True)``), and connection state
  (pragmas, temp triggers) that must not outlive the call that set it.
* Cancellation: a bank whose total balance is an invariant; each transfer is two UPDATEs, and
  one ``db_transaction`` carries thousands of them plus a marker row written first and flagged
  last, so a partial commit cannot hide. It is cancelled with ``anyio.move_on_after`` at many
  delays (and at delays counted from its first progress notification, so some surely land while
  statements run), in both eras, in memory and over stdio. After every cancel the database
  holds either the state before or the whole transaction, the total is unchanged,
  ``integrity_check`` is ok, and the next call on the same session is served at once. Long
  ``db_query`` and ``db_execute`` statements are cancelled too.
* ``--tool-timeout 0.05`` over stdio, and SIGKILL of the real server process during long
  transactions (``ATOMICTOOLS_DB_SIGKILL_ROUNDS`` rounds, 20 by default; the seed is printed and
  ``ATOMICTOOLS_DB_SIGKILL_SEED`` replays it), checked afterwards with plain ``sqlite3``.

``pytest -s`` shows a summary line per cancellation campaign and for the SIGKILL rounds.
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
import signal
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp.shared.exceptions import MCPError
from mcp.types import CallToolResult

from atomictools import Workspace
from atomictools.server import create_server
from atomictools.server.models import (
    DbExecuteOutput,
    DbListOutput,
    DbQueryOutput,
    DbSchemaOutput,
)

from .dbcalls import COMMITTED_NOTHING, DB, DbCalls, ProgressLog
from .helpers import TRACEBACK_MARKERS, connect, state_env, stdio_params, text_of

pytestmark = pytest.mark.anyio

MODES = ["legacy", "default"]
DB_TOOLS = {"db_list", "db_schema", "db_query", "db_execute", "db_transaction"}
OWNS_TRANSACTION = "the tool owns the transaction"
NEXT_CALL_LIMIT = 1.0
"""Seconds the first call after a cancel may take: it must not wait for the aborted work."""
LONG_QUERY = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 100000000) "
    "SELECT count(*) FROM c"
)
LONG_WRITE = (
    "UPDATE meta SET pings = pings + (SELECT count(*) FROM (WITH RECURSIVE c(x) AS (SELECT 1 "
    "UNION ALL SELECT x + 1 FROM c WHERE x < 100000000) SELECT x FROM c))"
)
"""One write statement that would run for many seconds (and add 10^8 to the ping count)."""
SLOW_STATEMENT = (
    "INSERT INTO {table}(n) SELECT count(*) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL "
    "SELECT x + 1 FROM c WHERE x < 300000) SELECT x FROM c)"
)
"""About 60 ms of SQLite work: longer than one of the engine's statement batches."""


@pytest.fixture
def anyio_backend() -> str:
    # The SQLite tools use aiosqlite, which hands results back from its worker thread through
    # asyncio futures: the server (in memory, it shares our event loop) runs on asyncio only.
    return "asyncio"


# -- connecting ---------------------------------------------------------------------------------


def memory_server(root: Path, *, read_only: bool = False) -> Any:
    workspace = Workspace([root], read_only=read_only)
    return create_server(workspace, databases={DB: root / "main.db"})


def stdio_server(root: Path, *extra: str) -> StdioServerParameters:
    return stdio_params(root, "--db", f"{DB}={root / 'main.db'}", *extra)


def disk(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read with plain sqlite3, from outside the server: what is committed on disk."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql, params).fetchall()


class T(DbCalls):
    """One check's handle: the client, the root, and a prefix for the check's own tables."""

    def __init__(self, client: Client, root: Path, name: str) -> None:
        super().__init__(client)
        self.root = root
        self.name = name

    @property
    def db_path(self) -> Path:
        return self.root / "main.db"

    def n(self, table: str) -> str:
        return f"{self.name}_{table}"

    def on_disk(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return disk(self.db_path, sql, params)


Check = Callable[[T], Awaitable[None]]
CHECKS: list[Check] = []


def check(fn: Check) -> Check:
    CHECKS.append(fn)
    return fn


TRICKY_TEXT = "héllo ✓\n'quoted' \"double\" ; DROP TABLE x; \x00 after NUL"


def b64(data: bytes) -> dict[str, str]:
    return {"$blob": base64.b64encode(data).decode("ascii")}


# -- the checks -----------------------------------------------------------------------------------


@check
async def check_tools_listed(t: T) -> None:
    tools = {tool.name: tool for tool in (await t.client.list_tools()).tools}
    assert tools.keys() >= DB_TOOLS
    for name in ("db_list", "db_schema", "db_query"):
        assert tools[name].annotations is not None
        assert tools[name].annotations.read_only_hint is True, name
    for name in ("db_execute", "db_transaction"):
        assert tools[name].annotations is not None
        assert tools[name].annotations.read_only_hint is False, name
        assert tools[name].annotations.destructive_hint is True, name


@check
async def check_list(t: T) -> None:
    d = t.root / t.name
    (d / "deep").mkdir(parents=True)
    with contextlib.closing(sqlite3.connect(d / "a.db")) as conn:
        conn.execute("CREATE TABLE found(v)")
        conn.execute("INSERT INTO found VALUES ('here')")
        conn.commit()
    (d / "b.sqlite").write_bytes(b"")
    sqlite3.connect(d / "deep" / "c.sqlite3").close()
    (d / "notes.txt").write_text("not a database\n")
    (d / "a.db.bak").write_bytes(b"")
    (d / "db").write_bytes(b"")

    out = await t.ok("db_list", {}, DbListOutput)
    entries = {e["name"]: e for e in out["databases"]}
    assert entries[DB] == {"name": DB, "path": str(t.db_path), "configured": True}
    found = {name for name in entries if name.startswith(f"{t.name}/")}
    assert found == {f"{t.name}/a.db", f"{t.name}/b.sqlite", f"{t.name}/deep/c.sqlite3"}
    for name in found:
        assert entries[name] == {"name": name, "path": name, "configured": False}

    # A discovered database is usable by the name db_list gave.
    q = await t.ok(
        "db_query", {"database": f"{t.name}/a.db", "sql": "SELECT v FROM found"}, DbQueryOutput
    )
    assert q["rows"] == [["here"]]
    await t.err(
        "db_query", {"database": f"{t.name}/notes.txt", "sql": "SELECT 1"}, "not a database"
    )
    await t.err("db_query", {"database": f"{t.name}/gone.db", "sql": "SELECT 1"}, "does not exist")
    await t.err("db_query", {"database": "../outside.db", "sql": "SELECT 1"}, "outside")
    await t.err("db_query", {"database": "", "sql": "SELECT 1"}, "database")


@check
async def check_schema(t: T) -> None:
    items, view, trig, idx, log = (t.n(x) for x in ("items", "view", "trig", "idx", "log"))
    await t.transaction(
        f"CREATE TABLE {items}(id INTEGER PRIMARY KEY, name TEXT NOT NULL DEFAULT 'x', "
        "price REAL, data BLOB)",
        f"CREATE TABLE {log}(msg TEXT)",
        f"CREATE INDEX {idx} ON {items}(name)",
        f"CREATE VIEW {view} AS SELECT id, name FROM {items}",
        f"CREATE TRIGGER {trig} AFTER INSERT ON {items} BEGIN INSERT INTO {log} VALUES "
        "(new.name); END",
        {"sql": f"INSERT INTO {items}(name, price) VALUES (?, ?)", "params": ["one", 1.5]},
    )
    out = await t.ok("db_schema", {"database": DB}, DbSchemaOutput)
    assert out["database"] == DB
    objects = {o["name"]: o for o in out["objects"]}
    for name, kind in [(items, "table"), (log, "table"), (idx, "index"), (view, "view")]:
        assert objects[name]["type"] == kind
        assert name in objects[name]["sql"]
    assert objects[trig]["type"] == "trigger"
    assert "AFTER INSERT" in objects[trig]["sql"]

    out = await t.ok("db_schema", {"database": DB, "table": items}, DbSchemaOutput)
    [table] = out["objects"]
    assert (table["name"], table["type"]) == (items, "table")
    assert table["sql"].startswith(f"CREATE TABLE {items}")
    assert table["columns"] == [
        {"name": "id", "type": "INTEGER", "notNull": False, "default": None, "primaryKey": 1},
        {"name": "name", "type": "TEXT", "notNull": True, "default": "'x'", "primaryKey": 0},
        {"name": "price", "type": "REAL", "notNull": False, "default": None, "primaryKey": 0},
        {"name": "data", "type": "BLOB", "notNull": False, "default": None, "primaryKey": 0},
    ]
    out = await t.ok("db_schema", {"database": DB, "table": view}, DbSchemaOutput)
    assert [c["name"] for c in out["objects"][0]["columns"]] == ["id", "name"]

    # A name that needs quoting is described by its name, not by SQL text.
    odd = f'{t.name} we\'ird "t"; x'
    await t.execute('CREATE TABLE "' + odd.replace('"', '""') + '"(a INT, b TEXT)')
    out = await t.ok("db_schema", {"database": DB, "table": odd}, DbSchemaOutput)
    assert out["objects"][0]["name"] == odd
    assert [c["name"] for c in out["objects"][0]["columns"]] == ["a", "b"]

    # Injection attempts through `table` are names that do not exist: nothing runs.
    for attempt in [
        f"{items}; DROP TABLE {items}",
        f"{items}' OR '1'='1",
        f"x'); DROP TABLE {items}; --",
        f'" OR 1=1; DROP TABLE {items} --',
        f"{items})); DELETE FROM {items}; --",
        f"{items}' UNION SELECT type, name, sql FROM sqlite_master --",
    ]:
        await t.err("db_schema", {"database": DB, "table": attempt}, "no table or view named")
    assert t.on_disk(f"SELECT name, price FROM {items}") == [("one", 1.5)]
    assert t.on_disk(f"SELECT msg FROM {log}") == [("one",)]
    await t.err("db_schema", {"database": DB, "table": idx}, "no table or view named")


@check
async def check_query(t: T) -> None:
    vals = t.n("vals")
    await t.execute(f"CREATE TABLE {vals}(id INTEGER PRIMARY KEY, v)")
    blob = bytes(range(256)) * 3
    values: list[tuple[Any, Any, str]] = [
        # (sent, read back, typeof)
        (42, 42, "integer"),
        (-7, -7, "integer"),
        (2**62 + 1, 2**62 + 1, "integer"),
        (3.25, 3.25, "real"),
        (-1e-300, -1e-300, "real"),
        (TRICKY_TEXT, TRICKY_TEXT, "text"),
        ("", "", "text"),
        (None, None, "null"),
        (True, 1, "integer"),
        (False, 0, "integer"),
        (b64(blob), b64(blob), "blob"),
        (b64(b""), b64(b""), "blob"),
        (b64(b"\x00"), b64(b"\x00"), "blob"),
    ]
    for i, (sent, _, _) in enumerate(values, start=1):
        out = await t.execute(f"INSERT INTO {vals}(id, v) VALUES (?, ?)", [i, sent])
        assert out == {"rowcount": 1, "lastrowid": i, "committed": True}
    out = await t.query(f"SELECT id, v, typeof(v) AS kind FROM {vals} ORDER BY id")
    assert out["columns"] == ["id", "v", "kind"]
    assert out["rowCount"] == len(values)
    assert out["truncated"] is False
    for row, (sent, back, kind) in zip(out["rows"], values, strict=True):
        assert row[1:] == [back, kind], (row, sent)
    # Stored as real bytes, not as the base64 text.
    assert t.on_disk(f"SELECT v FROM {vals} WHERE id = 11") == [(blob,)]
    # Rows of plain JSON values go out as they are; a row with a blob or an infinity is encoded,
    # and plain rows beside it are not disturbed.
    mixed = await t.query(
        "SELECT 1, 'a' UNION ALL SELECT 1e999, x'00ff' UNION ALL SELECT -1e999, 2.5"
    )
    assert mixed["rows"] == [[1, "a"], ["Infinity", {"$blob": "AP8="}], ["-Infinity", 2.5]]

    # Every JSON type as a parameter, list and object forms, and a blob parameter.
    row = await t.rows(
        "SELECT ?, ?, ?, ?, ?, typeof(?), hex(?)", [1, 2.5, "s", None, True, b64(b"ab"), b64(b"ab")]
    )
    assert row == [[1, 2.5, "s", None, 1, "blob", "6162"]]
    row = await t.rows(
        "SELECT :i + 1 AS i, :s || '!' AS s, :n IS NULL AS n, :b AS b",
        {"i": 41, "s": "hey", "n": None, "b": b64(b"\xff\x00")},
    )
    assert row == [[42, "hey!", 1, b64(b"\xff\x00")]]
    assert await t.rows(f"SELECT id FROM {vals} WHERE v = :b", {"b": b64(blob)}) == [[11]]
    assert await t.rows(f"SELECT id FROM {vals} WHERE id IN (?, ?) ORDER BY id", [2, 4]) == [
        [2],
        [4],
    ]

    # maxRows: exactly that many rows and `truncated` when more exist.
    n = len(values)
    for max_rows, count, truncated in [(3, 3, True), (n - 1, n - 1, True), (n, n, False)]:
        out = await t.query(f"SELECT id FROM {vals} ORDER BY id", maxRows=max_rows)
        assert out["rows"] == [[i] for i in range(1, count + 1)]
        assert (out["rowCount"], out["truncated"]) == (count, truncated)
    out = await t.query(f"SELECT id FROM {vals} WHERE id > 1000")
    assert out == {"columns": ["id"], "rows": [], "truncated": False, "rowCount": 0}

    base = {"database": DB, "sql": "SELECT ?"}
    await t.err("db_query", {**base, "maxRows": 0}, "maxRows")
    await t.err("db_query", {**base, "params": [{"$blob": "not base64!"}]}, "base64")
    await t.err("db_query", {**base, "params": [{"x": 1}]}, "$blob")
    await t.err("db_query", {**base, "params": [[1, 2]]}, "list")
    await t.err("db_query", {**base, "params": [1, 2]}, "one parameter per placeholder")
    await t.err("db_query", {"database": DB, "sql": "SELEC 1"}, "syntax error")
    await t.err("db_query", {"database": DB, "sql": "  "}, "empty")
    # A value SQLite cannot take: a clear error naming the statement, not a broken session.
    await t.err("db_query", {**base, "params": [2**64]}, "too large")
    # TEXT that is not UTF-8 comes back losslessly, as the bytes it holds.
    odd = await t.ok("db_query", {"database": DB, "sql": "SELECT CAST(x'ff00fe' AS TEXT)"})
    assert odd["rows"] == [[{"$blob": "/wD+"}]]


@check
async def check_query_refuses_writes(t: T) -> None:
    kept = t.n("kept")
    await t.execute(f"CREATE TABLE {kept}(v INTEGER)")
    await t.execute(f"INSERT INTO {kept} VALUES (1)")
    version = t.on_disk("PRAGMA user_version")
    for sql in [
        f"INSERT INTO {kept} VALUES (2)",
        f"REPLACE INTO {kept} VALUES (2)",
        f"UPDATE {kept} SET v = 3",
        f"DELETE FROM {kept}",
        f"WITH x AS (SELECT 5) INSERT INTO {kept} SELECT * FROM x",
        f"CREATE TABLE {t.n('new')}(v)",
        f"CREATE TEMP TABLE {t.n('tmp')}(v)",
        f"DROP TABLE {kept}",
        f"ALTER TABLE {kept} ADD COLUMN w",
        f"CREATE INDEX {t.n('ix')} ON {kept}(v)",
        "PRAGMA user_version = 7",
        "PRAGMA journal_mode = DELETE",
        f"ATTACH DATABASE '{t.root / 'evil.db'}' AS evil",
        f"SELECT 1; DELETE FROM {kept}",
        "BEGIN",
        "VACUUM",
        "SELECT load_extension('libevil')",
    ]:
        await t.err("db_query", {"database": DB, "sql": sql})
    assert t.on_disk(f"SELECT v FROM {kept}") == [(1,)]
    assert t.on_disk("PRAGMA user_version") == version
    assert t.on_disk("PRAGMA journal_mode") == [("wal",)]
    assert not (t.root / "evil.db").exists()
    # Reading pragmas and table-valued functions still work.
    assert await t.rows(f"SELECT name FROM pragma_table_info('{kept}')") == [["v"]]
    assert await t.rows("PRAGMA integrity_check") == [["ok"]]


@check
async def check_execute(t: T) -> None:
    ex = t.n("ex")
    out = await t.execute(f"CREATE TABLE {ex}(id INTEGER PRIMARY KEY, v TEXT UNIQUE NOT NULL)")
    assert out["committed"] is True
    assert out["rowcount"] == -1
    for i, v in enumerate(["a", "b", "c"], start=1):
        out = await t.execute(f"INSERT INTO {ex}(v) VALUES (:v)", {"v": v})
        assert out == {"rowcount": 1, "lastrowid": i, "committed": True}
    out = await t.execute(f"UPDATE {ex} SET v = v || '!' WHERE id >= ?", [2])
    assert (out["rowcount"], out["committed"]) == (2, True)
    # Committed: another connection (another process could do the same) sees it at once.
    assert t.on_disk(f"SELECT id, v FROM {ex} ORDER BY id") == [(1, "a"), (2, "b!"), (3, "c!")]
    out = await t.execute(f"DELETE FROM {ex} WHERE id = 1")
    assert (out["rowcount"], out["committed"]) == (1, True)

    before = t.on_disk(f"SELECT id, v FROM {ex} ORDER BY id")
    for sql in [
        f"INSERT INTO {ex}(v) VALUES ('x'); INSERT INTO {ex}(v) VALUES ('y')",
        f"INSERT INTO {ex}(v) VALUES ('x');DELETE FROM {ex}",
    ]:
        message = await t.err(
            "db_execute", {"database": DB, "sql": sql}, "more than one statement", "db_transaction"
        )
        assert COMMITTED_NOTHING in message
    await t.err(
        "db_execute",
        {"database": DB, "sql": f"INSERT INTO {ex}(v) VALUES ('b!')"},
        "UNIQUE constraint failed",
        committed_nothing=True,
    )
    await t.err(
        "db_execute",
        {"database": DB, "sql": f"INSERT INTO {ex}(v) VALUES (NULL)"},
        "NOT NULL",
        committed_nothing=True,
    )
    await t.err("db_execute", {"database": DB, "sql": f"INSERT INTO {ex}(v) VALUE"}, "syntax error")
    await t.err("db_execute", {"database": DB, "sql": ""}, "empty")
    assert t.on_disk(f"SELECT id, v FROM {ex} ORDER BY id") == before


@check
async def check_transaction(t: T) -> None:
    tx = t.n("tx")
    await t.execute(f"CREATE TABLE {tx}(id INTEGER PRIMARY KEY, v TEXT UNIQUE)")
    out = await t.transaction(
        {"sql": f"INSERT INTO {tx}(v) VALUES (?)", "params": ["a"]},
        {"sql": f"INSERT INTO {tx}(v) VALUES (:v)", "params": {"v": "b"}},
        {"sql": f"INSERT INTO {tx}(v) VALUES (?)", "params": [b64(b"blob")]},
        f"UPDATE {tx} SET v = v || '!' WHERE typeof(v) = 'text'",
        f"CREATE INDEX {t.n('txi')} ON {tx}(v)",
    )
    assert out["committed"] is True
    assert out["results"] == [
        {"index": 1, "rowcount": 1, "lastrowid": 1},
        {"index": 2, "rowcount": 1, "lastrowid": 2},
        {"index": 3, "rowcount": 1, "lastrowid": 3},
        {"index": 4, "rowcount": 2, "lastrowid": out["results"][3]["lastrowid"]},
        {"index": 5, "rowcount": -1, "lastrowid": out["results"][4]["lastrowid"]},
    ]
    assert t.on_disk(f"SELECT id, v FROM {tx} ORDER BY id") == [(1, "a!"), (2, "b!"), (3, b"blob")]

    committed = t.on_disk(f"SELECT id, v FROM {tx} ORDER BY id")
    n = 5
    failing = {
        "syntax": (f"INSERT INTO {tx} VALUES oops", "syntax error"),
        "unique": (f"INSERT INTO {tx}(v) VALUES ('a!')", "UNIQUE constraint failed"),
        "table": (f"UPDATE {t.n('nowhere')} SET v = 1", "no such table"),
    }
    for i in range(1, n + 1):
        for kind, (bad, reason) in failing.items():
            statements: list[dict[str, Any]] = [
                {"sql": f"INSERT INTO {tx}(v) VALUES (?)", "params": [f"{kind}{i}-{j}"]}
                for j in range(1, n + 1)
            ]
            statements[i - 1] = {"sql": bad}
            message = await t.err(
                "db_transaction",
                {"database": DB, "statements": statements},
                f"statement {i} of {n}",
                bad,
                reason,
                committed_nothing=True,
            )
            assert f"statement {i} of {n} ({bad}) failed" in message
            # None of the statements before (or after) the failing one was committed.
            assert t.on_disk(f"SELECT id, v FROM {tx} ORDER BY id") == committed, (kind, i)
    # A long statement is named by its beginning.
    long_sql = f"INSERT INTO {tx}(v) VALUES ('a!') /* {'x' * 300} */"
    message = await t.err(
        "db_transaction",
        {"database": DB, "statements": [{"sql": "SELECT 1"}, {"sql": long_sql}]},
        "statement 2 of 2",
        long_sql[:60],
        committed_nothing=True,
    )
    assert "..." in message
    await t.err("db_transaction", {"database": DB, "statements": []}, "statements")
    await t.err("db_transaction", {"database": DB, "statements": [{"sql": " "}]}, "empty")
    assert t.on_disk(f"SELECT id, v FROM {tx} ORDER BY id") == committed


REFUSED: list[tuple[str, str]] = [
    ("ATTACH DATABASE '{root}/attached.db' AS other", "ATTACH"),
    ("DETACH DATABASE main", "ATTACH/DETACH"),
    ("PRAGMA journal_mode=DELETE", "journal_mode"),
    ("PRAGMA journal_mode = OFF", "journal_mode"),
    ("PRAGMA synchronous=OFF", "synchronous"),
    ("PRAGMA main.locking_mode=EXCLUSIVE", "locking_mode"),
    ("PRAGMA writable_schema=ON", "writable_schema"),
    ("VACUUM INTO '{root}/copy.db'", "VACUUM"),
    ("BEGIN", OWNS_TRANSACTION),
    ("BEGIN IMMEDIATE", OWNS_TRANSACTION),
    ("COMMIT", OWNS_TRANSACTION),
    ("END", OWNS_TRANSACTION),
    ("ROLLBACK", OWNS_TRANSACTION),
    ("SAVEPOINT sp", OWNS_TRANSACTION),
    ("RELEASE sp", OWNS_TRANSACTION),
    ("RELEASE SAVEPOINT sp", OWNS_TRANSACTION),
    ("ROLLBACK TO sp", OWNS_TRANSACTION),
    ("SELECT load_extension('libevil')", "load_extension"),
    ("SELECT load_extension('/tmp/libevil.so', 'init')", "load_extension"),
]


@check
async def check_refused(t: T) -> None:
    guarded = t.n("guarded")
    await t.execute(f"CREATE TABLE {guarded}(v)")
    await t.execute(f"INSERT INTO {guarded} VALUES ('kept')")
    for template, fragment in REFUSED:
        sql = template.format(root=t.root)
        await t.err("db_execute", {"database": DB, "sql": sql}, fragment, committed_nothing=True)
        statements = [
            {"sql": f"INSERT INTO {guarded} VALUES ('lost')"},
            {"sql": sql},
            {"sql": f"DELETE FROM {guarded}"},
        ]
        await t.err(
            "db_transaction",
            {"database": DB, "statements": statements},
            "statement 2 of 3",
            fragment,
            committed_nothing=True,
        )
        assert t.on_disk(f"SELECT v FROM {guarded}") == [("kept",)], sql
    assert t.on_disk("PRAGMA journal_mode") == [("wal",)]
    assert not (t.root / "attached.db").exists()
    assert not (t.root / "copy.db").exists()
    # The writer still works, inside a transaction of its own.
    await t.transaction(f"INSERT INTO {guarded} VALUES ('new')", f"DELETE FROM {guarded}")
    assert t.on_disk(f"SELECT count(*) FROM {guarded}") == [(0,)]


LEAKS: list[tuple[str, str]] = [
    ("query_only", "PRAGMA query_only = ON"),
    ("ignore_check_constraints", "PRAGMA ignore_check_constraints = ON"),
    ("temp_trigger", "CREATE TEMP TRIGGER wipe AFTER INSERT ON t BEGIN DELETE FROM t; END"),
]
"""Connection state a statement could leave on the shared writer connection."""


async def expect_no_leak(t: T, database: str, sql: str) -> None:
    """``sql`` is refused, or else it changes nothing for the calls that come after it.

    Every call is its own transaction on a writer connection the server shares between calls
    (and clients): a setting or temp object left on it would change what later calls do.
    """
    path = t.root / database
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, c INTEGER CHECK (c > 0))")
        conn.commit()
    await t.client.call_tool("db_execute", {"database": database, "sql": sql})
    out = await t.ok(
        "db_execute", {"database": database, "sql": "INSERT INTO t(c) VALUES (1)"}, DbExecuteOutput
    )
    assert out["committed"] is True
    assert disk(path, "SELECT c FROM t") == [(1,)], f"after {sql!r}"
    await t.err(
        "db_execute",
        {"database": database, "sql": "INSERT INTO t(c) VALUES (-5)"},
        "CHECK constraint failed",
        committed_nothing=True,
    )
    assert disk(path, "SELECT c FROM t") == [(1,)], f"after {sql!r}"


async def check_no_state_leaks(t: T) -> None:
    """Settings and temp objects do not outlive the call that made them."""
    (t.root / t.name).mkdir()
    failures = []
    for name, sql in LEAKS:
        try:
            await expect_no_leak(t, f"{t.name}/{name}.db", sql)
        except AssertionError as err:
            failures.append(f"{sql}: {err}")
    assert not failures, "\n".join(failures)


@check
async def check_progress(t: T) -> None:
    slow = t.n("slow")
    await t.execute(f"CREATE TABLE {slow}(n INTEGER)")
    # Statements that each take longer than a batch: one notification per statement.
    log = ProgressLog()
    out = await t.transaction(*[SLOW_STATEMENT.format(table=slow)] * 5, progress_callback=log)
    assert len(out["results"]) == 5
    await log.complete()
    assert log.seen == [(i, 5) for i in range(1, 6)], log.seen

    # Thousands of quick statements: several notifications, increasing, ending at the total.
    log = ProgressLog()
    n = 4000
    out = await t.transaction(
        *[{"sql": f"INSERT INTO {slow}(n) VALUES (?)", "params": [i]} for i in range(n)],
        progress_callback=log,
    )
    assert out["statements"] == n
    assert out["rowsChanged"] == n
    assert len(out["results"]) == 100  # the first 100 listed, the rest summed up
    assert out["resultsTruncated"] is True
    await log.complete()
    assert all(total == n for _, total in log.seen), log.seen
    done = [p for p, _ in log.seen]
    assert done == sorted(set(done)), done
    assert done[0] > 0
    assert done[-1] == n
    assert t.on_disk(f"SELECT count(*) FROM {slow}") == [(n + 5,)]


def check_id(fn: Check) -> str:
    return fn.__name__.removeprefix("check_")


async def check_read_only(t: T) -> None:
    """``--read-only`` / Workspace(read_only=True): queries work, every change is refused."""
    before = t.on_disk("SELECT id, v FROM ro ORDER BY id")
    assert await t.rows("SELECT id, v FROM ro ORDER BY id") == [list(r) for r in before]
    out = await t.ok("db_schema", {"database": DB, "table": "ro"}, DbSchemaOutput)
    assert [c["name"] for c in out["objects"][0]["columns"]] == ["id", "v"]
    out = await t.ok("db_list", {}, DbListOutput)
    assert out["databases"][0]["name"] == DB
    await t.err(
        "db_execute", {"database": DB, "sql": "INSERT INTO ro(v) VALUES ('x')"}, "read-only"
    )
    await t.err("db_execute", {"database": DB, "sql": "CREATE TABLE other(v)"}, "read-only")
    await t.err(
        "db_transaction",
        {"database": DB, "statements": [{"sql": "DELETE FROM ro"}, {"sql": "SELECT 1"}]},
        "read-only",
    )
    await t.err("db_query", {"database": DB, "sql": "DELETE FROM ro"}, "only reads")
    assert t.on_disk("SELECT id, v FROM ro ORDER BY id") == before
    assert await t.rows("PRAGMA integrity_check") == [["ok"]]


def seed_read_only(root: Path) -> None:
    """A database written earlier (in WAL mode, as the server leaves it) to serve read-only."""
    with contextlib.closing(sqlite3.connect(root / "main.db")) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE ro(id INTEGER PRIMARY KEY, v TEXT)")
        conn.executemany("INSERT INTO ro(v) VALUES (?)", [("a",), ("b",), ("c",)])
        conn.commit()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    (tmp_path / "outside.db").write_bytes(b"")
    return path


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("check_fn", CHECKS, ids=check_id)
async def test_in_memory(check_fn: Check, mode: str, root: Path) -> None:
    async with connect(memory_server(root), mode) as client:
        await check_fn(T(client, root, check_id(check_fn)))


@pytest.mark.parametrize("mode", MODES)
async def test_in_memory_read_only(mode: str, root: Path) -> None:
    seed_read_only(root)
    async with connect(memory_server(root, read_only=True), mode) as client:
        await check_read_only(T(client, root, "ro"))


async def run_checks(client: Client, root: Path, checks: list[Check]) -> None:
    """Every check in one session; collect failures so one does not hide the rest."""
    failures: list[str] = []
    for fn in checks:
        try:
            await fn(T(client, root, check_id(fn)))
        except AssertionError as err:
            failures.append(f"{fn.__name__}: {err}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("mode", MODES)
async def test_stdio_every_check(mode: str, root: Path) -> None:
    async with connect(stdio_server(root), mode) as client:
        await run_checks(client, root, CHECKS)


@pytest.mark.parametrize("mode", MODES)
async def test_stdio_read_only(mode: str, root: Path) -> None:
    seed_read_only(root)
    async with connect(stdio_server(root, "--read-only"), mode) as client:
        await run_checks(client, root, [check_read_only])


@pytest.mark.parametrize("mode", MODES)
async def test_in_memory_no_state_leaks(mode: str, root: Path) -> None:
    async with connect(memory_server(root), mode) as client:
        await check_no_state_leaks(T(client, root, "leaks"))


async def check_heap_limit_does_not_leak(t: T) -> None:
    """``PRAGMA hard_heap_limit`` is process-wide: once accepted, it limits every later call on
    every connection of the server. (Over stdio only: in memory it would limit this process.)"""
    await t.client.call_tool("db_execute", {"database": DB, "sql": "PRAGMA hard_heap_limit=200000"})
    heap = t.n("heap")
    await t.execute(f"CREATE TABLE {heap}(v)")
    out = await t.execute(
        f"INSERT INTO {heap} SELECT x FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL "
        "SELECT x + 1 FROM c WHERE x < 20000) SELECT x FROM c)"
    )
    assert out["rowcount"] == 20000
    assert await t.rows(f"SELECT count(*) FROM {heap}") == [[20000]]


@pytest.mark.parametrize("mode", MODES)
async def test_stdio_no_state_leaks(mode: str, root: Path) -> None:
    async with connect(stdio_server(root), mode) as client:
        # The heap limit last: if it leaks, it limits the whole server process.
        await run_checks(client, root, [check_no_state_leaks, check_heap_limit_does_not_leak])


# -- the bank: an invariant that any partial commit breaks ----------------------------------------

ACCOUNTS = 5000
START_BALANCE = 1000
TOTAL = ACCOUNTS * START_BALANCE
TRANSFERS = 1000
"""Transfers per long transaction: 2002 statements. Each UPDATE finds its account by a scan
(``id + 0`` keeps SQLite off the primary key), so the SQLite work (some 0.3 s) outweighs the
JSON and validation work around it, and many cancels land in the middle of it."""
FINGERPRINT_SQL = (
    "SELECT count(*), sum(balance), sum(balance * id), "
    "sum(balance * (id % 101) * (id % 103)) FROM accounts"
)
"""Cheap to read after every cancel; any partial set of transfers changes it."""
PING = {"database": DB, "sql": "UPDATE meta SET pings = pings + 1"}

Seen = tuple[list[int], dict[int, int]]
"""What a database holds: the balances' fingerprint and the attempts' markers."""


def bank_setup(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE accounts(id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)")
        conn.execute("CREATE TABLE attempts(id INTEGER PRIMARY KEY, done INTEGER NOT NULL)")
        conn.execute("CREATE TABLE meta(pings INTEGER NOT NULL)")
        conn.execute("INSERT INTO meta VALUES (0)")
        conn.executemany(
            "INSERT INTO accounts VALUES (?, ?)",
            [(i, START_BALANCE) for i in range(1, ACCOUNTS + 1)],
        )
        conn.commit()


def transfers(attempt: int, count: int) -> tuple[list[dict[str, Any]], Counter[int]]:
    """``count`` transfers between random accounts, framed by the attempt's marker row.

    The marker is inserted first (``done = 0``) and flagged last (``done = 1``): a committed
    prefix would show as ``done = 0`` or as balances off the expected ones.
    """
    rng = random.Random(attempt)
    statements: list[dict[str, Any]] = [
        {"sql": "INSERT INTO attempts(id, done) VALUES (?, 0)", "params": [attempt]}
    ]
    delta: Counter[int] = Counter()
    for _ in range(count):
        src, dst = rng.sample(range(1, ACCOUNTS + 1), 2)
        amount = rng.randint(1, 50)
        statements.append(
            {
                "sql": "UPDATE accounts SET balance = balance - :amount WHERE id + 0 = :id",
                "params": {"amount": amount, "id": src},
            }
        )
        statements.append(
            {
                "sql": "UPDATE accounts SET balance = balance + ? WHERE id + 0 = ?",
                "params": [amount, dst],
            }
        )
        delta[src] -= amount
        delta[dst] += amount
    statements.append({"sql": "UPDATE attempts SET done = 1 WHERE id = ?", "params": [attempt]})
    return statements, delta


def fingerprint(balances: dict[int, int]) -> list[int]:
    return [
        len(balances),
        sum(balances.values()),
        sum(b * i for i, b in balances.items()),
        sum(b * (i % 101) * (i % 103) for i, b in balances.items()),
    ]


@dataclass
class Bank:
    """What the test knows is committed; ``outcome`` checks a database against it."""

    balances: dict[int, int] = field(
        default_factory=lambda: dict.fromkeys(range(1, ACCOUNTS + 1), START_BALANCE)
    )
    attempts: dict[int, int] = field(default_factory=dict)

    def outcome(self, seen: Seen, attempt: int, delta: Counter[int]) -> str:
        """'committed' (whole) or 'rolled back' (entirely); AssertionError for anything else."""
        fp, attempts = seen
        assert fp[1] == TOTAL, f"the total balance is {fp[1]}, not {TOTAL}"
        others = {k: v for k, v in attempts.items() if k != attempt}
        assert others == self.attempts, "another attempt's marker changed"
        if attempt not in attempts:
            assert fp == fingerprint(self.balances), "no marker, but the balances changed"
            return "rolled back"
        assert attempts[attempt] == 1, "the marker was committed without the last statement"
        expected = {k: v + delta.get(k, 0) for k, v in self.balances.items()}
        assert fp == fingerprint(expected), "the marker was committed, but not every transfer"
        self.balances = expected
        self.attempts[attempt] = 1
        return "committed"


async def mcp_seen(client: Client) -> Seen:
    t = T(client, Path(), "")
    [fp] = await t.rows(FINGERPRINT_SQL)
    attempts = (await t.query("SELECT id, done FROM attempts", maxRows=100_000))["rows"]
    return list(fp), {r[0]: r[1] for r in attempts}


def disk_seen(path: Path) -> Seen:
    [fp] = disk(path, FINGERPRINT_SQL)
    return list(fp), dict(disk(path, "SELECT id, done FROM attempts"))  # type: ignore[arg-type]


async def integrity_ok(client: Client) -> None:
    t = T(client, Path(), "")
    assert await t.rows("PRAGMA integrity_check") == [["ok"]]
    assert await t.rows("SELECT sum(balance) FROM accounts") == [[TOTAL]]


async def timed_ok(client: Client, tool: str, args: dict[str, Any]) -> float:
    """The call succeeds; returns how long it took."""
    start = time.monotonic()
    result = await client.call_tool(tool, args)
    elapsed = time.monotonic() - start
    assert not result.is_error, text_of(result)
    return elapsed


async def next_calls_served(client: Client) -> float:
    """A write (it needs the aborted transaction's lock) and a read, each served at once."""
    elapsed = max(
        await timed_ok(client, "db_execute", PING),
        await timed_ok(client, "db_query", {"database": DB, "sql": "SELECT 1"}),
    )
    assert elapsed < NEXT_CALL_LIMIT, f"the next call took {elapsed:.3f} s"
    return elapsed


@dataclass(frozen=True)
class Timing:
    first_progress: float
    """When the first batch of statements had run: SQLite's work began about 20 ms before."""
    end: float


async def calibrate(client: Client, bank: Bank, seen: Callable[[], Awaitable[Seen]]) -> Timing:
    """Run the long transaction once uncancelled (it must commit) and time its phases."""
    statements, delta = transfers(1, TRANSFERS)
    log = ProgressLog()
    result = await client.call_tool(
        "db_transaction", {"database": DB, "statements": statements}, progress_callback=log
    )
    end = time.monotonic() - log.start
    assert not result.is_error, text_of(result)
    assert result.structured_content is not None
    assert result.structured_content["statements"] == len(statements)
    assert bank.outcome(await seen(), 1, delta) == "committed"
    await log.complete()
    assert log.first_at is not None
    return Timing(log.first_at, end)


def cancel_delays(timing: Timing) -> list[float]:
    """Before the tool starts, evenly through the SQLite work, and around the commit."""
    work_start = max(timing.first_progress - 0.02, 0.0)
    span = timing.end - work_start
    return [0.0, 0.002, 0.01, work_start / 2] + [
        work_start + span * f for f in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.3)
    ]


AFTER_PROGRESS = [0.0, 0.005, 0.02, 0.05, 0.1, 0.2]
"""Cancels timed from the first progress notification: sure to land while statements run."""


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    mid_transaction: int = 0
    slowest_next_call: float = 0.0


@dataclass
class Attempt:
    """One long db_transaction, tracked by its progress notifications."""

    attempt: int
    statements: list[dict[str, Any]] = field(init=False)
    delta: Counter[int] = field(init=False)
    started: int = 0
    """Statements done, as the progress notifications so far said."""
    began: anyio.Event = field(default_factory=anyio.Event)
    result: CallToolResult | None = None

    def __post_init__(self) -> None:
        self.statements, self.delta = transfers(self.attempt, TRANSFERS)

    async def on_progress(self, progress: float, _total: float | None, _m: str | None) -> None:
        self.started = max(self.started, int(progress))
        self.began.set()

    async def run(self, client: Client) -> None:
        self.result = await client.call_tool(
            "db_transaction",
            {"database": DB, "statements": self.statements},
            progress_callback=self.on_progress,
        )

    async def cancelled(self, client: Client, delay: float, *, from_progress: bool) -> bool:
        """Run it under ``move_on_after(delay)``, the delay counted from the call or from the
        first progress notification; returns whether the cancel was caught."""
        with anyio.move_on_after(30 if from_progress else delay) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.run, client)
                if from_progress:
                    await self.began.wait()
                    scope.deadline = min(scope.deadline, anyio.current_time() + delay)
        return scope.cancelled_caught


async def cancel_campaign(client: Client, label: str) -> None:
    """Cancel long transactions at many moments, then a long query; check after every cancel."""
    bank = Bank()
    timing = await calibrate(client, bank, lambda: mcp_seen(client))
    tally = Tally()
    pings = 0
    plan = [(d, False) for d in cancel_delays(timing)] + [(d, True) for d in AFTER_PROGRESS]
    for i, (delay, from_progress) in enumerate(plan):
        run = Attempt(100 + i)
        caught = await run.cancelled(client, delay, from_progress=from_progress)
        started = run.started
        where = f"{label}, cancel {'after progress +' if from_progress else 'at'} {delay:.3f} s"
        if not caught:
            assert run.result is not None, where
            assert not run.result.is_error, f"{where}: {text_of(run.result)}"
        try:
            tally.slowest_next_call = max(tally.slowest_next_call, await next_calls_served(client))
            pings += 1
            kind = bank.outcome(await mcp_seen(client), run.attempt, run.delta)
            await integrity_ok(client)
        except AssertionError as err:
            raise AssertionError(f"{where} ({started} statements done): {err}") from err
        if not caught:
            assert kind == "committed", where
        tally.outcomes[kind] += 1
        if kind == "rolled back" and 0 < started < len(run.statements):
            tally.mid_transaction += 1

    # A query that would run for many seconds, cancelled after 50 ms, again and again (more
    # times than there are pooled readers): each one stops, and the next call is not delayed.
    for _ in range(6):
        start = time.monotonic()
        with anyio.move_on_after(0.05) as scope:
            await client.call_tool("db_query", {"database": DB, "sql": LONG_QUERY})
        assert scope.cancelled_caught, f"{label}: the long query was not cancelled"
        elapsed = time.monotonic() - start
        assert elapsed < NEXT_CALL_LIMIT, f"{label}: the cancel itself took {elapsed:.3f} s"
        tally.slowest_next_call = max(tally.slowest_next_call, await next_calls_served(client))
        pings += 1
    # One long write statement: the writer's statement is stopped too (else the next write would
    # wait for its lock), and nothing of it is committed (the ping count says so).
    for _ in range(3):
        start = time.monotonic()
        with anyio.move_on_after(0.05) as scope:
            await client.call_tool("db_execute", {"database": DB, "sql": LONG_WRITE})
        assert scope.cancelled_caught, f"{label}: the long write was not cancelled"
        elapsed = time.monotonic() - start
        assert elapsed < NEXT_CALL_LIMIT, f"{label}: the cancel itself took {elapsed:.3f} s"
        tally.slowest_next_call = max(tally.slowest_next_call, await next_calls_served(client))
        pings += 1
    await integrity_ok(client)
    assert await T(client, Path(), "").rows("SELECT pings FROM meta") == [[pings]]
    assert bank.outcome(await mcp_seen(client), 0, Counter()) == "rolled back"

    print(
        f"\n{label}: {len(plan)} transaction cancels (uncancelled: {timing.end * 1000:.0f} ms, "
        f"SQLite from ~{max(timing.first_progress - 0.02, 0) * 1000:.0f} ms): "
        f"{dict(tally.outcomes)}, {tally.mid_transaction} mid-transaction; 6 query and 3 write "
        f"cancels; slowest next call {tally.slowest_next_call * 1000:.0f} ms"
    )
    assert tally.mid_transaction >= 4, f"{label}: too few cancels landed mid-transaction"


@pytest.mark.parametrize("mode", MODES)
async def test_cancel_in_memory(mode: str, root: Path) -> None:
    bank_setup(root / "main.db")
    async with connect(memory_server(root), mode) as client:
        await cancel_campaign(client, f"memory/{mode}")


@pytest.mark.parametrize("mode", MODES)
async def test_cancel_stdio(mode: str, root: Path) -> None:
    bank_setup(root / "main.db")
    async with connect(stdio_server(root), mode) as client:
        await cancel_campaign(client, f"stdio/{mode}")


@pytest.mark.parametrize("mode", MODES)
async def test_stdio_tool_timeout(mode: str, root: Path) -> None:
    bank_setup(root / "main.db")
    bank = Bank()
    async with connect(stdio_server(root, "--tool-timeout", "0.05"), mode) as client:
        for attempt in range(1, 4):
            statements, delta = transfers(attempt, TRANSFERS)
            result = await client.call_tool(
                "db_transaction", {"database": DB, "statements": statements}
            )
            message = text_of(result)
            assert result.is_error, message
            assert "timed out" in message, message
            assert not TRACEBACK_MARKERS.search(message), message
            assert bank.outcome(await mcp_seen(client), attempt, delta) == "rolled back"
            await integrity_ok(client)
            small, delta = transfers(100 + attempt, 2)
            args = {"database": DB, "statements": small}
            assert await timed_ok(client, "db_transaction", args) < NEXT_CALL_LIMIT
            assert bank.outcome(await mcp_seen(client), 100 + attempt, delta) == "committed"
        for tool, sql in [("db_query", LONG_QUERY), ("db_execute", LONG_WRITE)]:
            start = time.monotonic()
            result = await client.call_tool(tool, {"database": DB, "sql": sql})
            assert time.monotonic() - start < NEXT_CALL_LIMIT
            assert result.is_error, text_of(result)
            assert "timed out" in text_of(result), text_of(result)
            await next_calls_served(client)
        # One ping after each timed-out call; none of the long write's 10^8.
        assert await T(client, Path(), "").rows("SELECT pings FROM meta") == [[2]]
        await integrity_ok(client)


# -- SIGKILL of the server process during transactions --------------------------------------------


def child_pid_with_arg(arg: str) -> int:
    """Our child process with ``arg`` among its arguments (found through /proc)."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == me and arg.encode() in cmdline:
            return int(entry)
    raise AssertionError(f"no child process with {arg!r}")


@dataclass
class Server:
    """One ``atomictools serve`` process, connected by a task that holds the client open."""

    marker: str
    """An argument only this server has (its --root): finds its pid."""
    ready: anyio.Event = field(default_factory=anyio.Event)
    stop: anyio.Event = field(default_factory=anyio.Event)
    killed: bool = False
    client: Client | None = None
    pid: int = 0

    async def hold(self, params: StdioServerParameters) -> None:
        try:
            async with Client(params, mode="legacy") as client:
                self.client = client
                self.pid = child_pid_with_arg(self.marker)
                self.ready.set()
                await self.stop.wait()
        except* MCPError:  # "Connection closed": expected once the process is killed
            if not self.killed:
                raise

    async def live(self) -> Client:
        with anyio.fail_after(60):
            await self.ready.wait()
        assert self.client is not None
        return self.client

    def kill(self) -> None:
        self.killed = True
        os.kill(self.pid, signal.SIGKILL)


async def run_until_killed(run: Attempt, client: Client) -> None:
    with contextlib.suppress(MCPError):  # "Connection closed": the server was killed
        await run.run(client)


def sigkill_rounds() -> int:
    return int(os.environ.get("ATOMICTOOLS_DB_SIGKILL_ROUNDS", "20"))


async def test_sigkill_server_during_transactions(tmp_path: Path) -> None:
    """Kill the real server at random moments of long transactions; check with plain sqlite3.

    Each round: the server started after the last kill must serve a small db_transaction; then
    a long one starts and the server gets SIGKILL, at a random moment after the call (even
    rounds) or after its first progress notification (odd rounds: surely mid-transaction).
    The next server starts while a round runs, so its start-up does not add to the round.
    """
    db = tmp_path / "bank.db"
    bank_setup(db)
    bank = Bank()
    rounds = sigkill_rounds()
    seed = int(os.environ.get("ATOMICTOOLS_DB_SIGKILL_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    tally: Counter[str] = Counter()
    problems: list[str] = []

    async with anyio.create_task_group() as tg:

        def spawn(k: int) -> Server:
            server_root = tmp_path / f"server{k}"
            server_root.mkdir()
            server = Server(marker=str(server_root))
            args = ["-m", "atomictools", "serve", "--root", str(server_root), "--db", f"{DB}={db}"]
            tg.start_soon(
                server.hold,
                StdioServerParameters(command=sys.executable, args=args, env=state_env()),
            )
            return server

        async def small_transaction(server: Server, attempt: int) -> None:
            client = await server.live()
            small, delta = transfers(attempt, 2)
            result = await client.call_tool("db_transaction", {"database": DB, "statements": small})
            assert not result.is_error, f"attempt {attempt}: {text_of(result)}"
            assert bank.outcome(disk_seen(db), attempt, delta) == "committed"

        current = spawn(0)

        async def seen_on_disk() -> Seen:
            return disk_seen(db)

        timing = await calibrate(await current.live(), bank, seen_on_disk)
        work_start = max(timing.first_progress - 0.02, 0.0)

        for k in range(rounds):
            following = spawn(k + 1)
            await small_transaction(current, 10_000 + k)
            run = Attempt(100 + k)
            with anyio.fail_after(30):
                async with anyio.create_task_group() as round_tg:
                    round_tg.start_soon(run_until_killed, run, await current.live())
                    if k % 2 == 0:
                        delay = rng.uniform(0.0, timing.end * 1.1)
                        how = f"{delay * 1000:.0f} ms after the call"
                    else:
                        with anyio.move_on_after(timing.end * 3):
                            await run.began.wait()
                        delay = rng.uniform(0.0, timing.end - work_start)
                        how = f"{delay * 1000:.0f} ms after the first progress"
                    await anyio.sleep(delay)
                    current.kill()
            current.stop.set()
            started = run.started

            try:
                assert disk(db, "PRAGMA integrity_check") == [("ok",)]
                kind = bank.outcome(disk_seen(db), run.attempt, run.delta)
                if run.result is not None:
                    assert kind == "committed", "answered, but not committed"
            except (AssertionError, sqlite3.Error) as err:
                problems.append(f"round {k}, killed {how} ({started} statements done): {err}")
                tally["violations"] += 1
                # Go on from what the database holds, so one violation is counted once.
                bank.balances = dict(disk(db, "SELECT id, balance FROM accounts"))  # type: ignore[arg-type]
                bank.attempts = dict(disk(db, "SELECT id, done FROM attempts"))  # type: ignore[arg-type]
            else:
                tally[kind] += 1
                if kind == "rolled back" and started > 0:
                    tally["mid-transaction"] += 1
            current = following

        # The server started after the last kill serves the next db_transaction too.
        await small_transaction(current, 20_000)
        current.stop.set()

    print(
        f"\nSIGKILL during db_transaction: {rounds} rounds (seed {seed}; uncancelled "
        f"{timing.end * 1000:.0f} ms): {tally['committed']} committed, {tally['rolled back']} "
        f"rolled back ({tally['mid-transaction']} killed mid-transaction), "
        f"{tally['violations']} invariant violations"
    )
    assert not problems, "\n".join(problems)
    assert disk(db, "SELECT sum(balance) FROM accounts") == [(TOTAL,)]
    assert tally["mid-transaction"] >= min(3, rounds // 4), tally
