"""Multi-file change sets (``Workspace.apply_changes`` / ``changeset()``): all or nothing.

Every test compares whole trees (files with their bytes, directories, symlinks), so a leftover
directory, temp file or stray change is caught, and checks that the journal directory in the
state directory is empty afterwards. Cancellation is injected at every protocol step in turn
(``atomictools.engine.durable.steps.observe_steps``), as in ``test_cancellation``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from atomictools import (
    AlreadyExistsError,
    AtomicToolsError,
    Change,
    ChangeSetResult,
    ConcurrentChangeError,
    EditNotFoundError,
    InvalidArgumentError,
    Limits,
    NotFoundError,
    OutsideRootsError,
    PreconditionFailedError,
    Workspace,
)
from atomictools.engine.durable.steps import observe_steps
from atomictools.engine.text.edits import Edit
from tests.changeset_child import DIR, Tree, install, snapshot
from tests.conftest import temp_files

pytestmark = pytest.mark.anyio

MAX_STEPS = 500


# -- helpers ------------------------------------------------------------------------------------


def journals(ws: Workspace) -> list[str]:
    """Every entry of the workspace's journal directory (records and record temps)."""
    if not ws.journal_dir.exists():
        return []
    return sorted(p.name for p in ws.journal_dir.iterdir())


def reset(root: Path, tree: Tree) -> None:
    """Make ``root`` hold exactly ``tree``."""
    for entry in root.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    install(root, tree)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_clean(ws: Workspace, tmp_path: Path) -> None:
    assert temp_files(tmp_path) == [], "a temp file was left behind"
    assert journals(ws) == [], "a journal record was left behind"
    assert len(ws._locks) == 0, "a per-file lock outlived the call"


async def follow_up(ws: Workspace, root: Path) -> None:
    """The next change set on the same workspace works (nothing stuck, nothing locked)."""
    with anyio.fail_after(10):
        result = await ws.apply_changes([Change("write", "follow-up.txt", content=b"next\n")])
    assert result.applied
    assert (root / "follow-up.txt").read_bytes() == b"next\n"
    (root / "follow-up.txt").unlink()


# -- every operation ------------------------------------------------------------------------------

OLD: Tree = {
    "a.txt": b"alpha old\n",
    "crlf.txt": b"first\r\nsecond\r\nthird\r\n",
    "m1.txt": b"move me\n",
    "m2.txt": b"move me over\n",
    "m2-dst.txt": b"replaced by a move\n",
    "c1.txt": b"copy me\n",
    "c2.txt": b"copy me over\n",
    "c2-dst.txt": b"replaced by a copy\n",
    "gone.txt": b"delete me\n",
}

NEW: Tree = {
    "a.txt": b"alpha new\n",
    "fresh.txt": b"a new file\n",
    "crlf.txt": b"first\r\nSECOND\r\nsecond and a half\r\nthird\r\n",
    "m1-moved.txt": b"move me\n",
    "m2-dst.txt": b"move me over\n",
    "c1.txt": b"copy me\n",
    "c1-copy.txt": b"copy me\n",
    "c2.txt": b"copy me over\n",
    "c2-dst.txt": b"copy me over\n",
    "x": DIR,
    "x/y": DIR,
    "x/y/z": DIR,
    "x/y/z/inside.txt": b"inside new dirs\n",
}


def every_op() -> list[Change]:
    return [
        Change("write", "a.txt", content=b"alpha new\n"),
        Change("write", "fresh.txt", content=b"a new file\n"),
        Change(
            "edit", "crlf.txt", edits=(Edit("second\nthird", "SECOND\nsecond and a half\nthird"),)
        ),
        Change("move", "m1-moved.txt", source="m1.txt"),
        Change("move", "m2-dst.txt", source="m2.txt", overwrite=True),
        Change("copy", "c1-copy.txt", source="c1.txt"),
        Change("copy", "c2-dst.txt", source="c2.txt", overwrite=True),
        Change("delete", "gone.txt"),
        Change("mkdir", "x/y/z"),
        Change("write", "x/y/z/inside.txt", content=b"inside new dirs\n"),
    ]


