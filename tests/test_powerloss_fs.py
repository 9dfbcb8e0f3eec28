"""The power-loss file system itself: it forgets exactly what was not made durable.

Each case writes through the mount with plain system calls, cuts the power, and reads the disk.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.powerloss import PowerLossMount, unavailable

REASON = unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[PowerLossMount]:
    fs = PowerLossMount(tmp_path)
    (fs.disk / "old.txt").write_bytes(b"old\n")
    (fs.disk / "dir").mkdir()
    fs.mount()
    try:
        yield fs
    finally:
        fs.unmount()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(path: Path, data: bytes, *, sync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def disk(fs: PowerLossMount) -> dict[str, bytes | str]:
    found: dict[str, bytes | str] = {}
    for path in sorted(fs.disk.rglob("*")):
        key = str(path.relative_to(fs.disk))
        found[key] = "<dir>" if path.is_dir() else path.read_bytes()
    return found


CASES: dict[str, tuple[Callable[[Path], None], dict[str, bytes | str]]] = {
    "unsynced overwrite is lost": (
        lambda m: write(m / "old.txt", b"new\n", sync=False),
        {"old.txt": b"old\n"},
    ),
    "synced overwrite is kept": (
        lambda m: write(m / "old.txt", b"new\n", sync=True),
        {"old.txt": b"new\n"},
    ),
    "new synced file without a directory fsync is lost": (
        lambda m: write(m / "new.txt", b"n", sync=True),
        {"old.txt": b"old\n"},
    ),
    "new file with the directory fsynced but not the file comes back empty": (
        lambda m: (write(m / "new.txt", b"n", sync=False), fsync_path(m)),
        {"old.txt": b"old\n", "new.txt": b""},
    ),
    "new file, file and directory fsynced, is kept": (
        lambda m: (write(m / "new.txt", b"n", sync=True), fsync_path(m)),
        {"old.txt": b"old\n", "new.txt": b"n"},
    ),
    "rename without a directory fsync is lost": (
        lambda m: (
            write(m / ".tmp", b"replaced\n", sync=True),
            os.replace(m / ".tmp", m / "old.txt"),
        ),
        {"old.txt": b"old\n"},
    ),
    "rename with a directory fsync is kept": (
        lambda m: (
            write(m / ".tmp", b"replaced\n", sync=True),
            os.replace(m / ".tmp", m / "old.txt"),
            fsync_path(m),
        ),
        {"old.txt": b"replaced\n"},
    ),
    "unlink without a directory fsync is lost": (
        lambda m: (m / "old.txt").unlink(),
        {"old.txt": b"old\n"},
    ),
    "mkdir needs its parent fsynced, and a file in it needs the new directory fsynced": (
        lambda m: (
            (m / "dir" / "sub").mkdir(),
            write(m / "dir" / "sub" / "f.txt", b"f", sync=True),
            fsync_path(m / "dir"),
        ),
        {"old.txt": b"old\n", "dir/sub": "<dir>"},
    ),
    "hard link with a directory fsync is kept, same content": (
        lambda m: (os.link(m / "old.txt", m / "link.txt"), fsync_path(m)),
        {"old.txt": b"old\n", "link.txt": b"old\n"},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_durability_model(machine: PowerLossMount, case: str) -> None:
    action, expected = CASES[case]
    action(machine.mnt)
    machine.cut()
    assert disk(machine) == {"dir": "<dir>", **expected}


def test_after_the_cut_nothing_more_reaches_the_disk(machine: PowerLossMount) -> None:
    handle = os.open(machine.mnt / "old.txt", os.O_WRONLY)
    with open(machine.mnt / ".powercut", "w") as control:
        control.write("cut")
    with pytest.raises(OSError, match="Input/output error"):  # the power is off
        os.write(handle, b"too late")
    os.close(handle)
    machine.unmount()
    assert (machine.disk / "old.txt").read_bytes() == b"old\n"


def test_remount_serves_the_durable_state(machine: PowerLossMount) -> None:
    write(machine.mnt / "kept.txt", b"k", sync=True)
    fsync_path(machine.mnt)
    machine.cut()
    machine.mount()
    assert (machine.mnt / "kept.txt").read_bytes() == b"k"
    assert sorted(os.listdir(machine.mnt)) == ["dir", "kept.txt", "old.txt"]
