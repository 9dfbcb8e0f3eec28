"""Parent side of the SIGKILL crash harness (used by tests/test_sigkill.py and the benchmark).

One round: tell a warmed-up child (``tests/crash_child.py``) to start rewriting the targets, wait
for its first completed write, sleep a random 5-150 ms, ``SIGKILL`` it, reap it, then check the
directory: every target must hold exactly one complete version, and that version must be one the
child could legitimately have left there (the one before its last write call, or the one it was
writing). Temp files left by the killed writer are counted, checked to be unlocked (their writer
is dead, so the kernel dropped its ``flock``) and to carry the dead child's pid, then removed.
A torn target is counted and then repaired, so one tear is never counted twice.

The next child is spawned while the current one runs, so its interpreter start-up overlaps the
current round instead of adding to it.
"""

from __future__ import annotations

import fcntl
import os
import random
import selectors
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from atomictools.engine.durable.tempfiles import is_temp_name, temp_owner_pid
from tests.crash_child import (
    PHASES,
    STATUS_FILE,
    STATUS_HEAD,
    STATUS_MAGIC,
    make_version,
    status_size,
    target_name,
    verify_version,
)

CHILD = Path(__file__).with_name("crash_child.py")
VERSIONS_PER_ROUND = 10**9  # round r writes versions above r * VERSIONS_PER_ROUND
READY_TIMEOUT = 60.0


class HarnessError(RuntimeError):
    """The harness itself went wrong (a child died on its own, never got ready, ...)."""


@dataclass
class Campaign:
    """Totals over all rounds of one mode."""

    mode: str
    rounds: int = 0
    torn_files: int = 0
    torn_rounds: int = 0
    unexpected_versions: int = 0  # complete, but not a version the child could have left
    orphan_temps: int = 0
    locked_orphans: int = 0  # an orphan temp whose flock was still held: its writer lives?
    foreign_orphans: int = 0  # an orphan temp not named with the killed child's pid
    stray_entries: int = 0  # anything in the directory that is neither target nor our temp
    writes_completed: int = 0
    kill_phases: Counter[str] = field(default_factory=Counter)
    variants: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    delays_ms: list[float] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def anomalies(self) -> int:
        return (
            self.torn_files
            + self.unexpected_versions
            + self.locked_orphans
            + self.foreign_orphans
            + self.stray_entries
        )

    def summary(self) -> str:
        phases = ", ".join(f"{name} {n}" for name, n in self.kill_phases.most_common())
        return (
            f"{self.mode}: rounds={self.rounds} torn={self.torn_files} "
            f"(rounds with a tear {self.torn_rounds}) unexpected_versions="
            f"{self.unexpected_versions} orphan_temps={self.orphan_temps} "
            f"locked_orphans={self.locked_orphans} stray={self.stray_entries} "
            f"writes_completed={self.writes_completed} time={self.elapsed:.1f}s "
            f"kill_phases=[{phases}]"
        )


@dataclass
class _Child:
    proc: subprocess.Popen[str]
    status_path: Path
    stderr_path: Path
    variant: str


