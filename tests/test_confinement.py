"""Confinement: no path, symlink or race gets a Workspace operation outside its roots.

Every escape is driven through every operation (read_text, read_bytes, write, move as source and
as destination, copy as source and as destination, delete) on real files. The assertion that
matters is not only the exception: a snapshot of the whole tree (content, inode and mtime of every
file, every link target, the mtime of every directory) must be identical afterwards, so nothing
outside was read into a result, replaced, created (not even a temp file for a moment) or deleted.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest

from atomictools import (
    AlreadyExistsError,
    AtomicToolsError,
    BytesRead,
    ConcurrentChangeError,
    InvalidPathError,
    NotFoundError,
    OutsideRootsError,
    TextRead,
    Workspace,
    WrongTypeError,
)
from atomictools.engine.changes import direct as fileops
from atomictools.engine.db.catalog import DatabaseCatalog
from atomictools.engine.durable.fsutil import AT_FDCWD, RENAME_EXCHANGE, renameat2
from atomictools.engine.durable.steps import observe_steps
from atomictools.engine.reads import files
from atomictools.engine.sandbox import Location
from tests.conftest import tree_snapshot as snapshot

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("no_temps_left")]

SECRET = b"outside\n"  # what the conftest fixture puts in every outside file
INSIDE = b"inside content\n"
IN_D = b"inside d/f.txt\n"
OUTSIDE_MESSAGE = r"outside the allowed directories"

PathArg = str | os.PathLike[str]


# -- helpers ------------------------------------------------------------------------------------

Entry = tuple[object, ...]


def outside_snapshot(tmp_path: Path, root: Path) -> dict[str, Entry]:
    """Everything under tmp_path except the root: the part no call may ever touch."""
    return snapshot(tmp_path, exclude=root)


@pytest.fixture
def tree(root: Path) -> Path:
    """Inside the root: ``inside.txt``, ``file.txt``, ``sub/deeper/``, ``sub/inner.txt``."""
    (root / "inside.txt").write_bytes(INSIDE)
    (root / "file.txt").write_bytes(INSIDE)
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "sub" / "inner.txt").write_bytes(INSIDE)
    return root


# -- the operations -----------------------------------------------------------------------------

Op = Callable[[Workspace, PathArg], Awaitable[object]]

OPS: dict[str, Op] = {
    "read_text": lambda ws, p: ws.read_text(p),
    "read_bytes": lambda ws, p: ws.read_bytes(p),
    "write": lambda ws, p: ws.write(p, "PWNED\n"),
    "move_src": lambda ws, p: ws.move(p, "moved.txt"),
    "move_dst": lambda ws, p: ws.move("inside.txt", p, overwrite=True),
    "copy_src": lambda ws, p: ws.copy(p, "copied.txt"),
    "copy_dst": lambda ws, p: ws.copy("inside.txt", p, overwrite=True),
    "delete": lambda ws, p: ws.delete(p),
}

ACTS_ON_LINK = {"move_src", "move_dst", "delete"}
"""Operations that act on a final-component symlink itself instead of following it."""


# -- the escapes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Escape:
    id: str
    make: Callable[[Path, Path, pytest.MonkeyPatch], PathArg]
    """(root, tmp_path, monkeypatch) -> the path to hand to the operation; may create links."""
    final_link: bool = False
    """The last component is a symlink pointing outside (move and delete act on the link)."""


def _link(link: Path, target: str | Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def _tilde_outside(root: Path, tmp: Path, mp: pytest.MonkeyPatch) -> str:
    mp.setenv("HOME", str(tmp))
    return "~/outside.txt"


def _tilde_sibling(root: Path, tmp: Path, mp: pytest.MonkeyPatch) -> str:
    mp.setenv("HOME", f"{root}-evil")
    return "~/secret.txt"


def _final_abs(root: Path, tmp: Path, mp: pytest.MonkeyPatch) -> str:
    _link(root / "evil.txt", tmp / "outside.txt")
    return "evil.txt"


def _final_rel(root: Path, tmp: Path, mp: pytest.MonkeyPatch) -> str:
    _link(root / "sub" / "evil.txt", "../../outside.txt")
    return "sub/evil.txt"


def _final_dangling(root: Path, tmp: Path, mp: pytest.MonkeyPatch) -> str:
    _link(root / "evil.txt", tmp / "created.txt")
    return "evil.txt"


def _final_sibling(root: Path, tmp: Path, mp: pytest.MonkeyPatch) -> str:
    _link(root / "evil.txt", f"{root}-evil/secret.txt")
    return "evil.txt"


def _final_abs_dotdot(root: Path, tmp: Path, mp: pytest.MonkeyPatch) -> str:
    _link(root / "evil.txt", f"{root}/../outside.txt")
    return "evil.txt"


def _final_chain(root: Path, tmp: Path, mp: pytest.MonkeyPatch) -> str:
    _link(root / "hop1.txt", "sub/hop2.txt")
    _link(root / "sub" / "hop2.txt", "../../root-evil/secret.txt")
    return "hop1.txt"


def _dir_abs(root: Path, tmp: Path, mp: pytest.MonkeyPatch) -> str:
    _link(root / "evil", tmp / "root-evil")
    return "evil/secret.txt"


def _dir_rel(root: Path, tmp: Path, mp: pytest.MonkeyPatch) -> str:
    _link(root / "evil", "../root-evil")
    return "evil/secret.txt"


def _dir_new_file(root: Path, tmp: Path, mp: pytest.MonkeyPatch) -> str:
    _link(root / "evil", tmp / "root-evil")
    return "evil/created.txt"


def _dir_nested_rel(root: Path, tmp: Path, mp: pytest.MonkeyPatch) -> str:
    _link(root / "sub" / "deeper" / "evil", "../../../root-evil")
    return "sub/deeper/evil/secret.txt"


def _dir_to_parent(root: Path, tmp: Path, mp: pytest.MonkeyPatch) -> str:
    _link(root / "up", "..")
    return "up/outside.txt"


def _dir_to_fs_root(root: Path, tmp: Path, mp: pytest.MonkeyPatch) -> str:
    _link(root / "slash", "/")
    return f"slash{tmp}/outside.txt"


def _dir_sibling(root: Path, tmp: Path, mp: pytest.MonkeyPatch) -> str:
    _link(root / "evil", f"{root}-evil")
    return "evil/secret.txt"


def _dir_chain(root: Path, tmp: Path, mp: pytest.MonkeyPatch) -> str:
    _link(root / "hop1", "sub/hop2")  # inside -> inside -> outside
    _link(root / "sub" / "hop2", str(tmp / "root-evil"))
    return "hop1/secret.txt"


def _dir_link_in_link(root: Path, tmp: Path, mp: pytest.MonkeyPatch) -> str:
    _link(root / "alias", "sub")
    _link(root / "sub" / "evil", "../../root-evil")
    return "alias/evil/secret.txt"


def _dir_then_dotdot(root: Path, tmp: Path, mp: pytest.MonkeyPatch) -> str:
    _link(root / "inner", "sub/deeper")  # inner/../.. is the root, one more .. leaves it
    return "inner/../../../outside.txt"


def _dir_abs_dotdot(root: Path, tmp: Path, mp: pytest.MonkeyPatch) -> str:
    _link(root / "sneaky", f"{root}/../root-evil")
    return "sneaky/secret.txt"


ESCAPES = [
    Escape("dotdot", lambda r, t, m: "../outside.txt"),
    Escape("dotdot_after_subdir", lambda r, t, m: "sub/../../outside.txt"),
    Escape("dotdot_deep", lambda r, t, m: "sub/deeper/../../../outside.txt"),
    Escape("dotdot_new_file", lambda r, t, m: "../created.txt"),
    Escape("absolute_outside", lambda r, t, m: str(t / "outside.txt")),
    Escape("absolute_outside_pathlike", lambda r, t, m: t / "outside.txt"),
    Escape("absolute_new_file", lambda r, t, m: str(t / "created.txt")),
    Escape("absolute_root_dotdot", lambda r, t, m: f"{r}/../outside.txt"),
    Escape("absolute_root_sub_dotdot_new", lambda r, t, m: f"{r}/sub/../../created.txt"),
    Escape("absolute_double_slash", lambda r, t, m: f"{r}//..//outside.txt"),
    Escape("sibling_prefix_absolute", lambda r, t, m: f"{r}-evil/secret.txt"),
    Escape("sibling_prefix_absolute_new", lambda r, t, m: f"{r}-evil/created.txt"),
    Escape("sibling_prefix_relative", lambda r, t, m: "../root-evil/secret.txt"),
    Escape("tilde_home_outside", _tilde_outside),
    Escape("tilde_home_sibling_prefix", _tilde_sibling),
    Escape("symlink_final_absolute", _final_abs, final_link=True),
    Escape("symlink_final_relative", _final_rel, final_link=True),
    Escape("symlink_final_dangling", _final_dangling, final_link=True),
    Escape("symlink_final_sibling_prefix", _final_sibling, final_link=True),
    Escape("symlink_final_absolute_dotdot", _final_abs_dotdot, final_link=True),
    Escape("symlink_final_chain", _final_chain, final_link=True),
    Escape("symlink_dir_absolute", _dir_abs),
    Escape("symlink_dir_relative", _dir_rel),
    Escape("symlink_dir_new_file", _dir_new_file),
    Escape("symlink_dir_nested_relative", _dir_nested_rel),
    Escape("symlink_dir_to_parent", _dir_to_parent),
    Escape("symlink_dir_to_filesystem_root", _dir_to_fs_root),
    Escape("symlink_dir_sibling_prefix", _dir_sibling),
    Escape("symlink_dir_chain", _dir_chain),
    Escape("symlink_dir_inside_symlinked_dir", _dir_link_in_link),
    Escape("symlink_dir_then_dotdot", _dir_then_dotdot),
    Escape("symlink_dir_absolute_dotdot", _dir_abs_dotdot),
]

REFUSED = [
    pytest.param(escape, op, id=f"{escape.id}-{op}")
    for escape in ESCAPES
    for op in OPS
    if not (escape.final_link and op in ACTS_ON_LINK)
]

ON_LINK = [
    pytest.param(escape, op, id=f"{escape.id}-{op}")
    for escape in ESCAPES
    for op in sorted(ACTS_ON_LINK)
    if escape.final_link
]


@pytest.mark.parametrize(("escape", "op"), REFUSED)
async def test_escape_is_refused_and_nothing_changes(
    escape: Escape,
    op: str,
    tree: Path,
    tmp_path: Path,
    ws: Workspace,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = escape.make(tree, tmp_path, monkeypatch)
    before = snapshot(tmp_path)
    with pytest.raises(OutsideRootsError, match=OUTSIDE_MESSAGE) as caught:
        await OPS[op](ws, path)
    assert caught.value.code == "outside_roots"
    assert "nothing was changed" in str(caught.value)
    assert snapshot(tmp_path) == before  # not outside, not inside, not even a temp for a moment
    assert (tmp_path / "outside.txt").read_bytes() == SECRET
    assert (tmp_path / "root-evil" / "secret.txt").read_bytes() == SECRET
    assert not (tmp_path / "created.txt").exists()
    assert not (tmp_path / "root-evil" / "created.txt").exists()


@pytest.mark.parametrize(("escape", "op"), ON_LINK)
async def test_final_link_to_outside_is_moved_or_deleted_as_a_link(
    escape: Escape,
    op: str,
    tree: Path,
    tmp_path: Path,
    ws: Workspace,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Move and delete act on a symlink itself: the link (inside) changes, its target never."""
    path = escape.make(tree, tmp_path, monkeypatch)
    link = tree / os.fspath(path)
    target = os.readlink(link)
    outside_before = outside_snapshot(tmp_path, tree)

    await OPS[op](ws, path)

    assert outside_snapshot(tmp_path, tree) == outside_before
    if op == "move_src":
        assert not os.path.lexists(link)
        assert (tree / "moved.txt").is_symlink()
        assert os.readlink(tree / "moved.txt") == target
    elif op == "move_dst":
        assert not link.is_symlink()
        assert link.read_bytes() == INSIDE
        assert not (tree / "inside.txt").exists()
    else:
        assert not os.path.lexists(link)


