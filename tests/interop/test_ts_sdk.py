"""Interop with the official TypeScript SDK client (``@modelcontextprotocol/sdk``, pinned in
``package.json``): an independent implementation of the protocol against our server.

``ts_client.mjs`` runs the SDK's ``Client`` over ``StdioClientTransport`` (it spawns ``python -m
atomictools serve``) or ``StreamableHTTPClientTransport`` (to ``atomictools serve --transport
http`` on a free port), one command per stdin line, so that these tests can look at the disk
between steps. Each transport gets one server and one client session for the whole module.

* Every tool: ``tools/list`` shows exactly the tools in ``schemas/`` with the same schemas and
  annotations; then each tool is called once with valid arguments and its structured content
  checked for what the tool promises (the SDK itself also validates it against the tool's
  output schema), and against the disk.
* Cancellation through an ``AbortController`` (the SDK then sends ``notifications/cancelled``):
  a 48 MiB ``write_file``, an ``apply_changes`` of eight 6 MiB writes plus an edit, a delete and
  a mkdir, and a ``db_transaction`` inserting 4 million rows. Each is aborted once by a 200 ms
  timer (it fires late while Node serialises a large request: the cancel then chases a request
  still in transit) and once on its first progress notification (the server is surely in the
  middle of it). Then: the call must have been cut off (a call that finished first fails the
  test, saying so); the server answers it as cancelled (HTTP: "Request cancelled"; stdio: not
  at all), never with a result; the next call on the same session is served; on disk the
  targets are unchanged or still absent, no temp file and no journal is left, the row count is
  the same (checked again at the end of the test, when a call that was only delayed would have
  finished).

Found with this client (regression tests without Node in
``tests/server/test_transport_regressions.py``): HTTP refused bodies over 4 MiB, and over HTTP a
cancel that overtook its (large, still uploading) request was dropped and the call then ran.
``pytest -rA`` or ``-s`` shows, per aborted call, when the abort came and how long the next call
took.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import queue
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SummaryReport, summary_report, temp_files
from tests.server.test_http import start_http_server

HERE = Path(__file__).parent
SCRIPT = HERE / "ts_client.mjs"
SCHEMAS = Path(__file__).parents[2] / "schemas"
DB = "main"
MiB = 1024 * 1024
REPLY_TIMEOUT = 60.0
"""Seconds to wait for one answer of the Node client (its calls time out after 120 s)."""
SETTLE_TIMEOUT = 10.0
"""Seconds a cancelled call may take to leave no temp file and no journal behind."""
ABORT_AFTER_MS = 200
EARLY_CANCEL_LOG = "cancelled by its client before it arrived"
CANCELLED_ANSWER = {"error": {"code": -32800, "message": "Request cancelled"}}
UNIT = "".join(f"line {i:04d} of a large content to be cancelled\n" for i in range(1024))
"""45 KiB of text; the Node client repeats it (``$repeat``) into tens of megabytes."""
WRITE_SIZE = 48 * MiB
"""write_file: about 0.5 s of transfer and parsing, then 48 chunks written with progress."""
APPLY_WRITES, APPLY_SIZE = 8, 6 * MiB
"""apply_changes: 8 writes of 6 MiB, staged one by one with progress after each."""
DB_STATEMENTS, DB_ROWS = 20, 200_000
"""db_transaction: 20 INSERTs of 200,000 rows (about 2 s); progress after each batch."""
BENIGN_SDK_ERRORS = re.compile(
    r"Received a progress notification for an unknown token"
    r'|Received a response for an unknown message ID: \{"jsonrpc":"2.0","id":\d+,"error":'
    r'\{"code":-32800,"message":"Request cancelled"\}\}'
)
"""What the SDK reports, and may, about calls it aborted: progress the server sent before it
saw the cancel, and the "Request cancelled" error with which the Python SDK ends the HTTP
response of a cancelled request (stdio sends nothing). A *result* for an aborted call would
mean the server finished it anyway: that is not benign."""


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def repeat(size: int) -> dict[str, Any]:
    """Content of about ``size`` bytes, built by the Node client."""
    return {"$repeat": [UNIT, size // len(UNIT)]}


# -- the Node client ----------------------------------------------------------------------------


class TsClient:
    """``node ts_client.mjs ...`` as a subprocess: one JSON command in, one JSON answer out."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        with log.open("ab") as stderr:
            self.proc = subprocess.Popen(
                ["node", str(SCRIPT), *args],
                cwd=HERE,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.next_id = 0
        self.hello = self._answer(0)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def _answer(self, wanted: int, timeout: float = REPLY_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                pytest.fail(f"no answer from the TS client in {timeout} s:\n{self.stderr()}")
            if line is None:
                pytest.fail(f"the TS client exited ({self.proc.poll()}):\n{self.stderr()}")
            answer: dict[str, Any] = json.loads(line)
            if answer["id"] == wanted:
                return answer

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one command; return its answer (which must not be an SDK exception)."""
        answer = self.send(op, **fields)
        assert answer["ok"], f"{op} {fields.get('name', '')}: the SDK threw {answer['error']}"
        return answer

    def send(self, op: str, **fields: Any) -> dict[str, Any]:
        self.next_id += 1
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"id": self.next_id, "op": op, **fields}) + "\n")
        self.proc.stdin.flush()
        return self._answer(self.next_id)

    def call(self, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """A tool call's result (isError or not)."""
        result: dict[str, Any] = self.request("call", name=name, arguments=arguments or {})[
            "result"
        ]
        return result

    def ok(self, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """The call succeeds with structured content plus a text block; returns the content."""
        result = self.call(name, arguments)
        assert not result.get("isError"), f"{name}({arguments}) failed: {text_of(result)}"
        structured = result.get("structuredContent")
        assert isinstance(structured, dict), f"{name}: no structured content in {result}"
        assert result["content"][0]["type"] == "text", result["content"]
        return structured

    def error(self, name: str, arguments: dict[str, Any], *fragments: str) -> str:
        result = self.call(name, arguments)
        message = text_of(result)
        assert result.get("isError"), f"{name}({arguments}) did not fail: {message}"
        for fragment in fragments:
            assert fragment in message, message
        return message

    def sdk_errors(self) -> list[str]:
        """What the SDK reported outside any request since the last look (not the benign)."""
        errors: list[str] = self.request("sdkErrors")["sdkErrors"]
        return [e for e in errors if not BENIGN_SDK_ERRORS.search(e)]

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.send("close")
            self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)


def text_of(result: dict[str, Any]) -> str:
    return "\n".join(block["text"] for block in result["content"] if block["type"] == "text")


# -- one server and one TS client per transport ---------------------------------------------------


@dataclass
class Session:
    transport: str
    client: TsClient
    root: Path
    state: Path
    db_path: Path
    server_log: Path
    report: SummaryReport

    def refused_on_arrival(self) -> int:
        """Calls the server refused because their cancel arrived before them (its log says)."""
        return self.server_log.read_text(errors="replace").count(EARLY_CANCEL_LOG)

    def journals(self) -> list[str]:
        directory = self.state / "journals"
        return sorted(os.listdir(directory)) if directory.exists() else []


@pytest.fixture(scope="module", params=["stdio", "http"])
def session(
    request: pytest.FixtureRequest, node_modules: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Session]:
    transport: str = request.param
    base = tmp_path_factory.mktemp(f"ts-{transport}")
    state, db_path, log = base / "state", base / "main.db", base / "client.log"
    # INFO: the server logs each call it refuses because its cancel came first (see below).
    options = ["--db", f"{DB}={db_path}", "--state-dir", str(state), "--log-level", "INFO"]
    with contextlib.ExitStack() as stack:
        if transport == "stdio":
            root = base / "root"
            root.mkdir()
            command = [sys.executable, "-m", "atomictools", "serve", "--root", str(root)]
            client = TsClient(["stdio", *command, *options], log)
            server_log = log  # the server's stderr goes through the client's
        else:
            servers = start_http_server(base, *options)
            server = next(servers)
            stack.callback(lambda: next(servers, None))  # stops the server
            root, server_log = server.root, server.log
            client = TsClient(["http", server.url], log)
        stack.callback(client.close)
        assert client.hello["ok"], client.stderr()
        assert client.hello["protocolVersion"] == "2025-11-25", client.hello
        assert client.hello["serverVersion"]["name"] == "atomictools"
        report = summary_report(request.config, "TypeScript SDK client: aborted calls")
        yield Session(transport, client, root.resolve(), state, db_path, server_log, report)
        errors = client.sdk_errors()
        assert errors == [], "\n".join(errors)


# -- every tool once --------------------------------------------------------------------------

PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
)


def expected_tools() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(SCHEMAS.glob("*.json"))}


