"""Change-set cost: ``apply_changes`` of three replaces and one create, this checkout against
another one (``--baseline DIR``, e.g. a ``git worktree`` of an older commit), interleaved.

    .venv/bin/python tests/benchmarks/bench_changeset.py --baseline /tmp/old --rounds 3

Each round runs both checkouts in fresh subprocesses (durability full and fast, on the file
system of ``--dir``) and the table shows the median latency per set and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SETS = 150
CHILD = """
import json, statistics, sys, tempfile, time
from pathlib import Path
import anyio
from atomictools import Workspace
from atomictools import Change

async def main(where, sets):
    out = {}
    for durability in ("full", "fast"):
        with tempfile.TemporaryDirectory(dir=where) as d:
            root = Path(d) / "root"
            root.mkdir()
            for i in range(3):
                (root / f"f{i}.txt").write_text("x\\n")
            ws = Workspace([root], durability=durability, state_dir=Path(d) / "state")
            times = []
            for n in range(sets):
                changes = [
                    Change("write", f"f{i}.txt", content=f"v{n}\\n".encode()) for i in range(3)
                ]
                changes.append(Change("write", f"new{n}.txt", content=b"n"))
                started = time.perf_counter()
                await ws.apply_changes(changes)
                times.append(time.perf_counter() - started)
            out[durability] = statistics.median(times) * 1000
    print(json.dumps(out))

anyio.run(main, sys.argv[1], int(sys.argv[2]))
"""


def run(checkout: Path | None, where: str, sets: int) -> dict[str, float]:
    env = dict(os.environ)
    if checkout is not None:
        env["PYTHONPATH"] = str(checkout)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, where, str(sets)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return dict(json.loads(done.stdout))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sets", type=int, default=SETS)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the files live")
    args = parser.parse_args()
    here: dict[str, list[float]] = {"full": [], "fast": []}
    base: dict[str, list[float]] = {"full": [], "fast": []}
    for _ in range(args.rounds):
        for durability, ms in run(None, args.dir, args.sets).items():
            here[durability].append(ms)
        if args.baseline is not None:
            for durability, ms in run(args.baseline, args.dir, args.sets).items():
                base[durability].append(ms)
    print(f"{'durability':<12}{'this ms':>10}{'baseline ms':>14}{'ratio':>8}")
    for durability in ("full", "fast"):
        mine = statistics.median(here[durability])
        if base[durability]:
            theirs = statistics.median(base[durability])
            print(f"{durability:<12}{mine:>10.2f}{theirs:>14.2f}{mine / theirs:>7.2f}x")
        else:
            print(f"{durability:<12}{mine:>10.2f}{'-':>14}{'-':>8}")


if __name__ == "__main__":
    main()
