"""The dispatcher: claims executions, runs their handlers, reports, and recovers after a crash.

:meth:`Dispatcher.sync` is the full reconciliation: on start, after every (re)connect, on the
safety poll and whenever a ``notify`` says something this device does not know, it asks the
service for the pending list (the truth) and compares it with the journal. A ``notify-next``
carries the head of the list with its document: its execution is claimed straight from the
message (issue 12: one PUBLISH, no get, no describe). Both run under one lock, one decision at
a time, so a duplicate, late or out-of-order notification cannot start a job twice: an
execution already in the journal is never claimed again, and a claim is an ``expectedVersion``
update from QUEUED (a stale message's version is refused, VersionMismatch, and a sync decides
afresh). "Already in the journal" means the same execution, not only the same (jobId,
executionNumber): a deleted job's id and numbers may be reused, and :mod:`agent.claims` tells
them apart, and decides what each notification asks for.

Claiming is isolated per execution: a failure that belongs to one execution (its document
cannot be read) ends that execution REJECTED and the sync moves on; only a failure of the
thing's own channel (no answer to anything) fails the sync, which is then retried whole.

A job's document becomes a plan of steps (:mod:`agent.documents`) before it is claimed; the
steps run one after the other (:mod:`agent.execution` decides what each step's end means), and
the dispatcher never asks which form the document came in.

Each step is committed to the journal before it happens (claim, spawn of each step, reboot), and
each status that matters is committed to the outbox before it is sent; :meth:`_recover` reads
them back after a crash or a reboot and finishes what was started, honestly (see
:mod:`agent.recovery`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import claims
from agent.claims import InProgress, Notice, Queued, Trouble
from agent.config import Config, HandlerLimits
from agent.documents import DocumentError, Plan, Verdict, plan_document, plan_job
from agent.errors import (
    AgentError,
    ConflictException,
    InvalidResponseError,
    InvalidStateTransitionException,
    JournalError,
    RequestTimeoutError,
    ResourceNotFoundException,
    TerminalStateException,
)
from agent.execution import PlanRun, StepRun, final_report, handoff, progress, step_label, verdict
from agent.jobs import JobsClient
from agent.journal import Journal, Record
from agent.lifecycle import ExecutionKey, step_timeout_minutes
from agent.paths import job_work_dir
from agent.recovery import Machine, plan_recovery
from agent.reporter import Reporter, backoff
from agent.runner import HandlerProcess, RunRequest, RunResult, sanitize_detail

__all__ = ["Dispatcher"]

log = logging.getLogger("agent.dispatcher")

_FINAL_REPORT_GRACE = 15.0  # seconds a stopping agent keeps trying to deliver final statuses
_GONE = (ResourceNotFoundException, InvalidStateTransitionException, TerminalStateException)
_PRUNE_EVERY = 3600.0
_ENDED_KEPT = 32  # recently ended executions a late notification may still list
_RETRY_TROUBLED = 1.0  # seconds before a sync retries an execution whose describe timed out
_UNREADABLE = "the job document could not be read"


@dataclass
class RunningJob:
    key: ExecutionKey
    plan: Plan
    reporter: Reporter
    step: int = 0  # the step running now (where the plan starts, until it does)
    phase: str = "run"  # or "verify": the check a handler asked for after its reboot
    process: HandlerProcess | None = None
    task: asyncio.Task[None] | None = None
    interrupted: str | None = None  # set when the agent itself stops the handler
    queued_at: int | None = None  # the execution's queuedAt (None: unknown), for notifications
    started: float = field(default_factory=time.monotonic)
    progress_step: str | None = None  # the latest "step" the handler reported (for `status`)
    # The handler has ended: from here on only the reporter's own exchange with the service
    # says whether the cloud ended the execution. The pending list cannot: our own final
    # update removes the execution from it before we hear that the update was accepted.
    concluding: bool = False

    @property
    def where(self) -> str:
        where = (f"job_id={self.key[0]} execution={self.key[1]} "
                 f"handler={self.plan.steps[self.step].name}")
        return f"{where} step={step_label(self.plan, self.step)}" if self.plan.reports_steps \
            else where


class Dispatcher:
    """Claims and runs the jobs of one thing. Call :meth:`wake` on any hint; run :meth:`run`."""

    def __init__(self, config: Config, jobs: JobsClient, journal: Journal, *,
                 job_logs: Path | None = None, machine: Machine | None = None,
                 on_change: Callable[[], None] | None = None,
                 on_outcome: Callable[[ExecutionKey, str, dict[str, str]], None] | None = None,
                 on_restart: Callable[[], None] | None = None) -> None:
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
        self._wake = asyncio.Event()  # something to do: a sync asked for, or a notification
        self._want_sync = False
        self._notices: dict[str, dict[str, Any]] = {}  # the latest notify / notify-next body
        # A QUEUED execution was left for want of a free slot: sync when a cloud-ended job's
        # slot frees (see _done).
        self._deferred = False
        # The latest executions whose handlers ended here (key -> queuedAt): a notification
        # sent before their end arrives after it, and must not look like news.
        self._ended: dict[ExecutionKey, int | None] = {}
        self._sync_lock = asyncio.Lock()
        self._stopping = False
        self._last_prune = 0.0
        self._finished_since_prune = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._on_change = on_change or (lambda: None)
        # Observers only (status, metrics): an execution ended with this status and details.
        self._on_outcome = on_outcome or (lambda key, status, details: None)
        self._trouble = Trouble()
        self._on_restart = on_restart  # a step asked for the agent to restart itself

    # ------------------------------------------------------------------ main loop

    def wake(self, reason: str) -> None:
        log.debug("sync requested reason=%s", reason)
        self._want_sync = True
        self._wake.set()

    def notified(self, kind: str, body: dict[str, Any]) -> None:
        """A ``notify`` or ``notify-next`` arrived. Only the latest of each kind matters (each
        describes the whole list, or its head, as it is now); :meth:`run` acts on it."""
        self._notices[kind] = body
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
            try:
                await asyncio.wait_for(self._wake.wait(), interval)
            except TimeoutError:
                self._want_sync = True  # the safety poll
            self._wake.clear()
            if self._stopping:
                return
            try:
                await self.step()
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
                self.wake("retry")

    async def step(self) -> None:
        """One round of :meth:`run`: act on the latest notifications, then sync if asked."""
        await self._take_notices()
        if self._want_sync:
            self._want_sync = False
            await self.sync()

    async def _take_notices(self) -> None:
        """Act on the latest notifications: notify-next first (it may claim its execution,
        which the notify then finds held), then notify."""
        while self._notices and not self._want_sync and not self._stopping:
            kind = "notify-next" if "notify-next" in self._notices else "notify"
            body = self._notices.pop(kind)
            async with self._sync_lock:
                if not self._recovered:
                    self._want_sync = True  # the first sync recovers, then decides
                    return
                held: dict[ExecutionKey, int | None] = {
                    **self._ended, **{key: None for key in self.delivering},
                    **{key: job.queued_at for key, job in self.running.items()}}
                running = [k for k, j in self.running.items() if not j.concluding]
                free = self._free_slots()
                if kind == "notify-next":
                    execution = body.get("execution")
                    notice = claims.next_notice(execution, held=held, running=running,
                                                free=free)
                else:
                    notice = claims.notify_notice(body.get("jobs", {}), held=held,
                                                  running=running, free=free,
                                                  ended=self._ended)
                log.debug("%s notice=%s", kind, notice.value)
                if notice is Notice.SYNC:
                    self._want_sync = True
                elif notice is Notice.DEFER:
                    self._deferred = True
                elif notice is Notice.CLAIM:
                    assert execution is not None
                    await self._claim_notified(execution)

    async def _claim_notified(self, execution: dict[str, Any]) -> None:
        """notify-next's execution, QUEUED and not held here: claim it with the document the
        message carries, unless the journal says otherwise (then a sync decides)."""
        key = summary_key(execution)
        try:
            record = await self.journal.get(key)
        except JournalError as exc:
            self._refuse(str(exc))
            return
        if claims.queued_verdict(record, execution, busy=False) is not Queued.CLAIM:
            # A record of this key: ours already, an earlier claim to settle, or another
            # execution's. A message may be late, so only the pending list may tell a reused
            # key from our own execution notified again (its record is never archived on a
            # notification's word).
            self._want_sync = True
            return
        await self._claim_execution(key, execution, execution)

    def _free_slots(self) -> int:
        """Slots for new handlers: a job whose handler has ended (its status on its way) no
        longer holds one."""
        return self.config.max_concurrent_jobs - sum(
            1 for job in self.running.values() if not job.concluding)

    async def sync(self) -> None:
        async with self._sync_lock:
            self._deferred = False
            if not self._recovered:
                await self._recover()
                self._recovered = True
            pending = await self.jobs.get_pending_job_executions(thingName=self.thing)
            summaries = [*pending["inProgressJobs"], *pending["queuedJobs"]]
            self._trouble.keep_only(claims.identity(s) for s in summaries)
            listed = {summary_key(s) for s in summaries}
            for summary in pending["inProgressJobs"]:
                await self._settle_in_progress(summary)
            for key in [k for k in self.running if k not in listed]:
                await self._check_gone(key)
            await self._claim_queued(pending["queuedJobs"])
            self.synced.set()
            self.last_sync, self.last_sync_error = time.time(), None
            self._on_change()
        await self._maybe_prune()

    def _busy(self, key: ExecutionKey) -> Reporter | None:
        """The reporter of a handler or a status delivery under way for ``key``, if any."""
        job = self.running.get(key)
        return job.reporter if job is not None else self.delivering.get(key)

    async def _settle_in_progress(self, summary: dict[str, Any]) -> None:
        key = summary_key(summary)
        busy = self._busy(key)
        record = await self.journal.get(key)
        verdict = claims.in_progress_verdict(record, summary, busy=busy is not None)
        if verdict is InProgress.STOP_OLD:
            assert busy is not None and record is not None
            busy.mark_gone(self._replaced(record, summary))
            return
        if verdict is InProgress.REPLACE_UNKNOWN:
            assert record is not None
            await self._archive(record, summary)
        if verdict in (InProgress.UNKNOWN, InProgress.REPLACE_UNKNOWN):
            await self._end_unrun(key, summary["versionNumber"], "FAILED", (
                "interrupted: this device has no record of running this job (its state was "
                "lost or reset); it was not run again"))

    async def _claim_queued(self, queued: list[dict[str, Any]]) -> None:
        for summary in self._trouble.order(queued):
            key = summary_key(summary)
            busy = self._busy(key)  # then decided even without a free slot: it may hold one
            if busy is None and (self._stopping or self._free_slots() <= 0):
                self._deferred = True
                continue  # waits its turn (a free slot, or the next start), as QUEUED
            try:
                record = await self.journal.get(key)
            except JournalError as exc:
                self._refuse(str(exc))
                return
            verdict = claims.queued_verdict(record, summary, busy=busy is not None)
            if verdict is Queued.STOP_OLD:
                assert busy is not None and record is not None
                self._warn_once(summary, "stop-old", "not claimed yet: the execution this "
                                "device ran under the same id was deleted and its handler or "
                                "status delivery is still being stopped")
                busy.mark_gone(self._replaced(record, summary))
            elif verdict is Queued.REPLACE:
                assert record is not None
                await self._archive(record, summary)
                await self._claim(key, summary)
            elif verdict is Queued.CLAIM:
                await self._claim(key, summary)
            elif verdict is Queued.SETTLE:
                await self._settle_claim(key)  # an earlier claim whose answer never came
            elif busy is None and record is not None:
                # Never claimed twice, whatever the cloud says; but never silently either.
                self._warn_once(summary, "ours", f"not claimed: this device already claimed "
                                f"this very execution (journal state={record.state}, "
                                f"version={record.version}, queued_at={record.queued_at})")

    def _warn_once(self, summary: dict[str, Any], reason: str, text: str) -> None:
        """Why a QUEUED execution is left unclaimed: once per execution and reason."""
        if self._trouble.first_warning(claims.identity(summary), reason):
            log.warning("%s job_id=%s execution=%d queued_at=%s", text, summary["jobId"],
                        summary["executionNumber"], summary.get("queuedAt"))

    @staticmethod
    def _replaced(record: Record, summary: dict[str, Any]) -> str:
        return (f"the execution was deleted and its job id reused (queued_at "
                f"{record.queued_at} -> {summary.get('queuedAt')})")

    async def _archive(self, record: Record, summary: dict[str, Any]) -> None:
        """The record's execution was deleted and its key reused: keep it as history, with its
        files renamed after it, so the new execution starts clean."""
        await self.journal.archive(record.key)
        self.machine.move_job_files(
            (self._log_path(record.stem), self._log_path(record.archived_stem)),
            (self._work_dir(record.stem), self._work_dir(record.archived_stem)))
        log.info("job id reused: kept the earlier execution as history job_id=%s execution=%d "
                 "old_queued_at=%s old_state=%s new_queued_at=%s files=%s", record.job_id,
                 record.execution_number, record.queued_at, record.state,
                 summary.get("queuedAt"), record.archived_stem)

    def _log_path(self, stem: str) -> Path:
        return self.job_logs / f"{stem}.log"

    def _work_dir(self, stem: str) -> Path:
        return job_work_dir(self.config.state_dir, stem)

    def _refuse(self, reason: str) -> None:
        if self.refusing is None:
            log.error("not taking new jobs: %s; they stay QUEUED and run once the journal can "
                      "be written again (free space in %s)", reason, self.config.state_dir)
        self.refusing = reason
        self._on_change()

    # ------------------------------------------------------------------ claim and run

    async def _claim(self, key: ExecutionKey, summary: dict[str, Any]) -> None:
        job_id, number = key
        execution_id = claims.identity(summary)
        try:
            described = await self.jobs.describe_job_execution(
                jobId=job_id, thingName=self.thing, executionNumber=number,
                includeJobDocument=True)
        except _GONE:
            return  # gone since the list was made
        except (InvalidResponseError, RequestTimeoutError) as exc:
            await self._describe_failed(summary, exc)
            return
        self._trouble.clear(execution_id)
        execution = described.get("execution")
        if not execution or execution.get("status") != "QUEUED":
            return
        await self._claim_execution(key, execution, summary)

    async def _claim_execution(self, key: ExecutionKey, execution: dict[str, Any],
                               summary: dict[str, Any]) -> None:
        """Claim the QUEUED ``execution`` (described, or from notify-next, with its document):
        plan it (a bad document ends it REJECTED, unclaimed), journal the claim, send it."""
        job_id, number = key
        version = execution["versionNumber"]
        problem = claims.document_problem(execution.get("jobDocument"))
        if problem is not None:
            await self._end_unrun(key, version, "REJECTED", f"{_UNREADABLE}: {problem}")
            return
        try:
            plan = plan_job(execution.get("jobDocument"), self.config)
        except DocumentError as exc:
            await self._end_unrun(key, version, "REJECTED", str(exc))
            return
        step = step_timeout_minutes(plan.timeout)  # the whole plan, not one step of it
        queued_at = execution.get("queuedAt", summary.get("queuedAt"))
        try:
            await self.journal.claiming(key, plan.operation, plan.document, version, step,
                                        queued_at=queued_at)
        except JournalError as exc:
            self._refuse(str(exc))
            return
        if self.refusing is not None:
            log.info("journal writable again: taking jobs")
            self.refusing = None
        try:
            reply = await self.jobs.update_job_execution(
                jobId=job_id, thingName=self.thing, status="IN_PROGRESS",
                statusDetails={"step": "starting", "handler": plan.operation},
                expectedVersion=version, executionNumber=number, stepTimeoutInMinutes=step,
                includeJobExecutionState=True)
        except ConflictException:
            # VersionMismatch: the execution moved on since the list, the describe or the
            # notification we claimed from (a stale notify-next). Never ours: decide afresh.
            log.info("claim lost a race, resyncing job_id=%s execution=%d", job_id, number)
            await self.journal.forget(key)  # never claimed: may be claimed later
            self.wake("claim-conflict")
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
        # The new version is committed with the first step's start (journal.started): no
        # side effect between the two, so one commit (issue 12). A crash before it leaves
        # "claiming", settled against the cloud by recovery as before.
        self._launch(key, plan, new_version, step, queued_at=queued_at if isinstance(
            queued_at, int) else None)
        log.info("job claimed job_id=%s execution=%d handler=%s form=%s step_timeout=%dm",
                 job_id, number, plan.operation, plan.form, step)

    async def _describe_failed(self, summary: dict[str, Any], exc: AgentError) -> None:
        """The describe with the document got an unreadable reply, or none (awscrt drops a
        reply it cannot parse). If a describe without the document is answered, the thing's
        channel works and the failure is this execution's: count it, try the other jobs, and
        after :data:`claims.DESCRIBE_ATTEMPTS` end it REJECTED. A one-off (a lost or garbled
        message) costs a retry, never the job. If that is not answered either, it is the
        thing's problem: the sync fails and is retried whole."""
        execution_id = claims.identity(summary)
        described = await self._describe_light(summary)  # AgentError: the thing's problem
        if described is None:
            return
        count = self._trouble.strike(execution_id)
        why = (f"the reply was unreadable ({exc.message})"
               if isinstance(exc, InvalidResponseError) else
               f"no reply within {self.config.mqtt.request_timeout:g}s")
        if not self._trouble.exhausted(execution_id):
            self._warn_once(summary, "describe-failed", (
                f"not claimed yet: its describe failed ({why}) while describes without the "
                f"document are answered; trying the other jobs first, then this one again "
                f"(attempt {count} of {self._trouble.limit})"))
            asyncio.get_running_loop().call_later(_RETRY_TROUBLED, self.wake, "retry-troubled")
            return
        await self._end_unrun(summary_key(summary), described["versionNumber"], "REJECTED", (
            f"{_UNREADABLE}: {count} describes of it failed while describes without the "
            f"document were answered (last: {why}); a document nested too deeply or with "
            f"invalid Unicode does this"))
        self._trouble.clear(execution_id)

    async def _describe_light(self, summary: dict[str, Any]) -> dict[str, Any] | None:
        """The execution, without its document, if it is still the QUEUED one listed."""
        try:
            described = await self.jobs.describe_job_execution(
                jobId=summary["jobId"], thingName=self.thing,
                executionNumber=summary["executionNumber"], includeJobDocument=False)
        except _GONE:
            return None
        execution = described.get("execution") or {}
        if execution.get("status") != "QUEUED" or \
                claims.identity(execution) != claims.identity(summary):
            return None  # it moved on (or was replaced) since the list was made
        return execution

    async def _settle_claim(self, key: ExecutionKey) -> None:
        """A claim whose answer never came: the cloud's status says whether it was applied."""
        record = await self.journal.get(key)
        if record is None:
            return
        status, version = await self._cloud_status(key, record)  # AgentError: next sync
        if status == "QUEUED":
            await self.journal.forget(key)  # not applied: claim it afresh
            self.wake("claim-not-applied")
        elif status == "IN_PROGRESS" and version is not None:
            plan = self._plan_of(record)
            if isinstance(plan, str):
                await self.journal.done(key)
                return
            self._launch(key, plan, version, record.step_minutes, queued_at=record.queued_at)
            log.info("claim confirmed job_id=%s execution=%d", *key)
        else:
            await self.journal.done(key)  # ended in the cloud meanwhile

    def _reporter(self, key: ExecutionKey, version: int, step: int) -> Reporter:
        return Reporter(self.jobs, self.thing, key[0], key[1], version, step_minutes=step,
                        progress_interval=self.config.progress_interval, journal=self.journal)

    def _launch(self, key: ExecutionKey, plan: Plan, version: int, step_minutes: int, *,
                start: int = 0, phase: str = "run", queued_at: int | None = None) -> None:
        """Run ``plan`` from step ``start``; ``version`` (the cloud's, after the claim) is
        committed with that step's start."""
        job = RunningJob(key, plan, self._reporter(key, version, step_minutes), step=start,
                         phase=phase, queued_at=queued_at)
        self.running[key] = job
        job.task = asyncio.create_task(self._run(job), name=f"job:{key[0]}:{key[1]}")

    def _plan_of(self, record: Record) -> Plan | str:
        """The plan of a journaled execution under today's config, or why there is none."""
        try:
            return plan_document(record.document, self.config)
        except DocumentError as exc:
            return str(exc)

    def _request(self, job: RunningJob) -> RunRequest:
        job_id, number = job.key
        step = job.plan.steps[job.step]
        argv = step.argv if job.phase == "run" else (step.verify or ())
        stem = f"{job_id}.{number}"
        return RunRequest(
            job_id=job_id, execution_number=number, thing_name=self.thing, argv=list(argv),
            document=job.plan.document, work_dir=self._work_dir(stem),
            log_path=self._log_path(stem), timeout=step.timeout,
            kill_grace=self.config.kill_grace, user=step.user, limits=self._limits(step.handler),
            step=job.step, phase=job.phase,
            environment={**step.environment, "JOB_PHASE": job.phase,
                         "JOB_STEP": step_label(job.plan, job.step), "JOB_STEP_NAME": step.name,
                         "IOT_JOBS_AGENT_SERVICE": self.machine.own_service()})

    def _limits(self, handler: str | None) -> HandlerLimits | None:
        """A YAML handler's unit limits (steps without a YAML handler have none)."""
        settings = self.config.handlers.get(handler) if handler is not None else None
        return settings.limits if settings is not None else None

    async def _run(self, job: RunningJob) -> None:
        reporter = job.reporter
        heartbeat = asyncio.create_task(reporter.run(), name=f"report:{job.key[0]}")
        watcher = asyncio.create_task(self._stop_when_gone(job))
        run = PlanRun()
        try:
            await self._run_plan(job, run)
        except Exception as exc:  # a bug or a journal failure must not strand the job
            log.exception("agent error while running %s", job.where)
            if job.process is not None and job.process.running:
                await job.process.cancel(f"agent error: {exc}")
            result = RunResult(outcome="failed", reason=f"agent error: {type(exc).__name__}",
                               exit_code=None, signal=None, pid=None, duration=0.0,
                               output_head="", output_tail="", output_bytes=0)
            run.runs.append(StepRun(job.step, job.plan.steps[job.step], job.phase, result,
                                    Verdict(False, result.reason)))
        finally:
            job.concluding = True
            heartbeat.cancel()
            watcher.cancel()
            reporter.close()
        try:
            await self._report(job, run)
        except Exception:  # e.g. the journal became unwritable: never leave a job "running"
            log.exception("could not report %s; the outbox or the next start will", job.where)
            self._done(job)

    async def _run_plan(self, job: RunningJob, run: PlanRun) -> None:
        """The steps from ``job.step`` on, in order, until one fails or hands over."""
        plan = job.plan
        while job.step < len(plan.steps) and not job.interrupted \
                and not job.reporter.gone.is_set():
            step = plan.steps[job.step]
            keys = progress(plan, job.step)
            if keys:
                job.reporter.progress(keys)
            result = await self._run_step(job, keys)
            asked = handoff(step, job.phase, result, job.interrupted is not None)
            if asked is not None:
                run.runs.append(StepRun(job.step, step, job.phase, result,
                                        Verdict(True, result.reason)))
                run.handoff = asked
                return
            done = StepRun(job.step, step, job.phase, result, verdict(step, result))
            run.runs.append(done)
            if done.state == "failed" or job.step + 1 == len(plan.steps):
                return  # journaled with the verdict: one commit, not two (see _report)
            await self.journal.step_ended(job.key, job.step, done.state, done.verdict.reason)
            if plan.reports_steps:
                log.info("step finished %s state=%s reason=%s", job.where, done.state,
                         done.verdict.reason)
            job.step, job.phase = job.step + 1, "run"
        job.step = min(job.step, len(plan.steps) - 1)  # the last step that ran, for the logs

    async def _run_step(self, job: RunningJob, keys: dict[str, str]) -> RunResult:
        def report(values: dict[str, str]) -> None:  # the plan names the step, not the handler
            job.reporter.progress({**values, **keys})
            if values.get("step") and values["step"] != job.progress_step:
                job.progress_step = values["step"]  # what `status` shows
                self._on_change()

        step = job.plan.steps[job.step]
        job.process = HandlerProcess(self._request(job), on_progress=report)
        # Committed before the spawn: a crash from here on reads "may have started".
        await self.journal.started(job.key, job.step, step.name, self.machine.boot_id(),
                                   version=job.reporter.version)
        await job.process.start()
        pid = job.process.pid
        await self.journal.update(job.key, pid=pid, pid_start=self.machine.start_time(pid))
        log.info("handler started %s phase=%s pid=%s", job.where, job.phase, pid)
        self._on_change()
        return await job.process.wait()

    async def _stop_when_gone(self, job: RunningJob) -> None:
        await job.reporter.gone.wait()
        # Also a step about to start (it then never spawns); no next step starts after this.
        if job.process is not None:
            if job.process.running:
                log.warning("stopping handler: execution ended in the cloud %s reason=%s",
                            job.where, job.reporter.gone_reason)
            await job.process.cancel(f"canceled in the cloud ({job.reporter.gone_reason})")

    async def _report(self, job: RunningJob, run: PlanRun) -> None:
        if job.reporter.gone.is_set():
            log.info("handler stopped after cancellation %s; no status sent", job.where)
            self._on_outcome(job.key, "CANCELED", {"reason": job.reporter.gone_reason})
            await self._forget_safely(job.key)
            self._done(job)
            return
        if run.handoff == "reboot":
            await self._reboot(job)
            return
        if run.handoff == "restart":
            await self._restart(job)
            return
        status, details = final_report(job.plan, run, job.interrupted)
        last = run.last
        log.log(logging.INFO if status == "SUCCEEDED" else logging.WARNING,
                "handler finished %s outcome=%s reason=%s duration=%.1fs status=%s", job.where,
                last.result.outcome if last else "none", details.get("reason", ""),
                last.result.duration if last else 0.0, status)
        step = (last.index, last.state, last.verdict.reason) if last else None
        await self._conclude(job.key, job.reporter, status, details, step=step)
        self._done(job)

    async def _conclude(self, key: ExecutionKey, reporter: Reporter, status: str,
                        details: dict[str, str], *,
                        step: tuple[int, str, str] | None = None) -> None:
        """Commit the verdict with the update that reports it, then deliver it."""
        self._on_outcome(key, status, details)
        try:
            await self.journal.finish(key, status, details, step=step)
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
            if reporter.gone.is_set() and not self._stopping:
                self.wake("gone")  # a new execution under the same key may be waiting for it
        if not delivered and not reporter.gone.is_set():
            log.warning("status still owed job_id=%s execution=%d; kept in the outbox for the "
                        "next start", *key)
        return delivered

    def _done(self, job: RunningJob) -> None:
        self.running.pop(job.key, None)
        self._ended.pop(job.key, None)
        self._ended[job.key] = job.queued_at
        if len(self._ended) > _ENDED_KEPT:
            del self._ended[next(iter(self._ended))]
        self._finished_since_prune += 1
        if self._finished_since_prune >= max(1, self.config.max_records // 10):
            # A burst: prune now, not at the next sync (jobs claimed from notify-next may run
            # for hours without one; issue 12 found the journal at 233 rows for 100).
            self._spawn(self._maybe_prune())
        self._on_change()
        if not self._stopping and self._deferred and job.reporter.gone.is_set():
            # A slot freed without our final update: the cloud ended the job (its end changed
            # the pending list before the handler stopped), and a QUEUED execution waits for
            # the slot. After our own final update, the notifications it causes say what
            # comes next (a sync on each end would cost a request per job).
            self.wake("slot-freed")

    async def _forget_safely(self, key: ExecutionKey) -> None:
        with contextlib.suppress(JournalError):
            await self.journal.done(key)

    # ------------------------------------------------------------------ reboot

    async def _hand_over(self, job: RunningJob, state: str, step: str) -> bool:
        """Journal that the job waits for a reboot or a restart of the agent, and make sure
        the cloud heard "IN_PROGRESS <step>" first. False if the cloud ended the job."""
        details = {"step": step, "handler": job.plan.steps[job.step].name}
        await self.journal.finish(job.key, "IN_PROGRESS", details, state=state)
        self.running.pop(job.key, None)
        # Busy until the reboot happens or fails and is reported: a sync meanwhile must not
        # take the journal's record for one of another execution under the same key.
        self.delivering[job.key] = job.reporter
        try:
            while not await job.reporter.deliver():  # retries until accepted or gone
                if job.reporter.gone.is_set():
                    log.warning("job ended in the cloud before the %s %s; not doing it",
                                step, job.where)
                    self.delivering.pop(job.key, None)
                    return False
        except BaseException:
            self.delivering.pop(job.key, None)
            raise
        return True  # still "delivering" until the caller has rebooted or restarted

    async def _reboot(self, job: RunningJob) -> None:
        """The handler asked for a reboot: say so, make sure the cloud heard it, then reboot."""
        log.info("handler asked for a reboot %s; reporting 'rebooting' first", job.where)
        if not await self._hand_over(job, "rebooting", "rebooting"):
            return
        try:
            outcome = await self.machine.reboot()
            reason = outcome or (f"the device did not reboot within "
                                 f"{self.config.reboot_timeout:.0f}s of the reboot command")
            log.error("reboot failed %s reason=%s", job.where, reason)
            await self._conclude(job.key, job.reporter, "FAILED", {"reason": reason})
        finally:
            self.delivering.pop(job.key, None)
        self._on_change()

    async def _restart(self, job: RunningJob) -> None:
        """The step asked for the agent itself to be restarted (restart-services.sh naming
        this agent's service): journal it, make sure the cloud heard it, then restart. The new
        agent finds the job "restarting" and goes on with the next step: never a loop."""
        log.info("step asked for the agent to restart %s; reporting it first", job.where)
        if self._on_restart is None:
            await self._conclude(job.key, job.reporter, "FAILED", {
                "reason": "the agent cannot restart itself here"})
            self._done(job)
            return
        if await self._hand_over(job, "restarting", "restarting the agent"):
            log.warning("restarting the agent as %s asked", job.where)
            self._on_restart()
        self._on_change()

    # ------------------------------------------------------------------ recovery

    async def _recover(self) -> None:
        """Finish what a previous run of the agent started (crash, kill -9, reboot)."""
        for record in await self.journal.open_records():
            if record.key in self.running:
                continue
            cloud = await self._cloud_status(record.key, record)
            plan = self._plan_of(record)
            steps = await self.journal.steps(record.key)
            action = plan_recovery(record, cloud, self.config, self.machine, plan,
                                   steps[-1] if steps else None)
            log.info("recovering job_id=%s execution=%d state=%s cloud=%s cloud_version=%s "
                     "action=%s step=%d", record.job_id, record.execution_number, record.state,
                     cloud[0], cloud[1], action.kind, action.step + 1)
            await self._apply(record, action, plan)

    async def _cloud_status(self, key: ExecutionKey,
                            record: Record | None = None) -> tuple[str, int | None]:
        """The cloud's status and version of ``key``; :data:`claims.REPLACED` when the cloud's
        execution is not ``record``'s (deleted, and its key reused)."""
        try:
            described = await self.jobs.describe_job_execution(
                jobId=key[0], thingName=self.thing, executionNumber=key[1],
                includeJobDocument=False)
        except (ResourceNotFoundException, TerminalStateException) as exc:
            return (exc.code, None)
        execution = described.get("execution") or {}
        version = execution.get("versionNumber")
        if record is not None and execution and not claims.same_execution(
                record, execution.get("queuedAt"), version):
            return (claims.REPLACED, None)
        return (execution.get("status", "ResourceNotFound"), version)

    async def _apply(self, record: Record, action: Any, plan: Plan | str) -> None:
        key = record.key
        if action.kill_pid is not None:
            await self.machine.kill_group(action.kill_pid, self.config.kill_grace)
        if action.kind == "forget":
            await self.journal.forget(key)
        elif action.kind == "done":
            await self.journal.done(key)
        elif action.kind in ("run", "verify"):
            assert not isinstance(plan, str)  # plan_recovery reports those FAILED
            if action.completed is not None:  # the reboot or restart it asked for happened
                await self.journal.step_ended(key, action.completed, "succeeded",
                                              "done, as the step asked: " + record.state)
            self._launch(key, plan, action.version, record.step_minutes, start=action.step,
                         phase=action.kind, queued_at=record.queued_at)
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
        """A job we run is missing from the pending list: confirm, then stop its handler.

        Only while the handler runs: once it has ended, our own final update takes the
        execution off the list, and the reporter's exchange with the service (accepted,
        already applied, or refused because the cloud ended it) is what decides."""
        job = self.running.get(key)
        if job is None or job.concluding or job.reporter.gone.is_set():
            return
        status, _ = await self._cloud_status(key)
        if status != "IN_PROGRESS" and key in self.running and not job.concluding:
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
            self.wake("conflict")  # it changed meanwhile: decide again from a fresh list
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
        for record in pruned:
            self.machine.remove_job_files(self._log_path(record.stem),
                                          self._work_dir(record.stem))
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


def summary_key(summary: dict[str, Any]) -> ExecutionKey:
    return (summary["jobId"], summary["executionNumber"])
