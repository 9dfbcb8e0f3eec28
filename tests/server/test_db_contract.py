"""The database tools' shared contract, run against both backends: SQLite and PostgreSQL.

Every ``backend`` test runs twice, once on a SQLite file and once on a fresh PostgreSQL
database (``tests/pgserver.py``), through the real MCP tools of an in-memory server
(``Client(create_server(...), mode="legacy")``). What a call committed is read back
independently: plain ``sqlite3`` for SQLite, a plain sync psycopg connection as the role
``app`` for PostgreSQL. The password reaches the code under test only through PGPASSWORD.

* The five tools: db_list, db_schema (objects, columns, our own tables hidden, one table,
  unknown names), db_query (list and object params, maxRows, NULLs, blobs both ways, numbers,
  unicode), db_execute (rowcount), db_transaction (all or nothing, the failing statement named,
  progress), idempotency keys.
* What is refused before it runs (transaction control, several statements in one string, and
  on PostgreSQL role changes, RESET ALL, COPY, DO, set_config('role')), writes through db_query
  (on PostgreSQL also a write hidden in a function, which fails inside PostgreSQL), and a
  read-only server.
* Cancellation of a long statement at a few delays and the tool deadline: nothing committed,
  the next call served at once, and on PostgreSQL no statement left running
  (``pg_stat_activity``).
* PostgreSQL only: a URL with a password is refused (and the password not echoed, also by
  the CLI), a superuser (or a member of one) is refused unless ``allow_superuser``, an
  idempotency key is honoured by a second server on the same database, session state set
  inside a function does not outlive the call, types JSON lacks come back exact, and one
  session over real stdio (``atomictools serve --db main=postgresql://...``, PGPASSWORD in the
  child's environment, never in its argv).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import decimal
import json
import os
import secrets
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from mcp import Client, StdioServerParameters
from mcp.types import CallToolResult

from atomictools import Workspace
from atomictools.server import ServerOptions, create_server
from atomictools.server.models import (
    DbListOutput,
    DbSchemaOutput,
)
from tests.pgserver import PgDatabase

from .dbcalls import COMMITTED_NOTHING, DB, DbCalls, ProgressLog
from .helpers import TRACEBACK_MARKERS, connect, state_env, text_of

pytestmark = pytest.mark.anyio

OWNS_TRANSACTION = "the tool owns the transaction"
NEXT_CALL_LIMIT = 2.0
"""Seconds the first calls after a cancel may take (two busy cores): they must not wait for
the aborted statement, which would run for many seconds."""
STOP_LIMIT = 1.5
"""Seconds a cancelled PostgreSQL statement may go on running: the cancel request is sent at
once (without it, the server would notice the dropped connection only after about 3 s)."""
UNICODE = "héllo ✓ 🚀 'quoted' \"double\" ; DROP TABLE x; -- 日本語 Ωμέγα"
BLOB = bytes(range(256)) * 3


@pytest.fixture
def anyio_backend() -> str:
    # psycopg's async connections and aiosqlite both hand results back through asyncio.
    return "asyncio"


def b64(data: bytes) -> dict[str, str]:
    return {"$blob": base64.b64encode(data).decode("ascii")}


# -- the two backends -----------------------------------------------------------------------


@dataclass
class Backend:
    """One database to serve as ``main``, its dialect, and an independent view of it."""

    kind: str
    root: Path
    target: str
    """What ``--db main=...`` names: a file path, or a postgresql:// URL without password."""
    pg: PgDatabase | None = None

    @property
    def is_pg(self) -> bool:
        return self.pg is not None

    @property
    def secret(self) -> str | None:
        return self.pg.password if self.pg is not None else None

    @property
    def blob(self) -> str:
        return "BYTEA" if self.is_pg else "BLOB"

    @property
    def real(self) -> str:
        return "DOUBLE PRECISION" if self.is_pg else "REAL"

    @property
    def long_query(self) -> str:
        """One read that would run for many seconds."""
        if self.is_pg:
            return "SELECT pg_sleep(5)"
        return (
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 100000000) "
            "SELECT count(*) FROM c"
        )

    def long_write(self, table: str) -> str:
        """One write that would run for many seconds, and then insert the value 99."""
        if self.is_pg:
            return f"INSERT INTO {table}(v) SELECT 99 FROM pg_sleep(5)"
        return (
            f"INSERT INTO {table}(v) SELECT 99 + 0 * count(*) FROM (WITH RECURSIVE c(x) AS "
            "(SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 100000000) SELECT x FROM c)"
        )

    def slow_write(self, table: str) -> str:
        """About 60 ms of database work: longer than one of the engines' statement batches."""
        if self.is_pg:
            return f"INSERT INTO {table}(v) SELECT 1 FROM pg_sleep(0.06)"
        return (
            f"INSERT INTO {table}(v) SELECT count(*) FROM (WITH RECURSIVE c(x) AS (SELECT 1 "
            "UNION ALL SELECT x + 1 FROM c WHERE x < 300000) SELECT x FROM c)"
        )

    def server(
        self,
        *,
        read_only: bool = False,
        options: ServerOptions | None = None,
    ) -> Any:
        workspace = Workspace([self.root], read_only=read_only)
        return create_server(workspace, options, databases={DB: self.target})

    # independent of the code under test

    def fetch(self, sql: str) -> list[tuple[Any, ...]]:
        """Read what is committed, from outside the server."""
        if self.pg is not None:
            with self.pg.connect() as conn:
                return list(conn.execute(sql).fetchall())
        with contextlib.closing(sqlite3.connect(self.target)) as conn:
            return conn.execute(sql).fetchall()

    async def afetch(self, sql: str) -> list[tuple[Any, ...]]:
        """``fetch`` off the event loop (the in-memory server shares it)."""
        return await anyio.to_thread.run_sync(self.fetch, sql)

    def run(self, *statements: str) -> None:
        """Set up, from outside the server, in one committed transaction."""
        if self.pg is not None:
            with self.pg.connect() as conn:
                for sql in statements:
                    conn.execute(sql)
            return
        with contextlib.closing(sqlite3.connect(self.target)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            for sql in statements:
                conn.execute(sql)
            conn.commit()

    def our_tables(self) -> list[str]:
        if self.is_pg:
            sql = "SELECT tablename FROM pg_tables WHERE tablename LIKE 'atomictools%'"
        else:
            sql = "SELECT name FROM sqlite_master WHERE name LIKE 'atomictools%'"
        return sorted(str(r[0]) for r in self.fetch(sql))

    async def running(self, fragment: str) -> list[tuple[Any, ...]]:
        """PostgreSQL: the backends of role app still busy with a statement containing
        ``fragment`` (not idle: running, or holding a transaction open)."""
        return await self.afetch(
            "SELECT pid, state, query FROM pg_stat_activity WHERE datname = current_database() "
            f"AND usename = 'app' AND state <> 'idle' AND query LIKE '%{fragment}%' "
            "AND pid <> pg_backend_pid()"
        )

    async def statement_stopped(self, fragment: str, where: str) -> None:
        """PostgreSQL: within STOP_LIMIT seconds, no backend of ours runs it any more."""
        if not self.is_pg:
            return
        deadline = time.monotonic() + STOP_LIMIT
        while busy := await self.running(fragment):
            assert time.monotonic() < deadline, f"{where}: still running: {busy}"
            await anyio.sleep(0.05)


def make_backend(kind: str, tmp_path: Path, pg: PgDatabase | None = None) -> Backend:
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    if pg is None:
        return Backend(kind, root, str(root / "main.db"))
    return Backend(kind, root, pg.dsn, pg)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Backend:
    if request.param == "sqlite":
        return make_backend("sqlite", tmp_path)
    pg: PgDatabase = request.getfixturevalue("pg_database")
    monkeypatch.setenv("PGPASSWORD", pg.password)
    return make_backend("postgres", tmp_path, pg)


@pytest.fixture
def pg_backend(pg_database: PgDatabase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Backend:
    monkeypatch.setenv("PGPASSWORD", pg_database.password)
    return make_backend("postgres", tmp_path, pg_database)


# -- calling the tools ----------------------------------------------------------------------


class Tools(DbCalls):
    """A connected client and its backend: calls that must succeed, or fail clearly; every
    text it receives is kept, and none may hold the password."""

    exact_fields = False

    def __init__(self, client: Client, b: Backend) -> None:
        super().__init__(client)
        self.b = b
        self.texts: list[str] = []

    async def call(self, tool: str, args: dict[str, Any], **kw: Any) -> CallToolResult:
        result = await self.client.call_tool(tool, args, **kw)
        text = text_of(result)
        self.texts.append(text)
        if self.b.secret is not None:
            assert self.b.secret not in text, f"{tool} showed the password: {text}"
            assert self.b.secret not in repr(result.structured_content)
        return result

    async def next_calls_served(self, table: str) -> None:
        """A write (it needs what an aborted call held) and a read, each served at once."""
        start = time.monotonic()
        out = await self.execute(f"INSERT INTO {table}(v) VALUES (1)")
        assert out["rowcount"] == 1
        assert await self.rows("SELECT 1") == [[1]]
        elapsed = time.monotonic() - start
        assert elapsed < NEXT_CALL_LIMIT, f"the next calls took {elapsed:.3f} s"


@asynccontextmanager
async def served(b: Backend, **kw: Any) -> AsyncIterator[Tools]:
    async with connect(b.server(**kw), "legacy") as client:
        yield Tools(client, b)


# -- db_list, db_schema -----------------------------------------------------------------------


async def test_db_list_shows_the_configured_database(backend: Backend) -> None:
    async with served(backend) as t:
        out = await t.ok("db_list", {}, DbListOutput)
        assert out["databases"] == [{"name": DB, "path": backend.target, "configured": True}]
        assert f"{DB} ({backend.target})" in t.texts[-1]
        # The name db_list gave is usable.
        assert await t.rows("SELECT 2") == [[2]]


async def test_schema_lists_objects_hides_ours_and_describes_one(backend: Backend) -> None:
    async with served(backend) as t:
        await t.transaction(
            "CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT NOT NULL DEFAULT 'x', "
            f"price {backend.real}, data {backend.blob})",
            "CREATE TABLE notes(body TEXT)",
            "CREATE INDEX items_name ON items(name)",
            "CREATE VIEW cheap AS SELECT id, name FROM items WHERE price < 10",
        )
        # An idempotency key makes our own table in the database: it exists, and is hidden.
        await t.execute("INSERT INTO notes(body) VALUES ('keyed')", idempotencyKey="schema-1")
        assert "atomictools_idempotency" in backend.our_tables()

        out = await t.ok("db_schema", {"database": DB}, DbSchemaOutput)
        assert out["database"] == DB
        objects = {o["name"]: o for o in out["objects"]}
        kinds = {"items": "table", "notes": "table", "items_name": "index", "cheap": "view"}
        assert {n: objects[n]["type"] for n in kinds if n in objects} == kinds, sorted(objects)
        assert not [n for n in objects if n.startswith("atomictools")], sorted(objects)
        assert [c["name"] for c in objects["items"]["columns"]] == ["id", "name", "price", "data"]
        assert [c["name"] for c in objects["cheap"]["columns"]] == ["id", "name"]
        assert objects["items_name"].get("columns") is None
        assert "items" in objects["items_name"]["sql"]
        assert "price" in objects["cheap"]["sql"]
        assert "atomictools" not in t.texts[-1]

        out = await t.ok("db_schema", {"database": DB, "table": "items"}, DbSchemaOutput)
        [table] = out["objects"]
        assert (table["name"], table["type"]) == ("items", "table")
        columns = {c["name"]: c for c in table["columns"]}
        assert [c["name"] for c in table["columns"]] == ["id", "name", "price", "data"]
        assert columns["id"]["type"].lower() == "integer"
        assert columns["name"]["type"].lower() == "text"
        assert (columns["name"]["notNull"], columns["price"]["notNull"]) == (True, False)
        assert "'x'" in columns["name"]["default"]
        assert columns["price"]["default"] is None

        out = await t.ok("db_schema", {"database": DB, "table": "cheap"}, DbSchemaOutput)
        [view] = out["objects"]
        assert (view["name"], view["type"]) == ("cheap", "view")
        assert [c["name"] for c in view["columns"]] == ["id", "name"]

        for unknown in [
            "nowhere",
            "items_name",  # an index is not a table or view
            "items; DROP TABLE items",
            "items' OR '1'='1",
        ]:
            message = await t.err(
                "db_schema", {"database": DB, "table": unknown}, "no table or view named"
            )
            assert repr(unknown) in message or unknown in message
        assert backend.fetch("SELECT body FROM notes") == [("keyed",)]
        assert backend.fetch("SELECT count(*) FROM items") == [(0,)]


async def test_schema_gives_primary_key_positions(
    backend: Backend,
) -> None:
    """primaryKey: the column's 1-based position in the primary key, 0 when not in it."""
    async with served(backend) as t:
        await t.execute("CREATE TABLE single(id INTEGER PRIMARY KEY, v TEXT)")
        await t.execute("CREATE TABLE pair(a INTEGER, b TEXT, c INTEGER, PRIMARY KEY (c, a))")
        out = await t.ok("db_schema", {"database": DB, "table": "single"}, DbSchemaOutput)
        assert [c["primaryKey"] for c in out["objects"][0]["columns"]] == [1, 0]
        out = await t.ok("db_schema", {"database": DB, "table": "pair"}, DbSchemaOutput)
        assert [c["primaryKey"] for c in out["objects"][0]["columns"]] == [2, 0, 1]


async def test_our_tables_are_not_described_by_name(
    backend: Backend,
) -> None:
    """Hidden from the listing, and not described by name either: the same on both."""
    async with served(backend) as t:
        await t.execute("CREATE TABLE notes(body TEXT)")
        await t.execute("INSERT INTO notes(body) VALUES ('keyed')", idempotencyKey="hide-1")
        assert "atomictools_idempotency" in backend.our_tables()
        await t.err(
            "db_schema",
            {"database": DB, "table": "atomictools_idempotency"},
            "no table or view named",
        )


# -- db_query -------------------------------------------------------------------------------


async def test_query_values_params_and_max_rows(backend: Backend) -> None:
    async with served(backend) as t:
        await t.execute(
            f"CREATE TABLE vals(id INTEGER PRIMARY KEY, i BIGINT, f {backend.real}, t TEXT, "
            f"b {backend.blob})"
        )
        rows: list[list[Any]] = [
            [1, 42, 3.25, UNICODE, b64(BLOB)],
            [2, -7, -1e-300, "", b64(b"")],
            [3, 2**62 + 1, 0.1, "日本語", b64(b"\x00")],
            [4, None, None, None, None],
        ]
        for row in rows[:2]:  # list params
            out = await t.execute("INSERT INTO vals(id, i, f, t, b) VALUES (?, ?, ?, ?, ?)", row)
            assert (out["rowcount"], out["committed"]) == (1, True)
        for row in rows[2:]:  # object params
            named = dict(zip(["id", "i", "f", "t", "b"], row, strict=True))
            out = await t.execute(
                "INSERT INTO vals(id, i, f, t, b) VALUES (:id, :i, :f, :t, :b)", named
            )
            assert (out["rowcount"], out["committed"]) == (1, True)

        out = await t.query("SELECT id, i, f, t, b FROM vals ORDER BY id")
        assert out["columns"] == ["id", "i", "f", "t", "b"]
        assert out["rows"] == rows
        assert (out["rowCount"], out["truncated"]) == (4, False)
        # Stored as real bytes and text, not as the base64 or any escaped form.
        assert backend.fetch("SELECT b, t FROM vals WHERE id = 1") == [(BLOB, UNICODE)]
        assert backend.fetch("SELECT b FROM vals WHERE id = 2") == [(b"",)]
        assert backend.fetch("SELECT i FROM vals WHERE id = 3") == [(2**62 + 1,)]
        assert backend.fetch("SELECT count(*) FROM vals WHERE i IS NULL AND b IS NULL") == [(1,)]

        # Parameters in both forms, a blob parameter, a NULL parameter, unicode.
        assert await t.rows("SELECT id FROM vals WHERE b = ?", [b64(BLOB)]) == [[1]]
        assert await t.rows("SELECT id FROM vals WHERE b = :b", {"b": b64(b"\x00")}) == [[3]]
        assert await t.rows(
            "SELECT id FROM vals WHERE t = :t AND i = :i", {"t": "日本語", "i": 2**62 + 1}
        ) == [[3]]
        assert await t.rows("SELECT id FROM vals WHERE id IN (?, ?) ORDER BY id", [4, 2]) == [
            [2],
            [4],
        ]
        assert await t.rows("SELECT count(*) FROM vals WHERE t = ?", [None]) == [[0]]
        assert await t.rows("SELECT t FROM vals WHERE t = :u", {"u": UNICODE}) == [[UNICODE]]
        same = await t.rows("SELECT ? AS a, ? AS b, ? AS c", [1, 2.5, UNICODE])
        assert same == [[1, 2.5, UNICODE]]

        # maxRows: exactly that many rows, and `truncated` when more exist.
        for max_rows, truncated in [(1, True), (3, True), (4, False), (100, False)]:
            out = await t.query("SELECT id FROM vals ORDER BY id", maxRows=max_rows)
            count = min(max_rows, 4)
            assert out["rows"] == [[i] for i in range(1, count + 1)]
            assert (out["rowCount"], out["truncated"]) == (count, truncated)
        out = await t.query("SELECT id FROM vals WHERE id > 1000")
        assert out == {"columns": ["id"], "rows": [], "truncated": False, "rowCount": 0}

        base = {"database": DB, "sql": "SELECT id FROM vals WHERE id = ?"}
        await t.err("db_query", {**base, "params": [1], "maxRows": 0}, "maxRows")
        await t.err("db_query", {**base, "params": [{"$blob": "not base64!"}]}, "base64")
        await t.err("db_query", {**base, "params": [1, 2]}, "param")
        await t.err("db_query", {"database": DB, "sql": "SELEC 1"}, "syntax error")
        await t.err("db_query", {"database": DB, "sql": "  "}, "empty")
        await t.err("db_query", {"database": "nowhere", "sql": "SELECT 1"}, "nowhere")


async def test_query_refuses_writes(backend: Backend) -> None:
    backend.run("CREATE TABLE kept(v INTEGER)", "INSERT INTO kept VALUES (1)")
    async with served(backend) as t:
        for sql in [
            "INSERT INTO kept VALUES (2)",
            "UPDATE kept SET v = 3",
            "DELETE FROM kept",
            "CREATE TABLE created(v INTEGER)",
            "DROP TABLE kept",
            "WITH gone AS (DELETE FROM kept RETURNING v) SELECT v FROM gone",
            "SELECT 1; DELETE FROM kept",
            "BEGIN",
        ]:
            await t.err("db_query", {"database": DB, "sql": sql})
        assert backend.fetch("SELECT v FROM kept") == [(1,)]
        catalog = "pg_tables WHERE tablename" if backend.is_pg else "sqlite_master WHERE name"
        assert backend.fetch(f"SELECT count(*) FROM {catalog} = 'created'") == [(0,)]
        # A write said plainly is refused with the tool to use instead.
        await t.err("db_query", {"database": DB, "sql": "DELETE FROM kept"}, "db_execute")


async def test_query_write_through_a_function_fails_inside_postgresql(
    pg_backend: Backend,
) -> None:
    b = pg_backend
    b.run(
        "CREATE TABLE t(v INTEGER)",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'INSERT INTO t VALUES (1) RETURNING 1'",
        # A function that first tries to make the transaction writable again.
        "CREATE FUNCTION g() RETURNS int LANGUAGE plpgsql AS $$BEGIN "
        "PERFORM set_config('transaction_read_only', 'off', true); "
        "INSERT INTO t VALUES (2); RETURN 1; END$$",
        "CREATE VIEW sneaky AS SELECT f() AS x",
    )
    objects_before = b.fetch("SELECT count(*) FROM pg_largeobject_metadata")
    async with served(b) as t:
        for sql, fragment in [
            ("SELECT f()", "read-only transaction"),
            ("SELECT x FROM sneaky", "read-only transaction"),
            ("SELECT * FROM (SELECT f()) AS sub", "read-only transaction"),
            ("SELECT g()", "read-write"),
            ("SELECT lo_create(0)", "read-only transaction"),
        ]:
            message = await t.err("db_query", {"database": DB, "sql": sql}, fragment)
            assert sql in message
        assert b.fetch("SELECT count(*) FROM t") == [(0,)]
        assert b.fetch("SELECT count(*) FROM pg_largeobject_metadata") == objects_before
        # The same function through db_execute writes (it is not refused by pattern).
        out = await t.execute("SELECT f()")
        assert out["committed"] is True
        assert b.fetch("SELECT v FROM t") == [(1,)]


# -- db_execute, db_transaction ---------------------------------------------------------------


async def test_execute_reports_rowcount(backend: Backend) -> None:
    async with served(backend) as t:
        out = await t.execute("CREATE TABLE ex(id INTEGER PRIMARY KEY, v TEXT UNIQUE NOT NULL)")
        assert (out["rowcount"], out["committed"]) == (-1, True)
        out = await t.execute("INSERT INTO ex(id, v) VALUES (1, 'a'), (2, 'b'), (3, 'c')")
        assert (out["rowcount"], out["committed"]) == (3, True)
        out = await t.execute("UPDATE ex SET v = v || '!' WHERE id >= ?", [2])
        assert (out["rowcount"], out["committed"]) == (2, True)
        out = await t.execute("UPDATE ex SET v = 'none' WHERE id > :n", {"n": 100})
        assert (out["rowcount"], out["committed"]) == (0, True)
        out = await t.execute("DELETE FROM ex WHERE id = 1")
        assert (out["rowcount"], out["committed"]) == (1, True)
        committed = [(2, "b!"), (3, "c!")]
        assert backend.fetch("SELECT id, v FROM ex ORDER BY id") == committed

        await t.err(
            "db_execute",
            {"database": DB, "sql": "INSERT INTO ex(id, v) VALUES (9, 'b!')"},
            "unique",
            committed_nothing=True,
        )
        await t.err(
            "db_execute",
            {"database": DB, "sql": "INSERT INTO ex(id, v) VALUES (9, NULL)"},
            "null",
            committed_nothing=True,
        )
        # A statement that changes rows before it fails keeps none of them.
        await t.err(
            "db_execute",
            {"database": DB, "sql": "UPDATE ex SET v = 'same'"},
            "unique",
            committed_nothing=True,
        )
        await t.err("db_execute", {"database": DB, "sql": "INSERT INTO ex VALUE"}, "syntax")
        await t.err("db_execute", {"database": DB, "sql": ""}, "empty")
        assert backend.fetch("SELECT id, v FROM ex ORDER BY id") == committed


async def test_transaction_is_all_or_nothing_and_names_the_failure(backend: Backend) -> None:
    async with served(backend) as t:
        await t.execute("CREATE TABLE tx(id INTEGER PRIMARY KEY, v TEXT UNIQUE)")
        out = await t.transaction(
            {"sql": "INSERT INTO tx(id, v) VALUES (?, ?)", "params": [1, "a"]},
            {"sql": "INSERT INTO tx(id, v) VALUES (:id, :v)", "params": {"id": 2, "v": "b"}},
            {"sql": "INSERT INTO tx(id, v) VALUES (?, ?)", "params": [3, b64(b"\x01")]},
            "UPDATE tx SET v = v || '!' WHERE id <= 2",
        )
        assert out["committed"] is True
        assert (out["statements"], out["rowsChanged"]) == (4, 5)
        assert [(r["index"], r["rowcount"]) for r in out["results"]] == [
            (1, 1),
            (2, 1),
            (3, 1),
            (4, 2),
        ]
        committed = backend.fetch("SELECT id, v FROM tx ORDER BY id")
        assert [r[:2] for r in committed][:2] == [(1, "a!"), (2, "b!")]

        n = 4
        failing = {
            "unique": "INSERT INTO tx(id, v) VALUES (50, 'a!')",
            "syntax": "INSERT INTO tx VALUES oops",
            "table": "UPDATE nowhere SET v = 1",
            "refused": "COMMIT",
        }
        for k in range(1, n + 1):
            for kind, bad in failing.items():
                statements: list[dict[str, Any]] = [
                    {"sql": "INSERT INTO tx(id, v) VALUES (?, ?)", "params": [10 * j, f"{kind}{j}"]}
                    for j in range(1, n + 1)
                ]
                statements[k - 1] = {"sql": bad}
                message = await t.err(
                    "db_transaction",
                    {"database": DB, "statements": statements},
                    f"statement {k} of {n}",
                    bad,
                    committed_nothing=True,
                )
                assert f"statement {k} of {n} ({bad})" in message, message
                got = backend.fetch("SELECT id, v FROM tx ORDER BY id")
                assert got == committed, (kind, k)
        await t.err("db_transaction", {"database": DB, "statements": []}, "statements")
        await t.err("db_transaction", {"database": DB, "statements": [{"sql": " "}]}, "empty")
        assert backend.fetch("SELECT id, v FROM tx ORDER BY id") == committed


async def test_transaction_reports_progress(backend: Backend) -> None:
    async with served(backend) as t:
        await t.execute("CREATE TABLE slow(v INTEGER)")
        # Statements that each take longer than a batch: one notification per statement.
        log = ProgressLog()
        out = await t.transaction(*[backend.slow_write("slow")] * 4, progress_callback=log)
        assert out["statements"] == 4
        await log.complete()
        assert log.seen == [(i, 4) for i in range(1, 5)], log.seen

        # Many quick statements: increasing notifications, ending at the total.
        log = ProgressLog()
        n = 600
        out = await t.transaction(
            *[{"sql": "INSERT INTO slow(v) VALUES (?)", "params": [i]} for i in range(n)],
            progress_callback=log,
        )
        assert (out["statements"], out["rowsChanged"]) == (n, n)
        await log.complete()
        assert all(total == n for _, total in log.seen), log.seen
        done = [p for p, _ in log.seen]
        assert done == sorted(set(done)), done
        assert done[0] > 0
        assert done[-1] == n
        assert backend.fetch("SELECT count(*) FROM slow") == [(n + 4,)]


async def test_idempotency_key_applies_once(backend: Backend) -> None:
    async with served(backend) as t:
        await t.execute("CREATE TABLE ledger(id INTEGER PRIMARY KEY, v TEXT)")
        insert = "INSERT INTO ledger(id, v) VALUES (?, ?)"
        first = await t.execute(insert, [1, "once"], idempotencyKey="pay-1")
        assert first["rowcount"] == 1
        again = await t.execute(insert, [1, "once"], idempotencyKey="pay-1")
        assert again == first  # the first result, not a duplicate-key error
        assert backend.fetch("SELECT id, v FROM ledger") == [(1, "once")]

        statements: list[dict[str, Any]] = [
            {"sql": insert, "params": [2, "two"]},
            {"sql": "UPDATE ledger SET v = v || '+' WHERE id <= :id", "params": {"id": 2}},
        ]
        first = await t.transaction(*statements, idempotencyKey="batch-1")
        again = await t.transaction(*statements, idempotencyKey="batch-1")
        assert again == first
        assert first["rowsChanged"] == 3
        assert backend.fetch("SELECT id, v FROM ledger ORDER BY id") == [
            (1, "once+"),
            (2, "two+"),
        ]

        # The same key with other arguments is refused, and nothing runs.
        reuses: list[tuple[str, dict[str, Any]]] = [
            ("db_execute", {"sql": insert, "params": [3, "other"], "idempotencyKey": "pay-1"}),
            ("db_execute", {"sql": insert, "params": [1, "once"], "idempotencyKey": "batch-1"}),
            (
                "db_transaction",
                {"statements": statements[:1], "idempotencyKey": "batch-1"},
            ),
        ]
        for tool, args in reuses:
            await t.err(tool, {"database": DB, **args}, "already used", "idempotencyKey")
        assert backend.fetch("SELECT count(*) FROM ledger") == [(2,)]

        # A call that failed used up nothing: its key row rolled back with it.
        await t.err(
            "db_execute",
            {"database": DB, "sql": insert, "params": [1, "dup"], "idempotencyKey": "pay-2"},
            committed_nothing=True,
        )
        out = await t.execute(insert, [5, "five"], idempotencyKey="pay-2")
        assert out["rowcount"] == 1
        assert backend.fetch("SELECT v FROM ledger WHERE id = 5") == [("five",)]


# -- refused statements, read-only serving -----------------------------------------------------

SHARED_REFUSED = [
    ("BEGIN", OWNS_TRANSACTION),
    ("COMMIT", OWNS_TRANSACTION),
    ("ROLLBACK", OWNS_TRANSACTION),
    ("SAVEPOINT sp", OWNS_TRANSACTION),
    ("RELEASE sp", OWNS_TRANSACTION),
    ("INSERT INTO guarded VALUES ('x'); DELETE FROM guarded", "db_transaction"),
    ("DELETE FROM guarded;DELETE FROM guarded", "db_transaction"),
]
PG_REFUSED = [
    ("START TRANSACTION", OWNS_TRANSACTION),
    ("SET ROLE postgres", "role"),
    ("SET SESSION AUTHORIZATION postgres", "role"),
    ("RESET ALL", "RESET ALL"),
    ("COPY guarded FROM PROGRAM 'id'", "PROGRAM"),
    ("COPY guarded TO PROGRAM 'cat > /tmp/atomictools-copy-out'", "PROGRAM"),
    ("COPY guarded TO STDOUT", "STDOUT"),
    ("DO $$BEGIN DELETE FROM guarded; END$$", "DO"),
    ("SELECT set_config('role', 'postgres', true)", "role"),
    ("SELECT set_config('role', 'postgres', false)", "role"),
]


async def test_refused_statements_change_nothing(backend: Backend) -> None:
    backend.run("CREATE TABLE guarded(v TEXT)", "INSERT INTO guarded VALUES ('kept')")
    refused = SHARED_REFUSED + (PG_REFUSED if backend.is_pg else [])
    async with served(backend) as t:
        for sql, fragment in refused:
            await t.err(
                "db_execute", {"database": DB, "sql": sql}, fragment, committed_nothing=True
            )
            statements = [
                {"sql": "INSERT INTO guarded VALUES ('lost')"},
                {"sql": sql},
                {"sql": "DELETE FROM guarded"},
            ]
            await t.err(
                "db_transaction",
                {"database": DB, "statements": statements},
                "statement 2 of 3",
                fragment,
                committed_nothing=True,
            )
            # db_query refuses it too (SQLite: as a statement that is not a read).
            message = await t.err("db_query", {"database": DB, "sql": sql})
            assert (fragment if backend.is_pg else "only reads") in message, message
            assert backend.fetch("SELECT v FROM guarded") == [("kept",)], sql
        if backend.is_pg:
            # Still the role it connected as, on every pooled connection.
            assert await t.rows("SELECT current_user, session_user") == [["app", "app"]]
            out = await t.execute("INSERT INTO guarded SELECT current_user")
            assert out["rowcount"] == 1
            assert backend.fetch("SELECT v FROM guarded ORDER BY v") == [("app",), ("kept",)]
            assert not Path("/tmp/atomictools-copy-out").exists()
        # The writer still works, in a transaction of its own.
        await t.transaction("INSERT INTO guarded VALUES ('new')", "DELETE FROM guarded")
        assert backend.fetch("SELECT count(*) FROM guarded") == [(0,)]


async def test_read_only_server_refuses_changes(backend: Backend) -> None:
    backend.run(
        "CREATE TABLE ro(id INTEGER PRIMARY KEY, v TEXT)",
        "INSERT INTO ro(id, v) VALUES (1, 'a'), (2, 'b'), (3, 'c')",
    )
    before = backend.fetch("SELECT id, v FROM ro ORDER BY id")
    async with served(backend, read_only=True) as t:
        listed = {tool.name for tool in (await t.client.list_tools()).tools}
        assert {"db_list", "db_schema", "db_query"} <= listed
        assert not listed & {"db_execute", "db_transaction"}, listed
        assert await t.rows("SELECT id, v FROM ro ORDER BY id") == [list(r) for r in before]
        out = await t.ok("db_schema", {"database": DB, "table": "ro"}, DbSchemaOutput)
        assert [c["name"] for c in out["objects"][0]["columns"]] == ["id", "v"]
        await t.err(
            "db_execute", {"database": DB, "sql": "INSERT INTO ro(v) VALUES ('x')"}, "read-only"
        )
        await t.err(
            "db_execute",
            {"database": DB, "sql": "DELETE FROM ro", "idempotencyKey": "ro-1"},
            "read-only",
        )
        await t.err(
            "db_transaction",
            {"database": DB, "statements": [{"sql": "DELETE FROM ro"}, {"sql": "SELECT 1"}]},
            "read-only",
        )
        await t.err("db_query", {"database": DB, "sql": "DELETE FROM ro"}, "db_execute")
    assert backend.fetch("SELECT id, v FROM ro ORDER BY id") == before
    assert backend.our_tables() == []  # not even the key table was made


# -- cancellation and the tool deadline --------------------------------------------------------

CANCEL_DELAYS = [0.0, 0.05, 0.3]


async def test_cancelling_a_long_statement_leaves_nothing(backend: Backend) -> None:
    async with served(backend) as t:
        await t.execute("CREATE TABLE c(v INTEGER)")
        pings = 0
        calls: list[tuple[str, dict[str, Any]]] = [
            ("db_query", {"sql": backend.long_query}),
            ("db_execute", {"sql": backend.long_write("c")}),
            (
                "db_transaction",
                {
                    "statements": [
                        {"sql": "INSERT INTO c(v) VALUES (7)"},
                        {"sql": backend.long_write("c")},
                    ]
                },
            ),
        ]
        caught = 0
        for delay in CANCEL_DELAYS:
            for tool, args in calls:
                where = f"{tool} cancelled at {delay:.2f} s"
                start = time.monotonic()
                with anyio.move_on_after(delay) as scope:
                    result = await t.client.call_tool(tool, {"database": DB, **args})
                    pytest.fail(f"{where}: it returned: {text_of(result)}")
                caught += scope.cancelled_caught
                elapsed = time.monotonic() - start
                assert elapsed < NEXT_CALL_LIMIT, f"{where}: the cancel took {elapsed:.3f} s"
                await backend.statement_stopped("pg_sleep(5)", where)
                await t.next_calls_served("c")
                pings += 1
                got = await backend.afetch("SELECT v, count(*) FROM c GROUP BY v ORDER BY v")
                assert got == [(1, pings)], f"{where}: {got}"
        assert caught == len(CANCEL_DELAYS) * len(calls)
        if backend.is_pg:
            # Whatever connections the cancels closed, the pools serve every later call.
            out = await t.transaction(*["INSERT INTO c(v) VALUES (1)"] * 3)
            assert out["rowsChanged"] == 3
            assert await backend.running("pg_sleep") == []


async def test_the_tool_deadline_cuts_a_long_statement(backend: Backend) -> None:
    timeout = 1.0
    async with served(backend, options=ServerOptions(tool_timeout=timeout)) as t:
        await t.execute("CREATE TABLE d(v INTEGER)")
        await t.next_calls_served("d")  # connections made, tables known: warm
        calls: list[tuple[str, dict[str, Any]]] = [
            ("db_query", {"sql": backend.long_query}),
            ("db_execute", {"sql": backend.long_write("d")}),
            (
                "db_transaction",
                {
                    "statements": [
                        {"sql": "INSERT INTO d(v) VALUES (7)"},
                        {"sql": backend.long_write("d")},
                    ]
                },
            ),
        ]
        for tool, args in calls:
            start = time.monotonic()
            result = await t.call(tool, {"database": DB, **args})
            elapsed = time.monotonic() - start
            message = text_of(result)
            assert result.is_error, message
            # The tool's deadline, or PostgreSQL's statement_timeout set from it.
            assert "timed out" in message or "deadline" in message, message
            assert COMMITTED_NOTHING in message or "nothing was changed" in message, message
            assert not TRACEBACK_MARKERS.search(message), message
            assert elapsed < timeout + NEXT_CALL_LIMIT, f"{tool}: answered after {elapsed:.3f} s"
            await backend.statement_stopped("pg_sleep(5)", f"{tool} past the deadline")
            await t.next_calls_served("d")
        got = await backend.afetch("SELECT v, count(*) FROM d GROUP BY v ORDER BY v")
        assert got == [(1, 4)], got


# -- PostgreSQL only ------------------------------------------------------------------------


async def test_an_idempotency_key_is_shared_by_two_servers(pg_backend: Backend) -> None:
    """The key lives in the database: a retry that reaches another server applies once."""
    b = pg_backend
    b.run("CREATE TABLE ledger(id INTEGER PRIMARY KEY, v TEXT)")
    insert = "INSERT INTO ledger(id, v) VALUES (?, ?)"
    async with served(b) as first, served(b) as second:
        out = await first.execute(insert, [1, "once"], idempotencyKey="shared-1")
        again = await second.execute(insert, [1, "once"], idempotencyKey="shared-1")
        assert again == out
        other = {"sql": insert, "params": [2, "other"], "idempotencyKey": "shared-1"}
        await second.err("db_execute", {"database": DB, **other}, "already used")
    assert b.fetch("SELECT id, v FROM ledger") == [(1, "once")]


FUNCTION_LEAKS = {
    "search_path": "PERFORM set_config('search_path', 'elsewhere', false)",
    "temp_table": "EXECUTE 'CREATE TEMP TABLE t(v integer)'",
    "advisory_lock": "PERFORM pg_advisory_lock(42)",
}
"""Session state a function can set where the statement guard cannot see it."""


@pytest.mark.parametrize("leak", sorted(FUNCTION_LEAKS))
async def test_session_state_set_in_a_function_does_not_outlive_the_call(
    pg_backend: Backend, leak: str
) -> None:
    b = pg_backend
    b.run(
        "CREATE TABLE t(v integer)",
        "CREATE SCHEMA elsewhere",
        "CREATE TABLE elsewhere.t(v integer)",
        "CREATE FUNCTION leak() RETURNS int LANGUAGE plpgsql AS "
        f"$$BEGIN {FUNCTION_LEAKS[leak]}; RETURN 1; END$$",
    )
    async with served(b) as t:
        assert (await t.execute("SELECT leak()"))["committed"] is True
        for _ in range(3):
            await t.execute("INSERT INTO t(v) VALUES (1)")
        # Later calls write where they say, and hold no lock of the earlier call.
        assert b.fetch("SELECT count(*) FROM elsewhere.t") == [(0,)]
        assert b.fetch("SELECT count(*) FROM public.t") == [(3,)]
        assert b.fetch("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == [(0,)]


async def test_a_session_lock_taken_in_a_query_does_not_outlive_it(pg_backend: Backend) -> None:
    b = pg_backend
    b.run(
        "CREATE FUNCTION locks() RETURNS int LANGUAGE plpgsql AS "
        "$$BEGIN PERFORM pg_advisory_lock(7); RETURN 1; END$$"
    )
    async with served(b) as t:
        assert await t.rows("SELECT locks()") == [[1]]
        assert b.fetch("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == [(0,)]


@pytest.mark.parametrize(
    "shape",
    [
        "postgresql://app:{pw}@127.0.0.1:{port}/{db}",
        "postgres://app:{pw}@localhost:{port}/{db}?sslmode=disable",
        "postgresql://:{pw}@127.0.0.1:{port}/{db}",
    ],
)
def test_a_url_with_a_password_is_refused(
    pg_database: PgDatabase, tmp_path: Path, shape: str
) -> None:
    secret = "S3cret-" + secrets.token_hex(6)
    url = shape.format(pw=secret, port=pg_database.cluster.port, db=pg_database.name)
    with pytest.raises(ValueError, match="carries a password") as caught:
        create_server(Workspace([tmp_path]), databases={DB: url})
    message = str(caught.value)
    assert "PGPASSWORD" in message, message
    assert "passfile" in message, message
    assert secret not in message, message


def test_a_password_in_the_query_string_is_refused_without_echoing_it(
    pg_database: PgDatabase, tmp_path: Path
) -> None:
    secret = "S3cret-" + secrets.token_hex(6)
    url = f"{pg_database.dsn}?password={secret}"
    with pytest.raises(ValueError, match="carries a password") as caught:
        create_server(Workspace([tmp_path]), databases={DB: url})
    message = str(caught.value)
    assert "PGPASSWORD" in message, message
    assert secret not in message, message


async def test_a_superuser_is_refused_unless_allowed(
    pg_database: PgDatabase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = pg_database.cluster
    secret = cluster.password("postgres")
    monkeypatch.setenv("PGPASSWORD", secret)
    url = cluster.dsn(pg_database.name, user="postgres")
    b = Backend("postgres", tmp_path, url, pg_database)

    async def attempt(allow: bool) -> CallToolResult:
        server = create_server(Workspace([tmp_path]), databases={DB: url}, allow_superuser=allow)
        async with connect(server, "legacy") as client:
            return await client.call_tool(
                "db_execute", {"database": DB, "sql": "CREATE TABLE su(v INTEGER)"}
            )

    refused = await attempt(False)
    message = text_of(refused)
    assert refused.is_error, message
    assert "superuser" in message, message
    assert "--allow-superuser" in message, message
    assert secret not in message
    assert b.fetch("SELECT count(*) FROM pg_tables WHERE tablename = 'su'") == [(0,)]

    allowed = await attempt(True)
    assert not allowed.is_error, text_of(allowed)
    assert b.fetch("SELECT count(*) FROM pg_tables WHERE tablename = 'su'") == [(1,)]


async def test_a_member_of_a_superuser_role_is_refused(
    pg_database: PgDatabase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SET ROLE postgres would make it one: refused like the superuser itself."""
    cluster = pg_database.cluster
    role = f"member_{secrets.token_hex(4)}"
    secret = secrets.token_urlsafe(12)
    with cluster.admin() as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER PASSWORD '{secret}' IN ROLE postgres")
    try:
        monkeypatch.setenv("PGPASSWORD", secret)
        url = cluster.dsn(pg_database.name, user=role)
        server = create_server(Workspace([tmp_path]), databases={DB: url})
        async with connect(server, "legacy") as client:
            result = await client.call_tool("db_query", {"database": DB, "sql": "SELECT 1"})
        message = text_of(result)
        assert result.is_error, message
        assert "--allow-superuser" in message, message
    finally:
        with cluster.admin() as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                [role],
            )
            conn.execute(f"DROP ROLE {role}")


PG_VALUES = (
    "SELECT 1.10::numeric AS n, "
    "123456789012345678901234567890.123456789::numeric AS big, "
    "'NaN'::numeric AS nan, "
    "'2024-01-02 03:04:05.123456+00'::timestamptz AS ts, "
    "'2024-02-29'::date AS d, "
    "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AS u, "
    "'1 day 02:03:04.5'::interval AS iv, "
    """'{"a": [1, 2.5, null], "s": "x\u00e9"}'::jsonb AS j, """
    """'{"k": true}'::json AS j2, """
    "ARRAY[1, 2, 3] AS ints, "
    "ARRAY['x', NULL] AS texts, "
    "ARRAY[[1.5, 2.25], [3, 4]]::numeric[] AS grid, "
    "'192.168.0.1/24'::inet AS net, "
    "'Infinity'::float8 AS inf, "
    "9007199254740993::bigint AS big_int, "
    "'\\x00ff'::bytea AS bytes"
)


async def test_postgres_types_come_back_exact(pg_backend: Backend) -> None:
    async with served(pg_backend) as t:
        out = await t.query(PG_VALUES)
        [row] = out["rows"]
        got = dict(zip(out["columns"], row, strict=True))
        assert got["n"] == "1.10"  # the scale kept: not the float 1.1
        assert got["big"] == "123456789012345678901234567890.123456789"
        assert got["nan"] == "NaN"
        instant = dt.datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC)
        assert dt.datetime.fromisoformat(got["ts"]) == instant, got["ts"]
        assert got["d"] == "2024-02-29"
        assert got["u"] == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
        [[same]] = pg_backend.fetch(f"SELECT '{got['iv']}'::interval = '1 day 02:03:04.5'")
        assert same is True, got["iv"]
        # json and jsonb come back as their own text (parsed, nothing would be rounded).
        assert json.loads(got["j"]) == {"a": [1, 2.5, None], "s": "xé"}
        assert json.loads(got["j2"]) == {"k": True}
        assert got["ints"] == [1, 2, 3]
        assert got["texts"] == ["x", None]
        assert got["grid"] == [["1.5", "2.25"], ["3", "4"]]
        assert got["net"] == "192.168.0.1/24"
        assert got["inf"] == "Infinity"
        assert got["big_int"] == 9007199254740993  # past 2**53, still exact
        assert got["bytes"] == b64(b"\x00\xff")
        # A numeric parameter goes in exactly too (a string PostgreSQL casts).
        assert await t.rows("SELECT CAST(? AS numeric) * 3", ["0.1"]) == [["0.3"]]


async def test_postgres_intervals_with_months_come_back_exact(pg_backend: Backend) -> None:
    async with served(pg_backend) as t:
        [[value]] = await t.rows("SELECT '1 year 2 mons 3 days'::interval")
        [[same]] = pg_backend.fetch(f"SELECT '{value}'::interval = '1 year 2 mons 3 days'")
        assert same is True, value


async def test_postgres_infinite_and_bc_dates_can_be_read(pg_backend: Backend) -> None:
    async with served(pg_backend) as t:
        out = await t.query(
            "SELECT 'infinity'::timestamptz AS a, '-infinity'::date AS b, "
            "'0044-03-15 BC'::date AS c"
        )
        assert out["rows"] == [["infinity", "-infinity", "0044-03-15 BC"]]


async def test_postgres_jsonb_numbers_are_not_rounded(pg_backend: Backend) -> None:
    async with served(pg_backend) as t:
        [[value]] = await t.rows("""SELECT '{"n": 12345678901234567890.123}'::jsonb""")
        # A document's own text: JSON numbers past a double's digits would be rounded.
        assert isinstance(value, str), value
        n = json.loads(value, parse_float=decimal.Decimal)["n"]
        assert n == decimal.Decimal("12345678901234567890.123"), value


# -- over real stdio ------------------------------------------------------------------------


def child_with_arg(arg: str) -> int:
    """Our child process with ``arg`` among its arguments (through /proc)."""
    me = str(os.getpid())
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[1] == me and arg.encode() in cmdline:
            return int(entry)
    raise AssertionError(f"no child process with {arg!r}")


async def test_stdio_serve_with_postgres(pg_backend: Backend) -> None:
    """``atomictools serve --db main=postgresql://...`` with PGPASSWORD in its environment."""
    b = pg_backend
    assert b.pg is not None
    env = {**(state_env() or {}), "PGPASSWORD": b.pg.password}
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "atomictools", "serve", "--root", str(b.root), "--db", f"{DB}={b.target}"],
        env=env,
    )
    async with connect(params, "legacy") as client:
        t = Tools(client, b)
        pid = child_with_arg(str(b.root))
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert b.target.encode() in cmdline
        assert b.pg.password.encode() not in cmdline  # nothing in `ps` shows it

        out = await t.ok("db_list", {}, DbListOutput)
        assert out["databases"] == [{"name": DB, "path": b.target, "configured": True}]
        await t.execute("CREATE TABLE s(id INTEGER PRIMARY KEY, v TEXT)")
        out = await t.execute("INSERT INTO s VALUES (?, ?), (?, ?)", [1, UNICODE, 2, None])
        assert out["rowcount"] == 2
        await t.err(
            "db_transaction",
            {
                "database": DB,
                "statements": [
                    {"sql": "INSERT INTO s VALUES (3, 'c')"},
                    {"sql": "SET ROLE postgres"},
                ],
            },
            "statement 2 of 2",
            "role",
            committed_nothing=True,
        )
        await t.err(
            "db_transaction",
            {
                "database": DB,
                "statements": [
                    {"sql": "INSERT INTO s VALUES (3, 'c')"},
                    {"sql": "INSERT INTO s VALUES (1, 'dup')"},
                ],
            },
            "statement 2 of 2",
            committed_nothing=True,
        )
        assert await t.rows("SELECT id, v FROM s ORDER BY id") == [[1, UNICODE], [2, None]]
        assert b.fetch("SELECT id, v FROM s ORDER BY id") == [(1, UNICODE), (2, None)]

        # A cancel over stdio stops the statement on the server too.
        await t.execute("CREATE TABLE c(v INTEGER)")
        for delay in (0.2, 0.5):
            with anyio.move_on_after(delay) as scope:
                await client.call_tool("db_execute", {"database": DB, "sql": b.long_write("c")})
            assert scope.cancelled_caught
            await b.statement_stopped("pg_sleep(5)", f"stdio cancel at {delay} s")
            await t.next_calls_served("c")
        assert await b.afetch("SELECT v FROM c") == [(1,), (1,)]


def test_cli_refuses_a_password_in_the_url(pg_database: PgDatabase, tmp_path: Path) -> None:
    secret = "S3cret-" + secrets.token_hex(6)
    url = pg_database.dsn.replace("app@", f"app:{secret}@")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "atomictools",
            "serve",
            "--root",
            str(tmp_path),
            "--db",
            f"{DB}={url}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(state_env() or {})},
        check=False,
    )
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "PGPASSWORD" in done.stderr, done.stderr
    assert secret not in done.stderr + done.stdout
    assert done.stdout == ""
