"""Cancelling a change set that changes files and a SQLite database as one (issue 17).

The set writes a small file, a large one (staged in many chunks), edits one, creates one and
deletes one, and runs two database steps, the second with a slow statement (a recursive CTE
inserting 200k rows). The database keeps the invariant the files and the rows must share: table
``files`` holds the sha256 of every tracked file that exists. The set is cancelled:

* at every protocol step it reaches (observed once uncancelled, then cancelled at the n-th step
  for every n, as ``tests/test_cancellation.py`` does): every step lies before the database's
  COMMIT, so every such cancel must leave everything as it was;
* after many wall-clock delays spread over a whole run (a canceller task), and after 0, 1,
  2, ... event-loop ticks, which also land in the awaits that are not steps: in aiosqlite's
  worker while a statement runs, BEGIN, the marker's insert, the worker threads of staging. A
  wrapper around ``Transaction.run`` and the steps seen tell where each cancel landed; the test
  requires that some landed while files were staged and some while the statements ran (and
  that such a cancel stopped the statement instead of waiting for its end);
* under ``anyio.fail_after`` deadlines, through the ``ws.changeset()`` builder, and while the
  set waits for the database's write lock held by another task's long transaction.

One more requires the set to return promptly once committed, even when another writer queued
for the database meanwhile (its marker is then left for the next set to drop).

After every attempt: the files and the database are both as before or both as after (and each
row's sha256 matches its file); no temp, member or claim file of ours is in the root; no journal
record is left in the state directory; no marker row is left; the database is not locked (the
next ``db.execute`` and the next mixed set, which restores the old state, both work) and
``PRAGMA integrity_check`` is ok. aiosqlite hands results back through asyncio, so these tests
run on asyncio only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from atomictools import (
    Change,
    Database,
    Edit,
    Limits,
    Statement,
    StatementResult,
    Workspace,
    is_temp_name,
)
from atomictools.engine.changes.markers import MARKER_TABLE
from atomictools.engine.db.database import Transaction
from atomictools.engine.durable.steps import observe_steps
from atomictools.engine.history.store import store_for

pytestmark = pytest.mark.anyio

CHUNK = 32 * 1024
SLOW_ROWS = 200_000
TIMEOUT = 30.0
"""Seconds any single attempt (or follow-up) may take before the test fails as hung."""
DELAYS = 40
TICKS = 16
DEADLINES = 14


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pattern(label: str, size: int) -> bytes:
    out = bytearray()
    line = 0
    while len(out) < size:
        out += f"{label} line {line:08d}\n".encode()
        line += 1
    return bytes(out[:size])


A_OLD, A_NEW = b"alpha old\n", b"alpha new\n"
BIG_OLD = pattern("old", 200 * 1024)
BIG_NEW = pattern("new", 24 * CHUNK + 123)  # 25 chunks
E_OLD, E_NEW = b"line one\nline two\n", b"line one\nline 2\n"
GONE = b"deleted by the set\n"
CREATED = b"created by the set\n"

Files = dict[str, bytes | None]
DbState = tuple[dict[str, str], int, int]

OLD_FILES: Files = {
    "a.txt": A_OLD,
    "big.bin": BIG_OLD,
    "e.txt": E_OLD,
    "gone.txt": GONE,
    "new.txt": None,
}
NEW_FILES: Files = {
    "a.txt": A_NEW,
    "big.bin": BIG_NEW,
    "e.txt": E_NEW,
    "gone.txt": None,
    "new.txt": CREATED,
}
FILE_CHANGES = 5
"""File changes in the set (each ends with a ``changeset.prepare`` step)."""


def rows_of(files: Files) -> dict[str, str]:
    return {path: sha(content) for path, content in files.items() if content is not None}


OLD_DB: DbState = (rows_of(OLD_FILES), 0, 0)
NEW_DB: DbState = (rows_of(NEW_FILES), SLOW_ROWS, 1)

SLOW_INSERT = (
    "INSERT INTO big (n, s) WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c "
    f"WHERE n < {SLOW_ROWS}) SELECT n, printf('%08d', n) FROM c"
)
SCHEMA = (
    "CREATE TABLE files (path TEXT PRIMARY KEY, sha TEXT NOT NULL)",
    "CREATE TABLE big (n INTEGER PRIMARY KEY, s TEXT UNIQUE)",
    "CREATE TABLE counter (id INTEGER PRIMARY KEY CHECK (id = 1), v INTEGER NOT NULL)",
    "INSERT INTO counter VALUES (1, 0)",
)
SLOW_STEP = (
    Statement("INSERT INTO files (path, sha) VALUES (?, ?)", ("new.txt", sha(CREATED))),
    Statement("DELETE FROM files WHERE path = ?", ("gone.txt",)),
    Statement("UPDATE files SET sha = ? WHERE path = ?", (sha(E_NEW), "e.txt")),
    Statement(SLOW_INSERT),
    Statement("UPDATE counter SET v = v + 1"),
)


def ours(top: Path) -> list[str]:
    """Temp, member and claim files of ours (and anything named .atomictools*) below top."""
    return sorted(
        os.path.join(dirpath, name)
        for dirpath, dirnames, filenames in os.walk(top)
        for name in dirnames + filenames
        if is_temp_name(name) or name.startswith(".atomictools")
    )


@contextlib.contextmanager
def plain(path: Path) -> Iterator[sqlite3.Connection]:
    """An independent connection: what is committed, whatever the engine's connections think."""
    conn = sqlite3.connect(path, timeout=5, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


class World:
    """A root, a state directory and a database outside the root, with the set under test."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "root"
        self.state = tmp_path / "state"
        self.db_path = tmp_path / "db" / "app.db"
        self.root.mkdir()
        self.db_path.parent.mkdir()
        self.ws = Workspace([self.root], state_dir=self.state, limits=Limits(chunk_bytes=CHUNK))
        self.db = Database(self.db_path, name="app")

    async def setup(self) -> None:
        await self.db.run_statements([Statement(sql) for sql in SCHEMA])
        for path, content in OLD_FILES.items():
            if content is not None:
                (self.root / path).write_bytes(content)
        await self.db.run_statements(
            [
                Statement("INSERT INTO files (path, sha) VALUES (?, ?)", pair)
                for pair in rows_of(OLD_FILES).items()
            ]
        )
        assert self.check("set up") == "old"

    def changes(self) -> list[Change]:
        db = self.db
        return [
            Change("write", "a.txt", content=A_NEW, expected_sha256=sha(A_OLD)),
            Change("write", "big.bin", content=BIG_NEW),
            Change(
                "sql",
                db.name,
                database=db,
                statements=(
                    Statement("UPDATE files SET sha = ? WHERE path = ?", (sha(A_NEW), "a.txt")),
                    Statement(
                        "UPDATE files SET sha = :sha WHERE path = :path",
                        {"sha": sha(BIG_NEW), "path": "big.bin"},
                    ),
                ),
            ),
            Change("edit", "e.txt", edits=(Edit("line two", "line 2"),)),
            Change("write", "new.txt", content=CREATED),
            Change("delete", "gone.txt"),
            Change("sql", db.name, database=db, statements=SLOW_STEP),
        ]

    async def apply(self) -> None:
        done = await self.ws.apply_changes(self.changes())
        assert done.applied
        assert done.changes[6].statements[3] == StatementResult(SLOW_ROWS, SLOW_ROWS)

    async def apply_with_builder(self) -> None:
        """The same set through ``ws.changeset()`` (consecutive statements form one step)."""
        db = self.db
        async with self.ws.changeset() as cs:
            cs.write("a.txt", A_NEW, expected_sha256=sha(A_OLD))
            cs.write("big.bin", BIG_NEW)
            cs.sql(db, "UPDATE files SET sha = ? WHERE path = ?", (sha(A_NEW), "a.txt"))
            cs.sql(db, "UPDATE files SET sha = ? WHERE path = ?", (sha(BIG_NEW), "big.bin"))
            cs.edit("e.txt", [("line two", "line 2")])
            cs.write("new.txt", CREATED)
            cs.delete("gone.txt")
            for statement in SLOW_STEP:
                cs.sql(db, statement.sql, statement.params)
        assert cs.result is not None
        assert cs.result.applied

    # -- what is on disk --------------------------------------------------------------------

    def files(self) -> Files:
        state: Files = {}
        for rel in OLD_FILES:
            path = self.root / rel
            state[rel] = path.read_bytes() if path.exists() else None
        return state

    def database(self) -> DbState:
        with plain(self.db_path) as conn:
            rows = dict(conn.execute("SELECT path, sha FROM files").fetchall())
            (count,) = conn.execute("SELECT count(*) FROM big").fetchone()
            (value,) = conn.execute("SELECT v FROM counter").fetchone()
        return rows, count, value

    def markers(self) -> int:
        with plain(self.db_path) as conn:
            found = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (MARKER_TABLE,)
            ).fetchone()
            if found is None:
                return 0
            (count,) = conn.execute(f"SELECT count(*) FROM {MARKER_TABLE}").fetchone()
        return int(count)

    def integrity(self) -> str:
        with plain(self.db_path) as conn:
            return str(conn.execute("PRAGMA integrity_check").fetchone()[0])

    def journal_records(self) -> list[str]:
        found = [str(p) for p in self.state.rglob("*.journal.json")]
        journals = self.ws.journal_dir
        if journals.is_dir():
            found += [str(journals / name) for name in os.listdir(journals)]
        return sorted(set(found))

    def check(self, where: str) -> str:
        """Every invariant after an attempt; returns "old" or "new"."""
        files, db = self.files(), self.database()
        shown = {k: None if v is None else f"{len(v)} bytes {sha(v)[:8]}" for k, v in files.items()}
        assert files in (OLD_FILES, NEW_FILES), f"{where}: files torn: {shown}"
        outcome = "old" if files == OLD_FILES else "new"
        expected = OLD_DB if outcome == "old" else NEW_DB
        assert db == expected, (
            f"{where}: the files are {outcome} but the database is not: rows {db[0]}, "
            f"{db[1]} slow rows, counter {db[2]}"
        )
        # The invariant itself: a row holds the sha256 of each file that exists, and only those.
        assert db[0] == rows_of(files), f"{where}: rows and files disagree"
        assert ours(self.root) == [], f"{where}: files of ours left in the root"
        assert self.journal_records() == [], f"{where}: journal records left"
        assert self.markers() == 0, f"{where}: a change-set marker row is left"
        assert self.integrity() == "ok", f"{where}: integrity_check failed"
        if self.ws.history.exists():
            assert store_for(self.state).pending() == [], f"{where}: a history entry is pending"
        assert len(self.ws._locks) == 0, f"{where}: a per-path lock outlived the call"
        writer = self.db._writer
        assert writer is None or not writer.conn.in_transaction, f"{where}: transaction open"
        return outcome

    async def follow_up(self, outcome: str, where: str) -> None:
        """The database is not locked and the next mixed set works; it restores the old state."""
        db = self.db
        with anyio.fail_after(TIMEOUT):
            await db.execute("UPDATE counter SET v = v")
            async with self.ws.changeset() as cs:
                if outcome == "new":
                    cs.write("a.txt", A_OLD)
                    cs.write("big.bin", BIG_OLD)
                    cs.write("e.txt", E_OLD)
                    cs.write("gone.txt", GONE)
                    cs.delete("new.txt")
                    cs.sql(db, "DELETE FROM big")
                    cs.sql(db, "UPDATE counter SET v = 0")
                    cs.sql(db, "DELETE FROM files")
                    for pair in rows_of(OLD_FILES).items():
                        cs.sql(db, "INSERT INTO files (path, sha) VALUES (?, ?)", pair)
                else:
                    cs.write("a.txt", A_OLD, expected_sha256=sha(A_OLD))
                    cs.sql(db, "UPDATE counter SET v = 0")
            assert cs.result is not None
            assert cs.result.applied
        assert self.check(f"{where}, then the follow-up set") == "old"


@pytest.fixture
async def world(tmp_path: Path) -> Any:
    made = World(tmp_path)
    try:
        await made.setup()
        yield made
    finally:
        await made.db.close()


# -- where a cancel landed ------------------------------------------------------------------


@dataclass
class StatementWatch:
    """Wraps ``Transaction.run`` (a set's database step): which step runs, how it ended."""

    running: int | None = None
    """How many statements the step running now has (5: the slow one), None between steps."""
    started: float = 0.0
    first_started: float | None = None
    """When the current run's first database step started."""
    cancelled_inside: bool = False
    """The current attempt's cancel arrived while a step's statements were running."""
    slow_seconds: list[float] = field(default_factory=list)
    """How long the slow step took when it ran to its end."""

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        original = Transaction.run

        async def run(tx: Transaction, statements: Any) -> list[StatementResult]:
            self.running, self.started = len(statements), time.monotonic()
            if self.first_started is None:
                self.first_started = self.started
            try:
                results = await original(tx, statements)
            except anyio.get_cancelled_exc_class():
                self.cancelled_inside = True
                raise
            finally:
                self.running = None
            if len(statements) == len(SLOW_STEP):
                self.slow_seconds.append(time.monotonic() - self.started)
            return results

        monkeypatch.setattr(Transaction, "run", run)


@dataclass
class Landing:
    delay: float
    cancelled: bool = False
    steps: list[str] = field(default_factory=list)
    """The steps reached when the cancel was requested."""
    statement: int | None = None
    """The running database step's size when the cancel was requested (None: none ran)."""
    into_statement: float = 0.0
    """How long that step had run when the cancel was requested."""
    latency: float = 0.0
    """Seconds from the cancel request to the call's return."""
    stopped_inside: bool = False

    @property
    def phase(self) -> str:
        prepared = self.steps.count("changeset.prepare")
        if not self.cancelled:
            return "completed"
        if self.statement is not None:
            return "statements"
        if not self.steps:
            return "planning"
        if prepared < FILE_CHANGES:
            return "staging"
        if self.steps.count("changeset.sql") < 2:
            return "database"  # BEGIN IMMEDIATE, or between two database steps
        return "commit"


async def cancelled_after(
    delay: float, world: World, watch: StatementWatch, *, ticks: int | None = None
) -> Landing:
    """Run the set, cancelling it ``delay`` seconds in (or after ``ticks`` event-loop ticks);
    returns where the cancel landed."""
    landing = Landing(delay)
    seen: list[str] = []
    watch.cancelled_inside = False
    requested = 0.0
    scope = anyio.CancelScope()
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:

            async def canceller() -> None:
                nonlocal requested
                if ticks is None:
                    await anyio.sleep(delay)
                else:
                    for _ in range(ticks):
                        await anyio.lowlevel.checkpoint()
                landing.steps = list(seen)
                landing.statement = watch.running
                if watch.running is not None:
                    landing.into_statement = time.monotonic() - watch.started
                requested = time.monotonic()
                scope.cancel()

            tg.start_soon(canceller)
            with scope, observe_steps(seen.append):
                await world.apply()
            tg.cancel_scope.cancel()
    landing.cancelled = scope.cancelled_caught
    landing.latency = time.monotonic() - requested
    landing.stopped_inside = watch.cancelled_inside
    return landing


# -- the tests ------------------------------------------------------------------------------


async def test_cancel_at_every_step_leaves_files_and_database_as_before(world: World) -> None:
    seen: list[str] = []
    with observe_steps(seen.append):
        await world.apply()
    assert world.check("the uncancelled run") == "new"
    await world.follow_up("new", "the uncancelled run")
    counts = Counter(seen)
    assert counts["changeset.prepare"] == FILE_CHANGES, seen
    assert counts["changeset.chunk"] >= 25 + 3, seen  # big.bin in 25 chunks, the small files
    assert counts["changeset.sql"] == 2, seen
    assert counts["changeset.commit"] == 1, seen
    assert seen[-1] == "changeset.commit", "a step after the commit point's step"

    outcomes = []
    for n in range(1, len(seen) + 1):
        reached: list[str] = []
        with anyio.fail_after(TIMEOUT), anyio.CancelScope() as scope:

            def observer(
                name: str,
                n: int = n,
                scope: anyio.CancelScope = scope,
                reached: list[str] = reached,
            ) -> None:
                reached.append(name)
                if len(reached) == n:
                    scope.cancel()

            with observe_steps(observer):
                await world.apply()
        where = f"cancel at step {n} of {len(seen)} ({seen[n - 1]})"
        assert scope.cancelled_caught, f"{where}: the set was not cancelled"
        assert reached == seen[:n], f"{where}: other steps than the uncancelled run's: {reached}"
        outcome = world.check(where)
        # Every step lies before the database's COMMIT: a cancel there must undo everything.
        assert outcome == "old", f"{where}: the set went through although cancelled before COMMIT"
        outcomes.append(outcome)
        await world.follow_up(outcome, where)
    assert len(outcomes) == len(seen)
    # The last run, uncancelled, still completes.
    await world.apply()
    assert world.check("the final run") == "new"


async def test_cancel_at_many_delays_lands_in_staging_and_in_statements(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    watch = StatementWatch()
    watch.install(monkeypatch)
    durations, staging = [], []
    for attempt in range(3):  # the first warms up (the history store, the connections)
        watch.first_started = None
        started = time.monotonic()
        await world.apply()
        durations.append(time.monotonic() - started)
        assert watch.first_started is not None
        staging.append(watch.first_started - started)
        assert world.check(f"timing run {attempt}") == "new"
        await world.follow_up("new", f"timing run {attempt}")
    whole, before_sql = max(durations[1:]), min(staging[1:])
    slow = min(watch.slow_seconds[1:])
    assert 0.0 < before_sql < whole
    assert slow > 0.0
    # A third of the delays fall before the first statement (planning, staging, BEGIN), the
    # rest spread over the statements, the COMMIT and past the end.
    early = DELAYS // 3
    delays = [before_sql * i / early for i in range(early)]
    late = DELAYS - early
    delays += [before_sql + (whole * 1.15 - before_sql) * i / (late - 1) for i in range(late)]

    # Staging mostly runs without yielding to the loop (small chunks are written inline), so
    # a timer rarely fires in it: cancels after 0, 1, 2, ... event-loop ticks land there too.
    attempts: list[tuple[float, int | None]] = [(0.0, k) for k in range(TICKS)]
    attempts += [(delay, None) for delay in delays]
    landings: list[Landing] = []
    for delay, ticks in attempts:
        landing = await cancelled_after(delay, world, watch, ticks=ticks)
        when = f"{ticks} ticks" if ticks is not None else f"{delay * 1000:.1f} ms"
        where = f"cancel after {when} ({landing.phase}, steps {len(landing.steps)})"
        outcome = world.check(where)
        if landing.cancelled and landing.phase in ("planning", "staging", "statements", "database"):
            assert outcome == "old", f"{where}: cancelled before COMMIT but the set went through"
        if not landing.cancelled:
            assert outcome == "new", f"{where}: completed uncancelled but the change is missing"
        if landing.phase == "statements":
            assert landing.stopped_inside, f"{where}: the statements did not see the cancel"
        landings.append(landing)
        await world.follow_up(outcome, where)

    phases = Counter(landing.phase for landing in landings)
    assert phases["staging"] >= 1, f"no cancel landed while files were staged: {phases}"
    assert phases["statements"] >= 1, f"no cancel landed while statements ran: {phases}"
    in_slow = [
        landing
        for landing in landings
        if landing.phase == "statements" and landing.statement == len(SLOW_STEP)
    ]
    assert in_slow, f"no cancel landed in the slow statement: {phases}"
    # Stopped, not waited for: at least one cancel returned in less than half the time its
    # statement still had to run (an abandoned statement would have run to its end first).
    assert any(landing.latency < (slow - landing.into_statement) / 2 for landing in in_slow), (
        f"slow step {slow:.3f} s; cancels in it: {[(x.into_statement, x.latency) for x in in_slow]}"
    )
    print(
        f"phases: {dict(phases)}; whole run {whole:.3f} s, statements from {before_sql:.3f} s, "
        f"slow step {slow:.3f} s"
    )


async def test_deadlines_through_the_builder_leave_both_before_or_both_after(
    world: World,
) -> None:
    started = time.monotonic()
    await world.apply_with_builder()
    whole = time.monotonic() - started
    assert world.check("the builder's uncancelled run") == "new"
    await world.follow_up("new", "the builder's uncancelled run")
    outcomes = Counter()
    for i in range(DEADLINES):
        deadline = whole * 1.2 * (i + 1) / DEADLINES
        timed_out = False
        try:
            with anyio.fail_after(deadline):
                await world.apply_with_builder()
        except TimeoutError:
            timed_out = True
        where = f"deadline {deadline * 1000:.1f} ms ({'timed out' if timed_out else 'completed'})"
        outcome = world.check(where)
        if not timed_out:
            assert outcome == "new", where
        outcomes[(timed_out, outcome)] += 1
        await world.follow_up(outcome, where)
    assert outcomes[(True, "old")] >= 1, f"no deadline struck before the commit: {outcomes}"


async def test_a_deadline_while_the_set_waits_for_the_write_lock_undoes_the_staging(
    world: World,
) -> None:
    """Another task's long transaction holds the database: the set stages its files, then
    waits for the write lock; its deadline strikes there and everything staged goes."""
    await world.db.execute("CREATE TABLE scratch (n INTEGER)")
    long_write = (
        "INSERT INTO scratch (n) WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c "
        "WHERE n < 3000000) SELECT n FROM c"
    )
    holding = anyio.Event()
    took = 0.0
    held: list[float] = []
    seen: list[str] = []

    async def holder() -> None:
        started = time.monotonic()
        async with world.db.transaction() as tx:
            holding.set()
            await tx.execute(long_write)
        held.append(time.monotonic() - started)

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(holder)
            await holding.wait()
            started = time.monotonic()
            with pytest.raises(TimeoutError), observe_steps(seen.append):
                with anyio.fail_after(0.3):
                    await world.apply()
            took = time.monotonic() - started
    assert seen.count("changeset.prepare") == FILE_CHANGES, "the deadline struck before staging"
    assert "changeset.sql" not in seen
    assert held, "the other transaction did not finish"
    assert took < min(1.5, held[0] / 2), f"the deadline of 0.3 s struck after {took:.2f} s"
    assert world.check("a deadline while waiting for the write lock") == "old"
    await world.db.execute("DELETE FROM scratch")
    await world.follow_up("old", "a deadline while waiting for the write lock")


async def test_the_set_returns_promptly_after_its_commit_whatever_other_writers_do(
    world: World,
) -> None:
    """A ``db.execute`` that queued for the write lock while the set ran its statements gets
    the lock at the set's COMMIT; the set must not wait for it (its marker is dropped later by
    the next set's transaction otherwise, see ``markers.drop_stale``)."""
    await world.db.execute("CREATE TABLE scratch (n INTEGER)")
    queued = anyio.Event()
    committed_at: list[float] = []
    other_took: list[float] = []
    long_write = (
        "INSERT INTO scratch (n) WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c "
        "WHERE n < 4000000) SELECT n FROM c"
    )

    async def other_writer() -> None:
        await queued.wait()
        started = time.monotonic()
        await world.db.execute(long_write)
        other_took.append(time.monotonic() - started)

    def observer(name: str) -> None:
        if name == "changeset.sql":
            queued.set()
        if name == "changeset.commit":
            committed_at.append(time.monotonic())

    returned_at = 0.0
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(other_writer)
            with observe_steps(observer):
                await world.apply()
            returned_at = time.monotonic()
    assert world.files() == NEW_FILES
    after_commit = returned_at - committed_at[-1]
    assert other_took, "the other writer did not run"
    assert other_took[0] > 0.5, "the other writer was too quick to show anything"
    assert after_commit < 0.5, (
        f"the set returned {after_commit:.2f} s after its COMMIT step; the other writer's "
        f"transaction took {other_took[0]:.2f} s"
    )
