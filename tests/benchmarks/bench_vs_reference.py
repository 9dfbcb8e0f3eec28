"""Side by side: atomictools against the reference MCP filesystem server and the raw POSIX loop.

    python tests/benchmarks/bench_vs_reference.py [--quick] [--seconds S] [--cancels N]
        [--cancel-write-mib N] [--stream-mib N] [--tree-files N] [--cache DIR] [--dir DIR]
        [--keep] [--strict]

The reference is ``@modelcontextprotocol/server-filesystem``, pinned in ``package.json`` +
``package-lock.json`` next to this file and installed into ``node_modules/`` here with ``npm ci``
when missing or stale. Every figure comes from the same run; one command prints four tables:

1. **Tool calls over stdio.** Three servers run side by side as real stdio subprocesses, each
   with its own root: the reference (``node .../server-filesystem/dist/index.js ROOT``),
   ``atomictools serve --durability fast`` and ``--durability full``. One Python client each
   (``mcp.Client(..., mode="legacy")``: both speak the 2025-11-25 handshake protocol), one call
   at a time, the same absolute paths and arguments for all: ``read_text_file`` of a 4 KiB file,
   ``write_file`` of 4 KiB and of 1 MiB over an existing file, and ``edit_file`` (one
   replacement in a 4 KiB file, toggled back and forth), plus ``list_allowed_directories`` as
   the floor of a call (no file work: what the SDK, transport and client cost). Next to them,
   in this process: the raw durable loop (``os.open(O_EXCL) + os.write + fsync + os.replace +
   fsync(dir)``), the same without fsyncs (the reference server's write is that: a temp file
   and a rename, no fsync), and ``Workspace.write`` with ``durability="full"``
   (``bench_write.py``'s loops, reused). All variants run interleaved in short blocks, the order
   rotating every round, until each has ``--seconds`` of measured time (after a warm-up block),
   so noise hits all of them alike.
   calls/s is calls per second of measured time (one call in flight: 1 / mean latency). The
   CPU time per call of the server (all threads, ``/proc/PID/task/*/schedstat``) and of this
   process is printed too: on a shared machine it says more about cost than latency does.
2. **Cancellation latency** against ``atomictools serve --durability full``, ``--cancels``
   times each. A ``write_file`` of ``--cancel-write-mib`` MiB is cancelled at a random moment
   while its temp file exists (a thread polls the directory every ``--poll-us`` microseconds);
   timed from the moment the client's transport takes ``notifications/cancelled`` (the SDK sends
   it when the scope around ``call_tool`` is cancelled) until the temp file is gone, until
   ``--cancels`` cancels have been timed; one that came too late (the rename had happened) is
   counted, not timed. A ``db_transaction`` (an INSERT, a ~30 ms statement, then one that
   would run for minutes) is cancelled once its first progress notification came and a
   separate sqlite3 connection, polling ``BEGIN IMMEDIATE``, has seen the write lock held;
   timed from ``notifications/cancelled`` until that connection gets the lock, where it checks
   that the INSERT is not there. ``--quick``: 50 cancels and 0.5 s per variant.
3. **Memory.** A small Python subprocess streams ``--stream-mib`` MiB through
   ``Workspace.atomic_writer`` in 1 MiB chunks (a fresh bytes object each) and reports its own
   VmHWM before and after (the growth is what the streaming costs). Then each server is started
   on a cached tree of ``--tree-files`` files (built once under ``--cache``) and asked for
   ``directory_tree`` of one top-level directory (about 5,000 entries) and of the whole tree;
   its VmHWM (/proc/PID/status) is read before and after each call. atomictools refuses trees
   over its ``max_tree_entries`` (10,000), so a diagnostic row runs the same CLI with the limit
   raised in the child process only (the package is not changed) to show what a full answer
   would cost it.
4. **Targets**, PASS/FAIL: fast mode at least as many calls/s as the reference for every tool;
   the engine's durable 4 KiB write (``Workspace.write``, in-process) within 1.3x of the raw
   durable loop (mean latency; the MCP full-mode ratio is printed beside it for information);
   cancellation p99 under 50 ms (both kinds); streaming VmHWM growth under 64 MiB.

Exit status 0 unless something failed to run (an error result, a server that died); with
``--strict`` also 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import anyio
import anyio.from_thread
import anyio.to_thread
from bench_write import api_writer, raw_writer
from benchstats import percentile
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import MCPDeprecationWarning
from mcp.shared.message import SessionMessage
from mcp.types import CallToolResult, TextContent

from atomictools import Workspace
from atomictools.engine.durable.tempfiles import is_temp_name

KiB = 1024
MiB = 1024 * KiB
HERE = Path(__file__).resolve().parent
NODE_MODULES = HERE / "node_modules"
REFERENCE_PACKAGE = NODE_MODULES / "@modelcontextprotocol" / "server-filesystem"
REFERENCE_JS = REFERENCE_PACKAGE / "dist" / "index.js"
STAMP = NODE_MODULES / ".atomictools-lock-sha256"
NPM_TIMEOUT = 600

BLOCK_SECONDS = 0.2
CALL_TIMEOUT = 120.0
WAIT_TIMEOUT = 10.0  # for a temp file to go, the write lock to be free, a server to answer
TARGET_RAW_RATIO = 1.3
TARGET_CANCEL_P99 = 0.050
TARGET_STREAM_GROWTH = 64 * MiB

REFERENCE, FAST, FULL = "reference", "atomictools fast", "atomictools full"
RAW_DURABLE, RAW_FAST, API_FULL = "raw durable loop", "raw fast loop", "Workspace.write full"
SERVERS = (REFERENCE, FAST, FULL)
IN_PROCESS = (RAW_DURABLE, RAW_FAST, API_FULL)

DB_NAME = "bench"
SLOW_STATEMENT = (
    "INSERT INTO heap(n) SELECT count(*) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL "
    "SELECT x + 1 FROM c WHERE x < 150000) SELECT x FROM c)"
)
"""About 30 ms of SQLite work: it ends the first batch, so progress is sent before LONG runs."""
LONG_STATEMENT = (
    "INSERT INTO heap(n) SELECT count(*) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL "
    "SELECT x + 1 FROM c WHERE x < 10000000000) SELECT x FROM c)"
)
"""Minutes of SQLite work: it is always running when the cancel comes."""

# Runs the real CLI with Limits.max_tree_entries raised, in the child process only (diagnostic).
UNCAPPED_WRAPPER = (
    "import functools, sys\n"
    "import atomictools.engine.workspace as workspace\n"
    "workspace.Limits = functools.partial(workspace.Limits, max_tree_entries=int(sys.argv[1]))\n"
    "from atomictools.cli.commands import main\n"
    "sys.exit(main(sys.argv[2:]))\n"
)

STREAM_CHILD = r"""
import json, os, sys, time
import anyio
from atomictools import Workspace

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)

