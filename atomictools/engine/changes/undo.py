"""Undo: the change set that puts every path of some recorded changes back as it was before.

``plan_undo`` turns history entries into ``Change``s for the journaled commit, so an undo is
all-or-nothing, crash-safe and cancellation-safe like any change set, and is itself recorded
(redo is an undo of the undo). For several changes, each path goes back to its state before
the oldest of them, and must now be in its state after the newest. A path changed since (by
anyone, in any process, through atomictools or not) is a conflict, refused unless ``force``.
Paths outside the roots are never touched: such a change is refused (or narrowed by
``paths``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from atomictools.engine.changes.model import Change
from atomictools.engine.durable.fsutil import read_at, sha256_at
from atomictools.engine.errors import (
    AtomicToolsError,
    ConflictError,
    InvalidArgumentError,
    NotFoundError,
    NotUndoableError,
    OutsideRootsError,
)
from atomictools.engine.history.capture import kind_of
from atomictools.engine.history.model import HistoryEntry, Kind, PathChange
from atomictools.engine.history.store import HistoryStore
from atomictools.engine.history.view import shown_path
from atomictools.engine.results import RestoredPath
from atomictools.engine.sandbox import Sandbox
from atomictools.engine.text.edits import unified_diff
from atomictools.engine.text.textcodec import decode

_DIFF_BYTES = 1024 * 1024
"""A file larger than this gets no diff in an undo's result."""


@dataclass(slots=True)
class _Span:
    """One path across the changes undone: its state before the first, after the last."""

    path: str
    first: PathChange
    last: PathChange
    display: str = ""
    current: Kind = "absent"
    current_sha256: str | None = None
    current_data: bytes | None = None
    """The current content of a small file (for the diff an undo shows)."""


@dataclass(slots=True)
class UndoPlan:
    changes: list[Change] = field(default_factory=list)
    restored: list[RestoredPath] = field(default_factory=list)


def compose(entries: Sequence[HistoryEntry]) -> dict[str, _Span]:
    """Each path's span over ``entries`` (given newest first, as the history lists them)."""
    spans: dict[str, _Span] = {}
    for entry in sorted(entries, key=lambda e: e.seq):
        for row in entry.paths:
            span = spans.get(row.path)
            if span is None:
                spans[row.path] = _Span(row.path, row, row)
            else:
                span.last = row
    return spans


def plan_undo(
    sandbox: Sandbox,
    store: HistoryStore,
    entries: Sequence[HistoryEntry],
    *,
    only: Sequence[str] | None,
    force: bool,
    max_bytes: int,
) -> UndoPlan:
    """The changes that restore every path (or those in ``only``, absolute) of ``entries``."""
    names = ", ".join(e.id for e in entries)
    spans = compose(entries)
    if only is not None:
        unknown = [p for p in only if p not in spans]
        if unknown:
            raise InvalidArgumentError(
                f"{', '.join(unknown)} was not changed by change {names}; list_changes shows "
                "each change's paths"
            )
        _refuse_half_moves(spans, only)
        spans = {p: spans[p] for p in only}
    _locate(sandbox, spans, names)
    conflicts = [s for s in spans.values() if not _as_left(s)]
    if conflicts and not force:
        shown = "; ".join(_conflict(store, s, entries) for s in conflicts)
        raise ConflictError(
            f"cannot undo change {names}: {shown}. Pass force to restore the previous version "
            "anyway (the later changes are overwritten, and can themselves be undone), or "
            "paths to restore only the other files"
        )
    plan = UndoPlan()
    # Moves first: an entry moved away comes back by a move, which also takes care of the
    # path it was moved to (a set names each path once).
    moved_back: set[str] = set()
    for span in sorted(spans.values(), key=lambda s: s.path):
        _move_back(span, spans, plan, moved_back)
    for span in sorted(spans.values(), key=lambda s: s.path):
        _restore(span, spans, store, plan, moved_back, force=force, max_bytes=max_bytes)
    # Directories: made first (parents before children), removed last (children first).
    plan.changes.sort(key=_order)
    return plan


def _locate(sandbox: Sandbox, spans: dict[str, _Span], names: str) -> None:
    """Resolve every path inside the roots (refusing the rest) and read its current state."""
    outside = []
    for span in spans.values():
        try:
            with sandbox.resolve(span.path, follow_final=False) as location:
                span.display = location.display
                st = location.lstat()
                span.current = kind_of(st)
                if span.current == "file":
                    span.current_sha256 = sha256_at(location.dir_fd, location.name)
                    if st is not None and st.st_size <= _DIFF_BYTES:
                        span.current_data = read_at(location.dir_fd, location.name)
        except OutsideRootsError:
            outside.append(span.path)
        except NotFoundError:  # its directory is gone too (the set made it): absent
            span.display = shown_path(sandbox, span.path) or span.path
            span.current = "absent"
    if outside:
        raise OutsideRootsError(
            f"cannot undo change {names}: it also changed {', '.join(sorted(outside))}, "
            "outside the allowed directories; pass paths to restore only the files inside them"
        )


def _as_left(span: _Span) -> bool:
    """Is the path still as the (last) change left it?"""
    last = span.last
    if span.current != last.after:
        return False
    return last.after != "file" or span.current_sha256 == last.after_sha256


def _conflict(store: HistoryStore, span: _Span, entries: Sequence[HistoryEntry]) -> str:
    newest = max(e.seq for e in entries)
    later = [e for e in store.entries(path_prefixes=[span.path], limit=20) if e.seq > newest]
    if later:
        by = f", last by change {later[0].id} ({later[0].op})"
    else:
        by = " by another program (not through atomictools)"
    now = span.current if span.current != "file" else f"a file with sha256 {span.current_sha256}"
    return f"{span.display} was changed after it{by}; it is now {now}"