# -- NUL bytes ----------------------------------------------------------------------------------

NUL_PATHS = {
    "nul_in_name": "nul\x00.txt",
    "nul_only": "\x00",
    "nul_after_dotdot": "../outside.txt\x00",
    "nul_in_directory": "sub/\x00/inner.txt",
    "nul_absolute_outside": "{tmp}/outside.txt\x00.txt",
    "nul_absolute_inside": "{root}/inside.txt\x00",
}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("path_id", list(NUL_PATHS))
async def test_nul_byte_is_refused(
    path_id: str, op: str, tree: Path, tmp_path: Path, ws: Workspace
) -> None:
    path = NUL_PATHS[path_id].format(tmp=tmp_path, root=tree)
    before = snapshot(tmp_path)
    with pytest.raises(InvalidPathError, match="NUL") as caught:
        await OPS[op](ws, path)
    assert not isinstance(caught.value, OutsideRootsError)
    assert "nothing was changed" in str(caught.value)
    assert snapshot(tmp_path) == before


# -- what must stay allowed ---------------------------------------------------------------------


@dataclass(frozen=True)
class InsideLink:
    id: str
    make: Callable[[Path], str]
    """root -> the path through the link; the real file is always ``root/target.txt``."""


def _in_relative(root: Path) -> str:
    _link(root / "l.txt", "target.txt")
    return "l.txt"


