"""Files and a SQLite database in one change set, SIGKILLed at every crash point it passes.

The set (``tests/mixed_child.py``) writes, edits, makes a directory (``mkdir -p``) and a file
in it, moves a file over another, copies and deletes, and changes the database in two steps:
a schema migration (``ALTER TABLE ... ADD COLUMN``, ``CREATE INDEX``) and the rows of the
``files`` table, which records every file's sha256 (the *invariant*: each file of the root has
its row with its hash, and each row its file), plus a counter that is not idempotent.

A real child first runs the set once with every crash point listing itself, which names the
points it passes (a name passed n times is killed at each passage, ``name:1`` .. ``name:n``);
every point of the protocol must be among them. Then a fresh child is SIGKILLed at each
(``ATOMICTOOLS_TEST_CRASH_AT`` with ``ATOMICTOOLS_TEST_CRASH_SIGNAL=KILL``; a child that is not
killed fails the test). Recovery runs as an operator's ``atomictools.recover`` or as a server
start (``recover_interrupted`` then the sweep), every other point, and the database lies inside
the root for half of the points (recovery opens it through the sandbox) and outside for the
others (``--db NAME=PATH``). Then:

* files and database are both exactly as before the set, or both exactly as after it, byte for
  byte and row for row (schema included), the one the crash point allows: before for a kill up
  to ``changeset.marked`` (the marker inserted but not committed), after from the database's
  COMMIT (the first ``db.committed``) on;
* the invariant holds, ``PRAGMA integrity_check`` is ok, the history holds the set's entry
  exactly when it happened;
* no temp file, member or claim of ours is left in the root, no journal record, no set left
  for a person, and no marker row, except the set's own after a kill between the removal of
  its record and that of its marker (``changeset.finished``): the next mixed set's transaction
  drops it, and then no marker row is left at all.

The keyed variant kills ``apply_changes(..., idempotency_key=K)`` at each of its points and
retries with the same key: the set happens exactly once (the counter is 1), and past the commit
point the retry returns the first call's result. Other tests: a prepared set whose database is
missing or unreadable is left for a person, nothing deleted, and finished once it is back;
``recover(rollback=True)`` undoes a set killed before its COMMIT, but rolls a committed one
forward and says why (a database commit cannot be undone).

``test_a_rolled_back_set_leaves_nothing_for_later`` pins the fix of a bug these tests found:
recovery of a set killed while staging under the ``preparing`` record it wrote at its mkdir
removed the set's claims but left the files it staged after that record, which every later
sweep then left for a person.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

import atomictools
from atomictools import AtomicToolsError, ChangeSetResult, Database, Workspace
from atomictools.engine.changes.record import RECORD_SUFFIX
from atomictools.engine.changes.recovery_report import RecoveryReport
from atomictools.engine.durable.steps import CRASH_ENV, CRASH_SIGNAL_ENV
from atomictools.engine.history.store import store_for
from tests.conftest import read_record
from tests.mixed_child import (
    AFTER,
    BEFORE,
    DB_NAME,
    DbState,
    Tree,
    changes,
    create_database,
    db_state,
    install,
    integrity,
    invariant_problems,
    leftovers,
    markers,
    sha,
    snapshot,
)

CHILD = Path(__file__).with_name("mixed_child.py")
CHILD_TIMEOUT = 60.0
WORKERS = 2
PROTOCOL = (
    "changeset.prepare",
    "changeset.sql",
    "changeset.commit",
    "changeset.prepared",
    "changeset.record_written",
    "changeset.marked",
    "db.committed",
    "changeset.history_recorded",
    "changeset.apply",
    "changeset.applied",
    "changeset.finished",
    "changeset.marker_dropped",
)
"""Every point a mixed set must pass (a keyed one also passes ``changeset.key_recorded``)."""
COMMIT_POINT = "db.committed:1"
STALE_MARKER_POINT = "changeset.finished:1"
"""The kill after the set's record went and before its marker did: the marker stays (stale)."""

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs POSIX processes")


@dataclass
class Lane:
    """One child's world: its root, its state directory, its database."""

    root: Path
    state: Path
    db: Path

    def workspace(self) -> Workspace:
        return Workspace([self.root], state_dir=self.state)

    @property
    def journals(self) -> list[str]:
        journals = self.state / "journals"
        return sorted(os.listdir(journals)) if journals.is_dir() else []

    def db_files(self) -> list[Path]:
        return [self.db.with_name(self.db.name + suffix) for suffix in ("", "-wal", "-shm")]


