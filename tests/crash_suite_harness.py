"""The server crash suite: SIGKILL a real ``atomictools serve`` during large file changes.

Used by tests/test_crash_suite.py and tests/benchmarks/bench_crash.py. One round, in a *lane*
(its own root ``R`` and state directory ``S``):

1. The lane's server (``python -m atomictools serve --root R --state-dir S`` over stdio, spoken
   to by the SDK's ``Client`` through a transport over the pipes of a process this harness
   spawned itself, so it knows the pid) gets one call: ``write_file`` of a new self-checking
   version of a large file, ``edit_file`` changing the version markers at both ends of a large
   file, or ``apply_changes`` writing a new version to every file of a set (all files of a set
   carry the same set version; in half of the rounds the set also creates a directory, which
   makes the server write a ``preparing`` journal record before it stages anything).
2. The server is ``SIGKILL``-ed after a random delay spread across the call's expected duration
   (see ``Lane.call_and_kill``: some apply_changes delays count from a progress notification,
   some kills are fired by a thread that sees the committed journal record appear), or, in some
   rounds, right after the response arrived. Once it is dead, the disk is inspected as the kill
   left it: that names the *kill phase* (temp being written, staging under a preparing record,
   committed with k of n renames done, ...) and, with the response if one arrived, fixes the
   only acceptable outcome (a committed change set must be rolled forward, an uncommitted one
   back, a reported success kept).
3. A new server starts on the same root and state directory (its lifespan runs journal recovery
   before it serves anything); the harness waits until it answers ``list_allowed_directories``.
   Every file of the lane must then be exactly one complete version, every set wholly old or
   wholly new (its directory there exactly when its files are new), the outcome the acceptable
   one, and the journal directory empty. The killed server's stderr must show no error.
4. ``python -m atomictools recover R --state-dir S --json`` runs: it may remove temp files the
   killed server orphaned (the restarted server's own sweep only starts after 2 s; in a few
   rounds the harness waits for that background sweep instead and checks it did the job), but
   it must find no journal left to finish. After it, no temp file (``is_temp_name``) nor any
   other stray file may remain under ``R``, and ``S/journals`` must be empty.
5. The restarted server is the next round's server, so each round costs one server start.

Lanes run concurrently (one event loop; each lane's servers are separate processes).

The control (``run_control``) is a naive multi-file writer: a plain Python child that replaces
the files of a set one after another, each atomically (temp, fsync, ``os.replace``) but with no
journal. Killed at random moments it must leave mixed sets, checked by the same ``check_set``,
which shows the harness can see a mixed set when there is one.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
from mcp import Client, types
from mcp.shared.dispatcher import ProgressFnT
from mcp.shared.message import SessionMessage
from mcp.types import CallToolResult, TextContent

from atomictools.engine.changes.record import RECORD_SUFFIX
from atomictools.engine.config import STATE_DIR_ENV
from atomictools.engine.durable.tempfiles import is_temp_name
from tests.conftest import read_record

MiB = 1024 * 1024
KINDS = ("write_file", "edit_file", "apply_changes")
WRITE_PATH = "files/write.txt"
EDIT_PATH = "files/edit.txt"
SET_DIR = "set"
SERVER_SWEEP_DELAY = 5.0  # ServerOptions.sweep_delay: the CLI has no flag for it
READY_TIMEOUT = 60.0
CALL_TIMEOUT = 60.0
LINE = 1023  # base64 characters per body line

# -- self-checking contents ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a file holds: one complete version (``version``) or something torn (``problem``)."""

    version: int | None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def _digest(body: bytes | str) -> str:
    return hashlib.sha256(body.encode() if isinstance(body, str) else body).hexdigest()


def make_versioned(name: str, version: int, body: str) -> str:
    """A whole version of ``name``: one header line naming it, then the body it checks."""
    return f"ATKT {name} v={version:012d} n={len(body)} sha256={_digest(body)}\n{body}"


def parse_versioned(data: bytes, name: str) -> Verdict:
    """``data`` must be exactly one complete ``make_versioned`` version of ``name``."""
    head, newline, body = data.partition(b"\n")
    fields = head.split(b" ")
    if not newline or len(fields) != 5 or fields[0] != b"ATKT":
        return Verdict(None, f"{len(data)} bytes without a complete header")
    try:
        version = int(fields[2].removeprefix(b"v="))
        length = int(fields[3].removeprefix(b"n="))
    except ValueError:
        return Verdict(None, f"bad header {head[:80]!r}")
    if fields[1] != name.encode():
        return Verdict(version, f"header names {fields[1]!r}, expected {name!r}")
    if len(body) != length:
        return Verdict(
            version, f"version {version}: body of {len(body)} bytes, header says {length}"
        )
    if fields[4] != f"sha256={_digest(body)}".encode():
        return Verdict(version, f"version {version}: body sha256 mismatch (mixed versions?)")
    return Verdict(version)


def edit_marker(end: str, version: int) -> str:
    """The marker ``edit_file`` replaces (``end`` is head or tail); never found in a body."""
    return f"ATKE {end} v={version:012d}"


def make_edit_text(version: int, body: str) -> str:
    return (
        f"{edit_marker('head', version)}\nn={len(body)} sha256={_digest(body)}\n"
        f"{body}\n{edit_marker('tail', version)}\n"
    )


