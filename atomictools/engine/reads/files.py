"""Reading files inside the roots: whole (bounded by a limit), or the first/last lines streamed.

Every read goes through the Location's directory fd and opens the entry with O_NOFOLLOW, so a
symlink swapped in after the path was resolved is refused. Blocking reads of large files run in
worker threads; each chunk is a cancellation point.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
from collections import deque

from atomictools.engine.config import Limits
from atomictools.engine.durable.blocking import run_blocking
from atomictools.engine.durable.steps import step
from atomictools.engine.errors import (
    ConcurrentChangeError,
    InvalidArgumentError,
    TextEncodingError,
    TooLargeError,
)
from atomictools.engine.results import BytesRead, TextRead
from atomictools.engine.sandbox import Location, open_entry, require_regular
from atomictools.engine.text.textcodec import decode, incremental_decoder, sniff_encoding


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
    limit = limits.max_read_bytes
    fd, st = open_regular(location, "read")
    try:
        if st.st_size > limit:
            raise TooLargeError(
                f"{location.display} is {st.st_size} bytes, more than the {limit}-byte limit "
                "for a whole read; read part of it with head or tail"
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
    finally:
        os.close(fd)


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


async def read_text(
    location: Location, limits: Limits, *, head: int | None = None, tail: int | None = None
) -> TextRead:
    """Read a text file whole, or only its first ``head`` / last ``tail`` lines (streamed)."""
    if head is not None and tail is not None:
        raise InvalidArgumentError("give head or tail, not both")
    for name, value in (("head", head), ("tail", tail)):
        if value is not None and value < 0:
            raise InvalidArgumentError(f"{name} must be zero or more lines, not {value}")
    if head is None and tail is None:
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
    return await _read_lines(location, limits, head=head, tail=tail)


class _LineCollector:
    """Splits streamed text into lines, keeping the first ``head`` or the last ``tail``."""

    def __init__(self, head: int | None, tail: int | None) -> None:
        self.head = head
        self.kept: deque[str] = deque(maxlen=tail)
        self.pending = ""
        self.total = 0

    def feed(self, text: str, final: bool) -> None:
        text = self.pending + text
        lines = text.splitlines(keepends=True)
        self.pending = ""
        if lines and not final and (lines[-1][-1] not in "\r\n" or lines[-1].endswith("\r")):
            self.pending = lines.pop()  # incomplete, or a CR that may be followed by LF
        for line in lines:
            self.total += 1
            if self.head is None or len(self.kept) < self.head:
                self.kept.append(line)


async def _read_lines(
    location: Location, limits: Limits, *, head: int | None, tail: int | None
) -> TextRead:
    fd, st = open_regular(location, "read")
    inline = limits.inline(st.st_size)
    try:
        digest = hashlib.sha256()
        collector = _LineCollector(head, tail)
        first = await run_blocking(inline, os.read, fd, limits.chunk_bytes)
        encoding, bom = sniff_encoding(first)
        if not bom and b"\x00" in first:
            raise TextEncodingError(
                f"{location.display} looks like a binary file (it contains NUL bytes); "
                "read it as bytes/media instead of text"
            )
        if not bom:
            try:
                first.decode("utf-8")
            except UnicodeDecodeError as err:
                if err.start < len(first) - 3:  # not just a character cut at the chunk's end
                    encoding = "latin-1"
        decoder = incremental_decoder(encoding)
        chunk, size, newline = first[len(bom) :], len(first), ""
        digest.update(first)
        while True:
            text = decoder.decode(chunk, final=not chunk)
            newline = newline or _first_newline(text)
            collector.feed(text, final=not chunk)
            if not chunk:
                break
            await step("read.chunk")
            chunk = await run_blocking(inline, os.read, fd, limits.chunk_bytes)
            digest.update(chunk)
            size += len(chunk)
        content = "".join(collector.kept)
        return TextRead(
            path=location.display,
            content=content,
            size=size,
            sha256=digest.hexdigest(),
            encoding=encoding,
            newline={"\r\n": "CRLF", "\r": "CR"}.get(newline, "LF"),
            bom=bool(bom),
            partial=len(collector.kept) < collector.total,
        )
    finally:
        os.close(fd)


def _first_newline(text: str) -> str:
    for index, char in enumerate(text):
        if char == "\n":
            return "\n"
        if char == "\r":
            return "\r\n" if text[index + 1 : index + 2] == "\n" else "\r"
    return ""
