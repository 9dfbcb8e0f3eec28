"""Faults produced for real: syscall errors (strace), a full and a read-only file system, an
unprivileged user, damaged state. For every fault: the target is intact (or the message says
exactly what changed), no temp is left, the message is specific, and the next call works.

Syscall faults use ``strace -f -e inject=SYSCALL:error=ERRNO:when=N`` on a child process
(``tests/fault_child.py``): a first, uninjected run is traced to find which call to fail (the
N-th of that syscall in the thread that makes it, counted per thread as strace counts), so the
fault lands on exactly the step under test with no mock anywhere. These tests skip, saying
why, where strace is missing or cannot trace (no ptrace); ``.ci/run`` installs strace.
File-system faults mount a small tmpfs (root only) and remount it read-only; user faults run
the child as ``nobody`` after it imported everything as root.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from atomictools import Change, StateDirError, Workspace
from atomictools.engine.db.database import Database
from atomictools.engine.db.dberrors import DatabaseBusyError, DatabaseError
from atomictools.engine.errors import PermissionDeniedError
from tests.changeset_child import install, scenario, snapshot
from tests.conftest import mounted_tmpfs, temp_files
from tests.strace import STRACE, needs_strace
from tests.test_recovery import crash_child, records, tree_with_ours

CHILD = Path(__file__).with_name("fault_child.py")
NOBODY = 65534
MiB = 1024 * 1024


needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root (mounts a tmpfs, or drops to an unprivileged user)"
)


@dataclass
class Call:
    tid: str
    name: str
    text: str


def _calls(trace: Path, syscalls: set[str]) -> tuple[list[Call], int]:
    """The traced calls, and the index of the first one after the child printed MARK."""
    calls: list[Call] = []
    mark = -1
    for line in trace.read_text().splitlines():
        match = re.match(r"^(\d+)\s+(\w+)\((.*)$", line)
        if match is None:
            continue
        tid, name, rest = match.groups()
        if name in syscalls:  # counted: strace's ``when`` counts every call of the syscall
            calls.append(Call(tid, name, rest))
        if name == "write" and ', "MARK' in rest:
            mark = len(calls)
    assert mark >= 0, "the child did not print MARK"
    return calls, mark


def _run(args: list[str], env: dict[str, str], strace: list[str] | None = None) -> dict[str, Any]:
    command = [sys.executable, str(CHILD), *args]
    if strace is not None:
        assert STRACE is not None
        command = [STRACE, "-f", "-qq", "-y", "-e", "signal=none", *strace, *command]
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=120, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no outcome (exit {done.returncode}): {done.stderr[-2000:]}"
    return dict(json.loads(lines[-1]))


def when_to_fail(
    dry_args: list[str], env: dict[str, str], syscall: str, pick: str, *, last: bool = False
) -> int:
    """Trace ``dry_args`` (the same call on an identical copy) and return strace's ``when`` for
    the first (or ``last``) ``syscall`` after MARK whose decoded arguments match ``pick``."""
    with tempfile.TemporaryDirectory() as scratch:
        trace = Path(scratch) / "trace"
        dry_env = {**env, "ATOMICTOOLS_STATE_DIR": env["ATOMICTOOLS_STATE_DIR"] + "-dry"}
        _run(dry_args, dry_env, ["-o", str(trace), "-e", f"trace=write,{syscall}"])
        calls, mark = _calls(trace, {syscall})
    chosen = [i for i, c in enumerate(calls) if i >= mark and re.search(pick, c.text)]
    assert chosen, f"no {syscall} matching {pick!r} after MARK: {[c.text for c in calls[mark:]]}"
    index = chosen[-1] if last else chosen[0]
    return sum(1 for c in calls[: index + 1] if c.tid == calls[index].tid)


def run_failing(
    args: list[str], env: dict[str, str], syscall: str, code: str, when: int
) -> dict[str, Any]:
    return _run(
        args, env, ["-e", f"trace={syscall}", "-e", f"inject={syscall}:error={code}:when={when}"]
    )


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """A root with a.txt, an identical copy to trace, and the child's environment."""
    root, dry = tmp_path / "root", tmp_path / "root-dry"
    for directory in (root, dry):
        directory.mkdir()
        (directory / "a.txt").write_text("old content\n")
    env = {**os.environ, "ATOMICTOOLS_STATE_DIR": str(tmp_path / "state")}
    return root, dry, env


