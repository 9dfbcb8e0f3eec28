"""The file tools: a drop-in superset of the reference MCP filesystem server's tools.

Each tool maps its camelCase arguments onto one ``Workspace`` call (through ``ToolRuntime``,
which handles roots, deadlines and errors) and returns structured content plus a short text.
Names and parameters match the reference server where they overlap; on purpose, ``edit_file``
keeps CRLF and refuses an ``oldText`` that matches more than once, and reads return a ``sha256``
that the mutating tools accept as ``expectedSha256``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context, MCPServer
from mcp.types import (
    AudioContent,
    BlobResourceContents,
    CallToolResult,
    ContentBlock,
    EmbeddedResource,
    ImageContent,
    TextContent,
)
from pydantic import Field

from atomictools.engine import (
    MAX_CHANGES,
    AtomicToolsError,
    BytesRead,
    Change,
    ChangeOutcome,
    ChangeSetResult,
    DatabaseCatalog,
    DirEntry,
    Edit,
    InvalidArgumentError,
    SearchResult,
    Statement,
    TextRead,
    TooLargeError,
    TreeNode,
    Workspace,
)
from atomictools.server.models import (
    MAX_LISTED_RESULTS,
    AllowedDirectoriesOutput,
    AnyChange,
    ApplyChangesOutput,
    CopyChange,
    CopyOutput,
    DeleteChange,
    DeleteOutput,
    DirectoryOutput,
    EditChange,
    EditOperation,
    EditOutput,
    FileInfoOutput,
    FileReadResult,
    ListOutput,
    ListWithSizesOutput,
    MkdirChange,
    MoveChange,
    MoveOutput,
    ReadMediaOutput,
    ReadMultipleOutput,
    ReadTextOutput,
    SearchOutput,
    SqlChange,
    TreeOutput,
    WriteChange,
    WriteOutput,
    decode_params,
)
from atomictools.server.runtime import ToolRuntime
from atomictools.server.tooling import (
    READ_ONLY,
    IdempotencyKey,
    mutating,
    structured_result,
    tool_result,
)
from atomictools.server.wording import for_client

PathParam = Annotated[str, Field(description="File path: relative to the first root, or absolute.")]
ExpectedSha = Annotated[
    str | None,
    Field(description="Refuse the change unless the file's current sha256 is this (from a read)."),
]
SourceSha = Annotated[
    str | None,
    Field(description="Refuse unless the source file's current sha256 is this (from a read)."),
]
Excludes = Annotated[
    list[str] | None, Field(description="Glob patterns to skip, e.g. node_modules or *.log.")
]


def _tree_json(node: TreeNode) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": node.name, "type": node.type}
    if node.type == "directory":
        entry["children"] = [_tree_json(child) for child in node.children or ()]
        if node.depth_limited:
            entry["depthLimited"] = True
    return entry


_TAGS = {"file": "[FILE]", "directory": "[DIR]", "symlink": "[LINK]", "other": "[OTHER]"}


def _entries(entries: Iterable[DirEntry]) -> list[dict[str, Any]]:
    """Listing entries as ``ListOutput.entries`` items (plain data: no model per entry)."""
    return [{"name": e.name, "type": e.type, "size": e.size} for e in entries]


def _count(nodes: tuple[TreeNode, ...]) -> int:
    return sum(1 + _count(node.children or ()) for node in nodes)


def _media_block(mime: str, data: bytes, uri: str) -> ContentBlock:
    encoded = base64.b64encode(data).decode("ascii")
    if mime.startswith("image/"):
        return ImageContent(type="image", data=encoded, mime_type=mime)
    if mime.startswith("audio/"):
        return AudioContent(type="audio", data=encoded, mime_type=mime)
    return EmbeddedResource(
        type="resource", resource=BlobResourceContents(uri=uri, mime_type=mime, blob=encoded)
    )


def _about_read(read: TextRead) -> str:
    """What a read returned, for the model: where the lines are, and the hash to change it by."""
    facts = f"{read.size} bytes, {read.encoding}, {read.newline} line endings"
    where = ""
    if read.line_count is not None:  # a read of some lines: say which
        if read.first_line is None:  # the tail of a large file: not numbered
            span = f"the last {read.line_count} line(s)"
        elif read.line_count == 0:
            span = f"no lines from line {read.first_line}"
        else:
            span = f"lines {read.first_line}-{read.first_line + read.line_count - 1}"
        total = f" of {read.total_lines}" if read.total_lines is not None else ""
        where = f"; {span}{total}"
        if read.next_offset is not None:
            where += f"; more follow: pass offset={read.next_offset} to read on"
    if read.sha256 is None:
        hashed = (
            "no sha256 for part of a large file (it would cost a read of the whole file); "
            "to change this file safely, read it whole and pass that sha256 as expectedSha256"
        )
    else:
        hashed = f"sha256 {read.sha256}. To change this file, pass this sha256 as expectedSha256"
    return f"[{read.path}: {facts}{where}; {hashed}.]"


def register_file_tools(server: MCPServer[Any], runtime: ToolRuntime) -> None:
    """Add every file tool to ``server``; the tools run through ``runtime``."""

    async def read_text_file(
        ctx: Context[Any, Any],
        *,
        path: PathParam,
        head: Annotated[int | None, Field(ge=0, description="Only the first N lines.")] = None,
        tail: Annotated[int | None, Field(ge=0, description="Only the last N lines.")] = None,
        offset: Annotated[
            int | None, Field(ge=1, description="First line to read, counting from 1.")
        ] = None,
        limit: Annotated[
            int | None, Field(ge=0, description="How many lines to read (from offset).")
        ] = None,
    ) -> Annotated[CallToolResult, ReadTextOutput]:
        read = await runtime.call(
            ctx,
            lambda ws: ws.read_text(path, head=head, tail=tail, offset=offset, limit=limit),
        )
        # The content alone in the first block (what a model reads must not be altered); what
        # it is in a second one, for hosts that forward only text to the model.
        return tool_result(
            ReadTextOutput.model_validate(read),
            read.content,
            [TextContent(type="text", text=_about_read(read))],
            exclude_none=True,
        )

    read_text_doc = (
        "Read a text file, or some of its lines: the first `head`, the last `tail`, or `limit` "
        "lines from line `offset` (1-based); a part costs what it returns, not the whole file, "
        "and the result says where it is (`firstLine`, `lineCount`) and, when more lines "
        "follow, the `nextOffset` to read on. Detects the encoding (UTF-8, a BOM, else "
        "Latin-1) and line endings. Returns the content (first text block) plus `sha256` of "
        "the whole file (in the result, and in a second text block): pass it as "
        "`expectedSha256` to write_file/edit_file/delete_file so the change is refused if "
        "someone changed the file since. For part of a file over 256 KiB, `sha256` is absent "
        "(hashing would read the whole file): read it whole to get one. Binary files are "
        "refused; use read_media_file."
    )
    server.add_tool(
        read_text_file, name="read_text_file", description=read_text_doc, annotations=READ_ONLY
    )
    server.add_tool(
        read_text_file,
        name="read_file",
        description="Same as read_text_file (kept for clients of the reference server). "
        + read_text_doc,
        annotations=READ_ONLY,
    )

    @server.tool(
        name="read_media_file",
        description=(
            "Read an image, audio or other binary file; returns it base64-encoded (as an image, "
            "audio or blob content block) with its MIME type, size and sha256."
        ),
        annotations=READ_ONLY,
    )
    async def read_media_file(
        ctx: Context[Any, Any], path: PathParam
    ) -> Annotated[CallToolResult, ReadMediaOutput]:
        async def load(ws: Workspace) -> tuple[BytesRead, str]:
            read = await ws.read_bytes(path)
            return read, ws.absolute(path).as_uri()

        read, uri = await runtime.call(ctx, load)
        out = ReadMediaOutput.model_validate(read)
        block = _media_block(read.mime_type, read.data, uri)
        text = f"{read.path}: {read.mime_type}, {read.size} bytes, sha256 {read.sha256}"
        return tool_result(out, text, [block])

    @server.tool(
        name="read_multiple_files",
        description=(
            "Read several text files in one call. A file that cannot be read gets an `error` "
            "instead of failing the whole call. Each result carries the file's sha256."
        ),
        annotations=READ_ONLY,
    )
    async def read_multiple_files(
        ctx: Context[Any, Any],
        paths: Annotated[list[str], Field(min_length=1, description="The files to read.")],
    ) -> Annotated[CallToolResult, ReadMultipleOutput]:
        report = runtime.reporter(ctx)

        async def read_all(ws: Workspace) -> list[FileReadResult]:
            limit = runtime.options.max_read_multiple
            if len(paths) > limit:
                raise InvalidArgumentError(f"{len(paths)} paths is more than {limit}; split them")
            results: list[FileReadResult] = []
            budget = ws.limits.max_read_bytes
            for done, path in enumerate(paths, start=1):
                try:
                    read = await ws.read_text(path)
                    if read.size > budget:
                        raise TooLargeError(
                            f"{read.path}: the reply would exceed {ws.limits.max_read_bytes} "
                            "bytes; read it in another call"
                        )
                    budget -= read.size
                    results.append(FileReadResult.model_validate(read))
                except AtomicToolsError as err:
                    results.append(FileReadResult(path=path, error=for_client(str(err))))
                await report(done, len(paths))
            return results

        results = await runtime.call(ctx, read_all)
        text = "\n---\n".join(
            f"{r.path} (sha256 {r.sha256}):\n{r.content}"
            if r.error is None
            else f"{r.path}: Error - {r.error}"
            for r in results
        )
        return tool_result(ReadMultipleOutput(files=results), text)

    @server.tool(
        name="write_file",
        description=(
            "Create a file or replace its whole content, atomically: readers see the old or "
            "the new content, never a partial file, even if the call is cancelled or the "
            "server dies. Give `expectedSha256` (from a read) to refuse the write if the file "
            "changed meanwhile, `createOnly` to refuse overwriting. The parent directory must "
            "exist (create_directory)."
        ),
        annotations=mutating(destructive=True, idempotent=True),
    )
    async def write_file(
        ctx: Context[Any, Any],
        *,
        path: PathParam,
        content: Annotated[str, Field(description="The complete new content (UTF-8 text).")],
        expectedSha256: ExpectedSha = None,
        createOnly: Annotated[bool, Field(description="Refuse if the file exists.")] = False,
        idempotencyKey: IdempotencyKey = None,
    ) -> Annotated[CallToolResult, WriteOutput]:
        progress = runtime.reporter(ctx)
        written = await runtime.call(
            ctx,
            lambda ws: ws.write(
                path,
                content,
                expected_sha256=expectedSha256,
                create_only=createOnly,
                progress=progress,
                idempotency_key=idempotencyKey,
            ),
        )
        out = WriteOutput.model_validate(written)
        verb = "Created" if written.created else "Wrote"
        return tool_result(
            out, f"{verb} {written.path} ({written.size} bytes, sha256 {written.sha256})"
        )

    @server.tool(
        name="edit_file",
        description=(
            "Replace exact text in a file: every edit or none. Each `oldText` must match "
            "exactly once (include surrounding lines to make it unique); otherwise nothing is "
            "written and the error names the edit. Keeps the file's encoding, BOM and line "
            "endings (CRLF stays CRLF). Returns a unified diff; `dryRun` previews it without "
            "writing. The write is atomic."
        ),
        annotations=mutating(destructive=True, idempotent=False),
    )
    async def edit_file(
        ctx: Context[Any, Any],
        *,
        path: PathParam,
        edits: Annotated[list[EditOperation], Field(min_length=1)],
        dryRun: Annotated[bool, Field(description="Show the diff, write nothing.")] = False,
        expectedSha256: ExpectedSha = None,
        idempotencyKey: IdempotencyKey = None,
    ) -> Annotated[CallToolResult, EditOutput]:
        changes = [Edit(e.old_text, e.new_text) for e in edits]
        edited = await runtime.call(
            ctx,
            lambda ws: ws.edit(
                path,
                changes,
                dry_run=dryRun,
                expected_sha256=expectedSha256,
                idempotency_key=idempotencyKey,
            ),
        )
        out = EditOutput.model_validate(edited)
        header = "Dry run, nothing written" if dryRun else f"Edited {edited.path}"
        return tool_result(out, f"{header}; sha256 {edited.sha256}\n```diff\n{edited.diff}```")

    @server.tool(
        name="create_directory",
        description="Create a directory, with any missing parents; succeeds if it exists.",
        annotations=mutating(destructive=False, idempotent=True),
    )
    async def create_directory(
        ctx: Context[Any, Any], path: PathParam, idempotencyKey: IdempotencyKey = None
    ) -> Annotated[CallToolResult, DirectoryOutput]:
        made = await runtime.call(ctx, lambda ws: ws.mkdir(path, idempotency_key=idempotencyKey))
        out = DirectoryOutput.model_validate(made)
        return tool_result(out, f"{'Created' if made.created else 'Already exists'}: {made.path}")

    @server.tool(
        name="list_directory",
        description=(
            "List a directory: [FILE], [DIR] and [LINK] entries, sorted by name; links are not "
            "followed. For file sizes and totals use list_directory_with_sizes."
        ),
        annotations=READ_ONLY,
    )
    async def list_directory(
        ctx: Context[Any, Any], path: PathParam
    ) -> Annotated[CallToolResult, ListOutput]:
        listing = await runtime.call(ctx, lambda ws: ws.list_directory(path, sizes=False))
        text = "\n".join(f"{_TAGS[e.type]} {e.name}" for e in listing.entries)
        text = text or "(empty directory)"
        if listing.truncated:
            text += "\n(truncated: too many entries; use search_files to narrow)"
        structured = {
            "path": listing.path,
            "entries": [{"name": e.name, "type": e.type} for e in listing.entries],
            "truncated": listing.truncated,
        }
        return structured_result(structured, text)

    @server.tool(
        name="list_directory_with_sizes",
        description="List a directory with file sizes and totals, sorted by name or size.",
        annotations=READ_ONLY,
    )
    async def list_directory_with_sizes(
        ctx: Context[Any, Any],
        path: PathParam,
        sortBy: Annotated[
            Literal["name", "size"], Field(description="Sort by name (default) or size.")
        ] = "name",
    ) -> Annotated[CallToolResult, ListWithSizesOutput]:
        listing = await runtime.call(ctx, lambda ws: ws.list_directory(path))
        entries = list(listing.entries)
        if sortBy == "size":
            entries.sort(key=lambda e: e.size or 0, reverse=True)
        files = [e for e in entries if e.type == "file"]
        structured = {
            "path": listing.path,
            "entries": _entries(entries),
            "truncated": listing.truncated,
            "totalFiles": len(files),
            "totalDirectories": sum(e.type == "directory" for e in entries),
            "totalSize": sum(e.size or 0 for e in files),
        }
        lines = [
            f"{'[DIR] ' if e.type == 'directory' else '[FILE]'} {e.name:<40} "
            f"{'' if e.size is None else f'{e.size:>12,} B'}"
            for e in entries
        ]
        lines.append(
            f"\nTotal: {structured['totalFiles']} files, {structured['totalDirectories']} "
            f"directories, {structured['totalSize']:,} bytes"
        )
        return structured_result(structured, "\n".join(lines))

    @server.tool(
        name="directory_tree",
        description=(
            "A recursive JSON tree of {name, type, children} below a directory. Symlinks are "
            "listed, not followed. Refuses trees larger than the server's entry limit: ask for a "
            "subdirectory or pass excludePatterns."
        ),
        annotations=READ_ONLY,
    )
    async def directory_tree(
        ctx: Context[Any, Any], path: PathParam, excludePatterns: Excludes = None
    ) -> Annotated[CallToolResult, TreeOutput]:
        progress = runtime.reporter(ctx)

        async def walk(ws: Workspace) -> tuple[str, TreeNode]:
            node = await ws.tree(path, exclude=excludePatterns or (), progress=progress)
            return ws.shown(path), node

        display, root = await runtime.call(ctx, walk)
        children = root.children or ()
        tree = [_tree_json(child) for child in children]
        structured = {"path": display, "tree": tree, "entries": _count(children)}
        # Compact JSON: the C encoder (an indented dump runs the pure-Python one, 4x slower),
        # and a third fewer tokens for the model that reads it.
        return structured_result(structured, json.dumps(tree, separators=(",", ":")))

    @server.tool(
        name="search_files",
        description=(
            "Find files and directories below `path` whose path matches a glob `pattern`: "
            "`*.py` matches names at any depth, `src/**/test_*.py` matches paths, `*.{ts,tsx}` "
            "alternatives. Symlinked directories are not entered."
        ),
        annotations=READ_ONLY,
    )
    async def search_files(
        ctx: Context[Any, Any],
        path: PathParam,
        pattern: Annotated[str, Field(description="Glob pattern, e.g. **/*.md")],
        excludePatterns: Excludes = None,
    ) -> Annotated[CallToolResult, SearchOutput]:
        progress = runtime.reporter(ctx)

        async def find(ws: Workspace) -> tuple[str, SearchResult]:
            found = await ws.search(path, pattern, exclude=excludePatterns or (), progress=progress)
            return ws.shown(path), found

        display, found = await runtime.call(ctx, find)
        text = "\n".join(found.matches) or "No matches found"
        if found.truncated:
            text += "\n(truncated: more matches exist; narrow the pattern)"
        structured = {
            "path": display,
            "pattern": pattern,
            "matches": list(found.matches),
            "truncated": found.truncated,
        }
        return structured_result(structured, text)

    @server.tool(
        name="get_file_info",
        description="Metadata of a file or directory: type, size, permissions, times.",
        annotations=READ_ONLY,
    )
    async def get_file_info(
        ctx: Context[Any, Any], path: PathParam
    ) -> Annotated[CallToolResult, FileInfoOutput]:
        info = await runtime.call(ctx, lambda ws: ws.info(path))
        fields = {
            "path": info.path,
            "type": info.type,
            "size": info.size,
            "permissions": info.permissions,
            "modified": info.modified,
            "accessed": info.accessed,
            "changed": info.changed,
            "created": info.created,
            "symlinkTarget": info.symlink_target,
        }
        text = "\n".join(f"{k}: {v}" for k, v in fields.items() if v is not None)
        return structured_result(fields, text)

    @server.tool(
        name="list_allowed_directories",
        description="The directories this server may read and change (narrowed to your roots).",
        annotations=READ_ONLY,
    )
    async def list_allowed_directories(
        ctx: Context[Any, Any],
    ) -> Annotated[CallToolResult, AllowedDirectoriesOutput]:
        async def roots(ws: Workspace) -> list[str]:
            return [str(p) for p in ws.roots]

        directories = await runtime.call(ctx, roots)
        text = "Allowed directories:\n" + "\n".join(directories)
        return structured_result({"directories": directories}, text)

    @server.tool(
        name="move_file",
        description=(
            "Move or rename a file or directory atomically (a symlink is moved as a link). An "
            "existing destination is refused unless `overwrite` is true; the check and the "
            "rename are one atomic step. A file moving to another file system is copied, then "
            "its source deleted, both journaled: after a crash there is one of them, not both."
        ),
        annotations=mutating(destructive=True, idempotent=False),
    )
    async def move_file(
        ctx: Context[Any, Any],
        *,
        source: PathParam,
        destination: PathParam,
        overwrite: Annotated[bool, Field(description="Replace an existing destination.")] = False,
        expectedSha256: SourceSha = None,
        idempotencyKey: IdempotencyKey = None,
    ) -> Annotated[CallToolResult, MoveOutput]:
        moved = await runtime.call(
            ctx,
            lambda ws: ws.move(
                source,
                destination,
                overwrite=overwrite,
                expected_sha256=expectedSha256,
                idempotency_key=idempotencyKey,
            ),
        )
        out = MoveOutput.model_validate(moved)
        return tool_result(out, f"Moved {moved.source} to {moved.destination}")

    @server.tool(
        name="copy_file",
        description=(
            "Copy a file; the destination appears complete or not at all. An existing "
            "destination is refused unless `overwrite` is true."
        ),
        annotations=mutating(destructive=True, idempotent=True),
    )
    async def copy_file(
        ctx: Context[Any, Any],
        *,
        source: PathParam,
        destination: PathParam,
        overwrite: Annotated[bool, Field(description="Replace an existing destination.")] = False,
        expectedSha256: SourceSha = None,
        idempotencyKey: IdempotencyKey = None,
    ) -> Annotated[CallToolResult, CopyOutput]:
        copied = await runtime.call(
            ctx,
            lambda ws: ws.copy(
                source,
                destination,
                overwrite=overwrite,
                expected_sha256=expectedSha256,
                idempotency_key=idempotencyKey,
            ),
        )
        out = CopyOutput.model_validate(copied)
        return tool_result(
            out,
            f"Copied {copied.source} to {copied.destination} ({copied.size} bytes, "
            f"sha256 {copied.sha256})",
        )

    @server.tool(
        name="delete_file",
        description=(
            "Delete a file or a symlink (never the link's target); directories are refused. "
            "Give `expectedSha256` to refuse if the file changed since you read it."
        ),
        annotations=mutating(destructive=True, idempotent=True),
    )
    async def delete_file(
        ctx: Context[Any, Any],
        path: PathParam,
        expectedSha256: ExpectedSha = None,
        idempotencyKey: IdempotencyKey = None,
    ) -> Annotated[CallToolResult, DeleteOutput]:
        deleted = await runtime.call(
            ctx,
            lambda ws: ws.delete(
                path, expected_sha256=expectedSha256, idempotency_key=idempotencyKey
            ),
        )
        return tool_result(DeleteOutput.model_validate(deleted), f"Deleted {deleted.path}")


def _to_change(change: AnyChange) -> Change:
    """A file change as the engine's ``Change`` (a sql step needs its database: ``_sql_step``)."""
    if isinstance(change, WriteChange):
        return Change(
            "write",
            change.path,
            content=change.content.encode(),
            expected_sha256=change.expected_sha256,
        )
    if isinstance(change, EditChange):
        edits = tuple(Edit(e.old_text, e.new_text) for e in change.edits)
        return Change("edit", change.path, edits=edits, expected_sha256=change.expected_sha256)
    if isinstance(change, MoveChange | CopyChange):
        return Change(
            change.op,
            change.destination,
            source=change.source,
            overwrite=change.overwrite,
            expected_sha256=change.expected_sha256,
        )
    if isinstance(change, DeleteChange):
        return Change("delete", change.path, expected_sha256=change.expected_sha256)
    assert isinstance(change, MkdirChange)
    return Change("mkdir", change.path)


