"""Power-cut campaigns: changes through atomictools on the power-loss file system, the power cut at
a random moment or at a named step, then recovery on what the disk kept, then the checks.

A round has two phases. Each plans a seeded sequence of operations (writes, edits, keyed edits,
change sets with and without a new directory, directories, moves, copies, deletes, SQLite
transactions) and the state of the tree after each one. A worker process applies them one at a
time (each awaited: at most one is in flight) and reports every acknowledged one; the round kills
it and cuts the power at the chosen moment, mounts the disk again, and runs ``atomictools
recover`` in a new process, as a restarted machine would. The second phase starts from what the
first left and cuts again, so that what recovery itself did must have been made durable too.
After each phase:

- with ``durability="full"``: the tree is exactly the state after the last acknowledged operation
  or after the one in flight (an acknowledged change is there in full, nothing torn, no change
  set mixed), and so is the database; SQLite passes ``integrity_check``; retrying the last
  acknowledged keyed edit with its key changes nothing (its key survived);
- with ``durability="fast"``: no fsync at all, so after a power loss acknowledged changes may be
  lost and a file whose rename reached the disk (another program's directory fsync persists it)
  comes back empty; checked: every file that is not empty holds a version once written to it,
  SQLite passes ``integrity_check``, and the empty files are counted;
- always: recovery needs no person, and nothing of ours is left in the roots or the journal.

Workers are the embedding API in a child process, or the real MCP server over stdio driven by
the SDK client (``via="server"``). ``env`` reaches every process of the round (the mutation check
points ``PYTHONPATH`` at a copy of the package with one sync call removed).
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

# After PYTHONPATH, so that a mutated copy of the package (the mutation check) comes first.
sys.path.append(str(Path(__file__).parents[1]))

from tests.powerloss import PowerLossMount

FILES = [f"f{i}.txt" for i in range(4)]
DB = "app.db"
DIR = b"<dir>"
BIG = 96 * 1024  # past the engine's inline threshold: the worker-thread path too
KINDS = [
    "write",
    "write",
    "edit",
    "kedit",
    "apply",
    "apply-mkdir",
    "mkdir",
    "sql",
    "new",
    "move",
    "copy",
    "delete",
]
Tree = dict[str, bytes]


@dataclass(frozen=True)
class Op:
    kind: str
    args: tuple[Any, ...]
    key: str | None = None


@dataclass
class State:
    files: Tree
    rows: frozenset[int]

    def to_json(self) -> str:
        files = {path: content.decode("latin-1") for path, content in self.files.items()}
        return json.dumps({"files": files, "rows": sorted(self.rows)})

    @classmethod
    def from_json(cls, text: str) -> State:
        data = json.loads(text)
        files = {path: content.encode("latin-1") for path, content in data["files"].items()}
        return cls(files, frozenset(data["rows"]))


ELSEWHERE = "xdev"
"""A directory the power-loss file system treats as another device (moves in or out: EXDEV)."""


def initial() -> State:
    files = {name: f"{name} v0\n".encode() for name in FILES}
    return State({**files, ELSEWHERE: DIR}, frozenset())


def _content(path: str, tag: str, rng: random.Random) -> bytes:
    body = f"{path} {tag}\n".encode()
    return body + (b"x" * BIG + b"\n" if rng.random() < 0.2 else b"")


def plan(
    seed: int, count: int, start: State, *, first: str = "any"
) -> tuple[list[Op], list[State]]:
    """The operations of a phase and the state after each (``states[0]``: ``start``).

    ``first="mkdir"``: a directory, then a plain write in its parent (a cut inside that write
    finds the directory only if its creation synced the parent); ``first="mkdir-set"``: the
    first operation is a change set that makes two levels of
    directories (``mkdir -p``) and writes only inside them (the upper level's parent is synced
    by nobody else); ``first="elsewhere"``: the
    first operation is a change set that touches only another
    directory, so its journal write is the first sync after the recovery; ``first="writes"``:
    the first two are plain writes, which never touch the journal (the checks of recovery's
    own durability: of the files it finished, and of the record it removed).
    """
    rng = random.Random(seed)
    state = start
    ops: list[Op] = []
    states = [state]
    for n in range(1, count + 1):
        tag = f"s{seed}n{n}"
        files = dict(state.files)
        rows = set(state.rows)
        movable = sorted(
            p for p in files if p.rsplit("/", 1)[-1].startswith("n") and files[p] != DIR
        )
        places = ["", "", *sorted(p + "/" for p in files if files[p] == DIR)]
        kind = rng.choice(KINDS)
        if kind in ("move", "delete") and not movable:
            kind = "new"
        if kind in ("edit", "kedit") and not all(files[p].strip() for p in FILES):
            kind = "write"  # fast mode: a power cut may have emptied the file to edit
        if first == "mkdir-set" and n == 1:  # all inside two directory levels it makes
            directory = f"d{tag}/sub"
            files[f"d{tag}"] = files[directory] = DIR
            files[f"{directory}/x.txt"] = _content("x", tag, rng)
            op = Op("apply-mkdir", (directory, files[f"{directory}/x.txt"], None, None))
        elif first == "mkdir" and n <= 2:  # a directory, then a write beside it
            if n == 1:
                files[f"m{tag}"] = DIR
                op = Op("mkdir", (f"m{tag}",))
            else:
                path = rng.choice(FILES)
                files[path] = _content(path, tag, rng)
                op = Op("write", (path, files[path]))
        elif first == "elsewhere" and n == 1:
            path = f"{ELSEWHERE}/e{tag}.txt"
            files[path] = _content(path, tag, rng)
            op = Op("apply", ((path, files[path]),))
        elif kind == "write" or (first == "writes" and n <= 2):
            path = rng.choice(FILES)
            files[path] = _content(path, tag, rng)
            op = Op("write", (path, files[path]))
        elif kind in ("edit", "kedit"):
            path = rng.choice(FILES)
            old = files[path].split(b"\n", 1)[0].decode()
            new = f"{path} e{tag}"
            files[path] = files[path].replace(old.encode(), new.encode(), 1)
            op = Op("edit", (path, old, new), key=f"key-{tag}" if kind == "kedit" else None)
        elif kind == "apply":
            writes = []
            for path in rng.sample(FILES, k=rng.randint(2, 3)):
                files[path] = _content(path, tag, rng)
                writes.append((path, files[path]))
            op = Op("apply", tuple(writes))
        elif kind == "apply-mkdir":  # a new directory, and a file in it; maybe one outside
            directory = f"d{tag}"
            files[directory] = DIR
            files[f"{directory}/x.txt"] = _content("x", tag, rng)
            outside = rng.choice(FILES) if rng.random() < 0.5 else None
            if outside is not None:
                files[outside] = _content(outside, tag, rng)
            op = Op(
                "apply-mkdir",
                (directory, files[f"{directory}/x.txt"], outside, files.get(outside or "")),
            )
        elif kind == "mkdir":
            files[f"m{tag}"] = DIR
            op = Op("mkdir", (f"m{tag}",))
        elif kind == "sql":
            rows.add(seed * 1000 + n)
            op = Op("sql", (seed * 1000 + n,))
        elif kind == "new":
            path = f"{rng.choice(places)}n{tag}.txt"
            files[path] = _content(path, tag, rng)
            op = Op("write", (path, files[path]))
        elif kind == "move":  # within a directory, to another, or to another file system
            source = rng.choice(movable)
            elsewhere = source.startswith(ELSEWHERE + "/")
            place = "" if elsewhere else f"{ELSEWHERE}/" if rng.random() < 0.5 else None
            target = f"{rng.choice(places) if place is None else place}n{tag}.txt"
            # Across file systems it is a copy and a delete, journaled together: after a cut and
            # recovery there is one of the two files, never both (no state in between).
            files[target] = files.pop(source)
            op = Op("move", (source, target))
        elif kind == "copy":
            source, target = rng.choice(FILES), f"{rng.choice(places)}n{tag}.txt"
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
        if content == DIR:
            (root / name).mkdir()
        else:
            (root / name).write_bytes(content)
    conn = sqlite3.connect(root / DB)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (v INTEGER PRIMARY KEY)")
    conn.commit()
    conn.close()


# -- the workers --------------------------------------------------------------------------------


async def apply_engine(ws: Any, db: Any, op: Op) -> None:
    from atomictools import Change
    from atomictools.engine.db.database import Statement

    a = op.args
    if op.kind == "write":
        await ws.write(a[0], a[1])
    elif op.kind == "edit":
        await ws.edit(a[0], [(a[1], a[2])], idempotency_key=op.key)
    elif op.kind == "apply":
        await ws.apply_changes([Change("write", p, content=c) for p, c in a])
    elif op.kind == "apply-mkdir":
        changes = [Change("mkdir", a[0]), Change("write", f"{a[0]}/x.txt", content=a[1])]
        if a[2] is not None:
            changes.append(Change("write", a[2], content=a[3]))
        await ws.apply_changes(changes)
    elif op.kind == "mkdir":
        await ws.mkdir(a[0])
    elif op.kind == "sql":
        await db.run_statements([Statement("INSERT INTO t VALUES (?)", [a[0]])])
    elif op.kind == "move":
        await ws.move(a[0], a[1])
    elif op.kind == "copy":
        await ws.copy(a[0], a[1])
    else:
        await ws.delete(a[0])


def tool_call(op: Op) -> tuple[str, dict[str, Any]]:
    a = op.args
    if op.kind == "write":
        return "write_file", {"path": a[0], "content": a[1].decode()}
    if op.kind == "edit":
        call: dict[str, Any] = {"path": a[0], "edits": [{"oldText": a[1], "newText": a[2]}]}
        return "edit_file", {**call, **({"idempotencyKey": op.key} if op.key else {})}
    if op.kind == "apply":
        return "apply_changes", {
            "changes": [{"op": "write", "path": p, "content": c.decode()} for p, c in a]
        }
    if op.kind == "apply-mkdir":
        changes = [
            {"op": "mkdir", "path": a[0]},
            {"op": "write", "path": f"{a[0]}/x.txt", "content": a[1].decode()},
        ]
        if a[2] is not None:
            changes.append({"op": "write", "path": a[2], "content": a[3].decode()})
        return "apply_changes", {"changes": changes}
    if op.kind == "mkdir":
        return "create_directory", {"path": a[0]}
    if op.kind == "sql":
        statements = [{"sql": "INSERT INTO t VALUES (?)", "params": [a[0]]}]
        return "db_transaction", {"database": DB, "statements": statements}
    if op.kind in ("move", "copy"):
        return f"{op.kind}_file", {"source": a[0], "destination": a[1]}
    return "delete_file", {"path": a[0]}


def worker(
    via: str, mnt: str, seed: int, count: int, durability: str, start: str, first: str
) -> None:
    """Apply the phase's operations one at a time, each when stdin says ``go``."""
    import anyio

    begin = State.from_json(Path(start).read_text())
    ops, _ = plan(seed, count, begin, first=first)
    root, state = Path(mnt) / "root", Path(mnt) / "state"

    async def engine() -> None:
        from atomictools import Workspace
        from atomictools.engine.db.database import Database

        ws = Workspace([root], state_dir=state, durability=durability)
        async with Database(root / DB, durability=durability) as db:
            for index, op in enumerate(ops, start=1):
                sys.stdin.readline()
                await apply_engine(ws, db, op)
                print(f"ack {index}", flush=True)

    async def server() -> None:
        from mcp import Client, StdioServerParameters

        serve = [
            "-m",
            "atomictools",
            "serve",
            "--root",
            str(root),
            "--state-dir",
            str(state),
            "--durability",
            durability,
        ]
        params = StdioServerParameters(
            command=sys.executable, args=serve, env=dict(os.environ), cwd=Path(mnt).parent
        )
        async with Client(params) as client:
            for index, op in enumerate(ops, start=1):
                sys.stdin.readline()
                tool, arguments = tool_call(op)
                result = await client.call_tool(tool, arguments)
                if result.is_error:
                    raise SystemExit(f"operation {index} ({tool}) failed: {result.content}")
                print(f"ack {index}", flush=True)

    anyio.run(engine if via == "engine" else server)


