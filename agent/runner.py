"""Run one job execution's handler program and say how it ended.

A handler is untrusted in every way that matters to a daemon: it may flood its output, ignore
SIGTERM, leave grandchildren behind or never read its stdin. So that none of this can hang the
agent, grow its memory or leak the agent's own environment and files:

* no shell and a clean environment: a job document cannot inject commands or read our secrets;
* its own session (so its own process group): a timeout or a cancel reaches every process it
  started, and a Ctrl-C aimed at the agent does not reach it behind the agent's back;
* output is consumed by protocol callbacks the moment it arrives, on both pipes at once; only
  a 4 KiB head and tail stay in memory and the log file takes the rest up to a cap;
* the exit status comes from the child watcher, not from the pipes closing: Python 3.11's
  ``Process.wait()`` also waits for every pipe, which a grandchild can hold open forever.

Nothing here raises for a handler's misbehaviour or a failure to start: every run ends in a
:class:`RunResult`, which :func:`status_details` turns into a final status the service accepts.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import json
import logging
import os
import pwd
import re
import shlex
import signal
import subprocess
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from agent.errors import AgentError

__all__ = [
    "DOCUMENT_FILE",
    "PROGRESS_FD",
    "SAFE_PATH",
    "HandlerProcess",
    "RunRequest",
    "RunResult",
    "format_duration",
    "run_handler",
    "sanitize_detail",
    "status_details",
]

log = logging.getLogger("agent.runner")

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROGRESS_FD = 3
DOCUMENT_FILE = "job-document.json"
HEAD_BYTES = TAIL_BYTES = 4096
MAX_PROGRESS_LINE = 4096
DRAIN_GRACE = 2.0
"""Seconds the output may stay open after the handler exited before its group is killed."""
MAX_DETAIL_VALUE = 1024
_ELLIPSIS = "\u2026"
_BAD_KEY_CHARS = re.compile(r"[^a-zA-Z0-9:_-]")

ProgressCallback = Callable[[dict[str, str]], None]


@dataclass(frozen=True)
class RunRequest:
    job_id: str
    execution_number: int
    thing_name: str
    argv: list[str]
    document: dict[str, Any]
    work_dir: Path
    log_path: Path
    timeout: float | None = None
    kill_grace: float = 10.0
    user: str | None = None
    environment: dict[str, str] = field(default_factory=dict)
    max_log_bytes: int = 10 * 1024 * 1024


@dataclass(frozen=True)
class RunResult:
    outcome: str  # "succeeded" | "failed" | "timed_out" | "canceled" | "not_started"
    reason: str
    exit_code: int | None
    signal: int | None
    pid: int | None
    duration: float
    output_head: str
    output_tail: str
    output_bytes: int
    started: float = 0.0  # time.monotonic() at spawn
    ended: float = 0.0  # time.monotonic() when the handler exited


class _Output:
    """Combined stdout+stderr: appended to the log up to a cap, summarized by a head and tail.

    Fed synchronously from the transports' callbacks, so a flood costs CPU and capped disk but
    never memory: no chunk is kept beyond the call that delivers it.
    """

    def __init__(self, log_file: BinaryIO | None, cap: int) -> None:
        self.log_file = log_file
        self.cap = max(0, cap)
        self.total = self.logged = 0
        self.head = bytearray()
        self.tail = bytearray()
        self.dropping = False
        self.line_start = True

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = HEAD_BYTES - len(self.head)
        rest = data
        if room > 0:
            self.head += data[:room]
            rest = data[room:]
        if len(rest) >= TAIL_BYTES:
            self.tail[:] = rest[-TAIL_BYTES:]
        elif rest:
            self.tail += rest
            del self.tail[:-TAIL_BYTES]
        if self.logged < self.cap:
            part = data[: self.cap - self.logged]
            self.logged += len(part)
            self.write(part)
            if len(part) == len(data):
                return
        if not self.dropping:
            self.dropping = True
            self.note(f"[iot-jobs-agent: output beyond {self.cap} bytes is counted, not logged]")

    def note(self, line: str) -> None:
        """A line of our own in the log, on a line of its own."""
        self.write(("" if self.line_start else "\n").encode() + f"{line}\n".encode())

    def write(self, data: bytes) -> None:
        """Write to the log; a full or broken disk must cost the log, never the run."""
        if self.log_file is None or not data:
            return
        try:
            self.log_file.write(data)
        except (OSError, ValueError) as exc:
            log.warning("handler log write failed, logging stopped error=%s", exc)
            self.log_file = None
        self.line_start = data.endswith(b"\n")

    def texts(self) -> tuple[str, str]:
        """Head and tail as text, without a replacement character where only the cut split one.

        A character split between head and tail is decoded whole when nothing was skipped
        between them; otherwise the tail's leading continuation bytes are dropped.
        """
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        if not self.tail:
            return decoder.decode(bytes(self.head), final=True), ""
        head = decoder.decode(bytes(self.head))
        tail = bytes(self.tail)
        if self.total > len(self.head) + len(tail):
            decoder.reset()
            skip = 0
            while skip < min(3, len(tail)) and tail[skip] & 0xC0 == 0x80:
                skip += 1
            tail = tail[skip:]
        return head, decoder.decode(tail, final=True)


class _ProgressReader(asyncio.Protocol):
    """Splits the progress pipe into lines; an overlong line is skipped, never buffered."""

    def __init__(self, report: Callable[[bytes], None], closed: Callable[[], None]) -> None:
        self.report = report
        self.closed = closed
        self.buffer = bytearray()
        self.skipping = False

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        start = 0
        while (end := self.buffer.find(b"\n", start)) >= 0:
            line = bytes(self.buffer[start:end])
            start = end + 1
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
        self.buffer.clear()
        self.closed()


class _HandlerProtocol(asyncio.SubprocessProtocol):
    def __init__(self, output: _Output, pipe_closed: Callable[[], None],
                 exited: Callable[[], None]) -> None:
        self.output = output
        self.pipe_closed = pipe_closed
        self.exited = exited

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self.output.feed(data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd in (1, 2):
            self.pipe_closed()

    def process_exited(self) -> None:
        self.exited()


@dataclass(frozen=True)
class _Identity:
    uid: int
    gid: int
    home: str | None
    switch: bool  # whether Popen must change user (only as root)
    groups: list[int]


def _identity(user: str | None) -> _Identity:
    euid = os.geteuid()
    if user is None:
        with contextlib.suppress(KeyError):
            return _Identity(euid, os.getegid(), pwd.getpwuid(euid).pw_dir, False, [])
        return _Identity(euid, os.getegid(), None, False, [])
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise AgentError(f"cannot run as user {user!r}: no such user") from None
    if entry.pw_uid == euid:
        return _Identity(euid, os.getegid(), entry.pw_dir, False, [])
    if euid != 0:
        raise AgentError(f"cannot run as user {user!r}: the agent runs as uid {euid}, and only "
                         f"root can switch users")
    groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
    return _Identity(entry.pw_uid, entry.pw_gid, entry.pw_dir, True, groups)


def _parse_progress(line: bytes) -> dict[str, str] | None:
    try:
        value = json.loads(line)
    except ValueError:  # includes UnicodeDecodeError
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
        name = signal.Signals(-code).name
    except ValueError:
        return f"killed by signal {-code}"
    return f"killed by signal {-code} ({name})"


class HandlerProcess:
    """One handler run. ``start()``, then ``wait()``; ``cancel()`` at any time from any task.

    A supervisor task owns the process from ``start()`` on, so the timeout is enforced even while
    nobody awaits ``wait()``, and cancelling a task blocked in ``wait()`` or ``cancel()`` leaves
    the handler supervised. If the supervisor itself is cancelled (the loop is shutting down),
    it SIGKILLs the group rather than leave an unsupervised handler behind.
    """

    def __init__(self, request: RunRequest,
                 on_progress: ProgressCallback | None = None) -> None:
        self.request = request
        self._on_progress = on_progress
        self._pid: int | None = None
        self._result: RunResult | None = None
        self._begun = False
        self._supervisor: asyncio.Task[RunResult] | None = None
        self._stop_reason: tuple[str, str] | None = None
        self._stop = asyncio.Event()
        self._exited = asyncio.Event()
        self._pipes_closed = asyncio.Event()
        self._open_pipes = 3  # stdout, stderr, progress
        self._started = self._ended = 0.0
        self._ready = asyncio.Event()  # start() has finished, whichever way
        self._log: BinaryIO | None = None
        self._output = _Output(None, request.max_log_bytes)
        self._transport: asyncio.SubprocessTransport | None = None
        self._progress: asyncio.ReadTransport | None = None

    @property
    def pid(self) -> int | None:
        """Also the process group id: the handler leads its own session."""
        return self._pid

    @property
    def running(self) -> bool:
        """True from spawn until the result is known (pipes drained, group cleaned up)."""
        return self._supervisor is not None and not self._supervisor.done()

    async def start(self) -> None:
        """Spawn the handler; any failure becomes a ``not_started`` result (see ``wait()``)."""
        if self._begun:
            return
        self._begun = True
        try:
            await self._start()
        finally:
            self._ready.set()

    async def _start(self) -> None:
        req = self.request
        self._started = self._ended = time.monotonic()
        if self._stop_reason is not None:
            self._finish_early(*self._stop_reason)
            return
        try:
            req.log_path.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            self._log = os.fdopen(os.open(req.log_path, flags, 0o600), "ab")
            self._output.log_file = self._log
        except OSError as exc:
            self._finish_early("not_started", f"cannot open log {req.log_path}: "
                                              f"{exc.strerror or exc}")
            return
        self._write_log(f"start job {req.job_id} execution {req.execution_number}: "
                        f"{shlex.join(req.argv)}")
        try:
            if not req.argv:
                raise AgentError("no handler command configured")
            ident = _identity(req.user)
            document = self._prepare(ident)
        except AgentError as exc:
            self._finish_early("not_started", exc.message)
            return
        await self._spawn(ident, document)

    def _prepare(self, ident: _Identity) -> bytes:
        """Create the 0700 work dir and the 0600 document file, both owned by the run user.

        The directory is changed through an O_NOFOLLOW descriptor and the file is recreated with
        O_EXCL, so a run user who owned this directory before cannot redirect root's chmod,
        chown or write onto another file with a symlink or hard link.
        """
        req = self.request
        try:
            document = (json.dumps(req.document, ensure_ascii=False) + "\n").encode()
        except (TypeError, ValueError) as exc:
            raise AgentError(f"job document is not JSON: {exc}") from None
        try:
            req.work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(req.work_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fchmod(fd, 0o700)
                if ident.switch:
                    os.fchown(fd, ident.uid, ident.gid)
            finally:
                os.close(fd)
            path = req.work_dir / DOCUMENT_FILE
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            with os.fdopen(os.open(path, flags, 0o600), "wb") as file:
                if ident.switch:
                    os.fchown(file.fileno(), ident.uid, ident.gid)
                file.write(document)
        except OSError as exc:
            where = exc.filename or req.work_dir
            raise AgentError(f"cannot prepare work dir: {where}: {exc.strerror or exc}") from None
        return document

    def _environment(self, ident: _Identity) -> dict[str, str]:
        """The whole environment; configured variables may replace PATH/LANG/HOME, not JOB_*."""
        req = self.request
        home = ident.home if ident.home and os.path.isdir(ident.home) else str(req.work_dir)
        env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "HOME": home, **req.environment}
        env.update(JOB_ID=req.job_id, THING_NAME=req.thing_name,
                   EXECUTION_NUMBER=str(req.execution_number),
                   JOB_DOCUMENT=str(req.work_dir / DOCUMENT_FILE), JOB_WORK_DIR=str(req.work_dir),
                   JOB_PROGRESS_FD=str(PROGRESS_FD))
        return env

    async def _spawn(self, ident: _Identity, document: bytes) -> None:
        req = self.request
        loop = asyncio.get_running_loop()
        output = self._output
        program = req.argv[0]
        # Popen would search PATH for a bare name; "./name" is what execve itself would run.
        executable = program if "/" in program else os.path.join(os.curdir, program)
        user_args: dict[str, Any] = {}
        if ident.switch:
            user_args = {"user": ident.uid, "group": ident.gid, "extra_groups": ident.groups}
        read_end, write_end = os.pipe()
        # pass_fds keeps fd numbers, and ours is wherever os.pipe() put it; only a dup2 in the
        # child can promise handlers fd 3. A preexec_fn forbids vfork and, with other threads
        # running, is only safe for code that takes no locks: one dup2 syscall is such code.
        move = None if write_end == PROGRESS_FD else functools.partial(os.dup2, write_end,
                                                                        PROGRESS_FD)
        failure: Exception | None = None
        try:
            self._transport, _ = await loop.subprocess_exec(
                lambda: _HandlerProtocol(output, self._pipe_closed, self._process_exited),
                program, *req.argv[1:], executable=executable, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=req.work_dir,
                env=self._environment(ident), close_fds=True, pass_fds=(PROGRESS_FD,),
                preexec_fn=move, start_new_session=True, **user_args)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            failure = exc
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        if failure is not None:
            os.close(read_end)
            detail = str(failure)
            if isinstance(failure, OSError):
                detail = failure.strerror or detail
                if failure.filename not in (None, program):
                    detail = f"{detail} ({failure.filename})"
            self._finish_early("not_started", f"cannot start {program}: {detail}")
            return
        self._pid = self._transport.get_pid()
        self._progress, _ = await loop.connect_read_pipe(
            lambda: _ProgressReader(self._report_progress, self._pipe_closed),
            os.fdopen(read_end, "rb", buffering=0))
        stdin = self._transport.get_pipe_transport(0)
        if stdin is not None and not stdin.is_closing():
            stdin.write(document)  # buffered by the transport; never blocks on the handler
            stdin.close()
        log.debug("handler spawned job_id=%s pid=%s", req.job_id, self._pid)
        self._supervisor = asyncio.create_task(self._supervise(), name=f"handler:{req.job_id}")

    def _pipe_closed(self) -> None:
        self._open_pipes -= 1
        if self._open_pipes <= 0:
            self._pipes_closed.set()

    def _process_exited(self) -> None:
        self._ended = time.monotonic()
        self._exited.set()

    def _report_progress(self, line: bytes) -> None:
        values = _parse_progress(line)
        if values is None:
            log.debug("progress line ignored job_id=%s line=%r", self.request.job_id, line[:100])
        elif self._on_progress is not None:
            try:
                self._on_progress(values)
            except Exception:
                log.exception("progress callback failed job_id=%s", self.request.job_id)

    async def wait(self) -> RunResult:
        """The result, once the handler exited and its output is drained (starts it if needed)."""
        if not self._begun:
            await self.start()
        await self._ready.wait()  # another task may still be inside start()
        if self._supervisor is None:
            assert self._result is not None
            return self._result
        return await asyncio.shield(self._supervisor)

    async def cancel(self, reason: str) -> None:
        """TERM the group, KILL it after ``kill_grace``; returns once the run is over.

        ``reason`` becomes the result's reason with outcome ``canceled`` while the handler still
        runs; once it has exited its own outcome stands and this only stops the draining.
        Before ``start()``, the run is canceled without spawning.
        """
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
                log.warning("handler exited but its processes keep its output open, killing its "
                            "group job_id=%s pid=%s", req.job_id, self._pid)
                self._signal(signal.SIGKILL)
                await _any_of(1.0, self._pipes_closed)
        except asyncio.CancelledError:
            self._signal(signal.SIGKILL)
            self._close()
            raise
        return self._finish()

    async def _terminate(self) -> None:
        """TERM to the group; KILL whatever is left once the leader exited and every pipe closed,
        or after ``kill_grace`` (so an obedient group is not kept waiting the full grace)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request.kill_grace
        self._signal(signal.SIGTERM)
        await _any_of(self.request.kill_grace, self._exited)
        await _any_of(max(0.0, deadline - loop.time()), self._pipes_closed)
        self._signal(signal.SIGKILL)
        await self._exited.wait()

    def _signal(self, sig: int) -> None:
        if self._pid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._pid, sig)

    def _finish(self) -> RunResult:
        assert self._transport is not None
        code = self._transport.get_returncode()
        assert code is not None
        if self._stop_reason is not None:
            outcome, reason = self._stop_reason
        else:
            outcome, reason = ("succeeded" if code == 0 else "failed"), _describe_exit(code)
        head, tail = self._output.texts()
        result = RunResult(
            outcome=outcome, reason=reason, exit_code=code if code >= 0 else None,
            signal=-code if code < 0 else None, pid=self._pid, duration=self._ended - self._started,
            output_head=head, output_tail=tail, output_bytes=self._output.total,
            started=self._started, ended=self._ended)
        return self._conclude(result)

    def _finish_early(self, outcome: str, reason: str) -> None:
        self._conclude(RunResult(outcome=outcome, reason=reason, exit_code=None, signal=None,
                                 pid=None, duration=0.0, output_head="", output_tail="",
                                 output_bytes=0, started=self._started, ended=self._started))

    def _conclude(self, result: RunResult) -> RunResult:
        extra = f", {result.output_bytes} bytes of output" if result.pid is not None else ""
        self._write_log(f"{result.outcome}: {result.reason} "
                        f"(after {format_duration(result.duration)}{extra})")
        self._close()
        log.debug("handler done job_id=%s outcome=%s reason=%s", self.request.job_id,
                  result.outcome, result.reason)
        self._result = result
        return result

    def _write_log(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        one_line = text.replace("\r", "\\r").replace("\n", "\\n")
        self._output.note(f"=== {stamp} {one_line} ===")

    def _close(self) -> None:
        for transport in (self._progress, self._transport):
            if transport is not None:
                transport.close()
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()


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
        await process.start()
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
    The limit is counted in UTF-16 code units, which is never more than code points, so the
    value fits whichever of the two the service counts. Returns "" when nothing is left.
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
    return cut + _ELLIPSIS if keep == "start" else _ELLIPSIS + cut[::-1]


def status_details(result: RunResult, *, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The final update's statusDetails, valid for the Jobs service whatever the handler wrote.

    ``extra`` entries are added after ours and so replace them (the dispatcher uses this to put
    its own reason first); their keys are forced into ``[a-zA-Z0-9:_-]{1,128}``.
    """
    ours = {
        "outcome": result.outcome,
        "reason": result.reason,
        "exitCode": "" if result.exit_code is None else str(result.exit_code),
        "signal": "" if result.signal is None else str(result.signal),
        "durationSeconds": f"{result.duration:.3f}",
        "outputHead": result.output_head,
    }
    details = {key: text for key, value in ours.items() if (text := sanitize_detail(value))}
    if tail := sanitize_detail(result.output_tail, "end"):
        details["outputTail"] = tail
    for key, value in (extra or {}).items():
        name = _BAD_KEY_CHARS.sub("_", str(key))[:128]
        if name and (text := sanitize_detail(str(value))):
            details[name] = text
    return details
