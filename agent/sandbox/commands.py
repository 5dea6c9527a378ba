"""An I/O-free emulation of AWS IoT Commands: the state machine behind the sandbox's fronts.

Like :mod:`agent.sandbox.service` for Jobs, three faces over one state:

* a **control plane** (``create_command`` ... ``delete_execution``) for the ``iot`` API;
* ``start_execution`` for the ``iot-jobs-data`` data plane, returning the request the MQTT front
  publishes (:class:`Message`: raw payload bytes plus the MQTT 5 content type and message
  expiry);
* a **device plane**, :meth:`CommandsService.update_execution`, and its MQTT adaptor
  :meth:`CommandsService.handle` (in :mod:`agent.sandbox.mqtt_adaptor`), answering one device
  update on ``$aws/commands/things/<thing>/executions/<id>/response/json`` with its accepted or
  rejected reply.

Time comes from an injected clock; the execution timer fires only in :meth:`tick`, which the
front calls at :meth:`next_deadline`. Facts: ``commands-api.md``. Decisions where AWS is silent,
each pinned by a test:

* ``executionTimeoutSeconds`` defaults to :data:`DEFAULT_TIMEOUT` and is at most 2^32-1 (the
  message expiry interval is a four-byte integer).
* An update's ``statusReason`` replaces the stored one (a status change without one clears it);
  a given ``result`` replaces the stored map, an absent one keeps it.
* A cloud-set TIMED_OUT (``$NO_RESPONSE_FROM_DEVICE``) takes one more terminal status from the
  device; IN_PROGRESS after it, and anything after a device's own terminal status, is
  ``InvalidStateTransition``. ``DataConflict`` comes only from fault injection: how close is
  "too close" is not documented, and a sandbox that guessed would make agents flaky.
* A device update may carry ``deviceType``, ``deviceId`` and ``executionId`` (the official
  SDKs serialise them) only if they match its topic; any other unknown member is
  ``InvalidRequest``, as a typo deserves.
* A client token is remembered for the sandbox's lifetime.
* Payload templates, preprocessors, mandatory parameters, the FleetWise namespace and
  ``roleArn`` are refused by name (``InvalidRequest``), as are execution ``parameters`` (only
  templates use them).
"""

from __future__ import annotations

import base64
import binascii
import copy
import re
import time
import unicodedata
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from agent.sandbox import mqtt_adaptor
from agent.sandbox._validate import Rejection
from agent.sandbox.records import Message

__all__ = ["DEFAULT_TIMEOUT", "NO_RESPONSE", "CommandsService", "Message", "Rejection",
           "parse_time_filter"]

DEFAULT_TIMEOUT: Final = 10
"""Seconds an execution has when StartCommandExecution names no ``executionTimeoutSeconds``."""

NO_RESPONSE: Final = "$NO_RESPONSE_FROM_DEVICE"
"""The reasonCode of a TIMED_OUT set by the service's execution timer."""

PENDING_DELETION: Final = 12 * 3600
"""DeleteCommand of a command not deprecated for this long schedules the deletion this far out."""

TIME_TO_LIVE: Final = 182 * 86400
"""How long an execution is kept (``timeToLive``; AWS says "six months")."""

MAX_PAYLOAD: Final = 32768
_MAX_TIMEOUT: Final = 2**32 - 1
_ID: Final = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_REASON_CODE: Final = re.compile(r"[A-Z0-9_-]{1,64}")
_RESULT_NAME: Final = re.compile(r"[a-zA-Z0-9_-]{1,32}")
_TOKEN: Final = re.compile(r"[\x21-\x7e]{1,64}")
_DEVICE_STATUSES: Final = frozenset({"IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED",
                                     "TIMED_OUT"})
STATUSES: Final = frozenset({"CREATED", *_DEVICE_STATUSES})
_FINAL: Final = frozenset({"SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT"})
_UNSUPPORTED: Final = {
    "payloadTemplate": "payload templates",
    "preprocessor": "preprocessors",
    "mandatoryParameters": "mandatory parameters",
    "roleArn": "roleArn (AWS-IoT-FleetWise only)",
}
_UPDATE_MEMBERS: Final = frozenset({"status", "statusReason", "result", "deviceType",
                                    "deviceId", "executionId"})
