"""Where the engine's blocking system calls run: inline when small, in a worker thread when large.

Handing a call to a worker thread and back costs two wake-ups (measured at 0.15-0.2 ms per hop
on a 2-core VM), more than writing and fsyncing a 4 KiB file. So work on at most
``Limits.inline_io_bytes`` runs directly on the event loop: it blocks the loop for about as long
as one fsync, and cancellation still lands at the protocol's ``step`` checkpoints around it.
Anything larger, or of unknown size, runs in a worker thread so big files never stall the loop.
"""

from __future__ import annotations

import concurrent.futures
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


_alongside = concurrent.futures.ThreadPoolExecutor(
    max_workers=4, thread_name_prefix="atomictools-alongside"
)


def alongside(first: Callable[[], object], second: Callable[[], T]) -> T:
    """Run ``first`` in a worker thread while ``second`` runs here; return ``second``'s
    result once both are done (either one's exception is raised, ``second``'s first).

    For two fsyncs of different files that must both finish before a commit point: run side
    by side they cost about one fsync, and no thread hop goes back to the event loop (the
    caller blocks for as long as the slower one, as an inline fsync would).
    """
    future = _alongside.submit(first)
    try:
        result = second()
    finally:
        first_error = future.exception()  # waits for it: never leave it running unseen
    if first_error is not None:
        raise first_error
    return result
