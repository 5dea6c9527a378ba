"""The agent's state and metrics files: their content, their format, and when they are written.

The monitor runs on a real loop with a real journal; the dispatcher it observes is a stand-in
holding real ``RunningJob`` objects.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.config import Config, HandlerConfig, MqttConfig
from agent.connection import ConnectionEvent
from agent.dispatcher import RunningJob
from agent.errors import ConnectionFailedError
from agent.journal import Journal
from agent.lifecycle import Work
from agent.metrics import OUTCOMES, Figures, outcome_of, render
from agent.monitor import Monitor
from agent.statefile import FIELDS, liveness, read_state

# --- metrics rendering --------------------------------------------------------------------

SAMPLE = re.compile(r'^(iot_jobs_agent_[a-z_]+)(\{([a-z_]+="(?:[^"\\\n]|\\.)*",?)+\})? '
                    r'(-?[0-9]+(\.[0-9]+)?(e[+-]?[0-9]+)?)$')


def parse(text: str) -> dict[str, float]:
    """Check node exporter's textfile format line by line; return sample -> value."""
    assert text.endswith("\n")
    samples: dict[str, float] = {}
    declared: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in declared, f"{name} declared twice"
            declared[name] = ""
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert name in declared and kind in ("gauge", "counter")
            assert name.endswith("_total") == (kind == "counter"), name
            declared[name] = kind
        else:
            match = SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            assert declared.get(match.group(1)), f"{match.group(1)} has no TYPE before it"
            key = line.rsplit(" ", 1)[0]
            assert key not in samples
            samples[key] = float(match.group(4))
    return samples


def test_render_follows_the_text_format_and_naming_conventions() -> None:
    figures = Figures(version="1.2.3", thing_name='we"ird\\thing\n', start_time=1700000000.25,
                      connected=True, reconnects=3, running_jobs=1, outbox=2,
                      last_sync=1700000100.5)
    figures.jobs["succeeded"] = 7
    samples = parse(render(figures))
    assert samples['iot_jobs_agent_info{version="1.2.3",thing_name="we\\"ird\\\\thing\\n"}'] == 1
    assert samples["iot_jobs_agent_connected"] == 1
    assert samples["iot_jobs_agent_reconnects_total"] == 3
    assert samples['iot_jobs_agent_jobs_total{outcome="succeeded"}'] == 7
    assert samples['iot_jobs_agent_jobs_total{outcome="timed_out"}'] == 0  # present from 0
    assert {k for k in samples if "jobs_total" in k} == {
        f'iot_jobs_agent_jobs_total{{outcome="{o}"}}' for o in OUTCOMES}
    assert samples["iot_jobs_agent_outbox_updates"] == 2
    assert samples["iot_jobs_agent_last_sync_timestamp_seconds"] == 1700000100.5
    assert samples["iot_jobs_agent_start_time_seconds"] == 1700000000.25
    never = parse(render(Figures(version="1", thing_name="t", start_time=0.0)))
    assert never["iot_jobs_agent_last_sync_timestamp_seconds"] == 0


@pytest.mark.parametrize(("status", "details", "outcome"), [
    ("SUCCEEDED", {"outcome": "succeeded"}, "succeeded"),
    ("FAILED", {"outcome": "failed", "reason": "exit code 3"}, "failed"),
    ("FAILED", {"outcome": "timed_out", "reason": "timed out after 1s"}, "timed_out"),
    ("FAILED", {"outcome": "canceled", "reason": "interrupted: the agent was stopped"},
     "interrupted"),
    ("FAILED", {"reason": "crash loop: the agent stopped 3 times"}, "interrupted"),
    ("FAILED", {"reason": "interrupted: this device has no record of running this job"},
     "interrupted"),
    ("REJECTED", {"reason": "no handler for operation 'x'"}, "rejected"),
    ("CANCELED", {"reason": "execution is CANCELED"}, "canceled"),
    ("FAILED", {"reason": "the device did not reboot"}, "failed"),
])
def test_outcome_of(status: str, details: dict[str, str], outcome: str) -> None:
    assert outcome_of(status, details) == outcome


# --- the monitor --------------------------------------------------------------------------