OPERATIONS: Final = ("update",)


def _invalid(message: str) -> Rejection:
    return Rejection("InvalidRequest", message)


@dataclass
class Command:
    command_id: str
    payload: bytes
    content_type: str | None
    created_at: int
    last_updated_at: int
    display_name: str | None = None
    description: str | None = None
    tags: list[dict[str, str]] = field(default_factory=list)
    deprecated: bool = False
    deprecated_at: int | None = None
    deletion_due: int | None = None  # pendingDeletion until then

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"commandId": self.command_id}
        if self.display_name is not None:
            out["displayName"] = self.display_name
        out.update(deprecated=self.deprecated, createdAt=self.created_at,
                   lastUpdatedAt=self.last_updated_at,
                   pendingDeletion=self.deletion_due is not None)
        return out


@dataclass
class Execution:
    execution_id: str
    command_id: str
    thing: str
    timeout: int
    created_at: int
    deadline: float
    status: str = "CREATED"
    status_reason: dict[str, str] | None = None
    result: dict[str, dict[str, Any]] | None = None
    last_updated_at: int = 0
    started_at: int | None = None
    completed_at: int | None = None
    timed_out_by_cloud: bool = False

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"executionId": self.execution_id, "status": self.status,
                               "createdAt": self.created_at}
        if self.started_at is not None:
            out["startedAt"] = self.started_at
        if self.completed_at is not None:
            out["completedAt"] = self.completed_at
        return out


@dataclass
class _Fault:
    code: str
    remaining: int