async def test_every_operation_applies(root: Path, tmp_path: Path, ws: Workspace) -> None:
    install(root, OLD)
    (root / "crlf.txt").chmod(0o640)
    moved_inode = (root / "m1.txt").stat().st_ino
    result = await ws.apply_changes(every_op())
    assert snapshot(root) == NEW
    assert result.applied
    assert result.txid
    assert [c.op for c in result.changes] == [c.op for c in every_op()]
    assert [c.path for c in result.changes] == [c.path for c in every_op()]
    by_path = {c.path: c for c in result.changes}
    for path in ("a.txt", "fresh.txt", "crlf.txt", "c1-copy.txt", "c2-dst.txt", "x/y/z/inside.txt"):
        content = NEW[path]
        assert isinstance(content, bytes)
        assert by_path[path].sha256 == sha(content), path
    assert by_path["fresh.txt"].created
    assert not by_path["a.txt"].created
    assert by_path["x/y/z"].created
    assert by_path["m1-moved.txt"].source == "m1.txt"
    diff = by_path["crlf.txt"].diff
    assert diff is not None
    assert "-second" in diff
    assert "+SECOND" in diff
    # An edit keeps the file's mode; a move is a rename (same inode).
    assert (root / "crlf.txt").stat().st_mode & 0o777 == 0o640
    assert (root / "m1-moved.txt").stat().st_ino == moved_inode
    assert_clean(ws, tmp_path)


async def test_edit_keeps_crlf_line_endings(root: Path, tmp_path: Path, ws: Workspace) -> None:
    (root / "w.txt").write_bytes(b"one\r\ntwo\r\n")
    await ws.apply_changes([Change("edit", "w.txt", edits=(Edit("one\ntwo", "1\n2\n3"),))])
    assert (root / "w.txt").read_bytes() == b"1\r\n2\r\n3\r\n"
    assert_clean(ws, tmp_path)


async def test_mkdir_of_existing_directory_is_fine(
    root: Path, tmp_path: Path, ws: Workspace
) -> None:
    (root / "d").mkdir()
    result = await ws.apply_changes(
        [Change("mkdir", "d"), Change("write", "d/f.txt", content=b"f")]
    )
    assert not result.changes[0].created
    assert snapshot(root) == {"d": DIR, "d/f.txt": b"f"}
    assert_clean(ws, tmp_path)


# -- all or nothing -------------------------------------------------------------------------------

FAILING: dict[str, tuple[Change, type[AtomicToolsError]]] = {
    "edit-not-found": (
        Change("edit", "crlf.txt", edits=(Edit("not in the file", "x"),)),
        EditNotFoundError,
    ),
    "edit-sha-mismatch": (
        Change("edit", "crlf.txt", edits=(Edit("first", "1st"),), expected_sha256="0" * 64),
        PreconditionFailedError,
    ),
    "write-sha-mismatch": (
        Change("write", "crlf.txt", content=b"x", expected_sha256="f" * 64),
        PreconditionFailedError,
    ),
    "delete-sha-mismatch": (
        Change("delete", "crlf.txt", expected_sha256="0" * 64),
        PreconditionFailedError,
    ),
    "move-exists-without-overwrite": (
        Change("move", "m2-dst.txt", source="m2.txt"),
        AlreadyExistsError,
    ),
    "copy-exists-without-overwrite": (
        Change("copy", "c2-dst.txt", source="c2.txt"),
        AlreadyExistsError,
    ),
    "move-missing-source": (Change("move", "nowhere.txt", source="missing.txt"), NotFoundError),
    "copy-missing-source": (Change("copy", "nowhere.txt", source="missing.txt"), NotFoundError),
    "delete-missing": (Change("delete", "missing.txt"), NotFoundError),
    "edit-missing": (Change("edit", "missing.txt", edits=(Edit("a", "b"),)), NotFoundError),
}


