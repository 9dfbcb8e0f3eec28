"""The MCP layer: a thin mapping of the engine onto MCP tools (no engine logic lives here)."""

from .app import INSTRUCTIONS, create_server
from .file_tools import register_file_tools
from .runtime import ServerOptions, ToolRuntime

__all__ = ["INSTRUCTIONS", "ServerOptions", "ToolRuntime", "create_server", "register_file_tools"]
