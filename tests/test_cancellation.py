"""Cancellation injected at every await point of write, streaming write, edit, move, copy, delete
and mkdir: the target holds the old or the new content, no temp file is left, and the workspace
keeps working.

The injection uses the engine's own protocol steps (``engine.durable.steps.observe_steps``): every
``step`` is an anyio checkpoint, so cancelling the enclosing scope when the N-th step is reached
makes exactly that checkpoint raise. N runs 1, 2, 3, ... until the operation completes without
being cancelled, which proves every step was used as a cancellation point once. ``mkdir`` has no
steps (it is one shielded call), so a cancel is delivered in the middle of it instead, after each
directory it creates. A time-based sweep (``move_on_after`` with random delays) covers the awaits
that are not steps (lock, thread hand-offs).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import pytest

from atomictools import (
    Limits,
    PreconditionFailedError,
    Workspace,
    WriteResult,
)
from atomictools.engine.changes import direct as fileops
from atomictools.engine.durable import fsutil, writer
from atomictools.engine.durable.steps import observe_steps
from tests.conftest import temp_files

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
CHUNK = 4096
MAX_STEPS = 1000
FOLLOW_UP_TIMEOUT = 10

Snapshot = dict[str, bytes | None]
Operation = Callable[[], Awaitable[object]]


# -- helpers ------------------------------------------------------------------------------------


def snapshot(root: Path, paths: Iterator[str] | list[str]) -> Snapshot:
    """The bytes of each path (None when absent); a directory or symlink fails the test."""
    state: Snapshot = {}
    for rel in paths:
        path = root / rel
        if path.is_symlink() or (path.exists() and not path.is_file()):
            pytest.fail(f"{rel} is not a regular file")
        state[rel] = path.read_bytes() if path.exists() else None
    return state


def install(root: Path, state: Snapshot) -> None:
    """Put the disk in ``state``: write each file, remove each absent one (parents exist)."""
    for rel, content in state.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(content)


def describe(state: Snapshot, old: Snapshot, new: Snapshot) -> str:
    """Which paths hold neither their old nor their new content (for a readable failure)."""

    def short(content: bytes | None) -> str:
        if content is None:
            return "absent"
        return f"{len(content)} bytes sha256={hashlib.sha256(content).hexdigest()[:12]}"

    lines = [
        f"{rel}: now {short(state[rel])}, old {short(old[rel])}, new {short(new[rel])}"
        for rel in state
    ]
    return "\n".join(lines)


async def run_cancelled_at(n: int, operation: Operation) -> tuple[bool, list[str]]:
    """Run ``operation``, cancelling it when the n-th protocol step is reached.

    Returns (cancelled, names of the steps reached). The checkpoint inside that step raises the
    cancellation, so "cancelled" means the n-th step existed and stopped the operation there.
    """
    seen: list[str] = []
    with anyio.CancelScope() as scope:

        def observer(name: str) -> None:
            seen.append(name)
            if len(seen) == n:
                scope.cancel()

        with observe_steps(observer):
            await operation()
    assert scope.cancelled_caught == (len(seen) >= n), (n, seen)
    if scope.cancelled_caught:
        assert len(seen) == n, f"steps were reached after the cancel at step {n}: {seen}"
    return scope.cancelled_caught, seen


@dataclass
class Sweep:
    """What a cancel-at-every-step sweep saw."""

    outcomes: list[str] = field(default_factory=list)
    """"old" or "new" for each N, in order (the last run is the uncancelled one)."""
    steps: list[str] = field(default_factory=list)
    """The steps of the uncancelled run: every one of them was a cancellation point."""


async def follow_up_writes(ws: Workspace, root: Path, paths: list[str]) -> None:
    """The next operation on the same workspace and the same paths succeeds (no stuck lock)."""
    with anyio.fail_after(FOLLOW_UP_TIMEOUT):
        for rel in paths:
            payload = f"follow-up of {rel}\n".encode()
            await ws.write(rel, payload)
            assert (root / rel).read_bytes() == payload


async def cancel_at_every_step(
    ws: Workspace,
    root: Path,
    tmp_path: Path,
    *,
    old: Snapshot,
    new: Snapshot,
    operation: Operation,
) -> Sweep:
    """Cancel ``operation`` at step 1, 2, 3, ... until it completes; check each outcome."""
    assert old.keys() == new.keys()
    assert old != new
    paths = list(old)
    sweep = Sweep()
    for n in range(1, MAX_STEPS):
        install(root, old)
        cancelled, seen = await run_cancelled_at(n, operation)
        state = snapshot(root, paths)
        assert state in (old, new), f"cancel at step {n} ({seen[-1:]}):\n" + describe(
            state, old, new
        )
        outcome = "old" if state == old else "new"
        if not cancelled:
            assert outcome == "new", f"the operation completed but the change is missing: {seen}"
        assert temp_files(tmp_path) == [], f"temp left after a cancel at step {n}: {seen}"
        assert len(ws._locks) == 0, "a per-file lock outlived the cancelled operation"
        await follow_up_writes(ws, root, paths)
        assert temp_files(tmp_path) == []
        sweep.outcomes.append(outcome)
        if not cancelled:
            sweep.steps = seen
            break
    else:
        pytest.fail(f"the operation was still being cancelled after {MAX_STEPS} steps")
    # Every step was a cancellation point once, plus the final uncancelled run.
    assert len(sweep.outcomes) > 1, "the operation has no cancellation point at all"
    assert len(sweep.outcomes) == len(sweep.steps) + 1
    # One commit point: old before it, new from it on (a cancel after the rename is too late
    # to undo it, and the operation must then finish the change).
    first_new = sweep.outcomes.index("new")
    assert sweep.outcomes == ["old"] * first_new + ["new"] * (len(sweep.outcomes) - first_new)
    return sweep


def pattern(label: str, size: int) -> bytes:
    """``size`` bytes of recognisable, non-repeating-per-chunk content."""
    out = bytearray()
    line = 0
    while len(out) < size:
        out += f"{label} line {line:08d}\n".encode()
        line += 1
    return bytes(out[:size])


def chunked_workspace(root: Path) -> Workspace:
    return Workspace([root], limits=Limits(chunk_bytes=CHUNK))


@contextmanager
def cancel_from_anywhere() -> Iterator[Callable[[anyio.CancelScope], None]]:
    """A function that cancels a scope from the event loop thread or from a worker thread.

    The engine runs blocking calls in worker threads (or inline when small), so an instrumented
    system call may run on either; ``from_thread`` is only valid in a worker thread.
    """
    loop_thread = threading.get_ident()

    def cancel(scope: anyio.CancelScope) -> None:
        if threading.get_ident() == loop_thread:
            scope.cancel()
        else:
            anyio.from_thread.run_sync(scope.cancel)

    yield cancel


class OsProxy:
    """Stands in for the ``os`` module inside one engine module: overrides, else the real os."""

    def __init__(self, **overrides: Any) -> None:
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


# -- write --------------------------------------------------------------------------------------


async def test_write_small_existing_file(root: Path, tmp_path: Path, ws: Workspace) -> None:
    data = b"new content, a little longer\n"
    sweep = await cancel_at_every_step(
        ws,
        root,
        tmp_path,
        old={"notes.txt": b"old content\n"},
        new={"notes.txt": data},
        operation=lambda: ws.write("notes.txt", data),
    )
    assert sweep.steps == ["write.created", "write.chunk", "write.written", "write.synced"]


async def test_write_new_file_is_absent_or_complete(
    root: Path, tmp_path: Path, ws: Workspace
) -> None:
    data = b"brand new\n"
    sweep = await cancel_at_every_step(
        ws,
        root,
        tmp_path,
        old={"sub/fresh.txt": None},
        new={"sub/fresh.txt": data},
        operation=lambda: ws.write("sub/fresh.txt", data),
    )
    assert sweep.steps[-1] == "write.synced"


async def test_write_larger_than_chunk_size(root: Path, tmp_path: Path) -> None:
    ws = chunked_workspace(root)
    data = pattern("new", 5 * CHUNK + 123)
    sweep = await cancel_at_every_step(
        ws,
        root,
        tmp_path,
        old={"big.txt": pattern("old", 3 * CHUNK + 7)},
        new={"big.txt": data},
        operation=lambda: ws.write("big.txt", data),
    )
    assert sweep.steps.count("write.chunk") == 6
    assert sweep.outcomes.count("old") == len(sweep.steps)


async def test_create_only_write_of_multi_chunk_file(root: Path, tmp_path: Path) -> None:
    ws = chunked_workspace(root)
    data = pattern("created", 4 * CHUNK)
    sweep = await cancel_at_every_step(
        ws,
        root,
        tmp_path,
        old={"made.bin": None},
        new={"made.bin": data},
        operation=lambda: ws.write("made.bin", data, create_only=True),
    )
    assert sweep.steps.count("write.chunk") == 4


async def test_streaming_writer_several_chunks(root: Path, tmp_path: Path) -> None:
    ws = chunked_workspace(root)
    pieces = [pattern(f"piece{i}", 2 * CHUNK + 100 * i) for i in range(4)]

    async def stream() -> None:
        async with ws.atomic_writer("stream.log") as w:
            for piece in pieces:
                await w.write(piece)

    sweep = await cancel_at_every_step(
        ws,
        root,
        tmp_path,
        old={"stream.log": pattern("previous", CHUNK // 2)},
        new={"stream.log": b"".join(pieces)},
        operation=stream,
    )
    assert sweep.steps.count("write.chunk") == sum(-(-len(p) // CHUNK) for p in pieces)


async def test_write_with_expected_sha256(root: Path, tmp_path: Path) -> None:
    ws = chunked_workspace(root)
    before = pattern("before", 2 * CHUNK)
    after = pattern("after", 2 * CHUNK + 1)
    sha = hashlib.sha256(before).hexdigest()
    await cancel_at_every_step(
        ws,
        root,
        tmp_path,
        old={"checked.txt": before},
        new={"checked.txt": after},
        operation=lambda: ws.write("checked.txt", after, expected_sha256=sha),
    )


# -- edit ---------------------------------------------------------------------------------------


async def test_edit_multi_chunk_file(root: Path, tmp_path: Path) -> None:
    ws = chunked_workspace(root)
    text = pattern("filler", 3 * CHUNK).decode() + "MARKER old value\n" + "tail\n"
    before = text.encode()
    after = text.replace("MARKER old value", "MARKER new, longer value").encode()

    async def edit() -> None:
        result = await ws.edit("code.txt", [("MARKER old value", "MARKER new, longer value")])
        assert result.applied

    sweep = await cancel_at_every_step(
        ws, root, tmp_path, old={"code.txt": before}, new={"code.txt": after}, operation=edit
    )
    assert sweep.steps.count("read.chunk") >= 2
    assert sweep.steps[-1] == "write.synced"


# -- move ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [False, True])
async def test_move_file(root: Path, tmp_path: Path, ws: Workspace, overwrite: bool) -> None:
    data = pattern("moving", 3000)
    previous = pattern("replaced", 500) if overwrite else None
    sweep = await cancel_at_every_step(
        ws,
        root,
        tmp_path,
        old={"a.txt": data, "dest/b.txt": previous},
        new={"a.txt": None, "dest/b.txt": data},
        operation=lambda: ws.move("a.txt", "dest/b.txt", overwrite=overwrite),
    )
    assert sweep.steps == ["move.before", "history.before_commit"]


# -- copy ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [False, True])
async def test_copy_multi_chunk(root: Path, tmp_path: Path, overwrite: bool) -> None:
    ws = chunked_workspace(root)
    data = pattern("source", 5 * CHUNK + 17)
    previous = pattern("old copy", CHUNK + 1) if overwrite else None
    sweep = await cancel_at_every_step(
        ws,
        root,
        tmp_path,
        old={"src.bin": data, "out/copy.bin": previous},
        new={"src.bin": data, "out/copy.bin": data},
        operation=lambda: ws.copy("src.bin", "out/copy.bin", overwrite=overwrite),
    )
    assert sweep.steps.count("write.chunk") == 6


# -- delete -------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_sha", [False, True])
async def test_delete(root: Path, tmp_path: Path, ws: Workspace, with_sha: bool) -> None:
    data = b"to be deleted\n"
    sha = hashlib.sha256(data).hexdigest() if with_sha else None
    sweep = await cancel_at_every_step(
        ws,
        root,
        tmp_path,
        old={"gone.txt": data},
        new={"gone.txt": None},
        operation=lambda: ws.delete("gone.txt", expected_sha256=sha),
    )
    assert sweep.steps == ["delete.before", "history.before_commit"]


# -- mkdir --------------------------------------------------------------------------------------


LEVELS = ["deep", "deep/er", "deep/er/still", "deep/er/still/leaf"]


async def check_mkdir_outcome(ws: Workspace, root: Path, tmp_path: Path, what: str) -> bool:
    """All or none of the nested directories exist; the workspace still works. True if all."""
    existing = [rel for rel in LEVELS if (root / rel).is_dir()]
    assert existing in ([], LEVELS), f"{what} left a partial mkdir -p: {existing}"
    assert temp_files(tmp_path) == []
    assert len(ws._locks) == 0
    with anyio.fail_after(FOLLOW_UP_TIMEOUT):
        result = await ws.mkdir(LEVELS[-1])
        assert result.created == (existing == [])
        await ws.write(f"{LEVELS[-1]}/file.txt", b"inside\n")
    assert (root / LEVELS[-1] / "file.txt").read_bytes() == b"inside\n"
    return existing == LEVELS


async def test_mkdir_nested_cancelled_at_every_step(
    root: Path, tmp_path: Path, ws: Workspace
) -> None:
    outcomes: list[bool] = []
    for n in range(1, MAX_STEPS):
        shutil.rmtree(root / "deep", ignore_errors=True)
        cancelled, _ = await run_cancelled_at(n, lambda: ws.mkdir(LEVELS[-1]))
        complete = await check_mkdir_outcome(ws, root, tmp_path, f"a cancel at step {n}")
        outcomes.append(complete)
        if not cancelled:
            assert complete
            break
    assert len(outcomes) > 1, "mkdir has no cancellation point at all"


async def test_mkdir_nested_cancel_delivered_mid_call(
    root: Path, tmp_path: Path, ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel that arrives while ``mkdir -p`` is creating directories: before the call
    (k=0) and right after the k-th directory is made. It must not leave a partial chain."""
    real_maker = fileops.directory_maker
    cancel_after: list[int] = [0]
    made: list[str] = []
    current: list[anyio.CancelScope] = []

    with cancel_from_anywhere() as cancel:

        def maker(durability: Any) -> Callable[[int, str, Path], None]:
            make = real_maker(durability)

            def instrumented(dir_fd: int, name: str, parent: Path) -> None:
                make(dir_fd, name, parent)
                made.append(name)
                if len(made) == cancel_after[0]:
                    cancel(current[0])

            return instrumented

        monkeypatch.setattr(fileops, "directory_maker", maker)
        points = 0
        for k in range(MAX_STEPS):
            shutil.rmtree(root / "deep", ignore_errors=True)
            made.clear()
            cancel_after[0] = k
            with anyio.CancelScope() as scope:
                current[:] = [scope]
                if k == 0:
                    scope.cancel()
                await ws.mkdir(LEVELS[-1])
            await check_mkdir_outcome(ws, root, tmp_path, f"a cancel after mkdir #{k}")
            points += 1
            if k > len(made):
                break
        else:
            pytest.fail("mkdir kept creating directories")
    assert points == len(LEVELS) + 2  # k = 0 .. 4 hit a point; k = 5 ran uncancelled


