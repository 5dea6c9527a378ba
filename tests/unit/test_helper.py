"""The privileged helper, run directly (as root, the local backend standing in for systemd):
a request from the agent's side may only run a configured handler with the document's
arguments; anything else is refused. The same checks run under a real systemd in
tests/systemd/test_privilege.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.backends.helper import HelperBackend
from agent.backends.local import LocalBackend
from agent.config import load_config
from agent.helper import Helper, listening_socket, receive, send
from agent.runner import HandlerProcess, RunRequest, RunResult

SECRET = "s3cr3t-t0ken-value"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the helper runs as root")


@pytest.fixture
def place() -> Iterator[Path]:
    """A directory any user may reach (the socket is tried as another uid too)."""
    directory = Path(tempfile.mkdtemp(prefix="helper-"))
    directory.chmod(0o755)
    yield directory
    subprocess.run(["rm", "-rf", str(directory)], check=False)


@pytest.fixture
def config_path(place: Path) -> Path:
    handlers = place / "handlers"
    handlers.mkdir(mode=0o755)
    echo = handlers / "echo.sh"
    echo.write_text("#!/bin/sh\nid -un\nprintf '%s\\n' \"$@\"\necho '{\"progress\": 50}' >&3\n"
                    "echo \"FOO=$FOO\" >&2\nexit ${EXIT_WITH:-0}\n")
    echo.chmod(0o755)
    sleeper = handlers / "sleep.sh"
    sleeper.write_text("#!/bin/sh\nexec sleep 30\n")
    sleeper.chmod(0o755)
    reboot = handlers / "reboot.sh"
    reboot.write_text(f"#!/bin/sh\ntouch {place}/rebooted\n")
    reboot.chmod(0o755)
    state = place / "state"
    (state / "jobs").mkdir(parents=True, mode=0o700)
    path = place / "config.yaml"
    path.write_text(yaml.safe_dump({
        "thing_name": "helper-thing",
        "mqtt": {"endpoint": "localhost", "cert": str(path), "key": str(path)},
        "state_dir": str(state), "execution": "local", "kill_grace": "1s",
        "reboot_command": [str(reboot)],
        "handlers": {"echo": {"command": [str(echo)], "environment": {"FOO": "bar"}},
                     "as-nobody": {"command": [str(echo)], "user": "nobody"},
                     "sleep": {"command": [str(sleeper)], "timeout": "30s"},
                     "secret": {"command": [str(handlers / "secret.sh")],
                                "environment": {"TOKEN": {"value": SECRET, "secret": True}}}}}))
    secret = handlers / "secret.sh"
    secret.write_text("#!/bin/sh\nprintf 'token=%s\\n' \"$TOKEN\"\necho \"$TOKEN\" >&2\n")
    secret.chmod(0o755)
    return path


def serve(config_path: Path, place: Path,
          scenario: Callable[[Path], Awaitable[Any]]) -> Any:
    """Run the helper on a socket in ``place`` while ``scenario(socket_path)`` runs."""
    sock_path = place / "helper.sock"

    async def main() -> Any:
        helper = Helper(load_config(config_path), agent_user="nobody", backend=LocalBackend())
        listener = listening_socket(sock_path)
        sock_path.chmod(0o666)
        server = asyncio.create_task(helper.serve(listener))
        try:
            return await scenario(sock_path)
        finally:
            server.cancel()
            listener.close()

    return asyncio.run(main())


def ask(sock_path: Path, message: dict[str, Any], fds: int = 4) -> Any:
    """One raw request (with ``fds`` fresh pipe ends, as the agent sends) and its reply."""
    pipes = [os.pipe() for _ in range(fds)]
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.connect(str(sock_path))
        send(sock, message, [w for _, w in pipes])
        reply, got = receive(sock)
    for r, w in pipes:
        os.close(r)
        os.close(w)
    for fd in got:
        os.close(fd)
    return reply


RUN = {"op": "run", "kind": "job", "job_id": "job-1", "execution_number": 1,
       "document": {"operation": "echo", "args": ["a b", "$(id)"]}, "step": 0, "phase": "run"}


@pytest.mark.parametrize("change, refusal", [
    ({"argv": ["/bin/sh", "-c", "id"]}, "argv not accepted"),
    ({"program": "/bin/sh"}, "program not accepted"),
    ({"user": "root"}, "user not accepted"),
    ({"environment": {"LD_PRELOAD": "/tmp/x.so"}}, "environment not accepted"),
    ({"work_dir": "/etc"}, "work_dir not accepted"),
    ({"document": {"operation": "not-configured"}}, "no handler for operation"),
    ({"document": {"operation": "echo"}, "step": 1}, "has 1 step(s), not 2"),
    ({"job_id": "../../etc"}, "job_id must match"),
    ({"document": {"version": "1.0", "steps": [{"action": {
        "name": "x", "type": "runCommand", "input": {"command": "/bin/sh,-c,id"}}}]}},
     "refused: "),
])
def test_a_request_for_anything_but_a_configured_handler_is_refused(
        config_path: Path, place: Path, change: dict[str, Any], refusal: str) -> None:
    async def scenario(sock_path: Path) -> Any:
        return await asyncio.to_thread(ask, sock_path, {**RUN, **change})

    reply = serve(config_path, place, scenario)
    assert "error" in reply and reply["error"].startswith("refused: "), reply
    assert refusal in reply["error"], reply


@pytest.mark.parametrize("message", [
    {"op": "signal", "signal": "KILL", "pid": 1},
    {"op": "signal", "signal": "KILL"},
    {"op": "kill", "pid": 1, "signal": 9},
    {"op": "reboot", "command": ["/bin/sh"]},
])
def test_signalling_an_arbitrary_process_is_refused(config_path: Path, place: Path,
                                                    message: dict[str, Any]) -> None:
    victim = subprocess.Popen(["sleep", "30"])
    try:
        async def scenario(sock_path: Path) -> Any:
            return await asyncio.to_thread(ask, sock_path, message, 0)

        reply = serve(config_path, place, scenario)
        assert reply["error"].startswith("refused: unknown request"), reply
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_a_signal_reaches_only_the_run_on_its_connection(config_path: Path,
                                                         place: Path) -> None:
    victim = subprocess.Popen(["sleep", "30"])
    try:
        async def scenario(sock_path: Path) -> Any:
            def talk() -> list[Any]:
                (place / "state" / "jobs" / "job-1.1").mkdir()  # the agent prepares it
                pipes = [os.pipe() for _ in range(4)]
                with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
                    sock.connect(str(sock_path))
                    send(sock, {**RUN, "document": {"operation": "sleep"}},
                         [w for _, w in pipes])
                    for _, w in pipes:
                        os.close(w)
                    started, _ = receive(sock)
                    send(sock, {"op": "signal", "signal": "KILL", "pid": victim.pid})
                    refused, _ = receive(sock)
                    send(sock, {"op": "signal", "signal": "KILL"})
                    exited, _ = receive(sock)
                for r, _ in pipes:
                    os.close(r)
                return [started, refused, exited]

            return await asyncio.to_thread(talk)

        started, refused, exited = serve(config_path, place, scenario)
        assert started["event"] == "started"
        assert refused["error"].startswith("refused: only"), refused
        assert exited == {"event": "exited", "code": -9, "reason": None}
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_a_peer_that_is_not_the_agents_user_is_refused(config_path: Path,
                                                       place: Path) -> None:
    """The helper allows root and the agent's user (here nobody); uid 1 (daemon) is neither."""
    client = textwrap.dedent(f"""
        import json, os, socket, sys
        sys.path.insert(0, {str(Path(__file__).parents[2])!r})
        from agent.helper import receive, send
        os.setgid(1); os.setuid(1)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect({str(place / "helper.sock")!r})
        r, w = os.pipe()
        send(s, {json.dumps(RUN)}, [r, w, w, w])
        print(json.dumps(receive(s)[0]))
    """)

    async def scenario(sock_path: Path) -> Any:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", client, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        return json.loads(out)

    reply = serve(config_path, place, scenario)
    assert reply["error"] == "refused: uid 1 is neither root nor the agent's user"


