"""Section 3: jobs per second end to end, the agent against the awsiotsdk-sample loop.

Both consumers run a no-op handler (``/bin/true``) for jobs queued by the same feeder
(:meth:`bench.world.World.run_jobs`) on the same broker and emulator, in alternating rounds so
that a neighbour's load spike hits both. A job counts when the service has accepted its
``SUCCEEDED``. Side figures say what each job costs: device requests (from the emulator's
history), CPU time of the consumer process, and the journal's commits, each an fsync
(``synchronous=FULL``), timed on the same filesystem.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path
from typing import Any

from bench.common import PYTHON, Child, cpu_seconds, ratio
from bench.world import World

__all__ = ["JOURNAL_COMMITS_PER_JOB", "commit_cost", "run"]

NOOP = {"noop": {"command": ["/bin/true"], "timeout": "1m"}}
DOCUMENT = {"operation": "noop"}
JOURNAL_COMMITS_PER_JOB = 5
"""claiming, started (+ the claimed version; issue 12 merged them), pid, finish (+ outbox),
delivered: see agent/dispatcher.py and tests/unit/test_dispatcher.py::test_commits_per_job."""


def commit_cost(directory: Path, commits: int = 300) -> float:
    """Milliseconds per SQLite commit with the journal's settings (WAL, synchronous=FULL)."""
    path = directory / "commit-probe.db"
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)")
        db.execute("INSERT INTO t VALUES (1, '')")
        start = time.perf_counter()
        for index in range(commits):
            db.execute("BEGIN IMMEDIATE")
            db.execute("UPDATE t SET v=? WHERE k=1", (str(index),))
            db.execute("COMMIT")
        return (time.perf_counter() - start) / commits * 1e3
    finally:
        db.close()
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{path}{suffix}").unlink()


def start_sample(world: World, config: Path, timeout: float = 60.0) -> Child:
    """The sample loop as its own process; returns once its notify-next stream is up."""
    log = config.parent / "sample.log"
    child = world.start_child("sample loop", [PYTHON, "-m", "bench.sample_loop", "--config",
                                              str(config), "--command", "/bin/true"], log,
                              stdout_pipe=False)
    deadline = time.monotonic() + timeout
    while "ready" not in child.tail(5):
        child.alive()
        if time.monotonic() > deadline:
            raise TimeoutError(f"sample loop not ready:\n{child.tail()}")
        time.sleep(0.05)
    return child


class _Consumer:
    """One consumer (agent or sample) on its own thing, with its running totals."""

    def __init__(self, world: World, name: str, thing: str, child: Child) -> None:
        self.world, self.name, self.thing, self.child = world, name, thing, child
        self.jobs = 0
        self.unmeasured = 0
        self.seconds = 0.0
        self.cpu = 0.0
        self.statuses: dict[str, int] = {}

    def batch(self, count: int, *, measure: bool = True) -> None:
        cpu = cpu_seconds(self.child.pid)
        result = self.world.run_jobs(self.thing, count, DOCUMENT, watch=self.child)
        if not measure:
            self.unmeasured += result.count
        else:
            self.cpu += cpu_seconds(self.child.pid) - cpu
            self.jobs += result.count
            self.seconds += result.seconds
            for status, n in result.statuses.items():
                self.statuses[status] = self.statuses.get(status, 0) + n

    def report(self, requests_before: dict[str, int]) -> dict[str, Any]:
        after = self.world.requests_of(self.thing)
        # The warm-up jobs made requests too: divide by every job this thing ran.
        total_jobs = self.jobs + self.unmeasured
        made = {k: after.get(k, 0) - requests_before.get(k, 0) for k in after}
        return {
            "jobs": self.jobs,
            "seconds": round(self.seconds, 3),
            "jobs_per_s": round(self.jobs / self.seconds, 2) if self.seconds else None,
            "cpu_ms_per_job": round(self.cpu / self.jobs * 1e3, 3) if self.jobs else None,
            "requests_per_job": {k: round(v / total_jobs, 2) for k, v in sorted(made.items())},
            "statuses": self.statuses,
        }


def _pair(world: World, suffix: str, jobs: int, rounds: int, warmup: int,
          iot_core_limits: bool | None) -> dict[str, Any]:
    agent_thing, sample_thing = f"bench-tp-agent{suffix}", f"bench-tp-sample{suffix}"
    agent_cfg = world.thing_config(agent_thing, NOOP, iot_core_limits=iot_core_limits)
    sample_cfg = world.thing_config(sample_thing, NOOP, iot_core_limits=iot_core_limits)
    consumers = [_Consumer(world, "agent", agent_thing, world.ready_agent(agent_cfg)),
                 _Consumer(world, "sample", sample_thing, start_sample(world, sample_cfg))]
    before = {c.name: world.requests_of(c.thing) for c in consumers}
    per_round = max(1, jobs // rounds)
    for _ in range(rounds):
        for consumer in consumers:
            # Unmeasured jobs right before the measured ones: code paths warm, and with the
            # SDK's flow control on, the burst allowance saved up while idle is spent first.
            consumer.batch(warmup, measure=False)
            consumer.batch(per_round)
    out: dict[str, Any] = {c.name: c.report(before[c.name]) for c in consumers}
    for consumer in consumers:
        world.retire(consumer.child)
    out["ratio"] = ratio(out["agent"]["jobs_per_s"], out["sample"]["jobs_per_s"])
    return out


def run(world: World, jobs: int, rounds: int, shipped_jobs: int) -> dict[str, Any]:
    main = _pair(world, "", jobs, rounds, warmup=5, iot_core_limits=None)
    # 20 unmeasured jobs first: enough to spend the flow control's saved-up burst allowance.
    shipped = _pair(world, "-limits", shipped_jobs, 1, warmup=20, iot_core_limits=True)
    commit_ms = commit_cost(world.dir)
    agent = main["agent"]
    per_job_ms = 1e3 / agent["jobs_per_s"] if agent["jobs_per_s"] else None
    return {
        **main,
        "target": 0.8,
        "journal_commit_ms": round(commit_ms, 3),
        "journal_commits_per_job": JOURNAL_COMMITS_PER_JOB,
        "journal_share_of_agent_job": round(JOURNAL_COMMITS_PER_JOB * commit_ms / per_job_ms, 3)
        if per_job_ms else None,
        "iot_core_limits_on": shipped,
    }
