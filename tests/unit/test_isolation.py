"""What a job can reach on the device (issue 11 items 4 and 5): planted symlinks are never
followed, recovery signals only its own process, and a ``user:`` handler reaches its own files
and nobody else's.

Real processes and a real unprivileged user (``nobody``); the state directories are laid out
by the agent's own start-up code (``Agent._prepare_state_dir``).
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.app import Agent
from agent.config import Config, HandlerConfig, MqttConfig
from agent.runner import DOCUMENT_FILE, RunRequest, RunResult, run_handler

IS_ROOT = os.geteuid() == 0
DOC = {"operation": "x", "secret-ish": "for this job only"}


def config(state_dir: Path, **settings: Any) -> Config:
    return Config(thing_name="t", mqtt=MqttConfig(endpoint="e", cert=Path("c"), key=Path("k")),
                  state_dir=state_dir, **settings)


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A state_dir others can reach, as /var/lib/iot-jobs-agent is (tmp_path sits under a
    0700 directory, which would hide everything from ``nobody`` whatever the agent does)."""
    base = Path(tempfile.mkdtemp(prefix="ija-state-", dir="/var/tmp"))
    base.chmod(0o755)
    try:
        state = base / "state"
        Agent(config(state))._prepare_state_dir(state / "logs")
        yield state
    finally:
        shutil.rmtree(base)


def request(state: Path, stem: str, argv: list[str], **kwargs: Any) -> RunRequest:
    """As the dispatcher builds it: jobs/<stem> and logs/<stem>.log under state_dir."""
    job_id, number = stem.rsplit(".", 1)
    return RunRequest(job_id=job_id, execution_number=int(number), thing_name="t", argv=argv,
                      document=DOC, work_dir=state / "jobs" / stem,
                      log_path=state / "logs" / f"{stem}.log", kill_grace=2.0, **kwargs)


def run(req: RunRequest) -> RunResult:
    return asyncio.run(run_handler(req))


# --------------------------------------------------------------------------- item 5


