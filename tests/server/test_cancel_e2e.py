"""End-to-end cancellation through MCP: a client cancels write_file, edit_file, copy_file and
directory_tree at many moments, or the server's --tool-timeout cuts them, or the client goes away
mid-call; the file system must hold the old or the new bytes, never a temp file, and the session
must keep working.

How a cancel travels (see the SDK notes): the client cancels the anyio scope around
``client.call_tool``; the SDK then sends ``notifications/cancelled`` and returns at once, and the
server cancels the handler's scope. The in-process default ``Client(server)`` bypasses JSON-RPC
and hides exactly the bugs we are after, so every in-memory test uses ``mode="legacy"``, and the
same checks run again against a real ``atomictools serve`` subprocess over stdio.

Because a legacy client does not wait for the cancelled handler, its cleanup can still be running
when ``call_tool`` returns. Before looking at the disk each case therefore sends a *barrier*: a
``write_file(createOnly=True)`` on the same target, which the server serialises behind the
cancelled call (changes to one file hold a per-file lock) and which fails with "already exists"
without touching anything. Once it has answered, the cancelled call is fully unwound and the disk
must be final: no temp file, target old or new.

A cancel only proves something if it landed while the server was working, so every series
records, per case, whether the server had created its temp file (mutating tools) or sent progress
(directory_tree), and requires at least one cancelled case that did and still left the target
old. Some cancels are timed from the start of the call, the others from the moment the server
is seen at work, so that they land in the middle of it whatever the machine's speed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp.server.mcpserver import MCPServer
from mcp.types import CallToolResult, TextContent

from atomictools import Limits, Workspace
from atomictools.engine.durable.steps import observe_steps
from atomictools.engine.durable.tempfiles import is_temp_name
from atomictools.server import ServerOptions, create_server
from tests.conftest import temp_files
from tests.server.helpers import state_env

pytestmark = pytest.mark.anyio

# In-memory tests run on asyncio and trio (the server runs on the test's event loop, so trio
# exercises the engine too). Tests against a real ``atomictools serve`` subprocess pin the
# backend to asyncio: the server process always runs on asyncio whatever the client uses, so a
# trio run would only test the SDK's client again and double the slowest part of this module.
stdio_asyncio_only = pytest.mark.parametrize("anyio_backend", ["asyncio"])

MiB = 1024 * 1024
CALL_TIMEOUT = 60  # a hung call fails the test instead of hanging the run
TOOL_TIMEOUT = 0.05
TREE_DIRS, TREE_FILES = 60, 50  # 3,060 entries
# Patterns that never match: each entry is checked against all of them, which makes the walk
# take 100+ ms, long enough to be cancelled (and timed out) in the middle.
TREE_EXCLUDES = [f"*.nomatch{i}" for i in range(100)]


@dataclass(frozen=True)
class Scale:
    """Sizes that make each operation take tens to hundreds of milliseconds."""

    write: int
    edit: int
    copy: int


# In memory the server uses 64 KiB chunks, so a write has hundreds of checkpoints.
IN_MEMORY = Scale(write=16 * MiB, edit=4 * MiB, copy=32 * MiB)
# The subprocess uses the default 1 MiB chunks: larger content to have as many.
OVER_STDIO = Scale(write=32 * MiB, edit=8 * MiB, copy=48 * MiB)
# Long enough (100+ ms of engine work, transfer excluded) to outlast the 50 ms tool timeout.
TIMED_OUT = Scale(write=48 * MiB, edit=8 * MiB, copy=48 * MiB)
OPS = ["write_file", "edit_file", "copy_file", "directory_tree"]


# -- operations -------------------------------------------------------------------------------


def big_text(size: int, word: str = "new") -> str:
    block = "".join(f"{word} line {i:06d}\n" for i in range(4096))
    return (block * (size // len(block) + 1))[:size]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Op:
    """One tool call and what the disk may look like after it (old, or new when it finished)."""

    tool: str
    args: dict[str, Any]
    root: Path
    target: Path | None = None  # None: read-only (directory_tree)
    old: bytes = b""
    new: bytes = b""
    tree: Path | None = None
    tree_listing: frozenset[str] = frozenset()

    @property
    def mutating(self) -> bool:
        return self.target is not None

    def reset(self) -> None:
        if self.target is not None:
            self.target.write_bytes(self.old)

    def state(self) -> str:
        """'old', 'new' or (read-only) 'unchanged'; anything else fails the test."""
        if self.target is None:
            assert self.tree is not None
            assert listing(self.tree) == self.tree_listing, "directory_tree changed the tree"
            return "unchanged"
        data = self.target.read_bytes()
        if data == self.old:
            return "old"
        if data == self.new:
            return "new"
        pytest.fail(
            f"{self.target.name} holds neither the old nor the new bytes: {len(data)} bytes, "
            f"sha256 {sha(data)} (old {len(self.old)} bytes, new {len(self.new)} bytes)"
        )

    def check_completed(self, result: CallToolResult) -> None:
        """A call that was not cancelled must have succeeded and produced the new state."""
        assert not result.is_error, text_of(result)
        structured = result.structured_content or {}
        if self.target is not None:
            assert structured["sha256"] == sha(self.new)
            assert self.state() == "new"
        else:
            assert structured["entries"] == len(self.tree_listing)
            assert self.state() == "unchanged"


def listing(tree: Path) -> frozenset[str]:
    found: set[str] = set()
    for directory, subdirs, names in os.walk(tree):
        found.update(os.path.join(directory, name) for name in (*subdirs, *names))
    return frozenset(found)


def build_op(kind: str, root: Path, scale: Scale) -> Op:
    if kind == "write_file":
        new = big_text(scale.write)
        target = root / "written.txt"
        return Op(
            "write_file",
            {"path": "written.txt", "content": new},
            root,
            target,
            old=b"old content\n",
            new=new.encode(),
        )
    if kind == "edit_file":
        filler = b"filler text of a large file under edit\n"
        old = b"first line\n" + filler * (scale.edit // len(filler)) + b"MARKER-OLD\nlast line\n"
        return Op(
            "edit_file",
            {"path": "edited.txt", "edits": [{"oldText": "MARKER-OLD", "newText": "MARKER-NEW"}]},
            root,
            root / "edited.txt",
            old=old,
            new=old.replace(b"MARKER-OLD", b"MARKER-NEW"),
        )
    if kind == "copy_file":
        source = os.urandom(MiB) * (scale.copy // MiB)
        (root / "source.bin").write_bytes(source)
        return Op(
            "copy_file",
            {"source": "source.bin", "destination": "copied.bin", "overwrite": True},
            root,
            root / "copied.bin",
            old=b"old destination\n",
            new=source,
        )
    assert kind == "directory_tree"
    tree = root / "tree"
    for d in range(TREE_DIRS):
        sub = tree / f"dir{d:03d}"
        sub.mkdir(parents=True)
        for f in range(TREE_FILES):
            (sub / f"file{f:03d}.txt").write_bytes(b"")
    return Op(
        "directory_tree",
        {"path": "tree", "excludePatterns": TREE_EXCLUDES},
        root,
        tree=tree,
        tree_listing=listing(tree),
    )


def text_of(result: CallToolResult) -> str:
    return " ".join(c.text for c in result.content if isinstance(c, TextContent))


# -- servers ----------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> Path:
    root = tmp_path / "files"
    root.mkdir()
    return root


def memory_server(root: Path, tool_timeout: float | None = None) -> MCPServer[Any]:
    workspace = Workspace([root], limits=Limits(chunk_bytes=64 * 1024))
    return create_server(workspace, ServerOptions(tool_timeout=tool_timeout))


def serve_args(root: Path, *extra: str) -> list[str]:
    return ["-m", "atomictools", "serve", "--root", str(root), *extra]


@asynccontextmanager
async def stdio_client(root: Path, *extra: str) -> AsyncIterator[Client]:
    params = StdioServerParameters(
        command=sys.executable, args=serve_args(root, *extra), env=state_env()
    )
    async with Client(params, mode="legacy") as client:
        yield client


# -- the checks shared by every case ----------------------------------------------------------


async def follow_up(client: Client, tag: str) -> None:
    """The next call on the session works: a small write, then reading it back."""
    content = f"follow-up {tag}\n"
    with anyio.fail_after(CALL_TIMEOUT):
        written = await client.call_tool(
            "write_file", {"path": f"follow-up-{tag}.txt", "content": content}
        )
        assert not written.is_error, text_of(written)
        read = await client.call_tool("read_text_file", {"path": f"follow-up-{tag}.txt"})
    assert not read.is_error, text_of(read)
    assert (read.structured_content or {})["content"] == content


async def barrier(client: Client, op: Op) -> None:
    """Wait until any earlier call on ``op``'s target has finished (see the module docstring)."""
    if op.target is None:
        return  # read-only: nothing to wait for, the tree is compared directly
    with anyio.fail_after(CALL_TIMEOUT):
        refused = await client.call_tool(
            "write_file",
            {"path": op.target.name, "content": "", "createOnly": True},
        )
    assert refused.is_error, text_of(refused)
    assert "already exists" in text_of(refused)


