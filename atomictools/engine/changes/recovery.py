"""After a crash: finish or undo interrupted change sets, then sweep orphaned files of ours.

Journal recovery runs first (before a server serves its first call). Every record is handled
on its own, and a failure with one never stops the others:

- a record that verifies and reached ``committed`` is rolled forward (or back, on request); one
  that never reached it is rolled back; a record whose writer is still alive (its ``flock`` is
  held) is left alone, as is one that touches directories outside the roots;
- a record that cannot be trusted (empty, torn, garbage, a checksum mismatch, a missing field,
  a directory or symlink in its place, unreadable) never leads to deleting anything: the set is
  reported as needing a person, with its files, and ``--forward``/``--rollback`` finish or undo
  it from the files on disk, each checked by its hash (see ``sweep``);
- an error while finishing a set (EACCES, EIO, ...) keeps its record, so running recovery again
  once the cause is fixed picks up where it stopped (every step is idempotent).

A rolled-forward record of a keyed call records its idempotency key before it goes. The sweep
(``sweep.sweep_temps``) then removes what is ours and orphaned, and never a change set's file
whose journal it has not read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

from atomictools.engine.changes import markers, pgmarkers
from atomictools.engine.changes.idempotency import IdempotencyStore, Receipt, failed_result
from atomictools.engine.changes.record import (
    RECORD_SUFFIX,
    JournalRecord,
    OpRecord,
    UntrustedRecordError,
    decode,
)
from atomictools.engine.changes.recovery_report import RecoveryReport, UnfinishedSet
from atomictools.engine.changes.sweep import sweep_one
from atomictools.engine.config import Durability
from atomictools.engine.durable import fsutil
from atomictools.engine.durable.fsutil import lstat_at, same_file, sha256_at, unlink_at
from atomictools.engine.durable.tempfiles import (
    claim_name_for,
    is_single_temp_name,
    is_temp_name,
    parse_member,
    remove_set_files,
)
from atomictools.engine.errors import AtomicToolsError, OutsideRootsError
from atomictools.engine.history.model import PathChange
from atomictools.engine.history.store import KeptContent, store_for
from atomictools.engine.sandbox import Sandbox

logger = logging.getLogger("atomictools.engine.changes.recovery")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


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


def _roll_forward(op: OpRecord, dirs: _Dirs, txid: str) -> str | None:
    """Finish one operation of a committed change set; returns a conflict, if any."""
    d = dirs.fd(op.dir)
    name, staged, backup = op.name, op.staged, op.backup
    if op.op == "replace":
        if staged and lstat_at(d, staged):
            current = lstat_at(d, name)
            replaced_since = (
                not same_file(current, lstat_at(d, backup)) if backup else current is not None
            )
            if replaced_since:  # by another process after the crash: its update wins
                unlink_at(d, staged)
                unlink_at(d, backup)
                return (
                    f"{op.dir}/{name}: replaced by someone else since the crash; "
                    "the change set's version of it was not applied"
                )
            os.replace(staged, name, src_dir_fd=d, dst_dir_fd=d)
        elif not same_file(lstat_at(d, name), lstat_at(d, op.link)) and (
            sha256_at(d, name) != op.sha256
        ):
            return f"{op.dir}/{name}: neither the staged nor the new content is there"
    elif op.op == "delete":
        current = lstat_at(d, name)
        if current is not None and same_file(current, lstat_at(d, backup)):
            os.unlink(name, dir_fd=d)
    elif op.op == "rmdir":
        current = lstat_at(d, name)
        if current is not None and stat.S_ISDIR(current.st_mode):
            try:
                remove_set_files(d, name, txid)
                os.rmdir(name, dir_fd=d)
            except OSError:
                return f"{op.dir}/{name}: not empty any more; the directory was kept"
    elif op.op == "move":
        assert op.source_dir is not None
        assert op.source_name is not None
        s = dirs.fd(op.source_dir)
        source, target = lstat_at(s, op.source_name), lstat_at(d, name)
        if source is not None and (target is None or same_file(target, lstat_at(d, backup))):
            os.rename(op.source_name, name, src_dir_fd=s, dst_dir_fd=d)
        elif source is not None:
            return f"{op.dir}/{name}: the destination changed; the move was not finished"
    unlink_at(d, backup)
    unlink_at(d, op.link)
    return None


def _roll_back(op: OpRecord, dirs: _Dirs) -> str | None:
    """Undo one operation (applied or not); returns a conflict, if any."""
    d = dirs.fd(op.dir)
    name, staged, backup = op.name, op.staged, op.backup
    if op.op == "replace":
        if staged and lstat_at(d, staged):
            unlink_at(d, staged)  # never applied
            unlink_at(d, backup)
        elif backup and lstat_at(d, backup):
            os.replace(backup, name, src_dir_fd=d, dst_dir_fd=d)
        elif same_file(lstat_at(d, name), lstat_at(d, op.link)) or (
            op.link is None and sha256_at(d, name) == op.sha256
        ):
            os.unlink(name, dir_fd=d)  # it was created by the change set
        elif lstat_at(d, name) is not None:
            unlink_at(d, op.link)
            return f"{op.dir}/{name}: changed since; not rolled back"
        unlink_at(d, op.link)
    elif op.op == "delete":
        if backup and lstat_at(d, name) is None and lstat_at(d, backup):
            os.rename(backup, name, src_dir_fd=d, dst_dir_fd=d)
        else:
            unlink_at(d, backup)
    elif op.op == "rmdir":
        if lstat_at(d, name) is None:
            os.mkdir(name, dir_fd=d)
    elif op.op == "move":
        assert op.source_dir is not None
        assert op.source_name is not None
        s = dirs.fd(op.source_dir)
        if lstat_at(s, op.source_name) is None and lstat_at(d, name) is not None:
            os.rename(name, op.source_name, src_dir_fd=d, dst_dir_fd=s)
            if backup and lstat_at(d, backup):
                os.rename(backup, name, src_dir_fd=d, dst_dir_fd=d)
        else:
            unlink_at(d, backup)
    return None


def _remove_created_dirs(record: JournalRecord, dirs: _Dirs, report: RecoveryReport) -> list[str]:
    """Remove the directories a change set made, with the orphaned files of ours inside."""
    problems = []
    claim = claim_name_for(record.txid)
    for parent, name in reversed(record.created_dirs):
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
                if entry == claim:
                    unlink_at(inner, entry)
                elif is_single_temp_name(entry) or _member_of(entry, record.txid):
                    sweep_one(inner, entry, report, False, display=f"{parent}/{name}/{entry}")
        finally:
            os.close(inner)
        try:
            os.rmdir(name, dir_fd=parent_fd)
        except OSError:
            problems.append(f"{parent}/{name}: not empty any more; left in place")
    return problems


def _remove_members(dir_fd: int, directory: str, txid: str, report: RecoveryReport) -> None:
    """Every file of the set left in a directory (reported), then its claim. A record written
    before the set staged anything (at a ``mkdir``) does not name what was staged after it,
    and a member left without its claim would look like another state directory's."""
    for entry in os.listdir(dir_fd):
        if _member_of(entry, txid):
            unlink_at(dir_fd, entry)
            report.removed.append(f"{directory}/{entry}")
    unlink_at(dir_fd, claim_name_for(txid))


