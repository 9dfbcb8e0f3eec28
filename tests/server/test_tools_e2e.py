"""Every file tool end to end through the SDK's ``mcp.Client``: in memory and over real stdio.

Each ``check_*`` below drives one tool (or one concern) through a connected client: the
success paths, with the structured content compared to the camelCase output model and the
files on disk compared to what the result claims, and every error, which must be an
``isError`` result naming the problem, saying that nothing was changed, carrying no traceback,
and leaving the session serving the next call (``Env.error``).

The checks run two ways, each in both protocol eras (``mode="legacy"``: the 2025 handshake;
the default: the SDK's auto mode, which connects at 2026-07-28):

* in memory, ``Client(create_server(Workspace([root])), mode=...)``: one test per check, so a
  failure names its check;
* over stdio, ``python -m atomictools serve --root DIR`` as a subprocess: one server per mode
  runs every check in turn in one session (each in its own directory below the root), so the
  real transport and the real command line see every tool and every error too.

The SDK's Client works on trio as well as asyncio (checked), so the conftest's
``anyio_backend`` parametrization (both backends) is kept.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pytest
from mcp.types import (
    AudioContent,
    BlobResourceContents,
    EmbeddedResource,
    ImageContent,
    TextContent,
)

from atomictools import Workspace
from atomictools.engine.config import Limits
from atomictools.server import create_server
from atomictools.server.models import (
    AllowedDirectoriesOutput,
    CopyOutput,
    DeleteOutput,
    DirectoryOutput,
    EditOutput,
    FileInfoOutput,
    ListOutput,
    ListWithSizesOutput,
    MoveOutput,
    ReadMediaOutput,
    ReadMultipleOutput,
    ReadTextOutput,
    SearchOutput,
    TreeOutput,
    WriteOutput,
)
from tests.conftest import temp_files
from tests.conftest import tree_snapshot as snapshot

from .helpers import OUTSIDE, Env, connect, sha, stdio_params, text_of

pytestmark = pytest.mark.anyio

Check = Callable[[Env], Awaitable[None]]
CHECKS: list[Check] = []
READ_ONLY_CHECKS: list[Check] = []

TOOLS = {
    "read_text_file",
    "read_file",
    "read_media_file",
    "read_multiple_files",
    "write_file",
    "edit_file",
    "create_directory",
    "list_directory",
    "list_directory_with_sizes",
    "directory_tree",
    "search_files",
    "get_file_info",
    "list_allowed_directories",
    "move_file",
    "copy_file",
    "delete_file",
    "apply_changes",
    "list_changes",
    "undo_change",
    "db_list",
    "db_schema",
    "db_query",
    "db_execute",
    "db_transaction",
}
READ_TOOLS = {
    "read_text_file",
    "read_file",
    "read_media_file",
    "read_multiple_files",
    "list_directory",
    "list_directory_with_sizes",
    "directory_tree",
    "search_files",
    "get_file_info",
    "list_allowed_directories",
    "list_changes",
    "db_list",
    "db_schema",
    "db_query",
}
DESTRUCTIVE_TOOLS = {
    "write_file",
    "edit_file",
    "move_file",
    "copy_file",
    "delete_file",
    "apply_changes",
    "undo_change",
    "db_execute",
    "db_transaction",
}

PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489")
BLOB = bytes(range(256))


def check(func: Check) -> Check:
    CHECKS.append(func)
    return func


def read_only_check(func: Check) -> Check:
    READ_ONLY_CHECKS.append(func)
    return func


def check_id(func: Check) -> str:
    return func.__name__.removeprefix("check_")


# -- reads ---------------------------------------------------------------------------------------


@check
async def check_read_text_file(env: Env) -> None:
    data = b"one\ntwo\nthree\nfour\n"
    env.f("notes.txt").write_bytes(data)
    whole = await env.ok("read_text_file", {"path": env.p("notes.txt")}, ReadTextOutput)
    assert whole == {
        "path": env.p("notes.txt"),
        "content": data.decode(),
        "size": len(data),
        "sha256": sha(data),
        "encoding": "utf-8",
        "newline": "LF",
        "bom": False,
        "partial": False,
    }
    result = await env.call("read_text_file", {"path": env.p("notes.txt")})
    # The content alone in the first text block; the sha256 (for hosts that forward only
    # text to the model) in a second one.
    first, second = result.content
    assert isinstance(first, TextContent)
    assert isinstance(second, TextContent)
    assert first.text == data.decode()
    assert f"sha256 {sha(data)}" in second.text
    assert "expectedSha256" in second.text

    head = await env.ok("read_text_file", {"path": env.p("notes.txt"), "head": 2}, ReadTextOutput)
    assert (head["content"], head["partial"]) == ("one\ntwo\n", True)
    assert (head["size"], head["sha256"]) == (len(data), sha(data))  # of the whole file
    tail = await env.ok("read_text_file", {"path": env.p("notes.txt"), "tail": 1}, ReadTextOutput)
    assert (tail["content"], tail["partial"]) == ("four\n", True)
    assert tail["sha256"] == sha(data)

    lines = await env.result(
        "read_text_file", {"path": env.p("notes.txt"), "offset": 2, "limit": 2}, ReadTextOutput
    )
    ranged = lines.structured_content or {}
    assert (ranged["content"], ranged["firstLine"], ranged["lineCount"]) == ("two\nthree\n", 2, 2)
    assert (ranged["nextOffset"], ranged["totalLines"], ranged["sha256"]) == (4, 4, sha(data))
    assert "lines 2-3 of 4; more follow: pass offset=4 to read on" in text_of(lines)
    last = await env.ok("read_text_file", {"path": env.p("notes.txt"), "offset": 4}, ReadTextOutput)
    assert (last["content"], "nextOffset" in last) == ("four\n", False)

    # A part of a large file is read without the rest, so it has no hash: the text says how
    # to get one.
    big = b"".join(b"%08d\n" % n for n in range(200_000))  # 1.8 MB
    env.f("big.log").write_bytes(big)
    part = await env.result("read_text_file", {"path": env.p("big.log"), "tail": 1}, ReadTextOutput)
    assert part.structured_content is not None
    assert part.structured_content["content"] == "00199999\n"
    assert "sha256" not in part.structured_content
    assert "read it whole and pass that sha256 as expectedSha256" in text_of(part)
    assert "the last 1 line(s);" in text_of(part)  # a large file's tail is not numbered
    await env.error(
        "read_text_file", {"path": env.p("notes.txt"), "tail": 1, "offset": 2}, "tail alone"
    )

    absolute = await env.ok("read_text_file", {"path": str(env.f("notes.txt"))}, ReadTextOutput)
    assert absolute["content"] == data.decode()

    crlf = b"\xef\xbb\xbfa\r\nb\r\n"
    env.f("crlf.txt").write_bytes(crlf)
    out = await env.ok("read_text_file", {"path": env.p("crlf.txt")}, ReadTextOutput)
    assert (out["newline"], out["bom"], out["sha256"]) == ("CRLF", True, sha(crlf))

    await env.error(
        "read_text_file", {"path": env.p("missing.txt")}, "missing.txt", "does not exist"
    )
    await env.error("read_text_file", {"path": env.name}, "is a directory")
    env.f("blob.bin").write_bytes(b"\x00\x01\x02")
    await env.error("read_text_file", {"path": env.p("blob.bin")}, "binary", "media")
    await env.error("read_text_file", {"path": "../outside.txt"}, OUTSIDE)


@check
async def check_read_file_alias(env: Env) -> None:
    env.f("a.txt").write_bytes(b"alias\n")
    plain = await env.ok("read_text_file", {"path": env.p("a.txt")}, ReadTextOutput)
    alias = await env.ok("read_file", {"path": env.p("a.txt")}, ReadTextOutput)
    assert alias == plain
    head = await env.ok("read_file", {"path": env.p("a.txt"), "head": 0}, ReadTextOutput)
    assert (head["content"], head["partial"]) == ("", True)
    message = await env.error("read_file", {"path": env.p("nope.txt")}, "does not exist")
    assert message.startswith("Error executing tool read_file:")
    await env.error("read_file", {"path": "/"}, OUTSIDE)


@check
async def check_read_media_file(env: Env) -> None:
    env.f("pixel.png").write_bytes(PNG)
    result = await env.result("read_media_file", {"path": env.p("pixel.png")}, ReadMediaOutput)
    assert result.structured_content == {
        "path": env.p("pixel.png"),
        "mimeType": "image/png",
        "size": len(PNG),
        "sha256": sha(PNG),
    }
    assert isinstance(result.content[0], TextContent)
    assert sha(PNG) in result.content[0].text
    image = result.content[1]
    assert isinstance(image, ImageContent)
    assert image.mime_type == "image/png"
    assert base64.b64decode(image.data) == PNG

    env.f("data.bin").write_bytes(BLOB)
    result = await env.result("read_media_file", {"path": env.p("data.bin")}, ReadMediaOutput)
    assert result.structured_content is not None
    assert result.structured_content["mimeType"] == "application/octet-stream"
    assert result.structured_content["sha256"] == sha(BLOB)
    resource = result.content[1]
    assert isinstance(resource, EmbeddedResource)
    assert isinstance(resource.resource, BlobResourceContents)
    assert resource.resource.mime_type == "application/octet-stream"
    assert base64.b64decode(resource.resource.blob) == BLOB

    env.f("sound.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt ")
    result = await env.result("read_media_file", {"path": env.p("sound.wav")}, ReadMediaOutput)
    audio = result.content[1]
    assert isinstance(audio, AudioContent)
    assert audio.mime_type.startswith("audio/")

    await env.error("read_media_file", {"path": env.p("none.png")}, "does not exist")
    await env.error("read_media_file", {"path": env.name}, "is a directory")
    await env.error("read_media_file", {"path": "../root-evil/secret.txt"}, OUTSIDE)


@check
async def check_read_media_file_resource_uri(env: Env) -> None:
    """The blob's resource URI must name the file that was read (an absolute file: URI)."""
    env.f("data.bin").write_bytes(BLOB)
    result = await env.result("read_media_file", {"path": env.p("data.bin")}, ReadMediaOutput)
    resource = result.content[1]
    assert isinstance(resource, EmbeddedResource)
    uri = urlparse(str(resource.resource.uri))
    assert uri.scheme == "file"
    assert Path(unquote(uri.path)) == env.f("data.bin").resolve(), str(resource.resource.uri)


