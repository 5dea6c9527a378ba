"""``python -m bench --quick`` works: it is how the benchmarks run in CI.

It checks the script, not the figures: a shared CI machine makes any threshold flaky, and the
figures are ratios whose meaning the README explains. What must hold is that every section ran
against the real agent, broker and emulator and reported its figure and its baseline.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("packets", "roundtrip", "latency", "link", "throughput", "idle", "startup",
            "flatness", "commands")

pytestmark = pytest.mark.broker


def test_quick_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert results["mode"] == "quick"
    assert results["errors"] == {}
    assert results["exit_codes"]["agent"] and not any(results["exit_codes"]["agent"])
    assert set(SECTIONS) <= set(results["sections"])
    sections = results["sections"]
    assert sections["roundtrip"]["jobs_client"]["n"] > 0
    assert sections["roundtrip"]["raw_echo"]["p50_ms"] > 0
    assert sections["latency"]["queue_to_handler"]["p50_ms"] > 0
    assert sections["latency"]["raw_device"]["n"] == results["sizes"]["latency_samples"]
    for consumer in ("agent", "sample"):  # every job ran; the broker counted its packets
        packets = sections["packets"][consumer]
        assert packets["statuses"] == {"SUCCEEDED": packets["jobs"]}
        assert packets["sent_per_job"]["PUBLISH"] >= 2 and packets["wire_bytes_up_per_job"] > 0
    raw = sections["packets"]["raw_device"]  # the minimum: claim and final update only
    assert raw["statuses"] == {"SUCCEEDED": raw["jobs"]} and raw["sent_per_job"]["PUBLISH"] == 2
    for link in sections["link"]["links"]:
        assert link["raw_echo"]["p50_ms"] >= link["rtt_ms"]  # the link really delays
        assert link["queue_to_handler"]["p50_ms"] > 0
        assert link["raw_device"]["p50_ms"] >= link["rtt_ms"]  # its claim crossed the link
    for consumer in ("agent", "sample"):
        assert sections["throughput"][consumer]["statuses"] == {
            "SUCCEEDED": sections["throughput"][consumer]["jobs"]}
    assert sections["idle"]["agent_rss_mb"] > 0 and sections["idle"]["bare_rss_mb"] > 0
    assert sections["startup"]["agent_p50_ms"] > 0 and sections["startup"]["bare_p50_ms"] > 0
    assert sections["startup"]["agent_ready_p50_ms"] >= sections["startup"]["agent_p50_ms"]
    assert [stage["jobs"] for stage in sections["flatness"]["stages"]] == [
        results["sizes"]["flat_first"], results["sizes"]["flat_total"]]
    commands = sections["commands"]
    assert commands["samples"] == results["sizes"]["command_samples"]
    for figure in ("command_to_handler", "floor_to_handler", "command_to_result",
                   "floor_to_result"):
        assert commands[figure]["p50_ms"] > 0
    assert len(results["table"]) >= len(SECTIONS)
    assert "| Figure |" in proc.stdout  # the table a user sees