def _member_of(name: str, txid: str) -> bool:
    member = parse_member(name)
    return member is not None and member.txid == txid


def record_path(journal_dir: Path, txid: str) -> Path:
    return journal_dir / f"{txid}{RECORD_SUFFIX}"


def recover_journals(
    sandbox: Sandbox,
    journal_dir: Path,
    *,
    rollback: bool = False,
    dry_run: bool = False,
    only: str | None = None,
) -> RecoveryReport:
    """Finish (or undo) every interrupted change set whose files lie inside the roots.

    ``only`` limits the run to one change set (a running server finishing a set it could
    not). Never raises: what it cannot do is in the report.
    """
    report = RecoveryReport()
    try:
        names = sorted(os.listdir(journal_dir))
    except FileNotFoundError:
        return report
    except OSError as err:
        report.journals_unreadable = (
            f"cannot list the journal directory {journal_dir} ({err.strerror}); change sets "
            "that were in flight cannot be finished, and their files are kept"
        )
        return report
    for name in names:
        if only is not None and name != f"{only}{RECORD_SUFFIX}":
            continue
        path = journal_dir / name
        if is_temp_name(name):  # a record that was being written: never the committed one
            with contextlib.suppress(OSError):
                journal_fd = os.open(journal_dir, _DIR_FLAGS)
                try:
                    sweep_one(journal_fd, name, report, dry_run, display=str(path))
                finally:
                    os.close(journal_fd)
        elif name.endswith(RECORD_SUFFIX):
            txid = name.removesuffix(RECORD_SUFFIX)
            try:
                _recover_record(sandbox, path, txid, report, rollback=rollback, dry_run=dry_run)
            except Exception as err:  # one record never stops the others (or a server start)
                logger.warning("recovering change set %s failed", txid, exc_info=True)
                report.leave(
                    UnfinishedSet(
                        txid,
                        f"could not be recovered ({type(err).__name__}: {err}); its record and "
                        "files were kept; run recovery again once that is fixed",
                        str(path),
                    )
                )
    return report


