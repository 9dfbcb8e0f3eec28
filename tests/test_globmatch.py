"""Glob patterns the way agents write them."""

from __future__ import annotations

import pytest

from atomictools.engine.reads.globmatch import Glob


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("*.py", "a.py", True),
        ("*.py", "src/deep/a.py", True),
        ("*.py", "a.pyc", False),
        ("src/*.py", "src/a.py", True),
        ("src/*.py", "src/pkg/a.py", False),
        ("src/**/*.py", "src/a.py", True),
        ("src/**/*.py", "src/pkg/deep/a.py", True),
        ("**/test_*.py", "tests/unit/test_x.py", True),
        ("*.{ts,tsx}", "ui/App.tsx", True),
        ("*.{ts,tsx}", "ui/App.js", False),
        ("file?.txt", "file1.txt", True),
        ("file?.txt", "file10.txt", False),
        ("[ab]*.txt", "b1.txt", True),
        ("[!ab]*.txt", "b1.txt", False),
        ("node_modules", "x/node_modules", True),
        ("build/**", "build/out/a.o", True),
        ("a+b(c).txt", "a+b(c).txt", True),
    ],
)
def test_glob(pattern: str, path: str, expected: bool) -> None:
    assert Glob(pattern).matches(path) is expected
