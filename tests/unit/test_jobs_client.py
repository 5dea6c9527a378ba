"""The Jobs client's own logic, against a fake connection that records every packet.

In addition to the integration tests (real Mosquitto, real awscrt, the emulator), never instead:
here every ordering, refusal and malformed reply can be produced on purpose, and the packets the
client sends are counted exactly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import types
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from agent.connection import ConnectionEvent, ConnectionState, PublishAck
from agent.errors import (
    ConflictException,
    InvalidResponseError,
    NotAuthorizedError,
    RequestFailedError,
    RequestTimeoutError,
)
from agent.jobs.client import JobsClient, reply_filters
from agent.refusals import RefusalLog

T = TypeVar("T")
THING = "dev-1"
PREFIX = f"$aws/things/{THING}/jobs"
STREAM_FILTERS = [f"{PREFIX}/notify", f"{PREFIX}/notify-next"]


class FakeConnection:
    """Stands in for agent.connection.Connection: the test plays the broker and the service."""

    def __init__(self) -> None:
        self.state = ConnectionState.IDLE
        self.connections = 0
        self.refusals = RefusalLog()
        self.listeners: list[Callable[[ConnectionEvent], None]] = []
        self.message_listeners: list[Callable[[str, bytes], None]] = []
        self.subscribes: list[tuple[list[str], asyncio.Future[list[int]]]] = []
        self.publishes: list[tuple[str, dict[str, Any]]] = []
        self.suback_codes: dict[str, int] = {}  # filter -> reason code (default granted)
        self.puback_code = 0
        self.auto_suback = True

    @property
    def connected(self) -> bool:
        return self.state is ConnectionState.CONNECTED

    def add_listener(self, listener: Callable[[ConnectionEvent], None]) -> None:
        self.listeners.append(listener)

    def add_message_listener(self, listener: Callable[[str, bytes], None]) -> None:
        self.message_listeners.append(listener)

    def connect(self, rejoined: bool = False) -> None:
        self.state = ConnectionState.CONNECTED
        self.connections += 1
        for listener in self.listeners:
            listener(ConnectionEvent("connected", rejoined=rejoined))

    def drop(self) -> None:
        self.state = ConnectionState.CONNECTING
        for listener in self.listeners:
            listener(ConnectionEvent("disconnected"))

    def subscribe_codes(self, filters: list[str]) -> asyncio.Future[list[int]]:
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self.subscribes.append((list(filters), future))
        if self.auto_suback:
            future.set_result([self.suback_codes.get(f, 1) for f in filters])
        return future

    def publish_acked(self, topic: str, payload: bytes,
                      on_refused: Callable[[int | None, BaseException | None], None]
                      ) -> PublishAck:
        self.publishes.append((topic, json.loads(payload)))
        acked: concurrent.futures.Future[Any] = concurrent.futures.Future()
        acked.set_result(types.SimpleNamespace(puback=types.SimpleNamespace(
            reason_code=self.puback_code)))
        if self.puback_code >= 0x80:
            asyncio.get_running_loop().call_soon(on_refused, self.puback_code, None)
        return PublishAck(acked)

    def deliver(self, topic: str, payload: bytes | dict[str, Any]) -> None:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        for listener in self.message_listeners:
            listener(topic, raw)

    async def next_publish(self, count: int = 1) -> tuple[str, dict[str, Any]]:
        while len(self.publishes) < count:
            await asyncio.sleep(0)
        return self.publishes[count - 1]


def run(body: Callable[[FakeConnection, JobsClient], Awaitable[T]], *,
        timeout: float = 5.0) -> tuple[T, FakeConnection, JobsClient]:
    async def main() -> tuple[T, FakeConnection, JobsClient]:
        connection = FakeConnection()
        jobs = JobsClient(connection, request_timeout=timeout)  # type: ignore[arg-type]
        return await body(connection, jobs), connection, jobs

    return asyncio.run(main())


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_one_subscribe_per_session_then_one_publish_per_request() -> None:
    async def body(conn: FakeConnection, jobs: JobsClient) -> list[dict[str, Any]]:
        jobs.open_streams(THING)
        conn.connect()
        await settle()
        results = []
        for i in range(3):
            task = asyncio.ensure_future(jobs.get_pending_job_executions(thingName=THING))
            topic, request = await conn.next_publish(i + 1)
            assert topic == f"{PREFIX}/get"
            conn.deliver(f"{topic}/accepted", {"clientToken": request["clientToken"],
                                               "queuedJobs": [], "inProgressJobs": []})
            results.append(await task)
        return results

    results, conn, jobs = run(body)
    assert results == [{"inProgressJobs": [], "queuedJobs": []}] * 3
    assert len(conn.subscribes) == 1  # streams and reply filters together, once
    assert sorted(conn.subscribes[0][0]) == sorted([*STREAM_FILTERS, *reply_filters(THING)])
    assert len(conn.publishes) == 3
    assert jobs.subscriptions.subscribes == 1


def test_concurrent_replies_out_of_order_are_matched_by_token() -> None:
    async def body(conn: FakeConnection, jobs: JobsClient) -> list[dict[str, Any]]:
        conn.connect()
        tasks = [asyncio.ensure_future(jobs.describe_job_execution(jobId=f"j{i}",
                                                                   thingName=THING))
                 for i in range(3)]
        await conn.next_publish(3)
        for topic, request in reversed(conn.publishes):
            job = topic.split("/")[-2]
            conn.deliver(f"{topic}/accepted", {
                "clientToken": request["clientToken"],
                "execution": {"jobId": job, "status": "QUEUED", "versionNumber": 1,
                              "executionNumber": 1}})
        return list(await asyncio.gather(*tasks))

    results, conn, _ = run(body)
    assert [r["execution"]["jobId"] for r in results] == ["j0", "j1", "j2"]
    assert len(conn.subscribes) == 1 and len(conn.subscribes[0][0]) == 4


def test_rejection_is_the_boto3_exception() -> None:
    async def body(conn: FakeConnection, jobs: JobsClient) -> ConflictException:
        conn.connect()
        task = asyncio.ensure_future(jobs.update_job_execution(
            jobId="j", thingName=THING, status="IN_PROGRESS", expectedVersion=3))
        topic, request = await conn.next_publish()
        conn.deliver(f"{topic}/rejected", {
            "clientToken": request["clientToken"], "code": "VersionMismatch", "message": "no",
            "executionState": {"status": "QUEUED", "versionNumber": 1}})
        with pytest.raises(ConflictException) as info:
            await task
        return info.value

    exc, _, _ = run(body)
    assert exc.execution_state == {"status": "QUEUED", "versionNumber": 1}


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("case", ["deep-990", "deep-100k", "invalid-utf8", "truncated",
                                  "not-an-object"])
def test_an_unreadable_reply_fails_its_own_request_at_once(case: str) -> None:
    """Not a timeout: the token is found in the raw bytes on the request's reply topic."""

    def reply(token: str) -> bytes:
        head = b'{"clientToken":"' + token.encode() + b'","execution":{"jobDocument":'
        return {
            "deep-990": head + _nested(990) + b"}}",
            "deep-100k": head + _nested(100_000) + b"}}",
            "invalid-utf8": head + b'{"a":"\xff\xfe"}}}',
            "truncated": head + b'{"a":',
            "not-an-object": b'["' + token.encode() + b'"]',
        }[case]

    async def body(conn: FakeConnection, jobs: JobsClient) -> tuple[Exception, list[Any]]:
        conn.connect()
        other = asyncio.ensure_future(jobs.describe_job_execution(jobId="b", thingName=THING))
        task = asyncio.ensure_future(jobs.describe_job_execution(jobId="a", thingName=THING))
        await conn.next_publish(2)
        (t_b, r_b), (t_a, r_a) = conn.publishes[:2]
        conn.deliver(f"{t_a}/accepted", reply(r_a["clientToken"]))
        with pytest.raises(InvalidResponseError) as info:
            await task
        # The other request is untouched and still answered normally.
        conn.deliver(f"{t_b}/accepted", {"clientToken": r_b["clientToken"], "execution": {
            "jobId": "b", "status": "QUEUED", "versionNumber": 1, "executionNumber": 1}})
        return info.value, [await other]

    (exc, others), _, _ = run(body, timeout=60)
    assert exc.client_token
    assert "describe" in str(exc) and "a/get/accepted" in str(exc)
    assert others[0]["execution"]["jobId"] == "b"


