"""Parity: a change with an idempotency key and one without are the same change.

Every mutating operation x every precondition runs twice on the same fresh tree, once without a
key (the direct commit: one rename) and once with one (the journaled commit), and must give the
same outcome: the same result, or the same error class, ``changed`` flag and message, and the
same files afterwards. The two commits differ only in how they commit (see
``atomictools.engine.changes``); every check and every message is shared.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from atomictools import AtomicToolsError, Workspace

pytestmark = pytest.mark.anyio

SHM = Path("/dev/shm")
WRONG = "0" * 64

Setup = Callable[[Path, Path], None]
Act = Callable[[Workspace, str | None, str], Awaitable[object]]
"""(workspace, idempotency key or None, the second root) -> the call."""


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Cell:
    """One operation under one precondition."""

    name: str
    setup: Setup
    act: Act
    read_only: bool = False
    across: bool = False
    """Needs a second root on another file system."""


def files(a: bytes = b"alpha\n", b: bytes | None = None) -> Setup:
    def setup(tree: Path, _other: Path) -> None:
        (tree / "a.txt").write_bytes(a)
        (tree / "dir").mkdir()
        (tree / "dir" / "inner.txt").write_bytes(b"inner\n")
        if b is not None:
            (tree / "b.txt").write_bytes(b)

    return setup


def with_other(setup: Setup) -> Setup:
    def both(tree: Path, other: Path) -> None:
        setup(tree, other)
        (other / "there.txt").write_bytes(b"there\n")

    return both


def with_hard_link(setup: Setup) -> Setup:
    def linked(tree: Path, other: Path) -> None:
        setup(tree, other)
        os.link(tree / "a.txt", tree / "same.txt")

    return linked


def with_empty_dir(setup: Setup) -> Setup:
    def made(tree: Path, other: Path) -> None:
        setup(tree, other)
        (tree / "empty").mkdir()

    return made


def with_link(setup: Setup) -> Setup:
    def linked(tree: Path, other: Path) -> None:
        setup(tree, other)
        os.symlink("a.txt", tree / "link")

    return linked


A = files()
AB = files(b=b"bravo\n")
ALPHA = sha(b"alpha\n")

CELLS = [
    # write
    Cell("write-missing", A, lambda ws, k, o: ws.write("new.txt", "n\n", idempotency_key=k)),
    Cell("write-exists", A, lambda ws, k, o: ws.write("a.txt", "x\n", idempotency_key=k)),
    Cell(
        "write-new-dir-missing",
        A,
        lambda ws, k, o: ws.write("nowhere/new.txt", "n\n", idempotency_key=k),
    ),
    Cell(
        "write-create-only-exists",
        A,
        lambda ws, k, o: ws.write("a.txt", "x\n", create_only=True, idempotency_key=k),
    ),
    Cell(
        "write-create-only-missing",
        A,
        lambda ws, k, o: ws.write("new.txt", "x\n", create_only=True, idempotency_key=k),
    ),
    Cell(
        "write-right-sha",
        A,
        lambda ws, k, o: ws.write("a.txt", "x\n", expected_sha256=ALPHA, idempotency_key=k),
    ),
    Cell(
        "write-wrong-sha",
        A,
        lambda ws, k, o: ws.write("a.txt", "x\n", expected_sha256=WRONG, idempotency_key=k),
    ),
    Cell(
        "write-sha-of-missing",
        A,
        lambda ws, k, o: ws.write("new.txt", "x\n", expected_sha256=WRONG, idempotency_key=k),
    ),
    Cell("write-directory", A, lambda ws, k, o: ws.write("dir", "x\n", idempotency_key=k)),
    Cell("write-root", A, lambda ws, k, o: ws.write(".", "x\n", idempotency_key=k)),
    Cell("write-read-only", A, lambda ws, k, o: ws.write("a.txt", "x\n", idempotency_key=k), True),
    # edit
    Cell("edit-ok", A, lambda ws, k, o: ws.edit("a.txt", [("alpha", "omega")], idempotency_key=k)),
    Cell(
        "edit-missing", A, lambda ws, k, o: ws.edit("new.txt", [("alpha", "x")], idempotency_key=k)
    ),
    Cell("edit-directory", A, lambda ws, k, o: ws.edit("dir", [("a", "b")], idempotency_key=k)),
    Cell(
        "edit-wrong-sha",
        A,
        lambda ws, k, o: ws.edit(
            "a.txt", [("alpha", "omega")], expected_sha256=WRONG, idempotency_key=k
        ),
    ),
    Cell(
        "edit-right-sha",
        A,
        lambda ws, k, o: ws.edit(
            "a.txt", [("alpha", "omega")], expected_sha256=ALPHA, idempotency_key=k
        ),
    ),
    Cell(
        "edit-text-not-found",
        A,
        lambda ws, k, o: ws.edit("a.txt", [("zulu", "omega")], idempotency_key=k),
    ),
    Cell("edit-no-edits", A, lambda ws, k, o: ws.edit("a.txt", [], idempotency_key=k)),
    Cell(
        "edit-unchanged",
        A,
        lambda ws, k, o: ws.edit("a.txt", [("alpha", "alpha")], idempotency_key=k),
    ),
    Cell(
        "edit-read-only",
        A,
        lambda ws, k, o: ws.edit("a.txt", [("alpha", "omega")], idempotency_key=k),
        True,
    ),
    # move
    Cell("move-ok", A, lambda ws, k, o: ws.move("a.txt", "b.txt", idempotency_key=k)),
    Cell("move-missing", A, lambda ws, k, o: ws.move("nope.txt", "b.txt", idempotency_key=k)),
    Cell("move-exists", AB, lambda ws, k, o: ws.move("a.txt", "b.txt", idempotency_key=k)),
    Cell(
        "move-overwrite",
        AB,
        lambda ws, k, o: ws.move("a.txt", "b.txt", overwrite=True, idempotency_key=k),
    ),
    Cell("move-onto-itself", A, lambda ws, k, o: ws.move("a.txt", "a.txt", idempotency_key=k)),
    Cell(
        "move-wrong-sha",
        A,
        lambda ws, k, o: ws.move("a.txt", "b.txt", expected_sha256=WRONG, idempotency_key=k),
    ),
    Cell(
        "move-right-sha",
        A,
        lambda ws, k, o: ws.move("a.txt", "b.txt", expected_sha256=ALPHA, idempotency_key=k),
    ),
    Cell("move-directory", A, lambda ws, k, o: ws.move("dir", "moved", idempotency_key=k)),
    Cell(
        "move-directory-sha",
        A,
        lambda ws, k, o: ws.move("dir", "moved", expected_sha256=WRONG, idempotency_key=k),
    ),
    Cell(
        "move-over-directory",
        A,
        lambda ws, k, o: ws.move("a.txt", "dir", overwrite=True, idempotency_key=k),
    ),
    Cell(
        "move-onto-a-hard-link-of-itself",
        with_hard_link(A),
        lambda ws, k, o: ws.move("a.txt", "same.txt", overwrite=True, idempotency_key=k),
    ),
    Cell(
        "move-directory-over-a-directory",
        with_empty_dir(A),
        lambda ws, k, o: ws.move("dir", "empty", overwrite=True, idempotency_key=k),
    ),
    Cell("move-into-itself", A, lambda ws, k, o: ws.move("dir", "dir/sub", idempotency_key=k)),
    Cell("move-root", A, lambda ws, k, o: ws.move(".", "elsewhere", idempotency_key=k)),
    Cell("move-symlink", with_link(A), lambda ws, k, o: ws.move("link", "l2", idempotency_key=k)),
    Cell(
        "move-across-devices",
        with_other(A),
        lambda ws, k, o: ws.move("a.txt", f"{o}/moved.txt", idempotency_key=k),
        across=True,
    ),
    Cell(
        "move-across-devices-overwrite",
        with_other(A),
        lambda ws, k, o: ws.move("a.txt", f"{o}/there.txt", overwrite=True, idempotency_key=k),
        across=True,
    ),
    Cell(
        "move-across-devices-exists",
        with_other(A),
        lambda ws, k, o: ws.move("a.txt", f"{o}/there.txt", idempotency_key=k),
        across=True,
    ),
    Cell(
        "move-directory-across-devices",
        with_other(A),
        lambda ws, k, o: ws.move("dir", f"{o}/dir", idempotency_key=k),
        across=True,
    ),
    Cell("move-read-only", A, lambda ws, k, o: ws.move("a.txt", "b.txt", idempotency_key=k), True),
    # copy
    Cell("copy-ok", A, lambda ws, k, o: ws.copy("a.txt", "c.txt", idempotency_key=k)),
    Cell("copy-missing", A, lambda ws, k, o: ws.copy("nope.txt", "c.txt", idempotency_key=k)),
    Cell("copy-exists", AB, lambda ws, k, o: ws.copy("a.txt", "b.txt", idempotency_key=k)),
    Cell(
        "copy-overwrite",
        AB,
        lambda ws, k, o: ws.copy("a.txt", "b.txt", overwrite=True, idempotency_key=k),
    ),
    Cell("copy-onto-itself", A, lambda ws, k, o: ws.copy("a.txt", "a.txt", idempotency_key=k)),
    Cell(
        "copy-onto-itself-overwrite",
        A,
        lambda ws, k, o: ws.copy("a.txt", "a.txt", overwrite=True, idempotency_key=k),
    ),
    Cell(
        "copy-onto-its-link",
        with_link(A),
        lambda ws, k, o: ws.copy("a.txt", "link", overwrite=True, idempotency_key=k),
    ),
    Cell(
        "copy-wrong-sha",
        A,
        lambda ws, k, o: ws.copy("a.txt", "c.txt", expected_sha256=WRONG, idempotency_key=k),
    ),
    Cell(
        "copy-right-sha",
        A,
        lambda ws, k, o: ws.copy("a.txt", "c.txt", expected_sha256=ALPHA, idempotency_key=k),
    ),
    Cell("copy-directory", A, lambda ws, k, o: ws.copy("dir", "copied", idempotency_key=k)),
    Cell(
        "copy-over-directory",
        A,
        lambda ws, k, o: ws.copy("a.txt", "dir", overwrite=True, idempotency_key=k),
    ),
    Cell(
        "copy-across-devices",
        with_other(A),
        lambda ws, k, o: ws.copy("a.txt", f"{o}/copied.txt", idempotency_key=k),
        across=True,
    ),
    Cell("copy-read-only", A, lambda ws, k, o: ws.copy("a.txt", "c.txt", idempotency_key=k), True),
    # delete
    Cell("delete-ok", A, lambda ws, k, o: ws.delete("a.txt", idempotency_key=k)),
    Cell("delete-missing", A, lambda ws, k, o: ws.delete("nope.txt", idempotency_key=k)),
    Cell("delete-directory", A, lambda ws, k, o: ws.delete("dir", idempotency_key=k)),
    Cell("delete-root", A, lambda ws, k, o: ws.delete(".", idempotency_key=k)),
    Cell(
        "delete-wrong-sha",
        A,
        lambda ws, k, o: ws.delete("a.txt", expected_sha256=WRONG, idempotency_key=k),
    ),
    Cell(
        "delete-right-sha",
        A,
        lambda ws, k, o: ws.delete("a.txt", expected_sha256=ALPHA, idempotency_key=k),
    ),
    Cell("delete-symlink", with_link(A), lambda ws, k, o: ws.delete("link", idempotency_key=k)),
    Cell(
        "delete-symlink-sha",
        with_link(A),
        lambda ws, k, o: ws.delete("link", expected_sha256=ALPHA, idempotency_key=k),
    ),
    Cell("delete-read-only", A, lambda ws, k, o: ws.delete("a.txt", idempotency_key=k), True),
    # mkdir
    Cell("mkdir-missing", A, lambda ws, k, o: ws.mkdir("made", idempotency_key=k)),
    Cell("mkdir-parents", A, lambda ws, k, o: ws.mkdir("made/deeper/still", idempotency_key=k)),
    Cell("mkdir-exists", A, lambda ws, k, o: ws.mkdir("dir", idempotency_key=k)),
    Cell("mkdir-file-there", A, lambda ws, k, o: ws.mkdir("a.txt", idempotency_key=k)),
    Cell("mkdir-under-a-file", A, lambda ws, k, o: ws.mkdir("a.txt/sub", idempotency_key=k)),
    Cell("mkdir-read-only", A, lambda ws, k, o: ws.mkdir("made", idempotency_key=k), True),
]


def snapshot(*trees: Path) -> dict[str, object]:
    """Every entry below the trees: a file's bytes and mode, a link's target, a directory."""
    found: dict[str, object] = {}
    for index, tree in enumerate(trees):
        for path in sorted(tree.rglob("*")):
            key = f"{index}:{path.relative_to(tree)}"
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                found[key] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                found[key] = ("dir",)
            else:
                found[key] = ("file", path.read_bytes(), stat.S_IMODE(st.st_mode))
    return found


@dataclass
class Outcome:
    result: object
    error: tuple[str, str, bool] | None
    files: dict[str, object]


async def run_once(cell: Cell, tree: Path, other: Path, state: Path, key: str | None) -> Outcome:
    for directory in (tree, other, state):
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
    cell.setup(tree, other)
    ws = Workspace([tree, other], read_only=cell.read_only, state_dir=state)
    result: object = None
    error = None
    try:
        result = await cell.act(ws, key, str(other))
    except AtomicToolsError as err:
        error = (type(err).__name__, str(err).replace(str(other), "<other>"), err.changed)
    return Outcome(result, error, snapshot(tree, other))


@pytest.fixture
def other_root(tmp_path: Path) -> Iterator[Path]:
    """A root on another file system (tmpfs) than ``tmp_path``, for cross-device cells."""
    path = SHM / f"atomictools-parity-{os.getpid()}-{tmp_path.name}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("cell", CELLS, ids=[cell.name for cell in CELLS])
async def test_with_and_without_a_key_the_outcome_is_the_same(
    cell: Cell, tmp_path: Path, other_root: Path
) -> None:
    if cell.across and (not SHM.is_dir() or os.stat(SHM).st_dev == os.stat(tmp_path).st_dev):
        pytest.fail("the cross-device cells need /dev/shm on another file system")
    tree = tmp_path / "tree"
    direct = await run_once(cell, tree, other_root, tmp_path / "state-direct", None)
    keyed = await run_once(cell, tree, other_root, tmp_path / "state-keyed", f"parity-{cell.name}")
    assert keyed.error == direct.error
    assert keyed.result == direct.result
    assert keyed.files == direct.files
    # Either way nothing of ours is left next to the files.
    leftovers = [k for k in keyed.files if ".atomic" in k or ".tmp" in k]
    assert leftovers == []


def test_every_operation_and_precondition_is_covered() -> None:
    """The suite's own coverage: each mutating operation meets each kind of precondition."""
    names = {cell.name for cell in CELLS}
    for op in ("write", "edit", "move", "copy", "delete", "mkdir"):
        assert f"{op}-read-only" in names
        assert any(n.startswith(f"{op}-") and "missing" in n for n in names)
    for op in ("write", "edit", "move", "copy", "delete"):
        assert f"{op}-wrong-sha" in names
        assert f"{op}-directory" in names
    assert {"copy-onto-itself", "move-across-devices", "write-create-only-exists"} <= names
