"""Device Client documents end to end: real agent process, broker and emulator, handler_dir
scripts written for Device Client, and hostile documents that must be REJECTED with nothing run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Thing
from tests.integration.agent_harness import AgentProcess, live_group_members, write_handler
from tests.integration.test_faults import wait_for

pytestmark = pytest.mark.broker


def scripts(tmp_path: Path) -> tuple[Path, Path]:
    """A handler_dir with Device Client style scripts ($1 = runAsUser); each records its run."""
    directory, runs = tmp_path / "dc-handlers", tmp_path / "runs"
    write_handler(directory, "record.sh", f'shift\necho "$*" >> {runs}\necho "out: $*"\n')
    write_handler(directory, "fail.sh", f'echo fail >> {runs}\necho "bad things" >&2\nexit 3\n')
    write_handler(directory, "warn.sh", f'echo warn >> {runs}\necho "w1" >&2\necho "w2" >&2\n')
    write_handler(directory, "gate.sh", (f'echo gate >> {runs}\necho $$ > {tmp_path / "pid"}\n'
                                         f'while [ ! -e {tmp_path / "gate"} ]; do sleep 0.05; '
                                         'done\n'))
    return directory, runs


def dc_agent(thing: Thing, tmp_path: Path, **settings: Any) -> tuple[AgentProcess, Path]:
    directory, runs = scripts(tmp_path)
    agent = AgentProcess(thing.stack, thing.name, tmp_path / "agent", {},
                         handler_dir=str(directory), **settings)
    return agent, runs


def step(name: str, handler: str, *args: str, **extra: Any) -> dict[str, Any]:
    return {"action": {"name": name, "type": "runHandler",
                       "input": {"handler": handler, "args": list(args), "path": "default"},
                       **extra}}


def command(name: str, text: str, **extra: Any) -> dict[str, Any]:
    return {"action": {"name": name, "type": "runCommand", "input": {"command": text}, **extra}}


def runs_of(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_steps_final_step_progress_and_device_client_keys(thing: Thing, tmp_path: Path) -> None:
    agent, runs = dc_agent(thing, tmp_path, run_command={"allow": ["echo", "sleep"]})
    doc = {"version": "1.0", "includeStdOut": "true", "_comment": "from the console",
           "steps": [step("One", "record.sh", "a"),
                     step("Optional", "fail.sh", ignoreStepFailure=True),
                     command("Nap", "sleep,1"),
                     command("Echo", "echo,x\\,y")],
           "finalStep": step("Final", "record.sh", "last")}
    failing = {"version": "1.0", "steps": [step("Warn", "warn.sh", allowStdErr=1),
                                           step("Never", "record.sh", "never")],
               "finalStep": step("NotEither", "record.sh", "final")}
    with agent:
        agent.wait_ready()
        thing.emulator.create_job(thing.j("ok"), [thing.name], doc)
        ok = agent.wait_status(thing.j("ok"))
        thing.emulator.create_job(thing.j("bad"), [thing.name], failing)
        bad = agent.wait_status(thing.j("bad"))
    assert ok["status"] == "SUCCEEDED", ok
    assert runs_of(runs)[:3] == ["a", "fail", "last"]
    details = ok["statusDetails"]
    assert (details["step"], details["stepName"], details["ignoredFailures"]) == ("5/5", "Final",
                                                                                  "2/5")
    assert details["stdout"] == "out: last" and "stderr" not in details
    progress = [u["executionState"]["statusDetails"] for u in agent.updates()
                if u.get("executionState", {}).get("status") == "IN_PROGRESS"]
    assert {"step": "3/5", "stepName": "Nap"} in progress, progress  # while it slept
    assert bad["status"] == "FAILED"
    details = bad["statusDetails"]
    assert details["reason"] == "2 lines on stderr; allowStdErr allows 1: w2"
    assert (details["failedStep"], details["failedStepName"]) == ("1/3", "Warn")
    assert details["stderr"] == "w1 | w2" and details["exitCode"] == "0"
    assert runs_of(runs)[3:] == ["warn"]  # neither the next step nor finalStep ran


def test_old_flat_form_and_conditions(thing: Thing, tmp_path: Path) -> None:
    agent, runs = dc_agent(thing, tmp_path, device_facts={"operatingSystem": "debian"})
    flat = {"operation": "record.sh", "args": ["flat"], "path": "default"}
    wrong_os = {"version": "1.0", "steps": [step("x", "record.sh", "no")],
                "conditions": [{"key": "operatingSystem", "value": ["ubuntu"],
                                "type": "stringEqual"}]}
    unknown = {"version": "1.0", "steps": [step("x", "record.sh", "no")],
               "conditions": [{"key": "arch", "value": ["arm64"]}]}
    right_os = {**wrong_os, "conditions": [{"key": "operatingSystem",
                                            "value": ["ubuntu", "debian"]}]}
    with agent:
        agent.wait_ready()
        results = []
        for name, doc in (("flat", flat), ("wrong", wrong_os), ("unknown", unknown),
                          ("right", right_os)):
            thing.emulator.create_job(thing.j(name), [thing.name], doc)
            results.append(agent.wait_status(thing.j(name)))
    assert [r["status"] for r in results] == ["SUCCEEDED", "REJECTED", "REJECTED", "SUCCEEDED"]
    assert results[1]["statusDetails"]["reason"] == (
        "condition not met: operatingSystem is 'debian' on this device; the job wants one of "
        "'ubuntu'")
    assert "condition on 'arch': this device does not define that fact" in \
        results[2]["statusDetails"]["reason"]
    assert runs_of(runs) == ["flat", "no"]


HOSTILE = {
    "dotdot": ({"version": "1.0", "steps": [step("x", "../../../../bin/sh")]},
               "must be a plain file name"),
    "path": ({"version": "1.0", "steps": [{"action": {
        "name": "x", "type": "runHandler", "input": {"handler": "sh", "path": "/bin"}}}]},
        "is not one of this device's handler_paths"),
    "command": ({"version": "1.0", "steps": [command("x", "rm,-rf,/")]},
                "runCommand program 'rm' is not allowed"),
    "user": ({"version": "1.0", "steps": [step("x", "record.sh", runAsUser="no-such-user-9")]},
             "runAsUser 'no-such-user-9': no such user on this device"),
    "user-command": ({"version": "1.0", "steps": [command("x", "echo,hi", runAsUser="nobody")]},
                     "add it to run_command.users"),
    "late": ({"version": "1.0", "steps": [step("fine", "record.sh", "first"),
                                          command("bad", "reboot")]},
             "runCommand program 'reboot' is not allowed"),
    "101": ({"version": "1.0", "steps": [step(f"s{i}", "record.sh", str(i))
                                         for i in range(101)]},
            "the document has 101 steps; at most 100 are allowed"),
    "type": ({"version": "1.0", "steps": [{"action": {"name": "x", "type": "runShell",
                                                      "input": {"command": "id"}}}]},
             'must be "runHandler" or "runCommand"'),
}


def test_hostile_documents_are_rejected_and_nothing_runs(thing: Thing, tmp_path: Path) -> None:
    agent, runs = dc_agent(thing, tmp_path, run_command={"allow": ["echo"]})
    with agent:
        agent.wait_ready()
        got = {}
        for name, (doc, _) in HOSTILE.items():
            thing.emulator.create_job(thing.j(name), [thing.name], doc)
            got[name] = agent.wait_status(thing.j(name))
    for name, (_, reason) in HOSTILE.items():
        assert got[name]["status"] == "REJECTED", (name, got[name])
        assert reason in got[name]["statusDetails"]["reason"], (name, got[name])
    assert runs_of(runs) == []  # not even the fine first step of "late"
    assert not (tmp_path / "agent" / "state" / "logs").exists() or not list(
        (tmp_path / "agent" / "state" / "logs").iterdir())


def test_32_kb_document_with_100_steps(thing: Thing, tmp_path: Path) -> None:
    agent, runs = dc_agent(thing, tmp_path, progress_interval="1s")
    doc: dict[str, Any] = {"version": "1.0",
                           "steps": [step(f"s{i}", "record.sh", str(i)) for i in range(99)],
                           "finalStep": step("final", "record.sh", "final")}
    doc["_comment"] = "x" * (32 * 1024 - len(json.dumps(doc)) - 20)
    assert 31 * 1024 < len(json.dumps(doc)) <= 32 * 1024
    with agent:
        agent.wait_ready()
        thing.emulator.create_job(thing.j("big"), [thing.name], doc)
        execution = agent.wait_status(thing.j("big"), timeout=120)
    assert execution["status"] == "SUCCEEDED", execution
    assert runs_of(runs) == [str(i) for i in range(99)] + ["final"]
    assert execution["statusDetails"]["step"] == "100/100"
    assert len(agent.updates()) < 40  # progress is coalesced, not one update per step


def test_kill9_resumes_the_plan_at_the_interrupted_step(thing: Thing, tmp_path: Path) -> None:
    agent, runs = dc_agent(thing, tmp_path, run_command={"allow": ["echo"]})
    doc = {"version": "1.0", "steps": [step("First", "record.sh", "first"),
                                       step("Gate", "gate.sh"),
                                       step("Last", "record.sh", "last")]}
    with agent:
        agent.wait_ready()
        thing.emulator.create_job(thing.j("resume"), [thing.name], doc)
        wait_for(lambda: (tmp_path / "pid").exists(), what="step 2")
        agent.kill()
        (tmp_path / "pid").unlink()
        agent.start()
        wait_for(lambda: (tmp_path / "pid").exists(), what="step 2 again")
        (tmp_path / "gate").touch()
        execution = agent.wait_status(thing.j("resume"))
    assert execution["status"] == "SUCCEEDED", execution
    # A handler_dir script runs again, as under Device Client; the step before it does not.
    assert runs_of(runs) == ["first", "gate", "gate", "last"]


def test_kill9_during_a_command_step_fails_it(thing: Thing, tmp_path: Path) -> None:
    sleeper = write_handler(tmp_path / "bin", "nap", "sleep 30\n")
    agent, runs = dc_agent(thing, tmp_path, run_command={"allow": [str(sleeper)]})
    doc = {"version": "1.0", "steps": [step("First", "record.sh", "first"),
                                       command("Nap", str(sleeper)),
                                       step("Last", "record.sh", "last")]}
    with agent:
        agent.wait_ready()
        thing.emulator.create_job(thing.j("cmd"), [thing.name], doc)
        agent.wait_log("handler started job_id=" + thing.j("cmd") + " execution=1 handler=Nap")
        agent.kill()
        agent.start()
        execution = agent.wait_status(thing.j("cmd"))
    assert execution["status"] == "FAILED"
    assert execution["statusDetails"]["reason"] == (
        "interrupted: the agent restarted while step 2/3 (Nap) ran; not run again because a "
        "runCommand step is never run twice")
    assert runs_of(runs) == ["first"]


def test_cancel_during_a_plan_stops_the_step_and_runs_no_other(thing: Thing,
                                                                tmp_path: Path) -> None:
    agent, runs = dc_agent(thing, tmp_path)
    doc = {"version": "1.0", "steps": [step("Gate", "gate.sh"), step("After", "record.sh", "x")],
           "finalStep": step("Final", "record.sh", "final")}
    with agent:
        agent.wait_ready()
        thing.emulator.create_job(thing.j("cancel"), [thing.name], doc)
        wait_for(lambda: (tmp_path / "pid").exists(), what="step 1")
        thing.emulator.cancel_job(thing.j("cancel"), force=True)
        agent.wait_log("no status sent")
        pid = int((tmp_path / "pid").read_text())
        assert live_group_members(pid) == []
        (tmp_path / "gate").touch()
        assert agent.stop() == 0
    assert runs_of(runs) == ["gate"]
    assert thing.emulator.execution(thing.j("cancel"), thing.name)["status"] == "CANCELED"
