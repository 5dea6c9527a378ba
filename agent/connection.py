"""The mTLS MQTT 5 connection: the only place the agent builds an awscrt client.

awscrt calls back on its own event-loop threads, holding the GIL; blocking there stalls the
connection (and blocking on an SDK future there deadlocks). So every lifecycle callback here is
one ``loop.call_soon_threadsafe`` and nothing else (bar :func:`disable_nagle`'s few syscalls on
a new connection); all state lives on the asyncio loop.

Reconnects are the CRT's: exponential backoff with full jitter between ``reconnect_min`` and
``reconnect_max``, forever, while the connection is started. A TLS handshake failure is mapped to
:class:`CertificateValidationException` naming the files to check, because the raw CRT error
(``AWS_IO_TLS_ERROR_NEGOTIATION_FAILURE`` 10-30 s after the attempt) tells a user nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from awscrt import exceptions as crt_exceptions
from awscrt import mqtt5
from awsiot import mqtt5_client_builder

from agent.config import MqttConfig
from agent.errors import CertificateValidationException, ConfigError, ConnectionFailedError
from agent.refusals import RefusalLog

__all__ = ["SESSION_EXPIRY", "Connection", "ConnectionEvent", "ConnectionState", "Message",
           "PublishAck", "describe_crt_error", "disable_nagle", "hop"]

log = logging.getLogger("agent.connection")

# CRT error names that mean "the TLS handshake failed", whoever refused whom.
_TLS_ERRORS = ("AWS_IO_TLS_", "AWS_IO_SOCKET_CLOSED_BY_PEER_DURING_TLS")
# ... and those that mean "the peer closed the connection" (not a keep-alive timeout).
_HANGUPS = ("HANGUP", "SOCKET_CLOSED")

SESSION_EXPIRY = 3600
"""Seconds the broker keeps our session (subscriptions, QoS 1 messages for us) after a drop.

A reconnect within it rejoins the session: the standing subscriptions need no SUBSCRIBE, and a
reply to a request that was in flight when the link dropped is kept for us instead of lost.
One hour is AWS IoT's default maximum; a longer outage just starts a clean session, and
:class:`agent.subscriptions.Subscriptions` subscribes again. A clean stop ends the session
(DISCONNECT with expiry 0): nothing is kept for a device that is not coming back soon.

``mqtt.session_expiry`` (opt-in, for AWS IoT Commands) replaces both rules: the session is kept
for that long and rejoined even by the first connect of a new process, and a clean stop keeps
it, so a command sent while the agent was down (or delivered and never acknowledged before a
crash) is delivered when it comes back.
"""


class ConnectionState(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ConnectionEvent:
    """What happened to the connection, delivered on the asyncio loop.

    ``kind`` is ``connected``, ``disconnected``, ``failed`` or ``stopped``. ``rejoined`` says the
    broker kept our session (subscriptions survived); ``error`` is the mapped agent error.
    """

    kind: str
    rejoined: bool = False
    error: Exception | None = None


@dataclass(frozen=True)
class Message:
    """One PUBLISH received on a routed topic, with the MQTT 5 properties a protocol reads.

    ``message_expiry`` is the seconds the broker says are left (it counts down while the
    message waits in a session); ``received`` is ``time.monotonic()`` when the CRT handed the
    message over, so ``received + message_expiry`` is its deadline on this host. ``ack_handle``
    is set when the route took manual control of the PUBACK: pass the message to
    :meth:`Connection.acknowledge` once it is safe (journaled), and not before.
    """

    topic: str
    payload: bytes
    content_type: str | None = None
    message_expiry: int | None = None
    received: float = 0.0
    ack_handle: Any = None


@dataclass(frozen=True)
class _Route:
    prefix: str
    handler: Callable[[Message], None]
    manual_ack: bool


def describe_crt_error(exc: BaseException | None) -> str:
    if exc is None:
        return "no error"
    name = getattr(exc, "name", None)
    message = getattr(exc, "message", None)
    if name is None and isinstance(exc, RuntimeError):  # "1033 (AWS_IO_TLS_CTX_ERROR): ..."
        return str(exc)
    if name and message:
        return f"{name} ({message})"
    return name or str(exc) or type(exc).__name__


def disable_nagle(port: int) -> int:
    """Set ``TCP_NODELAY`` on this process's TCP sockets whose peer port is ``port``.

    Why: aws-c-io (awscrt 0.36.1, still so in 0.38) never sets ``TCP_NODELAY`` and has no option
    for it. Jobs traffic is a train of small segments: the client acknowledges a reply (PUBACK)
    and a moment later publishes its next request, and Nagle's algorithm holds that request until
    the PUBACK's segment is ACKed, which the broker's kernel delays (40 ms on Linux) because it
    has nothing to send back. Measured on loopback (``python -m bench``, issue 5): 44-88 ms per
    Jobs request instead of well under 1 ms; over a WAN it costs up to a round trip per request.
    The CRT owns the socket and exposes no handle to it, so we find it in ``/proc/self/fd`` by
    its peer port (only the MQTT connection talks to that port; another socket caught by it
    merely loses Nagle). A no-op where ``/proc`` is missing. Returns the number of sockets set.
    """
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return 0
    changed = 0
    for name in names:
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=int(name))  # borrowed: detached below, never closed
        except (OSError, ValueError):
            continue
        try:
            if sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET,
                                                                   socket.AF_INET6) \
                    and sock.getpeername()[1] == port:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                changed += 1
        except OSError:
            pass  # closed meanwhile, or not connected
        finally:
            sock.detach()
    return changed


class PublishAck:
    """A QoS 1 PUBLISH's acknowledgement, read without waiting (from any thread)."""

    __slots__ = ("_future",)

    def __init__(self, future: Any) -> None:
        self._future = future

    def code(self) -> int | None:
        """The PUBACK's reason code; None while unanswered, or if the publish failed."""
        future = self._future
        if not future.done() or future.cancelled() or future.exception() is not None:
            return None
        puback = getattr(future.result(), "puback", None)
        return int(puback.reason_code) if puback is not None else None


