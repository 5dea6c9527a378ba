"""AWS IoT Commands over the sandbox's HTTP fronts, for ``boto3.client("iot")`` and
``boto3.client("iot-jobs-data")``.

The ``iot`` control plane gains ``create_command``, ``get_command``, ``list_commands``,
``update_command``, ``delete_command``, ``get_command_execution``, ``list_command_executions``
and ``delete_command_execution``; the ``iot-jobs-data`` data plane gains
``start_command_execution``, whose request the emulator publishes to the device over MQTT 5.
Every call runs on the emulator's thread (:meth:`Emulator.call_commands`), against the same
:class:`~agent.sandbox.commands.CommandsService` the device's updates reach.

Shapes follow botocore's models: commands and targets are ARNs
(``arn:aws:iot:<region>:<account>:command/<id>``, ``...:thing/<name>``), a payload's ``content``
and a result's ``BIN`` are base64 (botocore's blobs), times are epoch seconds, and the errors are
the Commands operations' own (``ValidationException``, ``ConflictException``...). A target that
is a bare MQTT client (``...:client/<id>``) is refused by name: the sandbox's devices are things.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Final

from agent.sandbox.commands import CommandsService, Message, parse_time_filter
from agent.sandbox.emulator import Emulator
from agent.sandbox.http import Reply, Request, Route, page, query_bool
from agent.sandbox.service import Rejection

__all__ = ["command_routes", "start_route"]

ERRORS: Final = {
    "InvalidRequest": ("ValidationException", 400),
    "InvalidJson": ("ValidationException", 400),
    "ResourceNotFound": ("ResourceNotFoundException", 404),
    "Conflict": ("ConflictException", 409),
    "RequestThrottled": ("ThrottlingException", 400),  # the iot model's status
    "InternalError": ("InternalServerException", 500),
    "ServiceQuotaExceeded": ("ServiceQuotaExceededException", 402),
}
"""Service code -> (exception, status) of the Commands operations, from botocore's models."""

DATA_ERRORS: Final = {**ERRORS, "RequestThrottled": ("ThrottlingException", 429)}

_BASE: Final = frozenset({"ValidationException", "ThrottlingException",
                          "InternalServerException"})
_FOUND: Final = _BASE | {"ResourceNotFoundException"}


class _Arns:
    """Commands and things as ARNs of this sandbox's region and account."""

    def __init__(self, region: str, account_id: str) -> None:
        self.prefix = f"arn:aws:iot:{region}:{account_id}:"

    def command(self, command_id: str) -> str:
        return f"{self.prefix}command/{command_id}"

    def thing(self, name: str) -> str:
        return f"{self.prefix}thing/{name}"

    def _parse(self, arn: object, kind: str, member: str) -> str:
        if not isinstance(arn, str) or not arn:
            raise Rejection("InvalidRequest", f"{member} is required")
        if arn.startswith(f"{self.prefix}{kind}/"):
            return arn[len(self.prefix) + len(kind) + 1:]
        if kind == "thing" and arn.startswith(f"{self.prefix}client/"):
            raise Rejection("InvalidRequest", f"{member} {arn}: the sandbox targets things, "
                            "not bare MQTT clients")
        raise Rejection("InvalidRequest", f"{member} {arn!r} is not a {kind} ARN of this "
                        f"sandbox ({self.prefix}{kind}/<id>)")

    def command_id(self, arn: object, member: str = "commandArn") -> str:
        return self._parse(arn, "command", member)

    def thing_name(self, arn: object, member: str = "targetArn") -> str:
        return self._parse(arn, "thing", member)


