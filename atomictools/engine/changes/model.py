"""What a change is: the one input both commits (direct, journaled) take; what it did is in
``results`` (``ChangeOutcome``, ``ChangeSetResult``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from atomictools.engine.results import OpName
from atomictools.engine.text.edits import Edit

if TYPE_CHECKING:
    from atomictools.engine.changes.sqlstep import SqlDatabase

Params = Sequence[Any] | Mapping[str, Any] | None

MAX_CHANGES = 1000
"""Most changes one change set may hold (one call)."""


@dataclass(frozen=True, slots=True)
class Statement:
    """One SQL statement with its parameters (``?`` or ``:name`` placeholders)."""

    sql: str
    params: Params = None


@dataclass(frozen=True, slots=True)
class Change:
    """One change of a set. ``path`` is the target; ``source`` is read by move and copy; a
    database step (``sql``) runs ``statements`` on ``database`` (``path`` is its name).

    The same checks apply as to the single-file call of the same name; in a set, a path may be
    changed by one change only. Caveat: ``content`` is held in memory (see ``Limits``).
    """

    op: OpName
    path: str
    content: bytes | None = None
    edits: tuple[Edit, ...] = ()
    source: str | None = None
    expected_sha256: str | None = None
    """The content hash the file must still have: the target's, or a move's or copy's source's."""
    overwrite: bool = False
    create_only: bool = False
    """A write that must create the file."""
    mode: int | None = None
    """A write's permission bits (an undo restores a file's own); None: kept, or the default."""
    database: SqlDatabase | None = None
    """A database step's database (``op="sql"``): one per set."""
    statements: tuple[Statement, ...] = ()