@dataclass(frozen=True)
class When:
    """When to cancel: ``delay`` seconds after the call started, or after the server was first
    seen at work (its temp file exists / its first progress notification arrived)."""

    delay: float
    after_work: bool = False

    def __str__(self) -> str:
        return f"{self.delay * 1000:g} ms after {'work began' if self.after_work else 'the call'}"


# Blind cancels from the start of the call (the earliest land before the request is even sent
# or while it is parsed), then cancels aimed at a server known to be in the middle of its work.
CANCELS = [When(d) for d in (0.0, 0.001, 0.005, 0.02)] + [
    When(d, after_work=True) for d in (0.0, 0.002, 0.01, 0.03, 0.06)
]


@dataclass(frozen=True)
class Outcome:
    when: When | None
    cancelled: bool
    state: str
    progress: int
    temp_created: bool
    """The server created its temp file during the call (seen on disk, or its step observed)."""

    def landed_mid_operation(self, op: Op) -> bool:
        if op.mutating:  # the temp existed, the cancel came, and the target is still old
            return self.cancelled and self.temp_created and self.state == "old"
        return self.cancelled and self.progress > 0


async def cancel_once(client: Client, op: Op, when: When | None, *, in_process: bool) -> Outcome:
    """Run the call, cancelled at ``when`` (None: never), then check the session and the disk.

    The server is seen at work through our temp file appearing on disk, or progress; in
    process also through the engine's protocol steps, which the handler reports to an observer
    set here (the SDK runs the handler in a copy of the caller's context, so ``observe_steps``
    reaches it).
    """
    op.reset()
    notifications = 0
    temp_created = False
    work_began = anyio.Event()
    result: CallToolResult | None = None

    def temp_seen() -> None:
        nonlocal temp_created
        temp_created = True
        work_began.set()

    def on_step(name: str) -> None:
        if name == "write.created":
            temp_seen()
        elif name == "walk.batch":
            work_began.set()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        nonlocal notifications
        notifications += 1
        if not op.mutating:
            work_began.set()

    async def watch_temps(directory: Path) -> None:
        while True:
            if any(is_temp_name(name) for name in os.listdir(directory)):
                temp_seen()
            await anyio.sleep(0.001)

    async def cancel_after_work(scope: anyio.CancelScope, delay: float) -> None:
        await work_began.wait()
        await anyio.sleep(delay)
        scope.cancel()

    async with anyio.create_task_group() as tg:
        if op.target is not None:
            tg.start_soon(watch_temps, op.target.parent)
        with (
            observe_steps(on_step) if in_process else nullcontext(),
            anyio.fail_after(CALL_TIMEOUT),
            anyio.CancelScope() as scope,
        ):
            if when is not None and when.after_work:
                tg.start_soon(cancel_after_work, scope, when.delay)
            elif when is not None:
                scope.deadline = anyio.current_time() + when.delay
            result = await client.call_tool(op.tool, op.args, progress_callback=on_progress)
        tg.cancel_scope.cancel()

    cancelled = scope.cancelled_caught
    tag = "none" if when is None else f"{when.delay}-{when.after_work}"
    await follow_up(client, tag)  # the very next call on the session
    await barrier(client, op)
    assert temp_files(op.root) == [], f"temp files left after a cancel {when}"
    state = op.state()
    if not cancelled:
        assert result is not None
        op.check_completed(result)
    return Outcome(when, cancelled, state, notifications, temp_created)


