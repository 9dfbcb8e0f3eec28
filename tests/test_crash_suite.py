"""Crash suite: the real server, SIGKILLed during large write_file / edit_file / apply_changes.

Each round (tests/crash_suite_harness.py) sends one call to ``python -m atomictools serve``
over stdio through the SDK client, SIGKILLs the server at a random moment of the call (or
right after its answer), restarts it (journal recovery runs in its lifespan before it serves),
runs ``atomictools recover`` and checks: every file is exactly one complete version, every
change set wholly old or wholly new (half of them also create a directory, which must exist
exactly when the files are new) and the one outcome the kill point allows (a committed change
set rolled forward, an uncommitted one back, a reported success kept), no journal left after
the restart, no error in any server's log, and no temp file or journal left after ``recover``
(temps the killed server orphaned are the sweep's job; in one round per lane the harness
waits for the restarted server's own background sweep instead). Most kills land at a random
moment of the call; some apply_changes kills are timed from its progress notifications or by
a thread that sees the committed journal record appear, so the roll-forward and roll-back
paths of startup recovery are exercised too. The control, a naive multi-file writer (each
file replaced atomically, no journal), killed at random moments must show mixed sets.

``ATOMICTOOLS_CRASH_ROUNDS`` (default 60, spread over the three tools),
``ATOMICTOOLS_CRASH_CONTROL_ROUNDS`` (default 30), ``ATOMICTOOLS_CRASH_LANES`` (default 2:
rounds run in that many independent root/state-dir lanes at once) and
``ATOMICTOOLS_CRASH_SEED`` (replays the random choices) tune it. The long campaign is
``python tests/benchmarks/bench_crash.py --rounds 1000``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.conftest import SummaryReport, summary_report
from tests.crash_suite_harness import (
    KINDS,
    BodyPool,
    Campaign,
    MiB,
    check_set,
    edit_marker,
    make_edit_text,
    make_versioned,
    parse_edit_text,
    parse_versioned,
    run_campaign,
    run_control,
    set_names,
    write_plain,
)

ROUNDS = int(os.environ.get("ATOMICTOOLS_CRASH_ROUNDS", "60"))
CONTROL_ROUNDS = int(os.environ.get("ATOMICTOOLS_CRASH_CONTROL_ROUNDS", "30"))
LANES = int(os.environ.get("ATOMICTOOLS_CRASH_LANES", "2"))
SEED = int(os.environ.get("ATOMICTOOLS_CRASH_SEED", str(random.SystemRandom().getrandbits(32))))

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs POSIX processes")


@pytest.fixture(scope="module")
def report(pytestconfig: pytest.Config) -> SummaryReport:
    return summary_report(pytestconfig, "server crash suite (SIGKILL during file tools)")


def _details(campaign: Campaign) -> str:
    return "\n".join(campaign.problems[:20])


def test_checker_tells_complete_versions_from_torn_and_mixed(tmp_path: Path) -> None:
    pool = BodyPool(MiB, seed=1)
    rng = random.Random(2)
    old = make_versioned("a.txt", 7, pool.body(rng, 300_000, 400_000)).encode()
    new = make_versioned("a.txt", 8, pool.body(rng, 300_000, 400_000)).encode()
    assert parse_versioned(old, "a.txt").version == 7
    assert parse_versioned(new, "a.txt").ok
    for torn in (b"", old[:40], new[:-1], new + b"x", new[:150_000] + old[150_000:]):
        assert not parse_versioned(torn, "a.txt").ok
    assert not parse_versioned(old, "b.txt").ok  # another file's content

    body = pool.body(rng, 300_000, 300_000)
    edited = make_edit_text(3, body)
    assert parse_edit_text(edited.encode()).version == 3
    assert edited.count(edit_marker("head", 3)) == 1
    assert edited.count(edit_marker("tail", 3)) == 1
    half = edited.replace(edit_marker("head", 3), edit_marker("head", 4))
    assert not parse_edit_text(half.encode()).ok  # one marker edited, not the other
    assert not parse_edit_text(edited.encode()[:-30]).ok
    assert not parse_edit_text(edited.encode()[:100_000]).ok

    names = set_names(4)
    for name in names:
        write_plain(tmp_path / name, make_versioned(name, 5, pool.body(rng, 1000, 2000)))
    assert check_set(tmp_path, names).version == 5
    write_plain(tmp_path / names[2], make_versioned(names[2], 6, pool.body(rng, 1000, 2000)))
    mixed = check_set(tmp_path, names)
    assert mixed.mixed
    assert mixed.torn == 0
    assert mixed.version is None
    (tmp_path / names[3]).write_bytes(b"ATKT part-3.txt v=")
    assert check_set(tmp_path, names).torn == 1
    (tmp_path / names[3]).unlink()
    assert check_set(tmp_path, names).torn == 1  # a missing file is not a complete version


def test_server_killed_during_file_tools_leaves_one_version(
    tmp_path: Path, report: SummaryReport
) -> None:
    campaign = run_campaign(ROUNDS, tmp_path, lanes=LANES, seed=SEED)
    report.add(f"{campaign.summary()} seed={SEED}")
    report.add(f"  kill phases: {campaign.phase_line()}")
    report.add(
        "  kill timing: "
        + ", ".join(f"{k} {n}" for k, n in sorted(campaign.timings.items()))
        + " | client modes: "
        + ", ".join(f"{k} {n}" for k, n in sorted(campaign.modes.items()))
    )
    assert campaign.rounds == ROUNDS
    if len(KINDS) <= ROUNDS:
        assert all(campaign.rounds_by_kind[kind] > 0 for kind in KINDS), campaign.rounds_by_kind
    assert campaign.torn_files == 0, _details(campaign)
    assert campaign.mixed_sets == 0, _details(campaign)
    assert campaign.unexpected_outcomes == 0, _details(campaign)
    assert campaign.call_errors == 0, _details(campaign)
    assert campaign.journals_after_start == 0, _details(campaign)
    assert campaign.journals_fixed_by_cli == 0, _details(campaign)
    assert campaign.leftovers == 0, _details(campaign)
    assert campaign.cli_problems == 0, _details(campaign)
    assert campaign.sweep_missed == 0, _details(campaign)
    assert campaign.problems == []
    if campaign.rounds_by_kind["apply_changes"] >= 30:  # a quarter are killed at the commit
        recovered = campaign.startup_rolled_forward + campaign.startup_rolled_back
        assert recovered > 0, f"no kill left a journal to recover: {campaign.phase_line()}"
    for kind in KINDS:  # the kills did land inside the calls, not only after them
        if campaign.rounds_by_kind[kind] >= 10:
            inside = sum(
                n
                for phase, n in campaign.kill_phases.items()
                if phase.startswith(f"{kind}: ") and not phase.endswith("after response")
            )
            assert inside > 0, campaign.phase_line()


def test_naive_multi_file_writer_control_shows_mixed_sets(
    tmp_path: Path, report: SummaryReport
) -> None:
    control = run_control(CONTROL_ROUNDS, tmp_path, seed=SEED)
    report.add(f"{control.summary()} seed={SEED}")
    assert control.rounds == CONTROL_ROUNDS
    assert control.mixed_sets > 0, "the harness never saw the naive writer's set half-written"
    assert control.torn_files == 0, control.problems  # each file itself was replaced atomically
    assert control.problems == []
