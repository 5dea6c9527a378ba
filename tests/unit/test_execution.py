"""What a step's end means for its plan, and what the job reports at the end."""

from __future__ import annotations

from typing import Any

import pytest

from agent.documents import Plan, Step
from agent.execution import PlanRun, StepRun, final_report, handoff, progress, verdict
from agent.runner import RunResult


def result(code: int | None = 0, *, outcome: str | None = None, stdout: str = "",
           stderr: str = "", lines: int = 0) -> RunResult:
    outcome = outcome or ("succeeded" if code == 0 else "failed")
    reason = f"exit code {code}" if code is not None else outcome
    return RunResult(outcome, reason, code, None, 42, 0.5, stdout + stderr, "", 10,
                     stdout_tail=stdout, stderr_tail=stderr, stderr_lines=lines)


def step(name: str, kind: Any = "script", **extra: Any) -> Step:
    return Step(name, kind, (f"/h/{name}",), 60.0, **extra)


def plan(*steps: Step, form: Any = "device-client", **extra: Any) -> Plan:
    return Plan(form, steps, {}, **extra)


def ran(p: Plan, *results: RunResult, phase: str = "run") -> PlanRun:
    run = PlanRun()
    for i, r in enumerate(results):
        run.runs.append(StepRun(i, p.steps[i], phase, r, verdict(p.steps[i], r)))
    return run


@pytest.mark.parametrize(("kind", "phase", "code", "interrupted", "expected"), [
    ("handler", "run", 194, False, "reboot"),
    ("script", "run", 194, False, "reboot"),
    ("script", "run", 195, False, "restart"),
    ("command", "run", 194, False, None),  # a command's exit code is only an exit code
    ("program", "run", 195, False, None),
    ("script", "verify", 194, False, None),
    ("script", "run", 194, True, None),  # the agent stopped it: not a request
    ("script", "run", 0, False, None),
    ("script", "run", None, False, None),
])
def test_handoff(kind: Any, phase: str, code: int | None, interrupted: bool,
                 expected: str | None) -> None:
    assert handoff(step("s", kind), phase, result(code), interrupted) == expected


def test_progress_names_the_step_except_in_the_native_form() -> None:
    p = plan(step("A"), step("B"), step("C"))
    assert progress(p, 1) == {"step": "2/3", "stepName": "B"}
    assert progress(plan(step("A"), form="native"), 0) == {}


def test_native_final_report_is_todays() -> None:
    p = plan(step("h", "handler"), form="native")
    status, details = final_report(p, ran(p, result(0, stdout="hi\n")), None)
    assert status == "SUCCEEDED"
    assert set(details) == {"outcome", "reason", "exitCode", "durationSeconds", "outputHead"}


def test_failed_step_ends_the_plan_and_is_named() -> None:
    p = plan(step("Install"), step("Run", allow_stderr=1), step("Final"), final=True)
    status, details = final_report(p, ran(p, result(0), result(0, stderr="a\nb\n", lines=2)),
                                   None)
    assert status == "FAILED"
    assert details["reason"] == "2 lines on stderr; allowStdErr allows 1: b"
    assert (details["step"], details["stepName"]) == ("2/3", "Run")
    assert (details["failedStep"], details["failedStepName"]) == ("2/3", "Run")
    assert details["stderr"] == "a | b" and "stdout" not in details  # no includeStdOut


def test_failure_reason_ends_with_the_scripts_last_words() -> None:
    p = plan(step("Download"))
    failing = result(1, stderr="curl: (22)\ndownload refused: HTTP 403 Forbidden\n\n", lines=3)
    assert final_report(p, ran(p, failing), None)[1]["reason"] == \
        "exit code 1: download refused: HTTP 403 Forbidden"
    native = plan(step("h", "handler"), form="native")
    assert final_report(native, ran(native, failing), None)[1]["reason"] == "exit code 1"


def test_ignored_failure_goes_on_and_is_reported() -> None:
    p = plan(step("Optional", ignore_failure=True), step("Main"), include_stdout=True)
    run = ran(p, result(3, stderr="meh"), result(0, stdout="x" * 3000))
    assert [r.state for r in run.runs] == ["ignored", "succeeded"]
    status, details = final_report(p, run, None)
    assert status == "SUCCEEDED" and details["ignoredFailures"] == "1/2"
    assert "failedStep" not in details and "stderr" not in details  # Main printed none
    assert len(details["stdout"]) == 1024 and details["stdout"].startswith("\u2026")


def test_interrupted_plan_fails_with_the_reason() -> None:
    p = plan(step("A"), step("B"))
    status, details = final_report(p, ran(p, result(0), result(None, outcome="canceled")),
                                   "the agent was stopped")
    assert status == "FAILED" and details["reason"] == "interrupted: the agent was stopped"
    assert final_report(p, PlanRun(), "stop") == ("FAILED", {"reason": "interrupted: stop"})


def test_verify_phase_is_said() -> None:
    p = plan(step("Upgrade", "handler"), form="native")
    assert final_report(p, ran(p, result(0), phase="verify"), None)[1]["phase"] == \
        "verify after reboot"


def test_every_value_fits_the_service_limits() -> None:
    p = plan(step("S" * 128), include_stdout=True)
    noisy = "\x00\x1b[31m" + "é\n" * 5000
    _, details = final_report(p, ran(p, result(1, stdout=noisy, stderr=noisy, lines=5000)),
                              None)
    for value in details.values():
        assert 1 <= len(value) <= 1024 and value.isprintable()
