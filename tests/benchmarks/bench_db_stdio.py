"""The database tools end to end over stdio: a 10,000-statement transaction, a 100,000-row query.

    python tests/benchmarks/bench_db_stdio.py [--statements N] [--rounds R] [--rows M]
        [--durability full|fast]

The real server (``python -m atomictools serve --db bench=FILE``, started with this process's
environment from a neutral cwd, so ``PYTHONPATH=/other/checkout`` measures that checkout) is
driven over stdio two ways: the Python SDK client (``mcp.Client(..., mode="legacy")``) and raw
JSON-RPC lines written and read by this process (no client-side validation).

1. **Transaction.** ``db_transaction`` of ``--statements`` single-row INSERTs with bound
   parameters, against raw ``sqlite3`` in this process doing the same (``BEGIN IMMEDIATE``, N x
   ``execute``, ``COMMIT``) on its own file with the same journal mode (WAL) and ``synchronous``
   level. The three run interleaved, ``--rounds`` rounds, the order rotating; tables are
   emptied between rounds, untimed. Printed: p50 and mean per variant and the ratio to raw
   (target: at most 3x).
2. **Query memory.** A file of ``--rows`` rows ``(id, name, score)``; a 1-row ``db_query`` warms
   the server up, then ``SELECT *`` with ``maxRows`` = M runs over raw JSON-RPC. "One copy" is
   what the rows cost as Python objects (tracemalloc of ``sqlite3`` ``fetchall`` in this
   process). Measured: the server's own Python allocations at the peak of the call (a second
   server runs with tracemalloc on and reports on SIGUSR1, before and after the call), and,
   for information, its VmHWM growth over three calls (which also counts the allocator's
   arenas, SQLite's page cache and the pipe's buffer). The rows once plus the reply's JSON text
   is about 1.5 copies (target: at most 2).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from bench_db import INSERT, fresh_database
from bench_tree import RawServer
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client

MiB = 1024 * 1024
TARGET_TRANSACTION = 3.0
TARGET_COPIES = 2.0


def server_command(root: Path, db: Path, state: Path, durability: str) -> list[str]:
    command = [sys.executable, "-m", "atomictools", "serve", "--root", str(root)]
    return [*command, "--db", f"bench={db}", "--state-dir", str(state), "--durability", durability]


def empty(path: Path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("DELETE FROM t")
    finally:
        conn.close()


def start_raw(command: list[str], log: Path) -> RawServer:
    """bench_tree's raw JSON-RPC driver on ``command``, with this process's environment (so
    PYTHONPATH reaches the server) from a neutral cwd."""
    params = StdioServerParameters(
        command=command[0], args=command[1:], env=dict(os.environ), cwd=tempfile.gettempdir()
    )
    return RawServer("atomictools", params, log)


def call(server: RawServer, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """One tools/call; its reply, or an error when the tool reports one."""
    _, reply = server.request("tools/call", {"name": tool, "arguments": arguments})
    if reply["result"].get("isError"):
        raise RuntimeError(f"{tool} failed: {json.dumps(reply)[:500]}")
    return reply


def vm(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


# -- 1. the transaction -------------------------------------------------------------------------


def statements(n: int) -> list[dict[str, Any]]:
    return [{"sql": INSERT, "params": [i, f"row {i}"]} for i in range(n)]


async def transaction_rounds(args: argparse.Namespace, base: Path) -> dict[str, list[float]]:
    level = "FULL" if args.durability == "full" else "NORMAL"
    files = {name: base / f"{name}.db" for name in ("raw", "sdk", "rpc")}
    for path in files.values():
        fresh_database(path)
    raw = sqlite3.connect(files["raw"], isolation_level=None)
    raw.execute(f"PRAGMA synchronous={level}")
    batch = statements(args.statements)
    params = [s["params"] for s in batch]
    samples: dict[str, list[float]] = {"raw sqlite3": [], "MCP, SDK client": [], "MCP, raw": []}

    def raw_transaction() -> None:
        cursor = raw.cursor()
        cursor.execute("BEGIN IMMEDIATE")
        for p in params:
            cursor.execute(INSERT, p)
        cursor.execute("COMMIT")

    # Two servers (one per driver), each on its own file, so every variant's table starts alike.
    sdk_params = StdioServerParameters(
        command=sys.executable,
        args=server_command(base, files["sdk"], base / "state-sdk", args.durability)[1:],
        cwd=tempfile.gettempdir(),
        env=dict(os.environ),  # the SDK passes only a few variables; PYTHONPATH must reach it
    )
    rpc = start_raw(
        server_command(base, files["rpc"], base / "state-rpc", args.durability), base / "rpc.log"
    )
    arguments = {"database": "bench", "statements": batch}
    try:
        async with Client(stdio_client(sdk_params), mode="legacy") as client:

            async def sdk_transaction() -> None:
                result = await client.call_tool("db_transaction", arguments)
                if result.is_error:
                    raise RuntimeError(f"db_transaction failed: {result.content}")

            variants: list[tuple[str, Callable[[], Any], Path]] = [
                ("raw sqlite3", raw_transaction, files["raw"]),
                ("MCP, SDK client", sdk_transaction, files["sdk"]),
                ("MCP, raw", lambda: call(rpc, "db_transaction", arguments), files["rpc"]),
            ]
            for warm in range(2 + args.rounds):
                for name, op, path in variants[warm % 3 :] + variants[: warm % 3]:
                    start = time.perf_counter()
                    outcome = op()
                    if hasattr(outcome, "__await__"):
                        await outcome
                    elapsed = time.perf_counter() - start
                    if warm >= 2:
                        samples[name].append(elapsed)
                    empty(path)
    finally:
        rpc.close()
        raw.close()
    return samples


# -- 2. query memory ----------------------------------------------------------------------------


def one_copy(path: Path) -> int:
    """Bytes the rows take as Python objects (sqlite3 tuples), by tracemalloc."""
    with sqlite3.connect(path) as conn:
        tracemalloc.start()
        rows = conn.execute("SELECT * FROM q").fetchall()
        size = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del rows
    return size


# The server with tracemalloc on: SIGUSR1 appends "current peak" to the file in argv[1] and
# resets the peak, so the bench can bracket one call.
TRACED_SERVER = """
import signal, sys, tracemalloc
tracemalloc.start(1)
def report(signum, frame):
    current, peak = tracemalloc.get_traced_memory()
    with open(sys.argv[1], "a") as log:
        log.write(f"{current} {peak}\\n")
    tracemalloc.reset_peak()
