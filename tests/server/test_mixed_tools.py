"""``apply_changes`` with a database step (issue 17) end to end through the SDK's ``mcp.Client``.

A set ``[write, edit, ..., {op: "sql", database, statements}]`` commits its files and its rows as
one unit. Each ``check_*`` drives one concern and runs in memory (``Client(create_server(...))``,
one test per check), and all of them again in one session against a real ``atomictools serve
--db main=...`` over stdio, in both protocol eras. What a call did is read back from outside the
server: the files with plain reads, the database with plain ``sqlite3``.

Every refusal is checked three ways: the message names the step (``change 2 of 2 (sql):
statement 1 of 1 ...``) and the fix, the files are byte for byte as before, and the database
holds exactly the rows it held. Servers that differ (read-only, narrowed client roots, an
embedder's server without databases) have tests of their own.
"""

from __future__ import annotations

import base64
import contextlib
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.server.mcpserver import MCPServer
from mcp.types import CallToolResult, TextContent

from atomictools import DatabaseCatalog, Workspace, is_temp_name
from atomictools.server import ServerOptions, ToolRuntime, create_server, register_tools
from atomictools.server.models import (
    ApplyChangesOutput,
    ChangeOutput,
    DbSchemaOutput,
    ListChangesOutput,
    UndoChangeOutput,
)

from .helpers import TRACEBACK_MARKERS, connect, sha, stdio_params, text_of, wire_names
from .test_schemas_roots import roots_callback

pytestmark = pytest.mark.anyio

DB = "main"
MARKER_TABLE = "atomictools_changesets"
MODES = ["legacy", "default"]
SQL_KEYS = {"database", "statements", "rowsChanged", "lastrowid", "results", "resultsTruncated"}
"""The fields of a ChangeOutput that only a sql step has."""
NOTHING_COMMITTED = "nothing was committed"
NOTHING_CHANGED = "nothing was changed"


@pytest.fixture
def anyio_backend() -> str:
    # The database layer hands results back through asyncio futures (aiosqlite): the server,
    # which shares the test's event loop in memory, runs on asyncio only.
    return "asyncio"


def memory_server(root: Path, *, read_only: bool = False) -> MCPServer[Any]:
    return create_server(Workspace([root], read_only=read_only), databases={DB: root / "main.db"})


def b64(data: bytes) -> dict[str, str]:
    return {"$blob": base64.b64encode(data).decode("ascii")}