@check
async def check_read_multiple_files(env: Env) -> None:
    env.f("a.txt").write_bytes(b"alpha\n")
    env.f("b.txt").write_bytes(b"beta\n")
    paths = [env.p("a.txt"), env.p("missing.txt"), env.p("b.txt"), "../outside.txt"]
    result = await env.result("read_multiple_files", {"paths": paths}, ReadMultipleOutput)
    assert not result.is_error  # one bad file does not fail the call
    assert result.structured_content is not None
    files = result.structured_content["files"]
    assert [f["path"] for f in files] == paths
    assert files[0] == {
        "path": paths[0],
        "content": "alpha\n",
        "size": 6,
        "sha256": sha(b"alpha\n"),
        "error": None,
    }
    assert files[2]["content"] == "beta\n"
    assert files[2]["sha256"] == sha(b"beta\n")
    assert files[1]["content"] is None
    assert "does not exist" in files[1]["error"]
    assert files[3]["content"] is None
    assert OUTSIDE in files[3]["error"]
    text = text_of(result)
    assert "alpha" in text
    assert "Error - " in text

    await env.error("read_multiple_files", {"paths": []}, "paths", nothing_changed=False)


# -- changes -------------------------------------------------------------------------------------


@check
async def check_write_file(env: Env) -> None:
    new = env.p("new.txt")
    out = await env.ok("write_file", {"path": new, "content": "héllo ✓\n"}, WriteOutput)
    data = "héllo ✓\n".encode()
    assert out == {"path": new, "size": len(data), "sha256": sha(data), "created": True}
    assert env.f("new.txt").read_bytes() == data

    out = await env.ok("write_file", {"path": new, "content": "second\n"}, WriteOutput)
    assert out["created"] is False
    assert env.f("new.txt").read_bytes() == b"second\n"
    assert out["sha256"] == sha(env.f("new.txt").read_bytes())

    before = snapshot(env.d)
    await env.error(
        "write_file",
        {"path": new, "content": "clobber", "createOnly": True},
        "already exists",
        "createOnly",
    )
    assert snapshot(env.d) == before
    out = await env.ok(
        "write_file", {"path": env.p("fresh.txt"), "content": "x", "createOnly": True}, WriteOutput
    )
    assert out["created"] is True

    current = sha(b"second\n")
    stale = sha(b"something else")
    before = snapshot(env.d)
    message = await env.error(
        "write_file",
        {"path": new, "content": "lost update", "expectedSha256": stale},
        "changed since it was read",
        f"current sha256 {current}",
    )
    assert stale in message
    assert snapshot(env.d) == before
    out = await env.ok(
        "write_file", {"path": new, "content": "third\n", "expectedSha256": current}, WriteOutput
    )
    assert out["sha256"] == sha(b"third\n") == sha(env.f("new.txt").read_bytes())

    before = snapshot(env.d)
    await env.error(
        "write_file", {"path": env.p("no", "dir.txt"), "content": "x"}, "does not exist"
    )
    await env.error("write_file", {"path": env.name, "content": "x"}, "is a directory")
    await env.error("write_file", {"path": "../outside.txt", "content": "x"}, OUTSIDE)
    assert snapshot(env.d) == before
    assert temp_files(env.top) == []


