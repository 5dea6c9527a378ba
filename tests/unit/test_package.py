"""The package as a user meets it: public names, the command's help, lint cleanliness."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import agent
import agent.errors

ROOT = Path(__file__).resolve().parents[2]


def test_public_names_are_sorted_and_exported() -> None:
    for module in (agent, agent.errors):
        assert module.__all__ == sorted(module.__all__)
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"


def test_every_error_is_an_agent_error() -> None:
    for name in agent.errors.__all__:
        obj = getattr(agent.errors, name)
        if isinstance(obj, type):
            assert issubclass(obj, agent.errors.AgentError), name


def test_python_dash_m_agent_help() -> None:
    proc = subprocess.run([sys.executable, "-m", "agent", "--help"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0
    assert "pending" in proc.stdout and "sandbox" in proc.stdout


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.prefix) / "bin/ruff").exists(),
                    reason="ruff is part of the test extra")
def test_ruff_clean() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.prefix) / "bin/ruff")
    proc = subprocess.run([ruff, "check", "agent", "tests"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
