"""What one atomic change across files and a database costs, against doing it in two calls.

    python tests/benchmarks/bench_mixed.py [--seconds S] [--dir DIR] [--no-strace]

Variants, interleaved in short blocks so a burst of disk activity from elsewhere hits all alike
(durable, history on, as the server runs):

* ``mixed set``: ``apply_changes`` of two 4 KiB writes plus one INSERT, one unit;
* ``two calls``: the same as ``apply_changes`` of the two writes, then a one-statement
  transaction: what an agent does without mixed sets (a crash between them leaves the project
  inconsistent), the baseline;
* ``files only`` and ``database only``: the two halves.

It prints ops/s, mean, p50 and p99 latency and the ratio to ``two calls``. Then, unless
``--no-strace``, it counts fsync and fdatasync calls per change with ``strace -f -c`` over a
child process doing 100 changes of each kind.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from benchstats import percentile

from atomictools import Change, Database, Statement, Workspace

KiB = 1024
BLOCK_SECONDS = 0.2
STRACE_OPS = 100

Op = Callable[[], Awaitable[None]]


@dataclass
class Variant:
    label: str
    op: Op
    samples: list[float] = field(default_factory=list)

    @property
    def measured(self) -> float:
        return sum(self.samples)


def variants(ws: Workspace, db: Database) -> list[Variant]:
    data = os.urandom(4 * KiB)
    counter = iter(range(10**9))

    def files(tag: str) -> list[Change]:
        return [Change("write", f"{tag}-{i}.bin", content=data) for i in range(2)]

    def insert() -> Statement:
        return Statement("INSERT INTO log (n, note) VALUES (?, 'x')", (next(counter),))

    async def mixed() -> None:
        step = Change("sql", db.name, database=db, statements=(insert(),))
        await ws.apply_changes([*files("mixed"), step])

    async def two_calls() -> None:
        await ws.apply_changes(files("two"))
        await db.run_statements([insert()])

    async def files_only() -> None:
        await ws.apply_changes(files("files"))

    async def database_only() -> None:
        await db.run_statements([insert()])

    return [
        Variant("mixed set", mixed),
        Variant("two calls", two_calls),
        Variant("files only", files_only),
        Variant("database only", database_only),
    ]


async def run_block(variant: Variant, seconds: float, record: bool) -> None:
    deadline = time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        await variant.op()
        end = time.perf_counter()
        if record:
            variant.samples.append(end - start)
        if end >= deadline:
            return


async def measure(root: Path, state: Path, seconds: float) -> list[Variant]:
    ws = Workspace([root], state_dir=state)
    async with Database(root / "app.db", name="app.db", create=True) as db:
        db.history = ws.history
        await db.execute("CREATE TABLE log (n INTEGER PRIMARY KEY, note TEXT)")
        found = variants(ws, db)
        for variant in found:
            await run_block(variant, 0.3, record=False)
        while behind := [v for v in found if v.measured < seconds]:
            for variant in behind:
                await run_block(variant, min(BLOCK_SECONDS, seconds - variant.measured), True)
    return found


def report(found: list[Variant]) -> None:
    base = statistics.mean(next(v for v in found if v.label == "two calls").samples)
    print(
        f"{'change':<16}{'ops':>7}{'ops/s':>9}{'mean ms':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'vs two calls':>14}"
    )
    print("-" * 74)
    for variant in found:
        s = sorted(variant.samples)
        mean = statistics.mean(s)
        print(
            f"{variant.label:<16}{len(s):>7}{len(s) / sum(s):>9.0f}{mean * 1e3:>10.3f}"
            f"{statistics.median(s) * 1e3:>9.3f}{percentile(s, 0.99) * 1e3:>9.3f}"
            f"{mean / base:>13.2f}x"
        )


_CHILD = """
import anyio, os, sys
from atomictools import Change, Database, Statement, Workspace
root, state, kind, n = sys.argv[1:5]
async def main():
    ws = Workspace([root], state_dir=state)
    data = os.urandom(4096)
    async with Database(os.path.join(root, "strace.db"), name="strace.db", create=True) as db:
        db.history = ws.history
        await db.execute("CREATE TABLE IF NOT EXISTS log (note TEXT)")
        ins = Statement("INSERT INTO log VALUES ('x')")
        step = Change("sql", db.name, database=db, statements=(ins,))
        files = [Change("write", f"s{j}.bin", content=data) for j in range(2)]
        await ws.apply_changes([*files, step])
        await db.run_statements([ins])
        print("START", flush=True)
        for _ in range(int(n)):
            if kind == "mixed":
                await ws.apply_changes([*files, step])
            else:
                await ws.apply_changes(files)
                await db.run_statements([ins])
anyio.run(main)
"""
_STRACE_ROW = re.compile(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(fsync|fdatasync)$")


def count_syncs(root: Path, state: Path, kind: str) -> float:
    """fsync + fdatasync calls per change (the warm-up is subtracted by a run of 0 changes)."""

    def syscalls(n: int) -> int:
        out = subprocess.run(
            ["strace", "-f", "-c", "-e", "trace=fsync,fdatasync", sys.executable, "-c", _CHILD,
             str(root), str(state), kind, str(n)],
            capture_output=True, text=True, check=True, env=os.environ, cwd=tempfile.gettempdir(),
        )  # fmt: skip
        return sum(
            int(m.group(1)) for line in out.stderr.splitlines() if (m := _STRACE_ROW.match(line))
        )

    return (syscalls(STRACE_OPS) - syscalls(0)) / STRACE_OPS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--no-strace", action="store_true")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="atomictools-bench-mixed-", dir=args.dir))
    try:
        root, state = base / "root", base / "state"
        root.mkdir()
        started = time.perf_counter()
        found = anyio.run(measure, root, state, args.seconds)
        print(
            f"atomictools mixed-set benchmark: dir={base} seconds/variant={args.seconds} "
            f"python={sys.version.split()[0]} sqlite={sqlite3.sqlite_version} "
            f"cpus={os.cpu_count()} loadavg={'/'.join(f'{x:.2f}' for x in os.getloadavg())} "
            f"total={time.perf_counter() - started:.1f}s\n"
        )
        report(found)
        if not args.no_strace and shutil.which("strace"):
            print(f"\nfsync+fdatasync per change (strace -f -c, {STRACE_OPS} changes each)")
            mixed = count_syncs(root, state, "mixed")
            two = count_syncs(root, state, "two")
            print(f"{'mixed set':<16}{mixed:>8.2f}\n{'two calls':<16}{two:>8.2f}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
