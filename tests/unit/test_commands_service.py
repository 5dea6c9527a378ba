"""Unit tests of the Commands emulator's state machine (``agent.sandbox.commands``).

Facts: ``commands-api.md``; where AWS is silent the tests pin the decisions documented in the
module. A hypothesis state machine then drives random control and device operations and checks
the invariants: a device's own terminal status never changes, a cloud-set TIMED_OUT takes exactly
one more terminal status, timers never fire early, and every request published carries the
command's payload with its content type and expiry.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from agent.sandbox.commands import (
    DEFAULT_TIMEOUT,
    NO_RESPONSE,
    PENDING_DELETION,
    CommandsService,
    Message,
    Rejection,
    parse_time_filter,
)
from tests.unit.test_service import Clock

T0 = 1_700_000_000.25
DOC = json.dumps({"operation": "echo", "args": ["a"]}).encode()


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def svc(clock: Clock) -> CommandsService:
    service = CommandsService(clock, thing_exists=lambda t: t in ("dev1", "dev2"))
    service.create_command("c1", payload={"content": DOC, "contentType": "application/json"})
    return service


def start(svc: CommandsService, thing: str = "dev1", command: str = "c1",
          **kwargs: Any) -> tuple[str, list[Message]]:
    return svc.start_execution(command, thing, **kwargs)


def send(svc: CommandsService, execution_id: str, body: Any, thing: str = "dev1"
         ) -> tuple[bool, dict[str, Any]]:
    """A device update; returns (accepted, reply payload)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    topic = f"$aws/commands/things/{thing}/executions/{execution_id}/response/json"
    [reply] = svc.handle(topic, raw)
    base = topic[: -len("/json")]
    assert reply.topic in (f"{base}/accepted/json", f"{base}/rejected/json")
    return reply.topic.endswith("/accepted/json"), json.loads(reply.payload)


def rejected(svc: CommandsService, execution_id: str, body: Any, code: str,
             thing: str = "dev1") -> str:
    accepted, payload = send(svc, execution_id, body, thing)
    assert not accepted, payload
    assert payload["error"] == code, payload
    assert payload["executionId"] == execution_id
    return str(payload["errorMessage"])


def code_of(call: Any) -> str:
    with pytest.raises(Rejection) as info:
        call()
    return info.value.code


# --------------------------------------------------------------------------- commands


def test_a_command_reads_back_as_created(svc: CommandsService, clock: Clock) -> None:
    svc.create_command("c2", payload={"content": b"\x00\x01"}, display_name="Two",
                       description="binary", tags=[{"Key": "k", "Value": "v"}])
    got = svc.get_command("c2")
    assert got == {"commandId": "c2", "displayName": "Two", "deprecated": False,
                   "createdAt": int(T0), "lastUpdatedAt": int(T0), "namespace": "AWS-IoT",
                   "description": "binary", "payload": {"content": b"\x00\x01"},
                   "pendingDeletion": False}
    assert svc.get_command("c1")["payload"] == {"content": DOC, "contentType": "application/json"}


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"payloadTemplate": "{}"}, "payload templates"),
    ({"preprocessor": {"awsJsonSubstitution": {"outputFormat": "JSON"}}}, "preprocessors"),
    ({"mandatoryParameters": [{"name": "x"}]}, "mandatory parameters"),
    ({"roleArn": "arn:aws:iam::1:role/r"}, "roleArn"),
    ({"namespace": "AWS-IoT-FleetWise"}, "AWS-IoT-FleetWise"),
    ({"somethingNew": 1}, "somethingNew"),
])
def test_unsupported_members_are_refused_by_name(svc: CommandsService, kwargs: dict[str, Any],
                                                 words: str) -> None:
    with pytest.raises(Rejection) as info:
        svc.create_command("c9", payload={"content": b"x"}, **kwargs)
    assert info.value.code == "InvalidRequest"
    assert words in info.value.message
    assert code_of(lambda: svc.get_command("c9")) == "ResourceNotFound"  # nothing was created


@pytest.mark.parametrize("payload", [None, {}, {"content": b""}, {"content": "text"},
                                     {"content": b"x" * 32769}, {"content": b"x", "other": 1},
                                     {"content": b"x", "contentType": ""}])