def make_lane(base: Path, *, db_inside: bool) -> Lane:
    root = base / "root"
    lane = Lane(root, base / "state", (root if db_inside else base / "dbdir") / f"{DB_NAME}.db")
    root.mkdir(parents=True)
    lane.state.mkdir()
    install(root, BEFORE)
    create_database(lane.db, BEFORE)
    assert snapshot(root) == BEFORE
    assert invariant_problems(root, lane.db) == []
    return lane


def child_env(crash_at: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop(CRASH_ENV, None)
    env.pop(CRASH_SIGNAL_ENV, None)
    if crash_at is not None:
        env[CRASH_ENV] = crash_at
        env[CRASH_SIGNAL_ENV] = "KILL"
    return env


def run_child(
    lane: Lane, crash_at: str | None, *, key: str | None = None
) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, str(CHILD), "apply", str(lane.root), str(lane.state), str(lane.db)]
    if crash_at is None:
        args.append("--list")
    if key is not None:
        args.append(f"--key={key}")
    return subprocess.run(
        args,
        env=child_env(crash_at),
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        check=False,
    )


def killed(lane: Lane, point: str, key: str | None = None) -> None:
    """Run a child that must die of SIGKILL at ``point``."""
    done = run_child(lane, point, key=key)
    assert done.returncode == -signal.SIGKILL, (
        f"the child was not killed at {point} (exit {done.returncode}; stdout "
        f"{done.stdout!r}): that crash point was never reached\n{done.stderr}"
    )


@dataclass(frozen=True)
class Reference:
    """The points the set passes, and the database before and after it."""

    points: list[str]
    db_before: DbState
    db_after: DbState

    def expected_after(self, point: str) -> bool:
        return self.points.index(point) >= self.points.index(COMMIT_POINT)


def reference(base: Path, *, key: str | None = None) -> Reference:
    """One uninterrupted run that lists its crash points (each as ``name:n``)."""
    lane = make_lane(base, db_inside=False)
    db_before = db_state(lane.db)
    done = run_child(lane, None, key=key)
    assert done.returncode == 0, done.stderr
    names: list[str] = json.loads(done.stdout)["points"]
    required = set(PROTOCOL) | ({"changeset.key_recorded"} if key else set())
    missing = required - set(names)
    assert not missing, f"the set never passed {sorted(missing)}; it passed {names}"
    assert snapshot(lane.root) == AFTER
    assert invariant_problems(lane.root, lane.db) == []
    db_after = db_state(lane.db)
    assert db_after != db_before
    assert db_after["rows"]["counter"] == [(1, 1)]
    assert markers(lane.db) == []
    seen: Counter[str] = Counter()
    points = []
    for name in names:
        seen[name] += 1
        points.append(f"{name}:{seen[name]}")
    assert seen["db.committed"] == 2, names  # the set's COMMIT, then its marker's deletion
    return Reference(points, db_before, db_after)


def recover(lane: Lane, server_start: bool, *, rollback: bool = False) -> RecoveryReport:
    """What ``atomictools recover ROOT --state-dir S`` does, or what a server does when it
    starts (journals and pending history entries, then the sweep of orphaned files)."""
    if not server_start:
        return atomictools.recover([lane.root], state_dir=lane.state, rollback=rollback)
    ws = lane.workspace()

    async def start() -> RecoveryReport:
        return await ws.sweep(await ws.recover_interrupted())

    return anyio.run(start)


def next_set(lane: Lane) -> ChangeSetResult:
    """Another mixed set after recovery (it drops stale markers in its transaction)."""

    async def run() -> ChangeSetResult:
        ws = lane.workspace()
        async with Database(lane.db, name=DB_NAME, create=False) as db, ws.changeset() as cs:
            cs.write("next.txt", b"the next set\n")
            cs.sql(
                db,
                "INSERT INTO files (path, sha256) VALUES (?, ?)",
                ["next.txt", sha(b"the next set\n")],
            )
        assert cs.result is not None
        return cs.result

    return anyio.run(run)


