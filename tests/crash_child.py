"""Child process of the SIGKILL crash harness: rewrites target files until it is killed.

Run as a real process (``sys.executable tests/crash_child.py ...``) by ``tests/sigkill_harness``.
After its imports it waits for ``go`` on stdin (so the parent can start the next child while the
current one is still being killed and checked), then rewrites ``NFILES`` targets in turn with
fresh self-checking versions, printing ``ready`` after its first completed write. It never exits
by itself: the parent SIGKILLs it at a random moment and then checks every target.

Modes:

* ``atomic-full`` / ``atomic-fast``: ``atomictools.Workspace.write`` with that durability.
* ``naive``: the negative control, ``open(path, "wb")`` and the content written in place in
  small flushed chunks (no fsync), so a kill mid-write leaves a short, torn file.

Each version is a 56-byte header (magic, file id, version, payload length, sha256 of the
payload) plus a 256 KiB - 2 MiB payload, so a reader can tell a complete version from a torn one.
Progress goes to a small shared status file (mmap): the phase the child is in, and for each file
the version it is writing and the last version a write call returned for, which tells the parent
exactly which versions may be on disk after the kill.
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import os
import random
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"ATKV"
HEADER = struct.Struct(">4sIQQ32s")  # magic, file id, version, payload length, sha256(payload)
MIN_PAYLOAD = 256 * 1024
MAX_PAYLOAD = 2 * 1024 * 1024
NAIVE_CHUNK = 16 * 1024
MODES = ("atomic-full", "atomic-fast", "naive")

# The status file: a fixed header, then one (in_progress, committed) pair per target.
STATUS_HEAD = struct.Struct("<4sIIIQ")  # magic, phase index, current file id, unused, writes done
STATUS_FILE = struct.Struct("<QQ")  # version being written, last version whose write returned
STATUS_MAGIC = b"KSTS"
PHASES = (
    "not started",
    "prepare",  # building the next version in memory
    "call",  # inside Workspace.write before its first step: resolve, lock, lstat, temp create
    "write.created",  # the engine's own steps (engine.durable.steps), observed in the child
    "write.chunk",
    "write.written",  # fsync of the temp (full durability) or nothing (fast)
    "write.synced",  # rename over the target, then the directory fsync
    "returned",  # the write call returned; bookkeeping until the next prepare
    "naive.open",  # naive control: inside open(..., "wb"), which truncates the target
    "naive.truncated",  # naive control: the target is empty
    "naive.chunk",  # naive control: part of the content written in place
    "naive.close",  # naive control: all written, closing
    "other",
)


def target_name(file_id: int) -> str:
    return f"target-{file_id}.bin"


def status_size(nfiles: int) -> int:
    return STATUS_HEAD.size + nfiles * STATUS_FILE.size


def make_version(
    file_id: int, version: int, payload: bytes | memoryview, digest: bytes | None = None
) -> bytes:
    """The complete bytes of one version: header plus payload (``digest``: its sha256)."""
    if digest is None:
        digest = hashlib.sha256(payload).digest()
    return b"".join((HEADER.pack(MAGIC, file_id, version, len(payload), digest), payload))


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a target holds: one complete version (``version``) or a torn file (``problem``)."""

    version: int | None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify_version(data: bytes, file_id: int) -> Verdict:
    """Check that ``data`` is exactly one complete version of target ``file_id``."""
    if len(data) < HEADER.size:
        return Verdict(None, f"{len(data)} bytes, shorter than the {HEADER.size}-byte header")
    magic, fid, version, length, digest = HEADER.unpack_from(data)
    if magic != MAGIC:
        return Verdict(None, f"bad magic {magic!r}")
    if fid != file_id:
        return Verdict(version, f"header names file {fid}, expected {file_id}")
    if len(data) != HEADER.size + length:
        return Verdict(
            version,
            f"version {version}: {len(data) - HEADER.size} payload bytes, header says {length}",
        )
    if hashlib.sha256(memoryview(data)[HEADER.size :]).digest() != digest:
        return Verdict(version, f"version {version}: payload sha256 mismatch (mixed versions?)")
    return Verdict(version)


