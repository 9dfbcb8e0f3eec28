"""Real faults in a change set that changes files and a SQLite database as one (issue 17).

Every fault must leave the files and the database both as before (or, past the commit point,
both as after), no temp, member or claim file of ours in the root, no journal record and no
marker row, and an error whose message names the change that failed (``change N of M (sql):
...`` or the file change) and is true about what changed.

* statement errors (no such table; a constraint violation in statement 2 of 3), a precondition
  (``expected_sha256``) failing before or after the database step, and a precondition race
  with a concurrent writer in either order;
* the disk filling up for real (a size-limited tmpfs, root only): while files are staged, and
  under the database, where the statements or the COMMIT fail with SQLITE_FULL;
* the database busy (another connection holds ``BEGIN IMMEDIATE`` past ``busy_timeout``), and
  a cancel during that wait;
* refusals: a read-only ``Database``, a read-only ``Workspace``, two databases in one set,
  ATTACH, transaction control, durability pragmas, and any change to the marker table
  (including a user's table renamed onto its name before it exists, which is refused);
* a failed COMMIT, decided from the marker: in process, a COMMIT that happened but reported an
  error (marker present: the set is finished), one that did not happen (marker absent: rolled
  back), and one whose marker cannot be read (``RecoveryNeededError``, the prepared set kept
  for ``atomictools.recover`` or the next call to finish); and for real, under
  ``strace -e inject=fdatasync:error=EIO`` on the database's WAL in a child process, after which
  the child exits (as after a crash) and recovery runs (also with a pooled reader open, whose
  shared index does not show the frames SQLite wrote before the failed sync).

aiosqlite hands results back through asyncio, so the in-process tests run on asyncio only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from atomictools import (
    Change,
    CommitUnknownError,
    Database,
    DatabaseError,
    DiskFullError,
    InvalidArgumentError,
    Limits,
    PreconditionFailedError,
    ReadOnlyError,
    RecoveryNeededError,
    Statement,
    Workspace,
    is_temp_name,
    recover,
)
from atomictools.engine.changes.markers import MARKER_TABLE
from atomictools.engine.db import database as database_module
from atomictools.engine.db.dberrors import DatabaseBusyError, StatementError
from atomictools.engine.durable.steps import CRASH_ENV, observe_steps
from tests.conftest import mounted_tmpfs, read_record
from tests.strace import STRACE, needs_strace

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parent.parent
SET_UNCHANGED = "nothing was committed, and no file was changed"
A_OLD, A_NEW = b"alpha old\n", b"alpha new\n"
BIG = bytes(range(256)) * 1200  # 300 KiB
SCHEMA = (
    "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT UNIQUE, n INTEGER CHECK (n >= 0))",
    "INSERT INTO t (v, n) VALUES ('one', 1), ('two', 2)",
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ours(top: Path) -> list[str]:
    return sorted(
        os.path.join(dirpath, name)
        for dirpath, dirnames, filenames in os.walk(top)
        for name in dirnames + filenames
        if is_temp_name(name) or name.startswith(".atomictools")
    )


@contextlib.contextmanager
def plain(path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(path, timeout=5, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def files_of(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every regular file below root with its bytes and inode (a replace changes the inode)."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            found[str(path.relative_to(root))] = (path.read_bytes(), path.stat().st_ino)
    return found


def db_dump(path: Path) -> list[str]:
    """The whole database as SQL, read by an independent connection (markers left out)."""
    with plain(path) as conn:
        return [line for line in conn.iterdump() if MARKER_TABLE not in line]


def marker_rows(path: Path) -> int:
    with plain(path) as conn:
        found = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (MARKER_TABLE,)
        ).fetchone()
        if found is None:
            return 0
        return int(conn.execute(f"SELECT count(*) FROM {MARKER_TABLE}").fetchone()[0])


class World:
    """A root, a state directory, and a database (outside the root unless told otherwise)."""

    def __init__(self, tmp_path: Path, db_path: Path | None = None, **db_args: Any) -> None:
        self.root = tmp_path / "root"
        self.state = tmp_path / "state"
        self.root.mkdir(exist_ok=True)
        self.db_path = db_path or tmp_path / "db" / "app.db"
        self.db_path.parent.mkdir(exist_ok=True)
        self.ws = Workspace([self.root], state_dir=self.state, limits=Limits(chunk_bytes=16384))
        self.db = Database(self.db_path, name="app", **db_args)
        self.before: tuple[dict[str, tuple[bytes, int]], list[str]] | None = None

    async def setup(self) -> None:
        await self.db.run_statements([Statement(sql) for sql in SCHEMA])
        (self.root / "a.txt").write_bytes(A_OLD)
        (self.root / "big.bin").write_bytes(BIG)
        self.remember()

    def remember(self) -> None:
        self.before = (files_of(self.root), db_dump(self.db_path))

    def sql(self, *statements: str | tuple[str, Any]) -> Change:
        made = tuple(
            Statement(s) if isinstance(s, str) else Statement(s[0], s[1]) for s in statements
        )
        return Change("sql", self.db.name, database=self.db, statements=made)

    def journal_records(self) -> list[str]:
        return sorted(str(p) for p in self.state.rglob("*.journal.json"))

    def assert_unchanged(self, where: str) -> None:
        assert self.before is not None
        files, dump = self.before
        assert files_of(self.root) == files, f"{where}: a file changed"
        assert db_dump(self.db_path) == dump, f"{where}: the database changed"
        self.assert_clean(where)

    def assert_clean(self, where: str) -> None:
        assert ours(self.root) == [], f"{where}: files of ours left in the root"
        assert self.journal_records() == [], f"{where}: a journal record is left"
        assert marker_rows(self.db_path) == 0, f"{where}: a marker row is left"
        with plain(self.db_path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert len(self.ws._locks) == 0, f"{where}: a per-path lock outlived the call"

    async def next_set_works(self, content: bytes = b"the next set\n") -> None:
        """The workspace and the database are not stuck: a mixed set goes through."""
        with anyio.fail_after(30):
            done = await self.ws.apply_changes(
                [
                    Change("write", "next.txt", content=content),
                    self.sql(("INSERT INTO t (v, n) VALUES (?, 0)", (sha(content),))),
                ]
            )
        assert done.applied
        assert (self.root / "next.txt").read_bytes() == content
        with plain(self.db_path) as conn:
            assert conn.execute("SELECT count(*) FROM t WHERE v = ?", (sha(content),)).fetchone()
        self.assert_clean("after the next set")


@pytest.fixture
async def world(tmp_path: Path) -> Any:
    made = World(tmp_path)
    try:
        await made.setup()
        yield made
    finally:
        await made.db.close()


# -- statement errors and preconditions -----------------------------------------------------


STATEMENT_FAULTS = {
    "no-such-table": (
        ("INSERT INTO t (v, n) VALUES ('three', 3)", "INSERT INTO nope VALUES (1)", "SELECT 1"),
        "statement 2 of 3 (INSERT INTO nope VALUES (1)) failed: no such table: nope",
    ),
    "unique": (
        (
            "UPDATE t SET n = n + 10",
            "INSERT INTO t (v, n) VALUES ('one', 5)",
            "DELETE FROM t WHERE v = 'two'",
        ),
        "statement 2 of 3 (INSERT INTO t (v, n) VALUES ('one', 5)) failed: UNIQUE constraint "
        "failed: t.v",
    ),
    "check": (
        ("UPDATE t SET n = n + 10", "UPDATE t SET n = -1 WHERE v = 'one'", "SELECT 1"),
        "failed: CHECK constraint failed",
    ),
}


@pytest.mark.parametrize("fault", list(STATEMENT_FAULTS))
async def test_a_failing_statement_names_its_step_and_changes_nothing(
    world: World, fault: str
) -> None:
    statements, said = STATEMENT_FAULTS[fault]
    with pytest.raises(StatementError) as caught:
        await world.ws.apply_changes(
            [
                Change("write", "a.txt", content=A_NEW),
                Change("write", "big.bin", content=BIG[::-1]),
                world.sql(*statements),
                Change("write", "new.txt", content=b"new\n"),
            ]
        )
    message = str(caught.value)
    assert message.startswith("change 3 of 4 (sql): "), message
    assert said in message, message
    assert message.endswith(SET_UNCHANGED), message
    assert caught.value.changed is False
    world.assert_unchanged(fault)
    await world.next_set_works()


@pytest.mark.parametrize("where", ["before", "after"])
async def test_a_failed_precondition_beside_a_sql_step_changes_nothing(
    world: World, where: str
) -> None:
    stale = Change("write", "a.txt", content=A_NEW, expected_sha256=sha(b"not the content"))
    step = world.sql("INSERT INTO t (v, n) VALUES ('three', 3)")
    other = Change("write", "new.txt", content=b"new\n")
    changes = [stale, step, other] if where == "before" else [other, step, stale]
    index = 1 if where == "before" else 3
    with pytest.raises(PreconditionFailedError) as caught:
        await world.ws.apply_changes(changes)
    message = str(caught.value)
    assert message.startswith(f"change {index} of 3 (write): "), message
    assert "a.txt" in message, message
    assert "nothing was changed" in message, message
    world.assert_unchanged(f"stale expected_sha256 {where} the sql step")
    await world.next_set_works()


async def test_an_expected_sha256_race_is_decided_by_the_path_lock(world: World) -> None:
    """The set against a concurrent ``write`` with the same ``expected_sha256``, in both
    orders: whichever takes the path first wins, the other is refused and changes nothing."""
    old = sha(A_OLD)
    slow = "INSERT INTO t (v, n) WITH RECURSIVE c(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM c "
    slow += "WHERE k < 100000) SELECT 'r' || k, k FROM c"

    # 1. The set first: the intruder starts while the set runs its statements.
    in_statements = anyio.Event()
    intruder_error: list[BaseException] = []

    async def intruder() -> None:
        await in_statements.wait()
        try:
            await world.ws.write("a.txt", b"intruder\n", expected_sha256=old)
        except PreconditionFailedError as err:
            intruder_error.append(err)

    async def the_set() -> None:
        def observer(name: str) -> None:
            if name == "changeset.prepare":
                in_statements.set()

        with observe_steps(observer):
            await world.ws.apply_changes(
                [
                    Change("write", "a.txt", content=A_NEW, expected_sha256=old),
                    world.sql(slow, ("UPDATE t SET n = 0 WHERE v = ?", ("one",))),
                ]
            )

    async with anyio.create_task_group() as tg:
        tg.start_soon(intruder)
        tg.start_soon(the_set)
    assert (world.root / "a.txt").read_bytes() == A_NEW
    assert len(intruder_error) == 1, "the intruder's stale write was not refused"
    assert "a.txt" in str(intruder_error[0])
    with plain(world.db_path) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (100_002,)
    world.assert_clean("set first")

    # 2. The intruder first: a large streamed write holds the path; the set waits, then fails.
    (world.root / "a.txt").write_bytes(A_OLD)
    await world.db.execute("DELETE FROM t WHERE v LIKE 'r%'")
    world.remember()
    writing = anyio.Event()
    set_error: list[BaseException] = []
    big = os.urandom(2 * 1024 * 1024)

    async def big_intruder() -> None:
        def observer(name: str) -> None:
            if name == "write.chunk":
                writing.set()

        with observe_steps(observer):
            await world.ws.write("a.txt", big, expected_sha256=old)

    async def late_set() -> None:
        await writing.wait()
        try:
            await world.ws.apply_changes(
                [
                    Change("write", "a.txt", content=A_NEW, expected_sha256=old),
                    world.sql(("UPDATE t SET n = 0 WHERE v = ?", ("one",))),
                ]
            )
        except PreconditionFailedError as err:
            set_error.append(err)

    async with anyio.create_task_group() as tg:
        tg.start_soon(big_intruder)
        tg.start_soon(late_set)
    assert (world.root / "a.txt").read_bytes() == big
    assert len(set_error) == 1, "the set with a stale expected_sha256 was not refused"
    assert str(set_error[0]).startswith("change 1 of 2 (write): "), str(set_error[0])
    assert world.before is not None
    assert db_dump(world.db_path) == world.before[1]
    world.assert_clean("intruder first")


# -- a full disk, for real -------------------------------------------------------------------


def fill(directory: Path) -> Path:
    """Fill the file system under ``directory`` to the last byte; returns the filler."""
    filler = directory / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for size in (1 << 20, 65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    return filler


async def test_a_full_disk_while_staging_changes_nothing(tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path, "2m") as mount:
        world = World(tmp_path, db_path=tmp_path / "db" / "app.db")
        world.root = mount  # the files on the small file system, the database elsewhere
        world.ws = Workspace([mount], state_dir=world.state, limits=Limits(chunk_bytes=16384))
        try:
            await world.setup()
            filler = fill(mount)
            # Room for a.txt's staged copy, not for big.bin's: it fails after some chunks.
            os.truncate(filler, filler.stat().st_size - 256 * 1024)
            world.remember()
            staged: list[list[str]] = []

            def observer(name: str) -> None:
                if name == "changeset.prepare":
                    staged.append(ours(mount))

            with pytest.raises(DiskFullError) as caught, observe_steps(observer):
                await world.ws.apply_changes(
                    [
                        Change("write", "a.txt", content=A_NEW),
                        world.sql("INSERT INTO t (v, n) VALUES ('three', 3)"),
                        Change("write", "big.bin", content=os.urandom(512 * 1024)),
                    ]
                )
            message = str(caught.value)
            assert message.startswith("change 3 of 3 (write): cannot write big.bin: the disk is")
            assert message.endswith("nothing was changed"), message
            assert staged, "a.txt was not staged before big.bin failed"
            assert staged[0], "a.txt's staged copy was not seen in the root"
            world.assert_unchanged("full disk while staging")
            filler.unlink()
            await world.next_set_works()
        finally:
            await world.db.close()


@pytest.mark.parametrize("where", ["statement", "commit"])
async def test_a_full_disk_under_the_database_rolls_the_set_back(
    tmp_path: Path, where: str
) -> None:
    """SQLITE_FULL from the statements (a large insert spills to the WAL) or from the COMMIT
    (the WAL append of a small change): nothing committed, no file changed, and it says so."""
    with mounted_tmpfs(tmp_path, "2m") as mount:
        world = World(tmp_path, db_path=mount / "app.db")
        try:
            await world.setup()
            await world.next_set_works(b"warm-up\n")  # the marker table exists, WAL warmed
            filler = fill(mount)
            world.remember()
            statement = (
                "INSERT INTO t (v, n) VALUES (hex(randomblob(1500000)), 4)"
                if where == "statement"
                else "INSERT INTO t (v, n) VALUES ('three', 3)"
            )
            with pytest.raises(DatabaseError) as caught:
                await world.ws.apply_changes(
                    [
                        Change("write", "a.txt", content=A_NEW),
                        Change("write", "big.bin", content=BIG[::-1]),
                        world.sql(statement),
                    ]
                )
            message = str(caught.value)
            assert "the disk is full" in message, message
            assert str(world.db_path) in message, message
            if where == "statement":
                assert message.startswith("change 3 of 3 (sql): statement 1 of 1"), message
            else:
                assert message.startswith("cannot commit to database app"), message
            assert message.endswith(SET_UNCHANGED), message
            assert caught.value.changed is False
            filler.unlink()
            world.assert_unchanged(f"SQLITE_FULL in the {where}")
            await world.next_set_works()
        finally:
            await world.db.close()


# -- a busy database ------------------------------------------------------------------------


async def test_a_busy_database_is_a_clear_error_and_the_staged_files_go(tmp_path: Path) -> None:
    world = World(tmp_path, busy_timeout=0.3)
    try:
        await world.setup()
        staged_seen: list[list[str]] = []

        def observer(name: str) -> None:
            if name == "changeset.prepare":
                staged_seen.append(ours(world.root))

        with plain(world.db_path) as other:
            other.execute("BEGIN IMMEDIATE")
            other.execute("UPDATE t SET n = n WHERE v = 'one'")
            started = time.monotonic()
            with pytest.raises(DatabaseBusyError) as caught, observe_steps(observer):
                await world.ws.apply_changes(
                    [
                        Change("write", "a.txt", content=A_NEW),
                        Change("write", "big.bin", content=BIG[::-1]),
                        world.sql("INSERT INTO t (v, n) VALUES ('three', 3)"),
                    ]
                )
            waited = time.monotonic() - started
            other.execute("ROLLBACK")
        message = str(caught.value)
        assert "cannot start a transaction on app" in message, message
        assert "locked" in message, message
        assert "retry" in message, message
        assert "nothing was committed" in message, message
        assert 0.3 <= waited < 5, waited
        assert staged_seen, "no file was staged"
        assert staged_seen[-1], "the staged files were not seen in the root"
        world.assert_unchanged("busy database")
        await world.next_set_works()
    finally:
        await world.db.close()


async def test_a_cancel_while_waiting_for_a_busy_database_returns_at_once(
    tmp_path: Path,
) -> None:
    world = World(tmp_path, busy_timeout=30.0)
    try:
        await world.setup()
        with plain(world.db_path) as other:
            other.execute("BEGIN IMMEDIATE")
            started = time.monotonic()
            with anyio.move_on_after(0.3) as scope:
                await world.ws.apply_changes(
                    [
                        Change("write", "big.bin", content=BIG[::-1]),
                        world.sql("INSERT INTO t (v, n) VALUES ('three', 3)"),
                    ]
                )
            took = time.monotonic() - started
            other.execute("ROLLBACK")
        assert scope.cancelled_caught
        assert took < 2.0, f"the cancel took {took:.2f} s to land in the busy wait"
        world.assert_unchanged("cancelled while the database was busy")
        await world.next_set_works()
    finally:
        await world.db.close()


# -- refusals -------------------------------------------------------------------------------


async def test_a_read_only_database_is_refused(world: World) -> None:
    async with Database(world.db_path, name="ro", read_only=True) as ro:
        with pytest.raises(ReadOnlyError) as caught:
            await world.ws.apply_changes(
                [
                    Change("write", "a.txt", content=A_NEW),
                    Change("sql", ro.name, database=ro, statements=(Statement("DELETE FROM t"),)),
                ]
            )
    message = str(caught.value)
    assert message.startswith("change 2 of 2 (sql): database ro is read-only"), message
    world.assert_unchanged("read-only database")


async def test_a_read_only_workspace_is_refused(world: World) -> None:
    ro = Workspace([world.root], state_dir=world.state, read_only=True)
    for changes in (
        [Change("write", "a.txt", content=A_NEW), world.sql("DELETE FROM t")],
        [world.sql("DELETE FROM t"), Change("write", "a.txt", content=A_NEW)],
    ):
        with pytest.raises(ReadOnlyError) as caught:
            await ro.apply_changes(changes)
        assert "read-only" in str(caught.value)
    with pytest.raises(ReadOnlyError):
        async with ro.changeset() as cs:
            cs.sql(world.db, "DELETE FROM t")
    world.assert_unchanged("read-only workspace")


async def test_two_databases_in_one_set_are_refused(world: World, tmp_path: Path) -> None:
    async with Database(tmp_path / "db" / "other.db", name="other") as other:
        await other.execute("CREATE TABLE u (a)")
        dump_other = db_dump(other.path)
        with pytest.raises(InvalidArgumentError) as caught:
            await world.ws.apply_changes(
                [
                    Change("write", "a.txt", content=A_NEW),
                    world.sql("DELETE FROM t"),
                    Change(
                        "sql", "other", database=other, statements=(Statement("DELETE FROM u"),)
                    ),
                ]
            )
        message = str(caught.value)
        assert message.startswith("change 3 of 3 (sql): "), message
        assert "already changes database app (change 2)" in message, message
        assert db_dump(other.path) == dump_other
    world.assert_unchanged("two databases")


REFUSED = {
    "attach": ("ATTACH DATABASE ':memory:' AS other", "ATTACH/DETACH"),
    "begin": ("BEGIN", "BEGIN/COMMIT/ROLLBACK/SAVEPOINT/RELEASE are not allowed"),
    "commit": ("COMMIT", "BEGIN/COMMIT/ROLLBACK/SAVEPOINT/RELEASE are not allowed"),
    "rollback": ("ROLLBACK", "BEGIN/COMMIT/ROLLBACK/SAVEPOINT/RELEASE are not allowed"),
    "savepoint": ("SAVEPOINT s", "BEGIN/COMMIT/ROLLBACK/SAVEPOINT/RELEASE are not allowed"),
    "journal_mode": ("PRAGMA journal_mode=DELETE", "PRAGMA journal_mode would weaken"),
    "synchronous": ("PRAGMA synchronous=OFF", "PRAGMA synchronous would weaken"),
    "insert-marker": (f"INSERT INTO {MARKER_TABLE} VALUES ('x', 'y', 0)", MARKER_TABLE),
    "delete-marker": (f"DELETE FROM {MARKER_TABLE}", MARKER_TABLE),
    "update-marker": (f"UPDATE {MARKER_TABLE} SET record = 'x'", MARKER_TABLE),
    "drop-marker": (f"DROP TABLE {MARKER_TABLE}", MARKER_TABLE),
    "rename-marker": (f"ALTER TABLE {MARKER_TABLE} RENAME TO gone", MARKER_TABLE),
    "index-marker": (f"CREATE INDEX mi ON {MARKER_TABLE} (record)", MARKER_TABLE),
    "trigger-marker": (
        f"CREATE TRIGGER mt BEFORE INSERT ON {MARKER_TABLE} BEGIN SELECT RAISE(IGNORE); END",
        MARKER_TABLE,
    ),
    "temp-shadow": (
        f"CREATE TEMP TABLE {MARKER_TABLE} (txid TEXT, record TEXT, created REAL)",
        "temporary tables",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
async def test_statements_that_would_escape_the_set_are_refused(world: World, case: str) -> None:
    await world.next_set_works(b"makes the marker table\n")
    with plain(world.db_path) as conn:
        schema = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
    world.remember()
    sql, reason = REFUSED[case]
    with pytest.raises(StatementError) as caught:
        await world.ws.apply_changes(
            [
                Change("write", "a.txt", content=A_NEW),
                world.sql("UPDATE t SET n = 7", sql, "UPDATE t SET n = 8"),
            ]
        )
    message = str(caught.value)
    assert message.startswith("change 2 of 2 (sql): statement 2 of 3 ("), message
    assert reason in message, message
    assert message.endswith(SET_UNCHANGED), message
    world.assert_unchanged(case)
    with plain(world.db_path) as conn:
        assert conn.execute(
            "SELECT type, name, sql FROM sqlite_master ORDER BY name"
        ).fetchall() == (schema)
    await world.next_set_works()


CRASH_CHILD = r"""
import sys
import anyio
from atomictools import Change, Database, Statement, Workspace

