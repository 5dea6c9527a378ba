"""The journal on a real SQLite file: atomic steps, outbox order, pruning, corruption."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from agent.errors import JournalError
from agent.journal import Journal


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def opened(path: Path, clock: Clock | None = None) -> Journal:
    journal = Journal(path, clock=clock or Clock())
    await journal.open()
    return journal


def test_lifecycle_survives_reopening(tmp_path: Path) -> None:
    db = tmp_path / "journal.db"

    async def first() -> None:
        j = await opened(db)
        await j.claiming(("j1", 1), "run", {"operation": "run"}, 1, 5)
        await j.started(("j1", 1), 0, "run", "boot-a")
        await j.update(("j1", 1), pid=4242, pid_start=99)
        await j.finish(("j1", 1), "SUCCEEDED", {"reason": "exit code 0"})
        await j.close()  # like a crash right after the commit

    async def second() -> tuple[Any, Any]:
        j = await opened(db)
        try:
            return await j.get(("j1", 1)), await j.outbox()
        finally:
            await j.close()

    run(first())
    record, outbox = run(second())
    assert (record.state, record.attempts, record.pid, record.boot_id) == ("finished", 1, 4242,
                                                                           "boot-a")
    assert record.result == {"status": "SUCCEEDED", "details": {"reason": "exit code 0"},
                             "finishedAt": Clock().now}
    assert [(e.status, e.final) for e in outbox] == [("SUCCEEDED", True)]


def test_steps_count_their_own_starts_and_go_with_their_execution(tmp_path: Path) -> None:
    async def body() -> tuple[Any, ...]:
        j = await opened(tmp_path / "journal.db")
        key = ("j1", 1)
        await j.claiming(key, "plan", {"version": "1.0"}, 1, 5)
        await j.started(key, 0, "Install", "boot-a")
        await j.step_ended(key, 0, "ignored", "exit code 1")
        await j.started(key, 1, "Reboot", "boot-a")
        await j.started(key, 1, "Reboot", "boot-b")  # run again after a crash
        await j.started(key, 2, "Last", "boot-b")
        await j.finish(key, "FAILED", {"reason": "exit code 2"}, step=(2, "failed", "exit 2"))
        record, steps = await j.get(key), await j.steps(key)
        await j.forget(key)
        gone = await j.steps(key)
        await j.claiming(("j2", 1), "plan", {}, 1, 5)
        await j.started(("j2", 1), 0, "x", None)
        await j.done(("j2", 1))
        pruned = await j.prune(0.0, 0)
        left = await j.steps(("j2", 1))
        await j.close()
        return record, steps, gone, pruned, left

    record, steps, gone, pruned, left = run(body())
    assert (record.state, record.attempts, record.boot_id) == ("finished", 4, "boot-b")
    assert [(s.step, s.name, s.state, s.attempts, s.reason) for s in steps] == [
        (0, "Install", "ignored", 1, "exit code 1"), (1, "Reboot", "running", 2, None),
        (2, "Last", "failed", 1, "exit 2")]
    assert gone == [] and [r.key for r in pruned] == [("j2", 1)] and left == []


def test_a_journal_from_before_steps_is_migrated_and_gains_them(tmp_path: Path) -> None:
    db = tmp_path / "journal.db"
    schema_1_journal(db)  # schema 1 had no steps table

    async def body() -> list[Any]:
        j = await opened(db)
        await j.claiming(("j1", 1), "run", {}, 1, 5)
        await j.started(("j1", 1), 0, "run", None)
        try:
            return await j.steps(("j1", 1))
        finally:
            await j.close()

    assert [s.attempts for s in run(body())] == [1]


def test_an_archived_incarnation_keeps_its_own_steps(tmp_path: Path) -> None:
    """A job deleted and created again under its id: the new execution's plan starts afresh;
    the old one's steps stay with its (archived) record."""
    async def body() -> tuple[Any, ...]:
        j = await opened(tmp_path / "journal.db")
        key = ("j1", 1)
        await j.claiming(key, "plan", {}, 1, 5, queued_at=1)
        await j.started(key, 0, "Install", None)
        await j.started(key, 1, "Reboot", None)
        await j.archive(key)
        await j.claiming(key, "plan", {}, 1, 5, queued_at=2)
        fresh = await j.steps(key)
        await j.started(key, 0, "Install", None)
        new = await j.steps(key)
        old_id = (await j.history(key))[0].row_id
        await j.close()
        return fresh, new, old_id

    fresh, new, old_id = run(body())
    assert fresh == [] and [(s.step, s.attempts) for s in new] == [(0, 1)]
    rows = sqlite3.connect(tmp_path / "journal.db").execute(
        "SELECT step FROM steps WHERE execution_id=? ORDER BY step", (old_id,)).fetchall()
    assert rows == [(0,), (1,)]


