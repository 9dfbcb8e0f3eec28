"""Read-side tool calls: atomictools against the reference MCP filesystem server, side by side.

    python tests/benchmarks/bench_tree.py [--quick] [--json OUT] [--rounds N] [--big-gib G]
        [--cache DIR]

Both servers run in the same run as stdio subprocesses with the same three roots (every call is
a read): a real installed npm tree (``tests/interop/node_modules``, ``npm ci`` there if
missing), a copy of this Python's standard library (``site-packages`` and ``__pycache__``
left out; copied once into ``--cache``) and a directory holding a real, not sparse, text file of
``--big-gib`` GiB of distinct numbered 64-byte lines (made once, cached by size). The reference
is ``bench_vs_reference.py``'s pinned ``@modelcontextprotocol/server-filesystem``; atomictools is
``python -m atomictools serve --durability fast`` started with this process's environment from a
neutral cwd, so ``PYTHONPATH=/other/checkout`` benchmarks that checkout (the imported package is
printed).

The calls, with the same absolute paths and arguments for both: ``list_allowed_directories``
(the floor of a call), ``read_text_file`` head/tail 50 of a ~5 MB ``.d.ts`` and of the big file,
``offset``/``limit`` 50 lines from the middle of the big file (atomictools only; "n/a" when the
checkout under test refuses or ignores them), ``list_directory`` and
``list_directory_with_sizes`` of a 257- and a 1,188-entry directory, ``directory_tree`` of the
package closest to 300 entries and of the stdlib's ``asyncio``, ``get_file_info``,
``read_multiple_files`` of 10 small stdlib files and ``search_files **/package.json`` over the
npm tree. Every reply is checked (an error result fails the run; a read must carry the right
lines, a listing the right number of entries), so a broken server cannot look fast.

Two drivers per server: the Python SDK client (``mcp.Client(..., mode="legacy")``, the latency
of ``await client.call_tool``) and a raw JSON-RPC driver in this process (one ``tools/call``
line written, timed until the reply line with its id has been read: the server's cost without
the client's validation). Each call gets a few warm-up calls, then ``--rounds`` rounds (200;
the big-file reads and ``search_files`` get an eighth) in which all variants run once, the order
rotating every round, so noise hits all alike. Printed: p50/p90 latency, the ratio atomictools /
reference of the p50s (below 1: atomictools is faster), the server's CPU time per call (all
threads, /proc/PID/task/*/schedstat), and the servers' VmHWM before and after the big-file
reads. Exit status 0 unless something failed to run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from bench_vs_reference import (
    REFERENCE_JS,
    Conn,
    KiB,
    MiB,
    Spec,
    connect,
    cpu_seconds,
    ensure_reference,
    loadavg,
    text_of,
    vm_status,
)
from benchstats import percentile
from mcp import StdioServerParameters
from mcp.client.stdio import get_default_environment
from mcp.shared.exceptions import MCPDeprecationWarning
from mcp.types import TextContent

GiB = 1024 * MiB
HERE = Path(__file__).resolve().parent
INTEROP = HERE.parent / "interop"
NODE_MODULES = INTEROP / "node_modules"
NPM_TIMEOUT = 600
CALL_TIMEOUT = 300.0
PROTOCOL = "2025-11-25"

LINE_BYTES = 64
CHUNK = 8 * MiB
FILLER = "the quick brown fox jumps over the lazy dog 0"  # 45 characters
LINES = 50
BIG_DTS = "@octokit/openapi-types/types.d.ts"
SMALL_DIR, LARGE_DIR = "zod/v4/locales", "es-toolkit/compat"

REF, OURS = "reference", "atomictools"
SDK, RAW = "sdk", "raw"


# -- the data ----------------------------------------------------------------------------------


def ensure_node_modules() -> Path:
    if not NODE_MODULES.is_dir():
        if shutil.which("npm") is None:
            raise SystemExit(f"{NODE_MODULES} is missing and npm is not on PATH to install it")
        print(f"installing {NODE_MODULES} with npm ci ...", flush=True)
        done = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=INTEROP,
            timeout=NPM_TIMEOUT,
            stdout=sys.stderr,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"npm ci in {INTEROP} failed (exit {done.returncode})")
    return NODE_MODULES.resolve()


def stdlib_copy(cache: Path) -> Path:
    target = cache / "stdlib"
    if target.is_dir():
        return target
    source = Path(sysconfig.get_paths()["stdlib"])
    print(f"copying {source} to {target} (once, cached) ...", flush=True)
    partial = cache / f"stdlib.partial-{os.getpid()}"
    shutil.copytree(
        source,
        partial,
        symlinks=True,
        ignore=shutil.ignore_patterns("site-packages", "__pycache__"),
    )
    partial.rename(target)
    return target


def line_text(number: int) -> str:
    """Line ``number`` (1-based) of the big file, without its newline."""
    return f"line {number:012d} {FILLER}"


def big_file(cache: Path, gib: float) -> tuple[Path, int]:
    """The cached big file of ``gib`` GiB and its number of lines."""
    lines = int(gib * GiB) // LINE_BYTES
    directory = cache / "big"
    path = directory / f"big-{lines * LINE_BYTES}.txt"
    if path.exists() and path.stat().st_size == lines * LINE_BYTES:
        return path, lines
    directory.mkdir(parents=True, exist_ok=True)
    print(f"writing {lines * LINE_BYTES / GiB:g} GiB to {path} (once, cached) ...", flush=True)
    partial = directory / f"{path.name}.partial-{os.getpid()}"
    per_chunk = CHUNK // LINE_BYTES
    with open(partial, "w", encoding="ascii", newline="\n") as f:
        for first in range(1, lines + 1, per_chunk):
            last = min(lines, first + per_chunk - 1)
            f.write("".join(f"{line_text(n)}\n" for n in range(first, last + 1)))
    partial.rename(path)
    if os.stat(path).st_blocks * 512 < lines * LINE_BYTES:
        raise RuntimeError(f"{path} is sparse")
    return path, lines


def find_big_dts(node_modules: Path) -> Path:
    path = node_modules / BIG_DTS
    if path.is_file():
        return path
    best: tuple[int, Path] | None = None
    for directory, _, files in os.walk(node_modules):
        for name in files:
            if name.endswith((".d.ts", ".js")):
                candidate = Path(directory) / name
                size = candidate.lstat().st_size
                if 4_000_000 <= size <= 7_000_000 and (best is None or size > best[0]):
                    best = (size, candidate)
    if best is None:
        raise RuntimeError(f"no .d.ts or .js file of 4 to 7 MB under {node_modules}")
    return best[1]


def count_entries(directory: Path) -> int:
    """Entries below ``directory`` as directory_tree lists them (symlinks listed, not entered)."""
    return sum(len(dirs) + len(files) for _, dirs, files in os.walk(directory))


def package_near(node_modules: Path, wanted: int) -> tuple[Path, int]:
    packages = []
    for entry in sorted(node_modules.iterdir()):
        if entry.name.startswith(".") or entry.is_symlink() or not entry.is_dir():
            continue
        if entry.name.startswith("@"):
            packages += [p for p in sorted(entry.iterdir()) if p.is_dir() and not p.is_symlink()]
        else:
            packages.append(entry)
    counted = [(count_entries(p), p) for p in packages]
    count, path = min(counted, key=lambda c: (abs(c[0] - wanted), str(c[1])))
    return path, count


def small_files(stdlib: Path, count: int) -> list[Path]:
    chosen = []
    for path in sorted(stdlib.glob("*.py")):
        if KiB <= path.stat().st_size <= 10 * KiB and path.read_bytes().isascii():
            chosen.append(path)
            if len(chosen) == count:
                return chosen
    raise RuntimeError(f"fewer than {count} small ASCII .py files in {stdlib}")


def head_tail(path: Path) -> tuple[list[str], list[str]]:
    with open(path, "rb") as f:
        head = [f.readline().decode().rstrip("\r\n") for _ in range(LINES)]
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 64 * KiB))
        tail = f.read().decode().splitlines()[-LINES:]
    return head, tail


# -- the calls ---------------------------------------------------------------------------------

Check = Callable[[str], "int | None"]


@dataclass
class Case:
    name: str
    tool: str
    args: dict[str, Any]
    check: Check  # given the first text block; raises ValueError when the reply is wrong
    # (search_files' check returns its count of matches)
    heavy: bool = False
    ours_only: bool = False
    optional: bool = False  # an error or a wrong reply makes the row "n/a", not a failure
    big: bool = False  # reads the big file (VmHWM is read around these)


def expect_lines(expected: list[str], tail: bool = False) -> Check:
    def check(text: str) -> None:
        lines = text.splitlines()
        # The reference's tail counts the empty string after a final newline as a line, so it
        # answers tail=N with N-1 lines of a file that ends in a newline: accepted.
        expected_here = expected[1:] if tail and len(lines) == len(expected) - 1 else expected
        if lines != expected_here:
            first = lines[0][:80] if lines else ""
            raise ValueError(f"{len(lines)} lines starting {first!r}; want {len(expected)}")

    return check


def expect_entries(count: int) -> Check:
    def check(text: str) -> None:
        got = sum(line.startswith("[") for line in text.splitlines())
        if got != count:
            raise ValueError(f"{got} entries listed, want {count}")

    return check


def expect_tree(count: int) -> Check:
    def nodes(tree: list[dict[str, Any]]) -> int:
        return sum(1 + nodes(node.get("children") or []) for node in tree)

    def check(text: str) -> None:
        got = nodes(json.loads(text))  # indented (reference) or compact (atomictools) JSON
        if got != count:
            raise ValueError(f"{got} entries in the tree, want {count}")

    return check


def expect_all(*needles: str) -> Check:
    def check(text: str) -> None:
        for needle in needles:
            if needle not in text:
                raise ValueError(f"{needle[:80]!r} missing from the reply")

    return check


def expect_matches(name: str, count: int) -> Check:
    def check(text: str) -> int:
        got = sum(line.rstrip().endswith(name) for line in text.splitlines())
        if not got or abs(got - count) > max(2, count // 10):
            raise ValueError(f"{got} matches, want about {count}")
        return got

    return check


def build_cases(
    node_modules: Path, stdlib: Path, big: Path, big_lines: int
) -> tuple[list[Case], dict[str, Any]]:
    dts = find_big_dts(node_modules)
    dts_head, dts_tail = head_tail(dts)
    big_head, big_tail = head_tail(big)
    middle = big_lines // 2
    small, large = node_modules / SMALL_DIR, node_modules / LARGE_DIR
    package, package_entries = package_near(node_modules, 300)
    asyncio_dir = stdlib / "asyncio"
    files = small_files(stdlib, 10)
    wanted = sum(
        (n == "package.json") for _, dirs, names in os.walk(node_modules) for n in dirs + names
    )
    rel = {p: str(p.relative_to(node_modules)) for p in (dts, package)}
    roots = [str(node_modules), str(stdlib), str(big.parent)]

    cases = [
        Case("list_allowed_directories", "list_allowed_directories", {}, expect_all(*roots)),
        Case(
            f"read_text_file head={LINES} .d.ts",
            "read_text_file",
            {"path": str(dts), "head": LINES},
            expect_lines(dts_head),
        ),
        Case(
            f"read_text_file tail={LINES} .d.ts",
            "read_text_file",
            {"path": str(dts), "tail": LINES},
            expect_lines(dts_tail, tail=True),
        ),
        Case(
            f"read_text_file head={LINES} big",
            "read_text_file",
            {"path": str(big), "head": LINES},
            expect_lines(big_head),
            heavy=True,
            big=True,
        ),
        Case(
            f"read_text_file tail={LINES} big",
            "read_text_file",
            {"path": str(big), "tail": LINES},
            expect_lines(big_tail, tail=True),
            heavy=True,
            big=True,
        ),
        Case(
            f"read_text_file offset+limit={LINES} big",
            "read_text_file",
            {"path": str(big), "offset": middle, "limit": LINES},
            expect_lines([line_text(n) for n in range(middle, middle + LINES)]),
            heavy=True,
            ours_only=True,
            optional=True,
            big=True,
        ),
    ]
    for kind in ("list_directory", "list_directory_with_sizes"):
        for directory in (small, large):
            n = len(os.listdir(directory))
            cases.append(
                Case(
                    f"{kind} {directory.relative_to(node_modules)} ({n})",
                    kind,
                    {"path": str(directory)},
                    expect_entries(n),
                )
            )
    asyncio_entries = count_entries(asyncio_dir)
    cases += [
        Case(
            f"directory_tree {rel[package]} ({package_entries})",
            "directory_tree",
            {"path": str(package)},
            expect_tree(package_entries),
        ),
        Case(
            f"directory_tree stdlib asyncio ({asyncio_entries})",
            "directory_tree",
            {"path": str(asyncio_dir)},
            expect_tree(asyncio_entries),
        ),
        Case(
            "get_file_info .d.ts",
            "get_file_info",
            {"path": str(dts)},
            expect_all(f"size: {dts.stat().st_size}"),
        ),
        Case(
            f"read_multiple_files {len(files)} small",
            "read_multiple_files",
            {"paths": [str(p) for p in files]},
            expect_all(*(p.read_text() for p in files)),
        ),
        Case(
            "search_files **/package.json",
            "search_files",
            {"path": str(node_modules), "pattern": "**/package.json", "excludePatterns": []},
            expect_matches("package.json", wanted),
            heavy=True,
        ),
    ]
    about = {
        "roots": roots,
        "dts": {"path": str(dts), "bytes": dts.stat().st_size},
        "big": {"path": str(big), "bytes": big.stat().st_size, "lines": big_lines},
        "middle_line": middle,
        "tree_package": {"path": str(package), "entries": package_entries},
        "asyncio_entries": asyncio_entries,
        "small_files": [str(p) for p in files],
        "package_json_expected": wanted,
        "node_modules_files": sum(
            not os.path.islink(os.path.join(d, n))
            for d, _, names in os.walk(node_modules)
            for n in names
        ),
    }
    return cases, about


# -- the drivers -------------------------------------------------------------------------------


class RawServer:
    """A server on pipes, driven with newline-delimited JSON-RPC from this process."""

    def __init__(self, label: str, params: StdioServerParameters, log: Path) -> None:
        self.label = label
        env = params.env if params.env is not None else get_default_environment()
        with open(log, "a") as errlog:
            self.proc = subprocess.Popen(
                [params.command, *params.args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errlog,
                cwd=params.cwd,
                env=env,
            )
        self.pid = self.proc.pid
        self.next_id = 0
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        init = {
            "protocolVersion": PROTOCOL,
            "capabilities": {},
            "clientInfo": {"name": "bench_tree-raw", "version": "0"},
        }
        _, reply = self.request("initialize", init)
        self.protocol = reply["result"]["protocolVersion"]
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def send(self, message: dict[str, Any]) -> None:
        self.stdin.write(json.dumps(message).encode() + b"\n")
        self.stdin.flush()

    def request(self, method: str, params: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        """Send one request; (seconds until its reply line was read, the reply)."""
        self.next_id += 1
        wanted = self.next_id
        line = json.dumps(
            {"jsonrpc": "2.0", "id": wanted, "method": method, "params": params}
        ).encode()
        line += b"\n"
        write, flush, readline = self.stdin.write, self.stdin.flush, self.stdout.readline
        clock = time.perf_counter
        start = clock()
        write(line)
        flush()
        while True:
            raw = readline()
            end = clock()
            if not raw:
                raise RuntimeError(f"{self.label} (raw): the server closed its stdout")
            message = json.loads(raw)
            if message.get("id") == wanted and "method" not in message:
                if "error" in message:
                    raise RuntimeError(f"{self.label} (raw): {method}: {message['error']}")
                return end - start, message
            if "method" in message and "id" in message:  # a request to us: roots/list, ...
                self.send(
                    {
                        "jsonrpc": "2.0",
                        "id": message["id"],
                        "error": {"code": -32601, "message": "not supported"},
                    }
                )

    def close(self) -> None:
        self.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class CallError(RuntimeError):
    pass


@dataclass
class Variant:
    server: str  # REF or OURS
    driver: str  # SDK or RAW
    pid: int
    call: Callable[[str, dict[str, Any]], Any]  # async: (tool, args) -> (seconds, first text)
    samples: list[float] = field(default_factory=list)
    cpu: float = 0.0
    matches: int | None = None  # what search_files' check counted

    @property
    def label(self) -> str:
        return f"{self.server} ({self.driver})"


def sdk_driver(conn: Conn, label: str) -> Callable[[str, dict[str, Any]], Any]:
    client, clock = conn.client, time.perf_counter

    async def call(tool: str, args: dict[str, Any]) -> tuple[float, str]:
        with anyio.fail_after(CALL_TIMEOUT):
            start = clock()
            result = await client.call_tool(tool, args)
            end = clock()
        if result.is_error:
            raise CallError(f"{label} (sdk): {tool} failed: {text_of(result)[:500]}")
        first = result.content[0] if result.content else None
        return end - start, first.text if isinstance(first, TextContent) else ""

    return call


def raw_driver(server: RawServer) -> Callable[[str, dict[str, Any]], Any]:
    async def call(tool: str, args: dict[str, Any]) -> tuple[float, str]:
        seconds, reply = server.request("tools/call", {"name": tool, "arguments": args})
        result = reply["result"]
        content = result.get("content") or [{}]
        text = content[0].get("text", "")
        if result.get("isError"):
            raise CallError(f"{server.label} (raw): {tool} failed: {text[:500]}")
        return seconds, text

    return call


async def timed(variant: Variant, case: Case, check: Check) -> float:
    cpu_before = cpu_seconds(variant.pid)
    seconds, text = await variant.call(case.tool, case.args)
    variant.cpu += cpu_seconds(variant.pid) - cpu_before
    try:
        counted = check(text)
    except ValueError as err:
        raise CallError(f"{variant.label}: {case.name}: wrong reply: {err}") from None
    if counted is not None:
        variant.matches = counted
    return float(seconds)


@dataclass
class Row:
    case: Case
    variants: list[Variant]
    rounds: int
    na: str | None = None  # why the row is not measured (an optional call the server refused)


async def measure_case(case: Case, variants: list[Variant], rounds: int, warmup: int) -> Row:
    row = Row(case, [v for v in variants if not (case.ours_only and v.server == REF)], rounds)
    for v in row.variants:
        for _ in range(warmup):
            try:
                await timed(v, case, case.check)
            except CallError as err:
                if not case.optional:
                    raise
                row.na = str(err)
                return row
        v.cpu = 0.0
    for i in range(rounds):
        shift = i % len(row.variants)
        for v in row.variants[shift:] + row.variants[:shift]:
            v.samples.append(await timed(v, case, case.check))
    return row


# -- the run -----------------------------------------------------------------------------------


def ours_params(roots: list[str], state: Path, cwd: Path) -> StdioServerParameters:
    args = ["-m", "atomictools", "serve"]
    for root in roots:
        args += ["--root", root]
    args += ["--state-dir", str(state), "--durability", "fast"]
    # This process's environment (PYTHONPATH picks the checkout) and a cwd that holds no
    # atomictools package: `python -m` puts the cwd first on sys.path.
    return StdioServerParameters(
        command=sys.executable, args=args, cwd=str(cwd), env=dict(os.environ)
    )


def imported_package(params: StdioServerParameters) -> str:
    done = subprocess.run(
        [params.command, "-c", "import atomictools; print(atomictools.__file__)"],
        cwd=params.cwd,
        env=params.env,
        capture_output=True,
        text=True,
        check=True,
    )
    return str(Path(done.stdout.strip()).parent)


@dataclass
class Results:
    rows: list[Row]
    hwm: dict[str, dict[str, int]]  # variant label -> moment -> VmHWM bytes
    protocols: dict[str, str]


async def run(cases: list[Case], roots: list[str], base: Path, args: argparse.Namespace) -> Results:
    logs, state, cwd = base / "logs", base / "state", base / "cwd"
    for d in (logs, state, cwd):
        d.mkdir()
    ref_params = StdioServerParameters(command="node", args=[str(REFERENCE_JS), *roots])
    ref_spec = Spec(REF, Path(roots[0]), ref_params, f"{REFERENCE_JS}\0{roots[0]}")
    ours = ours_params(roots, state, cwd)
    ours_spec = Spec(OURS, Path(roots[0]), ours, f"atomictools\0serve\0--root\0{roots[0]}")
    rows: list[Row] = []
    hwm: dict[str, dict[str, int]] = {}
    async with connect(ref_spec, logs) as ref_conn, connect(ours_spec, logs) as ours_conn:
        # The raw servers start after the SDK ones: connect() found its child by command line.
        raw_ref = RawServer(REF, ref_params, logs / "reference-raw.log")
        try:
            raw_ours = RawServer(OURS, ours, logs / "atomictools-raw.log")
            try:
                variants = [
                    Variant(REF, SDK, ref_conn.pid, sdk_driver(ref_conn, REF)),
                    Variant(OURS, SDK, ours_conn.pid, sdk_driver(ours_conn, OURS)),
                    Variant(REF, RAW, raw_ref.pid, raw_driver(raw_ref)),
                    Variant(OURS, RAW, raw_ours.pid, raw_driver(raw_ours)),
                ]
                hwm = {v.label: {} for v in variants}
                protocols = {
                    f"{REF} (sdk)": str(ref_conn.client.protocol_version),
                    f"{OURS} (sdk)": str(ours_conn.client.protocol_version),
                    f"{REF} (raw)": raw_ref.protocol,
                    f"{OURS} (raw)": raw_ours.protocol,
                }
                seen_big = False
                for index, case in enumerate(cases):
                    if case.big and not seen_big:
                        seen_big = True
                        for v in variants:
                            hwm[v.label]["before big-file reads"] = vm_status(v.pid, "VmHWM")
                    rounds = max(3, args.rounds // 8) if case.heavy else args.rounds
                    warmup = 1 if case.heavy else args.warmup
                    print(
                        f"  [{index + 1:>2}/{len(cases)}] {case.name}: {rounds} rounds ...",
                        flush=True,
                    )
                    fresh = [
                        Variant(v.server, v.driver, v.pid, v.call) for v in variants
                    ]  # per-row samples and CPU
                    row = await measure_case(case, fresh, rounds, warmup)
                    rows.append(row)
                    if index == 0:
                        for v in variants:
                            hwm[v.label]["idle"] = vm_status(v.pid, "VmHWM")
                    if case.big and not (index + 1 < len(cases) and cases[index + 1].big):
                        for v in variants:
                            hwm[v.label]["after big-file reads"] = vm_status(v.pid, "VmHWM")
                for v in variants:
                    hwm[v.label]["end"] = vm_status(v.pid, "VmHWM")
            finally:
                raw_ours.close()
        finally:
            raw_ref.close()
    return Results(rows, hwm, protocols)


# -- the report --------------------------------------------------------------------------------


def stats(v: Variant) -> dict[str, Any]:
    ordered = sorted(v.samples)
    return {
        "calls": len(ordered),
        "p50_ms": percentile(ordered, 0.5) * 1e3,
        "p90_ms": percentile(ordered, 0.9) * 1e3,
        "mean_ms": sum(ordered) / len(ordered) * 1e3,
        "min_ms": ordered[0] * 1e3,
        "max_ms": ordered[-1] * 1e3,
        "cpu_ms_per_call": v.cpu / len(ordered) * 1e3,
        "samples_ms": [s * 1e3 for s in v.samples],
    }


def ms(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def table(rows: list[Row]) -> list[dict[str, Any]]:
    header = (
        "call",
        "driver",
        "rounds",
        "ref p50 ms",
        "ref p90",
        "ours p50 ms",
        "ours p90",
        "ratio p50",
        "ref cpu ms/call",
        "ours cpu ms/call",
    )
    lines: list[tuple[str, ...]] = [header]
    figures = []
    for row in rows:
        for driver in (SDK, RAW):
            by = {v.server: v for v in row.variants if v.driver == driver}
            ref = stats(by[REF]) if REF in by and not row.na else None
            ours = stats(by[OURS]) if not row.na else None
            dash, na = "—", "n/a"
            ratio = ours["p50_ms"] / ref["p50_ms"] if ref and ours else None
            lines.append(
                (
                    row.case.name if driver == SDK else "",
                    driver,
                    str(row.rounds) if not row.na else na,
                    ms(ref["p50_ms"]) if ref else dash if row.case.ours_only else na,
                    ms(ref["p90_ms"]) if ref else dash if row.case.ours_only else na,
                    ms(ours["p50_ms"]) if ours else na,
                    ms(ours["p90_ms"]) if ours else na,
                    f"{ratio:.2f}" if ratio is not None else dash if ours else na,
                    ms(ref["cpu_ms_per_call"]) if ref else dash if row.case.ours_only else na,
                    ms(ours["cpu_ms_per_call"]) if ours else na,
                )
            )
            figures.append(
                {
                    "call": row.case.name,
                    "tool": row.case.tool,
                    "arguments": row.case.args,
                    "driver": driver,
                    "rounds": row.rounds,
                    "na": row.na,
                    "reference": ref,
                    "atomictools": ours,
                    "ratio_p50": ratio,
                }
            )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for n, line in enumerate(lines):
        cells = [
            cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i]) for i, cell in enumerate(line)
        ]
        print("| " + " | ".join(cells) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, a 0.25 GiB file")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--rounds", type=int, help="rounds of the cheap calls (default 200)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up calls per variant")
    parser.add_argument("--big-gib", type=float, help="size of the big file (default 1)")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path.home() / ".cache" / "atomictools-bench",
        help="where the stdlib copy and the big file are kept",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (state, logs)")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 40 if args.quick else 200
    if args.big_gib is None:
        args.big_gib = 0.25 if args.quick else 1.0
    if args.rounds < 1 or args.warmup < 1 or args.big_gib * GiB < LINE_BYTES * 4 * LINES:
        parser.error("need --rounds >= 1, --warmup >= 1 and a --big-gib of a few KiB at least")
    warnings.simplefilter("ignore", MCPDeprecationWarning)

    ref_version = ensure_reference()
    node_modules = ensure_node_modules()
    cache = args.cache.expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    stdlib = stdlib_copy(cache)
    big, big_lines = big_file(cache, args.big_gib)
    cases, about = build_cases(node_modules, stdlib, big, big_lines)
    roots = about["roots"]

    base = Path(tempfile.mkdtemp(prefix="atomictools-bench-tree-"))
    package = imported_package(ours_params(roots, base / "state", base))
    load_before = loadavg()
    print(
        f"atomictools from {package}; reference {ref_version}\n"
        f"roots: {', '.join(roots)}\n"
        f"npm tree: {about['node_modules_files']:,} files; .d.ts {about['dts']['path']} "
        f"({about['dts']['bytes']:,} bytes); big file {about['big']['bytes'] / GiB:g} GiB "
        f"({big_lines:,} lines); directory_tree package "
        f"{Path(about['tree_package']['path']).relative_to(node_modules)} "
        f"({about['tree_package']['entries']} entries)\n",
        flush=True,
    )
    started = time.perf_counter()
    ok = False
    try:
        results = anyio.run(run, cases, roots, base, args)
        ok = True
    finally:
        if ok and not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"kept {base} (state, server logs in logs/)")
    elapsed = time.perf_counter() - started
    print(
        f"\natomictools ({package}) vs @modelcontextprotocol/server-filesystem {ref_version}; "
        f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, loadavg {load_before} at the "
        f"start, {loadavg()} at the end; {elapsed:.0f}s\n"
    )
    figures = table(results.rows)
    print(
        "\nms per call, one call in flight. ratio: atomictools p50 / reference p50 (below 1: "
        "atomictools is faster).\nsdk: mcp.Client(mode='legacy').call_tool; raw: one tools/call "
        "line written until its reply line is read\n(no client-side validation). cpu: the "
        "server process's CPU time per call (all threads, schedstat).\n"
        "— : the reference has no such parameters. n/a: the server under test refused or "
        "ignored them."
    )
    for row in results.rows:
        if row.na:
            print(f"  n/a {row.case.name}: {row.na[:300]}")
    counts = {
        v.label: v.matches for row in results.rows for v in row.variants if v.matches is not None
    }
    print(
        "  search_files matches: "
        + ", ".join(f"{label} {n}" for label, n in counts.items())
        + f"; {about['package_json_expected']} entries named package.json in the tree"
    )
    print("\nVmHWM (MiB): " + ", ".join(results.hwm[next(iter(results.hwm))]))
    for label, moments in results.hwm.items():
        print(f"  {label:<20} " + "  ".join(f"{v / MiB:8.1f}" for v in moments.values()))
    if args.json:
        report = {
            "atomictools_package": package,
            "reference": ref_version,
            "python": sys.version,
            "cpus": os.cpu_count(),
            "loadavg": [load_before, loadavg()],
            "seconds": elapsed,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "protocols": results.protocols,
            "setup": about,
            "search_matches": counts,
            "vmhwm_bytes": results.hwm,
            "calls": figures,
        }
        args.json.write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
