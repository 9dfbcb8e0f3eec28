"""Reading whole files inside the roots, bounded by a limit (some lines of one: ``lines``).

Every read goes through the Location's directory fd and opens the entry with O_NOFOLLOW, so a
symlink swapped in after the path was resolved is refused. Blocking reads of large files run in
worker threads; each chunk is a cancellation point.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os

from atomictools.engine.config import Limits
from atomictools.engine.durable.blocking import run_blocking
from atomictools.engine.durable.steps import step
from atomictools.engine.errors import ConcurrentChangeError, TooLargeError
from atomictools.engine.results import BytesRead, TextRead
from atomictools.engine.sandbox import Location, open_entry, require_regular
from atomictools.engine.text.textcodec import decode


def open_regular(location: Location, action: str) -> tuple[int, os.stat_result]:
    fd = open_entry(location)
    try:
        st = require_regular(os.fstat(fd), location, action)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


async def read_whole(location: Location, limits: Limits, *, stable: bool = False) -> bytes:
    """Read a whole regular file, refusing one larger than the limit before reading it.

    ``stable``: refuse a file that another process changes (truncates, appends to) while it is
    read, judged by its size before and after (a copy must not be short).
    """
    fd, st = open_regular(location, "read")
    try:
        return await read_open(fd, st, location, limits, stable=stable)
    finally:
        os.close(fd)


async def read_open(
    fd: int, st: os.stat_result, location: Location, limits: Limits, *, stable: bool = False
) -> bytes:
    """``read_whole`` of a file already open (at offset 0) whose fstat is ``st``."""
    limit = limits.max_read_bytes
    if st.st_size > limit:
        raise TooLargeError(
            f"{location.display} is {st.st_size} bytes, more than the {limit}-byte limit "
            "for a whole read; read part of it with head, tail or offset/limit"
        )
    parts: list[bytes] = []
    size = 0
    inline = limits.inline(st.st_size)
    while chunk := await run_blocking(inline, os.read, fd, limits.chunk_bytes):
        size += len(chunk)
        if size > limit:
            raise TooLargeError(f"{location.display} grew past the {limit}-byte limit")
        parts.append(chunk)
        await step("read.chunk")
    if stable:
        refuse_if_resized(location, st, os.fstat(fd), size)
    return b"".join(parts)


def refuse_if_resized(
    location: Location, before: os.stat_result, after: os.stat_result, read: int
) -> None:
    """The file was changed by someone else while we read it: what we read is not a version."""
    if read != before.st_size or after.st_size != before.st_size:
        raise ConcurrentChangeError(
            f"{location.display} changed while it was being read ({read} bytes read, "
            f"{before.st_size} at the start, {after.st_size} now); retry"
        )


async def read_bytes(location: Location, limits: Limits) -> BytesRead:
    data = await read_whole(location, limits)
    mime, _ = mimetypes.guess_type(location.name)
    return BytesRead(
        path=location.display,
        data=data,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        mime_type=mime or "application/octet-stream",
    )


async def read_text(location: Location, limits: Limits) -> TextRead:
    """Read a whole text file, bounded by the read limit (parts of one: ``lines.read_lines``)."""
    data = await read_whole(location, limits)
    text, fmt = await run_blocking(limits.inline(len(data)), decode, data, location.display)
    return TextRead(
        path=location.display,
        content=text,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        encoding=fmt.encoding,
        newline=fmt.newline_name,
        bom=bool(fmt.bom),
    )
