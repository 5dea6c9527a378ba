"""The table: one row per figure, with its same-run baseline, the ratio and the target.

Markdown, so that the printed table can go into the README as it is.
"""

from __future__ import annotations

from typing import Any

__all__ = ["notes", "rows", "table"]


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g} ms" if value < 100 else f"{value:.0f} ms"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _met(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "no")


def rows(sections: dict[str, Any]) -> list[dict[str, str]]:
    """Each figure as {figure, agent, baseline, ratio, target, met} strings."""
    out: list[dict[str, str]] = []

    def add(figure: str, agent: str, baseline: str, ratio: float | None, target: str,
            ok: bool | None) -> None:
        out.append({"figure": figure, "agent": agent, "baseline": baseline,
                    "ratio": _ratio(ratio), "target": target, "met": _met(ok)})

    if pk := sections.get("packets"):
        agent, sample = pk["agent"], pk["sample"]
        add(f"0. Requests per job ({agent['jobs']} no-op jobs, one at a time)",
            f"{agent['requests_per_job']:g} packets",
            f"protocol minimum {pk['minimum_requests_per_job']} PUBLISH", pk["ratio"],
            f"<= {pk['target']}", pk["ratio"] is not None and pk["ratio"] <= pk["target"])
        add("   All packets per job, both ways", f"{agent['packets_both_ways_per_job']:g}",
            f"minimum {pk['minimum_packets_both_ways_per_job']}", pk["ratio_both_ways"], "-",
            None)
        raw = pk["raw_device"]
        add("   Bytes on the wire per job (TLS), up",
            f"{agent['wire_bytes_up_per_job']:.0f} B",
            f"raw device (the minimum) {raw['wire_bytes_up_per_job']:.0f} B; sample loop "
            f"{sample['wire_bytes_up_per_job']:.0f} B", pk["bytes_up_ratio"], "report", None)
        add("   Bytes on the wire per job (TLS), down",
            f"{agent['wire_bytes_down_per_job']:.0f} B",
            f"raw device (no notify) {raw['wire_bytes_down_per_job']:.0f} B; sample loop "
            f"{sample['wire_bytes_down_per_job']:.0f} B", pk["bytes_down_ratio"], "report",
            None)
    if rt := sections.get("roundtrip"):
        add("1. Request round trip p50 (get_pending)", _ms(rt["jobs_client"]["p50_ms"]),
            f"raw publish->echo {_ms(rt['raw_echo']['p50_ms'])}", rt["ratio_p50"], "<= 1.1",
            rt["ratio_p50"] is not None and rt["ratio_p50"] <= 1.1)
        add("   Request round trip p99", _ms(rt["jobs_client"]["p99_ms"]),
            _ms(rt["raw_echo"]["p99_ms"]), rt["ratio_p99"], "-", None)
    if lat := sections.get("latency"):
        add("2. Queue -> handler running p50", _ms(lat["queue_to_handler"]["p50_ms"]),
            f"raw device: notify-next + claim + spawn {_ms(lat['floor_p50_ms'])}",
            lat["ratio_p50"], "<= 1.5",
            lat["ratio_p50"] is not None and lat["ratio_p50"] <= 1.5)
        add("   Queue -> handler running p99", _ms(lat["queue_to_handler"]["p99_ms"]),
            _ms(lat["floor_p99_ms"]), lat["ratio_p99"], "-", None)
    if link := sections.get("link"):
        for one in link["links"]:
            rtt = one["rtt_ms"]
            add(f"1.{rtt}. Round trip p50, {rtt} ms RTT link", _ms(one["jobs_client"]["p50_ms"]),
                f"raw publish->echo {_ms(one['raw_echo']['p50_ms'])}", one["rt_ratio_p50"],
                f"<= {link['rt_target']}",
                one["rt_ratio_p50"] is not None and one["rt_ratio_p50"] <= link["rt_target"])
            target = link["q2h_target_50ms"] if rtt == 50 else None
            add(f"2.{rtt}. Queue -> handler p50, {rtt} ms RTT link",
                _ms(one["queue_to_handler"]["p50_ms"]),
                f"raw device, same link {_ms(one['floor_p50_ms'])}", one["q2h_ratio_p50"],
                f"<= {target}" if target else "report",
                None if target is None or one["q2h_ratio_p50"] is None
                else one["q2h_ratio_p50"] <= target)
    if tp := sections.get("throughput"):
        add(f"3. Throughput, {tp['agent']['jobs']} no-op jobs",
            f"{tp['agent']['jobs_per_s']:.0f} jobs/s",
            f"awsiotsdk sample loop {tp['sample']['jobs_per_s']:.0f} jobs/s", tp["ratio"],
            ">= 0.8", tp["ratio"] is not None and tp["ratio"] >= 0.8)
        on = tp["iot_core_limits_on"]
        add(f"   Throughput, AWS IoT Core flow control on, {on['agent']['jobs']} jobs",
            f"{on['agent']['jobs_per_s']:.0f} jobs/s",
            f"sample loop, same {on['sample']['jobs_per_s']:.0f} jobs/s", on["ratio"],
            ">= 0.8", on["ratio"] is not None and on["ratio"] >= 0.8)
    if idle := sections.get("idle"):
        add(f"4. Idle RSS ({idle['seconds']:g} s connected)", f"{idle['agent_rss_mb']:.1f} MB",
            f"bare awsiotsdk client {idle['bare_rss_mb']:.1f} MB", idle["rss_ratio"], "<= 1.3",
            idle["rss_ratio"] is not None and idle["rss_ratio"] <= 1.3)
        add("   Idle CPU", f"{idle['agent_cpu_s_per_min']:.3f} s/min",
            f"{idle['bare_cpu_s_per_min']:.3f} s/min", None, "< 0.05 s/min",
            idle["agent_cpu_s_per_min"] < 0.05)
    if start := sections.get("startup"):
        add("5. Start-up: exec -> CONNACK (p50)", _ms(start["agent_p50_ms"]),
            f"bare client exec -> CONNACK {_ms(start['bare_p50_ms'])}", start["ratio"],
            "<= 1.3", start["ratio"] is not None and start["ratio"] <= 1.3)
        add("   Start-up: exec -> READY=1 (p50)", _ms(start["agent_ready_p50_ms"]),
            _ms(start["bare_p50_ms"]), start["ready_ratio"], "report", None)
    if flat := sections.get("flatness"):
        first, last = flat["stages"]
        add(f"6. RSS growth, {first['jobs']} -> {last['jobs']} jobs",
            f"{flat['rss_growth_mb']:+.2f} MB", f"{first['rss_mb']:.1f} MB at {first['jobs']}",
            None, "< 5 MB", flat["rss_growth_mb"] < flat["rss_growth_target_mb"])
        add(f"   Journal after {last['jobs']} jobs",
            f"{last['executions']} rows, {last['journal_db_kb']:.0f} KB "
            f"+ {last['journal_wal_kb'] / 1024:.1f} MB WAL",
            f"max_records {flat['max_records']}", None, "bounded by max_records",
            flat["journal_bounded"])
    if cmd := sections.get("commands"):
        add("7. Command -> handler running p50",
            _ms(cmd["command_to_handler"]["p50_ms"]),
            f"raw device: delivery + spawn {_ms(cmd['floor_to_handler']['p50_ms'])}",
            cmd["ratio_handler_p50"], "<= 1.5",
            cmd["ratio_handler_p50"] is not None and cmd["ratio_handler_p50"] <= 1.5)
        add("   Command -> handler running p99", _ms(cmd["command_to_handler"]["p99_ms"]),
            _ms(cmd["floor_to_handler"]["p99_ms"]), cmd["ratio_handler_p99"], "-", None)
        add("8. Command -> result visible p50",
            _ms(cmd["command_to_result"]["p50_ms"]),
            f"raw device: + bare update {_ms(cmd['floor_to_result']['p50_ms'])}",
            cmd["ratio_result_p50"], "<= 1.5",
            cmd["ratio_result_p50"] is not None and cmd["ratio_result_p50"] <= 1.5)
        add("   Command -> result visible p99", _ms(cmd["command_to_result"]["p99_ms"]),
            _ms(cmd["floor_to_result"]["p99_ms"]), cmd["ratio_result_p99"], "-", None)
    return out