def with_failure_at(k: int, failing: Change) -> list[Change]:
    """Six changes, the k-th of which fails; the others stage files, backups and new dirs."""
    good = [
        Change("write", "a.txt", content=b"alpha new\n"),
        Change("mkdir", "x/y"),
        Change("write", "x/y/inside.txt", content=b"inside\n"),
        Change("copy", "c1-copy.txt", source="c1.txt"),
        Change("delete", "gone.txt"),
    ]
    return [*good[: k - 1], failing, *good[k - 1 :]]


@pytest.mark.parametrize("kind", list(FAILING))
async def test_failure_in_one_change_changes_nothing(
    root: Path, tmp_path: Path, ws: Workspace, kind: str
) -> None:
    failing, error = FAILING[kind]
    install(root, OLD)
    with pytest.raises(error) as caught:
        await ws.apply_changes(with_failure_at(4, failing))
    assert "change 4 of 6" in str(caught.value)
    assert "nothing was changed" in str(caught.value)
    assert not caught.value.changed
    assert snapshot(root) == OLD  # also: x/ and x/y/ made for change 2 are gone again
    assert_clean(ws, tmp_path)
    await follow_up(ws, root)


@pytest.mark.parametrize("k", [1, 6])
async def test_failure_in_first_or_last_change(
    root: Path, tmp_path: Path, ws: Workspace, k: int
) -> None:
    install(root, OLD)
    failing = Change("edit", "crlf.txt", edits=(Edit("absent", "x"),))
    with pytest.raises(EditNotFoundError, match=f"change {k} of 6"):
        await ws.apply_changes(with_failure_at(k, failing))
    assert snapshot(root) == OLD
    assert_clean(ws, tmp_path)


async def test_failure_removes_only_the_directories_it_made(
    root: Path, tmp_path: Path, ws: Workspace
) -> None:
    """``mkdir -p`` below an existing directory: the undo removes the new part only."""
    install(root, {**OLD, "keep": DIR})
    changes = [
        Change("mkdir", "keep/new/deeper"),
        Change("write", "keep/new/deeper/f.txt", content=b"f"),
        Change("delete", "missing.txt"),
    ]
    with pytest.raises(NotFoundError, match="change 3 of 3"):
        await ws.apply_changes(changes)
    assert snapshot(root) == {**OLD, "keep": DIR}
    assert_clean(ws, tmp_path)


async def test_empty_change_list_is_refused(ws: Workspace) -> None:
    with pytest.raises(InvalidArgumentError, match="empty"):
        await ws.apply_changes([])
    assert journals(ws) == []


async def test_read_only_workspace_refuses(root: Path, tmp_path: Path) -> None:
    (root / "a.txt").write_bytes(b"a")
    ws = Workspace([root], read_only=True)
    with pytest.raises(AtomicToolsError, match="read-only"):
        await ws.apply_changes([Change("write", "a.txt", content=b"b")])
    assert snapshot(root) == {"a.txt": b"a"}
    assert_clean(ws, tmp_path)


DUPLICATES = {
    "write-twice": [
        Change("write", "a.txt", content=b"1"),
        Change("write", "a.txt", content=b"2"),
    ],
    "edit-then-delete": [
        Change("edit", "a.txt", edits=(Edit("alpha", "beta"),)),
        Change("delete", "a.txt"),
    ],
    "move-source-then-write": [
        Change("move", "elsewhere.txt", source="m1.txt"),
        Change("write", "m1.txt", content=b"again"),
    ],
    "write-then-move-over-it": [
        Change("write", "m2-dst.txt", content=b"w"),
        Change("move", "m2-dst.txt", source="m2.txt", overwrite=True),
    ],
    "other-spelling": [
        Change("write", "a.txt", content=b"1"),
        Change("write", "x/../a.txt", content=b"2"),
    ],
}


