"""The single all-root agent (``systemd/iot-jobs-agent-root.service``), for devices that need
it: installed as the README says, it still runs each handler as a transient unit named after
the job (the systemd backend inside the agent, no helper), and nothing a handler leaves
behind outlives its job."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.sandbox.stack import Stack
from tests.systemd.conftest import (
    BOOT_ID_COPY,
    UNIT,
    boot_id_unit,
    install_agent,
    install_agent_unit,
    write_agent_config,
    write_handler,
)
from tests.systemd.machine import Machine
from tests.systemd.test_cgroups import LEAVES, Device

pytestmark = pytest.mark.systemd


@pytest.fixture(scope="module")
def device(machine: Machine, agent_wheels: Path, stack: Stack, iot: Any) -> Iterator[Device]:
    install_agent(machine, agent_wheels)
    boot_id_unit(machine)
    install_agent_unit(machine, root=True, dropin="[Unit]\nWants=iot-ci-boot-id.service\n"
                                                  "After=iot-ci-boot-id.service\n")
    leaves = write_handler(machine, "leaves.sh", LEAVES)
    thing = f"root-{uuid.uuid4().hex[:8]}"
    write_agent_config(machine, stack, thing, {"leaves": {"command": [leaves], "timeout": "4s"}},
                       shutdown_grace="1s", kill_grace="1s", boot_id_path=BOOT_ID_COPY)
    machine.run(["systemctl", "enable", "--now", UNIT])
    yield Device(machine, thing, iot)


def test_the_root_variant_runs_as_root_within_its_score(device: Device) -> None:
    machine = device.machine
    assert machine.show(UNIT, "User")["User"] in ("", "root")
    assert machine.run(["id", "-u", "iot-jobs-agent"], check=False).returncode != 0
    score = machine.run(["systemd-analyze", "security", UNIT], check=False).stdout
    exposure = float(score.strip().splitlines()[-1].split(": ")[1].split()[0])
    assert exposure <= 5.8, score


def test_handlers_run_in_their_own_units_and_leave_nothing(device: Device) -> None:
    job_id = device.job({"operation": "leaves"})
    execution = device.wait(job_id)
    assert execution["status"] == "SUCCEEDED", execution
    head = execution["statusDetails"]["detailsMap"]["outputHead"]
    assert f"/iot-jobs-agent-job-{job_id.replace('-', chr(92) + 'x2d')}-1-" in head, head
    assert device.leftovers() == ""
    assert device.units() == []
    journal = device.machine.journal("-u", UNIT, "-o", "cat")
    assert "execution backend=systemd" in journal, journal[-2000:]


def test_a_killed_agent_leaves_no_handler_unit_behind(device: Device) -> None:
    """kill -9 takes the agent's systemd-run along, not the unit it started: the next agent
    stops it before anything else (and the job is FAILED "interrupted", never run twice)."""
    job_id = device.job({"operation": "leaves", "args": ["60"]})
    device.wait(job_id, {"IN_PROGRESS"})
    device.wait_children()
    device.machine.systemctl("kill", "--signal=KILL", "--kill-whom=main", UNIT)
    execution = device.wait(job_id, timeout=90)
    assert execution["status"] == "FAILED", execution
    assert execution["statusDetails"]["detailsMap"]["reason"].startswith("interrupted"), execution
    assert device.leftovers() == ""
    assert device.units() == []
