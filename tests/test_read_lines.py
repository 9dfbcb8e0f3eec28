"""Reads of some lines (head, tail, offset/limit): the right lines, at the cost of those lines.

The content is checked against a plain split of the text for any text and any block size
(Hypothesis), on the small-file path (read whole, hashed) and the large-file path (read only as
far as needed). What a read costs is measured as bytes read by this process (``rchar`` in
``/proc/self/io``): deterministic, so no timing assertion is needed.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atomictools import (
    ConcurrentChangeError,
    InvalidArgumentError,
    Limits,
    TextEncodingError,
    TooLargeError,
    Workspace,
)
from atomictools.engine.durable.steps import observe_steps

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
LINE_ENDS = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")


def split(text: str) -> list[str]:
    """Lines as editors count them: ended by LF, CRLF or CR (a form feed is not a break)."""
    return LINE_ENDS.findall(text)


def expected_start(lines: list[str], arguments: dict[str, int]) -> int:
    """Index of the first line the arguments name (``len(lines)`` when past the end)."""
    if "tail" in arguments:
        return len(lines) - min(arguments["tail"], len(lines))
    return min(arguments.get("offset", 1) - 1, len(lines))


def expected_count(lines: list[str], arguments: dict[str, int], start: int) -> int:
    count = arguments.get("head", arguments.get("tail", arguments.get("limit")))
    return len(lines) - start if count is None else min(count, len(lines) - start)


line_text = st.text(alphabet="ab\u00e9\x0c\u2028", max_size=12)
texts = st.lists(st.tuples(line_text, st.sampled_from(["\n", "\r\n", "\r"])), max_size=40).map(
    lambda pairs: "".join(a + b for a, b in pairs)
)
ranges = st.one_of(
    st.fixed_dictionaries({"head": st.integers(0, 50)}),
    st.fixed_dictionaries({"tail": st.integers(0, 50)}),
    st.fixed_dictionaries({"offset": st.integers(1, 50)}, optional={"limit": st.integers(0, 50)}),
    st.fixed_dictionaries({"limit": st.integers(0, 50)}),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=texts, unfinished=line_text, arguments=ranges, block=st.integers(1, 9))
async def test_some_lines_are_the_lines_a_plain_split_gives(
    root: Path, text: str, unfinished: str, arguments: dict[str, int], block: int
) -> None:
    text += unfinished  # a last line without a line break
    data = text.encode()
    (root / "f.txt").write_bytes(data)
    lines = split(text)
    start = expected_start(lines, arguments)
    want = lines[start : start + expected_count(lines, arguments, start)]
    more_after = start + len(want) < len(lines)
    small = Workspace([root])
    # Every file is "large" here, read in blocks of a few bytes: every block boundary is met.
    large = Workspace(
        [root], limits=Limits(hash_partial_bytes=0, chunk_bytes=block, inline_io_bytes=4)
    )
    for ws in (small, large):
        read = await ws.read_text("f.txt", **arguments)
        assert read.content == "".join(want)
        assert read.line_count == len(want)
        assert read.partial == (len(want) < len(lines))
        assert read.size == len(data)
        assert read.total_lines in (None, len(lines))
        if "tail" not in arguments or ws is small:  # a large tail does not number its lines
            assert read.first_line == arguments.get("offset", start + 1)
        assert read.next_offset == (start + len(want) + 1 if more_after else None)
    whole = hashlib.sha256(data).hexdigest()
    assert (await small.read_text("f.txt", **arguments)).sha256 == whole
    if data:
        assert (await large.read_text("f.txt", **arguments)).sha256 is None


def bytes_read() -> int:
    """Bytes this process has read through read(2)/pread(2) so far (all threads)."""
    with open("/proc/self/io") as io:
        for line in io:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def numbered_lines(path: Path, mib: int) -> int:
    """A text file of ``mib`` MiB of 64-byte numbered lines; returns the number of lines."""
    count = mib * MiB // 64
    with open(path, "w") as f:
        for start in range(0, count, 65536):
            f.write(
                "".join(
                    f"line {n:012d} ".ljust(63, ".") + "\n"
                    for n in range(start, min(start + 65536, count))
                )
            )
    return count


async def test_a_few_lines_of_a_large_file_cost_a_few_blocks(ws: Workspace, root: Path) -> None:
    count = numbered_lines(root / "big.log", 64)
    costs = {}
    for arguments in ({"head": 50}, {"tail": 50}, {"offset": 1000, "limit": 50}):
        before = bytes_read()
        read = await ws.read_text("big.log", **arguments)
        costs[str(arguments)] = bytes_read() - before
        assert read.line_count == 50
        assert read.sha256 is None  # a whole-file hash would have cost the 64 MiB read
    assert all(cost < 512 * 1024 for cost in costs.values()), costs
    head = await ws.read_text("big.log", head=2)
    assert head.content.startswith("line 000000000000 ")
    assert (head.first_line, head.next_offset, head.total_lines) == (1, 3, None)
    tail = await ws.read_text("big.log", tail=1)
    assert tail.content.startswith(f"line {count - 1:012d} ")
    assert (tail.first_line, tail.next_offset, tail.partial) == (None, None, True)
    middle = await ws.read_text("big.log", offset=count // 2, limit=2)
    assert middle.content.startswith(f"line {count // 2 - 1:012d} ")
    assert (middle.first_line, middle.next_offset) == (count // 2, count // 2 + 2)
    # Line numbers cost a count of the bytes before them, and no more than that.
    before = bytes_read()
    await ws.read_text("big.log", offset=count // 4, limit=1)
    assert bytes_read() - before < 16 * MiB + 2 * Limits().chunk_bytes


async def test_a_part_of_a_small_file_carries_the_whole_files_hash(
    ws: Workspace, root: Path
) -> None:
    data = b"one\ntwo\nthree\n"
    (root / "small.txt").write_bytes(data)
    part = await ws.read_text("small.txt", offset=2, limit=1)
    assert (part.content, part.first_line, part.total_lines) == ("two\n", 2, 3)
    assert part.sha256 == hashlib.sha256(data).hexdigest()
    await ws.write("small.txt", "changed\n", expected_sha256=part.sha256)


async def test_a_large_file_is_changed_by_the_hash_of_a_whole_read(root: Path) -> None:
    ws = Workspace([root], limits=Limits(hash_partial_bytes=16))
    (root / "f.txt").write_text("a\n" * 100)
    part = await ws.read_text("f.txt", head=1)
    assert part.sha256 is None
    whole = await ws.read_text("f.txt")
    assert whole.sha256 is not None
    await ws.write("f.txt", "b\n", expected_sha256=whole.sha256)
    assert (root / "f.txt").read_text() == "b\n"


async def test_a_file_that_grows_during_a_partial_read_is_refused(root: Path) -> None:
    ws = Workspace([root], limits=Limits(hash_partial_bytes=0, chunk_bytes=64))
    path = root / "grows.log"
    path.write_text("x\n" * 1000)

    def append(name: str) -> None:
        if name == "read.chunk":
            with open(path, "a") as f:
                f.write("appended\n")

    with observe_steps(append), pytest.raises(ConcurrentChangeError, match="retry"):
        await ws.read_text("grows.log", offset=900, limit=5)


async def test_a_reply_over_the_read_limit_is_refused(root: Path) -> None:
    ws = Workspace([root], limits=Limits(max_read_bytes=1000, hash_partial_bytes=100))
    (root / "log.txt").write_text("".join(f"line {i}\r\n" for i in range(500)))
    with pytest.raises(TooLargeError, match="head, tail or offset/limit"):
        await ws.read_text("log.txt")
    for arguments in ({"head": 400}, {"tail": 400}, {"offset": 2}):
        with pytest.raises(TooLargeError, match="fewer lines"):
            await ws.read_text("log.txt", **arguments)
    tail = await ws.read_text("log.txt", tail=2)
    assert (tail.content, tail.newline) == ("line 498\r\nline 499\r\n", "CRLF")
    # One endless line (a minified bundle) is refused once it passes the limit, not read whole.
    (root / "bundle.js").write_text("x" * 500_000)
    for arguments in ({"head": 1}, {"tail": 1}, {"offset": 1, "limit": 1}):
        before = bytes_read()
        with pytest.raises(TooLargeError, match="limit of a reply"):
            await ws.read_text("bundle.js", **arguments)
        assert bytes_read() - before < 100_000  # the encoding sniff and one block


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        ({"offset": 0}, "counting from 1"),
        ({"head": -1}, "zero or more"),
        ({"limit": -2}, "zero or more"),
        ({"head": 1, "tail": 1}, "head or tail"),
        ({"tail": 1, "offset": 3}, "tail alone"),
        ({"head": 1, "limit": 3}, "offset=1 with limit"),
    ],
)
async def test_a_line_range_that_names_nothing_is_refused(
    ws: Workspace, root: Path, arguments: dict[str, int], words: str
) -> None:
    (root / "f.txt").write_text("a\n")
    with pytest.raises(InvalidArgumentError, match=words):
        await ws.read_text("f.txt", **arguments)


async def test_the_tail_of_a_large_utf16_file(root: Path) -> None:
    """UTF-16 cannot be scanned backwards by bytes: it is read forward, and still right."""
    ws = Workspace([root], limits=Limits(hash_partial_bytes=0, chunk_bytes=7))
    text = "".join(f"zeile {i} \u00fc\r\n" for i in range(40))
    (root / "u16.txt").write_bytes(text.encode("utf-16"))
    tail = await ws.read_text("u16.txt", tail=2)
    assert tail.content == "zeile 38 \u00fc\r\nzeile 39 \u00fc\r\n"
    assert (tail.encoding, tail.bom, tail.first_line, tail.total_lines) == (
        "utf-16-le",
        True,
        39,
        40,
    )


async def test_a_binary_file_is_refused_as_text_also_in_part(root: Path) -> None:
    """A large file is judged by its first block: NUL bytes there mean binary, as for a whole
    read."""
    ws = Workspace([root], limits=Limits(hash_partial_bytes=0))
    (root / "blob.bin").write_bytes(b"line\n" * 10 + b"\x00\x01" + b"tail\n" * 10)
    for arguments in ({"head": 1}, {"tail": 1}, {"offset": 3, "limit": 1}):
        with pytest.raises(TextEncodingError, match=r"binary file .* bytes/media"):
            await ws.read_text("blob.bin", **arguments)
