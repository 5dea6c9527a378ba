"""Runs AWS IoT Commands: journal the request, run its handler, report, recover after a crash.

The Commands counterpart of :mod:`agent.dispatcher`, with the same handlers, runner, limits,
isolation and logs, but Commands' own rules:

* **No claim.** A request is the execution: it is journaled (keyed by its executionId) before
  its PUBACK goes out, then queued; a request delivered again is answered from the journal and
  never run twice (:func:`lifecycle.on_repeat`).
* **Its own concurrency limit** (``commands.max_concurrent``), so a long job never holds a
  command past its timeout, and a burst of commands never delays a job.
* **Time.** The request's message expiry is the execution's timeout: a request still waiting
  when it passes ends TIMED_OUT without running, and a handler may run until the earlier of its
  own timeout and the execution's.
* **Pacing.** One update per execution in flight, each waiting for its accepted or rejected
  reply; DataConflict (too close together) and transient failures back off and retry. An
  IN_PROGRESS is sent only for a handler still running after a second, or with progress, so a
  quick command costs one update.

The decisions are in :mod:`agent.commands.lifecycle`; this module does what they say.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.commands import lifecycle, shapes
from agent.commands.client import CommandRequest, CommandsClient
from agent.commands.journal import CommandJournal, CommandRecord
from agent.commands.lifecycle import Work
from agent.config import Config
from agent.documents import DocumentError
from agent.errors import (
    AgentError,
    ConflictException,
    InvalidRequestException,
    InvalidStateTransitionException,
    JournalError,
    ResourceNotFoundException,
    TerminalStateException,
    ThrottlingException,
)
from agent.paths import job_work_dir
from agent.recovery import Handler, Machine
from agent.reporter import backoff
from agent.runner import HandlerProcess, RunRequest, RunResult

__all__ = ["CommandExecutor"]

log = logging.getLogger("agent.commands")

IN_PROGRESS_AFTER = 1.0
"""Seconds a handler runs before the service hears IN_PROGRESS (a quick one goes straight to
its final status: one update, no DataConflict)."""

_FINAL_REPORT_GRACE = 15.0
_PRUNE_EVERY = 3600.0
_ENDED = (InvalidStateTransitionException, TerminalStateException, ResourceNotFoundException)


@dataclass
class _Command:
    execution_id: str
    work: Work
    deadline: float | None
    process: HandlerProcess | None = None
    task: asyncio.Task[None] | None = None
    interrupted: str | None = None
    journaled_start: bool = False  # "running" was committed with the request itself
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    progress: dict[str, str] | None = None
    progress_sent: float = 0.0
    deleted: bool = False

    @property
    def where(self) -> str:
        return f"execution_id={self.execution_id} handler={self.work.operation}"


class CommandExecutor:
    """Serve the requests of ``client``; run :meth:`run` as a task, :meth:`shutdown` to stop."""

    def __init__(self, config: Config, client: CommandsClient, journal: CommandJournal, *,
                 job_logs: Path | None = None, machine: Machine | None = None,
                 on_change: Callable[[], None] | None = None) -> None:
        self.config = config
        self.client = client
        self.journal = journal
        self.machine = machine or Machine(config)
        self.job_logs = job_logs or Path(config.state_dir) / "logs"
        self.running: dict[str, _Command] = {}
        self._waiting: collections.OrderedDict[str, _Command] = collections.OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._nudge = asyncio.Event()
        self._stopping = False
        self._last_prune = 0.0
        self._on_change = on_change or (lambda: None)
        self.recovered = asyncio.Event()

    def reconfigure(self, config: Config) -> None:
        """A reload: commands started from now on use ``config``'s handlers and limits."""
        self.config = config
        self.machine.config = config

    # ------------------------------------------------------------------ requests

    async def run(self) -> None:
        """Recover what the journal left open, then serve requests until cancelled."""
        await self._recover()
        self.recovered.set()
        async for request in self.client.requests():
            if self._stopping:
                continue  # not acknowledged: a persistent session delivers it after the restart
            try:
                await self._on_request(request)
            except JournalError as exc:
                log.error("cannot journal a command request execution_id=%s error=%s; not "
                          "acknowledged (delivered again after a reconnect with a persistent "
                          "session)", request.execution_id, exc)
            except Exception:  # a bug: acknowledged, or a persistent session loops on it
                log.exception("command request failed execution_id=%s; dropped (the cloud "
                              "times it out)", request.execution_id)
                self.client.acknowledge(request)
            await self._maybe_prune()

    async def _on_request(self, request: CommandRequest) -> None:
        """Journal a new request (then PUBACK it) and run, reject or time it out; answer one
        the journal already has from the journal. Read and write are one journal step."""
        execution_id, message = request.execution_id, request.message
        deadline = None
        if message.message_expiry is not None:
            deadline = time.time() - (time.monotonic() - message.received) \
                + message.message_expiry
        work = lifecycle.read_request(request.payload, request.format, message.content_type,
                                      self.config)
        if isinstance(work, lifecycle.Rejected):
            final: dict[str, Any] | None = work.update
        else:
            final = lifecycle.too_late(deadline, time.time())
        now = False  # whether its handler starts right away
        if final is not None:
            known = await self.journal.decided(execution_id, final, deadline)
        else:
            assert isinstance(work, Work)
            now = not self._waiting and len(self.running) < self.config.commands.max_concurrent
            known = await self.journal.received(
                execution_id, work.operation, work.document, deadline, starting=now,
                boot_id=self.machine.boot_id() if now else None)
        self.client.acknowledge(request)
        if known is not None:
            self._repeat(known)
        elif final is not None:
            log.warning("command not run execution_id=%s status=%s reason=%s", execution_id,
                        final["status"], final["statusReason"]["reasonCode"])
            self._spawn(self._deliver(execution_id, final))
        else:
            assert isinstance(work, Work)
            log.info("command received execution_id=%s handler=%s timeout=%s", execution_id,
                     work.operation,
                     "none" if deadline is None else f"{deadline - time.time():.1f}s")
            self._waiting[execution_id] = _Command(execution_id, work, deadline,
                                                   journaled_start=now)
            self._schedule()

    def _repeat(self, record: CommandRecord) -> None:
        """A request the journal already has (an MQTT redelivery): never run it again."""
        execution_id = record.execution_id
        action = lifecycle.on_repeat(
            record, execution_id in self.running or execution_id in self._waiting)
        log.info("command request delivered again execution_id=%s state=%s action=%s",
                 execution_id, record.state, action)
        if action == "answer" and record.final is not None:
            self._spawn(self._deliver(execution_id, record.final,
                                      journaled=record.state == "finished"))

    def _schedule(self) -> None:
        """Start waiting commands while there is room; one that waited too long times out."""
        while self._waiting and not self._stopping \
                and len(self.running) < self.config.commands.max_concurrent:
            _, command = self._waiting.popitem(last=False)
            self.running[command.execution_id] = command
            command.task = asyncio.create_task(self._run(command),
                                               name=f"command:{command.execution_id}")
        self._on_change()

    # ------------------------------------------------------------------ one run

    def _request(self, command: _Command, timeout: float) -> RunRequest:
        handler, execution_id = command.work.handler, command.execution_id
        return RunRequest(
            job_id=execution_id, execution_number=1, thing_name=self.config.thing_name,
            argv=command.work.argv, document=command.work.document,
            work_dir=job_work_dir(self.config.state_dir, execution_id, command=True),
            log_path=self.job_logs / f"command-{execution_id}.log", timeout=timeout,
            kill_grace=self.config.kill_grace, user=handler.user,
            limits=handler.limits, kind="command",
            environment={**handler.environment, "JOB_PHASE": "run",
                         "COMMAND_EXECUTION_ID": execution_id})

    async def _run(self, command: _Command) -> None:
        try:
            late = lifecycle.too_late(command.deadline, time.time())
            if late is not None:
                log.warning("command timed out waiting for a slot %s", command.where)
                await self._conclude(command, late)
                return
            limit, by_deadline = lifecycle.run_limit(command.work.handler.timeout,
                                                     command.deadline, time.time())
            try:
                result = await self._execute(command, limit)
            except Exception as exc:  # a bug or a journal failure must not strand the command
                log.exception("agent error while running command %s", command.where)
                if command.process is not None and command.process.running:
                    await command.process.cancel(f"agent error: {exc}")
                result = RunResult(outcome="failed", reason=f"agent error: {type(exc).__name__}",
                                   exit_code=None, signal=None, pid=None, duration=0.0,
                                   output_head="", output_tail="", output_bytes=0)
            if command.deleted:
                log.warning("command execution deleted in the cloud while it ran %s; nothing "
                            "sent", command.where)
                await self.journal.done(command.execution_id)
                return
            final = shapes.final_update(
                result, command.results, interrupted=command.interrupted,
                expired=by_deadline and result.outcome == "timed_out")
            log.log(logging.INFO if final["status"] == "SUCCEEDED" else logging.WARNING,
                    "command finished %s outcome=%s reason=%s duration=%.3fs status=%s",
                    command.where, result.outcome, result.reason, result.duration,
                    final["status"])
            await self._conclude(command, final)
        except Exception:  # e.g. the journal became unwritable: the next start reports it
            log.exception("could not report command %s", command.where)
        finally:
            self.running.pop(command.execution_id, None)
            self._schedule()

    async def _execute(self, command: _Command, limit: float) -> RunResult:
        process = HandlerProcess(self._request(command, limit),
                                 on_progress=lambda values: self._progress(command, values))
        command.process = process
        if not command.journaled_start:  # committed before the spawn: "may have started"
            await self.journal.started(command.execution_id, self.machine.boot_id())
        await process.start()
        pid = process.pid
        await self.journal.spawned(command.execution_id, pid, self.machine.start_time(pid))
        log.info("command handler started %s pid=%s limit=%.1fs", command.where, pid, limit)
        reporter = asyncio.create_task(self._report_progress(command))
        try:
            return await process.wait()
        finally:
            reporter.cancel()

    def _progress(self, command: _Command, values: dict[str, str]) -> None:
        results = shapes.handler_results(values)
        if results:
            command.results.update(results)
            return
        command.progress = values

    async def _report_progress(self, command: _Command) -> None:
        """IN_PROGRESS once the handler has run a second, then its progress, rate-limited."""
        await asyncio.sleep(IN_PROGRESS_AFTER)
        interval = self.config.progress_interval
        while command.process is not None and command.process.running:
            values, command.progress = command.progress or {}, None
            result = {name: value for key, text in list(values.items())[:16]
                      if (name := shapes.result_name(key))
                      and (value := shapes.result_value(text))}
            await self._send_progress(command, shapes.update("IN_PROGRESS", None, result))
            while command.progress is None and command.process.running:
                await asyncio.sleep(interval)

    async def _send_progress(self, command: _Command, payload: dict[str, Any]) -> None:
        """One attempt: progress is superseded by the next update anyway."""
        async with self._lock(command.execution_id):
            try:
                await self.client.update(command.execution_id, payload)
            except ResourceNotFoundException:
                command.deleted = True
                if command.process is not None and command.process.running:
                    log.warning("command execution deleted in the cloud; stopping its handler "
                                "%s", command.where)
                    self._spawn(command.process.cancel("deleted in the cloud"))
            except AgentError as exc:
                log.info("progress update not delivered %s error=%s: %s", command.where,
                         type(exc).__name__, exc)

    async def _conclude(self, command: _Command, final: dict[str, Any]) -> None:
        """Journal the verdict (the outbox), then deliver it."""
        try:
            await self.journal.finish(command.execution_id, final)
        except JournalError as exc:
            log.critical("cannot journal the result of command %s; sending it directly: %s",
                         command.execution_id, exc)
            await self._deliver(command.execution_id, final, journaled=False)
            return
        await self._deliver(command.execution_id, final)

    # ------------------------------------------------------------------ delivery

    def _lock(self, execution_id: str) -> asyncio.Lock:
        return self._locks.setdefault(execution_id, asyncio.Lock())

    def nudge(self) -> None:
        """Connected again: retry owed updates now rather than after their backoff."""
        self._nudge.set()

    async def _deliver(self, execution_id: str, final: dict[str, Any], *,
                       journaled: bool = True) -> bool:
        """Send the final update until the service accepts it or says it takes no more.

        True once that is settled (then the journal says ``done``); False if the agent is
        stopping and the grace ran out (it stays owed for the next start).
        """
        deadline = time.monotonic() + _FINAL_REPORT_GRACE if self._stopping else None
        payload, attempt = final, 0
        async with self._lock(execution_id):
            while True:
                try:
                    await self.client.update(execution_id, payload)
                    log.info("command status accepted execution_id=%s status=%s", execution_id,
                             payload["status"])
                    break
                except _ENDED as exc:
                    log.info("command execution takes no more updates execution_id=%s "
                             "error=%s: %s", execution_id, exc.code, exc.message)
                    break
                except InvalidRequestException as exc:
                    if payload is final and ("result" in final or "statusReason" in final):
                        log.error("command update refused execution_id=%s error=%s; resending "
                                  "the bare status", execution_id, exc)
                        payload = shapes.update(final["status"], shapes.status_reason(
                            "AGENT_RESULT_REFUSED", "the service refused the agent's result; "
                            "see the device's log"))
                        continue
                    log.error("command update refused execution_id=%s error=%s", execution_id,
                              exc)
                    break
                except AgentError as exc:
                    conflict = isinstance(exc, ConflictException)
                    delay = backoff(attempt, low=0.1 if conflict else (
                        2.0 if isinstance(exc, ThrottlingException) else 1.0),
                        high=5.0 if conflict else 60.0)
                    attempt += 1
                    if deadline is not None and time.monotonic() + delay > deadline:
                        log.error("command status not delivered before the deadline "
                                  "execution_id=%s; owed until the next start", execution_id)
                        return False
                    log.log(logging.INFO if conflict else logging.WARNING,
                            "command update failed, retrying execution_id=%s in=%.2fs "
                            "error=%s: %s", execution_id, delay, type(exc).__name__, exc)
                    self._nudge.clear()
                    if conflict:
                        await asyncio.sleep(delay)
                    else:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._nudge.wait(), delay)
        self._locks.pop(execution_id, None)
        if journaled:
            with contextlib.suppress(JournalError):
                await self.journal.done(execution_id)
        return True

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ recovery

    async def _recover(self) -> None:
        """Finish what a previous run of the agent started (crash, kill -9, reboot)."""
        for record in await self.journal.open_records():
            work = _work(record, self.config)
            handler = Handler(job_work_dir(self.config.state_dir, record.execution_id,
                                           command=True),
                              (tuple(work.argv),) if work is not None else ())
            alive = self.machine.alive(record.pid, record.pid_start, handler)
            plan = lifecycle.plan_recovery(record, time.time(), self.config, alive)
            log.info("recovering command execution_id=%s state=%s action=%s", record.execution_id,
                     record.state, plan.kind)
            if plan.kill_pid is not None:
                await self.machine.kill_group(plan.kill_pid, self.config.kill_grace)
            if plan.kind == "report":
                final = plan.update or record.final
                if final is None:  # "finished" always carries one; be safe
                    continue
                if plan.update is not None:
                    await self.journal.finish(record.execution_id, plan.update)
                self._spawn(self._deliver(record.execution_id, final))
                continue
            if work is None:
                continue  # plan_recovery reports a removed handler; unreachable
            self._waiting[record.execution_id] = _Command(record.execution_id, work,
                                                          record.deadline)
        self._schedule()

    # ------------------------------------------------------------------ housekeeping

    async def _maybe_prune(self) -> None:
        now = time.monotonic()
        if self._last_prune and now - self._last_prune < _PRUNE_EVERY:
            return
        self._last_prune = now
        try:
            pruned = await self.journal.prune(self.config.retention, self.config.max_records)
        except JournalError as exc:
            log.warning("command journal pruning failed: %s", exc)
            return
        for execution_id in pruned:
            self.machine.remove_job_files(self.job_logs / f"command-{execution_id}.log",
                                          Path(self.config.state_dir) / "commands" / execution_id)

    async def shutdown(self, grace: float, force: asyncio.Event | None = None) -> None:
        """Start nothing new; give running handlers ``grace`` (cut short by ``force``); stop
        the rest, report them FAILED INTERRUPTED; leave waiting ones for the next start."""
        self._stopping = True
        self._waiting.clear()  # journaled "received": the next start runs them, if still in time
        tasks = [c.task for c in self.running.values() if c.task is not None]
        if tasks:
            everything = asyncio.gather(*tasks, return_exceptions=True)
            forced = asyncio.ensure_future((force or asyncio.Event()).wait())
            await asyncio.wait({everything, forced}, timeout=grace,
                               return_when=asyncio.FIRST_COMPLETED)
            forced.cancel()
            for command in list(self.running.values()):
                if command.process is not None and command.process.running:
                    command.interrupted = (
                        "the agent was stopped at once (second signal) before the handler "
                        "finished" if force is not None and force.is_set() else
                        f"the agent was stopped and the handler did not finish within "
                        f"{grace:.0f}s")
                    await command.process.cancel(command.interrupted)
            late = [t for t in tasks if not t.done()]
            if late:
                await asyncio.wait(late, timeout=self.config.kill_grace + _FINAL_REPORT_GRACE + 5)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=_FINAL_REPORT_GRACE)
        await self.client.close()


def _work(record: CommandRecord, config: Config) -> Work | None:
    try:
        return lifecycle.work_of(record.document, config)
    except DocumentError:
        return None
