"""The local cloud in one object: certificates, a mutual-TLS Mosquitto, the Jobs emulator and
its two HTTP fronts (the ``iot`` control plane and the ``iot-jobs-data`` data plane).

Used by the tests and by ``iot-jobs-agent sandbox``. :meth:`Stack.thing` registers a thing,
issues its certificate and writes an agent config for it, so anything that takes ``--config``
can talk to the sandbox exactly as it would to AWS IoT; ``boto3`` clients reach it through
:attr:`Stack.control_endpoint` and :attr:`Stack.data_endpoint`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import yaml

from agent.sandbox.broker import Broker, start_broker
from agent.sandbox.emulator import Emulator
from agent.sandbox.http import HttpFront
from agent.sandbox.http_control import ACCOUNT_ID, REGION, control_plane
from agent.sandbox.http_data import data_plane
from agent.sandbox.pki import Pki, create_pki

__all__ = ["EMULATOR_IDENTITY", "Stack"]

EMULATOR_IDENTITY = "jobs-emulator"


class Stack:
    """Start with :meth:`start` (or ``with Stack(dir) as stack``); stop with :meth:`stop`.

    ``port`` is the broker's, ``control_port``/``data_port`` the HTTP fronts' (0: any free one;
    all bind 127.0.0.1). ``region`` and ``account_id`` only shape the ARNs the control plane
    hands out and accepts.
    """

    def __init__(self, directory: Path, *, port: int | None = None,
                 clock: Callable[[], float] = time.time, control_port: int = 0,
                 data_port: int = 0, region: str = REGION,
                 account_id: str = ACCOUNT_ID) -> None:
        self.dir = Path(directory)
        self._port = port
        self._clock = clock
        self._http_ports = (control_port, data_port)
        self.region = region
        self.account_id = account_id
        self.pki: Pki | None = None
        self.broker: Broker | None = None
        self.emulator: Emulator | None = None
        self.control: HttpFront | None = None
        self.data: HttpFront | None = None

    def start(self) -> Stack:
        self.dir.mkdir(parents=True, exist_ok=True)
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
                                         account_id=self.account_id)
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
            self.broker.stop()

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
              mqtt: dict[str, object] | None = None) -> Path:
        """Register ``name``, issue its certificate, write ``things/<name>/agent.yaml``."""
        assert self.pki is not None and self.broker is not None and self.emulator is not None
        identity = self.pki.client(name)
        self.emulator.create_thing(name)
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
