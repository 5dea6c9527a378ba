"""Every handler in its own cgroup, under a real systemd (issue 11 item 2).

The shipped unit installed as the README says; the agent, root under systemd, runs each
execution as a transient service named after the job (the systemd backend). Each handler here
leaves processes behind the way a hostile one would (a ``setsid`` child, a double fork, a child
in the background); none may outlive its job's end, timeout or cancellation, or the agent's
stop. The handler limits become unit properties, and the OOM killer is reported as such.
"""

from __future__ import annotations

import time
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
from tests.systemd.conftest import Device as ServiceDevice
from tests.systemd.machine import Machine

pytestmark = pytest.mark.systemd

LEAVES = """\
quiet() { "$@" </dev/null >/dev/null 2>&1 3>&- ; }
quiet setsid sleep 3000 &
quiet sleep 3001 &
( quiet sleep 3002 & )
( quiet env -i setsid sleep 3003 & )
echo '{"step": "children started"}' >&3
echo "unit=$(cat /proc/self/cgroup | tail -n 1)"
exec sleep "${1:-0}"
"""
LEFTOVER = "sleep 300[0-3]"


class Device(ServiceDevice):
    """The tier's device (tests/systemd/conftest.py), plus what these tests look at."""

    def leftovers(self, timeout: float = 10.0) -> str:
        """``ps`` lines of the handlers' leftovers still alive after ``timeout`` ("": none)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.machine.run(["pgrep", "-a", "-f", LEFTOVER], check=False).stdout
            if not found.strip() or time.monotonic() > deadline:
                return found.strip()
            time.sleep(0.2)

    def wait_children(self) -> None:
        deadline = time.monotonic() + 15
        while len(self.machine.run(["pgrep", "-f", LEFTOVER],
                                   check=False).stdout.split()) < 4:
            assert time.monotonic() < deadline, "the handler never started its children"
            time.sleep(0.1)

    def units(self) -> list[str]:
        out = self.machine.systemctl("list-units", "--all", "--plain", "--no-legend",
                                     "iot-jobs-agent-job-*").stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def device(machine: Machine, agent_wheels: Path, stack: Stack, iot: Any) -> Iterator[Device]:
    install_agent(machine, agent_wheels)
    boot_id_unit(machine)
    install_agent_unit(machine, dropin="[Unit]\nWants=iot-ci-boot-id.service\n"
                                       "After=iot-ci-boot-id.service\n")
    leaves = write_handler(machine, "leaves.sh", LEAVES)
    hog = write_handler(machine, "hog.sh", "exec python3 -c 'b = bytearray(400 << 20); "
                                           "b[::4096] = b\"x\" * len(b[::4096])'\n")
    probe = write_handler(machine, "probe.sh", """\
