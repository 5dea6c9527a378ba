"""Sections 4 and 5: what the agent costs while idle, and how long it takes to be ready.

Start-up: process start to the first CONNACK (the agent's ``STATUS=connected...`` on
``$NOTIFY_SOCKET``, sent from its connection's CONNACK event), the issue-12 figure, and on to
``READY=1`` (journal open, the pending list answered), against a bare awsiotsdk client's process
start to its first CONNACK (:mod:`bench.bare_client` sends ``CONNECTED=1``). Several starts
of each, alternating; the agent keeps its state directory between starts, as it does across
restarts on a device.

Idle: the last agent and bare client stay connected; after a settling pause, RSS (``VmRSS``) and
CPU time (``utime + stime``) are read before and after ``seconds`` of doing nothing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import PYTHON, Child, NotifySocket, cpu_seconds, percentile, ratio, rss_bytes
from bench.world import World

__all__ = ["run"]

THING = "bench-idle"
SETTLE = 2.0
"""Seconds after start-up before idle is measured: the first sync and its log lines are done."""


def _bare(world: World, config: Path, notify: NotifySocket) -> tuple[Child, float, float]:
    mqtt = yaml.safe_load(config.read_text())["mqtt"]
    argv = [PYTHON, "-m", "bench.bare_client", "--endpoint", mqtt["endpoint"],
            "--port", str(mqtt["port"]), "--cert", mqtt["cert"], "--key", mqtt["key"],
            "--ca", mqtt["ca"], "--client-id", f"{THING}-bare"]
    child = world.start_child("bare client", argv, config.parent / "bare.log", notify=notify.env)
    connack = notify.wait_for("CONNECTED=1", 60, child) - child.started
    return child, connack, connack


def _agent(world: World, config: Path, notify: NotifySocket) -> tuple[Child, float, float]:
    """(child, exec -> CONNACK, exec -> READY=1)."""
    child = world.start_agent(config, notify=notify)
    ready = notify.wait_for("READY=1", 60, child) - child.started
    return child, notify.wait_for("STATUS=connected", 1, child) - child.started, ready


def run(world: World, starts: int, seconds: float) -> dict[str, Any]:
    config = world.thing_config(THING, {"noop": {"command": ["/bin/true"], "timeout": "1m"}})
    agent_times: list[float] = []
    agent_ready: list[float] = []
    bare_times: list[float] = []
    agent = bare = None
    for index in range(starts):
        last = index == starts - 1
        for name, starter, times in (("agent", _agent, agent_times), ("bare", _bare, bare_times)):
            notify = NotifySocket(name)
            try:
                child, took, ready = starter(world, config, notify)
            finally:
                notify.close()
            times.append(took)
            if name == "agent":
                agent_ready.append(ready)
            if last:
                if name == "agent":
                    agent = child
                else:
                    bare = child
            else:
                world.retire(child)
    assert agent is not None and bare is not None
    time.sleep(SETTLE)
    cpu0 = {"agent": cpu_seconds(agent.pid), "bare": cpu_seconds(bare.pid)}
    time.sleep(seconds)
    agent.alive()
    bare.alive()
    cpu = {"agent": cpu_seconds(agent.pid) - cpu0["agent"],
           "bare": cpu_seconds(bare.pid) - cpu0["bare"]}
    rss = {"agent": rss_bytes(agent.pid), "bare": rss_bytes(bare.pid)}
    for child in (agent, bare):
        world.retire(child)
    agent_ms = percentile(agent_times, 0.5) * 1e3
    ready_ms = percentile(agent_ready, 0.5) * 1e3
    bare_ms = percentile(bare_times, 0.5) * 1e3
    return {
        "idle": {
            "seconds": seconds,
            "agent_rss_mb": round(rss["agent"] / 2**20, 2),
            "bare_rss_mb": round(rss["bare"] / 2**20, 2),
            "rss_ratio": ratio(rss["agent"], rss["bare"]),
            "rss_target": 1.3,
            "agent_cpu_s": round(cpu["agent"], 3),
            "bare_cpu_s": round(cpu["bare"], 3),
            "agent_cpu_s_per_min": round(cpu["agent"] * 60 / seconds, 4),
            "bare_cpu_s_per_min": round(cpu["bare"] * 60 / seconds, 4),
            "cpu_target_s_per_min": 0.05,
            "cpu_resolution_s": 0.01,
        },
        "startup": {
            "starts": starts,
            "agent_ms": [round(t * 1e3, 1) for t in agent_times],
            "agent_ready_ms": [round(t * 1e3, 1) for t in agent_ready],
            "bare_ms": [round(t * 1e3, 1) for t in bare_times],
            "agent_p50_ms": round(agent_ms, 1),
            "agent_ready_p50_ms": round(ready_ms, 1),
            "bare_p50_ms": round(bare_ms, 1),
            "ratio": ratio(agent_ms, bare_ms),
            "ready_ratio": ratio(ready_ms, bare_ms),
            "target": 1.3,
        },
    }
