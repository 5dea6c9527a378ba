"""The Commands executor with a fake protocol client: real journal (SQLite), real handlers.

What is checked here, where a fake makes it exact: a request's PUBACK goes out only once the
request is journaled; a redelivered request is answered from the journal and never run twice;
DataConflict backs off and retries; a request that waited past its timeout ends TIMED_OUT
without running; a refused result is resent as a bare status; a restart finishes what the
journal left open. The same paths run against the real broker in tests/integration.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from agent.commands.client import CommandRequest
from agent.commands.executor import CommandExecutor
from agent.commands.journal import CommandJournal
from agent.config import CommandsConfig, Config, HandlerConfig, MqttConfig
from agent.connection import Message
from agent.errors import AgentError, ConflictException, InvalidRequestException
from agent.journal import Journal


class FakeClient:
    """The executor's view of :class:`CommandsClient`, scripted."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.queue: asyncio.Queue[CommandRequest] = asyncio.Queue()
        self.acked: list[tuple[str, str | None]] = []  # (id, journal state at PUBACK time)
        self.updates: list[tuple[str, dict[str, Any]]] = []
        self.failures: list[AgentError] = []  # raised by the next updates, in order
        self.in_flight: set[str] = set()

    async def requests(self) -> Any:
        while True:
            yield await self.queue.get()

    def acknowledge(self, request: CommandRequest) -> None:
        with sqlite3.connect(self.db) as db:  # what a crash right now would leave
            row = db.execute("SELECT state FROM command_executions WHERE execution_id=?",
                             (request.execution_id,)).fetchone()
        self.acked.append((request.execution_id, row[0] if row else None))

    async def update(self, execution_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        assert execution_id not in self.in_flight, "two updates of one execution in flight"
        self.in_flight.add(execution_id)
        try:
            await asyncio.sleep(0.001)
            self.updates.append((execution_id, payload))
            if self.failures:
                raise self.failures.pop(0)
            return {"executionId": execution_id}
        finally:
            self.in_flight.discard(execution_id)

    async def close(self) -> None:
        pass

    def send(self, execution_id: str, document: Any, *, expiry: int | None = 30) -> None:
        payload = document if isinstance(document, bytes) else json.dumps(document).encode()
        message = Message(f"$aws/commands/things/dev1/executions/{execution_id}/request/json",
                          payload, "application/json", expiry, time.monotonic())
        self.queue.put_nowait(CommandRequest(execution_id, "json", message))

    def finals(self) -> dict[str, dict[str, Any]]:
        return {i: p for i, p in self.updates if p["status"] != "IN_PROGRESS"}


def make_config(tmp_path: Path, *, max_concurrent: int = 4) -> Config:
    handler = tmp_path / "h.sh"
    handler.write_text('#!/bin/sh\necho "ran $*" >> "$RUNS"\ncase "$1" in sleep) sleep "$2";; '
                       'fail) exit 3;; esac\necho \'{"result": {"n": 7}}\' >&"$JOB_PROGRESS_FD"\n')
    handler.chmod(0o755)
    env = {"RUNS": str(tmp_path / "runs")}
    return Config(
        thing_name="dev1", mqtt=MqttConfig(endpoint="x", cert=Path("c"), key=Path("k")),
        state_dir=tmp_path / "state", kill_grace=1.0, progress_interval=0.1,
        commands=CommandsConfig(enabled=True, max_concurrent=max_concurrent),
        handlers={"h": HandlerConfig(command=(str(handler),), timeout=20.0, environment=env),
                  "again": HandlerConfig(command=(str(handler),), timeout=20.0,
                                         environment=env, idempotent=True)})


async def started(tmp_path: Path, config: Config) -> tuple[CommandExecutor, FakeClient,
                                                            Journal, asyncio.Task[None]]:
    journal = Journal(tmp_path / "journal.db")
    await journal.open()
    records = CommandJournal(journal)
    client = FakeClient(tmp_path / "journal.db")
    executor = CommandExecutor(config, client, records)  # type: ignore[arg-type]
    task = asyncio.create_task(executor.run())
    await executor.recovered.wait()
    return executor, client, journal, task


async def until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def stopped(executor: CommandExecutor, journal: Journal, task: asyncio.Task[None]) -> None:
    await executor.shutdown(2.0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await journal.close()


def runs(tmp_path: Path) -> list[str]:
    path = tmp_path / "runs"
    return path.read_text().splitlines() if path.exists() else []


def test_acknowledged_only_once_journaled_and_answered_from_the_journal(tmp_path: Path) -> None:
    async def body() -> None:
        executor, client, journal, task = await started(tmp_path, make_config(tmp_path))
        client.send("e-1", {"operation": "h", "args": ["x"]})
        client.send("e-2", {"operation": "nope"})
        await until(lambda: set(client.finals()) == {"e-1", "e-2"})
        client.send("e-1", {"operation": "h", "args": ["x"]})  # delivered again
        await until(lambda: len([u for u in client.updates if u[0] == "e-1"]) == 2)
        await stopped(executor, journal, task)
        assert client.acked[:2] == [("e-1", "running"), ("e-2", "finished")]
        finals = client.finals()
        assert finals["e-1"]["status"] == "SUCCEEDED"
        assert finals["e-1"]["result"]["n"] == {"s": "7"}
        assert finals["e-2"]["statusReason"]["reasonCode"] == "UNKNOWN_OPERATION"
        again = [u for u in client.updates if u[0] == "e-1"]
        assert again[0][1] == again[1][1]  # the journaled verdict, resent
        assert runs(tmp_path) == ["ran x"]  # never run twice

    asyncio.run(body())


def test_data_conflict_backs_off_and_retries(tmp_path: Path) -> None:
    async def body() -> None:
        executor, client, journal, task = await started(tmp_path, make_config(tmp_path))
        client.failures = [ConflictException("too close", code="DataConflict")] * 2
        client.send("e-1", {"operation": "h"})
        await until(lambda: len(client.updates) == 3)
        await stopped(executor, journal, task)
        assert [u[1]["status"] for u in client.updates] == ["SUCCEEDED"] * 3

    asyncio.run(body())
    with sqlite3.connect(tmp_path / "journal.db") as db:
        assert db.execute("SELECT state FROM command_executions").fetchall() == [("done",)]


def test_a_refused_result_is_resent_as_a_bare_status(tmp_path: Path) -> None:
    async def body() -> None:
        executor, client, journal, task = await started(tmp_path, make_config(tmp_path))
        client.failures = [InvalidRequestException("bad result")]
        client.send("e-1", {"operation": "h", "args": ["fail"]})
        await until(lambda: len(client.updates) == 2)
        await stopped(executor, journal, task)
        first, second = (u[1] for u in client.updates)
        assert first["statusReason"]["reasonCode"] == "HANDLER_EXIT_3"
        assert second == {"status": "FAILED", "statusReason": {
            "reasonCode": "AGENT_RESULT_REFUSED", "reasonDescription": (
                "the service refused the agent's result; see the device's log")}}

    asyncio.run(body())


def test_a_request_that_waited_past_its_timeout_does_not_run(tmp_path: Path) -> None:
    async def body() -> None:
        config = make_config(tmp_path, max_concurrent=1)
        executor, client, journal, task = await started(tmp_path, config)
        client.send("e-1", {"operation": "h", "args": ["sleep", "1.5"]})
        client.send("e-2", {"operation": "h", "args": ["late"]}, expiry=1)
        client.send("e-3", {"operation": "h", "args": ["ok"]}, expiry=None)
        await until(lambda: len(client.finals()) == 3)
        await stopped(executor, journal, task)
        finals = client.finals()
        assert finals["e-2"]["status"] == "TIMED_OUT"
        assert finals["e-2"]["statusReason"]["reasonCode"] == "EXPIRED_BEFORE_START"
        assert [u[0] for u in client.updates if u[1]["status"] == "IN_PROGRESS"] == ["e-1"]
        assert runs(tmp_path) == ["ran sleep 1.5", "ran ok"]

    asyncio.run(body())


def test_a_handler_stops_at_the_executions_timeout(tmp_path: Path) -> None:
    async def body() -> None:
        executor, client, journal, task = await started(tmp_path, make_config(tmp_path))
        client.send("e-1", {"operation": "h", "args": ["sleep", "10"]}, expiry=1)
        await until(lambda: "e-1" in client.finals())
        await stopped(executor, journal, task)
        final = client.finals()["e-1"]
        assert final["status"] == "TIMED_OUT"
        assert final["statusReason"]["reasonCode"] == "EXECUTION_TIMEOUT"

    asyncio.run(body())


@pytest.mark.parametrize(("operation", "expected"), [("h", "INTERRUPTED"), ("again", None)])
def test_a_restart_finishes_what_the_journal_left_open(tmp_path: Path, operation: str,
                                                       expected: str | None) -> None:
    async def crashed() -> None:
        journal = Journal(tmp_path / "journal.db")
        await journal.open()
        records = CommandJournal(journal)
        await records.received("e-1", operation, {"operation": operation, "args": ["r"]},
                               time.time() + 30)
        await records.started("e-1", "boot")  # then the agent died
        await records.decided("e-2", {"status": "REJECTED", "statusReason": {
            "reasonCode": "UNKNOWN_OPERATION"}}, None)  # owed, never sent
        await records.received("e-3", "h", {"operation": "h", "args": ["queued"]}, None)
        await journal.close()

    async def restarted() -> FakeClient:
        executor, client, journal, task = await started(tmp_path, make_config(tmp_path))
        await until(lambda: len(client.finals()) == 3)
        await stopped(executor, journal, task)
        return client

    asyncio.run(crashed())
    client = asyncio.run(restarted())
    finals = client.finals()
    if expected is None:
        assert finals["e-1"]["status"] == "SUCCEEDED"
        assert "ran r" in runs(tmp_path)
    else:
        assert finals["e-1"]["statusReason"]["reasonCode"] == expected
        assert "ran r" not in runs(tmp_path)
    assert finals["e-2"]["status"] == "REJECTED"
    assert finals["e-3"]["status"] == "SUCCEEDED" and "ran queued" in runs(tmp_path)


def test_the_commands_table_is_additive_and_pruned(tmp_path: Path) -> None:
    """A schema-2 journal written before Commands gains the table at its next open; the jobs'
    tables are untouched and the schema version stays 2 (an older agent ignores the table)."""
    clock = [1_700_000_000.0]
    path = tmp_path / "journal.db"

    async def body() -> list[str]:
        old = Journal(path, thing_name="dev", endpoint="e")
        await old.open()
        await old.claiming(("j1", 1), "h", {"operation": "h"}, 1, 5)
        await old.close()
        with contextlib.closing(sqlite3.connect(path)) as db:  # as an agent before Commands
            db.execute("DROP TABLE command_executions")
            db.commit()
        journal = Journal(path, thing_name="dev", endpoint="e")
        await journal.open()
        records = CommandJournal(journal, clock=lambda: clock[0])
        for n in range(5):
            await records.decided(f"e-{n}", {"status": "REJECTED"}, None)
            await records.done(f"e-{n}")
            clock[0] += 1
        await records.received("open", "h", {"operation": "h"}, None)
        pruned = await records.prune(max_age=3600, max_records=2)
        assert await journal.get(("j1", 1)) is not None
        assert [r.execution_id for r in await records.open_records()] == ["open"]
        assert (await records.get("e-4")) is not None and await records.get("e-0") is None
        await journal.close()
        return pruned

    assert asyncio.run(body()) == ["e-0", "e-1", "e-2"]
    with sqlite3.connect(tmp_path / "journal.db") as db:
        assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("2",)


def test_a_journal_of_another_thing_takes_its_commands_with_it(tmp_path: Path) -> None:
    """The journal's owner check (thing, endpoint) covers the commands table: a journal opened
    for another thing is moved aside whole, so its command executions are never answered by
    this one."""
    path = tmp_path / "journal.db"

    async def body() -> tuple[Any, Any]:
        mine = Journal(path, thing_name="dev", endpoint="e")
        await mine.open()
        await CommandJournal(mine).decided("e-1", {"status": "REJECTED"}, None)
        await mine.close()
        other = Journal(path, thing_name="another", endpoint="e")
        await other.open()
        record = await CommandJournal(other).get("e-1")
        await other.close()
        aside = Journal(next(tmp_path.glob("journal.db.previous-*")))
        await aside.open()
        kept = await CommandJournal(aside).get("e-1")
        await aside.close()
        return record, kept

    record, kept = asyncio.run(body())
    assert record is None and kept is not None and kept.state == "finished"