async def main(directory, mib, state):
    ws = Workspace([directory], durability="full", state_dir=state)
    template = os.urandom(1 << 20)
    async with ws.atomic_writer("warm-up.bin") as w:  # imports, worker threads, code paths
        await w.write(template)
    before, rss_before = status("VmHWM"), status("VmRSS")
    started = time.perf_counter()
    async with ws.atomic_writer("stream.bin") as w:
        for i in range(mib):
            await w.write(i.to_bytes(8, "little") + template[8:])  # a new 1 MiB object each
    elapsed = time.perf_counter() - started
    print(json.dumps({
        "before": before, "rss_before": rss_before, "after": status("VmHWM"),
        "rss_after": status("VmRSS"), "seconds": elapsed, "written": w.size,
        "on_disk": os.stat(os.path.join(directory, "stream.bin")).st_size,
    }))

anyio.run(main, sys.argv[1], int(sys.argv[2]), sys.argv[3])
"""


# -- the reference server ----------------------------------------------------------------------


def ensure_reference() -> str:
    """``npm ci`` the pinned reference server if needed; returns its version and node's."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise SystemExit("this benchmark needs node and npm on PATH (for the reference server)")
    digest = hashlib.sha256((HERE / "package-lock.json").read_bytes()).hexdigest()
    if not STAMP.exists() or STAMP.read_text() != digest or not REFERENCE_JS.exists():
        print("installing the reference server with npm ci ...", flush=True)
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=HERE,
            check=True,
            timeout=NPM_TIMEOUT,
            stdout=sys.stderr,
        )
        STAMP.write_text(digest)
    version = json.loads((REFERENCE_PACKAGE / "package.json").read_text())["version"]
    node = subprocess.run(["node", "--version"], capture_output=True, text=True, check=True)
    return f"{version} (node {node.stdout.strip()})"


# -- servers and clients -----------------------------------------------------------------------


@dataclass
class Spec:
    label: str
    root: Path
    params: StdioServerParameters
    marker: str  # a string in the server's command line that no other child of ours has


def reference_spec(root: Path) -> Spec:
    params = StdioServerParameters(command="node", args=[str(REFERENCE_JS), str(root)])
    return Spec(REFERENCE, root, params, f"{REFERENCE_JS}\0{root}")


def atomictools_spec(
    label: str, root: Path, state: Path, durability: str, *extra: str, tree_limit: int = 0
) -> Spec:
    cli = ["serve", "--root", str(root), "--state-dir", str(state), "--durability", durability]
    cli += extra
    if tree_limit:
        args = ["-c", UNCAPPED_WRAPPER, str(tree_limit), *cli]
    else:
        args = ["-m", "atomictools", *cli]
    # This process's environment (the SDK passes only a few variables) from a neutral cwd (not
    # the checkout, which `-m` would put first on sys.path): PYTHONPATH picks the checkout.
    params = StdioServerParameters(
        command=sys.executable, args=args, env=dict(os.environ), cwd=tempfile.gettempdir()
    )
    return Spec(label, root, params, str(root))


@dataclass
class Stamps:
    cancel_sent: float | None = None


class StampingWriteStream:
    """The transport's write stream, noting when ``notifications/cancelled`` is handed over."""

    def __init__(self, inner: Any, stamps: Stamps) -> None:
        self._inner = inner
        self._stamps = stamps

    async def send(self, item: SessionMessage) -> None:
        await self._inner.send(item)
        if getattr(item.message, "method", None) == "notifications/cancelled":
            self._stamps.cancel_sent = time.perf_counter()

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> StampingWriteStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@asynccontextmanager
async def stamped_stdio(
    params: StdioServerParameters, errlog: TextIO, stamps: Stamps
) -> AsyncIterator[tuple[Any, Any]]:
    async with stdio_client(params, errlog) as (read_stream, write_stream):
        yield read_stream, StampingWriteStream(write_stream, stamps)


@dataclass
class Conn:
    spec: Spec
    client: Client
    pid: int
    stamps: Stamps

    def hwm(self) -> int:
        return vm_status(self.pid, "VmHWM")


