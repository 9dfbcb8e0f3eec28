"""Write latency: atomictools' Workspace.write against the raw POSIX loop it is built on.

    python tests/benchmarks/bench_write.py [--seconds S] [--dir DIR] [--backend trio]

For 4 KiB and 1 MiB it measures, in the same run:

* raw durable: os.open(temp, O_CREAT|O_EXCL|O_WRONLY), os.write loop, os.fsync, os.close,
  os.replace over the target, os.fsync(directory fd);
* API durable: ``await Workspace([dir], durability="full").write(name, data)``;
* raw fast / API fast: the same without the fsyncs.

The variants run interleaved in short blocks until each has ``--seconds`` of measured time (after
a warm-up), so a burst of disk activity from elsewhere hits all of them alike. It prints ops/s,
mean, p50 and p99 latency, and API/raw ratios; the target is API durable 4 KiB within 1.3x of the
raw loop (mean latency). ``--profile N`` also profiles N API durable 4 KiB writes.
"""

from __future__ import annotations

import argparse
import atexit
import cProfile
import io
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from benchstats import percentile

from atomictools import Workspace

KiB = 1024
MiB = 1024 * KiB
SIZES = (4 * KiB, 1 * MiB)
TARGET_RATIO = 1.3
BLOCK_SECONDS = 0.2

Op = Callable[[], Awaitable[None]]


@dataclass
class Variant:
    label: str
    kind: str  # "raw" or "api"
    durability: str  # "full" or "fast"
    size: int
    op: Op
    samples: list[float] = field(default_factory=list)  # seconds per op

    @property
    def measured(self) -> float:
        return sum(self.samples)


def raw_writer(dir_fd: int, target: str, data: bytes, durable: bool) -> Op:
    """The minimal atomic replace, by hand: what the API has to match."""
    counter = 0

    async def op() -> None:
        nonlocal counter
        counter += 1
        temp = f".{target}.{counter}.rawtmp"
        fd = os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644, dir_fd=dir_fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, target, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        if durable:
            os.fsync(dir_fd)

    return op


def api_writer(workspace: Workspace, target: str, data: bytes) -> Op:
    async def op() -> None:
        await workspace.write(target, data)

    return op


def size_label(size: int) -> str:
    return f"{size // MiB} MiB" if size >= MiB else f"{size // KiB} KiB"


def _state_dir() -> Path:
    """A private state directory (history and journals), removed at exit: the API variants
    record history as users get it by default (``bench_history.py`` compares it with off)."""
    state = Path(tempfile.mkdtemp(prefix="atomictools-bench-state-"))
    atexit.register(shutil.rmtree, state, ignore_errors=True)
    return state


def build_variants(directory: Path, dir_fd: int) -> list[Variant]:
    variants = []
    workspaces = {
        d: Workspace([directory], durability=d, state_dir=_state_dir()) for d in ("full", "fast")
    }
    for size in SIZES:
        data = os.urandom(size)
        for durability in ("full", "fast"):
            name = f"{durability}-{size}"
            label = f"{'durable' if durability == 'full' else 'fast'} {size_label(size)}"
            raw = raw_writer(dir_fd, f"raw-{name}.bin", data, durability == "full")
            api = api_writer(workspaces[durability], f"api-{name}.bin", data)
            variants.append(Variant(label, "raw", durability, size, raw))
            variants.append(Variant(label, "api", durability, size, api))
    return variants


async def run_block(variant: Variant, seconds: float, record: bool) -> None:
    deadline = time.perf_counter() + seconds
    clock = time.perf_counter
    while True:
        start = clock()
        await variant.op()
        end = clock()
        if record:
            variant.samples.append(end - start)
        if end >= deadline:
            return


async def measure(variants: list[Variant], seconds: float, warmup: float) -> None:
    for variant in variants:  # warm-up: caches, worker threads, the files exist
        await run_block(variant, warmup, record=False)
    while True:
        behind = [v for v in variants if v.measured < seconds]
        if not behind:
            return
        for variant in behind:
            await run_block(variant, min(BLOCK_SECONDS, seconds - variant.measured), record=True)


def report(variants: list[Variant]) -> bool:
    header = (
        f"{'write':<14}{'impl':<6}{'ops':>8}{'ops/s':>10}{'mean ms':>10}{'p50 ms':>9}"
        f"{'p99 ms':>9}{'API/raw mean':>14}{'API/raw p50':>13}{'+ms p50':>9}"
    )
    print(header)
    print("-" * len(header))
    ok = True
    verdicts = []
    by_key = {(v.label, v.kind): v for v in variants}
    for variant in variants:
        samples = sorted(variant.samples)
        mean = statistics.fmean(samples)
        p50 = percentile(samples, 0.50)
        ratio = ratio50 = extra = ""
        if variant.kind == "api":
            raw = by_key[(variant.label, "raw")]
            raw_sorted = sorted(raw.samples)
            r = mean / statistics.fmean(raw_sorted)
            ratio = f"{r:.2f}x"
            ratio50 = f"{p50 / percentile(raw_sorted, 0.50):.2f}x"
            extra = f"{(p50 - percentile(raw_sorted, 0.50)) * 1e3:+.3f}"
            if variant.durability == "full" and variant.size == 4 * KiB:
                passed = r <= TARGET_RATIO
                ok = passed
                verdicts.append(
                    f"{'PASS' if passed else 'FAIL'}: API durable 4 KiB mean latency is "
                    f"{r:.2f}x the raw loop (target <= {TARGET_RATIO}x)"
                )
        print(
            f"{variant.label:<14}{variant.kind:<6}{len(samples):>8}"
            f"{len(samples) / sum(samples):>10.0f}{mean * 1e3:>10.3f}{p50 * 1e3:>9.3f}"
            f"{percentile(samples, 0.99) * 1e3:>9.3f}{ratio:>14}{ratio50:>13}{extra:>9}"
        )
    print("\n+ms p50: the API's extra latency per call at the median (its fixed overhead).")
    for line in verdicts:
        print(line)
    return ok


async def profile(directory: Path, count: int) -> None:
    workspace = Workspace([directory], durability="full", state_dir=_state_dir())
    data = os.urandom(4 * KiB)
    for _ in range(50):
        await workspace.write("profiled.bin", data)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(count):
        await workspace.write("profiled.bin", data)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).sort_stats("tottime")
    stats.print_stats(25)
    print(f"\nprofile of {count} API durable 4 KiB writes (sorted by own time):")
    print(out.getvalue())


async def main_async(args: argparse.Namespace, directory: Path) -> bool:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        variants = build_variants(directory, dir_fd)
        started = time.perf_counter()
        await measure(variants, args.seconds, args.warmup)
        elapsed = time.perf_counter() - started
    finally:
        os.close(dir_fd)
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"atomictools write benchmark: dir={directory} backend={args.backend} "
        f"seconds/variant={args.seconds} python={sys.version.split()[0]} "
        f"cpus={os.cpu_count()} loadavg={load} total={elapsed:.1f}s\n"
    )
    ok = report(variants)
    if args.profile:
        await profile(directory, args.profile)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.5, help="measured time per variant")
    parser.add_argument("--warmup", type=float, default=0.3, help="warm-up time per variant")
    parser.add_argument("--dir", type=Path, help="where to write (default: the temp dir)")
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="profile N writes")
    args = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="atomictools-bench-", dir=args.dir))
    try:
        ok = anyio.run(main_async, args, directory, backend=args.backend)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