def parse_edit_text(data: bytes) -> Verdict:
    """One complete version of the edited file: both markers agree, the body checks."""
    lines = data.split(b"\n", 2)
    if len(lines) < 3 or not lines[0].startswith(b"ATKE head v="):
        return Verdict(None, f"{len(data)} bytes without a head marker")
    try:
        version = int(lines[0].removeprefix(b"ATKE head v="))
        meta = dict(part.split(b"=", 1) for part in lines[1].split(b" "))
        length = int(meta[b"n"])
    except (ValueError, KeyError):
        return Verdict(None, f"bad head {lines[0][:60]!r} {lines[1][:60]!r}")
    rest = lines[2]
    body, tail = rest[:length], rest[length:]
    if len(body) != length or _digest(body) != meta.get(b"sha256", b"").decode():
        return Verdict(version, f"version {version}: body torn or mixed ({len(rest)} bytes)")
    tail_version = tail.removeprefix(b"\nATKE tail v=").removesuffix(b"\n")
    if not tail.startswith(b"\nATKE tail v=") or not tail.endswith(b"\n"):
        return Verdict(version, f"version {version}: no tail marker")
    if not tail_version.isdigit() or int(tail_version) != version:
        return Verdict(version, f"head marker {version}, tail marker {tail_version!r}")
    return Verdict(version)


def set_names(nfiles: int) -> list[str]:
    return [f"part-{i}.txt" for i in range(nfiles)]


@dataclass(frozen=True, slots=True)
class SetVerdict:
    """A multi-file set: each file's verdict; ``mixed`` when complete files disagree."""

    verdicts: tuple[Verdict, ...]

    @property
    def torn(self) -> int:
        return sum(not v.ok for v in self.verdicts)

    @property
    def versions(self) -> set[int | None]:
        return {v.version for v in self.verdicts if v.ok}

    @property
    def mixed(self) -> bool:
        return len(self.versions) > 1

    @property
    def version(self) -> int | None:
        """The set's version when every file is complete and they all agree."""
        if self.torn or self.mixed:
            return None
        return next(iter(self.versions))


def check_set(directory: Path, names: Sequence[str]) -> SetVerdict:
    """Read every file of a set (a missing file is torn): the harness's mixed-state detector."""
    verdicts = []
    for name in names:
        try:
            data = (directory / name).read_bytes()
        except FileNotFoundError:
            verdicts.append(Verdict(None, "missing"))
            continue
        verdicts.append(parse_versioned(data, name))
    return SetVerdict(tuple(verdicts))