def child_pid(marker: str) -> int:
    """The pid of our child process whose command line contains ``marker``."""
    me, wanted = os.getpid(), os.fsencode(marker)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == me and wanted in cmdline:
            return int(entry)
    raise RuntimeError(f"no child process with {marker!r} in its command line")


def vm_status(pid: int | str, field_name: str) -> int:
    """A /proc/PID/status size field (VmHWM, VmRSS) in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * KiB
    raise RuntimeError(f"no {field_name} in /proc/{pid}/status")


@asynccontextmanager
async def connect(spec: Spec, logs: Path) -> AsyncIterator[Conn]:
    stamps = Stamps()
    log_name = spec.label.replace(" ", "-")
    with open(logs / f"{log_name}.log", "a") as log:
        async with Client(stamped_stdio(spec.params, log, stamps), mode="legacy") as client:
            if client.protocol_version is None or client.protocol_version >= "2026":
                raise RuntimeError(f"{spec.label}: negotiated {client.protocol_version}")
            yield Conn(spec, client, child_pid(spec.marker), stamps)


def text_of(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


def reply_bytes(result: CallToolResult) -> int:
    structured = len(json.dumps(result.structured_content)) if result.structured_content else 0
    return len(text_of(result).encode()) + structured


async def call_ok(conn: Conn, tool: str, args: dict[str, Any]) -> CallToolResult:
    with anyio.fail_after(CALL_TIMEOUT):
        result = await conn.client.call_tool(tool, args)
    if result.is_error:
        raise RuntimeError(f"{conn.spec.label}: {tool} failed: {text_of(result)[:500]}")
    return result


# -- 1. tool calls over stdio ------------------------------------------------------------------

Op = Callable[[], Awaitable[None]]


@dataclass
class Variant:
    call: str  # the row group: "read_text_file", "write_file 4 KiB", ...
    impl: str  # one of SERVERS or IN_PROCESS
    op: Op
    pid: int | None = None  # the server process (None: in-process)
    samples: list[float] = field(default_factory=list)
    server_cpu: float = 0.0  # CPU seconds of the server in the measured blocks
    client_cpu: float = 0.0  # CPU seconds of this process in the measured blocks

    @property
    def measured(self) -> float:
        return sum(self.samples)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples)


def text_block(size: int, word: str) -> str:
    """``size`` bytes of numbered 64-byte lines (distinct lines, like source code)."""
    lines = (
        f"{word} line {i:07d} of the benchmark file".ljust(63, ".") + "\n"
        for i in range(size // 64 + 1)
    )
    return "".join(lines)[:size]


EDIT_A, EDIT_B = "edit marker AAAA", "edit marker BBBB"


def prepare_root(root: Path) -> None:
    root.mkdir(parents=True)
    (root / "read.txt").write_text(text_block(4 * KiB, "read"))
    (root / "write-4k.txt").write_text("old\n")
    (root / "write-1m.txt").write_text("old\n")
    half = text_block(2 * KiB, "edit")
    (root / "edit.txt").write_text(f"{half}{EDIT_A}\n{half}")


def mcp_ops(conn: Conn) -> dict[str, Op]:
    root = conn.spec.root
    small, large = text_block(4 * KiB, "small"), text_block(MiB, "large")
    state = {"edit": 0}

    def call(tool: str, args: Callable[[], dict[str, Any]]) -> Op:
        async def op() -> None:
            result = await conn.client.call_tool(tool, args())
            if result.is_error:
                raise RuntimeError(f"{conn.spec.label}: {tool} failed: {text_of(result)[:500]}")

        return op

    def edit_args() -> dict[str, Any]:
        state["edit"] ^= 1
        old, new = (EDIT_A, EDIT_B) if state["edit"] else (EDIT_B, EDIT_A)
        return {"path": str(root / "edit.txt"), "edits": [{"oldText": old, "newText": new}]}

    return {
        "list_allowed_dirs": call("list_allowed_directories", dict),
        "read_text_file": call("read_text_file", lambda: {"path": str(root / "read.txt")}),
        "write_file 4 KiB": call(
            "write_file", lambda: {"path": str(root / "write-4k.txt"), "content": small}
        ),
        "write_file 1 MiB": call(
            "write_file", lambda: {"path": str(root / "write-1m.txt"), "content": large}
        ),
        "edit_file": call("edit_file", edit_args),
    }


FLOOR = "list_allowed_dirs"
"""``list_allowed_directories``: no file system work, so the floor of a call (SDK, transport)."""
CALLS = (FLOOR, "read_text_file", "write_file 4 KiB", "write_file 1 MiB", "edit_file")
WRITE_SIZES = {"write_file 4 KiB": 4 * KiB, "write_file 1 MiB": MiB}


def in_process_variants(directory: Path, dir_fd: int) -> list[Variant]:
    workspace = Workspace([directory], durability="full", state_dir=directory.parent / "state")
    variants = []
    for call, size in WRITE_SIZES.items():
        data = text_block(size, "small" if size < MiB else "large").encode()
        tag = f"{size // KiB}k"
        variants += [
            Variant(call, RAW_DURABLE, raw_writer(dir_fd, f"raw-durable-{tag}.bin", data, True)),
            Variant(call, RAW_FAST, raw_writer(dir_fd, f"raw-fast-{tag}.bin", data, False)),
            Variant(call, API_FULL, api_writer(workspace, f"api-full-{tag}.bin", data)),
        ]
    return variants


def cpu_seconds(pid: int) -> float:
    """CPU time of all threads of ``pid`` so far (schedstat: nanoseconds, not 10 ms ticks)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, IndexError, ValueError):
            continue  # a thread that ended meanwhile
    return total / 1e9


