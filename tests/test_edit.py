"""Edits: all-or-nothing exact replacements that keep the file's encoding, BOM and line endings."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from atomictools import (
    Edit,
    EditAmbiguousError,
    EditNotFoundError,
    InvalidArgumentError,
    Limits,
    PreconditionFailedError,
    ReadOnlyError,
    TextEncodingError,
    TooLargeError,
    Workspace,
)

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("no_temps_left")]


async def test_crlf_file_stays_crlf_with_lf_snippets(ws: Workspace, root: Path) -> None:
    (root / "app.py").write_bytes(b"def f():\r\n    return 1\r\n\r\nprint(f())\r\n")
    result = await ws.edit("app.py", [("def f():\n    return 1\n", "def f():\n    return 2\n")])
    assert (root / "app.py").read_bytes() == b"def f():\r\n    return 2\r\n\r\nprint(f())\r\n"
    assert "-    return 1" in result.diff
    assert "+    return 2" in result.diff
    assert result.applied
    assert result.sha256 == hashlib.sha256((root / "app.py").read_bytes()).hexdigest()


async def test_bom_encoding_and_missing_final_newline_kept(ws: Workspace, root: Path) -> None:
    (root / "bom.txt").write_bytes(b"\xef\xbb\xbfalpha\nbeta")
    await ws.edit("bom.txt", [("alpha", "ALPHA")])
    assert (root / "bom.txt").read_bytes() == b"\xef\xbb\xbfALPHA\nbeta"
    (root / "latin.txt").write_bytes(b"caf\xe9 noir\n")
    await ws.edit("latin.txt", [("noir", "cr\u00e8me")])
    assert (root / "latin.txt").read_bytes() == b"caf\xe9 cr\xe8me\n"
    utf16 = "\ufeffone\r\ntwo\r\n".encode("utf-16-le")
    (root / "u16.txt").write_bytes(utf16)
    await ws.edit("u16.txt", [("two\n", "three\n")])
    assert (root / "u16.txt").read_bytes() == "\ufeffone\r\nthree\r\n".encode("utf-16-le")


async def test_text_the_encoding_cannot_hold_is_refused(ws: Workspace, root: Path) -> None:
    (root / "latin.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(TextEncodingError, match="latin-1"):
        await ws.edit("latin.txt", [("caf", "\u2603")])
    assert (root / "latin.txt").read_bytes() == b"caf\xe9\n"


async def test_all_or_nothing_names_the_failing_edit(ws: Workspace, root: Path) -> None:
    (root / "f.txt").write_text("one\ntwo\nthree\n")
    with pytest.raises(EditNotFoundError, match=r"edit 2 of 3: Edit\.old not found in f\.txt") as e:
        await ws.edit("f.txt", [("one", "1"), ("four", "4"), ("three", "3")])
    assert e.value.index == 2
    assert "nothing was changed" in str(e.value)
    assert (root / "f.txt").read_text() == "one\ntwo\nthree\n"


async def test_ambiguous_match_is_refused_with_lines(ws: Workspace, root: Path) -> None:
    (root / "f.txt").write_text("x = 1\ny = 2\nx = 1\n")
    with pytest.raises(EditAmbiguousError, match=r"matches 2 times .*lines 1, 3"):
        await ws.edit("f.txt", [("x = 1", "x = 9")])
    assert (root / "f.txt").read_text() == "x = 1\ny = 2\nx = 1\n"


async def test_edits_apply_in_sequence(ws: Workspace, root: Path) -> None:
    (root / "f.txt").write_text("a b c\n")
    await ws.edit("f.txt", [Edit("a", "b"), Edit("b b", "z")])
    assert (root / "f.txt").read_text() == "z c\n"


async def test_whitespace_only_difference_gets_a_hint(ws: Workspace, root: Path) -> None:
    (root / "f.py").write_text("def f():\n        return 1\n")
    with pytest.raises(EditNotFoundError, match="differs only in whitespace starts at line 1"):
        await ws.edit("f.py", [("def f():\n    return 1", "def f():\n    return 2")])


async def test_dry_run_returns_diff_and_writes_nothing(root: Path) -> None:
    (root / "f.txt").write_text("old\n")
    before = (root / "f.txt").stat().st_mtime_ns
    ws = Workspace([root], read_only=True)  # a dry run is allowed even in read-only mode
    result = await ws.edit("f.txt", [("old", "new")], dry_run=True)
    assert not result.applied
    assert "-old" in result.diff
    assert "+new" in result.diff
    assert (root / "f.txt").read_text() == "old\n"
    assert (root / "f.txt").stat().st_mtime_ns == before
    with pytest.raises(ReadOnlyError):
        await ws.edit("f.txt", [("old", "new")])


async def test_expected_sha256_guards_edit(ws: Workspace, root: Path) -> None:
    (root / "f.txt").write_text("v1\n")
    stale = hashlib.sha256(b"v0\n").hexdigest()
    with pytest.raises(PreconditionFailedError) as caught:
        await ws.edit("f.txt", [("v1", "v2")], expected_sha256=stale)
    assert caught.value.current_sha256 == hashlib.sha256(b"v1\n").hexdigest()
    assert (root / "f.txt").read_text() == "v1\n"


async def test_bad_edit_lists(root: Path) -> None:
    (root / "f.txt").write_text("abc\n")
    ws = Workspace([root], limits=Limits(max_edits=2))
    with pytest.raises(InvalidArgumentError, match=r"Edit\.old is empty"):
        await ws.edit("f.txt", [("", "x")])
    with pytest.raises(InvalidArgumentError, match="edits is empty"):
        await ws.edit("f.txt", [])
    with pytest.raises(TooLargeError, match="limit of 2"):
        await ws.edit("f.txt", [("a", "A"), ("b", "B"), ("c", "C")])
    assert (root / "f.txt").read_text() == "abc\n"
