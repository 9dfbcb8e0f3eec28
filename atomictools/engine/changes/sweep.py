"""The sweep: remove files of ours that nobody needs any more, and never one that is needed.

It walks the roots (never following a symlink, never leaving them) and looks only at names that
match our patterns exactly (``tempfiles``):

- a single-file write's temp is removed when no live process holds its lock, it is past a short
  grace period (the window between creating a temp and locking it) and it is still the same
  inode when it is unlinked;
- a change set's staged file or backup is removed only when this run knows that its set does
  not need it: the set's record is absent from the journal directory its claim points to (the
  set never committed, or it is over) and no live process holds it. A set whose record lives in
  another state directory, or whose journal cannot be found or read, is left exactly as it is
  and reported as needing a person, with the command that finishes it;
- the files of a set whose record is in this state directory but cannot be trusted are listed
  in the report; with ``resolve`` ("forward" or "rollback", the operator's choice) each target
  is finished or undone from its files, where their hashes show it is safe;
- a claim goes once no member of its set is left beside it and its set is over.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import stat
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from atomictools.engine.changes.record import RECORD_SUFFIX
from atomictools.engine.changes.recovery_report import RecoveryReport, Resolve, UnfinishedSet
from atomictools.engine.durable import fsutil
from atomictools.engine.durable.fsutil import lstat_at, same_file, sha256_at, unlink_at
from atomictools.engine.durable.tempfiles import (
    Member,
    is_single_temp_name,
    is_temp_name,
    parse_claim,
    parse_member,
    temp_owner_pid,
)
from atomictools.engine.sandbox import Root, Sandbox

logger = logging.getLogger("atomictools.engine.changes.recovery")
GRACE_SECONDS = 5.0
DAMAGED_SUFFIX = ".damaged"
"""An untrusted record, once the operator resolved its set, is renamed with this suffix."""
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this pid runs (a zombie does not: it holds no lock, writes
    nothing, and only waits for its parent to collect it)."""
    if pid is None or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as status:
            state = status.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc: trust kill(0)
    return state not in (b"Z", b"X")


def _held(dir_fd: int, name: str) -> bool | None:
    """Whether a live process holds this regular file's lock (None: not a regular file)."""
    try:
        fd = fsutil.open_regular_at(dir_fd, name)
    except OSError:
        return None
    if fd is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def sweep_one(
    dir_fd: int,
    name: str,
    report: RecoveryReport,
    dry_run: bool,
    display: str,
) -> bool:
    """Remove one temp or member if no live process has it; never raises. True if removed.

    A young file of a live pid may be between its creation and its lock. A symlink (the backup
    of a symlink) has no lock: its pid alone says whether its writer lives.
    """
    owner = temp_owner_pid(name)
    member = not is_single_temp_name(name)
    try:
        before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if time.time() - before.st_mtime < GRACE_SECONDS and pid_alive(owner):
            return False
        if stat.S_ISLNK(before.st_mode):
            orphan = not pid_alive(owner) or (not member and owner == os.getpid())
            if orphan:
                if not dry_run:
                    os.unlink(name, dir_fd=dir_fd)
                report.removed.append(display)
            return orphan
        fd = fsutil.open_regular_at(dir_fd, name) if stat.S_ISREG(before.st_mode) else None
        if fd is None:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a live writer holds it
            if not same_file(os.fstat(fd), os.stat(name, dir_fd=dir_fd, follow_symlinks=False)):
                return False  # replaced meanwhile: not the file we looked at
            if not dry_run:
                os.unlink(name, dir_fd=dir_fd)
            report.removed.append(display)
            return True
        finally:
            os.close(fd)
    except OSError as err:
        logger.debug("sweep skipped %s: %s", display, err)
        return False


