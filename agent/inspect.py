"""Read-only questions to the journal: what ran, how it ended, what is still owed.

The one place that knows how the inspection commands (``status``, ``jobs``, ``log``) read the
journal's tables. Each query is a plain function of a ``sqlite3.Connection``, so the same code
serves the command line (a read-only connection of its own, :class:`JournalReader`) and the
running agent (on its journal thread, through :meth:`agent.journal.Journal.read`).

Reading never disturbs the agent: the connection is opened ``mode=ro`` (it cannot write, so it
never checkpoints), and in WAL mode readers neither block the agent's writes nor wait for them.
Rows are read by column name, so columns a newer schema adds do not break these queries.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from agent.config import Config
from agent.errors import NotReadableError, UnknownJobError
from agent.procfs import boot_id, process_start_time
from agent.statefile import liveness, read_state, state_path

__all__ = [
    "ACTIVE_STATES",
    "Execution",
    "JournalReader",
    "JournalSize",
    "Owed",
    "Target",
    "copy_log",
    "execution",
    "executions",
    "journal_path",
    "journal_size",
    "log_path",
    "logs_dir",
    "open_executions",
    "owed",
    "status_report",
]

JOURNAL_FILE = "journal.db"
ACTIVE_STATES = ("claiming", "running")
"""Journal states in which a handler is (or is about to be) running."""
_OPEN_STATES = ("claiming", "running", "rebooting", "finished")
_ENDED_IN_CLOUD = ("ended in the cloud (canceled, deleted or timed out) before this device "
                   "reported a result")


def journal_path(state_dir: Path | str) -> Path:
    return Path(state_dir) / JOURNAL_FILE


def log_path(logs_dir: Path, job_id: str, execution_number: int) -> Path:
    """Where the runner writes a handler's output (see ``Dispatcher._request``)."""
    return Path(logs_dir) / f"{job_id}.{execution_number}.log"


@dataclass(frozen=True)
class Execution:
    """One execution as the journal holds it, in the words an operator reads.

    ``status`` is the Jobs status (boto3's values): ``IN_PROGRESS`` while the device has it,
    then the one it reported (or still owes, ``owed``); None when the cloud ended the execution
    before the device reported anything (canceled or deleted while it ran).
    """

    job_id: str
    execution_number: int
    handler: str
    state: str  # the journal's: claiming, running, rebooting, finished (status owed), done
    status: str | None
    started_at: float  # when the device claimed it (boto3's startedAt: QUEUED -> IN_PROGRESS)
    finished_at: float | None
    updated_at: float
    duration: float | None  # the handler's run time, when it ran to an end
    reason: str | None
    details: dict[str, str] = field(default_factory=dict)
    attempts: int = 0
    pid: int | None = None
    pid_start: int | None = None
    owed: bool = False

    @property
    def key(self) -> tuple[str, int]:
        return (self.job_id, self.execution_number)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def to_json(self, logs_dir: Path | None = None) -> dict[str, Any]:
        """boto3's key names where one exists (``jobId``, ``executionNumber``, ``status``,
        ``startedAt``, ``lastUpdatedAt``, ``statusDetails``); times in epoch seconds; a value
        the journal does not have is absent, not null (as in ``pending``)."""
        out: dict[str, Any] = {
            "jobId": self.job_id,
            "executionNumber": self.execution_number,
            "handler": self.handler,
            "state": self.state,
        }
        if self.status is not None:
            out["status"] = self.status
        out["startedAt"] = int(self.started_at)
        if self.finished_at is not None:
            out["finishedAt"] = int(self.finished_at)
        out["lastUpdatedAt"] = int(self.updated_at)
        if self.duration is not None:
            out["durationSeconds"] = round(self.duration, 3)
        if self.reason is not None:
            out["reason"] = self.reason
        out["statusOwed"] = self.owed
        out["attempts"] = self.attempts
        if self.pid is not None and self.active:
            out["pid"] = self.pid
        if self.details:
            out["statusDetails"] = self.details
        if logs_dir is not None:
            path = log_path(logs_dir, self.job_id, self.execution_number)
            if path.exists():
                out["logPath"] = str(path)
        return out


