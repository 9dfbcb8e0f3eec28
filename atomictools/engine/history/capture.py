"""What a path holds just before a change: its kind, hash and size, and the content to keep.

Synchronous and cheap for small files (one read, already in the page cache); a large file is
hashed in a stream and kept by a hard link, never read into memory. Callers hold the path's
change lock, so no other atomictools writer changes it between the capture and the commit.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import stat
from dataclasses import dataclass

from atomictools.engine.durable.fsutil import lstat_at
from atomictools.engine.history.model import Kind, PathChange
from atomictools.engine.history.store import INLINE_BYTES, KeptContent
from atomictools.engine.results import entry_type

_CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Before:
    """A path's state before a change (``kept``: its content, when a change replaces it)."""

    kind: Kind
    sha256: str | None = None
    size: int | None = None
    kept: KeptContent | None = None
    ino: int | None = None
    mode: int | None = None

    def row(
        self,
        path: str,
        after: Kind,
        after_sha256: str | None = None,
        after_size: int | None = None,
        *,
        moved_from: str | None = None,
        added: int | None = None,
        removed: int | None = None,
    ) -> PathChange:
        return PathChange(
            path=path,
            before=self.kind,
            after=after,
            before_sha256=self.sha256,
            before_size=self.size,
            after_sha256=after_sha256,
            after_size=after_size,
            blob=self.kept.sha256 if self.kept is not None else None,
            moved_from=moved_from,
            added=added,
            removed=removed,
            before_mode=self.mode,
        )


def kind_of(st: os.stat_result | None) -> Kind:
    """What a (non-following) stat describes, in the results' words; None is absent."""
    return "absent" if st is None else entry_type(st)


def capture(
    dir_fd: int,
    name: str,
    *,
    keep: bool,
    known: bytes | None = None,
    keep_from: tuple[int, str] | None = None,
) -> Before:
    """The entry ``name`` in ``dir_fd`` as it is now. ``keep``: its content is about to be
    replaced or deleted, so keep it; ``known``: its bytes, already read by the caller;
    ``keep_from``: link a large file from this (dir_fd, name) instead (a backup member)."""
    st = lstat_at(dir_fd, name)
    kind = kind_of(st)
    if st is None or kind != "file":
        return Before(kind, ino=None if st is None else st.st_ino)
    data = known
    if data is None:
        sha, size, data = _hash_file(dir_fd, name)
    else:
        sha, size = hashlib.sha256(data).hexdigest(), len(data)
    kept = None
    if keep:
        if data is not None and size <= INLINE_BYTES:
            kept = KeptContent(sha, size, data=data)
        else:
            link_dir, link_name = keep_from or (dir_fd, name)
            kept = KeptContent(sha, size, dir_fd=link_dir, name=link_name)
    return Before("file", sha, size, kept, st.st_ino, stat.S_IMODE(st.st_mode))


def _hash_file(dir_fd: int, name: str) -> tuple[str, int, bytes | None]:
    """(sha256, size, the bytes if the file is small enough to keep inline)."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        digest = hashlib.sha256()
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, _CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if size <= INLINE_BYTES:
                chunks.append(chunk)
        return digest.hexdigest(), size, b"".join(chunks) if size <= INLINE_BYTES else None
    finally:
        os.close(fd)


def diff_counts(diff: str | None) -> tuple[int | None, int | None]:
    """Lines added and removed, counted from a unified diff."""
    if diff is None:
        return None, None
    added = removed = 0
    for line in diff.splitlines():
        if line.startswith("+") and not line.startswith("+++"):
            added += 1
        elif line.startswith("-") and not line.startswith("---"):
            removed += 1
    return added, removed


def line_counts(before: bytes | None, after: bytes | None) -> tuple[int, int] | None:
    """Lines added and removed between two versions (None when either is not text)."""
    if before is None or after is None:
        return None
    try:
        old = before.decode("utf-8").splitlines()
        new = after.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        return None
    added = removed = 0
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(
        None, old, new, autojunk=False
    ).get_opcodes():
        if tag in ("replace", "delete"):
            removed += i2 - i1
        if tag in ("replace", "insert"):
            added += j2 - j1
    return added, removed
