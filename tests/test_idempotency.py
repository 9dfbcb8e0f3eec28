"""Idempotency keys at the engine level (DESIGN 8), on real files and real SQLite databases.

A keyed call repeated with the same key and arguments must return the first call's result and
touch nothing (not even a temp file: the tree snapshot, inodes and mtimes included, must not
move); the same key with other arguments is ``IdempotencyKeyReusedError`` and changes nothing;
a key whose first call failed or was cancelled is free again. The changes are chosen so that a
second application would show: an edit whose ``newText`` contains its ``oldText`` (each
application adds a line), a move or a delete whose source is gone, a copy or a ``createOnly``
write whose destination exists, an UPDATE that appends to every row.

Crashes: a child process (``tests/idempotency_child.py``) makes the keyed call and dies at a
crash point (``ATOMICTOOLS_TEST_CRASH_AT``; a real SIGKILL where the engine supports
``ATOMICTOOLS_TEST_CRASH_SIGNAL=KILL``, else exit 137); the next keyed call in this process (or
``atomictools recover``) must finish the dead change set, record its key, and return the first
call's result (its ``txid``), never apply it twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from atomictools import (
    AlreadyExistsError,
    AtomicToolsError,
    Change,
    ChangeSetResult,
    Edit,
    EditError,
    InvalidArgumentError,
    Limits,
    NotFoundError,
    PreconditionFailedError,
    Workspace,
)
from atomictools.engine.changes.idempotency import (
    KEY_TABLE,
    LOCK_NAME,
    STORE_NAME,
    IdempotencyKeyReusedError,
    InterruptedCallError,
    Receipt,
    key_locked,
)
from atomictools.engine.config import STATE_DIR_ENV
from atomictools.engine.db.database import Database, Statement, StatementError
from atomictools.engine.durable.steps import CRASH_ENV, CRASH_EXIT_CODE, observe_steps
from atomictools.engine.durable.tempfiles import is_temp_name, temp_owner_pid
from tests.conftest import read_record, temp_files, tree_snapshot
from tests.idempotency_child import changes_from_spec

pytestmark = pytest.mark.anyio
asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])
"""The database engine needs asyncio (aiosqlite); the file engine runs on both backends."""

CHILD = Path(__file__).with_name("idempotency_child.py")
CRASH_SIGNAL_ENV = "ATOMICTOOLS_TEST_CRASH_SIGNAL"
DIR = "<dir>"
TTL = 0.5
"""A short time-to-live, long enough that an immediate repeat is still inside it."""

SETUP: dict[str, bytes] = {
    "f.txt": b"first\nEND\n",
    "src.txt": b"moved\n",
    "c.txt": b"copied\n",
    "gone.txt": b"deleted\n",
}
APPEND = [("END", "added\nEND")]
"""``newText`` contains ``oldText``: every application adds one more line."""
ONCE = b"first\nadded\nEND\n"
TWICE = b"first\nadded\nadded\nEND\n"

Disk = dict[str, bytes | str]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def setup_tree(top: Path) -> None:
    for name, data in SETUP.items():
        (top / name).write_bytes(data)


def disk(top: Path) -> Disk:
    """Every entry below ``top`` but our temp files: file contents, ``DIR`` for directories."""
    found: Disk = {}
    for path in sorted(top.rglob("*")):
        if is_temp_name(path.name):
            continue  # checked on their own (temp_files)
        rel = str(path.relative_to(top))
        found[rel] = DIR if path.is_dir() else path.read_bytes()
    return found


def expected(changes: dict[str, bytes | str | None], base: dict[str, bytes] = SETUP) -> Disk:
    """``base`` with ``changes`` applied (None: the entry is gone)."""
    tree: dict[str, bytes | str | None] = {**base, **changes}
    return {k: v for k, v in sorted(tree.items()) if v is not None}


def journals(state: Path) -> list[Path]:
    directory = state / "journals"
    return sorted(directory.iterdir()) if directory.is_dir() else []


def stored_keys(store: Path) -> set[str]:
    """The keys recorded in an idempotency table (the state store, or a user's database)."""
    if not store.exists():
        return set()
    conn = sqlite3.connect(store)
    try:
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (KEY_TABLE,)
        ).fetchone()
        if exists is None:
            return set()
        return {row[0] for row in conn.execute(f"SELECT key FROM {KEY_TABLE}")}
    finally:
        conn.close()


# -- every mutating method: same key twice, same key with other arguments ------------------------


def _edits(pairs: list[tuple[str, str]]) -> tuple[Edit, ...]:
    return tuple(Edit(old, new) for old, new in pairs)


CHANGE_SET = [
    Change("edit", "f.txt", edits=_edits(APPEND)),
    Change("write", "w.txt", content=b"hello\n"),
    Change("move", "dst.txt", source="src.txt"),
    Change("copy", "c2.txt", source="c.txt"),
    Change("delete", "gone.txt"),
    Change("mkdir", "nd/deep"),
    Change("write", "nd/deep/in.txt", content=b"inside\n"),
]
CHANGE_SET_AFTER: dict[str, bytes | str | None] = {
    "f.txt": ONCE,
    "w.txt": b"hello\n",
    "src.txt": None,
    "dst.txt": b"moved\n",
    "c2.txt": b"copied\n",
    "gone.txt": None,
    "nd": DIR,
    "nd/deep": DIR,
    "nd/deep/in.txt": b"inside\n",
}
Call = Callable[[Workspace, str | None], Awaitable[Any]]


@dataclass(frozen=True)
class Keyed:
    name: str
    call: Call
    """The keyed call (with key None: the same call without a key)."""
    other: Call
    """The same method with other arguments."""
    after: dict[str, bytes | str | None]
    """What one application changes (relative to ``SETUP``)."""


