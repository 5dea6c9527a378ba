"""The text the inspection commands print, from the dicts their --json prints (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from agent.views import (
    format_age,
    format_bytes,
    format_duration,
    format_time,
    render_jobs,
    render_status,
    table,
)

NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z


@pytest.mark.parametrize(("seconds", "text"), [
    (None, "-"), (-3, "0s"), (0, "0s"), (59.9, "59s"), (60, "1m"), (61, "1m 1s"),
    (3600, "1h"), (3 * 3600 + 125, "3h 2m"), (86400 * 2 + 3600 * 5 + 7, "2d 5h"),
])
def test_format_age(seconds: float | None, text: str) -> None:
    assert format_age(seconds) == text


@pytest.mark.parametrize(("seconds", "text"), [
    (None, "-"), (0.0123, "0.01s"), (1.04, "1.0s"), (59.94, "59.9s"), (125, "2m 5s"),
])
def test_format_duration(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text


def test_format_time_and_bytes() -> None:
    assert format_time(NOW) == "2023-11-14T22:13:20Z"
    assert format_time(None) == format_time(True) == "-"
    assert [format_bytes(n) for n in (0, 1023, 1024, 70_000, 4 * 1024 * 1024, 3 << 30)] == [
        "0 B", "1023 B", "1.0 KiB", "68.4 KiB", "4.0 MiB", "3.0 GiB"]


def test_table_aligns_columns_and_does_not_pad_the_last() -> None:
    assert table(["A", "LONG HEADER", "Z"], [["xx", "1", "last"], ["y", "22", "-"]], "  ") == [
        "  A   LONG HEADER  Z",
        "  xx  1            last",
        "  y   22           -",
    ]


def running_report(**extra: Any) -> dict[str, Any]:
    return {
        "running": True, "why": "pid 10", "pid": 10, "phase": "running", "thing_name": "t1",
        "started_at": NOW - 3600, "connected": True, "endpoint": "iot.example:8883",
        "connected_since": NOW - 600, "disconnected_since": None, "last_error": None,
        "reconnects": 2, "last_sync": NOW - 5, "last_sync_error": None,
        "refusing_jobs": False, "refusing_reason": None,
        "running_jobs": [{"jobId": "update-42", "executionNumber": 3, "handler": "download",
                          "pid": 4321, "state": "running", "runningSeconds": 75.2,
                          "step": "verify checksum"}],
        "owed_statuses": {"count": 0}, "last_reload": None,
        "journal": {"path": "/var/lib/iot-jobs-agent/journal.db", "bytes": 69632,
                    "wal_bytes": 4 << 20},
        **extra,
    }


def test_render_status_running() -> None:
    assert render_status(running_report(), NOW) == [
        "iot-jobs-agent: running (pid 10) for 1h, thing t1",
        "  Connection:  connected to iot.example:8883 since 2023-11-14T22:03:20Z (10m ago); "
        "2 reconnects",
        "  Last sync:   2023-11-14T22:13:15Z (5s ago)",
        "  New jobs:    taken",
        "  Jobs:        1 running",
        "    JOB ID     EXEC  HANDLER   PID   STATE    FOR     STEP",
        "    update-42  3     download  4321  running  1m 15s  verify checksum",
        "  Owed:        nothing; every status was delivered",
        "  Journal:     /var/lib/iot-jobs-agent/journal.db, 68.0 KiB + 4.0 MiB WAL",
    ]


def test_render_status_disconnected_refusing_owing_after_a_refused_reload() -> None:
    report = running_report(
        connected=False, connected_since=None, disconnected_since=NOW - 90,
        last_error="cannot connect to iot.example:8883: AWS_IO_DNS_QUERY_FAILED", reconnects=0,
        refusing_jobs=True, refusing_reason="cannot write the journal: disk full",
        running_jobs=[], owed_statuses={"count": 2, "oldest": {
            "jobId": "a", "executionNumber": 1, "status": "SUCCEEDED", "since": NOW - 120}},
        last_reload={"generation": 1, "at": NOW - 30, "ok": False,
                     "message": "1 problem(s), the first: x.yaml:3: mqtt.prot: unknown"})
    lines = render_status(report, NOW)
    assert lines[1] == ("  Connection:  disconnected from iot.example:8883 since "
                        "2023-11-14T22:11:50Z (1m 30s ago); last error: cannot connect to "
                        "iot.example:8883: AWS_IO_DNS_QUERY_FAILED")
    assert "  New jobs:    refused: cannot write the journal: disk full" in lines
    assert "  Jobs:        none running" in lines
    assert ("  Owed:        2 status updates to the cloud, oldest 2023-11-14T22:11:20Z "
            "(2m ago): a #1 SUCCEEDED") in lines
    assert ("  Last reload: 2023-11-14T22:12:50Z (30s ago): REFUSED, 1 problem(s), the first: "
            "x.yaml:3: mqtt.prot: unknown") in lines


def test_render_status_not_running_shows_what_the_next_start_settles() -> None:
    report = {
        "running": False, "why": "the agent died: pid 10 is gone", "thing_name": "t1",
        "last_sync": NOW - 60, "owed_statuses": {"count": 0},
        "open_executions": [
            {"jobId": "j", "executionNumber": 1, "handler": "h", "state": "running",
             "startedAt": NOW - 70, "pid": 55, "handlerAlive": True},
            {"jobId": "k", "executionNumber": 2, "handler": "h", "state": "finished",
             "startedAt": NOW - 80}],
        "journal": {"path": "/j.db", "bytes": 100, "wal_bytes": 0},
    }
    assert render_status(report, NOW) == [
        "iot-jobs-agent: not running (the agent died: pid 10 is gone), thing t1",
        "  Last sync:   2023-11-14T22:12:20Z (1m ago)",
        "  Unfinished:  2 executions, settled at the agent's next start",
        "    JOB ID  EXEC  HANDLER  STATE     SINCE                 HANDLER PID",
        "    j       1     h        running   2023-11-14T22:12:10Z  55 (still running)",
        "    k       2     h        finished  2023-11-14T22:12:00Z  -",
        "  Owed:        nothing; every status was delivered",
        "  Journal:     /j.db, 100 B",
    ]
    never = {"running": False, "why": "no state file", "thing_name": "t1", "journal": None}
    assert render_status(never, NOW)[1:] == ["  Last sync:   never", "  Journal:     none yet"]


def test_render_jobs() -> None:
    items = [
        {"jobId": "run", "executionNumber": 1, "handler": "h", "state": "running",
         "status": "IN_PROGRESS", "startedAt": int(NOW - 12), "statusOwed": False},
        {"jobId": "bad", "executionNumber": 2, "handler": "h", "state": "finished",
         "status": "FAILED", "startedAt": int(NOW - 100), "finishedAt": int(NOW - 99),
         "durationSeconds": 0.5, "reason": "exit code 3 " + "x" * 60, "statusOwed": True,
         "logPath": "/l/bad.2.log"},
        {"jobId": "gone", "executionNumber": 1, "handler": "h", "state": "done",
         "startedAt": int(NOW - 200), "finishedAt": int(NOW - 150), "statusOwed": False},
    ]
    lines = render_jobs(items, NOW)
    assert lines[0].split() == ["JOB", "ID", "EXEC", "HANDLER", "STATUS", "STARTED", "FINISHED",
                                "DURATION", "REASON", "LOG"]
    assert lines[1].split()[:4] == ["run", "1", "h", "IN_PROGRESS"]
    assert "12.0s" in lines[1]  # still running: how long so far
    assert "FAILED (owed)" in lines[2] and lines[2].endswith("/l/bad.2.log")
    assert "exit code 3 xxx" in lines[2] and "x" * 60 not in lines[2]  # long reasons cut
    assert lines[3].split()[3] == "-"  # ended in the cloud: no status of ours
    assert render_jobs([], NOW) == ["no job executions in the journal"]
