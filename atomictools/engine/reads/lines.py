"""Reading some lines of a text file at the cost of those lines, not of the file.

``head``, ``offset``/``limit`` read forward from the start only until the lines asked for are
in; ``tail`` reads blocks backwards from the end. A file of at most
``Limits.hash_partial_bytes`` (256 KiB) is read whole instead (about 1.5 ms at that size), so such a
read still carries the whole file's sha256 for ``expected_sha256``; for a larger file a partial
read leaves ``sha256`` None, because hashing it would cost the full read the caller avoided.

A line ends at ``\\n``, ``\\r\\n`` or ``\\r`` (what editors and ``grep -n`` count), not at the
other breaks ``str.splitlines`` knows (form feed, U+2028, ...), so line numbers agree with them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections import deque

from atomictools.engine.config import Limits
from atomictools.engine.durable.blocking import run_blocking
from atomictools.engine.durable.steps import step
from atomictools.engine.errors import (
    ConcurrentChangeError,
    InvalidArgumentError,
    TooLargeError,
)
from atomictools.engine.reads.files import open_regular, read_open
from atomictools.engine.results import TextRead
from atomictools.engine.sandbox import Location
from atomictools.engine.text.textcodec import (
    decode,
    detect_newline,
    incremental_decoder,
    sniff_block,
)

_TEXT_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")
_BYTES_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")
_SNIFF_BYTES = 64 * 1024
"""How much of a large file's start decides its encoding."""
_FIRST_BLOCK = 8 * 1024
"""The first read of a walk for lines (later ones double): 50 lines of code fit in it."""
_NEWLINE_NAMES = {"\n": "LF", "\r\n": "CRLF", "\r": "CR"}
_ASCII_COMPATIBLE = ("utf-8", "latin-1")
"""Encodings where the bytes CR and LF only ever mean those characters: tail can scan bytes."""


@dataclasses.dataclass(frozen=True, slots=True)
class LineRange:
    """Which lines a read asks for: ``count`` lines from line ``first`` (1-based), or the last
    ``count`` lines when ``from_end``; ``count`` None means up to the end of the file."""

    first: int = 1
    count: int | None = None
    from_end: bool = False

    @classmethod
    def of(
        cls,
        *,
        head: int | None = None,
        tail: int | None = None,
        offset: int | None = None,
        limit: int | None = None,
    ) -> LineRange | None:
        """The range the read arguments name (None: the whole file), or a clear refusal."""
        for name, value in (("head", head), ("tail", tail), ("limit", limit)):
            if value is not None and value < 0:
                raise InvalidArgumentError(f"{name} must be zero or more lines, not {value}")
        if offset is not None and offset < 1:
            raise InvalidArgumentError(
                f"offset is the first line to read, counting from 1; {offset} is not a line"
            )
        if head is not None and tail is not None:
            raise InvalidArgumentError("give head or tail, not both")
        if tail is not None and (offset is not None or limit is not None):
            raise InvalidArgumentError(
                "tail counts from the end of the file; give tail alone, or offset/limit"
            )
        if head is not None and (offset is not None or limit is not None):
            raise InvalidArgumentError(
                "head is the same as offset=1 with limit; give head, or offset/limit"
            )
        if tail is not None:
            return cls(count=tail, from_end=True)
        if head is not None:
            return cls(count=head)
        if offset is not None or limit is not None:
            return cls(first=offset or 1, count=limit)
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class _Source:
    """A large text file open for a read of some of its lines."""

    location: Location
    limits: Limits
    fd: int
    size: int
    encoding: str
    start: int
    """Where the text begins (after a byte-order mark)."""

    @property
    def first_block(self) -> int:
        """The first read's size; later ones double, up to the chunk size."""
        return min(_FIRST_BLOCK, self.limits.chunk_bytes)


@dataclasses.dataclass(frozen=True, slots=True)
class _Window:
    """The lines chosen, and where they sit in the file."""

    content: str
    newline: str
    partial: bool
    first_line: int | None
    line_count: int
    next_offset: int | None
    total_lines: int | None

    def read(
        self, location: Location, *, size: int, sha256: str | None, encoding: str, bom: bool
    ) -> TextRead:
        return TextRead(
            path=location.display,
            content=self.content,
            size=size,
            sha256=sha256,
            encoding=encoding,
            newline=self.newline,
            bom=bom,
            partial=self.partial,
            first_line=self.first_line,
            line_count=self.line_count,
            next_offset=self.next_offset,
            total_lines=self.total_lines,
        )


