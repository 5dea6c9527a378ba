"""The local-root paths (issue 11 item 4): every program the config names is trusted along its
whole path, and the state directories are the agent's and private.

Each refusal here was accepted by ``check-config`` before agent.paths existed. They need root
(to give directories to another user), as the agent does.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import stat
from pathlib import Path

import pytest

from agent.documents.lookup import SystemHost
from agent.paths import directory_problem, program_problem
from tests.unit.test_cli import cli, setup_files, write

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="gives files to another user: root")

NOBODY = pwd.getpwnam("nobody").pw_uid


def _script(path: Path, mode: int = 0o755) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(mode)
    return path


def _line(path: Path, needle: str) -> int:
    return next(i for i, text in enumerate(path.read_text().splitlines(), 1) if needle in text)


def _refused(path: Path) -> str:
    """check-config and run both refuse (78); the problems check-config printed."""
    check = cli("check-config", "--config", str(path))
    assert check.returncode == 78, check.stdout
    run = cli("run", "--config", str(path))
    assert run.returncode == 78 and run.stderr.startswith("ConfigError: "), run.stderr
    assert "Traceback" not in check.stderr + run.stderr
    return check.stderr


def test_a_handler_under_a_directory_whose_parent_belongs_to_another_user(tmp_path: Path) -> None:
    data = setup_files(tmp_path)
    theirs = tmp_path / "theirs"
    program = _script(theirs / "ours" / "h.sh")  # root's file in root's directory, but...
    os.chown(theirs, NOBODY, -1)  # ... its parent is nobody's: nobody can rename "ours" away
    data["handlers"] = {"h": {"command": [str(program)]}}
    path = write(tmp_path, data)
    err = _refused(path)
    assert err == (f"{path}:{_line(path, str(program))}: handlers.h.command: handler program "
                   f"{program}: directory {theirs} on its path is owned by uid {NOBODY}, not "
                   f"root or the agent's user: run `chown root {theirs}` (and check what it "
                   "holds), or move the file to a directory owned by root\n")


def test_a_handler_symlinked_into_another_users_directory(tmp_path: Path) -> None:
    data = setup_files(tmp_path)
    target = _script(tmp_path / "home" / "h.sh")
    os.chown(target.parent, NOBODY, -1)
    link = tmp_path / "handlers" / "h.sh"
    link.symlink_to(target)
    data["handlers"] = {"h": {"command": [str(link)]}}
    err = _refused(write(tmp_path, data))
    assert f"handlers.h.command: handler program {link}: directory {target.parent} on its " \
           f"path (through symlink {link} -> {target}) is owned by uid {NOBODY}" in err
    # The same through a relative link whose target is the other user's file itself.
    os.chown(target.parent, 0, -1)
    os.chown(target, NOBODY, -1)
    link.unlink()
    link.symlink_to(Path("..") / "home" / "h.sh")
    err = _refused(write(tmp_path, data))
    assert f"handler program {link} (through symlink {link} -> ../home/h.sh, target " \
           f"{target}) is owned by uid {NOBODY}" in err


def test_a_world_writable_reboot_command_and_verify_program(tmp_path: Path) -> None:
    data = setup_files(tmp_path)
    reboot = _script(tmp_path / "bin" / "reboot", 0o777)
    verify = _script(tmp_path / "bin" / "verify", 0o757)
    data["reboot_command"] = [str(reboot), "now"]
    data["handlers"]["ok"]["verify"] = [str(verify)]  # type: ignore[index]
    path = write(tmp_path, data)
    err = _refused(path).splitlines()
    assert err == [
        f"{path}:{_line(path, str(verify))}: handlers.ok.verify: verify: handler program "
        f"{verify} is writable by group or others (mode 0757): run `chmod go-w {verify}`",
        f"{path}:{_line(path, str(reboot))}: reboot_command: reboot_command program {reboot} "
        f"is writable by group or others (mode 0777): run `chmod go-w {reboot}`"]
    # A reboot_command that is not there yet behind safe directories is no problem (yet).
    data["reboot_command"] = [str(tmp_path / "bin" / "absent")]
    verify.chmod(0o755)
    ok = cli("check-config", "--config", str(write(tmp_path, data)))
    assert ok.returncode == 0, ok.stderr


def test_a_sticky_world_writable_directory_is_not_safe(tmp_path: Path) -> None:
    data = setup_files(tmp_path)
    sticky = tmp_path / "scratch"
    sticky.mkdir()
    sticky.chmod(0o1777)  # as /tmp
    program = _script(sticky / "h.sh")
    data["handlers"] = {"h": {"command": [str(program)]}}
    data["run_command"] = {"allow": [str(_script(sticky / "tool"))]}
    err = _refused(write(tmp_path, data))
    assert f"handlers.h.command: handler program {program}: directory {sticky} on its path " \
           "is writable by others (mode 1777; sticky, but anyone may create what is missing " \
           "there): move it to a directory that only root can write" in err
    assert f"run_command.allow[0]: runCommand program {sticky / 'tool'}: directory {sticky}" \
        in err
    assert directory_problem(sticky) is not None
    assert program_problem("/tmp/x").startswith(  # type: ignore[union-attr]
        "handler program /tmp/x: directory /tmp on its path is writable by others")


def test_the_documents_layer_checks_the_whole_path_at_run_time(tmp_path: Path) -> None:
    """A handler_dir script is looked up per job: a directory on its way that turned unsafe
    after the agent started refuses the job (agent.documents.lookup uses agent.paths)."""
    script = _script(tmp_path / "dc" / "jobs" / "x.sh")
    assert SystemHost().program_problem(script) is None
    (tmp_path / "dc").chmod(0o777)
    problem = SystemHost().program_problem(script)
    assert problem == (f"handler program {script}: directory {tmp_path / 'dc'} on its path is "
                       f"writable by group or others (mode 0777): run `chmod go-w "
                       f"{tmp_path / 'dc'}`")


def test_programs_on_safe_paths_pass(tmp_path: Path) -> None:
    """The control: root's files in root's directories, through root's symlinks."""
    target = _script(tmp_path / "lib" / "h.sh")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "h").symlink_to("../lib/h.sh")
    assert program_problem(tmp_path / "bin" / "h") is None
    assert program_problem(target) is None
    assert program_problem("/bin/sh") is None  # /bin -> usr/bin on merged-/usr systems
    assert directory_problem(tmp_path / "lib") is None
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert "too many symlinks" in (program_problem(loop) or "")


