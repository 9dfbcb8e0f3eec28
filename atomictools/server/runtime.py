"""What every tool call goes through: the client's workspace, the deadline, and error mapping.

The tools stay thin: they describe arguments and shape results, and hand the engine call to
``ToolRuntime.call``, which picks the workspace (narrowed to the client's roots when it offers
them), applies ``--tool-timeout``, and turns every failure into an ``isError`` result whose
message names the problem and the fix. No traceback ever reaches the client.
"""

from __future__ import annotations

import logging
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

import anyio
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError

from atomictools.engine import (
    AtomicToolsError,
    DatabaseCatalog,
    Limits,
    OutsideRootsError,
    Progress,
    Workspace,
    from_os_error,
)
from atomictools.server.wording import for_client

T = TypeVar("T")
logger = logging.getLogger("atomictools.server")


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """The serve-time knobs the tool layer needs (the engine's live in the Workspace)."""

    tool_timeout: float | None = None
    max_read_multiple: int = 100
    recover_on_start: bool = True
    """Finish or undo interrupted change sets before serving, then sweep orphaned temps."""
    sweep_delay: float = 5.0
    """Seconds after start before the temp sweep begins (so it never delays the first call).

    At least the sweep's grace period: by then whatever a killed predecessor left is old enough
    to judge (a claim or temp younger than that may be a live writer's, and is kept)."""
    retry_interval: float = 5.0
    """Seconds between attempts to finish change sets that could not be finished."""
    roots_wait: float = 5.0
    """How long a client gets to answer ``roots/list`` (some declare roots and never answer);
    with ``tool_timeout``, at most half of it."""


class ClientRoots:
    """Narrows the configured roots to a client's roots, once per session.

    Asked with ``roots/list`` when the client declared the roots capability (2025-era
    sessions); a 2026-era session has no back-channel for that request, so it keeps the
    configured roots. ``notifications/roots/list_changed`` drops the cached answer.
    """

    def __init__(self, base: Workspace, *, answer_seconds: float) -> None:
        self.base = base
        self.answer_seconds = answer_seconds
        self._views: weakref.WeakKeyDictionary[Any, Workspace | None] = weakref.WeakKeyDictionary()

    @staticmethod
    def client_key(session: Any) -> Any:
        """What identifies one client connection.

        The SDK 2.3 hands each request a new session object; the connection beneath it lives
        as long as the client does (a private attribute, the only stable per-client handle).
        """
        return getattr(session, "_connection", session)

    def forget(self, session: Any) -> None:
        self._views.pop(self.client_key(session), None)

    async def workspace_for(self, session: Any, wait: float | None = None) -> Workspace:
        """The workspace for the calls of ``session``'s client; asks its roots once (``wait``:
        how long)."""
        capabilities = session.client_capabilities
        if capabilities is None or capabilities.roots is None:
            return self.base
        key = self.client_key(session)
        if key not in self._views:
            self._views[key] = await self._ask(session, wait or self.answer_seconds)
        view = self._views[key]
        if view is None:
            raise OutsideRootsError(
                "none of the client's roots overlaps the server's allowed directories "
                f"({', '.join(str(p) for p in self.base.roots)}); add an overlapping root"
            )
        return view

    async def _ask(self, session: Any, wait: float) -> Workspace | None:
        listed = None
        try:
            with warnings.catch_warnings(), anyio.move_on_after(wait):
                warnings.simplefilter("ignore", MCPDeprecationWarning)
                listed = await session.list_roots()
        except MCPError as err:  # no back-channel (2026 era) or the client refused
            logger.info("client roots unavailable (%s); using the configured roots", err)
            return self.base
        if listed is None:  # it declared the capability but did not answer in time
            logger.warning(
                "the client did not answer roots/list within %g s; using the configured roots "
                "(until it sends roots/list_changed)",
                wait,
            )
            return self.base
        paths = [self._path_of(str(root.uri)) for root in listed.roots]
        return self.narrow([p for p in paths if p is not None])

    @staticmethod
    def _path_of(uri: str) -> Path | None:
        parsed = urlparse(uri)
        return Path(unquote(parsed.path)) if parsed.scheme == "file" else None

    def narrow(self, client_paths: list[Path]) -> Workspace | None:
        """The intersection of the configured roots and the client's (None: empty)."""
        if not client_paths:
            return self.base  # the client offered the capability but named no root
        inner: list[Path] = []
        for client in client_paths:
            real = Path(client).resolve()
            for root in self.base.roots:
                if real.is_relative_to(root):
                    inner.append(real)
                elif root.is_relative_to(real):
                    inner.append(root)
        existing = [p for p in dict.fromkeys(inner) if p.is_dir()]
        return self.base.narrowed(existing) if existing else None


