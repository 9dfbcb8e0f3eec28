"""``atomictools demo``: a one-minute walkthrough against the real server, on a temporary root.

It starts ``atomictools serve`` over stdio, drives it with the MCP SDK's client (the legacy
protocol mode, so a cancel travels as ``notifications/cancelled``), and checks on disk after
every step that the guarantee it shows held: an atomic write, a big write cancelled mid-way, a
change set, a server killed with SIGKILL in the middle of a change set and the restart that
recovers it, a cancelled database transaction, an agent's bad multi-file change taken back
with one ``undo_change`` call, and a migration with the code that uses it surviving a SIGKILL
between the database's COMMIT and the renames. Exit status 1 if any check failed.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import anyio
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.types import CallToolResult, TextContent

from atomictools.engine import (
    CRASH_ENV,
    CRASH_SIGNAL_ENV,
    is_temp_name,
)

MiB = 1024 * 1024
BIG_WRITE = 48 * MiB
ACCOUNTS = 10
START_BALANCE = 100
CALL_SECONDS = 60.0


def _text(result: CallToolResult) -> str:
    return " ".join(b.text for b in result.content if isinstance(b, TextContent)).strip()


def _temps(root: Path) -> list[str]:
    return sorted(
        str(path.relative_to(root)) for path in root.rglob("*") if is_temp_name(path.name)
    )


@dataclass
class Demo:
    """The temporary directories, the output, and the checks that failed."""

    root: Path
    state: Path
    database: Path
    log: TextIO
    out: Callable[[str], None] = print
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        self.out(f"   [{'ok' if ok else 'FAILED'}] {what}")
        if not ok:
            self.failures.append(what)

    def params(self, crash_at: str | None = None) -> StdioServerParameters:
        env = dict(os.environ)
        env.pop(CRASH_ENV, None)
        if crash_at is not None:
            env[CRASH_ENV] = crash_at
            env[CRASH_SIGNAL_ENV] = "KILL"
        args = ["-m", "atomictools", "serve", "--root", str(self.root)]
        args += ["--db", f"bank={self.database}", "--state-dir", str(self.state)]
        return StdioServerParameters(command=sys.executable, args=args, env=env)

    @asynccontextmanager
    async def server(self, crash_at: str | None = None) -> AsyncIterator[Client]:
        async with Client(stdio_client(self.params(crash_at), self.log), mode="legacy") as client:
            yield client

    async def call(self, client: Client, tool: str, **arguments: Any) -> CallToolResult:
        with anyio.fail_after(CALL_SECONDS):
            return await client.call_tool(tool, arguments)

    def journals(self) -> list[str]:
        directory = self.state / "journals"
        return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


async def _cancel_when(
    client: Client, tool: str, arguments: dict[str, Any], ready: Callable[[], bool]
) -> tuple[bool, float]:
    """Call ``tool``, cancel it once ``ready()`` (polled), return (finished?, time cancelled)."""
    finished = False
    cancelled_at = 0.0
    async with anyio.create_task_group() as group:

        async def run() -> None:
            nonlocal finished
            await client.call_tool(tool, arguments)
            finished = True
            group.cancel_scope.cancel()

        group.start_soon(run)
        if await _wait_for(ready, CALL_SECONDS) is None:
            raise TimeoutError(f"{tool} never reached the point where the demo cancels it")
        cancelled_at = time.perf_counter()
        group.cancel_scope.cancel()  # the client sends notifications/cancelled
    return finished, cancelled_at


async def _wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> float | None:
    """Seconds until ``condition()`` holds (polled each millisecond), or None."""
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        if condition():
            return time.perf_counter() - start
        await anyio.sleep(0.001)
    return None


async def step_atomic_write(demo: Demo, client: Client) -> None:
    demo.out("1. An atomic write")
    start = time.perf_counter()
    result = await demo.call(client, "write_file", path="notes.txt", content="hello, world\n")
    took = time.perf_counter() - start
    demo.out(f"   write_file notes.txt: {_text(result)} ({took * 1000:.1f} ms, fsynced)")
    read = await demo.call(client, "read_text_file", path="notes.txt")
    structured = read.structured_content or {}
    demo.check(
        (demo.root / "notes.txt").read_text() == "hello, world\n"
        and structured.get("sha256") == (result.structured_content or {}).get("sha256"),
        "the file holds the new content; the read returns the sha256 the write reported",
    )


async def step_cancelled_write(demo: Demo, client: Client) -> None:
    demo.out(f"2. A {BIG_WRITE // MiB} MiB write cancelled mid-way")
    big = demo.root / "big.txt"
    big.write_text("the old version\n")
    finished, cancelled_at = await _cancel_when(
        client,
        "write_file",
        {"path": "big.txt", "content": "x" * BIG_WRITE},
        lambda: bool(_temps(demo.root)),
    )
    if finished:
        demo.out("   the write finished before the cancel reached it (a fast machine)")
        demo.check(big.stat().st_size == BIG_WRITE, "the file is the complete new version")
        return
    demo.out("   cancelled as soon as the server's temp file appeared next to big.txt")
    gone = await _wait_for(lambda: not _temps(demo.root))
    since = (time.perf_counter() - cancelled_at) if gone is not None else None
    demo.out(
        "   temp file removed "
        + (f"{since * 1000:.1f} ms after the cancel" if since is not None else "NOT removed")
    )
    # Changes to one file are serialised: this answers once the cancelled call has unwound.
    barrier = await demo.call(client, "write_file", path="big.txt", content="", createOnly=True)
    demo.check(barrier.is_error is True, "the session serves the next call")
    demo.check(big.read_text() == "the old version\n", "big.txt still holds the old version")
    demo.check(not _temps(demo.root), "no temp file left behind")


async def step_change_set(demo: Demo, client: Client) -> None:
    demo.out("3. Several files changed as one (apply_changes)")
    (demo.root / "src").mkdir()
    (demo.root / "src" / "app.py").write_text("import old\n")
    changes = [
        {"op": "write", "path": "src/new.py", "content": "print('new')\n"},
        {"op": "edit", "path": "src/app.py", "edits": [{"oldText": "old", "newText": "new"}]},
        {"op": "move", "source": "notes.txt", "destination": "src/notes.txt"},
    ]
    start = time.perf_counter()
    result = await demo.call(client, "apply_changes", changes=changes)
    took = time.perf_counter() - start
    demo.out(f"   {_text(result).splitlines()[0].rstrip(':')} ({took * 1000:.1f} ms)")
    demo.check(
        (demo.root / "src" / "app.py").read_text() == "import new\n"
        and (demo.root / "src" / "new.py").exists()
        and (demo.root / "src" / "notes.txt").exists()
        and not (demo.root / "notes.txt").exists(),
        "all three changes are on disk",
    )
    failing = [
        {"op": "write", "path": "src/new.py", "content": "print('newer')\n"},
        {"op": "edit", "path": "src/app.py", "edits": [{"oldText": "absent", "newText": "x"}]},
    ]
    refused = await demo.call(client, "apply_changes", changes=failing)
    demo.out(f"   a set with a failing edit: {_text(refused)}")
    demo.check(
        refused.is_error is True and (demo.root / "src" / "new.py").read_text() == "print('new')\n",
        "a set with one bad change changes nothing",
    )


async def step_killed_change_set(demo: Demo) -> None:
    demo.out("4. The server killed with SIGKILL in the middle of a change set")
    files = [demo.root / f"part{i}.txt" for i in range(4)]
    for path in files:
        path.write_text("version 1\n")
    (demo.root / "log.txt").write_text("end\n")
    changes: list[dict[str, Any]] = [
        {"op": "write", "path": p.name, "content": "version 2\n"} for p in files
    ]
    changes.append(
        {
            "op": "edit",
            "path": "log.txt",
            "edits": [{"oldText": "end", "newText": "one entry\nend"}],
        }
    )
    arguments = {"changes": changes, "idempotencyKey": "demo-change-set-1"}
    # The server kills itself after the commit record, when 2 of the 5 renames are done.
    died = False
    try:
        async with demo.server(crash_at="changeset.apply:3") as doomed:
            await demo.call(doomed, "apply_changes", **arguments)
    except Exception:  # the connection drops with the process: that is the point
        died = True
    demo.check(died, "the server died mid-call (no reply)")
    versions = [p.read_text().strip()[-1] for p in files]
    demo.out(
        f"   on disk now: part0..3 at versions {', '.join(versions)}; "
        f"journal records: {len(demo.journals())}; temp files: {len(_temps(demo.root))}"
    )
    start = time.perf_counter()
    async with demo.server() as client:
        await demo.call(client, "list_allowed_directories")  # served after recovery
        took = time.perf_counter() - start
        demo.out(f"   restarted; recovery finished the change before the first call ({took:.2f} s)")
        demo.check(
            all(p.read_text() == "version 2\n" for p in files)
            and (demo.root / "log.txt").read_text() == "one entry\nend\n",
            "every file of the set is at its new version",
        )
        demo.check(not demo.journals(), "no journal record left")
        retry = await demo.call(client, "apply_changes", **arguments)
        demo.out("   the client retries the call with the same idempotencyKey:")
        demo.out(f"   {_text(retry).splitlines()[0].rstrip(':')}")
        demo.check(
            retry.is_error is not True
            and (demo.root / "log.txt").read_text() == "one entry\nend\n",
            "the retry returned the first result; nothing was applied twice",
        )
        await _wait_for(lambda: not _temps(demo.root), seconds=5.0)  # the background sweep
        demo.check(not _temps(demo.root), "no temp file left behind")


def _balances(database: Path) -> list[int]:
    with sqlite3.connect(database) as conn:
        return [row[0] for row in conn.execute("SELECT balance FROM accounts ORDER BY id")]


def _writable(database: Path) -> bool:
    """True when no transaction holds the write lock (ours rolled back)."""
    conn = sqlite3.connect(database, timeout=0, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


async def step_cancelled_transaction(demo: Demo, client: Client) -> None:
    demo.out("5. A database transaction cancelled mid-way")
    rows = [[i, START_BALANCE] for i in range(1, ACCOUNTS + 1)]
    await demo.call(
        client,
        "db_transaction",
        database="bank",
        statements=[
            {"sql": "CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)"},
            *({"sql": "INSERT INTO accounts VALUES (?, ?)", "params": row} for row in rows),
            {"sql": "CREATE TABLE scratch (x)"},
        ],
    )
    total = ACCOUNTS * START_BALANCE
    demo.out(f"   {ACCOUNTS} accounts hold {total} in total; a transaction moves money around,")
    transfers = [
        {"sql": "UPDATE accounts SET balance = balance + ? WHERE id = ?", "params": [delta, i]}
        for i in range(1, ACCOUNTS + 1)
        for delta in (-7, 7)
    ]
    slow = (
        "INSERT INTO scratch WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n "
        "WHERE x < 100000000) SELECT x FROM n"
    )
    statements = [*transfers[::2], {"sql": slow}, *transfers[1::2]]
    demo.out("   debiting every account first, then a long statement; cancelled after 0.3 s")
    start = time.perf_counter()
    finished, cancelled_at = await _cancel_when(
        client,
        "db_transaction",
        {"database": "bank", "statements": statements},
        lambda: time.perf_counter() - start > 0.3,
    )
    demo.check(not finished, "the transaction was still running when cancelled")
    free = await _wait_for(lambda: _writable(demo.database))
    if free is not None:
        demo.out(
            f"   rolled back {(time.perf_counter() - cancelled_at) * 1000:.1f} ms after the cancel"
        )
    balances = _balances(demo.database)
    demo.check(
        sum(balances) == total and balances == [START_BALANCE] * ACCOUNTS,
        f"every account back at {START_BALANCE}; the total is still {total}",
    )
    query = await demo.call(
        client, "db_query", database="bank", sql="SELECT (SELECT count(*) FROM scratch)"
    )
    demo.check(
        (query.structured_content or {}).get("rows") == [[0]],
        "the session serves the next call; the long insert left no row",
    )


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


async def step_undo(demo: Demo, client: Client) -> None:
    demo.out("6. An agent's bad multi-file change taken back with one undo_change call")
    app = demo.root / "app"
    app.mkdir()
    (app / "config.py").write_text("DEBUG = False\nTIMEOUT = 30\n")
    (app / "server.py").write_text("from config import TIMEOUT\n\ndef serve():\n    return 1\n")
    (app / "README.md").write_text("# app\n\nCall serve().\n")
    before = _files(app)
    bad = [
        {
            "op": "edit",
            "path": "app/config.py",
            "edits": [{"oldText": "TIMEOUT = 30", "newText": "TIMEOUT = 0"}],
        },
        {"op": "write", "path": "app/server.py", "content": "def serve():\n    raise SystemExit\n"},
        {"op": "delete", "path": "app/README.md"},
        {"op": "write", "path": "app/scratch.txt", "content": "notes the agent left behind\n"},
    ]
    applied = await demo.call(client, "apply_changes", changes=bad)
    change_id = (applied.structured_content or {}).get("changeId")
    demo.out(f"   the agent's apply_changes over four paths: change {change_id}")
    listed = await demo.call(client, "list_changes", path="app", limit=1)
    demo.out("   list_changes path=app limit=1:")
    for line in _text(listed).splitlines()[1:]:
        demo.out(f"     {line}")
    newest = ((listed.structured_content or {}).get("changes") or [{}])[0]
    demo.check(newest.get("id") == change_id, "the set is listed as one change, with its id")
    after = _files(app)
    preview = await demo.call(client, "undo_change", last=1, dryRun=True)
    diffs = [p for p in (preview.structured_content or {}).get("paths", []) if p.get("diff")]
    demo.out(f"   undo_change last=1 dryRun=true: {len(diffs)} diff(s), nothing written; one:")
    config = next((p["diff"] for p in diffs if p.get("path") == "app/config.py"), "")
    for line in config.splitlines():
        demo.out(f"     {line}")
    demo.check(preview.is_error is not True and _files(app) == after, "the preview changed nothing")
    start = time.perf_counter()
    undone = await demo.call(client, "undo_change", last=1)
    took = time.perf_counter() - start
    demo.out(f"   undo_change last=1: {_text(undone).splitlines()[0]} ({took * 1000:.1f} ms)")
    demo.check(
        undone.is_error is not True and _files(app) == before,
        "every file is back, byte for byte; the new file is gone, the deleted one returned",
    )
    redo_id = (undone.structured_content or {}).get("changeId")
    latest = await demo.call(client, "list_changes", path="app", limit=1)
    entry = ((latest.structured_content or {}).get("changes") or [{}])[0]
    demo.check(
        redo_id is not None and entry.get("id") == redo_id and entry.get("undoes") == [change_id],
        f"the undo is itself recorded (change {redo_id}): undoing it would redo the change",
    )


def _migrated(database: Path) -> tuple[bool, list[str]]:
    """Whether ``users`` has the new column, and the migrations recorded."""
    with closing(sqlite3.connect(database)) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(users)")]
        done = [row[0] for row in conn.execute("SELECT name FROM migrations ORDER BY name")]
    return "email" in columns, done


def _markers(database: Path) -> int:
    with closing(sqlite3.connect(database)) as conn:
        known = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'atomictools_changesets'"
        ).fetchone()
        return (
            conn.execute("SELECT count(*) FROM atomictools_changesets").fetchone()[0]
            if known
            else 0
        )


async def step_killed_migration(demo: Demo) -> None:
    demo.out("7. A migration and the code that uses it, killed between the COMMIT and the renames")
    service = demo.root / "service"
    service.mkdir()
    (service / "models.py").write_text("FIELDS = ['name']\n")
    database = service / "app.db"
    with closing(sqlite3.connect(database)) as conn, conn:
        conn.execute("CREATE TABLE users (name TEXT)")
        conn.execute("CREATE TABLE migrations (name TEXT)")
    changes: list[dict[str, Any]] = [
        {"op": "mkdir", "path": "service/migrations"},
        {
            "op": "write",
            "path": "service/migrations/0002_email.sql",
            "content": "ALTER TABLE users ADD COLUMN email TEXT;\n",
        },
        {
            "op": "edit",
            "path": "service/models.py",
            "edits": [{"oldText": "['name']", "newText": "['name', 'email']"}],
        },
        {
            "op": "sql",
            "database": "service/app.db",
            "statements": [
                {"sql": "ALTER TABLE users ADD COLUMN email TEXT"},
                {"sql": "INSERT INTO migrations (name) VALUES (?)", "params": ["0002_email"]},
            ],
        },
    ]
    # The server kills itself right after the database's COMMIT: the commit point is passed,
    # and not one file has been renamed yet.
    died = False
    try:
        async with demo.server(crash_at="db.committed") as doomed:
            await demo.call(doomed, "apply_changes", changes=changes)
    except Exception:  # the connection drops with the process: that is the point
        died = True
    demo.check(died, "the server died mid-call (no reply)")
    migrated, _ = _migrated(database)
    demo.out(
        f"   on disk now: column email {'added' if migrated else 'missing'}; models.py "
        f"{'new' if 'email' in (service / 'models.py').read_text() else 'old'}; "
        f"journal records: {len(demo.journals())}"
    )
    async with demo.server() as client:
        await demo.call(client, "list_allowed_directories")  # served after recovery
        demo.out("   restarted; recovery read the set's marker in the database and finished it")
        migrated, done = _migrated(database)
        demo.check(
            migrated
            and done == ["0002_email"]
            and (service / "models.py").read_text() == "FIELDS = ['name', 'email']\n"
            and (service / "migrations" / "0002_email.sql").is_file(),
            "the database and the code are both migrated",
        )
        demo.check(
            not demo.journals() and _markers(database) == 0,
            "no journal record and no marker row left",
        )


async def run(out: Callable[[str], None] = print) -> int:
    """The walkthrough; returns the process exit status."""
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="atomictools-demo-") as tmp:
        base = Path(tmp)
        (base / "root").mkdir()
        with open(base / "server.log", "w") as log:
            demo = Demo(base / "root", base / "state", base / "bank.db", log, out)
            out(f"atomictools demo: a real server over stdio on {demo.root}")
            try:
                async with demo.server() as client:
                    await step_atomic_write(demo, client)
                    await step_cancelled_write(demo, client)
                    await step_change_set(demo, client)
                await step_killed_change_set(demo)
                async with demo.server() as client:
                    await step_cancelled_transaction(demo, client)
                    await step_undo(demo, client)
                await step_killed_migration(demo)
            except Exception as err:  # report, do not hide: the demo failed
                demo.failures.append(f"the demo stopped: {type(err).__name__}: {err}")
                out(f"   [FAILED] the demo stopped: {type(err).__name__}: {err}")
                out(f"   server log:\n{(base / 'server.log').read_text()[-2000:]}")
    took = time.perf_counter() - began
    if demo.failures:
        out(f"{len(demo.failures)} check(s) FAILED in {took:.1f} s: " + "; ".join(demo.failures))
        return 1
    out(f"every guarantee shown held ({took:.1f} s)")
    return 0
