"""Cancelling ``apply_changes`` with a database step, end to end through the SDK's client.

A set writes three files and, in its sql step, records each file's sha256 in a ``hashes`` table
and runs a statement that takes a while (a recursive CTE over hundreds of thousands of rows,
its count stored under the set's tag). The invariant ties files and rows together: every path in
``hashes`` holds exactly the bytes whose sha256 is recorded, and the set's ``bulk`` row exists
exactly when its files are the new ones. A set torn between the files and the database (files
new, rows old, or the reverse) breaks it; so does a half-applied set of files.

The set is cancelled at many moments, from the start of the call and from the moment the server
is seen to have prepared every file (its statements are then running: the files are prepared
before the database transaction starts), in memory with a legacy-era client (the in-process
default client bypasses JSON-RPC, see test_cancel_e2e) and against a real ``atomictools serve``
over stdio. After each cancel a *barrier* (``write_file(createOnly)`` on one of the set's files,
which waits for the set's per-path lock, held until its cleanup is done) makes the disk final;
then: the invariant holds, no temp file, set member or claim of ours is left, no change-set
marker stays in the database, and the next call on the session works. Each series requires a
cancel that landed while the statements ran and still left everything old.

The server's ``--tool-timeout`` cutting a mixed set in its statements is checked too.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.types import CallToolResult

from atomictools import Limits, Workspace, is_temp_name
from atomictools.engine.durable.steps import observe_steps
from atomictools.server import ServerOptions, create_server

from .helpers import stdio_params, text_of

pytestmark = pytest.mark.anyio

DB = "main"
MARKER_TABLE = "atomictools_changesets"
CALL_TIMEOUT = 60
FILES = ("f0.txt", "f1.txt", "f2.txt")
FILE_BYTES = 512 * 1024
SLOW_ROWS = 400_000
"""Rows the slow statement's recursive CTE walks: a tenth of a second or more of SQLite work."""
TIMED_OUT_ROWS = 20_000_000
"""Seconds of SQLite work: far longer than the tool timeout below."""
TOOL_TIMEOUT = 0.5


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the database layer needs asyncio (aiosqlite)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content(path: str, tag: str) -> bytes:
    line = f"{path} at {tag}\n".encode()
    return line * (FILE_BYTES // len(line))


def plain_sql(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql, params).fetchall()


def ours(directory: Path) -> list[Path]:
    """Temp files, set members and claims of ours anywhere below ``directory``."""
    return [
        p for p in directory.rglob("*") if is_temp_name(p.name) or p.name.startswith(".atomictools")
    ]


@dataclass
class Mixed:
    """The root, its database, and what the files hold now (old, for the next set)."""

    root: Path
    rows: int = SLOW_ROWS
    current: dict[str, bytes] = field(default_factory=dict)

    @property
    def db(self) -> Path:
        return self.root / "main.db"

    def seed(self) -> None:
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            conn.execute("CREATE TABLE hashes(path TEXT PRIMARY KEY, sha256 TEXT NOT NULL)")
            conn.execute("CREATE TABLE bulk(tag TEXT PRIMARY KEY, n INTEGER)")
            for path in FILES:
                data = content(path, "seed")
                (self.root / path).write_bytes(data)
                self.current[path] = data
                conn.execute("INSERT INTO hashes VALUES (?, ?)", (path, sha(data)))
            conn.commit()

    def changes(self, tag: str) -> list[dict[str, Any]]:
        """Three writes and a sql step (in the middle: order must not matter)."""
        writes = [
            {"op": "write", "path": path, "content": content(path, tag).decode()} for path in FILES
        ]
        statements: list[dict[str, Any]] = [
            {
                "sql": "INSERT OR REPLACE INTO hashes VALUES (?, ?)",
                "params": [p, sha(content(p, tag))],
            }
            for p in FILES
        ]
        statements.append(
            {
                "sql": "INSERT INTO bulk(tag, n) SELECT ?, count(*) FROM (WITH RECURSIVE c(x) AS "
                f"(SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {self.rows}) SELECT x FROM c)",
                "params": [tag],
            }
        )
        return [writes[0], {"op": "sql", "database": DB, "statements": statements}, *writes[1:]]

    def state(self, tag: str) -> str:
        """'old' or 'new' for the set ``tag``; anything torn fails the test."""
        recorded = dict(plain_sql(self.db, "SELECT path, sha256 FROM hashes"))
        for path, digest in recorded.items():
            data = (self.root / path).read_bytes()
            assert sha(data) == digest, f"{path} does not hold what the database recorded"
        new = {path: content(path, tag) for path in FILES}
        files = {path: (self.root / path).read_bytes() for path in FILES}
        bulk = plain_sql(self.db, "SELECT n FROM bulk WHERE tag = ?", (tag,))
        if files == new:
            assert bulk == [(self.rows,)], f"files of set {tag} are new, its rows are not"
            self.current = new
            return "new"
        assert files == self.current, "the files are neither all old nor all new"
        assert bulk == [], f"rows of set {tag} are committed, its files are not"
        return "old"

    def clean(self) -> None:
        assert ours(self.root) == [], "files of ours left behind"
        if plain_sql(self.db, "SELECT 1 FROM sqlite_master WHERE name = ?", (MARKER_TABLE,)):
            markers = plain_sql(self.db, f"SELECT txid FROM {MARKER_TABLE}")
            assert markers == [], "a change-set marker stayed in the database"


async def follow_up(client: Client, mixed: Mixed, tag: str) -> None:
    """The next call on the session works: a small mixed set, then reading it back."""
    path = f"follow-{tag}.txt"
    data = f"follow-up {tag}\n"
    with anyio.fail_after(CALL_TIMEOUT):
        done = await client.call_tool(
            "apply_changes",
            {
                "changes": [
                    {"op": "write", "path": path, "content": data},
                    {
                        "op": "sql",
                        "database": DB,
                        "statements": [
                            {
                                "sql": "INSERT OR REPLACE INTO hashes VALUES (?, ?)",
                                "params": [path, sha(data.encode())],
                            }
                        ],
                    },
                ]
            },
        )
        assert not done.is_error, text_of(done)
        read = await client.call_tool("read_text_file", {"path": path})
    assert (read.structured_content or {})["content"] == data


async def barrier(client: Client) -> None:
    """Wait until the cancelled set has unwound: it holds its files' lock until then."""
    with anyio.fail_after(CALL_TIMEOUT):
        refused = await client.call_tool(
            "write_file", {"path": FILES[0], "content": "", "createOnly": True}
        )
    assert refused.is_error, text_of(refused)
    assert "already exists" in text_of(refused)


@dataclass(frozen=True)
class When:
    """Cancel ``delay`` s after the call started, or after every file was prepared."""

    delay: float
    after_prepare: bool = False


# Blind cancels from the start of the call (the earliest land before the request is read, the
# later ones in the files' preparation or the statements, depending on the machine), then
# cancels aimed at a server known to be running the statements (or committing, or done).
CANCELS = [When(d) for d in (0.0, 0.001, 0.003, 0.006, 0.01, 0.02, 0.04, 0.08)] + [
    When(d, after_prepare=True) for d in (0.0, 0.001, 0.003, 0.01, 0.02, 0.04, 0.07, 0.12)
]


@dataclass(frozen=True)
class Outcome:
    when: When | None
    cancelled: bool
    state: str
    prepared: bool
    """The server had prepared every file (its statements were starting or running)."""

    @property
    def landed_in_statements(self) -> bool:
        return self.cancelled and self.prepared and self.state == "old"


async def cancel_once(
    client: Client, mixed: Mixed, tag: str, when: When | None, *, in_process: bool
) -> Outcome:
    prepared_files = 0
    all_prepared = anyio.Event()
    result: CallToolResult | None = None

    def seen_prepared() -> None:
        if prepared_files >= len(FILES):
            all_prepared.set()

    def on_step(name: str) -> None:
        nonlocal prepared_files
        if name == "changeset.prepare":
            prepared_files += 1
            seen_prepared()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        # The engine reports each prepared file (progress 1..3 of 2 x 4), then each sql step.
        nonlocal prepared_files
        prepared_files = max(prepared_files, int(progress))
        seen_prepared()

    async def cancel_after_prepare(scope: anyio.CancelScope, delay: float) -> None:
        await all_prepared.wait()
        await anyio.sleep(delay)
        scope.cancel()

    async with anyio.create_task_group() as tg:
        with (
            observe_steps(on_step) if in_process else nullcontext(),
            anyio.fail_after(CALL_TIMEOUT),
            anyio.CancelScope() as scope,
        ):
            if when is not None and when.after_prepare:
                tg.start_soon(cancel_after_prepare, scope, when.delay)
            elif when is not None:
                scope.deadline = anyio.current_time() + when.delay
            result = await client.call_tool(
                "apply_changes", {"changes": mixed.changes(tag)}, progress_callback=on_progress
            )
        tg.cancel_scope.cancel()

    cancelled = scope.cancelled_caught
    await follow_up(client, mixed, tag)
    await barrier(client)
    state = mixed.state(tag)
    mixed.clean()
    if not cancelled:
        assert result is not None
        assert not result.is_error, text_of(result)
        assert state == "new"
    return Outcome(when, cancelled, state, prepared_files >= len(FILES))


async def cancel_series(client: Client, mixed: Mixed, *, in_process: bool) -> list[Outcome]:
    outcomes = [await cancel_once(client, mixed, "first", None, in_process=in_process)]
    for n, when in enumerate(CANCELS):
        outcomes.append(await cancel_once(client, mixed, f"c{n}", when, in_process=in_process))
    landed = [o for o in outcomes if o.landed_in_statements]
    assert landed, f"no cancel landed while the statements ran: {outcomes}"
    last = await cancel_once(client, mixed, "last", None, in_process=in_process)
    assert not last.cancelled
    return outcomes


def memory_server(root: Path, tool_timeout: float | None = None) -> Any:
    workspace = Workspace([root], limits=Limits(chunk_bytes=64 * 1024))
    return create_server(
        workspace, ServerOptions(tool_timeout=tool_timeout), databases={DB: root / "main.db"}
    )


@asynccontextmanager
async def stdio_client(root: Path, *extra: str) -> AsyncIterator[Client]:
    params = stdio_params(root, "--db", f"{DB}={root / 'main.db'}", *extra)
    async with Client(params, mode="legacy") as client:
        yield client


@pytest.fixture
def mixed(root: Path) -> Mixed:
    made = Mixed(root.resolve())
    made.seed()
    return made


async def test_cancel_in_memory_legacy(mixed: Mixed) -> None:
    async with Client(memory_server(mixed.root), mode="legacy") as client:
        await cancel_series(client, mixed, in_process=True)


async def test_cancel_over_stdio(mixed: Mixed) -> None:
    async with stdio_client(mixed.root) as client:
        await cancel_series(client, mixed, in_process=False)


# -- the server's tool timeout ----------------------------------------------------------------


async def check_timed_out(client: Client, mixed: Mixed, *, in_process: bool) -> None:
    prepared = 0

    def on_step(name: str) -> None:
        nonlocal prepared
        prepared += name == "changeset.prepare"

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        nonlocal prepared
        prepared = max(prepared, int(progress))

    mixed.rows = TIMED_OUT_ROWS
    with observe_steps(on_step) if in_process else nullcontext(), anyio.fail_after(CALL_TIMEOUT):
        result = await client.call_tool(
            "apply_changes", {"changes": mixed.changes("timed")}, progress_callback=on_progress
        )
    message = text_of(result)
    assert result.is_error, f"the set finished within the {TOOL_TIMEOUT} s timeout: {message}"
    assert "timed out" in message
    assert "nothing was changed" in message
    assert prepared >= len(FILES), "the deadline came before the statements ran"
    # The handler unwound before answering: the disk is final now, no barrier needed.
    assert mixed.state("timed") == "old"
    mixed.clean()
    mixed.rows = SLOW_ROWS
    await follow_up(client, mixed, "after-timeout")
    with anyio.fail_after(CALL_TIMEOUT):
        done = await client.call_tool("apply_changes", {"changes": mixed.changes("after")})
    assert not done.is_error, text_of(done)
    assert mixed.state("after") == "new"
    mixed.clean()


async def test_tool_timeout_in_memory_legacy(mixed: Mixed) -> None:
    server = memory_server(mixed.root, tool_timeout=TOOL_TIMEOUT)
    async with Client(server, mode="legacy") as client:
        await check_timed_out(client, mixed, in_process=True)


async def test_tool_timeout_over_stdio(mixed: Mixed) -> None:
    async with stdio_client(mixed.root, "--tool-timeout", str(TOOL_TIMEOUT)) as client:
        await check_timed_out(client, mixed, in_process=False)


def test_the_invariant_catches_a_torn_set(mixed: Mixed) -> None:
    """The state check itself: old, new, and sets torn either way must fail."""
    assert mixed.state("t") == "old"
    for path in FILES:
        (mixed.root / path).write_bytes(content(path, "t"))
    with pytest.raises(AssertionError, match="does not hold what the database recorded"):
        mixed.state("t")  # files new, rows old
    with contextlib.closing(sqlite3.connect(mixed.db)) as conn:
        for path in FILES:
            conn.execute(
                "UPDATE hashes SET sha256 = ? WHERE path = ?", (sha(content(path, "t")), path)
            )
        conn.commit()
    with pytest.raises(AssertionError, match="its rows are not"):
        mixed.state("t")  # files and hashes new, the slow statement's row missing
    with contextlib.closing(sqlite3.connect(mixed.db)) as conn:
        conn.execute("INSERT INTO bulk VALUES ('t', ?)", (SLOW_ROWS,))
        conn.commit()
    assert mixed.state("t") == "new"
    (mixed.root / FILES[1]).write_bytes(content(FILES[1], "u"))
    with pytest.raises(AssertionError):
        mixed.state("u")  # one file of another set: torn