@dataclass(frozen=True)
class Owed:
    """Statuses the journal's outbox still owes the cloud."""

    count: int
    oldest_at: float | None = None
    oldest_job: tuple[str, int] | None = None
    oldest_status: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"count": self.count}
        if self.oldest_job is not None and self.oldest_at is not None:
            out["oldest"] = {"jobId": self.oldest_job[0], "executionNumber": self.oldest_job[1],
                             "status": self.oldest_status, "since": int(self.oldest_at)}
        return out


@dataclass(frozen=True)
class JournalSize:
    path: Path
    db: int
    wal: int

    @property
    def total(self) -> int:
        return self.db + self.wal


# --------------------------------------------------------------------------- queries


def _rows(db: sqlite3.Connection, sql: str, params: tuple[Any, ...] = ()) -> Any:
    """Yield each row as a dict by column name (whatever the connection's row_factory)."""
    cursor = db.execute(sql, params)
    names = [d[0] for d in cursor.description]
    for row in cursor:
        yield dict(zip(names, row, strict=True))


_SELECT = ("SELECT e.*, EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = e.job_id AND "
           "o.execution_number = e.execution_number) AS owed FROM executions e")


def _execution(row: dict[str, Any]) -> Execution:
    result = _json(row.get("result")) or {}
    details = result.get("details") if isinstance(result.get("details"), dict) else {}
    state = str(row["state"])
    status = result.get("status") if isinstance(result.get("status"), str) else None
    if status is None and state in (*ACTIVE_STATES, "rebooting"):
        status = "IN_PROGRESS"
    ended = status not in (None, "IN_PROGRESS")
    finished = result.get("finishedAt")
    if not isinstance(finished, int | float):
        finished = row["updated_at"] if ended or state == "done" else None
    reason = details.get("reason")
    if status is None and state == "done":
        reason = _ENDED_IN_CLOUD
    elif state == "rebooting":
        reason = reason or "rebooting, as the handler asked"
    try:
        duration = float(details["durationSeconds"])
    except (KeyError, TypeError, ValueError):
        duration = finished - row["created_at"] if finished is not None and ended else None
    return Execution(
        job_id=row["job_id"], execution_number=int(row["execution_number"]),
        handler=row["operation"], state=state, status=status,
        started_at=float(row["created_at"]), finished_at=finished,
        updated_at=float(row["updated_at"]), duration=duration,
        reason=reason, details={str(k): str(v) for k, v in details.items()},
        attempts=int(row.get("attempts") or 0), pid=row.get("pid"),
        pid_start=row.get("pid_start"), owed=bool(row.get("owed")))


def _json(text: object) -> Any:
    if not isinstance(text, str):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def executions(db: sqlite3.Connection, *, limit: int | None = None,
               status: str | None = None) -> list[Execution]:
    """Newest claim first; ``status`` filters on :attr:`Execution.status` (case-insensitive)."""
    wanted = status.upper() if status else None
    out: list[Execution] = []
    for row in _rows(db, f"{_SELECT} ORDER BY e.created_at DESC, e.execution_number DESC"):
        item = _execution(row)
        if wanted is not None and (item.status or "").upper() != wanted:
            continue
        out.append(item)
        if limit is not None and len(out) >= limit:
            break
    return out


def execution(db: sqlite3.Connection, job_id: str,
              execution_number: int | None = None) -> Execution:
    """That execution of ``job_id``, or its newest; :class:`UnknownJobError` if there is none."""
    if execution_number is None:
        # The newest claim, not the highest number: a job deleted and created again under the
        # same id starts again at execution 1.
        rows = list(_rows(db, f"{_SELECT} WHERE e.job_id = ? ORDER BY e.created_at DESC, "
                              "e.execution_number DESC LIMIT 1", (job_id,)))
    else:
        rows = list(_rows(db, f"{_SELECT} WHERE e.job_id = ? AND e.execution_number = ?",
                          (job_id, execution_number)))
    if rows:
        return _execution(rows[0])
    if execution_number is not None and list(_rows(
            db, "SELECT 1 FROM executions WHERE job_id = ? LIMIT 1", (job_id,))):
        raise UnknownJobError(f"job {job_id} has no execution {execution_number} in the journal "
                              f"(see `iot-jobs-agent jobs`)")
    raise UnknownJobError(f"no job {job_id} in the journal: never run on this device, or pruned "
                          "after `retention` (see `iot-jobs-agent jobs`)")


