"""Calling the database tools from a test: calls that must succeed (their structured content
checked against the output model) or fail clearly (an ``isError`` naming the problem, no
traceback, and the session still serving). Shared by the SQLite tool tests and the contract
tests that run on both backends."""

from __future__ import annotations

import time
from typing import Any

import anyio
from mcp import Client
from mcp.types import CallToolResult, TextContent

from atomictools.server.models import DbExecuteOutput, DbQueryOutput, DbTransactionOutput

from .helpers import TRACEBACK_MARKERS, text_of, wire_names

DB = "main"
"""The database every test configures (``--db main=...``)."""
COMMITTED_NOTHING = "nothing was committed"


class DbCalls:
    """A connected client's database tool calls. ``exact_fields``: a result carries every
    field of its output model (else: at least the required ones, and no unknown one)."""

    exact_fields = True

    def __init__(self, client: Client) -> None:
        self.client = client

    async def call(self, tool: str, args: dict[str, Any], **kw: Any) -> CallToolResult:
        return await self.client.call_tool(tool, args, **kw)

    async def ok(
        self, tool: str, args: dict[str, Any], model: type[Any] | None = None, **kw: Any
    ) -> dict[str, Any]:
        """The call succeeds; returns its structured content (checked against ``model``)."""
        result = await self.call(tool, args, **kw)
        assert not result.is_error, f"{tool}({str(args)[:300]}) failed: {text_of(result)}"
        content = result.structured_content
        assert isinstance(content, dict), f"{tool}: no structured content"
        assert isinstance(result.content[0], TextContent)
        if model is not None:
            if self.exact_fields:
                assert set(content) == wire_names(model), sorted(content)
            else:
                assert set(content) <= wire_names(model), sorted(content)
                assert wire_names(model, required_only=True) <= set(content), sorted(content)
            model.model_validate(content)
        return content

    async def err(
        self, tool: str, args: dict[str, Any], *fragments: str, committed_nothing: bool = False
    ) -> str:
        """An ``isError`` result naming ``fragments``, no traceback; the session still serves."""
        result = await self.call(tool, args)
        message = text_of(result)
        assert result.is_error, f"{tool}({str(args)[:300]}) did not fail: {message}"
        assert message.startswith(f"Error executing tool {tool}"), message
        for fragment in fragments:
            assert fragment.lower() in message.lower(), f"{fragment!r} not in {message!r}"
        if committed_nothing:
            assert COMMITTED_NOTHING in message, message
        assert not TRACEBACK_MARKERS.search(message), message
        assert result.structured_content is None
        assert await self.rows("SELECT 1") == [[1]]
        return message

    async def query(self, sql: str, params: Any = None, **more: Any) -> dict[str, Any]:
        args: dict[str, Any] = {"database": DB, "sql": sql, **more}
        if params is not None:
            args["params"] = params
        return await self.ok("db_query", args, DbQueryOutput)

    async def rows(self, sql: str, params: Any = None) -> list[list[Any]]:
        return list((await self.query(sql, params))["rows"])

    async def execute(self, sql: str, params: Any = None, **more: Any) -> dict[str, Any]:
        args: dict[str, Any] = {"database": DB, "sql": sql, **more}
        if params is not None:
            args["params"] = params
        return await self.ok("db_execute", args, DbExecuteOutput)

    async def transaction(self, *statements: str | dict[str, Any], **kw: Any) -> dict[str, Any]:
        """``idempotencyKey`` goes to the tool; any other keyword to ``call_tool``."""
        stmts = [{"sql": s} if isinstance(s, str) else s for s in statements]
        args: dict[str, Any] = {"database": DB, "statements": stmts}
        key = kw.pop("idempotencyKey", None)
        if key is not None:
            args["idempotencyKey"] = key
        return await self.ok("db_transaction", args, DbTransactionOutput, **kw)


class ProgressLog:
    """A progress callback that keeps what arrived, and when the first one did."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, float | None]] = []
        self.start = time.monotonic()
        self.first_at: float | None = None
        self.all_done = anyio.Event()

    async def __call__(self, progress: float, total: float | None, _message: str | None) -> None:
        if self.first_at is None:
            self.first_at = time.monotonic() - self.start
        self.seen.append((progress, total))
        if progress == total:
            self.all_done.set()

    async def complete(self) -> None:
        """Callbacks run in tasks of their own: the last may land just after the result."""
        with anyio.fail_after(5):
            await self.all_done.wait()
