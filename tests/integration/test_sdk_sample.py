"""AWS IoT Device SDK v2's own jobs sample, as a client nobody here wrote, against the sandbox.

The sample is ``samples/service_clients/jobs.py`` in aws/aws-iot-device-sdk-python-v2 (v1.28):
an MQTT 5 client from ``mqtt5_client_builder.mtls_from_path``, ``IotJobsClientV2`` with
``ClientOptions(2, 2, 30)``, the ``job_executions_changed`` and ``next_job_execution_changed``
streams, boto3's ``iot`` client for ``describe_thing``/``create_thing``, ``create_job`` and
``delete_job(force=True)``, and the four device calls. It is an interactive program, so this test
makes the same SDK calls in the order a user of it would, and checks what the SDK itself parses
out of the sandbox's answers (its own deserialisers, its own error types). Differences from the
sample: the endpoint, port and CA are the sandbox's, and the client id is the thing name (the
sample leaves it to the broker, which an AWS policy scoped to
``client/${iot:Connection.Thing.ThingName}`` refuses).
"""

from __future__ import annotations

import json
import queue
from concurrent.futures import Future
from typing import Any

import awsiot
import pytest
from awscrt import mqtt_request_response
from awsiot import iotjobs, mqtt5_client_builder

from agent.sandbox.stack import Stack
from tests.conftest import Thing
from tests.integration.test_boto3_referee import sandbox_client

pytestmark = pytest.mark.broker

TIMEOUT = 30.0
ESTABLISHED = mqtt_request_response.SubscriptionStatusEventType.SUBSCRIPTION_ESTABLISHED


class Stream:
    """One of the sample's streams: events and subscription status, queued from CRT threads."""

    def __init__(self) -> None:
        self.events: queue.Queue[Any] = queue.Queue()
        self.status: queue.Queue[Any] = queue.Queue()
        self.failures: list[Any] = []
        self.options = awsiot.ServiceStreamOptions(
            incoming_event_listener=self.events.put,
            subscription_status_listener=self.status.put,
            deserialization_failure_listener=self.failures.append)

    def established(self) -> None:
        event = self.status.get(timeout=TIMEOUT)
        assert event.type == ESTABLISHED, event

    def next(self) -> Any:
        return self.events.get(timeout=TIMEOUT)


def test_the_sdk_jobs_sample_runs_a_job_against_the_sandbox(stack: Stack, thing: Thing) -> None:
    assert stack.broker is not None and stack.pki is not None
    identity = stack.pki.client(thing.name)
    connected: Future[bool] = Future()
    stopped: Future[bool] = Future()
    client = mqtt5_client_builder.mtls_from_path(
        endpoint=stack.broker.host, port=stack.broker.port, cert_filepath=str(identity.cert),
        pri_key_filepath=str(identity.key), ca_filepath=str(stack.pki.ca_cert),
        client_id=thing.name, clean_session=True, keep_alive_secs=1200,
        on_lifecycle_connection_success=lambda _: connected.set_result(True),
        on_lifecycle_stopped=lambda _: stopped.set_result(True))
    client.start()
    jobs = iotjobs.IotJobsClientV2(client, mqtt_request_response.ClientOptions(
        max_request_response_subscriptions=2, max_streaming_subscriptions=2,
        operation_timeout_in_seconds=30))
    try:
        connected.result(TIMEOUT)
        changed, next_changed = Stream(), Stream()
        # Kept referenced, as the sample does: a collected stream closes itself.
        streams = [
            jobs.create_job_executions_changed_stream(
                iotjobs.JobExecutionsChangedSubscriptionRequest(thing_name=thing.name),
                changed.options),
            jobs.create_next_job_execution_changed_stream(
                iotjobs.NextJobExecutionChangedSubscriptionRequest(thing_name=thing.name),
                next_changed.options)]
        for stream in streams:
            stream.open()
        changed.established()
        next_changed.established()

        iot = sandbox_client("iot", stack.control_endpoint, stack.region)
        thing_arn = iot.describe_thing(thingName=thing.name)["thingArn"]  # the sample's
        job_id = thing.j("sample")  # create_thing_if_needed, then "create-job <id> <json>"
        iot.create_job(jobId=job_id, document=json.dumps({"operation": "run-script"}),
                       targets=[thing_arn], targetSelection="SNAPSHOT")
        queued: iotjobs.JobExecutionsChangedEvent = changed.next()
        head: iotjobs.NextJobExecutionChangedEvent = next_changed.next()

        pending = jobs.get_pending_job_executions(iotjobs.GetPendingJobExecutionsRequest(
            thing_name=thing.name)).result(TIMEOUT)
        started = jobs.start_next_pending_job_execution(
            iotjobs.StartNextPendingJobExecutionRequest(thing_name=thing.name)).result(TIMEOUT)
        described = jobs.describe_job_execution(iotjobs.DescribeJobExecutionRequest(
            job_id=job_id, thing_name=thing.name)).result(TIMEOUT)
        updated = jobs.update_job_execution(iotjobs.UpdateJobExecutionRequest(
            thing_name=thing.name, job_id=job_id, status="SUCCEEDED")).result(TIMEOUT)
        emptied: iotjobs.JobExecutionsChangedEvent = changed.next()
        none_left: iotjobs.NextJobExecutionChangedEvent = next_changed.next()
        again = jobs.update_job_execution(iotjobs.UpdateJobExecutionRequest(
            thing_name=thing.name, job_id=job_id, status="IN_PROGRESS"))
        with pytest.raises(awsiot.V2ServiceException) as info:
            again.result(TIMEOUT)
        iot.delete_job(jobId=job_id, force=True)  # the sample's "delete-job <id>"
        missing = jobs.describe_job_execution(iotjobs.DescribeJobExecutionRequest(
            job_id=job_id, thing_name=thing.name))
        with pytest.raises(awsiot.V2ServiceException) as gone:
            missing.result(TIMEOUT)
    finally:
        client.stop()
        stopped.result(TIMEOUT)

    assert [s.job_id for s in queued.jobs["QUEUED"]] == [job_id]
    assert head.execution.job_id == job_id and head.execution.status == "QUEUED"
    assert head.execution.job_document == {"operation": "run-script"}
    assert [s.job_id for s in pending.queued_jobs] == [job_id] and pending.in_progress_jobs == []
    assert started.execution.job_id == job_id and started.execution.status == "IN_PROGRESS"
    assert started.execution.version_number == 2 and started.execution.started_at is not None
    assert started.execution.thing_name is None  # MQTT carries none, as AWS's captures show
    assert described.execution.status == "IN_PROGRESS"
    assert described.execution.job_document == {"operation": "run-script"}
    assert updated.client_token  # the SDK correlated the reply by its own token
    assert emptied.jobs == {} and none_left.execution is None
    assert info.value.modeled_error.code == iotjobs.RejectedErrorCode.INVALID_STATE_TRANSITION
    assert info.value.modeled_error.execution_state.status == "SUCCEEDED"
    assert gone.value.modeled_error.code == iotjobs.RejectedErrorCode.RESOURCE_NOT_FOUND
    assert changed.failures == next_changed.failures == []
