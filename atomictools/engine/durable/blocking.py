"""Where the engine's blocking system calls run: inline when small, in a worker thread when large.

Handing a call to a worker thread and back costs two wake-ups (measured at 0.15-0.2 ms per hop
on a 2-core VM), more than writing and fsyncing a 4 KiB file. So work on at most
``Limits.inline_io_bytes`` runs directly on the event loop: it blocks the loop for about as long
as one fsync, and cancellation still lands at the protocol's ``step`` checkpoints around it.
Anything larger, or of unknown size, runs in a worker thread so big files never stall the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, TypeVarTuple, Unpack

import anyio.to_thread

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


async def run_blocking(inline: bool, func: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
    """Run ``func(*args)`` inline or in a worker thread; a thread hop finishes before a cancel."""
    if inline:
        return func(*args)
    return await anyio.to_thread.run_sync(func, *args)
