"""The command line, run as a real subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import temp_files


def run_cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "atomictools", *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
    )


def test_write_from_stdin_replaces_atomically(tmp_path: Path) -> None:
    target = tmp_path / "config.json"
    target.write_text("old")
    target.chmod(0o600)
    done = run_cli("write", str(target), stdin=b'{"new": true}\n')
    assert done.returncode == 0, done.stderr
    assert target.read_bytes() == b'{"new": true}\n'
    assert target.stat().st_mode & 0o777 == 0o600
    assert done.stdout == b""  # stdout stays clean for pipelines
    assert b"sha256" in done.stderr


def test_create_only_refusal_is_a_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "exists.txt"
    target.write_text("keep")
    done = run_cli("write", "--create-only", str(target), stdin=b"clobber")
    assert done.returncode == 2
    assert b"already exists" in done.stderr
    assert b"nothing was changed" in done.stderr
    assert b"Traceback" not in done.stderr
    assert target.read_text() == "keep"
    assert temp_files(tmp_path) == []


def test_version() -> None:
    done = run_cli("--version")
    assert done.returncode == 0
    assert done.stdout.startswith(b"atomictools ")
