"""Wire-level parsing and validation for the Jobs emulator (``service.py``).

Split out of ``service.py`` so that the state machine reads as state transitions only. Everything
here is pure: a function either returns the checked (and, for mutable values, copied) value or
raises :class:`Rejection` with the wire code a device would see and a message that names the
offending field by its wire name (``statusDetails``, ``stepTimeoutInMinutes``...), because the same
message reaches an MQTT device, the later HTTP data plane and a test's assertion.

Limits come from ``jobs-mqtt-api.md`` sections 1.2-1.4 (botocore's ``iot-jobs-data`` model and
the IoT Jobs limits page). Where AWS is silent we are strict rather than lenient: an emulator that
accepts what AWS might refuse would let agent bugs through to production.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "DEVICE_STATUSES",
    "OPERATIONS",
    "Rejection",
    "Route",
    "boolean",
    "comment",
    "device_status",
    "integer",
    "job_id",
    "lenient_integer",
    "parse_request",
    "reason_code",
    "request_kwargs",
    "route",
    "status_details",
    "step_timeout",
    "text",
    "thing_name",
    "timeout_minutes",
]

DEVICE_STATUSES: Final = frozenset({"IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED"})
"""The only statuses a device may send: QUEUED, TIMED_OUT, REMOVED, CANCELED are service-set."""

OPERATIONS: Final = ("get", "start-next", "describe", "update")
"""Operation names as used by ``history`` and ``inject_rejections``."""

_THING_RE: Final = re.compile(r"[a-zA-Z0-9:_-]{1,128}")
_JOB_ID_RE: Final = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_DETAIL_KEY_RE: Final = re.compile(r"[a-zA-Z0-9:_-]{1,128}")
_REASON_CODE_RE: Final = re.compile(r"[A-Z0-9_]{1,128}")
_MAX_DETAIL_VALUE: Final = 1024
_MAX_CLIENT_TOKEN: Final = 64
_DIGITS_RE: Final = re.compile(r"-?[0-9]{1,19}")
_MAX_STEP_TIMEOUT: Final = 10080
_LONG_MIN: Final = -(2**63)
_LONG_MAX: Final = 2**63 - 1

# Wire field -> keyword argument of the matching JobsService method, per operation. clientToken is
# accepted everywhere but handled by the MQTT adaptor, so it maps to no argument.
_FIELDS: Final[dict[str, dict[str, str | None]]] = {
    "get": {"clientToken": None},
    "start-next": {
        "clientToken": None,
        "statusDetails": "status_details",
        "stepTimeoutInMinutes": "step_timeout_minutes",
    },
    "describe": {
        "clientToken": None,
        "executionNumber": "execution_number",
        "includeJobDocument": "include_job_document",
    },
    "update": {
        "clientToken": None,
        "status": "status",
        "statusDetails": "status_details",
        "expectedVersion": "expected_version",
        "executionNumber": "execution_number",
        "includeJobExecutionState": "include_job_execution_state",
        "includeJobDocument": "include_job_document",
        "stepTimeoutInMinutes": "step_timeout_minutes",
    },
}


class Rejection(Exception):
    """A request the service refuses, carrying what the device's ``…/rejected`` payload needs.

    One exception type for the device and the control plane keeps every front (MQTT, HTTP, tests)
    on a single ``except``; ``code`` is the wire code (``InvalidRequest``...), or for the control
    plane the botocore exception name without ``Exception`` (``VersionConflict``...).

    Args:
        code: The wire code.
        message: Human-readable reason; names the offending field for ``InvalidRequest``.
        execution_state: ``{"status", "statusDetails", "versionNumber"}``, sent only with
            ``VersionMismatch`` and ``InvalidStateTransition`` so the device needs no extra
            describe to recover.
    """

    def __init__(
        self, code: str, message: str, execution_state: dict[str, Any] | None = None
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.execution_state = execution_state

    def to_payload(self) -> dict[str, Any]:
        """The ErrorResponse body without ``timestamp``/``clientToken`` (the fronts add those)."""
        payload: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.execution_state is not None:
            payload["executionState"] = self.execution_state
        return payload


def _invalid(message: str) -> Rejection:
    return Rejection("InvalidRequest", message)


@dataclass(frozen=True)
class Route:
    """Where a device publish goes: ``operation`` is None for a topic under ``jobs/`` that maps to
    no API (answered with ``InvalidTopic``)."""

    thing_name: str
    operation: str | None
    job_id: str | None = None


def route(topic: str) -> Route | None:
    """Map a device topic to an operation; None for topics the service must not answer.

    Ignored: anything not under ``$aws/things/<thing>/jobs/`` and the topics the service itself
    publishes (``…/accepted``, ``…/rejected``, ``notify``, ``notify-next``), so an emulator that
    subscribes ``$aws/things/+/jobs/#`` never answers its own replies. Only the topic's *shape* is
    checked here; a malformed thing name or job id is the operation's ``InvalidRequest``.
    ``$next`` is a job id only for describe: ``$next/update`` maps to no API.
    """
    parts = topic.split("/")
    if len(parts) < 5 or parts[0] != "$aws" or parts[1] != "things" or parts[3] != "jobs":
        return None
    thing, rest = parts[2], parts[4:]
    if rest[-1] in ("accepted", "rejected") or rest in (["notify"], ["notify-next"]):
        return None
    if rest in (["get"], ["start-next"]):
        return Route(thing, rest[0])
    if len(rest) == 2 and rest[1] == "get":
        return Route(thing, "describe", rest[0])
    if len(rest) == 2 and rest[1] == "update" and rest[0] != "$next":
        return Route(thing, "update", rest[0])
    return Route(thing, None)


def parse_request(payload: bytes) -> dict[str, Any]:
    """Decode a request body: a UTF-8 JSON object, else ``InvalidJson``.

    An empty payload is ``{}``: AWS's embedded C Jobs library sends nothing at all for a request
    without a client token (``Jobs_StartNextMsg``), and its demo publishes ``get``,
    ``$next/get`` and ``start-next`` that way. ``NaN``/``Infinity`` are refused: they are not
    JSON, only Python's parser accepts them.
    """
    if not payload:
        return {}

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        request = json.loads(payload.decode("utf-8"), parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Rejection("InvalidJson", f"request payload is not UTF-8 JSON: {exc}") from None
    if not isinstance(request, dict):
        raise Rejection("InvalidJson", "request payload must be a JSON object")
    return request


def request_kwargs(operation: str, request: dict[str, Any]) -> dict[str, Any]:
    """Turn a parsed request into keyword arguments for the JobsService method of ``operation``.

    Unknown fields and explicit ``null`` values are ``InvalidRequest``: the SDK never sends either
    (``to_payload`` drops None), so seeing one means the client is not speaking the documented
    shape, and a silent ignore would hide a typo such as ``status_details``.
    """
    fields = _FIELDS[operation]
    kwargs: dict[str, Any] = {}
    for name, value in request.items():
        if name not in fields:
            raise _invalid(f"unknown field {name!r} for this operation")
        if value is None:
            raise _invalid(f"{name} must not be null")
        argument = fields[name]
        if argument is None:
            if not isinstance(value, str):
                raise _invalid("clientToken must be a string")
            if len(value) > _MAX_CLIENT_TOKEN:
                raise _invalid(f"clientToken must be at most {_MAX_CLIENT_TOKEN} characters")
        else:
            kwargs[argument] = value
    if operation == "update":
        kwargs.setdefault("status", None)  # so the method reports "status is required"
    return kwargs


def thing_name(value: object) -> str:
    """A thing name: 1-128 of ``[a-zA-Z0-9:_-]``."""
    if not isinstance(value, str) or not _THING_RE.fullmatch(value):
        raise _invalid(f"thingName {value!r} must be 1-128 characters of [a-zA-Z0-9:_-]")
    return value


def job_id(value: object) -> str:
    """A job id: 1-64 of ``[a-zA-Z0-9_-]`` (so ``$next`` is not one; callers special-case it)."""
    if not isinstance(value, str) or not _JOB_ID_RE.fullmatch(value):
        raise _invalid(f"jobId {value!r} must be 1-64 characters of [a-zA-Z0-9_-]")
    return value


def status_details(
    value: object, *, field: str = "statusDetails", max_pairs: int | None = None
) -> dict[str, str] | None:
    """A statusDetails map (None passes), returned as a copy the caller may store.

    Keys: 1-128 of ``[a-zA-Z0-9:_-]``. Values: 1-1024 characters matching ``[^\\p{C}]+``, i.e.
    no character of Unicode category C* (control, format, surrogate, private-use, unassigned),
    so no newline and no empty string. ``max_pairs`` is 10 for CancelJobExecution; device updates
    have no documented count.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _invalid(f"{field} must be an object of string to string")
    if max_pairs is not None and len(value) > max_pairs:
        raise _invalid(f"{field} has {len(value)} entries, at most {max_pairs} are allowed")
    for key, item in value.items():
        if not isinstance(key, str) or not _DETAIL_KEY_RE.fullmatch(key):
            raise _invalid(f"{field} key {key!r} must be 1-128 characters of [a-zA-Z0-9:_-]")
        if not isinstance(item, str):
            raise _invalid(f"{field}[{key!r}] must be a string")
        if not 1 <= len(item) <= _MAX_DETAIL_VALUE:
            raise _invalid(f"{field}[{key!r}] must be 1-{_MAX_DETAIL_VALUE} characters long")
        if any(unicodedata.category(ch).startswith("C") for ch in item):
            raise _invalid(f"{field}[{key!r}] must not contain control characters")
    return dict(value)