async def run_block(variant: Variant, seconds: float, record: bool) -> None:
    clock = time.perf_counter
    server_before = cpu_seconds(variant.pid) if variant.pid else 0.0
    client_before = time.process_time()
    deadline = clock() + seconds
    while True:
        start = clock()
        await variant.op()
        end = clock()
        if record:
            variant.samples.append(end - start)
        if end >= deadline:
            break
    if record:
        variant.client_cpu += time.process_time() - client_before
        if variant.pid:
            variant.server_cpu += cpu_seconds(variant.pid) - server_before


async def measure(variants: list[Variant], seconds: float, warmup: float) -> None:
    for variant in variants:  # warm-up: caches, worker threads, JIT, the files exist
        await run_block(variant, warmup, record=False)
    rounds = 0
    while True:
        behind = [v for v in variants if v.measured < seconds]
        if not behind:
            return
        shift = rounds % len(behind)
        for variant in behind[shift:] + behind[:shift]:  # a different variant goes first
            await run_block(variant, min(BLOCK_SECONDS, seconds - variant.measured), record=True)
        rounds += 1


def throughput_table(variants: list[Variant]) -> None:
    by_key = {(v.call, v.impl): v for v in variants}
    header = (
        f"{'call':<19}{'implementation':<22}{'calls':>6}{'calls/s':>8}{'mean ms':>8}"
        f"{'p50 ms':>8}{'p99 ms':>8}{'vs ref':>7}{'vs raw loop':>15}{'CPU ms srv+cli':>16}"
    )
    print(header)
    print("-" * len(header))
    for call in CALLS:
        reference = by_key[(call, REFERENCE)]
        for impl in (*SERVERS, *IN_PROCESS):
            variant = by_key.get((call, impl))
            if variant is None:
                continue
            samples = sorted(variant.samples)
            versus_ref = f"{reference.mean / variant.mean:.2f}x" if impl in SERVERS else ""
            versus_raw = ""
            if call in WRITE_SIZES and impl not in (RAW_DURABLE, RAW_FAST):
                raw_impl = RAW_DURABLE if impl in (FULL, API_FULL) else RAW_FAST
                raw = by_key[(call, raw_impl)]
                kind = "durable" if raw_impl == RAW_DURABLE else "fast"
                versus_raw = f"{variant.mean / raw.mean:.2f}x {kind}"
            cpu = variant.client_cpu / len(samples) * 1e3
            cpu_text = f"{cpu:.2f}"
            if variant.pid:
                cpu_text = f"{variant.server_cpu / len(samples) * 1e3:.2f} + {cpu_text}"
            print(
                f"{call if impl == REFERENCE else '':<19}{impl:<22}{len(samples):>6}"
                f"{len(samples) / variant.measured:>8.0f}{variant.mean * 1e3:>8.2f}"
                f"{percentile(samples, 0.5) * 1e3:>8.2f}{percentile(samples, 0.99) * 1e3:>8.2f}"
                f"{versus_ref:>7}{versus_raw:>15}{cpu_text:>16}"
            )
    print(
        "\ncalls/s: one call in flight, so 1 / mean latency. vs ref: calls/s over the reference "
        "server's\n(higher is better). vs raw loop: mean latency over the in-process raw loop's: "
        "the durable loop\nfor full durability, the fast one (no fsync) for fast mode and the "
        "reference (which does not\nfsync). MCP rows include the stdio round-trip and the Python "
        "client; raw loop and Workspace.write\nrows run in this process, without MCP. CPU ms "
        "srv+cli: CPU time per call of the server process\n(all its threads, from "
        "/proc/PID/task/*/schedstat) + of this process (the client, or the loop).\n"
        f"{FLOOR}: list_allowed_directories, which touches no file: the floor of a call on "
        "each server\n(SDK, transport, client), not one of the targets.\n"
    )


# -- 2. cancellation ---------------------------------------------------------------------------


@dataclass
class CancelSeries:
    label: str
    latencies: list[float] = field(default_factory=list)  # seconds, for cancels that landed
    too_late: int = 0  # the call had finished (or committed) before the cancel reached it
    errors: list[str] = field(default_factory=list)
    note: str = ""


class TempWatcher:
    """A thread that finds our temp file in ``directory``, then polls until it is gone."""

    def __init__(self, directory: Path, poll: float) -> None:
        self.directory = directory
        self.poll = poll
        self.stop = threading.Event()
        self.appeared_at: float | None = None
        self.gone_at: float | None = None

    def watch(self, appeared: anyio.Event) -> None:
        clock, sleep, poll = time.perf_counter, time.sleep, self.poll
        name = None
        while name is None:
            if self.stop.is_set():
                return
            name = next((n for n in os.listdir(self.directory) if is_temp_name(n)), None)
            if name is None:
                sleep(poll)
        self.appeared_at = clock()
        anyio.from_thread.run_sync(appeared.set)
        path = os.path.join(self.directory, name)
        while not self.stop.is_set():
            try:
                os.lstat(path)
            except FileNotFoundError:
                self.gone_at = clock()
                return
            sleep(poll)