@pytest.mark.parametrize("case", list(DUPLICATES))
async def test_path_used_by_two_changes_is_refused(
    root: Path, tmp_path: Path, ws: Workspace, case: str
) -> None:
    install(root, {**OLD, "x": DIR})
    with pytest.raises(InvalidArgumentError, match="change 2") as caught:
        await ws.apply_changes(DUPLICATES[case])
    assert "change 1" in str(caught.value)
    assert snapshot(root) == {**OLD, "x": DIR}
    assert_clean(ws, tmp_path)


async def test_copy_source_may_be_read_by_several_copies(
    root: Path, tmp_path: Path, ws: Workspace
) -> None:
    install(root, OLD)
    await ws.apply_changes(
        [
            Change("copy", "one.txt", source="c1.txt"),
            Change("copy", "two.txt", source="c1.txt"),
        ]
    )
    assert (root / "one.txt").read_bytes() == (root / "two.txt").read_bytes() == b"copy me\n"
    assert_clean(ws, tmp_path)


async def test_refused_duplicate_after_a_mkdir_leaves_no_directory_or_journal(
    root: Path, tmp_path: Path, ws: Workspace
) -> None:
    """The check runs while paths are resolved, after a ``mkdir`` change already made its
    directories (and wrote a ``preparing`` record): both must be undone."""
    install(root, OLD)
    changes = [
        Change("mkdir", "new/dir"),
        Change("write", "a.txt", content=b"1"),
        Change("write", "a.txt", content=b"2"),
    ]
    with pytest.raises(InvalidArgumentError, match="change 3"):
        await ws.apply_changes(changes)
    assert snapshot(root) == OLD
    assert_clean(ws, tmp_path)


async def test_path_error_after_a_mkdir_leaves_no_directory_or_journal(
    root: Path, tmp_path: Path, ws: Workspace
) -> None:
    install(root, OLD)
    changes = [Change("mkdir", "new/dir"), Change("write", "../escape.txt", content=b"x")]
    with pytest.raises(OutsideRootsError, match="change 2"):
        await ws.apply_changes(changes)
    assert snapshot(root) == OLD
    assert_clean(ws, tmp_path)


async def test_missing_source_directory_names_the_change(
    root: Path, tmp_path: Path, ws: Workspace
) -> None:
    install(root, OLD)
    changes = [
        Change("write", "a.txt", content=b"1"),
        Change("move", "b.txt", source="no-such-dir/q.txt"),
    ]
    with pytest.raises(NotFoundError) as caught:
        await ws.apply_changes(changes)
    assert "change 2" in str(caught.value)
    assert snapshot(root) == OLD
    assert_clean(ws, tmp_path)


# -- dry run --------------------------------------------------------------------------------------


async def test_dry_run_returns_diffs_and_writes_nothing(
    root: Path, tmp_path: Path, ws: Workspace
) -> None:
    install(root, OLD)
    result = await ws.apply_changes(every_op(), dry_run=True)
    assert isinstance(result, ChangeSetResult)
    assert not result.applied
    assert result.txid is None
    by_path = {c.path: c for c in result.changes}
    diff = by_path["crlf.txt"].diff
    assert diff is not None
    assert "+SECOND" in diff
    assert by_path["a.txt"].sha256 == sha(b"alpha new\n")
    assert by_path["crlf.txt"].sha256 == sha(NEW["crlf.txt"])  # type: ignore[arg-type]
    assert by_path["fresh.txt"].created
    assert snapshot(root) == OLD
    assert_clean(ws, tmp_path)


async def test_dry_run_reports_the_first_failure(root: Path, tmp_path: Path, ws: Workspace) -> None:
    install(root, OLD)
    failing = Change("edit", "crlf.txt", edits=(Edit("absent", "x"),))
    with pytest.raises(EditNotFoundError, match="change 4 of 6"):
        await ws.apply_changes(with_failure_at(4, failing), dry_run=True)
    assert snapshot(root) == OLD
    assert_clean(ws, tmp_path)


