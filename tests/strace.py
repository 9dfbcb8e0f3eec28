"""Whether the fault-injection tests can fail system calls for real (``strace -e inject=``),
probed once per test session and shared by every test module that needs it."""

from __future__ import annotations

import shutil
import subprocess

import pytest

STRACE = shutil.which("strace")


def _strace_problem() -> str | None:
    if STRACE is None:
        return "strace is not installed (.ci/run installs it; apt-get install strace)"
    probe = subprocess.run(
        [STRACE, "-f", "-qq", "-e", "trace=getpid", "-e", "inject=getpid:error=EIO", "true"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if probe.returncode != 0:
        return f"strace cannot trace here ({probe.stderr.strip()[:200]})"
    return None


STRACE_PROBLEM = _strace_problem()
needs_strace = pytest.mark.skipif(STRACE_PROBLEM is not None, reason=STRACE_PROBLEM or "")