async def write_round(
    conn: Conn, target: Path, content: str, old: bytes, delay: float | None, poll: float
) -> tuple[str, float]:
    """One write_file, cancelled ``delay`` s after its temp appeared (None: not cancelled).

    Returns ("landed", cancel-to-temp-gone), ("too late", 0) or ("done", temp lifetime).
    """
    target.write_bytes(old)
    conn.stamps.cancel_sent = None
    watcher = TempWatcher(target.parent, poll)
    appeared, watched = anyio.Event(), anyio.Event()
    scope = anyio.CancelScope()

    async def watch() -> None:
        try:
            await anyio.to_thread.run_sync(watcher.watch, appeared)
        finally:
            watched.set()

    async def call() -> None:
        with scope:
            await conn.client.call_tool("write_file", {"path": str(target), "content": content})

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            tg.start_soon(call)
            with anyio.fail_after(CALL_TIMEOUT):
                await appeared.wait()
            if delay is not None:
                await anyio.sleep(delay)
                scope.cancel()
            with anyio.move_on_after(WAIT_TIMEOUT):
                await watched.wait()
    finally:
        watcher.stop.set()
    if watcher.gone_at is None or watcher.appeared_at is None:
        raise RuntimeError(f"the temp file of {target.name} was not removed within {WAIT_TIMEOUT}s")
    # A barrier: the server serialises changes to one file, so once this answers, the write
    # above has fully unwound and the disk is final.
    refused = await conn.client.call_tool(
        "write_file", {"path": str(target), "content": "", "createOnly": True}
    )
    if not refused.is_error or "already exists" not in text_of(refused):
        raise RuntimeError(f"the barrier write did not fail as expected: {text_of(refused)}")
    if any(is_temp_name(n) for n in os.listdir(target.parent)):
        raise RuntimeError("a temp file is left after a cancelled write_file")
    now = target.read_bytes()
    if now == old:
        if delay is None:
            raise RuntimeError("an uncancelled write_file left the old content")
        sent = conn.stamps.cancel_sent
        if sent is None:
            raise RuntimeError("the cancelled write_file left the old content, but no cancel sent")
        return "landed", watcher.gone_at - sent
    if len(now) != len(content) or now != content.encode():
        raise RuntimeError(f"{target.name} holds neither the old nor the new content")
    if delay is None:
        return "done", watcher.gone_at - watcher.appeared_at
    return "too late", 0.0


async def cancel_writes(
    conn: Conn, count: int, size: int, poll: float, rng: random.Random
) -> CancelSeries:
    target = conn.spec.root / "cancel-target.txt"
    old = b"old content\n"
    content = text_block(size, "cancelled")
    lifetimes = [(await write_round(conn, target, content, old, None, poll))[1] for _ in range(3)]
    window = min(lifetimes)
    series = CancelSeries(f"write_file {size // MiB} MiB: cancel -> temp file gone")
    series.note = (
        f"uncancelled, the temp file lives {window * 1e3:.1f} ms (min of 3: writing + fsync); "
        f"cancels come 0..{0.9 * window * 1e3:.1f} ms after it appeared"
    )
    while len(series.latencies) < count:  # ``count`` timed cancels; late ones are extra
        if series.too_late > 2 * count:
            raise RuntimeError(f"{series.too_late} cancels came too late: the write is too short")
        outcome, latency = await write_round(
            conn, target, content, old, rng.uniform(0, 0.9 * window), poll
        )
        if outcome == "landed":
            series.latencies.append(latency)
        else:
            series.too_late += 1
    return series


def lock_poller(
    db_path: Path, tag: str, poll: float, stop: threading.Event, busy: anyio.Event
) -> tuple[float, int]:
    """Try ``BEGIN IMMEDIATE`` until it succeeds: (when, rows with ``tag`` then).

    Sets ``busy`` (from this worker thread) the first time the lock is found held.
    """
    conn = sqlite3.connect(db_path, timeout=0, isolation_level=None, check_same_thread=False)
    seen_busy = False
    try:
        while not stop.is_set():
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as err:
                if getattr(err, "sqlite_errorcode", None) != sqlite3.SQLITE_BUSY:
                    raise
                if not seen_busy:
                    seen_busy = True
                    anyio.from_thread.run_sync(busy.set)
                time.sleep(poll)
                continue
            free_at = time.perf_counter()
            rows = conn.execute("SELECT count(*) FROM marks WHERE tag = ?", (tag,)).fetchone()[0]
            conn.execute("ROLLBACK")
            if not seen_busy:
                raise RuntimeError("the write lock was free while the transaction should hold it")
            return free_at, rows
        raise TimeoutError("the write lock was never free")
    finally:
        conn.close()


async def db_round(conn: Conn, db_path: Path, index: int, delay: float, poll: float) -> float:
    """One db_transaction, cancelled ``delay`` s after the poller saw it hold the write lock."""
    tag = f"round-{index}"
    statements = [
        {"sql": "INSERT INTO marks(tag) VALUES (?)", "params": [tag]},
        {"sql": SLOW_STATEMENT},
        {"sql": LONG_STATEMENT},
    ]
    conn.stamps.cancel_sent = None
    progressed, busy, polled = anyio.Event(), anyio.Event(), anyio.Event()
    scope = anyio.CancelScope()
    stop = threading.Event()
    outcome: list[tuple[float, int]] = []
    answered: list[CallToolResult] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        progressed.set()

    async def call() -> None:
        with scope:
            answered.append(
                await conn.client.call_tool(
                    "db_transaction",
                    {"database": DB_NAME, "statements": statements},
                    progress_callback=on_progress,
                )
            )

    async def poll_lock() -> None:
        try:
            outcome.append(
                await anyio.to_thread.run_sync(lock_poller, db_path, tag, poll, stop, busy)
            )
        finally:
            polled.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            with anyio.fail_after(CALL_TIMEOUT):
                await progressed.wait()  # statement 2 of 3 is done: the long one runs
            tg.start_soon(poll_lock)
            with anyio.fail_after(WAIT_TIMEOUT):
                await busy.wait()
            await anyio.sleep(delay)
            scope.cancel()
            with anyio.move_on_after(WAIT_TIMEOUT):
                await polled.wait()
    finally:
        stop.set()
    if answered:
        raise RuntimeError(f"db_transaction was answered, not cancelled: {text_of(answered[0])}")
    if not outcome:
        raise RuntimeError(f"the write lock was not free {WAIT_TIMEOUT}s after the cancel")
    free_at, rows = outcome[0]
    if rows:
        raise RuntimeError("the cancelled transaction's INSERT was committed")
    if conn.stamps.cancel_sent is None:
        raise RuntimeError("no notifications/cancelled was sent")
    return free_at - conn.stamps.cancel_sent


