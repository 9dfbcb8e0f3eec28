"""Change sets with a database step, through the embedding API: files and one SQLite database
commit as one unit (the database COMMIT of the set's marker row is the commit point).

Everything is read back through plain ``sqlite3`` connections and the file system, never through
the engine's own connections. Crashes, cancellation and injected faults have their own files
(``test_mixed_crash``, ``test_mixed_cancel``, ``test_mixed_faults``); this one covers what a
caller sees: outcomes, dry runs, errors that name the step, the one-database rule, read-only
refusals, idempotency keys, the history entry and its undo, and the marker table's upkeep.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from atomictools import (
    Change,
    CommitUnknownError,
    Database,
    DatabaseError,
    InvalidArgumentError,
    NotUndoableError,
    ReadOnlyError,
    RecoveryNeededError,
    Statement,
    Workspace,
    recover,
)
from atomictools.engine.changes.idempotency import IdempotencyKeyReusedError
from atomictools.engine.changes.markers import MARKER_TABLE
from atomictools.engine.db.dberrors import StatementError
from atomictools.engine.durable.tempfiles import is_temp_name

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the Database runs on aiosqlite


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
async def db(root: Path) -> AsyncIterator[Database]:
    path = root / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE files (path TEXT PRIMARY KEY, sha TEXT NOT NULL)")
    conn.close()
    database = Database(path, name="app.db")
    async with database:
        yield database


def rows(path: Path, sql: str = "SELECT path, sha FROM files ORDER BY path") -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def markers(path: Path) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        known = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE name = ?", (MARKER_TABLE,)
        ).fetchone()
        return conn.execute(f"SELECT * FROM {MARKER_TABLE}").fetchall() if known else []
    finally:
        conn.close()


def ours(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if is_temp_name(p.name))


def journals(state: Path) -> list[str]:
    directory = state / "journals"
    return sorted(os.listdir(directory)) if directory.exists() else []


async def test_builder_commits_files_and_rows_as_one(
    root: Path, db: Database, private_state_dir: Path
) -> None:
    (root / "old.txt").write_bytes(b"v1\n")
    ws = Workspace([root])
    async with ws.changeset() as cs:
        cs.write("new.txt", "fresh\n")
        cs.sql(db, "INSERT INTO files VALUES (?, ?)", ("new.txt", sha(b"fresh\n")))
        cs.sql(db, "INSERT INTO files VALUES (?, ?)", ("old.txt", sha(b"v2\n")))
        cs.edit("old.txt", [("v1", "v2")])
    result = cs.result
    assert result is not None
    assert result.applied
    assert [c.op for c in result.changes] == ["write", "sql", "edit"]  # consecutive sql: one
    step = result.changes[1]
    assert step.path == "app.db"
    assert [(s.rowcount, s.lastrowid) for s in step.statements] == [(1, 1), (1, 2)]
    assert (root / "new.txt").read_bytes() == b"fresh\n"
    assert (root / "old.txt").read_bytes() == b"v2\n"
    assert rows(root / "app.db") == [("new.txt", sha(b"fresh\n")), ("old.txt", sha(b"v2\n"))]
    assert markers(root / "app.db") == []  # the set is over: its marker went
    assert ours(root) == []
    assert journals(private_state_dir) == []


async def test_dry_run_runs_the_statements_and_rolls_them_back(root: Path, db: Database) -> None:
    ws = Workspace([root])
    changes = [
        Change("write", "a.txt", content=b"a\n"),
        Change(
            "sql",
            db.name,
            database=db,
            statements=(
                Statement("INSERT INTO files VALUES ('a.txt', 'x')"),
                Statement("UPDATE files SET sha = 'y'"),
            ),
        ),
    ]
    result = await ws.apply_changes(changes, dry_run=True)
    assert not result.applied
    assert [(s.rowcount, s.lastrowid) for s in result.changes[1].statements] == [(1, 1), (1, 1)]
    assert rows(root / "app.db") == []
    assert not (root / "a.txt").exists()
    assert ours(root) == []
    done = await ws.apply_changes(changes)  # the dry run left the database free
    assert done.applied
    assert rows(root / "app.db") == [("a.txt", "y")]


async def test_a_failing_statement_names_its_step_and_changes_nothing(
    root: Path, db: Database, private_state_dir: Path
) -> None:
    (root / "keep.txt").write_bytes(b"before\n")
    ws = Workspace([root])
    changes = [
        Change("write", "keep.txt", content=b"after\n"),
        Change("mkdir", "made"),
        Change(
            "sql",
            db.name,
            database=db,
            statements=(
                Statement("INSERT INTO files VALUES ('keep.txt', 'x')"),
                Statement("INSERT INTO files VALUES ('keep.txt', 'again')"),
            ),
        ),
    ]
    with pytest.raises(StatementError) as caught:
        await ws.apply_changes(changes)
    message = str(caught.value)
    assert message.startswith("change 3 of 3 (sql): statement 2 of 2 (INSERT INTO files")
    assert "UNIQUE constraint failed" in message
    assert message.endswith("; nothing was committed, and no file was changed")
    assert (root / "keep.txt").read_bytes() == b"before\n"
    assert not (root / "made").exists()  # the mkdir made during planning is undone too
    assert rows(root / "app.db") == []
    assert ours(root) == []
    assert journals(private_state_dir) == []


async def test_one_database_per_set(root: Path, db: Database, tmp_path: Path) -> None:
    other = Database(tmp_path / "other.db", name="other", create=True)
    async with other:
        await other.execute("CREATE TABLE t (n)")
        ws = Workspace([root])
        changes = [
            Change("write", "a.txt", content=b"a"),
            Change("sql", db.name, database=db, statements=(Statement("DELETE FROM files"),)),
            Change(
                "sql", "other", database=other, statements=(Statement("INSERT INTO t VALUES (1)"),)
            ),
        ]
        with pytest.raises(InvalidArgumentError, match=r"change 3 of 3 \(sql\): .*one database"):
            await ws.apply_changes(changes)
        assert not (root / "a.txt").exists()
        assert rows(tmp_path / "other.db", "SELECT * FROM t") == []


async def test_read_only_database_or_workspace_refuses_the_set(root: Path, db: Database) -> None:
    reader = Database(root / "app.db", name="app.db", read_only=True)
    step = Change("sql", "app.db", database=reader, statements=(Statement("DELETE FROM files"),))
    with pytest.raises(ReadOnlyError, match=r"change 2 of 2 \(sql\): database app.db is read"):
        await Workspace([root]).apply_changes([Change("write", "a.txt", content=b"a"), step])
    writable = Change("sql", "app.db", database=db, statements=(Statement("DELETE FROM files"),))
    with pytest.raises(ReadOnlyError, match="read-only"):
        await Workspace([root], read_only=True).apply_changes([writable])
    assert not (root / "a.txt").exists()


async def test_a_key_runs_the_statements_once(root: Path, db: Database) -> None:
    ws = Workspace([root])

    def changes(value: str) -> list[Change]:
        return [
            Change("write", "a.txt", content=value.encode()),
            Change(
                "sql",
                db.name,
                database=db,
                statements=(Statement("INSERT INTO files VALUES (?, ?)", (value, "k")),),
            ),
        ]

    first = await ws.apply_changes(changes("one"), idempotency_key="k-1")
    again = await ws.apply_changes(changes("one"), idempotency_key="k-1")
    assert again == first
    assert rows(root / "app.db") == [("one", "k")]  # not inserted twice
    with pytest.raises(IdempotencyKeyReusedError):
        await ws.apply_changes(changes("two"), idempotency_key="k-1")
    assert rows(root / "app.db") == [("one", "k")]


async def test_history_entry_and_undo_of_a_mixed_set(root: Path, db: Database) -> None:
    (root / "code.py").write_bytes(b"old code\n")
    ws = Workspace([root])
    async with ws.changeset() as cs:
        cs.write("code.py", "new code\n")
        cs.sql(db, "ALTER TABLE files ADD COLUMN size INTEGER")
        cs.sql(db, "INSERT INTO files VALUES ('code.py', ?, 9)", (sha(b"new code\n"),))
    assert cs.result is not None
    (entry,) = await ws.history_entries(limit=1)
    assert entry.id == cs.result.change_id
    assert entry.database == "app.db"
    assert entry.statements == (
        "ALTER TABLE files ADD COLUMN size INTEGER",
        "INSERT INTO files VALUES ('code.py', ?, 9)",
    )
    assert entry.rows_changed == 1
    assert [p.path for p in entry.paths] == ["code.py"]
    assert not entry.undoable
    with pytest.raises(NotUndoableError, match="name the files in paths"):
        await ws.undo(entry.id)
    with pytest.raises(NotUndoableError, match=r"database app\.db"):
        await ws.undo(last=1)
    assert (root / "code.py").read_bytes() == b"new code\n"
    undone = await ws.undo(entry.id, paths=["code.py"])
    assert undone.applied
    assert (root / "code.py").read_bytes() == b"old code\n"
    assert rows(root / "app.db", "SELECT path, size FROM files") == [("code.py", 9)]


async def test_the_marker_table_is_ours_alone(root: Path, db: Database) -> None:
    ws = Workspace([root])
    async with ws.changeset() as cs:
        cs.write("a.txt", "a")
        cs.sql(db, "INSERT INTO files VALUES ('a.txt', 'x')")
    for sql in (
        f"DELETE FROM {MARKER_TABLE}",
        f"INSERT INTO {MARKER_TABLE} (txid, record, created) VALUES (?, ?, ?)",
        f"UPDATE {MARKER_TABLE} SET txid = 'x'",
        f"DROP TABLE {MARKER_TABLE}",
        f"CREATE TRIGGER t AFTER INSERT ON {MARKER_TABLE} BEGIN SELECT 1; END",
        f"ALTER TABLE {MARKER_TABLE} ADD COLUMN x",
    ):
        params = ("t", "/nowhere", 1.0) if "?" in sql else None
        with pytest.raises(StatementError, match="change-set commit markers"):
            await db.execute(sql, params)
    assert MARKER_TABLE not in [t.name for t in await db.schema()]
    assert (await db.query(f"SELECT count(*) FROM {MARKER_TABLE}")).rows == ((0,),)


async def test_stale_markers_go_with_the_next_set(root: Path, db: Database, tmp_path: Path) -> None:
    ws = Workspace([root])
    async with ws.changeset() as cs:  # creates the marker table
        cs.sql(db, "INSERT INTO files VALUES ('x', 'x')")
    live_record = tmp_path / "live.journal.json"
    live_record.write_text("{}")
    conn = sqlite3.connect(root / "app.db")
    with conn:
        conn.execute(
            f"INSERT INTO {MARKER_TABLE} VALUES ('gone', ?, 1.0), ('live', ?, 1.0)",
            (str(tmp_path / "gone.journal.json"), str(live_record)),
        )
    conn.close()
    async with ws.changeset() as cs:
        cs.write("b.txt", "b")
        cs.sql(db, "INSERT INTO files VALUES ('b.txt', 'y')")
    # A marker whose record is gone belongs to a set that is over; one whose record exists may
    # still decide a crashed set, so it stays.
    assert [m[0] for m in markers(root / "app.db")] == ["live"]


async def test_a_set_cannot_change_the_file_of_its_own_database(root: Path, db: Database) -> None:
    ws = Workspace([root])
    step = Change("sql", db.name, database=db, statements=(Statement("DELETE FROM files"),))
    for change in (
        Change("delete", "app.db"),
        Change("write", "app.db-wal", content=b"x"),
        Change("move", "moved.db", source="app.db"),
    ):
        with pytest.raises(InvalidArgumentError, match="is the database this set's statements"):
            await ws.apply_changes([step, change])
    assert (root / "app.db").exists()
    assert not (root / "moved.db").exists()
    assert ours(root) == []


class _CommitReportsFailure:
    """A ``SqlDatabase`` (the protocol a change set sees) over a real one whose COMMIT reports
    an error, as a failed ``fdatasync`` after the WAL append does, and whose marker cannot be
    read back: a fault SQLite cannot be made to produce on demand, injected through the
    protocol. ``committed`` decides whether the real COMMIT runs before the error."""

    def __init__(self, database: Database, *, committed: bool) -> None:
        self.database = database
        self.committed = committed
        self.name = database.name
        self.path = database.path
        self.read_only = False
        self.kind = "sqlite"

    @contextlib.asynccontextmanager
    async def set_transaction(self) -> AsyncIterator[Any]:
        if self.committed:
            async with self.database.set_transaction() as tx:
                yield tx
        else:
            with contextlib.suppress(_Abandon):
                async with self.database.set_transaction() as tx:
                    yield tx
                    raise _Abandon  # rolled back: the COMMIT never runs
        raise CommitUnknownError("COMMIT failed: disk I/O error")

    async def decide_marker(self, txid: str, record: str) -> bool:
        raise DatabaseError("database app.db cannot be read: disk I/O error")

    async def drop_marker(self, txid: str) -> None:
        await self.database.drop_marker(txid)


class _Abandon(Exception):
    pass


@pytest.mark.parametrize("committed", [True, False])
async def test_an_unknowable_commit_is_left_to_recovery_which_asks_the_marker(
    root: Path, db: Database, private_state_dir: Path, committed: bool
) -> None:
    (root / "a.txt").write_bytes(b"old\n")
    ws = Workspace([root])
    flaky = _CommitReportsFailure(db, committed=committed)
    changes = [
        Change("write", "a.txt", content=b"new\n"),
        Change(
            "sql",
            db.name,
            database=flaky,  # type: ignore[arg-type]
            statements=(Statement("INSERT INTO files VALUES ('a.txt', 'n')"),),
        ),
    ]
    with pytest.raises(RecoveryNeededError, match="could not be read back"):
        await ws.apply_changes(changes)
    # Nothing is guessed: the staged file and the prepared record wait for a decision.
    assert (root / "a.txt").read_bytes() == b"old\n"
    assert ours(root) != []
    assert len(journals(private_state_dir)) == 1
    report = recover([root], state_dir=private_state_dir)
    assert report.problems == []
    assert (root / "a.txt").read_bytes() == (b"new\n" if committed else b"old\n")
    assert rows(root / "app.db") == ([("a.txt", "n")] if committed else [])
    assert ours(root) == []
    assert journals(private_state_dir) == []
    assert markers(root / "app.db") == []
