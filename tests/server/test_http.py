"""HTTP transport: ``atomictools serve --transport http`` as a real subprocess.

A free loopback port, the SDK client in both protocol eras, DNS-rebinding protection (bad Host
and Origin headers refused), the bearer-token gate, and the refusal to serve a non-loopback
address without a token.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2  # the SDK's HTTP client library (mcp depends on it; plain httpx is not installed)
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.types import ListRootsResult, Root, TextContent

pytestmark = pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")

SCHEMAS = Path(__file__).parents[2] / "schemas"
STARTUP_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
TOKEN = "s3cret-token"

INITIALIZE = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "raw-http-test", "version": "0"},
        },
    }
).encode()


# -- running the real CLI -------------------------------------------------------------------


@dataclass
class RunningServer:
    proc: subprocess.Popen[bytes]
    port: int
    root: Path
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "atomictools", "serve", *args]


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL: bounded either way."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)


def start_http_server(
    base: Path, *extra: str, env: dict[str, str] | None = None
) -> Iterator[RunningServer]:
    root = base / "root"
    root.mkdir()
    log = base / "server.log"
    port = free_port()
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            serve_cli("--root", str(root), "--transport", "http", "--port", str(port), *extra),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, **(env or {})},
        )
    server = RunningServer(proc=proc, port=port, root=root.resolve(), log=log)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{server.stderr()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"port {port} not open after {STARTUP_TIMEOUT} s:\n{server.stderr()}"
                    )
                time.sleep(0.05)
        yield server
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    yield from start_http_server(tmp_path_factory.mktemp("http"))


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    yield from start_http_server(
        tmp_path_factory.mktemp("http-token"),
        "--auth-token-env",
        "ATOK",
        "--allowed-host",
        "api.internal",
        env={"ATOK": TOKEN},
    )


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


def raw_initialize(port: int, headers: dict[str, str]) -> RawResponse:
    """POST a valid ``initialize`` to /mcp with extra (or overriding) headers."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(
            "POST",
            "/mcp",
            body=INITIALIZE,
            headers={
                "Accept": "application/json, text/event-stream",
                "Content-Type": "application/json",
                **headers,  # a "Host" here replaces the one http.client would send
            },
        )
        response = connection.getresponse()
        body = response.read()
        return RawResponse(response.status, {k.lower(): v for k, v in response.getheaders()}, body)
    finally:
        connection.close()


def assert_initialized(response: RawResponse) -> None:
    assert response.status == 200, (response.status, response.body)
    assert b'"result"' in response.body
    assert b'"name":"atomictools"' in response.body


