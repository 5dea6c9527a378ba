"""The floor of the Commands figures, and with ``--jobs`` of the Jobs queue -> handler figures,
as its own process: ``python -m bench.raw_device ...``.

The least a device can do with a command: a raw awscrt MQTT 5 client, built like the agent's
(the same builder, TCP_NODELAY, no client-side flow control), subscribed to the thing's JSON
request topic. From the CRT callback itself it spawns the handler named by the payload
(``subprocess.Popen``, the way the bench's spawn floor does), waits for it, and publishes a bare
``{"status": "SUCCEEDED"}``: one MQTT delivery, the spawn, one update. No journal, no parsing
beyond ``json.loads``, no checks, no asyncio. Prints ``ready`` once subscribed; SIGTERM stops it.

``--jobs``: the least a Jobs device can do (issue 12's floor, measured the same way as the
agent): subscribed to ``notify-next`` and its update replies; on a QUEUED execution it publishes
the claim (``IN_PROGRESS`` with ``expectedVersion``) from the CRT callback, and once the claim is
accepted it spawns the handler its document names, waits for it, and publishes ``SUCCEEDED``:
the notification's one way, one claim round trip, the spawn. No journal, no describe, no sync.
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
from typing import Any

import yaml
from awscrt import mqtt5

from agent.connection import disable_nagle
from bench.rt_client import QOS1, _raw_client, _subscribe

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.raw_device")
    parser.add_argument("--config", type=Path, required=True, help="the thing's agent config")
    parser.add_argument("--handler", type=Path, required=True, help="the program to spawn")
    parser.add_argument("--jobs", action="store_true", help="be a Jobs device instead")
    args = parser.parse_args(argv)
    cfg = yaml.safe_load(args.config.read_text())
    if args.jobs:
        return _jobs(cfg, args.handler)
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
    return _serve(client[0], cfg, [f"{root}+/request/json"])


def _serve(client: mqtt5.Client, cfg: dict[str, Any], filters: list[str]) -> int:
    """Subscribe, say ``ready``, and serve from the CRT's callbacks until SIGTERM."""
    for topic_filter in filters:
        _subscribe(client, topic_filter)
    disable_nagle(int(cfg["mqtt"]["port"]))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    # As rt_client: no CRT teardown at exit (it segfaulted now and then); the kernel cleans up.
    sys.stdout.flush()
    os._exit(0)


def _jobs(cfg: dict[str, Any], handler: Path) -> int:
    prefix = f"$aws/things/{cfg['thing_name']}/jobs/"
    client: list[mqtt5.Client] = []
    claimed: dict[str, dict[str, Any]] = {}  # jobId -> its notify-next execution

    def update(job_id: str, body: dict[str, Any]) -> None:
        client[0].publish(mqtt5.PublishPacket(topic=f"{prefix}{job_id}/update", qos=QOS1,
                                              payload=json.dumps(body).encode()))

    def on_publish(data: mqtt5.PublishReceivedData) -> None:
        packet = data.publish_packet
        body = json.loads(bytes(packet.payload or b"{}"))
        if packet.topic == prefix + "notify-next":
            execution = body.get("execution")
            if execution and execution["status"] == "QUEUED" and \
                    execution["jobId"] not in claimed:
                claimed[execution["jobId"]] = execution
                update(execution["jobId"], {"status": "IN_PROGRESS",
                                            "expectedVersion": execution["versionNumber"],
                                            "clientToken": "claim"})
        elif packet.topic.endswith("/update/accepted") and body.get("clientToken") == "claim":
            job_id = packet.topic[len(prefix):].split("/", 1)[0]
            execution = claimed[job_id]
            subprocess.Popen([str(handler), *execution["jobDocument"].get("args", [])],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL).wait()
            update(job_id, {"status": "SUCCEEDED", "clientToken": "done"})

    client.append(_raw_client(cfg, cfg["thing_name"], False, on_publish))
    return _serve(client[0], cfg, [prefix + "notify-next", prefix + "+/update/accepted"])


if __name__ == "__main__":
    sys.exit(main())