@check
async def check_edit_file(env: Env) -> None:
    original = b"alpha\r\nbeta\r\ngamma\r\nbeta2\r\n"
    env.f("crlf.txt").write_bytes(original)
    path = env.p("crlf.txt")

    before = snapshot(env.d)
    dry = await env.ok(
        "edit_file",
        {"path": path, "edits": [{"oldText": "gamma", "newText": "GAMMA"}], "dryRun": True},
        EditOutput,
    )
    assert snapshot(env.d) == before  # a dry run writes nothing
    assert dry["applied"] is False
    assert "-gamma" in dry["diff"]
    assert "+GAMMA" in dry["diff"]
    assert dry["previousSha256"] == sha(original)
    assert dry["sha256"] == sha(original.replace(b"gamma", b"GAMMA"))

    out = await env.ok(
        "edit_file",
        {
            "path": path,
            "edits": [
                {"oldText": "alpha", "newText": "ALPHA"},
                {"oldText": "gamma", "newText": "GAMMA"},
            ],
        },
        EditOutput,
    )
    edited = b"ALPHA\r\nbeta\r\nGAMMA\r\nbeta2\r\n"  # CRLF kept
    assert env.f("crlf.txt").read_bytes() == edited
    assert out["applied"] is True
    assert out["path"] == path
    assert out["previousSha256"] == sha(original)
    assert out["sha256"] == sha(edited)
    assert "-alpha" in out["diff"]
    assert "+ALPHA" in out["diff"]

    before = snapshot(env.d)
    await env.error(
        "edit_file",
        {
            "path": path,
            "edits": [
                {"oldText": "ALPHA", "newText": "first"},
                {"oldText": "no such text", "newText": "x"},
            ],
        },
        "edit 2 of 2",
        "not found",
    )
    await env.error(
        "edit_file",
        {"path": path, "edits": [{"oldText": "beta", "newText": "x"}]},
        "edit 1 of 1",
        "matches 2 times",
    )
    await env.error(
        "edit_file",
        {
            "path": path,
            "edits": [{"oldText": "ALPHA", "newText": "x"}],
            "expectedSha256": sha(original),
        },
        f"current sha256 {sha(edited)}",
    )
    await env.error(
        "edit_file",
        {"path": env.p("missing.txt"), "edits": [{"oldText": "a", "newText": "b"}]},
        "does not exist",
    )
    await env.error(
        "edit_file",
        {"path": "../outside.txt", "edits": [{"oldText": "outside", "newText": "pwned"}]},
        OUTSIDE,
    )
    assert snapshot(env.d) == before

    out = await env.ok(
        "edit_file",
        {
            "path": path,
            "edits": [{"oldText": "beta2", "newText": "delta"}],
            "expectedSha256": sha(edited),
        },
        EditOutput,
    )
    assert env.f("crlf.txt").read_bytes() == b"ALPHA\r\nbeta\r\nGAMMA\r\ndelta\r\n"
    assert out["sha256"] == sha(env.f("crlf.txt").read_bytes())


