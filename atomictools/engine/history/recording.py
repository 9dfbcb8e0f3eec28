"""Recording a change in the history, around its commit point.

``History`` is a workspace's setting (on or off, retention) plus the store it writes to.
``Recording`` is one direct change's entry: ``begin`` writes it ``pending`` (durably, with
the content about to be replaced) just before the commit point, ``committed`` marks it done
just after, and ``abandoned`` removes it when the commit never happened (error, cancel).
The journaled commit records its entry itself (see ``journaled``), after applying and before
its journal goes, so the journal can re-record it after a crash.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from atomictools.engine.config import Durability, Limits
from atomictools.engine.durable.blocking import alongside, run_blocking
from atomictools.engine.durable.steps import crash_point
from atomictools.engine.durable.writer import PendingFile
from atomictools.engine.errors import AtomicToolsError, from_os_error
from atomictools.engine.history.capture import Before, capture, diff_counts
from atomictools.engine.history.model import Evidence, PathChange
from atomictools.engine.history.store import (
    DB_NAME,
    HISTORY_DIR,
    HistoryStore,
    KeptContent,
    new_change_id,
    store_for,
)
from atomictools.engine.sandbox import Location

logger = logging.getLogger("atomictools.engine.history")

DEFAULT_MAX_BYTES = 1024 * 1024 * 1024
DEFAULT_MAX_AGE = 30 * 24 * 3600.0
PRUNE_EVERY = 256
"""Changes this process records between two retention passes (each pass is one query set)."""


@dataclass(frozen=True, slots=True)
class History:
    """Whether changes are recorded, and how much of the past is kept."""

    state_dir: Path
    enabled: bool = True
    max_bytes: int = DEFAULT_MAX_BYTES
    max_age: float = DEFAULT_MAX_AGE

    @property
    def store(self) -> HistoryStore:
        return store_for(self.state_dir)

    def exists(self) -> bool:
        """Whether there is a history to read (on, or left by an earlier run with it on)."""
        return self.enabled or (self.state_dir / HISTORY_DIR / DB_NAME).exists()

    def recording(self, op: str, durability: Durability, limits: Limits) -> Recording | None:
        """A recording for one direct change, or None when history is off."""
        if not self.enabled:
            return None
        return Recording(self, op, durability, limits)

    def prune(self) -> int:
        return self.store.prune(max_bytes=self.max_bytes, max_age=self.max_age)

    def after_change(self) -> None:
        """Every ``PRUNE_EVERY`` changes, a retention pass in a background thread (off the
        event loop, one at a time per store); a failure is logged, not raised."""
        store = self.store
        if store.changes_since_prune < PRUNE_EVERY or not store.pruning.acquire(blocking=False):
            return
        store.changes_since_prune = 0

        def run() -> None:
            try:
                self.prune()
            except AtomicToolsError as err:
                logger.warning("history retention pass failed: %s", err)
            finally:
                store.pruning.release()

        threading.Thread(target=run, name="atomictools-history-prune", daemon=True).start()


@dataclass(slots=True)
class Recording:
    """One direct change's history entry (see the module doc)."""

    history: History
    op: str
    durability: Durability
    limits: Limits
    change_id: str = field(default_factory=new_change_id)
    paths: list[PathChange] = field(default_factory=list)
    kept: list[KeptContent] = field(default_factory=list)
    evidence: list[Evidence] = field(default_factory=list)
    begun: bool = False

    # -- building the entry ----------------------------------------------------------------

    async def capture(
        self, location: Location, *, keep: bool, known: bytes | None = None
    ) -> Before:
        """The location's current state (off the event loop when it is a large file)."""
        st = location.lstat()
        size = st.st_size if st is not None else 0
        before = await run_blocking(
            known is not None or self.limits.inline(size), captured, location, keep, known
        )
        if before.kept is not None:
            self.kept.append(before.kept)
        return before

    def add(self, row: PathChange, evidence: Evidence | None = None) -> None:
        self.paths.append(row)
        if evidence is not None:
            self.evidence.append(evidence)

    def add_directory(self, parent_fd: int, path: Path) -> None:
        """``mkdir -p``: a directory about to be made joins the entry, durably, first (the
        entry is begun with the first one). Synchronous: the mkdirs run inline."""
        row = PathChange(path=str(path), before="absent", after="directory")
        evidence = Evidence(str(path.parent), path.name, os.fstat(parent_fd).st_dev, 0, None, None)
        if not self.begun:
            self.add(row, evidence)
            self.begun = True
            self.history.store.record(
                self.change_id,
                self.op,
                self.paths,
                (),
                durability=self.durability,
                pending=True,
                evidence=self.evidence,
            )
        else:
            self.history.store.add_path(self.change_id, len(self.paths), row, self.durability)
            self.paths.append(row)
        crash_point("history.recorded")

    def drop_directory(self, path: Path) -> None:
        """Making it failed: it leaves the entry (and a first one leaves with the entry)."""
        if len(self.paths) <= 1:
            self.abandoned()
            self.begun = False
            self.paths.clear()
            self.evidence.clear()
            return
        with contextlib.suppress(AtomicToolsError):
            self.history.store.remove_path(self.change_id, len(self.paths) - 1, self.durability)
        self.paths.pop()

    # -- around the commit point -----------------------------------------------------------

    async def begin(self, sync: Callable[[], None] | None = None, size: int = 0) -> None:
        """Write the entry, pending and durable, with the content it keeps. ``sync``: the
        staged file's fsync (of ``size`` bytes), run alongside the entry's own fsync."""
        self.begun = True  # before the write: a cancel while it runs still discards it
        big = sum(k.size for k in self.kept if k.data is None)

        def record() -> None:
            self.history.store.record(
                self.change_id,
                self.op,
                self.paths,
                self.kept,
                durability=self.durability,
                pending=True,
                evidence=self.evidence,
            )

        if sync is None:
            await run_blocking(self.limits.inline(big), record)
        elif self.limits.inline(big) and self.limits.inline(size):
            alongside(sync, record)  # two fsyncs side by side, inline like a small write's
        else:
            await run_blocking(False, alongside, sync, record)
        crash_point("history.recorded")

    def committed(self) -> None:
        """The commit point passed: the entry is done (a failure here only delays that to
        the next recovery, which tells from the files)."""
        try:
            self.history.store.confirm(self.change_id)
        except AtomicToolsError as err:
            logger.warning("history entry %s: confirming failed: %s", self.change_id, err)
        crash_point("history.confirmed")
        self.history.after_change()

    def abandoned(self) -> None:
        """The change did not happen: its entry goes. Never raises (runs on the way out)."""
        if not self.begun:
            return
        try:
            self.history.store.discard(self.change_id, self.durability)
        except AtomicToolsError as err:  # recovery drops it: the evidence says uncommitted
            logger.warning("history entry %s: discarding failed: %s", self.change_id, err)


