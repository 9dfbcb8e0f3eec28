"""Child process for the journal recovery tests: applies a known change set, or holds a lock.

Run as a real process (``sys.executable tests/changeset_child.py MODE ...``) so that a crash
point (``ATOMICTOOLS_TEST_CRASH_AT=name[:n]`` makes it ``os._exit(137)``) or a SIGKILL really
ends it, and its ``flock``s are really dropped by the kernel. The scenarios live here and are
imported by the tests, so parent and child agree on the old tree, the changes and the new tree.

Modes:

* ``apply SCENARIO ROOT...``: ``Workspace(ROOTs).apply_changes(changes)``; prints ``done``.
  The journal goes to ``$ATOMICTOOLS_STATE_DIR/journals``.
* ``hold SCENARIO STEP ROOT...``: the same, but when the crash point ``STEP`` is reached the
  child prints ``held`` and sleeps (it is alive, with its record and temps locked) until killed.
* ``temp DIR TARGET``: creates one of our temp files for ``TARGET`` in ``DIR`` (named with this
  process's pid), holds its ``flock``, prints the name and sleeps until killed.
* ``flock PATH``: opens ``PATH``, holds an exclusive ``flock`` on it, prints ``locked``, sleeps.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from atomictools import Change

DIR = "<dir>"
Tree = dict[str, bytes | str]
"""Relative path -> file content, or ``DIR`` for a directory, or ``<link TARGET>``."""


@dataclass(frozen=True)
class Scenario:
    old: list[Tree]
    """The tree of each root before the change set."""
    new: list[Tree]
    """The tree of each root after it."""
    changes: list[Change]


def _mixed(roots: list[Path], *, mkdir_first: bool) -> Scenario:
    from atomictools import Change
    from atomictools.engine.text.edits import Edit

    old: Tree = {
        "a.txt": b"alpha old\n",
        "b.txt": b"line one\r\nline two\r\nline three\r\n",
        "src.txt": b"moved content\n",
        "dst.txt": b"overwritten by the move\n",
        "c.txt": b"copied content\n",
        "gone.txt": b"deleted content\n",
    }
    new: Tree = {
        "a.txt": b"alpha new\n",
        "b.txt": b"line one\r\nline 2\r\nline 2.5\r\nline three\r\n",
        "dst.txt": b"moved content\n",
        "c.txt": b"copied content\n",
        "c2.txt": b"copied content\n",
        "new": DIR,
        "new/deep": DIR,
        "new/deep/n.txt": b"inside a new directory\n",
    }
    mkdirs = [
        Change("mkdir", "new/deep"),
        Change("write", "new/deep/n.txt", content=b"inside a new directory\n"),
    ]
    others = [
        Change("write", "a.txt", content=b"alpha new\n"),
        Change("edit", "b.txt", edits=(Edit("line two\n", "line 2\nline 2.5\n"),)),
        Change("move", "dst.txt", source="src.txt", overwrite=True),
        Change("copy", "c2.txt", source="c.txt"),
        Change("delete", "gone.txt"),
    ]
    # The mkdir in the middle: its "preparing" record already lists the changes before it.
    changes = mkdirs + others if mkdir_first else others[:2] + mkdirs + others[2:]
    return Scenario([old], [new], changes)


def _two_roots(roots: list[Path]) -> Scenario:
    from atomictools import Change

    second = roots[1]
    return Scenario(
        old=[{"here.txt": b"here old\n"}, {"there.txt": b"there old\n"}],
        new=[{"here.txt": b"here new\n"}, {"there.txt": b"there new\n"}],
        changes=[
            Change("write", "here.txt", content=b"here new\n"),
            Change("write", str(second / "there.txt"), content=b"there new\n"),
        ],
    )


def _no_mkdir(roots: list[Path]) -> Scenario:
    from atomictools import Change
    from atomictools.engine.text.edits import Edit

    return Scenario(
        old=[{"a.txt": b"alpha old\n", "b.txt": b"beta old\n", "gone.txt": b"bye\n"}],
        new=[{"a.txt": b"alpha new\n", "b.txt": b"beta new\n", "fresh.txt": b"fresh\n"}],
        changes=[
            Change("write", "a.txt", content=b"alpha new\n"),
            Change("edit", "b.txt", edits=(Edit("old", "new"),)),
            Change("write", "fresh.txt", content=b"fresh\n"),
            Change("delete", "gone.txt"),
        ],
    )


def _fresh_then_mkdir(roots: list[Path]) -> Scenario:
    from atomictools import Change

    return Scenario(
        old=[{"keep.txt": b"kept\n"}],
        new=[{"keep.txt": b"kept\n", "fresh.txt": b"fresh\n", "d": DIR, "d/x.txt": b"x\n"}],
        changes=[
            Change("write", "fresh.txt", content=b"fresh\n"),
            Change("mkdir", "d"),
            Change("write", "d/x.txt", content=b"x\n"),
        ],
    )


SCENARIOS = {
    "mixed": lambda roots: _mixed(roots, mkdir_first=False),
    "mixed-mkdir-first": lambda roots: _mixed(roots, mkdir_first=True),
    "two-roots": _two_roots,
    "no-mkdir": _no_mkdir,
    "fresh-then-mkdir": _fresh_then_mkdir,
}


def scenario(name: str, roots: list[Path]) -> Scenario:
    return SCENARIOS[name](roots)


def install(root: Path, tree: Tree) -> None:
    """Create ``tree`` under an empty ``root``."""
    for rel, content in sorted(tree.items()):
        path = root / rel
        if content == DIR:
            path.mkdir(parents=True, exist_ok=True)
        elif isinstance(content, bytes):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        else:
            raise ValueError(f"cannot install {rel}: {content!r}")


def snapshot(root: Path) -> Tree:
    """Everything below ``root``: files with their bytes, directories, symlinks (not followed)."""
    tree: Tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                tree[rel] = f"<link {os.readlink(path)}>"
            elif path.is_dir():
                tree[rel] = DIR
            else:
                tree[rel] = path.read_bytes()
    return tree


def _sleep_forever() -> None:
    while True:
        time.sleep(3600)


def _apply(name: str, roots: list[Path], hold_at: str | None) -> None:
    import anyio

    from atomictools import Workspace
    from atomictools.engine.changes import journaled as journal

    if hold_at is not None:
        real = getattr(journal, "crash_point")  # noqa: B009 (not re-exported)

        def holding(point: str) -> None:
            real(point)
            if point == hold_at:
                print("held", flush=True)
                _sleep_forever()

        setattr(journal, "crash_point", holding)  # noqa: B010
    ws = Workspace(roots)
    changes = scenario(name, roots).changes
    anyio.run(ws.apply_changes, changes)
    print("done", flush=True)


def main(argv: list[str]) -> int:
    mode, *args = argv
    if mode == "apply":
        _apply(args[0], [Path(p) for p in args[1:]], None)
    elif mode == "hold":
        _apply(args[0], [Path(p) for p in args[2:]], args[1])
    elif mode == "temp":
        from atomictools.engine.durable.tempfiles import create_locked_temp

        dir_fd = os.open(args[0], os.O_RDONLY | os.O_DIRECTORY)
        _fd, name = create_locked_temp(dir_fd, args[1])
        print(name, flush=True)
        _sleep_forever()
    elif mode == "flock":
        fd = os.open(args[0], os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        _sleep_forever()
    else:
        print(f"unknown mode {mode}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
