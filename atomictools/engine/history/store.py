"""The history store: a SQLite file of entries plus the previous content they can restore.

It lives in ``<state dir>/history/``, never inside the roots, and is shared by every process
that uses the same state directory (SQLite orders their writes). Previous content is kept by
its sha256, once however many entries need it: up to ``INLINE_BYTES`` it is copied into the
database, so one WAL fsync makes the entry and the content durable together (a hard link would
need a directory fsync as well); a larger file is hard-linked into ``blobs/`` (copied when the
state directory is on another file system) and that directory is fsynced.

An entry is written ``pending`` before its change's commit point and made durable then, and
marked ``done`` right after (not synced: recovery can tell from the files, see ``reconcile``),
so after a crash a committed change has its entry and an uncommitted one has none.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atomictools.engine.config import Durability
from atomictools.engine.durable import fsutil
from atomictools.engine.errors import (
    StateDirError,
    TooLargeError,
    sqlite_problem,
    state_dir_error,
)
from atomictools.engine.history.model import Evidence, HistoryEntry, PathChange
from atomictools.engine.history.owner import this_process

INLINE_BYTES = 64 * 1024
"""Previous content up to this size is copied into the database (see the module doc)."""
HISTORY_DIR = "history"
SCHEMA_VERSION = 1
"""``PRAGMA user_version`` of the store; another is refused with what to do."""
DB_NAME = "history.sqlite3"
BLOBS_DIR = "blobs"
_COPY_CHUNK = 1024 * 1024

_FIXES = {
    "damaged": "it is damaged: move the history directory aside (its entries are forgotten), "
    "or start with --no-history",
    "full": "the disk is full: free space on it, or lower --history-max-bytes",
    "unwritable": "its directory must be writable: fix it, pass --state-dir, or --no-history",
    "other": "check that file system, pass --state-dir, or start with --no-history",
}
"""What to do when the store fails, by ``sqlite_problem``."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    time REAL NOT NULL,
    op TEXT NOT NULL,
    state TEXT NOT NULL,
    owner TEXT NOT NULL,
    undoes TEXT,
    audit TEXT,
    evidence TEXT
);
CREATE TABLE IF NOT EXISTS paths (
    change_id TEXT NOT NULL,
    n INTEGER NOT NULL,
    path TEXT NOT NULL,
    body TEXT NOT NULL,
    blob TEXT,
    PRIMARY KEY (change_id, n)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS paths_by_path ON paths (path);
CREATE TABLE IF NOT EXISTS blobs (
    sha256 TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    data BLOB,
    created REAL NOT NULL
) WITHOUT ROWID;
"""
"""Few indexes on purpose: each is one more page in every entry's fsynced commit. Entries are
found by id, by path, or in ``seq`` order (the order they were recorded); retention and the
kept-content totals scan, and run every few hundred changes."""


@functools.cache
def _our_objects() -> frozenset[tuple[str, str | None]]:
    """Every object the schema makes, with its SQL (SQLite's own key indexes have none)."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(_SCHEMA)
        return frozenset(conn.execute("SELECT name, sql FROM sqlite_master"))
    finally:
        conn.close()


@dataclass(frozen=True, slots=True)
class KeptContent:
    """Previous content to keep: its bytes in memory, or a file to link (or copy) from."""

    sha256: str
    size: int
    data: bytes | None = None
    dir_fd: int = -1
    name: str | None = None
    """The file in ``dir_fd`` (a backup member, or the very file about to be replaced)."""


def new_change_id() -> str:
    """Short enough to type, random enough to be unique across processes (the table checks)."""
    return secrets.token_hex(5)


class HistoryStore:
    """One state directory's history; one instance (and connection) per process and directory.

    Methods are synchronous and short; they are called from the event loop (small changes)
    and from worker threads, so one lock serialises them.
    """

    def __init__(self, state_dir: Path) -> None:
        self.directory = state_dir / HISTORY_DIR
        self.blobs = self.directory / BLOBS_DIR
        self._lock = threading.Lock()
        self._conns: dict[str, sqlite3.Connection] = {}
        """By ``synchronous`` setting: FULL commits are fsynced, OFF ones (marking entries done,
        caches) are not; a later FULL commit syncs the WAL with them."""
        self._blobs_fd = -1
        self.changes_since_prune = 0
        self.pruning = threading.Lock()
        """Held by the background retention pass (one at a time)."""

    # -- connection ------------------------------------------------------------------------

    def _connect(self, synchronous: str = "FULL") -> sqlite3.Connection:
        conn = self._conns.get(synchronous)
        if conn is not None:
            return conn
        if self._blobs_fd < 0:
            try:
                fsutil.make_dirs_durably(self.blobs)
                self._blobs_fd = os.open(self.blobs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as err:
                raise state_dir_error(err, self.directory, "create the history in") from err
        try:
            conn = sqlite3.connect(
                self.directory / DB_NAME,
                timeout=30.0,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={synchronous}")
            if not self._conns:
                self._check_schema(conn)
        except sqlite3.Error as err:
            raise self._failure(err) from err
        self._conns[synchronous] = conn
        return conn

    @property
    def _owner(self) -> str:
        return this_process()

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        """Create the tables in a new store; refuse one another version of atomictools made
        (its tables would not mean what this code reads)."""
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        found = set(conn.execute("SELECT name, sql FROM sqlite_master"))
        if version != 0 or not found <= _our_objects():
            conn.close()
            raise StateDirError(
                f"the history store {self.directory / DB_NAME} was made by another version of "
                f"atomictools (schema {version}; this one reads {SCHEMA_VERSION}): move the "
                "history directory aside (its entries are forgotten), or start with --no-history"
            )
        # One transaction: a crash (or a power cut) while the store is made leaves it empty,
        # never with tables and no version. Some of our tables and no version: a store made
        # by an earlier release one statement at a time, cut short; it is finished here.
        conn.executescript(
            f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
        )

    def ready(self) -> None:
        """Open the store now (raises ``StateDirError`` if it is damaged or cannot be made):
        a change set asks before its commit point, so it is refused instead of left half
        finished."""
        with self._lock:
            self._connect("FULL")

    def close(self) -> None:
        with self._lock:
            for conn in self._conns.values():
                conn.close()
            self._conns.clear()
            if self._blobs_fd >= 0:
                os.close(self._blobs_fd)
                self._blobs_fd = -1

    def _failure(self, err: sqlite3.Error) -> StateDirError:
        fix = _FIXES[sqlite_problem(err)]
        return StateDirError(f"the history store {self.directory / DB_NAME} failed ({err}); {fix}")

    @contextlib.contextmanager
    def _transaction(self, durability: Durability | None) -> Iterator[sqlite3.Connection]:
        """A write transaction; committed durably unless ``durability`` is FAST or None."""
        with self._lock:
            try:
                conn = self._connect("FULL" if durability is Durability.FULL else "OFF")
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as err:
                raise self._failure(err) from err

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._connect("OFF")
            try:
                yield conn
            except sqlite3.Error as err:
                raise self._failure(err) from err

    # -- writing entries -------------------------------------------------------------------

    def record(
        self,
        change_id: str,
        op: str,
        paths: Sequence[PathChange],
        kept: Sequence[KeptContent],
        *,
        durability: Durability,
        pending: bool,
        evidence: Sequence[Evidence] = (),
        undoes: Sequence[str] = (),
        when: float | None = None,
        audit: Mapping[str, Any] | None = None,
    ) -> None:
        """Write an entry with its kept content, durably (one WAL fsync, plus one of
        ``blobs/`` when a large file was linked). ``pending``: before the commit point.
        ``audit``: a set's database part (``database``, ``statements``, ``rows``)."""
        with self._transaction(durability) as conn:
            linked = False
            for content in kept:
                linked |= self._keep(conn, content)
            if linked and durability is Durability.FULL:
                try:
                    fsutil.sync_directory(self._blobs_fd)
                except OSError as err:
                    raise state_dir_error(err, self.blobs, "sync") from err
            conn.execute(
                "INSERT INTO changes (id, time, op, state, owner, undoes, evidence, audit) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    change_id,
                    time.time() if when is None else when,
                    op,
                    "pending" if pending else "done",
                    self._owner,
                    json.dumps(list(undoes)) if undoes else None,
                    json.dumps([e.to_json() for e in evidence]) if evidence else None,
                    json.dumps(dict(audit)) if audit is not None else None,
                ),
            )
            conn.executemany(
                "INSERT INTO paths (change_id, n, path, body, blob) VALUES (?, ?, ?, ?, ?)",
                [(change_id, n, p.path, _body(p), p.blob) for n, p in enumerate(paths)],
            )
        self.changes_since_prune += 1

    def record_audit(
        self, op: str, database: str, statements: Sequence[str], rows: int | None
    ) -> str:
        """A database call, after its commit: listed, not undoable."""
        change_id = new_change_id()
        audit = {"database": database, "statements": list(statements), "rows": rows}
        with self._transaction(Durability.FULL) as conn:
            conn.execute(
                "INSERT INTO changes (id, time, op, state, owner, audit) VALUES (?, ?, ?, ?, ?, ?)",
                (change_id, time.time(), op, "done", self._owner, json.dumps(audit)),
            )
        self.changes_since_prune += 1
        return change_id

    def add_path(self, change_id: str, n: int, path: PathChange, durability: Durability) -> None:
        """One more path of a pending entry (``mkdir -p``: each directory as it is made)."""
        with self._transaction(durability) as conn:
            conn.execute(
                "INSERT INTO paths (change_id, n, path, body, blob) VALUES (?, ?, ?, ?, ?)",
                (change_id, n, path.path, _body(path), path.blob),
            )

    def remove_path(self, change_id: str, n: int, durability: Durability) -> None:
        with self._transaction(durability) as conn:
            conn.execute("DELETE FROM paths WHERE change_id = ? AND n = ?", (change_id, n))

    def confirm(self, change_id: str) -> None:
        """The change passed its commit point. Not synced: if lost, recovery re-derives it."""
        with self._lock:
            try:  # one statement in autocommit mode: its own transaction
                self._connect("OFF").execute(
                    "UPDATE changes SET state = 'done', evidence = NULL WHERE id = ?",
                    (change_id,),
                )
            except sqlite3.Error as err:
                raise self._failure(err) from err

    def discard(self, change_id: str, durability: Durability = Durability.FULL) -> None:
        """The change never committed: its entry goes, with the content only it needed (a
        linked one is still the live file's inode: kept, it could change under the store)."""
        with self._transaction(durability) as conn:
            kept = [
                sha
                for (sha,) in conn.execute(
                    "SELECT DISTINCT blob FROM paths WHERE change_id = ? AND blob IS NOT NULL",
                    (change_id,),
                )
            ]
            conn.execute("DELETE FROM paths WHERE change_id = ?", (change_id,))
            conn.execute("DELETE FROM changes WHERE id = ?", (change_id,))
            for sha in kept:
                if not conn.execute("SELECT 1 FROM paths WHERE blob = ?", (sha,)).fetchone():
                    self._drop_blob(conn, sha)

    def _drop_blob(self, conn: sqlite3.Connection, sha: str) -> int:
        """Remove kept content (inside the write transaction); returns its size."""
        row = conn.execute(
            "SELECT size, data IS NOT NULL FROM blobs WHERE sha256 = ?", (sha,)
        ).fetchone()
        if row is None:
            return 0
        conn.execute("DELETE FROM blobs WHERE sha256 = ?", (sha,))
        if not row[1]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sha, dir_fd=self._blobs_fd)
        return int(row[0])

    def exists(self, change_id: str) -> bool:
        with self._reading() as conn:
            row = conn.execute("SELECT 1 FROM changes WHERE id = ?", (change_id,)).fetchone()
        return row is not None

    def set_line_counts(self, change_id: str, n: int, added: int, removed: int) -> None:
        """Cache a path's line counts, computed when first listed (not synced)."""
        with self._transaction(None) as conn:
            row = conn.execute(
                "SELECT body FROM paths WHERE change_id = ? AND n = ?", (change_id, n)
            ).fetchone()
            if row is None:
                return
            body = json.loads(row[0])
            body["added"], body["removed"] = added, removed
            conn.execute(
                "UPDATE paths SET body = ? WHERE change_id = ? AND n = ?",
                (json.dumps(body), change_id, n),
            )

    def _keep(self, conn: sqlite3.Connection, content: KeptContent) -> bool:
        """Store ``content`` under its sha256 unless it is kept already; True if a file was
        linked or copied into ``blobs/`` (which then needs a directory fsync)."""
        data = content.data
        if data is not None and len(data) <= INLINE_BYTES:
            conn.execute(
                "INSERT OR IGNORE INTO blobs (sha256, size, data, created) VALUES (?, ?, ?, ?)",
                (content.sha256, len(data), data, time.time()),
            )
            return False
        existing = conn.execute(
            "SELECT data IS NOT NULL FROM blobs WHERE sha256 = ?", (content.sha256,)
        ).fetchone()
        if existing is not None and (existing[0] or self._private(content.sha256, content.size)):
            return False
        if content.size <= INLINE_BYTES and content.name is not None:
            data = fsutil.read_at(content.dir_fd, content.name)
            conn.execute(
                "INSERT INTO blobs (sha256, size, data, created) VALUES (?, ?, ?, ?)",
                (content.sha256, len(data), data, time.time()),
            )
            return False
        self._link_or_copy(content, data)
        conn.execute(
            "INSERT OR REPLACE INTO blobs (sha256, size, data, created) VALUES (?, ?, NULL, ?)",
            (content.sha256, content.size, time.time()),
        )
        return True

    def _private(self, sha: str, size: int) -> bool:
        """Is the linked ``blobs/<sha>`` ours alone (one link, the right size)? Another link
        means it may still be someone's live file (a user's hard link): not trusted for reuse."""
        try:
            st = os.stat(sha, dir_fd=self._blobs_fd, follow_symlinks=False)
        except OSError:
            return False
        return st.st_nlink == 1 and st.st_size == size

    def _link_or_copy(self, content: KeptContent, data: bytes | None) -> None:
        """``blobs/<sha256>``: a hard link to the old inode, or a copy on another file system.

        Runs inside the write transaction, so a prune (which also holds it) never removes a
        file between its link and its row."""
        name = content.sha256
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self._blobs_fd)  # left by a transaction that rolled back
        try:
            if content.name is not None and content.dir_fd >= 0:
                try:
                    os.link(
                        content.name,
                        name,
                        src_dir_fd=content.dir_fd,
                        dst_dir_fd=self._blobs_fd,
                        follow_symlinks=False,
                    )
                    return
                except OSError as err:
                    if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                        raise
            self._copy_in(content, data, name)
        except OSError as err:
            raise state_dir_error(err, self.blobs, "keep the previous content in") from err

    def _copy_in(self, content: KeptContent, data: bytes | None, name: str) -> None:
        temp = f".{name}.{secrets.token_hex(4)}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=self._blobs_fd)
        try:
            if data is not None:
                fsutil.write_all(fd, data)
            else:
                assert content.name is not None
                src = os.open(content.name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=content.dir_fd)
                try:
                    while chunk := os.read(src, _COPY_CHUNK):
                        fsutil.write_all(fd, chunk)
                finally:
                    os.close(src)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=self._blobs_fd)
            raise
        os.close(fd)
        os.replace(temp, name, src_dir_fd=self._blobs_fd, dst_dir_fd=self._blobs_fd)

    # -- reading ---------------------------------------------------------------------------

    def entries(
        self,
        *,
        path_prefixes: Sequence[str] | None = None,
        since: float | None = None,
        until: float | None = None,
        ids: Sequence[str] | None = None,
        limit: int | None = None,
        include_pending: bool = False,
        include_audit: bool = False,
    ) -> list[HistoryEntry]:
        """Entries newest first. ``path_prefixes``: only changes that touched a path equal
        to or below one of them (absolute), and with ``include_audit`` database calls."""
        where = [] if include_pending else ["state = 'done'"]
        args: list[Any] = []
        if since is not None:
            where.append("time >= ?")
            args.append(since)
        if until is not None:
            where.append("time <= ?")
            args.append(until)
        if ids is not None:
            where.append(f"id IN ({','.join('?' * len(ids))})")
            args.extend(ids)
        if path_prefixes is not None:
            tests = []
            for prefix in path_prefixes:
                # Below ``prefix``: between "prefix/" and "prefix0" ("0" follows "/"), a range
                # the path index serves.
                tests.append("(p.path = ? OR (p.path >= ? AND p.path < ?))")
                base = prefix.rstrip("/")
                args.extend([prefix, base + "/", base + "0"])
            touched = (
                "id IN (SELECT change_id FROM paths p WHERE " + " OR ".join(tests or ["0"]) + ")"
            )
            where.append(f"({touched} OR audit IS NOT NULL)" if include_audit else touched)
        sql = "SELECT seq, id, time, op, state, undoes, audit FROM changes"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        with self._reading() as conn:
            rows = conn.execute(sql, args).fetchall()
            return [self._entry(conn, row) for row in rows]

    def pending(self) -> list[tuple[HistoryEntry, str, list[Evidence]]]:
        """Entries not confirmed yet, with their writer (see ``owner``) and evidence."""
        with self._reading() as conn:
            rows = conn.execute(
                "SELECT seq, id, time, op, state, undoes, audit, owner, evidence FROM changes "
                "WHERE state = 'pending' ORDER BY seq"
            ).fetchall()
            result = []
            for row in rows:
                evidence = [Evidence.from_json(e) for e in json.loads(row[8] or "[]")]
                result.append((self._entry(conn, row[:7]), str(row[7]), evidence))
            return result

    def _entry(self, conn: sqlite3.Connection, row: tuple[Any, ...]) -> HistoryEntry:
        seq, change_id, when, op, state, undoes, audit = row
        paths = []
        for body, blob in conn.execute(
            "SELECT body, blob FROM paths WHERE change_id = ? ORDER BY n", (change_id,)
        ):
            fields = json.loads(body)
            fields["blob"] = blob
            fields["pruned"] = fields.get("blob_wanted", False) and blob is None
            fields.pop("blob_wanted", None)
            paths.append(PathChange.from_json(fields))
        audit_fields = json.loads(audit) if audit else {}
        return HistoryEntry(
            id=change_id,
            seq=int(seq),
            time=float(when),
            op=op,
            paths=tuple(paths),
            undoes=tuple(json.loads(undoes)) if undoes else (),
            database=audit_fields.get("database"),
            statements=tuple(audit_fields.get("statements", ())),
            rows_changed=audit_fields.get("rows"),
            state=state,
        )

    def content(self, sha256: str, max_bytes: int) -> bytes | None:
        """Kept content by its hash, checked against it; None if it is gone or was altered."""
        with self._reading() as conn:
            row = conn.execute(
                "SELECT size, data FROM blobs WHERE sha256 = ?", (sha256,)
            ).fetchone()
        if row is None:
            return None
        size, data = row
        if data is None:
            if size > max_bytes:
                raise_too_large(size, max_bytes)
            try:
                data = fsutil.read_at(self._blobs_fd, sha256)
            except OSError:
                return None
        data = bytes(data)
        return data if hashlib.sha256(data).hexdigest() == sha256 else None

    # -- retention -------------------------------------------------------------------------

    def prune(self, *, max_bytes: int, max_age: float, now: float | None = None) -> int:
        """Drop entries older than ``max_age`` seconds, then the kept content of the oldest
        entries until what is kept fits ``max_bytes`` (those entries stay listed, marked as
        no longer undoable), then content no entry needs. Returns the bytes freed.

        Content is shared by hash, so a blob goes only when no remaining path row wants it:
        pruning never removes what an entry inside the limits still needs.
        """
        now = time.time() if now is None else now
        with self._transaction(Durability.FULL) as conn:
            conn.execute(
                "DELETE FROM paths WHERE change_id IN "
                "(SELECT id FROM changes WHERE time < ? AND state = 'done')",
                (now - max_age,),
            )
            conn.execute("DELETE FROM changes WHERE time < ? AND state = 'done'", (now - max_age,))
            cutoff = _oldest_kept(conn, max_bytes)
            if cutoff is not None:
                conn.execute(
                    "UPDATE paths SET blob = NULL WHERE blob IS NOT NULL AND change_id IN "
                    "(SELECT id FROM changes WHERE seq < ? AND state = 'done')",
                    (cutoff,),
                )
            unneeded = conn.execute(
                "SELECT sha256 FROM blobs WHERE sha256 NOT IN "
                "(SELECT blob FROM paths WHERE blob IS NOT NULL)"
            ).fetchall()
            freed = sum(self._drop_blob(conn, sha) for (sha,) in unneeded)
        self.changes_since_prune = 0
        return freed

    def kept_bytes(self) -> int:
        with self._reading() as conn:
            return _kept_bytes(conn)


