"""Command executions in the agent's journal: each one keyed by its executionId.

Its own table, ``command_executions``, in the same SQLite file as the jobs
(:class:`agent.journal.Journal`: one writer thread, WAL, ``synchronous=FULL``, the same owner
check that moves a journal of another thing aside). The journal creates it with the others at
every open, additively, so a journal written before Commands existed simply gains it. A
request is committed on arrival, before its PUBACK; each later step is committed before it
happens, as for jobs::

    received --> running --> finished --> done
        |                       ^
        +-----------------------+   (rejected, or timed out before it could start)

``finished`` holds the final update that is still owed to the service (the outbox of a command
is that one payload); ``done`` keeps it, so a request delivered again is answered from here and
never run twice.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.journal import Journal

__all__ = ["OPEN_STATES", "CommandJournal", "CommandRecord"]

_COLUMNS = ("execution_id, operation, document, state, deadline, attempts, pid, pid_start, "
            "boot_id, final, updated_at")
OPEN_STATES = ("received", "running", "finished")


@dataclass(frozen=True)
class CommandRecord:
    """One command execution as the journal last committed it.

    ``deadline`` is the epoch second the execution times out (the request's message expiry
    counted from its arrival), None when the request carried none. ``final`` is the terminal
    update, once decided.
    """

    execution_id: str
    operation: str | None
    document: dict[str, Any] | None
    state: str
    deadline: float | None
    attempts: int
    pid: int | None
    pid_start: int | None
    boot_id: str | None
    final: dict[str, Any] | None
    updated_at: float


def _record(row: tuple[Any, ...]) -> CommandRecord:
    return CommandRecord(row[0], row[1], json.loads(row[2]) if row[2] else None, row[3],
                         row[4], row[5], row[6], row[7], row[8],
                         json.loads(row[9]) if row[9] else None, row[10])


class CommandJournal:
    """The commands table of ``journal`` (an open :class:`~agent.journal.Journal`)."""

    def __init__(self, journal: Journal, clock: Callable[[], float] = time.time) -> None:
        self._journal = journal
        self._clock = clock

    async def get(self, execution_id: str) -> CommandRecord | None:
        rows = await self._journal.select(
            f"SELECT {_COLUMNS} FROM command_executions WHERE execution_id=?", (execution_id,))
        return _record(rows[0]) if rows else None

    async def open_records(self) -> list[CommandRecord]:
        marks = ",".join("?" * len(OPEN_STATES))
        rows = await self._journal.select(
            f"SELECT {_COLUMNS} FROM command_executions WHERE state IN ({marks}) "
            "ORDER BY created_at", OPEN_STATES)
        return [_record(r) for r in rows]

    async def received(self, execution_id: str, operation: str, document: dict[str, Any],
                       deadline: float | None, *, starting: bool = False,
                       boot_id: str | None = None) -> CommandRecord | None:
        """A request to run, committed before its PUBACK; or, if the journal already has this
        execution, nothing written and its record returned (one hop and one commit either way).

        ``starting``: its handler is spawned next, so this commit also says what
        :meth:`started` would (one fsync fewer on the way from a request to its handler).
        """
        now = self._clock()
        state, attempts = ("running", 1) if starting else ("received", 0)
        return await self._insert_new(execution_id, (
            "INSERT INTO command_executions (execution_id, operation, document, state, deadline,"
            " attempts, boot_id, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
            (execution_id, operation, json.dumps(document), state, deadline, attempts, boot_id,
             now, now)))

    async def decided(self, execution_id: str, final: dict[str, Any],
                      deadline: float | None) -> CommandRecord | None:
        """A request answered without running (rejected, expired), committed before its
        PUBACK; as :meth:`received`, the existing record if there is one."""
        now = self._clock()
        return await self._insert_new(execution_id, (
            "INSERT INTO command_executions (execution_id, state, deadline, final, created_at, "
            "updated_at) VALUES (?,?,?,?,?,?)",
            (execution_id, "finished", deadline, json.dumps(final), now, now)))

    async def _insert_new(self, execution_id: str,
                          insert: tuple[str, tuple[Any, ...]]) -> CommandRecord | None:
        def run(db: sqlite3.Connection) -> CommandRecord | None:
            row = db.execute(f"SELECT {_COLUMNS} FROM command_executions "
                             "WHERE execution_id=?", (execution_id,)).fetchone()
            if row is not None:
                return _record(row)
            db.execute(*insert)
            return None

        return await self._journal.transact(run)

    async def started(self, execution_id: str, boot_id: str | None) -> None:
        """Committed before the handler is spawned: a crash from here on reads "was running"."""
        await self._journal.write((
            "UPDATE command_executions SET state='running', attempts=attempts+1, pid=NULL, "
            "pid_start=NULL, boot_id=?, updated_at=? WHERE execution_id=?",
            (boot_id, self._clock(), execution_id)))

    async def spawned(self, execution_id: str, pid: int | None, pid_start: int | None) -> None:
        await self._journal.write((
            "UPDATE command_executions SET pid=?, pid_start=?, updated_at=? WHERE execution_id=?",
            (pid, pid_start, self._clock(), execution_id)))

    async def finish(self, execution_id: str, final: dict[str, Any]) -> None:
        """The verdict, owed to the service until :meth:`done`."""
        await self._journal.write((
            "UPDATE command_executions SET state='finished', final=?, updated_at=? "
            "WHERE execution_id=?", (json.dumps(final), self._clock(), execution_id)))

    async def done(self, execution_id: str) -> None:
        """Delivered (or the service will take nothing more); the verdict is kept."""
        await self._journal.write((
            "UPDATE command_executions SET state='done', updated_at=? WHERE execution_id=?",
            (self._clock(), execution_id)))

    async def prune(self, max_age: float, max_records: int) -> list[str]:
        """Forget ``done`` executions older than ``max_age`` or beyond ``max_records``."""
        cutoff = self._clock() - max_age
        rows = await self._journal.select(
            "SELECT execution_id FROM command_executions WHERE state='done' AND (updated_at < ? "
            "OR rowid NOT IN (SELECT rowid FROM command_executions WHERE state='done' "
            "ORDER BY updated_at DESC LIMIT ?))", (cutoff, max_records))
        ids = [row[0] for row in rows]
        if ids:
            await self._journal.write(*[
                ("DELETE FROM command_executions WHERE execution_id=?", (i,)) for i in ids])
        return ids