KEYED = [
    Keyed(
        "write",
        lambda ws, k: ws.write("w.txt", "hello\n", idempotency_key=k),
        lambda ws, k: ws.write("w.txt", "other\n", idempotency_key=k),
        {"w.txt": b"hello\n"},
    ),
    Keyed(
        "write-create-only",
        lambda ws, k: ws.write("f.txt.new", "new\n", create_only=True, idempotency_key=k),
        lambda ws, k: ws.write("f.txt.new", "new\n", idempotency_key=k),
        {"f.txt.new": b"new\n"},
    ),
    Keyed(
        "write-expected-sha256",
        lambda ws, k: ws.write(
            "f.txt", "replaced\n", expected_sha256=sha(SETUP["f.txt"]), idempotency_key=k
        ),
        lambda ws, k: ws.write("f.txt", "replaced\n", idempotency_key=k),
        {"f.txt": b"replaced\n"},
    ),
    Keyed(
        "edit",
        lambda ws, k: ws.edit("f.txt", APPEND, idempotency_key=k),
        lambda ws, k: ws.edit("f.txt", [("END", "other\nEND")], idempotency_key=k),
        {"f.txt": ONCE},
    ),
    Keyed(
        "move",
        lambda ws, k: ws.move("src.txt", "dst.txt", idempotency_key=k),
        lambda ws, k: ws.move("src.txt", "dst.txt", overwrite=True, idempotency_key=k),
        {"src.txt": None, "dst.txt": b"moved\n"},
    ),
    Keyed(
        "move-over",
        lambda ws, k: ws.move("src.txt", "c.txt", overwrite=True, idempotency_key=k),
        lambda ws, k: ws.move("src.txt", "gone.txt", overwrite=True, idempotency_key=k),
        {"src.txt": None, "c.txt": b"moved\n"},
    ),
    Keyed(
        "copy",
        lambda ws, k: ws.copy("c.txt", "c2.txt", idempotency_key=k),
        lambda ws, k: ws.copy("c.txt", "c3.txt", idempotency_key=k),
        {"c2.txt": b"copied\n"},
    ),
    Keyed(
        "delete",
        lambda ws, k: ws.delete("gone.txt", idempotency_key=k),
        lambda ws, k: ws.delete("f.txt", idempotency_key=k),
        {"gone.txt": None},
    ),
    Keyed(
        "mkdir",
        lambda ws, k: ws.mkdir("d/e", idempotency_key=k),
        lambda ws, k: ws.mkdir("d/x", idempotency_key=k),
        {"d": DIR, "d/e": DIR},
    ),
    Keyed(
        "apply_changes",
        lambda ws, k: ws.apply_changes(CHANGE_SET, idempotency_key=k),
        lambda ws, k: ws.apply_changes(CHANGE_SET[:-1], idempotency_key=k),
        CHANGE_SET_AFTER,
    ),
]


def _without_txid(result: Any) -> Any:
    """A change set's result without what names this one run (its journal, its history entry)."""
    if isinstance(result, ChangeSetResult):
        return replace(result, txid=None, change_id=None)
    return result


@pytest.mark.parametrize("op", KEYED, ids=lambda op: op.name)
async def test_same_key_same_arguments_applies_once(
    tmp_path: Path, private_state_dir: Path, op: Keyed
) -> None:
    root = tmp_path / "root"
    twin = tmp_path / "twin"
    for top in (root, twin):
        top.mkdir()
        setup_tree(top)
    ws = Workspace([root])

    first = await op.call(ws, "key-1")
    assert disk(root) == expected(op.after)
    after_first = tree_snapshot(root)
    # The result is the one the same call without a key gives (on an identical twin tree).
    assert _without_txid(first) == _without_txid(await op.call(Workspace([twin]), None))

    again = await op.call(ws, "key-1")
    assert again == first
    assert tree_snapshot(root) == after_first, "a repeat touched the tree"
    # Another Workspace on the same roots (what another process has) gets the same answer.
    assert await op.call(Workspace([root]), "key-1") == first
    assert tree_snapshot(root) == after_first

    with pytest.raises(IdempotencyKeyReusedError) as refused:
        await op.other(ws, "key-1")
    assert refused.value.code == "idempotency_key_reused"
    assert "key-1" in str(refused.value)
    assert "nothing was changed" in str(refused.value)
    assert tree_snapshot(root) == after_first

    assert await op.call(ws, "key-1") == first  # the refusal did not spoil the key either
    assert tree_snapshot(root) == after_first
    assert temp_files(tmp_path) == []
    assert journals(private_state_dir) == []
    assert stored_keys(private_state_dir / STORE_NAME) == {"key-1"}


async def test_the_key_not_the_arguments_makes_a_call_a_repeat(root: Path) -> None:
    setup_tree(root)
    ws = Workspace([root])
    first = await ws.edit("f.txt", APPEND, idempotency_key="a")
    second = await ws.edit("f.txt", APPEND, idempotency_key="b")  # a new key is a new call
    assert (root / "f.txt").read_bytes() == TWICE
    assert second.previous_sha256 == first.sha256
    await ws.edit("f.txt", APPEND)  # and a call without a key always applies
    assert (root / "f.txt").read_bytes() == b"first\nadded\nadded\nadded\nEND\n"
    assert await ws.edit("f.txt", APPEND, idempotency_key="a") == first
    assert await ws.edit("f.txt", APPEND, idempotency_key="b") == second
    assert (root / "f.txt").read_bytes() == b"first\nadded\nadded\nadded\nEND\n"


