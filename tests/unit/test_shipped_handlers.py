"""The handlers the package ships for the AWS managed templates, run directly with dash (POSIX
sh) and Device Client's argv, against a loopback HTTP server and the sandbox's stand-ins.

End to end through boto3, the emulator and the agent: tests/integration/test_templates.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from agent.config import SHIPPED_HANDLERS
from agent.sandbox.standins import StandIns, install_stand_ins
from tests.conftest import Web

DASH = shutil.which("dash")
pytestmark = pytest.mark.skipif(DASH is None, reason="dash is the POSIX sh these are written for")
UTILITIES = ("id", "dirname", "mkdir", "mktemp", "rm", "mv", "chmod", "wc", "tr", "tail", "sed",
             "cat", "grep", "od", "printf", "kill", "touch", "runuser")


@pytest.fixture
def stand_ins(tmp_path: Path) -> StandIns:
    return install_stand_ins(tmp_path / "stand-ins", packages=("wget", "jq"),
                             units=("nginx", "demo.service"))


def tools(tmp_path: Path, *extra: str) -> Path:
    """A directory with only the basic utilities (and ``extra``): a device without curl, wget,
    a package manager or systemctl."""
    directory = tmp_path / "tools"
    directory.mkdir(exist_ok=True)
    for name in (*UTILITIES, *extra):
        found = shutil.which(name)
        if found and not (directory / name).exists():
            (directory / name).symlink_to(found)
    return directory


def handler(name: str, *args: str, path: str, env: dict[str, str] | None = None,
            user: str = "") -> subprocess.CompletedProcess[str]:
    assert DASH is not None
    return subprocess.run([DASH, str(SHIPPED_HANDLERS / name), user, *args], capture_output=True,
                          text=True, timeout=30, env={"PATH": path, "LANG": "C.UTF-8",
                                                      **(env or {})})


@pytest.fixture
def server(web: Web) -> str:
    (web.root / "file.bin").write_bytes(b"payload\n" * 1000)
    return web.url


# ----------------------------------------------------------------------------- download-file.sh


@pytest.mark.parametrize("client", ["curl", "wget"])
def test_download_to_a_file_and_into_a_directory(tmp_path: Path, server: str,
                                                 client: str) -> None:
    if shutil.which(client) is None:
        pytest.skip(f"{client} is not installed")
    path = str(tools(tmp_path, client))
    target = tmp_path / "out" / "sub" / "fw.bin"
    proc = handler("download-file.sh", f"{server}/file.bin?X-Amz-Signature=secret", str(target),
                   path=path)
    assert proc.returncode == 0, proc.stderr
    assert target.read_bytes() == b"payload\n" * 1000
    assert "secret" not in proc.stdout + proc.stderr  # a presigned URL's query is never shown
    assert proc.stdout.strip() == f"downloaded {server}/file.bin to {target} (8000 bytes)"
    into = tmp_path / "out"
    assert handler("download-file.sh", f"{server}/file.bin", str(into), path=path).returncode == 0
    assert (into / "file.bin").read_bytes() == target.read_bytes()
    assert not [p for p in into.rglob(".download-file.*")]  # no temporary file left behind


@pytest.mark.parametrize("client", ["curl", "wget"])
def test_expired_presigned_url_says_so_and_leaves_the_old_file(tmp_path: Path, server: str,
                                                               client: str) -> None:
    if shutil.which(client) is None:
        pytest.skip(f"{client} is not installed")
    target = tmp_path / "fw.bin"
    target.write_text("old")
    proc = handler("download-file.sh", f"{server}/expired?X-Amz-Expires=60", str(target),
                   path=str(tools(tmp_path, client)))
    assert proc.returncode == 1
    assert "HTTP 403 Forbidden. A presigned URL has expired" in proc.stderr
    assert target.read_text() == "old" and list(tmp_path.glob(".download-file.*")) == []
    proc = handler("download-file.sh", f"{server}/missing", str(target),
                   path=str(tools(tmp_path, client)))
    assert proc.returncode == 1 and "HTTP 404" in proc.stderr


@pytest.mark.parametrize(("url", "reason"), [
    ("file:///etc/shadow", "only http:// and https:// URLs are downloaded"),
    ("ftp://h/f", "only http:// and https:// URLs are downloaded"),
    ("http://", "only http:// and https:// URLs are downloaded"),
    ("http://h/$(reboot)", "shell metacharacters"),
    ("http://h/a b", "shell metacharacters"),
    ("http://h/a`id`", "shell metacharacters"),
    ("http://h/a;reboot", "shell metacharacters"),
])
def test_download_refuses_other_schemes_and_metacharacters(tmp_path: Path, url: str,
                                                           reason: str) -> None:
    proc = handler("download-file.sh", url, str(tmp_path / "x"), path=str(tools(tmp_path,
                                                                                 "curl")))
    assert proc.returncode == 2 and reason in proc.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "tools"]  # touched nothing


def test_redirect_to_file_is_not_followed(tmp_path: Path, server: str) -> None:
    proc = handler("download-file.sh", f"{server}/go", str(tmp_path / "x"),
                   path=str(tools(tmp_path, "curl")))
    assert proc.returncode == 1 and not (tmp_path / "x").exists()


@pytest.mark.parametrize(("args", "reason"), [
    ((), "usage: download-file.sh RUN_AS_USER URL FILE_OR_DIRECTORY"),
    (("http://h/f",), "got 1 arguments"),
    (("http://h/f", "relative/path"), "must be absolute"),
    (("http://h/", "/tmp"), "cannot name the file from http://h/"),
])
def test_download_bad_arguments(tmp_path: Path, args: tuple[str, ...], reason: str) -> None:
    proc = handler("download-file.sh", *args, path=str(tools(tmp_path, "curl")))
    assert proc.returncode == 2 and reason in proc.stderr


def test_download_never_replaces_a_directory(tmp_path: Path, server: str) -> None:
    (tmp_path / "d" / "file.bin").mkdir(parents=True)
    proc = handler("download-file.sh", f"{server}/file.bin", str(tmp_path / "d"),
                   path=str(tools(tmp_path, "curl")))
    assert proc.returncode == 2 and "is a directory: not replacing it" in proc.stderr


def test_download_without_a_client(tmp_path: Path, server: str) -> None:
    proc = handler("download-file.sh", f"{server}/file.bin", str(tmp_path / "x"),
                   path=str(tools(tmp_path)))
    assert proc.returncode == 127 and "neither curl nor wget is installed" in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None,
                    reason="switching users needs root and runuser")
def test_run_as_user_writes_as_that_user(tmp_path: Path, server: str) -> None:
    tmp_path = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's own is private to root
    tmp_path.chmod(0o755)
    out = tmp_path / "public"
    out.mkdir()
    out.chmod(0o777)
    proc = handler("download-file.sh", f"{server}/file.bin", str(out / "f"), user="nobody",
                   path=str(tools(tmp_path, "curl")))
    assert proc.returncode == 0, proc.stderr
    assert (out / "f").stat().st_uid == int(subprocess.check_output(["id", "-u", "nobody"]))
    denied = handler("download-file.sh", f"{server}/file.bin", str(tmp_path / "f"),
                     user="nobody", path=str(tools(tmp_path, "curl")))
    assert denied.returncode == 1 and "cannot write in" in denied.stderr
    ghost = handler("download-file.sh", f"{server}/file.bin", str(out / "g"),
                    user="no-such-user-x", path=str(tools(tmp_path, "curl")))
    assert ghost.returncode == 2 and "runAsUser no-such-user-x: no such user" in ghost.stderr
    shutil.rmtree(tmp_path)


# ----------------------------------------------------------------------------- packages


def test_install_and_remove_split_the_list(tmp_path: Path, stand_ins: StandIns) -> None:
    path = f"{stand_ins.bin}:{tools(tmp_path)}"
    proc = handler("install-packages.sh", "wget jq", path=path)
    assert proc.returncode == 0, proc.stderr
    assert stand_ins.read("installed-packages") == ["wget", "jq"]
    assert stand_ins.read("log")[-1].startswith("apt-get install -y -q")
    assert stand_ins.read("log")[-1].endswith(" wget jq")
    proc = handler("remove-packages.sh", "jq", path=path)
    assert proc.returncode == 0 and stand_ins.read("installed-packages") == ["wget"]
    assert stand_ins.read("log")[-1] == "apt-get remove -y -q --purge jq"
    missing = handler("install-packages.sh", "no-such-thing", path=path)
    assert missing.returncode == 100 and "Unable to locate package no-such-thing" in \
        missing.stderr


@pytest.mark.parametrize(("packages", "reason"), [
    ("wget --allow-unauthenticated", "refusing package name '--allow-unauthenticated'"),
    ("-oAPT::x=1", "starts with '-'"),
    ("wget;reboot", "unexpected characters"),
    ("*", "unexpected characters"),
    ("", "no packages given"),
])
def test_package_names_are_checked_before_anything_runs(tmp_path: Path, stand_ins: StandIns,
                                                        packages: str, reason: str) -> None:
    proc = handler("install-packages.sh", packages, path=f"{stand_ins.bin}:{tools(tmp_path)}")
    assert proc.returncode == 2 and reason in proc.stderr
    assert stand_ins.read("log") == []


def test_no_package_manager(tmp_path: Path) -> None:
    proc = handler("install-packages.sh", "wget", path=str(tools(tmp_path)))
    assert proc.returncode == 127 and "no supported package manager here" in proc.stderr


# ----------------------------------------------------------------------------- services


def test_start_stop_restart(tmp_path: Path, stand_ins: StandIns) -> None:
    path = f"{stand_ins.bin}:{tools(tmp_path)}"
    proc = handler("start-services.sh", "nginx demo.service", path=path)
    assert proc.returncode == 0 and proc.stdout.split("\n")[:2] == ["started nginx",
                                                                    "started demo.service"]
    assert stand_ins.read("running") == ["nginx.service", "demo.service"]
    assert handler("stop-services.sh", "nginx", path=path).stdout == "stopped nginx\n"
    assert stand_ins.read("running") == ["demo.service"]
    assert handler("restart-services.sh", "nginx", path=path).returncode == 0
    failing = handler("start-services.sh", "nginx ghost", path=path)
    assert failing.returncode == 1 and "could not start: ghost" in failing.stderr


def test_the_agents_own_service(tmp_path: Path, stand_ins: StandIns) -> None:
    path = f"{stand_ins.bin}:{tools(tmp_path)}"
    env = {"IOT_JOBS_AGENT_SERVICE": "iot-jobs-agent.service"}
    restart = handler("restart-services.sh", "iot-jobs-agent nginx", path=path, env=env)
    assert restart.returncode == 195  # the agent restarts itself, after the others
    assert stand_ins.read("log") == ["systemctl restart nginx"]
    stop = handler("stop-services.sh", "nginx iot-jobs-agent.service", path=path, env=env)
    assert stop.returncode == 2 and "refusing to stop iot-jobs-agent.service" in stop.stderr
    assert stand_ins.read("log") == ["systemctl restart nginx"]  # nothing stopped
    start = handler("start-services.sh", "iot-jobs-agent", path=path, env=env)
    assert start.returncode == 0 and "runs already" in start.stdout


@pytest.mark.parametrize("services", ["--now", "nginx;reboot", "$(id)", ""])
def test_service_names_are_checked(tmp_path: Path, stand_ins: StandIns, services: str) -> None:
    proc = handler("start-services.sh", services, path=f"{stand_ins.bin}:{tools(tmp_path)}")
    assert proc.returncode == 2 and stand_ins.read("log") == []


def test_no_systemctl(tmp_path: Path) -> None:
    proc = handler("start-services.sh", "nginx", path=str(tools(tmp_path)))
    assert proc.returncode == 127 and "systemctl is not installed" in proc.stderr


# ----------------------------------------------------------------------------- reboot


def test_reboot_asks_the_agent(tmp_path: Path) -> None:
    proc = handler("reboot.sh", path=str(tools(tmp_path)), env={"JOB_ID": "j1"})
    assert proc.returncode == 194 and "reboot requested by job j1" in proc.stdout
    verify = handler("reboot.sh", path=str(tools(tmp_path)), env={"JOB_PHASE": "verify"})
    assert verify.returncode == 0


def test_every_template_handler_is_shipped_and_executable() -> None:
    for name in ("download-file.sh", "install-packages.sh", "remove-packages.sh",
                 "start-services.sh", "stop-services.sh", "restart-services.sh", "reboot.sh"):
        assert os.access(SHIPPED_HANDLERS / name, os.X_OK), name
