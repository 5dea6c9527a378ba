"""The state file: how it is written, read, and how a reader tells a live agent from a dead one."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.errors import NotReadableError
from agent.files import write_atomic
from agent.procfs import boot_id, process_start_time
from agent.statefile import FORMAT, liveness, read_state

# --- write_atomic -------------------------------------------------------------------------


def test_write_atomic_replaces_whole_with_the_given_mode(tmp_path: Path) -> None:
    target = tmp_path / "status.json"
    old_umask = os.umask(0o077)
    try:
        write_atomic(target, b"one", 0o644)
        assert target.read_bytes() == b"one"
        assert stat.S_IMODE(target.stat().st_mode) == 0o644  # not narrowed by the umask
        inode = target.stat().st_ino
        write_atomic(target, b"two", 0o640)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert target.stat().st_ino != inode  # a new file renamed over: readers see old or new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]  # no temp left


def test_write_atomic_never_follows_a_planted_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / ".m.prom.tmp").symlink_to(victim)
    with pytest.raises(OSError):
        write_atomic(tmp_path / "m.prom", b"x")
    assert victim.read_text() == "precious"
    assert (tmp_path / ".m.prom.tmp").is_symlink()  # left for a person to look at


# --- read_state ----------------------------------------------------------------------------


def test_read_state(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    assert read_state(path) is None  # never written
    for junk in ("", "{", "[]", json.dumps({"format": FORMAT + 1})):
        path.write_text(junk)
        assert read_state(path) is None, junk  # half-written or foreign: no live agent
    path.write_text(json.dumps({"format": FORMAT, "pid": 1}))
    assert read_state(path) == {"format": FORMAT, "pid": 1}


def test_read_state_that_cannot_be_read_is_not_a_none(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    path.mkdir()  # EISDIR: something is there, we cannot tell what the agent is doing
    with pytest.raises(NotReadableError, match="cannot read the agent's state file"):
        read_state(path)


# --- liveness ------------------------------------------------------------------------------


def state(**fields: Any) -> dict[str, Any]:
    return {"format": FORMAT, "pid": 4242, "pid_start": 777, "boot_id": "boot-a",
            "phase": "running", "updated_at": 1_700_000_000.0, **fields}


def probe(table: dict[int, int]) -> Any:
    return lambda pid: table.get(pid)


@pytest.mark.parametrize(("data", "starts", "boot", "running", "why"), [
    (None, {}, "boot-a", False, "no state file"),
    (state(), {4242: 777}, "boot-a", True, "pid 4242"),
    (state(), {}, "boot-a", False, "the agent died: pid 4242 is gone"),
    (state(), {4242: 778}, "boot-a", False, "pid 4242 is now another process"),
    (state(), {4242: 777}, "boot-b", False, "the device restarted"),
    (state(phase="stopped", stopped_at=1_700_000_100.0), {4242: 777}, "boot-a", False,
     "stopped at 2023-11-14T22:15:00Z"),
    (state(pid=None), {}, "boot-a", False, "pid None is gone"),
    (state(pid=True), {1: 777}, "boot-a", False, "is gone"),  # a bool is not a pid
    (state(), {4242: 777}, None, True, "pid 4242"),  # boot id unknown: the start time decides
], ids=["none", "alive", "gone", "pid-reused", "rebooted", "stopped", "no-pid", "bool-pid",
        "no-boot-id"])
def test_liveness(data: dict[str, Any] | None, starts: dict[int, int], boot: str | None,
                  running: bool, why: str) -> None:
    verdict = liveness(data, start_time=probe(starts), current_boot=lambda: boot)
    assert verdict.running is running
    assert why in verdict.why


def test_liveness_against_real_processes() -> None:
    me = state(pid=os.getpid(), pid_start=process_start_time(os.getpid()), boot_id=boot_id())
    assert liveness(me).running
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    start = process_start_time(child.pid)
    child.wait()  # reaped: the pid is free again
    dead = state(pid=child.pid, pid_start=start, boot_id=boot_id())
    assert not liveness(dead).running
    # A zombie runs nothing: not running either (a killed agent before its parent reaps it).
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    start = process_start_time(zombie.pid)
    os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
    try:
        assert process_start_time(zombie.pid) is None
        assert not liveness(state(pid=zombie.pid, pid_start=start, boot_id=boot_id())).running
    finally:
        zombie.wait()