@pytest.mark.parametrize("key", ["", "x" * 201, "line\nbreak", "nul\0"])
async def test_a_malformed_key_is_refused_before_anything_changes(root: Path, key: str) -> None:
    setup_tree(root)
    before = tree_snapshot(root)
    with pytest.raises(InvalidArgumentError, match="idempotency_key"):
        await Workspace([root]).edit("f.txt", APPEND, idempotency_key=key)
    assert tree_snapshot(root) == before


# -- a failed first call leaves the key free -------------------------------------------------


@dataclass(frozen=True)
class Failing:
    name: str
    fail: Call
    error: type[AtomicToolsError]
    fixed: Call
    after: dict[str, bytes | str | None]


FAILING = [
    Failing(
        "write-expected-sha256",
        lambda ws, k: ws.write("f.txt", "new\n", expected_sha256="0" * 64, idempotency_key=k),
        PreconditionFailedError,
        lambda ws, k: ws.write(
            "f.txt", "new\n", expected_sha256=sha(SETUP["f.txt"]), idempotency_key=k
        ),
        {"f.txt": b"new\n"},
    ),
    Failing(
        "edit-not-found",
        lambda ws, k: ws.edit("f.txt", [("MISSING", "x")], idempotency_key=k),
        EditError,
        lambda ws, k: ws.edit("f.txt", APPEND, idempotency_key=k),
        {"f.txt": ONCE},
    ),
    Failing(
        "move-onto-existing",
        lambda ws, k: ws.move("src.txt", "c.txt", idempotency_key=k),
        AlreadyExistsError,
        lambda ws, k: ws.move("src.txt", "c.txt", overwrite=True, idempotency_key=k),
        {"src.txt": None, "c.txt": b"moved\n"},
    ),
    Failing(
        "delete-missing",
        lambda ws, k: ws.delete("missing.txt", idempotency_key=k),
        NotFoundError,
        lambda ws, k: ws.delete("gone.txt", idempotency_key=k),
        {"gone.txt": None},
    ),
    Failing(
        "apply_changes-last-change-fails",
        lambda ws, k: ws.apply_changes(
            [*CHANGE_SET, Change("delete", "missing.txt")], idempotency_key=k
        ),
        NotFoundError,
        lambda ws, k: ws.apply_changes(CHANGE_SET, idempotency_key=k),
        CHANGE_SET_AFTER,
    ),
]


@pytest.mark.parametrize("case", FAILING, ids=lambda case: case.name)
async def test_a_failed_first_call_leaves_the_key_free(
    root: Path, private_state_dir: Path, case: Failing
) -> None:
    setup_tree(root)
    ws = Workspace([root])
    for _ in range(2):  # a failure is not recorded: the same failing call fails again
        with pytest.raises(case.error):
            await case.fail(ws, "key-1")
        assert disk(root) == expected({})
    assert stored_keys(private_state_dir / STORE_NAME) == set()

    # The key is free for any call now, also one with other (fixed) arguments.
    done = await case.fixed(ws, "key-1")
    assert disk(root) == expected(case.after)
    snap = tree_snapshot(root)
    assert await case.fixed(ws, "key-1") == done
    # Now the key belongs to the fixed call: the failing arguments are other arguments.
    with pytest.raises(IdempotencyKeyReusedError):
        await case.fail(ws, "key-1")
    assert tree_snapshot(root) == snap
    assert temp_files(root) == []
    assert journals(private_state_dir) == []


# -- time-to-live, dry runs ------------------------------------------------------------------


async def test_a_key_expires_after_its_time_to_live(root: Path, private_state_dir: Path) -> None:
    setup_tree(root)
    ws = Workspace([root], idempotency_ttl=TTL)
    first = await ws.edit("f.txt", APPEND, idempotency_key="k")
    assert await ws.edit("f.txt", APPEND, idempotency_key="k") == first  # inside the TTL
    assert (root / "f.txt").read_bytes() == ONCE
    await ws.write("other.txt", "x", idempotency_key="short-lived")

    await anyio.sleep(TTL + 0.2)
    second = await ws.edit("f.txt", APPEND, idempotency_key="k")  # expired: a new call
    assert (root / "f.txt").read_bytes() == TWICE
    assert second.previous_sha256 == first.sha256
    assert await ws.edit("f.txt", APPEND, idempotency_key="k") == second
    assert (root / "f.txt").read_bytes() == TWICE
    # Recording "k" again pruned the expired record of the other key.
    assert stored_keys(private_state_dir / STORE_NAME) == {"k"}

    await anyio.sleep(TTL + 0.2)
    # After expiry the key is free for other arguments too.
    third = await ws.edit("f.txt", [("first", "zeroth\nfirst")], idempotency_key="k")
    assert third.previous_sha256 == second.sha256
    assert (root / "f.txt").read_bytes() == b"zeroth\nfirst\nadded\nadded\nEND\n"


