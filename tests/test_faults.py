"""Fault injection: ENOSPC and EIO on write and on fsync, EACCES, a read-only directory.

For every fault the target is untouched, no temp file is left, and the error is the toolkit's
clear one ("... nothing was changed"). The one exception is a failing fsync of the *directory*
after the rename: the new content is then visible and the error says durability is unknown.

Most faults are injected by replacing the ``os`` module seen by one engine module with a proxy
that fails one chosen call (the rest goes to the real ``os``), so the event loop, pytest and the
other engine modules keep the real system calls. A real ENOSPC comes from a 1 MiB tmpfs when the
tests run as root, and a real EACCES from a read-only directory (as an unprivileged user).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from atomictools import (
    AtomicToolsError,
    DiskFullError,
    DurabilityUnknownError,
    FileSystemError,
    Limits,
    PermissionDeniedError,
    Workspace,
)
from atomictools.engine.durable import fsutil, tempfiles, writer
from atomictools.engine.durable.tempfiles import is_temp_name
from tests.conftest import temp_files

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
CHUNK = 4096
NOTHING_CHANGED = "nothing was changed"
NOBODY = 65534


class OsProxy:
    """Stands in for the ``os`` module inside one engine module: overrides, else the real os."""

    def __init__(self, **overrides: Any) -> None:
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def os_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@dataclass
class Faults:
    """Records the engine's writes, fsyncs and renames, and fails the chosen one."""

    write_error: int | None = None
    write_fail_at: int = 1
    file_fsync_error: int | None = None
    dir_fsync_error: int | None = None
    writes: int = 0
    events: list[tuple[str, str]] = field(default_factory=list)
    """(what, path): "write-failed", "fsync-file", "fsync-file-failed", "fsync-dir", "rename"."""

    def write(self, fd: int, data: Any) -> int:
        self.writes += 1
        if self.write_error is not None and self.writes == self.write_fail_at:
            self.events.append(("write-failed", fd_path(fd)))
            raise os_error(self.write_error)
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        path = fd_path(fd)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            if self.dir_fsync_error is not None:
                code, self.dir_fsync_error = self.dir_fsync_error, None  # fail once
                self.events.append(("fsync-dir-failed", path))
                raise os_error(code)
            self.events.append(("fsync-dir", path))
        else:
            if self.file_fsync_error is not None:
                code, self.file_fsync_error = self.file_fsync_error, None  # fail once
                self.events.append(("fsync-file-failed", path))
                raise os_error(code)
            self.events.append(("fsync-file", path))
        os.fsync(fd)

    def kinds(self) -> list[str]:
        return [what for what, _ in self.events]


def warm_history(ws: Workspace, faults: Faults) -> None:
    """Create the history store first: its directories' fsyncs are not the change's."""
    ws.history.store.ready()
    faults.events.clear()


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Faults:
    """Route the engine's write/fsync (fsutil) and its renames (writer, fsutil) through Faults."""
    plan = Faults()
    monkeypatch.setattr(fsutil, "os", OsProxy(write=plan.write, fsync=plan.fsync))
    real_replace = os.replace
    real_noreplace = fsutil.rename_noreplace

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        plan.events.append(("rename", str(dst)))
        real_replace(src, dst, **kwargs)

    def rename_noreplace(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str) -> None:
        plan.events.append(("rename", dst))
        real_noreplace(src_dir_fd, src, dst_dir_fd, dst)

    monkeypatch.setattr(writer, "os", OsProxy(replace=replace))
    monkeypatch.setattr(fsutil, "rename_noreplace", rename_noreplace)
    return plan


# -- the operations under test: each changes "target.txt", which already exists ------------------

OLD = ("old line\n" * 1500).encode()  # 3 chunks of 4 KiB
NEW_TEXT = ("new line\n" * 1500) + "MARKER\n"
NEW = NEW_TEXT.encode()  # 4 chunks


@dataclass(frozen=True)
class Op:
    target: str
    old: bytes | None
    """Content of the target before (None: the operation creates it)."""
    new: bytes
    run: Callable[[Workspace], Awaitable[object]]


def setup_files(root: Path, op: Op) -> None:
    (root / "source.txt").write_bytes(NEW)
    if op.old is not None:
        (root / op.target).write_bytes(op.old)


OPS = {
    "write": Op("target.txt", OLD, NEW, lambda ws: ws.write("target.txt", NEW)),
    "edit": Op(
        "edited.txt",
        NEW_TEXT.replace("MARKER", "marker").encode(),
        NEW,
        lambda ws: ws.edit("edited.txt", [("marker", "MARKER")]),
    ),
    "copy-overwrite": Op(
        "target.txt", OLD, NEW, lambda ws: ws.copy("source.txt", "target.txt", overwrite=True)
    ),
    "copy-new": Op("fresh.txt", None, NEW, lambda ws: ws.copy("source.txt", "fresh.txt")),
}