def test_a_static_payload_is_required_and_bounded(svc: CommandsService, payload: Any) -> None:
    assert code_of(lambda: svc.create_command("c9", payload=payload)) == "InvalidRequest"


def test_command_ids_are_checked_and_unique(svc: CommandsService) -> None:
    assert code_of(lambda: svc.create_command("c1", payload={"content": b"x"})) == "Conflict"
    for bad in ("", "a b", "x" * 65, "$next"):
        assert code_of(lambda b=bad: svc.create_command(b, payload={"content": b"x"})) \
            == "InvalidRequest"
    assert code_of(lambda: svc.get_command("none")) == "ResourceNotFound"
    assert code_of(lambda: svc.create_command("c9", payload={"content": b"x"},
                                              display_name="a\nb")) == "InvalidRequest"


def test_list_commands_newest_first_unless_ascending(svc: CommandsService,
                                                     clock: Clock) -> None:
    clock.advance(5)
    svc.create_command("c0", payload={"content": b"x"})
    assert [c["commandId"] for c in svc.list_commands()] == ["c0", "c1"]
    assert [c["commandId"] for c in svc.list_commands(sort_order="ASCENDING")] == ["c1", "c0"]
    assert svc.list_commands(namespace="AWS-IoT-FleetWise") == []
    assert code_of(lambda: svc.list_commands(sort_order="UP")) == "InvalidRequest"


def test_delete_schedules_unless_deprecated_for_twelve_hours(svc: CommandsService,
                                                              clock: Clock) -> None:
    assert svc.delete_command("c1") == 202
    assert svc.get_command("c1")["pendingDeletion"] is True
    assert code_of(lambda: start(svc)) == "InvalidRequest"  # pending deletion: not startable
    assert code_of(lambda: svc.create_command("c1", payload={"content": b"x"})) == "Conflict"
    assert svc.next_deadline() == int(T0) + PENDING_DELETION
    clock.advance(PENDING_DELETION)
    svc.tick()
    assert code_of(lambda: svc.get_command("c1")) == "ResourceNotFound"

    svc.create_command("c2", payload={"content": b"x"})
    svc.update_command("c2", deprecated=True)
    assert code_of(lambda: start(svc, command="c2")) == "InvalidRequest"  # deprecated
    clock.advance(PENDING_DELETION - 1)
    assert svc.delete_command("c2") == 202
    svc.create_command("c3", payload={"content": b"x"})
    svc.update_command("c3", deprecated=True)
    clock.advance(PENDING_DELETION)
    assert svc.delete_command("c3") == 204
    assert code_of(lambda: svc.get_command("c3")) == "ResourceNotFound"


def test_update_command(svc: CommandsService, clock: Clock) -> None:
    clock.advance(3)
    out = svc.update_command("c1", display_name="One", description="d", deprecated=True)
    assert out == {"commandId": "c1", "displayName": "One", "description": "d",
                   "deprecated": True, "lastUpdatedAt": int(T0) + 3}
    assert svc.update_command("c1", deprecated=False)["deprecated"] is False
    assert code_of(lambda: svc.update_command("c1", deprecated="yes")) == "InvalidRequest"


# --------------------------------------------------------------------------- executions


def test_start_publishes_the_payload_with_content_type_and_expiry(svc: CommandsService) -> None:
    execution_id, [message] = start(svc, timeout=30)
    assert message == Message(
        f"$aws/commands/things/dev1/executions/{execution_id}/request/json", DOC,
        "application/json", 30)
    got = svc.get_execution(execution_id, "dev1")
    assert got == {"executionId": execution_id, "commandId": "c1", "thing": "dev1",
                   "status": "CREATED", "executionTimeoutSeconds": 30, "createdAt": int(T0),
                   "lastUpdatedAt": int(T0), "timeToLive": int(T0) + 182 * 86400}


@pytest.mark.parametrize(("content_type", "suffix"), [
    ("application/json", "/json"), ("application/json; charset=utf-8", "/json"),
    ("application/cbor", "/cbor"), ("text/plain", ""), (None, "")])