def test_outbox_keeps_order_and_delivery_closes_the_execution(tmp_path: Path) -> None:
    async def body() -> list[str]:
        j = await opened(tmp_path / "journal.db")
        key = ("j1", 1)
        await j.claiming(key, "run", {}, 1, 5)
        await j.finish(key, "IN_PROGRESS", {"step": "rebooting"}, state="rebooting")
        await j.finish(key, "SUCCEEDED", {"reason": "rebooted"})
        entries = await j.outbox(key)
        assert [e.status for e in entries] == ["IN_PROGRESS", "SUCCEEDED"]
        assert [e.final for e in entries] == [False, True]
        await j.delivered(entries[0], 3)
        assert (await j.get(key)).state == "finished"  # type: ignore[union-attr]
        await j.delivered(entries[1], 4)
        record = await j.get(key)
        assert record is not None and record.version == 4
        states = [record.state]
        assert await j.outbox() == [] and await j.open_records() == []
        await j.close()
        return states

    assert run(body()) == ["done"]


def test_prune_by_age_and_count_never_touches_open_executions(tmp_path: Path) -> None:
    clock = Clock()

    async def body() -> tuple[list[tuple[str, int]], list[str]]:
        j = await opened(tmp_path / "journal.db", clock)
        for i in range(6):
            clock.now += 10
            await j.claiming((f"j{i}", 1), "run", {}, 1, 5)
            if i != 0:  # j0 stays open forever
                await j.done((f"j{i}", 1))
        clock.now += 1000
        await j.claiming(("fresh", 1), "run", {}, 1, 5)
        await j.done(("fresh", 1))
        pruned = await j.prune(max_age=500, max_records=100)  # the five old done ones
        again = await j.prune(max_age=10**9, max_records=100)
        left = [r.job_id for r in await j.open_records()]
        await j.close()
        return sorted(r.key for r in pruned) + [r.key for r in again], left

    pruned, left = run(body())
    assert pruned == [(f"j{i}", 1) for i in range(1, 6)]
    assert left == ["j0"]


def test_prune_by_count_keeps_the_newest(tmp_path: Path) -> None:
    clock = Clock()

    async def body() -> list[tuple[str, int]]:
        j = await opened(tmp_path / "journal.db", clock)
        for i in range(5):
            clock.now += 1
            await j.claiming((f"j{i}", 1), "run", {}, 1, 5)
            await j.done((f"j{i}", 1))
        pruned = await j.prune(max_age=10**9, max_records=2)
        await j.close()
        return [r.key for r in pruned]

    assert sorted(run(body())) == [("j0", 1), ("j1", 1), ("j2", 1)]


def test_a_claimed_execution_cannot_be_journaled_twice(tmp_path: Path) -> None:
    async def body() -> None:
        j = await opened(tmp_path / "journal.db")
        await j.claiming(("j1", 1), "run", {}, 1, 5)
        with pytest.raises(JournalError):
            await j.claiming(("j1", 1), "run", {}, 1, 5)
        await j.close()

    run(body())


def test_corrupt_file_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "journal.db"
    db.write_bytes(b"garbage" * 1000)

    async def body() -> None:
        j = await opened(db)
        await j.claiming(("j1", 1), "run", {}, 1, 5)
        await j.close()

    run(body())
    assert [p.name.split("-")[0] for p in tmp_path.glob("journal.db.corrupt-*")] == [
        "journal.db.corrupt"]
    assert sqlite3.connect(db).execute("SELECT count(*) FROM executions").fetchone() == (1,)
    assert any(r.levelname == "CRITICAL" and "corrupt" in r.message for r in caplog.records)