async def test_dry_run_never_creates_directories_or_records(
    root: Path, tmp_path: Path, ws: Workspace
) -> None:
    """Not even for a moment: a dry run is a check, visible to nobody."""
    install(root, OLD)
    seen: list[tuple[str, bool, list[str]]] = []

    def observer(name: str) -> None:
        seen.append((name, (root / "x").exists(), journals(ws)))

    with observe_steps(observer):
        await ws.apply_changes(every_op(), dry_run=True)
    assert seen
    assert [s for s in seen if s[1] or s[2]] == [], "the dry run made directories or records"
    assert snapshot(root) == OLD
    assert_clean(ws, tmp_path)


# -- cancellation at every step -------------------------------------------------------------------

BIG = b"".join(f"big line {i:06d}\n".encode() for i in range(1200))  # ~20 KB: several chunks


def cancel_changes() -> list[Change]:
    return [
        Change("write", "a.txt", content=BIG),
        Change("edit", "crlf.txt", edits=(Edit("second", "SECOND"),)),
        Change("mkdir", "x/y"),
        Change("write", "x/y/inside.txt", content=b"inside\n"),
        Change("move", "m2-dst.txt", source="m2.txt", overwrite=True),
        Change("copy", "c1-copy.txt", source="c1.txt"),
        Change("delete", "gone.txt"),
    ]


CANCEL_NEW: Tree = {
    **{k: v for k, v in OLD.items() if k not in ("m2.txt", "gone.txt")},
    "a.txt": BIG,
    "crlf.txt": b"first\r\nSECOND\r\nthird\r\n",
    "x": DIR,
    "x/y": DIR,
    "x/y/inside.txt": b"inside\n",
    "m2-dst.txt": b"move me over\n",
    "c1-copy.txt": b"copy me\n",
}


async def cancel_sweep(
    root: Path,
    tmp_path: Path,
    ws: Workspace,
    run: Callable[[anyio.CancelScope, Callable[[], bool]], Awaitable[object]],
) -> list[str]:
    """Cancel at the 1st, 2nd, ... opportunity until the change set completes.

    ``run(scope, tick)`` runs the change set; ``tick()`` is called at each opportunity and
    returns True when this one is the N-th (the caller then cancels ``scope``).
    """
    outcomes: list[str] = []
    for n in range(1, MAX_STEPS):
        reset(root, OLD)
        calls = 0

        def tick(n: int = n) -> bool:
            nonlocal calls
            calls += 1
            return calls == n

        with anyio.CancelScope() as scope:
            await run(scope, tick)
        state = snapshot(root)
        assert state in (OLD, CANCEL_NEW), f"cancel at {n}: neither old nor new: {state}"
        outcomes.append("old" if state == OLD else "new")
        assert_clean(ws, tmp_path)
        await follow_up(ws, root)
        if calls < n:  # the N-th opportunity never came: this run was not cancelled
            assert not scope.cancel_called
            assert outcomes[-1] == "new", "completed without being cancelled, but not applied"
            break
    else:
        pytest.fail(f"still cancelled after {MAX_STEPS} steps")
    return outcomes


async def test_cancel_at_every_step(root: Path, tmp_path: Path) -> None:
    ws = Workspace([root], limits=Limits(chunk_bytes=4096))
    steps: list[str] = []

    async def run(scope: anyio.CancelScope, tick: Callable[[], bool]) -> None:
        steps.clear()

        def observer(name: str) -> None:
            steps.append(name)
            if tick():
                scope.cancel()

        with observe_steps(observer):
            await ws.apply_changes(cancel_changes())

    outcomes = await cancel_sweep(root, tmp_path, ws, run)
    # Each step was a cancellation point once; every cancel came before the commit point.
    assert len(outcomes) == len(steps) + 1
    assert outcomes == ["old"] * len(steps) + ["new"]
    assert steps.count("changeset.prepare") == len(cancel_changes())
    assert steps.count("changeset.chunk") > len(cancel_changes()) - 2  # a.txt has several
    assert steps[-1] == "changeset.commit"


