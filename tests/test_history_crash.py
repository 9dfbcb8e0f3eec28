"""History across a crash: a recorded change SIGKILLed at every crash point it passes.

For each kind of recorded change (a direct write over a file and one creating a file, edit,
delete, move, copy, ``mkdir -p``, a keyed write, ``apply_changes`` over three files, and an
undo of an earlier ``apply_changes``) a real child process (``tests/history_child.py``) first
runs the change once with every crash point listing itself, which names the points it passes
(a name passed twice is killed at each passage: ``name:1``, ``name:2``). Then, for each of
them, a fresh child is SIGKILLed there (``ATOMICTOOLS_TEST_CRASH_AT`` with
``ATOMICTOOLS_TEST_CRASH_SIGNAL=KILL``); a child that is not killed fails the test, so a point
that is never reached cannot pass silently. Recovery then runs with the child's state
directory (``Workspace.recover()``, or, every other point, a server start's
``recover_interrupted`` followed by its sweep), and:

* the root holds wholly the tree before or wholly the tree after the change, byte for byte
  (``mkdir -p`` may keep the parents made so far: a prefix of its directories), and the one
  the crash point allows (before the commit point: before; from it on: after);
* the history agrees: no entry is left pending, and the change's entry is there (done) exactly
  when the files changed, naming exactly the paths that changed with their content before and
  after (for the undo: an ``undo`` entry naming the change it undid); undoing that entry then
  gives back the tree before, so the content it kept is really there;
* no temp file, member or claim of ours is left under the root, and no journal record.

Children run two at a time; the whole file takes some 20 s on two cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from atomictools import Workspace, is_temp_name
from atomictools.engine.changes.recovery_report import RecoveryReport
from atomictools.engine.durable.steps import CRASH_ENV, CRASH_SIGNAL_ENV
from atomictools.engine.history.store import store_for
from tests.changeset_child import snapshot as tree_of
from tests.history_child import DIR, SCENARIO_NAMES, Scenario, Tree, install, scenario

CHILD = Path(__file__).with_name("history_child.py")
CHILD_TIMEOUT = 60.0
WORKERS = 2

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs POSIX processes")


@dataclass
class Lane:
    """One child's world: its root, its state directory, what was recorded before it ran."""

    root: Path
    state: Path
    base_id: str | None = None
    """``undo``: the change set's entry the child undoes."""

    def workspace(self) -> Workspace:
        return Workspace([self.root], state_dir=self.state)


def snapshot(root: Path) -> Tree:
    """The tree as users see it: everything below ``root`` but our own temp files."""
    return {
        rel: content
        for rel, content in tree_of(root).items()
        if not is_temp_name(rel.rsplit("/", 1)[-1])
    }


def ours(root: Path) -> list[str]:
    """Temp files, change-set members and claims of ours anywhere below ``root``."""
    return sorted(
        str(Path(dirpath, name).relative_to(root))
        for dirpath, dirnames, filenames in os.walk(root)
        for name in dirnames + filenames
        if is_temp_name(name)
    )


def sha(data: bytes | str) -> str | None:
    return hashlib.sha256(data).hexdigest() if isinstance(data, bytes) else None


def kind(tree: Tree, rel: str) -> str:
    if rel not in tree:
        return "absent"
    return "directory" if tree[rel] == DIR else "file"


def make_lane(base: Path, sc: Scenario) -> Lane:
    """A fresh root holding the scenario's tree before the change (for ``undo``: the change
    set it undoes applied first, through the engine, so that the set has its entry)."""
    lane = Lane(base / "root", base / "state")
    lane.root.mkdir(parents=True)
    lane.state.mkdir()
    if sc.base_changes:
        install(lane.root, sc.after)
        done = anyio.run(lane.workspace().apply_changes, list(sc.base_changes))
        lane.base_id = done.change_id
        assert lane.base_id is not None
        store_for(lane.state).close()
    else:
        install(lane.root, sc.before)
    assert snapshot(lane.root) == sc.before
    return lane


def child_env(crash_at: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop(CRASH_ENV, None)
    env.pop(CRASH_SIGNAL_ENV, None)
    if crash_at is not None:
        env[CRASH_ENV] = crash_at
        env[CRASH_SIGNAL_ENV] = "KILL"
    return env


def run_child(sc: Scenario, lane: Lane, crash_at: str | None) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, str(CHILD)]
    if crash_at is None:
        args.append("--list")
    args += [sc.name, str(lane.root), str(lane.state)]
    if lane.base_id is not None:
        args.append(lane.base_id)
    return subprocess.run(
        args,
        env=child_env(crash_at),
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        check=False,
    )


def crash_points(sc: Scenario, base: Path) -> list[str]:
    """Every crash point the change passes, in order, as ``name:n`` (its n-th passage)."""
    lane = make_lane(base, sc)
    done = run_child(sc, lane, None)
    assert done.returncode == 0, done.stderr
    names: list[str] = json.loads(done.stdout)
    missing = sc.must_reach - set(names)
    assert not missing, f"{sc.name} never passed {sorted(missing)}; it passed {names}"
    assert snapshot(lane.root) == sc.after  # the listing run changed the files as expected
    seen: Counter[str] = Counter()
    points = []
    for name in names:
        seen[name] += 1
        points.append(f"{name}:{seen[name]}")
    return points


