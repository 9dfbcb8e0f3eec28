"""The long power-cut campaign (issue 13): many rounds on the power-loss file system.

    sudo .venv/bin/python tests/benchmarks/bench_powerloss.py [--rounds 500] [--via engine]

Each round cuts the power twice (at a random moment inside an operation in flight; the first
cut sometimes at a named step instead), recovers, and checks (see ``tests/powerloss_campaign.py``).
Prints a table of rounds, cuts, acknowledged changes checked, violations and (fast mode) files
that came back empty per mode, and the first violations in full. Exit 1 on any violation.
Needs root and FUSE.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).parents[2]
sys.path.append(str(REPO))

from tests.powerloss import unavailable  # noqa: E402
from tests.powerloss_campaign import run_round  # noqa: E402
from tests.test_powerloss_campaign import STEPS  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=500, help="rounds per mode")
    parser.add_argument("--seed", type=int, default=100_000, help="the first seed")
    parser.add_argument(
        "--mode",
        action="append",
        choices=["engine-full", "server-full", "engine-fast"],
        help="which campaigns (default: all three; the server one gets a fifth of the rounds)",
    )
    args = parser.parse_args()
    reason = unavailable()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    modes = args.mode or ["engine-full", "server-full", "engine-fast"]
    rng = random.Random(args.seed)
    rows, failures = [], []
    for mode in modes:
        via, durability = mode.split("-")
        rounds = args.rounds if via == "engine" else max(1, args.rounds // 5)
        cuts = checked = violations = emptied = 0
        started = time.monotonic()
        for offset in range(rounds):
            seed = args.seed + offset
            step = rng.choice(STEPS) if rng.random() < 0.3 else None
            with tempfile.TemporaryDirectory(prefix="powerloss-") as base:
                result = run_round(Path(base), seed, step=step, via=via, durability=durability)
            cuts += len(result.cuts)
            checked += result.checked
            violations += len(result.violations)
            emptied += result.emptied
            if result.violations:
                failures.append((mode, seed, result.cuts, result.violations))
        rows.append((mode, rounds, cuts, checked, violations, emptied, time.monotonic() - started))
    header = ("campaign", "rounds", "cuts", "acked checked", "violations", "emptied", "s")
    widths = (8, 8, 15, 12, 9, 8)
    titles = "".join(f"{h:>{w}}" for h, w in zip(header[1:], widths, strict=True))
    print(f"{header[0]:<14}{titles}")
    for mode, *figures, seconds in rows:
        cells = "".join(f"{f:>{w}}" for f, w in zip(figures, widths[:-1], strict=True))
        print(f"{mode:<14}{cells}{seconds:>8.0f}")
    print("(emptied: files that came back empty; only fast durability may do that, by design)")
    for mode, seed, cut_list, found in failures[:5]:
        print(f"\n{mode} seed {seed} cuts {cut_list}:\n" + "\n".join(found))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