def apply_entries(lane: Lane) -> list[str]:
    """The ids of the history's apply_changes entries (none may be left pending)."""
    store = store_for(lane.state)
    try:
        assert [e.id for e, _pid, _ev in store.pending()] == []
        entries = store.entries(include_pending=True, include_audit=True, limit=None)
        assert all(e.state == "done" for e in entries), entries
        return [e.id for e in entries if e.op == "apply_changes"]
    finally:
        store.close()


def check_state(lane: Lane, ref: Reference, after: bool, where: str) -> None:
    """Files and database both wholly before or both wholly after, and the one expected."""
    tree, db = snapshot(lane.root), db_state(lane.db)
    files_at = "after" if tree == AFTER else "before" if tree == BEFORE else "a mixed tree"
    db_at = "after" if db == ref.db_after else "before" if db == ref.db_before else "mixed rows"
    assert files_at == db_at, f"{where}: files {files_at}, database {db_at}"
    assert files_at == ("after" if after else "before"), f"{where}: both {files_at}"
    assert invariant_problems(lane.root, lane.db) == [], where
    assert integrity(lane.db) == "ok", where


def check_clean(lane: Lane, where: str) -> None:
    assert leftovers(lane.root) == [], f"{where}: files of ours left"
    assert lane.journals == [], f"{where}: journal records left"


def check_after_kill(lane: Lane, ref: Reference, point: str, server_start: bool) -> None:
    where = f"killed at {point} ({'server start' if server_start else 'recover'})"
    report = recover(lane, server_start)
    assert report.history_problem is None, where
    assert not report.unfinished, f"{where}: {report.unfinished}"
    assert not report.conflicts, f"{where}: {report.conflicts}"
    after = ref.expected_after(point)
    check_state(lane, ref, after, where)
    check_clean(lane, where)
    left = markers(lane.db)
    if point == STALE_MARKER_POINT:  # the set's own marker, its record gone
        assert len(left) == 1, f"{where}: markers {left}"
        txid, record = left[0]
        assert record == str(lane.state.resolve() / "journals" / f"{txid}{RECORD_SUFFIX}"), where
        assert not os.path.lexists(record), where
    else:
        assert left == [], f"{where}: markers left {left}"
    assert len(apply_entries(lane)) == int(after), f"{where}: history"

    result = next_set(lane)
    assert result.applied, where
    assert markers(lane.db) == [], f"{where}: markers left after the next set"
    assert invariant_problems(lane.root, lane.db) == [], where
    assert integrity(lane.db) == "ok", where
    check_clean(lane, f"{where}, then the next set")
    assert snapshot(lane.root) == {**(AFTER if after else BEFORE), "next.txt": b"the next set\n"}