class EarlyCancels:
    """Cancels that arrived before the request they name, so that the request is refused.

    Over streamable HTTP a ``notifications/cancelled`` is a POST of its own and overtakes the
    POST of a large request that is still uploading; the SDK drops a cancel for a request it
    has not seen yet, and the call would then run to completion although the client gave up
    on it (and ignores its result). A cancel for an id that no tool call of that client has
    started is remembered here, for a while, and the call with that id is refused on arrival.
    """

    TTL = 60.0
    """Seconds a cancel waits for its request (which may never come: a refused POST)."""
    SEEN = 1024
    """Recent tool-call ids kept per client: a cancel for one of them is not early."""

    def __init__(self) -> None:
        self._clients: weakref.WeakKeyDictionary[
            Any, tuple[dict[str, float], OrderedDict[str, None]]
        ] = weakref.WeakKeyDictionary()

    def _of(self, client: Any) -> tuple[dict[str, float], OrderedDict[str, None]]:
        return self._clients.setdefault(client, ({}, OrderedDict()))

    def cancelled(self, client: Any, request_id: str) -> None:
        """A cancel arrived (the SDK has stopped the call already if it was running)."""
        waiting, seen = self._of(client)
        if request_id in seen:
            return
        now = time.monotonic()
        for stale in [rid for rid, at in waiting.items() if now - at > self.TTL]:
            del waiting[stale]
        waiting[request_id] = now

    def starting(self, client: Any, request_id: str) -> bool:
        """A tool call starts: False when its client cancelled it already."""
        waiting, seen = self._of(client)
        seen[request_id] = None
        if len(seen) > self.SEEN:
            seen.popitem(last=False)
        return waiting.pop(request_id, None) is None


def _mark_cancelled(ctx: Context[Any, Any]) -> None:
    """Tell the SDK that the client cancelled this request, so that it answers it as one it
    cancelled itself: not at all (stdio), or with "Request cancelled" (HTTP ends the POST).

    The flag is the dispatcher's own; the high-level Context reaches it only through a private
    attribute (absent: the client gets an error result that it ignores).
    """
    outbound = getattr(ctx.request_context.session, "_request_outbound", None)
    flag = getattr(outbound, "cancel_requested", None)
    if isinstance(flag, anyio.Event):
        flag.set()


class ToolRuntime:
    """Runs one engine call for a tool: workspace, deadline, errors."""

    def __init__(
        self,
        workspace: Workspace,
        options: ServerOptions,
        *,
        databases: DatabaseCatalog | None = None,
    ) -> None:
        self.options = options
        self.databases = databases
        """Where a tool finds a database by name (apply_changes' sql steps); None: no
        databases are served."""
        self.roots = ClientRoots(workspace, answer_seconds=options.roots_wait)
        self.early_cancels = EarlyCancels()

    @property
    def limits(self) -> Limits:
        return self.roots.base.limits

    async def call(
        self, ctx: Context[Any, Any], operation: Callable[[Workspace], Awaitable[T]]
    ) -> T:
        timeout = self.options.tool_timeout
        session = ctx.session  # a lookup through the request context: done once per call
        client = ClientRoots.client_key(session)
        if not self.early_cancels.starting(client, ctx.request_id):
            logger.info("request %s: cancelled by its client before it arrived", ctx.request_id)
            _mark_cancelled(ctx)
            raise ToolError("cancelled by the client before it started; nothing was changed")
        try:
            if timeout is None:
                return await operation(await self.roots.workspace_for(session))
            with anyio.fail_after(timeout):  # the roots question counts against the deadline
                wait = min(self.roots.answer_seconds, timeout / 2)
                return await operation(await self.roots.workspace_for(session, wait))
        except TimeoutError as err:
            if isinstance(err, OSError) and err.errno is not None:
                raise ToolError(str(from_os_error(err, "the file", "finish"))) from err
            raise ToolError(
                f"timed out after {timeout:g} s (the server's --tool-timeout); nothing was "
                "changed; retry with a smaller request, or ask for a longer timeout"
            ) from err
        except AtomicToolsError as err:
            raise ToolError(for_client(str(err))) from err
        except OSError as err:
            raise ToolError(str(from_os_error(err, "the file", "finish"))) from err
        except ToolError:
            raise
        except Exception as err:
            logger.exception("unexpected error in a tool call")
            raise ToolError(
                f"unexpected internal error ({type(err).__name__}: {err}); a change, if one "
                "started, was atomic: check the file, then retry or report this"
            ) from err

    @staticmethod
    def reporter(ctx: Context[Any, Any]) -> Progress:
        """The engine's progress callback for this call: a notification to the client when it
        sent a progress token (a no-op otherwise)."""

        async def report(done: int, total: int | None) -> None:
            await ctx.report_progress(done, total)

        return report
