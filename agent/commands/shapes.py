"""The AWS IoT Commands device API's wire format: topics, updates, results, replies. No I/O.

A request arrives on ``$aws/commands/things/<thing>/executions/<id>/request[/json|/cbor]`` with
the command's payload as raw bytes and its metadata as MQTT 5 properties. The device answers on
``.../executions/<id>/response/json`` with ``{"status", "statusReason", "result"}`` and hears
back on ``.../response/accepted/json`` or ``.../response/rejected/json``; there is no
clientToken, so an update is matched to its reply by the execution id in the topic, and only one
update per execution may be in flight (which is also what the service asks: DataConflict).

Everything built here fits the service's model whatever a handler printed: a ``reasonCode`` of
1-64 ``[A-Z0-9_-]``, a ``reasonDescription`` of at most 1024 characters without control
characters, result names of 1-32 ``[a-zA-Z0-9_-]`` and values ``{"s": non-empty string}``,
``{"b": bool}`` or ``{"bin": base64}``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any, Final

from agent.errors import InvalidResponseError, JobsServiceError, error_from_rejection
from agent.runner import RunResult, sanitize_detail

__all__ = [
    "DEVICE_STATUSES",
    "FORMATS",
    "MAX_RESULT_TEXT",
    "TERMINAL_STATUSES",
    "final_update",
    "handler_results",
    "is_rejection",
    "parse_reply",
    "reason_code",
    "reply_filters",
    "reply_route",
    "request_filter",
    "request_route",
    "response_topic",
    "result_name",
    "result_value",
    "status_reason",
    "topic_root",
    "update",
]

DEVICE_STATUSES: Final = frozenset({"IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED",
                                    "TIMED_OUT"})
"""What a device may report (CREATED is the service's own)."""

TERMINAL_STATUSES: Final = frozenset({"SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT"})
"""Statuses after which a device sends nothing more for an execution."""

FORMATS: Final = {"json": "/json", "cbor": "/cbor", "generic": ""}
"""Request topic suffix per payload format (``commands.formats``)."""

MAX_RESULT_TEXT: Final = 4096
"""Characters of output head and tail kept in a result (AWS IoT messages are at most 128 KiB)."""

MAX_HANDLER_RESULTS: Final = 32
MAX_HANDLER_RESULT_TEXT: Final = 2048

_EXECUTION_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_REASON_CODE = re.compile(r"[A-Z0-9_-]{1,64}")
_NOT_CODE = re.compile(r"[^A-Z0-9_-]+")
_RESULT_NAME = re.compile(r"[a-zA-Z0-9_-]{1,32}")
_NOT_NAME = re.compile(r"[^a-zA-Z0-9_-]+")


def topic_root(thing: str) -> str:
    return f"$aws/commands/things/{thing}/executions/"


def request_filter(thing: str, fmt: str) -> str:
    """The subscription for one request format (``json``, ``cbor`` or ``generic``)."""
    return f"{topic_root(thing)}+/request{FORMATS[fmt]}"


def reply_filters(thing: str) -> tuple[str, str]:
    """Standing subscriptions for every execution's accepted and rejected replies."""
    return (f"{topic_root(thing)}+/response/accepted/json",
            f"{topic_root(thing)}+/response/rejected/json")


def response_topic(thing: str, execution_id: str) -> str:
    return f"{topic_root(thing)}{execution_id}/response/json"


def _split(thing: str, topic: str) -> list[str] | None:
    root = topic_root(thing)
    if not topic.startswith(root):
        return None
    parts = topic[len(root):].split("/")
    return parts if _EXECUTION_ID.fullmatch(parts[0]) else None


def request_route(thing: str, topic: str) -> tuple[str, str] | None:
    """``(executionId, format)`` of a request topic of ``thing``; None for any other topic."""
    parts = _split(thing, topic)
    if parts is None or parts[1:2] != ["request"]:
        return None
    rest = parts[2:]
    fmt = {(): "generic", ("json",): "json", ("cbor",): "cbor"}.get(tuple(rest))
    return None if fmt is None else (parts[0], fmt)


def reply_route(thing: str, topic: str) -> tuple[str, bool] | None:
    """``(executionId, accepted)`` of a reply topic of ``thing``; None for any other topic."""
    parts = _split(thing, topic)
    if parts is None or parts[1:] not in (["response", "accepted", "json"],
                                          ["response", "rejected", "json"]):
        return None
    return parts[0], parts[2] == "accepted"


# --------------------------------------------------------------------------- updates


def reason_code(text: str) -> str:
    """``text`` as a reasonCode: upper case, runs of other characters as one ``_``, 1-64."""
    code = _NOT_CODE.sub("_", text.upper()).strip("_")[:64]
    return code or "UNSPECIFIED"


def status_reason(code: str, description: str = "") -> dict[str, str]:
    """A valid ``statusReason``; an invalid ``code`` is a bug here, so it raises."""
    if not _REASON_CODE.fullmatch(code):
        raise ValueError(f"reasonCode {code!r} is not 1-64 of [A-Z0-9_-]")
    out = {"reasonCode": code}
    if text := sanitize_detail(description):
        out["reasonDescription"] = text
    return out


def update(status: str, reason: dict[str, str] | None = None,
           result: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """One UpdateCommandExecution payload (``response/json``)."""
    if status not in DEVICE_STATUSES:
        raise ValueError(f"{status!r} is not a status a device may report")
    out: dict[str, Any] = {"status": status}
    if reason:
        out["statusReason"] = reason
    if result:
        out["result"] = result
    return out


def result_name(name: object) -> str | None:
    """A handler's result name forced into ``[a-zA-Z0-9_-]{1,32}``; None if nothing is left."""
    text = _NOT_NAME.sub("_", str(name)).strip("_")[:32]
    return text or None


def result_value(value: object, limit: int = MAX_HANDLER_RESULT_TEXT) -> dict[str, Any] | None:
    """A handler's value as a result entry; None when it has none (an empty string).

    Strings become ``s`` (cut to ``limit``), booleans ``b``; ``{"s"|"b"|"bin": ...}`` passes as
    written when valid; anything else is its compact JSON text as ``s``.
    """
    if isinstance(value, bool):
        return {"b": value}
    if isinstance(value, dict) and len(value) == 1:
        (kind, item), = value.items()
        if kind == "b" and isinstance(item, bool):
            return {"b": item}
        if kind == "s" and isinstance(item, str):
            return {"s": item[:limit]} if item else None
        if kind == "bin" and isinstance(item, str) and _base64(item):
            return {"bin": item}
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"),
                                                             ensure_ascii=False)
    return {"s": text[:limit]} if text else None


def _base64(text: str) -> bool:
    try:
        return bool(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        return False


def handler_results(values: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The ``{"result": {...}}`` of one progress line, as result entries ({} for other lines).

    The runner hands progress lines over as ``{key: text}`` with non-string values as JSON
    text, so the object under ``result`` is parsed back here.
    """
    raw = values.get("result")
    if raw is None:
        return {}
    try:
        items = json.loads(raw)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(items, dict):
        return {}
    out: dict[str, dict[str, Any]] = {}
    for key, item in items.items():
        name, value = result_name(key), result_value(item)
        if name and value:
            out[name] = value
    return out


def _run_result(result: RunResult) -> dict[str, dict[str, Any]]:
    """Exit code, signal, duration and the head and tail of the output."""
    texts = {
        "exitCode": "" if result.exit_code is None else str(result.exit_code),
        "signal": "" if result.signal is None else str(result.signal),
        "durationSeconds": f"{result.duration:.3f}",
        "outputHead": result.output_head[:MAX_RESULT_TEXT],
        "outputTail": result.output_tail[-MAX_RESULT_TEXT:],
    }
    return {name: {"s": text} for name, text in texts.items() if text}


def final_update(result: RunResult, extra: dict[str, dict[str, Any]] | None = None, *,
                 interrupted: str | None = None, expired: bool = False) -> dict[str, Any]:
    """The terminal update for a handler run.

    ``extra`` are the handler's own results (at most :data:`MAX_HANDLER_RESULTS`; ours win a
    name clash). ``interrupted`` says the agent stopped the handler (FAILED INTERRUPTED);
    ``expired`` that its time limit was the execution's own timeout rather than the
    handler's (TIMED_OUT EXECUTION_TIMEOUT rather than HANDLER_TIMEOUT).
    """
    entries = dict(list((extra or {}).items())[:MAX_HANDLER_RESULTS])
    entries.update(_run_result(result))
    if interrupted is not None:
        return update("FAILED", status_reason("INTERRUPTED", interrupted), entries)
    if result.outcome == "succeeded":
        return update("SUCCEEDED", None, entries)
    if result.outcome == "timed_out":
        code = "EXECUTION_TIMEOUT" if expired else "HANDLER_TIMEOUT"
        return update("TIMED_OUT", status_reason(code, result.reason), entries)
    if result.exit_code is not None:
        code = f"HANDLER_EXIT_{result.exit_code}"
    elif result.signal is not None:
        code = f"HANDLER_SIGNAL_{result.signal}"
    else:
        code = {"not_started": "HANDLER_NOT_STARTED",
                "canceled": "HANDLER_CANCELED"}.get(result.outcome, "AGENT_ERROR")
    return update("FAILED", status_reason(code, result.reason), entries)


# --------------------------------------------------------------------------- replies


def parse_reply(topic: str, raw: bytes, accepted: bool) -> dict[str, Any]:
    """The accepted payload, or the boto3-named exception a rejected one stands for."""
    try:
        payload = json.loads(raw or b"")
    except (ValueError, RecursionError):
        raise InvalidResponseError(f"reply on {topic} is not JSON ({len(raw)} bytes)") from None
    if not isinstance(payload, dict):
        raise InvalidResponseError(f"reply on {topic} is not a JSON object")
    if accepted:
        return payload
    code, message = payload.get("error"), payload.get("errorMessage")
    raise error_from_rejection(code if isinstance(code, str) and code else "Unknown",
                               message if isinstance(message, str) else "rejected")


def is_rejection(exc: BaseException, *codes: str) -> bool:
    """Whether ``exc`` is a service rejection with one of ``codes``."""
    return isinstance(exc, JobsServiceError) and exc.code in codes
