"""Atomic single-file operations on resolved Locations: read, write, edit, move, copy, delete.

Every function here is ``async`` and safe to cancel at any await: before its commit point a
cancel leaves the target untouched and no temp file behind; the commit itself (one rename or
unlink plus the directory fsync) runs shielded, so a change that started is finished. Blocking
system calls run in worker threads so large files do not stall the event loop. Paths have been
confined by the sandbox already; every call here goes through the Location's directory fd.
"""

from __future__ import annotations

import errno
import hashlib
import mimetypes
import os
import stat
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from atomictools.engine.config import Durability, Limits
from atomictools.engine.durable import fsutil
from atomictools.engine.durable.blocking import run_blocking
from atomictools.engine.durable.steps import step
from atomictools.engine.durable.writer import check_expected_sha256, open_atomic_writer
from atomictools.engine.errors import (
    AlreadyExistsError,
    ConcurrentChangeError,
    InvalidArgumentError,
    NotFoundError,
    PartlyDoneError,
    PreconditionFailedError,
    TextEncodingError,
    TooLargeError,
    WrongTypeError,
    from_os_error,
    not_synced,
)
from atomictools.engine.results import (
    BytesRead,
    CopyResult,
    DeleteResult,
    EditResult,
    EntryType,
    MoveResult,
    Progress,
    TextRead,
    WriteResult,
)
from atomictools.engine.sandbox import Location, MakeDir, open_entry, require_regular
from atomictools.engine.text.edits import Edit, apply_edits, unified_diff
from atomictools.engine.text.textcodec import decode, encode, incremental_decoder, sniff_encoding


def _open_regular(location: Location, action: str) -> tuple[int, os.stat_result]:
    fd = open_entry(location)
    try:
        st = require_regular(os.fstat(fd), location, action)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


async def read_whole(location: Location, limits: Limits, *, stable: bool = False) -> bytes:
    """Read a whole regular file, refusing one larger than the limit before reading it.

    ``stable``: refuse a file that another process changes (truncates, appends to) while it is
    read, judged by its size before and after (a copy must not be short).
    """
    limit = limits.max_read_bytes
    fd, st = _open_regular(location, "read")
    try:
        if st.st_size > limit:
            raise TooLargeError(
                f"{location.display} is {st.st_size} bytes, more than the {limit}-byte limit "
                "for a whole read; read part of it with head or tail"
            )
        parts: list[bytes] = []
        size = 0
        inline = limits.inline(st.st_size)
        while chunk := await run_blocking(inline, os.read, fd, limits.chunk_bytes):
            size += len(chunk)
            if size > limit:
                raise TooLargeError(f"{location.display} grew past the {limit}-byte limit")
            parts.append(chunk)
            await step("read.chunk")
        if stable:
            refuse_if_resized(location, st, os.fstat(fd), size)
        return b"".join(parts)
    finally:
        os.close(fd)


def refuse_if_resized(
    location: Location, before: os.stat_result, after: os.stat_result, read: int
) -> None:
    """The file was changed by someone else while we read it: what we read is not a version."""
    if read != before.st_size or after.st_size != before.st_size:
        raise ConcurrentChangeError(
            f"{location.display} changed while it was being read ({read} bytes read, "
            f"{before.st_size} at the start, {after.st_size} now); retry"
        )


async def read_bytes(location: Location, limits: Limits) -> BytesRead:
    data = await read_whole(location, limits)
    mime, _ = mimetypes.guess_type(location.name)
    return BytesRead(
        path=location.display,
        data=data,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        mime_type=mime or "application/octet-stream",
    )


