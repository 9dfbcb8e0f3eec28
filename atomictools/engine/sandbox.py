"""Confinement: turn a user-supplied path into an open directory inside one of the roots.

Resolution never trusts a path string twice. It walks the path one component at a time, opening
each directory relative to the file descriptor of the previous one with ``O_NOFOLLOW``, starting
from a descriptor of the root. A symbolic link met on the way is read (not followed by the
kernel) and its target is spliced into the walk, so it is held to the same rules; ``..`` pops
back to a directory already opened and can never climb above the root. What the caller gets is a
descriptor of the final directory plus the last name: every later system call uses that
descriptor, so swapping a component for a symlink after the check cannot redirect the call.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from atomictools.engine.errors import (
    ConcurrentChangeError,
    InvalidPathError,
    NotFoundError,
    OutsideRootsError,
    PermissionDeniedError,
    WrongTypeError,
    from_os_error,
)

MAX_SYMLINK_HOPS = 40
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

MakeDir = Callable[[int, str, Path], None]
"""Creates directory ``name`` inside the directory open as ``fd`` (whose real path is given)."""


@dataclass(frozen=True, slots=True)
class Root:
    """A configured root: its real path, plus the spelling it was configured with."""

    path: Path
    aliases: tuple[Path, ...]

    def contains(self, candidate: Path) -> tuple[str, ...] | None:
        """Components of ``candidate`` below this root, or None when it is not below it."""
        for alias in self.aliases:
            if candidate.parts[: len(alias.parts)] == alias.parts:
                return candidate.parts[len(alias.parts) :]
        return None


@dataclass(slots=True)
class Location:
    """An entry inside a root, pinned by an open descriptor of its directory.

    ``name`` is the entry within ``dir_fd``; for a root itself it is ``"."`` and ``dir_fd`` is the
    root. ``rel`` spells the entry relative to its root after every symlink was resolved.
    """

    root: Root
    rel: tuple[str, ...]
    dir_fd: int
    name: str
    _closed: bool = field(default=False, repr=False)

    @property
    def display(self) -> str:
        """The path as shown to users: relative to its root, ``.`` for the root itself."""
        return "/".join(self.rel) if self.rel else "."

    @property
    def is_root(self) -> bool:
        return not self.rel

    @property
    def abspath(self) -> Path:
        return self.root.path.joinpath(*self.rel)

    def lstat(self) -> os.stat_result | None:
        """The entry's own metadata (a link is not followed), or None when it does not exist."""
        try:
            return os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise from_os_error(err, self.display, "inspect") from err

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.dir_fd)

    def __enter__(self) -> Location:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _is_symlink(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _split(path: str) -> list[str]:
    return [part for part in path.split("/") if part not in ("", ".")]


class Sandbox:
    """The set of roots, and the only way the engine turns user paths into places on disk."""

    def __init__(self, roots: Iterable[str | os.PathLike[str]]) -> None:
        resolved: list[Root] = []
        for raw in roots:
            configured = Path(os.path.abspath(os.path.expanduser(os.fspath(raw))))
            real = Path(os.path.realpath(configured))
            if not real.is_dir():
                raise ValueError(f"root {os.fspath(raw)!r} is not an existing directory")
            if any(r.path == real for r in resolved):
                continue
            aliases = (real,) if configured == real else (real, configured)
            resolved.append(Root(path=real, aliases=aliases))
        if not resolved:
            raise ValueError("at least one root directory is required")
        self.roots: tuple[Root, ...] = tuple(resolved)

    def __repr__(self) -> str:
        return f"Sandbox({[str(r.path) for r in self.roots]!r})"

    # -- resolution -------------------------------------------------------------------------

    def resolve(
        self,
        user_path: str | os.PathLike[str],
        *,
        follow_final: bool = True,
        make_dir: MakeDir | None = None,
    ) -> Location:
        """Resolve ``user_path`` to a Location inside the roots, or raise a clear error.

        ``follow_final`` resolves a symlink in the last component (reads and writes go through
        a link; move and delete act on the link itself). With ``make_dir``, missing directories
        on the way are created with it; otherwise a missing directory is NotFoundError. The last
        component need not exist. The caller owns the returned Location and must close it.
        """
        text = self._validate(user_path)
        root, parts = self._anchor(text, shown=text)
        return self._walk(root, parts, shown=text, follow_final=follow_final, make_dir=make_dir)

    @staticmethod
    def _validate(user_path: str | os.PathLike[str]) -> str:
        if isinstance(user_path, os.PathLike):
            user_path = os.fspath(user_path)
        if not isinstance(user_path, str):
            raise InvalidPathError(f"a path must be a string, not {type(user_path).__name__}")
        if "\x00" in user_path:
            raise InvalidPathError(f"path {user_path!r} contains a NUL byte; remove it")
        if not user_path.strip():
            raise InvalidPathError("the path is empty; give a file or directory path")
        return user_path

    def _anchor(self, text: str, *, shown: str) -> tuple[Root, list[str]]:
        """Pick the root a path starts from and the components that follow it."""
        if text == "~" or text.startswith("~/"):
            text = os.path.expanduser("~") + text[1:]
        if not os.path.isabs(text):
            return self.roots[0], _split(text)
        anchored = self._root_of(Path(text))
        if anchored is None:
            raise self._outside(shown)
        return anchored[0], list(anchored[1])

    def _root_of(self, candidate: Path) -> tuple[Root, tuple[str, ...]] | None:
        best: tuple[Root, tuple[str, ...]] | None = None
        for root in self.roots:
            rest = root.contains(candidate)
            if rest is not None and (best is None or len(rest) < len(best[1])):
                best = (root, rest)
        return best

    def _outside(self, shown: str, via: str | None = None) -> OutsideRootsError:
        where = ", ".join(str(r.path) for r in self.roots)
        detail = f" (through the symlink {via})" if via else ""
        return OutsideRootsError(
            f"path {shown!r} is outside the allowed directories{detail}; use a path inside: {where}"
        )

    def _walk(
        self,
        root: Root,
        parts: list[str],
        *,
        shown: str,
        follow_final: bool,
        make_dir: MakeDir | None,
    ) -> Location:
        stack: list[tuple[int, str]] = []  # (fd, name) of each open directory, root first
        pending = list(reversed(parts))  # components still to walk, next one last
        hops = 0
        link: tuple[str, int] | None = None  # last symlink spliced in, and where its target ends
        try:
            stack.append((self._open_root(root, shown), ""))
            while pending:
                name = pending.pop()
                if name == "..":
                    if len(stack) == 1:
                        via = link[0] if link and len(pending) >= link[1] else None
                        root = self._climb_out(root, stack, pending, shown=shown, via=via)
                    else:
                        os.close(stack.pop()[0])
                    continue
                dir_fd = stack[-1][0]
                is_last = not pending
                if is_last and not follow_final:
                    return self._finish(root, stack, name)
                try:
                    target = os.readlink(name, dir_fd=dir_fd)
                except OSError as err:
                    if err.errno not in (errno.EINVAL, errno.ENOENT):
                        raise self._os_error(err, stack, name) from err
                    target = None
                if target is not None:
                    hops += 1
                    if hops > MAX_SYMLINK_HOPS:
                        raise InvalidPathError(
                            f"path {shown!r} has too many levels of symbolic links (a loop?)"
                        )
                    via = "/".join([*(n for _, n in stack[1:]), name])
                    link = (via, len(pending))
                    root = self._splice(root, stack, pending, target, shown=shown, via=via)
                    continue
                if is_last:
                    return self._finish(root, stack, name)
                parent = root.path.joinpath(*(n for _, n in stack[1:]))
                stack.append((self._open_dir(dir_fd, name, stack, make_dir, parent), name))
            return self._finish(root, stack, None)
        except BaseException:
            for fd, _ in stack:
                os.close(fd)
            raise

    def _splice(
        self,
        root: Root,
        stack: list[tuple[int, str]],
        pending: list[str],
        target: str,
        *,
        shown: str,
        via: str,
    ) -> Root:
        """Continue the walk through a symlink's target, which must stay inside the roots."""
        if os.path.isabs(target):
            anchored = self._root_of(Path(target))
            if anchored is None:
                raise self._outside(shown, via)
            root, rest = anchored
            while stack:
                os.close(stack.pop()[0])
            stack.append((self._open_root(root, shown), ""))
            pending.extend(reversed(rest))
        else:
            pending.extend(reversed(_split(target)))
        return root

    def _climb_out(
        self,
        root: Root,
        stack: list[tuple[int, str]],
        pending: list[str],
        *,
        shown: str,
        via: str | None,
    ) -> Root:
        """``..`` above a root: allowed only if the path comes back into a root at once.

        The components that follow are applied to the root's real parent as text, without
        touching anything outside the roots, until the path names a root (or a place inside
        one), e.g. ``root1/link -> ../root2/file``. The walk then resumes from that root's
        descriptor; if the path never comes back in, it is outside.
        """
        place = root.path.parent
        while (anchored := self._root_of(place)) is None:
            if not pending:
                raise self._outside(shown, via)
            name = pending.pop()
            place = place.parent if name == ".." else place / name
        root, rest = anchored
        while stack:
            os.close(stack.pop()[0])
        stack.append((self._open_root(root, shown), ""))
        pending.extend(reversed(rest))
        return root

    def _open_root(self, root: Root, shown: str) -> int:
        try:
            return os.open(root.path, _DIR_FLAGS)
        except OSError as err:
            raise NotFoundError(
                f"the allowed directory {root.path} is not accessible ({err.strerror}); "
                f"cannot resolve {shown!r}"
            ) from err

    def _open_dir(
        self,
        dir_fd: int,
        name: str,
        stack: list[tuple[int, str]],
        make_dir: MakeDir | None,
        parent: Path,
    ) -> int:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError as err:
            if make_dir is None:
                raise self._os_error(err, stack, name) from err
        except OSError as err:
            raise self._os_error(err, stack, name) from err
        try:
            make_dir(dir_fd, name, parent)
        except FileExistsError:
            pass  # created concurrently: open what is there, O_NOFOLLOW still guards it
        except OSError as err:
            raise self._os_error(err, stack, name) from err
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except OSError as err:
            raise self._os_error(err, stack, name) from err

    @staticmethod
    def _os_error(err: OSError, stack: list[tuple[int, str]], name: str) -> Exception:
        rel = "/".join([*(n for _, n in stack[1:]), name])
        if err.errno == errno.ENOENT:
            return NotFoundError(
                f"the directory {rel} does not exist; check the path (Workspace.list_directory "
                "helps), or create it first with Workspace.mkdir"
            )
        if err.errno in (errno.ENOTDIR, errno.ELOOP):
            if _is_symlink(stack[-1][0], name):  # a directory swapped for a link after readlink
                return ConcurrentChangeError(f"{rel} changed while it was resolved; retry")
            return WrongTypeError(f"{rel} is not a directory, so the path cannot go through it")
        if err.errno in (errno.EACCES, errno.EPERM):
            return PermissionDeniedError(f"permission denied opening {rel}")
        return from_os_error(err, rel, "open")

    @staticmethod
    def _finish(root: Root, stack: list[tuple[int, str]], name: str | None) -> Location:
        if name is None:  # the path named a directory already on the stack
            if len(stack) == 1:
                return Location(root=root, rel=(), dir_fd=stack[0][0], name=".")
            fd, name = stack.pop()
            os.close(fd)
        for fd, _ in stack[:-1]:
            os.close(fd)
        rel = (*(n for _, n in stack[1:]), name)
        return Location(root=root, rel=rel, dir_fd=stack[-1][0], name=name)


def open_entry(location: Location, flags: int = os.O_RDONLY) -> int:
    """Open the entry itself with O_NOFOLLOW: a symlink swapped in after resolution is refused."""
    try:
        return os.open(location.name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=location.dir_fd)
    except OSError as err:
        raise from_os_error(err, location.display, "open") from err


def require_regular(st: os.stat_result | None, location: Location, action: str) -> os.stat_result:
    """Refuse a missing entry or anything that is not a regular file."""
    if st is None:
        raise NotFoundError(f"cannot {action} {location.display}: it does not exist")
    if stat.S_ISDIR(st.st_mode):
        raise WrongTypeError(f"cannot {action} {location.display}: it is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise WrongTypeError(f"cannot {action} {location.display}: it is not a regular file")
    return st
