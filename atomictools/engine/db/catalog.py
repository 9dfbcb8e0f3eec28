"""Which databases a server may use: ones the operator named, and SQLite files inside the roots.

A database named on the command line (``--db NAME=PATH``) may lie anywhere (the operator chose
it) and is created if missing; ``--db NAME=postgresql://...`` names a PostgreSQL database
(``postgres``; the optional ``atomictools[postgres]`` extra brings its driver). Any other
database is a ``.db``, ``.sqlite`` or ``.sqlite3`` file that already exists inside the
workspace's roots, found through the same sandbox as every file tool. Each database is opened
once and shared by all calls, so its writer lock (or connection pool) is shared too.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import stat
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import anyio

from atomictools.engine.config import Durability
from atomictools.engine.db.database import Database, DatabaseError
from atomictools.engine.db.pinned import PinnedDirectory
from atomictools.engine.errors import (
    AtomicToolsError,
    InvalidArgumentError,
    NotFoundError,
    WrongTypeError,
)
from atomictools.engine.workspace import Workspace

if TYPE_CHECKING:
    from atomictools.engine.db.postgres import PgDatabase

PG_SCHEMES = ("postgresql://", "postgres://")

DB_SUFFIXES = (".db", ".sqlite", ".sqlite3")
_DISCOVERY_PATTERN = "*.{db,sqlite,sqlite3}"


@dataclass(frozen=True, slots=True)
class DatabaseEntry:
    name: str
    """What to pass as ``database``: the configured name, or the path inside the roots."""
    path: str
    configured: bool


def _is_url(value: str | os.PathLike[str]) -> bool:
    return isinstance(value, str) and value.startswith(PG_SCHEMES)


def _check_named(name: str, path: Path) -> None:
    """A named database must be creatable or usable now, not at its first use (ValueError)."""
    if not path.parent.is_dir():
        raise ValueError(
            f"--db {name}={path}: the directory {path.parent} does not exist; create it, or "
            "give another path"
        )
    if path.exists() and not path.is_file():
        raise ValueError(f"--db {name}={path}: that is not a regular file")


class DatabaseCatalog:
    """Named databases plus database files inside the workspace, opened on first use.

    Guarantee: a database file is opened only inside the roots or by an operator-given name,
    through a pinned directory (no symlink race). Caveat: call ``close`` when done (the
    server does at shutdown); each database stays open until then.
    """

    def __init__(
        self,
        workspace: Workspace,
        named: Mapping[str, str | os.PathLike[str]] | None = None,
        *,
        durability: Durability | str = Durability.FULL,
        read_only: bool = False,
        allow_superuser: bool = False,
    ) -> None:
        self.workspace = workspace
        self.durability = Durability(durability)
        self.read_only = read_only
        self.allow_superuser = allow_superuser
        self._urls = {name: str(p) for name, p in (named or {}).items() if _is_url(p)}
        self._named = {
            name: Path(os.path.abspath(os.fspath(p)))
            for name, p in (named or {}).items()
            if not _is_url(p)
        }
        for name, path in self._named.items():
            _check_named(name, path)
        for name, url in self._urls.items():
            _check_url(name, url)
        self._open: dict[Hashable, Database | PgDatabase] = {}
        """Open databases: by name for configured ones, by (device, inode of directory,
        name) for files in the roots, so a directory moved or replaced means a new one."""
        self._lock = anyio.Lock()

    @staticmethod
    def parse_option(value: str) -> tuple[str, str]:
        """``NAME=PATH`` from the command line."""
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--db takes NAME=PATH, not {value!r}")
        return name, path

    async def entries(self, workspace: Workspace | None = None) -> list[DatabaseEntry]:
        """The named databases, and the database files inside ``workspace``'s roots (a client's
        narrowed view; the catalog's own workspace by default)."""
        workspace = workspace or self.workspace
        found = [DatabaseEntry(n, str(p), configured=True) for n, p in sorted(self._named.items())]
        found += [
            DatabaseEntry(n, _postgres_module(n).pgconn.shown_url(u), configured=True)
            for n, u in sorted(self._urls.items())
        ]
        for root in workspace.roots:
            result = await workspace.search(root, _DISCOVERY_PATTERN)
            found.extend(DatabaseEntry(m, m, configured=False) for m in result.matches)
        return found

    async def get(self, name: str, workspace: Workspace | None = None) -> Database | PgDatabase:
        """The open database called ``name``: a configured name (the operator's choice, always
        available), or a path inside ``workspace``'s roots (a client's narrowed view; the
        catalog's own workspace by default), opened through its pinned directory."""
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(
                "database is empty; give a name from DatabaseCatalog.entries"
            )
        if name in self._named:
            return await self._database(("named", name), self._named[name], name, None)
        if name in self._urls:
            return await self._postgres(name)
        with (workspace or self.workspace).sandbox.resolve(name) as location:
            display = location.display
            if not location.name.endswith(DB_SUFFIXES):
                raise InvalidArgumentError(
                    f"{display} is not a database: give a name from DatabaseCatalog.entries, or "
                    f"a file ending in {', '.join(DB_SUFFIXES)} inside the allowed directories"
                )
            st = location.lstat()
            if st is None:
                raise NotFoundError(
                    f"database file {display} does not exist; DatabaseCatalog.entries lists them"
                )
            if not stat.S_ISREG(st.st_mode):
                raise WrongTypeError(f"{display} is not a regular file, so not a database")
            directory = os.fstat(location.dir_fd)
            key = (directory.st_dev, directory.st_ino, location.name)
            if key in self._open:
                return self._open[key]
            pinned = PinnedDirectory(os.dup(location.dir_fd), location.name, display)
            return await self._database(key, location.abspath, display, pinned)

    async def _database(
        self, key: Hashable, path: Path, display: str, pinned: PinnedDirectory | None
    ) -> Database:
        async with self._lock:
            database = self._open.get(key)
            if database is None:
                database = Database(
                    path,
                    name=display,
                    durability=self.durability,
                    read_only=self.read_only,
                    create=pinned is None,
                    idempotency_ttl=self.workspace.idempotency_ttl,
                    pinned=pinned,
                )
                database.history = self.workspace.history
                self._open[key] = database
            elif pinned is not None:
                pinned.close()  # another call opened it meanwhile
        assert isinstance(database, Database)
        return database

    async def _postgres(self, name: str) -> PgDatabase:
        async with self._lock:
            database = self._open.get(("postgres", name))
            if database is None:
                module = _postgres_module(name)
                database = module.PgDatabase(
                    self._urls[name],
                    name=name,
                    read_only=self.read_only,
                    allow_superuser=self.allow_superuser,
                    idempotency_ttl=self.workspace.idempotency_ttl,
                )
                database.history = self.workspace.history
                self._open[("postgres", name)] = database
        assert not isinstance(database, Database)
        return database

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            for database in self._open.values():
                with contextlib.suppress(DatabaseError):
                    await database.close()
            self._open.clear()


def _postgres_module(name: str) -> ModuleType:
    """The PostgreSQL backend, imported when a ``postgresql://`` database is named (its driver
    is an optional extra); without it, a clear error naming the fix."""
    try:
        return importlib.import_module("atomictools.engine.db.postgres")
    except ImportError as err:
        raise ValueError(
            f"--db {name}=postgresql://...: the PostgreSQL driver is not installed ({err}); "
            "install atomictools[postgres]"
        ) from err


def _check_url(name: str, url: str) -> None:
    """A URL that cannot work (or carries a password) is refused when the server starts."""
    try:
        _postgres_module(name).pgconn.url_conninfo(url)
    except AtomicToolsError as err:
        raise ValueError(f"--db {name}=...: {err.message}") from err