def _blob(text: object, member: str) -> bytes:
    """A blob member as botocore sends it: base64 text."""
    if not isinstance(text, str):
        raise Rejection("InvalidRequest", f"{member} must be base64 bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise Rejection("InvalidRequest", f"{member} is not valid base64") from None


def _execution(arns: _Arns, execution: dict[str, Any]) -> dict[str, Any]:
    """A service execution with ARNs in place of ids, in the model's member order."""
    out = {"executionId": execution.pop("executionId"),
           "commandArn": arns.command(execution.pop("commandId")),
           "targetArn": arns.thing(execution.pop("thing"))}
    out.update(execution)
    return out


def command_routes(emulator: Emulator, region: str, account_id: str) -> list[Route]:
    """The control plane's Commands operations."""
    arns = _Arns(region, account_id)

    def call(fn: Any) -> Any:
        return emulator.call_commands(fn)

    def create(request: Request) -> dict[str, Any]:
        command_id, body = request.path["commandId"], dict(request.body)
        payload = body.pop("payload", None)
        if isinstance(payload, dict) and "content" in payload:
            payload = {**payload, "content": _blob(payload["content"], "payload.content")}
        kwargs = {"payload": payload, "namespace": body.pop("namespace", None),
                  "display_name": body.pop("displayName", None),
                  "description": body.pop("description", None), "tags": body.pop("tags", None),
                  **body}
        call(lambda s: s.create_command(command_id, **kwargs))
        return {"commandId": command_id, "commandArn": arns.command(command_id)}

    def get(request: Request) -> dict[str, Any]:
        command = call(lambda s: s.get_command(request.path["commandId"]))
        payload = command.pop("payload")
        payload["content"] = base64.b64encode(payload["content"]).decode()
        out = {"commandId": command.pop("commandId"),
               "commandArn": arns.command(request.path["commandId"])}
        out.update(command)
        out["payload"] = payload
        return out

    def listing(request: Request) -> dict[str, Any]:
        namespace, order = request.query.get("namespace"), request.query.get("sortOrder")
        commands = call(lambda s: s.list_commands(namespace=namespace, sort_order=order))
        if request.query.get("commandParameterName") is not None:
            commands = []  # static payloads have no parameters
        summaries = [{"commandArn": arns.command(c["commandId"]), **c} for c in commands]
        return page(summaries, request, "commands", default=25, most=100)

    def update(request: Request) -> dict[str, Any]:
        body = request.body
        return call(lambda s: s.update_command(
            request.path["commandId"], display_name=body.get("displayName"),
            description=body.get("description"), deprecated=body.get("deprecated")))

    def delete(request: Request) -> Reply:
        return Reply(call(lambda s: s.delete_command(request.path["commandId"])))

    def get_execution(request: Request) -> dict[str, Any]:
        execution_id = request.path["executionId"]
        thing = arns.thing_name(request.query.get("targetArn"))
        include = query_bool(request, "includeResult")
        execution = call(lambda s: s.get_execution(
            execution_id, thing, include_result=include is not False))
        return _execution(arns, execution)

    def list_executions(request: Request) -> dict[str, Any]:
        body = request.body
        command_id = None if body.get("commandArn") is None else arns.command_id(
            body["commandArn"])
        thing = None if body.get("targetArn") is None else arns.thing_name(body["targetArn"])
        started = parse_time_filter(body.get("startedTimeFilter"), "startedTimeFilter")
        completed = parse_time_filter(body.get("completedTimeFilter"), "completedTimeFilter")

        def run(s: CommandsService) -> list[dict[str, Any]]:
            if body.get("namespace") == "AWS-IoT-FleetWise":
                return []
            return s.list_executions(command_id=command_id, thing=thing,
                                     status=body.get("status"), sort_order=body.get("sortOrder"),
                                     started=started, completed=completed)

        summaries = [_execution(arns, e) for e in call(run)]
        return page(summaries, request, "commandExecutions", default=25, most=100)

    def delete_execution(request: Request) -> None:
        thing = arns.thing_name(request.query.get("targetArn"))
        call(lambda s: s.delete_execution(request.path["executionId"], thing))

    q = frozenset
    paging = q({"maxResults", "nextToken"})
    return [
        Route("PUT", "/commands/{commandId}", create, errors=_BASE | {
            "ConflictException", "ServiceQuotaExceededException"}, error_map=ERRORS, body=q({
                "namespace", "displayName", "description", "payload", "payloadTemplate",
                "preprocessor", "mandatoryParameters", "roleArn", "tags"})),
        Route("GET", "/commands/{commandId}", get, errors=_FOUND, error_map=ERRORS),
        Route("GET", "/commands", listing, errors=_BASE, error_map=ERRORS,
              query=paging | {"namespace", "commandParameterName", "sortOrder"}),
        Route("PATCH", "/commands/{commandId}", update, errors=_FOUND | {"ConflictException"},
              error_map=ERRORS, body=q({"displayName", "description", "deprecated"})),
        Route("DELETE", "/commands/{commandId}", delete, errors=_BASE | {"ConflictException"},
              error_map={**ERRORS, "ResourceNotFound": ("ValidationException", 400)}),
        Route("GET", "/command-executions/{executionId}", get_execution, errors=_FOUND,
              error_map=ERRORS, query=q({"targetArn", "includeResult"})),
        Route("POST", "/command-executions", list_executions, errors=_FOUND, error_map=ERRORS,
              query=paging, body=q({"namespace", "status", "sortOrder", "startedTimeFilter",
                                    "completedTimeFilter", "targetArn", "commandArn"})),
        Route("DELETE", "/command-executions/{executionId}", delete_execution,
              errors=_BASE | {"ConflictException"},
              error_map={**ERRORS, "ResourceNotFound": ("ValidationException", 400)},
              query=q({"targetArn"})),
    ]


def start_route(emulator: Emulator, region: str, account_id: str) -> Route:
    """The data plane's StartCommandExecution: the request goes out over MQTT at once."""
    arns = _Arns(region, account_id)

    def start(request: Request) -> dict[str, Any]:
        body = request.body
        command_id = arns.command_id(body.get("commandArn"))
        thing = arns.thing_name(body.get("targetArn"))

        def run(s: CommandsService) -> tuple[str, list[Message]]:
            return s.start_execution(command_id, thing,
                                     timeout=body.get("executionTimeoutSeconds"),
                                     client_token=body.get("clientToken"),
                                     parameters=body.get("parameters"))

        execution_id, _ = emulator.call_commands(run)
        return {"executionId": execution_id}

    return Route("POST", "/command-executions", start, error_map=DATA_ERRORS,
                 errors=_FOUND | {"ConflictException", "ServiceQuotaExceededException"},
                 body=frozenset({"targetArn", "commandArn", "parameters",
                                 "executionTimeoutSeconds", "clientToken"}))
