"""Who wrote a pending entry: a process named so that a restart with the same pid is not it.

A pid alone is reused (a container's server is always pid 1), so an entry names its writer by
boot, pid and the process's start time (``/proc``): a pending entry whose writer is gone is
decided by recovery, one whose writer is alive is in flight and left alone.
"""

from __future__ import annotations

import functools
import os


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            fields = stat_file.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if fields[0] == "Z":  # killed, not yet reaped: gone for our purposes
        return None
    return fields[19]  # field 22 of the line; fields[0] is field 3


@functools.cache
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            return boot.read().strip()
    except OSError:
        return "unknown"


_names: dict[int, str] = {}


def this_process() -> str:
    """This process's name as pending entries record it (by pid: a fork is another)."""
    pid = os.getpid()
    name = _names.get(pid)
    if name is None:
        name = _names[pid] = f"{_boot_id()}:{pid}:{_start_ticks(pid)}"
    return name


def owner_alive(owner: str) -> bool:
    """Whether the process that wrote a pending entry is still running (this one included:
    its own pending entries are changes in flight)."""
    boot, _, rest = owner.partition(":")
    pid_text, _, start = rest.partition(":")
    if boot != _boot_id() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    current = _start_ticks(pid)
    if current is None:
        return False
    if start == "None":  # no /proc when it was written: fall back to the pid
        return True
    return current == start
