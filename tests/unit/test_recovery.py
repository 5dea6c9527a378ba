"""Every journal state against every cloud state: recovery's decision table, for the native
form's one step and for plans of several steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.claims import REPLACED
from agent.config import Config, HandlerConfig, MqttConfig
from agent.documents import Plan, Step, plan_document
from agent.jobs.shapes import TERMINAL_STATUSES
from agent.journal import Record, StepRecord
from agent.recovery import Action, Machine, plan_recovery


class FakeMachine(Machine):
    def __init__(self, config: Config, boot: str | None = "boot-1", alive: bool = False) -> None:
        super().__init__(config)
        self.boot, self.is_alive = boot, alive

    def boot_id(self) -> str | None:
        return self.boot

    def alive(self, pid: int | None, start: int | None, handler: object = None) -> bool:
        return self.is_alive and pid is not None


def config(**handler: object) -> Config:
    return Config(thing_name="t", mqtt=MqttConfig(endpoint="e", cert=Path("c"), key=Path("k")),
                  handlers={"h": HandlerConfig(command=("/bin/true",), **handler)},  # type: ignore[arg-type]
                  max_attempts=3)


def record(state: str, attempts: int = 1, boot: str | None = "boot-1") -> Record:
    return Record("j", 1, "h", {"operation": "h"}, state, 2, 5, attempts, 77, 1234, boot, None,
                  0.0)


def decide(rec: Record, cloud: tuple[str, int | None], cfg: Config, machine: Machine,
           plan: Plan | str | None = None, current: StepRecord | None = None) -> Action:
    """plan_recovery for the native document {"operation": "h"} unless a plan is given."""
    if plan is None:
        plan = plan_document(rec.document, cfg)
    return plan_recovery(rec, cloud, cfg, machine, plan, current)


def three_steps(**second: Any) -> Plan:
    """A Device Client plan: a script, then `second`, then a runCommand."""
    steps = (Step("Download", "script", ("/h/download-file.sh", ""), 60.0, rerun=True),
             Step(**{"name": "Middle", "kind": "script", "argv": ("/h/reboot.sh", ""),
                     "timeout": 60.0, "rerun": True, **second}),
             Step("Run", "command", ("/usr/bin/echo", "x"), 60.0))
    return Plan("device-client", steps, {"version": "1.0"})


@pytest.mark.parametrize("cloud", sorted(TERMINAL_STATUSES | {"ResourceNotFound",
                                                              "TerminalStateReached", REPLACED}))
@pytest.mark.parametrize("state", ["claiming", "running", "rebooting", "finished"])
def test_ended_in_the_cloud_means_done_and_leftovers_are_stopped(state: str, cloud: str) -> None:
    cfg = config(idempotent=True)
    action = decide(record(state), (cloud, None), cfg, FakeMachine(cfg, alive=True))
    assert action.kind == "done" and action.kill_pid == 77


def test_claim_that_never_reached_the_service_is_forgotten() -> None:
    cfg = config()
    assert decide(record("claiming", 0), ("QUEUED", 1), cfg, FakeMachine(cfg)).kind == \
        "forget"


def test_claim_that_went_through_runs_for_the_first_time() -> None:
    cfg = config()
    action = decide(record("claiming", 0), ("IN_PROGRESS", 2), cfg, FakeMachine(cfg))
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
    action = decide(record("running", attempts), ("IN_PROGRESS", 3), cfg,
                           FakeMachine(cfg, alive=True))
    assert action.kind == kind
    assert action.kill_pid == 77  # never two copies of a handler
    if reason:
        assert action.status == "FAILED" and action.details["reason"].startswith(reason)


def test_finished_is_reported_never_rerun() -> None:
    cfg = config(idempotent=True)
    action = decide(record("finished"), ("IN_PROGRESS", 4), cfg, FakeMachine(cfg))
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
    action = decide(record("rebooting"), ("IN_PROGRESS", 5), cfg,
                           FakeMachine(cfg, boot=boot))
    assert (action.kind, action.status) == (kind, status)


@pytest.mark.parametrize(("state", "attempts", "action"), [
    # step 2 asked for a reboot: the plan goes on with step 3, step 2 is done
    ("rebooting", 1, ("run", 2, 1, None)),
    # step 2 asked for the agent to restart: likewise, whatever the boot id
    ("restarting", 1, ("run", 2, 1, None)),
    # step 2 was running: a script runs again, from step 2, never step 1
    ("running", 1, ("run", 1, None, None)),
    ("running", 3, ("report", 0, None, "crash loop: the agent stopped 3 times")),
])
def test_plans_resume_at_the_interrupted_step(state: str, attempts: int,
                                              action: tuple[Any, ...]) -> None:
    cfg = config()
    current = StepRecord(1, "Middle", "running", attempts, None)
    got = decide(record(state, attempts=9), ("IN_PROGRESS", 5), cfg,
                 FakeMachine(cfg, boot="boot-2"), three_steps(), current)
    assert (got.kind, got.step, got.completed) == action[:3]
    if action[3]:
        assert got.status == "FAILED" and got.details["reason"].startswith(action[3])


def test_last_step_rebooted_or_restarted_means_succeeded() -> None:
    cfg = config()
    current = StepRecord(2, "Run", "running", 1, None)
    for state, reason in (("rebooting", "rebooted as the handler asked"),
                          ("restarting", "the agent restarted as the step asked")):
        got = decide(record(state), ("IN_PROGRESS", 5), cfg, FakeMachine(cfg, boot="boot-2"),
                     three_steps(), current)
        assert (got.kind, got.status, got.details["reason"]) == ("report", "SUCCEEDED", reason)


def test_interrupted_command_or_plain_handler_step_is_never_run_twice() -> None:
    cfg = config()
    got = decide(record("running"), ("IN_PROGRESS", 5), cfg, FakeMachine(cfg),
                 three_steps(), StepRecord(2, "Run", "running", 1, None))
    assert got.kind == "report" and got.details["reason"] == (
        "interrupted: the agent restarted while step 3/3 (Run) ran; not run again because a "
        "runCommand step is never run twice")
    got = decide(record("running"), ("IN_PROGRESS", 5), cfg, FakeMachine(cfg),
                 three_steps(kind="handler", rerun=False), StepRecord(1, "Middle", "running", 1,
                                                                      None))
    assert got.details["reason"].endswith("(Middle) ran; not run again because the handler is "
                                          "not declared idempotent")


def test_a_reboot_step_with_verify_is_verified_before_the_plan_goes_on() -> None:
    cfg = config()
    got = decide(record("rebooting"), ("IN_PROGRESS", 5), cfg, FakeMachine(cfg, boot="boot-2"),
                 three_steps(verify=("/bin/true",)), StepRecord(1, "Middle", "running", 1, None))
    assert (got.kind, got.step, got.completed) == ("verify", 1, None)


@pytest.mark.parametrize("state", ["claiming", "running", "rebooting", "restarting"])
def test_a_document_the_config_no_longer_runs_fails(state: str) -> None:
    cfg = config()
    got = decide(record(state), ("IN_PROGRESS", 5), cfg, FakeMachine(cfg, alive=True),
                 "no handler for operation 'h' on this device")
    assert (got.kind, got.status, got.kill_pid) == ("report", "FAILED", 77)
    assert got.details["reason"] == ("cannot resume this job: no handler for operation 'h' on "
                                     "this device")


def test_start_time_tells_our_process_from_a_reused_pid() -> None:
    import os

    me = Machine.start_time(os.getpid())
    assert isinstance(me, int)
    import sys

    from agent.procfs import process_cmdline
    from agent.recovery import Handler

    machine = Machine(config())
    mine = Handler(Path("/nowhere"), (tuple((process_cmdline(os.getpid()) or [sys.executable])
                                            [-1:]),))
    assert machine.alive(os.getpid(), me, mine)
    assert not machine.alive(os.getpid(), me + 1, mine)  # same pid, another process
    assert not machine.alive(None, me, mine) and Machine.start_time(2**22 + 12345) is None
    assert not machine.alive(os.getpid(), me, Handler(Path("/nowhere")))  # not ours to signal
