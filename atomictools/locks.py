"""In-process serialisation of changes to the same file.

Two calls that change one file must not interleave their read-check-replace steps, or the second
can silently overwrite the first (a lost update). Keys are (device, inode of the directory,
name), so every spelling of a path (through symlinks, ``..``, another root) maps to one lock.
"""

from __future__ import annotations

from collections.abc import Hashable

import anyio


class KeyedLocks:
    """A lock per key, created on demand and dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[anyio.Lock, int]] = {}

    def hold(self, *keys: Hashable) -> _Held:
        """Hold the locks of all ``keys``, taken in a fixed order so holders never deadlock."""
        return _Held(self, sorted(set(keys), key=repr))

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


class _Held:
    """``async with locks.hold(...)``: a plain class, cheaper than a generator on the hot path."""

    __slots__ = ("_held", "_keys", "_locks")

    def __init__(self, locks: KeyedLocks, keys: list[Hashable]) -> None:
        self._locks = locks
        self._keys = keys
        self._held: list[Hashable] = []

    async def __aenter__(self) -> None:
        try:
            for key in self._keys:
                lock = self._locks._acquire_ref(key)
                try:
                    await lock.acquire()
                except BaseException:
                    self._locks._release_ref(key)
                    raise
                self._held.append(key)
        except BaseException:
            self._release_all()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._release_all()

    def _release_all(self) -> None:
        while self._held:
            key = self._held.pop()
            self._locks._locks[key][0].release()
            self._locks._release_ref(key)
