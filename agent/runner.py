"""Run one job execution's handler program and say how it ended.

A handler may flood its output, ignore SIGTERM, leave grandchildren behind or never read stdin;
none of that may hang the agent, grow its memory or expose the agent's environment and files.
Hence: no shell and a clean environment; a session (so a process group) of its own, and an
execution backend (:mod:`agent.backends`) that finds every process the handler started, setsid
and double fork included, so that stopping it reaches all of them and none outlives the run;
output consumed by protocol callbacks as it arrives
on both pipes, keeping only a 4 KiB head and tail in memory; and the exit status taken from the
child watcher, because Python 3.11's ``Process.wait()`` also waits for the pipes to close, which
a grandchild can delay forever. Nothing raises for a handler's misbehaviour or a failure to
start: every run ends in a :class:`RunResult`, and :func:`status_details` makes it a statusDetails
map the Jobs service accepts whatever the handler printed.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import errno
import functools
import json
import logging
import os
import pwd
import re
import shlex
import signal
import stat
import subprocess
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from agent import backends
from agent.backends import Backend, Launch, Run
from agent.config import SAFE_PATH, HandlerLimits
from agent.errors import AgentError
from agent.hygiene import Neutraliser, Redactor, neutralise, secrets_of
from agent.paths import STATE_MODE

__all__ = ["DOCUMENT_FILE", "PROGRESS_FD", "SAFE_PATH", "HandlerProcess", "RunRequest",
           "RunResult", "format_duration", "run_handler", "sanitize_detail", "status_details"]

log = logging.getLogger("agent.runner")

PROGRESS_FD = 3
DOCUMENT_FILE = "job-document.json"
HEAD_BYTES = TAIL_BYTES = MAX_PROGRESS_LINE = 4096
DRAIN_GRACE = 2.0
"""Seconds the output may stay open after the handler exited before its group is killed."""
MAX_DETAIL_VALUE = 1024
_BAD_KEY_CHARS = re.compile(r"[^a-zA-Z0-9:_-]")

ProgressCallback = Callable[[dict[str, str]], None]


def _park_progress_fd() -> int | None:
    """Hold fd 3 with /dev/null from import on, if it is free; return a spare /dev/null fd.

    Why: the progress pipe must reach a handler as fd 3, and the only way ``subprocess`` offers
    to put it there is a ``preexec_fn`` dup2, which rules out vfork: every spawn then fork()s
    the whole agent, copying its page tables (3.3 ms per job for a 40 MB agent, against 0.3 ms
    with vfork; measured by bench/, issue 5). With fd 3 parked while the agent starts (nothing
    else has opened it yet), a spawn instead dup2s the pipe onto fd 3 in the agent, passes it
    through, and parks /dev/null there again. If fd 3 is already taken (tests, an unusual
    parent), this returns None and spawns keep the ``preexec_fn`` dup2.
    """
    fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)  # the lowest free descriptor
    if fd != PROGRESS_FD:
        os.close(fd)
        return None
    return os.dup(fd)  # non-inheritable, like fd 3 itself: a source to park fd 3 again


_PARKED = _park_progress_fd()


@dataclass(frozen=True)
class RunRequest:
    job_id: str
    execution_number: int
    thing_name: str
    argv: list[str]
    document: dict[str, Any]
    work_dir: Path  # created if missing
    log_path: Path  # full output appended here (parent created if missing)
    timeout: float | None = None
    kill_grace: float = 10.0
    user: str | None = None
    environment: dict[str, str] = field(default_factory=dict)
    max_log_bytes: int = 10 * 1024 * 1024  # of handler output per run; the rest is only counted
    limits: HandlerLimits | None = None  # cgroup and sandbox settings (systemd backend)
    # What the privileged helper is asked to run (it plans the document itself): the kind of
    # execution, and the step of its plan and the phase (run, or verify after a reboot).
    kind: Literal["job", "command"] = "job"
    step: int = 0
    phase: str = "run"


@dataclass(frozen=True)
class RunResult:
    outcome: str  # "succeeded" | "failed" | "timed_out" | "canceled" | "not_started"
    reason: str
    exit_code: int | None
    signal: int | None
    pid: int | None
    duration: float
    output_head: str
    output_tail: str  # the output after the head: empty if it all fit in the head
    output_bytes: int
    started: float = 0.0  # time.monotonic() at spawn
    ended: float = 0.0  # time.monotonic() when the handler exited
    # Each stream on its own, for job documents that judge stderr (Device Client's allowStdErr)
    # and report the two separately (its stdout/stderr statusDetails keys).
    stdout_tail: str = ""
    stderr_tail: str = ""
    stderr_lines: int = 0


class _Output:
    """Combined stdout+stderr, logged up to a cap and summarized by a head and a tail. Fed by the
    transports' callbacks, so a flood costs CPU and capped disk but never memory."""

    def __init__(self, cap: int) -> None:
        self.log_file: BinaryIO | None = None
        self.cap, self.total, self.logged = max(0, cap), 0, 0
        self.head, self.tail = bytearray(), bytearray()
        self.dropping, self.line_start = False, True
        self.neutraliser = Neutraliser()  # the log is read on terminals (agent.hygiene)

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = HEAD_BYTES - len(self.head)
        rest = data[room:] if room > 0 else data
        self.head += data[:room] if room > 0 else b""
        if len(rest) >= TAIL_BYTES:
            self.tail[:] = rest[-TAIL_BYTES:]
        elif rest:
            self.tail += rest
            del self.tail[:-TAIL_BYTES]
        part = data[: self.cap - self.logged]
        self.logged += len(part)
        self.write(self.neutraliser.feed(part))
        if len(part) < len(data) and not self.dropping:
            self.dropping = True
            self.note(f"[iot-jobs-agent: output beyond {self.cap} bytes is counted, not logged]")

    def note(self, line: str) -> None:
        """A line of our own, starting on a fresh line whatever the handler left."""
        self.write(self.neutraliser.flush())
        self.write(("" if self.line_start else "\n").encode() + neutralise(line.encode())
                   + b"\n")

    def write(self, data: bytes) -> None:
        """File writes, flushed at once (``iot-jobs-agent log --follow`` shows output as it
        comes; pipe reads are large, so a flood still makes few syscalls); a full or broken
        disk costs the log, never the run."""
        if self.log_file is None or not data:
            return
        try:
            self.log_file.write(data)
            self.log_file.flush()
        except (OSError, ValueError) as exc:
            log.warning("handler log write failed, logging stopped error=%s", exc)
            self.log_file = None
        self.line_start = data.endswith(b"\n")

    def texts(self) -> tuple[str, str]:
        """Head and tail, without a replacement character where only our cut split a character:
        one stream when contiguous, else the tail's leading continuation bytes are dropped."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        head, tail = decoder.decode(bytes(self.head), final=not self.tail), bytes(self.tail)
        if self.total > len(self.head) + len(tail):
            decoder.reset()
            tail = tail.lstrip(bytes(range(0x80, 0xC0)))
        return head, decoder.decode(tail, final=True)


class _Stream:
    """One of stdout/stderr on its own: its last TAIL_BYTES and how many lines it printed
    (a last line without a newline counts too)."""

    def __init__(self) -> None:
        self.tail, self.total, self.newlines, self.last = bytearray(), 0, 0, b"\n"

    def feed(self, data: bytes) -> None:
        if not data:
            return
        self.total += len(data)
        self.newlines += data.count(b"\n")
        self.last = data[-1:]
        self.tail += data[-TAIL_BYTES:]
        del self.tail[:-TAIL_BYTES]

    @property
    def lines(self) -> int:
        return self.newlines + (self.last != b"\n")

    def text(self) -> str:
        data = bytes(self.tail)
        if self.total > len(data):  # cut: drop a character split by the cut
            data = data.lstrip(bytes(range(0x80, 0xC0)))
        return data.decode("utf-8", "replace")


class _ProgressReader(asyncio.Protocol):
    """Splits the progress pipe into lines; an overlong line is skipped, never buffered."""

    def __init__(self, report: Callable[[bytes], None], closed: Callable[[], None]) -> None:
        self.report, self.closed = report, closed
        self.buffer, self.skipping = bytearray(), False

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        start = 0
        while (end := self.buffer.find(b"\n", start)) >= 0:
            line, start = bytes(self.buffer[start:end]), end + 1
            if self.skipping or len(line) > MAX_PROGRESS_LINE:
                log.debug("progress line longer than %d bytes ignored", MAX_PROGRESS_LINE)
                self.skipping = False
            else:
                self.report(line)
        del self.buffer[:start]
        if len(self.buffer) > MAX_PROGRESS_LINE:
            self.buffer.clear()
            self.skipping = True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.buffer and not self.skipping:
            self.report(bytes(self.buffer))
        self.closed()


class _HandlerProtocol(asyncio.SubprocessProtocol):
    def __init__(self, process: HandlerProcess) -> None:
        self.process = process

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd in (1, 2):
            self.process._received(fd, data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd in (1, 2):
            self.process._stream_closed(fd)

    def process_exited(self) -> None:
        self.process._ended = time.monotonic()
        if self.process._run is not None:
            self.process._backend.exited(self.process._run)
        self.process._exited.set()


class _RemotePipe(asyncio.Protocol):
    """stdout or stderr of a handler the helper started, fed to the runner like a child's."""

    def __init__(self, process: HandlerProcess, fd: int) -> None:
        self.process, self.fd = process, fd

    def data_received(self, data: bytes) -> None:
        self.process._received(self.fd, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.process._stream_closed(self.fd)


class _RemoteTransport:
    """What the runner asks of its subprocess transport, for a handler the helper started."""

    def __init__(self, pid: int) -> None:
        self.pid, self.returncode = pid, None
        self.pipes: list[asyncio.BaseTransport] = []
        self.waiter: asyncio.Future[None] | None = None

    def get_pid(self) -> int:
        return self.pid

    def get_returncode(self) -> int | None:
        return self.returncode

    def close(self) -> None:
        for pipe in self.pipes:
            pipe.close()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.cancel()


def _identity(user: str | None) -> tuple[str | None, dict[str, Any]]:
    """The run user's home and the Popen arguments that switch to it ({} to stay as we are)."""
    euid = os.geteuid()
    try:
        entry = pwd.getpwuid(euid) if user is None else pwd.getpwnam(user)
    except KeyError:
        if user is None:
            return None, {}
        raise AgentError(f"cannot run as user {user!r}: no such user") from None
    if entry.pw_uid == euid:
        return entry.pw_dir, {}
    if euid != 0:
        raise AgentError(f"cannot run as user {user!r}: the agent runs as uid {euid}, and only "
                         f"root can switch users")
    groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
    return entry.pw_dir, {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": groups}


def _open_log(path: Path) -> int:
    """The job's log, appended to: never through a symlink, never a FIFO or device planted
    there (O_NONBLOCK keeps a FIFO from blocking the open; regular files ignore it)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    fd = os.open(path, flags, 0o600)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    os.set_blocking(fd, True)
    return fd


def _home(home: str | None, user: dict[str, Any], work_dir: Path) -> str:
    """The run user's home if it has one it owns, else the work dir (which it does own): a
    system user's home (``/nonexistent``, or root's directory) is no place to write."""
    if home:
        with contextlib.suppress(OSError):
            info = os.stat(home)
            if stat.S_ISDIR(info.st_mode) and info.st_uid == user.get("user", os.geteuid()):
                return home
    return str(work_dir)


def handler_environment(req: RunRequest, home: str | None,
                        user: dict[str, Any]) -> dict[str, str]:
    """The whole environment of a handler: configured variables may replace PATH/LANG/HOME,
    never JOB_* (the privileged helper builds it with this too, never taking the agent's)."""
    return {"PATH": SAFE_PATH, "LANG": "C.UTF-8",
            "HOME": _home(home, user, req.work_dir),
            **req.environment, "JOB_ID": req.job_id, "THING_NAME": req.thing_name,
            "EXECUTION_NUMBER": str(req.execution_number), "JOB_WORK_DIR": str(req.work_dir),
            "JOB_DOCUMENT": str(req.work_dir / DOCUMENT_FILE), "JOB_PROGRESS_FD": str(PROGRESS_FD)}


def _parse_progress(line: bytes) -> dict[str, str] | None:
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):  # includes UnicodeDecodeError; deep nesting
        return None
    if not isinstance(value, dict) or not value:
        return None
    return {str(k): v if isinstance(v, str) else json.dumps(v, separators=(",", ":"),
                                                             ensure_ascii=False)
            for k, v in value.items()}


def _describe_exit(code: int) -> str:
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"killed by signal {-code} ({signal.Signals(-code).name})"
    except ValueError:
        return f"killed by signal {-code}"


class HandlerProcess:
    """One handler run: ``start()``, then ``wait()``; ``cancel()`` at any time, from any task.

    A supervisor task owns the process from ``start()`` on, so the timeout holds even while
    nobody awaits ``wait()``, and cancelling a task blocked in ``wait()`` or ``cancel()`` leaves
    the handler supervised. A cancelled supervisor (the loop is closing) SIGKILLs the group.
    """

    def __init__(self, request: RunRequest, on_progress: ProgressCallback | None = None, *,
                 backend: Backend | None = None) -> None:
        self.request = request
        self._backend = backend or backends.current()
        self._run: Run | None = None
        self._on_progress = on_progress
        self._pid: int | None = None
        self._result: RunResult | None = None
        self._begun = False
        self._ready = asyncio.Event()  # start() has finished, whichever way
        self._supervisor: asyncio.Task[RunResult] | None = None
        self._stop_reason: tuple[str, str] | None = None  # (outcome, reason) if we stop it
        self._stop, self._exited, self._pipes_closed = (asyncio.Event() for _ in range(3))
        self._open_pipes = 3  # stdout, stderr, progress
        self._started = self._ended = 0.0
        self._output = _Output(request.max_log_bytes)
        self._streams = (_Stream(), _Stream())  # stdout, stderr
        # Secret environment values never reach the log, the result or progress (one redactor
        # per stream, as each holds back a secret's possible start; agent.hygiene).
        secrets = secrets_of(request.environment)
        self._redactors = (Redactor(secrets), Redactor(secrets))
        self._redact = Redactor(secrets)
        self._transport: asyncio.SubprocessTransport | None = None
        self._progress: asyncio.ReadTransport | None = None

    @property
    def pid(self) -> int | None:
        """Also the process group id: the handler leads its own session."""
        return self._pid

    @property
    def running(self) -> bool:
        """True from spawn until the result is known (output drained, group cleaned up)."""
        return self._supervisor is not None and not self._supervisor.done()

    async def start(self) -> None:
        """Spawn the handler; a failure to spawn is a ``not_started`` result, never an exception."""
        if self._begun:
            return
        self._begun = True
        self._started = self._ended = time.monotonic()
        try:
            if self._stop_reason is None:
                await self._spawn(*self._prepare())
            else:
                self._conclude(self._unrun(*self._stop_reason))
        except AgentError as exc:
            self._conclude(self._unrun("not_started", exc.message))
        except asyncio.CancelledError:  # no supervisor yet: nothing else would ever stop it
            self._signal(signal.SIGKILL)
            self._conclude(self._unrun("canceled", "start() was cancelled"))
            raise
        finally:
            self._ready.set()

    def _unrun(self, outcome: str, reason: str) -> RunResult:
        return RunResult(outcome, reason, None, None, self._pid, 0.0, "", "", 0, self._started,
                         self._started)

    def _prepare(self) -> tuple[dict[str, str], dict[str, Any], bytes]:
        """Log file; 0700 work dir and 0600 document file, both owned by the run user.

        Changing the directory through an O_NOFOLLOW descriptor and recreating the file with
        O_EXCL means a run user who owned the directory before cannot turn root's chmod, chown or
        write onto another file with a symlink or a hard link.
        """
        req = self.request
        try:
            req.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._output.log_file = os.fdopen(_open_log(req.log_path), "ab")
        except OSError as exc:
            raise AgentError(f"cannot open log {req.log_path}: {exc.strerror or exc}") from None
        self._write_log(f"start job {req.job_id} execution {req.execution_number}: "
                        f"{shlex.join(req.argv)}")
        if not req.argv:
            raise AgentError("no handler command configured")
        if getattr(self._backend, "remote", False):  # the helper switches users, not us
            home, user = None, {}
        else:
            home, user = _identity(req.user)
        owner = (user["user"], user["group"]) if user else None
        try:
            document = (json.dumps(req.document, ensure_ascii=False) + "\n").encode()
        except (TypeError, ValueError) as exc:
            raise AgentError(f"job document is not JSON: {exc}") from None
        try:
            req.work_dir.parent.mkdir(mode=STATE_MODE, parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(req.work_dir, 0o700)
            # Everything below goes through this descriptor: a symlink planted where the work
            # dir goes is refused (ELOOP), never followed.
            fd = os.open(req.work_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fchmod(fd, 0o700)
                if owner:
                    os.fchown(fd, *owner)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(DOCUMENT_FILE, dir_fd=fd)
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                with os.fdopen(os.open(DOCUMENT_FILE, flags, 0o600, dir_fd=fd), "wb") as file:
                    if owner:
                        os.fchown(file.fileno(), *owner)
                    file.write(document)
            finally:
                os.close(fd)
        except OSError as exc:
            where = req.work_dir / exc.filename if exc.filename == DOCUMENT_FILE else \
                exc.filename or req.work_dir
            raise AgentError(f"cannot prepare work dir: {where}: {exc.strerror or exc}") from None
        return handler_environment(req, home, user), user, document

    async def _spawn_remote(self, document: bytes) -> None:
        """The privileged helper spawns it: it gets our pipe ends instead of a fork."""
        req, loop = self.request, asyncio.get_running_loop()
        pipes = [os.pipe() for _ in range(4)]  # stdin, stdout, stderr, progress
        theirs = [pipes[0][0], pipes[1][1], pipes[2][1], pipes[3][1]]
        ours = [pipes[0][1], pipes[1][0], pipes[2][0], pipes[3][0]]
        try:
            run, fifo = await self._backend.launch(  # type: ignore[attr-defined]
                {"kind": req.kind, "job_id": req.job_id,
                 "execution_number": req.execution_number, "document": req.document,
                 "step": req.step, "phase": req.phase}, theirs)
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        if fifo is not None:
            os.close(ours[3])
            ours[3] = fifo
        self._run, self._pid = run, run.pid
        remote = _RemoteTransport(run.pid)
        self._transport = remote  # type: ignore[assignment]
        for fd in (1, 2):
            transport, _ = await loop.connect_read_pipe(
                lambda fd=fd: _RemotePipe(self, fd), os.fdopen(ours[fd], "rb", buffering=0))
            remote.pipes.append(transport)
        self._progress, _ = await loop.connect_read_pipe(
            lambda: _ProgressReader(self._report_progress, self._pipe_closed),
            os.fdopen(ours[3], "rb", buffering=0))
        stdin, _ = await loop.connect_write_pipe(asyncio.Protocol,
                                                 os.fdopen(ours[0], "wb", buffering=0))
        stdin.write(document)  # buffered by the transport, whether the handler reads or not
        stdin.close()
        remote.pipes.append(stdin)

        async def exited() -> None:
            remote.returncode = await self._backend.wait(run)  # type: ignore[attr-defined]
            self._ended = time.monotonic()
            self._exited.set()

        remote.waiter = asyncio.ensure_future(exited())
        self._supervisor = asyncio.create_task(self._supervise(), name=f"handler:{req.job_id}")

    async def _spawn(self, env: dict[str, str], user: dict[str, Any], document: bytes) -> None:
        if getattr(self._backend, "remote", False):
            await self._spawn_remote(document)
            return
        req, loop, program = self.request, asyncio.get_running_loop(), self.request.argv[0]
        # Popen searches PATH for a bare name; "./name" is what execve itself would run.
        executable = program if "/" in program else os.path.join(os.curdir, program)
        try:
            launch = self._backend.command(Launch(
                req.job_id, req.execution_number, list(req.argv), env, req.work_dir, req.user,
                user, req.limits))
        except OSError as exc:
            raise AgentError(f"cannot prepare the {self._backend.name} run: {exc}") from None
        argv, env, user = launch.argv, launch.env, launch.popen_user
        if argv[0] != program:  # wrapped (systemd-run): it finds the handler itself
            program, executable = argv[0], argv[0]
        if launch.progress_fd is not None:  # the backend's own progress channel
            read_end, write_end = launch.progress_fd, os.open(os.devnull, os.O_WRONLY)
        else:
            read_end, write_end = os.pipe()
        # pass_fds keeps fd numbers and os.pipe() picks ours, so the pipe must be moved to fd 3:
        # here, onto the parked fd 3 (see _park_progress_fd), which keeps vfork possible; or, if
        # fd 3 was not ours to park, by a dup2 in the child. preexec_fn is unsafe with threads
        # only for code that takes locks after fork; a single dup2 syscall takes none.
        parked = _PARKED is not None and write_end != PROGRESS_FD
        move = None
        if parked:
            # Popen runs before subprocess_exec first suspends, so no other spawn can move its
            # own pipe onto fd 3 in between.
            os.dup2(write_end, PROGRESS_FD)
        elif write_end != PROGRESS_FD:
            move = functools.partial(os.dup2, write_end, PROGRESS_FD)
        try:
            self._transport, _ = await loop.subprocess_exec(
                lambda: _HandlerProtocol(self), program, *argv[1:], executable=executable,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=req.work_dir, env=env, close_fds=True,
                pass_fds=(PROGRESS_FD,), preexec_fn=move, start_new_session=True, **user)
        except BaseException as exc:
            os.close(read_end)
            self._backend.abandoned(launch)
            if not isinstance(exc, OSError | ValueError | subprocess.SubprocessError):
                raise
            where = getattr(exc, "filename", None)  # Popen names the executable or the cwd
            detail = (getattr(exc, "strerror", None) or str(exc)) + (
                f" ({where})" if where not in (None, program) else "")
            raise AgentError(f"cannot start {program}: {detail}") from None
        finally:
            os.close(write_end)
            if parked:
                assert _PARKED is not None
                os.dup2(_PARKED, PROGRESS_FD, inheritable=False)  # our copy of the pipe goes
        self._pid = self._transport.get_pid()
        self._run = self._backend.started(launch, self._pid)
        self._progress, _ = await loop.connect_read_pipe(
            lambda: _ProgressReader(self._report_progress, self._pipe_closed),
            os.fdopen(read_end, "rb", buffering=0))
        stdin = self._transport.get_pipe_transport(0)
        if isinstance(stdin, asyncio.WriteTransport) and not stdin.is_closing():
            stdin.write(document)  # buffered by the transport, whether the handler reads or not
            stdin.close()
        self._supervisor = asyncio.create_task(self._supervise(), name=f"handler:{req.job_id}")

    def _received(self, fd: int, data: bytes) -> None:
        """Output of stdout (1) or stderr (2), from a child's pipe or the helper's: secrets
        are redacted before anything stores it."""
        self._keep(fd, self._redactors[fd - 1].feed(data))

    def _stream_closed(self, fd: int) -> None:
        """stdout (1) or stderr (2) ended: what its redactor held back is output too."""
        self._keep(fd, self._redactors[fd - 1].flush())
        self._pipe_closed()

    def _keep(self, fd: int, data: bytes) -> None:
        if data:
            self._output.feed(data)
            self._streams[fd - 1].feed(data)

    def _pipe_closed(self) -> None:
        self._open_pipes -= 1
        if self._open_pipes <= 0:
            self._pipes_closed.set()

    def _report_progress(self, line: bytes) -> None:
        line = self._redact.line(line)
        values = _parse_progress(line)
        if values is not None and self._redact:
            values = {self._redact.text(k): self._redact.text(v) for k, v in values.items()}
        if values is None:
            log.debug("progress line ignored job_id=%s line=%r", self.request.job_id, line[:100])
        elif self._on_progress is not None:
            try:
                self._on_progress(values)
            except Exception:
                log.exception("progress callback failed job_id=%s", self.request.job_id)

    async def wait(self) -> RunResult:
        """The result, once the handler exited and its output is drained (starts it if needed)."""
        await self.start()
        await self._ready.wait()  # another task may still be inside start()
        if self._supervisor is None:
            assert self._result is not None
            return self._result
        return await asyncio.shield(self._supervisor)

    async def cancel(self, reason: str) -> None:
        """TERM the group, KILL it after ``kill_grace``; returns once the run is over. The outcome
        becomes ``canceled`` unless the handler had already exited (then this only cuts the
        draining short). Before ``start()``, nothing will be spawned."""
        if self._result is not None:
            return
        if self._stop_reason is None and not self._exited.is_set():
            self._stop_reason = ("canceled", reason)
        self._stop.set()
        if self._begun:
            await self._ready.wait()
        if self._supervisor is not None:
            await asyncio.shield(self._supervisor)

    async def _supervise(self) -> RunResult:
        req = self.request
        try:
            await _any_of(req.timeout, self._exited, self._stop)
            if not self._exited.is_set():
                if self._stop_reason is None:
                    timeout = format_duration(req.timeout or 0)
                    self._stop_reason = ("timed_out", f"timed out after {timeout}")
                await self._terminate()
            if not self._pipes_closed.is_set():
                await _any_of(DRAIN_GRACE, self._pipes_closed, self._stop)
            if not self._pipes_closed.is_set():
                log.warning("handler exited, its output is still held open: killing its group "
                            "job_id=%s pid=%s", req.job_id, self._pid)
                self._signal(signal.SIGKILL)
                await _any_of(1.0, self._pipes_closed)
            # Nothing the handler started outlives the run (background children, setsid).
            assert self._run is not None
            ending = await self._backend.finished(self._run, req.kill_grace)
        except asyncio.CancelledError:
            self._signal(signal.SIGKILL)
            self._close()
            raise
        assert self._transport is not None
        code = self._transport.get_returncode() if ending is None else ending.code
        assert code is not None
        outcome, reason = self._stop_reason or ("failed" if code else "succeeded",
                                                _describe_exit(code))
        if ending is not None and ending.reason and outcome != "canceled":
            outcome, reason = "failed", ending.reason
        head, tail = self._output.texts()
        return self._conclude(RunResult(
            outcome, reason, exit_code=code if code >= 0 else None,
            signal=-code if code < 0 else None, pid=self._pid, duration=self._ended - self._started,
            output_head=head, output_tail=tail, output_bytes=self._output.total,
            started=self._started, ended=self._ended, stdout_tail=self._streams[0].text(),
            stderr_tail=self._streams[1].text(), stderr_lines=self._streams[1].lines))

    async def _terminate(self) -> None:
        """TERM the group, then KILL what is left once the leader exited and the pipes closed, or
        after ``kill_grace``: a group that obeys TERM is not kept waiting for the whole grace."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request.kill_grace
        self._signal(signal.SIGTERM)
        await _any_of(self.request.kill_grace, self._exited)
        await _any_of(max(0.0, deadline - loop.time()), self._pipes_closed)
        self._signal(signal.SIGKILL)
        await self._exited.wait()

    def _signal(self, sig: int) -> None:
        """To every process of the run, as its backend knows them."""
        if self._run is not None:
            self._backend.signal(self._run, sig)
        elif self._pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._pid, sig)

    def _conclude(self, result: RunResult) -> RunResult:
        extra = f", {result.output_bytes} bytes of output" if result.pid is not None else ""
        self._write_log(f"{result.outcome}: {result.reason} "
                        f"(after {format_duration(result.duration)}{extra})")
        self._close()
        self._result = result
        return result

    def _write_log(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        text = text.replace("\r", "\\r").replace("\n", "\\n")  # one line, even for sh -c
        text = self._redact.text(text)
        self._output.note(f"=== {stamp} {text} ===")

    def _close(self) -> None:
        for transport in (self._progress, self._transport):
            if transport is not None:
                transport.close()
        if self._output.log_file is not None:
            with contextlib.suppress(OSError):
                self._output.log_file.close()
            self._output.log_file = None


async def _any_of(timeout: float | None, *events: asyncio.Event) -> None:
    """Until one of ``events`` is set or ``timeout`` seconds pass (None: no limit)."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


_BACKGROUND: set[asyncio.Task[None]] = set()


async def run_handler(request: RunRequest,
                      on_progress: ProgressCallback | None = None) -> RunResult:
    """Start and wait. Cancelling this coroutine cancels the handler in the background (TERM,
    grace, KILL), because nothing else holds the process to stop it."""
    process = HandlerProcess(request, on_progress)
    try:
        return await process.wait()
    except asyncio.CancelledError:
        task = asyncio.ensure_future(process.cancel("the agent stopped waiting for the handler"))
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)
        raise


def format_duration(seconds: float) -> str:
    """90 -> "1m30s", 600 -> "10m", 45 -> "45s", 0.5 -> "0.5s": the config's own notation, so a
    reason reads back as the setting that caused it."""
    if seconds < 59.5:
        return f"{max(seconds, 0.0):.2f}".rstrip("0").rstrip(".") + "s"
    rest, parts = round(seconds), []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def _printable(text: str) -> str:
    if text.isprintable():  # the common case: no category C (nor Z, bar space) at all
        return text
    return "".join(ch for ch in text if unicodedata.category(ch)[0] != "C")


def sanitize_detail(value: str, keep: Literal["start", "end"] = "start") -> str:
    """``value`` as a statusDetails value: no category C characters, at most 1024 characters.

    Lines are joined with " | " (blank ones dropped), tabs become spaces and other control
    characters go. Too long, it keeps its start (or end) and marks the cut with an ellipsis.
    The limit is counted in UTF-16 code units, never fewer than code points, so the value fits
    whichever of the two the service counts. Returns "" when nothing is left.
    """
    lines = (_printable(line.replace("\t", " ")) for line in value.splitlines())
    text = " | ".join(line for line in lines if line.strip())
    if len(text) <= MAX_DETAIL_VALUE // 2 or len(text.encode("utf-16-le")) <= 2 * MAX_DETAIL_VALUE:
        return text
    chars = text[:MAX_DETAIL_VALUE] if keep == "start" else text[-MAX_DETAIL_VALUE:][::-1]
    kept, units = [], 0
    for ch in chars:
        units += 2 if ord(ch) > 0xFFFF else 1
        if units > MAX_DETAIL_VALUE - 1:
            break
        kept.append(ch)
    cut = "".join(kept)
    return cut + "\u2026" if keep == "start" else "\u2026" + cut[::-1]


def status_details(result: RunResult, *, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The final update's statusDetails, valid for the Jobs service whatever the handler wrote.

    ``extra`` entries come last and so replace ours (the dispatcher puts its own reason there);
    their keys are forced into ``[a-zA-Z0-9:_-]{1,128}``.
    """
    ours = {
        "outcome": result.outcome, "reason": result.reason,
        "exitCode": "" if result.exit_code is None else str(result.exit_code),
        "signal": "" if result.signal is None else str(result.signal),
        "durationSeconds": f"{result.duration:.3f}", "outputHead": result.output_head,
    }
    details = {key: text for key, value in ours.items() if (text := sanitize_detail(value))}
    if tail := sanitize_detail(result.output_tail, "end"):
        details["outputTail"] = tail
    for key, value in (extra or {}).items():
        name = _BAD_KEY_CHARS.sub("_", str(key))[:128]
        if name and (text := sanitize_detail(str(value))):
            details[name] = text
    return details
