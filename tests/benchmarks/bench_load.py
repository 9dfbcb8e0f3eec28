"""Load: N concurrent MCP clients doing mixed reads and atomic writes, over stdio and HTTP.

    python tests/benchmarks/bench_load.py [--clients 4] [--seconds 10]
        [--transport stdio|http|both] [--read-ratio 0.7] [--durability full|fast]
        [--files 48] [--mode legacy|auto] [--seed N] [--dir DIR] [--keep]

Sets up a temp root with ``--files`` files of 4 KiB (plus one counter file per client) and a
private state directory (``--state-dir`` and ``$ATOMICTOOLS_STATE_DIR``, so the user's real
state is never touched), then, for each transport in turn, for ``--seconds`` of wall time:

* stdio: a stdio server serves exactly one client (one pipe pair), so N concurrent clients
  means N server processes, ``python -m atomictools serve --root ROOT --state-dir STATE``, all
  on the SAME root and state directory: the load also exercises the cross-process locks. Each
  is driven by ``mcp.Client(stdio_client(StdioServerParameters(...)), mode=...)``.
* http: ONE server, ``atomictools serve --transport http --port P`` (a free loopback port),
  and N concurrent streamable-HTTP ``mcp.Client(url)`` sessions against it.

All clients connect first; the clock starts when the last one is ready. Each client then
loops until the deadline, one call at a time: with probability ``--read-ratio`` it calls
``read_text_file`` on a random data file, otherwise it writes: three writes in four are a
``write_file`` of 4 KiB to a random data file (other clients write the same files), one in four
is a read-modify-write of the client's own counter file (``read_text_file``, then
``write_file`` of the value + 1 with ``expectedSha256`` from that read). Only that client
writes its counter file, so the conditional write must always succeed, and the next read must
show the value it wrote.

Every call's latency is recorded and counted as an error when the result has ``isError`` or
the call raised (an exception ends that client's loop: its session may be broken). Also an
error: a read whose content is not one whole version of a file (every file holds 64 copies of
one 64-byte stamp line, so a torn or mixed file shows), whose ``sha256`` does not match its
content, or a counter read that is not the client's own last value.

Prints one row per transport (calls, calls/s, p50/p99 latency, reads, writes, errors; calls/s
over the time until the last client's last call, started before the deadline, returned), the
latency per kind of call, and the CPU time used in that window by the client process (all the
clients run in this one Python process), by the servers and by every other process of the
machine (a busy machine shows there, not in the table). Afterwards it checks that every
counter file holds its client's number of successful increments and that nothing but the data
and counter files is left in the root (no temp file, no lock). Exits 1 on any error, counter
mismatch or leftover.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import anyio
from benchstats import percentile
from mcp import Client
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import MCPDeprecationWarning
from mcp.types import CallToolResult

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: `tests` package

from atomictools.engine.config import STATE_DIR_ENV
from tests.server.helpers import stdio_params, text_of

KiB = 1024
LINE = 64  # bytes per stamp line
FILE_SIZE = 4 * KiB
CAS_SHARE = 0.25  # of the writes: read-modify-write of the client's counter file
CALL_TIMEOUT = 30.0  # seconds; a call that takes longer is an error (and ends its client)
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
MAX_MESSAGES = 5  # error messages kept per transport for the report


def stamped(stamp: str) -> str:
    """4 KiB of 64 copies of one 64-byte line: a file made of two versions is visible."""
    line = stamp[: LINE - 1].ljust(LINE - 1, ".") + "\n"
    return line * (FILE_SIZE // LINE)


def whole_version(content: str) -> bool:
    return len(content) == FILE_SIZE and content == content[:LINE] * (FILE_SIZE // LINE)


def counter_text(value: int) -> str:
    return stamped(f"counter {value}")


def counter_value(content: str) -> int:
    return int(content.split("\n", 1)[0].split()[1].rstrip("."))


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# -- the setup ---------------------------------------------------------------------------------


@dataclass
class Setup:
    root: Path
    state: Path
    logs: Path
    data: list[str]  # paths of the shared data files, relative to the root


def make_setup(base: Path, files: int) -> Setup:
    root, state, logs = base / "root", base / "state", base / "logs"
    for directory in (root / "data", root / "counters", state, logs):
        directory.mkdir(parents=True)
    data = [f"data/f{i:03d}.txt" for i in range(files)]
    for name in data:
        (root / name).write_text(stamped(f"initial {name}"))
    return Setup(root.resolve(), state, logs, data)


def counter_path(transport: str, client: int) -> str:
    return f"counters/{transport}-c{client}.txt"


# -- one client --------------------------------------------------------------------------------


@dataclass
class Stats:
    """What one client (or, merged, one transport) did."""

    latencies: dict[str, list[float]] = field(
        default_factory=lambda: {"read": [], "write": [], "counter read": [], "cas write": []}
    )
    errors: int = 0
    messages: list[str] = field(default_factory=list)
    increments: int = 0  # successful conditional writes of the counter file

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(message)

    def merge(self, other: Stats) -> None:
        for kind, samples in other.latencies.items():
            self.latencies[kind].extend(samples)
        self.errors += other.errors
        self.messages.extend(other.messages[: MAX_MESSAGES - len(self.messages)])
        self.increments += other.increments

    @property
    def all_latencies(self) -> list[float]:
        return [x for samples in self.latencies.values() for x in samples]

    @property
    def reads(self) -> int:
        return len(self.latencies["read"]) + len(self.latencies["counter read"])

    @property
    def writes(self) -> int:
        return len(self.latencies["write"]) + len(self.latencies["cas write"])


class ClientBroken(Exception):
    """A call raised: the loop of this client stops (its session may be unusable)."""


@dataclass
class Worker:
    """One client's loop: it owns ``stats`` and its counter file."""

    transport: str
    index: int
    client: Client
    setup: Setup
    rng: random.Random
    read_ratio: float
    stats: Stats = field(default_factory=Stats)
    writes_done: int = 0

    @property
    def label(self) -> str:
        return f"{self.transport} client {self.index}"

    async def call(self, kind: str, tool: str, args: dict[str, Any]) -> CallToolResult | None:
        """One timed call; None when it was an error (already counted)."""
        started = time.perf_counter()
        try:
            with anyio.fail_after(CALL_TIMEOUT):
                result = await self.client.call_tool(tool, args)
        except Exception as exc:  # a transport or protocol failure, or the timeout
            self.stats.latencies[kind].append(time.perf_counter() - started)
            self.stats.error(f"{self.label}: {tool} {args.get('path')} raised {exc!r}")
            raise ClientBroken from exc
        self.stats.latencies[kind].append(time.perf_counter() - started)
        if result.is_error:
            self.stats.error(f"{self.label}: {tool} {args['path']}: {text_of(result)[:300]}")
            return None
        return result

    def check_read(self, result: CallToolResult, path: str) -> str | None:
        content = result.structured_content or {}
        text = content.get("content")
        if not isinstance(text, str) or not whole_version(text):
            self.stats.error(
                f"{self.label}: read of {path} is not one whole version: {text!r:.200}"
            )
            return None
        if content.get("sha256") != sha(text):
            self.stats.error(f"{self.label}: read of {path}: sha256 does not match the content")
            return None
        return text

    async def read(self) -> None:
        path = self.rng.choice(self.setup.data)
        result = await self.call("read", "read_text_file", {"path": path})
        if result is not None:
            self.check_read(result, path)

    async def write(self) -> None:
        path = self.rng.choice(self.setup.data)
        self.writes_done += 1
        content = stamped(f"{self.label} write {self.writes_done}")
        await self.call("write", "write_file", {"path": path, "content": content})

    async def increment(self) -> None:
        path = counter_path(self.transport, self.index)
        result = await self.call("counter read", "read_text_file", {"path": path})
        if result is None:
            return
        text = self.check_read(result, path)
        if text is None:
            return
        value = counter_value(text)
        if value != self.stats.increments:
            self.stats.error(
                f"{self.label}: {path} reads {value}, expected {self.stats.increments}"
            )
            return
        args = {"path": path, "content": counter_text(value + 1), "expectedSha256": sha(text)}
        if await self.call("cas write", "write_file", args) is not None:
            self.stats.increments += 1

    async def run(self, deadline: float) -> None:
        try:
            while time.perf_counter() < deadline:
                if self.rng.random() < self.read_ratio:
                    await self.read()
                elif self.rng.random() < CAS_SHARE:
                    await self.increment()
                else:
                    await self.write()
        except ClientBroken:
            pass