async def cancel_series(client: Client, op: Op, *, in_process: bool) -> list[Outcome]:
    """An uncancelled call, every cancel of ``CANCELS``, and an uncancelled call again."""
    outcomes = [await cancel_once(client, op, None, in_process=in_process)]
    assert not outcomes[0].cancelled
    for when in CANCELS:
        outcomes.append(await cancel_once(client, op, when, in_process=in_process))
    landed = [o for o in outcomes if o.landed_mid_operation(op)]
    assert landed, f"no cancel landed in the middle of {op.tool}: {outcomes}"
    final = await cancel_once(client, op, None, in_process=in_process)
    assert not final.cancelled
    return outcomes


# -- cancellation -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", OPS)
async def test_cancel_in_memory_legacy(files: Path, kind: str) -> None:
    op = build_op(kind, files, IN_MEMORY)
    async with Client(memory_server(files), mode="legacy") as client:
        await cancel_series(client, op, in_process=True)


@stdio_asyncio_only
@pytest.mark.parametrize("kind", OPS)
async def test_cancel_over_stdio(files: Path, kind: str) -> None:
    op = build_op(kind, files, OVER_STDIO)
    async with stdio_client(files) as client:
        await cancel_series(client, op, in_process=False)


# -- the server's tool timeout ----------------------------------------------------------------


