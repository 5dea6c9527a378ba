"""The sandbox PKI and broker, against a real Mosquitto and real awscrt MQTT5 clients.

These tests pin down what the rest of the sandbox relies on: mTLS with the sandbox CA, the
certificate CN as identity, per-identity ACLs granted at run time (and how Mosquitto reports a
refusal), what awscrt reports for each kind of certificate failure, and that a restarted broker
keeps its port and its ACLs so clients reconnect by themselves.

CRT callbacks run on CRT event-loop threads, so the client wrapper's callbacks only put into
queues; the test thread does all the waiting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from awscrt import mqtt5
from awsiot import mqtt5_client_builder

from agent.sandbox import broker as broker_module
from agent.sandbox.broker import Broker, start_broker
from agent.sandbox.dynsec import Acl
from agent.sandbox.pki import Identity, Pki, create_pki

pytestmark = pytest.mark.broker

CONNECT_TIMEOUT = 15.0
"""Connect or reconnect (CRT reconnect backoff starts at up to 1 s with full jitter)."""

TLS_FAILURE_TIMEOUT = 90.0
"""A TLS failure detected by the client's s2n surfaces 10-30 s late (blinding delay)."""

OP_TIMEOUT = 5.0
"""A SUBACK, PUBACK or delivered message on loopback."""

SILENCE = 0.5
"""How long "receives nothing" is watched; deliveries on loopback take milliseconds."""


# --- fixtures (kept self-contained so they can move to a conftest as they are) -------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return create_pki(tmp_path_factory.mktemp("pki"))


def _start_or_skip(directory: Path, pki: Pki) -> Broker:
    """Start a broker; skip if Mosquitto is not installed, except in CI where that is a failure."""
    try:
        return start_broker(directory, pki)
    except RuntimeError as exc:
        if str(exc).startswith("mosquitto not found") and not os.environ.get("CI"):
            pytest.skip(str(exc))
        raise


@pytest.fixture(scope="module")
def broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with _start_or_skip(tmp_path_factory.mktemp("broker"), pki) as running:
        yield running


class Client:
    """An awscrt MQTT5 client for tests: callbacks only enqueue; waits happen on the test thread."""

    def __init__(
        self,
        broker: Broker,
        identity: Identity,
        *,
        ca: Path | None = None,
        client_id: str | None = None,
    ) -> None:
        self.messages: queue.Queue[mqtt5.PublishPacket] = queue.Queue()
        self.lifecycle: queue.Queue[tuple[str, Exception | None]] = queue.Queue()
        self.stopped = threading.Event()
        self.client = mqtt5_client_builder.mtls_from_path(
            endpoint=broker.host,
            port=broker.port,
            cert_filepath=str(identity.cert),
            pri_key_filepath=str(identity.key),
            ca_filepath=str(ca or broker.pki.ca_cert),
            client_id=client_id or identity.name,
            enable_metrics_collection=False,
            on_publish_received=lambda data: self.messages.put(data.publish_packet),
            on_lifecycle_connection_success=lambda data: self.lifecycle.put(("success", None)),
            on_lifecycle_connection_failure=lambda data: self.lifecycle.put(
                ("failure", data.exception)
            ),
            on_lifecycle_disconnection=lambda data: self.lifecycle.put(
                ("disconnection", data.exception)
            ),
            on_lifecycle_stopped=lambda data: self.stopped.set(),
        )
        self.started = False

    def start(self) -> None:
        self.client.start()
        self.started = True

    def next_event(self, timeout: float) -> tuple[str, Exception | None]:
        try:
            return self.lifecycle.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no lifecycle event within {timeout} s") from None

    def wait_connected(self, timeout: float = CONNECT_TIMEOUT) -> None:
        """Wait for a connection success, skipping disconnections and retried failures."""
        deadline = time.monotonic() + timeout
        while True:
            kind, exc = self.next_event(max(0.0, deadline - time.monotonic()))
            if kind == "success":
                return
            if time.monotonic() >= deadline:
                raise AssertionError(f"not connected within {timeout} s; last: {kind} {exc!r}")

    def subscribe(self, topic: str) -> mqtt5.SubackPacket:
        packet = mqtt5.SubscribePacket([mqtt5.Subscription(topic, mqtt5.QoS.AT_LEAST_ONCE)])
        return self.client.subscribe(packet).result(OP_TIMEOUT)

    def publish(self, topic: str, payload: bytes) -> mqtt5.PublishCompletionData:
        packet = mqtt5.PublishPacket(topic=topic, payload=payload, qos=mqtt5.QoS.AT_LEAST_ONCE)
        return self.client.publish(packet).result(OP_TIMEOUT)

    def receive(self, timeout: float = OP_TIMEOUT) -> mqtt5.PublishPacket:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message within {timeout} s") from None

    def assert_silent(self, duration: float = SILENCE) -> None:
        time.sleep(duration)
        assert self.messages.empty(), f"unexpected message on {self.messages.get().topic}"

    def close(self) -> None:
        if self.started:
            self.client.stop()
            self.stopped.wait(OP_TIMEOUT)
            self.started = False


