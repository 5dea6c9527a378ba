"""The AWS IoT Jobs device API over MQTT, with boto3's names, parameters and shapes.

Built directly on ``awscrt.mqtt_request_response`` rather than ``awsiot.iotjobs.IotJobsClientV2``:
the V2 client turns every time into a naive local ``datetime`` (``fromtimestamp``), wrong across
time zones and DST, while boto3 returns integer epoch seconds. We keep the raw JSON and convert it
strictly (:mod:`agent.jobs.shapes`). The request-response client gives us what V2 gives: replies
correlated by ``clientToken``, concurrent requests, subscriptions restored after a reconnect that
lost the session, and the notify/notify-next streams re-subscribed by themselves.

Every CRT callback here only hops onto the asyncio loop; futures from the CRT are awaited with
``asyncio.wrap_future``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from awscrt import exceptions as crt_exceptions
from awscrt import mqtt_request_response as rr

from agent.connection import Connection, describe_crt_error, hop
from agent.errors import (
    InvalidResponseError,
    RequestFailedError,
    RequestTimeoutError,
    error_from_rejection,
)
from agent.jobs import shapes

__all__ = ["JobsClient", "JobsEvent"]

log = logging.getLogger("agent.jobs")

_EVENT_QUEUE_SIZE = 256


def _consume(future: asyncio.Future[Any]) -> None:
    """Mark an abandoned request's outcome as seen, so asyncio does not warn about it."""
    if not future.cancelled():
        future.exception()


@dataclass(frozen=True)
class JobsEvent:
    """A notification from the Jobs service, already in boto3 shape.

    ``kind`` is ``notify`` (body ``{"jobs": {"IN_PROGRESS": [...], "QUEUED": [...]},
    "timestamp"}``), ``notify-next`` (body ``{"execution": {...}, "timestamp"}``, no
    ``execution`` when nothing is pending), or ``subscribed`` / ``subscription-lost`` /
    ``subscription-halted`` for a stream's subscription state (body ``{"stream": kind}``), so a
    consumer can re-synchronise after a gap.
    """

    kind: str
    body: dict[str, Any]


