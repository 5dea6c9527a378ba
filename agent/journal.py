"""The durable journal: every execution this device claimed, and every status it still owes.

SQLite from the standard library, WAL mode, ``synchronous=FULL``: a committed write survives
``kill -9`` and power loss, and one file holds both tables, so "the handler finished" and "this
FAILED/SUCCEEDED is owed to the cloud" are committed together or not at all. Each state change
is committed *before* its side effect (claim, spawn, reboot), which is what lets a restarted
agent tell "never started" from "was running" from "finished, not yet reported".

All SQLite calls run on one dedicated thread (``asyncio`` awaits them), so the event loop never
blocks on disk and writes are serialised.

Execution states::

    claiming --> running --> finished --> done
        |           |  ^          ^
        |           v  |          |
        |       rebooting --------+
        +-----------------------------> done   (claim refused / job gone)

An execution in the journal is never claimed again, whatever notifications say.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from agent.errors import JournalError

__all__ = ["Journal", "OutboxEntry", "Record"]

log = logging.getLogger("agent.journal")

T = TypeVar("T")
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS executions (
    job_id TEXT NOT NULL,
    execution_number INTEGER NOT NULL,
    operation TEXT NOT NULL,
    document TEXT NOT NULL,
    state TEXT NOT NULL,
    version INTEGER NOT NULL,
    step_minutes INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    pid INTEGER,
    pid_start INTEGER,
    boot_id TEXT,
    result TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (job_id, execution_number)
);
CREATE INDEX IF NOT EXISTS executions_state ON executions (state, updated_at);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    execution_number INTEGER NOT NULL,
    status TEXT NOT NULL,
    details TEXT NOT NULL,
    final INTEGER NOT NULL,
    created_at REAL NOT NULL
);
"""
OPEN_STATES = ("claiming", "running", "rebooting", "finished")


@dataclass(frozen=True)
class Record:
    """One claimed execution, as the journal last committed it."""

    job_id: str
    execution_number: int
    operation: str
    document: dict[str, Any]
    state: str
    version: int
    step_minutes: int
    attempts: int
    pid: int | None
    pid_start: int | None
    boot_id: str | None
    result: dict[str, Any] | None
    updated_at: float

    @property
    def key(self) -> tuple[str, int]:
        return (self.job_id, self.execution_number)


@dataclass(frozen=True)
class OutboxEntry:
    """A status update owed to the cloud; deleted only once the service accepted it."""

    seq: int
    job_id: str
    execution_number: int
    status: str
    details: dict[str, str]
    final: bool

    @property
    def key(self) -> tuple[str, int]:
        return (self.job_id, self.execution_number)