class CommandsService:
    """AWS IoT Commands for one sandbox account. Not thread-safe: the front serialises calls.

    Args:
        clock: epoch seconds.
        thing_exists: whether a thing is registered (the Jobs service keeps the registry).
    """

    def __init__(self, clock: Callable[[], float] = time.time,
                 thing_exists: Callable[[str], bool] = lambda _: True) -> None:
        self._clock = clock
        self._thing_exists = thing_exists
        self._commands: dict[str, Command] = {}
        self._executions: dict[str, Execution] = {}
        self._tokens: dict[str, tuple[tuple[Any, ...], str]] = {}
        self._faults: list[_Fault] = []
        self._history: list[tuple[str, str, Any, str | None]] = []

    # ---------------------------------------------------------------- commands

    def create_command(self, command_id: str, *, payload: dict[str, Any] | None = None,
                       namespace: str | None = None, display_name: str | None = None,
                       description: str | None = None, tags: list[dict[str, str]] | None = None,
                       **unsupported: Any) -> dict[str, Any]:
        """CreateCommand with a static payload ``{"content": bytes, "contentType": str}``."""
        _check_id(command_id, "commandId")
        _refuse(unsupported)
        if namespace not in (None, "AWS-IoT"):
            raise _invalid(f"namespace {namespace!r}: the sandbox serves the AWS-IoT namespace "
                           "only (not AWS-IoT-FleetWise)")
        content, content_type = _payload(payload)
        display_name = _text(display_name, "displayName", 64)
        description = _text(description, "description", 2028)
        tags = _tags(tags)
        if command_id in self._commands:
            raise Rejection("Conflict", f"command {command_id} already exists"
                            + (" (pending deletion)" if self._commands[command_id].deletion_due
                               else ""))
        now = self._now()
        self._commands[command_id] = Command(command_id, content, content_type, now, now,
                                             display_name, description, tags)
        return {"commandId": command_id}

    def get_command(self, command_id: str) -> dict[str, Any]:
        """GetCommand, without the ARN (the front adds it); ``content`` is bytes."""
        command = self._command(command_id)
        out = command.summary()
        out.pop("pendingDeletion")
        out["namespace"] = "AWS-IoT"
        if command.description is not None:
            out["description"] = command.description
        out["payload"] = {"content": command.payload}
        if command.content_type is not None:
            out["payload"]["contentType"] = command.content_type
        out["pendingDeletion"] = command.deletion_due is not None
        return out

    def list_commands(self, *, namespace: str | None = None,
                      sort_order: str | None = None) -> list[dict[str, Any]]:
        """ListCommands' summaries, newest first unless ``sort_order`` is ASCENDING."""
        if namespace not in (None, "AWS-IoT", "AWS-IoT-FleetWise"):
            raise _invalid(f"namespace {namespace!r} must be AWS-IoT or AWS-IoT-FleetWise")
        commands = [] if namespace == "AWS-IoT-FleetWise" else list(self._commands.values())
        commands.sort(key=lambda c: (c.created_at, c.command_id),
                      reverse=_descending(sort_order))
        return [c.summary() for c in commands]

    def update_command(self, command_id: str, *, display_name: str | None = None,
                       description: str | None = None,
                       deprecated: bool | None = None) -> dict[str, Any]:
        command = self._command(command_id)
        display_name = _text(display_name, "displayName", 64)
        description = _text(description, "description", 2028)
        if deprecated is not None and not isinstance(deprecated, bool):
            raise _invalid("deprecated must be a boolean")
        if command.deletion_due is not None:
            raise Rejection("Conflict", f"command {command_id} is pending deletion")
        now = self._now()
        if display_name is not None:
            command.display_name = display_name
        if description is not None:
            command.description = description
        if deprecated is not None and deprecated != command.deprecated:
            command.deprecated, command.deprecated_at = deprecated, now if deprecated else None
        command.last_updated_at = now
        out: dict[str, Any] = {"commandId": command_id}
        if command.display_name is not None:
            out["displayName"] = command.display_name
        if command.description is not None:
            out["description"] = command.description
        out.update(deprecated=command.deprecated, lastUpdatedAt=now)
        return out

    def delete_command(self, command_id: str) -> int:
        """DeleteCommand: 204 if deprecated for over 12 hours (deleted now), else 202 (deleted
        12 hours later, ``pendingDeletion`` meanwhile)."""
        command = self._command(command_id)
        now = self._now()
        if command.deprecated_at is not None and now - command.deprecated_at >= PENDING_DELETION:
            del self._commands[command_id]
            return 204
        if command.deletion_due is None:
            command.deletion_due = now + PENDING_DELETION
        return 202

    # ---------------------------------------------------------------- executions

    def start_execution(self, command_id: str, thing: str, *, timeout: int | None = None,
                        client_token: str | None = None,
                        parameters: dict[str, Any] | None = None) -> tuple[str, list[Message]]:
        """StartCommandExecution: the new execution's id and the request to publish.

        The same ``client_token`` with the same arguments returns the same execution and
        publishes nothing; with other arguments it is a ``Conflict``.
        """
        if parameters is not None:
            raise _invalid("parameters: the sandbox's commands have static payloads (payload "
                           "templates are not supported), so they take no parameters")
        if client_token is not None and (not isinstance(client_token, str)
                                         or not _TOKEN.fullmatch(client_token)):
            raise _invalid("clientToken must be 1-64 printable ASCII characters")
        if timeout is None:
            timeout = DEFAULT_TIMEOUT
        if isinstance(timeout, bool) or not isinstance(timeout, int) \
                or not 1 <= timeout <= _MAX_TIMEOUT:
            raise _invalid(f"executionTimeoutSeconds must be an integer 1-{_MAX_TIMEOUT}")
        arguments = (command_id, thing, timeout)
        if client_token is not None and client_token in self._tokens:
            earlier, execution_id = self._tokens[client_token]
            if earlier != arguments:
                raise Rejection("Conflict", f"clientToken {client_token!r} was used with other "
                                "parameters")
            return execution_id, []
        command = self._command(command_id)
        if command.deletion_due is not None or command.deprecated:
            state = "pending deletion" if command.deletion_due is not None else "deprecated"
            raise _invalid(f"command {command_id} is {state}: it cannot be started")
        if not isinstance(thing, str) or not self._thing_exists(thing):
            raise Rejection("ResourceNotFound", f"thing {thing} does not exist")
        execution_id = str(uuid.uuid4())
        moment = self._clock()
        now = int(moment)
        self._executions[execution_id] = Execution(execution_id, command_id, thing, timeout, now,
                                                   moment + timeout, last_updated_at=now)
        if client_token is not None:
            self._tokens[client_token] = (arguments, execution_id)
        suffix = {"application/json": "/json", "application/cbor": "/cbor"}.get(
            (command.content_type or "").split(";")[0].strip().lower(), "")
        topic = f"$aws/commands/things/{thing}/executions/{execution_id}/request{suffix}"
        return execution_id, [Message(topic, command.payload, command.content_type, timeout)]

    def get_execution(self, execution_id: str, thing: str, *,
                      include_result: bool = True) -> dict[str, Any]:
        """GetCommandExecution without ARNs (``commandId`` and ``thing`` instead)."""
        execution = self._execution(execution_id, thing)
        out: dict[str, Any] = {"executionId": execution_id, "commandId": execution.command_id,
                               "thing": thing, "status": execution.status}
        if execution.status_reason is not None:
            out["statusReason"] = dict(execution.status_reason)
        if include_result and execution.result:
            out["result"] = copy.deepcopy(execution.result)
        out.update(executionTimeoutSeconds=execution.timeout, createdAt=execution.created_at,
                   lastUpdatedAt=execution.last_updated_at)
        for key, value in (("startedAt", execution.started_at),
                           ("completedAt", execution.completed_at)):
            if value is not None:
                out[key] = value
        out["timeToLive"] = execution.created_at + TIME_TO_LIVE
        return out

    def list_executions(self, *, command_id: str | None = None, thing: str | None = None,
                        status: str | None = None, sort_order: str | None = None,
                        started: tuple[int | None, int | None] | None = None,
                        completed: tuple[int | None, int | None] | None = None
                        ) -> list[dict[str, Any]]:
        """ListCommandExecutions for one command or one thing (exactly one of them), with
        ``commandId`` and ``thing`` in each summary for the front to turn into ARNs."""
        if (command_id is None) == (thing is None):
            raise _invalid("give exactly one of commandArn and targetArn")
        if started is not None and completed is not None:
            raise _invalid("give at most one of startedTimeFilter and completedTimeFilter")
        if status is not None and status not in STATUSES:
            raise _invalid(f"status {status!r} is not a command execution status")
        if command_id is not None:
            self._command(command_id)
        chosen = [e for e in self._executions.values()
                  if command_id in (None, e.command_id) and thing in (None, e.thing)
                  and status in (None, e.status)]
        key = "created_at"
        for attribute, window in (("started_at", started), ("completed_at", completed)):
            if window is not None:
                key = attribute
                after, before = window
                chosen = [e for e in chosen if (value := getattr(e, attribute)) is not None
                          and (after is None or value >= after)
                          and (before is None or value <= before)]
        chosen.sort(key=lambda e: (getattr(e, key) or 0, e.created_at, e.execution_id),
                    reverse=_descending(sort_order))
        return [{**e.summary(), "commandId": e.command_id, "thing": e.thing} for e in chosen]

    def delete_execution(self, execution_id: str, thing: str) -> None:
        """DeleteCommandExecution: only an execution that ended (a timed-out one included)."""
        execution = self._execution(execution_id, thing)
        if execution.status not in _FINAL:
            raise Rejection("Conflict", f"execution {execution_id} is {execution.status}: only "
                            "an execution that ended can be deleted")
        del self._executions[execution_id]

    # ---------------------------------------------------------------- device plane

    def handle(self, topic: str, payload: bytes) -> list[Message]:
        """Answer one device publish (:func:`agent.sandbox.mqtt_adaptor.handle_commands`)."""
        return mqtt_adaptor.handle_commands(self, topic, payload)

    def serve(self, thing: str, execution_id: str, read: Callable[[], Any]) -> None:
        """Serve one device update: an injected fault first, then ``read()`` (the front's
        reading of the payload, which may raise its own rejection) and the update; every
        outcome goes into :attr:`history`."""
        request: Any = None
        try:
            for fault in self._faults:
                fault.remaining -= 1
                if not fault.remaining:
                    self._faults.remove(fault)
                raise Rejection(fault.code, f"injected {fault.code} fault")
            request = read()
            self.update_execution(thing, execution_id, request)
        except Rejection as rejection:
            self._history.append((thing, execution_id, request, rejection.code))
            raise
        self._history.append((thing, execution_id, request, None))

    def update_execution(self, thing: str, execution_id: str, request: Any) -> None:
        """UpdateCommandExecution from the device: ``request`` is its parsed JSON payload."""
        if not isinstance(request, dict):
            raise _invalid("the update must be a JSON object")
        for name in sorted(set(request) - _UPDATE_MEMBERS):
            raise _invalid(f"unknown member {name!r}")
        for name, expected in (("deviceType", "things"), ("deviceId", thing),
                               ("executionId", execution_id)):
            if name in request and request[name] != expected:
                raise _invalid(f"{name} {request[name]!r} does not match the topic ({expected})")
        status = request.get("status")
        if status not in _DEVICE_STATUSES:
            raise _invalid(f"status {status!r} must be one of "
                           f"{', '.join(sorted(_DEVICE_STATUSES))}")
        reason = _status_reason(request.get("statusReason"))
        result = _result(request.get("result"))
        execution = self._executions.get(execution_id)
        if execution is None or execution.thing != thing:
            raise Rejection("ResourceNotFound", f"no execution {execution_id} for thing {thing}")
        if execution.status in _FINAL and not (execution.timed_out_by_cloud
                                               and status in _FINAL):
            raise Rejection("InvalidStateTransition", f"execution {execution_id} is "
                            f"{execution.status}; it cannot become {status}")
        now = self._now()
        if reason is not None or status != execution.status:
            execution.status_reason = reason
        if result is not None:
            execution.result = result
        execution.status, execution.timed_out_by_cloud = status, False
        execution.last_updated_at = now
        if execution.started_at is None:
            execution.started_at = now
        if status in _FINAL:
            execution.completed_at = now

    # ---------------------------------------------------------------- timers and faults

    def tick(self) -> list[Message]:
        """Time out every execution whose timer ran out; finish due command deletions."""
        moment = self._clock()
        now = int(moment)
        for execution in self._executions.values():
            if execution.status in ("CREATED", "IN_PROGRESS") and execution.deadline <= moment:
                execution.status, execution.timed_out_by_cloud = "TIMED_OUT", True
                execution.status_reason = {
                    "reasonCode": NO_RESPONSE,
                    "reasonDescription": f"no final status from the device within "
                                         f"{execution.timeout} seconds"}
                execution.last_updated_at = execution.completed_at = now
        for command_id, command in list(self._commands.items()):
            if command.deletion_due is not None and command.deletion_due <= now:
                del self._commands[command_id]
        return []

    def next_deadline(self) -> float | None:
        deadlines = [e.deadline for e in self._executions.values()
                     if e.status in ("CREATED", "IN_PROGRESS")]
        deadlines += [float(c.deletion_due) for c in self._commands.values()
                      if c.deletion_due is not None]
        return min(deadlines, default=None)

    def inject_rejections(self, code: str, count: int) -> None:
        """Reject the next ``count`` device updates with ``code`` (``DataConflict``...)."""
        if not isinstance(code, str) or not code or isinstance(count, bool) \
                or not isinstance(count, int) or count < 0:
            raise ValueError(f"cannot inject {code!r} x {count!r}")
        if count:
            self._faults.append(_Fault(code, count))

    @property
    def history(self) -> list[tuple[str, str, Any, str | None]]:
        """``(thing, executionId, parsed update, rejection code or None)`` of every device
        update, oldest first (the update is None when it was not JSON or a fault hit first)."""
        return list(self._history)

    # ---------------------------------------------------------------- internals

    def _now(self) -> int:
        return int(self._clock())

    def _command(self, command_id: str) -> Command:
        _check_id(command_id, "commandId")
        command = self._commands.get(command_id)
        if command is None:
            raise Rejection("ResourceNotFound", f"command {command_id} does not exist")
        return command

    def _execution(self, execution_id: str, thing: str) -> Execution:
        _check_id(execution_id, "executionId")
        execution = self._executions.get(execution_id)
        if execution is None or execution.thing != thing:
            raise Rejection("ResourceNotFound",
                            f"no execution {execution_id} for target thing {thing}")
        return execution


