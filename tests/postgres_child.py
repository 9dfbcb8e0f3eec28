"""Child process of the PostgreSQL fault tests: files and a PostgreSQL database as one set.

Run as a real process (``sys.executable tests/postgres_child.py apply ROOT STATE URL``, the
password in ``PGPASSWORD``) so that ``ATOMICTOOLS_TEST_CRASH_AT=name:n`` with
``ATOMICTOOLS_TEST_CRASH_SIGNAL=KILL`` really SIGKILLs it at that point: its sockets to the
server close with it, and nothing of it runs after. The scenario and the checks live here and
are imported by ``tests/test_postgres_faults.py``, so parent and child agree on the tree and
the rows before and after the set.

``apply ROOT STATE URL [--list]``: the set of ``changes`` on ``Workspace([ROOT],
state_dir=STATE)`` and ``PgDatabase(URL, name="main")``. Prints ``{"result": ...}``; with
``--list`` (no crash) also ``"points"``, every crash point the set passed, in order.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

    from atomictools import Change
    from atomictools.engine.db.postgres import PgDatabase

DB_NAME = "main"
DIR = "<dir>"
Tree = dict[str, bytes | str]

BEFORE: Tree = {
    "a.txt": b"alpha old\n",
    "b.txt": b"line one\nline two\n",
    "gone.txt": b"deleted content\n",
}
AFTER: Tree = {
    "a.txt": b"alpha new\n",
    "b.txt": b"line one\nline 2\n",
    "new": DIR,
    "new/n.txt": b"inside a new directory\n",
}
SCHEMA = (
    "CREATE TABLE files (path TEXT PRIMARY KEY, sha256 TEXT NOT NULL)",
    "CREATE TABLE counter (id INTEGER PRIMARY KEY CHECK (id = 1), n INTEGER NOT NULL)",
    "INSERT INTO counter (id, n) VALUES (1, 0)",
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _digest(rel: str) -> str:
    content = AFTER[rel]
    assert isinstance(content, bytes)
    return sha(content)


def statements() -> list[tuple[str, Any]]:
    """The rows that record the set's files, and a counter that is not idempotent."""
    return [
        ("UPDATE files SET sha256 = ? WHERE path = ?", [_digest("a.txt"), "a.txt"]),
        ("UPDATE files SET sha256 = :sha WHERE path = :path",
         {"sha": _digest("b.txt"), "path": "b.txt"}),
        ("DELETE FROM files WHERE path = ?", ["gone.txt"]),
        ("INSERT INTO files (path, sha256) VALUES (?, ?)", ["new/n.txt", _digest("new/n.txt")]),
        ("UPDATE counter SET n = n + 1 WHERE id = 1", None),
    ]  # fmt: skip


def changes(db: PgDatabase) -> list[Change]:
    """Files and one PostgreSQL step, the step in between the file changes."""
    from atomictools import Change, Statement
    from atomictools.engine.text.edits import Edit

    sql = tuple(Statement(text, params) for text, params in statements())
    return [
        Change("write", "a.txt", content=b"alpha new\n"),
        Change("sql", db.name, database=db, statements=sql),
        Change("edit", "b.txt", edits=(Edit("line two\n", "line 2\n"),)),
        Change("mkdir", "new"),
        Change("write", "new/n.txt", content=b"inside a new directory\n"),
        Change("delete", "gone.txt"),
    ]


# -- setting up and looking (used by the tests) ---------------------------------------------


def install(root: Path, tree: Tree) -> None:
    for rel, content in sorted(tree.items()):
        path = root / rel
        if content == DIR:
            path.mkdir(parents=True, exist_ok=True)
        else:
            assert isinstance(content, bytes)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)


def snapshot(root: Path, *, ours: bool = False) -> Tree:
    """Everything below ``root`` as users see it (with ``ours``, our temp files too)."""
    from atomictools import is_temp_name

    tree: Tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if is_temp_name(name) and not ours:
                continue
            rel = path.relative_to(root).as_posix()
            tree[rel] = DIR if path.is_dir() else path.read_bytes()
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


def create_schema(conn: psycopg.Connection[tuple[Any, ...]], tree: Tree) -> None:
    """The tables before the set, a row per file of ``tree`` (``conn`` in autocommit)."""
    for statement in SCHEMA:
        conn.execute(statement)
    for rel, content in sorted(tree.items()):
        if isinstance(content, bytes):
            conn.execute("INSERT INTO files (path, sha256) VALUES (%s, %s)", [rel, sha(content)])


def db_state(conn: psycopg.Connection[tuple[Any, ...]]) -> dict[str, Any]:
    files = conn.execute("SELECT path, sha256 FROM files ORDER BY path").fetchall()
    counter = conn.execute("SELECT n FROM counter").fetchall()
    return {"files": files, "counter": counter}


def markers(conn: psycopg.Connection[tuple[Any, ...]]) -> list[tuple[str, str]]:
    """The change-set markers: (txid, record)."""
    exists = conn.execute("SELECT to_regclass('atomictools_changesets')").fetchone()
    if exists is None or exists[0] is None:
        return []
    rows = conn.execute("SELECT txid, record FROM atomictools_changesets ORDER BY txid")
    return [(str(t), str(r)) for t, r in rows.fetchall()]


def expected_db(tree: Tree, counter: int) -> dict[str, Any]:
    files = sorted((rel, sha(c)) for rel, c in tree.items() if isinstance(c, bytes))
    return {"files": files, "counter": [(counter,)]}


# -- the child ------------------------------------------------------------------------------


def _apply(root: str, state: str, url: str, *, listing: bool) -> None:
    import anyio

    from atomictools import Workspace
    from atomictools.engine.db.postgres import PgDatabase
    from tests.crashpoints import list_crash_points

    reached = list_crash_points() if listing else []

    async def run() -> str:
        ws = Workspace([root], state_dir=state)
        async with PgDatabase(url, name=DB_NAME) as db:
            result = await ws.apply_changes(changes(db))
        return str(result.to_json())

    result = anyio.run(run, backend="asyncio")
    out: dict[str, Any] = {"result": json.loads(result)}
    if listing:
        out["points"] = reached
    print(json.dumps(out), flush=True)


def main(argv: list[str]) -> int:
    mode, *args = argv
    if mode != "apply":
        print(f"unknown mode {mode}", file=sys.stderr)
        return 2
    flags = [a for a in args if a.startswith("--")]
    root, state, url = [a for a in args if not a.startswith("--")]
    _apply(root, state, url, listing="--list" in flags)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main(sys.argv[1:]))