# -- the servers -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_args(setup: Setup, durability: str) -> list[str]:
    return ["--state-dir", str(setup.state), "--durability", durability]


def server_env(setup: Setup) -> dict[str, str]:
    return {STATE_DIR_ENV: str(setup.state)}


@asynccontextmanager
async def http_server(setup: Setup, durability: str, log: TextIO) -> AsyncIterator[str]:
    """One ``atomictools serve --transport http`` process; yields its URL once the port is open."""
    port = free_port()
    argv = [sys.executable, "-m", "atomictools", "serve", "--root", str(setup.root)]
    argv += ["--transport", "http", "--port", str(port), *server_args(setup, durability)]
    proc = await anyio.open_process(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log,
        env={**os.environ, **server_env(setup)},
    )
    try:
        with anyio.fail_after(STARTUP_TIMEOUT):
            while True:
                if proc.returncode is not None:
                    raise RuntimeError(
                        f"the HTTP server exited with {proc.returncode}; see {setup.logs}"
                    )
                try:
                    await (await anyio.connect_tcp("127.0.0.1", port)).aclose()
                    break
                except OSError:
                    await anyio.sleep(0.05)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        with anyio.CancelScope(shield=True):  # SIGTERM, then SIGKILL: bounded either way
            if proc.returncode is None:
                proc.terminate()
                with anyio.move_on_after(STOP_TIMEOUT):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()


