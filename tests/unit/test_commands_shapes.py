"""The Commands wire forms (``agent.commands.shapes``) and decisions (``agent.commands.lifecycle``).

Every update the agent builds must pass the service's own checks whatever a handler printed:
hypothesis feeds :func:`final_update` arbitrary run results and handler results, and the
sandbox's validation of device updates (the same rules botocore's model states) referees.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.commands import lifecycle, shapes
from agent.commands.journal import CommandRecord
from agent.commands.lifecycle import Work
from agent.config import Config, HandlerConfig, MqttConfig
from agent.errors import ConflictException, InvalidRequestException, ResourceNotFoundException
from agent.runner import RunResult
from agent.sandbox.commands import CommandsService

THING = "dev1"


def config(**handlers: HandlerConfig) -> Config:
    mqtt = MqttConfig(endpoint="x", cert=Path("c"), key=Path("k"))
    return Config(thing_name=THING, mqtt=mqtt, handlers=handlers or {
        "echo": HandlerConfig(command=("/bin/echo",), timeout=30.0),
        "again": HandlerConfig(command=("/bin/true",), timeout=30.0, idempotent=True)})


def result(outcome: str = "succeeded", code: int | None = 0, signal: int | None = None,
           reason: str = "exit code 0", head: str = "out", tail: str = "") -> RunResult:
    return RunResult(outcome, reason, code, signal, 1, 0.25, head, tail, len(head + tail))


def accepted_by_the_service(update: dict[str, Any]) -> bool:
    """Whether the sandbox (whose checks follow the model) accepts ``update``."""
    service = CommandsService(lambda: 0.0)
    service.create_command("c", payload={"content": b"x"})
    execution_id, _ = service.start_execution("c", THING)
    topic = f"$aws/commands/things/{THING}/executions/{execution_id}/response/json"
    [reply] = service.handle(topic, json.dumps(update).encode())
    if not reply.topic.endswith("/accepted/json"):
        raise AssertionError(json.loads(reply.payload))
    return True


# --------------------------------------------------------------------------- topics


def test_topics() -> None:
    assert shapes.request_filter(THING, "json") == \
        "$aws/commands/things/dev1/executions/+/request/json"
    assert shapes.request_filter(THING, "cbor").endswith("/+/request/cbor")
    assert shapes.request_filter(THING, "generic").endswith("/+/request")
    assert shapes.reply_filters(THING) == (
        "$aws/commands/things/dev1/executions/+/response/accepted/json",
        "$aws/commands/things/dev1/executions/+/response/rejected/json")
    assert shapes.response_topic(THING, "e-1") == \
        "$aws/commands/things/dev1/executions/e-1/response/json"


@pytest.mark.parametrize(("topic", "route"), [
    ("$aws/commands/things/dev1/executions/e-1/request/json", ("e-1", "json")),
    ("$aws/commands/things/dev1/executions/e_1/request/cbor", ("e_1", "cbor")),
    ("$aws/commands/things/dev1/executions/E1/request", ("E1", "generic")),
    ("$aws/commands/things/dev1/executions/e-1/request/xml", None),
    ("$aws/commands/things/dev2/executions/e-1/request/json", None),
    ("$aws/commands/things/dev1/executions/e$1/request/json", None),
    ("$aws/commands/things/dev1/executions/e-1/response/json", None),
    ("$aws/things/dev1/jobs/notify", None),
])
def test_request_routes(topic: str, route: tuple[str, str] | None) -> None:
    assert shapes.request_route(THING, topic) == route


def test_reply_routes() -> None:
    base = "$aws/commands/things/dev1/executions/e-1/response"
    assert shapes.reply_route(THING, f"{base}/accepted/json") == ("e-1", True)
    assert shapes.reply_route(THING, f"{base}/rejected/json") == ("e-1", False)
    assert shapes.reply_route(THING, f"{base}/json") is None
    assert shapes.reply_route(THING, f"{base}/accepted") is None


def test_replies_parse_to_boto3_named_errors() -> None:
    topic = "t/rejected/json"
    assert shapes.parse_reply("t", b'{"executionId": "e"}', True) == {"executionId": "e"}
    for code, cls in (("DataConflict", ConflictException),
                      ("InvalidRequest", InvalidRequestException),
                      ("ResourceNotFound", ResourceNotFoundException)):
        with pytest.raises(cls) as info:
            shapes.parse_reply(topic, json.dumps({"error": code, "errorMessage": "m"}).encode(),
                               False)
        assert info.value.code == code
    with pytest.raises(Exception, match="not JSON"):
        shapes.parse_reply(topic, b"{", True)


# --------------------------------------------------------------------------- updates


@pytest.mark.parametrize(("run", "kwargs", "status", "code"), [
    (result(), {}, "SUCCEEDED", None),
    (result("failed", 3, reason="exit code 3"), {}, "FAILED", "HANDLER_EXIT_3"),
    (result("failed", None, 9, "killed by signal 9 (SIGKILL)"), {}, "FAILED",
     "HANDLER_SIGNAL_9"),
    (result("timed_out", None, 15, "timed out after 5s"), {}, "TIMED_OUT", "HANDLER_TIMEOUT"),
    (result("timed_out", None, 15, "timed out after 5s"), {"expired": True}, "TIMED_OUT",
     "EXECUTION_TIMEOUT"),
    (result("not_started", None, reason="cannot start /x: No such file"), {}, "FAILED",
     "HANDLER_NOT_STARTED"),
    (result("canceled", None, 15, "stopped"), {"interrupted": "the agent was stopped"},
     "FAILED", "INTERRUPTED"),
    (result("failed", None, reason="agent error: OSError"), {}, "FAILED", "AGENT_ERROR"),
])
def test_final_updates(run: RunResult, kwargs: dict[str, Any], status: str,
                       code: str | None) -> None:
    update = shapes.final_update(run, {"answer": {"s": "42"}}, **kwargs)
    assert update["status"] == status
    assert update.get("statusReason", {}).get("reasonCode") == code
    assert update["result"]["answer"] == {"s": "42"}
    assert update["result"]["outputHead"] == {"s": "out"}
    assert accepted_by_the_service(update)


def test_our_result_names_win_over_the_handlers() -> None:
    update = shapes.final_update(result(), {"exitCode": {"s": "lie"}})
    assert update["result"]["exitCode"] == {"s": "0"}


def test_handler_result_lines() -> None:
    blob = base64.b64encode(b"\x01\x02").decode()
    values = {"result": json.dumps({"temp": 21.5, "ok": True, "name": "x", "empty": "",
                                    "raw": {"bin": blob}, "typed": {"s": "t"},
                                    "bad name!": "y", "obj": {"a": [1]}})}
    assert shapes.handler_results(values) == {
        "temp": {"s": "21.5"}, "ok": {"b": True}, "name": {"s": "x"}, "raw": {"bin": blob},
        "typed": {"s": "t"}, "bad_name": {"s": "y"}, "obj": {"s": '{"a":[1]}'}}
    assert shapes.handler_results({"progress": "40"}) == {}
    assert shapes.handler_results({"result": "not json"}) == {}
    assert shapes.handler_results({"result": "[1]"}) == {}


def test_reason_codes_are_forced_into_the_pattern() -> None:
    assert shapes.reason_code("handler exit 3!") == "HANDLER_EXIT_3"
    assert shapes.reason_code("***") == "UNSPECIFIED"
    assert len(shapes.reason_code("x" * 100)) == 64
    with pytest.raises(ValueError):
        shapes.status_reason("lower")
    assert shapes.status_reason("X", "a\nb\x00c" + "d" * 2000)["reasonDescription"].startswith(
        "a | bc")


texts = st.text(st.characters(codec="utf-8"), max_size=3000)


@settings(max_examples=150, deadline=None)
@given(outcome=st.sampled_from(["succeeded", "failed", "timed_out", "canceled", "not_started"]),
       code=st.none() | st.integers(0, 255), signal=st.none() | st.integers(1, 64),
       reason=texts, head=texts, tail=texts, extra=st.dictionaries(
           st.text(max_size=40), st.none() | st.booleans() | st.integers() | texts
           | st.dictionaries(st.sampled_from(["s", "b", "bin", "x"]), texts | st.booleans(),
                             max_size=2), max_size=40),
       interrupted=st.none() | texts, expired=st.booleans())
def test_every_final_update_is_one_the_service_accepts(
        outcome: str, code: int | None, signal: int | None, reason: str, head: str, tail: str,
        extra: dict[str, Any], interrupted: str | None, expired: bool) -> None:
    run = RunResult(outcome, reason, code, signal, 1, 0.5, head, tail, 0)
    results = shapes.handler_results({"result": json.dumps(extra)})
    update = shapes.final_update(run, results, interrupted=interrupted, expired=expired)
    assert accepted_by_the_service(update)
    assert len(json.dumps(update)) < 128 * 1024  # an AWS IoT message


# --------------------------------------------------------------------------- decisions


@pytest.mark.parametrize(("payload", "fmt", "content_type", "code"), [
    (b'{"operation": "nope"}', "json", "application/json", "UNKNOWN_OPERATION"),
    (b'{"operation": "echo", "args": [1]}', "json", None, "INVALID_PAYLOAD"),
    (b"not json", "json", None, "INVALID_PAYLOAD"),
    (b"[1, 2]", "json", None, "INVALID_PAYLOAD"),
    (b"\xff\xfe", "json", None, "INVALID_PAYLOAD"),
    (b'{"args": []}', "json", None, "INVALID_PAYLOAD"),
    (b"\xa1", "cbor", "application/cbor", "UNSUPPORTED_FORMAT"),
    (b"hello", "generic", "text/plain", "UNSUPPORTED_FORMAT"),
])
def test_requests_that_do_not_run(payload: bytes, fmt: str, content_type: str | None,
                                  code: str) -> None:
    read = lifecycle.read_request(payload, fmt, content_type, config())
    assert isinstance(read, lifecycle.Rejected)
    assert read.code == code
    assert read.update["status"] == "REJECTED"
    assert accepted_by_the_service(read.update)


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=300) | st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["operation", "args", "x"]), inner, max_size=3),
    max_leaves=12).map(lambda value: json.dumps(value).encode()),
       fmt=st.sampled_from(["json", "cbor", "generic"]),
       content_type=st.none() | st.sampled_from(["application/json", "text/plain", "",
                                                 "application/cbor; x=y"]))
def test_any_payload_runs_or_is_rejected_validly(payload: bytes, fmt: str,
                                                 content_type: str | None) -> None:
    read = lifecycle.read_request(payload, fmt, content_type, config())
    if isinstance(read, lifecycle.Rejected):
        assert accepted_by_the_service(read.update)
    else:
        assert read.operation in ("echo", "again")


@pytest.mark.parametrize(("fmt", "content_type"), [("json", "application/json"),
                                                   ("generic", None),
                                                   ("generic", "application/json")])
def test_a_native_document_runs_the_handler(fmt: str, content_type: str | None) -> None:
    read = lifecycle.read_request(b'{"operation": "echo", "args": ["a", "b"], "x": 1}', fmt,
                                  content_type, config())
    assert isinstance(read, Work)
    assert read.argv == ["/bin/echo", "a", "b"]
    assert read.document["x"] == 1


def test_time() -> None:
    assert lifecycle.too_late(None, 100.0) is None
    assert lifecycle.too_late(100.5, 100.0) is None
    late = lifecycle.too_late(100.0, 100.0)
    assert late is not None and late["statusReason"]["reasonCode"] == "EXPIRED_BEFORE_START"
    assert lifecycle.run_limit(30.0, None, 0.0) == (30.0, False)
    assert lifecycle.run_limit(30.0, 100.0, 0.0) == (30.0, False)
    assert lifecycle.run_limit(30.0, 10.0, 2.0) == (8.0, True)
    assert lifecycle.run_limit(30.0, 1.0, 2.0) == (0.0, True)


def record(state: str, *, operation: str = "echo", attempts: int = 1,
           deadline: float | None = None, final: dict[str, Any] | None = None,
           pid: int | None = 7) -> CommandRecord:
    return CommandRecord("e-1", operation, {"operation": operation}, state, deadline, attempts,
                         pid, 123, "boot", final, 50.0)


def test_a_repeated_request() -> None:
    assert lifecycle.on_repeat(record("running"), running=True) == "ignore"
    assert lifecycle.on_repeat(record("received"), running=True) == "ignore"
    assert lifecycle.on_repeat(record("finished"), running=False) == "answer"
    assert lifecycle.on_repeat(record("done"), running=False) == "answer"
    assert lifecycle.on_repeat(record("received"), running=False) == "resume"


@pytest.mark.parametrize(("rec", "alive", "kind", "code", "kill"), [
    (record("finished", final={"status": "SUCCEEDED"}), True, "report", None, 7),
    (record("received", attempts=0), False, "run", None, None),
    (record("received", attempts=0, deadline=99.0), False, "report", "EXPIRED_BEFORE_START",
     None),
    (record("running"), True, "report", "INTERRUPTED", 7),
    (record("running", operation="again"), True, "run", None, 7),
    (record("running", operation="again"), False, "run", None, None),
    (record("running", operation="again", deadline=99.0), False, "report", "EXECUTION_TIMEOUT",
     None),
    (record("running", operation="again", attempts=3), False, "report", "CRASH_LOOP", None),
    (record("running", operation="gone"), False, "report", "HANDLER_REMOVED", None),
])
def test_recovery(rec: CommandRecord, alive: bool, kind: str, code: str | None,
                  kill: int | None) -> None:
    plan = lifecycle.plan_recovery(rec, 100.0, config(), alive)
    assert plan.kind == kind
    assert plan.kill_pid == kill
    if code is None:
        assert plan.update is None
    else:
        assert plan.update is not None
        assert plan.update["statusReason"]["reasonCode"] == code
        assert accepted_by_the_service(plan.update)
