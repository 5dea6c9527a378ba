"""The agent's job lifecycle decisions, as plain code with no I/O.

The dispatcher asks these functions what to do and does it; keeping the decisions here means they
can be tested exhaustively without a broker: what a job document asks for, how long the cloud
should wait before timing a silent device out, and what a ``VersionMismatch`` means.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass
from typing import Any

from agent.config import HandlerConfig
from agent.jobs.shapes import TERMINAL_STATUSES

__all__ = [
    "MAX_STEP_MINUTES",
    "Conflict",
    "DocumentError",
    "ExecutionKey",
    "Work",
    "parse_document",
    "resolve_conflict",
    "step_timeout_minutes",
]

ExecutionKey = tuple[str, int]  # (jobId, executionNumber): what "the same job" means

MAX_ARGS = 256
MAX_ARG_LENGTH = 4096
# A dead device is noticed by the cloud within this many minutes, however long its handler may
# run: longer handlers re-arm the step timer while they run (heartbeat every half of it).
MAX_STEP_MINUTES = 15


class DocumentError(ValueError):
    """The job document cannot be run; the message is the REJECTED reason shown to operators."""


@dataclass(frozen=True)
class Work:
    """What a valid job document asks for."""

    operation: str
    handler: HandlerConfig
    args: tuple[str, ...]
    document: dict[str, Any]

    @property
    def argv(self) -> list[str]:
        return [*self.handler.command, *self.args]


def parse_document(text: str | None, handlers: dict[str, HandlerConfig]) -> Work:
    """``{"operation": "<handler>", "args": ["..."]}`` -> :class:`Work`, or :class:`DocumentError`.

    Only handlers declared in the config can be named; ``args`` are handed to the program as
    separate argv entries (never a shell), so they only need to be strings without NUL bytes.
    Other keys are allowed and reach the handler with the rest of the document.
    """
    if text is None:
        raise DocumentError("the job has no document")
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
        raise DocumentError("the job document is not valid JSON") from None
    if not isinstance(document, dict):
        raise DocumentError("the job document must be a JSON object like "
                            '{"operation": "<handler>", "args": []}')
    operation = document.get("operation")
    if not isinstance(operation, str) or not operation:
        raise DocumentError('the job document has no "operation" naming a handler')
    handler = handlers.get(operation)
    if handler is None:
        known = ", ".join(sorted(handlers)) or "none"
        raise DocumentError(f"no handler for operation {operation[:64]!r} on this device "
                            f"(configured: {known[:600]})")
    args = document.get("args", [])
    if not isinstance(args, list):
        raise DocumentError('"args" must be a list of strings')
    if len(args) > MAX_ARGS:
        raise DocumentError(f'"args" has {len(args)} items; at most {MAX_ARGS} are allowed')
    for i, arg in enumerate(args):
        if not isinstance(arg, str):
            raise DocumentError(f'"args"[{i}] must be a string, got {type(arg).__name__}')
        if "\0" in arg or len(arg) > MAX_ARG_LENGTH:
            raise DocumentError(f'"args"[{i}] has a NUL byte or is over {MAX_ARG_LENGTH} chars')
    return Work(operation, handler, tuple(args), document)


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
