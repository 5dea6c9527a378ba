"""``iot-jobs-agent sandbox``: the whole thing, locally, in one command, no AWS account.

Starts certificates + mutual-TLS Mosquitto + the Jobs and Commands emulator with its
boto3-compatible HTTP control and data planes, registers a sandbox thing, writes
``DIR/agent.yaml`` with the example handlers and Commands enabled (usable with every
``--config`` command) and ``DIR/sandbox.json`` (for scripts: the MQTT details, both HTTP
endpoints and the region), starts the real agent as a separate process exactly as systemd would,
queues a demo job and sends a demo command, and shows both being handled. ``--policy FILE``
replaces the thing's default policies, and then Commands stay off (the file may not allow their
topics). ``--no-agent`` runs only the cloud side, for users who run the agent themselves and
drive it with boto3.

Every AWS managed template runs as it comes: ``handler_dir`` holds the shipped handlers, and
stand-ins (:mod:`agent.sandbox.standins`) take the place of apt-get, systemctl and the reboot,
so the sandbox never changes the machine it runs on. When the stand-in reboot stops the agent,
the sandbox starts it again, as the next boot would.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from agent.config import SAFE_PATH
from agent.errors import ConfigError
from agent.paths import directory_problem
from agent.sandbox._validate import Rejection
from agent.sandbox.http_control import ACCOUNT_ID, REGION
from agent.sandbox.iot_policy import parse_policy
from agent.sandbox.stack import Stack
from agent.sandbox.standins import StandIns, install_stand_ins

__all__ = ["DEFAULT_SANDBOX_DIR", "RUN_COMMAND_ALLOW", "SANDBOX_THING", "default_directory",
           "run_sandbox", "sandbox_settings"]

log = logging.getLogger("agent.sandbox")

DEFAULT_SANDBOX_DIR = Path(".sandbox")
SANDBOX_THING = "sandbox-thing"
EXAMPLES = Path(__file__).resolve().parent / "examples"
DEMO_JOB = "demo-1"
DEMO_DOCUMENT = {"operation": "run-script", "args": ["hello", "from the sandbox"]}
DEMO_COMMAND = "demo-hello"
DEMO_COMMAND_DOCUMENT = {"operation": "run-script", "args": ["hello", "from a command"]}
HELLO = """#!/bin/sh
# A device script the run-script handler may run (installed in SCRIPTS_DIR).
echo "hello: $*"
echo "job $JOB_ID, execution $EXECUTION_NUMBER, on $THING_NAME"
"""
COUNT = """#!/bin/sh
# Count to N (default 10), one a second, each a step: watch it with `iot-jobs-agent status`
# and `iot-jobs-agent log JOB_ID --follow`.
n=${1:-10}
i=1
while [ "$i" -le "$n" ]; do
    echo "tick $i of $n"
    if [ -n "${JOB_PROGRESS_FD:-}" ]; then
        printf '{"step": "tick %s of %s"}\\n' "$i" "$n" >&"$JOB_PROGRESS_FD"
    fi
    sleep 1
    i=$((i + 1))
