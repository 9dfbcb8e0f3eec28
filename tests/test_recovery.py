"""Crash recovery: journals rolled forward or back, orphaned temps swept, and nothing else touched.

A real child process (``tests/changeset_child.py``) applies a known change set and dies at a
named crash point (``ATOMICTOOLS_TEST_CRASH_AT``, exit 137); recovery must then leave the tree
wholly old (crash before the commit point) or wholly new (at or after it), with no temp file
and no journal record left. The sweep's safety rules are tested with live and dead lock
holders, look-alike names, symlinks and records of other roots; the ``atomictools recover``
command line is run as a real process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest
from mcp import Client

from atomictools import Workspace
from atomictools.engine.changes.record import RECORD_SUFFIX, decode, encode_body
from atomictools.engine.changes.recovery_report import RecoveryReport
from atomictools.engine.changes.sweep import sweep_temps
from atomictools.engine.durable.steps import CRASH_ENV, CRASH_EXIT_CODE
from atomictools.server import ServerOptions, create_server
from tests.changeset_child import Scenario, Tree, install, scenario, snapshot
from tests.conftest import temp_files

CHILD = Path(__file__).with_name("changeset_child.py")
OLD_MTIME = time.time() - 3600  # well past the sweep's grace period
TOKEN = "0123456789ab"


# -- helpers ------------------------------------------------------------------------------------


def installed(tmp_path: Path, name: str = "no-mkdir") -> tuple[Path, Scenario]:
    """``tmp_path/root`` holding the old tree of scenario ``name``."""
    root = tmp_path / "root"
    root.mkdir()
    case = scenario(name, [root])
    install(root, case.old[0])
    return root, case


def child_env(state: Path, crash_at: str | None = None) -> dict[str, str]:
    env = {**os.environ, "ATOMICTOOLS_STATE_DIR": str(state)}
    env.pop(CRASH_ENV, None)
    if crash_at is not None:
        env[CRASH_ENV] = crash_at
    return env


def crash_child(
    name: str, roots: list[Path], state: Path, crash_at: str, *, expect: int = CRASH_EXIT_CODE
) -> None:
    """Run the child on scenario ``name`` and check it died at ``crash_at`` (``expect``: its
    exit status, ``-SIGKILL`` when ``ATOMICTOOLS_TEST_CRASH_SIGNAL=KILL``)."""
    done = subprocess.run(
        [sys.executable, str(CHILD), "apply", name, *map(str, roots)],
        env=child_env(state, crash_at),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == expect, (done.returncode, done.stderr)
    assert "done" not in done.stdout


@contextmanager
def live_child(
    *args: str, state: Path | None = None
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A child that prints one line (returned) and then sleeps; SIGKILLed at the end."""
    env = child_env(state) if state is not None else None
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line, proc.stderr.read() if proc.stderr else "the child printed nothing"
        yield proc, line
    finally:
        kill(proc)


def kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    probe = subprocess.Popen([sys.executable, "-c", "pass"])
    probe.wait()
    return probe.pid


def run_recovery(
    roots: list[Path],
    state: Path,
    *,
    rollback: bool = False,
    forward: bool = False,
    dry_run: bool = False,
) -> RecoveryReport:
    ws = Workspace(roots, state_dir=state)
    return ws.recover(rollback=rollback, forward=forward, dry_run=dry_run)


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "atomictools", "recover", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def records(state: Path) -> list[Path]:
    directory = state / "journals"
    return sorted(directory.iterdir()) if directory.exists() else []


def backdate(*paths: Path) -> None:
    for path in paths:
        os.utime(path, (OLD_MTIME, OLD_MTIME), follow_symlinks=False)


def describe(state: Tree, old: Tree, new: Tree) -> str:
    keys = sorted(set(state) | set(old) | set(new))
    return "\n".join(
        f"{k}: now {state.get(k)!r:.40} old {old.get(k)!r:.40} new {new.get(k)!r:.40}"
        for k in keys
        if not (state.get(k) == old.get(k) == new.get(k))
    )


# -- deterministic crash points -------------------------------------------------------------------


