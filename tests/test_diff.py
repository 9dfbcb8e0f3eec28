"""The unified diff an edit returns: correct hunks, and the same text as difflib where the
match is unambiguous (difflib runs only on the changed region, for speed)."""

from __future__ import annotations

import difflib
import random
import re

import pytest

from atomictools.engine.text.edits import unified_diff

HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@$")


def difflib_diff(before: str, after: str) -> str:
    lines = difflib.unified_diff(
        before.splitlines(), after.splitlines(), fromfile="a/f", tofile="b/f", lineterm=""
    )
    return "\n".join(lines) + "\n" if before != after else ""


def patch(before: str, diff: str) -> str:
    """Apply a unified diff (as ``patch`` would) using only its hunk headers and lines."""
    old = before.splitlines()
    out: list[str] = []
    position = 0
    lines = diff.splitlines()[2:]
    index = 0
    while index < len(lines):
        match = HUNK.match(lines[index])
        assert match, lines[index]
        start = int(match[1]) - (0 if match[2] == "0" else 1)
        out.extend(old[position:start])
        position = start
        index += 1
        while index < len(lines) and not lines[index].startswith("@@"):
            tag, text = lines[index][0], lines[index][1:]
            if tag in " -":
                assert old[position] == text, (position, text)
                position += 1
            if tag in " +":
                out.append(text)
            index += 1
    out.extend(old[position:])
    return "\n".join(out)


def random_versions(rng: random.Random, alphabet: str) -> tuple[str, str]:
    a = [rng.choice(alphabet) for _ in range(rng.randint(0, 40))]
    b = list(a)
    for _ in range(rng.randint(1, 4)):
        roll = rng.random()
        if roll < 0.4 and b:
            b[rng.randrange(len(b))] = rng.choice("xyz")
        elif roll < 0.7:
            b.insert(rng.randint(0, len(b)), rng.choice("xyz"))
        elif b:
            del b[rng.randrange(len(b))]
    return "".join(f"{line}\n" for line in a), "".join(f"{line}\n" for line in b)


@pytest.mark.parametrize("seed", range(5))
def test_the_diff_turns_the_old_version_into_the_new(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(2000):
        before, after = random_versions(rng, "abcde")  # many repeated lines
        diff = unified_diff(before, after, "f")
        assert (diff == "") == (before == after)
        if diff:
            assert patch(before, diff) == after.rstrip("\n"), diff


def test_unambiguous_changes_give_difflibs_text() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        n = rng.randint(0, 60)
        lines = [f"line {i}" for i in range(n)]
        changed = list(lines)
        for _ in range(rng.randint(1, 3)):
            if changed and rng.random() < 0.5:
                changed[rng.randrange(len(changed))] += " (edited)"
            else:
                changed.insert(rng.randint(0, len(changed)), f"new {rng.random()}")
        before = "".join(f"{line}\n" for line in lines)
        after = "".join(f"{line}\n" for line in changed)
        assert unified_diff(before, after, "f") == difflib_diff(before, after)


def test_no_change_is_an_empty_diff() -> None:
    assert unified_diff("same\n", "same\n", "f") == ""
