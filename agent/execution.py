"""Running a plan, step by step: what each step's end means and what the job reports.

The dispatcher runs the steps of a :class:`~agent.documents.Plan` one after the other; these
are its decisions, kept apart from its I/O so they read (and are tested) as rules:

- a step's program that exits 194 or 195 hands the job over to the agent (reboot, restart the
  agent) instead of ending it; only handlers and handler scripts may, never a runCommand;
- the first step that fails without ``ignoreStepFailure`` ends the plan FAILED; a ``finalStep``
  is the last step, so it runs only when every step before it succeeded (or was ignored);
- the final statusDetails are today's keys for the last step that ran, plus, for plans from
  Device Client documents, which step that was and which one failed, and Device Client's own
  ``stdout``/``stderr`` keys (the last 1024 characters; stdout only with ``includeStdOut``); a
  failed step's ``reason`` ends with the last line it printed on stderr.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.documents import Plan, Step, Verdict, judge
from agent.recovery import REBOOT_EXIT_CODE, RESTART_EXIT_CODE
from agent.runner import RunResult, sanitize_detail, status_details

__all__ = ["PlanRun", "StepRun", "final_report", "handoff", "progress", "step_label",
           "verdict"]

_HANDOFFS = {REBOOT_EXIT_CODE: "reboot", RESTART_EXIT_CODE: "restart"}


@dataclass(frozen=True)
class StepRun:
    """One step as it ran."""

    index: int
    step: Step
    phase: str  # "run", or "verify" after a reboot the step asked for
    result: RunResult
    verdict: Verdict

    @property
    def state(self) -> str:
        """What the journal records: succeeded, failed, or ignored (failed, and allowed to)."""
        if self.verdict.ok:
            return "succeeded"
        return "ignored" if self.step.ignore_failure else "failed"


@dataclass
class PlanRun:
    """The steps of one plan that ran this time, and whether the last one handed over."""

    runs: list[StepRun] = field(default_factory=list)
    handoff: str | None = None  # "reboot" | "restart"

    @property
    def last(self) -> StepRun | None:
        return self.runs[-1] if self.runs else None

    @property
    def failed(self) -> StepRun | None:
        return next((r for r in self.runs if r.state == "failed"), None)


def step_label(plan: Plan, index: int) -> str:
    return f"{index + 1}/{len(plan.steps)}"


def progress(plan: Plan, index: int) -> dict[str, str]:
    """The IN_PROGRESS statusDetails that name the running step ({} for the native form, whose
    one step is the whole job)."""
    if not plan.reports_steps:
        return {}
    return {"step": step_label(plan, index), "stepName": plan.steps[index].name}


def handoff(step: Step, phase: str, result: RunResult, interrupted: bool) -> str | None:
    """"reboot" or "restart" when the step's exit code asks the agent for one."""
    if phase != "run" or interrupted or step.kind not in ("handler", "script"):
        return None
    return _HANDOFFS.get(result.exit_code) if result.exit_code is not None else None


def verdict(step: Step, result: RunResult) -> Verdict:
    return judge(step, result.outcome, result.reason, result.stderr_lines)


def final_report(plan: Plan, run: PlanRun,
                 interrupted: str | None) -> tuple[str, dict[str, str]]:
    """The final status and statusDetails of a plan that ran to its end (or was stopped)."""
    last = run.last
    if last is None:
        return "FAILED", {"reason": f"interrupted: {interrupted}" if interrupted
                          else "no step ran"}
    failed = run.failed
    status = "FAILED" if failed is not None or interrupted else "SUCCEEDED"
    reason = f"interrupted: {interrupted}" if interrupted else (
        last.verdict.reason if last.verdict.reason != last.result.reason else None)
    said = _last_line(last.result.stderr_tail)
    if plan.device_client and not interrupted and not last.verdict.ok and said:
        # A script's own words on why it failed ("HTTP 403 ... presigned URL has expired"),
        # where Device Client's dashboards show only "Job exited with status: 1".
        reason = f"{reason or last.result.reason}: {said}"
    details = status_details(last.result, extra={"reason": reason} if reason else None)
    if last.phase == "verify":
        details["phase"] = "verify after reboot"
    if plan.reports_steps:
        details.update(progress(plan, last.index))
        if failed is not None:
            details["failedStep"] = step_label(plan, failed.index)
            details["failedStepName"] = failed.step.name
        ignored = [step_label(plan, r.index) for r in run.runs if r.state == "ignored"]
        if ignored:
            details["ignoredFailures"] = sanitize_detail(", ".join(ignored))
    if plan.device_client:
        streams = [("stderr", last.result.stderr_tail)]
        if plan.include_stdout:
            streams.append(("stdout", last.result.stdout_tail))
        for key, text in streams:
            if value := sanitize_detail(text, "end"):
                details[key] = value
    return status, details


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""