def read_or_none(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


def assert_clear_error(err: AtomicToolsError, op: Op, code: int) -> None:
    assert err.changed is False
    assert str(err).endswith(NOTHING_CHANGED), str(err)
    assert op.target in str(err), str(err)
    assert isinstance(err.__cause__, OSError)
    assert err.__cause__.errno == code


async def check_untouched_and_usable(ws: Workspace, root: Path, tmp_path: Path, op: Op) -> None:
    assert read_or_none(root / op.target) == op.old
    assert temp_files(tmp_path) == []
    with anyio.fail_after(10):  # the next operation works: no stuck lock, the fault was one-shot
        await ws.write(op.target, b"afterwards\n")
    assert (root / op.target).read_bytes() == b"afterwards\n"
    assert temp_files(tmp_path) == []


ERRORS = {errno.ENOSPC: DiskFullError, errno.EIO: FileSystemError}


# -- ENOSPC / EIO on write ---------------------------------------------------------------------


@pytest.mark.parametrize("op_name", list(OPS))
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
@pytest.mark.parametrize("fail_at", [1, 3], ids=["first-write", "third-write"])
async def test_write_error(
    root: Path, tmp_path: Path, faults: Faults, op_name: str, code: int, fail_at: int
) -> None:
    op = OPS[op_name]
    setup_files(root, op)
    ws = Workspace([root], limits=Limits(chunk_bytes=CHUNK))
    warm_history(ws, faults)
    faults.write_error, faults.write_fail_at = code, fail_at

    with pytest.raises(ERRORS[code]) as excinfo:
        await op.run(ws)

    assert_clear_error(excinfo.value, op, code)
    if code == errno.ENOSPC:
        assert "disk is full" in str(excinfo.value)
    else:
        assert os.strerror(errno.EIO) in str(excinfo.value)
    assert faults.writes == fail_at
    # The failed write went to our temp, and nothing was fsynced or renamed after it.
    assert faults.kinds() == ["write-failed"]
    assert is_temp_name(os.path.basename(faults.events[0][1]))
    await check_untouched_and_usable(ws, root, tmp_path, op)


# -- ENOSPC / EIO on the file's fsync -------------------------------------------------------------


@pytest.mark.parametrize("op_name", list(OPS))
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
async def test_file_fsync_error_is_not_retried(
    root: Path, tmp_path: Path, faults: Faults, op_name: str, code: int
) -> None:
    op = OPS[op_name]
    setup_files(root, op)
    ws = Workspace([root], limits=Limits(chunk_bytes=CHUNK))
    warm_history(ws, faults)
    faults.file_fsync_error = code

    with pytest.raises(ERRORS[code]) as excinfo:
        await op.run(ws)

    assert_clear_error(excinfo.value, op, code)
    # Exactly one fsync, of our temp; never retried (a retry after a failed fsync proves
    # nothing, the kernel may have dropped the dirty pages), and the temp was not renamed.
    assert faults.kinds() == ["fsync-file-failed"], faults.events
    assert is_temp_name(os.path.basename(faults.events[0][1]))
    await check_untouched_and_usable(ws, root, tmp_path, op)


# -- EIO on the directory's fsync, after the rename -----------------------------------------------


@pytest.mark.parametrize("op_name", list(OPS))
async def test_directory_fsync_error_after_rename(
    root: Path, tmp_path: Path, faults: Faults, op_name: str
) -> None:
    op = OPS[op_name]
    setup_files(root, op)
    ws = Workspace([root], limits=Limits(chunk_bytes=CHUNK))
    warm_history(ws, faults)
    faults.dir_fsync_error = errno.EIO

    with pytest.raises(DurabilityUnknownError) as excinfo:
        await op.run(ws)

    err = excinfo.value
    assert err.changed is True
    assert NOTHING_CHANGED not in str(err)
    assert op.target in str(err)
    assert "may not survive a power loss" in str(err)
    assert isinstance(err.__cause__, OSError)
    assert err.__cause__.errno == errno.EIO
    # The change is visible: file fsync, then the rename, then the failing directory fsync.
    assert faults.kinds() == ["fsync-file", "rename", "fsync-dir-failed"], faults.events
    assert (root / op.target).read_bytes() == op.new
    assert temp_files(tmp_path) == []
    with anyio.fail_after(10):
        await ws.write(op.target, b"afterwards\n")
    assert (root / op.target).read_bytes() == b"afterwards\n"


# -- the streaming writer -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "expected"),
    [("write", DiskFullError), ("fsync", FileSystemError)],
)
async def test_streaming_writer_fault(
    root: Path, tmp_path: Path, faults: Faults, where: str, expected: type[AtomicToolsError]
) -> None:
    op = OPS["write"]
    setup_files(root, op)
    ws = Workspace([root], limits=Limits(chunk_bytes=CHUNK))
    warm_history(ws, faults)
    if where == "write":
        faults.write_error, faults.write_fail_at = errno.ENOSPC, 2
    else:
        faults.file_fsync_error = errno.EIO
    written: list[int] = []

    with pytest.raises(expected) as excinfo:
        async with ws.atomic_writer("target.txt") as w:
            for i in range(4):
                await w.write(bytes([65 + i]) * CHUNK)
                written.append(i)

    assert str(excinfo.value).endswith(NOTHING_CHANGED)
    assert written == ([0] if where == "write" else [0, 1, 2, 3])
    assert "rename" not in faults.kinds()
    await check_untouched_and_usable(ws, root, tmp_path, op)