async def cancel_transactions(
    conn: Conn, db_path: Path, count: int, poll: float, rng: random.Random
) -> CancelSeries:
    await call_ok(
        conn,
        "db_transaction",
        {
            "database": DB_NAME,
            "statements": [
                {"sql": "CREATE TABLE IF NOT EXISTS marks(id INTEGER PRIMARY KEY, tag TEXT)"},
                {"sql": "CREATE TABLE IF NOT EXISTS heap(n INTEGER)"},
            ],
        },
    )
    series = CancelSeries("db_transaction: cancel -> rolled back, write lock free")
    series.note = (
        "INSERT, a ~30 ms statement, then one of minutes; cancelled 0..2 ms after the lock "
        "poller saw the\n    write lock held, once the first progress notification came "
        "(the long statement runs)"
    )
    for i in range(count):
        series.latencies.append(await db_round(conn, db_path, i, rng.uniform(0, 0.002), poll))
    return series


def cancel_table(series_list: list[CancelSeries], poll: float) -> None:
    header = (
        f"{'cancellation (atomictools full)':<56}{'timed':>6}{'late':>6}{'p50 ms':>8}"
        f"{'p99 ms':>8}{'max ms':>8}"
    )
    print(header)
    print("-" * len(header))
    for s in series_list:
        ordered = sorted(s.latencies)
        print(
            f"{s.label:<56}{len(ordered):>6}{s.too_late:>6}{percentile(ordered, 0.5) * 1e3:>8.2f}"
            f"{percentile(ordered, 0.99) * 1e3:>8.2f}{ordered[-1] * 1e3:>8.2f}"
        )
    print(
        "\ntimed from the moment the client's stdio transport took notifications/cancelled; "
        f"the file system\nand the lock polled every {poll * 1e6:.0f} us from a thread. "
        "late: the rename had happened before the cancel\narrived (the write was complete; "
        "not timed)."
    )
    for s in series_list:
        print(f"  {s.label.split(':')[0]}: {s.note}")
    print()


# -- 3. memory ---------------------------------------------------------------------------------


def stream_memory(directory: Path, mib: int, state: Path) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-c", STREAM_CHILD, str(directory), str(mib), str(state)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the streaming child failed: {done.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(done.stdout)
    if report["on_disk"] != mib * MiB or report["written"] != mib * MiB:
        raise RuntimeError(f"the streamed file has {report['on_disk']} bytes, not {mib} MiB")
    return report


@dataclass
class TreeShape:
    top: int
    sub: int
    per: int

    @property
    def files(self) -> int:
        return self.top * self.sub * self.per

    @property
    def entries(self) -> int:
        return self.files + self.top * self.sub + self.top

    @property
    def subtree_entries(self) -> int:
        return self.sub * self.per + self.sub


