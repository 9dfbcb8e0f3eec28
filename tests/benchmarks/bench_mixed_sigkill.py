"""Long SIGKILL campaign: the real server killed during change sets of files and a database.

    python tests/benchmarks/bench_mixed_sigkill.py [--rounds 300] [--control-rounds 30]
        [--driver server|child] [--files 4] [--max-size 262144] [--seed N] [--dir DIR]

Reuses the harness of tests/test_mixed_sigkill.py (tests/mixed_sigkill_harness.py): each round
sends one ``apply_changes`` of new versions of every file (one by an edit), a directory in
every other round and a schema migration in every fifth, with the database rows that record
each file's sha256, to ``atomictools serve --root R --db app=D`` over stdio, SIGKILLs the
server at a random moment of the call, restarts it (startup recovery), runs
``atomictools.recover`` and checks: no torn file, files and database at one version (and the
one the kill allows), no journal record, no set left for a person, no temp, member, claim or
marker row left (but the round's own stale marker row and young lone claim, counted apart and
checked to go later), ``PRAGMA integrity_check`` ok. The control (a child committing the files,
then the rows in a transaction of their own) must show mixed rounds. Prints a table of the
counts, the kill phases and the timings; exits 1 if the server's campaign shows any anomaly or
the control never a mixed round.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: `tests` package

from tests.mixed_sigkill_harness import (
    AFTER_COMMIT,
    BEFORE_COMMIT,
    SPLIT,
    Campaign,
    Settings,
    run_campaign,
)

ROWS = (
    ("rounds (SIGKILLs)", "rounds"),
    ("killed before the commit point", "before_commit"),
    ("killed after the commit point", "after_commit"),
    ("torn files", "torn"),
    ("mixed rounds (files != db)", "mixed"),
    ("wrong outcome", "wrong_outcome"),
    ("leftovers", "leftovers"),
    ("stale marker rows (expected)", "stale_markers"),
    ("young lone claims (swept later)", "young_claims"),
    ("integrity_check failures", "integrity_failures"),
    ("call errors", "call_errors"),
    ("server errors logged", "server_errors"),
)


def row(label: str, *cells: object) -> str:
    return f"{label:<40}" + "".join(f"{c!s:>16}" for c in cells)


def ms(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.0f} ({max(values):.0f})"


def print_table(main: Campaign, control: Campaign | None) -> None:
    campaigns = [main] + ([control] if control is not None else [])
    print(row("", *(f"{c.driver}" + (" (control)" if c is control else "") for c in campaigns)))
    print("-" * (40 + 16 * len(campaigns)))
    for label, attr in ROWS:
        print(row(label, *(getattr(c, attr) for c in campaigns)))
    print(row("time (s)", *(f"{c.elapsed:.1f}" for c in campaigns)))
    print(row("per round (s)", *(f"{c.elapsed / max(c.rounds, 1):.2f}" for c in campaigns)))
    print(row("call, answered (ms: median, max)", *(ms(c.call_ms) for c in campaigns)))
    print(row("restart to first call (ms)", *(ms(c.start_ms) for c in campaigns)))
    print(row("recover after restart (ms)", *(ms(c.recover_ms) for c in campaigns)))
    print()
    print(row("kill phase (left on disk)", *(c.driver for c in campaigns)))
    print("-" * (40 + 16 * len(campaigns)))
    order = [*sorted(BEFORE_COMMIT), SPLIT, *sorted(AFTER_COMMIT)]
    for phase in order:
        if any(c.phases[phase] for c in campaigns):
            side = "before" if phase in BEFORE_COMMIT else "after" if phase in AFTER_COMMIT else "-"
            print(row(f"  {phase} [{side}]", *(c.phases[phase] for c in campaigns)))
    print()
    print(row("kill timing", *(c.driver for c in campaigns)))
    print("-" * (40 + 16 * len(campaigns)))
    timings = sorted({t for c in campaigns for t in c.timings})
    for timing in timings:
        print(row(f"  {timing}", *(c.timings[timing] for c in campaigns)))
    for campaign in campaigns:
        if campaign.problems:
            print(f"\nfirst problems ({campaign.driver}):")
            for line in campaign.problems[:10]:
                print(f"  {line[:600]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300, help="kill rounds of the server")
    parser.add_argument("--control-rounds", type=int, default=30, help="naive control rounds")
    parser.add_argument("--driver", choices=["server", "child"], default="server")
    parser.add_argument("--files", type=int, default=4, help="files per change set")
    parser.add_argument("--max-size", type=int, default=256 * 1024, help="largest file (bytes)")
    parser.add_argument("--seed", type=int, default=random.SystemRandom().getrandbits(32))
    parser.add_argument("--dir", type=Path, help="where to work (default: the temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the directory and the logs")
    args = parser.parse_args(argv)
    settings = Settings(
        nfiles=args.files, sizes=(args.max_size // 16, args.max_size), keep_logs=args.keep
    )
    workdir = Path(tempfile.mkdtemp(prefix="atomictools-mixed-sigkill-", dir=args.dir))
    print(f"seed={args.seed} dir={workdir} driver={args.driver} files={args.files}", flush=True)

    def progress(campaign: Campaign) -> None:
        if campaign.rounds % 25 == 0:
            print(f"  {campaign.driver}: {campaign.rounds} rounds", flush=True)

    control = None
    try:
        main_run = run_campaign(
            args.rounds,
            workdir / args.driver,
            driver=args.driver,
            seed=args.seed,
            settings=settings,
            on_round=progress,
        )
        if args.control_rounds:
            control = run_campaign(
                args.control_rounds,
                workdir / "naive",
                driver="naive",
                seed=args.seed,
                settings=settings,
            )
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print_table(main_run, control)
    failed = main_run.anomalies > 0 or (control is not None and control.mixed == 0)
    print("\nRESULT:", "FAIL" if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