class JobsClient:
    """Requests and notifications of the Jobs device API for one thing.

    Methods mirror ``boto3.client("iot-jobs-data")``: keyword arguments with boto3's names,
    dicts in boto3's shapes back, boto3-named exceptions (:mod:`agent.errors`) on rejection.
    Parameters are validated before anything is published.
    """

    def __init__(
        self,
        connection: Connection,
        *,
        request_timeout: float = 30.0,
        max_concurrent_requests: int = 4,
    ) -> None:
        self._connection = connection
        self._loop = asyncio.get_running_loop()
        self._timeout = max(1, round(request_timeout))
        self._rr = rr.Client(
            connection.build(),
            rr.ClientOptions(
                # Each in-flight request holds one "<topic>/+" subscription; more queue up.
                max_request_response_subscriptions=max(2, max_concurrent_requests),
                max_streaming_subscriptions=2,  # notify + notify-next
                operation_timeout_in_seconds=self._timeout,
            ),
        )
        self._events: asyncio.Queue[JobsEvent] = asyncio.Queue(_EVENT_QUEUE_SIZE)
        self._streams: dict[str, rr.StreamingOperation] = {}
        self._stream_thing: str | None = None

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
        token = str(uuid.uuid4())
        body = {**body, "clientToken": token}
        options = rr.RequestOptions(
            subscription_topic_filters=[f"{topic}/+"],
            response_paths=[rr.ResponsePath(f"{topic}/accepted", "clientToken"),
                            rr.ResponsePath(f"{topic}/rejected", "clientToken")],
            publish_topic=topic,
            payload=json.dumps(body).encode(),
            correlation_token=token,
        )
        try:
            future = self._rr.make_request(options)
            # The CRT times the request out itself; the outer bound only guards against a
            # future the CRT never completes (e.g. the client was torn down underneath us).
            # Shielded: a caller that gives up must not cancel the CRT's own future, which the
            # CRT completes later from its thread (set_result on a cancelled future raises there).
            waiter = asyncio.wrap_future(future)
            waiter.add_done_callback(_consume)
            response = await asyncio.wait_for(asyncio.shield(waiter), self._timeout + 5)
        except TimeoutError:
            raise RequestTimeoutError(
                f"{operation}: no reply from the Jobs service within {self._timeout}s "
                f"(thing={thing})", operation) from None
        except crt_exceptions.AwsCrtError as exc:
            raise self._map_crt_error(operation, thing, exc) from exc
        return self._parse_reply(operation, response.topic, response.payload, token)

    def _map_crt_error(self, operation: str, thing: str, exc: crt_exceptions.AwsCrtError
                       ) -> Exception:
        if exc.name == "AWS_ERROR_MQTT_REQUEST_RESPONSE_TIMEOUT":
            state = "" if self._connection.connected else " (not connected to the broker)"
            return RequestTimeoutError(
                f"{operation}: no reply from the Jobs service within {self._timeout}s "
                f"(thing={thing}){state}", operation)
        if exc.name == "AWS_ERROR_MQTT_REQUEST_RESPONSE_PUBLISH_FAILURE":
            return RequestFailedError(
                f"{operation}: the broker refused the request publish for thing={thing} "
                "(not authorised for this thing's topics? check the certificate's policy)",
                operation)
        return RequestFailedError(f"{operation}: request failed: {describe_crt_error(exc)}",
                                  operation)

    @staticmethod
    def _parse_reply(operation: str, topic: str, raw: bytes | None, token: str
                     ) -> dict[str, Any]:
        try:
            payload = json.loads(raw or b"")
        except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
            raise InvalidResponseError(
                f"{operation}: reply on {topic} is not JSON ({len(raw or b'')} bytes)",
                client_token=token) from None
        if not isinstance(payload, dict):
            raise InvalidResponseError(f"{operation}: reply on {topic} is not a JSON object",
                                       client_token=token)
        if topic.endswith("/rejected"):
            code, message, state = shapes.error_fields(payload)
            raise error_from_rejection(code, message, execution_state=state, client_token=token)
        return payload

    # ------------------------------------------------------------------ notifications

    def open_streams(self, thing_name: str) -> None:
        """Subscribe to ``notify`` and ``notify-next`` for ``thing_name``. Idempotent.

        The request-response client keeps these subscriptions across reconnects by itself.
        """
        thing = shapes.validate_thing_name(thing_name)
        if self._streams:
            if thing != self._stream_thing:
                raise RuntimeError(f"streams already open for {self._stream_thing}")
            return
        self._stream_thing = thing
        for kind in ("notify", "notify-next"):
            stream = self._rr.create_stream(rr.StreamingOperationOptions(
                subscription_topic_filter=f"{shapes.topic_prefix(thing)}/{kind}",
                subscription_status_listener=lambda ev, k=kind: self._hop(
                    self._on_status, k, int(ev.type), ev.error),
                incoming_publish_listener=lambda ev, k=kind: self._hop(
                    self._on_publish, k, ev.topic, ev.payload),
            ))
            stream.open()
            self._streams[kind] = stream

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

    def _hop(self, fn: Any, *args: Any) -> None:
        hop(self._loop, fn, *args)

    def _put(self, event: JobsEvent) -> None:
        if self._events.full():
            dropped = self._events.get_nowait()
            log.warning("event queue full, dropping oldest event=%s (the next poll resyncs)",
                        dropped.kind)
        self._events.put_nowait(event)

    def _on_status(self, kind: str, status: int, error: Exception | None) -> None:
        if status == rr.SubscriptionStatusEventType.SUBSCRIPTION_ESTABLISHED:
            log.debug("stream subscribed stream=%s", kind)
            self._put(JobsEvent("subscribed", {"stream": kind}))
        elif status == rr.SubscriptionStatusEventType.SUBSCRIPTION_LOST:
            log.info("stream subscription lost stream=%s (re-subscribing)", kind)
            self._put(JobsEvent("subscription-lost", {"stream": kind}))
        else:
            log.error("stream subscription halted stream=%s error=%s: the broker refused the "
                      "subscription (check the certificate's policy allows %s)", kind,
                      describe_crt_error(error), kind)
            self._put(JobsEvent("subscription-halted", {"stream": kind}))

    def _on_publish(self, kind: str, topic: str, raw: bytes | None) -> None:
        expected = f"{shapes.topic_prefix(self._stream_thing or '')}/{kind}"
        if topic != expected:
            log.warning("ignoring message for another thing topic=%s", topic)
            return
        try:
            payload = json.loads(raw or b"")
            if not isinstance(payload, dict):
                raise InvalidResponseError("not a JSON object")
            body = shapes.notify_event(payload) if kind == "notify" \
                else shapes.notify_next_event(payload)
        except (ValueError, RecursionError, InvalidResponseError) as exc:
            reason = exc.message if isinstance(exc, InvalidResponseError) else "not valid JSON"
            log.warning("ignoring malformed %s message bytes=%d reason=%s", kind,
                        len(raw or b""), reason)
            return
        self._put(JobsEvent(kind, body))
