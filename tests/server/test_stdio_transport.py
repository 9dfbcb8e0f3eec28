"""The stdio transport: the event loop's pipe transports when stdin/stdout are pipes, the SDK's
own transport when stdin is a regular file; nothing but JSON-RPC ever reaches stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from atomictools.server.stdio import _open_wire

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "1"},
    },
}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


BIG = "x" * (3 * 1024 * 1024)  # one line far longer than any pipe buffer
CALLS = [
    {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
    {
        "jsonrpc": "2.0",
        "id": 3,
        "method": "tools/call",
        "params": {"name": "write_file", "arguments": {"path": "big.txt", "content": BIG}},
    },
    {
        "jsonrpc": "2.0",
        "id": 4,
        "method": "tools/call",
        "params": {"name": "read_text_file", "arguments": {"path": "big.txt"}},
    },
]


def test_requests_are_answered_with_only_json_on_stdout(tmp_path: Path) -> None:
    """Over real pipes (the event loop's transports): a 3 MiB line each way, JSON only."""
    root = tmp_path / "root"
    root.mkdir()
    command = [sys.executable, "-m", "atomictools", "serve", "--root", str(root)]
    command += ["--state-dir", str(tmp_path / "state")]
    server = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert server.stdin is not None
    assert server.stdout is not None
    replies: dict[int, dict[str, Any]] = {}

    def exchange(*messages: dict[str, Any]) -> None:
        assert server.stdin is not None
        assert server.stdout is not None
        server.stdin.write(b"".join(json.dumps(m).encode() + b"\n" for m in messages))
        server.stdin.flush()
        wanted = {m["id"] for m in messages if "id" in m}
        while not wanted <= replies.keys():
            line = server.stdout.readline()
            assert line, "the server closed stdout early"
            reply = json.loads(line)  # every line on stdout is JSON-RPC
            replies[reply["id"]] = reply

    try:
        exchange(INIT)
        exchange(INITIALIZED)
        for call in CALLS:  # one at a time: requests run concurrently
            exchange(call)
    finally:
        server.stdin.close()  # EOF: the server exits
        server.wait(timeout=30)
    assert server.returncode == 0
    assert server.stdout.read() == b""
    assert replies[1]["result"]["serverInfo"]["name"]
    assert len(replies[2]["result"]["tools"]) == 24
    assert replies[3]["result"]["isError"] is False
    assert (root / "big.txt").stat().st_size == len(BIG)
    assert replies[4]["result"]["content"][0]["text"] == BIG


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_regular_file_on_stdin_falls_back_to_the_sdk_transport(tmp_path: Path) -> None:
    """The loop's pipe transports refuse regular files: the SDK's transport serves those."""
    requests_file = tmp_path / "requests.jsonl"
    requests_file.write_bytes(b"")
    saved = os.dup(0)
    try:
        with open(requests_file, "rb") as stdin:
            os.dup2(stdin.fileno(), 0)
            assert await _open_wire(lambda: None) is None
    finally:
        os.dup2(saved, 0)
        os.close(saved)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_pipes_get_the_event_loop_transports(tmp_path: Path) -> None:
    in_read, in_write = os.pipe()
    out_read, out_write = os.pipe()
    saved_in, saved_out = os.dup(0), os.dup(1)
    try:
        os.dup2(in_read, 0)
        os.dup2(out_write, 1)  # pytest's capture may have made fd 1 a regular file
        wire = await _open_wire(lambda: None)
        assert wire is not None
        for transport in wire[2]:
            transport.close()
    finally:
        os.dup2(saved_in, 0)
        os.dup2(saved_out, 1)
        for fd in (saved_in, saved_out, in_read, in_write, out_read, out_write):
            os.close(fd)


def test_a_client_that_stops_reading_ends_the_session_quietly(tmp_path: Path) -> None:
    """The client closes its end of stdout but not stdin: the server must not die with a
    traceback; it ends the session as if stdin had closed (exit 0)."""
    root = tmp_path / "root"
    root.mkdir()
    command = [sys.executable, "-m", "atomictools", "serve", "--root", str(root)]
    command += ["--state-dir", str(tmp_path / "state"), "--log-level", "INFO"]
    server = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert server.stdin is not None
    assert server.stdout is not None
    assert server.stderr is not None
    try:
        server.stdin.write(json.dumps(INIT).encode() + b"\n")
        server.stdin.flush()
        assert json.loads(server.stdout.readline())["id"] == 1
        server.stdout.close()  # the client stops reading
        for message in (INITIALIZED, CALLS[0]):
            server.stdin.write(json.dumps(message).encode() + b"\n")
        server.stdin.flush()
        assert server.wait(timeout=30) == 0  # stdin is still open: the lost stdout ended it
    finally:
        if server.poll() is None:
            server.kill()
        server.stdin.close()
    log = server.stderr.read().decode()
    assert "Traceback" not in log, log
    assert "closed its end of stdout" in log
