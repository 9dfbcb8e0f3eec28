"""Idempotency keys end to end (DESIGN 8): the real MCP server, the SDK's real client.

* In memory (``Client(create_server(...), mode="legacy")``): every mutating tool called twice
  with one ``idempotencyKey`` returns the same structured content and changes the disk once (a
  second application would show: an edit whose ``newText`` contains its ``oldText``, a move
  whose source is gone, an UPDATE that appends to every row); the key with other arguments is
  an ``isError`` result that says nothing was changed; a dry run ignores the key.
* Cancellation: a keyed call is cancelled by the client (``notifications/cancelled``) at many
  points of its work, then retried with the same key on the same session, sometimes after a
  barrier (the call has unwound), sometimes at once (while the server still unwinds it): the
  change is applied exactly once, whether the cancel landed before the commit point (the key
  stays free, the retry applies) or after it (the retry gets the stored result).
* Crashes: ``python -m atomictools serve`` over stdio dies at a crash point
  (``ATOMICTOOLS_TEST_CRASH_AT``, a real SIGKILL where the engine supports
  ``ATOMICTOOLS_TEST_CRASH_SIGNAL=KILL``) in the middle of a keyed call; a server restarted on
  the same root and state directory (without the crash setting) gets the same call with the
  same key: it succeeds, and the file or the database shows the change once. A second server
  that was running all along (never restarted) must do the same: its keyed call finishes the
  dead server's change set first. Two live servers given one key at once apply it once.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from mcp import Client
from mcp.types import CallToolResult
from pydantic import BaseModel

from atomictools import Limits, Workspace
from atomictools.engine.config import STATE_DIR_ENV
from atomictools.engine.durable.steps import CRASH_ENV, CRASH_EXIT_CODE, observe_steps
from atomictools.engine.durable.tempfiles import is_temp_name
from atomictools.server import ServerOptions, create_server
from atomictools.server.models import (
    ApplyChangesOutput,
    CopyOutput,
    DbExecuteOutput,
    DbTransactionOutput,
    DeleteOutput,
    DirectoryOutput,
    EditOutput,
    MoveOutput,
    WriteOutput,
)
from tests.conftest import read_record, temp_files, tree_snapshot
from tests.crash_suite_harness import pipe_transport

from .helpers import TRACEBACK_MARKERS, Env, text_of

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs POSIX processes"),
]
# The database tools need asyncio; a stdio server runs on asyncio whatever the client uses, so
# a trio run of those tests would only test the SDK's client again.
asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])

CRASH_SIGNAL_ENV = "ATOMICTOOLS_TEST_CRASH_SIGNAL"
CALL_TIMEOUT = 60
KEY = "3f2a9c1e-retry-me"
APPEND = [{"oldText": "END", "newText": "added\nEND"}]
"""``newText`` contains ``oldText``: every application adds one more line."""
OLD = b"first\nEND\n"
ONCE = b"first\nadded\nEND\n"
SETUP = {"f.txt": OLD, "src.txt": b"moved\n", "c.txt": b"copied\n", "gone.txt": b"deleted\n"}
BATCH = [
    {"sql": "INSERT INTO t(v) VALUES (?)", "params": ["a"]},
    {"sql": "INSERT INTO t(v) VALUES (:v)", "params": {"v": "b"}},
    {"sql": "UPDATE t SET v = v || '!'"},  # each application appends another "!"
]
ROWS_ONCE = [("a!",), ("b!",)]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_db(path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        conn.commit()
    finally:
        conn.close()


def rows(path: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT v FROM t ORDER BY id").fetchall()
    finally:
        conn.close()


def journals(state: Path) -> list[Path]:
    directory = state / "journals"
    return sorted(directory.iterdir()) if directory.is_dir() else []


def committed_txids(state: Path) -> list[str]:
    found = []
    for path in journals(state):
        record = read_record(path)
        if record is not None and record.committed:
            assert record.idempotency is not None
            assert record.idempotency["key"] == KEY
            found.append(record.txid)
    return found


def setup_tree(top: Path) -> None:
    top.mkdir(parents=True, exist_ok=True)
    for name, data in SETUP.items():
        (top / name).write_bytes(data)


def disk(top: Path) -> dict[str, bytes | str]:
    """Every entry below ``top`` but our temp files (checked on their own)."""
    return {
        str(p.relative_to(top)): "<dir>" if p.is_dir() else p.read_bytes()
        for p in sorted(top.rglob("*"))
        if not is_temp_name(p.name)
    }


def expected(changes: dict[str, bytes | str | None]) -> dict[str, bytes | str]:
    tree: dict[str, bytes | str | None] = {**SETUP, **changes}
    return {k: v for k, v in sorted(tree.items()) if v is not None}


# -- every mutating tool, in memory ------------------------------------------------------------


@dataclass(frozen=True)
class ToolCase:
    tool: str
    args: Callable[[Env], dict[str, Any]]
    other: Callable[[Env], dict[str, Any]]
    """The same tool with other arguments."""
    model: type[BaseModel]
    after: dict[str, bytes | str | None] = field(default_factory=dict)
    """What one application changes in the check's directory (relative to ``SETUP``)."""
    rows: list[tuple[Any, ...]] | None = None
    """The database tools: the rows of ``t`` after one application."""


