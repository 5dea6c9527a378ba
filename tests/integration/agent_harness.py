"""Run the real agent as a process against the sandbox stack, as systemd would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from agent.sandbox.stack import Stack

TERMINAL = {"SUCCEEDED", "FAILED", "TIMED_OUT", "REJECTED", "REMOVED", "CANCELED"}


def write_handler(directory: Path, name: str, body: str) -> Path:
    """A ``#!/bin/sh`` handler, installed the way the agent's safety checks require."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


class AgentProcess:
    """``iot-jobs-agent run`` for one thing of ``stack``; use as a context manager."""

    def __init__(self, stack: Stack, thing: str, directory: Path, handlers: dict[str, Any],
                 *, notify_socket: Path | None = None, **settings: Any) -> None:
        self.stack = stack
        self.thing = thing
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        config = yaml.safe_load(stack.thing(thing).read_text())
        config.update({"state_dir": str(directory / "state"), "poll_interval": "30s",
                       "progress_interval": "200ms", "shutdown_grace": "5s",
                       "kill_grace": "1s", "log_level": "debug", "handlers": handlers})
        config["mqtt"].update(reconnect_min="100ms", reconnect_max="1s", request_timeout="5s")
        config.update(settings)
        self.config_path = directory / "agent.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = directory / "agent.log"
        self.notify_socket = notify_socket
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def emulator(self) -> Any:
        return self.stack.emulator

    def start(self) -> AgentProcess:
        assert self.process is None or self.process.poll() is not None, "agent already running"
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET",
                                                                "JOURNAL_STREAM")}
        if self.notify_socket is not None:
            env["NOTIFY_SOCKET"] = str(self.notify_socket)
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(self.config_path)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        self.wait_log("ready thing=", timeout)

    def wait_log(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"agent exited {self.process.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not logged within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_status(self, job_id: str, statuses: set[str] | None = None,
                    timeout: float = 30.0) -> dict[str, Any]:
        """Poll the emulator until the execution reaches one of ``statuses`` (terminal)."""
        statuses = statuses or TERMINAL
        deadline = time.monotonic() + timeout
        execution: dict[str, Any] = {}
        while time.monotonic() < deadline:
            execution = self.emulator.execution(job_id, self.thing)
            if execution["status"] in statuses:
                return execution
            time.sleep(0.05)
        raise AssertionError(f"{job_id} still {execution.get('status')} after {timeout}s:\n"
                             f"{self.log()}")

    def stop(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)
        self._log.close()

    def updates(self) -> list[dict[str, Any]]:
        """Every update request this thing sent (the emulator's history; one thing per test)."""
        history = self.emulator.call(lambda s: list(s.history))
        return [entry[2] for entry in history if entry[0] == self.thing and entry[1] == "update"]

    def __enter__(self) -> AgentProcess:
        if self.process is None or self.process.poll() is not None:
            self.start()  # not twice: a second agent for the same thing would be an impostor
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if hasattr(self, "_log"):
            self._log.close()


class NotifySocket:
    """A real ``$NOTIFY_SOCKET``: a unix datagram socket collecting what the agent sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def collect_until(self, text: str, timeout: float = 30.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in m for m in self.messages):
                return self.messages
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
        raise AssertionError(f"{text!r} never sent; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


def live_group_members(pgid: int, timeout: float = 5.0) -> list[int]:
    """Non-zombie processes still in process group ``pgid``, after waiting up to ``timeout``.

    A killed grandchild is reparented to PID 1 and stays a zombie until PID 1 reaps it (this
    machine's init is slow at that); a zombie runs nothing, so it does not count as alive.
    """
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(int(stat.parent.name))
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)
