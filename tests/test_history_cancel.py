"""Cancellation and history: a cancelled change or undo leaves no entry, and changes nothing.

The injection is the one ``tests/test_cancellation.py`` uses: an observer
(``engine.durable.steps.observe_steps``) cancels the enclosing scope when the N-th protocol
step is reached, for N = 1, 2, 3, ... until the call completes uncancelled, so every step was
a cancellation point once. After each cancelled call: every file is byte-identical to before,
no temp file of ours is left, the history has no new entry (and none pending), no per-path
lock is held, and the next call on the same workspace goes on (the next N reaches further, the
last run completes and records its entry, which can then be undone).

* ``Workspace.undo`` (of a change set over three files, and of the last three direct changes:
  an edit, a move over a file and a ``mkdir -p``): cancelled at every step of the undo's
  change set. A second sweep cancels the undo after K event-loop ticks instead of at a step
  (K = 0, 1, 2, ... growing by an eighth), which lands in the awaits that are not steps (reading the
  history and planning in worker threads, the path locks): the files are then wholly as before
  (no undo entry) or wholly undone (one undo entry).
* Direct changes with history (write over a large file and of a new one, edit, delete, move,
  copy): cancelled at every step, including the steps between writing the entry ``pending``
  and the rename or unlink (the sweep checks that some cancel found the entry pending, i.e.
  landed in that window): the entry is then discarded.

Every test runs on asyncio and on trio (the ``anyio_backend`` fixture in conftest).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from atomictools import Change, Limits, Workspace, is_temp_name
from atomictools.engine.durable.steps import observe_steps
from atomictools.engine.history.store import HistoryStore, store_for
from tests.changeset_child import snapshot
from tests.history_child import BIG_NEW, BIG_OLD, DIR, SET_AFTER, SET_BEFORE, Tree, install

pytestmark = pytest.mark.anyio

CHUNK = 32 * 1024
MAX_STEPS = 500
TIMEOUT = 10.0
Operation = Callable[[], Awaitable[object]]


def ours(top: Path) -> list[str]:
    return sorted(
        os.path.join(dirpath, name)
        for dirpath, dirnames, filenames in os.walk(top)
        for name in dirnames + filenames
        if is_temp_name(name)
    )


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Attempt:
    cancelled: bool
    steps: list[str]
    pending_at_cancel: list[str] = field(default_factory=list)
    """Ids of the entries that were pending when the cancel was delivered."""


async def cancelled_at(n: int, operation: Operation, store: HistoryStore) -> Attempt:
    """Run ``operation``, cancelling it when the n-th protocol step is reached."""
    seen: list[str] = []
    pending: list[str] = []
    with anyio.fail_after(TIMEOUT), anyio.CancelScope() as scope:

        def observer(name: str) -> None:
            seen.append(name)
            if len(seen) == n:
                pending.extend(entry.id for entry, _pid, _ev in store.pending())
                scope.cancel()

        with observe_steps(observer):
            await operation()
    assert scope.cancelled_caught == (len(seen) >= n), (n, seen)
    if scope.cancelled_caught:
        assert len(seen) == n, f"steps were reached after the cancel at step {n}: {seen}"
    return Attempt(scope.cancelled_caught, seen, pending)


async def cancelled_after_ticks(k: int, operation: Operation) -> tuple[bool, int]:
    """Run ``operation``, cancelled after ``k`` event-loop ticks: (whether it returned, how
    many protocol steps it reached)."""
    returned = False
    seen: list[str] = []
    with anyio.fail_after(TIMEOUT), anyio.CancelScope() as outer:
        async with anyio.create_task_group() as tg:

            async def canceller() -> None:
                for _ in range(k):
                    await anyio.lowlevel.checkpoint()
                outer.cancel()

            tg.start_soon(canceller)
            with observe_steps(seen.append):
                await operation()
            returned = True
            tg.cancel_scope.cancel()
    return returned, len(seen)


class World:
    """A root and a history of its own, with what a cancelled call must leave as it is."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "root"
        self.state = tmp_path / "state"
        self.root.mkdir()
        self.ws = Workspace([self.root], state_dir=self.state, limits=Limits(chunk_bytes=CHUNK))
        self.store = store_for(self.state)

    def close(self) -> None:
        self.store.close()

    async def entry_ids(self) -> list[str]:
        return [e.id for e in await self.ws.history_entries(limit=None)]

    async def assert_untouched(self, tree: Tree, ids: list[str], where: str) -> None:
        assert snapshot(self.root) == tree, f"{where}: the files changed"
        assert ours(self.root) == [], f"{where}: temps left"
        assert await self.entry_ids() == ids, f"{where}: the history changed"
        everything = self.store.entries(include_pending=True, limit=None)
        assert [e.id for e in everything] == ids, f"{where}: a pending entry is left"
        assert len(self.ws._locks) == 0, f"{where}: a per-path lock outlived the call"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    made = World(tmp_path)
    yield made
    made.close()


