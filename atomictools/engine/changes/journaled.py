"""The journaled commit: change sets (and any change with an idempotency key) that are
all-or-nothing, through an intent journal. Every precondition comes from ``checks``, the same
as the direct commit's; new content is staged by the same pending-file writer.

Protocol (``apply_change_set``):

1. **Prepare** (no visible change; cancellable): every new content is staged in a locked temp
   file next to its target and fsynced; every file about to be replaced or deleted gets a
   hard-linked backup (also a temp name); a file moving to another file system is staged as a
   copy next to its destination, and its source backed up for deletion; directories to create
   are recorded in a ``preparing`` journal record first, then created.
2. **Commit**: the record, rewritten as ``committed`` with every target, staged file and backup,
   checksummed, is written to a temp, fsynced and renamed into the journal directory, which is
   then fsynced. That rename is the single commit point.
3. **Apply** (shielded, finished even when cancelled): renames in order, directory fsyncs.
4. **Finish**: backups removed, record removed.

A failure or cancel before the commit point undoes the preparation; after it, the change is
rolled forward. A crash anywhere is repaired by ``recovery``: a record that is not ``committed``
(or does not verify) is rolled back, a committed one rolled forward (or back on request). The
journal lives in the state directory, never inside the roots; the writer holds an ``flock`` on
its record while the change is in flight, so recovery never touches a live change.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import logging
import os
import secrets
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from atomictools.engine.changes import checks
from atomictools.engine.changes.content import copy_into, plan_edit
from atomictools.engine.changes.idempotency import IdempotencyStore, Receipt
from atomictools.engine.changes.model import MAX_CHANGES, Change
from atomictools.engine.changes.record import RECORD_SUFFIX, JournalRecord, OpRecord, State
from atomictools.engine.changes.sqlstep import SqlPart, SqlTransaction
from atomictools.engine.config import Durability, Limits
from atomictools.engine.durable import fsutil
from atomictools.engine.durable.blocking import run_blocking
from atomictools.engine.durable.steps import crash_point, step
from atomictools.engine.durable.tempfiles import (
    Role,
    claim_name_for,
    create_locked_temp,
    member_name_for,
    parse_member,
    remove_set_files,
)
from atomictools.engine.durable.writer import AtomicWriter, PendingFile
from atomictools.engine.errors import (
    AtomicToolsError,
    CommitUnknownError,
    ConcurrentChangeError,
    DatabaseError,
    DurabilityUnknownError,
    InvalidArgumentError,
    NotFoundError,
    RecoveryNeededError,
    StateDirError,
    TooLargeError,
    from_os_error,
    state_dir_error,
)
from atomictools.engine.history.capture import Before, diff_counts
from atomictools.engine.history.model import PathChange
from atomictools.engine.history.recording import History, captured, rows_moved
from atomictools.engine.history.store import KeptContent, new_change_id
from atomictools.engine.reads.files import read_whole
from atomictools.engine.results import (
    ChangeOutcome,
    ChangeSetResult,
    EntryType,
    Progress,
    entry_type,
)
from atomictools.engine.sandbox import Location, Sandbox, open_entry, require_regular

logger = logging.getLogger("atomictools.engine.changes.journaled")


# -- the journal record --------------------------------------------------------------------


class JournalFile:
    """This process's record of one change set, locked for as long as the change is in flight."""

    def __init__(self, directory: Path, txid: str, durability: Durability) -> None:
        try:
            fsutil.make_dirs_durably(directory)
            self.dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise state_dir_error(err, directory, "open the journal directory") from err
        self.directory = directory
        self.name = f"{txid}{RECORD_SUFFIX}"
        self.durability = durability
        self.fd: int | None = None

    @property
    def path(self) -> Path:
        return self.directory / self.name

    def write(self, record: JournalRecord) -> None:
        """Atomically (re)write the record: temp, fsync, rename, directory fsync.

        Raises ``StateDirError`` (the state directory is full, read-only, ...). A failure before
        the rename leaves the previous record (or none); after it, the new record is in place
        (the caller's undo removes it).
        """
        try:
            temp_fd, temp = create_locked_temp(self.dir_fd, self.name)
        except OSError as err:
            raise state_dir_error(err, self.directory, "write a journal record in") from err
        try:
            fsutil.write_all(temp_fd, record.encode())
            if self.durability is Durability.FULL:
                fsutil.durable_sync(temp_fd)
            os.replace(temp, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        except BaseException as err:
            os.close(temp_fd)
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=self.dir_fd)
            if isinstance(err, OSError):
                raise state_dir_error(err, self.directory, "write a journal record in") from err
            raise
        # The renamed temp keeps its flock: it marks the record as live for recovery.
        if self.fd is not None:
            os.close(self.fd)
        self.fd = temp_fd
        if self.durability is Durability.FULL:
            try:
                fsutil.sync_directory(self.dir_fd)
            except OSError as err:
                raise state_dir_error(err, self.directory, "sync the journal directory") from err

    def remove(self) -> None:
        """Delete the record (the change set is over); closes the file."""
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.name, dir_fd=self.dir_fd)
            if self.durability is Durability.FULL:
                fsutil.sync_directory(self.dir_fd)
        finally:
            self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1


# -- preparation ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Backup:
    """A hard link to a target's old version under a temp name (fd -1 for a symlink)."""

    location: Location
    name: str
    fd: int

    def discard(self) -> None:
        _close(self.fd)
        self.fd = -1
        with contextlib.suppress(OSError):
            os.unlink(self.name, dir_fd=self.location.dir_fd)