async def test_cancel_inside_the_progress_callback(root: Path, tmp_path: Path) -> None:
    """The progress awaits are cancellation points too; the last one (after the commit) is
    shielded, so a cancel there still leaves the change set complete."""
    ws = Workspace([root])

    async def run(scope: anyio.CancelScope, tick: Callable[[], bool]) -> None:
        async def progress(done: int, total: int | None) -> None:
            if tick():
                scope.cancel()
            await anyio.lowlevel.checkpoint()

        await ws.apply_changes(cancel_changes(), progress=progress)

    outcomes = await cancel_sweep(root, tmp_path, ws, run)
    n = len(cancel_changes())
    # n progress calls during prepare (cancelled: old), the final one (shielded: new), then an
    # uncancelled run.
    assert outcomes == ["old"] * n + ["new", "new"]


async def test_cancel_while_waiting_for_the_lock(root: Path, tmp_path: Path, ws: Workspace) -> None:
    install(root, OLD)
    release = anyio.Event()
    entered = anyio.Event()

    async def slow_progress(done: int, total: int | None) -> None:
        entered.set()
        await release.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(
            lambda: ws.apply_changes(
                [Change("write", "a.txt", content=b"first\n")], progress=slow_progress
            )
        )
        await entered.wait()
        with anyio.move_on_after(0.05) as waiting:
            await ws.apply_changes([Change("write", "a.txt", content=b"second\n")])
        assert waiting.cancelled_caught
        release.set()
    assert (root / "a.txt").read_bytes() == b"first\n"
    assert_clean(ws, tmp_path)
    await follow_up(ws, root)


# -- concurrency ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("paths_a", "paths_b"),
    [
        (["p.txt", "q.txt", "r.txt"], ["p.txt", "q.txt", "r.txt"]),
        (["p.txt", "q.txt", "r.txt"], ["r.txt", "q.txt", "p.txt"]),  # opposite order
        (["p.txt", "q.txt"], ["q.txt", "r.txt"]),  # overlap in one path
    ],
)
async def test_overlapping_change_sets_serialise(
    root: Path, tmp_path: Path, ws: Workspace, paths_a: list[str], paths_b: list[str]
) -> None:
    for name in ("p.txt", "q.txt", "r.txt"):
        (root / name).write_bytes(b"base\n")
    events: list[str] = []

    async def one(tag: str, paths: list[str]) -> None:
        async def progress(done: int, total: int | None) -> None:
            events.append(tag)
            await anyio.sleep(0.002)  # leave room for the other set to interleave

        changes = [Change("write", p, content=f"{tag}\n".encode()) for p in paths]
        events.append(f"{tag}:start")
        await ws.apply_changes(changes, progress=progress)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(one, "A", paths_a)
            tg.start_soon(one, "B", paths_b)
    progress_events = [e for e in events if ":" not in e]
    first = progress_events[0]
    switch = progress_events.index("B" if first == "A" else "A")
    assert set(progress_events[switch:]) == {progress_events[switch]}, (
        f"the two change sets interleaved: {progress_events}"
    )
    # The set that ran second wrote its paths last; the rest hold the first set's content.
    later = "B" if first == "A" else "A"
    later_paths = paths_b if later == "B" else paths_a
    for name in set(paths_a) | set(paths_b):
        expected = later if name in later_paths else first
        assert (root / name).read_bytes() == f"{expected}\n".encode(), name
    assert_clean(ws, tmp_path)


