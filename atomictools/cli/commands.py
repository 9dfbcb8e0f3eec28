"""The ``atomictools`` command line: a thin layer that parses arguments and calls the library.

``serve`` runs the MCP server (stdio by default, or streamable HTTP), ``schemas`` writes or
checks ``schemas/``, ``write`` replaces a file atomically from standard input, ``history`` and
``undo`` list and take back recorded changes (``atomictools.cli.history``). Logs go to
standard error only: under stdio, standard output belongs to the MCP transport.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio

from atomictools import __version__
from atomictools.cli import history
from atomictools.engine import (
    DEFAULT_TTL_SECONDS,
    STATE_DIR_ENV,
    AtomicToolsError,
    DatabaseCatalog,
    Durability,
    RecoveryReport,
    Workspace,
    atomic_writer,
    spelled,
)

_STDIN_CHUNK = 1024 * 1024
LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]

TTY_HINT = """\
atomictools {version}: an MCP server, now waiting for an MCP client on stdin/stdout.
It is not meant to be typed at. Connect a client instead:
  - an agent host: paste this into its MCP servers configuration (`atomictools config` prints it):
{config}
  - the MCP Inspector:  npx @modelcontextprotocol/inspector {command}
Press Ctrl-D or Ctrl-C to stop.
"""


CLI_TERMS = {"expected_sha256": "--expected-sha256", "create_only": "--create-only"}
"""The engine's parameter names, as this command line spells its options."""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atomictools",
        description="Atomic, cancellation-safe and crash-safe file changes for AI agents.",
    )
    parser.add_argument("--version", action="version", version=f"atomictools {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the MCP server (stdio by default)",
        description="Serve the file tools over MCP, confined to the given roots.",
    )
    serve.add_argument(
        "--root",
        action="append",
        required=True,
        metavar="DIR",
        help="an allowed directory (repeat for several); relative paths resolve in the first",
    )
    serve.add_argument(
        "--db",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a database the tools may use by NAME: a SQLite file (created if missing) or a "
        "postgresql:// URL without its password (PGPASSWORD or a passfile gives it); repeatable",
    )
    serve.add_argument(
        "--allow-superuser",
        action="store_true",
        help="let a PostgreSQL --db connect as a superuser (refused by default)",
    )
    serve.add_argument("--read-only", action="store_true", help="refuse every change")
    serve.add_argument(
        "--durability",
        choices=[d.value for d in Durability],
        default=Durability.FULL.value,
        help="full (default): fsync before reporting success; fast: atomic but not fsynced",
    )
    serve.add_argument(
        "--tool-timeout",
        type=float,
        metavar="SECONDS",
        help="cancel any tool call that runs longer (nothing is changed by a timed-out call)",
    )
    serve.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback)")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    serve.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="HOST",
        help="an extra Host header value HTTP clients may use (DNS-rebinding protection)",
    )
    serve.add_argument(
        "--auth-token-env",
        metavar="VAR",
        help="require 'Authorization: Bearer <token>' over HTTP, the token read from $VAR",
    )
    serve.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="allow binding HTTP to a non-loopback address without --auth-token-env",
    )
    serve.add_argument("--log-level", choices=LOG_LEVELS, default="WARNING")
    serve.add_argument(
        "--state-dir",
        type=Path,
        help=(
            "where journals and idempotency keys live "
            f"(default: ${STATE_DIR_ENV} or the user state directory)"
        ),
    )
    serve.add_argument(
        "--idempotency-ttl",
        type=float,
        default=DEFAULT_TTL_SECONDS,
        metavar="SECONDS",
        help="how long a retry with the same idempotencyKey gets the first result (default 1 day)",
    )
    history.add_serve_flags(serve)

    recover = commands.add_parser(
        "recover",
        help="finish or undo interrupted changes and remove orphaned temp files",
        description=(
            "What a server does at start, on demand: roll interrupted change sets forward "
            "(or back with --rollback) from the journal, then remove temp files that no live "
            "process holds. A change set whose journal this run cannot read or trust (another "
            "state directory, a damaged record) is never deleted: it is reported, with what to "
            "run. Exit 0: clean; 1: something was fixed; 2: something needs a person."
        ),
    )
    recover.add_argument("roots", nargs="+", metavar="ROOT", type=Path)
    recover.add_argument("--dry-run", action="store_true", help="report, change nothing")
    recover.add_argument("--json", action="store_true", help="print the report as JSON")
    direction = recover.add_mutually_exclusive_group()
    direction.add_argument(
        "--rollback",
        action="store_true",
        help="undo interrupted change sets instead of finishing them (also those whose "
        "journal record is damaged, from their files, checked by hash)",
    )
    direction.add_argument(
        "--forward",
        action="store_true",
        help="finish change sets whose journal record is damaged, from their files (checked "
        "by hash); sets with a sound record are finished anyway",
    )
    recover.add_argument(
        "--state-dir",
        type=Path,
        help=f"where journals live (default: ${STATE_DIR_ENV} or the user state directory); "
        "use the --state-dir of the server that was interrupted",
    )

    history.add_commands(commands)

    config = commands.add_parser(
        "config",
        help="print the JSON an MCP host needs to start this server (absolute paths)",
        description=(
            "Print the mcpServers entry for this installation: the absolute path of this "
            "atomictools command and the serve arguments. Paste it into the host's MCP "
            "configuration (Claude Desktop, an IDE, ...). Arguments after -- are passed to serve."
        ),
    )
    config.add_argument(
        "--root", action="append", metavar="DIR", help="an allowed directory (default: .)"
    )
    config.add_argument("--name", default="atomictools", help="the server's name in the config")
    config.add_argument("serve_args", nargs=argparse.REMAINDER, help="-- then more serve flags")

    schemas = commands.add_parser(
        "schemas",
        help="write (or --check) schemas/: one JSON file per MCP tool",
        description="Generate the tool schemas from the code, or check they are up to date.",
    )
    schemas.add_argument("--check", action="store_true", help="fail if schemas/ is out of date")
    schemas.add_argument("--dir", default="schemas", type=Path, help="where (default: schemas)")

    commands.add_parser(
        "demo",
        help="a one-minute walkthrough of the guarantees, on a temporary directory",
        description=(
            "Start the real server over stdio on a temporary root and show, with timings and "
            "on-disk checks: an atomic write, a big write cancelled mid-way, a change set, a "
            "server killed in the middle of a change set and recovered, a cancelled "
            "database transaction, and a bad multi-file change taken back with one undo. "
            "Exit 1 if any guarantee shown did not hold."
        ),
    )

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