done
"""
SCRIPTS = {"hello": HELLO, "count": COUNT}


def _say(message: str) -> None:
    print(f"sandbox: {message}", flush=True)


RUN_COMMAND_ALLOW = ("echo", "date", "uname", "ls", "cat", "touch", "mkdir", "sleep")
"""What AWS-Run-Command may start in the sandbox (run_command.allow); add to it in agent.yaml."""
SANDBOX_PACKAGES = ("jq", "curl", "htop", "nginx")
SANDBOX_UNITS = ("nginx", "demo")


def sandbox_settings(directory: Path) -> dict[str, Any]:
    """Install the example and shipped handlers and the stand-ins under ``directory`` (where
    the agent's ownership/mode checks accept them); return the agent settings that use them."""
    handlers = directory / "handlers"
    scripts = directory / "scripts"
    for sub in (handlers, scripts):
        sub.mkdir(parents=True, exist_ok=True)
        sub.chmod(0o755)
    for source in sorted((EXAMPLES / "handlers").glob("*.sh")):
        target = handlers / source.name
        shutil.copyfile(source, target)  # a link (remove-packages.sh...) becomes a copy
        target.chmod(0o755)
    for name, text in SCRIPTS.items():
        script = scripts / name
        script.write_text(text)
        script.chmod(0o755)
    stand_ins = install_stand_ins(directory / "stand-ins", packages=SANDBOX_PACKAGES,
                                  units=SANDBOX_UNITS)
    return {
        "handlers": {
            "run-script": {"command": [str(handlers / "run-script.sh")], "timeout": "1m",
                           "environment": {"SCRIPTS_DIR": str(scripts)}},
            "download": {"command": [str(handlers / "download.sh")], "timeout": "5m",
                         "environment": {"DOWNLOAD_DIR": str(directory / "downloads")}},
        },
        "handler_dir": str(handlers),
        "handler_timeout": "5m",
        "handler_environment": {"PATH": f"{stand_ins.bin}:{SAFE_PATH}"},
        "run_command": {"allow": list(RUN_COMMAND_ALLOW), "timeout": "1m"},
        "reboot_command": [str(stand_ins.reboot)],
        "boot_id_path": str(stand_ins.boot_id),
        "reboot_timeout": "1m",
    }


def _wait_terminal(stack: Stack, job_id: str, timeout: float) -> dict[str, Any] | None:
    assert stack.emulator is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        execution = stack.emulator.execution(job_id, SANDBOX_THING)
        if execution["status"] not in ("QUEUED", "IN_PROGRESS"):
            return execution
        time.sleep(0.2)
    return None


def _demo_command(stack: Stack) -> bool:
    """Create the demo command, run it on the sandbox thing, show how it ended."""
    assert stack.emulator is not None
    emulator = stack.emulator
    content = json.dumps(DEMO_COMMAND_DOCUMENT).encode()
    emulator.call_commands(lambda s: s.create_command(
        DEMO_COMMAND, payload={"content": content, "contentType": "application/json"}))
    execution_id, _ = emulator.call_commands(
        lambda s: s.start_execution(DEMO_COMMAND, SANDBOX_THING, timeout=30))
    _say(f"sent command {DEMO_COMMAND}: {content.decode()}")
    deadline = time.monotonic() + 40
    while True:
        execution = emulator.call_commands(
            lambda s: s.get_execution(execution_id, SANDBOX_THING))
        if execution["status"] not in ("CREATED", "IN_PROGRESS") \
                or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    _say(f"command {DEMO_COMMAND} ended {execution['status']}; result:")
    print(json.dumps(execution.get("result", {}), indent=2), flush=True)
    return bool(execution["status"] == "SUCCEEDED")


def default_directory(cwd: Path | None = None) -> Path:
    """Where the sandbox lives when no ``--dir`` is given: ``./.sandbox``.

    The agent refuses handlers below a directory others can write (a checkout under /tmp, say),
    and the sandbox's handlers live in its directory. There the files go to
    ``~/.cache/iot-jobs-agent/sandbox/<hash of the checkout>`` instead, and ``./.sandbox`` becomes
    a link to it, so the README's scripts that read ``.sandbox/sandbox.json`` still work.
    """
    cwd = (cwd or Path.cwd()).resolve()
    local = cwd / DEFAULT_SANDBOX_DIR
    if directory_problem(cwd) is None:
        return local
    key = hashlib.sha256(str(cwd).encode()).hexdigest()[:12]
    private = Path.home() / ".cache" / "iot-jobs-agent" / "sandbox" / key
    private.mkdir(parents=True, exist_ok=True)
    if local.is_symlink() and Path(os.readlink(local)) != private:
        local.unlink()
    if not local.exists() and not local.is_symlink():
        local.symlink_to(private)
    link = (f"{local} links to it" if local.is_symlink()
            else f"remove the old {local} to get a link to it")
    _say(f"{cwd} is below a directory others can write, where the agent runs no handler; "
         f"the sandbox lives in {private} ({link})")
    return private


def run_sandbox(directory: Path, *, once: bool, agent: bool = True, policy: str | None = None,
                policy_name: str | None = None) -> int:
    """Run the sandbox; ``policy`` (a policy document, from the file ``policy_name``) replaces
    the default policies of every thing.

    Raises:
        ConfigError: the policy is refused (the message says why, as create_policy would).
        RuntimeError: the sandbox could not start.
    """
    directory = directory.resolve()
    if policy is not None:
        try:
            parse_policy(policy, region=REGION, account=ACCOUNT_ID)
        except Rejection as rejection:
            raise ConfigError(f"--policy {policy_name}: {rejection}") from None
    for stale in ("things", "state"):  # the emulator's state died with its last process
        shutil.rmtree(directory / stale, ignore_errors=True)
    (directory / "sandbox.json").unlink(missing_ok=True)  # its endpoints died with it too
    with Stack(directory, policy=policy) as stack:
        assert stack.broker is not None and stack.emulator is not None and stack.pki is not None
        config = yaml.safe_load(stack.thing(SANDBOX_THING).read_text())
        (directory / "metrics").mkdir(exist_ok=True)  # node exporter's textfile directory
        config.update(state_dir=str(directory / "state"), poll_interval="1m",
                      progress_interval="1s", shutdown_grace="10s", kill_grace="3s",
                      metrics_file=str(directory / "metrics" / "iot-jobs-agent.prom"),
                      **sandbox_settings(directory))
        # Commands need the default sandbox-commands-device policy; a --policy FILE replaces it,
        # so then Commands stay off, as on an account that never used them (turn them on in
        # agent.yaml if that policy allows the Commands topics).
        commands = policy is None
        config["commands"] = {"enabled": commands}
        if commands:  # a command sent while the agent restarts waits for it in its session
            config["mqtt"]["session_expiry"] = "10m"
        agent_yaml = directory / "agent.yaml"
        agent_yaml.write_text(yaml.safe_dump(config, sort_keys=False))
        identity = stack.pki.client(SANDBOX_THING)
        info = {
            "thing_name": SANDBOX_THING,
            "mqtt": {"endpoint": stack.broker.host, "port": stack.broker.port,
                     "cert": str(identity.cert), "key": str(identity.key),
                     "ca": str(stack.pki.ca_cert)},
            "control_endpoint": stack.control_endpoint,
            "data_endpoint": stack.data_endpoint,
            "region": stack.region,
            "account_id": stack.account_id,
            "stand_ins": str(directory / "stand-ins"),
        }
        # Written whole, then renamed: a script polling for the file never reads half of it.
        partial = directory / "sandbox.json.tmp"
        partial.write_text(json.dumps(info, indent=2) + "\n")
        partial.replace(directory / "sandbox.json")
        _say(f"mosquitto (mutual TLS) on {stack.broker.host}:{stack.broker.port}; "
             "Jobs emulator connected")
        _say(f"control plane, boto3.client('iot'): {stack.control_endpoint}")
        _say(f"data plane, boto3.client('iot-jobs-data'): {stack.data_endpoint}")
        _say(f"region {stack.region}; thing {SANDBOX_THING}; agent config {agent_yaml}; "
             f"all of it in {directory / 'sandbox.json'}")
        _say(f"policies of {SANDBOX_THING}'s certificate: "
             f"{', '.join(stack.default_policies)}"
             + (f" (from {policy_name})" if policy_name else ""))
        supervisor = _Supervisor(agent_yaml, StandIns(directory / "stand-ins")) if agent \
            else None
        try:
            return _demo(stack, agent_yaml, supervisor, once=once, commands=commands)
        finally:
            if supervisor is not None:
                supervisor.stop()


class _Supervisor:
    """The agent as a separate process, started again after the stand-in reboot stopped it."""

    def __init__(self, agent_yaml: Path, stand_ins: StandIns) -> None:
        self.command = [sys.executable, "-m", "agent", "run", "--config", str(agent_yaml)]
        self.stand_ins = stand_ins
        _say(f"starting the agent: {' '.join(self.command)}")
        self.process = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET",
                                                                "JOURNAL_STREAM")}
        return subprocess.Popen(self.command, env=env)

    def exited(self) -> int | None:
        """The agent's exit status if it is gone for good; None while it runs (or "boots")."""
        code = self.process.poll()
        marker = self.stand_ins.dir / "rebooting"
        if code is not None and marker.exists():
            marker.unlink()
            _say("the stand-in reboot stopped the agent; starting it again, as the next boot "
                 "would")
            self.process = self._start()
            return None
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _demo(stack: Stack, agent_yaml: Path, supervisor: _Supervisor | None, *,
          once: bool, commands: bool) -> int:
    assert stack.emulator is not None
    ok = True
    if supervisor is not None:
        stack.emulator.create_job(DEMO_JOB, [SANDBOX_THING], DEMO_DOCUMENT)
        _say(f"queued job {DEMO_JOB}: {json.dumps(DEMO_DOCUMENT)}")
        execution = _wait_terminal(stack, DEMO_JOB, 60)
        if execution is None:
            _say(f"job {DEMO_JOB} did not finish within 60 s")
            ok = False
        else:
            _say(f"job {DEMO_JOB} ended {execution['status']}; statusDetails:")
            print(json.dumps(execution.get("statusDetails", {}), indent=2), flush=True)
            ok = execution["status"] == "SUCCEEDED"
        if commands:
            ok = _demo_command(stack) and ok
        else:
            _say("no demo command: Commands are off in agent.yaml (the --policy replaces "
                 "sandbox-commands-device)")
    if once:
        _say("OK" if ok else "FAILED")
        return 0 if ok else 1
    if supervisor is None:
        _say(f"no agent started; run one: iot-jobs-agent run --config {agent_yaml}")
    _say(f"running. Try: iot-jobs-agent status --config {agent_yaml}  (Ctrl-C stops)")
    _say("AWS managed templates run here as they come (list_managed_job_templates); apt-get, "
         "systemctl and the reboot are stand-ins that change nothing")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        if supervisor is not None and (code := supervisor.exited()) is not None:
            _say(f"the agent exited with status {code}")
            return 1
    _say("stopping")
    return 0