@contextlib.contextmanager
def clients(broker: Broker) -> Iterator[Callable[..., Client]]:
    """``connect(identity, ca=, wait=)``: a started (and connected) client, stopped on exit."""
    made: list[Client] = []

    def factory(identity: Identity, *, ca: Path | None = None, wait: bool = True) -> Client:
        client = Client(broker, identity, ca=ca)
        made.append(client)
        client.start()
        if wait:
            client.wait_connected()
        return client

    try:
        yield factory
    finally:
        for client in made:
            client.close()


@pytest.fixture
def connect(broker: Broker) -> Iterator[Callable[..., Client]]:
    with clients(broker) as factory:
        yield factory


def _jobs_topic(thing: str, suffix: str) -> str:
    return f"$aws/things/{thing}/jobs/{suffix}"


def _grant_own_jobs(broker: Broker, thing: str) -> None:
    """Read, write and subscribe on the thing's own ``jobs/#`` (what the old acl_file gave)."""
    broker.grant(thing, allow=[Acl(kind, _jobs_topic(thing, "#")) for kind in (
        "publishClientSend", "publishClientReceive", "subscribePattern")])


def _payload(packet: mqtt5.PublishPacket) -> bytes:
    return bytes(packet.payload or b"")


# --- PKI --------------------------------------------------------------------------------------


def test_pki_files_modes_and_reuse(tmp_path: Path) -> None:
    first = create_pki(tmp_path / "pki")
    client = first.client("thing-1")
    contents = {p: p.read_bytes() for p in (first.ca_cert, first.ca_key, client.cert, client.key)}

    again = create_pki(tmp_path / "pki")

    assert again == first
    assert again.client("thing-1") == client
    assert {p: p.read_bytes() for p in contents} == contents  # reused, not reissued
    for key in (first.ca_key, first.server.key, client.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    for directory in (first.dir, client.cert.parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    text = _x509_text(first.server.cert)
    assert "DNS:localhost" in text
    assert "IP Address:127.0.0.1" in text
    assert "TLS Web Server Authentication" in text
    assert "TLS Web Client Authentication" in _x509_text(client.cert)
    assert "CN = thing-1" in _x509_text(client.cert)


def test_foreign_client_is_not_signed_by_the_sandbox_ca(pki: Pki) -> None:
    foreign = pki.foreign_client("thing-foreign")

    assert foreign.name == "thing-foreign"
    assert foreign.cert.parent != pki.client("thing-foreign").cert.parent
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(pki.ca_cert), str(foreign.cert)],
        capture_output=True,
        check=False,
    )
    assert verify.returncode != 0


def test_pki_recreates_leaves_when_the_ca_is_replaced(tmp_path: Path) -> None:
    first = create_pki(tmp_path / "pki")
    old_server = first.server.cert.read_bytes()
    first.ca_key.unlink()

    second = create_pki(tmp_path / "pki")

    assert second.server.cert.read_bytes() != old_server
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(second.ca_cert), str(second.server.cert)],
        capture_output=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr


def test_pki_rejects_names_unfit_for_a_cn_or_acl(pki: Pki) -> None:
    for bad in ("", "a/b", "a+b", "a#b", "with space", "x" * 129):
        with pytest.raises(ValueError, match="invalid identity name"):
            pki.client(bad)


def test_missing_openssl_is_a_runtime_error_naming_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(RuntimeError, match=r"^openssl not found: install it with `apt-get"):
        create_pki(tmp_path / "pki")


def _x509_text(cert: Path) -> str:
    return subprocess.run(
        ["openssl", "x509", "-noout", "-text", "-in", str(cert)],
        capture_output=True,
        check=True,
        text=True,
    ).stdout


# --- broker: identity and ACL -----------------------------------------------------------------