def _in_relative_dotdot(root: Path) -> str:
    _link(root / "sub" / "deeper" / "l.txt", "../../target.txt")
    return "sub/deeper/l.txt"


def _in_absolute(root: Path) -> str:
    _link(root / "sub" / "l.txt", root / "target.txt")
    return "sub/l.txt"


def _in_chain(root: Path) -> str:
    _link(root / "l1.txt", "sub/l2.txt")
    _link(root / "sub" / "l2.txt", f"{root}/sub/deeper/../../target.txt")
    return "l1.txt"


INSIDE_LINKS = [
    InsideLink("relative_same_dir", _in_relative),
    InsideLink("relative_dotdot_stays_inside", _in_relative_dotdot),
    InsideLink("absolute_into_root", _in_absolute),
    InsideLink("chain_inside_with_dotdot", _in_chain),
]


@pytest.mark.parametrize("case", INSIDE_LINKS, ids=lambda c: c.id)
async def test_symlink_to_file_inside_is_followed(
    case: InsideLink, tree: Path, ws: Workspace
) -> None:
    target = tree / "target.txt"
    target.write_bytes(b"target\n")
    path = case.make(tree)
    link = tree / path
    link_target = os.readlink(link)

    assert (await ws.read_text(path)).content == "target\n"
    assert (await ws.read_bytes(path)).data == b"target\n"

    await ws.write(path, "written through\n")
    assert link.is_symlink()
    assert os.readlink(link) == link_target
    assert target.read_bytes() == b"written through\n"

    await ws.copy(path, "copy.txt")
    assert not (tree / "copy.txt").is_symlink()
    assert (tree / "copy.txt").read_bytes() == b"written through\n"

    await ws.copy("inside.txt", path, overwrite=True)
    assert link.is_symlink()
    assert os.readlink(link) == link_target
    assert target.read_bytes() == INSIDE

    await ws.move(path, "moved-link")
    assert (tree / "moved-link").is_symlink()
    assert not os.path.lexists(link)
    await ws.delete("moved-link")
    assert not os.path.lexists(tree / "moved-link")
    assert target.read_bytes() == INSIDE


@pytest.mark.parametrize(
    "link_target",
    [
        pytest.param("sub", id="relative"),
        pytest.param("sub/deeper/..", id="relative_with_dotdot"),
        pytest.param("{root}/sub", id="absolute"),
    ],
)
async def test_symlinked_directory_inside_is_followed(
    link_target: str, tree: Path, ws: Workspace
) -> None:
    _link(tree / "d", link_target.format(root=tree))
    assert (await ws.read_text("d/inner.txt")).content == INSIDE.decode()
    await ws.write("d/new.txt", "new\n")
    assert (tree / "sub" / "new.txt").read_bytes() == b"new\n"
    await ws.copy("d/new.txt", "d/copy.txt")
    assert (tree / "sub" / "copy.txt").read_bytes() == b"new\n"
    await ws.move("d/copy.txt", "d/deeper/moved.txt")
    assert (tree / "sub" / "deeper" / "moved.txt").read_bytes() == b"new\n"
    await ws.delete("d/deeper/moved.txt")
    assert not (tree / "sub" / "deeper" / "moved.txt").exists()
    assert (tree / "d").is_symlink()


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("sub/../inside.txt", id="a_dotdot_b"),
        pytest.param("sub/deeper/../../inside.txt", id="a_b_dotdot_dotdot_c"),
        pytest.param("./sub/./../inside.txt", id="dots"),
        pytest.param("sub//deeper/..//../inside.txt", id="double_slashes"),
        pytest.param("{root}/inside.txt", id="absolute_inside"),
        pytest.param("{root}/sub/../inside.txt", id="absolute_inside_with_dotdot"),
        # Out by name and straight back in: resolved as text, nothing outside is touched.
        pytest.param("../{name}/inside.txt", id="dotdot_and_back_in"),
        pytest.param("../{name}-evil/../{name}/inside.txt", id="via_sibling_name_and_back"),
    ],
)
async def test_paths_that_stay_inside_are_allowed(path: str, tree: Path, ws: Workspace) -> None:
    path = path.format(root=tree, name=tree.name)
    read = await ws.read_text(path)
    assert read.content == INSIDE.decode()
    assert read.path == "inside.txt"
    written = await ws.write(path, "changed\n")
    assert written.path == "inside.txt"
    assert (tree / "inside.txt").read_bytes() == b"changed\n"
    copied = await ws.copy(path, "copy.txt")
    assert copied.source == "inside.txt"
    moved = await ws.move(path, "sub/moved.txt")
    assert moved.source == "inside.txt"
    assert (tree / "sub" / "moved.txt").read_bytes() == b"changed\n"
    await ws.move("sub/moved.txt", path)
    deleted = await ws.delete(path)
    assert deleted.path == "inside.txt"
    assert not (tree / "inside.txt").exists()


