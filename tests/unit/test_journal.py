"""The journal on a real SQLite file: atomic steps, outbox order, pruning, corruption."""

from __future__ import annotations

import asyncio
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
        await j.started(("j1", 1), 4242, 99, "boot-a")
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
        return sorted(pruned) + again, left

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
        return pruned

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