def _untrusted(report: RecoveryReport, txid: str, path: Path, reason: str) -> None:
    report.leave(
        UnfinishedSet(
            txid,
            f"has a journal record that cannot be trusted ({path}: {reason})",
            str(path),
            untrusted=True,
        )
    )


def _recover_record(
    sandbox: Sandbox,
    path: Path,
    txid: str,
    report: RecoveryReport,
    *,
    rollback: bool,
    dry_run: bool,
) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return  # finished meanwhile
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a symbolic link"
        if not stat.S_ISDIR(st.st_mode) and not stat.S_ISLNK(st.st_mode):
            kind = "not a regular file"
        _untrusted(report, txid, path, f"it is {kind}, not a record atomictools wrote")
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as err:
        _untrusted(report, txid, path, f"it cannot be opened: {err.strerror}")
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report.live.append(txid)  # its files are kept: its record exists (see sweep)
            return
        try:
            record = decode(_read(fd))
        except OSError as err:
            _untrusted(report, txid, path, f"it cannot be read: {err.strerror}")
            return
        except UntrustedRecordError as err:
            _untrusted(report, txid, path, err.reason)
            return
        if record.txid != txid:
            _untrusted(report, txid, path, f"it names change set {record.txid}")
            return
        _recover_trusted(sandbox, path, record, report, rollback=rollback, dry_run=dry_run)
    finally:
        os.close(fd)


