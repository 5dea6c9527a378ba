"""The MQTT front of the local Jobs and Commands services: a client of the broker like any other.

It subscribes to ``$aws/things/+/jobs/#`` (a ``#`` at the first level would not match
``$``-topics) and to every device's Commands updates, hands each request to
:class:`~agent.sandbox.service.JobsService` or :class:`~agent.sandbox.commands.CommandsService`
(their MQTT adaptors are :mod:`agent.sandbox.mqtt_adaptor`) and publishes what the service
returns at QoS 1, over MQTT 5: a command request carries the command's content type and, as its
message expiry interval, the execution's timeout. It runs its own asyncio loop on its own thread
so that tests, the sandbox command and the HTTP fronts can drive it with plain method calls; all
service state is touched only on that thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from agent.config import MqttConfig
from agent.connection import Connection, ConnectionEvent
from agent.sandbox.commands import CommandsService
from agent.sandbox.document import dumps
from agent.sandbox.records import Message
from agent.sandbox.service import JobsService, Publish

__all__ = ["Emulator"]

log = logging.getLogger("agent.sandbox.emulator")

T = TypeVar("T")
REQUEST_FILTER = "$aws/things/+/jobs/#"
COMMANDS_FILTER = "$aws/commands/things/+/executions/+/response/json"


class Emulator:
    """AWS IoT Jobs and Commands, locally, over a real MQTT broker.

    Parameters:
        endpoint, port: the broker.
        cert, key, ca: the emulator's own client identity (the broker's ACL must let it use
            every thing's ``jobs`` and ``commands`` topics).
        clock: epoch-seconds clock shared with the service (tests pass a fake one).
        client_id: distinct per emulator (two clients with one id kick each other off).
    """

    def __init__(
        self,
        *,
        endpoint: str,
        port: int,
        cert: Path,
        key: Path,
        ca: Path,
        clock: Callable[[], float] = time.time,
        client_id: str = "jobs-emulator",
    ) -> None:
        self.service = JobsService(clock=clock)
        self.commands = CommandsService(clock=clock,
                                        thing_exists=lambda t: t in self.service.things())
        self._clock = clock
        self._mqtt = MqttConfig(endpoint=endpoint, port=port, cert=cert, key=key, ca=ca,
                                reconnect_min=0.2, reconnect_max=2.0,
                                # The service side: AWS IoT does not pace its replies like a
                                # device's connection, so neither may the emulator.
                                iot_core_limits=False)
        self._client_id = client_id
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._connection: Connection | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._subscribed = threading.Event()
        self._tasks: set[asyncio.Future[None]] = set()
        self._drops: list[list[Any]] = []  # [remaining, operations, "request" | "reply"]
        self.requests_handled = 0
        self.dropped = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 30.0) -> Emulator:
        """Connect and subscribe; return once requests can be served."""
        ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="jobs-emulator",
                                        daemon=True)
        self._thread.start()
        ready.result(timeout)
        if not self._subscribed.wait(timeout):
            self.stop()
            raise RuntimeError(f"emulator could not subscribe to {REQUEST_FILTER} within "
                               f"{timeout:g}s")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None or self._thread is None:
            return
        if not loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
        self._thread.join(10)
        self._loop = None

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_subscribed(self, timeout: float = 30.0) -> bool:
        """After a broker restart: wait until the emulator serves requests again."""
        return self._subscribed.wait(timeout)

    # ------------------------------------------------------------------ control API

    def call(self, fn: Callable[[JobsService], T]) -> T:
        """Run ``fn(service)`` on the emulator thread; publish any notifications it returns."""
        return self._call(lambda: fn(self.service))

    def call_commands(self, fn: Callable[[CommandsService], T]) -> T:
        """Run ``fn(commands)`` on the emulator thread; publish any request it returns."""
        return self._call(lambda: fn(self.commands))

    def _call(self, fn: Callable[[], T]) -> T:
        loop = self._loop
        if loop is None:
            raise RuntimeError("emulator is not running")

        async def run() -> T:
            result = fn()
            if isinstance(result, list) and all(isinstance(p, Publish | Message)
                                                for p in result):
                self._send(result)
            elif isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], list):
                self._send(result[1])
            self._schedule_tick()
            return result

        return asyncio.run_coroutine_threadsafe(run(), loop).result(30)

    def create_thing(self, thing_name: str) -> None:
        self.call(lambda s: s.create_thing(thing_name))

    def create_job(self, job_id: str, targets: list[str], document: dict[str, Any],
                   **kwargs: Any) -> None:
        self.call(lambda s: s.create_job(job_id, targets, document, **kwargs))

    def cancel_job(self, job_id: str, **kwargs: Any) -> None:
        self.call(lambda s: s.cancel_job(job_id, **kwargs))

    def delete_job(self, job_id: str, **kwargs: Any) -> None:
        self.call(lambda s: s.delete_job(job_id, **kwargs))

    def cancel_job_execution(self, job_id: str, thing_name: str, **kwargs: Any) -> None:
        self.call(lambda s: s.cancel_job_execution(job_id, thing_name, **kwargs))

    def delete_job_execution(self, job_id: str, thing_name: str, execution_number: int,
                             **kwargs: Any) -> None:
        self.call(lambda s: s.delete_job_execution(job_id, thing_name, execution_number,
                                                   **kwargs))

    def execution(self, job_id: str, thing_name: str,
                  execution_number: int | None = None) -> dict[str, Any]:
        return self.call(lambda s: s.execution(job_id, thing_name, execution_number))

    def executions_for_thing(self, thing_name: str) -> list[dict[str, Any]]:
        return self.call(lambda s: s.executions_for_thing(thing_name))

    def inject_rejections(self, code: str, count: int,
                          operations: set[str] | None = None) -> None:
        self.call(lambda s: s.inject_rejections(code, count, operations))

    def publish_raw(self, topic: str, payload: bytes) -> None:
        """Publish arbitrary bytes as the service (tests: duplicate or malformed messages)."""
        loop = self._loop
        if loop is None or self._connection is None:
            raise RuntimeError("emulator is not running")
        connection = self._connection
        loop.call_soon_threadsafe(connection.publish, topic, payload)

    def drop(self, count: int, operations: set[str], *, what: str = "request") -> None:
        """Lose the next ``count`` requests of ``operations`` (get, start-next, describe, update).

        ``what="request"``: the request never reaches the service (nothing changes);
        ``what="reply"``: the service applies it but the reply is lost, the nastier case a
        client must resolve from the version it finds next time. ``count=0`` clears all drops.
        """
        assert what in ("request", "reply")

        def apply(_: JobsService) -> None:
            if count == 0:
                self._drops.clear()
            else:
                self._drops.append([count, set(operations), what])

        self.call(apply)

    def _dropping(self, topic: str, what: str) -> bool:
        operation = _operation(topic)
        for entry in self._drops:
            if entry[2] == what and operation in entry[1]:
                entry[0] -= 1
                if entry[0] <= 0:
                    self._drops.remove(entry)
                self.dropped += 1
                return True
        return False

    def tick(self) -> None:
        """Apply timers now (tests that move a fake clock call this)."""
        self.call(lambda s: s.tick())

    # ------------------------------------------------------------------ emulator thread

    def _run(self, ready: Future[None]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._startup())
            ready.set_result(None)
        except BaseException as exc:
            ready.set_exception(exc)
            loop.close()
            return
        loop.run_forever()
        loop.close()

    async def _startup(self) -> None:
        self._connection = Connection(self._mqtt, self._client_id, on_message=self._on_message)
        self._connection.add_listener(self._on_connection)
        self._connection.start()

    async def _shutdown(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._connection is not None:
            await self._connection.stop()
        asyncio.get_running_loop().call_soon(asyncio.get_running_loop().stop)

    def _on_connection(self, event: ConnectionEvent) -> None:
        if event.kind == "connected" and not event.rejoined:
            self._tasks.add(task := asyncio.ensure_future(self._subscribe()))
            task.add_done_callback(self._tasks.discard)
        elif event.kind in ("disconnected", "stopped"):
            self._subscribed.clear()

    async def _subscribe(self) -> None:
        assert self._connection is not None
        try:
            await self._connection.subscribe(REQUEST_FILTER, COMMANDS_FILTER)
        except Exception as exc:
            log.error("emulator subscription failed filters=%s,%s error=%s", REQUEST_FILTER,
                      COMMANDS_FILTER, exc)
            return
        self._subscribed.set()
        log.info("emulator serving filters=%s,%s", REQUEST_FILTER, COMMANDS_FILTER)

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic.startswith("$aws/commands/"):
            try:
                self._send(self.commands.handle(topic, payload))
            except Exception:  # the emulator must keep serving whatever a device sends
                log.exception("emulator failed to handle topic=%s", topic)
            self._schedule_tick()
            return
        if self._drops and self._dropping(topic, "request"):
            return
        try:
            publishes = self.service.handle(topic, payload)
        except Exception:  # the emulator must keep serving whatever a device sends
            log.exception("emulator failed to handle topic=%s", topic)
            return
        self.requests_handled += 1
        if self._drops and publishes and self._dropping(topic, "reply"):
            publishes = publishes[1:]  # the reply comes first; notifications still go out
        self._send(publishes)
        self._schedule_tick()

    def _send(self, publishes: list[Publish] | list[Message]) -> None:
        assert self._connection is not None
        for pub in publishes:
            if isinstance(pub, Message):
                self._connection.publish(pub.topic, pub.payload, content_type=pub.content_type,
                                         message_expiry=pub.message_expiry)
            else:
                self._connection.publish(pub.topic, dumps(pub.payload).encode())

    def _schedule_tick(self) -> None:
        """Sleep exactly until the next step timer or job timeout, never poll."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadlines = [d for d in (self.service.next_deadline(), self.commands.next_deadline())
                     if d is not None]
        if not deadlines:
            return
        deadline = min(deadlines)
        loop = asyncio.get_running_loop()
        delay = max(0.0, deadline - self._clock())
        self._timer = loop.call_later(min(delay, 3600.0), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._send(self.service.tick())
        self._send(self.commands.tick())
        self._schedule_tick()


def _operation(topic: str) -> str | None:
    """The device operation a request topic names (``$aws/things/<t>/jobs/...``)."""
    parts = topic.split("/")
    if len(parts) < 5 or parts[:2] != ["$aws", "things"] or parts[3] != "jobs":
        return None
    rest = parts[4:]
    if rest == ["get"]:
        return "get"
    if rest == ["start-next"]:
        return "start-next"
    if len(rest) == 2 and rest[1] == "get":
        return "describe"
    if len(rest) == 2 and rest[1] == "update":
        return "update"
    return None
