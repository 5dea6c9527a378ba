"""Section 7: AWS IoT Commands, from the service starting an execution to the handler running,
and to the result being visible to ``get_command_execution``.

The clock starts just before the emulator's StartCommandExecution (the service's own call,
which publishes the MQTT 5 request at once, as section 2 starts at the emulator's CreateJob).
The handler stamps bash's ``$EPOCHREALTIME`` on its first instruction; the result counts as
visible when the execution the control plane serves (what boto3's ``get_command_execution``
returns, read on the emulator's thread without HTTP's milliseconds of noise) has ended. One
boto3 call per sample then checks it, untimed.

The floor is the same path with the least a device can do (:mod:`bench.raw_device`): one MQTT
delivery, the spawn of the very same handler, and (for the second figure) one bare update.
Agent and floor each have their own thing, both connected throughout, and samples alternate
between them, so a neighbour's load spike hits both alike. The boto3 HTTP call a user's script
adds on top (``start_command_execution`` itself) is measured on the side.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from bench.common import PYTHON, Child, ratio, summary
from bench.world import World

__all__ = ["run"]

AGENT_THING, FLOOR_THING = "bench-cmd-agent", "bench-cmd-floor"
STAMP = 'printf "%s\\n" "$EPOCHREALTIME" >> "$1"\n'
WARMUP = 2
ENDED = frozenset({"SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT"})


def _clients(world: World) -> tuple[Any, Any]:
    stack = world.stack
    common = {"region_name": stack.region, "aws_access_key_id": "bench",
              "aws_secret_access_key": "bench",
              "config": Config(retries={"total_max_attempts": 1}, proxies={})}
    return (boto3.client("iot", endpoint_url=stack.control_endpoint, **common),
            boto3.client("iot-jobs-data", endpoint_url=stack.data_endpoint, **common))


def _stamps(path: Path, count: int, timeout: float = 30.0) -> float:
    """The ``count``-th stamp the handler appended (waiting for it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        if len(lines) >= count:
            return float(lines[count - 1])
        time.sleep(0.0005)
    raise TimeoutError(f"the handler never stamped {path} a {count}th time")


def _wait_log(child: Child, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in child.log.read_text(errors="replace"):
        child.alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{child.name} never logged {text!r}:\n{child.tail()}")
        time.sleep(0.02)


def _floor_device(world: World, handler: Path) -> Child:
    config = world.thing_config(FLOOR_THING, {})
    child = world.start_child("raw-device", [PYTHON, "-m", "bench.raw_device", "--config",
                                             str(config), "--handler", str(handler)],
                              config.parent / "raw-device.log", stdout_pipe=True)
    assert child.process.stdout is not None
    if child.process.stdout.readline().strip() != b"ready":
        raise RuntimeError(f"the raw device did not start:\n{child.tail()}")
    return child


def run(world: World, samples: int) -> dict[str, Any]:
    handler = world.handler("command-stamp.sh", STAMP, shebang="#!/bin/bash")
    stamps = world.dir / "command-stamps"
    stamps.mkdir(exist_ok=True)
    files = {AGENT_THING: stamps / "agent", FLOOR_THING: stamps / "floor"}
    iot, data = _clients(world)
    config = world.thing_config(AGENT_THING, {"stamp": {"command": [str(handler)],
                                                        "timeout": "1m"}},
                                commands={"enabled": True})
    agent = world.ready_agent(config)
    _wait_log(agent, "commands subscribed")
    floor = _floor_device(world, handler)
    targets, commands = {}, {}
    for thing in (AGENT_THING, FLOOR_THING):
        targets[thing] = iot.describe_thing(thingName=thing)["thingArn"]
        content = json.dumps({"operation": "stamp", "args": [str(files[thing])]}).encode()
        commands[thing] = iot.create_command(
            commandId=f"stamp-{thing}",
            payload={"content": content, "contentType": "application/json"})["commandArn"]
    running: dict[str, list[float]] = {AGENT_THING: [], FLOOR_THING: []}
    visible: dict[str, list[float]] = {AGENT_THING: [], FLOOR_THING: []}
    emulator = world.emulator
    for index in range(samples + WARMUP):
        for thing in (AGENT_THING, FLOOR_THING):
            command_id = commands[thing].rsplit("/", 1)[1]
            began = time.time()
            execution_id, _ = emulator.call_commands(
                lambda s, c=command_id, t=thing: s.start_execution(c, t, timeout=60))
            ran = _stamps(files[thing], index + 1)
            while emulator.call_commands(lambda s, e=execution_id, t=thing: s.get_execution(
                    e, t, include_result=False))["status"] not in ENDED:
                time.sleep(0.0002)
            done = time.time()
            status = iot.get_command_execution(executionId=execution_id,
                                               targetArn=targets[thing])["status"]
            if status != "SUCCEEDED":
                raise RuntimeError(f"command on {thing} ended {status}:\n{agent.tail()}")
            agent.alive()
            floor.alive()
            if index >= WARMUP:  # the first commands warm every code path up
                running[thing].append(ran - began)
                visible[thing].append(done - began)
            time.sleep(0.02)  # both devices idle again
    start_call = []
    for index in range(min(samples, 20) + WARMUP):  # what boto3's HTTP call adds for a user
        began = time.time()
        data.start_command_execution(targetArn=targets[FLOOR_THING],
                                     commandArn=commands[FLOOR_THING],
                                     executionTimeoutSeconds=60)
        if index >= WARMUP:
            start_call.append(time.time() - began)
        time.sleep(0.02)
    world.retire(agent)
    world.retire(floor)
    ours_run, floor_run = summary(running[AGENT_THING]), summary(running[FLOOR_THING])
    ours_seen, floor_seen = summary(visible[AGENT_THING]), summary(visible[FLOOR_THING])
    return {
        "command_to_handler": ours_run,
        "floor_to_handler": floor_run,
        "ratio_handler_p50": ratio(ours_run["p50_ms"], floor_run["p50_ms"]),
        "ratio_handler_p99": ratio(ours_run["p99_ms"], floor_run["p99_ms"]),
        "command_to_result": ours_seen,
        "floor_to_result": floor_seen,
        "ratio_result_p50": ratio(ours_seen["p50_ms"], floor_seen["p50_ms"]),
        "ratio_result_p99": ratio(ours_seen["p99_ms"], floor_seen["p99_ms"]),
        "start_call": summary(start_call),
        "target_p50": 1.5,
        "samples": len(running[AGENT_THING]),
    }