@pytest.mark.parametrize("surrogate", [b"\\ud800", b"\xed\xa0\x80"], ids=["escaped", "raw"])
def test_a_lone_surrogate_is_read_and_comes_back_as_is(surrogate: bytes) -> None:
    """json reads both forms (bytes with 'surrogatepass'); what to do with it is the caller's."""

    async def body(conn: FakeConnection, jobs: JobsClient) -> dict[str, Any]:
        conn.connect()
        task = asyncio.ensure_future(jobs.describe_job_execution(jobId="s", thingName=THING))
        topic, request = await conn.next_publish()
        raw = (b'{"clientToken":"' + request["clientToken"].encode() + b'","execution":'
               b'{"jobId":"s","status":"QUEUED","versionNumber":1,"executionNumber":1,'
               b'"jobDocument":{"k":"' + surrogate + b'"}}}')
        conn.deliver(f"{topic}/accepted", raw)
        return await task

    result, _, _ = run(body)
    assert json.loads(result["execution"]["jobDocument"]) == {"k": "\ud800"}


def test_a_token_on_another_operations_topic_is_not_a_reply() -> None:
    async def body(conn: FakeConnection, jobs: JobsClient) -> type[Exception]:
        conn.connect()
        task = asyncio.ensure_future(jobs.get_pending_job_executions(thingName=THING))
        _, request = await conn.next_publish()
        conn.deliver(f"{PREFIX}/start-next/accepted", {"clientToken": request["clientToken"]})
        conn.deliver(f"{PREFIX}/x/get/accepted", b"[" * 5000 + request["clientToken"].encode())
        with pytest.raises(RequestTimeoutError):
            await task
        return RequestTimeoutError

    run(body, timeout=0.3)