root, db_path, state = sys.argv[1:4]


async def main() -> None:
    async with Database(db_path, name="app") as db:
        ws = Workspace([root], state_dir=state)
        await ws.apply_changes(
            [
                Change("write", "a.txt", content=b"alpha new\n"),
                Change("sql", "app", database=db, statements=(Statement("UPDATE t SET n = 99"),)),
            ]
        )


anyio.run(main)
"""


async def test_a_table_renamed_onto_the_marker_table_cannot_hide_the_commit(
    world: World,
) -> None:
    """On a database that has no marker table yet, the user's own table takes its name."""
    for sql in (
        "CREATE TABLE decoy (txid TEXT PRIMARY KEY, record TEXT NOT NULL, created REAL NOT NULL)",
        "CREATE TRIGGER decoy_ignore BEFORE INSERT ON decoy BEGIN SELECT RAISE(IGNORE); END",
        f"ALTER TABLE decoy RENAME TO {MARKER_TABLE}",
    ):
        try:
            await world.db.execute(sql)
        except StatementError:
            return  # refused: the marker table stays the engine's own
    await world.db.close()
    # A crash right after the set's COMMIT, then recovery decides from the marker.
    with anyio.fail_after(60):
        args = [str(world.root), str(world.db_path), str(world.state)]
        done = await anyio.run_process(
            [sys.executable, "-c", CRASH_CHILD, *args],
            env={**os.environ, CRASH_ENV: "db.committed", "PYTHONPATH": str(REPO)},
            check=False,
        )
    if done.returncode != 137:  # refused before its commit point: the table is not ours
        assert "was not made by atomictools" in done.stderr.decode(), done.stderr.decode()
    await anyio.to_thread.run_sync(lambda: recover([world.root], state_dir=world.state))
    with plain(world.db_path) as conn:
        committed = conn.execute("SELECT n FROM t WHERE v = 'one'").fetchone() == (99,)
    applied = (world.root / "a.txt").read_bytes() == A_NEW
    assert committed == applied, f"database committed: {committed}, file applied: {applied}"


