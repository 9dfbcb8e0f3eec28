"""The engine's words for parameters and operations, as MCP clients know them.

Engine messages speak Python (``expected_sha256``, ``Database.query``); a model calling our
tools must read the names it can send (``expectedSha256``, ``db_query``).
"""

from __future__ import annotations

from atomictools.engine import spelled

MCP_TERMS = {
    "expected_sha256": "expectedSha256",
    "create_only": "createOnly",
    "idempotency_key": "idempotencyKey",
    "dry_run": "dryRun",
    "change_id": "id",
    "max_rows": "maxRows",
    "Edit.old": "oldText",
    "Edit.new": "newText",
    "exclude globs": "excludePatterns",
    "Workspace.list_directory": "list_directory",
    "Workspace.search": "search_files",
    "Workspace.mkdir": "create_directory",
    "Database.transaction": "db_transaction",
    "Database.query": "db_query",
    "Database.execute": "db_execute",
    "DatabaseCatalog.entries": "db_list",
}


def for_client(message: str) -> str:
    """An engine message in the tools' own terms."""
    return spelled(message, MCP_TERMS)
