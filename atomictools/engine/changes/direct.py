"""The direct commit: one change published by one rename (or unlink), then a directory fsync.

Every function here is ``async`` and safe to cancel at any await: before its commit point a
cancel leaves the target untouched and no temp file behind; the commit itself (one rename or
unlink plus the directory fsync) runs inline, so a change that started is finished. The checks
come from ``checks`` and are the same as the journaled commit's. A move that leaves its file
system has no single rename to commit by: the workspace sends it to the journaled commit.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from atomictools.engine.changes import checks
from atomictools.engine.changes.content import copy_into, plan_edit
from atomictools.engine.config import Durability, Limits
from atomictools.engine.durable import fsutil
from atomictools.engine.durable.blocking import run_blocking
from atomictools.engine.durable.steps import step
from atomictools.engine.durable.writer import CommitHook, PendingWrite, open_atomic_writer
from atomictools.engine.errors import (
    AlreadyExistsError,
    AtomicToolsError,
    PartlyDoneError,
    from_os_error,
    not_synced,
)
from atomictools.engine.history.recording import (
    Recording,
    WriteRecording,
    dir_evidence,
    rows_moved,
)
from atomictools.engine.reads.files import read_whole
from atomictools.engine.results import (
    CopyResult,
    DeleteResult,
    EditResult,
    MkdirResult,
    MoveResult,
    Progress,
    WriteResult,
    entry_type,
)
from atomictools.engine.sandbox import Location, MakeDir, Sandbox, open_entry, require_regular
from atomictools.engine.text.edits import Edit


def open_writer(
    location: Location,
    *,
    durability: Durability,
    limits: Limits,
    create_only: bool = False,
    expected_sha256: str | None = None,
    action: str = "write",
    hook: CommitHook | None = None,
) -> PendingWrite:
    """The streaming writer, with a write's preconditions checked before the temp is made."""

    async def precheck(st: os.stat_result | None) -> None:
        checks.check_write(location, st, create_only=create_only)
        await checks.check_sha256(location, st, expected_sha256, limits, action)

    return open_atomic_writer(
        location,
        durability=durability,
        create_only=create_only,
        limits=limits,
        precheck=precheck,
        hook=hook,
    )


async def write(
    location: Location,
    data: bytes,
    *,
    durability: Durability,
    limits: Limits,
    create_only: bool = False,
    expected_sha256: str | None = None,
    progress: Progress | None = None,
    action: str = "write",
    hook: CommitHook | None = None,
    recording: Recording | None = None,
) -> WriteResult:
    """Replace (or create) the file with ``data`` atomically; ``progress`` hears of each chunk;
    ``recording`` (or a ready ``hook``) records it in the history at its commit point."""
    if hook is None and recording is not None:
        hook = WriteRecording(recording, location)
    async with open_writer(
        location,
        durability=durability,
        limits=limits,
        create_only=create_only,
        expected_sha256=expected_sha256,
        action=action,
        hook=hook,
    ) as writer:
        if progress is None or len(data) <= limits.chunk_bytes:
            # A recorded write fsyncs at its commit point, alongside the history entry's fsync.
            await writer.write(data, last=hook is None)
        else:
            view, chunk = memoryview(data), limits.chunk_bytes
            for start in range(0, len(view), chunk):
                end = min(start + chunk, len(view))
                await writer.write(view[start:end], last=end == len(view))
                await progress(end, len(view))
    return WriteResult(
        path=location.display, size=writer.size, sha256=writer.sha256, created=not writer.replaced
    )


async def edit(
    location: Location,
    edits: Sequence[Edit],
    *,
    durability: Durability,
    limits: Limits,
    dry_run: bool = False,
    expected_sha256: str | None = None,
    recording: Recording | None = None,
) -> EditResult:
    """Apply exact replacements all-or-nothing, keeping encoding, BOM and line endings."""
    checks.check_edit(location, location.lstat(), edits, limits)
    data = await read_whole(location, limits)
    # Decoding, matching and diffing a large file is CPU work: off the event loop.
    before_sha, new_data, diff, after_sha = await run_blocking(
        limits.inline(len(data)), plan_edit, data, edits, location, expected_sha256
    )
    await step("edit.planned")
    if not dry_run and new_data != data:
        # expected_sha256=before_sha: a writer in another process since our read loses nothing.
        await write(
            location,
            new_data,
            durability=durability,
            limits=limits,
            expected_sha256=before_sha,
            action="edit",
            hook=WriteRecording(recording, location, known=data, diff=diff)
            if recording is not None
            else None,
        )
    return EditResult(
        path=location.display,
        diff=diff,
        applied=not dry_run,
        sha256=after_sha,
        previous_sha256=before_sha,
        size=len(new_data),
    )


