"""Section 1: a Jobs request's round trip through our client, against the broker's own floor.

The figure is ``JobsClient.get_pending_job_executions`` back to back; the floor is a raw awscrt
publish -> echo -> reply on the same broker (see :mod:`bench.rt_client`). Each runs in its own
process, in alternating rounds so that a load spike from a neighbour hits both sides alike.

Side measurements explain the ratio: the raw client against the emulator's ``get`` (the
service's own time), awscrt's request-response client alone (the CRT's share), the MQTT
operations each request costs at the broker (counted in Mosquitto's log), and two "as awscrt
ships" variants: the raw floor with Nagle's algorithm left on, and our client with the SDK's AWS
IoT Core flow control on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import PYTHON, count_packets, ratio, run_json, summary
from bench.world import World

__all__ = ["run"]

THING = "bench-rt"
WARMUP = 20


def client_run(world: World, config: Path, mode: str, calls: int,
            *flags: str) -> tuple[list[float], dict[str, float]]:
    """One child run: latencies after the warm-up, and broker operations per request."""
    log = world.broker_log
    argv = [PYTHON, "-m", "bench.rt_client", "--config", str(config), "--mode", mode,
            "--calls", str(calls + WARMUP), *flags]
    # awscrt's own request-response client (the side figure's subject, not our code) died of
    # SIGSEGV in about 1 run in 10 of this section: one more try keeps the run's figures.
    for attempt in range(2 if mode == "rr-client" else 1):
        offset = log.stat().st_size
        try:
            out = run_json(argv, timeout=60 + calls * 0.2)
            break
        except RuntimeError:
            if attempt or mode != "rr-client":
                raise
    # Only the requester's own operations: the echo responder's reply is the floor's "service".
    count = count_packets(log, offset, out["client_ids"][0])
    per_request = {k.lower(): round(count.sent.get(k, 0) / (calls + WARMUP), 2)
                   for k in ("PUBLISH", "SUBSCRIBE", "UNSUBSCRIBE") if count.sent.get(k)}
    return out["latencies"][WARMUP:], per_request


def run(world: World, calls: int, rounds: int, extra_calls: int) -> dict[str, Any]:
    config = world.thing_config(THING, {"noop": {"command": ["/bin/true"], "timeout": "1m"}})
    per_round = max(1, calls // rounds)
    ours: list[float] = []
    floor: list[float] = []
    ops: dict[str, dict[str, float]] = {}
    for _ in range(rounds):
        latencies, ops["raw_echo"] = client_run(world, config, "raw-echo", per_round)
        floor += latencies
        latencies, ops["jobs_client"] = client_run(world, config, "jobs-client", per_round)
        ours += latencies
    service, ops["raw_emulator"] = client_run(world, config, "raw-emulator", per_round)
    crt, ops["rr_client"] = client_run(world, config, "rr-client", per_round)
    nagle, _ = client_run(world, config, "raw-echo", extra_calls, "--nagle")
    shipped, ops["jobs_client_iot_core_limits"] = client_run(world, config, "jobs-client",
                                                          extra_calls, "--limits")
    ours_s, floor_s = summary(ours), summary(floor)
    return {
        "jobs_client": ours_s,
        "raw_echo": floor_s,
        "ratio_p50": ratio(ours_s["p50_ms"], floor_s["p50_ms"]),
        "ratio_p99": ratio(ours_s["p99_ms"], floor_s["p99_ms"]),
        "target_p50": 1.1,
        "raw_emulator": summary(service),
        "rr_client": summary(crt),
        "raw_echo_nagle": summary(nagle),
        "jobs_client_iot_core_limits": summary(shipped),
        "broker_ops_per_request": ops,
        "calls": len(ours),
        "rounds": rounds,
    }