def plain_sql(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read with plain sqlite3 from outside the server: what is committed on disk."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql, params).fetchall()


def markers(path: Path) -> list[tuple[Any, ...]]:
    """The change-set markers left in a database (none once every set is over)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        known = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE name = ?", (MARKER_TABLE,)
        ).fetchall()
        return conn.execute(f"SELECT txid FROM {MARKER_TABLE}").fetchall() if known else []


def ours(directory: Path) -> list[Path]:
    """Temp files, set members and claims of ours anywhere below ``directory``."""
    return [
        p for p in directory.rglob("*") if is_temp_name(p.name) or p.name.startswith(".atomictools")
    ]


@dataclass
class M:
    """One check's handle: the client, the server's root, and the check's own directory and
    table (checks share one server over stdio)."""

    client: Client
    root: Path
    name: str

    @property
    def db(self) -> Path:
        return self.root / "main.db"

    @property
    def d(self) -> Path:
        return self.root / self.name

    @property
    def table(self) -> str:
        return f"{self.name}_rows"

    def p(self, *parts: str) -> str:
        return "/".join((self.name, *parts))

    def f(self, *parts: str) -> Path:
        return self.d.joinpath(*parts)

    async def call(self, tool: str, args: dict[str, Any]) -> CallToolResult:
        return await self.client.call_tool(tool, args)

    async def ok(self, tool: str, args: dict[str, Any], model: type[Any]) -> dict[str, Any]:
        """The call succeeds; its structured content is ``model``'s camelCase shape."""
        result = await self.call(tool, args)
        assert not result.is_error, f"{tool}({str(args)[:300]}) failed: {text_of(result)}"
        content = result.structured_content
        assert isinstance(content, dict), f"{tool}: no structured content"
        assert wire_names(model, required_only=True) <= set(content) <= wire_names(model)
        model.model_validate(content)
        assert isinstance(result.content[0], TextContent)
        return content

    async def apply(self, changes: list[dict[str, Any]], **more: Any) -> tuple[dict[str, Any], str]:
        """apply_changes succeeds; its structured content and text. A file change's item has
        none of a sql step's fields, a sql step's has all of them."""
        result = await self.call("apply_changes", {"changes": changes, **more})
        assert not result.is_error, f"apply_changes failed: {text_of(result)}"
        content = result.structured_content
        assert isinstance(content, dict)
        assert set(content) == wire_names(ApplyChangesOutput)
        ApplyChangesOutput.model_validate(content)
        for item in content["changes"]:
            expected = wire_names(ChangeOutput) - (set() if item["op"] == "sql" else SQL_KEYS)
            assert set(item) == expected, sorted(item)
        return content, text_of(result)

    async def refused(
        self, tool: str, args: dict[str, Any], *fragments: str, outcome: str = NOTHING_CHANGED
    ) -> str:
        """An ``isError`` result naming ``fragments`` and what was left (no traceback); the
        session serves the next call."""
        result = await self.call(tool, args)
        message = text_of(result)
        assert result.is_error, f"{tool}({str(args)[:300]}) did not fail: {message}"
        assert message.startswith(f"Error executing tool {tool}"), message
        for fragment in (*fragments, outcome):
            assert fragment in message, f"{fragment!r} not in {message!r}"
        assert not TRACEBACK_MARKERS.search(message), message
        assert result.structured_content is None
        alive = await self.call("db_query", {"database": DB, "sql": "SELECT 1"})
        assert not alive.is_error, text_of(alive)
        return message

    async def execute(self, sql: str, params: Any = None) -> None:
        args: dict[str, Any] = {"database": DB, "sql": sql}
        if params is not None:
            args["params"] = params
        done = await self.call("db_execute", args)
        assert not done.is_error, text_of(done)

    def rows(self) -> list[tuple[Any, ...]]:
        return plain_sql(self.db, f"SELECT id, v FROM {self.table} ORDER BY id")

    def files(self) -> dict[str, bytes | None]:
        """Everything below the check's directory (directories as None)."""
        return {
            str(p.relative_to(self.d)): None if p.is_dir() else p.read_bytes()
            for p in sorted(self.d.rglob("*"))
        }

    async def setup(self) -> None:
        """The check's directory with two files, and its table with one row."""
        self.d.mkdir()
        self.f("a.txt").write_bytes(b"alpha\n")
        self.f("b.txt").write_bytes(b"one\ntwo\nthree\n")
        await self.execute(f"CREATE TABLE {self.table}(id INTEGER PRIMARY KEY, v)")
        await self.execute(f"INSERT INTO {self.table}(id, v) VALUES (1, 'seed')")

    def sql(self, *statements: str | dict[str, Any], database: str = DB) -> dict[str, Any]:
        listed = [{"sql": s} if isinstance(s, str) else s for s in statements]
        return {"op": "sql", "database": database, "statements": listed}

    def insert(self, v: Any) -> dict[str, Any]:
        return {"sql": f"INSERT INTO {self.table}(v) VALUES (?)", "params": [v]}

    def untouched(self, files: dict[str, bytes | None], rows: list[tuple[Any, ...]]) -> None:
        """Files and rows exactly as they were, no file of ours left, no marker."""
        assert self.files() == files
        assert self.rows() == rows
        assert ours(self.d) == []
        assert markers(self.db) == []


Check = Callable[[M], Awaitable[None]]
CHECKS: list[Check] = []


def check(fn: Check) -> Check:
    CHECKS.append(fn)
    return fn


# -- the checks -------------------------------------------------------------------------------


@check
async def check_mixed_set_applies_files_and_rows(m: M) -> None:
    await m.setup()
    blob = bytes(range(256))
    out, text = await m.apply(
        [
            {"op": "write", "path": m.p("new.txt"), "content": "fresh\n"},
            {"op": "edit", "path": m.p("b.txt"), "edits": [{"oldText": "two", "newText": "2"}]},
            m.sql(
                m.insert("from the set"),
                {"sql": f"INSERT INTO {m.table}(v) VALUES (:b)", "params": {"b": b64(blob)}},
                f"UPDATE {m.table} SET v = v || '!' WHERE typeof(v) = 'text'",
            ),
            {"op": "delete", "path": m.p("a.txt")},
        ]
    )
    assert out["applied"] is True
    assert out["txid"]
    assert out["changeId"]
    assert [c["op"] for c in out["changes"]] == ["write", "edit", "sql", "delete"]
    step = out["changes"][2]
    assert step == {
        "op": "sql",
        "path": DB,
        "source": None,
        "sha256": None,
        "diff": None,
        "created": False,
        "database": DB,
        "statements": 3,
        "rowsChanged": 4,
        "lastrowid": 3,
        "results": [
            {"index": 1, "rowcount": 1, "lastrowid": 2},
            {"index": 2, "rowcount": 1, "lastrowid": 3},
            {"index": 3, "rowcount": 2, "lastrowid": 3},
        ],
        "resultsTruncated": False,
    }
    assert out["changes"][0]["sha256"] == sha(b"fresh\n")
    assert "- sql on main: 3 statement(s), 4 row(s) changed, lastrowid 3" in text
    assert f"- write {m.p('new.txt')}" in text
    assert out["changeId"] in text
    assert "files and database committed as one" in text
    # What is on disk, read from outside the server.
    assert m.files() == {"b.txt": b"one\n2\nthree\n", "new.txt": b"fresh\n"}
    assert m.rows() == [(1, "seed!"), (2, "from the set!"), (3, blob)]
    assert markers(m.db) == []
    assert ours(m.d) == []


@check
async def check_two_sql_steps_on_one_database_and_a_long_step(m: M) -> None:
    await m.setup()
    many = [m.insert(i) for i in range(150)]
    out, text = await m.apply(
        [
            m.sql(m.insert("first")),
            {"op": "mkdir", "path": m.p("made")},
            m.sql(*many),
        ]
    )
    first, made, long = out["changes"]
    assert (first["op"], first["statements"], first["rowsChanged"]) == ("sql", 1, 1)
    assert made["op"] == "mkdir"
    # A long step lists its first results and says so; the totals cover all of them.
    assert (long["statements"], long["rowsChanged"], long["lastrowid"]) == (150, 150, 152)
    assert len(long["results"]) == 100
    assert long["results"][-1] == {"index": 100, "rowcount": 1, "lastrowid": 102}
    assert long["resultsTruncated"] is True
    assert "- sql on main: 150 statement(s), 150 row(s) changed" in text
    assert m.f("made").is_dir()
    assert len(m.rows()) == 152


@check
async def check_dry_run_previews_and_changes_nothing(m: M) -> None:
    await m.setup()
    files, rows = m.files(), m.rows()
    out, text = await m.apply(
        [
            {"op": "edit", "path": m.p("b.txt"), "edits": [{"oldText": "two", "newText": "2"}]},
            {"op": "write", "path": m.p("c.txt"), "content": "c\n"},
            m.sql(m.insert("dry"), f"DELETE FROM {m.table} WHERE id = 1"),
        ],
        dryRun=True,
    )
    assert out["applied"] is False
    assert out["txid"] is None
    assert out["changeId"] is None
    edit, _write, step = out["changes"]
    assert "-two\n+2\n" in edit["diff"]
    assert step["results"] == [
        {"index": 1, "rowcount": 1, "lastrowid": 2},
        {"index": 2, "rowcount": 1, "lastrowid": 2},
    ]
    assert step["rowsChanged"] == 2
    assert "Would apply 3 change(s)" in text
    assert "rolled back" in text
    assert "```diff" in text
    m.untouched(files, rows)
    # The rolled-back insert did not even use up its rowid.
    await m.apply([m.sql(m.insert("real"))])
    assert m.rows() == [*rows, (2, "real")]


@check
async def check_idempotent_retry_runs_the_statements_once(m: M) -> None:
    await m.setup()
    changes = [
        {"op": "write", "path": m.p("keyed.txt"), "content": "keyed\n"},
        m.sql(m.insert("keyed"), {"sql": "SELECT ?", "params": [b64(b"\x00\x01")]}),
    ]
    first, _ = await m.apply(changes, idempotencyKey=f"{m.name}-key")
    assert m.rows() == [(1, "seed"), (2, "keyed")]
    # Someone changes the file meanwhile: a retry must not write it again either.
    m.f("keyed.txt").write_bytes(b"changed by someone else\n")
    again, text = await m.apply(changes, idempotencyKey=f"{m.name}-key")
    assert again == first
    assert "- sql on main: 2 statement(s)" in text
    assert m.rows() == [(1, "seed"), (2, "keyed")]
    assert m.f("keyed.txt").read_bytes() == b"changed by someone else\n"
    # The same key with other statements (or another blob) is refused; nothing runs.
    files, rows = m.files(), m.rows()
    for other in (
        [changes[0], m.sql(m.insert("other"))],
        [changes[0], m.sql(m.insert("keyed"), {"sql": "SELECT ?", "params": [b64(b"\x02")]})],
    ):
        await m.refused(
            "apply_changes",
            {"changes": other, "idempotencyKey": f"{m.name}-key"},
            "other arguments",
        )
    m.untouched(files, rows)


@check
async def check_statement_error_names_the_step_and_changes_nothing(m: M) -> None:
    await m.setup()
    files, rows = m.files(), m.rows()
    message = await m.refused(
        "apply_changes",
        {
            "changes": [
                {"op": "write", "path": m.p("a.txt"), "content": "replaced\n"},
                {"op": "write", "path": m.p("made.txt"), "content": "made\n"},
                m.sql(m.insert("ran first"), "INSERT INTO nope VALUES (1)"),
            ]
        },
        "change 3 of 3 (sql): statement 2 of 2 (INSERT INTO nope VALUES (1)) failed",
        "no such table: nope",
        outcome=NOTHING_COMMITTED,
    )
    assert "Traceback" not in message
    m.untouched(files, rows)
    # A parameter that cannot be bound names its statement too, before anything runs.
    await m.refused(
        "apply_changes",
        {
            "changes": [
                {"op": "write", "path": m.p("a.txt"), "content": "replaced\n"},
                m.sql(m.insert("x"), {"sql": "SELECT ?", "params": [{"$blob": "not base64!"}]}),
            ]
        },
        "change 2 of 2 (sql): statement 2 of 2: $blob is not valid base64",
    )
    await m.refused(
        "apply_changes",
        {"changes": [m.sql({"sql": "SELECT ?", "params": [1, 2]})]},
        "one parameter per placeholder",
        outcome=NOTHING_COMMITTED,
    )
    m.untouched(files, rows)


@check
async def check_file_precondition_failure_leaves_the_database(m: M) -> None:
    await m.setup()
    files, rows = m.files(), m.rows()
    await m.refused(
        "apply_changes",
        {
            "changes": [
                m.sql(m.insert("must not stay"), f"DELETE FROM {m.table} WHERE id = 1"),
                {"op": "write", "path": m.p("a.txt"), "content": "x\n", "expectedSha256": "0" * 64},
            ]
        },
        "change 2 of 2 (write)",
        "expectedSha256",
        "it changed since it was read",
    )
    m.untouched(files, rows)
    # An edit whose text is missing, after a sql step: the same.
    await m.refused(
        "apply_changes",
        {
            "changes": [
                m.sql(m.insert("must not stay")),
                {
                    "op": "edit",
                    "path": m.p("b.txt"),
                    "edits": [{"oldText": "nine", "newText": "9"}],
                },
            ]
        },
        "change 2 of 2 (edit)",
        "oldText",
    )
    m.untouched(files, rows)


@check
async def check_one_database_per_set(m: M) -> None:
    await m.setup()
    with contextlib.closing(sqlite3.connect(m.f("other.db"))) as conn:
        conn.execute("CREATE TABLE t(v)")
        conn.commit()
    files, rows = m.files(), m.rows()
    await m.refused(
        "apply_changes",
        {
            "changes": [
                {"op": "write", "path": m.p("a.txt"), "content": "x\n"},
                m.sql(m.insert("main")),
                m.sql("INSERT INTO t VALUES (1)", database=m.p("other.db")),
            ]
        },
        "change 3 of 3 (sql)",
        f"already changes database {DB} (change 2)",
        "one set may change one database",
    )
    m.untouched(files, rows)
    assert plain_sql(m.f("other.db"), "SELECT count(*) FROM t") == [(0,)]
    # The same file under its two names (configured, and found in the roots) is one database.
    out, _ = await m.apply(
        [m.sql(m.insert("by name")), m.sql(m.insert("by path"), database="main.db")]
    )
    assert [c["path"] for c in out["changes"]] == [DB, "main.db"]
    assert [v for _, v in m.rows()] == ["seed", "by name", "by path"]
    # A database that is not there, or not a database: named, nothing changed.
    files, rows = m.files(), m.rows()
    await m.refused(
        "apply_changes",
        {"changes": [m.sql("SELECT 1", database=m.p("gone.db"))]},
        "does not exist",
        "db_list",
    )
    await m.refused(
        "apply_changes",
        {
            "changes": [
                {"op": "write", "path": m.p("a.txt"), "content": "x\n"},
                m.sql("SELECT 1", database=m.p("b.txt")),
            ]
        },
        "change 2 of 2 (sql)",
        "not a database",
    )
    m.untouched(files, rows)


@check
async def check_guarded_statements_are_refused_naming_the_step(m: M) -> None:
    await m.setup()
    files, rows = m.files(), m.rows()
    write = {"op": "write", "path": m.p("a.txt"), "content": "x\n"}
    for sql, reason in [
        (f"ATTACH '{m.f('x.db')}' AS x", "another database file"),
        ("BEGIN", "the tool owns the transaction"),
        ("COMMIT", "the tool owns the transaction"),
        ("PRAGMA synchronous = OFF", "synchronous"),
        (f"INSERT INTO {MARKER_TABLE} VALUES ('x', 'y', 0)", MARKER_TABLE),
        (f"DROP TABLE {MARKER_TABLE}", MARKER_TABLE),
    ]:
        await m.refused(
            "apply_changes",
            {"changes": [write, m.sql(m.insert("before"), sql)]},
            f"change 2 of 2 (sql): statement 2 of 2 ({sql.split()[0]}",
            reason,
            outcome=NOTHING_COMMITTED,
        )
    m.untouched(files, rows)
    assert not m.f("x.db").exists()


@check
async def check_marker_table_is_empty_and_not_listed(m: M) -> None:
    await m.setup()
    await m.apply(
        [{"op": "write", "path": m.p("a.txt"), "content": "x\n"}, m.sql(m.insert("marked"))]
    )
    # The set's marker was its commit point; once the set is over it is gone.
    assert plain_sql(m.db, f"SELECT count(*) FROM {MARKER_TABLE}") == [(0,)]
    schema = await m.ok("db_schema", {"database": DB}, DbSchemaOutput)
    names = [o["name"] for o in schema["objects"]]
    assert m.table in names
    assert not [n for n in names if n.startswith("atomictools")], names
    listed = await m.call("db_schema", {"database": DB})
    assert MARKER_TABLE not in text_of(listed)
    # Read it, yes; write it, no (checked above); the query tool reads it like any table.
    read = await m.call("db_query", {"database": DB, "sql": f"SELECT * FROM {MARKER_TABLE}"})
    assert not read.is_error, text_of(read)
    assert (read.structured_content or {})["rows"] == []


@check
async def check_history_lists_the_mixed_entry_and_undo_takes_back_files_only(m: M) -> None:
    await m.setup()
    out, _ = await m.apply(
        [
            {"op": "edit", "path": m.p("b.txt"), "edits": [{"oldText": "two", "newText": "2"}]},
            {"op": "write", "path": m.p("n.txt"), "content": "n\n"},
            m.sql(m.insert("audited"), f"UPDATE {m.table} SET v = 'seed2' WHERE id = 1"),
        ]
    )
    change_id = out["changeId"]
    listed = await m.call("list_changes", {"path": m.name})
    assert not listed.is_error, text_of(listed)
    content = listed.structured_content
    assert isinstance(content, dict)
    ListChangesOutput.model_validate(content)
    [entry] = [e for e in content["changes"] if e["id"] == change_id]
    assert entry["op"] == "apply_changes"
    assert entry["database"] == DB
    assert entry["rowsChanged"] == 2
    assert entry["statements"] == [
        f"INSERT INTO {m.table}(v) VALUES (?)",
        f"UPDATE {m.table} SET v = 'seed2' WHERE id = 1",
    ]
    assert entry["undoable"] is False
    assert {p["path"] for p in entry["paths"]} == {m.p("b.txt"), m.p("n.txt")}
    text = text_of(listed)
    block = text[text.index(f"- {change_id}") :]
    assert f"apply_changes on {DB}, 2 row(s) changed" in block
    assert f"{m.p('b.txt')} (+1 -1)" in block
    assert f"{m.p('n.txt')} (created, +1 -0)" in block
    assert f"INSERT INTO {m.table}(v) VALUES (?)" in block
    assert "undo_change with paths" in block

    # Undo of the whole set: refused, and the message says how to take back the files.
    files, rows = m.files(), m.rows()
    for args in ({"id": change_id}, {"last": 1}, {"id": change_id, "dryRun": True}):
        await m.refused(
            "undo_change",
            args,
            f"change {change_id} also committed statements to database {DB}",
            "cannot be undone",
            "name the files in paths",
        )
    m.untouched(files, rows)

    # With paths: a preview, then the files go back and the rows stay.
    preview = await m.ok(
        "undo_change",
        {"id": change_id, "paths": [m.p("b.txt"), m.p("n.txt")], "dryRun": True},
        UndoChangeOutput,
    )
    assert preview["applied"] is False
    m.untouched(files, rows)
    undone = await m.ok(
        "undo_change", {"id": change_id, "paths": [m.p("b.txt"), m.p("n.txt")]}, UndoChangeOutput
    )
    assert undone["applied"] is True
    assert {(p["path"], p["action"]) for p in undone["paths"]} == {
        (m.p("b.txt"), "restored"),
        (m.p("n.txt"), "deleted"),
    }
    assert m.files() == {"a.txt": b"alpha\n", "b.txt": b"one\ntwo\nthree\n"}
    assert m.rows() == rows == [(1, "seed2"), (2, "audited")]


@check
async def check_a_set_of_one_sql_step(m: M) -> None:
    await m.setup()
    out, text = await m.apply([m.sql(m.insert("alone"))])
    assert out["changes"][0]["rowsChanged"] == 1
    assert "- sql on main: 1 statement(s), 1 row(s) changed, lastrowid 2" in text
    files, rows = m.files(), m.rows()
    # An error in a set of one has no step prefix (as for a file change alone).
    message = await m.refused(
        "apply_changes",
        {"changes": [m.sql("INSERT INTO nope VALUES (1)")]},
        "statement 1 of 1 (INSERT INTO nope VALUES (1)) failed: no such table",
        outcome=NOTHING_COMMITTED,
    )
    assert "change 1 of 1" not in message
    # The wire model itself: at least one statement, and no unknown fields.
    await m.refused(
        "apply_changes", {"changes": [m.sql()]}, "changes.0.sql.statements", "at least 1"
    )
    await m.refused(
        "apply_changes",
        {"changes": [{"op": "sql", "database": DB, "statements": [{"sql": "x", "bind": 1}]}]},
        "bind",
    )
    m.untouched(files, rows)


# -- in memory, one test per check --------------------------------------------------------------


@pytest.mark.parametrize("fn", CHECKS, ids=[fn.__name__ for fn in CHECKS])
async def test_in_memory(root: Path, fn: Check) -> None:
    async with Client(memory_server(root)) as client:
        await fn(M(client, root.resolve(), "c"))


# -- over stdio: every check in one session of the real server, in both eras --------------------


@pytest.mark.parametrize("mode", MODES)
async def test_over_stdio(root: Path, mode: str) -> None:
    resolved = root.resolve()
    params = stdio_params(resolved, "--db", f"{DB}={resolved / 'main.db'}")
    async with connect(params, mode) as client:
        for n, fn in enumerate(CHECKS):
            await fn(M(client, resolved, f"c{n}"))


# -- servers that differ --------------------------------------------------------------------------


async def test_read_only_server_refuses_a_mixed_set(root: Path) -> None:
    resolved = root.resolve()
    db = resolved / "main.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE t(v)")
        conn.commit()
    (resolved / "a.txt").write_bytes(b"a\n")
    changes = [
        {"op": "write", "path": "a.txt", "content": "x\n"},
        {"op": "sql", "database": DB, "statements": [{"sql": "INSERT INTO t VALUES (1)"}]},
    ]
    for target in (
        memory_server(resolved, read_only=True),
        stdio_params(resolved, "--read-only", "--db", f"{DB}={db}"),
    ):
        async with Client(target) as client:
            tools = {t.name for t in (await client.list_tools()).tools}
            assert "apply_changes" not in tools
            for dry_run in (False, True):
                result = await client.call_tool(
                    "apply_changes", {"changes": changes, "dryRun": dry_run}
                )
                message = text_of(result)
                assert result.is_error, message
                assert "read-only (--read-only)" in message
                assert NOTHING_CHANGED in message
    assert (resolved / "a.txt").read_bytes() == b"a\n"
    assert plain_sql(db, "SELECT count(*) FROM t") == [(0,)]
    assert markers(db) == []


