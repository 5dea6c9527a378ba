"""Claim decisions: which execution a journal record belongs to, and what a listed one means."""

from __future__ import annotations

from typing import Any

import pytest

from agent.claims import (
    DESCRIBE_ATTEMPTS,
    LISTED_MAX,
    InProgress,
    Notice,
    Queued,
    Trouble,
    document_problem,
    identity,
    in_progress_verdict,
    next_notice,
    notify_notice,
    queued_verdict,
    same_execution,
)
from agent.journal import Record

STATES = ["claiming", "running", "rebooting", "finished", "done"]


def record(state: str = "done", *, version: int = 3, queued_at: int | None = 100,
           attempts: int = 1, result: dict[str, Any] | None = None) -> Record:
    if state in ("finished", "done") and attempts and result is None:
        result = {"status": "SUCCEEDED", "details": {}}
    return Record("j", 1, "h", {"operation": "h"}, state, version, 5, attempts, None, None, None,
                  result, 0.0, queued_at)


def summary(queued_at: int = 100, version: int = 1) -> dict[str, Any]:
    return {"jobId": "j", "queuedAt": queued_at, "lastUpdatedAt": queued_at,
            "versionNumber": version, "executionNumber": 1}


def test_identity_is_job_number_and_queued_at() -> None:
    assert identity(summary(123)) == ("j", 1, 123)
    assert identity({"jobId": "j", "executionNumber": 2}) == ("j", 2, None)


@pytest.mark.parametrize(("record_queued", "record_version", "cloud_queued", "cloud_version",
                          "same"), [
    (100, 3, 100, 3, True),      # the execution we know
    (100, 3, 100, 5, True),      # it moved on since (the cloud ended it, say)
    (100, 3, 200, 3, False),     # queued at another time: another execution
    (100, 3, 100, 1, False),     # versions never go down: another one, same second
    (None, 3, 200, 1, False),    # schema 1 record: the version alone decides
    (None, 3, 200, 3, True),     # ... and cannot tell this one apart (documented limit)
    (100, 1, 100, 1, True),      # a claim's record against the execution it claims
    (100, 3, None, None, True),  # nothing to compare: assume it is ours
])
def test_same_execution(record_queued: int | None, record_version: int,
                        cloud_queued: int | None, cloud_version: int | None,
                        same: bool) -> None:
    rec = record(version=record_version, queued_at=record_queued)
    assert same_execution(rec, cloud_queued, cloud_version) is same


def test_queued_without_a_record_is_new_work() -> None:
    assert queued_verdict(None, summary(), busy=False) is Queued.CLAIM


@pytest.mark.parametrize("state", STATES)
def test_queued_reused_job_id_is_new_work_whatever_the_old_state(state: str) -> None:
    assert queued_verdict(record(state), summary(queued_at=200), busy=False) is Queued.REPLACE
    # Still running (or being reported) here: that one is stopped first, then this one claimed.
    assert queued_verdict(record(state), summary(queued_at=200), busy=True) is Queued.STOP_OLD


def test_queued_reused_in_the_same_second_is_told_apart_by_its_version() -> None:
    assert queued_verdict(record("done", version=3), summary(version=1), busy=False) is \
        Queued.REPLACE


def test_migrated_record_is_told_apart_by_its_version() -> None:
    old = record("done", version=3, queued_at=None)
    assert queued_verdict(old, summary(queued_at=999, version=1), busy=False) is Queued.REPLACE


def test_queued_same_execution_in_claiming_is_settled() -> None:
    assert queued_verdict(record("claiming", version=1, attempts=0), summary(),
                          busy=False) is Queued.SETTLE


@pytest.mark.parametrize("state", ["running", "rebooting", "finished", "done"])
def test_queued_same_execution_already_claimed_is_never_claimed_twice(state: str) -> None:
    rec = record(state, version=1)
    assert queued_verdict(rec, summary(version=1), busy=False) is Queued.OURS
    assert queued_verdict(rec, summary(version=1), busy=True) is Queued.OURS


def test_queued_same_identity_that_never_ran_may_be_taken() -> None:
    """Claim refused as gone (deleted), nothing ran, nothing reported: listed QUEUED again in
    the same second, it is a re-created job, and taking it cannot run anything twice."""
    never = record("done", version=1, attempts=0, result=None)
    assert queued_verdict(never, summary(version=1), busy=False) is Queued.REPLACE


