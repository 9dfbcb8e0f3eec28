"""Child process for the idempotency tests: one keyed call, then it prints the result and exits.

Run as a real process (``sys.executable tests/idempotency_child.py SPEC``) so that a crash point
(``ATOMICTOOLS_TEST_CRASH_AT=name[:n]`` makes it ``os._exit(137)``) really ends it in the middle
of the call, with its locks dropped by the kernel. ``SPEC`` is JSON:

* ``{"kind": "file", "roots": [...], "state_dir": ..., "key": ..., "changes": [...]}``: one
  keyed ``Workspace.apply_changes``; each change is ``{"op", "path", "content"?, "edits"?:
  [[old, new], ...], "source"?, "overwrite"?}``. Prints ``ChangeSetResult.to_json()``.
* ``{"kind": "db", "path": ..., "key": ..., "statements": [[sql, params], ...]}``: one keyed
  ``Database.run_statements``; prints ``[[rowcount, lastrowid], ...]``.

The parent builds the same call with ``changes_from_spec`` / ``statements_from_spec``, so both
sides fingerprint exactly the same arguments.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from atomictools import Change
    from atomictools.engine.db.database import Statement


def changes_from_spec(specs: list[dict[str, Any]]) -> list[Change]:
    from atomictools import Change
    from atomictools.engine.text.edits import Edit

    return [
        Change(
            spec["op"],
            spec["path"],
            content=spec["content"].encode() if "content" in spec else None,
            edits=tuple(Edit(old, new) for old, new in spec.get("edits", ())),
            source=spec.get("source"),
            overwrite=spec.get("overwrite", False),
        )
        for spec in specs
    ]


def statements_from_spec(specs: list[list[Any]]) -> list[Statement]:
    from atomictools.engine.db.database import Statement

    return [Statement(sql, params) for sql, params in specs]


async def _run(spec: dict[str, Any]) -> str:
    if spec["kind"] == "file":
        from atomictools import Workspace

        ws = Workspace(spec["roots"], state_dir=spec["state_dir"])
        result = await ws.apply_changes(
            changes_from_spec(spec["changes"]), idempotency_key=spec["key"]
        )
        return result.to_json()
    from atomictools.engine.db.database import Database

    async with Database(spec["path"]) as db:
        done = await db.run_statements(
            statements_from_spec(spec["statements"]), idempotency_key=spec["key"]
        )
    return json.dumps([[r.rowcount, r.lastrowid] for r in done])


def main() -> None:
    import anyio

    spec = json.loads(sys.argv[1])
    print(anyio.run(_run, spec), flush=True)


if __name__ == "__main__":
    main()