async def read_text(
    location: Location, limits: Limits, *, head: int | None = None, tail: int | None = None
) -> TextRead:
    """Read a text file whole, or only its first ``head`` / last ``tail`` lines (streamed)."""
    if head is not None and tail is not None:
        raise InvalidArgumentError("give head or tail, not both")
    for name, value in (("head", head), ("tail", tail)):
        if value is not None and value < 0:
            raise InvalidArgumentError(f"{name} must be zero or more lines, not {value}")
    if head is None and tail is None:
        data = await read_whole(location, limits)
        text, fmt = await run_blocking(limits.inline(len(data)), decode, data, location.display)
        return TextRead(
            path=location.display,
            content=text,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            encoding=fmt.encoding,
            newline=fmt.newline_name,
            bom=bool(fmt.bom),
        )
    return await _read_lines(location, limits, head=head, tail=tail)


class _LineCollector:
    """Splits streamed text into lines, keeping the first ``head`` or the last ``tail``."""

    def __init__(self, head: int | None, tail: int | None) -> None:
        self.head = head
        self.kept: deque[str] = deque(maxlen=tail)
        self.pending = ""
        self.total = 0

    def feed(self, text: str, final: bool) -> None:
        text = self.pending + text
        lines = text.splitlines(keepends=True)
        self.pending = ""
        if lines and not final and (lines[-1][-1] not in "\r\n" or lines[-1].endswith("\r")):
            self.pending = lines.pop()  # incomplete, or a CR that may be followed by LF
        for line in lines:
            self.total += 1
            if self.head is None or len(self.kept) < self.head:
                self.kept.append(line)


async def _read_lines(
    location: Location, limits: Limits, *, head: int | None, tail: int | None
) -> TextRead:
    fd, st = _open_regular(location, "read")
    inline = limits.inline(st.st_size)
    try:
        digest = hashlib.sha256()
        collector = _LineCollector(head, tail)
        first = await run_blocking(inline, os.read, fd, limits.chunk_bytes)
        encoding, bom = sniff_encoding(first)
        if not bom and b"\x00" in first:
            raise TextEncodingError(
                f"{location.display} looks like a binary file (it contains NUL bytes); "
                "read it as bytes/media instead of text"
            )
        if not bom:
            try:
                first.decode("utf-8")
            except UnicodeDecodeError as err:
                if err.start < len(first) - 3:  # not just a character cut at the chunk's end
                    encoding = "latin-1"
        decoder = incremental_decoder(encoding)
        chunk, size, newline = first[len(bom) :], len(first), ""
        digest.update(first)
        while True:
            text = decoder.decode(chunk, final=not chunk)
            newline = newline or _first_newline(text)
            collector.feed(text, final=not chunk)
            if not chunk:
                break
            await step("read.chunk")
            chunk = await run_blocking(inline, os.read, fd, limits.chunk_bytes)
            digest.update(chunk)
            size += len(chunk)
        content = "".join(collector.kept)
        return TextRead(
            path=location.display,
            content=content,
            size=size,
            sha256=digest.hexdigest(),
            encoding=encoding,
            newline={"\r\n": "CRLF", "\r": "CR"}.get(newline, "LF"),
            bom=bool(bom),
            partial=len(collector.kept) < collector.total,
        )
    finally:
        os.close(fd)


def _first_newline(text: str) -> str:
    for index, char in enumerate(text):
        if char == "\n":
            return "\n"
        if char == "\r":
            return "\r\n" if text[index + 1 : index + 2] == "\n" else "\r"
    return ""


async def write(
    location: Location,
    data: bytes,
    *,
    durability: Durability,
    limits: Limits,
    create_only: bool = False,
    expected_sha256: str | None = None,
    progress: Progress | None = None,
) -> WriteResult:
    """Replace (or create) the file with ``data`` atomically; ``progress`` hears of each chunk."""
    async with open_atomic_writer(
        location,
        durability=durability,
        create_only=create_only,
        expected_sha256=expected_sha256,
        limits=limits,
    ) as writer:
        if progress is None or len(data) <= limits.chunk_bytes:
            await writer.write(data, last=True)
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
) -> EditResult:
    """Apply exact replacements all-or-nothing, keeping encoding, BOM and line endings."""
    if not edits:
        raise InvalidArgumentError("edits is empty; give at least one {oldText, newText}")
    if len(edits) > limits.max_edits:
        raise TooLargeError(
            f"{len(edits)} edits in one call is more than the limit of {limits.max_edits}; "
            "split them, or write the whole file"
        )
    data = await read_whole(location, limits)
    # Decoding, matching and diffing a large file is CPU work: off the event loop.
    before_sha, new_data, diff, after_sha = await run_blocking(
        limits.inline(len(data)), plan_edit, data, edits, location.display, expected_sha256
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
        )
    return EditResult(
        path=location.display,
        diff=diff,
        applied=not dry_run,
        sha256=after_sha,
        previous_sha256=before_sha,
        size=len(new_data),
    )