def test_in_progress_verdicts() -> None:
    assert in_progress_verdict(None, summary(version=2), busy=False) is InProgress.UNKNOWN
    assert in_progress_verdict(None, summary(version=2), busy=True) is InProgress.OURS
    for state in STATES:
        rec = record(state, version=2)
        assert in_progress_verdict(rec, summary(version=2), busy=False) is InProgress.OURS
        assert in_progress_verdict(rec, summary(queued_at=200, version=2), busy=False) is \
            InProgress.REPLACE_UNKNOWN
        assert in_progress_verdict(rec, summary(queued_at=200, version=2), busy=True) is \
            InProgress.STOP_OLD


def test_trouble_counts_to_the_limit_then_forgets_unlisted() -> None:
    trouble = Trouble()
    bad, good = ("bad", 1, 10), ("good", 1, 11)
    for attempt in range(1, DESCRIBE_ATTEMPTS):
        assert trouble.strike(bad) == attempt and not trouble.exhausted(bad)
    trouble.strike(bad)
    assert trouble.exhausted(bad) and not trouble.exhausted(good)
    trouble.keep_only([good])
    assert not trouble.exhausted(bad) and trouble.strikes == {}


def test_trouble_warns_once_per_execution_and_reason() -> None:
    trouble = Trouble()
    bad = ("bad", 1, 10)
    assert trouble.first_warning(bad, "x") and not trouble.first_warning(bad, "x")
    assert trouble.first_warning(bad, "y")
    assert trouble.first_warning(("bad", 1, 20), "x")  # another execution of the same key
    trouble.keep_only([])
    assert trouble.first_warning(bad, "x")  # listed again later: a fresh reason to say so


def test_troubled_executions_go_last_in_service_order() -> None:
    trouble = Trouble()
    listed = [{"jobId": f"j{i}", "executionNumber": 1, "queuedAt": i} for i in range(4)]
    trouble.strike(("j0", 1, 0))
    trouble.strike(("j2", 1, 2))
    assert [s["jobId"] for s in trouble.order(listed)] == ["j1", "j3", "j0", "j2"]


