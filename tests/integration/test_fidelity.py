"""The sandbox refuses what AWS refuses and accepts what AWS's own device libraries send (issue
10, item 4), through the real broker, emulator and HTTP fronts, with raw MQTT clients writing the
bytes those libraries write. ``docs/fidelity.md`` gives the source of each rule."""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from awscrt import exceptions as crt_exceptions
from awscrt import mqtt, mqtt5
from awsiot import mqtt_connection_builder

from agent.sandbox.stack import Stack
from tests.conftest import Thing
from tests.integration.test_broker import OP_TIMEOUT, SILENCE, Client, clients

pytestmark = pytest.mark.broker

DOC = {"operation": "run-script", "args": []}


class Device:
    """A raw MQTT5 device of one thing: subscribes to its own jobs topics, publishes bytes."""

    def __init__(self, client: Client, thing: str) -> None:
        self.client = client
        self.prefix = f"$aws/things/{thing}/jobs/"
        assert client.subscribe(self.prefix + "#").reason_codes == [
            mqtt5.SubackReasonCode.GRANTED_QOS_1]

    def send(self, suffix: str, payload: bytes) -> None:
        code = self.client.publish(self.prefix + suffix, payload).puback.reason_code
        assert code == mqtt5.PubackReasonCode.SUCCESS, code

    def next(self, suffix: str, timeout: float = OP_TIMEOUT) -> tuple[str, bytes]:
        """The next message on ``<prefix><suffix>/accepted|rejected`` (or exactly ``suffix``),
        skipping our own requests and other topics."""
        deadline = time.monotonic() + timeout
        while True:
            packet = self.client.receive(max(0.0, deadline - time.monotonic()))
            topic = packet.topic[len(self.prefix):]
            answer = topic.endswith(("/accepted", "/rejected"))
            if topic == suffix or (answer and topic.rsplit("/", 1)[0] == suffix):
                return topic, bytes(packet.payload or b"")

    def ask(self, suffix: str, payload: bytes) -> tuple[str, dict[str, Any]]:
        """Publish a request, return (accepted|rejected, the reply's JSON)."""
        self.send(suffix, payload)
        topic, raw = self.next(suffix)
        return topic.rsplit("/", 1)[1], json.loads(raw)


@pytest.fixture
def device(stack: Stack, thing: Thing) -> Iterator[Device]:
    assert stack.broker is not None and stack.pki is not None
    with clients(stack.broker) as connect:
        yield Device(connect(stack.pki.client(thing.name)), thing.name)


# ----------------------------------------------------------------------------- requests


@pytest.mark.parametrize("suffix", ["get", "$next/get", "start-next", "JOB/get"])
def test_an_empty_payload_is_an_empty_request(thing: Thing, device: Device, suffix: str) -> None:
    """AWS's embedded C Jobs library (and its demo) send these requests with no payload."""
    job = thing.j("e")
    thing.emulator.create_job(job, [thing.name], DOC)
    suffix = suffix.replace("JOB", job)

    kind, reply = device.ask(suffix, b"")

    assert kind == "accepted", reply
    assert "clientToken" not in reply
    head = reply["queuedJobs"][0] if suffix == "get" else reply["execution"]
    assert head["jobId"] == job


def test_executions_over_mqtt_carry_no_thing_name_and_no_empty_status_details(
        thing: Thing, device: Device, data: Any) -> None:
    job = thing.j("x")
    thing.emulator.create_job(job, [thing.name], DOC)
    _, notify_next = device.next("notify-next")
    _, started = device.ask("start-next", b'{"clientToken":"s"}')
    _, described = device.ask(f"{job}/get", b"{}")
    over_http = data.describe_job_execution(thingName=thing.name, jobId=job)["execution"]

    for execution in (json.loads(notify_next)["execution"], started["execution"],
                      described["execution"]):
        assert execution["jobId"] == job and execution["jobDocument"] == DOC
        assert "thingName" not in execution
        assert "statusDetails" not in execution
    assert over_http["thingName"] == thing.name  # boto3's HTTP shape has it
    assert "statusDetails" not in over_http


