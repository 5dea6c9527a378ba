"""The sandbox one bench run uses: one Stack (PKI, Mosquitto, emulator), things, agents, a feeder.

Every section gets its own thing (a fresh certificate and pending list) on the *same* broker and
emulator, so that baselines and the agent are measured against the very same service in the same
run, and a section never inherits another's queue.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent.sandbox.service import JobsService, Publish
from agent.sandbox.stack import Stack
from bench.common import PYTHON, Child, NotifySocket

__all__ = ["AGENT_SETTINGS", "Batch", "World"]

AGENT_SETTINGS: dict[str, Any] = {
    # As shipped (journal on, synchronous=FULL, max_concurrent_jobs 1, poll_interval 5m, ...),
    # except what would throttle or flood the benchmark itself:
    "log_level": "info",  # the default: one line per claim/finish
    "shutdown_grace": "5s",
    "progress_interval": "10s",  # the default; no-op handlers report no progress anyway
}
"""Settings every bench agent gets on top of the thing's ``Stack.thing`` config."""

_JOBS = "arn:aws:iot:*:*:%s/$aws/things/${iot:Connection.Thing.ThingName}/jobs/*"
_COMMANDS = ("arn:aws:iot:*:*:%s/$aws/commands/things/${iot:Connection.Thing.ThingName}/"
             "executions/*")
JOBS_ANYWHERE = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "iot:Connect", "Resource": "arn:aws:iot:*:*:client/*"},
    {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
     "Resource": [_JOBS % "topic", _COMMANDS % "topic"]},
    {"Effect": "Allow", "Action": "iot:Subscribe",
     "Resource": [_JOBS % "topicfilter", _COMMANDS % "topicfilter"]}]})

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "TIMED_OUT", "REJECTED", "REMOVED", "CANCELED"})


