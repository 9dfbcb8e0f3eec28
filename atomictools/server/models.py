"""Typed inputs and outputs of the MCP tools: camelCase on the wire, as the tool contract says."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated, Any, Literal, NotRequired

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel
from typing_extensions import TypedDict

from atomictools.engine import InvalidArgumentError, Params

EntryTypeName = Literal["file", "directory", "symlink", "other"]
MAX_STATEMENTS = 20_000
"""Most statements one call may send (db_transaction, or one sql step of apply_changes)."""
MAX_LISTED_RESULTS = 100
"""Per-statement results listed in a reply; the totals cover the rest."""
DATABASE_DOC = "A database name from db_list (or a .db/.sqlite file in the roots)."
DatabaseParam = Annotated[str, Field(description=DATABASE_DOC)]
JsonParams = Annotated[
    list[Any] | dict[str, Any] | None,
    Field(
        description="Bound parameters: a list for ? placeholders or an object for :name ones. "
        'A blob is {"$blob": "<base64>"}.'
    ),
]


def listed(items: str) -> WithJsonSchema:
    """The advertised schema of a long array: an array, its items described in words.

    A client validates a result against the tool's outputSchema; the Python SDK does it in pure
    Python at about 35 us per item for an ``$ref`` item schema (9 ms for a 257-entry
    directory, more than the whole call of the reference server). The server builds every item
    from its own model (the tests validate them against it), so the advertised schema keeps the
    top-level fields typed and says what an item holds in its description.
    """
    return WithJsonSchema({"type": "array", "description": f"Each item: {items}"})


class WireModel(BaseModel):
    """Base of every tool model: camelCase JSON names, snake_case in Python.

    ``from_attributes`` lets an output be built straight from the engine's result record.
    """

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", from_attributes=True
    )


# -- SQL parameters: JSON has no bytes, so a blob travels as {"$blob": "<base64>"} ----------

BLOB_KEY = "$blob"
_BINDABLE = frozenset({str, int, float, bool, type(None)})
"""JSON values sqlite3 binds as they are (objects and lists need ``_decode_value``)."""


def _decode_value(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {BLOB_KEY} and isinstance(value[BLOB_KEY], str):
            try:
                return base64.b64decode(value[BLOB_KEY], validate=True)
            except binascii.Error as err:
                raise InvalidArgumentError(f"{BLOB_KEY} is not valid base64: {err}") from err
        raise InvalidArgumentError(
            f'a parameter cannot be an object (got {json.dumps(value)[:60]}); use {{"{BLOB_KEY}": '
            '"<base64>"} for a blob'
        )
    if isinstance(value, list):
        raise InvalidArgumentError("a parameter cannot be a list; bind one value per placeholder")
    return value


def decode_params(params: list[Any] | dict[str, Any] | None) -> Params:
    """JSON parameters (of db_query, db_execute, db_transaction and apply_changes' sql steps)
    to values sqlite3 can bind."""
    if params is None:
        return None
    if isinstance(params, dict):
        return {key: _decode_value(value) for key, value in params.items()}
    if _BINDABLE.issuperset(map(type, params)):
        return params  # the common case, checked at a fraction of a per-value call's cost
    return [_decode_value(value) for value in params]


class EditOperation(WireModel):
    old_text: str = Field(description="Exact text to replace; must occur exactly once.")
    new_text: str = Field(description="Replacement text.")


class ReadTextOutput(WireModel):
    path: str
    content: str
    size: int = Field(description="Size of the whole file in bytes.")
    sha256: str | None = Field(
        default=None,
        description=(
            "Hash of the whole file; pass it back as expectedSha256. Absent for some lines of "
            "a file over 256 KiB (read the file whole to get it)."
        ),
    )
    encoding: str
    newline: str = Field(description="LF, CRLF, CR or mixed.")
    bom: bool
    partial: bool = Field(description="True when the file has lines that were not returned.")
    first_line: int | None = Field(
        default=None,
        description="Number (from 1) of the first line returned, for a read of some lines.",
    )
    line_count: int | None = Field(
        default=None, description="How many lines were returned, for a read of some lines."
    )
    next_offset: int | None = Field(
        default=None, description="The offset that reads on after these lines; absent at the end."
    )
    total_lines: int | None = Field(
        default=None, description="Lines in the whole file, when the read saw them all."
    )


class ReadMediaOutput(WireModel):
    path: str
    mime_type: str
    size: int
    sha256: str


class FileReadResult(WireModel):
    path: str
    content: str | None = None
    size: int | None = None
    sha256: str | None = None
    error: str | None = Field(default=None, description="Why this file could not be read.")


class ReadMultipleOutput(WireModel):
    files: Annotated[
        list[FileReadResult],
        listed("{path, content?, size?, sha256?, error?}; error says why a file was not read."),
    ]


class WriteOutput(WireModel):
    path: str
    size: int
    sha256: str
    created: bool = Field(description="True when the file did not exist before.")


class EditOutput(WireModel):
    path: str
    diff: str = Field(description="Unified diff of the change.")
    applied: bool = Field(description="False for a dry run: nothing was written.")
    sha256: str = Field(description="Hash of the content after the edits.")
    previous_sha256: str


class DirectoryOutput(WireModel):
    path: str
    created: bool


class Entry(WireModel):
    name: str
    type: EntryTypeName
    size: int | None = Field(default=None, description="Bytes, for files.")


class ListOutput(WireModel):
    path: str
    entries: Annotated[
        list[Entry],
        listed(
            '{name, type: "file"|"directory"|"symlink"|"other", size?}, sorted by name; size '
            "(bytes of a file, null for the rest) only from list_directory_with_sizes."
        ),
    ]
    truncated: bool


class ListWithSizesOutput(ListOutput):
    total_files: int
    total_directories: int
    total_size: int


class TreeOutput(WireModel):
    path: str
    tree: Annotated[
        list[dict[str, Any]],
        listed(
            "{name, type, children?, depthLimited?}; children (the same shape) only for "
            "directories."
        ),
    ]
    entries: int


class SearchOutput(WireModel):
    path: str
    pattern: str
    matches: Annotated[list[str], listed("a path (string) relative to its root.")]
    truncated: bool


class FileInfoOutput(WireModel):
    path: str
    type: EntryTypeName
    size: int
    permissions: str
    modified: str
    accessed: str
    changed: str
    created: str | None = None
    symlink_target: str | None = None


class AllowedDirectoriesOutput(WireModel):
    directories: list[str]


class MoveOutput(WireModel):
    source: str
    destination: str
    replaced: bool


class CopyOutput(WireModel):
    source: str
    destination: str
    size: int
    sha256: str
    replaced: bool


class DeleteOutput(WireModel):
    path: str
    type: EntryTypeName


class DbEntry(WireModel):
    name: str
    path: str
    configured: bool = Field(description="Named by the operator (--db) rather than found.")


class DbListOutput(WireModel):
    databases: list[DbEntry]


class DbColumn(WireModel):
    name: str
    type: str
    not_null: bool
    default: str | None = None
    primary_key: int = Field(description="Position in the primary key, 0 if not part of it.")


class DbObject(WireModel):
    name: str
    type: str
    sql: str | None = None
    columns: list[DbColumn] | None = None


class DbSchemaOutput(WireModel):
    database: str
    objects: list[DbObject]


class DbQueryOutput(WireModel):
    columns: list[str]
    rows: Annotated[
        list[list[Any]],
        listed(
            'an array of the row\'s values as JSON, in column order; blobs as {"$blob": base64}.'
        ),
    ]
    truncated: bool
    row_count: int


class DbExecuteOutput(WireModel):
    rowcount: int
    lastrowid: int | None = None
    committed: bool


# A TypedDict, not a model: a 10,000-statement batch validates in a third of the time (no
# object per statement), and the tool reads each statement once. Its docstring is the schema's.
class DbStatement(TypedDict):
    """One SQL statement and the values bound to its placeholders."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    sql: str
    params: NotRequired[list[Any] | dict[str, Any] | None]


class DbStatementResult(WireModel):
    index: int
    rowcount: int
    lastrowid: int | None = None


class DbTransactionOutput(WireModel):
    statements: int
    rows_changed: int
    lastrowid: int | None = Field(default=None, description="After the last statement.")
    results: list[DbStatementResult] = Field(
        description=f"Per-statement results, the first {MAX_LISTED_RESULTS} (see resultsTruncated)."
    )
    results_truncated: bool
    committed: bool


class WriteChange(WireModel):
    op: Literal["write"]
    path: str
    content: str
    expected_sha256: str | None = None


class EditChange(WireModel):
    op: Literal["edit"]
    path: str
    edits: list[EditOperation] = Field(min_length=1)
    expected_sha256: str | None = None


class MoveChange(WireModel):
    op: Literal["move"]
    source: str
    destination: str
    overwrite: bool = False
    expected_sha256: str | None = Field(default=None, description="Of the source.")


class CopyChange(WireModel):
    op: Literal["copy"]
    source: str
    destination: str
    overwrite: bool = False
    expected_sha256: str | None = Field(default=None, description="Of the source.")


class DeleteChange(WireModel):
    op: Literal["delete"]
    path: str
    expected_sha256: str | None = None


class MkdirChange(WireModel):
    op: Literal["mkdir"]
    path: str


class SqlChange(WireModel):
    """Statements on one database, committed together with the set's files."""

    op: Literal["sql"]
    database: DatabaseParam
    statements: list[DbStatement] = Field(min_length=1, max_length=MAX_STATEMENTS)


AnyChange = Annotated[
    WriteChange | EditChange | MoveChange | CopyChange | DeleteChange | MkdirChange | SqlChange,
    Field(discriminator="op"),
]


class ChangeOutput(WireModel):
    """One change of a set; database, statements and the fields after them: a sql step's."""

    op: str
    path: str = Field(description="The file changed; for a sql step, the database's name.")
    source: str | None = None
    sha256: str | None = None
    diff: str | None = None
    created: bool
    database: str | None = None
    statements: int | None = Field(default=None, description="How many statements ran.")
    rows_changed: int | None = None
    lastrowid: int | None = Field(default=None, description="After the step's last statement.")
    results: list[DbStatementResult] | None = Field(
        default=None,
        description=f"Per-statement results, the first {MAX_LISTED_RESULTS} (see "
        "resultsTruncated); `index` counts from 1 within the step.",
    )
    results_truncated: bool | None = None


class ApplyChangesOutput(WireModel):
    applied: bool = Field(description="False for a dry run: checked, nothing written.")
    changes: list[ChangeOutput]
    txid: str | None = None
    change_id: str | None = Field(
        default=None,
        description=(
            "This change set's id in the history: undo_change with this id takes the whole "
            "set back (null for a dry run, or when the server keeps no history). A set with a "
            "sql step: its statements cannot be undone, so undo_change takes back only the "
            "files you name in its `paths`."
        ),
    )


PathKind = Literal["absent", "file", "directory", "symlink", "other"]


class PathChangeOutput(WireModel):
    path: str = Field(description="Relative to its root.")
    before: PathKind
    after: PathKind
    before_sha256: str | None = None
    before_size: int | None = None
    after_sha256: str | None = None
    after_size: int | None = None
    moved_from: str | None = Field(default=None, description="A move's source.")
    added: int | None = Field(default=None, description="Lines added (text files).")
    removed: int | None = Field(default=None, description="Lines removed (text files).")
    pruned: bool = Field(
        description="The previous content was dropped by history retention: this path can "
        "no longer be undone."
    )


class ChangeEntryOutput(WireModel):
    id: str = Field(description="Pass it to undo_change as `id`.")
    time: str = Field(description="When, ISO 8601 UTC (usable as list_changes' `since`).")
    op: str = Field(
        description="write, edit, move, copy, delete, mkdir, apply_changes, undo, db_execute "
        "or db_transaction."
    )
    undoable: bool = Field(
        description="False: pruned content, a database call, or a change set with a sql "
        "step (undo_change with `paths` takes back its files only)."
    )
    paths: list[PathChangeOutput]
    undoes: list[str] = Field(description="For an undo: the ids of the changes it took back.")
    database: str | None = Field(
        default=None,
        description="For a database call, or an apply_changes set with a sql step: the "
        "database (its statements are recorded for audit, not undoable).",
    )
    statements: list[str] | None = Field(
        default=None, description="The SQL that ran (the first ones, shortened)."
    )
    rows_changed: int | None = None


class ListChangesOutput(WireModel):
    changes: list[ChangeEntryOutput] = Field(description="Newest first.")
    truncated: bool = Field(description="More changes match: raise limit, or narrow it.")


RestoreActionName = Literal[
    "restored", "deleted", "created_directory", "removed_directory", "moved_back"
]


class RestoredPathOutput(WireModel):
    path: str
    action: RestoreActionName
    sha256: str | None = Field(default=None, description="The content restored.")
    source: str | None = Field(default=None, description="Where it came back from.")
    diff: str | None = Field(
        default=None, description="Unified diff from the current file to the restored one."
    )


class UndoChangeOutput(WireModel):
    applied: bool = Field(description="False for a dry run: nothing was changed.")
    undone: list[str] = Field(description="The ids of the changes taken back, newest first.")
    change_id: str | None = Field(
        default=None,
        description="This undo's own id in the history: undo_change with it redoes the change.",
    )
    paths: list[RestoredPathOutput]
