"""Change sets recovery must leave alone, and a server that keeps serving around them.

Regression tests for issue 11:

- defect 1: a sweep run with another state directory (``recover`` without the server's
  ``--state-dir``, or a server restarted on its default state directory) deleted the staged
  files and backups of a committed set and tore it for good;
- defect 3: odd state (a directory named like a record, a record of the wrong shape, an error
  while rolling forward) crashed ``recover`` with a traceback and killed ``serve`` at start;
- defect 4: after a failure past the commit point, the running server refused the set's paths
  until a restart, even once ``atomictools recover`` had finished the set.

The crashes are real: a child process dies at a named step (``os._exit`` or SIGKILL).
"""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from atomictools import RecoveryNeededError, Workspace
from atomictools.engine.changes import journaled as journal_module
from atomictools.engine.changes.record import encode_body
from atomictools.engine.durable.steps import CRASH_SIGNAL_ENV
from atomictools.server import ServerOptions, create_server
from tests.changeset_child import snapshot
from tests.conftest import temp_files
from tests.test_recovery import (
    backdate,
    crash_child,
    installed,
    records,
    run_cli,
    run_recovery,
    tree_with_ours,
)

COMMITTED_STEPS = ["changeset.committed", "changeset.apply:2", "changeset.apply:4"]
UNCOMMITTED_STEPS = ["changeset.prepare:2", "changeset.prepared"]


def crashed_in(
    tmp_path: Path, state: Path, step: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, Any]:
    """A root on which a process with state directory ``state`` was SIGKILLed at ``step``."""
    root, case = installed(tmp_path)
    monkeypatch.setenv(CRASH_SIGNAL_ENV, "KILL")
    crash_child("no-mkdir", [root], state, step, expect=-signal.SIGKILL)
    monkeypatch.delenv(CRASH_SIGNAL_ENV)
    backdate(*temp_files(root))  # past any grace period: only the journal protects them
    return root, case


