"""The examples run as documented."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from mcp import Client

EXAMPLES = Path(__file__).parents[1] / "examples"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_embed_workspace_walkthrough_holds_its_guarantees() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "embed_workspace.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all guarantees held" in done.stdout
    assert "FAILED" not in done.stdout


def test_embed_database_walkthrough_keeps_the_invariant() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "embed_database.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cancelled after" in done.stdout
    assert "refused" in done.stdout
    assert "5. report.txt and its row committed as one change set (sql)" in done.stdout
    assert "6. refused as one: change 2 of 2 (sql): statement 1 of 1" in done.stdout


@pytest.mark.anyio
async def test_embedded_tools_server(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "embed_tools_server", EXAMPLES / "embed_tools_server.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    server = module.build_server(tmp_path)
    async with Client(server, mode="legacy") as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert {
            "count_lines",
            "write_file",
            "edit_file",
            "delete_file",
            "apply_changes",
            "list_changes",
            "undo_change",
        } <= names
        written = await client.call_tool("write_file", {"path": "a.txt", "content": "1\n2\n"})
        assert not written.is_error
        counted = await client.call_tool("count_lines", {"path": "a.txt"})
        assert counted.structured_content == {"result": 2}
        edited = await client.call_tool("write_file", {"path": "a.txt", "content": "3\n"})
        assert not edited.is_error
        undone = await client.call_tool("undo_change", {"last": 1})
        assert not undone.is_error, undone
    assert (tmp_path / "a.txt").read_text() == "1\n2\n"


def test_client_config_is_valid_json() -> None:
    config = json.loads((EXAMPLES / "claude_desktop_config.json").read_text())
    server = config["mcpServers"]["atomictools"]
    assert server["command"] == "atomictools"
    assert server["args"][:2] == ["serve", "--root"]
