"""Child process of the mixed crash tests: files and one SQLite database changed as one set.

Run as a real process (``sys.executable tests/mixed_child.py MODE ...``) so that
``ATOMICTOOLS_TEST_CRASH_AT=name:n`` with ``ATOMICTOOLS_TEST_CRASH_SIGNAL=KILL`` really
SIGKILLs it at that point (its ``flock``s and its SQLite locks are dropped by the kernel, and
nothing of it runs after), or so that a campaign can SIGKILL it at any moment. The scenario and
the checks live here and are imported by the tests, so parent and child agree on the tree and
the database before the set, the set itself, and the tree and the database after it.

Modes:

* ``apply ROOT STATE DB [--list] [--key=KEY]``: the mixed set of ``changes`` (files: write,
  edit, mkdir -p, a write inside the new directory, move over a file, copy, delete; database:
  a schema migration and the rows that record each file's sha256) on ``Workspace([ROOT],
  state_dir=STATE)`` and ``Database(DB, name="app")``. Without a key it goes through the
  builder (``async with ws.changeset() as cs``), with ``--key`` through ``apply_changes(...,
  idempotency_key=KEY)``. Prints ``{"result": ...}`` (the result's JSON); with ``--list`` no
  crash happens, and ``"points"`` lists every crash point the set passed, in order.
* ``loop ROOT STATE DB [--naive]``: the engine in place of the server in the SIGKILL campaign
  (``tests/mixed_sigkill_harness.py``, driver ``child``): first the recovery a server start runs
  (``recover_interrupted``), then ``ready``; then for each line on stdin (an ``apply_changes``
  call's ``changes`` as MCP sends them, JSON) the set is applied and one line of JSON answers
  (``{"ok": ...}`` or ``{"error": message}``). ``--naive`` is the campaign's control (driver
  ``naive``): files and statements committed one after the other, not as one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from atomictools import Change, Database

DIR = "<dir>"
DB_NAME = "app"
"""The database's name (``--db app=PATH`` for the server)."""
Tree = dict[str, bytes | str]
"""Relative path -> file content, or ``DIR`` for a directory, or ``<link TARGET>``."""
DbState = dict[str, Any]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the scenario --------------------------------------------------------------------------

BEFORE: Tree = {
    "a.txt": b"alpha old\n",
    "b.txt": b"line one\nline two\nline three\n",
    "src.txt": b"moved content\n",
    "dst.txt": b"overwritten by the move\n",
    "c.txt": b"copied content\n",
    "gone.txt": b"deleted content\n",
}
AFTER: Tree = {
    "a.txt": b"alpha new\n",
    "b.txt": b"line one\nline 2\nline three\n",
    "dst.txt": b"moved content\n",
    "c.txt": b"copied content\n",
    "c2.txt": b"copied content\n",
    "new": DIR,
    "new/deep": DIR,
    "new/deep/n.txt": b"inside a new directory\n",
}
SCHEMA = (
    "CREATE TABLE files (path TEXT PRIMARY KEY, sha256 TEXT NOT NULL)",
    "CREATE TABLE counter (id INTEGER PRIMARY KEY CHECK (id = 1), n INTEGER NOT NULL)",
    "INSERT INTO counter (id, n) VALUES (1, 0)",
)
MIGRATION = (
    ("ALTER TABLE files ADD COLUMN note TEXT NOT NULL DEFAULT ''", None),
    ("CREATE INDEX files_by_sha256 ON files (sha256)", None),
)


def _data_statements() -> list[tuple[str, Any]]:
    """The rows that record the set's files (the invariant: each file's sha256 in ``files``)."""

    def digest(rel: str) -> str:
        content = AFTER[rel]
        assert isinstance(content, bytes)
        return sha(content)

    return [
        ("UPDATE files SET sha256 = ?, note = 'written' WHERE path = ?",
         [digest("a.txt"), "a.txt"]),
        ("UPDATE files SET sha256 = :sha, note = 'edited' WHERE path = :path",
         {"sha": digest("b.txt"), "path": "b.txt"}),
        ("UPDATE files SET sha256 = ?, note = 'moved here' WHERE path = ?",
         [digest("dst.txt"), "dst.txt"]),
        ("DELETE FROM files WHERE path IN (?, ?)", ["src.txt", "gone.txt"]),
        ("INSERT INTO files (path, sha256, note) VALUES (?, ?, 'copied'), (?, ?, 'created')",
         ["c2.txt", digest("c2.txt"), "new/deep/n.txt", digest("new/deep/n.txt")]),
        # Not idempotent: run twice, it would show.
        ("UPDATE counter SET n = n + 1 WHERE id = 1", None),
    ]  # fmt: skip


