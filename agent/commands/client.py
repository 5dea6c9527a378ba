"""The AWS IoT Commands device API over MQTT 5, on the agent's own connection.

AWS's Python device SDK has no Commands client, so this one sits directly on awscrt's MQTT 5
client (:class:`agent.connection.Connection`), which is also the only way to read what Commands
puts in MQTT 5 properties: the content type and the message expiry interval (the seconds left
before the execution times out).

* **Standing subscriptions**: the request topics of the configured formats and every
  execution's accepted/rejected replies, kept by :class:`agent.subscriptions.Subscriptions`
  like the Jobs client's (made on the first connection and again after any reconnect that lost
  the session; a refusal is one ERROR line naming the topic and ``iot:Subscribe``, from the
  connection's :class:`~agent.refusals.RefusalLog`, and is tried again with backoff).
* **Requests** are handed to the consumer (:meth:`requests`) with their PUBACK held back: the
  consumer calls :meth:`acknowledge` once the request is journaled, so with a persistent session
  a request is never lost between its arrival and the journal, whatever crashes.
* **Updates** (:meth:`update`) wait for their accepted or rejected reply. Commands has no
  clientToken: a reply names only the execution, so one update per execution may be in flight;
  a second raises. A refused PUBLISH is diagnosed like a Jobs request's (``iot:Publish``).

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

from agent.commands import shapes
from agent.connection import Connection, ConnectionEvent, Message, describe_crt_error
from agent.errors import AgentError, NotAuthorizedError, RequestFailedError, RequestTimeoutError
from agent.refusals import is_policy_refusal
from agent.reporter import backoff
from agent.subscriptions import Subscriptions

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

    Make it before the connection starts: it routes the Commands topics of ``thing`` to itself
    (with the PUBACK of a request held back until :meth:`acknowledge`) and wants its standing
    subscriptions made with the first connect.
    """

    def __init__(self, connection: Connection, thing: str, formats: tuple[str, ...] = ("json",),
                 *, request_timeout: float = 30.0) -> None:
        self._connection = connection
        self._loop = asyncio.get_running_loop()
        self.thing = thing
        self.timeout = request_timeout
        self._reply_filters = shapes.reply_filters(thing)
        self.filters = (*(shapes.request_filter(thing, f) for f in formats),
                        *self._reply_filters)
        self._requests: asyncio.Queue[CommandRequest] = asyncio.Queue(_QUEUE_SIZE)
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._retry: asyncio.Task[None] | None = None
        self._complete = False  # every filter granted in this session (logged once per session)
        self.subscribed = asyncio.Event()
        connection.route(shapes.topic_root(thing), self._on_message, manual_ack=True)
        connection.add_listener(self._on_connection)
        self.subscriptions = Subscriptions(connection, self._on_subscription)
        self.subscriptions.want(self.filters)

    # ------------------------------------------------------------------ subscriptions

    def _on_subscription(self, topic_filter: str, status: str) -> None:
        if status == "granted":
            if not self._complete and self.subscriptions.granted(self.filters):
                self._complete = True
                log.info("commands subscribed thing=%s topics=%d", self.thing, len(self.filters))
                self.subscribed.set()
        elif status == "lost":
            self._complete = False
        elif self._retry is None or self._retry.done():
            # Refused: the RefusalLog has said which topic and iot:Subscribe, once, as an
            # ERROR. Try again now and then while connected: a policy can be fixed.
            self._retry = asyncio.ensure_future(self._retry_refused())

    async def _retry_refused(self) -> None:
        attempt = 0
        while self._connection.connected and not self.subscriptions.granted(self.filters):
            attempt += 1
            await asyncio.sleep(backoff(attempt, low=2.0, high=300.0))
            with contextlib.suppress(RequestFailedError, TimeoutError):
                await self.subscriptions.ready(self.filters, self.timeout, "commands")

    def _on_connection(self, event: ConnectionEvent) -> None:
        if event.kind in ("disconnected", "stopped") and self._retry is not None:
            self._retry.cancel()  # the next connect tries refused filters again by itself
        if event.kind == "stopped":
            self.subscribed.clear()
            self._complete = False

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
        :class:`RequestFailedError` (:class:`NotAuthorizedError`: the policy) when the broker
        refused the publish or the reply subscription.
        """
        if execution_id in self._pending:
            raise RuntimeError(f"an update of {execution_id} is already in flight")
        future: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._pending[execution_id] = future
        topic = shapes.response_topic(self.thing, execution_id)
        deadline = self._loop.time() + self.timeout
        try:
            if not self.subscriptions.granted(self._reply_filters):  # a reply must be able to come
                await self.subscriptions.ready(self._reply_filters, self.timeout, "update")
            self._connection.publish_acked(
                topic, json.dumps(payload, separators=(",", ":")).encode(),
                lambda code, exc: self._refused(future, topic, code, exc))
            return await asyncio.wait_for(asyncio.shield(future),
                                          max(0.0, deadline - self._loop.time()))
        except TimeoutError:
            state = "" if self._connection.connected else " (not connected to the broker)"
            raise RequestTimeoutError(f"update of command execution {execution_id}: no reply "
                                      f"within {self.timeout:g}s{state}", "update") from None
        finally:
            if self._pending.get(execution_id) is future:
                del self._pending[execution_id]
            if not future.done():
                future.cancel()

    def _refused(self, future: asyncio.Future[dict[str, Any]], topic: str, code: int | None,
                 exc: BaseException | None) -> None:
        """The broker refused the update's PUBLISH (``code``), or it failed (``exc``)."""
        if future.done():
            return
        if code is None:
            future.set_exception(RequestFailedError(
                f"update publish failed: {describe_crt_error(exc)}", "update"))
            return
        line = self._connection.refusals.refused("publish", topic, code)
        future.set_exception(
            NotAuthorizedError(f"update: {line}", "update", action="iot:Publish", topic=topic)
            if is_policy_refusal(code) else RequestFailedError(f"update: {line}", "update"))

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
        if self._retry is not None:
            self._retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry
