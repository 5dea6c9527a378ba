"""``iot-jobs-agent sandbox``: the whole local cloud, one command, no AWS account.

Starts certificates + mutual-TLS Mosquitto + the Jobs emulator, registers a sandbox thing, writes
``DIR/agent.yaml`` (usable with every ``--config`` command) and ``DIR/sandbox.json`` (for scripts),
queues a demo job and shows the device's view of it through the real Jobs client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from agent.config import load_config
from agent.connection import Connection
from agent.jobs import JobsClient
from agent.sandbox.stack import Stack

__all__ = ["DEFAULT_SANDBOX_DIR", "SANDBOX_THING", "run_sandbox"]

log = logging.getLogger("agent.sandbox")

DEFAULT_SANDBOX_DIR = Path(".sandbox")
SANDBOX_THING = "sandbox-thing"
DEMO_DOCUMENT = {"operation": "run-script", "args": ["echo", "hello from the sandbox"]}


def _say(message: str) -> None:
    print(message, flush=True)


async def _device_view(config_path: Path) -> dict[str, Any]:
    config = load_config(config_path)
    connection = Connection(config.mqtt, config.client_id)
    jobs = JobsClient(connection, request_timeout=config.mqtt.request_timeout)
    async with connection:
        return await jobs.get_pending_job_executions(thingName=config.thing_name)


def run_sandbox(directory: Path, *, once: bool) -> int:
    directory = directory.resolve()
    if (directory / "things").exists():
        # A previous run's emulator state is gone with its process; stale configs would lie.
        shutil.rmtree(directory / "things")
    with Stack(directory) as stack:
        assert stack.broker is not None and stack.emulator is not None and stack.pki is not None
        thing_config = stack.thing(SANDBOX_THING)
        agent_yaml = directory / "agent.yaml"
        agent_yaml.write_text(thing_config.read_text())
        info = {
            "thing_name": SANDBOX_THING,
            "mqtt": {"endpoint": stack.broker.host, "port": stack.broker.port,
                     "cert": str(stack.pki.client(SANDBOX_THING).cert),
                     "key": str(stack.pki.client(SANDBOX_THING).key),
                     "ca": str(stack.pki.ca_cert)},
        }
        (directory / "sandbox.json").write_text(json.dumps(info, indent=2) + "\n")
        _say(f"sandbox: mosquitto (mutual TLS) on {stack.broker.host}:{stack.broker.port}, "
             "Jobs emulator connected")
        _say(f"sandbox: thing '{SANDBOX_THING}', agent config {agent_yaml}")
        job_id = "demo-1"
        stack.emulator.create_job(job_id, [SANDBOX_THING], DEMO_DOCUMENT)
        _say(f"sandbox: queued job {job_id} {json.dumps(DEMO_DOCUMENT)}")
        view = asyncio.run(_device_view(agent_yaml))
        _say("sandbox: the device's pending jobs (iot-jobs-agent pending):")
        _say(json.dumps(view, indent=2))
        ok = [s["jobId"] for s in view["queuedJobs"]] == [job_id]
        if once:
            _say("sandbox: OK" if ok else "sandbox: FAILED: the demo job is not pending")
            return 0 if ok else 1
        _say(f"sandbox: running; try `iot-jobs-agent pending --config {agent_yaml}`. "
             "Ctrl-C stops it.")
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        _say("sandbox: stopping")
    sys.stdout.flush()
    return 0