async def move(
    source: Location,
    destination: Location,
    *,
    overwrite: bool,
    durability: Durability,
    limits: Limits,
    expected_sha256: str | None = None,
    recording: Recording | None = None,
) -> MoveResult:
    """Rename a file, symlink or directory on one file system; without ``overwrite`` an
    existing target is kept: the no-clobber check is the rename itself (``RENAME_NOREPLACE``)."""
    src_st = source.lstat()
    dst_st = destination.lstat()
    checks.check_move(source, src_st, destination, dst_st, overwrite=overwrite)
    assert src_st is not None  # refused by the checks
    await checks.check_sha256(source, src_st, expected_sha256, limits, "move")
    await step("move.before")
    if recording is not None:
        moved = await recording.capture(source, keep=False)
        replaced = await recording.capture(destination, keep=True)
        for row in rows_moved(source, destination, moved, replaced):
            recording.add(row)
        recording.evidence.append(dir_evidence(destination, src_st.st_ino, replaced.ino))
        await _begin(recording)
    try:  # one rename, inline: no cancel can split it
        if overwrite:
            os.replace(
                source.name,
                destination.name,
                src_dir_fd=source.dir_fd,
                dst_dir_fd=destination.dir_fd,
            )
        else:
            fsutil.rename_noreplace(
                source.dir_fd, source.name, destination.dir_fd, destination.name
            )
    except OSError as err:
        if recording is not None:
            recording.abandoned()
        if err.errno == errno.EXDEV and stat.S_ISREG(src_st.st_mode):
            raise CrossesMounts from err
        raise _move_error(err, source, destination) from err
    if recording is not None:
        recording.committed()
    if durability is Durability.FULL:
        try:
            for directory in fsutil.distinct_directories((destination.dir_fd, source.dir_fd)):
                fsutil.sync_directory(directory)
        except OSError as err:
            raise not_synced(f"{source.display} was moved to {destination.display}", err) from err
    return MoveResult(
        source=source.display, destination=destination.display, replaced=dst_st is not None
    )


async def _begin(recording: Recording) -> None:
    """Record the entry just before an inline commit; a cancel or failure discards it."""
    try:
        await recording.begin()
        await step("history.before_commit")
    except BaseException:
        recording.abandoned()
        raise


class CrossesMounts(Exception):
    """The rename of a file failed with EXDEV although both sides report one device (two
    mounts of one file system): the move needs the journaled copy-and-delete instead."""


def _move_error(err: OSError, source: Location, destination: Location) -> AtomicToolsError:
    """A rename the checks expected to work failed: say why, in the checks' words."""
    where = f"{source.display} to {destination.display}"
    if err.errno == errno.EEXIST:
        return AlreadyExistsError(
            f"cannot move {where}: the destination exists (created meanwhile); pass overwrite "
            "to replace it"
        )
    if err.errno == errno.EXDEV:  # two mounts of one file system (a bind mount): no rename
        return checks.only_files_cross(source, destination)
    return from_os_error(err, f"{source.display} -> {destination.display}", "move")


async def copy(
    source: Location,
    destination: Location,
    *,
    overwrite: bool,
    durability: Durability,
    limits: Limits,
    expected_sha256: str | None = None,
    recording: Recording | None = None,
) -> CopyResult:
    """Copy a regular file through a temp next to the destination (streamed, bounded memory)."""
    src_st = source.lstat()
    dst_st = destination.lstat()
    checks.check_copy(source, src_st, destination, dst_st, overwrite=overwrite)
    fd = open_entry(source)
    try:
        src_st = require_regular(os.fstat(fd), source, "copy")
        async with open_atomic_writer(
            destination,
            durability=durability,
            create_only=dst_st is None,
            mode_from=src_st,
            limits=limits,
            hook=WriteRecording(recording, destination) if recording is not None else None,
        ) as writer:
            await copy_into(writer, source, fd, src_st, limits, expected_sha256=expected_sha256)
    finally:
        os.close(fd)
    return CopyResult(
        source=source.display,
        destination=destination.display,
        size=writer.size,
        sha256=writer.sha256,
        replaced=dst_st is not None,
    )