# -- a round ----------------------------------------------------------------------------------


@dataclass
class RoundResult:
    seed: int
    cuts: list[str] = field(default_factory=list)
    acked: int = 0
    """Acknowledged operations, over both phases."""
    checked: int = 0
    """Acknowledged changes whose presence was checked (full durability)."""
    emptied: int = 0
    """Files that came back empty (fast durability: a rename persisted, its data never was)."""
    violations: list[str] = field(default_factory=list)


def _tree(top: Path, here: Path | None = None) -> Tree:
    """Every directory and file below ``top`` but the database and our own files."""
    from atomictools.engine.durable.tempfiles import is_temp_name

    here = here or top
    found: Tree = {}
    for path in sorted(here.iterdir()):
        if path.name.startswith(DB) or is_temp_name(path.name):
            continue
        key = str(path.relative_to(top))
        if path.is_dir() and not path.is_symlink():
            found[key] = DIR
            found.update(_tree(top, path))
        else:
            found[key] = path.read_bytes()
    return found


def _ours(top: Path) -> list[str]:
    from atomictools.engine.durable.tempfiles import is_temp_name

    return [str(p.relative_to(top)) for p in top.rglob("*") if is_temp_name(p.name)]


def _rows(root: Path) -> tuple[frozenset[int], str]:
    conn = sqlite3.connect(root / DB)
    try:
        check = conn.execute("PRAGMA integrity_check").fetchone()[0]
        rows = frozenset(r[0] for r in conn.execute("SELECT v FROM t"))
    finally:
        conn.close()
    return rows, check


