"""boto3 as the referee: the sandbox's HTTP planes, parsed by botocore with AWS's own models.

Two claims are checked here, against the real broker, emulator and HTTP fronts of the session
stack:

* the agent's MQTT client and ``boto3.client("iot-jobs-data")`` over HTTP return *equal*
  structures (ResponseMetadata aside) for the same state, for a matrix of states and errors, so
  the MQTT conversion in ``agent.jobs.shapes`` is exactly what boto3 hands out. One key differs
  by design: an execution over MQTT carries no ``thingName`` (AWS's captures: the topic names
  the thing), over HTTP it does, so the comparison drops it from the HTTP side after checking
  it names the thing asked about (:func:`mqtt_view`);
* ``boto3.client("iot")`` round-trips the control plane, every answer raising botocore's own
  modeled exceptions on error.

botocore's parser silently drops keys its model does not know, so "boto3 did not complain" is
not enough: every raw response body is also checked against the operation's output shape
(:func:`wire_problems`, hooked on ``before-parse``), and every error against the exceptions the
model lists.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import botocore.session
import pytest
import yaml
from botocore.config import Config
from botocore.exceptions import ClientError

from agent.config import load_config
from agent.errors import ConflictException, JobsServiceError
from agent.jobs import JobsClient
from agent.sandbox.stack import Stack
from tests.conftest import Thing, boto3_shape_errors, broad_jobs_policy, open_client, run

pytestmark = pytest.mark.broker

DOC = {"operation": "run-script", "args": ["--fast"], "nested": {"ünïcode": [1, 2.5, None]}}
ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
_MODELS = botocore.session.get_session()


# --------------------------------------------------------------------------- the wire referee


def wire_problems(shape: Any, value: Any, where: str) -> list[str]:
    """Why ``value`` (decoded JSON from the wire) is not ``shape``; [] when it is.

    Stricter than botocore's parser: unknown keys and nulls are problems, timestamps must be
    epoch seconds (numbers, not milliseconds), longs must be integers, enums must match.
    """
    kind = shape.type_name
    if value is None:
        return [f"{where}: null"]
    if kind == "structure":
        if not isinstance(value, dict):
            return [f"{where}: not an object"]
        problems = [f"{where}.{k}: not in the model" for k in value if k not in shape.members]
        problems += [f"{where}.{k}: required" for k in shape.required_members if k not in value]
        for key, item in value.items():
            if key in shape.members:
                problems += wire_problems(shape.members[key], item, f"{where}.{key}")
        return problems
    if kind == "list":
        if not isinstance(value, list):
            return [f"{where}: not a list"]
        return [p for i, item in enumerate(value)
                for p in wire_problems(shape.member, item, f"{where}[{i}]")]
    if kind == "map":
        if not isinstance(value, dict):
            return [f"{where}: not an object"]
        return [p for key, item in value.items()
                for p in wire_problems(shape.key, key, f"{where} key")
                + wire_problems(shape.value, item, f"{where}[{key!r}]")]
    if kind == "string":
        if not isinstance(value, str):
            return [f"{where}: not a string"]
        return [f"{where}: {value!r} not in {shape.enum}"] if shape.enum and \
            value not in shape.enum else []
    if kind in ("integer", "long"):
        ok = isinstance(value, int) and not isinstance(value, bool)
        return [] if ok else [f"{where}: not an integer"]
    if kind == "boolean":
        return [] if isinstance(value, bool) else [f"{where}: not a boolean"]
    if kind == "double":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return [] if ok else [f"{where}: not a number"]
    if kind == "blob":  # rest-json carries bytes as base64 text
        try:
            base64.b64decode(value, validate=True)
        except (TypeError, ValueError):
            return [f"{where}: not base64"]
        return []
    if kind == "timestamp":
        ok = isinstance(value, int | float) and not isinstance(value, bool) and value < 1e11
        return [] if ok else [f"{where}: not epoch seconds"]
    return [f"{where}: unexpected model type {kind}"]


def _referee(operation_model: Any, response_dict: dict[str, Any], **_: Any) -> None:
    """``before-parse`` hook: the raw answer must be exactly the model's, errors included."""
    status, headers, body = (response_dict["status_code"], response_dict["headers"],
                             response_dict["body"])
    name = operation_model.name
    if status >= 300:
        code = headers.get("x-amzn-ErrorType")
        error = json.loads(body)
        assert isinstance(error.get("message"), str) and error["message"], (name, error)
        service = operation_model.service_model
        if service.service_name == "iot":  # per operation, as the model lists them
            modeled = {shape.name for shape in operation_model.error_shapes}
        else:  # injected faults may use any of the service's exceptions on any operation
            modeled = {shape.name for shape in service.error_shapes} | {"SomethingNewFromAws"}
        assert code in modeled, f"{name} answered {code}, not one of {sorted(modeled)}"
        return
    shape = operation_model.output_shape
    in_body = shape is not None and any("location" not in member.serialization
                                        for member in shape.members.values())
    if not in_body:  # no output, or only the status code (DeleteCommand)
        assert body == b"", f"{name} has no output body but answered {body!r}"
        return
    problems = wire_problems(shape, json.loads(body), name)
    assert not problems, "\n".join(problems)


