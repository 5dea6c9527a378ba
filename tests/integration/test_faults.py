"""Fault injection: each test breaks one thing and checks that every job still ends in the right
status, exactly once, with nothing lost. Real agent process, real handlers, real broker, emulator.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from agent.sandbox.stack import Stack
from tests.conftest import Thing
from tests.integration.agent_harness import AgentProcess, live_group_members, write_handler

pytestmark = pytest.mark.broker

TERMINAL = {"SUCCEEDED", "FAILED", "TIMED_OUT", "REJECTED", "REMOVED", "CANCELED"}


def gated(tmp_path: Path, name: str = "work", **options: Any) -> tuple[dict[str, Any], Path,
                                                                        Path, Path]:
    """A handler that records each run and its pid, then waits for a gate file."""
    runs, gate, pidfile = tmp_path / "runs", tmp_path / "gate", tmp_path / "pid"
    path = write_handler(tmp_path / "handlers", f"{name}.sh", (
        f"echo run >> {runs}\necho $$ > {pidfile}\n"
        f"while [ ! -e {gate} ]; do sleep 0.05; done\necho done\n"))
    return {name: {"command": [str(path)], "timeout": "60s", **options}}, runs, gate, pidfile


def wait_for(predicate: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout}s")


def statuses_sent(agent: AgentProcess) -> list[str]:
    return [u["executionState"]["status"] for u in agent.updates() if "executionState" in u]


def test_kill9_during_idempotent_handler_runs_it_again(thing: Thing, tmp_path: Path) -> None:
    h, runs, gate, pidfile = gated(tmp_path, idempotent=True)
    job = thing.j("idem")
    agent = AgentProcess(thing.stack, thing.name, tmp_path / "agent", h)
    with agent:
        agent.wait_ready()
        thing.emulator.create_job(job, [thing.name], {"operation": "work"})
        wait_for(pidfile.exists, what="handler start")
        first_pid = int(pidfile.read_text())
        agent.kill()  # kill -9: no chance to clean up
        agent.start()
        wait_for(lambda: runs.read_text().count("run") == 2, what="second run")
        assert live_group_members(first_pid) == []  # the orphaned first run was stopped
        gate.touch()
        execution = agent.wait_status(job)
    assert execution["status"] == "SUCCEEDED"
    assert statuses_sent(agent).count("SUCCEEDED") == 1


def test_kill9_during_other_handler_fails_it_and_never_reruns(thing: Thing,
                                                             tmp_path: Path) -> None:
    h, runs, _gate, pidfile = gated(tmp_path)
    job = thing.j("once")
    agent = AgentProcess(thing.stack, thing.name, tmp_path / "agent", h)
    with agent:
        agent.wait_ready()
        thing.emulator.create_job(job, [thing.name], {"operation": "work"})
        wait_for(pidfile.exists, what="handler start")
        agent.kill()
        agent.start()
        execution = agent.wait_status(job)
        assert live_group_members(int(pidfile.read_text())) == []
    assert execution["status"] == "FAILED"
    assert execution["statusDetails"]["reason"].startswith(
        "interrupted: the agent restarted while the handler ran; not run again")
    assert runs.read_text().splitlines() == ["run"]


def test_crash_loop_guard_stops_rerunning(thing: Thing, tmp_path: Path) -> None:
    h, runs, _gate, _pidfile = gated(tmp_path, idempotent=True)
    job = thing.j("loop")
    agent = AgentProcess(thing.stack, thing.name, tmp_path / "agent", h, max_attempts=2)
    with agent:
        agent.wait_ready()
        thing.emulator.create_job(job, [thing.name], {"operation": "work"})
        for attempt in (1, 2):
            wait_for(lambda a=attempt: runs.exists() and runs.read_text().count("run") == a,
                     what=f"run {attempt}")
            agent.kill()  # this job "keeps killing the agent"
            agent.start()
        execution = agent.wait_status(job)
    assert execution["status"] == "FAILED"
    assert execution["statusDetails"]["reason"].startswith("crash loop: the agent stopped 2 times")
    assert runs.read_text().count("run") == 2


def test_broker_down_longer_than_the_job(own_stack: Stack, tmp_path: Path) -> None:
    h, runs, gate, pidfile = gated(tmp_path)
    broker, emulator = own_stack.broker, own_stack.emulator
    assert broker is not None and emulator is not None
    with AgentProcess(own_stack, "outage", tmp_path / "agent", h) as agent:
        agent.wait_ready()
        emulator.create_job("during-outage", ["outage"], {"operation": "work"})
        wait_for(pidfile.exists, what="handler start")
        broker.stop()
        gate.touch()  # the job finishes while the device is cut off
        agent.wait_log("handler finished", 20)
        time.sleep(3)  # longer than the job: the status is owed, not lost
        assert emulator.execution("during-outage", "outage")["status"] == "IN_PROGRESS"
        broker.start()
        execution = agent.wait_status("during-outage", timeout=60)
        assert agent.stop() == 0
    assert execution["status"] == "SUCCEEDED"
    sent = statuses_sent(agent)
    assert sent[-1] == "SUCCEEDED" and sent.count("SUCCEEDED") == 1
    assert sent.index("SUCCEEDED") == len(sent) - 1  # in order: nothing after the final
    assert runs.read_text().splitlines() == ["run"]


@pytest.mark.parametrize("lost", ["request", "reply"])
def test_killed_between_handler_finished_and_status_accepted(thing: Thing, tmp_path: Path,
                                                             lost: str) -> None:
    h, runs, gate, pidfile = gated(tmp_path)
    job = thing.j(f"owed-{lost}")
    agent = AgentProcess(thing.stack, thing.name, tmp_path / "agent", h)
    with agent:
        agent.wait_ready()
        thing.emulator.create_job(job, [thing.name], {"operation": "work"})
        wait_for(pidfile.exists, what="handler start")
        # From now on the final update is lost ("reply": applied, but the answer never comes).
        thing.emulator.drop(1000, {"update"}, what=lost)
        gate.touch()
        agent.wait_log("status update failed, retrying", 30)
        agent.kill()
        thing.emulator.drop(0, set())
        agent.start()
        execution = agent.wait_status(job)
        wait_for(lambda: "status accepted" in agent.log() or lost == "reply", 20)
        agent.wait_log("recovering job_id=", 5)
        assert agent.stop() == 0
    assert execution["status"] == "SUCCEEDED"
    assert runs.read_text().splitlines() == ["run"]  # the stored result was reported


def test_throttling_and_internal_errors_for_a_while(thing: Thing, tmp_path: Path) -> None:
    h, runs, gate, pidfile = gated(tmp_path)
    job = thing.j("throttled")
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent", h) as agent:
        agent.wait_ready()
        thing.emulator.inject_rejections("RequestThrottled", 2, {"get", "describe"})
        thing.emulator.create_job(job, [thing.name], {"operation": "work"})
        wait_for(pidfile.exists, 30, what="handler start")
        thing.emulator.inject_rejections("RequestThrottled", 2, {"update"})
        thing.emulator.inject_rejections("InternalError", 2, {"update"})
        gate.touch()
        execution = agent.wait_status(job, timeout=60)
        assert agent.stop() == 0
    assert execution["status"] == "SUCCEEDED"
    assert runs.read_text().splitlines() == ["run"]
    assert statuses_sent(agent).count("SUCCEEDED") == 1


def test_out_of_order_notify_next_after_restart_never_reruns(thing: Thing,
                                                            tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    path = write_handler(tmp_path / "handlers", "once.sh", f"echo run >> {runs}\n")
    h = {"once": {"command": [str(path)]}}
    job = thing.j("stale")
    agent = AgentProcess(thing.stack, thing.name, tmp_path / "agent", h)
    with agent:
        agent.wait_ready()
        thing.emulator.create_job(job, [thing.name], {"operation": "once"})
        done = agent.wait_status(job)
        agent.stop()
        agent.start()
        agent.wait_ready()
        # A stale notify-next announcing the finished job as QUEUED, delivered late, twice.
        stale = {"timestamp": int(time.time()), "execution": {
            "jobId": job, "thingName": thing.name, "status": "QUEUED", "statusDetails": {},
            "queuedAt": done["queuedAt"], "lastUpdatedAt": done["queuedAt"], "versionNumber": 1,
            "executionNumber": 1, "jobDocument": {"operation": "once"}}}
        for _ in range(2):
            thing.emulator.publish_raw(f"$aws/things/{thing.name}/jobs/notify-next",
                                       json.dumps(stale).encode())
        time.sleep(1.5)
        assert agent.stop() == 0
    assert runs.read_text().splitlines() == ["run"]


def reboot_setup(tmp_path: Path, *, verify: str | None = None) -> tuple[dict[str, Any], Path,
                                                                        Path, dict[str, Any]]:
    boot_id = tmp_path / "boot_id"
    boot_id.write_text("boot-1\n")
    reboots = tmp_path / "reboots"
    reboot_cmd = write_handler(tmp_path / "bin", "fake-reboot", f"echo reboot >> {reboots}\n")
    update = write_handler(tmp_path / "handlers", "update.sh",
                           f"echo phase=$JOB_PHASE >> {tmp_path / 'phases'}\nexit 194\n")
    handler: dict[str, Any] = {"command": [str(update)], "timeout": "30s"}
    if verify is not None:
        handler["verify"] = [str(write_handler(tmp_path / "handlers", "verify.sh", verify))]
    settings = {"boot_id_path": str(boot_id), "reboot_command": [str(reboot_cmd)],
                "reboot_timeout": "1m"}
    return {"update": handler}, boot_id, reboots, settings


def start_rebooting_job(thing: Thing, tmp_path: Path, name: str, *,
                        verify: str | None = None) -> tuple[AgentProcess, str, Path]:
    """An agent whose job has asked for a reboot and seen the reboot command run."""
    h, boot_id, reboots, settings = reboot_setup(tmp_path, verify=verify)
    job = thing.j(name)
    agent = AgentProcess(thing.stack, thing.name, tmp_path / "agent", h, **settings).start()
    agent.wait_ready()
    thing.emulator.create_job(job, [thing.name], {"operation": "update"})
    wait_for(reboots.exists, what="reboot command")
    return agent, job, boot_id


def test_reboot_then_resume_succeeds(thing: Thing, tmp_path: Path) -> None:
    agent, job, boot_id = start_rebooting_job(thing, tmp_path, "reboot")
    with agent:
        rebooting = thing.emulator.execution(job, thing.name)
        assert rebooting["status"] == "IN_PROGRESS"
        assert rebooting["statusDetails"]["step"] == "rebooting"  # delivered before rebooting
        agent.kill()  # the machine goes down
        boot_id.write_text("boot-2\n")
        agent.start()
        execution = agent.wait_status(job)
    assert execution["status"] == "SUCCEEDED"
    assert execution["statusDetails"]["reason"] == "rebooted as the handler asked"
    assert (tmp_path / "phases").read_text().splitlines() == ["phase=run"]


def test_reboot_verify_phase_decides(thing: Thing, tmp_path: Path) -> None:
    agent, job, boot_id = start_rebooting_job(thing, tmp_path, "verify",
                                              verify="echo verify failed >&2\nexit 4\n")
    with agent:
        agent.stop()
        boot_id.write_text("boot-2\n")
        agent.start()
        execution = agent.wait_status(job)
    assert execution["status"] == "FAILED"
    assert execution["statusDetails"]["phase"] == "verify after reboot"
    assert "verify failed" in execution["statusDetails"]["outputHead"]


def test_reboot_that_did_not_happen_fails(thing: Thing, tmp_path: Path) -> None:
    agent, job, _boot_id = start_rebooting_job(thing, tmp_path, "noreboot")
    with agent:
        agent.kill()
        agent.start()  # same boot id: the reboot never happened
        execution = agent.wait_status(job)
    assert execution["status"] == "FAILED"
    assert execution["statusDetails"]["reason"].startswith("the device did not reboot")


def test_job_canceled_during_the_reboot(thing: Thing, tmp_path: Path) -> None:
    agent, job, boot_id = start_rebooting_job(thing, tmp_path, "cancelreboot")
    with agent:
        agent.kill()
        thing.emulator.cancel_job(job, force=True)  # canceled while the device was down
        updates_before = len(agent.updates())
        boot_id.write_text("boot-2\n")
        agent.start()
        agent.wait_log("action=done", 20)
        time.sleep(0.5)
        assert agent.stop() == 0
    assert thing.emulator.execution(job, thing.name)["status"] == "CANCELED"
    assert len(agent.updates()) == updates_before  # nothing sent for it after the restart


def test_corrupt_journal_is_moved_aside(thing: Thing, tmp_path: Path) -> None:
    state = tmp_path / "agent" / "state"
    state.mkdir(mode=0o700, parents=True)  # private, as the agent makes it
    (state / "journal.db").write_bytes(b"this is not a database" * 100)
    path = write_handler(tmp_path / "handlers", "ok.sh", "exit 0\n")
    job = thing.j("after-corruption")
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent",
                      {"ok": {"command": [str(path)]}}) as agent:
        agent.wait_ready()
        thing.emulator.create_job(job, [thing.name], {"operation": "ok"})
        assert agent.wait_status(job)["status"] == "SUCCEEDED"
        assert "CRITICAL" in agent.log() and "is corrupt" in agent.log()
    assert list(state.glob("journal.db.corrupt-*"))


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_disk_refuses_new_jobs_then_recovers(thing: Thing, tmp_path: Path) -> None:
    state = tmp_path / "agent" / "state"
    state.mkdir(parents=True)
    # mode=0700: a tmpfs is 1777 by default, and the agent refuses a state_dir others can write.
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs",
                              str(state)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {mounted.stderr.strip()}")
    try:
        path = write_handler(tmp_path / "handlers", "ok.sh", "echo fine\n")
        job = thing.j("disk")
        with AgentProcess(thing.stack, thing.name, tmp_path / "agent",
                          {"ok": {"command": [str(path)]}}, poll_interval="1s") as agent:
            agent.wait_ready()
            filler = state / "filler"
            subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k", "count=1000"],
                           capture_output=True)
            thing.emulator.create_job(job, [thing.name], {"operation": "ok"})
            agent.wait_log("not taking new jobs", 30)
            time.sleep(1.5)
            assert thing.emulator.execution(job, thing.name)["status"] == "QUEUED"  # not lost
            filler.unlink()  # space returns
            execution = agent.wait_status(job, timeout=60)
            assert agent.stop() == 0
        assert execution["status"] == "SUCCEEDED"
    finally:
        subprocess.run(["umount", "-l", str(state)], capture_output=True)


@pytest.mark.parametrize("lost", ["request", "reply"])
def test_claim_whose_answer_never_came(thing: Thing, tmp_path: Path, lost: str) -> None:
    """The claim update times out: applied or not, the job runs exactly once."""
    runs = tmp_path / "runs"
    path = write_handler(tmp_path / "handlers", "once.sh", f"echo run >> {runs}\n")
    job = thing.j(f"claim-{lost}")
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent",
                      {"once": {"command": [str(path)]}}) as agent:
        agent.wait_ready()
        thing.emulator.drop(1, {"update"}, what=lost)
        thing.emulator.create_job(job, [thing.name], {"operation": "once"})
        execution = agent.wait_status(job, timeout=40)
        assert "claim not confirmed" in agent.log()
        assert agent.stop() == 0
    assert execution["status"] == "SUCCEEDED"
    assert runs.read_text().splitlines() == ["run"]
