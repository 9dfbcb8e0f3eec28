"""What the engine's operations return: plain frozen records with paths relative to their root."""

from __future__ import annotations

import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

EntryType = Literal["file", "directory", "symlink", "other"]


def entry_type(st: os.stat_result) -> EntryType:
    """What kind of entry a (non-following) stat describes, in the words results use."""
    if stat.S_ISREG(st.st_mode):
        return "file"
    if stat.S_ISDIR(st.st_mode):
        return "directory"
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    return "other"


Progress = Callable[[int, int | None], Awaitable[None]]
"""Called as ``await progress(done, total)`` by long operations (total None when unknown)."""


@dataclass(frozen=True, slots=True)
class TextRead:
    path: str
    content: str
    size: int
    """Size of the whole file in bytes (also for head/tail reads)."""
    sha256: str
    """Hash of the whole file: pass it back as ``expected_sha256`` to change it safely."""
    encoding: str
    newline: str
    """``LF``, ``CRLF``, ``CR`` or ``mixed``."""
    bom: bool
    partial: bool = False
    """True when ``head``/``tail`` returned only part of the file."""


@dataclass(frozen=True, slots=True)
class BytesRead:
    path: str
    data: bytes
    size: int
    sha256: str
    mime_type: str


@dataclass(frozen=True, slots=True)
class WriteResult:
    path: str
    size: int
    sha256: str
    created: bool
    """True when the file did not exist before."""


@dataclass(frozen=True, slots=True)
class EditResult:
    path: str
    diff: str
    applied: bool
    """False for a dry run: the diff shows what would change, nothing was written."""
    sha256: str
    """Hash of the content after the edits (what the file holds now, unless a dry run)."""
    previous_sha256: str
    size: int


@dataclass(frozen=True, slots=True)
class MoveResult:
    source: str
    destination: str
    replaced: bool


@dataclass(frozen=True, slots=True)
class CopyResult:
    source: str
    destination: str
    size: int
    sha256: str
    replaced: bool


@dataclass(frozen=True, slots=True)
class DeleteResult:
    path: str
    type: EntryType


@dataclass(frozen=True, slots=True)
class MkdirResult:
    path: str
    created: bool


@dataclass(frozen=True, slots=True)
class DirEntry:
    name: str
    type: EntryType
    size: int | None
    """Bytes for files, None for anything else."""


@dataclass(frozen=True, slots=True)
class DirListing:
    path: str
    entries: tuple[DirEntry, ...]
    truncated: bool
    """True when the directory has more entries than the listing limit."""


@dataclass(frozen=True, slots=True)
class TreeNode:
    name: str
    type: EntryType
    children: tuple[TreeNode, ...] | None = None
    """Entries of a directory; None for files, and for directories cut off at the depth limit."""
    depth_limited: bool = False


@dataclass(frozen=True, slots=True)
class SearchResult:
    matches: tuple[str, ...]
    """Paths relative to the root, in walk order."""
    truncated: bool


@dataclass(frozen=True, slots=True)
class FileInfo:
    path: str
    type: EntryType
    size: int
    permissions: str
    """Permission bits in octal, e.g. ``644``."""
    modified: str
    accessed: str
    changed: str
    """ISO 8601 UTC times; ``changed`` is the inode change time."""
    created: str | None
    """Birth time where the platform reports it."""
    symlink_target: str | None = None
