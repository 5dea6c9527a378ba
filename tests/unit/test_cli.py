"""The command line as a user meets it: check-config, run with a bad config, exit codes."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def setup_files(tmp_path: Path) -> dict[str, object]:
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("device.crt", "device.key", "ca.pem"):
        (certs / name).write_text("x")
    (certs / "device.key").chmod(0o600)
    handlers = tmp_path / "handlers"
    handlers.mkdir(mode=0o755)
    program = handlers / "ok.sh"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    return {
        "thing_name": "t1",
        "mqtt": {"endpoint": "127.0.0.1", "port": 8883, "cert": "certs/device.crt",
                 "key": "certs/device.key", "ca": "certs/ca.pem"},
        "state_dir": str(tmp_path / "state"),
        "handlers": {"ok": {"command": [str(program)], "timeout": "1m"}},
    }


def write(tmp_path: Path, data: dict[str, object]) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_check_config_ok(tmp_path: Path) -> None:
    proc = cli("check-config", "--config", str(write(tmp_path, setup_files(tmp_path))))
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout and "handlers: ok" in proc.stdout
    assert "commands: off" in proc.stdout
    assert "mqtt session: clean at each start" in proc.stdout
    data = yaml.safe_load((tmp_path / "agent.yaml").read_text())
    data["commands"] = {"enabled": True, "formats": ["json", "cbor"]}
    data["mqtt"]["session_expiry"] = "10m"
    proc = cli("check-config", "--config", str(write(tmp_path, data)))
    assert proc.returncode == 0, proc.stderr
    assert "commands: on (json, cbor)" in proc.stdout
    assert "mqtt session: kept 10m across restarts" in proc.stdout
    assert "secret" not in proc.stdout
    data["handlers"]["ok"]["environment"] = {"TOKEN": {"value": "s3cr3t", "secret": True},
                                             "PLAIN": "p"}
    proc = cli("check-config", "--config", str(write(tmp_path, data)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith(
        ", secret environment (redacted from logs and statusDetails): "
        "handlers.ok.environment.TOKEN)")
    assert "s3cr3t" not in proc.stdout


def test_check_config_lists_every_problem_with_lines(tmp_path: Path) -> None:
    data = setup_files(tmp_path)
    data["handlers"] = {
        "ok": {"command": ["relative.sh"], "timeout": "soon", "colour": "red"},
        "shell": {"command": "echo hi; rm -rf /"},
    }
    data["max_concurrent_jobs"] = 0
    path = write(tmp_path, data)
    proc = cli("check-config", "--config", str(path))
    assert proc.returncode == 78
    lines = proc.stderr.strip().splitlines()
    assert all(line.startswith(f"{path}:") for line in lines), lines
    text = proc.stderr
    assert "handlers.ok.command: the program must be an absolute path" in text
    assert "handlers.ok.timeout: expected a duration" in text
    assert "handlers.ok.colour: unknown setting" in text
    assert "handlers.shell.command: expected a list" in text and "never run through a shell" in text
    assert "max_concurrent_jobs: expected a whole number of at least 1" in text
    assert len(lines) == 5
    assert "Traceback" not in text


def test_permission_refusals(tmp_path: Path) -> None:
    data = setup_files(tmp_path)
    program = Path(data["handlers"]["ok"]["command"][0])  # type: ignore[index]
    program.chmod(0o775)  # group-writable: anyone in the group could run code as the agent
    (tmp_path / "certs" / "device.key").chmod(0o644)
    path = write(tmp_path, data)
    proc = cli("check-config", "--config", str(path))
    assert proc.returncode == 78
    assert "mqtt.key: private key" in proc.stderr and "chmod 600" in proc.stderr
    assert f"handlers.ok.command: handler program {program} is writable by group or others" \
        in proc.stderr
    # `run` refuses too, with the same words, before connecting anywhere.
    run = cli("run", "--config", str(path))
    assert run.returncode == 78
    assert run.stderr.startswith("ConfigError: ")
    assert "chmod go-w" in run.stderr and "Traceback" not in run.stderr


def test_check_config_knows_the_document_settings(tmp_path: Path) -> None:
    data = setup_files(tmp_path)
    scripts = tmp_path / "dc-handlers"
    scripts.mkdir()
    scripts.chmod(0o777)  # anyone could drop a reboot.sh there
    data.update({
        "handler_dir": str(scripts),
        "handler_paths": ["/nonexistent/jobs"],
        "run_command": {"allow": ["echo", "no-such-program-here", "/no/such/tool"],
                        "users": [pwd.getpwuid(os.geteuid()).pw_name, "no-such-user-here"],
                        "timout": "1m"},
        "device_facts": {"os": "debian"},
    })
    path = write(tmp_path, data)
    proc = cli("check-config", "--config", str(path))
    assert proc.returncode == 78
    text = path.read_text().splitlines()

    def line(fragment: str) -> int:
        return next(i for i, t in enumerate(text, 1) if fragment in t)

    assert proc.stderr.strip().splitlines() == [
        f"{path}:{line('timout')}: run_command.timout: unknown setting (did you mean "
        "'timeout'?)"]  # the shape first: files are checked once the file parses
    del data["run_command"]["timout"]  # type: ignore[attr-defined]
    path = write(tmp_path, data)
    proc = cli("check-config", "--config", str(path))
    assert proc.returncode == 78
    assert proc.stderr.strip().splitlines() == [
        f"{path}:{line('handler_dir')}: handler_dir: directory {scripts} is writable by group "
        f"or others (mode 0777): run `chmod go-w {scripts}`",
        f"{path}:{line('/nonexistent/jobs')}: handler_paths[0]: directory /nonexistent/jobs "
        "does not exist: create it or fix the path",
        f"{path}:{line('no-such-program-here')}: run_command.allow[1]: program "
        "'no-such-program-here' is not found on this device: install it, or write its "
        "absolute path (PATH is /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)",
        f"{path}:{line('/no/such/tool')}: run_command.allow[2]: program '/no/such/tool' is not "
        "found on this device: install it or fix the path",
        f"{path}:{line('no-such-user-here')}: run_command.users[1]: no such user "
        "'no-such-user-here': create it or remove it from the list"]


def test_missing_handler_program(tmp_path: Path) -> None:
    data = setup_files(tmp_path)
    data["handlers"]["missing"] = {"command": ["/nonexistent/handler.sh"]}  # type: ignore[index]
    proc = cli("check-config", "--config", str(write(tmp_path, data)))
    assert proc.returncode == 78
    assert "handler program /nonexistent/handler.sh does not exist" in proc.stderr


def test_run_with_unusable_state_dir_exits_78(tmp_path: Path) -> None:
    data = setup_files(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    data["state_dir"] = str(blocker / "sub")
    proc = cli("run", "--config", str(write(tmp_path, data)))
    assert proc.returncode == 78
    assert proc.stderr.startswith("ConfigError: state_dir")


def test_example_config_covers_every_setting() -> None:
    """config/agent.yaml documents every key the agent accepts."""
    import dataclasses

    from agent.config import CommandsConfig, Config, HandlerConfig, MqttConfig, RunCommandConfig

    data = yaml.safe_load((ROOT / "config" / "agent.yaml").read_text())
    top = {f.name for f in dataclasses.fields(Config) if not f.metadata.get("internal")}
    assert set(data) == top
    assert set(data["mqtt"]) == {f.name for f in dataclasses.fields(MqttConfig)}
    assert set(data["run_command"]) == {f.name for f in dataclasses.fields(RunCommandConfig)}
    assert set(data["commands"]) == {f.name for f in dataclasses.fields(CommandsConfig)}
    seen = set().union(*(h.keys() for h in data["handlers"].values()))
    assert seen == {f.name for f in dataclasses.fields(HandlerConfig)}
    # Both forms of an environment value: plain, and {value: ..., secret: true}.
    values = [v for h in data["handlers"].values() for v in h.get("environment", {}).values()]
    assert any(isinstance(v, str) for v in values)
    assert {"value": "change-me", "secret": True} in values


# --- the inspection commands, without an agent (the integration tests run one) -------------


def test_version() -> None:
    from agent import __version__

    for flag in ("--version", "-V"):
        proc = cli(flag)
        assert (proc.returncode, proc.stdout) == (0, f"iot-jobs-agent {__version__}\n")
    from importlib.metadata import version

    assert version("iot-jobs-agent") == __version__  # pyproject reads agent/_version.py


def test_inspection_commands_with_a_missing_config(tmp_path: Path) -> None:
    for args in (["status"], ["jobs"], ["log", "job-1"], ["status", "--json"]):
        proc = cli(*args, "--config", str(tmp_path / "nope.yaml"))
        assert proc.returncode == 78, args
        assert proc.stderr == (f"ConfigError: config file {tmp_path / 'nope.yaml'} does not "
                               "exist: create it (see config/agent.yaml) or pass --config PATH\n")
        assert proc.stdout == ""


def test_inspection_before_the_agent_ever_ran(tmp_path: Path) -> None:
    path = write(tmp_path, setup_files(tmp_path))
    status = cli("status", "--config", str(path))
    assert status.returncode == 3  # not running, as systemctl status says
    assert status.stdout.startswith("iot-jobs-agent: not running (no state file")
    assert cli("status", "--json", "--config", str(path)).stdout.count('"running": false') == 1
    for args in (["jobs"], ["log", "job-1"]):
        proc = cli(*args, "--config", str(path))
        assert proc.returncode == 66, args  # EX_NOINPUT
        assert proc.stderr == (f"NotReadableError: no journal at {tmp_path}/state/journal.db: "
                               f"the agent has not run with state_dir {tmp_path}/state "
                               "(is --config the agent's config?)\n")


def test_inspection_errors_are_one_line(tmp_path: Path) -> None:
    import asyncio

    from agent.journal import Journal

    path = write(tmp_path, setup_files(tmp_path))
    state = tmp_path / "state"

    async def journal_with_one_job() -> None:
        journal = Journal(state / "journal.db")
        await journal.open()
        await journal.claiming(("job-1", 1), "ok", {"operation": "ok"}, 1, 2)
        await journal.close()

    asyncio.run(journal_with_one_job())
    unknown = cli("log", "job-2", "--config", str(path))
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("UnknownJobError: no job job-2 in the journal")
    assert unknown.stderr.count("\n") == 1
    assert cli("log", "job-1", "--execution", "4", "--config", str(path)).stderr == (
        "UnknownJobError: job job-1 has no execution 4 in the journal (see `iot-jobs-agent "
        "jobs`)\n")
    traversal = cli("log", "../../etc/passwd", "--config", str(path))
    assert traversal.returncode == 1 and "is not a job id" in traversal.stderr
    no_log = cli("log", "job-1", "--config", str(path))
    assert no_log.returncode == 66 and "its handler has not started yet" in no_log.stderr
    bad_status = cli("jobs", "--status", "DONE", "--config", str(path))
    assert bad_status.returncode == 2 and "'DONE' is not a job execution status" in \
        bad_status.stderr
    # A journal that is not one: one line, EX_NOINPUT; status cannot tell: 4.
    (state / "journal.db").write_bytes(b"garbage" * 1000)
    for suffix in ("-wal", "-shm"):
        (state / f"journal.db{suffix}").unlink(missing_ok=True)
    corrupt = cli("jobs", "--config", str(path))
    assert corrupt.returncode == 66
    assert corrupt.stderr.startswith(f"NotReadableError: cannot read the journal {state}")
    assert corrupt.stderr.count("\n") == 1
    assert cli("status", "--config", str(path)).returncode == 4
    (state / "status.json").mkdir()
    unreadable = cli("status", "--config", str(path))
    assert unreadable.returncode == 4
    assert unreadable.stderr.startswith("NotReadableError: cannot read the agent's state file")
    assert "Traceback" not in corrupt.stderr + unreadable.stderr


def test_reload_without_an_agent(tmp_path: Path) -> None:
    path = write(tmp_path, setup_files(tmp_path))
    proc = cli("reload", "--config", str(path))
    assert proc.returncode == 3
    assert proc.stderr.startswith("the agent is not running (no state file")
