"""Move, copy, delete and mkdir on real files, then the read-only views of the tree."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from atomictools import (
    AlreadyExistsError,
    InvalidArgumentError,
    Limits,
    NotFoundError,
    PreconditionFailedError,
    TooLargeError,
    Workspace,
    WrongTypeError,
)
from atomictools.engine.durable.tempfiles import temp_name_for

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("no_temps_left")]


async def test_move_refuses_to_clobber_unless_asked(ws: Workspace, root: Path) -> None:
    (root / "a.txt").write_text("a")
    (root / "b.txt").write_text("b")
    with pytest.raises(AlreadyExistsError, match="overwrite"):
        await ws.move("a.txt", "b.txt")
    assert (root / "a.txt").read_text() == "a"
    assert (root / "b.txt").read_text() == "b"
    result = await ws.move("a.txt", "b.txt", overwrite=True)
    assert result.replaced
    assert not (root / "a.txt").exists()
    assert (root / "b.txt").read_text() == "a"


async def test_move_directory_and_symlink_itself(ws: Workspace, root: Path) -> None:
    (root / "d").mkdir()
    (root / "d" / "f.txt").write_text("x")
    (root / "target.txt").write_text("t")
    (root / "link").symlink_to("target.txt")
    await ws.move("d", "e")
    assert (root / "e" / "f.txt").read_text() == "x"
    await ws.move("link", "e/link")
    assert (root / "e" / "link").is_symlink()
    assert (root / "target.txt").read_text() == "t"
    with pytest.raises(InvalidArgumentError, match="into itself"):
        await ws.move("e", "e/inner")
    with pytest.raises(NotFoundError):
        await ws.move("missing", "elsewhere")
    with pytest.raises(InvalidArgumentError, match="root"):
        await ws.move(".", "elsewhere")


async def test_copy_streams_and_keeps_source_mode(root: Path) -> None:
    ws = Workspace([root], limits=Limits(chunk_bytes=1000))
    data = os.urandom(10_500)
    (root / "src.bin").write_bytes(data)
    (root / "src.bin").chmod(0o600)
    result = await ws.copy("src.bin", "dst.bin")
    assert (root / "dst.bin").read_bytes() == data
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert not result.replaced
    assert stat.S_IMODE((root / "dst.bin").stat().st_mode) == 0o600


async def test_copy_overwrite_rules(ws: Workspace, root: Path) -> None:
    (root / "a.txt").write_text("a")
    (root / "b.txt").write_text("b")
    (root / "b.txt").chmod(0o640)
    with pytest.raises(AlreadyExistsError, match="overwrite"):
        await ws.copy("a.txt", "b.txt")
    assert (root / "b.txt").read_text() == "b"
    await ws.copy("a.txt", "b.txt", overwrite=True)
    assert (root / "b.txt").read_text() == "a"
    assert stat.S_IMODE((root / "b.txt").stat().st_mode) == 0o640  # replaced file keeps its mode
    with pytest.raises(InvalidArgumentError, match="onto itself"):
        await ws.copy("a.txt", "a.txt", overwrite=True)
    (root / "d").mkdir()
    with pytest.raises(WrongTypeError, match="directory"):
        await ws.copy("d", "d2")


async def test_delete_files_and_links_not_directories(ws: Workspace, root: Path) -> None:
    (root / "f.txt").write_text("v1")
    (root / "real.txt").write_text("keep")
    (root / "link").symlink_to("real.txt")
    (root / "d").mkdir()
    with pytest.raises(PreconditionFailedError):
        await ws.delete("f.txt", expected_sha256=hashlib.sha256(b"other").hexdigest())
    assert (root / "f.txt").exists()
    await ws.delete("f.txt", expected_sha256=hashlib.sha256(b"v1").hexdigest())
    assert not (root / "f.txt").exists()
    assert (await ws.delete("link")).type == "symlink"
    assert not (root / "link").is_symlink()
    assert (root / "real.txt").read_text() == "keep"
    with pytest.raises(WrongTypeError, match="directory"):
        await ws.delete("d")
    with pytest.raises(NotFoundError):
        await ws.delete("f.txt")
    with pytest.raises(InvalidArgumentError, match="root"):
        await ws.delete(".")


async def test_mkdir_parents_and_existing(ws: Workspace, root: Path) -> None:
    assert (await ws.mkdir("a/b/c")).created
    assert (root / "a" / "b" / "c").is_dir()
    assert not (await ws.mkdir("a/b")).created
    (root / "file").write_text("x")
    with pytest.raises(WrongTypeError):
        await ws.mkdir("file")
    with pytest.raises(WrongTypeError):
        await ws.mkdir("file/sub")


async def test_missing_parent_directory_is_a_clear_error(ws: Workspace, root: Path) -> None:
    with pytest.raises(NotFoundError, match="nope does not exist"):
        await ws.write("nope/f.txt", "x")
    assert list(root.iterdir()) == []


# -- views -------------------------------------------------------------------------------------


@pytest.fixture
def tree(root: Path) -> Iterator[Path]:
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "pkg" / "mod.py").write_text("x = 1\n")
    (root / "src" / "main.py").write_text("print()\n")
    (root / "src" / "ui.tsx").write_text("")
    (root / "node_modules" / "dep").mkdir(parents=True)
    (root / "node_modules" / "dep" / "index.js").write_text("")
    (root / "README.md").write_text("hi")
    (root / "link").symlink_to("src")
    fake_temp = root / temp_name_for("README.md")
    fake_temp.write_text("in-flight temp")  # must stay hidden from every view
    yield root
    fake_temp.unlink()


async def test_list_directory(ws: Workspace, tree: Path) -> None:
    listing = await ws.list_directory(".")
    assert [(e.name, e.type) for e in listing.entries] == [
        ("README.md", "file"),
        ("link", "symlink"),
        ("node_modules", "directory"),
        ("src", "directory"),
    ]
    assert listing.entries[0].size == 2
    assert not listing.truncated
    with pytest.raises(WrongTypeError):
        await ws.list_directory("README.md")
    # Without sizes: the same names and types (from the directory entries, no stat), and
    # still none of our temp files; an entry of another kind is "other".
    os.mkfifo(tree / "pipe")
    quick = await ws.list_directory(".", sizes=False)
    assert [(e.name, e.type, e.size) for e in quick.entries] == [
        ("README.md", "file", None),
        ("link", "symlink", None),
        ("node_modules", "directory", None),
        ("pipe", "other", None),
        ("src", "directory", None),
    ]
    assert (await ws.list_directory(".")).entries[3].type == "other"


async def test_tree_excludes_and_does_not_follow_links(ws: Workspace, tree: Path) -> None:
    node = await ws.tree(".", exclude=["node_modules"])
    names = {child.name: child for child in node.children or ()}
    assert set(names) == {"README.md", "link", "src"}
    assert names["link"].type == "symlink"
    assert names["link"].children is None
    src = {c.name: c for c in names["src"].children or ()}
    assert set(src) == {"main.py", "pkg", "ui.tsx"}
    assert [c.name for c in src["pkg"].children or ()] == ["mod.py"]
    shallow = await ws.tree(".", max_depth=1)
    shallow_src = next(c for c in shallow.children or () if c.name == "src")
    assert shallow_src.depth_limited
    assert shallow_src.children is None


async def test_tree_entry_limit_is_a_clear_error(root: Path) -> None:
    for index in range(30):
        (root / f"f{index}").write_text("")
    ws = Workspace([root], limits=Limits(max_tree_entries=20))
    with pytest.raises(TooLargeError, match="more than 20 entries"):
        await ws.tree(".")


async def test_search_globs(ws: Workspace, tree: Path) -> None:
    assert (await ws.search(".", "*.py")).matches == ("src/main.py", "src/pkg/mod.py")
    assert (await ws.search("src", "pkg/*.py")).matches == ("src/pkg/mod.py",)
    assert (await ws.search(".", "**/*.{ts,tsx}")).matches == ("src/ui.tsx",)
    assert (await ws.search(".", "*.js", exclude=["node_modules"])).matches == ()
    assert (await ws.search(".", "*.js")).matches == ("node_modules/dep/index.js",)
    assert (await ws.search(".", "*.atomictmp")).matches == ()
    small = Workspace([tree], limits=Limits(max_search_results=1))
    limited = await small.search(".", "*")
    assert limited.truncated
    assert len(limited.matches) == 1


async def test_info(ws: Workspace, root: Path) -> None:
    (root / "f.txt").write_text("12345")
    (root / "f.txt").chmod(0o640)
    info = await ws.info("f.txt")
    assert (info.path, info.type, info.size, info.permissions) == ("f.txt", "file", 5, "640")
    assert info.modified.endswith("+00:00")
    assert (await ws.info(".")).type == "directory"