@check
async def check_create_directory(env: Env) -> None:
    path = env.p("a", "b", "c")
    out = await env.ok("create_directory", {"path": path}, DirectoryOutput)
    assert out == {"path": path, "created": True}
    assert env.f("a", "b", "c").is_dir()
    again = await env.ok("create_directory", {"path": path}, DirectoryOutput)
    assert again == {"path": path, "created": False}

    env.f("file.txt").write_bytes(b"x")
    before = snapshot(env.d)
    await env.error("create_directory", {"path": env.p("file.txt")}, "a file with that name")
    await env.error("create_directory", {"path": "../made-outside"}, OUTSIDE)
    assert snapshot(env.d) == before
    assert not (env.top / "made-outside").exists()


@check
async def check_list_directory(env: Env) -> None:
    env.f("file.txt").write_bytes(b"abc")
    env.f("sub").mkdir()
    os.symlink("file.txt", env.f("link"))
    out = await env.ok("list_directory", {"path": env.name}, ListOutput)
    assert out["path"] == env.name
    assert out["truncated"] is False
    # Names and types only, as the reference lists them: no stat per entry (sizes are
    # list_directory_with_sizes's job).
    assert out["entries"] == [
        {"name": "file.txt", "type": "file"},
        {"name": "link", "type": "symlink"},
        {"name": "sub", "type": "directory"},
    ]
    result = await env.call("list_directory", {"path": env.name})
    text = text_of(result)
    assert "[FILE] file.txt" in text
    assert "[DIR] sub" in text
    assert "[LINK] link" in text

    empty = await env.ok("list_directory", {"path": env.p("sub")}, ListOutput)
    assert empty["entries"] == []

    await env.error("list_directory", {"path": env.p("missing")}, "does not exist")
    await env.error("list_directory", {"path": env.p("file.txt")}, "not a directory")
    await env.error("list_directory", {"path": ".."}, OUTSIDE)


@check
async def check_list_directory_with_sizes(env: Env) -> None:
    env.f("small.txt").write_bytes(b"s")
    env.f("big.txt").write_bytes(b"b" * 100)
    env.f("mid.txt").write_bytes(b"m" * 10)
    env.f("dir").mkdir()
    by_size = await env.ok(
        "list_directory_with_sizes", {"path": env.name, "sortBy": "size"}, ListWithSizesOutput
    )
    assert [e["name"] for e in by_size["entries"]] == ["big.txt", "mid.txt", "small.txt", "dir"]
    assert [e["size"] for e in by_size["entries"]] == [100, 10, 1, None]
    assert (by_size["totalFiles"], by_size["totalDirectories"], by_size["totalSize"]) == (3, 1, 111)
    assert by_size["truncated"] is False

    by_name = await env.ok("list_directory_with_sizes", {"path": env.name}, ListWithSizesOutput)
    names = [e["name"] for e in by_name["entries"]]
    assert names == sorted(names)
    assert by_name["totalSize"] == 111
    result = await env.call("list_directory_with_sizes", {"path": env.name})
    assert "3 files, 1 directories, 111 bytes" in text_of(result)

    await env.error("list_directory_with_sizes", {"path": env.p("missing")}, "does not exist")
    await env.error("list_directory_with_sizes", {"path": str(env.top)}, OUTSIDE)