def test_thing_round_trips_a_publish_on_its_own_topic(
    pki: Pki, broker: Broker, connect: Callable[..., Client]
) -> None:
    _grant_own_jobs(broker, "thing-own")
    thing = connect(pki.client("thing-own"))
    topic = _jobs_topic("thing-own", "x")

    thing.subscribe(topic)
    completion = thing.publish(topic, b'{"hello":1}')

    assert completion.puback.reason_code == mqtt5.PubackReasonCode.SUCCESS
    received = thing.receive()
    assert (received.topic, _payload(received)) == (topic, b'{"hello":1}')


def test_emulator_wildcard_sees_every_thing_and_may_publish_to_any(
    pki: Pki, broker: Broker, connect: Callable[..., Client]
) -> None:
    _grant_own_jobs(broker, "thing-emu")
    emulator = connect(pki.client("jobs-emulator"))
    thing = connect(pki.client("thing-emu"))
    emulator.subscribe("$aws/things/+/jobs/#")
    thing.subscribe(_jobs_topic("thing-emu", "notify-next"))

    thing.publish(_jobs_topic("thing-emu", "start-next"), b"{}")
    seen = emulator.receive()
    reply = emulator.publish(_jobs_topic("thing-emu", "notify-next"), b'{"n":1}')

    assert (seen.topic, _payload(seen)) == (_jobs_topic("thing-emu", "start-next"), b"{}")
    assert reply.puback.reason_code == mqtt5.PubackReasonCode.SUCCESS
    assert _payload(thing.receive()) == b'{"n":1}'


def test_thing_can_neither_read_nor_write_another_things_topics(
    pki: Pki, broker: Broker, connect: Callable[..., Client]
) -> None:
    _grant_own_jobs(broker, "thing-a")
    _grant_own_jobs(broker, "thing-b")
    a = connect(pki.client("thing-a"))
    b = connect(pki.client("thing-b"))

    # The dynamic-security plugin refuses the subscription itself, as AWS IoT does (0x87).
    suback = a.subscribe(_jobs_topic("thing-b", "#"))
    assert suback.reason_codes == [mqtt5.SubackReasonCode.NOT_AUTHORIZED]
    b.publish(_jobs_topic("thing-b", "update"), b"secret")
    a.assert_silent()

    refused = a.publish(_jobs_topic("thing-b", "update"), b"forged")
    assert refused.puback.reason_code == mqtt5.PubackReasonCode.NOT_AUTHORIZED  # 135

    b.subscribe(_jobs_topic("thing-b", "#"))
    b.publish(_jobs_topic("thing-b", "probe"), b"still-up")  # a's refusal did not leak through
    assert _payload(b.receive()) == b"still-up"
    b.assert_silent()


def test_an_identity_never_granted_may_do_nothing(
    pki: Pki, connect: Callable[..., Client]
) -> None:
    stranger = connect(pki.client("thing-stranger"))  # a valid certificate, no ACLs

    suback = stranger.subscribe(_jobs_topic("thing-stranger", "#"))
    refused = stranger.publish(_jobs_topic("thing-stranger", "get"), b"{}")

    assert suback.reason_codes == [mqtt5.SubackReasonCode.NOT_AUTHORIZED]
    assert refused.puback.reason_code == mqtt5.PubackReasonCode.NOT_AUTHORIZED


def test_a_new_grant_disconnects_the_client_and_applies_on_reconnect(
    pki: Pki, broker: Broker, connect: Callable[..., Client]
) -> None:
    """Mosquitto 2.0.11's way of enforcing a changed ACL: DISCONNECT 0x98, then the new one."""
    _grant_own_jobs(broker, "thing-regrant")
    thing = connect(pki.client("thing-regrant"))
    topic = _jobs_topic("thing-regrant", "get")
    accepted = (mqtt5.PubackReasonCode.SUCCESS, mqtt5.PubackReasonCode.NO_MATCHING_SUBSCRIBERS)
    assert thing.publish(topic, b"{}").puback.reason_code in accepted

    broker.grant("thing-regrant", allow=[Acl("publishClientSend", _jobs_topic(
        "thing-regrant", "start-next"))], deny=[Acl("publishClientSend", topic)])

    kind, _ = thing.next_event(OP_TIMEOUT)
    assert kind == "disconnection"
    thing.wait_connected()
    assert thing.publish(topic, b"{}").puback.reason_code == \
        mqtt5.PubackReasonCode.NOT_AUTHORIZED
    allowed = thing.publish(_jobs_topic("thing-regrant", "start-next"), b"{}")
    assert allowed.puback.reason_code in accepted


