"""One request round-trip client, run as its own process: ``python -m bench.rt_client ...``.

Its own process, so that it never shares a GIL with the emulator that answers it (the bench
process hosts the emulator). Modes:

``raw-echo``
    The floor: a raw awscrt MQTT5 requester publishes a token (QoS 1) and waits for a trivial
    responder, a second raw client in this process that echoes each request from its CRT
    callback, to send it back. Both keep their subscriptions for the whole run. With
    ``--responder-port`` the responder connects to the broker directly while the requester's
    config points at an emulated link: the floor of a device behind that link.
``raw-emulator``
    The same raw requester against the Jobs emulator's ``get`` (a standing ``get/+``
    subscription, replies matched by clientToken): the service's own time, without our client.
``rr-client``
    awscrt's request-response client (what ``JobsClient`` and awsiot's ``IotJobsClientV2`` are
    built on) making the same ``get`` request, blocking on its future: the CRT's share of our
    client's time, without asyncio or our parsing.
``jobs-client``
    ``agent.jobs.JobsClient.get_pending_job_executions``, exactly as the agent calls it.

The raw clients are built like the agent's (the awsiotsdk builder, explicit port, the same
``iot_core_limits`` and TCP_NODELAY), unless ``--nagle`` keeps awscrt's default socket. Prints one
JSON object: ``{"latencies": [seconds, ...], "client_ids": [...]}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import yaml
from awscrt import mqtt5
from awscrt import mqtt_request_response as rr
from awsiot import mqtt5_client_builder

from agent.connection import disable_nagle

__all__ = ["main"]

QOS1 = mqtt5.QoS.AT_LEAST_ONCE


class _Inbox:
    """Replies as the requester's CRT thread delivers them; the main thread waits on a key."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._payloads: list[bytes] = []

    def on_publish(self, data: mqtt5.PublishReceivedData) -> None:
        with self._cond:
            self._payloads.append(bytes(data.publish_packet.payload or b""))
            self._cond.notify()

    def wait(self, key: bytes, timeout: float) -> None:
        def arrived() -> bool:
            for index, payload in enumerate(self._payloads):
                if key in payload:
                    del self._payloads[: index + 1]
                    return True
            return False

        with self._cond:
            if not self._cond.wait_for(arrived, timeout):
                raise TimeoutError(f"no reply for {key!r} within {timeout:g}s")


def _raw_client(cfg: dict[str, Any], client_id: str, limits: bool,
                on_publish: Any, port: int | None = None) -> mqtt5.Client:
    """A connected raw client, built with the options the agent's Connection uses."""
    connected = threading.Event()
    mqtt = cfg["mqtt"]
    kwargs: dict[str, Any] = {
        "endpoint": mqtt["endpoint"], "port": port or mqtt["port"], "cert_filepath": mqtt["cert"],
        "pri_key_filepath": mqtt["key"], "ca_filepath": mqtt["ca"], "client_id": client_id,
        "enable_metrics_collection": False,
        "on_lifecycle_connection_success": lambda _: connected.set(),
    }
    if on_publish is not None:
        kwargs["on_publish_received"] = on_publish
    if not limits:
        kwargs["extended_validation_and_flow_control_options"] = \
            mqtt5.ExtendedValidationAndFlowControlOptions.NONE
    client = mqtt5_client_builder.mtls_from_path(**kwargs)
    client.start()
    if not connected.wait(30):
        raise TimeoutError(f"{client_id} did not connect")
    return client


def _subscribe(client: mqtt5.Client, topic_filter: str) -> None:
    client.subscribe(mqtt5.SubscribePacket([mqtt5.Subscription(topic_filter, QOS1)])).result(10)


