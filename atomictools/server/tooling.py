"""What every tool module shares: annotations, the idempotency-key parameter, the result shape.

Kept apart so the file tools and the database tools depend on it, not on each other.
"""

from __future__ import annotations

from typing import Annotated, Any

from mcp.types import CallToolResult, ContentBlock, TextContent, ToolAnnotations
from pydantic import Field

from atomictools.engine import MAX_KEY_LENGTH
from atomictools.server.models import WireModel

READ_ONLY = ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False)


def mutating(*, destructive: bool, idempotent: bool) -> ToolAnnotations:
    return ToolAnnotations(
        read_only_hint=False,
        destructive_hint=destructive,
        idempotent_hint=idempotent,
        open_world_hint=False,
    )


IdempotencyKey = Annotated[
    str | None,
    Field(
        description=(
            "A unique string you choose per change (a UUID). Retrying with the same key and "
            "arguments returns the first call's result without changing anything again."
        ),
        min_length=1,
        max_length=MAX_KEY_LENGTH,
    ),
]


def tool_result(
    model: WireModel,
    text: str,
    extra: list[ContentBlock] | None = None,
    *,
    exclude_none: bool = False,
) -> CallToolResult:
    """A tool's reply: ``text`` first, then ``extra`` blocks, and ``model`` as structured
    content (``exclude_none``: leave out the optional fields that do not apply)."""
    dumped = model.model_dump(mode="json", by_alias=True, exclude_none=exclude_none)
    return structured_result(dumped, text, extra)


def structured_result(
    structured: dict[str, Any], text: str, extra: list[ContentBlock] | None = None
) -> CallToolResult:
    """A reply whose structured content the tool built as plain JSON data, in its model's
    camelCase shape: for long listings, where a model object per entry costs more than the
    listing (the tests validate these against the model)."""
    return CallToolResult(
        content=[TextContent(type="text", text=text), *(extra or [])],
        structured_content=structured,
    )
