"""The AWS IoT Jobs device API over MQTT, with boto3's names, parameters and shapes.

One PUBLISH per request. The replies come back on standing subscriptions, made once per MQTT
session on the agent's own connection (:class:`agent.subscriptions.Subscriptions`): for a thing
``T``, ``$aws/things/T/jobs/+/accepted``, ``+/rejected``, ``+/+/accepted`` and ``+/+/rejected``
(every reply topic of the four operations), plus ``notify`` and ``notify-next`` once
:meth:`JobsClient.open_streams` is called: six filters, one SUBSCRIBE. A reply is matched to its
request by the ``clientToken`` we generate (128 random bits, hex) and the topic it arrives on.

awscrt's request-response client, which this replaces (as awsiotsdk's ``IotJobsClientV2`` uses
it), subscribes and unsubscribes the reply filter around every request: three packets and three
round trips per request where one will do (issue 12). It also parsed replies in C, and dropped
one it could not parse (a lone UTF-16 surrogate, nesting beyond its limit), so the request timed
out 30 s later; here a reply we cannot parse fails the request it answers at once with
:class:`InvalidResponseError`: our tokens are random and unique, so when the JSON cannot be
read we look for a pending request's token in the raw bytes that arrived on that request's
reply topic.

We never used ``IotJobsClientV2`` itself: it turns every time into a naive local ``datetime``
(``fromtimestamp``), wrong across time zones and DST, while boto3 returns integer epoch seconds.
We keep the raw JSON and convert it strictly (:mod:`agent.jobs.shapes`).

Every CRT callback only hops onto the asyncio loop (:mod:`agent.connection`); all state here
lives on the loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from agent.connection import Connection, PublishAck, describe_crt_error
from agent.errors import (
    InvalidResponseError,
    NotAuthorizedError,
    RequestFailedError,
    RequestTimeoutError,
    error_from_rejection,
)
from agent.jobs import shapes
from agent.refusals import is_policy_refusal
from agent.subscriptions import Subscriptions

__all__ = ["STREAMS", "JobsClient", "JobsEvent", "reply_filters"]

log = logging.getLogger("agent.jobs")

_EVENT_QUEUE_SIZE = 256
STREAMS = ("notify", "notify-next")
_NO_SUBSCRIBERS = 0x10  # PUBACK: accepted, but nobody (no Jobs service) was listening
_SILENT_TIMEOUTS = 2  # timeouts with no reply at all on a topic level before blaming iot:Receive


def reply_filters(thing: str) -> tuple[str, ...]:
    """The four filters every reply of ``thing``'s requests arrives on.

    ``get`` and ``start-next`` reply on ``jobs/<op>/{accepted,rejected}`` (one level), describe
    and update on ``jobs/<jobId>/<op>/{accepted,rejected}`` (two). At most 6 slashes: inside
    AWS IoT's 7.
    """
    prefix = shapes.topic_prefix(thing)
    return (f"{prefix}/+/accepted", f"{prefix}/+/rejected",
            f"{prefix}/+/+/accepted", f"{prefix}/+/+/rejected")


@dataclass(frozen=True)
class JobsEvent:
    """A notification from the Jobs service, already in boto3 shape.

    ``kind`` is ``notify`` (body ``{"jobs": {"IN_PROGRESS": [...], "QUEUED": [...]},
    "timestamp"}``), ``notify-next`` (body ``{"execution": {...}, "timestamp"}``, no
    ``execution`` when nothing is pending), or ``subscribed`` / ``subscription-lost`` /
    ``subscription-halted`` for a stream's subscription state (body ``{"stream": kind}``), so a
    consumer can re-synchronise after a gap, or ``malformed`` (body ``{"stream": kind}``) for a
    notification that could not be read (logged as a warning). ``subscription-halted``: the
    broker refused the stream (logged once as an error naming the policy action); it is tried
    again at the next connect.
    """

    kind: str
    body: dict[str, Any]


@dataclass
class _Pending:
    """One request waiting for its reply."""

    operation: str
    thing: str
    topic: str  # the request topic; replies come on topic + "/accepted" or "/rejected"
    reply: asyncio.Future[tuple[str, Any]]
    connections: int  # Connection.connections when it was published: a reconnect since?
    ack: PublishAck | None = None


class JobsClient:
    """Requests and notifications of the Jobs device API.

    Methods mirror ``boto3.client("iot-jobs-data")``: keyword arguments with boto3's names,
    dicts in boto3's shapes back, boto3-named exceptions (:mod:`agent.errors`) on rejection.
    Parameters are validated before anything is published. ``max_concurrent_requests`` bounds
    the requests in flight at once; more wait their turn.
    """

    def __init__(
        self,
        connection: Connection,
        *,
        request_timeout: float = 30.0,
        max_concurrent_requests: int = 4,
    ) -> None:
        self._connection = connection
        self._timeout = max(0.1, float(request_timeout))
        self._slots = asyncio.Semaphore(max(1, max_concurrent_requests))
        self._pending: dict[str, _Pending] = {}
        self._events: asyncio.Queue[JobsEvent] = asyncio.Queue(_EVENT_QUEUE_SIZE)
        self._stream_thing: str | None = None
        self._streams: dict[str, str] = {}  # topic filter -> stream kind
        self._silent: dict[tuple[str, int], int] = {}  # (thing, depth) -> timeouts, no reply
        self.subscriptions = Subscriptions(connection, self._on_subscription)
        connection.add_message_listener(self._on_message)

    # ------------------------------------------------------------------ requests

    async def get_pending_job_executions(self, *, thingName: str) -> dict[str, Any]:
        thing = shapes.validate_thing_name(thingName)
        payload = await self._request("get", thing, f"{shapes.topic_prefix(thing)}/get", {})
        return shapes.get_pending_response(payload)

    async def start_next_pending_job_execution(
        self,
        *,
        thingName: str,
        statusDetails: dict[str, str] | None = None,
        stepTimeoutInMinutes: int | None = None,
    ) -> dict[str, Any]:
        thing = shapes.validate_thing_name(thingName)
        body = shapes.start_next_request(statusDetails, stepTimeoutInMinutes)
        payload = await self._request("start-next", thing,
                                      f"{shapes.topic_prefix(thing)}/start-next", body)
        return shapes.start_next_response(payload)

    async def describe_job_execution(
        self,
        *,
        jobId: str,
        thingName: str,
        includeJobDocument: bool | None = None,
        executionNumber: int | None = None,
    ) -> dict[str, Any]:
        thing = shapes.validate_thing_name(thingName)
        job = shapes.validate_job_id(jobId, allow_next=True)
        body = shapes.describe_request(includeJobDocument, executionNumber)
        payload = await self._request("describe", thing,
                                      f"{shapes.topic_prefix(thing)}/{job}/get", body)
        return shapes.describe_response(payload)

    async def update_job_execution(
        self,
        *,
        jobId: str,
        thingName: str,
        status: str,
        statusDetails: dict[str, str] | None = None,
        stepTimeoutInMinutes: int | None = None,
        expectedVersion: int | None = None,
        includeJobExecutionState: bool | None = None,
        includeJobDocument: bool | None = None,
        executionNumber: int | None = None,
    ) -> dict[str, Any]:
        thing = shapes.validate_thing_name(thingName)
        job = shapes.validate_job_id(jobId)
        body = shapes.update_request(status, statusDetails, stepTimeoutInMinutes,
                                     expectedVersion, includeJobExecutionState,
                                     includeJobDocument, executionNumber)
        payload = await self._request("update", thing,
                                      f"{shapes.topic_prefix(thing)}/{job}/update", body)
        return shapes.update_response(payload)

    async def _request(self, operation: str, thing: str, topic: str,
                       body: dict[str, Any]) -> dict[str, Any]:
        token = _new_token()
        payload = json.dumps({**body, "clientToken": token}).encode()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        pending: _Pending | None = None
        try:
            async with self._slots:
                filters = reply_filters(thing)
                if not self.subscriptions.granted(filters):  # once per session
                    await self.subscriptions.ready(filters, deadline - loop.time(), operation)
                pending = _Pending(operation, thing, topic, loop.create_future(),
                                   self._connection.connections)
                # One timer and one future per request: the cheapest wait asyncio has.
                timer = loop.call_at(deadline, _expire, pending.reply)
                self._pending[token] = pending
                try:
                    pending.ack = self._connection.publish_acked(
                        topic, payload, lambda code, exc: self._refused(token, code, exc))
                    reply_topic, parsed = await pending.reply
                finally:
                    timer.cancel()
                    self._pending.pop(token, None)
        except TimeoutError:
            raise self._timed_out(operation, thing, topic, pending) from None
        return self._parse_reply(operation, reply_topic, parsed, token)

    def _refused(self, token: str, code: int | None, exc: BaseException | None) -> None:
        """The broker refused the request's PUBLISH (``code``), or it failed (``exc``)."""
        pending = self._pending.get(token)
        if pending is None or pending.reply.done():
            return
        if code is None:
            pending.reply.set_exception(RequestFailedError(
                f"{pending.operation}: request failed: {describe_crt_error(exc)}",
                pending.operation))
            return
        line = self._connection.refusals.refused("publish", pending.topic, code)
        message = f"{pending.operation}: {line}"
        pending.reply.set_exception(
            NotAuthorizedError(message, pending.operation, action="iot:Publish",
                               topic=pending.topic)
            if is_policy_refusal(code) else RequestFailedError(message, pending.operation))

    def _timed_out(self, operation: str, thing: str, topic: str,
                   pending: _Pending | None) -> RequestTimeoutError:
        message = (f"{operation}: no reply from the Jobs service within {self._timeout:g}s "
                   f"(thing={thing})")
        if not self._connection.connected:
            message += " (not connected to the broker)"
        elif pending is None:
            message += " (the reply subscription was not confirmed in time)"
        elif (code := pending.ack.code() if pending.ack else None) == _NO_SUBSCRIBERS:
            message += (f" (the broker had no subscriber for {topic}: is the Jobs service "
                        "behind this endpoint?)")
        elif code is not None and pending.connections == self._connection.connections:
            # Accepted, connection up all along, no reply: count towards the iot:Receive pattern.
            key = (thing, _depth(topic))
            self._silent[key] = self._silent.get(key, 0) + 1
            if self._silent[key] >= _SILENT_TIMEOUTS:
                self._connection.refusals.no_reply(
                    [f"{topic}/accepted", f"{topic}/rejected"], self._silent[key])
        return RequestTimeoutError(message, operation)

    @staticmethod
    def _parse_reply(operation: str, topic: str, payload: Any, token: str) -> dict[str, Any]:
        if not isinstance(payload, dict):
            raise InvalidResponseError(f"{operation}: reply on {topic} is not a JSON object",
                                       client_token=token)
        if topic.endswith("/rejected"):
            code, message, state = shapes.error_fields(payload)
            raise error_from_rejection(code, message, execution_state=state, client_token=token)
        return payload

    # ------------------------------------------------------------------ incoming

    def _on_message(self, topic: str, raw: bytes) -> None:
        """Every PUBLISH on the connection, on the loop: a reply, a notification, or not ours."""
        kind = self._streams.get(topic)
        if kind is not None:
            self._on_stream(kind, topic, raw)
        elif topic.endswith(("/accepted", "/rejected")):
            self._on_reply(topic, raw)

    def _on_reply(self, topic: str, raw: bytes) -> None:
        base = topic.rsplit("/", 1)[0]
        try:
            payload: Any = json.loads(raw)
            error = None
        except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
            payload, error = None, exc
        token = payload.get("clientToken") if isinstance(payload, dict) else None
        pending = self._pending.get(token) if isinstance(token, str) else None
        if pending is not None:
            if pending.topic != base:
                log.warning("ignoring a reply on another operation's topic topic=%s "
                            "request_topic=%s", topic, pending.topic)
                return
            self._heard(pending)
            if not pending.reply.done():
                pending.reply.set_result((topic, payload))
            return
        if isinstance(token, str):
            log.debug("reply for a request not (or no longer) waiting topic=%s", topic)
            return
        # Unreadable, or no token where we can find one: whose token is in the raw bytes?
        for candidate, pending in self._pending.items():
            if pending.topic == base and candidate.encode() in raw:
                self._heard(pending)
                what = ("is not valid JSON" if isinstance(error, ValueError)
                        else "is nested too deeply to read" if error is not None
                        else "has no clientToken")
                if not pending.reply.done():
                    pending.reply.set_exception(InvalidResponseError(
                        f"{pending.operation}: the reply on {topic} {what} ({len(raw)} bytes)",
                        client_token=candidate))
                return
        log.warning("ignoring a reply that matches no request topic=%s bytes=%d", topic,
                    len(raw))

    def _heard(self, pending: _Pending) -> None:
        """A reply came: the PUBLISH was allowed, and replies on its topic level arrive."""
        self._silent.pop((pending.thing, _depth(pending.topic)), None)
        self._connection.refusals.allowed("publish", pending.topic)

    # ------------------------------------------------------------------ notifications

    def open_streams(self, thing_name: str) -> None:
        """Subscribe to ``notify`` and ``notify-next`` for ``thing_name``. Idempotent.

        The thing's reply filters go in the same SUBSCRIBE: every request after it is one
        PUBLISH. Kept across reconnects (see :mod:`agent.subscriptions`).
        """
        thing = shapes.validate_thing_name(thing_name)
        if self._stream_thing is not None:
            if thing != self._stream_thing:
                raise RuntimeError(f"streams already open for {self._stream_thing}")
            return
        self._stream_thing = thing
        self._streams = {f"{shapes.topic_prefix(thing)}/{kind}": kind for kind in STREAMS}
        self.subscriptions.want([*self._streams, *reply_filters(thing)])

    async def events(self) -> AsyncIterator[JobsEvent]:
        """Notifications as they arrive (open the streams first)."""
        while True:
            yield await self._events.get()

    def next_event_nowait(self) -> JobsEvent | None:
        try:
            return self._events.get_nowait()
        except asyncio.QueueEmpty:
            return None

    async def next_event(self, timeout: float | None = None) -> JobsEvent:
        return await asyncio.wait_for(self._events.get(), timeout)

    def _put(self, event: JobsEvent) -> None:
        if self._events.full():
            dropped = self._events.get_nowait()
            log.warning("event queue full, dropping oldest event=%s (the next poll resyncs)",
                        dropped.kind)
        self._events.put_nowait(event)

    def _on_subscription(self, topic_filter: str, status: str) -> None:
        kind = self._streams.get(topic_filter)
        if kind is None:
            return
        if status == "granted":
            log.debug("stream subscribed stream=%s", kind)
            self._put(JobsEvent("subscribed", {"stream": kind}))
        elif status == "lost":
            log.info("stream subscription lost stream=%s (re-subscribing)", kind)
            self._put(JobsEvent("subscription-lost", {"stream": kind}))
        else:  # refused: the connection's RefusalLog has said why, once, as an error
            self._put(JobsEvent("subscription-halted", {"stream": kind}))

    def _on_stream(self, kind: str, topic: str, raw: bytes) -> None:
        try:
            payload = json.loads(raw)
            if not isinstance(payload, dict):
                raise InvalidResponseError("not a JSON object")
            body = shapes.notify_event(payload) if kind == "notify" \
                else shapes.notify_next_event(payload)
        except (ValueError, RecursionError, InvalidResponseError) as exc:
            reason = exc.message if isinstance(exc, InvalidResponseError) else "not valid JSON"
            log.warning("ignoring malformed %s message bytes=%d reason=%s", kind, len(raw),
                        reason)
            # What it meant is unknown, so the pending list is asked instead: a job whose
            # notify-next cannot be read (its document too deep for the parser) still runs
            # or is REJECTED by the sync, not only at the safety poll.
            self._put(JobsEvent("malformed", {"stream": kind}))
            return
        self._put(JobsEvent(kind, body))


def _new_token() -> str:
    """A clientToken: 128 random bits, as unique as a uuid4, without the uuid module (it imports
    ``platform``: idle RSS, issue 12)."""
    return os.urandom(16).hex()


def _expire(reply: asyncio.Future[Any]) -> None:
    if not reply.done():
        reply.set_exception(TimeoutError())


def _depth(topic: str) -> int:
    """1 for ``jobs/get`` and ``jobs/start-next``, 2 for ``jobs/<jobId>/<op>``."""
    return topic.count("/") - 3