def _configure_logging(level: str) -> None:
    """Everything to stderr: under stdio, stdout carries the protocol."""
    logging.basicConfig(
        stream=sys.stderr, level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger().setLevel(level)


def _serve(args: argparse.Namespace) -> int:
    from atomictools.server import ServerOptions, create_server
    from atomictools.server.http import bind, http_app, is_loopback, serve_http
    from atomictools.server.stdio import run_stdio

    _configure_logging(args.log_level)
    try:
        workspace = Workspace(
            args.root,
            durability=args.durability,
            read_only=args.read_only,
            state_dir=args.state_dir,
            idempotency_ttl=args.idempotency_ttl,
            history=not args.no_history,
            history_max_bytes=args.history_max_bytes,
            history_max_age=args.history_max_age,
        )
        databases = dict(DatabaseCatalog.parse_option(value) for value in args.db)
    except ValueError as err:
        print(f"atomictools: {err}", file=sys.stderr)
        return 2
    options = ServerOptions(tool_timeout=args.tool_timeout)
    try:
        server = create_server(
            workspace, options, databases=databases, allow_superuser=args.allow_superuser
        )
    except ValueError as err:  # a --db that cannot work: say so now, not at its first use
        print(f"atomictools: {err}", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(args.log_level)
    if args.transport == "stdio":
        if sys.stdin.isatty():
            config = host_config(workspace.roots)
            entry = next(iter(config["mcpServers"].values()))  # type: ignore[attr-defined]
            shown = "\n".join(f"      {line}" for line in json.dumps(config, indent=2).splitlines())
            command = " ".join([entry["command"], *entry["args"]])
            print(
                TTY_HINT.format(version=__version__, config=shown, command=command),
                file=sys.stderr,
            )
        anyio.run(run_stdio, server)
        return 0
    token = os.environ.get(args.auth_token_env) if args.auth_token_env else None
    if args.auth_token_env and not token:
        print(f"atomictools: ${args.auth_token_env} is empty or unset", file=sys.stderr)
        return 2
    if not is_loopback(args.host) and not token and not args.allow_unauthenticated:
        print(
            f"atomictools: refusing to serve HTTP on {args.host} without a token; pass "
            "--auth-token-env VAR (or --allow-unauthenticated)",
            file=sys.stderr,
        )
        return 2
    try:
        listener = bind(args.host, args.port)
    except OSError as err:
        hint = (
            "another program is using that port: stop it, or choose another with --port"
            if err.errno == errno.EADDRINUSE
            else "check --host and --port"
        )
        print(
            f"atomictools: cannot listen on {args.host}:{args.port} ({err.strerror}); {hint}",
            file=sys.stderr,
        )
        return 2
    app = http_app(server, host=args.host, allowed_hosts=args.allowed_host, auth_token=token)
    print(http_banner(args.host, listener.getsockname()[1], args.auth_token_env), file=sys.stderr)
    anyio.run(lambda: serve_http(app, listener=listener, log_level=args.log_level))
    return 0


def http_banner(host: str, port: int, token_env: str | None) -> str:
    """The one line an HTTP server prints at start: where, and how to authenticate."""
    shown = f"[{host}]" if ":" in host else host
    access = (
        f"clients must send 'Authorization: Bearer <the token in ${token_env}>'"
        if token_env
        else "no token required (loopback only)"
    )
    url = f"http://{shown}:{port}/mcp"
    return f"atomictools {__version__}: MCP over streamable HTTP at {url}; {access}"


def _command() -> list[str]:
    """How to start this installation: its console script by absolute path, or the module."""
    script = Path(sys.argv[0])
    if script.name == "atomictools" and script.is_file() and os.access(script, os.X_OK):
        return [str(script.absolute())]
    beside = Path(sys.executable).parent / "atomictools"
    if beside.is_file():
        return [str(beside)]
    return [sys.executable, "-m", "atomictools"]


def host_config(
    roots: Sequence[str | os.PathLike[str]], extra: Sequence[str] = (), *, name: str = "atomictools"
) -> dict[str, object]:
    """The ``mcpServers`` entry that starts ``atomictools serve`` on ``roots``, as pasted."""
    command, *prefix = _command()
    flags = [arg for root in roots for arg in ("--root", os.path.abspath(os.fspath(root)))]
    return {"mcpServers": {name: {"command": command, "args": [*prefix, "serve", *flags, *extra]}}}


def _config(args: argparse.Namespace) -> int:
    extra = [arg for arg in args.serve_args if arg != "--"]
    config = host_config(args.root or ["."], extra, name=args.name)
    print(json.dumps(config, indent=2))
    return 0


def _recover(args: argparse.Namespace) -> int:
    try:
        workspace = Workspace(args.roots, state_dir=args.state_dir)
    except ValueError as err:
        print(f"atomictools: {err}", file=sys.stderr)
        return 2
    on_tty = sys.stderr.isatty() and not args.json

    def show_progress(scanned: int) -> None:
        if on_tty and scanned // 5000 != (scanned - 1) // 5000:
            print(f"\rscanning: {scanned:,} entries", end="", file=sys.stderr, flush=True)

    report = workspace.recover(
        rollback=args.rollback,
        forward=args.forward,
        dry_run=args.dry_run,
        on_progress=show_progress,
    )
    if on_tty:
        print(file=sys.stderr)
    if args.json:
        print(json.dumps({**report.as_dict(), "dryRun": args.dry_run}, indent=2))
    else:
        print(_recovery_table(report, args.dry_run))
    return report.exit_code


def _recovery_table(report: RecoveryReport, dry_run: bool) -> str:
    would = "would be " if dry_run else ""
    rows = [
        (f"change sets {would}rolled forward", report.rolled_forward),
        (f"change sets {would}rolled back", report.rolled_back),
        (f"temp files {would}removed", report.removed),
        ("change sets still in flight (left alone)", report.live),
        ("change sets touching other roots (left alone)", report.other_roots),
        ("needs a person", report.problems),
    ]
    if report.journals_unreadable:
        rows.append(("journal directory unreadable", [report.journals_unreadable]))
    lines = [f"{'what':<48} {'count':>6}", "-" * 55]
    lines += [f"{label:<48} {len(items):>6}" for label, items in rows]
    lines.append(f"{'entries scanned':<48} {report.scanned:>6}")
    for label, items in rows:
        lines += [f"  {label}: {item}" for item in items]
    verdict = {0: "clean", 1: "would fix" if dry_run else "fixed", 2: "needs attention"}[
        report.exit_code
    ]
    lines.append(f"result: {verdict}")
    return "\n".join(lines)


def _schemas(args: argparse.Namespace) -> int:
    from atomictools.server import create_server
    from atomictools.server import schemas as schema_files

    with_root = Workspace([Path.cwd()])
    generated = anyio.run(schema_files.tool_schemas, create_server(with_root))
    if args.check:
        problems = schema_files.drift(generated, args.dir)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print(
                "atomictools: schemas are out of date; run `atomictools schemas`", file=sys.stderr
            )
            return 1
        print(f"{len(generated)} tool schemas in {args.dir} are up to date", file=sys.stderr)
        return 0
    changed = schema_files.write(generated, args.dir)
    print(
        f"wrote {len(generated)} tool schemas to {args.dir} ({len(changed)} changed)",
        file=sys.stderr,
    )
    return 0


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


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The arguments; ``history`` and ``undo`` also take their positionals after options
    (``undo ROOT --state-dir S ID``), which argparse alone refuses for a ``+`` list."""
    parser = _build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command in ("history", "undo") and not any(w.startswith("-") for w in extra):
        history.take_positionals(args, extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "schemas":
            return _schemas(args)
        if args.command == "recover":
            return _recover(args)
        if args.command == "config":
            return _config(args)
        if args.command == "history":
            return history.run_history(args)
        if args.command == "undo":
            return history.run_undo(args)
        if args.command == "demo":
            from atomictools.cli.demo import run

            return anyio.run(run)
        anyio.run(_write_from_stdin, args)
    except AtomicToolsError as err:
        print(f"atomictools: {spelled(str(err), CLI_TERMS)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("atomictools: interrupted; nothing was changed", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