async def test_absolute_path_inside_gives_relative_results(tree: Path, ws: Workspace) -> None:
    assert (await ws.write(str(tree / "sub" / "new.txt"), "x")).path == "sub/new.txt"
    assert (await ws.read_bytes(tree / "sub" / "new.txt")).path == "sub/new.txt"
    result = await ws.copy(str(tree / "sub" / "new.txt"), str(tree / "sub" / "deeper" / "c.txt"))
    assert (result.source, result.destination) == ("sub/new.txt", "sub/deeper/c.txt")
    assert (await ws.delete(str(tree / "sub" / "deeper" / "c.txt"))).path == "sub/deeper/c.txt"


async def test_root_configured_through_a_symlink(tree: Path, tmp_path: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(tree)
    (tmp_path / "alias-evil").mkdir()
    (tmp_path / "alias-evil" / "secret.txt").write_bytes(SECRET)
    ws = Workspace([alias])
    assert (await ws.read_text(f"{alias}/inside.txt")).content == INSIDE.decode()
    _link(tree / "via-alias.txt", f"{alias}/inside.txt")
    assert (await ws.read_text("via-alias.txt")).content == INSIDE.decode()
    before = snapshot(tmp_path)
    for escape in (f"{alias}/../outside.txt", f"{alias}-evil/secret.txt"):
        with pytest.raises(OutsideRootsError, match=OUTSIDE_MESSAGE):
            await ws.write(escape, "PWNED\n")
        with pytest.raises(OutsideRootsError, match=OUTSIDE_MESSAGE):
            await ws.read_text(escape)
    assert snapshot(tmp_path) == before


@pytest.fixture
def two_roots(tree: Path, tmp_path: Path) -> tuple[Path, Path, Workspace]:
    second = tmp_path / "second"
    (second / "dir").mkdir(parents=True)
    (second / "shared.txt").write_bytes(b"shared\n")
    return tree, second, Workspace([tree, second])


async def test_second_root_by_absolute_path(two_roots: tuple[Path, Path, Workspace]) -> None:
    _, second, ws = two_roots
    assert (await ws.read_text(str(second / "shared.txt"))).content == "shared\n"
    result = await ws.write(str(second / "dir" / "new.txt"), "new\n")
    assert result.path == "dir/new.txt"
    assert (second / "dir" / "new.txt").read_bytes() == b"new\n"
    await ws.copy("inside.txt", str(second / "copied.txt"))
    assert (second / "copied.txt").read_bytes() == INSIDE
    await ws.move(str(second / "copied.txt"), "from-second.txt")
    assert not (second / "copied.txt").exists()
    await ws.delete(str(second / "dir" / "new.txt"))
    assert not (second / "dir" / "new.txt").exists()


@pytest.mark.parametrize(
    "link_target",
    [
        pytest.param("{second}/shared.txt", id="absolute_file_link"),
        pytest.param("../second/shared.txt", id="relative_file_link"),
    ],
)
async def test_symlink_from_first_root_into_second_is_allowed(
    link_target: str, two_roots: tuple[Path, Path, Workspace]
) -> None:
    first, second, ws = two_roots
    link = first / "to-second.txt"
    link.symlink_to(link_target.format(second=second))
    assert (await ws.read_text("to-second.txt")).content == "shared\n"
    await ws.write("to-second.txt", "via link\n")
    assert link.is_symlink()
    assert (second / "shared.txt").read_bytes() == b"via link\n"


@pytest.mark.parametrize(
    "link_target",
    [
        pytest.param("{second}", id="absolute_dir_link"),
        pytest.param("../second", id="relative_dir_link"),
    ],
)
async def test_symlinked_directory_into_second_root_is_allowed(
    link_target: str, two_roots: tuple[Path, Path, Workspace]
) -> None:
    first, second, ws = two_roots
    (first / "r2").symlink_to(link_target.format(second=second))
    assert (await ws.read_text("r2/shared.txt")).content == "shared\n"
    await ws.write("r2/dir/made.txt", "made\n")
    assert (second / "dir" / "made.txt").read_bytes() == b"made\n"
    await ws.delete("r2/dir/made.txt")
    assert not (second / "dir" / "made.txt").exists()


@pytest.mark.parametrize("op", list(OPS))
async def test_dotdot_above_second_root_is_refused(
    op: str, two_roots: tuple[Path, Path, Workspace], tmp_path: Path
) -> None:
    first, second, ws = two_roots
    (first / "r2").symlink_to(second)
    before = snapshot(tmp_path)
    with pytest.raises(OutsideRootsError, match=OUTSIDE_MESSAGE):
        await OPS[op](ws, "r2/../outside.txt")
    assert snapshot(tmp_path) == before


async def test_tilde_expands_to_home_inside_root(
    tree: Path, ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tree / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    result = await ws.write("~/notes.txt", "hi\n")
    assert result.path == "home/notes.txt"
    assert (home / "notes.txt").read_bytes() == b"hi\n"
    assert (await ws.read_text("~/notes.txt")).content == "hi\n"
    await ws.copy("~/notes.txt", "~/copy.txt")
    await ws.move("~/copy.txt", "~/moved.txt")
    assert (home / "moved.txt").read_bytes() == b"hi\n"
    await ws.delete("~/moved.txt")
    assert not (home / "moved.txt").exists()
    assert (await ws.list_directory("~")).path == "home"


async def test_relative_paths_start_at_the_root_not_the_cwd(
    tree: Path, tmp_path: Path, ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # tmp_path/outside.txt exists; root/outside.txt does not
    before = outside_snapshot(tmp_path, tree)
    with pytest.raises(NotFoundError):
        await ws.read_text("outside.txt")
    await ws.write("outside.txt", "inside now\n")
    assert (tree / "outside.txt").read_bytes() == b"inside now\n"
    assert outside_snapshot(tmp_path, tree) == before


# -- loops, dotdot at the root, files used as directories, messages -----------------------------


def _loop_self(root: Path) -> str:
    _link(root / "loop", "loop")
    return "loop"


def _loop_pair(root: Path) -> str:
    _link(root / "a", "b")
    _link(root / "b", "a")
    return "a"


def _loop_growing(root: Path) -> str:
    _link(root / "grow", "grow/x")
    return "grow"


def _loop_absolute(root: Path) -> str:
    _link(root / "sub" / "loop", root / "sub" / "loop")
    return "sub/loop"


def _loop_intermediate(root: Path) -> str:
    _link(root / "loop", "loop")
    return "loop/file.txt"


def _loop_dir_parent(root: Path) -> str:
    _link(root / "sub" / "again", "../sub/again")
    return "sub/again/x.txt"


LOOPS = {
    "self": (_loop_self, False),
    "pair": (_loop_pair, False),
    "growing": (_loop_growing, False),
    "absolute": (_loop_absolute, False),
    "intermediate": (_loop_intermediate, True),
    "intermediate_via_dotdot": (_loop_dir_parent, True),
}
"""id -> (make, is the loop in an intermediate component, so move and delete meet it too)."""

LOOP_CASES = [
    pytest.param(case, op, id=f"{case}-{op}")
    for case, (_, intermediate) in LOOPS.items()
    for op in OPS
    if intermediate or op not in ACTS_ON_LINK
]


@pytest.mark.parametrize(("case", "op"), LOOP_CASES)
async def test_symlink_loop_gives_clear_error(
    case: str, op: str, tree: Path, tmp_path: Path, ws: Workspace
) -> None:
    path = LOOPS[case][0](tree)
    before = snapshot(tmp_path)
    started = time.monotonic()
    with pytest.raises(InvalidPathError, match=r"too many levels of symbolic links") as caught:
        await OPS[op](ws, path)
    assert time.monotonic() - started < 2
    assert path in str(caught.value)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("op", sorted(ACTS_ON_LINK))
async def test_final_loop_link_is_moved_or_deleted_as_a_link(
    op: str, tree: Path, ws: Workspace
) -> None:
    _link(tree / "loop", "loop")
    await OPS[op](ws, "loop")
    if op == "move_dst":
        assert (tree / "loop").read_bytes() == INSIDE
    else:
        assert not os.path.lexists(tree / "loop")


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize(
    "path",
    [
        pytest.param("..", id="dotdot"),
        pytest.param("../", id="dotdot_slash"),
        pytest.param("./..", id="dot_dotdot"),
        pytest.param("sub/../..", id="sub_dotdot_dotdot"),
        pytest.param("{root}/..", id="absolute_root_dotdot"),
    ],
)
async def test_dotdot_at_root_is_outside(
    path: str, op: str, tree: Path, tmp_path: Path, ws: Workspace
) -> None:
    before = snapshot(tmp_path)
    with pytest.raises(OutsideRootsError, match=OUTSIDE_MESSAGE):
        await OPS[op](ws, path.format(root=tree))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize(
    ("path", "shown"),
    [
        pytest.param("file.txt/x", "file.txt", id="relative"),
        pytest.param("file.txt/x/y.txt", "file.txt", id="relative_deeper"),
        pytest.param("{root}/file.txt/x", "file.txt", id="absolute"),
        pytest.param("sub/inner.txt/../inside.txt", "sub/inner.txt", id="dotdot_after_file"),
    ],
)
async def test_regular_file_used_as_directory(
    path: str, shown: str, op: str, tree: Path, tmp_path: Path, ws: Workspace
) -> None:
    before = snapshot(tmp_path)
    with pytest.raises(WrongTypeError, match="not a directory") as caught:
        await OPS[op](ws, path.format(root=tree))
    message = str(caught.value)
    assert shown in message
    assert str(tmp_path) not in message
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("call", "error", "shown"),
    [
        pytest.param(
            lambda ws, r: ws.read_text(f"{r}/sub/missing.txt"),
            NotFoundError,
            "sub/missing.txt",
            id="read_missing_file",
        ),
        pytest.param(
            lambda ws, r: ws.write(f"{r}/sub/nodir/x.txt", "x"),
            NotFoundError,
            "sub/nodir",
            id="write_into_missing_dir",
        ),
        pytest.param(
            lambda ws, r: ws.read_bytes(f"{r}/file.txt/x"),
            WrongTypeError,
            "file.txt",
            id="file_as_directory",
        ),
        pytest.param(
            lambda ws, r: ws.delete(f"{r}/sub"),
            WrongTypeError,
            "sub",
            id="delete_directory",
        ),
        pytest.param(
            lambda ws, r: ws.write(f"{r}/sub", "x"),
            WrongTypeError,
            "sub",
            id="write_over_directory",
        ),
        pytest.param(
            lambda ws, r: ws.copy(f"{r}/inside.txt", f"{r}/sub/inner.txt"),
            AlreadyExistsError,
            "sub/inner.txt",
            id="copy_onto_existing",
        ),
        pytest.param(
            lambda ws, r: ws.move(f"{r}/sub/missing.txt", f"{r}/x.txt"),
            NotFoundError,
            "sub/missing.txt",
            id="move_missing",
        ),
        pytest.param(
            lambda ws, r: ws.read_text(f"{r}/d/missing.txt"),
            NotFoundError,
            "sub/deeper/missing.txt",
            id="through_inside_symlink",
        ),
    ],
)
async def test_error_messages_show_paths_relative_to_the_root(
    call: Callable[[Workspace, Path], Awaitable[object]],
    error: type[AtomicToolsError],
    shown: str,
    tree: Path,
    tmp_path: Path,
    ws: Workspace,
) -> None:
    (tree / "d").symlink_to("sub/deeper")
    with pytest.raises(error) as caught:
        await call(ws, tree)
    message = str(caught.value)
    assert shown in message
    assert str(tmp_path) not in message


# -- a symlink swapped in between the check and the use (deterministic) -------------------------


@dataclass(frozen=True)
class MidOp:
    step: str
    run: Callable[[Workspace], Awaitable[object]]
    expect: dict[str, bytes | None]
    """Afterwards, inside the root: path -> content, ``b"->"`` for a symlink, None for absent."""


def check_inside(root: Path, expect: dict[str, bytes | None]) -> None:
    for name, content in expect.items():
        path = root / name
        if content is None:
            assert not os.path.lexists(path), name
        elif content == b"->":
            assert path.is_symlink(), name
        else:
            assert not path.is_symlink(), name
            assert path.read_bytes() == content, name


DIR_SWAPS = {
    "write": MidOp(
        "write.created", lambda ws: ws.write("d/f.txt", "NEW\n"), {"d.real/f.txt": b"NEW\n"}
    ),
    "copy_src": MidOp(
        "write.created", lambda ws: ws.copy("d/f.txt", "copied.txt"), {"copied.txt": IN_D}
    ),
    "copy_dst": MidOp(
        "write.created",
        lambda ws: ws.copy("inside.txt", "d/f.txt", overwrite=True),
        {"d.real/f.txt": INSIDE},
    ),
    "move_src": MidOp(
        "move.before",
        lambda ws: ws.move("d/f.txt", "moved.txt"),
        {"d.real/f.txt": None, "moved.txt": IN_D},
    ),
    "move_dst": MidOp(
        "move.before",
        lambda ws: ws.move("inside.txt", "d/f.txt", overwrite=True),
        {"d.real/f.txt": INSIDE, "inside.txt": None},
    ),
    "delete": MidOp("delete.before", lambda ws: ws.delete("d/f.txt"), {"d.real/f.txt": None}),
}


@pytest.mark.parametrize("op", list(DIR_SWAPS))
async def test_directory_swapped_for_outside_link_mid_operation(
    op: str, tree: Path, tmp_path: Path, ws: Workspace
) -> None:
    """After resolution, ``d`` is renamed away and replaced by a link to an outside directory.

    The operation must finish in the directory it resolved (pinned by its descriptor), never in
    the outside one that now has the same name.
    """
    case = DIR_SWAPS[op]
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "f.txt").write_bytes(SECRET)
    (tree / "d").mkdir()
    (tree / "d" / "f.txt").write_bytes(IN_D)
    before = outside_snapshot(tmp_path, tree)
    swapped: list[str] = []

    def swap(name: str) -> None:
        if name == case.step and not swapped:
            os.rename(tree / "d", tree / "d.real")
            os.symlink(evil, tree / "d")
            swapped.append(name)

    with observe_steps(swap):
        await case.run(ws)
    assert swapped == [case.step]
    assert outside_snapshot(tmp_path, tree) == before
    assert (evil / "f.txt").read_bytes() == SECRET
    check_inside(tree, case.expect)


FINAL_SWAPS = {
    "write": MidOp("write.created", lambda ws: ws.write("f.txt", "NEW\n"), {"f.txt": b"NEW\n"}),
    "copy_dst": MidOp(
        "write.created",
        lambda ws: ws.copy("inside.txt", "f.txt", overwrite=True),
        {"f.txt": INSIDE},
    ),
    "move_src": MidOp(
        "move.before", lambda ws: ws.move("f.txt", "moved.txt"), {"f.txt": None, "moved.txt": b"->"}
    ),
    "move_dst": MidOp(
        "move.before",
        lambda ws: ws.move("inside.txt", "f.txt", overwrite=True),
        {"f.txt": INSIDE, "inside.txt": None},
    ),
    "delete": MidOp("delete.before", lambda ws: ws.delete("f.txt"), {"f.txt": None}),
}


@pytest.mark.parametrize("op", list(FINAL_SWAPS))
async def test_final_component_swapped_for_outside_link_mid_operation(
    op: str, tree: Path, tmp_path: Path, ws: Workspace
) -> None:
    """After resolution the file itself becomes a link to an outside file: it is never followed."""
    case = FINAL_SWAPS[op]
    (tree / "f.txt").write_bytes(b"f\n")
    before = outside_snapshot(tmp_path, tree)
    swapped: list[str] = []

    def swap(name: str) -> None:
        if name == case.step and not swapped:
            os.symlink(tmp_path / "outside.txt", tree / "f.link")
            os.replace(tree / "f.link", tree / "f.txt")
            swapped.append(name)

    with observe_steps(swap):
        await case.run(ws)
    assert swapped == [case.step]
    assert outside_snapshot(tmp_path, tree) == before
    assert (tmp_path / "outside.txt").read_bytes() == SECRET
    check_inside(tree, case.expect)


async def _read_text(ws: Workspace, location: Location) -> bytes:
    return (await files.read_text(location, ws.limits)).content.encode()


async def _read_bytes(ws: Workspace, location: Location) -> bytes:
    return (await files.read_bytes(location, ws.limits)).data


async def _copy_out(ws: Workspace, location: Location) -> bytes:
    with ws.sandbox.resolve("copy.txt") as destination:
        await fileops.copy(
            location, destination, overwrite=False, durability=ws.durability, limits=ws.limits
        )
    return (ws.roots[0] / "copy.txt").read_bytes()


READERS = {"read_text": _read_text, "read_bytes": _read_bytes, "copy_src": _copy_out}
"""Operations that read a resolved Location, called directly so a swap fits between the two."""


@pytest.mark.parametrize("reader", list(READERS))
async def test_read_after_directory_swap_reads_the_resolved_directory(
    reader: str, tree: Path, tmp_path: Path, ws: Workspace
) -> None:
    """``d`` becomes a link to an outside directory after resolution: the read stays inside."""
    (tree / "d").mkdir()
    (tree / "d" / "f.txt").write_bytes(INSIDE)
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "f.txt").write_bytes(SECRET)
    before = outside_snapshot(tmp_path, tree)
    with ws.sandbox.resolve("d/f.txt") as location:
        os.rename(tree / "d", tree / "d.real")
        os.symlink(evil, tree / "d")
        data = await READERS[reader](ws, location)
    assert data == INSIDE
    assert outside_snapshot(tmp_path, tree) == before