def _apply_changes(env: Env, last: bool = True) -> dict[str, Any]:
    changes = [
        {"op": "edit", "path": env.p("f.txt"), "edits": APPEND},
        {"op": "write", "path": env.p("w.txt"), "content": "hello\n"},
        {"op": "move", "source": env.p("src.txt"), "destination": env.p("dst.txt")},
        {"op": "copy", "source": env.p("c.txt"), "destination": env.p("c2.txt")},
        {"op": "delete", "path": env.p("gone.txt")},
        {"op": "mkdir", "path": env.p("nd")},
    ]
    return {"changes": changes if last else changes[:-1]}


TOOL_CASES = [
    ToolCase(
        "write_file",
        lambda e: {"path": e.p("w.txt"), "content": "hello\n"},
        lambda e: {"path": e.p("w.txt"), "content": "other\n"},
        WriteOutput,
        {"w.txt": b"hello\n"},
    ),
    ToolCase(
        "edit_file",
        lambda e: {"path": e.p("f.txt"), "edits": APPEND},
        lambda e: {"path": e.p("f.txt"), "edits": [{"oldText": "END", "newText": "x\nEND"}]},
        EditOutput,
        {"f.txt": ONCE},
    ),
    ToolCase(
        "move_file",
        lambda e: {"source": e.p("src.txt"), "destination": e.p("dst.txt")},
        lambda e: {"source": e.p("src.txt"), "destination": e.p("dst.txt"), "overwrite": True},
        MoveOutput,
        {"src.txt": None, "dst.txt": b"moved\n"},
    ),
    ToolCase(
        "copy_file",
        lambda e: {"source": e.p("c.txt"), "destination": e.p("c2.txt")},
        lambda e: {"source": e.p("c.txt"), "destination": e.p("c3.txt")},
        CopyOutput,
        {"c2.txt": b"copied\n"},
    ),
    ToolCase(
        "delete_file",
        lambda e: {"path": e.p("gone.txt")},
        lambda e: {"path": e.p("f.txt")},
        DeleteOutput,
        {"gone.txt": None},
    ),
    ToolCase(
        "create_directory",
        lambda e: {"path": e.p("d/e")},
        lambda e: {"path": e.p("d/x")},
        DirectoryOutput,
        {"d": "<dir>", "d/e": "<dir>"},
    ),
    ToolCase(
        "apply_changes",
        _apply_changes,
        lambda e: _apply_changes(e, last=False),
        ApplyChangesOutput,
        {
            "f.txt": ONCE,
            "w.txt": b"hello\n",
            "src.txt": None,
            "dst.txt": b"moved\n",
            "c2.txt": b"copied\n",
            "gone.txt": None,
            "nd": "<dir>",
        },
    ),
]
DB_CASES = [
    ToolCase(
        "db_execute",
        lambda e: {"database": "main", "sql": "INSERT INTO t(v) VALUES (?)", "params": ["a"]},
        lambda e: {"database": "main", "sql": "INSERT INTO t(v) VALUES (?)", "params": ["b"]},
        DbExecuteOutput,
        rows=[("a",)],
    ),
    ToolCase(
        "db_transaction",
        lambda e: {"database": "main", "statements": BATCH},
        lambda e: {"database": "main", "statements": BATCH[:2]},
        DbTransactionOutput,
        rows=ROWS_ONCE,
    ),
]


