"""Reuse atomictools' file tools inside your own MCP server, next to your own tools.

Run it over stdio with ``python examples/embed_tools_server.py /path/to/project`` (or point an
MCP client at that command). Your server gets every atomictools file tool (write_file,
edit_file, ...), apply_changes, and list_changes/undo_change (every change recorded, and taken
back in one call), with the same guarantees, confined to the directory given;
pass ``databases=DatabaseCatalog(workspace)`` to ``register_tools`` for the SQLite tools too.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mcp.server.mcpserver import MCPServer

from atomictools import Workspace
from atomictools.server import ServerOptions, ToolRuntime, register_tools


def build_server(root: Path) -> MCPServer[Any]:
    server: MCPServer[Any] = MCPServer("my-project-assistant")

    @server.tool(description="Count the lines of a text file in the project.")
    async def count_lines(path: str) -> int:
        read = await workspace.read_text(path)
        return read.content.count("\n")

    workspace = Workspace([root])
    register_tools(server, ToolRuntime(workspace, ServerOptions(tool_timeout=30)))
    return server


if __name__ == "__main__":
    project = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    build_server(project).run("stdio")