def children_cpu() -> float | None:
    """CPU seconds used so far by this process's live child processes (the servers); Linux."""
    me, total = os.getpid(), 0
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == me:  # fields[1] is the ppid; [11], [12]: utime, stime in ticks
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def machine_busy() -> float | None:
    """CPU seconds all processes of the machine have used since boot (/proc/stat); Linux."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # without guest (counted in user)


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- one transport -----------------------------------------------------------------------------


@dataclass
class Outcome:
    transport: str
    clients: int
    stats: Stats
    elapsed: float  # from the start signal until the last client finished its last call
    client_cpu: float  # CPU seconds of this process (all the clients) in that window
    server_cpu: float | None  # CPU seconds of the server processes in that window
    machine_cpu: float | None  # CPU seconds of every process on the machine in that window
    servers: int
    counters: list[tuple[int, int, int | None]]  # (client, increments, value on disk)

    @property
    def counters_ok(self) -> bool:
        return len(self.counters) == self.clients and all(
            done == on_disk for _, done, on_disk in self.counters
        )


@dataclass
class Run:
    """The clients of one transport: all connect, then all start together."""

    clients: int
    workers: list[Worker] = field(default_factory=list)
    failed: Stats = field(default_factory=Stats)  # sessions that failed as a whole
    deadline: float = 0.0
    arrived: int = 0
    finished: int = 0
    ready: anyio.Event = field(default_factory=anyio.Event)
    start: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)

    def arrive(self) -> None:
        self.arrived += 1
        if self.arrived == self.clients:
            self.ready.set()

    def finish(self) -> None:
        self.finished += 1
        if self.finished == self.clients:
            self.done.set()

    async def client(
        self, name: str, make: Callable[[Client], Worker], connect: Callable[[], Client]
    ) -> None:
        arrived = finished = False
        try:
            async with connect() as client:
                worker = make(client)
                self.workers.append(worker)
                arrived = True
                self.arrive()
                await self.start.wait()
                await worker.run(self.deadline)
                finished = True
                self.finish()
        except Exception as exc:  # could not connect, or the session failed (also on close)
            self.failed.error(f"{name}: the session failed: {exc!r}")
        finally:
            if not arrived:
                self.arrive()
            if not finished:
                self.finish()

    async def go(self, seconds: float) -> tuple[float, float, float | None, float | None]:
        """Start everyone once all are connected; returns the elapsed time and CPU seconds
        (of the clients, of the servers, of the whole machine) in that window."""
        with anyio.fail_after(STARTUP_TIMEOUT):
            await self.ready.wait()
        cpu_self, cpu_servers, cpu_machine = self_cpu(), children_cpu(), machine_busy()
        started = time.perf_counter()
        self.deadline = started + seconds
        self.start.set()
        await self.done.wait()
        elapsed = time.perf_counter() - started
        servers_now, machine_now = children_cpu(), machine_busy()
        return (
            elapsed,
            self_cpu() - cpu_self,
            None if cpu_servers is None or servers_now is None else servers_now - cpu_servers,
            None if cpu_machine is None or machine_now is None else machine_now - cpu_machine,
        )


async def run_transport(transport: str, setup: Setup, args: argparse.Namespace) -> Outcome:
    for i in range(args.clients):
        (setup.root / counter_path(transport, i)).write_text(counter_text(0))
    run = Run(args.clients)

    def worker(index: int) -> Callable[[Client], Worker]:
        rng = random.Random(f"{args.seed}-{transport}-{index}")
        return lambda client: Worker(transport, index, client, setup, rng, args.read_ratio)

    async def drive(
        connect: Callable[[], Client],
    ) -> tuple[float, float, float | None, float | None]:
        async with anyio.create_task_group() as tg:  # exits once every session is closed
            for i in range(args.clients):
                tg.start_soon(run.client, f"{transport} client {i}", worker(i), connect)
            measured = await run.go(args.seconds)
        return measured

    with open(setup.logs / f"{transport}-servers.log", "w") as log:
        if transport == "stdio":
            params = stdio_params(setup.root, *server_args(setup, args.durability))
            params = params.model_copy(update={"env": server_env(setup)})
            measured = await drive(lambda: Client(stdio_client(params, log), mode=args.mode))
        else:
            async with http_server(setup, args.durability, log) as url:
                measured = await drive(lambda: Client(url, mode=args.mode))
    elapsed, client_cpu, server_cpu, machine_cpu = measured

    stats = Stats()
    counters: list[tuple[int, int, int | None]] = []
    for w in sorted(run.workers, key=lambda w: w.index):
        stats.merge(w.stats)
        try:
            on_disk: int | None = counter_value(
                (setup.root / counter_path(transport, w.index)).read_text()
            )
        except (OSError, ValueError, IndexError):
            on_disk = None
        counters.append((w.index, w.stats.increments, on_disk))
    stats.merge(run.failed)
    servers = args.clients if transport == "stdio" else 1
    return Outcome(
        transport,
        args.clients,
        stats,
        elapsed,
        client_cpu,
        server_cpu,
        machine_cpu,
        servers,
        counters,
    )


# -- the report --------------------------------------------------------------------------------


def ms(sorted_samples: list[float], q: float) -> str:
    return f"{percentile(sorted_samples, q) * 1e3:.2f}" if sorted_samples else "-"


def main_table(outcomes: list[Outcome]) -> None:
    header = (
        f"{'transport':<10}{'clients':>8}{'calls':>8}{'calls/s':>9}{'p50 ms':>8}{'p99 ms':>8}"
        f"{'reads':>7}{'writes':>7}{'errors':>7}"
    )
    print(header)
    print("-" * len(header))
    for o in outcomes:
        samples = sorted(o.stats.all_latencies)
        print(
            f"{o.transport:<10}{o.clients:>8}{len(samples):>8}{len(samples) / o.elapsed:>9.1f}"
            f"{ms(samples, 0.5):>8}{ms(samples, 0.99):>8}{o.stats.reads:>7}{o.stats.writes:>7}"
            f"{o.stats.errors:>7}"
        )
    print()


def kind_table(outcomes: list[Outcome]) -> None:
    header = f"{'transport':<10}{'call':<28}{'calls':>7}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}"
    print(header)
    print("-" * len(header))
    what = {
        "read": "read_text_file (shared)",
        "write": "write_file (shared)",
        "counter read": "read_text_file (own counter)",
        "cas write": "write_file + expectedSha256",
    }
    for o in outcomes:
        for kind, samples in o.stats.latencies.items():
            ordered = sorted(samples)
            top = f"{ordered[-1] * 1e3:.2f}" if ordered else "-"
            print(
                f"{o.transport:<10}{what[kind]:<28}{len(ordered):>7}{ms(ordered, 0.5):>8}"
                f"{ms(ordered, 0.99):>8}{top:>8}"
            )
    print()


def cpu_lines(outcomes: list[Outcome]) -> None:
    cores = os.cpu_count() or 1
    for o in outcomes:
        servers = "n/a" if o.server_cpu is None else f"{o.server_cpu:.1f}s"
        others = ""
        if o.machine_cpu is not None and o.server_cpu is not None:
            rest = max(0.0, o.machine_cpu - o.client_cpu - o.server_cpu)
            others = f", other processes {rest:.1f}s"
        plural = "es" if o.servers > 1 else ""
        print(
            f"{o.transport}: CPU in the {o.elapsed:.1f}s run on {cores} cores: clients (this "
            f"process) {o.client_cpu:.1f}s, {o.servers} server process{plural} {servers}{others}"
        )
    print()


def leftovers(setup: Setup, clients: int) -> list[str]:
    """Anything in the root that is not one of our data or counter files (temps, locks...)."""
    expected = {setup.root / name for name in setup.data}
    expected |= {setup.root / "data", setup.root / "counters"}
    expected |= {setup.root / counter_path(t, i) for t in ("stdio", "http") for i in range(clients)}
    return [
        str(p.relative_to(setup.root)) for p in sorted(setup.root.rglob("*")) if p not in expected
    ]


def verdicts(outcomes: list[Outcome], setup: Setup) -> bool:
    ok = True
    for o in outcomes:
        detail = "; ".join(
            f"c{i}: {done} increments, file says {'?' if disk is None else disk}"
            for i, done, disk in o.counters
        )
        verdict = "PASS" if o.counters_ok else "FAIL"
        print(f"{verdict}: {o.transport} counter files ({detail})")
        ok = ok and o.counters_ok
        if o.stats.errors:
            ok = False
            print(f"FAIL: {o.transport}: {o.stats.errors} error(s); the first:")
            for message in o.stats.messages:
                print(f"    {message}")
        else:
            print(f"PASS: {o.transport}: 0 errors in {len(o.stats.all_latencies)} calls")
    if not ok:
        for log in sorted(setup.logs.iterdir()):
            tail = log.read_text(errors="replace").splitlines()[-10:]
            if tail:
                print(f"the end of {log}:")
                print("\n".join(f"    {line}" for line in tail))
    left = leftovers(setup, outcomes[0].clients)
    if left:
        ok = False
        print(f"FAIL: left in the root: {', '.join(left[:10])}")
    else:
        print("PASS: nothing but the data and counter files left in the root")
    return ok


# -- main --------------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace, setup: Setup) -> bool:
    transports = ["stdio", "http"] if args.transport == "both" else [args.transport]
    outcomes = [await run_transport(t, setup, args) for t in transports]
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"atomictools load benchmark: {args.clients} clients x {args.seconds:g}s per transport, "
        f"read ratio {args.read_ratio:g} (of the writes {CAS_SHARE:.0%} read-modify-write a "
        f"counter with expectedSha256), {len(setup.data)} files of {FILE_SIZE // KiB} KiB, "
        f"durability {args.durability}, mode {args.mode}, python {sys.version.split()[0]}, "
        f"{os.cpu_count()} cpus, loadavg {load}\n"
    )
    main_table(outcomes)
    kind_table(outcomes)
    cpu_lines(outcomes)
    return verdicts(outcomes, setup)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=10.0, help="run time per transport")
    parser.add_argument("--transport", choices=["stdio", "http", "both"], default="both")
    parser.add_argument("--read-ratio", type=float, default=0.7, help="share of reads (0..1)")
    parser.add_argument("--durability", choices=["full", "fast"], default="full")
    parser.add_argument("--files", type=int, default=48, help="shared data files of 4 KiB")
    parser.add_argument(
        "--mode", choices=["legacy", "auto"], default="legacy", help="the clients' protocol mode"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the clients' choices")
    parser.add_argument("--dir", type=Path, help="where the temp dir goes (default: the system's)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (root, logs)")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0 or not 0 <= args.read_ratio <= 1 or args.files < 1:
        parser.error("need --clients >= 1, --seconds > 0, 0 <= --read-ratio <= 1, --files >= 1")
    warnings.simplefilter("ignore", MCPDeprecationWarning)
    base = Path(tempfile.mkdtemp(prefix="atomictools-load-", dir=args.dir))
    setup = make_setup(base, args.files)
    started = time.perf_counter()
    ok = False
    try:
        ok = anyio.run(main_async, args, setup)
    finally:
        if ok and not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"kept {base} (root, state, server logs in logs/)")
    print(f"total {time.perf_counter() - started:.1f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
