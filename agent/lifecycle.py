"""The agent's job lifecycle decisions, as plain code with no I/O.

The dispatcher asks these functions what to do and does it; keeping the decisions here means they
can be tested exhaustively without a broker: how long the cloud should wait before timing a
silent device out, and what a ``VersionMismatch`` means. What a job document asks for is
:mod:`agent.documents`' decision.
"""

from __future__ import annotations

import enum
import math
from typing import Any

from agent.jobs.shapes import TERMINAL_STATUSES

__all__ = [
    "MAX_STEP_MINUTES",
    "Conflict",
    "ExecutionKey",
    "resolve_conflict",
    "step_timeout_minutes",
]

ExecutionKey = tuple[str, int]  # (jobId, executionNumber): what "the same job" means

# A dead device is noticed by the cloud within this many minutes, however long its handler may
# run: longer handlers re-arm the step timer while they run (heartbeat every half of it).
MAX_STEP_MINUTES = 15


def step_timeout_minutes(handler_timeout: float) -> int:
    """The ``stepTimeoutInMinutes`` to claim a job with.

    The handler's timeout plus a minute for reporting, capped at :data:`MAX_STEP_MINUTES` so a
    device that dies mid-job shows up TIMED_OUT in minutes rather than hours.
    """
    return max(1, min(math.ceil(handler_timeout / 60) + 1, MAX_STEP_MINUTES))


class Conflict(enum.Enum):
    """What a ``VersionMismatch`` on our own update means."""

    ALREADY_APPLIED = "already-applied"  # an earlier, timed-out attempt of ours went through
    RETRY = "retry"  # still ours and IN_PROGRESS: re-send with the current version
    GONE = "gone"  # the cloud ended it (canceled, timed out, removed): stop, send nothing


def resolve_conflict(desired_status: str, desired_details: dict[str, str] | None,
                     state: dict[str, Any] | None) -> Conflict:
    """Decide from the ``executionState`` a VersionMismatch carries, never by blind retry.

    Only this agent moves its IN_PROGRESS execution, so a newer version is either our own
    update that we did not hear back about, or the service ending the execution.
    """
    if not state:
        return Conflict.GONE
    status = state.get("status")
    if status == desired_status and (desired_details is None
                                     or state.get("statusDetails") == desired_details):
        return Conflict.ALREADY_APPLIED
    if status in TERMINAL_STATUSES or status == "QUEUED":
        # A terminal status we did not ask for; or QUEUED again, i.e. a new run by retry config.
        return Conflict.GONE
    return Conflict.RETRY
