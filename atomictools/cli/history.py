"""``atomictools history`` and ``atomictools undo``, and the serve flags for the history.

The same history the MCP tools ``list_changes`` and ``undo_change`` read, for a person at a
terminal: a table of recorded changes (or JSON), and an undo of one change or the last few,
with a dry run that shows the diffs. Exit codes of ``undo``: 0 done, 1 refused (a conflict,
a change that cannot be undone or is not there), 2 a usage error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from atomictools.engine import (
    DEFAULT_HISTORY_MAX_AGE,
    DEFAULT_HISTORY_MAX_BYTES,
    STATE_DIR_ENV,
    AtomicToolsError,
    HistoryEntry,
    InvalidArgumentError,
    PathChange,
    UndoResult,
    Workspace,
    parse_duration,
    parse_since,
    spelled,
)

UNDO_TERMS = {
    "change_id or last": "an ID or --last",
    "change_id": "ID",
    "dry_run": "--dry-run",
    "Pass force": "Pass --force",
    "pass paths": "pass --path",
    "or paths": "or --path",
    "list_changes": "`atomictools history`",
}
"""The engine's words in undo messages, as this command spells its arguments."""

MAX_LAST = 100
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_ID = re.compile(r"[0-9a-f]{6,40}")


def size_arg(text: str) -> int:
    """``1073741824``, ``512K``, ``500M``, ``1G`` (binary units; a trailing B or iB is fine)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size; write bytes, or a number with K, M, G or T (e.g. 500M, 1G)"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def duration_arg(text: str) -> float:
    """``30d``, ``12h``, ``90m`` or plain seconds."""
    try:
        return parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def last_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_LAST:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number from 1 to {MAX_LAST}")
    return value


def limit_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number, 1 or more")
    return value


def shown_size(size: int) -> str:
    for unit, factor in (("T", 1024**4), ("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def shown_duration(seconds: float) -> str:
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= factor and seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    return f"{seconds:g}s"


def add_serve_flags(serve: argparse.ArgumentParser) -> None:
    """``--no-history``, ``--history-max-bytes``, ``--history-max-age`` on ``serve``."""
    serve.add_argument(
        "--no-history",
        action="store_true",
        help="do not record changes (list_changes shows only older ones; undo_change has "
        "nothing new to take back)",
    )
    serve.add_argument(
        "--history-max-bytes",
        type=size_arg,
        default=DEFAULT_HISTORY_MAX_BYTES,
        metavar="SIZE",
        help="keep at most this much replaced content for undo, e.g. 512K, 500M, 1G "
        f"(default {shown_size(DEFAULT_HISTORY_MAX_BYTES)}); older changes stay listed but "
        "cannot be undone",
    )
    serve.add_argument(
        "--history-max-age",
        type=duration_arg,
        default=DEFAULT_HISTORY_MAX_AGE,
        metavar="AGE",
        help="forget changes older than this, e.g. 30d, 12h, or seconds "
        f"(default {shown_duration(DEFAULT_HISTORY_MAX_AGE)})",
    )


def add_commands(commands: Any) -> None:
    """The ``history`` and ``undo`` subcommands (``commands``: the subparsers action)."""
    state_help = (
        f"where the history lives (default: ${STATE_DIR_ENV} or the user state directory); "
        "use the --state-dir of the server that made the changes"
    )
    history = commands.add_parser(
        "history",
        help="list the recorded changes inside the roots, newest first",
        description=(
            "List the changes recorded inside the roots, newest first: id, local time, "
            "operation, and the paths with +added/-removed lines. Take one back with "
            "`atomictools undo ROOT ID`."
        ),
    )
    history.add_argument("roots", nargs="+", metavar="ROOT", type=Path)
    history.add_argument("--path", help="only changes to this file, or below this directory")
    history.add_argument(
        "--since", help="only changes from then on: ISO 8601, or back from now (30m, 2h, 7d)"
    )
    history.add_argument(
        "--limit", type=limit_arg, default=50, metavar="N", help="at most N (default 50)"
    )
    history.add_argument("--json", action="store_true", help="print the changes as JSON")
    history.add_argument("--state-dir", type=Path, help=state_help)

    undo = commands.add_parser(
        "undo",
        help="take back a recorded change (by ID, or the last N), as one atomic change",
        usage="%(prog)s ROOT... [ID] [--last N] [--path P]... [--dry-run] [--force] [--json] "
        "[--state-dir DIR]",
        description=(
            "Put every path of a recorded change (ID, from `atomictools history`) or of the "
            "last N changes (--last N) back as it was before, all or nothing. A path changed "
            "again since is refused unless --force; --path restores only some paths. The undo "
            "is recorded too: undoing it redoes the change. Exit 0: done; 1: refused (a "
            "conflict, or a change that cannot be undone); 2: a usage error."
        ),
    )
    undo.add_argument(
        "targets",
        nargs="+",
        metavar="ROOT",
        help="the roots, then the change ID (leave the ID out with --last)",
    )
    undo.add_argument("--last", type=last_arg, metavar="N", help="undo the newest N changes")
    undo.add_argument(
        "--path",
        action="append",
        dest="paths",
        metavar="P",
        help="restore only this path of the change (repeatable)",
    )
    undo.add_argument("--dry-run", action="store_true", help="show the diffs, change nothing")
    undo.add_argument(
        "--force", action="store_true", help="restore even paths that were changed since"
    )
    undo.add_argument("--json", action="store_true", help="print the result as JSON")
    undo.add_argument("--state-dir", type=Path, help=state_help)


def take_positionals(args: argparse.Namespace, extra: list[str]) -> None:
    """Positionals that came after options: more roots (``history``), or roots and the ID."""
    if args.command == "history":
        args.roots.extend(Path(word) for word in extra)
    else:
        args.targets.extend(extra)


def _fail(message: str, code: int) -> int:
    print(f"atomictools: {message}", file=sys.stderr)
    return code


# -- history ----------------------------------------------------------------------------------


def run_history(args: argparse.Namespace) -> int:
    try:
        workspace = Workspace(args.roots, read_only=True, state_dir=args.state_dir)
        since = None if args.since is None else parse_since(args.since, time.time())
    except ValueError as err:
        return _fail(str(err), 2)
    try:
        entries = anyio.run(_entries, workspace, args.path, since, args.limit)
    except InvalidArgumentError as err:
        return _fail(str(err), 2)
    except AtomicToolsError as err:
        return _fail(str(err), 1)
    if args.json:
        print(json.dumps({"changes": [entry_json(e) for e in entries]}, indent=2))
    else:
        print(history_table(entries))
    return 0


async def _entries(
    workspace: Workspace, path: str | None, since: float | None, limit: int
) -> list[HistoryEntry]:
    return await workspace.history_entries(path=path, since=since, limit=limit)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def path_json(row: PathChange) -> dict[str, Any]:
    raw = row.to_json()
    raw.pop("blob", None)  # where the store keeps it: not the reader's business
    return {_camel(key): value for key, value in raw.items()}


def entry_json(entry: HistoryEntry) -> dict[str, Any]:
    """An entry as ``list_changes`` shows it (camelCase; ``time`` ISO 8601 UTC)."""
    moment = dt.datetime.fromtimestamp(entry.time, dt.UTC)
    return {
        "id": entry.id,
        "time": moment.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "unixTime": entry.time,
        "op": entry.op,
        "undoable": entry.undoable,
        "paths": [path_json(row) for row in entry.paths],
        "undoes": list(entry.undoes),
        "database": entry.database,
        "statements": list(entry.statements) if entry.database is not None else None,
        "rowsChanged": entry.rows_changed,
    }


def _path_cell(row: PathChange, moved_away: bool) -> str:
    counts = "" if row.added is None or row.removed is None else f" +{row.added} -{row.removed}"
    if row.moved_from is not None:
        what = f" (from {row.moved_from})"
    elif moved_away:
        what = " (moved away)"
    elif row.before == "absent":
        what = " (new dir)" if row.after == "directory" else " (new)"
    elif row.after == "absent":
        what = " (removed dir)" if row.before == "directory" else " (deleted)"
    else:
        what = ""
    pruned = " (pruned)" if row.pruned else ""
    return f"{row.path}{what}{counts}{pruned}"


def _paths_cell(entry: HistoryEntry) -> str:
    """The paths of the change, then its database part (a database call has only that)."""
    away = {row.moved_from for row in entry.paths if row.moved_from is not None}
    cells = [_path_cell(row, row.path in away) for row in entry.paths]
    if len(cells) > 6:
        cells = [*cells[:6], f"... {len(cells) - 6} more"]
    if entry.database is not None:
        rows = "" if entry.rows_changed is None else f", {entry.rows_changed} row(s)"
        cells.append(f"database {entry.database}: {len(entry.statements)} statement(s){rows}")
    return ", ".join(cells)


def _marks(entry: HistoryEntry) -> str:
    marks = []
    if entry.undoes:
        marks.append(f"undoes {', '.join(entry.undoes)}")
    if entry.database is not None and entry.paths:
        marks.append("database part not undoable: undo its files with --path")
    elif entry.database is not None:
        marks.append("audit only, not undoable")
    elif not entry.undoable:
        marks.append("NOT UNDOABLE: content pruned")
    return f"  [{'; '.join(marks)}]" if marks else ""


def history_table(entries: list[HistoryEntry]) -> str:
    """Newest first: id, local time, operation, paths; marks for undos and the undoable-no-more."""
    if not entries:
        return "no recorded changes inside these roots"
    width = max(len("OP"), *(len(e.op) for e in entries))
    lines = [f"{'ID':<10}  {'TIME (local)':<19}  {'OP':<{width}}  PATHS"]
    for entry in entries:
        when = dt.datetime.fromtimestamp(entry.time).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(
            f"{entry.id:<10}  {when:<19}  {entry.op:<{width}}  {_paths_cell(entry)}{_marks(entry)}"
        )
    lines.append(f"{len(entries)} change(s); take one back with: atomictools undo ROOT... ID")
    return "\n".join(lines)


# -- undo -------------------------------------------------------------------------------------


def _split_targets(targets: list[str], last: int | None) -> tuple[list[str], str | None] | str:
    """(roots, ID) from ``ROOT... [ID]``, or the usage error to print."""
    if last is not None:
        final = targets[-1]
        if len(targets) > 1 and _ID.fullmatch(final) and not Path(final).exists():
            return "give an ID or --last, not both"
        return targets, None
    if len(targets) < 2:
        return (
            "give the roots and then the change ID to undo (`atomictools history ROOT` lists "
            "them), or --last N"
        )
    final = targets[-1]
    if "/" in final or Path(final).is_dir():
        return f"{final!r} looks like a directory, not a change ID; give the ID last, or --last N"
    return targets[:-1], final


def run_undo(args: argparse.Namespace) -> int:
    split = _split_targets(args.targets, args.last)
    if isinstance(split, str):
        return _fail(split, 2)
    roots, change_id = split
    try:
        workspace = Workspace(roots, state_dir=args.state_dir)
    except ValueError as err:
        return _fail(str(err), 2)
    try:
        result = anyio.run(_undo, workspace, change_id, args)
    except InvalidArgumentError as err:
        return _fail(spelled(str(err), UNDO_TERMS), 2)
    except AtomicToolsError as err:  # a conflict, not undoable, not found, outside the roots
        return _fail(spelled(str(err), UNDO_TERMS), 1)
    if args.json:
        print(json.dumps(undo_json(result, args.dry_run), indent=2))
    else:
        print(undo_report(result, args.dry_run, roots))
    return 0


async def _undo(
    workspace: Workspace, change_id: str | None, args: argparse.Namespace
) -> UndoResult:
    return await workspace.undo(
        change_id, last=args.last, paths=args.paths, dry_run=args.dry_run, force=args.force
    )


def undo_json(result: UndoResult, dry_run: bool) -> dict[str, Any]:
    return {
        "applied": result.applied,
        "dryRun": dry_run,
        "undone": list(result.undone),
        "changeId": result.change_id,
        "paths": [
            {
                "path": p.path,
                "action": p.action,
                "sha256": p.sha256,
                "source": p.source,
                "diff": p.diff,
            }
            for p in result.paths
        ],
    }


_DONE = {
    "restored": "restored",
    "deleted": "deleted",
    "created_directory": "recreated directory",
    "removed_directory": "removed directory",
    "moved_back": "moved back",
}


def undo_report(result: UndoResult, dry_run: bool, roots: list[str]) -> str:
    ids = ", ".join(result.undone)
    if not result.paths:
        return f"nothing to undo: every path of {ids} is already as it was before it"
    head = (
        f"would undo {ids} (dry run: nothing was changed):"
        if dry_run
        else f"undid {ids}, all paths in one atomic change:"
    )
    lines = [head]
    width = max(len(_DONE[p.action]) for p in result.paths)
    for restored in result.paths:
        source = f" (from {restored.source})" if restored.source else ""
        lines.append(f"  {_DONE[restored.action]:<{width}}  {restored.path}{source}")
        if dry_run and restored.diff:
            lines.extend(f"    {line}" for line in restored.diff.splitlines())
    if not dry_run and result.change_id is not None:
        lines.append(
            f"this undo is change {result.change_id}; to redo: atomictools undo "
            f"{shlex.join(roots)} {result.change_id}"
        )
    return "\n".join(lines)
