"""The MCP Inspector CLI, an independent TypeScript client, against ``atomictools serve`` (stdio).

``mcp-inspector --cli`` (pinned in ``package.json``) launches ``python -m atomictools serve
--root ROOT --state-dir STATE`` itself, negotiates, runs one method and exits. What it proves:

- ``tools/list --strict``: the Inspector's tool-schema portability lint (boolean schemas are
  errors and make it exit 6; untyped schemas, remote ``$ref`` and ``type`` arrays are warnings)
  finds no error, only the warnings listed in ``KNOWN_WARNINGS`` with their reason, and the
  tools it sees are exactly the ones ``schemas/`` documents, schema for schema.
- ``tools/call``: ``write_file`` then ``read_text_file`` in both protocol eras. The Inspector
  validates each structured result against the tool's output schema (Ajv) and exits 1 with the
  validation message if it does not match (5 for an ``isError`` result). The file is on disk.

The Inspector's npm ``postinstall`` (``scripts/install-clients.mjs``) is not needed: it exits at
once when the package lives under ``node_modules`` (it only installs per-client dependencies
in a source checkout), and the published CLI bundle needs nothing beyond the package's own
dependencies, which ``npm ci`` installs. The Inspector requires Node >= 22.19, so it runs on
the pinned Node 22 binary (``node22``), not on whatever ``node`` is on PATH.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SCHEMAS = Path(__file__).parents[2] / "schemas"
CALL_TIMEOUT = 30
EXIT_OK = 0
EXIT_TOOL_ERROR = 5  # the Inspector's exit code for an isError tool result

# Portability warnings we accept, with the reason. Any other finding fails the test.
SQL_VALUE = "a SQLite value is any JSON scalar or {'$blob': base64}; deliberately untyped"
KNOWN_WARNINGS: dict[tuple[str, str, str, str], str] = {
    ("db_query", "inputSchema", "properties.params.anyOf[0].items", "untyped-schema"): SQL_VALUE,
    ("db_execute", "inputSchema", "properties.params.anyOf[0].items", "untyped-schema"): SQL_VALUE,
    (
        "db_transaction",
        "inputSchema",
        "$defs.DbStatement.properties.params.anyOf[0].items",
        "untyped-schema",
    ): SQL_VALUE,
    (  # a change set's sql step takes the same statements
        "apply_changes",
        "inputSchema",
        "$defs.DbStatement.properties.params.anyOf[0].items",
        "untyped-schema",
    ): SQL_VALUE,
}


@dataclass
class Inspector:
    node: Path
    launcher: Path
    home: Path
    root: Path
    state: Path

    def run(self, *args: str, era: str = "legacy") -> subprocess.CompletedProcess[str]:
        """``mcp-inspector --cli --format json ARGS -- python -m atomictools serve ...``."""
        command = [
            str(self.node),
            str(self.launcher),
            "--cli",
            "--format",
            "json",
            "--protocol-era",
            era,
            *args,
            "--",
            sys.executable,
            "-m",
            "atomictools",
            "serve",
            "--root",
            str(self.root),
            "--state-dir",
            str(self.state),
        ]
        env = {
            **os.environ,
            # Keep the Inspector's catalog, client config and OAuth store out of the real home.
            "HOME": str(self.home),
            "MCP_CATALOG_PATH": str(self.home / "catalog.json"),
            "MCP_CLIENT_CONFIG_PATH": str(self.home / "client.json"),
            "NO_COLOR": "1",
        }
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=CALL_TIMEOUT,
            env=env,
            cwd=self.home,
            check=False,
        )

    def call(self, tool: str, arguments: dict[str, Any], era: str = "legacy") -> dict[str, Any]:
        """A ``tools/call`` that must succeed; returns the ``CallToolResult``."""
        done = self.run(
            "--method",
            "tools/call",
            "--tool-name",
            tool,
            "--tool-args-json",
            json.dumps(arguments),
            era=era,
        )
        assert done.returncode == EXIT_OK, explain(done)
        result: dict[str, Any] = json.loads(done.stdout)["result"]
        assert result.get("isError") is False, result
        return result


def explain(done: subprocess.CompletedProcess[str]) -> str:
    return f"exit {done.returncode}\nstdout: {done.stdout[-4000:]}\nstderr: {done.stderr[-4000:]}"


@pytest.fixture
def inspector(node22: Path, node_modules: Path, tmp_path: Path) -> Inspector:
    launcher = node_modules / "@modelcontextprotocol/inspector/clients/launcher/build/index.js"
    assert launcher.exists(), f"npm ci did not install the Inspector ({launcher} is missing)"
    for name in ("home", "root", "state"):
        (tmp_path / name).mkdir()
    return Inspector(
        node=node22,
        launcher=launcher,
        home=tmp_path / "home",
        root=(tmp_path / "root").resolve(),
        state=tmp_path / "state",
    )


def test_tools_list_passes_strict_portability_checks(inspector: Inspector) -> None:
    done = inspector.run("--method", "tools/list", "--strict")
    # 6 would mean an error-severity portability problem (--strict); 0 means none.
    assert done.returncode == EXIT_OK, explain(done)
    output = json.loads(done.stdout)
    tools = {tool["name"]: tool for tool in output["result"]["tools"]}

    findings = [
        (entry["toolName"], finding)
        for entry in output.get("schemaFindings", [])
        for finding in entry["findings"]
    ]
    errors = [(tool, f) for tool, f in findings if f["severity"] == "error"]
    assert errors == [], done.stderr
    unexplained = [
        (tool, f["schema"], f["path"], f["rule"], f["issue"])
        for tool, f in findings
        if (tool, f["schema"], f["path"], f["rule"]) not in KNOWN_WARNINGS
    ]
    assert unexplained == [], "new portability warnings; fix the schema or explain it here"
    seen = {(tool, f["schema"], f["path"], f["rule"]) for tool, f in findings}
    assert seen == set(KNOWN_WARNINGS), "a known warning is gone: remove it from KNOWN_WARNINGS"

    # What the independent client saw is what schemas/ documents.
    documented = {p.stem: json.loads(p.read_text()) for p in SCHEMAS.glob("*.json")}
    assert set(tools) == set(documented)
    for name, tool in tools.items():
        doc = documented[name]
        for key in ("description", "annotations", "inputSchema", "outputSchema"):
            assert tool.get(key) == doc.get(key), f"{name}.{key} differs from schemas/{name}.json"


@pytest.mark.parametrize("era", ["legacy", "modern"])
def test_write_then_read_through_the_inspector(inspector: Inspector, era: str) -> None:
    content = "héllo wörld\r\nsecond line\n"
    data = content.encode()
    digest = hashlib.sha256(data).hexdigest()

    written = inspector.call("write_file", {"path": "notes.txt", "content": content}, era)
    assert written["structuredContent"] == {
        "path": "notes.txt",
        "size": len(data),
        "sha256": digest,
        "created": True,
    }
    assert (inspector.root / "notes.txt").read_bytes() == data

    read = inspector.call("read_text_file", {"path": str(inspector.root / "notes.txt")}, era)
    structured = read["structuredContent"]
    assert structured["content"] == content
    assert structured["sha256"] == digest
    assert structured["newline"] == "mixed"
    assert read["content"][0] == {"type": "text", "text": content}
    assert sorted(p.name for p in inspector.root.iterdir()) == ["notes.txt"]  # no temps left


def test_refused_call_is_a_tool_error_and_writes_nothing(inspector: Inspector) -> None:
    outside = inspector.root.parent / "escape.txt"
    done = inspector.run(
        "--method",
        "tools/call",
        "--tool-name",
        "write_file",
        "--tool-args-json",
        json.dumps({"path": str(outside), "content": "nope"}),
    )
    assert done.returncode == EXIT_TOOL_ERROR, explain(done)
    result = json.loads(done.stdout.splitlines()[0])["result"]
    assert result["isError"] is True
    text = result["content"][0]["text"]
    assert "outside the allowed directories" in text
    assert "nothing was changed" in text
    assert "Traceback" not in done.stdout + done.stderr
    assert not outside.exists()
    assert list(inspector.root.iterdir()) == []
