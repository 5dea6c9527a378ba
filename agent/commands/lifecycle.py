"""The decisions of a command execution, as plain code with no I/O.

The executor asks, the functions here answer: what a request asks for (a handler to run, or a
rejection with its reasonCode), how long its handler may run, whether it is too late to start,
what a request delivered again gets, and what a restarted agent does with each execution its
journal left open (the same rules as for jobs, see :mod:`agent.recovery`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from agent.commands import shapes
from agent.commands.journal import CommandRecord
from agent.config import Config, HandlerConfig
from agent.documents import DocumentError, native

__all__ = ["Recovery", "Rejected", "Work", "on_repeat", "plan_recovery", "read_request",
           "run_limit", "too_late", "work_of"]

_JSON_TYPES = ("application/json", "text/json")


@dataclass(frozen=True)
class Work:
    """What a command asks for: one YAML handler and its arguments (the native form)."""

    operation: str
    handler: HandlerConfig
    document: dict[str, Any]
    argv: list[str]


def work_of(document: Any, config: Config) -> Work:
    """A command's document, in the native form only (``{"operation", "args"}``): Device
    Client's multi-step documents are for jobs, whose durability they need. The arguments are
    checked by the same parser as a job's (:mod:`agent.documents.native`)."""
    if not isinstance(document, dict):
        raise DocumentError('the command payload must be a JSON object like '
                            '{"operation": "<handler>", "args": []}')
    operation = document.get("operation")
    if not isinstance(operation, str) or not operation:
        raise DocumentError('the command payload has no "operation" naming a handler')
    if operation not in config.handlers:
        known = ", ".join(sorted(config.handlers)) or "none"
        raise DocumentError(f"no handler for operation {operation[:64]!r} on this device "
                            f"(configured: {known[:600]})")
    step = native.parse(document, config).steps[0]
    return Work(operation, config.handlers[operation], document, list(step.argv))


@dataclass(frozen=True)
class Rejected:
    """A request that will not run: the REJECTED update says why."""

    code: str
    description: str

    @property
    def update(self) -> dict[str, Any]:
        return shapes.update("REJECTED", shapes.status_reason(self.code, self.description))


def read_request(payload: bytes, fmt: str, content_type: str | None,
                 config: Config) -> Work | Rejected:
    """What a request's payload asks for: the native document ``{"operation", "args"}``, read
    as a job's would be (:func:`work_of`), so a command runs exactly what the same document would
    run as a job."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if fmt == "cbor" or kind == "application/cbor":
        return Rejected("UNSUPPORTED_FORMAT", "this agent runs JSON documents "
                        '{"operation": "<handler>", "args": [...]}, not CBOR')
    if fmt == "generic" and kind and kind not in _JSON_TYPES:
        return Rejected("UNSUPPORTED_FORMAT", f"content type {kind[:100]!r} is not a JSON "
                        "document; this agent runs {\"operation\": ..., \"args\": [...]}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return Rejected("INVALID_PAYLOAD", "the payload is not UTF-8 JSON")
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
        return Rejected("INVALID_PAYLOAD", "the payload is not valid JSON")
    try:
        return work_of(document, config)
    except DocumentError as exc:
        return Rejected(_rejection_code(document, config), str(exc))


def _rejection_code(document: Any, config: Config) -> str:
    operation = document.get("operation") if isinstance(document, dict) else None
    if isinstance(operation, str) and operation and operation not in config.handlers:
        return "UNKNOWN_OPERATION"
    return "INVALID_PAYLOAD"


def too_late(deadline: float | None, now: float) -> dict[str, Any] | None:
    """The TIMED_OUT update for a request whose timeout passed before it could start."""
    if deadline is None or now < deadline:
        return None
    return shapes.update("TIMED_OUT", shapes.status_reason(
        "EXPIRED_BEFORE_START", "the execution's timeout passed before its handler could "
        "start; it did not run"))


def run_limit(handler_timeout: float, deadline: float | None, now: float) -> tuple[float, bool]:
    """How long the handler may run, and whether that limit is the execution's own timeout.

    The handler stops at its configured timeout or when the execution times out, whichever
    comes first: past the execution's timeout its result would only be late.
    """
    if deadline is None or handler_timeout <= deadline - now:
        return handler_timeout, False
    return max(0.0, deadline - now), True


def on_repeat(record: CommandRecord, running: bool) -> Literal["ignore", "answer", "resume"]:
    """A request whose executionId the journal already has (an MQTT redelivery).

    Running here: ignore it. Decided: answer with the journaled verdict, never run it again.
    Journaled but not running in this process: the recovery after a restart owns it.
    """
    if running:
        return "ignore"
    if record.state in ("finished", "done"):
        return "answer"
    return "resume"


@dataclass(frozen=True)
class Recovery:
    """What a restarted agent does with one open command execution."""

    kind: Literal["run", "report"]
    update: dict[str, Any] | None = None  # for "report": the verdict (None: already journaled)
    kill_pid: int | None = None  # a handler process group left over from the old agent


def plan_recovery(record: CommandRecord, now: float, config: Config,
                  alive: bool) -> Recovery:
    """The rules of :mod:`agent.recovery`, for commands: never run, run; finished, report;
    interrupted, run again only if the handler is ``idempotent`` (and the crash-loop guard and
    the execution's timeout allow), else FAILED."""
    leftover = record.pid if alive else None
    if record.state == "finished":
        return Recovery("report", None, leftover)
    late = too_late(record.deadline, now)
    handler = config.handlers.get(record.operation or "")
    if handler is None:
        return Recovery("report", shapes.update("FAILED", shapes.status_reason(
            "HANDLER_REMOVED", f"handler {record.operation!r} is no longer configured")),
            leftover)
    if record.state == "received":
        return Recovery("report", late) if late else Recovery("run")
    if record.attempts >= config.max_attempts:
        return Recovery("report", shapes.update("FAILED", shapes.status_reason(
            "CRASH_LOOP", f"the agent stopped {record.attempts} times while this handler ran; "
            "not starting it again")), leftover)
    if not handler.idempotent:
        return Recovery("report", shapes.update("FAILED", shapes.status_reason(
            "INTERRUPTED", "the agent restarted while the handler ran; not run again because "
            "the handler is not declared idempotent")), leftover)
    if late:
        return Recovery("report", shapes.update("TIMED_OUT", shapes.status_reason(
            "EXECUTION_TIMEOUT", "the agent restarted while the handler ran, and the "
            "execution's timeout has passed since; not run again")), leftover)
    return Recovery("run", kill_pid=leftover)