@dataclass
class Batch:
    """What :meth:`World.run_jobs` saw: how long N jobs took end to end, and how they ended."""

    count: int
    seconds: float
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def per_second(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else float("nan")


class World:
    """Start with :meth:`start`, stop with :meth:`stop`; ``dir`` holds everything of the run."""

    def __init__(self, directory: Path, *, iot_core_limits: bool = False) -> None:
        self.dir = directory
        self.iot_core_limits = iot_core_limits
        self.stack = Stack(directory / "stack")
        self._children: list[Child] = []
        self._serial = 0
        self.exit_codes: dict[str, list[int]] = {}

    def start(self) -> World:
        self.stack.start()
        return self

    def stop(self) -> None:
        for child in self._children:
            child.stop(10)
        self.stack.stop()

    @property
    def emulator(self) -> Any:
        assert self.stack.emulator is not None
        return self.stack.emulator

    @property
    def broker_log(self) -> Path:
        assert self.stack.broker is not None
        return self.stack.broker.log_path

    @property
    def broker_port(self) -> int:
        assert self.stack.broker is not None
        return self.stack.broker.port

    # ------------------------------------------------------------------ things and agents

    def handler(self, name: str, body: str, shebang: str = "#!/bin/sh") -> Path:
        """A handler script, installed as the agent's safety checks require (0755, dir 0755)."""
        directory = self.dir / "handlers"
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o755)
        path = directory / name
        path.write_text(f"{shebang}\n{body}")
        path.chmod(0o755)
        return path

    def thing_config(self, thing: str, handlers: dict[str, Any], *,
                     iot_core_limits: bool | None = None, port: int | None = None,
                     **settings: Any) -> Path:
        """Register ``thing`` and write its agent config (AGENT_SETTINGS + ``settings``).

        Its policy grants all of its ``jobs/*`` (and its Commands ``executions/*``) both ways
        (as many accounts do): the raw echo baseline publishes on and reads topics that are no
        Jobs request. ``port``: connect there
        instead of the broker (an emulated link in front of it).
        """
        config = yaml.safe_load(self.stack.thing(thing, policy=JOBS_ANYWHERE).read_text())
        if port is not None:
            config["mqtt"]["port"] = port
        state = self.dir / "agents" / thing
        config.update(AGENT_SETTINGS)
        config.update({"state_dir": str(state / "state"), "handlers": handlers}, **settings)
        limits = self.iot_core_limits if iot_core_limits is None else iot_core_limits
        config["mqtt"]["iot_core_limits"] = limits
        path = state / "agent.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def start_agent(self, config: Path, *, notify: NotifySocket | None = None,
                    profile: Path | None = None) -> Child:
        """``python -m agent run --config X`` (under cProfile when ``profile`` is given)."""
        argv = [PYTHON, "-m", "agent", "run", "--config", str(config)]
        if profile is not None:
            argv = [PYTHON, "-m", "cProfile", "-o", str(profile), *argv[1:]]
        child = Child.spawn("agent", argv, config.parent / "agent.log",
                            notify=notify.env if notify else None)
        self._children.append(child)
        return child

    def start_child(self, name: str, argv: list[str], log: Path, **kwargs: Any) -> Child:
        child = Child.spawn(name, argv, log, **kwargs)
        self._children.append(child)
        return child

    def forget(self, child: Child) -> None:
        """The caller stops ``child`` itself."""
        if child in self._children:
            self._children.remove(child)

    def retire(self, child: Child) -> int:
        """Stop ``child`` (SIGTERM) and record its exit status: a clean stop is part of the deal."""
        self.forget(child)
        code = child.stop()
        self.exit_codes.setdefault(child.name, []).append(code)
        return code

    def ready_agent(self, config: Path, timeout: float = 60.0, **kwargs: Any) -> Child:
        """Start an agent and return once it sent ``READY=1`` (connected, pending list synced)."""
        notify = NotifySocket("ready")
        try:
            agent = self.start_agent(config, notify=notify, **kwargs)
            notify.wait_for("READY=1", timeout, agent)
        finally:
            notify.close()
        return agent

    # ------------------------------------------------------------------ jobs

    def run_jobs(self, thing: str, count: int, document: dict[str, Any], *,
                 window: int = 20, watch: Child | None = None, timeout: float = 600.0) -> Batch:
        """Queue ``count`` jobs for ``thing``, at most ``window`` pending at a time; time them.

        The clock starts before the first job is queued and stops when the last one is seen
        terminal (checked every 10 ms). Finished jobs are deleted from the emulator as we go, so
        its per-thing scans stay as short for job 5,000 as for job 1 and neither the agent nor a
        baseline is slowed by the service's history. One refill may queue several jobs; it sends
        the newest ``notify`` and the newest ``notify-next`` they caused (each supersedes the
        previous one on its topic), not one of each per job.
        """
        self._serial += 1
        prefix = f"b{self._serial}-"
        outstanding: list[str] = []
        statuses: dict[str, int] = {}
        issued = finished = 0

        def refill(service: JobsService) -> list[Publish]:
            nonlocal issued, finished
            while outstanding:  # executions run in queue order: stop at the first open one
                status = service.execution(outstanding[0], thing)["status"]
                if status not in TERMINAL:
                    break
                statuses[status] = statuses.get(status, 0) + 1
                service.delete_job(outstanding.pop(0))
                finished += 1
            newest: dict[str, Publish] = {}  # per topic: a newer notify supersedes an older
            while issued < count and len(outstanding) < window:
                job_id = f"{prefix}{issued}"
                for publish in service.create_job(job_id, [thing], document):
                    newest[publish.topic] = publish
                outstanding.append(job_id)
                issued += 1
            return list(newest.values())

        call: Callable[[Callable[[JobsService], list[Publish]]], Any] = self.emulator.call
        started = time.monotonic()
        deadline = started + timeout
        while True:
            call(refill)
            if finished >= count:
                return Batch(count, time.monotonic() - started, statuses)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{finished}/{count} jobs finished on {thing} within "
                                   f"{timeout:g}s" + (f":\n{watch.tail()}" if watch else ""))
            if watch is not None:
                watch.alive()
            time.sleep(0.01)

    def requests_of(self, thing: str) -> dict[str, int]:
        """Device requests ``thing`` made so far, by operation (from the emulator's history)."""
        history = self.emulator.call(lambda s: [h[1] for h in s.history if h[0] == thing])
        counts: dict[str, int] = {}
        for operation in history:
            counts[operation] = counts.get(operation, 0) + 1
        return counts
