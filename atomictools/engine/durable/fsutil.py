"""Thin, synchronous POSIX helpers the atomic protocols are built from.

Each function is one system-call idea (a full write loop, a durable fsync, a rename that refuses
to clobber) so the protocols above read as a list of steps. Nothing here retries an fsync: after
a failed fsync the kernel may have dropped the dirty pages, so a second success proves nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import os
import stat
from collections.abc import Iterable

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
if _renameat2 is not None:
    _renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    _renameat2.restype = ctypes.c_int


def renameat2(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str, flags: int) -> None:
    """Linux ``renameat2``; OSError(ENOSYS) where the C library does not have it."""
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available", dst)
    if _renameat2(src_dir_fd, os.fsencode(src), dst_dir_fd, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), dst)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write every byte of ``data``: ``os.write`` may write less than asked (short writes)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def durable_sync(fd: int) -> None:
    """Push a file's data to stable storage (F_FULLFSYNC where plain fsync stops at the cache)."""
    full_fsync = getattr(fcntl, "F_FULLFSYNC", None)
    if full_fsync is not None:
        fcntl.fcntl(fd, full_fsync)
    else:
        os.fsync(fd)


def sync_directory(dir_fd: int) -> None:
    """Make the directory's entries (a create, rename or unlink) durable."""
    os.fsync(dir_fd)


def rename_noreplace(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str) -> None:
    """Rename ``src`` to ``dst`` atomically, failing with FileExistsError if ``dst`` exists.

    Uses ``renameat2(RENAME_NOREPLACE)``; where the kernel or file system lacks it, a hard link
    plus unlink gives the same no-clobber guarantee for files (the link fails if ``dst`` exists).
    """
    try:
        renameat2(src_dir_fd, src, dst_dir_fd, dst, RENAME_NOREPLACE)
        return
    except OSError as err:
        if err.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise
        if err.errno == errno.EINVAL and _is_directory(src_dir_fd, src):
            raise OSError(err.errno, "cannot move a directory into itself", dst) from err
    os.link(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=False)
    os.unlink(src, dir_fd=src_dir_fd)


def _is_directory(dir_fd: int, name: str) -> bool:
    return stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)


def sha256_of_fd(fd: int, chunk_bytes: int) -> tuple[str, int]:
    """Hash an open file from its current offset; returns (hex digest, bytes read)."""
    digest = hashlib.sha256()
    size = 0
    while chunk := os.read(fd, chunk_bytes):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def lstat_at(dir_fd: int, name: str | None) -> os.stat_result | None:
    """The entry's own metadata (links not followed), or None when it does not exist."""
    if not name:
        return None
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def same_file(a: os.stat_result | None, b: os.stat_result | None) -> bool:
    """Both exist and are the same inode."""
    return a is not None and b is not None and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def open_regular_at(dir_fd: int, name: str) -> int | None:
    """A read-only descriptor of a regular file (None when missing, a link or anything else);
    never follows a link, never blocks on a FIFO."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:  # a symlink
            return None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def sha256_at(dir_fd: int, name: str) -> str | None:
    """The content hash of a regular file (None when missing, a link or not a regular file)."""
    fd = open_regular_at(dir_fd, name)
    if fd is None:
        return None
    try:
        return sha256_of_fd(fd, 1024 * 1024)[0]
    finally:
        os.close(fd)


def read_at(dir_fd: int, name: str, chunk_bytes: int = 1024 * 1024) -> bytes:
    """A file's whole content, read through its directory (a link is refused, not followed);
    for files the caller knows to be small."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        chunks = []
        while chunk := os.read(fd, chunk_bytes):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def unlink_at(dir_fd: int, name: str | None) -> None:
    """Remove an entry if it is there."""
    if name:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)


def make_dirs_durably(path: str | os.PathLike[str]) -> None:
    """``mkdir -p`` whose every new directory survives a power loss (its parent is fsynced).

    A directory entry is durable only once its parent directory is synced: a journal written
    into a directory whose own creation was not would vanish with it.
    """
    missing = []
    here = os.path.abspath(os.fspath(path))
    while not os.path.isdir(here):
        missing.append(here)
        parent = os.path.dirname(here)
        if parent == here:
            break
        here = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise
        parent_fd = os.open(os.path.dirname(directory), os.O_RDONLY | os.O_DIRECTORY)
        try:
            sync_directory(parent_fd)
        finally:
            os.close(parent_fd)


def distinct_directories(dir_fds: Iterable[int]) -> list[int]:
    """One descriptor per directory (several may be open on the same one): one fsync each."""
    seen: dict[tuple[int, int], int] = {}
    for fd in dir_fds:
        st = os.fstat(fd)
        seen.setdefault((st.st_dev, st.st_ino), fd)
    return list(seen.values())
