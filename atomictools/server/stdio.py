"""The stdio transport with its pipes on the event loop.

The SDK's ``stdio_server`` reads and writes stdin/stdout through ``anyio.wrap_file``: a worker
thread hop for every line read, every write and every flush, about 0.45 ms of a small tool
call's 0.9 ms server CPU on a 2-core machine. On asyncio the pipes can be served by the loop's
own pipe transports instead; the SDK's framing and JSON-RPC stay as they are (we hand it
duck-typed files). Elsewhere (trio, stdin from a regular file) the SDK's transport is used.

Like the SDK, fd 0 and fd 1 point at the null device and at stderr while serving, so a stray
``print`` or a child process cannot corrupt the wire; they are restored on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from collections.abc import Callable, Iterator
from typing import Any, cast

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.stdio import stdio_server

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
    if wire is None:
        await server.run_stdio_async()
        return
    stdin, stdout, transports = wire
    lowlevel = server._lowlevel_server
    try:
        with _std_fds_diverted(), session:
            async with stdio_server(stdin=cast(Any, stdin), stdout=cast(Any, stdout)) as (
                read_stream,
                write_stream,
            ):
                options = lowlevel.create_initialization_options()
                await lowlevel.run(read_stream, write_stream, options)
        if session.cancelled_caught:
            logger.info("the client closed its end of stdout; calls in flight were cancelled")
    finally:
        with anyio.CancelScope(shield=True), contextlib.suppress(anyio.ClosedResourceError):
            await stdout.flush()  # what is queued still reaches the client
        for transport in transports:
            transport.close()