def test_refused_publish_is_not_authorized_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    async def body(conn: FakeConnection, jobs: JobsClient) -> list[NotAuthorizedError]:
        conn.connect()
        conn.puback_code = 0x87
        errors = []
        for _ in range(3):
            with pytest.raises(NotAuthorizedError) as info:
                await jobs.get_pending_job_executions(thingName=THING)
            errors.append(info.value)
        return errors

    with caplog.at_level(logging.DEBUG, logger="agent.policy"):
        errors, _, _ = run(body)
    assert all(e.action == "iot:Publish" and e.topic == f"{PREFIX}/get" for e in errors)
    assert "iot:Publish on topic/$aws/things/dev-1/jobs/get" in str(errors[0])
    lines = [r for r in caplog.records if r.name == "agent.policy" and r.levelno == logging.ERROR]
    assert len(lines) == 1
    assert "iot:Publish" in lines[0].getMessage() and f"{PREFIX}/get" in lines[0].getMessage()


def test_other_puback_failures_are_request_failed_without_blaming_the_policy() -> None:
    async def body(conn: FakeConnection, jobs: JobsClient) -> RequestFailedError:
        conn.connect()
        conn.puback_code = 0x97  # quota exceeded
        with pytest.raises(RequestFailedError) as info:
            await jobs.get_pending_job_executions(thingName=THING)
        return info.value

    exc, _, _ = run(body)
    assert not isinstance(exc, NotAuthorizedError)
    assert "quota exceeded" in str(exc) and "iot:" not in str(exc)


def test_refused_reply_subscription_fails_requests_and_is_retried_by_the_next() -> None:
    async def body(conn: FakeConnection, jobs: JobsClient) -> tuple[NotAuthorizedError, Any]:
        conn.suback_codes = {f"{PREFIX}/+/accepted": 0x87}
        conn.connect()
        with pytest.raises(NotAuthorizedError) as info:
            await jobs.get_pending_job_executions(thingName=THING)
        assert conn.publishes == []  # nothing sent that could not be answered
        conn.suback_codes = {}  # the policy was fixed
        task = asyncio.ensure_future(jobs.get_pending_job_executions(thingName=THING))
        topic, request = await conn.next_publish()
        conn.deliver(f"{topic}/accepted", {"clientToken": request["clientToken"]})
        return info.value, await task

    (exc, after), conn, _ = run(body)
    assert exc.action == "iot:Subscribe" and exc.topic == f"{PREFIX}/+/accepted"
    assert "topicfilter/$aws/things/dev-1/jobs/+/accepted" in str(exc)
    assert after == {"inProgressJobs": [], "queuedJobs": []}
    assert len(conn.subscribes) == 2
    assert conn.subscribes[1][0] == [f"{PREFIX}/+/accepted"]  # only the refused one again