# -- the cross-device probe of a keyed move: only EXDEV means "another file system" -------------


@needs_strace
@pytest.mark.parametrize("code", ["EPERM", "EMLINK"])
def test_a_keyed_move_where_hard_links_are_refused_still_renames(
    tree: tuple[Path, Path, dict[str, str]], code: str
) -> None:
    """A journaled move tries a hard link to learn whether the rename would cross file systems
    (EXDEV). Links refused for another reason (``protected_hardlinks``, a file system without
    them, the link limit) say nothing about that: the move must still happen, as a rename."""
    root, _dry, env = tree
    done = _run(
        ["file", "move-keyed", str(root)],
        env,
        ["-e", "trace=linkat", "-e", f"inject=linkat:error={code}"],
    )
    assert done["ok"], done
    assert not (root / "a.txt").exists()
    assert (root / "moved.txt").read_text() == "old content\n"
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]


# -- a failed directory fsync after the rename: the message says what changed ----------------


DIR_SYNC_CASES = {
    # op: (what is on disk after, what the message says happened)
    "delete": ({"a.txt": None}, "a.txt was deleted, but syncing its directory failed"),
    "move": (
        {"a.txt": None, "moved.txt": "old content\n"},
        "a.txt was moved to moved.txt, but syncing its directory failed",
    ),
    "mkdir": ({"newdir": "<dir>"}, "was created, but syncing its directory failed"),
    "write": ({"a.txt": "new content\n"}, "a.txt was written, but syncing its directory failed"),
    "copy": ({"copied.txt": "old content\n"}, "copied.txt was written, but syncing its directory"),
    "apply": (
        {"a.txt": "set a\n", "b.txt": "b\n"},
        "the change set was applied, but syncing a directory failed",
    ),
}


@needs_strace
@pytest.mark.parametrize("op", list(DIR_SYNC_CASES))
@pytest.mark.parametrize("code", ["EIO", "ENOSPC"])
def test_directory_fsync_failing_after_the_change(
    tree: tuple[Path, Path, dict[str, str]], op: str, code: str
) -> None:
    """Issue 11, defect 5: delete, move and mkdir said "nothing was changed" here."""
    root, dry, env = tree
    expected, said = DIR_SYNC_CASES[op]
    # The last fsync of the root directory: the one after the rename, unlink or mkdir.
    when = when_to_fail(
        ["file", op, str(dry)], env, "fsync", re.escape(str(dry)) + r">\)", last=True
    )
    outcome = run_failing(["file", op, str(root)], env, "fsync", code, when)

    assert outcome["ok"] is False, outcome
    assert outcome["type"] == "DurabilityUnknownError", outcome
    assert said in outcome["message"], outcome["message"]
    assert "nothing was changed" not in outcome["message"]
    assert "may not survive a power loss" in outcome["message"]
    assert outcome["changed"] is True
    for name, content in expected.items():
        path = root / name
        if content is None:
            assert not path.exists(), name
        elif content == "<dir>":
            assert path.is_dir(), name
        else:
            assert path.read_text() == content, name
    assert temp_files(root) == []
    ws = Workspace([root], state_dir=env["ATOMICTOOLS_STATE_DIR"])
    anyio.run(lambda: ws.write("next.txt", "the next call works\n"))
    assert (root / "next.txt").read_text() == "the next call works\n"