def test_a_client_token_over_64_characters_is_refused(device: Device) -> None:
    kind, reply = device.ask("get", json.dumps({"clientToken": "t" * 65}).encode())
    assert (kind, reply["code"]) == ("rejected", "InvalidRequest")
    assert reply["clientToken"] == "t" * 65 and "64" in reply["message"]
    assert device.ask("get", json.dumps({"clientToken": "t" * 64}).encode())[0] == "accepted"


def test_expected_version_as_a_numeric_string_is_accepted(thing: Thing, device: Device) -> None:
    """The bytes AWS's embedded C Jobs library writes (``Jobs_UpdateMsg``)."""
    job = thing.j("v")
    thing.emulator.create_job(job, [thing.name], DOC)
    assert device.ask("start-next", b"")[0] == "accepted"

    stale = device.ask(f"{job}/update", b'{"status":"SUCCEEDED","expectedVersion":"1"}')
    done = device.ask(f"{job}/update", b'{"status":"SUCCEEDED","expectedVersion":"2"}')

    assert stale[0] == "rejected" and stale[1]["code"] == "VersionMismatch"
    assert done[0] == "accepted"
    assert thing.emulator.execution(job, thing.name)["status"] == "SUCCEEDED"


def test_only_update_may_cancel_the_step_timer(thing: Thing, device: Device, data: Any) -> None:
    job = thing.j("s")
    thing.emulator.create_job(job, [thing.name], DOC)

    kind, reply = device.ask("start-next", b'{"stepTimeoutInMinutes":-1}')
    with pytest.raises(data.exceptions.InvalidRequestException):
        data.start_next_pending_job_execution(thingName=thing.name, stepTimeoutInMinutes=-1)

    assert (kind, reply["code"]) == ("rejected", "InvalidRequest")
    assert "stepTimeoutInMinutes" in reply["message"]
    assert thing.emulator.execution(job, thing.name)["status"] == "QUEUED"
    update = device.ask(f"{job}/update", b'{"status":"IN_PROGRESS","stepTimeoutInMinutes":-1}')
    assert update[0] == "accepted"


# ----------------------------------------------------------------------------- retained


def test_a_retained_publish_is_refused_never_stored_nor_replayed(
        stack: Stack, thing: Thing, device: Device) -> None:
    assert stack.broker is not None and stack.pki is not None
    identity = stack.pki.client(thing.name)
    topic = device.prefix + "get"
    assert stack.emulator is not None

    def served() -> int:
        assert stack.emulator is not None
        return stack.emulator.call(lambda s: sum(h[0] == thing.name for h in s.history))

    before = served()

    # An MQTT 5 client learns from the CONNACK that retain is unavailable and refuses itself.
    with pytest.raises(crt_exceptions.AwsCrtError) as info:
        device.client.client.publish(mqtt5.PublishPacket(
            topic=topic, payload=b"{}", qos=mqtt5.QoS.AT_LEAST_ONCE, retain=True)).result(
            OP_TIMEOUT)
    assert info.value.name == "AWS_ERROR_MQTT5_PUBLISH_OPTIONS_VALIDATION"

    # An MQTT 3.1.1 client does not know; the broker disconnects it and drops the message.
    interrupted: queue.Queue[object] = queue.Queue()
    old = mqtt_connection_builder.mtls_from_path(
        endpoint=stack.broker.host, port=stack.broker.port, cert_filepath=str(identity.cert),
        pri_key_filepath=str(identity.key), ca_filepath=str(stack.pki.ca_cert),
        client_id=f"{thing.name[:40]}-311", clean_session=True, keep_alive_secs=30,
        enable_metrics_collection=False,
        on_connection_interrupted=lambda connection, error, **kw: interrupted.put(error))
    old.connect().result(OP_TIMEOUT)
    try:
        old.publish(topic, b'{"clientToken":"retained"}', mqtt.QoS.AT_LEAST_ONCE, retain=True)
        assert interrupted.get(timeout=OP_TIMEOUT) is not None
    finally:
        old.disconnect().result(OP_TIMEOUT)

    with clients(stack.broker) as connect:  # a later subscriber: nothing is replayed to it
        late = connect(identity)
        late.subscribe(topic)
        late.assert_silent(SILENCE)
    device.client.assert_silent(SILENCE)  # and the emulator never answered it
    assert served() == before