@check
async def check_directory_tree(env: Env) -> None:
    env.f("src", "node_modules").mkdir(parents=True)
    env.f("src", "a.py").write_bytes(b"print()\n")
    env.f("src", "node_modules", "x.js").write_bytes(b"x\n")
    env.f("build.log").write_bytes(b"log\n")

    full = await env.ok("directory_tree", {"path": env.name}, TreeOutput)
    assert full["path"] == env.name
    assert full["entries"] == 5
    names = {node["name"]: node for node in full["tree"]}
    assert names["build.log"] == {"name": "build.log", "type": "file"}
    src = names["src"]
    assert src["type"] == "directory"
    assert {c["name"] for c in src["children"]} == {"a.py", "node_modules"}
    as_text = await env.call("directory_tree", {"path": env.name})
    assert json.loads(text_of(as_text)) == full["tree"]  # the text block is the same tree

    trimmed = await env.ok(
        "directory_tree",
        {"path": env.name, "excludePatterns": ["node_modules", "*.log"]},
        TreeOutput,
    )
    assert trimmed["tree"] == [
        {"name": "src", "type": "directory", "children": [{"name": "a.py", "type": "file"}]}
    ]
    assert trimmed["entries"] == 2

    await env.error("directory_tree", {"path": env.p("missing")}, "does not exist")
    await env.error("directory_tree", {"path": "../root-evil"}, OUTSIDE)


@check
async def check_search_files(env: Env) -> None:
    env.f("src", "pkg").mkdir(parents=True)
    env.f("src", "a.py").write_bytes(b"")
    env.f("src", "pkg", "b.py").write_bytes(b"")
    env.f("src", "pkg", "c.txt").write_bytes(b"")
    env.f("src", "skip").mkdir()
    env.f("src", "skip", "d.py").write_bytes(b"")

    found = await env.ok("search_files", {"path": env.name, "pattern": "*.py"}, SearchOutput)
    assert set(found["matches"]) == {
        env.p("src", "a.py"),
        env.p("src", "pkg", "b.py"),
        env.p("src", "skip", "d.py"),
    }
    assert (found["path"], found["pattern"], found["truncated"]) == (env.name, "*.py", False)

    narrowed = await env.ok(
        "search_files",
        {"path": env.name, "pattern": "*.py", "excludePatterns": ["skip"]},
        SearchOutput,
    )
    assert set(narrowed["matches"]) == {env.p("src", "a.py"), env.p("src", "pkg", "b.py")}
    none = await env.ok("search_files", {"path": env.name, "pattern": "*.rs"}, SearchOutput)
    assert none["matches"] == []
    result = await env.call("search_files", {"path": env.name, "pattern": "*.rs"})
    assert text_of(result) == "No matches found"

    await env.error("search_files", {"path": env.name, "pattern": ""}, "pattern is empty")
    await env.error("search_files", {"path": env.p("missing"), "pattern": "*"}, "does not exist")
    await env.error("search_files", {"path": "..", "pattern": "*.txt"}, OUTSIDE)


@check
async def check_get_file_info(env: Env) -> None:
    env.f("f.txt").write_bytes(b"12345")
    os.chmod(env.f("f.txt"), 0o640)
    info = await env.ok("get_file_info", {"path": env.p("f.txt")}, FileInfoOutput)
    assert (info["path"], info["type"], info["size"]) == (env.p("f.txt"), "file", 5)
    assert info["permissions"] == "640"
    assert info["symlinkTarget"] is None
    for key in ("modified", "accessed", "changed"):
        assert isinstance(info[key], str)
        assert info[key]
    directory = await env.ok("get_file_info", {"path": env.name}, FileInfoOutput)
    assert directory["type"] == "directory"

    await env.error("get_file_info", {"path": env.p("missing")}, "does not exist")
    await env.error("get_file_info", {"path": "../outside.txt"}, OUTSIDE)


@check
async def check_list_allowed_directories(env: Env) -> None:
    out = await env.ok("list_allowed_directories", {}, AllowedDirectoriesOutput)
    assert out == {"directories": [str(env.root.resolve())]}
    result = await env.call("list_allowed_directories")
    assert str(env.root.resolve()) in text_of(result)
    # extra arguments are ignored, not an error
    out = await env.ok("list_allowed_directories", {"unused": 1}, AllowedDirectoriesOutput)
    assert out == {"directories": [str(env.root.resolve())]}


@check
async def check_move_file(env: Env) -> None:
    env.f("a.txt").write_bytes(b"A")
    out = await env.ok(
        "move_file", {"source": env.p("a.txt"), "destination": env.p("b.txt")}, MoveOutput
    )
    assert out == {"source": env.p("a.txt"), "destination": env.p("b.txt"), "replaced": False}
    assert not env.f("a.txt").exists()
    assert env.f("b.txt").read_bytes() == b"A"

    env.f("c.txt").write_bytes(b"C")
    before = snapshot(env.d)
    await env.error(
        "move_file",
        {"source": env.p("b.txt"), "destination": env.p("c.txt")},
        "destination exists",
        "overwrite",
    )
    assert snapshot(env.d) == before
    out = await env.ok(
        "move_file",
        {"source": env.p("b.txt"), "destination": env.p("c.txt"), "overwrite": True},
        MoveOutput,
    )
    assert out["replaced"] is True
    assert not env.f("b.txt").exists()
    assert env.f("c.txt").read_bytes() == b"A"

    env.f("dir").mkdir()
    env.f("dir", "inner.txt").write_bytes(b"i")
    await env.ok("move_file", {"source": env.p("dir"), "destination": env.p("dir2")}, MoveOutput)
    assert env.f("dir2", "inner.txt").read_bytes() == b"i"

    before = snapshot(env.d)
    await env.error(
        "move_file", {"source": env.p("gone.txt"), "destination": env.p("x")}, "does not exist"
    )
    await env.error(
        "move_file", {"source": env.p("c.txt"), "destination": "../stolen.txt"}, OUTSIDE
    )
    assert snapshot(env.d) == before
    assert not (env.top / "stolen.txt").exists()


