"""After a crash or a reboot: what to do with each execution the journal left open.

:func:`plan_recovery` is the decision, as plain code: given what the journal committed (the
execution and the step of its plan that was current), the plan of its document, what the cloud
says now, whether the old handler process still lives and which boot this is, it returns one
:class:`Action`. :class:`Machine` is the thin edge to the host it needs: the boot id, process
start times, killing a leftover process group, the reboot command.

The rules, in the words an operator reads in ``statusDetails``:

- the cloud already ended it (canceled, removed, timed out, deleted, or deleted and its job id
  reused for a new execution): stop any leftover handler, say nothing more;
- claimed but the plan never started: run it (that is not a re-run);
- a step was running when the agent died: run that step again only if it may be (a YAML
  handler declared ``idempotent``; a Device Client script from handler_dir, which keeps its own
  lock files as under Device Client) and the crash-loop guard allows; otherwise FAILED
  "interrupted". The steps before it are never run again;
- a step asked for a reboot: a new boot id means it happened (the plan goes on with the next
  step, or the handler's ``verify`` decides first); the same boot id means it did not (FAILED);
- a step asked for the agent to be restarted: it was (this is the new agent), so the plan goes
  on with the next step;
- finished but not yet reported: report the stored result. Nothing is run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.claims import REPLACED
from agent.config import Config
from agent.documents import Plan
from agent.jobs.shapes import TERMINAL_STATUSES
from agent.journal import Record, StepRecord
from agent.paths import job_work_dir
from agent.procfs import boot_id, process_cmdline, process_environ, process_start_time

__all__ = ["REBOOT_EXIT_CODE", "RESTART_EXIT_CODE", "Action", "Handler", "Machine",
           "plan_recovery"]

log = logging.getLogger("agent.recovery")

REBOOT_EXIT_CODE = 194
"""A handler that exits with this code asks the agent to reboot the device and then resume."""
RESTART_EXIT_CODE = 195
"""A handler that exits with this code asks the agent to restart itself and then resume (the
shipped restart-services.sh, when it is asked to restart the agent's own service)."""

# REPLACED: the execution was deleted and its (jobId, executionNumber) reused by a new one.
_GONE_CODES = {"ResourceNotFound", "TerminalStateReached", REPLACED}
DEFAULT_SERVICE = "iot-jobs-agent.service"


@dataclass(frozen=True)
class Action:
    kind: str  # forget | done | run | verify | report
    version: int | None = None  # the cloud's current versionNumber, when known
    status: str | None = None  # for "report": the verdict to record (None: already recorded)
    details: dict[str, str] = field(default_factory=dict)
    kill_pid: int | None = None  # a leftover handler process group to stop first
    step: int = 0  # for "run"/"verify": the step of the plan to start at
    completed: int | None = None  # a step that ended by the reboot/restart it asked for


def plan_recovery(record: Record, cloud: tuple[str, int | None], config: Config,
                  machine: Machine, plan: Plan | str,
                  current: StepRecord | None = None) -> Action:
    """The one thing to do for ``record``; see the module docstring for the rules.

    ``plan`` is the plan of the record's document under today's config, or why it has none
    (the config changed); ``current`` is the journal's last started step (None: none started,
    or a journal written before plans had steps).
    """
    cloud_status, cloud_version = cloud
    argvs = []  # what the leftover process may run; none known: it is never signalled
    if not isinstance(plan, str) and plan.steps:
        ran = plan.steps[min(current.step if current else 0, len(plan.steps) - 1)]
        argvs = [ran.argv, *([ran.verify] if ran.verify else [])]
    handler = Handler(job_work_dir(config.state_dir, record.stem), tuple(argvs))
    leftover = record.pid if machine.alive(record.pid, record.pid_start, handler) else None
    if cloud_status in TERMINAL_STATUSES or cloud_status in _GONE_CODES:
        return Action("done", kill_pid=leftover)
    if record.state == "claiming" and cloud_status == "QUEUED":
        return Action("forget")  # the claim never reached the service: claim it afresh
    if record.state == "finished":
        return Action("report", version=cloud_version, kill_pid=leftover)
    if isinstance(plan, str):
        return Action("report", cloud_version, "FAILED", {
            "reason": f"cannot resume this job: {plan}"}, kill_pid=leftover)
    if record.state == "claiming":
        return Action("run", version=cloud_version)
    index = current.step if current is not None else 0
    attempts = current.attempts if current is not None else record.attempts
    if index >= len(plan.steps):
        return Action("report", cloud_version, "FAILED", {
            "reason": "cannot resume this job: its plan has no step " + str(index + 1)},
            kill_pid=leftover)
    step = plan.steps[index]
    more = index + 1 < len(plan.steps)
    if record.state == "rebooting":
        current_boot = machine.boot_id()
        if record.boot_id is None or current_boot is None or current_boot == record.boot_id:
            return Action("report", cloud_version, "FAILED", {
                "reason": "the device did not reboot: the handler asked for a reboot but the "
                          "boot id is unchanged"}, kill_pid=leftover)
        if step.verify:
            return Action("verify", version=cloud_version, step=index)
        if more:
            return Action("run", version=cloud_version, step=index + 1, completed=index)
        return Action("report", cloud_version, "SUCCEEDED", {
            "reason": "rebooted as the handler asked", "step": "rebooted"})
    if record.state == "restarting":
        if more:
            return Action("run", version=cloud_version, step=index + 1, completed=index)
        return Action("report", cloud_version, "SUCCEEDED", {
            "reason": "the agent restarted as the step asked", "step": "restarted"},
            kill_pid=leftover)
    # "running": the agent died while a step ran (or was about to start it).
    if attempts >= config.max_attempts:
        return Action("report", cloud_version, "FAILED", {
            "reason": f"crash loop: the agent stopped {attempts} times while this "
                      "handler ran; not starting it again"}, kill_pid=leftover)
    if step.rerun:
        return Action("run", version=cloud_version, kill_pid=leftover, step=index)
    return Action("report", cloud_version, "FAILED", {
        "reason": _interrupted(plan, index)}, kill_pid=leftover)


def _interrupted(plan: Plan, index: int) -> str:
    step = plan.steps[index]
    why = {"handler": "the handler is not declared idempotent",
           "command": "a runCommand step is never run twice",
           "program": "a program from PATH is never run twice"}.get(step.kind, "")
    if len(plan.steps) == 1:
        return ("interrupted: the agent restarted while the handler ran; not run again because "
                + why)
    return (f"interrupted: the agent restarted while step {index + 1}/{len(plan.steps)} "
            f"({step.name}) ran; not run again because {why}")


@dataclass(frozen=True)
class Handler:
    """What tells a handler process of ours from any other: the work directory it was given
    and the argvs it may run (a step's, and its verify's)."""

    work_dir: Path
    argvs: tuple[tuple[str, ...], ...] = ()


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

    @staticmethod
    def own_service() -> str:
        """The systemd service this agent runs as (read from /proc/self/cgroup), or the
        shipped unit's name when it runs outside one (the sandbox): what restart-services.sh
        compares the services it is asked to restart with, to hand the agent's own restart
        back to the agent."""
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
        except OSError:
            return DEFAULT_SERVICE
        units = [part for line in lines for part in line.split(":", 2)[-1].split("/")
                 if part.endswith(".service")]
        return units[-1] if units else DEFAULT_SERVICE

    def alive(self, pid: int | None, start: int | None, handler: Handler) -> bool:
        """Whether ``pid`` is still the handler we started, so that signalling its group hits
        nothing else: the same start time (the pid was not reused), and it runs the handler's
        argv or carries its ``$JOB_WORK_DIR`` (which survives an ``exec``). A journal planted or
        gone stale can then name no other process."""
        if pid is None or start is None or self.start_time(pid) != start:
            return False
        argv = process_cmdline(pid) or []
        if any(want and argv[-len(want):] == list(want) for want in handler.argvs):
            return True  # a script runs under its interpreter: the argv is the tail
        if process_environ(pid).get("JOB_WORK_DIR") == str(handler.work_dir):
            return True
        log.warning("not signalling pid %d: it is not the handler the journal names (argv %s)",
                    pid, " ".join(argv)[:200] or "unknown")
        return False

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
        from agent import backends

        backend = backends.current()
        if hasattr(backend, "reboot"):  # the unprivileged agent: the helper reboots
            log.warning("rebooting the device through the privileged helper")
            failed = await backend.reboot()
            if failed is None:
                await asyncio.sleep(self.config.reboot_timeout)
            return failed
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
    def move_job_files(*moves: tuple[Path, Path]) -> None:
        """Rename an execution's log and work directory (``(source, target)`` pairs), those
        that exist: an archived execution keeps its files under its own name."""
        for source, target in moves:
            try:
                source.rename(target)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("could not move %s to %s: %s", source, target, exc)

    @staticmethod
    def remove_job_files(log_path: Path, work_dir: Path) -> None:
        with contextlib.suppress(OSError):
            log_path.unlink(missing_ok=True)
        import shutil  # here, not at the top: shutil loads bz2 and lzma (0.65 MB of idle RSS)

        shutil.rmtree(work_dir, ignore_errors=True)
