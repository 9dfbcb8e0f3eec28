"""Where a change's new content comes from: an edit of the file, or another file's bytes.

Shared by both commits, so an edit or a copy computes (and refuses) the same whichever way it
is committed. A copy streams: memory stays bounded by the chunk size, whatever the file's size.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

from atomictools.engine.changes.checks import refuse_changed
from atomictools.engine.config import Limits
from atomictools.engine.durable.blocking import run_blocking
from atomictools.engine.durable.writer import AtomicWriter
from atomictools.engine.reads.files import refuse_if_resized
from atomictools.engine.sandbox import Location
from atomictools.engine.text.edits import Edit, apply_edits, unified_diff
from atomictools.engine.text.textcodec import decode, encode


def plan_edit(
    data: bytes, edits: Sequence[Edit], location: Location, expected_sha256: str | None
) -> tuple[str, bytes, str, str]:
    """The pure part of an edit: (sha256 before, new bytes, unified diff, sha256 after)."""
    before_sha = hashlib.sha256(data).hexdigest()
    refuse_changed(location, "edit", expected_sha256, before_sha)
    text, fmt = decode(data, location.display)
    new_text = apply_edits(text, edits, fmt, location.display)
    new_data = encode(new_text, fmt, location.display)
    diff = unified_diff(text, new_text, location.display)
    return before_sha, new_data, diff, hashlib.sha256(new_data).hexdigest()


async def copy_into(
    writer: AtomicWriter,
    source: Location,
    fd: int,
    src_st: os.stat_result,
    limits: Limits,
    *,
    expected_sha256: str | None,
) -> None:
    """Stream the source's bytes into the pending file; ``expected_sha256`` is checked against
    the very bytes copied, and a source resized meanwhile is refused (the copy is no version)."""
    inline = limits.inline(src_st.st_size)
    while chunk := await run_blocking(inline, os.read, fd, limits.chunk_bytes):
        await writer.write(chunk)
    refuse_if_resized(source, src_st, os.fstat(fd), writer.size)
    refuse_changed(source, "copy", expected_sha256, writer.sha256)
