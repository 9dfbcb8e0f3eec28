"""The history store failing for real: damaged, full, on another file system.

A change is recorded before its commit point, so a store that cannot take the entry refuses
the change (nothing changed, the message names the store and the fix) instead of making a
change that could not be taken back.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
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


async def test_a_store_whose_making_was_cut_short_is_finished_not_refused(
    root: Path, private_state_dir: Path
) -> None:
    """Our own tables without the version (a store made one statement at a time, by an earlier
    release, cut short by a power loss) are ours: the store is finished and used."""
    from atomictools.engine.history.store import _SCHEMA

    (private_state_dir / "history").mkdir()
    with sqlite3.connect(private_state_dir / "history" / "history.sqlite3") as conn:
        conn.executescript(_SCHEMA.split("CREATE INDEX")[0])  # changes, paths: no version
    (root / "a.txt").write_text("orig\n")
    await Workspace([root]).write("a.txt", "new\n")
    with sqlite3.connect(private_state_dir / "history" / "history.sqlite3") as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (1,)
    assert [e.op for e in await Workspace([root]).history_entries()] == ["write"]


NOBODY = 65534
_AS_NOBODY = """
import json, os, sys
import anyio
from atomictools import AtomicToolsError, Workspace
os.setgroups([]); os.setgid(65534); os.setuid(65534)
root, state, history = sys.argv[1], sys.argv[2], sys.argv[3] == "on"
try:
    anyio.run(Workspace([root], state_dir=state, history=history).write, "locked.txt", "new\\n")
except AtomicToolsError as err:
    print(json.dumps({"ok": False, "type": type(err).__name__, "message": str(err)}))
else:
    print(json.dumps({"ok": True}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged user")
def test_a_file_that_may_be_replaced_but_not_read_is_refused_not_lost() -> None:
    """Renaming over a file needs only its directory's permission; keeping it for the history
    needs reading it. An unreadable file is refused (nothing changed), not replaced unkept."""
    base = Path(tempfile.mkdtemp(prefix="atomictools-nobody-"))
    try:
        base.chmod(0o755)
        root, state = base / "root", base / "state"
        for directory in (root, state):
            directory.mkdir()
            os.chown(directory, NOBODY, NOBODY)
        locked = root / "locked.txt"
        locked.write_text("old\n")
        os.chown(locked, NOBODY, NOBODY)
        locked.chmod(0)

        def run(history: str) -> dict[str, object]:
            done = subprocess.run(
                [sys.executable, "-c", _AS_NOBODY, str(root), str(state), history],
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            )
            return dict(json.loads(done.stdout.splitlines()[-1]))

        refused = run("on")
        assert refused["ok"] is False, refused
        assert refused["type"] == "PermissionDeniedError"
        message = str(refused["message"])
        assert "keep the previous version (for the history) of locked.txt" in message
        assert message.endswith("nothing was changed")
        assert locked.read_text() == "old\n"  # read as root
        assert sorted(p.name for p in root.iterdir()) == ["locked.txt"]
        assert run("off") == {"ok": True}  # without history, replacing it is allowed
        assert locked.read_text() == "new\n"
    finally:
        shutil.rmtree(base, ignore_errors=True)