@check
async def check_copy_file(env: Env) -> None:
    env.f("src.bin").write_bytes(BLOB)
    out = await env.ok(
        "copy_file", {"source": env.p("src.bin"), "destination": env.p("dst.bin")}, CopyOutput
    )
    assert out == {
        "source": env.p("src.bin"),
        "destination": env.p("dst.bin"),
        "size": len(BLOB),
        "sha256": sha(BLOB),
        "replaced": False,
    }
    assert env.f("dst.bin").read_bytes() == BLOB
    assert env.f("src.bin").read_bytes() == BLOB

    env.f("other.txt").write_bytes(b"other")
    before = snapshot(env.d)
    await env.error(
        "copy_file",
        {"source": env.p("other.txt"), "destination": env.p("dst.bin")},
        "destination exists",
    )
    assert snapshot(env.d) == before
    out = await env.ok(
        "copy_file",
        {"source": env.p("other.txt"), "destination": env.p("dst.bin"), "overwrite": True},
        CopyOutput,
    )
    assert out["replaced"] is True
    assert out["sha256"] == sha(b"other") == sha(env.f("dst.bin").read_bytes())

    env.f("dir").mkdir()
    before = snapshot(env.d)
    await env.error(
        "copy_file", {"source": env.p("missing"), "destination": env.p("x")}, "does not exist"
    )
    await env.error(
        "copy_file", {"source": env.p("dir"), "destination": env.p("y")}, "is a directory"
    )
    await env.error(
        "copy_file", {"source": "../outside.txt", "destination": env.p("leak.txt")}, OUTSIDE
    )
    assert snapshot(env.d) == before
    assert temp_files(env.top) == []


@check
async def check_delete_file(env: Env) -> None:
    env.f("doomed.txt").write_bytes(b"bye")
    before = snapshot(env.d)
    await env.error(
        "delete_file",
        {"path": env.p("doomed.txt"), "expectedSha256": sha(b"hi")},
        f"current sha256 {sha(b'bye')}",
    )
    assert snapshot(env.d) == before
    out = await env.ok(
        "delete_file", {"path": env.p("doomed.txt"), "expectedSha256": sha(b"bye")}, DeleteOutput
    )
    assert out == {"path": env.p("doomed.txt"), "type": "file"}
    assert not env.f("doomed.txt").exists()

    env.f("plain.txt").write_bytes(b"p")
    out = await env.ok("delete_file", {"path": env.p("plain.txt")}, DeleteOutput)
    assert not env.f("plain.txt").exists()

    env.f("target.txt").write_bytes(b"t")
    os.symlink("target.txt", env.f("link"))
    out = await env.ok("delete_file", {"path": env.p("link")}, DeleteOutput)
    assert out["type"] == "symlink"
    assert not os.path.lexists(env.f("link"))
    assert env.f("target.txt").read_bytes() == b"t"  # never the link's target

    env.f("dir").mkdir()
    before = snapshot(env.d)
    await env.error("delete_file", {"path": env.p("dir")}, "is a directory")
    await env.error("delete_file", {"path": env.p("missing")}, "does not exist")
    await env.error("delete_file", {"path": "../outside.txt"}, OUTSIDE)
    assert snapshot(env.d) == before
    assert (env.top / "outside.txt").read_bytes() == b"outside\n"


# -- protocol-level behaviour --------------------------------------------------------------------


@check
async def check_annotations(env: Env) -> None:
    listed = await env.client.list_tools()
    tools = {tool.name: tool for tool in listed.tools}
    assert set(tools) == TOOLS
    for name, tool in tools.items():
        notes = tool.annotations
        assert notes is not None, name
        assert notes.open_world_hint is False, name
        assert tool.output_schema is not None, name
        assert tool.description, name
        if name in READ_TOOLS:
            assert notes.read_only_hint is True, name
        else:
            assert notes.read_only_hint is False, name
        if name in DESTRUCTIVE_TOOLS:
            assert notes.destructive_hint is True, name
    assert tools["create_directory"].annotations.destructive_hint is False  # type: ignore[union-attr]
    assert tools["write_file"].annotations.idempotent_hint is True  # type: ignore[union-attr]
    assert tools["edit_file"].annotations.idempotent_hint is False  # type: ignore[union-attr]
    # The camelCase output names are what the schemas announce.
    assert set(tools["edit_file"].output_schema["properties"]) == {  # type: ignore[index]
        "path",
        "diff",
        "applied",
        "sha256",
        "previousSha256",
    }
    assert "expectedSha256" in tools["write_file"].input_schema["properties"]
    assert "createOnly" in tools["write_file"].input_schema["properties"]