def integer(value: object, field: str) -> int | None:
    """An optional 64-bit integer; a JSON ``true`` is not one even though ``bool`` is an int."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(f"{field} must be an integer")
    if not _LONG_MIN <= value <= _LONG_MAX:
        raise _invalid(f"{field} must fit in 64 bits")
    return value


def lenient_integer(value: object, field: str) -> int | None:
    """:func:`integer`, or one written as a JSON string of decimal digits: AWS's embedded C
    Jobs library sends ``"expectedVersion":"3"`` (``Jobs_UpdateMsg``) and AWS accepts it."""
    if isinstance(value, str) and _DIGITS_RE.fullmatch(value):
        value = int(value)
    return integer(value, field)


def boolean(value: object, field: str) -> bool:
    """A boolean flag; ``0``/``1``/``"true"`` are refused, as a typed client never sends them."""
    if not isinstance(value, bool):
        raise _invalid(f"{field} must be a boolean")
    return value


def step_timeout(value: object, *, cancel: bool = True) -> int | None:
    """stepTimeoutInMinutes: 1..10080 (None = not given), or -1 to cancel the step timer where
    ``cancel`` (UpdateJobExecution only: the model documents -1 for it, not for start-next)."""
    minutes = integer(value, "stepTimeoutInMinutes")
    if minutes is not None and not (1 <= minutes <= _MAX_STEP_TIMEOUT
                                    or (cancel and minutes == -1)):
        allowed = f"1-{_MAX_STEP_TIMEOUT}" + (" or -1" if cancel else "")
        raise _invalid(f"stepTimeoutInMinutes must be {allowed}, not {minutes}")
    return minutes


def timeout_minutes(value: object) -> int | None:
    """A job's inProgressTimeoutInMinutes: 1..10080 (None = no timeout)."""
    minutes = integer(value, "inProgressTimeoutInMinutes")
    if minutes is not None and not 1 <= minutes <= _MAX_STEP_TIMEOUT:
        raise _invalid(f"inProgressTimeoutInMinutes must be 1-{_MAX_STEP_TIMEOUT}")
    return minutes


def device_status(value: object) -> str:
    """The status of an update: required, and one a device may set."""
    if value is None:
        raise _invalid("status is required")
    if not isinstance(value, str) or value not in DEVICE_STATUSES:
        raise _invalid(f"status {value!r} must be one of {', '.join(sorted(DEVICE_STATUSES))}")
    return value


def text(value: object, field: str, max_length: int) -> str | None:
    """An optional free-text field such as ``description`` (None passes)."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_length:
        raise _invalid(f"{field} must be a string of at most {max_length} characters")
    return value


def comment(value: object) -> str | None:
    """A cancellation comment: at most 2028 characters (CancelJob's limit)."""
    return text(value, "comment", 2028)


def reason_code(value: object) -> str | None:
    """A cancellation reasonCode: 1-128 of ``[A-Z0-9_]`` (CancelJob's pattern)."""
    if value is not None and (not isinstance(value, str) or not _REASON_CODE_RE.fullmatch(value)):
        raise _invalid(f"reasonCode {value!r} must be 1-128 characters of [A-Z0-9_]")
    return value
