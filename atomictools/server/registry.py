"""One call that puts atomictools' tools on any MCPServer: files, change sets, history, databases.

``register_tools(server, runtime, databases=catalog)`` is what ``create_server`` does and what an
embedder calls to put our tools next to their own. Parts can be left out (``files=False``,
``change_sets=False``, ``history=False``, no catalog). A read-only workspace gets only the
tools that can succeed: advertising ``write_file`` to a model that can only be refused wastes
its turns.
"""

from __future__ import annotations

from typing import Any

from mcp.server.mcpserver import MCPServer

from atomictools.engine import DatabaseCatalog
from atomictools.server.db_tools import register_db_tools
from atomictools.server.file_tools import register_change_set_tool, register_file_tools
from atomictools.server.history_tools import register_history_tools
from atomictools.server.runtime import ToolRuntime

MUTATING_TOOLS = frozenset(
    {
        "write_file",
        "edit_file",
        "create_directory",
        "move_file",
        "copy_file",
        "delete_file",
        "apply_changes",
        "undo_change",
        "db_execute",
        "db_transaction",
    }
)
"""The tools that change something (``readOnlyHint`` false)."""
HIDDEN_WHEN_READ_ONLY = MUTATING_TOOLS - {"edit_file", "undo_change"}
"""Left out in read-only mode: all of them but ``edit_file`` and ``undo_change``, whose
``dryRun`` previews work."""


def register_tools(
    server: MCPServer[Any],
    runtime: ToolRuntime,
    *,
    files: bool = True,
    change_sets: bool = True,
    history: bool = True,
    databases: DatabaseCatalog | None = None,
) -> list[str]:
    """Add atomictools' tools to ``server``; returns the names added.

    ``files``: the 17 file tools (reads, listings, write/edit/move/copy/delete/mkdir);
    ``change_sets``: ``apply_changes``; ``history``: ``list_changes`` and ``undo_change`` (the
    workspace's recorded changes, and taking them back); ``databases``: the five SQLite tools
    over that catalog (close it when your server stops: ``await catalog.close()``).
    """
    before = set(_names(server))
    if files:
        register_file_tools(server, runtime)
    if change_sets:
        register_change_set_tool(server, runtime, databases)
    if history:
        register_history_tools(server, runtime)
    if databases is not None:
        register_db_tools(server, runtime, databases)
    added = [name for name in _names(server) if name not in before]
    for name in added:
        _publish_without_revalidating(server, name)
    if runtime.roots.base.read_only:
        for name in [name for name in added if name in HIDDEN_WHEN_READ_ONLY]:
            server.remove_tool(name)
            added.remove(name)
    return added


def _publish_without_revalidating(server: MCPServer[Any], name: str) -> None:
    """Keep the tool's outputSchema, but stop the SDK validating each result against it again.

    Our tools build their structured content from their own output models (the tests validate
    every one against them); the SDK's second validation of a result that is already right
    cost 3.5 ms of a 1,188-entry listing. A metadata with a schema and no ``output_model`` is
    the SDK's documented "published, not validated" form; its fields are read on every call.
    """
    tool = server._tool_manager.get_tool(name)
    if tool is not None and tool.fn_metadata.output_schema is not None:
        tool.fn_metadata.output_model = None


def _names(server: MCPServer[Any]) -> list[str]:
    return [tool.name for tool in server._tool_manager.list_tools()]