class WriteRecording:
    """The commit hook of a direct write, edit or copy (``PendingWrite`` calls it)."""

    def __init__(
        self,
        recording: Recording,
        location: Location,
        *,
        known: bytes | None = None,
        diff: str | None = None,
    ) -> None:
        self.recording = recording
        self.location = location
        self.known = known
        self.diff = diff

    async def before_commit(
        self, pending: PendingFile, sha256: str, size: int, sync: Callable[[], None] | None
    ) -> None:
        loc = self.location
        before = await self.recording.capture(loc, keep=True, known=self.known)
        added, removed = diff_counts(self.diff)
        st = os.fstat(pending.fd)
        self.recording.add(
            before.row(str(loc.abspath), "file", sha256, size, added=added, removed=removed),
            Evidence(
                str(loc.abspath.parent),
                loc.name,
                st.st_dev,
                st.st_ino,
                temp=pending.temp_name,
                before_ino=before.ino,
            ),
        )
        await self.recording.begin(sync, size)

    def committed(self) -> None:
        self.recording.committed()

    def abandoned(self) -> None:
        self.recording.abandoned()


def captured(
    location: Location,
    keep: bool,
    known: bytes | None = None,
    keep_from: tuple[int, str] | None = None,
) -> Before:
    """``capture`` of a location, its failure said as the toolkit says it: a file the server
    may replace but not read cannot be kept, so the change is refused (nothing changed)."""
    try:
        return capture(location.dir_fd, location.name, keep=keep, known=known, keep_from=keep_from)
    except OSError as err:
        raise from_os_error(
            err, location.display, "keep the previous version (for the history) of"
        ) from err


def dir_evidence(location: Location, ino: int | None, before_ino: int | None) -> Evidence:
    """After the commit, ``location`` is the inode ``ino`` (None: absent; 0: any entry);
    before it, the inode ``before_ino`` (None: absent)."""
    st = os.fstat(location.dir_fd)
    return Evidence(str(location.abspath.parent), location.name, st.st_dev, ino, None, before_ino)


def rows_moved(
    source: Location, destination: Location, moved: Before, replaced: Before
) -> Sequence[PathChange]:
    """A move's two rows: the source goes, the destination gets what the source was."""
    return (
        moved.row(str(source.abspath), "absent"),
        replaced.row(
            str(destination.abspath),
            moved.kind,
            moved.sha256,
            moved.size,
            moved_from=str(source.abspath),
        ),
    )
