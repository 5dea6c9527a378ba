"""The Jobs emulator's records: jobs, executions and their wire forms. No I/O.

Split from :mod:`agent.sandbox.service` so the state machine reads as rules over these records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from agent.sandbox.document import Document

__all__ = ["MAX_PENDING_LISTED", "PENDING", "Execution", "Fault", "Job", "Message", "Publish",
           "mqtt_execution"]

PENDING: Final = frozenset({"QUEUED", "IN_PROGRESS"})
"""Statuses that keep an execution in a device's pending list; every other status is terminal."""

MAX_PENDING_LISTED: Final = 10
"""GetPendingJobExecutions and the ``notify`` payload list at most 10 executions."""

@dataclass(frozen=True)
class Publish:
    """One MQTT message the service wants sent; the front ``json.dumps`` the payload."""

    topic: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class Message:
    """One MQTT message the Commands service wants sent: raw payload bytes (a command's payload
    is opaque) and the MQTT 5 properties the front sets."""

    topic: str
    payload: bytes
    content_type: str | None = None
    message_expiry: int | None = None


@dataclass
class Job:
    job_id: str
    targets: list[str]
    document: Document
    created_at: int
    last_updated_at: int
    timeout_minutes: int | None = None
    description: str | None = None
    status: str = "IN_PROGRESS"
    completed_at: int | None = None
    comment: str | None = None
    reason_code: str | None = None
    force_canceled: bool | None = None
    deleted_at: float | None = None
    """When a DELETION_IN_PROGRESS job is gone for good (and its id free again)."""
    # Created from an AWS managed template: its ARN, the parameters given and the document
    # before substitution (GetJobDocument's beforeSubstitution).
    template_arn: str | None = None
    document_parameters: dict[str, str] | None = None
    template_document: dict[str, Any] | None = None


@dataclass
class Execution:
    job: Job
    thing_name: str
    execution_number: int
    seq: int  # creation order, breaks ties between executions queued in the same second
    queued_at: int
    last_updated_at: int
    status: str = "QUEUED"
    status_details: dict[str, str] = field(default_factory=dict)
    version_number: int = 1
    started_at: int | None = None
    step_deadline: int | None = None

    def summary(self) -> dict[str, Any]:
        """JobExecutionSummary; ``startedAt`` is absent (never None) until the execution starts."""
        out: dict[str, Any] = {"jobId": self.job.job_id, "queuedAt": self.queued_at}
        if self.started_at is not None:
            out["startedAt"] = self.started_at
        out.update(
            lastUpdatedAt=self.last_updated_at,
            versionNumber=self.version_number,
            executionNumber=self.execution_number,
        )
        return out

    def record(self, include_document: bool = True) -> dict[str, Any]:
        """The whole execution, for the control plane and the Python API: ``thingName`` and
        ``statusDetails`` (``{}`` when none) always there."""
        out = self.summary()
        out.update(
            thingName=self.thing_name, status=self.status, statusDetails=dict(self.status_details)
        )
        if include_document:
            out["jobDocument"] = self.job.document
        return out

    def device(self, include_document: bool = True) -> dict[str, Any]:
        """JobExecution as the device APIs answer it (no ``approximateSecondsBeforeTimedOut``):
        no ``statusDetails`` when there are none, as AWS's captures show. Over MQTT
        :func:`mqtt_execution` also drops ``thingName``; the HTTP data plane keeps it."""
        out = self.record(include_document)
        if not self.status_details:
            del out["statusDetails"]
        return out

    def state(self) -> dict[str, Any]:
        """JobExecutionState; also the ``executionState`` a VersionMismatch or
        InvalidStateTransition rejection carries."""
        return {
            "status": self.status,
            "statusDetails": dict(self.status_details),
            "versionNumber": self.version_number,
        }

    def deadline(self) -> int | None:
        """When this execution times out: the earlier of its step timer and the job's
        inProgressTimeoutInMinutes counted from ``startedAt``; None when neither applies."""
        if self.status != "IN_PROGRESS":
            return None
        times = [] if self.step_deadline is None else [self.step_deadline]
        if self.job.timeout_minutes is not None and self.started_at is not None:
            times.append(self.started_at + self.job.timeout_minutes * 60)
        return min(times, default=None)

    def set_step_timer(self, minutes: int | None, now: int) -> None:
        """A given step timeout (re)starts the timer of an IN_PROGRESS execution; -1 stops it."""
        if minutes is not None and self.status == "IN_PROGRESS":
            self.step_deadline = None if minutes == -1 else now + minutes * 60

    def transition(self, status: str, now: int) -> None:
        """Every status change bumps versionNumber; leaving IN_PROGRESS ends the step timer."""
        if status == "IN_PROGRESS" and self.started_at is None:
            self.started_at = now
        if status not in PENDING:
            self.step_deadline = None
        self.status = status
        self.version_number += 1
        self.last_updated_at = now


def mqtt_execution(execution: dict[str, Any]) -> dict[str, Any]:
    """An execution as MQTT carries it: without ``thingName`` (the topic names the thing), as
    the captures in AWS's SDK walkthroughs show for start-next, describe and notify-next."""
    return {key: value for key, value in execution.items() if key != "thingName"}


@dataclass
class Fault:
    code: str
    remaining: int
    operations: frozenset[str]