def _oldest_kept(conn: sqlite3.Connection, max_bytes: int) -> int | None:
    """The ``seq`` of the oldest entry whose content still fits in ``max_bytes`` when the
    newest entries' content is counted first (each distinct content once); None if it all
    fits. One pass over the kept content, newest first."""
    seen: set[str] = set()
    total = 0
    rows = conn.execute(
        "SELECT c.seq, p.blob, b.size FROM changes c JOIN paths p ON p.change_id = c.id "
        "JOIN blobs b ON b.sha256 = p.blob WHERE c.state = 'done' ORDER BY c.seq DESC"
    )
    for seq, sha, size in rows:
        if sha in seen:
            continue
        seen.add(sha)
        total += int(size)
        if total > max_bytes:
            # This entry's content does not fit: it and every older entry lose theirs (an
            # entry keeps all of its content or none).
            return int(seq) + 1
    return None


def _kept_bytes(conn: sqlite3.Connection) -> int:
    """Bytes of content that some entry still wants (what ``max_bytes`` bounds)."""
    row = conn.execute(
        "SELECT COALESCE(SUM(size), 0) FROM blobs WHERE sha256 IN "
        "(SELECT blob FROM paths WHERE blob IS NOT NULL)"
    ).fetchone()
    return int(row[0])