async def _sql_step(
    change: SqlChange, ws: Workspace, databases: DatabaseCatalog | None, label: str
) -> Change:
    """A sql step as the engine's ``Change``: its database found the way db_query finds one
    (a configured name, or a database file inside the client's roots), its blobs decoded."""
    if databases is None:
        raise InvalidArgumentError(
            f"{label}this server serves no databases, so a change set cannot hold a sql step; "
            "leave it out, or ask for a server with database tools"
        )
    try:
        database = await databases.get(change.database, ws)
    except AtomicToolsError as err:
        raise err.prefixed(label) from None
    statements = []
    total = len(change.statements)
    for index, statement in enumerate(change.statements, start=1):
        try:
            params = decode_params(statement.get("params"))
        except AtomicToolsError as err:
            raise err.prefixed(f"{label}statement {index} of {total}: ") from None
        statements.append(Statement(statement["sql"], params))
    return Change("sql", database.name, database=database, statements=tuple(statements))


def _sql_label(index: int, total: int) -> str:
    """The engine's prefix of an error about one change of a set (none for a set of one)."""
    return f"change {index} of {total} (sql): " if total > 1 else ""


def _outcome_json(outcome: ChangeOutcome) -> dict[str, Any]:
    """One change's ``ChangeOutput`` as plain JSON; a sql step's own fields only for it."""
    item: dict[str, Any] = {
        "op": outcome.op,
        "path": outcome.path,
        "source": outcome.source,
        "sha256": outcome.sha256,
        "diff": outcome.diff,
        "created": outcome.created,
    }
    if outcome.op == "sql":
        results = outcome.statements
        item |= {
            "database": outcome.path,
            "statements": len(results),
            "rowsChanged": sum(max(r.rowcount, 0) for r in results),
            "lastrowid": results[-1].lastrowid if results else None,
            "results": [
                {"index": i, "rowcount": r.rowcount, "lastrowid": r.lastrowid}
                for i, r in enumerate(results[:MAX_LISTED_RESULTS], start=1)
            ],
            "resultsTruncated": len(results) > MAX_LISTED_RESULTS,
        }
    return item


