"""The dispatcher: claims executions, runs their handlers, reports, and recovers after a crash.

Everything funnels through one :meth:`Dispatcher.sync`: on start, after every (re)connect, on
every ``notify``/``notify-next`` and on the safety poll, it asks the service for the pending list
(the truth) and compares it with the journal. Notifications are only a doorbell, so a duplicate,
late or out-of-order one cannot start a job twice: an execution already in the journal is never
claimed again, and a claim is an ``expectedVersion`` update from QUEUED.

Each step is committed to the journal before it happens (claim, spawn, reboot), and each status
that matters is committed to the outbox before it is sent; :meth:`_recover` reads them back after
a crash or a reboot and finishes what was started, honestly (see :mod:`agent.recovery`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import Config
from agent.errors import (
    AgentError,
    ConflictException,
    InvalidStateTransitionException,
    JournalError,
    ResourceNotFoundException,
    TerminalStateException,
)
from agent.jobs import JobsClient
from agent.journal import Journal, Record
from agent.lifecycle import DocumentError, ExecutionKey, Work, parse_document, step_timeout_minutes
from agent.recovery import REBOOT_EXIT_CODE, Machine, plan_recovery
from agent.reporter import Reporter, backoff
from agent.runner import HandlerProcess, RunRequest, RunResult, sanitize_detail, status_details

__all__ = ["Dispatcher"]

log = logging.getLogger("agent.dispatcher")

_FINAL_REPORT_GRACE = 15.0  # seconds a stopping agent keeps trying to deliver final statuses
_GONE = (ResourceNotFoundException, InvalidStateTransitionException, TerminalStateException)
_PRUNE_EVERY = 3600.0


@dataclass
class RunningJob:
    key: ExecutionKey
    work: Work
    reporter: Reporter
    phase: str = "run"  # or "verify": the check a handler asked for after its reboot
    process: HandlerProcess | None = None
    task: asyncio.Task[None] | None = None
    interrupted: str | None = None  # set when the agent itself stops the handler
    started: float = field(default_factory=time.monotonic)
    step: str | None = None  # the latest "step" the handler reported (for `status`)

    @property
    def where(self) -> str:
        return f"job_id={self.key[0]} execution={self.key[1]} handler={self.work.operation}"


class Dispatcher:
    """Claims and runs the jobs of one thing. Call :meth:`wake` on any hint; run :meth:`run`."""

    def __init__(self, config: Config, jobs: JobsClient, journal: Journal, *,
                 job_logs: Path | None = None, machine: Machine | None = None,
                 on_change: Callable[[], None] | None = None,
                 on_outcome: Callable[[ExecutionKey, str, dict[str, str]], None] | None = None,
                 ) -> None:
        self.config = config
        self.jobs = jobs
        self.journal = journal
        self.machine = machine or Machine(config)
        self.job_logs = job_logs or Path(config.state_dir) / "logs"
        self.thing = config.thing_name
        self.running: dict[ExecutionKey, RunningJob] = {}
        self.delivering: dict[ExecutionKey, Reporter] = {}
        self.refusing: str | None = None  # why new jobs are not taken (journal unwritable)
        self.synced = asyncio.Event()  # set after the first successful sync
        self.last_sync: float | None = None  # wall clock of the last successful sync
        self.last_sync_error: str | None = None  # why the latest sync failed, until one works
        self._recovered = False
        self._wake = asyncio.Event()
        self._sync_lock = asyncio.Lock()
        self._stopping = False
        self._last_prune = 0.0
        self._finished_since_prune = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._on_change = on_change or (lambda: None)
        # Observers only (status, metrics): an execution ended with this status and details.
        self._on_outcome = on_outcome or (lambda key, status, details: None)

    # ------------------------------------------------------------------ main loop

    def wake(self, reason: str) -> None:
        log.debug("sync requested reason=%s", reason)
        self._wake.set()

    def reconfigure(self, config: Config) -> None:
        """A reload: new jobs use ``config``'s handlers and limits; running ones keep theirs."""
        self.config = config
        self.machine.config = config
        self.wake("reload")

    def reconnected(self) -> None:
        """Connected again: retry owed statuses now, and resync."""
        for reporter in [*self.delivering.values(), *(j.reporter for j in self.running.values())]:
            reporter.nudge()
        self.wake("connected")

    async def run(self) -> None:
        """Sync whenever woken, and at least every ``poll_interval``."""
        attempt = 0
        while not self._stopping:
            interval = min(self.config.poll_interval, 30.0) if self.refusing \
                else self.config.poll_interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            if self._stopping:
                return
            try:
                await self.sync()
                attempt = 0
            except Exception as exc:  # the loop that takes jobs must outlive any one failure
                attempt += 1
                self.last_sync_error = f"{type(exc).__name__}: {exc}"
                self._on_change()
                delay = backoff(attempt, low=1.0, high=min(60.0, self.config.poll_interval))
                if isinstance(exc, AgentError):
                    log.warning("sync failed, retrying in=%.1fs error=%s: %s", delay,
                                type(exc).__name__, exc)
                else:
                    log.exception("sync failed unexpectedly, retrying in=%.1fs", delay)
                await asyncio.sleep(delay)
                self._wake.set()

    async def sync(self) -> None:
        async with self._sync_lock:
            if not self._recovered:
                await self._recover()
                self._recovered = True
            pending = await self.jobs.get_pending_job_executions(thingName=self.thing)
            in_progress = {(s["jobId"], s["executionNumber"]): s
                           for s in pending["inProgressJobs"]}
            queued = [(s["jobId"], s["executionNumber"]) for s in pending["queuedJobs"]]
            listed = set(in_progress) | set(queued)
            for key, summary in in_progress.items():
                if key not in self.running and await self.journal.get(key) is None:
                    await self._end_unrun(key, summary["versionNumber"], "FAILED", (
                        "interrupted: this device has no record of running this job (its "
                        "state was lost or reset); it was not run again"))
            for key in [k for k in self.running if k not in listed]:
                await self._check_gone(key)
            await self._claim_queued(queued)
            self.synced.set()
            self.last_sync, self.last_sync_error = time.time(), None
            self._on_change()
        await self._maybe_prune()

    async def _claim_queued(self, queued: list[ExecutionKey]) -> None:
        for key in queued:
            if self._stopping or len(self.running) >= self.config.max_concurrent_jobs:
                return
            if key in self.running:
                continue
            try:
                record = await self.journal.get(key)
            except JournalError as exc:
                self._refuse(str(exc))
                return
            if record is None:
                await self._claim(key)
            elif record.state == "claiming":
                await self._settle_claim(key)  # an earlier claim whose answer never came
            # else: ours already; never claimed twice, whatever the cloud says

    def _refuse(self, reason: str) -> None:
        if self.refusing is None:
            log.error("not taking new jobs: %s; they stay QUEUED and run once the journal can "
                      "be written again (free space in %s)", reason, self.config.state_dir)
        self.refusing = reason
        self._on_change()

    # ------------------------------------------------------------------ claim and run

    async def _claim(self, key: ExecutionKey) -> None:
        job_id, number = key
        try:
            described = await self.jobs.describe_job_execution(
                jobId=job_id, thingName=self.thing, executionNumber=number,
                includeJobDocument=True)
        except _GONE:
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
            await self.journal.claiming(key, work.operation, work.document, version, step)
        except JournalError as exc:
            self._refuse(str(exc))
            return
        if self.refusing is not None:
            log.info("journal writable again: taking jobs")
            self.refusing = None
        try:
            reply = await self.jobs.update_job_execution(
                jobId=job_id, thingName=self.thing, status="IN_PROGRESS",
                statusDetails={"step": "starting", "handler": work.operation},
                expectedVersion=version, executionNumber=number, stepTimeoutInMinutes=step,
                includeJobExecutionState=True)
        except ConflictException:
            log.info("claim lost a race, resyncing job_id=%s execution=%d", job_id, number)
            await self.journal.forget(key)  # never claimed: may be claimed later
            self._wake.set()
            return
        except _GONE as exc:
            log.info("job ended before it was claimed job_id=%s execution=%d reason=%s",
                     job_id, number, exc.code)
            await self.journal.done(key)
            return
        except AgentError as exc:
            # No answer: the claim may or may not have been applied. Ask, then decide.
            log.warning("claim not confirmed job_id=%s execution=%d error=%s; checking",
                        job_id, number, exc)
            await self._settle_claim(key)
            return
        state = reply.get("executionState")
        # Asked for, but a reply without it still means "accepted": one version further.
        new_version = state["versionNumber"] if state else version + 1
        await self.journal.update(key, version=new_version)  # "running" once spawned
        self._launch(key, work, new_version, step)
        log.info("job claimed job_id=%s execution=%d handler=%s step_timeout=%dm", job_id,
                 number, work.operation, step)

    async def _settle_claim(self, key: ExecutionKey) -> None:
        """A claim whose answer never came: the cloud's status says whether it was applied."""
        record = await self.journal.get(key)
        if record is None:
            return
        status, version = await self._cloud_status(key)  # AgentError: try again next sync
        if status == "QUEUED":
            await self.journal.forget(key)  # not applied: claim it afresh
            self._wake.set()
        elif status == "IN_PROGRESS" and version is not None:
            work = parse_document_record(record, self.config)
            if work is None:
                await self.journal.done(key)
                return
            await self.journal.update(key, version=version)
            self._launch(key, work, version, record.step_minutes)
            log.info("claim confirmed job_id=%s execution=%d", *key)
        else:
            await self.journal.done(key)  # ended in the cloud meanwhile

    def _reporter(self, key: ExecutionKey, version: int, step: int) -> Reporter:
        return Reporter(self.jobs, self.thing, key[0], key[1], version, step_minutes=step,
                        progress_interval=self.config.progress_interval, journal=self.journal)

    def _launch(self, key: ExecutionKey, work: Work, version: int, step: int, *,
                phase: str = "run") -> None:
        job = RunningJob(key, work, self._reporter(key, version, step), phase=phase)
        self.running[key] = job
        job.task = asyncio.create_task(self._run(job), name=f"job:{key[0]}:{key[1]}")

    def _request(self, job: RunningJob) -> RunRequest:
        job_id, number = job.key
        handler = job.work.handler
        argv = job.work.argv if job.phase == "run" else [*(handler.verify or ()), *job.work.args]
        return RunRequest(
            job_id=job_id, execution_number=number, thing_name=self.thing, argv=argv,
            document=job.work.document,
            work_dir=Path(self.config.state_dir) / "jobs" / f"{job_id}.{number}",
            log_path=self.job_logs / f"{job_id}.{number}.log", timeout=handler.timeout,
            kill_grace=self.config.kill_grace, user=handler.user,
            environment={**handler.environment, "JOB_PHASE": job.phase})

    async def _run(self, job: RunningJob) -> None:
        reporter = job.reporter
        heartbeat = asyncio.create_task(reporter.run(), name=f"report:{job.key[0]}")
        watcher: asyncio.Task[None] | None = None
        try:
            job.process = HandlerProcess(self._request(job),
                                         on_progress=lambda d: self._progress(job, d))
            # Committed before the spawn: a crash from here on reads "may have started".
            await self.journal.started(job.key, None, None, self.machine.boot_id())
            await job.process.start()
            pid = job.process.pid
            await self.journal.update(job.key, pid=pid, pid_start=self.machine.start_time(pid))
            log.info("handler started %s phase=%s pid=%s", job.where, job.phase, pid)
            self._on_change()
            watcher = asyncio.create_task(self._stop_when_gone(job))
            result = await job.process.wait()
        except Exception as exc:  # a bug or a journal failure must not strand the job
            log.exception("agent error while running %s", job.where)
            if job.process is not None and job.process.running:
                await job.process.cancel(f"agent error: {exc}")
            result = RunResult(outcome="failed", reason=f"agent error: {type(exc).__name__}",
                               exit_code=None, signal=None, pid=None, duration=0.0,
                               output_head="", output_tail="", output_bytes=0)
        finally:
            heartbeat.cancel()
            if watcher is not None:
                watcher.cancel()
            reporter.close()
        try:
            await self._report(job, result)
        except Exception:  # e.g. the journal became unwritable: never leave a job "running"
            log.exception("could not report %s; the outbox or the next start will", job.where)
            self._done(job)

    def _progress(self, job: RunningJob, details: dict[str, str]) -> None:
        job.reporter.progress(details)
        if details.get("step") and details["step"] != job.step:
            job.step = details["step"]
            self._on_change()

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
            self._on_outcome(job.key, "CANCELED", {"reason": job.reporter.gone_reason})
            await self._forget_safely(job.key)
            self._done(job)
            return
        if job.phase == "run" and result.exit_code == REBOOT_EXIT_CODE and not job.interrupted:
            await self._reboot(job, result)
            return
        status = "SUCCEEDED" if result.outcome == "succeeded" else "FAILED"
        extra = {"reason": f"interrupted: {job.interrupted}"} if job.interrupted else None
        details = status_details(result, extra=extra)
        if job.phase == "verify":
            details["phase"] = "verify after reboot"
        log.log(logging.INFO if status == "SUCCEEDED" else logging.WARNING,
                "handler finished %s outcome=%s reason=%s duration=%.1fs status=%s", job.where,
                result.outcome, details.get("reason", ""), result.duration, status)
        await self._conclude(job.key, job.reporter, status, details)
        self._done(job)

    async def _conclude(self, key: ExecutionKey, reporter: Reporter, status: str,
                        details: dict[str, str]) -> None:
        """Commit the verdict with the update that reports it, then deliver it."""
        self._on_outcome(key, status, details)
        try:
            await self.journal.finish(key, status, details)
        except JournalError as exc:
            # Deliver anyway: the cloud hears the truth now even if this device cannot
            # remember it (a crash before delivery would then report the job interrupted).
            log.critical("cannot journal the result %s; sending it directly: %s", key, exc)
            await reporter.finish(status, details)
            return
        await self._deliver(key, reporter)

    async def _deliver(self, key: ExecutionKey, reporter: Reporter) -> bool:
        deadline = time.monotonic() + _FINAL_REPORT_GRACE if self._stopping else None
        self.delivering[key] = reporter
        self._on_change()  # a status is owed
        try:
            delivered = await reporter.deliver(deadline=deadline)
        finally:
            self.delivering.pop(key, None)
            self._on_change()
        if not delivered and not reporter.gone.is_set():
            log.warning("status still owed job_id=%s execution=%d; kept in the outbox for the "
                        "next start", *key)
        return delivered

    def _done(self, job: RunningJob) -> None:
        self.running.pop(job.key, None)
        self._finished_since_prune += 1
        self._on_change()
        if not self._stopping:
            self._wake.set()  # capacity freed: look for the next job

    async def _forget_safely(self, key: ExecutionKey) -> None:
        with contextlib.suppress(JournalError):
            await self.journal.done(key)

    # ------------------------------------------------------------------ reboot

    async def _reboot(self, job: RunningJob, result: RunResult) -> None:
        """The handler asked for a reboot: say so, make sure the cloud heard it, then reboot."""
        log.info("handler asked for a reboot %s; reporting 'rebooting' first", job.where)
        details = {"step": "rebooting", "handler": job.work.operation}
        await self.journal.finish(job.key, "IN_PROGRESS", details, state="rebooting")
        self.running.pop(job.key, None)
        self.delivering[job.key] = job.reporter
        try:
            while not await job.reporter.deliver():  # retries until accepted or gone
                if job.reporter.gone.is_set():
                    log.warning("job ended in the cloud before the reboot %s; not rebooting",
                                job.where)
                    return
        finally:
            self.delivering.pop(job.key, None)
        outcome = await self.machine.reboot()
        reason = outcome or (f"the device did not reboot within "
                             f"{self.config.reboot_timeout:.0f}s of the reboot command")
        log.error("reboot failed %s reason=%s", job.where, reason)
        await self._conclude(job.key, job.reporter, "FAILED", {"reason": reason})
        self._on_change()

    # ------------------------------------------------------------------ recovery

    async def _recover(self) -> None:
        """Finish what a previous run of the agent started (crash, kill -9, reboot)."""
        for record in await self.journal.open_records():
            if record.key in self.running:
                continue
            cloud = await self._cloud_status(record.key)
            action = plan_recovery(record, cloud, self.config, self.machine)
            log.info("recovering job_id=%s execution=%d state=%s cloud=%s action=%s",
                     record.job_id, record.execution_number, record.state, cloud, action.kind)
            await self._apply(record, action)

    async def _cloud_status(self, key: ExecutionKey) -> tuple[str, int | None]:
        try:
            described = await self.jobs.describe_job_execution(
                jobId=key[0], thingName=self.thing, executionNumber=key[1],
                includeJobDocument=False)
        except (ResourceNotFoundException, TerminalStateException) as exc:
            return (exc.code, None)
        execution = described.get("execution") or {}
        return (execution.get("status", "ResourceNotFound"), execution.get("versionNumber"))

    async def _apply(self, record: Record, action: Any) -> None:
        key = record.key
        if action.kill_pid is not None:
            await self.machine.kill_group(action.kill_pid, self.config.kill_grace)
        if action.kind == "forget":
            await self.journal.forget(key)
        elif action.kind == "done":
            await self.journal.done(key)
        elif action.kind in ("run", "verify"):
            work = parse_document_record(record, self.config)
            if work is None:
                details = {"reason": f"handler {record.operation!r} is no longer configured"}
                self._on_outcome(key, "FAILED", details)
                await self.journal.finish(key, "FAILED", details)
                await self._deliver(key, self._reporter(key, action.version, 1))
                return
            await self.journal.update(key, version=action.version)
            self._launch(key, work, action.version, record.step_minutes, phase=action.kind)
        elif action.kind == "report":
            reporter = self._reporter(key, action.version or record.version, record.step_minutes)
            if action.status is not None:
                self._on_outcome(key, action.status, action.details)
                await self.journal.finish(key, action.status, action.details)
            self._spawn(self._deliver(key, reporter))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ the cloud moved

    async def _check_gone(self, key: ExecutionKey) -> None:
        """A job we run is missing from the pending list: confirm, then stop its handler."""
        job = self.running.get(key)
        if job is None or job.reporter.gone.is_set():
            return
        status, _ = await self._cloud_status(key)
        if status != "IN_PROGRESS" and key in self.running:
            job.reporter.mark_gone(f"execution is {status}")

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
        except _GONE:
            pass  # already ended in the cloud: nothing to say
        else:
            self._on_outcome(key, status, {"reason": reason})

    # ------------------------------------------------------------------ housekeeping

    async def _maybe_prune(self) -> None:
        # Hourly, and also once a tenth of max_records has finished since the last pruning: a
        # burst of jobs must not carry the journal (and the logs and work directories pruned
        # with it) far past max_records before the hour is up (issue 5's flatness benchmark).
        now = time.monotonic()
        burst = self._finished_since_prune >= max(1, self.config.max_records // 10)
        if self._last_prune and now - self._last_prune < _PRUNE_EVERY and not burst:
            return
        self._last_prune = now
        self._finished_since_prune = 0
        try:
            pruned = await self.journal.prune(self.config.retention, self.config.max_records)
        except JournalError as exc:
            log.warning("journal pruning failed: %s", exc)
            return
        for job_id, number in pruned:
            self.machine.remove_job_files(self.job_logs / f"{job_id}.{number}.log",
                                          Path(self.config.state_dir) / "jobs" /
                                          f"{job_id}.{number}")
        if pruned:
            log.info("pruned finished jobs from the journal count=%d", len(pruned))

    # ------------------------------------------------------------------ shutdown

    async def shutdown(self, grace: float, force: asyncio.Event | None = None) -> None:
        """Stop claiming; give handlers ``grace`` seconds (cut short by ``force``, a second
        signal); stop the rest and report them."""
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
            everything = asyncio.gather(*tasks, return_exceptions=True)
            forced = asyncio.ensure_future((force or asyncio.Event()).wait())
            await asyncio.wait({everything, forced}, timeout=grace,
                               return_when=asyncio.FIRST_COMPLETED)
            forced.cancel()
            late = {t for t in tasks if not t.done()}
            if late and force is not None and force.is_set():
                log.warning("second signal: not waiting for running handlers")
            forced_now = force is not None and force.is_set()
            for job in list(self.running.values()):
                if job.task in late and job.process is not None:
                    job.interrupted = (
                        "the agent was stopped at once (second signal) before the handler "
                        "finished" if forced_now else
                        f"the agent was stopped and the handler did not finish within "
                        f"{grace:.0f}s")
                    await job.process.cancel(job.interrupted)
            if late:
                await asyncio.wait(late, timeout=self.config.kill_grace + _FINAL_REPORT_GRACE + 5)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=_FINAL_REPORT_GRACE)


def parse_document_record(record: Record, config: Config) -> Work | None:
    """The :class:`Work` of a journaled execution, or None if its handler was removed."""
    try:
        return parse_document(json.dumps(record.document), config.handlers)
    except DocumentError:
        return None
