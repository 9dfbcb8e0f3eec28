"""The embedding API: a Workspace is a set of roots plus the atomic operations inside them.

It resolves the caller's path through the sandbox, refuses changes in read-only mode, takes the
locks of the entries a change touches, and hands the change to the pipeline in
``engine.changes``: the direct commit (one rename) without an idempotency key, the journaled
commit (an intent record) with one. Both run the same checks and say the same things. Every
method is a coroutine that is safe to cancel.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Literal, TypeVar

import anyio.to_thread

from atomictools.engine.changes import checks, direct
from atomictools.engine.changes.idempotency import (
    DEFAULT_TTL_SECONDS,
    LOCK_NAME,
    STORE_NAME,
    IdempotencyStore,
    Receipt,
    check_key,
    fingerprint,
    key_locked,
)
from atomictools.engine.changes.journaled import ChangeSetRunner, apply_change_set
from atomictools.engine.changes.model import Change, Params, Statement
from atomictools.engine.changes.recovery import recover_journals
from atomictools.engine.changes.recovery_report import RecoveryReport, Resolve, UnfinishedSet
from atomictools.engine.changes.sqlstep import SqlDatabase
from atomictools.engine.changes.sweep import sweep_temps
from atomictools.engine.changes.undo import plan_undo
from atomictools.engine.changes.unfinished import LockKey, UnfinishedSets, lock_key
from atomictools.engine.config import Durability, Limits, default_state_dir
from atomictools.engine.durable.locks import ChangeLocks
from atomictools.engine.durable.steps import step
from atomictools.engine.durable.writer import AtomicWriter
from atomictools.engine.errors import (
    AtomicToolsError,
    InvalidArgumentError,
    NotFoundError,
    NotUndoableError,
    ReadOnlyError,
    RecoveryNeededError,
)
from atomictools.engine.history import view as history_view
from atomictools.engine.history.model import HistoryEntry
from atomictools.engine.history.reconcile import reconcile_pending
from atomictools.engine.history.recording import (
    DEFAULT_MAX_AGE,
    DEFAULT_MAX_BYTES,
    History,
    Recording,
    WriteRecording,
)
from atomictools.engine.reads import files, listing
from atomictools.engine.reads.lines import LineRange, read_lines
from atomictools.engine.results import (
    BytesRead,
    ChangeOutcome,
    ChangeSetResult,
    CopyResult,
    DeleteResult,
    DirListing,
    EditResult,
    FileInfo,
    MkdirResult,
    MoveResult,
    Progress,
    SearchResult,
    TextRead,
    TreeNode,
    UndoResult,
    WriteResult,
)
from atomictools.engine.sandbox import Location, Sandbox
from atomictools.engine.text.edits import Edit

T = TypeVar("T")
PathArg = str | os.PathLike[str]
EditArg = Edit | tuple[str, str]


class Workspace:
    """Atomic file operations confined to ``roots``.

    >>> ws = Workspace(["/srv/project"])                       # doctest: +SKIP
    >>> await ws.write("notes.txt", "hello\\n")                 # doctest: +SKIP

    Guarantees: every change is all-or-nothing (readers see the old or the new content, never
    a mix), a cancelled or failed call leaves no temp file and changes nothing, and no path
    outside the roots is read or written (``..``, symlinks and races included). With
    ``idempotency_key`` a change is also journaled: a retry returns the first result, and a
    crash mid-change is rolled forward or back by ``recover``. ``durability="full"`` (default)
    fsyncs every change before reporting it; ``"fast"`` skips the fsyncs (still atomic, not
    power-loss safe). ``read_only=True`` refuses every change. Caveats: atomic renames need a
    local POSIX file system (not NFS with several writers); changes are serialised per path
    within this process and by directory locks across processes that use atomictools.
    """

    def __init__(
        self,
        roots: Iterable[PathArg],
        *,
        durability: Durability | str = Durability.FULL,
        limits: Limits | None = None,
        read_only: bool = False,
        state_dir: PathArg | None = None,
        idempotency_ttl: float = DEFAULT_TTL_SECONDS,
        history: bool = True,
        history_max_bytes: int = DEFAULT_MAX_BYTES,
        history_max_age: float = DEFAULT_MAX_AGE,
    ) -> None:
        self.sandbox = Sandbox(roots)
        self.durability = Durability(durability)
        self.limits = limits or Limits()
        self.read_only = read_only
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        self.idempotency_ttl = idempotency_ttl
        self.history = History(
            self.state_dir,
            enabled=history,
            max_bytes=history_max_bytes,
            max_age=history_max_age,
        )
        """Every change is recorded with what it replaced (see ``history`` and ``undo``)."""
        self._locks = ChangeLocks()
        self._unfinished = UnfinishedSets(self.sandbox, self.journal_dir)
        self._key_scope = fingerprint(sorted(str(root) for root in self.roots))
        """Keys are per set of configured roots: a relative path means another file elsewhere."""

    def __repr__(self) -> str:
        return f"Workspace({[str(p) for p in self.roots]!r}, durability={self.durability.value!r})"

    @property
    def roots(self) -> tuple[Path, ...]:
        return tuple(root.path for root in self.sandbox.roots)

    @property
    def journal_dir(self) -> Path:
        return self.state_dir / "journals"

    def narrowed(self, paths: Iterable[PathArg]) -> Workspace:
        """A view limited to ``paths`` (each resolved inside this workspace's roots).

        The view shares this workspace's locks and unfinished sets, so changes made through
        either are serialised together. Used for MCP client roots: the configured roots stay
        the outer limit.
        """
        inner: list[Path] = []
        for path in paths:
            with self.sandbox.resolve(path) as location:
                inner.append(location.abspath)
        view = Workspace(
            inner,
            durability=self.durability,
            limits=self.limits,
            read_only=self.read_only,
            state_dir=self.state_dir,
            idempotency_ttl=self.idempotency_ttl,
        )
        view.history = self.history
        view._locks = self._locks
        view._unfinished = self._unfinished
        view._key_scope = self._key_scope
        return view

    # -- unfinished change sets ---------------------------------------------------------------

    def note_unfinished(self, report: RecoveryReport) -> None:
        """Refuse the paths of the change sets a recovery left unfinished, until they are
        finished (by a later call, ``finish_unfinished``, or another process)."""
        self._unfinished.note(report)

    @property
    def unfinished(self) -> list[UnfinishedSet]:
        """Change sets this workspace knows are unfinished (their paths are refused)."""
        return list(self._unfinished.sets.values())

    async def finish_unfinished(self) -> list[str]:
        """Try again to finish every unfinished change set; returns the txids now finished."""
        return await self._unfinished.finish_all()

    # -- recovery -------------------------------------------------------------------------------

    async def recover_interrupted(self) -> RecoveryReport:
        """Finish or undo the change sets a crash interrupted (their journal records), then
        decide the history entries it left pending, in one worker thread; what cannot be done
        now makes only its own paths refused."""

        def recover() -> RecoveryReport:
            report = recover_journals(self.sandbox, self.journal_dir)
            self._reconcile_history(report, False)
            return report

        report = await anyio.to_thread.run_sync(recover)
        self.note_unfinished(report)
        return report

    def _reconcile_history(self, report: RecoveryReport, dry_run: bool) -> None:
        """Decide the history entries a crash left pending (after the journals, before the
        sweep: the sweep would remove the staged temps that say a rename never happened)."""
        if not self.history.exists():
            return
        try:
            done = reconcile_pending(self.sandbox, self.history.store, dry_run=dry_run)
        except AtomicToolsError as err:
            report.history_problem = str(err)
            return
        report.history_confirmed.extend(done.confirmed)
        report.history_dropped.extend(done.dropped)

    async def sweep(self, after: RecoveryReport | None = None) -> RecoveryReport:
        """Remove our orphaned temp files under the roots, in a worker thread (abandoned on
        cancel: it only deletes what no live writer holds and no change set needs)."""
        report = await anyio.to_thread.run_sync(
            functools.partial(
                sweep_temps, self.sandbox, after or RecoveryReport(), journal_dir=self.journal_dir
            ),
            abandon_on_cancel=True,
        )
        self.note_unfinished(report)
        return report

    def recover(
        self,
        *,
        rollback: bool = False,
        forward: bool = False,
        dry_run: bool = False,
        on_progress: Callable[[int], None] | None = None,
    ) -> RecoveryReport:
        """What ``atomictools recover`` does, synchronously: journals first, then the sweep.

        ``forward``/``rollback`` also decide change sets whose record cannot be trusted, from
        their files on disk; without either, such a set is reported and left as it is.
        """
        resolve: Resolve | None = "rollback" if rollback else "forward" if forward else None
        report = recover_journals(
            self.sandbox, self.journal_dir, rollback=rollback, dry_run=dry_run
        )
        self._reconcile_history(report, dry_run)
        return sweep_temps(
            self.sandbox,
            report,
            journal_dir=self.journal_dir,
            dry_run=dry_run,
            resolve=resolve,
            on_progress=on_progress,
        )

    def absolute(self, path: PathArg) -> Path:
        """The absolute path ``path`` names inside the roots (symlinks resolved, confined)."""
        with self.sandbox.resolve(path) as location:
            return location.abspath

    def shown(self, path: PathArg) -> str:
        """``path`` as results show it: relative to its root (``.`` for the root itself)."""
        with self.sandbox.resolve(path) as location:
            return location.display

    # -- reads ------------------------------------------------------------------------------

    async def read_text(
        self,
        path: PathArg,
        *,
        head: int | None = None,
        tail: int | None = None,
        offset: int | None = None,
        limit: int | None = None,
    ) -> TextRead:
        """Text of a file, or some of its lines: the first ``head``, the last ``tail``, or
        ``limit`` lines from line ``offset`` (1-based); a part costs what it returns, not the
        file. With its sha256 (see ``TextRead.sha256`` for parts), encoding and newlines."""
        lines = LineRange.of(head=head, tail=tail, offset=offset, limit=limit)
        with self.sandbox.resolve(path) as location:
            if lines is None:
                return await files.read_text(location, self.limits)
            return await read_lines(location, self.limits, lines)

    async def read_bytes(self, path: PathArg) -> BytesRead:
        """A file's bytes (bounded by ``Limits.max_read_bytes``), sha256 and MIME type."""
        with self.sandbox.resolve(path) as location:
            return await files.read_bytes(location, self.limits)

    async def info(self, path: PathArg) -> FileInfo:
        """Size, times, type and permissions of an entry (a symlink is followed)."""
        with self.sandbox.resolve(path) as location:
            return listing.file_info(location)

    async def list_directory(self, path: PathArg = ".", *, sizes: bool = True) -> DirListing:
        """The entries of one directory (our own temp files are never shown). ``sizes=False``
        leaves file sizes None and lists without a stat per entry (types come from the
        directory itself), several times faster on a large directory."""
        with self.sandbox.resolve(path) as location:
            return await listing.list_directory(location, self.limits, sizes=sizes)

    async def tree(
        self,
        path: PathArg = ".",
        *,
        exclude: Sequence[str] = (),
        max_depth: int | None = None,
        progress: Progress | None = None,
    ) -> TreeNode:
        """A directory's tree, bounded by ``Limits`` and ``max_depth``; ``exclude`` globs."""
        with self.sandbox.resolve(path) as location:
            return await listing.directory_tree(
                location,
                self.limits,
                exclude=tuple(exclude),
                max_depth=max_depth,
                progress=progress,
            )

    async def search(
        self,
        path: PathArg,
        pattern: str,
        *,
        exclude: Sequence[str] = (),
        progress: Progress | None = None,
    ) -> SearchResult:
        """Paths below ``path`` whose name (or relative path) matches the glob ``pattern``."""
        if not pattern:
            raise InvalidArgumentError("pattern is empty; give a glob such as '*.py'")
        with self.sandbox.resolve(path) as location:
            return await listing.search(
                location, pattern, self.limits, exclude=tuple(exclude), progress=progress
            )

    # -- changes ----------------------------------------------------------------------------

    def _recording(self, op: str) -> Recording | None:
        return self.history.recording(op, self.durability, self.limits)

    def _write_hook(self, op: str, location: Location) -> WriteRecording | None:
        recording = self._recording(op)
        return WriteRecording(recording, location) if recording is not None else None

    def _refuse_if_read_only(self, action: str, path: PathArg) -> None:
        if self.read_only:
            raise ReadOnlyError(
                f"cannot {action} {os.fspath(path)}: the workspace is read-only; "
                "it can be read but not changed"
            )

    def _changing(self, *locations: Location) -> AbstractAsyncContextManager[None]:
        """Serialise changes to these entries with every other change to them, in this process
        (through any workspace view) and in other processes (a lock on their directories)."""
        return self._hold([lock_key(loc) for loc in locations], locations)

    def _hold(
        self, keys: Sequence[LockKey], locations: Sequence[Location]
    ) -> AbstractAsyncContextManager[None]:
        held = {key: loc.dir_fd for key, loc in zip(keys, locations, strict=True)}
        if self._unfinished.blocks_any(keys):
            return self._hold_after_settling(keys, locations, held)
        return self._locks.hold(held)

    @asynccontextmanager
    async def _hold_after_settling(
        self,
        keys: Sequence[LockKey],
        locations: Sequence[Location],
        held: dict[LockKey, int],
    ) -> AsyncIterator[None]:
        """A path of an unfinished change set: finish the set first if that can be done now
        (another process may have finished it already), else refuse with what to run."""
        await self._unfinished.settle(keys, locations)
        async with self._locks.hold(held):
            yield

    async def write(
        self,
        path: PathArg,
        content: str | bytes,
        *,
        encoding: str = "utf-8",
        expected_sha256: str | None = None,
        create_only: bool = False,
        progress: Progress | None = None,
        idempotency_key: str | None = None,
    ) -> WriteResult:
        """Create or replace a file atomically: readers see the old or the new content.

        ``expected_sha256`` refuses the write if the file changed since it was read (no lost
        update); ``create_only`` refuses it if the file exists. With ``idempotency_key`` (as for
        every change), a retry returns the first result and changes nothing.
        """
        self._refuse_if_read_only("write", path)
        data = content.encode(encoding) if isinstance(content, str) else bytes(content)
        checks.check_write_size(os.fspath(path), len(data), self.limits)
        if idempotency_key is not None:
            change = Change(
                "write",
                os.fspath(path),
                content=data,
                expected_sha256=expected_sha256,
                create_only=create_only,
            )
            done = await self._once(change, idempotency_key, progress)
            return WriteResult(done.path, _known(done.size), _known(done.sha256), done.created)
        with self.sandbox.resolve(path) as location:
            async with self._changing(location):
                return await direct.write(
                    location,
                    data,
                    durability=self.durability,
                    create_only=create_only,
                    expected_sha256=expected_sha256,
                    limits=self.limits,
                    progress=progress,
                    recording=self._recording("write"),
                )

    @asynccontextmanager
    async def atomic_writer(
        self, path: PathArg, *, expected_sha256: str | None = None, create_only: bool = False
    ) -> AsyncIterator[AtomicWriter]:
        """Stream a large file: ``async with ws.atomic_writer(p) as w: await w.write(chunk)``.

        Memory stays bounded by the chunk size. The target changes only if the block exits
        cleanly; an exception or cancellation inside it leaves the target as it was.
        """
        self._refuse_if_read_only("write", path)
        with self.sandbox.resolve(path) as location:
            async with (
                self._changing(location),
                direct.open_writer(
                    location,
                    durability=self.durability,
                    limits=self.limits,
                    create_only=create_only,
                    expected_sha256=expected_sha256,
                    hook=self._write_hook("write", location),
                ) as writer,
            ):
                yield writer

    async def edit(
        self,
        path: PathArg,
        edits: Sequence[EditArg],
        *,
        dry_run: bool = False,
        expected_sha256: str | None = None,
        idempotency_key: str | None = None,
    ) -> EditResult:
        """Apply exact ``old -> new`` replacements all-or-nothing; returns a unified diff.

        Each ``old`` must match exactly once; encoding, BOM and line endings are kept.
        ``dry_run`` checks everything and returns the diff without writing.
        """
        if not dry_run:
            self._refuse_if_read_only("edit", path)
        normalized = tuple(e if isinstance(e, Edit) else Edit(*e) for e in edits)
        if idempotency_key is not None and not dry_run:
            change = Change(
                "edit", os.fspath(path), edits=normalized, expected_sha256=expected_sha256
            )
            done = await self._once(change, idempotency_key)
            return EditResult(
                done.path,
                done.diff or "",
                applied=True,
                sha256=_known(done.sha256),
                previous_sha256=_known(done.previous_sha256),
                size=_known(done.size),
            )
        with self.sandbox.resolve(path) as location:
            async with self._changing(location):
                return await direct.edit(
                    location,
                    normalized,
                    durability=self.durability,
                    limits=self.limits,
                    dry_run=dry_run,
                    expected_sha256=expected_sha256,
                    recording=None if dry_run else self._recording("edit"),
                )

    async def move(
        self,
        source: PathArg,
        destination: PathArg,
        *,
        overwrite: bool = False,
        expected_sha256: str | None = None,
        idempotency_key: str | None = None,
    ) -> MoveResult:
        """Rename a file or directory (a symlink is moved as a link).

        ``expected_sha256`` refuses the move if the source file changed since it was read. A
        file moving to another file system is copied, then its source deleted, both through
        the journal: after a crash there is one of them, never both or neither.
        """
        self._refuse_if_read_only("move", source)
        change = Change(
            "move",
            os.fspath(destination),
            source=os.fspath(source),
            overwrite=overwrite,
            expected_sha256=expected_sha256,
        )
        if idempotency_key is None:
            with (
                self.sandbox.resolve(source, follow_final=False) as src,
                self.sandbox.resolve(destination, follow_final=False) as dst,
            ):
                if not direct.needs_journal(src, dst):
                    async with self._changing(src, dst):
                        try:
                            return await direct.move(
                                src,
                                dst,
                                overwrite=overwrite,
                                durability=self.durability,
                                limits=self.limits,
                                expected_sha256=expected_sha256,
                                recording=self._recording("move"),
                            )
                        except direct.CrossesMounts:
                            pass  # no rename can do it: the journal's copy-and-delete can
        done = await self._once(change, idempotency_key)
        return MoveResult(_known(done.source), done.path, replaced=not done.created)

    async def copy(
        self,
        source: PathArg,
        destination: PathArg,
        *,
        overwrite: bool = False,
        expected_sha256: str | None = None,
        idempotency_key: str | None = None,
    ) -> CopyResult:
        """Copy a file; the destination appears complete or not at all.

        ``expected_sha256`` is checked against the very bytes copied. Streamed: memory stays
        bounded by the chunk size, whatever the file's size.
        """
        self._refuse_if_read_only("copy to", destination)
        if idempotency_key is not None:
            change = Change(
                "copy",
                os.fspath(destination),
                source=os.fspath(source),
                overwrite=overwrite,
                expected_sha256=expected_sha256,
            )
            done = await self._once(change, idempotency_key)
            return CopyResult(
                _known(done.source),
                done.path,
                size=_known(done.size),
                sha256=_known(done.sha256),
                replaced=not done.created,
            )
        with self.sandbox.resolve(source) as src, self.sandbox.resolve(destination) as dst:
            async with self._changing(dst):
                return await direct.copy(
                    src,
                    dst,
                    overwrite=overwrite,
                    durability=self.durability,
                    limits=self.limits,
                    expected_sha256=expected_sha256,
                    recording=self._recording("copy"),
                )

    async def delete(
        self,
        path: PathArg,
        *,
        expected_sha256: str | None = None,
        idempotency_key: str | None = None,
    ) -> DeleteResult:
        """Delete a file or a symlink (never what the link points to); directories are refused."""
        self._refuse_if_read_only("delete", path)
        if idempotency_key is not None:
            change = Change("delete", os.fspath(path), expected_sha256=expected_sha256)
            done = await self._once(change, idempotency_key)
            return DeleteResult(done.path, _known(done.type))
        with self.sandbox.resolve(path, follow_final=False) as location:
            async with self._changing(location):
                return await direct.delete(
                    location,
                    durability=self.durability,
                    expected_sha256=expected_sha256,
                    limits=self.limits,
                    recording=self._recording("delete"),
                )

    async def mkdir(self, path: PathArg, *, idempotency_key: str | None = None) -> MkdirResult:
        """Create a directory and any missing parents (``mkdir -p``); fine if it exists."""
        self._refuse_if_read_only("create directory", path)
        if idempotency_key is not None:
            done = await self._once(Change("mkdir", os.fspath(path)), idempotency_key)
            return MkdirResult(done.path, created=done.created)
        await step("mkdir.before")
        # Inline, with no await inside: a cancel never splits a ``mkdir -p``.
        return direct.make_directories(
            self.sandbox, os.fspath(path), self.durability, self._recording("mkdir")
        )

    async def apply_changes(
        self,
        changes: Sequence[Change],
        *,
        dry_run: bool = False,
        progress: Progress | None = None,
        idempotency_key: str | None = None,
    ) -> ChangeSetResult:
        """Apply several changes as one: all of them or none, also across a crash.

        ``dry_run`` makes every check (paths, preconditions, edits) and returns the result with
        diffs, writing nothing. With ``idempotency_key``, a repeat of the same changes (by this
        or another process, also after a crash) returns the first call's result and changes
        nothing; the same key with other changes is refused. A dry run ignores the key.
        """
        if not dry_run and changes:
            first = changes[0]
            self._refuse_if_read_only(
                "change database" if first.op == "sql" else "change", first.path
            )
        if idempotency_key is None or dry_run:
            return await self._apply(changes, dry_run=dry_run, progress=progress, receipt=None)
        receipt = Receipt(
            str(self.state_dir / STORE_NAME),
            self._key_scope,
            check_key(idempotency_key),
            fingerprint([_change_args(change) for change in changes]),
            self.idempotency_ttl,
        )
        store = IdempotencyStore(Path(receipt.store))
        # One call per key at a time, in this process and across processes: a retry waits for
        # the first call, and a call with other arguments is then refused.
        async with key_locked(self.state_dir / LOCK_NAME, receipt):
            await self._finish_abandoned_change_sets()
            if (stored := store.lookup(receipt)) is not None:
                return ChangeSetResult.from_json(stored)
            return await self._apply(changes, dry_run=False, progress=progress, receipt=receipt)

    async def _once(
        self, change: Change, idempotency_key: str | None, progress: Progress | None = None
    ) -> ChangeOutcome:
        """One change through the journaled commit (a set of one): with a key, the key is
        recorded with it, by the call or by the recovery that finishes it."""
        done = await self.apply_changes(
            [change], progress=progress, idempotency_key=idempotency_key
        )
        return done.changes[0]

    async def _finish_abandoned_change_sets(self) -> None:
        """Finish change sets whose process died (their records are unlocked), off the loop.

        A keyed change set that died after its commit point records its key when finished, so
        this runs before a keyed call looks its key up. Live records are locked and skipped.
        """
        await self.recover_interrupted()

    async def _apply(
        self,
        changes: Sequence[Change],
        *,
        dry_run: bool,
        progress: Progress | None,
        receipt: Receipt | None,
        history_op: str | None = None,
        undoes: Sequence[str] = (),
    ) -> ChangeSetResult:
        runner = ChangeSetRunner(
            self.sandbox, self.journal_dir, durability=self.durability, limits=self.limits
        )
        runner.receipt = receipt
        runner.history = self.history
        runner.history_op = history_op or (changes[0].op if len(changes) == 1 else "apply_changes")
        runner.undoes = tuple(undoes)
        planned = runner.plan(changes, dry_run=dry_run)
        locations = [p.target for p in planned]
        locations += [p.source for p in planned if p.source is not None]
        try:
            keys = [lock_key(location) for location in locations]
            lock = self._hold(keys, locations)
        except BaseException:
            runner.close_locations()
            raise
        async with lock:
            try:
                return await apply_change_set(runner, dry_run=dry_run, progress=progress)
            except RecoveryNeededError:
                unfinished = UnfinishedSet(
                    runner.txid,
                    "was committed but could not be finished in this process",
                    runner.record_path,
                    paths=[str(location.abspath) for location in locations],
                )
                self._unfinished.block(unfinished, keys)
                raise

    # -- history and undo -----------------------------------------------------------------

    async def history_entries(
        self,
        *,
        path: PathArg | None = None,
        since: float | None = None,
        limit: int | None = 50,
        ids: Sequence[str] | None = None,
        database: bool = True,
    ) -> list[HistoryEntry]:
        """Recorded changes, newest first: those that touched ``path`` (or anything below it)
        if given, else anything inside the roots; ``since``: a Unix time; ``database``: also
        the database calls. Paths are shown relative to their root; paths outside the roots
        are left out. Each path's ``added``/``removed`` line counts are filled in when both
        versions are known text."""
        if not self.history.exists():
            return []
        if path is not None:
            prefixes = [str(self.absolute_unresolved(path))]
        else:
            prefixes = [str(root) for root in self.roots]
        return await anyio.to_thread.run_sync(
            functools.partial(
                history_view.entries_shown,
                self.sandbox,
                self.history.store,
                prefixes,
                since=since,
                limit=limit,
                ids=ids,
                database=database and path is None,
            )
        )

    async def undo(
        self,
        change_id: str | None = None,
        *,
        last: int | None = None,
        paths: Sequence[PathArg] | None = None,
        dry_run: bool = False,
        force: bool = False,
        progress: Progress | None = None,
    ) -> UndoResult:
        """Take back one recorded change (``change_id``) or the ``last`` N changes inside the
        roots: every path goes back to its state before, as one change set (all or none, also
        across a crash). A path changed since is refused, naming it, unless ``force``;
        ``paths`` restores only those; ``dry_run`` returns the diffs and changes nothing. The
        undo is recorded too: undoing it is a redo."""
        if (change_id is None) == (last is None):
            raise InvalidArgumentError("give either change_id or last (how many changes)")
        if last is not None and not 1 <= last <= 100:
            raise InvalidArgumentError("last must be between 1 and 100")
        if not dry_run:
            self._refuse_if_read_only("undo a change to", self.roots[0])
        if not self.history.exists():
            raise NotFoundError(
                "there is no history to undo from (history is off, or nothing was changed yet)"
            )
        if change_id is not None:
            entries = await self.history_entries(ids=[change_id], limit=None)
            if not entries:
                raise NotFoundError(
                    f"no recorded change {change_id!r} inside the allowed directories; "
                    "list_changes shows the recorded changes and their ids"
                )
        else:
            assert last is not None
            entries = await self.history_entries(limit=last, database=False)
            if not entries:
                raise NotFoundError("no recorded change inside the allowed directories to undo")
        for entry in entries:
            if entry.database is not None and not entry.paths:
                raise NotUndoableError(
                    f"change {entry.id} is a database call ({entry.op} on {entry.database}); "
                    "database calls are recorded for audit and cannot be undone"
                )
            if entry.database is not None and paths is None:
                raise NotUndoableError(
                    f"change {entry.id} also committed statements to database "
                    f"{entry.database}, which cannot be undone: taking back its files alone "
                    "would leave them out of step with the database. To do that anyway, name "
                    "the files in paths"
                )
        only = None if paths is None else [str(self.absolute_unresolved(p)) for p in paths]
        ids = [entry.id for entry in entries]
        raw = await anyio.to_thread.run_sync(
            functools.partial(
                self.history.store.entries, ids=ids, include_pending=False, limit=None
            )
        )
        plan = await anyio.to_thread.run_sync(
            functools.partial(
                plan_undo,
                self.sandbox,
                self.history.store,
                raw,
                only=only,
                force=force,
                max_bytes=self.limits.max_write_bytes,
            )
        )
        undone = tuple(sorted(ids, key=lambda i: -next(e.seq for e in raw if e.id == i)))
        if dry_run or not plan.changes:
            return UndoResult(
                undone, applied=not dry_run, change_id=None, paths=tuple(plan.restored)
            )
        done = await self._apply(
            plan.changes,
            dry_run=False,
            progress=progress,
            receipt=None,
            history_op="undo",
            undoes=undone,
        )
        return UndoResult(
            undone, applied=True, change_id=done.change_id, paths=tuple(plan.restored)
        )

    def absolute_unresolved(self, path: PathArg) -> Path:
        """``path`` as an absolute path inside the roots, its last component not followed
        (a link is named, not its target; the entry need not exist). A path whose directory
        is gone (a change removed it) is taken as spelled, and must lie inside the roots."""
        try:
            with self.sandbox.resolve(path, follow_final=False) as location:
                return location.abspath
        except NotFoundError:
            spelled = Path(os.path.expanduser(os.fspath(path)))
            candidate = Path(os.path.normpath(self.roots[0] / spelled))
            if history_view.shown_path(self.sandbox, str(candidate)) is None:
                raise
            return candidate

    def prune_history(self) -> int:
        """A retention pass now (it also runs every few hundred changes); the bytes freed."""
        return self.history.prune() if self.history.exists() else 0

    @asynccontextmanager
    async def changeset(self) -> AsyncIterator[ChangeSet]:
        """``async with ws.changeset() as cs: cs.write(...); cs.edit(...)``: applied at exit.

        Nothing happens unless the block exits cleanly; then the changes apply all-or-nothing
        and ``cs.result`` holds the outcome.
        """
        change_set = ChangeSet()
        yield change_set
        change_set.result = await self.apply_changes(change_set.changes)


def _known(value: T | None) -> T:
    """A field a change set fills in for this kind of change."""
    assert value is not None
    return value


def _change_args(change: Change) -> dict[str, object]:
    """What a keyed call's fingerprint covers: every argument of every change."""
    if change.op == "sql":
        database = change.database
        return {
            "op": "sql",
            "database": str(database.path) if database is not None else None,
            "statements": [[s.sql, s.params] for s in change.statements],
        }
    return {
        "op": change.op,
        "path": change.path,
        "content": change.content,
        "edits": [[edit.old, edit.new] for edit in change.edits],
        "source": change.source,
        "expected_sha256": change.expected_sha256,
        "overwrite": change.overwrite,
        "create_only": change.create_only,
        **({"mode": change.mode} if change.mode is not None else {}),
    }


class ChangeSet:
    """Collects the changes of ``Workspace.changeset()``; applied together when the block ends.

    Guarantee: all of them or none, also across a crash. Caveat: nothing is checked until the
    block ends; an error then names the change that failed (``change 2 of 3 (edit): ...``).
    """

    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.result: ChangeSetResult | None = None

    def write(self, path: str, content: str | bytes, *, expected_sha256: str | None = None) -> None:
        data = content.encode() if isinstance(content, str) else bytes(content)
        self.changes.append(Change("write", path, content=data, expected_sha256=expected_sha256))

    def edit(
        self, path: str, edits: Sequence[EditArg], *, expected_sha256: str | None = None
    ) -> None:
        normalized = tuple(e if isinstance(e, Edit) else Edit(*e) for e in edits)
        self.changes.append(Change("edit", path, edits=normalized, expected_sha256=expected_sha256))

    def move(
        self,
        source: str,
        destination: str,
        *,
        overwrite: bool = False,
        expected_sha256: str | None = None,
    ) -> None:
        self._transfer("move", source, destination, overwrite, expected_sha256)

    def copy(
        self,
        source: str,
        destination: str,
        *,
        overwrite: bool = False,
        expected_sha256: str | None = None,
    ) -> None:
        self._transfer("copy", source, destination, overwrite, expected_sha256)

    def _transfer(
        self,
        op: Literal["move", "copy"],
        source: str,
        destination: str,
        overwrite: bool,
        expected_sha256: str | None,
    ) -> None:
        self.changes.append(
            Change(
                op, destination, source=source, overwrite=overwrite, expected_sha256=expected_sha256
            )
        )

    def delete(self, path: str, *, expected_sha256: str | None = None) -> None:
        self.changes.append(Change("delete", path, expected_sha256=expected_sha256))

    def mkdir(self, path: str) -> None:
        self.changes.append(Change("mkdir", path))

    def sql(self, database: SqlDatabase, sql: str, params: Params = None) -> None:
        """A statement on ``database`` (a ``Database``), committed with the files as one.

        Consecutive statements on it form one step; every step of a set must use the same
        database (SQLite commits each database file on its own).
        """
        statement = Statement(sql, params)
        last = self.changes[-1] if self.changes else None
        if last is not None and last.op == "sql" and last.database is database:
            self.changes[-1] = dataclasses.replace(last, statements=(*last.statements, statement))
            return
        self.changes.append(
            Change("sql", database.name, database=database, statements=(statement,))
        )


def _workspace_of_file(path: PathArg, durability: Durability | str) -> tuple[Workspace, str]:
    """A workspace whose only root is the file's own directory, and the file's name in it."""
    target = Path(os.path.abspath(os.fspath(path)))
    if not target.parent.is_dir():
        raise NotFoundError(f"cannot write {target}: its directory does not exist")
    unlimited = Limits(max_write_bytes=sys.maxsize)
    return Workspace([target.parent], durability=durability, limits=unlimited), target.name


@asynccontextmanager
async def atomic_writer(
    path: PathArg,
    *,
    durability: Durability | str = Durability.FULL,
    expected_sha256: str | None = None,
    create_only: bool = False,
) -> AsyncIterator[AtomicWriter]:
    """Stream an atomic write to any path: ``async with atomic_writer("out.bin") as w: ...``.

    Guarantee: the file is replaced whole at a clean exit (fsynced, with its directory, unless
    ``durability="fast"``), or not at all. Caveat: the file's directory must exist; no limit
    on the size, since memory stays bounded by the chunk size.
    """
    workspace, name = _workspace_of_file(path, durability)
    async with workspace.atomic_writer(
        name, expected_sha256=expected_sha256, create_only=create_only
    ) as writer:
        yield writer


async def atomic_write(
    path: PathArg,
    content: str | bytes,
    *,
    durability: Durability | str = Durability.FULL,
    expected_sha256: str | None = None,
    create_only: bool = False,
) -> WriteResult:
    """Atomically create or replace one file anywhere, without setting up a workspace.

    Guarantee: readers see the old or the new content, never a mix; a crash leaves one of them
    (and at most a temp file that ``recover`` removes). Caveat: ``content`` is held in memory;
    stream large files with ``atomic_writer``.
    """
    workspace, name = _workspace_of_file(path, durability)
    return await workspace.write(
        name, content, expected_sha256=expected_sha256, create_only=create_only
    )


def recover(
    roots: Iterable[PathArg],
    *,
    state_dir: PathArg | None = None,
    rollback: bool = False,
    forward: bool = False,
    dry_run: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> RecoveryReport:
    """After a crash: finish (or, with ``rollback``, undo) interrupted change sets and remove
    orphaned temp files under ``roots``; returns what was done and what needs a person.

    Guarantee: nothing is deleted that a live process holds or that a change set still needs
    (a set whose journal lives in another state directory is reported, never torn). Caveat:
    it blocks while it walks the roots; from async code, run it in a worker thread. Give the
    same ``state_dir`` the crashed process used (default: the per-user state directory).
    """
    return Workspace(roots, state_dir=state_dir).recover(
        rollback=rollback, forward=forward, dry_run=dry_run, on_progress=on_progress
    )