@needs_strace
@pytest.mark.parametrize(
    ("op", "syscall", "pick"),
    [
        (
            "write",
            "fsync",
            r"atomictmp>(\)| <unfinished)",
        ),  # the temp's own fsync: before the commit point
        ("write", "renameat", r"atomictmp"),
        ("write", "write", r"atomictmp>, \"new content"),
        ("apply", "renameat", r"journal\.json"),  # the journal record's rename: the commit point
        ("apply", "fsync", r"journal\.json\.\d+\.[0-9a-f]+\.atomictmp>\)"),  # the record's fsync
    ],
)
@pytest.mark.parametrize("code", ["EIO", "ENOSPC"])
def test_failure_before_the_commit_point_changes_nothing(
    tree: tuple[Path, Path, dict[str, str]], op: str, syscall: str, pick: str, code: str
) -> None:
    root, dry, env = tree
    before = tree_with_ours(root)
    when = when_to_fail(["file", op, str(dry)], env, syscall, pick)
    outcome = run_failing(["file", op, str(root)], env, syscall, code, when)
    assert outcome["ok"] is False, outcome
    assert outcome["changed"] is False
    assert outcome["message"].endswith("nothing was changed"), outcome["message"]
    if op == "apply":
        assert "state directory" in outcome["message"]
    assert tree_with_ours(root) == before
    assert records(Path(env["ATOMICTOOLS_STATE_DIR"])) == []


