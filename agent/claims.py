"""Claim decisions, as plain code: which execution a journal record belongs to, what an execution
the cloud lists means for this device, and when one execution's failures are its own.

**Identity.** ``(jobId, executionNumber)`` names an execution only while it exists. AWS lets a
deleted job's id be used again ("After a job deletion is completed, you may reuse this jobId")
and says that "once a job execution is deleted, the executionNumber may be reused". So the
journal's record for a key may belong to an execution that no longer exists. Two facts, carried
by every pending-list summary and every described execution, tell them apart:

- ``queuedAt``: a re-created execution has its own. Journals of schema 1 did not record it
  (``None``: unknown, the version alone decides);
- ``versionNumber``: it never goes down for one execution, so a cloud version below the one the
  journal last saw accepted is another execution, even one queued in the same second.

**Notifications.** ``notify-next`` carries the head of the pending list with its document, so
it is claimed straight from the message (an ``expectedVersion`` update, nothing asked first);
``notify`` carries summaries only, and asks for a sync (the pending list, then a describe per
claim) only when it says something this device does not know yet. :func:`next_notice` and
:func:`notify_notice` decide which, from what the dispatcher holds in memory.

**One bad job never holds up the others.** A describe whose reply cannot be read (a document
nested too deep for Python's json), or never comes (a lone UTF-16 surrogate makes the MQTT
library drop the reply), is that execution's failure, not the thing's, as long as a describe
*without* the document is answered. :class:`Trouble` counts those failures per execution, in
memory (see :data:`DESCRIBE_ATTEMPTS`), and remembers which warnings were given.
:func:`document_problem` catches a document that arrives but cannot be read here.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.journal import Record

__all__ = [
    "DESCRIBE_ATTEMPTS",
    "LISTED_MAX",
    "REPLACED",
    "Identity",
    "InProgress",
    "Notice",
    "Queued",
    "Trouble",
    "document_problem",
    "identity",
    "in_progress_verdict",
    "next_notice",
    "notify_notice",
    "queued_verdict",
    "same_execution",
]

Identity = tuple[str, int, int | None]  # (jobId, executionNumber, queuedAt)

DESCRIBE_ATTEMPTS = 3
"""Describes of one execution's document that may fail (no reply, or an unreadable one) before
that execution is REJECTED.

Counted across syncs, in memory. Only failures that a describe without the document contradicts
count (the thing's connection works), so a broker outage never rejects anything. Three absorbs a
lost or garbled message or two; each attempt costs at most one ``request_timeout``, and the
other jobs are tried first meanwhile. Not journaled: the journal means "claimed by this
device", it would have to be written for executions never claimed (and fails exactly when the
disk is full), and a restart of the agent at worst costs three more attempts for a bad one.
"""

REPLACED = "Replaced"
"""The cloud status recovery sees for a record whose execution was deleted and its key reused."""


def identity(execution: dict[str, Any]) -> Identity:
    """The identity of a pending-list summary or a described execution."""
    queued_at = execution.get("queuedAt")
    return (execution["jobId"], execution["executionNumber"],
            queued_at if isinstance(queued_at, int) else None)


def same_execution(record: Record, queued_at: int | None, version: int | None) -> bool:
    """Whether the cloud's execution (its ``queuedAt`` and ``versionNumber``) is the one
    ``record`` journaled, rather than a later one under the same (jobId, executionNumber)."""
    if record.queued_at is not None and queued_at is not None and record.queued_at != queued_at:
        return False
    return version is None or version >= record.version


def document_problem(text: str | None) -> str | None:
    """Why a job document that arrived cannot be read here, or None (then it is parsed).

    Python's json refuses nesting deeper than its recursion limit (about 1000 levels), and
    accepts a lone UTF-16 surrogate (``"\\ud800"``) that no handler could be given: it is not
    Unicode, and encoding the document or an argument to UTF-8 fails. A client that parses the
    reply itself may let either through; both end the execution REJECTED, never the sync.
    """
    if text is None:
        return None
    try:
        json.dumps(json.loads(text), ensure_ascii=False).encode("utf-8")
    except RecursionError:
        return "it is nested too deeply for this device's JSON parser"
    except UnicodeEncodeError:
        return "it contains a lone UTF-16 surrogate, which is not Unicode"
    except ValueError:
        return None  # not JSON: plan_job says so, in its words
    return None


def _never_ran(record: Record) -> bool:
    """Ended here before anything happened: the claim was refused, or the job was gone."""
    return record.state == "done" and record.attempts == 0 and record.result is None


class Queued(enum.Enum):
    """What to do with an execution the cloud lists as QUEUED."""

    CLAIM = "claim"  # no record: new work
    REPLACE = "replace"  # the record is another (deleted) execution: keep it as history, claim
    SETTLE = "settle"  # our own claim whose answer never came: ask the cloud, then decide
    STOP_OLD = "stop-old"  # the deleted execution's handler still runs here: stop it first
    OURS = "ours"  # this device claimed this very execution already: never twice


def queued_verdict(record: Record | None, summary: dict[str, Any], *, busy: bool) -> Queued:
    """``busy``: a handler or a status delivery of ``record``'s execution is under way here."""
    if record is None:
        return Queued.OURS if busy else Queued.CLAIM
    if not same_execution(record, summary.get("queuedAt"), summary.get("versionNumber")):
        return Queued.STOP_OLD if busy else Queued.REPLACE
    if busy:
        return Queued.OURS
    if record.state == "claiming":
        return Queued.SETTLE
    if _never_ran(record):
        # Nothing of it ran and nothing was reported: listed QUEUED again, it is another
        # execution queued in the same second (or the claim never took); safe to take.
        return Queued.REPLACE
    return Queued.OURS


