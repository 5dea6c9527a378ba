"""The agent daemon end to end: real agent process, real handlers, real broker and emulator."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from agent.sandbox.stack import Stack
from tests.conftest import Thing
from tests.integration.agent_harness import (
    AgentProcess,
    NotifySocket,
    live_group_members,
    write_handler,
)

pytestmark = pytest.mark.broker


def handlers(tmp_path: Path, **bodies: str) -> dict[str, dict[str, object]]:
    """name -> body (shell); each becomes a handler with a 20 s timeout unless overridden."""
    out: dict[str, dict[str, object]] = {}
    for name, body in bodies.items():
        path = write_handler(tmp_path / "handlers", f"{name}.sh", body)
        out[name.replace("_", "-")] = {"command": [str(path)], "timeout": "20s"}
    return out


def test_job_succeeds_with_document_env_and_output(thing: Thing, tmp_path: Path) -> None:
    evidence = tmp_path / "evidence"
    h = handlers(tmp_path, echo=f"""
cat > {evidence}.stdin
cp "$JOB_DOCUMENT" {evidence}.file
env > {evidence}.env
printf '%s\\n' "$@" > {evidence}.args
echo "hello from the handler"
echo "a warning" >&2
""")
    job = thing.j("ok")
    doc = {"operation": "echo", "args": ["one", "two words", "$(touch pwned)"]}
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent", h) as agent:
        agent.wait_ready()
        thing.emulator.create_job(job, [thing.name], doc)
        execution = agent.wait_status(job)
        assert agent.stop() == 0
    assert execution["status"] == "SUCCEEDED", agent.log()
    details = execution["statusDetails"]
    assert details["outcome"] == "succeeded"
    assert details["exitCode"] == "0"
    assert "hello from the handler" in details["outputHead"]
    assert json.loads(Path(f"{evidence}.stdin").read_text()) == doc
    assert json.loads(Path(f"{evidence}.file").read_text()) == doc
    assert Path(f"{evidence}.args").read_text().splitlines() == doc["args"]
    assert not Path("pwned").exists() and not (tmp_path / "pwned").exists()
    env = dict(line.split("=", 1) for line in Path(f"{evidence}.env").read_text().splitlines()
               if "=" in line)
    assert env["JOB_ID"] == job and env["THING_NAME"] == thing.name
    assert env["EXECUTION_NUMBER"] == "1"
    assert "PYTEST_CURRENT_TEST" not in env  # a clean environment, not the agent's
    log = tmp_path / "agent" / "state" / "logs" / f"{job}.1.log"
    assert "a warning" in log.read_text()


def test_job_fails_with_exit_code(thing: Thing, tmp_path: Path) -> None:
    h = handlers(tmp_path, broken="echo 'disk full' >&2\nexit 3\n")
    job = thing.j("fail")
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent", h) as agent:
        agent.wait_ready()
        thing.emulator.create_job(job, [thing.name], {"operation": "broken"})
        execution = agent.wait_status(job)
    assert execution["status"] == "FAILED"
    assert execution["statusDetails"]["exitCode"] == "3"
    assert execution["statusDetails"]["reason"] == "exit code 3"
    assert "disk full" in execution["statusDetails"]["outputHead"]


def test_handler_timeout_kills_it_and_fails(thing: Thing, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    h = handlers(tmp_path, slow=f"echo $$ > {pidfile}\nsleep 60 &\nwait\n")
    h["slow"]["timeout"] = "1s"
    job = thing.j("slow")
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent", h) as agent:
        agent.wait_ready()
        thing.emulator.create_job(job, [thing.name], {"operation": "slow"})
        execution = agent.wait_status(job)
    assert execution["status"] == "FAILED"
    assert execution["statusDetails"]["reason"] == "timed out after 1s"
    # The whole process group is gone, grandchild included.
    assert live_group_members(int(pidfile.read_text())) == []


def test_handler_flooding_output_is_drained(thing: Thing, tmp_path: Path) -> None:
    h = handlers(tmp_path, flood=(
        "head -c 30000000 /dev/zero | tr '\\0' 'o' &\n"
        "head -c 30000000 /dev/zero | tr '\\0' 'e' >&2\nwait\necho END\n"))
    job = thing.j("flood")
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent", h) as agent:
        agent.wait_ready()
        thing.emulator.create_job(job, [thing.name], {"operation": "flood"})
        execution = agent.wait_status(job, timeout=60)
    assert execution["status"] == "SUCCEEDED", execution["statusDetails"]
    assert execution["statusDetails"]["outputTail"].endswith("END")
    for value in execution["statusDetails"].values():
        assert 1 <= len(value) <= 1024


@pytest.mark.parametrize(("document", "reason"), [
    ({"operation": "format-disk"}, "no handler for operation 'format-disk'"),
    ({"operation": "echo", "args": "rm -rf /"}, '"args" must be a list of strings'),
    ({"args": []}, 'no "operation"'),
])
def test_invalid_documents_are_rejected(thing: Thing, tmp_path: Path,
                                        document: dict[str, object], reason: str) -> None:
    h = handlers(tmp_path, echo="exit 0\n")
    job = thing.j("bad")
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent", h) as agent:
        agent.wait_ready()
        thing.emulator.create_job(job, [thing.name], document)
        execution = agent.wait_status(job)
    assert execution["status"] == "REJECTED"
    assert reason in execution["statusDetails"]["reason"]


def test_cancel_while_running_stops_handler_and_sends_nothing(thing: Thing,
                                                              tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    h = handlers(tmp_path, long=f"echo $$ > {pidfile}\nsleep 60 &\nwait\n")
    job = thing.j("cancel")
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent", h) as agent:
        agent.wait_ready()
        thing.emulator.create_job(job, [thing.name], {"operation": "long"})
        agent.wait_status(job, {"IN_PROGRESS"})
        deadline = time.monotonic() + 10
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        updates_before = len(agent.updates())
        thing.emulator.cancel_job(job, force=True)
        agent.wait_log("no status sent", 20)
        assert live_group_members(int(pidfile.read_text())) == []
        time.sleep(0.5)
        assert len(agent.updates()) == updates_before  # nothing after the cancel
        assert thing.emulator.execution(job, thing.name)["status"] == "CANCELED"
        assert agent.stop() == 0


def test_two_queued_jobs_run_in_order_one_at_a_time(thing: Thing, tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    h = handlers(tmp_path, step=f"echo start $JOB_ID >> {trace}\nsleep 0.3\n"
                                f"echo end $JOB_ID >> {trace}\n")
    first, second = thing.j("first"), thing.j("second")
    thing.emulator.create_job(first, [thing.name], {"operation": "step"})
    thing.emulator.create_job(second, [thing.name], {"operation": "step"})
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent", h) as agent:
        assert agent.wait_status(second)["status"] == "SUCCEEDED"
    assert thing.emulator.execution(first, thing.name)["status"] == "SUCCEEDED"
    assert trace.read_text().split("\n")[:4] == [f"start {first}", f"end {first}",
                                                 f"start {second}", f"end {second}"]


def test_reconnect_in_the_middle_of_a_job(own_stack: Stack, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    h = handlers(tmp_path, wait=f"while [ ! -e {gate} ]; do sleep 0.1; done\necho done\n")
    assert own_stack.broker is not None and own_stack.emulator is not None
    with AgentProcess(own_stack, "reconnecting", tmp_path / "agent", h) as agent:
        agent.wait_ready()
        own_stack.emulator.create_job("mid", ["reconnecting"], {"operation": "wait"})
        agent.wait_status("mid", {"IN_PROGRESS"})
        own_stack.broker.restart()
        agent.wait_log("disconnected", 10)
        gate.touch()  # the handler finishes while the agent may still be reconnecting
        execution = agent.wait_status("mid", timeout=60)
    assert execution["status"] == "SUCCEEDED", agent.log()


def test_duplicate_notify_next_never_starts_a_job_twice(thing: Thing, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    h = handlers(tmp_path, once=f"echo run >> {runs}\nsleep 0.5\n")
    job = thing.j("dup")
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent", h) as agent:
        agent.wait_ready()
        thing.emulator.create_job(job, [thing.name], {"operation": "once"})
        agent.wait_status(job, {"IN_PROGRESS"})
        # Replay the head notification many times, as a misbehaving broker might.
        execution = thing.emulator.execution(job, thing.name)
        replay = {"timestamp": int(time.time()), "execution": {
            k: execution[k] for k in ("jobId", "thingName", "status", "statusDetails",
                                      "queuedAt", "lastUpdatedAt", "versionNumber",
                                      "executionNumber")} | {"status": "QUEUED",
                                                             "jobDocument": {"operation": "once"}}}
        topic = f"$aws/things/{thing.name}/jobs/notify-next"
        for _ in range(5):
            thing.emulator.publish_raw(topic, json.dumps(replay).encode())
        assert agent.wait_status(job)["status"] == "SUCCEEDED"
        time.sleep(1.0)
        assert agent.stop() == 0
    assert runs.read_text().splitlines() == ["run"]


def test_progress_reaches_the_cloud(thing: Thing, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    h = handlers(tmp_path, report=(
        'echo \'{"progress": 40, "step": "download"}\' >&3\n'
        f"while [ ! -e {gate} ]; do sleep 0.05; done\n"))
    job = thing.j("progress")
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent", h) as agent:
        agent.wait_ready()
        thing.emulator.create_job(job, [thing.name], {"operation": "report"})
        deadline = time.monotonic() + 20
        details: dict[str, str] = {}
        while time.monotonic() < deadline and details.get("progress") != "40":
            details = thing.emulator.execution(job, thing.name)["statusDetails"]
            time.sleep(0.05)
        gate.touch()
        assert details == {"progress": "40", "step": "download"}
        assert agent.wait_status(job)["status"] == "SUCCEEDED"


def test_graceful_sigterm_fails_a_handler_that_outlives_the_grace(thing: Thing,
                                                                 tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    h = handlers(tmp_path, stubborn=f"echo $$ > {pidfile}\nsleep 60 &\nwait\n")
    job = thing.j("term")
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent", h,
                      shutdown_grace="1s") as agent:
        agent.wait_ready()
        thing.emulator.create_job(job, [thing.name], {"operation": "stubborn"})
        agent.wait_status(job, {"IN_PROGRESS"})
        time.sleep(0.3)
        started = time.monotonic()
        assert agent.stop() == 0
        assert time.monotonic() - started < 15
    execution = thing.emulator.execution(job, thing.name)
    assert execution["status"] == "FAILED"
    assert execution["statusDetails"]["reason"].startswith("interrupted: the agent was stopped")
    assert live_group_members(int(pidfile.read_text())) == []


def test_graceful_sigterm_lets_a_short_handler_finish(thing: Thing, tmp_path: Path) -> None:
    h = handlers(tmp_path, short="sleep 1\necho finished\n")
    job = thing.j("short")
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent", h,
                      shutdown_grace="10s") as agent:
        agent.wait_ready()
        thing.emulator.create_job(job, [thing.name], {"operation": "short"})
        agent.wait_status(job, {"IN_PROGRESS"})
        assert agent.stop() == 0
    assert thing.emulator.execution(job, thing.name)["status"] == "SUCCEEDED"


def test_orphaned_in_progress_execution_is_failed_not_rerun(thing: Thing,
                                                            tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    h = handlers(tmp_path, once=f"echo run >> {runs}\n")
    job = thing.j("orphan")
    thing.emulator.create_job(job, [thing.name], {"operation": "once"})
    thing.emulator.call(lambda s: s.start_next(thing.name))  # a previous agent claimed it, died
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent", h) as agent:
        execution = agent.wait_status(job)
    assert execution["status"] == "FAILED"
    assert execution["statusDetails"]["reason"].startswith(
        "interrupted: this device has no record of running this job")
    assert not runs.exists()


def test_sd_notify_ready_status_and_stopping(thing: Thing, tmp_path: Path) -> None:
    sock = NotifySocket(tmp_path / "notify.sock")
    try:
        h = handlers(tmp_path, echo="exit 0\n")
        with AgentProcess(thing.stack, thing.name, tmp_path / "agent", h,
                          notify_socket=sock.path) as agent:
            messages = sock.collect_until("READY=1")
            agent.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            messages = sock.collect_until("STOPPING=1")
            assert agent.stop() == 0
    finally:
        sock.close()
    ready = next(m for m in messages if "READY=1" in m)
    assert "STATUS=" in ready
    assert any(m.startswith("STATUS=") or "\nSTATUS=" in m for m in messages)


def test_handler_ending_while_a_progress_update_is_in_flight(thing: Thing,
                                                             tmp_path: Path) -> None:
    """The progress loop is cancelled mid-request when a handler exits; the CRT must not be
    left completing a cancelled future (it printed "Exception ignored ... InvalidStateError")."""
    h = handlers(tmp_path, chatty=(
        'for i in 1 2 3 4 5 6 7 8; do echo "{\\"progress\\": $i}" >&3; sleep 0.03; done\n'))
    jobs = [thing.j(f"chatty{i}") for i in range(8)]
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent", h,
                      progress_interval="10ms") as agent:
        agent.wait_ready()
        for job in jobs:
            thing.emulator.create_job(job, [thing.name], {"operation": "chatty"})
        for job in jobs:
            assert agent.wait_status(job)["status"] == "SUCCEEDED"
        assert agent.stop() == 0
    log = agent.log()
    assert "Traceback" not in log and "Exception ignored" not in log, log


def test_second_signal_cuts_the_grace_short(thing: Thing, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    h = handlers(tmp_path, stubborn=f"echo $$ > {pidfile}\nsleep 60 &\nwait\n")
    job = thing.j("force")
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent", h,
                      shutdown_grace="60s") as agent:
        agent.wait_ready()
        thing.emulator.create_job(job, [thing.name], {"operation": "stubborn"})
        agent.wait_status(job, {"IN_PROGRESS"})
        agent.wait_log("handler started")
        started = time.monotonic()
        agent.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        agent.wait_log("waiting for running handlers")
        agent.process.send_signal(signal.SIGINT)  # type: ignore[union-attr]
        assert agent.stop() == 0
        assert time.monotonic() - started < 20  # not the 60 s grace
    execution = thing.emulator.execution(job, thing.name)
    assert execution["status"] == "FAILED"
    assert execution["statusDetails"]["reason"].startswith("interrupted: the agent was stopped")
    assert live_group_members(int(pidfile.read_text())) == []