@dataclass(slots=True)
class _Planned:
    change: Change
    target: Location
    index: int = 1
    """Where the change is in the set (1-based), for messages and the order of outcomes."""
    source: Location | None = None
    staged: PendingFile | None = None
    backup: _Backup | None = None
    created_link: _Backup | None = None
    """A second name of a new file's staged inode (so an undo can tell the file is ours)."""
    source_backup: _Backup | None = None
    """A move across file systems: the source's backup (the move is a copy, then a delete)."""
    sha256: str | None = None
    diff: str | None = None
    existed: bool = False
    size: int | None = None
    previous_sha256: str | None = None
    type: EntryType | None = None
    virtual: str | None = None
    """Dry run only: the path lies in a directory the set would create (not checked)."""
    rows: tuple[PathChange, ...] = ()
    """The history's view of this change: each path before and after."""
    kept: tuple[tuple[KeptContent, str], ...] = ()
    """Content the history keeps, with the backup member (in the target's directory) it is
    linked from, or re-read from by a recovery that records the entry."""

    @property
    def members(self) -> tuple[_Backup | None, ...]:
        return (self.created_link, self.backup, self.source_backup)

    def records(self) -> tuple[OpRecord, ...]:
        """What the journal must know to finish or undo this change (mkdir: nothing)."""
        op = self.change.op
        target = self.target
        if op == "mkdir":
            return ()
        if op == "rmdir":
            return (
                OpRecord(
                    op="rmdir",
                    dir=str(target.abspath.parent),
                    name=target.name,
                    staged=None,
                    backup=None,
                    sha256=None,
                ),
            )
        if op == "move" and self.source_backup is None:
            assert self.source is not None
            return (
                OpRecord(
                    op="move",
                    dir=str(target.abspath.parent),
                    name=target.name,
                    staged=None,
                    backup=self.backup.name if self.backup else None,
                    sha256=None,
                    source_dir=str(self.source.abspath.parent),
                    source_name=self.source.name,
                ),
            )
        if op == "delete":
            return (
                OpRecord(
                    op="delete",
                    dir=str(target.abspath.parent),
                    name=target.name,
                    staged=None,
                    backup=self.backup.name if self.backup else None,
                    sha256=None,
                ),
            )
        replace = OpRecord(
            op="replace",
            dir=str(target.abspath.parent),
            name=target.name,
            staged=self.staged.temp_name if self.staged else None,
            backup=self.backup.name if self.backup else None,
            sha256=self.sha256,
            link=self.created_link.name if self.created_link else None,
        )
        if self.source_backup is None:
            return (replace,)
        assert self.source is not None  # across file systems: the copy, then the delete
        delete = OpRecord(
            op="delete",
            dir=str(self.source.abspath.parent),
            name=self.source.name,
            staged=None,
            backup=self.source_backup.name,
            sha256=None,
        )
        return (replace, delete)


SET_UNCHANGED = "nothing was committed, and no file was changed"
"""How a failed database step of a set with file changes ends: the whole set left nothing."""


class _CrossDevice(Exception):
    """A hard link between the two directories failed with EXDEV: two file systems."""


