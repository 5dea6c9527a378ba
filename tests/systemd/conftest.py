"""Fixtures of the booted-systemd tier: the cached rootfs, the agent's wheels, booted machines,
and the agent installed in one as the README tells a user (see :mod:`tests.systemd.machine`).

For tests of your own (a boot takes about a second, installing the agent a few more; the
``machine`` fixture boots one per module, ``boot_machine()`` one per ``with``)::

    def test_x(machine, agent_wheels):   # `machine`: booted once per module, then powered off
        install_agent(machine, agent_wheels)               # venv at /opt/iot-jobs-agent
        machine.run(["/opt/iot-jobs-agent/bin/iot-jobs-agent", "--help"])

:func:`install_agent`, :func:`install_agent_unit`, :func:`write_agent_config` and
:func:`boot_id_unit` are the README's install steps, one function each, so a test may swap one
(its own unit, another config) and keep the rest; ``test_service.py``'s ``device`` fixture is
the whole recipe. :class:`Device` then queues jobs with boto3 and waits for their status.

The tier is skipped, with the reason, where the host is not root or cannot create namespaces;
anywhere else a failure to build the rootfs or to boot is a test error, never a skip (CI runs
as root on a machine that can).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.sandbox.stack import Stack
from tests.integration.test_boto3_referee import sandbox_client
from tests.systemd.machine import OWNER, Machine, sweep_stale, unavailable

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("IOT_JOBS_AGENT_CI_CACHE", "/var/cache/iot-jobs-agent-ci"))
VENV = "/opt/iot-jobs-agent"
AGENT = f"{VENV}/bin/iot-jobs-agent"
CONFIG = "/etc/iot-jobs-agent/config.yaml"
CERTS = "/etc/iot-jobs-agent/certs"
UNIT = "iot-jobs-agent.service"
#: Where the test-only boot-id unit puts the machine's boot id (see :func:`boot_id_unit`).
BOOT_ID_COPY = "/run/container/boot_id"
#: The agent's runtime dependencies, wheels pinned to what the host's venv runs.
RUNTIME_DEPS = ("awsiotsdk", "awscrt", "pyyaml")
TERMINAL = {"SUCCEEDED", "FAILED", "TIMED_OUT", "REJECTED", "REMOVED", "CANCELED"}


@pytest.fixture(scope="session")
def systemd_rootfs() -> Path:
    """The cached Debian rootfs (``.ci/systemd-rootfs`` builds it on first use, ~1 min)."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    result = subprocess.run(["bash", str(ROOT / ".ci" / "systemd-rootfs")],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.fail(f".ci/systemd-rootfs failed ({result.returncode}):\n{result.stderr}")
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def machines_dir() -> Iterator[Path]:
    """Where machines keep their overlay layers: on the cache's filesystem (overlayfs wants
    its upper and work dirs on one filesystem; /tmp may be a small tmpfs)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    sweep_stale(CACHE)
    with tempfile.TemporaryDirectory(prefix="machines-", dir=CACHE) as directory:
        (Path(directory) / OWNER).write_text(str(os.getpid()))
        yield Path(directory)


@pytest.fixture(scope="session")
def boot_machine(systemd_rootfs: Path,
                 machines_dir: Path) -> Callable[[], contextlib.AbstractContextManager[Machine]]:
    """``with boot_machine() as m:`` boots a fresh machine and tears it down on exit."""
    return functools.partial(Machine.boot, systemd_rootfs, machines_dir)


@pytest.fixture(scope="module")
def machine(boot_machine: Callable[[], contextlib.AbstractContextManager[Machine]],
            ) -> Iterator[Machine]:
    """A freshly booted machine for the module (nothing installed); powered off after it."""
    with boot_machine() as m:
        yield m


@pytest.fixture(scope="session")
def agent_wheels(systemd_rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of wheels: this checkout's (``pip wheel --no-deps``, built afresh each
    session: it is the code under test) and its runtime dependencies' (pinned to the host
    venv's versions, cached under the CI cache by those pins)."""
    out = tmp_path_factory.mktemp("wheels")
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in RUNTIME_DEPS]
    key = hashlib.sha256("\n".join([sys.version.split()[0][:4], *pins]).encode()).hexdigest()
    deps = CACHE / f"wheels-{key[:16]}"
    if not deps.is_dir():
        building = Path(tempfile.mkdtemp(prefix=".wheels-", dir=CACHE))
        _pip("download", "--only-binary=:all:", "--no-deps", "-d", str(building), *pins)
        try:
            building.rename(deps)
        except OSError:  # another session cached the same pins meanwhile
            shutil.rmtree(building)
    for wheel in deps.glob("*.whl"):
        (out / wheel.name).symlink_to(wheel)
    _pip("wheel", "--no-deps", "-w", str(out), str(ROOT))
    return out