ip -o link | cut -d: -f2 | tr -d ' ' | sort | tr '\\n' ' '; echo
touch /usr/probe-write 2>/dev/null && echo usr-writable || echo usr-read-only
touch /var/lib/iot-ci-rw/ok && echo rw-ok || echo rw-refused
""")
    machine.run(["mkdir", "-p", "/var/lib/iot-ci-rw"])
    thing = f"cgroups-{uuid.uuid4().hex[:8]}"
    write_agent_config(
        machine, stack, thing,
        {"leaves": {"command": [leaves], "timeout": "4s"},
         "hog": {"command": [hog], "timeout": "1m", "memory_max": "64M"},
         "probe": {"command": [probe], "timeout": "1m", "protect_system": "strict",
                   "read_write_paths": ["/var/lib/iot-ci-rw"], "private_network": True,
                   "private_tmp": True, "tasks_max": 16, "cpu_quota": "50%"}},
        shutdown_grace="1s", kill_grace="1s", boot_id_path=BOOT_ID_COPY, log_level="info")
    machine.run(["systemctl", "enable", "--now", UNIT])
    yield Device(machine, thing, iot)


@pytest.mark.parametrize("args, status", [([], "SUCCEEDED"), (["60"], "FAILED")],
                         ids=["normal-exit", "timeout"])
def test_a_transient_unit_per_run_and_nothing_outlives_it(device: Device, args: list[str],
                                                          status: str) -> None:
    job_id = device.job({"operation": "leaves", "args": args})
    device.wait(job_id, {"IN_PROGRESS", "SUCCEEDED", "FAILED"})
    execution = device.wait(job_id)
    assert execution["status"] == status, execution
    details = execution["statusDetails"]["detailsMap"]
    # It ran in its own unit, named after the job.
    assert f"/iot-jobs-agent-job-{job_id.replace('-', chr(92) + 'x2d')}-1-" in \
        details["outputHead"], details
    assert device.leftovers() == ""
    assert device.units() == []


def test_nothing_outlives_a_canceled_job(device: Device) -> None:
    job_id = device.job({"operation": "leaves", "args": ["60"]})
    device.wait(job_id, {"IN_PROGRESS"})
    device.wait_children()
    assert any(job_id.replace("-", "\\x2d") in unit for unit in device.units()), device.units()
    device.iot.cancel_job(jobId=job_id, force=True)
    assert device.leftovers() == ""
    assert device.units() == []


def memory_max_enforced(machine: Machine) -> bool:
    """Whether this machine's systemd can apply MemoryMax= at all: on a cgroup v1 host,
    systemd-nspawn mounts the controllers read-only in the container, so limits are accepted
    and never applied (the transient backend's mapping of Result=oom-kill is unit-tested in
    tests/unit/test_backend_transient.py)."""
    probe = machine.run(["systemd-run", "--quiet", "--wait", "--pipe", "-p", "MemoryMax=16M",
                         "python3", "-c", "b = bytearray(200 << 20); b[::4096] = "
                         "b'x' * len(b[::4096])"], check=False)
    return probe.returncode != 0


def test_the_oom_killer_fails_the_job_and_says_so(device: Device) -> None:
    if not memory_max_enforced(device.machine):
        pytest.skip("this machine's systemd cannot enforce MemoryMax= (cgroup v1 host: "
                    "systemd-nspawn mounts the memory controller read-only)")
    job_id = device.job({"operation": "hog"})
    execution = device.wait(job_id)
    assert execution["status"] == "FAILED", execution
    assert execution["statusDetails"]["detailsMap"]["reason"] == \
        "killed by the OOM killer (memory_max 64M)", execution


def test_sandbox_settings_reach_the_handler(device: Device) -> None:
    job_id = device.job({"operation": "probe"})
    execution = device.wait(job_id)
    assert execution["status"] == "SUCCEEDED", execution
    head = execution["statusDetails"]["detailsMap"]["outputHead"]
    assert [part.strip() for part in head.split(" | ")[:3]] == [
        "lo", "usr-read-only", "rw-ok"], head


def test_nothing_outlives_the_agents_stop(device: Device) -> None:
    job_id = device.job({"operation": "leaves", "args": ["60"]})
    device.wait(job_id, {"IN_PROGRESS"})
    device.wait_children()
    device.machine.systemctl("stop", UNIT)
    try:
        assert device.wait(job_id)["status"] == "FAILED"
        assert device.leftovers() == ""
        assert device.units() == []
    finally:
        device.machine.systemctl("start", UNIT)


def test_a_killed_agent_leaves_no_handler_behind(device: Device) -> None:
    """kill -9 of the unprivileged agent closes its connections to the helper, which stops
    their runs; the restarted agent reports the job FAILED "interrupted"."""
    job_id = device.job({"operation": "leaves", "args": ["60"]})
    device.wait(job_id, {"IN_PROGRESS"})
    device.wait_children()
    device.machine.systemctl("kill", "--signal=KILL", "--kill-whom=main", UNIT)
    assert device.leftovers() == ""
    assert device.units() == []
    execution = device.wait(job_id, timeout=90)
    assert execution["status"] == "FAILED", execution
    assert execution["statusDetails"]["detailsMap"]["reason"].startswith("interrupted"), execution
