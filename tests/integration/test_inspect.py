"""``status``, ``jobs``, ``log``, reload and metrics against the real agent process.

Each test runs ``iot-jobs-agent`` itself (a subprocess, as a person would) next to a real agent
connected to the sandbox broker and emulator.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Thing
from tests.integration.agent_harness import (
    AgentProcess,
    NotifySocket,
    live_group_members,
    write_handler,
)
from tests.unit.test_monitor import parse

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]


def cli(agent: AgentProcess, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args, "--config",
                           str(agent.config_path)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def status(agent: AgentProcess, warning: str = "") -> tuple[int, dict[str, Any]]:
    proc = cli(agent, "status", "--json")
    assert proc.stderr == warning, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def until(check: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout}s")


def receive(notify: NotifySocket) -> bool:
    """Take one more notification if one comes within 0.2 s; False (so `until` polls on)."""
    with contextlib.suppress(TimeoutError):
        notify.messages.append(notify.sock.recv(4096).decode())
    return False


def blocking_handler(tmp_path: Path) -> dict[str, Any]:
    """A handler that reports a step, prints a line and waits until ``release`` exists."""
    body = f"""echo $$ > {tmp_path}/pid
echo '{{"step": "download"}}' >&"$JOB_PROGRESS_FD"
echo "first line"
while [ ! -e {tmp_path}/release ]; do sleep 0.05; done
echo "last line"
"""
    path = write_handler(tmp_path / "handlers", "block.sh", body)
    return {"block": {"command": [str(path)], "timeout": "60s", "idempotent": False}}


def test_status_connected_running_a_job_and_stopped(thing: Thing, tmp_path: Path) -> None:
    job = thing.j("watched")
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent",
                      blocking_handler(tmp_path)) as agent:
        agent.wait_ready()
        code, idle = until(lambda: (r := status(agent))[1]["phase"] == "running" and r,
                           "phase running")
        assert code == 0
        assert idle["connected"] is True and idle["running_jobs"] == []
        assert idle["pid"] == agent.process.pid  # type: ignore[union-attr]
        assert idle["last_sync"] is not None and idle["owed_statuses"] == {"count": 0}

        thing.emulator.create_job(job, [thing.name], {"operation": "block"})
        code, busy = until(lambda: (r := status(agent))[1]["running_jobs"]
                           and r[1]["running_jobs"][0]["step"] == "download" and r,
                           "the job and its step in status")
        [running] = busy["running_jobs"]
        assert code == 0
        assert (running["jobId"], running["executionNumber"], running["handler"],
                running["state"]) == (job, 1, "block", "running")
        assert running["pid"] == int((tmp_path / "pid").read_text())
        assert running["runningSeconds"] >= 0
        text = cli(agent, "status")
        assert text.returncode == 0
        assert f"connected to 127.0.0.1:{thing.stack.broker.port} since" in text.stdout  # type: ignore[union-attr]
        assert job in text.stdout and "download" in text.stdout

        (tmp_path / "release").touch()
        agent.wait_status(job)
        until(lambda: not status(agent)[1]["running_jobs"], "the job gone from status")
        assert agent.stop() == 0
    code, stopped = status(agent)
    assert code == 3
    assert stopped["running"] is False and stopped["connected"] is False
    assert stopped["why"].startswith("stopped at ")
    assert stopped["running_jobs"] == [] and stopped["open_executions"] == []
    assert "not running (stopped at" in cli(agent, "status").stdout


def test_status_after_kill_9_with_a_handler_left_running(thing: Thing, tmp_path: Path) -> None:
    job = thing.j("orphan")
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent",
                      blocking_handler(tmp_path)) as agent:
        agent.wait_ready()
        thing.emulator.create_job(job, [thing.name], {"operation": "block"})
        until(lambda: status(agent)[1]["running_jobs"], "the job running")
        agent_pid = agent.process.pid  # type: ignore[union-attr]
        agent.kill()
    handler = int((tmp_path / "pid").read_text())
    try:
        code, report = status(agent)
        assert code == 3  # the state file still says "running": the pid check says no
        assert report["running"] is False and report["connected"] is False
        assert report["why"].startswith(f"the agent died: pid {agent_pid} is gone")
        [left] = report["open_executions"]
        assert (left["jobId"], left["state"], left["pid"], left["handlerAlive"]) == (
            job, "running", handler, True)
        text = cli(agent, "status").stdout
        assert "settled at the agent's next start" in text and f"{handler} (still running)" in text
        jobs = json.loads(cli(agent, "jobs", "--json").stdout)
        assert jobs[0]["jobId"] == job and jobs[0]["status"] == "IN_PROGRESS"
    finally:
        os.killpg(handler, signal.SIGKILL)
        assert live_group_members(handler) == []


def test_jobs_lists_newest_first_with_filters(thing: Thing, tmp_path: Path) -> None:
    ok = write_handler(tmp_path / "handlers", "ok.sh", "echo fine\n")
    bad = write_handler(tmp_path / "handlers", "bad.sh", "echo 'disk full' >&2\nexit 3\n")
    handlers = {"ok": {"command": [str(ok)]}, "bad": {"command": [str(bad)]}}
    first, second = thing.j("first"), thing.j("second")
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent", handlers) as agent:
        agent.wait_ready()
        thing.emulator.create_job(first, [thing.name], {"operation": "ok"})
        agent.wait_status(first)
        thing.emulator.create_job(second, [thing.name], {"operation": "bad"})
        agent.wait_status(second)
        until(lambda: not json.loads(cli(agent, "jobs", "--json").stdout)[0]["statusOwed"],
              "the FAILED status delivered")
        listing = cli(agent, "jobs", "--json")
        table = cli(agent, "jobs")
        failed = cli(agent, "jobs", "--json", "--status", "failed")
        newest = cli(agent, "jobs", "--json", "--limit", "1")
    assert listing.returncode == table.returncode == 0
    items = json.loads(listing.stdout)
    assert [(i["jobId"], i["executionNumber"], i["status"]) for i in items] == [
        (second, 1, "FAILED"), (first, 1, "SUCCEEDED")]
    bad_item, ok_item = items
    assert bad_item["handler"] == "bad" and bad_item["reason"] == "exit code 3"
    assert bad_item["statusDetails"]["exitCode"] == "3"
    assert bad_item["startedAt"] <= bad_item["finishedAt"] <= time.time()
    assert ok_item["durationSeconds"] >= 0 and ok_item["state"] == "done"
    log = tmp_path / "agent" / "state" / "logs" / f"{first}.1.log"
    assert ok_item["logPath"] == str(log) and "fine" in log.read_text()
    assert [i["jobId"] for i in json.loads(failed.stdout)] == [second]
    assert [i["jobId"] for i in json.loads(newest.stdout)] == [second]
    header, *rows = table.stdout.splitlines()
    assert header.split()[:5] == ["JOB", "ID", "EXEC", "HANDLER", "STATUS"]
    assert rows[0].split()[:4] == [second, "1", "bad", "FAILED"]
    assert rows[1].endswith(str(log))


def test_log_follow_tails_a_running_job_until_it_ends(thing: Thing, tmp_path: Path) -> None:
    job = thing.j("tail")
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent",
                      blocking_handler(tmp_path)) as agent:
        agent.wait_ready()
        thing.emulator.create_job(job, [thing.name], {"operation": "block"})
        until(lambda: (tmp_path / "pid").exists(), "the handler started")
        out = tmp_path / "follow.out"
        with out.open("wb") as sink:
            follower = subprocess.Popen(
                [sys.executable, "-m", "agent", "log", job, "--follow", "--config",
                 str(agent.config_path)], stdout=sink, stderr=subprocess.PIPE, cwd=ROOT)
            try:
                until(lambda: "first line" in out.read_text(), "the output so far, live")
                assert follower.poll() is None  # still following: the job runs
                (tmp_path / "release").touch()
                assert follower.wait(30) == 0
            finally:
                if follower.poll() is None:
                    follower.kill()
        text = out.read_text()
        assert text.index("first line") < text.index("last line") < text.index(
            "succeeded: exit code 0")
        assert agent.wait_status(job)["status"] == "SUCCEEDED"
        # Without --follow, and by execution number: the same file, at once.
        again = cli(agent, "log", job, "--execution", "1")
        assert again.returncode == 0 and again.stdout == text


def test_reload_good_then_broken_config(thing: Thing, tmp_path: Path) -> None:
    a = write_handler(tmp_path / "handlers", "a.sh", "echo a\n")
    b = write_handler(tmp_path / "handlers", "b.sh", "echo b\n")
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        with AgentProcess(thing.stack, thing.name, tmp_path / "agent",
                          {"a": {"command": [str(a)]}}, notify_socket=notify.path) as agent:
            notify.collect_until("READY=1")
            config = yaml.safe_load(agent.config_path.read_text())
            config["handlers"]["b"] = {"command": [str(b)]}
            config["mqtt"]["keep_alive"] = "2m"
            config["max_concurrent_jobs"] = 2
            agent.config_path.write_text(yaml.safe_dump(config))
            reload = cli(agent, "reload")
            assert reload.returncode == 0, reload.stderr
            assert reload.stdout == (
                f"reloaded {agent.config_path}: applied handlers.b added, max_concurrent_jobs; "
                "needs a restart to change mqtt.keep_alive\n")
            messages = notify.collect_until("RELOADING=1")
            [reloading] = [m for m in messages if m.startswith("RELOADING=1")]
            assert reloading.split("\n")[1].startswith("MONOTONIC_USEC=")
            after = messages.index(reloading) + 1
            until(lambda: any(m.startswith("READY=1") for m in notify.messages[after:])
                  or receive(notify), "READY=1 after RELOADING=1")  # it ends the reload
            assert "mqtt.keep_alive changed in" in agent.log()  # named as needing a restart
            job_b = thing.j("b")
            thing.emulator.create_job(job_b, [thing.name], {"operation": "b"})
            assert agent.wait_status(job_b)["status"] == "SUCCEEDED"

            # Broken: a plain SIGHUP (systemd's ExecReload=kill -HUP would do the same) ...
            config["handlers"]["c"] = {"command": [str(a)], "colour": "red"}
            agent.config_path.write_text(yaml.safe_dump(config))
            agent.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            agent.wait_log("reload refused: 1 problem(s)")
            assert "handlers.c.colour: unknown setting" in agent.log()
            # ... and through the command, whose exit code fails `systemctl reload`.
            refused = cli(agent, "reload")
            assert refused.returncode == 78
            assert refused.stderr.startswith("reload refused: 1 problem(s), the first: ")
            assert "handlers.c.colour: unknown setting" in refused.stderr
            # The running config stays: b still runs, c was never taken.
            again, job_c = thing.j("b-again"), thing.j("c")
            thing.emulator.create_job(again, [thing.name], {"operation": "b"})
            thing.emulator.create_job(job_c, [thing.name], {"operation": "c"})
            assert agent.wait_status(again)["status"] == "SUCCEEDED"
            assert agent.wait_status(job_c)["status"] == "REJECTED"
            # status still works from the broken file (it needs only its state_dir).
            code, report = status(agent, warning=(
                f"warning: {agent.config_path} has problems (see `iot-jobs-agent check-config`)"
                f"; its state_dir is {tmp_path / 'agent' / 'state'}\n"))
            assert code == 0 and report["last_reload"]["ok"] is False
            assert report["connected"] and report["thing_name"] == thing.name
            assert "REFUSED" in cli(agent, "status").stdout
            assert agent.stop() == 0
    finally:
        notify.close()


def test_metrics_file(thing: Thing, tmp_path: Path) -> None:
    ok = write_handler(tmp_path / "handlers", "ok.sh", "exit 0\n")
    bad = write_handler(tmp_path / "handlers", "bad.sh", "exit 1\n")
    metrics = tmp_path / "textfile" / "iot-jobs-agent.prom"
    metrics.parent.mkdir()
    started = time.time()
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent",
                      {"ok": {"command": [str(ok)]}, "bad": {"command": [str(bad)]}},
                      metrics_file=str(metrics)) as agent:
        agent.wait_ready()
        for name in ("ok", "bad"):
            job = thing.j(name)
            thing.emulator.create_job(job, [thing.name], {"operation": name})
            agent.wait_status(job)
        thing.emulator.create_job(thing.j("nope"), [thing.name], {"operation": "nope"})
        agent.wait_status(thing.j("nope"))

        def figures() -> dict[str, float]:
            samples = parse(metrics.read_text())
            done = sum(v for k, v in samples.items() if k.startswith("iot_jobs_agent_jobs_"))
            return samples if done == 3 and samples["iot_jobs_agent_outbox_updates"] == 0 \
                else {}

        live = until(figures, "three jobs counted, nothing owed")
        assert agent.stop() == 0
    assert live["iot_jobs_agent_connected"] == 1
    assert live["iot_jobs_agent_reconnects_total"] == 0
    assert live['iot_jobs_agent_jobs_total{outcome="succeeded"}'] == 1
    assert live['iot_jobs_agent_jobs_total{outcome="failed"}'] == 1
    assert live['iot_jobs_agent_jobs_total{outcome="rejected"}'] == 1
    assert live["iot_jobs_agent_running_jobs"] == 0
    assert started <= live["iot_jobs_agent_last_sync_timestamp_seconds"] <= time.time()
    final = parse(metrics.read_text())
    assert final["iot_jobs_agent_connected"] == 0
    assert sorted(p.name for p in metrics.parent.iterdir()) == ["iot-jobs-agent.prom"]