def _recover_trusted(
    sandbox: Sandbox,
    path: Path,
    record: JournalRecord,
    report: RecoveryReport,
    *,
    rollback: bool,
    dry_run: bool,
) -> None:
    txid = record.txid
    targets = [os.path.join(op.dir, op.name) for op in record.ops]
    dirs = _Dirs(sandbox)
    try:
        try:
            for op in record.ops:
                dirs.fd(op.dir)
                if op.source_dir is not None:
                    dirs.fd(op.source_dir)
            for parent, _name in record.created_dirs:
                dirs.fd(parent)
        except AtomicToolsError:
            outside = sorted(_outside_dirs(record, dirs))
            report.other_roots.append(txid)
            report.leave(
                UnfinishedSet(
                    txid,
                    "touches directories outside the roots given ("
                    + ", ".join(outside)
                    + "); it was left as it is",
                    str(path),
                    paths=targets,
                    fix="run `atomictools recover` with every root it touches",
                )
            )
            return
        try:
            committed = _committed(record, path, sandbox, dry_run=dry_run)
        except _Undecided as err:
            report.leave(
                UnfinishedSet(
                    txid,
                    f"changes database {err.database} too, and whether its transaction "
                    f"committed cannot be read ({err.reason}); its record and files were kept",
                    str(path),
                    paths=targets,
                    fix="run `atomictools recover` again once that database can be opened",
                )
            )
            return
        # A database commit cannot be taken back: such a set is finished, never half undone.
        forward = committed and (not rollback or record.database is not None)
        if committed and rollback and record.database is not None:
            report.conflicts.append(
                f"change set {txid}: rolled forward, not back: its transaction on database "
                f"{record.database['name']} had committed, and atomictools cannot undo a "
                "database commit"
            )
        durable = record.durability != "fast"
        if dry_run:
            (report.rolled_forward if forward else report.rolled_back).append(txid)
            return
        conflicts: list[str] = []
        try:
            if forward:
                _record_history(record, dirs, path.parent.parent)
                conflicts = [
                    c for op in record.ops if (c := _roll_forward(op, dirs, txid)) is not None
                ]
            elif committed:
                conflicts = [
                    c for op in reversed(record.ops) if (c := _roll_back(op, dirs)) is not None
                ]
                _forget_history(record, path.parent.parent)
            else:  # never committed: no target was touched; drop what it staged
                for op in record.ops:
                    d = dirs.fd(op.dir)
                    for member in (op.link, op.staged, op.backup):
                        unlink_at(d, member)
            if not forward:
                conflicts += _remove_created_dirs(record, dirs, report)
            keyed = not forward or _record_key(record, report, conflicts)
            if keyed:  # the set is over: its files and claims go, in the same directory syncs
                for directory in record.member_dirs():  # one left behind: the sweep takes it
                    with contextlib.suppress(OSError, AtomicToolsError):
                        _remove_members(dirs.fd(directory), directory, txid, report)
            if durable:
                dirs.sync_all()
        except (OSError, AtomicToolsError) as err:
            reason = err.strerror if isinstance(err, OSError) else str(err)
            report.leave(
                UnfinishedSet(
                    txid,
                    f"could not be {'finished' if forward else 'rolled back'} ({reason}); its "
                    "record was kept, so running recovery again once that is fixed goes on "
                    "where this run stopped",
                    str(path),
                    paths=targets,
                )
            )
            return
        report.conflicts.extend(f"change set {txid}: {c}" for c in conflicts)
        if not keyed:
            return  # the record stays: the next recovery records the key
    finally:
        dirs.close()
    # Only once what it did is durable: a record that came back after a power loss would be
    # finished again, over files changed since.
    path.unlink()
    if durable:
        journal_fd = os.open(path.parent, _DIR_FLAGS)
        try:
            fsutil.sync_directory(journal_fd)
        finally:
            os.close(journal_fd)
    if record.database is not None:  # after the record: never a false "absent"
        _drop_marker(record, sandbox)
    report.handled.add(txid)
    (report.rolled_forward if forward else report.rolled_back).append(txid)


class _Undecided(Exception):
    """The database a prepared set names cannot tell whether the set committed."""

    def __init__(self, database: str, reason: str) -> None:
        super().__init__(reason)
        self.database = database
        self.reason = reason


def _committed(record: JournalRecord, path: Path, sandbox: Sandbox, *, dry_run: bool) -> bool:
    """Did the set pass its commit point? A prepared set's database answers (its marker),
    in a write transaction whose commit makes the answer final (``markers.decide``; a dry
    run only reads)."""
    if record.state != "prepared":
        return record.committed
    assert record.database is not None
    name = str(record.database["name"])
    if record.database.get("kind") == "postgres":
        try:
            url, xid = str(record.database["path"]), record.database.get("xid")
            return pgmarkers.decide(url, record.txid, str(xid) if xid else None)
        except Exception as err:  # the driver's errors, a missing driver, a timeout: undecided
            raise _Undecided(name, f"{type(err).__name__}: {err}") from err
    try:
        with _marker_connection(record, sandbox) as conn:
            if dry_run:
                return markers.present(conn, record.txid)
            conn.execute("BEGIN IMMEDIATE")
            try:
                found = markers.decide(conn, record.txid, str(path))
                conn.execute("COMMIT")
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            return found
    except (OSError, sqlite3.Error, AtomicToolsError) as err:
        raise _Undecided(name, str(err)) from err


@contextlib.contextmanager
def _marker_connection(record: JournalRecord, sandbox: Sandbox) -> Iterator[sqlite3.Connection]:
    """The database a record names: through the sandbox when it lies inside the roots (a
    link on the way cannot lead out), by its path when the operator named one elsewhere."""
    assert record.database is not None
    path = str(record.database["path"])
    try:
        location = sandbox.resolve(path)
    except OutsideRootsError:
        location = None
    with location if location is not None else contextlib.nullcontext():
        if location is None:
            conn = markers.connect(path)
        elif location.lstat() is None:
            raise FileNotFoundError(errno.ENOENT, "the database file is missing", path)
        else:  # the directory stays open while SQLite may still open -wal and -shm in it
            conn = markers.connect(f"/proc/self/fd/{location.dir_fd}/{location.name}")
        try:
            yield conn
        finally:
            conn.close()


