"""What a change is, and what it did: the one model both commits (direct, journaled) share."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Literal

from atomictools.engine.errors import AtomicToolsError
from atomictools.engine.results import EntryType
from atomictools.engine.text.edits import Edit

MAX_CHANGES = 1000
"""Most changes one change set may hold (one call)."""
OpName = Literal["write", "edit", "move", "copy", "delete", "mkdir"]


@dataclass(frozen=True, slots=True)
class Change:
    """One change of a set. ``path`` is the target; ``source`` is read by move and copy.

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


@dataclass(frozen=True, slots=True)
class ChangeOutcome:
    """What one change of a set did (or, in a dry run, would do), in the order given."""

    op: OpName
    path: str
    source: str | None
    sha256: str | None
    """Content hash after the change (None for delete, move of a non-file, mkdir)."""
    diff: str | None = None
    created: bool = False
    size: int | None = None
    """Size of the new content (write, edit, copy)."""
    previous_sha256: str | None = None
    """Content hash before an edit."""
    type: EntryType | None = None
    """What a delete removed or a move moved."""


@dataclass(frozen=True, slots=True)
class ChangeSetResult:
    """What a change set did. Guarantee: with ``applied`` every change is in place, and a
    crash at any moment leaves all of them or none (recovery finishes or undoes the rest).
    Caveat: ``txid`` names the journal record only while it exists (None for a dry run)."""

    changes: tuple[ChangeOutcome, ...]
    applied: bool
    """False for a dry run: the checks passed, nothing was written."""
    txid: str | None

    def to_json(self) -> str:
        """The form an idempotency record stores (and a retry turns back into this)."""
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ChangeSetResult:
        data = json.loads(text)
        changes = tuple(ChangeOutcome(**change) for change in data["changes"])
        return cls(changes, applied=bool(data["applied"]), txid=data["txid"])


class RecoveryNeededError(AtomicToolsError):
    """A committed change set could not be finished here; ``recover`` will finish it."""

    code = "recovery_needed"

    def __init__(self, message: str, *, changed: bool = True) -> None:
        super().__init__(message, changed=changed)
