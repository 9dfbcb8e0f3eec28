"""The SQLite tools: list, schema, read-only query, one-statement execute, a transaction.

Parameters are always bound, never formatted into SQL. JSON has no bytes, so a blob travels as
``{"$blob": "<base64>"}`` both ways. Every change is one transaction: all of it or none.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.types import CallToolResult
from pydantic import Field

from atomictools.engine import (
    DatabaseCatalog,
    QueryResult,
    Statement,
    StatementResult,
    Workspace,
)
from atomictools.server.models import (
    BLOB_KEY,
    MAX_LISTED_RESULTS,
    MAX_STATEMENTS,
    DatabaseParam,
    DbColumn,
    DbEntry,
    DbExecuteOutput,
    DbListOutput,
    DbObject,
    DbQueryOutput,
    DbSchemaOutput,
    DbStatement,
    DbStatementResult,
    DbTransactionOutput,
    JsonParams,
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


def _plain(row: tuple[Any, ...]) -> bool:
    """Every value of the row is JSON as it is: the row goes into the reply without a copy."""
    return all(type(v) in _AS_JSON or (type(v) is float and math.isfinite(v)) for v in row)


_AS_JSON = frozenset({str, int, type(None)})


def encode_row(row: tuple[Any, ...]) -> list[Any]:
    return [encode_value(v) for v in row]


def encode_value(value: Any) -> Any:
    """A database value as JSON: blobs as {"$blob": base64}, infinities as strings; a
    PostgreSQL value JSON has no type for (numeric, timestamps, uuid, intervals, ...) as its
    text, so nothing is rounded; json and arrays as JSON."""
    if isinstance(value, bytes | bytearray | memoryview):
        return {BLOB_KEY: base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value).replace("inf", "Infinity").replace("nan", "NaN")
    if value is None or isinstance(value, str | int | float):
        return value
    if isinstance(value, list | tuple):
        return [encode_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): encode_value(v) for k, v in value.items()}
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    return str(value)  # Decimal, UUID, timedelta, IP addresses, ranges: their exact text


def _rows_text(result: QueryResult) -> str:
    lines = [" | ".join(result.columns)]
    lines += [" | ".join(json.dumps(encode_value(v)) for v in row) for row in result.rows[:50]]
    if len(result.rows) > 50:
        lines.append(f"... {len(result.rows) - 50} more rows in the structured result")
    if result.truncated:
        lines.append("(truncated at maxRows: more rows exist)")
    return "\n".join(lines)


def register_db_tools(
    server: MCPServer[Any], runtime: ToolRuntime, catalog: DatabaseCatalog
) -> None:
    """Add the five SQLite tools to ``server``; databases come from ``catalog``."""

    @server.tool(
        name="db_list",
        description="Databases you can use: configured ones (SQLite or PostgreSQL) and SQLite "
        "files in the roots.",
        annotations=READ_ONLY,
    )
    async def db_list(ctx: Context[Any, Any]) -> Annotated[CallToolResult, DbListOutput]:
        async def listing(ws: Workspace) -> list[DbEntry]:
            entries = await catalog.entries(ws)
            return [DbEntry(name=e.name, path=e.path, configured=e.configured) for e in entries]

        entries = await runtime.call(ctx, listing)
        text = "\n".join(f"{e.name} ({e.path})" for e in entries) or "No databases found"
        return tool_result(DbListOutput(databases=entries), text)

    @server.tool(
        name="db_schema",
        description=(
            "The schema of a database: its tables, views, indexes and triggers with their SQL, "
            "tables and views with their columns; with `table`, that table or view alone."
        ),
        annotations=READ_ONLY,
    )
    async def db_schema(
        ctx: Context[Any, Any],
        database: DatabaseParam,
        table: Annotated[str | None, Field(description="One table or view to describe.")] = None,
    ) -> Annotated[CallToolResult, DbSchemaOutput]:
        async def describe(ws: Workspace) -> list[DbObject]:
            db = await catalog.get(database, ws)
            return [
                DbObject(
                    name=t.name,
                    type=t.type,
                    sql=t.sql,
                    columns=[
                        DbColumn(
                            name=c.name,
                            type=c.type,
                            not_null=c.not_null,
                            default=c.default,
                            primary_key=c.primary_key,
                        )
                        for c in t.columns
                    ]
                    if t.type in ("table", "view")
                    else None,
                )
                for t in await db.schema(table)
            ]

        objects = await runtime.call(ctx, describe)
        text = "\n\n".join(o.sql or f"{o.type} {o.name}" for o in objects) or "(empty database)"
        return tool_result(DbSchemaOutput(database=database, objects=objects), text)

    @server.tool(
        name="db_query",
        description=(
            "Run one read-only SQL query (SELECT, WITH, read-only PRAGMA) on a read-only "
            "connection; nothing sent here can change the database. Returns columns and rows "
            "(at most maxRows; `truncated` says if more exist). Use ? or :name placeholders with "
            "`params`; never put values into the SQL text."
        ),
        annotations=READ_ONLY,
    )
    async def db_query(
        ctx: Context[Any, Any],
        database: DatabaseParam,
        sql: Annotated[str, Field(description="One SQL query.")],
        params: JsonParams = None,
        maxRows: Annotated[int, Field(ge=1, le=100_000, description="Row limit.")] = 1000,
    ) -> Annotated[CallToolResult, DbQueryOutput]:
        async def run(ws: Workspace) -> QueryResult:
            db = await catalog.get(database, ws)
            return await db.query(sql, decode_params(params), max_rows=maxRows)

        result = await runtime.call(ctx, run)
        structured = {
            "columns": list(result.columns),
            "rows": [row if _plain(row) else encode_row(row) for row in result.rows],
            "truncated": result.truncated,
            "rowCount": len(result.rows),
        }
        return structured_result(structured, _rows_text(result))

    @server.tool(
        name="db_execute",
        description=(
            "Run one SQL statement that changes the database (INSERT, UPDATE, DELETE, CREATE, "
            "...) in its own transaction: committed whole or not at all, also when cancelled. "
            "One statement only: for several, use db_transaction. BEGIN/COMMIT/ATTACH and "
            "durability pragmas are refused (the tool owns the transaction)."
        ),
        annotations=mutating(destructive=True, idempotent=False),
    )
    async def db_execute(
        ctx: Context[Any, Any],
        database: DatabaseParam,
        sql: Annotated[str, Field(description="One SQL statement.")],
        params: JsonParams = None,
        idempotencyKey: IdempotencyKey = None,
    ) -> Annotated[CallToolResult, DbExecuteOutput]:
        async def run(ws: Workspace) -> DbExecuteOutput:
            db = await catalog.get(database, ws)
            done = await db.execute(sql, decode_params(params), idempotency_key=idempotencyKey)
            return DbExecuteOutput(rowcount=done.rowcount, lastrowid=done.lastrowid, committed=True)

        out = await runtime.call(ctx, run)
        return tool_result(
            out,
            f"Committed: {out.rowcount} row(s) changed, lastrowid {out.lastrowid}"
            if out.rowcount >= 0
            else "Committed (this kind of statement changes no rows)",
        )

    @server.tool(
        name="db_transaction",
        description=(
            "Run several SQL statements as one transaction: all are committed or none is (an "
            "error, a cancel or a timeout rolls everything back; the error names the failing "
            "statement). Reports progress (statements done) as it goes."
        ),
        annotations=mutating(destructive=True, idempotent=False),
    )
    async def db_transaction(
        ctx: Context[Any, Any],
        database: DatabaseParam,
        statements: Annotated[list[DbStatement], Field(min_length=1, max_length=MAX_STATEMENTS)],
        idempotencyKey: IdempotencyKey = None,
    ) -> Annotated[CallToolResult, DbTransactionOutput]:
        progress = runtime.reporter(ctx)

        async def run(ws: Workspace) -> list[StatementResult]:
            db = await catalog.get(database, ws)
            batch = [Statement(s["sql"], decode_params(s.get("params"))) for s in statements]
            return await db.run_statements(batch, progress=progress, idempotency_key=idempotencyKey)

        done = await runtime.call(ctx, run)
        # A result per statement for a 10,000-statement batch would be a reply clients spend
        # longer validating than the database spent running it: totals, and the first few.
        out = DbTransactionOutput(
            statements=len(done),
            rows_changed=sum(max(r.rowcount, 0) for r in done),
            lastrowid=done[-1].lastrowid if done else None,
            results=[
                DbStatementResult(index=i, rowcount=r.rowcount, lastrowid=r.lastrowid)
                for i, r in enumerate(done[:MAX_LISTED_RESULTS], start=1)
            ],
            results_truncated=len(done) > MAX_LISTED_RESULTS,
            committed=True,
        )
        return tool_result(
            out, f"Committed {out.statements} statement(s), {out.rows_changed} row(s) changed"
        )