def _change_line(item: dict[str, Any]) -> str:
    if item["op"] == "sql":
        line = (
            f"- sql on {item['database']}: {item['statements']} statement(s), "
            f"{item['rowsChanged']} row(s) changed"
        )
        return line + (f", lastrowid {item['lastrowid']}" if item["lastrowid"] is not None else "")
    arrow = f"{item['source']} -> {item['path']}" if item["source"] else item["path"]
    return f"- {item['op']} {arrow}" + (f" (sha256 {item['sha256']})" if item["sha256"] else "")


def _applied_text(result: ChangeSetResult, changes: list[dict[str, Any]]) -> str:
    """What an apply_changes call did (or would do), for a model that reads only the text."""
    with_sql = any(item["op"] == "sql" for item in changes)
    if not result.applied:
        after = (
            " (dry run: every check passed and the statements ran, then were rolled back; "
            "nothing was written or committed)"
            if with_sql
            else ""
        )
        header = f"Would apply {len(changes)} change(s) atomically{after}:"
    elif result.change_id is None:
        header = f"Applied {len(changes)} change(s) atomically:"
    elif with_sql:
        one = (
            ", files and database committed as one"
            if any(item["op"] != "sql" for item in changes)
            else ""
        )
        header = (
            f"Applied {len(changes)} change(s) atomically{one} (recorded as change "
            f"{result.change_id}; its statements cannot be undone: undo_change with this id "
            "and `paths` takes back only the files named):"
        )
    else:
        header = (
            f"Applied {len(changes)} change(s) atomically (recorded as change "
            f"{result.change_id}: undo_change with this id takes them all back):"
        )
    lines = [header]
    for item in changes:
        lines.append(_change_line(item))
        if item["diff"]:
            lines.append(f"```diff\n{item['diff']}```")
    return "\n".join(lines)