class BodyPool:
    """Cheap distinct bodies: slices of one random base64 text (lines of 1023 characters)."""

    def __init__(self, max_size: int, seed: int) -> None:
        rng = random.Random(seed)
        raw = base64.b64encode(rng.randbytes((max_size + MiB) * 3 // 4)).decode()
        self.text = "\n".join(raw[i : i + LINE] for i in range(0, len(raw), LINE))

    def body(self, rng: random.Random, min_size: int, max_size: int) -> str:
        length = rng.randint(min_size, max_size)
        start = rng.randint(0, len(self.text) - length)
        return self.text[start : start + length]


def write_plain(path: Path, data: str | bytes) -> None:
    """The harness's own setup or repair write (never during a kill window)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".harness-setup")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def temps_under(top: Path) -> list[Path]:
    """Our temp files anywhere below ``top`` (the sweep's own notion of a temp)."""
    found = []
    for dirpath, _dirs, names in os.walk(top):
        found += [Path(dirpath, n) for n in names if is_temp_name(n)]
    return found


def temp_base(name: str) -> str:
    """The target a temp file belongs to: ``.<base>.<pid>.<token>.atomictmp``."""
    return name[1:].rsplit(".", 3)[0]


# -- the server: spawned here, spoken to through the SDK client ------------------------------


@asynccontextmanager
async def pipe_transport(
    process: anyio.abc.Process,
) -> AsyncIterator[tuple[Any, Any]]:
    """An MCP client transport over the stdio pipes of a process spawned by the caller.

    Like the SDK's ``stdio_client`` (newline-delimited JSON-RPC) but the process stays ours:
    the harness knows its pid, kills it when it wants, and reaps it itself.
    """
    to_session, from_server = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    to_server, from_session = anyio.create_memory_object_stream[SessionMessage](0)
    assert process.stdout is not None
    assert process.stdin is not None
    stdout, stdin = process.stdout, process.stdin

    async def read() -> None:
        buffer = b""
        async with to_session:
            with suppress(
                anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream, OSError
            ):
                async for chunk in stdout:
                    lines = (buffer + chunk).split(b"\n")
                    buffer = lines.pop()
                    for line in lines:
                        message: SessionMessage | Exception
                        try:
                            parsed = types.jsonrpc_message_adapter.validate_json(
                                line, by_name=False
                            )
                            message = SessionMessage(parsed)
                        except ValueError as err:
                            message = err
                        await to_session.send(message)

    async def write() -> None:
        async with from_session:
            try:
                async for message in from_session:
                    data = message.message.model_dump_json(by_alias=True, exclude_unset=True)
                    await stdin.send(data.encode() + b"\n")
            except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
                await to_session.aclose()  # the server is gone: end the session's reads too

    async with anyio.create_task_group() as tg:
        tg.start_soon(read)
        tg.start_soon(write)
        try:
            yield from_server, to_server
        finally:
            tg.cancel_scope.cancel()


@dataclass
class Server:
    """One running ``atomictools serve`` and the client connected to it."""

    process: anyio.abc.Process
    client: Client
    stack: AsyncExitStack
    stderr_path: Path
    started: float
    mode: str


def text_of(result: CallToolResult) -> str:
    return "\n".join(b.text for b in result.content if isinstance(b, TextContent))


class HarnessError(RuntimeError):
    """The harness itself went wrong (a server died on its own, never got ready, ...)."""


# -- bookkeeping ---------------------------------------------------------------------------


@dataclass
class Campaign:
    """Totals over all server rounds."""

    rounds: int = 0
    rounds_by_kind: Counter[str] = field(default_factory=Counter)
    torn_files: int = 0
    mixed_sets: int = 0
    unexpected_outcomes: int = 0
    """Complete and consistent, but not the one outcome the kill point allows (e.g. a change
    set with a committed record rolled back, or a reported success lost)."""
    call_errors: int = 0  # a call answered with isError (it should have succeeded)
    server_errors: int = 0  # servers whose stderr shows a traceback, an error or a failure
    journals_after_start: int = 0  # journal entries left after the restarted server recovered
    journals_fixed_by_cli: int = 0  # change sets `atomictools recover` still had to finish
    leftovers: int = 0  # temps (or any stray file) under the root or journals after `recover`
    cli_problems: int = 0  # `recover` exit 2, problems, live or other-root change sets
    orphans_after_start: int = 0  # temps the killed server left (the sweep's job)
    temps_removed_by_cli: int = 0
    temps_removed_by_sweep: int = 0  # in the rounds that awaited the server's own sweep
    sweep_checks: int = 0  # rounds where the restarted server's own sweep was awaited
    sweep_missed: int = 0  # ... and it had not removed every orphan in time
    startup_rolled_forward: int = 0
    startup_rolled_back: int = 0
    responses_before_kill: int = 0
    responses_after_kill: int = 0  # a success that was already in the pipe when killed
    kill_phases: Counter[str] = field(default_factory=Counter)
    timings: Counter[str] = field(default_factory=Counter)
    modes: Counter[str] = field(default_factory=Counter)
    call_ms: dict[str, list[float]] = field(default_factory=dict)
    restart_s: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    lanes: int = 0
    elapsed: float = 0.0

    @property
    def anomalies(self) -> int:
        return (
            self.torn_files
            + self.mixed_sets
            + self.unexpected_outcomes
            + self.call_errors
            + self.server_errors
            + self.journals_after_start
            + self.journals_fixed_by_cli
            + self.leftovers
            + self.cli_problems
            + self.sweep_missed
        )

    def phase_line(self) -> str:
        return ", ".join(f"{phase} {n}" for phase, n in sorted(self.kill_phases.items()))

    def summary(self) -> str:
        kinds = " ".join(f"{k}={self.rounds_by_kind[k]}" for k in KINDS)
        restart = sum(self.restart_s) / len(self.restart_s) if self.restart_s else 0.0
        return (
            f"crash suite: rounds={self.rounds} ({kinds}) torn={self.torn_files} "
            f"mixed_sets={self.mixed_sets} unexpected={self.unexpected_outcomes} "
            f"leftovers={self.leftovers} journals_after_start={self.journals_after_start} "
            f"journals_fixed_by_recover={self.journals_fixed_by_cli} "
            f"call_errors={self.call_errors} server_errors={self.server_errors} "
            f"orphan_temps={self.orphans_after_start} "
            f"(removed by recover {self.temps_removed_by_cli}, by the server's sweep "
            f"{self.temps_removed_by_sweep} in {self.sweep_checks} awaited rounds, missed "
            f"{self.sweep_missed}) startup_recovery=fwd {self.startup_rolled_forward}"
            f"/back {self.startup_rolled_back} "
            f"lanes={self.lanes} restart={restart:.2f}s time={self.elapsed:.1f}s"
        )


@dataclass
class ControlCampaign:
    """Totals over the naive writer's rounds."""

    rounds: int = 0
    mixed_sets: int = 0
    torn_files: int = 0
    kill_phases: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    write_ms: float = 0.0
    elapsed: float = 0.0

    def summary(self) -> str:
        phases = ", ".join(f"{p} {n}" for p, n in sorted(self.kill_phases.items()))
        return (
            f"naive control: rounds={self.rounds} mixed_sets={self.mixed_sets} "
            f"torn={self.torn_files} set_write={self.write_ms:.0f}ms "
            f"time={self.elapsed:.1f}s kill_phases=[{phases}]"
        )


@dataclass
class Settings:
    min_size: int = 1 * MiB
    max_size: int = 3 * MiB // 2
    set_files: int = 4
    after_response_share: float = 0.1
    """Share of rounds killed right after the response instead of during the call."""
    after_staging_share: float = 0.35
    """Share of apply_changes rounds whose kill delay counts from the progress notification
    that says every file is staged (to land in the commit window more often)."""
    at_commit_share: float = 0.25
    mkdir_share: float = 0.5
    """Share of apply_changes rounds whose set also creates a directory (its first change):
    that writes a ``preparing`` record before staging, so a kill while staging is rolled
    back from the journal (and the directory must exist exactly when the files are new)."""
    """Share of apply_changes rounds killed (by a thread watching the journal directory) as
    soon as the commit record appears, or up to 3 ms later: the roll-forward path."""
    sweep_checks: int = 1
    """Rounds (per lane) that wait for the restarted server's own background sweep."""
    keep_logs: bool = False
    on_round: Callable[[Campaign], None] | None = None
    """Called after every finished round (the benchmark prints progress with it)."""


# -- one lane ------------------------------------------------------------------------------


def _committed(record: Path) -> bool:
    """Whether a journal record (as the watcher thread sees it) is the committed one."""
    try:
        return b'"state": "committed"' in record.read_bytes()
    except OSError:
        return False


def _staged_recorder(event: anyio.Event, at: int | None = None) -> tuple[list[float], ProgressFnT]:
    """A progress callback noting (and signalling) when apply_changes has staged its
    ``at``-th change (by default: every change).

    apply_changes reports ``(k, 2n)`` after staging its k-th change and ``(2n, 2n)`` once
    applied, so ``progress >= total / 2`` first holds when the last file is staged.
    """
    staged_at: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        del message
        if total and progress >= (total / 2 if at is None else at) and not staged_at:
            staged_at.append(time.perf_counter())
            event.set()

    return staged_at, on_progress


@dataclass
class _Call:
    result: CallToolResult | None = None
    error: BaseException | None = None
    elapsed: float = 0.0
    done_at: float = 0.0


@dataclass
class _Plan:
    """One round's call and what the files hold before it and after it succeeds."""

    kind: str
    args: dict[str, Any]
    old: int
    new: int
    size: int  # bytes of one new file (the expected size of a complete staged temp)
    marker: str | None = None
    """apply_changes only: a directory the set also creates (its first change, a mkdir)."""


class Lane:
    def __init__(
        self,
        index: int,
        workdir: Path,
        campaign: Campaign,
        settings: Settings,
        pool: BodyPool,
        seed: int,
    ) -> None:
        self.index = index
        self.root = workdir / f"lane-{index}" / "root"
        self.state = workdir / f"lane-{index}" / "state"
        self.logs = workdir / f"lane-{index}" / "logs"
        self.campaign = campaign
        self.settings = settings
        self.pool = pool
        self.rng = random.Random(seed)
        self.names = set_names(settings.set_files)
        self.version = {"write": 0, "edit": 0, "set": 0}
        self.counter = 0
        self.starts = 0
        self.window: dict[str, float] = {"commit": 0.02}
        """The kill delay is drawn from [0, window]: per kind, and "commit" after staging.
        Calibrated by one uninterrupted call, then nudged so most kills land inside the call."""
        self.sweep_checks_left = settings.sweep_checks
        self.server: Server | None = None

    # -- files --

    def _next_version(self) -> int:
        self.counter += 1
        return self.counter

    def _body(self) -> str:
        return self.pool.body(self.rng, self.settings.min_size, self.settings.max_size)

    def _write_version(self) -> int:
        version = self._next_version()
        write_plain(self.root / WRITE_PATH, make_versioned("write.txt", version, self._body()))
        return version

    def _edit_version(self) -> int:
        version = self._next_version()
        write_plain(self.root / EDIT_PATH, make_edit_text(version, self._body()))
        return version

    def _set_version(self) -> int:
        version = self._next_version()
        for name in self.names:
            write_plain(self.root / SET_DIR / name, make_versioned(name, version, self._body()))
        return version

    def setup(self) -> None:
        for path in (self.root / "files", self.root / SET_DIR, self.state, self.logs):
            path.mkdir(parents=True, exist_ok=True)
        self.version = {
            "write": self._write_version(),
            "edit": self._edit_version(),
            "set": self._set_version(),
        }

    def plan(self, kind: str) -> _Plan:
        new = self._next_version()
        if kind == "write_file":
            content = make_versioned("write.txt", new, self._body())
            args: dict[str, Any] = {"path": WRITE_PATH, "content": content}
            return _Plan(kind, args, self.version["write"], new, len(content))
        if kind == "edit_file":
            old = self.version["edit"]
            edits = [
                {"oldText": edit_marker(end, old), "newText": edit_marker(end, new)}
                for end in ("head", "tail")
            ]
            size = (self.root / EDIT_PATH).stat().st_size
            return _Plan(kind, {"path": EDIT_PATH, "edits": edits}, old, new, size)
        changes = [
            {
                "op": "write",
                "path": f"{SET_DIR}/{name}",
                "content": make_versioned(name, new, self._body()),
            }
            for name in self.names
        ]
        size = max(len(c["content"]) for c in changes)
        marker = None
        if self.rng.random() < self.settings.mkdir_share:
            marker = f"{SET_DIR}/gen-{new}"
            changes.insert(0, {"op": "mkdir", "path": marker})
        return _Plan(kind, {"changes": changes}, self.version["set"], new, size, marker)

    def _verdicts(self) -> dict[str, Verdict | SetVerdict]:
        def read(path: str) -> bytes:
            try:
                return (self.root / path).read_bytes()
            except FileNotFoundError:
                return b""

        return {
            "write_file": parse_versioned(read(WRITE_PATH), "write.txt"),
            "edit_file": parse_edit_text(read(EDIT_PATH)),
            "apply_changes": check_set(self.root / SET_DIR, self.names),
        }

    def _strays(self) -> list[Path]:
        """Every file under the root that is not one of the lane's files (temps included)."""
        expected = {self.root / WRITE_PATH, self.root / EDIT_PATH}
        expected |= {self.root / SET_DIR / name for name in self.names}
        found = []
        for dirpath, _dirs, names in os.walk(self.root):
            found += [Path(dirpath, n) for n in names if Path(dirpath, n) not in expected]
        return found

    def _journal_entries(self) -> list[Path]:
        journals = self.state / "journals"
        return sorted(journals.iterdir()) if journals.is_dir() else []

    # -- the server --

    async def start_server(self) -> Server:
        self.starts += 1
        mode = ("legacy", "auto")[(self.starts + self.index) % 2]
        stderr_path = self.logs / f"server-{self.starts}.log"
        argv = [
            sys.executable,
            "-m",
            "atomictools",
            "serve",
            "--root",
            str(self.root),
            "--state-dir",
            str(self.state),
        ]
        env = {**os.environ, STATE_DIR_ENV: str(self.state)}
        env.pop("ATOMICTOOLS_TEST_CRASH_AT", None)
        started = time.perf_counter()
        with open(stderr_path, "wb") as stderr:
            process = await anyio.open_process(argv, stderr=stderr, env=env)
        stack = AsyncExitStack()
        # read_timeout_seconds bounds every request (the handshake too): nothing hangs forever.
        # (No fail_after around entering the client: its task groups must outlive the scope.)
        client = Client(
            pipe_transport(process), mode=mode, cache=None, read_timeout_seconds=READY_TIMEOUT
        )
        server = Server(process, client, stack, stderr_path, started, mode)
        try:
            await stack.enter_async_context(client)
            result = await client.call_tool("list_allowed_directories", {})
        except Exception as err:
            await self.stop(server)
            raise HarnessError(
                f"lane {self.index}: the server did not serve ({err!r}):\n{self._tail(server)}"
            ) from err
        except BaseException:  # cancelled: at least leave no server behind
            if process.returncode is None:
                os.kill(process.pid, signal.SIGKILL)
            raise
        expected = {"directories": [str(self.root.resolve())]}
        if result.is_error or result.structured_content != expected:
            await self.stop(server)
            raise HarnessError(f"list_allowed_directories answered {result!r}")
        self.campaign.modes[mode] += 1
        return server

    @staticmethod
    def _tail(server: Server) -> str:
        try:
            return server.stderr_path.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no stderr)"

    async def stop(self, server: Server) -> None:
        """Kill (if still alive), reap and disconnect; only ever our own pid."""
        if server.process.returncode is None:
            with suppress(ProcessLookupError):
                os.kill(server.process.pid, signal.SIGKILL)
        with anyio.move_on_after(10, shield=True):
            await server.process.wait()
        # Not inside a cancel scope: the client's task groups were entered outside of it.
        await server.stack.aclose()
        with suppress(Exception):
            await server.process.aclose()

    def scan_log(self, server: Server, where: str) -> None:
        """A dead server's stderr, over its whole life (recovery, sweep, calls): no errors."""
        text = server.stderr_path.read_text(errors="replace")
        bad = [
            line
            for line in text.splitlines()
            if "Traceback" in line or " ERROR " in line or " CRITICAL " in line or "failed" in line
        ]
        if bad:
            self.campaign.server_errors += 1
            self.campaign.problems.append(f"{where}: the server logged {bad[:3]}:\n{text[-2000:]}")
        elif not self.settings.keep_logs:
            server.stderr_path.unlink(missing_ok=True)

    def startup_report(self, server: Server) -> dict[str, Any]:
        """What the server's startup recovery logged (it logs only when it fixed something)."""
        for line in server.stderr_path.read_text(errors="replace").splitlines():
            if "startup recovery: " in line:
                parsed = ast.literal_eval(line.split("startup recovery: ", 1)[1])
                return parsed if isinstance(parsed, dict) else {}
        return {}

    # -- one round --

    def _timing(self, kind: str) -> str:
        """When this round's kill lands (see ``Settings``)."""
        draw = self.rng.random()
        if draw < self.settings.after_response_share:
            return "after response"
        if kind != "apply_changes":
            return "during call"
        draw -= self.settings.after_response_share
        if draw < self.settings.after_staging_share:
            return "after staging"
        if draw < self.settings.after_staging_share + self.settings.at_commit_share:
            return "at commit record"
        return "during call"

    def _watch_commit(self, pid: int, stop: threading.Event, delay: float) -> bool:
        """In a thread: SIGKILL ``pid`` ``delay`` s after a committed journal record appears
        (True), or give up once ``stop`` is set (False). Sleeps 0.1 ms per look (GIL free)."""
        journals = self.state / "journals"
        while not stop.is_set():
            try:
                names = os.listdir(journals)
            except FileNotFoundError:
                names = []
            if any(_committed(journals / n) for n in names if n.endswith(RECORD_SUFFIX)):
                if delay:
                    time.sleep(delay)
                os.kill(pid, signal.SIGKILL)  # our own child, not reaped yet: the pid is ours
                return True
            time.sleep(0.0001)
        return False

    async def call_and_kill(self, server: Server, plan: _Plan) -> tuple[_Call, bool, str]:
        """Run the call, SIGKILL the server; (call outcome, answered before the kill, timing).

        ``during call``: a delay drawn uniformly from ``[0, window]`` after the request is sent;
        the window starts at 1.1 times an uninterrupted call and shrinks a little whenever the
        answer beat the kill, grows a little when it did not, so about one such kill in six
        lands just after the call and the rest spread over it. ``after all staged`` / ``after
        k-th staged`` (apply_changes only): the same, counted from the progress notification
        that says the k-th change (k drawn from 1..n) is staged, over the window measured from
        the last one to the answer, so the kill lands while staging (under a ``preparing``
        record when the set makes a directory) or in the commit / apply / finish window. ``at commit
        record`` (apply_changes only): a thread watching the journal directory kills the
        server as soon as the committed record appears, or up to 3 ms later.
        ``after response``: as soon as the answer arrived.
        """
        call = _Call()
        done, trigger = anyio.Event(), anyio.Event()
        timing = self._timing(plan.kind)
        changes = len(plan.args.get("changes", ()))
        at = self.rng.randint(1, changes) if timing == "after staging" else changes
        if timing == "after staging":
            timing = "after all staged" if at == changes else "after k-th staged (k < n)"
        staged_at, on_progress = _staged_recorder(trigger, at or None)
        fired: list[bool] = []

        async def run() -> None:
            start = time.perf_counter()
            try:
                call.result = await server.client.call_tool(
                    plan.kind, plan.args, progress_callback=on_progress
                )
            except Exception as err:
                call.error = err
            finally:
                call.done_at = time.perf_counter()
                call.elapsed = call.done_at - start
                done.set()
                trigger.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            if timing == "after response":
                with anyio.fail_after(CALL_TIMEOUT):
                    await done.wait()
            elif timing == "at commit record":
                stop = threading.Event()
                delay = self.rng.choice([0.0, self.rng.uniform(0, 0.003)])
                pid = server.process.pid
                with anyio.fail_after(CALL_TIMEOUT):
                    async with anyio.create_task_group() as watchers:

                        async def watch() -> None:
                            fired.append(
                                await anyio.to_thread.run_sync(self._watch_commit, pid, stop, delay)
                            )

                        watchers.start_soon(watch)
                        await done.wait()
                        stop.set()
            elif timing.startswith("after") and "staged" in timing:
                with anyio.fail_after(CALL_TIMEOUT):
                    await trigger.wait()
                with anyio.move_on_after(self.rng.uniform(0, self.window["commit"])):
                    await done.wait()
            else:
                with anyio.move_on_after(self.rng.uniform(0, self.window[plan.kind])):
                    await done.wait()
            killed = any(fired)  # by the commit watcher
            answered = done.is_set() and not killed
            if not killed:
                if server.process.returncode is not None:
                    raise HarnessError(
                        f"lane {self.index}: the server exited on its own "
                        f"({server.process.returncode}):\n{self._tail(server)}"
                    )
                os.kill(server.process.pid, signal.SIGKILL)
            with anyio.fail_after(CALL_TIMEOUT):
                await server.process.wait()
                await done.wait()
        await self.stop(server)
        if server.process.returncode != -signal.SIGKILL:
            raise HarnessError(f"the server exited {server.process.returncode}, not by SIGKILL")
        if answered and call.result is not None and not call.result.is_error:
            self.campaign.call_ms.setdefault(plan.kind, []).append(call.elapsed * 1000)
            if staged_at and at == changes:
                self.campaign.call_ms.setdefault("commit", []).append(
                    (call.done_at - staged_at[0]) * 1000
                )
        if timing in ("during call", "after all staged"):  # aim: 1 kill in 6 comes too late
            key = "commit" if timing == "after all staged" else plan.kind
            self.window[key] *= 0.9 if answered else 1.02
        self.campaign.timings[timing] += 1
        return call, answered, timing

    def phase_at_kill(self, plan: _Plan) -> tuple[str, str | None]:
        """(kill phase, the only acceptable outcome: "old", "new" or None for a bug)."""
        verdict = self._verdicts()[plan.kind]
        if plan.kind in ("write_file", "edit_file"):
            assert isinstance(verdict, Verdict)
            target = Path(WRITE_PATH if plan.kind == "write_file" else EDIT_PATH).name
            if verdict.ok and verdict.version == plan.new:
                return "target replaced", "new"
            if not verdict.ok or verdict.version != plan.old:
                return "target neither old nor new", None
            temps = [p for p in temps_under(self.root / "files") if temp_base(p.name) == target]
            if not temps:
                return "before the temp", "old"
            complete = any(p.stat().st_size >= plan.size for p in temps)
            return ("temp complete, not renamed" if complete else "temp being written"), "old"
        assert isinstance(verdict, SetVerdict)
        new = sum(v.ok and v.version == plan.new for v in verdict.verdicts)
        states = []
        for entry in self._journal_entries():
            if entry.name.endswith(RECORD_SUFFIX):
                record = read_record(entry)
                states.append(record.state if record else "torn")
            elif is_temp_name(entry.name):
                states.append("record temp")
        n = len(self.names)
        if "committed" in states:
            return f"committed, {new}/{n} renamed", "new"
        if verdict.torn or (new and new < n):
            return f"{new}/{n} new without a committed record", None
        if new == n:
            return "applied, record removed", "new"
        temps = temps_under(self.root / SET_DIR)
        staged = len({temp_base(p.name) for p in temps})
        phase = f"staging ({staged}/{n} files have temps)" if temps else "before staging"
        if "preparing" in states:
            phase += ", preparing record"
        if "record temp" in states:
            phase += ", a record being written"
        return phase, "old"

    def _problem(self, round_no: int, plan: _Plan, phase: str, text: str) -> None:
        self.campaign.problems.append(
            f"round {round_no} lane {self.index} {plan.kind} (old {plan.old}, new {plan.new}, "
            f"killed: {phase}): {text}"
        )

    async def round(self, round_no: int, kind: str) -> None:
        campaign = self.campaign
        assert self.server is not None
        plan = self.plan(kind)
        killed = self.server
        call, answered, timing = await self.call_and_kill(killed, plan)
        self.server = None
        phase, expected = self.phase_at_kill(plan)
        self.scan_log(killed, f"round {round_no} lane {self.index} ({kind}, killed: {phase})")
        succeeded = call.result is not None and not call.result.is_error
        if call.result is not None and call.result.is_error:
            campaign.call_errors += 1
            self._problem(round_no, plan, phase, f"the call failed: {text_of(call.result)[:300]}")
            expected = "old" if expected == "old" else None
        if succeeded:
            campaign.responses_before_kill += answered
            campaign.responses_after_kill += not answered
            if expected != "new":
                self._problem(round_no, plan, phase, "success was reported, the disk is not new")
            expected = "new"
        shown = "after response" if answered and succeeded else phase
        campaign.kill_phases[f"{kind}: {shown}"] += 1
        if timing == "after response" and not succeeded:
            self._problem(round_no, plan, phase, f"no success before the kill: {call.error!r}")

        # Restart: recovery runs in the lifespan, before the first call is served.
        server = await self.start_server()
        self.server = server
        campaign.restart_s.append(time.perf_counter() - server.started)
        report = self.startup_report(server)
        campaign.startup_rolled_forward += len(report.get("rolledForward", []))
        campaign.startup_rolled_back += len(report.get("rolledBack", []))
        if report.get("problems"):
            self._problem(round_no, plan, phase, f"startup recovery: {report['problems']}")
        left = self._journal_entries()
        campaign.journals_after_start += len(left)
        if left:
            self._problem(round_no, plan, phase, f"journals left after startup: {left}")
        self.check_files(round_no, plan, phase, expected)

        orphans = temps_under(self.root)
        campaign.orphans_after_start += len(orphans)
        if orphans and self.sweep_checks_left > 0:
            self.sweep_checks_left -= 1
            await self.await_background_sweep(round_no, plan, phase, server)
        await self.run_recover(round_no, plan, phase)
        leftovers = [*self._strays(), *self._journal_entries()]
        for made in (self.root / SET_DIR).glob("gen-*"):  # checked: the harness tidies up
            try:
                made.rmdir()
            except OSError:
                leftovers.append(made)
        campaign.leftovers += len(leftovers)
        if leftovers:
            self._problem(round_no, plan, phase, f"left after recover: {leftovers}")
            for path in leftovers:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        campaign.rounds += 1
        campaign.rounds_by_kind[kind] += 1
        if self.settings.on_round is not None:
            self.settings.on_round(campaign)

    def check_files(self, round_no: int, plan: _Plan, phase: str, expected: str | None) -> None:
        """Every file of the lane: one complete version; the round's target: the right one."""
        campaign = self.campaign
        allowed = {"old": {plan.old}, "new": {plan.new}, None: {plan.old, plan.new}}[expected]
        keys = {"write_file": "write", "edit_file": "edit", "apply_changes": "set"}
        for kind, verdict in self._verdicts().items():
            key = keys[kind]
            version: int | None
            if isinstance(verdict, SetVerdict):
                campaign.torn_files += verdict.torn
                campaign.mixed_sets += verdict.mixed
                version = verdict.version
                if verdict.torn or verdict.mixed:
                    details = [v.problem or f"v{v.version}" for v in verdict.verdicts]
                    self._problem(round_no, plan, phase, f"set torn/mixed: {details}")
                if plan.marker is not None and version is not None:
                    made = (self.root / plan.marker).is_dir()
                    if made != (version == plan.new):  # the directory is part of the set
                        campaign.mixed_sets += 1
                        self._problem(
                            round_no, plan, phase, f"set v{version} but {plan.marker} made={made}"
                        )
            else:
                campaign.torn_files += not verdict.ok
                version = verdict.version if verdict.ok else None
                if not verdict.ok:
                    self._problem(round_no, plan, phase, f"{kind} torn: {verdict.problem}")
            ok_versions = allowed if kind == plan.kind else {self.version[key]}
            if version is not None and version not in ok_versions:
                campaign.unexpected_outcomes += 1
                self._problem(
                    round_no, plan, phase, f"{kind} holds v{version}, expected {ok_versions}"
                )
            if version is None:  # repair, so one failure is counted once
                version = {
                    "write": self._write_version,
                    "edit": self._edit_version,
                    "set": self._set_version,
                }[key]()
            self.version[key] = version

    async def await_background_sweep(
        self, round_no: int, plan: _Plan, phase: str, server: Server
    ) -> None:
        """Wait for the restarted server's own sweep (``sweep_delay`` after its start)."""
        self.campaign.sweep_checks += 1
        before = len(temps_under(self.root))
        deadline = server.started + SERVER_SWEEP_DELAY + 15.0
        while temps_under(self.root) and time.perf_counter() < deadline:  # noqa: ASYNC110
            await anyio.sleep(0.1)  # polling the disk: nothing to wait on
        left = temps_under(self.root)
        self.campaign.temps_removed_by_sweep += before - len(left)
        if left:
            self.campaign.sweep_missed += 1
            self._problem(round_no, plan, phase, f"the background sweep left {left}")

    async def run_recover(self, round_no: int, plan: _Plan, phase: str) -> None:
        argv = [
            sys.executable,
            "-m",
            "atomictools",
            "recover",
            str(self.root),
            "--state-dir",
            str(self.state),
            "--json",
        ]
        env = {**os.environ, STATE_DIR_ENV: str(self.state)}
        done = await anyio.run_process(argv, check=False, env=env)
        try:
            report = json.loads(done.stdout)
        except ValueError:
            report = {}
        if done.returncode not in (0, 1) or not report:
            self.campaign.cli_problems += 1
            self._problem(
                round_no, plan, phase, f"recover exit {done.returncode}: {done.stderr[-2000:]!r}"
            )
            return
        rolled = [*report["rolledForward"], *report["rolledBack"]]
        self.campaign.journals_fixed_by_cli += len(rolled)
        self.campaign.temps_removed_by_cli += len(report["removedTempFiles"])
        if rolled:
            self._problem(round_no, plan, phase, f"recover still had to finish {rolled}")
        other = [*report["liveChangeSets"], *report["otherRoots"], *report["problems"]]
        if other:
            self.campaign.cli_problems += 1
            self._problem(round_no, plan, phase, f"recover reported {other}")

    async def calibrate(self) -> None:
        """One uninterrupted call per kind: the tools work, and a first duration estimate."""
        assert self.server is not None
        for kind in KINDS:
            plan = self.plan(kind)
            staged_at, on_progress = _staged_recorder(anyio.Event())
            start = time.perf_counter()
            with anyio.fail_after(CALL_TIMEOUT):
                result = await self.server.client.call_tool(
                    kind, plan.args, progress_callback=on_progress
                )
            if result.is_error:
                raise HarnessError(f"calibration {kind} failed: {text_of(result)[:500]}")
            now = time.perf_counter()
            self.window[kind] = 1.1 * (now - start)
            if staged_at:
                self.window["commit"] = 1.1 * (now - staged_at[0])
            key = {"write_file": "write", "edit_file": "edit", "apply_changes": "set"}[kind]
            self.version[key] = plan.new

    async def run(self, rounds: Iterator[int]) -> None:
        self.setup()
        self.server = await self.start_server()
        try:
            await self.calibrate()
            for round_no in rounds:
                await self.round(round_no, KINDS[round_no % len(KINDS)])
        finally:
            last, self.server = self.server, None
            if last is not None:
                await self.stop(last)
        if last is not None:
            self.scan_log(last, f"lane {self.index}: the last server")


async def _campaign(
    rounds: int, workdir: Path, lanes: int, settings: Settings, seed: int
) -> Campaign:
    campaign = Campaign(lanes=lanes)
    rng = random.Random(seed)
    pool = BodyPool(settings.max_size, rng.getrandbits(32))
    shared = iter(range(rounds))  # each lane takes the next round number
    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for index in range(lanes):
            lane = Lane(index, workdir, campaign, settings, pool, rng.getrandbits(32))
            tg.start_soon(lane.run, shared)
    campaign.elapsed = time.perf_counter() - started
    return campaign


def run_campaign(
    rounds: int,
    workdir: Path,
    *,
    lanes: int = 2,
    settings: Settings | None = None,
    seed: int | None = None,
) -> Campaign:
    """``rounds`` server kill rounds (round r uses ``KINDS[r % 3]``) over ``lanes`` lanes."""
    seed = random.SystemRandom().getrandbits(32) if seed is None else seed
    lanes = max(1, min(lanes, rounds)) if rounds else 1
    return anyio.run(_campaign, rounds, workdir, lanes, settings or Settings(), seed)


# -- the control: a naive multi-file writer ----------------------------------------------------

NAIVE_WRITER = """\
import os, sys
pairs = list(zip(sys.argv[1::2], sys.argv[2::2]))
print("ready", flush=True)
if sys.stdin.readline().strip() != "go":
    sys.exit(0)
for source, target in pairs:
    with open(source, "rb") as f:
        data = f.read()
    tmp = target + ".naive-tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)
    os.close(fd)
    os.replace(tmp, target)  # each file atomically, the set not: no journal
print("done", flush=True)
sys.stdin.readline()
"""


@contextmanager
def _naive_child(pairs: list[tuple[Path, Path]]) -> Iterator[subprocess.Popen[str]]:
    argv = [sys.executable, "-c", NAIVE_WRITER]
    for source, target in pairs:
        argv += [str(source), str(target)]
    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise HarnessError("the naive writer did not start")
        yield child
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.wait()
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                with suppress(OSError):
                    stream.close()


def run_control(
    rounds: int,
    workdir: Path,
    *,
    settings: Settings | None = None,
    seed: int | None = None,
) -> ControlCampaign:
    """Kill the naive set writer at random moments; ``check_set`` must see mixed sets."""
    settings = settings or Settings()
    rng = random.Random(random.SystemRandom().getrandbits(32) if seed is None else seed)
    pool = BodyPool(settings.max_size, rng.getrandbits(32))
    campaign = ControlCampaign()
    target_dir, staging = workdir / "root" / SET_DIR, workdir / "staging"
    target_dir.mkdir(parents=True)
    staging.mkdir()
    names = set_names(settings.set_files)
    version = 0

    def stage(new: int) -> list[tuple[Path, Path]]:
        pairs = []
        for name in names:
            body = pool.body(rng, settings.min_size, settings.max_size)
            source = staging / f"{name}.v{new}"
            source.write_text(make_versioned(name, new, body))
            pairs.append((source, target_dir / name))
        return pairs

    for source, target in stage(0):
        os.replace(source, target)
    started = time.perf_counter()
    # Calibration: one uninterrupted run tells how long writing the set takes.
    version += 1
    with _naive_child(stage(version)) as child:
        assert child.stdin is not None
        assert child.stdout is not None
        begin = time.perf_counter()
        child.stdin.write("go\n")
        child.stdin.flush()
        if child.stdout.readline().strip() != "done":
            raise HarnessError("the naive writer failed its calibration run")
        duration = time.perf_counter() - begin
    campaign.write_ms = duration * 1000
    old = version
    for round_no in range(rounds):
        version += 1
        with _naive_child(stage(version)) as child:
            assert child.stdin is not None
            delay = rng.uniform(0, 1.1 * duration)
            child.stdin.write("go\n")
            child.stdin.flush()
            time.sleep(delay)
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        verdict = check_set(target_dir, names)
        new = sum(v.ok and v.version == version for v in verdict.verdicts)
        campaign.kill_phases[f"{new}/{len(names)} replaced"] += 1
        campaign.torn_files += verdict.torn
        campaign.mixed_sets += verdict.mixed
        if verdict.torn or not verdict.versions <= {old, version}:
            campaign.problems.append(f"control round {round_no}: {verdict}")
        if verdict.version is not None:
            old = verdict.version
        else:  # repair, so the next round starts from one version
            for source, target in stage(version):
                os.replace(source, target)
            old = version
        campaign.rounds += 1
        for leftover in [*staging.iterdir(), *target_dir.glob("*.naive-tmp")]:
            leftover.unlink()
    campaign.elapsed = time.perf_counter() - started
    return campaign