def test_write_failure_is_a_journal_error_and_changes_nothing(tmp_path: Path) -> None:
    async def body() -> Any:
        j = await opened(tmp_path / "journal.db")
        await j.claiming(("j1", 1), "run", {}, 1, 5)
        with pytest.raises(JournalError):  # a failing second statement rolls back the first
            await j._write(("UPDATE executions SET state='done'", ()),
                           ("INSERT INTO nowhere VALUES (1)", ()))
        record = await j.get(("j1", 1))
        await j.close()
        return record

    assert run(body()).state == "claiming"


# ---------------------------------------------------------------------- schema 2

SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE executions (
    job_id TEXT NOT NULL, execution_number INTEGER NOT NULL, operation TEXT NOT NULL,
    document TEXT NOT NULL, state TEXT NOT NULL, version INTEGER NOT NULL,
    step_minutes INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, pid INTEGER,
    pid_start INTEGER, boot_id TEXT, result TEXT, created_at REAL NOT NULL,
    updated_at REAL NOT NULL, PRIMARY KEY (job_id, execution_number));
CREATE INDEX executions_state ON executions (state, updated_at);
CREATE TABLE outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL,
    execution_number INTEGER NOT NULL, status TEXT NOT NULL, details TEXT NOT NULL,
    final INTEGER NOT NULL, created_at REAL NOT NULL);
INSERT INTO meta VALUES ('schema', '1');
INSERT INTO executions VALUES ('old', 1, 'run', '{"operation": "run"}', 'done', 3, 5, 1, NULL,
    NULL, 'boot-a', '{"status": "SUCCEEDED", "details": {}}', 10.0, 20.0);
INSERT INTO executions VALUES ('open', 1, 'run', '{"operation": "run"}', 'finished', 2, 5, 1,
    4242, 99, 'boot-a', '{"status": "FAILED", "details": {"reason": "x"}}', 30.0, 40.0);
INSERT INTO outbox (job_id, execution_number, status, details, final, created_at)
    VALUES ('open', 1, 'FAILED', '{"reason": "x"}', 1, 40.0);
