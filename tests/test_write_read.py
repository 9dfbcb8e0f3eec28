"""Atomic writes and reads on real files: metadata kept, links written through, preconditions."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from atomictools import (
    AlreadyExistsError,
    Limits,
    PreconditionFailedError,
    ReadOnlyError,
    TextEncodingError,
    TooLargeError,
    Workspace,
    WrongTypeError,
    atomic_write,
    atomic_writer,
)
from tests.conftest import temp_files

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("no_temps_left")]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_write_creates_and_replaces(ws: Workspace, root: Path) -> None:
    created = await ws.write("a.txt", "one\n")
    assert created.created
    assert created.size == 4
    assert created.sha256 == sha(b"one\n")
    replaced = await ws.write("a.txt", b"two\n")
    assert not replaced.created
    assert (root / "a.txt").read_bytes() == b"two\n"


async def test_write_keeps_permission_bits(ws: Workspace, root: Path) -> None:
    target = root / "script.sh"
    target.write_text("#!/bin/sh\n")
    target.chmod(0o751)
    await ws.write("script.sh", "#!/bin/sh\necho hi\n")
    assert stat.S_IMODE(target.stat().st_mode) == 0o751


async def test_new_file_gets_umask_mode(ws: Workspace, root: Path) -> None:
    old = os.umask(0o027)
    try:
        await ws.write("new.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((root / "new.txt").stat().st_mode) == 0o640


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
async def test_write_keeps_owner_when_allowed(ws: Workspace, root: Path) -> None:
    target = root / "owned.txt"
    target.write_text("x")
    os.chown(target, 12345, 23456)
    await ws.write("owned.txt", "y")
    st = target.stat()
    assert (st.st_uid, st.st_gid) == (12345, 23456)


async def test_symlink_inside_roots_is_written_through(ws: Workspace, root: Path) -> None:
    (root / "real.txt").write_text("old")
    (root / "link.txt").symlink_to("real.txt")
    result = await ws.write("link.txt", "new")
    assert (root / "link.txt").is_symlink()
    assert os.readlink(root / "link.txt") == "real.txt"
    assert (root / "real.txt").read_text() == "new"
    assert result.path == "real.txt"


async def test_create_only_refuses_existing(ws: Workspace, root: Path) -> None:
    (root / "a.txt").write_text("keep")
    with pytest.raises(AlreadyExistsError, match="already exists"):
        await ws.write("a.txt", "clobber", create_only=True)
    assert (root / "a.txt").read_text() == "keep"
    await ws.write("b.txt", "fresh", create_only=True)
    assert (root / "b.txt").read_text() == "fresh"


async def test_expected_sha256_matches_then_refuses_stale(ws: Workspace, root: Path) -> None:
    first = await ws.write("a.txt", "v1")
    await ws.write("a.txt", "v2", expected_sha256=first.sha256)
    with pytest.raises(PreconditionFailedError) as caught:
        await ws.write("a.txt", "v3", expected_sha256=first.sha256)
    assert caught.value.current_sha256 == sha(b"v2")
    assert sha(b"v2") in str(caught.value)
    assert "nothing was changed" in str(caught.value)
    assert (root / "a.txt").read_text() == "v2"


async def test_expected_sha256_on_missing_file_refuses(ws: Workspace, root: Path) -> None:
    with pytest.raises(PreconditionFailedError, match="does not exist"):
        await ws.write("gone.txt", "x", expected_sha256=sha(b"x"))
    assert not (root / "gone.txt").exists()


async def test_write_refuses_directory_target(ws: Workspace, root: Path) -> None:
    (root / "d").mkdir()
    with pytest.raises(WrongTypeError, match="directory"):
        await ws.write("d", "x")


async def test_write_limit_and_read_only(root: Path) -> None:
    small = Workspace([root], limits=Limits(max_write_bytes=10))
    with pytest.raises(TooLargeError, match="streaming writer"):
        await small.write("big.txt", "x" * 11)
    readonly = Workspace([root], read_only=True)
    with pytest.raises(ReadOnlyError, match="read-only"):
        await readonly.write("a.txt", "x")
    assert list(root.iterdir()) == []


async def test_streaming_writer_commits_only_on_clean_exit(ws: Workspace, root: Path) -> None:
    (root / "big.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        async with ws.atomic_writer("big.bin") as writer:
            await writer.write(b"partial" * 1000)
            assert temp_files(root)  # the temp exists while the block runs
            raise RuntimeError("producer failed")
    assert (root / "big.bin").read_bytes() == b"old"
    async with ws.atomic_writer("big.bin") as writer:
        for index in range(5):
            await writer.write(bytes([index]) * 300_000)
    data = (root / "big.bin").read_bytes()
    assert len(data) == writer.size == 1_500_000
    assert writer.sha256 == sha(data)


async def test_module_level_helpers(tmp_path: Path) -> None:
    target = tmp_path / "free.txt"
    result = await atomic_write(target, "hello")
    assert target.read_text() == "hello"
    assert result.created
    async with atomic_writer(target) as writer:
        await writer.write("streamed")
    assert target.read_text() == "streamed"


# -- reads -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "encoding", "newline", "bom", "text"),
    [
        (b"a\nb\n", "utf-8", "LF", False, "a\nb\n"),
        (b"a\r\nb\r\n", "utf-8", "CRLF", False, "a\r\nb\r\n"),
        (b"a\rb\r", "utf-8", "CR", False, "a\rb\r"),
        (b"a\r\nb\n", "utf-8", "mixed", False, "a\r\nb\n"),
        ("caf\u00e9\n".encode(), "utf-8", "LF", False, "caf\u00e9\n"),
        (b"caf\xe9\n", "latin-1", "LF", False, "caf\u00e9\n"),
        (b"\xef\xbb\xbfhi\n", "utf-8", "LF", True, "hi\n"),
        ("\ufeffhi\r\n".encode("utf-16-le"), "utf-16-le", "CRLF", True, "hi\r\n"),
    ],
    ids=["lf", "crlf", "cr", "mixed", "utf8", "latin1", "utf8-bom", "utf16-bom"],
)
async def test_read_text_detects_format(
    ws: Workspace, root: Path, raw: bytes, encoding: str, newline: str, bom: bool, text: str
) -> None:
    (root / "f.txt").write_bytes(raw)
    read = await ws.read_text("f.txt")
    assert (read.content, read.encoding, read.newline, read.bom) == (text, encoding, newline, bom)
    assert read.sha256 == sha(raw)
    assert read.size == len(raw)
    assert not read.partial


async def test_read_text_refuses_binary(ws: Workspace, root: Path) -> None:
    (root / "blob.bin").write_bytes(b"\x89PNG\x00\x00\x01")
    with pytest.raises(TextEncodingError, match="binary"):
        await ws.read_text("blob.bin")
    assert (await ws.read_bytes("blob.bin")).data == b"\x89PNG\x00\x00\x01"


async def test_read_bytes_reports_mime_and_hash(ws: Workspace, root: Path) -> None:
    (root / "pic.png").write_bytes(b"\x89PNG....")
    read = await ws.read_bytes("pic.png")
    assert read.mime_type == "image/png"
    assert read.sha256 == sha(b"\x89PNG....")