INVALID_CALLS: list[tuple[str, dict[str, Any], str]] = [
    ("read_text_file", {"path": 5}, "path"),
    ("read_text_file", {"path": "x", "head": "many"}, "head"),
    ("read_text_file", {"path": "x", "tail": -1}, "tail"),
    ("read_text_file", {"path": "x", "offset": 0}, "offset"),
    ("read_text_file", {"path": "x", "limit": "ten"}, "limit"),
    ("read_file", {"path": None}, "path"),
    ("read_media_file", {}, "path"),
    ("read_multiple_files", {"paths": "a.txt"}, "paths"),
    ("write_file", {"path": "w.txt", "content": 123}, "content"),
    ("write_file", {"path": "w.txt"}, "content"),
    ("write_file", {"path": "w.txt", "content": "x", "createOnly": [1]}, "createOnly"),
    ("edit_file", {"path": "e.txt", "edits": "nope"}, "edits"),
    ("edit_file", {"path": "e.txt", "edits": [{"oldText": 1, "newText": "x"}]}, "oldText"),
    ("edit_file", {"path": "e.txt", "edits": []}, "edits"),
    ("create_directory", {"path": ["a"]}, "path"),
    ("list_directory", {"path": {}}, "path"),
    ("list_directory_with_sizes", {"path": ".", "sortBy": "date"}, "sortBy"),
    ("directory_tree", {"path": ".", "excludePatterns": "*.log"}, "excludePatterns"),
    ("search_files", {"path": "."}, "pattern"),
    ("get_file_info", {"path": 1.5}, "path"),
    ("move_file", {"source": "a"}, "destination"),
    ("move_file", {"source": "a", "destination": "b", "overwrite": "perhaps"}, "overwrite"),
    ("copy_file", {"source": 1, "destination": 2}, "source"),
    ("delete_file", {"path": "d.txt", "expectedSha256": 5}, "expectedSha256"),
]


@check
async def check_invalid_arguments(env: Env) -> None:
    """Wrong argument types are isError results naming the argument; the server keeps serving."""
    before = snapshot(env.top)
    for tool, args, field in INVALID_CALLS:
        # The SDK validates before the tool runs, so its message is pydantic's, without the
        # tool's "nothing was changed"; that nothing changed is checked on disk instead.
        await env.error(tool, args, field, nothing_changed=False)
    await env.error("no_such_tool", {}, "no_such_tool", nothing_changed=False)
    assert snapshot(env.top) == before


# -- confinement ---------------------------------------------------------------------------------


def escapes(env: Env) -> list[tuple[str, str, bool]]:
    """(id, path, final_link): paths that lead outside the root, each a different way."""
    os.symlink(env.top / "root-evil", env.f("evil_dir"))
    os.symlink(env.top / "outside.txt", env.f("evil.txt"))
    return [
        ("dotdot", "../outside.txt", False),
        ("dotdot_deep", env.p("..", "..", "outside.txt"), False),
        ("absolute_outside", str(env.top / "outside.txt"), False),
        ("sibling_prefix_absolute", str(env.top / "root-evil" / "secret.txt"), False),
        ("sibling_prefix_relative", "../root-evil/secret.txt", False),
        ("symlink_dir_to_outside", env.p("evil_dir", "secret.txt"), False),
        ("symlink_file_to_outside", env.p("evil.txt"), True),
        ("nul_byte", env.p("inside.txt") + "\x00../../outside.txt", False),
    ]


@check
async def check_confinement(env: Env) -> None:
    env.f("inside.txt").write_bytes(b"inside\n")
    inside = env.p("inside.txt")
    new = env.p("new.txt")
    for name, path, final_link in escapes(env):
        calls: list[tuple[str, dict[str, Any]]] = [
            ("read_text_file", {"path": path}),
            ("write_file", {"path": path, "content": "pwned\n"}),
            ("copy_file", {"source": path, "destination": new}),
            ("copy_file", {"source": inside, "destination": path, "overwrite": True}),
        ]
        if not final_link:  # move and delete act on a final symlink itself (see below)
            calls += [
                ("move_file", {"source": path, "destination": new}),
                ("move_file", {"source": inside, "destination": path, "overwrite": True}),
                ("delete_file", {"path": path}),
            ]
        expected = "NUL byte" if name == "nul_byte" else OUTSIDE
        for tool, args in calls:
            before = snapshot(env.top)
            message = await env.error(tool, args, expected)
            assert snapshot(env.top) == before, f"{name}: {tool}({args!r}) changed something"
            assert "pwned" not in message

    # A symlink to outside is moved / deleted as a link; its target is never touched.
    await env.ok("move_file", {"source": env.p("evil.txt"), "destination": new}, MoveOutput)
    assert os.readlink(env.f("new.txt")) == str(env.top / "outside.txt")
    await env.ok("delete_file", {"path": new}, DeleteOutput)
    assert not os.path.lexists(env.f("new.txt"))
    assert (env.top / "outside.txt").read_bytes() == b"outside\n"
    assert (env.top / "root-evil" / "secret.txt").read_bytes() == b"outside\n"
    assert sorted(p.name for p in env.top.iterdir()) == ["outside.txt", "root", "root-evil"]
    assert temp_files(env.top) == []


# -- read-only servers ---------------------------------------------------------------------------