def sandbox_client(service: str, endpoint: str, region: str) -> Any:
    """A boto3 client for the sandbox: fake keys as arguments, no retries, no proxy."""
    client = boto3.client(service, endpoint_url=endpoint, region_name=region,
                          aws_access_key_id="sandbox", aws_secret_access_key="sandbox",
                          # total_max_attempts counts the first try: no retries at all
                          # (botocore turns max_attempts=N into N + 1 attempts).
                          config=Config(retries={"total_max_attempts": 1}, proxies={}))
    client.meta.events.register("before-parse", _referee)
    return client


def strip(response: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in response.items() if k != "ResponseMetadata"}


def mqtt_view(answer: dict[str, Any], thing: str) -> dict[str, Any]:
    """An HTTP data plane answer as MQTT carries it: its execution without ``thingName``
    (which must name ``thing``; MQTT's never has one)."""
    if "execution" not in answer:
        return answer
    execution = dict(answer["execution"])
    assert execution.pop("thingName") == thing
    return {**answer, "execution": execution}


@dataclass
class Sandbox:
    """One test's thing plus both boto3 clients, with the few helpers every case needs."""

    thing: Thing
    iot: Any
    data: Any

    @property
    def name(self) -> str:
        return self.thing.name

    def arn(self, thing: str | None = None) -> str:
        stack = self.thing.stack
        return f"arn:aws:iot:{stack.region}:{stack.account_id}:thing/{thing or self.name}"

    def job(self, suffix: str, *, start: bool = False, doc: dict[str, Any] = DOC) -> str:
        """Create a job for this thing through boto3; ``start`` claims the head over HTTP."""
        job_id = self.thing.j(suffix)
        self.iot.create_job(jobId=job_id, targets=[self.arn()], document=json.dumps(doc))
        if start:
            self.data.start_next_pending_job_execution(thingName=self.name)
        return job_id

    def update(self, job_id: str, status: str, **kwargs: Any) -> dict[str, Any]:
        return self.data.update_job_execution(jobId=job_id, thingName=self.name, status=status,
                                              **kwargs)


@pytest.fixture
def sb(thing: Thing, iot: Any, data: Any) -> Sandbox:
    return Sandbox(thing, iot, data)


# --------------------------------------------------------------------------- the state matrix


def _queued(sb: Sandbox) -> None:
    for i in range(3):
        sb.job(f"q{i}", doc={**DOC, "n": i})


def _queued_and_in_progress(sb: Sandbox) -> None:
    _queued(sb)
    sb.data.start_next_pending_job_execution(thingName=sb.name, statusDetails={"step": "1"},
                                             stepTimeoutInMinutes=5)


def _two_in_progress(sb: Sandbox) -> None:
    """A second execution started by update, not start-next: IN_PROGRESS keeps queue order."""
    _queued_and_in_progress(sb)
    sb.update(sb.thing.j("q2"), "IN_PROGRESS", statusDetails={"progress": "50"})


def _more_than_ten(sb: Sandbox) -> None:
    for i in range(12):
        sb.thing.emulator.create_job(sb.thing.j(f"m{i:02d}"), [sb.name], DOC)  # either front
    sb.data.start_next_pending_job_execution(thingName=sb.name)


def _after_cancel(sb: Sandbox) -> None:
    _queued_and_in_progress(sb)
    sb.iot.cancel_job(jobId=sb.thing.j("q1"))
    sb.iot.cancel_job_execution(jobId=sb.thing.j("q0"), thingName=sb.name, force=True)