@pytest.mark.parametrize("reader", list(READERS))
async def test_read_after_final_swap_is_refused(
    reader: str, tree: Path, tmp_path: Path, ws: Workspace
) -> None:
    """The file becomes a link to an outside file after resolution: opening it is refused."""
    (tree / "f.txt").write_bytes(INSIDE)
    before = outside_snapshot(tmp_path, tree)
    with ws.sandbox.resolve("f.txt") as location:
        os.symlink(tmp_path / "outside.txt", tree / "f.link")
        os.replace(tree / "f.link", tree / "f.txt")
        with pytest.raises(ConcurrentChangeError, match="symbolic link"):
            await READERS[reader](ws, location)
    assert not (tree / "copy.txt").exists()
    assert outside_snapshot(tmp_path, tree) == before


# -- the race: a background thread swapping a directory while calls go through it ----------------


def exchange(a: Path, b: Path) -> None:
    """Atomically swap two names (``renameat2(RENAME_EXCHANGE)``): a dir and a link, say."""
    renameat2(AT_FDCWD, str(a), AT_FDCWD, str(b), RENAME_EXCHANGE)


class Swapper(threading.Thread):
    """Calls ``flip(n)`` in a tight loop until stopped; remembers an error instead of dying."""

    def __init__(self, flip: Callable[[int], None]) -> None:
        super().__init__(daemon=True)
        self.flip = flip
        self.flips = 0
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                self.flip(self.flips)
                self.flips += 1
        except BaseException as err:
            self.error = err


