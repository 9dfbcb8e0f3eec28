"""SQLite transactions: db_transaction through the API and the MCP server against raw sqlite3.

    python tests/benchmarks/bench_db.py [--quick] [--durability full|fast] [--dir DIR]
                                        [--profile RUNS]

For 1, 100 and 10,000 single-row INSERTs in one transaction it measures, in the same run:

* raw: a plain ``sqlite3`` connection (``isolation_level=None``), ``BEGIN IMMEDIATE``, N x
  ``cursor.execute(INSERT, params)`` with bound parameters, ``COMMIT``;
* aiosqlite: the same loop on a bare ``aiosqlite`` connection, one ``await execute`` (one
  thread hop) per statement, for reference: what the API would cost if it did not batch
  statements inside aiosqlite's worker thread;
* API: ``await Database(path).run_statements([Statement(INSERT, params), ...])``;
* MCP legacy: ``call_tool("db_transaction", ...)`` on an in-memory ``mcp.Client(server,
  mode="legacy")`` (JSON-RPC over memory streams, the 2025 handshake);
* MCP default: the same with the SDK's default in-process client.

Every variant writes to its own fresh database file of the same kind: WAL, and the same
``synchronous`` level for all (FULL with ``--durability full``, the default; NORMAL with
``fast``), so raw and API do the same fsyncs. Each connection stays open across runs, as the
API's does. Once a file holds 10,000 rows it is emptied between blocks, untimed, so tables stay
alike. The variants run interleaved in short blocks after a warm-up until each has
``--seconds`` of measured time and at least ``--min-runs`` runs, so a burst of disk activity
from elsewhere hits all of them alike. It prints runs, mean, p50 and p99 latency, the ratio to
raw (mean) and the cost per statement. ``--profile RUNS`` then profiles RUNS API and MCP runs of
10,000 statements (cProfile sees the event-loop thread only: time spent waiting for aiosqlite's
worker thread shows up as the selector's poll).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import aiosqlite
from benchstats import percentile
from mcp import Client

from atomictools import Workspace
from atomictools.engine.db.database import Database, Statement
from atomictools.server.app import create_server

COUNTS = (1, 100, 10_000)
IMPLS = ("raw", "aiosqlite", "API", "MCP legacy", "MCP default")
SCHEMA = "CREATE TABLE t (id INTEGER PRIMARY KEY, a INTEGER NOT NULL, b TEXT NOT NULL)"
INSERT = "INSERT INTO t (a, b) VALUES (?, ?)"
RESET_ROWS = 10_000
BLOCK_SECONDS = 0.2
NOTES = """
x raw: mean (p50) latency over raw sqlite3's at the same N; us/stmt: mean latency / N.
aiosqlite: a bare aiosqlite loop, one await (thread hop) per statement, for reference; the API
  runs its statements in batches inside aiosqlite's worker thread instead.
MCP: in-memory client, call_tool("db_transaction") end to end, including the SDK client's
  validation of the result against the tool's outputSchema; legacy = JSON-RPC over memory
  streams, default = the SDK's in-process client."""

Op = Callable[[], Awaitable[None]]


@dataclass
class Variant:
    n: int
    impl: str
    path: Path
    op: Op
    samples: list[float] = field(default_factory=list)  # seconds per transaction
    pending_rows: int = 0  # rows inserted since the file was last emptied

    @property
    def measured(self) -> float:
        return sum(self.samples)


def rows_for(n: int) -> list[tuple[int, str]]:
    return [(i, f"row {i}") for i in range(n)]


def sync_level(durability: str) -> str:
    return "FULL" if durability == "full" else "NORMAL"


