"""Retention: pruning bounds what is kept, oldest first, and never removes content that an
entry inside the limits still needs (content is shared by hash between entries)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from atomictools.engine.config import Durability
from atomictools.engine.history.model import PathChange
from atomictools.engine.history.store import INLINE_BYTES, HistoryStore, KeptContent

POOL = [bytes([i]) * size for i, size in enumerate((10, 300, 5_000, INLINE_BYTES + 1, 200_000))]


def record(store: HistoryStore, n: int, old: bytes, source: Path) -> None:
    """An entry that replaced ``old`` (kept inline, or linked from ``source`` when large)."""
    sha = hashlib.sha256(old).hexdigest()
    if len(old) > INLINE_BYTES:
        source.write_bytes(old)
        fd = os.open(source.parent, os.O_RDONLY | os.O_DIRECTORY)
        kept = KeptContent(sha, len(old), dir_fd=fd, name=source.name)
    else:
        fd, kept = -1, KeptContent(sha, len(old), data=old)
    try:
        store.record(
            f"c{n}",
            "write",
            [PathChange(str(source), "file", "file", sha, len(old), "x" * 64, 1, blob=sha)],
            [kept],
            durability=Durability.FAST,
            pending=False,
            when=1000.0 + n,
        )
    finally:
        if fd >= 0:
            os.close(fd)


@settings(max_examples=40, deadline=None)
@given(
    olds=st.lists(st.sampled_from(range(len(POOL))), min_size=1, max_size=12),
    max_bytes=st.integers(min_value=0, max_value=500_000),
)
def test_pruning_keeps_the_newest_within_the_limit_and_everything_they_need(
    olds: list[int], max_bytes: int
) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch)
        store = HistoryStore(base / "state")
        try:
            for n, which in enumerate(olds):
                record(store, n, POOL[which], base / f"file{n}")
            store.prune(max_bytes=max_bytes, max_age=1e12, now=2000.0)
            assert store.kept_bytes() <= max_bytes
            entries = sorted(store.entries(), key=lambda e: e.seq)
            assert len(entries) == len(olds)  # bytes prune content, never entries
            flags = [e.paths[0].pruned for e in entries]
            # Oldest first: once an entry keeps its content, every newer one does too.
            assert flags == sorted(flags, reverse=True)
            for entry, which in zip(entries, olds, strict=True):
                if not entry.paths[0].pruned:
                    assert store.content(entry.paths[0].blob or "", 1 << 30) == POOL[which]
            # The newest entries are kept as far as the limit allows: keeping one more
            # (its content not already kept) would pass it.
            kept = {e.paths[0].blob for e in entries if not e.paths[0].pruned}
            newest_pruned = [e for e in entries if e.paths[0].pruned][-1:]
            for entry in newest_pruned:
                extra = POOL[olds[entries.index(entry)]]
                if hashlib.sha256(extra).hexdigest() not in kept:
                    assert store.kept_bytes() + len(extra) > max_bytes
        finally:
            store.close()


def test_pruning_by_age_drops_whole_entries_and_their_unshared_content(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "state")
    try:
        record(store, 0, POOL[4], tmp_path / "a")  # large: linked into blobs/
        record(store, 1, POOL[1], tmp_path / "b")
        record(store, 2, POOL[1], tmp_path / "c")  # shares b's content
        blobs = tmp_path / "state" / "history" / "blobs"
        assert len(list(blobs.iterdir())) == 1
        freed = store.prune(max_bytes=1 << 40, max_age=1000.0 - 0.5, now=2001.0)
        assert [e.id for e in store.entries()] == ["c2"]
        assert freed == len(POOL[4])  # POOL[1] is still needed by c2
        assert list(blobs.iterdir()) == []
        assert store.content(hashlib.sha256(POOL[1]).hexdigest(), 1 << 20) == POOL[1]
    finally:
        store.close()
