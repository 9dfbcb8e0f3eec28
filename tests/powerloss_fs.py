"""A FUSE pass-through file system that forgets what was not made durable: power loss, for tests.

``python tests/powerloss_fs.py BACKING MOUNTPOINT`` mounts BACKING at MOUNTPOINT (in the
foreground; ``fusermount3 -u MOUNTPOINT`` ends it). Every operation is passed through to BACKING,
and beside it the file system keeps a model of what a disk would still hold after a power cut:

- a file's data is durable only as it was at the last ``fsync``/``fdatasync`` of that file
  (a file never synced holds nothing: it comes back empty if its name survives);
- a directory entry change (create, rename, unlink, mkdir, rmdir, link, symlink) is durable only
  once that directory is fsynced; the directory then holds exactly the entries it had at that
  moment (a symlink's target is part of its entry);
- writing anything to the control file ``/.powercut`` cuts the power: BACKING is rewritten to hold
  exactly the durable state, and every later operation fails with EIO until it is unmounted.

The model is strict on purpose. Real file systems are often more forgiving: ext4 in
``data=ordered`` mode commits a rename together with earlier metadata (and, with
``auto_da_alloc``, flushes a file replaced by a rename), XFS and btrfs log some operations in
order, so a missing fsync often goes unpunished there, until the one configuration, kernel or
crash timing where it is not (ALICE, OSDI 2014; LazyFS, VLDB 2024). A program that is correct on
the strict model is correct on all of them; one tested only on a forgiving one is not.

Objects are tracked by an identity of our own (the backing inode number can be reused after a
file is deleted); renames and hard links keep it, creation gives a new one.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import sys
import threading
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import mfusepy

CONTROL = "/.powercut"
ELSEWHERE = "xdev"
"""A directory named so, anywhere, acts as another file system: a rename into or out of it
fails with EXDEV, as does a hard link (so cross-device moves can be tested on one mount)."""


@dataclass
class _Object:
    kind: str  # "file", "dir" or "link"
    data: bytes | None = None
    """A file's durable content (None: nothing durable yet)."""
    mode: int = 0o644
    entries: dict[str, int] = field(default_factory=dict)
    """A directory's durable entries: name -> object id."""
    target: str = ""
    """A symlink's target."""


