"""An I/O-free emulation of the AWS IoT Jobs service: the state machine behind every sandbox front.

Three faces over one state, so that the MQTT emulator, a later HTTP data plane and plain unit tests
all see exactly the same behaviour:

* a **control plane** (``create_job``, ``cancel_job``...) standing in for the ``iot`` API;
* a **device plane** (``get_pending``, ``start_next``, ``describe_execution``,
  ``update_execution``) returning response dicts without ``timestamp``/``clientToken``, which
  each front adds in its own way (HTTP responses carry neither);
* an **MQTT adaptor**, :meth:`JobsService.handle` (in :mod:`agent.sandbox.mqtt_adaptor`),
  mapping one publish on ``$aws/things/<thing>/jobs/…`` to the publishes to send back.

Nothing here touches a socket, a thread or the wall clock: time comes from an injected ``clock``
and timers only fire in :meth:`JobsService.tick`, which the front calls at
:meth:`JobsService.next_deadline` (AWS itself may time an execution out up to 60 s late, so a
device racing its own deadline is not something an agent may rely on either way).

Notifications are derived, not hand-placed: every mutation snapshots the pending list of each thing
it touches, mutates, and compares. ``notify`` goes out when the *set* of pending executions changed,
``notify-next`` when the *head* changed (``jobs-mqtt-api.md`` section 1.5). Deriving them makes the
rules hold for every path, including ones added later.

Decisions where AWS is silent or ambiguous (each documented at its method):

* Device requests for a thing that was never created are ``ResourceNotFound``: a real device can
  only connect as a registered thing, so such a request is a test bug worth surfacing.
* A given ``statusDetails`` *replaces* the stored map; an omitted one leaves it unchanged.
* ``TerminalStateReached`` is never produced by the state machine, only by fault injection.
* Over MQTT, unknown request fields and explicit ``null`` values are ``InvalidRequest``
  (``_validate.request_kwargs``): the SDK never sends them, so they reveal a client bug.
* Executions remain after they end (as in AWS) until deleted. A job's executions are number 1
  (the sandbox has no retries), also for a job re-created under a deleted job's id: AWS says a
  deleted execution's number "may be reused", so a device must not take (jobId, executionNumber)
  for an identity.
* Deleting a job takes :data:`DELETION_SECONDS`: its executions go at once (devices get their
  notifications), the job stays ``DELETION_IN_PROGRESS`` until :meth:`JobsService.tick`, and
  only then may its id be used again.
* Over MQTT an execution carries no ``thingName`` and no empty ``statusDetails``
  (:func:`~agent.sandbox.records.mqtt_execution`); the HTTP data plane keeps ``thingName``.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Iterable
from typing import Any, Final, TypeVar, cast

from agent.sandbox import _validate as check
from agent.sandbox import mqtt_adaptor
from agent.sandbox._validate import OPERATIONS, Rejection
from agent.sandbox.document import Document
from agent.sandbox.records import (
    MAX_PENDING_LISTED,
    PENDING,
    Execution,
    Fault,
    Job,
    Publish,
    mqtt_execution,
)

__all__ = ["DELETION_SECONDS", "JobsService", "Publish", "Rejection"]

DELETION_SECONDS: Final = 3.0
"""How long a deleted job stays DELETION_IN_PROGRESS, in seconds (AWS: seconds to minutes)."""

_NOT_INJECTABLE: Final = frozenset({"VersionMismatch", "InvalidStateTransition"})
"""Injected faults carry no executionState, so codes that promise one cannot be injected."""

_COUNTERS: Final = {
    "QUEUED": "numberOfQueuedThings",
    "IN_PROGRESS": "numberOfInProgressThings",
    "SUCCEEDED": "numberOfSucceededThings",
    "FAILED": "numberOfFailedThings",
    "REJECTED": "numberOfRejectedThings",
    "TIMED_OUT": "numberOfTimedOutThings",
    "REMOVED": "numberOfRemovedThings",
    "CANCELED": "numberOfCanceledThings",
}


_T = TypeVar("_T")
_Method = TypeVar("_Method", bound=Callable[..., Any])


def _device_request(operation: str) -> Callable[[_Method], _Method]:
    """Make a method a device request named ``operation``: fault injection, then history.

    A decorator rather than a call inside each method so that the method body is the operation
    itself, and ``handle`` can call the same public method the HTTP data plane calls.
    """

    def decorate(method: _Method) -> _Method:
        @functools.wraps(method)
        def request(self: JobsService, thing_name: str, *args: Any, **kwargs: Any) -> Any:
            return self.serve(
                thing_name, operation, lambda: method(self, thing_name, *args, **kwargs)
            )

        return cast(_Method, request)

    return decorate


class JobsService:
    """The IoT Jobs service for one sandbox account. Not thread-safe: the front serialises calls.

    Args:
        clock: Returns epoch seconds; every timestamp is ``int(clock())`` because the SDK parses
            them with ``datetime.fromtimestamp`` and milliseconds would overflow it.
    """

    def __init__(self, clock: Callable[[], float] = time.time, *,
                 deletion_seconds: float = DELETION_SECONDS) -> None:
        self._clock = clock
        self._deletion_seconds = deletion_seconds
        self._things: dict[str, dict[str, Execution]] = {}  # thing -> job id -> execution
        self._jobs: dict[str, Job] = {}
        self._seq = 0
        self._faults: list[Fault] = []
        self._history: list[tuple[str, str, dict[str, Any]]] = []
        self._serving = False  # inside a device request (see serve)

    # ---------------------------------------------------------------- control plane

    def create_thing(self, thing_name: str) -> None:
        """Register a thing (idempotent), so jobs may target it and it may use the device API."""
        self._things.setdefault(check.thing_name(thing_name), {})

    def things(self) -> list[str]:
        """Every registered thing name, sorted."""
        return sorted(self._things)

    def create_job(
        self,
        job_id: str,
        targets: list[str],
        document: dict[str, Any] | Document,
        *,
        in_progress_timeout_minutes: int | None = None,
        description: str | None = None,
        template: tuple[str, dict[str, str], dict[str, Any]] | None = None,
    ) -> list[Publish]:
        """Create a snapshot job with one QUEUED execution per target thing (duplicates collapse).

        ``template``: the managed template's ARN, the documentParameters given and the document
        before they were substituted into ``document`` (the control plane substitutes them).

        Raises:
            Rejection: ``InvalidRequest`` for a malformed argument, ``ResourceNotFound`` for an
                unknown target, ``ResourceAlreadyExists`` (boto3's CreateJob error) for a job id
                in use, also by a job still being deleted.
        """
        check.job_id(job_id)
        if not isinstance(targets, list) or not targets:
            raise Rejection("InvalidRequest", "targets must be a non-empty list of thing names")
        things = list(dict.fromkeys(check.thing_name(t) for t in targets))
        document = Document.from_value(document)
        timeout = check.timeout_minutes(in_progress_timeout_minutes)
        description = check.text(description, "description", 2028)
        for thing in things:
            self._thing(thing)
        if job_id in self._jobs:
            deleting = self._jobs[job_id].status == "DELETION_IN_PROGRESS"
            raise Rejection("ResourceAlreadyExists", f"job {job_id} already exists" + (
                " (DELETION_IN_PROGRESS: its id is free once the deletion completes)"
                if deleting else ""))
        now = self._now()
        job = Job(job_id, things, document, now, now, timeout, description)
        if template is not None:
            job.template_arn, job.document_parameters, job.template_document = template
        before = self._snapshot(things)
        self._jobs[job_id] = job
        for thing in things:
            self._seq += 1
            self._things[thing][job_id] = Execution(job, thing, 1, self._seq, now, now)
        return self._notifications(before)

    def cancel_job(
        self,
        job_id: str,
        *,
        force: bool = False,
        comment: str | None = None,
        reason_code: str | None = None,
    ) -> list[Publish]:
        """Cancel a job: QUEUED executions become CANCELED, IN_PROGRESS ones only with ``force``
        (without it they run on and may still report). Cancelling again, e.g. with force, is
        allowed; a COMPLETED job cannot be cancelled (``InvalidStateTransition``)."""
        job = self._job(job_id)
        check.boolean(force, "force")
        comment = check.comment(comment)
        reason_code = check.reason_code(reason_code)
        if job.status in ("COMPLETED", "DELETION_IN_PROGRESS"):
            raise Rejection("InvalidStateTransition", f"job {job_id} is {job.status}")
        now = self._now()
        before = self._snapshot(job.targets)
        for execution in self._executions_of(job):
            if execution.status == "QUEUED" or (force and execution.status == "IN_PROGRESS"):
                execution.transition("CANCELED", now)
        job.status, job.last_updated_at = "CANCELED", now
        job.force_canceled = bool(job.force_canceled) or force
        job.comment = comment if comment is not None else job.comment
        job.reason_code = reason_code if reason_code is not None else job.reason_code
        return self._notifications(before)

    def delete_job(self, job_id: str, *, force: bool = False) -> list[Publish]:
        """Delete a job, as DeleteJob does: without ``force`` only a COMPLETED or CANCELED one
        (``InvalidStateTransition``, the model's error, for any other, and for a job already
        being deleted). Its executions go at once; the job itself stays DELETION_IN_PROGRESS
        for :data:`DELETION_SECONDS`, then :meth:`tick` removes it and frees its id.
        """
        job = self._job(job_id)
        check.boolean(force, "force")
        if job.status == "DELETION_IN_PROGRESS":
            raise Rejection("InvalidStateTransition", f"job {job_id} is already being deleted")
        if job.status not in ("COMPLETED", "CANCELED") and not force:
            raise Rejection("InvalidStateTransition", f"job {job_id} is {job.status}; only a "
                            "COMPLETED or CANCELED job can be deleted without force")
        before = self._snapshot(job.targets)
        for thing in job.targets:
            self._things[thing].pop(job_id, None)
        job.status, job.last_updated_at = "DELETION_IN_PROGRESS", self._now()
        job.deleted_at = self._clock() + self._deletion_seconds
        return self._notifications(before)

    def cancel_job_execution(
        self,
        job_id: str,
        thing_name: str,
        *,
        force: bool = False,
        expected_version: int | None = None,
        status_details: dict[str, str] | None = None,
    ) -> list[Publish]:
        """Cancel one thing's latest execution, as CancelJobExecution does.

        Raises:
            Rejection: ``ResourceNotFound``; ``VersionConflict`` when ``expected_version`` is not
                the stored version (checked first, as for device updates);
                ``InvalidStateTransition`` for a terminal execution, or an IN_PROGRESS one
                without ``force``; ``InvalidRequest`` for bad arguments (at most 10
                statusDetails, which replace the stored map when given).
        """
        execution = self._execution(job_id, thing_name)
        check.boolean(force, "force")
        expected_version = check.integer(expected_version, "expectedVersion")
        details = check.status_details(status_details, max_pairs=10)
        if expected_version is not None and expected_version != execution.version_number:
            raise Rejection(
                "VersionConflict",
                f"expected version {expected_version}, execution is at {execution.version_number}",
            )
        if execution.status not in PENDING or (execution.status == "IN_PROGRESS" and not force):
            raise Rejection(
                "InvalidStateTransition",
                f"cannot cancel a {execution.status} execution"
                + (" without force" if execution.status == "IN_PROGRESS" else ""),
            )
        before = self._snapshot([execution.thing_name])
        if details is not None:
            execution.status_details = details
        execution.transition("CANCELED", self._now())
        self._settle(execution.job)
        return self._notifications(before)

    def delete_job_execution(
        self, job_id: str, thing_name: str, execution_number: int, *, force: bool = False
    ) -> list[Publish]:
        """Delete one execution. As in AWS, only a terminal one unless ``force``
        (``InvalidStateTransition``); the job completes if nothing of it is left pending."""
        execution = self._execution(job_id, thing_name, execution_number, required_number=True)
        check.boolean(force, "force")
        if execution.status in PENDING and not force:
            raise Rejection(
                "InvalidStateTransition",
                f"cannot delete a {execution.status} execution without force",
            )
        before = self._snapshot([execution.thing_name])
        del self._things[execution.thing_name][job_id]
        self._settle(execution.job)
        return self._notifications(before)

    def describe_job(self, job_id: str) -> dict[str, Any]:
        """DescribeJob's ``job``, with thing names (not ARNs) as targets and the document inline."""
        job = self._job(job_id)
        counts = dict.fromkeys(_COUNTERS.values(), 0)
        for execution in self._executions_of(job):
            counts[_COUNTERS[execution.status]] += 1
        out = self._job_summary(job)
        out.update(targets=list(job.targets), document=job.document, jobProcessDetails=counts)
        optional = {
            "timeoutConfig": None
            if job.timeout_minutes is None
            else {"inProgressTimeoutInMinutes": job.timeout_minutes},
            "description": job.description,
            "comment": job.comment,
            "reasonCode": job.reason_code,
            "forceCanceled": job.force_canceled,
            "jobTemplateArn": job.template_arn,
            "documentParameters": job.document_parameters,
        }
        out.update((key, value) for key, value in optional.items() if value is not None)
        return out

    def get_job_document(self, job_id: str, *, before_substitution: bool = False) -> Document:
        """The job document itself, not boto3's ``{"document": <string>}`` wrapper; for a job
        from a managed template, with its placeholders if ``before_substitution``."""
        job = self._job(job_id)
        if before_substitution and job.template_document is not None:
            return Document.from_value(job.template_document)
        return job.document

    def list_jobs(self) -> list[dict[str, Any]]:
        """ListJobs' summaries, in creation order."""
        return [self._job_summary(job) for job in self._jobs.values()]

    def execution(
        self, job_id: str, thing_name: str, execution_number: int | None = None
    ) -> dict[str, Any]:
        """The full execution record (with jobDocument): the latest one when no number is given."""
        return self._execution(job_id, thing_name, execution_number).record()

    def executions_for_thing(self, thing_name: str) -> list[dict[str, Any]]:
        """Every execution (pending or ended) of a thing, in queueing order."""
        executions = sorted(self._thing(thing_name).values(), key=lambda e: e.seq)
        return [e.record() for e in executions]

    def executions_for_job(self, job_id: str) -> list[dict[str, Any]]:
        """Every execution of a job, in target order."""
        return [e.record() for e in self._executions_of(self._job(job_id))]

    # ---------------------------------------------------------------- device plane

    @_device_request("get")
    def get_pending(self, thing_name: str) -> dict[str, Any]:
        """GetPendingJobExecutions: at most 10 summaries, IN_PROGRESS first, then by queueing."""
        listed = self._pending(self._thing(thing_name))[:MAX_PENDING_LISTED]
        return {
            "inProgressJobs": [e.summary() for e in listed if e.status == "IN_PROGRESS"],
            "queuedJobs": [e.summary() for e in listed if e.status == "QUEUED"],
        }

    @_device_request("start-next")
    def start_next(
        self,
        thing_name: str,
        *,
        status_details: dict[str, str] | None = None,
        step_timeout_minutes: int | None = None,
    ) -> tuple[dict[str, Any], list[Publish]]:
        """StartNextPendingJobExecution: ``{"execution": …}``, or ``{}`` when nothing is pending.

        A QUEUED head starts with the given statusDetails. An IN_PROGRESS head is returned as it
        is (statusDetails and version kept), but a given step timeout still (re)starts its timer.
        """
        details = check.status_details(status_details)
        step = check.step_timeout(step_timeout_minutes, cancel=False)
        pending = self._pending(self._thing(thing_name))
        if not pending:
            return {}, []
        head, now = pending[0], self._now()
        before = self._snapshot([thing_name])
        if head.status == "QUEUED":
            if details is not None:
                head.status_details = details
            head.transition("IN_PROGRESS", now)
        head.set_step_timer(step, now)
        return {"execution": head.device()}, self._notifications(before)

    @_device_request("describe")
    def describe_execution(
        self,
        thing_name: str,
        job_id: str,
        *,
        execution_number: int | None = None,
        include_job_document: bool = True,
    ) -> dict[str, Any]:
        """DescribeJobExecution; ``job_id`` may be ``$next`` (``{}`` when nothing is pending).

        A terminal execution is described normally, although the code list has
        ``TerminalStateReached`` ("describe … on a job in a terminal state"): describing is how
        a device learns an outcome it missed (say, TIMED_OUT while offline), and writes to a
        terminal execution are already ``InvalidStateTransition``. So that code only ever comes
        from fault injection.
        With ``$next`` an ``execution_number`` is type-checked but otherwise ignored.
        """
        number = check.integer(execution_number, "executionNumber")
        include_document = check.boolean(include_job_document, "includeJobDocument")
        executions = self._thing(thing_name)
        if job_id == "$next":
            pending = self._pending(executions)
            return {"execution": pending[0].device(include_document)} if pending else {}
        execution = self._execution(job_id, thing_name, number)
        return {"execution": execution.device(include_document)}

    @_device_request("update")
    def update_execution(
        self,
        thing_name: str,
        job_id: str,
        *,
        status: str,
        status_details: dict[str, str] | None = None,
        expected_version: int | None = None,
        execution_number: int | None = None,
        include_job_execution_state: bool = False,
        include_job_document: bool = False,
        step_timeout_minutes: int | None = None,
    ) -> tuple[dict[str, Any], list[Publish]]:
        """UpdateJobExecution, checked in this order: the request's fields (``InvalidRequest``),
        the execution (``ResourceNotFound``, also when ``execution_number`` is not the latest),
        ``expected_version`` (``VersionMismatch``), then the transition (terminal ->
        ``InvalidStateTransition``); the last two carry ``executionState``."""
        new_status = check.device_status(status)
        details = check.status_details(status_details)
        expected = check.lenient_integer(expected_version, "expectedVersion")
        number = check.integer(execution_number, "executionNumber")
        want_state = check.boolean(include_job_execution_state, "includeJobExecutionState")
        want_document = check.boolean(include_job_document, "includeJobDocument")
        step = check.step_timeout(step_timeout_minutes)
        execution = self._execution(job_id, thing_name, number)
        if expected is not None and expected != execution.version_number:
            raise Rejection(
                "VersionMismatch",
                f"expectedVersion {expected} is not the current {execution.version_number}",
                execution.state(),
            )
        if execution.status not in PENDING:
            raise Rejection(
                "InvalidStateTransition",
                f"execution is {execution.status}, a terminal state; cannot set {new_status}",
                execution.state(),
            )
        now = self._now()
        before = self._snapshot([execution.thing_name])
        if details is not None:
            execution.status_details = details
        execution.transition(new_status, now)
        execution.set_step_timer(step, now)
        self._settle(execution.job)
        response: dict[str, Any] = {}
        if want_state:
            response["executionState"] = execution.state()
        if want_document:
            response["jobDocument"] = execution.job.document
        return response, self._notifications(before)

    # ---------------------------------------------------------------- MQTT adaptor

    def handle(self, topic: str, payload: bytes) -> list[Publish]:
        """Answer one device publish (:func:`agent.sandbox.mqtt_adaptor.handle`)."""
        return mqtt_adaptor.handle(self, topic, payload)

    # ---------------------------------------------------------------- timers and faults

    def tick(self) -> list[Publish]:
        """Time out every IN_PROGRESS execution whose step timer or job timeout has expired,
        and finish the deletions that are due."""
        moment = self._clock()
        for job in [j for j in self._jobs.values() if j.deleted_at is not None]:
            if job.deleted_at is not None and job.deleted_at <= moment:
                del self._jobs[job.job_id]
        expired = [
            e
            for executions in self._things.values()
            for e in executions.values()
            if (deadline := e.deadline()) is not None and deadline <= moment
        ]
        before = self._snapshot(dict.fromkeys(e.thing_name for e in expired))
        now = int(moment)
        for execution in expired:
            execution.transition("TIMED_OUT", now)
            self._settle(execution.job)
        return self._notifications(before)

    def next_deadline(self) -> float | None:
        """The earliest epoch second at which :meth:`tick` would change something."""
        deadlines = [
            deadline
            for executions in self._things.values()
            for e in executions.values()
            if (deadline := e.deadline()) is not None
        ]
        deadlines += [j.deleted_at for j in self._jobs.values() if j.deleted_at is not None]
        return float(min(deadlines)) if deadlines else None

    def inject_rejections(self, code: str, count: int, operations: set[str] | None = None) -> None:
        """Reject the next ``count`` device requests of ``operations`` (None = all) with ``code``.

        The fault hits after topic routing and JSON parsing (so it can echo the clientToken) and
        before any validation or state change. Faults queue: each request consumes from the first
        one matching its operation. Any code may be injected, including ones AWS may add later
        (clients must cope with those), except ``VersionMismatch`` and ``InvalidStateTransition``,
        whose payload must carry a real executionState.

        Raises:
            ValueError: For an empty or state-carrying code, an unknown operation or a negative
                count (a test bug).
        """
        if not isinstance(code, str) or not code or code in _NOT_INJECTABLE:
            raise ValueError(f"cannot inject {code!r}: codes carrying executionState are refused")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be a non-negative integer, not {count!r}")
        chosen = frozenset(OPERATIONS if operations is None else operations)
        if not chosen <= set(OPERATIONS):
            raise ValueError(f"unknown operations {sorted(chosen - set(OPERATIONS))}")
        if count:
            self._faults.append(Fault(code, count, chosen))

    @property
    def history(self) -> list[tuple[str, str, dict[str, Any]]]:
        """``(thing, operation, response or rejection payload)`` of every device request, oldest
        first, without timestamp/clientToken; an unroutable topic is operation ``unknown``."""
        return list(self._history)

    def refused(self, thing: str, operation: str, payload: dict[str, Any]) -> None:
        """Record a request refused before reaching an operation (unroutable, not JSON)."""
        self._history.append((thing, operation, payload))

    def timestamp(self) -> int:
        """Now, as every payload's ``timestamp``: integer epoch seconds."""
        return int(self._clock())

    # ---------------------------------------------------------------- internals

    def _now(self) -> int:
        return int(self._clock())

    def serve(self, thing: str, operation: str, run: Callable[[], _T]) -> _T:
        """Serve one device request: an injected fault first, then ``run``; record the outcome.

        Only the outermost call is the request: the MQTT adaptor runs a public device method
        inside its own request, so that a fault hits before the payload is even checked.
        """
        if self._serving:
            return run()
        self._serving = True
        try:
            for fault in self._faults:
                if operation in fault.operations:
                    fault.remaining -= 1
                    if not fault.remaining:
                        self._faults.remove(fault)
                    raise Rejection(fault.code, f"injected {fault.code} fault")
            result = run()
        except Rejection as rejection:
            self._history.append((thing, operation, rejection.to_payload()))
            raise
        finally:
            self._serving = False
        response = result[0] if isinstance(result, tuple) else result
        self._history.append((thing, operation, copy.deepcopy(cast(dict[str, Any], response))))
        return result

    def _thing(self, thing_name: str) -> dict[str, Execution]:
        """The executions of an existing thing, by job id (``ResourceNotFound`` if unknown)."""
        executions = self._things.get(check.thing_name(thing_name))
        if executions is None:
            raise Rejection("ResourceNotFound", f"thing {thing_name} does not exist")
        return executions

    def _job(self, job_id: str) -> Job:
        job = self._jobs.get(check.job_id(job_id))
        if job is None:
            raise Rejection("ResourceNotFound", f"job {job_id} does not exist")
        return job

    def _execution(
        self,
        job_id: str,
        thing_name: str,
        number: int | None = None,
        *,
        required_number: bool = False,
    ) -> Execution:
        """The current execution of ``job_id`` on a thing; ``number``, if given, must be its
        executionNumber (older runs no longer exist once deleted)."""
        check.job_id(job_id)
        executions = self._thing(thing_name)
        number = check.integer(number, "executionNumber")
        if number is None and required_number:
            raise Rejection("InvalidRequest", "executionNumber is required")
        execution = executions.get(job_id)
        if execution is None or (number is not None and number != execution.execution_number):
            run = "" if number is None else f" number {number}"
            raise Rejection(
                "ResourceNotFound", f"no execution{run} of job {job_id} on thing {thing_name}"
            )
        return execution

    def _executions_of(self, job: Job) -> list[Execution]:
        return [
            execution
            for thing in job.targets
            if (execution := self._things[thing].get(job.job_id)) is not None
        ]

    def _settle(self, job: Job) -> None:
        """A running job completes once none of its executions is pending any more."""
        if job.status == "IN_PROGRESS" and all(
            e.status not in PENDING for e in self._executions_of(job)
        ):
            job.status = "COMPLETED"
            job.completed_at = job.last_updated_at = self._now()

    @staticmethod
    def _job_summary(job: Job) -> dict[str, Any]:
        out: dict[str, Any] = {
            "jobId": job.job_id,
            "targetSelection": "SNAPSHOT",
            "status": job.status,
            "createdAt": job.created_at,
            "lastUpdatedAt": job.last_updated_at,
        }
        if job.completed_at is not None:
            out["completedAt"] = job.completed_at
        return out

    @staticmethod
    def _pending(executions: dict[str, Execution]) -> list[Execution]:
        """A thing's pending list in service order: IN_PROGRESS first, then by queueing."""
        pending = [e for e in executions.values() if e.status in PENDING]
        return sorted(pending, key=lambda e: (e.status != "IN_PROGRESS", e.seq))

    def _snapshot(self, things: Iterable[str]) -> dict[str, list[Execution]]:
        return {thing: self._pending(self._things[thing]) for thing in things}

    def _notifications(self, before: dict[str, list[Execution]]) -> list[Publish]:
        """notify when a thing's pending *set* changed, notify-next when its *head* changed.

        Compared by identity: a deleted-and-recreated execution is a new object, and a
        QUEUED -> IN_PROGRESS move changes neither the set nor (unless it reorders) the head.
        """
        out: list[Publish] = []
        now = self._now()
        for thing, old in before.items():
            new = self._pending(self._things[thing])
            prefix = f"$aws/things/{thing}/jobs/"
            if {id(e) for e in old} != {id(e) for e in new}:
                listed = new[:MAX_PENDING_LISTED]
                jobs = {
                    status: summaries
                    for status in ("IN_PROGRESS", "QUEUED")
                    if (summaries := [e.summary() for e in listed if e.status == status])
                }
                out.append(Publish(prefix + "notify", {"timestamp": now, "jobs": jobs}))
            if (old[0] if old else None) is not (new[0] if new else None):
                payload: dict[str, Any] = {"timestamp": now}
                if new:
                    payload["execution"] = mqtt_execution(new[0].device())
                out.append(Publish(prefix + "notify-next", payload))
        return out
