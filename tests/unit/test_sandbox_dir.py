"""Where `iot-jobs-agent sandbox` puts its files when no --dir is given."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.sandbox.demo import default_directory


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("HOME", str(home))
    return home


def test_a_safe_checkout_keeps_its_own_dot_sandbox(tmp_path: Path, home: Path) -> None:
    checkout = tmp_path / "checkout"
    checkout.mkdir(mode=0o755)
    assert default_directory(checkout) == checkout / ".sandbox"
    assert not (checkout / ".sandbox").exists()


def test_a_checkout_below_a_world_writable_directory_gets_a_private_one(
        tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # as /tmp
    checkout = shared / "checkout"
    checkout.mkdir(mode=0o755)
    chosen = default_directory(checkout)
    assert chosen.is_relative_to(home / ".cache" / "iot-jobs-agent" / "sandbox")
    assert chosen.is_dir()
    link = checkout / ".sandbox"
    assert link.is_symlink() and link.resolve() == chosen
    assert str(chosen) in capsys.readouterr().out
    # A second start reuses the same place and the same link.
    assert default_directory(checkout) == chosen
    assert link.resolve() == chosen


def test_an_old_real_dot_sandbox_is_left_alone(tmp_path: Path, home: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    checkout = shared / "checkout"
    (checkout / ".sandbox").mkdir(parents=True)
    (checkout / ".sandbox" / "keep").write_text("x")
    chosen = default_directory(checkout)
    assert chosen != checkout / ".sandbox"
    assert (checkout / ".sandbox" / "keep").read_text() == "x"
