"""Write or check ``schemas/``: one JSON file per tool, straight from the server's tool list.

The files are what a client sees in ``tools/list`` (input and output schema, annotations,
description), so a review can see a contract change, and a test fails when code and files drift.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mcp.server.mcpserver import MCPServer


async def tool_schemas(server: MCPServer[Any]) -> dict[str, str]:
    """File name -> file text for every tool, in a stable form."""
    files: dict[str, str] = {}
    for tool in await server.list_tools():
        listed = tool.model_dump(mode="json", by_alias=True, exclude_none=True)
        document = {
            "name": listed["name"],
            "title": listed.get("title"),
            "description": listed.get("description"),
            "annotations": listed.get("annotations"),
            "inputSchema": listed.get("inputSchema"),
            "outputSchema": listed.get("outputSchema"),
        }
        files[f"{tool.name}.json"] = json.dumps(document, indent=2, sort_keys=True) + "\n"
    return files


def drift(expected: dict[str, str], directory: Path) -> list[str]:
    """What differs between the generated files and ``directory`` (empty when in sync)."""
    problems: list[str] = []
    present = {p.name for p in directory.glob("*.json")} if directory.is_dir() else set()
    for name, text in sorted(expected.items()):
        path = directory / name
        if name not in present:
            problems.append(f"missing: {path}")
        elif path.read_text() != text:
            problems.append(f"out of date: {path}")
    problems.extend(
        f"not a tool any more: {directory / name}" for name in sorted(present - set(expected))
    )
    return problems


def write(expected: dict[str, str], directory: Path) -> list[str]:
    """Bring ``directory`` in line with the generated files; returns what changed."""
    changed = drift(expected, directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in expected.items():
        (directory / name).write_text(text)
    for stale in {p.name for p in directory.glob("*.json")} - set(expected):
        (directory / stale).unlink()
    return changed
