"""History and undo through the engine API, on real files and a real history store."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys
from pathlib import Path

import anyio
import pytest

from atomictools import (
    Change,
    ConflictError,
    Database,
    DatabaseCatalog,
    Edit,
    InvalidArgumentError,
    NotFoundError,
    NotUndoableError,
    OutsideRootsError,
    ReadOnlyError,
    Workspace,
)
from atomictools.engine.durable.steps import observe_steps
from tests.conftest import temp_files

pytestmark = pytest.mark.anyio


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blobs(state: Path) -> list[str]:
    directory = state / "history" / "blobs"
    return sorted(os.listdir(directory)) if directory.exists() else []


async def test_every_kind_of_change_is_recorded_with_before_and_after(
    ws: Workspace, root: Path
) -> None:
    await ws.write("a.txt", "one\ntwo\n")
    await ws.write("a.txt", "one\nTWO\n")
    await ws.edit("a.txt", [("one", "1")])
    await ws.copy("a.txt", "b.txt")
    await ws.move("b.txt", "c.txt")
    await ws.delete("c.txt")
    await ws.mkdir("d/e")
    await ws.write("k.txt", "keyed\n", idempotency_key="key-1")
    entries = await ws.history_entries(limit=None)
    assert [e.op for e in reversed(entries)] == [
        "write", "write", "edit", "copy", "move", "delete", "mkdir", "write"
    ]  # fmt: skip
    first, replace, edit, copy, move, delete, mkdir, keyed = reversed(entries)
    assert first.paths[0].before == "absent"
    assert first.paths[0].after_sha256 == sha(b"one\ntwo\n")
    row = replace.paths[0]
    assert (row.path, row.before, row.before_sha256, row.after_sha256) == (
        "a.txt", "file", sha(b"one\ntwo\n"), sha(b"one\nTWO\n")
    )  # fmt: skip
    assert (row.added, row.removed) == (1, 1)
    assert (edit.paths[0].added, edit.paths[0].removed) == (1, 1)
    assert copy.paths[0].before == "absent"
    assert copy.paths[0].path == "b.txt"
    assert [(p.path, p.before, p.after) for p in move.paths] == [
        ("b.txt", "file", "absent"), ("c.txt", "absent", "file")
    ]  # fmt: skip
    assert move.paths[1].moved_from == "b.txt"
    assert (delete.paths[0].before, delete.paths[0].after) == ("file", "absent")
    assert [(p.path, p.after) for p in mkdir.paths] == [("d", "directory"), ("d/e", "directory")]
    assert keyed.paths[0].after_sha256 == sha(b"keyed\n")
    assert all(e.undoable for e in entries)


async def test_small_old_content_is_kept_in_the_store_large_by_a_hard_link(
    ws: Workspace, root: Path, private_state_dir: Path
) -> None:
    await ws.write("small.txt", "small\n")
    await ws.write("small.txt", "changed\n")
    assert blobs(private_state_dir) == []  # copied into the database
    big = os.urandom(300_000)
    await ws.write("big.bin", big)
    old_inode = (root / "big.bin").stat().st_ino
    await ws.write("big.bin", b"replaced")
    assert blobs(private_state_dir) == [sha(big)]
    kept = private_state_dir / "history" / "blobs" / sha(big)
    assert kept.stat().st_ino == old_inode  # the old inode itself, not a copy
    result = await ws.undo(last=1)
    assert (root / "big.bin").read_bytes() == big
    assert result.paths[0].action == "restored"


async def test_the_same_content_is_kept_once(
    ws: Workspace, root: Path, private_state_dir: Path
) -> None:
    big = os.urandom(100_000)
    for _ in range(3):
        await ws.write("x.bin", big)
        await ws.write("x.bin", b"other")
    assert blobs(private_state_dir) == [sha(big)]
    assert ws.history.store.kept_bytes() == len(big) + len(b"other")


async def test_history_off_records_nothing(root: Path, private_state_dir: Path) -> None:
    ws = Workspace([root], history=False)
    await ws.write("a.txt", "x")
    await ws.apply_changes([Change("write", "b.txt", content=b"y")])
    assert not (private_state_dir / "history").exists()
    assert await ws.history_entries() == []
    with pytest.raises(NotFoundError, match="no history"):
        await ws.undo(last=1)


async def test_undo_restores_a_change_set_and_redo_takes_the_undo_back(
    ws: Workspace, root: Path
) -> None:
    await ws.write("a.txt", "alpha\n")
    await ws.write("b.txt", "beta\n")
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    done = await ws.apply_changes(
        [
            Change("edit", "a.txt", edits=(Edit("alpha", "ALPHA"),)),
            Change("delete", "b.txt"),
            Change("mkdir", "new/dir"),
            Change("write", "new/dir/c.txt", content=b"c\n"),
        ]
    )
    assert done.change_id is not None
    after = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    undo = await ws.undo(done.change_id)
    assert undo.undone == (done.change_id,)
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before
    assert not (root / "new").exists()
    latest = (await ws.history_entries(limit=1))[0]
    assert (latest.id, latest.op, latest.undoes) == (undo.change_id, "undo", (done.change_id,))
    assert undo.change_id is not None
    await ws.undo(undo.change_id)  # redo
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == after


async def test_dry_run_shows_diffs_and_changes_nothing(ws: Workspace, root: Path) -> None:
    await ws.write("a.txt", "one\ntwo\n")
    await ws.write("a.txt", "one\n2\n")
    count = len(await ws.history_entries(limit=None))
    result = await ws.undo(last=1, dry_run=True)
    assert not result.applied
    assert result.change_id is None
    assert result.paths[0].diff is not None
    assert "-2\n+two\n" in result.paths[0].diff
    assert (root / "a.txt").read_text() == "one\n2\n"
    assert len(await ws.history_entries(limit=None)) == count


async def test_a_path_changed_since_is_refused_by_name_unless_forced(
    ws: Workspace, root: Path
) -> None:
    await ws.write("a.txt", "v1\n")
    await ws.write("b.txt", "b1\n")
    set_done = await ws.apply_changes(
        [Change("write", "a.txt", content=b"v2\n"), Change("write", "b.txt", content=b"b2\n")]
    )
    later = await ws.write("a.txt", "v3 by someone else\n")
    assert set_done.change_id is not None
    with pytest.raises(ConflictError, match=r"a\.txt was changed after it") as caught:
        await ws.undo(set_done.change_id)
    assert "b.txt" not in str(caught.value).split("changed after")[0]
    assert (root / "a.txt").read_text() == "v3 by someone else\n"
    assert (root / "b.txt").read_text() == "b2\n"  # all or nothing: b.txt untouched too
    assert later.sha256 == sha(b"v3 by someone else\n")
    only_b = await ws.undo(set_done.change_id, paths=["b.txt"])
    assert [p.path for p in only_b.paths] == ["b.txt"]
    assert (root / "b.txt").read_text() == "b1\n"
    await ws.undo(set_done.change_id, paths=["a.txt"], force=True)
    assert (root / "a.txt").read_text() == "v1\n"


async def test_undo_last_n_goes_back_to_before_the_oldest(ws: Workspace, root: Path) -> None:
    await ws.write("a.txt", "1")
    await ws.write("a.txt", "2")
    await ws.write("a.txt", "3")
    await ws.move("a.txt", "moved.txt")
    result = await ws.undo(last=3)
    assert len(result.undone) == 3
    assert (root / "a.txt").read_text() == "1"
    assert not (root / "moved.txt").exists()


async def test_undo_of_moves_and_deletes(ws: Workspace, root: Path) -> None:
    (root / "dir").mkdir()
    (root / "dir" / "inner.txt").write_text("inner")
    await ws.move("dir", "renamed")
    await ws.undo(last=1)
    assert (root / "dir" / "inner.txt").read_text() == "inner"
    assert not (root / "renamed").exists()
    await ws.write("gone.txt", "keep me")
    await ws.delete("gone.txt")
    await ws.undo(last=1)
    assert (root / "gone.txt").read_text() == "keep me"
    await ws.write("target.txt", "old target")
    await ws.write("src.txt", "source")
    await ws.move("src.txt", "target.txt", overwrite=True)
    await ws.undo(last=1)
    assert (root / "src.txt").read_text() == "source"
    assert (root / "target.txt").read_text() == "old target"


async def test_undo_of_mkdir_removes_only_empty_directories(ws: Workspace, root: Path) -> None:
    await ws.mkdir("a/b/c")
    (root / "a" / "b" / "stray.txt").write_text("made outside atomictools")
    with pytest.raises(ConflictError, match="not empty"):
        await ws.undo(last=1)
    assert (root / "a" / "b" / "c").is_dir()
    (root / "a" / "b" / "stray.txt").unlink()
    await ws.undo(last=1)
    assert not (root / "a").exists()


async def test_pruned_content_says_it_can_no_longer_be_undone(root: Path) -> None:
    ws = Workspace([root], history_max_bytes=10)
    await ws.write("a.txt", "first version, long enough\n")
    await ws.write("a.txt", "second\n")
    await ws.write("b.txt", "b\n")
    ws.prune_history()
    entries = await ws.history_entries(limit=None)
    replaced = next(
        e for e in entries if e.paths[0].path == "a.txt" and e.paths[0].before == "file"
    )
    assert replaced.paths[0].pruned
    assert not replaced.undoable
    with pytest.raises(NotUndoableError, match="pruned"):
        await ws.undo(replaced.id)
    assert (root / "a.txt").read_text() == "second\n"


async def test_retention_by_age_drops_old_entries(root: Path) -> None:
    ws = Workspace([root], history_max_age=3600)
    await ws.write("a.txt", "1")
    await ws.write("a.txt", "2")
    store = ws.history.store
    with sqlite3.connect(store.directory / "history.sqlite3") as conn:
        conn.execute("UPDATE changes SET time = time - 7200 WHERE seq = 1")
    ws.prune_history()
    assert [e.paths[0].before for e in await ws.history_entries(limit=None)] == ["file"]


async def test_read_only_refuses_undo_but_allows_a_dry_run(root: Path) -> None:
    writer = Workspace([root])
    await writer.write("a.txt", "1")
    await writer.write("a.txt", "2")
    reader = Workspace([root], read_only=True)
    assert (await reader.undo(last=1, dry_run=True)).paths[0].action == "restored"
    with pytest.raises(ReadOnlyError):
        await reader.undo(last=1)


async def test_bad_arguments_are_refused_clearly(ws: Workspace) -> None:
    await ws.write("a.txt", "1")
    with pytest.raises(InvalidArgumentError, match="either"):
        await ws.undo()
    with pytest.raises(InvalidArgumentError, match="either"):
        await ws.undo("abc", last=1)
    with pytest.raises(NotFoundError, match="list_changes"):
        await ws.undo("nope")
    with pytest.raises(InvalidArgumentError, match="was not changed by"):
        await ws.undo(last=1, paths=["other.txt"])


async def test_confinement_a_narrowed_view_never_undoes_outside_it(tmp_path: Path) -> None:
    outer = tmp_path / "outer"
    (outer / "inside").mkdir(parents=True)
    (outer / "elsewhere").mkdir()
    wide = Workspace([outer])
    done = await wide.apply_changes(
        [
            Change("write", "inside/a.txt", content=b"new a"),
            Change("write", "elsewhere/b.txt", content=b"new b"),
        ]
    )
    narrow = wide.narrowed([outer / "inside"])
    shown = await narrow.history_entries()
    assert [p.path for p in shown[0].paths] == ["a.txt"]  # the other path is not shown
    assert done.change_id is not None
    with pytest.raises(OutsideRootsError, match="outside the allowed directories"):
        await narrow.undo(done.change_id)
    assert (outer / "elsewhere" / "b.txt").read_bytes() == b"new b"
    await narrow.undo(done.change_id, paths=["a.txt"])
    assert not (outer / "inside" / "a.txt").exists()
    assert (outer / "elsewhere" / "b.txt").read_bytes() == b"new b"
    other = Workspace([outer / "elsewhere"])
    with pytest.raises(NotFoundError):  # a change wholly outside: not even found
        await other.undo((await wide.history_entries(limit=1))[0].id)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # aiosqlite runs on asyncio only
async def test_database_calls_are_audit_entries(root: Path, ws: Workspace) -> None:
    catalog = DatabaseCatalog(ws, {"main": root.parent / "main.sqlite3"})
    try:
        db: Database = await catalog.get("main")
        await db.execute("CREATE TABLE t (x)")
        await db.execute("INSERT INTO t VALUES (1), (2)")
    finally:
        await catalog.close()
    entries = await ws.history_entries()
    assert [(e.op, e.database, e.rows_changed) for e in entries[:1]] == [
        ("db_execute", "main", 2)
    ]  # fmt: skip
    assert entries[0].statements == ("INSERT INTO t VALUES (1), (2)",)
    assert not entries[0].undoable
    with pytest.raises(NotUndoableError, match="database"):
        await ws.undo(entries[0].id)


async def test_an_undo_leaves_no_temp_files(ws: Workspace, root: Path) -> None:
    await ws.write("a.txt", "1")
    await ws.apply_changes([Change("write", "a.txt", content=b"2"), Change("mkdir", "d")])
    await ws.undo(last=1)
    assert temp_files(root) == []


async def test_undo_refuses_what_another_process_changed_since(
    ws: Workspace, root: Path, private_state_dir: Path
) -> None:
    mine = await ws.write("shared.txt", "mine\n")
    assert mine.sha256 == sha(b"mine\n")
    own = (await ws.history_entries(limit=1))[0]
    script = (
        "import anyio, sys\n"
        "from atomictools import Workspace\n"
        "ws = Workspace([sys.argv[1]], state_dir=sys.argv[2])\n"
        "anyio.run(ws.write, 'shared.txt', 'theirs\\n')\n"
    )
    other = await anyio.run_process(
        [sys.executable, "-c", script, str(root), str(private_state_dir)]
    )
    assert other.returncode == 0
    theirs = (await ws.history_entries(limit=1))[0]
    assert theirs.id != own.id
    with pytest.raises(
        ConflictError, match=rf"shared\.txt was changed after it, last by change {theirs.id}"
    ):
        await ws.undo(own.id)
    assert (root / "shared.txt").read_text() == "theirs\n"


async def test_history_of_a_path_whose_directory_is_gone(ws: Workspace, root: Path) -> None:
    await ws.apply_changes([Change("mkdir", "gone"), Change("write", "gone/f.txt", content=b"f\n")])
    await ws.undo(last=1)
    assert not (root / "gone").exists()
    entries = await ws.history_entries(path="gone/f.txt")
    assert [e.op for e in entries] == ["undo", "apply_changes"]
    await ws.undo(entries[0].id, paths=["gone/f.txt", "gone"])  # redo, by paths
    assert (root / "gone" / "f.txt").read_text() == "f\n"


@pytest.mark.parametrize(("source", "destination"), [("a.txt", "z.txt"), ("z.txt", "a.txt")])
async def test_undo_and_redo_of_a_move_whichever_name_sorts_first(
    ws: Workspace, root: Path, source: str, destination: str
) -> None:
    (root / source).write_text("moving\n")
    (root / source).chmod(0o751)
    await ws.move(source, destination)
    undo = await ws.undo(last=1)
    assert [(p.path, p.action) for p in undo.paths] == [(source, "moved_back")]
    assert (root / source).read_text() == "moving\n"
    assert (root / source).stat().st_mode & 0o777 == 0o751  # the same inode came back
    assert not (root / destination).exists()
    assert undo.change_id is not None
    await ws.undo(undo.change_id)  # redo
    assert (root / destination).read_text() == "moving\n"
    assert not (root / source).exists()


async def test_undo_of_a_moved_directory_then_written_into(ws: Workspace, root: Path) -> None:
    await ws.mkdir("z")
    await ws.move("z", "a")
    await ws.write("a/f.txt", "inside\n")
    await ws.undo(last=2)  # the write, then the move: a goes back to z, emptied of f.txt
    assert sorted(p.name for p in root.iterdir()) == ["z"]
    assert list((root / "z").iterdir()) == []


async def test_undo_finds_content_kept_by_another_change(ws: Workspace, root: Path) -> None:
    await ws.write("a.txt", "original\n")
    await ws.move("a.txt", "b.txt")
    await ws.write("b.txt", "rewritten\n")  # keeps "original" (b's old content)
    await ws.undo(last=2)
    assert (root / "a.txt").read_text() == "original\n"
    assert not (root / "b.txt").exists()


async def test_paths_must_name_both_ends_of_a_move(ws: Workspace, root: Path) -> None:
    await ws.write("a.txt", "x\n")
    await ws.move("a.txt", "b.txt")
    with pytest.raises(InvalidArgumentError, match="name both paths"):
        await ws.undo(last=1, paths=["b.txt"])
    assert (root / "b.txt").read_text() == "x\n"
    await ws.undo(last=1, paths=["a.txt", "b.txt"])
    assert (root / "a.txt").read_text() == "x\n"


async def test_a_crashed_writer_with_our_pid_is_not_taken_for_us(
    ws: Workspace, root: Path, private_state_dir: Path
) -> None:
    """A restarted server often has the same pid (pid 1 in a container): a pending entry of
    its predecessor is still decided by recovery (the owner names the process start time)."""
    await ws.write("a.txt", "v1\n")
    entry = (await ws.history_entries(limit=1))[0]
    with sqlite3.connect(private_state_dir / "history" / "history.sqlite3") as conn:
        owner = conn.execute("SELECT owner FROM changes WHERE id = ?", (entry.id,)).fetchone()[0]
        boot, pid, _start = owner.split(":")
        assert int(pid) == os.getpid()
        stale = f"{boot}:{pid}:1"  # same pid, another start: a predecessor
        evidence = json.dumps(
            [{"dir": str(root), "name": "a.txt", "dev": 0, "ino": (root / "a.txt").stat().st_ino}]
        )
        conn.execute(
            "UPDATE changes SET state = 'pending', owner = ?, evidence = ? WHERE id = ?",
            (stale, evidence, entry.id),
        )
    assert await ws.history_entries() == []
    report = await ws.recover_interrupted()
    assert report.history_confirmed == [entry.id]
    assert [e.id for e in await ws.history_entries()] == [entry.id]


async def test_a_pending_entry_is_kept_when_the_file_changed_again_before_recovery(
    ws: Workspace, root: Path, private_state_dir: Path
) -> None:
    await ws.write("a.txt", "v0\n")
    await ws.write("a.txt", "v1\n")
    entry = (await ws.history_entries(limit=1))[0]
    committed_inode = (root / "a.txt").stat().st_ino
    with sqlite3.connect(private_state_dir / "history" / "history.sqlite3") as conn:
        evidence = json.dumps(
            [
                {
                    "dir": str(root),
                    "name": "a.txt",
                    "dev": 0,
                    "ino": committed_inode,
                    "temp": ".gone.tmp",
                    "before_ino": 1,
                }
            ]
        )
        conn.execute(
            "UPDATE changes SET state = 'pending', owner = 'x:1:1', evidence = ? WHERE id = ?",
            (evidence, entry.id),
        )
    (root / "a.txt").unlink()
    (root / "a.txt").write_text("v2 by someone else\n")  # a new inode: neither before nor after
    report = await ws.recover_interrupted()
    assert report.history_confirmed == [entry.id]
    with pytest.raises(ConflictError):
        await ws.undo(entry.id)
    await ws.undo(entry.id, force=True)
    assert (root / "a.txt").read_text() == "v0\n"


async def test_undo_of_a_delete_restores_the_permission_bits(ws: Workspace, root: Path) -> None:
    script = root / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o751)
    await ws.delete("run.sh")
    await ws.undo(last=1)
    assert script.read_text() == "#!/bin/sh\necho hi\n"
    assert script.stat().st_mode & 0o7777 == 0o751


async def test_a_cancelled_change_leaves_no_kept_content_behind(
    root: Path, private_state_dir: Path
) -> None:
    """Its linked content is still the live file's inode: kept, a later in-place edit of that
    file would change what the store holds under the old hash."""
    big = os.urandom(200_000)
    (root / "big.bin").write_bytes(big)
    ws = Workspace([root])

    with (
        anyio.CancelScope() as scope,
        observe_steps(lambda name: scope.cancel() if name == "write.synced" else None),
    ):
        await ws.write("big.bin", b"new")
    assert scope.cancelled_caught
    assert (root / "big.bin").read_bytes() == big
    assert blobs(private_state_dir) == []
    assert await ws.history_entries() == []
