"""The stdio transport with its pipes on the event loop.

The SDK's ``stdio_server`` reads and writes stdin/stdout through ``anyio.wrap_file``: a worker
thread hop for every line read, every write and every flush, about 0.45 ms of a small tool
call's 0.9 ms server CPU on a 2-core machine. On asyncio the pipes are served by the loop's
own pipe transports instead, and each line goes to the SDK's low-level server as the SDK's
transport would hand it over (one JSON-RPC message per line, validated by the SDK's message
model), minus one task hand-over. Elsewhere (trio, stdin from a regular file) the SDK's
transport is used.

Like the SDK, fd 0 and fd 1 point at the null device and at stderr while serving, so a stray
``print`` or a child process cannot corrupt the wire; they are restored on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
from collections.abc import Callable, Iterator
from typing import Any

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.stdio import stdio_server
from mcp.shared.message import SessionMessage
from mcp.types import (
    INVALID_REQUEST,
    PARSE_ERROR,
    ErrorData,
    JSONRPCError,
    jsonrpc_message_adapter,
)
from pydantic import ValidationError

logger = logging.getLogger(__name__)
MAX_LINE_BYTES = 1 << 30
"""The longest JSON-RPC line read (a 64 MiB write escaped as JSON is far below this)."""


class _LineReader:
    """``async for line in stdin``: what the SDK's reader loop needs of a file."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader

    def __aiter__(self) -> _LineReader:
        return self

    async def __anext__(self) -> str:
        line = await self._reader.readline()
        if not line:
            raise StopAsyncIteration
        return line.decode("utf-8", errors="replace")


class _LineWriter:
    """``await stdout.write(text)`` then ``await stdout.flush()``, on the loop's pipe transport.

    When the client stops reading (its end of the pipe is closed), ``on_lost`` ends the
    session the way a closed stdin does, instead of an unhandled error and a traceback.
    """

    def __init__(self, writer: asyncio.StreamWriter, on_lost: Callable[[], None]) -> None:
        self._writer = writer
        self._on_lost = on_lost

    async def write(self, text: str) -> None:
        self._writer.write(text.encode("utf-8"))

    async def flush(self) -> None:
        try:
            await self._writer.drain()
        except ConnectionError as err:
            self._on_lost()
            raise anyio.ClosedResourceError from err  # the SDK's writer ends quietly on this


@contextlib.contextmanager
def _std_fds_diverted() -> Iterator[None]:
    """fd 0 -> /dev/null and fd 1 -> stderr while serving (the wire has its own duplicates)."""
    saved_in, saved_out = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(null, 0)
        os.dup2(2, 1)
        yield
    finally:
        os.close(null)
        os.dup2(saved_in, 0)
        os.dup2(saved_out, 1)
        os.close(saved_in)
        os.close(saved_out)


async def _open_wire(
    on_lost: Callable[[], None],
) -> tuple[_LineReader, _LineWriter, list[asyncio.BaseTransport]] | None:
    """The loop's transports on duplicates of fd 0 and 1, or None where they cannot serve them."""
    if not (_is_stream(0) and _is_stream(1)):
        return None
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE_BYTES)
    wire_in = os.fdopen(os.dup(0), "rb", 0)
    wire_out = os.fdopen(os.dup(1), "wb", 0)
    try:
        read_transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), wire_in
        )
    except (ValueError, OSError):  # "Pipe transport is only for pipes, sockets and ..."
        wire_in.close()
        wire_out.close()
        return None
    try:
        write_transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, wire_out
        )
    except (ValueError, OSError):
        read_transport.close()
        wire_out.close()
        return None
    writer = asyncio.StreamWriter(write_transport, protocol, None, loop)
    return _LineReader(reader), _LineWriter(writer, on_lost), [read_transport, write_transport]


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # trio
        return False
    return True


