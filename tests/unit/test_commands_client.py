"""The Commands client's own logic, against the Jobs client tests' fake connection.

In addition to the integration tests (real Mosquitto with AWS IoT policies, real awscrt, the
emulator), never instead: here the standing subscriptions, a refused SUBACK or PUBACK and the
held-back PUBACK of a request are produced on purpose and the packets counted exactly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from agent.commands import client as client_module
from agent.commands import shapes
from agent.commands.client import CommandsClient
from agent.connection import Message
from agent.errors import ConflictException, NotAuthorizedError
from tests.unit.test_jobs_client import FakeConnection, settle

T = TypeVar("T")
THING = "dev-1"
ROOT = shapes.topic_root(THING)
REQUEST_FILTER = shapes.request_filter(THING, "json")


class RoutingConnection(FakeConnection):
    """The fake connection, plus :meth:`Connection.route` and manual PUBACKs."""

    def __init__(self) -> None:
        super().__init__()
        self.routes: list[tuple[str, Callable[[Message], None], bool]] = []
        self.acked: list[str] = []

    def route(self, prefix: str, handler: Callable[[Message], None], *,
              manual_ack: bool = False) -> None:
        self.routes.append((prefix, handler, manual_ack))

    def acknowledge(self, message: Message) -> None:
        if message.ack_handle is not None:
            self.acked.append(message.topic)

    def deliver_routed(self, topic: str, payload: bytes) -> None:
        for prefix, handler, manual in self.routes:
            if topic.startswith(prefix):
                handler(Message(topic, payload, "application/json", 10, 0.0,
                                object() if manual else None))
                return
        raise AssertionError(f"no route for {topic}")


def run(body: Callable[[RoutingConnection, CommandsClient], Awaitable[T]],
        ) -> tuple[T, RoutingConnection, CommandsClient]:
    async def main() -> tuple[T, RoutingConnection, CommandsClient]:
        connection = RoutingConnection()
        client = CommandsClient(connection, THING, request_timeout=2.0)  # type: ignore[arg-type]
        try:
            return await body(connection, client), connection, client
        finally:
            await client.close()

    return asyncio.run(main())


def test_standing_subscriptions_once_per_session(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "agent.commands")

    async def body(conn: RoutingConnection, client: CommandsClient) -> list[int]:
        counts = []
        conn.connect()
        await settle()
        assert client.subscribed.is_set()
        counts.append(len(conn.subscribes))
        conn.drop()
        conn.connect(rejoined=True)  # the broker kept the session: nothing to do
        await settle()
        counts.append(len(conn.subscribes))
        conn.drop()
        conn.connect(rejoined=False)  # lost: subscribed again
        await settle()
        counts.append(len(conn.subscribes))
        return counts

    counts, conn, client = run(body)
    assert counts == [1, 1, 2]
    assert sorted(conn.subscribes[0][0]) == sorted(client.filters)
    assert set(client.filters) == {REQUEST_FILTER, *shapes.reply_filters(THING)}
    assert [r.message for r in caplog.records].count(
        f"commands subscribed thing={THING} topics=3") == 2


def test_a_refused_subscription_is_one_error_naming_the_action_and_is_retried(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "backoff", lambda attempt, low, high: 0.01)
    caplog.set_level(logging.DEBUG)

    async def body(conn: RoutingConnection, client: CommandsClient) -> int:
        conn.suback_codes[REQUEST_FILTER] = 0x87
        conn.connect()
        while len(conn.subscribes) < 4:  # the first SUBSCRIBE, then retries
            await asyncio.sleep(0.005)
        assert not client.subscribed.is_set()
        del conn.suback_codes[REQUEST_FILTER]  # the policy is fixed
        await asyncio.wait_for(client.subscribed.wait(), 2)
        return len(conn.subscribes)

    subscribes, conn, _ = run(body)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"the broker refused to subscribe to {REQUEST_FILTER}: not authorized "
                      f"(0x87); the device's IoT policy must allow iot:Subscribe on "
                      f"topicfilter/{REQUEST_FILTER}"]
    assert any(f"now allows iot:Subscribe on {REQUEST_FILTER}" in r.getMessage()
               for r in caplog.records)
    # Retries name only the refused filter: the granted ones stay granted.
    assert all(filters == [REQUEST_FILTER] for filters, _ in conn.subscribes[1:subscribes])


def test_requests_wait_for_their_puback_and_replies_are_acknowledged_at_once() -> None:
    async def body(conn: RoutingConnection, client: CommandsClient) -> Any:
        conn.connect()
        await settle()
        conn.deliver_routed(f"{ROOT}e-1/request/json", b'{"operation": "x"}')
        conn.deliver_routed(f"{ROOT}e-9/response/accepted/json", b'{"executionId": "e-9"}')
        request = await anext(client.requests())
        assert conn.acked == [f"{ROOT}e-9/response/accepted/json"]
        client.acknowledge(request)
        return request

    request, conn, _ = run(body)
    assert (request.execution_id, request.format, request.payload) == (
        "e-1", "json", b'{"operation": "x"}')
    assert request.message.content_type == "application/json"
    assert conn.acked[-1] == f"{ROOT}e-1/request/json"


def test_an_update_is_one_publish_answered_by_execution_id() -> None:
    async def body(conn: RoutingConnection, client: CommandsClient) -> tuple[Any, Any]:
        conn.connect()
        await settle()
        task = asyncio.ensure_future(client.update("e-1", {"status": "SUCCEEDED"}))
        topic, payload = await conn.next_publish()
        assert (topic, payload) == (shapes.response_topic(THING, "e-1"), {"status": "SUCCEEDED"})
        conn.deliver_routed(f"{ROOT}e-1/response/accepted/json", b'{"executionId": "e-1"}')
        accepted = await task
        task = asyncio.ensure_future(client.update("e-1", {"status": "SUCCEEDED"}))
        await conn.next_publish(2)
        conn.deliver_routed(f"{ROOT}e-1/response/rejected/json",
                            b'{"error": "DataConflict", "errorMessage": "too soon"}')
        with pytest.raises(ConflictException) as rejected:
            await task
        return accepted, rejected.value

    (accepted, rejected), conn, _ = run(body)
    assert accepted == {"executionId": "e-1"} and rejected.code == "DataConflict"
    assert len(conn.subscribes) == 1


def test_a_refused_update_names_iot_publish(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    async def body(conn: RoutingConnection, client: CommandsClient) -> NotAuthorizedError:
        conn.connect()
        await settle()
        conn.puback_code = 0x87
        with pytest.raises(NotAuthorizedError) as refused:
            await client.update("e-1", {"status": "SUCCEEDED"})
        return refused.value

    refused, _, _ = run(body)
    topic = shapes.response_topic(THING, "e-1")
    assert (refused.action, refused.topic) == ("iot:Publish", topic)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"the broker refused to accept a publish on {topic}: not authorized "
                      f"(0x87); the device's IoT policy must allow iot:Publish on topic/{topic}"]