def crash_steps(n: int) -> list[str]:
    """Every crash point of a change set of ``n`` changes, in protocol order."""
    return [
        *(f"changeset.prepare:{i}" for i in range(1, n + 1)),
        "changeset.chunk",  # the first chunk of the first staged content
        "changeset.prepared",
        "changeset.committed",
        *(f"changeset.apply:{i}" for i in range(1, n + 1)),
        "changeset.applied",
        "changeset.finished",
    ]


BEFORE_COMMIT = ("changeset.prepare", "changeset.chunk", "changeset.prepared")
# scenario -> number of changes (see tests/changeset_child.py)
CRASH_SCENARIOS = {
    "mixed": 7,  # write, edit (CRLF), mkdir -p + write inside, move over, copy, delete
    "mixed-mkdir-first": 7,  # the same, the mkdir first
    "no-mkdir": 4,  # write, edit, write of a new file, delete
    "fresh-then-mkdir": 3,  # a new file, then a mkdir, then a file inside it
}
CRASH_CASES = [(name, step) for name, n in CRASH_SCENARIOS.items() for step in crash_steps(n)]


def committed(step: str) -> bool:
    return not step.startswith(BEFORE_COMMIT)


@pytest.mark.parametrize(("name", "step"), CRASH_CASES)
def test_crash_then_recover_is_wholly_old_or_new(
    tmp_path: Path, private_state_dir: Path, name: str, step: str
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    case = scenario(name, [root])
    install(root, case.old[0])
    crash_child(name, [root], private_state_dir, step)

    report = run_recovery([root], private_state_dir)

    expected = case.new[0] if committed(step) else case.old[0]
    state = snapshot(root)
    assert state == expected, f"after a crash at {step} and recovery:\n" + describe(
        state, case.old[0], case.new[0]
    )
    assert temp_files(tmp_path) == []
    assert records(private_state_dir) == []
    assert report.problems == []
    assert report.live == []
    assert report.exit_code == (0 if step == "changeset.finished" else 1)
    if committed(step) and step != "changeset.finished":
        assert len(report.rolled_forward) == 1
        assert report.rolled_back == []
    else:
        assert report.rolled_forward == []
    # Idempotent: a second run finds nothing to do and changes nothing.
    again = run_recovery([root], private_state_dir)
    assert again.exit_code == 0, again.as_dict()
    assert snapshot(root) == expected


ROLLBACK_CASES = [
    (name, step)
    for name in ("mixed", "no-mkdir")
    for step in crash_steps(CRASH_SCENARIOS[name])
    if committed(step) and step != "changeset.finished"  # finished: no record left to undo
]


@pytest.mark.parametrize(("name", "step"), ROLLBACK_CASES)
def test_crash_after_commit_then_cli_rollback_is_wholly_old(
    tmp_path: Path, private_state_dir: Path, name: str, step: str
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    case = scenario(name, [root])
    install(root, case.old[0])
    crash_child(name, [root], private_state_dir, step)

    done = run_cli(root, "--state-dir", private_state_dir, "--rollback", "--json")

    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert len(report["rolledBack"]) == 1
    assert report["rolledForward"] == []
    assert report["problems"] == []
    state = snapshot(root)
    assert state == case.old[0], f"after a crash at {step} and --rollback:\n" + describe(
        state, case.old[0], case.new[0]
    )
    assert temp_files(tmp_path) == []
    assert records(private_state_dir) == []
    again = run_recovery([root], private_state_dir, rollback=True)
    assert again.exit_code == 0
    assert snapshot(root) == case.old[0]


def test_roll_forward_never_overwrites_a_file_replaced_after_the_crash(
    tmp_path: Path, private_state_dir: Path
) -> None:
    """Another server on the same root may change a file of a dead change set before recovery
    runs: its update must survive (no lost update), and the conflict is reported."""
    root, case = installed(tmp_path)
    crash_child("no-mkdir", [root], private_state_dir, "changeset.committed")
    newer = root / "a.txt.newer"
    newer.write_bytes(b"alpha, written by another process after the crash\n")
    newer.replace(root / "a.txt")  # an atomic replace, as another server would make it
    (root / "fresh.txt").write_bytes(b"fresh, created by someone else\n")

    report = run_recovery([root], private_state_dir)

    state = snapshot(root)
    assert state["a.txt"] == b"alpha, written by another process after the crash\n"
    assert state["fresh.txt"] == b"fresh, created by someone else\n"
    assert state["b.txt"] == case.new[0]["b.txt"]  # the rest of the set is finished
    assert "gone.txt" not in state
    assert len(report.problems) == 2, report.problems
    assert all("replaced by someone else since the crash" in p for p in report.problems)
    assert report.exit_code == 2
    assert temp_files(tmp_path) == []
    assert records(private_state_dir) == []


# -- the sweep: what it may and may not remove ----------------------------------------------------


def test_temp_locked_by_a_live_process_is_kept_until_it_dies(
    tmp_path: Path, private_state_dir: Path
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "target.txt").write_bytes(b"target\n")
    with live_child("temp", str(root), "target.txt") as (proc, name):
        temp = root / name
        assert temp.exists()
        assert name.split(".")[-3] == str(proc.pid)
        backdate(temp)  # past the grace period: only the lock protects it now
        report = run_recovery([root], private_state_dir)
        assert temp.exists(), "the sweep removed a temp a live process holds"
        assert report.removed == []
        assert report.exit_code == 0
    # SIGKILLed: the kernel dropped the lock.
    backdate(temp)
    report = run_recovery([root], private_state_dir)
    assert not temp.exists()
    assert report.removed == [name]
    assert report.exit_code == 1
    assert (root / "target.txt").read_bytes() == b"target\n"


def test_young_unlocked_temp_of_a_live_pid_is_in_its_grace_period(
    tmp_path: Path, private_state_dir: Path
) -> None:
    """Between creating a temp and locking it, a writer's temp is unlocked: a young temp of a
    live pid is left alone; an old one, or one of a dead pid, is an orphan."""
    root = tmp_path / "root"
    root.mkdir()
    mine = root / f".a.txt.{os.getpid()}.{TOKEN}.atomictmp"
    dead = root / f".b.txt.{dead_pid()}.{TOKEN}.atomictmp"
    mine.write_bytes(b"being written")
    dead.write_bytes(b"orphan")
    report = run_recovery([root], private_state_dir)
    assert mine.exists()
    assert not dead.exists()
    assert report.removed == [dead.name]
    backdate(mine)
    report = run_recovery([root], private_state_dir)
    assert not mine.exists()
    assert report.removed == [mine.name]


def test_names_that_merely_look_similar_are_never_touched(
    tmp_path: Path, private_state_dir: Path
) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    pid = dead_pid()
    names = [
        ".x.txt.123.abc.atomictmp",  # short token
        f".x.txt.{pid}.{TOKEN[:-1]}.atomictmp",  # 11 hex digits
        f".x.txt.{pid}.{TOKEN}0.atomictmp",  # 13 hex digits
        f".x.txt.{pid}.0123456789AB.atomictmp",  # upper case
        f".x.txt.{pid}.{TOKEN}.atomictmp.bak",  # something after the marker
        f".x.txt.{pid}.{TOKEN}.atomictm",  # marker cut short
        f"x.txt.{pid}.{TOKEN}.atomictmp",  # no leading dot
        f".x.txt.{TOKEN}.atomictmp",  # no pid
        f".x.txt.{pid}x.{TOKEN}.atomictmp",  # pid not a number
        f"..{pid}.{TOKEN}.atomictmp",  # no base name
        "x.atomictmp",
        ".x.tmp",
        ".x.txt.swp",
        "x.txt~",
    ]
    paths = [root / n for n in names] + [root / "sub" / n for n in names]
    for path in paths:
        path.write_bytes(b"not ours\n")
    backdate(*paths)
    # A directory with one of our names is not a file of ours either.
    looks_like_ours = root / f".d.{pid}.{TOKEN}.atomictmp"
    looks_like_ours.mkdir()
    (looks_like_ours / "keep.txt").write_bytes(b"keep\n")
    backdate(looks_like_ours)
    before = snapshot(root)
    report = run_recovery([root], private_state_dir)
    assert snapshot(root) == before
    assert report.removed == []
    assert report.exit_code == 0


def test_matching_symlink_is_not_followed(tmp_path: Path, private_state_dir: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    pid = dead_pid()
    outside = tmp_path / "outside"
    outside.mkdir()
    # Targets that themselves look like orphans of ours: following the link would delete them.
    victim_out = outside / f".o.txt.{pid}.{TOKEN}.atomictmp"
    victim_in = root / "victim.txt"
    victim_out.write_bytes(b"outside victim\n")
    victim_in.write_bytes(b"inside victim\n")
    backdate(victim_out, victim_in)
    link_out = root / f".l.txt.{pid}.{TOKEN}.atomictmp"
    link_in = root / f".m.txt.{pid}.aaaaaaaaaaaa.atomictmp"
    link_out.symlink_to(victim_out)
    link_in.symlink_to("victim.txt")
    backdate(link_out, link_in)
    run_recovery([root], private_state_dir)
    assert victim_out.read_bytes() == b"outside victim\n"
    assert victim_in.read_bytes() == b"inside victim\n"
    assert not victim_out.is_symlink()
    assert not victim_in.is_symlink()


def test_directories_are_not_followed_through_symlinks_out_of_the_root(
    tmp_path: Path, private_state_dir: Path
) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    pid = dead_pid()
    orphan_out = outside / f".f.txt.{pid}.{TOKEN}.atomictmp"
    orphan_in = root / "sub" / f".g.txt.{pid}.{TOKEN}.atomictmp"
    orphan_out.write_bytes(b"outside\n")
    orphan_in.write_bytes(b"inside\n")
    backdate(orphan_out, orphan_in)
    (root / "out-link").symlink_to(outside)
    (root / "sub" / "up-link").symlink_to("../../outside")
    report = run_recovery([root], private_state_dir)
    assert orphan_out.exists(), "the sweep followed a directory symlink out of the root"
    assert not orphan_in.exists()  # the positive control
    assert report.removed == [f"sub/{orphan_in.name}"]


def test_sweep_dry_run_removes_nothing(tmp_path: Path, private_state_dir: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    orphan = root / f".f.txt.{dead_pid()}.{TOKEN}.atomictmp"
    orphan.write_bytes(b"orphan\n")
    backdate(orphan)
    ws = Workspace([root], state_dir=private_state_dir)
    report = sweep_temps(ws.sandbox, journal_dir=ws.journal_dir, dry_run=True)
    assert orphan.exists()
    assert report.removed == [orphan.name]
    assert sweep_temps(ws.sandbox, journal_dir=ws.journal_dir).removed == [orphan.name]
    assert not orphan.exists()


# -- the journal: live, torn, foreign records -----------------------------------------------------


def test_record_of_a_live_writer_is_left_alone(tmp_path: Path, private_state_dir: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    case = scenario("mixed", [root])
    install(root, case.old[0])
    hold = ("hold", "mixed", "changeset.committed", str(root))
    with live_child(*hold, state=private_state_dir) as (_proc, line):
        assert line == "held"
        [record] = records(private_state_dir)
        temps = temp_files(root)
        assert temps  # staged files and backups, all locked by the child
        backdate(*temps)  # past the grace period: only the locks protect them now
        before = snapshot(root)
        record_bytes = record.read_bytes()

        report = run_recovery([root], private_state_dir)
        assert report.live == [record.name.removesuffix(".journal.json")]
        assert report.rolled_forward == report.rolled_back == report.removed == []
        assert report.exit_code == 0
        assert snapshot(root) == before
        assert record.read_bytes() == record_bytes

        done = run_cli(root, "--state-dir", private_state_dir)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "still in flight" in done.stdout
        assert record.name.removesuffix(".journal.json") in done.stdout
        assert snapshot(root) == before
    # The writer was killed after its commit point: recovery finishes the change set.
    report = run_recovery([root], private_state_dir)
    assert len(report.rolled_forward) == 1
    assert report.problems == []
    assert snapshot(root) == case.new[0]
    assert temp_files(tmp_path) == []
    assert records(private_state_dir) == []


def corrupt(kind: str, record: Path) -> None:
    """Damage a record the ways a disk, a person or a bug can."""
    data = record.read_bytes()
    if kind == "truncated":
        record.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        record.write_bytes(b"")
    elif kind == "garbage":
        record.write_bytes(b"\x00\xff not json \x17" * 10)
    elif kind == "not-an-object":
        record.write_bytes(b'["committed"]')
    elif kind == "bit-flip":
        middle = len(data) // 2
        record.write_bytes(data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :])
    elif kind == "bad-checksum":
        body = json.loads(data)
        body["pid"] = body["pid"] + 1  # a field changed, the checksum not recomputed
        record.write_bytes(json.dumps(body).encode())
    elif kind == "no-checksum":
        body = json.loads(data)
        body.pop("checksum")
        record.write_bytes(json.dumps(body).encode())
    elif kind == "wrong-type":
        body = json.loads(data)
        body.pop("checksum")
        body["ops"][0]["name"] = 42  # verifies, but is not a record we could have written
        record.write_bytes(encode_body(body))
    elif kind == "missing-field":
        body = json.loads(data)
        body.pop("checksum")
        del body["ops"][0]["dir"]
        record.write_bytes(encode_body(body))
    elif kind == "directory":
        record.unlink()
        record.mkdir()
        (record / "inside").write_bytes(data)
    elif kind == "symlink":
        kept = record.with_name("elsewhere.json")
        record.rename(kept)
        record.symlink_to(kept)
    else:
        raise ValueError(kind)


CORRUPTIONS = [
    "truncated",
    "empty",
    "garbage",
    "not-an-object",
    "bit-flip",
    "bad-checksum",
    "no-checksum",
    "wrong-type",
    "missing-field",
    "directory",
    "symlink",
]


def tree_with_ours(root: Path) -> dict[str, bytes]:
    """Every file below ``root``, ours included (what must not disappear)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        if not p.is_symlink()
        else b"->" + bytes(p.readlink())
        for p in sorted(root.rglob("*"))
        if not p.is_dir() or p.is_symlink()
    }


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_untrusted_record_deletes_nothing_and_needs_a_person(
    tmp_path: Path, private_state_dir: Path, kind: str
) -> None:
    """Defect 2 and 3 of issue 11: a record recovery cannot trust was taken as "rolled back",
    and its staged files and backups were deleted: a half-applied set became permanent."""
    root, _case = installed(tmp_path)
    crash_child("no-mkdir", [root], private_state_dir, "changeset.apply:3")  # 2 of 4 applied
    [record] = records(private_state_dir)
    corrupt(kind, record)
    backdate(*temp_files(root))
    before = tree_with_ours(root)

    report = run_recovery([root], private_state_dir)

    assert tree_with_ours(root) == before, "recovery changed files of an untrusted change set"
    assert record.exists() or record.is_symlink()
    assert report.exit_code == 2
    [unfinished] = report.unfinished.values()
    assert unfinished.untrusted
    assert "cannot be trusted" in unfinished.reason
    message = unfinished.describe()
    for name in ("b.txt", "fresh.txt", "gone.txt"):  # the files still to be changed
        assert str(root / name) in message, message
    assert "--forward" in message
    assert "--rollback" in message
    done = run_cli(root, "--state-dir", private_state_dir)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "needs a person" in done.stdout
    assert "Traceback" not in done.stderr
    assert tree_with_ours(root) == before


@pytest.mark.parametrize("kind", ["garbage", "bit-flip", "directory"])
@pytest.mark.parametrize(
    "step",
    [
        "changeset.committed",
        "changeset.apply:2",
        "changeset.apply:3",
        "changeset.apply:4",
        "changeset.applied",
    ],
)
@pytest.mark.parametrize("direction", ["--forward", "--rollback"])
def test_operator_decides_an_untrusted_set_from_its_files(
    tmp_path: Path, private_state_dir: Path, kind: str, step: str, direction: str
) -> None:
    root, case = installed(tmp_path)
    crash_child("no-mkdir", [root], private_state_dir, step)
    [record] = records(private_state_dir)
    corrupt(kind, record)

    done = run_cli(root, "--state-dir", private_state_dir, direction, "--json")

    report = json.loads(done.stdout)
    assert done.returncode == 1, done.stdout + done.stderr
    assert report["problems"] == []
    expected = case.new[0] if direction == "--forward" else case.old[0]
    state = snapshot(root)
    assert state == expected, f"after {step}, a damaged record and {direction}:\n" + describe(
        state, case.old[0], case.new[0]
    )
    assert temp_files(tmp_path) == []
    assert not record.exists()
    assert not record.is_symlink()
    aside = record.with_name(record.name + ".damaged")
    assert aside.exists() or aside.is_symlink(), "the damaged record is kept for a person"
    assert run_recovery([root], private_state_dir).exit_code == 0


def test_resolving_an_untrusted_set_refuses_a_damaged_staged_file(
    tmp_path: Path, private_state_dir: Path
) -> None:
    root, _case = installed(tmp_path)
    crash_child("no-mkdir", [root], private_state_dir, "changeset.committed")
    [record] = records(private_state_dir)
    corrupt("garbage", record)
    [staged] = [p for p in temp_files(root) if ".new." in p.name and p.name.startswith(".a.txt")]
    staged.write_bytes(b"alpha new, but damaged\n")

    report = run_recovery([root], private_state_dir, forward=True)

    assert report.exit_code == 2
    assert staged.exists()
    assert (root / "a.txt").read_bytes() == b"alpha old\n"
    assert "damaged" in report.problems[0]
    assert record.exists()


def test_record_touching_other_roots_is_left_alone(tmp_path: Path, private_state_dir: Path) -> None:
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    case = scenario("two-roots", [here, there])
    install(here, case.old[0])
    install(there, case.old[1])
    crash_child("two-roots", [here, there], private_state_dir, "changeset.committed")
    [record] = records(private_state_dir)
    before_here, before_there = snapshot(here), snapshot(there)
    record_bytes = record.read_bytes()

    report = run_recovery([here], private_state_dir)

    assert report.other_roots == [record.name.removesuffix(RECORD_SUFFIX)]
    assert report.exit_code == 2  # issue 12: it said "clean", exit 0
    assert "touches directories outside the roots given" in report.problems[0]
    assert str(there) in report.problems[0]
    assert report.rolled_forward == report.rolled_back == []
    assert record.read_bytes() == record_bytes
    assert snapshot(there) == before_there
    # Left alone means its staged files too: they are what rolling it forward needs.
    assert snapshot(here) == before_here, "recovery of one root touched a foreign change set"

    report = run_recovery([here, there], private_state_dir)
    assert report.problems == []
    assert len(report.rolled_forward) == 1
    assert snapshot(here) == case.new[0]
    assert snapshot(there) == case.new[1]
    assert temp_files(tmp_path) == []
    assert records(private_state_dir) == []


def test_record_naming_a_directory_through_a_symlink_out_of_the_roots(
    tmp_path: Path, private_state_dir: Path
) -> None:
    """A record whose directory resolves outside the roots (through a link) is foreign."""
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside-dir"
    outside.mkdir()
    (outside / "f.txt").write_bytes(b"outside\n")
    (root / "link").symlink_to(outside)
    body = {
        "version": 2,
        "txid": "20000101T000000-aaaaaaaaaaaa",
        "state": "committed",
        "pid": dead_pid(),
        "created": time.time(),
        "durability": "full",
        "ops": [
            {
                "op": "delete",
                "dir": str(root / "link"),
                "name": "f.txt",
                "staged": None,
                "backup": None,
                "sha256": None,
            }
        ],
        "created_dirs": [],
    }
    journal_dir = private_state_dir / "journals"
    journal_dir.mkdir()
    record = journal_dir / f"{body['txid']}{RECORD_SUFFIX}"
    record.write_bytes(encode_body(body))
    report = run_recovery([root], private_state_dir)
    assert report.other_roots == [body["txid"]]
    assert (outside / "f.txt").read_bytes() == b"outside\n"
    assert record.exists()


def test_recovery_after_recovery_is_a_no_op(tmp_path: Path, private_state_dir: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    case = scenario("mixed", [root])
    install(root, case.old[0])
    crash_child("mixed", [root], private_state_dir, "changeset.apply:4")
    first = run_recovery([root], private_state_dir)
    assert first.exit_code == 1
    for _ in range(2):
        again = run_recovery([root], private_state_dir)
        assert again.as_dict() | {"scanned": 0} == RecoveryReport().as_dict()
        assert snapshot(root) == case.new[0]


def test_dry_run_then_real_run(tmp_path: Path, private_state_dir: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    case = scenario("mixed", [root])
    install(root, case.old[0])
    crash_child("mixed", [root], private_state_dir, "changeset.apply:3")
    before = snapshot(root)
    [record] = records(private_state_dir)
    dry = run_recovery([root], private_state_dir, dry_run=True)
    assert dry.rolled_forward == [record.name.removesuffix(RECORD_SUFFIX)]
    assert snapshot(root) == before
    assert records(private_state_dir) == [record]
    real = run_recovery([root], private_state_dir)
    assert real.rolled_forward == dry.rolled_forward
    assert snapshot(root) == case.new[0]


# -- the command line -----------------------------------------------------------------------------


def test_cli_clean_root_exits_0(tmp_path: Path, private_state_dir: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.txt").write_bytes(b"a\n")
    done = run_cli(root, "--state-dir", private_state_dir)
    assert done.returncode == 0, done.stderr
    assert "result: clean" in done.stdout
    assert "Traceback" not in done.stderr
    done = run_cli(root, "--state-dir", private_state_dir, "--json")
    assert done.returncode == 0
    assert json.loads(done.stdout)["exitCode"] == 0


def test_cli_exits_1_after_fixing_and_lists_it(tmp_path: Path, private_state_dir: Path) -> None:
    root, case = installed(tmp_path)
    crash_child("no-mkdir", [root], private_state_dir, "changeset.apply:2")
    [record] = records(private_state_dir)
    txid = record.name.removesuffix(RECORD_SUFFIX)
    orphan = root / f".z.txt.{dead_pid()}.{TOKEN}.atomictmp"
    orphan.write_bytes(b"orphan\n")

    done = run_cli(root, "--state-dir", private_state_dir)

    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any(
        line.startswith("change sets rolled forward") and line.endswith(" 1") for line in lines
    )
    assert any(line.startswith("temp files removed") and line.endswith(" 1") for line in lines)
    assert f"  change sets rolled forward: {txid}" in lines
    assert f"  temp files removed: {orphan.name}" in lines
    assert "result: fixed" in lines
    assert snapshot(root) == case.new[0]
    assert records(private_state_dir) == []


def test_cli_exits_2_when_a_person_is_needed(tmp_path: Path, private_state_dir: Path) -> None:
    """Committed, but the staged file is gone and the target holds a third content: recovery
    must not guess; it reports the file and leaves it as it is."""
    root, case = installed(tmp_path)
    crash_child("no-mkdir", [root], private_state_dir, "changeset.committed")
    [record] = records(private_state_dir)
    body = decode(record.read_bytes())
    [op] = [op for op in body.ops if op.name == "a.txt"]
    assert op.staged is not None
    (root / op.staged).unlink()
    (root / "a.txt").write_bytes(b"someone else's content\n")

    done = run_cli(root, "--state-dir", private_state_dir)

    assert done.returncode == 2, done.stdout + done.stderr
    assert "needs a person" in done.stdout
    assert "a.txt" in done.stdout
    assert "result: needs attention" in done.stdout
    assert "Traceback" not in done.stderr
    assert (root / "a.txt").read_bytes() == b"someone else's content\n"
    # The rest of the change set is finished.
    assert snapshot(root) == {**case.new[0], "a.txt": b"someone else's content\n"}


def test_cli_json_report(tmp_path: Path, private_state_dir: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    case = scenario("mixed", [root])
    install(root, case.old[0])
    crash_child("mixed", [root], private_state_dir, "changeset.prepare:1")
    done = run_cli(root, "--state-dir", private_state_dir, "--json")
    report = json.loads(done.stdout)
    for key in ("rolledForward", "rolledBack", "removedTempFiles", "problems", "exitCode"):
        assert key in report, key
    for key in ("rolledForward", "rolledBack", "removedTempFiles", "problems"):
        assert isinstance(report[key], list), key
    assert report["exitCode"] == done.returncode
    assert report["dryRun"] is False
    assert report["removedTempFiles"]  # the staged file and backup of change 1


def test_cli_dry_run_changes_nothing_but_reports(tmp_path: Path, private_state_dir: Path) -> None:
    root, case = installed(tmp_path)
    crash_child("no-mkdir", [root], private_state_dir, "changeset.apply:2")
    [record] = records(private_state_dir)
    txid = record.name.removesuffix(RECORD_SUFFIX)
    orphan = root / f".z.txt.{dead_pid()}.{TOKEN}.atomictmp"
    orphan.write_bytes(b"orphan\n")
    before, record_bytes = snapshot(root), record.read_bytes()

    done = run_cli(root, "--state-dir", private_state_dir, "--dry-run")
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"  change sets would be rolled forward: {txid}" in done.stdout.splitlines()
    assert f"  temp files would be removed: {orphan.name}" in done.stdout.splitlines()
    done = run_cli(root, "--state-dir", private_state_dir, "--dry-run", "--json")
    report = json.loads(done.stdout)
    assert report["dryRun"] is True
    assert report["rolledForward"] == [txid]
    assert orphan.name in report["removedTempFiles"]
    assert snapshot(root) == before
    assert record.read_bytes() == record_bytes

    real = run_cli(root, "--state-dir", private_state_dir, "--json")
    assert real.returncode == 1
    assert snapshot(root) == case.new[0]


def test_cli_dry_run_reports_what_the_real_run_does(
    tmp_path: Path, private_state_dir: Path
) -> None:
    """The staged files of a committed record are what rolling it forward uses: a dry run
    must not list them as temp files it would remove (the real run does not remove them)."""
    root, case = installed(tmp_path)
    crash_child("no-mkdir", [root], private_state_dir, "changeset.committed")
    dry = json.loads(run_cli(root, "--state-dir", private_state_dir, "--dry-run", "--json").stdout)
    real = json.loads(run_cli(root, "--state-dir", private_state_dir, "--json").stdout)
    assert snapshot(root) == case.new[0]
    for key in ("rolledForward", "rolledBack", "removedTempFiles", "problems", "exitCode"):
        assert dry[key] == real[key], key


def test_cli_unknown_root_is_a_clear_error(tmp_path: Path, private_state_dir: Path) -> None:
    done = run_cli(tmp_path / "no-such-root", "--state-dir", private_state_dir)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr


def test_server_start_sweep_spares_a_foreign_change_set(
    tmp_path: Path, private_state_dir: Path
) -> None:
    """The server's own start (recovery, then the background sweep) leaves it alone too."""
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    case = scenario("two-roots", [here, there])
    install(here, case.old[0])
    install(there, case.old[1])
    crash_child("two-roots", [here, there], private_state_dir, "changeset.committed")
    [record] = records(private_state_dir)
    staged = temp_files(here)
    assert staged
    backdate(*staged)  # old enough for the sweep: only the journal protects them now
    before_here = snapshot(here)

    async def serve_once() -> None:
        options = ServerOptions(sweep_delay=0.0)
        async with Client(create_server(Workspace([here]), options), mode="legacy") as client:
            await client.call_tool("list_allowed_directories", {})
        await anyio.sleep(0.5)  # the sweep thread has walked the small root by now

    anyio.run(serve_once)
    assert snapshot(here) == before_here
    assert record.exists()


def test_a_zombie_is_not_a_live_writer() -> None:
    """A process that exited but was not collected yet (a zombie) holds no lock and writes
    nothing: its files are orphans (a server killed with its parent leaves exactly that)."""
    from atomictools.engine.changes.sweep import pid_alive

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    status = Path(f"/proc/{child.pid}/stat")
    while status.read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert os.path.exists(f"/proc/{child.pid}")  # the pid is still there...
    assert not pid_alive(child.pid)  # ...but nobody lives behind it
    child.wait()
    assert pid_alive(os.getpid())


def test_the_servers_sweep_waits_out_the_grace_period() -> None:
    """The server sweeps once, ``sweep_delay`` after its start: if that came before the sweep's
    grace period had passed, a claim its killed predecessor made in its last moments would
    still look like a live writer's, and stay (the long SIGKILL campaign saw it happen)."""
    from atomictools.engine.changes.sweep import GRACE_SECONDS
    from atomictools.server import ServerOptions

    assert ServerOptions().sweep_delay >= GRACE_SECONDS
