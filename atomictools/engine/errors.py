"""The errors every layer raises: each names the problem, the fix, and whether anything changed.

The MCP layer turns these into ``isError`` results, so a message must be readable by a model
without a traceback: what went wrong, on which path, and what to do instead. Messages name
parameters and operations as the Python API spells them; ``spelled`` gives a front end its own.
"""

from __future__ import annotations

import errno
import functools
import re
import sqlite3
from collections.abc import Mapping
from typing import ClassVar

NOTHING_CHANGED = "nothing was changed"


class AtomicToolsError(Exception):
    """Base of every error the toolkit raises on purpose; ``code`` is stable for programs."""

    code: ClassVar[str] = "error"
    outcome: str = NOTHING_CHANGED
    """What the message ends with when nothing changed."""

    def __init__(self, message: str, *, changed: bool = False) -> None:
        self.message = message
        self.changed = changed
        super().__init__(self._text())

    def _text(self) -> str:
        return self.message if self.changed else f"{self.message}; {self.outcome}"

    def prefixed(self, context: str, outcome: str | None = None) -> AtomicToolsError:
        """The same error with ``context`` in front (e.g. which change of a set failed), and
        ``outcome`` instead of the class's (what the whole call left unchanged)."""
        self.message = f"{context}{self.message}"
        if outcome is not None:
            self.outcome = outcome
        self.args = (self._text(),)
        return self


class DatabaseError(AtomicToolsError):
    """SQLite refused or failed a statement; the transaction was rolled back, so the
    database is as it was."""

    code = "database"
    outcome = "nothing was committed"


class CommitUnknownError(DatabaseError):
    """COMMIT failed: the transaction may or may not be in the database."""

    code = "commit_outcome_unknown"

    def __init__(self, message: str) -> None:
        super().__init__(message, changed=True)


class InvalidArgumentError(AtomicToolsError):
    """A parameter is wrong (empty, out of range, contradictory); nothing was changed."""

    code = "invalid_argument"


class InvalidPathError(InvalidArgumentError):
    """A path that cannot name a file (empty, NUL, too long); nothing was changed."""

    code = "invalid_path"


class OutsideRootsError(AtomicToolsError):
    """A path that leads outside the allowed roots (by ``..``, a symlink or a race);
    nothing was read or changed."""

    code = "outside_roots"


class NotFoundError(AtomicToolsError):
    """The file or directory does not exist; nothing was changed."""

    code = "not_found"


class AlreadyExistsError(AtomicToolsError):
    """The destination exists and the call may not replace it (``create_only``, or
    no ``overwrite``); nothing was changed."""

    code = "exists"


class WrongTypeError(AtomicToolsError):
    """A file where a directory was needed, or the reverse, or a device or socket."""

    code = "wrong_type"


class PreconditionFailedError(AtomicToolsError):
    """``expected_sha256`` did not match: someone changed the file since it was read."""

    code = "precondition_failed"

    def __init__(self, message: str, *, current_sha256: str | None) -> None:
        self.current_sha256 = current_sha256
        super().__init__(message)


class EditError(AtomicToolsError):
    """One edit of a list could not be applied, so none was."""

    code = "edit_failed"

    def __init__(self, message: str, *, index: int) -> None:
        self.index = index
        super().__init__(message)


class EditNotFoundError(EditError):
    """An edit's ``old`` text is not in the file; no edit was applied."""

    code = "edit_not_found"


class EditAmbiguousError(EditError):
    """An edit's ``old`` text occurs more than once; no edit was applied."""

    code = "edit_ambiguous"


class TextEncodingError(AtomicToolsError):
    """Binary content where text was expected, or text the file's encoding cannot hold."""

    code = "encoding"


class TooLargeError(AtomicToolsError):
    """Over a limit (``Limits``) of one call; nothing was changed. Split the work."""

    code = "too_large"


class ReadOnlyError(AtomicToolsError):
    """The workspace or database is read-only; nothing was changed."""

    code = "read_only"


class PermissionDeniedError(AtomicToolsError):
    """The operating system refused access; nothing was changed."""

    code = "permission_denied"


class DiskFullError(AtomicToolsError):
    """No space (or quota) left; the change was abandoned whole and its temp removed."""

    code = "disk_full"


class FileSystemError(AtomicToolsError):
    """An I/O error the file system reported (EIO and friends)."""

    code = "io_error"


class ConcurrentChangeError(AtomicToolsError):
    """The tree changed under us in a way that makes the call unsafe to finish; retry it."""

    code = "concurrent_change"


class ConflictError(AtomicToolsError):
    """A path is not in the state the call needs (changed since the change being undone, a
    directory that is not empty); the message names it and the way out."""

    code = "conflict"