@asynccontextmanager
async def memory_env(tmp_path: Path, name: str = "check") -> AsyncIterator[Env]:
    root = tmp_path / "root"
    root.mkdir()
    make_db(tmp_path / "app.db")
    server = create_server(
        Workspace([root], limits=Limits(chunk_bytes=64 * 1024)),
        ServerOptions(sweep_delay=60),
        databases={"main": tmp_path / "app.db"},
    )
    async with Client(server, mode="legacy") as client:
        yield Env.make(client, root, tmp_path, name)


async def check_applied_once(env: Env, case: ToolCase, db: Path) -> None:
    setup_tree(env.d)
    args = {**case.args(env), "idempotencyKey": KEY}
    first = await env.ok(case.tool, args, case.model)
    if case.rows is None:
        assert disk(env.d) == expected(case.after)
    else:
        assert rows(db) == case.rows
    snap = tree_snapshot(env.d)

    again = await env.ok(case.tool, args, case.model)
    assert again == first, "the repeat returned another result"
    assert tree_snapshot(env.d) == snap, "the repeat touched the files"
    if case.rows is not None:
        assert rows(db) == case.rows, "the repeat ran the statements again"

    other = {**case.other(env), "idempotencyKey": KEY}
    message = await env.error(case.tool, other, "idempotencyKey", KEY, "already used")
    assert "other arguments" in message
    assert tree_snapshot(env.d) == snap
    if case.rows is not None:
        assert rows(db) == case.rows
    assert await env.ok(case.tool, args, case.model) == first
    assert temp_files(env.top) == []


@pytest.mark.parametrize("case", TOOL_CASES, ids=lambda case: case.tool)
async def test_every_file_tool_applies_a_key_once(tmp_path: Path, case: ToolCase) -> None:
    async with memory_env(tmp_path) as env:
        await check_applied_once(env, case, tmp_path / "app.db")


@asyncio_only
@pytest.mark.parametrize("case", DB_CASES, ids=lambda case: case.tool)
async def test_every_database_tool_applies_a_key_once(tmp_path: Path, case: ToolCase) -> None:
    async with memory_env(tmp_path) as env:
        await check_applied_once(env, case, tmp_path / "app.db")


async def test_a_failed_call_or_a_dry_run_leaves_the_key_free(tmp_path: Path) -> None:
    async with memory_env(tmp_path) as env:
        setup_tree(env.d)
        preview = await env.ok(
            "edit_file",
            {"path": env.p("f.txt"), "edits": APPEND, "dryRun": True, "idempotencyKey": KEY},
            EditOutput,
        )
        assert preview["applied"] is False
        await env.error(
            "edit_file",
            {
                "path": env.p("f.txt"),
                "edits": APPEND,
                "expectedSha256": "0" * 64,
                "idempotencyKey": KEY,
            },
            "changed since it was read",
        )
        await env.error(
            "apply_changes",
            {"changes": [{"op": "delete", "path": env.p("missing.txt")}], "idempotencyKey": KEY},
            "does not exist",
        )
        assert disk(env.d) == expected({})
        # Neither the dry run nor the failures took the key: this call (other arguments) does.
        args = {"path": env.p("f.txt"), "edits": APPEND, "expectedSha256": sha(OLD)}
        done = await env.ok("edit_file", {**args, "idempotencyKey": KEY}, EditOutput)
        assert env.f("f.txt").read_bytes() == ONCE
        assert await env.ok("edit_file", {**args, "idempotencyKey": KEY}, EditOutput) == done
        assert env.f("f.txt").read_bytes() == ONCE
        await env.error(
            "edit_file",
            {"path": env.p("f.txt"), "edits": APPEND, "idempotencyKey": KEY},
            "already used",
        )


# -- cancellation, then a retry with the same key on the same session ----------------------------


FILLER = b"".join(
    b"%06d " % i + b"filler of a large file under edit " * 29 + b"\n" for i in range(1000)
)
"""About 1 MiB in long lines (a quick diff): with 16 KiB chunks, 60+ cancellation points. Over
stdio (1 MiB chunks) the file is 8 times larger, so the server is seen staging it."""


@dataclass
class Landing:
    how: str
    cancelled: bool
    state: str
    """What the disk showed before the retry: "old", "new" or "unknown" (retried at once)."""


def _cancel_args(env: Env, tool: str) -> dict[str, Any]:
    if tool == "edit_file":
        return {"path": env.p("f.txt"), "edits": APPEND, "idempotencyKey": f"{KEY}-{env.name}"}
    return {
        "changes": [
            {"op": "edit", "path": env.p("f.txt"), "edits": APPEND},
            {"op": "write", "path": env.p("w.txt"), "content": "written\n"},
            {"op": "delete", "path": env.p("gone.txt")},
        ],
        "idempotencyKey": f"{KEY}-{env.name}",
    }