def _refuse_half_moves(spans: dict[str, _Span], only: Sequence[str]) -> None:
    """``paths`` must name both ends of a move: one alone would delete the entry it moved, or
    bring back a second copy of it."""
    for path in only:
        for row in (spans[path].first, spans[path].last):
            partner = row.moved_from or next(
                (s.path for s in spans.values() if path in (s.first.moved_from, s.last.moved_from)),
                None,
            )
            if partner is not None and partner not in only:
                raise InvalidArgumentError(
                    f"{path} was moved (to or from {partner}) by this change; name both paths "
                    "to undo the move, or neither"
                )


def _is_as_before(span: _Span) -> bool:
    first = span.first
    return span.current == first.before and (
        first.before != "file" or span.current_sha256 == first.before_sha256
    )


def _move_back(span: _Span, spans: dict[str, _Span], plan: UndoPlan, moved_back: set[str]) -> None:
    """An entry this change moved away, still as it was, whose destination did not exist
    before: move it back (contents, mode and all)."""
    if span.path in moved_back or span.first.before == "absent" or _is_as_before(span):
        return
    origin = _moved_to(span, spans)
    if origin is None or origin.path in moved_back or origin.first.before != "absent":
        return
    expected = origin.current_sha256 if origin.current == "file" else None
    plan.changes.append(Change("move", span.path, source=origin.path, expected_sha256=expected))
    moved_back.update((span.path, origin.path))
    plan.restored.append(RestoredPath(span.display, "moved_back", source=origin.display))


def _restore(
    span: _Span,
    spans: dict[str, _Span],
    store: HistoryStore,
    plan: UndoPlan,
    moved_back: set[str],
    *,
    force: bool,
    max_bytes: int,
) -> None:
    first, path = span.first, span.path
    wanted, now = first.before, span.current
    if path in moved_back:
        return  # moved back (either end of a move)
    if _is_as_before(span):
        return  # already as it was (the change made no difference here)
    expected = None if force else span.current_sha256
    if wanted == "absent":
        if now == "directory":
            plan.changes.append(Change("rmdir", path))
            plan.restored.append(RestoredPath(span.display, "removed_directory"))
        else:
            plan.changes.append(Change("delete", path, expected_sha256=expected))
            plan.restored.append(RestoredPath(span.display, "deleted"))
        return
    if wanted == "directory":
        if now != "absent":
            raise NotUndoableError(
                f"cannot restore the directory {span.display}: a {now} is there now (it was "
                "moved onto or replaced); move it away first"
            )
        plan.changes.append(Change("mkdir", path))
        plan.restored.append(RestoredPath(span.display, "created_directory"))
        return
    if wanted != "file":
        raise NotUndoableError(
            f"cannot restore {span.display}: it was a {wanted} before, and only files and "
            "directories are restored (a moved link is moved back)"
        )
    assert first.before_sha256 is not None
    # The content this change kept, or the same content kept for another change.
    content = store.content(first.blob or first.before_sha256, max_bytes)
    if content is not None:
        plan.changes.append(
            Change("write", path, content=content, expected_sha256=expected, mode=first.before_mode)
        )
        plan.restored.append(
            RestoredPath(
                span.display, "restored", sha256=first.before_sha256, diff=_diff(span, content)
            )
        )
        return
    origin = _moved_to(span, spans) or _holding(first.before_sha256, spans)
    if origin is None:
        why = "was pruned (history retention)" if first.pruned or first.blob else "was not kept"
        raise NotUndoableError(
            f"cannot restore {span.display}: its previous content {why}; it can no longer be "
            "undone (pass paths to restore the other files)"
        )
    plan.changes.append(
        Change(
            "copy",
            path,
            source=origin.path,
            overwrite=now != "absent",
            expected_sha256=origin.current_sha256,
        )
    )
    plan.restored.append(
        RestoredPath(span.display, "restored", sha256=first.before_sha256, source=origin.display)
    )


def _moved_to(span: _Span, spans: dict[str, _Span]) -> _Span | None:
    """Where the entry at this path was moved to, if it is still there (the same content)."""
    for other in spans.values():
        moved_here = span.path in (other.first.moved_from, other.last.moved_from)
        if not moved_here or other.current != span.first.before:
            continue
        if other.current != "file" or other.current_sha256 == span.first.before_sha256:
            return other
    return None


def _holding(sha256: str, spans: dict[str, _Span]) -> _Span | None:
    """A path of the change that now holds this content (a file that was moved)."""
    for other in spans.values():
        if other.current == "file" and other.current_sha256 == sha256:
            return other
    return None


def _order(change: Change) -> tuple[int, int]:
    """Directories made first (parents first), removed last (children first); a copy after
    the change that restores its source's own path (the set's rule for a copy's source)."""
    depth = change.path.count(os.sep)
    rank = {"mkdir": 0, "copy": 2, "rmdir": 3}.get(change.op, 1)
    return (rank, depth if rank == 0 else -depth if rank == 3 else 0)


def _diff(span: _Span, restored: bytes) -> str | None:
    """The unified diff from the current file to the version restored (text files only)."""
    if span.current == "file" and span.current_data is None:
        return None  # too large to show
    try:
        old_text, _ = decode(span.current_data or b"", span.display)
        new_text, _ = decode(restored, span.display)
    except AtomicToolsError:
        return None
    return unified_diff(old_text, new_text, span.display)
