"""What classifying a statement with PostgreSQL's parser costs (``pgguard.prepare``).

    python tests/benchmarks/bench_pgguard.py [--rounds N]

Each typical statement is judged N times; the table gives microseconds per statement. The
database class runs this once per statement before anything is sent, so it is a floor under
the per-statement cost of db_transaction on PostgreSQL.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

from atomictools.engine.db.pgguard import prepare

TYPICAL: list[tuple[str, str, Any]] = [
    ("SELECT 1", "SELECT 1", None),
    ("join with $n", "SELECT a.id, b.name FROM a JOIN b ON a.bid = b.id WHERE a.x > $1", [1]),
    ("insert with ?", "INSERT INTO t (a, b, c) VALUES (?, ?, ?)", [1, 2, 3]),
    (
        "update with :name",
        "UPDATE acc SET bal = bal - :amount WHERE id = :id",
        {"amount": 5, "id": 1},
    ),
    ("cte", "WITH c AS (SELECT n FROM s WHERE n % 3 = 0) SELECT count(*) FROM c", None),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10_000)
    args = parser.parse_args()
    print(
        f"pgguard benchmark: rounds={args.rounds} cpus={os.cpu_count()} "
        f"loadavg={'/'.join(f'{x:.2f}' for x in os.getloadavg())}\n"
    )
    print(f"{'statement':<20}{'us/stmt (median of 5)':>24}{'vs SELECT 1':>14}")
    base = None
    for label, sql, params in TYPICAL:
        runs = []
        for _ in range(5):
            began = time.perf_counter()
            for _ in range(args.rounds // 5):
                prepare(sql, params, read_only=False)
            runs.append((time.perf_counter() - began) / (args.rounds // 5) * 1e6)
        median = statistics.median(runs)
        base = base or median
        print(f"{label:<20}{median:>24.1f}{median / base:>13.1f}x")


if __name__ == "__main__":
    main()