# ----------------------------------------------------------------------------- delete_job


def _wait(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_delete_job_passes_through_deletion_in_progress_then_frees_the_id(
        iot: Any, thing: Thing, device: Device) -> None:
    arn = iot.describe_thing(thingName=thing.name)["thingArn"]
    job = thing.j("d")
    iot.create_job(jobId=job, targets=[arn], document=json.dumps(DOC))
    first = device.ask(f"{job}/get", b"")[1]["execution"]

    with pytest.raises(iot.exceptions.InvalidStateTransitionException) as info:
        iot.delete_job(jobId=job)  # IN_PROGRESS (its execution is QUEUED): needs force
    iot.delete_job(jobId=job, force=True)
    during = iot.describe_job(jobId=job)["job"]["status"]
    listed = iot.list_jobs(status="DELETION_IN_PROGRESS")["jobs"]
    with pytest.raises(iot.exceptions.ResourceAlreadyExistsException):
        iot.create_job(jobId=job, targets=[arn], document=json.dumps(DOC))

    def gone() -> bool:
        try:
            iot.describe_job(jobId=job)
        except iot.exceptions.ResourceNotFoundException:
            return True
        return False

    _wait(gone)
    iot.create_job(jobId=job, targets=[arn], document=json.dumps({**DOC, "again": True}))
    second = device.ask(f"{job}/get", b"")[1]["execution"]

    assert "force" in info.value.response["Error"]["Message"]
    assert during == "DELETION_IN_PROGRESS"
    assert job in [j["jobId"] for j in listed]
    assert (first["executionNumber"], second["executionNumber"]) == (1, 1)  # may be reused
    assert second["queuedAt"] > first["queuedAt"]  # ... the queue time tells them apart
    assert second["jobDocument"] == {**DOC, "again": True}


# ----------------------------------------------------------------------------- deep documents


@pytest.mark.parametrize("depth", [600, 12000])
def test_a_deeply_nested_document_does_not_stop_the_emulator(
        iot: Any, data: Any, thing: Thing, device: Device, depth: int) -> None:
    """600 levels: past copy.deepcopy's reach; 12,000: past Python's json parser too."""
    arn = iot.describe_thing(thingName=thing.name)["thingArn"]
    deep = '{"operation":"deep","x":' + "[" * depth + "]" * depth + "}"
    deep_job, next_job = thing.j("deep"), thing.j("after")

    iot.create_job(jobId=deep_job, targets=[arn], document=deep)
    iot.create_job(jobId=next_job, targets=[arn], document=json.dumps(DOC))
    _, raw = device.next("notify-next")
    device.send(f"{deep_job}/get", b"{}")
    described = device.next(f"{deep_job}/get")
    over_http = data.describe_job_execution(thingName=thing.name, jobId=deep_job)["execution"]
    fetched = iot.get_job_document(jobId=deep_job)["document"]
    data.update_job_execution(thingName=thing.name, jobId=deep_job, status="REJECTED")
    following = device.ask("start-next", b'{"clientToken":"' + uuid.uuid4().hex.encode() + b'"}')

    assert deep.encode() in raw  # spliced verbatim into notify-next
    assert described[0].endswith("/accepted") and deep.encode() in described[1]
    assert over_http["jobDocument"] == fetched == deep
    assert following[0] == "accepted"
    assert following[1]["execution"]["jobId"] == next_job