def _body(path: PathChange) -> str:
    """A path row's JSON; ``blob_wanted`` remembers that content was kept, once pruned."""
    body = path.to_json()
    body.pop("pruned")
    body["blob_wanted"] = body.pop("blob") is not None
    return json.dumps(body)


def raise_too_large(size: int, max_bytes: int) -> None:
    raise TooLargeError(
        f"the kept version is {size} bytes, more than the {max_bytes} bytes one change may "
        "write; restore it by hand from the history store"
    )


_stores: dict[str, HistoryStore] = {}
_stores_lock = threading.Lock()
MAX_OPEN_STORES = 8
"""Stores kept open per process; the least recently used one beyond this is closed (it
reconnects if used again), so a process that meets many state directories keeps few files."""


_real: dict[str, str] = {}


def store_for(state_dir: Path) -> HistoryStore:
    """This process's store for ``state_dir`` (one connection shared by all workspaces)."""
    given = str(state_dir)
    key = _real.get(given)
    if key is None:
        key = _real[given] = os.path.realpath(state_dir)
    with _stores_lock:
        store = _stores.pop(key, None)
        if store is None:
            store = HistoryStore(Path(key))
        _stores[key] = store  # most recently used last
        while len(_stores) > MAX_OPEN_STORES:
            _stores.pop(next(iter(_stores))).close()
        return store