def _drop_marker(record: JournalRecord, sandbox: Sandbox) -> None:
    """The set is over: its marker (and the row ``markers.decide`` wrote) go; a failure is
    harmless: the next set drops them."""
    assert record.database is not None
    if record.database.get("kind") == "postgres":
        try:
            pgmarkers.drop(str(record.database["path"]), record.txid)
        except Exception as err:  # best effort, as below
            logger.info("change set %s: its database marker stays for now (%s)", record.txid, err)
        return
    try:
        with _marker_connection(record, sandbox) as conn:
            conn.execute("BEGIN IMMEDIATE")
            markers.delete(conn, record.txid)
            conn.execute("COMMIT")
    except (OSError, sqlite3.Error, AtomicToolsError) as err:
        logger.info("change set %s: its database marker stays for now (%s)", record.txid, err)


def _outside_dirs(record: JournalRecord, dirs: _Dirs) -> set[str]:
    """The directories of a record that the sandbox refuses (outside the roots)."""
    named = [op.dir for op in record.ops]
    named += [op.source_dir for op in record.ops if op.source_dir is not None]
    named += [parent for parent, _name in record.created_dirs]
    outside = set()
    for directory in named:
        try:
            dirs.fd(directory)
        except (AtomicToolsError, OSError):
            outside.add(directory)
    return outside


def _record_history(record: JournalRecord, dirs: _Dirs, state_dir: Path) -> None:
    """A set rolled forward gets the history entry it carries, unless it has it already;
    its kept content comes from the backup members, which are still there (raises
    ``StateDirError`` when the store cannot take it: the record is then kept)."""
    entry = record.history
    if entry is None:
        return
    store = store_for(state_dir)
    change_id = str(entry["id"])
    if store.exists(change_id):
        return
    kept, available = [], set()
    for item in entry.get("kept", []):
        directory, name = str(item["member"]).rsplit("/", 1)
        d = dirs.fd(directory)
        if lstat_at(d, name) is None:
            continue  # gone (a power loss before it was synced): that path cannot be undone
        kept.append(KeptContent(str(item["sha256"]), int(item["size"]), dir_fd=d, name=name))
        available.add(str(item["sha256"]))
    rows = []
    for raw in entry.get("paths", []):
        row = PathChange.from_json(raw)
        if row.blob is not None and row.blob not in available:
            row = dataclasses.replace(row, blob=None, pruned=True)
        rows.append(row)
    store.record(
        change_id,
        str(entry.get("op", "apply_changes")),
        rows,
        kept,
        durability=Durability(record.durability),
        pending=False,
        undoes=[str(u) for u in entry.get("undoes", [])],
        when=record.created,
        audit=entry.get("audit"),
    )


def _forget_history(record: JournalRecord, state_dir: Path) -> None:
    """A committed set rolled back on request: its entry (if it got one) goes."""
    if record.history is not None:
        store_for(state_dir).discard(str(record.history["id"]))


def _record_key(record: JournalRecord, report: RecoveryReport, conflicts: list[str]) -> bool:
    """A rolled-forward keyed change: record its key, so a retry returns instead of redoing.

    A change set that could be finished only in part records the key as failed, with why: a
    retry must neither redo the part that was applied nor be told that all of it was.
    """
    if record.idempotency is None:
        return True
    try:
        receipt, result = Receipt.from_record(record.idempotency)
        if conflicts:
            result = failed_result(
                "the first call with this key was interrupted by a crash, and recovery could "
                f"finish only part of change set {record.txid}: {'; '.join(conflicts)}. Read "
                "the files, then make what is still needed with a new key"
            )
        IdempotencyStore(Path(receipt.store)).record(receipt, result)
    except (OSError, sqlite3.Error, AtomicToolsError, KeyError, TypeError, ValueError) as err:
        report.leave(
            UnfinishedSet(
                record.txid,
                f"was finished, but its idempotency key could not be recorded ({err}); its "
                "journal is kept so the next recovery records it",
                None,
            )
        )
        return False
    return True


def _read(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)
