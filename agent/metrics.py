"""Metrics for Prometheus' node exporter, in its textfile collector's format (pure rendering).

With ``metrics_file: /var/lib/prometheus/node-exporter/iot-jobs-agent.prom`` the agent rewrites
that file atomically whenever a figure changes (:mod:`agent.monitor`); node exporter serves it
with the host's own metrics. Names follow Prometheus' conventions: the ``iot_jobs_agent_``
prefix, base units (seconds), ``_total`` for counters, ``_timestamp_seconds`` for points in
time, a HELP and a TYPE line for each family, and every known label value present from the
start (a counter that appears only at its first increment hides the first event from
``rate()``). Counters count since the agent started; Prometheus handles their reset at a
restart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["OUTCOMES", "Figures", "outcome_of", "render"]

OUTCOMES = ("succeeded", "failed", "timed_out", "rejected", "canceled", "interrupted")
"""How an execution this agent held ended, as ``iot_jobs_agent_jobs_total{outcome=...}``."""


def outcome_of(status: str, details: Mapping[str, str]) -> str:
    """The outcome label of an execution that ended with ``status`` and ``details``.

    ``timed_out`` and ``interrupted`` are FAILED statuses told apart by their details
    (``outcome`` from the runner, the dispatcher's ``interrupted:`` and crash-loop reasons);
    ``canceled`` is an execution the cloud ended while the agent held it (canceled, deleted or
    timed out there), for which the agent reports nothing.
    """
    reason = details.get("reason", "")
    if status == "SUCCEEDED":
        return "succeeded"
    if status == "REJECTED":
        return "rejected"
    if status == "CANCELED":
        return "canceled"
    if reason.startswith(("interrupted", "crash loop")):
        return "interrupted"
    if details.get("outcome") == "timed_out":
        return "timed_out"
    return "failed"


@dataclass
class Figures:
    """Everything the metrics file shows; :class:`agent.monitor.Monitor` keeps it current."""

    version: str
    thing_name: str
    start_time: float
    connected: bool = False
    reconnects: int = 0
    running_jobs: int = 0
    refusing: bool = False
    outbox: int = 0
    last_sync: float | None = None
    jobs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(figures: Figures) -> str:
    """The whole file, in node exporter's textfile format (Prometheus text format 0.0.4)."""
    out: list[str] = []

    def family(name: str, kind: str, help_text: str,
               samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP iot_jobs_agent_{name} {help_text}")
        out.append(f"# TYPE iot_jobs_agent_{name} {kind}")
        for labels, value in samples:
            number = repr(float(value)) if isinstance(value, float) else str(value)
            out.append(f"iot_jobs_agent_{name}{labels} {number}")

    family("info", "gauge", "The agent's version and thing name; always 1.", [
        (f'{{version="{_label(figures.version)}",thing_name="{_label(figures.thing_name)}"}}',
         1)])
    family("start_time_seconds", "gauge", "When the agent started, in seconds since the epoch.",
           [("", round(figures.start_time, 3))])
    family("connected", "gauge", "1 while the MQTT connection to AWS IoT is up, else 0.",
           [("", int(figures.connected))])
    family("reconnects_total", "counter",
           "Connections made again after losing one, since the agent started.",
           [("", figures.reconnects)])
    family("jobs_total", "counter",
           "Job executions this agent ended since it started, by outcome.",
           [(f'{{outcome="{_label(outcome)}"}}', count)
            for outcome, count in sorted(figures.jobs.items())])
    family("running_jobs", "gauge", "Job handlers running now.", [("", figures.running_jobs)])
    family("refusing_jobs", "gauge",
           "1 while new jobs are left QUEUED because the journal cannot be written, else 0.",
           [("", int(figures.refusing))])
    family("outbox_updates", "gauge",
           "Status updates committed to the journal and not yet accepted by the cloud.",
           [("", figures.outbox)])
    family("last_sync_timestamp_seconds", "gauge",
           "When the pending job list was last fetched from the cloud, in seconds since the "
           "epoch; 0 if never.",
           [("", round(figures.last_sync or 0.0, 3))])
    return "\n".join(out) + "\n"
