"""SIGKILL campaign: the real server killed during change sets of files and one database.

Used by tests/test_mixed_sigkill.py and tests/benchmarks/bench_mixed_sigkill.py.

Each round sends one ``apply_changes`` call to ``python -m atomictools serve --root R --db
app=D --state-dir S`` over stdio (a process the harness spawned, so it knows the pid and
kills it itself), SIGKILLs the server at a random moment of the call, looks at what the kill
left on disk (the *kill phase*: staging, prepared but not committed, committed with files
pending, finished with its marker left, ...), restarts the server (its startup recovery runs
before it serves) and checks the files and the database.

The set of round ``v`` writes a new self-checking version ``v`` of every file of ``set/``
(one of them by an ``edit`` of its header instead), makes a directory ``set/dirs/dNNNNNN`` in
every other round (between the files: the set then stages under a ``preparing`` record), and
in the same set updates the database: the ``files`` row of every file (its sha256 and
version), a row in ``dirs`` for the directory, a row in ``sets``, and every fifth round a
schema migration (``ALTER TABLE sets ADD COLUMN cNNNNNN``). After the restart:

* **torn**: a file that is not one complete version;
* **mixed**: files and database not at one version (a file's version, its row, the rows'
  hashes, the directories against ``dirs``, the migrated columns against the version);
* **wrong outcome**: at one version, but not one the kill allows (neither the version before
  nor the round's; the one before although the call had answered or the kill came after the
  commit point; the round's although the kill came before it);
* **leftovers**: a journal record after the restart; a set left for a person, or files of
  ours (temps, members, claims) in the root, after a recovery (``atomictools.recover``, what
  an operator runs; the restarted server's own sweep starts 5 s later); a marker row that is
  not the one stale row allowed below, or one that outlived a set that committed since, and
  any marker row after the final, uninterrupted set; ``PRAGMA integrity_check`` must say ok.

Two things a kill may leave are expected, counted apart, and must go later:

* **stale marker rows**: a kill after a set removed its journal record and before it dropped
  its marker (phase ``finished, marker left``) leaves that one row, named by the set's txid;
  recovery has no record to act on, and the next set's transaction drops it (no other writer
  holds the database here, so a set that finishes drops its own; and the restarted server's
  recovery drops the marker, and the ``decided`` row, of every prepared set it handles);
* **young lone claims**: a kill after a set made its claim in ``set/`` and before it wrote a
  journal record (a set without a directory to make writes its first one once all is staged)
  leaves a claim that no record names, alone if no member followed it. The sweep removes a
  claim of a set its run's recovery handled whatever its age, but this one no recovery handles:
  it waits out the sweep's grace period, as a live set's claim before its first member would.
  Only the round's set's claim may be left so, only when the kill left no record, and
  ``final_set`` checks that a sweep past the grace period removes it.

Kill moments: ``during call`` (a delay drawn from a window that adapts so that about one in
six kills comes after the answer), ``after staging`` (from the progress notification that says
every file is staged and the statements ran: the commit window), ``at prepared record`` (a
thread sees the ``prepared`` journal record appear: the marker's insert and the COMMIT are
next), ``after response``.

Drivers: ``server`` (the real server), ``child`` (the engine in a plain child,
``tests/mixed_child.py loop``, which starts in a fifth of the time), ``naive`` (the control:
a child committing the files, then the rows in a transaction of their own, which must show
mixed rounds, so the checks can see a mix).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager, closing, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
from mcp import Client

import atomictools
from atomictools import is_temp_name
from atomictools.engine.changes.record import RECORD_SUFFIX
from atomictools.engine.changes.sweep import GRACE_SECONDS
from atomictools.engine.config import STATE_DIR_ENV
from atomictools.engine.durable.steps import CRASH_ENV, CRASH_SIGNAL_ENV
from atomictools.engine.durable.tempfiles import parse_claim, parse_member
from tests.conftest import read_record
from tests.crash_suite_harness import pipe_transport

CHILD = Path(__file__).with_name("mixed_child.py")
DB_NAME = "app"
SET_DIR = "set"
DIRS = f"{SET_DIR}/dirs"
READY_TIMEOUT = 60.0
CALL_TIMEOUT = 60.0
HEADER = re.compile(rb"^mixed v(\d{8}) (f\d+) ([0-9a-f]{64}) (\d+)\n")
TIMINGS = (
    ("during call", 0.57),
    ("after staging", 0.22),
    ("at prepared record", 0.13),
    ("after response", 0.08),
)
BEFORE_COMMIT = frozenset(
    {"before staging", "staging", "staging (preparing record)", "prepared, not committed"}
)
AFTER_COMMIT = frozenset(
    {"committed, files pending", "finished, marker left", "done, no answer", "answered"}
)
SPLIT = "files committed, database not"
"""The control's kill between its two commits (never the server's)."""


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the files and the database -------------------------------------------------------------


def file_path(index: int) -> str:
    return f"{SET_DIR}/f{index}.txt"


def make_version(index: int, version: int, body: str) -> str:
    """A self-checking file: a header naming its version and its body's hash and size."""
    data = body.encode()
    return f"mixed v{version:08d} f{index} {sha(data)} {len(data)}\n{body}"


