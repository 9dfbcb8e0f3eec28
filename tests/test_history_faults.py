"""The history store failing for real: damaged, full, on another file system.

A change is recorded before its commit point, so a store that cannot take the entry refuses
the change (nothing changed, the message names the store and the fix) instead of making a
change that could not be taken back.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from atomictools import Change, StateDirError, Workspace
from tests.conftest import mounted_tmpfs, temp_files

pytestmark = pytest.mark.anyio


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a state directory that fills up, on a file system of its own."""
    with mounted_tmpfs(tmp_path, "4m") as mount_point:
        yield mount_point


async def test_a_damaged_store_refuses_changes_and_says_how_to_fix_it(
    root: Path, private_state_dir: Path
) -> None:
    (private_state_dir / "history").mkdir()
    (private_state_dir / "history" / "history.sqlite3").write_bytes(b"not a database " * 100)
    (root / "a.txt").write_text("orig\n")
    ws = Workspace([root])
    for attempt in (
        lambda: ws.write("a.txt", "new\n"),
        lambda: ws.apply_changes([Change("write", "a.txt", content=b"new\n")]),
        lambda: ws.delete("a.txt"),
    ):
        with pytest.raises(StateDirError) as caught:
            await attempt()
        message = str(caught.value)
        assert "history.sqlite3" in message
        assert "damaged" in message
        assert "--no-history" in message
        assert message.endswith("nothing was changed")
    assert (root / "a.txt").read_text() == "orig\n"
    assert sorted(p.name for p in root.iterdir()) == ["a.txt"]  # no temp, backup or claim
    off = Workspace([root], history=False)  # the way out the message names
    await off.write("a.txt", "new\n")
    assert (root / "a.txt").read_text() == "new\n"


async def test_a_full_state_directory_refuses_the_change(tmpfs: Path, root: Path) -> None:
    state = tmpfs / "state"
    ws = Workspace([root], state_dir=state)
    await ws.write("a.txt", "first\n")  # the store exists
    filler = tmpfs / "filler"
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(os.urandom(65536))
                out.flush()
        except OSError:
            pass
    old = os.urandom(40_000)  # kept inline: it must fit in the full store
    (root / "b.bin").write_bytes(old)
    with pytest.raises(StateDirError) as caught:
        await ws.write("b.bin", b"new")
    assert "full" in str(caught.value)
    assert str(caught.value).endswith("nothing was changed")
    assert (root / "b.bin").read_bytes() == old
    assert temp_files(root) == []
    filler.unlink()
    await ws.write("b.bin", b"new")
    await ws.undo(last=1)
    assert (root / "b.bin").read_bytes() == old


async def test_a_state_directory_on_another_file_system_keeps_copies(
    tmpfs: Path, root: Path
) -> None:
    ws = Workspace([root], state_dir=tmpfs / "state")
    big = os.urandom(300_000)  # larger than what is kept inline: linked, or here copied
    await ws.write("big.bin", big)
    await ws.write("big.bin", b"small")
    kept = tmpfs / "state" / "history" / "blobs" / sha(big)
    assert kept.read_bytes() == big
    assert kept.stat().st_dev != (root / "big.bin").stat().st_dev
    await ws.undo(last=1)
    assert (root / "big.bin").read_bytes() == big


async def test_a_store_of_another_version_is_refused_by_name(
    root: Path, private_state_dir: Path
) -> None:
    (private_state_dir / "history").mkdir()
    with sqlite3.connect(private_state_dir / "history" / "history.sqlite3") as conn:
        conn.execute("CREATE TABLE changes (seq INTEGER PRIMARY KEY, pid INTEGER)")
    (root / "a.txt").write_text("orig\n")
    with pytest.raises(StateDirError, match="another version of atomictools") as caught:
        await Workspace([root]).write("a.txt", "new\n")
    assert str(caught.value).endswith("nothing was changed")
    assert (root / "a.txt").read_text() == "orig\n"
