"""Child process of the history crash tests: makes one recorded change, then exits.

Run as a real process (``sys.executable tests/history_child.py SCENARIO ROOT STATE [ARG]``) so
that ``ATOMICTOOLS_TEST_CRASH_AT=name:n`` with ``ATOMICTOOLS_TEST_CRASH_SIGNAL=KILL`` really
SIGKILLs it at that step: its locks are dropped by the kernel and nothing of it runs after.
``--list`` makes no crash but prints, as JSON, every crash point the change passed, in order
(each ``step`` and each bare ``crash_point``), so the parent kills it at every one of them.

The scenarios live here and are imported by the tests, so parent and child agree on the tree
before the change, the tree after it, and the change itself. ``ARG`` is the change id an
``undo`` scenario takes back (the parent makes that change first, in its own process).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from atomictools import Change, Workspace

DIR = "<dir>"
Tree = dict[str, bytes | str]
"""Relative path -> file content, or ``DIR`` for a directory."""

BIG_OLD = b"".join(
    hashlib.sha256(str(i).encode()).hexdigest().encode() + b"\n" for i in range(2000)
)
"""130 KB: more than the history keeps inline, so its old version is linked into ``blobs/``."""
BIG_NEW = BIG_OLD.replace(b"a", b"A")


@dataclass(frozen=True)
class Scenario:
    name: str
    op: str
    """The history entry's op."""
    before: Tree
    after: Tree
    run: Callable[[Workspace, str | None], Awaitable[object]]
    must_reach: frozenset[str]
    """Crash points the change must pass (the enumeration is checked against them)."""
    commit: str
    """The first crash point at which the change has passed its commit point."""
    changed: frozenset[str] = field(default_factory=frozenset)
    """The paths the entry names (relative)."""
    base_changes: tuple[Change, ...] = ()
    """``undo``: the change set the parent applies first (its entry is undone)."""
    prefixes: tuple[Tree, ...] = ()
    """``mkdir -p``: trees a crash half-way may leave (the parents made so far are kept)."""


WRITE_STEPS = frozenset(
    {"write.created", "write.written", "history.recorded", "write.renamed", "history.confirmed"}
)
SET_STEPS = frozenset(
    {
        "changeset.prepare",
        "changeset.chunk",
        "changeset.commit",
        "changeset.prepared",
        "changeset.committed",
        "changeset.apply",
        "changeset.applied",
        "changeset.history_recorded",
        "changeset.finished",
    }
)
DIRECT_STEPS = frozenset({"history.recorded", "history.before_commit", "history.confirmed"})


def _set_changes() -> tuple[Change, ...]:
    from atomictools import Change

    return (
        Change("write", "a.txt", content=BIG_NEW),
        Change("write", "c.txt", content=b"created by the set\n"),
        Change("delete", "d.txt"),
    )


SET_BEFORE: Tree = {"a.txt": BIG_OLD, "d.txt": b"deleted by the set\n", "keep.txt": b"kept\n"}
SET_AFTER: Tree = {"a.txt": BIG_NEW, "c.txt": b"created by the set\n", "keep.txt": b"kept\n"}


async def _write_existing(ws: Workspace, _arg: str | None) -> object:
    return await ws.write("a.txt", BIG_NEW)


async def _write_new(ws: Workspace, _arg: str | None) -> object:
    return await ws.write("sub/new.txt", b"a new file\n")


async def _edit(ws: Workspace, _arg: str | None) -> object:
    return await ws.edit("e.txt", [("line two\n", "line 2\nline 2.5\n")])


async def _delete(ws: Workspace, _arg: str | None) -> object:
    return await ws.delete("gone.txt")


async def _move(ws: Workspace, _arg: str | None) -> object:
    return await ws.move("src.txt", "dst.txt", overwrite=True)


async def _copy(ws: Workspace, _arg: str | None) -> object:
    return await ws.copy("c.txt", "c2.txt")


async def _mkdir(ws: Workspace, _arg: str | None) -> object:
    return await ws.mkdir("d1/d2/d3")


async def _write_keyed(ws: Workspace, _arg: str | None) -> object:
    return await ws.write("k.txt", b"keyed new\n", idempotency_key="history-crash-key")


async def _apply(ws: Workspace, _arg: str | None) -> object:
    return await ws.apply_changes(list(_set_changes()))


async def _undo(ws: Workspace, arg: str | None) -> object:
    assert arg is not None
    return await ws.undo(arg)