# -- EACCES -------------------------------------------------------------------------------------


async def test_eacces_creating_the_temp(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The temp file cannot be created (EACCES from open): PermissionDeniedError."""
    opened: list[str] = []

    def deny_open(path: Any, *args: Any, **kwargs: Any) -> int:
        opened.append(str(path))
        raise os_error(errno.EACCES)

    monkeypatch.setattr(tempfiles, "os", OsProxy(open=deny_open))
    op = OPS["write"]
    setup_files(root, op)
    ws = Workspace([root])

    with pytest.raises(PermissionDeniedError) as excinfo:
        await op.run(ws)

    assert_clear_error(excinfo.value, op, errno.EACCES)
    assert "permission denied" in str(excinfo.value)
    assert len(opened) == 1
    assert is_temp_name(opened[0])
    assert read_or_none(root / op.target) == op.old
    assert temp_files(tmp_path) == []
    monkeypatch.undo()
    await check_untouched_and_usable(ws, root, tmp_path, op)


# A read-only directory, for real. Root bypasses permission bits (CAP_DAC_OVERRIDE), so as root
# the scenario runs in a child process that drops to uid/gid 65534 ("nobody") before touching
# the files: the engine's real open(O_CREAT|O_EXCL) of the temp then gets a real EACCES from the
# kernel, with no mock anywhere. The child imports everything while still root, so it needs no
# access to the source tree, and reports what happened as JSON. A non-root run does the same
# in-process.

CHILD = textwrap.dedent(
    """
    import json, os, sys
    import anyio
    from atomictools import AtomicToolsError, Workspace

    root, backend, uid = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if backend == "trio":
        import anyio._backends._trio
    else:
        import anyio._backends._asyncio
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)

    async def attempt(name, call):
        try:
            await call()
        except AtomicToolsError as err:
            cause = err.__cause__
            return {"op": name, "error": type(err).__name__, "message": str(err),
                    "errno": getattr(cause, "errno", None)}
        return {"op": name, "error": None}

    async def main():
        ws = Workspace([root])
        return [
            await attempt("write", lambda: ws.write("ro/file.txt", "new content\\n")),
            await attempt("edit", lambda: ws.edit("ro/file.txt", [("original", "edited")])),
            await attempt("copy", lambda: ws.copy("src.txt", "ro/file.txt", overwrite=True)),
            await attempt("create", lambda: ws.write("ro/new.txt", "x")),
        ]

    try:
        os.close(os.open(os.path.join(root, "ro", "probe"), os.O_CREAT | os.O_WRONLY, 0o600))
        denied = False
    except PermissionError:
        denied = True
    print(json.dumps({"uid": os.geteuid(), "direct_create_denied": denied,
                      "results": anyio.run(main, backend=backend)}))
    """
)


@pytest.fixture
def readonly_tree(tmp_path: Path) -> Iterator[Path]:
    """root/ro (mode 0555, owned by the unprivileged user) holding file.txt, plus root/src.txt.

    As root it lives in a fresh directory under the system temp dir, because pytest's
    tmp_path sits below a mode-0700 directory the unprivileged child could not enter.
    """
    if os.geteuid() == 0:
        base = Path(tempfile.mkdtemp(prefix="atomictools-eacces-"))
        base.chmod(0o755)
    else:
        base = tmp_path / "eacces"
        base.mkdir()
    root = base / "root"
    ro = root / "ro"
    ro.mkdir(parents=True)
    (ro / "file.txt").write_text("original content\n")
    (root / "src.txt").write_text("copied content\n")
    if os.geteuid() == 0:
        for path in (root, ro, ro / "file.txt", root / "src.txt"):
            os.chown(path, NOBODY, NOBODY)
    (ro / "file.txt").chmod(0o644)  # the file itself is writable: only the directory is not
    ro.chmod(0o555)
    try:
        yield root
    finally:
        ro.chmod(0o755)
        if os.geteuid() == 0:
            shutil.rmtree(base)


async def test_read_only_directory_real_eacces(readonly_tree: Path, anyio_backend: str) -> None:
    root = readonly_tree
    if os.geteuid() == 0:
        with anyio.fail_after(60):
            proc = await anyio.run_process(
                [sys.executable, "-c", CHILD, str(root), anyio_backend, str(NOBODY)],
                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
                check=False,
            )
        assert proc.returncode == 0, proc.stderr.decode()
        report = json.loads(proc.stdout)
        assert report["uid"] == NOBODY
        assert report["direct_create_denied"], "the child could write to a 0555 directory"
        results = report["results"]
    else:
        ws = Workspace([root])
        results = []
        for name, call in [
            ("write", lambda: ws.write("ro/file.txt", "new content\n")),
            ("edit", lambda: ws.edit("ro/file.txt", [("original", "edited")])),
            ("copy", lambda: ws.copy("src.txt", "ro/file.txt", overwrite=True)),
            ("create", lambda: ws.write("ro/new.txt", "x")),
        ]:
            with pytest.raises(PermissionDeniedError) as excinfo:
                await call()
            err = excinfo.value
            results.append(
                {
                    "op": name,
                    "error": type(err).__name__,
                    "message": str(err),
                    "errno": getattr(err.__cause__, "errno", None),
                }
            )

    assert [r["op"] for r in results] == ["write", "edit", "copy", "create"]
    for result in results:
        assert result["error"] == "PermissionDeniedError", result
        assert result["errno"] == errno.EACCES, result
        assert "permission denied" in result["message"], result
        assert result["message"].endswith(NOTHING_CHANGED), result
    assert (root / "ro" / "file.txt").read_text() == "original content\n"
    assert sorted(p.name for p in (root / "ro").iterdir()) == ["file.txt"]
    assert temp_files(root) == []


# -- a real ENOSPC on a size-limited tmpfs (root only) -------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted on a fresh directory; skipped (with the reason) when impossible."""
    if os.geteuid() != 0:
        pytest.skip(
            "the real-ENOSPC test needs root to mount a 1 MiB tmpfs (running as uid "
            f"{os.geteuid()}); ENOSPC is still covered by the monkeypatched tests"
        )
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    try:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"cannot run mount for the real-ENOSPC test: {err}")
    if proc.returncode != 0:
        pytest.skip(
            f"mounting a 1 MiB tmpfs failed (exit {proc.returncode}: {proc.stderr.strip()}); "
            "ENOSPC is still covered by the monkeypatched tests"
        )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True, timeout=30)


