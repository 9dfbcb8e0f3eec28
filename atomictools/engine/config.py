"""Settings shared by the engine, the server and the CLI: durability and size limits."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

STATE_DIR_ENV = "ATOMICTOOLS_STATE_DIR"

MiB = 1024 * 1024


def default_state_dir() -> Path:
    """Where journals (and later the idempotency store) live: never inside the roots.

    ``$ATOMICTOOLS_STATE_DIR`` if set, else the platform's user state directory.
    """
    override = os.environ.get(STATE_DIR_ENV)
    return Path(override) if override else Path(platformdirs.user_state_dir("atomictools"))


class Durability(enum.StrEnum):
    """How hard a change is pushed to stable storage before it is reported done.

    Both modes are atomic (readers see old or new, never a mix); only ``full`` also survives a
    power loss, because it fsyncs the file before the rename and the directory after it.
    """

    FULL = "full"
    FAST = "fast"


@dataclass(frozen=True, slots=True)
class Limits:
    """Upper bounds that keep one call from exhausting memory or producing an unsendable reply."""

    max_read_bytes: int = 32 * MiB
    """Largest file read whole (text or bytes), and largest text a read of some lines returns
    (head, tail, offset/limit read only the lines asked for, so the file may be larger)."""
    hash_partial_bytes: int = 256 * 1024
    """A file up to this size is read whole even for a read of some lines, so the reply still
    carries its sha256 (the source files agents edit are almost all smaller); such a read costs
    what reading the file whole does (1.5 ms at 256 KiB here). A larger file is read only as
    far as the lines need, and the reply's sha256 is None."""
    max_write_bytes: int = 64 * MiB
    """Largest content given in one call; the streaming writer has no such limit."""
    max_edits: int = 200
    max_list_entries: int = 10_000
    max_tree_entries: int = 10_000
    max_tree_depth: int = 64
    max_search_results: int = 10_000
    chunk_bytes: int = 1 * MiB
    """Granularity of streamed reads/writes: the memory a copy or a large write holds at once."""
    inline_io_bytes: int = 64 * 1024
    """Work on at most this many bytes runs on the event loop instead of a worker thread."""

    def inline(self, size: int | None) -> bool:
        """Whether I/O on ``size`` bytes (None: unknown) is small enough to run inline."""
        return size is not None and size <= self.inline_io_bytes
