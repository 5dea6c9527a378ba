"""Logging set-up: one line per event, ``key=value`` context, journald-aware.

Under systemd (``JOURNAL_STREAM`` names our stderr) the journal stamps each line itself, so we
print ``<N>`` syslog priority prefixes instead of timestamps; elsewhere lines carry an ISO time.
The package never calls ``basicConfig``: only the CLI configures logging.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

__all__ = ["JournalFormatter", "JsonFormatter", "configure_logging", "stderr_is_journal"]

# syslog priorities, as sd-daemon(3) prefixes understood by journald
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}


def stderr_is_journal(environ: dict[str, str] | None = None) -> bool:
    """True when stderr is the journal stream systemd gave us (``JOURNAL_STREAM=dev:ino``)."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class JournalFormatter(logging.Formatter):
    """``<6>agent.jobs: message`` under journald, ``2026-01-01T00:00:00Z INFO ...`` otherwise."""

    converter = time.gmtime

    def __init__(self, journal: bool) -> None:
        super().__init__("%(message)s")
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage().replace("\n", " | ")
        if record.exc_info and record.levelno >= logging.ERROR:
            exc = record.exc_info[1]
            message += f" exc={type(exc).__name__}: {exc}"
        if self.journal:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{record.name}: {message}"
        stamp = self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z"
        return f"{stamp} {record.levelname} {record.name}: {message}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers; ``key=value`` pairs are kept in ``msg``."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info and record.exc_info[1] is not None:
            entry["exc"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        return json.dumps(entry, ensure_ascii=False)

    converter = time.gmtime


def configure_logging(level: int | str = logging.INFO, *, json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines
                         else JournalFormatter(stderr_is_journal()))
    root = logging.getLogger("agent")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
