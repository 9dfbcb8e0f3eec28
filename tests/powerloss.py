"""Mounting the power-loss file system (``tests/powerloss_fs.py``) for a test, and cutting power.

``PowerLossMount(base)`` keeps the durable disk in ``base/disk`` and mounts it at ``base/mnt``
through the forgetful file system. ``cut()`` cuts the power (the disk then holds exactly what was
made durable) and unmounts; ``mount()`` brings the machine back up on that disk, at the same
path, so journals that name absolute paths still find them.

``unavailable()`` says why the file system cannot be mounted here (not root, no /dev/fuse, no
libfuse 3, no mfusepy), for a test to skip with that reason.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

FS = Path(__file__).with_name("powerloss_fs.py")
MOUNT_SECONDS = 20.0


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the power-loss file system mounts FUSE as root (run as uid 0, as CI does)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine: FUSE cannot mount"
    if ctypes.util.find_library("fuse3") is None:
        return "libfuse 3 is not installed (.ci/run installs the Debian package fuse3)"
    if importlib.util.find_spec("mfusepy") is None:
        return "mfusepy is not installed (it is in the dev extra)"
    return None


class PowerLossMount:
    def __init__(self, base: Path) -> None:
        self.disk = base / "disk"
        self.mnt = base / "mnt"
        self.disk.mkdir(parents=True, exist_ok=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.log = base / "fs.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def mount(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(FS), str(self.disk), str(self.mnt)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + MOUNT_SECONDS
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the power-loss file system did not mount: {self.log_text()}")
            time.sleep(0.02)

    def cut(self) -> None:
        """Cut the power: what was not made durable is gone; then unmount."""
        with open(self.mnt / ".powercut", "w") as control:
            control.write("cut")
        self.unmount()

    def unmount(self) -> None:
        """Unmount (the mount answers EIO once the power is cut, so do not ask it first)."""
        if self.proc is None:
            return
        unmount = ["fusermount3", "-u", str(self.mnt)]
        if subprocess.run(unmount, capture_output=True, check=False).returncode != 0:
            # busy: detach it now; it goes when its last user does
            subprocess.run([*unmount, "-z"], capture_output=True, check=False)
        try:
            self.proc.wait(timeout=MOUNT_SECONDS)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