@read_only_check
async def check_read_only_refuses_every_change(env: Env) -> None:
    env.f("keep.txt").write_bytes(b"keep\n")
    env.f("dir").mkdir()
    keep = env.p("keep.txt")
    changes: list[tuple[str, dict[str, Any]]] = [
        ("write_file", {"path": keep, "content": "changed"}),
        ("write_file", {"path": env.p("new.txt"), "content": "new"}),
        ("edit_file", {"path": keep, "edits": [{"oldText": "keep", "newText": "lost"}]}),
        ("create_directory", {"path": env.p("made")}),
        ("move_file", {"source": keep, "destination": env.p("moved.txt")}),
        ("copy_file", {"source": keep, "destination": env.p("copied.txt")}),
        ("delete_file", {"path": keep}),
    ]
    before = snapshot(env.top)
    for tool, args in changes:
        await env.error(tool, args, "read-only")
    assert snapshot(env.top) == before

    # Reads still work, and a dry-run edit is only a read.
    out = await env.ok("read_text_file", {"path": keep}, ReadTextOutput)
    assert out["sha256"] == sha(b"keep\n")
    listed = await env.ok("list_directory", {"path": env.name}, ListOutput)
    assert {e["name"] for e in listed["entries"]} == {"keep.txt", "dir"}
    dry = await env.ok(
        "edit_file",
        {"path": keep, "edits": [{"oldText": "keep", "newText": "lost"}], "dryRun": True},
        EditOutput,
    )
    assert dry["applied"] is False
    assert snapshot(env.top) == before


# -- the runs ------------------------------------------------------------------------------------


@pytest.fixture(params=["legacy", "default"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.usefixtures("no_temps_left")
@pytest.mark.parametrize("check_fn", CHECKS, ids=check_id)
async def test_in_memory(check_fn: Check, mode: str, root: Path, tmp_path: Path) -> None:
    server = create_server(Workspace([root]))
    async with connect(server, mode) as client:
        await check_fn(Env.make(client, root, tmp_path, check_id(check_fn)))


@pytest.mark.usefixtures("no_temps_left")
@pytest.mark.parametrize("check_fn", READ_ONLY_CHECKS, ids=check_id)
async def test_in_memory_read_only(check_fn: Check, mode: str, root: Path, tmp_path: Path) -> None:
    server = create_server(Workspace([root], read_only=True))
    async with connect(server, mode) as client:
        await check_fn(Env.make(client, root, tmp_path, check_id(check_fn)))


@pytest.mark.usefixtures("no_temps_left")
async def test_in_memory_too_large(mode: str, root: Path, tmp_path: Path) -> None:
    """Limits are errors that say what to do, and the oversized change is not made."""
    limits = Limits(max_write_bytes=64, max_read_bytes=64)
    server = create_server(Workspace([root], limits=limits))
    async with connect(server, mode) as client:
        env = Env.make(client, root, tmp_path, "too_large")
        before = snapshot(tmp_path)
        await env.error(
            "write_file",
            {"path": env.p("big.txt"), "content": "x" * 65},
            "65 bytes",
            "64-byte limit",
        )
        assert snapshot(tmp_path) == before
        out = await env.ok(
            "write_file", {"path": env.p("ok.txt"), "content": "x" * 64}, WriteOutput
        )
        assert out["size"] == 64

        env.f("large.txt").write_bytes(b"line\n" * 40)
        await env.error("read_text_file", {"path": env.p("large.txt")}, "64-byte limit", "head")
        await env.error("read_media_file", {"path": env.p("large.txt")}, "64-byte limit")
        head = await env.ok(
            "read_text_file", {"path": env.p("large.txt"), "head": 2}, ReadTextOutput
        )
        assert head["content"] == "line\nline\n"
        many = await env.ok(
            "read_multiple_files",
            {"paths": [env.p("ok.txt"), env.p("large.txt")]},
            ReadMultipleOutput,
        )
        assert many["files"][0]["content"] == "x" * 64
        assert many["files"][1]["content"] is None
        assert "64-byte limit" in many["files"][1]["error"]


async def run_over_stdio(
    root: Path, tmp_path: Path, mode: str, checks: list[Check], *extra: str
) -> None:
    """Run every check in one stdio session; collect failures so one does not hide the rest."""
    failures: list[str] = []
    async with connect(stdio_params(root, *extra), mode) as client:
        for check_fn in checks:
            env = Env.make(client, root, tmp_path, check_id(check_fn))
            try:
                await check_fn(env)
            except AssertionError as err:
                failures.append(f"{check_id(check_fn)}: {err}")
        await env.alive()
    assert not failures, "\n\n".join(failures)


@pytest.mark.usefixtures("no_temps_left")
async def test_stdio_every_tool(mode: str, root: Path, tmp_path: Path) -> None:
    """One real server subprocess per mode serves every check in one session."""
    await run_over_stdio(root, tmp_path, mode, CHECKS)


@pytest.mark.usefixtures("no_temps_left")
async def test_stdio_read_only(mode: str, root: Path, tmp_path: Path) -> None:
    """``serve --read-only`` refuses every change over the real transport."""
    await run_over_stdio(root, tmp_path, mode, READ_ONLY_CHECKS, "--read-only")