class Status:
    """The child's side of the shared status file."""

    def __init__(self, path: str, nfiles: int) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, status_size(nfiles))
        finally:
            os.close(fd)
        self._phase_index = {name: i for i, name in enumerate(PHASES)}
        self._writes = 0
        self._file = 0
        self._phase = 0

    def _head(self) -> None:
        STATUS_HEAD.pack_into(self._map, 0, STATUS_MAGIC, self._phase, self._file, 0, self._writes)

    def phase(self, name: str) -> None:
        self._phase = self._phase_index.get(name, self._phase_index["other"])
        self._head()

    def begin(self, file_id: int, version: int) -> None:
        self._file = file_id
        STATUS_FILE.pack_into(
            self._map,
            STATUS_HEAD.size + file_id * STATUS_FILE.size,
            version,
            self._committed(file_id),
        )

    def commit(self, file_id: int, version: int) -> None:
        STATUS_FILE.pack_into(
            self._map, STATUS_HEAD.size + file_id * STATUS_FILE.size, version, version
        )
        self._writes += 1
        self.phase("returned")

    def _committed(self, file_id: int) -> int:
        return STATUS_FILE.unpack_from(self._map, STATUS_HEAD.size + file_id * STATUS_FILE.size)[1]


class Versions:
    """Produces successive versions cheaply, so most of the child's time is spent writing.

    Payloads are slices of one random pool, drawn from a fixed set of (start, length) choices
    whose digests are computed once. Two consecutive versions of a file never share a choice, so
    any mix of an old and a new version fails the length or the digest check.
    """

    CHOICES = 16

    def __init__(self, seed: int, version_base: int) -> None:
        self._rng = random.Random(seed)
        pool = memoryview(os.urandom(MAX_PAYLOAD + 256 * 1024))
        self._payloads = []
        for _ in range(self.CHOICES):
            length = self._rng.randint(MIN_PAYLOAD, MAX_PAYLOAD)
            start = self._rng.randint(0, len(pool) - length)
            payload = pool[start : start + length]
            self._payloads.append((payload, hashlib.sha256(payload).digest()))
        self._last: dict[int, int] = {}
        self._next = version_base

    def next(self, file_id: int) -> tuple[int, bytes]:
        self._next += 1
        choice = self._rng.randrange(self.CHOICES - 1)
        if choice >= self._last.get(file_id, self.CHOICES):
            choice += 1  # anything but the previous choice for this file
        self._last[file_id] = choice
        payload, digest = self._payloads[choice]
        return self._next, make_version(file_id, self._next, payload, digest)


def _ready_once(count: int) -> None:
    if count == 0:
        sys.stdout.write("ready\n")
        sys.stdout.flush()


def run_naive(directory: Path, nfiles: int, versions: Versions, status: Status) -> None:
    count = 0
    while True:
        file_id = count % nfiles
        status.phase("prepare")
        version, data = versions.next(file_id)
        status.begin(file_id, version)
        status.phase("naive.open")
        with open(directory / target_name(file_id), "wb") as out:  # truncates in place
            status.phase("naive.truncated")
            for start in range(0, len(data), NAIVE_CHUNK):
                out.write(data[start : start + NAIVE_CHUNK])
                out.flush()  # a write(2) per chunk, no fsync
                status.phase("naive.chunk")
            status.phase("naive.close")
        status.commit(file_id, version)
        _ready_once(count)
        count += 1


async def run_atomic(
    directory: Path, nfiles: int, durability: str, versions: Versions, status: Status
) -> None:
    from atomictools import Workspace
    from atomictools.engine.durable.steps import observe_steps

    workspace = Workspace([directory], durability=durability)
    count = 0
    with observe_steps(status.phase):
        while True:
            file_id = count % nfiles
            status.phase("prepare")
            version, data = versions.next(file_id)
            status.begin(file_id, version)
            status.phase("call")
            await workspace.write(target_name(file_id), data)
            status.commit(file_id, version)
            _ready_once(count)
            count += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("directory", type=Path)
    parser.add_argument("status", help="status file of status_size(nfiles) bytes")
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--version-base", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    args = parser.parse_args(argv)

    import anyio  # imported before "go" so the start-up cost is off the measured path

    import atomictools  # noqa: F401

    versions = Versions(args.seed, args.version_base)
    status = Status(args.status, args.files)
    if sys.stdin.readline().strip() != "go":
        return 0  # the parent went away or did not need this child
    status.phase("prepare")
    if args.mode == "naive":
        run_naive(args.directory, args.files, versions, status)
    else:
        durability = args.mode.removeprefix("atomic-")
        anyio.run(
            run_atomic,
            args.directory,
            args.files,
            durability,
            versions,
            status,
            backend=args.backend,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
