"""The text a model reads from list_changes and undo_change.

A host may forward only the text block to the model, so the text carries everything the model
needs to act: each change's id (what undo_change takes), when, what it did to which paths
(with +added/-removed lines), and which changes can no longer be undone and why.
"""

from __future__ import annotations

import datetime as dt

from atomictools.engine import HistoryEntry, PathChange, RestoredPath, UndoResult

MAX_PATHS_SHOWN = 12
"""Paths listed per change in the text (all of them are in the structured content)."""
MAX_STATEMENT_CHARS = 120


def iso_utc(moment: float) -> str:
    """A Unix time as ISO 8601 UTC to the second: what ``since`` accepts back."""
    return dt.datetime.fromtimestamp(int(moment), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def age(moment: float, now: float) -> str:
    """How long ago, roughly: a model reasons about "my last change" better with an age."""
    seconds = max(0.0, now - moment)
    if seconds < 1:
        return "just now"
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


def moved_sources(entry: HistoryEntry) -> set[str]:
    """The paths of an entry that a move emptied (each has a row naming it ``moved_from``)."""
    return {row.moved_from for row in entry.paths if row.moved_from is not None}


def describe_path(row: PathChange, moved_away: bool) -> str:
    """One path of a change: ``a.txt +2 -1``, ``b.txt (deleted, -3)``, ``d/ (directory
    created)``, with a "cannot be undone" mark when its previous content was pruned."""
    notes: list[str] = []
    name = row.path + ("/" if "directory" in (row.before, row.after) else "")
    if row.moved_from is not None:
        notes.append(f"moved from {row.moved_from}")
    elif moved_away:
        notes.append("moved away")
    elif row.before == "absent" and row.after == "directory":
        notes.append("directory created")
    elif row.before == "directory" and row.after == "absent":
        notes.append("directory removed")
    elif row.before == "absent":
        notes.append("created")
    elif row.after == "absent":
        notes.append("deleted")
    elif row.before != row.after:
        notes.append(f"{row.before} replaced by {row.after}")
    counts = _counts(row)
    if counts:
        notes.append(counts)
    if row.pruned:
        notes.append("cannot be undone: previous content pruned")
    return f"{name} ({', '.join(notes)})" if notes else name


def _counts(row: PathChange) -> str:
    if row.added is None or row.removed is None:
        return ""
    return f"+{row.added} -{row.removed}"


def entry_marks(entry: HistoryEntry) -> list[str]:
    marks: list[str] = []
    if entry.undoes:
        marks.append(f"undo of {', '.join(entry.undoes)}; undoing it redoes them")
    if entry.database is not None and entry.paths:
        marks.append(
            "its statements cannot be undone: undo_change with paths=[...] takes back only "
            "the files named"
        )
    elif entry.database is not None:
        marks.append("database call, recorded for audit: cannot be undone")
    elif not entry.undoable:
        marks.append("cannot be undone: previous content pruned by history retention")
    return marks


def entry_text(entry: HistoryEntry, now: float) -> str:
    """A change in two or more lines: a header, then its paths and its SQL (a database call
    has no paths; a change set with a sql step has both)."""
    header = f"- {entry.id}  {iso_utc(entry.time)} ({age(entry.time, now)})  {entry.op}"
    if entry.database is not None:
        rows = "" if entry.rows_changed is None else f", {entry.rows_changed} row(s) changed"
        header += f" on {entry.database}{rows}"
    marks = entry_marks(entry)
    if marks:
        header += f"  [{'; '.join(marks)}]"
    lines = [header]
    if entry.database is None or entry.paths:  # a file change, or a set with a sql step
        away = moved_sources(entry)
        shown_paths = [describe_path(row, row.path in away) for row in entry.paths]
        listed = "; ".join(shown_paths[:MAX_PATHS_SHOWN])
        if len(shown_paths) > MAX_PATHS_SHOWN:
            listed += f"; ... {len(shown_paths) - MAX_PATHS_SHOWN} more path(s)"
        lines.append(f"    {listed or '(no path inside the allowed directories)'}")
    if entry.database is not None:
        for sql in entry.statements[:3]:
            shown = " ".join(sql.split())
            if len(shown) > MAX_STATEMENT_CHARS:
                shown = shown[: MAX_STATEMENT_CHARS - 3] + "..."
            lines.append(f"    {shown}")
        if len(entry.statements) > 3:
            lines.append(f"    ... {len(entry.statements) - 3} more statement(s)")
    return "\n".join(lines)


def changes_text(entries: list[HistoryEntry], truncated: bool, now: float) -> str:
    if not entries:
        return (
            "No recorded changes match (inside the allowed directories). Changes are recorded "
            "from the moment a server with history on (the default) makes them."
        )
    lines = [
        f"{len(entries)} recorded change(s), newest first. To take one back, call undo_change "
        'with its id (id="..."), or last=1 for the newest; dryRun=true previews the diffs.'
    ]
    lines += [entry_text(entry, now) for entry in entries]
    if truncated:
        lines.append("(more changes exist: raise limit, or narrow with path or since)")
    return "\n".join(lines)


_ACTIONS = {
    "restored": "restored to its previous content",
    "deleted": "deleted (it did not exist before)",
    "created_directory": "directory created again",
    "removed_directory": "directory removed (it did not exist before)",
    "moved_back": "moved back",
}
_WOULD = {
    "restored": "would be restored to its previous content",
    "deleted": "would be deleted (it did not exist before)",
    "created_directory": "directory would be created again",
    "removed_directory": "directory would be removed (it did not exist before)",
    "moved_back": "would be moved back",
}


def restored_line(restored: RestoredPath, *, dry_run: bool) -> str:
    action = (_WOULD if dry_run else _ACTIONS)[restored.action]
    line = f"- {restored.path}: {action}"
    if restored.source is not None:
        line += f" from {restored.source}"
    if restored.sha256 is not None:
        line += f" (sha256 {restored.sha256})"
    return line


def undo_text(result: UndoResult, *, dry_run: bool) -> str:
    """What an undo did (or would do): each path, the diffs of a preview, and how to redo."""
    ids = ("changes " if len(result.undone) > 1 else "change ") + ", ".join(result.undone)
    if not result.paths:
        return (
            f"Nothing to undo: every path of {ids} is already as it was before; nothing was "
            "changed."
        )
    if dry_run:
        lines = [
            f"Dry run: undoing {ids} would do the following; nothing was changed. Call "
            "undo_change again without dryRun to apply it."
        ]
    else:
        lines = [f"Undid {ids}: every path below changed together, in one atomic step."]
    for restored in result.paths:
        lines.append(restored_line(restored, dry_run=dry_run))
        if dry_run and restored.diff:
            lines.append(f"```diff\n{restored.diff}```")
    if not dry_run and result.change_id is not None:
        lines.append(
            f'This undo is recorded as change {result.change_id}: undo_change with id="'
            f'{result.change_id}" redoes what it took back.'
        )
    return "\n".join(lines)