def text_of(result: Any) -> str:
    return "\n".join(b.text for b in result.content if isinstance(b, TextContent))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- tools over HTTP ------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_tools_over_http(server: RunningServer, mode: str, anyio_backend: str) -> None:
    sub = server.root / f"{mode}-{anyio_backend}"
    sub.mkdir()
    target = sub / "notes.txt"
    relative = f"{sub.name}/notes.txt"
    with anyio.fail_after(30):
        async with Client(server.url, mode=mode) as client:  # type: ignore[arg-type]
            expected_era = "2025-11-25" if mode == "legacy" else "2026-07-28"
            assert client.protocol_version == expected_era

            listed = await client.list_tools()
            names = {tool.name for tool in listed.tools}
            assert {"write_file", "read_text_file", "edit_file"} <= names
            assert names == {p.stem for p in SCHEMAS.glob("*.json")}

            allowed = await client.call_tool("list_allowed_directories", {})
            assert not allowed.is_error, text_of(allowed)
            assert allowed.structured_content == {"directories": [str(server.root)]}

            written = await client.call_tool(
                "write_file", {"path": relative, "content": "alpha\nbeta\n"}
            )
            assert not written.is_error, text_of(written)
            assert target.read_bytes() == b"alpha\nbeta\n"
            first = sha256(b"alpha\nbeta\n")
            assert written.structured_content is not None
            assert written.structured_content["created"] is True
            assert written.structured_content["size"] == 11
            assert written.structured_content["sha256"] == first

            read = await client.call_tool("read_text_file", {"path": str(target)})
            assert not read.is_error, text_of(read)
            assert read.structured_content is not None
            assert read.structured_content["content"] == "alpha\nbeta\n"
            assert read.structured_content["sha256"] == first

            edited = await client.call_tool(
                "edit_file",
                {
                    "path": relative,
                    "edits": [{"oldText": "beta", "newText": "gamma"}],
                    "expectedSha256": first,
                },
            )
            assert not edited.is_error, text_of(edited)
            assert target.read_bytes() == b"alpha\ngamma\n"
            assert edited.structured_content is not None
            assert edited.structured_content["sha256"] == sha256(b"alpha\ngamma\n")
            assert "-beta" in edited.structured_content["diff"]
            assert "+gamma" in edited.structured_content["diff"]

            # History over HTTP: the edit is listed, taken back, and the undo taken back.
            changes = await client.call_tool("list_changes", {"path": relative})
            assert not changes.is_error, text_of(changes)
            assert changes.structured_content is not None
            newest = changes.structured_content["changes"][0]
            assert newest["op"] == "edit"
            undone = await client.call_tool("undo_change", {"id": newest["id"]})
            assert not undone.is_error, text_of(undone)
            assert target.read_bytes() == b"alpha\nbeta\n"
            assert undone.structured_content is not None
            redo = {"id": undone.structured_content["changeId"]}
            redone = await client.call_tool("undo_change", redo)
            assert not redone.is_error, text_of(redone)
            assert target.read_bytes() == b"alpha\ngamma\n"

            stale = await client.call_tool(
                "write_file", {"path": relative, "content": "lost", "expectedSha256": first}
            )
            assert stale.is_error
            assert target.read_bytes() == b"alpha\ngamma\n"

            escape = await client.call_tool(
                "write_file", {"path": "../escape.txt", "content": "nope"}
            )
            assert escape.is_error
            assert "outside" in text_of(escape)
            assert not (server.root.parent / "escape.txt").exists()


@pytest.mark.anyio
async def test_client_roots_narrow_over_http_legacy(server: RunningServer) -> None:
    """Legacy HTTP sessions have a back-channel: the server asks for roots and narrows."""
    inner = server.root / "narrowed"
    inner.mkdir(exist_ok=True)

    async def roots(_context: Any) -> ListRootsResult:
        return ListRootsResult(roots=[Root(uri=inner.as_uri())])

    with anyio.fail_after(30):
        async with Client(server.url, mode="legacy", list_roots_callback=roots) as client:
            allowed = await client.call_tool("list_allowed_directories", {})
            assert allowed.structured_content == {"directories": [str(inner)]}
            refused = await client.call_tool(
                "write_file", {"path": str(server.root / "beside.txt"), "content": "x"}
            )
            assert refused.is_error
            assert not (server.root / "beside.txt").exists()


# -- DNS-rebinding protection ---------------------------------------------------------------


def test_loopback_host_and_origin_are_accepted(server: RunningServer) -> None:
    # The control for the refusals below: the same request with good headers initializes.
    assert_initialized(raw_initialize(server.port, {}))
    assert_initialized(raw_initialize(server.port, {"Host": f"localhost:{server.port}"}))
    assert_initialized(raw_initialize(server.port, {"Origin": f"http://127.0.0.1:{server.port}"}))
    assert_initialized(raw_initialize(server.port, {"Origin": "http://localhost:5173"}))


@pytest.mark.parametrize(
    "host",
    [
        "evil.example.com",
        "evil.example.com:{port}",
        "127.0.0.1.evil.example.com:{port}",
        "localhost.evil.example.com:{port}",
    ],
)
def test_bad_host_header_is_refused(server: RunningServer, host: str) -> None:
    response = raw_initialize(server.port, {"Host": host.format(port=server.port)})
    assert response.status == 421, (response.status, response.body)  # Misdirected Request
    assert b"Invalid Host header" in response.body
    assert "mcp-session-id" not in response.headers  # no session was created


