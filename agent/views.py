"""Text for people: the ``status`` and ``jobs`` commands' output, as pure functions.

Each function takes the same dicts the ``--json`` output prints (so text and JSON cannot
disagree) and the current time (so a test pins it). Times are UTC, ``2026-11-28T14:50:00Z``,
with a relative age where a person asks "how long ago"; nothing reads the local time zone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

__all__ = [
    "format_age",
    "format_bytes",
    "format_duration",
    "format_time",
    "render_jobs",
    "render_status",
    "table",
]


def format_time(epoch: object) -> str:
    if not isinstance(epoch, int | float) or isinstance(epoch, bool):
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def format_age(seconds: float | None) -> str:
    """``45s``, ``3m 12s``, ``2h 5m``, ``3d 4h``: two units at most, rounded down."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60),
                                      ("m", 60, "s", 1)):
        if s >= size:
            rest = (s % size) // sub_size
            return f"{s // size}{unit}" + (f" {rest}{sub}" if rest else "")
    return f"{s}s"


def format_duration(seconds: float | None) -> str:
    """A run time: ``0.04s`` and ``12.3s`` below a minute, then as :func:`format_age`."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds:.2f}s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    return format_age(seconds)


def format_bytes(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    """Left-aligned columns two spaces apart; the last column is not padded."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for row in [headers, *rows]:
        cells = [str(c).ljust(w) for c, w in zip(row[:-1], widths, strict=False)]
        lines.append((indent + "  ".join([*cells, str(row[-1])])).rstrip())
    return lines


def _since(epoch: object, now: float) -> str:
    if not isinstance(epoch, int | float) or isinstance(epoch, bool):
        return "-"
    return f"{format_time(epoch)} ({format_age(now - epoch)} ago)"


def _short(text: object, width: int) -> str:
    value = "-" if text in (None, "") else " ".join(str(text).split())
    return value if len(value) <= width else value[: width - 3] + "..."


def render_status(report: dict[str, Any], now: float) -> list[str]:
    """The ``status`` command's text, from the dict ``status --json`` prints."""
    thing = report.get("thing_name") or "-"
    lines = []
    if report["running"]:
        phase = report.get("phase") or "running"
        started = report.get("started_at")
        up = f" for {format_age(now - started)}" if isinstance(started, int | float) else ""
        lines.append(f"iot-jobs-agent: {phase} (pid {report['pid']}){up}, thing {thing}")
        if report.get("connected"):
            connection = (f"connected to {report.get('endpoint')} since "
                          f"{_since(report.get('connected_since'), now)}")
        else:
            connection = (f"disconnected from {report.get('endpoint')} since "
                          f"{_since(report.get('disconnected_since'), now)}")
            if report.get("last_error"):
                connection += f"; last error: {report['last_error']}"
        reconnects = report.get("reconnects") or 0
        if reconnects:
            connection += f"; {reconnects} reconnect{'s' * (reconnects != 1)}"
        lines.append(f"  Connection:  {connection}")
    else:
        lines.append(f"iot-jobs-agent: not running ({report['why']}), thing {thing}")
    sync = _since(report.get("last_sync"), now) if report.get("last_sync") else "never"
    if report.get("last_sync_error"):
        sync += f"; the last attempt failed: {report['last_sync_error']}"
    lines.append(f"  Last sync:   {sync}")
    if report["running"]:
        refusing = report.get("refusing_reason")
        lines.append(f"  New jobs:    {'refused: ' + refusing if refusing else 'taken'}")
        jobs = report.get("running_jobs") or []
        lines.append(f"  Jobs:        {len(jobs) or 'none'} running")
        if jobs:
            lines += table(["JOB ID", "EXEC", "HANDLER", "PID", "STATE", "FOR", "STEP"], [
                [j["jobId"], str(j["executionNumber"]), j.get("handler", "-"),
                 str(j.get("pid") or "-"), j.get("state", "-"),
                 format_age(j.get("runningSeconds")), _short(j.get("step"), 40)]
                for j in jobs], indent="    ")
    else:
        opened = report.get("open_executions") or []
        if opened:
            lines.append(f"  Unfinished:  {len(opened)} execution{'s' * (len(opened) != 1)}, "
                         "settled at the agent's next start")
            lines += table(["JOB ID", "EXEC", "HANDLER", "STATE", "SINCE", "HANDLER PID"], [
                [e["jobId"], str(e["executionNumber"]), e.get("handler", "-"), e["state"],
                 format_time(e.get("startedAt")),
                 _pid_note(e)] for e in opened], indent="    ")
    owed = report.get("owed_statuses") or {"count": 0}
    if report.get("journal") is None:
        lines.append("  Journal:     none yet")
        return lines
    if owed["count"]:
        oldest = owed.get("oldest") or {}
        lines.append(f"  Owed:        {owed['count']} status update"
                     f"{'s' * (owed['count'] != 1)} to the cloud, oldest "
                     f"{_since(oldest.get('since'), now)}: {oldest.get('jobId')} "
                     f"#{oldest.get('executionNumber')} {oldest.get('status')}")
    else:
        lines.append("  Owed:        nothing; every status was delivered")
    reload = report.get("last_reload")
    if reload:
        verdict = "" if reload.get("ok") else "REFUSED, "
        lines.append(f"  Last reload: {_since(reload.get('at'), now)}: {verdict}"
                     f"{reload.get('message')}")
    journal = report.get("journal")
    if journal:
        wal = f" + {format_bytes(journal['wal_bytes'])} WAL" if journal.get("wal_bytes") else ""
        lines.append(f"  Journal:     {journal['path']}, {format_bytes(journal['bytes'])}{wal}")
    return lines


def _pid_note(execution: dict[str, Any]) -> str:
    pid = execution.get("pid")
    if pid is None:
        return "-"
    return f"{pid} (still running)" if execution.get("handlerAlive") else f"{pid} (gone)"


def render_jobs(executions: Sequence[dict[str, Any]], now: float) -> list[str]:
    """The ``jobs`` table, from the dicts ``jobs --json`` prints."""
    if not executions:
        return ["no job executions in the journal"]
    rows = []
    for e in executions:
        status = e.get("status") or "-"
        if e.get("statusOwed"):
            status += " (owed)"
        duration = e.get("durationSeconds")
        if duration is None and e.get("state") in ("claiming", "running"):
            duration = now - e["startedAt"]
        rows.append([e["jobId"], str(e["executionNumber"]), e["handler"], status,
                     format_time(e.get("startedAt")), format_time(e.get("finishedAt")),
                     format_duration(duration), _short(e.get("reason"), 48),
                     e.get("logPath", "-")])
    return table(["JOB ID", "EXEC", "HANDLER", "STATUS", "STARTED", "FINISHED", "DURATION",
                  "REASON", "LOG"], rows)
