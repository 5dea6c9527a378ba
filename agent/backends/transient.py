"""The systemd backend: each run is a transient service unit named after the job.

``systemd-run --pipe --wait`` asks PID 1 to start the handler as a service of its own (it is
not our child: it inherits nothing from the agent, neither its sandbox nor its capabilities),
with the handler's limits and sandbox settings as unit properties, and connects the service's
stdin, stdout and stderr to systemd-run's, so the runner reads the output as it always did.
When the handler's main process exits, times out (the runner's ``systemctl kill``) or is
canceled, systemd stops the unit and so kills its whole cgroup: a ``setsid()`` or a double fork
escapes nothing. Why a service and not ``systemd-run --scope``: a scope is our child and runs in
our namespaces, so it can take cgroup limits (MemoryMax=...) but no sandbox settings
(ProtectSystem=, PrivateNetwork=...), and in the unprivileged design it would inherit the
helper's own sandbox.

The progress descriptor (fd 3) cannot pass through systemd-run, so it becomes a FIFO in the
run directory that a one-line ``sh`` wrapper opens as fd 3 before it executes the handler.

systemd-run's exit status is the handler's exit code, but a signal or the OOM killer shows up
only as "failed": the unit's ``Result``, ``ExecMainCode`` and ``ExecMainStatus`` say which.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
from pathlib import Path

from agent.backends import Backend, Ending, Launch, Run
from agent.config import HandlerLimits

__all__ = ["TransientUnitBackend", "unit_name", "unit_properties"]

log = logging.getLogger("agent.backends.transient")

RUN_DIR = Path(os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or "/run/iot-jobs-agent")
"""Where the progress FIFOs go: the helper's RuntimeDirectory=, else /run/iot-jobs-agent."""
_UNIT_SAFE = re.compile(r"[A-Za-z0-9_]")
PROGRESS_WRAPPER = 'exec 3>"$JOB_PROGRESS_FIFO" || exit 127; exec "$@"'
"""Opens the progress FIFO as fd 3 (blocking until the agent reads it, which it already does),
then becomes the handler: the argv after it is the handler's, untouched."""
_CLD_EXITED, _CLD_KILLED, _CLD_DUMPED = 1, 2, 3


def unit_name(job_id: str, execution_number: int, kind: str = "job") -> str:
    """``iot-jobs-agent-job-<job>-<execution>-<random>.service``; every character of the job
    id outside ``[A-Za-z0-9_]`` is written ``\\xNN`` as systemd-escape does, so no id can make
    a name that means something else (a template instance, a path, another unit's name). The
    random suffix keeps a later step or a re-run from colliding with a unit still stopping."""
    escaped = "".join(ch if _UNIT_SAFE.fullmatch(ch) else
                      "".join(f"\\x{b:02x}" for b in ch.encode()) for ch in job_id)
    escaped = escaped[:160]  # unit names end at 255 characters
    return f"iot-jobs-agent-{kind}-{escaped}-{execution_number}-{secrets.token_hex(3)}.service"


def unit_properties(limits: HandlerLimits | None) -> list[str]:
    """The properties every run's service gets, then the handler's own."""
    props = [
        # The whole cgroup goes when the handler's main process exits or the unit is stopped.
        "KillMode=control-group",
        # A handler killed by the OOM killer ends its run; systemd says so in Result=oom-kill.
        "OOMPolicy=kill",
        "SendSIGHUP=no",
    ]
    return props + (limits.properties() if limits is not None else [])


