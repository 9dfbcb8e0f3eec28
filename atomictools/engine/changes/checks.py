"""Every precondition of a file change, each with its one message.

Both commits (``direct``: one rename; ``journaled``: an intent record) call these, so a change
with an idempotency key and one without refuse the same things in the same words. Messages name
parameters as the Python API spells them (``expected_sha256``, ``create_only``, ``overwrite``);
the MCP layer and the command line translate them to their own spelling.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence

from atomictools.engine.config import Limits
from atomictools.engine.durable import fsutil
from atomictools.engine.durable.blocking import run_blocking
from atomictools.engine.errors import (
    AlreadyExistsError,
    ConflictError,
    InvalidArgumentError,
    NotFoundError,
    PreconditionFailedError,
    TooLargeError,
    WrongTypeError,
    from_os_error,
)
from atomictools.engine.sandbox import Location, require_regular
from atomictools.engine.text.edits import Edit


def missing(location: Location, action: str) -> NotFoundError:
    return NotFoundError(f"cannot {action} {location.display}: it does not exist (check the path)")


def refuse_root(location: Location, action: str) -> None:
    if location.is_root:
        raise InvalidArgumentError(f"cannot {action} an allowed root directory itself")


def check_write(target: Location, st: os.stat_result | None, *, create_only: bool) -> None:
    """A write replaces a regular file or creates one; ``create_only`` refuses the former."""
    if st is None:
        return
    require_regular(st, target, "write")
    if create_only:
        raise AlreadyExistsError(
            f"cannot create {target.display}: it already exists; leave out create_only to "
            "replace it, or choose another name"
        )


def check_write_size(display: str, size: int, limits: Limits) -> None:
    if size > limits.max_write_bytes:
        raise TooLargeError(
            f"the content for {display} is {size} bytes, more than the "
            f"{limits.max_write_bytes}-byte limit for one call; use the streaming writer"
        )


def check_edit(
    target: Location, st: os.stat_result | None, edits: Sequence[Edit], limits: Limits
) -> None:
    if not edits:
        raise InvalidArgumentError("edits is empty; give at least one edit (old text, new text)")
    if len(edits) > limits.max_edits:
        raise TooLargeError(
            f"{len(edits)} edits in one call is more than the limit of {limits.max_edits}; "
            "split them, or write the whole file"
        )
    if st is None:
        raise missing(target, "edit")
    require_regular(st, target, "edit")


def check_move(
    source: Location,
    src_st: os.stat_result | None,
    destination: Location,
    dst_st: os.stat_result | None,
    *,
    overwrite: bool,
) -> None:
    """A move renames a file, symlink or directory; across file systems only a file moves."""
    refuse_root(source, "move")
    refuse_root(destination, "replace")
    if src_st is None:
        raise missing(source, "move")
    check_destination("move", source, src_st, destination, dst_st, overwrite=overwrite)
    if dst_st is not None and stat.S_ISDIR(dst_st.st_mode):
        raise WrongTypeError(
            f"cannot move {source.display} to {destination.display}: the destination is a "
            "directory; only a file or a symlink is replaced"
        )
    if stat.S_ISDIR(src_st.st_mode) and destination.abspath.is_relative_to(source.abspath):
        raise InvalidArgumentError(
            f"cannot move {source.display} into itself ({destination.display})"
        )
    if across_devices(source, src_st, destination) and not stat.S_ISREG(src_st.st_mode):
        raise only_files_cross(source, destination)


def only_files_cross(source: Location, destination: Location) -> WrongTypeError:
    return WrongTypeError(
        f"cannot move {source.display} to {destination.display}: they are on different file "
        "systems and only files can be moved across them"
    )


def across_devices(source: Location, src_st: os.stat_result, destination: Location) -> bool:
    """Would the move leave its file system (a rename cannot do it: it is a copy, then a delete)?"""
    return src_st.st_dev != os.fstat(destination.dir_fd).st_dev


def check_copy(
    source: Location,
    src_st: os.stat_result | None,
    destination: Location,
    dst_st: os.stat_result | None,
    *,
    overwrite: bool,
) -> None:
    """A copy reads a regular file and creates or replaces a regular file with its bytes."""
    refuse_root(destination, "replace")
    if src_st is None:
        raise missing(source, "copy")
    if not stat.S_ISLNK(src_st.st_mode):  # a link was swapped in after the path was resolved:
        require_regular(src_st, source, "copy")  # opening it (O_NOFOLLOW) refuses it as such
    check_destination("copy", source, src_st, destination, dst_st, overwrite=overwrite)
    if dst_st is not None:
        require_regular(dst_st, destination, "copy onto")


def check_destination(
    action: str,
    source: Location,
    src_st: os.stat_result,
    destination: Location,
    dst_st: os.stat_result | None,
    *,
    overwrite: bool,
) -> None:
    """A move or copy onto an existing entry: never onto itself, and only with ``overwrite``."""
    if dst_st is None:
        return
    if fsutil.same_file(src_st, dst_st):
        raise InvalidArgumentError(
            f"cannot {action} {source.display} onto itself ({destination.display})"
        )
    if not overwrite:
        raise AlreadyExistsError(
            f"cannot {action} {source.display} to {destination.display}: the destination "
            "exists; pass overwrite to replace it, or choose another name"
        )


def check_delete(location: Location, st: os.stat_result | None) -> None:
    refuse_root(location, "delete")
    if st is None:
        raise missing(location, "delete")
    if stat.S_ISDIR(st.st_mode):
        raise WrongTypeError(
            f"cannot delete {location.display}: it is a directory; only files and symlinks "
            "are deleted"
        )


def check_rmdir(
    location: Location, st: os.stat_result | None, leaving: Callable[[str], bool]
) -> None:
    """Only an empty directory is removed (an undo of the change that made it); ``leaving``
    tells the entries that go with it (removed by the same set, or the set's own files)."""
    refuse_root(location, "remove")
    if st is None:
        raise missing(location, "remove directory")
    if not stat.S_ISDIR(st.st_mode):
        raise WrongTypeError(f"cannot remove directory {location.display}: it is not a directory")
    fd = os.open(
        location.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=location.dir_fd
    )
    try:
        entries = os.listdir(fd)
    finally:
        os.close(fd)
    entries = [name for name in entries if not leaving(name)]
    if entries:
        raise ConflictError(
            f"cannot remove directory {location.display}: it is not empty (it holds "
            f"{len(entries)} entries, e.g. {sorted(entries)[0]}); move or delete them first"
        )


def check_mkdir(location: Location, st: os.stat_result | None) -> None:
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise WrongTypeError(
            f"cannot create directory {location.display}: a file with that name exists"
        )


def refuse_changed(
    location: Location, action: str, expected: str | None, current: str | None
) -> None:
    """The one lost-update check: the file must still have the content the caller read."""
    if expected is None:
        return
    if current is None:
        raise PreconditionFailedError(
            f"cannot {action} {location.display}: expected_sha256 was given but the file does "
            "not exist; read it again",
            current_sha256=None,
        )
    if current != expected.lower():
        raise PreconditionFailedError(
            f"cannot {action} {location.display}: it changed since it was read "
            f"(expected_sha256 {expected}, current sha256 {current}); read it again, then retry "
            "with the current sha256",
            current_sha256=current,
        )


async def check_sha256(
    location: Location,
    st: os.stat_result | None,
    expected: str | None,
    limits: Limits,
    action: str,
) -> None:
    """Hash the entry's current content (streamed) and refuse if it is not ``expected``."""
    if expected is None:
        return
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise InvalidArgumentError(
            f"cannot check expected_sha256 of {location.display}: it is not a regular file"
        )
    current = await current_sha256(location, limits, st)
    refuse_changed(location, action, expected, current)


async def current_sha256(
    location: Location, limits: Limits, st: os.stat_result | None
) -> str | None:
    """Hash of the entry's current content, or None if it does not exist."""

    def compute() -> str | None:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(location.name, flags, dir_fd=location.dir_fd)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise from_os_error(err, location.display, "read") from err
        try:
            return fsutil.sha256_of_fd(fd, limits.chunk_bytes)[0]
        finally:
            os.close(fd)

    return await run_blocking(limits.inline(st.st_size if st else 0), compute)