# -- cancel arriving during the commit ------------------------------------------------------------


@dataclass
class CommitCase:
    old: Snapshot
    new: Snapshot
    run: Callable[[Workspace], Awaitable[object]]


def commit_cases() -> dict[str, CommitCase]:
    data = pattern("committed", 3 * CHUNK)
    return {
        "write-replace": CommitCase(
            {"f.txt": b"old\n"}, {"f.txt": data}, lambda ws: ws.write("f.txt", data)
        ),
        "write-create-only": CommitCase(
            {"f.txt": None}, {"f.txt": data}, lambda ws: ws.write("f.txt", data, create_only=True)
        ),
        "copy-new": CommitCase(
            {"s.txt": data, "d.txt": None},
            {"s.txt": data, "d.txt": data},
            lambda ws: ws.copy("s.txt", "d.txt"),
        ),
        "copy-overwrite": CommitCase(
            {"s.txt": data, "d.txt": b"x"},
            {"s.txt": data, "d.txt": data},
            lambda ws: ws.copy("s.txt", "d.txt", overwrite=True),
        ),
        "move-new": CommitCase(
            {"s.txt": data, "d.txt": None},
            {"s.txt": None, "d.txt": data},
            lambda ws: ws.move("s.txt", "d.txt"),
        ),
        "move-overwrite": CommitCase(
            {"s.txt": data, "d.txt": b"x"},
            {"s.txt": None, "d.txt": data},
            lambda ws: ws.move("s.txt", "d.txt", overwrite=True),
        ),
        "delete": CommitCase({"f.txt": data}, {"f.txt": None}, lambda ws: ws.delete("f.txt")),
    }


