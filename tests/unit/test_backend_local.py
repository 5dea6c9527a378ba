"""The local execution backend with real processes: nothing a handler starts outlives its run.

Each handler leaves four processes behind in four ways: a ``setsid`` child, a child in the
background, a double-forked grandchild (its parent exits, so it is no longer below the
handler), and a double-forked ``setsid`` grandchild with an empty environment (it carries no
mark of the job at all). On today's main all four survive a normal exit, and the last three a
timeout or a cancellation. A process counts as gone when /proc no longer has it: the backend
also reaps the orphans it adopts.
"""

from __future__ import annotations

import asyncio
import os
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from agent import backends
from agent.backends.local import LocalBackend, _scan
from agent.runner import HandlerProcess, RunRequest, RunResult

LEFTOVERS = ("setsid", "background", "double", "bare")

HANDLER = """\
#!/bin/sh
quiet() { "$@" </dev/null >/dev/null 2>&1 3>&- ; }
quiet setsid sleep 300 &
echo $! > "$JOB_WORK_DIR/setsid.pid"
quiet sleep 301 &
echo $! > "$JOB_WORK_DIR/background.pid"
( quiet sleep 302 & echo $! > "$JOB_WORK_DIR/double.pid" )
( quiet env -i setsid sleep 303 & echo $! > "$JOB_WORK_DIR/bare.pid" )
echo ready
exec sleep "${1:-0}"
"""


def handler(tmp_path: Path) -> str:
    path = tmp_path / "leaves-children.sh"
    path.write_text(textwrap.dedent(HANDLER))
    path.chmod(0o755)
    return str(path)


def request(tmp_path: Path, *args: str, **kwargs: Any) -> RunRequest:
    fields: dict[str, Any] = {
        "job_id": "job-1", "execution_number": 3, "thing_name": "thing-1",
        "argv": [handler(tmp_path), *args], "document": {"operation": "x"},
        "work_dir": tmp_path / "work", "log_path": tmp_path / "job.log", "kill_grace": 2.0}
    fields.update(kwargs)
    return RunRequest(**fields)


def leftovers(work_dir: Path) -> dict[str, int]:
    """The pids the handler wrote, once all four are written."""
    deadline = time.monotonic() + 5
    while True:
        files = {name: work_dir / f"{name}.pid" for name in LEFTOVERS}
        if all(f.exists() and f.read_text().strip() for f in files.values()):
            return {name: int(f.read_text()) for name, f in files.items()}
        assert time.monotonic() < deadline, "the handler did not start its children"
        time.sleep(0.02)


def alive(pid: int) -> bool:
    """In /proc and not a zombie (a zombie runs nothing)."""
    proc = _scan().get(pid)
    return proc is not None and proc.state != "Z"


@pytest.fixture
def backend() -> LocalBackend:
    backend = LocalBackend()
    assert backend.subreaper
    return backend


def assert_all_gone(pids: dict[str, int]) -> None:
    left = {name: pid for name, pid in pids.items() if alive(pid)}
    assert not left, f"left running: {left}"


def test_normal_exit_leaves_nothing(tmp_path: Path, backend: LocalBackend) -> None:
    async def scenario() -> RunResult:
        return await HandlerProcess(request(tmp_path), backend=backend).wait()

    result = asyncio.run(scenario())
    assert (result.outcome, result.exit_code, result.output_head) == ("succeeded", 0, "ready\n")
    pids = leftovers(tmp_path / "work")
    assert_all_gone(pids)
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids.values()), "not reaped"


def test_timeout_leaves_nothing(tmp_path: Path, backend: LocalBackend) -> None:
    async def scenario() -> RunResult:
        return await HandlerProcess(request(tmp_path, "30", timeout=1.0),
                                    backend=backend).wait()

    result = asyncio.run(scenario())
    assert result.outcome == "timed_out"
    assert_all_gone(leftovers(tmp_path / "work"))


def test_cancel_leaves_nothing(tmp_path: Path, backend: LocalBackend) -> None:
    async def scenario() -> tuple[RunResult, dict[str, int]]:
        process = HandlerProcess(request(tmp_path, "30"), backend=backend)
        await process.start()
        pids = await asyncio.to_thread(leftovers, tmp_path / "work")
        assert all(alive(pid) for pid in pids.values())
        await process.cancel("canceled in the cloud")
        return await process.wait(), pids

    result, pids = asyncio.run(scenario())
    assert result.outcome == "canceled"
    assert_all_gone(pids)


def test_agent_stop_leaves_nothing(tmp_path: Path, backend: LocalBackend) -> None:
    """``close()`` (the agent's stop) with a run whose supervisor was torn down with the loop."""
    async def scenario() -> dict[str, int]:
        process = HandlerProcess(request(tmp_path, "30"), backend=backend)
        await process.start()
        pids = await asyncio.to_thread(leftovers, tmp_path / "work")
        await backend.close()
        await process.wait()
        return pids

    assert_all_gone(asyncio.run(scenario()))


def test_concurrent_runs_keep_each_others_processes(tmp_path: Path,
                                                    backend: LocalBackend) -> None:
    """A job that ends stops its own leftovers, never those of a job still running: the
    still-running one's marked children survive until it ends too."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()

    async def scenario() -> tuple[dict[str, int], dict[str, int], bool]:
        long = HandlerProcess(request(tmp_path / "b", "3", job_id="job-b",
                                      work_dir=tmp_path / "b" / "work"), backend=backend)
        await long.start()
        theirs = await asyncio.to_thread(leftovers, tmp_path / "b" / "work")
        short = HandlerProcess(request(tmp_path / "a", job_id="job-a",
                                       work_dir=tmp_path / "a" / "work"), backend=backend)
        await short.wait()
        ours = await asyncio.to_thread(leftovers, tmp_path / "a" / "work")
        kept = all(alive(theirs[name]) for name in ("setsid", "background", "double"))
        await long.wait()
        return ours, theirs, kept

    ours, theirs, kept = asyncio.run(scenario())
    # The unmarked one ("bare") of the short job may only die with the last job; the rest now.
    assert not any(alive(ours[name]) for name in ("setsid", "background", "double"))
    assert kept, "the running job's children were killed by another job's end"
    assert_all_gone(ours)
    assert_all_gone(theirs)


def test_the_default_backend_is_local_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    monkeypatch.setattr(backends, "_CURRENT", None)
    assert isinstance(backends.current(), LocalBackend)
    assert os.getpid() == backends.current()._me