# -- a failed COMMIT, decided by the marker (in process) ------------------------------------


def fail_commit(
    monkeypatch: pytest.MonkeyPatch, *, happened: bool, unreadable: bool
) -> dict[str, bool]:
    """The next COMMIT reports an I/O error; with ``happened`` it ran first (as when SQLite
    wrote the transaction and then failed). ``unreadable``: the marker cannot be read back."""
    original = database_module._Connection.internal
    armed = {"commit": True, "unreadable": unreadable}

    async def internal(self: Any, sql: str) -> None:
        if sql == "COMMIT" and armed["commit"]:
            armed["commit"] = False
            if happened:
                await original(self, sql)
            raise sqlite3.OperationalError("disk I/O error (injected)")
        await original(self, sql)

    original_decide = Database.decide_marker

    async def decide_marker(self: Database, txid: str, record: str) -> bool:
        if armed["unreadable"]:
            raise DatabaseError(f"cannot read the change set marker of database {self.name}")
        return await original_decide(self, txid, record)

    monkeypatch.setattr(database_module._Connection, "internal", internal)
    monkeypatch.setattr(Database, "decide_marker", decide_marker)
    return armed


def mixed(world: World) -> list[Change]:
    (world.root / "gone.txt").write_bytes(b"deleted by the set\n")
    world.remember()
    return [
        Change("write", "a.txt", content=A_NEW),
        Change("write", "big.bin", content=BIG[::-1]),
        Change("delete", "gone.txt"),
        Change("write", "c.txt", content=b"created\n"),
        world.sql("UPDATE t SET n = 99 WHERE v = 'one'", "INSERT INTO t (v, n) VALUES ('s', 5)"),
    ]