def test_sigkill_at_every_crash_point_keeps_files_and_database_together(tmp_path: Path) -> None:
    ref = reference(tmp_path / "listing")
    lanes = [
        make_lane(tmp_path / f"kill-{i}", db_inside=(i // 2) % 2 == 1)
        for i in range(len(ref.points))
    ]
    with ThreadPoolExecutor(WORKERS) as pool:
        runs: list[Future[None]] = [
            pool.submit(killed, lane, point) for lane, point in zip(lanes, ref.points, strict=True)
        ]
        for index, (point, lane, run) in enumerate(zip(ref.points, lanes, runs, strict=True)):
            run.result()
            check_after_kill(lane, ref, point, server_start=index % 2 == 1)


# -- a keyed set: a retry after the crash ------------------------------------------------------


def killed_txid(lane: Lane) -> str | None:
    """The killed set's txid, where the disk still names it (its record, or its marker)."""
    for name in lane.journals:
        record = read_record(lane.state / "journals" / name)
        if record is not None:
            return record.txid
    found = markers(lane.db)
    return found[0][0] if found else None


def retry(lane: Lane, key: str) -> ChangeSetResult:
    """The same keyed call again, in another process (this one) after the crash."""

    async def run() -> ChangeSetResult:
        ws = lane.workspace()
        async with Database(lane.db, name=DB_NAME, create=False) as db:
            return await ws.apply_changes(changes(db), idempotency_key=key)

    return anyio.run(run)


def test_keyed_set_killed_anywhere_happens_exactly_once_on_retry(tmp_path: Path) -> None:
    key = "mixed-crash-key"
    ref = reference(tmp_path / "listing", key=key)
    lanes = [make_lane(tmp_path / f"kill-{i}", db_inside=False) for i in range(len(ref.points))]
    with ThreadPoolExecutor(WORKERS) as pool:
        runs = [
            pool.submit(killed, lane, point, key)
            for lane, point in zip(lanes, ref.points, strict=True)
        ]
        for point, lane, run in zip(ref.points, lanes, runs, strict=True):
            run.result()
            where = f"keyed set killed at {point}"
            first_txid = killed_txid(lane)
            first_entries = apply_entries(lane)
            result = retry(lane, key)
            assert result.applied, where
            check_state(lane, ref, True, where)  # after the retry: done, and only once
            assert db_state(lane.db)["rows"]["counter"] == [(1, 1)], f"{where}: ran twice"
            assert apply_entries(lane) == [result.change_id], f"{where}: history"
            if ref.expected_after(point):  # the first call committed: its result comes back
                if first_entries:
                    assert first_entries == [result.change_id], where
                if first_txid is not None:
                    assert result.txid == first_txid, where
            elif first_txid is not None:
                assert result.txid != first_txid, f"{where}: the rolled-back set's result"
            again = retry(lane, key)  # and once more: the same answer, nothing run
            assert again == result, where
            assert db_state(lane.db)["rows"]["counter"] == [(1, 1)], where
            report = recover(lane, server_start=False)
            assert not report.conflicts, f"{where}: {report.conflicts}"
            assert not report.unfinished, f"{where}: {report.unfinished}"
            check_clean(lane, where)
            next_set(lane)
            assert markers(lane.db) == [], f"{where}: markers left after the next set"


def test_a_rolled_back_set_leaves_nothing_for_later(tmp_path: Path) -> None:
    """A set killed while staging under its ``preparing`` record, rolled back by a recovery
    that does not sweep (a keyed call's, or a server start killed before its delayed sweep):
    a later recovery must find nothing of it, not members it leaves for a person."""
    lane = make_lane(tmp_path / "lane", db_inside=False)
    killed(lane, "changeset.prepare:1")
    txid = killed_txid(lane)
    assert txid is not None
    assert leftovers(lane.root)
    ws = lane.workspace()
    first = anyio.run(ws.recover_interrupted)
    assert first.rolled_back == [txid], first
    assert leftovers(lane.root) == [], "the rollback left files of the set"
    later = recover(lane, server_start=False)
    assert not later.unfinished, later.unfinished
    check_clean(lane, "a later recovery")
    assert snapshot(lane.root) == BEFORE


# -- the database of a prepared set is missing or unreadable -----------------------------------


def _park(lane: Lane, away: Path) -> None:
    """Move the database (with its WAL and shared-memory files) out of the way."""
    away.mkdir()
    for path in lane.db_files():
        if path.exists():
            path.rename(away / path.name)


def _unpark(lane: Lane, away: Path) -> None:
    for path in away.iterdir():
        path.rename(lane.db.with_name(path.name))
    away.rmdir()


def _assert_left_alone(lane: Lane, report: RecoveryReport, txid: str, before: Tree) -> None:
    assert list(report.unfinished) == [txid], report.unfinished
    reason = report.unfinished[txid].reason
    assert f"changes database {DB_NAME}" in reason, reason
    assert "cannot be read" in reason, reason
    assert not report.rolled_forward, report
    assert not report.rolled_back, report
    assert snapshot(lane.root, ours=True) == before, "recovery deleted or changed something"
    assert [name.split(".")[0] for name in lane.journals] == [txid], "its record went"


@pytest.mark.parametrize(
    ("point", "after", "db_inside"),
    [(COMMIT_POINT, True, False), ("changeset.marked", False, True)],
    ids=["committed-db-outside", "uncommitted-db-inside"],
)
def test_prepared_set_waits_for_its_missing_or_unreadable_database(
    tmp_path: Path, point: str, after: bool, db_inside: bool
) -> None:
    lane = make_lane(tmp_path / "lane", db_inside=db_inside)
    ref_before = db_state(lane.db)
    killed(lane, point)
    record = read_record(lane.state / "journals" / lane.journals[0])
    assert record is not None
    assert record.state == "prepared"
    assert record.database is not None
    txid = record.txid
    left = snapshot(lane.root, ours=True)
    assert leftovers(lane.root), "the killed set staged nothing?"
    away = tmp_path / "away"

    # Missing: both recovery paths leave the set as it is, and say why.
    _park(lane, away)
    _assert_left_alone(lane, recover(lane, server_start=False), txid, left)
    ws = lane.workspace()
    started = anyio.run(lambda: ws.sweep(None))  # the server's own sweep keeps its files too
    assert snapshot(lane.root, ours=True) == left, started
    report = anyio.run(ws.recover_interrupted)
    _assert_left_alone(lane, report, txid, left)
    assert [u.txid for u in ws.unfinished] == [txid]
    with pytest.raises(AtomicToolsError) as refused:  # its paths wait for it
        anyio.run(lambda: ws.write("a.txt", b"meanwhile\n"))
    assert txid in str(refused.value), refused.value
    cli = subprocess.run(
        [
            *(sys.executable, "-m", "atomictools", "recover", str(lane.root), "--json"),
            *("--state-dir", str(lane.state)),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=CHILD_TIMEOUT,
    )
    assert cli.returncode == 2, (cli.returncode, cli.stdout, cli.stderr)  # needs a person
    assert txid in cli.stdout
    assert snapshot(lane.root, ours=True) == left

    # Unreadable: something that is not a database, then a directory, in its place.
    lane.db.write_bytes(b"this is not a SQLite database, whatever its name says\n" * 40)
    _assert_left_alone(lane, recover(lane, server_start=False), txid, left)
    lane.db.unlink()
    lane.db.mkdir()
    _assert_left_alone(lane, recover(lane, server_start=True), txid, left)
    lane.db.rmdir()

    # Back: recovery decides from the marker, and finishes the set.
    _unpark(lane, away)
    report = recover(lane, server_start=False)
    assert not report.unfinished, report
    assert not report.conflicts, report
    assert (report.rolled_forward if after else report.rolled_back) == [txid], report
    tree, db = snapshot(lane.root), db_state(lane.db)
    assert tree == (AFTER if after else BEFORE)
    if not after:
        assert db == ref_before
    assert db["rows"]["counter"] == [(1, int(after))]
    assert invariant_problems(lane.root, lane.db) == []
    assert integrity(lane.db) == "ok"
    check_clean(lane, "after the database came back")
    assert markers(lane.db) == []
    next_set(lane)
    assert markers(lane.db) == []


# -- recover --rollback -------------------------------------------------------------------------


def test_rollback_undoes_a_set_killed_before_its_commit(tmp_path: Path) -> None:
    lane = make_lane(tmp_path / "lane", db_inside=False)
    db_before = db_state(lane.db)
    killed(lane, "changeset.record_written")
    txid = killed_txid(lane)
    report = recover(lane, server_start=False, rollback=True)
    assert report.rolled_back == [txid], report
    assert not report.rolled_forward, report
    assert not report.conflicts, report
    assert not report.unfinished, report
    assert snapshot(lane.root) == BEFORE
    assert db_state(lane.db) == db_before
    assert invariant_problems(lane.root, lane.db) == []
    check_clean(lane, "rolled back")
    assert markers(lane.db) == []


def test_rollback_rolls_a_committed_set_forward_and_says_why(tmp_path: Path) -> None:
    lane = make_lane(tmp_path / "lane", db_inside=False)
    killed(lane, COMMIT_POINT)
    txid = killed_txid(lane)
    assert txid is not None
    report = recover(lane, server_start=False, rollback=True)
    assert report.rolled_forward == [txid], report
    assert not report.rolled_back, report
    assert not report.unfinished, report
    assert len(report.conflicts) == 1, report.conflicts
    conflict = report.conflicts[0]
    assert txid in conflict, conflict
    assert "rolled forward, not back" in conflict, conflict
    assert "cannot undo a database commit" in conflict, conflict
    assert snapshot(lane.root) == AFTER
    assert db_state(lane.db)["rows"]["counter"] == [(1, 1)]
    assert invariant_problems(lane.root, lane.db) == []
    assert integrity(lane.db) == "ok"
    check_clean(lane, "rolled forward")
    assert markers(lane.db) == []
    assert len(apply_entries(lane)) == 1  # the history keeps the entry of what happened