class ChangeSetRunner:
    """Runs one change set through the protocol; one instance per call."""

    def __init__(
        self,
        sandbox: Sandbox,
        journal_dir: Path,
        *,
        durability: Durability,
        limits: Limits,
    ) -> None:
        self.sandbox = sandbox
        self.journal_dir = journal_dir
        self.durability = durability
        self.limits = limits
        self.txid = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(6)}"
        self.planned: list[_Planned] = []
        self.journal: JournalFile | None = None
        self.created_dirs: list[tuple[str, str]] = []
        """Directories made for ``mkdir`` changes, as (parent path, name), in creation order."""
        self.dry_run = False
        self.receipt: Receipt | None = None
        """A keyed call: its committed record carries the key, for recovery to record."""
        self.history: History | None = None
        """Where the set is recorded once applied (None: not recorded)."""
        self.sql: SqlPart | None = None
        """The set's database steps: its commit point is then that database's COMMIT."""
        self.total = 0
        """How many changes the set has (file changes and database steps)."""
        self.released = False
        """Left for recovery to decide (``release``): its files must not be undone."""
        self.history_op = "apply_changes"
        self.undoes: tuple[str, ...] = ()
        self.change_id = new_change_id()
        self.record_path = os.path.join(os.path.realpath(journal_dir), self.txid + RECORD_SUFFIX)
        """Where the record lives; every claim points here."""
        self._claimed: dict[tuple[int, int], Location] = {}

    # The locations are resolved by the caller (which also takes the path locks).

    def plan(self, changes: Sequence[Change], *, dry_run: bool = False) -> list[_Planned]:
        """Resolve every path, in order. ``mkdir`` changes create their directories here
        (after recording the intent in a ``preparing`` journal record), so later changes can
        name files inside them; an undo removes them again if they are still empty.
        """
        if not changes:
            raise InvalidArgumentError("changes is empty; give at least one change")
        if len(changes) > MAX_CHANGES:
            raise TooLargeError(f"{len(changes)} changes is more than {MAX_CHANGES}; split them")
        self.dry_run = dry_run
        self.total = len(changes)
        self.sql = SqlPart.collect(changes, lambda index, op: _label(index, len(changes), op))
        seen: dict[tuple[str, str], int] = {}
        virtual_dirs: list[str] = []  # dry run: directories mkdir changes would create
        try:
            for index, change in enumerate(changes, start=1):
                if change.op == "sql":
                    continue  # collected above: the database is not a path
                follow = change.op not in ("move", "delete", "rmdir")
                make = self._make_dir if change.op == "mkdir" and not dry_run else None
                label = _label(index, len(changes), change.op)
                if dry_run and self._virtual_in_dry_run(change, virtual_dirs):
                    placeholder = _Planned(
                        change, self.sandbox.resolve("."), index, virtual=change.path
                    )
                    self.planned.append(placeholder)
                    if change.op == "mkdir":
                        virtual_dirs.append(change.path)
                    continue
                try:
                    target = self.sandbox.resolve(change.path, follow_final=follow, make_dir=make)
                    planned = _Planned(change, target, index)
                    self.planned.append(planned)
                    if change.op == "mkdir":
                        self._plan_mkdir(planned)
                        if dry_run and target.lstat() is None:
                            virtual_dirs.append(change.path)
                    if change.source is not None:
                        planned.source = self.sandbox.resolve(
                            change.source, follow_final=change.op == "copy"
                        )
                except AtomicToolsError as err:
                    raise err.prefixed(label) from None
                for location in filter(None, (target, planned.source)):
                    key = (str(location.abspath.parent), location.name)
                    if seen.get(key, index) != index and not (
                        change.op == "copy" and location is planned.source
                    ):
                        raise InvalidArgumentError(
                            f"{label}{location.display} is also changed by change "
                            f"{seen[key]}; combine them into one change"
                        )
                    seen.setdefault(key, index)
            self._refuse_database_files()
        except BaseException:
            self.undo_prepare()  # directories made for earlier mkdir changes, and the record
            self.close_locations()
            raise
        return self.planned

    def _refuse_database_files(self) -> None:
        """A set must not replace, move or delete the database its statements run in."""
        if self.sql is None or self.sql.database.kind != "sqlite":
            return
        database = os.path.realpath(self.sql.database.path)
        names = {database + suffix for suffix in ("", "-wal", "-shm", "-journal")}
        for planned in self.planned:
            for location in filter(None, (planned.target, planned.source)):
                if planned.virtual is None and str(location.abspath) in names:
                    label = _label(planned.index, self.total, planned.change.op)
                    raise InvalidArgumentError(
                        f"{label}{location.display} is the database this set's statements run "
                        "in; a set cannot also change its file"
                    )

    def _virtual_in_dry_run(self, change: Change, virtual_dirs: list[str]) -> bool:
        """Dry run: does the change need a directory that only a planned mkdir would make?"""
        parts = Path(change.path).parts
        if any(parts[: len(Path(d).parts)] == Path(d).parts for d in virtual_dirs):
            return True
        if change.op != "mkdir":
            return False
        try:  # ``mkdir -p`` of a path whose parents are missing too
            with self.sandbox.resolve(str(Path(change.path).parent)) as parent:
                return parent.lstat() is None
        except NotFoundError:
            return True

    def _make_dir(self, dir_fd: int, name: str, parent: Path) -> None:
        """Record the intent durably, then create the directory (then make it durable)."""
        if self.journal is None:
            self.journal = JournalFile(self.journal_dir, self.txid, self.durability)
        self.created_dirs.append((str(parent), name))
        self.journal.write(self._record("preparing"))
        os.mkdir(name, 0o777, dir_fd=dir_fd)
        if self.durability is Durability.FULL:
            fsutil.sync_directory(dir_fd)

    def _plan_mkdir(self, planned: _Planned) -> None:
        target = planned.target
        st = target.lstat()
        planned.existed = st is not None
        checks.check_mkdir(target, st)
        if st is None and not self.dry_run:
            self._make_dir(target.dir_fd, target.name, target.abspath.parent)

    def close_locations(self) -> None:
        for planned in self.planned:
            planned.target.close()
            if planned.source is not None:
                planned.source.close()

    async def prepare(self, progress: Progress | None, dry_run: bool) -> None:
        for done, planned in enumerate(self.planned, start=1):
            if planned.virtual is not None:
                continue  # dry run, inside a directory not made yet: nothing to check
            try:
                await self._prepare_one(planned, dry_run)
            except AtomicToolsError as err:
                raise err.prefixed(_label(planned.index, self.total, planned.change.op)) from None
            await step("changeset.prepare")
            if progress is not None:
                await progress(done, self.total * 2)

    async def run_statements(self, tx: SqlTransaction, progress: Progress | None) -> None:
        """The database steps, in order, inside the set's transaction (each error names its
        step: ``change 3 of 4 (sql): statement 2 of 2 (...) failed: ...``)."""
        assert self.sql is not None
        for ran, sql_step in enumerate(self.sql.steps, start=1):
            try:
                sql_step.results = tuple(await tx.run(sql_step.change.statements))
            except AtomicToolsError as err:
                label = _label(sql_step.index, self.total, "sql")
                raise err.prefixed(label, SET_UNCHANGED if self.planned else None) from None
            await step("changeset.sql")
            if progress is not None:
                await progress(len(self.planned) + ran, self.total * 2)

    async def _prepare_one(self, planned: _Planned, dry_run: bool) -> None:
        known = await self._stage_one(planned, dry_run)
        if not dry_run and self.history is not None and self.history.enabled:
            await self._capture(planned, known)

    async def _stage_one(self, planned: _Planned, dry_run: bool) -> bytes | None:
        """Check and stage one change; returns the target's old bytes if they were read."""
        change, target = planned.change, planned.target
        if not dry_run:
            _refuse_removed_directory(target, planned.source)
        st = target.lstat()
        planned.existed = st is not None
        op = change.op
        if op == "mkdir":
            if not dry_run and (st is None or not stat.S_ISDIR(st.st_mode)):
                raise ConcurrentChangeError(
                    f"the directory {target.display} was removed while this change set waited "
                    "for its turn; retry"
                )
            planned.existed = not any(
                (str(target.abspath.parent), target.name) == made for made in self.created_dirs
            )
            return None
        if op == "rmdir":
            checks.check_rmdir(target, st, self._leaving(target))
            planned.type = "directory"
            return None
        if op == "delete":
            checks.check_delete(target, st)
            assert st is not None
            planned.type = entry_type(st)
            await checks.check_sha256(target, st, change.expected_sha256, self.limits, "delete")
            if not dry_run:
                planned.backup = self._backup(target, "del")
        elif op == "move":
            await self._prepare_move(planned, st, dry_run)
        elif op == "write":
            assert change.content is not None
            checks.check_write_size(target.display, len(change.content), self.limits)
            checks.check_write(target, st, create_only=change.create_only)
            await checks.check_sha256(target, st, change.expected_sha256, self.limits, "write")
            await self._stage_bytes(planned, st, change.content, dry_run)
        elif op == "edit":
            checks.check_edit(target, st, change.edits, self.limits)
            data = await read_whole(target, self.limits)
            before, new, diff, _ = await run_blocking(
                self.limits.inline(len(data)),
                plan_edit,
                data,
                change.edits,
                target,
                change.expected_sha256,
            )
            planned.diff = diff
            planned.previous_sha256 = before
            await self._stage_bytes(planned, st, new, dry_run)
            return data
        else:
            assert planned.source is not None
            source = planned.source
            src_st = source.lstat()
            checks.check_copy(source, src_st, target, st, overwrite=change.overwrite)
            assert src_st is not None
            await self._stage_copy(planned, st, source, src_st, dry_run=dry_run)
        return None

    def _leaving(self, directory: Location) -> Callable[[str], bool]:
        """Which names in ``directory`` go before it does: what this set removes (deletes,
        rmdirs, moves away) and the set's own files (backups, the claim)."""
        gone = []
        for planned in self.planned:
            if planned.change.op in ("delete", "rmdir"):
                gone.append(planned.target)
            elif planned.change.op == "move" and planned.source is not None:
                gone.append(planned.source)
        names = {g.name for g in gone if g.abspath.parent == directory.abspath}
        names.add(claim_name_for(self.txid))

        def leaving(name: str) -> bool:
            member = parse_member(name)
            return name in names or (member is not None and member.txid == self.txid)

        return leaving

    async def _capture(self, planned: _Planned, known: bytes | None) -> None:
        """The history's rows for a prepared change, with its old content (off the loop when
        large): read from the target, kept through its backup member."""
        op, target = planned.change.op, planned.target
        if op == "mkdir":
            return  # the directories made are rows of their own (see history_entry)
        if op == "rmdir":
            planned.rows = (PathChange(str(target.abspath), "directory", "absent"),)
            return
        backup = planned.backup.name if planned.backup is not None else None
        dir_path = str(target.abspath.parent)

        def take(location: Location, member: str | None, keep: bool, data: bytes | None) -> Before:
            keep_from = (location.dir_fd, member) if member is not None else None
            return captured(location, keep, data, keep_from)

        largest = max(_size_of(target), _size_of(planned.source) if planned.source else 0)
        inline = self.limits.inline(largest)
        if op == "delete":
            before = await run_blocking(inline, take, target, backup, True, None)
            planned.rows = (before.row(str(target.abspath), "absent"),)
        elif op == "move":
            source = planned.source
            assert source is not None
            moved = await run_blocking(inline, take, source, None, False, None)
            replaced = await run_blocking(inline, take, target, backup, backup is not None, None)
            planned.rows = tuple(rows_moved(source, target, moved, replaced))
            before = replaced
        else:
            before = await run_blocking(inline, take, target, backup, backup is not None, known)
            added, removed = diff_counts(planned.diff)
            planned.rows = (
                before.row(
                    str(target.abspath),
                    "file",
                    planned.sha256,
                    planned.size,
                    added=added,
                    removed=removed,
                ),
            )
        if before.kept is not None and backup is not None:
            planned.kept = ((before.kept, f"{dir_path}/{backup}"),)

    def history_rows(self) -> list[PathChange]:
        """Every path of the set: the directories it made, then each change's paths."""
        rows = [
            PathChange(f"{parent}/{name}", "absent", "directory")
            for parent, name in (self.created_dirs)
        ]
        return rows + [row for p in self.planned for row in p.rows]

    def history_entry(self) -> dict[str, Any]:
        """The set's entry as the committed record carries it."""
        return {
            "id": self.change_id,
            "op": self.history_op,
            "undoes": list(self.undoes),
            "paths": [row.to_json() for row in self.history_rows()],
            "kept": [
                {"sha256": k.sha256, "size": k.size, "member": member}
                for p in self.planned
                for k, member in p.kept
            ],
            **({"audit": self.sql.audit()} if self.sql is not None else {}),
        }

    async def _prepare_move(
        self, planned: _Planned, st: os.stat_result | None, dry_run: bool
    ) -> None:
        """A rename on one file system; across file systems a file is copied to the target
        and its source deleted, both in this set (so all of it happens, or none)."""
        change, target, source = planned.change, planned.target, planned.source
        assert source is not None
        src_st = source.lstat()
        checks.check_move(source, src_st, target, st, overwrite=change.overwrite)
        assert src_st is not None
        planned.type = entry_type(src_st)
        expected = change.expected_sha256
        if stat.S_ISREG(src_st.st_mode) and self._across(source, src_st, target, dry_run):
            await self._stage_copy(planned, st, source, src_st, dry_run=dry_run, action="move")
            if not dry_run:
                planned.source_backup = self._backup(source, "del")
            return
        await checks.check_sha256(source, src_st, expected, self.limits, "move")
        if not dry_run and st is not None:
            planned.backup = self._backup(target, "dst")

    def _across(
        self, source: Location, src_st: os.stat_result, target: Location, dry_run: bool
    ) -> bool:
        """Does this file's move leave its file system? Two mounts of one file system (a bind
        mount) share a device number, so a hard link tries the crossing (EXDEV) for real."""
        if checks.across_devices(source, src_st, target):
            return True
        if dry_run:
            return False
        self._claim(target)
        try:
            probe = self._link_from(source, target, "crt")
        except _CrossDevice:
            return True
        except AtomicToolsError:  # no hard link here (EPERM under protected_hardlinks, a file
            return False  # system without links): only the crossing matters; a rename will do
        probe.discard()
        return False

    async def _stage_bytes(
        self, planned: _Planned, st: os.stat_result | None, content: bytes, dry_run: bool
    ) -> None:
        planned.sha256 = hashlib.sha256(content).hexdigest()
        planned.size = len(content)
        if dry_run:
            return
        writer = self._staging(planned, st, st, known_sha256=planned.sha256)
        view, chunk = memoryview(content), self.limits.chunk_bytes
        for start in range(0, len(view), chunk):
            await writer.write(view[start : start + chunk], last=start + chunk >= len(view))
            await step("changeset.chunk")
        staged = planned.staged
        assert staged is not None
        if not staged.synced:  # empty content: no chunk carried the fsync
            await run_blocking(True, staged.sync)
        self._keep_old_version(planned, st)

    async def _stage_copy(
        self,
        planned: _Planned,
        st: os.stat_result | None,
        source: Location,
        src_st: os.stat_result,
        *,
        dry_run: bool,
        action: str = "copy",
    ) -> None:
        """Stream the source into a staged file (memory bounded by the chunk size).

        The staged file's name carries the new content's hash, so the source is hashed first;
        a source that changes while it is copied is refused.
        """
        sha = await checks.current_sha256(source, self.limits, src_st)
        checks.refuse_changed(source, action, planned.change.expected_sha256, sha)
        planned.sha256 = sha
        planned.size = src_st.st_size
        if dry_run:
            return
        fd = open_entry(source)
        try:
            require_regular(os.fstat(fd), source, action)
            writer = self._staging(planned, st, st or src_st, sha)
            await copy_into(writer, source, fd, src_st, self.limits, expected_sha256=None)
        finally:
            os.close(fd)
        if writer.sha256 != sha:
            raise ConcurrentChangeError(
                f"{source.display} changed while it was being copied; retry"
            )
        assert planned.staged is not None
        await run_blocking(self.limits.inline(writer.size), planned.staged.sync)
        self._keep_old_version(planned, st)

    def _staging(
        self,
        planned: _Planned,
        st: os.stat_result | None,
        template: os.stat_result | None,
        sha: str | None = None,
        *,
        known_sha256: str | None = None,
    ) -> AtomicWriter:
        """The single-file writer's pending file, under a member name; published by apply.

        ``known_sha256``: the content was hashed already (for the name), so the writer need not.
        """
        target = planned.target
        self._claim(target)
        staged = PendingFile(
            target,
            durability=self.durability,
            replace=True,
            name_for=functools.partial(
                member_name_for, target.name, self.txid, "new", sha or planned.sha256
            ),
        )
        planned.staged = staged
        staged.create(template)
        if planned.change.mode is not None:
            os.fchmod(staged.fd, planned.change.mode)
        return AtomicWriter(staged, self.limits, replaced=st is not None, known_sha256=known_sha256)

    def _keep_old_version(self, planned: _Planned, st: os.stat_result | None) -> None:
        """A backup of the version being replaced, or a second name of the new file."""
        target, staged = planned.target, planned.staged
        assert staged is not None
        if st is not None:
            planned.backup = self._backup(target, "old", planned.sha256)
        else:
            planned.created_link = self._link(target, staged.temp_name, "crt", planned.sha256)

    def _backup(self, target: Location, role: Role, new_sha256: str | None = None) -> _Backup:
        """A hard link to the current version, under a member name, locked while in flight.

        A symlink cannot be opened to lock it; its backup is a link to the link (fd -1).
        """
        self._claim(target)
        fd = -1 if _is_link(target) else open_entry(target)
        try:
            backup = self._link(target, target.name, role, new_sha256)
        except BaseException:
            _close(fd)
            raise
        if fd >= 0:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        backup.fd = fd
        return backup

    def _link(self, target: Location, existing: str, role: Role, new_sha256: str | None) -> _Backup:
        """A member that is a hard link to ``existing`` in the target's directory."""
        return self._link_at(target.dir_fd, existing, target, role, new_sha256)

    def _link_from(self, source: Location, target: Location, role: Role) -> _Backup:
        """A member next to ``target`` that is a hard link to ``source`` (maybe elsewhere)."""
        return self._link_at(source.dir_fd, source.name, target, role, None)

    def _link_at(
        self, src_dir_fd: int, existing: str, target: Location, role: Role, sha: str | None
    ) -> _Backup:
        for _ in range(100):
            name = member_name_for(target.name, self.txid, role, sha)
            try:
                os.link(
                    existing,
                    name,
                    src_dir_fd=src_dir_fd,
                    dst_dir_fd=target.dir_fd,
                    follow_symlinks=False,
                )
            except FileExistsError:
                continue
            except OSError as err:
                if err.errno == errno.EXDEV:
                    raise _CrossDevice from err
                raise from_os_error(err, target.display, "back up") from err
            return _Backup(target, name, -1)
        raise ConcurrentChangeError(f"no free backup name next to {target.display}")

    def _claim(self, location: Location) -> None:
        """Before the first member in a directory: a symlink there to the journal record.

        A recovery run with another state directory reads it to learn where the set's journal
        lives, and leaves the set's files alone instead of deleting them.
        """
        st = os.fstat(location.dir_fd)
        key = (st.st_dev, st.st_ino)
        if key in self._claimed:
            return
        if not self._claimed:  # where the claim points must exist for a sweep to read it
            try:
                fsutil.make_dirs_durably(self.journal_dir)
            except OSError as err:
                raise state_dir_error(err, self.journal_dir, "create") from err
        name = claim_name_for(self.txid)
        try:
            os.symlink(self.record_path, name, dir_fd=location.dir_fd)
        except OSError as err:
            raise from_os_error(err, location.display, "stage a change to") from err
        self._claimed[key] = location

    def _drop_claims(self) -> None:
        """Remove the claims (every member is gone by now); never raises."""
        name = claim_name_for(self.txid)
        for location in self._claimed.values():
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=location.dir_fd)
        self._claimed.clear()

    def _record(self, state: State) -> JournalRecord:
        keyed = None
        final = state != "preparing"  # the record recovery rolls forward from
        if final and self.receipt is not None:
            keyed = self.receipt.as_record(self.outcomes(applied=True).to_json())
        recorded = self.history is not None and self.history.enabled
        return JournalRecord(
            txid=self.txid,
            state=state,
            pid=os.getpid(),
            created=time.time(),
            durability=self.durability.value,
            ops=tuple(op for p in self.planned for op in p.records()),
            created_dirs=tuple(self.created_dirs),
            idempotency=keyed,
            history=self.history_entry() if final and recorded else None,
            database=self.sql.record() if state == "prepared" and self.sql is not None else None,
        )

    def record_history(self) -> None:
        """Write the set's entry, durably, before its journal goes (raises StateDirError)."""
        if self.history is None or not self.history.enabled:
            return
        rows = self.history_rows()
        kept = []
        for planned in self.planned:
            for content, member in planned.kept:
                name = member.rsplit("/", 1)[1]
                kept.append(
                    KeptContent(
                        content.sha256,
                        content.size,
                        data=content.data,
                        dir_fd=planned.target.dir_fd,
                        name=name,
                    )
                )
        self.history.store.record(
            self.change_id,
            self.history_op,
            rows,
            kept,
            durability=self.durability,
            pending=False,
            undoes=self.undoes,
            audit=self.sql.audit() if self.sql is not None else None,
        )
        crash_point("changeset.history_recorded")
        self.history.after_change()

    # -- commit and apply ------------------------------------------------------------------

    def commit(self, state: State = "committed") -> None:
        """Make the committed record durable: from here on the change is rolled forward.

        ``prepared`` (a set with a database step): the record names the database, whose
        COMMIT of the set's marker, right after, is the commit point instead.
        Raises (with nothing applied) when a staged entry or the record cannot be made durable.
        """
        if self.durability is Durability.FULL:
            directories = {p.target.dir_fd: p.target.display for p in self.planned}
            # A move across file systems also keeps its source's backup (and a claim) beside
            # the source: without it durable, recovery could not delete the source.
            directories |= {
                p.source.dir_fd: p.source.display
                for p in self.planned
                if p.source is not None and p.source_backup is not None
            }
            for directory in fsutil.distinct_directories(directories):
                try:
                    fsutil.sync_directory(directory)
                except OSError as err:
                    where = directories[directory]
                    raise from_os_error(err, where, "stage a change to") from err
        crash_point("changeset.prepared")
        if self.journal is None:
            self.journal = JournalFile(self.journal_dir, self.txid, self.durability)
        self.journal.write(self._record(state))
        crash_point("changeset.committed" if state == "committed" else "changeset.record_written")

    def apply(self) -> None:
        """Perform every rename/unlink in order (inline: nothing can cancel half of it).

        An OSError here leaves the set committed but not finished (recovery finishes it).
        """
        for planned in self.planned:
            crash_point("changeset.apply")
            if planned.change.op == "rmdir":  # its backups of deleted files go with it
                target = planned.target
                remove_set_files(target.dir_fd, target.name, self.txid)
            _apply_op(planned)

    def sync_applied(self) -> None:
        """Make the renames durable; an OSError here means applied, durability unknown."""
        if self.durability is Durability.FULL:
            touched = [p.target.dir_fd for p in self.planned]
            touched += [p.source.dir_fd for p in self.planned if p.source and p.change.op == "move"]
            for directory in fsutil.distinct_directories(touched):
                fsutil.sync_directory(directory)
        crash_point("changeset.applied")

    def finish(self) -> None:
        """Remove the backups and claims, then the record: the change set is over."""
        for planned in self.planned:
            for member in planned.members:
                if member is not None:
                    member.discard()
            if planned.staged is not None:
                planned.staged.committed = True  # renamed into place by apply()
                planned.staged.discard()  # closes it, releasing the lock
        self._drop_claims()
        if self.journal is not None:
            journal, self.journal = self.journal, None
            try:
                journal.remove()
            except OSError as err:  # applied and durable: recovery removes the record later
                logger.warning("change set %s: removing its journal failed: %s", self.txid, err)
        crash_point("changeset.finished")

    def release(self) -> None:
        """Undecided whether the set committed: close every member and the record, which
        stay for recovery to decide from the database's marker (nothing is undone)."""
        self.released = True
        for planned in self.planned:
            for member in planned.members:
                if member is not None:
                    _close(member.fd)
                    member.fd = -1
            if planned.staged is not None:
                planned.staged.committed = True  # closed, not removed
                planned.staged.discard()
        if self.journal is not None:
            self.journal.close()
            self.journal = None

    def undo_prepare(self) -> None:
        """Before the commit point: remove staged files, backups and claims, and created dirs.

        Never raises: it runs on the way out of a failure that the caller reports.
        """
        if self.released:
            return  # left for recovery to decide: staged files may be its only copy
        for planned in reversed(self.planned):
            for member in planned.members:
                if member is not None:
                    member.discard()
            if planned.staged is not None:
                planned.staged.discard()
        self._drop_claims()
        for parent, name in reversed(self.created_dirs):
            with (
                contextlib.suppress(OSError, AtomicToolsError),
                self.sandbox.resolve(parent) as location,
            ):
                dir_fd = os.open(
                    location.name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=location.dir_fd
                )
                try:
                    os.rmdir(name, dir_fd=dir_fd)  # only if still empty
                finally:
                    os.close(dir_fd)
        if self.journal is not None:
            journal, self.journal = self.journal, None
            with contextlib.suppress(OSError):
                journal.remove()

    def outcomes(self, applied: bool) -> ChangeSetResult:
        done = [
            (
                p.index,
                ChangeOutcome(
                    op=p.change.op,
                    path=p.virtual or p.target.display,
                    source=p.source.display if p.source is not None else None,
                    sha256=p.sha256,
                    diff=p.diff,
                    created=not p.existed,
                    size=p.size,
                    previous_sha256=p.previous_sha256,
                    type=p.type,
                ),
            )
            for p in self.planned
        ]
        if self.sql is not None:
            done += [(s.index, s.outcome()) for s in self.sql.steps]
        return ChangeSetResult(
            tuple(outcome for _index, outcome in sorted(done, key=lambda pair: pair[0])),
            applied=applied,
            txid=self.txid if applied else None,
            change_id=self.change_id if applied and self._recorded else None,
        )

    @property
    def _recorded(self) -> bool:
        return self.history is not None and self.history.enabled