# --------------------------------------------------------------------------- state directories


def test_state_dirs_are_created_private(tmp_path: Path) -> None:
    from agent.app import Agent
    from agent.config import load_config

    data = setup_files(tmp_path)
    config = load_config(write(tmp_path, data))
    logs = tmp_path / "var-log"
    Agent(config)._prepare_state_dir(logs)
    state = tmp_path / "state"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode)
             for p in (state, state / "jobs", state / "commands", state / "logs", logs)}
    assert modes == {"state": 0o711, "jobs": 0o711, "commands": 0o711, "logs": 0o750,
                     "var-log": 0o750}


@pytest.mark.parametrize("where, how", [
    ("state", "chmod 777"), ("state/jobs", "chmod 755"), ("state/logs", "chmod 755"),
    ("state/logs", "chown nobody"), ("state", "chown nobody"), ("var-log", "chmod 757")])
def test_state_dirs_open_to_others_are_refused(tmp_path: Path, where: str, how: str) -> None:
    data = setup_files(tmp_path)
    for sub in ("state", "state/jobs", "state/logs", "var-log"):
        (tmp_path / sub).mkdir(mode=0o700)
    directory = tmp_path / where
    verb, arg = how.split()
    if verb == "chmod":
        directory.chmod(int(arg, 8))
    else:
        os.chown(directory, NOBODY, -1)
    path = write(tmp_path, data)
    env = {**os.environ, "LOGS_DIRECTORY": str(tmp_path / "var-log")}
    import subprocess
    import sys

    from tests.unit.test_cli import ROOT

    for command in ("check-config", "run"):
        proc = subprocess.run([sys.executable, "-m", "agent", command, "--config", str(path)],
                              capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
        assert proc.returncode == 78, (command, proc.stderr)
        if verb == "chmod":
            want = "0750" if "log" in where else "0711"
            assert f"is open to others (mode {int(arg, 8):04o}, at most {want}): run " \
                   f"`chmod {want} {directory}`" in proc.stderr
        else:
            assert f"{directory} is owned by uid {NOBODY}, not the agent's user (uid 0): run " \
                   f"`chown -R 0 {directory}`" in proc.stderr
        assert "Traceback" not in proc.stderr
    check = subprocess.run([sys.executable, "-m", "agent", "check-config", "--config",
                            str(path)], capture_output=True, text=True, cwd=ROOT, env=env)
    assert check.stderr.startswith(f"{path}:{_line(path, 'state_dir')}: state_dir: ")


def test_an_older_agents_0700_state_dir_is_opened_to_traverse(tmp_path: Path) -> None:
    """Stricter than needed is accepted, and widened to 0711 so user: handlers reach their
    work directory (systemd's StateDirectoryMode=0700 makes it so at every start)."""
    from agent.app import Agent
    from agent.config import load_config

    data = setup_files(tmp_path)
    (tmp_path / "state").mkdir(mode=0o700)
    path = write(tmp_path, data)
    assert cli("check-config", "--config", str(path)).returncode == 0
    Agent(load_config(path))._prepare_state_dir(tmp_path / "state" / "logs")
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o711


def test_the_journal_is_private(tmp_path: Path) -> None:
    from agent.journal import Journal

    async def main() -> None:
        journal = Journal(tmp_path / "journal.db", thing_name="t", endpoint="e")
        await journal.open()
        await journal.close()

    asyncio.run(main())
    for name in os.listdir(tmp_path):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
