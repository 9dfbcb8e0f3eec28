"""Serialisation of changes to the same file, in one process and across processes.

Two calls that change one file must not interleave their read-check-replace steps, or the second
can silently overwrite the first (a lost update). In-process keys are (device, inode of the
directory, name), so every spelling of a path (through symlinks, ``..``, another root) maps to
one lock; across processes the directory itself is locked (``DirectoryLocks``).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import anyio

logger = logging.getLogger(__name__)
K = TypeVar("K")
DirKey = tuple[int, int]
"""(device, inode) of a directory."""


class KeyedLocks:
    """A FIFO lock per key: taken without an await when free (the common case), handed
    directly to the next waiter on release. An entry exists while someone holds the key."""

    def __init__(self) -> None:
        self._held: dict[Hashable, deque[anyio.Event]] = {}
        """Held keys -> the events of their waiters, in arrival order."""

    def hold(self, *keys: Hashable) -> _Holding[Hashable]:
        """Hold the locks of all ``keys``, taken in a fixed order so holders never deadlock."""
        unique = list(dict.fromkeys(keys)) if len(keys) > 1 else list(keys)
        if len(unique) > 1:
            unique.sort(key=repr)
        return _Holding(unique, self._acquire, self._release)

    async def _acquire(self, key: Hashable) -> None:
        waiters = self._held.get(key)
        if waiters is None:
            self._held[key] = deque()
            return
        turn = anyio.Event()
        waiters.append(turn)
        try:
            await turn.wait()
        except BaseException:
            if turn.is_set():  # the lock was handed over as the cancel came: pass it on
                self._release(key)
            else:
                waiters.remove(turn)
            raise

    def _release(self, key: Hashable) -> None:
        waiters = self._held[key]
        if waiters:
            waiters.popleft().set()  # the next waiter now holds it
        else:
            del self._held[key]

    def __len__(self) -> int:
        return len(self._held)


class _Holding(Generic[K]):
    """``async with locks.hold(...)``: a plain class, cheaper than a generator on the hot path.

    Takes ``keys`` in order with ``acquire``; on any exit (or a failure half-way) releases what
    it took, in reverse order.
    """

    __slots__ = ("_acquire", "_held", "_keys", "_release")

    def __init__(
        self,
        keys: list[K],
        acquire: Callable[[K], Awaitable[None]],
        release: Callable[[K], None],
    ) -> None:
        self._keys = keys
        self._acquire = acquire
        self._release = release
        self._held: list[K] = []

    async def __aenter__(self) -> None:
        try:
            for key in self._keys:
                await self._acquire(key)
                self._held.append(key)
        except BaseException:
            self._release_all()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._release_all()

    def _release_all(self) -> None:
        while self._held:
            self._release(self._held.pop())


class DirectoryLocks:
    """Cross-process serialisation: an exclusive ``flock`` on the directory of each changed entry.

    Another server process on the same root takes the same kernel lock, so its read-check-replace
    of a file cannot interleave with ours; a holder that dies (even by SIGKILL) releases it with
    its descriptors. Nothing is created on disk. Inside one process the lock is shared by every
    change in that directory (``KeyedLocks`` still serialises same-file changes): ``flock``
    belongs to one open file description, so the first holder's duplicate of the directory
    descriptor carries it for the others. Waiting polls with a short back-off, which a cancel
    can interrupt (a blocking ``flock`` in a thread could not be).
    """

    def __init__(self) -> None:
        self._held: dict[DirKey, tuple[int, int]] = {}
        """Directory key -> (descriptor carrying the lock, number of holders in this process)."""

    def hold(self, directories: dict[tuple[int, int], int]) -> _Holding[tuple[DirKey, int]]:
        """Hold ``{(device, inode): directory fd}``, in key order so processes never deadlock."""
        return _Holding(sorted(directories.items()), self._acquire, self._release_item)

    async def _acquire(self, item: tuple[DirKey, int]) -> None:
        await poll_until(lambda: self._try_acquire(*item), first=_WAIT_FIRST, most=_WAIT_MAX)

    def _release_item(self, item: tuple[DirKey, int]) -> None:
        self._release(item[0])

    def _try_acquire(self, key: DirKey, dir_fd: int) -> bool:
        held = self._held.get(key)
        if held is not None:
            self._held[key] = (held[0], held[1] + 1)
            return True
        fd = os.dup(dir_fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as err:  # a filesystem without flock (some network mounts)
            _log_unsupported(err)
        self._held[key] = (fd, 1)
        return True

    def _release(self, key: DirKey) -> None:
        fd, users = self._held[key]
        if users > 1:
            self._held[key] = (fd, users - 1)
            return
        del self._held[key]
        # Explicitly: the caller's own descriptor shares the duplicate's open file description
        # (and so its flock) and may stay open after this, so closing ours would not unlock it.
        with contextlib.suppress(OSError):  # not supported here: nothing was locked
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __len__(self) -> int:
        return len(self._held)


_WAIT_FIRST = 0.0005
_WAIT_MAX = 0.01


async def poll_until(attempt: Callable[[], bool], *, first: float, most: float) -> None:
    """Call ``attempt`` until it returns True, sleeping ``first`` seconds, doubling up to
    ``most``, in between: how kernel locks taken with a non-blocking call are waited for, so
    that a cancel can interrupt the wait (a blocking call in a thread could not be)."""
    wait = first
    while not attempt():
        await anyio.sleep(wait)
        wait = min(wait * 2, most)


def _log_unsupported(err: OSError) -> None:
    _warn_once(err.strerror or str(err))


@functools.cache
def _warn_once(reason: str) -> None:
    logger.warning(
        "directory locks are not supported here (%s): changes from other processes on the "
        "same files are not serialised",
        reason,
    )


class ChangeLocks:
    """What a change holds: its entries' in-process locks, then their directories' flocks."""

    def __init__(self) -> None:
        self.entries = KeyedLocks()
        self.directories = DirectoryLocks()

    def __len__(self) -> int:
        """Entries plus directories held or waited for: 0 once every change has ended."""
        return len(self.entries) + len(self.directories)

    def hold(self, entries: dict[tuple[int, int, str], int]) -> _HeldChange:
        """Hold ``{(device, directory inode, name): directory fd}`` for one change."""
        directories = {key[:2]: dir_fd for key, dir_fd in entries.items()}
        return _HeldChange(self.entries.hold(*entries), self.directories.hold(directories))


class _HeldChange:
    __slots__ = ("_directories", "_entries")

    def __init__(
        self, entries: _Holding[Hashable], directories: _Holding[tuple[DirKey, int]]
    ) -> None:
        self._entries = entries
        self._directories = directories

    async def __aenter__(self) -> None:
        await self._entries.__aenter__()
        try:
            await self._directories.__aenter__()
        except BaseException:
            self._entries._release_all()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._directories._release_all()
        self._entries._release_all()