def _state(env: Env, tool: str, filler: bytes) -> str:
    data = env.f("f.txt").read_bytes()
    if data == filler + b"END\n":
        assert not env.f("w.txt").exists()
        return "old"
    assert data == filler + b"added\nEND\n", "neither old nor new (or applied twice)"
    if tool == "apply_changes":
        assert env.f("w.txt").read_bytes() == b"written\n"
        assert not env.f("gone.txt").exists()
    return "new"


async def _barrier(env: Env) -> None:
    """Returns once the cancelled call let go of f.txt: a createOnly write on it waits for the
    per-file lock, then fails ("exists") without touching anything."""
    with anyio.fail_after(CALL_TIMEOUT):
        refused = await env.call(
            "write_file", {"path": env.p("f.txt"), "content": "", "createOnly": True}
        )
    assert refused.is_error
    assert "exists" in text_of(refused)


async def cancel_then_retry(
    client: Client,
    root: Path,
    top: Path,
    tool: str,
    name: str,
    how: str,
    *,
    at_step: int | str = 0,
    delay: float = 0.0,
    wait_for_temp: bool = False,
    barrier: bool = True,
    filler: bytes = FILLER,
) -> Landing:
    """One case: the call, cancelled by the client; then the retry with the same key.

    ``at_step``: cancel when the server (in process) reaches its n-th protocol step, or the step
    of that name; else ``delay`` seconds after the call started (or after the server's temp
    file appeared, with ``wait_for_temp``).
    """
    env = Env.make(client, root, top, name)
    env.f("f.txt").write_bytes(filler + b"END\n")
    env.f("gone.txt").write_bytes(b"deleted\n")
    args = _cancel_args(env, tool)
    steps: list[str] = []
    temp_seen = anyio.Event()

    def observer(step: str) -> None:
        steps.append(step)
        if at_step in (step, len(steps)):
            scope.cancel()

    async def watch_temps() -> None:
        while True:
            if any(is_temp_name(n) for n in os.listdir(env.d)):
                temp_seen.set()
                return
            await anyio.sleep(0.001)

    async def cancel_later() -> None:
        if wait_for_temp:
            await temp_seen.wait()
        await anyio.sleep(delay)
        scope.cancel()

    result: CallToolResult | None = None
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(CALL_TIMEOUT), anyio.CancelScope() as scope:
            if wait_for_temp:
                tg.start_soon(watch_temps)
            if not at_step:
                tg.start_soon(cancel_later)
            with observe_steps(observer):
                result = await client.call_tool(tool, args)
        tg.cancel_scope.cancel()
    cancelled = scope.cancelled_caught
    if not cancelled:
        assert result is not None
        assert not result.is_error, text_of(result)
    state = "unknown"
    if barrier:
        await _barrier(env)
        state = _state(env, tool, filler)
    with anyio.fail_after(CALL_TIMEOUT):
        retried = await client.call_tool(tool, args)
    assert not retried.is_error, text_of(retried)
    assert _state(env, tool, filler) == "new", f"{how}: the retry did not apply the change"
    again = await client.call_tool(tool, args)
    assert again.structured_content == retried.structured_content
    assert _state(env, tool, filler) == "new", f"{how}: applied twice"
    if not cancelled:
        assert result is not None
        assert retried.structured_content == result.structured_content
    assert temp_files(env.d) == []
    return Landing(how, cancelled, state)


IN_MEMORY_CANCELS: list[dict[str, Any]] = [
    *({"at_step": n} for n in (1, 10, 40, 64)),
    {"at_step": "changeset.commit"},
    {"delay": 0.0},
]
"""At the n-th protocol step the server reaches (the cancel lands a little later: the client's
notification has to reach the handler), at the step just before the commit point (the server
commits, applies and records the key before it looks at the cancel: the retry must get the
stored result), or right at the start of the call."""


