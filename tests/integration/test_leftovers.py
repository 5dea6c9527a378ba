"""No process a handler starts outlives its job, with the real agent outside systemd (the
local backend: the agent is a child subreaper). On today's main a ``setsid`` grandchild and a
child left in the background survive the job's end and the agent's stop."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import Thing
from tests.integration.agent_harness import AgentProcess, write_handler

pytestmark = pytest.mark.broker

BODY = """\
quiet() {{ "$@" </dev/null >/dev/null 2>&1 3>&- ; }}
quiet setsid sleep 300 &
echo $! > {pids}/setsid.pid
quiet sleep 301 &
echo $! > {pids}/background.pid
( quiet sleep 302 & echo $! > {pids}/double.pid )
echo '{{"step": "children started"}}' >&3
exec sleep "${{1:-0}}"
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def pids(directory: Path) -> dict[str, int]:
    deadline = time.monotonic() + 10
    while True:
        found = {f.stem: f.read_text().strip() for f in directory.glob("*.pid")}
        if len(found) == 3 and all(found.values()):
            return {name: int(pid) for name, pid in found.items()}
        assert time.monotonic() < deadline, f"children not started: {found}"
        time.sleep(0.05)


def gone(processes: dict[str, int], timeout: float = 5.0) -> dict[str, int]:
    """The processes still alive after ``timeout`` (empty: all gone)."""
    deadline = time.monotonic() + timeout
    while (left := {n: p for n, p in processes.items() if alive(p)}) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture
def handler(tmp_path: Path) -> tuple[dict[str, object], Path]:
    evidence = tmp_path / "pids"
    evidence.mkdir()
    path = write_handler(tmp_path / "handlers", "leaves.sh", BODY.format(pids=evidence))
    return {"leaves": {"command": [str(path)], "timeout": "3s"}}, evidence


@pytest.mark.parametrize("args, status", [([], "SUCCEEDED"), (["30"], "FAILED")],
                         ids=["normal-exit", "timeout"])
def test_nothing_outlives_the_job(thing: Thing, tmp_path: Path, handler: tuple, args: list,
                                  status: str) -> None:
    handlers, evidence = handler
    job = thing.j("leaves")
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent", handlers) as agent:
        agent.wait_ready()
        thing.emulator.create_job(job, [thing.name], {"operation": "leaves", "args": args})
        execution = agent.wait_status(job)
        assert execution["status"] == status, agent.log()
        left = gone(pids(evidence))
        assert agent.stop() == 0
    assert not left, f"survived the job: {left}\n{agent.log()}"


def test_nothing_outlives_a_canceled_job(thing: Thing, tmp_path: Path, handler: tuple) -> None:
    handlers, evidence = handler
    job = thing.j("cancel")
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent", handlers) as agent:
        agent.wait_ready()
        thing.emulator.create_job(job, [thing.name], {"operation": "leaves", "args": ["30"]})
        agent.wait_status(job, {"IN_PROGRESS"})
        children = pids(evidence)
        thing.emulator.cancel_job(job, force=True)
        agent.wait_log("handler stopped after cancellation")
        left = gone(children)
        assert agent.stop() == 0
    assert not left, f"survived the cancellation: {left}\n{agent.log()}"


def test_nothing_outlives_the_agents_stop(thing: Thing, tmp_path: Path, handler: tuple) -> None:
    handlers, evidence = handler
    job = thing.j("stop")
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent", handlers,
                      shutdown_grace="1s") as agent:
        agent.wait_ready()
        thing.emulator.create_job(job, [thing.name], {"operation": "leaves", "args": ["30"]})
        agent.wait_status(job, {"IN_PROGRESS"})
        children = pids(evidence)
        assert agent.stop() == 0
    left = gone(children)
    assert not left, f"survived the agent's stop: {left}\n{agent.log()}"
    assert thing.emulator.execution(job, thing.name)["status"] == "FAILED"
