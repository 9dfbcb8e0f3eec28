"""The README's commands and code are the real thing: each is run or parsed here."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from atomictools.cli.commands import _build_parser

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
    [block] = blocks("json")
    entry = json.loads(block)["mcpServers"]["atomictools"]
    assert entry["args"][:2] == ["serve", "--root"]
    assert Path(entry["command"]).name == "atomictools"


def test_the_embedding_example_runs(tmp_path: Path) -> None:
    [example] = blocks("python")
    code = example.replace('"/srv/project"', repr(str(tmp_path)))
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "changed since it was read" in done.stdout  # the stale write was refused
    assert (tmp_path / "docs" / "notes.txt").read_bytes() == b"hello, world\r\n"  # CRLF kept
    assert (tmp_path / "docs" / "new.md").read_text() == "# hi\n"


@pytest.mark.parametrize("link", re.findall(r"\]\((docs/[^)]+)\)", TEXT))
def test_linked_docs_exist(link: str) -> None:
    assert (README.parent / link.split("#", maxsplit=1)[0]).is_file()