async def read_lines(location: Location, limits: Limits, lines: LineRange) -> TextRead:
    """The lines ``lines`` names of a text file, reading no more of it than they need."""
    fd, before = open_regular(location, "read")
    try:
        if before.st_size <= min(limits.hash_partial_bytes, limits.max_read_bytes):
            return await _from_whole(location, limits, lines, fd, before)
        first = await run_blocking(True, os.pread, fd, _SNIFF_BYTES, 0)
        encoding, bom = sniff_block(first, location.display)
        source = _Source(location, limits, fd, before.st_size, encoding, len(bom))
        if lines.from_end and encoding in _ASCII_COMPATIBLE:
            window = await _tail(source, lines)
        else:
            window = await _forward(source, lines)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise ConcurrentChangeError(
            f"{location.display} changed while it was being read ({before.st_size} bytes at "
            f"the start, {after.st_size} now); retry"
        )
    return window.read(location, size=before.st_size, sha256=None, encoding=encoding, bom=bool(bom))


def _window(
    location: Location,
    limits: Limits,
    chosen: list[str],
    *,
    first_line: int | None,
    before: bool,
    after: bool,
    total: int | None,
    newline: str | None = None,
) -> _Window:
    """Where the chosen lines sit, refusing a reply larger than the read limit. ``newline``:
    the style to report when known (a whole file's); else that of the chosen lines."""
    content = "".join(chosen)
    if len(content) > limits.max_read_bytes:
        raise TooLargeError(
            f"the {len(chosen)} lines asked for from {location.display} are more than the "
            f"{limits.max_read_bytes}-byte limit of a reply; ask for fewer lines"
        )
    if newline is None:
        style, mixed = detect_newline(content)
        newline = "mixed" if mixed else _NEWLINE_NAMES[style]
    return _Window(
        content=content,
        newline=newline,
        partial=before or after,
        first_line=first_line,
        line_count=len(chosen),
        next_offset=first_line + len(chosen) if after and first_line is not None else None,
        total_lines=total,
    )


_OTHER_BREAKS = ("\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")
"""What ``str.splitlines`` breaks at besides CR and LF (searched one by one: a character
class over a large text is 50 times slower than these single-character finds)."""


def _split_lines(text: str) -> list[str]:
    """Lines ended by LF, CRLF or CR: ``str.splitlines`` (C, 20x faster than the regex) when
    the text holds none of the other breaks it knows, else the regex."""
    if not any(brk in text for brk in _OTHER_BREAKS):
        return text.splitlines(keepends=True)
    return _TEXT_LINE.findall(text)


async def _from_whole(
    location: Location, limits: Limits, lines: LineRange, fd: int, st: os.stat_result
) -> TextRead:
    """A small file: read and hash it whole, then pick the lines (what a whole read costs)."""
    data = await read_open(fd, st, location, limits, stable=True)
    text, fmt = decode(data, location.display)
    every = _split_lines(text)
    total = len(every)
    if lines.from_end:
        count = total if lines.count is None else min(lines.count, total)
        start = total - count
    else:
        start = min(lines.first - 1, total)
        count = total - start if lines.count is None else min(lines.count, total - start)
    window = _window(
        location,
        limits,
        every[start : start + count],
        first_line=start + 1 if lines.from_end else lines.first,
        before=start > 0,
        after=start + count < total,
        total=total,
        newline=fmt.newline_name,  # the whole file's style, as a whole read reports it
    )
    return window.read(
        location,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        encoding=fmt.encoding,
        bom=bool(fmt.bom),
    )


