"""What a reconnect costs on the wire, with the session rejoined and with a clean one.

``python -m bench.reconnect [--cuts N]``: a JobsClient with its streams open reaches a fresh
sandbox broker through an emulated link (:mod:`agent.sandbox.link`); the link drops the
connection N times, and after each reconnect the client makes the resync request the agent
makes. Mosquitto's log counts the packets and the link the bytes (TLS included), per reconnect,
once with the connection's persistent session (``SESSION_EXPIRY``) and once with the session
ending at every drop (expiry 0: what a clean session costs). Prints one JSON object. This is
the measurement behind the choice of a persistent session (README, "On the wire").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

import agent.connection as connection_module
from agent.config import load_config
from agent.connection import Connection
from agent.jobs import JobsClient
from agent.sandbox.link import Link
from agent.sandbox.stack import Stack
from bench.common import count_packets

__all__ = ["main"]


async def _cuts(stack: Stack, link: Link, config_path: Path, cuts: int) -> int:
    config = load_config(config_path)
    connection = Connection(config.mqtt, config.client_id)
    jobs = JobsClient(connection)
    jobs.open_streams(config.thing_name)
    assert stack.broker is not None
    async with connection:
        await jobs.get_pending_job_executions(thingName=config.thing_name)
        await asyncio.sleep(0.5)
        offset = stack.broker.log_path.stat().st_size
        link.reset_counters()
        for _ in range(cuts):
            before = connection.connections
            link.cut()
            while connection.connections == before:
                await asyncio.sleep(0.01)
            await jobs.get_pending_job_executions(thingName=config.thing_name)
            await asyncio.sleep(0.3)  # trailing acknowledgements
    return offset


def measure(directory: Path, cuts: int) -> dict[str, Any]:
    out: dict[str, Any] = {"cuts": cuts}
    kept = connection_module.SESSION_EXPIRY
    with Stack(directory) as stack:
        assert stack.broker is not None
        for label, expiry in (("session_rejoined", kept), ("clean_session", 0)):
            connection_module.SESSION_EXPIRY = expiry
            thing = f"reconnect-{label.replace('_', '-')}"
            config = yaml.safe_load(stack.thing(thing).read_text())
            with Link(stack.broker.port) as link:
                config["mqtt"].update(port=link.port, reconnect_min="100ms",
                                      reconnect_max="200ms", iot_core_limits=False)
                path = directory / f"{thing}.yaml"
                path.write_text(yaml.safe_dump(config))
                offset = asyncio.run(_cuts(stack, link, path, cuts))
                count = count_packets(stack.broker.log_path, offset, thing)
                out[label] = {
                    # + 1 CONNECT each time, which Mosquitto logs as "New client connected"
                    "sent_per_reconnect": {k: v / cuts for k, v in count.sent.items()},
                    "received_per_reconnect": {k: v / cuts for k, v in count.received.items()},
                    "bytes_up_per_reconnect": round(link.bytes_up / cuts),
                    "bytes_down_per_reconnect": round(link.bytes_down / cuts),
                }
    connection_module.SESSION_EXPIRY = kept
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reconnect")
    parser.add_argument("--cuts", type=int, default=10)
    args = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="iot-jobs-reconnect-"))
    try:
        print(json.dumps(measure(directory, args.cuts), indent=2))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