async def test_single_file_write_waits_for_a_change_set(
    root: Path, tmp_path: Path, ws: Workspace
) -> None:
    (root / "p.txt").write_bytes(b"base\n")
    (root / "q.txt").write_bytes(b"base\n")
    order: list[str] = []
    entered = anyio.Event()

    async def progress(done: int, total: int | None) -> None:
        entered.set()
        order.append(f"set {done}")
        await anyio.sleep(0.005)

    async def single() -> None:
        await entered.wait()
        await ws.write("q.txt", b"single\n")
        order.append("single")

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: ws.apply_changes(
                    [Change("write", p, content=b"set\n") for p in ("p.txt", "q.txt")],
                    progress=progress,
                )
            )
            tg.start_soon(single)
    assert order[-1] == "single", order
    assert (root / "q.txt").read_bytes() == b"single\n"
    assert (root / "p.txt").read_bytes() == b"set\n"
    assert_clean(ws, tmp_path)


# -- the changeset() builder ----------------------------------------------------------------------


async def test_changeset_builder_applies_every_kind(
    root: Path, tmp_path: Path, ws: Workspace
) -> None:
    install(root, OLD)
    async with ws.changeset() as cs:
        cs.write("a.txt", "alpha new\n")
        cs.write("fresh.txt", b"a new file\n")
        cs.edit("crlf.txt", [("second\nthird", "SECOND\nsecond and a half\nthird")])
        cs.move("m1.txt", "m1-moved.txt")
        cs.move("m2.txt", "m2-dst.txt", overwrite=True)
        cs.copy("c1.txt", "c1-copy.txt")
        cs.copy("c2.txt", "c2-dst.txt", overwrite=True)
        cs.delete("gone.txt", expected_sha256=sha(b"delete me\n"))
        cs.mkdir("x/y/z")
        cs.write("x/y/z/inside.txt", "inside new dirs\n")
        assert snapshot(root) == OLD  # nothing happens inside the block
    assert snapshot(root) == NEW
    assert cs.result is not None
    assert cs.result.applied
    assert len(cs.result.changes) == 10
    assert_clean(ws, tmp_path)


async def test_changeset_builder_exception_in_block_applies_nothing(
    root: Path, tmp_path: Path, ws: Workspace
) -> None:
    install(root, OLD)
    with pytest.raises(RuntimeError, match="caller"):
        async with ws.changeset() as cs:
            cs.write("a.txt", "changed")
            cs.delete("gone.txt")
            raise RuntimeError("the caller changed its mind")
    assert cs.result is None
    assert snapshot(root) == OLD
    assert_clean(ws, tmp_path)


async def test_changeset_builder_failure_at_exit_applies_nothing(
    root: Path, tmp_path: Path, ws: Workspace
) -> None:
    install(root, OLD)
    with pytest.raises(PreconditionFailedError, match="change 2 of 2"):
        async with ws.changeset() as cs:
            cs.write("a.txt", "changed")
            cs.edit("crlf.txt", [("first", "1st")], expected_sha256="0" * 64)
    assert cs.result is None
    assert snapshot(root) == OLD
    assert_clean(ws, tmp_path)


# -- symlinks -------------------------------------------------------------------------------------


async def test_delete_of_a_symlink_removes_only_the_link(
    root: Path, tmp_path: Path, ws: Workspace
) -> None:
    (root / "real.txt").write_bytes(b"real\n")
    (root / "inside-link").symlink_to("real.txt")
    (root / "outside-link").symlink_to(tmp_path / "outside.txt")
    await ws.apply_changes([Change("delete", "inside-link"), Change("delete", "outside-link")])
    assert snapshot(root) == {"real.txt": b"real\n"}
    assert (tmp_path / "outside.txt").read_text() == "outside\n"
    assert_clean(ws, tmp_path)


async def test_changes_through_a_symlink_inside_the_root_write_through(
    root: Path, tmp_path: Path, ws: Workspace
) -> None:
    (root / "real.txt").write_bytes(b"real old\n")
    (root / "d").mkdir()
    (root / "d" / "f.txt").write_bytes(b"one\r\ntwo\r\n")
    (root / "file-link").symlink_to("real.txt")
    (root / "dir-link").symlink_to("d")
    await ws.apply_changes(
        [
            Change("write", "file-link", content=b"real new\n"),
            Change("edit", "dir-link/f.txt", edits=(Edit("two", "2"),)),
            Change("write", "dir-link/g.txt", content=b"g\n"),
        ]
    )
    assert snapshot(root) == {
        "real.txt": b"real new\n",
        "d": DIR,
        "d/f.txt": b"one\r\n2\r\n",
        "d/g.txt": b"g\n",
        "file-link": "<link real.txt>",
        "dir-link": "<link d>",
    }
    assert_clean(ws, tmp_path)