@pytest.mark.parametrize("case_name", list(commit_cases()))
async def test_cancel_after_commit_finishes_the_change(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case_name: str
) -> None:
    """A cancel that arrives right after the commit system call (rename / unlink) cannot undo
    it: the change is complete, the directory is still fsynced, and no temp is left."""
    case = commit_cases()[case_name]
    ws = chunked_workspace(root)
    install(root, case.old)
    events: list[str] = []
    holder: list[anyio.CancelScope] = []

    with cancel_from_anywhere() as cancel:

        def committing(real: Callable[..., Any], label: str) -> Callable[..., Any]:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                result = real(*args, **kwargs)
                events.append(label)
                cancel(holder[0])
                events.append("cancel")
                return result

            return wrapper

        def fsync(fd: int) -> None:
            os.fsync(fd)
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                events.append("dir-fsync")

        monkeypatch.setattr(writer, "os", OsProxy(replace=committing(os.replace, "rename")))
        monkeypatch.setattr(
            fileops,
            "os",
            OsProxy(
                replace=committing(os.replace, "rename"), unlink=committing(os.unlink, "unlink")
            ),
        )
        monkeypatch.setattr(
            fsutil, "rename_noreplace", committing(fsutil.rename_noreplace, "rename")
        )
        monkeypatch.setattr(fsutil, "os", OsProxy(fsync=fsync))

        with anyio.CancelScope() as scope:
            holder.append(scope)
            await case.run(ws)

    assert scope.cancel_called
    state = snapshot(root, list(case.old))
    assert state == case.new, describe(state, case.old, case.new)
    assert temp_files(tmp_path) == []
    commit = events.index("cancel")
    assert "dir-fsync" in events[commit:], f"directory not synced after the commit: {events}"
    await follow_up_writes(ws, root, list(case.old))


