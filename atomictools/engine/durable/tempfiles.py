"""Our files inside the roots: names nobody else uses, created exclusively, held under ``flock``.

Three kinds, each with a strict pattern so the recovery sweep recognises them without guessing:

- a single-file write's temp, ``.<target>.<pid>.<12 hex>.atomictmp``, in the target's directory;
- a change set's member, ``.<target>.<txid>.<role>.<new sha256[:12]|none>.<pid>.<4 hex>.atomicset``:
  a staged new content (role ``new``), a hard-linked backup of the old version (``old`` for a
  replaced file, ``del`` for a deleted one, ``dst`` for a move's destination), or a second
  name of a file the set creates (``crt``, so that an undo can tell the file is the set's).
  The name says which change set it belongs to, which target it is for, and what the target
  holds once the change is applied, so recovery can check the files against each other by
  their hashes even without the journal. A target name too long to fit is cut, and its role
  gets a ``cut`` suffix (such a member never tells recovery its target);
- a change set's claim, ``.<txid>.journal.atomicset``: a symbolic link, made in every directory
  that holds members before the first of them, whose target is the absolute path of the set's
  journal record. A sweep that runs with another state directory learns from it where the
  journal lives, and leaves the set alone instead of deleting what rolling it forward needs.

The exclusive ``flock`` held on a temp or a staged member for the writer's whole life tells a
live writer (lock busy) from a dead one (the kernel drops the lock when the process dies, even
on SIGKILL); the pid in the name is a second signal where there is no lock to take.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

TEMP_MARKER = "atomictmp"
SET_MARKER = "atomicset"
_NAME_MAX = 255
_TXID = r"[0-9]{8}T[0-9]{6}-[0-9a-f]{12}"
_TEMP_RE = re.compile(
    r"^\.(?P<base>.+)\.(?P<pid>[0-9]+)\.(?P<token>[0-9a-f]{12})\." + TEMP_MARKER + "$"
)
_MEMBER_RE = re.compile(
    r"^\.(?P<base>.+)\.(?P<txid>" + _TXID + r")\.(?P<role>new|old|del|dst|crt)(?P<cut>cut)?"
    r"\.(?P<sha>[0-9a-f]{12}|none)\.(?P<pid>[0-9]+)\.[0-9a-f]{4}\." + SET_MARKER + "$"
)
_CLAIM_RE = re.compile(r"^\.(?P<txid>" + _TXID + r")\.journal\." + SET_MARKER + "$")
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

Role = Literal["new", "old", "del", "dst", "crt"]
ROLE_MEANING: dict[str, str] = {
    "new": "the new version, staged",
    "old": "a backup of the version it replaces",
    "del": "a backup of the file it deletes",
    "dst": "a backup of the file a move replaces",
    "crt": "a second name of the new file it creates",
}


@dataclass(frozen=True, slots=True)
class Member:
    """What a change-set member's name says about it."""

    target: str | None
    """The target's name in the same directory (None when the name was too long to keep)."""
    txid: str
    role: Role
    new_sha256_prefix: str | None
    """The first 12 hex digits of the target's content once the change is applied."""
    pid: int


def _fit(base: str, suffix: str) -> tuple[str, bool]:
    """``base`` shortened until ``.<base><suffix>`` fits the file system's name limit."""
    cut = False
    while len(os.fsencode(f".{base}{suffix}")) > _NAME_MAX:
        base, cut = base[:-1], True
    return base, cut


def temp_name_for(target_name: str) -> str:
    """A fresh temp name for ``target_name``, shortened so it fits the file system's limit."""
    suffix = f".{os.getpid()}.{secrets.token_hex(6)}.{TEMP_MARKER}"
    return f".{_fit(target_name, suffix)[0]}{suffix}"


def member_name_for(target_name: str, txid: str, role: Role, new_sha256: str | None) -> str:
    """A fresh name for a change set's staged file or backup of ``target_name``."""
    sha = new_sha256[:12] if new_sha256 else "none"
    tail = f".{sha}.{os.getpid()}.{secrets.token_hex(2)}.{SET_MARKER}"
    base, cut = _fit(target_name, f".{txid}.{role}cut{tail}")
    if not cut:
        return f".{base}.{txid}.{role}{tail}"
    return f".{base}.{txid}.{role}cut{tail}"


def claim_name_for(txid: str) -> str:
    return f".{txid}.journal.{SET_MARKER}"


def is_temp_name(name: str) -> bool:
    """True when ``name`` has exactly the shape of one of our files (temp, member or claim)."""
    return name[:1] == "." and (  # all of ours are hidden: most names need no regex
        _TEMP_RE.match(name) is not None
        or _MEMBER_RE.match(name) is not None
        or _CLAIM_RE.match(name) is not None
    )


def is_single_temp_name(name: str) -> bool:
    """True for a single-file write's temp (not a change set's file)."""
    return _TEMP_RE.match(name) is not None


def parse_member(name: str) -> Member | None:
    match = _MEMBER_RE.match(name)
    if match is None:
        return None
    role: Role = match["role"]  # type: ignore[assignment]  # the pattern allows only these
    return Member(
        target=None if match["cut"] else match["base"],
        txid=match["txid"],
        role=role,
        new_sha256_prefix=None if match["sha"] == "none" else match["sha"],
        pid=int(match["pid"]),
    )


def parse_claim(name: str) -> str | None:
    """The txid a claim's name carries, or None when ``name`` is not a claim."""
    match = _CLAIM_RE.match(name)
    return match["txid"] if match else None


def remove_set_files(dir_fd: int, name: str, txid: str) -> None:
    """Remove a change set's own members and claim from the directory ``name`` in ``dir_fd``
    (before the set removes that directory: they are no longer needed once it committed)."""
    inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        for entry in os.listdir(inner):
            member = parse_member(entry)
            if entry == claim_name_for(txid) or (member is not None and member.txid == txid):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry, dir_fd=inner)
    finally:
        os.close(inner)


def temp_owner_pid(name: str) -> int | None:
    """The pid recorded in a temp's or member's name (a liveness signal next to the lock)."""
    match = _TEMP_RE.match(name) or _MEMBER_RE.match(name)
    return int(match["pid"]) if match else None


def create_locked_temp(
    dir_fd: int, target_name: str, mode: int = 0o666, *, name_for: Callable[[], str] | None = None
) -> tuple[int, str]:
    """Create a new temp next to ``target_name`` and lock it; returns (fd, name).

    ``mode`` goes through the umask like any new file. The lock is taken before the name is
    handed out, so the sweep never sees one of our live temps unlocked for long. ``name_for``
    names a change set's member instead of a plain temp.
    """
    for _ in range(100):
        name = name_for() if name_for is not None else temp_name_for(target_name)
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
