"""The local backend: the agent is a child subreaper and kills every descendant of a job.

Outside systemd (a developer's machine, a container) there is no cgroup to stop, and a process
group is not enough: a handler's child may ``setsid()`` (a new group and session) or fork twice
(its parent exits, so it is no longer below the handler). With ``PR_SET_CHILD_SUBREAPER`` such
an orphan is re-parented to the agent instead of PID 1, so it stays findable: every process of
a job is below its handler, or a child of the agent that the agent did not start.

Which job an adopted orphan belongs to, with several running at once, is told by positive
evidence only: it was seen below the job's handler (a scan every :data:`SCAN_INTERVAL` while
jobs run), it is in the job's session or process group, or its environment carries the job's
``JOB_ID`` and ``EXECUTION_NUMBER``. An orphan that has shed all three (setsid, cleared
environment, double fork between two scans) is killed when the last job running ends: no
process a handler starts outlives every job it could have come from, and with one job at a
time (the default) that is exactly its own job.

The agent reaps the orphans it adopts (they would stay zombies otherwise), but never a process
it spawned itself: those belong to asyncio's child watcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from agent.backends import Backend, Ending, Launch, Run
from agent.procfs import process_start_time

__all__ = ["LocalBackend", "become_subreaper"]

log = logging.getLogger("agent.backends.local")

PR_SET_CHILD_SUBREAPER = 36
SCAN_INTERVAL = 1.0
"""Seconds between scans of a running job's process tree (and reaps of adopted orphans)."""