# -- undo -----------------------------------------------------------------------------------


async def set_to_undo(world: World) -> tuple[str, Tree, Tree]:
    """A change set over three files (a large rewrite, a new file, a deletion), applied."""
    install(world.root, SET_BEFORE)
    done = await world.ws.apply_changes(
        [
            Change("write", "a.txt", content=BIG_NEW),
            Change("write", "c.txt", content=b"created by the set\n"),
            Change("delete", "d.txt"),
        ]
    )
    assert done.change_id is not None
    assert snapshot(world.root) == SET_AFTER
    return done.change_id, SET_AFTER, SET_BEFORE


async def last_three_to_undo(world: World) -> tuple[str, Tree, Tree]:
    """Three direct changes: an edit, a move over a file, a ``mkdir -p`` (undone as one)."""
    before: Tree = {
        "e.txt": b"line one\nline two\n",
        "src.txt": b"moved\n",
        "dst.txt": b"replaced by the move\n",
    }
    install(world.root, before)
    await world.ws.edit("e.txt", [("line two", "line 2")])
    await world.ws.move("src.txt", "dst.txt", overwrite=True)
    await world.ws.mkdir("d1/d2")
    after: Tree = {
        "e.txt": b"line one\nline 2\n",
        "dst.txt": b"moved\n",
        "d1": DIR,
        "d1/d2": DIR,
    }
    assert snapshot(world.root) == after
    ids = await world.entry_ids()
    assert len(ids) == 3
    return ",".join(ids), after, before


UNDOS = {"change-set": set_to_undo, "last-three": last_three_to_undo}


def undo_call(world: World, target: str) -> Operation:
    if "," in target:
        return lambda: world.ws.undo(last=3)
    return lambda: world.ws.undo(target)


async def check_undone(world: World, target: str, ids: list[str], restored: Tree) -> None:
    assert snapshot(world.root) == restored
    assert ours(world.root) == []
    entries = await world.ws.history_entries(limit=None)
    assert [e.id for e in entries[1:]] == ids
    undo = entries[0]
    assert (undo.op, undo.state) == ("undo", "done")
    assert set(undo.undoes) == set(target.split(","))


@pytest.mark.parametrize("what", sorted(UNDOS))
async def test_undo_cancelled_at_every_step_changes_nothing(world: World, what: str) -> None:
    target, now, restored = await UNDOS[what](world)
    ids = await world.entry_ids()
    undo = undo_call(world, target)
    cancels = 0
    for n in range(1, MAX_STEPS):
        attempt = await cancelled_at(n, undo, world.store)
        if not attempt.cancelled:
            break
        cancels += 1
        await world.assert_untouched(now, ids, f"undo cancelled at step {n} {attempt.steps}")
    else:
        pytest.fail(f"the undo was still being cancelled after {MAX_STEPS} steps")
    # The last run was not cancelled: it is the later call that succeeds.
    assert cancels == len(attempt.steps) > 0
    assert "changeset.commit" in attempt.steps, attempt.steps
    await check_undone(world, target, ids, restored)