class TransientUnitBackend(Backend):
    """Runs each handler with ``systemd-run`` as a transient service (needs root: PID 1 starts
    it as the configured user)."""

    name = "systemd"

    def __init__(self, run_dir: Path = RUN_DIR, systemd_run: str | None = None,
                 systemctl: str | None = None) -> None:
        self.run_dir = run_dir
        self.systemd_run = systemd_run or shutil.which("systemd-run") or "/usr/bin/systemd-run"
        self.systemctl = systemctl or shutil.which("systemctl") or "/usr/bin/systemctl"
        self._units: dict[int, tuple[str, HandlerLimits | None, Path, int | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def sweep(self) -> None:
        """Stop every handler unit a previous agent (or helper) left: one that died with
        ``kill -9`` took its systemd-run processes along, not the units they started. Called
        once at start, before any run of ours, as the agent's own cgroup used to do it."""
        result = subprocess.run([self.systemctl, "stop", "--", "iot-jobs-agent-job-*.service"],
                                capture_output=True, text=True, check=False, timeout=120)
        if result.returncode != 0:
            log.warning("could not stop leftover handler units: %s", result.stderr.strip())

    def command(self, launch: Launch) -> Launch:
        unit = unit_name(launch.job_id, launch.execution_number)
        self.run_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
        fifo = self.run_dir / (unit.removesuffix(".service") + ".progress")
        with contextlib.suppress(FileNotFoundError):
            fifo.unlink()
        os.mkfifo(fifo, 0o600)
        # Read end first (non-blocking: no writer yet); our own writer keeps it from reading EOF
        # until the handler opened it, and is dropped once the handler exited. Both before the
        # FIFO goes to the run user: the helper may not override file permissions.
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        keeper = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        if launch.user is not None:
            entry = pwd.getpwnam(launch.user)
            os.chown(fifo, entry.pw_uid, entry.pw_gid)
        env = {**launch.env, "JOB_PROGRESS_FIFO": str(fifo)}
        argv = [self.systemd_run, "--quiet", "--pipe", "--wait", "--service-type=exec",
                f"--unit={unit}", f"--working-directory={launch.cwd}",
                "--description=iot-jobs-agent: job "
                f"{launch.job_id} execution {launch.execution_number}"]
        if launch.user is not None:
            argv += [f"--uid={launch.user}"]
        for prop in unit_properties(launch.limits):
            argv += ["-p", prop]
        for key, value in env.items():
            argv += [f"--setenv={key}={value}"]
        argv += ["--", "/bin/sh", "-c", PROGRESS_WRAPPER, "sh", *launch.argv]
        # systemd-run itself runs as us (root) with a plain environment; PID 1 switches user.
        return Launch(launch.job_id, launch.execution_number, argv,
                      {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                       "SYSTEMD_LOG_LEVEL": "err"}, launch.cwd, None, {}, launch.limits,
                      progress_fd=reader, state=(unit, launch.limits, fifo, keeper))

    def abandoned(self, launch: Launch) -> None:
        if launch.state is not None:
            self._release(*launch.state)

    def started(self, launch: Launch, pid: int) -> Run:
        unit = launch.state[0]
        self._units[pid] = launch.state
        log.info("handler unit job_id=%s execution=%d unit=%s", launch.job_id,
                 launch.execution_number, unit)
        return Run(launch.job_id, launch.execution_number, pid, None, unit=unit)

    def exited(self, run: Run) -> None:
        entry = self._units.get(run.pid)
        if entry is not None and entry[3] is not None:
            os.close(entry[3])  # the progress FIFO reads EOF once the handler's side closes
            self._units[run.pid] = (*entry[:3], None)

    def signal(self, run: Run, sig: int) -> None:
        """``systemctl kill``: every process in the unit's cgroup gets ``sig``."""
        command = [self.systemctl, "kill", f"--signal={int(sig)}", "--kill-whom=all",
                   "--", run.unit or ""]
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            subprocess.run(command, capture_output=True, check=False, timeout=10)
            return
        task = loop.create_task(self._quietly(command))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def finished(self, run: Run, grace: float) -> Ending | None:
        unit, limits, fifo, keeper = self._units.pop(run.pid, (run.unit or "", None, None, None))
        self._release(unit, limits, fifo, keeper)
        show = await self._output(self.systemctl, "show", "--property=Result",
                                  "--property=ExecMainCode", "--property=ExecMainStatus",
                                  "--property=LoadState", "--", unit)
        values = dict(line.split("=", 1) for line in show.splitlines() if "=" in line)
        if values.get("LoadState") == "not-found":
            # Collected already (the usual end): it ended well, with nothing left in its
            # cgroup (systemd keeps a unit loaded while it has processes); systemd-run's
            # status is the truth, and there is nothing to stop or reset.
            return None
        # Whatever is left (a unit still stopping, a failed one kept for its result) goes. A
        # failed `show` (no LoadState) stops it too.
        await self._quietly([self.systemctl, "stop", "--", unit])
        await self._quietly([self.systemctl, "reset-failed", "--", unit])
        if values.get("LoadState") != "loaded":
            return None
        result = values.get("Result", "")
        try:
            code, status = int(values.get("ExecMainCode", "0")), int(
                values.get("ExecMainStatus", "0"))
        except ValueError:
            return None
        exit_code = status if code == _CLD_EXITED else -status if code in (
            _CLD_KILLED, _CLD_DUMPED) else None
        if result == "oom-kill":
            memory = limits.memory_max if limits is not None and limits.memory_max else "unset"
            return Ending(exit_code if exit_code is not None else -signal.SIGKILL,
                          f"killed by the OOM killer (memory_max {memory})")
        return Ending(exit_code) if exit_code is not None else None

    async def close(self) -> None:
        """Stop every unit still running (the agent's stop)."""
        for pid, (unit, *_rest) in list(self._units.items()):
            await self._quietly([self.systemctl, "stop", "--", unit])
            self._units.pop(pid, None)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _release(unit: str, limits: HandlerLimits | None, fifo: Path | None,
                 keeper: int | None) -> None:
        if keeper is not None:
            with contextlib.suppress(OSError):
                os.close(keeper)
        if fifo is not None:
            with contextlib.suppress(OSError):
                fifo.unlink()

    @staticmethod
    async def _output(*command: str) -> str:
        try:
            proc = await asyncio.create_subprocess_exec(
                *command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL)
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
        except (OSError, TimeoutError) as exc:
            log.warning("systemctl failed command=%s error=%s", " ".join(command), exc)
            return ""
        return out.decode(errors="replace")

    async def _quietly(self, command: list[str]) -> None:
        await self._output(*command)