def assert_applied(world: World, where: str) -> None:
    assert (world.root / "a.txt").read_bytes() == A_NEW, where
    assert (world.root / "big.bin").read_bytes() == BIG[::-1], where
    assert not (world.root / "gone.txt").exists(), where
    assert (world.root / "c.txt").read_bytes() == b"created\n", where
    with plain(world.db_path) as conn:
        assert conn.execute("SELECT n FROM t WHERE v = 'one'").fetchone() == (99,), where
        assert conn.execute("SELECT n FROM t WHERE v = 's'").fetchone() == (5,), where
    world.assert_clean(where)


async def test_a_commit_that_reported_failure_but_happened_is_finished(
    world: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fail_commit(monkeypatch, happened=True, unreadable=False)
    done = await world.ws.apply_changes(mixed(world))
    assert done.applied
    assert done.change_id is not None
    assert "but it happened" in caplog.text
    assert_applied(world, "marker present")
    entries = await world.ws.history_entries(limit=1)
    assert entries
    assert entries[0].id == done.change_id
    await world.next_set_works()


async def test_a_commit_that_failed_without_its_marker_rolls_the_set_back(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_commit(monkeypatch, happened=False, unreadable=False)
    with pytest.raises(DatabaseError) as caught:
        await world.ws.apply_changes(mixed(world))
    assert not isinstance(caught.value, CommitUnknownError)
    message = str(caught.value)
    assert message.startswith("COMMIT on database app failed ("), message
    assert "marker is not in the database" in message, message
    assert message.endswith(SET_UNCHANGED), message
    assert caught.value.changed is False
    world.assert_unchanged("marker absent")
    await world.next_set_works()


@pytest.mark.parametrize("happened", [True, False], ids=["committed", "not-committed"])
@pytest.mark.parametrize("finisher", ["recover", "next-call"])
async def test_an_unreadable_marker_keeps_the_set_for_recovery(
    world: World, monkeypatch: pytest.MonkeyPatch, happened: bool, finisher: str
) -> None:
    armed = fail_commit(monkeypatch, happened=happened, unreadable=True)
    with pytest.raises(RecoveryNeededError) as caught:
        await world.ws.apply_changes(mixed(world))
    message = str(caught.value)
    assert "could not be read back" in message, message
    assert "kept as it was prepared" in message, message
    assert "atomictools recover" in message, message
    assert caught.value.changed is True  # the database may hold it: not "nothing changed"
    # Kept as prepared: the record (naming the database), the staged files, the backups.
    (record_path,) = world.journal_records()
    record = read_record(Path(record_path))
    assert record is not None
    assert record.state == "prepared"
    assert record.database is not None
    assert record.database["path"] == str(world.db_path)
    assert ours(world.root), "the staged files were not kept for recovery"
    assert (world.root / "a.txt").read_bytes() == A_OLD, "a file changed before the decision"
    assert world.ws.unfinished
    assert world.ws.unfinished[0].txid == record.txid

    armed["unreadable"] = False  # the database answers again
    if finisher == "recover":
        report = await anyio.to_thread.run_sync(
            lambda: recover([world.root], state_dir=world.state)
        )
        assert report.conflicts == [], report.conflicts
        assert record.txid in (report.rolled_forward if happened else report.rolled_back)
    else:
        # The next call that touches a file of the set finishes it first, from the database.
        await world.ws.write("a.txt", A_NEW if happened else A_OLD)
        if not happened and world.before is not None:  # the same bytes, a new inode
            world.before[0]["a.txt"] = (A_OLD, (world.root / "a.txt").stat().st_ino)
    if happened:
        assert_applied(world, f"committed, finished by {finisher}")
        entries = await world.ws.history_entries(limit=5)
        assert any(entry.op == "apply_changes" for entry in entries), entries
    else:
        world.assert_unchanged(f"not committed, undone by {finisher}")
    await world.next_set_works()


# -- a failed COMMIT for real: strace fails the WAL's fdatasync ------------------------------


WAL_CHILD = r"""
import json, os, sys
import anyio
from atomictools import AtomicToolsError, Change, Database, Statement, Workspace

root, db_path, state, pooled_reader, ending = sys.argv[1:6]


async def main() -> None:
    db = Database(db_path, name="app")
    ws = Workspace([root], state_dir=state)
    if pooled_reader == "1":
        await db.query("SELECT count(*) FROM t")  # a reader connection stays in the pool
    try:
        await ws.apply_changes(
            [
                Change("write", "a.txt", content=b"alpha new\n"),
                Change("sql", "app", database=db, statements=(Statement("UPDATE t SET n = 99"),)),
            ]
        )
        out = {"ok": True}
    except AtomicToolsError as err:
        out = {"ok": False, "type": type(err).__name__, "message": str(err)}
    print(json.dumps(out), flush=True)
    if ending == "crash":
        os._exit(0)  # as if the process died right after answering
    await db.close()


anyio.run(main)
"""


def wal_fault(tmp: Path, when: int, *, pooled_reader: bool, ending: str) -> dict[str, Any]:
    """A fresh tree and database; the child's ``when``-th fdatasync of the WAL fails (EIO).
    Returns the child's outcome and what is on disk after recovery."""
    assert STRACE is not None
    root, state, db_path = tmp / "root", tmp / "state", tmp / "app.db"
    root.mkdir(parents=True)
    (root / "a.txt").write_bytes(A_OLD)
    with plain(db_path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        for sql in SCHEMA:
            conn.execute(sql)
    wal = f"{db_path}-wal"
    command = [
        STRACE,
        "-f",
        "-qq",
        "-e",
        "signal=none",
        "-P",
        wal,
        "-e",
        "trace=fdatasync",
        "-e",
        f"inject=fdatasync:error=EIO:when={when}",
        "-o",
        str(tmp / "trace"),
        sys.executable,
        "-c",
        WAL_CHILD,
        str(root),
        str(db_path),
        str(state),
        "1" if pooled_reader else "0",
        ending,
    ]
    done = subprocess.run(
        command,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no outcome (exit {done.returncode}): {done.stderr[-2000:]}"
    outcome: dict[str, Any] = json.loads(lines[-1])
    outcome["injected"] = "INJECTED" in (tmp / "trace").read_text()
    report = recover([root], state_dir=state)  # what the next start does
    outcome["recovered"] = report.rolled_forward + report.rolled_back
    outcome["file_new"] = (root / "a.txt").read_bytes() == A_NEW
    with plain(db_path) as conn:  # the first connection after the child: WAL recovery
        outcome["db_new"] = conn.execute("SELECT n FROM t WHERE v = 'one'").fetchone() == (99,)
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    outcome["ours"] = ours(root)
    return outcome


@needs_strace
@pytest.mark.parametrize(
    "pooled_reader",
    [
        False,
        True,
    ],
    ids=["fresh-reader", "pooled-reader"],
)
def test_a_commit_whose_wal_sync_fails_is_decided_truly(
    tmp_path: Path, pooled_reader: bool
) -> None:
    """Each fdatasync of the WAL in turn (its header, the set's COMMIT, the marker's removal)
    fails once; the child then exits at once (as after a crash) and recovery runs. The file
    and the database must agree, and an error that says the set did not commit must be true."""
    outcomes = []
    for when in (1, 2, 3):
        outcome = wal_fault(
            tmp_path / f"when{when}", when, pooled_reader=pooled_reader, ending="crash"
        )
        outcomes.append(outcome)
        where = f"fdatasync {when} of the WAL fails: {outcome}"
        assert outcome["injected"], where
        assert outcome["file_new"] == outcome["db_new"], where
        assert outcome["ours"] == [], where
        if not outcome["ok"] and "did not commit" in outcome["message"]:
            assert not outcome["db_new"], where
    assert any(
        not o["ok"] and o["message"].startswith("COMMIT on database app failed") for o in outcomes
    ), f"no injection failed the set's COMMIT: {outcomes}"
