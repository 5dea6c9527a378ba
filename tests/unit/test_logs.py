"""Log lines: journald-aware prefixes, timestamps elsewhere, JSON lines on request."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from agent.logs import JournalFormatter, JsonFormatter, stderr_is_journal


def record(level: int = logging.WARNING, msg: str = "job claimed job_id=%s") -> logging.LogRecord:
    return logging.LogRecord("agent.dispatcher", level, __file__, 1, msg, ("j1",), None)


def test_journal_lines_have_priority_and_no_timestamp() -> None:
    line = JournalFormatter(journal=True).format(record())
    assert line == "<4>agent.dispatcher: job claimed job_id=j1"


def test_terminal_lines_have_utc_timestamps() -> None:
    line = JournalFormatter(journal=False).format(record(logging.INFO))
    stamp, level, rest = line.split(" ", 2)
    assert stamp.endswith("Z") and "T" in stamp
    assert (level, rest) == ("INFO", "agent.dispatcher: job claimed job_id=j1")


def test_one_event_is_one_line() -> None:
    line = JournalFormatter(journal=True).format(record(msg="two\nlines %s"))
    assert "\n" not in line


def test_json_lines() -> None:
    entry = json.loads(JsonFormatter().format(record(logging.ERROR)))
    assert entry["level"] == "error" and entry["msg"] == "job claimed job_id=j1"
    assert entry["logger"] == "agent.dispatcher"


def test_journal_stream_detection_compares_stderr_device_and_inode(tmp_path: Path) -> None:
    """``JOURNAL_STREAM`` only counts when it names the stderr we actually have."""
    target = tmp_path / "stderr"
    code = ("import sys; from agent.logs import stderr_is_journal; "
            "print(stderr_is_journal(), file=sys.stdout)")
    with target.open("w") as err:
        st = os.fstat(err.fileno())
        env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        same = subprocess.run([sys.executable, "-c", code], stderr=err, env=env,
                              capture_output=False, stdout=subprocess.PIPE, text=True)
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino + 1}"
        other = subprocess.run([sys.executable, "-c", code], stderr=err, env=env,
                               stdout=subprocess.PIPE, text=True)
    assert same.stdout.strip() == "True"
    assert other.stdout.strip() == "False"
    assert stderr_is_journal({"JOURNAL_STREAM": "garbage"}) is False