async def check_timed_out(client: Client, op: Op) -> None:
    op.reset()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        pass  # asking for progress, as hosts do, also makes the server's work longer

    with anyio.fail_after(CALL_TIMEOUT):
        result = await client.call_tool(op.tool, op.args, progress_callback=on_progress)
    message = text_of(result)
    assert result.is_error, f"{op.tool} finished within the {TOOL_TIMEOUT} s timeout: {message}"
    assert "timed out" in message
    assert "nothing was changed" in message
    # The handler unwound before answering, so the disk is final right away: no barrier.
    assert temp_files(op.root) == []
    assert op.state() in ("old", "unchanged")
    await follow_up(client, f"after-timeout-{op.tool}")
    assert temp_files(op.root) == []


@pytest.mark.parametrize("kind", OPS)
async def test_tool_timeout_in_memory_legacy(files: Path, kind: str) -> None:
    op = build_op(kind, files, TIMED_OUT)
    async with Client(memory_server(files, tool_timeout=TOOL_TIMEOUT), mode="legacy") as client:
        await check_timed_out(client, op)


@stdio_asyncio_only
async def test_tool_timeout_over_stdio(files: Path) -> None:
    ops = [build_op(kind, files, TIMED_OUT) for kind in OPS]
    async with stdio_client(files, "--tool-timeout", str(TOOL_TIMEOUT)) as client:
        for op in ops:
            await check_timed_out(client, op)


# -- progress ---------------------------------------------------------------------------------


async def check_write_progress(client: Client, root: Path, size: int) -> None:
    content = big_text(size)
    seen: list[tuple[float, float | None]] = []
    finished = anyio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total))
        if progress == size:
            finished.set()

    with anyio.fail_after(CALL_TIMEOUT):
        result = await client.call_tool(
            "write_file",
            {"path": "progress.txt", "content": content},
            progress_callback=on_progress,
        )
        assert not result.is_error, text_of(result)
        # Progress callbacks run in their own tasks: the last may trail the result a little.
        await finished.wait()
    assert len(seen) >= 1
    assert all(total == size for _, total in seen), seen[:3]
    done_values = [done for done, _ in seen]
    assert sorted(done_values) == sorted(set(done_values))
    assert max(done_values) == size
    assert (root / "progress.txt").read_bytes() == content.encode()


async def test_write_progress_in_memory_legacy(files: Path) -> None:
    async with Client(memory_server(files), mode="legacy") as client:
        await check_write_progress(client, files, IN_MEMORY.write)


@stdio_asyncio_only
async def test_write_progress_over_stdio(files: Path) -> None:
    async with stdio_client(files) as client:
        await check_write_progress(client, files, OVER_STDIO.write)


# -- the client going away mid-call -----------------------------------------------------------


