"""Atomic replacement of one file: a pending temp file that becomes the target only on commit.

Life cycle (the renameio shape): create a locked temp next to the target, write, fsync, then
``os.replace`` it over the target (the single commit point) and fsync the directory. Until the
replace, the target is untouched and any exit (error, cancellation) removes the temp; after it,
the change is done and is finished even if the caller is being cancelled. A failed fsync is
never retried, and the temp is then abandoned rather than renamed.

Caveat: the rename is atomic only on local POSIX file systems (not NFS with several clients, not
FAT). Readers see the old bytes or the new bytes, never a mix.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Protocol

import anyio
import anyio.lowlevel

from atomictools.engine.config import Durability, Limits
from atomictools.engine.durable import fsutil
from atomictools.engine.durable.blocking import run_blocking
from atomictools.engine.durable.steps import crash_point, step
from atomictools.engine.durable.tempfiles import create_locked_temp
from atomictools.engine.errors import (
    AlreadyExistsError,
    DurabilityUnknownError,
    from_os_error,
)
from atomictools.engine.sandbox import Location

DEFAULT_LIMITS = Limits()


class PendingFile:
    """A locked temp file in the target's directory; synchronous, one system call per method."""

    def __init__(
        self,
        location: Location,
        *,
        durability: Durability,
        replace: bool,
        name_for: Callable[[], str] | None = None,
    ) -> None:
        self.location = location
        self.durability = durability
        self.replace = replace
        self.name_for = name_for
        """Names the temp (a change set's member); a plain temp name by default."""
        self.committed = False
        self.synced = False
        self.fd = -1
        self.temp_name = ""

    def create(self, template: os.stat_result | None) -> None:
        """Create the temp; copy owner and mode from ``template`` (the file being replaced)."""
        loc = self.location
        try:
            self.fd, self.temp_name = create_locked_temp(
                loc.dir_fd, loc.name, name_for=self.name_for
            )
            if template is not None:
                if (template.st_uid, template.st_gid) != (os.getuid(), os.getgid()):
                    with suppress(PermissionError):
                        os.fchown(self.fd, template.st_uid, template.st_gid)
                os.fchmod(self.fd, stat.S_IMODE(template.st_mode))
        except OSError as err:
            raise from_os_error(err, loc.display, "write") from err

    def write(self, data: bytes | bytearray | memoryview) -> None:
        try:
            fsutil.write_all(self.fd, data)
        except OSError as err:
            raise from_os_error(err, self.location.display, "write") from err

    def sync(self) -> None:
        """fsync the temp (full durability); called at most once, whatever the outcome."""
        self.synced = True
        if self.durability is Durability.FULL:
            try:
                fsutil.durable_sync(self.fd)
            except OSError as err:
                raise from_os_error(err, self.location.display, "write") from err

    def publish(self) -> None:
        """The commit point: rename over (or, without ``replace``, next to) the target."""
        loc = self.location
        try:
            if self.replace:
                os.replace(self.temp_name, loc.name, src_dir_fd=loc.dir_fd, dst_dir_fd=loc.dir_fd)
            else:
                fsutil.rename_noreplace(loc.dir_fd, self.temp_name, loc.dir_fd, loc.name)
        except FileExistsError as err:
            raise AlreadyExistsError(
                f"cannot create {loc.display}: another process created it meanwhile; read it, "
                "then decide whether to replace it"
            ) from err
        except OSError as err:
            raise from_os_error(err, loc.display, "write") from err
        self.committed = True
        crash_point("write.renamed")
        with suppress(OSError):
            os.close(self.fd)
        self.fd = -1
        if self.durability is Durability.FULL:
            try:
                fsutil.sync_directory(loc.dir_fd)
            except OSError as err:
                raise DurabilityUnknownError(
                    f"{loc.display} was written, but syncing its directory failed "
                    f"({err.strerror}); the change may not survive a power loss"
                ) from err

    def discard(self) -> None:
        """Remove the temp unless it was committed; safe to call twice, never raises."""
        if self.fd >= 0:
            with suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        if not self.committed and self.temp_name:
            with suppress(OSError):
                os.unlink(self.temp_name, dir_fd=self.location.dir_fd)
            self.temp_name = ""


