"""The running agent's state file, ``state_dir/status.json``: what ``iot-jobs-agent status``
reads while the agent runs, without waking it.

The agent rewrites the file (atomically, see :mod:`agent.files`) when something it shows
changes: the connection, a sync, a job starting, reporting a step or ending, a reload. Never on
a timer, so an idle agent stays asleep; readers compute "for how long" from the timestamps.
On a clean stop the agent writes it one last time with ``phase: stopped``.

Whether the agent is running is never taken from the file alone: after ``kill -9`` or a power
cut it still says "running". :func:`liveness` checks that the pid it names is alive *and* is
the same process (its start time in clock ticks since boot, and the boot id, must match), so a
stale file, or a pid the kernel handed to another process since, reads as "not running".

What the file holds is limited to :data:`FIELDS` (tested): pids, job ids, handler names, steps,
times, connection errors and paths. Never job documents, arguments, environments or anything
read from the key; mode 0640, in ``state_dir``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import NotReadableError
from agent.procfs import boot_id, process_start_time
from agent.views import format_time

__all__ = ["FIELDS", "FORMAT", "STATE_FILE", "Liveness", "liveness", "read_state", "state_path"]

STATE_FILE = "status.json"
FORMAT = 1
FIELDS = frozenset({
    "format", "version", "pid", "pid_start", "boot_id", "phase", "thing_name", "endpoint",
    "config", "job_logs", "started_at", "updated_at", "stopped_at", "connection", "last_sync",
    "last_sync_error", "refusing", "running_jobs", "reload",
})
"""Every top-level key the agent writes (:mod:`agent.monitor`); a test keeps it exact."""


def state_path(state_dir: Path | str) -> Path:
    return Path(state_dir) / STATE_FILE


def read_state(path: Path) -> dict[str, Any] | None:
    """The state file's content; None if there is none or it is not a state file.

    An empty or half-written file (possible only after a power cut: the agent renames complete
    files into place) reads as None, i.e. "no live agent": a running agent rewrites the file
    as soon as it starts. A permission problem is a :class:`NotReadableError`, not a None:
    "cannot tell" must not read as "not running".
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except PermissionError:
        raise NotReadableError(
            f"cannot read the agent's state file {path}: permission denied; run this command "
            "as root (sudo) or as the agent's user") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise NotReadableError(f"cannot read the agent's state file {path}: {exc}") from None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    return data


@dataclass(frozen=True)
class Liveness:
    """Whether the agent that wrote a state file is running now, and why we think so."""

    running: bool
    why: str


def liveness(state: dict[str, Any] | None, *,
             start_time: Callable[[int | None], int | None] = process_start_time,
             current_boot: Callable[[], str | None] = boot_id) -> Liveness:
    """Decide from ``state`` and what ``/proc`` says now (both probes injectable for tests)."""
    if state is None:
        return Liveness(False, "no state file: the agent has not run with this state_dir")
    written = f"at {format_time(state.get('updated_at'))}"
    if state.get("phase") == "stopped":
        return Liveness(False, f"stopped at {format_time(state.get('stopped_at'))}")
    pid = state.get("pid")
    pid = pid if isinstance(pid, int) and not isinstance(pid, bool) else None
    boot = current_boot()
    if boot is not None and state.get("boot_id") not in (None, boot):
        return Liveness(False, f"the device restarted since the agent last wrote its state, "
                               f"{written}")
    if pid is None or start_time(pid) is None:
        return Liveness(False, f"the agent died: pid {pid} is gone; its last state was written "
                               f"{written}")
    if start_time(pid) != state.get("pid_start"):
        return Liveness(False, f"the agent died: pid {pid} is now another process; its last "
                               f"state was written {written}")
    return Liveness(True, f"pid {pid}")

