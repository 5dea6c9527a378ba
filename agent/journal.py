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
        |     rebooting/restarting+
        +-----------------------------> done   (claim refused / job gone)

An execution in the journal is never claimed again, whatever notifications say. What "an
execution" is: (jobId, executionNumber) *and* ``queued_at``, since AWS may reuse both after a
deletion (see :mod:`agent.claims`). A record whose execution was deleted and its key reused is
*archived*, whatever its state (``archived_at`` set, its outbox dropped): kept as history under
its own ``id``, never touched again by the key-based methods, which all address the current
(unarchived) row of a key.

The ``steps`` table records where an execution's plan stands: one row per step started, keyed
by the execution's ``id`` (so an archived incarnation keeps its own), with the starts of that
step (the crash-loop guard counts per step) and how it ended, so a restarted agent resumes a
plan at the step that was interrupted.

Schema 2 (this version) adds ``id``, ``queued_at`` and ``archived_at`` to ``executions``, the
``steps`` table, and records in ``meta`` which thing and MQTT endpoint the journal belongs to; a
journal of schema 1 is migrated in place on open (``queued_at`` unknown: NULL). The
``command_executions`` table (AWS IoT Commands, :mod:`agent.commands.journal`) is additive:
created if missing at every open, whatever the version, so it needs no version of its own, and
an agent that predates it ignores it. A journal opened for another thing or endpoint is moved
aside (``journal.db.previous-<time>``) and a new one started: its records are about executions
that this device's cloud identity never had.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from agent.errors import JournalError

__all__ = ["Journal", "OutboxEntry", "Record", "StepRecord"]

log = logging.getLogger("agent.journal")

T = TypeVar("T")
SCHEMA_VERSION = 2
_META = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
_EXECUTIONS = """
CREATE TABLE IF NOT EXISTS executions (
    id INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL,
    execution_number INTEGER NOT NULL,
    queued_at INTEGER,
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
    archived_at REAL
)"""
_INDEXES = (
    "CREATE UNIQUE INDEX IF NOT EXISTS executions_current "
    "ON executions (job_id, execution_number) WHERE archived_at IS NULL",
    "CREATE INDEX IF NOT EXISTS executions_state ON executions (state, updated_at)",
)
_STEPS = """
CREATE TABLE IF NOT EXISTS steps (
    execution_id INTEGER NOT NULL,
    step INTEGER NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    updated_at REAL NOT NULL,
    PRIMARY KEY (execution_id, step)
)"""
_OUTBOX = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    execution_number INTEGER NOT NULL,
    status TEXT NOT NULL,
    details TEXT NOT NULL,
    final INTEGER NOT NULL,
    created_at REAL NOT NULL
)"""
# AWS IoT Commands: one row per executionId (agent.commands.journal has the queries). Additive
# (IF NOT EXISTS at every open): a schema-2 journal written before Commands simply gains it.
_COMMAND_EXECUTIONS = (
    """
CREATE TABLE IF NOT EXISTS command_executions (
    execution_id TEXT PRIMARY KEY,
    operation TEXT,
    document TEXT,
    state TEXT NOT NULL,
    deadline REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    pid INTEGER,
    pid_start INTEGER,
    boot_id TEXT,
    final TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS command_executions_state "
    "ON command_executions (state, updated_at)",
)
# Schema 1 -> 2: the primary key (job_id, execution_number) cannot hold two incarnations of
# one key, and SQLite cannot drop a primary key: rebuild the table, keeping every row.
_V1_COLUMNS = ("job_id, execution_number, operation, document, state, version, step_minutes, "
               "attempts, pid, pid_start, boot_id, result, created_at, updated_at")
_MIGRATE_1_TO_2 = (
    "ALTER TABLE executions RENAME TO executions_v1",
    "DROP INDEX IF EXISTS executions_state",
    _EXECUTIONS,
    f"INSERT INTO executions ({_V1_COLUMNS}) SELECT {_V1_COLUMNS} FROM executions_v1 "
    "ORDER BY created_at",
    "DROP TABLE executions_v1",
    *_INDEXES,
)
_CURRENT = "job_id=? AND execution_number=? AND archived_at IS NULL"
# The current incarnation's id, for the steps of ``key`` (parameters: job_id, execution_number).
_CURRENT_ID = f"(SELECT id FROM executions WHERE {_CURRENT})"
OPEN_STATES = ("claiming", "running", "rebooting", "restarting", "finished")


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
    queued_at: int | None = None  # the cloud's queuedAt; None: journaled by schema 1
    archived_at: float | None = None  # set once the execution was deleted and its key reused
    row_id: int | None = None  # this incarnation's own id (stable; archived ones keep theirs)

    @property
    def key(self) -> tuple[str, int]:
        return (self.job_id, self.execution_number)

    @property
    def stem(self) -> str:
        """The name of its log (``<stem>.log``) and work directory: ``<job>.<n>``, and once
        archived :attr:`archived_stem`."""
        return f"{self.job_id}.{self.execution_number}" if self.archived_at is None \
            else self.archived_stem

    @property
    def archived_stem(self) -> str:
        """``<job>.<n>@<id>``: unique per incarnation (job ids never contain ``@``)."""
        return f"{self.job_id}.{self.execution_number}@{self.row_id}"


