"""The embedding API: a Workspace is a set of roots plus the atomic operations inside them.

It is the one place that joins the engine's pieces for a caller: resolve the user's path through
the sandbox, refuse changes in read-only mode, serialise changes to the same file, then run the
single-file operation. Every method is a coroutine that is safe to cancel (see ``fileops``).
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import AsyncIterator, Hashable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Literal, TypeVar

import anyio
import anyio.to_thread

from atomictools.engine.changes import direct
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
from atomictools.engine.changes.journaled import (
    Change,
    ChangeOutcome,
    ChangeSetResult,
    ChangeSetRunner,
    RecoveryNeededError,
    apply_change_set,
)
from atomictools.engine.changes.recovery import record_path, recover_journals
from atomictools.engine.changes.recovery_report import RecoveryReport, UnfinishedSet
from atomictools.engine.config import Durability, Limits, default_state_dir
from atomictools.engine.durable.locks import ChangeLocks
from atomictools.engine.durable.steps import step
from atomictools.engine.durable.writer import AtomicWriter, open_atomic_writer
from atomictools.engine.errors import (
    AtomicToolsError,
    InvalidArgumentError,
    NotFoundError,
    PartlyDoneError,
    ReadOnlyError,
    TooLargeError,
    WrongTypeError,
    from_os_error,
)
from atomictools.engine.reads import listing
from atomictools.engine.results import (
    BytesRead,
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
    WriteResult,
)
from atomictools.engine.sandbox import Location, Sandbox
from atomictools.engine.text.edits import Edit

T = TypeVar("T")
_RECOVER = "run `atomictools recover` with this server's --state-dir (or restart the server)"
PathArg = str | os.PathLike[str]
EditArg = Edit | tuple[str, str]


class Workspace:
    """Atomic file operations confined to ``roots``.

    >>> ws = Workspace(["/srv/project"])                       # doctest: +SKIP
    >>> await ws.write("notes.txt", "hello\\n")                 # doctest: +SKIP

    ``durability="full"`` (default) fsyncs every change before reporting it; ``"fast"`` skips
    the fsyncs (still atomic, not power-loss safe). ``read_only=True`` refuses every change.
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
    ) -> None:
        self.sandbox = Sandbox(roots)
        self.durability = Durability(durability)
        self.limits = limits or Limits()
        self.read_only = read_only
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        self.idempotency_ttl = idempotency_ttl
        self._locks = ChangeLocks()
        self._unrecovered: dict[Hashable, str] = {}
        """Lock keys of paths that belong to an unfinished change set, and its txid."""
        self._unfinished: dict[str, UnfinishedSet] = {}
        """Change sets that could not be finished, by txid (shared by every view)."""
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

        The view shares this workspace's locks, so changes made through either are serialised
        together. Used for MCP client roots: the configured roots stay the outer limit.
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
        view._locks = self._locks
        view._unrecovered = self._unrecovered
        view._unfinished = self._unfinished
        view._key_scope = self._key_scope
        return view

    # -- plumbing ---------------------------------------------------------------------------

    def _refuse_if_read_only(self, action: str, path: PathArg) -> None:
        if self.read_only:
            raise ReadOnlyError(
                f"cannot {action} {os.fspath(path)}: the workspace is read-only; "
                "it can be read but not changed"
            )

    @staticmethod
    def _lock_key(location: Location) -> tuple[int, int, str]:
        st = os.fstat(location.dir_fd)
        return (st.st_dev, st.st_ino, location.name)

    def _changing(self, *locations: Location) -> AbstractAsyncContextManager[None]:
        """Serialise changes to these entries with every other change to them, in this process
        (through any workspace view) and in other processes (a lock on their directories)."""
        return self._hold([self._lock_key(loc) for loc in locations], locations)

    def _hold(
        self, keys: Sequence[tuple[int, int, str]], locations: Sequence[Location]
    ) -> AbstractAsyncContextManager[None]:
        held = {key: loc.dir_fd for key, loc in zip(keys, locations, strict=True)}
        if self._unrecovered and any(key in self._unrecovered for key in keys):
            return self._hold_after_settling(keys, locations, held)
        return self._locks.hold(held)

    @asynccontextmanager
    async def _hold_after_settling(
        self,
        keys: Sequence[tuple[int, int, str]],
        locations: Sequence[Location],
        held: dict[tuple[int, int, str], int],
    ) -> AsyncIterator[None]:
        """A path of an unfinished change set: finish the set first if that can be done now
        (another process may have finished it already), else refuse with what to run."""
        for txid in {self._unrecovered[key] for key in keys if key in self._unrecovered}:
            if await anyio.to_thread.run_sync(self._try_finish, txid):
                self._unblock(txid)
        for key, location in zip(keys, locations, strict=True):
            blocked = self._unrecovered.get(key)
            if blocked is not None:
                unfinished = self._unfinished[blocked]
                raise RecoveryNeededError(
                    f"{location.display} is part of change set {blocked}, which "
                    f"{unfinished.reason}; {unfinished.fix or _RECOVER}",
                    changed=False,
                )
        async with self._locks.hold(held):
            yield

    # -- unfinished change sets ---------------------------------------------------------------

    def note_unfinished(self, report: RecoveryReport) -> None:
        """Refuse the paths of the change sets a recovery left unfinished, until they are
        finished (by a later call, ``finish_unfinished``, or another process)."""
        for txid in report.handled:
            self._unblock(txid)
        for unfinished in report.unfinished.values():
            keys = []
            for path in unfinished.paths:
                try:
                    with self.sandbox.resolve(path, follow_final=False) as location:
                        keys.append(self._lock_key(location))
                except (AtomicToolsError, OSError):
                    continue  # outside these roots, or its directory is gone
            self._block(unfinished, keys)

    def _block(self, unfinished: UnfinishedSet, keys: Iterable[Hashable]) -> None:
        self._unfinished[unfinished.txid] = unfinished
        self._unrecovered.update(dict.fromkeys(keys, unfinished.txid))

    def _unblock(self, txid: str) -> None:
        self._unfinished.pop(txid, None)
        for key in [key for key, blocked in self._unrecovered.items() if blocked == txid]:
            del self._unrecovered[key]

    @property
    def unfinished(self) -> list[UnfinishedSet]:
        """Change sets this workspace knows are unfinished (their paths are refused)."""
        return list(self._unfinished.values())

    async def finish_unfinished(self) -> list[str]:
        """Try again to finish every unfinished change set; returns the txids now finished."""
        finished = []
        for txid in list(self._unfinished):
            if await anyio.to_thread.run_sync(self._try_finish, txid):
                self._unblock(txid)
                finished.append(txid)
        return finished

    def _try_finish(self, txid: str) -> bool:
        """In a worker thread: is the change set finished now (by us, here, or by anyone)?"""
        unfinished = self._unfinished.get(txid)
        if unfinished is None:
            return True
        ours = record_path(self.journal_dir, txid)
        if os.path.lexists(ours) and not unfinished.untrusted:
            report = recover_journals(self.sandbox, self.journal_dir, only=txid)
            if txid in report.handled:
                return True
            if txid in report.unfinished:
                unfinished.reason = report.unfinished[txid].reason
            return False
        if unfinished.journal is not None and os.path.lexists(unfinished.journal):
            return False
        return not any(os.path.lexists(member) for member in unfinished.members)

    # -- reads ------------------------------------------------------------------------------

    async def read_text(
        self, path: PathArg, *, head: int | None = None, tail: int | None = None
    ) -> TextRead:
        """Text of a file (or its first/last lines), with its sha256, encoding and newlines."""
        with self.sandbox.resolve(path) as location:
            return await direct.read_text(location, self.limits, head=head, tail=tail)

    async def read_bytes(self, path: PathArg) -> BytesRead:
        with self.sandbox.resolve(path) as location:
            return await direct.read_bytes(location, self.limits)

    async def info(self, path: PathArg) -> FileInfo:
        with self.sandbox.resolve(path) as location:
            return listing.file_info(location)

    async def list_directory(self, path: PathArg = ".") -> DirListing:
        with self.sandbox.resolve(path) as location:
            return await listing.list_directory(location, self.limits)

    async def tree(
        self,
        path: PathArg = ".",
        *,
        exclude: Sequence[str] = (),
        max_depth: int | None = None,
        progress: Progress | None = None,
    ) -> TreeNode:
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
        if not pattern:
            raise InvalidArgumentError("pattern is empty; give a glob such as '*.py'")
        with self.sandbox.resolve(path) as location:
            return await listing.search(
                location, pattern, self.limits, exclude=tuple(exclude), progress=progress
            )

    # -- changes ----------------------------------------------------------------------------

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

        With ``idempotency_key`` (as for every change), a retry returns the first result.
        """
        self._refuse_if_read_only("write", path)
        data = content.encode(encoding) if isinstance(content, str) else bytes(content)
        if len(data) > self.limits.max_write_bytes:
            raise TooLargeError(
                f"the content for {os.fspath(path)} is {len(data)} bytes, more than the "
                f"{self.limits.max_write_bytes}-byte limit for one call; use the streaming writer"
            )
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
                open_atomic_writer(
                    location,
                    durability=self.durability,
                    create_only=create_only,
                    expected_sha256=expected_sha256,
                    limits=self.limits,
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
        """Apply exact ``old -> new`` replacements all-or-nothing; returns a unified diff."""
        if not dry_run:
            self._refuse_if_read_only("edit", path)
        normalized = [e if isinstance(e, Edit) else Edit(*e) for e in edits]
        if idempotency_key is not None and not dry_run:
            change = Change(
                "edit", os.fspath(path), edits=tuple(normalized), expected_sha256=expected_sha256
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

        ``expected_sha256`` refuses the move if the source file changed since it was read.
        """
        self._refuse_if_read_only("move", source)
        if idempotency_key is not None:
            change = Change(
                "move",
                os.fspath(destination),
                source=os.fspath(source),
                overwrite=overwrite,
                expected_sha256=expected_sha256,
            )
            done = await self._once(change, idempotency_key)
            return MoveResult(_known(done.source), done.path, replaced=not done.created)
        with (
            self.sandbox.resolve(source, follow_final=False) as src,
            self.sandbox.resolve(destination, follow_final=False) as dst,
        ):
            async with self._changing(src, dst):
                return await direct.move(
                    src,
                    dst,
                    overwrite=overwrite,
                    durability=self.durability,
                    limits=self.limits,
                    expected_sha256=expected_sha256,
                )

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

        ``expected_sha256`` refuses the copy if the source changed since it was read.
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
                )

    async def delete(
        self,
        path: PathArg,
        *,
        expected_sha256: str | None = None,
        idempotency_key: str | None = None,
    ) -> DeleteResult:
        """Delete a file or a symlink (never what the link points to)."""
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
            self._refuse_if_read_only("change", changes[0].path)
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
        self, change: Change, idempotency_key: str, progress: Progress | None = None
    ) -> ChangeOutcome:
        """A keyed single change runs as a one-change set: its key is then recorded with it,
        by the call or by the recovery that finishes it (see ``idempotency``)."""
        done = await self.apply_changes(
            [change], progress=progress, idempotency_key=idempotency_key
        )
        return done.changes[0]

    async def _finish_abandoned_change_sets(self) -> None:
        """Finish change sets whose process died (their records are unlocked).

        A keyed change set that died after its commit point records its key when finished, so
        this runs before a keyed call looks its key up. Live records are locked and skipped.
        """
        report = await anyio.to_thread.run_sync(recover_journals, self.sandbox, self.journal_dir)
        self.note_unfinished(report)

    async def _apply(
        self,
        changes: Sequence[Change],
        *,
        dry_run: bool,
        progress: Progress | None,
        receipt: Receipt | None,
    ) -> ChangeSetResult:
        runner = ChangeSetRunner(
            self.sandbox, self.journal_dir, durability=self.durability, limits=self.limits
        )
        runner.receipt = receipt
        planned = runner.plan(changes, dry_run=dry_run)
        locations = [p.target for p in planned]
        locations += [p.source for p in planned if p.source is not None]
        try:
            keys = [self._lock_key(location) for location in locations]
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
                self._block(unfinished, keys)
                raise

    @asynccontextmanager
    async def changeset(self) -> AsyncIterator[ChangeSet]:
        """``async with ws.changeset() as cs: cs.write(...); cs.edit(...)``: applied at exit.

        Nothing happens unless the block exits cleanly; then the changes apply all-or-nothing
        and ``cs.result`` holds the outcome.
        """
        change_set = ChangeSet()
        yield change_set
        change_set.result = await self.apply_changes(change_set.changes)

    async def mkdir(self, path: PathArg, *, idempotency_key: str | None = None) -> MkdirResult:
        """Create a directory and any missing parents (``mkdir -p``); fine if it exists."""
        self._refuse_if_read_only("create directory", path)
        if idempotency_key is not None:
            done = await self._once(Change("mkdir", os.fspath(path)), idempotency_key)
            return MkdirResult(done.path, created=done.created)
        maker = direct.directory_maker(self.durability)
        made: list[str] = []

        def make(dir_fd: int, name: str, parent: Path) -> None:
            maker(dir_fd, name, parent)
            made.append(str(parent / name))

        def create() -> MkdirResult:
            with self.sandbox.resolve(path, make_dir=make) as location:
                st = location.lstat()
                if st is not None:
                    if not stat.S_ISDIR(st.st_mode):
                        raise WrongTypeError(
                            f"cannot create directory {location.display}: a "
                            "file with that name exists"
                        )
                    return MkdirResult(location.display, created=False)
                try:
                    make(location.dir_fd, location.name, location.abspath.parent)
                except FileExistsError:
                    return MkdirResult(location.display, created=False)
                except OSError as err:
                    raise from_os_error(err, location.display, "create directory") from err
                return MkdirResult(location.display, created=True)

        def create_reporting_parents() -> MkdirResult:
            try:
                return create()
            except AtomicToolsError as err:
                if made and not err.changed:  # ``mkdir -p`` stopped half-way: say what it made
                    raise PartlyDoneError(
                        f"{err.message}; the parent directories {', '.join(made)} were "
                        "created before that and are kept"
                    ) from err
                raise

        await step("mkdir.before")
        return (
            create_reporting_parents()
        )  # inline, with no await inside: a cancel never splits a ``mkdir -p``


def _known(value: T | None) -> T:
    """A field a change set fills in for this kind of change."""
    assert value is not None
    return value


def _change_args(change: Change) -> dict[str, object]:
    """What a keyed call's fingerprint covers: every argument of every change."""
    return {
        "op": change.op,
        "path": change.path,
        "content": change.content,
        "edits": [[edit.old, edit.new] for edit in change.edits],
        "source": change.source,
        "expected_sha256": change.expected_sha256,
        "overwrite": change.overwrite,
        "create_only": change.create_only,
    }


class ChangeSet:
    """Collects the changes of ``Workspace.changeset()``; applied together when the block ends."""

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
    """Stream an atomic write to any path: ``async with atomic_writer("out.bin") as w: ...``."""
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
    """Atomically create or replace one file anywhere, without setting up a workspace."""
    workspace, name = _workspace_of_file(path, durability)
    return await workspace.write(
        name, content, expected_sha256=expected_sha256, create_only=create_only
    )
