"""After a crash or a reboot: what to do with each execution the journal left open.

:func:`plan_recovery` is the decision, as plain code: given what the journal committed, what the
cloud says now, whether the old handler process still lives and which boot this is, it returns
one :class:`Action`. :class:`Machine` is the thin edge to the host it needs: the boot id, process
start times, killing a leftover process group, and the reboot command.

The rules, in the words an operator reads in ``statusDetails``:

- the cloud already ended it (canceled, removed, timed out): stop any leftover handler, say
  nothing more;
- claimed but the handler never started: run it (that is not a re-run);
- the handler was running when the agent died: run it again only if the handler is declared
  ``idempotent`` and the crash-loop guard allows; otherwise FAILED "interrupted";
- a reboot was requested: a new boot id means it happened (SUCCEEDED, or the handler's
  ``verify`` decides); the same boot id means it did not (FAILED);
- finished but not yet reported: report the stored result. The handler is never run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.config import Config
from agent.jobs.shapes import TERMINAL_STATUSES
from agent.journal import Record
from agent.procfs import boot_id, process_start_time

__all__ = ["REBOOT_EXIT_CODE", "Action", "Machine", "plan_recovery"]

log = logging.getLogger("agent.recovery")

REBOOT_EXIT_CODE = 194
"""A handler that exits with this code asks the agent to reboot the device and then resume."""

_GONE_CODES = {"ResourceNotFound", "TerminalStateReached"}


@dataclass(frozen=True)
class Action:
    kind: str  # forget | done | run | verify | report
    version: int | None = None  # the cloud's current versionNumber, when known
    status: str | None = None  # for "report": the verdict to record (None: already recorded)
    details: dict[str, str] = field(default_factory=dict)
    kill_pid: int | None = None  # a leftover handler process group to stop first


def plan_recovery(record: Record, cloud: tuple[str, int | None], config: Config,
                  machine: Machine) -> Action:
    """The one thing to do for ``record``; see the module docstring for the rules."""
    cloud_status, cloud_version = cloud
    leftover = record.pid if machine.alive(record.pid, record.pid_start) else None
    if cloud_status in TERMINAL_STATUSES or cloud_status in _GONE_CODES:
        return Action("done", kill_pid=leftover)
    if record.state == "claiming":
        if cloud_status == "QUEUED":
            return Action("forget")  # the claim never reached the service: claim it afresh
        return Action("run", version=cloud_version)
    if record.state == "finished":
        return Action("report", version=cloud_version, kill_pid=leftover)
    handler = config.handlers.get(record.operation)
    if record.state == "rebooting":
        current = machine.boot_id()
        if record.boot_id is None or current is None or current == record.boot_id:
            return Action("report", cloud_version, "FAILED", {
                "reason": "the device did not reboot: the handler asked for a reboot but the "
                          "boot id is unchanged"}, kill_pid=leftover)
        if handler is not None and handler.verify:
            return Action("verify", version=cloud_version)
        return Action("report", cloud_version, "SUCCEEDED", {
            "reason": "rebooted as the handler asked", "step": "rebooted"})
    # "running": the agent died while the handler ran (or was about to start it).
    if record.attempts >= config.max_attempts:
        return Action("report", cloud_version, "FAILED", {
            "reason": f"crash loop: the agent stopped {record.attempts} times while this "
                      "handler ran; not starting it again"}, kill_pid=leftover)
    if handler is not None and handler.idempotent:
        return Action("run", version=cloud_version, kill_pid=leftover)
    return Action("report", cloud_version, "FAILED", {
        "reason": "interrupted: the agent restarted while the handler ran; not run again "
                  "because the handler is not declared idempotent"}, kill_pid=leftover)


class Machine:
    """The host, as recovery and reboots see it. Tests point ``boot_id_path`` and
    ``reboot_command`` at harmless stand-ins."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def boot_id(self) -> str | None:
        return boot_id(self.config.boot_id_path)

    # The process's start time in clock ticks since boot: with the pid, it tells our old
    # handler from an unrelated process that reused the pid.
    start_time = staticmethod(process_start_time)

    def alive(self, pid: int | None, start: int | None) -> bool:
        return pid is not None and start is not None and self.start_time(pid) == start

    async def kill_group(self, pgid: int, grace: float) -> None:
        """Stop a handler left running by a dead agent: SIGTERM, then SIGKILL after ``grace``."""
        log.warning("stopping a handler left over from the previous run pgid=%d", pgid)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if self.start_time(pgid) is None:
                    return
                await asyncio.sleep(0.05)

    async def reboot(self) -> str | None:
        """Run the reboot command; return why it failed, or None if it ran but we are still
        here after ``reboot_timeout`` (the caller reports that)."""
        command = list(self.config.reboot_command)
        log.warning("rebooting the device command=%s", " ".join(command))
        try:
            proc = await asyncio.create_subprocess_exec(
                *command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT)
            output, _ = await asyncio.wait_for(proc.communicate(), 120)
        except (OSError, TimeoutError) as exc:
            return f"the reboot command {command[0]} could not run: {exc}"
        if proc.returncode != 0:
            text = output.decode(errors="replace").strip().splitlines()
            return (f"the reboot command failed with exit code {proc.returncode}"
                    + (f": {text[-1][:300]}" if text else ""))
        await asyncio.sleep(self.config.reboot_timeout)
        return None

    @staticmethod
    def remove_job_files(log_path: Path, work_dir: Path) -> None:
        with contextlib.suppress(OSError):
            log_path.unlink(missing_ok=True)
        shutil.rmtree(work_dir, ignore_errors=True)
