"""Long SIGKILL campaign: many kill rounds of the atomic writer, plus the in-place control.

    python tests/benchmarks/bench_sigkill.py [--rounds 1000] [--control-rounds 100] [--seed N]

Reuses the harness of tests/test_sigkill.py (tests/sigkill_harness.py, tests/crash_child.py):
each round a child rewrites 4 targets with 256 KiB - 2 MiB self-checking versions and is
SIGKILLed 5-150 ms after its first completed write; every target must then be exactly one
complete version. Atomic rounds alternate durability (full/fast) and event loop (asyncio/trio).
Prints a table of rounds, kill points (the phase each kill landed in), torn files, unexpected
versions and orphaned temp files; exits 1 if the atomic writer ever tore a file or the
control never did.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: `tests` package

from tests.sigkill_harness import Campaign, run_campaign


def row(label: str, *cells: object) -> str:
    return f"{label:<28}" + "".join(f"{c!s:>14}" for c in cells)


def print_table(atomic: Campaign, control: Campaign) -> None:
    print(row("", "atomic", "naive control"))
    print("-" * 56)
    for label, attr in (
        ("rounds (SIGKILLs)", "rounds"),
        ("torn files", "torn_files"),
        ("rounds with a torn file", "torn_rounds"),
        ("unexpected versions", "unexpected_versions"),
        ("orphan temps", "orphan_temps"),
        ("  still flock-ed", "locked_orphans"),
        ("  not the dead child's pid", "foreign_orphans"),
        ("stray entries", "stray_entries"),
        ("writes completed", "writes_completed"),
    ):
        print(row(label, getattr(atomic, attr), getattr(control, attr)))
    print(row("time (s)", f"{atomic.elapsed:.1f}", f"{control.elapsed:.1f}"))
    print()
    phases = set(atomic.kill_phases) | set(control.kill_phases)
    print(row("kill points (phase)", "atomic", "naive control"))
    print("-" * 56)
    for phase in sorted(phases, key=lambda p: -(atomic.kill_phases[p] + control.kill_phases[p])):
        print(row(f"  {phase}", atomic.kill_phases[phase], control.kill_phases[phase]))
    print()
    print("atomic variants: " + ", ".join(f"{k} {n}" for k, n in sorted(atomic.variants.items())))
    delays = sorted(atomic.delays_ms + control.delays_ms)
    if delays:
        print(f"kill delays after the first write: {delays[0]:.0f}-{delays[-1]:.0f} ms")
    for campaign in (atomic, control):
        if campaign.problems:
            print(f"\nfirst problems ({campaign.mode}):")
            for line in campaign.problems[:10]:
                print(f"  {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1000, help="atomic kill rounds")
    parser.add_argument("--control-rounds", type=int, default=100, help="naive control rounds")
    parser.add_argument("--seed", type=int, default=random.SystemRandom().getrandbits(32))
    parser.add_argument("--dir", type=Path, help="where to write (default: the temp dir)")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="atomictools-sigkill-", dir=args.dir))
    try:
        print(f"seed={args.seed} dir={workdir}", flush=True)
        atomic = run_campaign("atomic", args.rounds, workdir / "atomic", seed=args.seed)
        control = run_campaign("naive", args.control_rounds, workdir / "naive", seed=args.seed)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print_table(atomic, control)
    failed = atomic.anomalies > 0 or (args.control_rounds > 0 and control.torn_files == 0)
    print("\nRESULT:", "FAIL" if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
