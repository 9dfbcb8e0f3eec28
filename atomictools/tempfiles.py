"""Our temp files: a name nobody else uses, created exclusively and held under ``flock``.

A temp is ``.<target name>.<pid>.<12 hex>.atomictmp`` in the target's own directory. The fixed
marker and the strict pattern let the recovery sweep recognise our files without guessing, and
the exclusive ``flock`` held for the writer's whole life tells a live writer (lock busy) from a
dead one (the kernel drops the lock when the process dies, even on SIGKILL).
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets

TEMP_MARKER = "atomictmp"
_NAME_MAX = 255
_TEMP_RE = re.compile(
    r"^\.(?P<base>.+)\.(?P<pid>[0-9]+)\.(?P<token>[0-9a-f]{12})\." + TEMP_MARKER + "$"
)
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def temp_name_for(target_name: str) -> str:
    """A fresh temp name for ``target_name``, shortened so it fits the file system's limit."""
    suffix = f".{os.getpid()}.{secrets.token_hex(6)}.{TEMP_MARKER}"
    base = target_name
    while len(os.fsencode(f".{base}{suffix}")) > _NAME_MAX:
        base = base[:-1]
    return f".{base}{suffix}"


def is_temp_name(name: str) -> bool:
    """True when ``name`` has exactly the shape of one of our temp files."""
    return _TEMP_RE.match(name) is not None


def temp_owner_pid(name: str) -> int | None:
    """The pid recorded in a temp name (a second liveness signal next to the lock)."""
    match = _TEMP_RE.match(name)
    return int(match["pid"]) if match else None


def create_locked_temp(dir_fd: int, target_name: str, mode: int = 0o666) -> tuple[int, str]:
    """Create a new temp next to ``target_name`` and lock it; returns (fd, name).

    ``mode`` goes through the umask like any new file. The lock is taken before the name is
    handed out, so the sweep never sees one of our live temps unlocked for long.
    """
    for _ in range(100):
        name = temp_name_for(target_name)
        try:
            fd = os.open(name, _CREATE_FLAGS, mode, dir_fd=dir_fd)
        except FileExistsError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            os.unlink(name, dir_fd=dir_fd)
            raise
        return fd, name
    raise FileExistsError(f"could not find a free temp name next to {target_name}")
