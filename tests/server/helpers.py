"""Shared helpers for the end-to-end MCP tests: connecting, calling tools, checking results.

``Env`` wraps one connected ``mcp.Client`` plus the directories a check works in, and offers
``ok`` (the call must succeed; its structured content is checked against the camelCase output
model) and ``error`` (the call must be an ``isError`` result with a readable message, no
traceback, and the session must still answer the next call).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcp import Client, StdioServerParameters
from mcp.types import CallToolResult, TextContent
from pydantic import BaseModel

from atomictools import STATE_DIR_ENV

NOTHING_CHANGED = "nothing was changed"
OUTSIDE = "outside the allowed directories"
TRACEBACK_MARKERS = re.compile(r'Traceback \(most recent call last\)|File "[^"]+", line \d+')


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def state_env() -> dict[str, str] | None:
    """The environment a server subprocess needs on top of the SDK's few safe variables: the
    test's own state directory, so journals and history stay out of the user's."""
    state = os.environ.get(STATE_DIR_ENV)
    return {STATE_DIR_ENV: state} if state else None


def stdio_params(root: Path, *extra: str) -> StdioServerParameters:
    """The real server as a subprocess: ``python -m atomictools serve --root DIR``.

    The SDK passes a subprocess only a few safe variables; the test's own state directory
    (``$ATOMICTOOLS_STATE_DIR``, set per test by the conftest) is passed on too, so the server
    keeps its journals and history there, not in the user's state directory.
    """
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "atomictools", "serve", "--root", str(root), *extra],
        env=state_env(),
    )


@asynccontextmanager
async def connect(target: Any, mode: str) -> AsyncIterator[Client]:
    """A connected client; ``mode`` is "legacy" (2025 handshake) or "default" (the SDK's auto)."""
    client = Client(target) if mode == "default" else Client(target, mode="legacy")
    async with client:
        # Make sure both protocol eras really are exercised.
        assert client.protocol_version is not None
        assert (client.protocol_version < "2026") == (mode == "legacy"), client.protocol_version
        yield client


def text_of(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


def wire_names(model: type[BaseModel], *, required_only: bool = False) -> set[str]:
    """The camelCase names of ``model``'s fields (only those without a default)."""
    fields = model.model_fields.items()
    return {f.alias or n for n, f in fields if f.is_required() or not required_only}


@dataclass
class Env:
    """One check's view: the client, the server's root, the check's own directory in it."""

    client: Client
    root: Path
    """The server's (only) root."""
    top: Path
    """The test's tmp_path: ``root``, the ``root-evil`` sibling and ``outside.txt``."""
    name: str
    """The check's directory below the root (checks share one root over stdio)."""

    @classmethod
    def make(cls, client: Client, root: Path, top: Path, name: str) -> Env:
        (root / name).mkdir()
        return cls(client, root, top, name)

    @property
    def d(self) -> Path:
        return self.root / self.name

    def p(self, *parts: str) -> str:
        """A path relative to the root (as a client passes it) inside the check's directory."""
        return "/".join((self.name, *parts))

    def f(self, *parts: str) -> Path:
        return self.d.joinpath(*parts)

    async def call(self, tool: str, args: dict[str, Any] | None = None) -> CallToolResult:
        return await self.client.call_tool(tool, args or {})

    async def ok(
        self, tool: str, args: dict[str, Any] | None, model: type[BaseModel]
    ) -> dict[str, Any]:
        """The call succeeds; its structured content is exactly ``model`` in camelCase."""
        result = await self.call(tool, args)
        assert not result.is_error, f"{tool}({args!r}) failed: {text_of(result)}"
        content = result.structured_content
        assert isinstance(content, dict), f"{tool}: no structured content"
        required = wire_names(model, required_only=True)
        assert required <= set(content) <= wire_names(model), f"{tool}: keys {sorted(content)}"
        model.model_validate(content)
        assert isinstance(result.content[0], TextContent)
        return content

    async def result(
        self, tool: str, args: dict[str, Any] | None, model: type[BaseModel]
    ) -> CallToolResult:
        """Like ``ok`` but returns the whole result (for content blocks)."""
        result = await self.call(tool, args)
        assert not result.is_error, f"{tool}({args!r}) failed: {text_of(result)}"
        assert isinstance(result.structured_content, dict)
        keys = set(result.structured_content)
        assert wire_names(model, required_only=True) <= keys <= wire_names(model)
        model.model_validate(result.structured_content)
        return result

    async def error(
        self,
        tool: str,
        args: dict[str, Any] | None,
        *fragments: str,
        nothing_changed: bool = True,
    ) -> str:
        """The call is an ``isError`` result naming ``fragments``; the session still serves."""
        result = await self.call(tool, args)
        message = text_of(result)
        assert result.is_error, f"{tool}({args!r}) did not fail: {message}"
        assert message.startswith(f"Error executing tool {tool}") or "Unknown tool" in message
        for fragment in fragments:
            assert fragment in message, f"{fragment!r} not in {message!r}"
        if nothing_changed:
            assert NOTHING_CHANGED in message, message
        assert not TRACEBACK_MARKERS.search(message), message
        assert result.structured_content is None
        await self.alive()
        return message

    async def alive(self) -> None:
        """The same session answers the next call."""
        result = await self.call("list_allowed_directories")
        assert not result.is_error, text_of(result)
        assert result.structured_content == {"directories": [str(self.root.resolve())]}
