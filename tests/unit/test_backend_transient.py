"""The systemd backend against stand-ins for ``systemd-run`` and ``systemctl``.

The stand-ins do what the real tools do for us, minus PID 1: ``systemd-run`` records its
arguments and executes the command after ``--`` with only the ``--setenv`` environment, in the
``--working-directory``; ``systemctl show`` answers what the test says the unit ended with, and
``systemctl kill`` signals the recorded process. The real thing runs in tests/systemd/.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from agent.backends.transient import TransientUnitBackend, unit_name
from agent.config import HandlerLimits
from agent.runner import HandlerProcess, RunRequest, RunResult

SYSTEMD_RUN = """\
import json, os, sys
record = {record!r}
args = sys.argv[1:]
cut = args.index("--")
options, command = args[:cut], args[cut + 1:]
env, cwd, unit = {{}}, None, None
for option in options:
    if option.startswith("--setenv="):
        key, value = option[len("--setenv="):].split("=", 1)
        env[key] = value
    elif option.startswith("--working-directory="):
        cwd = option.split("=", 1)[1]
    elif option.startswith("--unit="):
        unit = option.split("=", 1)[1]
with open(os.path.join(record, "run.json"), "w") as f:
    json.dump({{"options": options, "command": command, "pid": os.getpid(), "unit": unit}}, f)
os.chdir(cwd)
os.execve(command[0], command, env)
"""

SYSTEMCTL = """\
import json, os, sys
record = {record!r}
args = sys.argv[1:]
with open(os.path.join(record, "systemctl.log"), "a") as f:
    f.write(" ".join(args) + "\\n")
if args[0] == "kill":
    sig = int(next(a for a in args if a.startswith("--signal=")).split("=")[1])
    with open(os.path.join(record, "run.json")) as f:
        os.kill(json.load(f)["pid"], sig)
elif args[0] == "show":
    path = os.path.join(record, "show")
    if os.path.exists(path):
        print(open(path).read())
    else:
        print("LoadState=not-found")
