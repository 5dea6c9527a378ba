"""The Jobs device API's wire format and boto3's shapes, and the checks between them. No I/O.

Requests are validated here before anything is published, with botocore's ``iot-jobs-data``
constraints, so a bad parameter fails fast with :class:`InvalidRequestException` instead of a
service round trip. Replies are converted *strictly* into exactly what
``boto3.client("iot-jobs-data")`` returns: only the model's keys, times as integer epoch seconds
(never through ``datetime``), a key absent from the reply stays absent, and ``jobDocument`` is the
JSON *string* boto3 hands out (MQTT carries it as an object). Anything that does not fit raises
:class:`InvalidResponseError` naming the field, so a malformed reply is one clear line.
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

from agent.errors import InvalidRequestException, InvalidResponseError

__all__ = [
    "DEVICE_STATUSES",
    "STATUSES",
    "TERMINAL_STATUSES",
    "describe_request",
    "describe_response",
    "document_text",
    "error_fields",
    "execution",
    "execution_state",
    "get_pending_response",
    "notify_event",
    "notify_next_event",
    "start_next_request",
    "start_next_response",
    "status_details_problem",
    "summary",
    "topic_prefix",
    "update_request",
    "update_response",
    "validate_job_id",
    "validate_thing_name",
]

STATUSES = frozenset({"QUEUED", "IN_PROGRESS", "SUCCEEDED", "FAILED", "TIMED_OUT", "REJECTED",
                      "REMOVED", "CANCELED"})
TERMINAL_STATUSES = STATUSES - {"QUEUED", "IN_PROGRESS"}
DEVICE_STATUSES = frozenset({"IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED"})

_THING_NAME = re.compile(r"[a-zA-Z0-9:_-]{1,128}")
_JOB_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_DETAILS_KEY = re.compile(r"[a-zA-Z0-9:_-]{1,128}")
MAX_DETAILS_VALUE = 1024
MAX_STEP_TIMEOUT = 10080  # minutes (7 days), botocore/AWS docs


def topic_prefix(thing_name: str) -> str:
    return f"$aws/things/{thing_name}/jobs"


# --------------------------------------------------------------------------- requests


def _bad(message: str) -> InvalidRequestException:
    return InvalidRequestException(message, code="InvalidRequest")


def validate_thing_name(value: object) -> str:
    if not isinstance(value, str) or not _THING_NAME.fullmatch(value):
        raise _bad(f"thingName must be 1-128 characters of [a-zA-Z0-9:_-], got {value!r}")
    return value


def validate_job_id(value: object, *, allow_next: bool = False) -> str:
    if allow_next and value == "$next":
        return value
    if not isinstance(value, str) or not _JOB_ID.fullmatch(value):
        extra = " or '$next'" if allow_next else ""
        raise _bad(f"jobId must be 1-64 characters of [a-zA-Z0-9_-]{extra}, got {value!r}")
    return value


def _long(name: str, value: object, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise _bad(f"{name} must be between {low} and {high}, got {value}")
    return value


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _bad(f"{name} must be true or false, got {value!r}")
    return value


def _step_timeout(value: object) -> int:
    minutes = _long("stepTimeoutInMinutes", value)
    if minutes != -1 and not 1 <= minutes <= MAX_STEP_TIMEOUT:
        raise _bad(f"stepTimeoutInMinutes must be 1-{MAX_STEP_TIMEOUT} (or -1 to cancel the "
                   f"step timer), got {minutes}")
    return minutes


def status_details_problem(details: object) -> str | None:
    """Why ``details`` is not a valid statusDetails map, or None.

    The emulator validates with its own code (agent/sandbox/_validate.py) on purpose: a referee
    that shared the client's checks would share its bugs.
    """
    if not isinstance(details, dict):
        return f"statusDetails must be a map of strings, got {type(details).__name__}"
    for key, value in details.items():
        if not isinstance(key, str) or not _DETAILS_KEY.fullmatch(key):
            return f"statusDetails key {key!r} must be 1-128 characters of [a-zA-Z0-9:_-]"
        if not isinstance(value, str):
            return f"statusDetails[{key!r}] must be a string, got {type(value).__name__}"
        if not 1 <= len(value) <= MAX_DETAILS_VALUE:
            return (f"statusDetails[{key!r}] must be 1-{MAX_DETAILS_VALUE} characters, "
                    f"got {len(value)}")
        for ch in value:
            if unicodedata.category(ch)[0] == "C":
                return f"statusDetails[{key!r}] contains control character {ch!r}"
    return None


def _status_details(details: object) -> dict[str, str]:
    problem = status_details_problem(details)
    if problem:
        raise _bad(problem)
    return dict(details)  # type: ignore[call-overload]


def start_next_request(
    statusDetails: dict[str, str] | None = None,
    stepTimeoutInMinutes: int | None = None,
) -> dict[str, Any]:
    payload: dict[str, Any] = {}
    if statusDetails is not None:
        payload["statusDetails"] = _status_details(statusDetails)
    if stepTimeoutInMinutes is not None:
        payload["stepTimeoutInMinutes"] = _step_timeout(stepTimeoutInMinutes)
    return payload


def describe_request(
    includeJobDocument: bool | None = None,
    executionNumber: int | None = None,
) -> dict[str, Any]:
    payload: dict[str, Any] = {}
    if includeJobDocument is not None:
        payload["includeJobDocument"] = _bool("includeJobDocument", includeJobDocument)
    if executionNumber is not None:
        payload["executionNumber"] = _long("executionNumber", executionNumber, 1)
    return payload


def update_request(
    status: object,
    statusDetails: dict[str, str] | None = None,
    stepTimeoutInMinutes: int | None = None,
    expectedVersion: int | None = None,
    includeJobExecutionState: bool | None = None,
    includeJobDocument: bool | None = None,
    executionNumber: int | None = None,
) -> dict[str, Any]:
    if status not in DEVICE_STATUSES:
        raise _bad(f"status must be one of {', '.join(sorted(DEVICE_STATUSES))}, got {status!r}")
    payload: dict[str, Any] = {"status": status}
    if statusDetails is not None:
        payload["statusDetails"] = _status_details(statusDetails)
    if stepTimeoutInMinutes is not None:
        payload["stepTimeoutInMinutes"] = _step_timeout(stepTimeoutInMinutes)
    if expectedVersion is not None:
        payload["expectedVersion"] = _long("expectedVersion", expectedVersion, 0)
    if includeJobExecutionState is not None:
        payload["includeJobExecutionState"] = _bool("includeJobExecutionState",
                                                    includeJobExecutionState)
    if includeJobDocument is not None:
        payload["includeJobDocument"] = _bool("includeJobDocument", includeJobDocument)
    if executionNumber is not None:
        payload["executionNumber"] = _long("executionNumber", executionNumber, 1)
    return payload


# --------------------------------------------------------------------------- replies


def _mapping(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidResponseError(f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def _epoch(value: object, where: str) -> int:
    """Epoch seconds as int. A float with no fraction is accepted (JSON numbers may carry .0)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidResponseError(f"{where} must be epoch seconds, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise InvalidResponseError(f"{where} must be whole epoch seconds, got {value!r}")
        value = int(value)
    if value > 100_000_000_000:  # year 5138: this is milliseconds, which the API never sends
        raise InvalidResponseError(f"{where} looks like milliseconds, expected seconds: {value}")
    return value


def _integer(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidResponseError(f"{where} must be an integer, got {value!r}")
    return value


def _string(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidResponseError(f"{where} must be a string, got {value!r}")
    return value


def _details(value: object, where: str) -> dict[str, str]:
    details = _mapping(value, where)
    for key, item in details.items():
        _string(item, f"{where}[{key!r}]")
    return dict(details)


def document_text(document: object) -> str:
    """The job document as the JSON string boto3 returns (compact, key order kept)."""
    if isinstance(document, str):
        return document
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


_SUMMARY_FIELDS = {
    "jobId": _string,
    "queuedAt": _epoch,
    "startedAt": _epoch,
    "lastUpdatedAt": _epoch,
    "versionNumber": _integer,
    "executionNumber": _integer,
}
_EXECUTION_FIELDS = {
    "jobId": _string,
    "thingName": _string,
    "status": _string,
    "statusDetails": _details,
    "queuedAt": _epoch,
    "startedAt": _epoch,
    "lastUpdatedAt": _epoch,
    "approximateSecondsBeforeTimedOut": _integer,
    "versionNumber": _integer,
    "executionNumber": _integer,
    "jobDocument": lambda v, where: document_text(_mapping(v, where) if not isinstance(v, str)
                                                  else v),
}
_STATE_FIELDS = {"status": _string, "statusDetails": _details, "versionNumber": _integer}


def _convert(raw: object, fields: dict[str, Any], where: str) -> dict[str, Any]:
    obj = _mapping(raw, where)
    out: dict[str, Any] = {}
    for key, conv in fields.items():
        if key in obj and obj[key] is not None:
            out[key] = conv(obj[key], f"{where}.{key}")
    return out


def _require(out: dict[str, Any], keys: tuple[str, ...], where: str) -> dict[str, Any]:
    """The model marks nothing required, but the service always sends these and nothing can be
    decided without them: a reply that lacks one is malformed, not a reason to guess."""
    missing = [k for k in keys if k not in out]
    if missing:
        raise InvalidResponseError(f"{where} has no {', '.join(missing)}")
    return out


def summary(raw: object, where: str = "JobExecutionSummary") -> dict[str, Any]:
    return _require(_convert(raw, _SUMMARY_FIELDS, where),
                    ("jobId", "versionNumber", "executionNumber"), where)


def execution(raw: object, where: str = "execution") -> dict[str, Any]:
    out = _require(_convert(raw, _EXECUTION_FIELDS, where),
                   ("jobId", "status", "versionNumber", "executionNumber"), where)
    if out["status"] not in STATUSES:
        raise InvalidResponseError(f"{where}.status {out['status']!r} is not a job status")
    return out


def execution_state(raw: object, where: str = "executionState") -> dict[str, Any]:
    return _require(_convert(raw, _STATE_FIELDS, where), ("status", "versionNumber"), where)


def _summaries(raw: object, where: str) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidResponseError(f"{where} must be a list, got {type(raw).__name__}")
    return [summary(item, f"{where}[{i}]") for i, item in enumerate(raw)]


def get_pending_response(payload: dict[str, Any]) -> dict[str, Any]:
    return {
        "inProgressJobs": _summaries(payload.get("inProgressJobs"), "inProgressJobs"),
        "queuedJobs": _summaries(payload.get("queuedJobs"), "queuedJobs"),
    }


def start_next_response(payload: dict[str, Any]) -> dict[str, Any]:
    """``{}`` when nothing is pending: boto3 returns no ``execution`` key either."""
    if payload.get("execution") is None:
        return {}
    return {"execution": execution(payload["execution"])}


describe_response = start_next_response


def update_response(payload: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if payload.get("executionState") is not None:
        out["executionState"] = execution_state(payload["executionState"])
    if payload.get("jobDocument") is not None:
        out["jobDocument"] = document_text(_mapping(payload["jobDocument"], "jobDocument")
                                           if not isinstance(payload["jobDocument"], str)
                                           else payload["jobDocument"])
    return out


def error_fields(payload: dict[str, Any]) -> tuple[str, str, dict[str, Any] | None]:
    """``(code, message, executionState)`` of a rejected reply."""
    code = payload.get("code")
    if not isinstance(code, str) or not code:
        raise InvalidResponseError("rejected reply has no error code")
    message = payload.get("message")
    state = payload.get("executionState")
    return (
        code,
        message if isinstance(message, str) and message else code,
        execution_state(state) if state is not None else None,
    )


def notify_event(payload: dict[str, Any]) -> dict[str, Any]:
    """A ``notify`` message: ``{"timestamp", "jobs": {"IN_PROGRESS": [...], "QUEUED": [...]}}``."""
    jobs = _mapping(payload.get("jobs", {}), "jobs")
    out_jobs: dict[str, list[dict[str, Any]]] = {}
    for status, items in jobs.items():
        if status not in STATUSES:
            raise InvalidResponseError(f"jobs has unknown status key {status!r}")
        out_jobs[status] = _summaries(items, f"jobs.{status}")
    out: dict[str, Any] = {"jobs": out_jobs}
    if "timestamp" in payload:
        out["timestamp"] = _epoch(payload["timestamp"], "timestamp")
    return out


def notify_next_event(payload: dict[str, Any]) -> dict[str, Any]:
    """A ``notify-next`` message; no ``execution`` key means nothing is pending any more."""
    out: dict[str, Any] = {}
    if "timestamp" in payload:
        out["timestamp"] = _epoch(payload["timestamp"], "timestamp")
    if payload.get("execution") is not None:
        out["execution"] = execution(payload["execution"])
    return out
