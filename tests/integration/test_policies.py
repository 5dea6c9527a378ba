"""AWS IoT policies in the sandbox, end to end: boto3's ``iot`` client manages them (every raw
answer checked against botocore's model), the broker enforces them on real awscrt clients, and
a too-narrow policy fails the way it fails in AWS IoT: SUBACK or PUBACK "not authorized"
(reason code 0x87), or a message that never arrives."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from awscrt import mqtt5

from agent.errors import RequestFailedError
from agent.sandbox.iot_policy import DEFAULT_POLICIES, THING_NAME
from agent.sandbox.stack import Stack
from tests.conftest import Thing, open_client, run, unique_thing_name
from tests.integration.test_broker import OP_TIMEOUT, Client, clients

pytestmark = pytest.mark.broker

ANY = "arn:aws:iot:*:*:"
JOBS = f"{ANY}topic/$aws/things/{THING_NAME}/jobs/"
FILTERS = f"{ANY}topicfilter/$aws/things/{THING_NAME}/jobs/"
REFUSED = mqtt5.SubackReasonCode.NOT_AUTHORIZED
GRANTED = mqtt5.SubackReasonCode.GRANTED_QOS_1
DOC = {"operation": "run-script", "args": []}


def policy(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": f"{ANY}client/{THING_NAME}"},
        *statements]})


def allow(action: str | list[str], *resources: str) -> dict[str, Any]:
    return {"Effect": "Allow", "Action": action, "Resource": list(resources)}


def deny(action: str | list[str], *resources: str) -> dict[str, Any]:
    return {"Effect": "Deny", "Action": action, "Resource": list(resources)}


EVERYTHING_BUT = {
    # the AWS documentation's device policy for Jobs, each missing one permission
    "no Subscribe on notify-next": policy(
        allow("iot:Publish", JOBS + "*"), allow("iot:Receive", JOBS + "*"),
        allow("iot:Subscribe", FILTERS + "notify", FILTERS + "get/+", FILTERS + "+/get/+",
              FILTERS + "start-next/+", FILTERS + "+/update/+")),
    "no Publish on update": policy(
        allow("iot:Publish", JOBS + "get", JOBS + "start-next", JOBS + "*/get"),
        allow("iot:Receive", JOBS + "*"), allow("iot:Subscribe", FILTERS + "*")),
    "Receive denied on notify-next": policy(
        allow(["iot:Publish", "iot:Receive"], JOBS + "*"), allow("iot:Subscribe", FILTERS + "*"),
        deny("iot:Receive", JOBS + "notify-next")),
}


@pytest.fixture
def device(stack: Stack, thing: Thing) -> Iterator[Callable[[], Client]]:
    """Connects a raw awscrt MQTT5 client of ``thing`` (its client id is the thing name)."""
    assert stack.broker is not None and stack.pki is not None
    identity = stack.pki.client(thing.name)
    with clients(stack.broker) as connect:
        yield lambda: connect(identity)


def certificate_of(iot: Any, thing: str) -> str:
    principals = iot.list_thing_principals(thingName=thing)["principals"]
    assert len(principals) == 1
    return str(principals[0])


# --------------------------------------------------------------------------- control plane


def test_policy_operations_through_boto3(iot: Any, thing: Thing) -> None:
    cert = certificate_of(iot, thing.name)
    name = f"{thing.name[-20:]}-p"
    document = policy(allow("iot:Publish", JOBS + "get"))

    created = iot.create_policy(policyName=name, policyDocument=document)
    got = iot.get_policy(policyName=name)
    listed = [p["policyName"] for page in iot.get_paginator("list_policies").paginate(
        PaginationConfig={"PageSize": 2}) for p in page["policies"]]
    defaults = iot.list_attached_policies(target=cert)["policies"]
    iot.attach_policy(policyName=name, target=cert)
    attached = iot.list_attached_policies(target=cert)["policies"]
    targets = iot.list_targets_for_policy(policyName=name)["targets"]
    with pytest.raises(iot.exceptions.DeleteConflictException):
        iot.delete_policy(policyName=name)
    iot.detach_policy(policyName=name, target=cert)
    iot.delete_policy(policyName=name)
    described = iot.describe_certificate(certificateId=cert.rsplit("/", 1)[1])

    assert created["policyArn"] == f"arn:aws:iot:us-east-1:123456789012:policy/{name}"
    assert (created["policyVersionId"], got["policyDocument"]) == ("1", document)
    assert {name, *DEFAULT_POLICIES} <= set(listed)
    assert [p["policyName"] for p in defaults] == list(DEFAULT_POLICIES)
    assert [p["policyName"] for p in attached] == [*DEFAULT_POLICIES, name]
    assert targets == [cert]
    assert described["certificateDescription"]["certificateArn"] == cert
    assert described["certificateDescription"]["status"] == "ACTIVE"
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.get_policy(policyName=name)


@pytest.mark.parametrize(("document", "exception", "words"), [
    ("{", "MalformedPolicyException", "not JSON"),
    (json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
                                                          "Action": "iot:Connect"}]}),
     "MalformedPolicyException", "Resource is required"),
    (policy({**allow("iot:Publish", JOBS + "get"), "Condition": {}}),
     "InvalidRequestException", "Condition is not supported"),
    (policy(allow("iot:RetainPublish", JOBS + "get")), "InvalidRequestException",
     "iot:RetainPublish"),
    (policy(allow("iot:Publish", JOBS + "job-*/update")), "InvalidRequestException",
     "inside a topic level"),
])
def test_refused_policies_raise_the_models_exceptions(iot: Any, thing: Thing, document: str,
                                                      exception: str, words: str) -> None:
    with pytest.raises(getattr(iot.exceptions, exception)) as info:
        iot.create_policy(policyName=f"{thing.name[-20:]}-bad", policyDocument=document)
    assert words in info.value.response["Error"]["Message"]


def test_attach_targets_are_certificates(iot: Any, thing: Thing, stack: Stack) -> None:
    thing_arn = iot.describe_thing(thingName=thing.name)["thingArn"]
    unknown = f"arn:aws:iot:us-east-1:123456789012:cert/{'0' * 64}"

    with pytest.raises(iot.exceptions.InvalidRequestException) as info:
        iot.attach_policy(policyName=next(iter(DEFAULT_POLICIES)), target=thing_arn)
    assert "list_thing_principals" in info.value.response["Error"]["Message"]
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.attach_policy(policyName=next(iter(DEFAULT_POLICIES)), target=unknown)
    with pytest.raises(iot.exceptions.ResourceNotFoundException):
        iot.list_thing_principals(thingName=f"{thing.name}-none")


# --------------------------------------------------------------------------- enforcement


def test_default_policy_lets_a_device_use_only_its_own_jobs_topics(
        stack: Stack, thing: Thing, device: Any, request: pytest.FixtureRequest) -> None:
    other = unique_thing_name(request)[:40] + "-other"
    stack.thing(other)
    dev = device()
    own = f"$aws/things/{thing.name}/jobs/"

    grants = [dev.subscribe(own + t).reason_codes[0] for t in (
        "notify-next", "notify", "get/+", "+/update/+", "#")]
    foreign = dev.subscribe(f"$aws/things/{other}/jobs/notify-next").reason_codes[0]
    writes = {t: dev.publish(own + t, b"{}").puback.reason_code for t in (
        "get", "start-next", "x/get", "notify", "notify-next", "get/accepted", "x/update/rejected")}

    assert grants == [GRANTED] * 5
    assert foreign == REFUSED
    refused = mqtt5.PubackReasonCode.NOT_AUTHORIZED
    assert [t for t, code in writes.items() if code == refused] == [
        "notify", "notify-next", "get/accepted", "x/update/rejected"]


def test_no_subscribe_on_notify_next_is_a_refused_suback(stack: Stack, thing: Thing,
                                                         device: Any) -> None:
    stack.set_policy(thing.name, EVERYTHING_BUT["no Subscribe on notify-next"])
    dev = device()
    own = f"$aws/things/{thing.name}/jobs/"

    assert dev.subscribe(own + "notify-next").reason_codes == [REFUSED]
    assert dev.subscribe(own + "notify").reason_codes == [GRANTED]
    stack.emulator.create_job(thing.j("n"), [thing.name], DOC)
    assert dev.receive().topic == own + "notify"
    dev.assert_silent()


def test_no_publish_on_update_is_a_refused_puback(stack: Stack, thing: Thing) -> None:
    stack.set_policy(thing.name, EVERYTHING_BUT["no Publish on update"])
    stack.emulator.create_job(thing.j("u"), [thing.name], DOC)

    async def body() -> tuple[dict[str, Any], RequestFailedError]:
        async with open_client(thing.config) as jobs:
            started = await jobs.start_next_pending_job_execution(thingName=thing.name)
            with pytest.raises(RequestFailedError) as info:
                await jobs.update_job_execution(jobId=thing.j("u"), thingName=thing.name,
                                                status="SUCCEEDED")
            return started, info.value

    started, error = run(body())
    assert started["execution"]["jobId"] == thing.j("u")
    assert "publish" in str(error).lower()  # the refused PUBACK, not a timeout
    assert stack.emulator.execution(thing.j("u"), thing.name)["status"] == "IN_PROGRESS"


def test_receive_denied_means_a_granted_subscription_that_stays_silent(
        stack: Stack, thing: Thing, device: Any) -> None:
    stack.set_policy(thing.name, EVERYTHING_BUT["Receive denied on notify-next"])
    dev = device()
    own = f"$aws/things/{thing.name}/jobs/"

    assert dev.subscribe(own + "#").reason_codes == [GRANTED]
    stack.emulator.create_job(thing.j("r"), [thing.name], DOC)

    assert dev.receive().topic == own + "notify"
    dev.assert_silent()  # notify-next was sent, and the explicit Deny held it back


def test_attach_and_detach_apply_to_a_connected_device(iot: Any, thing: Thing,
                                                       device: Any) -> None:
    cert = certificate_of(iot, thing.name)
    dev = device()
    topic = f"$aws/things/{thing.name}/jobs/get"
    name = f"{thing.name[-20:]}-deny"
    iot.create_policy(policyName=name, policyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [deny("iot:Publish", JOBS + "get")]}))

    before = dev.publish(topic, b"{}").puback.reason_code
    iot.attach_policy(policyName=name, target=cert)
    kind, _ = dev.next_event(OP_TIMEOUT)  # Mosquitto's way: DISCONNECT 0x98, reconnect
    dev.wait_connected()
    during = dev.publish(topic, b"{}").puback.reason_code
    iot.detach_policy(policyName=name, target=cert)
    dev.wait_connected()
    after = dev.publish(topic, b"{}").puback.reason_code

    assert before == mqtt5.PubackReasonCode.SUCCESS
    assert kind == "disconnection"
    assert during == mqtt5.PubackReasonCode.NOT_AUTHORIZED
    assert after == mqtt5.PubackReasonCode.SUCCESS


def test_a_device_whose_policy_omits_connect_may_do_nothing(stack: Stack, thing: Thing,
                                                            device: Any) -> None:
    stack.set_policy(thing.name, json.dumps({"Version": "2012-10-17", "Statement": [
        allow(["iot:Publish", "iot:Receive"], JOBS + "*"), allow("iot:Subscribe", FILTERS + "*")]}))
    dev = device()  # Mosquitto cannot refuse the CONNECT itself (see docs/fidelity.md)

    assert dev.subscribe(f"$aws/things/{thing.name}/jobs/notify").reason_codes == [REFUSED]
    assert dev.publish(f"$aws/things/{thing.name}/jobs/get", b"{}").puback.reason_code == \
        mqtt5.PubackReasonCode.NOT_AUTHORIZED


def test_sandbox_command_takes_a_policy_file(tmp_path: Path) -> None:
    """``--policy FILE``: refused with one line and exit 78 when the sandbox cannot enforce it;
    attached to the sandbox thing's certificate otherwise."""
    bad = tmp_path / "bad.json"
    bad.write_text(policy(allow("iot:Publish", JOBS + "job-*")))
    good = tmp_path / "good.json"
    good.write_text(DEFAULT_POLICIES["sandbox-jobs-device"])

    refused = subprocess.run([sys.executable, "-m", "agent", "sandbox", "--dir",
                              str(tmp_path / "sb"), "--policy", str(bad), "--once"],
                             capture_output=True, text=True, timeout=60)
    ok = subprocess.run([sys.executable, "-m", "agent", "sandbox", "--dir", str(tmp_path / "sb"),
                         "--policy", str(good), "--once"], capture_output=True, text=True,
                        timeout=180)

    assert refused.returncode == 78
    assert refused.stderr.strip().splitlines() == [
        f"ConfigError: --policy {bad}: InvalidRequest: Statement[1].Resource: "
        f"{JOBS + 'job-*'!r} has a * inside a topic level ('job-*'); the broker matches whole "
        "levels only (write * as a level) (the sandbox supports a subset of AWS IoT "
        "policies; see the README)"]
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "sandbox-device (from" in ok.stdout and "ended SUCCEEDED" in ok.stdout
    assert "no demo command: Commands are off" in ok.stdout  # the file grants no Commands topics


def test_the_readme_policy_example(iot: Any, stack: Stack, thing: Thing, device: Any) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Policies in the sandbox"):]
    example = section[section.index("```python\n") + 10:section.index("```\n\nOperations")]
    example = example.replace('"no-notify-next"', f'"{thing.name[-20:]}-nn"')

    exec(example, {"iot": iot, "json": json, "sandbox": {"thing_name": thing.name}})

    dev = device()
    own = f"$aws/things/{thing.name}/jobs/"
    assert dev.subscribe(own + "notify-next").reason_codes == [REFUSED]
    assert dev.subscribe(own + "notify").reason_codes == [GRANTED]
