"""Every journal state against every cloud state: recovery's decision table."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.claims import REPLACED
from agent.config import Config, HandlerConfig, MqttConfig
from agent.jobs.shapes import TERMINAL_STATUSES
from agent.journal import Record
from agent.recovery import Machine, plan_recovery


class FakeMachine(Machine):
    def __init__(self, config: Config, boot: str | None = "boot-1", alive: bool = False) -> None:
        super().__init__(config)
        self.boot, self.is_alive = boot, alive

    def boot_id(self) -> str | None:
        return self.boot

    def alive(self, pid: int | None, start: int | None) -> bool:
        return self.is_alive and pid is not None


def config(**handler: object) -> Config:
    return Config(thing_name="t", mqtt=MqttConfig(endpoint="e", cert=Path("c"), key=Path("k")),
                  handlers={"h": HandlerConfig(command=("/bin/true",), **handler)},  # type: ignore[arg-type]
                  max_attempts=3)


def record(state: str, attempts: int = 1, boot: str | None = "boot-1") -> Record:
    return Record("j", 1, "h", {"operation": "h"}, state, 2, 5, attempts, 77, 1234, boot, None,
                  0.0)


@pytest.mark.parametrize("cloud", sorted(TERMINAL_STATUSES | {"ResourceNotFound",
                                                              "TerminalStateReached", REPLACED}))
@pytest.mark.parametrize("state", ["claiming", "running", "rebooting", "finished"])
def test_ended_in_the_cloud_means_done_and_leftovers_are_stopped(state: str, cloud: str) -> None:
    cfg = config(idempotent=True)
    action = plan_recovery(record(state), (cloud, None), cfg, FakeMachine(cfg, alive=True))
    assert action.kind == "done" and action.kill_pid == 77


def test_claim_that_never_reached_the_service_is_forgotten() -> None:
    cfg = config()
    assert plan_recovery(record("claiming", 0), ("QUEUED", 1), cfg, FakeMachine(cfg)).kind == \
        "forget"


def test_claim_that_went_through_runs_for_the_first_time() -> None:
    cfg = config()
    action = plan_recovery(record("claiming", 0), ("IN_PROGRESS", 2), cfg, FakeMachine(cfg))
    assert (action.kind, action.version) == ("run", 2)


@pytest.mark.parametrize(("idempotent", "attempts", "kind", "reason"), [
    (True, 1, "run", None),
    (True, 2, "run", None),
    (True, 3, "report", "crash loop: the agent stopped 3 times"),
    (False, 1, "report", "interrupted: the agent restarted while the handler ran"),
    (False, 3, "report", "crash loop"),
])
def test_interrupted_handler(idempotent: bool, attempts: int, kind: str,
                             reason: str | None) -> None:
    cfg = config(idempotent=idempotent)
    action = plan_recovery(record("running", attempts), ("IN_PROGRESS", 3), cfg,
                           FakeMachine(cfg, alive=True))
    assert action.kind == kind
    assert action.kill_pid == 77  # never two copies of a handler
    if reason:
        assert action.status == "FAILED" and action.details["reason"].startswith(reason)


def test_finished_is_reported_never_rerun() -> None:
    cfg = config(idempotent=True)
    action = plan_recovery(record("finished"), ("IN_PROGRESS", 4), cfg, FakeMachine(cfg))
    assert (action.kind, action.status, action.version) == ("report", None, 4)


@pytest.mark.parametrize(("boot", "verify", "kind", "status"), [
    ("boot-2", False, "report", "SUCCEEDED"),
    ("boot-2", True, "verify", None),
    ("boot-1", False, "report", "FAILED"),
    ("boot-1", True, "report", "FAILED"),
    (None, False, "report", "FAILED"),
])
def test_reboot(boot: str | None, verify: bool, kind: str, status: str | None) -> None:
    cfg = config(verify=("/bin/true",) if verify else None)
    action = plan_recovery(record("rebooting"), ("IN_PROGRESS", 5), cfg,
                           FakeMachine(cfg, boot=boot))
    assert (action.kind, action.status) == (kind, status)


def test_start_time_tells_our_process_from_a_reused_pid() -> None:
    import os

    me = Machine.start_time(os.getpid())
    assert isinstance(me, int)
    machine = Machine(config())
    assert machine.alive(os.getpid(), me)
    assert not machine.alive(os.getpid(), me + 1)  # same pid, another process
    assert not machine.alive(None, me) and Machine.start_time(2**22 + 12345) is None
