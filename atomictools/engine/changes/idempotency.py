"""Idempotency keys: a retried call with the same key gets the first call's result, not a redo.

A key's record holds a fingerprint of the call's arguments and the result to return. Records of
file changes live in a small SQLite store under the state directory; a change set carries its
``Receipt`` in its committed journal record, so the key is recorded either by the call itself
or by the recovery that finishes the change after a crash: never the change without the key.
Database tools keep their records in a table of the database they change, written in the same
transaction (``KEY_TABLE``). Records expire after a time-to-live and are pruned when new ones
are written.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atomictools.engine.durable import fsutil
from atomictools.engine.durable.locks import KeyedLocks, poll_until
from atomictools.engine.errors import (
    AtomicToolsError,
    InvalidArgumentError,
    StateDirError,
    sqlite_problem,
    state_dir_error,
)

DEFAULT_TTL_SECONDS = 24 * 3600.0
MAX_KEY_LENGTH = 200
STORE_NAME = "idempotency.sqlite3"
LOCK_NAME = "idempotency.lock"
KEY_TABLE = "atomictools_idempotency"
"""The table a database gets the first time a keyed db_execute/db_transaction changes it."""

_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {KEY_TABLE} ("
    "scope TEXT NOT NULL, key TEXT NOT NULL, fingerprint TEXT NOT NULL, result TEXT NOT NULL, "
    "created REAL NOT NULL, expires REAL NOT NULL, PRIMARY KEY (scope, key))"
)
_INDEX = f"CREATE INDEX IF NOT EXISTS {KEY_TABLE}_expires ON {KEY_TABLE} (expires)"


class IdempotencyKeyReusedError(AtomicToolsError):
    """The key was already used by a call with other arguments."""

    code = "idempotency_key_reused"


class InterruptedCallError(AtomicToolsError):
    """The key's first call was cut short by a crash and could be finished only in part."""

    code = "interrupted_call"


def failed_result(reason: str) -> str:
    """What a key records when its call can neither be returned as done nor redone."""
    return json.dumps({"failed": reason})


def raise_if_failed(key: str, result: str) -> str:
    """``result`` as stored, or the error a failed record stands for."""
    if result.startswith('{"failed"'):
        reason = json.loads(result)["failed"]
        raise InterruptedCallError(f"idempotency_key {key!r}: {reason}", changed=True)
    return result


def check_key(key: str) -> str:
    """A key is any short printable string the caller picks (a UUID is a good choice)."""
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise InvalidArgumentError(
            f"idempotency_key must be 1 to {MAX_KEY_LENGTH} printable characters "
            "(a UUID is a good choice)"
        )
    return key


