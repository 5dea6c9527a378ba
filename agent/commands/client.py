"""The AWS IoT Commands device API over MQTT 5, on the agent's own connection.

AWS's Python device SDK has no Commands client, so this one sits directly on awscrt's MQTT 5
client (:class:`agent.connection.Connection`), which is also the only way to read what Commands
puts in MQTT 5 properties: the content type and the message expiry interval (the seconds left
before the execution times out).

* **Standing subscriptions**: the request topics of the configured formats and every
  execution's accepted/rejected replies, made on the first connection and again after any
  reconnect that lost the session.
* **Requests** are handed to the consumer (:meth:`requests`) with their PUBACK held back: the
  consumer calls :meth:`acknowledge` once the request is journaled, so with a persistent session
  a request is never lost between its arrival and the journal, whatever crashes.
* **Updates** (:meth:`update`) wait for their accepted or rejected reply. Commands has no
  clientToken: a reply names only the execution, so one update per execution may be in flight;
  a second raises.

Every CRT callback only hops onto the asyncio loop (:func:`agent.connection.hop`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from awscrt import mqtt5

from agent.commands import shapes
from agent.connection import Connection, ConnectionEvent, Message, describe_crt_error, hop
from agent.errors import AgentError, RequestFailedError, RequestTimeoutError
from agent.reporter import backoff

__all__ = ["CommandRequest", "CommandsClient"]

log = logging.getLogger("agent.commands")

_QUEUE_SIZE = 1024


@dataclass(frozen=True)
class CommandRequest:
    """One request as received: ``format`` is ``json``, ``cbor`` or ``generic`` (its topic)."""

    execution_id: str
    format: str
    message: Message

    @property
    def payload(self) -> bytes:
        return self.message.payload


class CommandsClient:
    """Requests and updates of the Commands device API for one thing.

    Build it before anything else builds the connection's CRT client (it routes the Commands
    topics of ``thing`` to itself).
    """

    def __init__(self, connection: Connection, thing: str, formats: tuple[str, ...] = ("json",),
                 *, request_timeout: float = 30.0) -> None:
        self._connection = connection
        self._loop = asyncio.get_running_loop()
        self.thing = thing
        self.timeout = request_timeout
        self.filters = (*(shapes.request_filter(thing, f) for f in formats),
                        *shapes.reply_filters(thing))
        self._requests: asyncio.Queue[CommandRequest] = asyncio.Queue(_QUEUE_SIZE)
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._subscriber: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()
        connection.route(shapes.topic_root(thing), self._on_message, manual_ack=True)
        connection.add_listener(self._on_connection)

    # ------------------------------------------------------------------ subscriptions

    def _on_connection(self, event: ConnectionEvent) -> None:
        if event.kind == "connected" and (not event.rejoined or not self.subscribed.is_set()):
            if self._subscriber is None or self._subscriber.done():
                self._subscriber = asyncio.ensure_future(self._subscribe())
        elif event.kind in ("disconnected", "stopped"):
            if self._subscriber is not None:
                self._subscriber.cancel()
            if event.kind == "stopped":
                self.subscribed.clear()

    async def _subscribe(self) -> None:
        """Subscribe until the broker agrees (a refusal is retried: a policy can be fixed)."""
        attempt = 0
        while self._connection.connected:
            try:
                await self._connection.subscribe(*self.filters)
            except Exception as exc:  # ours (refused), or the CRT's own error types
                attempt += 1
                delay = backoff(attempt, low=2.0, high=300.0)
                log.error("commands subscription failed thing=%s error=%s; retrying in=%.0fs "
                          "(does the certificate's policy allow Subscribe and Receive on "
                          "$aws/commands/things/%s/executions/*? is commands.enabled wanted?)",
                          self.thing, describe_crt_error(exc), delay, self.thing)
                await asyncio.sleep(delay)
                continue
            log.info("commands subscribed thing=%s topics=%d", self.thing, len(self.filters))
            self.subscribed.set()
            return

    # ------------------------------------------------------------------ requests

    async def requests(self) -> AsyncIterator[CommandRequest]:
        while True:
            yield await self._requests.get()

    def acknowledge(self, request: CommandRequest) -> None:
        """The request is safe (journaled or answered): let the broker forget it."""
        self._connection.acknowledge(request.message)

    def _on_message(self, message: Message) -> None:
        reply = shapes.reply_route(self.thing, message.topic)
        if reply is not None:
            self._connection.acknowledge(message)
            self._on_reply(message, *reply)
            return
        route = shapes.request_route(self.thing, message.topic)
        if route is None:
            self._connection.acknowledge(message)
            log.warning("ignoring a message on an unknown commands topic topic=%s",
                        message.topic)
            return
        try:
            self._requests.put_nowait(CommandRequest(route[0], route[1], message))
        except asyncio.QueueFull:  # not acknowledged: a persistent session delivers it again
            log.error("commands request queue full; not acknowledged execution_id=%s",
                      route[0])

    # ------------------------------------------------------------------ updates

    async def update(self, execution_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Send one UpdateCommandExecution and return the accepted reply.

        Raises the boto3-named exception of a rejection (``ConflictException`` for
        DataConflict), :class:`RequestTimeoutError` without a reply, or
        :class:`RequestFailedError` when the broker refused the publish.
        """
        if execution_id in self._pending:
            raise RuntimeError(f"an update of {execution_id} is already in flight")
        future: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._pending[execution_id] = future
        topic = shapes.response_topic(self.thing, execution_id)
        try:
            sent = self._connection.client.publish(mqtt5.PublishPacket(
                topic=topic, payload=json.dumps(payload, separators=(",", ":")).encode(),
                qos=mqtt5.QoS.AT_LEAST_ONCE))
            sent.add_done_callback(lambda f: hop(self._loop, self._published, future, topic, f))
            return await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except TimeoutError:
            state = "" if self._connection.connected else " (not connected to the broker)"
            raise RequestTimeoutError(f"update of command execution {execution_id}: no reply "
                                      f"within {self.timeout:g}s{state}", "update") from None
        finally:
            if self._pending.get(execution_id) is future:
                del self._pending[execution_id]
            if not future.done():
                future.cancel()

    @staticmethod
    def _published(future: asyncio.Future[dict[str, Any]], topic: str, sent: Any) -> None:
        if future.done():
            return
        exc = sent.exception()
        if exc is not None:
            future.set_exception(RequestFailedError(
                f"update publish failed: {describe_crt_error(exc)}", "update"))
            return
        puback = getattr(sent.result(), "puback", None)
        if puback is not None and int(puback.reason_code) >= 0x80:
            future.set_exception(RequestFailedError(
                f"the broker refused the update on {topic} "
                f"({getattr(puback.reason_code, 'name', puback.reason_code)}): check the "
                "certificate's policy allows Publish on it", "update"))

    def _on_reply(self, message: Message, execution_id: str, accepted: bool) -> None:
        future = self._pending.get(execution_id)
        if future is None or future.done():
            log.debug("reply for no update in flight execution_id=%s accepted=%s",
                      execution_id, accepted)
            return
        try:
            future.set_result(shapes.parse_reply(message.topic, message.payload, accepted))
        except AgentError as exc:
            future.set_exception(exc)

    async def close(self) -> None:
        if self._subscriber is not None:
            self._subscriber.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._subscriber