class Durable:
    """What a power cut leaves: the durable objects and the tree they form."""

    def __init__(self, backing: str) -> None:
        self.backing = backing
        self.objects: dict[int, _Object] = {}
        self.ids: dict[int, int] = {}
        """Backing inode number -> object id (for objects alive now)."""
        self._next = count(1)
        self.root = self._adopt(backing)

    def _adopt(self, path: str) -> int:
        """An existing object, durable as it is (the state at mount time)."""
        st = os.lstat(path)
        oid = self.new_id(st.st_ino)
        if stat.S_ISDIR(st.st_mode):
            obj = _Object("dir", mode=stat.S_IMODE(st.st_mode))
            for name in sorted(os.listdir(path)):
                obj.entries[name] = self._adopt(os.path.join(path, name))
        elif stat.S_ISLNK(st.st_mode):
            obj = _Object("link", target=os.readlink(path))
        else:
            with open(path, "rb") as handle:
                obj = _Object("file", data=handle.read(), mode=stat.S_IMODE(st.st_mode))
        self.objects[oid] = obj
        return oid

    def new_id(self, ino: int) -> int:
        existing = self.ids.get(ino)
        if existing is not None and existing in self.objects:
            return existing  # a hard link to an object we know
        oid = next(self._next)
        self.ids[ino] = oid
        return oid

    def created(self, path: str) -> None:
        """A new object at ``path`` (its inode number may be a reused one: a new identity)."""
        st = os.lstat(path)
        oid = next(self._next)
        self.ids[st.st_ino] = oid
        kind = "dir" if stat.S_ISDIR(st.st_mode) else "link" if stat.S_ISLNK(st.st_mode) else "file"
        self.objects[oid] = _Object(kind, mode=stat.S_IMODE(st.st_mode))

    def id_of(self, st: os.stat_result) -> int:
        oid = self.ids.get(st.st_ino)
        if oid is None:  # made behind our back (should not happen): known from now on
            oid = next(self._next)
            self.ids[st.st_ino] = oid
            kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
            self.objects[oid] = _Object(kind)
        return oid

    def sync_file(self, fd: int) -> None:
        st = os.fstat(fd)
        obj = self.objects[self.id_of(st)]
        if obj.kind != "file":
            return
        reader = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)  # the caller's may be write-only
        try:
            chunks, offset = [], 0
            while chunk := os.pread(reader, 1 << 20, offset):
                chunks.append(chunk)
                offset += len(chunk)
        finally:
            os.close(reader)
        obj.data = b"".join(chunks)
        obj.mode = stat.S_IMODE(st.st_mode)

    def sync_dir(self, path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:  # removed, and still open: its entries no longer matter
            return
        obj = self.objects[self.id_of(st)]
        entries = {}
        for name in os.listdir(path):
            child = os.path.join(path, name)
            st = os.lstat(child)
            oid = self.id_of(st)
            child_obj = self.objects[oid]
            if child_obj.kind == "link":
                child_obj.target = os.readlink(child)
            entries[name] = oid
        obj.entries = entries
        obj.mode = stat.S_IMODE(os.lstat(path).st_mode)

    def restore(self) -> None:
        """Make ``backing`` hold exactly the durable tree (the power cut)."""
        for name in os.listdir(self.backing):
            path = os.path.join(self.backing, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        made: dict[int, str] = {}
        self._build(self.root, self.backing, made, top=True)

    def _build(self, oid: int, path: str, made: dict[int, str], *, top: bool = False) -> None:
        obj = self.objects[oid]
        if oid in made and obj.kind == "file":
            os.link(made[oid], path)
            return
        if obj.kind == "dir":
            if not top:
                os.mkdir(path)
            for name, child in obj.entries.items():
                self._build(child, os.path.join(path, name), made)
            os.chmod(path, obj.mode or 0o755)
        elif obj.kind == "link":
            os.symlink(obj.target, path)
        else:
            with open(path, "wb") as handle:
                handle.write(obj.data or b"")
            os.chmod(path, obj.mode)
        made[oid] = path


class PowerLossFS(mfusepy.Operations):
    """The pass-through operations, with the durability model beside them."""

    use_ns = True

    def __init__(self, backing: str) -> None:
        self.backing = os.path.realpath(backing)
        self.model = Durable(self.backing)
        self._mutex = threading.RLock()
        self.off = False

    def _path(self, path: str) -> str:
        return os.path.join(self.backing, path.lstrip("/"))

    def _check(self) -> None:
        if self.off:
            raise mfusepy.FuseOSError(errno.EIO)

    def _cut(self) -> None:
        with self._mutex:
            if not self.off:
                self.off = True
                self.model.restore()

    # -- metadata ------------------------------------------------------------------------------

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        if path == CONTROL:
            return {"st_mode": stat.S_IFREG | 0o200, "st_nlink": 1, "st_size": 0}
        self._check()
        try:
            st = os.lstat(self._path(path))
        except OSError as err:
            raise mfusepy.FuseOSError(err.errno) from err
        keys = ("st_mode", "st_nlink", "st_size", "st_uid", "st_gid", "st_ino")
        attrs: dict[str, Any] = {key: getattr(st, key) for key in keys}
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return attrs

    def access(self, path: str, amode: int) -> int:
        self._check()
        return 0

    def readlink(self, path: str) -> str:
        self._check()
        return os.readlink(self._path(path))

    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
        """Names with their inode numbers (with ``use_ino``, a zero would hide an entry)."""
        self._check()
        here = self._path(path)
        entries = [(".", os.lstat(here)), ("..", os.lstat(os.path.dirname(here.rstrip("/"))))]
        for name in os.listdir(here):
            try:
                entries.append((name, os.lstat(os.path.join(here, name))))
            except FileNotFoundError:
                continue
        return [(name, {"st_ino": st.st_ino, "st_mode": st.st_mode}, 0) for name, st in entries]

    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self.backing)
        return {key: getattr(st, key) for key in dir(st) if key.startswith("f_")}

    def chmod(self, path: str, mode: int) -> int:
        self._check()
        os.chmod(self._path(path), mode)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        self._check()
        os.lchown(self._path(path), uid, gid)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        self._check()
        os.utime(self._path(path), ns=times, follow_symlinks=False)
        return 0

    # -- directory entries ------------------------------------------------------------------------

    def mkdir(self, path: str, mode: int) -> int:
        with self._mutex:
            self._check()
            os.mkdir(self._path(path), mode)
            self.model.created(self._path(path))
        return 0

    def rmdir(self, path: str) -> int:
        with self._mutex:
            self._check()
            os.rmdir(self._path(path))
        return 0

    def unlink(self, path: str) -> int:
        with self._mutex:
            self._check()
            os.unlink(self._path(path))
        return 0

    def symlink(self, target: str, source: str) -> int:
        with self._mutex:
            self._check()
            os.symlink(source, self._path(target))
            self.model.created(self._path(target))
        return 0

    def link(self, target: str, source: str) -> int:
        with self._mutex:
            self._check()
            if (ELSEWHERE in source.split("/")[:-1]) != (ELSEWHERE in target.split("/")[:-1]):
                raise mfusepy.FuseOSError(errno.EXDEV)  # a hard link cannot cross devices either
            os.link(self._path(source), self._path(target), follow_symlinks=False)
        return 0

    def rename(self, old: str, new: str, flags: int = 0) -> int:
        with self._mutex:
            self._check()
            if (ELSEWHERE in old.split("/")[:-1]) != (ELSEWHERE in new.split("/")[:-1]):
                raise mfusepy.FuseOSError(errno.EXDEV)
            if flags:
                from atomictools.engine.durable.fsutil import AT_FDCWD, renameat2

                renameat2(AT_FDCWD, self._path(old), AT_FDCWD, self._path(new), flags)
            else:
                os.rename(self._path(old), self._path(new))
        return 0

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        with self._mutex:
            self._check()
            if path is not None:  # None: removed while open, its entries no longer matter
                self.model.sync_dir(self._path(path))
        return 0

    def opendir(self, path: str) -> int:
        self._check()
        return 0

    # -- files ------------------------------------------------------------------------------------

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        if path == CONTROL:
            return 0  # no descriptor: release knows the control file by its path
        with self._mutex:
            self._check()
            fd = os.open(self._path(path), os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
            self.model.created(self._path(path))
        return fd

    def open(self, path: str, flags: int) -> int:
        if path == CONTROL:
            return 0
        self._check()
        wanted = flags & (os.O_RDONLY | os.O_WRONLY | os.O_RDWR | os.O_APPEND)
        return os.open(self._path(path), wanted | os.O_NOFOLLOW)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        self._check()
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        if path == CONTROL:
            self._cut()
            return len(data)
        self._check()
        return os.pwrite(fh, data, offset)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        if path == CONTROL:
            return 0
        self._check()
        if fh:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._path(path), length)
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        with self._mutex:
            self._check()
            self.model.sync_file(fh)
        return 0

    def flush(self, path: str, fh: int) -> int:
        return 0

    def release(self, path: str, fh: int) -> int:
        if path != CONTROL:
            os.close(fh)
        return 0


class _Fuse(mfusepy.FUSE):
    """mfusepy drops ``rename``'s flags under libfuse 3 (RENAME_NOREPLACE would clobber)."""

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return int(
            self.operations.rename(
                old.decode(self.encoding, self.errors),
                new.decode(self.encoding, self.errors),
                flags,
            )
            or 0
        )


def main(backing: str, mountpoint: str) -> None:
    _Fuse(
        PowerLossFS(backing),
        mountpoint,
        foreground=True,
        nothreads=False,
        use_ino=True,  # st_ino from the disk: hard links keep one inode number
        hard_remove=True,  # an unlink is an unlink, not a rename to .fuse_hidden*
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
