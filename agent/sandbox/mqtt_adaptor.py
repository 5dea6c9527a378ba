"""The services' MQTT adaptors: one device publish in, the publishes to send back out. Pure,
like the services whose public device methods they call (the HTTP data plane calls the same
ones).

Jobs (:func:`handle`, ``$aws/things/<thing>/jobs/...``): what only MQTT does lives here: routing
by topic (``InvalidTopic``), the JSON payload (``InvalidJson``; an empty one is ``{}``), the
echoed ``clientToken``, the ``timestamp``, the ``accepted``/``rejected`` reply topic, and the
execution without ``thingName``.

Commands (:func:`handle_commands`, ``$aws/commands/things/<thing>/executions/<id>/response/json``):
the execution id from the topic (``InvalidTopic``), the UTF-8 JSON payload (``InvalidJson``; no
NaN or Infinity), and the reply on ``.../response/accepted/json`` or ``.../rejected/json`` naming
the execution (Commands has no clientToken).
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any, Final

from agent.sandbox import _validate as check
from agent.sandbox._validate import Rejection
from agent.sandbox.records import Message, Publish, mqtt_execution

if TYPE_CHECKING:
    from agent.sandbox.commands import CommandsService
    from agent.sandbox.service import JobsService

__all__ = ["handle", "handle_commands"]

_EXECUTION_ID: Final = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def handle(service: JobsService, topic: str, payload: bytes) -> list[Publish]:
    """Answer one device publish: the reply on ``<topic>/accepted|rejected`` first, then any
    notify and notify-next it caused. Topics the service publishes itself and topics outside
    ``$aws/things/+/jobs/`` get no answer (``[]``)."""
    target = check.route(topic)
    if target is None:
        return []
    thing, operation = target.thing_name, target.operation
    refused: Rejection | None = None
    try:
        request = check.parse_request(payload)
    except Rejection as rejection:
        request, refused = {}, rejection
    # Echoed verbatim even when it is not a string (then the request is InvalidRequest).
    echo = {"clientToken": request["clientToken"]} if "clientToken" in request else {}
    if operation is None:  # InvalidTopic wins over InvalidJson: the topic is read first
        refused = Rejection("InvalidTopic", f"topic {topic} maps to no Jobs API")
    if refused is not None:
        service.refused(thing, operation or "unknown", refused.to_payload())
        return [_reply(service, topic, refused.to_payload() | echo, accepted=False)]
    assert operation is not None  # answered with InvalidTopic above
    try:
        response, publishes = service.serve(
            thing, operation, lambda: _dispatch(service, operation, target, request))
    except Rejection as rejection:
        return [_reply(service, topic, rejection.to_payload() | echo, accepted=False)]
    if "execution" in response:
        response = {**response, "execution": mqtt_execution(response["execution"])}
    return [_reply(service, topic, response | echo, accepted=True), *publishes]


def _dispatch(service: JobsService, operation: str, target: check.Route,
              request: dict[str, Any]) -> tuple[dict[str, Any], list[Publish]]:
    """Call the device method a routed MQTT request names, with its payload as arguments."""
    thing, job_id = target.thing_name, target.job_id or ""
    kwargs = check.request_kwargs(operation, request)
    if operation == "get":
        return service.get_pending(thing), []
    if operation == "start-next":
        return service.start_next(thing, **kwargs)
    if operation == "describe":
        return service.describe_execution(thing, job_id, **kwargs), []
    return service.update_execution(thing, job_id, **kwargs)


def _reply(service: JobsService, topic: str, body: dict[str, Any], *, accepted: bool) -> Publish:
    suffix = "/accepted" if accepted else "/rejected"
    return Publish(topic + suffix, {**body, "timestamp": service.timestamp()})


# --------------------------------------------------------------------------- AWS IoT Commands


def handle_commands(service: CommandsService, topic: str, payload: bytes) -> list[Message]:
    """Answer a device's UpdateCommandExecution with its accepted or rejected reply (``[]`` for
    topics that are not updates, such as the service's own replies)."""
    parts = topic.split("/")
    if len(parts) != 8 or parts[:3] != ["$aws", "commands", "things"] \
            or parts[4] != "executions" or parts[6:] != ["response", "json"]:
        return []
    thing, execution_id = parts[3], parts[5]
    base = "/".join(parts[:7])
    try:
        service.serve(thing, execution_id, lambda: _read_update(execution_id, payload))
    except Rejection as rejection:
        body = {"error": rejection.code, "errorMessage": rejection.message,
                "executionId": execution_id}
        return [Message(f"{base}/rejected/json", json.dumps(body).encode())]
    return [Message(f"{base}/accepted/json", json.dumps({"executionId": execution_id}).encode())]


def _read_update(execution_id: str, payload: bytes) -> Any:
    if not _EXECUTION_ID.fullmatch(execution_id):
        raise Rejection("InvalidTopic", f"{execution_id!r} is not an execution id")
    try:
        return json.loads(payload.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise Rejection("InvalidJson", "the update is not UTF-8 JSON") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
