"""The README's commands and code are the real thing: each is run or parsed here."""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from mcp import Client

from atomictools import Workspace
from atomictools.cli.commands import _build_parser
from atomictools.server import create_server

README = Path(__file__).parents[1] / "README.md"
TEXT = README.read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", TEXT, flags=re.DOTALL)


def test_every_atomictools_command_in_a_bash_block_parses() -> None:
    commands = [
        line.split("&&")[-1].strip()
        for block in blocks("bash")
        for line in block.splitlines()
        if "atomictools " in line
    ]
    assert len(commands) >= 4, commands
    for command in commands:
        words = shlex.split(command, comments=True)
        program = words.index(next(w for w in words if w.endswith("atomictools")))
        _build_parser().parse_args(words[program + 1 :])  # SystemExit on a wrong flag


def test_the_host_config_block_has_the_shape_config_prints() -> None:
    [block] = [b for b in blocks("json") if "mcpServers" in b]
    entry = json.loads(block)["mcpServers"]["atomictools"]
    assert entry["args"][:2] == ["serve", "--root"]
    assert Path(entry["command"]).name == "atomictools"


def run_example(example: str, root: Path) -> subprocess.CompletedProcess[str]:
    code = example.replace('"/srv/project"', repr(str(root)))
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_the_embedding_example_runs(tmp_path: Path) -> None:
    [example] = [b for b in blocks("python") if "PreconditionFailedError" in b]
    done = run_example(example, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "changed since it was read" in done.stdout  # the stale write was refused
    assert (tmp_path / "docs" / "notes.txt").read_bytes() == b"hello, world\r\n"  # CRLF kept
    assert (tmp_path / "docs" / "new.md").read_text() == "# hi\n"


@pytest.mark.parametrize("link", re.findall(r"\]\((docs/[^)]+)\)", TEXT))
def test_linked_docs_exist(link: str) -> None:
    assert (README.parent / link.split("#", maxsplit=1)[0]).is_file()


def test_the_history_example_takes_the_change_set_back(tmp_path: Path) -> None:
    [example] = [b for b in blocks("python") if "ws.undo(" in b]
    done = run_example(example, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "apply_changes [('config.py', 1, 1), ('scratch.txt', 1, 0)]" in done.stdout
    assert "-TIMEOUT = 0\n+TIMEOUT = 30\n" in done.stdout  # the dry run's diff
    assert "undid (" in done.stdout
    assert (tmp_path / "config.py").read_text() == "TIMEOUT = 30\n"
    assert not (tmp_path / "scratch.txt").exists()


@pytest.mark.anyio
async def test_the_mcp_undo_call_works_as_written(tmp_path: Path) -> None:
    [block] = [b for b in blocks("json") if "tools/call" in b and "undo_change" in b]
    request = json.loads(block)
    assert request["method"] == "tools/call"
    params = request["params"]
    workspace = Workspace([tmp_path])
    await workspace.write("a.txt", "before\n")
    await workspace.write("a.txt", "after\n")
    async with Client(create_server(workspace), mode="legacy") as client:
        result = await client.call_tool(params["name"], params["arguments"])
    assert not result.is_error, result
    assert result.structured_content is not None
    assert result.structured_content["applied"] is False  # the dry run the README promises
    assert "-after\n+before\n" in result.structured_content["paths"][0]["diff"]
    assert (tmp_path / "a.txt").read_text() == "after\n"


def test_the_mixed_change_example_commits_files_and_rows(tmp_path: Path) -> None:
    [example] = [b for b in blocks("python") if "cs.sql(" in b]
    done = run_example(example, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "['write', 'sql'] (StatementResult(rowcount=1, lastrowid=1),)" in done.stdout
    assert (tmp_path / "config.toml").read_text() == "timeout = 30\n"
    with contextlib.closing(sqlite3.connect(tmp_path / "app.db")) as conn:
        assert conn.execute("SELECT * FROM settings").fetchall() == [("timeout", "30")]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the database tools need asyncio
async def test_the_mixed_apply_changes_arguments_work_as_written(tmp_path: Path) -> None:
    [block] = [b for b in blocks("json") if '"op": "sql"' in b]
    arguments = json.loads(block)
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "models.py").write_text("FIELDS = ['name']\n")
    database = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(database)) as conn, conn:
        conn.execute("CREATE TABLE users (name TEXT)")
        conn.execute("CREATE TABLE migrations (name TEXT)")
    server = create_server(Workspace([tmp_path]), databases={"app": database})
    async with Client(server, mode="legacy") as client:
        result = await client.call_tool("apply_changes", arguments)
    assert not result.is_error, result
    assert (tmp_path / "app" / "models.py").read_text() == "FIELDS = ['name', 'email']\n"
    assert (tmp_path / "migrations" / "0002_email.sql").exists()
    with contextlib.closing(sqlite3.connect(database)) as conn:
        assert conn.execute("SELECT name FROM migrations").fetchall() == [("0002_email",)]
        assert "email" in [row[1] for row in conn.execute("PRAGMA table_info(users)")]