def fingerprint(payload: Any) -> str:
    """A stable hash of a call's arguments (bytes are hashed, everything else JSON-encoded)."""

    def encode(value: Any) -> Any:
        if isinstance(value, bytes | bytearray | memoryview):
            return {"sha256": hashlib.sha256(value).hexdigest()}
        raise TypeError(f"cannot fingerprint {type(value).__name__}")

    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=encode)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Receipt:
    """A keyed call: where its key is recorded, and the arguments it must match."""

    store: str
    scope: str
    key: str
    fingerprint: str
    ttl: float = DEFAULT_TTL_SECONDS

    def as_record(self, result: str) -> dict[str, Any]:
        """What a committed journal record carries so recovery can record the key."""
        return {
            "store": self.store,
            "scope": self.scope,
            "key": self.key,
            "fingerprint": self.fingerprint,
            "ttl": self.ttl,
            "result": result,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> tuple[Receipt, str]:
        receipt = cls(
            str(record["store"]),
            str(record["scope"]),
            str(record["key"]),
            str(record["fingerprint"]),
            float(record["ttl"]),
        )
        return receipt, str(record["result"])


# -- the records, in any SQLite connection (the state store, or a user's database) ----------


def ensure_table(conn: sqlite3.Connection) -> None:
    conn.execute(_SCHEMA)
    conn.execute(_INDEX)


def lookup(conn: sqlite3.Connection, receipt: Receipt) -> str | None:
    """The stored result of ``key``, or None if it is unused (or expired).

    Raises when the key was used with other arguments: a retry must repeat the call exactly.
    """
    row = conn.execute(
        f"SELECT fingerprint, result FROM {KEY_TABLE} WHERE scope = ? AND key = ? AND expires > ?",
        (receipt.scope, receipt.key, time.time()),
    ).fetchone()
    if row is None:
        return None
    if row[0] != receipt.fingerprint:
        raise IdempotencyKeyReusedError(
            f"idempotency_key {receipt.key!r} was already used for a call with other arguments; "
            "repeat that call exactly to get its result, or use a new key for a new call"
        )
    return raise_if_failed(receipt.key, str(row[1]))


def insert(conn: sqlite3.Connection, receipt: Receipt, result: str) -> None:
    """Record a finished call, and drop expired records (cheap: ``expires`` is indexed)."""
    now = time.time()
    conn.execute(f"DELETE FROM {KEY_TABLE} WHERE expires <= ?", (now,))
    conn.execute(
        f"INSERT OR IGNORE INTO {KEY_TABLE} VALUES (?, ?, ?, ?, ?, ?)",
        (receipt.scope, receipt.key, receipt.fingerprint, result, now, now + receipt.ttl),
    )


# -- one call per key at a time, across processes ------------------------------------------

_LOCK_WAIT_FIRST = 0.001
_LOCK_WAIT_MAX = 0.02
_in_process = KeyedLocks()
_lock_fds: dict[str, int] = {}
"""One descriptor per key-lock file per process: closing any descriptor of a file drops every
POSIX record lock the process holds on it, so the file is opened once and kept open."""


def _lock_fd(path: Path) -> int:
    fd = _lock_fds.get(str(path))
    if fd is None:
        try:
            fsutil.make_dirs_durably(path.parent)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise state_dir_error(err, path.parent, "open the idempotency lock file in") from err
        _lock_fds[str(path)] = fd
    return fd


@contextlib.asynccontextmanager
async def key_locked(lock_file: Path, receipt: Receipt) -> AsyncIterator[None]:
    """Hold ``receipt``'s key against other processes: a record lock on one byte of
    ``lock_file``, chosen by the key's hash (released by the kernel if the holder dies).

    Record locks belong to the process, so same-key calls in this process (through any
    workspace) first take a process-wide in-memory lock. Waiting polls with back-off, which a
    cancel can interrupt.
    """
    digest = hashlib.sha256(f"{receipt.scope}\0{receipt.key}".encode()).digest()
    offset = int.from_bytes(digest[:7], "big")  # 2**56 bytes: collisions are negligible
    async with _in_process.hold((str(lock_file), offset)):
        fd = _lock_fd(lock_file)
        locked = False

        def attempt() -> bool:
            nonlocal locked
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
            except BlockingIOError:
                return False
            except OSError:  # no record locks here (some network file systems): go on without
                return True
            locked = True
            return True

        await poll_until(attempt, first=_LOCK_WAIT_FIRST, most=_LOCK_WAIT_MAX)
        try:
            yield
        finally:
            if locked:
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset)


# -- the state store for file changes ------------------------------------------------------


class IdempotencyStore:
    """The SQLite file under the state directory that holds file changes' keys.

    Every operation opens its own short-lived connection: calls come from the event loop,
    worker threads and recovery in other processes, and SQLite's own locking orders them.
    A record is committed with ``synchronous=FULL``: durable before the reply is sent.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            fsutil.make_dirs_durably(self.path.parent)
        except OSError as err:
            raise state_dir_error(err, self.path.parent, "create") from err
        try:
            conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        except sqlite3.Error as err:
            raise self._failure(err) from err
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            ensure_table(conn)
            yield conn
        except sqlite3.Error as err:
            raise self._failure(err) from err
        finally:
            conn.close()

    def _failure(self, err: sqlite3.Error) -> StateDirError:
        """The store failed: name the file, and what to do about it."""
        fix = {
            "damaged": "it is damaged: move it aside (the keys it held are forgotten, so a "
            "retry of an earlier keyed call would be made again), or pass --state-dir",
            "full": "the disk is full: free space on it",
            "unwritable": "its directory must be writable (not a read-only file system): fix "
            "it, or pass --state-dir (or set ATOMICTOOLS_STATE_DIR)",
            "other": "check that file system, or pass --state-dir",
        }[sqlite_problem(err)]
        return StateDirError(f"the idempotency key store {self.path} failed ({err}); {fix}")

    def lookup(self, receipt: Receipt) -> str | None:
        if not self.path.exists():
            return None
        with self._connect() as conn:
            try:
                return lookup(conn, receipt)
            except sqlite3.Error as err:
                raise self._failure(err) from err

    def record(self, receipt: Receipt, result: str) -> None:
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            insert(conn, receipt, result)
            conn.execute("COMMIT")
