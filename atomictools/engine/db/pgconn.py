"""PostgreSQL connections that a cancel cannot leave in an unknown state (psycopg 3, asyncio).

psycopg handles a cancelled await itself: it sends PostgreSQL's cancel request, then waits for
the server to stop. Under an anyio cancel scope that wait is cancelled again at once, so psycopg
gives up and closes the socket while the server goes on running the statement. ``guarded``
therefore runs every call in a shielded task and does the cancel itself: the cancel request for
exactly this backend, a bounded wait for the statement to stop, a bounded ROLLBACK, and, if the
connection still is not idle and clean, closing it (never returning it to the pool).

``url_conninfo`` keeps passwords off the command line: a URL that carries one is refused, and
libpq takes it from ``PGPASSWORD``, a passfile (``~/.pgpass``, ``PGPASSFILE``, ``?passfile=``).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import psycopg
from psycopg import conninfo
from psycopg.pq import TransactionStatus

from atomictools.engine.errors import InvalidArgumentError

logger = logging.getLogger("atomictools.engine.db.pgconn")

T = TypeVar("T")
Conn = psycopg.AsyncConnection[tuple[Any, ...]]
"""An async connection whose rows are tuples (psycopg's default row factory)."""
SCHEMES = ("postgresql://", "postgres://")
GRACE_SECONDS = 2.0
"""How long a cancelled call waits for the server to stop its statement, then to roll back."""
CHECK_INTERVAL_MS = 1000
"""``client_connection_check_interval``: a backend whose client died stops its query soon."""


def is_postgres_url(value: str) -> bool:
    return value.startswith(SCHEMES)


def url_conninfo(url: str) -> str:
    """The libpq connection string of a ``postgresql://`` URL; one with a password is refused
    (a command line is visible to every user in ``ps``)."""
    try:
        params = conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as err:
        raise InvalidArgumentError(
            f"{shown_url(url)} is not a valid PostgreSQL URL: {err}"
        ) from err
    if params.get("password"):
        raise InvalidArgumentError(
            f"{shown_url(url)} carries a password, which every user can read in `ps`; leave it "
            "out and give it in the environment (PGPASSWORD) or in a passfile (~/.pgpass, "
            "PGPASSFILE, or ?passfile=PATH in the URL)"
        )
    params.setdefault("application_name", "atomictools")
    options = str(params.get("options") or "")
    params["options"] = f"{options} -c client_connection_check_interval={CHECK_INTERVAL_MS}".strip()
    return conninfo.make_conninfo("", **params)


def shown_url(url: str) -> str:
    """The URL as messages show it: never with a password (in the user part or the query)."""
    shown = re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", url)
    head, sep, tail = shown.partition("://")
    if not sep or "@" not in tail.split("/", 1)[0]:
        return shown
    userinfo, _, rest = tail.partition("@")
    user = userinfo.split(":", 1)[0]
    return f"{head}://{user}:***@{rest}" if ":" in userinfo else shown


def clean(conn: Conn) -> bool:
    """Open, healthy and outside any transaction: fit to be used again."""
    return (
        not conn.closed
        and not conn.broken
        and conn.info.transaction_status == TransactionStatus.IDLE
    )


async def guarded(conn: Conn, op: Callable[[], Awaitable[T]]) -> T:
    """Await ``op()`` (calls on ``conn``). If the caller is cancelled meanwhile: cancel exactly
    this backend's statement, wait for ``op`` to end, roll back, all shielded and bounded; a
    connection that is still not clean is closed. Then the cancellation goes on."""
    done = anyio.Event()
    box: dict[str, object] = {}
    inner: list[anyio.CancelScope] = []

    async def run() -> None:
        with anyio.CancelScope(shield=True) as scope:  # psycopg never sees anyio's cancels
            inner.append(scope)
            try:
                box["result"] = await op()
            except BaseException as err:  # handed to the caller below
                box["error"] = err
            finally:
                done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        try:
            await done.wait()
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await _stop(conn, done, inner[0] if inner else None)
            raise
    if "error" in box:
        raise box["error"]  # type: ignore[misc]  # an exception, stored above
    return box["result"]  # type: ignore[return-value]  # op's result, stored above


async def _stop(conn: Conn, done: anyio.Event, scope: anyio.CancelScope | None) -> None:
    """Shielded: the cancel request, the wait, the rollback; close what is not clean."""
    with anyio.move_on_after(GRACE_SECONDS):
        try:
            await conn.cancel_safe(timeout=GRACE_SECONDS)
        except psycopg.Error as err:
            logger.info("cancel request failed: %s", err)
        await done.wait()
    if not done.is_set() and scope is not None:  # the server did not answer: drop the socket
        scope.cancel()
        await done.wait()
    if not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
        with anyio.move_on_after(GRACE_SECONDS):
            try:
                await conn.execute("ROLLBACK")
            except psycopg.Error as err:
                logger.info("rollback after a cancel failed: %s", err)
    if not clean(conn):
        await close_quietly(conn)


async def _reset(conn: Conn) -> bool:
    """Back to a fresh session before the next call: a function can SET a setting, make a
    temporary table or take a session lock that would otherwise outlive its call (shielded,
    bounded). False: the connection cannot be reused."""
    if not clean(conn):
        return False
    with anyio.CancelScope(shield=True), anyio.move_on_after(GRACE_SECONDS):
        try:
            await conn.execute("DISCARD ALL")
        except psycopg.Error as err:
            logger.info("resetting a connection failed: %s", err)
            return False
        return clean(conn)
    return False


async def close_quietly(conn: Conn) -> None:
    with anyio.CancelScope(shield=True), anyio.move_on_after(GRACE_SECONDS):
        try:
            await conn.close()
        except psycopg.Error as err:
            logger.info("closing a connection failed: %s", err)


class Pool:
    """A few connections of one kind (readers or writers), reused only when clean."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[Conn]],
        size: int,
        unavailable: Callable[[BaseException], Exception],
    ) -> None:
        self._connect = connect
        self._unavailable = unavailable
        self._idle: list[Conn] = []
        self._slots = anyio.Semaphore(size)

    @asynccontextmanager
    async def connection(
        self, start: Callable[[Conn], Awaitable[object]] | None = None
    ) -> AsyncIterator[Conn]:
        """A connection, with ``start(conn)`` (its BEGIN) already run. A pooled connection
        whose server went away meanwhile (a restart, a failover) fails at ``start``, before
        anything of the call was sent: it is dropped, and the call goes on on a new one."""
        async with self._slots:
            conn = None
            while self._idle and conn is None:
                candidate = self._idle.pop()
                if clean(candidate):
                    conn = candidate
                else:
                    await close_quietly(candidate)
            if conn is not None and start is not None:
                try:
                    await guarded(conn, functools.partial(start, conn))
                except psycopg.OperationalError:
                    if not (conn.broken or conn.closed):
                        raise
                    await close_quietly(conn)
                    conn = None
                else:
                    start = None
            if conn is None:
                conn = await self._connect()
                if start is not None:
                    try:
                        await guarded(conn, functools.partial(start, conn))
                    except BaseException as err:
                        await close_quietly(conn)
                        if isinstance(err, psycopg.OperationalError):
                            raise self._unavailable(err) from err
                        raise
            try:
                yield conn
            finally:
                if await _reset(conn):
                    self._idle.append(conn)
                else:
                    await close_quietly(conn)

    async def close(self) -> None:
        while self._idle:
            await close_quietly(self._idle.pop())
