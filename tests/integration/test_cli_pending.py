"""``iot-jobs-agent pending``: the real command, as a user runs it, against the sandbox."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import Thing, boto3_shape_errors

pytestmark = pytest.mark.broker


def pending(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "pending", "--config", str(config),
                           *extra], capture_output=True, text=True, timeout=120)


def test_pending_prints_the_boto3_structure(thing: Thing) -> None:
    thing.emulator.create_job(thing.j("cli-1"), [thing.name], {"operation": "a"})
    thing.emulator.create_job(thing.j("cli-2"), [thing.name], {"operation": "b"})
    thing.emulator.call(lambda s: s.start_next(thing.name))

    proc = pending(thing.config_path)

    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    first = thing.emulator.execution(thing.j("cli-1"), thing.name)
    second = thing.emulator.execution(thing.j("cli-2"), thing.name)
    assert result == {
        "inProgressJobs": [{k: first[k] for k in ("jobId", "queuedAt", "startedAt",
                                                  "lastUpdatedAt", "versionNumber",
                                                  "executionNumber")}],
        "queuedJobs": [{k: second[k] for k in ("jobId", "queuedAt", "lastUpdatedAt",
                                               "versionNumber", "executionNumber")}],
    }
    assert boto3_shape_errors("GetPendingJobExecutions", result) == ""
    assert proc.stderr == ""


def test_service_error_is_one_line_and_nonzero(thing: Thing) -> None:
    thing.emulator.inject_rejections("RequestThrottled", 1)
    proc = pending(thing.config_path)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith("ThrottlingException: ")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


def test_missing_config_exits_78(tmp_path: Path) -> None:
    proc = pending(tmp_path / "nope.yaml")
    assert proc.returncode == 78
    assert proc.stderr.startswith("ConfigError: ")
    assert "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_key_file_and_loose_key_mode_exit_78(thing: Thing, tmp_path: Path) -> None:
    data = yaml.safe_load(thing.config_path.read_text())
    data["mqtt"]["key"] = str(tmp_path / "missing.key")
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump(data))
    proc = pending(missing)
    assert proc.returncode == 78
    assert "mqtt.key" in proc.stderr and "missing.key" in proc.stderr
    assert "does not exist" in proc.stderr

    loose_key = tmp_path / "loose.key"
    loose_key.write_bytes(Path(thing.config.mqtt.key).read_bytes())
    loose_key.chmod(0o644)
    data["mqtt"]["key"] = str(loose_key)
    loose = tmp_path / "loose.yaml"
    loose.write_text(yaml.safe_dump(data))
    proc = pending(loose)
    assert proc.returncode == 78
    assert "chmod 600" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bad_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("thing_name: a\nmqtt:\n  endpoint: [unclosed\n")
    proc = pending(path)
    assert proc.returncode == 78
    assert f"{path}:" in proc.stderr and "not valid YAML" in proc.stderr


@pytest.mark.slow
def test_bad_certificate_names_the_file(stack: object, thing: Thing, tmp_path: Path) -> None:
    impostor = thing.stack.pki.foreign_client("cli-impostor")
    data = yaml.safe_load(thing.config_path.read_text())
    data["mqtt"].update(cert=str(impostor.cert), key=str(impostor.key), connect_timeout="60s")
    path = tmp_path / "impostor.yaml"
    path.write_text(yaml.safe_dump(data))
    proc = pending(path)
    assert proc.returncode == 69
    assert proc.stderr.startswith("CertificateValidationException: ")
    assert str(impostor.cert) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
