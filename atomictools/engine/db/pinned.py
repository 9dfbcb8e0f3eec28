"""A database file inside the roots, opened through the descriptor of its directory.

The sandbox resolves a database path to an open directory descriptor, as for every file tool,
but SQLite opens files by path: a directory on the way swapped for a symlink by another local
process between the check and SQLite's open would make it open a file outside the roots.

Two defences, because SQLite (3.40 here) resolves every symlink of the path it is given,
``/proc/self/fd/N`` included, and then opens the resolved path by name:

1. SQLite is given ``/proc/self/fd/N/NAME``: the kernel resolves that link to wherever the
   pinned directory is *now*, so a swap made before the open cannot redirect it; and it is
   opened with ``mode=rw`` (never ``O_CREAT``), so an escape cannot create a file outside.
2. After a connection has opened all its files (the database, ``-wal``, ``-shm``), every
   descriptor it opened is checked against the pinned directory's entries (same inode); a
   connection holding anything else is closed before any statement of the caller runs.

What remains: a swap in the microseconds between SQLite's own resolution and its ``open``
can still make it open (and, for ``-wal``/``-shm``, create) a file of that name elsewhere; the
check then refuses the connection. Only an ``openat``-based SQLite VFS would close that.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from urllib.parse import quote

from atomictools.engine.errors import ConcurrentChangeError

_FD_DIR = "/proc/self/fd"
SIBLINGS = ("", "-wal", "-shm", "-journal")


@dataclass
class PinnedDirectory:
    """An open directory (owned: closed with ``close``) and the database's name in it."""

    dir_fd: int
    name: str
    display: str

    @property
    def sqlite_path(self) -> str:
        """The path SQLite is given: through the descriptor, not through the tree."""
        return f"{_FD_DIR}/{self.dir_fd}/{self.name}"

    def uri(self, mode: str) -> str:
        return f"file:{quote(self.sqlite_path)}?mode={mode}"

    def exists(self) -> bool:
        try:
            os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def check(self, descriptors: set[int]) -> None:
        """Every new descriptor on one of the database's names must be that entry here."""
        names = {self.name + suffix for suffix in SIBLINGS}
        for fd in descriptors:
            try:
                target = os.readlink(f"{_FD_DIR}/{fd}")
                opened = os.stat(f"{_FD_DIR}/{fd}")
            except OSError:
                continue  # closed meanwhile, or not ours
            base = os.path.basename(target)
            if base not in names:
                continue
            try:
                here = os.stat(base, dir_fd=self.dir_fd, follow_symlinks=False)
            except OSError:
                here = None
            if here is None or (here.st_dev, here.st_ino) != (opened.st_dev, opened.st_ino):
                raise ConcurrentChangeError(
                    f"a directory on the way to database {self.display} changed while it was "
                    f"being opened (SQLite opened {target}, which is not that file); it was "
                    "not used; retry"
                )

    def close(self) -> None:
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1


def open_descriptors() -> set[int]:
    """This process's open file descriptors (to tell which ones a connection opened).

    The listing sees its own descriptor, closed again when it returns (and then free for the
    next open): only descriptors still open afterwards count.
    """
    try:
        listed = {int(name) for name in os.listdir(_FD_DIR)}
    except OSError:  # no /proc: nothing to compare (the check then finds nothing new)
        return set()
    return {fd for fd in listed if _is_open(fd)}


def _is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True