async def test_a_database_outside_the_client_roots_is_refused(root: Path) -> None:
    resolved = root.resolve()
    for name in ("sub", "other"):
        (resolved / name).mkdir()
        with contextlib.closing(sqlite3.connect(resolved / name / f"{name}.db")) as conn:
            conn.execute("CREATE TABLE t(v)")
            conn.commit()
    (resolved / "sub" / "f.txt").write_bytes(b"f\n")
    server = create_server(Workspace([resolved]))
    callback = roots_callback([resolved / "sub"])
    async with Client(server, mode="legacy", list_roots_callback=callback) as client:
        for database in (str(resolved / "other" / "other.db"), "../other/other.db"):
            refused = await client.call_tool(
                "apply_changes",
                {
                    "changes": [
                        {"op": "write", "path": "f.txt", "content": "x\n"},
                        {
                            "op": "sql",
                            "database": database,
                            "statements": [{"sql": "INSERT INTO t VALUES (1)"}],
                        },
                    ]
                },
            )
            message = text_of(refused)
            assert refused.is_error, message
            assert "change 2 of 2 (sql): " in message
            assert "outside the allowed directories" in message
            assert NOTHING_CHANGED in message
        # Inside the client's roots, the same set works (relative to the client's root).
        inside = await client.call_tool(
            "apply_changes",
            {
                "changes": [
                    {"op": "write", "path": "f.txt", "content": "x\n"},
                    {
                        "op": "sql",
                        "database": "sub.db",
                        "statements": [{"sql": "INSERT INTO t VALUES (1)"}],
                    },
                ]
            },
        )
        assert not inside.is_error, text_of(inside)
    assert (resolved / "sub" / "f.txt").read_bytes() == b"x\n"
    assert plain_sql(resolved / "sub" / "sub.db", "SELECT v FROM t") == [(1,)]
    assert plain_sql(resolved / "other" / "other.db", "SELECT count(*) FROM t") == [(0,)]