def expected_tree(sc: Scenario, points: list[str], index: int) -> Tree:
    """What the root must hold after a kill at ``points[index]`` and recovery."""
    if sc.prefixes:  # mkdir -p: each history.recorded is followed by one mkdir
        made = sum(p.startswith("history.recorded:") for p in points[:index])
        return ([sc.before, *sc.prefixes, sc.after])[made]
    commit = next(i for i, p in enumerate(points) if p.split(":")[0] == sc.commit)
    return sc.after if index >= commit else sc.before


def recover(lane: Lane, server_start: bool) -> RecoveryReport:
    """What an operator's ``atomictools recover`` does, or what a server does when it starts
    (journals and pending history entries, then the sweep of orphaned temps)."""
    ws = lane.workspace()
    if not server_start:
        return ws.recover()

    async def start() -> RecoveryReport:
        return await ws.sweep(await ws.recover_interrupted())

    return anyio.run(start)


def check_after_kill(sc: Scenario, lane: Lane, point: str, expected: Tree, server: bool) -> None:
    where = f"{sc.name} killed at {point}"
    report = recover(lane, server)
    assert report.history_problem is None, where
    assert not report.unfinished, f"{where}: {report.unfinished}"
    assert ours(lane.root) == [], f"{where}: temps left after recovery"
    journals = lane.state / "journals"
    assert not journals.exists() or os.listdir(journals) == [], f"{where}: journal left"

    tree = snapshot(lane.root)
    assert tree in (sc.before, sc.after, *sc.prefixes), f"{where}: a mixed tree {sorted(tree)}"
    assert tree == expected, f"{where}: {'after' if tree == sc.after else 'before'} state"

    store = store_for(lane.state)
    try:
        pending = [e.id for e, _pid, _ev in store.pending()]
        assert pending == [], f"{where}: pending entries left: {pending}"
        # Every entry of the store (the lane's own), whichever paths it names, if any.
        stored = store.entries(include_pending=True, include_audit=True, limit=None)
        assert all(e.state == "done" for e in stored), f"{where}: {stored}"
        new_ids = [e.id for e in stored if e.id != lane.base_id]
        if lane.base_id is not None:
            assert lane.base_id in {e.id for e in stored}, where
        if tree == sc.before:
            assert new_ids == [], f"{where}: files unchanged, but recorded: {stored}"
            return
        assert len(new_ids) == 1, f"{where}: files changed, entries {stored}"
        ws = lane.workspace()
        shown = anyio.run(lambda: ws.history_entries(ids=new_ids, limit=None))
        assert len(shown) == 1, f"{where}: the entry is not listed: {stored}"
        entry = shown[0]
        assert (entry.state, entry.op) == ("done", sc.op), f"{where}: {entry}"
        if lane.base_id is not None:
            assert entry.undoes == (lane.base_id,), f"{where}: {entry}"
        changed = {p for p in sc.changed if sc.before.get(p) != tree.get(p)}
        assert {row.path for row in entry.paths} == changed, f"{where}: {entry.paths}"
        for row in entry.paths:
            assert (row.before, row.after) == (kind(sc.before, row.path), kind(tree, row.path))
            assert row.before_sha256 == sha(sc.before.get(row.path, DIR)), f"{where}: {row}"
            assert row.after_sha256 == sha(tree.get(row.path, DIR)), f"{where}: {row}"
        assert entry.undoable, f"{where}: {entry}"
        # The kept content is really there: undoing the entry gives back the tree before.
        undone = anyio.run(lambda: ws.undo(entry.id))
        assert undone.undone == (entry.id,)
        assert snapshot(lane.root) == sc.before, f"{where}: undoing {entry.id} after recovery"
        assert ours(lane.root) == []
    finally:
        store.close()


@pytest.mark.parametrize("name", SCENARIO_NAMES)
def test_sigkill_at_every_crash_point_keeps_files_and_history_in_step(
    name: str, tmp_path: Path
) -> None:
    sc = scenario(name)
    points = crash_points(sc, tmp_path / "listing")
    lanes = [make_lane(tmp_path / f"kill-{i}", sc) for i in range(len(points))]
    with ThreadPoolExecutor(WORKERS) as pool:
        runs: list[Future[subprocess.CompletedProcess[str]]] = [
            pool.submit(run_child, sc, lane, point)
            for lane, point in zip(lanes, points, strict=True)
        ]
        for index, (point, lane, run) in enumerate(zip(points, lanes, runs, strict=True)):
            done = run.result()
            assert done.returncode == -signal.SIGKILL, (
                f"{name}: the child was not killed at {point} (exit {done.returncode}; "
                f"stdout {done.stdout!r}): that crash point was never reached\n{done.stderr}"
            )
            expected = expected_tree(sc, points, index)
            check_after_kill(sc, lane, point, expected, server=index % 2 == 1)
