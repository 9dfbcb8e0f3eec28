"""Committed tool schemas vs the code, MCP client roots, and stdout discipline over stdio."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp.types import ListRootsResult, Root, TextContent

from atomictools import Workspace
from atomictools.server import HIDDEN_WHEN_READ_ONLY, create_server
from atomictools.server.schemas import drift, tool_schemas
from tests.server.helpers import state_env

pytestmark = pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")

REPO = Path(__file__).parents[2]
SCHEMAS = REPO / "schemas"
LIST_ALLOWED = "list_allowed_directories"
NO_OVERLAP = "none of the client's roots overlaps the server's allowed directories"


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "atomictools", *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def text_of(result: Any) -> str:
    return "\n".join(b.text for b in result.content if isinstance(b, TextContent))


# -- a) schema drift ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_committed_schemas_match_the_code(tmp_path: Path) -> None:
    generated = await tool_schemas(create_server(Workspace([tmp_path])))
    assert drift(generated, SCHEMAS) == []
    assert set(generated) == {p.name for p in SCHEMAS.glob("*.json")}
    for name, text in generated.items():
        document = json.loads(text)
        assert document["name"] == name.removesuffix(".json")
        assert document["inputSchema"]["type"] == "object"
        assert document["annotations"] is not None
        assert document["description"]


@pytest.mark.anyio
async def test_schemas_do_not_depend_on_the_root(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = await tool_schemas(create_server(Workspace([tmp_path / "a"])))
    other = await tool_schemas(create_server(Workspace([tmp_path / "b"])))
    assert one == other


@pytest.mark.anyio
async def test_read_only_server_lists_only_tools_that_can_succeed(tmp_path: Path) -> None:
    """Issue 12: ``--read-only`` advertised all 22 tools, eight of which could only refuse."""
    every = await tool_schemas(create_server(Workspace([tmp_path])))
    reading = await tool_schemas(create_server(Workspace([tmp_path], read_only=True)))
    assert set(reading) == set(every) - {f"{name}.json" for name in HIDDEN_WHEN_READ_ONLY}
    assert len(reading) == len(every) - 8
    for text in reading.values():
        document = json.loads(text)
        if document["name"] not in ("edit_file", "undo_change"):  # kept for dryRun previews
            assert document["annotations"]["readOnlyHint"] is True, document["name"]


def test_cli_schemas_check_passes_in_the_repo() -> None:
    done = cli("schemas", "--check")
    assert done.returncode == 0, done.stderr
    assert "up to date" in done.stderr
    assert done.stdout == ""


def test_cli_schemas_check_detects_drift(tmp_path: Path) -> None:
    copy = tmp_path / "schemas"
    shutil.copytree(SCHEMAS, copy)
    assert cli("schemas", "--check", "--dir", str(copy)).returncode == 0

    edited = copy / "write_file.json"
    document = json.loads(edited.read_text())
    document["description"] = "a hand edit that the code does not say"
    edited.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    (copy / "read_media_file.json").unlink()
    (copy / "retired_tool.json").write_text("{}\n")

    done = cli("schemas", "--check", "--dir", str(copy))
    assert done.returncode == 1, done.stderr
    assert f"out of date: {edited}" in done.stderr
    assert f"missing: {copy / 'read_media_file.json'}" in done.stderr
    assert f"not a tool any more: {copy / 'retired_tool.json'}" in done.stderr
    assert "run `atomictools schemas`" in done.stderr
    assert "copy_file.json" not in done.stderr  # untouched files are not reported

    # Regenerating brings the copy back in line with the committed files.
    rewritten = cli("schemas", "--dir", str(copy))
    assert rewritten.returncode == 0, rewritten.stderr
    assert cli("schemas", "--check", "--dir", str(copy)).returncode == 0
    assert {p.name for p in copy.glob("*.json")} == {p.name for p in SCHEMAS.glob("*.json")}
    assert edited.read_text() == (SCHEMAS / "write_file.json").read_text()


# -- b) MCP client roots --------------------------------------------------------------------


def roots_callback(paths: list[Path]) -> Callable[[Any], Any]:
    """A list_roots callback answering with whatever ``paths`` holds when asked."""

    async def answer(_context: Any) -> ListRootsResult:
        return ListRootsResult(roots=[Root(uri=p.as_uri()) for p in paths])

    return answer


async def allowed(client: Client) -> list[str]:
    result = await client.call_tool("list_allowed_directories", {})
    assert not result.is_error, text_of(result)
    assert result.structured_content is not None
    return list(result.structured_content["directories"])


@pytest.fixture
def tree(root: Path) -> Path:
    """``root`` with ``sub`` and ``other`` inside, each holding a file."""
    for name in ("sub", "other"):
        (root / name).mkdir()
        (root / name / "f.txt").write_text(f"{name}\n")
    return root.resolve()


@pytest.mark.anyio
async def test_client_roots_narrow_to_the_intersection(tree: Path) -> None:
    sub = tree / "sub"
    server = create_server(Workspace([tree]))
    async with Client(server, mode="legacy", list_roots_callback=roots_callback([sub])) as client:
        assert await allowed(client) == [str(sub)]

        inside = await client.call_tool(
            "write_file", {"path": str(sub / "new.txt"), "content": "x"}
        )
        assert not inside.is_error, text_of(inside)
        assert (sub / "new.txt").read_text() == "x"

        relative = await client.call_tool("write_file", {"path": "rel.txt", "content": "r"})
        assert not relative.is_error, text_of(relative)
        assert (sub / "rel.txt").read_text() == "r"  # relative paths resolve in the client root
        assert not (tree / "rel.txt").exists()

        other = tree / "other" / "new.txt"
        refused = await client.call_tool("write_file", {"path": str(other), "content": "x"})
        assert refused.is_error
        assert "outside the allowed directories" in text_of(refused)
        assert not other.exists()

        read_other = await client.call_tool("read_text_file", {"path": str(tree / "other/f.txt")})
        assert read_other.is_error
        assert "outside" in text_of(read_other)

        up = await client.call_tool("read_text_file", {"path": "../other/f.txt"})
        assert up.is_error


@pytest.mark.anyio
async def test_several_client_roots_keep_only_the_overlapping_ones(tree: Path) -> None:
    outside = tree.parent / "root-evil"  # shares the root's name as a prefix
    callback = roots_callback([tree / "other", outside, tree / "sub"])
    async with Client(
        create_server(Workspace([tree])), mode="legacy", list_roots_callback=callback
    ) as client:
        assert sorted(await allowed(client)) == sorted([str(tree / "other"), str(tree / "sub")])
        secret = await client.call_tool("read_text_file", {"path": str(outside / "secret.txt")})
        assert secret.is_error


@pytest.mark.anyio
async def test_a_wider_client_root_does_not_widen_access(tree: Path) -> None:
    parent = tree.parent  # contains the configured root, root-evil and outside.txt
    callback = roots_callback([parent])
    async with Client(
        create_server(Workspace([tree])), mode="legacy", list_roots_callback=callback
    ) as client:
        assert await allowed(client) == [str(tree)]
        for path in (parent / "outside.txt", parent / "root-evil" / "secret.txt"):
            read = await client.call_tool("read_text_file", {"path": str(path)})
            assert read.is_error, path
        write = await client.call_tool(
            "write_file", {"path": str(parent / "planted.txt"), "content": "x"}
        )
        assert write.is_error
        assert not (parent / "planted.txt").exists()
        ok = await client.call_tool("read_text_file", {"path": str(tree / "other" / "f.txt")})
        assert not ok.is_error, text_of(ok)


def minimal_arguments(schema: dict[str, Any], root: Path) -> dict[str, Any]:
    """Valid arguments for any tool, pointing inside the configured root."""
    values: dict[str, Any] = {
        "path": str(root / "other" / "f.txt"),
        "paths": [str(root / "other" / "f.txt")],
        "content": "changed",
        "edits": [{"oldText": "other", "newText": "changed"}],
        "source": str(root / "other" / "f.txt"),
        "destination": str(root / "other" / "moved.txt"),
        "pattern": "*.txt",
        "database": str(root / "other" / "data.db"),
        "sql": "SELECT 1",
        "statements": [{"sql": "SELECT 1"}],
        "changes": [{"op": "write", "path": str(root / "other" / "f.txt"), "content": "x"}],
    }
    required = schema.get("required", [])
    missing = set(required) - set(values)
    assert not missing, f"add a value for {missing} to minimal_arguments"
    return {name: values[name] for name in required}


@pytest.mark.anyio
async def test_non_overlapping_client_root_refuses_every_tool(tree: Path) -> None:
    elsewhere = tree.parent / "root-evil"
    before = {p: p.read_bytes() for p in tree.rglob("*") if p.is_file()}
    callback = roots_callback([elsewhere])
    async with Client(
        create_server(Workspace([tree])), mode="legacy", list_roots_callback=callback
    ) as client:
        tools = (await client.list_tools()).tools
        assert len(tools) >= 16
        for tool in tools:
            arguments = minimal_arguments(tool.input_schema, tree)
            result = await client.call_tool(tool.name, arguments)
            assert result.is_error, tool.name
            message = text_of(result)
            assert NO_OVERLAP in message, (tool.name, message)
            assert str(tree) in message  # names the server's allowed directories
            assert "Traceback" not in message
    assert {p: p.read_bytes() for p in tree.rglob("*") if p.is_file()} == before
    assert (elsewhere / "secret.txt").read_text() == "outside\n"


@pytest.mark.anyio
async def test_client_without_roots_capability_gets_the_configured_roots(tree: Path) -> None:
    async with Client(create_server(Workspace([tree])), mode="legacy") as client:
        assert await allowed(client) == [str(tree)]
        written = await client.call_tool(
            "write_file", {"path": str(tree / "other" / "g.txt"), "content": "g"}
        )
        assert not written.is_error, text_of(written)


@pytest.mark.anyio
async def test_modern_era_keeps_the_configured_roots(tree: Path) -> None:
    """2026-07-28 sessions have no back-channel for roots/list: configured roots apply."""
    callback = roots_callback([tree / "sub"])
    async with Client(create_server(Workspace([tree])), list_roots_callback=callback) as client:
        assert client.protocol_version == "2026-07-28"
        assert await allowed(client) == [str(tree)]


@pytest.mark.anyio
async def test_client_roots_are_asked_once_per_session(tree: Path) -> None:
    """ClientRoots: "Narrows the configured roots to a client's roots, once per session"."""
    asked = 0

    async def answer(_context: Any) -> ListRootsResult:
        nonlocal asked
        asked += 1
        return ListRootsResult(roots=[Root(uri=(tree / "sub").as_uri())])

    async with Client(
        create_server(Workspace([tree])), mode="legacy", list_roots_callback=answer
    ) as client:
        for _ in range(3):
            assert await allowed(client) == [str(tree / "sub")]
    assert asked == 1, f"roots/list was sent {asked} times for 3 tool calls in one session"


@pytest.mark.anyio
async def test_roots_list_changed_makes_the_server_use_the_new_roots(tree: Path) -> None:
    current = [tree / "sub"]

    async def answer(_context: Any) -> ListRootsResult:
        return ListRootsResult(roots=[Root(uri=p.as_uri()) for p in current])

    async def change_roots(client: Client, paths: list[Path], landed: str) -> str:
        """Change the client's roots, notify, and return list_allowed_directories' text.

        The notification and the next request run as separate tasks on the server, so the
        answer is polled (bounded) until it shows ``landed``.
        """
        current[:] = paths
        await client.send_roots_list_changed()
        with anyio.fail_after(5):
            # Polling the server's answer; there is no event to wait on.
            while landed not in (text := text_of(await client.call_tool(LIST_ALLOWED, {}))):  # noqa: ASYNC110
                await anyio.sleep(0.01)
        return text

    async with Client(
        create_server(Workspace([tree])), mode="legacy", list_roots_callback=answer
    ) as client:
        if not hasattr(client, "send_roots_list_changed"):
            pytest.skip("this SDK's Client cannot send notifications/roots/list_changed")
        assert await allowed(client) == [str(tree / "sub")]

        await change_roots(client, [tree / "other"], landed=str(tree / "other"))
        assert await allowed(client) == [str(tree / "other")]
        now = await client.call_tool(
            "write_file", {"path": str(tree / "other" / "now.txt"), "content": "n"}
        )
        assert not now.is_error, text_of(now)
        before = await client.call_tool(
            "write_file", {"path": str(tree / "sub" / "now.txt"), "content": "n"}
        )
        assert before.is_error
        assert not (tree / "sub" / "now.txt").exists()

        await change_roots(client, [tree.parent / "root-evil"], landed=NO_OVERLAP)

        await change_roots(client, [tree], landed=f"\n{tree}")
        assert await allowed(client) == [str(tree)]


# -- c) stdout discipline -------------------------------------------------------------------

SERVE = [sys.executable, "-m", "atomictools", "serve", "--root"]


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_stdio_server_with_the_sdk_client(root: Path, mode: str) -> None:
    params = StdioServerParameters(
        command=sys.executable, args=[*SERVE[1:], str(root)], env=state_env()
    )
    with anyio.fail_after(30):
        async with Client(params, mode=mode) as client:  # type: ignore[arg-type]
            assert {t.name for t in (await client.list_tools()).tools} == {
                p.stem for p in SCHEMAS.glob("*.json")
            }
            written = await client.call_tool("write_file", {"path": "s.txt", "content": "s\n"})
            assert not written.is_error, text_of(written)
            read = await client.call_tool("read_text_file", {"path": "s.txt"})
            assert read.structured_content is not None
            assert read.structured_content["content"] == "s\n"
    assert (root / "s.txt").read_text() == "s\n"


def read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    """Read from ``fd`` until ``needle`` shows up, EOF, or ``timeout`` seconds."""
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], min(left, 0.2))
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            seen += chunk
    return seen


def test_stdout_is_only_protocol_when_stdin_is_a_pipe(root: Path) -> None:
    proc = subprocess.Popen(
        [*SERVE, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        messages = [
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-11-25",
                    "capabilities": {},
                    "clientInfo": {"name": "raw", "version": "0"},
                },
            },
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
            {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
        ]
        proc.stdin.write(b"".join(json.dumps(m).encode() + b"\n" for m in messages))
        proc.stdin.flush()
        out = read_until(proc.stdout.fileno(), b'"id":2', timeout=20)
        proc.stdin.close()  # the client goes away: the server exits
        proc.wait(10)
        out += proc.stdout.read()
        err = proc.stderr.read().decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0, err
    frames = [json.loads(line) for line in out.splitlines()]  # every line is JSON-RPC
    assert [f.get("id") for f in frames] == [1, 2]
    assert all(f["jsonrpc"] == "2.0" for f in frames)
    assert len(frames[1]["result"]["tools"]) >= 16
    for text in (out.decode(errors="replace"), err):
        assert "Inspector" not in text  # no TTY hint when a client (a pipe) is attached
        assert "not meant to be typed at" not in text


def test_tty_hint_goes_to_stderr_and_stdout_stays_silent(root: Path) -> None:
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [*SERVE, str(root)], stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    os.close(terminal)
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        err = read_until(proc.stderr.fileno(), b"Ctrl-C to stop", timeout=20).decode()
        assert "MCP server" in err
        assert "Inspector" in err
        assert f"--root {root}" in err
        # Issue 12: the hint shows the host JSON for this install, with absolute paths.
        pasted = err[err.index("{") : err.rindex("}") + 1]
        entry = json.loads(pasted)["mcpServers"]["atomictools"]
        assert os.path.isabs(entry["command"])
        assert entry["args"] == ["serve", "--root", str(root)]
        time.sleep(0.3)  # leave time for anything stray to reach stdout
        ready, _, _ = select.select([proc.stdout], [], [], 0)
        assert not ready, "the server wrote to stdout before any client spoke"
        assert proc.poll() is None  # still waiting for a client

        os.write(controller, b"\x04")  # Ctrl-D, as the hint says: end of input, clean exit
        assert proc.wait(10) == 0
        assert proc.stdout.read() == b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(controller)