APPLY_CHANGES_DOC = (
    "Apply several changes as one: all of them or none, even if the call is cancelled or the "
    "server crashes (a journal finishes or undoes it at the next start). Each change is "
    '{op:"write", path, content, expectedSha256?}, {op:"edit", path, edits:[{oldText,newText}], '
    'expectedSha256?}, {op:"move"|"copy", source, destination, overwrite?}, {op:"delete", '
    'path, expectedSha256?} or {op:"mkdir", path}; a path may appear in one change only. A set '
    'may also change one database: {op:"sql", database, statements:[{sql, params?}]} '
    "(database: a name from db_list; params bind ? or :name placeholders, a blob as "
    '{"$blob": base64}). Its statements run in one transaction whose COMMIT is the commit '
    "point of the whole set: the files change if and only if the rows do. One database per "
    "set (several sql steps must name the same one); the tool owns the transaction, so "
    "BEGIN/COMMIT/ATTACH are refused. `dryRun` runs every check and returns the diffs, "
    "writing nothing; sql statements run and are rolled back, their row counts returned. "
    "Reports progress per change. The result's `changeId` names the set in the history: "
    "undo_change with it takes the whole set back; statements cannot be undone, so for a set "
    "with a sql step undo_change takes back only the files named in its `paths`."
)


