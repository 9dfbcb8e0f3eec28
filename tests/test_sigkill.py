"""SIGKILL crash harness: a writer killed at a random moment never leaves a torn file.

A real child process (``tests/crash_child.py``) rewrites four targets with 256 KiB - 2 MiB
self-checking versions; the parent SIGKILLs it 5-150 ms after its first completed write and
checks that every target is exactly one complete version the child could have left. The atomic
rounds alternate durability (full, fast) and event loop (asyncio, trio). The ``naive`` control
writes in place with ``open(path, "wb")`` and must tear, proving the harness can see a tear.

Temp files orphaned by the kill are expected (sweeping them is a separate feature): they are
counted, must be unlocked and carry the dead child's pid, and are removed between rounds.

``ATOMICTOOLS_SIGKILL_ROUNDS`` (default 100) and ``ATOMICTOOLS_SIGKILL_CONTROL_ROUNDS``
(default 30) set the number of rounds; ``ATOMICTOOLS_SIGKILL_SEED`` replays a run.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from atomictools.engine.durable.tempfiles import is_temp_name
from tests.conftest import SummaryReport, summary_report
from tests.crash_child import HEADER, make_version, verify_version
from tests.sigkill_harness import Campaign, run_campaign

ROUNDS = int(os.environ.get("ATOMICTOOLS_SIGKILL_ROUNDS", "100"))
CONTROL_ROUNDS = int(os.environ.get("ATOMICTOOLS_SIGKILL_CONTROL_ROUNDS", "30"))
SEED = int(os.environ.get("ATOMICTOOLS_SIGKILL_SEED", str(random.SystemRandom().getrandbits(32))))

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs POSIX processes")


@pytest.fixture(scope="module")
def report(pytestconfig: pytest.Config) -> SummaryReport:
    return summary_report(pytestconfig, "SIGKILL crash harness")


def _details(campaign: Campaign) -> str:
    return "\n".join(campaign.problems[:20])


def test_verifier_tells_complete_versions_from_torn_ones() -> None:
    old = make_version(1, 7, os.urandom(300_000))
    new = make_version(1, 8, os.urandom(300_000))
    assert verify_version(old, 1).version == 7
    assert verify_version(new, 1).ok
    assert not verify_version(b"", 1).ok
    assert not verify_version(old[: HEADER.size], 1).ok
    assert not verify_version(new[:-1], 1).ok
    assert not verify_version(new + b"x", 1).ok
    assert not verify_version(new[:150_000] + old[150_000:], 1).ok  # new head, old tail
    assert not verify_version(old, 2).ok  # another target's content


def test_atomic_writes_survive_sigkill(tmp_path: Path, report: SummaryReport) -> None:
    campaign = run_campaign("atomic", ROUNDS, tmp_path, seed=SEED)
    report.add(
        f"sigkill atomic: rounds={campaign.rounds} torn={campaign.torn_files} "
        f"unexpected_versions={campaign.unexpected_versions} "
        f"orphan_temps={campaign.orphan_temps} (locked {campaign.locked_orphans}, "
        f"foreign {campaign.foreign_orphans}) writes={campaign.writes_completed} "
        f"seed={SEED} time={campaign.elapsed:.1f}s"
    )
    report.add(
        "  kill phases: "
        + ", ".join(f"{k} {n}" for k, n in campaign.kill_phases.most_common())
        + " | variants: "
        + ", ".join(f"{k} {n}" for k, n in sorted(campaign.variants.items()))
    )
    assert campaign.rounds == ROUNDS
    assert campaign.torn_files == 0, _details(campaign)
    assert campaign.unexpected_versions == 0, _details(campaign)
    assert campaign.locked_orphans == 0, _details(campaign)  # the writer is dead: no flock
    assert campaign.foreign_orphans == 0, _details(campaign)
    assert campaign.stray_entries == 0, _details(campaign)
    assert not [p for p in (tmp_path / "targets").iterdir() if is_temp_name(p.name)]


def test_naive_control_tears(tmp_path: Path, report: SummaryReport) -> None:
    campaign = run_campaign("naive", CONTROL_ROUNDS, tmp_path, seed=SEED)
    report.add(
        f"sigkill naive control: rounds={campaign.rounds} torn={campaign.torn_files} "
        f"(in {campaign.torn_rounds} rounds) seed={SEED} time={campaign.elapsed:.1f}s"
    )
    report.add(
        "  kill phases: " + ", ".join(f"{k} {n}" for k, n in campaign.kill_phases.most_common())
    )
    assert campaign.rounds == CONTROL_ROUNDS
    assert campaign.torn_files > 0, "the harness never caught the in-place writer mid-write"
    assert campaign.unexpected_versions == 0, _details(campaign)
    assert campaign.orphan_temps == 0