@pytest.mark.parametrize("tool", ["edit_file", "apply_changes"])
async def test_cancelled_call_then_retry_on_the_same_session(tmp_path: Path, tool: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    workspace = Workspace([root], durability="fast", limits=Limits(chunk_bytes=16 * 1024))
    server = create_server(workspace, ServerOptions(sweep_delay=60))
    landings = []
    async with Client(server, mode="legacy") as client:
        for i, when in enumerate(IN_MEMORY_CANCELS):
            for barrier in (True, False):
                how = f"{when} {'after a barrier' if barrier else 'retried at once'}"
                landings.append(
                    await cancel_then_retry(
                        client,
                        root,
                        tmp_path,
                        tool,
                        f"case{i}-{barrier}",
                        how,
                        barrier=barrier,
                        **when,
                    )
                )
    # Cancels landed before the commit point (the key stayed free, the retry applied it) and
    # after it (the retry got the stored result); every retry left the change applied once.
    assert any(x.cancelled and x.state == "old" for x in landings), landings
    assert any(x.cancelled and x.state == "new" for x in landings), landings


@asyncio_only
async def test_cancelled_call_then_retry_over_stdio(tmp_path: Path) -> None:
    root, state = tmp_path / "root", tmp_path / "state"
    root.mkdir()
    landings = []
    async with serve(root, state, tmp_path / "app.db", tmp_path / "server.log") as server:
        for i, delay in enumerate((0.0, 0.05)):
            for barrier in (True, False):
                how = f"{delay * 1000:g} ms after the temp appeared, barrier={barrier}"
                landings.append(
                    await cancel_then_retry(
                        server.client,
                        root,
                        tmp_path,
                        "edit_file",
                        f"case{i}-{barrier}",
                        how,
                        delay=delay,
                        wait_for_temp=True,
                        barrier=barrier,
                        filler=FILLER * 8,
                    )
                )
    assert any(x.cancelled and x.state == "old" for x in landings), landings
    check_log(tmp_path / "server.log")


# -- the real server over stdio: killed at a crash point, then retried -------------------------


@dataclass
class Served:
    process: anyio.abc.Process
    client: Client
    log: Path


def server_env(state: Path, crash_at: str | None) -> dict[str, str]:
    env = {**os.environ, STATE_DIR_ENV: str(state)}
    env.pop(CRASH_ENV, None)
    env.pop(CRASH_SIGNAL_ENV, None)
    if crash_at is not None:
        env[CRASH_ENV] = crash_at
        env[CRASH_SIGNAL_ENV] = "KILL"  # a real SIGKILL where supported, else exit 137
    return env


async def spawn(
    root: Path, state: Path, db: Path, log: Path, crash_at: str | None = None
) -> anyio.abc.Process:
    argv = [
        sys.executable,
        "-m",
        "atomictools",
        "serve",
        "--root",
        str(root),
        "--state-dir",
        str(state),
        "--db",
        f"main={db}",
    ]
    with open(log, "ab") as stderr:
        return await anyio.open_process(argv, stderr=stderr, env=server_env(state, crash_at))


@asynccontextmanager
async def connect(process: anyio.abc.Process, log: Path) -> AsyncIterator[Served]:
    """A legacy-mode client on the process's pipes; the process is killed (by pid) at the end."""
    try:
        async with Client(
            pipe_transport(process), mode="legacy", read_timeout_seconds=CALL_TIMEOUT
        ) as client:
            yield Served(process, client, log)
    finally:
        if process.returncode is None:
            os.kill(process.pid, signal.SIGKILL)
        with anyio.move_on_after(10, shield=True):
            await process.wait()
        await process.aclose()


@asynccontextmanager
async def serve(
    root: Path, state: Path, db: Path, log: Path, crash_at: str | None = None
) -> AsyncIterator[Served]:
    process = await spawn(root, state, db, log, crash_at)
    async with connect(process, log) as served:
        yield served


async def call_until_killed(server: Served, tool: str, args: dict[str, Any]) -> None:
    """The call reaches the crash point: the server dies and the call gets no answer."""
    error: BaseException | None = None
    with anyio.fail_after(CALL_TIMEOUT):
        try:
            answer = await server.client.call_tool(tool, args)
            error = AssertionError(f"the server answered: {text_of(answer)}")
        except Exception as err:  # the connection closed under the call
            error = err
        await server.process.wait()
    assert server.process.returncode in (CRASH_EXIT_CODE, -signal.SIGKILL), (
        f"{server.process.returncode}: {error!r}\n{server.log.read_text(errors='replace')[-2000:]}"
    )


def check_log(log: Path) -> None:
    text = log.read_text(errors="replace")
    assert not TRACEBACK_MARKERS.search(text), text[-3000:]
    assert " ERROR " not in text, text[-3000:]


@dataclass(frozen=True)
class CrashCase:
    tool: str
    crash_at: str

    def args(self) -> dict[str, Any]:
        if self.tool == "edit_file":
            return {"path": "f.txt", "edits": APPEND, "idempotencyKey": KEY}
        if self.tool == "apply_changes":
            changes = [
                {"op": "edit", "path": "f.txt", "edits": APPEND},
                {"op": "mkdir", "path": "nd"},
                {"op": "write", "path": "nd/w.txt", "content": "written\n"},
                {"op": "move", "source": "src.txt", "destination": "dst.txt"},
            ]
            return {"changes": changes, "idempotencyKey": KEY}
        return {"database": "main", "statements": BATCH, "idempotencyKey": KEY}

    @property
    def after(self) -> dict[str, bytes | str | None]:
        if self.tool == "edit_file":
            return {"f.txt": ONCE}
        if self.tool == "apply_changes":
            return {
                "f.txt": ONCE,
                "nd": "<dir>",
                "nd/w.txt": b"written\n",
                "src.txt": None,
                "dst.txt": b"moved\n",
            }
        return {}

    @property
    def rows(self) -> list[tuple[Any, ...]]:
        return ROWS_ONCE if self.tool == "db_transaction" else []

    @property
    def applied_before_restart(self) -> bool:
        return self.crash_at not in ("changeset.prepared", "changeset.committed")

    def check(self, root: Path, db: Path, result: CallToolResult, txid: str | None) -> None:
        """The retry's answer is a success and shows the first application (not a second)."""
        assert not result.is_error, text_of(result)
        out = result.structured_content
        assert isinstance(out, dict)
        assert disk(root) == expected(self.after), "applied twice, or not at all"
        assert rows(db) == self.rows, "the statements ran twice, or not at all"
        if self.tool == "edit_file":
            assert out["previousSha256"] == sha(OLD)
            assert out["sha256"] == sha(ONCE)
        elif self.tool == "apply_changes":
            assert out["applied"] is True
            assert out["changes"][0]["sha256"] == sha(ONCE)
            if txid is not None:
                assert out["txid"] == txid, "not the stored result of the killed call"
        else:
            assert [(r["rowcount"], r["lastrowid"]) for r in out["results"]] == [
                (1, 1),
                (1, 2),
                (2, 2),
            ]


CRASH_CASES = [
    CrashCase("edit_file", "changeset.prepared"),
    CrashCase("edit_file", "changeset.applied"),
    CrashCase("edit_file", "changeset.key_recorded"),
    CrashCase("apply_changes", "changeset.committed"),
    CrashCase("db_transaction", "db.committed"),
]
"""Each lane starts two servers, so the list is kept short; tests/test_idempotency.py kills a
child at every change-set crash point (apply_changes with an edit, a mkdir, a write and a move)
and at ``db.committed``."""


async def run_lanes(
    tmp_path: Path, cases: list[CrashCase], lane: Callable[[CrashCase, Path], Awaitable[None]]
) -> None:
    """Run one lane per case at once (each with its own root, state directory and database):
    the servers' start-ups overlap, which keeps the module fast. Every failure is reported."""
    failures: list[str] = []

    async def one(index: int, case: CrashCase) -> None:
        top = tmp_path / f"lane{index}"
        top.mkdir()
        try:
            await lane(case, top)
        except Exception as err:
            trace = "".join(traceback.format_exception(err))
            failures.append(f"--- {case.tool} killed at {case.crash_at}:\n{trace}")

    async with anyio.create_task_group() as tg:
        for index, case in enumerate(cases):
            tg.start_soon(one, index, case)
    assert not failures, "\n".join(failures)


async def restart_lane(case: CrashCase, top: Path) -> None:
    root, state, db = top / "root", top / "state", top / "app.db"
    setup_tree(root)
    make_db(db)
    async with serve(root, state, db, top / "killed.log", case.crash_at) as killed:
        await call_until_killed(killed, case.tool, case.args())
    txids = committed_txids(state)
    if case.tool.startswith("db_"):
        assert rows(db) == case.rows  # committed with its key, then killed before the answer
    elif case.applied_before_restart:
        assert disk(root) == expected(case.after)
        assert len(txids) == 1
    else:
        assert disk(root)["f.txt"] == OLD

    # Restarted without the crash setting: startup recovery finishes the change set (and records
    # its key) before the first call is served.
    async with serve(root, state, db, top / "restarted.log") as restarted:
        assert journals(state) == []
        with anyio.fail_after(CALL_TIMEOUT):
            retried = await restarted.client.call_tool(case.tool, case.args())
            case.check(root, db, retried, txids[0] if txids else None)
            again = await restarted.client.call_tool(case.tool, case.args())
        assert again.structured_content == retried.structured_content
        case.check(root, db, again, txids[0] if txids else None)
    check_log(top / "restarted.log")
    assert journals(state) == []


@asyncio_only
async def test_killed_at_a_crash_point_then_retried_after_a_restart(tmp_path: Path) -> None:
    await run_lanes(tmp_path, CRASH_CASES, restart_lane)


LIVE_CASES = [
    CrashCase("edit_file", "changeset.applied"),
    CrashCase("apply_changes", "changeset.committed"),
    CrashCase("db_transaction", "db.committed"),
]


async def live_lane(case: CrashCase, top: Path) -> None:
    root, state, db = top / "root", top / "state", top / "app.db"
    setup_tree(root)
    make_db(db)
    live = await spawn(root, state, db, top / "live.log")
    doomed = await spawn(root, state, db, top / "killed.log", case.crash_at)
    async with connect(live, top / "live.log") as b:
        # B is up and serving before A even starts its call.
        assert not (await b.client.call_tool("read_text_file", {"path": "f.txt"})).is_error
        async with connect(doomed, top / "killed.log") as a:
            await call_until_killed(a, case.tool, case.args())
        txids = committed_txids(state)
        if not case.tool.startswith("db_"):
            assert len(txids) == 1, "A left no committed change set for B to finish"
        with anyio.fail_after(CALL_TIMEOUT):
            retried = await b.client.call_tool(case.tool, case.args())
            case.check(root, db, retried, txids[0] if txids else None)
            again = await b.client.call_tool(case.tool, case.args())
        assert again.structured_content == retried.structured_content
        assert journals(state) == []
    check_log(top / "live.log")


@asyncio_only
async def test_a_live_server_finishes_what_a_killed_one_left(tmp_path: Path) -> None:
    """Server B runs all along on the same root and state directory; server A is killed in the
    middle of the keyed call; the client retries on B, which never restarted: B's keyed call
    finishes A's change set (its journal is unlocked now) and returns its result."""
    await run_lanes(tmp_path, LIVE_CASES, live_lane)


@asyncio_only
async def test_two_live_servers_given_one_key_at_once_apply_it_once(tmp_path: Path) -> None:
    root, state, db = tmp_path / "root", tmp_path / "state", tmp_path / "app.db"
    setup_tree(root)
    (root / "f.txt").write_bytes(FILLER + b"END\n")
    make_db(db)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    processes = [await spawn(root, state, db, log) for log in logs]
    args = {"path": "f.txt", "edits": APPEND, "idempotencyKey": KEY}
    tx_args = {"database": "main", "statements": BATCH, "idempotencyKey": KEY}
    results: list[CallToolResult] = []
    async with connect(processes[0], logs[0]) as a, connect(processes[1], logs[1]) as b:

        async def call(server: Served, tool: str, arguments: dict[str, Any]) -> None:
            results.append(await server.client.call_tool(tool, arguments))

        with anyio.fail_after(CALL_TIMEOUT):
            async with anyio.create_task_group() as tg:
                for server in (a, b, a, b):
                    tg.start_soon(call, server, "edit_file", args)
                    tg.start_soon(call, server, "db_transaction", tx_args)
        for result in results:
            assert not result.is_error, text_of(result)
        edits = [r.structured_content for r in results if "diff" in (r.structured_content or {})]
        assert len(edits) == 4
        assert all(e == edits[0] for e in edits)
        txs = [r.structured_content for r in results if "diff" not in (r.structured_content or {})]
        assert len(txs) == 4
        assert all(t == txs[0] for t in txs)
        assert (root / "f.txt").read_bytes() == FILLER + b"added\nEND\n"
        assert rows(db) == ROWS_ONCE
        # The key with other arguments: refused.
        other = {"path": "f.txt", "edits": [{"oldText": "END", "newText": "x\nEND"}]}
        refused = await b.client.call_tool("edit_file", {**other, "idempotencyKey": KEY})
        assert refused.is_error
        assert "already used" in text_of(refused)
    for log in logs:
        check_log(log)