def _pip(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q",
                             *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.fail(f"pip {' '.join(args)} failed:\n{result.stderr}")


# ---------------------------------------------------------------------- the README's steps


def install_agent(machine: Machine, wheels: Path) -> None:
    """README step 1: a venv at /opt/iot-jobs-agent with the package, offline from wheels."""
    machine.copy_in(wheels, "/var/tmp/wheels")
    machine.run(["python3", "-m", "venv", VENV])
    machine.run([f"{VENV}/bin/pip", "install", "-q", "--disable-pip-version-check",
                 "--no-index", "--find-links", "/var/tmp/wheels", "iot-jobs-agent"],
                timeout=180)


AGENT_USER = "iot-jobs-agent"
HELPER_SOCKET = "iot-jobs-agent-helper.socket"
HELPER_UNIT = "iot-jobs-agent-helper.service"


def install_agent_unit(machine: Machine, *, dropin: str | None = None,
                       root: bool = False) -> None:
    """README step 2: the agent's system user, the shipped units with ExecStart/ExecReload
    pointed at the venv (the sed the README gives), the helper's socket enabled, plus an
    optional test drop-in. ``root``: the single all-root variant instead (installed under the
    agent's unit name, as the README says; no user, no helper)."""
    source = "iot-jobs-agent-root.service" if root else UNIT
    text = (ROOT / "systemd" / source).read_text()
    machine.install_unit(UNIT, text.replace("/usr/local/bin/iot-jobs-agent", AGENT))
    if not root:
        if machine.run(["id", "-u", AGENT_USER], check=False).returncode != 0:
            machine.run(["useradd", "--system", "--no-create-home", "--home-dir",
                         "/var/lib/iot-jobs-agent", "--shell", "/usr/sbin/nologin", AGENT_USER])
        for name in (HELPER_SOCKET, HELPER_UNIT):
            text = (ROOT / "systemd" / name).read_text()
            machine.install_unit(name, text.replace("/usr/local/bin/iot-jobs-agent", AGENT))
        machine.run(["systemctl", "enable", "--now", HELPER_SOCKET])
    if dropin is not None:
        machine.install_unit(UNIT, dropin, dropin="tests")


def boot_id_unit(machine: Machine) -> None:
    """Test only, the boot-id trap (../shared/reference/systemd-container.md): nspawn gives a
    container boot its own boot id by a mount over /proc/sys/kernel/random/boot_id, and the
    hardened unit's fresh procfs (ProtectControlGroups=...) shows the host kernel's, which never
    changes. This oneshot copies the container's id where the agent reads it (``boot_id_path``).
    Real devices are not affected."""
    machine.install_unit("iot-ci-boot-id.service", f"""\
[Unit]
Description=Test only: this container's boot id where the hardened agent can read it
Before={UNIT}

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'mkdir -p {Path(BOOT_ID_COPY).parent} && \
cat /proc/sys/kernel/random/boot_id > {BOOT_ID_COPY}'

[Install]
WantedBy=multi-user.target {UNIT}
""")
    machine.run(["systemctl", "enable", "iot-ci-boot-id.service"])


def write_agent_config(machine: Machine, stack: Stack, thing: str,
                       handlers: dict[str, Any], **settings: Any) -> dict[str, Any]:
    """README step 3: register ``thing`` in the host's sandbox (as ``iot-jobs-agent sandbox``
    does), copy its certificate, key (0600) and CA into /etc/iot-jobs-agent/certs and write
    /etc/iot-jobs-agent/config.yaml for it (the host's loopback is the machine's: nspawn shares
    the host's network). ``settings`` override top-level keys; returns the config written."""
    config = yaml.safe_load(stack.thing(thing).read_text())
    mqtt = config["mqtt"]
    for key, name, mode in (("cert", "device.pem.crt", 0o644), ("key", "private.pem.key", 0o600),
                            ("ca", "ca.pem", 0o644)):
        machine.write_file(f"{CERTS}/{name}", Path(mqtt[key]).read_bytes(), mode=mode)
        mqtt[key] = f"{CERTS}/{name}"
    mqtt.update(reconnect_min="100ms", reconnect_max="1s", request_timeout="5s")
    config.update({"poll_interval": "30s", "progress_interval": "200ms", "handlers": handlers})
    config.update(settings)
    machine.run(["install", "-d", "-m", "0750", "/etc/iot-jobs-agent", CERTS])
    machine.write_file(CONFIG, yaml.safe_dump(config, sort_keys=False), mode=0o640)
    # With the agent's own user (README): it reads the config through its group and owns its
    # key; root (the helper) reads them anyway.
    if machine.run(["id", "-u", AGENT_USER], check=False).returncode == 0:
        machine.run(["chgrp", AGENT_USER, "/etc/iot-jobs-agent", CERTS, CONFIG])
        machine.run(["chown", f"{AGENT_USER}:{AGENT_USER}", f"{CERTS}/private.pem.key"])
        machine.run(["runuser", "-u", AGENT_USER, "--", AGENT, "check-config", "--config",
                     CONFIG])
    machine.run([AGENT, "check-config", "--config", CONFIG])
    return config


def write_handler(machine: Machine, name: str, body: str) -> str:
    """A ``#!/bin/sh`` handler inside, owned by root and 0755 as the agent requires."""
    path = f"/usr/local/lib/iot-ci/handlers/{name}"
    machine.write_file(path, "#!/bin/sh\n" + body, mode=0o755)
    return path


# ---------------------------------------------------------------------- the cloud side


@pytest.fixture(scope="session")
def iot(stack: Stack) -> Any:
    """``boto3.client("iot")`` on the host's sandbox (the session stack of tests/conftest.py)."""
    return sandbox_client("iot", stack.control_endpoint, stack.region)


def queue_job(iot: Any, thing: str, job_id: str, document: dict[str, Any]) -> None:
    """Queue a job for ``thing`` with boto3, as an operator would against AWS."""
    arn = iot.describe_thing(thingName=thing)["thingArn"]
    iot.create_job(jobId=job_id, targets=[arn], document=json.dumps(document))


def execution(iot: Any, thing: str, job_id: str) -> dict[str, Any]:
    return iot.describe_job_execution(jobId=job_id, thingName=thing)["execution"]


def wait_status(iot: Any, thing: str, job_id: str, statuses: set[str] | None = None,
                timeout: float = 60.0) -> dict[str, Any]:
    """Poll ``describe_job_execution`` until its status is in ``statuses`` (default: any
    terminal one); the execution. Fails the test with the last status on timeout."""
    wanted = statuses or TERMINAL
    deadline = time.monotonic() + timeout
    current: dict[str, Any] = {}
    while time.monotonic() < deadline:
        current = execution(iot, thing, job_id)
        if current["status"] in wanted:
            return current
        time.sleep(0.2)
    pytest.fail(f"job {job_id} is {current.get('status')} {current.get('statusDetails')} "
                f"after {timeout:g}s, not {sorted(wanted)}")


class Device:
    """A machine with the agent installed, the thing it is in the sandbox, and boto3 to queue
    its jobs: what most booted tests of the agent need."""

    def __init__(self, machine: Machine, thing: str, iot: Any) -> None:
        self.machine = machine
        self.thing = thing
        self.iot = iot

    def job(self, document: dict[str, Any]) -> str:
        """Queue ``document`` with boto3; the new job's id."""
        job_id = f"job-{uuid.uuid4().hex[:10]}"
        queue_job(self.iot, self.thing, job_id, document)
        return job_id

    def wait(self, job_id: str, statuses: set[str] | None = None,
             timeout: float = 60.0) -> dict[str, Any]:
        return wait_status(self.iot, self.thing, job_id, statuses, timeout)

    def agent(self, *properties: str) -> dict[str, str]:
        return self.machine.show(UNIT, *properties)

    def wait_active(self, timeout: float = 30.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        state: dict[str, str] = {}
        while time.monotonic() < deadline:
            state = self.agent("ActiveState", "SubState", "Result")
            if state["ActiveState"] in ("active", "failed"):
                break
            time.sleep(0.1)
        return state