def fresh_database(path: Path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(SCHEMA)
    finally:
        conn.close()


def raw_writer(conn: sqlite3.Connection, n: int) -> Op:
    """The minimal transaction, by hand: what the API has to match."""
    params = rows_for(n)
    cursor = conn.cursor()

    async def op() -> None:
        cursor.execute("BEGIN IMMEDIATE")
        for p in params:
            cursor.execute(INSERT, p)
        cursor.execute("COMMIT")

    return op


def aiosqlite_writer(conn: aiosqlite.Connection, n: int) -> Op:
    params = rows_for(n)

    async def op() -> None:
        await conn.execute("BEGIN IMMEDIATE")
        for p in params:
            await conn.execute(INSERT, p)
        await conn.execute("COMMIT")

    return op


def api_writer(db: Database, n: int) -> Op:
    batch = [Statement(INSERT, p) for p in rows_for(n)]

    async def op() -> None:
        await db.run_statements(batch)

    return op


def mcp_writer(client: Client, database: str, n: int) -> Op:
    arguments = {
        "database": database,
        "statements": [{"sql": INSERT, "params": list(p)} for p in rows_for(n)],
    }

    async def op() -> None:
        result = await client.call_tool("db_transaction", arguments)
        if result.is_error:
            raise RuntimeError(f"db_transaction failed: {result.content}")

    return op


async def build_variants(
    args: argparse.Namespace, directory: Path, stack: AsyncExitStack
) -> tuple[list[Variant], dict[str, str]]:
    """The variants, and the MCP protocol version each MCP client negotiated."""
    sync = sync_level(args.durability)
    paths = {
        (n, impl): directory / f"{impl.replace(' ', '-')}-{n}.db" for n in COUNTS for impl in IMPLS
    }
    for path in paths.values():
        fresh_database(path)
    ops: dict[tuple[int, str], Op] = {}
    protocols: dict[str, str] = {}
    for n in COUNTS:
        raw = sqlite3.connect(paths[(n, "raw")], isolation_level=None)
        stack.callback(raw.close)
        raw.execute("PRAGMA journal_mode=WAL")
        raw.execute(f"PRAGMA synchronous={sync}")
        ops[(n, "raw")] = raw_writer(raw, n)

        aio = await aiosqlite.connect(paths[(n, "aiosqlite")], isolation_level=None)
        stack.push_async_callback(aio.close)
        await aio.execute("PRAGMA journal_mode=WAL")
        await aio.execute(f"PRAGMA synchronous={sync}")
        ops[(n, "aiosqlite")] = aiosqlite_writer(aio, n)

        db = Database(paths[(n, "API")], durability=args.durability)
        stack.push_async_callback(db.close)
        ops[(n, "API")] = api_writer(db, n)
    for impl, mode in (("MCP legacy", "legacy"), ("MCP default", "auto")):
        databases = {f"bench{n}": paths[(n, impl)] for n in COUNTS}
        server = create_server(
            Workspace([directory], durability=args.durability), databases=databases
        )
        client = await stack.enter_async_context(Client(server, mode=mode))
        protocols[impl] = str(client.protocol_version)
        for n in COUNTS:
            ops[(n, impl)] = mcp_writer(client, f"bench{n}", n)
    variants = [
        Variant(n, impl, paths[(n, impl)], ops[(n, impl)]) for n in COUNTS for impl in IMPLS
    ]
    return variants, protocols


class Admin:
    """Untimed upkeep on the files through separate plain connections: counting and emptying."""

    def __init__(self, sync: str) -> None:
        self.sync = sync
        self.conns: dict[Path, sqlite3.Connection] = {}

    def conn(self, path: Path) -> sqlite3.Connection:
        if path not in self.conns:
            conn = sqlite3.connect(path, isolation_level=None, timeout=10)
            conn.execute(f"PRAGMA synchronous={self.sync}")
            self.conns[path] = conn
        return self.conns[path]

    def count(self, path: Path) -> int:
        return self.conn(path).execute("SELECT count(*) FROM t").fetchone()[0]

    def empty(self, path: Path) -> None:
        self.conn(path).execute("DELETE FROM t")

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()


async def run_block(variant: Variant, seconds: float, record: bool) -> None:
    """Run the variant for about ``seconds`` (at least once)."""
    deadline = time.perf_counter() + seconds
    clock = time.perf_counter
    while True:
        start = clock()
        await variant.op()
        end = clock()
        variant.pending_rows += variant.n
        if record:
            variant.samples.append(end - start)
        if end >= deadline:
            return


def upkeep(variant: Variant, admin: Admin) -> None:
    if variant.pending_rows >= RESET_ROWS:
        admin.empty(variant.path)
        variant.pending_rows = 0


async def measure(variants: list[Variant], args: argparse.Namespace, admin: Admin) -> None:
    for variant in variants:  # warm-up: connections, statement caches, the schema, the pages
        before = admin.count(variant.path)
        await variant.op()
        after = admin.count(variant.path)
        if after - before != variant.n:
            raise RuntimeError(f"{variant.impl} N={variant.n} inserted {after - before} rows")
        await run_block(variant, args.warmup, record=False)
        upkeep(variant, admin)

    def behind(v: Variant) -> bool:
        return v.measured < args.seconds or len(v.samples) < args.min_runs

    rounds = 0
    while todo := [v for v in variants if behind(v)]:
        rounds += 1
        # Rotate the order so no variant always runs right after the same neighbour.
        shift = rounds % len(todo)
        for variant in todo[shift:] + todo[:shift]:
            await run_block(
                variant, min(BLOCK_SECONDS, max(0.0, args.seconds - variant.measured)), True
            )
            upkeep(variant, admin)


def report(variants: list[Variant]) -> None:
    header = (
        f"{'N':>6}  {'impl':<12}{'runs':>6}{'mean ms':>11}{'p50 ms':>11}{'p99 ms':>11}"
        f"{'x raw (mean)':>14}{'x raw (p50)':>13}{'us/stmt':>10}"
    )
    print(header)
    print("-" * len(header))
    raws = {v.n: v for v in variants if v.impl == "raw"}
    for variant in variants:
        samples = sorted(variant.samples)
        mean = statistics.fmean(samples)
        p50 = percentile(samples, 0.50)
        raw = sorted(raws[variant.n].samples)
        ratio = "1.00x" if variant is raws[variant.n] else f"{mean / statistics.fmean(raw):.2f}x"
        ratio50 = "1.00x" if variant is raws[variant.n] else f"{p50 / percentile(raw, 0.5):.2f}x"
        print(
            f"{variant.n:>6}  {variant.impl:<12}{len(samples):>6}{mean * 1e3:>11.3f}"
            f"{p50 * 1e3:>11.3f}{percentile(samples, 0.99) * 1e3:>11.3f}{ratio:>14}"
            f"{ratio50:>13}{mean * 1e6 / variant.n:>10.1f}"
        )
        if variant.impl == IMPLS[-1] and variant.n != COUNTS[-1]:
            print()


async def profile(variants: list[Variant], runs: int) -> None:
    for impl in ("API", "MCP legacy"):
        variant = next(v for v in variants if v.impl == impl and v.n == COUNTS[-1])
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        for _ in range(runs):
            await variant.op()
        profiler.disable()
        elapsed = time.perf_counter() - started
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("tottime").print_stats(22)
        stats.sort_stats("cumulative").print_stats(30)
        print(
            f"\nprofile of {runs} {impl} transactions of {variant.n} INSERTs "
            f"({elapsed / runs * 1e3:.0f} ms each under the profiler; event-loop thread only):"
        )
        print(out.getvalue())


async def main_async(args: argparse.Namespace, directory: Path) -> None:
    sync = sync_level(args.durability)
    admin = Admin(sync)
    started = time.perf_counter()
    try:
        async with AsyncExitStack() as stack:
            variants, protocols = await build_variants(args, directory, stack)
            await measure(variants, args, admin)
            elapsed = time.perf_counter() - started
            load = "/".join(f"{x:.2f}" for x in os.getloadavg())
            print(
                f"atomictools db_transaction benchmark: dir={directory} "
                f"durability={args.durability} (all variants: journal_mode=WAL, "
                f"synchronous={sync}; one transaction of N single-row INSERTs with bound params)\n"
                f"python={sys.version.split()[0]} sqlite={sqlite3.sqlite_version} "
                f"aiosqlite={version('aiosqlite')} mcp={version('mcp')} cpus={os.cpu_count()} "
                f"loadavg={load} seconds/variant={args.seconds} min-runs={args.min_runs} "
                f"total={elapsed:.1f}s\n"
                + "MCP protocol: "
                + ", ".join(f"{impl} {v}" for impl, v in protocols.items())
                + "\n"
            )
            report(variants)
            print(NOTES)
            if args.profile:
                await profile(variants, args.profile)
    finally:
        admin.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repeats")
    parser.add_argument("--durability", choices=("full", "fast"), default="full")
    parser.add_argument("--dir", type=Path, help="where the databases go (default: temp dir)")
    parser.add_argument("--seconds", type=float, help="measured time per variant (default 3)")
    parser.add_argument("--min-runs", type=int, help="measured runs per variant (default 8)")
    parser.add_argument("--warmup", type=float, default=0.2, help="warm-up time per variant")
    parser.add_argument("--profile", type=int, default=0, metavar="RUNS", help="profile N=10000")
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 0.8 if args.quick else 3.0
    if args.min_runs is None:
        args.min_runs = 3 if args.quick else 8
    directory = Path(tempfile.mkdtemp(prefix="atomictools-bench-db-", dir=args.dir))
    try:
        asyncio.run(main_async(args, directory))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
