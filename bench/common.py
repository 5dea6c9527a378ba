"""What every section needs: percentiles, /proc readings, the machine, child processes, sd_notify.

Standard library only (no psutil): a device has no such luxury, and the figures must be readable
on any Linux box. Memory is ``VmRSS`` from ``/proc/<pid>/status`` and CPU is ``utime + stime``
from ``/proc/<pid>/stat``, which is what ``top`` and systemd's accounting show too.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

__all__ = ["PYTHON", "ROOT", "BrokerCount", "Child", "NotifySocket", "child_env",
           "count_packets", "cpu_seconds", "machine", "percentile", "ratio", "rss_bytes",
           "run_json", "summary"]

PYTHON = sys.executable
ROOT = Path(__file__).resolve().parent.parent
"""The checkout: children run from it, so ``python -m agent`` is this tree's agent."""

_TICKS = os.sysconf("SC_CLK_TCK")
_PACKET = re.compile(r"^\S+ (Received|Sending) ([A-Z]+) (?:from|to) (\S+)(?: \((.*)\))?$",
                     re.M)
_PAYLOAD = re.compile(r"\((\d+) bytes\)$")


@dataclass
class BrokerCount:
    """MQTT packets one client exchanged with Mosquitto, from the broker's own log.

    ``sent`` is what the client sent (the log's "Received X from <id>"), ``received`` what the
    broker sent it ("Sending X to <id>"), by packet type; ``payload_bytes`` the PUBLISH payloads
    each way. The broker logs every packet at ``log_type all``: an independent count, not the
    client's word for it.
    """

    sent: dict[str, int]
    received: dict[str, int]
    payload_bytes_sent: int
    payload_bytes_received: int

    def requests(self) -> int:
        """Packets that ask the broker for something: PUBLISH, SUBSCRIBE, UNSUBSCRIBE."""
        return sum(self.sent.get(k, 0) for k in ("PUBLISH", "SUBSCRIBE", "UNSUBSCRIBE"))


def count_packets(log: Path, offset: int, client_id: str) -> BrokerCount:
    """Count ``client_id``'s packets in Mosquitto's log from byte ``offset`` on."""
    with open(log, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    sent: dict[str, int] = {}
    received: dict[str, int] = {}
    payload = {"Received": 0, "Sending": 0}
    for way, kind, who, detail in _PACKET.findall(text):
        if who != client_id:
            continue
        table = sent if way == "Received" else received
        table[kind] = table.get(kind, 0) + 1
        if kind == "PUBLISH" and (size := _PAYLOAD.search(detail or "")):
            payload[way] += int(size.group(1))
    return BrokerCount(dict(sorted(sent.items())), dict(sorted(received.items())),
                       payload["Received"], payload["Sending"])


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-quantile (0..1) with linear interpolation, as numpy's default does."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(seconds: list[float]) -> dict[str, float]:
    """p50/p99/mean/min/max in milliseconds: the shape every latency figure is reported in."""
    return {
        "n": len(seconds),
        "p50_ms": round(percentile(seconds, 0.50) * 1e3, 4),
        "p90_ms": round(percentile(seconds, 0.90) * 1e3, 4),
        "p99_ms": round(percentile(seconds, 0.99) * 1e3, 4),
        "mean_ms": round(sum(seconds) / len(seconds) * 1e3, 4) if seconds else float("nan"),
        "min_ms": round(min(seconds) * 1e3, 4) if seconds else float("nan"),
        "max_ms": round(max(seconds) * 1e3, 4) if seconds else float("nan"),
    }


def ratio(value: float | None, baseline: float | None) -> float | None:
    """``value / baseline`` rounded for the table; None when either side is missing or zero."""
    if value is None or baseline is None or baseline == 0:
        return None
    return round(value / baseline, 3)


def rss_bytes(pid: int) -> int:
    """Resident set size now (``VmRSS``), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far (its own, not its children's)."""
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime: fields 14, 15


def machine() -> dict[str, Any]:
    """Where the figures came from: they mean little without the machine and its load."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        crt, iot = version("awscrt"), version("awsiotsdk")
    except PackageNotFoundError:
        crt = iot = "unknown"
    try:
        head = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, timeout=5,
                              env={**os.environ, "PATH": os.environ.get("PATH", "")
                                   + ":/usr/sbin:/usr/local/sbin"}).stdout.splitlines()
        mosquitto = head[0] if head else "unknown"
    except (OSError, subprocess.SubprocessError):
        mosquitto = "unknown"
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "awscrt": crt,
        "awsiotsdk": iot,
        "mosquitto": mosquitto,
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def child_env(notify: str | None = None) -> dict[str, str]:
    """Our environment for a child, minus systemd's variables, with the checkout importable."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if notify is not None:
        env["NOTIFY_SOCKET"] = notify
    return env


def run_json(argv: list[str], timeout: float) -> Any:
    """Run a bench helper (``python -m bench.x``) to completion and return the JSON it printed."""
    done = subprocess.run(argv, cwd=ROOT, env=child_env(), capture_output=True, timeout=timeout,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[1:4])} exited {done.returncode}:\n"
                           f"{done.stderr.decode(errors='replace')[-3000:]}")
    return json.loads(done.stdout)


class NotifySocket:
    """A ``$NOTIFY_SOCKET`` of our own: records when each datagram arrived (monotonic clock).

    In the abstract namespace (``@name``, which the agent's sd_notify supports as systemd
    does): no path length limit, nothing to clean up.
    """

    _count = 0

    def __init__(self, tag: str) -> None:
        NotifySocket._count += 1
        self.name = f"iot-jobs-bench-{os.getpid()}-{tag}-{NotifySocket._count}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.messages: list[tuple[float, str]] = []

    @property
    def env(self) -> str:
        """The value for ``$NOTIFY_SOCKET``."""
        return "@" + self.name

    def wait_for(self, text: str, timeout: float, child: Child | None = None) -> float:
        """The arrival time of the first datagram containing ``text`` (waiting up to timeout)."""
        deadline = time.monotonic() + timeout
        for arrived, message in self.messages:
            if text in message:
                return arrived
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{text!r} not received within {timeout:g}s; got "
                                   f"{[m for _, m in self.messages]}"
                                   + (f"; log tail:\n{child.tail()}" if child else ""))
            self.sock.settimeout(min(left, 0.5))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                if child is not None and child.process.poll() is not None:
                    raise RuntimeError(f"{child.name} exited {child.process.returncode} before "
                                       f"sending {text!r}:\n{child.tail()}") from None
                continue
            arrived = time.monotonic()
            message = data.decode(errors="replace")
            self.messages.append((arrived, message))
            if text in message:
                return arrived

    def close(self) -> None:
        self.sock.close()


@dataclass
class Child:
    """A process the bench started (agent, sample loop, bare client), logging to a file."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    started: float  # time.monotonic() just before the spawn

    @classmethod
    def spawn(cls, name: str, argv: list[str], log: Path, *,
              notify: str | None = None, stdout_pipe: bool = False) -> Child:
        """Start ``argv`` from the checkout with a clean systemd environment."""
        env = child_env(notify)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            started = time.monotonic()
            process = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else out,
                stderr=out)
        return cls(name, process, log, started)

    @property
    def pid(self) -> int:
        return self.process.pid

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def alive(self) -> None:
        """Raise with the log's tail if the child died: a dead agent must not read as slow."""
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited {self.process.returncode}:\n{self.tail()}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait (SIGKILL after ``timeout``); returns the exit status."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()