class Journal:
    """Open with :meth:`open`; every other method is a coroutine run on the journal thread."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._db: sqlite3.Connection | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal")

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "unable to open" in str(exc):
                raise JournalError(f"cannot open the journal {self.path}: {exc}") from None
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(self._clock())}")
            log.critical("journal %s is corrupt (%s); moved aside to %s and starting a new one. "
                         "Jobs it was tracking will be reported FAILED as unknown to the agent.",
                         self.path, exc, aside)
            for suffix in ("", "-wal", "-shm"):
                source = Path(f"{self.path}{suffix}")
                if source.exists():
                    source.rename(Path(f"{aside}{suffix}"))
            self._db = self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=5000")
            check = db.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise sqlite3.DatabaseError(f"integrity check: {check}")
            db.executescript(_SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise JournalError(f"journal {self.path} was written by a newer agent "
                                   f"(schema {row[0]}); upgrade the agent or move the file away")
        except BaseException:
            db.close()
            raise
        return db

    async def close(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        with contextlib.suppress(RuntimeError):  # executor already shut down
            await self._run(close)
        self._executor.shutdown(wait=False)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def _tx(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        """Run ``statements`` in one transaction; any failure (disk full) rolls all back."""
        db = self._db
        if db is None:
            raise JournalError("the journal is not open")
        try:
            db.execute("BEGIN IMMEDIATE")
            for sql, params in statements:
                db.execute(sql, params)
            db.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise JournalError(f"cannot write the journal {self.path}: {exc}") from exc

    async def _write(self, *statements: tuple[str, tuple[Any, ...]]) -> None:
        await self._run(self._tx, list(statements))

    async def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        def query() -> list[tuple[Any, ...]]:
            if self._db is None:
                raise JournalError("the journal is not open")
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise JournalError(f"cannot read the journal {self.path}: {exc}") from exc

        return await self._run(query)

    async def read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read-only ``query`` (one of :mod:`agent.inspect`'s) on the journal thread."""
        def run() -> T:
            if self._db is None:
                raise JournalError("the journal is not open")
            try:
                return query(self._db)
            except sqlite3.Error as exc:
                raise JournalError(f"cannot read the journal {self.path}: {exc}") from exc

        return await self._run(run)

    # ------------------------------------------------------------------ executions

    async def get(self, key: tuple[str, int]) -> Record | None:
        rows = await self._query(f"SELECT {_COLUMNS} FROM executions "
                                 "WHERE job_id=? AND execution_number=?", key)
        return _record(rows[0]) if rows else None

    async def open_records(self) -> list[Record]:
        marks = ",".join("?" * len(OPEN_STATES))
        rows = await self._query(f"SELECT {_COLUMNS} FROM executions WHERE state IN ({marks}) "
                                 "ORDER BY created_at", OPEN_STATES)
        return [_record(r) for r in rows]

    async def claiming(self, key: tuple[str, int], operation: str, document: dict[str, Any],
                       version: int, step_minutes: int) -> None:
        """Committed before the claim is sent: a crash now leaves "never started"."""
        now = self._clock()
        await self._write((
            "INSERT INTO executions (job_id, execution_number, operation, document, state, "
            "version, step_minutes, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
            (*key, operation, json.dumps(document), "claiming", version, step_minutes, now,
             now)))

    async def update(self, key: tuple[str, int], **fields: Any) -> None:
        if "result" in fields and fields["result"] is not None:
            fields["result"] = json.dumps(fields["result"])
        fields["updated_at"] = self._clock()
        sets = ", ".join(f"{name}=?" for name in fields)
        await self._write((f"UPDATE executions SET {sets} WHERE job_id=? AND execution_number=?",
                           (*fields.values(), *key)))

    async def started(self, key: tuple[str, int], pid: int | None, pid_start: int | None,
                      boot_id: str | None) -> None:
        """Committed before the handler can do anything that matters (see runner.start)."""
        await self._write((
            "UPDATE executions SET state='running', attempts=attempts+1, pid=?, pid_start=?, "
            "boot_id=?, updated_at=? WHERE job_id=? AND execution_number=?",
            (pid, pid_start, boot_id, self._clock(), *key)))

    async def finish(self, key: tuple[str, int], status: str, details: dict[str, str],
                     *, state: str = "finished") -> None:
        """The verdict and the update that reports it, committed together."""
        now = self._clock()
        await self._write(
            ("UPDATE executions SET state=?, result=?, updated_at=? "
             "WHERE job_id=? AND execution_number=?",
             (state, json.dumps({"status": status, "details": details, "finishedAt": now}),
              now, *key)),
            ("INSERT INTO outbox (job_id, execution_number, status, details, final, created_at) "
             "VALUES (?,?,?,?,?,?)",
             (*key, status, json.dumps(details), int(status != "IN_PROGRESS"), now)))

    async def forget(self, key: tuple[str, int]) -> None:
        """Remove an execution that was never claimed (the claim did not go through)."""
        await self._write(
            ("DELETE FROM outbox WHERE job_id=? AND execution_number=?", key),
            ("DELETE FROM executions WHERE job_id=? AND execution_number=?", key))

    async def done(self, key: tuple[str, int]) -> None:
        """Nothing more is owed for this execution (delivered, or the cloud ended it)."""
        await self._write(
            ("DELETE FROM outbox WHERE job_id=? AND execution_number=?", key),
            ("UPDATE executions SET state='done', updated_at=? "
             "WHERE job_id=? AND execution_number=?", (self._clock(), *key)))

    # ------------------------------------------------------------------ outbox

    async def outbox(self, key: tuple[str, int] | None = None) -> list[OutboxEntry]:
        where, params = ("WHERE job_id=? AND execution_number=?", key) if key else ("", ())
        rows = await self._query("SELECT seq, job_id, execution_number, status, details, final "
                                 f"FROM outbox {where} ORDER BY seq", params)
        return [OutboxEntry(r[0], r[1], r[2], r[3], json.loads(r[4]), bool(r[5])) for r in rows]

    async def delivered(self, entry: OutboxEntry, version: int) -> None:
        statements: list[tuple[str, tuple[Any, ...]]] = [
            ("DELETE FROM outbox WHERE seq=?", (entry.seq,)),
            ("UPDATE executions SET version=?, updated_at=? "
             "WHERE job_id=? AND execution_number=?", (version, self._clock(), *entry.key))]
        if entry.final:
            statements.append(("UPDATE executions SET state='done' "
                               "WHERE job_id=? AND execution_number=?", entry.key))
        await self._write(*statements)

    # ------------------------------------------------------------------ retention

    async def prune(self, max_age: float, max_records: int) -> list[tuple[str, int]]:
        """Forget finished executions older than ``max_age`` or beyond ``max_records``.

        Open executions are never pruned: they are what the journal is for. Returns the keys
        removed, so the caller can delete their logs and work directories.
        """
        cutoff = self._clock() - max_age
        rows = await self._query(
            "SELECT job_id, execution_number FROM executions WHERE state='done' AND "
            "(updated_at < ? OR rowid NOT IN (SELECT rowid FROM executions WHERE state='done' "
            "ORDER BY updated_at DESC LIMIT ?))", (cutoff, max_records))
        if rows:
            await self._run(self._delete_many, [tuple(r) for r in rows])
        return [(r[0], r[1]) for r in rows]

    def _delete_many(self, keys: list[tuple[str, int]]) -> None:
        self._tx([("DELETE FROM executions WHERE job_id=? AND execution_number=?", k)
                  for k in keys])

    # ------------------------------------------------------------------ other protocols' tables

    async def apply_schema(self, script: str) -> None:
        """Create another protocol's tables in this file (``CREATE ... IF NOT EXISTS``).

        Same file, same thread, same durability; such tables are additive, so an older agent
        opening the file ignores them and no schema version is needed for them.
        """
        def apply() -> None:
            if self._db is None:
                raise JournalError("the journal is not open")
            try:
                self._db.executescript(script)
            except (sqlite3.Error, OSError) as exc:
                raise JournalError(f"cannot write the journal {self.path}: {exc}") from exc

        await self._run(apply)

    async def write(self, *statements: tuple[str, tuple[Any, ...]]) -> None:
        """Run ``statements`` in one transaction (all or nothing)."""
        await self._write(*statements)

    async def transact(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(db)`` in one transaction on the journal thread: a read and the write it decides
        on cost one thread hop and one commit (a failure rolls it all back)."""
        def run() -> T:
            db = self._db
            if db is None:
                raise JournalError("the journal is not open")
            try:
                db.execute("BEGIN IMMEDIATE")
                result = fn(db)
                db.execute("COMMIT")
            except (sqlite3.Error, OSError) as exc:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise JournalError(f"cannot write the journal {self.path}: {exc}") from exc
            return result

        return await self._run(run)

    async def select(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return await self._query(sql, params)


_COLUMNS = ("job_id, execution_number, operation, document, state, version, step_minutes, "
            "attempts, pid, pid_start, boot_id, result, updated_at")


def _record(row: tuple[Any, ...]) -> Record:
    return Record(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5], row[6], row[7],
                  row[8], row[9], row[10], json.loads(row[11]) if row[11] else None, row[12])
