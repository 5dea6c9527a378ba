"""Where a handler's processes live, and how all of them are stopped: the execution backend.

The runner (:mod:`agent.runner`) spawns a handler, drains its output and times it; a backend
decides what "the handler" means as a set of processes, so that nothing a handler starts
outlives its job (a ``setsid()``, a double fork, a child left in the background):

* :mod:`agent.backends.local` (outside systemd: a developer's machine, a container): the agent
  is a child subreaper, so every orphan of a handler becomes the agent's child, and the agent
  kills every descendant of a job when the job ends.
* :mod:`agent.backends.transient` (under systemd, as root): each execution runs in a transient
  scope unit named after the job, with the handler's limits as unit properties; stopping the
  unit kills its whole cgroup, whatever the processes did to their session or parent.

One backend is chosen when the agent starts (:func:`choose`) and used for every run.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.config import Config, HandlerLimits

__all__ = ["Backend", "Ending", "Launch", "Run", "choose", "current", "install"]

log = logging.getLogger("agent.backends")


@dataclass
class Run:
    """One spawned handler, as its backend tracks it."""

    job_id: str
    execution_number: int
    pid: int
    start: int | None  # the leader's start time in clock ticks since boot (procfs field 22)
    unit: str | None = None  # the transient unit it runs in (systemd backend)
    members: dict[int, int] = field(default_factory=dict)  # pid -> start seen in its tree


@dataclass
class Launch:
    """One spawn, as the runner prepared it; a backend's :meth:`Backend.command` may change it."""

    job_id: str
    execution_number: int
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    user: str | None  # the configured user's name (None: the agent's own)
    popen_user: dict[str, Any]  # Popen's user/group/extra_groups, {} to stay as we are
    limits: HandlerLimits | None = None
    progress_fd: int | None = None  # set by a backend that brings its own progress channel
    state: Any = None  # the backend's own, from command() to started()/abandoned()


@dataclass(frozen=True)
class Ending:
    """How a run ended, when the backend knows better than the spawned process's status."""

    code: int  # as Popen's returncode: >= 0 an exit code, < 0 a signal
    reason: str | None = None  # replaces the exit's own reason (the OOM killer)


class Backend(ABC):
    """The seam between the runner and the processes it starts.

    The runner calls :meth:`command` before the spawn (it may wrap the argv), :meth:`started`
    with the pid, :meth:`signal` to stop the run (timeout, cancellation, agent stop) and
    :meth:`finished` once the handler exited and its output is drained: from then on no process
    of the job may run. :meth:`close` is the agent's own stop.
    """

    name = "base"

    def command(self, launch: Launch) -> Launch:
        """What to execute for ``launch`` (a backend may wrap it: systemd-run)."""
        return launch

    def exited(self, run: Run) -> None:
        """The spawned process exited (its output may still be open)."""
        return None

    def abandoned(self, launch: Launch) -> None:
        """The spawn announced by :meth:`command` failed: there is no run to track."""
        return None

    @abstractmethod
    def started(self, launch: Launch, pid: int) -> Run: ...

    @abstractmethod
    def signal(self, run: Run, sig: int) -> None:
        """Send ``sig`` to every process of the run (never raises for a gone process)."""

    @abstractmethod
    async def finished(self, run: Run, grace: float) -> Ending | None:
        """Stop what is left of the run (TERM, then KILL after ``grace``); return how it ended
        when the backend knows better (the handler's own status behind systemd-run, the OOM
        killer), or None."""

    async def close(self) -> None:
        """The agent stops: nothing it started may be left."""
        return None


_CURRENT: Backend | None = None


def install(backend: Backend) -> Backend:
    """Make ``backend`` the one every run uses from now on (the agent's start)."""
    global _CURRENT
    _CURRENT = backend
    return backend


def current() -> Backend:
    """The chosen backend; the local one if none was chosen yet (tests, one-shot tools)."""
    if _CURRENT is None:
        from agent.backends.local import LocalBackend

        install(LocalBackend())
    assert _CURRENT is not None
    return _CURRENT


def under_systemd() -> bool:
    """Started by systemd as a service of the system manager, which can start transient units
    for us: ``INVOCATION_ID`` is set, ``/run/systemd/system`` exists, and we are root."""
    if not (os.environ.get("INVOCATION_ID") and Path("/run/systemd/system").is_dir()
            and os.geteuid() == 0):
        return False
    import shutil  # only here: shutil brings bz2 and lzma, which an idle agent never needs

    return shutil.which("systemd-run") is not None


def choose(config: Config, *, privileged: bool = False) -> Backend:
    """The backend for this agent, chosen once at start (``execution:``); ``privileged``: for
    the helper itself, which reads the same config and never asks itself."""
    wanted = config.execution
    if privileged and wanted == "helper":
        wanted = "auto"
    if not privileged and config.uses_helper():
        from agent.backends.helper import HelperBackend

        backend: Backend = HelperBackend(config.helper_socket)
    elif wanted == "systemd" or (wanted == "auto" and under_systemd()):
        from agent.backends.transient import TransientUnitBackend

        backend = TransientUnitBackend()
        backend.sweep()
    else:
        from agent.backends.local import LocalBackend

        backend = LocalBackend()
    log.info("execution backend=%s", backend.name)
    return install(backend)