async def test_dry_runs_ignore_keys(root: Path, private_state_dir: Path) -> None:
    setup_tree(root)
    ws = Workspace([root])
    before = tree_snapshot(root)
    preview = await ws.edit("f.txt", [("END", "other\nEND")], dry_run=True, idempotency_key="k")
    assert not preview.applied
    planned = await ws.apply_changes(CHANGE_SET[1:], dry_run=True, idempotency_key="k")
    assert not planned.applied
    assert planned.txid is None
    assert tree_snapshot(root) == before
    assert stored_keys(private_state_dir / STORE_NAME) == set()

    # The dry runs did not take the key: a real call with other arguments gets it.
    done = await ws.edit("f.txt", APPEND, idempotency_key="k")
    assert (root / "f.txt").read_bytes() == ONCE
    snap = tree_snapshot(root)
    # A dry run with the used key and other arguments is a dry run, not a refusal...
    again = await ws.edit("f.txt", [("END", "other\nEND")], dry_run=True, idempotency_key="k")
    assert not again.applied
    assert "+other" in again.diff
    # ... and one with the same arguments previews a new application, not the stored result.
    same = await ws.edit("f.txt", APPEND, dry_run=True, idempotency_key="k")
    assert not same.applied
    assert same.previous_sha256 == done.sha256
    assert tree_snapshot(root) == snap
    assert await ws.edit("f.txt", APPEND, idempotency_key="k") == done
    assert (root / "f.txt").read_bytes() == ONCE


# -- concurrent calls with one key ----------------------------------------------------------------


BIG_FILLER = b"".join(b"filler line %06d of a file under edit\n" % i for i in range(5000))


@pytest.mark.parametrize("kind", ["edit", "apply_changes", "two-workspaces"])
async def test_concurrent_calls_with_one_key_apply_once(
    root: Path, private_state_dir: Path, kind: str
) -> None:
    """Five calls with one key at once: one applies, the others wait and get its result.

    Small chunks make each call yield many times, so all five are in flight together (checked:
    every call started before the first one returned). ``two-workspaces`` alternates between two
    Workspace objects on the same root, which share no in-process lock: like two processes,
    they meet only at the directory lock and the state store.
    """
    (root / "f.txt").write_bytes(BIG_FILLER + b"END\n")
    limits = Limits(chunk_bytes=4096, inline_io_bytes=0)
    workspaces = [Workspace([root], limits=limits), Workspace([root], limits=limits)]
    changes = [
        Change("edit", "f.txt", edits=_edits(APPEND)),
        Change("write", "w.txt", content=BIG_FILLER),
        Change("mkdir", "nd"),
    ]

    async def call(i: int) -> Any:
        ws = workspaces[i % 2] if kind == "two-workspaces" else workspaces[0]
        if kind == "apply_changes":
            return await ws.apply_changes(changes, idempotency_key="k")
        return await ws.edit("f.txt", APPEND, idempotency_key="k")

    events: list[tuple[str, int]] = []
    results: dict[int, Any] = {}

    async def one(i: int) -> None:
        events.append(("start", i))
        results[i] = await call(i)
        events.append(("end", i))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(one, i)
    first_end = next(n for n, event in enumerate(events) if event[0] == "end")
    started = sorted(i for event, i in events[:first_end] if event == "start")
    assert started == list(range(5)), f"the calls did not overlap: {events}"
    assert len({repr(r) for r in results.values()}) == 1, results
    assert (root / "f.txt").read_bytes() == BIG_FILLER + b"added\nEND\n"
    if kind == "apply_changes":
        assert (root / "w.txt").read_bytes() == BIG_FILLER
        assert (root / "nd").is_dir()
    assert temp_files(root) == []
    assert journals(private_state_dir) == []


@pytest.mark.parametrize(
    "nworkspaces",
    [
        pytest.param(1, id="one-workspace"),
        pytest.param(2, id="two-workspaces"),
    ],
)
async def test_overlapping_calls_with_one_key_and_other_arguments_do_not_both_apply(
    root: Path, nworkspaces: int
) -> None:
    """Same key, other arguments, both in flight at once: one applies, the other is refused
    (if both applied, the second's result could never be asked for again with its key)."""
    limits = Limits(chunk_bytes=4096, inline_io_bytes=0)
    workspaces = [Workspace([root], limits=limits) for _ in range(nworkspaces)]
    outcomes: dict[str, Any] = {}

    async def call(i: int, name: str) -> None:
        try:
            ws = workspaces[i % nworkspaces]
            outcomes[name] = await ws.write(name, BIG_FILLER, idempotency_key="k")
        except AtomicToolsError as err:
            outcomes[name] = err

    names = ["d1/a.txt", "d2/b.txt"]  # two directories: no directory lock in common
    for name in names:
        (root / name).parent.mkdir()
    async with anyio.create_task_group() as tg:
        for i, name in enumerate(names):
            tg.start_soon(call, i, name)
    applied = [name for name in names if (root / name).exists()]
    refused = [out for out in outcomes.values() if isinstance(out, IdempotencyKeyReusedError)]
    assert len(applied) == 1, f"both calls with key 'k' applied: {outcomes}"
    assert len(refused) == 1, outcomes
    assert temp_files(root) == []


# -- cancellation, then a retry with the same key -----------------------------------------------


def _cancel_case(kind: str, case: str) -> Callable[[Workspace, str], Awaitable[Any]]:
    big = BIG_FILLER[:40_000]
    if kind == "write":
        return lambda ws, k: ws.write(f"{case}/w.txt", big, idempotency_key=k)
    if kind == "edit":
        return lambda ws, k: ws.edit(f"{case}/f.txt", APPEND, idempotency_key=k)
    changes = [
        Change("edit", f"{case}/f.txt", edits=_edits(APPEND)),
        Change("mkdir", f"{case}/nd"),
        Change("write", f"{case}/nd/w.txt", content=big),
        Change("delete", f"{case}/gone.txt"),
    ]
    return lambda ws, k: ws.apply_changes(changes, idempotency_key=k)


CANCEL_AFTER: dict[str, dict[str, bytes | str | None]] = {
    "write": {"w.txt": BIG_FILLER[:40_000]},
    "edit": {"f.txt": BIG_FILLER[:40_000] + b"added\nEND\n"},
    "apply_changes": {
        "f.txt": BIG_FILLER[:40_000] + b"added\nEND\n",
        "nd": DIR,
        "nd/w.txt": BIG_FILLER[:40_000],
        "gone.txt": None,
    },
}