def test_the_request_topic_follows_the_content_type(svc: CommandsService,
                                                    content_type: str | None,
                                                    suffix: str) -> None:
    payload: dict[str, Any] = {"content": b"x"}
    if content_type:
        payload["contentType"] = content_type
    svc.create_command("c9", payload=payload)
    execution_id, [message] = start(svc, command="c9")
    assert message.topic.endswith(f"/{execution_id}/request{suffix}")
    assert message.content_type == content_type
    assert message.message_expiry == DEFAULT_TIMEOUT


def test_start_checks_its_arguments(svc: CommandsService) -> None:
    assert code_of(lambda: start(svc, thing="ghost")) == "ResourceNotFound"
    assert code_of(lambda: start(svc, command="ghost")) == "ResourceNotFound"
    for timeout in (0, -1, True, 1.5, "5", 2**32):
        assert code_of(lambda t=timeout: start(svc, timeout=t)) == "InvalidRequest"
    for token in ("", "a b", "x" * 65, 5):
        assert code_of(lambda t=token: start(svc, client_token=t)) == "InvalidRequest"
    assert code_of(lambda: start(svc, parameters={"p": {"S": "x"}})) == "InvalidRequest"


def test_a_client_token_makes_start_idempotent(svc: CommandsService) -> None:
    first, published = start(svc, client_token="tok-1", timeout=5)
    again, republished = start(svc, client_token="tok-1", timeout=5)
    assert (again, republished) == (first, [])  # the same execution, nothing sent twice
    assert len(published) == 1
    assert code_of(lambda: start(svc, client_token="tok-1", timeout=6)) == "Conflict"
    assert code_of(lambda: start(svc, client_token="tok-1", thing="dev2", timeout=5)) \
        == "Conflict"
    other, _ = start(svc, client_token="tok-2", timeout=5)
    assert other != first


def test_the_timer_times_out_with_no_response_from_device(svc: CommandsService,
                                                          clock: Clock) -> None:
    execution_id, _ = start(svc, timeout=10)
    assert svc.next_deadline() == T0 + 10
    clock.advance(9.9)
    svc.tick()
    assert svc.get_execution(execution_id, "dev1")["status"] == "CREATED"
    clock.advance(0.1)
    assert svc.tick() == []
    got = svc.get_execution(execution_id, "dev1")
    assert got["status"] == "TIMED_OUT"
    assert got["statusReason"]["reasonCode"] == NO_RESPONSE
    assert got["completedAt"] == int(T0 + 10)
    assert svc.next_deadline() is None


def test_after_a_cloud_timeout_the_device_may_report_once(svc: CommandsService,
                                                          clock: Clock) -> None:
    execution_id, _ = start(svc, timeout=1)
    clock.advance(1)
    svc.tick()
    rejected(svc, execution_id, {"status": "IN_PROGRESS"}, "InvalidStateTransition")
    assert send(svc, execution_id, {"status": "SUCCEEDED",
                                    "result": {"x": {"s": "late"}}})[0]
    got = svc.get_execution(execution_id, "dev1")
    assert (got["status"], got.get("statusReason")) == ("SUCCEEDED", None)
    assert got["result"] == {"x": {"S": "late"}}
    rejected(svc, execution_id, {"status": "FAILED"}, "InvalidStateTransition")


def test_after_the_devices_own_timeout_nothing_more(svc: CommandsService) -> None:
    execution_id, _ = start(svc)
    assert send(svc, execution_id, {"status": "TIMED_OUT", "statusReason": {
        "reasonCode": "EXECUTION_TIMEOUT"}})[0]
    rejected(svc, execution_id, {"status": "SUCCEEDED"}, "InvalidStateTransition")
    assert svc.next_deadline() is None