def _after_delete(sb: Sandbox) -> None:
    _queued_and_in_progress(sb)
    sb.job("q3")
    sb.iot.delete_job(jobId=sb.thing.j("q0"), force=True)
    sb.update(sb.thing.j("q1"), "FAILED", statusDetails={"reason": "x"})
    sb.iot.delete_job_execution(jobId=sb.thing.j("q1"), thingName=sb.name, executionNumber=1)


def _all_ended(sb: Sandbox) -> None:
    _queued(sb)
    sb.update(sb.thing.j("q0"), "SUCCEEDED")
    sb.update(sb.thing.j("q1"), "REJECTED", statusDetails={"reason": "no handler"})
    sb.iot.cancel_job(jobId=sb.thing.j("q2"))


STATES: dict[str, tuple[Callable[[Sandbox], None], int, int]] = {
    # name: (set-up, IN_PROGRESS listed, QUEUED listed)
    "no jobs": (lambda sb: None, 0, 0),
    "only queued": (_queued, 0, 3),
    "queued and in progress": (_queued_and_in_progress, 1, 2),
    "two in progress, with and without startedAt": (_two_in_progress, 2, 1),
    "more than ten pending": (_more_than_ten, 1, 9),
    "after cancel": (_after_cancel, 0, 1),
    "after delete": (_after_delete, 0, 2),
    "all ended": (_all_ended, 0, 0),
}


def _reads(sb: Sandbox) -> list[tuple[str, dict[str, Any]]]:
    """Every device read to compare: the pending list, ``$next`` and each execution three ways."""
    listed = sb.iot.list_job_executions_for_thing(thingName=sb.name)["executionSummaries"]
    calls: list[tuple[str, dict[str, Any]]] = [
        ("get_pending_job_executions", {"thingName": sb.name}),
        ("describe_job_execution", {"thingName": sb.name, "jobId": "$next"}),
    ]
    for summary in listed:
        job = {"thingName": sb.name, "jobId": summary["jobId"]}
        number = summary["jobExecutionSummary"]["executionNumber"]
        calls += [("describe_job_execution", job),
                  ("describe_job_execution", {**job, "includeJobDocument": False}),
                  ("describe_job_execution", {**job, "executionNumber": number})]
    return calls


