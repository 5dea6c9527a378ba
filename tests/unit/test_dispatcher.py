"""The dispatcher's claim and sync decisions against the emulator's state machine, without a
broker, with orderings and failures forced that a live run produces only by bad luck.

The client here is a thin stand-in: each request calls :class:`JobsService` (the same state
machine the sandbox serves over MQTT) and converts its answer with the agent's own shapes, or
raises the scripted failure. The integration tests (``test_cloud_truth.py``) drive the same
paths through the real broker, client and agent process.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.claims import DESCRIBE_ATTEMPTS
from agent.config import Config, HandlerConfig, MqttConfig
from agent.dispatcher import Dispatcher
from agent.errors import (
    InvalidResponseError,
    RequestTimeoutError,
    error_from_rejection,
)
from agent.jobs import shapes
from agent.journal import Journal, OutboxEntry
from agent.sandbox.document import dumps
from agent.sandbox.service import JobsService, Rejection

THING = "dev"
DOC = {"operation": "ok"}


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class ServiceJobs:
    """The agent's Jobs client over :class:`JobsService`, with scripted failures."""

    def __init__(self, service: JobsService) -> None:
        self.service = service
        self.rules: list[tuple[Callable[[str, dict[str, Any]], bool], Exception]] = []
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.published: list[Any] = []  # the notifications the service sent, in order

    def fail(self, operation: str, error: Exception, **match: Any) -> None:
        """Every ``operation`` request whose arguments include ``match`` raises ``error``."""
        self.rules.append((lambda op, kw: op == operation and all(
            kw.get(k) == v for k, v in match.items()), error))

    def _serve(self, operation: str, kwargs: dict[str, Any], call: Callable[[], Any]) -> Any:
        self.calls.append((operation, kwargs))
        for matches, error in self.rules:
            if matches(operation, kwargs):
                raise error
        try:
            result = call()
        except Rejection as rejection:
            raise error_from_rejection(rejection.code, rejection.message,
                                       execution_state=rejection.execution_state) from None
        payload = result[0] if isinstance(result, tuple) else result
        if isinstance(result, tuple):
            self.published.extend(result[1])
        # As the MQTT front sends it: the service keeps documents as Document text.
        return json.loads(dumps(payload))

    async def get_pending_job_executions(self, *, thingName: str) -> dict[str, Any]:
        payload = self._serve("get", {}, lambda: self.service.get_pending(thingName))
        return shapes.get_pending_response(payload)

    async def describe_job_execution(self, *, jobId: str, thingName: str,
                                     includeJobDocument: bool = True,
                                     executionNumber: int | None = None) -> dict[str, Any]:
        kwargs = {"jobId": jobId, "includeJobDocument": includeJobDocument}
        payload = self._serve("describe", kwargs, lambda: self.service.describe_execution(
            thingName, jobId, execution_number=executionNumber,
            include_job_document=includeJobDocument))
        return shapes.describe_response(payload)

    async def update_job_execution(self, *, jobId: str, thingName: str, status: str,
                                   **kwargs: Any) -> dict[str, Any]:
        names = {"statusDetails": "status_details", "expectedVersion": "expected_version",
                 "executionNumber": "execution_number", "stepTimeoutInMinutes":
                 "step_timeout_minutes", "includeJobExecutionState":
                 "include_job_execution_state", "includeJobDocument": "include_job_document"}
        args = {names[k]: v for k, v in kwargs.items() if v is not None}
        payload = self._serve("update", {"jobId": jobId, "status": status, **kwargs},
                              lambda: self.service.update_execution(thingName, jobId,
                                                                    status=status, **args))
        return shapes.update_response(payload)

    def updates(self, job_id: str) -> list[dict[str, Any]]:
        return [kw for op, kw in self.calls if op == "update" and kw["jobId"] == job_id]


