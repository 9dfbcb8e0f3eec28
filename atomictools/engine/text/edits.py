"""Exact text replacements applied all-or-nothing, and the diff that shows them.

Each ``old`` must occur exactly once in the text as it is after the edits before it. Zero or
several matches stop the whole list: a silent first-match replacement (what the reference server
does) edits the wrong place when a snippet repeats. Text the caller wrote with ``\\n`` matches a
CRLF (or CR) file, and the replacement is written with the file's own line endings.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

from atomictools.engine.errors import EditAmbiguousError, EditNotFoundError, InvalidArgumentError
from atomictools.engine.text.textcodec import TextFormat

_MAX_LINES_LISTED = 5


@dataclass(frozen=True, slots=True)
class Edit:
    """Replace the one occurrence of ``old`` with ``new``.

    ``old`` must match exactly once (else ``EditNotFoundError``/``EditAmbiguousError``, and no
    edit of the call is applied). Caveat: in a CRLF file, LF line ends in ``old``/``new`` are
    matched and written as CRLF, so an edit keeps the file's newlines.
    """

    old: str
    new: str


def _with_newlines(text: str, newline: str) -> str:
    if newline == "\n":
        return text
    return text.replace("\r\n", "\n").replace("\n", newline)


def _line_of(text: str, offset: int) -> int:
    prefix = text[:offset]
    return prefix.count("\n") + prefix.count("\r") - prefix.count("\r\n") + 1


def _occurrences(text: str, needle: str) -> list[int]:
    found: list[int] = []
    start = text.find(needle)
    while start != -1:
        found.append(start)
        start = text.find(needle, start + len(needle))
    return found


def _whitespace_hint(text: str, old: str) -> str:
    """Point at a place that matches when indentation and trailing spaces are ignored."""
    wanted = [line.strip() for line in old.strip("\r\n").splitlines()]
    if not wanted or not any(wanted):
        return ""
    lines = [line.strip() for line in text.splitlines()]
    for index in range(len(lines) - len(wanted) + 1):
        if lines[index : index + len(wanted)] == wanted:
            return (
                f" (a match that differs only in whitespace starts at line {index + 1}; "
                "copy the exact text, including indentation)"
            )
    return ""


def apply_edits(text: str, edits: Sequence[Edit], fmt: TextFormat, display: str) -> str:
    """Apply every edit in order or raise naming the first one that cannot be applied."""
    total = len(edits)
    for index, edit in enumerate(edits, start=1):
        label = f"edit {index} of {total}"
        if not edit.old:
            raise InvalidArgumentError(
                f"{label}: Edit.old is empty; give the exact text to replace in {display}"
            )
        candidates = [edit.old]
        if fmt.newline != "\n" or fmt.mixed_newlines:
            adapted = _with_newlines(edit.old, fmt.newline)
            if adapted != edit.old:
                candidates.insert(0, adapted)
        for old in candidates:
            positions = _occurrences(text, old)
            if positions:
                break
        if not positions:
            raise EditNotFoundError(
                f"{label}: Edit.old not found in {display}{_whitespace_hint(text, edit.old)}",
                index=index,
            )
        if len(positions) > 1:
            lines = ", ".join(str(_line_of(text, p)) for p in positions[:_MAX_LINES_LISTED])
            more = ", ..." if len(positions) > _MAX_LINES_LISTED else ""
            raise EditAmbiguousError(
                f"{label}: Edit.old matches {len(positions)} times in {display} "
                f"(at lines {lines}{more}); include more surrounding lines so it matches once",
                index=index,
            )
        new = edit.new if old == edit.old else _with_newlines(edit.new, fmt.newline)
        text = text[: positions[0]] + new + text[positions[0] + len(old) :]
    return text


DIFF_CONTEXT = 3


def unified_diff(before: str, after: str, display: str) -> str:
    """A unified diff of two versions, with line endings normalised for reading.

    Only the region between the versions' common first and last lines (plus context) goes
    through difflib: an edit touches a small part of a file, and difflib's matching degrades
    badly on long runs of repeated lines (a 4 KiB file of identical lines took 7x longer).
    """
    if before == after:
        return ""
    a, b = before.splitlines(), after.splitlines()
    head = 0
    while head < min(len(a), len(b)) and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < min(len(a), len(b)) - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    start = max(head - DIFF_CONTEXT, 0)
    cut = max(tail - DIFF_CONTEXT, 0)
    a_part, b_part = a[start : len(a) - cut], b[start : len(b) - cut]
    lines = [f"--- a/{display}", f"+++ b/{display}"]
    for group in difflib.SequenceMatcher(None, a_part, b_part).get_grouped_opcodes(DIFF_CONTEXT):
        first, last = group[0], group[-1]
        old_range = _hunk_range(start + first[1], start + last[2])
        new_range = _hunk_range(start + first[3], start + last[4])
        lines.append(f"@@ -{old_range} +{new_range} @@")
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                lines.extend(" " + line for line in a_part[i1:i2])
                continue
            lines.extend("-" + line for line in a_part[i1:i2])
            lines.extend("+" + line for line in b_part[j1:j2])
    return "\n".join(lines) + "\n"


def _hunk_range(start: int, stop: int) -> str:
    """``start,length`` of a hunk, 1-based, as ``diff -u`` and difflib write it."""
    length = stop - start
    if length == 1:
        return str(start + 1)
    return f"{start + 1 if length else start},{length}"