def test_device_updates_move_the_execution(svc: CommandsService, clock: Clock) -> None:
    execution_id, _ = start(svc)
    clock.advance(1)
    assert send(svc, execution_id, {"status": "IN_PROGRESS", "result": {"p": {"s": "1"}}}) == (
        True, {"executionId": execution_id})
    got = svc.get_execution(execution_id, "dev1")
    assert (got["status"], got["startedAt"], got["result"]) == (
        "IN_PROGRESS", int(T0) + 1, {"p": {"S": "1"}})
    assert "completedAt" not in got
    clock.advance(1)
    reason = {"reasonCode": "HANDLER_EXIT_3", "reasonDescription": "exit code 3"}
    blob = base64.b64encode(b"\x00\xff").decode()
    assert send(svc, execution_id, {"status": "FAILED", "statusReason": reason,
                                    "result": {"ok": {"b": False}, "raw": {"bin": blob}}})[0]
    got = svc.get_execution(execution_id, "dev1")
    assert (got["status"], got["statusReason"], got["completedAt"], got["startedAt"]) == (
        "FAILED", reason, int(T0) + 2, int(T0) + 1)
    assert got["result"] == {"ok": {"B": False}, "raw": {"BIN": blob}}
    assert "result" not in svc.get_execution(execution_id, "dev1", include_result=False)


def test_an_update_without_a_result_keeps_the_last_one(svc: CommandsService) -> None:
    execution_id, _ = start(svc)
    send(svc, execution_id, {"status": "IN_PROGRESS", "result": {"p": {"s": "1"}}})
    send(svc, execution_id, {"status": "SUCCEEDED"})
    assert svc.get_execution(execution_id, "dev1")["result"] == {"p": {"S": "1"}}


@pytest.mark.parametrize(("body", "code"), [
    (b"not json", "InvalidJson"),
    (b"\xff", "InvalidJson"),
    (b"NaN", "InvalidJson"),
    ([], "InvalidRequest"),
    ({}, "InvalidRequest"),
    ({"status": "CREATED"}, "InvalidRequest"),
    ({"status": "DONE"}, "InvalidRequest"),
    ({"status": "SUCCEEDED", "extra": 1}, "InvalidRequest"),
    ({"status": "SUCCEEDED", "statusReason": {}}, "InvalidRequest"),
    ({"status": "FAILED", "statusReason": {"reasonCode": "lower"}}, "InvalidRequest"),
    ({"status": "FAILED", "statusReason": {"reasonCode": "X" * 65}}, "InvalidRequest"),
    ({"status": "FAILED", "statusReason": {"reasonCode": "X", "reasonDescription": "a\nb"}},
     "InvalidRequest"),
    ({"status": "FAILED", "statusReason": {"reasonCode": "X", "reasonDescription": "d" * 1025}},
     "InvalidRequest"),
    ({"status": "FAILED", "statusReason": {"reasonCode": "X", "other": "y"}}, "InvalidRequest"),
    ({"status": "SUCCEEDED", "result": {}}, "InvalidRequest"),
    ({"status": "SUCCEEDED", "result": {"a b": {"s": "x"}}}, "InvalidRequest"),
    ({"status": "SUCCEEDED", "result": {"n" * 33: {"s": "x"}}}, "InvalidRequest"),
    ({"status": "SUCCEEDED", "result": {"x": {"s": ""}}}, "InvalidRequest"),
    ({"status": "SUCCEEDED", "result": {"x": {"s": "a", "b": True}}}, "InvalidRequest"),
    ({"status": "SUCCEEDED", "result": {"x": {"b": "true"}}}, "InvalidRequest"),
    ({"status": "SUCCEEDED", "result": {"x": {"bin": "!!"}}}, "InvalidRequest"),
    ({"status": "SUCCEEDED", "result": {"x": {"n": 1}}}, "InvalidRequest"),
    ({"status": "SUCCEEDED", "deviceId": "dev2"}, "InvalidRequest"),
    ({"status": "SUCCEEDED", "deviceType": "clients"}, "InvalidRequest"),
])
def test_malformed_updates_are_rejected_and_change_nothing(svc: CommandsService, body: Any,
                                                           code: str) -> None:
    execution_id, _ = start(svc)
    rejected(svc, execution_id, body, code)
    assert svc.get_execution(execution_id, "dev1")["status"] == "CREATED"


def test_what_the_official_sdks_serialise_is_accepted(svc: CommandsService) -> None:
    execution_id, _ = start(svc)
    assert send(svc, execution_id, {"deviceType": "things", "deviceId": "dev1",
                                    "executionId": execution_id, "status": "SUCCEEDED"})[0]


