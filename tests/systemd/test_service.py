"""The shipped unit under a real systemd: installed as the README says, in a booted Debian.

One machine serves the module (booting and installing take a few seconds); the tests run in
file order and each leaves the agent running for the next. The agent talks to the session's
sandbox on the host's loopback, and jobs are queued with boto3 as an operator would.

Two test-only changes to what a user installs, both in a drop-in: ``WatchdogSec=4s`` (the
shipped 60 s would make the watchdog test wait half a minute; the agent pings at half the
interval either way) and the boot-id copy (:func:`tests.systemd.conftest.boot_id_unit`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.sandbox.stack import Stack
from tests.systemd.conftest import (
    AGENT,
    BOOT_ID_COPY,
    CONFIG,
    UNIT,
    VENV,
    Device,
    boot_id_unit,
    install_agent,
    install_agent_unit,
    write_agent_config,
    write_handler,
)
from tests.systemd.machine import Machine

pytestmark = pytest.mark.systemd

DROPIN = """\
[Unit]
Wants=iot-ci-boot-id.service
After=iot-ci-boot-id.service

[Service]
WatchdogSec=4s
"""
#: Where the hello handler leaves proof that it ran inside the machine.
MARKS = "/var/lib/iot-ci-marks"


@pytest.fixture(scope="module")
def device(machine: Machine, agent_wheels: Path, stack: Stack, iot: Any) -> Iterator[Device]:
    install_agent(machine, agent_wheels)
    boot_id_unit(machine)
    install_agent_unit(machine, dropin=DROPIN)
    hello = write_handler(machine, "hello.sh",
                          f'mkdir -p {MARKS} && echo "$@" > {MARKS}/"$JOB_ID"\necho hello "$@"\n')
    sleeper = write_handler(machine, "sleep.sh", "echo sleeping\nexec sleep 300\n")
    # The reboot handler the package ships, where the venv installed it.
    site = machine.run([f"{VENV}/bin/python", "-c",
                        "import agent, pathlib; print(pathlib.Path(agent.__file__).parent)"])
    reboot = f"{site.stdout.strip()}/handlers/reboot.sh"
    thing = f"booted-{uuid.uuid4().hex[:8]}"
    write_agent_config(
        machine, stack, thing,
        {"hello": {"command": [hello], "timeout": "30s"},
         "sleep": {"command": [sleeper], "timeout": "5m"},
         "reboot": {"command": [reboot], "timeout": "1m", "verify": [reboot]}},
        shutdown_grace="1s", kill_grace="1s", boot_id_path=BOOT_ID_COPY,
        reboot_timeout="2m", log_level="info")
    # README step 3's connection check, before the agent holds the thing's client id.
    machine.run([AGENT, "pending", "--config", CONFIG])
    machine.run(["systemctl", "enable", "--now", UNIT])
    yield Device(machine, thing, iot)


def test_type_notify_reaches_active(device: Device) -> None:
    state = device.wait_active()
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
    props = device.agent("Type", "NRestarts", "MainPID", "NotifyAccess")
    assert props["Type"] == "notify"
    assert props["NotifyAccess"] == "main"
    assert props["NRestarts"] == "0"
    # Active for a Type=notify unit means READY=1 arrived from the main process, which the
    # venv's script is (not a wrapper).
    cmdline = device.machine.read_file(f"/proc/{props['MainPID']}/cmdline").split("\0")
    assert f"{VENV}/bin/iot-jobs-agent" in cmdline


def test_systemctl_status_shows_the_status_line(device: Device) -> None:
    device.wait_active()
    status = device.machine.systemctl("status", UNIT).stdout
    status_lines = [line.strip() for line in status.splitlines()
                    if line.strip().startswith("Status:")]
    # Nothing runs between the tests: the agent says it is idle, in both places.
    assert status_lines == ['Status: "idle, waiting for jobs"'], status
    assert device.agent("StatusText")["StatusText"] == "idle, waiting for jobs"
    # README step 4's other view, as root inside: the running agent, connected to the sandbox.
    deadline = time.monotonic() + 15
    report = ""
    while "Connection:  connected" not in report and time.monotonic() < deadline:
        time.sleep(0.2)
        report = device.machine.run([AGENT, "status", "--config", CONFIG]).stdout
    assert report.startswith("iot-jobs-agent: running"), report
    assert "Connection:  connected" in report, report


def test_the_watchdog_is_fed(device: Device) -> None:
    device.wait_active()
    first = device.agent("WatchdogTimestampMonotonic", "WatchdogUSec", "MainPID")
    assert first["WatchdogUSec"] == "4s"
    deadline = time.monotonic() + 10
    later = first
    while time.monotonic() < deadline and (later["WatchdogTimestampMonotonic"]
                                           == first["WatchdogTimestampMonotonic"]):
        time.sleep(0.5)
        later = device.agent("WatchdogTimestampMonotonic", "MainPID")
    assert int(later["WatchdogTimestampMonotonic"]) > int(first["WatchdogTimestampMonotonic"])
    time.sleep(4.5)  # longer than WatchdogSec: a starved watchdog would have restarted it
    after = device.agent("MainPID", "NRestarts", "ActiveState")
    assert (after["MainPID"], after["NRestarts"], after["ActiveState"]) == (
        first["MainPID"], "0", "active")


def test_a_job_queued_with_boto3_runs_to_succeeded(device: Device) -> None:
    job_id = device.job({"operation": "hello", "args": ["from-boto3"]})
    execution = device.wait(job_id)
    assert execution["status"] == "SUCCEEDED", execution
    # It ran inside the machine, with the job's arguments.
    assert device.machine.read_file(f"{MARKS}/{job_id}").strip() == "from-boto3"


def test_journalctl_priority_filters(device: Device) -> None:
    rejected = device.job({"operation": "no-such-handler"})
    assert device.wait(rejected)["status"] == "REJECTED"
    entries = [json.loads(line) for line in device.machine.journal(
        "-u", UNIT, "-p", "warning", "-o", "json").splitlines()]
    everything = [json.loads(line) for line in device.machine.journal(
        "-u", UNIT, "-o", "json").splitlines()]
    assert entries and all(int(e["PRIORITY"]) <= 4 for e in entries), entries
    assert any(rejected in e["MESSAGE"] for e in entries), [e["MESSAGE"] for e in entries]
    # ... and there was something to filter out: the agent's info lines (priority 6).
    assert any(int(e["PRIORITY"]) == 6 for e in everything)
    assert len(everything) > len(entries)


def test_systemctl_stop_with_a_handler_running_reports_failed_interrupted(
        device: Device) -> None:
    job_id = device.job({"operation": "sleep"})
    device.wait(job_id, {"IN_PROGRESS"})
    deadline = time.monotonic() + 10
    while device.machine.run(["pgrep", "-f", "sleep 300"], check=False).returncode != 0:
        assert time.monotonic() < deadline, "the sleep handler never started"
        time.sleep(0.1)
    device.machine.systemctl("stop", UNIT)
    try:
        execution = device.wait(job_id)
        assert execution["status"] == "FAILED", execution
        assert execution["statusDetails"]["detailsMap"]["reason"].startswith(
            "interrupted: the agent was stopped"), execution
        props = device.agent("Result", "ActiveState")
        assert (props["ActiveState"], props["Result"]) == ("inactive", "success"), props
        assert device.machine.run(["pgrep", "-f", "sleep 300"], check=False).returncode == 1
    finally:
        device.machine.systemctl("start", UNIT)
    assert device.wait_active()["ActiveState"] == "active"


def test_a_reboot_job_reboots_the_machine_and_succeeds(device: Device) -> None:
    before = device.machine.boot_id()
    boots = device.machine.boots
    job_id = device.job({"operation": "reboot"})
    # The agent runs reboot_command (systemctl reboot): nspawn exits 133 and is booted again,
    # where the enabled unit starts the agent, which sees a new boot id and ends the job.
    after = device.machine.await_reboot(timeout=90)
    assert device.machine.boots == boots + 1
    assert after != before
    execution = device.wait(job_id, timeout=60)
    assert execution["status"] == "SUCCEEDED", execution
    assert device.machine.read_file(BOOT_ID_COPY).strip() == after