def request(config_path: Path, operation: str, **kwargs: Any) -> RunRequest:
    state = load_config(config_path).state_dir
    return RunRequest(job_id="job-1", execution_number=1, thing_name="helper-thing",
                      argv=["(the helper decides)"], document={"operation": operation,
                                                               "args": ["a b", "$(id)"]},
                      work_dir=Path(state) / "jobs" / "job-1.1",
                      log_path=Path(state) / "logs" / "job-1.1.log", **kwargs)


def test_the_runner_through_the_helper(config_path: Path, place: Path) -> None:
    """Output, stderr, progress, exit code: as from a local child (the helper's environment,
    not the agent's: FOO comes from the helper's config)."""
    progress: list[dict[str, str]] = []

    async def scenario(sock_path: Path) -> RunResult:
        process = HandlerProcess(request(config_path, "echo"), progress.append,
                                 backend=HelperBackend(sock_path))
        return await process.wait()

    result = serve(config_path, place, scenario)
    assert (result.outcome, result.exit_code) == ("succeeded", 0), result
    assert result.output_head.splitlines()[:3] == ["root", "a b", "$(id)"]
    assert "FOO=bar" in result.stderr_tail
    assert progress == [{"progress": "50"}]


def test_secrets_are_redacted_from_what_the_helper_hands_over(config_path: Path,
                                                             place: Path) -> None:
    """The helper passes the handler's pipes to the agent: its output is redacted there as a
    local child's is (the agent knows the secrets from its own config)."""
    config = load_config(config_path)
    environment = dict(config.handlers["secret"].environment)

    async def scenario(sock_path: Path) -> RunResult:
        process = HandlerProcess(request(config_path, "secret", environment=environment),
                                 backend=HelperBackend(sock_path))
        return await process.wait()

    result = serve(config_path, place, scenario)
    assert result.outcome == "succeeded", result
    assert result.output_head.splitlines()[0] == "token=***"
    assert SECRET not in result.output_head + result.output_tail + result.stderr_tail
    assert "***" in result.stderr_tail
    log = Path(config.state_dir) / "logs" / "job-1.1.log"
    assert SECRET not in log.read_text()