def config(tmp_path: Path, **settings: Any) -> Config:
    return Config(thing_name="t1", mqtt=MqttConfig(endpoint="iot.example", cert=Path("c"),
                                                   key=Path("k"), port=8883),
                  state_dir=tmp_path / "state", source=tmp_path / "agent.yaml", **settings)


@dataclass
class FakeProcess:
    pid: int | None
    running: bool = True


@dataclass
class FakeDispatcher:
    running: dict[tuple[str, int], RunningJob] = field(default_factory=dict)
    refusing: str | None = None
    last_sync: float | None = None
    last_sync_error: str | None = None


class CountingMonitor(Monitor):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writes: list[Path] = []

    def _write(self, path: Path, data: bytes, mode: int) -> None:
        self.writes.append(path)
        super()._write(path, data, mode)


async def opened_journal(cfg: Config) -> Journal:
    Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)
    journal = Journal(Path(cfg.state_dir) / "journal.db")
    await journal.open()
    return journal


def secret_job() -> RunningJob:
    handler = HandlerConfig(command=("/bin/true", "--token", "argv-s3cret"),
                            environment={"TOKEN": "env-s3cret"})
    work = Work("download", handler, ("doc-arg-s3cret",),
                {"operation": "download", "args": ["doc-arg-s3cret"], "key": "doc-s3cret"})
    job = RunningJob(("update-42", 3), work, reporter=None)  # type: ignore[arg-type]
    job.process = FakeProcess(pid=os.getpid())  # type: ignore[assignment]
    job.step = "verify checksum"
    return job


def test_state_file_content_fields_and_secrets(tmp_path: Path) -> None:
    cfg = config(tmp_path)

    async def body() -> dict[str, Any]:
        journal = await opened_journal(cfg)
        monitor = Monitor(cfg, journal, job_logs=tmp_path / "logs", version="9.9",
                          pid=os.getpid())
        dispatcher = FakeDispatcher(last_sync=1700000000.0, refusing="disk full")
        job = secret_job()
        dispatcher.running[job.key] = job
        monitor.attach(dispatcher)  # type: ignore[arg-type]
        monitor.on_connection(ConnectionEvent("connected"))
        await asyncio.sleep(0.05)
        await journal.close()
        return read_state(Path(cfg.state_dir) / "status.json") or {}

    data = asyncio.run(body())
    assert set(data) == FIELDS
    assert liveness(data).running  # our own pid, start time and boot id
    assert data["connection"]["connected"] is True
    assert data["endpoint"] == "iot.example:8883" and data["refusing"] == "disk full"
    assert data["job_logs"] == str(tmp_path / "logs") and data["last_sync"] == 1700000000.0
    [job] = data["running_jobs"]
    assert (job["jobId"], job["executionNumber"], job["handler"], job["pid"], job["step"],
            job["state"]) == ("update-42", 3, "download", os.getpid(), "verify checksum",
                              "running")
    assert "s3cret" not in json.dumps(data)
    mode = (Path(cfg.state_dir) / "status.json").stat().st_mode
    assert stat.S_IMODE(mode) == 0o640


def test_changes_are_coalesced_and_an_idle_monitor_writes_nothing(tmp_path: Path) -> None:
    cfg = config(tmp_path)

    async def body() -> list[Path]:
        journal = await opened_journal(cfg)
        monitor = CountingMonitor(cfg, journal, job_logs=tmp_path, version="1",
                                  pid=os.getpid(), min_interval=0.2)
        monitor.attach(FakeDispatcher())  # type: ignore[arg-type]
        for _ in range(100):
            monitor.changed()
        await asyncio.sleep(0.1)
        first = len(monitor.writes)
        for _ in range(100):  # a burst during the quiet period: one more write, after it
            monitor.changed()
        await asyncio.sleep(0.4)
        second = len(monitor.writes)
        await asyncio.sleep(0.5)  # idle: nothing is written on a timer
        assert len(monitor.writes) == second
        await journal.close()
        return [first, second]  # type: ignore[list-item]

    assert asyncio.run(body()) == [1, 2]


