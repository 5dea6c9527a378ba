"""Section 6: does the agent stay flat over thousands of jobs?

One agent runs ``first`` no-op jobs, then on to ``total``; after each stage (and a short pause
for its post-job housekeeping) we read its RSS and the state directory: journal.db and its WAL,
the rows the journal holds, and the per-job log files and work directories on disk. The agent
runs with a small ``max_records`` so that retention, not the run's length, must bound the
journal; everything else is as shipped.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path
from typing import Any

from bench.common import rss_bytes
from bench.throughput import DOCUMENT, NOOP
from bench.world import World

__all__ = ["run"]

THING = "bench-flat"


def _state(state_dir: Path) -> dict[str, Any]:
    """The journal's size and rows and the job files on disk, read without disturbing it."""
    journal = state_dir / "journal.db"
    sizes = {suffix or "db": (Path(f"{journal}{suffix}").stat().st_size
                              if Path(f"{journal}{suffix}").exists() else 0)
             for suffix in ("", "-wal")}
    rows: dict[str, int] = {}
    with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True,
                                            timeout=10)) as db:
        for state, count in db.execute("SELECT state, COUNT(*) FROM executions GROUP BY state"):
            rows[state] = count
        rows["outbox"] = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    logs = state_dir / "logs"
    jobs = state_dir / "jobs"
    return {
        "journal_db_kb": round(sizes["db"] / 1024, 1),
        "journal_wal_kb": round(sizes["-wal"] / 1024, 1),
        "journal_rows": rows,
        "executions": sum(v for k, v in rows.items() if k != "outbox"),
        "log_files": len(list(logs.iterdir())) if logs.exists() else 0,
        "work_dirs": len(list(jobs.iterdir())) if jobs.exists() else 0,
    }


def run(world: World, first: int, total: int, max_records: int) -> dict[str, Any]:
    config = world.thing_config(THING, NOOP, max_records=max_records)
    state_dir = config.parent / "state"
    agent = world.ready_agent(config)
    stages = []
    done = 0
    for target in (first, total):
        batch = world.run_jobs(THING, target - done, DOCUMENT, watch=agent)
        done = target
        time.sleep(1.0)
        stages.append({"jobs": done, "rss_mb": round(rss_bytes(agent.pid) / 2**20, 2),
                       "jobs_per_s": round(batch.per_second, 1), **_state(state_dir)})
    world.retire(agent)
    growth = stages[1]["rss_mb"] - stages[0]["rss_mb"]
    return {
        "stages": stages,
        "rss_growth_mb": round(growth, 2),
        "rss_growth_target_mb": 5.0,
        "max_records": max_records,
        "journal_bounded": stages[1]["executions"] <= max_records + max(1, max_records // 10),
    }
