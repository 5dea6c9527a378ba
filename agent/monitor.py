"""The agent's view of itself for people and scrapers: the state file and the metrics file.

:class:`Monitor` lives on the agent's loop. It listens (a connection listener, the dispatcher's
``on_change`` and ``on_outcome`` hooks, reloads) and, when something changed, rewrites
``state_dir/status.json`` (:mod:`agent.statefile`) and, if configured, ``metrics_file``
(:mod:`agent.metrics`), each atomically. Never on a timer: an idle agent does not wake up.
Changes that arrive together are written once, at most every :data:`MIN_INTERVAL` seconds (a
burst of jobs makes several changes per job); a reload's verdict is written at once, because
``iot-jobs-agent reload`` waits for it.

A failure to write (disk full) is logged once and never disturbs the jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config import Config
from agent.errors import JournalError
from agent.files import write_atomic
from agent.journal import Journal
from agent.metrics import Figures, outcome_of, render
from agent.procfs import boot_id, process_start_time
from agent.statefile import FORMAT, state_path

if TYPE_CHECKING:
    from agent.connection import ConnectionEvent
    from agent.dispatcher import Dispatcher

__all__ = ["MIN_INTERVAL", "Monitor"]

log = logging.getLogger("agent.monitor")

MIN_INTERVAL = 0.2
"""Seconds between two writes of the same file while changes keep coming."""


class Monitor:
    """Keep the state file (and the metrics file) in step with the agent; see the module doc."""

    def __init__(self, config: Config, journal: Journal, *, job_logs: Path, version: str,
                 pid: int, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 min_interval: float = MIN_INTERVAL) -> None:
        self.config = config
        self.journal = journal
        self.job_logs = job_logs
        self.pid = pid
        self._clock = clock
        self._monotonic = monotonic
        self.min_interval = min_interval
        self.started_at = clock()
        self.phase = "starting"
        self.stopped_at: float | None = None
        self.connection: dict[str, Any] = {
            "connected": False, "since": self.started_at, "last_error": None, "reconnects": 0,
            "endpoint": f"{config.mqtt.endpoint}:{config.mqtt.port}"}
        self.figures = Figures(version=version, thing_name=config.thing_name,
                               start_time=self.started_at)
        self.reload: dict[str, Any] | None = None
        self._reloads = 0
        self._connects = 0
        self._dispatcher: Dispatcher | None = None
        self._identity = {"pid": pid, "pid_start": process_start_time(pid),
                          "boot_id": boot_id(config.boot_id_path)}
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._dirty = False
        self._last_write = float("-inf")
        self._failing: set[Path] = set()

    # ------------------------------------------------------------------ what it listens to

    def attach(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher

    def on_connection(self, event: ConnectionEvent) -> None:
        """A connection listener (called on the loop)."""
        now = self._clock()
        if event.kind == "connected":
            self._connects += 1
            self.connection.update(connected=True, since=now, last_error=None,
                                   reconnects=max(0, self._connects - 1))
        elif event.kind == "disconnected":
            self.connection.update(connected=False, since=now,
                                   last_error=str(event.error) if event.error else None)
        elif event.kind == "failed":
            self.connection["last_error"] = str(event.error) if event.error else "failed"
        else:
            return
        self.changed()

    def on_outcome(self, key: tuple[str, int], status: str, details: dict[str, str]) -> None:
        """The dispatcher ended an execution (reported ``status``, or the cloud ended it)."""
        outcome = outcome_of(status, details)
        self.figures.jobs[outcome] = self.figures.jobs.get(outcome, 0) + 1
        self.changed()

    def reloaded(self, ok: bool, message: str) -> None:
        """A reload was applied (``ok``) or refused; written at once for ``reload`` to read."""
        self._reloads += 1
        self.reload = {"generation": self._reloads, "at": self._clock(), "ok": ok,
                       "message": message}
        self._write_files(outbox=None)

    def set_phase(self, phase: str) -> None:
        if phase != self.phase:
            self.phase = phase
            self.changed()

    def reconfigure(self, config: Config) -> None:
        """A reload changed settings the monitor applies live (``metrics_file``)."""
        self.config = config
        self.changed()

    # ------------------------------------------------------------------ writing

    def changed(self) -> None:
        """Something shown changed: write soon (coalesced), never more than needed."""
        if self.phase == "stopped":
            return
        if self._timer is not None or self._task is not None:
            self._dirty = True
            return
        delay = max(0.0, self._last_write + self.min_interval - self._monotonic())
        self._timer = asyncio.get_running_loop().call_later(delay, self._flush_soon)

    def _flush_soon(self) -> None:
        self._timer = None
        self._dirty = False
        self._task = asyncio.create_task(self._flush(), name="agent.monitor")
        self._task.add_done_callback(self._flushed)

    def _flushed(self, task: asyncio.Task[None]) -> None:
        self._task = None
        if not task.cancelled() and task.exception() is not None:
            log.error("state file update failed: %s", task.exception())
        if self._dirty:
            self._dirty = False
            self.changed()

    async def _owed(self) -> int:
        """Status updates owed (the outbox), for the metrics file only: :mod:`agent.inspect` is
        imported then, not by every agent (idle RSS, issue 12)."""
        from agent.inspect import owed

        return (await self.journal.read(owed)).count

    async def _flush(self) -> None:
        outbox = None
        if self.config.metrics_file is not None:
            try:
                outbox = await self._owed()
            except JournalError as exc:
                log.debug("outbox size unknown: %s", exc)
        self._write_files(outbox)

    async def close(self) -> None:
        """The agent stopped: say so in both files (call before the journal closes)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        self.phase = "stopped"
        self.stopped_at = self._clock()
        self.connection.update(connected=False, since=self.stopped_at)
        outbox = None
        if self.config.metrics_file is not None:
            with contextlib.suppress(JournalError):
                outbox = await self._owed()
        self._write_files(outbox)

    def _write_files(self, outbox: int | None) -> None:
        self._last_write = self._monotonic()
        snapshot = self.snapshot()
        self._write(state_path(self.config.state_dir),
                    (json.dumps(snapshot, indent=1) + "\n").encode(), 0o640)
        if self.config.metrics_file is not None:
            figures = self.figures
            figures.connected = bool(self.connection["connected"])
            figures.reconnects = int(self.connection["reconnects"])
            figures.running_jobs = len(snapshot["running_jobs"])
            figures.refusing = bool(snapshot["refusing"])
            figures.last_sync = snapshot["last_sync"]
            if outbox is not None:
                figures.outbox = outbox
            # Read by node exporter, which runs as its own user; only figures, no secrets.
            self._write(Path(self.config.metrics_file), render(figures).encode(), 0o644)

    def _write(self, path: Path, data: bytes, mode: int) -> None:
        try:
            write_atomic(path, data, mode)
        except OSError as exc:
            if path not in self._failing:
                log.warning("cannot write %s (%s); status and metrics are stale until it can "
                            "be written", path, exc.strerror or exc)
                self._failing.add(path)
            return
        if path in self._failing:
            self._failing.discard(path)
            log.info("writing %s again", path)

    # ------------------------------------------------------------------ the snapshot

    def snapshot(self) -> dict[str, Any]:
        """The state file's content (keys: :data:`agent.statefile.FIELDS`)."""
        now = self._clock()
        dispatcher = self._dispatcher
        return {
            "format": FORMAT,
            "version": self.figures.version,
            **self._identity,
            "phase": self.phase,
            "thing_name": self.config.thing_name,
            "endpoint": self.connection["endpoint"],
            "config": str(Path(self.config.source).absolute()) if self.config.source else None,
            "job_logs": str(self.job_logs),
            "started_at": self.started_at,
            "updated_at": now,
            "stopped_at": self.stopped_at,
            "connection": dict(self.connection),
            "last_sync": getattr(dispatcher, "last_sync", None),
            "last_sync_error": getattr(dispatcher, "last_sync_error", None),
            "refusing": getattr(dispatcher, "refusing", None),
            "running_jobs": self._running_jobs(now) if self.phase != "stopped" else [],
            "reload": self.reload,
        }

    def _running_jobs(self, now: float) -> list[dict[str, Any]]:
        if self._dispatcher is None:
            return []
        mono = self._monotonic()
        jobs = []
        for job in list(self._dispatcher.running.values()):
            process = job.process
            if process is None or process.pid is None:
                state = "starting"
            elif process.running:
                state = "running"
            else:
                state = "reporting"
            plan = job.plan
            step = job.progress_step  # what the handler last reported, else the plan's step
            if step is None and plan.reports_steps:
                step = f"{job.step + 1}/{len(plan.steps)} {plan.steps[job.step].name}"
            jobs.append({
                "jobId": job.key[0], "executionNumber": job.key[1],
                "handler": plan.steps[job.step].name, "pid": process.pid if process else None,
                "startedAt": round(now - (mono - job.started), 3), "state": state,
                "phase": job.phase, "step": step})
        return jobs