def test_stream_events_subscribed_halted_lost(caplog: pytest.LogCaptureFixture) -> None:
    async def body(conn: FakeConnection, jobs: JobsClient) -> list[tuple[str, str]]:
        conn.suback_codes = {f"{PREFIX}/notify": 0x87}
        jobs.open_streams(THING)
        conn.connect()
        await settle()
        conn.drop()
        conn.connect(rejoined=True)  # session kept: nothing lost, the refusal is retried
        await settle()
        conn.suback_codes = {}
        conn.drop()
        conn.connect(rejoined=False)  # session lost: lost, then subscribed again
        await settle()
        events = []
        while (event := jobs.next_event_nowait()) is not None:
            events.append((event.kind, event.body["stream"]))
        return events

    with caplog.at_level(logging.INFO):
        events, conn, _ = run(body)
    assert events == [
        ("subscription-halted", "notify"), ("subscribed", "notify-next"),
        ("subscription-halted", "notify"),  # retried after the rejoin, refused again
        ("subscription-lost", "notify-next"),
        ("subscribed", "notify"), ("subscribed", "notify-next"),
    ]
    assert [len(filters) for filters, _ in conn.subscribes] == [6, 1, 6]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "iot:Subscribe on topicfilter/" + STREAM_FILTERS[0] in errors[0]
    assert any("now allows iot:Subscribe" in r.getMessage() for r in caplog.records)


def test_requests_wait_for_the_connection_and_the_resubscription() -> None:
    async def body(conn: FakeConnection, jobs: JobsClient) -> dict[str, Any]:
        conn.auto_suback = False
        jobs.open_streams(THING)
        task = asyncio.ensure_future(jobs.get_pending_job_executions(thingName=THING))
        await settle()
        assert conn.subscribes == [] and conn.publishes == []  # offline: nothing sent
        conn.connect()
        await settle()
        assert len(conn.subscribes) == 1 and conn.publishes == []  # SUBACK first
        conn.subscribes[0][1].set_result([1] * 6)
        topic, request = await conn.next_publish()
        conn.deliver(f"{topic}/accepted", {"clientToken": request["clientToken"]})
        return await task

    assert run(body)[0] == {"inProgressJobs": [], "queuedJobs": []}


def test_silent_replies_point_at_iot_receive(caplog: pytest.LogCaptureFixture) -> None:
    async def body(conn: FakeConnection, jobs: JobsClient) -> list[str]:
        conn.connect()
        messages = []
        for _ in range(3):
            with pytest.raises(RequestTimeoutError) as info:
                await jobs.get_pending_job_executions(thingName=THING)
            messages.append(str(info.value))
        return messages

    with caplog.at_level(logging.WARNING, logger="agent.policy"):
        messages, _, _ = run(body, timeout=0.2)
    assert all("no reply from the Jobs service within 0.2s" in m for m in messages)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "iot:Receive on topic/$aws/things/dev-1/jobs/get/accepted" in errors[0]


def test_no_subscribers_is_a_timeout_that_says_so() -> None:
    async def body(conn: FakeConnection, jobs: JobsClient) -> str:
        conn.connect()
        conn.puback_code = 0x10
        with pytest.raises(RequestTimeoutError) as info:
            await jobs.get_pending_job_executions(thingName=THING)
        return str(info.value)

    assert "no subscriber" in run(body, timeout=0.2)[0]


def test_disconnect_diagnosis(caplog: pytest.LogCaptureFixture) -> None:
    refusals = RefusalLog()
    topic = f"{PREFIX}/get"
    with caplog.at_level(logging.DEBUG, logger="agent.policy"):
        assert refusals.disconnected([], None, "HANGUP") is None  # nothing in flight
        first = refusals.disconnected([("publish", topic)], None, "HANGUP")
        second = refusals.disconnected([("publish", topic)], None, "HANGUP")
        refusals.disconnected([("publish", topic)], None, "HANGUP")
        told = refusals.disconnected([("subscribe", STREAM_FILTERS[0])], 0x87, "")
    levels = [r.levelname for r in caplog.records]
    assert levels == ["WARNING", "ERROR", "DEBUG", "ERROR"]
    assert first and second and "iot:Publish on topic/" + topic in second
    assert told and "iot:Subscribe on topicfilter/" + STREAM_FILTERS[0] in told
