"""The privileged helper: the only part of the agent that runs as root.

The agent that speaks MQTT runs as the system user ``iot-jobs-agent`` with no privilege. What
needs root is here, behind a unix socket (``iot-jobs-agent-helper.socket``, group
``iot-jobs-agent``, mode 0660): start a handler as the configured user in its own transient
unit, signal that run, reboot. The helper reads the config itself and trusts nothing else
the agent says:

* A run request names a job (id, execution, kind), its document, a step and a phase; never a
  program, an argument list, a user, an environment or a directory. The helper plans the
  document with its own config (:func:`agent.documents.plan_document`, the code the agent
  uses), so the program, the user, the limits and the environment are the config's, and the
  arguments are the document's: exactly what the cloud could make the agent run anyway. Any
  other key is refused, so a request to run another program or as another user fails loudly.
* A signal request names a signal (TERM or KILL), never a process: it reaches the run started
  on the same connection, and only it. A connection that closes (the agent died) kills its run.
* The peer must be root or the agent's user (``SO_PEERCRED``), on top of the socket's mode.

Descriptors travel with ``SCM_RIGHTS``: the agent sends the handler's stdin, stdout, stderr
and progress pipes with the run request, so the output reaches the agent as it always did; the
helper never reads it.

One message per ``SOCK_SEQPACKET`` packet, JSON. Replies: ``{"event": "started", "pid",
"unit"}`` (with the progress FIFO's read end when the run is a transient unit),
``{"event": "exited", "code", "reason"}`` and ``{"error": "refused: ..."}``.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import pwd
import re
import signal
import socket
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.backends import Backend, Launch, Run
from agent.config import Config, load_checked
from agent.documents import DocumentError, plan_document
from agent.errors import AgentError
from agent.execution import step_label
from agent.paths import job_work_dir
from agent.recovery import DEFAULT_SERVICE
from agent.runner import DOCUMENT_FILE, RunRequest, handler_environment

__all__ = ["AGENT_USER", "SOCKET_PATH", "Helper", "Refused", "receive", "send"]

log = logging.getLogger("agent.helper")

SOCKET_PATH = Path("/run/iot-jobs-agent-helper.sock")
AGENT_USER = "iot-jobs-agent"
MAX_MESSAGE = 1 << 20
RUN_FDS = 4  # stdin, stdout, stderr, progress
_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_RUN_KEYS = {"op", "kind", "job_id", "execution_number", "document", "step", "phase"}
_SIGNALS = {"TERM": signal.SIGTERM, "KILL": signal.SIGKILL}
SD_LISTEN_FDS_START = 3


class Refused(AgentError):
    """A request the helper will not carry out; the message says why."""


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | tuple[int, ...] = ()
         ) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], ancillary)


def _unpack(data: bytes, ancillary: list[tuple[int, int, bytes]]) -> tuple[Any, list[int]]:
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
    for fd in fds:
        os.set_inheritable(fd, False)
    if not data:
        return None, fds
    try:
        return json.loads(data), fds
    except ValueError:
        return {"op": "<not JSON>"}, fds


def receive(sock: socket.socket) -> tuple[Any, list[int]]:
    """One message (None at EOF) and the descriptors that came with it (blocking)."""
    data, ancillary, _flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(RUN_FDS * 4),
                                              socket.MSG_CMSG_CLOEXEC)
    return _unpack(data, ancillary)


async def areceive(sock: socket.socket) -> tuple[Any, list[int]]:
    """:func:`receive` on the running loop (``sock`` non-blocking)."""
    loop, fileno = asyncio.get_running_loop(), sock.fileno()
    while True:
        try:
            data, ancillary, _flags, _ = sock.recvmsg(
                MAX_MESSAGE, socket.CMSG_SPACE(RUN_FDS * 4), socket.MSG_CMSG_CLOEXEC)
            return _unpack(data, ancillary)
        except (BlockingIOError, InterruptedError):
            pass
        except (ConnectionResetError, OSError):
            return None, []
        ready = loop.create_future()
        loop.add_reader(fileno, lambda done=ready: done.done() or done.set_result(None))
        try:
            await ready
        finally:
            loop.remove_reader(fileno)


@dataclass(frozen=True)
class RunAsk:
    """A run request, checked for shape (not yet against the config)."""

    kind: str  # "job" or "command"
    job_id: str
    execution_number: int
    document: dict[str, Any]
    step: int
    phase: str

    @classmethod
    def parse(cls, message: dict[str, Any]) -> RunAsk:
        extra = sorted(set(message) - _RUN_KEYS)
        if extra:
            raise Refused(f"refused: a run request names a job, its document and a step; "
                          f"the config decides the rest ({', '.join(extra)} not accepted)")
        kind, job_id = message.get("kind"), message.get("job_id")
        number, step = message.get("execution_number"), message.get("step", 0)
        phase, document = message.get("phase", "run"), message.get("document")
        if kind not in ("job", "command"):
            raise Refused("refused: kind must be job or command")
        if not isinstance(job_id, str) or not _ID.fullmatch(job_id):
            raise Refused("refused: job_id must match [A-Za-z0-9_-]{1,128}")
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise Refused("refused: execution_number must be a whole number >= 1")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise Refused("refused: step must be a whole number >= 0")
        if phase not in ("run", "verify") or not isinstance(document, dict):
            raise Refused("refused: phase must be run or verify, document a JSON object")
        return cls(kind, job_id, number, document, step, phase)


def plan_request(ask: RunAsk, config: Config) -> RunRequest:
    """What the config says this request runs (as the dispatcher and the command executor
    build it), or :class:`Refused`."""
    try:
        if ask.kind == "command":
            from agent.commands.lifecycle import work_of

            if ask.step or ask.phase != "run":
                raise Refused("refused: a command has one step and no verify phase")
            work = work_of(ask.document, config)
            return RunRequest(
                job_id=ask.job_id, execution_number=1, thing_name=config.thing_name,
                argv=work.argv, document=ask.document,
                work_dir=job_work_dir(config.state_dir, ask.job_id, command=True),
                log_path=Path(os.devnull), timeout=work.handler.timeout,
                kill_grace=config.kill_grace, user=work.handler.user,
                limits=work.handler.limits,
                environment={**work.handler.environment, "JOB_PHASE": "run",
                             "COMMAND_EXECUTION_ID": ask.job_id})
        plan = plan_document(ask.document, config)
    except DocumentError as exc:
        raise Refused(f"refused: {exc}") from None
    if ask.step >= len(plan.steps):
        raise Refused(f"refused: the document has {len(plan.steps)} step(s), not "
                      f"{ask.step + 1}")
    step = plan.steps[ask.step]
    argv = step.argv if ask.phase == "run" else step.verify
    if not argv:
        raise Refused("refused: this step has no verify program")
    handler = config.handlers.get(step.handler) if step.handler else None
    return RunRequest(
        job_id=ask.job_id, execution_number=ask.execution_number,
        thing_name=config.thing_name, argv=list(argv), document=ask.document,
        work_dir=job_work_dir(config.state_dir, f"{ask.job_id}.{ask.execution_number}"),
        log_path=Path(os.devnull), timeout=step.timeout, kill_grace=config.kill_grace,
        user=step.user, limits=handler.limits if handler is not None else None,
        environment={**step.environment, "JOB_PHASE": ask.phase,
                     "JOB_STEP": step_label(plan, ask.step), "JOB_STEP_NAME": step.name,
                     "IOT_JOBS_AGENT_SERVICE": DEFAULT_SERVICE})


def _hand_over(work_dir: Path, state_dir: Path, agent_uid: int, user: str | None) -> None:
    """Give the agent-made work dir and its document file to the run user.

    Walked from ``state_dir`` one component at a time with O_NOFOLLOW, and only entries the
    asking peer's user owns: a compromised agent cannot turn this chown onto any other file."""
    if user is None:
        return
    entry = pwd.getpwnam(user)
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fds = [os.open(state_dir, flags)]
    try:
        for part in work_dir.relative_to(state_dir).parts:
            fds.append(os.open(part, flags, dir_fd=fds[-1]))
        info = os.fstat(fds[-1])
        if info.st_uid != agent_uid:
            raise Refused(f"refused: {work_dir} is not the agent's")
        document = os.open(DOCUMENT_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                           dir_fd=fds[-1])
        try:
            doc = os.fstat(document)
            if not stat.S_ISREG(doc.st_mode) or doc.st_nlink != 1 or doc.st_uid != agent_uid:
                raise Refused(f"refused: {work_dir / DOCUMENT_FILE} is not the agent's file")
            os.fchown(document, entry.pw_uid, entry.pw_gid)
        finally:
            os.close(document)
        os.fchown(fds[-1], entry.pw_uid, entry.pw_gid)
    except FileNotFoundError:
        raise Refused(f"refused: {work_dir} was not prepared") from None
    finally:
        for fd in fds:
            os.close(fd)