def table(sections: dict[str, Any]) -> str:
    header = ["Figure", "Agent", "Same-run baseline", "Ratio", "Target", "Met"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows(sections):
        lines.append("| " + " | ".join(row[k] for k in ("figure", "agent", "baseline", "ratio",
                                                         "target", "met")) + " |")
    return "\n".join(lines)


def notes(sections: dict[str, Any]) -> list[str]:
    """The side measurements that say what bounds each figure."""
    out = []
    if pk := sections.get("packets"):
        agent, sample = pk["agent"], pk["sample"]
        out.append(
            f"packets: the agent sent per job {agent['sent_per_job']} and received "
            f"{agent['received_per_job']}; the awsiotsdk sample loop sent "
            f"{sample['sent_per_job']} ({sample['requests_per_job']:g} requests per job) and "
            f"received {sample['received_per_job']}; PUBLISH payloads per job, agent up/down "
            f"{agent['payload_bytes_up_per_job']:.0f}/{agent['payload_bytes_down_per_job']:.0f}"
            f" B, raw device {pk['raw_device']['payload_bytes_up_per_job']:.0f}/"
            f"{pk['raw_device']['payload_bytes_down_per_job']:.0f} B, received by the raw "
            f"device {pk['raw_device']['received_per_job']}")
    if rt := sections.get("roundtrip"):
        ops = rt["broker_ops_per_request"]["jobs_client"]
        out.append(
            f"round trip: awscrt request-response client alone "
            f"{_ms(rt['rr_client']['p50_ms'])}; raw request to the emulator "
            f"{_ms(rt['raw_emulator']['p50_ms'])}; broker operations per request: ours "
            f"{ops.get('subscribe', 0):g} SUBSCRIBE + {ops.get('unsubscribe', 0):g} UNSUBSCRIBE"
            f" + {ops.get('publish', 0):g} PUBLISH, raw 1 PUBLISH; with Nagle left on (awscrt's"
            f" default socket) the raw floor is {_ms(rt['raw_echo_nagle']['p50_ms'])}; with the"
            f" SDK's AWS IoT Core flow control, back to back, ours is "
            f"{_ms(rt['jobs_client_iot_core_limits']['p50_ms'])}")
    if lat := sections.get("latency"):
        out.append(f"queue -> handler: spawning the handler alone takes "
                   f"{_ms(lat['spawn']['p50_ms'])} (p50); issue 5's computed floor (raw round "
                   f"trip + spawn) {_ms(lat['computed_floor_p50_ms'])}; raw device p99 "
                   f"{_ms(lat['raw_device']['p99_ms'])}")
    if link := sections.get("link"):
        for one in link["links"]:
            out.append(f"{one['rtt_ms']} ms RTT link: round trip p99 ours "
                       f"{_ms(one['jobs_client']['p99_ms'])}, raw "
                       f"{_ms(one['raw_echo']['p99_ms'])}; queue -> handler p99 "
                       f"{_ms(one['queue_to_handler']['p99_ms'])}, raw device "
                       f"{_ms(one['raw_device']['p99_ms'])}; computed floor (1.5 raw round "
                       f"trips + spawn) {_ms(one['computed_floor_p50_ms'])}")
    if cmd := sections.get("commands"):
        out.append(f"commands: boto3's start_command_execution (HTTP to the sandbox, not in "
                   f"the figures) adds {_ms(cmd['start_call']['p50_ms'])} (p50) for a user's "
                   f"script")
    if tp := sections.get("throughput"):
        agent, sample = tp["agent"], tp["sample"]
        shipped = tp["iot_core_limits_on"]
        out.append(
            f"throughput: requests per job: agent {agent['requests_per_job']}, sample "
            f"{sample['requests_per_job']}; CPU per job: agent {agent['cpu_ms_per_job']} ms, "
            f"sample {sample['cpu_ms_per_job']} ms; journal: {tp['journal_commits_per_job']} "
            f"commits per job at {tp['journal_commit_ms']} ms each (fsync, WAL, "
            f"synchronous=FULL); with AWS IoT Core flow control on: agent "
            f"{shipped['agent']['jobs_per_s']} jobs/s, sample {shipped['sample']['jobs_per_s']}"
            f" jobs/s (ratio {_ratio(shipped['ratio'])})")
    return out
