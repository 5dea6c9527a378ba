"""The network-facing process holds no privilege, under a real systemd (issue 11 item 3).

The units installed as the README says: the agent as ``iot-jobs-agent`` with no capability,
the root helper behind its socket. As the agent's user, a request to run any other program, to
run a handler as another user or to signal an arbitrary process is refused; a configured
handler with another ``user:`` still runs as that user, through the helper.
"""

from __future__ import annotations

import json
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.sandbox.stack import Stack
from tests.systemd.conftest import (
    AGENT_USER,
    BOOT_ID_COPY,
    UNIT,
    VENV,
    boot_id_unit,
    install_agent,
    install_agent_unit,
    queue_job,
    wait_status,
    write_agent_config,
    write_handler,
)
from tests.systemd.machine import Machine

pytestmark = pytest.mark.systemd

CLIENT = """\
import json, os, socket, sys
from agent.helper import receive, send
sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
sock.connect("/run/iot-jobs-agent-helper.sock")
r, w = os.pipe()
message = json.loads(sys.argv[1])
send(sock, message, [r, w, w, w] if message.get("op") == "run" else [])
print(json.dumps(receive(sock)[0]))
"""
RUN = {"op": "run", "kind": "job", "job_id": "evil", "execution_number": 1,
       "document": {"operation": "whoami"}, "step": 0, "phase": "run"}


@pytest.fixture(scope="module")
def device(machine: Machine, agent_wheels: Path, stack: Stack, iot: Any
           ) -> Iterator[tuple[Machine, str, Any]]:
    install_agent(machine, agent_wheels)
    boot_id_unit(machine)
    install_agent_unit(machine, dropin="[Unit]\nWants=iot-ci-boot-id.service\n"
                                       "After=iot-ci-boot-id.service\n")
    whoami = write_handler(machine, "whoami.sh", "id -un\n")
    thing = f"privilege-{uuid.uuid4().hex[:8]}"
    write_agent_config(machine, stack, thing,
                       {"whoami": {"command": [whoami], "timeout": "30s", "user": "nobody"}},
                       boot_id_path=BOOT_ID_COPY, log_level="info")
    machine.write_file("/var/tmp/helper-client.py", CLIENT)
    machine.run(["systemctl", "enable", "--now", UNIT])
    yield machine, thing, iot


def ask_as_agent(machine: Machine, message: dict[str, Any]) -> dict[str, Any]:
    out = machine.run(["runuser", "-u", AGENT_USER, "--", f"{VENV}/bin/python",
                       "/var/tmp/helper-client.py", json.dumps(message)]).stdout
    return json.loads(out)


def test_the_agent_runs_as_its_own_user_without_capabilities(device: tuple) -> None:
    machine, _thing, _iot = device
    deadline = time.monotonic() + 30
    while machine.show(UNIT, "ActiveState")["ActiveState"] != "active":
        assert time.monotonic() < deadline, machine.systemctl("status", UNIT, check=False).stdout
        time.sleep(0.2)
    pid = machine.show(UNIT, "MainPID")["MainPID"]
    status = dict(line.split(":\t", 1) for line in
                  machine.read_file(f"/proc/{pid}/status").splitlines() if ":\t" in line)
    uid = machine.run(["id", "-u", AGENT_USER]).stdout.strip()
    assert status["Uid"].split()[0] == uid != "0"
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 0
    assert int(status["CapBnd"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"
    score = machine.run(["systemd-analyze", "security", UNIT], check=False).stdout
    exposure = float(score.strip().splitlines()[-1].split(": ")[1].split()[0])
    assert exposure <= 2.5, score


@pytest.mark.parametrize("change, refusal", [
    ({"argv": ["/bin/sh", "-c", "id"]}, "argv not accepted"),
    ({"user": "root"}, "user not accepted"),
    ({"document": {"operation": "not-configured"}}, "no handler for operation"),
])
def test_the_agents_user_cannot_run_anything_else(device: tuple, change: dict[str, Any],
                                                  refusal: str) -> None:
    reply = ask_as_agent(device[0], {**RUN, **change})
    assert reply["error"].startswith("refused: ") and refusal in reply["error"], reply


def test_the_agents_user_cannot_signal_an_arbitrary_process(device: tuple) -> None:
    machine = device[0]
    victim = machine.run(["systemd-run", "--unit=iot-ci-victim", "sleep", "300"])
    assert victim.returncode == 0
    pid = machine.show("iot-ci-victim.service", "MainPID")["MainPID"]
    for message in ({"op": "signal", "signal": "KILL", "pid": int(pid)},
                    {"op": "signal", "signal": "KILL"}):
        reply = ask_as_agent(machine, message)
        assert reply["error"].startswith("refused: unknown request"), reply
    assert machine.show("iot-ci-victim.service", "ActiveState")["ActiveState"] == "active"
    machine.systemctl("stop", "iot-ci-victim.service")


def test_a_configured_user_handler_runs_as_that_user_through_the_helper(device: tuple) -> None:
    machine, thing, iot = device
    job_id = f"priv-{uuid.uuid4().hex[:8]}"
    queue_job(iot, thing, job_id, {"operation": "whoami"})
    execution = wait_status(iot, thing, job_id)
    assert execution["status"] == "SUCCEEDED", (
        execution, machine.journal("-u", "iot-jobs-agent-helper", "-o", "cat")[-3000:])
    assert execution["statusDetails"]["detailsMap"]["outputHead"] == "nobody", execution
    log = machine.journal("-u", "iot-jobs-agent-helper", "-o", "cat")
    assert f"handler started job_id={job_id}" in log, textwrap.shorten(log, 2000)
