"""Standing subscriptions on one :class:`~agent.connection.Connection`.

Each topic filter is subscribed once per MQTT session, all that are due in one SUBSCRIBE (at
most 8 filters, AWS IoT's limit per packet), and only again after a reconnect that did not
rejoin the session (the connection asks the broker to keep it for ``SESSION_EXPIRY``). A reply
filter kept this way makes every request one PUBLISH, where awscrt's request-response client
subscribed and unsubscribed around each one (issue 12).

States per filter, all on the asyncio loop: ``idle`` (wanted, not subscribed in this session),
``pending`` (SUBSCRIBE sent), ``granted``, ``refused`` (SUBACK reason code >= 0x80, logged once
by the connection's :class:`~agent.refusals.RefusalLog`). A refused filter is tried again at the
next connect, and at once when a request needs it (a policy may have been fixed meanwhile).
``on_status(filter, status)`` hears ``granted``, ``lost`` (the session was not rejoined) and
``refused``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence

from agent.connection import Connection, ConnectionEvent, ConnectionState, describe_crt_error
from agent.errors import NotAuthorizedError, RequestFailedError
from agent.refusals import is_policy_refusal

__all__ = ["MAX_FILTERS_PER_SUBSCRIBE", "Subscriptions"]

log = logging.getLogger("agent.subscriptions")

MAX_FILTERS_PER_SUBSCRIBE = 8
"""AWS IoT Core refuses a SUBSCRIBE with more topic filters than this."""

IDLE, PENDING, GRANTED, REFUSED = "idle", "pending", "granted", "refused"


class Subscriptions:
    """The filters one connection keeps subscribed; :meth:`ready` waits for some of them."""

    def __init__(self, connection: Connection,
                 on_status: Callable[[str, str], None] | None = None) -> None:
        self._connection = connection
        self._on_status = on_status or (lambda _f, _s: None)
        self._state: dict[str, str] = {}
        self._refusal: dict[str, int] = {}  # filter -> SUBACK reason code
        self._failure: dict[str, BaseException] = {}  # filter -> why the SUBSCRIBE failed
        self._changed = asyncio.Event()
        self._flushing = False
        self.subscribes = 0  # SUBSCRIBE packets sent (tests and the bench count them)
        connection.add_listener(self._on_connection)

    def state(self, topic_filter: str) -> str | None:
        return self._state.get(topic_filter)

    def granted(self, filters: Iterable[str]) -> bool:
        """Whether every filter is in place on the current connection (no waiting needed)."""
        return self._connection.connected and all(self._state.get(f) == GRANTED
                                                  for f in filters)

    def want(self, filters: Iterable[str]) -> None:
        """Keep ``filters`` subscribed from now on (subscribed with the next batch)."""
        for topic_filter in filters:
            if self._state.setdefault(topic_filter, IDLE) == IDLE:
                self._schedule()

    async def ready(self, filters: Sequence[str], timeout: float, operation: str = "") -> None:
        """Return once every filter is granted on the current connection.

        Raises :class:`NotAuthorizedError` (the policy refused one), :class:`RequestFailedError`
        (the SUBSCRIBE failed, or the client is stopped) or :class:`TimeoutError`.
        """
        self.want(filters)
        for topic_filter in filters:  # a refusal from before is retried: policies get fixed
            if self._state[topic_filter] == REFUSED:
                self._state[topic_filter] = IDLE
                self._schedule()
        async with asyncio.timeout(timeout):
            while True:
                if self._connection.state in (ConnectionState.STOPPING, ConnectionState.STOPPED):
                    raise RequestFailedError(f"{operation}: the MQTT client is not running",
                                             operation)
                states = [self._state[f] for f in filters]
                for topic_filter, state in zip(filters, states, strict=True):
                    if state == REFUSED:
                        raise self._refused(operation, topic_filter)
                    if topic_filter in self._failure:
                        exc = self._failure.pop(topic_filter)
                        raise RequestFailedError(
                            f"{operation}: could not subscribe to {topic_filter}: "
                            f"{describe_crt_error(exc)}", operation)
                if self._connection.connected and all(s == GRANTED for s in states):
                    return
                if IDLE in states:
                    self._schedule()
                await self._changed.wait()

    def _refused(self, operation: str, topic_filter: str) -> RequestFailedError:
        code = self._refusal.get(topic_filter, 0x80)
        line = self._connection.refusals.refused("subscribe", topic_filter, code)
        message = f"{operation}: {line}" if operation else line
        if is_policy_refusal(code):
            return NotAuthorizedError(message, operation, action="iot:Subscribe",
                                      topic=topic_filter)
        return RequestFailedError(message, operation)

    # ------------------------------------------------------------------ loop side

    def _pulse(self) -> None:
        """Wake every :meth:`ready` to look again."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _schedule(self) -> None:
        """Flush on the next loop turn, so wants from one turn share one SUBSCRIBE."""
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        if not self._connection.connected:
            return  # the next "connected" flushes
        due = [f for f, state in self._state.items() if state == IDLE]
        for start in range(0, len(due), MAX_FILTERS_PER_SUBSCRIBE):
            chunk = due[start:start + MAX_FILTERS_PER_SUBSCRIBE]
            for topic_filter in chunk:
                self._state[topic_filter] = PENDING
                self._failure.pop(topic_filter, None)
            self.subscribes += 1
            log.debug("subscribing filters=%s", ",".join(chunk))
            future = self._connection.subscribe_codes(chunk)
            future.add_done_callback(lambda done, c=tuple(chunk): self._subscribed(c, done))

    def _subscribed(self, chunk: tuple[str, ...], done: asyncio.Future[list[int]]) -> None:
        exc = done.exception()
        if exc is not None:
            log.warning("subscribe failed filters=%s error=%s", ",".join(chunk),
                        describe_crt_error(exc))
            for topic_filter in chunk:
                if self._state.get(topic_filter) == PENDING:
                    self._state[topic_filter] = IDLE
                    self._failure[topic_filter] = exc
        else:
            codes = done.result()
            for topic_filter, code in zip(chunk, codes, strict=False):
                if self._state.get(topic_filter) != PENDING:
                    continue
                if code < 0x80:
                    self._state[topic_filter] = GRANTED
                    self._refusal.pop(topic_filter, None)
                    self._connection.refusals.allowed("subscribe", topic_filter)
                    self._on_status(topic_filter, "granted")
                else:
                    self._state[topic_filter] = REFUSED
                    self._refusal[topic_filter] = code
                    self._connection.refusals.refused("subscribe", topic_filter, code)
                    self._on_status(topic_filter, "refused")
        self._pulse()

    def _on_connection(self, event: ConnectionEvent) -> None:
        if event.kind == "connected":
            for topic_filter, state in list(self._state.items()):
                if state == REFUSED:
                    self._state[topic_filter] = IDLE  # try again: the policy may have changed
                elif state == GRANTED and not event.rejoined:
                    self._state[topic_filter] = IDLE
                    self._on_status(topic_filter, "lost")
            # A SUBSCRIBE still unanswered stays pending: the CRT sends it again by itself.
            self._flush()
        self._pulse()