@pytest.mark.parametrize("kind", ["write", "edit", "apply_changes"])
async def test_a_cancelled_call_leaves_the_key_free_and_the_retry_applies_once(
    root: Path, private_state_dir: Path, kind: str
) -> None:
    """Cancel the keyed call at its 1st, 2nd, 3rd ... protocol step (each a cancellation point
    before the commit), until it completes; after each cancel nothing changed and the retry with
    the same key applies exactly once (the same cancel-at-every-step method as
    test_cancellation.py)."""
    ws = Workspace([root], limits=Limits(chunk_bytes=4096, inline_io_bytes=0))
    base = {"f.txt": BIG_FILLER[:40_000] + b"END\n", "gone.txt": b"deleted\n"}
    cancelled_runs = 0
    for n in range(1, 500):
        case = f"case{n}"
        (root / case).mkdir()
        for name, data in base.items():
            (root / case / name).write_bytes(data)
        call = _cancel_case(kind, case)
        seen: list[str] = []
        with anyio.CancelScope() as scope:

            def observer(name: str, seen: list[str] = seen, scope: Any = scope, n: int = n) -> None:
                seen.append(name)
                if len(seen) == n:
                    scope.cancel()

            with observe_steps(observer):
                first = await call(ws, f"key-{n}")
        if not scope.cancelled_caught:
            assert disk(root / case) == expected(CANCEL_AFTER[kind], base)
            assert await call(ws, f"key-{n}") == first
            break
        cancelled_runs += 1
        assert disk(root / case) == expected({}, base), f"cancelled at step {n}: {seen}"
        assert temp_files(root) == []
        assert journals(private_state_dir) == []
        retried = await call(ws, f"key-{n}")
        assert disk(root / case) == expected(CANCEL_AFTER[kind], base), f"step {n}: {seen}"
        assert await call(ws, f"key-{n}") == retried
        assert disk(root / case) == expected(CANCEL_AFTER[kind], base)
    else:
        pytest.fail("the call never completed")
    assert cancelled_runs >= 5, f"only {cancelled_runs} steps: the cancels proved little"
    assert temp_files(root) == []


@pytest.mark.parametrize(
    "nworkspaces",
    [
        pytest.param(1, id="one-workspace"),
        pytest.param(2, id="two-workspaces"),
    ],
)
async def test_a_retry_overlapping_a_cancelled_call_makes_its_directory(
    root: Path, nworkspaces: int
) -> None:
    """What a client whose call timed out does: it retries at once with the same key, while the
    server still unwinds the first call (MCP cancellation does not wait for the handler). The
    retry planned while the first call's directory existed; that call's undo removes it."""
    limits = Limits(chunk_bytes=4096, inline_io_bytes=0)
    workspaces = [Workspace([root], limits=limits) for _ in range(nworkspaces)]
    changes = [Change("mkdir", "n"), Change("write", "big.txt", content=BIG_FILLER[:100_000])]
    planned = anyio.Event()
    outcome: dict[str, Any] = {}

    async def first() -> None:
        seen: list[str] = []
        with anyio.CancelScope() as scope:

            def observer(name: str) -> None:
                seen.append(name)
                if len(seen) == 3:
                    planned.set()  # the retry starts (and plans) while this call is staging
                if len(seen) == 6:
                    scope.cancel()

            with observe_steps(observer):
                await workspaces[0].apply_changes(changes, idempotency_key="k")
        outcome["cancelled"] = scope.cancelled_caught

    async def retry() -> None:
        await planned.wait()
        outcome["retry"] = await workspaces[-1].apply_changes(changes, idempotency_key="k")

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        tg.start_soon(retry)
    assert outcome["cancelled"]
    assert outcome["retry"].applied
    assert (root / "big.txt").exists()
    assert (root / "n").is_dir(), f"the retry reported {outcome['retry'].changes[0]}"


# -- keys are per set of roots ----------------------------------------------------------------


async def test_keys_are_per_set_of_roots(tmp_path: Path) -> None:
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    for top in (r1, r2):
        (top / "sub").mkdir(parents=True)
        setup_tree(top)
    ws1, ws2 = Workspace([r1]), Workspace([r2])
    on_r1 = await ws1.edit("f.txt", APPEND, idempotency_key="k")
    # The same key and the same (relative) arguments on another root: another file, its own call.
    on_r2 = await ws2.edit("f.txt", APPEND, idempotency_key="k")
    assert (r1 / "f.txt").read_bytes() == ONCE
    assert (r2 / "f.txt").read_bytes() == ONCE
    assert on_r1 == on_r2  # same relative path, same content: equal results, both applied
    # Other arguments with a key used on r1 are fine on r2 (no reuse error there).
    await ws1.write("w.txt", "on r1\n", idempotency_key="w")
    await ws2.write("w.txt", "on r2, other arguments\n", idempotency_key="w")
    assert (r2 / "w.txt").read_bytes() == b"on r2, other arguments\n"
    # A workspace on both roots is a third set of roots.
    both = Workspace([r1, r2])
    await both.edit("f.txt", APPEND, idempotency_key="k")
    assert (r1 / "f.txt").read_bytes() == TWICE

    # The same set of roots shares its keys: another Workspace object, or a narrowed view
    # (an MCP client's roots) of it.
    assert await Workspace([r1]).edit("f.txt", APPEND, idempotency_key="k") == on_r1
    inside = str(r1 / "sub" / "g.txt")
    written = await ws1.write(inside, "in sub\n", idempotency_key="g")
    view = ws1.narrowed([r1 / "sub"])
    assert await view.write(inside, "in sub\n", idempotency_key="g") == written
    with pytest.raises(IdempotencyKeyReusedError):
        await view.write(inside, "other\n", idempotency_key="g")
    assert (r1 / "f.txt").read_bytes() == TWICE
    assert (r1 / "sub" / "g.txt").read_bytes() == b"in sub\n"