RACE_MIN_CALLS = 400
RACE_MIN_SECONDS = 0.5
RACE_MAX_SECONDS = 3.0
RACE_PAUSE = 1e-4
IN_F = b"IN f.txt\n"
IN_SRC = b"IN src\n"


@dataclass
class RaceLog:
    reads: list[bytes] = field(default_factory=list)
    calls: int = 0
    ok: int = 0
    refused: int = 0
    other_errors: dict[str, int] = field(default_factory=dict)

    async def attempt(self, call: Awaitable[object]) -> object | None:
        """Run one call; a toolkit error is an acceptable refusal, anything else fails."""
        self.calls += 1
        try:
            result = await call
        except OutsideRootsError:
            self.refused += 1
            return None
        except AtomicToolsError as err:
            kind = type(err).__name__
            self.other_errors[kind] = self.other_errors.get(kind, 0) + 1
            return None
        self.ok += 1
        return result

    async def read(self, ws: Workspace, path: str) -> None:
        """read_text and read_bytes of ``path``, keeping whatever content they returned."""
        text = await self.attempt(ws.read_text(path))
        if isinstance(text, TextRead):
            self.reads.append(text.content.encode())
        data = await self.attempt(ws.read_bytes(path))
        if isinstance(data, BytesRead):
            self.reads.append(data.data)

    @property
    def failed(self) -> int:
        return self.refused + sum(self.other_errors.values())

    def done(self, started: float) -> bool:
        """Enough calls, enough time, and both outcomes seen (or out of time: the test fails)."""
        elapsed = time.monotonic() - started
        enough = self.calls >= RACE_MIN_CALLS and elapsed >= RACE_MIN_SECONDS
        both = self.ok > 0 and self.refused > 0 and bool(self.reads)
        return (enough and both) or elapsed >= RACE_MAX_SECONDS


