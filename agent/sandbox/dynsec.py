"""Mosquitto's dynamic-security plugin: its configuration, its commands, and a client to send them.

The sandbox broker authorises like AWS IoT Core: a subscription or publish outside a device's
policy is answered "not authorized" (SUBACK / PUBACK reason code 0x87), and a message the policy
does not let it receive is never delivered. Mosquitto's ``acl_file`` cannot do the first half (it
grants every SUBACK, 2.0.11), the dynamic-security plugin shipped in Debian's package can:

* every certificate identity (``use_identity_as_username``: the CN) is a dynsec *client*; an
  identity with no client entry may do nothing (every check defers, and Mosquitto denies);
* a client has two *roles*, checked in priority order: ``policy-deny:<id>:<n>`` first, then
  ``policy-allow:<id>:<n>``, so an explicit Deny wins over any Allow as in AWS (within one role
  dynsec checks a literal subscription ACL before pattern ones, whatever their priorities);
* defaults deny everything but unsubscribing, so nothing is allowed that no policy allows.

What 2.0.11 does at run time, found by running it (``tests/integration/test_policies.py``):
``createClient`` takes effect at once without disturbing a connected client of that name, and
``modifyClient`` (our way of replacing a client's roles) *disconnects* every client of that name
with DISCONNECT 0x98 (administrative action): it reconnects under the new roles and its
subscriptions are checked again. AWS applies a policy change without disconnecting. Deleting a
role that a client still holds crashes the broker, so old roles go only once unused. The plugin
saves its state to its configuration file after every command, so a restarted broker keeps it.

The pure half (:class:`Acl`, :func:`config_document`, :func:`grant_commands`) builds JSON; the
thin edge, :class:`DynsecAdmin`, is an awscrt MQTT5 client that publishes command batches to
``$CONTROL/dynamic-security/v1`` and waits for their answers. Its callbacks run on CRT threads
and only set events or enqueue; all waiting happens on the caller's thread.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from awscrt import mqtt5
from awsiot import mqtt5_client_builder

__all__ = [
    "ACL_TYPES",
    "CONTROL_TOPIC",
    "PLUGIN_PATHS",
    "RESPONSE_TOPIC",
    "Acl",
    "DynsecAdmin",
    "DynsecError",
    "config_document",
    "grant_commands",
]

CONTROL_TOPIC: Final = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC: Final = "$CONTROL/dynamic-security/v1/response"

PLUGIN_PATHS: Final = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/arm-linux-gnueabihf/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
)
"""Where Debian, Ubuntu and a source install put the plugin (``dpkg -L mosquitto``)."""

ACL_TYPES: Final = frozenset({"publishClientSend", "publishClientReceive", "subscribeLiteral",
                              "subscribePattern"})
"""publishClientSend = iot:Publish, publishClientReceive = iot:Receive, subscribeLiteral and
subscribePattern = iot:Subscribe on a filter given exactly or by pattern."""

COMMAND_TIMEOUT: Final = 10.0
"""Seconds to wait for the broker's answer to one batch (it answers within milliseconds)."""


class DynsecError(RuntimeError):
    """The broker refused a command, or did not answer; the message names the command."""


@dataclass(frozen=True, order=True)
class Acl:
    """One dynsec ACL: what an identity may (or, in its deny role, may not) do on a topic."""

    acltype: str
    topic: str

    def __post_init__(self) -> None:
        if self.acltype not in ACL_TYPES:
            raise ValueError(f"unknown dynsec acltype {self.acltype!r}")
        if not self.topic:
            raise ValueError("an ACL needs a topic")

    def json(self, *, allow: bool) -> dict[str, Any]:
        return {"acltype": self.acltype, "topic": self.topic, "allow": allow}


def _role(name: str, acls: Iterable[Acl], *, allow: bool) -> dict[str, Any]:
    return {"rolename": name, "acls": [acl.json(allow=allow) for acl in sorted(set(acls))]}


def role_names(identity: str, generation: int) -> tuple[str, str]:
    """The deny and allow roles of one generation of an identity's grants."""
    return (f"policy-deny:{identity}:{generation}", f"policy-allow:{identity}:{generation}")


def config_document(fixed: dict[str, Sequence[Acl]]) -> dict[str, Any]:
    """The plugin's initial configuration: ``fixed`` identities (the Jobs emulator, the admin)
    with allow-only roles; everything else is denied until :func:`grant_commands` says so."""
    clients, roles = [], []
    for identity, acls in sorted(fixed.items()):
        roles.append(_role(f"fixed:{identity}", acls, allow=True))
        clients.append({"username": identity, "roles": [{"rolename": f"fixed:{identity}"}]})
    return {
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False,
                             "subscribe": False, "unsubscribe": True},
        "clients": clients,
        "groups": [],
        "roles": roles,
    }