@pytest.mark.root_only
async def test_real_enospc_on_small_tmpfs(small_tmpfs: Path) -> None:
    original = b"small original file\n" * 50
    (small_tmpfs / "keep.txt").write_bytes(original)
    free_before = os.statvfs(small_tmpfs).f_bfree
    ws = Workspace([small_tmpfs])

    with pytest.raises(DiskFullError) as excinfo:
        await ws.write("keep.txt", os.urandom(2 * MiB))

    err = excinfo.value
    assert str(err).endswith(NOTHING_CHANGED)
    assert "keep.txt" in str(err)
    assert "disk is full" in str(err)
    assert isinstance(err.__cause__, OSError)
    assert err.__cause__.errno == errno.ENOSPC
    assert (small_tmpfs / "keep.txt").read_bytes() == original
    assert temp_files(small_tmpfs) == []
    assert os.statvfs(small_tmpfs).f_bfree == free_before  # the temp's blocks were freed

    with pytest.raises(DiskFullError):
        async with ws.atomic_writer("streamed.bin") as w:
            for _ in range(4):
                await w.write(b"\xff" * (MiB // 2))
    assert not (small_tmpfs / "streamed.bin").exists()
    assert temp_files(small_tmpfs) == []

    small = b"a small write fits\n"
    result = await ws.write("keep.txt", small)
    assert result.sha256 == hashlib.sha256(small).hexdigest()
    assert (small_tmpfs / "keep.txt").read_bytes() == small
    assert temp_files(small_tmpfs) == []
