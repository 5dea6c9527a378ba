"""The cloud is the truth (issue 10): reused job ids, a state_dir reused for another thing, bad
documents that must not hold up the queue, and our own final update never mistaken for the
cloud ending a job. Real agent process, real handlers, real broker, emulator.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.sandbox.service import DELETION_SECONDS, Rejection
from tests.conftest import Thing
from tests.integration.agent_harness import AgentProcess, live_group_members, write_handler
from tests.integration.test_faults import gated, statuses_sent, wait_for

pytestmark = pytest.mark.broker

UNREADABLE = "the job document could not be read: "


@pytest.fixture(autouse=True)
def open_the_gate(tmp_path: Path) -> Iterator[None]:
    """Whatever a test's outcome, let a gated handler it started finish: a failing test must not
    leave a handler polling for its gate after the agent is gone."""
    yield
    (tmp_path / "gate").touch()


def counting(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    """A handler that records the job id of each run."""
    runs = tmp_path / "runs"
    path = write_handler(tmp_path / "handlers", "ok.sh", f"echo $JOB_ID >> {runs}\n")
    return {"ok": {"command": [str(path)]}}, runs


def recreate(thing: Thing, job: str, document: dict[str, Any]) -> None:
    """Create ``job`` again once its deletion has completed: the id stays taken while the job
    is DELETION_IN_PROGRESS (the sandbox's ``DELETION_SECONDS``, as in AWS)."""
    def created() -> bool:
        try:
            thing.emulator.create_job(job, [thing.name], document)
        except Rejection as rejection:
            if rejection.code != "ResourceAlreadyExists":
                raise
            return False
        return True

    wait_for(created, timeout=DELETION_SECONDS + 10, what=f"{job}'s deletion to complete")


def handler_running(thing: Thing, agent: AgentProcess, job: str, pidfile: Path) -> int:
    """Once the agent is ready, queue ``job`` for the gated handler; its pid once it runs."""
    agent.wait_ready()
    thing.emulator.create_job(job, [thing.name], {"operation": "work"})
    wait_for(pidfile.exists, what="handler start")
    return int(pidfile.read_text())


def journal_rows(agent: AgentProcess, sql: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(agent.dir / "state" / "journal.db")
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


# ---------------------------------------------------------------------- reused job ids

def test_job_deleted_and_recreated_with_the_same_id_runs_again(thing: Thing,
                                                              tmp_path: Path) -> None:
    h, runs = counting(tmp_path)
    job = thing.j("reused")
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent", h) as agent:
        agent.wait_ready()
        thing.emulator.create_job(job, [thing.name], {"operation": "ok"})
        first = agent.wait_status(job)
        thing.emulator.delete_job(job)
        recreate(thing, job, {"operation": "ok"})
        assert thing.emulator.execution(job, thing.name)["executionNumber"] == 1  # reused
        second = agent.wait_status(job)
        agent.wait_log("job id reused: kept the earlier execution as history", 10)
        assert agent.stop() == 0
    assert first["status"] == second["status"] == "SUCCEEDED"
    assert runs.read_text().split() == [job, job]
    rows = journal_rows(agent, "SELECT state, archived_at IS NOT NULL, queued_at FROM "
                               "executions ORDER BY id")
    assert [r[:2] for r in rows] == [("done", 1), ("done", 0)]
    assert rows[1][2] == second["queuedAt"]
    logs = sorted(p.name for p in (agent.dir / "state" / "logs").iterdir())
    assert logs == [f"{job}.1.log", f"{job}.1@1.log"]  # the old run's log kept under its own


def test_job_deleted_while_running_and_recreated_stops_the_old_run(thing: Thing,
                                                                  tmp_path: Path) -> None:
    h, runs, gate, pidfile = gated(tmp_path)
    job = thing.j("replaced")
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent", h) as agent:
        first_pid = handler_running(thing, agent, job, pidfile)
        pidfile.unlink()
        # Deleted (force: it runs), then created again as soon as the id is free.
        thing.emulator.delete_job(job, force=True)
        recreate(thing, job, {"operation": "work"})
        wait_for(pidfile.exists, what="the new execution's handler start")
        assert live_group_members(first_pid) == []  # the deleted execution's run was stopped
        gate.touch()
        execution = agent.wait_status(job)
        assert agent.stop() == 0
    assert execution["status"] == "SUCCEEDED"
    assert runs.read_text().splitlines() == ["run", "run"]
    assert statuses_sent(agent).count("SUCCEEDED") == 1


def test_job_recreated_while_the_agent_was_down_is_not_reported_for_the_old_one(
        thing: Thing, tmp_path: Path) -> None:
    """Killed while a (non-idempotent) handler ran; meanwhile the job was deleted and created
    again under its id. Recovery must not end the new execution FAILED "interrupted"."""
    h, runs, gate, pidfile = gated(tmp_path)
    job = thing.j("down")
    agent = AgentProcess(thing.stack, thing.name, tmp_path / "agent", h)
    with agent:
        first_pid = handler_running(thing, agent, job, pidfile)
        agent.kill()
        thing.emulator.delete_job(job, force=True)
        recreate(thing, job, {"operation": "work"})
        sent_before = len(agent.updates())
        gate.touch()
        agent.start()
        execution = agent.wait_status(job)
        assert live_group_members(first_pid) == []
        assert agent.stop() == 0
    assert execution["status"] == "SUCCEEDED"
    assert "cloud=Replaced cloud_version=None action=done" in agent.log()
    new_updates = agent.updates()[sent_before:]
    assert [u["executionState"]["status"] for u in new_updates if "executionState" in u] == [
        "IN_PROGRESS", "SUCCEEDED"]
    assert runs.read_text().splitlines() == ["run", "run"]


# ---------------------------------------------------------------------- state_dir reuse

def test_state_dir_reused_for_another_thing_starts_a_fresh_journal(thing: Thing,
                                                                  tmp_path: Path) -> None:
    h, runs = counting(tmp_path)
    other = f"{thing.name[:40]}-other"
    thing.stack.thing(other)
    job = thing.j("shared")  # one job for both things: the same (jobId, executionNumber)
    directory = tmp_path / "agent"
    with AgentProcess(thing.stack, thing.name, directory, h) as first:
        first.wait_ready()
        thing.emulator.create_job(job, [thing.name, other], {"operation": "ok"})
        first.wait_status(job)
        assert first.stop() == 0
    with AgentProcess(thing.stack, other, directory, h) as second:  # same state_dir
        second.wait_ready()
        execution = second.wait_status(job)
        assert second.stop() == 0
    assert execution["status"] == "SUCCEEDED"
    assert runs.read_text().split() == [job, job]
    state = directory / "state"
    aside = [p for p in state.glob("journal.db.previous-*")
             if not p.name.endswith(("-wal", "-shm"))]
    assert len(aside) == 1
    lines = [line for line in second.log().splitlines() if "moved aside" in line]
    assert len(lines) == 1 and "WARNING" in lines[0] and str(aside[0]) in lines[0]
    assert f"thing={thing.name}" in lines[0] and f"thing={other}" in lines[0]
    meta = dict(journal_rows(second, "SELECT key, value FROM meta"))
    assert meta["thing_name"] == other and meta["schema"] == "2"


# ---------------------------------------------------------------------- bad documents

@pytest.fixture
def deep_documents() -> Iterator[None]:
    """The emulator runs in this process and copies documents recursively; let it hold ones
    deeper than Python's default limit (the agent, a separate process, keeps the default)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20_000))
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


BAD_DOCUMENTS = {
    # 990 levels, 2.3 KB of valid JSON: the reply arrives, Python's json cannot parse it.
    "deep": ({"operation": "ok", "deep": nested(990)}, "unreadable"),
}


@pytest.mark.parametrize("case", sorted(BAD_DOCUMENTS))
def test_bad_document_is_rejected_and_never_holds_up_the_next_job(
        thing: Thing, tmp_path: Path, case: str, deep_documents: None) -> None:
    h, runs = counting(tmp_path)
    document, how = BAD_DOCUMENTS[case]
    if case == "deep":
        assert len(json.dumps(document, separators=(",", ":"))) < 2500
    bad, good = thing.j(f"bad-{case}"), thing.j(f"good-{case}")
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent", h) as agent:
        agent.wait_ready()
        thing.emulator.create_job(bad, [thing.name], document)
        thing.emulator.create_job(good, [thing.name], {"operation": "ok"})
        done = agent.wait_status(good, timeout=30)
        rejected = agent.wait_status(bad, timeout=60)
        assert agent.stop() == 0
    assert done["status"] == "SUCCEEDED"
    assert rejected["status"] == "REJECTED"
    reason = rejected["statusDetails"]["reason"]
    assert reason.startswith(UNREADABLE) and how in reason
    assert runs.read_text().split() == [good]
    if how == "no reply":
        # The good job did not wait for the bad one's attempts to run out.
        assert done["lastUpdatedAt"] <= rejected["lastUpdatedAt"]
    assert "sync failed" not in agent.log()


def test_lone_surrogate_is_rejected_and_never_holds_up_the_next_job(
        thing: Thing, tmp_path: Path) -> None:
    """``"\\ud800"`` made awscrt's request-response client drop the describe reply, so every
    request timed out and the queue stalled. The Jobs client reads replies itself now, so the
    document arrives; a lone surrogate is not Unicode (no handler could be given it as UTF-8),
    so that execution alone is REJECTED and the job behind it runs."""
    h, runs = counting(tmp_path)
    odd, good = thing.j("surrogate"), thing.j("after-surrogate")
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent", h) as agent:
        agent.wait_ready()
        thing.emulator.create_job(odd, [thing.name], {"operation": "ok", "text": "\ud800"})
        thing.emulator.create_job(good, [thing.name], {"operation": "ok"})
        assert agent.wait_status(good, timeout=30)["status"] == "SUCCEEDED"
        rejected = agent.wait_status(odd, timeout=30)
        assert agent.stop() == 0
    assert rejected["status"] == "REJECTED"
    reason = rejected["statusDetails"]["reason"]
    assert reason.startswith(UNREADABLE) and "surrogate" in reason
    assert runs.read_text().split() == [good]
    assert "sync failed" not in agent.log()


# ---------------------------------------------------------------------- our own final update

def test_final_update_whose_reply_is_lost_is_not_mistaken_for_a_cloud_end(
        thing: Thing, tmp_path: Path) -> None:
    """Issue 10 item 5: the final update is applied and the execution leaves the pending list
    (a notify rings, a sync runs) before the agent hears that it was accepted. That sync must
    not call it "ended in the cloud"."""
    h, runs, gate, pidfile = gated(tmp_path)
    job = thing.j("late-reply")
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent", h) as agent:
        handler_running(thing, agent, job, pidfile)
        thing.emulator.drop(1, {"update"}, what="reply")  # the final update's reply is lost
        gate.touch()
        execution = agent.wait_status(job)
        agent.wait_log("status accepted job_id=", 30)  # the retry finds it already applied
        assert agent.stop() == 0
    assert execution["status"] == "SUCCEEDED"
    assert "ended in the cloud" not in agent.log()
    assert runs.read_text().splitlines() == ["run"]
