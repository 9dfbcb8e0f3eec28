"""Issue 12: a newcomer's first hour, as a newcomer meets it (real processes, the real client).

- the host config that ``atomictools config`` prints starts a working server when pasted;
- HTTP says where it listens and how to authenticate, and a port in use is a clear error;
- a line on stdin that is not JSON-RPC gets a JSON-RPC error, and the session goes on;
- ``--db`` in a directory that does not exist fails at start, not at first use;
- small things: db_schema columns, our key table hidden, "changes no rows", writing into a
  missing directory names create_directory, a change set touching other roots needs a person,
  ``recover --dry-run`` says what it would do.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from atomictools import Workspace
from atomictools.engine.changes.idempotency import KEY_TABLE
from atomictools.server import create_server
from tests.server.helpers import state_env, text_of

SCRIPT = Path(sys.executable).parent / "atomictools"


def atomictools(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.anyio
async def test_printed_host_config_starts_a_working_server(tmp_path: Path) -> None:
    root = tmp_path / "project"
    root.mkdir()
    done = atomictools("config", "--root", str(root), "--", "--tool-timeout", "30")
    assert done.returncode == 0, done.stderr
    entry = json.loads(done.stdout)["mcpServers"]["atomictools"]
    assert os.path.isabs(entry["command"])
    assert entry["args"] == ["serve", "--root", str(root), "--tool-timeout", "30"]
    # Started exactly as a host would: that command, those arguments, nothing else.
    params = StdioServerParameters(command=entry["command"], args=entry["args"], env=state_env())
    async with Client(params) as client:
        written = await client.call_tool("write_file", {"path": "hello.txt", "content": "hi\n"})
        assert not written.is_error, text_of(written)
    assert (root / "hello.txt").read_text() == "hi\n"


def test_http_says_where_it_listens_and_how_to_authenticate(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            str(SCRIPT),
            "serve",
            "--root",
            str(tmp_path),
            "--transport",
            "http",
            "--port",
            "0",
            "--auth-token-env",
            "ATOK",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "ATOK": "s3cret"},
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        match = re.search(r"at (http://127\.0\.0\.1:(\d+)/mcp); (.*)$", line)
        assert match, line
        url, port = match[1], int(match[2])
        assert "Authorization: Bearer <the token in $ATOK>" in match[3]

        async def call() -> None:
            import httpx2

            headers = {"Authorization": "Bearer s3cret"}
            async with (
                httpx2.AsyncClient(headers=headers) as http,
                Client(streamable_http_client(url, http_client=http)) as client,
            ):
                listed = await client.call_tool("list_allowed_directories", {})
                assert not listed.is_error

        anyio.run(call)
        in_use = atomictools(
            "serve", "--root", str(tmp_path), "--transport", "http", "--port", str(port)
        )
        assert in_use.returncode == 2
        assert f"cannot listen on 127.0.0.1:{port}" in in_use.stderr
        assert "choose another with --port" in in_use.stderr
        assert "Traceback" not in in_use.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)


INITIALIZE_PARAMS = {
    "protocolVersion": "2025-06-18",
    "capabilities": {},
    "clientInfo": {"name": "raw", "version": "0"},
}


def test_a_line_that_is_not_json_rpc_gets_an_error_and_the_session_goes_on(
    tmp_path: Path,
) -> None:
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"},
        },
    }
    # Long lines (64 KiB and more) are parsed another way: the same answers, NaN (which the
    # SDK's parser accepts) included.
    pad = "x" * 70_000
    long_not_json = '{"jsonrpc": "2.0", "id": 5, "method": "ping", "params": {"pad": "' + pad
    long_nan = json.dumps({"jsonrpc": "2.0", "id": 6, "method": "ping", "params": {"n": "NAN"}})
    long_nan = long_nan.replace('"NAN"', "NaN").replace("}}", f', "pad": "{pad}"}}}}')
    lines = [
        "this is not json",
        json.dumps({"no": "method"}),
        long_not_json,
        long_nan,
        json.dumps(initialize),
    ]
    done = atomictools("serve", "--root", str(tmp_path), stdin="\n".join(lines) + "\n")
    replies = [json.loads(line) for line in done.stdout.splitlines()]
    parse_error = {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": -32700, "message": "Parse error: the line is not a JSON-RPC 2.0 message"},
    }
    assert replies[0] == replies[2] == parse_error
    assert replies[3] == {"jsonrpc": "2.0", "id": 6, "result": {}}  # a ping, as when short
    assert replies[1]["error"]["code"] == -32600
    assert replies[4]["id"] == 1
    assert "result" in replies[4]  # the session still serves


def test_a_long_line_is_served_like_a_short_one(tmp_path: Path) -> None:
    """A 10,000-statement transaction or a large write arrives as one long line (parsed by the
    standard library's JSON parser, then validated): the call is served as any other."""
    command = [sys.executable, "-m", "atomictools", "serve", "--root", str(tmp_path)]
    server = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert server.stdin is not None
    assert server.stdout is not None
    content = '\u00e9 long line \\ with "quotes"\n' * 4000
    write = {"path": str(tmp_path / "long.txt"), "content": content}
    messages = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INITIALIZE_PARAMS},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "write_file", "arguments": write},
        },
    ]
    try:
        replies = []
        for message in messages:
            server.stdin.write(json.dumps(message) + "\n")
            server.stdin.flush()
            if "id" in message:
                replies.append(json.loads(server.stdout.readline()))
    finally:
        server.stdin.close()
        server.wait(timeout=30)
    assert len(json.dumps(messages[2])) > 64 * 1024
    assert replies[1]["id"] == 2
    assert replies[1]["result"]["structuredContent"]["size"] == len(content.encode())
    assert (tmp_path / "long.txt").read_text() == content