@pytest.mark.parametrize("step", COMMITTED_STEPS)
def test_recover_with_another_state_dir_keeps_a_committed_set_and_says_where(
    tmp_path: Path, step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    state_a, state_b = tmp_path / "state-a", tmp_path / "state-b"
    root, case = crashed_in(tmp_path, state_a, step, monkeypatch)
    before = tree_with_ours(root)

    done = run_cli(root, "--state-dir", state_b)

    assert done.returncode == 2, done.stdout + done.stderr
    assert tree_with_ours(root) == before, "a sweep without the journal deleted files of the set"
    assert "needs a person" in done.stdout
    assert f"its journal is in {state_a}" in done.stdout
    assert f"atomictools recover --state-dir {state_a} {root}" in done.stdout
    assert "Traceback" not in done.stderr
    # The right state directory finishes it.
    done = run_cli(root, "--state-dir", state_a)
    assert done.returncode == 1, done.stdout + done.stderr
    assert snapshot(root) == case.new[0]
    assert temp_files(tmp_path) == []
    assert records(state_a) == []
    assert run_cli(root, "--state-dir", state_b).returncode == 0


@pytest.mark.parametrize("step", UNCOMMITTED_STEPS)
def test_recover_with_another_state_dir_removes_an_uncommitted_set(
    tmp_path: Path, step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim says where the journal lives; that directory is readable and holds no record
    of the set, so the set never committed: its files are orphans even for another state dir."""
    state_a, state_b = tmp_path / "state-a", tmp_path / "state-b"
    root, case = crashed_in(tmp_path, state_a, step, monkeypatch)

    done = run_cli(root, "--state-dir", state_b, "--json")

    assert done.returncode == 1, done.stdout + done.stderr
    assert json.loads(done.stdout)["problems"] == []
    assert snapshot(root) == case.old[0]
    assert temp_files(tmp_path) == []


def test_files_without_a_claim_are_never_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state_a, state_b = tmp_path / "state-a", tmp_path / "state-b"
    root, _case = crashed_in(tmp_path, state_a, "changeset.apply:2", monkeypatch)
    [claim] = [p for p in temp_files(root) if p.is_symlink() and ".journal." in p.name]
    claim.unlink()
    before = tree_with_ours(root)

    report = run_recovery([root], state_b)

    assert tree_with_ours(root) == before
    assert report.exit_code == 2
    assert "no claim" in report.problems[0]


def test_server_restart_on_another_state_dir_serves_around_the_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain restart (default state directory): the set's files stay, its paths are refused
    with what to run, other paths are served; once the right recovery ran (another process),
    the running server notices and serves those paths again."""
    state_a, state_b = tmp_path / "state-a", tmp_path / "state-b"
    root, case = crashed_in(tmp_path, state_a, "changeset.apply:2", monkeypatch)
    before = tree_with_ours(root)

    async def scenario_run() -> None:
        options = ServerOptions(sweep_delay=0.0, retry_interval=0.2)
        ws = Workspace([root], state_dir=state_b)
        async with Client(create_server(ws, options), mode="legacy") as client:
            for _ in range(100):  # the background sweep reports the set
                if ws.unfinished:
                    break
                await anyio.sleep(0.05)
            refused = await client.call_tool("write_file", {"path": "b.txt", "content": "x"})
            assert refused.is_error
            text = refused.content[0].text  # type: ignore[union-attr]
            assert "b.txt is part of change set" in text
            assert f"--state-dir {state_a}" in text
            assert "nothing was changed" in text
            other = await client.call_tool("write_file", {"path": "other.txt", "content": "ok"})
            assert not other.is_error
            assert tree_with_ours(root) == {**before, "other.txt": b"ok"}

            done = await anyio.to_thread.run_sync(
                lambda: run_cli(root, "--state-dir", state_a).returncode
            )
            assert done == 1
            for _ in range(100):  # the retry loop notices
                if not ws.unfinished:
                    break
                await anyio.sleep(0.05)
            again = await client.call_tool("write_file", {"path": "b.txt", "content": "mine"})
            assert not again.is_error, again.content

    anyio.run(scenario_run)
    assert snapshot(root) == {**case.new[0], "other.txt": b"ok", "b.txt": b"mine"}
    assert temp_files(tmp_path) == []


# -- odd state in the journal directory (defect 3) ----------------------------------------------


def odd_journal_dir(state: Path, root: Path) -> None:
    """A directory and a symlink named like records, and a record of the wrong shape."""
    journals = state / "journals"
    journals.mkdir(parents=True, exist_ok=True)
    (journals / "20000101T000000-aaaaaaaaaaaa.journal.json").mkdir()
    (journals / "20000101T000000-bbbbbbbbbbbb.journal.json").symlink_to(root / "nowhere")
    (journals / "20000101T000000-cccccccccccc.journal.json").write_bytes(
        encode_body({"version": 2, "state": "committed", "ops": "not a list"})
    )


def test_odd_records_are_reported_and_the_others_recovered(
    tmp_path: Path, private_state_dir: Path
) -> None:
    root, case = installed(tmp_path)
    crash_child("no-mkdir", [root], private_state_dir, "changeset.apply:3")
    odd_journal_dir(private_state_dir, root)

    done = run_cli(root, "--state-dir", private_state_dir, "--json")

    assert "Traceback" not in done.stderr
    assert done.returncode == 2, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert len(report["rolledForward"]) == 1  # the sound record is finished anyway
    assert snapshot(root) == case.new[0]
    reasons = " ".join(u["reason"] for u in report["unfinished"])
    assert "it is a directory" in reasons
    assert "it is a symbolic link" in reasons
    assert "ops or created_dirs is missing or not a list" in reasons
    assert len(report["unfinished"]) == 3
    assert (private_state_dir / "journals" / "20000101T000000-aaaaaaaaaaaa.journal.json").is_dir()


def test_server_starts_despite_odd_state(tmp_path: Path, private_state_dir: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    odd_journal_dir(private_state_dir, root)

    async def serve() -> None:
        async with Client(create_server(Workspace([root])), mode="legacy") as client:
            result = await client.call_tool("write_file", {"path": "a.txt", "content": "a"})
            assert not result.is_error

    anyio.run(serve)
    assert (root / "a.txt").read_text() == "a"


def test_an_error_while_rolling_forward_keeps_the_record_and_the_rest_goes_on(
    tmp_path: Path, private_state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO on one rename of one set: that set stays (record and files) for the next run, and
    the report says so; the CLI exits 2 instead of a traceback with exit 1."""
    root, case = installed(tmp_path)
    crash_child("no-mkdir", [root], private_state_dir, "changeset.committed")
    real_replace = os.replace
    calls = 0

    def failing_replace(*args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(errno.EIO, "Input/output error")
        real_replace(*args, **kwargs)

    monkeypatch.setattr("atomictools.engine.changes.recovery.os.replace", failing_replace)
    report = run_recovery([root], private_state_dir)
    monkeypatch.undo()

    assert report.exit_code == 2
    [unfinished] = report.unfinished.values()
    assert "Input/output error" in unfinished.reason
    assert "running recovery again" in unfinished.reason
    assert len(records(private_state_dir)) == 1
    again = run_recovery([root], private_state_dir)
    assert again.exit_code == 1
    assert snapshot(root) == case.new[0]
    assert temp_files(tmp_path) == []


# -- a failure past the commit point, in a running server (defect 4) ---------------------------


def failing_apply(monkeypatch: pytest.MonkeyPatch, fail_on: int) -> None:
    """The ``fail_on``-th rename of the next change set fails with EIO (a disk error that
    cannot be produced at exactly that rename otherwise)."""
    real = journal_module._apply_op
    calls = 0

    def apply_op(planned: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == fail_on:
            raise OSError(errno.EIO, "Input/output error")
        real(planned)

    monkeypatch.setattr(journal_module, "_apply_op", apply_op)


async def test_next_call_finishes_a_set_that_failed_past_its_commit_point(
    tmp_path: Path, anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, case = installed(tmp_path)
    ws = Workspace([root])
    failing_apply(monkeypatch, fail_on=2)
    with pytest.raises(RecoveryNeededError) as excinfo:
        await ws.apply_changes(case.changes)
    monkeypatch.undo()
    assert "committed but applying it failed" in str(excinfo.value)
    assert [u.txid for u in ws.unfinished]

    # The next call that touches the set's files finishes it first, then goes on.
    result = await ws.write("b.txt", "after\n")
    assert result.size == len("after\n")
    assert ws.unfinished == []
    assert snapshot(root) == {**case.new[0], "b.txt": b"after\n"}
    assert temp_files(tmp_path) == []


async def test_running_server_notices_another_process_finished_the_set(
    tmp_path: Path, anyio_backend: str, monkeypatch: pytest.MonkeyPatch, private_state_dir: Path
) -> None:
    root, case = installed(tmp_path)
    ws = Workspace([root])
    failing_apply(monkeypatch, fail_on=3)
    with pytest.raises(RecoveryNeededError):
        await ws.apply_changes(case.changes)
    monkeypatch.undo()

    done = await anyio.to_thread.run_sync(
        lambda: run_cli(root, "--state-dir", private_state_dir).returncode
    )
    assert done == 1
    assert snapshot(root) == case.new[0]
    [txid] = [u.txid for u in ws.unfinished]
    assert await ws.finish_unfinished() == [txid]
    assert ws.unfinished == []
    await ws.write("fresh.txt", "again\n")
    assert (root / "fresh.txt").read_text() == "again\n"
