"""The crash-and-recover matrix: a crash at every named step of a change set, then every way a
person or a server may come to recover it.

A real child process applies a known change set with state directory A and dies at the step
(``os._exit``). Then one of:

- ``right``: ``atomictools recover --state-dir A`` (the server's own);
- ``other``: ``atomictools recover --state-dir B`` first (a person who forgot the flag), then A;
- ``restart``: the server restarted on another state directory B (its start-up recovery and
  background sweep), then ``recover --state-dir A``;
- a damaged record in A (empty, truncated, one byte flipped, garbage, a directory, a symlink,
  unreadable by the user who recovers): ``recover`` with A, then ``--forward``.

Invariants, for every cell: no file of the set (staged file, backup, claim) is deleted by a run
that has not read its journal; the tree is never left torn once the right recovery ran (wholly
old before the commit point, wholly new after it); exit codes are 0 (clean), 1 (fixed), 2 (a
person is needed) as documented. The summary at the end of the run counts the cells.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from mcp import Client

from atomictools import Workspace
from atomictools.server import ServerOptions, create_server
from tests.changeset_child import install, scenario, snapshot
from tests.conftest import SummaryReport, summary_report, temp_files
from tests.test_recovery import (
    CRASH_SCENARIOS,
    backdate,
    committed,
    corrupt,
    crash_child,
    crash_steps,
    records,
    tree_with_ours,
)

NOBODY = 65534
CORRUPTIONS = ["empty", "truncated", "bit-flip", "garbage", "directory", "symlink", "unreadable"]
MODES = ["right", "other", "restart", *CORRUPTIONS]
SCENARIOS = ["no-mkdir", "mixed"]
CELLS = [
    (name, step, mode)
    for name in SCENARIOS
    for step in crash_steps(CRASH_SCENARIOS[name])
    for mode in MODES
    if mode not in CORRUPTIONS or (committed(step) and step != "changeset.finished")
]
tally: Counter[str] = Counter()


@pytest.fixture(scope="module")
def report(pytestconfig: pytest.Config) -> Iterator[SummaryReport]:
    summary = summary_report(pytestconfig, "crash-and-recover matrix")
    yield summary
    for outcome, count in sorted(tally.items()):
        summary.add(f"{outcome}: {count}")


def recover_cli(
    root: Path, state: Path, *flags: str, user: int | None = None
) -> tuple[int, dict[str, object]]:
    """``atomictools recover --json`` in a new process (as ``user``: imports first, as root)."""
    drop = f"os.setgroups([]); os.setgid({user}); os.setuid({user})\n" if user is not None else ""
    code = (
        "import os, sys\n"
        "import atomictools.cli.commands, atomictools.engine.changes.recovery\n"
        "import atomictools.engine.changes.sweep\n"
        f"{drop}sys.exit(atomictools.cli.commands.main(sys.argv[1:]))\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "recover",
            str(root),
            "--state-dir",
            str(state),
            "--json",
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout)


def restart_server(root: Path, state: Path) -> None:
    """The real server's start on ``state``: recovery, then the background sweep."""

    async def serve() -> None:
        ws = Workspace([root], state_dir=state)
        options = ServerOptions(sweep_delay=0.0)
        async with Client(create_server(ws, options), mode="legacy") as client:
            listed = await client.call_tool("list_allowed_directories", {})
            assert not listed.is_error
            await anyio.sleep(0.3)  # the sweep of this small tree is done by now

    anyio.run(serve)


@pytest.fixture
def place(tmp_path: Path) -> Iterator[Path]:
    """Where the cell's root and state directories live (reachable by nobody when root)."""
    if os.geteuid() == 0:
        base = Path(tempfile.mkdtemp(prefix="atomictools-matrix-"))
        base.chmod(0o755)
        yield base
        shutil.rmtree(base, ignore_errors=True)
    else:
        yield tmp_path


@pytest.mark.parametrize(("name", "step", "mode"), CELLS)
@pytest.mark.usefixtures("report")
def test_matrix(place: Path, name: str, step: str, mode: str) -> None:
    if mode == "unreadable" and os.geteuid() != 0:
        pytest.skip("an unreadable record needs a user other than its owner (run as root)")
    root, state_a, state_b = place / "root", place / "state-a", place / "state-b"
    root.mkdir()
    case = scenario(name, [root])
    install(root, case.old[0])
    crash_child(name, [root], state_a, step)
    backdate(*temp_files(root))  # past every grace period: only the journal protects them
    old, new = case.old[0], case.new[0]
    expected = new if committed(step) else old
    in_flight = records(state_a) != []  # a record in A: a committed or preparing set
    before = tree_with_ours(root)

    if mode == "right":
        code, _ = recover_cli(root, state_a)
        assert code == (0 if step == "changeset.finished" else 1)
    elif mode in ("other", "restart"):
        if mode == "other":
            code, found = recover_cli(root, state_b)
            assert code == 2 if in_flight else code in (0, 1), found
        else:
            restart_server(root, state_b)
        if in_flight:
            assert tree_with_ours(root) == before, "a run without the journal deleted files"
        code, _ = recover_cli(root, state_a)
        assert code in (0, 1)
    else:
        [record] = records(state_a)
        if mode == "unreadable":
            record.chmod(0o000)
            for path in [root, *root.rglob("*")]:
                os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
            code, found = recover_cli(root, state_a, user=NOBODY)
            record.chmod(0o600)
        else:
            corrupt(mode, record)
            code, found = recover_cli(root, state_a)
        assert code == 2, found
        assert tree_with_ours(root) == before, "an untrusted record led to deleting files"
        if name != "no-mkdir":
            tally[f"{mode}: kept for a person"] += 1
            return  # moves and directories need the journal: the files stay for a person
        code, found = recover_cli(root, state_a, "--forward")
        assert code == 1, found
        expected = new
    state = snapshot(root)
    assert state == expected, f"{name} {step} {mode}: torn: {state}"
    assert temp_files(place) == []
    tally[f"{mode}: {'new' if expected == new else 'old'}"] += 1