# -- crashes: the next keyed call (any process) or `atomictools recover` finishes the change ------


CRASH_POINTS = [
    "changeset.prepared",
    "changeset.committed",
    "changeset.applied",
    "changeset.key_recorded",
    "changeset.finished",
]
CRASH_CHANGES: list[dict[str, Any]] = [
    {"op": "edit", "path": "f.txt", "edits": APPEND},
    {"op": "mkdir", "path": "nd"},
    {"op": "write", "path": "nd/w.txt", "content": "written\n"},
    {"op": "move", "path": "dst.txt", "source": "src.txt"},
]
CRASH_AFTER: dict[str, bytes | str | None] = {
    "f.txt": ONCE,
    "nd": DIR,
    "nd/w.txt": b"written\n",
    "src.txt": None,
    "dst.txt": b"moved\n",
}


def run_child(spec: dict[str, Any], state: Path, crash_at: str | None) -> str:
    """Run the keyed call in a child; returns its stdout (empty when it died at ``crash_at``)."""
    env = {**os.environ, STATE_DIR_ENV: str(state)}
    env.pop(CRASH_ENV, None)
    if crash_at is not None:
        env[CRASH_ENV] = crash_at
        env[CRASH_SIGNAL_ENV] = "KILL"  # a real SIGKILL where the engine supports it, else exit
    done = subprocess.run(
        [sys.executable, str(CHILD), json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    want = (CRASH_EXIT_CODE, -signal.SIGKILL) if crash_at is not None else (0,)
    assert done.returncode in want, (done.returncode, done.stderr[-3000:])
    return done.stdout


def run_recover(root: Path, state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "atomictools", "recover", str(root), "--json"],
        env={**os.environ, STATE_DIR_ENV: str(state)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def committed_txids(state: Path, key: str) -> list[str]:
    """The journals a dead process left committed with ``key`` in them."""
    found = []
    for path in journals(state):
        record = read_record(path)
        if record is not None and record.committed:
            assert record.idempotency is not None
            assert record.idempotency["key"] == key
            found.append(record.txid)
    return found


@pytest.mark.parametrize("crash_at", CRASH_POINTS)
async def test_killed_mid_change_then_retried_in_another_process(
    root: Path, private_state_dir: Path, crash_at: str
) -> None:
    setup_tree(root)
    spec = {
        "kind": "file",
        "roots": [str(root)],
        "state_dir": str(private_state_dir),
        "key": "k",
        "changes": CRASH_CHANGES,
    }
    run_child(spec, private_state_dir, crash_at)
    left = committed_txids(private_state_dir, "k")
    stored = stored_keys(private_state_dir / STORE_NAME)
    if crash_at == "changeset.prepared":  # before the commit point: nothing to finish
        assert disk(root) == expected({"nd": DIR})  # made under a "preparing" record
        assert left == []
        assert stored == set()
    elif crash_at == "changeset.committed":  # committed, not applied yet
        assert disk(root)["f.txt"] == SETUP["f.txt"]
        assert len(left) == 1
    else:
        assert disk(root) == expected(CRASH_AFTER)
        assert len(left) == (0 if crash_at == "changeset.finished" else 1)
        assert stored == ({"k"} if crash_at != "changeset.applied" else set())

    ws = Workspace([root])
    changes = changes_from_spec(CRASH_CHANGES)
    retried = await ws.apply_changes(changes, idempotency_key="k")
    assert disk(root) == expected(CRASH_AFTER), "the change was applied twice or not at all"
    assert journals(private_state_dir) == []
    orphans = temp_files(root)
    if crash_at != "changeset.prepared":
        assert orphans == []  # finishing the change set removed its backups
    for orphan in orphans:  # the dead child's staged files and backups: the sweep's job
        assert temp_owner_pid(orphan.name) != os.getpid()
    assert stored_keys(private_state_dir / STORE_NAME) == {"k"}
    if left:  # the retry's result is the dead call's (its txid), not a new application
        assert retried.txid == left[0]
    if crash_at in ("changeset.prepared", "changeset.committed"):
        assert retried.changes[0].previous_sha256 == sha(SETUP["f.txt"])
    assert retried.changes[0].sha256 == sha(ONCE)
    assert await ws.apply_changes(changes, idempotency_key="k") == retried
    assert disk(root) == expected(CRASH_AFTER)
    with pytest.raises(IdempotencyKeyReusedError):
        await ws.apply_changes(changes[:1], idempotency_key="k")


async def test_recover_command_records_the_key_of_a_dead_change_set(
    root: Path, private_state_dir: Path
) -> None:
    setup_tree(root)
    spec = {
        "kind": "file",
        "roots": [str(root)],
        "state_dir": str(private_state_dir),
        "key": "k",
        "changes": CRASH_CHANGES,
    }
    run_child(spec, private_state_dir, "changeset.applied")
    [txid] = committed_txids(private_state_dir, "k")
    assert stored_keys(private_state_dir / STORE_NAME) == set()
    done = run_recover(root, private_state_dir)
    assert done.returncode == 1, done.stdout + done.stderr
    assert json.loads(done.stdout)["rolledForward"] == [txid]
    assert journals(private_state_dir) == []
    assert stored_keys(private_state_dir / STORE_NAME) == {"k"}
    retried = await Workspace([root]).apply_changes(
        changes_from_spec(CRASH_CHANGES), idempotency_key="k"
    )
    assert retried.txid == txid
    assert disk(root) == expected(CRASH_AFTER)


async def test_finishing_a_dead_change_set_never_undoes_a_later_acknowledged_write(
    root: Path, private_state_dir: Path
) -> None:
    """A keyed call finishes dead change sets (of any key) before it runs: never over a write
    that was acknowledged after the crash (a lost update; fixed in abf94e0)."""
    setup_tree(root)
    spec = {
        "kind": "file",
        "roots": [str(root)],
        "state_dir": str(private_state_dir),
        "key": "k",
        "changes": [{"op": "edit", "path": "f.txt", "edits": APPEND}],
    }
    run_child(spec, private_state_dir, "changeset.committed")
    assert (root / "f.txt").read_bytes() == SETUP["f.txt"]
    ws = Workspace([root])
    try:
        await ws.write("f.txt", "written after the crash\n")
    except AtomicToolsError:
        return  # refusing the write until the dead change set is finished is fine too
    await ws.write("other.txt", "x", idempotency_key="unrelated")  # finishes dead change sets
    assert (root / "f.txt").read_bytes() == b"written after the crash\n"
    assert journals(private_state_dir) == []


async def test_a_retry_is_not_told_a_dropped_change_was_applied(
    root: Path, private_state_dir: Path
) -> None:
    setup_tree(root)
    changes = [{"op": "edit", "path": "f.txt", "edits": APPEND}]
    spec = {
        "kind": "file",
        "roots": [str(root)],
        "state_dir": str(private_state_dir),
        "key": "k",
        "changes": changes,
    }
    run_child(spec, private_state_dir, "changeset.committed")
    ws = Workspace([root])
    await ws.write("f.txt", "written after the crash\n")  # by another server, say
    for _ in range(2):  # the answer is recorded: asking again neither redoes nor succeeds
        with pytest.raises(InterruptedCallError) as caught:
            await ws.apply_changes(changes_from_spec(changes), idempotency_key="k")
        assert "could finish only part" in str(caught.value)
        assert "replaced by someone else since the crash" in str(caught.value)
        assert (root / "f.txt").read_bytes() == b"written after the crash\n"
    assert journals(private_state_dir) == []


async def test_the_key_lock_holds_across_processes(tmp_path: Path) -> None:
    """Same key in two processes: the second waits until the first holder is gone (even
    killed); the lock is a record lock on the state directory's key-lock file."""
    lock_file = tmp_path / "state" / LOCK_NAME
    receipt = Receipt("unused", "scope", "k", "f")
    script = (
        "import anyio, sys\n"
        "from pathlib import Path\n"
        "from atomictools.engine.changes.idempotency import Receipt, key_locked\n"
        "async def main():\n"
        "    async with key_locked(Path(sys.argv[1]), Receipt('unused', 'scope', 'k', 'f')):\n"
        "        print('holding', flush=True)\n"
        "        await anyio.sleep(3600)\n"
        "anyio.run(main)\n"
    )
    async with await anyio.open_process([sys.executable, "-c", script, str(lock_file)]) as holder:
        try:
            assert holder.stdout is not None
            with anyio.fail_after(30):
                assert (await holder.stdout.receive()).startswith(b"holding")
            with anyio.move_on_after(0.5) as waited:
                async with key_locked(lock_file, receipt):
                    pytest.fail("took a key another process holds")
            assert waited.cancelled_caught
            async with key_locked(lock_file, Receipt("unused", "scope", "other key", "f")):
                pass  # another key is free
        finally:
            holder.kill()
            await holder.wait()
    with anyio.fail_after(5):
        async with key_locked(lock_file, receipt):
            pass  # the dead holder's lock went with it


# -- databases ------------------------------------------------------------------------------


async def count(db: Database, table: str = "t") -> int:
    result = await db.query(f"SELECT count(*) FROM {table}")
    value = result.rows[0][0]
    assert isinstance(value, int)
    return value


BATCH = [
    Statement("INSERT INTO t(v) VALUES (?)", ["a"]),
    Statement("INSERT INTO t(v) VALUES (:v)", {"v": "b"}),
    Statement("UPDATE t SET v = v || '!'"),  # each application appends another "!"
]


@asyncio_only
async def test_database_keyed_calls_apply_once(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    async with Database(path) as db:
        await db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        first = await db.run_statements(BATCH, idempotency_key="k")
        assert [(r.rowcount, r.lastrowid) for r in first[:2]] == [(1, 1), (1, 2)]
        values = await db.query("SELECT v FROM t ORDER BY id")
        assert values.rows == (("a!",), ("b!",))
        assert await db.run_statements(BATCH, idempotency_key="k") == first
        # Another Database object on the same file (what another process has).
        async with Database(path) as other:
            assert await other.run_statements(BATCH, idempotency_key="k") == first
        assert (await db.query("SELECT v FROM t ORDER BY id")).rows == values.rows

        one = await db.execute("INSERT INTO t(v) VALUES (?)", ["c"], idempotency_key="e")
        assert one.lastrowid == 3
        assert await db.execute("INSERT INTO t(v) VALUES (?)", ["c"], idempotency_key="e") == one
        assert await count(db) == 3

        with pytest.raises(IdempotencyKeyReusedError) as refused:
            await db.execute("INSERT INTO t(v) VALUES (?)", ["d"], idempotency_key="e")
        assert refused.value.code == "idempotency_key_reused"
        with pytest.raises(IdempotencyKeyReusedError):
            await db.run_statements(BATCH[:2], idempotency_key="k")
        assert await count(db) == 3
        # The refusals did not spoil the keys: the repeat still gets the first results.
        assert await db.run_statements(BATCH, idempotency_key="k") == first
        assert await count(db) == 3
    # The records live in the database itself, one per key.
    assert stored_keys(path) == {"k", "e"}
    # A key is per database: the same key on another database is another call.
    async with Database(tmp_path / "other.db") as db2:
        await db2.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        assert await db2.run_statements(BATCH, idempotency_key="k") == first
        assert await count(db2) == 2


@asyncio_only
async def test_database_key_row_is_written_in_the_same_transaction(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    async with Database(path) as db:
        await db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        failing = [*BATCH[:2], Statement("INSERT INTO t(v) VALUES (NULL)")]
        for _ in range(2):  # a failure is not recorded: the same batch fails again
            with pytest.raises(StatementError, match="statement 3 of 3"):
                await db.run_statements(failing, idempotency_key="k")
            assert await count(db) == 0
        assert stored_keys(path) == set(), "the key of a rolled-back batch was recorded"

        # The key is free, also for a fixed batch (other arguments).
        done = await db.run_statements(BATCH, idempotency_key="k")
        assert await count(db) == 2
        assert stored_keys(path) == {"k"}
        assert await db.run_statements(BATCH, idempotency_key="k") == done
        assert await count(db) == 2

        # The other way round: when the key's row cannot be written, the change is not
        # committed either (it would be, were the key recorded after the commit).
        await db.execute(
            f"CREATE TRIGGER refuse_keys BEFORE INSERT ON {KEY_TABLE} "
            "BEGIN SELECT RAISE(ABORT, 'no more keys'); END"
        )
        with pytest.raises((sqlite3.Error, AtomicToolsError), match="no more keys"):
            await db.run_statements(
                [Statement("INSERT INTO t(v) VALUES ('c')")], idempotency_key="x"
            )
        assert await count(db) == 2
        await db.execute("DROP TRIGGER refuse_keys")
        await db.run_statements([Statement("INSERT INTO t(v) VALUES ('c')")], idempotency_key="x")
        assert await count(db) == 3
    assert stored_keys(path) == {"k", "x"}


@asyncio_only
async def test_database_cancelled_batch_leaves_the_key_free(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    statements = [Statement("INSERT INTO t(v) VALUES (?)", [str(i)]) for i in range(5000)]
    async with Database(path) as db:
        await db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        reported: list[int] = []
        with anyio.CancelScope() as scope:

            async def progress(done: int, total: int | None) -> None:
                reported.append(done)
                scope.cancel()  # inside the transaction, before the key row and the COMMIT
                await anyio.lowlevel.checkpoint()

            await db.run_statements(statements, progress=progress, idempotency_key="k")
        assert scope.cancelled_caught
        assert reported
        assert await count(db) == 0
        assert stored_keys(path) == set()
        done = await db.run_statements(statements, idempotency_key="k")
        assert len(done) == 5000
        assert await count(db) == 5000
        assert await db.run_statements(statements, idempotency_key="k") == done
        assert await count(db) == 5000


@asyncio_only
async def test_database_concurrent_calls_with_one_key_apply_once(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    async with Database(path) as db, Database(path) as other:
        await db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        results: dict[int, Any] = {}

        async def one(i: int) -> None:
            results[i] = await (db if i % 2 else other).run_statements(BATCH, idempotency_key="k")

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(6):
                    tg.start_soon(one, i)
        assert len({repr(r) for r in results.values()}) == 1
        assert await count(db) == 2
        assert (await db.query("SELECT v FROM t ORDER BY id")).rows == (("a!",), ("b!",))


@asyncio_only
async def test_database_key_expires_after_its_time_to_live(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    async with Database(path, idempotency_ttl=TTL) as db:
        await db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        first = await db.run_statements(BATCH, idempotency_key="k")
        await db.execute("INSERT INTO t(v) VALUES ('x')", idempotency_key="short-lived")
        assert await db.run_statements(BATCH, idempotency_key="k") == first
        assert await count(db) == 3
        await anyio.sleep(TTL + 0.2)
        second = await db.run_statements(BATCH, idempotency_key="k")
        assert second != first
        assert await count(db) == 5
        assert stored_keys(path) == {"k"}  # the expired records were pruned


@asyncio_only
async def test_database_killed_after_commit_then_retried(tmp_path: Path) -> None:
    """The process dies right after COMMIT, before it could answer: the retry (here, another
    process) finds the key row that was committed with the rows, and applies nothing."""
    path = tmp_path / "app.db"
    async with Database(path) as db:
        await db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    spec = {
        "kind": "db",
        "path": str(path),
        "key": "k",
        "statements": [[s.sql, s.params] for s in BATCH],
    }
    run_child(spec, tmp_path, "db.committed")
    assert stored_keys(path) == {"k"}
    async with Database(path) as db:
        assert (await db.query("SELECT v FROM t ORDER BY id")).rows == (("a!",), ("b!",))
        retried = await db.run_statements(BATCH, idempotency_key="k")
        assert [(r.rowcount, r.lastrowid) for r in retried[:2]] == [(1, 1), (1, 2)]
        assert (await db.query("SELECT v FROM t ORDER BY id")).rows == (("a!",), ("b!",))
    # A clean run of the same call in a child agrees with what the crashed one recorded.
    assert json.loads(run_child(spec, tmp_path, None)) == [
        [r.rowcount, r.lastrowid] for r in retried
    ]
