"""Protocol-level behaviour of the server: instructions, logging/setLevel, capabilities."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from mcp import Client

from atomictools import Workspace
from atomictools.server import INSTRUCTIONS, create_server

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the SDK's client and dispatcher run on asyncio here


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_instructions_tell_a_model_how_to_work_safely(root: Path, mode: str) -> None:
    async with Client(create_server(Workspace([root])), mode=mode) as client:
        instructions = client.instructions or ""
    assert instructions == INSTRUCTIONS
    for advice in ("expectedSha256", "dryRun", "apply_changes", "idempotencyKey"):
        assert advice in instructions


async def test_logging_set_level_is_answered(root: Path) -> None:
    logger = logging.getLogger("atomictools")
    before = logger.level
    try:
        async with Client(create_server(Workspace([root])), mode="legacy") as client:
            await client.set_logging_level("debug")
            assert logger.level == logging.DEBUG
            await client.set_logging_level("error")
            assert logger.level == logging.ERROR
            result = await client.call_tool("list_allowed_directories", {})
            assert not result.is_error
    finally:
        logger.setLevel(before)


async def test_invalid_arguments_name_the_field_and_change_nothing(root: Path) -> None:
    async with Client(create_server(Workspace([root])), mode="legacy") as client:
        result = await client.call_tool("write_file", {"path": 7, "content": "x"})
        assert result.is_error
        text = result.content[0].text  # type: ignore[union-attr]
        assert text.startswith("Error executing tool write_file: invalid arguments: ")
        assert "path: Input should be a valid string" in text
        assert text.endswith("nothing was changed")
        assert "errors.pydantic.dev" not in text
        missing = await client.call_tool("edit_file", {"path": "a.txt"})
        assert "edits: Field required" in missing.content[0].text  # type: ignore[union-attr]
    assert list(root.iterdir()) == []


SPAN_CHILD = """
import sys, tempfile
from pathlib import Path
from opentelemetry import trace
from atomictools import Workspace
from atomictools.server import create_server

class Configured(trace.TracerProvider):  # what an OpenTelemetry SDK installs
    def get_tracer(self, *args, **kwargs):
        return trace.NoOpTracer()

if sys.argv[1] == "configured":
    trace.set_tracer_provider(Configured())
server = create_server(Workspace([Path(tempfile.mkdtemp())]))
names = [type(m).__name__ for m in server._lowlevel_server.middleware]
print("span" if "OpenTelemetryMiddleware" in names else "none")
"""


@pytest.mark.parametrize(("tracing", "middleware"), [("off", "none"), ("configured", "span")])
def test_the_sdk_span_is_kept_only_when_tracing_is_configured(
    tracing: str, middleware: str
) -> None:
    """Without a tracer provider the span is a no-op that costs every call; with one, every
    message keeps its span (a fresh process each: the provider is process-global)."""
    child = subprocess.run(
        [sys.executable, "-c", SPAN_CHILD, tracing], capture_output=True, text=True, check=True
    )
    assert child.stdout.strip() == middleware