def header_of(index: int, version: int) -> str:
    """The part of the header an ``edit`` changes (the version), unique in the file."""
    return f"mixed v{version:08d} f{index} "


def parse_version(data: bytes, index: int) -> int | None:
    """The version of a complete file, None for a torn or foreign one."""
    match = HEADER.match(data)
    if match is None or match.group(2) != f"f{index}".encode():
        return None
    body = data[match.end() :]
    if len(body) != int(match.group(4)) or sha(body) != match.group(3).decode():
        return None
    return int(match.group(1))


SCHEMA = (
    "CREATE TABLE files (path TEXT PRIMARY KEY, sha256 TEXT NOT NULL, version INTEGER NOT NULL)",
    "CREATE TABLE dirs (path TEXT PRIMARY KEY, version INTEGER NOT NULL)",
    "CREATE TABLE sets (version INTEGER PRIMARY KEY, files INTEGER NOT NULL)",
)


def connect(db: Path) -> closing[sqlite3.Connection]:
    return closing(sqlite3.connect(db, isolation_level=None, timeout=30))


@dataclass
class Seen:
    """What a check found on disk and in the database."""

    versions: list[int | None]
    """Each file's version (None: torn)."""
    db_version: int
    rows: dict[str, tuple[str, int]]
    dirs_on_disk: set[str]
    dirs_in_db: dict[str, int]
    columns: set[str]
    markers: list[tuple[str, str]]
    integrity: str

    def problems(self, nfiles: int, files: dict[str, bytes]) -> list[str]:
        """Why files and database are not at one version (empty: they are)."""
        v = self.db_version
        out = []
        if any(version != v for version in self.versions):
            out.append(f"file versions {self.versions}, database at {v}")
        for i in range(nfiles):
            path = file_path(i)
            row = self.rows.get(path)
            if row is None or row[1] != v or row[0] != sha(files[path]):
                out.append(f"{path}: row {row} does not match the file")
        if self.dirs_on_disk != set(self.dirs_in_db) or any(
            made > v for made in self.dirs_in_db.values()
        ):
            out.append(f"directories {sorted(self.dirs_on_disk)}, rows {self.dirs_in_db}")
        expected = {f"c{k:06d}" for k in range(1, v + 1) if migrates(k)}
        if self.columns != expected:
            out.append(f"migrated columns {sorted(self.columns)} at version {v}")
        return out


def migrates(version: int) -> bool:
    return version % 5 == 0


def makes_dir(version: int) -> bool:
    return version % 2 == 0


def dir_path(version: int) -> str:
    return f"{DIRS}/d{version:06d}"


def look(root: Path, db: Path, nfiles: int) -> tuple[Seen, dict[str, bytes]]:
    files: dict[str, bytes] = {}
    versions = []
    for i in range(nfiles):
        try:
            data = (root / file_path(i)).read_bytes()
        except FileNotFoundError:
            data = b""
        files[file_path(i)] = data
        versions.append(parse_version(data, i))
    dirs_root = root / DIRS
    on_disk = {
        f"{DIRS}/{name}"
        for name in os.listdir(dirs_root)
        if not is_temp_name(name) and (dirs_root / name).is_dir()
    }
    with connect(db) as conn:
        db_version = conn.execute("SELECT max(version) FROM sets").fetchone()[0]
        rows = {p: (s, v) for p, s, v in conn.execute("SELECT path, sha256, version FROM files")}
        dirs = dict(conn.execute("SELECT path, version FROM dirs").fetchall())
        columns = {r[1] for r in conn.execute("PRAGMA table_info(sets)") if r[1].startswith("c")}
        has_markers = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'atomictools_changesets'"
        ).fetchone()
        markers = (
            sorted(conn.execute("SELECT txid, record FROM atomictools_changesets").fetchall())
            if has_markers
            else []
        )
        integrity = ", ".join(str(r[0]) for r in conn.execute("PRAGMA integrity_check"))
    seen = Seen(versions, db_version, rows, on_disk, dirs, columns, markers, integrity)
    return seen, files