def _check_id(value: object, name: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise _invalid(f"{name} {value!r} must be 1-64 characters of [a-zA-Z0-9_-]")
    return value


def _refuse(members: dict[str, Any]) -> None:
    for name in sorted(members):
        what = _UNSUPPORTED.get(name)
        raise _invalid(f"{name}: the sandbox does not support {what}" if what
                       else f"unknown member {name!r}")


def _payload(payload: object) -> tuple[bytes, str | None]:
    if payload is None:
        raise _invalid("payload is required in the AWS-IoT namespace (payloadTemplate is not "
                       "supported by the sandbox)")
    if not isinstance(payload, dict) or set(payload) - {"content", "contentType"}:
        raise _invalid("payload takes content and contentType")
    content = payload.get("content")
    if not isinstance(content, bytes) or not content:
        raise _invalid("payload.content is required (the command's bytes)")
    if len(content) > MAX_PAYLOAD:
        raise _invalid(f"payload.content is {len(content)} bytes; at most {MAX_PAYLOAD}")
    kind = payload.get("contentType")
    if kind is not None and (not isinstance(kind, str) or not kind or "\n" in kind):
        raise _invalid("payload.contentType must be a MIME type")
    return content, kind


def _text(value: object, name: str, limit: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit or not _printable(value):
        raise _invalid(f"{name} must be at most {limit} characters, none of them control "
                       "characters")
    return value


def _printable(text: str) -> bool:
    return not any(unicodedata.category(ch).startswith("C") for ch in text)


def _tags(tags: object) -> list[dict[str, str]]:
    if tags is None:
        return []
    if not isinstance(tags, list) or not all(
            isinstance(t, dict) and isinstance(t.get("Key"), str) and 1 <= len(t["Key"]) <= 128
            and set(t) <= {"Key", "Value"} and isinstance(t.get("Value", ""), str)
            for t in tags):
        raise _invalid("tags must be a list of {Key, Value}")
    return [dict(t) for t in tags]


def _descending(sort_order: str | None) -> bool:
    if sort_order not in (None, "ASCENDING", "DESCENDING"):
        raise _invalid(f"sortOrder {sort_order!r} must be ASCENDING or DESCENDING")
    return sort_order != "ASCENDING"


def parse_time_filter(value: object, name: str) -> tuple[int | None, int | None] | None:
    """A TimeFilter ``{"after", "before"}`` in ``yyyy-MM-dd'T'HH:mm`` (UTC) as epoch seconds."""
    if value is None:
        return None
    if not isinstance(value, dict) or not value or set(value) - {"after", "before"}:
        raise _invalid(f"{name} takes after and/or before")
    out: list[int | None] = []
    for key in ("after", "before"):
        text = value.get(key)
        if text is None:
            out.append(None)
            continue
        try:
            moment = datetime.strptime(text, "%Y-%m-%dT%H:%M").replace(tzinfo=UTC)
        except (TypeError, ValueError):
            raise _invalid(f"{name}.{key} {text!r} must be yyyy-MM-ddTHH:mm") from None
        out.append(int(moment.timestamp()))
    return out[0], out[1]


def _status_reason(value: object) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"reasonCode", "reasonDescription"}:
        raise _invalid("statusReason takes reasonCode and reasonDescription")
    code, description = value.get("reasonCode"), value.get("reasonDescription")
    if not isinstance(code, str) or not _REASON_CODE.fullmatch(code):
        raise _invalid(f"statusReason.reasonCode {code!r} must be 1-64 of [A-Z0-9_-]")
    out = {"reasonCode": code}
    if description is not None:
        if not isinstance(description, str) or len(description) > 1024 \
                or not _printable(description):
            raise _invalid("statusReason.reasonDescription must be at most 1024 characters, "
                           "none of them control characters")
        out["reasonDescription"] = description
    return out


def _result(value: object) -> dict[str, dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise _invalid("result must be a non-empty map of name to {s|b|bin}")
    out: dict[str, dict[str, Any]] = {}
    for name, item in value.items():
        if not _RESULT_NAME.fullmatch(name):
            raise _invalid(f"result name {name!r} must be 1-32 of [a-zA-Z0-9_-]")
        if not isinstance(item, dict) or len(item) != 1:
            raise _invalid(f"result[{name!r}] must hold exactly one of s, b, bin")
        (kind, data), = item.items()
        if kind == "s" and isinstance(data, str) and data:
            out[name] = {"S": data}
        elif kind == "b" and isinstance(data, bool):
            out[name] = {"B": data}
        elif kind == "bin" and isinstance(data, str) and _base64(data):
            out[name] = {"BIN": data}
        else:
            raise _invalid(f"result[{name!r}]: s takes a non-empty string, b a boolean, bin "
                           "base64 bytes")
    return out


def _base64(text: str) -> bool:
    try:
        return bool(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        return False
