"""Change-set markers in a PostgreSQL database, which servers on several machines may share.

The commit protocol is the one of ``markers`` (the COMMIT that inserts the set's marker is the
commit point). Two things differ. A marker names its journal record with the host it lives on
(``host:/path``): a record is a file on one machine, so only that machine may conclude from its
absence that the set is over. And the journal record keeps the transaction's id: a COMMIT whose
answer was lost may still be running on the server, so recovery first waits (bounded) until
``pg_xact_status`` says it ended, then reads the marker.

Recovery runs without the async driver: it uses psycopg's blocking connection, imported only
when a record names a PostgreSQL database (the driver is an optional extra).
"""

from __future__ import annotations

import importlib
import os
import socket
import time
from typing import Any

from atomictools.engine.changes.markers import MARKER_TABLE

WAIT_SECONDS = 30.0
"""How long recovery waits for a transaction the server is still committing."""


def host_prefix() -> str:
    return f"{socket.gethostname()}:"


def host_record(record: str) -> str:
    """A journal record's path as a marker names it: with this machine's name."""
    return f"{host_prefix()}{record}"


def record_gone(marker_record: str) -> bool:
    """Whether the record a marker of this host names is gone (its set is over)."""
    path = marker_record.removeprefix(host_prefix())
    return not os.path.lexists(path)


def decide(url: str, txid: str, xid: str | None) -> bool:
    """Recovery: did the set commit? Waits while the server is still committing it; raises
    (``psycopg.Error``, ``ImportError``, ``TimeoutError``) when it cannot tell."""
    with _connect(url) as conn:
        if xid is not None:
            deadline = time.monotonic() + WAIT_SECONDS
            while True:
                row = conn.execute("SELECT pg_xact_status(%s::xid8)", [xid]).fetchone()
                if row is None or row[0] != "in progress":
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"transaction {xid} is still committing on the server")
                time.sleep(0.1)
        exists = conn.execute("SELECT to_regclass(%s)", [MARKER_TABLE]).fetchone()
        if exists is None or exists[0] is None:
            return False
        found = conn.execute(f"SELECT 1 FROM {MARKER_TABLE} WHERE txid = %s", [txid]).fetchone()
        return found is not None


def drop(url: str, txid: str) -> None:
    """The set is over: its marker goes."""
    with _connect(url) as conn:
        exists = conn.execute("SELECT to_regclass(%s)", [MARKER_TABLE]).fetchone()
        if exists is not None and exists[0] is not None:
            conn.execute(f"DELETE FROM {MARKER_TABLE} WHERE txid = %s", [txid])


def _connect(url: str) -> Any:
    """A blocking connection (autocommit: each statement its own transaction). The URL has no
    password: libpq takes it from PGPASSWORD or a passfile, as the server did."""
    psycopg = importlib.import_module("psycopg")
    return psycopg.connect(url, autocommit=True, connect_timeout=10)