def test_a_user_handler_through_the_helper_and_its_timeout(config_path: Path,
                                                           place: Path) -> None:
    async def scenario(sock_path: Path) -> tuple[RunResult, RunResult]:
        backend = HelperBackend(sock_path)
        as_nobody = await HandlerProcess(request(config_path, "as-nobody"),
                                         backend=backend).wait()
        slow = await HandlerProcess(request(config_path, "sleep", timeout=0.5, kill_grace=1.0),
                                    backend=backend).wait()
        return as_nobody, slow

    as_nobody, slow = serve(config_path, place, scenario)
    assert as_nobody.outcome == "succeeded" and as_nobody.output_head.startswith("nobody\n")
    assert (slow.outcome, slow.signal) == ("timed_out", 15), slow


def test_the_helper_refusal_reaches_the_runner_as_not_started(config_path: Path,
                                                              place: Path) -> None:
    async def scenario(sock_path: Path) -> RunResult:
        return await HandlerProcess(request(config_path, "not-configured"),
                                    backend=HelperBackend(sock_path)).wait()

    result = serve(config_path, place, scenario)
    assert result.outcome == "not_started"
    assert "refused: no handler for operation" in result.reason


def test_a_reboot_runs_the_configured_command_only(config_path: Path, place: Path) -> None:
    async def scenario(sock_path: Path) -> str | None:
        return await HelperBackend(sock_path).reboot()

    assert serve(config_path, place, scenario) is None
    assert (place / "rebooted").exists()
