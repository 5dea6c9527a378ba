"""The idle and start-up baseline: a bare awsiotsdk MQTT5 client, connected, doing nothing.

``python -m bench.bare_client --endpoint H --port P --cert C --key K --ca A --client-id I``
connects with the same builder and certificates as the agent, sends ``CONNECTED=1`` to
``$NOTIFY_SOCKET`` (as the agent sends ``READY=1``) and sleeps until SIGTERM. It imports nothing
but awscrt/awsiot and the standard library, so its RSS is the floor any awscrt-based agent pays.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from typing import Any

from awsiot import mqtt5_client_builder

__all__ = ["main"]


def _notify(message: bytes) -> None:
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):  # the abstract namespace, as sd_notify(3) reads it
        address = "\0" + address[1:]
    if address:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message, address)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_client")
    for name in ("endpoint", "cert", "key", "ca", "client-id"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def connected(_: Any) -> None:
        _notify(b"CONNECTED=1")

    client = mqtt5_client_builder.mtls_from_path(
        endpoint=args.endpoint, port=args.port, cert_filepath=args.cert,
        pri_key_filepath=args.key, ca_filepath=args.ca, client_id=args.client_id,
        enable_metrics_collection=False, keep_alive_interval_sec=60,
        on_lifecycle_connection_success=connected)
    client.start()
    stop.wait()
    client.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