@dataclass(frozen=True)
class StepRecord:
    """One step of an execution's plan that was started: ``running`` until it ended
    ``succeeded``, ``failed`` or ``ignored`` (failed with ignoreStepFailure)."""

    step: int
    name: str
    state: str
    attempts: int
    reason: str | None


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

    def __init__(self, path: Path, clock: Callable[[], float] = time.time, *,
                 thing_name: str | None = None, endpoint: str | None = None) -> None:
        """``thing_name`` and ``endpoint``: whose journal this is (None: not checked)."""
        self.path = Path(path)
        self._clock = clock
        self._owner = {"thing_name": thing_name, "endpoint": endpoint}
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
            aside = self._move_aside("corrupt")
            log.critical("journal %s is corrupt (%s); moved aside to %s and starting a new one. "
                         "Jobs it was tracking will be reported FAILED as unknown to the agent.",
                         self.path, exc, aside)
            self._db = self._connect()
        other = _other_owner(self._db, self._owner)
        if other:
            self._db.close()
            aside = self._move_aside("previous")
            log.warning("journal %s belongs to %s, not to this agent's %s; moved aside to %s and "
                        "starting a new one", self.path, _owner_text(other),
                        _owner_text(self._owner), aside)
            self._db = self._connect()
        with contextlib.suppress(sqlite3.Error):  # a read-only journal can still be read
            self._db.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)",
                                 [(k, v) for k, v in self._owner.items() if v is not None])

    def _move_aside(self, why: str) -> Path:
        """Rename the journal (and its WAL files) to ``journal.db.<why>-<time>``; never over an
        earlier one."""
        stamp = int(self._clock())
        aside = self.path.with_name(f"{self.path.name}.{why}-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{self.path.name}.{why}-{stamp}.{n}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{self.path}{suffix}")
            if source.exists():
                source.rename(Path(f"{aside}{suffix}"))
        return aside

    def _connect(self) -> sqlite3.Connection:
        _make_private(self.path)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=5000")
            check = db.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise sqlite3.DatabaseError(f"integrity check: {check}")
            db.execute(_META)
            version = _schema_version(db)
            if version is not None and version > SCHEMA_VERSION:
                raise JournalError(f"journal {self.path} was written by a newer agent "
                                   f"(schema {version}); upgrade the agent or move the file away")
            if version == 1:
                self._migrate(db)
            else:
                _transaction(db, [_EXECUTIONS, *_INDEXES, _STEPS, _OUTBOX, *_COMMAND_EXECUTIONS,
                                  "INSERT OR IGNORE INTO meta VALUES ('schema', "
                                  f"'{SCHEMA_VERSION}')"])
        except BaseException:
            db.close()
            raise
        return db

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Schema 1 -> 2, in one transaction: a crash leaves schema 1, migrated next time.

        A failure here (a full disk) is a :class:`JournalError`, never "corrupt": moving a
        healthy journal aside would lose the executions it tracks.
        """
        try:
            _transaction(db, [*_MIGRATE_1_TO_2, _STEPS, _OUTBOX, *_COMMAND_EXECUTIONS,
                              f"INSERT OR REPLACE INTO meta VALUES ('schema', "
                              f"'{SCHEMA_VERSION}')"])
        except sqlite3.Error as exc:
            raise JournalError(f"cannot migrate the journal {self.path} to schema "
                               f"{SCHEMA_VERSION}: {exc}; free space in its directory and "
                               "start the agent again") from None
        count = db.execute("SELECT count(*) FROM executions").fetchone()[0]
        log.info("journal migrated from schema 1 to %d path=%s executions=%d (their queuedAt "
                 "is unknown; versions tell a reused job id)", SCHEMA_VERSION, self.path, count)

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
        """The current record of ``key`` (never an archived one)."""
        rows = await self._query(f"SELECT {_COLUMNS} FROM executions WHERE {_CURRENT}", key)
        return _record(rows[0]) if rows else None

    async def history(self, key: tuple[str, int]) -> list[Record]:
        """Every incarnation of ``key`` this journal holds, oldest first (archived ones too)."""
        rows = await self._query(f"SELECT {_COLUMNS} FROM executions WHERE job_id=? AND "
                                 "execution_number=? ORDER BY id", key)
        return [_record(r) for r in rows]

    async def open_records(self) -> list[Record]:
        marks = ",".join("?" * len(OPEN_STATES))
        rows = await self._query(f"SELECT {_COLUMNS} FROM executions WHERE state IN ({marks}) "
                                 "AND archived_at IS NULL ORDER BY created_at", OPEN_STATES)
        return [_record(r) for r in rows]

    async def claiming(self, key: tuple[str, int], operation: str, document: dict[str, Any],
                       version: int, step_minutes: int, *, queued_at: int | None = None) -> None:
        """Committed before the claim is sent: a crash now leaves "never started"."""
        now = self._clock()
        await self._write((
            "INSERT INTO executions (job_id, execution_number, queued_at, operation, document, "
            "state, version, step_minutes, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (*key, queued_at, operation, json.dumps(document), "claiming", version,
             step_minutes, now, now)))

    async def archive(self, key: tuple[str, int]) -> None:
        """The execution of ``key`` was deleted and the key reused: keep the record as history
        (under its own ``id``) and drop what was owed to it; ``key`` is free again."""
        await self._write(
            ("DELETE FROM outbox WHERE job_id=? AND execution_number=?", key),
            (f"UPDATE executions SET archived_at=? WHERE {_CURRENT}", (self._clock(), *key)))

    async def update(self, key: tuple[str, int], **fields: Any) -> None:
        if "result" in fields and fields["result"] is not None:
            fields["result"] = json.dumps(fields["result"])
        fields["updated_at"] = self._clock()
        sets = ", ".join(f"{name}=?" for name in fields)
        await self._write((f"UPDATE executions SET {sets} WHERE {_CURRENT}",
                           (*fields.values(), *key)))

    async def started(self, key: tuple[str, int], step: int, name: str,
                      boot_id: str | None, *, version: int | None = None) -> None:
        """Step ``step`` of the plan is about to start: committed before its program can do
        anything that matters (see runner.start). Counts a start of the execution and of the
        step; the pid is recorded once known (:meth:`update`). ``version``: the cloud's
        version of the execution, in the same commit (after a claim, it was its own commit
        with nothing between the two: issue 12)."""
        now = self._clock()
        await self._write(
            ("UPDATE executions SET state='running', version=COALESCE(?, version), "
             "attempts=attempts+1, pid=NULL, pid_start=NULL, boot_id=?, updated_at=? "
             f"WHERE {_CURRENT}", (version, boot_id, now, *key)),
            ("INSERT INTO steps (execution_id, step, name, state, attempts, updated_at) "
             f"VALUES ({_CURRENT_ID},?,?,'running',1,?) ON CONFLICT (execution_id, step) DO "
             "UPDATE SET state='running', attempts=attempts+1, reason=NULL, "
             "updated_at=excluded.updated_at", (*key, step, name, now)))

    async def step_ended(self, key: tuple[str, int], step: int, state: str,
                         reason: str) -> None:
        """How step ``step`` ended: ``succeeded``, ``failed`` or ``ignored``."""
        await self._write((f"UPDATE steps SET state=?, reason=?, updated_at=? WHERE "
                           f"execution_id={_CURRENT_ID} AND step=?",
                           (state, reason, self._clock(), *key, step)))

    async def steps(self, key: tuple[str, int]) -> list[StepRecord]:
        """The steps of the current execution of ``key`` started so far, in plan order."""
        rows = await self._query("SELECT step, name, state, attempts, reason FROM steps WHERE "
                                 f"execution_id={_CURRENT_ID} ORDER BY step", key)
        return [StepRecord(*row) for row in rows]

    async def finish(self, key: tuple[str, int], status: str, details: dict[str, str],
                     *, state: str = "finished",
                     step: tuple[int, str, str] | None = None) -> None:
        """The verdict and the update that reports it, committed together; with ``step``
        (index, state, reason), how the last step ended too, in the same commit."""
        now = self._clock()
        statements: list[tuple[str, tuple[Any, ...]]] = [
            (f"UPDATE executions SET state=?, result=?, updated_at=? WHERE {_CURRENT}",
             (state, json.dumps({"status": status, "details": details, "finishedAt": now}),
              now, *key)),
            ("INSERT INTO outbox (job_id, execution_number, status, details, final, created_at) "
             "VALUES (?,?,?,?,?,?)",
             (*key, status, json.dumps(details), int(status != "IN_PROGRESS"), now))]
        if step is not None:
            statements.append((f"UPDATE steps SET state=?, reason=?, updated_at=? WHERE "
                               f"execution_id={_CURRENT_ID} AND step=?",
                               (step[1], step[2], now, *key, step[0])))
        await self._write(*statements)

    async def forget(self, key: tuple[str, int]) -> None:
        """Remove an execution that was never claimed (the claim did not go through)."""
        await self._write(
            ("DELETE FROM outbox WHERE job_id=? AND execution_number=?", key),
            (f"DELETE FROM steps WHERE execution_id={_CURRENT_ID}", key),
            (f"DELETE FROM executions WHERE {_CURRENT}", key))

    async def done(self, key: tuple[str, int]) -> None:
        """Nothing more is owed for this execution (delivered, or the cloud ended it)."""
        await self._write(
            ("DELETE FROM outbox WHERE job_id=? AND execution_number=?", key),
            (f"UPDATE executions SET state='done', updated_at=? WHERE {_CURRENT}",
             (self._clock(), *key)))

    # ------------------------------------------------------------------ outbox

    async def outbox(self, key: tuple[str, int] | None = None) -> list[OutboxEntry]:
        where, params = ("WHERE job_id=? AND execution_number=?", key) if key else ("", ())
        rows = await self._query("SELECT seq, job_id, execution_number, status, details, final "
                                 f"FROM outbox {where} ORDER BY seq", params)
        return [OutboxEntry(r[0], r[1], r[2], r[3], json.loads(r[4]), bool(r[5])) for r in rows]

    async def delivered(self, entry: OutboxEntry, version: int) -> None:
        statements: list[tuple[str, tuple[Any, ...]]] = [
            ("DELETE FROM outbox WHERE seq=?", (entry.seq,)),
            (f"UPDATE executions SET version=?, updated_at=? WHERE {_CURRENT}",
             (version, self._clock(), *entry.key))]
        if entry.final:
            statements.append((f"UPDATE executions SET state='done' WHERE {_CURRENT}",
                               entry.key))
        await self._write(*statements)

    # ------------------------------------------------------------------ retention

    async def prune(self, max_age: float, max_records: int) -> list[Record]:
        """Forget finished executions older than ``max_age`` or beyond ``max_records``.

        Open executions are never pruned: they are what the journal is for. Archived ones count
        as finished. Returns the records removed, so the caller can delete their logs and work
        directories (:attr:`Record.stem`).
        """
        cutoff = self._clock() - max_age
        ended = "(state='done' OR archived_at IS NOT NULL)"
        rows = await self._query(
            f"SELECT {_COLUMNS} FROM executions WHERE {ended} AND (updated_at < ? OR id NOT IN "
            f"(SELECT id FROM executions WHERE {ended} ORDER BY updated_at DESC LIMIT ?))",
            (cutoff, max_records))
        records = [_record(r) for r in rows]
        if records:
            await self._run(self._tx, [(f"DELETE FROM {table} WHERE {column}=?", (r.row_id,))
                                       for r in records
                                       for table, column in (("steps", "execution_id"),
                                                             ("executions", "id"))])
        return records

    # ------------------------------------------------------------------ other protocols' tables
    # (their tables are created by _connect with the others; their queries live with them)

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
            "attempts, pid, pid_start, boot_id, result, updated_at, queued_at, archived_at, id")


def _record(row: tuple[Any, ...]) -> Record:
    return Record(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5], row[6], row[7],
                  row[8], row[9], row[10], json.loads(row[11]) if row[11] else None, row[12],
                  row[13], row[14], row[15])


def _transaction(db: sqlite3.Connection, statements: list[str]) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        for sql in statements:
            db.execute(sql)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _schema_version(db: sqlite3.Connection) -> int | None:
    """The journal's schema; a file with an executions table but no version row is schema 1
    (schema 1 created its tables before writing the row)."""
    row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
    if row is not None:
        return int(row[0])
    table = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND "
                       "name='executions'").fetchone()
    return 1 if table else None


def _make_private(path: Path) -> None:
    """The journal (and its WAL files, which SQLite creates with the journal's mode) readable
    by the agent's user only: state_dir lets others pass through (agent.paths), and documents
    may hold what only the job's handler should see."""
    for suffix, create in (("", os.O_CREAT), ("-wal", 0), ("-shm", 0)):
        try:
            fd = os.open(f"{path}{suffix}", os.O_RDONLY | create | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
        except OSError:
            continue  # missing, or not ours to open: sqlite says what is wrong
        try:
            info = os.fstat(fd)
            if info.st_uid == os.geteuid() and info.st_mode & 0o077:
                os.fchmod(fd, 0o600)
        except OSError:
            pass
        finally:
            os.close(fd)


def _other_owner(db: sqlite3.Connection, owner: dict[str, str | None]) -> dict[str, str]:
    """The recorded owner, if it differs from ``owner`` in a key both name ({} otherwise)."""
    stored = dict(db.execute("SELECT key, value FROM meta WHERE key IN "
                             "('thing_name', 'endpoint')").fetchall())
    differs = any(value is not None and stored.get(key) not in (None, value)
                  for key, value in owner.items())
    return stored if differs else {}


def _owner_text(owner: dict[str, Any]) -> str:
    return " ".join(f"{'thing' if k == 'thing_name' else k}={v or '?'}"
                    for k, v in sorted(owner.items(), reverse=True))