def ours_under(root: Path) -> list[Path]:
    return sorted(
        Path(dirpath, name)
        for dirpath, dirnames, filenames in os.walk(root)
        for name in dirnames + filenames
        if is_temp_name(name)
    )


# -- the set of one round ----------------------------------------------------------------------


class Bodies:
    """Random file bodies, cut from one pool (cheap to draw)."""

    def __init__(self, rng: random.Random, max_size: int) -> None:
        alphabet = "abcdefghijklmnopqrstuvwxyz      \n"
        self.pool = "".join(rng.choices(alphabet, k=max_size * 2))
        self.rng = rng

    def draw(self, min_size: int, max_size: int) -> str:
        size = self.rng.randint(min_size, max_size)
        start = self.rng.randrange(0, len(self.pool) - size)
        return self.pool[start : start + size]


def round_changes(
    root: Path, version: int, previous: int, nfiles: int, bodies: Bodies, sizes: tuple[int, int]
) -> list[dict[str, Any]]:
    """Round ``version``'s apply_changes items, as MCP sends them (the files are at
    ``previous``): files first, the sql step second, a mkdir between the files."""
    items: list[dict[str, Any]] = []
    statements: list[dict[str, Any]] = []
    if migrates(version):
        sql = f"ALTER TABLE sets ADD COLUMN c{version:06d} INTEGER DEFAULT {version}"
        statements.append({"sql": sql})
    for i in range(nfiles):
        path = file_path(i)
        if i == version % nfiles:  # the header's version changes, the body stays
            old, new = header_of(i, previous), header_of(i, version)
            items.append({"op": "edit", "path": path, "edits": [{"oldText": old, "newText": new}]})
            data = (root / path).read_bytes()
            assert data.startswith(old.encode())
            digest = sha(new.encode() + data[len(old) :])
        else:
            content = make_version(i, version, bodies.draw(*sizes))
            items.append({"op": "write", "path": path, "content": content})
            digest = sha(content.encode())
        statements.append(
            {
                "sql": "UPDATE files SET sha256 = ?, version = ? WHERE path = ?",
                "params": [digest, version, path],
            }
        )
    if makes_dir(version):  # between the files: the set stages under a preparing record
        items.insert(nfiles // 2, {"op": "mkdir", "path": dir_path(version)})
        statements.append(
            {
                "sql": "INSERT INTO dirs (path, version) VALUES (?, ?)",
                "params": [dir_path(version), version],
            }
        )
    statements.append(
        {"sql": "INSERT INTO sets (version, files) VALUES (?, ?)", "params": [version, nfiles]}
    )
    return [items[0], {"op": "sql", "database": DB_NAME, "statements": statements}, *items[1:]]


# -- the process under test ------------------------------------------------------------------


@dataclass
class Proc:
    """One running server (or child) and how the harness speaks to it."""

    process: anyio.abc.Process
    stderr_path: Path
    call: Callable[[list[dict[str, Any]], Callable[[float, float | None], None]], Any]
    stack: AsyncExitStack
    reports_progress: bool

    @property
    def pid(self) -> int:
        return self.process.pid


class HarnessError(RuntimeError):
    """The harness itself went wrong (a server died on its own, never got ready, ...)."""


@dataclass
class Answer:
    ok: bool
    text: str
    txid: str | None = None


async def start_server(root: Path, state: Path, db: Path, log: Path, mode: str) -> Proc:
    argv = [sys.executable, "-m", "atomictools", "serve", "--root", str(root), "--db"]
    argv += [f"{DB_NAME}={db}", "--state-dir", str(state)]
    process = await _spawn(argv, state, log)
    stack = AsyncExitStack()
    client = Client(
        pipe_transport(process), mode=mode, cache=None, read_timeout_seconds=READY_TIMEOUT
    )
    try:
        await stack.enter_async_context(client)
        ready = await client.call_tool("list_allowed_directories", {})
        if ready.is_error:
            raise HarnessError(f"list_allowed_directories failed: {ready}")
    except BaseException as err:
        await _kill(process, stack)
        raise HarnessError(f"the server did not serve ({err!r}):\n{_tail(log)}") from err

    async def call(changes: list[dict[str, Any]], on_progress: Any) -> Answer:
        async def progress(done: float, total: float | None, message: str | None) -> None:
            del message
            on_progress(done, total)

        result = await client.call_tool(
            "apply_changes", {"changes": changes}, progress_callback=progress
        )
        content = result.structured_content or {}
        text = "\n".join(getattr(block, "text", "") for block in result.content)
        return Answer(not result.is_error, text, content.get("txid"))

    return Proc(process, log, call, stack, reports_progress=True)


async def start_child(
    root: Path, state: Path, db: Path, log: Path, mode: str, *, naive: bool = False
) -> Proc:
    del mode
    argv = [sys.executable, str(CHILD), "loop", str(root), str(state), str(db)]
    argv += ["--naive"] if naive else []
    process = await _spawn(argv, state, log)
    stack = AsyncExitStack()
    assert process.stdout is not None
    assert process.stdin is not None
    stdout, stdin = process.stdout, process.stdin
    buffer = bytearray()

    async def line() -> bytes:
        while b"\n" not in buffer:
            chunk = await stdout.receive()
            buffer.extend(chunk)
        end = buffer.index(b"\n") + 1
        out = bytes(buffer[:end])
        del buffer[:end]
        return out

    try:
        with anyio.fail_after(READY_TIMEOUT):
            if (await line()).strip() != b"ready":
                raise HarnessError("the child did not say ready")
    except BaseException as err:
        await _kill(process, stack)
        raise HarnessError(f"the child did not start ({err!r}):\n{_tail(log)}") from err

    async def call(changes: list[dict[str, Any]], on_progress: Any) -> Answer:
        del on_progress  # the child reports no progress
        await stdin.send(json.dumps(changes).encode() + b"\n")
        answer = json.loads(await line())
        if "ok" in answer:
            return Answer(True, "", answer["ok"]["txid"])
        return Answer(False, answer["error"])

    return Proc(process, log, call, stack, reports_progress=False)


async def start_naive(root: Path, state: Path, db: Path, log: Path, mode: str) -> Proc:
    return await start_child(root, state, db, log, mode, naive=True)


STARTERS = {"server": start_server, "child": start_child, "naive": start_naive}
"""``server``: the real server; ``child``: the engine in a plain child; ``naive``: the
control, a child committing files and statements one after the other."""


async def _spawn(argv: list[str], state: Path, log: Path) -> anyio.abc.Process:
    env = {**os.environ, STATE_DIR_ENV: str(state)}
    env.pop(CRASH_ENV, None)
    env.pop(CRASH_SIGNAL_ENV, None)
    with open(log, "wb") as stderr:
        return await anyio.open_process(argv, stderr=stderr, env=env)


async def _kill(process: anyio.abc.Process, stack: AsyncExitStack) -> None:
    """Kill (if still alive) and reap our own child, by its pid; then disconnect."""
    if process.returncode is None:
        with suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
    with anyio.move_on_after(10, shield=True):
        await process.wait()
    with suppress(Exception):
        await stack.aclose()
    with suppress(Exception):
        await process.aclose()


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-3000:]
    except OSError:
        return "(no stderr)"


