"""Build the atomictools MCP server: instructions, the file tools, and protocol odds and ends."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.to_thread
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.types import (
    CallToolRequestParams,
    CallToolResult,
    CancelledNotificationParams,
    EmptyResult,
    InputRequiredResult,
    NotificationParams,
    SetLevelRequestParams,
)
from pydantic import ValidationError

from atomictools import __version__
from atomictools.engine import (
    DatabaseCatalog,
    RecoveryReport,
    Workspace,
)
from atomictools.server.registry import HIDDEN_WHEN_READ_ONLY, register_tools
from atomictools.server.runtime import ClientRoots, ServerOptions, ToolRuntime

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
  nothing; a sql step puts rows of one database in the same all-or-nothing change), and retry
  a timed-out call with the same idempotencyKey where a tool accepts one.
- SQLite: db_query only reads; db_execute runs one statement, db_transaction several, each as
  one transaction (all or nothing). Bind values with params; never paste them into the SQL.
- Every change is recorded with what it replaced: list_changes shows them, and undo_change
  takes one back in one atomic step (last=1: your last change; dryRun=true previews it).
- Errors say what to fix and whether anything changed; read them before retrying.
"""

logger = logging.getLogger("atomictools.server")


class AtomicToolsServer(MCPServer[Any]):
    """MCPServer whose argument errors read like the rest of ours: what to fix, nothing changed.

    The SDK reports a failed argument validation as pydantic's text (with its model name and a
    documentation link); a model is better served by the field and the problem.
    """

    read_only = False
    """Set for ``--read-only``: the mutating tools are not listed; a call to one (a client with
    an old tool list) is told why."""

    async def _handle_call_tool(
        self, ctx: ServerRequestContext[Any], params: CallToolRequestParams
    ) -> Any:
        """The wire form of a tool's result, with its structured content passed as built.

        Our tools build structured content as plain JSON data; dumping the result model would
        walk all of it once more before the SDK's own walk of the reply (a 1,188-entry
        listing: 0.5 ms of 4). The handler may return the wire dict (the SDK's runner takes a
        dict as it is); ``call_tool`` still returns the result model to Python callers.
        """
        result = await super()._handle_call_tool(ctx, params)
        if not isinstance(result, CallToolResult) or result.structured_content is None:
            return result
        wire = result.model_dump(
            by_alias=True, mode="json", exclude_none=True, exclude={"structured_content"}
        )
        wire["structuredContent"] = result.structured_content
        return wire

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[Any, Any] | None = None
    ) -> CallToolResult | InputRequiredResult:
        if self.read_only and name in HIDDEN_WHEN_READ_ONLY:
            raise ToolError(
                f"Error executing tool {name}: this server is read-only (--read-only): it can "
                "read, list and query, not change anything; nothing was changed"
            )
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
    allow_superuser: bool = False,
) -> MCPServer[Any]:
    """An MCPServer exposing ``workspace`` through the file and database tools.

    ``databases`` names SQLite files (or ``postgresql://`` URLs) the operator allows (``--db
    NAME=PATH``); database files inside the roots are usable too. Open databases are closed
    when the server shuts down. ``allow_superuser``: connect to PostgreSQL as a superuser.
    """
    catalog = DatabaseCatalog(
        workspace,
        databases,
        durability=workspace.durability,
        read_only=workspace.read_only,
        allow_superuser=allow_superuser,
    )

    options = options or ServerOptions()

    @asynccontextmanager
    async def lifespan(_server: MCPServer[Any]) -> AsyncIterator[None]:
        try:
            async with anyio.create_task_group() as background:
                if options.recover_on_start:
                    # Before the first call is served: no tool may see a half-applied change set.
                    report = await startup_recovery(workspace)
                    background.start_soon(sweep_later, workspace, options.sweep_delay, report)
                    if not workspace.read_only:  # a read-only server deletes nothing
                        # After recovery (which settles the entries a crash left pending),
                        # while the first calls are already served.
                        background.start_soon(prune_history, workspace)
                background.start_soon(retry_unfinished, workspace, options.retry_interval)
                try:
                    yield
                finally:
                    background.cancel_scope.cancel()
        finally:
            await catalog.close()

    server = AtomicToolsServer(
        "atomictools",
        title="atomictools",
        description="Atomic, cancellation-safe and crash-safe file and SQLite changes for agents.",
        instructions=INSTRUCTIONS,
        version=__version__,
        lifespan=lifespan,
    )
    server.read_only = workspace.read_only
    _trace_only_when_tracing(server)
    runtime = ToolRuntime(workspace, options, databases=catalog)
    register_tools(server, runtime, databases=catalog)
    _answer_protocol_extras(server, runtime)
    return server