def _refuse_removed_directory(*locations: Location | None) -> None:
    """The paths were resolved before the locks were taken (so later changes can name files in
    directories the set creates); a directory removed meanwhile would swallow the change."""
    for location in locations:
        if location is not None and os.fstat(location.dir_fd).st_nlink == 0:
            raise ConcurrentChangeError(
                f"the directory of {location.display} was removed while this change set waited "
                "for its turn; retry"
            )


def _label(index: int, total: int, op: str) -> str:
    """Where an error happened; a set of one change (a keyed single-file call) needs none."""
    return f"change {index} of {total} ({op}): " if total > 1 else ""


def _close(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


def _is_link(location: Location) -> bool:
    st = location.lstat()
    return st is not None and stat.S_ISLNK(st.st_mode)


def _apply_op(planned: _Planned) -> None:
    target = planned.target
    op = planned.change.op
    if planned.staged is not None:  # write, edit, copy, a move across file systems
        os.replace(
            planned.staged.temp_name,
            target.name,
            src_dir_fd=target.dir_fd,
            dst_dir_fd=target.dir_fd,
        )
        if planned.source_backup is not None:
            assert planned.source is not None
            os.unlink(planned.source.name, dir_fd=planned.source.dir_fd)
    elif op == "delete":
        os.unlink(target.name, dir_fd=target.dir_fd)
    elif op == "rmdir":  # emptied by the changes before it (an undo orders them so)
        os.rmdir(target.name, dir_fd=target.dir_fd)
    elif op == "move":  # one rename on one file system
        source = planned.source
        assert source is not None
        os.rename(source.name, target.name, src_dir_fd=source.dir_fd, dst_dir_fd=target.dir_fd)


async def apply_change_set(
    runner: ChangeSetRunner, *, dry_run: bool, progress: Progress | None
) -> ChangeSetResult:
    """Run the protocol on a planned runner (the caller holds the path locks); closes it."""
    try:
        committed = False
        try:
            await runner.prepare(progress, dry_run)
            if runner.sql is not None:
                committed = await _commit_with_database(runner, dry_run, progress)
            if dry_run:
                return runner.outcomes(applied=False)
            if runner.sql is None:
                await step("changeset.commit")
                _history_ready(runner)
                runner.commit()
                committed = True
        finally:
            if not committed and not runner.released:
                runner.undo_prepare()
        # Committed: the set will happen (recovery rolls it forward), so its history entry is
        # written now, while every backup it keeps content from is still in place.
        unrecorded = _record_history(runner)
        try:
            runner.apply()
        except OSError as err:
            if runner.journal is not None:
                runner.journal.close()  # unlocked: `recover` (or a later call) may finish it
            raise RecoveryNeededError(
                f"the change set was committed but applying it failed ({err.strerror}); its "
                f"journal {runner.txid} is kept, and the change set is finished by the next "
                "call that touches its files, by `atomictools recover`, or at the next start"
            ) from err
        unsynced: OSError | None = None
        try:
            runner.sync_applied()
        except OSError as err:
            unsynced = err  # applied: the set is finished; the message says what is unknown
        if unrecorded is not None:
            if runner.journal is not None:
                runner.journal.close()  # unlocked: recovery records the entry, then finishes
            raise RecoveryNeededError(
                f"the change set was applied, but its history entry could not be recorded: "
                f"{unrecorded.message}; its journal {runner.txid} is kept so that `atomictools "
                "recover` (or the next start) records it once that is fixed"
            ) from unrecorded
        _record_key(runner)
        runner.finish()
        if runner.sql is not None:  # the set is over: its marker is not needed any more
            await runner.sql.database.drop_marker(runner.txid)
            crash_point("changeset.marker_dropped")
        if unsynced is not None:
            raise DurabilityUnknownError(
                "the change set was applied, but syncing a directory failed "
                f"({unsynced.strerror}); the change may not survive a power loss"
            ) from unsynced
        if progress is not None:
            with anyio.CancelScope(shield=True):
                await progress(2 * runner.total, 2 * runner.total)
        return runner.outcomes(applied=True)
    finally:
        runner.close_locations()


class _DryRun(Exception):
    """Leaves the database transaction of a dry run, which rolls it back."""


def _history_ready(runner: ChangeSetRunner) -> None:
    """A history that cannot take the set's entry refuses the set before its commit point."""
    if runner.history is not None and runner.history.enabled:
        runner.history.store.ready()


async def _commit_with_database(
    runner: ChangeSetRunner, dry_run: bool, progress: Progress | None
) -> bool:
    """The commit of a set with database steps; returns whether it committed.

    Inside the database's write transaction: the statements run, the ``prepared`` record
    (naming the database) is made durable, the set's marker is inserted, and the COMMIT,
    shielded, is the single commit point of files and database together. Any exit before
    it rolls the transaction back (the caller then undoes the preparation). A dry run rolls
    the statements back once their results are known.
    """
    assert runner.sql is not None
    database = runner.sql.database
    marked = False
    try:
        async with database.set_transaction() as tx:
            runner.sql.xid = tx.xid
            await runner.run_statements(tx, progress)
            if dry_run:
                raise _DryRun
            await step("changeset.commit")
            _history_ready(runner)
            runner.commit("prepared")
            await tx.mark(runner.txid, runner.record_path)
            marked = True
            crash_point("changeset.marked")
    except _DryRun:
        return False
    except BaseException as err:
        if not marked:
            raise  # rolled back before the COMMIT: the caller undoes the files
        # The COMMIT failed. Whether it reached the database is what the marker says.
        return await _after_failed_commit(runner, err)
    return True


async def _after_failed_commit(runner: ChangeSetRunner, err: BaseException) -> bool:
    """A failed COMMIT. One SQLite says did not happen (a full disk) rolls the set back; one
    whose outcome is unknown (a failed sync) is decided by the marker, read and made final on
    a fresh connection (True: committed).

    When even that cannot be done, the set is left prepared (files staged, record kept) for
    recovery to decide, and ``RecoveryNeededError`` says so.
    """
    assert runner.sql is not None
    if isinstance(err, AtomicToolsError) and not isinstance(err, CommitUnknownError):
        raise err.prefixed("", SET_UNCHANGED)
    database = runner.sql.database
    try:
        present = await database.decide_marker(runner.txid, runner.record_path)
    except AtomicToolsError as check:
        runner.release()
        raise RecoveryNeededError(
            f"COMMIT on database {database.name} failed ({_cause(err)}), and whether it "
            f"happened could not be read back ({check.message}); change set {runner.txid} is "
            "kept as it was prepared, and `atomictools recover` (or the next start, or the "
            "next call that touches its files) finishes or undoes it from the database's answer"
        ) from err
    if present:
        logger.warning("change set %s: COMMIT reported %s, but it happened", runner.txid, err)
        return True
    await database.drop_marker(runner.txid)  # the row the decision wrote: its work is done
    raise DatabaseError(
        f"COMMIT on database {database.name} failed ({_cause(err)}); the change set's marker "
        "is not in the database (read back and made final), so the set did not commit"
    ).prefixed("", SET_UNCHANGED) from err


def _cause(err: BaseException) -> BaseException:
    """SQLite's own error behind ours (whose message would say the outcome is unknown)."""
    return err.__cause__ if isinstance(err, CommitUnknownError) and err.__cause__ else err


def _record_history(runner: ChangeSetRunner) -> StateDirError | None:
    """The set's history entry, right after its commit point (the record carries it too).

    If the store cannot take it, the set is still applied, its journal stays for recovery to
    record the entry, and the error says the change was made (the caller raises it).
    """
    try:
        runner.record_history()
    except StateDirError as err:
        return err
    return None


def _size_of(location: Location) -> int:
    st = location.lstat()
    return st.st_size if st is not None else 0


def _record_key(runner: ChangeSetRunner) -> None:
    """A keyed set records its key before its journal goes (the journal could still do it).

    If the store cannot take it, the journal stays for recovery to record the key, and the
    error says the change was made.
    """
    if runner.receipt is None:
        return
    receipt = runner.receipt
    try:
        IdempotencyStore(Path(receipt.store)).record(
            receipt, runner.outcomes(applied=True).to_json()
        )
    except StateDirError as err:
        if runner.journal is not None:
            runner.journal.close()  # unlocked: recovery records the key and finishes it
        raise RecoveryNeededError(
            f"the change set was applied, but its idempotency key could not be recorded: "
            f"{err.message}; its journal {runner.txid} is kept so that `atomictools recover` "
            "(or the next start) records it once that is fixed"
        ) from err
    crash_point("changeset.key_recorded")