def hop(loop: asyncio.AbstractEventLoop | None, fn: Callable[..., None], *args: Any) -> None:
    """From a CRT thread: schedule ``fn(*args)`` on the agent's loop, and do nothing else.

    Shared by every CRT callback (connection lifecycle, publishes, Jobs streams). A loop that is
    gone (interpreter exit) drops the event rather than raising on the CRT's thread.
    """
    if loop is None or loop.is_closed():
        return
    with contextlib.suppress(RuntimeError):  # loop closed meanwhile
        loop.call_soon_threadsafe(fn, *args)


def _is_tls_failure(exc: BaseException | None) -> bool:
    name = getattr(exc, "name", "") or ""
    return any(name.startswith(prefix) for prefix in _TLS_ERRORS)


class Connection:
    """One MQTT 5 client to AWS IoT Core over mutually authenticated TLS.

    ``on_message(topic, payload)``, if given, and every listener added with
    :meth:`add_message_listener` receive every PUBLISH on the asyncio loop, except those on a
    topic taken by :meth:`route` (a protocol that reads MQTT 5 properties or holds back the
    PUBACK).

    Use ``async with Connection(mqtt_config, client_id) as conn`` (waits for the first
    connection, bounded by ``connect_timeout``) or :meth:`start` without waiting (a daemon keeps
    retrying). Listeners registered with :meth:`add_listener` are called on the asyncio loop for
    every :class:`ConnectionEvent`, so other components (the Jobs client, the agent) react to
    reconnects without touching CRT threads.
    """

    def __init__(
        self,
        config: MqttConfig,
        client_id: str,
        *,
        on_message: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self.config = config
        self.client_id = client_id
        self.state = ConnectionState.IDLE
        self.last_error: Exception | None = None
        self.connections = 0  # successful connects so far: lets callers spot reconnects
        self._listeners: list[Callable[[ConnectionEvent], None]] = []
        self._message_listeners: list[Callable[[str, bytes], None]] = []
        if on_message is not None:
            self._message_listeners.append(on_message)
        # Operations sent and not yet answered, for diagnosing a broker that hangs up on them.
        self._unanswered: dict[int, tuple[str, str, Any]] = {}  # (operation, topic, CRT future)
        self._serial = 0
        self.refusals = RefusalLog()  # shared by everything on this connection
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: mqtt5.Client | None = None
        self._connected = asyncio.Event()
        self._stopped = asyncio.Event()
        self._failure: asyncio.Future[Exception] | None = None
        self._routes: tuple[_Route, ...] = ()

    # ------------------------------------------------------------------ public API

    @property
    def client(self) -> mqtt5.Client:
        """The underlying awscrt client (for the request-response client built on it)."""
        if self._client is None:
            raise RuntimeError("Connection.start() has not been called")
        return self._client

    @property
    def connected(self) -> bool:
        return self.state is ConnectionState.CONNECTED

    def add_listener(self, listener: Callable[[ConnectionEvent], None]) -> None:
        self._listeners.append(listener)

    def add_message_listener(self, listener: Callable[[str, bytes], None]) -> None:
        """``listener(topic, payload)`` for every PUBLISH received, on the asyncio loop."""
        self._message_listeners.append(listener)

    def route(self, prefix: str, handler: Callable[[Message], None], *,
              manual_ack: bool = False) -> None:
        """Deliver every PUBLISH whose topic starts with ``prefix`` to ``handler`` on the loop.

        Such messages go to ``handler`` alone (not to the message listeners), as a
        :class:`Message` with their MQTT 5 properties. With ``manual_ack`` the PUBACK of a QoS 1
        message waits for :meth:`acknowledge`, so a protocol can make a request durable before
        the broker forgets it (an unacknowledged message is delivered again when the session is
        rejoined). The CRT lets the PUBACK be taken over only inside its publish callback, so
        the prefix match runs there, on the CRT thread; the handler itself runs on the loop.
        """
        self._routes = (*self._routes, _Route(prefix, handler, manual_ack))

    def acknowledge(self, message: Message) -> None:
        """Send the PUBACK of a manually acknowledged message (a no-op for the others).

        If the connection dropped meanwhile the CRT refuses; the broker then delivers the
        message again (rejoined session) or has dropped it with the session.
        """
        if message.ack_handle is None or self._client is None:
            return
        try:
            self._client.invoke_publish_acknowledgement(message.ack_handle)
        except Exception as exc:  # the CRT raises its own error types here
            log.debug("puback not sent topic=%s error=%s", message.topic,
                      describe_crt_error(exc))

    def build(self) -> mqtt5.Client:
        """Create the CRT client (without connecting). Idempotent.

        Split from :meth:`start` because request-response clients must be created on the
        mqtt5 client before it starts, so their subscriptions follow the first CONNACK.
        """
        if self._client is None:
            self._loop = asyncio.get_running_loop()
            self._client = self._build_client()
        return self._client

    def start(self) -> None:
        """Start connecting; the CRT reconnects by itself until :meth:`stop`."""
        if self.state not in (ConnectionState.IDLE, ConnectionState.STOPPED):
            raise RuntimeError(f"connection already {self.state.value}")
        self.build()
        self._stopped.clear()
        self.state = ConnectionState.CONNECTING
        log.info("connecting endpoint=%s port=%d client_id=%s", self.config.endpoint,
                 self.config.port, self.client_id)
        self.client.start()

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait for a connection; raise on a TLS refusal at once, or on ``timeout``.

        A refused socket or an unreachable host is retried until the timeout, because the
        broker may just be starting; a certificate problem will not fix itself.
        """
        if self.connected:
            return
        loop = asyncio.get_running_loop()
        self._failure = loop.create_future()
        waiter = asyncio.ensure_future(self._connected.wait())
        try:
            done, _ = await asyncio.wait({waiter, self._failure}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if self._failure in done:
                raise self._failure.result()
            if waiter not in done:
                last = f": last error {describe_crt_error(self.last_error)}" \
                    if self.last_error else ""
                raise ConnectionFailedError(
                    f"could not connect to {self.config.endpoint}:{self.config.port} within "
                    f"{timeout:g}s{last}; check mqtt.endpoint/mqtt.port and that the broker "
                    "is reachable")
        finally:
            waiter.cancel()
            self._failure = None

    async def subscribe(self, *topic_filters: str, no_local: bool = True) -> None:
        """Subscribe at QoS 1; raise :class:`ConnectionFailedError` if the broker refuses."""
        codes = await self.subscribe_codes(topic_filters, no_local=no_local)
        bad = [f for f, code in zip(topic_filters, codes, strict=False) if code >= 0x80]
        if bad:
            raise ConnectionFailedError(f"broker refused subscription to {', '.join(bad)}")

    def subscribe_codes(self, topic_filters: Sequence[str], *, no_local: bool = True
                        ) -> asyncio.Future[list[int]]:
        """One SUBSCRIBE at QoS 1; the future gets the SUBACK's reason code per filter.

        It fails with the CRT's error if the SUBSCRIBE could not be sent (client stopped). The
        CRT queues it while offline.
        """
        packet = mqtt5.SubscribePacket(subscriptions=[
            mqtt5.Subscription(topic_filter=f, qos=mqtt5.QoS.AT_LEAST_ONCE, no_local=no_local)
            for f in topic_filters])
        result: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()

        def done(codes: list[int] | None, exc: BaseException | None) -> None:
            if result.done():
                return
            if exc is not None:
                result.set_exception(exc)
            else:
                result.set_result(codes)

        self._track("subscribe", topic_filters[0], self.client.subscribe(packet),
                    lambda suback: [int(c) for c in suback.reason_codes], done)
        return result

    def publish_acked(self, topic: str, payload: bytes,
                      on_refused: Callable[[int | None, BaseException | None], None], *,
                      content_type: str | None = None, message_expiry: int | None = None
                      ) -> PublishAck:
        """Publish at QoS 1 (the CRT queues it while offline).

        ``on_refused(reason_code, error)`` runs on the loop only if the broker refuses the
        PUBLISH (PUBACK reason code >= 0x80) or it fails; the returned :class:`PublishAck`
        tells, without waiting, whether the PUBACK has come and what it said.
        ``content_type`` and ``message_expiry`` (seconds) are the MQTT 5 properties of those
        names; the broker drops a message whose expiry ran out before it could be delivered.

        Why not a callback for every PUBACK: each hop from a CRT thread wakes the loop, and on
        every Jobs request's path that wake-up (and the GIL hand-over with it) cost as much as
        our whole client on loopback (issue 12's round trip figure). The CRT-side callback
        reads only the CRT's own completed future (thread-safe) to decide whether the loop has
        anything to do; agent state is still touched only on the loop.
        """
        future = self.client.publish(mqtt5.PublishPacket(
            topic=topic, payload=payload, qos=mqtt5.QoS.AT_LEAST_ONCE,
            content_type=content_type, message_expiry_interval_sec=message_expiry))
        ack = PublishAck(future)
        self._remember("publish", topic, future)
        loop = asyncio.get_running_loop()

        def settle(done: Any) -> None:
            code = ack.code()
            on_refused(code, None if code is not None else done.exception() or
                       RuntimeError("publish completed without a PUBACK"))

        def crt_done(done: Any) -> None:  # on a CRT thread
            code = ack.code()
            if code is None or code >= 0x80:
                hop(loop, settle, done)

        future.add_done_callback(crt_done)
        return ack

    def publish(self, topic: str, payload: bytes, *, content_type: str | None = None,
                message_expiry: int | None = None) -> None:
        """Publish at QoS 1 without waiting; a refusal or failure is logged."""
        self.publish_acked(topic, payload, lambda code, exc: self._publish_done(topic, code, exc),
                           content_type=content_type, message_expiry=message_expiry)

    def _publish_done(self, topic: str, code: int | None, exc: BaseException | None) -> None:
        if code is not None:
            self.refusals.refused("publish", topic, code)
        else:
            log.warning("publish failed topic=%s error=%s", topic, describe_crt_error(exc))

    def _remember(self, operation: str, topic: str, crt_future: Any) -> None:
        """Note an operation in flight, for :meth:`_on_disconnection` (answered ones pruned)."""
        self._serial += 1
        for serial in [k for k, v in self._unanswered.items() if v[2].done()]:
            del self._unanswered[serial]
        self._unanswered[self._serial] = (operation, topic, crt_future)

    def _track(self, operation: str, topic: str, crt_future: Any, convert: Callable[[Any], Any],
               on_done: Callable[[Any, BaseException | None], None]) -> None:
        """Call ``on_done(convert(result), None)`` or ``on_done(None, error)`` on the loop when
        the CRT completes ``crt_future`` (its thread only hops).

        The CRT's future is never cancelled from here: it completes it from its own thread, and
        setting a result on a cancelled future raises there.
        """
        loop = asyncio.get_running_loop()
        self._remember(operation, topic, crt_future)

        def settle(done: Any) -> None:
            exc = done.exception()
            if exc is None:
                try:
                    value = convert(done.result())
                except Exception as error:  # an odd ack must not kill the loop
                    exc = error
            if exc is not None:
                on_done(None, exc)
            else:
                on_done(value, None)

        crt_future.add_done_callback(lambda done: hop(loop, settle, done))

    async def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly and wait for the CRT to confirm (bounded)."""
        if self._client is None or self.state in (ConnectionState.IDLE, ConnectionState.STOPPED):
            self.state = ConnectionState.STOPPED
            return
        self.state = ConnectionState.STOPPING
        if self.config.session_expiry > 0:  # opt-in: the session outlives this process
            self._client.stop(mqtt5.DisconnectPacket())
        else:
            # Expiry 0: the broker drops our session now rather than keep it for SESSION_EXPIRY.
            self._client.stop(mqtt5.DisconnectPacket(session_expiry_interval_sec=0))
        try:
            await asyncio.wait_for(self._stopped.wait(), timeout)
        except TimeoutError:
            log.warning("mqtt client did not confirm stop within %gs", timeout)
        self.state = ConnectionState.STOPPED

    async def __aenter__(self) -> Connection:
        self.start()
        try:
            await self.wait_connected(self.config.connect_timeout)
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ CRT side

    def _build_client(self) -> mqtt5.Client:
        cfg = self.config
        kwargs: dict[str, Any] = {
            "endpoint": cfg.endpoint,
            "port": cfg.port,  # never let the builder pick 443/ALPN behind our back
            "cert_filepath": str(cfg.cert),
            "pri_key_filepath": str(cfg.key),
            "client_id": self.client_id,
            "enable_metrics_collection": False,  # else CONNECT's username is an SDK banner
            "keep_alive_interval_sec": max(int(cfg.keep_alive), 32),
            "ping_timeout_ms": 30_000,
            # A clean session at start-up (nothing stale from an earlier run), then rejoin it
            # after a drop: see SESSION_EXPIRY.
            "session_behavior": mqtt5.ClientSessionBehaviorType.REJOIN_POST_SUCCESS,
            "session_expiry_interval_sec": SESSION_EXPIRY,
            "on_publish_received": self._crt_publish,
            "retry_jitter_mode": mqtt5.ExponentialBackoffJitterMode.FULL,
            "min_reconnect_delay_ms": int(cfg.reconnect_min * 1000),
            "max_reconnect_delay_ms": int(cfg.reconnect_max * 1000),
            "min_connected_time_to_reset_reconnect_delay_ms": 30_000,
            "on_lifecycle_connection_success": self._crt_success,
            "on_lifecycle_connection_failure": self._crt_failure,
            "on_lifecycle_disconnection": self._crt_disconnection,
            "on_lifecycle_stopped": self._crt_stopped,
        }
        if cfg.session_expiry > 0:
            # Opt-in (mqtt.session_expiry): rejoin even on the first connect of a new process:
            # what the broker kept for us (requests published while we were down, or delivered
            # and never acknowledged before a crash) is delivered now, and the journal tells new
            # from seen. Subscriptions are made again anyway (a fresh process knows of none).
            kwargs["session_behavior"] = mqtt5.ClientSessionBehaviorType.REJOIN_ALWAYS
            kwargs["session_expiry_interval_sec"] = int(cfg.session_expiry)
        if not cfg.iot_core_limits:  # see MqttConfig.iot_core_limits
            kwargs["extended_validation_and_flow_control_options"] = \
                mqtt5.ExtendedValidationAndFlowControlOptions.NONE
        if cfg.ca is not None:
            kwargs["ca_filepath"] = str(cfg.ca)
        try:
            return mqtt5_client_builder.mtls_from_path(**kwargs)
        except (crt_exceptions.AwsCrtError, RuntimeError) as exc:
            # awscrt raises RuntimeError("1033 (AWS_IO_TLS_CTX_ERROR) ...") for unusable PEMs.
            raise CertificateValidationException(
                f"cannot load the TLS credentials ({describe_crt_error(exc)}): check that "
                f"mqtt.cert={cfg.cert} and mqtt.key={cfg.key} are PEM files that belong together"
                + (f" and mqtt.ca={cfg.ca} is a PEM CA bundle" if cfg.ca else "")) from exc
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot build the MQTT client: {exc}") from exc

    # Each of these runs on a CRT thread: hop to the loop and return.
    def _crt_success(self, data: mqtt5.LifecycleConnectSuccessData) -> None:
        # Here, on the thread that owns the new socket, before any request goes out on it.
        disable_nagle(self.config.port)
        settings = data.negotiated_settings
        rejoined = bool(settings.rejoined_session) if settings is not None else False
        self._hop(self._on_success, rejoined)

    def _crt_failure(self, data: mqtt5.LifecycleConnectFailureData) -> None:
        self._hop(self._on_failure, data.exception)

    def _crt_disconnection(self, data: mqtt5.LifecycleDisconnectData) -> None:
        packet = data.disconnect_packet
        code = int(packet.reason_code) if packet is not None else None
        self._hop(self._on_disconnection, data.exception, code)

    def _crt_stopped(self, data: mqtt5.LifecycleStoppedData) -> None:
        self._hop(self._on_stopped)

    def _crt_publish(self, data: mqtt5.PublishReceivedData) -> None:
        packet = data.publish_packet
        topic = packet.topic
        for route in self._routes:
            if topic.startswith(route.prefix):
                # The PUBACK can only be taken over inside this callback; the rest hops.
                acquire = getattr(data, "acquire_publish_acknowledgement_control", None)
                handle = acquire() if route.manual_ack and acquire is not None else None
                self._hop(route.handler, Message(
                    topic, bytes(packet.payload or b""), packet.content_type,
                    packet.message_expiry_interval_sec, time.monotonic(), handle))
                return
        self._hop(self._on_publish, topic, bytes(packet.payload or b""))

    def _hop(self, fn: Callable[..., None], *args: Any) -> None:
        hop(self._loop, fn, *args)

    # ------------------------------------------------------------------ loop side

    def _emit(self, event: ConnectionEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a listener bug must not take the connection down
                log.exception("connection listener failed event=%s", event.kind)

    def _on_success(self, rejoined: bool) -> None:
        self.state = ConnectionState.CONNECTED
        self.connections += 1
        self.last_error = None
        self._connected.set()
        log.info("connected endpoint=%s port=%d rejoined_session=%s count=%d",
                 self.config.endpoint, self.config.port, rejoined, self.connections)
        self._emit(ConnectionEvent("connected", rejoined=rejoined))

    def map_error(self, exc: BaseException | None) -> Exception:
        cfg = self.config
        if _is_tls_failure(exc):
            files = f"mqtt.cert={cfg.cert}, mqtt.key={cfg.key}" + (
                f", mqtt.ca={cfg.ca}" if cfg.ca else " (system CA store)")
            return CertificateValidationException(
                f"TLS handshake with {cfg.endpoint}:{cfg.port} failed "
                f"({describe_crt_error(exc)}): the broker refused the device certificate or "
                f"the broker's certificate is not trusted; check {files} and that the "
                "certificate is registered and active")
        return ConnectionFailedError(
            f"cannot connect to {cfg.endpoint}:{cfg.port}: {describe_crt_error(exc)}")

    def _on_failure(self, exc: BaseException | None) -> None:
        if self.state in (ConnectionState.STOPPING, ConnectionState.STOPPED):
            return
        error = self.map_error(exc)
        self.last_error = exc if isinstance(exc, Exception) else error
        log.warning("connection attempt failed endpoint=%s port=%d error=%s",
                    self.config.endpoint, self.config.port, describe_crt_error(exc))
        if isinstance(error, CertificateValidationException) and self._failure is not None \
                and not self._failure.done():
            self._failure.set_result(error)
        self._emit(ConnectionEvent("failed", error=error))

    def _on_publish(self, topic: str, payload: bytes) -> None:
        for listener in self._message_listeners:
            try:
                listener(topic, payload)
            except Exception:  # one consumer's bug must not starve the others
                log.exception("message listener failed topic=%s", topic)

    def _on_disconnection(self, exc: BaseException | None, code: int | None = None) -> None:
        was_connected = self.state is ConnectionState.CONNECTED
        if self.state is ConnectionState.CONNECTED:
            self.state = ConnectionState.CONNECTING
        self._connected.clear()
        if was_connected:
            log.warning("disconnected endpoint=%s error=%s%s", self.config.endpoint,
                        describe_crt_error(exc),
                        f" reason=0x{code:02X}" if code is not None else "")
            name = getattr(exc, "name", "") or ""
            if code is not None or any(part in name for part in _HANGUPS):
                unanswered = [(op, topic) for op, topic, future in self._unanswered.values()
                              if not future.done()]
                self.refusals.disconnected(unanswered, code,
                                           describe_crt_error(exc))
            self._emit(ConnectionEvent("disconnected", error=ConnectionFailedError(
                f"connection to {self.config.endpoint}:{self.config.port} lost: "
                f"{describe_crt_error(exc)}")))

    def _on_stopped(self) -> None:
        self.state = ConnectionState.STOPPED
        self._connected.clear()
        self._stopped.set()
        self._emit(ConnectionEvent("stopped"))