def open_executions(db: sqlite3.Connection) -> list[Execution]:
    """Executions the agent has not finished with (running, rebooting, or a status owed)."""
    marks = ",".join("?" * len(_OPEN_STATES))
    return [_execution(r) for r in _rows(
        db, f"{_SELECT} WHERE e.state IN ({marks}) ORDER BY e.created_at", _OPEN_STATES)]


def owed(db: sqlite3.Connection) -> Owed:
    (count,) = db.execute("SELECT COUNT(*) FROM outbox").fetchone()
    if not count:
        return Owed(0)
    first = next(_rows(db, "SELECT job_id, execution_number, status, created_at FROM outbox "
                           "ORDER BY seq LIMIT 1"))
    return Owed(int(count), float(first["created_at"]),
                (first["job_id"], int(first["execution_number"])), first["status"])


def journal_size(path: Path) -> JournalSize:
    def size(p: Path) -> int:
        try:
            return p.stat().st_size
        except OSError:
            return 0

    return JournalSize(path, size(path), size(Path(f"{path}-wal")))


# --------------------------------------------------------------------------- the reader


class JournalReader:
    """A read-only connection to the journal for the inspection commands::

        with JournalReader(journal_path(config.state_dir)) as db:
            rows = executions(db, limit=20)

    Every way of failing to read is one :class:`NotReadableError` naming the file and the fix.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None

    def __enter__(self) -> sqlite3.Connection:
        path = self.path
        try:
            path.stat()
        except FileNotFoundError:
            raise NotReadableError(
                f"no journal at {path}: the agent has not run with state_dir {path.parent} "
                "(is --config the agent's config?)") from None
        except PermissionError:
            raise self._denied() from None
        except OSError as exc:
            raise NotReadableError(f"cannot read the journal {path}: {exc.strerror}") from None
        if not os.access(path, os.R_OK):
            raise self._denied()
        uri = f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro"
        try:
            db = sqlite3.connect(uri, uri=True, timeout=5.0, isolation_level=None,
                                 check_same_thread=False)
            try:
                db.execute("SELECT job_id, execution_number, state FROM executions LIMIT 1")
                db.execute("SELECT seq FROM outbox LIMIT 1")
            except BaseException:
                db.close()
                raise
        except sqlite3.Error as exc:
            raise NotReadableError(f"cannot read the journal {path}: {exc}") from None
        self._db = db
        return db

    def _denied(self) -> NotReadableError:
        return NotReadableError(f"cannot read the journal {self.path}: permission denied; run "
                                "this command as root (sudo) or as the agent's user")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if isinstance(exc, sqlite3.Error):
            raise NotReadableError(f"cannot read the journal {self.path}: {exc}") from exc


# --------------------------------------------------------------------------- status


def logs_dir(state_dir: Path | str, state: dict[str, Any] | None) -> Path:
    """Where the agent puts per-job logs: as its state file says (systemd's ``LogsDirectory=``
    is only in the agent's environment), else ``state_dir/logs``."""
    recorded = (state or {}).get("job_logs")
    return Path(recorded) if isinstance(recorded, str) and recorded else Path(state_dir) / "logs"


@dataclass(frozen=True)
class Target:
    """What the inspection commands need from the agent's config: where its state is."""

    state_dir: Path
    boot_id_path: Path
    thing_name: str | None = None
    endpoint: str | None = None

    @classmethod
    def of(cls, config: Config) -> Target:
        return cls(Path(config.state_dir), Path(config.boot_id_path), config.thing_name,
                   f"{config.mqtt.endpoint}:{config.mqtt.port}")

    @classmethod
    def lenient(cls, path: Path) -> Target:
        """The same keys from a config with problems elsewhere (or none at all: defaults).

        Someone who broke the config (and whose reload the agent refused) must still be able
        to see what the running agent does, and to tell it to reload once the file is fixed.
        """
        import yaml

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError):
            data = None
        data = data if isinstance(data, dict) else {}
        base = path.resolve().parent

        def where(name: str) -> Path:
            value = data.get(name)
            default = {f.name: f.default for f in dataclasses.fields(Config)}[name]
            return base / value if isinstance(value, str) and value else Path(default)

        mqtt = data.get("mqtt") if isinstance(data.get("mqtt"), dict) else {}
        thing = data.get("thing_name")
        return cls(where("state_dir"), where("boot_id_path"),
                   thing if isinstance(thing, str) else None,
                   f"{mqtt.get('endpoint')}:{mqtt.get('port', 8883)}" if mqtt.get("endpoint")
                   else None)


