"""The commit point of a change set that also changes a database: a marker row in that database.

A set with database steps commits by inserting its marker (``MARKER_TABLE``) in the same
transaction as its statements: the database's COMMIT is then the single commit point of the
files and the database together. Its journal record, written (``prepared``) just before, names
the database; recovery reads the marker to decide: present, the set committed and its files
are rolled forward; absent, it never did and they are rolled back.

A marker is needed only while its set's record exists: the set deletes it once finished, and
any set's transaction, or recovery, deletes markers whose record is gone (a crash between the
two). A marker never goes while its record exists, so recovery never reads a false "absent".
The functions here take a plain ``sqlite3`` connection: the database layer calls them inside
its own transaction, recovery on a connection of its own.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import time
from urllib.parse import quote

MARKER_TABLE = "atomictools_changesets"
"""One row per change set whose files are still being finished; users may not write it."""

_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {MARKER_TABLE} ("
    "txid TEXT PRIMARY KEY, record TEXT NOT NULL, created REAL NOT NULL)"
)
BUSY_SECONDS = 10.0
"""How long recovery waits for another process's writer before it gives up on a database."""


def _once(sql: str) -> str:
    """Our statement with a fresh nonce: SQLite asks the authorizer (which refuses users'
    changes to the table) only when it prepares a statement, so a text a user could send
    again must never be in the statement cache."""
    return f"{sql} /* atomictools {secrets.token_hex(16)} */"


class ForeignMarkerTableError(sqlite3.DatabaseError):
    """A table of that name that atomictools did not make (or that carries a trigger)."""


def insert(conn: sqlite3.Connection, txid: str, record: str) -> None:
    """Inside the set's transaction: its marker, and the markers of sets that are over.

    The table must be ours exactly: one a user made (or renamed onto the name) could swallow
    the insert (a trigger), and recovery would then read "never committed" for a set that did.
    """
    conn.execute(_once(_SCHEMA))
    _check_ours(conn)
    drop_stale(conn)
    inserted = conn.execute(
        _once(f"INSERT INTO {MARKER_TABLE} (txid, record, created) VALUES (?, ?, ?)"),
        (txid, record, time.time()),
    )
    if inserted.rowcount != 1:
        raise ForeignMarkerTableError(f"the insert into {MARKER_TABLE} did not add its row")


def decide(conn: sqlite3.Connection, txid: str, record: str) -> bool:
    """Inside a write transaction of its own, after the set's COMMIT reported an error: was
    the set's marker committed? The answer is made final by this transaction's own commit.

    A COMMIT whose WAL sync failed may have left its whole transaction in the WAL without
    telling the shared index; a later open would then find it after all. Committing this
    transaction (it always writes a row) writes over those frames, or restarts the WAL, so
    what is read here is what every later reader sees.
    """
    found = present(conn, txid)
    conn.execute(_once(_SCHEMA))
    conn.execute(
        _once(f"INSERT OR REPLACE INTO {MARKER_TABLE} (txid, record, created) VALUES (?, ?, ?)"),
        (decided_name(txid), record, time.time()),
    )
    return found


def decided_name(txid: str) -> str:
    """The row ``decide`` writes; it goes with the set's marker (or as stale, with its record)."""
    return f"{txid}/decided"


def _check_ours(conn: sqlite3.Connection) -> None:
    """Refuse a marker table that is not the one ``_SCHEMA`` makes, or that has a trigger."""
    row = conn.execute(
        "SELECT type, sql FROM sqlite_master WHERE name = ?", (MARKER_TABLE,)
    ).fetchone()
    triggers = conn.execute(
        "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ?",
        (MARKER_TABLE,),
    ).fetchone()[0]
    expected = _SCHEMA.replace("IF NOT EXISTS ", "")
    if row is None or row[0] != "table" or " ".join(str(row[1]).split()) != expected or triggers:
        raise ForeignMarkerTableError(
            f"{MARKER_TABLE} in this database was not made by atomictools (or has a trigger); "
            "it holds the commit markers of change sets, so rename or drop that table"
        )


def drop_stale(conn: sqlite3.Connection) -> int:
    """Markers whose journal record is gone: their sets are over (finished or recovered)."""
    if not _has_table(conn):
        return 0
    rows = conn.execute(f"SELECT txid, record FROM {MARKER_TABLE}").fetchall()
    stale = [(txid,) for txid, record in rows if not os.path.lexists(record)]
    conn.executemany(_once(f"DELETE FROM {MARKER_TABLE} WHERE txid = ?"), stale)
    return len(stale)


def delete(conn: sqlite3.Connection, txid: str) -> None:
    """The set is over: its marker goes (and the row ``decide`` may have written)."""
    if _has_table(conn):
        conn.execute(
            _once(f"DELETE FROM {MARKER_TABLE} WHERE txid IN (?, ?)"), (txid, decided_name(txid))
        )


def present(conn: sqlite3.Connection, txid: str) -> bool:
    """Whether the set's transaction committed (as seen by this connection)."""
    if not _has_table(conn):
        return False
    row = conn.execute(f"SELECT 1 FROM {MARKER_TABLE} WHERE txid = ?", (txid,)).fetchone()
    return row is not None


def _has_table(conn: sqlite3.Connection) -> bool:
    found = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (MARKER_TABLE,)
    ).fetchone()
    return found is not None


def connect(path: str) -> sqlite3.Connection:
    """Recovery's own connection: never creates the file (``mode=rw``), no implicit
    transactions, and a busy timeout (a live writer of another process may hold the lock)."""
    conn = sqlite3.connect(
        f"file:{quote(path)}?mode=rw",
        uri=True,
        isolation_level=None,
        timeout=BUSY_SECONDS,
        check_same_thread=False,
    )
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # not a database: raises
    except BaseException:
        conn.close()
        raise
    return conn