def _is_stream(fd: int) -> bool:
    """A pipe, socket or terminal: what the loop's pipe transports can serve."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode)


async def run_stdio(server: MCPServer[Any]) -> None:
    """Serve ``server`` on stdin/stdout until the client closes stdin."""
    session = anyio.CancelScope()
    wire = await _open_wire(session.cancel) if _on_asyncio() else None
    if wire is None:  # the SDK's own transport (trio, or stdin from a regular file)
        async with stdio_server() as (read_stream, write_stream):
            await _serve(server, read_stream, write_stream)
        return
    stdin, stdout, transports = wire
    try:
        with _std_fds_diverted(), session:
            await _serve_lines(server, stdin, stdout)
        if session.cancelled_caught:
            logger.info("the client closed its end of stdout; calls in flight were cancelled")
    finally:
        with anyio.CancelScope(shield=True), contextlib.suppress(anyio.ClosedResourceError):
            await stdout.flush()  # what is queued still reaches the client
        for transport in transports:
            transport.close()


async def _serve(server: MCPServer[Any], read_stream: Any, write_stream: Any) -> None:
    """The low-level server on the wire, with unreadable lines answered (not dropped)."""
    lowlevel = server._lowlevel_server
    to_server, inbound = anyio.create_memory_object_stream[Any](0)
    async with anyio.create_task_group() as tasks:

        async def forward() -> None:
            async with to_server, read_stream:
                async for item in read_stream:
                    if isinstance(item, Exception):
                        await _answer_unreadable(write_stream, item)
                    else:
                        await to_server.send(item)

        tasks.start_soon(forward)
        options = lowlevel.create_initialization_options()
        await lowlevel.run(inbound, write_stream, options)
        tasks.cancel_scope.cancel()


LARGE_LINE = 64 * 1024
"""From this length on, a line is parsed by ``json.loads`` before the message is validated."""


def _parse(line: str) -> Any:
    """One JSON-RPC message from one line, validated as the SDK validates it.

    pydantic's JSON mode builds the arguments once for every member of the message union it
    tries: a 10,000-statement ``db_transaction`` line took 49 ms, against 21 ms for the
    standard library's parser followed by validation of the parsed value. A short line is
    faster the SDK's way. A line the standard parser refuses goes the SDK's way too, so it gets
    the same answer (both accept NaN and Infinity, as the SDK's parser does).
    """
    if len(line) >= LARGE_LINE:
        try:
            data = json.loads(line)
        except ValueError:
            pass
        else:
            return jsonrpc_message_adapter.validate_python(data, by_name=False)
    return jsonrpc_message_adapter.validate_json(line, by_name=False)


async def _serve_lines(server: MCPServer[Any], stdin: _LineReader, stdout: _LineWriter) -> None:
    """The low-level server on the loop's pipes: each line parsed and handed straight to it.

    What the SDK's ``stdio_server`` plus ``_serve`` do, with one hand-over instead of two
    between the pipe and the server (each a task switch of every call).
    """
    lowlevel = server._lowlevel_server
    to_server, inbound = anyio.create_memory_object_stream[Any](0)
    outbound, from_server = anyio.create_memory_object_stream[SessionMessage](0)
    async with anyio.create_task_group() as tasks:

        async def read() -> None:
            async with to_server:
                async for line in stdin:
                    try:
                        message = _parse(line)
                    except Exception as err:  # what the SDK's reader hands on, answered here
                        await _answer_unreadable(outbound, err)
                        continue
                    await to_server.send(SessionMessage(message))

        async def write() -> None:
            async with from_server:
                async for item in from_server:
                    dumped = item.message.model_dump_json(by_alias=True, exclude_unset=True)
                    await stdout.write(dumped)  # not dumped + "\n": a large reply copied again
                    await stdout.write("\n")
                    try:
                        await stdout.flush()
                    except anyio.ClosedResourceError:
                        return  # the client stopped reading: the session is being ended

        tasks.start_soon(read)
        tasks.start_soon(write)
        options = lowlevel.create_initialization_options()
        await lowlevel.run(inbound, outbound, options)
        tasks.cancel_scope.cancel()


async def _answer_unreadable(write_stream: Any, err: Exception) -> None:
    """JSON-RPC 2.0: a line that is not JSON gets a parse error, JSON that is not a message an
    invalid-request error, both with a null id (the id could not be read)."""
    parse = isinstance(err, ValidationError) and any(
        e.get("type") == "json_invalid" for e in err.errors()
    )
    code, what = (PARSE_ERROR, "Parse error") if parse else (INVALID_REQUEST, "Invalid Request")
    logger.info("answered an unreadable line with %s", what)
    reply = JSONRPCError(
        jsonrpc="2.0",
        id=None,
        error=ErrorData(code=code, message=f"{what}: the line is not a JSON-RPC 2.0 message"),
    )
    with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
        await write_stream.send(SessionMessage(reply))