"""


@pytest.fixture
def backend(tmp_path: Path) -> TransientUnitBackend:
    record = tmp_path / "record"
    record.mkdir()
    tools = {}
    for name, text in (("systemd-run", SYSTEMD_RUN), ("systemctl", SYSTEMCTL)):
        path = tmp_path / name
        path.write_text(f"#!{sys.executable}\n" + text.format(record=str(record)))
        path.chmod(0o755)
        tools[name] = str(path)
    return TransientUnitBackend(run_dir=tmp_path / "run", systemd_run=tools["systemd-run"],
                                systemctl=tools["systemctl"])


def handler(tmp_path: Path, body: str) -> str:
    path = tmp_path / "handler.sh"
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


def request(tmp_path: Path, argv: list[str], **kwargs: Any) -> RunRequest:
    fields: dict[str, Any] = {
        "job_id": "job-1.x", "execution_number": 2, "thing_name": "thing", "argv": argv,
        "document": {"operation": "x"}, "work_dir": tmp_path / "work",
        "log_path": tmp_path / "job.log", "kill_grace": 1.0}
    fields.update(kwargs)
    return RunRequest(**fields)


def run(req: RunRequest, backend: TransientUnitBackend,
        progress: list[dict[str, str]] | None = None) -> RunResult:
    async def scenario() -> RunResult:
        return await HandlerProcess(req, None if progress is None else progress.append,
                                    backend=backend).wait()

    return asyncio.run(scenario())


def recorded(tmp_path: Path) -> dict[str, Any]:
    return json.loads((tmp_path / "record" / "run.json").read_text())


def test_a_run_is_a_transient_service_with_the_handlers_limits(
        tmp_path: Path, backend: TransientUnitBackend) -> None:
    limits = HandlerLimits(memory_max="64M", cpu_quota="50%", tasks_max=8,
                           protect_system="strict", read_write_paths=("/var/lib/x",),
                           private_network=True, private_tmp=True)
    progress: list[dict[str, str]] = []
    req = request(tmp_path, [handler(tmp_path, """\
        echo "args: $*"
        echo '{"progress": 40}' >&3
        echo "JOB_ID=$JOB_ID FOO=$FOO" >&2
        exit 3
    """), "a b"], limits=limits, environment={"FOO": "bar"})
    result = run(req, backend, progress)
    assert (result.outcome, result.exit_code) == ("failed", 3), result
    assert result.output_head.startswith("args: a b\n")
    assert "JOB_ID=job-1.x FOO=bar" in result.stderr_tail
    assert progress == [{"progress": "40"}]
    seen = recorded(tmp_path)
    assert seen["unit"].startswith("iot-jobs-agent-job-job\\x2d1\\x2ex-2-")  # escaped: - and .
    assert seen["unit"] == seen["unit"].replace("/", "")
    options = seen["options"]
    for prop in ("MemoryMax=64M", "CPUQuota=50%", "TasksMax=8", "ProtectSystem=strict",
                 "ReadWritePaths=/var/lib/x", "PrivateNetwork=yes", "PrivateTmp=yes",
                 "KillMode=control-group"):
        assert prop in options, (prop, options)
    assert "--pipe" in options and "--wait" in options
    assert not list((tmp_path / "run").iterdir()), "the progress FIFO is removed"


def test_the_oom_killer_is_named(tmp_path: Path, backend: TransientUnitBackend) -> None:
    (tmp_path / "record" / "show").write_text(
        "Result=oom-kill\nExecMainCode=2\nExecMainStatus=9\nLoadState=loaded\n")
    req = request(tmp_path, [handler(tmp_path, "exit 1\n")],
                  limits=HandlerLimits(memory_max="64M"))
    result = run(req, backend)
    assert (result.outcome, result.reason) == ("failed",
                                               "killed by the OOM killer (memory_max 64M)")
    assert result.signal == 9 and result.exit_code is None
    log = (tmp_path / "record" / "systemctl.log").read_text()
    assert "reset-failed" in log and "stop" in log


def test_a_signal_is_told_from_the_units_result(tmp_path: Path,
                                                backend: TransientUnitBackend) -> None:
    (tmp_path / "record" / "show").write_text(
        "Result=signal\nExecMainCode=2\nExecMainStatus=6\nLoadState=loaded\n")
    result = run(request(tmp_path, [handler(tmp_path, "exit 255\n")]), backend)
    assert result.reason == "killed by signal 6 (SIGABRT)" and result.signal == 6


def test_a_timeout_kills_the_unit(tmp_path: Path, backend: TransientUnitBackend) -> None:
    req = request(tmp_path, [handler(tmp_path, "echo up\nexec sleep 30\n")], timeout=0.5)
    result = run(req, backend)
    assert result.outcome == "timed_out"
    log = (tmp_path / "record" / "systemctl.log").read_text()
    assert "kill --signal=15 --kill-whom=all -- iot-jobs-agent-job-" in log


@pytest.mark.parametrize("job_id", ["a", "x-y_z", "../../etc/passwd", "a@b.service", "é"])
def test_unit_names_escape_the_job_id(job_id: str) -> None:
    name = unit_name(job_id, 7)
    assert name.startswith("iot-jobs-agent-job-") and name.endswith(".service")
    middle = name[len("iot-jobs-agent-job-"):-len(".service")]
    assert all((c.isalnum() and c.isascii()) or c in "_-\\" for c in middle), name
    assert "/" not in name and "@" not in name and ".." not in name
    assert len(name) < 256


def test_the_default_run_dir_follows_runtime_directory() -> None:
    code = ("from agent.backends import transient; print(transient.RUN_DIR)")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "RUNTIME_DIRECTORY": "/run/iot-jobs-agent-helper"},
                         check=True).stdout.strip()
    assert out == "/run/iot-jobs-agent-helper"
