"""The tier's skip decision, without booting anything (runs on any machine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.systemd import machine


def test_not_root_is_a_skip_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine.os, "geteuid", lambda: 1000)
    assert "needs root" in (machine.unavailable() or "")


def test_no_namespaces_is_a_skip_reason_with_unshares_words(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "unshare"
    fake.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(machine.os, "geteuid", lambda: 0)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    reason = machine.unavailable() or ""
    assert "cannot create namespaces" in reason
    assert "Operation not permitted" in reason


def test_a_capable_root_machine_is_not_skipped(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    fake = tmp_path / "unshare"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setattr(machine.os, "geteuid", lambda: 0)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert machine.unavailable() is None