def test_updates_for_unknown_or_foreign_executions(svc: CommandsService) -> None:
    execution_id, _ = start(svc)
    rejected(svc, "no-such-execution", {"status": "SUCCEEDED"}, "ResourceNotFound")
    rejected(svc, execution_id, {"status": "SUCCEEDED"}, "ResourceNotFound", thing="dev2")
    rejected(svc, "bad$id", {"status": "SUCCEEDED"}, "InvalidTopic")


def test_only_update_topics_are_answered(svc: CommandsService) -> None:
    execution_id, _ = start(svc)
    base = f"$aws/commands/things/dev1/executions/{execution_id}"
    for topic in (f"{base}/response/accepted/json", f"{base}/response/rejected/json",
                  f"{base}/request/json", f"{base}/response/cbor", "$aws/things/dev1/jobs/get"):
        assert svc.handle(topic, b"{}") == []


def test_injected_faults_hit_the_next_updates(svc: CommandsService) -> None:
    execution_id, _ = start(svc)
    svc.inject_rejections("DataConflict", 2)
    rejected(svc, execution_id, {"status": "SUCCEEDED"}, "DataConflict")
    rejected(svc, execution_id, {"status": "SUCCEEDED"}, "DataConflict")
    assert send(svc, execution_id, {"status": "SUCCEEDED"})[0]
    assert [entry[3] for entry in svc.history] == ["DataConflict", "DataConflict", None]
    assert svc.history[-1][2] == {"status": "SUCCEEDED"}
    with pytest.raises(ValueError):
        svc.inject_rejections("", 1)


def test_delete_only_ended_executions(svc: CommandsService, clock: Clock) -> None:
    execution_id, _ = start(svc, timeout=5)
    assert code_of(lambda: svc.delete_execution(execution_id, "dev1")) == "Conflict"
    assert code_of(lambda: svc.delete_execution(execution_id, "dev2")) == "ResourceNotFound"
    clock.advance(5)
    svc.tick()  # a cloud-set TIMED_OUT has ended too
    svc.delete_execution(execution_id, "dev1")
    assert code_of(lambda: svc.get_execution(execution_id, "dev1")) == "ResourceNotFound"
    rejected(svc, execution_id, {"status": "SUCCEEDED"}, "ResourceNotFound")


def test_list_executions_by_command_or_thing(svc: CommandsService, clock: Clock) -> None:
    svc.create_command("c2", payload={"content": b"x"})
    a, _ = start(svc)
    clock.advance(60)
    b, _ = start(svc, thing="dev2")
    clock.advance(60)
    c, _ = start(svc, command="c2")
    send(svc, a, {"status": "SUCCEEDED"})

    def ids(**kwargs: Any) -> list[str]:
        return [e["executionId"] for e in svc.list_executions(**kwargs)]

    assert ids(command_id="c1") == [b, a]
    assert ids(command_id="c1", sort_order="ASCENDING") == [a, b]
    assert ids(thing="dev1") == [c, a]
    assert ids(thing="dev1", status="SUCCEEDED") == [a]
    assert ids(thing="dev1", completed=(int(T0) + 100, None)) == [a]
    assert ids(thing="dev1", started=(None, int(T0) - 1)) == []
    summary = svc.list_executions(thing="dev2")[0]
    assert summary == {"executionId": b, "status": "CREATED", "createdAt": int(T0) + 60,
                       "commandId": "c1", "thing": "dev2"}
    for bad in ({}, {"command_id": "c1", "thing": "dev1"},
                {"thing": "dev1", "started": (1, None), "completed": (1, None)},
                {"thing": "dev1", "status": "DONE"}):
        assert code_of(lambda k=bad: svc.list_executions(**k)) == "InvalidRequest"
    assert code_of(lambda: svc.list_executions(command_id="ghost")) == "ResourceNotFound"


def test_time_filters_use_the_documented_format() -> None:
    assert parse_time_filter({"after": "2023-11-14T22:13"}, "f") == (1699999980, None)
    assert parse_time_filter(None, "f") is None
    for bad in ({}, {"after": "2023-11-14"}, {"around": "2023-11-14T22:13"}, "x"):
        with pytest.raises(Rejection):
            parse_time_filter(bad, "f")


