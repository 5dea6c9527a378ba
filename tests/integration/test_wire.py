"""What the Jobs client puts on the wire, counted by the real broker, and what it survives.

Real parts only: the agent's JobsClient on the real awscrt MQTT5 client, a real Mosquitto (its
own log is the independent count), the emulator, and an emulated link (a TCP proxy that can
drop every connection, as a dead cell does).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import agent.jobs.client as client_module
from agent.config import load_config
from agent.errors import InvalidResponseError
from agent.sandbox.link import Link
from agent.sandbox.stack import Stack
from tests.conftest import Thing, open_client, run

pytestmark = pytest.mark.broker

DOC = {"operation": "noop"}
_RECEIVED = re.compile(r"Received (PUBLISH|SUBSCRIBE|UNSUBSCRIBE) from (\S+)")


def broker_ops(stack: Stack, client_id: str, offset: int) -> dict[str, int]:
    """What ``client_id`` sent since ``offset`` in Mosquitto's log, by packet type."""
    assert stack.broker is not None
    with open(stack.broker.log_path, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    counts = {"PUBLISH": 0, "SUBSCRIBE": 0, "UNSUBSCRIBE": 0}
    for kind, who in _RECEIVED.findall(text):
        if who == client_id:
            counts[kind] += 1
    return counts


def log_size(stack: Stack) -> int:
    assert stack.broker is not None
    return stack.broker.log_path.stat().st_size


async def wait_streams(jobs: Any) -> None:
    seen: set[str] = set()
    while seen != {"notify", "notify-next"}:
        event = await jobs.next_event(10)
        if event.kind == "subscribed":
            seen.add(event.body["stream"])


def test_each_request_is_one_publish_at_the_broker(thing: Thing) -> None:
    thing.emulator.create_job(thing.j("w1"), [thing.name], DOC)
    offset = log_size(thing.stack)

    async def body() -> None:
        async with open_client(thing.config, streams=True) as jobs:
            await wait_streams(jobs)
            for _ in range(5):
                await jobs.get_pending_job_executions(thingName=thing.name)
            await jobs.describe_job_execution(jobId=thing.j("w1"), thingName=thing.name)
            await jobs.start_next_pending_job_execution(thingName=thing.name)
            await jobs.update_job_execution(jobId=thing.j("w1"), thingName=thing.name,
                                            status="SUCCEEDED", expectedVersion=2)

    run(body())
    # 8 requests: 8 PUBLISH; one SUBSCRIBE for the session (2 streams + 4 reply filters).
    assert broker_ops(thing.stack, thing.config.client_id, offset) == {
        "PUBLISH": 8, "SUBSCRIBE": 1, "UNSUBSCRIBE": 0}


def record_tokens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The clientTokens the Jobs client generates from now on, in order."""
    issued: list[str] = []
    original = client_module._new_token

    def new_token() -> str:
        value = original()
        issued.append(value)
        return value

    monkeypatch.setattr(client_module, "_new_token", new_token)
    return issued


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


UNREADABLE = {
    "990 levels of valid JSON": lambda head: head + _nested(990) + b"}}",
    "100,000 levels": lambda head: head + _nested(100_000) + b"}}",
    "invalid UTF-8": lambda head: head + b'{"a":"\xff"}}}',
    "truncated": lambda head: head + b'{"a":[1,',
}


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_an_unreadable_reply_fails_its_request_at_once_not_after_the_timeout(
        thing: Thing, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    """Through the real CRT: the reply reaches Python whatever its bytes, and the request it
    answers ends with InvalidResponseError long before its 60 s timeout (a timeout fails the
    test: pytest.raises wants InvalidResponseError)."""
    issued = record_tokens(monkeypatch)
    job = thing.j("bad")
    thing.emulator.create_job(job, [thing.name], DOC)
    dropped = thing.emulator.dropped  # counts for the whole shared emulator
    thing.emulator.drop(1, {"describe"})  # the service never sees it; we answer instead
    topic = f"$aws/things/{thing.name}/jobs/{job}/get/accepted"

    async def body() -> InvalidResponseError:
        async with open_client(thing.config, request_timeout=60) as jobs:
            request = asyncio.ensure_future(
                jobs.describe_job_execution(jobId=job, thingName=thing.name))
            while thing.emulator.dropped == dropped:
                await asyncio.sleep(0.01)
            head = (b'{"clientToken":"' + issued[-1].encode()
                    + b'","execution":{"jobDocument":')
            thing.emulator.publish_raw(topic, UNREADABLE[case](head))
            with pytest.raises(InvalidResponseError) as info:
                await request
            # The client is fine afterwards: the next request is answered normally.
            again = await jobs.describe_job_execution(jobId=job, thingName=thing.name)
            assert again["execution"]["jobId"] == job
            return info.value

    exc = run(body())
    assert exc.client_token == issued[0]
    assert topic in str(exc)


@pytest.mark.parametrize("surrogate", [b"\\ud800", b"\xed\xa0\x80"], ids=["escaped", "raw"])
def test_a_lone_surrogate_in_a_document_reaches_the_caller(
        thing: Thing, monkeypatch: pytest.MonkeyPatch, surrogate: bytes) -> None:
    """The MQTT library used to drop this reply (a timeout); now it is read, as boto3 reads it."""
    issued = record_tokens(monkeypatch)
    job = thing.j("sur")
    thing.emulator.create_job(job, [thing.name], DOC)
    dropped = thing.emulator.dropped
    thing.emulator.drop(1, {"describe"})
    topic = f"$aws/things/{thing.name}/jobs/{job}/get/accepted"

    async def body() -> dict[str, Any]:
        async with open_client(thing.config, request_timeout=60) as jobs:
            request = asyncio.ensure_future(
                jobs.describe_job_execution(jobId=job, thingName=thing.name))
            while thing.emulator.dropped == dropped:
                await asyncio.sleep(0.01)
            thing.emulator.publish_raw(topic, (
                b'{"clientToken":"' + issued[-1].encode() + b'","execution":{"jobId":"'
                + job.encode() + b'","status":"QUEUED","versionNumber":1,"executionNumber":1,'
                b'"jobDocument":{"k":"' + surrogate + b'"}}}'))
            return await request

    result = run(body())
    assert json.loads(result["execution"]["jobDocument"]) == {"k": "\ud800"}


def _through(thing: Thing, link: Link, tmp_path: Path, **mqtt: Any) -> Any:
    config = yaml.safe_load(thing.config_path.read_text())
    config["mqtt"].update({"port": link.port, "reconnect_min": "100ms", "reconnect_max": "1s",
                           **mqtt})
    path = tmp_path / "via-link.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_config(path)


def test_a_dropped_connection_rejoins_the_session_without_subscribing_again(
        thing: Thing, tmp_path: Path) -> None:
    assert thing.stack.broker is not None
    offset = log_size(thing.stack)
    with Link(thing.stack.broker.port) as link:
        config = _through(thing, link, tmp_path)

        async def body() -> list[str]:
            async with open_client(config, streams=True) as jobs:
                await wait_streams(jobs)
                await jobs.get_pending_job_executions(thingName=thing.name)
                link.cut()
                # Waits for the reconnect, then goes out as one PUBLISH.
                await jobs.get_pending_job_executions(thingName=thing.name)
                thing.emulator.create_job(thing.j("after-cut"), [thing.name], DOC)
                kinds = []
                while "notify-next" not in kinds:
                    kinds.append((await jobs.next_event(10)).kind)
                return kinds

        kinds = run(body())
        assert link.connections == 2
    assert "subscription-lost" not in kinds  # the broker kept the session
    assert broker_ops(thing.stack, config.client_id, offset) == {
        "PUBLISH": 2, "SUBSCRIBE": 1, "UNSUBSCRIBE": 0}


def test_a_request_in_flight_when_the_link_dies_is_answered_after_the_reconnect(
        thing: Thing, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The rejoined session keeps the reply subscription; the client re-sends the PUBLISH."""
    assert thing.stack.broker is not None
    with Link(thing.stack.broker.port) as link:
        config = _through(thing, link, tmp_path)

        async def body() -> dict[str, Any]:
            async with open_client(config, request_timeout=30) as jobs:
                await jobs.get_pending_job_executions(thingName=thing.name)  # subscribed
                link.delay = 0.5  # the next request sits in the link...
                request = asyncio.ensure_future(
                    jobs.get_pending_job_executions(thingName=thing.name))
                await asyncio.sleep(0.1)
                link.cut()  # ... and dies with it
                link.delay = 0.0
                return await request

        with caplog.at_level(logging.WARNING, logger="agent.policy"):
            result = run(body())
    assert result == {"inProgressJobs": [], "queuedJobs": []}
    # A hang-up with a PUBLISH unanswered is what AWS IoT does to a refused publish: said, as
    # a suspicion (one occurrence is no proof), never as an error.
    policy = [r for r in caplog.records if r.name == "agent.policy"]
    assert [r.levelname for r in policy] == ["WARNING"], [r.getMessage() for r in policy]
    assert "iot:Publish" in policy[0].getMessage()


def test_pending_refused_by_the_policy_exits_77_with_one_line(
        stack: Stack, thing: Thing, tmp_path: Path) -> None:
    """A certificate whose policy covers only its own thing, asked about another thing."""
    config = yaml.safe_load(thing.config_path.read_text())
    config["thing_name"] = f"{thing.name[:40]}-not-mine"
    config["mqtt"]["client_id"] = thing.name  # the broker's ACL keys on the certificate
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-m", "agent", "pending", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 77, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("NotAuthorizedError: get: the broker refused")
    assert "the device's IoT policy must allow iot:" in lines[0]
    assert f"$aws/things/{config['thing_name']}/jobs/" in lines[0]