@needs_strace
def test_rename_failing_past_the_commit_point_is_finished_by_recovery(
    tree: tuple[Path, Path, dict[str, str]],
) -> None:
    root, dry, env = tree
    when = when_to_fail(["file", "apply", str(dry)], env, "renameat", r"b\.txt")
    outcome = run_failing(["file", "apply", str(root)], env, "renameat", "EIO", when)
    assert outcome["type"] == "RecoveryNeededError", outcome
    assert "committed but applying it failed" in outcome["message"]
    assert outcome["changed"] is True
    assert (root / "a.txt").read_text() == "set a\n"  # the first rename happened
    state = Path(env["ATOMICTOOLS_STATE_DIR"])
    assert len(records(state)) == 1
    done = subprocess.run(
        [sys.executable, str(CHILD), "recover", str(root), str(state)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert (root / "b.txt").read_text() == "b\n"
    assert temp_files(root) == []


# -- SQLite: a COMMIT whose fdatasync fails -----------------------------------------------------


@needs_strace
@pytest.mark.parametrize("code", ["EIO", "ENOSPC"])
def test_failed_commit_says_the_outcome_is_unknown_and_a_keyed_retry_is_exact(
    tmp_path: Path, code: str
) -> None:
    """Issue 11, defect 6: a COMMIT whose fdatasync failed was "unexpected internal error
    (OperationalError: disk I/O error)", and the row turned out committed after a restart."""
    db = tmp_path / "bank.db"
    dry = tmp_path / "dry.db"
    for path in (db, dry):
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (a)")
        conn.commit()
        conn.close()
    env = {**os.environ, "ATOMICTOOLS_STATE_DIR": str(tmp_path / "state")}
    # The first sync of the WAL after MARK is the COMMIT's.
    when = when_to_fail(["db", str(dry), "k1"], env, "fdatasync", r"dry\.db-wal>")
    outcome = run_failing(["db", str(db), "k1"], env, "fdatasync", code, when)
    assert outcome["ok"] is False, outcome
    assert outcome["type"] == "CommitUnknownError", outcome
    assert "whether it is committed is unknown" in outcome["message"]
    assert "same key" in outcome["message"]
    assert str(db) in outcome["message"]
    # The retry with the same key, in a new process (as after a restart): exactly one row.
    again = _run(["db", str(db), "k1"], env)
    assert again["ok"] is True, again
    again = _run(["db", str(db), "k1"], env)
    assert again["ok"] is True, again
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)
    conn.close()


# -- a full disk, for real ------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path, "2m") as mount_point:
        yield mount_point


def fill(directory: Path) -> Path:
    """Fill the file system until fewer than 64 KiB are free; returns the filler file."""
    filler = directory / "filler.bin"
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    return filler


@needs_root
def test_full_disk_in_db_execute_names_the_database_and_commits_nothing(
    small_tmpfs: Path,
) -> None:
    path = small_tmpfs / "full.db"

    async def main() -> None:
        async with Database(path) as db:
            await db.execute("CREATE TABLE t (b BLOB)")
            await db.execute("INSERT INTO t VALUES (x'00')")
            filler = fill(small_tmpfs)
            with pytest.raises(DatabaseError) as excinfo:
                await db.execute("INSERT INTO t VALUES (?)", [b"\xff" * (512 * 1024)])
            err = excinfo.value
            assert "disk is full" in str(err), str(err)
            assert str(path) in str(err)
            assert "free space" in str(err)
            assert str(err).endswith("nothing was committed")
            filler.unlink()
            rows = await db.query("SELECT count(*) FROM t")
            assert rows.rows == ((1,),)
            await db.execute("INSERT INTO t VALUES (x'01')")  # the next call works

    anyio.run(main)


@needs_root
def test_full_state_directory_is_named_as_such(small_tmpfs: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.txt").write_text("old\n")
    state = small_tmpfs / "state"
    ws = Workspace([root], state_dir=state)
    anyio.run(lambda: ws.write("warm.txt", "x", idempotency_key="warm-up"))
    filler = fill(small_tmpfs)

    async def attempt() -> None:
        with pytest.raises(StateDirError) as excinfo:
            await ws.apply_changes(
                [Change("write", "a.txt", content=b"new\n"), Change("write", "b.txt", content=b"b")]
            )
        message = str(excinfo.value)
        assert str(state) in message
        assert "free space" in message
        assert message.endswith("nothing was changed")

    anyio.run(attempt)
    assert (root / "a.txt").read_text() == "old\n"
    assert not (root / "b.txt").exists()
    assert temp_files(root) == []
    filler.unlink()
    anyio.run(lambda: ws.apply_changes([Change("write", "b.txt", content=b"b")]))
    assert (root / "b.txt").read_text() == "b"


# -- a read-only remount ------------------------------------------------------------------------


@needs_root
def test_read_only_file_system_gives_specific_messages(small_tmpfs: Path) -> None:
    root, state = small_tmpfs / "root", small_tmpfs / "state"
    root.mkdir()
    (root / "a.txt").write_text("old\n")
    db_path = root / "app.db"

    async def prepare() -> None:
        async with Database(db_path) as db:
            await db.execute("CREATE TABLE t (a)")

    anyio.run(prepare)
    ws = Workspace([root], state_dir=state)
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    try:

        async def attempts() -> None:
            with pytest.raises(PermissionDeniedError) as excinfo:
                await ws.write("a.txt", "new\n")
            assert "Read-only file system" in str(excinfo.value)
            assert str(excinfo.value).endswith("nothing was changed")
            with pytest.raises(StateDirError) as state_err:
                await ws.write("a.txt", "new\n", idempotency_key="k")
            assert str(state) in str(state_err.value)
            assert "read-only" in str(state_err.value).lower()
            with pytest.raises(DatabaseError) as db_err:
                async with Database(db_path) as db:
                    await db.execute("INSERT INTO t VALUES (1)")
            assert str(db_path) in str(db_err.value)
            assert "read-only" in str(db_err.value).lower()

        anyio.run(attempts)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_tmpfs)], check=True)
    assert (root / "a.txt").read_text() == "old\n"
    anyio.run(lambda: ws.write("a.txt", "new\n", idempotency_key="k"))
    assert (root / "a.txt").read_text() == "new\n"


# -- damaged state, a locked database --------------------------------------------------------------