def become_subreaper() -> bool:
    """Ask the kernel (3.4+) to re-parent our orphaned descendants to us; False if refused."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0:
            return True
        reason = os.strerror(ctypes.get_errno())
    except (OSError, AttributeError) as exc:
        reason = str(exc)
    log.warning("cannot become a child subreaper (%s): processes a handler detaches with "
                "setsid or a double fork may outlive its job", reason)
    return False


@dataclass(frozen=True)
class Proc:
    pid: int
    state: str
    ppid: int
    pgid: int
    sid: int
    start: int


def _scan() -> dict[int, Proc]:
    """Every process /proc shows, as of now (a process gone mid-scan is skipped)."""
    procs: dict[int, Proc] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as file:
                fields = file.read().rsplit(b")", 1)[1].split()
            pid = int(entry.name)
            procs[pid] = Proc(pid, fields[0].decode(), int(fields[1]), int(fields[2]),
                              int(fields[3]), int(fields[19]))
        except (OSError, IndexError, ValueError):
            continue
    return procs


def _environ_marks(pid: int, marks: tuple[bytes, ...]) -> bool:
    try:
        environ = b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return all(mark in environ for mark in marks)


class LocalBackend(Backend):
    name = "local"

    def __init__(self, subreaper: bool = True) -> None:
        self.subreaper = become_subreaper() if subreaper else False
        self._me = os.getpid()
        self._active: dict[int, Run] = {}  # by leader pid
        self._spawning = 0
        self._busy_since: int | None = None  # start ticks of the first run of this busy spell
        self._scanner: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ the seam

    def command(self, launch: Launch) -> Launch:
        self._spawning += 1
        return launch

    def abandoned(self, launch: Launch) -> None:
        """The spawn announced by :meth:`command` failed: no run to track."""
        self._spawning = max(0, self._spawning - 1)

    def started(self, launch: Launch, pid: int) -> Run:
        self._spawning = max(0, self._spawning - 1)
        run = Run(launch.job_id, launch.execution_number, pid, process_start_time(pid))
        if not self._active and self._busy_since is None:
            self._busy_since = run.start if run.start is not None else 0
        self._active[pid] = run
        if self._scanner is None or self._scanner.done():
            with contextlib.suppress(RuntimeError):  # no running loop: scans only at the end
                self._scanner = asyncio.get_running_loop().create_task(self._scan_loop())
        return run

    def signal(self, run: Run, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run.pid, sig)
        for pid in self._processes(run, last=False):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    async def finished(self, run: Run, grace: float) -> Ending | None:
        self._active.pop(run.pid, None)
        last = not self._active and not self._spawning
        targets = self._processes(run, last=last)
        if targets:
            log.info("stopping processes left by the handler job_id=%s execution=%d count=%d",
                     run.job_id, run.execution_number, len(targets))
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in targets:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, sig)
                targets = await self._gone(targets, grace if sig == signal.SIGTERM else 5.0)
                if not targets:
                    break
                # New ones may have been forked before the TERM landed.
                targets |= self._processes(run, last=last)
            if targets:
                log.warning("processes of the job would not die job_id=%s pids=%s",
                            run.job_id, ",".join(map(str, sorted(targets))))
        if last:
            self._busy_since = None
        return None

    async def close(self) -> None:
        """Kill every process left by a job (any run still tracked, and adopted orphans)."""
        for run in list(self._active.values()):
            self.signal(run, signal.SIGKILL)
            await self.finished(run, 0.0)
        if self._scanner is not None:
            self._scanner.cancel()

    # ------------------------------------------------------------------ finding processes

    def _processes(self, run: Run, *, last: bool) -> set[int]:
        """The live processes of ``run`` (never the agent, nor another run's handler): what is
        below its handler or its known members, what sits in its session or group, and the
        orphans we adopted that carry its marks (``last``: every orphan adopted since the first
        of the jobs running together started)."""
        procs = _scan()
        children: dict[int, list[int]] = {}
        for proc in procs.values():
            children.setdefault(proc.ppid, []).append(proc.pid)
        others = set(self._active)
        marks = (f"\0JOB_ID={run.job_id}\0".encode(),
                 f"\0EXECUTION_NUMBER={run.execution_number}\0".encode())
        since = self._busy_since if self._busy_since is not None else run.start or 0
        roots: set[int] = set()
        if run.pid in procs and procs[run.pid].start == run.start:
            roots.add(run.pid)
        roots.update(pid for pid, start in run.members.items()
                     if pid in procs and procs[pid].start == start)
        for proc in procs.values():
            if proc.pid in (self._me, run.pid) or proc.pid in others:
                continue
            in_session = run.pid in (proc.sid, proc.pgid)
            adopted = proc.ppid == self._me and proc.start >= since
            if in_session or (adopted and (last or _environ_marks(proc.pid, marks))):
                roots.add(proc.pid)
        found: set[int] = set()
        todo = list(roots)
        while todo:
            pid = todo.pop()
            if pid in found or pid == self._me or pid in others:
                continue
            found.add(pid)
            todo.extend(children.get(pid, ()))
        found.discard(run.pid)  # the handler itself is the runner's (a zombie until reaped)
        return {pid for pid in found if procs[pid].state != "Z" or procs[pid].ppid == self._me}

    async def _gone(self, pids: set[int], timeout: float) -> set[int]:
        """Wait until ``pids`` are dead (reaping our adopted ones); the ones still alive."""
        deadline = time.monotonic() + timeout
        while True:
            left = {pid for pid in pids if not self._dead(pid)}
            if not left or time.monotonic() >= deadline:
                return left
            await asyncio.sleep(0.02)

    def _dead(self, pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat", "rb") as file:
                fields = file.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            return True
        if fields[0] != b"Z":
            return False
        if int(fields[1]) == self._me:  # ours by adoption (never a handler: see _processes)
            self._reap(pid)
        return True

    @staticmethod
    def _reap(pid: int) -> None:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        except OSError as exc:
            if exc.errno != errno.ECHILD:
                raise

    async def _scan_loop(self) -> None:
        """While jobs run: note each job's tree (so its orphans stay attributed after their
        parent exits) and reap the orphans we adopted that already exited."""
        while self._active or self._spawning:
            await asyncio.sleep(SCAN_INTERVAL)
            procs = _scan()
            children: dict[int, list[int]] = {}
            for proc in procs.values():
                children.setdefault(proc.ppid, []).append(proc.pid)
            leaders = set(self._active)
            for run in list(self._active.values()):
                todo = [run.pid, *run.members]
                seen: set[int] = set()
                while todo:
                    pid = todo.pop()
                    if pid in seen or pid not in procs:
                        continue
                    seen.add(pid)
                    if pid != run.pid:
                        run.members.setdefault(pid, procs[pid].start)
                    todo.extend(children.get(pid, ()))
            if self._spawning or self._busy_since is None:
                continue  # a handler not yet tracked could look like an orphan
            for proc in procs.values():
                if (proc.state == "Z" and proc.ppid == self._me and proc.pid not in leaders
                        and proc.start >= self._busy_since):
                    self._reap(proc.pid)
