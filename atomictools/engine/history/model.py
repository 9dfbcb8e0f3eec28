"""What the history holds: one entry per change, and per path the state before and after.

Paths are stored absolute (resolved inside the roots at the time of the change), so an entry
means the same file whichever root configuration reads it later; results show them relative
to the reader's roots, and paths outside those roots are never shown or touched.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["absent", "file", "directory", "symlink", "other"]
EntryState = Literal["pending", "done"]


@dataclass(frozen=True, slots=True)
class PathChange:
    """One path of a change: what it was before, and what the change left there.

    ``blob`` is the sha256 under which the previous content is kept (None when nothing was
    replaced, or when it was pruned: then ``pruned`` is True and the path cannot be undone).
    """

    path: str
    before: Kind
    after: Kind
    before_sha256: str | None = None
    before_size: int | None = None
    after_sha256: str | None = None
    after_size: int | None = None
    blob: str | None = None
    pruned: bool = False
    moved_from: str | None = None
    """A move's destination: where the entry came from (its source is another path row)."""
    added: int | None = None
    removed: int | None = None
    """Lines added and removed (None until known; binary files stay None)."""
    before_mode: int | None = None
    """A file's permission bits before (an undo restores them)."""

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _PATH_FIELDS}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PathChange:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in fields})


_PATH_FIELDS = tuple(f.name for f in dataclasses.fields(PathChange))


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One recorded change. ``undoes`` lists the changes an undo took back (redo = undo it)."""

    id: str
    seq: int
    time: float
    op: str
    paths: tuple[PathChange, ...]
    undoes: tuple[str, ...] = ()
    database: str | None = None
    """Database calls: the database's name (their entries are audit only, not undoable)."""
    statements: tuple[str, ...] = ()
    rows_changed: int | None = None
    state: EntryState = "done"

    @property
    def undoable(self) -> bool:
        """Whether every path's previous state can still be restored."""
        if self.database is not None:
            return False
        return all(not p.pruned for p in self.paths)


@dataclass(frozen=True, slots=True)
class Evidence:
    """How recovery tells whether a pending (direct) change reached its commit point: the entry
    ``name`` in ``dir`` is the inode ``ino`` once committed, or absent when ``ino`` is None."""

    dir: str
    name: str
    dev: int
    ino: int | None
    temp: str | None = None
    """The staged temp's name: still there with the staged inode, the rename never happened."""
    before_ino: int | None = None
    """What the entry was before (None: absent): still that, the change never happened."""

    def to_json(self) -> dict[str, Any]:
        return {
            "dir": self.dir,
            "name": self.name,
            "dev": self.dev,
            "ino": self.ino,
            "temp": self.temp,
            "before_ino": self.before_ino,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Evidence:
        return cls(
            dir=str(raw["dir"]),
            name=str(raw["name"]),
            dev=int(raw["dev"]),
            ino=None if raw.get("ino") is None else int(raw["ino"]),
            temp=raw.get("temp"),
            before_ino=None if raw.get("before_ino") is None else int(raw["before_ino"]),
        )


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``2h``, ``7d``, ``1w`` (or plain seconds) as seconds (ValueError)."""
    value = text.strip().lower()
    unit = _UNITS.get(value[-1:]) if value else None
    number = value[:-1] if unit is not None else value
    try:
        seconds = float(number) * (unit or 1.0)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a duration; write a number with s, m, h, d or w (e.g. 30m, 7d)"
        ) from None
    if not 0 <= seconds < float("inf"):
        raise ValueError(f"{text!r} is not a duration: it must be zero or more, and finite")
    return seconds


def parse_since(text: str, now: float) -> float:
    """A point in time as a Unix time: ISO 8601 (``2026-12-07T10:00:00Z``, a date, a time
    without zone is UTC), or a duration back from ``now`` (``30m``, ``2h``) (ValueError)."""
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"since={text!r} is neither a time (ISO 8601, e.g. 2026-12-07T10:00:00Z) nor a "
            "duration back from now (e.g. 30m, 2h, 7d)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()
