"""The dispatcher: decides which executions to claim, runs their handlers, notices cancellation.

Everything funnels through one :meth:`Dispatcher.sync`: on start, after every (re)connect, on
every ``notify``/``notify-next`` and on the safety poll, it asks the service for the pending list
(the truth) and compares it with what this process runs. Notifications are only a doorbell, so a
duplicate, late or out-of-order one cannot start a job twice: a job is claimed with an
``expectedVersion`` update from QUEUED, and an execution key already seen is never claimed again.

All of it runs on the agent's asyncio loop; handlers are processes (:mod:`agent.runner`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import Config
from agent.errors import (
    AgentError,
    ConflictException,
    InvalidStateTransitionException,
    ResourceNotFoundException,
    TerminalStateException,
)
from agent.jobs import JobsClient
from agent.lifecycle import DocumentError, ExecutionKey, Work, parse_document, step_timeout_minutes
from agent.reporter import Reporter, backoff
from agent.runner import HandlerProcess, RunRequest, RunResult, sanitize_detail, status_details

__all__ = ["Dispatcher"]

log = logging.getLogger("agent.dispatcher")

_REMEMBERED = 1000  # finished execution keys kept to ignore stale pending lists
_FINAL_REPORT_GRACE = 15.0  # seconds a stopping agent keeps trying to deliver final statuses


@dataclass
class RunningJob:
    key: ExecutionKey
    work: Work
    reporter: Reporter
    process: HandlerProcess | None = None
    task: asyncio.Task[None] | None = None
    interrupted: str | None = None  # set when the agent itself stops the handler
    started: float = field(default_factory=time.monotonic)

    @property
    def where(self) -> str:
        return f"job_id={self.key[0]} execution={self.key[1]} handler={self.work.operation}"


class Dispatcher:
    """Claims and runs the jobs of one thing. Call :meth:`wake` on any hint; run :meth:`run`."""

    def __init__(self, config: Config, jobs: JobsClient, *, job_logs: Path | None = None,
                 on_change: Callable[[], None] | None = None) -> None:
        self.config = config
        self.job_logs = job_logs or Path(config.state_dir) / "logs"
        self.jobs = jobs
        self.thing = config.thing_name
        self.running: dict[ExecutionKey, RunningJob] = {}
        self.finished: OrderedDict[ExecutionKey, str] = OrderedDict()  # key -> final status
        self.synced = asyncio.Event()  # set after the first successful sync
        self._wake = asyncio.Event()
        self._sync_lock = asyncio.Lock()
        self._stopping = False
        self._on_change = on_change or (lambda: None)

    # ------------------------------------------------------------------ main loop

    def wake(self, reason: str) -> None:
        log.debug("sync requested reason=%s", reason)
        self._wake.set()

    async def run(self) -> None:
        """Sync whenever woken, and at least every ``poll_interval``."""
        attempt = 0
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.poll_interval)
            self._wake.clear()
            if self._stopping:
                return
            try:
                await self.sync()
                attempt = 0
            except AgentError as exc:
                attempt += 1
                delay = backoff(attempt, low=1.0, high=min(60.0, self.config.poll_interval))
                log.warning("sync failed, retrying in=%.1fs error=%s: %s", delay,
                            type(exc).__name__, exc)
                await asyncio.sleep(delay)
                self._wake.set()

    async def sync(self) -> None:
        async with self._sync_lock:
            pending = await self.jobs.get_pending_job_executions(thingName=self.thing)
            in_progress = {(s["jobId"], s["executionNumber"]): s for s in pending["inProgressJobs"]}
            queued = [(s["jobId"], s["executionNumber"], s) for s in pending["queuedJobs"]]
            listed = set(in_progress) | {(j, n) for j, n, _ in queued}
            for key, summary in in_progress.items():
                if key not in self.running and key not in self.finished:
                    await self._fail_orphan(key, summary)
            for key in [k for k in self.running if k not in listed]:
                await self._check_gone(key)
            for job_id, number, summary in queued:
                if self._stopping or len(self.running) >= self.config.max_concurrent_jobs:
                    break
                if (job_id, number) not in self.running and (job_id, number) not in self.finished:
                    await self._claim((job_id, number), summary)
            self.synced.set()
            self._on_change()

    # ------------------------------------------------------------------ claim and run

    async def _claim(self, key: ExecutionKey, summary: dict[str, Any]) -> None:
        job_id, number = key
        try:
            described = await self.jobs.describe_job_execution(
                jobId=job_id, thingName=self.thing, executionNumber=number,
                includeJobDocument=True)
        except (ResourceNotFoundException, TerminalStateException):
            return  # gone since the list was made
        execution = described.get("execution")
        if not execution or execution.get("status") != "QUEUED":
            return
        version = execution["versionNumber"]
        try:
            work = parse_document(execution.get("jobDocument"), self.config.handlers)
        except DocumentError as exc:
            await self._end_unrun(key, version, "REJECTED", str(exc))
            return
        step = step_timeout_minutes(work.handler.timeout)
        try:
            reply = await self.jobs.update_job_execution(
                jobId=job_id, thingName=self.thing, status="IN_PROGRESS",
                statusDetails={"step": "starting", "handler": work.operation},
                expectedVersion=version, executionNumber=number, stepTimeoutInMinutes=step,
                includeJobExecutionState=True)
        except ConflictException:
            log.info("claim lost a race, resyncing job_id=%s execution=%d", job_id, number)
            self._wake.set()
            return
        except (InvalidStateTransitionException, ResourceNotFoundException,
                TerminalStateException) as exc:
            log.info("job ended before it was claimed job_id=%s execution=%d reason=%s",
                     job_id, number, exc.code)
            return
        reporter = Reporter(self.jobs, self.thing, job_id, number,
                            reply["executionState"]["versionNumber"], step_minutes=step,
                            progress_interval=self.config.progress_interval)
        job = RunningJob(key, work, reporter)
        self.running[key] = job
        job.task = asyncio.create_task(self._run(job), name=f"job:{job_id}:{number}")
        log.info("job claimed %s step_timeout=%dm", job.where, step)

    async def _end_unrun(self, key: ExecutionKey, version: int, status: str,
                         reason: str) -> None:
        """One terminal update for an execution whose handler never ran (here, this time)."""
        job_id, number = key
        log.warning("ending execution without running it job_id=%s execution=%d status=%s "
                    "reason=%s", job_id, number, status, reason)
        try:
            await self.jobs.update_job_execution(
                jobId=job_id, thingName=self.thing, status=status,
                statusDetails={"reason": sanitize_detail(reason, "start")},
                expectedVersion=version, executionNumber=number)
        except ConflictException:
            self._wake.set()  # it changed meanwhile: decide again from a fresh list
            return
        except (InvalidStateTransitionException, ResourceNotFoundException,
                TerminalStateException):
            pass  # already ended in the cloud: nothing to say
        self._remember(key, status)

    def _request(self, job: RunningJob) -> RunRequest:
        job_id, number = job.key
        base = Path(self.config.state_dir)
        return RunRequest(
            job_id=job_id, execution_number=number, thing_name=self.thing, argv=job.work.argv,
            document=job.work.document, work_dir=base / "jobs" / f"{job_id}.{number}",
            log_path=self.job_logs / f"{job_id}.{number}.log", timeout=job.work.handler.timeout,
            kill_grace=self.config.kill_grace, user=job.work.handler.user,
            environment=dict(job.work.handler.environment))

    async def _run(self, job: RunningJob) -> None:
        reporter = job.reporter
        heartbeat = asyncio.create_task(reporter.run(), name=f"report:{job.key[0]}")
        watcher: asyncio.Task[None] | None = None
        try:
            job.process = HandlerProcess(self._request(job), on_progress=reporter.progress)
            await job.process.start()
            log.info("handler started %s pid=%s", job.where, job.process.pid)
            watcher = asyncio.create_task(self._stop_when_gone(job))
            result = await job.process.wait()
        except Exception as exc:  # a bug here must not strand the job IN_PROGRESS
            log.exception("agent error while running %s", job.where)
            result = RunResult(outcome="failed", reason=f"agent error: {type(exc).__name__}",
                               exit_code=None, signal=None, pid=None, duration=0.0,
                               output_head="", output_tail="", output_bytes=0)
        finally:
            heartbeat.cancel()
            if watcher is not None:
                watcher.cancel()
        await self._report(job, result)

    async def _stop_when_gone(self, job: RunningJob) -> None:
        await job.reporter.gone.wait()
        if job.process is not None and job.process.running:
            log.warning("stopping handler: execution ended in the cloud %s reason=%s", job.where,
                        job.reporter.gone_reason)
            await job.process.cancel(f"canceled in the cloud ({job.reporter.gone_reason})")

    async def _report(self, job: RunningJob, result: RunResult) -> None:
        if job.reporter.gone.is_set():
            log.info("handler stopped after cancellation %s outcome=%s; no status sent",
                     job.where, result.outcome)
            self._done(job, "CANCELED")
            return
        status = "SUCCEEDED" if result.outcome == "succeeded" else "FAILED"
        extra = {"reason": f"interrupted: {job.interrupted}"} if job.interrupted else None
        details = status_details(result, extra=extra)
        log.log(logging.INFO if status == "SUCCEEDED" else logging.WARNING,
                "handler finished %s outcome=%s reason=%s duration=%.1fs status=%s", job.where,
                result.outcome, details.get("reason", ""), result.duration, status)
        deadline = time.monotonic() + _FINAL_REPORT_GRACE if self._stopping else None
        delivered = await job.reporter.finish(status, details, deadline=deadline)
        self._done(job, status if delivered else "UNDELIVERED")

    def _done(self, job: RunningJob, status: str) -> None:
        self.running.pop(job.key, None)
        self._remember(job.key, status)
        self._on_change()
        if not self._stopping:
            self._wake.set()  # capacity freed: look for the next job

    def _remember(self, key: ExecutionKey, status: str) -> None:
        self.finished[key] = status
        while len(self.finished) > _REMEMBERED:
            self.finished.popitem(last=False)

    # ------------------------------------------------------------------ the cloud moved

    async def _check_gone(self, key: ExecutionKey) -> None:
        """A job we run is missing from the pending list: confirm, then stop its handler."""
        job = self.running.get(key)
        if job is None or job.reporter.gone.is_set():
            return
        try:
            described = await self.jobs.describe_job_execution(
                jobId=key[0], thingName=self.thing, executionNumber=key[1],
                includeJobDocument=False)
            status = described.get("execution", {}).get("status", "gone")
        except (ResourceNotFoundException, TerminalStateException) as exc:
            status = exc.code
        if status != "IN_PROGRESS" and key in self.running:
            job.reporter.mark_gone(f"execution is {status}")

    async def _fail_orphan(self, key: ExecutionKey, summary: dict[str, Any]) -> None:
        """IN_PROGRESS in the cloud but not running here: the agent died while it ran."""
        await self._end_unrun(key, summary["versionNumber"], "FAILED",
                              "interrupted: the agent restarted while this job ran; it was not "
                              "run again (its handler may or may not have finished)")

    # ------------------------------------------------------------------ shutdown

    async def shutdown(self, grace: float) -> None:
        """Stop claiming; give handlers ``grace`` seconds; stop the rest and report them."""
        self._stopping = True
        self._wake.set()
        # A sync in flight may be claiming a job right now: let it finish, so that job is
        # either ours (and waited for below) or untouched, never claimed and abandoned.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._sync_lock.acquire(),
                                   self.config.mqtt.request_timeout * 3 + 5)
        tasks = [job.task for job in self.running.values() if job.task is not None]
        if tasks:
            log.info("waiting for running handlers jobs=%d grace=%.0fs", len(tasks), grace)
            _, late = await asyncio.wait(tasks, timeout=grace)
            for job in list(self.running.values()):
                if job.task in late and job.process is not None:
                    job.interrupted = (f"the agent was stopped and the handler did not finish "
                                       f"within {grace:.0f}s")
                    await job.process.cancel(job.interrupted)
            if late:
                await asyncio.wait(late, timeout=self.config.kill_grace + _FINAL_REPORT_GRACE + 5)
