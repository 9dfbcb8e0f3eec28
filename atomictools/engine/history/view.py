"""The history as a reader of some roots sees it: their paths only, relative to their root.

Line counts (``+added/-removed``) are worked out here, when an entry is first listed, not when
the change is made (the write path stays cheap): the version before is the kept content, the
version after is kept content too once a later change replaced it, or the file as it is now.
They are cached in the store once known.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from atomictools.engine.errors import AtomicToolsError
from atomictools.engine.history.capture import line_counts
from atomictools.engine.history.model import HistoryEntry, PathChange
from atomictools.engine.history.store import HistoryStore
from atomictools.engine.sandbox import Sandbox, open_entry

COUNT_BYTES = 1024 * 1024
"""Versions larger than this get no line counts (a diff of them costs too much to list)."""


def entries_shown(
    sandbox: Sandbox,
    store: HistoryStore,
    prefixes: Sequence[str],
    *,
    since: float | None,
    limit: int | None,
    ids: Sequence[str] | None,
    database: bool,
) -> list[HistoryEntry]:
    """Entries that touched a path under ``prefixes`` (and, with ``database``, database
    calls), newest first, with only the paths inside the roots, shown relative to them."""
    shown = []
    for entry in store.entries(
        path_prefixes=prefixes, since=since, limit=limit, ids=ids, include_audit=database
    ):
        rows = []
        for n, row in enumerate(entry.paths):
            display = shown_path(sandbox, row.path)
            if display is None:
                continue
            counted = _with_counts(sandbox, store, entry.id, n, row) if row.added is None else row
            rows.append(dataclasses.replace(counted, path=display, moved_from=_shown(sandbox, row)))
        shown.append(dataclasses.replace(entry, paths=tuple(rows)))
    return shown


def shown_path(sandbox: Sandbox, path: str) -> str | None:
    """An absolute path as results show it (relative to its root), or None when it lies
    outside every root (by its spelling: it was resolved when the change was recorded)."""
    candidate = Path(path)
    for root in sandbox.roots:
        parts = root.contains(candidate)
        if parts is not None:
            return "/".join(parts) if parts else "."
    return None


def _shown(sandbox: Sandbox, row: PathChange) -> str | None:
    if row.moved_from is None:
        return None
    return shown_path(sandbox, row.moved_from) or row.moved_from


def _with_counts(
    sandbox: Sandbox, store: HistoryStore, change_id: str, n: int, row: PathChange
) -> PathChange:
    if row.before not in ("absent", "file") or row.after not in ("absent", "file"):
        return row
    before = _version(sandbox, store, row.path, (row.before, row.before_sha256, row.before_size))
    after = _version(sandbox, store, row.path, (row.after, row.after_sha256, row.after_size))
    counts = line_counts(before, after)
    if counts is None:
        return row
    with contextlib.suppress(AtomicToolsError):  # a cache only
        store.set_line_counts(change_id, n, *counts)
    return dataclasses.replace(row, added=counts[0], removed=counts[1])


def _version(
    sandbox: Sandbox,
    store: HistoryStore,
    path: str,
    version: tuple[str, str | None, int | None],
) -> bytes | None:
    """A version's bytes, from its (kind, sha256, size): empty when absent; kept content; or
    the file, if it still is that version."""
    kind, sha256, size = version
    if kind == "absent":
        return b""
    if sha256 is None or (size is not None and size > COUNT_BYTES):
        return None
    try:
        kept = store.content(sha256, COUNT_BYTES)
    except AtomicToolsError:
        return None
    if kept is not None:
        return kept
    try:
        with sandbox.resolve(path, follow_final=False) as location:
            st = location.lstat()
            if st is None or st.st_size > COUNT_BYTES:
                return None
            fd = open_entry(location)
            try:
                data = os.read(fd, COUNT_BYTES + 1)
            finally:
                os.close(fd)
    except (AtomicToolsError, OSError):
        return None
    return data if hashlib.sha256(data).hexdigest() == sha256 else None
