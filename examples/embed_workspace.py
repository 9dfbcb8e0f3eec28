"""A walkthrough of the embedding API on a temporary directory.

Run it with ``python examples/embed_workspace.py``. It shows an atomic write, a faithful edit
(CRLF kept), a lost update refused by ``expected_sha256``, a streamed write cancelled half-way
leaving nothing behind, and a path outside the root refused. It exits non-zero if any of the
guarantees it shows did not hold.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import anyio

from atomictools import OutsideRootsError, PreconditionFailedError, Workspace


async def main(root: Path) -> int:
    ws = Workspace([root])
    failures = 0

    def check(ok: bool, what: str) -> None:
        nonlocal failures
        print(f"  [{'ok' if ok else 'FAILED'}] {what}")
        failures += not ok

    print(f"workspace root: {root}")
    written = await ws.write("notes.txt", "first line\r\nsecond line\r\n")
    print(f"1. wrote notes.txt atomically: {written.size} bytes, sha256 {written.sha256[:12]}...")

    read = await ws.read_text("notes.txt")
    edited = await ws.edit(
        "notes.txt", [("first line\n", "FIRST LINE\n")], expected_sha256=read.sha256
    )
    print("2. edited with a model-style '\\n' snippet; the diff:")
    print("   " + edited.diff.replace("\n", "\n   ").rstrip())
    check((root / "notes.txt").read_bytes() == b"FIRST LINE\r\nsecond line\r\n", "CRLF kept")

    print("3. a write based on a stale read is refused (no lost update):")
    try:
        await ws.write("notes.txt", "stale overwrite", expected_sha256=read.sha256)
        check(False, "stale write refused")
    except PreconditionFailedError as err:
        print(f"   {err}")
        check((root / "notes.txt").read_bytes().startswith(b"FIRST LINE"), "file unchanged")

    print("4. a 64 MiB streamed write cancelled half-way:")
    written_before_cancel = 0
    with anyio.CancelScope() as scope:
        async with ws.atomic_writer("big.bin") as writer:
            for chunk in range(64):
                await writer.write(b"x" * (1024 * 1024))
                written_before_cancel = writer.size
                if chunk == 31:
                    scope.cancel()  # as a client's cancel or a deadline would, mid-write
    print(f"   cancelled after {written_before_cancel / 2**20:.0f} MiB had gone to the temp file")
    leftovers = sorted(p.name for p in root.iterdir())
    print(f"   directory now holds: {leftovers}")
    check(not (root / "big.bin").exists(), "big.bin not created")
    check(leftovers == ["notes.txt"], "no temp file left behind")

    print("5. a path outside the root is refused:")
    try:
        await ws.read_text("../../etc/passwd")
        check(False, "escape refused")
    except OutsideRootsError as err:
        print(f"   {err}")
        check(True, "escape refused")

    print("all guarantees held" if not failures else f"{failures} guarantee(s) did NOT hold")
    return 1 if failures else 0


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="atomictools-demo-") as tmp:
        sys.exit(anyio.run(main, Path(tmp)))
