"""Output hygiene (issue 11 item 6): terminal controls in a handler's output are neutralised in
the per-job log, and secret environment values are redacted from the log, the agent's log and
statusDetails, also when the handler's writes split them."""

from __future__ import annotations

import asyncio
import logging
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from agent.config import load_config
from agent.errors import ConfigError
from agent.hygiene import Neutraliser, Redactor, Secret, neutralise, secrets_of
from agent.runner import RunRequest, run_handler, status_details

TOKEN = "tok-3f9a1c"


def test_controls_are_shown_as_text() -> None:
    raw = (b"plain\ttab\n\x1b[2J\x1b[31mred\x1b[0m \x1b]0;owned\x07 \x9b \xc2\x9b1m cr\r "
           b"nul\x00 del\x7f caf\xc3\xa9 \xe2\x98\x95\n")
    assert neutralise(raw) == (
        b"plain\ttab\n\\x1b[2J\\x1b[31mred\\x1b[0m \\x1b]0;owned\\x07 \x9b \\u009b1m "
        b"cr\\x0d nul\\x00 del\\x7f caf\xc3\xa9 \xe2\x98\x95\n")
    stream = Neutraliser()
    assert stream.feed(b"a\xc2") + stream.feed(b"\x9b[1m") + stream.flush() == b"a\\u009b[1m"
    assert stream.feed(b"b\xc2") + stream.feed(b"\xa9") + stream.flush() == b"b\xc2\xa9"


@given(st.lists(st.integers(0, 60), max_size=6), st.sampled_from([b"", b"x", b"tok"]))
def test_secrets_are_redacted_however_the_stream_is_cut(cuts: list[int], noise: bytes) -> None:
    secrets = [TOKEN.encode(), b"tok-3f", b"pw"]
    stream = noise + b"a " + TOKEN.encode() + b" b tok-3 pw" + TOKEN.encode() + TOKEN.encode()[:5]
    redactor = Redactor(secrets)
    out, last = b"", 0
    for cut in sorted(c % (len(stream) + 1) for c in cuts):
        out += redactor.feed(stream[last:cut])
        last = cut
    out += redactor.feed(stream[last:]) + redactor.flush()
    assert out == noise + b"a *** b tok-3 ******tok-3"
    assert not Redactor([])  # nothing secret: a no-op
    assert Redactor([]).feed(b"x") == b"x"


def test_config_marks_secret_values(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    data: dict[str, Any] = {
        "thing_name": "t", "mqtt": {"endpoint": "e", "cert": "c", "key": "k"},
        "handler_environment": {"PROXY_PASSWORD": {"value": "hunter2", "secret": True}},
        "handlers": {"h": {"command": ["/bin/true"], "environment": {
            "TOKEN": {"value": TOKEN, "secret": True}, "PLAIN": "x", "NUMBER": 3,
            "SPELLED": {"value": "y"}}}}}
    path.write_text(yaml.safe_dump(data))
    config = load_config(path)
    env = config.handlers["h"].environment
    assert env == {"TOKEN": TOKEN, "PLAIN": "x", "NUMBER": "3", "SPELLED": "y"}
    assert isinstance(env["TOKEN"], Secret) and not isinstance(env["PLAIN"], Secret)
    assert secrets_of(env) == (TOKEN.encode(),)
    assert isinstance(config.handler_environment["PROXY_PASSWORD"], Secret)
    assert TOKEN not in repr(config) and "hunter2" not in repr(config)
    data["handlers"]["h"]["environment"]["TOKEN"] = {"value": TOKEN, "secret": "yes"}
    data["handlers"]["h"]["environment"]["OTHER"] = {"valeu": TOKEN}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert [p.split(": ", 1)[1] for p in caught.value.problems] == [
        "handlers.h.environment: OTHER: expected a string or {value: ..., secret: true}, got a "
        "mapping"]


def test_a_handler_printing_its_secret_and_escapes(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The secret in pieces on stdout, whole on stderr, in a progress line (raw, and JSON
    escaped) and in a line that is no JSON (logged by the agent at debug level)."""
    body = textwrap.dedent("""\
        printf 'clear\\033[2J\\033]0;title\\007 then: tok-'
        sleep 0.2
        printf '3f9a1c end\\n'
        echo "stderr $TOKEN" >&2
        echo '{"step": "tok-3f9a1c", "other": "tok\\u002d3f9a1c"}' >&"$JOB_PROGRESS_FD"
        echo "not json $TOKEN" >&"$JOB_PROGRESS_FD"
        env
    """)
    script = tmp_path / "h.sh"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    progress: list[dict[str, str]] = []
    req = RunRequest(job_id="j", execution_number=1, thing_name="t", argv=[str(script)],
                     document={}, work_dir=tmp_path / "work", log_path=tmp_path / "j.1.log",
                     environment={"TOKEN": Secret(TOKEN), "PLAIN": "visible"})
    with caplog.at_level(logging.DEBUG, logger="agent.runner"):
        result = asyncio.run(run_handler(req, progress.append))
    assert result.outcome == "succeeded", result.reason
    log = req.log_path.read_bytes()
    assert b"clear\\x1b[2J\\x1b]0;title\\x07 then: *** end\n" in log
    assert b"stderr ***\n" in log and b"TOKEN=***\n" in log and b"PLAIN=visible\n" in log
    assert b"\x1b" not in log and b"\x07" not in log
    details = status_details(result)
    everything = [log.decode(), result.output_head, result.output_tail, result.stdout_tail,
                  result.stderr_tail, repr(progress), repr(details), caplog.text]
    for text in everything:
        assert TOKEN not in text and "3f9a1c" not in text
    assert progress == [{"step": "***", "other": "***"}]
    assert "not json ***" in caplog.text
