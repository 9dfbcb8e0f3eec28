"""Power-cut campaigns: changes through atomictools on the power-loss file system, the power cut at
a random moment or at a named step, then recovery on what the disk kept, then the checks.

A round plans a seeded sequence of operations (writes, edits, change sets, moves, copies,
deletes, SQLite transactions) and the state of the tree after each one. A worker applies them one
at a time (each awaited: at most one is in flight) and reports every acknowledged one; the round
kills it and cuts the power at the chosen moment, mounts the disk again, recovers (the server's
own start-up recovery and sweep, as ``atomictools recover`` does), and checks:

- with ``durability="full"``: the tree is exactly the state after the last acknowledged operation
  or after the one in flight (an acknowledged change is there in full, nothing torn, no change
  set mixed), and so is the database; SQLite passes ``integrity_check``;
- with ``durability="fast"``: acknowledged changes may be lost, so only that every file holds
  one whole version written to it and the database is consistent;
- always: recovery needs no person, and nothing of ours is left in the roots or the journal.

The worker is the embedding API in a child process (``python tests/powerloss_campaign.py
worker ...``) or the real MCP server over stdio driven by the SDK client.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parents[1]))

from tests.powerloss import PowerLossMount  # noqa: E402

FILES = [f"f{i}.txt" for i in range(4)]
DB = "app.db"
BIG = 96 * 1024  # past the engine's inline threshold: the worker-thread path too
Tree = dict[str, bytes]


@dataclass(frozen=True)
class Op:
    kind: str
    args: tuple[Any, ...]


@dataclass
class State:
    files: Tree
    rows: frozenset[int]


def initial() -> State:
    return State({name: f"{name} v0\n".encode() for name in FILES}, frozenset())


def _content(path: str, version: int, rng: random.Random) -> bytes:
    body = f"{path} v{version}\n".encode()
    return body + (b"x" * BIG + b"\n" if rng.random() < 0.2 else b"")


def plan(seed: int, count: int) -> tuple[list[Op], list[State]]:
    """The operations of a round and the state after each (``states[0]``: before any)."""
    rng = random.Random(seed)
    state = initial()
    ops: list[Op] = []
    states = [state]
    extra = 0
    for n in range(1, count + 1):
        files = dict(state.files)
        rows = set(state.rows)
        movable = sorted(p for p in files if p.startswith("n"))
        choice = rng.choice(["write", "write", "edit", "apply", "sql", "new", "move", "copy", "delete"])
        if choice in ("move", "delete") and not movable:
            choice = "new"
        if choice == "write":
            path = rng.choice(FILES)
            files[path] = _content(path, n, rng)
            op = Op("write", (path, files[path]))
        elif choice == "edit":
            path = rng.choice(FILES)
            old = files[path].split(b"\n", 1)[0].decode()
            new = f"{path} e{n}"
            files[path] = files[path].replace(old.encode(), new.encode(), 1)
            op = Op("edit", (path, old, new))
        elif choice == "apply":
            chosen = rng.sample(FILES, k=rng.randint(2, 3))
            writes = []
            for path in chosen:
                files[path] = _content(path, n, rng)
                writes.append((path, files[path]))
            op = Op("apply", tuple(writes))
        elif choice == "sql":
            rows.add(n)
            op = Op("sql", (n,))
        elif choice == "new":
            extra += 1
            path = f"n{extra}.txt"
            files[path] = _content(path, n, rng)
            op = Op("write", (path, files[path]))
        elif choice == "move":
            extra += 1
            source, target = rng.choice(movable), f"n{extra}.txt"
            files[target] = files.pop(source)
            op = Op("move", (source, target))
        elif choice == "copy":
            extra += 1
            source, target = rng.choice(FILES), f"n{extra}.txt"
            files[target] = files[source]
            op = Op("copy", (source, target))
        else:
            path = rng.choice(movable)
            del files[path]
            op = Op("delete", (path,))
        state = State(files, frozenset(rows))
        ops.append(op)
        states.append(state)
    return ops, states


def prepare_disk(disk: Path) -> None:
    root = disk / "root"
    root.mkdir(parents=True)
    (disk / "state").mkdir()
    for name, content in initial().files.items():
        (root / name).write_bytes(content)
    conn = sqlite3.connect(root / DB)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (v INTEGER PRIMARY KEY)")
    conn.commit()
    conn.close()


# -- the worker: the embedding API in a child process ---------------------------------------


async def _apply_engine(ws: Any, db: Any, op: Op) -> None:
    from atomictools.database import Statement
    from atomictools.journal import Change

    if op.kind == "write":
        await ws.write(op.args[0], op.args[1])
    elif op.kind == "edit":
        await ws.edit(op.args[0], [(op.args[1], op.args[2])])
    elif op.kind == "apply":
        await ws.apply_changes([Change("write", p, content=c) for p, c in op.args])
    elif op.kind == "sql":
        await db.run_statements(
            [Statement("INSERT INTO t VALUES (?)", [op.args[0]]), Statement("SELECT 1")]
        )
    elif op.kind == "move":
        await ws.move(op.args[0], op.args[1])
    elif op.kind == "copy":
        await ws.copy(op.args[0], op.args[1])
    else:
        await ws.delete(op.args[0])


def worker(mnt: str, seed: int, count: int, durability: str) -> None:
    import anyio

    from atomictools import Workspace
    from atomictools.database import Database

    ops, _ = plan(seed, count)

    async def main() -> None:
        ws = Workspace([Path(mnt) / "root"], state_dir=Path(mnt) / "state", durability=durability)
        async with Database(Path(mnt) / "root" / DB, durability=durability) as db:
            for index, op in enumerate(ops, start=1):
                sys.stdin.readline()  # one operation at a time, when the round says so
                await _apply_engine(ws, db, op)
                print(f"ack {index}", flush=True)

    anyio.run(main)


# -- the worker: the real server ------------------------------------------------------------------


def _tool_call(op: Op) -> tuple[str, dict[str, Any]]:
    if op.kind == "write":
        return "write_file", {"path": op.args[0], "content": op.args[1].decode()}
    if op.kind == "edit":
        return "edit_file", {"path": op.args[0], "edits": [{"oldText": op.args[1], "newText": op.args[2]}]}
    if op.kind == "apply":
        changes = [{"op": "write", "path": p, "content": c.decode()} for p, c in op.args]
        return "apply_changes", {"changes": changes}
    if op.kind == "sql":
        statements = [{"sql": "INSERT INTO t VALUES (?)", "params": [op.args[0]]}]
        return "db_transaction", {"database": DB, "statements": statements}
    if op.kind in ("move", "copy"):
        return f"{op.kind}_file", {"source": op.args[0], "destination": op.args[1]}
    return "delete_file", {"path": op.args[0]}


def server_worker(mnt: str, seed: int, count: int, durability: str) -> None:
    """Drive ``atomictools serve`` over stdio with the SDK client; print each acknowledgement."""
    import anyio
    from mcp import Client, StdioServerParameters

    ops, _ = plan(seed, count)
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "atomictools", "serve", "--root", f"{mnt}/root", "--state-dir",
              f"{mnt}/state", "--durability", durability],
        env=dict(os.environ),
    )

    async def main() -> None:
        async with Client(params) as client:
            for index, op in enumerate(ops, start=1):
                sys.stdin.readline()  # one operation at a time, when the round says so
                tool, arguments = _tool_call(op)
                result = await client.call_tool(tool, arguments)
                if result.is_error:
                    raise SystemExit(f"op {index} {tool} failed: {result.content}")
                print(f"ack {index}", flush=True)

    anyio.run(main)


# -- a round ----------------------------------------------------------------------------------------


@dataclass
class RoundResult:
    seed: int
    cut: str
    acked: int
    violations: list[str] = field(default_factory=list)


def _ours(top: Path) -> list[str]:
    from atomictools.tempfiles import is_temp_name

    return [str(p.relative_to(top)) for p in top.rglob("*") if is_temp_name(p.name)]


def _tree(root: Path) -> Tree:
    from atomictools.tempfiles import is_temp_name

    found = {}
    for path in root.iterdir():
        if path.name.startswith(DB) or is_temp_name(path.name):
            continue
        found[path.name] = path.read_bytes()
    return found


def _rows(root: Path) -> tuple[frozenset[int], str]:
    conn = sqlite3.connect(root / DB)
    try:
        check = conn.execute("PRAGMA integrity_check").fetchone()[0]
        rows = frozenset(r[0] for r in conn.execute("SELECT v FROM t"))
    finally:
        conn.close()
    return rows, check


def run_round(
    base: Path,
    seed: int,
    *,
    count: int = 12,
    step: str | None = None,
    durability: str = "full",
    via: str = "engine",
) -> RoundResult:
    """One round: plan, work until the cut (at ``step`` or at a random moment), recover, check."""
    rng = random.Random(seed * 7919 + 1)
    fs = PowerLossMount(base)
    prepare_disk(fs.disk)
    fs.mount()
    ops, states = plan(seed, count)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    if step is not None:
        env["ATOMICTOOLS_TEST_CRASH_AT"] = step
        env["ATOMICTOOLS_TEST_CRASH_SIGNAL"] = "KILL"
    mode = "worker" if via == "engine" else "server-worker"
    proc = subprocess.Popen(
        [sys.executable, __file__, mode, str(fs.mnt), str(seed), str(count), durability],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    acked = 0
    target = rng.randint(0, count - 1) if step is None else count
    delay = rng.random() * 0.05
    assert proc.stdin is not None
    assert proc.stdout is not None
    while acked < count:
        try:
            proc.stdin.write("go\n")  # the next operation starts
            proc.stdin.flush()
        except BrokenPipeError:
            break
        if step is None and acked >= target:
            time.sleep(delay)  # cut somewhere inside the operation in flight
            break
        line = proc.stdout.readline()
        if not line.startswith("ack "):
            break  # the worker died (at the crash step)
        acked = int(line.split()[1])
    os.killpg(proc.pid, signal.SIGKILL)  # the whole machine stops at once
    proc.wait()
    stderr = proc.stderr.read() if proc.stderr else ""
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    fs.cut()
    fs.mount()  # the machine comes back up on what the disk kept
    result = RoundResult(seed, step or f"random after {target} + {delay * 1000:.0f} ms", acked)
    try:
        _recover_and_check(fs, states, acked, durability, result)
    finally:
        fs.unmount()
    if "Traceback" in stderr and "SystemExit" not in stderr:
        result.violations.append(f"the worker failed before the cut: {stderr[-800:]}")
    return result


def _recover_and_check(
    fs: PowerLossMount, states: list[State], acked: int, durability: str, result: RoundResult
) -> None:
    from atomictools import Workspace, recover

    root = fs.mnt / "root"
    ws = Workspace([root], state_dir=fs.mnt / "state")
    report = recover(ws.sandbox, ws.journal_dir)
    if report.exit_code == 2:
        result.violations.append(f"recovery needs a person: {report.problems}")
    tree = _tree(root)
    rows, check = _rows(root)
    if check != "ok":
        result.violations.append(f"SQLite integrity_check: {check}")
    candidates = states[acked : acked + 2]  # the last acknowledged, or the one in flight
    if durability == "full":
        if not any(tree == s.files for s in candidates):
            result.violations.append(_diff("files", tree, candidates))
        if not any(rows == s.rows for s in candidates):
            result.violations.append(f"rows {sorted(rows)} not in {[sorted(s.rows) for s in candidates]}")
    else:
        written = {}
        for state in states:
            for path, content in state.files.items():
                written.setdefault(path, set()).add(content)
        for path, content in tree.items():
            if content not in written.get(path, set()):
                result.violations.append(f"{path} holds a version never written ({len(content)} bytes)")
    left = _ours(root) + [str(p) for p in (fs.mnt / "state" / "journals").glob("*")] if (
        fs.mnt / "state" / "journals"
    ).exists() else _ours(root)
    if left:
        result.violations.append(f"left after recovery: {left}")


def _diff(what: str, tree: Tree, candidates: list[State]) -> str:
    lines = [f"{what} match neither the last acknowledged state nor the next:"]
    for path in sorted(set(tree) | {p for s in candidates for p in s.files}):
        now = tree.get(path)
        wanted = [s.files.get(path) for s in candidates]
        if now not in wanted:
            lines.append(f"  {path}: {(now or b'<absent>')[:40]!r} vs {[(w or b'<absent>')[:40] for w in wanted]}")
    return "\n".join(lines)


if __name__ == "__main__":
    kind, mnt, seed, count, durability = sys.argv[1:6]
    if kind == "worker":
        worker(mnt, int(seed), int(count), durability)
    else:
        server_worker(mnt, int(seed), int(count), durability)