class GatedJournal(Journal):
    """Holds ``delivered`` (the commit after the service accepted a status) until released."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.accepted = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()

    async def delivered(self, entry: OutboxEntry, version: int) -> None:
        self.accepted.set()
        await self.gate.wait()
        await super().delivered(entry, version)


class World:
    journal_class: type[GatedJournal] = GatedJournal

    def __init__(self, tmp: Path, **settings: Any) -> None:
        self.clock = Clock()
        # Deletions complete at the next tick (see delete), not DELETION_SECONDS later.
        self.service = JobsService(clock=self.clock, deletion_seconds=0)
        self.service.create_thing(THING)
        self.jobs = ServiceJobs(self.service)
        runs = tmp / "runs"
        handler = tmp / "ok.sh"
        handler.write_text(f"#!/bin/sh\necho \"$JOB_ID\" >> {runs}\n")
        handler.chmod(0o755)
        self.runs = runs
        self.config = Config(thing_name=THING, mqtt=MqttConfig(endpoint="e", cert=Path("c"),
                                                               key=Path("k")),
                             handlers={"ok": HandlerConfig(command=(str(handler),))},
                             state_dir=tmp / "state", **settings)
        self.journal = self.journal_class(tmp / "state" / "journal.db", thing_name=THING,
                                          endpoint="e")
        self.dispatcher: Dispatcher | None = None

    async def __aenter__(self) -> World:
        await self.journal.open()
        self.dispatcher = Dispatcher(self.config, self.jobs, self.journal)  # type: ignore[arg-type]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.journal.close()

    @property
    def d(self) -> Dispatcher:
        assert self.dispatcher is not None
        return self.dispatcher

    def create(self, job_id: str, document: dict[str, Any] | None = None) -> None:
        self.jobs.published.extend(self.service.create_job(job_id, [THING], document or DOC))
        self.clock.now += 1

    def operations(self) -> list[str]:
        return [op for op, _ in self.jobs.calls]

    async def notify(self, *, only: str | None = None) -> None:
        """Hand the notifications sent so far (of kind ``only``, or all) to the dispatcher, as
        the MQTT front and the Jobs client would, and let it act on them once."""
        for publish in self.jobs.published:
            kind = publish.topic.rsplit("/", 1)[1]
            if only not in (None, kind):
                continue
            body = json.loads(dumps(publish.payload))
            self.d.notified(kind, shapes.notify_event(body) if kind == "notify"
                            else shapes.notify_next_event(body))
        self.jobs.published.clear()
        await self.d.step()

    def delete(self, job_id: str) -> None:
        """Delete the job and let the deletion complete, so its id may be used again."""
        self.service.delete_job(job_id, force=True)
        self.service.tick()

    def status(self, job_id: str) -> dict[str, Any]:
        return self.service.execution(job_id, THING)

    async def idle(self) -> None:
        """Wait until no handler runs and no status is being delivered."""
        for _ in range(400):
            if not self.d.running and not self.d.delivering:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"still running {list(self.d.running)}")

    def gated_handler(self, name: str, gate: Path) -> None:
        """Handler ``name`` runs until the file ``gate`` exists."""
        path = self.runs.parent / f"{name}.sh"
        path.write_text(f"#!/bin/sh\nwhile [ ! -e {gate} ]; do sleep 0.02; done\n")
        path.chmod(0o755)
        self.config.handlers[name] = HandlerConfig(command=(str(path),))

    def ran(self) -> list[str]:
        return self.runs.read_text().split() if self.runs.exists() else []


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# ---------------------------------------------------------------------- issue 10, item 5

def test_sync_between_our_accepted_final_update_and_its_commit_is_not_a_cloud_end(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The race behind "execution ended in the cloud ... SUCCEEDED" after our own final update:
    the update is accepted (the execution leaves the pending list, a notify rings), a sync runs
    before the agent has committed the delivery and dropped the job from ``running``."""
    async def body() -> None:
        async with World(tmp_path) as w:
            w.create("j1")
            w.journal.gate.clear()
            await w.d.sync()  # claims j1 and starts its handler
            await asyncio.wait_for(w.journal.accepted.wait(), 10)  # SUCCEEDED was accepted
            assert ("j1", 1) in w.d.running and w.status("j1")["status"] == "SUCCEEDED"
            await w.d.sync()  # the notify's sync: j1 is no longer listed
            w.journal.gate.set()
            await w.idle()
            assert w.status("j1")["status"] == "SUCCEEDED"
            assert [u["status"] for u in w.jobs.updates("j1")] == ["IN_PROGRESS", "SUCCEEDED"]
            record = await w.journal.get(("j1", 1))
            assert record is not None and record.state == "done"

    run(body())
    assert "ended in the cloud" not in caplog.text