def changes(db: Database) -> list[Change]:
    """The mixed set, database steps in between the file changes (they run once every file
    is staged, inside the transaction whose COMMIT is the set's commit point)."""
    from atomictools import Change, Statement
    from atomictools.engine.text.edits import Edit

    def sql(statements: Sequence[tuple[str, Any]]) -> Change:
        steps = tuple(Statement(text, params) for text, params in statements)
        return Change("sql", db.name, database=db, statements=steps)

    return [
        Change("write", "a.txt", content=b"alpha new\n"),
        sql(MIGRATION),
        Change("edit", "b.txt", edits=(Edit("line two\n", "line 2\n"),)),
        Change("mkdir", "new/deep"),
        Change("write", "new/deep/n.txt", content=b"inside a new directory\n"),
        Change("move", "dst.txt", source="src.txt", overwrite=True),
        Change("copy", "c2.txt", source="c.txt"),
        sql(_data_statements()),
        Change("delete", "gone.txt"),
    ]


async def apply_with_builder(ws: Any, db: Database) -> Any:
    """The same set through ``ws.changeset()`` (the builder makes exactly ``changes(db)``)."""
    async with ws.changeset() as cs:
        cs.write("a.txt", b"alpha new\n")
        for text, params in MIGRATION:
            cs.sql(db, text, params)
        cs.edit("b.txt", [("line two\n", "line 2\n")])
        cs.mkdir("new/deep")
        cs.write("new/deep/n.txt", b"inside a new directory\n")
        cs.move("src.txt", "dst.txt", overwrite=True)
        cs.copy("c.txt", "c2.txt")
        for text, params in _data_statements():
            cs.sql(db, text, params)
        cs.delete("gone.txt")
        assert cs.changes == changes(db), "the builder and the explicit list differ"
    return cs.result


# -- setting up and looking -----------------------------------------------------------------


def install(root: Path, tree: Tree) -> None:
    """Create ``tree`` under ``root``."""
    for rel, content in sorted(tree.items()):
        path = root / rel
        if content == DIR:
            path.mkdir(parents=True, exist_ok=True)
        else:
            assert isinstance(content, bytes)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)


@contextmanager
def connect(db_path: Path) -> Iterator[sqlite3.Connection]:
    """A plain connection of the test's own (autocommit), closed at exit."""
    with closing(sqlite3.connect(db_path, isolation_level=None)) as conn:
        yield conn


def create_database(db_path: Path, tree: Tree) -> None:
    """The database before the set: WAL, the tables, a row per file of ``tree``."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with connect(db_path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        for statement in SCHEMA:
            conn.execute(statement)
        rows = [(rel, sha(c)) for rel, c in tree.items() if isinstance(c, bytes)]
        conn.executemany("INSERT INTO files (path, sha256) VALUES (?, ?)", rows)


def is_database_file(rel: str) -> bool:
    """The database's own files, when it lies inside the root (``app.db``, ``-wal``, ...)."""
    return rel.rsplit("/", maxsplit=1)[-1].startswith(f"{DB_NAME}.db")


def snapshot(root: Path, *, ours: bool = False) -> Tree:
    """Everything below ``root`` as users see it (without the database's files; with
    ``ours``, our temp files, members and claims too)."""
    from atomictools import is_temp_name

    tree: Tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if is_database_file(rel) or (is_temp_name(name) and not ours):
                continue
            if path.is_symlink():
                tree[rel] = f"<link {os.readlink(path)}>"
            elif path.is_dir():
                tree[rel] = DIR
            else:
                tree[rel] = path.read_bytes()
    return tree


def leftovers(root: Path) -> list[str]:
    """Temp files, change-set members and claims of ours anywhere below ``root``."""
    from atomictools import is_temp_name

    return sorted(
        str(Path(dirpath, name).relative_to(root))
        for dirpath, dirnames, filenames in os.walk(root)
        for name in dirnames + filenames
        if is_temp_name(name)
    )


def db_state(db_path: Path) -> DbState:
    """The user's part of the database: schema and every row (our marker table left out)."""
    with connect(db_path) as conn:
        schema = conn.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' "
            "AND name NOT LIKE 'atomictools_%' ORDER BY type, name"
        ).fetchall()
        tables = [name for kind, name, _sql in schema if kind == "table"]
        rows = {t: sorted(conn.execute(f'SELECT * FROM "{t}"').fetchall()) for t in tables}
    return {"schema": schema, "rows": rows}


def markers(db_path: Path) -> list[tuple[str, str]]:
    """The change-set markers in the database: (txid, record path)."""
    with connect(db_path) as conn:
        has = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'atomictools_changesets'"
        ).fetchone()
        if not has:
            return []
        return sorted(conn.execute("SELECT txid, record FROM atomictools_changesets").fetchall())


def integrity(db_path: Path) -> str:
    with connect(db_path) as conn:
        return ", ".join(str(row[0]) for row in conn.execute("PRAGMA integrity_check"))