def plan_edit(
    data: bytes, edits: Sequence[Edit], display: str, expected_sha256: str | None
) -> tuple[str, bytes, str, str]:
    """The pure part of an edit: (sha256 before, new bytes, unified diff, sha256 after)."""
    before_sha = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and expected_sha256.lower() != before_sha:
        raise PreconditionFailedError(
            f"cannot edit {display}: it changed since it was read "
            f"(expectedSha256 {expected_sha256}, current sha256 {before_sha}); "
            "read it again, then retry with the current sha256",
            current_sha256=before_sha,
        )
    text, fmt = decode(data, display)
    new_text = apply_edits(text, edits, fmt, display)
    new_data = encode(new_text, fmt, display)
    diff = unified_diff(text, new_text, display)
    return before_sha, new_data, diff, hashlib.sha256(new_data).hexdigest()


def _refuse_root(location: Location, action: str) -> None:
    if location.is_root:
        raise InvalidArgumentError(f"cannot {action} an allowed root directory itself")


def entry_type(st: os.stat_result) -> EntryType:
    if stat.S_ISREG(st.st_mode):
        return "file"
    if stat.S_ISDIR(st.st_mode):
        return "directory"
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    return "other"


async def move(
    source: Location,
    destination: Location,
    *,
    overwrite: bool,
    durability: Durability,
    limits: Limits,
    expected_sha256: str | None = None,
) -> MoveResult:
    """Rename a file, symlink or directory; without ``overwrite`` an existing target is kept.

    The no-clobber check is the rename itself (``RENAME_NOREPLACE``), not a racy exists-check.
    Across file systems a regular file is copied atomically and then its source removed.
    """
    _refuse_root(source, "move")
    _refuse_root(destination, "replace")
    src_st = source.lstat()
    if src_st is None:
        raise NotFoundError(f"cannot move {source.display}: it does not exist (check the path)")
    dst_st = destination.lstat()
    if dst_st is not None and not overwrite:
        raise AlreadyExistsError(
            f"cannot move {source.display} to {destination.display}: the destination exists; "
            "pass overwrite to replace it, or choose another name"
        )
    await _check_file_sha256(source, src_st, expected_sha256, limits, "move")
    await step("move.before")
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
        if err.errno == errno.EXDEV and stat.S_ISREG(src_st.st_mode):
            await _move_across_devices(source, destination, overwrite, durability, limits)
        elif err.errno == errno.EXDEV:
            raise WrongTypeError(
                f"cannot move {source.display} to {destination.display}: they are on different "
                "file systems and only files can be moved across them"
            ) from err
        elif err.errno == errno.EEXIST:
            raise AlreadyExistsError(
                f"cannot move {source.display} to {destination.display}: the destination "
                "exists (created meanwhile); pass overwrite to replace it"
            ) from err
        elif err.errno == errno.EINVAL:
            raise InvalidArgumentError(
                f"cannot move {source.display} into itself ({destination.display})"
            ) from err
        else:
            raise from_os_error(err, f"{source.display} -> {destination.display}", "move") from err
    else:
        if durability is Durability.FULL:
            try:
                for directory in fsutil.distinct_directories((destination.dir_fd, source.dir_fd)):
                    fsutil.sync_directory(directory)
            except OSError as err:
                raise not_synced(
                    f"{source.display} was moved to {destination.display}", err
                ) from err
    return MoveResult(
        source=source.display, destination=destination.display, replaced=dst_st is not None
    )


