"""Child process for the fault-injection suite: one engine call, its outcome as JSON.

Run as ``python tests/fault_child.py KIND ARGS...`` (under ``strace -e inject=...`` by the tests,
or after dropping to an unprivileged user), so that the fault hits a real system call. It
prints ``MARK`` just before the call (the tests count system calls from there), then one JSON
line: ``{"ok": true, "result": ...}`` or ``{"ok": false, "type", "code", "message", "changed"}``.

Kinds:

* ``file OP ROOT`` with OP one of ``write``, ``delete``, ``move``, ``mkdir``, ``copy``,
  ``apply``, ``apply-keyed``: the call on the fixed tree the tests set up (see ``OPS``);
* ``db PATH KEY``: ``Database(PATH).execute("INSERT INTO t VALUES (1)", idempotency_key=KEY)``;
  then, after the call, the row count seen by a fresh connection;
* ``recover ROOT STATE [--forward|--rollback]``: ``atomictools recover`` in-process.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import anyio

from atomictools import AtomicToolsError, Change, Workspace
from atomictools.engine.db.database import Database

OPS = {
    "write": lambda ws: ws.write("a.txt", "new content\n"),
    "delete": lambda ws: ws.delete("a.txt"),
    "move": lambda ws: ws.move("a.txt", "moved.txt"),
    "move-keyed": lambda ws: ws.move("a.txt", "moved.txt", idempotency_key="fault-move"),
    "mkdir": lambda ws: ws.mkdir("newdir"),
    "copy": lambda ws: ws.copy("a.txt", "copied.txt"),
    "apply": lambda ws: ws.apply_changes(
        [Change("write", "a.txt", content=b"set a\n"), Change("write", "b.txt", content=b"b\n")]
    ),
    "apply-keyed": lambda ws: ws.apply_changes(
        [Change("write", "a.txt", content=b"set a\n"), Change("write", "b.txt", content=b"b\n")],
        idempotency_key="fault-key",
    ),
}


def outcome(call: Any) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        print("MARK", flush=True)
        try:
            result = await call()
        except AtomicToolsError as err:
            return {
                "ok": False,
                "type": type(err).__name__,
                "code": err.code,
                "message": str(err),
                "changed": err.changed,
            }
        return {"ok": True, "result": repr(result)}

    return anyio.run(run)


def main(argv: list[str]) -> None:
    kind = argv[0]
    if kind == "file":
        op, root = argv[1], argv[2]
        ws = Workspace([root])
        print(json.dumps(outcome(lambda: OPS[op](ws))))
    elif kind == "db":
        path, key = argv[1], argv[2]

        async def execute() -> Any:
            async with Database(path) as db:
                return await db.execute("INSERT INTO t VALUES (1)", idempotency_key=key)

        print(json.dumps(outcome(execute)))
    elif kind == "recover":
        from atomictools.cli.commands import main as cli

        root, state, *flags = argv[1:]
        sys.exit(cli(["recover", root, "--state-dir", state, "--json", *flags]))
    else:
        raise SystemExit(f"unknown kind {kind}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    main(sys.argv[1:])
