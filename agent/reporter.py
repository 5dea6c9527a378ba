"""Status updates for one execution: ordered, coalesced, versioned, durable, retried.

One :class:`Reporter` per claimed execution owns every update the agent sends for it, so updates
go out strictly in order and each carries the ``expectedVersion`` the previous one produced: a
stale retry can never overwrite a newer status. Progress updates are coalesced (only the latest
is sent, at most one per ``progress_interval``) and are not journaled: a newer one, or the final
status, supersedes them. The step timer is re-armed by a heartbeat. Statuses that matter (the
final one, "rebooting") are taken from the journal's outbox, where they were committed before
anything was sent, and retried with backoff and full jitter until the service accepts them or
says the execution is gone; only then are they deleted from the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from agent.errors import (
    AgentError,
    ConflictException,
    InvalidRequestException,
    InvalidStateTransitionException,
    ResourceNotFoundException,
    TerminalStateException,
    ThrottlingException,
)
from agent.jobs import JobsClient
from agent.journal import Journal
from agent.lifecycle import Conflict, resolve_conflict

__all__ = ["Reporter"]

log = logging.getLogger("agent.reporter")

_GONE_ERRORS = (ResourceNotFoundException, InvalidStateTransitionException, TerminalStateException)
RETRY_MIN = 1.0
RETRY_MAX = 60.0


def backoff(attempt: int, low: float = RETRY_MIN, high: float = RETRY_MAX) -> float:
    """Exponential backoff with full jitter (AWS architecture blog's recommendation)."""
    import random  # only once something failed: an agent that never retries never loads it

    return random.uniform(0, min(high, low * 2 ** min(attempt, 16)))


class Reporter:
    """Sends the updates of one execution; run :meth:`run` as a task, then :meth:`finish`."""

    def __init__(self, jobs: JobsClient, thing_name: str, job_id: str, execution_number: int,
                 version: int, *, step_minutes: int, progress_interval: float,
                 journal: Journal | None = None) -> None:
        self.jobs = jobs
        self.journal = journal
        self.thing_name = thing_name
        self.job_id = job_id
        self.execution_number = execution_number
        self.version = version
        self.step_minutes = step_minutes
        self.progress_interval = progress_interval
        self.gone = asyncio.Event()  # the cloud ended the execution: stop the handler
        self.gone_reason = ""
        self._progress: dict[str, str] | None = None
        self._wake = asyncio.Event()
        self._last_sent = time.monotonic()  # the claim that created us was just accepted
        self._closed = False
        self._lock = asyncio.Lock()  # one update in flight per execution, in order
        self._nudge = asyncio.Event()  # cut a retry backoff short (we are connected again)

    @property
    def where(self) -> str:
        return f"job_id={self.job_id} execution={self.execution_number}"

    def progress(self, details: dict[str, str]) -> None:
        """Queue a progress update; a newer one replaces it before it is sent."""
        if details:
            self._progress = details
            self._wake.set()

    async def run(self) -> None:
        """Progress and heartbeat loop while the handler runs (cancel it when the handler ends)."""
        heartbeat = self.step_minutes * 60 / 2
        while not self._closed and not self.gone.is_set():
            due = self._last_sent + heartbeat
            # Woken by progress, or timed out because the heartbeat is due (re-arm the step timer).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, due - time.monotonic()))
            self._wake.clear()
            wait = self._last_sent + self.progress_interval - time.monotonic()
            if self._progress is not None and wait > 0:
                await asyncio.sleep(wait)  # rate limit; newer progress replaces older meanwhile
            async with self._lock:
                if self._closed:
                    return
                details, self._progress = self._progress, None
                await self._send("IN_PROGRESS", details, final=False)

    def close(self) -> None:
        """No more progress or heartbeats: the handler has ended."""
        self._closed = True
        self._wake.set()

    def nudge(self) -> None:
        """Retry now rather than after the current backoff (called on reconnect)."""
        self._nudge.set()

    async def finish(self, status: str, details: dict[str, str], *,
                     deadline: float | None = None) -> bool:
        """Send a terminal status without the journal (tests, journal-less callers)."""
        self.close()
        async with self._lock:
            if self.gone.is_set():
                return False
            return await self._send(status, details, final=True, deadline=deadline)

    async def deliver(self, *, deadline: float | None = None) -> bool:
        """Send what the outbox owes for this execution, oldest first.

        True once everything was accepted; False if the cloud ended the execution (the outbox
        is then cleared: nothing more will ever be sent) or ``deadline`` passed (the entries
        stay for the next attempt, or the next start of the agent).
        """
        assert self.journal is not None
        key = (self.job_id, self.execution_number)
        async with self._lock:
            for entry in await self.journal.outbox(key):
                if self.gone.is_set():
                    break
                sent = await self._send(entry.status, entry.details, final=True,
                                        deadline=deadline, step=not entry.final)
                if sent:
                    await self.journal.delivered(entry, self.version)
                elif not self.gone.is_set():
                    return False  # deadline: keep it owed
            if self.gone.is_set():
                await self.journal.done(key)
                return False
            return True

    async def _send(self, status: str, details: dict[str, str] | None, *, final: bool,
                    deadline: float | None = None, step: bool = False) -> bool:
        attempt = 0
        while True:
            try:
                reply = await self.jobs.update_job_execution(
                    jobId=self.job_id, thingName=self.thing_name, status=status,
                    statusDetails=details, expectedVersion=self.version,
                    executionNumber=self.execution_number, includeJobExecutionState=True,
                    stepTimeoutInMinutes=self.step_minutes if step or not final else None)
                self._accepted(reply.get("executionState"))
                log.log(logging.INFO if final else logging.DEBUG,
                        "status accepted %s status=%s version=%d", self.where, status,
                        self.version)
                return True
            except ConflictException as exc:
                decision = resolve_conflict(status, details, exc.execution_state)
                state = exc.execution_state or {}
                if decision is Conflict.ALREADY_APPLIED:
                    self._accepted(state)
                    log.log(logging.INFO if final else logging.DEBUG,
                            "status accepted %s status=%s version=%d (an earlier attempt went "
                            "through)", self.where, status, self.version)
                    return True
                if decision is Conflict.RETRY:
                    log.info("version moved, resending %s expected=%d current=%s", self.where,
                             self.version, state.get("versionNumber"))
                    self._accepted(state)
                    continue
                self.mark_gone(f"execution is {state.get('status', 'gone')} in the cloud")
                return False
            except _GONE_ERRORS as exc:
                self.mark_gone(f"{exc.code}: {exc.message}")
                return False
            except InvalidRequestException as exc:
                # Our own update is malformed: retrying the same bytes cannot help.
                log.error("status update refused %s status=%s error=%s", self.where, status, exc)
                if final and details:
                    details = {"reason": "agent's status details were refused; see device log"}
                    continue
                return False
            except AgentError as exc:
                if not final:
                    log.info("progress update not delivered %s error=%s", self.where, exc)
                    self._progress = self._progress or details
                    return False
                delay = backoff(attempt, low=2.0 if isinstance(exc, ThrottlingException)
                                else RETRY_MIN)
                if deadline is not None and time.monotonic() + delay > deadline:
                    log.error("status not delivered before the deadline %s status=%s error=%s",
                              self.where, status, exc)
                    return False
                log.warning("status update failed, retrying %s status=%s in=%.1fs error=%s: %s",
                            self.where, status, delay, type(exc).__name__, exc)
                attempt += 1
                self._nudge.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._nudge.wait(), delay)

    def _accepted(self, state: dict[str, Any] | None) -> None:
        self._last_sent = time.monotonic()
        if state and isinstance(state.get("versionNumber"), int):
            self.version = state["versionNumber"]
        else:  # not asked for / not sent: the service adds one per accepted update
            self.version += 1

    def mark_gone(self, reason: str) -> None:
        if not self.gone.is_set():
            log.warning("execution ended in the cloud %s reason=%s; no further updates",
                        self.where, reason)
            self.gone_reason = reason
            self.gone.set()
