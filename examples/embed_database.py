"""The Database API: all-or-nothing SQLite changes that a cancel or an error cannot half-apply.

Run it with ``python examples/embed_database.py``: it creates a temporary database, moves money
between accounts in one transaction, shows a failed savepoint undone on its own, a refused
``ATTACH``, a long transfer batch cancelled half-way leaving the total intact, and a file
written together with the row that records it, as one change set. It exits non-zero if an
invariant did not hold.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

import anyio

from atomictools import AtomicToolsError, Database, Statement, Workspace


async def total(db: Database) -> int:
    result = await db.query("SELECT sum(balance) FROM accounts")
    return int(result.rows[0][0])


async def main(directory: Path) -> int:
    async with Database(directory / "bank.db") as db:
        await db.execute("CREATE TABLE accounts(id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)")
        await db.run_statements(
            [Statement("INSERT INTO accounts(balance) VALUES (?)", [100]) for _ in range(10)]
        )
        print(f"1. ten accounts, total {await total(db)}")

        async with db.transaction() as tx:
            await tx.execute("UPDATE accounts SET balance = balance - 30 WHERE id = :a", {"a": 1})
            await tx.execute("UPDATE accounts SET balance = balance + 30 WHERE id = :b", {"b": 2})
            try:
                async with tx.savepoint():
                    await tx.execute("UPDATE accounts SET balance = 0 WHERE id = 3")
                    raise ValueError("changed my mind")
            except ValueError:
                print("2. a savepoint was undone on its own; the transfer around it stays")
        print(f"   total {await total(db)}")

        try:
            await db.execute("ATTACH 'elsewhere.db' AS other")
        except AtomicToolsError as err:
            print(f"3. refused: {err}")

        take = "UPDATE accounts SET balance = balance - 1 WHERE id = ?"
        give = "UPDATE accounts SET balance = balance + 1 WHERE id = ?"
        transfers = []
        for i in range(20_000):
            transfers += [Statement(take, [i % 10 + 1]), Statement(give, [(i + 3) % 10 + 1])]
        done = 0

        with anyio.CancelScope() as scope:

            async def count(index: int, _total: int | None) -> None:
                nonlocal done
                done = index
                if index >= 10_000:
                    scope.cancel()  # as a client's cancel or a deadline would, mid-batch

            await db.run_statements(transfers, progress=count)
        final = await total(db)
        print(f"4. a batch of {len(transfers)} statements cancelled after {done}: total {final}")
        return 0 if final == 1000 and await file_and_row(directory, db) else 1


async def file_and_row(directory: Path, db: Database) -> bool:
    """A report file and the row that records its hash: both, or (on any error) neither."""
    await db.execute("CREATE TABLE reports(name TEXT PRIMARY KEY, sha256 TEXT NOT NULL)")
    ws = Workspace([directory])
    report = f"total {await total(db)}\n".encode()
    async with ws.changeset() as cs:
        cs.write("report.txt", report)
        cs.sql(
            db,
            "INSERT INTO reports VALUES (?, ?)",
            ("report.txt", hashlib.sha256(report).hexdigest()),
        )
    print(f"5. report.txt and its row committed as one change set ({cs.result.changes[1].op})")
    try:
        async with ws.changeset() as cs:
            cs.write("report.txt", b"a second version\n")
            cs.sql(db, "INSERT INTO reports VALUES ('report.txt', 'duplicate')")  # fails
    except AtomicToolsError as err:
        print(f"6. refused as one: {err}")
    kept = (directory / "report.txt").read_bytes() == report
    rows = (await db.query("SELECT sha256 FROM reports")).rows
    return kept and rows == ((hashlib.sha256(report).hexdigest(),),)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="atomictools-db-") as tmp:
        sys.exit(anyio.run(main, Path(tmp)))