"""


def schema_1_journal(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_1)
    db.commit()
    db.close()


def test_schema_1_is_migrated_in_place(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "journal.db"
    schema_1_journal(db)
    caplog.set_level(logging.INFO, "agent.journal")

    async def body() -> tuple[Any, ...]:
        j = Journal(db, clock=Clock(), thing_name="dev", endpoint="e")
        await j.open()
        old, still_open = await j.get(("old", 1)), await j.open_records()
        outbox = await j.outbox()
        await j.close()
        return old, still_open, outbox

    old, still_open, outbox = run(body())
    assert (old.state, old.version, old.boot_id, old.queued_at) == ("done", 3, "boot-a", None)
    assert old.result == {"status": "SUCCEEDED", "details": {}}
    assert [(r.job_id, r.state, r.pid) for r in still_open] == [("open", "finished", 4242)]
    assert [(e.job_id, e.status) for e in outbox] == [("open", "FAILED")]
    meta = dict(sqlite3.connect(db).execute("SELECT key, value FROM meta").fetchall())
    assert meta == {"schema": "2", "thing_name": "dev", "endpoint": "e"}
    tables = {row[0] for row in sqlite3.connect(db).execute(
        "SELECT name FROM sqlite_master WHERE type='table'")}
    assert "command_executions" in tables  # AWS IoT Commands' table comes with the migration
    assert any("migrated from schema 1 to 2" in r.message for r in caplog.records)
    assert not list(tmp_path.glob("journal.db.*-*"))  # migrated, not moved aside


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "journal.db"
    schema_1_journal(db)
    connection = sqlite3.connect(db)
    connection.execute("UPDATE meta SET value='3' WHERE key='schema'")
    connection.commit()
    connection.close()
    with pytest.raises(JournalError, match="newer agent"):
        run(opened(db))


def moved_aside(directory: Path) -> list[Path]:
    return [p for p in directory.glob("journal.db.previous-*")
            if not p.name.endswith(("-wal", "-shm"))]


@pytest.mark.parametrize("change", ["thing_name", "endpoint"])
def test_journal_of_another_thing_is_moved_aside(tmp_path: Path, change: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "journal.db"
    first = {"thing_name": "dev-a", "endpoint": "a.iot.eu-west-1.amazonaws.com"}
    second = {**first, change: "other"}

    async def body(owner: dict[str, str], job: str) -> list[str]:
        j = Journal(db, clock=Clock(), **owner)
        await j.open()
        if job:
            await j.claiming((job, 1), "run", {}, 1, 5, queued_at=100)
        jobs = [r.job_id for r in await j.open_records()]
        await j.close()
        return jobs

    assert run(body(first, "theirs")) == ["theirs"]
    assert run(body(first, "")) == ["theirs"]  # same owner: kept
    assert run(body(second, "")) == []  # a fresh journal
    aside = moved_aside(tmp_path)
    assert len(aside) == 1
    lines = [r for r in caplog.records if "moved aside" in r.message]
    assert len(lines) == 1 and lines[0].levelname == "WARNING"
    assert str(aside[0]) in lines[0].message and "other" in lines[0].message
    moved = sqlite3.connect(aside[0]).execute("SELECT job_id FROM executions").fetchall()
    assert moved == [("theirs",)]
    assert run(body(second, "")) == []  # the new journal is now the other thing's own
    assert moved_aside(tmp_path) == aside


def test_opened_without_an_owner_keeps_any_journal(tmp_path: Path) -> None:
    db = tmp_path / "journal.db"

    async def body(**owner: str) -> int:
        j = Journal(db, clock=Clock(), **owner)
        await j.open()
        await j.claiming((f"j{len(owner)}", 1), "run", {}, 1, 5)
        count = len(await j.open_records())
        await j.close()
        return count

    assert run(body(thing_name="dev")) == 1
    assert run(body()) == 2  # e.g. a read-only inspection: no owner, nothing moved


def test_archived_execution_is_history_and_frees_its_key(tmp_path: Path) -> None:
    clock = Clock()

    async def body() -> tuple[Any, ...]:
        j = await opened(tmp_path / "journal.db", clock)
        key = ("j1", 1)
        await j.claiming(key, "run", {"v": 1}, 1, 5, queued_at=100)
        await j.finish(key, "SUCCEEDED", {"reason": "ok"})  # owed, then the job is deleted
        old = await j.get(key)
        clock.now += 10
        await j.archive(key)
        assert await j.get(key) is None and await j.outbox() == [] and \
            await j.open_records() == []
        await j.claiming(key, "run", {"v": 2}, 1, 5, queued_at=200)  # the re-created job
        await j.done(key)  # key-based writes touch the new one only
        history = await j.history(key)
        await j.close()
        return old, history

    old, history = run(body())
    assert [(r.queued_at, r.state, r.document) for r in history] == [
        (100, "finished", {"v": 1}), (200, "done", {"v": 2})]
    first, second = history
    assert first.archived_at is not None and second.archived_at is None
    assert first.row_id == old.row_id and first.stem == f"j1.1@{old.row_id}" == old.archived_stem
    assert second.stem == "j1.1"


def test_archived_executions_are_pruned_like_finished_ones(tmp_path: Path) -> None:
    clock = Clock()

    async def body() -> tuple[list[str], list[str]]:
        j = await opened(tmp_path / "journal.db", clock)
        key = ("j1", 1)
        await j.claiming(key, "run", {}, 1, 5, queued_at=100)  # open, then archived
        await j.archive(key)
        clock.now += 10
        await j.claiming(key, "run", {}, 1, 5, queued_at=200)  # open: never pruned
        pruned = await j.prune(max_age=10**9, max_records=0)
        left = [r.stem for r in await j.history(key)]
        await j.close()
        return [r.stem for r in pruned], left

    pruned, left = run(body())
    assert pruned == ["j1.1@1"] and left == ["j1.1"]
