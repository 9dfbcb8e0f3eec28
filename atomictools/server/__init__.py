"""The MCP layer: a thin mapping of the engine onto MCP tools (no engine logic lives here)."""

from atomictools.engine import DatabaseCatalog
from atomictools.server.app import INSTRUCTIONS, create_server
from atomictools.server.file_tools import register_file_tools
from atomictools.server.registry import HIDDEN_WHEN_READ_ONLY, MUTATING_TOOLS, register_tools
from atomictools.server.runtime import ServerOptions, ToolRuntime

__all__ = [
    "HIDDEN_WHEN_READ_ONLY",
    "INSTRUCTIONS",
    "MUTATING_TOOLS",
    "DatabaseCatalog",
    "ServerOptions",
    "ToolRuntime",
    "create_server",
    "register_file_tools",
    "register_tools",
]