@dataclass
class _Resolution:
    """How resolving an untrusted change set from its files went, over all its directories."""

    done: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class _Sweep:
    def __init__(
        self,
        sandbox: Sandbox,
        report: RecoveryReport,
        journal_dir: Path,
        *,
        dry_run: bool,
        resolve: Resolve | None,
    ) -> None:
        self.sandbox = sandbox
        self.report = report
        self.journal_dir = journal_dir
        self.our_journals = os.path.realpath(journal_dir)
        self.dry_run = dry_run
        self.resolve = resolve
        self.resolutions: dict[str, _Resolution] = defaultdict(_Resolution)
        self.roots_args = " ".join(str(root.path) for root in sandbox.roots)

    # -- one directory -----------------------------------------------------------------------

    def directory(self, root: Root, dir_fd: int, rel: str, names: list[str]) -> None:
        members: dict[str, list[tuple[str, Member]]] = defaultdict(list)
        claims: dict[str, str] = {}
        for name in names:
            if is_single_temp_name(name):  # a single write's: no change set needs it
                shown = os.path.normpath(os.path.join(rel, name))
                sweep_one(dir_fd, name, self.report, self.dry_run, display=shown)
            elif (member := parse_member(name)) is not None:
                members[member.txid].append((name, member))
            elif (txid := parse_claim(name)) is not None:
                claims[txid] = name
        where = root.path / rel
        for txid, items in members.items():
            fate = self._fate(txid, dir_fd, claims.get(txid), items)
            if fate == "orphan":
                left = [
                    name
                    for name, _member in items
                    if not sweep_one(
                        dir_fd,
                        name,
                        self.report,
                        self.dry_run,
                        display=os.path.normpath(os.path.join(rel, name)),
                    )
                ]
                if not left and txid in claims:
                    self._remove_claim(dir_fd, rel, claims[txid])
            elif fate == "resolve":
                if self._resolve(dir_fd, where, txid, items) and txid in claims:
                    self._remove_claim(dir_fd, rel, claims[txid])
            else:
                self._describe(txid, where, items)
        for txid, claim in claims.items():
            if txid in members:
                continue
            # A young claim alone may be a live set's, about to stage its first member here;
            # not one whose set this run's journal recovery has just finished or undone.
            over = txid in self.report.handled
            if (over or self._claim_is_stale(dir_fd, claim)) and self._fate(
                txid, dir_fd, claim, []
            ) == "orphan":
                self._remove_claim(dir_fd, rel, claim)

    def _remove_claim(self, dir_fd: int, rel: str, claim: str) -> None:
        if not self.dry_run:
            with contextlib.suppress(OSError):
                unlink_at(dir_fd, claim)
        self.report.removed.append(os.path.normpath(os.path.join(rel, claim)))

    @staticmethod
    def _claim_is_stale(dir_fd: int, claim: str) -> bool:
        """A claim alone is made just before its set's first member: young ones may be live."""
        st = lstat_at(dir_fd, claim)
        return st is not None and time.time() - st.st_mtime >= GRACE_SECONDS

    # -- what becomes of a change set's files ----------------------------------------------------

    def _fate(
        self, txid: str, dir_fd: int, claim: str | None, items: list[tuple[str, Member]]
    ) -> str:
        """ "orphan" (its set does not need it), "resolve" (the operator decides), or "keep"."""
        report = self.report
        if txid in report.handled:
            return "orphan"
        ours = self.journal_dir / f"{txid}{RECORD_SUFFIX}"
        try:
            os.lstat(ours)
            present = True
        except FileNotFoundError:
            present = False
        except OSError as err:
            self._leave(txid, f"has files here, and its state directory cannot be read ({err})")
            return "keep"
        if present:
            known = report.unfinished.get(txid)
            if known is not None and known.untrusted and self.resolve is not None:
                return "resolve"
            return "keep"  # in flight, other roots, or left for a person: the record decides
        if report.journals_unreadable:
            self._leave(txid, f"has files here; {report.journals_unreadable}")
            return "keep"
        if claim is None:
            if self._live(dir_fd, items):
                return "keep"
            self._leave(
                txid,
                "has files here but no claim saying where its journal lives (it may belong to "
                "a server with another state directory)",
            )
            return "keep"
        try:
            record = os.readlink(claim, dir_fd=dir_fd)
        except OSError as err:
            self._leave(txid, f"has a claim that cannot be read ({err.strerror})")
            return "keep"
        if not os.path.isabs(record) or os.path.basename(record) != f"{txid}{RECORD_SUFFIX}":
            self._leave(txid, f"has a claim that does not name its journal record ({record!r})")
            return "keep"
        journals = os.path.dirname(record)
        if os.path.realpath(journals) == self.our_journals:
            return "orphan"  # our own journal directory, and no record: never committed, or over
        state_dir = os.path.dirname(journals)
        try:
            os.lstat(record)
            present = True
        except FileNotFoundError:
            present = False
            if os.path.isdir(journals) and os.access(journals, os.R_OK | os.X_OK):
                return "orphan"  # its journal directory has no record of it: it is over
        except OSError:
            present = True  # cannot tell: assume the worst
        if self._live(dir_fd, items):
            report.live.append(f"{txid} (journal in {state_dir})")
            return "keep"
        why = "is in flight or was interrupted" if present else "cannot be checked"
        self._leave(
            txid,
            f"{why}; its journal is in {state_dir}",
            journal=record,
            fix=f"run `atomictools recover --state-dir {state_dir} {self.roots_args}`",
        )
        return "keep"

    @staticmethod
    def _live(dir_fd: int, items: list[tuple[str, Member]]) -> bool:
        for name, member in items:
            held = _held(dir_fd, name)
            if held or (held is None and pid_alive(member.pid)):
                return True
        return False

    def _leave(self, txid: str, reason: str, *, journal: str | None = None, fix: str = "") -> None:
        known = self.report.leave(UnfinishedSet(txid, reason, journal, fix=fix))
        if fix and not known.fix:
            known.fix = fix

    def _describe(self, txid: str, where: Path, items: list[tuple[str, Member]]) -> None:
        """A set left for a person: name its files and the targets they are for."""
        known = self.report.unfinished.get(txid)
        if known is None:
            return
        for name, member in sorted(items):
            if member.target is not None and str(where / member.target) not in known.paths:
                known.paths.append(str(where / member.target))
            if str(where / name) not in known.members:
                known.members.append(str(where / name))
        if known.untrusted and not known.fix:
            known.fix = (
                f"to finish it from these files run `atomictools recover --forward "
                f"--state-dir {self.journal_dir.parent} {self.roots_args}`, or `--rollback` to "
                "undo it (each file is checked by its hash first; give every root it touched, "
                "and note that a move, or a directory it made, leaves no trace without the "
                "journal)"
            )

    # -- an untrusted record: the operator's choice, from the files ------------------------------

    def _resolve(
        self, dir_fd: int, where: Path, txid: str, items: list[tuple[str, Member]]
    ) -> bool:
        """Finish or undo, target by target, what the files in this directory allow."""
        resolution = self.resolutions[txid]
        by_target: dict[str | None, dict[str, str]] = defaultdict(dict)
        for name, member in items:
            by_target[member.target][member.role] = name
        clean = True
        for target, roles in by_target.items():
            shown = str(where / (target or "?"))
            if target is None:
                resolution.problems.append(
                    f"{shown}: its files do not carry its name (too long); left: "
                    + ", ".join(str(where / n) for n in roles.values())
                )
                clean = False
                continue
            try:
                problem = _resolve_target(
                    dir_fd, target, roles, dict(items), resolve=self.resolve, dry_run=self.dry_run
                )
            except OSError as err:
                problem = f"{err.strerror}"
            if problem is None:
                resolution.done.append(str(where / target))
            else:
                resolution.problems.append(f"{where / target}: {problem}")
                clean = False
        return clean

    def finish(self) -> None:
        """Untrusted sets resolved everywhere they were found: their records go."""
        if self.resolve is None:
            return
        for txid, known in list(self.report.unfinished.items()):
            if not known.untrusted:
                continue
            resolution = self.resolutions.get(txid, _Resolution())
            if resolution.problems:
                known.reason += (
                    f"; --{self.resolve} did what the files allow, except: "
                    + "; ".join(resolution.problems)
                )
                continue
            if not self.dry_run and known.journal is not None:
                try:  # kept for a person to look at, under a name recovery no longer reads
                    os.rename(known.journal, known.journal + DAMAGED_SUFFIX)
                except FileNotFoundError:
                    pass
                except OSError as err:
                    known.reason += f"; resolved, but its record could not be set aside ({err})"
                    continue
            del self.report.unfinished[txid]
            done = (
                self.report.rolled_forward if self.resolve == "forward" else self.report.rolled_back
            )
            done.append(txid)