def test_db_in_a_missing_directory_fails_at_start(tmp_path: Path) -> None:
    done = atomictools("serve", "--root", str(tmp_path), "--db", f"main={tmp_path}/nope/x.db")
    assert done.returncode == 2
    assert f"the directory {tmp_path}/nope does not exist" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the database tools need asyncio
async def test_small_things_in_the_tools(tmp_path: Path, anyio_backend: str) -> None:
    db = tmp_path / "app.db"
    server = create_server(Workspace([tmp_path]))
    sqlite3.connect(db).close()  # a database file in the roots is usable once it exists
    async with Client(server, mode="legacy") as client:
        created = await client.call_tool(
            "db_execute", {"database": "app.db", "sql": "CREATE TABLE t (a INTEGER, b TEXT)"}
        )
        assert not created.is_error, text_of(created)
        assert "changes no rows" in text_of(created)
        assert "-1" not in text_of(created)
        keyed = await client.call_tool(
            "db_execute",
            {"database": "app.db", "sql": "INSERT INTO t VALUES (1, 'x')", "idempotencyKey": "k"},
        )
        assert "1 row(s) changed" in text_of(keyed)
        schema = await client.call_tool("db_schema", {"database": "app.db"})
        assert schema.structured_content is not None
        objects = schema.structured_content["objects"]
        assert [o["name"] for o in objects] == ["t"]  # not our idempotency table or index
        assert [c["name"] for c in objects[0]["columns"]] == ["a", "b"]
        assert KEY_TABLE not in text_of(schema)

        missing = await client.call_tool("write_file", {"path": "no/such/f.txt", "content": "x"})
        assert missing.is_error
        assert "create_directory" in text_of(missing)
        assert "nothing was changed" in text_of(missing)


def test_recover_dry_run_says_what_it_would_do(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    orphan = root / f".a.txt.{os.getpid() + 10_000_000}.0123456789ab.atomictmp"
    orphan.write_text("left by a crash")
    old = time.time() - 3600
    os.utime(orphan, (old, old))
    done = atomictools("recover", str(root), "--state-dir", str(tmp_path / "state"), "--dry-run")
    assert done.returncode == 1
    assert "result: would fix" in done.stdout
    assert orphan.exists()
