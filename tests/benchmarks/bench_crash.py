"""Long server crash campaign: SIGKILL the real server during large file changes, N rounds.

    python tests/benchmarks/bench_crash.py [--rounds 1000] [--control-rounds 100] [--lanes 2]
        [--min-mib 1] [--max-mib 4] [--set-files 4] [--sweep-checks 3] [--seed N] [--dir D]

Reuses the harness of tests/test_crash_suite.py (tests/crash_suite_harness.py): each round
sends write_file, edit_file or apply_changes (a new version of 1-4 MiB self-checking files;
apply_changes writes every file of a set) to ``python -m atomictools serve`` over stdio,
SIGKILLs the server at a random moment of the call (or right after the answer), restarts it
(journal recovery before serving), runs ``atomictools recover`` and checks every file, every
set and what is left on disk. The control is a naive multi-file writer (atomic per file, no
journal) killed at random moments. Prints a table of rounds per tool, torn files, mixed sets,
leftovers, the control's mixed sets and where the kills landed; exits 1 if the server ever
left a torn file, a mixed set, a wrong outcome or a leftover, or if the control never showed a
mixed set.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: `tests` package

from tests.crash_suite_harness import (
    KINDS,
    Campaign,
    ControlCampaign,
    MiB,
    Settings,
    run_campaign,
    run_control,
)

COLUMNS = (*KINDS, "all")


def row(label: str, *cells: object, width: int = 15) -> str:
    return f"{label:<56}" + "".join(f"{c!s:>{width}}" for c in cells)


def percentiles(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return f"{statistics.median(ordered):.0f}/{p90:.0f}"


def print_table(campaign: Campaign, control: ControlCampaign) -> None:
    print(row("server rounds", *COLUMNS))
    print("-" * (56 + 15 * len(COLUMNS)))
    per_kind = [campaign.rounds_by_kind[k] for k in KINDS]
    print(row("rounds (SIGKILLs)", *per_kind, campaign.rounds))
    print()
    print(row("outcome", "count"))
    print("-" * 71)
    for label, value in (
        ("torn files", campaign.torn_files),
        ("mixed change sets", campaign.mixed_sets),
        ("unexpected outcomes (lost / undone change)", campaign.unexpected_outcomes),
        ("leftovers after recover (temps + journals)", campaign.leftovers),
        ("journals left after the restart", campaign.journals_after_start),
        ("journals `recover` still had to finish", campaign.journals_fixed_by_cli),
        ("`recover` problems", campaign.cli_problems),
        ("calls answered with an error", campaign.call_errors),
        ("servers that logged an error", campaign.server_errors),
        ("orphan temps after the restart (expected)", campaign.orphans_after_start),
        ("  removed by `atomictools recover`", campaign.temps_removed_by_cli),
        ("  removed by the server's background sweep", campaign.temps_removed_by_sweep),
        (
            "  rounds awaiting that sweep / missed",
            f"{campaign.sweep_checks}/{campaign.sweep_missed}",
        ),
        ("startup recovery: change sets rolled forward", campaign.startup_rolled_forward),
        ("startup recovery: change sets rolled back", campaign.startup_rolled_back),
        ("successes answered before the kill", campaign.responses_before_kill),
        ("successes still in the pipe at the kill", campaign.responses_after_kill),
    ):
        print(row(label, value))
    print()
    print(row("naive control (no journal)", "count"))
    print("-" * 71)
    print(row("rounds (SIGKILLs)", control.rounds))
    print(row("mixed sets", control.mixed_sets))
    print(row("torn files", control.torn_files))
    print(row("time to write the set (ms)", f"{control.write_ms:.0f}"))
    print()
    phases = sorted({p.split(": ", 1)[1] for p in campaign.kill_phases})
    print(row("kill phase (disk state at the kill)", *KINDS))
    print("-" * (56 + 15 * len(KINDS)))
    for phase in phases:
        print(row(f"  {phase}", *(campaign.kill_phases[f"{k}: {phase}"] or "" for k in KINDS)))
    print()
    print(row("kill timing", "rounds"))
    print("-" * 71)
    for timing, n in sorted(campaign.timings.items()):
        print(row(f"  {timing}", n))
    print()
    print(row("control kill phase", "rounds"))
    print("-" * 71)
    for phase, n in sorted(control.kill_phases.items()):
        print(row(f"  {phase}", n))
    print()
    print(row("answered call (ms, median/p90)", *KINDS, "commit"))
    print("-" * (56 + 15 * (len(KINDS) + 1)))
    print(row("", *(percentiles(campaign.call_ms.get(k, [])) for k in (*KINDS, "commit"))))
    restarts = [s * 1000 for s in campaign.restart_s]
    print(row("server restart to first answer (ms)", percentiles(restarts)))
    print(row("client modes", ", ".join(f"{k} {n}" for k, n in sorted(campaign.modes.items()))))
    print(
        row(
            "time (s)",
            f"{campaign.elapsed:.1f} server, {control.elapsed:.1f} control, {campaign.lanes} lanes",
        )
    )
    for label, problems in (("server", campaign.problems), ("control", control.problems)):
        if problems:
            print(f"\nfirst problems ({label}):")
            for line in problems[:10]:
                print(f"  {line[:2000]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1000, help="server kill rounds")
    parser.add_argument("--control-rounds", type=int, default=100, help="naive control rounds")
    parser.add_argument("--lanes", type=int, default=2, help="independent lanes run at once")
    parser.add_argument("--min-mib", type=float, default=1.0, help="smallest file (MiB)")
    parser.add_argument("--max-mib", type=float, default=4.0, help="largest file (MiB)")
    parser.add_argument("--set-files", type=int, default=4, help="files per change set")
    parser.add_argument(
        "--sweep-checks", type=int, default=3, help="rounds per lane awaiting the server's sweep"
    )
    parser.add_argument("--seed", type=int, default=random.SystemRandom().getrandbits(32))
    parser.add_argument("--dir", type=Path, help="where to work (default: the temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    args = parser.parse_args(argv)
    if not 0 < args.min_mib <= args.max_mib:
        parser.error("need 0 < --min-mib <= --max-mib")
    started = time.perf_counter()

    def on_round(campaign: Campaign) -> None:
        if campaign.rounds % 50 == 0 or campaign.rounds == args.rounds:
            print(
                f"  {campaign.rounds}/{args.rounds} rounds, {time.perf_counter() - started:.0f}s, "
                f"anomalies {campaign.anomalies}",
                file=sys.stderr,
                flush=True,
            )

    settings = Settings(
        min_size=int(args.min_mib * MiB),
        max_size=int(args.max_mib * MiB),
        set_files=args.set_files,
        sweep_checks=args.sweep_checks,
        keep_logs=args.keep,
        on_round=on_round,
    )
    workdir = Path(tempfile.mkdtemp(prefix="atomictools-crash-", dir=args.dir))
    try:
        print(f"seed={args.seed} dir={workdir}", flush=True)
        campaign = run_campaign(
            args.rounds, workdir / "server", lanes=args.lanes, settings=settings, seed=args.seed
        )
        control = run_control(
            args.control_rounds, workdir / "control", settings=settings, seed=args.seed
        )
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(campaign.summary())
    print(control.summary())
    print()
    print_table(campaign, control)
    failed = campaign.anomalies > 0 or bool(campaign.problems)
    failed |= args.control_rounds > 0 and control.mixed_sets == 0
    print("\nRESULT:", "FAIL" if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