def _run_phase(
    fs: PowerLossMount,
    seed: int,
    count: int,
    start: State,
    *,
    step: str | None,
    durability: str,
    via: str,
    env: dict[str, str],
    result: RoundResult,
    first: str = "any",
) -> tuple[list[Op], list[State], int]:
    """Work until the cut; returns the plan, its states and how many were acknowledged."""
    rng = random.Random(seed * 7919 + 1)
    ops, states = plan(seed, count, start, first=first)
    start_file = fs.disk.parent / f"start-{seed}.json"
    start_file.write_text(start.to_json())
    phase_env = dict(env)
    if step is not None:
        phase_env["ATOMICTOOLS_TEST_CRASH_AT"] = step
        phase_env["ATOMICTOOLS_TEST_CRASH_SIGNAL"] = "KILL"
    proc = subprocess.Popen(
        [
            sys.executable,
            __file__,
            via,
            str(fs.mnt),
            str(seed),
            str(count),
            durability,
            str(start_file),
            first,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=phase_env,
        cwd=fs.disk.parent,  # not the repository: ``-m atomictools`` would import it first
        start_new_session=True,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    acked = 0
    target = rng.randint(0, count - 1) if step is None else count
    delay = rng.random() * 0.05
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
    # The SDK starts the server in a session of its own: it goes by what it serves.
    subprocess.run(["pkill", "-KILL", "-f", f"serve --root {fs.mnt}/root"], check=False)
    proc.wait()
    stderr = proc.stderr.read() if proc.stderr else ""
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    # At a named step the process that reaches it dies (the server, under a server worker,
    # which then sees its connection close); at a random cut nothing may fail before it.
    if step is None and "Traceback" in stderr and "SystemExit" not in stderr:
        result.violations.append(f"the worker failed before the cut: {stderr[-3000:]}")
    fs.cut()
    result.cuts.append(step or f"random after {target} + {delay * 1000:.0f} ms")
    result.acked += acked
    return ops, states, acked


def _child(
    fs: PowerLossMount, env: dict[str, str], args: list[str]
) -> subprocess.CompletedProcess[str]:
    """A Python process of the round (not in the repository: ``-m atomictools`` would import
    it before a mutated copy on ``PYTHONPATH``)."""
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=fs.disk.parent,
        timeout=120,
        check=False,
    )


def _recover(fs: PowerLossMount, env: dict[str, str], result: RoundResult) -> None:
    """Power back on: mount the disk again and run ``atomictools recover`` in a new process."""
    fs.mount()
    done = _child(
        fs,
        env,
        [
            "-m",
            "atomictools",
            "recover",
            str(fs.mnt / "root"),
            "--state-dir",
            str(fs.mnt / "state"),
            "--json",
        ],
    )
    if done.returncode not in (0, 1):
        result.violations.append(
            f"recover exited {done.returncode}: {done.stdout[-1500:]}{done.stderr[-800:]}"
        )


def _check(
    fs: PowerLossMount,
    ops: list[Op],
    states: list[State],
    acked: int,
    durability: str,
    env: dict[str, str],
    result: RoundResult,
) -> State:
    """The checks after a recovery; returns the state found (where the next phase starts)."""
    root = fs.mnt / "root"
    tree = _tree(root)
    rows, check = _rows(root)
    if check != "ok":
        result.violations.append(f"SQLite integrity_check: {check}")
    # The last acknowledged state, or the one in flight.
    candidates = states[acked : acked + 2]
    found = next((s for s in candidates if s.files == tree and s.rows == rows), None)
    if durability == "full":
        if found is None:
            result.violations.append(_diff(tree, rows, candidates))
        else:
            result.checked += acked
            _retry_last_key(fs, ops[:acked], tree, env, result)
    else:
        written: dict[str, set[bytes]] = {}
        for state in states:
            for path, content in state.files.items():
                written.setdefault(path, set()).add(content)
        for path, content in tree.items():
            if content == b"" and b"" not in written.get(path, set()):
                result.emptied += 1  # renamed into place, never synced: fast mode's power risk
            elif content not in written.get(path, set()):
                result.violations.append(f"{path}: holds no version written to it")
    journals = fs.mnt / "state" / "journals"
    left = _ours(root) + ([p.name for p in journals.iterdir()] if journals.is_dir() else [])
    if left:
        result.violations.append(f"left after recovery: {left}")
    return found or State(tree, rows)


def _retry_last_key(
    fs: PowerLossMount, done: list[Op], tree: Tree, env: dict[str, str], result: RoundResult
) -> None:
    """The last acknowledged keyed edit, retried with its key (in a new process, as a client
    after a restart would), must change nothing: its key survived the power cut."""
    keyed = [op for op in done if op.key]
    if not keyed:
        return
    op = keyed[-1]
    retry = _child(
        fs, env, [__file__, "retry", str(fs.mnt), op.args[0], op.args[1], op.args[2], str(op.key)]
    )
    if retry.returncode != 0:
        result.violations.append(
            f"retrying acknowledged key {op.key} failed: {retry.stderr[-500:]}"
        )
    if _tree(fs.mnt / "root") != tree:
        result.violations.append(f"retrying acknowledged key {op.key} changed the tree")


def retry(mnt: str, path: str, old: str, new: str, key: str) -> None:
    import anyio

    from atomictools import Workspace

    ws = Workspace([Path(mnt) / "root"], state_dir=Path(mnt) / "state")
    anyio.run(lambda: ws.edit(path, [(old, new)], idempotency_key=key))


def _diff(tree: Tree, rows: frozenset[int], candidates: list[State]) -> str:
    """How the tree differs from each candidate state (a mixed set matches neither whole)."""
    lines = ["the tree is neither the last acknowledged state nor the next:"]
    for label, state in zip(("acknowledged", "in flight"), candidates, strict=False):
        for path in sorted(set(tree) | set(state.files)):
            now, wanted = tree.get(path), state.files.get(path)
            if now != wanted:
                shown = (now or b"<absent>")[:30], (wanted or b"<absent>")[:30]
                lines.append(f"  vs {label}: {path}: {shown[0]!r}, expected {shown[1]!r}")
        if rows != state.rows:
            lines.append(f"  vs {label}: rows {sorted(rows)}, expected {sorted(state.rows)}")
    return "\n".join(lines)


def run_round(
    base: Path,
    seed: int,
    *,
    count: int = 10,
    step: str | None = None,
    second_step: str | None = None,
    first: str = "any",
    second_first: str = "any",
    durability: str = "full",
    via: str = "engine",
    env: dict[str, str] | None = None,
) -> RoundResult:
    """Two phases, each cut at its step (or at a random moment); ``second_first`` says how the
    second begins (see ``plan``)."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
    result = RoundResult(seed)
    fs = PowerLossMount(base)
    prepare_disk(fs.disk)
    fs.mount()
    try:
        start = initial()
        for phase, cut_at in enumerate((step, second_step)):
            phase_seed = seed * 2 + phase
            ops, states, acked = _run_phase(
                fs,
                phase_seed,
                count,
                start,
                step=cut_at,
                durability=durability,
                via=via,
                env=env,
                result=result,
                first=second_first if phase == 1 else first,
            )
            _recover(fs, env, result)
            start = _check(fs, ops, states, acked, durability, env, result)
            if result.violations:
                break
    finally:
        fs.unmount()
    return result


if __name__ == "__main__":
    if sys.argv[1] == "retry":
        retry(*sys.argv[2:7])
    else:
        via, mnt, seed, count, durability, start, first = sys.argv[1:8]
        worker(via, mnt, int(seed), int(count), durability, start, first)