async def _forward(source: _Source, lines: LineRange) -> _Window:
    """Lines counted from the start (or, for a UTF-16/32 tail, all of them through a deque):
    reads block by block and stops once the lines asked for and the start of one more are in."""
    limits = source.limits
    decoder = incremental_decoder(source.encoding)
    kept: deque[str] | list[str] = deque(maxlen=lines.count) if lines.from_end else []
    wanted = None if lines.from_end else lines.count
    position, number = source.start, 0
    if lines.first > 1 and source.encoding in _ASCII_COMPATIBLE:
        position, number = await _skip_lines(source, lines.first - 1)
    pending, block = "", source.first_block
    budget = limits.max_read_bytes
    more = False
    while True:
        data = await run_blocking(limits.inline(block), os.pread, source.fd, block, position)
        position += len(data)
        found = _TEXT_LINE.findall(pending + decoder.decode(data, final=not data))
        pending = ""
        if data and found and found[-1][-1] != "\n":
            pending = found.pop()  # unfinished, or a CR that the next block may pair with LF
            if len(pending) > limits.max_read_bytes:  # a minified file: one line, no end
                raise TooLargeError(
                    f"line {number + len(found) + 1} of {source.location.display} is longer "
                    f"than the {limits.max_read_bytes}-byte limit of a reply"
                )
        for line in found:
            number += 1
            if number < lines.first:
                continue
            if wanted is not None and len(kept) >= wanted:
                more = True
                break
            kept.append(line)
            budget -= len(line)
            if budget < 0 and not lines.from_end:
                raise TooLargeError(
                    f"the lines asked for from {source.location.display} are more than the "
                    f"{limits.max_read_bytes}-byte limit of a reply; ask for fewer lines"
                )
        if more or not data:
            break
        if wanted is not None and len(kept) >= wanted and pending:
            more = True  # the next line has begun
            break
        block = min(block * 2, limits.chunk_bytes)
        await step("read.chunk")
    first = number - len(kept) + 1 if lines.from_end else lines.first
    return _window(
        source.location,
        limits,
        list(kept),
        first_line=first,
        before=first > 1,
        after=more,
        total=None if more else number,
    )


async def _skip_lines(source: _Source, count: int) -> tuple[int, int]:
    """Where line ``count + 1`` begins, found by counting CR/LF bytes (memchr speed, no
    decoding), and how many lines were passed (fewer when the file ends first)."""
    limits, fd = source.limits, source.fd
    position, passed, open_line, after_cr = source.start, 0, False, False
    block = source.first_block  # growing: a line near the start costs a block, not a chunk
    while True:
        data = await run_blocking(limits.inline(block), os.pread, fd, block, position)
        block = min(block * 2, limits.chunk_bytes)
        if not data:
            return position, passed + open_line  # a last line without a line break counts
        lead = 1 if after_cr and data[:1] == b"\n" else 0  # the LF of a CRLF cut in two
        ends = data.count(b"\n") - lead
        if b"\r" in data:  # rare: the CR and CRLF counts cost more than the LF count
            ends += data.count(b"\r") - data.count(b"\r\n")
        if passed + ends >= count:
            for seen, line in enumerate(_BYTES_LINE.finditer(data, lead), start=passed + 1):
                if seen == count:
                    end = position + line.end()
                    if data.endswith(b"\r", 0, line.end()) and line.end() == len(data):
                        end += os.pread(fd, 1, end) == b"\n"  # its LF is in the next block
                    return end, seen
        passed += ends
        position += len(data)
        open_line, after_cr = data[-1:] not in (b"\n", b"\r"), data.endswith(b"\r")
        await step("read.chunk")


async def _tail(source: _Source, lines: LineRange) -> _Window:
    """The last lines, reading blocks backwards from the end until one more line has begun."""
    limits = source.limits
    wanted = lines.count if lines.count is not None else source.size
    buffer, position, block = b"", source.size, source.first_block
    while True:
        if len(buffer) > limits.max_read_bytes:
            raise TooLargeError(
                f"the last {wanted} lines of {source.location.display} are more than the "
                f"{limits.max_read_bytes}-byte limit of a reply; ask for fewer lines"
            )
        back = min(block, position - source.start)
        position -= back
        data = await run_blocking(limits.inline(back), os.pread, source.fd, back, position)
        buffer = data + buffer
        found = _BYTES_LINE.findall(buffer)
        at_start = position == source.start
        # Unless the buffer starts the text, its first line may be cut: it never counts.
        if at_start or len(found) > wanted:
            break
        block = min(block * 2, limits.chunk_bytes)
        await step("read.chunk")
    chosen = found[-wanted:] if wanted else []
    picked = _TEXT_LINE.findall(b"".join(chosen).decode(source.encoding, errors="replace"))
    total = len(found) if at_start else None
    return _window(
        source.location,
        limits,
        picked,
        first_line=total - len(picked) + 1 if total is not None else None,
        before=len(found) > len(chosen),
        after=False,
        total=total,
    )