def tree_shape(files: int) -> TreeShape:
    top, sub = 20, 50
    return TreeShape(top, sub, max(1, -(-files // (top * sub))))


def build_tree(cache: Path, shape: TreeShape) -> Path:
    root = cache / f"tree-{shape.top}x{shape.sub}x{shape.per}"
    marker = root / ".complete"
    if marker.exists():
        return root / "tree"
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    print(f"building {shape.files:,} files under {root} (once, cached) ...", flush=True)
    for t in range(shape.top):
        for s in range(shape.sub):
            directory = root / "tree" / f"t{t:02d}" / f"s{s:02d}"
            directory.mkdir(parents=True)
            for f in range(shape.per):
                (directory / f"f{f:03d}.txt").write_bytes(b"x" * (32 + f % 64))
    marker.write_text(json.dumps({"files": shape.files}))
    print(f"built in {time.perf_counter() - started:.1f}s\n", flush=True)
    return root / "tree"


@dataclass
class TreeRow:
    label: str
    idle: int  # VmHWM after the first call
    calls: list[tuple[str, int, float, str]] = field(default_factory=list)
    """(what, VmHWM after, seconds, outcome)"""


async def tree_memory(spec: Spec, tree: Path, shape: TreeShape, logs: Path) -> TreeRow:
    async with connect(spec, logs) as conn:
        await call_ok(conn, "list_allowed_directories", {})
        row = TreeRow(spec.label, conn.hwm())
        for what, path, expected in (
            ("1 top dir", tree / "t00", shape.subtree_entries),
            ("whole tree", tree, shape.entries),
        ):
            started = time.perf_counter()
            with anyio.fail_after(CALL_TIMEOUT):
                result = await conn.client.call_tool("directory_tree", {"path": str(path)})
            elapsed = time.perf_counter() - started
            if result.is_error:
                message = text_of(result)
                if "more than" not in message:
                    raise RuntimeError(f"{spec.label}: directory_tree failed: {message[:300]}")
                outcome = "refused: " + message[message.index("more than") :].split(";")[0]
            else:
                size = reply_bytes(result)
                outcome = f"{expected:,} entries, {size / MiB:.1f} MiB reply"
            row.calls.append((what, conn.hwm(), elapsed, outcome))
        return row


def memory_tables(
    stream: dict[str, Any], mib: int, idle: list[tuple[str, int]], trees: list[TreeRow]
) -> None:
    growth = stream["after"] - stream["before"]
    print(
        f"streaming {mib} MiB through Workspace.atomic_writer (1 MiB chunks, durability full) in "
        f"a child process:\nVmHWM {stream['before'] / MiB:.1f} MiB before, "
        f"{stream['after'] / MiB:.1f} MiB after: growth {growth / MiB:.1f} MiB "
        f"(VmRSS {stream['rss_before'] / MiB:.1f} -> {stream['rss_after'] / MiB:.1f} MiB); "
        f"{mib / stream['seconds']:.0f} MiB/s\n"
    )
    print(
        "server VmHWM after the tool-call rounds: "
        + ", ".join(f"{k} {v / MiB:.1f} MiB" for k, v in idle)
    )
    print()
    header = (
        f"{'directory_tree':<38}{'call':<12}{'VmHWM idle':>11}{'VmHWM after':>12}"
        f"{'seconds':>9}  outcome"
    )
    print(header)
    print("-" * (len(header) + 40))
    for row in trees:
        for i, (what, hwm, seconds, outcome) in enumerate(row.calls):
            label, idle_text = (row.label, f"{row.idle / MiB:.1f} MiB") if i == 0 else ("", "")
            print(
                f"{label:<38}{what:<12}{idle_text:>11}{hwm / MiB:>8.1f} MiB{seconds:>9.2f}  "
                f"{outcome}"
            )
    print(
        "\nVmHWM is the peak resident set since the process started (it never goes down), read "
        "from\n/proc/PID/status after the first call (idle) and after each directory_tree call."
    )
    print()


# -- main --------------------------------------------------------------------------------------


@dataclass
class Results:
    variants: list[Variant]
    cancels: list[CancelSeries]
    stream: dict[str, Any]
    idle: list[tuple[str, int]]
    trees: list[TreeRow]


async def run_all(args: argparse.Namespace, base: Path) -> Results:
    logs, state = base / "logs", base / "state"
    logs.mkdir()
    roots = {label: base / label.replace(" ", "-") for label in SERVERS}
    for root in roots.values():
        prepare_root(root)
    specs = [
        reference_spec(roots[REFERENCE]),
        atomictools_spec(FAST, roots[FAST], state, "fast"),
        atomictools_spec(FULL, roots[FULL], state, "full"),
    ]
    inproc = base / "in-process"
    inproc.mkdir()
    rng = random.Random(args.seed)

    # 1. tool calls, interleaved with the in-process loops
    print("1/3 tool calls over stdio and the raw loops, interleaved ...", flush=True)
    phase = time.perf_counter()
    async with (
        connect(specs[0], logs) as ref,
        connect(specs[1], logs) as fast,
        connect(specs[2], logs) as full,
    ):
        conns = [ref, fast, full]
        variants = [
            Variant(call, conn.spec.label, op, conn.pid)
            for conn in conns
            for call, op in mcp_ops(conn).items()
        ]
        dir_fd = os.open(inproc, os.O_RDONLY | os.O_DIRECTORY)
        try:
            variants += in_process_variants(inproc, dir_fd)
            await measure(variants, args.seconds, args.warmup)
        finally:
            os.close(dir_fd)
        idle = [(conn.spec.label, conn.hwm()) for conn in conns]

    # 2. cancellation
    print(f"    done in {time.perf_counter() - phase:.0f}s\n2/3 cancellation ...", flush=True)
    phase = time.perf_counter()
    cancel_root = base / "cancel-root"
    cancel_root.mkdir()
    db_path = base / "cancel.db"
    cancel_spec = atomictools_spec(FULL, cancel_root, state, "full", "--db", f"{DB_NAME}={db_path}")
    switch = sys.getswitchinterval()
    sys.setswitchinterval(0.0002)  # the polling threads get the GIL back quickly
    try:
        async with connect(cancel_spec, logs) as conn:
            poll = args.poll_us / 1e6
            write_series = await cancel_writes(
                conn, args.cancels, args.cancel_write_mib * MiB, poll, rng
            )
            db_series = await cancel_transactions(conn, db_path, args.cancels, poll, rng)
    finally:
        sys.setswitchinterval(switch)

    # 3. memory
    print(f"    done in {time.perf_counter() - phase:.0f}s\n3/3 memory ...", flush=True)
    phase = time.perf_counter()
    stream = await anyio.to_thread.run_sync(stream_memory, base / "stream", args.stream_mib, state)
    shape = tree_shape(args.tree_files)
    tree = build_tree(args.cache, shape)
    tree_specs = [
        reference_spec(tree),
        atomictools_spec(FULL, tree, state, "full", "--read-only"),
        atomictools_spec(
            f"{FULL} (tree limit raised)",
            tree,
            state,
            "full",
            "--read-only",
            tree_limit=2 * shape.entries,
        ),
    ]
    trees = [await tree_memory(spec, tree, shape, logs) for spec in tree_specs]
    print(f"    done in {time.perf_counter() - phase:.0f}s", flush=True)
    return Results(variants, [write_series, db_series], stream, idle, trees)


def verdicts(results: Results, args: argparse.Namespace) -> bool:
    by_key = {(v.call, v.impl): v for v in results.variants}
    lines: list[tuple[bool, str]] = []
    for call in CALLS[1:]:  # the tools of the target, not the floor
        ref, fast = by_key[(call, REFERENCE)], by_key[(call, FAST)]
        ratio = ref.mean / fast.mean
        lines.append(
            (
                ratio >= 1.0,
                f"fast mode {call}: {1 / fast.mean:.0f} calls/s vs the reference's "
                f"{1 / ref.mean:.0f} ({ratio:.2f}x; target >= 1.00x)",
            )
        )
    call = "write_file 4 KiB"
    raw, api, mcp_full = by_key[(call, RAW_DURABLE)], by_key[(call, API_FULL)], by_key[(call, FULL)]
    ratio = api.mean / raw.mean
    api_p50, raw_p50 = percentile(sorted(api.samples), 0.5), percentile(sorted(raw.samples), 0.5)
    lines.append(
        (
            ratio <= TARGET_RAW_RATIO,
            f"engine durable 4 KiB write: Workspace.write(durability='full') mean latency is "
            f"{ratio:.2f}x the raw durable loop's (target <= {TARGET_RAW_RATIO}x; this is the "
            f"verdict;\n      p50 {api_p50 * 1e3:.3f} vs {raw_p50 * 1e3:.3f} ms, "
            f"{api_p50 / raw_p50:.2f}x)\n      for information, not the verdict: MCP "
            f"write_file 4 KiB in full mode is {mcp_full.mean / raw.mean:.2f}x the raw loop "
            f"({mcp_full.mean * 1e3:.3f} vs {raw.mean * 1e3:.3f} ms: the stdio round-trip and "
            "the client are in it)",
        )
    )
    for series in results.cancels:
        p99 = percentile(sorted(series.latencies), 0.99)
        lines.append(
            (
                p99 < TARGET_CANCEL_P99,
                f"cancellation p99, {series.label}: {p99 * 1e3:.2f} ms over "
                f"{len(series.latencies)} cancels (target < {TARGET_CANCEL_P99 * 1e3:.0f} ms)",
            )
        )
    growth = results.stream["after"] - results.stream["before"]
    lines.append(
        (
            growth < TARGET_STREAM_GROWTH,
            f"streaming {args.stream_mib} MiB: VmHWM growth {growth / MiB:.1f} MiB "
            f"(target < {TARGET_STREAM_GROWTH // MiB} MiB)",
        )
    )
    for passed, text in lines:
        print(f"{'PASS' if passed else 'FAIL'}: {text}")
    return all(passed for passed, _ in lines)


def loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run: fewer seconds, cancels")
    parser.add_argument("--seconds", type=float, help="measured time per variant (default 2.0)")
    parser.add_argument("--warmup", type=float, help="warm-up time per variant (default 0.3)")
    parser.add_argument("--cancels", type=int, help="cancels of each kind (default 200)")
    parser.add_argument("--cancel-write-mib", type=int, default=16, help="size of the write")
    parser.add_argument("--poll-us", type=float, default=100.0, help="polling interval (us)")
    parser.add_argument("--stream-mib", type=int, default=200, help="size of the streamed file")
    parser.add_argument("--tree-files", type=int, default=100_000, help="files in the tree")
    parser.add_argument("--cache", type=Path, help="where the tree is cached (default: temp dir)")
    parser.add_argument("--dir", type=Path, help="where the temp dir goes (default: the system's)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the cancel delays")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (roots, logs)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    quick = args.quick
    if args.seconds is None:
        args.seconds = 0.5 if quick else 2.0
    if args.warmup is None:
        args.warmup = 0.1 if quick else 0.3
    if args.cancels is None:
        args.cancels = 50 if quick else 200
    if args.cancels < 1 or args.seconds <= 0 or args.stream_mib < 1 or args.tree_files < 1:
        parser.error("need --cancels >= 1, --seconds > 0, --stream-mib >= 1, --tree-files >= 1")
    args.cache = (args.cache or Path(tempfile.gettempdir())) / "atomictools-bench-vs-reference"
    warnings.simplefilter("ignore", MCPDeprecationWarning)

    ref_version = ensure_reference()
    load_before = loadavg()
    base = Path(tempfile.mkdtemp(prefix="atomictools-vs-ref-", dir=args.dir))
    started = time.perf_counter()
    ok = False
    try:
        results = anyio.run(run_all, args, base)
        ok = True
    finally:
        if ok and not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"kept {base} (roots, state, server logs in logs/)")
    print(
        f"\natomictools vs @modelcontextprotocol/server-filesystem {ref_version}: python "
        f"{sys.version.split()[0]}, {os.cpu_count()} cpus, loadavg {load_before} at the start, "
        f"{loadavg()} at the end;\n{args.seconds:g}s measured per variant, {args.cancels} "
        f"cancels of each kind, total {time.perf_counter() - started:.0f}s\n"
    )
    throughput_table(results.variants)
    cancel_table(results.cancels, args.poll_us / 1e6)
    memory_tables(results.stream, args.stream_mib, results.idle, results.trees)
    met = verdicts(results, args)
    return 1 if args.strict and not met else 0


if __name__ == "__main__":
    sys.exit(main())