# -- time-based random cancellation ---------------------------------------------------------------


async def test_random_time_cancellation_of_large_streamed_write(root: Path, tmp_path: Path) -> None:
    ws = Workspace([root], limits=Limits(chunk_bytes=MiB))
    rng = random.Random(20240601)
    chunks = [rng.randbytes(MiB) for _ in range(16)]
    new = b"".join(chunks)
    old = pattern("old big file", 3 * MiB)
    target = root / "big.bin"

    async def stream() -> None:
        async with ws.atomic_writer("big.bin") as w:
            for chunk in chunks:
                await w.write(chunk)

    target.write_bytes(old)
    started = time.perf_counter()
    await stream()
    duration = time.perf_counter() - started
    assert target.read_bytes() == new

    delays = [0.0, *(rng.uniform(0, 1.3 * duration) for _ in range(18)), 60.0]
    outcomes: list[tuple[float, bool, str]] = []
    for delay in delays:
        target.write_bytes(old)
        with anyio.move_on_after(delay) as scope:
            await stream()
        data = target.read_bytes()
        assert data in (old, new), f"after a cancel at {delay:.4f}s the file is neither"
        outcome = "old" if data == old else "new"
        if not scope.cancelled_caught:
            assert outcome == "new"
        assert temp_files(tmp_path) == [], f"temp left after a cancel at {delay:.4f}s"
        assert len(ws._locks) == 0
        with anyio.fail_after(FOLLOW_UP_TIMEOUT):
            await ws.write("big.bin", b"small follow-up\n")
        assert target.read_bytes() == b"small follow-up\n"
        outcomes.append((delay, scope.cancelled_caught, outcome))
    assert outcomes[0][1:] == (True, "old"), outcomes[0]  # cancelled before anything happened
    # Most random delays fall inside the write: some cancels really landed in the middle of it.
    assert any(delay > 0 and cancelled for delay, cancelled, _ in outcomes[1:-1]), outcomes
    assert outcomes[-1][1:] == (False, "new"), outcomes[-1]


