"""What the engine's operations return: plain frozen records with paths relative to their root."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

EntryType = Literal["file", "directory", "symlink", "other"]
OpName = Literal["write", "edit", "move", "copy", "delete", "mkdir", "rmdir", "sql"]
"""The kinds of change (``Change.op``); ``rmdir`` (an empty directory) is how an undo takes
back a ``mkdir``; ``sql`` is a change set's database step."""


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
    """A text file as read: its content, or some of its lines, with the sha256 of the whole
    file. Guarantee: ``sha256`` is of the very bytes decoded, so passing it back as
    ``expected_sha256`` refuses a change if anyone wrote the file since. Caveat: a read of some
    lines (head, tail, offset/limit) of a file larger than ``Limits.hash_partial_bytes`` reads
    only those lines, and its ``sha256`` is None: read the file whole to get the hash."""

    path: str
    content: str
    size: int
    """Size of the whole file in bytes (also for a read of some lines)."""
    sha256: str | None
    """Hash of the whole file: pass it back as ``expected_sha256`` to change it safely. None
    for some lines of a file larger than ``Limits.hash_partial_bytes`` (hashing would cost a
    read of the whole file)."""
    encoding: str
    newline: str
    """``LF``, ``CRLF``, ``CR`` or ``mixed`` (for some lines of a large file: of those lines)."""
    bom: bool
    partial: bool = False
    """True when the file has lines that were not returned."""
    first_line: int | None = None
    """Number (from 1) of the first line returned, for a read of some lines; None for a whole
    read and for a tail of a large file (counting the lines before it costs a full read)."""
    line_count: int | None = None
    """How many lines were returned, for a read of some lines (None for a whole read)."""
    next_offset: int | None = None
    """The ``offset`` that reads on after the lines returned; None at the end of the file."""
    total_lines: int | None = None
    """Lines in the whole file, when the read saw them all (small file, or read to the end)."""


@dataclass(frozen=True, slots=True)
class BytesRead:
    """A file's bytes as read, with their sha256 and a guessed MIME type. Guarantee: ``sha256``
    is of ``data`` exactly. Caveat: bounded by ``Limits.max_read_bytes``; the MIME type is a
    guess from the name."""

    path: str
    data: bytes
    size: int
    sha256: str
    mime_type: str


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What a write did. Guarantee: ``sha256``/``size`` are of the bytes now in the file
    (fsynced, with full durability). Caveat: ``created`` is False when a file was replaced."""

    path: str
    size: int
    sha256: str
    created: bool
    """True when the file did not exist before."""


@dataclass(frozen=True, slots=True)
class EditResult:
    """What an edit did (or, with ``applied`` False, would do): a unified diff and the
    hashes before and after. Guarantee: every edit applied, or none."""

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
    """What a move did. Guarantee: the entry is at ``destination`` and not at ``source``.
    Caveat: ``replaced`` says an existing destination was overwritten (only with ``overwrite``)."""

    source: str
    destination: str
    replaced: bool


@dataclass(frozen=True, slots=True)
class CopyResult:
    """What a copy did. Guarantee: ``destination`` holds exactly the bytes hashed as
    ``sha256``, the source's bytes at one moment (a source changed meanwhile is refused)."""

    source: str
    destination: str
    size: int
    sha256: str
    replaced: bool


@dataclass(frozen=True, slots=True)
class DeleteResult:
    """What a delete removed: a file or a symlink (never what a link points to)."""

    path: str
    type: EntryType


@dataclass(frozen=True, slots=True)
class MkdirResult:
    """A directory that exists now; ``created`` False means it was already there."""

    path: str
    created: bool


@dataclass(frozen=True, slots=True)
class DirEntry:
    """One entry of a listing. Caveat: ``size`` is None for a directory; our own temp files
    are never listed."""

    name: str
    type: EntryType
    size: int | None
    """Bytes for files, None for anything else."""


