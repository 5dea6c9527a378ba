"""Notifications, isolation between things, broker restarts, timeouts and TLS failures."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import load_config
from agent.connection import Connection
from agent.errors import (
    CertificateValidationException,
    ConnectionFailedError,
    RequestFailedError,
    RequestTimeoutError,
)
from agent.jobs import JobsClient, JobsEvent
from agent.sandbox.broker import start_broker
from agent.sandbox.dynsec import Acl
from agent.sandbox.pki import create_pki
from agent.sandbox.stack import Stack
from tests.conftest import Thing, boto3_shape_errors, open_client, run

pytestmark = pytest.mark.broker

DOC = {"operation": "noop"}


async def next_of(jobs: JobsClient, kinds: set[str], timeout: float = 10.0) -> JobsEvent:
    """The next event of one of ``kinds`` (subscription bookkeeping events are skipped)."""
    while True:
        event = await jobs.next_event(timeout)
        if event.kind in kinds:
            return event


async def wait_streams(jobs: JobsClient) -> None:
    seen: set[str] = set()
    while seen != {"notify", "notify-next"}:
        event = await next_of(jobs, {"subscribed"})
        seen.add(event.body["stream"])


def test_notify_and_notify_next_streams(thing: Thing) -> None:
    async def body() -> list[JobsEvent]:
        async with open_client(thing.config, streams=True) as jobs:
            await wait_streams(jobs)
            events = []
            thing.emulator.create_job(thing.j("n1"), [thing.name], DOC)
            events += [await next_of(jobs, {"notify", "notify-next"}) for _ in range(2)]
            await jobs.update_job_execution(jobId=thing.j("n1"), thingName=thing.name,
                                            status="SUCCEEDED")
            events += [await next_of(jobs, {"notify", "notify-next"}) for _ in range(2)]
            return events

    events = run(body())
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_kind.setdefault(event.kind, []).append(event.body)
    added, emptied = by_kind["notify"]
    assert [s["jobId"] for s in added["jobs"]["QUEUED"]] == [thing.j("n1")]
    assert boto3_shape_errors("GetPendingJobExecutions",
                              {"queuedJobs": added["jobs"]["QUEUED"]}) == ""
    assert emptied["jobs"] == {}
    head, none = by_kind["notify-next"]
    assert head["execution"]["jobId"] == thing.j("n1")
    assert json.loads(head["execution"]["jobDocument"]) == DOC
    assert boto3_shape_errors("DescribeJobExecution", {"execution": head["execution"]}) == ""
    assert "execution" not in none
    assert all(type(e.body["timestamp"]) is int for e in events)


def test_a_thing_cannot_use_another_things_topics(stack: Stack, thing: Thing) -> None:
    other = stack.thing(f"{thing.name[:50]}-other")
    other_name = load_config(other).thing_name
    stack.emulator.create_job(thing.j("private"), [other_name], DOC)

    async def body() -> list[Any]:
        async with open_client(thing.config, request_timeout=3) as jobs:
            # Our streams, opened on the *other* thing's topics: the ACL silences them.
            jobs.open_streams(other_name)
            with pytest.raises(RequestFailedError) as info:
                await jobs.get_pending_job_executions(thingName=other_name)
            with pytest.raises((RequestFailedError, RequestTimeoutError)):
                await jobs.update_job_execution(jobId=thing.j("private"), thingName=other_name,
                                                status="SUCCEEDED")
            stack.emulator.create_job(thing.j("private-2"), [other_name], DOC)
            got = []
            with pytest.raises(TimeoutError):
                while True:
                    event = await jobs.next_event(2.0)
                    if event.kind in ("notify", "notify-next"):
                        got.append(event)
            return [info.value, got]

    error, got = run(body())
    # The broker refuses the subscription to the other thing's answers (SUBACK 0x87), as AWS.
    assert "SUBSCRIBE" in str(error).upper()
    assert got == []
    assert stack.emulator.execution(thing.j("private"), other_name)["status"] == "QUEUED"


def test_requests_and_streams_survive_a_broker_restart(own_stack: Stack, request: Any) -> None:
    name = "restart-thing"
    config = load_config(own_stack.thing(name, mqtt={"reconnect_min": "100ms",
                                                     "reconnect_max": "1s"}))
    emulator = own_stack.emulator
    broker = own_stack.broker
    assert emulator is not None and broker is not None
    emulator.create_job("before", [name], DOC)

    async def body() -> dict[str, Any]:
        async with open_client(config, streams=True, request_timeout=8) as jobs:
            await wait_streams(jobs)
            assert (await jobs.get_pending_job_executions(thingName=name))["queuedJobs"]
            # Fire requests, then pull the broker out from under them. MQTT gives them no
            # guarantee (the emulator may not be subscribed again when they arrive), but each
            # must end: answered correctly or RequestTimeoutError, never a hang or a wrong reply.
            in_flight = [asyncio.ensure_future(jobs.describe_job_execution(
                jobId="before", thingName=name)) for _ in range(3)]
            await asyncio.to_thread(broker.restart)
            during = await asyncio.gather(*in_flight, return_exceptions=True)
            # The session was lost (clean start): streams must re-subscribe by themselves.
            assert await asyncio.to_thread(emulator.wait_subscribed, 20)
            await next_of(jobs, {"subscription-lost"}, 10)
            await wait_streams(jobs)
            started = await jobs.start_next_pending_job_execution(thingName=name)
            emulator.create_job("after", [name], DOC)
            notify = await next_of(jobs, {"notify"}, 15)
            return {"during": during, "started": started, "notify": notify.body}

    out = run(body())
    for result in out["during"]:
        assert isinstance(result, RequestTimeoutError) or result["execution"]["jobId"] == "before"
    assert out["started"]["execution"]["jobId"] == "before"
    assert [s["jobId"] for s in out["notify"]["jobs"]["QUEUED"]] == ["before", "after"][1:]


def test_no_reply_is_a_timeout(tmp_path: Path) -> None:
    """A broker with nobody serving the Jobs topics: the caller gets RequestTimeoutError."""
    pki = create_pki(tmp_path / "pki")
    identity = pki.client("lonely")
    with start_broker(tmp_path / "broker", pki) as broker:
        broker.grant("lonely", allow=[Acl(kind, "$aws/things/lonely/jobs/#") for kind in (
            "publishClientSend", "publishClientReceive", "subscribePattern")])
        config = write_config(tmp_path, "lonely", broker.port, identity.cert, identity.key,
                              pki.ca_cert)

        async def body() -> RequestTimeoutError:
            async with open_client(load_config(config), request_timeout=2) as jobs:
                with pytest.raises(RequestTimeoutError) as info:
                    await jobs.get_pending_job_executions(thingName="lonely")
                return info.value

        exc = run(body())
    assert exc.operation == "get"
    assert "2s" in str(exc)


def write_config(directory: Path, thing: str, port: int, cert: Path, key: Path, ca: Path,
                 **mqtt: Any) -> Path:
    path = directory / f"{thing}.yaml"
    path.write_text(yaml.safe_dump({"thing_name": thing, "mqtt": {
        "endpoint": "127.0.0.1", "port": port, "cert": str(cert), "key": str(key),
        "ca": str(ca), **mqtt}}))
    return path


def test_connection_refused_times_out_with_a_clear_error(tmp_path: Path) -> None:
    pki = create_pki(tmp_path / "pki")
    identity = pki.client("nobody-home")
    config = load_config(write_config(tmp_path, "nobody-home", 1, identity.cert, identity.key,
                                      pki.ca_cert, connect_timeout="2s"))

    async def body() -> ConnectionFailedError:
        with pytest.raises(ConnectionFailedError) as info:
            async with Connection(config.mqtt, config.client_id):
                pass
        return info.value

    exc = run(body())
    assert not isinstance(exc, CertificateValidationException)
    assert "127.0.0.1:1" in str(exc)
    assert "CONNECTION_REFUSED" in str(exc)


@pytest.mark.slow
def test_foreign_client_certificate_is_certificate_validation_exception(
        stack: Stack, tmp_path: Path) -> None:
    assert stack.pki is not None and stack.broker is not None
    impostor = stack.pki.foreign_client("impostor")
    config = load_config(write_config(tmp_path, "impostor", stack.broker.port, impostor.cert,
                                      impostor.key, stack.pki.ca_cert, connect_timeout="60s"))

    async def body() -> CertificateValidationException:
        with pytest.raises(CertificateValidationException) as info:
            async with Connection(config.mqtt, config.client_id):
                pass
        return info.value

    exc = run(body())
    assert str(impostor.cert) in str(exc)  # names the file to check
    assert exc.code == "CertificateValidation"


@pytest.mark.slow
def test_untrusted_server_certificate_is_certificate_validation_exception(
        stack: Stack, tmp_path: Path) -> None:
    assert stack.pki is not None and stack.broker is not None
    identity = stack.pki.client("trusting")
    other_ca = create_pki(tmp_path / "other").ca_cert
    config = load_config(write_config(tmp_path, "trusting", stack.broker.port, identity.cert,
                                      identity.key, other_ca, connect_timeout="60s"))

    async def body() -> CertificateValidationException:
        with pytest.raises(CertificateValidationException) as info:
            async with Connection(config.mqtt, config.client_id):
                pass
        return info.value

    assert str(other_ca) in str(run(body()))


def test_unloadable_key_is_certificate_validation_exception(thing: Thing, tmp_path: Path) -> None:
    config = thing.config
    bad_key = tmp_path / "garbage.key"
    bad_key.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    bad_key.chmod(0o600)
    path = write_config(tmp_path, thing.name, config.mqtt.port, config.mqtt.cert, bad_key,
                        config.mqtt.ca or Path("/nonexistent"))

    async def body() -> CertificateValidationException:
        cfg = load_config(path)
        with pytest.raises(CertificateValidationException) as info:
            async with Connection(cfg.mqtt, cfg.client_id):
                pass
        return info.value

    assert str(bad_key) in str(run(body()))


def test_mosquitto_is_installed() -> None:
    """Guard against a silently skipped suite: CI must have the real broker."""
    assert shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()
