"""What ``/proc`` says about a process, and the boot it runs in: the thin edge that lets the
journal's recovery and the ``status`` command tell a live process from a reused pid.

A pid alone proves nothing after ``kill -9`` or a reboot: the kernel hands it out again. A pid
plus its start time (clock ticks since boot, ``/proc/<pid>/stat`` field 22) plus the boot id
names one process for ever. No imports beyond the standard library, so that the inspection
commands stay fast.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["BOOT_ID_PATH", "boot_id", "process_cmdline", "process_environ",
           "process_start_time"]

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


def process_start_time(pid: int | None) -> int | None:
    """The process's start time in clock ticks since boot, or None if it is gone (or a zombie:
    it runs nothing any more). With the pid, it tells our process from one that reused the pid."""
    if pid is None or pid <= 0:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] == "Z":
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def boot_id(path: Path | str = BOOT_ID_PATH) -> str | None:
    """The kernel's id of this boot (a new one at every boot), or None if unreadable."""
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def process_cmdline(pid: int) -> list[str] | None:
    """The process's argv as the kernel shows it (a script's interpreter first), or None."""
    try:
        data = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [os.fsdecode(arg) for arg in data.split(b"\0")[:-1]] if data else None


def process_environ(pid: int) -> dict[str, str]:
    """The environment the process's program started with (empty if unreadable)."""
    try:
        data = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (os.fsdecode(item).partition("=") for item in data.split(b"\0") if item)
    return {name: value for name, sep, value in pairs if sep}