def _over_http(sb: Sandbox, calls: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [strip(getattr(sb.data, op)(**kwargs)) for op, kwargs in calls]


def _over_mqtt(sb: Sandbox, calls: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    async def body() -> list[dict[str, Any]]:
        async with open_client(sb.thing.config) as jobs:
            return [await getattr(jobs, op)(**kwargs) for op, kwargs in calls]

    return run(body())


@pytest.mark.parametrize("state", list(STATES))
def test_mqtt_and_http_data_planes_answer_alike(sb: Sandbox, state: str) -> None:
    setup, in_progress, queued = STATES[state]
    setup(sb)
    calls = _reads(sb)

    over_http = _over_http(sb, calls)
    over_mqtt = _over_mqtt(sb, calls)

    assert over_mqtt == [mqtt_view(answer, sb.name) for answer in over_http]
    assert not any("thingName" in answer.get("execution", {}) for answer in over_mqtt)
    pending = over_http[0]
    assert (len(pending["inProgressJobs"]), len(pending["queuedJobs"])) == (in_progress, queued)
    for item in pending["inProgressJobs"]:
        assert type(item["startedAt"]) is int
    for item in pending["queuedJobs"]:
        assert "startedAt" not in item
    for (op, _), answer in zip(calls, over_http, strict=True):
        name = "".join(part.title() for part in op.split("_"))
        assert boto3_shape_errors(name, answer) == ""
        if "jobDocument" in answer.get("execution", {}):
            assert json.loads(answer["execution"]["jobDocument"])["operation"] == "run-script"
    if in_progress + queued == 0:
        assert over_http[1] == {}  # $next with nothing pending: no execution key


def test_pending_command_prints_what_boto3_returns(sb: Sandbox) -> None:
    _two_in_progress(sb)
    proc = subprocess.run([sys.executable, "-m", "agent", "pending", "--config",
                           str(sb.thing.config_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == strip(
        sb.data.get_pending_job_executions(thingName=sb.name))


def test_writes_over_http_match_the_mqtt_shapes(sb: Sandbox) -> None:
    """start-next and update: what HTTP answers for one thing equals what the MQTT client
    returns for a twin thing put through the same steps (names and times aside)."""
    twin_name = f"twin-{uuid.uuid4().hex[:8]}"  # a certificate CN: <= 64 characters
    twin = Sandbox(Thing(twin_name, sb.thing.stack.thing(twin_name), sb.thing.stack),
                   sb.iot, sb.data)
    claim: dict[str, Any] = {"statusDetails": {"step": "claimed"}, "stepTimeoutInMinutes": 3}
    finish: dict[str, Any] = {"status": "SUCCEEDED", "statusDetails": {"ok": "yes"},
                              "expectedVersion": 2, "includeJobExecutionState": True,
                              "includeJobDocument": True}
    sb.job("w")
    twin.job("w")
    over_http = [
        mqtt_view(strip(sb.data.start_next_pending_job_execution(thingName=sb.name, **claim)),
                  sb.name),
        strip(sb.data.update_job_execution(thingName=sb.name, jobId=sb.thing.j("w"), **finish)),
    ]

    async def body() -> list[dict[str, Any]]:
        async with open_client(twin.thing.config) as jobs:
            return [await jobs.start_next_pending_job_execution(thingName=twin.name, **claim),
                    await jobs.update_job_execution(thingName=twin.name,
                                                    jobId=twin.thing.j("w"), **finish)]

    over_mqtt = run(body())

    def normalized(answer: dict[str, Any], side: Sandbox) -> dict[str, Any]:
        text = json.dumps(answer).replace(side.thing.j("w"), "JOB").replace(side.name, "THING")
        out: dict[str, Any] = json.loads(text)
        for key in ("queuedAt", "startedAt", "lastUpdatedAt"):
            out.get("execution", {}).pop(key, None)
        return out

    assert [normalized(a, twin) for a in over_mqtt] == [normalized(a, sb) for a in over_http]
    assert over_http[0]["execution"]["status"] == "IN_PROGRESS"
    assert over_http[1]["executionState"] == {"status": "SUCCEEDED",
                                              "statusDetails": {"ok": "yes"}, "versionNumber": 3}
    assert json.loads(over_http[1]["jobDocument"]) == DOC
    assert boto3_shape_errors("UpdateJobExecution", over_http[1]) == ""


# --------------------------------------------------------------------------- errors, both sides


def _unregistered_config(stack: Stack, name: str, directory: Path) -> Path:
    """An agent config with a valid certificate for a thing the service never registered,
    whose policy names that thing's topics literally (no thing to resolve a variable)."""
    assert stack.broker is not None and stack.pki is not None
    identity, _ = stack.certificate(name)
    stack.set_policy(name, broad_jobs_policy(name))
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"thing_name": name, "mqtt": {
        "endpoint": stack.broker.host, "port": stack.broker.port, "cert": str(identity.cert),
        "key": str(identity.key), "ca": str(stack.pki.ca_cert)}}))
    return path


def _mqtt_error(config: Path, op: str, kwargs: dict[str, Any]) -> JobsServiceError:
    async def body() -> JobsServiceError:
        async with open_client(load_config(config)) as jobs:
            with pytest.raises(JobsServiceError) as info:
                await getattr(jobs, op)(**kwargs)
            return info.value

    return run(body())


def _http_error(data: Any, op: str, kwargs: dict[str, Any]) -> ClientError:
    with pytest.raises(ClientError) as info:
        getattr(data, op)(**kwargs)
    return info.value


ERROR_CASES: dict[str, tuple[str, dict[str, Any], str]] = {
    # case: (device operation, its arguments beyond thingName/jobId, the shared exception)
    "unknown thing": ("get_pending_job_executions", {}, "ResourceNotFoundException"),
    "invalid thing name": ("get_pending_job_executions", {"thingName": "bad name"},
                           "InvalidRequestException"),
    "thing name too long": ("get_pending_job_executions", {"thingName": "t" * 129},
                            "InvalidRequestException"),
    "unknown job": ("describe_job_execution", {}, "ResourceNotFoundException"),
    "invalid job id": ("describe_job_execution", {"jobId": "no job"},
                       "InvalidRequestException"),
    "old execution number": ("describe_job_execution", {"executionNumber": 2},
                             "ResourceNotFoundException"),
    "update of an ended execution": ("update_job_execution", {"status": "IN_PROGRESS"},
                                     "InvalidStateTransitionException"),
    "update to a service-only status": ("update_job_execution", {"status": "QUEUED"},
                                        "InvalidRequestException"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_are_the_same_exception_on_both_sides(sb: Sandbox, tmp_path: Path,
                                                     case: str) -> None:
    op, extra, expected = ERROR_CASES[case]
    config = sb.thing.config_path
    kwargs: dict[str, Any] = {"thingName": sb.name}
    if case == "unknown thing":
        kwargs["thingName"] = f"unregistered-{sb.name[-6:]}"  # a certificate CN: <= 64
        config = _unregistered_config(sb.thing.stack, kwargs["thingName"], tmp_path)
    if op != "get_pending_job_executions":
        job = sb.job("e")
        sb.update(job, "SUCCEEDED")
        kwargs["jobId"] = job if case != "unknown job" else sb.thing.j("none")
    kwargs.update(extra)

    over_mqtt = _mqtt_error(config, op, kwargs)
    over_http = _http_error(sb.data, op, kwargs)

    assert type(over_mqtt).__name__ == expected
    assert over_http.response["Error"]["Code"] == expected
    assert isinstance(over_http, getattr(sb.data.exceptions, expected))  # boto3's modeled class
    assert over_http.response["Error"]["Message"]


def test_version_mismatch_over_http_is_invalid_state_transition(sb: Sandbox) -> None:
    """The data plane model has no VersionMismatch: UpdateJobExecution's 409 is
    InvalidStateTransitionException, named in the message. Over MQTT it is ConflictException."""
    job = sb.job("v")
    kwargs = {"thingName": sb.name, "jobId": job, "status": "IN_PROGRESS", "expectedVersion": 5}

    over_mqtt = _mqtt_error(sb.thing.config_path, "update_job_execution", kwargs)
    over_http = _http_error(sb.data, "update_job_execution", kwargs)

    assert isinstance(over_mqtt, ConflictException) and over_mqtt.code == "VersionMismatch"
    assert isinstance(over_http, sb.data.exceptions.InvalidStateTransitionException)
    assert over_http.response["ResponseMetadata"]["HTTPStatusCode"] == 409
    assert over_http.response["Error"]["Message"].startswith("VersionMismatch: ")
    assert sb.thing.emulator.execution(job, sb.name)["versionNumber"] == 1  # nothing changed


@pytest.mark.parametrize(("code", "exception", "status"), [
    ("RequestThrottled", "ThrottlingException", 429),
    ("InternalError", "ServiceUnavailableException", 503),
    ("TerminalStateReached", "TerminalStateException", 410),
    ("InvalidRequest", "InvalidRequestException", 400),
    ("SomethingNewFromAws", "SomethingNewFromAws", 400),
])
def test_injected_faults_read_alike(sb: Sandbox, code: str, exception: str,
                                    status: int) -> None:
    job = sb.job("f")
    kwargs = {"thingName": sb.name, "jobId": job}

    sb.thing.emulator.inject_rejections(code, 1)
    over_http = _http_error(sb.data, "describe_job_execution", kwargs)
    sb.thing.emulator.inject_rejections(code, 1)
    over_mqtt = _mqtt_error(sb.thing.config_path, "describe_job_execution", kwargs)

    assert over_http.response["Error"]["Code"] == exception
    assert over_http.response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert over_mqtt.code == code
    if exception != code:  # a modeled one: the same class name on both sides
        assert type(over_mqtt).__name__ == exception
        assert isinstance(over_http, getattr(sb.data.exceptions, exception))
    # One-shot faults: both sides serve normally again.
    assert sb.data.describe_job_execution(**kwargs)["execution"]["jobId"] == job


# --------------------------------------------------------------------------- control plane


def test_control_plane_round_trip(sb: Sandbox) -> None:
    iot, name = sb.iot, sb.name
    other = f"{name[:100]}-b"
    created = iot.create_thing(thingName=other, attributePayload={"attributes": {"site": "lab"}})
    assert created["thingArn"] == sb.arn(other)
    again = iot.create_thing(thingName=other, attributePayload={"attributes": {"site": "lab"}})
    assert again["thingId"] == created["thingId"]  # same configuration: idempotent
    described = iot.describe_thing(thingName=other)
    assert (described["thingId"], described["attributes"], described["version"]) == (
        created["thingId"], {"site": "lab"}, 1)
    assert iot.describe_thing(thingName=name)["thingArn"] == sb.arn()  # registered by the stack
    everything = [t["thingName"] for page in iot.get_paginator("list_things").paginate(
        PaginationConfig={"PageSize": 2}) for t in page["things"]]
    assert {name, other} <= set(everything) and len(everything) == len(set(everything))
    at_lab = iot.list_things(attributeName="site", attributeValue="lab")["things"]
    assert other in [t["thingName"] for t in at_lab] and name not in [
        t["thingName"] for t in at_lab]

    job = sb.thing.j("ctl")
    out = strip(iot.create_job(jobId=job, targets=[sb.arn(), sb.arn(other)],
                               document=json.dumps(DOC), description="round trip",
                               timeoutConfig={"inProgressTimeoutInMinutes": 30}))
    assert out == {"jobArn": f"{sb.arn()[:-len('thing/' + name)]}job/{job}", "jobId": job,
                   "description": "round trip"}
    described_job = iot.describe_job(jobId=job)["job"]
    assert described_job["status"] == "IN_PROGRESS"
    assert described_job["targets"] == [sb.arn(), sb.arn(other)]
    assert described_job["timeoutConfig"] == {"inProgressTimeoutInMinutes": 30}
    assert described_job["jobProcessDetails"]["numberOfQueuedThings"] == 2
    assert described_job["createdAt"].tzinfo is not None  # a timestamp shape: a datetime
    assert json.loads(iot.get_job_document(jobId=job)["document"]) == DOC
    assert job in [j["jobId"] for j in iot.list_jobs(status="IN_PROGRESS")["jobs"]]
    pages = list(iot.get_paginator("list_jobs").paginate(PaginationConfig={"PageSize": 1}))
    assert job in [j["jobId"] for page in pages for j in page["jobs"]]

    sb.data.start_next_pending_job_execution(thingName=name, statusDetails={"step": "go"})
    execution = iot.describe_job_execution(jobId=job, thingName=name)["execution"]
    assert (execution["status"], execution["statusDetails"], execution["versionNumber"],
            execution["thingArn"]) == ("IN_PROGRESS", {"detailsMap": {"step": "go"}}, 2,
                                       sb.arn())
    assert iot.describe_job_execution(jobId=job, thingName=name, executionNumber=1)[
        "execution"]["executionNumber"] == 1
    for_thing = iot.list_job_executions_for_thing(thingName=name)["executionSummaries"]
    assert [(s["jobId"], s["jobExecutionSummary"]["status"]) for s in for_thing] == [
        (job, "IN_PROGRESS")]
    assert iot.list_job_executions_for_thing(thingName=name, status="QUEUED")[
        "executionSummaries"] == []
    for_job = iot.list_job_executions_for_job(jobId=job)["executionSummaries"]
    assert [s["thingArn"] for s in for_job] == [sb.arn(), sb.arn(other)]

    iot.cancel_job_execution(jobId=job, thingName=other, expectedVersion=1,
                             statusDetails={"why": "not needed"})
    assert sb.thing.emulator.execution(job, other)["status"] == "CANCELED"
    canceled = strip(iot.cancel_job(jobId=job, force=True, comment="bye", reasonCode="TEST"))
    assert canceled == out
    described_job = iot.describe_job(jobId=job)["job"]
    assert (described_job["status"], described_job["forceCanceled"], described_job["comment"],
            described_job["reasonCode"]) == ("CANCELED", True, "bye", "TEST")
    assert described_job["jobProcessDetails"]["numberOfCanceledThings"] == 2

    iot.delete_job_execution(jobId=job, thingName=name, executionNumber=1)
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.describe_job_execution(jobId=job, thingName=name)
    iot.delete_job(jobId=job)  # CANCELED: no force needed
    assert iot.describe_job(jobId=job)["job"]["status"] == "DELETION_IN_PROGRESS"


CONTROL_ERRORS: dict[str, tuple[str, Callable[[Sandbox], Any]]] = {
    "describe_job of an unknown job": ("ResourceNotFoundException",
                                       lambda sb: sb.iot.describe_job(jobId=sb.thing.j("no"))),
    "create_job with a job id in use": ("ResourceAlreadyExistsException",
                                        lambda sb: sb.iot.create_job(
                                            jobId=sb.job("dup"), targets=[sb.arn()],
                                            document="{}")),
    "create_job for an unknown thing": ("ResourceNotFoundException",
                                        lambda sb: sb.iot.create_job(
                                            jobId=sb.thing.j("x"), document="{}",
                                            targets=[sb.arn(f"{sb.name[:100]}-none")])),
    "create_job with a document that is not JSON": ("InvalidRequestException",
                                                    lambda sb: sb.iot.create_job(
                                                        jobId=sb.thing.j("x"), document="{no",
                                                        targets=[sb.arn()])),
    "create_job targeting another account": ("InvalidRequestException",
                                             lambda sb: sb.iot.create_job(
                                                 jobId=sb.thing.j("x"), document="{}",
                                                 targets=["arn:aws:iot:us-east-1:999999999999:"
                                                          f"thing/{sb.name}"])),
    "create_job with a documentSource": ("InvalidRequestException",
                                         lambda sb: sb.iot.create_job(
                                             jobId=sb.thing.j("x"), targets=[sb.arn()],
                                             documentSource="https://example.com/doc.json")),
    "create_job CONTINUOUS": ("InvalidRequestException",
                              lambda sb: sb.iot.create_job(
                                  jobId=sb.thing.j("x"), targets=[sb.arn()], document="{}",
                                  targetSelection="CONTINUOUS")),
    "cancel_job_execution with a stale expectedVersion": (
        "VersionConflictException",
        lambda sb: sb.iot.cancel_job_execution(jobId=sb.job("c"), thingName=sb.name,
                                               expectedVersion=3)),
    "cancel_job_execution of a running one without force": (
        "InvalidStateTransitionException",
        lambda sb: sb.iot.cancel_job_execution(jobId=sb.job("c", start=True),
                                               thingName=sb.name)),
    "delete_job while it runs, without force": (
        "InvalidStateTransitionException",
        lambda sb: sb.iot.delete_job(jobId=sb.job("d", start=True))),
    "delete_job_execution of a queued one without force": (
        "InvalidStateTransitionException",
        lambda sb: sb.iot.delete_job_execution(jobId=sb.job("d"), thingName=sb.name,
                                               executionNumber=1)),
    "cancel_job of a completed job": (
        "InvalidRequestException",  # CancelJob's model has no InvalidStateTransitionException
        lambda sb: (sb.update(job := sb.job("done"), "SUCCEEDED"),
                    sb.iot.cancel_job(jobId=job))),
    "describe_job_execution of an unknown execution": (
        "ResourceNotFoundException",
        lambda sb: sb.iot.describe_job_execution(jobId=sb.thing.j("no"), thingName=sb.name)),
    "describe_job_execution of an unknown number": (
        "ResourceNotFoundException",
        lambda sb: sb.iot.describe_job_execution(jobId=sb.job("n"), thingName=sb.name,
                                                 executionNumber=7)),
    "describe_thing of an unknown thing": (
        "ResourceNotFoundException",
        lambda sb: sb.iot.describe_thing(thingName=f"{sb.name[:100]}-none")),
    "create_thing again with other attributes": (
        "ResourceAlreadyExistsException",
        lambda sb: sb.iot.create_thing(thingName=sb.name,
                                       attributePayload={"attributes": {"a": "b"}})),
    "create_thing with a thing type": (
        "ResourceNotFoundException",
        lambda sb: sb.iot.create_thing(thingName=f"{sb.name[:100]}-t", thingTypeName="sensor")),
    "list_jobs with a forged nextToken": (
        "InvalidRequestException", lambda sb: sb.iot.list_jobs(nextToken="forged")),
}


@pytest.mark.parametrize("case", list(CONTROL_ERRORS))
def test_control_plane_errors_are_boto3s_modeled_exceptions(sb: Sandbox, case: str) -> None:
    expected, call = CONTROL_ERRORS[case]
    with pytest.raises(ClientError) as info:
        call(sb)
    assert info.value.response["Error"]["Code"] == expected
    assert isinstance(info.value, getattr(sb.iot.exceptions, expected))
    assert info.value.response["Error"]["Message"]


def test_ignores_signatures_and_refuses_unknown_operations(stack: Stack) -> None:
    """Unsigned raw HTTP works (nothing checks SigV4); an unknown route is a clear 404."""
    import urllib.error
    import urllib.request

    with urllib.request.urlopen(f"{stack.control_endpoint}/things?maxResults=1") as reply:
        assert len(json.load(reply)["things"]) == 1
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{stack.data_endpoint}/no/such/operation")
    assert info.value.code == 404
    assert info.value.headers["x-amzn-ErrorType"] == "UnknownOperationException"


# --------------------------------------------------------------------------- shared state


async def _next_of(jobs: JobsClient, kinds: set[str]) -> Any:
    while True:
        event = await jobs.next_event(30)
        if event.kind in kinds:
            return event


def test_a_job_created_with_boto3_reaches_the_agents_mqtt_streams(sb: Sandbox) -> None:
    async def body() -> list[Any]:
        async with open_client(sb.thing.config, streams=True) as jobs:
            subscribed: set[str] = set()
            while subscribed != {"notify", "notify-next"}:
                subscribed.add((await _next_of(jobs, {"subscribed"})).body["stream"])
            job = await asyncio.to_thread(sb.job, "s")
            head = await _next_of(jobs, {"notify-next"})
            await asyncio.to_thread(sb.data.start_next_pending_job_execution, thingName=sb.name)
            await asyncio.to_thread(sb.update, job, "SUCCEEDED")
            emptied = await _next_of(jobs, {"notify-next"})
            return [job, head.body, emptied.body]

    job, head, emptied = run(body())
    assert head["execution"]["jobId"] == job
    assert json.loads(head["execution"]["jobDocument"]) == DOC
    assert "execution" not in emptied  # the HTTP update ended it; MQTT heard it
    assert sb.iot.describe_job(jobId=job)["job"]["status"] == "COMPLETED"


# --------------------------------------------------------------------------- the README example


def _readme_example(heading: str = "## Drive the sandbox with boto3") -> str:
    text = README.read_text()
    section = text[text.index(heading):]
    end = section.find("\n## ", 1)
    section = section if end < 0 else section[:end]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"the README section {heading!r} has no python example"
    return match.group(1)


def _user_env() -> dict[str, str]:
    """A user's shell: no systemd variables; ``agent`` importable from any directory."""
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture
def no_agent_sandbox(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """``iot-jobs-agent sandbox --no-agent`` in ``tmp_path`` (its default ``.sandbox`` dir)."""
    proc = subprocess.Popen([sys.executable, "-m", "agent", "sandbox", "--dir", ".sandbox",
                             "--no-agent"], cwd=tmp_path, env=_user_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    info = tmp_path / ".sandbox" / "sandbox.json"
    deadline = time.monotonic() + 120
    while not info.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        assert info.exists(), "the sandbox wrote no sandbox.json"
        yield proc, tmp_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _run_with_agent(cwd: Path, example: str, *, wait_ready: bool = False) -> tuple[
        subprocess.CompletedProcess[str], subprocess.Popen[str], str]:
    """Run ``example`` while the real agent runs on the sandbox's config (as a user would)."""
    agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config",
                              ".sandbox/agent.yaml"], cwd=cwd, env=_user_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        if wait_ready:  # a user starts the agent, sees it is ready, then runs their script
            assert agent.stderr is not None
            seen = ""
            while "ready thing=" not in seen and agent.poll() is None:
                seen += agent.stderr.readline()
        ran = subprocess.run([sys.executable, "-c", example], cwd=cwd, env=_user_env(),
                             capture_output=True, text=True, timeout=120)
    finally:
        agent.send_signal(signal.SIGTERM)
        _, agent_log = agent.communicate(timeout=60)
    return ran, agent, agent_log


def test_the_readme_example_runs_against_sandbox_no_agent(
        no_agent_sandbox: tuple[subprocess.Popen[str], Path]) -> None:
    sandbox, cwd = no_agent_sandbox
    info = json.loads((cwd / ".sandbox" / "sandbox.json").read_text())
    assert set(info) >= {"thing_name", "mqtt", "control_endpoint", "data_endpoint", "region"}
    assert set(info["mqtt"]) == {"endpoint", "port", "cert", "key", "ca"}
    example, agent, agent_log = _run_with_agent(cwd, _readme_example())
    assert example.returncode == 0, example.stdout + example.stderr + agent_log
    assert example.stdout.startswith("SUCCEEDED hello: boto3"), example.stdout
    assert agent.returncode == 0, agent_log

    commands, agent, agent_log = _run_with_agent(
        cwd, _readme_example("## AWS IoT Commands"), wait_ready=True)
    assert commands.returncode == 0, commands.stdout + commands.stderr + agent_log
    assert commands.stdout.startswith("SUCCEEDED hello: command"), commands.stdout
    assert agent.returncode == 0, agent_log

    sandbox.send_signal(signal.SIGINT)
    output, _ = sandbox.communicate(timeout=60)
    assert sandbox.returncode == 0, output
    assert info["control_endpoint"] in output and info["data_endpoint"] in output
    assert "run one: iot-jobs-agent run --config" in output
