"""boto3 as the referee of the sandbox's Commands API, and the MQTT 5 request it publishes.

Every raw answer is checked against botocore's model by ``sandbox_client``'s ``before-parse``
hook (unknown keys, types, blobs, timestamps, and error names per operation), and every error
must reach the caller as botocore's own modeled exception class.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from botocore.exceptions import ClientError

from agent.connection import Connection, Message
from agent.sandbox.stack import Stack
from tests.conftest import Thing, run
from tests.integration.test_boto3_referee import sandbox_client

pytestmark = pytest.mark.broker

DOC = json.dumps({"operation": "run-script", "args": ["x"]}).encode()


class Api:
    def __init__(self, thing: Thing) -> None:
        stack = thing.stack
        self.thing = thing
        self.iot = sandbox_client("iot", stack.control_endpoint, stack.region)
        self.data = sandbox_client("iot-jobs-data", stack.data_endpoint, stack.region)
        self.prefix = f"arn:aws:iot:{stack.region}:{stack.account_id}:"
        self.target = f"{self.prefix}thing/{thing.name}"

    def command(self, suffix: str, **kwargs: Any) -> str:
        kwargs.setdefault("payload", {"content": DOC, "contentType": "application/json"})
        return str(self.iot.create_command(commandId=self.thing.j(suffix), **kwargs)
                   ["commandArn"])

    def start(self, command_arn: str, **kwargs: Any) -> str:
        return str(self.data.start_command_execution(targetArn=self.target,
                                                     commandArn=command_arn, **kwargs)
                   ["executionId"])

    def device_update(self, execution_id: str, update: dict[str, Any]) -> None:
        topic = f"$aws/commands/things/{self.thing.name}/executions/{execution_id}/response/json"
        self.thing.emulator.call_commands(
            lambda s: s.handle(topic, json.dumps(update).encode()))


@pytest.fixture
def api(thing: Thing) -> Api:
    return Api(thing)


def strip(response: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in response.items() if k != "ResponseMetadata"}


def test_commands_round_trip(api: Api) -> None:
    iot = api.iot
    arn = api.command("rt", displayName="Round trip", description="a test",
                      tags=[{"Key": "team", "Value": "edge"}])
    command_id = api.thing.j("rt")
    assert arn == f"{api.prefix}command/{command_id}"
    got = strip(iot.get_command(commandId=command_id))
    assert got["payload"] == {"content": DOC, "contentType": "application/json"}
    assert (got["namespace"], got["displayName"], got["description"], got["deprecated"],
            got["pendingDeletion"]) == ("AWS-IoT", "Round trip", "a test", False, False)
    assert got["createdAt"].tzinfo is not None
    for n in range(3):
        api.command(f"pg{n}")
    listed = [c["commandId"] for page in iot.get_paginator("list_commands").paginate(
        PaginationConfig={"PageSize": 2}) for c in page["commands"]]
    assert {command_id, *(api.thing.j(f"pg{n}") for n in range(3))} <= set(listed)
    assert len(listed) == len(set(listed))
    updated = strip(iot.update_command(commandId=command_id, displayName="Renamed",
                                       deprecated=True))
    assert (updated["displayName"], updated["deprecated"]) == ("Renamed", True)
    with pytest.raises(api.data.exceptions.ValidationException, match="deprecated"):
        api.start(arn)
    deleted = iot.delete_command(commandId=command_id)
    assert deleted["statusCode"] == 202  # deprecated for less than 12 hours: scheduled
    assert iot.get_command(commandId=command_id)["pendingDeletion"] is True


def test_executions_round_trip(api: Api) -> None:
    iot, arn = api.iot, api.command("ex")
    token = uuid.uuid4().hex
    first = api.start(arn, executionTimeoutSeconds=60, clientToken=token)
    assert api.start(arn, executionTimeoutSeconds=60, clientToken=token) == first  # idempotent
    with pytest.raises(api.data.exceptions.ConflictException):
        api.start(arn, executionTimeoutSeconds=61, clientToken=token)
    second = api.start(arn)  # botocore makes up a clientToken: a new execution
    assert second != first

    created = strip(iot.get_command_execution(executionId=first, targetArn=api.target))
    assert (created["status"], created["executionTimeoutSeconds"], created["commandArn"],
            created["targetArn"]) == ("CREATED", 60, arn, api.target)
    assert "result" not in created and "startedAt" not in created
    with pytest.raises(iot.exceptions.ConflictException):
        iot.delete_command_execution(executionId=first, targetArn=api.target)

    api.device_update(first, {"status": "SUCCEEDED", "statusReason": {
        "reasonCode": "DONE", "reasonDescription": "all good"}, "result": {
        "exitCode": {"s": "0"}, "ok": {"b": True}, "raw": {"bin": "AAE="}}})
    done = strip(iot.get_command_execution(executionId=first, targetArn=api.target,
                                           includeResult=True))
    assert done["status"] == "SUCCEEDED"
    assert done["statusReason"] == {"reasonCode": "DONE", "reasonDescription": "all good"}
    assert done["result"] == {"exitCode": {"S": "0"}, "ok": {"B": True},
                              "raw": {"BIN": b"\x00\x01"}}
    assert {"startedAt", "completedAt", "timeToLive"} <= set(done)
    assert "result" not in iot.get_command_execution(executionId=first, targetArn=api.target,
                                                     includeResult=False)

    by_command = iot.list_command_executions(commandArn=arn)["commandExecutions"]
    assert [e["executionId"] for e in by_command] == [second, first] or \
        {e["executionId"] for e in by_command} == {first, second}  # same second: any order
    by_thing = [e["executionId"] for page in iot.get_paginator(
        "list_command_executions").paginate(targetArn=api.target,
                                            PaginationConfig={"PageSize": 1})
        for e in page["commandExecutions"]]
    assert sorted(by_thing) == sorted([first, second])
    succeeded = iot.list_command_executions(targetArn=api.target, status="SUCCEEDED")
    assert [e["executionId"] for e in succeeded["commandExecutions"]] == [first]
    assert succeeded["commandExecutions"][0]["commandArn"] == arn
    assert iot.list_command_executions(targetArn=api.target, completedTimeFilter={
        "before": "2000-01-01T00:00"})["commandExecutions"] == []

    iot.delete_command_execution(executionId=first, targetArn=api.target)
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.get_command_execution(executionId=first, targetArn=api.target)


def _other_thing_arn(api: Api) -> str:
    return f"{api.prefix}thing/{api.thing.name[:100]}-none"


ERRORS: dict[str, tuple[str, str, Callable[[Api], Any], str]] = {
    # case: (client, exception, call, words the message must contain)
    "get_command of an unknown command": (
        "iot", "ResourceNotFoundException",
        lambda api: api.iot.get_command(commandId=api.thing.j("none")), "does not exist"),
    "create_command with an id in use": (
        "iot", "ConflictException", lambda api: api.command("dup") and api.command("dup"),
        "already exists"),
    "create_command with a payload template": (
        "iot", "ValidationException",
        lambda api: api.iot.create_command(commandId=api.thing.j("t"), payloadTemplate="{}"),
        "payloadTemplate"),
    "create_command with a preprocessor": (
        "iot", "ValidationException",
        lambda api: api.command("p", preprocessor={"awsJsonSubstitution": {
            "outputFormat": "JSON"}}), "preprocessor"),
    "create_command with mandatory parameters": (
        "iot", "ValidationException",
        lambda api: api.command("m", mandatoryParameters=[{"name": "x"}]),
        "mandatoryParameters"),
    "create_command for FleetWise": (
        "iot", "ValidationException", lambda api: api.command("f", namespace="AWS-IoT-FleetWise"),
        "AWS-IoT-FleetWise"),
    "create_command without a payload": (
        "iot", "ValidationException",
        lambda api: api.iot.create_command(commandId=api.thing.j("np")), "payload"),
    "start on an unknown thing": (
        "data", "ResourceNotFoundException",
        lambda api: api.data.start_command_execution(
            targetArn=_other_thing_arn(api), commandArn=api.command("s1")), "does not exist"),
    "start on a bare MQTT client": (
        "data", "ValidationException",
        lambda api: api.data.start_command_execution(
            targetArn=f"{api.prefix}client/{api.thing.name}", commandArn=api.command("s2")),
        "MQTT clients"),
    "start in another account": (
        "data", "ValidationException",
        lambda api: api.data.start_command_execution(
            targetArn=f"arn:aws:iot:us-east-1:999999999999:thing/{api.thing.name}",
            commandArn=api.command("s3")), "not a thing ARN"),
    "start an unknown command": (
        "data", "ResourceNotFoundException",
        lambda api: api.start(f"{api.prefix}command/{api.thing.j('none')}"), "does not exist"),
    "start with parameters": (
        "data", "ValidationException",
        lambda api: api.start(api.command("s4"), parameters={"x": {"S": "y"}}), "parameters"),
    "get_command_execution for another target": (
        "iot", "ResourceNotFoundException",
        lambda api: api.iot.get_command_execution(executionId=api.start(api.command("g")),
                                                  targetArn=_other_thing_arn(api)),
        "no execution"),
    "list_command_executions with both ARNs": (
        "iot", "ValidationException",
        lambda api: api.iot.list_command_executions(targetArn=api.target,
                                                    commandArn=api.command("l1")),
        "exactly one"),
    "list_command_executions with both time filters": (
        "iot", "ValidationException",
        lambda api: api.iot.list_command_executions(
            targetArn=api.target, startedTimeFilter={"after": "2024-01-01T00:00"},
            completedTimeFilter={"after": "2024-01-01T00:00"}), "at most one"),
    "list_command_executions with a malformed time": (
        "iot", "ValidationException",
        lambda api: api.iot.list_command_executions(
            targetArn=api.target, startedTimeFilter={"after": "yesterday"}), "yyyy-MM-dd"),
    "delete_command of an unknown command": (
        "iot", "ValidationException",
        lambda api: api.iot.delete_command(commandId=api.thing.j("none")), "does not exist"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_boto3s_modeled_exceptions(api: Api, case: str) -> None:
    which, expected, call, words = ERRORS[case]
    client = api.iot if which == "iot" else api.data
    with pytest.raises(ClientError) as info:
        call(api)
    assert info.value.response["Error"]["Code"] == expected
    assert isinstance(info.value, getattr(client.exceptions, expected))
    assert words in info.value.response["Error"]["Message"]


def test_the_request_carries_content_type_and_expiry_over_mqtt5(stack: Stack, api: Api) -> None:
    """A raw MQTT 5 client as the thing: the request is the payload, its metadata properties."""
    config = api.thing.config

    async def body() -> list[Message]:
        received: list[Message] = []
        arrived = asyncio.Event()
        connection = Connection(config.mqtt, config.client_id)

        def got(message: Message) -> None:
            received.append(message)
            arrived.set()

        connection.route("$aws/commands/", got)
        async with connection:
            root = f"$aws/commands/things/{api.thing.name}/executions/+/request"
            await connection.subscribe(f"{root}/json", f"{root}/cbor", root)
            for suffix, kind in (("j", "application/json"), ("c", "application/cbor"),
                                 ("o", "application/octet-stream")):
                arn = api.command(suffix, payload={"content": b"\x01" + DOC, "contentType": kind})
                await asyncio.to_thread(api.start, arn, executionTimeoutSeconds=42)
            while len(received) < 3:
                arrived.clear()
                await asyncio.wait_for(arrived.wait(), 10)
        return received

    messages = run(body())
    assert [m.topic.rsplit("/request", 1)[1] for m in messages] == ["/json", "/cbor", ""]
    assert [m.content_type for m in messages] == ["application/json", "application/cbor",
                                                  "application/octet-stream"]
    for message in messages:
        assert message.payload == b"\x01" + DOC
        assert message.message_expiry is not None and 40 <= message.message_expiry <= 42
