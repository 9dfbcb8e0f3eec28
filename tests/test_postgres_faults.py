"""The PostgreSQL backend under faults, against a real server (``tests/pgserver.py``), no mocks.

* Two real ``atomictools serve`` processes (two machines: own roots, own state directories)
  on one database: concurrent transfers keep every balance exact and the total; a counter
  incremented N times with ``n = n + 1`` from both ends at N (no lost update); a call with an
  idempotency key on one server and then on the other, and concurrently on both, applies once
  and answers the same everywhere; the same key with other statements is refused.
* SIGKILL of the server while its ``db_transaction`` sleeps in ``pg_sleep(30)``: rolled back,
  and within seconds no session of ``app`` is left idle in a transaction or still sleeping.
* PostgreSQL stopped hard (``immediate``) while a COMMIT runs (made slow by a deferred
  constraint trigger that sleeps at COMMIT): the API raises ``CommitUnknownError`` and the
  tool answers ``isError``, both saying the outcome is unknown and to retry with the same
  idempotency key; after the restart the data is all or nothing, and that retry applies it
  exactly once. The server's session serves the calls after the restart (its pooled
  connections died with the old server).
* Cancels at many delays during long transactions (anyio cancel scopes around the API, by
  ``CancelScope.cancel()`` and by deadline, and the MCP tool in legacy mode): rolled back, the
  backend's statement stopped at once, the next call served, and no connection leaked.
* Refused statements raise before anything runs (a sequence's ``nextval`` is not
  transactional: it would show any statement that ran).
* Change sets of files and a PostgreSQL step (``tests/postgres_child.py``): both applied; a
  failing statement leaves the files untouched; SIGKILL of a child at each named crash point
  (the first passage of each, the last of a repeated one), then ``atomictools.recover``: files
  and database both before (up to ``changeset.marked``) or both after, no marker row left by
  recovery (but the stale one of a kill at ``changeset.finished``), none after the next set.

``ATOMICTOOLS_PG_FAULTS_SEED`` replays the transfers of the two-server test.

psycopg's async connections run on asyncio only: every test here pins the backend to it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("psycopg")
pytest.importorskip("pglast")

from mcp import Client, StdioServerParameters
from mcp.shared.exceptions import MCPError
from mcp.types import CallToolResult, TextContent

import atomictools
from atomictools import (
    AtomicToolsError,
    Change,
    CommitUnknownError,
    Statement,
    Workspace,
)
from atomictools.engine.config import STATE_DIR_ENV
from atomictools.engine.db.dberrors import StatementError
from atomictools.engine.db.postgres import POOL_SIZE, PgDatabase
from atomictools.engine.durable.steps import CRASH_ENV, CRASH_SIGNAL_ENV
from atomictools.server import create_server
from tests import postgres_child as scenario
from tests.conftest import tree_snapshot
from tests.pgserver import APP_USER, PgCluster
from tests.pgserver import PgDatabase as ClusterDatabase

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs POSIX processes"),
]

DB = "main"
CHILD = Path(__file__).with_name("postgres_child.py")
CHILD_TIMEOUT = 60.0
RUN_TIMEOUT = 90.0
SEED = int(os.environ.get("ATOMICTOOLS_PG_FAULTS_SEED", str(random.SystemRandom().getrandbits(32))))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- helpers ------------------------------------------------------------------------------------

Row = tuple[int, str | None, str | None]
"""A session of role app: (pid, state, query)."""


def text_of(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


def sessions(cluster: PgCluster, database: str) -> list[Row]:
    """The client sessions of role app on ``database`` (seen by the superuser)."""
    with cluster.admin() as conn:
        rows = conn.execute(
            "SELECT pid, state, query FROM pg_stat_activity WHERE usename = %s "
            "AND datname = %s AND backend_type = 'client backend'",
            [APP_USER, database],
        ).fetchall()
    return [(int(pid), state, query) for pid, state, query in rows]


def sleeping(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r[1] == "active" and "pg_sleep" in (r[2] or "")]


def lingering(rows: list[Row]) -> list[Row]:
    """Sessions a dead or cancelled call would leave: still sleeping, or in a transaction."""
    return sleeping(rows) + [r for r in rows if (r[1] or "").startswith("idle in transaction")]


def committing(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r[1] == "active" and (r[2] or "").strip().upper() == "COMMIT"]


async def wait_for(
    cluster: PgCluster, database: str, done: Callable[[list[Row]], object], timeout: float
) -> tuple[float, list[Row]]:
    """Poll the sessions until ``done(rows)``; the seconds it took and the last rows (the
    caller asserts ``done`` on them: at the timeout they are the reason)."""
    began = time.monotonic()
    while True:
        rows = await anyio.to_thread.run_sync(sessions, cluster, database)
        if done(rows) or time.monotonic() - began > timeout:
            return time.monotonic() - began, rows
        await anyio.sleep(0.05)


def fetch(database: ClusterDatabase, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Rows read back with a plain connection of the test's own."""
    with database.connect(autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def setup(database: ClusterDatabase, *statements: str) -> None:
    with database.connect(autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def child_pid_with_arg(arg: str) -> int:
    """Our child process with ``arg`` among its arguments (found through /proc)."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == me and arg.encode() in cmdline:
            return int(entry)
    raise AssertionError(f"no child process with {arg!r}")


def machine(base: Path) -> tuple[Path, Path]:
    """A root and a state directory of their own: what a server on another machine has."""
    root, state = base / "root", base / "state"
    root.mkdir(parents=True)
    state.mkdir()
    return root, state


def serve_params(root: Path, state: Path, database: ClusterDatabase) -> StdioServerParameters:
    """A real ``atomictools serve`` with ``--db main=postgresql://app@...`` (no password in
    the URL: PGPASSWORD in its environment)."""
    args = ["-m", "atomictools", "serve", "--root", str(root), "--state-dir", str(state)]
    return StdioServerParameters(
        command=sys.executable,
        args=[*args, "--db", f"{DB}={database.dsn}"],
        env={**database.env(), STATE_DIR_ENV: str(state)},
    )


def transaction_args(statements: list[tuple[str, Any]], key: str | None = None) -> dict[str, Any]:
    args: dict[str, Any] = {
        "database": DB,
        "statements": [
            {"sql": s, "params": p} if p is not None else {"sql": s} for s, p in statements
        ],
    }
    if key is not None:
        args["idempotencyKey"] = key
    return args


async def collect(answers: list[CallToolResult], client: Client, args: dict[str, Any]) -> None:
    answers.append(await client.call_tool("db_transaction", args))


# -- 1. two servers, one database ---------------------------------------------------------------

ACCOUNTS = 4
START_BALANCE = 1_000
WORKERS = 4  # two per server
ROUNDS = 12  # per worker: a transfer and an increment each
CONCURRENT_KEYS = 3


async def test_two_servers_share_one_database(pg_database: ClusterDatabase, tmp_path: Path) -> None:
    setup(
        pg_database,
        "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL)",
        f"INSERT INTO accounts SELECT g, {START_BALANCE} FROM generate_series(1, {ACCOUNTS}) g",
        "CREATE TABLE counter (id int PRIMARY KEY, n bigint NOT NULL)",
        "INSERT INTO counter VALUES (1, 0), (2, 0)",
        "CREATE TABLE ledger (key text NOT NULL, note text NOT NULL)",
    )
    params = [serve_params(*machine(tmp_path / name), pg_database) for name in ("a", "b")]
    expected = dict.fromkeys(range(1, ACCOUNTS + 1), START_BALANCE)
    tally: Counter[str] = Counter()
    errors: list[str] = []

    async def worker(client: Client, index: int) -> None:
        rng = random.Random(f"{SEED}-{index}")
        for _ in range(ROUNDS):
            source, target = rng.sample(range(1, ACCOUNTS + 1), 2)
            amount = rng.randint(1, 50)
            delta = {source: -amount, target: amount}
            # The lower id first: two transfers never wait for each other in a cycle.
            updates = [
                ("UPDATE accounts SET balance = balance + ? WHERE id = ?", [delta[i], i])
                for i in sorted(delta)
            ]
            result = await client.call_tool("db_transaction", transaction_args(updates))
            if result.is_error:
                errors.append(f"transfer: {text_of(result)}")
            else:
                assert result.structured_content is not None
                assert result.structured_content["rowsChanged"] == 2
                for account, change in delta.items():
                    expected[account] += change
                tally["transfers"] += 1
            result = await client.call_tool(
                "db_execute",
                {"database": DB, "sql": "UPDATE counter SET n = n + 1 WHERE id = 1"},
            )
            if result.is_error:
                errors.append(f"increment: {text_of(result)}")
            else:
                tally["increments"] += 1

    with anyio.fail_after(RUN_TIMEOUT):
        async with Client(params[0], mode="legacy") as a, Client(params[1], mode="legacy") as b:
            clients = (a, b)
            async with anyio.create_task_group() as tg:
                for index in range(WORKERS):
                    tg.start_soon(worker, clients[index % 2], index)
            assert errors == []
            assert tally == {"transfers": WORKERS * ROUNDS, "increments": WORKERS * ROUNDS}
            balances = dict(fetch(pg_database, "SELECT id, balance FROM accounts"))
            assert balances == expected, "a transfer was lost or applied in part"
            assert sum(balances.values()) == ACCOUNTS * START_BALANCE
            counter = fetch(pg_database, "SELECT n FROM counter WHERE id = 1")
            assert counter == [(WORKERS * ROUNDS,)], "lost updates"

            # A key used on A, then retried on B (another machine): applied once.
            def keyed(key: str, note: str = "once", pause: float = 0.0) -> dict[str, Any]:
                statements: list[tuple[str, Any]] = [
                    ("INSERT INTO ledger (key, note) VALUES (?, ?)", [key, note])
                ]
                if pause:
                    statements.append(("SELECT pg_sleep(?)", [pause]))
                statements.append(("UPDATE counter SET n = n + 1 WHERE id = 2", None))
                return transaction_args(statements, key)

            first = await a.call_tool("db_transaction", keyed("K-sequential"))
            again = await b.call_tool("db_transaction", keyed("K-sequential"))
            assert not first.is_error, text_of(first)
            assert not again.is_error, text_of(again)
            assert again.structured_content == first.structured_content
            execute = {
                "database": DB,
                "sql": "UPDATE counter SET n = n + 1 WHERE id = 2",
                "idempotencyKey": "K-execute",
            }
            executed = [await client.call_tool("db_execute", execute) for client in (b, a, b)]
            assert [r.is_error for r in executed] == [False] * 3, [text_of(r) for r in executed]
            assert {json.dumps(r.structured_content) for r in executed} == {
                json.dumps(executed[0].structured_content)
            }

            # The same key on both servers at the same moment (twice on each): applied once,
            # every call answers with the one result.
            for k in range(CONCURRENT_KEYS):
                key = f"K-concurrent-{k}"
                answers: list[CallToolResult] = []

                async with anyio.create_task_group() as tg:
                    for client in (a, b, a, b):
                        tg.start_soon(collect, answers, client, keyed(key, pause=0.2))
                assert [r.is_error for r in answers] == [False] * 4, [text_of(r) for r in answers]
                assert len({json.dumps(r.structured_content) for r in answers}) == 1

            # The same key with other statements: refused, nothing run.
            other = await b.call_tool("db_transaction", keyed("K-sequential", note="other"))
            assert other.is_error
            assert "already used" in text_of(other), text_of(other)

    ledger = Counter(key for (key,) in fetch(pg_database, "SELECT key FROM ledger"))
    assert ledger == {"K-sequential": 1, **{f"K-concurrent-{k}": 1 for k in range(CONCURRENT_KEYS)}}
    assert fetch(pg_database, "SELECT note FROM ledger WHERE note <> 'once'") == []
    # K-sequential, K-execute and each concurrent key: once each.
    assert fetch(pg_database, "SELECT n FROM counter WHERE id = 2") == [(2 + CONCURRENT_KEYS,)]


# -- 2. SIGKILL of the server mid-transaction ---------------------------------------------------


async def test_sigkill_of_the_server_mid_transaction_rolls_back(
    pg_database: ClusterDatabase, tmp_path: Path
) -> None:
    setup(pg_database, "CREATE TABLE marks (k text PRIMARY KEY)")
    root, state = machine(tmp_path / "server")
    cluster = pg_database.cluster
    killed = False
    answered: list[CallToolResult] = []
    long_call = transaction_args(
        [
            ("INSERT INTO marks VALUES ('doomed-1')", None),
            ("INSERT INTO marks VALUES ('doomed-2')", None),
            ("SELECT pg_sleep(30)", None),
        ]
    )

    async def run_long(client: Client) -> None:
        with contextlib.suppress(MCPError):  # "Connection closed": the server was killed
            answered.append(await client.call_tool("db_transaction", long_call))

    with anyio.fail_after(RUN_TIMEOUT):
        try:
            async with Client(serve_params(root, state, pg_database), mode="legacy") as client:
                pid = child_pid_with_arg(str(root))
                warm = await client.call_tool(
                    "db_execute", {"database": DB, "sql": "INSERT INTO marks VALUES ('warm')"}
                )
                assert not warm.is_error, text_of(warm)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(run_long, client)
                    _, rows = await wait_for(cluster, pg_database.name, sleeping, 30)
                    assert sleeping(rows), f"the transaction never reached pg_sleep: {rows}"
                    killed = True
                    os.kill(pid, signal.SIGKILL)
        except* MCPError:
            if not killed:
                raise
    assert killed
    assert answered == [], "the killed server answered the call"
    took, rows = await wait_for(cluster, pg_database.name, lambda r: not lingering(r), 15)
    assert not lingering(rows), f"{took:.1f}s after the kill, sessions of app linger: {rows}"
    assert took < 5, f"the server took {took:.1f}s to end the dead client's transaction"
    assert fetch(pg_database, "SELECT k FROM marks ORDER BY k") == [("warm",)]

    # A new server on the same database serves at once.
    async with Client(serve_params(root, state, pg_database), mode="legacy") as client:
        result = await client.call_tool(
            "db_query", {"database": DB, "sql": "SELECT count(*) AS n FROM marks"}
        )
        assert not result.is_error, text_of(result)
        assert result.structured_content is not None
        assert result.structured_content["rows"] == [[1]]


# -- 3. PostgreSQL stopped hard during COMMIT ---------------------------------------------------

SLOW_COMMIT = (
    "CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL)",
    "CREATE TABLE u (id int PRIMARY KEY, v text NOT NULL)",
    "CREATE TABLE w (id int PRIMARY KEY)",
    "CREATE FUNCTION sleep_at_commit() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$",
    # A constraint trigger deferred to COMMIT: the COMMIT itself runs for two seconds.
    "CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON t DEFERRABLE INITIALLY DEFERRED "
    "FOR EACH ROW EXECUTE FUNCTION sleep_at_commit()",
)


COUNT_U = "SELECT count(*) FROM u"
DEAD_CONNECTION = (
    "server closed the connection unexpectedly",
    "terminating connection due to administrator command",
    "the connection is closed",
    "the connection is lost",
)
"""What a call says when it was given a pooled connection the old server had closed."""


def both_or_none(database: ClusterDatabase, ident: int) -> int:
    """How many of the transaction's two rows (one per table) are there: 0, 1 (torn) or 2."""
    rows = fetch(
        database,
        "SELECT (SELECT count(*) FROM t WHERE id = %s) + (SELECT count(*) FROM u WHERE id = %s)",
        [ident, ident],
    )
    return int(rows[0][0])


def pair(ident: int) -> list[tuple[str, Any]]:
    return [
        ("INSERT INTO t (id, v) VALUES (?, ?)", [ident, "t"]),
        ("INSERT INTO u (id, v) VALUES (?, ?)", [ident, "u"]),
    ]


async def stop_during_commit(cluster: PgCluster, database: str, stopped: list[float]) -> None:
    """Wait until a COMMIT of role app runs, then stop the server hard (like a crash)."""
    _, rows = await wait_for(cluster, database, committing, 30)
    assert committing(rows), f"no COMMIT seen: {rows}"
    await anyio.to_thread.run_sync(cluster.stop, "immediate")
    stopped.append(time.monotonic())


def outcome_unknown(message: str) -> bool:
    """Says what the README promises: "outcome unknown; retry with the same idempotencyKey"."""
    return "outcome unknown" in message and "idempotency" in message.lower()


async def test_server_stopped_during_commit_says_outcome_unknown_and_retry_settles_it(
    pg_private_cluster: PgCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = pg_private_cluster
    database = cluster.create_database("slowcommit")
    setup(database, *SLOW_COMMIT)
    monkeypatch.setenv("PGPASSWORD", database.password)
    statements = [Statement(sql, params) for sql, params in pair(1)]

    # The API.
    with anyio.fail_after(RUN_TIMEOUT):
        pg = PgDatabase(database.dsn, name=DB)
        stopped: list[float] = []
        try:
            unknown: CommitUnknownError | None = None
            async with anyio.create_task_group() as tg:
                tg.start_soon(stop_during_commit, cluster, database.name, stopped)
                try:
                    await pg.run_statements(statements, idempotency_key="K-api")
                except CommitUnknownError as err:
                    unknown = err
            assert stopped, "the COMMIT ended before the server was stopped"
            assert unknown is not None, "no CommitUnknownError"
            messages = [str(unknown)]
            await anyio.to_thread.run_sync(cluster.start)
            assert both_or_none(database, 1) in (0, 2), "torn: one table has the row"
            retried = await pg.run_statements(statements, idempotency_key="K-api")
            assert [r.rowcount for r in retried] == [1, 1]
            assert both_or_none(database, 1) == 2
            again = await pg.run_statements(statements, idempotency_key="K-api")
            assert again == retried
            assert both_or_none(database, 1) == 2
            # The pool serves other calls after the restart too (readers and writers).
            found = await pg.query("SELECT count(*) FROM t")
            assert found.rows == ((1,),)
        finally:
            await pg.close()

    # The tool, over stdio: the same through a real server, whose session must go on serving
    # after the restart, though its pooled connections died with the old server (after the
    # warm-up two writers and a reader are idle in its pools).
    root, state = machine(tmp_path / "server")
    stale: list[str] = []
    """Calls after the restart that failed on a pooled connection of the old server."""
    with anyio.fail_after(RUN_TIMEOUT):
        async with Client(serve_params(root, state, database), mode="legacy") as client:

            async def served(tool: str, args: dict[str, Any]) -> CallToolResult:
                """A call after the restart. One that fails on a dead pooled connection is
                noted and made again, so that the checks after it still run."""
                result = await client.call_tool(tool, args)
                if result.is_error and any(s in text_of(result) for s in DEAD_CONNECTION):
                    stale.append(f"{tool}: {text_of(result)}")
                    result = await client.call_tool(tool, args)
                return result

            warm = await client.call_tool("db_query", {"database": DB, "sql": COUNT_U})
            assert not warm.is_error, text_of(warm)
            warmups: list[CallToolResult] = []
            async with anyio.create_task_group() as tg:
                for n in (1, 2):
                    slow = [("INSERT INTO w VALUES (?)", [n]), ("SELECT pg_sleep(0.3)", None)]
                    tg.start_soon(collect, warmups, client, transaction_args(slow))
            assert [r.is_error for r in warmups] == [False, False], [text_of(r) for r in warmups]

            args = transaction_args(pair(2), key="K-tool")
            stopped = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(stop_during_commit, cluster, database.name, stopped)
                result = await client.call_tool("db_transaction", args)
            assert stopped
            assert result.is_error, f"answered as committed: {text_of(result)}"
            messages.append(text_of(result))
            await anyio.to_thread.run_sync(cluster.start)
            assert both_or_none(database, 2) in (0, 2), "torn: one table has the row"
            retry = await served("db_transaction", args)
            assert not retry.is_error, text_of(retry)
            assert retry.structured_content is not None
            assert retry.structured_content["rowsChanged"] == 2
            assert both_or_none(database, 2) == 2
            replayed = await served("db_transaction", args)
            assert replayed.structured_content == retry.structured_content
            read = await served("db_query", {"database": DB, "sql": COUNT_U})
            assert not read.is_error, text_of(read)
            assert read.structured_content is not None
            assert read.structured_content["rows"] == [[2]]
            written = await served(
                "db_execute", {"database": DB, "sql": "INSERT INTO w VALUES (3)"}
            )
            assert not written.is_error, text_of(written)
    assert fetch(database, "SELECT id FROM t ORDER BY id") == [(1,), (2,)]
    assert fetch(database, "SELECT id FROM u ORDER BY id") == [(1,), (2,)]
    assert fetch(database, "SELECT id FROM w ORDER BY id") == [(1,), (2,), (3,)]
    # Last, so that everything else is checked first (and both are reported together): the
    # wording the README promises, and a server that reconnects after the restart instead of
    # failing a call for each pooled connection of the old server.
    problems = [f"not worded as promised: {m}" for m in messages if not outcome_unknown(m)]
    problems += [f"failed on a connection of the old server: {call}" for call in stale]
    assert problems == [], "\n".join(problems)


# -- 4. cancellation ---------------------------------------------------------------------------

CANCEL_DELAYS = [i * 0.02 for i in range(20)]  # 0 .. 380 ms; the transaction takes ~260 ms
CANCEL_POOL = 2
DEADLINE_ERROR = "ran past the call's deadline"


async def cancel_after(delay: float, op: Callable[[], Awaitable[object]], *, deadline: bool) -> str:
    """Run ``op`` and cancel it after ``delay``: by the deadline of ``move_on_after``, or by
    ``CancelScope.cancel()`` from another task (no deadline, so no statement_timeout).

    Returns ``completed``, ``cancelled`` or, for a deadline, ``deadline error``: the server's
    statement_timeout (set from the deadline) can end the statement a moment before the
    event loop notices the deadline; the call then raises ``StatementError`` instead of being
    cancelled (a race this test counts; the transaction is rolled back either way)."""
    finished = False
    if deadline:
        try:
            with anyio.move_on_after(delay):
                await op()
                finished = True
        except StatementError as err:
            if DEADLINE_ERROR not in str(err):
                raise
            return "deadline error"
        return "completed" if finished else "cancelled"

    async def cancel_later(scope: anyio.CancelScope) -> None:
        await anyio.sleep(delay)
        scope.cancel()

    with anyio.CancelScope() as outer:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_later, outer)
            await op()
            finished = True
            tg.cancel_scope.cancel()
    return "completed" if finished else "cancelled"


async def test_cancels_roll_back_stop_the_statement_and_leak_nothing(
    pg_database: ClusterDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup(pg_database, "CREATE TABLE log (attempt int NOT NULL, step int NOT NULL)")
    monkeypatch.setenv("PGPASSWORD", pg_database.password)
    cluster = pg_database.cluster
    tally: Counter[str] = Counter()

    async def settled(where: str) -> None:
        """The cancelled call's statement is stopped, its transaction gone, at once."""
        took, rows = await wait_for(cluster, pg_database.name, lambda r: not lingering(r), 1.0)
        assert not lingering(rows), f"{where}: still running {took:.2f}s later: {rows}"

    async with PgDatabase(pg_database.dsn, name=DB, pool_size=CANCEL_POOL) as pg:
        for attempt, delay in enumerate(CANCEL_DELAYS):
            by_deadline = attempt % 2 == 1
            where = f"attempt {attempt}, cancelled after {delay * 1000:.0f} ms"
            statements = [
                Statement("INSERT INTO log VALUES (?, 1)", [attempt]),
                Statement("SELECT pg_sleep(0.25)"),
                Statement("INSERT INTO log VALUES (?, 2)", [attempt]),
            ]
            outcome = await cancel_after(
                delay, functools.partial(pg.run_statements, statements), deadline=by_deadline
            )
            tally[outcome] += 1
            steps = fetch(pg_database, "SELECT step FROM log WHERE attempt = %s", [attempt])
            if outcome == "completed":
                assert sorted(steps) == [(1,), (2,)], where
            else:
                assert steps == [], f"{where}: the cancelled transaction left {steps}"
            await settled(where)
            with anyio.fail_after(2):  # the next call is served at once
                seen = await pg.query("SELECT count(*) FROM log WHERE attempt = ?", [attempt])
            assert seen.rows == ((len(steps),),), where

        # A long read and a transaction of the caller's own, cancelled too.
        async def own_transaction() -> None:
            async with pg.transaction() as tx:
                await tx.execute("INSERT INTO log VALUES (-1, 1)")
                await tx.execute("SELECT pg_sleep(5)")

        for delay, by_deadline in ((0.05, False), (0.15, True), (0.15, False)):
            outcome = await cancel_after(
                delay, lambda: pg.query("SELECT pg_sleep(5)"), deadline=by_deadline
            )
            assert outcome != "completed"
            tally[f"query {outcome}"] += 1
            await settled(f"query cancelled after {delay}s")
            outcome = await cancel_after(delay, own_transaction, deadline=by_deadline)
            assert outcome != "completed"
            tally[f"transaction() {outcome}"] += 1
            await settled(f"transaction() cancelled after {delay}s")
        assert fetch(pg_database, "SELECT count(*) FROM log WHERE attempt = -1") == [(0,)]
        done = await pg.run_statements([Statement("INSERT INTO log VALUES (-2, 1)")])
        assert done[0].rowcount == 1

        backends = sessions(cluster, pg_database.name)
        assert len(backends) <= CANCEL_POOL + 1, f"connections leaked: {backends}"
    print(f"\ncancels through the API: {dict(tally)}")
    assert tally["cancelled"] + tally["deadline error"] >= 8, tally
    assert tally["completed"] >= 2, tally
    assert sessions(cluster, pg_database.name) == [], "close() left connections open"


async def test_cancel_through_the_mcp_tool(
    pg_database: ClusterDatabase, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup(pg_database, "CREATE TABLE log (attempt int NOT NULL)")
    monkeypatch.setenv("PGPASSWORD", pg_database.password)
    cluster = pg_database.cluster
    server = create_server(Workspace([root]), databases={DB: pg_database.dsn})
    with anyio.fail_after(RUN_TIMEOUT):
        async with Client(server, mode="legacy") as client:
            for attempt, delay in enumerate((0.05, 0.3, 0.6)):
                args = transaction_args(
                    [("INSERT INTO log VALUES (?)", [attempt]), ("SELECT pg_sleep(5)", None)]
                )
                if attempt > 0:  # from the second on: surely while the statement runs
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(client.call_tool, "db_transaction", args)
                        _, rows = await wait_for(cluster, pg_database.name, sleeping, 10)
                        assert sleeping(rows), rows
                        await anyio.sleep(delay)
                        tg.cancel_scope.cancel()
                else:
                    with anyio.move_on_after(delay) as scope:
                        await client.call_tool("db_transaction", args)
                    assert scope.cancelled_caught
                # The legacy client does not wait for the server's cleanup: it must be quick.
                took, rows = await wait_for(
                    cluster, pg_database.name, lambda r: not lingering(r), 3.0
                )
                assert not lingering(rows), f"attempt {attempt}: {took:.1f}s later: {rows}"
                with anyio.fail_after(2):
                    read = await client.call_tool(
                        "db_query", {"database": DB, "sql": "SELECT count(*) FROM log"}
                    )
                assert not read.is_error, text_of(read)
                assert read.structured_content is not None
                assert read.structured_content["rows"] == [[0]], "a cancelled call committed"
            backends = sessions(cluster, pg_database.name)
            assert len(backends) <= POOL_SIZE + 1, f"connections leaked: {backends}"


# -- 5. refused statements ----------------------------------------------------------------------

REFUSED_IN_TRANSACTIONS = [
    "COMMIT",
    "BEGIN",
    "ROLLBACK",
    "SAVEPOINT s",
    "SET ROLE postgres",
    "SELECT set_config('role', 'postgres', false)",
    "COPY items FROM PROGRAM 'true'",
    "SELECT 1; DELETE FROM items",
    "LISTEN somewhere",
]
WRITES_REFUSED_BY_QUERY = [
    "INSERT INTO items VALUES (99)",
    "UPDATE items SET id = id + 100",
    "DELETE FROM items",
    "WITH gone AS (DELETE FROM items RETURNING id) SELECT id FROM gone",
    "CREATE TABLE more (a int)",
    "SELECT 1; DELETE FROM items",
]


async def test_refused_statements_raise_before_anything_runs(
    pg_database: ClusterDatabase, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup(
        pg_database,
        "CREATE TABLE items (id int PRIMARY KEY)",
        "INSERT INTO items VALUES (1), (2)",
        "CREATE SEQUENCE s",
        "CREATE FUNCTION sneaky() RETURNS int LANGUAGE sql "
        "AS 'INSERT INTO items VALUES (50) RETURNING id'",
    )
    monkeypatch.setenv("PGPASSWORD", pg_database.password)

    def sequence() -> tuple[Any, ...]:
        # nextval is not rolled back: any statement that ran before the refusal would show.
        return fetch(pg_database, "SELECT last_value, is_called FROM s")[0]

    start = sequence()
    async with PgDatabase(pg_database.dsn, name=DB) as pg:
        for bad in REFUSED_IN_TRANSACTIONS:
            batch = [
                Statement("SELECT nextval('s')"),
                Statement("DELETE FROM items"),
                Statement(bad),
            ]
            with pytest.raises(StatementError) as refused:
                await pg.run_statements(batch)
            assert "statement 3 of 3" in str(refused.value), (bad, str(refused.value))
            assert "refused" in str(refused.value), (bad, str(refused.value))
            assert sequence() == start, f"{bad!r}: a statement ran before the refusal"
        for bad in WRITES_REFUSED_BY_QUERY:
            with pytest.raises(StatementError) as refused:
                await pg.query(bad)
            assert "refused" in str(refused.value) or "only reads" in str(refused.value), bad
        # A write hidden in a function: the guard cannot see it, the READ ONLY transaction can.
        with pytest.raises(StatementError) as refused:
            await pg.query("SELECT sneaky()")
        assert "read-only" in str(refused.value), str(refused.value)
        assert sequence() == start
    assert fetch(pg_database, "SELECT id FROM items ORDER BY id") == [(1,), (2,)]

    server = create_server(Workspace([root]), databases={DB: pg_database.dsn})
    async with Client(server, mode="legacy") as client:
        for bad in WRITES_REFUSED_BY_QUERY[:4]:
            result = await client.call_tool("db_query", {"database": DB, "sql": bad})
            assert result.is_error, bad
        for bad in ("COMMIT", "SET ROLE postgres"):
            result = await client.call_tool(
                "db_transaction",
                transaction_args([("SELECT nextval('s')", None), (bad, None)]),
            )
            assert result.is_error, bad
            assert "refused" in text_of(result), text_of(result)
            result = await client.call_tool("db_execute", {"database": DB, "sql": bad})
            assert result.is_error, bad
    assert sequence() == start
    assert fetch(pg_database, "SELECT id FROM items ORDER BY id") == [(1,), (2,)]


# -- 6. change sets of files and a PostgreSQL step ----------------------------------------------


@dataclass
class Lane:
    """One child's world: its root, its state directory, its database."""

    root: Path
    state: Path
    database: ClusterDatabase

    @property
    def journals(self) -> list[str]:
        journals = self.state / "journals"
        return sorted(os.listdir(journals)) if journals.is_dir() else []

    def db_state(self) -> dict[str, Any]:
        with self.database.connect(autocommit=True) as conn:
            return scenario.db_state(conn)

    def markers(self) -> list[tuple[str, str]]:
        with self.database.connect(autocommit=True) as conn:
            return scenario.markers(conn)


def make_lane(base: Path, cluster: PgCluster, name: str) -> Lane:
    root, state = machine(base)
    scenario.install(root, scenario.BEFORE)
    database = cluster.create_database(name)
    with database.connect(autocommit=True) as conn:
        scenario.create_schema(conn, scenario.BEFORE)
    return Lane(root, state, database)


@pytest.fixture
def lanes(pg_cluster: PgCluster, tmp_path: Path) -> Iterator[Callable[[str], Lane]]:
    made: list[Lane] = []

    def make(name: str) -> Lane:
        lane = make_lane(tmp_path / name, pg_cluster, f"mixed_{name}_{SEED % 10_000}")
        made.append(lane)
        return lane

    yield make
    if pg_cluster.is_running():
        for lane in made:
            pg_cluster.drop_database(lane.database.name)


BEFORE_DB = scenario.expected_db(scenario.BEFORE, 0)
AFTER_DB = scenario.expected_db(scenario.AFTER, 1)


async def next_set(lane: Lane) -> None:
    """Another mixed set (it drops stale markers of this host in its transaction)."""
    ws = Workspace([lane.root], state_dir=lane.state)
    async with PgDatabase(lane.database.dsn, name=DB) as pg:
        content = b"the next set\n"
        result = await ws.apply_changes(
            [
                Change("write", "next.txt", content=content),
                Change(
                    "sql",
                    DB,
                    database=pg,
                    statements=(
                        Statement(
                            "INSERT INTO files (path, sha256) VALUES (?, ?)",
                            ["next.txt", scenario.sha(content)],
                        ),
                    ),
                ),
            ]
        )
    assert result.applied


def files_only(tree: dict[str, Any]) -> dict[str, Any]:
    """A ``tree_snapshot`` without directories' inode and mtime (staging a temp file and
    removing it again bumps its directory's mtime): every file's bytes, inode, mtime, mode."""
    return {rel: entry if entry[0] != "dir" else "dir" for rel, entry in tree.items()}


async def test_mixed_set_applies_both_or_neither(
    lanes: Callable[[str], Lane], monkeypatch: pytest.MonkeyPatch
) -> None:
    lane = lanes("apply")
    monkeypatch.setenv("PGPASSWORD", lane.database.password)
    ws = Workspace([lane.root], state_dir=lane.state)
    async with PgDatabase(lane.database.dsn, name=DB) as pg:
        result = await ws.apply_changes(scenario.changes(pg))
    assert result.applied
    assert scenario.snapshot(lane.root) == scenario.AFTER
    assert lane.db_state() == AFTER_DB
    assert lane.markers() == []
    assert lane.journals == []
    assert scenario.leftovers(lane.root) == []

    # A failing statement (a duplicate key, found by the server): the files stay untouched.
    failing = lanes("failing")
    monkeypatch.setenv("PGPASSWORD", failing.database.password)
    before = tree_snapshot(failing.root)
    ws = Workspace([failing.root], state_dir=failing.state)
    async with PgDatabase(failing.database.dsn, name=DB) as pg:
        bad = [
            *scenario.changes(pg),
            Change(
                "sql",
                DB,
                database=pg,
                statements=(Statement("INSERT INTO files (path, sha256) VALUES ('a.txt', 'x')"),),
            ),
        ]
        with pytest.raises(AtomicToolsError) as failed:
            await ws.apply_changes(bad)
        assert "duplicate key" in str(failed.value), str(failed.value)
        # A statement refused by the guard: the same.
        refused = [
            *scenario.changes(pg)[:1],
            Change("sql", DB, database=pg, statements=(Statement("COMMIT"),)),
        ]
        with pytest.raises(AtomicToolsError):
            await ws.apply_changes(refused)
    assert files_only(tree_snapshot(failing.root)) == files_only(before), "files were touched"
    assert failing.db_state() == BEFORE_DB
    assert failing.markers() == []
    assert failing.journals == []


def run_child(lane: Lane, crash_at: str | None) -> subprocess.CompletedProcess[str]:
    env = {
        key: value for key, value in os.environ.items() if key not in (CRASH_ENV, CRASH_SIGNAL_ENV)
    }
    env |= lane.database.env()
    if crash_at is not None:
        env |= {CRASH_ENV: crash_at, CRASH_SIGNAL_ENV: "KILL"}
    args = [sys.executable, str(CHILD), "apply", str(lane.root), str(lane.state), lane.database.dsn]
    if crash_at is None:
        args.append("--list")
    return subprocess.run(
        args, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False
    )


STALE_MARKER_POINT = "changeset.finished:1"
"""The set's record is gone, its marker not yet: the next set of this host drops it."""
COMMIT_AFTER = "changeset.marked"
"""The last point before the database's COMMIT: a kill there (or before) leaves nothing."""


def crash_points(names: list[str]) -> list[str]:
    """Each ``changeset.*`` point at its first passage, and a repeated one at its last too."""
    counts = Counter(n for n in names if n.startswith("changeset."))
    points = [f"{name}:1" for name in counts]
    points += [f"{name}:{n}" for name, n in counts.items() if n > 1]
    return points


def test_sigkill_of_a_mixed_set_at_each_crash_point(
    lanes: Callable[[str], Lane], monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = lanes("listing")
    listed = run_child(reference, None)
    assert listed.returncode == 0, listed.stderr
    names: list[str] = json.loads(listed.stdout)["points"]
    protocol = [
        "changeset.prepare", "changeset.sql", "changeset.commit", "changeset.prepared",
        "changeset.record_written", "changeset.marked", "changeset.history_recorded",
        "changeset.apply", "changeset.applied", "changeset.finished", "changeset.marker_dropped",
    ]  # fmt: skip
    assert [n for n in dict.fromkeys(names) if n in protocol] == protocol, names
    assert scenario.snapshot(reference.root) == scenario.AFTER
    assert reference.db_state() == AFTER_DB
    commit_index = names.index(COMMIT_AFTER)

    points = crash_points(names)
    killed_lanes = [lanes(f"kill{i}") for i in range(len(points))]

    def killed(lane: Lane, point: str) -> None:
        done = run_child(lane, point)
        assert done.returncode == -signal.SIGKILL, (
            f"the child was not killed at {point} (exit {done.returncode}): {done.stderr}"
        )

    with ThreadPoolExecutor(2) as pool:
        runs = [
            pool.submit(killed, lane, point)
            for lane, point in zip(killed_lanes, points, strict=True)
        ]
        for point, lane, run in zip(points, killed_lanes, runs, strict=True):
            run.result()
            where = f"killed at {point}"
            name, _, nth = point.partition(":")
            passage = [i for i, n in enumerate(names) if n == name][int(nth) - 1]
            after = passage > commit_index
            monkeypatch.setenv("PGPASSWORD", lane.database.password)
            report = atomictools.recover([lane.root], state_dir=lane.state)
            assert not report.unfinished, f"{where}: {report.unfinished}"
            assert not report.conflicts, f"{where}: {report.conflicts}"
            tree, db = scenario.snapshot(lane.root), lane.db_state()
            files_at = (
                "after"
                if tree == scenario.AFTER
                else "before"
                if tree == scenario.BEFORE
                else f"mixed {sorted(tree)}"
            )
            db_at = "after" if db == AFTER_DB else "before" if db == BEFORE_DB else f"mixed {db}"
            assert (files_at, db_at) == (("after",) * 2 if after else ("before",) * 2), where
            assert scenario.leftovers(lane.root) == [], f"{where}: files of ours left"
            assert lane.journals == [], f"{where}: journal records left"
            left = lane.markers()
            if point == STALE_MARKER_POINT:  # its record went, its marker not yet: stale
                assert len(left) == 1, f"{where}: markers {left}"
                assert left[0][1].split(":", 1)[1].startswith(str(lane.state)), left
            else:
                assert left == [], f"{where}: markers left by recovery {left}"
            anyio.run(next_set, lane, backend="asyncio")
            assert lane.markers() == [], f"{where}: markers left after the next set"
            assert lane.db_state()["counter"] == [(int(after),)], where
            assert scenario.snapshot(lane.root)["next.txt"] == b"the next set\n"


async def test_a_huge_result_crosses_the_wire_only_up_to_max_rows(
    pg_database: ClusterDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A query of a hundred million rows with maxRows 5 answers at once: the rows come
    through a server-side cursor, not fetched whole into this process's memory."""
    monkeypatch.setenv("PGPASSWORD", pg_database.password)
    async with PgDatabase(pg_database.dsn, name="main") as db:
        began = time.monotonic()
        with anyio.fail_after(20):
            result = await db.query(
                "SELECT a.n * 10000 + b.n FROM generate_series(0, 9999) AS a(n), "
                "generate_series(0, 9999) AS b(n)",  # 10**8 rows, made as they are read
                max_rows=5,
            )
        assert len(result.rows) == 5
        assert result.truncated
        assert time.monotonic() - began < 10
        shown = await db.query("SHOW server_version_num")  # no cursor can hold a SHOW
        assert shown.columns == ("server_version_num",)
