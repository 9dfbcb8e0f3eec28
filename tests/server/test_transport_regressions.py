"""Regressions that the TypeScript SDK client found (``tests/interop/test_ts_sdk.py``), here
reproduced without Node, with raw JSON-RPC and the Python SDK's client.

* Over HTTP the server refused every request body over 4 MiB (the SDK's default limit) with a
  bare ``413 Request body too large``: a ``write_file`` that stdio accepts (the tools take up
  to 64 MiB of content) failed over HTTP without saying why.
* A ``notifications/cancelled`` that arrives *before* the request it names was dropped (the SDK
  only cancels requests it is running) and the call then ran to completion, although its
  client had given up on it. Over HTTP this happens by itself: the cancel is a POST of its own
  and overtakes the POST of a large request that is still uploading. Now such a call is refused
  on arrival, changes nothing, and is answered as a cancelled call is (HTTP: "Request
  cancelled"; stdio: not at all); the session serves the next call.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client

from atomictools.server.runtime import EarlyCancels

from .test_http import RunningServer, start_http_server

MiB = 1024 * 1024
PROTOCOL = "2025-11-25"
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": PROTOCOL,
        "capabilities": {},
        "clientInfo": {"name": "raw-regression-test", "version": "0"},
    },
}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


def cancel(request_id: int) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "method": "notifications/cancelled",
        "params": {"requestId": request_id, "reason": "the client gave up"},
    }


def call(request_id: int, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": tool, "arguments": arguments},
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    yield from start_http_server(tmp_path_factory.mktemp("http-regressions"))


# -- request bodies over HTTP -------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_http_takes_a_write_as_large_as_stdio(server: RunningServer, mode: str) -> None:
    content = "sixteen mebibytes of text, more than the SDK's 4 MiB default\n" * (16 * MiB // 62)
    with anyio.fail_after(60):
        async with Client(server.url, mode=mode) as client:  # type: ignore[arg-type]
            result = await client.call_tool(
                "write_file", {"path": f"big-{mode}.txt", "content": content}
            )
    assert not result.is_error, result.content
    assert (server.root / f"big-{mode}.txt").read_text() == content


# -- a cancel that arrives before its request ---------------------------------------------


class RawHttp:
    """One legacy (2025) streamable-HTTP session, message by message."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx2.Client(timeout=30)
        self.headers = {
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
        }
        response = self.post(INITIALIZE)
        assert response.status_code == 200, response.text
        self.headers["mcp-session-id"] = response.headers["mcp-session-id"]
        self.headers["mcp-protocol-version"] = PROTOCOL
        assert self.post(INITIALIZED).status_code == 202

    def post(self, message: dict[str, Any]) -> httpx2.Response:
        return self.http.post(self.url, json=message, headers=self.headers)

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """The JSON-RPC answer to one request (a JSON body or one SSE event carrying it)."""
        response = self.post(message)
        assert response.status_code == 200, response.text
        if response.headers["content-type"].startswith("application/json"):
            answer: dict[str, Any] = response.json()
            return answer
        events = [
            json.loads(line[len("data:") :])
            for line in response.text.splitlines()
            if line.startswith("data:") and line[len("data:") :].strip()
        ]
        answers = [e for e in events if e.get("id") == message["id"]]
        assert len(answers) == 1, events
        return dict(answers[0])


def test_http_cancel_that_overtakes_its_request(server: RunningServer) -> None:
    raw = RawHttp(server.url)
    target = server.root / "overtaken.txt"
    assert raw.post(cancel(2)).status_code == 202
    answer = raw.request(call(2, "write_file", {"path": "overtaken.txt", "content": "late\n"}))
    assert answer.get("error") == {"code": -32800, "message": "Request cancelled"}, answer
    assert not target.exists()
    # The session serves the next call, with the same arguments.
    answer = raw.request(call(3, "write_file", {"path": "overtaken.txt", "content": "now\n"}))
    assert answer["result"]["isError"] is False, answer
    assert target.read_text() == "now\n"
    # A cancel for a call that already finished (the usual race) holds up nothing.
    assert raw.post(cancel(3)).status_code == 202
    answer = raw.request(call(4, "read_text_file", {"path": "overtaken.txt"}))
    assert answer["result"]["structuredContent"]["content"] == "now\n"


def test_stdio_cancel_before_its_request(tmp_path: Path) -> None:
    """Over stdio the order is the client's; several cancelled calls in a row, none runs."""
    rounds = 20
    lines = [INITIALIZE, INITIALIZED]
    for i in range(rounds):
        request_id = 10 + 2 * i
        lines.append(cancel(request_id))
        lines.append(call(request_id, "write_file", {"path": f"c{i}.txt", "content": "x"}))
        lines.append(call(request_id + 1, "write_file", {"path": f"w{i}.txt", "content": "y"}))
    last = {"jsonrpc": "2.0", "id": 999, "method": "tools/list"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "atomictools", "serve", "--root", str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    watchdog = threading.Timer(60, proc.kill)  # a hung server fails the test, bounded
    watchdog.start()
    try:
        proc.stdin.write("".join(json.dumps(m) + "\n" for m in [*lines, last]))
        proc.stdin.flush()
        out = []
        for line in proc.stdout:  # until the last answer: EOF on stdin would stop the server
            out.append(line)
            if json.loads(line).get("id") == last["id"]:
                break
        proc.stdin.close()
        err = proc.stderr.read() if proc.stderr else ""
        proc.wait(10)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    answered = {json.loads(line).get("id") for line in out}
    assert 999 in answered, err
    for i in range(rounds):
        assert 10 + 2 * i not in answered, f"round {i}: the cancelled call was answered"
        assert not (tmp_path / f"c{i}.txt").exists(), f"round {i}: the cancelled call ran"
        assert (tmp_path / f"w{i}.txt").read_text() == "y"
    assert "Traceback" not in err


def test_early_cancels_bookkeeping() -> None:
    class Client:  # weak-referenceable, like the SDK's connection
        pass

    one, two = Client(), Client()
    early = EarlyCancels()
    early.cancelled(one, "5")
    assert early.starting(two, "5")  # another client's id 5
    assert not early.starting(one, "5")  # refused once
    assert early.starting(one, "6")
    early.cancelled(one, "6")  # already started: the SDK cancels it, not us
    assert early.starting(one, "7")
    early.cancelled(one, "8")
    waiting, _seen = early._of(one)
    waiting["8"] = time.monotonic() - EarlyCancels.TTL - 1
    early.cancelled(one, "9")  # purges the stale one
    assert early.starting(one, "8")
    assert not early.starting(one, "9")