def _variant(mode: str, round_no: int) -> tuple[str, str]:
    """(child mode, backend) of a round: ``atomic`` alternates durability and event loop."""
    if mode != "atomic":
        return mode, "asyncio"
    child_mode = ("atomic-full", "atomic-fast")[round_no % 2]
    backend = ("asyncio", "trio")[(round_no // 2) % 2]
    return child_mode, backend


def _spawn(mode: str, round_no: int, targets: Path, work: Path, nfiles: int, seed: int) -> _Child:
    child_mode, backend = _variant(mode, round_no)
    status_path = work / f"status-{round_no}.bin"
    status_path.write_bytes(bytes(status_size(nfiles)))
    stderr_path = work / f"stderr-{round_no}.txt"
    env = dict(os.environ)
    env.pop("ATOMICTOOLS_TEST_CRASH_AT", None)
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(CHILD),
                child_mode,
                str(targets),
                str(status_path),
                f"--files={nfiles}",
                f"--version-base={round_no * VERSIONS_PER_ROUND}",
                f"--seed={seed}",
                f"--backend={backend}",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
        )
    return _Child(proc, status_path, stderr_path, f"{child_mode}/{backend}")


def _stop(child: _Child) -> None:
    """Make sure a child of ours is gone (only ever by its own pid)."""
    if child.proc.poll() is None:
        with suppress(ProcessLookupError):
            os.kill(child.proc.pid, signal.SIGKILL)
    child.proc.wait()
    for stream in (child.proc.stdin, child.proc.stdout):
        if stream is not None:
            with suppress(OSError):
                stream.close()


def _child_failed(child: _Child, what: str) -> HarnessError:
    _stop(child)
    err = child.stderr_path.read_text(errors="replace")[-4000:]
    return HarnessError(f"{what} (child {child.variant}, exit {child.proc.returncode}):\n{err}")


def _wait_ready(child: _Child) -> None:
    assert child.proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(child.proc.stdout, selectors.EVENT_READ)
        if not sel.select(READY_TIMEOUT):
            raise _child_failed(child, f"the child was not ready after {READY_TIMEOUT:.0f}s")
    line = child.proc.stdout.readline()
    if line.strip() != "ready":
        raise _child_failed(child, f"the child said {line!r} instead of 'ready'")


def _read_status(path: Path, nfiles: int) -> tuple[str, int, list[tuple[int, int]]]:
    raw = path.read_bytes()
    magic, phase, _current, _unused, writes = STATUS_HEAD.unpack_from(raw)
    if magic != STATUS_MAGIC:
        raise HarnessError(f"status file {path} was never written by the child")
    files = [
        STATUS_FILE.unpack_from(raw, STATUS_HEAD.size + i * STATUS_FILE.size) for i in range(nfiles)
    ]
    return PHASES[phase], writes, files


def _lock_is_free(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing drops our lock too
    return True


def _write_plain(path: Path, data: bytes) -> None:
    """Set up or repair a target (the harness's own write, outside any kill window)."""
    tmp = path.with_name(path.name + ".setup")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _check_round(
    campaign: Campaign,
    child: _Child,
    round_no: int,
    targets: Path,
    nfiles: int,
    on_disk: list[int],
) -> None:
    phase, writes, files = _read_status(child.status_path, nfiles)
    campaign.kill_phases[phase] += 1
    campaign.writes_completed += writes
    pid = child.proc.pid
    names = {target_name(i): i for i in range(nfiles)}
    torn_here = 0
    for entry in sorted(os.listdir(targets)):
        path = targets / entry
        if entry in names:
            continue
        if is_temp_name(entry):
            campaign.orphan_temps += 1
            if not _lock_is_free(path):
                campaign.locked_orphans += 1
                campaign.problems.append(f"round {round_no}: {entry} is still flock-ed")
            if temp_owner_pid(entry) != pid:
                campaign.foreign_orphans += 1
                campaign.problems.append(f"round {round_no}: {entry} is not from pid {pid}")
            path.unlink()
            continue
        campaign.stray_entries += 1
        campaign.problems.append(f"round {round_no}: unexpected entry {entry}")
        path.unlink()
    for file_id in range(nfiles):
        path = targets / target_name(file_id)
        in_progress, committed = files[file_id]
        allowed = {committed or on_disk[file_id]} | ({in_progress} if in_progress else set())
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = b""
        verdict = verify_version(data, file_id)
        if verdict.ok and verdict.version in allowed:
            on_disk[file_id] = verdict.version
            continue
        if verdict.ok:
            campaign.unexpected_versions += 1
            campaign.problems.append(
                f"round {round_no} ({child.variant}, killed in {phase}): {path.name} holds "
                f"version {verdict.version}, expected one of {sorted(allowed)}"
            )
        else:
            torn_here += 1
            campaign.problems.append(
                f"round {round_no} ({child.variant}, killed in {phase}): {path.name} torn: "
                f"{verdict.problem} (writing {in_progress}, returned {committed})"
            )
        repair = round_no * VERSIONS_PER_ROUND + VERSIONS_PER_ROUND - 1
        _write_plain(path, make_version(file_id, repair, b"repaired"))
        on_disk[file_id] = repair
    campaign.torn_files += torn_here
    campaign.torn_rounds += bool(torn_here)


@contextmanager
def _children() -> Iterator[list[_Child]]:
    live: list[_Child] = []
    try:
        yield live
    finally:
        for child in live:
            _stop(child)


def run_campaign(
    mode: str,
    rounds: int,
    workdir: Path,
    *,
    nfiles: int = 4,
    min_delay: float = 0.005,
    max_delay: float = 0.150,
    seed: int | None = None,
) -> Campaign:
    """Run ``rounds`` kill rounds of ``mode`` ("atomic" or "naive") in ``workdir``."""
    if mode not in ("atomic", "naive"):
        raise ValueError(f"mode must be 'atomic' or 'naive', not {mode!r}")
    rng = random.Random(seed)
    campaign = Campaign(mode)
    targets = workdir / "targets"
    work = workdir / "harness"
    targets.mkdir(parents=True)
    work.mkdir()
    on_disk = [0] * nfiles
    for file_id in range(nfiles):
        _write_plain(targets / target_name(file_id), make_version(file_id, 0, b"initial"))
    started = time.perf_counter()
    with _children() as live:
        spawn_seed = rng.getrandbits(32)
        live.append(_spawn(mode, 0, targets, work, nfiles, spawn_seed))
        for round_no in range(rounds):
            child = live[0]
            campaign.variants[child.variant] += 1
            assert child.proc.stdin is not None
            try:
                child.proc.stdin.write("go\n")
                child.proc.stdin.flush()
            except BrokenPipeError:
                raise _child_failed(child, "the child died before 'go'") from None
            _wait_ready(child)
            if round_no + 1 < rounds:  # warm up the next child while this one works
                live.append(_spawn(mode, round_no + 1, targets, work, nfiles, rng.getrandbits(32)))
            delay = rng.uniform(min_delay, max_delay)
            time.sleep(delay)
            if child.proc.poll() is not None:
                raise _child_failed(child, "the child exited before it was killed")
            os.kill(child.proc.pid, signal.SIGKILL)
            child.proc.wait()
            live.remove(child)
            _stop(child)
            if child.proc.returncode != -signal.SIGKILL:
                raise _child_failed(child, "the child did not die of SIGKILL")
            campaign.delays_ms.append(delay * 1000)
            _check_round(campaign, child, round_no, targets, nfiles, on_disk)
            campaign.rounds += 1
            child.status_path.unlink()
            child.stderr_path.unlink()
    campaign.elapsed = time.perf_counter() - started
    return campaign
