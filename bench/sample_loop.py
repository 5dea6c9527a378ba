"""The baseline consumer: the loop an engineer writes from the awsiotsdk jobs sample.

``python -m bench.sample_loop --config AGENT_YAML --command /bin/true`` connects the way the
sample does (``mqtt5_client_builder.mtls_from_path`` + ``IotJobsClientV2`` with the sample's
``ClientOptions(2, 2, 30)``), opens the NextJobExecutionChanged stream, prints ``ready``, and then
loops: ``start_next_pending_job_execution`` -> ``subprocess.run(command)`` ->
``update_job_execution(SUCCEEDED)``, until nothing is pending, then waits for the next
notification. Nothing durable, no versions, no timeouts: the cheapest correct-looking consumer.

Two departures from the sample, so that it runs on the same transport as the agent: the port and
CA are explicit (the sandbox broker), and the socket gets TCP_NODELAY and the configured
``iot_core_limits``, exactly as the agent's connection does. On SIGTERM it prints
``{"done": N}`` and exits.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import yaml
from awscrt import mqtt5, mqtt_request_response
from awsiot import ServiceStreamOptions, iotjobs, mqtt5_client_builder

from agent.connection import disable_nagle

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sample_loop")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--command", nargs="+", required=True)
    args = parser.parse_args(argv)
    cfg = yaml.safe_load(args.config.read_text())
    mqtt, thing = cfg["mqtt"], cfg["thing_name"]
    port = int(mqtt["port"])

    connected: Future[None] = Future()

    def on_success(_: Any) -> None:
        disable_nagle(port)
        if not connected.done():
            connected.set_result(None)

    options: dict[str, Any] = {}
    if not mqtt.get("iot_core_limits", True):
        options["extended_validation_and_flow_control_options"] = \
            mqtt5.ExtendedValidationAndFlowControlOptions.NONE
    client = mqtt5_client_builder.mtls_from_path(
        endpoint=mqtt["endpoint"], port=port, cert_filepath=mqtt["cert"],
        pri_key_filepath=mqtt["key"], ca_filepath=mqtt["ca"], client_id=thing,
        on_lifecycle_connection_success=on_success, **options)
    client.start()
    jobs = iotjobs.IotJobsClientV2(client, mqtt_request_response.ClientOptions(
        max_request_response_subscriptions=2, max_streaming_subscriptions=2,
        operation_timeout_in_seconds=30))
    connected.result(30)

    wake = threading.Event()
    wake.set()  # look once at start, as the sample does
    subscribed = threading.Event()
    stopping = threading.Event()

    def on_status(event: Any) -> None:
        if int(event.type) == 0:  # SUBSCRIPTION_ESTABLISHED
            subscribed.set()

    stream = jobs.create_next_job_execution_changed_stream(
        iotjobs.NextJobExecutionChangedSubscriptionRequest(thing_name=thing),
        ServiceStreamOptions(incoming_event_listener=lambda _: wake.set(),
                             subscription_status_listener=on_status))
    stream.open()
    if not subscribed.wait(30):
        raise SystemExit("notify-next subscription not established")

    def stop(*_: Any) -> None:
        stopping.set()
        wake.set()

    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    done = 0
    while not stopping.is_set():
        wake.wait()
        wake.clear()
        while not stopping.is_set():
            started = jobs.start_next_pending_job_execution(
                iotjobs.StartNextPendingJobExecutionRequest(thing_name=thing)).result(30)
            execution = started.execution
            if execution is None:
                break
            code = subprocess.run(args.command, check=False).returncode
            jobs.update_job_execution(iotjobs.UpdateJobExecutionRequest(
                thing_name=thing, job_id=execution.job_id,
                status="SUCCEEDED" if code == 0 else "FAILED")).result(30)
            done += 1
    client.stop()
    print(json.dumps({"done": done}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
