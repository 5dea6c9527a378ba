"""The Jobs service's MQTT adaptor: one device publish on ``$aws/things/<thing>/jobs/...`` in, the
publishes to send back out. Pure, like :class:`~agent.sandbox.service.JobsService` whose public
device methods it calls (the HTTP data plane calls the same ones).

What only MQTT does lives here: routing by topic (``InvalidTopic``), the JSON payload
(``InvalidJson``; an empty one is ``{}``), the echoed ``clientToken``, the ``timestamp``, the
``accepted``/``rejected`` reply topic, and the execution without ``thingName``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent.sandbox import _validate as check
from agent.sandbox._validate import Rejection
from agent.sandbox.records import Publish, mqtt_execution

if TYPE_CHECKING:
    from agent.sandbox.service import JobsService

__all__ = ["handle"]


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
