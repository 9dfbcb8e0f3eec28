"""``expected_sha256`` on move and copy guards the source: a stale hash changes nothing, the
current one lets the change through; single calls and change sets alike."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from atomictools import Change, InvalidArgumentError, PreconditionFailedError, Workspace
from tests.conftest import temp_files

pytestmark = pytest.mark.anyio

OLD = b"the version the caller read\n"
NEW = b"changed by someone else since\n"


def files(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    top = tmp_path / "root"
    top.mkdir()
    (top / "src.txt").write_bytes(NEW)  # changed since the caller read OLD
    (top / "dir").mkdir()
    return top


@pytest.mark.parametrize("op", ["move", "copy"])
async def test_a_stale_source_hash_changes_nothing(root: Path, op: str) -> None:
    ws = Workspace([root])
    before = files(root)
    with pytest.raises(PreconditionFailedError) as single:
        await getattr(ws, op)("src.txt", "dst.txt", expected_sha256=sha(OLD))
    assert sha(NEW) in str(single.value)
    with pytest.raises(PreconditionFailedError):
        await ws.apply_changes(
            [Change(op, "dst.txt", source="src.txt", expected_sha256=sha(OLD))]  # type: ignore[arg-type]
        )
    assert files(root) == before  # (a single copy's refused temp did touch the directory)
    assert temp_files(root) == []


@pytest.mark.parametrize("op", ["move", "copy"])
@pytest.mark.parametrize("how", ["single", "change set"])
async def test_the_current_source_hash_lets_it_through(root: Path, op: str, how: str) -> None:
    ws = Workspace([root])
    if how == "single":
        await getattr(ws, op)("src.txt", "dst.txt", expected_sha256=sha(NEW).upper())
    else:
        change = Change(op, "dst.txt", source="src.txt", expected_sha256=sha(NEW))  # type: ignore[arg-type]
        await ws.apply_changes([change])
    assert (root / "dst.txt").read_bytes() == NEW
    assert (root / "src.txt").exists() == (op == "copy")


async def test_a_hash_for_a_directory_is_refused(root: Path) -> None:
    ws = Workspace([root])
    with pytest.raises(InvalidArgumentError, match="not a regular file"):
        await ws.move("dir", "dir2", expected_sha256=sha(b""))
    with pytest.raises(InvalidArgumentError, match="not a regular file"):
        await ws.apply_changes([Change("move", "dir2", source="dir", expected_sha256=sha(b""))])
    assert (root / "dir").is_dir()
    assert not (root / "dir2").exists()
