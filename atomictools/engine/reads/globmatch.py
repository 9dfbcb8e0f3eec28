"""Glob patterns as agents write them: ``*.py``, ``src/**/test_*.py``, ``*.{ts,tsx}``.

A pattern without ``/`` matches an entry's name at any depth; with ``/`` it matches the path
relative to the directory searched. ``*`` and ``?`` stay within one path component, ``**``
spans any number of them, ``[...]`` is a character class and ``{a,b}`` an alternation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache


def _translate(pattern: str) -> str:
    out: list[str] = []
    index, depth = 0, 0
    while index < len(pattern):
        char = pattern[index]
        if pattern.startswith("**/", index):
            out.append("(?:.*/)?")
            index += 3
            continue
        if pattern.startswith("**", index):
            out.append(".*")
            index += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = pattern.find(
                "]", index + 2 if pattern[index + 1 : index + 2] in "!^" else index + 1
            )
            if end == -1:
                out.append(re.escape(char))
            else:
                body = pattern[index + 1 : end]
                if body[:1] in ("!", "^"):
                    body = "^" + body[1:]
                out.append(f"[{body.replace(chr(92), chr(92) * 2)}]")
                index = end
        elif char == "{":
            depth += 1
            out.append("(?:")
        elif char == "}" and depth:
            depth -= 1
            out.append(")")
        elif char == "," and depth:
            out.append("|")
        else:
            out.append(re.escape(char))
        index += 1
    return "".join(out) + ")" * depth


@lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(_translate(pattern) + r"\Z", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Glob:
    """One compiled pattern; ``matches`` takes a ``/``-separated path relative to the search."""

    pattern: str

    def matches(self, rel_path: str) -> bool:
        pattern = self.pattern.strip("/")
        if "/" not in pattern:
            return _compile(pattern).match(rel_path.rsplit("/", 1)[-1]) is not None
        return _compile(pattern).match(rel_path) is not None


def any_match(globs: tuple[Glob, ...], rel_path: str) -> bool:
    return any(glob.matches(rel_path) for glob in globs)
