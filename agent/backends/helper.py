"""The unprivileged agent's backend: every run is started by the privileged helper.

The agent (system user ``iot-jobs-agent``, no capabilities) cannot switch users, start units
or reboot; :mod:`agent.helper` does, as root, and only what its own config allows. This side
asks: one connection per run, carrying the job, its document and the step to run plus the four
pipe ends the handler gets (stdin, stdout, stderr, progress), so the runner reads the output as
it does for a local process. The helper answers with the pid and unit (and, for a transient
unit, the read end of the progress FIFO), then with the exit. Signals go back on the same
connection; closing it stops the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.backends import Backend, Ending, Run
from agent.errors import AgentError
from agent.helper import SOCKET_PATH, areceive, send

__all__ = ["HelperBackend", "HelperRun"]

log = logging.getLogger("agent.backends.helper")


@dataclass
class HelperRun(Run):
    sock: socket.socket | None = None
    exit: asyncio.Future[dict[str, Any]] | None = None
    reader: asyncio.Task[None] | None = field(default=None, repr=False)


class HelperBackend(Backend):
    name = "helper"
    remote = True  # the runner hands the pipes over instead of spawning

    def __init__(self, socket_path: Path = SOCKET_PATH) -> None:
        self.socket_path = socket_path
        self._runs: dict[int, HelperRun] = {}

    async def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, str(self.socket_path))
        except OSError as exc:
            sock.close()
            raise AgentError(f"cannot reach the privileged helper at {self.socket_path}: "
                             f"{exc.strerror or exc} (is iot-jobs-agent-helper.socket "
                             "enabled?)") from None
        return sock

    async def launch(self, ask: dict[str, Any], fds: list[int]) -> tuple[HelperRun, int | None]:
        """Send the run request with ``fds``; the run, and the progress FIFO's read end when
        the helper made one. :class:`AgentError` when the helper refused."""
        sock = await self._connect()
        try:
            send(sock, {"op": "run", **ask}, fds)
            reply, got = await areceive(sock)
        except OSError as exc:
            sock.close()
            raise AgentError(f"the privileged helper failed: {exc}") from None
        if not isinstance(reply, dict) or reply.get("event") != "started":
            sock.close()
            for fd in got:
                with contextlib.suppress(OSError):
                    os.close(fd)
            reason = reply.get("error") if isinstance(reply, dict) else "no answer"
            raise AgentError(f"the privileged helper did not start it: {reason}")
        run = HelperRun(ask["job_id"], ask["execution_number"], int(reply["pid"]), None,
                        unit=reply.get("unit"), sock=sock,
                        exit=asyncio.get_running_loop().create_future())
        run.reader = asyncio.ensure_future(self._read(run))
        self._runs[id(run)] = run
        return run, (got[0] if got else None)

    async def _read(self, run: HelperRun) -> None:
        assert run.sock is not None and run.exit is not None
        while True:
            message, fds = await areceive(run.sock)
            for fd in fds:
                os.close(fd)
            if message is None:
                if not run.exit.done():
                    run.exit.set_result({"code": -signal.SIGKILL,
                                         "reason": "the privileged helper went away"})
                return
            if isinstance(message, dict) and message.get("event") == "exited":
                if not run.exit.done():
                    run.exit.set_result(message)
                return
            log.warning("privileged helper: %s", message)

    async def wait(self, run: HelperRun) -> int:
        """The handler's exit status (Popen's convention) once the helper saw it exit."""
        assert run.exit is not None
        return int((await asyncio.shield(run.exit))["code"])

    def started(self, launch: Any, pid: int) -> Run:  # the helper's runs come from launch()
        raise NotImplementedError

    def signal(self, run: Run, sig: int) -> None:
        name = {signal.SIGTERM: "TERM", signal.SIGKILL: "KILL"}.get(signal.Signals(sig))
        if not isinstance(run, HelperRun) or run.sock is None or name is None:
            return
        with contextlib.suppress(OSError):
            send(run.sock, {"op": "signal", "signal": name})

    async def finished(self, run: Run, grace: float) -> Ending | None:
        assert isinstance(run, HelperRun) and run.exit is not None
        message = await asyncio.shield(run.exit)
        self._drop(run)
        return Ending(int(message["code"]), message.get("reason"))

    def _drop(self, run: HelperRun) -> None:
        if run.reader is not None:
            run.reader.cancel()
        if run.sock is not None:
            run.sock.close()
            run.sock = None
        self._runs.pop(id(run), None)

    async def close(self) -> None:
        """Closing a run's connection makes the helper kill it."""
        for run in list(self._runs.values()):
            self._drop(run)

    async def reboot(self) -> str | None:
        """Ask the helper to run ``reboot_command``; why it failed, or None."""
        sock = await self._connect()
        try:
            send(sock, {"op": "reboot"})
            reply, _ = await areceive(sock)
        finally:
            sock.close()
        if reply is None:  # the shutdown stopped the helper before it answered: under way
            log.info("the privileged helper went away while rebooting: the reboot is under way")
            return None
        if not isinstance(reply, dict) or "error" in reply:
            return f"the privileged helper refused to reboot: {reply}"
        if reply.get("code") != 0:
            return (f"the reboot command failed with exit code {reply.get('code')}"
                    + (f": {reply['output']}" if reply.get("output") else ""))
        return None