def serve_processes(root: Path) -> list[int]:
    """Pids of live ``atomictools serve`` processes for ``root``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        zombie = any(line.startswith("State:") and "Z" in line for line in status.splitlines())
        ours = argv[1:4] == [b"-m", b"atomictools", b"serve"] and os.fsencode(root) in argv
        if ours and not zombie:  # (the shell wrapper below has other argv[1:4])
            pids.append(int(entry))
    return pids


@stdio_asyncio_only
async def test_stdin_closed_mid_write_stops_the_server(files: Path) -> None:
    """Raw JSON-RPC: close the server's stdin while a large write is running (no cancel sent)."""
    target = files / "big.txt"
    old = b"old content\n"
    target.write_bytes(old)
    content = big_text(OVER_STDIO.write)
    messages: list[dict[str, Any]] = []
    initialized, progressed = anyio.Event(), anyio.Event()

    process = await anyio.open_process([sys.executable, *serve_args(files)], stderr=None)
    assert process.stdin is not None
    assert process.stdout is not None
    stdout = process.stdout

    async def read_stdout() -> None:
        buffer = b""
        async for chunk in stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in filter(None, lines):
                message = json.loads(line)
                messages.append(message)
                if message.get("id") == 1:
                    initialized.set()
                if message.get("method") == "notifications/progress":
                    progressed.set()

    async def send(message: dict[str, Any]) -> None:
        assert process.stdin is not None
        await process.stdin.send(json.dumps({"jsonrpc": "2.0", **message}).encode() + b"\n")

    async with process, anyio.create_task_group() as tg:
        tg.start_soon(read_stdout)
        with anyio.fail_after(CALL_TIMEOUT):
            await send(
                {
                    "id": 1,
                    "method": "initialize",
                    "params": {
                        "protocolVersion": "2025-11-25",
                        "capabilities": {},
                        "clientInfo": {"name": "test", "version": "0"},
                    },
                }
            )
            await initialized.wait()
            await send({"method": "notifications/initialized"})
            await send(
                {
                    "id": 2,
                    "method": "tools/call",
                    "params": {
                        "name": "write_file",
                        "arguments": {"path": "big.txt", "content": content},
                        "_meta": {"progressToken": "write"},
                    },
                }
            )
            await progressed.wait()  # the write is under way
            await process.stdin.aclose()
            closed_at = time.perf_counter()
            returncode = await process.wait()
            exited_after = time.perf_counter() - closed_at

    assert returncode == 0
    assert exited_after < 5, f"the server took {exited_after:.2f} s to exit after stdin closed"
    assert temp_files(files) == []
    new = content.encode()
    state = target.read_bytes()
    assert state in (old, new), f"{len(state)} bytes: neither old nor new"
    answers = [m for m in messages if m.get("id") == 2]
    finished = any("result" in m and not m["result"].get("isError") for m in answers)
    # The disk agrees with what the server said (if it said anything): success means new.
    assert state == (new if finished else old), answers


@stdio_asyncio_only
async def test_client_exit_mid_call_stops_the_server(files: Path, tmp_path: Path) -> None:
    """Leave ``async with Client`` during a large write: the server must exit on its own."""
    target = files / "big.txt"
    old = b"old content\n"
    target.write_bytes(old)
    content = big_text(OVER_STDIO.write)
    # A shell records the server's own exit status. The SDK kills the server (and the shell)
    # only if it has not exited 2 s after stdin closed, so a recorded 0 means a clean exit.
    status_file = tmp_path / "server-exit-status"
    params = StdioServerParameters(
        command="/bin/sh",
        args=["-c", '"$@"; echo $? > "$STATUS_FILE"', "sh", sys.executable, *serve_args(files)],
        env={"STATUS_FILE": str(status_file), **(state_env() or {})},
    )
    pids: list[int] = []
    with anyio.fail_after(CALL_TIMEOUT), anyio.CancelScope() as leave:
        async with Client(params, mode="legacy") as client:
            pids = serve_processes(files)

            async def on_progress(
                progress: float, total: float | None, message: str | None
            ) -> None:
                leave.cancel()  # leave the client in the middle of the call

            await client.call_tool(
                "write_file",
                {"path": "big.txt", "content": content},
                progress_callback=on_progress,
            )
    assert leave.cancelled_caught, "the write finished before the client left"
    assert len(pids) == 1, pids
    # The SDK waited for the shell, which wrote the status before exiting.
    assert status_file.exists(), "the server was killed: it did not exit when stdin closed"
    assert status_file.read_text().strip() == "0"
    assert serve_processes(files) == []
    assert temp_files(files) == []
    assert target.read_bytes() in (old, content.encode())


def test_helpers_recognise_states(files: Path) -> None:
    """The state checks themselves: old, new, and a mix that must fail."""
    op = build_op("edit_file", files, Scale(write=MiB, edit=64 * 1024, copy=MiB))
    op.reset()
    assert op.state() == "old"
    assert op.target is not None
    op.target.write_bytes(op.new)
    assert op.state() == "new"
    op.target.write_bytes(op.old[:100])
    with pytest.raises(pytest.fail.Exception):
        op.state()
