"""After a crash: finish or undo interrupted change sets, then sweep orphaned temp files.

Journal recovery runs first (before a server serves its first call): a record that never
reached ``committed`` is rolled back, a committed one rolled forward (or back, on request). A
record whose writer is still alive (its ``flock`` is held) is left alone. A rolled-forward
record of a keyed call records its idempotency key before it goes. Every step is idempotent,
so a crash during recovery is repaired by running it again.

The sweep then removes temp files that are ours and orphaned: the name must match our pattern
exactly, no live process may hold its lock, it must be older than a short grace period (the
window between creating a temp and locking it), and it must still be the same inode when it
is unlinked. It never follows symlinks and never leaves the roots.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import fsutil
from .errors import AtomicToolsError
from .idempotency import IdempotencyStore, Receipt, failed_result
from .journal import RECORD_SUFFIX, decode_record
from .sandbox import Sandbox
from .tempfiles import is_temp_name, temp_owner_pid

logger = logging.getLogger("atomictools.recovery")
GRACE_SECONDS = 5.0
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class RecoveryReport:
    """What recovery did and what it could not do."""

    rolled_forward: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    """Orphaned temp files removed (or that would be, in a dry run)."""
    live: list[str] = field(default_factory=list)
    """Change sets still in flight in another process, left alone."""
    other_roots: list[str] = field(default_factory=list)
    """Journals that touch directories outside the given roots, left alone."""
    problems: list[str] = field(default_factory=list)
    """What needs a person, and why."""
    scanned: int = 0
    protected: set[str] = field(default_factory=set)
    """Temp files named by journals that were left alone: the sweep must not take them."""

    @property
    def fixed_something(self) -> bool:
        return bool(self.rolled_forward or self.rolled_back or self.removed)

    @property
    def exit_code(self) -> int:
        """0: clean, 1: something was fixed, 2: something needs a person."""
        if self.problems:
            return 2
        return 1 if self.fixed_something else 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "rolledForward": self.rolled_forward,
            "rolledBack": self.rolled_back,
            "removedTempFiles": self.removed,
            "liveChangeSets": self.live,
            "otherRoots": self.other_roots,
            "problems": self.problems,
            "scanned": self.scanned,
            "exitCode": self.exit_code,
        }


class _Dirs:
    """Directory descriptors opened through the sandbox, so recovery stays inside the roots."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self._fds: dict[str, int] = {}

    def fd(self, path: str) -> int:
        if path not in self._fds:
            with self.sandbox.resolve(path) as location:
                self._fds[path] = os.open(location.name, _DIR_FLAGS, dir_fd=location.dir_fd)
        return self._fds[path]

    def sync_all(self) -> None:
        for fd in self._fds.values():
            fsutil.sync_directory(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _exists(dir_fd: int, name: str | None) -> os.stat_result | None:
    if not name:
        return None
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _same(a: os.stat_result | None, b: os.stat_result | None) -> bool:
    return a is not None and b is not None and (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _sha256(dir_fd: int, name: str) -> str | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        return fsutil.sha256_of_fd(fd, 1024 * 1024)[0]
    finally:
        os.close(fd)


def _unlink(dir_fd: int, name: str | None) -> None:
    if name:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)


def _roll_forward(op: dict[str, Any], dirs: _Dirs) -> str | None:
    """Finish one operation of a committed change set; returns a problem, if any."""
    d = dirs.fd(op["dir"])
    name, staged, backup = op["name"], op.get("staged"), op.get("backup")
    kind = op["op"]
    if kind == "replace":
        if staged and _exists(d, staged):
            current = _exists(d, name)
            replaced_since = (
                not _same(current, _exists(d, backup)) if backup else current is not None
            )
            if replaced_since:  # by another process after the crash: its update wins
                _unlink(d, staged)
                _unlink(d, backup)
                return (
                    f"{op['dir']}/{name}: replaced by someone else since the crash; "
                    "the change set's version of it was not applied"
                )
            os.replace(staged, name, src_dir_fd=d, dst_dir_fd=d)
        elif _sha256(d, name) != op.get("sha256"):
            return f"{op['dir']}/{name}: neither the staged nor the new content is there"
    elif kind == "delete":
        current = _exists(d, name)
        if current is not None and _same(current, _exists(d, backup)):
            os.unlink(name, dir_fd=d)
    elif kind == "move":
        s = dirs.fd(op["source_dir"])
        source, target = _exists(s, op["source_name"]), _exists(d, name)
        if source is not None and (target is None or _same(target, _exists(d, backup))):
            os.rename(op["source_name"], name, src_dir_fd=s, dst_dir_fd=d)
        elif source is not None:
            return f"{op['dir']}/{name}: the destination changed; the move was not finished"
    _unlink(d, backup)
    return None


def _roll_back(op: dict[str, Any], dirs: _Dirs) -> str | None:
    """Undo one operation (applied or not); returns a problem, if any."""
    d = dirs.fd(op["dir"])
    name, staged, backup = op["name"], op.get("staged"), op.get("backup")
    kind = op["op"]
    if kind == "replace":
        if staged and _exists(d, staged):
            _unlink(d, staged)  # never applied
            _unlink(d, backup)
        elif backup and _exists(d, backup):
            os.replace(backup, name, src_dir_fd=d, dst_dir_fd=d)
        elif _sha256(d, name) == op.get("sha256"):
            os.unlink(name, dir_fd=d)  # it was created by the change set
        elif _exists(d, name) is not None:
            return f"{op['dir']}/{name}: changed since; not rolled back"
    elif kind == "delete":
        if backup and _exists(d, name) is None and _exists(d, backup):
            os.rename(backup, name, src_dir_fd=d, dst_dir_fd=d)
        else:
            _unlink(d, backup)
    elif kind == "move":
        s = dirs.fd(op["source_dir"])
        if _exists(s, op["source_name"]) is None and _exists(d, name) is not None:
            os.rename(name, op["source_name"], src_dir_fd=d, dst_dir_fd=s)
            if backup and _exists(d, backup):
                os.rename(backup, name, src_dir_fd=d, dst_dir_fd=d)
        else:
            _unlink(d, backup)
    elif kind == "mkdir":
        for created in reversed(op.get("created") or []):
            try:
                os.rmdir(created, dir_fd=d)
            except FileNotFoundError:
                pass
            except OSError:
                return f"{op['dir']}/{created}: not empty any more; left in place"
    return None


def _remove_created_dirs(
    created: list[list[str]], dirs: _Dirs, report: RecoveryReport
) -> list[str]:
    """Remove the directories a change set made, with the orphaned temps of ours inside."""
    problems = []
    for parent, name in reversed(created):
        try:
            parent_fd = dirs.fd(parent)
            inner = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except (FileNotFoundError, AtomicToolsError):
            continue  # already gone, or its parent is
        except OSError as err:
            problems.append(f"{parent}/{name}: cannot open it ({err.strerror}); left in place")
            continue
        try:
            for entry in os.listdir(inner):
                if is_temp_name(entry):
                    _sweep_one(inner, entry, report, False, display=f"{parent}/{name}/{entry}")
        finally:
            os.close(inner)
        try:
            os.rmdir(name, dir_fd=parent_fd)
        except OSError:
            problems.append(f"{parent}/{name}: not empty any more; left in place")
    return problems


def _named_temps(ops: list[dict[str, Any]]) -> set[str]:
    """The staged files and backups a record names, as absolute paths."""
    return {
        os.path.join(op["dir"], op[key])
        for op in ops
        for key in ("staged", "backup")
        if op.get(key)
    }


def _discard_uncommitted(ops: list[dict[str, Any]], dirs: _Dirs) -> None:
    """A change set that never committed changed no target: drop what it staged."""
    for op in ops:
        d = dirs.fd(op["dir"])
        _unlink(d, op.get("staged"))
        _unlink(d, op.get("backup"))


def recover_journals(
    sandbox: Sandbox, journal_dir: Path, *, rollback: bool = False, dry_run: bool = False
) -> RecoveryReport:
    """Finish (or undo) every interrupted change set whose files lie inside the roots."""
    report = RecoveryReport()
    if not journal_dir.is_dir():
        return report
    journal_fd = os.open(journal_dir, _DIR_FLAGS)
    try:
        for path in sorted(journal_dir.iterdir()):
            if is_temp_name(path.name):  # a record that was being written
                _sweep_one(journal_fd, path.name, report, dry_run, display=str(path))
            elif path.name.endswith(RECORD_SUFFIX):
                _recover_record(sandbox, path, report, rollback=rollback, dry_run=dry_run)
    finally:
        os.close(journal_fd)
    return report


def _recover_record(
    sandbox: Sandbox, path: Path, report: RecoveryReport, *, rollback: bool, dry_run: bool
) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        body = decode_record(_read(fd))
        txid = path.name.removesuffix(RECORD_SUFFIX)
        ops: list[dict[str, Any]] = body.get("ops", []) if body else []
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report.live.append(txid)
            report.protected |= _named_temps(ops)
            return
        if body is None:  # torn: it never became the committed record
            if not dry_run:
                path.unlink()
            report.rolled_back.append(txid)
            return
        created: list[list[str]] = body.get("created_dirs") or []
        committed = body.get("state") == "committed"
        dirs = _Dirs(sandbox)
        try:
            try:
                for op in ops:
                    dirs.fd(op["dir"])
                    if "source_dir" in op:
                        dirs.fd(op["source_dir"])
                for parent, _name in created:
                    dirs.fd(parent)
            except AtomicToolsError:
                report.other_roots.append(txid)
                report.protected |= _named_temps(ops)
                return
            forward = committed and not rollback
            if dry_run:
                report.protected |= _named_temps(ops)  # the real run uses or removes them
                (report.rolled_forward if forward else report.rolled_back).append(txid)
                return
            problems: list[str] = []
            if forward:
                problems = [p for op in ops if (p := _roll_forward(op, dirs)) is not None]
            elif committed:
                problems = [p for op in reversed(ops) if (p := _roll_back(op, dirs)) is not None]
            else:
                _discard_uncommitted(ops, dirs)
            if not forward:
                problems += _remove_created_dirs(created, dirs, report)
            if body.get("durability") != "fast":
                dirs.sync_all()
        finally:
            dirs.close()
        if problems:
            report.problems.extend(f"change set {txid}: {p}" for p in problems)
        if forward and not _record_key(body, txid, report, problems):
            return  # the record stays: the next recovery records the key
        path.unlink()
        (report.rolled_forward if forward else report.rolled_back).append(txid)
    finally:
        os.close(fd)


def _record_key(
    body: dict[str, Any], txid: str, report: RecoveryReport, problems: list[str]
) -> bool:
    """A rolled-forward keyed change: record its key, so a retry returns instead of redoing.

    A change set that could be finished only in part records the key as failed, with why: a
    retry must neither redo the part that was applied nor be told that all of it was.
    """
    keyed = body.get("idempotency")
    if keyed is None:
        return True
    try:
        receipt, result = Receipt.from_record(keyed)
        if problems:
            result = failed_result(
                "the first call with this key was interrupted by a crash, and recovery could "
                f"finish only part of change set {txid}: {'; '.join(problems)}. Read the files, "
                "then make what is still needed with a new key"
            )
        IdempotencyStore(Path(receipt.store)).record(receipt, result)
    except (OSError, sqlite3.Error, KeyError, TypeError, ValueError) as err:
        report.problems.append(
            f"change set {txid}: finished, but its idempotency key could not be recorded "
            f"({err}); the journal is kept so the next recovery records it"
        )
        return False
    return True


def _read(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


# -- the sweep ------------------------------------------------------------------------------


def _pid_alive(pid: int | None) -> bool:
    if pid is None or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_one(dir_fd: int, name: str, report: RecoveryReport, dry_run: bool, display: str) -> None:
    """Remove one temp if it is an orphan (see the module docstring); never raises."""
    owner = temp_owner_pid(name)
    try:
        before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if time.time() - before.st_mtime < GRACE_SECONDS and _pid_alive(owner):
            return  # may be between creation and locking
        if stat.S_ISLNK(before.st_mode):  # the backup of a symlink: no lock to test
            if owner == os.getpid() or not _pid_alive(owner):
                if not dry_run:
                    os.unlink(name, dir_fd=dir_fd)
                report.removed.append(display)
            return
        if not stat.S_ISREG(before.st_mode):
            return
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(name, flags, dir_fd=dir_fd)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # a live writer holds it
            if not _same(os.fstat(fd), os.stat(name, dir_fd=dir_fd, follow_symlinks=False)):
                return  # replaced meanwhile: not the file we looked at
            if not dry_run:
                os.unlink(name, dir_fd=dir_fd)
            report.removed.append(display)
        finally:
            os.close(fd)
    except OSError as err:
        logger.debug("sweep skipped %s: %s", display, err)


def _walk_dirs(root_fd: int) -> Iterator[tuple[int, str, list[str]]]:
    """(dir fd, relative path, names) for every directory below the root; links not followed."""
    yield from (
        (fd, rel, names)
        for rel, _dirs, names, fd in os.fwalk(".", dir_fd=root_fd, follow_symlinks=False)
    )


def sweep_temps(
    sandbox: Sandbox,
    report: RecoveryReport | None = None,
    *,
    dry_run: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> RecoveryReport:
    """Remove orphaned temp files anywhere below the roots."""
    report = report or RecoveryReport()
    for root in sandbox.roots:
        root_fd = os.open(root.path, _DIR_FLAGS)
        try:
            for dir_fd, rel, names in _walk_dirs(root_fd):
                report.scanned += len(names)
                for name in names:
                    if is_temp_name(name):
                        shown = os.path.normpath(os.path.join(rel, name))
                        if str(root.path / shown) in report.protected:
                            continue  # a change set left alone still needs it
                        _sweep_one(dir_fd, name, report, dry_run, display=shown)
                if on_progress is not None:
                    on_progress(report.scanned)
        finally:
            os.close(root_fd)
    return report


def recover(
    sandbox: Sandbox,
    journal_dir: Path,
    *,
    rollback: bool = False,
    dry_run: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> RecoveryReport:
    """Journals first, then the sweep: what ``atomictools recover`` does."""
    report = recover_journals(sandbox, journal_dir, rollback=rollback, dry_run=dry_run)
    return sweep_temps(sandbox, report, dry_run=dry_run, on_progress=on_progress)
