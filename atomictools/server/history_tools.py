"""The history tools: ``list_changes`` shows what was changed, ``undo_change`` takes it back.

Every change the engine makes is recorded with the content it replaced; these two tools put
that in a model's hands, so an agent that made a bad change can take it back in one call. Both
run through ``ToolRuntime`` like every other tool: the client's narrowed roots bound what they
show and restore, and errors come back as ``isError`` results in the tools' own words.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.types import CallToolResult
from pydantic import Field

from atomictools.engine import (
    HistoryEntry,
    InvalidArgumentError,
    ReadOnlyError,
    UndoResult,
    Workspace,
    parse_since,
)
from atomictools.server.history_text import changes_text, iso_utc, undo_text
from atomictools.server.models import (
    ChangeEntryOutput,
    ListChangesOutput,
    PathChangeOutput,
    RestoredPathOutput,
    UndoChangeOutput,
)
from atomictools.server.runtime import ToolRuntime
from atomictools.server.tooling import READ_ONLY, mutating, tool_result

MAX_LIST = 500
MAX_LAST = 100
"""The engine's bound on ``last``: an undo of more than this many changes at once is refused."""

LIST_CHANGES_DOC = (
    "List the changes made to files inside the allowed directories, newest first. Every change "
    "made through this server (write_file, edit_file, move/copy/delete, create_directory, "
    "apply_changes, undo_change) is recorded with the content it replaced, so it can be taken "
    "back with undo_change. Each entry has its `id` (what undo_change takes), time, operation "
    "and the paths it changed with +added/-removed line counts; database calls are listed too, "
    "for audit (they cannot be undone), and an apply_changes set with a sql step shows both "
    "its paths and its statements. An entry marked 'cannot be undone' lost its old "
    "content to history retention. `path`: only changes to that file or below that "
    "directory; `since`: an ISO 8601 time or a duration back from now (30m, 2h, 7d); `limit`: "
    "how many (default 20)."
)

UNDO_CHANGE_DOC = (
    "Take back recorded changes: every path they touched goes back to its state before them, "
    "as one atomic change (all paths or none, even if the call is cancelled or the server "
    "crashes). To take back your last change, call undo_change with last=1; to take back a "
    "particular one, pass its id from list_changes (or the changeId apply_changes returned); "
    "last=N takes back the newest N changes inside the allowed directories together. Pass "
    "dryRun=true first to see the diffs without changing anything. If a path was changed again "
    "after the change being undone, nothing is changed and the error names the path: pass "
    "force=true to restore the old version anyway, or paths=[...] to restore only some files. "
    "The undo is recorded as a change of its own (its changeId): undoing it redoes what it took "
    "back. Database calls cannot be undone; a change set that also ran sql statements is "
    "refused unless you pass paths=[...] (then only those files go back; the rows stay)."
)


def entry_output(entry: HistoryEntry) -> ChangeEntryOutput:
    """A history entry in the tool's camelCase shape (its time as ISO 8601 UTC)."""
    return ChangeEntryOutput(
        id=entry.id,
        time=iso_utc(entry.time),
        op=entry.op,
        undoable=entry.undoable,
        paths=[PathChangeOutput.model_validate(row) for row in entry.paths],
        undoes=list(entry.undoes),
        database=entry.database,
        statements=list(entry.statements) if entry.database is not None else None,
        rows_changed=entry.rows_changed,
    )


def undo_output(result: UndoResult) -> UndoChangeOutput:
    return UndoChangeOutput(
        applied=result.applied,
        undone=list(result.undone),
        change_id=result.change_id,
        paths=[RestoredPathOutput.model_validate(p) for p in result.paths],
    )


def register_history_tools(server: MCPServer[Any], runtime: ToolRuntime) -> None:
    """Add ``list_changes`` and ``undo_change`` to ``server``; they run through ``runtime``."""

    @server.tool(name="list_changes", description=LIST_CHANGES_DOC, annotations=READ_ONLY)
    async def list_changes(
        ctx: Context[Any, Any],
        *,
        path: Annotated[
            str | None,
            Field(description="Only changes to this file, or to anything below this directory."),
        ] = None,
        since: Annotated[
            str | None,
            Field(
                description="Only changes from then on: ISO 8601 (2026-12-07T10:00:00Z) or a "
                "duration back from now (30m, 2h, 7d)."
            ),
        ] = None,
        limit: Annotated[
            int, Field(ge=1, le=MAX_LIST, description="How many changes at most.")
        ] = 20,
    ) -> Annotated[CallToolResult, ListChangesOutput]:
        now = time.time()

        async def listing(ws: Workspace) -> list[HistoryEntry]:
            start = None
            if since is not None:
                try:
                    start = parse_since(since, now)
                except ValueError as err:
                    raise InvalidArgumentError(str(err)) from err
            # One more than asked: whether more exist is worth a line to the model.
            return await ws.history_entries(path=path, since=start, limit=limit + 1)

        entries = await runtime.call(ctx, listing)
        shown, truncated = entries[:limit], len(entries) > limit
        out = ListChangesOutput(changes=[entry_output(e) for e in shown], truncated=truncated)
        return tool_result(out, changes_text(shown, truncated, now))

    @server.tool(
        name="undo_change",
        description=UNDO_CHANGE_DOC,
        annotations=mutating(destructive=True, idempotent=False),
    )
    async def undo_change(
        ctx: Context[Any, Any],
        *,
        id: Annotated[  # shadows the builtin: it is the name a model sees
            str | None,
            Field(min_length=1, description="The change to take back (an id from list_changes)."),
        ] = None,
        last: Annotated[
            int | None,
            Field(
                ge=1,
                le=MAX_LAST,
                description="Instead of id: take back the newest N changes (1: your last one).",
            ),
        ] = None,
        paths: Annotated[
            list[str] | None,
            Field(
                min_length=1,
                description="Restore only these paths of the change(s); the others stay as "
                "they are.",
            ),
        ] = None,
        dryRun: Annotated[
            bool, Field(description="Show what would be restored, with diffs; change nothing.")
        ] = False,
        force: Annotated[
            bool,
            Field(
                description="Restore even paths that were changed again since (those later "
                "changes are overwritten; they stay in the history and can be undone)."
            ),
        ] = False,
    ) -> Annotated[CallToolResult, UndoChangeOutput]:
        progress = runtime.reporter(ctx)

        async def undo(ws: Workspace) -> UndoResult:
            if ws.read_only and not dryRun:
                raise ReadOnlyError(
                    "this server is read-only (--read-only): undo_change can only preview "
                    "(dryRun=true), not change files"
                )
            return await ws.undo(
                id, last=last, paths=paths, dry_run=dryRun, force=force, progress=progress
            )

        result = await runtime.call(ctx, undo)
        return tool_result(undo_output(result), undo_text(result, dry_run=dryRun))
