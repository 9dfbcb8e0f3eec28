"""The mutation check of issue 13: remove each sync call of the engine, one at a time, and show
that the power-cut campaign catches it.

    sudo .venv/bin/python tests/benchmarks/mutate_syncs.py [--rounds 30] [--only writer.py:87]

Every call of ``durable_sync(...)`` or ``sync_directory(...)`` and every ``PRAGMA synchronous=``
in ``atomictools/`` is a site (the two helpers themselves are the primitives every site uses).
For each, a copy of the package with that one call made a no-op (or the pragma set to OFF) is
put first on ``PYTHONPATH`` for every process of the campaign (workers, the server, ``atomictools
recover``), and rounds run until one shows a violation or the rounds run out. It prints a table:
site, the code, rounds run, the first violation.
Needs root and FUSE (see ``tests/powerloss.py``).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).parents[2]
sys.path.insert(0, str(REPO))

from tests.powerloss import unavailable  # noqa: E402
from tests.powerloss_campaign import run_round  # noqa: E402
from tests.test_powerloss_campaign import STEPS  # noqa: E402

PACKAGE = REPO / "atomictools"
SYNC = re.compile(r"\b(durable_sync|sync_directory)\(|PRAGMA synchronous=")


@dataclass
class Site:
    path: Path
    line: int
    code: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(PACKAGE)}:{self.line}"


def sites() -> list[Site]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for number, text in enumerate(path.read_text().splitlines(), start=1):
            stripped = text.strip()
            if SYNC.search(stripped) and not stripped.startswith(("def ", "#", '"', "'")):
                found.append(Site(path, number, stripped))
    return found


def mutated(site: Site, into: Path) -> Path:
    """A copy of the package with ``site`` made a no-op; returns the directory to put first."""
    copy = into / "atomictools"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / site.path.relative_to(PACKAGE)
    lines = target.read_text().splitlines(keepends=True)
    text = lines[site.line - 1]
    if "PRAGMA synchronous=" in text:
        text = re.sub(r"synchronous=(\{synchronous\}|FULL|NORMAL)", "synchronous=OFF", text)
    else:
        text = re.sub(r"(fsutil\.)?(durable_sync|sync_directory)\(", "(lambda *_: None)(", text)
    assert text != lines[site.line - 1], f"{site.name}: nothing to mutate"
    lines[site.line - 1] = text
    target.write_text("".join(lines))
    return into


def round_kind(seed: int) -> dict[str, Any]:
    """Rounds cut at random, at a named step, and two kinds that check recovery's own
    durability (see ``test_what_recovery_finished_survives_the_next_cut``)."""
    if seed % 4 == 1:
        if seed % 12 == 1:  # a change set that makes directories and writes only inside them
            return {"step": "changeset.committed", "first": "mkdir-set"}
        if seed % 12 == 5:  # a directory, then a cut inside the write after it
            return {"step": "write.renamed:1", "first": "mkdir"}
        return {"step": STEPS[seed // 4 % len(STEPS)]}
    if seed % 4 == 2:
        return {
            "step": "changeset.apply:1",
            "second_step": "changeset.committed",
            "second_first": "elsewhere",
        }
    if seed % 4 == 3:
        return {
            "step": "changeset.apply:1",
            "second_step": "write.renamed:2",
            "second_first": "writes",
        }
    return {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="rounds per site at most")
    parser.add_argument("--only", action="append", default=[], help="a site, as file.py:line")
    parser.add_argument("--via", choices=["engine", "server"], default="engine")
    args = parser.parse_args()
    reason = unavailable()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    rows = []
    for site in sites():
        if args.only and site.name not in args.only:
            continue
        started = time.monotonic()
        caught, rounds = "", 0
        with tempfile.TemporaryDirectory(prefix="mutant-") as scratch:
            package = mutated(site, Path(scratch))
            for seed in range(1, args.rounds + 1):
                rounds = seed
                with tempfile.TemporaryDirectory(prefix="round-") as base:
                    result = run_round(
                        Path(base),
                        seed,
                        via=args.via,
                        env={"PYTHONPATH": str(package)},
                        **round_kind(seed),
                    )
                if result.violations:
                    caught = result.violations[0].splitlines()[0][:90]
                    break
        seconds = time.monotonic() - started
        rows.append((site.name, site.code[:60], rounds, caught or "NOT CAUGHT", seconds))
        print(
            f"{site.name:<22} {rounds:>3} rounds {seconds:6.1f}s  {caught or 'NOT CAUGHT'}",
            flush=True,
        )
    print()
    print("| site | code | rounds | first violation |")
    print("|---|---|---|---|")
    for name, code, rounds, caught, _seconds in rows:
        print(f"| `{name}` | `{code}` | {rounds} | {caught} |")
    missed = [row for row in rows if row[3] == "NOT CAUGHT"]
    print(f"\n{len(rows) - len(missed)} of {len(rows)} sites caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