def grant_commands(identity: str, deny: Iterable[Acl], allow: Iterable[Acl], *,
                   generation: int) -> list[dict[str, Any]]:
    """One batch that gives ``identity`` exactly these ACLs, replacing what it had.

    ``generation`` counts the identity's grants from 1: the first creates its client entry, a
    later one creates new roles, moves the client onto them, and only then deletes the roles of
    the generation before (Mosquitto 2.0.11 crashes on ``deleteRole`` of a role a client still
    holds). The broker runs a batch as one unit between two packets, so no check ever sees
    half of it.
    """
    deny_name, allow_name = role_names(identity, generation)
    commands: list[dict[str, Any]] = [
        {"command": "createRole", **_role(deny_name, deny, allow=False)},
        {"command": "createRole", **_role(allow_name, allow, allow=True)},
        {"command": "createClient" if generation == 1 else "modifyClient", "username": identity,
         "roles": [{"rolename": deny_name, "priority": 1},
                   {"rolename": allow_name, "priority": 0}]},
    ]
    if generation > 1:
        commands += [{"command": "deleteRole", "rolename": old}
                     for old in role_names(identity, generation - 1)]
    return commands


class DynsecAdmin:
    """An MQTT client with the ``$CONTROL`` role, sending command batches and reading answers.

    Connects on first use and stays connected; after a broker restart it reconnects by itself
    (awscrt) and subscribes to the answers again before the next batch. Thread-safe: one batch
    at a time.

    Parameters:
        host, port: the broker.
        cert, key, ca: the admin identity (its CN must hold the fixed admin role).
        client_id: distinct from every other client of the broker.
    """

    def __init__(self, *, host: str, port: int, cert: Path, key: Path, ca: Path,
                 client_id: str = "sandbox-dynsec-admin") -> None:
        self._params = (host, port, cert, key, ca, client_id)
        self._lock = threading.Lock()
        self._client: Any = None
        self._answers: queue.Queue[bytes] = queue.Queue()
        self._connected = threading.Event()
        self._sessions = 0  # successful connections so far (CRT thread writes, we read)
        self._subscribed_in = -1  # the session our subscription belongs to
        self._stopped = threading.Event()

    def run(self, commands: Sequence[dict[str, Any]], *,
            timeout: float = COMMAND_TIMEOUT) -> list[dict[str, Any]]:
        """Send one batch and return the broker's answers, in order.

        Raises:
            DynsecError: an answer carries an ``error`` (the broker applied the commands before
                it), or no answer came within ``timeout``.
        """
        if not commands:
            return []
        tag = uuid.uuid4().hex
        batch = [{**command, "correlationData": f"{tag}:{i}"} for i, command in
                 enumerate(commands)]
        with self._lock:
            deadline = time.monotonic() + timeout
            self._ready(deadline)
            self._client.publish(mqtt5.PublishPacket(
                topic=CONTROL_TOPIC, payload=json.dumps({"commands": batch}).encode(),
                qos=mqtt5.QoS.AT_LEAST_ONCE)).result(max(0.1, deadline - time.monotonic()))
            answers = self._answer(f"{tag}:0", deadline)
        failed = [a for a in answers if a.get("error")]
        if failed:
            raise DynsecError("; ".join(f"{a.get('command')}: {a['error']}" for a in failed))
        return answers

    def close(self) -> None:
        """Disconnect (idempotent)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.stop()
            self._stopped.wait(5)

    # ------------------------------------------------------------------ internals

    def _ready(self, deadline: float) -> None:
        """Connected, and subscribed to the answers in this very session."""
        if self._client is None:
            self._client = self._build()
            self._client.start()
        if not self._connected.wait(max(0.0, deadline - time.monotonic())):
            raise DynsecError("the dynamic-security admin could not connect to the broker")
        session = self._sessions
        if self._subscribed_in != session:
            suback = self._client.subscribe(mqtt5.SubscribePacket([mqtt5.Subscription(
                RESPONSE_TOPIC, mqtt5.QoS.AT_LEAST_ONCE)])).result(
                max(0.1, deadline - time.monotonic()))
            if suback.reason_codes[0] != mqtt5.SubackReasonCode.GRANTED_QOS_1:
                raise DynsecError(f"the admin may not subscribe to {RESPONSE_TOPIC}: "
                                  f"{suback.reason_codes[0]!r}")
            self._subscribed_in = session

    def _answer(self, correlation: str, deadline: float) -> list[dict[str, Any]]:
        while True:
            try:
                raw = self._answers.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise DynsecError("the broker did not answer a dynamic-security command "
                                  "in time") from None
            answers = json.loads(raw).get("responses", [])
            if answers and answers[0].get("correlationData") == correlation:
                return list(answers)
            # an answer to an earlier batch that timed out: not ours

    def _build(self) -> Any:
        host, port, cert, key, ca, client_id = self._params
        self._stopped.clear()

        def on_success(_: Any) -> None:
            self._sessions += 1
            self._connected.set()

        return mqtt5_client_builder.mtls_from_path(
            endpoint=host, port=port, cert_filepath=str(cert), pri_key_filepath=str(key),
            ca_filepath=str(ca), client_id=client_id, enable_metrics_collection=False,
            min_reconnect_delay_ms=100, max_reconnect_delay_ms=1000,
            extended_validation_and_flow_control_options=(
                mqtt5.ExtendedValidationAndFlowControlOptions.NONE),
            on_publish_received=lambda data: self._answers.put(bytes(data.publish_packet.payload)),
            on_lifecycle_connection_success=on_success,
            on_lifecycle_disconnection=lambda _: self._connected.clear(),
            on_lifecycle_stopped=lambda _: self._stopped.set(),
        )