class NotUndoableError(AtomicToolsError):
    """A recorded change cannot be taken back (its old content was pruned, a database call)."""

    code = "not_undoable"


class StateDirError(AtomicToolsError):
    """The state directory (journals, idempotency keys) cannot be written or read."""

    code = "state_dir"


class PartlyDoneError(AtomicToolsError):
    """A change made part of what it was asked to; the message says which part, and the fix."""

    code = "partly_done"

    def __init__(self, message: str) -> None:
        super().__init__(message, changed=True)


class DurabilityUnknownError(AtomicToolsError):
    """The change is visible but syncing its directory failed, so it may not survive power loss."""

    code = "durability_unknown"

    def __init__(self, message: str) -> None:
        super().__init__(message, changed=True)


def from_os_error(err: OSError, path: str, action: str) -> AtomicToolsError:
    """Translate an OSError raised while doing ``action`` on ``path`` into a clear toolkit error."""
    reason = err.strerror or str(err)
    code = err.errno
    if code == errno.ENOENT:
        return NotFoundError(f"cannot {action} {path}: it does not exist (check the path)")
    if code in (errno.EEXIST, errno.ENOTEMPTY):
        return AlreadyExistsError(f"cannot {action} {path}: it already exists")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionDeniedError(
            f"cannot {action} {path}: permission denied ({reason}); "
            "check the file's and its directory's permissions"
        )
    if code in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"cannot {action} {path}: the disk is full ({reason}); free space")
    if code == errno.EISDIR:
        return WrongTypeError(f"cannot {action} {path}: it is a directory")
    if code == errno.ENOTDIR:
        return WrongTypeError(f"cannot {action} {path}: a part of the path is not a directory")
    if code == errno.ENAMETOOLONG:
        return InvalidPathError(f"cannot {action} {path}: the name is too long")
    if code == errno.ELOOP:
        return ConcurrentChangeError(
            f"cannot {action} {path}: it became a symbolic link during the call; retry"
        )
    return FileSystemError(f"cannot {action} {path}: {reason} (errno {code})")


def not_synced(done: str, err: OSError) -> DurabilityUnknownError:
    """``done`` happened, but the fsync that makes it durable failed (never retried)."""
    return DurabilityUnknownError(
        f"{done}, but syncing its directory failed ({err.strerror or err}); the change is "
        "visible but may not survive a power loss"
    )


def sqlite_problem(err: Exception) -> str:
    """What kind of failure a SQLite error of a state store is: ``damaged``, ``full``,
    ``unwritable`` or ``other`` (each store words its own fix)."""
    code = (getattr(err, "sqlite_errorcode", 0) or 0) & 0xFF
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return "damaged"
    if code == sqlite3.SQLITE_FULL:
        return "full"
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM):
        return "unwritable"
    return "other"


def state_dir_error(err: OSError, directory: object, action: str) -> StateDirError:
    """A state-directory failure, said as such: it is not the user's file that failed."""
    reason = err.strerror or str(err)
    fix = {
        errno.ENOSPC: "free space on it",
        errno.EDQUOT: "free space on it",
        errno.EROFS: "it is on a read-only file system; pass --state-dir (or set "
        "ATOMICTOOLS_STATE_DIR) to a writable directory",
        errno.EACCES: "this user may not write there; fix its permissions or pass --state-dir",
        errno.EPERM: "this user may not write there; fix its permissions or pass --state-dir",
    }.get(err.errno or 0, "check that file system, or pass --state-dir")
    return StateDirError(f"cannot {action} the state directory {directory} ({reason}); {fix}")


@functools.lru_cache(maxsize=8)
def _terms_pattern(names: tuple[str, ...]) -> re.Pattern[str]:
    alternatives = sorted(names, key=len, reverse=True)
    return re.compile("|".join(rf"(?<![\w.-]){re.escape(name)}(?![\w-])" for name in alternatives))


def spelled(text: str, terms: Mapping[str, str]) -> str:
    """``text`` with the engine's names of parameters and operations (``expected_sha256``,
    ``Database.query``) replaced by a front end's (``expectedSha256``, ``db_query``).

    Engine messages speak Python; each front end keeps one table of its own spelling.
    """
    if not terms:
        return text
    pattern = _terms_pattern(tuple(terms))
    return pattern.sub(lambda match: terms[match.group(0)], text)


class RecoveryNeededError(AtomicToolsError):
    """A committed change set could not be finished here; ``recover`` will finish it."""

    code = "recovery_needed"

    def __init__(self, message: str, *, changed: bool = True) -> None:
        super().__init__(message, changed=changed)
