"""Read-only views of the tree: list a directory, a bounded tree, glob search, file info.

Walks open each directory relative to its parent's descriptor with ``O_NOFOLLOW`` and never
follow a symlink into a directory, so they cannot leave the roots or loop. They run in worker
threads in batches with a cancellation point between batches, and stop at the configured limits
so one call cannot build a reply too large to send. Our own temp files are not shown.
"""

from __future__ import annotations

import operator
import os
import stat
from collections.abc import Generator
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio.to_thread

from atomictools.engine.config import Limits
from atomictools.engine.durable.blocking import run_blocking
from atomictools.engine.durable.steps import step
from atomictools.engine.durable.tempfiles import is_temp_name
from atomictools.engine.errors import TooLargeError, WrongTypeError, from_os_error
from atomictools.engine.reads.globmatch import Glob, any_match
from atomictools.engine.results import (
    DirEntry,
    DirListing,
    EntryType,
    FileInfo,
    Progress,
    SearchResult,
    TreeNode,
    entry_type,
)
from atomictools.engine.sandbox import Location

_BATCH = 512
_INLINE_BATCH = 64
"""Entries of a small tree walked on the event loop before any worker thread is used."""
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class _Found:
    rel: str
    """Path relative to the walked directory."""
    name: str
    type: EntryType
    depth: int
    depth_limited: bool


def _open_directory(location: Location) -> int:
    try:
        fd = os.open(location.name, _DIR_FLAGS, dir_fd=location.dir_fd)
    except NotADirectoryError as err:
        raise WrongTypeError(f"{location.display} is a file, not a directory") from err
    except OSError as err:
        raise from_os_error(err, location.display, "list") from err
    return fd


def _walk(dir_fd: int, excludes: tuple[Glob, ...], max_depth: int) -> Generator[_Found, None, None]:
    """Walk below ``dir_fd`` (not closed here); a directory always comes before its entries."""
    stack: list[tuple[int, str, int, bool]] = [(dir_fd, "", 0, False)]  # fd, rel, depth, owned
    try:
        while stack:
            fd, prefix, depth, owned = stack.pop()
            found: list[_Found] = []
            subdirs: list[tuple[int, str, int, bool]] = []
            try:
                for entry in _names_and_types(fd, sizes=False):
                    name, kind = entry.name, entry.type
                    rel = f"{prefix}{name}"
                    if excludes and any_match(excludes, rel):
                        continue
                    limited = kind == "directory" and depth + 1 >= max_depth
                    found.append(_Found(rel, name, kind, depth, limited))
                    if kind == "directory" and not limited:
                        try:
                            child_fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                        except OSError:
                            continue  # vanished, replaced by a link, or unreadable: skip it
                        subdirs.append((child_fd, f"{rel}/", depth + 1, True))
            finally:
                if owned:
                    os.close(fd)
                stack.extend(reversed(subdirs))  # from here on closed by the outer finally
            yield from found
    finally:
        for fd, _, _, owned in stack:
            if owned:
                os.close(fd)


async def _collect(
    walker: Generator[_Found, None, None],
    limit: int,
    progress: Progress | None,
    *,
    small: bool = False,
) -> tuple[list[_Found], bool]:
    """Drain ``walker`` in thread batches; stops after ``limit`` items (truncated=True).

    ``small`` (the walked directory itself is small): the first few entries are walked on the
    event loop, so a small tree costs no thread hop at all.
    """
    found: list[_Found] = []

    def next_batch(size: int = _BATCH) -> list[_Found]:
        batch: list[_Found] = []
        for item in walker:
            batch.append(item)
            if len(batch) >= size or len(found) + len(batch) > limit:
                break
        return batch

    try:
        batch = next_batch(_INLINE_BATCH) if small else []
        while batch or (batch := await anyio.to_thread.run_sync(next_batch)):
            found.extend(batch)
            if len(found) > limit:
                return found[:limit], True
            if progress is not None:
                await progress(len(found), None)
            await step("walk.batch")
            if small and len(batch) < _INLINE_BATCH:
                break  # the walk ended inside the inline batch
            batch = []
        return found, False
    finally:
        walker.close()


