"""Section 7: round trip and queue -> handler behind an emulated link (what a device feels).

Loopback hides what a cellular or satellite device pays: every round trip. Here the agent (and
every baseline's device side) reaches the broker through :class:`agent.sandbox.link.Link`, a
TCP proxy that delays each byte ``one_way`` seconds each way; the emulator and the echo
responder (the service side) stay on the broker. For each link:

* round trip: ``JobsClient.get_pending_job_executions`` against the raw floor, a raw awscrt
  publish -> echo -> reply through the same link (:mod:`bench.rt_client` ``raw-echo
  --responder-port``);
* queue -> handler: as section 2, against its floor measured the same way through the same
  link: the raw Jobs device (:mod:`bench.raw_device` ``--jobs``: notify-next, the claim's round
  trip, ``subprocess.Popen``). Beside it the computed floor: 1.5 raw round trips + the spawn.
"""

from __future__ import annotations

from typing import Any

from bench.common import ratio, summary
from bench.latency import queue_to_handler, raw_jobs_device, spawn_floor, stamp_handler
from bench.roundtrip import client_run
from bench.world import World

__all__ = ["run"]


def _one(world: World, one_way: float, samples: int, rt_calls: int,
         spawn_p50_ms: float) -> dict[str, Any]:
    from agent.sandbox.link import Link

    ms = round(one_way * 2e3)
    thing = f"bench-link-{ms}"
    _, handlers, _ = stamp_handler(world)
    with Link(world.broker_port, delay=one_way) as link:
        config = world.thing_config(thing, handlers, port=link.port)
        raw, _ = client_run(world, config, "raw-echo", rt_calls, "--responder-port",
                            str(world.broker_port))
        ours, _ = client_run(world, config, "jobs-client", rt_calls)
        latencies = queue_to_handler(world, thing, config, samples, idle=4 * one_way + 0.05)
    with Link(world.broker_port, delay=one_way) as link:
        floor_config = world.thing_config(thing + "-floor", handlers, port=link.port)
        floor_q2h = queue_to_handler(world, thing + "-floor", floor_config, samples,
                                     idle=4 * one_way + 0.05, start=raw_jobs_device)
    raw_s, ours_s, q2h, floor_s = summary(raw), summary(ours), summary(latencies), \
        summary(floor_q2h)
    computed = 1.5 * raw_s["p50_ms"] + spawn_p50_ms
    return {
        "rtt_ms": ms,
        "one_way_ms": one_way * 1e3,
        "raw_echo": raw_s,
        "jobs_client": ours_s,
        "rt_ratio_p50": ratio(ours_s["p50_ms"], raw_s["p50_ms"]),
        "queue_to_handler": q2h,
        "raw_device": floor_s,
        "floor_p50_ms": floor_s["p50_ms"],
        "computed_floor_p50_ms": round(computed, 3),
        "q2h_ratio_p50": ratio(q2h["p50_ms"], floor_s["p50_ms"]),
    }


def run(world: World, samples: int, rt_calls: int, one_ways: tuple[float, ...]
        ) -> dict[str, Any]:
    handler, _, stamps = stamp_handler(world)
    spawn = summary(spawn_floor(handler, stamps, max(samples, 5)))
    links = [_one(world, one_way, samples, rt_calls, spawn["p50_ms"]) for one_way in one_ways]
    return {"spawn": spawn, "links": links, "rt_target": 1.1, "q2h_target_50ms": 1.3}