def _resolve_target(
    dir_fd: int,
    target: str,
    roles: dict[str, str],
    members: dict[str, Member],
    *,
    resolve: Resolve | None,
    dry_run: bool,
) -> str | None:
    """Finish (forward) or undo (rollback) one target of an untrusted set; a problem, or None.

    A staged file must hash to the prefix its name carries; a backup is trusted by inode (the
    target is untouched while it still is the backup's inode), and so is a created file (it is
    the set's while it still is the inode of its ``crt`` name). Nothing changes on a problem.
    """
    staged, link = roles.get("new"), roles.get("crt")
    kind = next((role for role in ("old", "del", "dst") if role in roles), None)
    backup = roles.get(kind) if kind else None
    current = lstat_at(dir_fd, target)
    untouched = same_file(current, lstat_at(dir_fd, backup)) if backup else current is None
    ours = link is not None and same_file(current, lstat_at(dir_fd, link))
    applied_sha = members[staged or backup or link or ""].new_sha256_prefix if roles else None
    steps: list[Callable[[], None]] = []

    def rename(source: str, *, clobber: bool) -> None:
        if clobber:
            steps.append(lambda: os.replace(source, target, src_dir_fd=dir_fd, dst_dir_fd=dir_fd))
        else:  # never over a file that appeared meanwhile
            steps.append(lambda: fsutil.rename_noreplace(dir_fd, source, dir_fd, target))

    if resolve == "forward":
        if staged is not None:
            if (sha256_at(dir_fd, staged) or "")[:12] != applied_sha:
                return "its staged new version is damaged (its hash does not match); left"
            if not untouched:
                return "it changed since the change set began; its staged version was not applied"
            rename(staged, clobber=backup is not None)
        elif kind == "old" and (sha256_at(dir_fd, target) or "")[:12] != applied_sha:
            return "it holds neither the change set's version nor its old one; left"
        elif kind == "del" and untouched:
            steps.append(lambda: os.unlink(target, dir_fd=dir_fd))
        elif kind == "dst" and untouched:
            return "a move onto it cannot be finished without the journal (its source is unknown)"
    elif staged is not None:  # rollback of a change not applied yet: drop what it staged
        steps.append(lambda: os.unlink(staged, dir_fd=dir_fd))
    elif link is not None:  # rollback of a file it created
        if current is not None and not ours:
            return "the change set created it, and it was replaced since; left"
        if ours:
            steps.append(lambda: os.unlink(target, dir_fd=dir_fd))
    elif kind == "old" and not untouched:
        if (sha256_at(dir_fd, target) or "")[:12] != applied_sha:
            return "it changed since the change set; its old version was not restored"
        assert backup is not None
        rename(backup, clobber=True)
        backup = None
    elif kind == "del" and current is None:
        assert backup is not None
        rename(backup, clobber=False)
        backup = None
    elif kind == "del" and not untouched:
        return "it was deleted and made again since; its old version was not restored"
    elif kind == "dst" and not untouched:
        return "a move onto it cannot be undone without the journal (its source is unknown)"
    for leftover in (backup, link):
        if leftover is not None:
            steps.append(functools.partial(unlink_at, dir_fd, leftover))
    if not dry_run:
        for run in steps:
            run()
        fsutil.sync_directory(dir_fd)
    return None


