"""The read-only journal queries (agent.inspect) against journals written by the real Journal.

Each journal here is built through :class:`agent.journal.Journal`'s own methods, so the queries
are checked against what the agent writes, not against rows made up for the test.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

import pytest

from agent.errors import NotReadableError, UnknownJobError
from agent.inspect import (
    JournalReader,
    copy_log,
    execution,
    executions,
    journal_size,
    open_executions,
    owed,
)
from agent.journal import Journal


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


async def build(path: Path) -> Clock:
    """A journal with one execution in each state the agent leaves behind."""
    clock = Clock()
    j = Journal(path, clock=clock)
    await j.open()
    try:
        # done, delivered: SUCCEEDED
        await j.claiming(("ok", 1), "echo", {"operation": "echo"}, 1, 5)
        await j.started(("ok", 1), 10, 100, "boot")
        clock.now += 2
        await j.finish(("ok", 1), "SUCCEEDED", {"reason": "exit code 0",
                                               "durationSeconds": "1.500"})
        clock.now += 30  # delivered later (offline for a while): finishedAt stays the finish
        for entry in await j.outbox(("ok", 1)):
            await j.delivered(entry, 3)
        # finished, status owed: FAILED
        clock.now += 10
        await j.claiming(("bad", 1), "broken", {"operation": "broken"}, 1, 5)
        await j.started(("bad", 1), 11, 101, "boot")
        clock.now += 1
        await j.finish(("bad", 1), "FAILED", {"reason": "exit code 3",
                                              "durationSeconds": "0.250"})
        # ended in the cloud while running: done, no result
        clock.now += 10
        await j.claiming(("gone", 1), "echo", {"operation": "echo"}, 1, 5)
        await j.started(("gone", 1), 12, 102, "boot")
        await j.done(("gone", 1))
        # a second execution of the same job, still running
        clock.now += 10
        await j.claiming(("ok", 2), "echo", {"operation": "echo", "args": ["s3cret"]}, 1, 5)
        await j.started(("ok", 2), 13, 103, "boot")
    finally:
        await j.close()
    return clock


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    path = tmp_path / "journal.db"
    asyncio.run(build(path))
    return path


def test_executions_newest_first_with_derived_status(journal: Path) -> None:
    with JournalReader(journal) as db:
        found = executions(db)
    assert [(e.job_id, e.execution_number, e.state, e.status) for e in found] == [
        ("ok", 2, "running", "IN_PROGRESS"),
        ("gone", 1, "done", None),
        ("bad", 1, "finished", "FAILED"),
        ("ok", 1, "done", "SUCCEEDED"),
    ]
    ok = found[-1]
    assert ok.started_at == 1_700_000_000.0
    assert ok.finished_at == 1_700_000_002.0  # the finish, not the (late) delivery
    assert ok.duration == 1.5 and ok.reason == "exit code 0" and not ok.owed
    bad = found[2]
    assert bad.owed and bad.reason == "exit code 3"
    assert "ended in the cloud" in (found[1].reason or "")
    assert found[0].active and found[0].finished_at is None and found[0].pid == 13


def test_filter_and_limit(journal: Path) -> None:
    with JournalReader(journal) as db:
        assert [e.key for e in executions(db, status="failed")] == [("bad", 1)]
        assert [e.key for e in executions(db, status="SUCCEEDED")] == [("ok", 1)]
        assert [e.key for e in executions(db, limit=2)] == [("ok", 2), ("gone", 1)]
        assert executions(db, status="REJECTED") == []


def test_json_uses_boto3_names_and_leaves_out_what_is_unknown(journal: Path,
                                                              tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "ok.1.log").write_text("hello\n")
    with JournalReader(journal) as db:
        items = {e.key: e.to_json(logs) for e in executions(db)}
    done = items[("ok", 1)]
    assert done["jobId"] == "ok" and done["executionNumber"] == 1
    assert done["status"] == "SUCCEEDED" and done["startedAt"] == 1_700_000_000
    assert done["durationSeconds"] == 1.5 and done["logPath"] == str(logs / "ok.1.log")
    assert done["statusDetails"]["reason"] == "exit code 0"
    assert "pid" not in done  # a finished handler's pid means nothing
    assert "status" not in items[("gone", 1)]  # unknown: absent, not null
    assert "logPath" not in items[("bad", 1)]  # no such file
    running = items[("ok", 2)]
    assert running["pid"] == 13 and "finishedAt" not in running
    assert "s3cret" not in repr(items)  # documents and their args are never shown


def test_execution_lookup(journal: Path) -> None:
    with JournalReader(journal) as db:
        assert execution(db, "ok").key == ("ok", 2)  # the newest by default
        assert execution(db, "ok", 1).status == "SUCCEEDED"
        with pytest.raises(UnknownJobError, match="no job nope in the journal"):
            execution(db, "nope")
        with pytest.raises(UnknownJobError, match="job ok has no execution 7"):
            execution(db, "ok", 7)


def test_owed_and_open(journal: Path) -> None:
    with JournalReader(journal) as db:
        debt = owed(db)
        unfinished = open_executions(db)
    assert (debt.count, debt.oldest_job, debt.oldest_status) == (1, ("bad", 1), "FAILED")
    assert debt.to_json()["oldest"]["jobId"] == "bad"
    assert [e.key for e in unfinished] == [("bad", 1), ("ok", 2)]


def test_empty_outbox(tmp_path: Path) -> None:
    async def empty() -> None:
        j = Journal(tmp_path / "journal.db")
        await j.open()
        await j.close()

    asyncio.run(empty())
    with JournalReader(tmp_path / "journal.db") as db:
        assert owed(db).to_json() == {"count": 0}
        assert executions(db) == []


def test_reader_never_writes(journal: Path) -> None:
    # The agent closed its journal cleanly: no WAL. SQLite may create an empty one for a
    # reader (it needs the -shm index), but never writes a page.
    files = [journal, journal.with_name("journal.db-wal")]
    before = [f.read_bytes() if f.exists() else b"" for f in files]
    with JournalReader(journal) as db:
        executions(db)
        open_executions(db)
        owed(db)
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            db.execute("DELETE FROM outbox")
    assert [f.read_bytes() if f.exists() else b"" for f in files] == before


def test_reader_does_not_block_the_agent_and_sees_its_commits(journal: Path) -> None:
    async def write_while_reading(db: sqlite3.Connection) -> None:
        j = Journal(journal)
        await j.open()
        try:
            cursor = db.execute("SELECT job_id FROM executions")  # a read in progress
            cursor.fetchone()
            await j.claiming(("new", 1), "echo", {}, 1, 5)  # WAL: the writer is not blocked
            assert await j.read(lambda conn: [e.key for e in executions(conn, limit=1)]) == [
                ("new", 1)]
            cursor.close()
        finally:
            await j.close()

    with JournalReader(journal) as db:
        asyncio.run(write_while_reading(db))
        assert [e.key for e in executions(db, limit=1)] == [("new", 1)]


def test_unreadable_journals_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NotReadableError, match=r"no journal at .*: the agent has not run"):
        JournalReader(tmp_path / "missing.db").__enter__()
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database, not even close" * 100)
    with pytest.raises(NotReadableError, match=r"cannot read the journal .*garbage\.db"):
        JournalReader(garbage).__enter__()
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(NotReadableError, match="no such table"):
        JournalReader(other).__enter__()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_permission_denied_says_run_as_root(journal: Path) -> None:
    journal.chmod(0)
    with pytest.raises(NotReadableError, match="permission denied; run this command as root"):
        JournalReader(journal).__enter__()


def test_journal_size(journal: Path) -> None:
    size = journal_size(journal)
    assert size.db == journal.stat().st_size > 0
    assert journal_size(journal.with_name("none.db")).total == 0


class Sink:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> int:
        self.data += data
        return len(data)

    def flush(self) -> None:
        pass


def test_copy_log_once_and_following(tmp_path: Path) -> None:
    log = tmp_path / "j.1.log"
    log.write_bytes(b"one\n")
    out = Sink()
    copy_log(log, out)  # type: ignore[arg-type]
    assert out.data == b"one\n"

    # Following: the "handler" appends while the follower polls; it ends after three checks.
    checks: list[int] = []

    def still_running() -> bool:
        checks.append(1)
        with log.open("ab") as f:
            f.write(f"line {len(checks)}\n".encode())
        return len(checks) < 3

    out = Sink()
    copy_log(log, out, still_running, poll=0.001, check_every=0.0)  # type: ignore[arg-type]
    assert out.data == b"one\nline 1\nline 2\nline 3\n"  # the last line written is not lost


def test_copy_log_waits_for_a_log_that_does_not_exist_yet(tmp_path: Path) -> None:
    log = tmp_path / "later.log"
    answers = iter([True, True, False])

    def still_running() -> bool:
        if not log.exists():
            log.write_bytes(b"started\n")
        return next(answers)

    out = Sink()
    copy_log(log, out, still_running, poll=0.001, check_every=0.0)  # type: ignore[arg-type]
    assert out.data == b"started\n"
    with pytest.raises(FileNotFoundError):
        copy_log(tmp_path / "never.log", Sink())  # type: ignore[arg-type]


def test_status_report_of_a_live_agent_that_is_stopping(journal: Path) -> None:
    import json

    from agent.inspect import Target, status_report
    from agent.procfs import boot_id, process_start_time

    state_dir = journal.parent
    (state_dir / "status.json").write_text(json.dumps({
        "format": 1, "pid": os.getpid(), "pid_start": process_start_time(os.getpid()),
        "boot_id": boot_id(), "phase": "stopping", "thing_name": "t1", "started_at": 100.0,
        "connection": {"connected": True, "since": 150.0, "endpoint": "e:8883"},
        "refusing": None, "last_sync": 190.0,
        "running_jobs": [{"jobId": "ok", "executionNumber": 2, "startedAt": 195.0}]}))
    report = status_report(Target(state_dir, Path("/proc/sys/kernel/random/boot_id")), 200.0)
    assert report["running"] and report["pid"] == os.getpid()
    assert report["connected"] and report["connected_since"] == 150.0
    assert report["refusing_jobs"] and report["refusing_reason"] == "the agent is stopping"
    assert report["running_jobs"] == [{"jobId": "ok", "executionNumber": 2, "startedAt": 195.0,
                                       "runningSeconds": 5.0}]
    assert report["owed_statuses"]["count"] == 1 and report["open_executions"] == []
    assert report["journal"]["bytes"] == journal.stat().st_size
    # The same file once the pid is someone else's: not running, the journal's view instead.
    (state_dir / "status.json").write_text(json.dumps({
        "format": 1, "pid": os.getpid(), "pid_start": -1, "phase": "running"}))
    report = status_report(Target(state_dir, Path("/proc/sys/kernel/random/boot_id")), 200.0)
    assert not report["running"] and not report["connected"] and report["running_jobs"] == []
    assert [e["jobId"] for e in report["open_executions"]] == ["bad", "ok"]
