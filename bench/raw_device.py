"""The floor of the Commands figures, as its own process: ``python -m bench.raw_device ...``.

The least a device can do with a command: a raw awscrt MQTT 5 client, built like the agent's
(the same builder, TCP_NODELAY, no client-side flow control), subscribed to the thing's JSON
request topic. From the CRT callback itself it spawns the handler named by the payload
(``subprocess.Popen``, the way the bench's spawn floor does), waits for it, and publishes a bare
``{"status": "SUCCEEDED"}``: one MQTT delivery, the spawn, one update. No journal, no parsing
beyond ``json.loads``, no checks, no asyncio. Prints ``ready`` once subscribed; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import yaml
from awscrt import mqtt5

from agent.connection import disable_nagle
from bench.rt_client import QOS1, _raw_client, _subscribe

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.raw_device")
    parser.add_argument("--config", type=Path, required=True, help="the thing's agent config")
    parser.add_argument("--handler", type=Path, required=True, help="the program to spawn")
    args = parser.parse_args(argv)
    cfg = yaml.safe_load(args.config.read_text())
    root = f"$aws/commands/things/{cfg['thing_name']}/executions/"
    client: list[mqtt5.Client] = []

    def on_request(data: mqtt5.PublishReceivedData) -> None:
        packet = data.publish_packet
        execution_id = packet.topic[len(root):].split("/", 1)[0]
        document = json.loads(bytes(packet.payload or b""))
        subprocess.Popen([str(args.handler), *document["args"]], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait()
        client[0].publish(mqtt5.PublishPacket(
            topic=f"{root}{execution_id}/response/json", qos=QOS1,
            payload=json.dumps({"status": "SUCCEEDED"}).encode()))

    client.append(_raw_client(cfg, cfg["thing_name"], False, on_request))
    _subscribe(client[0], f"{root}+/request/json")
    disable_nagle(int(cfg["mqtt"]["port"]))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    # As rt_client: no CRT teardown at exit (it segfaulted now and then); the kernel cleans up.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
