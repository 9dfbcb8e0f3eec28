"""Engine messages speak Python; the MCP tools and the command line each speak their own names.

The engine says ``expected_sha256``; a model calling ``write_file`` must read ``expectedSha256``
(what it can send), and a shell user of ``atomictools write`` must read ``--expected-sha256``.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from atomictools import PreconditionFailedError, Workspace
from atomictools.server.wording import MCP_TERMS, for_client

pytestmark = pytest.mark.anyio


async def test_the_engine_names_python_parameters(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("v1\n")
    ws = Workspace([tmp_path], state_dir=tmp_path / ".state")
    with pytest.raises(PreconditionFailedError) as caught:
        await ws.write("a.txt", "v2\n", expected_sha256="0" * 64)
    assert "expected_sha256" in str(caught.value)
    assert "expectedSha256" not in str(caught.value)


def test_every_engine_term_becomes_the_tools_term() -> None:
    for engine, mcp in MCP_TERMS.items():
        said = for_client(f"cannot do it: {engine} is wrong; nothing was changed")
        assert said == f"cannot do it: {mcp} is wrong; nothing was changed"


def test_words_that_merely_contain_a_term_are_left_alone() -> None:
    text = "my_expected_sha256_x and create_only_not and Database.query_plan stay"
    assert for_client(text) == text


def test_the_command_line_names_its_options(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("v1\n")
    wrong = hashlib.sha256(b"other").hexdigest()
    done = subprocess.run(
        [sys.executable, "-m", "atomictools", "write", str(target), "--expected-sha256", wrong],
        input="v2\n",
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--expected-sha256" in done.stderr, done.stderr
    assert "expected_sha256" not in done.stderr
    assert target.read_text() == "v1\n"
