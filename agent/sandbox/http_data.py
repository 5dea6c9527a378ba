"""The ``iot-jobs-data`` data plane over plain HTTP, for ``boto3.client("iot-jobs-data")``
(plus Commands' ``start_command_execution``, from :mod:`agent.sandbox.http_commands`).

The four device operations of botocore's model (``jobs-mqtt-api.md`` section 1.6), answered by
the same :class:`JobsService` methods the MQTT front calls, on the emulator's thread: an HTTP
``start_next_pending_job_execution`` claims the very execution an MQTT device would see claimed,
fires the same ``notify``/``notify-next``, and obeys the same injected faults.

What differs from MQTT is only what AWS makes differ: responses carry no ``timestamp`` and no
``clientToken``, an execution carries its ``thingName`` (MQTT's does not: the topic names the
thing), and ``jobDocument`` is a string (the compact JSON that
:func:`agent.jobs.shapes.document_text` produces, so an HTTP answer and the agent's converted MQTT
answer compare equal). ``approximateSecondsBeforeTimedOut``, which only the HTTP model has, is
not sent: the service does not expose it and the MQTT replies, which HTTP must equal, lack it.

Error codes map to the model's exceptions and statuses. ``VersionMismatch`` has no exception in the
data plane model; UpdateJobExecution's only 409 is ``InvalidStateTransitionException``, so a
version mismatch goes out as that, with the message starting ``VersionMismatch:`` and, as for a
real invalid transition, the current ``executionState`` in the body (botocore does not surface
that member; a client that needs it describes the execution).
"""

from __future__ import annotations

from typing import Any, Final

from agent.sandbox import _validate as check
from agent.sandbox.emulator import Emulator
from agent.sandbox.http import HttpFront, Request, Route, query_bool, query_int
from agent.sandbox.http_commands import start_route
from agent.sandbox.http_control import ACCOUNT_ID, REGION

__all__ = ["ERRORS", "data_plane"]

ERRORS: Final = {
    "InvalidRequest": ("InvalidRequestException", 400),
    "InvalidJson": ("InvalidRequestException", 400),
    "InvalidTopic": ("InvalidRequestException", 400),
    "ResourceNotFound": ("ResourceNotFoundException", 404),
    "RequestThrottled": ("ThrottlingException", 429),
    "InternalError": ("ServiceUnavailableException", 503),
    "TerminalStateReached": ("TerminalStateException", 410),
    "InvalidStateTransition": ("InvalidStateTransitionException", 409),
    "VersionMismatch": ("InvalidStateTransitionException", 409),
}
"""Service code -> (exception, status), from botocore's ``iot-jobs-data`` model."""


def _execution(response: dict[str, Any]) -> dict[str, Any]:
    """``{"execution": ...}`` with the document as boto3's string; ``{}`` stays ``{}``."""
    if "execution" not in response:
        return response
    execution = dict(response["execution"])
    if "jobDocument" in execution:
        execution["jobDocument"] = execution["jobDocument"].text
    return {"execution": execution}


def data_plane(emulator: Emulator, *, region: str = REGION,
               account_id: str = ACCOUNT_ID) -> HttpFront:
    """The data plane's routes over ``emulator``'s service; start it with ``.start(port)``."""

    def get_pending(request: Request) -> dict[str, Any]:
        thing = request.path["thingName"]
        return emulator.call(lambda s: s.get_pending(thing))

    def start_next(request: Request) -> dict[str, Any]:
        thing = request.path["thingName"]
        kwargs = check.request_kwargs("start-next", request.body)
        response, _ = emulator.call(lambda s: s.start_next(thing, **kwargs))
        return _execution(response)

    def describe(request: Request) -> dict[str, Any]:
        thing, job_id = request.path["thingName"], request.path["jobId"]
        number = query_int(request, "executionNumber")
        include = query_bool(request, "includeJobDocument")
        response = emulator.call(lambda s: s.describe_execution(
            thing, job_id, execution_number=number,
            include_job_document=True if include is None else include))
        return _execution(response)

    def update(request: Request) -> dict[str, Any]:
        thing, job_id = request.path["thingName"], request.path["jobId"]
        kwargs = check.request_kwargs("update", request.body)
        response, _ = emulator.call(lambda s: s.update_execution(thing, job_id, **kwargs))
        if "jobDocument" in response:
            response = {**response, "jobDocument": response["jobDocument"].text}
        return response

    # No per-operation error sets: every code reaches boto3 under the name the service model
    # gives it, so an injected fault (any code, on any operation) reads as it does over MQTT.
    routes = [
        Route("GET", "/things/{thingName}/jobs", get_pending),
        Route("PUT", "/things/{thingName}/jobs/$next", start_next,
              body=frozenset({"statusDetails", "stepTimeoutInMinutes"})),
        Route("GET", "/things/{thingName}/jobs/{jobId}", describe,
              query=frozenset({"executionNumber", "includeJobDocument"})),
        Route("POST", "/things/{thingName}/jobs/{jobId}", update,
              body=frozenset({"status", "statusDetails", "stepTimeoutInMinutes",
                              "expectedVersion", "includeJobExecutionState",
                              "includeJobDocument", "executionNumber"})),
        start_route(emulator, region, account_id),  # AWS IoT Commands
    ]
    return HttpFront("iot-jobs-data", routes, ERRORS,
                     internal=("ServiceUnavailableException", 503))