@pytest.mark.parametrize(
    "origin",
    ["http://evil.example.com", "http://localhost.evil.example.com:{port}", "null"],
)
def test_bad_origin_header_is_refused(server: RunningServer, origin: str) -> None:
    response = raw_initialize(server.port, {"Origin": origin.format(port=server.port)})
    assert response.status == 403, (response.status, response.body)
    assert b"Invalid Origin header" in response.body
    assert "mcp-session-id" not in response.headers


# -- bearer token ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong", f"Basic {TOKEN}", f"bearer{TOKEN}", TOKEN]
)
def test_request_without_the_token_gets_401(
    token_server: RunningServer, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = raw_initialize(token_server.port, headers)
    assert response.status == 401, (response.status, response.body)
    assert response.headers.get("www-authenticate") == "Bearer"
    assert "mcp-session-id" not in response.headers
    assert TOKEN.encode() not in response.body


def test_request_with_the_token_initializes(token_server: RunningServer) -> None:
    assert_initialized(raw_initialize(token_server.port, {"Authorization": f"Bearer {TOKEN}"}))


def test_token_does_not_bypass_host_check(token_server: RunningServer) -> None:
    response = raw_initialize(
        token_server.port,
        {"Authorization": f"Bearer {TOKEN}", "Host": f"evil.example.com:{token_server.port}"},
    )
    assert response.status == 421, (response.status, response.body)


@pytest.mark.parametrize("host", ["api.internal:{port}", "api.internal"])
def test_allowed_host_option_accepts_that_host(token_server: RunningServer, host: str) -> None:
    """``--allowed-host api.internal``: "an extra Host header value HTTP clients may use".

    A client on a non-default port sends ``api.internal:PORT``; a client (or reverse proxy)
    on the default port sends plain ``api.internal``. Both are that host.
    """
    response = raw_initialize(
        token_server.port,
        {"Authorization": f"Bearer {TOKEN}", "Host": host.format(port=token_server.port)},
    )
    assert_initialized(response)


@pytest.mark.anyio
async def test_sdk_client_with_the_token(token_server: RunningServer) -> None:
    with anyio.fail_after(30):
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            transport = streamable_http_client(token_server.url, http_client=http)
            async with Client(transport, mode="legacy") as client:
                written = await client.call_tool(
                    "write_file", {"path": "with-token.txt", "content": "ok\n"}
                )
                assert not written.is_error, text_of(written)
    assert (token_server.root / "with-token.txt").read_text() == "ok\n"


@pytest.mark.anyio
async def test_sdk_client_without_the_token_cannot_connect(token_server: RunningServer) -> None:
    with anyio.fail_after(30):
        # The 401 surfaces as MCPError("Server returned an error response"), nested in groups.
        with pytest.RaisesGroup(MCPError, flatten_subgroups=True):
            async with Client(token_server.url, mode="legacy") as client:
                await client.list_tools()
    assert not (token_server.root / "anything").exists()


# -- refusing to start ----------------------------------------------------------------------


def run_serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        serve_cli(*args),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=20,  # a bug that starts serving instead of refusing fails here, bounded
        env=dict(os.environ) if env is None else env,
        check=False,
    )


def test_non_loopback_host_without_token_refuses_to_start(tmp_path: Path) -> None:
    port = str(free_port())
    done = run_serve(
        "--root", str(tmp_path), "--transport", "http", "--host", "0.0.0.0", "--port", port
    )
    assert done.returncode == 2, done.stderr
    assert "refusing to serve HTTP on 0.0.0.0 without a token" in done.stderr
    assert "--auth-token-env" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_empty_token_variable_refuses_to_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ATOK_UNSET"}
    port = str(free_port())
    done = run_serve(
        "--root",
        str(tmp_path),
        "--transport",
        "http",
        "--port",
        port,
        "--auth-token-env",
        "ATOK_UNSET",
        env=env,
    )
    assert done.returncode == 2, done.stderr
    assert "$ATOK_UNSET is empty or unset" in done.stderr
    assert "Traceback" not in done.stderr