@pytest.mark.skipif(not IS_ROOT, reason="switching users needs root")
def test_a_user_handler_reaches_its_document_work_dir_and_home(state_dir: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    other = run(request(state_dir, "other-job.1", ["/bin/sh", "-c", "echo private > mine"]))
    assert other.outcome == "succeeded"
    body = """
        set -e
        id -u
        cat "$JOB_DOCUMENT"
        echo written > "$JOB_WORK_DIR/out"
        cat "$JOB_WORK_DIR/out"
        echo home > "$HOME/.rc" && echo "home=$HOME"
        for path in "$STATE/jobs/other-job.1/mine" "$STATE/jobs/other-job.1/job-document.json" \
                    "$STATE/journal.db" "$STATE/logs/other-job.1.log"; do
            if cat "$path" >/dev/null 2>&1; then echo "READ $path"; else echo "denied"; fi
        done
        ls "$STATE/jobs" >/dev/null 2>&1 && echo "LISTED jobs" || echo "not listed"
    """
    req = request(state_dir, "mine.3", ["/bin/sh", "-c", body], user="nobody",
                  environment={"STATE": str(state_dir)})
    (state_dir / "journal.db").write_text("")
    Agent(config(state_dir))._prepare_state_dir(state_dir / "logs")  # as a restart would
    from agent.journal import _make_private

    _make_private(state_dir / "journal.db")
    result = run(req)
    assert result.outcome == "succeeded", (result.reason, result.output_head)
    lines = result.output_head.splitlines()
    assert lines[0] == str(nobody.pw_uid)
    assert json.loads(lines[1]) == DOC
    assert lines[2:4] == ["written", f"home={req.work_dir}"]  # nobody's home does not exist
    assert lines[4:] == ["denied"] * 4 + ["not listed"]
    assert (req.work_dir / ".rc").stat().st_uid == nobody.pw_uid
    assert (req.work_dir / DOCUMENT_FILE).stat().st_mode & 0o777 == 0o600


# --------------------------------------------------------------------------- symlinks


def test_a_symlink_planted_where_the_job_log_goes_is_not_followed(state_dir: Path,
                                                                   tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    req = request(state_dir, "job.1", ["/bin/echo", "job-chosen text"])
    req.log_path.symlink_to(victim)
    result = run(req)
    assert result.outcome == "not_started"
    assert result.reason.startswith(f"cannot open log {req.log_path}: ")
    assert victim.read_text() == "precious\n"
    fifo = state_dir / "logs" / "job.2.log"
    os.mkfifo(fifo)  # nor does a FIFO there hang the agent
    result = run(request(state_dir, "job.2", ["/bin/true"]))
    assert result.outcome == "not_started"
    assert result.reason.startswith(f"cannot open log {fifo}: ")  # ENXIO: no reader


def test_a_symlink_planted_where_the_work_dir_goes_is_not_followed(state_dir: Path,
                                                                    tmp_path: Path) -> None:
    victim = tmp_path / "etc"
    victim.mkdir(mode=0o755)
    req = request(state_dir, "job.1", ["/bin/sh", "-c", "echo x > planted"], user=None)
    req.work_dir.symlink_to(victim)
    result = run(req)
    assert result.outcome == "not_started"
    assert "cannot prepare work dir" in result.reason
    assert os.listdir(victim) == [] and victim.stat().st_mode & 0o777 == 0o755


# --------------------------------------------------------------------------- signals


def _spawn(*argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Started, and past its exec (so /proc shows the program, not the forked parent)."""
    import time

    from agent.procfs import process_cmdline

    proc = subprocess.Popen(argv, start_new_session=True, env=env)
    deadline = time.monotonic() + 10
    while (process_cmdline(proc.pid) or [""])[-1] != argv[-1] and time.monotonic() < deadline:
        time.sleep(0.01)
    return proc


def test_recovery_does_not_signal_a_process_that_reused_the_pid(tmp_path: Path) -> None:
    """The journal names a live process with the right start time (the pid was reused since,
    or the journal was planted), but it runs another program: it must not be signalled."""
    from agent.documents import plan_document
    from agent.journal import Record
    from agent.paths import job_work_dir
    from agent.procfs import process_start_time
    from agent.recovery import Handler, Machine, plan_recovery

    handler = tmp_path / "h.sh"
    handler.write_text("#!/bin/sh\nsleep 60\n")
    handler.chmod(0o755)
    cfg = config(tmp_path / "state", handlers={
        "h": HandlerConfig(command=(str(handler),), idempotent=True)})
    plan = plan_document({"operation": "h", "args": ["a"]}, cfg)
    bystander = _spawn("sleep", "60")  # another process: not our handler's argv
    ours = _spawn(str(handler), "a")
    try:
        machine = Machine(cfg)
        for proc, expected in ((bystander, None), (ours, ours.pid)):
            start = process_start_time(proc.pid)
            assert start is not None
            record = Record("j", 1, "h", {"operation": "h", "args": ["a"]}, "running", 2, 5,
                            1, proc.pid, start, None, None, 0.0)
            action = plan_recovery(record, ("IN_PROGRESS", 2), cfg, machine, plan)
            assert action.kill_pid == expected, proc.args
        # Recognised by its $JOB_WORK_DIR even after exec'ing another program.
        work_dir = job_work_dir(cfg.state_dir, "j.1")
        execed = _spawn("sleep", "60", env={"JOB_WORK_DIR": str(work_dir)})
        try:
            start = process_start_time(execed.pid)
            assert machine.alive(execed.pid, start, Handler(work_dir))
            assert not machine.alive(execed.pid, start, Handler(work_dir / "x"))
            assert not machine.alive(execed.pid, (start or 0) + 1, Handler(work_dir))
        finally:
            execed.kill()
            execed.wait()
    finally:
        for proc in (bystander, ours):
            proc.kill()
            proc.wait()