def invariant_problems(root: Path, db_path: Path) -> list[str]:
    """Every file of the tree has its row in ``files`` with its sha256, and every row a file."""
    tree = snapshot(root)
    on_disk = {rel: sha(c) for rel, c in tree.items() if isinstance(c, bytes)}
    with connect(db_path) as conn:
        recorded = dict(conn.execute("SELECT path, sha256 FROM files").fetchall())
    problems = [f"{p}: no row" for p in sorted(set(on_disk) - set(recorded))]
    problems += [f"{p}: a row but no file" for p in sorted(set(recorded) - set(on_disk))]
    problems += [
        f"{p}: the row says {recorded[p][:12]}, the file is {on_disk[p][:12]}"
        for p in sorted(set(on_disk) & set(recorded))
        if recorded[p] != on_disk[p]
    ]
    return problems


# -- the child --------------------------------------------------------------------------------


def _apply(root: str, state: str, db_path: str, *, listing: bool, key: str | None) -> None:
    import anyio

    from atomictools import Database, Workspace
    from tests.crashpoints import list_crash_points

    reached = list_crash_points() if listing else []

    async def run() -> str:
        ws = Workspace([root], state_dir=state)
        async with Database(db_path, name=DB_NAME, create=False) as db:
            if key is None:
                result = await apply_with_builder(ws, db)
            else:
                result = await ws.apply_changes(changes(db), idempotency_key=key)
        return str(result.to_json())

    result = anyio.run(run)
    out: dict[str, Any] = {"result": json.loads(result)}
    if listing:
        out["points"] = reached
    print(json.dumps(out), flush=True)


def wire_changes(items: Sequence[dict[str, Any]], db: Database) -> list[Change]:
    """``apply_changes`` items as MCP sends them (write/edit/delete/mkdir/move/copy/sql)."""
    from atomictools import Change, Statement
    from atomictools.engine.text.edits import Edit

    out = []
    for item in items:
        op = item["op"]
        if op == "sql":
            assert item["database"] == db.name, item
            statements = tuple(Statement(s["sql"], s.get("params")) for s in item["statements"])
            out.append(Change("sql", db.name, database=db, statements=statements))
        elif op == "write":
            out.append(Change("write", item["path"], content=item["content"].encode()))
        elif op == "edit":
            edits = tuple(Edit(e["oldText"], e["newText"]) for e in item["edits"])
            out.append(Change("edit", item["path"], edits=edits))
        elif op in ("move", "copy"):
            out.append(
                Change(
                    op,
                    item["destination"],
                    source=item["source"],
                    overwrite=bool(item.get("overwrite")),
                )
            )
        else:
            out.append(Change(op, item["path"]))
    return out


def _loop(root: str, state: str, db_path: str, *, naive: bool) -> None:
    """A stand-in for the server: startup recovery, then one change set per stdin line.

    ``naive`` (the campaign's control): the files as one set, then, a moment later, the
    statements in a transaction of their own; two commit points, so a kill between them
    leaves files and database apart."""
    import anyio

    from atomictools import AtomicToolsError, Database, Workspace

    async def apply(ws: Workspace, db: Database, items: list[dict[str, Any]]) -> str:
        wanted = wire_changes(items, db)
        if not naive:
            return str((await ws.apply_changes(wanted)).to_json())
        files = [c for c in wanted if c.op != "sql"]
        done = await ws.apply_changes(files)
        await anyio.sleep(0.05)  # what the application does between the two
        async with db.transaction() as tx:
            for change in wanted:
                if change.op == "sql":
                    await tx.run(change.statements)
        return str(done.to_json())

    async def run() -> None:
        ws = Workspace([root], state_dir=state)
        await ws.recover_interrupted()
        async with Database(db_path, name=DB_NAME, create=False) as db:
            print("ready", flush=True)
            stdin = anyio.wrap_file(sys.stdin)
            async for line in stdin:
                try:
                    answer: dict[str, Any] = {
                        "ok": json.loads(await apply(ws, db, json.loads(line)))
                    }
                except AtomicToolsError as err:
                    answer = {"error": str(err)}
                print(json.dumps(answer), flush=True)

    anyio.run(run)


def main(argv: list[str]) -> int:
    mode, *args = argv
    if mode == "apply":
        flags = [a for a in args if a.startswith("--")]
        positional = [a for a in args if not a.startswith("--")]
        key = next((f.split("=", 1)[1] for f in flags if f.startswith("--key=")), None)
        root, state, db_path = positional
        _apply(root, state, db_path, listing="--list" in flags, key=key)
    elif mode == "loop":
        root, state, db_path, *rest = args
        _loop(root, state, db_path, naive=rest == ["--naive"])
    else:
        print(f"unknown mode {mode}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main(sys.argv[1:]))
