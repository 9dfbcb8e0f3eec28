"""A change set's database steps: what the set needs of a database, and what it records.

The changes layer sits below the database layer, so it names what it needs as a protocol
(``SqlDatabase``, implemented by ``Database``): a write transaction that runs statements and
takes the set's marker (see ``markers``) before its COMMIT, and a fresh look at whether a
marker is there. One database per set: SQLite in WAL mode commits each database file on its
own, so two of them could not share one commit point.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from atomictools.engine.changes.model import Change, Statement
from atomictools.engine.errors import InvalidArgumentError, ReadOnlyError
from atomictools.engine.results import ChangeOutcome, StatementResult

AUDIT_STATEMENTS = 20
"""Statements a history entry lists; the rest are counted."""


class SqlTransaction(Protocol):
    """An open write transaction (``BEGIN IMMEDIATE``) of a change set's database."""

    xid: str | None
    """The server's transaction id, where there is one (PostgreSQL): with it, recovery asks
    the server whether the transaction committed, ended, or is still committing."""

    async def run(self, statements: Sequence[Statement]) -> list[StatementResult]:
        """Run them in order; raises an error naming the failing statement."""
        ...

    async def mark(self, txid: str, record: str) -> None:
        """Insert the set's marker (its COMMIT is then the set's commit point)."""
        ...


class SqlDatabase(Protocol):
    """What a change set needs of a database (``atomictools.Database`` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def path(self) -> Path | str:
        """Its file (SQLite), or its URL without a password (PostgreSQL)."""
        ...

    @property
    def read_only(self) -> bool: ...

    @property
    def kind(self) -> str:
        """``sqlite`` or ``postgres``: how recovery reaches the database."""
        ...

    def set_transaction(self) -> AbstractAsyncContextManager[SqlTransaction]:
        """Begin at entry; COMMIT (shielded) at a clean exit, roll back at any other."""
        ...

    async def decide_marker(self, txid: str, record: str) -> bool:
        """After a COMMIT that reported an error: did it commit? Made final in a transaction
        of its own (see ``markers.decide``); raises when it cannot tell."""
        ...

    async def drop_marker(self, txid: str) -> None:
        """The set is over: its marker goes (best effort; a later set or recovery retries)."""
        ...


@dataclass(slots=True)
class SqlStep:
    """One ``sql`` change of a set, at its 1-based ``index``, with what it did once run."""

    index: int
    change: Change
    results: tuple[StatementResult, ...] = ()

    def outcome(self) -> ChangeOutcome:
        return ChangeOutcome(
            op="sql", path=self.change.path, source=None, sha256=None, statements=self.results
        )


@dataclass(slots=True)
class SqlPart:
    """The database steps of one change set (all on one database)."""

    database: SqlDatabase
    steps: list[SqlStep] = field(default_factory=list)
    xid: str | None = None
    """The open transaction's server id (PostgreSQL), for the record."""

    @classmethod
    def collect(cls, changes: Sequence[Change], label: Any) -> SqlPart | None:
        """The set's database steps, checked: one database, writable, statements given.

        ``label(index, op)`` prefixes an error with the change it is about.
        """
        part: SqlPart | None = None
        first = 0
        for index, change in enumerate(changes, start=1):
            if change.op != "sql":
                continue
            database = change.database
            if database is None:
                raise InvalidArgumentError(f"{label(index, 'sql')}no database is given")
            if not change.statements:
                raise InvalidArgumentError(
                    f"{label(index, 'sql')}statements is empty; give at least one {{sql, params}}"
                )
            for statement in change.statements:
                if not isinstance(statement.sql, str) or not statement.sql.strip():
                    raise InvalidArgumentError(f"{label(index, 'sql')}a statement's SQL is empty")
            if database.read_only:
                raise ReadOnlyError(
                    f"{label(index, 'sql')}database {database.name} is read-only; it can be "
                    "queried only"
                )
            if part is None:
                part, first = cls(database), index
            elif str(database.path) != str(part.database.path):
                raise InvalidArgumentError(
                    f"{label(index, 'sql')}this change set already changes database "
                    f"{part.database.name} (change {first}); one set may change one database "
                    f"(SQLite commits each database file on its own, so {database.name} could "
                    "not share the set's commit point); make it a call of its own"
                )
            part.steps.append(SqlStep(index, change))
        return part

    def record(self) -> dict[str, Any]:
        """What the journal record names: the database recovery asks for the marker."""
        named: dict[str, Any] = {"name": self.database.name, "path": str(self.database.path)}
        if self.database.kind != "sqlite":
            named |= {"kind": self.database.kind, "xid": self.xid}
        return named

    def audit(self) -> dict[str, Any]:
        """The history's account of the database part (not undoable): what ran, rows changed."""
        statements = [s for step in self.steps for s in step.change.statements]
        results = [r for step in self.steps for r in step.results]
        return audit_of(self.database.name, statements, results)


def audit_of(
    database: str, statements: Sequence[Statement], results: Sequence[StatementResult]
) -> dict[str, Any]:
    """An audit entry's body: the database, the first statements (shortened), rows changed."""
    shown = [shortened(s.sql, 200) for s in statements[:AUDIT_STATEMENTS]]
    if len(statements) > AUDIT_STATEMENTS:
        shown.append(f"... and {len(statements) - AUDIT_STATEMENTS} more")
    rows = sum(max(r.rowcount, 0) for r in results)
    return {"database": database, "statements": shown, "rows": rows}


def shortened(sql: str, limit: int = 120) -> str:
    """One line of SQL for a message or a listing."""
    flat = " ".join(sql.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