def _names_and_types(dir_fd: int, sizes: bool) -> list[DirEntry]:
    """Entries of an open directory, sorted by name, typed from the directory itself (d_type:
    no stat per entry, as ``ls`` does); a file is stat'ed for its size only when ``sizes``."""
    found: list[DirEntry] = []
    append = found.append
    with os.scandir(dir_fd) as entries:
        for entry in entries:  # per-entry work is most of a large listing: the common case first
            name = entry.name
            if name[:1] == "." and is_temp_name(name):
                continue
            try:
                if entry.is_file(follow_symlinks=False):
                    size = entry.stat(follow_symlinks=False).st_size if sizes else None
                    append(DirEntry(name, "file", size))
                elif entry.is_dir(follow_symlinks=False):
                    append(DirEntry(name, "directory", None))
                elif entry.is_symlink():
                    append(DirEntry(name, "symlink", None))
                else:
                    append(DirEntry(name, "other", None))
            except FileNotFoundError:
                continue  # removed while we listed
    found.sort(key=_BY_NAME)
    return found


_BY_NAME = operator.attrgetter("name")


async def list_directory(location: Location, limits: Limits, *, sizes: bool = True) -> DirListing:
    fd = _open_directory(location)
    try:
        st = os.fstat(fd)
        # A small directory is named on the event loop (the thread hop would cost more); a
        # stat per entry goes to a worker thread.
        inline = not sizes and limits.inline(st.st_size)
        entries = await run_blocking(inline, _names_and_types, fd, sizes)
    finally:
        os.close(fd)
    limit = limits.max_list_entries
    return DirListing(location.display, tuple(entries[:limit]), len(entries) > limit)


async def directory_tree(
    location: Location,
    limits: Limits,
    *,
    exclude: tuple[str, ...] = (),
    max_depth: int | None = None,
    progress: Progress | None = None,
) -> TreeNode:
    """The tree below a directory; refuses (clearly) one with more entries than the limit."""
    depth = min(max_depth or limits.max_tree_depth, limits.max_tree_depth)
    fd = _open_directory(location)
    try:
        found, truncated = await _collect(
            _walk(fd, tuple(Glob(p) for p in exclude), depth),
            limits.max_tree_entries,
            progress,
            small=limits.inline(os.fstat(fd).st_size),
        )
    finally:
        os.close(fd)
    if truncated:
        raise TooLargeError(
            f"the tree under {location.display} has more than {limits.max_tree_entries} "
            "entries; ask for a subdirectory, add exclude globs, or use Workspace.search"
        )
    children: dict[str, list[TreeNode]] = {"": []}
    # Post-order assembly: children lists are complete before their parent node is frozen.
    for item in reversed(found):
        parent = item.rel.rpartition("/")[0]
        kids = children.pop(item.rel, []) if item.type == "directory" else None
        node = TreeNode(
            item.name,
            item.type,
            tuple(reversed(kids)) if kids is not None and not item.depth_limited else None,
            item.depth_limited,
        )
        children.setdefault(parent, []).append(node)
    name = location.rel[-1] if location.rel else location.root.path.name
    return TreeNode(name, "directory", tuple(reversed(children[""])))


async def search(
    location: Location,
    pattern: str,
    limits: Limits,
    *,
    exclude: tuple[str, ...] = (),
    progress: Progress | None = None,
) -> SearchResult:
    """Files and directories below ``location`` whose path matches the glob ``pattern``."""
    glob = Glob(pattern)
    fd = _open_directory(location)
    prefix = f"{location.display}/" if location.rel else ""
    matches: list[str] = []
    walker = _walk(fd, tuple(Glob(p) for p in exclude), limits.max_tree_depth)
    try:

        def next_batch() -> int:
            seen = 0
            for item in walker:
                seen += 1
                if glob.matches(item.rel):
                    matches.append(prefix + item.rel)
                if seen >= _BATCH * 8 or len(matches) > limits.max_search_results:
                    break
            return seen

        scanned = 0
        while seen := await anyio.to_thread.run_sync(next_batch):
            if len(matches) > limits.max_search_results:
                break
            scanned += seen
            if progress is not None:
                await progress(scanned, None)
            await step("walk.batch")
    finally:
        walker.close()
        os.close(fd)
    truncated = len(matches) > limits.max_search_results
    return SearchResult(tuple(matches[: limits.max_search_results]), truncated)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat()


def file_info(location: Location) -> FileInfo:
    try:
        st = os.stat(location.name, dir_fd=location.dir_fd, follow_symlinks=False)
    except OSError as err:
        raise from_os_error(err, location.display, "inspect") from err
    birth = getattr(st, "st_birthtime", None)
    target = None
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(location.name, dir_fd=location.dir_fd)
    return FileInfo(
        path=location.display,
        type=entry_type(st),
        size=st.st_size,
        permissions=f"{stat.S_IMODE(st.st_mode):o}",
        modified=_iso(st.st_mtime),
        accessed=_iso(st.st_atime),
        changed=_iso(st.st_ctime),
        created=_iso(birth) if birth is not None else None,
        symlink_target=target,
    )
