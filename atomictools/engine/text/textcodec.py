"""Decode a file's bytes to text and encode them back exactly as the file had them.

An edit must not change what it was not asked to change: the encoding, a byte-order mark and the
line-ending style survive a decode/encode round trip. Detection is deliberately simple and
predictable: a BOM decides; otherwise UTF-8 if the bytes are valid UTF-8; otherwise Latin-1,
which maps every byte to one character and so round-trips any non-UTF-8 8-bit text unchanged.
A NUL byte outside UTF-16/32 means binary content, which is refused as text.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

from atomictools.engine.errors import TextEncodingError

_BOMS: tuple[tuple[bytes, str], ...] = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


@dataclass(frozen=True, slots=True)
class TextFormat:
    """How a text file is stored: its codec, its byte-order mark and its line endings."""

    encoding: str
    bom: bytes = b""
    newline: str = "\n"
    """``\\n``, ``\\r\\n`` or ``\\r``; the dominant style when a file mixes them."""
    mixed_newlines: bool = False

    @property
    def newline_name(self) -> str:
        names = {"\n": "LF", "\r\n": "CRLF", "\r": "CR"}
        return "mixed" if self.mixed_newlines else names[self.newline]


def detect_newline(text: str) -> tuple[str, bool]:
    """Dominant line ending of ``text`` and whether several styles are mixed."""
    crlf = text.count("\r\n")
    counts = {"\r\n": crlf, "\n": text.count("\n") - crlf, "\r": text.count("\r") - crlf}
    used = [style for style, n in counts.items() if n]
    if not used:
        return "\n", False
    dominant = max(used, key=lambda style: counts[style])
    return dominant, len(used) > 1


def sniff_encoding(head: bytes) -> tuple[str, bytes]:
    """Codec and BOM from the start of a file (the BOM alone decides when present)."""
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            return encoding, bom
    return "utf-8", b""


def decode(data: bytes, display: str) -> tuple[str, TextFormat]:
    """Decode a whole file and describe its format, or refuse binary content."""
    encoding, bom = sniff_encoding(data)
    body = data[len(bom) :]
    if bom:
        try:
            text = body.decode(encoding)
        except UnicodeDecodeError as err:
            raise TextEncodingError(
                f"{display} starts with a {encoding} byte-order mark but is not valid {encoding}"
            ) from err
    else:
        refuse_binary(body, display)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            encoding, text = "latin-1", body.decode("latin-1")
    newline, mixed = detect_newline(text)
    return text, TextFormat(encoding=encoding, bom=bom, newline=newline, mixed_newlines=mixed)


def refuse_binary(data: bytes, display: str) -> None:
    """A NUL byte outside UTF-16/32 means binary content: refused as text."""
    if b"\x00" in data:
        raise TextEncodingError(
            f"{display} looks like a binary file (it contains NUL bytes); "
            "read it as bytes/media instead of text"
        )


def sniff_block(first: bytes, display: str) -> tuple[str, bytes]:
    """Codec and BOM of a file too large to decode whole, judged by its first block: a BOM,
    else UTF-8 if the block is (a character cut at its end aside), else Latin-1."""
    encoding, bom = sniff_encoding(first)
    if bom:
        return encoding, bom
    refuse_binary(first, display)
    try:
        first.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(first) - 3:  # not just a character cut at the block's end
            return "latin-1", b""
    return "utf-8", b""


def encode(text: str, fmt: TextFormat, display: str) -> bytes:
    """Encode ``text`` in the file's own format (same codec, same BOM)."""
    try:
        return fmt.bom + text.encode(fmt.encoding)
    except UnicodeEncodeError as err:
        bad = text[err.start : err.end]
        raise TextEncodingError(
            f"the new text for {display} contains {bad!r}, which its encoding "
            f"{fmt.encoding} cannot store; use characters the file's encoding supports"
        ) from err


def incremental_decoder(encoding: str) -> codecs.IncrementalDecoder:
    """A streaming decoder that never fails (used for head/tail reads of large files)."""
    return codecs.getincrementaldecoder(encoding)(errors="replace")
