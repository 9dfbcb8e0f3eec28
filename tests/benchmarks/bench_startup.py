"""Startup time: the first served tool call on a 100,000-file root against an empty root.

    python tests/benchmarks/bench_startup.py [--rounds 10] [--dir DIR] [--files N] [--fresh]

The issue: the temp-file sweep must not make startup slow on large trees; the time to the
first served tool call on a root with 100,000 files must stay under 1.2x that of an empty root.

It builds once (cached under ``--dir``, default the temp dir) a root with ``--files`` files in
``--dirs`` directories plus ``--orphans`` orphaned temp files (our name pattern, an hour old,
unlocked: what a SIGKILLed writer leaves), and an empty root (just ``small.txt``, which both
roots have for the ``read_text_file`` call). Then, in the same run:

* startup: ``--rounds`` interleaved rounds (after one warm-up run each; the order alternates
  every round) of ``python -m atomictools serve --root ROOT --state-dir STATE`` as a real stdio
  subprocess driven by ``mcp.Client(StdioServerParameters(...), mode="legacy")``, timed from
  spawn to the first successful ``list_allowed_directories`` result and to the following
  ``read_text_file`` result. PASS when the mean time to the first call is under 1.2x empty.
* the full sweep: ``atomictools recover ROOT`` of the large root (subprocess, wall time), the
  same walk in-process (``sweep_temps``, dry run), and the CLI's import floor (``--version``);
  this is why the sweep runs in the background instead of before the first call.
* the background sweep really runs: one server is left up on each root while a client keeps
  calling ``read_text_file``; the orphans must disappear once ``sweep_delay`` has passed. The
  call latencies before, during and after the sweep show what the sweep costs calls it overlaps.
* diagnostic: the startup rounds again with the sweep delay forced to 0 (the server started
  through a wrapper that patches ``sweep_later`` in the child process only), to show
  what the 2 s delay buys: with it, the timed window of the startup rounds never meets the sweep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from benchstats import percentile
from mcp import Client, StdioServerParameters
from mcp.types import CallToolResult, TextContent

from atomictools.engine.changes.sweep import sweep_temps
from atomictools.engine.durable.tempfiles import is_temp_name, temp_name_for
from atomictools.engine.sandbox import Sandbox
from atomictools.server.runtime import ServerOptions

TARGET_RATIO = 1.2
SMALL_NAME = "small.txt"
SMALL_TEXT = "hello from the startup benchmark\n"
ORPHAN_AGE = 3600.0  # seconds: far beyond the sweep's grace period
SWEEP_DELAY = ServerOptions().sweep_delay
# Runs the real CLI with the background sweep starting at once (diagnostic only; the patch
# lives in the child process, the package is not changed).
NO_DELAY_WRAPPER = (
    "import sys\n"
    "import atomictools.server.app as app\n"
    "original = app.sweep_later\n"
    "app.sweep_later = lambda workspace, delay, startup: original(workspace, 0.0, startup)\n"
    "from atomictools.cli.commands import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@dataclass
class Tree:
    label: str
    root: Path
    files: int
    orphan_dirs: list[Path] = field(default_factory=list)
    orphans_wanted: int = 0

    def orphans(self) -> list[Path]:
        """The orphaned temps present now (they are only ever planted in ``orphan_dirs``)."""
        return [p for d in self.orphan_dirs for p in d.iterdir() if is_temp_name(p.name)]

    def plant_orphans(self) -> int:
        """Top the orphans up to ``orphans_wanted`` (the sweep removes them); returns how many."""
        present = len(self.orphans())
        for i in range(present, self.orphans_wanted):
            directory = self.orphan_dirs[i % len(self.orphan_dirs)]
            path = directory / temp_name_for(f"f{i:03d}.txt")
            path.write_bytes(b"half-written content of a writer that was SIGKILLed\n")
            old = time.time() - ORPHAN_AGE
            os.utime(path, (old, old))
        return self.orphans_wanted - present


@dataclass
class Series:
    label: str
    first_call: list[float] = field(default_factory=list)  # seconds from spawn
    first_read: list[float] = field(default_factory=list)
    teardown: list[float] = field(default_factory=list)


# -- the trees ---------------------------------------------------------------------------------


def build_trees(cache: Path, files: int, dirs: int, orphans: int, fresh: bool) -> list[Tree]:
    """The empty and the large root, built once and reused while the marker says complete."""
    per_dir = -(-files // dirs)
    big_dir = cache / f"files-{files}-dirs-{dirs}"
    empty_dir = cache / "empty"
    marker = big_dir / "complete.json"
    if fresh:
        shutil.rmtree(big_dir, ignore_errors=True)
        shutil.rmtree(empty_dir, ignore_errors=True)
    for directory in (empty_dir / "root",):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / SMALL_NAME).write_text(SMALL_TEXT)
    big_root = big_dir / "root"
    if not marker.exists():
        shutil.rmtree(big_dir, ignore_errors=True)
        started = time.perf_counter()
        print(f"building {files:,} files in {dirs:,} directories under {big_root} ...", flush=True)
        made = 0
        for d in range(dirs):
            sub = big_root / f"d{d:04d}"
            sub.mkdir(parents=True)
            for f in range(min(per_dir, files - made)):
                (sub / f"f{f:03d}.txt").write_bytes(b"x" * (64 + f % 64))
                made += 1
        (big_root / SMALL_NAME).write_text(SMALL_TEXT)
        marker.write_text(json.dumps({"files": made, "dirs": dirs}))
        print(f"built in {time.perf_counter() - started:.1f}s (cached for later runs)\n")
    step = max(1, dirs // max(1, orphans))
    orphan_dirs = [big_root / f"d{d:04d}" for d in range(0, dirs, step)][:orphans]
    orphan_dirs[-1:] = [big_root / f"d{dirs - 1:04d}"]  # the last directory walked, roughly
    big = Tree("100k files" if files == 100_000 else f"{files:,} files", big_root, files)
    big.orphan_dirs, big.orphans_wanted = orphan_dirs, orphans
    big.plant_orphans()
    return [Tree("empty", empty_dir / "root", 0), big]


# -- one server --------------------------------------------------------------------------------


def server_params(tree: Tree, state: Path, no_delay: bool = False) -> StdioServerParameters:
    cli = ["serve", "--root", str(tree.root), "--state-dir", str(state)]
    if no_delay:
        return StdioServerParameters(command=sys.executable, args=["-c", NO_DELAY_WRAPPER, *cli])
    return StdioServerParameters(command=sys.executable, args=["-m", "atomictools", *cli])


def text_of(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


def check(result: CallToolResult, expected: str, what: str) -> None:
    if result.is_error or expected not in text_of(result):
        raise RuntimeError(f"{what} failed: {text_of(result)[:500]}")


async def allowed_directories(client: Client, tree: Tree) -> None:
    result = await client.call_tool("list_allowed_directories", {})
    check(result, str(tree.root.resolve()), "list_allowed_directories")


async def read_small(client: Client) -> None:
    check(await client.call_tool("read_text_file", {"path": SMALL_NAME}), "hello", "read_text_file")


async def time_startup(tree: Tree, state: Path, series: Series | None, no_delay: bool) -> None:
    """Spawn a server, time the first two calls from spawn, shut it down."""
    clock = time.perf_counter
    params = server_params(tree, state, no_delay)
    spawned = clock()
    async with Client(params, mode="legacy") as client:
        await allowed_directories(client, tree)
        first_call = clock() - spawned
        await read_small(client)
        first_read = clock() - spawned
        closing = clock()
    if series is not None:
        series.first_call.append(first_call)
        series.first_read.append(first_read)
        series.teardown.append(clock() - closing)


async def startup_rounds(
    trees: list[Tree], state_root: Path, rounds: int, no_delay: bool = False
) -> list[Series]:
    series = [Series(t.label) for t in trees]
    tag = "nodelay" if no_delay else "default"
    states = [state_root / f"{tag}-{i}" for i in range(len(trees))]
    for tree, state in zip(trees, states, strict=True):  # warm-up: imports, page cache
        await time_startup(tree, state, None, no_delay)
    for r in range(rounds):
        order = list(range(len(trees)))
        if r % 2:
            order.reverse()
        for i in order:
            trees[i].plant_orphans()  # the sweep (if it ran) must find work again
            await time_startup(trees[i], states[i], series[i], no_delay)
    return series


# -- the sweep ---------------------------------------------------------------------------------


def time_command(argv: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode not in (0, 1):  # 1: something was fixed
        raise RuntimeError(f"{argv} exited {done.returncode}: {done.stderr[-500:]}")
    return elapsed, done.stdout


def full_sweep(tree: Tree, state: Path, repeats: int) -> dict[str, object]:
    """``atomictools recover`` of the large root, the in-process walk, and the CLI floor."""
    recover: list[float] = []
    removed_first = scanned = 0
    for i in range(repeats):
        if i == 0:
            tree.plant_orphans()
        planted = len(tree.orphans())
        argv = [sys.executable, "-m", "atomictools", "recover", str(tree.root)]
        elapsed, out = time_command([*argv, "--state-dir", str(state), "--json"])
        report = json.loads(out)
        recover.append(elapsed)
        scanned = report["scanned"]
        if i == 0:
            removed_first = len(report["removedTempFiles"])
            if removed_first != planted or tree.orphans():
                raise RuntimeError(f"recover removed {removed_first} of {planted} orphans")
    walk = []
    sandbox = Sandbox([tree.root])
    for _ in range(repeats):
        started = time.perf_counter()
        sweep_temps(sandbox, journal_dir=Path(tempfile.mkdtemp()) / "journals", dry_run=True)
        walk.append(time.perf_counter() - started)
    floor = [
        time_command([sys.executable, "-m", "atomictools", "--version"])[0] for _ in range(repeats)
    ]
    return {
        "recover": recover,
        "walk": walk,
        "floor": floor,
        "scanned": scanned,
        "removed": removed_first,
    }


@dataclass
class Watch:
    label: str
    planted: int = 0
    left: int = 0
    ready: float = 0.0  # seconds from spawn until the handshake was done (lifespan has run)
    gone_after: float | None = None  # seconds from spawn until the last orphan was gone
    phases: dict[str, list[float]] = field(
        default_factory=lambda: {"before": [], "during": [], "after": []}
    )

    @property
    def sweep_start(self) -> float:
        """When the sweep began, about: the lifespan starts it just before the handshake."""
        return self.ready + SWEEP_DELAY

    @property
    def sweep_seconds(self) -> float | None:
        return None if self.gone_after is None else self.gone_after - self.sweep_start


async def watch_sweep(
    tree: Tree, state: Path, window: float, sweep_seconds: float | None = None
) -> Watch:
    """Keep a server up ``window`` seconds past its start, calling read_text_file in a loop.

    Calls are binned by when they started: before the sweep, during it (until the orphans
    are gone; for a root without orphans, for ``sweep_seconds``) and after it.
    """
    tree.plant_orphans()
    watch = Watch(tree.label, planted=len(tree.orphans()))
    clock = time.perf_counter
    spawned = clock()
    async with Client(server_params(tree, state), mode="legacy") as client:
        watch.ready = clock() - spawned
        await allowed_directories(client, tree)
        last_poll = 0.0
        while (now := clock() - spawned) < watch.ready + window:
            started = clock()
            await read_small(client)
            latency = clock() - started
            if tree.orphan_dirs:
                end = watch.gone_after
            else:
                end = None if sweep_seconds is None else watch.sweep_start + sweep_seconds
            if now < watch.sweep_start:
                watch.phases["before"].append(latency)
            elif end is None or now <= end:
                watch.phases["during"].append(latency)
            else:
                watch.phases["after"].append(latency)
            if tree.orphan_dirs and watch.gone_after is None and now - last_poll >= 0.01:
                last_poll = now
                if not tree.orphans():
                    watch.gone_after = clock() - spawned
            await anyio.sleep(0.002)
    watch.left = len(tree.orphans())
    return watch


# -- the report --------------------------------------------------------------------------------


def summary(samples: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)
    return statistics.fmean(ordered), percentile(ordered, 0.5), percentile(ordered, 0.9)


def startup_table(title: str, series: list[Series]) -> float:
    """Prints the table; returns the mean ratio of the first call (large vs empty)."""
    header = (
        f"{'root':<12}{'call':<26}{'runs':>5}{'mean ms':>9}{'p50 ms':>8}{'p90 ms':>8}"
        f"{'ratio mean':>11}{'ratio p50':>10}"
    )
    print(title)
    print(header)
    print("-" * len(header))
    base = series[0]
    ratio = 0.0
    for attr, call in (
        ("first_call", "list_allowed_directories"),
        ("first_read", "+ read_text_file"),
    ):
        base_mean, base_p50, _ = summary(getattr(base, attr))
        for s in series:
            mean, p50, p90 = summary(getattr(s, attr))
            if attr == "first_call" and s is not base:
                ratio = mean / base_mean
            print(
                f"{s.label:<12}{call:<26}{len(getattr(s, attr)):>5}{mean * 1e3:>9.1f}"
                f"{p50 * 1e3:>8.1f}{p90 * 1e3:>8.1f}{mean / base_mean:>10.2f}x"
                f"{p50 / base_p50:>9.2f}x"
            )
    teardown = ", ".join(f"{s.label} {statistics.fmean(s.teardown) * 1e3:.0f} ms" for s in series)
    print(f"(times from spawn; not timed: client teardown, mean {teardown})\n")
    return ratio


def sweep_table(tree: Tree, sweep: dict[str, object]) -> None:
    def row(label: str, samples: object) -> str:
        assert isinstance(samples, list)
        mean, p50, _ = summary(samples)
        return f"{label:<52}{len(samples):>5}{mean * 1e3:>10.1f}{p50 * 1e3:>9.1f}"

    print(f"full sweep of the {tree.label} root ({sweep['scanned']:,} entries scanned)")
    header = f"{'':<52}{'runs':>5}{'mean ms':>10}{'p50 ms':>9}"
    print(header)
    print("-" * len(header))
    print(row("atomictools recover ROOT (subprocess, wall)", sweep["recover"]))
    print(row("  sweep_temps walk only (in-process, dry run)", sweep["walk"]))
    print(row("  CLI floor: python -m atomictools --version", sweep["floor"]))
    print(f"first recover removed {sweep['removed']} orphaned temp file(s)\n")


def watch_table(watches: list[Watch]) -> None:
    print(
        "the background sweep: one server per root left up, read_text_file in a loop; latency by"
        f" when the call started: before the sweep (handshake + {SWEEP_DELAY:g}s), during it"
        " (until the last orphan is gone), after"
    )
    header = f"{'root':<12}{'phase':<9}{'calls':>6}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}"
    print(header)
    print("-" * len(header))
    for w in watches:
        for phase, samples in w.phases.items():
            if not samples:
                print(f"{w.label:<12}{phase:<9}{0:>6}")
                continue
            ordered = sorted(samples)
            print(
                f"{w.label:<12}{phase:<9}{len(ordered):>6}{percentile(ordered, 0.5) * 1e3:>8.2f}"
                f"{percentile(ordered, 0.99) * 1e3:>8.2f}{ordered[-1] * 1e3:>8.2f}"
            )
    print()


# -- main --------------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace, trees: list[Tree], state_root: Path) -> bool:
    empty, big = trees
    timed = time.perf_counter()
    default = await startup_rounds(trees, state_root, args.rounds)
    startup_elapsed = time.perf_counter() - timed

    sweep = full_sweep(big, state_root / "recover", args.sweep_repeats)
    walk_mean = statistics.fmean(sweep["walk"])  # type: ignore[arg-type]
    # Long enough for the delay, the walk (slower in the server: it shares the GIL) and margin.
    window = SWEEP_DELAY + 4 * walk_mean + 2.0
    big_watch = await watch_sweep(big, state_root / "watch-big", window)
    sweep_seconds = big_watch.sweep_seconds or window - SWEEP_DELAY
    empty_watch = await watch_sweep(empty, state_root / "watch-empty", window, sweep_seconds)

    nodelay: list[Series] = []
    if args.diag_rounds:
        nodelay = await startup_rounds(trees, state_root, args.diag_rounds, no_delay=True)

    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"atomictools startup benchmark: roots={empty.root.parent.parent} "
        f"files={big.files:,} orphans={big.orphans_wanted} rounds={args.rounds} "
        f"python={sys.version.split()[0]} cpus={os.cpu_count()} loadavg={load} "
        f"startup rounds={startup_elapsed:.1f}s\n"
    )
    ratio = startup_table(
        f"time to the first served tool call (sweep_delay {SWEEP_DELAY:g}s, the default)", default
    )
    passed = ratio < TARGET_RATIO
    sweep_table(big, sweep)
    watch_table([big_watch, empty_watch])
    swept = big_watch.left == 0 and big_watch.gone_after is not None
    if nodelay:
        startup_table("diagnostic: the same with the sweep starting at once (delay 0)", nodelay)

    print(
        f"{'PASS' if passed else 'FAIL'}: the first call on the {big.label} root takes "
        f"{ratio:.2f}x the empty root (mean; target < {TARGET_RATIO}x)"
    )
    if swept:
        print(
            f"PASS: the background sweep removed all {big_watch.planted} orphaned temp files "
            f"{big_watch.gone_after:.2f}s after spawn: ready at {big_watch.ready:.2f}s, "
            f"+ sweep_delay {SWEEP_DELAY:g}s, + ~{big_watch.sweep_seconds:.2f}s of sweep"
        )
    else:
        print(
            f"FAIL: {big_watch.left} of {big_watch.planted} orphaned temp files still there "
            f"{big_watch.ready + window:.1f}s after spawn"
        )
    return passed and swept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="interleaved startup rounds")
    parser.add_argument("--files", type=int, default=100_000, help="files in the large root")
    parser.add_argument("--dirs", type=int, default=1000, help="directories they are spread over")
    parser.add_argument("--orphans", type=int, default=8, help="orphaned temp files to plant")
    parser.add_argument("--dir", type=Path, help="where the roots are cached (default: temp dir)")
    parser.add_argument("--fresh", action="store_true", help="rebuild the cached roots")
    parser.add_argument("--sweep-repeats", type=int, default=3, help="runs of the full sweep")
    parser.add_argument(
        "--diag-rounds", type=int, default=5, help="rounds with the sweep delay 0 (0: skip)"
    )
    args = parser.parse_args(argv)
    cache = (args.dir or Path(tempfile.gettempdir())) / "atomictools-bench-startup"
    trees = build_trees(cache, args.files, args.dirs, args.orphans, args.fresh)
    state_root = Path(tempfile.mkdtemp(prefix="atomictools-startup-state-"))
    started = time.perf_counter()
    try:
        ok = anyio.run(main_async, args, trees, state_root)
    finally:
        shutil.rmtree(state_root, ignore_errors=True)
    print(f"total {time.perf_counter() - started:.1f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
