"""Shared fixtures: every async test runs on asyncio and on trio through anyio's plugin."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from atomictools import Workspace
from atomictools.engine.changes.record import (
    RECORD_SUFFIX,
    JournalRecord,
    UntrustedRecordError,
    decode,
)
from atomictools.engine.config import STATE_DIR_ENV
from atomictools.engine.durable.tempfiles import is_temp_name

# A real PostgreSQL for the database tools' tests (tests/pgserver.py): the fixtures pg_cluster
# (one server per session), pg_database (a fresh database per test) and pg_private_cluster.
pytest_plugins = ["tests.pgserver"]


@pytest.fixture(autouse=True)
def private_state_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Journals of one test never meet another's: each test gets its own state directory."""
    state = tmp_path_factory.mktemp("state")
    monkeypatch.setenv(STATE_DIR_ENV, str(state))
    return state


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A root directory with a sibling whose name shares its prefix (``root-evil``)."""
    path = tmp_path / "root"
    path.mkdir()
    (tmp_path / "root-evil").mkdir()
    (tmp_path / "root-evil" / "secret.txt").write_text("outside\n")
    (tmp_path / "outside.txt").write_text("outside\n")
    return path


@pytest.fixture
def ws(root: Path) -> Workspace:
    return Workspace([root])


def temp_files(directory: Path) -> list[Path]:
    """Every temp file of ours anywhere below ``directory``."""
    return [p for p in directory.rglob("*") if is_temp_name(p.name)]


@pytest.fixture
def no_temps_left(tmp_path: Path) -> Iterator[None]:
    """Fails the test if any of our temp files is left anywhere under tmp_path."""
    yield
    assert temp_files(tmp_path) == []


class SummaryReport:
    """Lines a long test wants shown: printed (visible with -s) and in pytest's summary."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        print(line)
        self.lines.append(line)

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if self.lines:
            terminalreporter.section(self.title)
            for line in self.lines:
                terminalreporter.write_line(line)


def summary_report(config: pytest.Config, title: str) -> SummaryReport:
    """The report section called ``title``, registered once per pytest run."""
    name = f"atomictools-report-{title}"
    plugin = config.pluginmanager.get_plugin(name)
    if plugin is None:
        plugin = SummaryReport(title)
        config.pluginmanager.register(plugin, name)
    assert isinstance(plugin, SummaryReport)
    return plugin


TreeEntry = tuple[object, ...]


def tree_snapshot(top: Path, *, exclude: Path | None = None) -> dict[str, TreeEntry]:
    """Every entry below ``top`` without following links: what would show any change at all.

    Files: content, inode, mtime and mode (an atomic replace with the same bytes still changes
    the inode). Links: their target. Directories: inode and mtime (a temp file created and
    removed again still bumps the directory's mtime).
    """
    entries: dict[str, TreeEntry] = {}

    def record(path: Path) -> None:
        st = path.lstat()
        key = str(path.relative_to(top))
        if stat.S_ISLNK(st.st_mode):
            entries[key] = ("link", os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            entries[key] = ("dir", st.st_ino, st.st_mtime_ns)
            for child in sorted(path.iterdir()):
                if child != exclude:
                    record(child)
        else:
            entries[key] = (
                "file",
                path.read_bytes(),
                st.st_ino,
                st.st_mtime_ns,
                stat.S_IMODE(st.st_mode),
            )

    record(top)
    return entries


def read_record(path: Path) -> JournalRecord | None:
    """The journal record at ``path``, or None when it is not one that can be trusted."""
    if not path.name.endswith(RECORD_SUFFIX):
        return None
    try:
        return decode(path.read_bytes())
    except UntrustedRecordError:
        return None


@contextlib.contextmanager
def mounted_tmpfs(tmp_path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. ``2m``) mounted under ``tmp_path``: a file system that fills
    up, or is remounted read-only, for real. Skips the test unless root may mount one."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
