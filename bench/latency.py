"""Section 2: from the emulator queuing a job to the handler process running.

The handler's first action writes bash's ``$EPOCHREALTIME`` (CLOCK_REALTIME, shared by every
process on the machine) to a file; the job's clock starts with ``time.time()`` just before the
emulator is asked to queue it. Jobs go one at a time to an idle agent, so each sample is the
whole path: the notify-next, the claim's journal commit, the claim (update), the commit of
"running", spawn.

The floor is measured the same way (issue 12): a raw device (:mod:`bench.raw_device` ``--jobs``)
on its own thing, a bare awscrt client that claims from notify-next and spawns the same handler
with ``subprocess.Popen`` once the claim is accepted: the notification's one way, one claim
round trip, the spawn. Beside it, the computed floor of issue 5 (one raw round trip, section
1's, plus the spawn alone).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import PYTHON, Child, percentile, ratio, summary
from bench.world import World

__all__ = ["queue_to_handler", "raw_jobs_device", "run", "spawn_floor", "stamp_handler"]

THING = "bench-latency"
STAMP = 'printf "%s\\n" "$EPOCHREALTIME" > "$1"\n'
"""bash's clock builtin: no ``date`` process between the spawn and the stamp."""


def _read_stamp(path: Path, timeout: float = 30.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = ""
        if text.endswith("\n"):
            return float(text)
        time.sleep(0.0005)
    raise TimeoutError(f"handler never wrote {path}")


def spawn_floor(handler: Path, directory: Path, samples: int) -> list[float]:
    """Seconds from ``Popen`` to the handler's first instruction, ``samples`` times."""
    out = []
    for index in range(samples):
        stamp = directory / f"spawn-{index}"
        start = time.time()
        process = subprocess.Popen([str(handler), str(stamp)], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        process.wait()
        out.append(_read_stamp(stamp) - start)
    return out


def stamp_handler(world: World) -> tuple[Path, dict[str, Any], Path]:
    """The stamping handler, its ``handlers:`` entry, and the directory for the stamps."""
    handler = world.handler("stamp.sh", STAMP, shebang="#!/bin/bash")
    stamps = world.dir / "stamps"
    stamps.mkdir(exist_ok=True)
    return handler, {"stamp": {"command": [str(handler)], "timeout": "1m"}}, stamps


def raw_jobs_device(world: World, config: Path, handler: Path | None = None) -> Child:
    """The floor's device (:mod:`bench.raw_device` ``--jobs``), started and subscribed; it runs
    ``handler`` (default: :func:`stamp_handler`'s) with the document's ``args``."""
    handler = handler or world.dir / "handlers" / "stamp.sh"
    child = world.start_child("raw-jobs-device", [
        PYTHON, "-m", "bench.raw_device", "--jobs", "--config", str(config), "--handler",
        str(handler)], config.parent / "raw-jobs-device.log", stdout_pipe=True)
    assert child.process.stdout is not None
    if child.process.stdout.readline().strip() != b"ready":
        raise RuntimeError(f"the raw Jobs device did not start:\n{child.tail()}")
    return child


def queue_to_handler(world: World, thing: str, config: Path, samples: int,
                     idle: float = 0.05,
                     start: Callable[[World, Path], Child] | None = None) -> list[float]:
    """Seconds from queuing a job to its handler running, ``samples`` jobs one at a time.

    ``idle``: the pause after each job, so that whatever its end causes is over before the
    next job is queued. ``start``: the device (default: the agent, once ready).
    """
    stamps = world.dir / "stamps"
    agent = (start or (lambda w, c: w.ready_agent(c)))(world, config)
    latencies = []
    for index in range(samples + 2):
        stamp = stamps / f"{thing}-job-{index}"
        job = f"{thing}-{index}"
        queued = time.time()
        world.emulator.create_job(job, [thing], {"operation": "stamp", "args": [str(stamp)]})
        ran = _read_stamp(stamp)
        while world.emulator.execution(job, thing)["status"] != "SUCCEEDED":
            agent.alive()
            time.sleep(0.002)
        time.sleep(idle)
        if index >= 2:  # the first jobs warm the agent's code paths up
            latencies.append(ran - queued)
    world.retire(agent)
    return latencies


def run(world: World, samples: int, floor_rt: dict[str, Any] | None) -> dict[str, Any]:
    handler, handlers, stamps = stamp_handler(world)
    config = world.thing_config(THING, handlers)
    floor_config = world.thing_config(THING + "-floor", handlers)
    spawn = spawn_floor(handler, stamps, samples)
    latencies = queue_to_handler(world, THING, config, samples)
    raw = queue_to_handler(world, THING + "-floor", floor_config, samples,
                           start=raw_jobs_device)
    ours, spawn_s, raw_s = summary(latencies), summary(spawn), summary(raw)
    rt = floor_rt or {"p50_ms": None, "p99_ms": None}
    computed_p50 = rt["p50_ms"] + spawn_s["p50_ms"] if rt["p50_ms"] is not None else None
    return {
        "queue_to_handler": ours,
        "spawn": spawn_s,
        "raw_device": raw_s,
        "floor_p50_ms": raw_s["p50_ms"],
        "floor_p99_ms": raw_s["p99_ms"],
        "computed_floor_p50_ms": round(computed_p50, 4) if computed_p50 is not None else None,
        "ratio_p50": ratio(ours["p50_ms"], raw_s["p50_ms"]),
        "ratio_p99": ratio(ours["p99_ms"], raw_s["p99_ms"]),
        "target_p50": 1.5,
        "samples": len(latencies),
        "spawn_p50_share_of_ours": round(percentile(spawn, 0.5) / percentile(latencies, 0.5), 3),
    }
