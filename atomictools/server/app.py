"""Build the atomictools MCP server: instructions, the file tools, and protocol odds and ends."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.to_thread
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.types import (
    CallToolResult,
    CancelledNotificationParams,
    EmptyResult,
    InputRequiredResult,
    NotificationParams,
    SetLevelRequestParams,
)
from pydantic import ValidationError

from .. import __version__
from ..catalog import DatabaseCatalog
from ..recovery import RecoveryReport, recover_journals, sweep_temps
from ..workspace import Workspace
from .db_tools import register_db_tools
from .file_tools import register_change_set_tool, register_file_tools
from .runtime import ClientRoots, ServerOptions, ToolRuntime

INSTRUCTIONS = """\
atomictools changes files atomically inside the allowed directories (list_allowed_directories).
Work safely with it:
- Read before you change: read_text_file returns a sha256; pass it as expectedSha256 to
  write_file, edit_file or delete_file, so the change is refused if the file changed meanwhile.
- Prefer edit_file for small changes: each oldText must match exactly once; dryRun previews
  the diff without writing. Line endings and encoding are kept.
- Every write is all-or-nothing: readers never see a half-written file, and a cancelled or
  timed-out call changes nothing.
- For changes that span several files, use apply_changes when this server offers it (all or
  nothing), and retry a timed-out call with the same idempotencyKey where a tool accepts one.
- SQLite: db_query only reads; db_execute runs one statement, db_transaction several, each as
  one transaction (all or nothing). Bind values with params; never paste them into the SQL.
- Errors say what to fix and whether anything changed; read them before retrying.
"""

logger = logging.getLogger("atomictools.server")


class AtomicToolsServer(MCPServer[Any]):
    """MCPServer whose argument errors read like the rest of ours: what to fix, nothing changed.

    The SDK reports a failed argument validation as pydantic's text (with its model name and a
    documentation link); a model is better served by the field and the problem.
    """

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[Any, Any] | None = None
    ) -> CallToolResult | InputRequiredResult:
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as err:
            cause = err.__cause__
            if isinstance(err, UnexpectedToolError) or not isinstance(cause, ValidationError):
                raise
            problems = "; ".join(
                f"{'.'.join(str(part) for part in e['loc']) or 'arguments'}: {e['msg']}"
                for e in cause.errors()[:10]
            )
            raise ToolError(  # the same prefix the SDK gives every other tool error
                f"Error executing tool {name}: invalid arguments: {problems}; fix them and "
                "retry; nothing was changed"
            ) from cause


def create_server(
    workspace: Workspace,
    options: ServerOptions | None = None,
    *,
    databases: Mapping[str, str | os.PathLike[str]] | None = None,
) -> MCPServer[Any]:
    """An MCPServer exposing ``workspace`` through the file and database tools.

    ``databases`` names SQLite files the operator allows (``--db NAME=PATH``); database files
    inside the roots are usable too. Open databases are closed when the server shuts down.
    """
    catalog = DatabaseCatalog(
        workspace, databases, durability=workspace.durability, read_only=workspace.read_only
    )

    options = options or ServerOptions()

    @asynccontextmanager
    async def lifespan(_server: MCPServer[Any]) -> AsyncIterator[None]:
        if options.recover_on_start:
            # Before the first call is served: no tool may see a half-applied change set.
            report = await anyio.to_thread.run_sync(
                recover_journals, workspace.sandbox, workspace.journal_dir
            )
            if report.fixed_something or report.problems:
                logger.warning("startup recovery: %s", report.as_dict())
            # Temps named by journals left alone (live, other roots) stay protected.
            start_background_sweep(workspace, options.sweep_delay, report.protected)
        try:
            yield
        finally:
            await catalog.close()

    server: MCPServer[Any] = AtomicToolsServer(
        "atomictools",
        title="atomictools",
        description="Atomic, cancellation-safe and crash-safe file and SQLite changes for agents.",
        instructions=INSTRUCTIONS,
        version=__version__,
        lifespan=lifespan,
    )
    runtime = ToolRuntime(workspace, options)
    register_file_tools(server, runtime)
    register_change_set_tool(server, runtime)
    register_db_tools(server, runtime, catalog)
    _answer_protocol_extras(server, runtime)
    return server


def start_background_sweep(
    workspace: Workspace, delay: float, protected: set[str] | None = None
) -> threading.Thread:
    """Sweep orphaned temp files in a daemon thread, after ``delay`` seconds.

    A large tree takes a while to walk; doing it after the server is already serving keeps
    the start fast. The sweep only removes temps no live writer holds (see ``recovery``).
    """

    def run() -> None:
        time.sleep(delay)
        try:
            report = sweep_temps(workspace.sandbox, RecoveryReport(protected=set(protected or ())))
        except Exception:
            logger.warning("the temp-file sweep failed", exc_info=True)
            return
        if report.removed:
            logger.warning("removed %d orphaned temp file(s)", len(report.removed))

    thread = threading.Thread(target=run, name="atomictools-sweep", daemon=True)
    thread.start()
    return thread


def _answer_protocol_extras(server: MCPServer[Any], runtime: ToolRuntime) -> None:
    """``logging/setLevel`` and ``roots/list_changed``, which MCPServer 2.x no longer wires,
    and ``notifications/cancelled`` for a request not seen yet (see ``EarlyCancels``).

    The high-level server exposes no hook for either, so they go on the low-level server.
    """
    lowlevel = server._lowlevel_server

    async def set_level(
        _ctx: ServerRequestContext[Any], params: SetLevelRequestParams
    ) -> EmptyResult:
        python_level = {
            "emergency": "CRITICAL",
            "alert": "CRITICAL",
            "critical": "CRITICAL",
            "error": "ERROR",
            "warning": "WARNING",
            "notice": "INFO",
            "info": "INFO",
            "debug": "DEBUG",
        }[params.level]
        logging.getLogger("atomictools").setLevel(python_level)
        return EmptyResult()

    async def roots_changed(ctx: ServerRequestContext[Any], _params: NotificationParams) -> None:
        runtime.roots.forget(ctx.session)

    async def cancelled(
        ctx: ServerRequestContext[Any], params: CancelledNotificationParams
    ) -> None:
        # The SDK cancels a running request itself; this catches a cancel that came first.
        if params.request_id is not None:
            client = ClientRoots.client_key(ctx.session)
            runtime.early_cancels.cancelled(client, str(params.request_id))

    lowlevel.add_request_handler("logging/setLevel", SetLevelRequestParams, set_level)
    lowlevel.add_notification_handler(
        "notifications/roots/list_changed", NotificationParams, roots_changed
    )
    lowlevel.add_notification_handler(
        "notifications/cancelled", CancelledNotificationParams, cancelled
    )