class AtomicWriter:
    """What ``atomic_writer`` yields: write chunks; the target changes only at a clean exit.

    Guarantee: readers see the old file until the block exits cleanly, then the whole new one;
    an exception or cancel inside the block leaves the target untouched and no temp file.
    Caveat: ``expected_sha256`` is checked when the block starts (``create_only`` also at the
    exit); other atomictools calls on the file wait for the block (a directory lock), but a
    program that is not atomictools writing the file meanwhile loses that write at the exit.
    """

    def __init__(
        self,
        pending: PendingFile,
        limits: Limits,
        *,
        replaced: bool,
        known_sha256: str | None = None,
    ) -> None:
        self._pending = pending
        self._limits = limits
        self._known_sha256 = known_sha256
        """The caller hashed the content already (a change set's staged bytes): not again."""
        self._digest = hashlib.sha256() if known_sha256 is None else None
        self._since_yield = 0
        self.size = 0
        self.replaced = replaced
        """True when an existing file is being replaced (False: a new file)."""

    async def write(
        self, data: bytes | bytearray | memoryview | str, *, last: bool = False
    ) -> None:
        """Append ``data`` (str is UTF-8 encoded); a cancellation point between chunks.

        ``last=True`` promises nothing follows, so the fsync shares the final chunk's worker
        call: one thread hop for a whole file of up to a chunk, instead of two.
        """
        payload = memoryview(data.encode() if isinstance(data, str) else data).cast("B")
        chunk = self._limits.chunk_bytes
        for start in range(0, len(payload), chunk):
            piece = payload[start : start + chunk]
            await step("write.chunk")
            sync = last and start + chunk >= len(payload)
            # The fsync that ends a write flushes the whole file: judge it by the total size.
            inline = self._limits.inline(self.size + len(piece) if sync else len(piece))
            await run_blocking(inline, self._put, piece, sync)
            self._since_yield = self._since_yield + len(piece) if inline else 0
            if self._since_yield >= chunk:  # many small inline writes: let other tasks run
                self._since_yield = 0
                await anyio.lowlevel.checkpoint()

    def _put(self, piece: memoryview, sync: bool) -> None:
        """Write, hash (and maybe fsync) one piece; in a worker thread when the piece is large."""
        self._pending.write(piece)
        if self._digest is not None:
            self._digest.update(piece)
        self.size += len(piece)
        if sync:
            self._pending.sync()

    @property
    def sha256(self) -> str:
        if self._digest is None:
            assert self._known_sha256 is not None
            return self._known_sha256
        return self._digest.hexdigest()


Precheck = Callable[[os.stat_result | None], Awaitable[None]]
"""Called with the target's current stat before the temp is made: the caller's preconditions."""


class CommitHook(Protocol):
    """Told about the commit point of one write (the history records the change with it)."""

    async def before_commit(
        self, pending: PendingFile, sha256: str, size: int, sync: Callable[[], None] | None
    ) -> None:
        """The content is staged; ``sync`` (when not None) must run before this returns (the
        hook may run it alongside its own fsync); the rename comes next (a raise prevents it)."""

    def committed(self) -> None:
        """The rename happened (also when syncing the directory after it failed)."""

    def abandoned(self) -> None:
        """The write ends without its rename, after ``before_commit`` was entered."""


def open_atomic_writer(
    location: Location,
    *,
    durability: Durability = Durability.FULL,
    create_only: bool = False,
    mode_from: os.stat_result | None = None,
    limits: Limits = DEFAULT_LIMITS,
    precheck: Precheck | None = None,
    hook: CommitHook | None = None,
) -> PendingWrite:
    """Stream new content for ``location``; it replaces the target atomically at a clean exit.

    ``async with open_atomic_writer(loc) as w: await w.write(chunk)``. Cancellable at every chunk
    and step until the rename. The rename and directory fsync run inline with no await between
    them, so a cancel cannot split the commit. An exception or cancellation before that leaves
    the target untouched and no temp behind. ``mode_from`` gives a new file the mode of another
    (a copy's source). ``precheck`` refuses the write before anything is made (the preconditions
    live with the changes, not here); ``create_only`` publishes without replacing. ``hook``
    hears of the commit point (it runs between the fsync and the rename).
    """
    return PendingWrite(
        location,
        durability=durability,
        create_only=create_only,
        mode_from=mode_from,
        limits=limits,
        precheck=precheck,
        hook=hook,
    )


class PendingWrite:
    """The async context of one atomic write (a plain class: it sits on every write's hot path)."""

    def __init__(
        self,
        location: Location,
        *,
        durability: Durability,
        create_only: bool,
        mode_from: os.stat_result | None,
        limits: Limits,
        precheck: Precheck | None,
        hook: CommitHook | None = None,
    ) -> None:
        self._location = location
        self._precheck = precheck
        self._hook = hook
        self._mode_from = mode_from
        self._limits = limits
        self._pending = PendingFile(location, durability=durability, replace=not create_only)
        self._writer: AtomicWriter | None = None

    async def __aenter__(self) -> AtomicWriter:
        existing = self._location.lstat()
        if self._precheck is not None:
            await self._precheck(existing)
        self._pending.create(existing or self._mode_from)  # metadata only: inline
        try:
            await step("write.created")
        except BaseException:
            self._pending.discard()
            raise
        self._writer = AtomicWriter(self._pending, self._limits, replaced=existing is not None)
        return self._writer

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        pending, hook = self._pending, self._hook
        hooked = False
        try:
            if exc_type is None and self._writer is not None:
                await step("write.written")
                if hook is not None:
                    hooked = True
                    sync = None if pending.synced else pending.sync
                    await hook.before_commit(pending, self._writer.sha256, self._writer.size, sync)
                elif not pending.synced:
                    await run_blocking(self._limits.inline(self._writer.size), pending.sync)
                await step("write.synced")
                pending.publish()  # the commit point, inline: nothing can cancel half of it
        finally:
            if hooked and hook is not None:
                if pending.committed:
                    hook.committed()
                else:
                    hook.abandoned()
            pending.discard()