def register_change_set_tool(
    server: MCPServer[Any], runtime: ToolRuntime, databases: DatabaseCatalog | None = None
) -> None:
    """Add ``apply_changes``; its sql steps find databases in ``databases`` (by default the
    runtime's; none: a sql step is refused)."""

    @server.tool(
        name="apply_changes",
        description=APPLY_CHANGES_DOC,
        annotations=mutating(destructive=True, idempotent=False),
    )
    async def apply_changes(
        ctx: Context[Any, Any],
        changes: Annotated[list[AnyChange], Field(min_length=1, max_length=MAX_CHANGES)],
        dryRun: Annotated[
            bool,
            Field(description="Check and preview; write nothing (sql statements roll back)."),
        ] = False,
        idempotencyKey: IdempotencyKey = None,
    ) -> Annotated[CallToolResult, ApplyChangesOutput]:
        progress = runtime.reporter(ctx)
        catalog = databases if databases is not None else runtime.databases

        async def apply(ws: Workspace) -> ChangeSetResult:
            total = len(changes)
            batch = [
                await _sql_step(change, ws, catalog, _sql_label(index, total))
                if isinstance(change, SqlChange)
                else _to_change(change)
                for index, change in enumerate(changes, start=1)
            ]
            return await ws.apply_changes(
                batch, dry_run=dryRun, progress=progress, idempotency_key=idempotencyKey
            )

        result = await runtime.call(ctx, apply)
        items = [_outcome_json(outcome) for outcome in result.changes]
        structured = {
            "applied": result.applied,
            "changes": items,
            "txid": result.txid,
            "changeId": result.change_id,
        }
        return structured_result(structured, _applied_text(result, items))