def test_tools_list_matches_schemas(session: Session) -> None:
    listed = {tool["name"]: tool for tool in session.client.request("listTools")["tools"]}
    expected = expected_tools()
    assert len(expected) == 24
    assert sorted(listed) == sorted(expected)
    for name, tool in listed.items():
        want = expected[name]
        for key in ("description", "inputSchema", "outputSchema", "annotations"):
            assert tool.get(key) == want[key], f"{name}: {key} differs from schemas/{name}.json"
        assert tool.get("title") == want["title"], name


def test_every_tool(session: Session) -> None:
    c, root = session.client, session.root
    c.request("listTools")  # the SDK validates structured content against these schemas
    d = root / "tools"
    (d / "sub" / "deep").mkdir(parents=True)
    hello = b"hello\nworld\n"
    (d / "hello.txt").write_bytes(hello)
    (d / "pixel.png").write_bytes(PNG)
    (d / "sub" / "a.py").write_text("print('a')\n")
    (d / "sub" / "deep" / "b.py").write_text("print('b')\n")
    (d / "sub" / "notes.md").write_text("# notes\n")
    called: set[str] = set()

    def ok(name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        called.add(name)
        return c.ok(name, arguments)

    assert ok("list_allowed_directories") == {"directories": [str(root)]}

    read = ok("read_text_file", {"path": "tools/hello.txt"})
    assert read == {
        "path": "tools/hello.txt",
        "content": "hello\nworld\n",
        "size": len(hello),
        "sha256": sha(hello),
        "encoding": "utf-8",
        "newline": "LF",
        "bom": False,
        "partial": False,
    }
    head = ok("read_file", {"path": str(d / "hello.txt"), "head": 1})
    assert (head["content"], head["partial"], head["sha256"]) == ("hello\n", True, sha(hello))

    called.add("read_media_file")
    media = c.call("read_media_file", {"path": "tools/pixel.png"})
    assert not media.get("isError"), text_of(media)
    assert media["structuredContent"] == {
        "path": "tools/pixel.png",
        "mimeType": "image/png",
        "size": len(PNG),
        "sha256": sha(PNG),
    }
    image = media["content"][1]
    assert image["type"] == "image"
    assert image["mimeType"] == "image/png"
    assert base64.b64decode(image["data"]) == PNG

    several = ok("read_multiple_files", {"paths": ["tools/hello.txt", "tools/missing.txt"]})
    first, missing = several["files"]
    assert (first["content"], first["sha256"]) == ("hello\nworld\n", sha(hello))
    assert missing["path"] == "tools/missing.txt"
    assert "not found" in missing["error"] or "does not exist" in missing["error"], missing

    written = ok("write_file", {"path": "tools/new.txt", "content": "created\n"})
    assert (d / "new.txt").read_bytes() == b"created\n"
    assert written == {
        "path": "tools/new.txt",
        "size": 8,
        "sha256": sha(b"created\n"),
        "created": True,
    }

    edited = ok(
        "edit_file",
        {
            "path": "tools/new.txt",
            "edits": [{"oldText": "created", "newText": "edited"}],
            "expectedSha256": written["sha256"],
        },
    )
    assert (d / "new.txt").read_bytes() == b"edited\n"
    assert edited["applied"] is True
    assert edited["previousSha256"] == sha(b"created\n")
    assert edited["sha256"] == sha(b"edited\n")
    assert "-created" in edited["diff"]
    assert "+edited" in edited["diff"]

    made = ok("create_directory", {"path": "tools/made/deeper"})
    assert made == {"path": "tools/made/deeper", "created": True}
    assert (d / "made" / "deeper").is_dir()

    listing = ok("list_directory", {"path": "tools"})
    assert listing["truncated"] is False
    assert {(e["name"], e["type"]) for e in listing["entries"]} == {
        ("hello.txt", "file"),
        ("pixel.png", "file"),
        ("new.txt", "file"),
        ("sub", "directory"),
        ("made", "directory"),
    }

    sized = ok("list_directory_with_sizes", {"path": "tools", "sortBy": "size"})
    sizes = [e["size"] for e in sized["entries"] if e["type"] == "file"]
    assert sizes == sorted(sizes, reverse=True)
    assert (sized["totalFiles"], sized["totalDirectories"]) == (3, 2)
    assert sized["totalSize"] == len(hello) + len(PNG) + len(b"edited\n")

    tree = ok("directory_tree", {"path": "tools/sub", "excludePatterns": ["*.md"]})
    assert tree["entries"] == 3
    assert tree["tree"] == [
        {"name": "a.py", "type": "file"},
        {"name": "deep", "type": "directory", "children": [{"name": "b.py", "type": "file"}]},
    ]

    found = ok("search_files", {"path": "tools", "pattern": "*.py"})
    assert sorted(found["matches"]) == ["tools/sub/a.py", "tools/sub/deep/b.py"]
    assert found["truncated"] is False

    info = ok("get_file_info", {"path": "tools/hello.txt"})
    assert (info["type"], info["size"], info["path"]) == ("file", len(hello), "tools/hello.txt")

    moved = ok("move_file", {"source": "tools/new.txt", "destination": "tools/made/moved.txt"})
    assert moved == {
        "source": "tools/new.txt",
        "destination": "tools/made/moved.txt",
        "replaced": False,
    }
    assert not (d / "new.txt").exists()
    assert (d / "made" / "moved.txt").read_bytes() == b"edited\n"

    copied = ok("copy_file", {"source": "tools/hello.txt", "destination": "tools/copy.txt"})
    assert (copied["sha256"], copied["size"], copied["replaced"]) == (sha(hello), len(hello), False)
    assert (d / "copy.txt").read_bytes() == hello

    deleted = ok("delete_file", {"path": "tools/copy.txt", "expectedSha256": sha(hello)})
    assert deleted == {"path": "tools/copy.txt", "type": "file"}
    assert not (d / "copy.txt").exists()

    applied = ok(
        "apply_changes",
        {
            "changes": [
                {"op": "mkdir", "path": "tools/set"},
                {"op": "write", "path": "tools/set/one.txt", "content": "one\n"},
                {
                    "op": "edit",
                    "path": "tools/hello.txt",
                    "edits": [{"oldText": "world", "newText": "there"}],
                    "expectedSha256": sha(hello),
                },
                {"op": "copy", "source": "tools/pixel.png", "destination": "tools/set/p.png"},
                {"op": "move", "source": "tools/sub/notes.md", "destination": "tools/notes.md"},
                {"op": "delete", "path": "tools/made/moved.txt"},
            ]
        },
    )
    assert applied["applied"] is True
    assert applied["txid"]
    assert [ch["op"] for ch in applied["changes"]] == [
        "mkdir",
        "write",
        "edit",
        "copy",
        "move",
        "delete",
    ]
    assert (d / "set" / "one.txt").read_bytes() == b"one\n"
    assert (d / "hello.txt").read_bytes() == b"hello\nthere\n"
    assert (d / "set" / "p.png").read_bytes() == PNG
    assert (d / "notes.md").read_bytes() == b"# notes\n"
    assert not (d / "sub" / "notes.md").exists()
    assert not (d / "made" / "moved.txt").exists()
    assert session.journals() == []

    # The change set is in the history, and one undo_change takes all of it back.
    listed = ok("list_changes", {"path": "tools", "limit": 1})["changes"]
    assert (listed[0]["id"], listed[0]["op"]) == (applied["changeId"], "apply_changes")
    undone = ok("undo_change", {"last": 1})
    assert undone["undone"] == [applied["changeId"]]
    assert (d / "hello.txt").read_bytes() == hello
    assert (d / "sub" / "notes.md").read_bytes() == b"# notes\n"
    assert not (d / "set").exists()
    assert (d / "made" / "moved.txt").exists()
    ok("undo_change", {"id": undone["changeId"]})  # redo
    assert (d / "hello.txt").read_bytes() == b"hello\nthere\n"
    assert not (d / "made" / "moved.txt").exists()

    databases = ok("db_list")["databases"]
    assert {"name": DB, "path": str(session.db_path), "configured": True} in databases

    created = ok(
        "db_execute",
        {"database": DB, "sql": "CREATE TABLE pets(id INTEGER PRIMARY KEY, name TEXT, photo BLOB)"},
    )
    assert created["committed"] is True
    inserted = ok(
        "db_execute",
        {
            "database": DB,
            "sql": "INSERT INTO pets(name, photo) VALUES (?, ?)",
            "params": ["rex", {"$blob": base64.b64encode(PNG).decode()}],
        },
    )
    assert (inserted["rowcount"], inserted["lastrowid"], inserted["committed"]) == (1, 1, True)

    tx = ok(
        "db_transaction",
        {
            "database": DB,
            "statements": [
                {"sql": "INSERT INTO pets(name) VALUES (:name)", "params": {"name": "tom"}},
                {"sql": "INSERT INTO pets(name) VALUES (?)", "params": ["kit"]},
                {"sql": "UPDATE pets SET name = upper(name) WHERE id > 1"},
            ],
        },
    )
    assert tx["committed"] is True
    assert (tx["statements"], tx["rowsChanged"], tx["lastrowid"]) == (3, 4, 3)
    assert [r["rowcount"] for r in tx["results"]] == [1, 1, 2]
    assert tx["resultsTruncated"] is False

    rows = ok(
        "db_query",
        {
            "database": DB,
            "sql": "SELECT id, name, photo FROM pets WHERE id >= ? ORDER BY id",
            "params": [1],
        },
    )
    assert rows["columns"] == ["id", "name", "photo"]
    assert rows["rows"] == [
        [1, "rex", {"$blob": base64.b64encode(PNG).decode()}],
        [2, "TOM", None],
        [3, "KIT", None],
    ]
    assert (rows["rowCount"], rows["truncated"]) == (3, False)
    with contextlib.closing(sqlite3.connect(session.db_path)) as conn:
        assert conn.execute("SELECT name FROM pets ORDER BY id").fetchall() == [
            ("rex",),
            ("TOM",),
            ("KIT",),
        ]

    schema = ok("db_schema", {"database": DB, "table": "pets"})
    assert schema["database"] == DB
    (pets,) = schema["objects"]
    assert (pets["name"], pets["type"]) == ("pets", "table")
    assert [(col["name"], col["type"], col["primaryKey"]) for col in pets["columns"]] == [
        ("id", "INTEGER", 1),
        ("name", "TEXT", 0),
        ("photo", "BLOB", 0),
    ]

    assert called == set(expected_tools()), f"not called: {set(expected_tools()) - called}"
    assert temp_files(root) == []
    errors = c.sdk_errors()
    assert errors == [], "\n".join(errors)


# -- cancellation -------------------------------------------------------------------------------


Snapshot = dict[str, bytes | None]
"""Every entry below a directory: a file's bytes, None for a directory."""


def snapshot(top: Path) -> Snapshot:
    return {
        str(p.relative_to(top)): None if p.is_dir() else p.read_bytes()
        for p in sorted(top.rglob("*"))
    }


def db_count(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        (count,) = conn.execute("SELECT count(*) FROM rows").fetchone()
        return int(count)


@dataclass
class CancelCase:
    """One long call to abort, how to check it did nothing, and how to prove the session works."""

    tool: str
    arguments: dict[str, Any]
    directory: Path
    before: Snapshot
    rows_before: int | None = None


def make_case(session: Session, tool: str, name: str) -> CancelCase:
    d = session.root / "cancel" / name
    d.mkdir(parents=True)
    rel = f"cancel/{name}"
    if tool == "write_file":
        (d / "target.txt").write_bytes(b"old content\n")
        arguments: dict[str, Any] = {"path": f"{rel}/target.txt", "content": repeat(WRITE_SIZE)}
    elif tool == "apply_changes":
        for i in range(0, APPLY_WRITES, 2):  # half the targets exist, half are new
            (d / f"file{i}.txt").write_bytes(f"old {i}\n".encode())
        (d / "edited.txt").write_bytes(b"keep OLD here\n")
        (d / "doomed.txt").write_bytes(b"not deleted\n")
        changes: list[dict[str, Any]] = [
            {"op": "write", "path": f"{rel}/file{i}.txt", "content": repeat(APPLY_SIZE)}
            for i in range(APPLY_WRITES)
        ]
        changes += [
            {
                "op": "edit",
                "path": f"{rel}/edited.txt",
                "edits": [{"oldText": "OLD", "newText": "NEW"}],
            },
            {"op": "delete", "path": f"{rel}/doomed.txt"},
            {"op": "mkdir", "path": f"{rel}/newdir"},
        ]
        arguments = {"changes": changes}
    else:
        insert = (
            "INSERT INTO rows(n) SELECT x FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL "
            f"SELECT x + 1 FROM c WHERE x < {DB_ROWS}) SELECT x FROM c)"
        )
        arguments = {"database": DB, "statements": [{"sql": insert}] * DB_STATEMENTS}
    rows = db_count(session.db_path) if tool == "db_transaction" else None
    return CancelCase(tool, arguments, d, snapshot(d), rows)


def next_call(session: Session, case: CancelCase) -> float:
    """The first call after the abort, on the same session: it must be served normally.

    It is also a barrier: it needs what the cancelled call held (the file's lock, the
    database's write lock), so once it answered, the cancelled call has fully unwound.
    """
    c, rel = session.client, case.directory.relative_to(session.root).as_posix()
    started = time.monotonic()
    if case.tool == "write_file":
        c.error(
            "write_file",
            {"path": f"{rel}/target.txt", "content": "x", "createOnly": True},
            "exists",
        )
        read = c.ok("read_text_file", {"path": f"{rel}/target.txt"})
        assert (read["content"], read["sha256"]) == ("old content\n", sha(b"old content\n"))
    elif case.tool == "apply_changes":
        c.error(
            "write_file", {"path": f"{rel}/file0.txt", "content": "x", "createOnly": True}, "exists"
        )
        files = c.ok(
            "read_multiple_files", {"paths": [f"{rel}/file{i}.txt" for i in range(APPLY_WRITES)]}
        )["files"]
        assert [f.get("content") for f in files] == [
            f"old {i}\n" if i % 2 == 0 else None for i in range(APPLY_WRITES)
        ]
    else:
        c.ok("db_execute", {"database": DB, "sql": "UPDATE barrier SET n = n + 1"})
        counted = c.ok("db_query", {"database": DB, "sql": "SELECT count(*) FROM rows"})
        assert counted["rows"] == [[case.rows_before]]
    return time.monotonic() - started


def settled(session: Session) -> tuple[list[Path], list[str]]:
    """Temp files and journals once there are none (or what is left after SETTLE_TIMEOUT)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        left = temp_files(session.root), session.journals()
        if left == ([], []) or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def check_untouched(session: Session, case: CancelCase, what: str) -> None:
    assert snapshot(case.directory) == case.before, (
        f"{what}: {case.tool} changed {case.directory} although it was cancelled (the server "
        "finished it after the cancel, or left part of it)"
    )
    if case.rows_before is not None:
        assert db_count(session.db_path) == case.rows_before, f"{what}: rows were committed"


@pytest.fixture(scope="module")
def cancel_tables(session: Session) -> None:
    c = session.client
    c.ok("db_execute", {"database": DB, "sql": "CREATE TABLE rows(n INTEGER)"})
    c.ok("db_execute", {"database": DB, "sql": "CREATE TABLE barrier(n INTEGER)"})
    c.ok("db_execute", {"database": DB, "sql": "INSERT INTO barrier VALUES (0)"})
    c.ok(
        "db_transaction",
        {"database": DB, "statements": [{"sql": "INSERT INTO rows VALUES (1)"}] * 3},
    )


@pytest.mark.parametrize("tool", ["write_file", "apply_changes", "db_transaction"])
def test_abort_leaves_nothing(session: Session, cancel_tables: None, tool: str) -> None:
    c = session.client
    cases: list[tuple[str, CancelCase]] = []
    for when, abort in (
        (f"by a {ABORT_AFTER_MS} ms timer", {"abortAfterMs": ABORT_AFTER_MS}),
        ("at the first progress notification", {"abortAtProgress": 1}),
    ):
        case = make_case(session, tool, f"{tool}-{len(cases)}")
        cases.append((when, case))
        handle = f"{tool}-{len(cases)}"
        refused = session.refused_on_arrival()
        c.request("start", handle=handle, name=tool, arguments=case.arguments, **abort)
        status = c.request("wait", handle=handle)
        started = status["startedMs"]
        took = status["settledMs"] - started
        if status["state"] == "completed":
            pytest.fail(
                f"{tool} finished in {took} ms, before the abort {when}, so the cancel proved "
                f"nothing: make its work larger (result: {text_of(status['result'])[:200]})"
            )
        assert status["state"] == "aborted", f"{tool} failed instead: {status['error']}"
        assert status["error"]["code"] == -32001, status["error"]  # the SDK's abort error
        progress = len(status["progress"])
        if session.transport == "http":
            # HTTP must end the request's POST: the server answers "Request cancelled" (even
            # when the cancel overtook the request, once the request arrived). A result would
            # mean it ran the call although it had been cancelled.
            status = c.request("waitAnswer", handle=handle, timeoutMs=REPLY_TIMEOUT * 1000)
            assert status.get("answer") == CANCELLED_ANSWER, (
                f"{tool} aborted {when}: the server's answer was {status.get('answer')}"
            )
        barrier = next_call(session, case)
        temps, journals = settled(session)
        assert temps == [], f"{tool} aborted {when}: temp files left: {temps}"
        assert journals == [], f"{tool} aborted {when}: journals left: {journals}"
        check_untouched(session, case, f"aborted {when}")
        if session.transport == "stdio":  # a cancelled request gets no answer at all
            answer = c.request("waitAnswer", handle=handle, timeoutMs=0).get("answer")
            assert answer is None, f"{tool} aborted {when}: the server answered {answer}"
        overtaken = session.refused_on_arrival() > refused
        session.report.add(
            f"{session.transport} {tool}: aborted {when} after {status['abortedMs'] - started} ms"
            f" ({progress} progress notifications"
            f"{'; the cancel overtook the request' if overtaken else ''}); "
            f"next call {barrier * 1000:.0f} ms"
        )
    # A cancelled call that had only been delayed would have finished by now.
    for when, case in cases:
        check_untouched(session, case, f"aborted {when}, checked again at the end")
    errors = c.sdk_errors()
    assert errors == [], "\n".join(errors)