async def _move_across_devices(
    source: Location,
    destination: Location,
    overwrite: bool,
    durability: Durability,
    limits: Limits,
) -> None:
    await copy(source, destination, overwrite=overwrite, durability=durability, limits=limits)
    try:
        os.unlink(source.name, dir_fd=source.dir_fd)
    except OSError as err:
        raise PartlyDoneError(
            f"{source.display} was copied to {destination.display} (another file system), but "
            f"removing {source.display} failed ({err.strerror}); both exist now: delete "
            f"{source.display} to finish the move"
        ) from err
    if durability is Durability.FULL:
        try:
            fsutil.sync_directory(source.dir_fd)
        except OSError as err:
            raise not_synced(f"{source.display} was moved to {destination.display}", err) from err


async def copy(
    source: Location,
    destination: Location,
    *,
    overwrite: bool,
    durability: Durability,
    limits: Limits,
    expected_sha256: str | None = None,
) -> CopyResult:
    """Copy a regular file through a temp next to the destination (streamed, bounded memory).

    ``expected_sha256`` is checked against the very bytes copied, before the copy appears.
    """
    _refuse_root(destination, "replace")
    fd, src_st = _open_regular(source, "copy")
    try:
        dst_st = destination.lstat()
        if dst_st is not None:
            if (dst_st.st_dev, dst_st.st_ino) == (src_st.st_dev, src_st.st_ino):
                raise InvalidArgumentError(
                    f"cannot copy {source.display} onto itself ({destination.display})"
                )
            if not overwrite:
                raise AlreadyExistsError(
                    f"cannot copy {source.display} to {destination.display}: the destination "
                    "exists; pass overwrite to replace it, or choose another name"
                )
        inline = limits.inline(src_st.st_size)
        async with open_atomic_writer(
            destination,
            durability=durability,
            create_only=dst_st is None,
            mode_from=src_st,
            limits=limits,
        ) as writer:
            while chunk := await run_blocking(inline, os.read, fd, limits.chunk_bytes):
                await writer.write(chunk)
            refuse_if_resized(source, src_st, os.fstat(fd), writer.size)
            if expected_sha256 is not None and writer.sha256 != expected_sha256.lower():
                raise PreconditionFailedError(
                    f"cannot copy {source.display}: it changed since it was read "
                    f"(expectedSha256 {expected_sha256}, current sha256 {writer.sha256}); "
                    "read it again, then retry with the current sha256",
                    current_sha256=writer.sha256,
                )
    finally:
        os.close(fd)
    return CopyResult(
        source=source.display,
        destination=destination.display,
        size=writer.size,
        sha256=writer.sha256,
        replaced=dst_st is not None,
    )


async def _check_file_sha256(
    location: Location, st: os.stat_result, expected: str | None, limits: Limits, action: str
) -> None:
    if expected is not None and not stat.S_ISREG(st.st_mode):
        raise InvalidArgumentError(
            f"cannot check expectedSha256 of {location.display}: it is not a regular file"
        )
    await check_expected_sha256(location, expected, limits, action)


async def delete(
    location: Location,
    *,
    durability: Durability,
    limits: Limits,
    expected_sha256: str | None = None,
) -> DeleteResult:
    """Remove a file or a symlink (the link, not its target); directories are refused."""
    _refuse_root(location, "delete")
    st = location.lstat()
    if st is None:
        raise NotFoundError(f"cannot delete {location.display}: it does not exist (check the path)")
    if stat.S_ISDIR(st.st_mode):
        raise WrongTypeError(
            f"cannot delete {location.display}: it is a directory; only files and symlinks "
            "are deleted"
        )
    await _check_file_sha256(location, st, expected_sha256, limits, "delete")
    await step("delete.before")
    try:  # one unlink, inline: no cancel can split it
        os.unlink(location.name, dir_fd=location.dir_fd)
    except OSError as err:
        raise from_os_error(err, location.display, "delete") from err
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
