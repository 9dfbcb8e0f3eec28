"""What recording history costs: the same changes with history on and off, in the same run.

    python tests/benchmarks/bench_history.py [--seconds S] [--dir DIR] [--no-strace]

Variants, interleaved in short blocks so a burst of disk activity from elsewhere hits all alike:

* durable 4 KiB ``Workspace.write`` over an existing file, history on / off;
* durable ``apply_changes`` of three 4 KiB writes, history on / off.

It prints ops/s, mean, p50 and p99 latency and the on/off ratio (target: at most 1.10 for the
4 KiB write). Then, unless ``--no-strace``, it counts fsync and fdatasync calls per change with
``strace -f -c`` over a child process doing 200 changes each way (target: history adds at
most one per change set).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
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

from atomictools import Change, Workspace

KiB = 1024
TARGET_RATIO = 1.10
BLOCK_SECONDS = 0.2
STRACE_OPS = 200

Op = Callable[[], Awaitable[None]]


@dataclass
class Variant:
    label: str
    history: bool
    op: Op
    samples: list[float] = field(default_factory=list)

    @property
    def measured(self) -> float:
        return sum(self.samples)


def variants(directory: Path, state: Path) -> list[Variant]:
    data = os.urandom(4 * KiB)
    found = []
    for history in (True, False):
        ws = Workspace([directory], state_dir=state, history=history)
        tag = "on" if history else "off"

        async def write(ws: Workspace = ws, tag: str = tag) -> None:
            await ws.write(f"write-{tag}.bin", data)

        async def change_set(ws: Workspace = ws, tag: str = tag) -> None:
            await ws.apply_changes(
                [Change("write", f"set-{tag}-{i}.bin", content=data) for i in range(3)]
            )

        found.append(Variant("durable write 4 KiB", history, write))
        found.append(Variant("apply_changes 3x4 KiB", history, change_set))
    return found


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


async def measure(found: list[Variant], seconds: float) -> None:
    for variant in found:
        await run_block(variant, 0.3, record=False)
    while behind := [v for v in found if v.measured < seconds]:
        for variant in behind:
            await run_block(variant, min(BLOCK_SECONDS, seconds - variant.measured), True)


def report(found: list[Variant]) -> bool:
    print(
        f"{'change':<24}{'history':<9}{'ops':>7}{'ops/s':>9}{'mean ms':>10}{'p50 ms':>9}"
        f"{'p99 ms':>9}{'on/off mean':>13}{'on/off p50':>12}"
    )
    print("-" * 102)
    ok = True
    for label in dict.fromkeys(v.label for v in found):
        on, off = (
            next(v for v in found if v.label == label and v.history is h) for h in (True, False)
        )
        for variant in (on, off):
            s = sorted(variant.samples)
            mean = statistics.mean(s)
            ratio_mean = ratio_p50 = ""
            if variant is on:
                r = mean / statistics.mean(off.samples)
                ratio_mean = f"{r:.2f}x"
                ratio_p50 = f"{statistics.median(s) / statistics.median(off.samples):.2f}x"
                if label.startswith("durable write"):
                    ok = r <= TARGET_RATIO
            print(
                f"{label:<24}{'on' if variant.history else 'off':<9}{len(s):>7}"
                f"{len(s) / sum(s):>9.0f}{mean * 1e3:>10.3f}{statistics.median(s) * 1e3:>9.3f}"
                f"{percentile(s, 0.99) * 1e3:>9.3f}{ratio_mean:>13}{ratio_p50:>12}"
            )
    return ok


_STRACE_ROW = re.compile(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(fsync|fdatasync)$")
"""A row of ``strace -c``: % time, seconds, usecs/call, calls, [errors,] syscall."""

_CHILD = """
import anyio, os, sys
from atomictools import Change, Workspace
root, state, kind, history, n = sys.argv[1:6]
async def main():
    ws = Workspace([root], state_dir=state, history=history == "on")
    data = os.urandom(4096)
    await ws.write("warm.bin", data)
    await ws.apply_changes([Change("write", "warm-set.bin", content=data)])
    print("START", flush=True)
    for i in range(int(n)):
        if kind == "write":
            await ws.write("f.bin", data)
        else:
            await ws.apply_changes([Change("write", f"s{j}.bin", content=data) for j in range(3)])
anyio.run(main)
"""


def count_syncs(directory: Path, state: Path, kind: str, history: str) -> float:
    """fsync + fdatasync calls per change, counted by strace in a child process (the warm-up
    before the loop is counted too, and subtracted by running with 0 changes)."""

    def syscalls(n: int) -> int:
        out = subprocess.run(
            ["strace", "-f", "-c", "-e", "trace=fsync,fdatasync", sys.executable, "-c", _CHILD,
             str(directory), str(state), kind, history, str(n)],
            capture_output=True, text=True, check=True, env=os.environ, cwd=tempfile.gettempdir(),
        )  # fmt: skip
        total = 0
        for line in out.stderr.splitlines():
            match = re.match(
                r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(fsync|fdatasync)$", line
            )
            if match:
                total += int(match.group(1))
        return total

    return (syscalls(STRACE_OPS) - syscalls(0)) / STRACE_OPS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--no-strace", action="store_true")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="atomictools-bench-history-", dir=args.dir))
    try:
        root, state = base / "root", base / "state"
        root.mkdir()
        found = variants(root, state)
        started = time.perf_counter()
        anyio.run(measure, found, args.seconds)
        print(
            f"atomictools history benchmark: dir={base} seconds/variant={args.seconds} "
            f"python={sys.version.split()[0]} cpus={os.cpu_count()} "
            f"loadavg={'/'.join(f'{x:.2f}' for x in os.getloadavg())} "
            f"total={time.perf_counter() - started:.1f}s\n"
        )
        ok = report(found)
        if not args.no_strace and shutil.which("strace"):
            print(f"\nfsync+fdatasync per change (strace -f -c, {STRACE_OPS} changes each)")
            print(f"{'change':<24}{'history on':>12}{'history off':>13}{'extra':>8}")
            for kind, label in (("write", "durable write 4 KiB"), ("set", "apply_changes 3x4 KiB")):
                on = count_syncs(root, state, kind, "on")
                off = count_syncs(root, state, kind, "off")
                extra = on - off
                ok = ok and extra <= 1.0 + 1e-9
                print(f"{label:<24}{on:>12.2f}{off:>13.2f}{extra:>+8.2f}")
        print(
            f"\n{'PASS' if ok else 'FAIL'}: targets are history on/off <= {TARGET_RATIO}x for "
            "the durable 4 KiB write (mean) and at most one extra fsync per change set"
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