def _prepare_race_dir(directory: Path, content: bytes) -> None:
    """The same names inside and outside: any call that escaped would touch the outside one."""
    directory.mkdir()
    for name in ("f.txt", "w.txt", "n.txt", "d.txt", "m.txt"):
        (directory / name).write_bytes(content)


class Racing:
    """Runs the swapper thread (with a short GIL switch interval) for the body of a with block."""

    def __init__(self, flip: Callable[[int], None]) -> None:
        self.swapper = Swapper(flip)

    def __enter__(self) -> Swapper:
        self.old_interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)
        self.swapper.start()
        return self.swapper

    def __exit__(self, *exc_info: object) -> None:
        self.swapper.halt.set()
        self.swapper.join(timeout=10)
        sys.setswitchinterval(self.old_interval)


@pytest.mark.parametrize("mode", ["symlink_flip", "dir_exchange"])
async def test_race_swapping_directory_and_outside_link(
    mode: str, root: Path, tmp_path: Path
) -> None:
    """A thread keeps swapping ``swap`` between inside and outside while calls go through it.

    ``symlink_flip``: ``swap`` is a symlink atomically replaced (``os.replace``) by one pointing
    to the inside directory, to the outside one by absolute path, or by ``../evil``.
    ``dir_exchange``: ``swap`` is the real directory, atomically exchanged with a symlink to the
    outside directory (``renameat2(RENAME_EXCHANGE)``), so at any instant it is one or the other.
    Every call goes through ``swap/``: reads, write, copy both ways, delete, move both ways.
    """
    evil = tmp_path / "evil"
    _prepare_race_dir(evil, SECRET)
    _prepare_race_dir(root / ("inner" if mode == "symlink_flip" else "swap"), IN_F)
    (root / "src.txt").write_bytes(IN_SRC)
    (root / "copies").mkdir()
    (root / "moved").mkdir()

    if mode == "symlink_flip":
        targets = ["inner", str(evil), "../evil"]
        (root / "swap").symlink_to("inner")

        def flip(n: int) -> None:
            os.symlink(targets[n % len(targets)], root / "swap.next")
            os.replace(root / "swap.next", root / "swap")

    else:
        (root / "swap.evil").symlink_to(evil)
        try:
            exchange(root / "swap", root / "swap.evil")
            exchange(root / "swap", root / "swap.evil")
        except OSError as err:
            pytest.skip(f"RENAME_EXCHANGE is not supported here: {err}")

        def flip(n: int) -> None:
            exchange(root / "swap", root / "swap.evil")

    before = outside_snapshot(tmp_path, root)
    ws = Workspace([root], durability="fast")
    log = RaceLog()
    started = time.monotonic()
    with Racing(flip) as swapper:
        while not log.done(started):
            await log.read(ws, "swap/f.txt")
            await log.attempt(ws.write("swap/w.txt", IN_F))
            if await log.attempt(ws.copy("swap/f.txt", "copies/c.txt", overwrite=True)):
                assert (root / "copies" / "c.txt").read_bytes() == IN_F
            await log.attempt(ws.copy("src.txt", "swap/n.txt", overwrite=True))
            await log.attempt(ws.write("swap/d.txt", IN_F))
            await log.attempt(ws.delete("swap/d.txt"))
            if await log.attempt(ws.move("swap/m.txt", "moved/m.txt")):
                assert (root / "moved" / "m.txt").read_bytes() == IN_F
            await log.attempt(ws.move("moved/m.txt", "swap/m.txt"))
            await anyio.sleep(RACE_PAUSE)  # the calls run inline: let a starved swapper run
    elapsed = time.monotonic() - started

    assert swapper.error is None
    assert not swapper.is_alive()
    # Not one call saw outside content, and nothing outside changed, appeared or vanished.
    assert outside_snapshot(tmp_path, root) == before
    assert log.reads
    assert all(content == IN_F for content in log.reads), set(log.reads)
    # The race really happened: calls both went through inside and were refused outside.
    summary = (swapper.flips, log.calls, log.ok, log.refused, log.other_errors)
    assert swapper.flips >= 2, summary
    assert log.calls >= RACE_MIN_CALLS, summary
    assert log.ok > 0, summary
    assert log.refused > 0, summary
    assert elapsed < RACE_MAX_SECONDS + 1