async def test_the_same_file_through_a_symlink_counts_as_one_path(
    root: Path, tmp_path: Path, ws: Workspace
) -> None:
    (root / "real.txt").write_bytes(b"real\n")
    (root / "file-link").symlink_to("real.txt")
    with pytest.raises(InvalidArgumentError, match="change 2"):
        await ws.apply_changes(
            [
                Change("write", "real.txt", content=b"1"),
                Change("write", "file-link", content=b"2"),
            ]
        )
    assert (root / "real.txt").read_bytes() == b"real\n"
    assert_clean(ws, tmp_path)


async def test_write_through_a_symlink_out_of_the_root_is_refused(
    root: Path, tmp_path: Path, ws: Workspace
) -> None:
    (root / "a.txt").write_bytes(b"a\n")
    (root / "escape").symlink_to(tmp_path / "outside.txt")
    with pytest.raises(OutsideRootsError, match="change 2"):
        await ws.apply_changes(
            [
                Change("write", "a.txt", content=b"changed\n"),
                Change("write", "escape", content=b"pwned\n"),
            ]
        )
    assert (tmp_path / "outside.txt").read_text() == "outside\n"
    assert (root / "a.txt").read_bytes() == b"a\n"
    assert_clean(ws, tmp_path)


async def test_move_of_a_symlink_moves_the_link(root: Path, tmp_path: Path, ws: Workspace) -> None:
    (root / "real.txt").write_bytes(b"real\n")
    (root / "link").symlink_to("real.txt")
    await ws.apply_changes([Change("move", "moved-link", source="link")])
    assert snapshot(root) == {"real.txt": b"real\n", "moved-link": "<link real.txt>"}
    assert os.readlink(root / "moved-link") == "real.txt"
    assert_clean(ws, tmp_path)


async def test_a_set_planned_while_another_removes_its_directory_is_refused(
    tmp_path: Path,
) -> None:
    """Paths are resolved before the locks are taken: when the set ahead is cancelled and its
    undo removes a directory this set planned to use, this set must not write into the removed
    directory (the file would vanish with it) but refuse, and a retry then works."""
    root = tmp_path / "root"
    root.mkdir()
    ws = Workspace([root], limits=Limits(chunk_bytes=4096, inline_io_bytes=0))
    changes = [Change("mkdir", "n"), Change("write", "n/x.txt", content=BIG)]
    planned = anyio.Event()
    outcome: dict[str, object] = {}

    async def first() -> None:
        steps: list[str] = []
        with anyio.CancelScope() as scope:

            def observer(name: str) -> None:
                steps.append(name)
                if len(steps) == 3:
                    planned.set()  # the second set plans while this one is staging
                if len(steps) == 6:
                    scope.cancel()

            with observe_steps(observer):
                await ws.apply_changes(changes)
        outcome["cancelled"] = scope.cancelled_caught

    async def second() -> None:
        await planned.wait()
        try:
            outcome["second"] = await ws.apply_changes(changes)
        except ConcurrentChangeError as err:
            outcome["second"] = err

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        tg.start_soon(second)
    assert outcome["cancelled"]
    assert isinstance(outcome["second"], ConcurrentChangeError), outcome["second"]
    assert "was removed while this change set waited" in str(outcome["second"])
    assert not (root / "n").exists()
    assert temp_files(root) == []
    await ws.apply_changes(changes)  # the retry
    assert (root / "n" / "x.txt").read_bytes() == BIG