class Helper:
    """Serves run, signal and reboot requests on a listening unix socket."""

    def __init__(self, config: Config, *, agent_user: str = AGENT_USER,
                 backend: Backend | None = None) -> None:
        self.config = config
        try:
            self.agent_uid = pwd.getpwnam(agent_user).pw_uid
        except KeyError:
            self.agent_uid = -1  # only root may then ask (a test, or a user not created yet)
            log.warning("no user %s: only root may use the helper", agent_user)
        if backend is None:
            from agent import backends

            backend = backends.choose(config, privileged=True)
        self.backend = backend
        self._connections: set[asyncio.Task[None]] = set()

    async def serve(self, listener: socket.socket) -> None:
        listener.setblocking(False)
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            task = asyncio.create_task(self._serve_one(conn))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve_one(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        fds: list[int] = []
        try:
            pid, uid, _gid = array.array("i", conn.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            message, fds = await areceive(conn)  # read first: the refusal then reaches it
            if uid not in (0, self.agent_uid):
                raise Refused(f"refused: uid {uid} is neither root nor the agent's user")
            if not isinstance(message, dict):
                return
            op = message.get("op")
            if op == "run":
                await self._run(conn, RunAsk.parse(message), fds, pid, uid)
            elif op == "reboot" and set(message) == {"op"}:
                await self._reboot(conn)
            else:
                raise Refused(f"refused: unknown request {str(op)[:40]!r} (run, signal for "
                              "the run on the same connection, reboot)")
        except Refused as exc:
            log.warning("%s", exc.message)
            with contextlib.suppress(OSError):
                send(conn, {"error": exc.message})
        except Exception:
            log.exception("helper request failed")
            with contextlib.suppress(OSError):
                send(conn, {"error": "the helper failed (see its log)"})
        finally:
            for fd in fds:
                os.close(fd)
            conn.close()

    async def _run(self, conn: socket.socket, ask: RunAsk, received: list[int],
                   peer: int, peer_uid: int) -> None:
        """Takes ``received`` over (empties it): they are closed once the handler has them,
        or the agent would never read the end of its output."""
        fds = received[:]
        received.clear()
        try:
            if len(fds) != RUN_FDS:
                raise Refused(f"refused: a run request carries {RUN_FDS} descriptors")
            request = plan_request(ask, self.config)
            _hand_over(request.work_dir, Path(self.config.state_dir), peer_uid, request.user)
            launch, process = await self._spawn(request, fds)
        finally:
            for fd in fds:
                os.close(fd)
        run = self.backend.started(launch, process.pid)
        log.info("handler started job_id=%s execution=%d step=%d phase=%s peer=%d pid=%d "
                 "unit=%s", ask.job_id, ask.execution_number, ask.step, ask.phase, peer,
                 process.pid, run.unit or "-")
        send(conn, {"event": "started", "pid": process.pid, "unit": run.unit},
             [launch.progress_fd] if launch.progress_fd is not None else [])
        if launch.progress_fd is not None:
            os.close(launch.progress_fd)
        waiter = asyncio.ensure_future(process.wait())
        listener = asyncio.ensure_future(self._signals(conn, run))
        await asyncio.wait([waiter, listener], return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():  # the agent went away: its run goes too
            log.warning("the agent closed the connection: stopping job_id=%s", ask.job_id)
            self.backend.signal(run, signal.SIGKILL)
            await waiter
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        self.backend.exited(run)
        ending = await self.backend.finished(run, request.kill_grace)
        code = ending.code if ending is not None else process.returncode
        with contextlib.suppress(OSError):
            send(conn, {"event": "exited", "code": code,
                        "reason": ending.reason if ending is not None else None})

    async def _spawn(self, request: RunRequest,
                     fds: list[int]) -> tuple[Launch, asyncio.subprocess.Process]:
        home, popen_user = None, {}
        if request.user is not None:
            entry = pwd.getpwnam(request.user)
            home = entry.pw_dir
            popen_user = {"user": entry.pw_uid, "group": entry.pw_gid,
                          "extra_groups": os.getgrouplist(entry.pw_name, entry.pw_gid)}
        launch = self.backend.command(Launch(
            request.job_id, request.execution_number, list(request.argv),
            handler_environment(request, home, popen_user), request.work_dir, request.user,
            popen_user,
            request.limits))
        progress, move, parked = fds[3], None, False
        if launch.progress_fd is None:  # the handler gets the agent's pipe as fd 3
            try:
                os.fstat(3)
            except OSError:  # free: put the pipe there for the spawn (as the runner does)
                os.dup2(progress, 3)
                parked = True
            else:  # taken (systemd's listening socket): moved in the child
                def move() -> None:
                    os.dup2(progress, 3)
        try:
            process = await asyncio.create_subprocess_exec(
                *launch.argv, stdin=fds[0], stdout=fds[1], stderr=fds[2], env=launch.env,
                cwd=launch.cwd, close_fds=True, start_new_session=True,
                pass_fds=() if launch.progress_fd is not None else (3,), preexec_fn=move,
                **launch.popen_user)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            self.backend.abandoned(launch)
            raise Refused(f"cannot start {request.argv[0]}: {exc}") from None
        finally:
            if parked:
                os.close(3)
        return launch, process

    async def _signals(self, conn: socket.socket, run: Run) -> None:
        """Signal requests for this connection's run, until the agent closes it."""
        while True:
            message, fds = await areceive(conn)
            for fd in fds:
                os.close(fd)
            if message is None:
                return
            if isinstance(message, dict) and set(message) == {"op", "signal"} and \
                    message["op"] == "signal" and message["signal"] in _SIGNALS:
                self.backend.signal(run, _SIGNALS[message["signal"]])
                continue
            log.warning("refused a request on a running connection: %.200r", message)
            with contextlib.suppress(OSError):
                send(conn, {"error": "refused: only {\"op\": \"signal\", \"signal\": \"TERM\" "
                                     "or \"KILL\"} for this connection's run"})

    async def _reboot(self, conn: socket.socket) -> None:
        command = list(self.config.reboot_command)
        log.warning("rebooting the device, as the agent asked command=%s", " ".join(command))
        proc = await asyncio.create_subprocess_exec(
            *command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT)
        output, _ = await proc.communicate()
        text = output.decode(errors="replace").strip().splitlines()
        send(conn, {"event": "rebooted", "code": proc.returncode,
                    "output": text[-1][:300] if text else ""})


def listening_socket(path: Path | None) -> socket.socket:
    """systemd's socket (``LISTEN_FDS``), or a new one at ``path`` (tests, manual runs)."""
    if path is None and os.environ.get("LISTEN_PID") == str(os.getpid()) and \
            int(os.environ.get("LISTEN_FDS", "0")) >= 1:
        return socket.socket(fileno=SD_LISTEN_FDS_START)
    path = path or SOCKET_PATH
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(str(path))
    sock.listen(16)
    return sock


async def run_helper(config_path: Path, socket_path: Path | None, agent_user: str) -> int:
    # Handler programs are checked as root: one the agent's user owns is refused here, or a
    # compromised agent could rewrite it and have the helper run it as root.
    config = load_checked(config_path, state=False)
    helper = Helper(config, agent_user=agent_user)
    listener = listening_socket(socket_path)
    log.info("helper ready socket=%s backend=%s agent_user=%s", socket_path or "(systemd)",
             helper.backend.name, agent_user)
    await helper.serve(listener)
    return 0