def _scenarios() -> dict[str, Scenario]:
    keep = {"keep.txt": b"kept\n"}
    edit_old = b"line one\nline two\nline three\n"
    edit_new = b"line one\nline 2\nline 2.5\nline three\n"
    listed = [
        Scenario(
            "write-existing",
            "write",
            {**keep, "a.txt": BIG_OLD},
            {**keep, "a.txt": BIG_NEW},
            _write_existing,
            WRITE_STEPS,
            "write.renamed",
            frozenset({"a.txt"}),
        ),
        Scenario(
            "write-new",
            "write",
            {**keep, "sub": DIR},
            {**keep, "sub": DIR, "sub/new.txt": b"a new file\n"},
            _write_new,
            WRITE_STEPS,
            "write.renamed",
            frozenset({"sub/new.txt"}),
        ),
        Scenario(
            "edit",
            "edit",
            {**keep, "e.txt": edit_old},
            {**keep, "e.txt": edit_new},
            _edit,
            WRITE_STEPS | {"edit.planned"},
            "write.renamed",
            frozenset({"e.txt"}),
        ),
        Scenario(
            "delete",
            "delete",
            {**keep, "gone.txt": b"deleted\n"},
            dict(keep),
            _delete,
            DIRECT_STEPS | {"delete.before"},
            "history.confirmed",
            frozenset({"gone.txt"}),
        ),
        Scenario(
            "move",
            "move",
            {**keep, "src.txt": b"moved\n", "dst.txt": b"replaced by the move\n"},
            {**keep, "dst.txt": b"moved\n"},
            _move,
            DIRECT_STEPS | {"move.before"},
            "history.confirmed",
            frozenset({"src.txt", "dst.txt"}),
        ),
        Scenario(
            "copy",
            "copy",
            {**keep, "c.txt": b"copied\n"},
            {**keep, "c.txt": b"copied\n", "c2.txt": b"copied\n"},
            _copy,
            WRITE_STEPS,
            "write.renamed",
            frozenset({"c2.txt"}),
        ),
        Scenario(
            "mkdir-p",
            "mkdir",
            dict(keep),
            {**keep, "d1": DIR, "d1/d2": DIR, "d1/d2/d3": DIR},
            _mkdir,
            frozenset({"mkdir.before", "history.recorded", "history.confirmed"}),
            "history.confirmed",
            frozenset({"d1", "d1/d2", "d1/d2/d3"}),
            prefixes=({**keep, "d1": DIR}, {**keep, "d1": DIR, "d1/d2": DIR}),
        ),
        Scenario(
            "write-keyed",
            "write",
            {**keep, "k.txt": b"keyed old\n"},
            {**keep, "k.txt": b"keyed new\n"},
            _write_keyed,
            SET_STEPS | {"changeset.key_recorded"},
            "changeset.committed",
            frozenset({"k.txt"}),
        ),
        Scenario(
            "apply-changes",
            "apply_changes",
            SET_BEFORE,
            SET_AFTER,
            _apply,
            SET_STEPS,
            "changeset.committed",
            frozenset({"a.txt", "c.txt", "d.txt"}),
        ),
        Scenario(
            "undo",
            "undo",
            SET_AFTER,
            SET_BEFORE,
            _undo,
            SET_STEPS,
            "changeset.committed",
            frozenset({"a.txt", "c.txt", "d.txt"}),
            base_changes=_set_changes(),
        ),
    ]
    return {s.name: s for s in listed}


SCENARIO_NAMES = (
    "write-existing",
    "write-new",
    "edit",
    "delete",
    "move",
    "copy",
    "mkdir-p",
    "write-keyed",
    "apply-changes",
    "undo",
)


def scenario(name: str) -> Scenario:
    return _scenarios()[name]


def install(root: Path, tree: Tree) -> None:
    """Create ``tree`` under an empty ``root``."""
    for rel, content in sorted(tree.items()):
        path = root / rel
        if content == DIR:
            path.mkdir(parents=True, exist_ok=True)
        else:
            assert isinstance(content, bytes)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)


def main(argv: list[str]) -> int:
    listing = argv[0] == "--list"
    if listing:
        argv = argv[1:]
    name, root, state, *rest = argv
    import anyio

    from atomictools import Workspace
    from tests.crashpoints import list_crash_points

    reached = list_crash_points() if listing else []
    ws = Workspace([root], state_dir=state)
    anyio.run(scenario(name).run, ws, rest[0] if rest else None)
    if listing:
        print(json.dumps(reached), flush=True)
    else:
        print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main(sys.argv[1:]))
