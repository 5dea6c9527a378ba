"""Section 0: MQTT packets and bytes per job, counted at the broker, against the minimum.

On a metered link every packet costs. The agent runs no-op jobs queued one at a time (as a
device mostly sees them); Mosquitto's own log (``log_type all``) counts every packet it
received from and sent to the agent's client id, and an emulated link (:mod:`agent.sandbox.link`,
no delay) in front of the broker counts the bytes on the wire, TLS included. The awsiotsdk
sample loop (:mod:`bench.sample_loop`) is measured the same way beside it, and so is the
protocol's minimum in bytes: the raw Jobs device (:mod:`bench.raw_device` ``--jobs``), which
claims from notify-next and sends the final update and nothing else (it does not subscribe to
``notify``, which a device running more than one job at a time, or told of cancellations, needs).

The protocol minimum per job: the device sends 2 PUBLISH (the claim and the final update) and
must acknowledge 3 QoS 1 messages (the notification that announces the job, the two replies):
5 packets up, and 5 down (those 3 PUBLISH, 2 PUBACK). Counted from the first job queued until
the agent is idle after the last, so each job's trailing traffic (the notifications its end
causes, the sync they trigger) is in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import Child, count_packets, ratio
from bench.latency import raw_jobs_device
from bench.throughput import DOCUMENT, NOOP, start_sample
from bench.world import World

__all__ = ["MIN_PACKETS_BOTH_WAYS", "MIN_REQUESTS", "run"]

MIN_REQUESTS = 2  # PUBLISH per job: the claim and the final update
MIN_PACKETS_BOTH_WAYS = 10
SETTLE = 1.0  # seconds for start-up (or the last job's trailing) traffic to end


def _measure(world: World, thing: str, jobs: int,
             start: Callable[[World, Path], Child]) -> dict[str, Any]:
    from agent.sandbox.link import Link

    with Link(world.broker_port) as link:
        config = world.thing_config(thing, NOOP, port=link.port)
        child = start(world, config)
        try:
            time.sleep(SETTLE)
            offset = world.broker_log.stat().st_size
            link.reset_counters()
            batch = world.run_jobs(thing, jobs, DOCUMENT, window=1, watch=child)
            time.sleep(SETTLE)
            count = count_packets(world.broker_log, offset, thing)  # client id = thing name
            up, down = link.bytes_up, link.bytes_down
        finally:
            world.retire(child)

    def per_job(value: float) -> float:
        return round(value / jobs, 2)

    return {
        "jobs": jobs,
        "statuses": batch.statuses,
        "requests_per_job": per_job(count.requests()),
        "sent_per_job": {k: per_job(v) for k, v in count.sent.items()},
        "received_per_job": {k: per_job(v) for k, v in count.received.items()},
        "packets_both_ways_per_job": per_job(sum(count.sent.values())
                                             + sum(count.received.values())),
        "wire_bytes_up_per_job": per_job(up),
        "wire_bytes_down_per_job": per_job(down),
        "payload_bytes_up_per_job": per_job(count.payload_bytes_sent),
        "payload_bytes_down_per_job": per_job(count.payload_bytes_received),
    }


def run(world: World, jobs: int) -> dict[str, Any]:
    agent = _measure(world, "bench-packets-agent", jobs,
                     lambda w, config: w.ready_agent(config))
    sample = _measure(world, "bench-packets-sample", jobs, start_sample)
    raw = _measure(world, "bench-packets-raw", jobs,
                   lambda w, config: raw_jobs_device(w, config, Path("/bin/true")))
    return {
        "agent": agent,
        "sample": sample,
        "raw_device": raw,
        "bytes_up_ratio": ratio(agent["wire_bytes_up_per_job"], raw["wire_bytes_up_per_job"]),
        "bytes_down_ratio": ratio(agent["wire_bytes_down_per_job"],
                                  raw["wire_bytes_down_per_job"]),
        "minimum_requests_per_job": MIN_REQUESTS,
        "minimum_packets_both_ways_per_job": MIN_PACKETS_BOTH_WAYS,
        "ratio": ratio(agent["requests_per_job"], MIN_REQUESTS),
        "ratio_both_ways": ratio(agent["packets_both_ways_per_job"], MIN_PACKETS_BOTH_WAYS),
        "target": 1.2,
    }