async def test_a_server_without_databases_refuses_a_sql_step(root: Path) -> None:
    """An embedder's server with our file tools and no catalog: a sql step is refused clearly."""
    resolved = root.resolve()
    with contextlib.closing(sqlite3.connect(resolved / "x.db")) as conn:
        conn.execute("CREATE TABLE t(v)")
        conn.commit()
    (resolved / "a.txt").write_bytes(b"a\n")
    server: MCPServer[Any] = MCPServer("embedded")
    register_tools(server, ToolRuntime(Workspace([resolved]), ServerOptions()))
    async with Client(server) as client:
        result = await client.call_tool(
            "apply_changes",
            {
                "changes": [
                    {"op": "write", "path": "a.txt", "content": "x\n"},
                    {"op": "sql", "database": "x.db", "statements": [{"sql": "DELETE FROM t"}]},
                ]
            },
        )
        message = text_of(result)
        assert result.is_error, message
        assert "change 2 of 2 (sql): this server serves no databases" in message
        assert NOTHING_CHANGED in message
        # Its file changes still work.
        done = await client.call_tool(
            "apply_changes", {"changes": [{"op": "write", "path": "a.txt", "content": "y\n"}]}
        )
        assert not done.is_error, text_of(done)
    assert (resolved / "a.txt").read_bytes() == b"y\n"


async def test_an_embedders_catalog_serves_sql_steps_too(root: Path) -> None:
    """``register_tools(..., databases=catalog)`` on a runtime made without it: the catalog
    given to register_tools is the one apply_changes' sql steps use."""
    resolved = root.resolve()
    with contextlib.closing(sqlite3.connect(resolved / "x.db")) as conn:
        conn.execute("CREATE TABLE t(v)")
        conn.commit()
    workspace = Workspace([resolved])
    catalog = DatabaseCatalog(workspace)
    server: MCPServer[Any] = MCPServer("embedded")
    register_tools(server, ToolRuntime(workspace, ServerOptions()), databases=catalog)
    try:
        async with Client(server) as client:
            result = await client.call_tool(
                "apply_changes",
                {
                    "changes": [
                        {"op": "write", "path": "a.txt", "content": "x\n"},
                        {
                            "op": "sql",
                            "database": "x.db",
                            "statements": [{"sql": "INSERT INTO t VALUES (1)"}],
                        },
                    ]
                },
            )
            assert not result.is_error, text_of(result)
    finally:
        await catalog.close()
    assert (resolved / "a.txt").read_bytes() == b"x\n"
    assert plain_sql(resolved / "x.db", "SELECT v FROM t") == [(1,)]