class InProgress(enum.Enum):
    """What to do with an execution the cloud lists as IN_PROGRESS."""

    OURS = "ours"  # ours, and running, being reported, or settled by recovery
    UNKNOWN = "unknown"  # no record of it: FAILED, never run again (wiped state)
    REPLACE_UNKNOWN = "replace-unknown"  # the record is another execution: history; FAILED
    STOP_OLD = "stop-old"  # a handler of the deleted execution still runs here: stop it first


def in_progress_verdict(record: Record | None, summary: dict[str, Any], *,
                        busy: bool) -> InProgress:
    if record is None:
        return InProgress.OURS if busy else InProgress.UNKNOWN
    if same_execution(record, summary.get("queuedAt"), summary.get("versionNumber")):
        return InProgress.OURS
    return InProgress.STOP_OLD if busy else InProgress.REPLACE_UNKNOWN


@dataclass
class Trouble:
    """Per-execution failures and the warnings already given, for executions still listed.

    Forgotten as soon as the cloud stops listing the execution (:meth:`keep_only`), so memory is
    bounded by the pending list.
    """

    limit: int = DESCRIBE_ATTEMPTS
    strikes: dict[Identity, int] = field(default_factory=dict)
    warned: set[tuple[Identity, str]] = field(default_factory=set)

    def strike(self, execution: Identity) -> int:
        """One more failure of ``execution``'s own; returns how many so far."""
        self.strikes[execution] = self.strikes.get(execution, 0) + 1
        return self.strikes[execution]

    def exhausted(self, execution: Identity) -> bool:
        return self.strikes.get(execution, 0) >= self.limit

    def clear(self, execution: Identity) -> None:
        self.strikes.pop(execution, None)

    def first_warning(self, execution: Identity, reason: str) -> bool:
        """True the first time ``reason`` is given for ``execution``: warn once, not per sync."""
        if (execution, reason) in self.warned:
            return False
        self.warned.add((execution, reason))
        return True

    def keep_only(self, listed: Iterable[Identity]) -> None:
        keep = set(listed)
        self.strikes = {k: v for k, v in self.strikes.items() if k in keep}
        self.warned = {w for w in self.warned if w[0] in keep}

    def order(self, summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The service's order, except that executions with failures go last: a bad one is
        retried only after the others have had their turn."""
        return sorted(summaries, key=lambda s: identity(s) in self.strikes)


LISTED_MAX = 10
"""``notify`` (like GetPendingJobExecutions) lists at most this many executions: a full list
may leave some out."""

Key = tuple[str, int]


class Notice(enum.Enum):
    """What a notification asks of the dispatcher."""

    NOTHING = "nothing"  # it says nothing this device does not know (or cannot act on yet)
    CLAIM = "claim"  # notify-next's execution: claim it with what the message carries
    DEFER = "defer"  # notify-next's execution is claimable, but no slot is free: sync then
    SYNC = "sync"  # ask the service for the pending list and decide from it


def _held_as(execution: dict[str, Any], held: Mapping[Key, int | None]) -> bool | None:
    """True: ``held`` has this very execution; False: its key, for another execution (a
    deleted job's id reused); None: not its key at all. ``held`` maps the key of each execution
    this device is running or reporting to its ``queuedAt`` (None: unknown, the key decides)."""
    key = (execution["jobId"], execution["executionNumber"])
    if key not in held:
        return None
    ours, theirs = held[key], execution.get("queuedAt")
    return ours is None or not isinstance(theirs, int) or ours == theirs


def next_notice(execution: dict[str, Any] | None, *, held: Mapping[Key, int | None],
                running: Collection[Key], free: int) -> Notice:
    """A ``notify-next``: the head of the thing's pending list changed to ``execution``.

    ``running``: the executions whose handlers run here (their ends not yet sent); ``free``:
    the slots free for new handlers. The head is the first IN_PROGRESS execution, or without
    one the first QUEUED: a QUEUED head (or none) while handlers run here means the cloud
    ended them, which a sync confirms.
    """
    if execution is None:
        return Notice.SYNC if running else Notice.NOTHING
    held_as = _held_as(execution, held)
    if held_as is not None:
        return Notice.NOTHING if held_as else Notice.SYNC
    if execution.get("status") != "QUEUED" or running:
        return Notice.SYNC  # an IN_PROGRESS execution we do not hold, or a cancellation
    if not isinstance(execution.get("jobDocument"), str):
        return Notice.SYNC  # no document to plan from: the sync's describe has it
    return Notice.CLAIM if free > 0 else Notice.DEFER


def notify_notice(jobs: Mapping[str, list[dict[str, Any]]], *, held: Mapping[Key, int | None],
                  running: Collection[Key], free: int, ended: Collection[Key] = ()) -> Notice:
    """A ``notify``: the thing's set of pending executions changed; ``jobs`` lists them
    (``IN_PROGRESS``, then ``QUEUED``, in the service's order; at most :data:`LISTED_MAX`).

    A sync is needed when the list shows an IN_PROGRESS execution not held here, lacks one
    whose handler runs here (ended in the cloud?), or shows a QUEUED one not held here that a
    free slot could take now and that no ``notify-next`` brings: with nothing IN_PROGRESS,
    the first QUEUED is the head, which ``notify-next`` carries with its document (and which
    takes a free slot). Without a free slot a new QUEUED one waits: a slot frees when a held
    execution ends, which changes the pending set, so another ``notify`` (or ``notify-next``)
    follows. ``ended``: held executions whose handlers ended here, their final status sent: a
    notify that still lists one IN_PROGRESS was sent before that status arrived, and its first
    QUEUED execution is the head now.
    """
    in_progress = list(jobs.get("IN_PROGRESS", ()))
    queued = list(jobs.get("QUEUED", ()))
    listed = [*in_progress, *queued]
    if any(_held_as(s, held) is not True for s in in_progress):
        return Notice.SYNC
    if any(_held_as(s, held) is False for s in queued):
        return Notice.SYNC  # a reused key: the sync decides what becomes of the old one
    keys = {(s["jobId"], s["executionNumber"]) for s in listed}
    if any(key not in keys for key in running):
        return Notice.SYNC
    new = [s for s in queued if _held_as(s, held) is None]
    # With nothing IN_PROGRESS the first QUEUED is the head: notify-next brings it (before or
    # after this message), with its document, and it takes a slot.
    live = [s for s in in_progress if (s["jobId"], s["executionNumber"]) not in ended]
    brought = 1 if not live and new and new[0] is queued[0] else 0
    if free - brought <= 0:
        return Notice.NOTHING
    if len(new) > brought or len(listed) >= LISTED_MAX:
        return Notice.SYNC  # one more a free slot could take, or a full list may hide one
    return Notice.NOTHING
