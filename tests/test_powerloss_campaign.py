"""Power-cut campaigns in CI (issue 13): a few hundred cuts on the power-loss file system.

Random cuts through the embedding API and through the real server, a cut at every named step of
the protocols, and ``--durability fast`` (acknowledged changes may be lost, never torn). The long
campaign is ``tests/benchmarks/bench_powerloss.py``; the mutation check that every sync call is
needed is ``tests/benchmarks/mutate_syncs.py``. See ``tests/powerloss_campaign.py``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SummaryReport, summary_report
from tests.powerloss import unavailable
from tests.powerloss_campaign import RoundResult, run_round

REASON = unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")
totals: Counter[str] = Counter()

STEPS = [
    "write.renamed",
    "changeset.prepare:1",
    "changeset.chunk",
    "changeset.prepared",
    "changeset.committed",
    "changeset.apply:1",
    "changeset.apply:2",
    "changeset.applied",
    "changeset.key_recorded",
    "changeset.finished",
    "db.committed",
]


@pytest.fixture(scope="module")
def report(pytestconfig: pytest.Config) -> Iterator[SummaryReport]:
    summary = summary_report(pytestconfig, "power-cut campaign")
    yield summary
    summary.add(
        f"rounds {totals['rounds']}, cuts {totals['cuts']}, acknowledged changes checked "
        f"{totals['checked']}, violations {totals['violations']}, files emptied in fast mode "
        f"{totals['emptied (fast)']}"
    )


def run(tmp_path: Path, seed: int, **options: object) -> RoundResult:
    result = run_round(tmp_path / f"round-{seed}", seed, **options)  # type: ignore[arg-type]
    totals["rounds"] += 1
    totals["cuts"] += len(result.cuts)
    totals["checked"] += result.checked
    totals["violations"] += len(result.violations)
    return result


@pytest.mark.usefixtures("report")
@pytest.mark.parametrize("batch", range(5))  # 60 rounds; the long campaign: bench_powerloss.py
def test_random_cuts_through_the_api(tmp_path: Path, batch: int) -> None:
    for seed in range(batch * 12 + 1, batch * 12 + 13):
        result = run(tmp_path, seed)
        assert result.violations == [], (seed, result.cuts, result.violations)


@pytest.mark.usefixtures("report")
@pytest.mark.parametrize("step", STEPS)
def test_cut_at_every_named_step(tmp_path: Path, step: str) -> None:
    for seed in (1, 2, 3):
        result = run(tmp_path, 500 + seed, step=step, count=12)
        assert result.violations == [], (step, seed, result.cuts, result.violations)
    # A change set that makes two directory levels and writes only inside them, and a plain
    # directory followed by a write: nothing else syncs those parents.
    for seed, first in ((600, "mkdir-set"), (601, "mkdir")):
        result = run(tmp_path, seed, step=step, first=first)
        assert result.violations == [], (step, first, result.cuts, result.violations)


@pytest.mark.usefixtures("report")
def test_what_recovery_finished_survives_the_next_cut(tmp_path: Path) -> None:
    """Cut mid-apply; recover; then either a change set in another directory is cut at its
    commit (its journal write is the first sync after the recovery: the recovery's renames
    must be durable by then), or two plain writes follow and the cut lands in the second (the
    record the recovery removed must not come back over a file changed since)."""
    for seed in range(3001, 3007):
        result = run(
            tmp_path,
            seed,
            step="changeset.apply:1",
            second_step="changeset.committed",
            second_first="elsewhere",
        )
        assert result.violations == [], (seed, result.cuts, result.violations)
        result = run(
            tmp_path,
            seed + 100,
            step="changeset.apply:1",
            second_step="write.renamed:2",
            second_first="writes",
        )
        assert result.violations == [], (seed + 100, result.cuts, result.violations)


@pytest.mark.usefixtures("report")
def test_random_cuts_through_the_real_server(tmp_path: Path) -> None:
    for seed in range(1001, 1011):
        result = run(tmp_path, seed, via="server")
        assert result.violations == [], (seed, result.cuts, result.violations)


@pytest.mark.usefixtures("report")
def test_fast_durability_is_not_power_loss_safe_but_recovers(tmp_path: Path) -> None:
    """``--durability fast`` makes no fsync: after a power cut a change may be lost and a file
    may come back empty (as the README says), but nothing else: no garbage, no recovery
    needing a person, nothing of ours left, a sound database."""
    for seed in range(2001, 2021):
        result = run(tmp_path, seed, durability="fast")
        totals["emptied (fast)"] += result.emptied
        assert result.violations == [], (seed, result.cuts, result.violations)
