"""``--profile``: the agent's hot path under cProfile, once, for a batch of no-op jobs.

Not part of a normal run: cProfile slows the agent down, so its figures would be wrong. It
profiles the agent's main thread (the asyncio loop: dispatcher, runner, Jobs client); the
journal's SQLite thread and awscrt's own threads show up there only as time spent waiting.
CPU time of the whole process is reported beside it, so the share of the main thread is visible.
"""

from __future__ import annotations

import io
import pstats
from pathlib import Path
from typing import Any

from bench.common import cpu_seconds
from bench.throughput import DOCUMENT, NOOP
from bench.world import World

__all__ = ["run"]

THING = "bench-profile"


def _top(stats: pstats.Stats, key: str, limit: int) -> list[dict[str, Any]]:
    stats.sort_stats(key)
    out = []
    for func in stats.fcn_list[:limit]:  # type: ignore[attr-defined]
        calls, _, tottime, cumtime, _ = stats.stats[func]  # type: ignore[attr-defined]
        filename, line, name = func
        out.append({"function": f"{Path(filename).name}:{line}({name})", "calls": calls,
                    "tottime_s": round(tottime, 4), "cumtime_s": round(cumtime, 4)})
    return out


def run(world: World, jobs: int, output: Path) -> dict[str, Any]:
    config = world.thing_config(THING, NOOP)
    agent = world.ready_agent(config, profile=output)
    cpu = cpu_seconds(agent.pid)
    batch = world.run_jobs(THING, jobs, DOCUMENT, watch=agent)
    cpu = cpu_seconds(agent.pid) - cpu
    world.retire(agent)  # cProfile writes the file as the agent exits
    stats = pstats.Stats(str(output), stream=io.StringIO())
    return {
        "jobs": jobs,
        "jobs_per_s_under_cprofile": round(batch.per_second, 1),
        "process_cpu_ms_per_job": round(cpu / jobs * 1e3, 3),
        "pstats_file": str(output),
        "top_tottime": _top(stats, "tottime", 15),
        "top_cumtime": _top(stats, "cumulative", 25),
    }
