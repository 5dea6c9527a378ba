"""The local cloud in one object: certificates, a mutual-TLS Mosquitto, and the Jobs emulator.

Used by the tests and by ``iot-jobs-agent sandbox``. :meth:`Stack.thing` registers a thing,
issues its certificate and writes an agent config for it, so anything that takes ``--config``
can talk to the sandbox exactly as it would to AWS IoT.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import yaml

from agent.sandbox.broker import Broker, start_broker
from agent.sandbox.emulator import Emulator
from agent.sandbox.pki import Pki, create_pki

__all__ = ["EMULATOR_IDENTITY", "Stack"]

EMULATOR_IDENTITY = "jobs-emulator"


class Stack:
    """Start with :meth:`start` (or ``with Stack(dir) as stack``); stop with :meth:`stop`."""

    def __init__(self, directory: Path, *, port: int | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.dir = Path(directory)
        self._port = port
        self._clock = clock
        self.pki: Pki | None = None
        self.broker: Broker | None = None
        self.emulator: Emulator | None = None

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
        return self

    def stop(self) -> None:
        if self.emulator is not None:
            self.emulator.stop()
        if self.broker is not None:
            self.broker.stop()

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
