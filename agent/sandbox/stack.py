"""The local cloud in one object: certificates, a mutual-TLS Mosquitto, the Jobs emulator and
its two HTTP fronts (the ``iot`` control plane and the ``iot-jobs-data`` data plane).

Used by the tests and by ``iot-jobs-agent sandbox``. :meth:`Stack.thing` registers a thing,
issues its certificate, attaches it to the thing and the default policies to it (or the policy
given), and writes an agent config for it, so anything that takes ``--config`` can talk to the
sandbox exactly as it would to AWS IoT; ``boto3`` clients reach it through
:attr:`Stack.control_endpoint` and :attr:`Stack.data_endpoint`, policies included
(:attr:`Stack.policies` is the same store in Python).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import yaml

from agent.sandbox.broker import ADMIN_IDENTITY, Broker, start_broker
from agent.sandbox.emulator import Emulator
from agent.sandbox.http import HttpFront
from agent.sandbox.http_control import ACCOUNT_ID, REGION, control_plane
from agent.sandbox.http_data import data_plane
from agent.sandbox.iot_policy import DEFAULT_POLICIES, Grants, parse_policy
from agent.sandbox.pki import Identity, Pki, create_pki
from agent.sandbox.policies import Certificate, Policies, PolicyStore

__all__ = ["EMULATOR_IDENTITY", "Stack"]

EMULATOR_IDENTITY = "jobs-emulator"


class Stack:
    """Start with :meth:`start` (or ``with Stack(dir) as stack``); stop with :meth:`stop`.

    ``port`` is the broker's, ``control_port``/``data_port`` the HTTP fronts' (0: any free one;
    all bind 127.0.0.1). ``region`` and ``account_id`` only shape the ARNs the control plane
    hands out and accepts. ``policy``: a policy document that replaces the default ones
    (:data:`~agent.sandbox.iot_policy.DEFAULT_POLICIES`) for every thing, created as
    ``sandbox-device``; refused like ``create_policy`` refuses it.
    """

    def __init__(self, directory: Path, *, port: int | None = None,
                 clock: Callable[[], float] = time.time, control_port: int = 0,
                 data_port: int = 0, region: str = REGION,
                 account_id: str = ACCOUNT_ID, policy: str | None = None) -> None:
        self.dir = Path(directory)
        self._port = port
        self._clock = clock
        self._http_ports = (control_port, data_port)
        self.region = region
        self.account_id = account_id
        self.default_policies = ({"sandbox-device": policy} if policy is not None
                                 else dict(DEFAULT_POLICIES))
        self.policies = Policies(PolicyStore(region=region, account_id=account_id),
                                 self._push)
        self.pki: Pki | None = None
        self.broker: Broker | None = None
        self.emulator: Emulator | None = None
        self.control: HttpFront | None = None
        self.data: HttpFront | None = None

    def start(self) -> Stack:
        self.dir.mkdir(parents=True, exist_ok=True)
        now = int(self._clock())
        for name, document in self.default_policies.items():  # refused before anything starts
            self.policies.call(lambda store, n=name, d=document: store.create_policy(n, d, now))
        self.pki = create_pki(self.dir / "pki")
        self.broker = start_broker(self.dir / "broker", self.pki, port=self._port,
                                   service_identities=(EMULATOR_IDENTITY,))
        identity = self.pki.client(EMULATOR_IDENTITY)
        try:
            self.emulator = Emulator(endpoint=self.broker.host, port=self.broker.port,
                                     cert=identity.cert, key=identity.key,
                                     ca=self.pki.ca_cert, clock=self._clock).start()
        except BaseException:
            self.broker.stop()
            raise
        try:  # after the emulator: every HTTP request is served through it
            self.control = control_plane(self.emulator, region=self.region,
                                         account_id=self.account_id, policies=self.policies)
            self.control.start(self._http_ports[0])
            self.data = data_plane(self.emulator, region=self.region,
                                   account_id=self.account_id).start(self._http_ports[1])
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for front in (self.data, self.control):  # before the emulator they call into
            if front is not None:
                front.stop()
        if self.emulator is not None:
            self.emulator.stop()
        if self.broker is not None:
            self.broker.close()

    @property
    def control_endpoint(self) -> str:
        """``http://127.0.0.1:P`` for ``boto3.client("iot", endpoint_url=...)``."""
        if self.control is None:
            raise RuntimeError("the stack is not running")
        return self.control.endpoint

    @property
    def data_endpoint(self) -> str:
        """``http://127.0.0.1:Q`` for ``boto3.client("iot-jobs-data", endpoint_url=...)``."""
        if self.data is None:
            raise RuntimeError("the stack is not running")
        return self.data.endpoint

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def thing(self, name: str, *, extra: dict[str, object] | None = None,
              mqtt: dict[str, object] | None = None, policy: str | None = None) -> Path:
        """Register ``name``, issue its certificate, write ``things/<name>/agent.yaml``.

        The certificate gets the default policies, or only ``policy`` (a document, created as
        ``<name>-policy``) when given; change them later with :attr:`policies` or boto3.
        """
        assert self.pki is not None and self.broker is not None and self.emulator is not None
        if name in (EMULATOR_IDENTITY, ADMIN_IDENTITY):
            raise ValueError(f"{name} is the name of a sandbox service identity")
        self.emulator.create_thing(name)
        identity, _ = self.certificate(name)
        self._set_policy(name, policy, thing=name)
        directory = self.dir / "things" / name
        directory.mkdir(parents=True, exist_ok=True)
        config: dict[str, object] = {
            "thing_name": name,
            "mqtt": {
                "endpoint": self.broker.host,
                "port": self.broker.port,
                "cert": str(identity.cert),
                "key": str(identity.key),
                "ca": str(self.pki.ca_cert),
                **(mqtt or {}),
            },
            **(extra or {}),
        }
        path = directory / "agent.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def certificate(self, name: str) -> tuple[Identity, str]:
        """Issue (or reuse) the certificate with CN ``name`` and register it, attached to no
        thing and no policy (so it may do nothing yet); returns it and its ARN."""
        assert self.pki is not None
        identity = self.pki.client(name)
        certificate = Certificate(identity.certificate_id, name, identity.cert.read_text(),
                                  int(self._clock()))
        return identity, self.policies.call(lambda store: store.add_certificate(certificate))

    def set_policy(self, name: str, document: str | None) -> None:
        """Make ``document`` the only policy of the certificate with CN ``name`` (created, or
        replaced, as ``<name>-policy``); ``None`` attaches the default policies instead.
        Takes effect on the broker before this returns (a connected device is disconnected
        and reconnects under it, see :mod:`agent.sandbox.dynsec`).

        Raises:
            Rejection: the document is refused, as ``create_policy`` refuses it.
        """
        self._set_policy(name, document)

    def _set_policy(self, name: str, document: str | None, *, thing: str | None = None) -> None:
        assert self.pki is not None
        certificate_id = self.pki.client(name).certificate_id
        own = f"{name}-policy"
        now = int(self._clock())
        if document is not None:  # refused before anything changes
            parse_policy(document, region=self.region, account=self.account_id)

        def apply(store: PolicyStore) -> set[str]:
            target = store.certificate_arn(certificate_id)
            touched = set() if thing is None else store.attach_thing_principal(
                thing, certificate_id)
            for attached in store.attached_policies(target):
                touched |= store.detach_policy(attached["policyName"], target)
            if any(p["policyName"] == own for p in store.list_policies()):
                store.delete_policy(own)
            wanted = list(self.default_policies)
            if document is not None:
                store.create_policy(own, document, now)
                wanted = [own]
            for policy_name in wanted:
                touched |= store.attach_policy(policy_name, target)
            return touched

        self.policies.change(apply)

    def _push(self, identity: str, grants: Grants) -> None:
        assert self.broker is not None
        self.broker.grant(identity, allow=grants.allow, deny=grants.deny)