async def test_race_swapping_final_file_and_outside_link(root: Path, tmp_path: Path) -> None:
    """The last component flips between a real file and a link to an outside file."""
    (root / "final.txt").write_bytes(IN_F)
    (root / "final.evil").symlink_to(tmp_path / "outside.txt")
    (root / "copies").mkdir()
    try:
        exchange(root / "final.txt", root / "final.evil")
        exchange(root / "final.txt", root / "final.evil")
    except OSError as err:
        pytest.skip(f"RENAME_EXCHANGE is not supported here: {err}")
    before = outside_snapshot(tmp_path, root)
    ws = Workspace([root], durability="fast")
    log = RaceLog()
    started = time.monotonic()
    with Racing(lambda n: exchange(root / "final.txt", root / "final.evil")) as swapper:
        while not log.done(started):
            await log.read(ws, "final.txt")
            if await log.attempt(ws.copy("final.txt", "copies/c.txt", overwrite=True)):
                assert (root / "copies" / "c.txt").read_bytes() == IN_F
            await anyio.sleep(RACE_PAUSE)

    assert swapper.error is None
    assert outside_snapshot(tmp_path, root) == before
    assert log.reads
    assert all(content == IN_F for content in log.reads), set(log.reads)
    summary = (swapper.flips, log.calls, log.ok, log.refused, log.other_errors)
    assert swapper.flips >= 2, summary
    assert log.calls >= RACE_MIN_CALLS, summary
    assert log.ok > 0, summary
    assert log.failed > 0, summary


# -- the same race for the database tools (issue 11, defect 10) ------------------------------------


def _make_db(path: Path, value: str) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (v TEXT)")
    conn.execute("INSERT INTO t VALUES (?)", (value,))
    conn.commit()
    conn.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the database tools need asyncio
async def test_race_swapping_the_directory_of_a_database(
    root: Path, tmp_path: Path, anyio_backend: str
) -> None:
    """``swap`` (holding app.db) is exchanged with a symlink to an outside directory holding an
    app.db of its own, while databases are opened through ``swap/``, queried and written.

    SQLite opens files by path; it gets ``/proc/self/fd/N/app.db`` and every connection is
    checked against the pinned directory before use (see ``engine.db.pinned``). No query may
    return the outside row and no write may reach the outside database. (What this cannot
    stop, and the test prints: SQLite may create an empty ``-wal``/``-shm`` next to the outside
    file in the microseconds between its own path resolution and its open.)
    """
    evil = tmp_path / "evil"
    evil.mkdir()
    _make_db(evil / "app.db", "OUTSIDE")
    (root / "swap").mkdir()
    _make_db(root / "swap" / "app.db", "IN")
    (root / "swap.evil").symlink_to(evil)
    try:
        exchange(root / "swap", root / "swap.evil")
        exchange(root / "swap", root / "swap.evil")
    except OSError as err:
        pytest.skip(f"RENAME_EXCHANGE is not supported here: {err}")
    outside_db = (evil / "app.db").read_bytes()
    ws = Workspace([root], durability="fast")
    seen: list[str] = []
    outcomes: dict[str, int] = {}
    started = time.monotonic()
    with Racing(lambda n: exchange(root / "swap", root / "swap.evil")) as swapper:
        while len(seen) + sum(outcomes.values()) < 300 or not (seen and outcomes):
            if time.monotonic() - started > 20:
                break
            catalog = DatabaseCatalog(ws, durability="fast")
            try:
                db = await catalog.get("swap/app.db")
                result = await db.query("SELECT v FROM t ORDER BY rowid LIMIT 1")
                seen.extend(str(row[0]) for row in result.rows)
                await db.execute("INSERT INTO t VALUES ('written')")
            except AtomicToolsError as err:
                kind = type(err).__name__
                outcomes[kind] = outcomes.get(kind, 0) + 1
            finally:
                await catalog.close()
            await anyio.sleep(RACE_PAUSE)

    assert swapper.error is None
    summary = (swapper.flips, len(seen), outcomes)
    assert swapper.flips >= 2, summary
    assert seen, summary
    assert set(seen) == {"IN"}, summary
    assert outcomes, summary  # the race really happened: some calls were refused
    assert (evil / "app.db").read_bytes() == outside_db, summary
    assert not (evil / "app.db-wal").exists() or (evil / "app.db-wal").stat().st_size == 0
    print(f"race: {summary}; created next to the outside database: {sorted(os.listdir(evil))}")
    conn = sqlite3.connect(f"file:{evil / 'app.db'}?mode=ro", uri=True)
    assert conn.execute("SELECT v FROM t").fetchall() == [("OUTSIDE",)], summary
    conn.close()