def raw(cfg: dict[str, Any], mode: str, calls: int, limits: bool,
        nagle: bool, responder_port: int | None = None) -> tuple[list[float], list[str]]:
    thing = cfg["thing_name"]
    prefix = f"$aws/things/{thing}/jobs"
    inbox = _Inbox()
    ids = [f"{thing}-req"]
    if mode == "raw-echo":
        # Topics ending in /accepted: the emulator, subscribed to every thing's jobs/#, ignores
        # them as its own replies instead of answering with InvalidTopic.
        request, reply = f"{prefix}/echo-req/accepted", f"{prefix}/echo-rsp/accepted"
        responder: list[mqtt5.Client] = []

        def echo(data: mqtt5.PublishReceivedData) -> None:
            responder[0].publish(mqtt5.PublishPacket(
                topic=reply, payload=data.publish_packet.payload, qos=QOS1))

        # The responder plays the service: on the broker's side of an emulated link.
        responder.append(_raw_client(cfg, f"{thing}-echo", limits, echo, responder_port))
        ids.append(f"{thing}-echo")
        _subscribe(responder[0], request)
        reply_filter = reply
    else:
        request, reply_filter = f"{prefix}/get", f"{prefix}/get/+"
    requester = _raw_client(cfg, ids[0], limits, inbox.on_publish)
    _subscribe(requester, reply_filter)
    if not nagle:
        disable_nagle(int(cfg["mqtt"]["port"]))
        if responder_port:
            disable_nagle(responder_port)
    latencies = []
    for _ in range(calls):
        token = str(uuid.uuid4())
        payload = json.dumps({"clientToken": token}).encode()
        start = time.perf_counter()
        requester.publish(mqtt5.PublishPacket(topic=request, payload=payload, qos=QOS1))
        inbox.wait(token.encode(), 30)
        latencies.append(time.perf_counter() - start)
    return latencies, ids


def rr_client(cfg: dict[str, Any], calls: int, limits: bool) -> tuple[list[float], list[str]]:
    thing = cfg["thing_name"]
    topic = f"$aws/things/{thing}/jobs/get"
    client_id = f"{thing}-rr"
    mqtt = _raw_client(cfg, client_id, limits, None)
    disable_nagle(int(cfg["mqtt"]["port"]))
    # Options as agent.jobs.JobsClient sets them (4 request subscriptions, 2 streams).
    client = rr.Client(mqtt, rr.ClientOptions(4, 2, 30))
    latencies = []
    for _ in range(calls):
        token = str(uuid.uuid4())
        options = rr.RequestOptions(
            subscription_topic_filters=[f"{topic}/+"],
            response_paths=[rr.ResponsePath(f"{topic}/accepted", "clientToken"),
                            rr.ResponsePath(f"{topic}/rejected", "clientToken")],
            publish_topic=topic, payload=json.dumps({"clientToken": token}).encode(),
            correlation_token=token)
        start = time.perf_counter()
        client.make_request(options).result(30)
        latencies.append(time.perf_counter() - start)
    return latencies, [client_id]


async def jobs_client(config_path: Path, calls: int, limits: bool) -> tuple[list[float], list[str]]:
    from dataclasses import replace

    from agent.config import load_config
    from agent.connection import Connection
    from agent.jobs import JobsClient

    config = load_config(config_path)
    connection = Connection(replace(config.mqtt, iot_core_limits=limits), config.client_id)
    jobs = JobsClient(connection, request_timeout=config.mqtt.request_timeout)
    latencies = []
    async with connection:
        for _ in range(calls):
            start = time.perf_counter()
            await jobs.get_pending_job_executions(thingName=config.thing_name)
            latencies.append(time.perf_counter() - start)
    return latencies, [config.client_id]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rt_client")
    parser.add_argument("--config", type=Path, required=True, help="the thing's agent config")
    parser.add_argument("--mode", choices=("raw-echo", "raw-emulator", "rr-client",
                                           "jobs-client"),
                        required=True)
    parser.add_argument("--calls", type=int, required=True)
    parser.add_argument("--limits", action="store_true", help="keep AWS IoT Core flow control")
    parser.add_argument("--nagle", action="store_true", help="keep awscrt's default socket")
    parser.add_argument("--responder-port", type=int, default=None,
                        help="raw-echo: the echo responder connects here (the broker itself, "
                             "when the requester goes through an emulated link)")
    args = parser.parse_args(argv)
    if args.mode == "jobs-client":
        latencies, ids = asyncio.run(jobs_client(args.config, args.calls, args.limits))
    elif args.mode == "rr-client":
        latencies, ids = rr_client(yaml.safe_load(args.config.read_text()), args.calls,
                                   args.limits)
    else:
        cfg = yaml.safe_load(args.config.read_text())
        latencies, ids = raw(cfg, args.mode, args.calls, args.limits, args.nagle,
                             args.responder_port)
    json.dump({"latencies": latencies, "client_ids": ids}, sys.stdout)
    sys.stdout.flush()
    # No teardown of the CRT objects: tearing down a bare request-response client and its MQTT
    # client at interpreter exit segfaulted in about 1 run in 8 (awscrt 0.36.1), which would
    # lose the figures. The process's job is done; the kernel closes the sockets. (The agent's
    # own shutdown path stops its client cleanly and exits 0; the bench's agents show that.)
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