@pytest.mark.parametrize(("text", "problem"), [
    ('{"operation": "ok", "s": "\\ud800"}', "lone UTF-16 surrogate"),
    ('{"operation": "ok", "s": "\\udc00 and more"}', "lone UTF-16 surrogate"),
    ('{"operation": "ok", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ('{"operation": "ok", "s": "\\ud83d\\ude00"}', None),  # a pair is one code point
    ('{"operation": "ok", "x": ' + "[" * 100 + "]" * 100 + "}", None),
    ("not json", None),  # plan_job's to say, in its own words
    (None, None),
])
def test_document_problem(text: str | None, problem: str | None) -> None:
    found = document_problem(text)
    assert (found is None) if problem is None else (found is not None and problem in found)


# ---------------------------------------------------------------------- notifications (issue 12)

def execution(job: str = "q", number: int = 1, *, status: str = "QUEUED", queued_at: int = 100,
              document: str | None = '{"operation": "h"}') -> dict[str, Any]:
    out: dict[str, Any] = {"jobId": job, "executionNumber": number, "status": status,
                           "queuedAt": queued_at, "versionNumber": 1}
    if document is not None:
        out["jobDocument"] = document
    return out


def listed(*executions: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    jobs: dict[str, list[dict[str, Any]]] = {}
    for e in executions:
        jobs.setdefault(e["status"], []).append(
            {k: v for k, v in e.items() if k not in ("status", "jobDocument")})
    return jobs


def test_notify_next_with_a_new_queued_head_is_claimed_from_the_message() -> None:
    assert next_notice(execution(), held={}, running=[], free=1) is Notice.CLAIM
    assert next_notice(execution(), held={}, running=[], free=0) is Notice.DEFER


def test_notify_next_for_what_is_held_here_asks_nothing() -> None:
    held = {("q", 1): 100}
    assert next_notice(execution(), held=held, running=[("q", 1)], free=0) is Notice.NOTHING
    assert next_notice(execution(status="IN_PROGRESS"), held=held, running=[("q", 1)],
                       free=0) is Notice.NOTHING
    assert next_notice(execution(), held={("q", 1): None}, running=[], free=1) is Notice.NOTHING


def test_notify_next_for_a_reused_key_is_left_to_a_sync() -> None:
    assert next_notice(execution(queued_at=200), held={("q", 1): 100}, running=[("q", 1)],
                       free=1) is Notice.SYNC


def test_notify_next_that_contradicts_running_handlers_asks_a_sync() -> None:
    # The head is QUEUED (or nothing is pending) while a handler runs: the cloud ended it.
    assert next_notice(None, held={("r", 1): 5}, running=[("r", 1)], free=0) is Notice.SYNC
    assert next_notice(execution(), held={("r", 1): 5}, running=[("r", 1)],
                       free=1) is Notice.SYNC
    assert next_notice(None, held={}, running=[], free=1) is Notice.NOTHING
    # A concluding job (its handler ended) is held but no longer running.
    assert next_notice(None, held={("r", 1): 5}, running=[], free=1) is Notice.NOTHING


def test_notify_next_without_a_document_or_in_progress_unknown_syncs() -> None:
    assert next_notice(execution(document=None), held={}, running=[], free=1) is Notice.SYNC
    assert next_notice(execution(status="IN_PROGRESS"), held={}, running=[],
                       free=1) is Notice.SYNC


def test_notify_listing_only_the_new_head_waits_for_notify_next() -> None:
    assert notify_notice(listed(execution()), held={}, running=[], free=1) is Notice.NOTHING
    assert notify_notice({}, held={}, running=[], free=1) is Notice.NOTHING


def test_notify_listing_a_claimable_execution_notify_next_will_not_bring_syncs() -> None:
    ours = execution("r", status="IN_PROGRESS", queued_at=5)
    held = {("r", 1): 5}
    # Behind our running job: the head stays ours, no notify-next comes for q.
    assert notify_notice(listed(ours, execution()), held=held, running=[("r", 1)],
                         free=1) is Notice.SYNC
    # Second in line behind a new head.
    assert notify_notice(listed(execution("a"), execution("b")), held={}, running=[],
                         free=2) is Notice.SYNC


def test_notify_of_a_new_head_and_more_syncs_only_for_a_second_free_slot() -> None:
    """The head takes the one free slot (from notify-next, which may come after this notify);
    the others wait for the notification the end of a job brings."""
    jobs = listed(execution("a"), execution("b"), execution("c"))
    assert notify_notice(jobs, held={}, running=[], free=1) is Notice.NOTHING
    assert notify_notice(jobs, held={}, running=[], free=2) is Notice.SYNC
    many = listed(*[execution(f"q{i}") for i in range(LISTED_MAX)])
    assert notify_notice(many, held={}, running=[], free=1) is Notice.NOTHING


def test_notify_sent_before_our_final_status_leaves_the_head_to_notify_next() -> None:
    """A notify listing our ended execution IN_PROGRESS (sent before our final update was
    applied) and a full queue behind it: the first QUEUED is the head now."""
    ended = execution("e", status="IN_PROGRESS", queued_at=5)
    jobs = listed(ended, *[execution(f"q{i}") for i in range(LISTED_MAX - 1)])
    held = {("e", 1): 5}
    assert notify_notice(jobs, held=held, running=[], free=1,
                         ended=[("e", 1)]) is Notice.NOTHING
    assert notify_notice(jobs, held=held, running=[], free=1) is Notice.SYNC


def test_notify_without_a_free_slot_waits_for_the_notification_a_slot_brings() -> None:
    ours = execution("r", status="IN_PROGRESS", queued_at=5)
    assert notify_notice(listed(ours, execution()), held={("r", 1): 5}, running=[("r", 1)],
                         free=0) is Notice.NOTHING


def test_notify_that_contradicts_what_is_held_syncs() -> None:
    ours = execution("r", status="IN_PROGRESS", queued_at=5)
    # Our running job is no longer listed: canceled?
    assert notify_notice(listed(execution()), held={("r", 1): 5}, running=[("r", 1)],
                         free=0) is Notice.SYNC
    # An IN_PROGRESS execution this device does not hold.
    assert notify_notice(listed(ours), held={}, running=[], free=1) is Notice.SYNC
    # Our key, another execution.
    assert notify_notice(listed(execution("r", queued_at=9)), held={("r", 1): 5}, running=[],
                         free=0) is Notice.SYNC


def test_notify_with_a_full_list_and_a_free_slot_syncs() -> None:
    many = [execution(f"q{i}") for i in range(LISTED_MAX)]
    held = {("q0", 1): 100}
    assert notify_notice(listed(*many), held=held, running=[], free=1) is Notice.SYNC
    assert notify_notice(listed(*many), held=held, running=[], free=0) is Notice.NOTHING