async def delete(
    location: Location,
    *,
    durability: Durability,
    limits: Limits,
    expected_sha256: str | None = None,
    recording: Recording | None = None,
) -> DeleteResult:
    """Remove a file or a symlink (the link, not its target); directories are refused."""
    st = location.lstat()
    checks.check_delete(location, st)
    assert st is not None
    await checks.check_sha256(location, st, expected_sha256, limits, "delete")
    await step("delete.before")
    if recording is not None:
        before = await recording.capture(location, keep=True)
        evidence = dir_evidence(location, None, before.ino)
        recording.add(before.row(str(location.abspath), "absent"), evidence)
        await _begin(recording)
    try:  # one unlink, inline: no cancel can split it
        os.unlink(location.name, dir_fd=location.dir_fd)
    except OSError as err:
        if recording is not None:
            recording.abandoned()
        raise from_os_error(err, location.display, "delete") from err
    if recording is not None:
        recording.committed()
    if durability is Durability.FULL:
        try:
            fsutil.sync_directory(location.dir_fd)
        except OSError as err:
            raise not_synced(f"{location.display} was deleted", err) from err
    return DeleteResult(path=location.display, type=entry_type(st))


def directory_maker(durability: Durability) -> MakeDir:
    """A ``make_dir`` for the sandbox walk: mkdir, then make the new entry durable."""

    def make(dir_fd: int, name: str, parent: Path | None = None) -> None:
        os.mkdir(name, 0o777, dir_fd=dir_fd)
        if durability is Durability.FULL:
            try:
                fsutil.sync_directory(dir_fd)
            except OSError as err:
                shown = f"{parent}/{name}" if parent is not None else name
                raise not_synced(f"the directory {shown} was created", err) from err

    return make


def make_directories(
    sandbox: Sandbox, path: str, durability: Durability, recording: Recording | None = None
) -> MkdirResult:
    """``mkdir -p`` inside the roots, synchronously (a cancel never splits it); a stop half-way
    says which parents it made, since they are kept. ``recording``: each directory is in the
    history entry (durably) before it is made, and taken out again if making it fails."""
    maker = directory_maker(durability)
    made: list[str] = []

    def make(dir_fd: int, name: str, parent: Path) -> None:
        if recording is not None:
            recording.add_directory(dir_fd, parent / name)
        try:
            maker(dir_fd, name, parent)
        except BaseException:
            if recording is not None:
                recording.drop_directory(parent / name)
            raise
        made.append(str(parent / name))

    try:
        with sandbox.resolve(path, make_dir=make) as location:
            st = location.lstat()
            checks.check_mkdir(location, st)
            if st is not None:
                if recording is not None and made:
                    recording.committed()
                return MkdirResult(location.display, created=False)
            try:
                make(location.dir_fd, location.name, location.abspath.parent)
            except FileExistsError:
                if recording is not None and made:
                    recording.committed()
                return MkdirResult(location.display, created=False)
            except OSError as err:
                raise from_os_error(err, location.display, "create directory") from err
            if recording is not None:
                recording.committed()
            return MkdirResult(location.display, created=True)
    except AtomicToolsError as err:
        if recording is not None and made:
            recording.committed()  # the parents made are kept, and so is their entry
        if made and not err.changed:
            raise PartlyDoneError(
                f"{err.message}; the parent directories {', '.join(made)} were created before "
                "that and are kept"
            ) from err
        raise


def needs_journal(source: Location, destination: Location) -> bool:
    """A regular file moving to another file system: a copy and a delete, journaled together."""
    st = source.lstat()
    return (
        st is not None
        and stat.S_ISREG(st.st_mode)
        and checks.across_devices(source, st, destination)
    )