# --------------------------------------------------------------------------- the state machine


class CommandsMachine(RuleBasedStateMachine):
    """Random commands, starts, device updates, time and deletions; the invariants below."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock(T0)
        self.svc = CommandsService(self.clock, thing_exists=lambda t: t in ("dev1", "dev2"))
        self.executions: dict[str, str] = {}  # id -> thing
        self.device_final: dict[str, str] = {}  # ids a device ended, with its status
        self.last: dict[str, dict[str, Any]] = {}

    @initialize()
    def commands(self) -> None:
        for name, kind in (("cj", "application/json"), ("cb", "application/cbor"), ("cx", None)):
            payload: dict[str, Any] = {"content": name.encode()}
            if kind:
                payload["contentType"] = kind
            self.svc.create_command(name, payload=payload)

    @rule(command=st.sampled_from(["cj", "cb", "cx"]), thing=st.sampled_from(["dev1", "dev2"]),
          timeout=st.integers(1, 120))
    def start(self, command: str, thing: str, timeout: int) -> None:
        execution_id, [message] = self.svc.start_execution(command, thing, timeout=timeout)
        assert message.payload == command.encode()
        assert message.message_expiry == timeout
        assert message.topic.startswith(f"$aws/commands/things/{thing}/executions/"
                                        f"{execution_id}/request")
        self.executions[execution_id] = thing

    @rule(data=st.data(), status=st.sampled_from(["IN_PROGRESS", "SUCCEEDED", "FAILED",
                                                  "REJECTED", "TIMED_OUT"]),
          reason=st.booleans())
    def update(self, data: st.DataObject, status: str, reason: bool) -> None:
        if not self.executions:
            return
        execution_id = data.draw(st.sampled_from(list(self.executions)))
        thing = self.executions[execution_id]
        before = self.svc.get_execution(execution_id, thing)
        body: dict[str, Any] = {"status": status}
        if reason:
            body["statusReason"] = {"reasonCode": "WHY"}
        accepted, _ = send(self.svc, execution_id, body, thing)
        if execution_id in self.device_final:
            assert not accepted
        elif before["status"] == "TIMED_OUT":  # by the cloud
            assert accepted == (status != "IN_PROGRESS")
        else:
            assert accepted
        if accepted and status != "IN_PROGRESS":
            self.device_final[execution_id] = status

    @rule(seconds=st.floats(0, 90))
    def wait(self, seconds: float) -> None:
        due = self.svc.next_deadline()
        self.clock.advance(seconds)
        self.svc.tick()
        if due is not None and due > self.clock.now:
            assert self.svc.next_deadline() == due  # nothing fired early

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        if not self.executions:
            return
        execution_id = data.draw(st.sampled_from(list(self.executions)))
        thing = self.executions[execution_id]
        status = self.svc.get_execution(execution_id, thing)["status"]
        try:
            self.svc.delete_execution(execution_id, thing)
        except Rejection as rejection:
            assert rejection.code == "Conflict" and status in ("CREATED", "IN_PROGRESS")
            return
        del self.executions[execution_id]
        self.device_final.pop(execution_id, None)

    @invariant()
    def consistent(self) -> None:
        for execution_id, thing in self.executions.items():
            got = self.svc.get_execution(execution_id, thing)
            if execution_id in self.device_final:
                assert got["status"] == self.device_final[execution_id]
                assert "completedAt" in got
            if got["status"] in ("CREATED", "IN_PROGRESS"):  # createdAt is truncated to int
                assert got["createdAt"] + got["executionTimeoutSeconds"] + 1 > self.clock.now
            if got.get("statusReason", {}).get("reasonCode") == NO_RESPONSE:
                assert got["status"] == "TIMED_OUT"
            previous = self.last.get(execution_id)
            if previous is not None:
                assert got["lastUpdatedAt"] >= previous["lastUpdatedAt"]
            self.last[execution_id] = got
        listed = {e["executionId"] for thing in ("dev1", "dev2")
                  for e in self.svc.list_executions(thing=thing)}
        assert listed == set(self.executions)


TestCommandsMachine = CommandsMachine.TestCase
TestCommandsMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow])