def test_service_identities_acls_are_fixed(broker: Broker) -> None:
    for name in ("jobs-emulator", "sandbox-dynsec-admin"):
        with pytest.raises(ValueError, match="service identity"):
            broker.grant(name, allow=[])


# --- certificate failures (the names map to CertificateValidationException) ---------------------


def test_client_with_a_foreign_certificate_fails_to_connect(
    pki: Pki, connect: Callable[..., Client]
) -> None:
    # The broker (OpenSSL) refuses the client's certificate and closes; awscrt reads the alert
    # immediately (no s2n blinding on this side), so this one is fast.
    client = connect(pki.foreign_client("thing-foreign"), wait=False)

    kind, exc = client.next_event(TLS_FAILURE_TIMEOUT)

    assert kind == "failure"
    assert getattr(exc, "name", None) == "AWS_IO_TLS_ERROR_READ_FAILURE"


@pytest.mark.slow
def test_client_refuses_a_broker_outside_its_trust_store(
    pki: Pki, connect: Callable[..., Client]
) -> None:
    # The client's s2n rejects the server certificate; s2n's blinding delays this 10-30 s.
    client = connect(pki.client("thing-distrust"), ca=pki.foreign_ca_cert, wait=False)

    kind, exc = client.next_event(TLS_FAILURE_TIMEOUT)

    assert kind == "failure"
    assert getattr(exc, "name", None) == "AWS_IO_TLS_ERROR_NEGOTIATION_FAILURE"


# --- broker lifecycle -------------------------------------------------------------------------


def test_restart_keeps_the_port_and_clients_reconnect(pki: Pki, tmp_path: Path) -> None:
    with _start_or_skip(tmp_path / "broker", pki) as broker:
        port = broker.port
        _grant_own_jobs(broker, "thing-restart")
        thing = Client(broker, pki.client("thing-restart"))
        fresh: Client | None = None
        try:
            thing.start()
            thing.wait_connected()

            broker.restart()

            assert (broker.port, broker.running) == (port, True)
            kind, exc = thing.next_event(CONNECT_TIMEOUT)
            assert kind == "disconnection", exc
            thing.wait_connected()  # by itself, on the same port
            topic = _jobs_topic("thing-restart", "x")
            suback = thing.subscribe(topic)  # MQTT5 clean session: subscriptions are gone
            assert suback.reason_codes == [mqtt5.SubackReasonCode.GRANTED_QOS_1]  # ACLs kept
            thing.publish(topic, b"after")
            assert _payload(thing.receive()) == b"after"
            fresh = Client(broker, pki.client("thing-restart-2"))
            fresh.start()
            fresh.wait_connected()
        finally:
            thing.close()
            if fresh is not None:
                fresh.close()


def test_stop_is_idempotent_and_start_resumes(pki: Pki, tmp_path: Path) -> None:
    broker = _start_or_skip(tmp_path / "broker", pki)
    try:
        broker.stop()
        broker.stop()
        assert not broker.running
        with pytest.raises(OSError):
            socket.create_connection((broker.host, broker.port), timeout=1).close()

        broker.start()

        assert broker.running
        socket.create_connection((broker.host, broker.port), timeout=1).close()
        assert "mosquitto version 2" in broker.log_path.read_text()
    finally:
        broker.close()


def test_busy_port_is_reported(pki: Pki, tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]

        with pytest.raises(RuntimeError, match="in use"):
            start_broker(tmp_path / "broker", pki, port=port)


def test_early_exit_raises_with_the_log_tail(pki: Pki, tmp_path: Path) -> None:
    broken = dataclasses.replace(
        pki, server=dataclasses.replace(pki.server, key=tmp_path / "missing.key")
    )

    with pytest.raises(RuntimeError, match=r"mosquitto exited with status \d+") as info:
        start_broker(tmp_path / "broker", broken)

    assert "missing.key" in str(info.value)  # the tail of Mosquitto's own log


def test_missing_mosquitto_is_a_runtime_error_naming_the_fix(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(broker_module, "_SBIN_DIRS", (str(tmp_path),))

    with pytest.raises(RuntimeError) as info:
        start_broker(tmp_path / "broker", pki)

    assert str(info.value) == "mosquitto not found: install it with `apt-get install -y mosquitto`"
