"""``python -m bench``: run every benchmark, print the table, write the JSON.

From the checkout::

    python -m bench                 # the full run (a few minutes; the README's figures)
    python -m bench --quick         # the CI smoke run (well under a minute; checks the script)
    python -m bench --json out.json --dir ~/bench --profile agent.prof

It starts its own sandbox (certificates, a mutual-TLS Mosquitto on a free loopback port, the
Jobs and Commands emulator and its HTTP fronts) in a fresh directory, by default under
~/.cache/iot-jobs-agent-bench: disk-backed (/tmp may be a tmpfs and would make the journal's
fsyncs free) and private (the agent refuses handlers under a directory others can write, such
as the sticky /var/tmp; agent.paths), and removes it afterwards unless ``--dir`` names one.
The JSON (default ``bench-results.json`` in the current directory) holds every figure, its
baseline, the side measurements and the machine. Exit status: 0 when every section ran
(whether or not its target was met), 1 when a section failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import (
    commands,
    flatness,
    hotpath,
    idle,
    latency,
    linked,
    packets,
    report,
    roundtrip,
    throughput,
)
from bench.common import machine
from bench.world import World

__all__ = ["SECTIONS", "main"]

SECTIONS = ("packets", "roundtrip", "latency", "link", "throughput", "idle", "startup",
            "flatness", "commands")


@dataclass(frozen=True)
class Sizes:
    """How much of everything a run does; ``--quick`` shrinks each to a few seconds."""

    rt_calls: int
    rt_rounds: int
    rt_extra_calls: int
    latency_samples: int
    tp_jobs: int
    tp_rounds: int
    tp_shipped_jobs: int
    starts: int
    idle_seconds: float
    flat_first: int
    flat_total: int
    flat_max_records: int
    profile_jobs: int
    packet_jobs: int
    link_samples: int
    link_rt_calls: int
    link_one_ways: tuple[float, ...]  # seconds each way: 25 ms = a 50 ms RTT
    command_samples: int


FULL = Sizes(rt_calls=1000, rt_rounds=2, rt_extra_calls=200, latency_samples=200, tp_jobs=1000,
             tp_rounds=4, tp_shipped_jobs=100, starts=5, idle_seconds=60.0, flat_first=500,
             flat_total=5000, flat_max_records=100, profile_jobs=1000, packet_jobs=100,
             link_samples=30, link_rt_calls=50, link_one_ways=(0.025, 0.150),
             command_samples=200)
QUICK = Sizes(rt_calls=100, rt_rounds=1, rt_extra_calls=20, latency_samples=20, tp_jobs=100,
              tp_rounds=1, tp_shipped_jobs=10, starts=2, idle_seconds=3.0, flat_first=50,
              flat_total=200, flat_max_records=20, profile_jobs=100, packet_jobs=10,
              link_samples=3, link_rt_calls=5, link_one_ways=(0.025,), command_samples=10)


def _fs_type(path: Path) -> str:
    """The filesystem the state directories live on (tmpfs makes every fsync free)."""
    best, kind = "", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            mount = fields[1]
            if str(path).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fields[2]
    return kind


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="the CI smoke run: tiny counts, under a minute")
    parser.add_argument("--json", type=Path, default=Path("bench-results.json"),
                        help="where to write the results (default: ./bench-results.json)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="keep the run's sandbox, state and logs here (default: a temporary "
                             "directory under ~/.cache/iot-jobs-agent-bench, removed "
                             "afterwards)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--profile", type=Path, default=None, metavar="PSTATS",
                        help="also run the agent under cProfile for a batch of jobs and write "
                             "its pstats file here")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    return args


def _plan(sizes: Sizes, wanted: list[str], profile: Path | None
          ) -> list[tuple[str, Callable[[World, dict[str, Any]], dict[str, Any]]]]:
    """Sections in run order; each returns {name: result} (idle+startup share one run)."""
    plan: list[tuple[str, Callable[[World, dict[str, Any]], dict[str, Any]]]] = []
    if "packets" in wanted:
        plan.append(("packets", lambda w, _: {"packets": packets.run(w, sizes.packet_jobs)}))
    if "roundtrip" in wanted:
        plan.append(("roundtrip", lambda w, _: {"roundtrip": roundtrip.run(
            w, sizes.rt_calls, sizes.rt_rounds, sizes.rt_extra_calls)}))
    if "latency" in wanted:
        plan.append(("latency", lambda w, done: {"latency": latency.run(
            w, sizes.latency_samples, (done.get("roundtrip") or {}).get("raw_echo"))}))
    if "link" in wanted:
        plan.append(("link", lambda w, _: {"link": linked.run(
            w, sizes.link_samples, sizes.link_rt_calls, sizes.link_one_ways)}))
    if "throughput" in wanted:
        plan.append(("throughput", lambda w, _: {"throughput": throughput.run(
            w, sizes.tp_jobs, sizes.tp_rounds, sizes.tp_shipped_jobs)}))
    if "idle" in wanted or "startup" in wanted:
        def idle_and_startup(w: World, _: dict[str, Any]) -> dict[str, Any]:
            both = idle.run(w, sizes.starts, sizes.idle_seconds)
            return {k: v for k, v in both.items() if k in wanted}
        plan.append(("idle+startup", idle_and_startup))
    if "flatness" in wanted:
        plan.append(("flatness", lambda w, _: {"flatness": flatness.run(
            w, sizes.flat_first, sizes.flat_total, sizes.flat_max_records)}))
    if "commands" in wanted:
        plan.append(("commands", lambda w, _: {"commands": commands.run(
            w, sizes.command_samples)}))
    if profile is not None:
        plan.append(("profile", lambda w, _: {"profile": hotpath.run(
            w, sizes.profile_jobs, profile.absolute())}))
    return plan


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    sizes = QUICK if args.quick else FULL
    started = time.monotonic()
    base = Path.home() / ".cache" / "iot-jobs-agent-bench"
    base.mkdir(mode=0o755, parents=True, exist_ok=True)
    directory = args.dir.absolute() if args.dir else Path(tempfile.mkdtemp(
        prefix="iot-jobs-bench-", dir=base))
    directory.mkdir(parents=True, exist_ok=True)
    command = "python -m bench" + (" --quick" if args.quick else "")
    results: dict[str, Any] = {
        "command": command, "mode": "quick" if args.quick else "full",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {**machine(), "state_filesystem": _fs_type(directory)},
        "sizes": sizes.__dict__, "sections": {}, "errors": {},
    }
    print(f"{command}: sandbox in {directory} ({results['machine']['state_filesystem']})",
          flush=True)
    world = World(directory)
    try:
        world.start()
        for name, step in _plan(sizes, args.sections, args.profile):
            began = time.monotonic()
            print(f"  {name} ...", end="", flush=True)
            try:
                results["sections"].update(step(world, results["sections"]))
                print(f" {time.monotonic() - began:.1f}s", flush=True)
            except Exception as exc:  # one broken section must not hide the others' figures
                results["errors"][name] = "".join(traceback.format_exception(exc))
                print(f" FAILED: {type(exc).__name__}: {exc}", flush=True)
    finally:
        world.stop()
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    results["exit_codes"] = world.exit_codes  # of every agent, sample loop and bare client
    results["duration_s"] = round(time.monotonic() - started, 1)
    results["table"] = report.rows(results["sections"])
    results["notes"] = report.notes(results["sections"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    print()
    print(report.table(results["sections"]))
    print()
    for note in results["notes"]:
        print(f"- {note}")
    print(f"\n{m['nproc']} x {m['cpu_model']}, Python {m['python']}, awscrt {m['awscrt']}, "
          f"{m['mosquitto']}; load {' '.join(m['loadavg_at_start'])}; state on "
          f"{m['state_filesystem']}; {results['duration_s']:.0f} s; JSON: {args.json}")
    unclean = {name: codes for name, codes in world.exit_codes.items() if any(codes)}
    if unclean:
        print(f"\nprocesses that did not exit 0 on SIGTERM: {unclean}")
    for name, error in results["errors"].items():
        print(f"\nsection {name} failed:\n{error}", file=sys.stderr)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
