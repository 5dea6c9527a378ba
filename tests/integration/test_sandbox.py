"""The README's first command, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import check_files, load_config

pytestmark = pytest.mark.broker


def test_sandbox_once_runs_the_demo_job_and_command_end_to_end(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "agent", "sandbox", "--dir", str(tmp_path),
                           "--once"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "job demo-1 ended SUCCEEDED" in proc.stdout
    assert "hello: from the sandbox" in proc.stdout  # the example handler really ran
    assert "command demo-hello ended SUCCEEDED" in proc.stdout  # and a command too
    assert "hello: from a command" in proc.stdout
    assert "sandbox: OK" in proc.stdout
    # What it leaves behind works with every --config command.
    config = load_config(tmp_path / "agent.yaml")
    assert check_files(config) == []
    assert set(config.handlers) == {"run-script", "download"}
    assert config.commands.enabled
    info = json.loads((tmp_path / "sandbox.json").read_text())
    assert info["thing_name"] == config.thing_name
    assert info["mqtt"]["port"] == config.mqtt.port
    assert (tmp_path / "state" / "logs" / "demo-1.1.log").exists()
    # The inspection commands work on it; it wrote metrics for node exporter.
    jobs = subprocess.run([sys.executable, "-m", "agent", "jobs", "--json", "--config",
                           str(tmp_path / "agent.yaml")], capture_output=True, text=True,
                          timeout=60)
    assert [(j["jobId"], j["status"]) for j in json.loads(jobs.stdout)] == [
        ("demo-1", "SUCCEEDED")]
    metrics = (tmp_path / "metrics" / "iot-jobs-agent.prom").read_text()
    assert 'iot_jobs_agent_jobs_total{outcome="succeeded"} 1' in metrics
