"""After a crash: decide every pending history entry from the files, so history and files agree.

A direct change writes its entry ``pending`` before its commit point and marks it ``done``
after; a crash in between leaves it pending. Its evidence says what the entry's first path is
once the change committed (the staged temp's inode, absent, or any entry). A temp that still
holds the staged inode means the rename never happened. Entries of live processes are left
alone (in flight), as are entries whose directory lies outside the roots given.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from atomictools.engine.config import Durability
from atomictools.engine.durable.fsutil import lstat_at
from atomictools.engine.errors import AtomicToolsError, NotFoundError
from atomictools.engine.history.model import Evidence, HistoryEntry
from atomictools.engine.history.owner import owner_alive
from atomictools.engine.history.store import HistoryStore
from atomictools.engine.sandbox import Sandbox

logger = logging.getLogger("atomictools.engine.history")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(slots=True)
class Reconciled:
    """What a pass decided: entries kept (their change committed) and dropped (it did not)."""

    confirmed: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def reconcile_pending(
    sandbox: Sandbox, store: HistoryStore, *, dry_run: bool = False
) -> Reconciled:
    """Confirm or drop the pending entries of dead processes (see the module doc)."""
    done = Reconciled()
    for entry, owner, evidence in store.pending():
        if owner_alive(owner):
            continue
        decided = _committed(sandbox, evidence[0]) if evidence else False
        if decided is None:
            continue  # outside these roots: a recovery with them decides it
        (done.confirmed if decided else done.dropped).append(entry.id)
        if dry_run:
            continue
        try:
            if decided:
                for n in _never_made(sandbox, entry):
                    store.remove_path(entry.id, n, Durability.FULL)
                store.confirm(entry.id)
            else:
                store.discard(entry.id)
        except AtomicToolsError as err:
            logger.warning("history entry %s could not be reconciled: %s", entry.id, err)
    return done


def _never_made(sandbox: Sandbox, entry: HistoryEntry) -> list[int]:
    """Rows of directories the entry made that are not there: ``mkdir -p`` adds each directory
    to its entry just before making it, so a crash in between leaves one that was never made."""
    missing = []
    for n, row in enumerate(entry.paths):
        if (row.before, row.after, row.moved_from) != ("absent", "directory", None):
            continue
        try:
            with sandbox.resolve(row.path, follow_final=False) as location:
                if location.lstat() is None:
                    missing.append(n)
        except NotFoundError:
            missing.append(n)  # its parent is not there either
        except AtomicToolsError:
            continue  # outside these roots: left as recorded
    return missing


def _committed(sandbox: Sandbox, evidence: Evidence) -> bool | None:
    try:
        with sandbox.resolve(evidence.dir) as location:
            dir_fd = os.open(location.name, _DIR_FLAGS, dir_fd=location.dir_fd)
    except (AtomicToolsError, OSError):
        return None
    try:
        if evidence.temp is not None:
            staged = lstat_at(dir_fd, evidence.temp)
            if staged is not None and staged.st_ino == evidence.ino:
                return False  # the staged file is still next to the target: never renamed
        current = lstat_at(dir_fd, evidence.name)
        if evidence.ino is None:
            after = current is None
        elif evidence.ino == 0:
            after = current is not None
        else:
            after = current is not None and current.st_ino == evidence.ino
        if after:
            return True
        if evidence.before_ino is None:
            return current is not None  # absent before and still absent: never made
        # Still what it was before: never changed. Anything else is a later change by
        # someone else after this one committed: the entry stays (an undo checks the file).
        return current is None or current.st_ino != evidence.before_ino
    finally:
        os.close(dir_fd)
