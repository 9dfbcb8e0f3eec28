"""Change sets that could not be finished, and the paths they block until they are.

A set that failed past its commit point, or that a recovery left (it needs a person, or another
state directory), owns its paths: a change to one of them first tries to finish the set (another
process may have finished it already), and is otherwise refused with what to run. Shared by
every view of a workspace. Finishing runs recovery in a worker thread, off the event loop.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterable
from pathlib import Path

import anyio.to_thread

from atomictools.engine.changes.recovery import record_path, recover_journals
from atomictools.engine.changes.recovery_report import RecoveryReport, UnfinishedSet
from atomictools.engine.errors import AtomicToolsError, RecoveryNeededError
from atomictools.engine.sandbox import Location, Sandbox

LockKey = tuple[int, int, str]
"""(device, inode of the directory, name): one entry, however its path is spelled."""

_RECOVER = "run `atomictools recover` with this server's --state-dir (or restart the server)"


def lock_key(location: Location) -> LockKey:
    st = os.fstat(location.dir_fd)
    return (st.st_dev, st.st_ino, location.name)


class UnfinishedSets:
    """The unfinished sets by txid, and the lock keys of the paths each one blocks."""

    def __init__(self, sandbox: Sandbox, journal_dir: Path) -> None:
        self.sandbox = sandbox
        self.journal_dir = journal_dir
        self.sets: dict[str, UnfinishedSet] = {}
        self.blocked: dict[Hashable, str] = {}

    def note(self, report: RecoveryReport) -> None:
        """Take in what a recovery finished (unblocked) and what it left (blocked)."""
        for txid in report.handled:
            self.unblock(txid)
        for unfinished in report.unfinished.values():
            keys = []
            for path in unfinished.paths:
                try:
                    with self.sandbox.resolve(path, follow_final=False) as location:
                        keys.append(lock_key(location))
                except (AtomicToolsError, OSError):
                    continue  # outside these roots, or its directory is gone
            self.block(unfinished, keys)

    def block(self, unfinished: UnfinishedSet, keys: Iterable[Hashable]) -> None:
        self.sets[unfinished.txid] = unfinished
        self.blocked.update(dict.fromkeys(keys, unfinished.txid))

    def unblock(self, txid: str) -> None:
        self.sets.pop(txid, None)
        for key in [key for key, blocked in self.blocked.items() if blocked == txid]:
            del self.blocked[key]

    def blocks_any(self, keys: Iterable[Hashable]) -> bool:
        return bool(self.blocked) and any(key in self.blocked for key in keys)

    async def settle(self, keys: Iterable[Hashable], locations: Iterable[Location]) -> None:
        """Finish the sets owning these paths if that can be done now; else refuse."""
        pairs = list(zip(keys, locations, strict=True))
        for txid in {self.blocked[key] for key, _ in pairs if key in self.blocked}:
            if await anyio.to_thread.run_sync(self._try_finish, txid):
                self.unblock(txid)
        for key, location in pairs:
            blocked = self.blocked.get(key)
            if blocked is not None:
                unfinished = self.sets[blocked]
                raise RecoveryNeededError(
                    f"{location.display} is part of change set {blocked}, which "
                    f"{unfinished.reason}; {unfinished.fix or _RECOVER}",
                    changed=False,
                )

    async def finish_all(self) -> list[str]:
        """Try again to finish every unfinished set; returns the txids now finished."""
        finished = []
        for txid in list(self.sets):
            if await anyio.to_thread.run_sync(self._try_finish, txid):
                self.unblock(txid)
                finished.append(txid)
        return finished

    def _try_finish(self, txid: str) -> bool:
        """In a worker thread: is the change set finished now (by us, here, or by anyone)?"""
        unfinished = self.sets.get(txid)
        if unfinished is None:
            return True
        ours = record_path(self.journal_dir, txid)
        if os.path.lexists(ours) and not unfinished.untrusted:
            report = recover_journals(self.sandbox, self.journal_dir, only=txid)
            if txid in report.handled:
                return True
            if txid in report.unfinished:
                unfinished.reason = report.unfinished[txid].reason
            return False
        if unfinished.journal is not None and os.path.lexists(unfinished.journal):
            return False
        return not any(os.path.lexists(member) for member in unfinished.members)