# -- the in-process lock ------------------------------------------------------------------------


async def write_as(
    ws: Workspace,
    who: str,
    content: bytes,
    sha: str,
    results: dict[str, WriteResult | PreconditionFailedError],
    timeline: list[str],
) -> None:
    timeline.append(f"start {who}")
    try:
        results[who] = await ws.write("shared.txt", content, expected_sha256=sha)
    except PreconditionFailedError as err:
        results[who] = err
    timeline.append(f"end {who}")


async def test_concurrent_writes_from_the_same_read_exactly_one_wins(
    root: Path, tmp_path: Path
) -> None:
    """Two writes based on the same read race for one file: the per-file lock serialises their
    check-and-replace, so one wins and the other sees the changed sha256 (no lost update).

    The content is large enough (many chunks, above the inline-I/O size) that each write yields
    to the event loop many times, so the two calls really overlap; the test checks that they did.
    """
    ws = chunked_workspace(root)
    size = 256 * 1024
    (root / "shared.txt").write_bytes(pattern("base", size))
    for round_ in range(5):
        read = await ws.read_bytes("shared.txt")
        contents = {who: pattern(f"{who} round {round_}", size + round_) for who in "ab"}
        results: dict[str, WriteResult | PreconditionFailedError] = {}
        timeline: list[str] = []
        async with anyio.create_task_group() as tg:
            for who in "ab":
                tg.start_soon(write_as, ws, who, contents[who], read.sha256, results, timeline)

        assert timeline[:2] in (["start a", "start b"], ["start b", "start a"]), timeline
        winners = [who for who, r in results.items() if isinstance(r, WriteResult)]
        losers = [who for who, r in results.items() if isinstance(r, PreconditionFailedError)]
        assert len(winners) == 1, results
        assert len(losers) == 1, results
        final = (root / "shared.txt").read_bytes()
        assert final == contents[winners[0]]
        error = results[losers[0]]
        assert isinstance(error, PreconditionFailedError)
        assert error.current_sha256 == hashlib.sha256(final).hexdigest()
        assert "changed since it was read" in str(error)
        assert "nothing was changed" in str(error)
        assert temp_files(tmp_path) == []
        assert len(ws._locks) == 0
