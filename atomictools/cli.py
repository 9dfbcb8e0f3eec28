"""The ``atomictools`` command line: a thin layer that parses arguments and calls the engine."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import anyio

from . import __version__
from .config import Durability
from .errors import AtomicToolsError
from .workspace import atomic_writer

_STDIN_CHUNK = 1024 * 1024


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atomictools",
        description="Atomic, cancellation-safe and crash-safe file changes.",
    )
    parser.add_argument("--version", action="version", version=f"atomictools {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    write = commands.add_parser(
        "write",
        help="atomically replace a file with what arrives on standard input",
        description=(
            "Read standard input to its end, then replace PATH with it atomically: readers "
            "see the old or the new file, never a partial one; an interrupted write changes "
            "nothing. Example: generate-config | atomictools write config.json"
        ),
    )
    write.add_argument("path", help="the file to create or replace")
    write.add_argument(
        "--durability",
        choices=[d.value for d in Durability],
        default=Durability.FULL.value,
        help="full (default): fsync before reporting success; fast: atomic but not fsynced",
    )
    write.add_argument("--create-only", action="store_true", help="refuse if PATH exists")
    write.add_argument(
        "--expected-sha256", help="refuse unless PATH currently has this sha256 (no lost updates)"
    )
    return parser


async def _write_from_stdin(args: argparse.Namespace) -> None:
    source = sys.stdin.buffer
    async with atomic_writer(
        args.path,
        durability=args.durability,
        expected_sha256=args.expected_sha256,
        create_only=args.create_only,
    ) as writer:
        while chunk := await anyio.to_thread.run_sync(source.read, _STDIN_CHUNK):
            await writer.write(chunk)
    print(f"wrote {args.path}: {writer.size} bytes, sha256 {writer.sha256}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "write":
            anyio.run(_write_from_stdin, args)
    except AtomicToolsError as err:
        print(f"atomictools: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("atomictools: interrupted; nothing was changed", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