def _trace_only_when_tracing(server: MCPServer[Any]) -> None:
    """Drop the SDK's per-message OpenTelemetry span unless a tracer provider is configured.

    The span is a no-op without one, yet it cost about a fifth of a small call's server time
    (the SDK documents dropping it from ``middleware`` as the opt-out). With OpenTelemetry
    configured before the server is created (``opentelemetry-instrument``, or a
    ``TracerProvider`` set at start), every message still gets its span.
    """
    if _tracer_provider_configured():
        return
    lowlevel = server._lowlevel_server
    lowlevel.middleware = [m for m in lowlevel.middleware if type(m).__name__ != _SDK_SPAN]


_SDK_SPAN = "OpenTelemetryMiddleware"


def _tracer_provider_configured() -> bool:
    try:
        from opentelemetry import trace  # noqa: PLC0415  (the SDK's dependency, not ours)
    except ImportError:
        return False
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


async def startup_recovery(workspace: Workspace) -> RecoveryReport:
    """Finish or undo interrupted change sets; what cannot be done is refused, not fatal.

    A server always starts: a change set left for a person only makes its own paths refused
    (with what to run), and every other path is served.
    """
    try:
        report = await workspace.recover_interrupted()
    except Exception:  # recovery reports per record; this is a last resort
        logger.exception("startup recovery failed; serving anyway")
        return RecoveryReport()
    if report.journals_unreadable:
        logger.warning("startup recovery: %s", report.journals_unreadable)
    if report.fixed_something or report.problems:
        logger.warning("startup recovery: %s", report.as_dict())
    return report


async def prune_history(workspace: Workspace) -> int:
    """One history retention pass at start (``--history-max-bytes``, ``--history-max-age``);
    the bytes freed. A failure is logged, never fatal: the history is a convenience, and a
    server that cannot prune it still serves every tool."""
    try:
        freed = await anyio.to_thread.run_sync(workspace.prune_history)
    except Exception:
        logger.warning("the history retention pass at start failed", exc_info=True)
        return 0
    if freed:
        logger.info("history retention: freed %d bytes of kept content", freed)
    return freed


async def sweep_later(workspace: Workspace, delay: float, startup: RecoveryReport) -> None:
    """Sweep orphaned files of ours, ``delay`` seconds after the start.

    A large tree takes a while to walk; doing it after the server is already serving keeps the
    start fast. The sweep removes only what no live writer holds and no change set needs;
    change sets it has to leave for a person get their paths refused.
    """
    await anyio.sleep(delay)
    try:
        report = await workspace.sweep(startup)
    except Exception:
        logger.warning("the temp-file sweep failed", exc_info=True)
        return
    if report.removed:
        logger.warning("removed %d orphaned temp file(s)", len(report.removed))
    for unfinished in report.unfinished.values():
        logger.warning("needs a person: %s", unfinished.describe())


async def retry_unfinished(workspace: Workspace, interval: float) -> None:
    """Now and then, try again to finish change sets this server could not finish (a disk
    that was full, a directory that was not writable); another process may finish them too."""
    while True:
        await anyio.sleep(interval)
        if not workspace.unfinished:
            continue
        try:
            finished = await workspace.finish_unfinished()
        except Exception:
            logger.warning("retrying unfinished change sets failed", exc_info=True)
            continue
        for txid in finished:
            logger.warning("change set %s is finished now", txid)


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