def status_report(config: Target, now: float) -> dict[str, Any]:
    """What ``status --json`` prints: the live agent's state file if it runs, the journal in
    any case (owed statuses, unfinished executions, size).

    :class:`NotReadableError` if the state file or the journal exists but cannot be read:
    the caller must not guess "not running".
    """
    state = read_state(state_path(config.state_dir))
    alive = liveness(state, current_boot=lambda: boot_id(config.boot_id_path))
    live = state if alive.running and state is not None else None
    known = state or {}
    connection = (live or {}).get("connection") or {}
    connected = bool(connection.get("connected"))
    report: dict[str, Any] = {
        "running": alive.running,
        "why": alive.why,
        "pid": known.get("pid") if alive.running else None,
        "phase": known.get("phase") if alive.running else "stopped",
        "version": known.get("version"),
        "thing_name": known.get("thing_name") or config.thing_name,
        "started_at": known.get("started_at") if alive.running else None,
        "connected": connected,
        "endpoint": connection.get("endpoint") or config.endpoint,
        "connected_since": connection.get("since") if connected else None,
        "disconnected_since": None if connected or live is None else connection.get("since"),
        "last_error": connection.get("last_error"),
        "reconnects": connection.get("reconnects", 0),
        "last_sync": known.get("last_sync"),
        "last_sync_error": (live or {}).get("last_sync_error"),
        "refusing_jobs": bool(_refusing(live)),
        "refusing_reason": _refusing(live),
        "running_jobs": [_running_job(j, now) for j in (live or {}).get("running_jobs", [])],
        "last_reload": (live or {}).get("reload"),
        "state_file": str(state_path(config.state_dir)),
    }
    path = journal_path(config.state_dir)
    try:
        with JournalReader(path) as db:
            report["owed_statuses"] = owed(db).to_json()
            unfinished = [] if alive.running else open_executions(db)
    except NotReadableError:
        if path.exists() or state is not None:
            raise
        report.update(owed_statuses={"count": 0}, journal=None)
        return report
    report["open_executions"] = [
        {**e.to_json(), "handlerAlive": e.pid is not None
         and process_start_time(e.pid) == e.pid_start} for e in unfinished]
    size = journal_size(path)
    report["journal"] = {"path": str(path), "bytes": size.db, "wal_bytes": size.wal}
    return report


def _refusing(live: dict[str, Any] | None) -> str | None:
    if live is None:
        return None
    if live.get("phase") == "stopping":
        return "the agent is stopping"
    refusing = live.get("refusing")
    return refusing if isinstance(refusing, str) and refusing else None


def _running_job(job: dict[str, Any], now: float) -> dict[str, Any]:
    started = job.get("startedAt")
    out = dict(job)
    if isinstance(started, int | float):
        out["runningSeconds"] = round(max(0.0, now - started), 1)
    return out


# --------------------------------------------------------------------------- logs


def copy_log(path: Path, out: BinaryIO, still_running: Callable[[], bool] | None = None, *,
             poll: float = 0.2, check_every: float = 1.0) -> None:
    """Copy the log at ``path`` to ``out``; with ``still_running``, keep copying what the
    handler appends (``tail -f``) until it says the job ended, then copy the rest.

    Polls rather than inotify (the standard library has none): a person watching a log does not
    notice 200 ms, and the agent is not involved at all. ``still_running`` (a journal query) is
    asked at most every ``check_every`` seconds, and once more after the log stops growing.
    """
    handle = None
    checked = float("-inf")
    try:
        while True:
            if handle is None:
                try:
                    handle = path.open("rb")
                except FileNotFoundError:
                    if still_running is None:
                        raise
            chunk = handle.read(65536) if handle is not None else b""
            if chunk:
                out.write(chunk)
                continue
            out.flush()
            if still_running is None:
                return
            now = time.monotonic()
            if now - checked >= check_every:
                checked = now
                if not still_running():
                    if handle is None and path.exists():
                        continue  # it appeared just now: copy it before returning
                    if handle is not None:
                        out.write(handle.read())
                        out.flush()
                    return
            time.sleep(poll)
    finally:
        if handle is not None:
            handle.close()