def test_corrupt_idempotency_store_is_named_with_the_fix(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    state = tmp_path / "state"
    state.mkdir()
    (state / "idempotency.sqlite3").write_bytes(b"this is not a database" * 100)
    ws = Workspace([root], state_dir=state)

    async def attempt() -> None:
        with pytest.raises(StateDirError) as excinfo:
            await ws.write("a.txt", "x", idempotency_key="k")
        message = str(excinfo.value)
        assert "idempotency.sqlite3" in message
        assert "damaged" in message
        assert "move it aside" in message
        await ws.write("a.txt", "without a key it works")

    anyio.run(attempt)
    assert (root / "a.txt").read_text() == "without a key it works"


def test_database_locked_at_first_open(tmp_path: Path) -> None:
    path = tmp_path / "legacy.db"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            f"c = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
            "c.execute('PRAGMA journal_mode=DELETE'); c.execute('CREATE TABLE t (a)')\n"
            "c.execute('BEGIN EXCLUSIVE'); c.execute('INSERT INTO t VALUES (1)')\n"
            "print('locked', flush=True); time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"

        async def attempt() -> None:
            async with Database(path, busy_timeout=0.3) as db:
                with pytest.raises(DatabaseBusyError) as excinfo:
                    await db.execute("INSERT INTO t VALUES (2)")
            message = str(excinfo.value)
            assert str(path) in message
            assert "another process holds its lock" in message

        anyio.run(attempt)
    finally:
        holder.kill()
        holder.wait()
    anyio.run(_insert_works, path)


async def _insert_works(path: Path) -> None:
    async with Database(path) as db:
        await db.execute("INSERT INTO t VALUES (3)")
        assert (await db.query("SELECT count(*) FROM t")).rows == ((1,),)


# -- an unprivileged user: an unreadable record, EACCES while rolling forward -----------------


def _as_nobody(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``fault_child.py`` run as root until its imports are done, then as nobody."""
    code = (
        "import os, runpy, sys\n"
        "import atomictools.cli.commands, atomictools.engine.changes.recovery\n"
        "import atomictools.engine.changes.sweep, tests.fault_child\n"
        "import anyio._backends._asyncio\n"
        f"os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})\n"
        "sys.exit(tests.fault_child.main(sys.argv[1:]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env={**env, "PYTHONDONTWRITEBYTECODE": "1"},
        cwd=Path(__file__).parent.parent,
        timeout=60,
        check=False,
    )


@pytest.fixture
def world_tree() -> Iterator[Path]:
    """A directory outside pytest's 0700 temp dir, so that nobody can reach it."""
    base = Path(tempfile.mkdtemp(prefix="atomictools-nobody-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@needs_root
def test_unreadable_record_as_an_unprivileged_user_deletes_nothing(world_tree: Path) -> None:
    root, state = world_tree / "root", world_tree / "state"
    root.mkdir()
    case = scenario("no-mkdir", [root])
    install(root, case.old[0])
    crash_child("no-mkdir", [root], state, "changeset.apply:2")
    [record] = records(state)
    record.chmod(0o000)
    for path in [root, *root.iterdir()]:
        os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
    before = tree_with_ours(root)

    done = _as_nobody(["recover", str(root), str(state)], dict(os.environ))

    assert done.returncode == 2, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert "cannot be opened: Permission denied" in " ".join(report["problems"])
    assert tree_with_ours(root) == before
    record.chmod(0o600)
    assert (
        subprocess.run(
            [sys.executable, str(CHILD), "recover", str(root), str(state)],
            capture_output=True,
            check=False,
        ).returncode
        == 1
    )
    assert snapshot(root) == case.new[0]


@needs_root
def test_eacces_while_rolling_forward_keeps_the_record(world_tree: Path) -> None:
    """Issue 11, defect 3: an OSError during a roll-forward was a traceback with exit 1."""
    root, state = world_tree / "root", world_tree / "state"
    root.mkdir()
    case = scenario("no-mkdir", [root])
    install(root, case.old[0])
    crash_child("no-mkdir", [root], state, "changeset.committed")
    history = [state / "history", *(state / "history").rglob("*")]  # nobody records the entry
    for path in (state, state / "journals", *records(state), *history):
        os.chown(path, NOBODY, NOBODY)
    before = tree_with_ours(root)  # root stays root's: nobody cannot rename in it

    done = _as_nobody(["recover", str(root), str(state)], dict(os.environ))

    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 2, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert "Permission denied" in " ".join(report["problems"])
    assert tree_with_ours(root) == before
    assert len(records(state)) == 1
    again = subprocess.run(
        [sys.executable, str(CHILD), "recover", str(root), str(state)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 1, again.stdout + again.stderr
    assert snapshot(root) == case.new[0]
    assert temp_files(root) == []