@pytest.mark.parametrize("what", sorted(UNDOS))
async def test_undo_cancelled_between_steps_is_all_or_nothing(world: World, what: str) -> None:
    target, now, restored = await UNDOS[what](world)
    ids = await world.entry_ids()
    undo = undo_call(world, target)
    ticks = 0
    reached: list[int] = []
    for _ in range(MAX_STEPS):
        returned, steps = await cancelled_after_ticks(ticks, undo)
        if returned:
            break
        # A cancel before the commit point changes nothing; the undo never stops after it.
        await world.assert_untouched(now, ids, f"undo cancelled after {ticks} ticks")
        reached.append(steps)
        ticks += 1 + ticks // 8
    else:
        pytest.fail(f"the undo was still being cancelled after {ticks} ticks")
    # Cancels landed before the first step (reading the history, planning, the locks): the
    # step sweep above cannot reach those; where the later ones land depends on timing.
    assert 0 in reached, reached
    await check_undone(world, target, ids, restored)


# -- direct changes ------------------------------------------------------------------------


@dataclass(frozen=True)
class Direct:
    before: Tree
    after: Tree
    call: Callable[[Workspace], Awaitable[object]]
    op: str


DIRECTS = {
    "write-existing": Direct(
        {"a.txt": BIG_OLD}, {"a.txt": BIG_NEW}, lambda ws: ws.write("a.txt", BIG_NEW), "write"
    ),
    "write-new": Direct(
        {"sub": DIR},
        {"sub": DIR, "sub/n.txt": b"new\n"},
        lambda ws: ws.write("sub/n.txt", b"new\n"),
        "write",
    ),
    "edit": Direct(
        {"e.txt": b"one\ntwo\n"},
        {"e.txt": b"one\n2\n"},
        lambda ws: ws.edit("e.txt", [("two", "2")]),
        "edit",
    ),
    "delete": Direct({"g.txt": b"gone\n"}, {}, lambda ws: ws.delete("g.txt"), "delete"),
    "move": Direct(
        {"s.txt": b"moved\n", "t.txt": b"replaced\n"},
        {"t.txt": b"moved\n"},
        lambda ws: ws.move("s.txt", "t.txt", overwrite=True),
        "move",
    ),
    "copy": Direct(
        {"c.txt": BIG_OLD},
        {"c.txt": BIG_OLD, "c2.txt": BIG_OLD},
        lambda ws: ws.copy("c.txt", "c2.txt"),
        "copy",
    ),
}


@pytest.mark.parametrize("what", sorted(DIRECTS))
async def test_direct_change_cancelled_at_every_step_leaves_no_entry(
    world: World, what: str
) -> None:
    change = DIRECTS[what]
    install(world.root, change.before)
    await world.ws.write("other.txt", b"an earlier change\n")  # the history is not empty
    before = snapshot(world.root)
    ids = await world.entry_ids()
    cancelled_while_pending = []
    for n in range(1, MAX_STEPS):
        attempt = await cancelled_at(n, lambda: change.call(world.ws), world.store)
        if not attempt.cancelled:
            break
        await world.assert_untouched(before, ids, f"{what} cancelled at step {n} {attempt.steps}")
        if attempt.pending_at_cancel:
            cancelled_while_pending.append(attempt.steps[-1])
    else:
        pytest.fail(f"{what} was still being cancelled after {MAX_STEPS} steps")
    # Some cancel landed after the entry was written pending, before the commit point.
    assert cancelled_while_pending, f"no step between the entry and the commit: {attempt.steps}"
    after = {**change.after, "other.txt": b"an earlier change\n"}
    assert snapshot(world.root) == after
    assert ours(world.root) == []
    entries = await world.ws.history_entries(limit=None)
    assert [e.id for e in entries[1:]] == ids
    assert (entries[0].op, entries[0].state) == (change.op, "done")
    assert world.store.pending() == []
    # The entry of the call that completed works: undoing it gives the files back.
    await world.ws.undo(entries[0].id)
    assert snapshot(world.root) == before