# -- the campaign ----------------------------------------------------------------------------


@dataclass
class Campaign:
    driver: str
    rounds: int = 0
    before_commit: int = 0
    """Rounds whose set was rolled back (killed before its commit point)."""
    after_commit: int = 0
    """Rounds whose set was rolled forward or had finished."""
    torn: int = 0
    mixed: int = 0
    wrong_outcome: int = 0
    """At one version, but not one the kill allows (lost, or applied though uncommitted)."""
    leftovers: int = 0
    stale_markers: int = 0
    """The marker row of a set killed after its record went, before it dropped the row:
    expected, and dropped by the next set that commits (checked)."""
    young_claims: int = 0
    """The claim of a set killed before it wrote a journal record, younger than the sweep's
    grace period after a recovery: expected, and removed by a sweep once older (checked)."""
    integrity_failures: int = 0
    call_errors: int = 0
    server_errors: int = 0
    timings: Counter[str] = field(default_factory=Counter)
    phases: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    call_ms: list[float] = field(default_factory=list)
    start_ms: list[float] = field(default_factory=list)
    recover_ms: list[float] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def anomalies(self) -> int:
        return (
            self.torn
            + self.mixed
            + self.wrong_outcome
            + self.leftovers
            + self.integrity_failures
            + self.call_errors
            + self.server_errors
        )

    def summary(self) -> str:
        return (
            f"mixed sigkill ({self.driver}): rounds={self.rounds} before_commit="
            f"{self.before_commit} after_commit={self.after_commit} torn={self.torn} mixed="
            f"{self.mixed} wrong_outcome={self.wrong_outcome} leftovers={self.leftovers} "
            f"stale_markers={self.stale_markers} "
            f"young_claims={self.young_claims} "
            f"integrity={self.integrity_failures} call_errors={self.call_errors} "
            f"server_errors={self.server_errors} time={self.elapsed:.1f}s"
        )


