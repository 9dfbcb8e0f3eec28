"""In-process serialisation of changes to the same file.

Two calls that change one file must not interleave their read-check-replace steps, or the second
can silently overwrite the first (a lost update). Keys are (device, inode of the directory,
name), so every spelling of a path (through symlinks, ``..``, another root) maps to one lock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager

import anyio


class KeyedLocks:
    """A lock per key, created on demand and dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[anyio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, *keys: Hashable) -> AsyncIterator[None]:
        """Hold the locks of all ``keys``, taken in a fixed order so holders never deadlock."""
        held: list[Hashable] = []
        try:
            for key in sorted(set(keys), key=repr):
                lock = self._acquire_ref(key)
                try:
                    await lock.acquire()
                except BaseException:
                    self._release_ref(key)
                    raise
                held.append(key)
            yield
        finally:
            for key in reversed(held):
                self._locks[key][0].release()
                self._release_ref(key)

    def _acquire_ref(self, key: Hashable) -> anyio.Lock:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = anyio.Lock(fast_acquire=True)
        self._locks[key] = (lock, users + 1)
        return lock

    def _release_ref(self, key: Hashable) -> None:
        lock, users = self._locks[key]
        if users == 1:
            del self._locks[key]
        else:
            self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)
