"""The reporter against a scripted Jobs client: versions, conflicts, retries, coalescing.

The integration tests drive the same code through the broker; these pin the corner cases that a
real service produces only by bad luck (a reply lost after the update was applied).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from agent.errors import (
    ConflictException,
    InvalidStateTransitionException,
    RequestTimeoutError,
    ThrottlingException,
)
from agent.reporter import Reporter


class ScriptedJobs:
    """Answers each update with the next scripted outcome (an exception or a state)."""

    def __init__(self, *outcomes: Any) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[dict[str, Any]] = []

    async def update_job_execution(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(kwargs)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return {"executionState": outcome}


def reporter(jobs: ScriptedJobs, version: int = 2) -> Reporter:
    return Reporter(jobs, "t", "j", 1, version, step_minutes=4,  # type: ignore[arg-type]
                    progress_interval=0.05)


def state(status: str, version: int, details: dict[str, str] | None = None) -> dict[str, Any]:
    return {"status": status, "statusDetails": details or {}, "versionNumber": version}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_final_update_carries_expected_version_and_no_step_timer() -> None:
    jobs = ScriptedJobs(state("SUCCEEDED", 3))
    r = reporter(jobs)
    assert run(r.finish("SUCCEEDED", {"reason": "exit code 0"})) is True
    call = jobs.calls[0]
    assert call["expectedVersion"] == 2 and call["stepTimeoutInMinutes"] is None
    assert call["executionNumber"] == 1 and call["includeJobExecutionState"] is True
    assert r.version == 3


def test_timed_out_update_that_was_applied_is_not_sent_twice(monkeypatch: Any) -> None:
    monkeypatch.setattr("agent.reporter.backoff", lambda *a, **k: 0.0)
    details = {"reason": "exit code 0"}
    jobs = ScriptedJobs(RequestTimeoutError("no reply"),
                        ConflictException("v", execution_state=state("SUCCEEDED", 3, details)))
    assert run(reporter(jobs).finish("SUCCEEDED", details)) is True
    assert len(jobs.calls) == 2  # the retry learned it had already been applied


def test_conflict_with_our_own_in_progress_resends_with_the_new_version() -> None:
    jobs = ScriptedJobs(ConflictException("v", execution_state=state("IN_PROGRESS", 4)),
                        state("FAILED", 5))
    r = reporter(jobs)
    assert run(r.finish("FAILED", {"reason": "exit code 1"})) is True
    assert [c["expectedVersion"] for c in jobs.calls] == [2, 4]


@pytest.mark.parametrize("outcome", [
    ConflictException("v", execution_state=state("CANCELED", 4)),
    ConflictException("v", execution_state=state("TIMED_OUT", 4)),
    InvalidStateTransitionException("no", execution_state=state("CANCELED", 4)),
])
def test_cloud_ended_execution_is_gone_and_never_overwritten(outcome: Exception) -> None:
    jobs = ScriptedJobs(outcome)
    r = reporter(jobs)
    assert run(r.finish("SUCCEEDED", {"reason": "x"})) is False
    assert r.gone.is_set() and len(jobs.calls) == 1


def test_throttling_is_retried_with_backoff(monkeypatch: Any) -> None:
    delays: list[float] = []

    def fake_backoff(attempt: int, low: float = 1.0, high: float = 60.0) -> float:
        delays.append(low)
        return 0.0

    monkeypatch.setattr("agent.reporter.backoff", fake_backoff)
    jobs = ScriptedJobs(ThrottlingException("slow down"), ThrottlingException("slow down"),
                        state("SUCCEEDED", 3))
    assert run(reporter(jobs).finish("SUCCEEDED", {"r": "x"})) is True
    assert len(jobs.calls) == 3 and delays == [2.0, 2.0]  # throttling waits longer


def test_final_gives_up_at_the_deadline(monkeypatch: Any) -> None:
    monkeypatch.setattr("agent.reporter.backoff", lambda *a, **k: 10.0)
    jobs = ScriptedJobs(RequestTimeoutError("no reply"))
    ok = run(reporter(jobs).finish("SUCCEEDED", {"r": "x"}, deadline=time.monotonic() + 1))
    assert ok is False and len(jobs.calls) == 1


def test_progress_is_coalesced_and_rate_limited() -> None:
    async def body() -> ScriptedJobs:
        jobs = ScriptedJobs(*(state("IN_PROGRESS", v) for v in range(3, 10)))
        r = reporter(jobs)
        task = asyncio.create_task(r.run())
        for i in range(20):  # a handler reporting far faster than progress_interval
            r.progress({"progress": str(i)})
        await asyncio.sleep(0.3)
        task.cancel()
        return jobs

    jobs = run(body())
    sent = [c["statusDetails"] for c in jobs.calls]
    assert sent[-1] == {"progress": "19"}  # the newest always wins
    assert len(sent) <= 3  # 20 reports, at most one per interval
    assert all(c["status"] == "IN_PROGRESS" and c["stepTimeoutInMinutes"] == 4
               for c in jobs.calls)