@dataclass
class Settings:
    nfiles: int = 4
    sizes: tuple[int, int] = (16 * 1024, 256 * 1024)
    keep_logs: bool = False


class Lane:
    """One root, one state directory, one database; the server of the round."""

    def __init__(
        self, workdir: Path, driver: str, rng: random.Random, campaign: Campaign, s: Settings
    ) -> None:
        self.root = workdir / "root"
        self.state = workdir / "state"
        self.db = workdir / "db" / f"{DB_NAME}.db"
        self.logs = workdir / "logs"
        self.start = STARTERS[driver]
        self.naive = driver == "naive"
        self.rng = rng
        self.campaign = campaign
        self.settings = s
        self.bodies = Bodies(rng, s.sizes[1])
        self.version = 0
        """The version files and database are at (after the last check)."""
        self.starts = 0
        self.stale: set[str] = set()
        """Stale marker rows not dropped yet (no set committed since they were left)."""
        self.young_claims: list[Path] = []
        """Claims ``young_claim`` kept: each must go once past the sweep's grace period."""
        self.window = 0.0
        """``during call``: kills are drawn from [0, window] seconds after the request; it
        starts at the first call's duration (the first round's kill comes after its answer)."""
        self.commit_window = 0.05
        """``after staging``: from the last staging notification to the answer."""

    def setup(self) -> None:
        for directory in (self.root / DIRS, self.state, self.db.parent, self.logs):
            directory.mkdir(parents=True)
        with connect(self.db) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            for statement in SCHEMA:
                conn.execute(statement)
            for i in range(self.settings.nfiles):
                content = make_version(i, 0, self.bodies.draw(*self.settings.sizes)).encode()
                (self.root / file_path(i)).write_bytes(content)
                conn.execute(
                    "INSERT INTO files (path, sha256, version) VALUES (?, ?, 0)",
                    (file_path(i), sha(content)),
                )
            conn.execute("INSERT INTO sets (version, files) VALUES (0, ?)", (self.settings.nfiles,))

    async def start_proc(self) -> Proc:
        self.starts += 1
        mode = ("legacy", "auto")[self.starts % 2]
        log = self.logs / f"proc-{self.starts}.log"
        started = time.perf_counter()
        proc = await self.start(self.root, self.state, self.db, log, mode)
        self.campaign.start_ms.append((time.perf_counter() - started) * 1000)
        return proc

    def changes(self, version: int) -> list[dict[str, Any]]:
        s = self.settings
        return round_changes(self.root, version, self.version, s.nfiles, self.bodies, s.sizes)

    def _timing(self) -> str:
        draw, total = self.rng.random(), 0.0
        for name, share in TIMINGS:
            total += share
            if draw < total:
                return name
        return TIMINGS[-1][0]

    def _watch_prepared(self, pid: int, stop: threading.Event, delay: float) -> bool:
        """In a thread: SIGKILL ``pid`` once a ``prepared`` record appears (True)."""
        journals = self.state / "journals"
        while not stop.is_set():
            try:
                names = [n for n in os.listdir(journals) if n.endswith(RECORD_SUFFIX)]
            except FileNotFoundError:
                names = []
            for name in names:
                try:
                    prepared = b'"state": "prepared"' in (journals / name).read_bytes()
                except OSError:
                    prepared = False
                if prepared:
                    if delay:
                        time.sleep(delay)
                    os.kill(pid, signal.SIGKILL)  # our own child, not reaped yet
                    return True
            time.sleep(0.0002)
        return False

    async def call_and_kill(
        self, proc: Proc, changes: list[dict[str, Any]]
    ) -> tuple[Answer | None, str]:
        """Send the set, SIGKILL the process; (its answer if it came first, the timing)."""
        timing = self._timing() if self.window else "after response"
        if timing == "after staging" and not proc.reports_progress:
            timing = "during call"  # the child reports no progress
        answer: list[Answer | BaseException] = []
        done, staged = anyio.Event(), anyio.Event()
        staged_at: list[float] = []
        total_items = len(changes)
        fired: list[bool] = []

        def on_progress(progress: float, total: float | None) -> None:
            if total and progress >= total_items and not staged_at:
                staged_at.append(time.perf_counter())
                staged.set()

        async def run() -> None:
            try:
                answer.append(await proc.call(changes, on_progress))
            except Exception as err:
                answer.append(err)
            finally:
                done.set()
                staged.set()

        sent = time.perf_counter()
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            with anyio.fail_after(CALL_TIMEOUT):
                if timing == "after response":
                    await done.wait()
                elif timing == "at prepared record":
                    stop = threading.Event()
                    delay = self.rng.choice([0.0, self.rng.uniform(0, 0.002)])

                    async def watch() -> None:
                        watched = anyio.to_thread.run_sync(
                            self._watch_prepared, proc.pid, stop, delay
                        )
                        fired.append(await watched)

                    async with anyio.create_task_group() as watchers:
                        watchers.start_soon(watch)
                        await done.wait()
                        stop.set()
                elif timing == "after staging":
                    await staged.wait()
                    with anyio.move_on_after(self.rng.uniform(0, self.commit_window)):
                        await done.wait()
                else:
                    with anyio.move_on_after(self.rng.uniform(0, self.window)):
                        await done.wait()
                killed_first = any(fired)
                answered = done.is_set() and not killed_first
                if not killed_first:
                    if proc.process.returncode is not None:
                        raise HarnessError(
                            f"the process exited on its own ({proc.process.returncode}):\n"
                            + _tail(proc.stderr_path)
                        )
                    os.kill(proc.pid, signal.SIGKILL)
                await proc.process.wait()
                await done.wait()
        await _kill(proc.process, proc.stack)
        if proc.process.returncode != -signal.SIGKILL:
            raise HarnessError(f"the process exited {proc.process.returncode}, not by SIGKILL")
        got = answer[0] if answered and answer else None
        if isinstance(got, Answer) and got.ok:
            elapsed = time.perf_counter() - sent
            self.campaign.call_ms.append(elapsed * 1000)
            self.window = self.window or elapsed
            if staged_at:
                # The notification reaches the harness late: aim a little short of the answer.
                self.commit_window = max(0.002, 0.75 * (time.perf_counter() - staged_at[0]))
        if timing == "during call":  # aim: about one kill in six comes after the answer
            self.window *= 0.85 if answered else 1.03
        return (got if isinstance(got, Answer) else None), timing

    def kill_phase(self, answer: Answer | None, version: int) -> tuple[str, str | None]:
        """What the kill left, read from the disk before anything recovers: the phase, and
        the txid of the round's set where the disk (or the answer) names it (``staging``:
        claims or members of ours, and no journal record)."""
        if answer is not None:
            return "answered", answer.txid
        journals = self.state / "journals"
        names = sorted(os.listdir(journals)) if journals.is_dir() else []
        records = [read_record(journals / n) for n in names if n.endswith(RECORD_SUFFIX)]
        seen, _files = look(self.root, self.db, self.settings.nfiles)
        fresh = [name for name, _record in seen.markers if name not in self.stale]
        ours = [p for p in ours_under(self.root) if p not in self.young_claims]
        members = [m for p in ours if (m := parse_member(p.name)) is not None]
        claims = [txid for p in ours if (txid := parse_claim(p.name)) is not None]
        for record in records:
            if record is None:
                continue
            if record.state == "preparing":
                return "staging (preparing record)", record.txid
            if record.state == "prepared":
                committed = record.txid in fresh
                phase = "committed, files pending" if committed else "prepared, not committed"
                return phase, record.txid
            return "committed, files pending", record.txid  # the control's files alone
        if fresh:
            return "finished, marker left", fresh[0]
        if members or claims:
            return "staging", members[0].txid if members else claims[0]
        if seen.db_version == version:
            return "done, no answer", None
        split = seen.versions == [version] * len(seen.versions)
        return (SPLIT if split else "before staging"), None

    async def recover(self) -> atomictools.RecoveryReport:
        """What an operator runs while the restarted server serves (its own sweep is later)."""
        started = time.perf_counter()
        report = await anyio.to_thread.run_sync(
            lambda: atomictools.recover([self.root], state_dir=self.state)
        )
        self.campaign.recover_ms.append((time.perf_counter() - started) * 1000)
        return report

    def scan_log(self, log: Path, where: str) -> None:
        text = log.read_text(errors="replace")
        bad = [
            line
            for line in text.splitlines()
            if "Traceback" in line or " ERROR " in line or " CRITICAL " in line
        ]
        if bad:
            self.campaign.server_errors += 1
            self.campaign.problems.append(f"{where}: the process logged {bad[:3]}")
        elif not self.settings.keep_logs:
            log.unlink(missing_ok=True)

    async def one_round(self, proc: Proc, version: int) -> Proc:
        c = self.campaign
        where = f"round {c.rounds + 1} (v{version})"
        changes = self.changes(version)
        answer, timing = await self.call_and_kill(proc, changes)
        c.timings[timing] += 1
        if answer is not None and not answer.ok:
            c.call_errors += 1
            c.problems.append(f"{where}: the call failed: {answer.text[:500]}")
        phase, txid = self.kill_phase(answer, version)
        c.phases[phase] += 1
        where = f"round {c.rounds + 1} (v{version}, {timing}, {phase})"
        self.scan_log(proc.stderr_path, where)

        restarted = await self.start_proc()  # startup recovery runs before it serves
        journals = self.state / "journals"
        left = sorted(os.listdir(journals)) if journals.is_dir() else []
        if left:
            c.leftovers += len(left)
            c.problems.append(f"{where}: journal records after the restart: {left}")
        seen, files = look(self.root, self.db, self.settings.nfiles)
        torn = [file_path(i) for i, v in enumerate(seen.versions) if v is None]
        if torn:
            c.torn += len(torn)
            c.problems.append(f"{where}: torn {torn}")
        problems = seen.problems(self.settings.nfiles, files)
        if problems:
            c.mixed += 1
            c.problems.append(f"{where}: mixed: {'; '.join(problems)}")
            split = seen.versions == [version] * len(seen.versions)
            if self.naive and split and seen.db_version == self.version:
                # The control's files committed, its statements not: they run now, so the
                # lane goes on (the kill is counted as after the commit point).
                self.catch_up(changes)
                seen, files = look(self.root, self.db, self.settings.nfiles)
        at = seen.db_version
        if at == version:
            c.after_commit += 1
        elif at == self.version:
            c.before_commit += 1
        lost = at != version and (phase in AFTER_COMMIT or (answer is not None and answer.ok))
        if not problems and (
            at not in (self.version, version) or lost or (at == version and phase in BEFORE_COMMIT)
        ):
            c.wrong_outcome += 1
            c.problems.append(f"{where}: at version {at}, before {self.version}")
        if seen.integrity != "ok":
            c.integrity_failures += 1
            c.problems.append(f"{where}: integrity_check {seen.integrity}")

        swept_at = time.time()  # the sweep reads every claim's age after this
        report = await self.recover()
        for left_txid, unfinished in report.unfinished.items():
            c.leftovers += 1 + len(unfinished.members)
            c.problems.append(
                f"{where}: left for a person: {left_txid} {unfinished.reason} {unfinished.members}"
            )
        if report.conflicts:
            c.leftovers += len(report.conflicts)
            c.problems.append(f"{where}: conflicts {report.conflicts}")
        ours = [p for p in ours_under(self.root) if not self.young_claim(p, phase, txid, swept_at)]
        if ours:
            c.leftovers += len(ours)
            c.problems.append(f"{where}: files of ours after recover: {[p.name for p in ours]}")
            for path in ours:  # repaired, so one leftover is counted once
                path.unlink(missing_ok=True)
        self.check_markers(where, phase, txid, committed=at == version)
        if at in (self.version, version):
            self.version = at
        else:
            raise HarnessError(f"{where}: the lane is at version {at}; cannot go on")
        c.rounds += 1
        return restarted

    def young_claim(self, path: Path, phase: str, round_txid: str | None, swept_at: float) -> bool:
        """Whether ``path`` is a claim a recovery's sweep, run after ``swept_at``, may keep:
        the round's set's, alone, younger than the sweep's grace period, left by a kill before
        the set wrote a journal record (phase ``staging``). No recovery handled that set, and
        a live set's claim before its first member looks the same, so no sweep takes it yet;
        one past the grace period must go (at a later round's recovery, or ``final_set``'s).
        The claim of a set whose record a recovery handled goes whatever its age."""
        txid = parse_claim(path.name)
        if txid is None or swept_at - path.lstat().st_mtime >= GRACE_SECONDS:
            return False
        if path in self.young_claims:  # kept by an earlier round's check, and still young
            return True
        if phase != "staging" or txid != round_txid:
            return False
        siblings = (parse_member(n) for n in os.listdir(path.parent))
        if any(m is not None and m.txid == txid for m in siblings):
            return False
        self.young_claims.append(path)
        self.campaign.young_claims += 1
        return True

    def check_markers(self, where: str, phase: str, txid: str | None, *, committed: bool) -> None:
        """One marker row may be left stale: the round's set's own (named by its txid, its
        record gone), when the kill came after the set removed its record and before it
        dropped the row (``finished, marker left``); the next set that commits drops it in
        its transaction. Any other row is left over: one whose record exists (recovery is
        done), a ``decided`` row (recovery drops it with the marker), a new one after any
        other kill, or a stale one that outlived a set that committed."""
        c = self.campaign
        rows = look(self.root, self.db, self.settings.nfiles)[0].markers
        live = [row for row in rows if os.path.lexists(row[1])]
        stale = {name for name, record in rows if not os.path.lexists(record)}
        new = stale - self.stale
        allowed = set()
        if phase == "finished, marker left" and committed and txid is not None:
            record = os.path.join(os.path.realpath(self.state / "journals"), txid + RECORD_SUFFIX)
            if "/" not in txid and (txid, record) in rows:
                allowed = {txid}
        unexpected = new - allowed
        outlived = stale & self.stale if committed else set()
        if live or unexpected or outlived:
            c.leftovers += len(live) + len(unexpected) + len(outlived)
            c.problems.append(f"{where}: markers {rows} (stale before: {sorted(self.stale)})")
        c.stale_markers += len(new & allowed)
        self.stale = stale

    def catch_up(self, changes: list[dict[str, Any]]) -> None:
        """The round's statements, run by the harness (after the control split a set)."""
        with connect(self.db) as conn:
            conn.execute("BEGIN IMMEDIATE")
            for item in changes:
                for statement in item.get("statements", ()):
                    conn.execute(statement["sql"], statement.get("params") or ())
            conn.execute("COMMIT")

    async def final_set(self, proc: Proc) -> None:
        """One uninterrupted set: it must apply and leave no marker at all."""
        version = self.version + 1
        answer = await proc.call(self.changes(version), lambda _p, _t: None)
        seen, files = look(self.root, self.db, self.settings.nfiles)
        if (
            not answer.ok
            or seen.db_version != version
            or seen.problems(self.settings.nfiles, files)
        ):
            self.campaign.call_errors += 1
            self.campaign.problems.append(f"final set: {answer.text[:300]} at {seen.db_version}")
        if seen.markers:
            self.campaign.leftovers += len(seen.markers)
            self.campaign.problems.append(f"final set: markers left {seen.markers}")
        self.version = version
        if self.young_claims:  # once past the grace period, a sweep takes them
            here = [p.lstat().st_mtime for p in self.young_claims if p.is_symlink()]
            youngest = max(here, default=0.0)
            await anyio.sleep(max(0.0, youngest + GRACE_SECONDS + 0.2 - time.time()))
            await self.recover()
            kept = [p.name for p in self.young_claims if os.path.lexists(p)]
            if kept:
                self.campaign.leftovers += len(kept)
                self.campaign.problems.append(f"claims no sweep removed: {kept}")
        ours = ours_under(self.root)
        if ours:
            self.campaign.leftovers += len(ours)
            self.campaign.problems.append(f"files of ours at the end: {[p.name for p in ours]}")


@asynccontextmanager
async def _running(lane: Lane) -> AsyncIterator[list[Proc]]:
    live: list[Proc] = []
    try:
        yield live
    finally:
        for proc in live:
            await _kill(proc.process, proc.stack)


def run_campaign(
    rounds: int,
    workdir: Path,
    *,
    driver: str = "server",
    seed: int | None = None,
    settings: Settings | None = None,
    on_round: Callable[[Campaign], None] | None = None,
) -> Campaign:
    """``rounds`` kill rounds in ``workdir`` (a fresh directory)."""
    campaign = Campaign(driver)
    lane = Lane(workdir, driver, random.Random(seed), campaign, settings or Settings())
    lane.setup()

    async def main() -> None:
        async with _running(lane) as live:
            live.append(await lane.start_proc())
            for round_no in range(rounds):
                restarted = await lane.one_round(live[0], lane.version + 1)
                live[0] = restarted
                if on_round is not None:
                    on_round(campaign)
                del round_no
            await lane.final_set(live[0])

    started = time.perf_counter()
    anyio.run(main)
    campaign.elapsed = time.perf_counter() - started
    return campaign