def test_cloud_end_while_the_handler_runs_still_stops_it(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """The fix must not hide a real cancellation: while the handler runs, missing from the
    list and CANCELED means stop it, and nothing is sent after."""
    gate = tmp_path / "gate"

    async def body() -> None:
        async with World(tmp_path) as w:
            w.gated_handler("slow", gate)
            w.create("j1", {"operation": "slow"})
            await w.d.sync()
            for _ in range(200):
                job = w.d.running.get(("j1", 1))
                if job is not None and job.process is not None and job.process.pid:
                    break
                await asyncio.sleep(0.01)
            w.service.cancel_job("j1", force=True)
            await w.d.sync()
            await w.idle()
            assert [u["status"] for u in w.jobs.updates("j1")] == ["IN_PROGRESS"]
            assert w.status("j1")["status"] == "CANCELED"

    run(body())
    assert "ended in the cloud job_id=j1 execution=1 reason=execution is CANCELED" in caplog.text


# ---------------------------------------------------------------------- one bad job

def test_unreadable_describe_reply_rejects_that_job_and_the_next_one_runs(
        tmp_path: Path) -> None:
    async def body() -> None:
        async with World(tmp_path) as w:
            w.create("bad")
            w.create("good")
            w.jobs.fail("describe", InvalidResponseError(
                "describe: reply on t/accepted is not JSON (7251 bytes)"),
                jobId="bad", includeJobDocument=True)
            await w.d.sync()  # the bad one fails once, the good one is claimed meanwhile
            await w.idle()
            assert w.status("good")["status"] == "SUCCEEDED" and w.ran() == ["good"]
            for _ in range(DESCRIBE_ATTEMPTS - 1):
                assert w.status("bad")["status"] == "QUEUED"
                await w.d.sync()
            assert w.status("bad")["status"] == "REJECTED"
            reason = w.status("bad")["statusDetails"]["reason"]
            assert reason.startswith(
                f"the job document could not be read: {DESCRIBE_ATTEMPTS} describes of it "
                "failed while describes without the document were answered (last: the reply "
                "was unreadable (describe: reply on t/accepted is not JSON (7251 bytes)))")
            # The update that ended it carried the version a light describe gave.
            light = [kw for op, kw in w.jobs.calls if op == "describe" and kw["jobId"] == "bad"
                     and kw["includeJobDocument"] is False]
            assert len(light) == DESCRIBE_ATTEMPTS
            assert w.jobs.updates("bad")[0]["expectedVersion"] == 1

    run(body())


def test_one_garbled_describe_reply_costs_a_retry_not_the_job(tmp_path: Path) -> None:
    async def body() -> None:
        async with World(tmp_path) as w:
            w.create("j1")
            w.jobs.fail("describe", InvalidResponseError("no versionNumber"), jobId="j1",
                        includeJobDocument=True)
            await w.d.sync()
            w.jobs.rules.clear()
            await w.d.sync()
            await w.idle()
            assert w.status("j1")["status"] == "SUCCEEDED" and w.d._trouble.strikes == {}

    run(body())


def test_document_that_arrives_but_is_not_unicode_is_rejected(tmp_path: Path) -> None:
    """A client that parses replies itself lets a lone surrogate through: REJECTED, with the
    reason, and the next job runs."""
    async def body() -> None:
        async with World(tmp_path) as w:
            w.create("bad", {"operation": "ok", "args": ["\ud800"]})
            w.create("good")
            await w.d.sync()
            await w.idle()
            assert w.status("bad")["status"] == "REJECTED"
            assert w.status("bad")["statusDetails"]["reason"] == (
                "the job document could not be read: it contains a lone UTF-16 surrogate, "
                "which is not Unicode")
            assert w.status("good")["status"] == "SUCCEEDED" and w.ran() == ["good"]

    run(body())


def test_describe_timing_out_for_one_job_rejects_it_after_the_bound(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with World(tmp_path) as w:
            w.create("bad")
            w.create("good")
            w.jobs.fail("describe", RequestTimeoutError("describe: no reply within 5s", "x"),
                        jobId="bad", includeJobDocument=True)
            await w.d.sync()
            assert w.status("bad")["status"] == "QUEUED"  # one timeout may be a lost message
            await w.idle()
            assert w.status("good")["status"] == "SUCCEEDED"
            for _ in range(DESCRIBE_ATTEMPTS - 1):
                await w.d.sync()
            assert w.status("bad")["status"] == "REJECTED"
            reason = w.status("bad")["statusDetails"]["reason"]
            assert reason.startswith(f"the job document could not be read: {DESCRIBE_ATTEMPTS} "
                                     "describes of it failed") and "(last: no reply" in reason
            assert w.ran() == ["good"]
            full = [kw for op, kw in w.jobs.calls if op == "describe" and kw["jobId"] == "bad"
                    and kw["includeJobDocument"]]
            assert len(full) == DESCRIBE_ATTEMPTS

    run(body())
    waits = [r for r in caplog.records if "not claimed yet: its describe failed" in r.message]
    assert len(waits) == 1 and waits[0].levelname == "WARNING"  # once, not per attempt


def test_troubled_job_is_tried_after_the_others(tmp_path: Path) -> None:
    async def body() -> list[str]:
        async with World(tmp_path) as w:
            w.create("bad")
            w.create("good")
            w.jobs.fail("describe", RequestTimeoutError("no reply", "x"), jobId="bad",
                        includeJobDocument=True)
            await w.d.sync()
            await w.idle()
            w.create("later")
            w.jobs.calls.clear()
            await w.d.sync()
            return [kw["jobId"] for op, kw in w.jobs.calls if op == "describe"]

    # "later" was queued after "bad", but "bad" has failed once: "later" goes first, and the
    # slot it takes leaves "bad" for the next sync.
    assert run(body()) == ["later"]


def test_no_answer_at_all_is_the_things_problem_not_the_jobs(tmp_path: Path) -> None:
    async def body() -> None:
        async with World(tmp_path) as w:
            w.create("j1")
            w.jobs.fail("describe", RequestTimeoutError("no reply", "x"))  # light ones too
            for _ in range(DESCRIBE_ATTEMPTS + 2):
                with pytest.raises(RequestTimeoutError):
                    await w.d.sync()  # the sync fails whole and is retried with backoff
            assert w.status("j1")["status"] == "QUEUED"
            assert w.d._trouble.strikes == {}
            w.jobs.rules.clear()  # the connection is back
            await w.d.sync()
            await w.idle()
            assert w.status("j1")["status"] == "SUCCEEDED"

    run(body())


# ---------------------------------------------------------------------- reused job ids

def test_reused_job_id_runs_again_and_the_old_record_is_history(tmp_path: Path) -> None:
    async def body() -> None:
        async with World(tmp_path) as w:
            w.create("j1")
            await w.d.sync()
            await w.idle()
            old = await w.journal.get(("j1", 1))
            assert old is not None
            log = w.config.state_dir / "logs" / "j1.1.log"
            assert log.exists()
            w.delete("j1")
            w.clock.now += 5
            w.create("j1")  # executionNumber 1 again
            await w.d.sync()
            await w.idle()
            assert w.status("j1")["status"] == "SUCCEEDED" and w.ran() == ["j1", "j1"]
            history = await w.journal.history(("j1", 1))
            assert [(r.queued_at, r.archived_at is not None) for r in history] == [
                (old.queued_at, True), (old.queued_at + 6, False)]
            # The old run's log went with its record; the new one has its own.
            assert (w.config.state_dir / "logs" / f"{history[0].stem}.log").exists()
            assert log.exists()

    run(body())


def test_reused_in_the_same_second_is_told_apart_by_its_version(tmp_path: Path) -> None:
    async def body() -> None:
        async with World(tmp_path) as w:
            w.service.create_job("j1", [THING], DOC)
            await w.d.sync()
            await w.idle()
            w.delete("j1")
            w.service.create_job("j1", [THING], DOC)  # same clock second: same queuedAt
            await w.d.sync()
            await w.idle()
            assert w.ran() == ["j1", "j1"]

    run(body())


def test_recovery_never_reports_to_the_execution_that_replaced_ours(tmp_path: Path) -> None:
    """The agent died while j1's handler ran; j1 was deleted and re-created meanwhile. The old
    record must not be settled against the new execution (FAILED "interrupted" would end it):
    it is history, and the new execution runs."""
    async def body() -> None:
        async with World(tmp_path) as w:
            await w.journal.claiming(("j1", 1), "ok", DOC, 1, 5, queued_at=1)
            await w.journal.started(("j1", 1), 0, "ok", "boot-a")
            w.create("j1")  # the new execution: queuedAt differs, version 1
            await w.d.sync()
            await w.idle()
            assert [u["status"] for u in w.jobs.updates("j1")] == ["IN_PROGRESS", "SUCCEEDED"]
            assert w.ran() == ["j1"]
            assert [r.state for r in await w.journal.history(("j1", 1))] == ["done", "done"]

    run(body())


def test_in_progress_execution_replacing_our_record_is_unknown_to_this_device(
        tmp_path: Path) -> None:
    async def body() -> None:
        async with World(tmp_path) as w:
            w.create("j1")
            await w.d.sync()
            await w.idle()
            w.delete("j1")
            w.clock.now += 5
            w.create("j1")
            w.service.start_next(THING)  # claimed by someone else (not this agent)
            await w.d.sync()
            execution = w.status("j1")
            assert execution["status"] == "FAILED"
            assert execution["statusDetails"]["reason"].startswith(
                "interrupted: this device has no record of running this job")
            assert w.ran() == ["j1"]
            assert [r.archived_at is not None for r in await w.journal.history(("j1", 1))] == \
                [True]

    run(body())


def test_queued_job_left_unclaimed_is_never_silent(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A journal that says this very execution was claimed, while the cloud lists it QUEUED:
    never claimed twice, and the log says why, once."""
    async def body() -> None:
        async with World(tmp_path) as w:
            w.create("j1")
            queued_at = w.status("j1")["queuedAt"]
            await w.journal.claiming(("j1", 1), "ok", DOC, 1, 5, queued_at=queued_at)
            await w.journal.started(("j1", 1), 0, "ok", "boot-a")
            await w.journal.finish(("j1", 1), "SUCCEEDED", {"reason": "x"})
            await w.journal.done(("j1", 1))
            w.d._recovered = True
            for _ in range(3):
                await w.d.sync()
            assert w.status("j1")["status"] == "QUEUED" and w.ran() == []

    caplog.set_level(logging.INFO)
    run(body())
    lines = [r for r in caplog.records if "not claimed: this device already claimed" in
             r.message]
    assert len(lines) == 1 and lines[0].levelname == "WARNING"


# ---------------------------------------------------------------------- issue 12, item 2

async def _started(w: World) -> None:
    """Recovered and synced once, as after start-up; the calls so far forgotten."""
    w.d.wake("start")
    await w.d.step()
    w.jobs.calls.clear()


def test_notify_next_is_claimed_straight_from_the_message(tmp_path: Path) -> None:
    """No get and no describe: the claim is the first request, the final update the second,
    and the notifications the job's end causes ask for nothing."""
    async def body() -> None:
        async with World(tmp_path) as w:
            await _started(w)
            w.create("j1")
            await w.notify()  # notify (the head alone) and notify-next (claimed from it)
            await w.idle()
            await w.notify()  # its end: notify (empty) and notify-next (nothing pending)
            assert w.operations() == ["update", "update"]
            claim = w.jobs.updates("j1")[0]
            assert claim["status"] == "IN_PROGRESS" and claim["expectedVersion"] == 1
            assert not claim.get("includeJobDocument")
            assert w.status("j1")["status"] == "SUCCEEDED" and w.ran() == ["j1"]
            record = await w.journal.get(("j1", 1))
            assert record is not None and record.queued_at == w.status("j1")["queuedAt"]

    run(body())


def test_notify_alone_is_a_sync_when_the_head_is_not_all(tmp_path: Path) -> None:
    """Two jobs at once with two slots: the second is not the head, no notify-next brings it,
    so the notify syncs (the pending list, a describe for its document); each runs once."""
    async def body() -> None:
        async with World(tmp_path, max_concurrent_jobs=2) as w:
            await _started(w)
            w.create("j1")
            w.create("j2")
            await w.notify()
            await w.idle()
            await w.notify()
            assert sorted(w.ran()) == ["j1", "j2"]
            assert w.operations().count("get") == 1
            assert [c["jobId"] for op, c in w.jobs.calls if op == "describe"] == ["j2"]
            assert all(w.status(j)["status"] == "SUCCEEDED" for j in ("j1", "j2"))

    run(body())


def test_stale_notify_next_never_claims_twice(tmp_path: Path) -> None:
    """A notify-next that arrives again after its execution was claimed (duplicate, late, or
    after a sync took it) is ours already: nothing is sent for it."""
    async def body() -> None:
        async with World(tmp_path, max_concurrent_jobs=2) as w:
            await _started(w)
            w.create("j1")
            late = list(w.jobs.published)
            await w.notify()
            w.jobs.published.extend(late)  # the same notifications, again, while it runs
            await w.notify()
            await w.idle()
            w.jobs.published.extend(late)  # and once more after it ended
            await w.notify()
            await w.idle()
            assert [u["status"] for u in w.jobs.updates("j1")] == ["IN_PROGRESS", "SUCCEEDED"]
            assert w.ran() == ["j1"]

    run(body())


def test_claim_from_an_outdated_notify_next_is_refused_and_resynced(tmp_path: Path) -> None:
    """The execution is not at the version its notify-next said (a message from before it
    moved on): the claim's expectedVersion is refused (VersionMismatch), nothing runs from the
    message, and the sync that follows decides from the cloud's list."""
    async def body() -> None:
        async with World(tmp_path) as w:
            await _started(w)
            w.create("j1")
            for publish in w.jobs.published:
                if "execution" in publish.payload:
                    publish.payload["execution"]["versionNumber"] = 7
            await w.notify(only="notify-next")  # the claim, refused, then the sync it asks
            await w.idle()
            assert w.ran() == ["j1"]
            assert [u.get("expectedVersion") for u in w.jobs.updates("j1")][:2] == [7, 1]
            assert w.operations()[:3] == ["update", "get", "describe"]

    run(body())


def test_bad_document_in_notify_next_is_rejected_and_the_next_job_runs(tmp_path: Path) -> None:
    """A document this device cannot run ends its execution REJECTED from QUEUED (never
    claimed); the next job's notify-next is claimed as usual."""
    async def body() -> None:
        async with World(tmp_path) as w:
            await _started(w)
            w.create("bad", {"operation": "no-such-handler"})
            await w.notify()
            assert w.status("bad")["status"] == "REJECTED"
            w.create("good")
            await w.notify()
            await w.idle()
            assert w.ran() == ["good"]
            assert [u["status"] for u in w.jobs.updates("bad")] == ["REJECTED"]

    run(body())


async def _running_gated(w: World, gate: Path) -> None:
    """Started, with j1 claimed from its notify-next and its handler held until ``gate``."""
    w.gated_handler("slow", gate)
    await _started(w)
    w.create("j1", {"operation": "slow"})
    await w.notify()
    assert ("j1", 1) in w.d.running


def test_queued_jobs_behind_a_running_one_come_with_its_end(tmp_path: Path) -> None:
    """Two slots' worth of jobs behind one running handler with one slot: nothing is asked while
    it runs; its end's notify-next brings the next, claimed from the message."""
    gate = tmp_path / "gate"

    async def body() -> None:
        async with World(tmp_path) as w:
            await _running_gated(w, gate)
            w.create("j2")
            w.create("j3")
            await w.notify()  # two notify: j2 and j3 wait, nothing is asked
            assert w.operations() == ["update"]
            gate.touch()
            for _ in range(3):  # each end's notifications bring the next job
                await w.idle()
                await w.notify()
            await w.idle()
            assert w.ran() == ["j2", "j3"]  # the gated handler records nothing
            assert all(w.status(j)["status"] == "SUCCEEDED" for j in ("j1", "j2", "j3"))
            assert "get" not in w.operations() and "describe" not in w.operations()

    run(body())


def test_slot_of_a_job_ended_in_the_cloud_goes_to_the_job_that_waited(tmp_path: Path) -> None:
    """The one slot is held by a handler whose job is canceled: the notify's sync stops it and
    finds j2 waiting for the slot; its end (no update of ours, so no notification) asks for the
    sync that takes j2."""
    gate = tmp_path / "gate"

    async def body() -> None:
        async with World(tmp_path) as w:
            await _running_gated(w, gate)
            w.create("j2")
            w.jobs.published.clear()
            w.jobs.published.extend(w.service.cancel_job("j1", force=True))
            await w.notify()  # j1 missing from notify: a sync; j2 waits for the slot
            assert w.d._deferred
            for _ in range(400):  # j1's handler is stopped; its freed slot asks for a sync
                if w.d._want_sync:
                    break
                await asyncio.sleep(0.01)
            await w.d.step()
            await w.idle()
            assert w.ran() == ["j2"]
            assert w.status("j1")["status"] == "CANCELED"
            assert w.status("j2")["status"] == "SUCCEEDED"

    run(body())


# ---------------------------------------------------------------------- issue 12, item 3

class CountingJournal(GatedJournal):
    """Counts the journal's commits (every write is one transaction on its thread)."""

    commits = 0

    def _tx(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        super()._tx(statements)
        self.commits += 1


def test_commits_per_job(tmp_path: Path) -> None:
    """A one-step job claimed from notify-next costs five commits, each before its side effect:
    the claim (before the claim is sent), the new version with "running" (before the spawn;
    these were two commits), the pid (after the spawn, so a restarted agent can stop it), the
    verdict with its outbox row (before the final update is sent), and "done" (once the
    service accepted it)."""
    class CountingWorld(World):
        journal_class = CountingJournal

    async def body() -> int:
        async with CountingWorld(tmp_path) as w:
            assert isinstance(w.journal, CountingJournal)
            await _started(w)
            before = w.journal.commits
            w.create("j1")
            await w.notify()
            await w.idle()
            await w.notify()
            assert w.status("j1")["status"] == "SUCCEEDED"
            record = await w.journal.get(("j1", 1))
            assert record is not None and record.state == "done"
            assert record.version == w.status("j1")["versionNumber"]
            return w.journal.commits - before

    assert run(body()) == 5


def test_jobs_claimed_from_notifications_are_pruned_without_a_sync(tmp_path: Path) -> None:
    """Pruning after a burst ran only after a sync; jobs claimed from notify-next meet none, so
    the journal must be pruned as they finish (bench flatness found 233 rows for 100)."""
    async def body() -> list[tuple[Any, ...]]:
        async with World(tmp_path, max_records=3) as w:
            await _started(w)
            for index in range(8):
                w.create(f"j{index}")
                await w.notify()
                await w.idle()
                await w.notify()
            assert "get" not in w.operations()
            for _ in range(100):  # the last prune runs as its own task
                rows = await w.journal.select("SELECT job_id FROM executions")
                if len(rows) <= 3:
                    break
                await asyncio.sleep(0.01)
            return rows

    assert len(run(body())) <= 3
