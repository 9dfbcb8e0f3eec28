"""What a recovery run did, and the change sets it left for a person.

Shared by journal recovery (``recovery``) and the sweep (``sweep``): both add to one report,
which the CLI prints (a table or JSON) and a server uses to refuse the paths of unfinished sets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from atomictools.engine.durable.tempfiles import ROLE_MEANING, parse_member

Resolve = Literal["forward", "rollback"]
"""How an operator decides a change set whose journal record cannot be trusted."""


@dataclass
class UnfinishedSet:
    """A change set recovery left exactly as it found it, because a person must decide."""

    txid: str
    reason: str
    """Why it was left, as a sentence fragment ("its journal record ... cannot be trusted")."""
    journal: str | None
    """Where its journal record is (or should be), when known."""
    untrusted: bool = False
    """Its record is in this state directory but cannot be trusted."""
    paths: list[str] = field(default_factory=list)
    """Absolute paths of the files it changes, as far as known."""
    members: list[str] = field(default_factory=list)
    """Its staged files and backups found in the roots (absolute paths)."""
    fix: str = ""
    """What to run (filled in by whoever knows the command line)."""

    def describe(self) -> str:
        parts = [f"change set {self.txid} {self.reason}; nothing of it was deleted"]
        if self.paths:
            parts.append("the files it changes: " + ", ".join(self.paths))
        if self.members:
            parts.append("its files: " + ", ".join(_with_role(m) for m in self.members))
        if self.fix:
            parts.append(self.fix)
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "txid": self.txid,
            "reason": self.reason,
            "journal": self.journal,
            "paths": self.paths,
            "members": self.members,
            "fix": self.fix,
        }


@dataclass
class RecoveryReport:
    """What recovery did and what it could not do."""

    rolled_forward: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    """Orphaned files of ours removed (or that would be, in a dry run)."""
    live: list[str] = field(default_factory=list)
    """Change sets still in flight in another process, left alone."""
    other_roots: list[str] = field(default_factory=list)
    """Journals that touch directories outside the given roots, left alone."""
    conflicts: list[str] = field(default_factory=list)
    """Finished change sets whose files someone else changed since: what was not applied."""
    unfinished: dict[str, UnfinishedSet] = field(default_factory=dict)
    """Change sets left in place for a person, by txid."""
    scanned: int = 0
    handled: set[str] = field(default_factory=set)
    """Change sets whose record this run read and finished: their leftovers are orphans."""
    journals_unreadable: str | None = None
    """Why the journal directory could not be listed (then no change-set file is swept)."""
    history_confirmed: list[str] = field(default_factory=list)
    """History entries a crash left pending whose change had committed: kept."""
    history_dropped: list[str] = field(default_factory=list)
    """History entries a crash left pending whose change never committed: removed."""
    history_problem: str | None = None
    """Why the history could not be reconciled."""

    @property
    def problems(self) -> list[str]:
        """What needs a person, one sentence each."""
        unreadable = [self.journals_unreadable] if self.journals_unreadable else []
        unreadable += [self.history_problem] if self.history_problem else []
        return [*self.conflicts, *unreadable, *(u.describe() for u in self.unfinished.values())]

    @property
    def fixed_something(self) -> bool:
        return bool(
            self.rolled_forward
            or self.rolled_back
            or self.removed
            or self.history_confirmed
            or self.history_dropped
        )

    @property
    def exit_code(self) -> int:
        """0: clean, 1: something was fixed, 2: something needs a person."""
        if self.problems:
            return 2
        return 1 if self.fixed_something else 0

    def leave(self, unfinished: UnfinishedSet) -> UnfinishedSet:
        """Record a set left for a person (merging what several places found about it)."""
        known = self.unfinished.setdefault(unfinished.txid, unfinished)
        if known is not unfinished:
            known.paths += [p for p in unfinished.paths if p not in known.paths]
        return known

    def as_dict(self) -> dict[str, Any]:
        return {
            "rolledForward": self.rolled_forward,
            "rolledBack": self.rolled_back,
            "removedTempFiles": self.removed,
            "liveChangeSets": self.live,
            "otherRoots": self.other_roots,
            "historyConfirmed": self.history_confirmed,
            "historyDropped": self.history_dropped,
            "problems": self.problems,
            "unfinished": [u.as_dict() for u in self.unfinished.values()],
            "scanned": self.scanned,
            "exitCode": self.exit_code,
        }


def _with_role(path: str) -> str:
    """A member's path with what it is ("the new version, staged, of a.txt")."""
    member = parse_member(os.path.basename(path))
    if member is None:
        return path
    target = member.target or "a name too long to show"
    return f"{path} ({target}: {ROLE_MEANING[member.role]})"