signal.signal(signal.SIGUSR1, report)
from atomictools.cli.commands import main
sys.exit(main(sys.argv[2:]))
"""


def traced_peak(args: argparse.Namespace, base: Path, db: Path) -> int:
    """Bytes the server allocated (Python objects, tracemalloc) at the peak of one query."""
    log = base / "traced.log"
    command = server_command(base, db, base / "state-traced", args.durability)
    traced = [sys.executable, "-c", TRACED_SERVER, str(log), *command[3:]]
    server = start_raw(traced, base / "traced-server.log")
    query = {"database": "bench", "sql": "SELECT * FROM q"}
    try:
        call(server, "db_query", {**query, "maxRows": 1})
        for arguments in (None, {**query, "maxRows": args.rows}):
            if arguments is not None:
                call(server, "db_query", arguments)
            lines = len(log.read_text().splitlines()) if log.exists() else 0
            server.proc.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + 10
            while (len(log.read_text().splitlines()) if log.exists() else 0) == lines:
                if time.monotonic() > deadline:
                    raise RuntimeError("the traced server did not report its memory")
                time.sleep(0.01)
    finally:
        server.close()
    (before, _), (_, peak) = [
        tuple(map(int, line.split())) for line in log.read_text().splitlines()
    ]
    return peak - before


def query_memory(args: argparse.Namespace, base: Path) -> dict[str, float]:
    db = base / "query.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE q(id INTEGER PRIMARY KEY, name TEXT, score REAL)")
        conn.executemany(
            "INSERT INTO q VALUES (?, ?, ?)",
            ((i, f"name number {i:08d}", i / 7) for i in range(args.rows)),
        )
    copy = one_copy(db)
    command = server_command(base, db, base / "state-query", args.durability)
    server = start_raw(command, base / "query-server.log")
    query = {"database": "bench", "sql": "SELECT * FROM q"}
    try:
        call(server, "db_query", {**query, "maxRows": 1})
        before = vm(server.pid, "VmHWM")
        reply: dict[str, Any] = {}
        for _ in range(3):
            reply = call(server, "db_query", {**query, "maxRows": args.rows})
        after = vm(server.pid, "VmHWM")
    finally:
        server.close()
    count = reply["result"]["structuredContent"]["rowCount"]
    if count != args.rows:
        raise RuntimeError(f"db_query returned {count} rows, not {args.rows}")
    traced = traced_peak(args, base, db)
    return {
        "one_copy": copy,
        "reply": len(json.dumps(reply, separators=(",", ":")).encode()),
        "before": before,
        "after": after,
        "traced": traced,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--statements", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--durability", choices=("full", "fast"), default="full")
    args = parser.parse_args(argv)
    import atomictools  # which checkout is measured: PYTHONPATH decides

    print(f"atomictools package: {Path(atomictools.__file__).parent}; durability {args.durability}")
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch)
        samples = anyio.run(transaction_rounds, args, base)
        memory = query_memory(args, base)
    raw_p50 = statistics.median(samples["raw sqlite3"])
    print(f"\n1. db_transaction of {args.statements:,} INSERTs, {args.rounds} rounds")
    print(f"{'variant':<18} {'p50 ms':>9} {'mean ms':>9} {'x raw (p50)':>12}")
    for name, values in samples.items():
        p50 = statistics.median(values)
        mean = statistics.fmean(values)
        print(f"{name:<18} {p50 * 1000:9.1f} {mean * 1000:9.1f} {p50 / raw_p50:11.2f}x")
    copies = memory["traced"] / memory["one_copy"]
    grown = (memory["after"] - memory["before"]) / memory["one_copy"]
    print(f"\n2. db_query of {args.rows:,} rows (raw JSON-RPC)")
    print(
        f"one copy of the rows as Python objects: {memory['one_copy'] / MiB:.1f} MiB; the reply "
        f"as JSON: {memory['reply'] / MiB:.1f} MiB"
    )
    print(
        f"server's Python allocations at the peak of the call (tracemalloc): "
        f"{memory['traced'] / MiB:.1f} MiB = {copies:.2f} copies of the rows"
    )
    print(
        f"server VmHWM {memory['before'] / MiB:.1f} -> {memory['after'] / MiB:.1f} MiB: growth "
        f"= {grown:.2f} copies (the allocator's arenas, SQLite's page cache and the pipe's "
        "buffer included)"
    )
    worst = max(statistics.median(v) for k, v in samples.items() if k != "raw sqlite3")
    print(
        f"\ntargets: transaction <= {TARGET_TRANSACTION:g}x raw: "
        f"{'PASS' if worst / raw_p50 <= TARGET_TRANSACTION else 'FAIL'}; query growth <= "
        f"{TARGET_COPIES:g} copies: {'PASS' if copies <= TARGET_COPIES else 'FAIL'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
