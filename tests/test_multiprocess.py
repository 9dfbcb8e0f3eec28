"""Several processes changing the same files: no lost update, no torn file (DESIGN 7).

* ``test_servers_on_one_root_lose_no_update``: 2 or 4 real ``atomictools serve`` processes on
  one root (one shared state directory), each driven by its own MCP client over stdio, hammer
  three counter files in two directories with read-modify-write: ``read_text_file``, parse the
  integer, then ``write_file``, ``edit_file`` or ``apply_changes`` (two counters at once) with
  the ``expectedSha256`` of the read. A mismatch is a conflict (counted; the next attempt reads
  again). Every read must be a complete integer, each value a counter took must have been
  written by exactly one successful increment (a lost update would show as two successful
  increments writing the same value), and there must have been conflicts, or the run proved
  nothing about concurrency.
* ``test_dead_holder_releases_the_directory_lock``: a child process
  (``tests/lock_holder_child.py``) holds ``atomic_writer("dir/f.txt")`` open; a write to
  ``dir/g.txt`` from this process must wait (same directory) while a write elsewhere must not;
  after SIGKILL of the child the kernel drops its lock and the write goes through.

``ATOMICTOOLS_MULTIPROCESS_SEED`` replays the choices of a run.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import re
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp.types import CallToolResult, TextContent

from atomictools import Workspace
from atomictools.engine.durable.tempfiles import temp_owner_pid
from tests.conftest import SummaryReport, summary_report, temp_files

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs POSIX processes"),
]

SEED = int(
    os.environ.get("ATOMICTOOLS_MULTIPROCESS_SEED", str(random.SystemRandom().getrandbits(32)))
)
COUNTERS = ("a/c0.txt", "a/c1.txt", "b/c2.txt")
ATTEMPTS = {2: 120, 4: 60}
"""Read-modify-write attempts per server process, by number of processes (~240 in all)."""
RUN_TIMEOUT = 120  # a deadlock or a hung server fails the test instead of hanging the run
CONFLICT = "changed since it was read"
INTEGER = re.compile(r"(0|[1-9][0-9]*)\n")
CHILD = Path(__file__).with_name("lock_holder_child.py")


@pytest.fixture(scope="module")
def report(pytestconfig: pytest.Config) -> SummaryReport:
    return summary_report(pytestconfig, "multiprocess")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def text_of(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


# -- many servers, one root ---------------------------------------------------------------------


@dataclass
class Tally:
    """What the clients saw, all processes together."""

    written: dict[str, list[int]] = field(default_factory=lambda: {c: [] for c in COUNTERS})
    """Per counter, the value each successful increment wrote."""
    attempts: Counter[str] = field(default_factory=Counter)
    successes: Counter[str] = field(default_factory=Counter)
    conflicts: Counter[str] = field(default_factory=Counter)
    reads: int = 0
    bad_reads: list[str] = field(default_factory=list)
    """Reads that were not exactly one integer, or whose sha256 did not match their content."""
    went_back: list[str] = field(default_factory=list)
    """A client read a smaller value than it had read before from the same counter."""
    errors: list[str] = field(default_factory=list)
    """Errors other than a conflict."""


class Worker:
    """One client, talking to its own server process."""

    def __init__(self, index: int, client: Client, tally: Tally) -> None:
        self.index = index
        self.client = client
        self.tally = tally
        self.rng = random.Random(f"{SEED}-{index}")
        self.last_seen = dict.fromkeys(COUNTERS, 0)

    async def read(self, path: str) -> tuple[int, str] | None:
        result = await self.client.call_tool("read_text_file", {"path": path})
        self.tally.reads += 1
        content = result.structured_content
        if result.is_error or not isinstance(content, dict):
            self.tally.errors.append(f"read {path}: {text_of(result)}")
            return None
        text = content["content"]
        if not INTEGER.fullmatch(text) or content["sha256"] != sha(text.encode()):
            self.tally.bad_reads.append(f"{path}: {text!r} sha256 {content['sha256']}")
            return None
        value = int(text)
        if value < self.last_seen[path]:
            self.tally.went_back.append(f"{path}: {self.last_seen[path]} then {value}")
        self.last_seen[path] = value
        return value, content["sha256"]

    def settle(self, kind: str, result: CallToolResult, increments: dict[str, int]) -> None:
        self.tally.attempts[kind] += 1
        if not result.is_error:
            self.tally.successes[kind] += 1
            for path, value in increments.items():
                self.tally.written[path].append(value)
        elif CONFLICT in text_of(result):
            self.tally.conflicts[kind] += 1
        else:
            self.tally.errors.append(f"{kind} {increments}: {text_of(result)}")

    async def attempt(self) -> None:
        kind = self.rng.choice(("write", "write", "edit", "apply"))
        if kind == "apply":
            paths = sorted(self.rng.sample(COUNTERS, 2))
        else:
            paths = [self.rng.choice(COUNTERS)]
        seen = {}
        for path in paths:
            read = await self.read(path)
            if read is None:
                return
            seen[path] = read
        increments = {path: value + 1 for path, (value, _) in seen.items()}
        if kind == "write":
            ((path, (value, digest)),) = seen.items()
            args: dict[str, Any] = {
                "path": path,
                "content": f"{value + 1}\n",
                "expectedSha256": digest,
            }
            result = await self.client.call_tool("write_file", args)
        elif kind == "edit":
            ((path, (value, digest)),) = seen.items()
            args = {
                "path": path,
                "edits": [{"oldText": f"{value}\n", "newText": f"{value + 1}\n"}],
                "expectedSha256": digest,
            }
            result = await self.client.call_tool("edit_file", args)
        else:
            changes: list[dict[str, Any]] = []
            for n, (path, (value, digest)) in enumerate(seen.items()):
                if n % 2 == 0:
                    changes.append(
                        {
                            "op": "write",
                            "path": path,
                            "content": f"{value + 1}\n",
                            "expectedSha256": digest,
                        }
                    )
                else:
                    changes.append(
                        {
                            "op": "edit",
                            "path": path,
                            "edits": [{"oldText": f"{value}\n", "newText": f"{value + 1}\n"}],
                            "expectedSha256": digest,
                        }
                    )
            result = await self.client.call_tool("apply_changes", {"changes": changes})
        self.settle(kind, result, increments)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("processes", sorted(ATTEMPTS))
async def test_servers_on_one_root_lose_no_update(
    processes: int, root: Path, private_state_dir: Path, report: SummaryReport
) -> None:
    for path in COUNTERS:
        (root / path).parent.mkdir(exist_ok=True)
        (root / path).write_text("0\n")
    state = str(private_state_dir)  # one state directory for all, as on one machine
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "atomictools", "serve", "--root", str(root), "--state-dir", state],
    )
    tally = Tally()
    connected = 0
    all_connected = anyio.Event()
    started = anyio.current_time()

    async def run(index: int) -> None:
        nonlocal connected
        async with Client(params, mode="legacy") as client:
            worker = Worker(index, client, tally)
            # A barrier: every server is up before anyone starts, so they really overlap.
            connected += 1
            if connected == processes:
                all_connected.set()
            await all_connected.wait()
            for _ in range(ATTEMPTS[processes]):
                await worker.attempt()

    with anyio.fail_after(RUN_TIMEOUT):
        async with anyio.create_task_group() as tg:
            for index in range(processes):
                tg.start_soon(run, index)
    elapsed = anyio.current_time() - started

    final = {path: (root / path).read_text() for path in COUNTERS}
    report.add(
        f"{processes} servers: attempts {dict(tally.attempts)} successes "
        f"{dict(tally.successes)} conflicts {dict(tally.conflicts)} reads {tally.reads} "
        f"final {[int(v) for v in final.values() if INTEGER.fullmatch(v)]} "
        f"seed={SEED} time={elapsed:.1f}s"
    )
    assert tally.errors == []
    assert tally.bad_reads == []
    assert tally.went_back == []
    for path in COUNTERS:
        assert INTEGER.fullmatch(final[path]), f"{path} is torn: {final[path]!r}"
    # Two successful increments that wrote the same value: one of them overwrote the other.
    lost = {
        path: sorted(value for value, n in Counter(written).items() if n > 1)
        for path, written in tally.written.items()
    }
    lost = {path: values for path, values in lost.items() if values}
    assert lost == {}, f"lost updates, values written twice: {lost}"
    for path, written in tally.written.items():
        assert int(final[path]) == len(written), f"{path}: {final[path]!r}, {len(written)} incs"
        assert sorted(written) == list(range(1, len(written) + 1)), path
    assert sum(tally.attempts.values()) == processes * ATTEMPTS[processes]
    assert sum(tally.conflicts.values()) > 0, "no conflict: the processes never overlapped"
    assert sum(tally.successes.values()) > 0
    assert temp_files(root) == []
    # The history has every successful change exactly once, in the order they committed:
    # each counter's entries, by sequence, step 0 -> 1 -> 2 ... with no gap and no repeat.
    history = Workspace([root], state_dir=private_state_dir)
    entries = sorted(await history.history_entries(limit=None), key=lambda e: e.seq)
    assert len(entries) == sum(tally.successes.values())
    for path in COUNTERS:
        steps = [
            (row.before_sha256, row.after_sha256)
            for entry in entries
            for row in entry.paths
            if row.path == path
        ]
        values = range(int(final[path]))
        assert steps == [(sha(f"{k}\n".encode()), sha(f"{k + 1}\n".encode())) for k in values]


# -- the kernel lock ----------------------------------------------------------------------------


async def test_dead_holder_releases_the_directory_lock(root: Path, report: SummaryReport) -> None:
    (root / "dir").mkdir()
    (root / "other").mkdir()
    (root / "dir" / "f.txt").write_bytes(b"f before\n")
    (root / "dir" / "g.txt").write_bytes(b"g before\n")
    ws = Workspace([root])
    async with await anyio.open_process(
        [sys.executable, str(CHILD), str(root), "dir/f.txt"]
    ) as child:
        try:
            assert child.stdout is not None
            output = b""
            with anyio.fail_after(30):
                while not output.endswith(b"\n"):
                    try:
                        output += await child.stdout.receive()
                    except anyio.EndOfStream:
                        assert child.stderr is not None
                        errors = b"".join([chunk async for chunk in child.stderr])
                        pytest.fail(f"the lock holder exited: {errors.decode(errors='replace')}")
            assert output == b"holding\n", output
            holder_temps = temp_files(root)
            assert [temp_owner_pid(p.name) for p in holder_temps] == [child.pid]

            # Same directory: the write waits for the child's lock.
            with anyio.move_on_after(0.5) as waited:
                await ws.write("dir/g.txt", b"g from the test\n")
            assert waited.cancelled_caught, "the write did not wait for the other process"
            assert (root / "dir" / "g.txt").read_bytes() == b"g before\n"
            assert temp_files(root) == holder_temps, "the cancelled write left a temp"
            assert len(ws._locks) == 0, "the cancelled write still holds or waits for a lock"

            # Another directory: not blocked.
            with anyio.fail_after(5):
                await ws.write("other/h.txt", b"h\n")
            assert (root / "other" / "h.txt").read_bytes() == b"h\n"

            child.send_signal(signal.SIGKILL)
            with anyio.fail_after(10):
                assert await child.wait() == -signal.SIGKILL
        finally:
            if child.returncode is None:
                child.kill()
                with anyio.move_on_after(10):
                    await child.wait()

    started = anyio.current_time()
    with anyio.fail_after(5):
        await ws.write("dir/g.txt", b"g from the test\n")
    report.add(
        f"dead holder: write went through {anyio.current_time() - started:.3f}s after the kill"
    )
    assert (root / "dir" / "g.txt").read_bytes() == b"g from the test\n"
    # The child never finished its atomic_writer block: f.txt is as it was, its temp orphaned.
    assert (root / "dir" / "f.txt").read_bytes() == b"f before\n"
    assert temp_files(root) == holder_temps
    assert len(ws._locks) == 0


async def test_the_directory_lock_is_released_while_the_location_stays_open(root: Path) -> None:
    """The lock's descriptor shares its open file description with the caller's directory
    descriptor: releasing must unlock it explicitly, or a Location kept open after the change
    (an embedding caller's) would hold every other process off the directory for good."""
    (root / "d").mkdir()
    ws = Workspace([root])
    with ws.sandbox.resolve("d/f.txt") as location:
        async with ws._changing(location):
            pass
        other = os.open(root / "d", os.O_RDONLY | os.O_DIRECTORY)  # another description
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if still locked
        finally:
            os.close(other)
        with anyio.fail_after(5):
            await Workspace([root]).write("d/g.txt", "no deadlock\n")
    assert len(ws._locks) == 0