@dataclass(frozen=True, slots=True)
class DirListing:
    """The entries of one directory. Caveat: bounded by ``Limits.max_list_entries``
    (``truncated`` says so)."""

    path: str
    entries: tuple[DirEntry, ...]
    truncated: bool
    """True when the directory has more entries than the listing limit."""


@dataclass(frozen=True, slots=True)
class TreeNode:
    """One node of a directory tree. Caveat: bounded by ``max_depth`` and ``Limits.max_tree_*``;
    symlinks are shown, never followed."""

    name: str
    type: EntryType
    children: tuple[TreeNode, ...] | None = None
    """Entries of a directory; None for files, and for directories cut off at the depth limit."""
    depth_limited: bool = False


@dataclass(frozen=True, slots=True)
class SearchResult:
    """Paths that match a glob. Caveat: bounded by ``Limits.max_search_results``
    (``truncated`` says so); symlinks are not followed."""

    matches: tuple[str, ...]
    """Paths relative to the root, in walk order."""
    truncated: bool


@dataclass(frozen=True, slots=True)
class FileInfo:
    """Metadata of one entry (size, times, type, permissions), read without changing it."""

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


@dataclass(frozen=True, slots=True)
class StatementResult:
    """What one statement changed: rows affected and the last rowid."""

    rowcount: int
    """Rows changed by an INSERT/UPDATE/DELETE (-1 for other statements)."""
    lastrowid: int | None


@dataclass(frozen=True, slots=True)
class ChangeOutcome:
    """What one change of a set did (or, in a dry run, would do), in the order given."""

    op: OpName
    path: str
    source: str | None
    sha256: str | None
    """Content hash after the change (None for delete, move of a non-file, mkdir)."""
    diff: str | None = None
    created: bool = False
    size: int | None = None
    """Size of the new content (write, edit, copy)."""
    previous_sha256: str | None = None
    """Content hash before an edit."""
    type: EntryType | None = None
    """What a delete removed or a move moved."""
    statements: tuple[StatementResult, ...] = ()
    """A database step (``sql``): what each statement did (``path`` names the database)."""


RestoreAction = Literal[
    "restored", "deleted", "created_directory", "removed_directory", "moved_back"
]


@dataclass(frozen=True, slots=True)
class RestoredPath:
    """What an undo does (or, in a dry run, would do) to one path."""

    path: str
    action: RestoreAction
    sha256: str | None = None
    """The content hash restored (``restored``)."""
    source: str | None = None
    """Where the entry or content comes back from (``moved_back``, a restore by copy)."""
    diff: str | None = None
    """Unified diff from the current text to the restored one (text files up to 1 MiB)."""


@dataclass(frozen=True, slots=True)
class UndoResult:
    """An undo: every path of the changes undone back as it was, or (dry run) what would be.
    Guarantee: all paths or none, also across a crash. ``change_id`` is the undo's own entry
    in the history: undoing it is a redo."""

    undone: tuple[str, ...]
    applied: bool
    change_id: str | None
    paths: tuple[RestoredPath, ...]


@dataclass(frozen=True, slots=True)
class ChangeSetResult:
    """What a change set did. Guarantee: with ``applied`` every change is in place, and a
    crash at any moment leaves all of them or none (recovery finishes or undoes the rest).
    Caveat: ``txid`` names the journal record only while it exists (None for a dry run)."""

    changes: tuple[ChangeOutcome, ...]
    applied: bool
    """False for a dry run: the checks passed, nothing was written."""
    txid: str | None
    change_id: str | None = None
    """The set's entry in the history (None for a dry run, or with history off)."""

    def to_json(self) -> str:
        """The form an idempotency record stores (and a retry turns back into this)."""
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ChangeSetResult:
        data = json.loads(text)
        changes = tuple(
            ChangeOutcome(
                **{
                    **change,
                    "statements": tuple(
                        StatementResult(**item) for item in change.get("statements", ())
                    ),
                }
            )
            for change in data["changes"]
        )
        return cls(
            changes,
            applied=bool(data["applied"]),
            txid=data["txid"],
            change_id=data.get("change_id"),
        )