def test_connection_story_and_close(tmp_path: Path) -> None:
    metrics = tmp_path / "prom" / "agent.prom"
    metrics.parent.mkdir()
    cfg = config(tmp_path, metrics_file=metrics)
    clock = iter(range(1000, 2000)).__next__

    async def body() -> tuple[dict[str, Any], dict[str, Any], str, str]:
        journal = await opened_journal(cfg)
        await journal.claiming(("j", 1), "h", {}, 1, 5)
        await journal.finish(("j", 1), "FAILED", {"reason": "exit code 1"})  # owed
        monitor = Monitor(cfg, journal, job_logs=tmp_path, version="1", pid=os.getpid(),
                          clock=lambda: float(clock()), min_interval=0.0)
        monitor.attach(FakeDispatcher(last_sync=1500.0))  # type: ignore[arg-type]
        lost = ConnectionFailedError("connection to iot.example:8883 lost: socket closed")
        for event in (ConnectionEvent("connected"), ConnectionEvent("disconnected", error=lost),
                      ConnectionEvent("failed", error=ConnectionFailedError("refused")),
                      ConnectionEvent("connected")):
            monitor.on_connection(event)
        monitor.on_outcome(("j", 1), "FAILED", {"reason": "exit code 1"})
        await asyncio.sleep(0.05)
        live = read_state(Path(cfg.state_dir) / "status.json") or {}
        prom_live = metrics.read_text()
        await monitor.close()
        monitor.changed()  # after close: nothing more is written
        await journal.close()
        return live, read_state(Path(cfg.state_dir) / "status.json") or {}, prom_live, \
            metrics.read_text()

    live, final, prom_live, prom_final = asyncio.run(body())
    assert live["connection"]["connected"] and live["connection"]["reconnects"] == 1
    assert live["connection"]["last_error"] is None  # cleared by the reconnect
    assert live["phase"] == "starting"
    samples = parse(prom_live)
    assert samples["iot_jobs_agent_connected"] == 1
    assert samples["iot_jobs_agent_reconnects_total"] == 1
    assert samples['iot_jobs_agent_jobs_total{outcome="failed"}'] == 1
    assert samples["iot_jobs_agent_outbox_updates"] == 1  # from the journal
    assert samples["iot_jobs_agent_last_sync_timestamp_seconds"] == 1500
    assert stat.S_IMODE(metrics.stat().st_mode) == 0o644  # node exporter runs as its own user
    assert final["phase"] == "stopped" and final["stopped_at"] is not None
    assert not final["connection"]["connected"]
    assert not liveness(final).running and "stopped at" in liveness(final).why
    assert parse(prom_final)["iot_jobs_agent_connected"] == 0
    assert sorted(p.name for p in metrics.parent.iterdir()) == ["agent.prom"]


def test_a_disconnection_keeps_its_error_until_reconnected(tmp_path: Path) -> None:
    cfg = config(tmp_path)

    async def body() -> dict[str, Any]:
        journal = await opened_journal(cfg)
        monitor = Monitor(cfg, journal, job_logs=tmp_path, version="1", pid=os.getpid(),
                          clock=lambda: 1000.0, min_interval=0.0)
        monitor.on_connection(ConnectionEvent("connected"))
        monitor.on_connection(ConnectionEvent("disconnected",
                                              error=ConnectionFailedError("lost: EOF")))
        monitor.on_connection(ConnectionEvent("failed", error=ConnectionFailedError(
            "cannot connect to iot.example:8883: AWS_IO_SOCKET_CONNECTION_REFUSED")))
        await asyncio.sleep(0.05)
        await journal.close()
        return read_state(Path(cfg.state_dir) / "status.json") or {}

    connection = asyncio.run(body())["connection"]
    assert not connection["connected"]
    assert connection["last_error"].endswith("AWS_IO_SOCKET_CONNECTION_REFUSED")


def test_an_unwritable_state_dir_is_logged_once_and_harmless(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(tmp_path, metrics_file=tmp_path / "no-such-dir" / "m.prom")

    async def body() -> None:
        journal = await opened_journal(cfg)
        monitor = Monitor(cfg, journal, job_logs=tmp_path, version="1", pid=os.getpid(),
                          min_interval=0.0)
        for _ in range(3):
            monitor.changed()
            await asyncio.sleep(0.02)
        await journal.close()

    asyncio.run(body())
    warnings = [r for r in caplog.records if "cannot write" in r.getMessage()]
    assert len(warnings) == 1 and "m.prom" in warnings[0].getMessage()
    assert (Path(cfg.state_dir) / "status.json").exists()  # the other file is still written