def _walk_dirs(root_fd: int) -> Iterator[tuple[int, str, list[str]]]:
    """(dir fd, relative path, names) for every directory below the root; links not followed.

    ``os.fwalk`` lists a symlink to a directory among the directories: a claim pointing at a
    record that is a directory, or the backup of such a link, is one of our names all the same.
    """
    for rel, dirs, names, fd in os.fwalk(".", dir_fd=root_fd, follow_symlinks=False):
        yield fd, rel, names + [name for name in dirs if is_temp_name(name)]


def sweep_temps(
    sandbox: Sandbox,
    report: RecoveryReport | None = None,
    *,
    journal_dir: Path,
    dry_run: bool = False,
    resolve: Resolve | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> RecoveryReport:
    """Remove orphaned files of ours anywhere below the roots (see the module docstring).

    ``report`` carries what journal recovery did this run (its finished and left-alone sets).
    Never raises on the tree's content: what it cannot do is in the report.
    """
    report = report or RecoveryReport()
    sweep = _Sweep(sandbox, report, journal_dir, dry_run=dry_run, resolve=resolve)
    for root in sandbox.roots:
        try:
            root_fd = os.open(root.path, _DIR_FLAGS)
        except OSError as err:
            logger.warning("cannot sweep %s: %s", root.path, err)
            continue
        try:
            for dir_fd, rel, names in _walk_dirs(root_fd):
                report.scanned += len(names)
                sweep.directory(root, dir_fd, rel, names)
                if on_progress is not None:
                    on_progress(report.scanned)
        finally:
            os.close(root_fd)
    sweep.finish()
    return report
