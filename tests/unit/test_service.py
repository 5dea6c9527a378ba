"""Unit tests of the Jobs emulator's state machine (``agent.sandbox.service``).

The expected behaviour is ``jobs-mqtt-api.md`` sections 1 and 6; where AWS is silent the tests pin
the decisions documented in ``service.py``. A hypothesis state machine then drives random
device and control operations and checks the invariants that make the emulator trustworthy:
versions only grow, terminal executions never change, and every notification matches the state.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from agent.sandbox.document import dumps
from agent.sandbox.records import mqtt_execution
from agent.sandbox.service import DELETION_SECONDS, JobsService, Publish, Rejection

T0 = 1_700_000_000.6
"""A fractional start time, so that every test also proves timestamps are truncated to int."""

DOC = {"operation": "install", "package": {"name": "x", "version": "1.2"}}
TERMINAL = ("SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "CANCELED")


class Clock:
    """A settable epoch clock."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def svc(clock: Clock) -> JobsService:
    service = JobsService(clock)
    for thing in ("dev1", "dev2"):
        service.create_thing(thing)
    return service


def topic(thing: str, suffix: str) -> str:
    return f"$aws/things/{thing}/jobs/{suffix}"


def send(svc: JobsService, suffix: str, body: Any = None, thing: str = "dev1") -> list[Publish]:
    """Publish a request the way a device does: JSON bytes (``{}`` when no body)."""
    raw = body if isinstance(body, bytes) else json.dumps({} if body is None else body).encode()
    return svc.handle(topic(thing, suffix), raw)


def reply(svc: JobsService, suffix: str, body: Any = None, thing: str = "dev1") -> Publish:
    """Send a request and return only its accepted/rejected reply."""
    return send(svc, suffix, body, thing)[0]


def rejected(
    svc: JobsService, suffix: str, body: Any = None, code: str = "", thing: str = "dev1"
) -> dict[str, Any]:
    """Send a request that must be rejected (with ``code``, if given); return the payload."""
    out = reply(svc, suffix, body, thing)
    assert out.topic == topic(thing, suffix) + "/rejected", out
    if code:
        assert out.payload["code"] == code, out.payload
    return out.payload


def accepted(
    svc: JobsService, suffix: str, body: Any = None, thing: str = "dev1"
) -> dict[str, Any]:
    out = reply(svc, suffix, body, thing)
    assert out.topic == topic(thing, suffix) + "/accepted", out
    return out.payload


def control_error(code: str, fn: Any, *args: Any, **kwargs: Any) -> Rejection:
    with pytest.raises(Rejection) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value
    return info.value


def kinds(publishes: list[Publish]) -> list[str]:
    """The last topic level of each publish: accepted, rejected, notify, notify-next."""
    return [p.topic.rsplit("/", 1)[-1] for p in publishes]


def status_of(svc: JobsService, job: str, thing: str = "dev1") -> str:
    status: str = svc.execution(job, thing)["status"]
    return status


def jobs(svc: JobsService, *ids: str, thing: str = "dev1", **kwargs: Any) -> None:
    for job_id in ids:
        svc.create_job(job_id, [thing], DOC, **kwargs)


def make_status(
    svc: JobsService, job: str, status: str, thing: str = "dev1", clock: Clock | None = None
) -> None:
    """Drive an execution to ``status`` through whatever path reaches it (TIMED_OUT needs the
    service's clock)."""
    if status in ("IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED"):
        svc.update_execution(thing, job, status=status)
    elif status == "CANCELED":
        svc.cancel_job_execution(job, thing)
    elif status == "TIMED_OUT":
        svc.update_execution(thing, job, status="IN_PROGRESS", step_timeout_minutes=1)
        deadline = svc.next_deadline()
        assert deadline is not None and clock is not None
        clock.now = deadline
        svc.tick()
    assert status_of(svc, job, thing) == status


def assert_int(value: Any) -> None:
    assert type(value) is int, f"{value!r} is {type(value).__name__}, not int"


# ==================================================================== topics and payloads


@pytest.mark.parametrize(
    "raw_topic",
    [
        "$aws/things/dev1/jobs/get/accepted",
        "$aws/things/dev1/jobs/get/rejected",
        "$aws/things/dev1/jobs/start-next/accepted",
        "$aws/things/dev1/jobs/j1/get/accepted",
        "$aws/things/dev1/jobs/j1/update/rejected",
        "$aws/things/dev1/jobs/notify",
        "$aws/things/dev1/jobs/notify-next",
        "$aws/things/dev1/jobs",
        "$aws/things/dev1/shadow/get",
        "$aws/things/dev1",
        "things/dev1/jobs/get",
        "$aws/rules/x/jobs/get",
        "dev1/jobs/get",
        "",
    ],
)
def test_handle_ignores_its_own_replies_and_foreign_topics(
    svc: JobsService, raw_topic: str
) -> None:
    jobs(svc, "j1")
    assert svc.handle(raw_topic, b"{}") == []
    assert svc.history == []


@pytest.mark.parametrize(
    "suffix",
    ["bogus", "$next/update", "j1/delete", "j1/get/extra", "j1", "", "get/x", "start-next/x"],
)
def test_unknown_topic_under_jobs_is_invalid_topic(svc: JobsService, suffix: str) -> None:
    out = rejected(svc, suffix, {"clientToken": "tok"}, "InvalidTopic")
    assert out["clientToken"] == "tok"
    assert_int(out["timestamp"])
    assert svc.history[-1][1:] == ("unknown", {"code": "InvalidTopic", "message": out["message"]})


@pytest.mark.parametrize("suffix", ["get", "$next/get", "start-next", "j1/get"])
def test_an_empty_payload_is_an_empty_request(svc: JobsService, suffix: str) -> None:
    """AWS's embedded C Jobs library and its demo send these requests with no payload."""
    jobs(svc, "j1")
    out = accepted(svc, suffix, b"")
    assert "clientToken" not in out
    assert out.get("execution", {"jobId": "j1"})["jobId"] == "j1"


def test_an_empty_update_lacks_its_status(svc: JobsService) -> None:
    jobs(svc, "j1")
    assert "status is required" in rejected(svc, "j1/update", b"", "InvalidRequest")["message"]


def test_invalid_topic_wins_over_invalid_json(svc: JobsService) -> None:
    out = rejected(svc, "bogus", b"not json", "InvalidTopic")
    assert "clientToken" not in out


@pytest.mark.parametrize(
    "raw",
    [b" ", b"not json", b"\xff\xfe{}", b"[1, 2]", b'"text"', b"42", b"null", b"NaN", b'{"a": NaN}'],
)
def test_payload_must_be_a_utf8_json_object(svc: JobsService, raw: bytes) -> None:
    out = rejected(svc, "get", raw, "InvalidJson")
    assert set(out) == {"code", "message", "timestamp"}
    assert svc.history[-1][:2] == ("dev1", "get")


def test_reply_goes_to_the_request_topic_plus_accepted(svc: JobsService) -> None:
    jobs(svc, "j1")
    for suffix, body in [
        ("get", {}),
        ("j1/get", {}),
        ("$next/get", {}),
        ("start-next", {}),
        ("j1/update", {"status": "IN_PROGRESS"}),
    ]:
        out = send(svc, suffix, body)
        assert out[0].topic == topic("dev1", suffix) + "/accepted", out


def test_client_token_is_echoed_verbatim_in_accepted(svc: JobsService) -> None:
    token = "ÿ-token with spaces/and+symbols#"
    assert accepted(svc, "get", {"clientToken": token})["clientToken"] == token
    assert "clientToken" not in accepted(svc, "get", {})


@pytest.mark.parametrize(
    ("suffix", "body", "code"),
    [
        ("get", {"bogus": 1}, "InvalidRequest"),
        ("j9/get", {}, "ResourceNotFound"),
        ("j1/update", {"status": "IN_PROGRESS", "expectedVersion": 7}, "VersionMismatch"),
        ("j0/update", {"status": "FAILED"}, "InvalidStateTransition"),
        ("nope", {}, "InvalidTopic"),
    ],
)
def test_client_token_is_echoed_in_every_rejection(
    svc: JobsService, suffix: str, body: dict[str, Any], code: str
) -> None:
    jobs(svc, "j0", "j1")
    make_status(svc, "j0", "SUCCEEDED")
    out = rejected(svc, suffix, body | {"clientToken": "c-1"}, code)
    assert out["clientToken"] == "c-1"
    assert_int(out["timestamp"])


def test_client_token_is_echoed_in_injected_rejections(svc: JobsService) -> None:
    svc.inject_rejections("RequestThrottled", 1)
    out = rejected(svc, "get", {"clientToken": "c-2"}, "RequestThrottled")
    assert out["clientToken"] == "c-2"


def test_non_string_client_token_is_echoed_and_rejected(svc: JobsService) -> None:
    out = rejected(svc, "get", {"clientToken": 17}, "InvalidRequest")
    assert out["clientToken"] == 17
    assert "clientToken" in out["message"]


def test_every_timestamp_is_an_integer_number_of_seconds(svc: JobsService, clock: Clock) -> None:
    publishes = svc.create_job("j1", ["dev1"], DOC)
    publishes += svc.create_job("j2", ["dev1"], DOC)
    publishes += send(svc, "get", {})
    publishes += send(svc, "start-next", {})
    publishes += send(svc, "j1/update", {"status": "SUCCEEDED", "includeJobExecutionState": True})
    publishes += send(svc, "j1/update", {"status": "SUCCEEDED"})
    publishes += send(svc, "j2/get", {})
    assert {p.topic.rsplit("/", 1)[-1] for p in publishes} >= {
        "accepted",
        "rejected",
        "notify",
        "notify-next",
    }

    def walk(value: Any, key: str = "") -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, k)
        elif isinstance(value, list):
            for v in value:
                walk(v, key)
        elif key in ("timestamp", "queuedAt", "startedAt", "lastUpdatedAt"):
            assert_int(value)
            assert value == int(clock.now)
        elif key in ("versionNumber", "executionNumber"):
            assert_int(value)

    for publish in publishes:
        assert_int(publish.payload["timestamp"])
        walk(publish.payload)
        json.loads(dumps(publish.payload))  # the front must be able to serialise it


# ==================================================================== request validation

LONG_KEY = "k" * 129
OK_VALUE = "v" * 1024


@pytest.mark.parametrize(
    ("suffix", "body", "field"),
    [
        ("get", {"statusDetails": {}}, "statusDetails"),
        ("get", {"jobId": "j1"}, "jobId"),
        ("start-next", {"statusDetails": "x"}, "statusDetails"),
        ("start-next", {"statusDetails": ["a"]}, "statusDetails"),
        ("start-next", {"statusDetails": None}, "statusDetails"),
        ("start-next", {"statusDetails": {"a b": "v"}}, "statusDetails"),
        ("start-next", {"statusDetails": {"": "v"}}, "statusDetails"),
        ("start-next", {"statusDetails": {LONG_KEY: "v"}}, "statusDetails"),
        ("start-next", {"statusDetails": {"k.x": "v"}}, "statusDetails"),
        ("start-next", {"statusDetails": {"k": 1}}, "statusDetails"),
        ("start-next", {"statusDetails": {"k": None}}, "statusDetails"),
        ("start-next", {"statusDetails": {"k": {"n": "v"}}}, "statusDetails"),
        ("start-next", {"statusDetails": {"k": ""}}, "statusDetails"),
        ("start-next", {"statusDetails": {"k": "v" * 1025}}, "statusDetails"),
        ("start-next", {"statusDetails": {"k": "line\nbreak"}}, "statusDetails"),
        ("start-next", {"statusDetails": {"k": "tab\t"}}, "statusDetails"),
        ("start-next", {"statusDetails": {"k": "zero\u200bwidth"}}, "statusDetails"),
        ("start-next", {"statusDetails": {"k": "nul\x00"}}, "statusDetails"),
        ("start-next", {"stepTimeoutInMinutes": 0}, "stepTimeoutInMinutes"),
        ("start-next", {"stepTimeoutInMinutes": -2}, "stepTimeoutInMinutes"),
        ("start-next", {"stepTimeoutInMinutes": 10081}, "stepTimeoutInMinutes"),
        ("start-next", {"stepTimeoutInMinutes": 1.5}, "stepTimeoutInMinutes"),
        ("start-next", {"stepTimeoutInMinutes": 5.0}, "stepTimeoutInMinutes"),
        ("start-next", {"stepTimeoutInMinutes": True}, "stepTimeoutInMinutes"),
        ("start-next", {"stepTimeoutInMinutes": "5"}, "stepTimeoutInMinutes"),
        ("start-next", {"status": "IN_PROGRESS"}, "status"),
        ("j1/get", {"executionNumber": True}, "executionNumber"),
        ("j1/get", {"executionNumber": "1"}, "executionNumber"),
        ("j1/get", {"executionNumber": 1.0}, "executionNumber"),
        ("j1/get", {"includeJobDocument": 1}, "includeJobDocument"),
        ("j1/get", {"includeJobDocument": "true"}, "includeJobDocument"),
        ("j1/get", {"includeJobDocument": None}, "includeJobDocument"),
        ("j1/get", {"status": "IN_PROGRESS"}, "status"),
        ("$next/get", {"includeJobDocument": 0}, "includeJobDocument"),
        ("j1/update", {}, "status"),
        ("j1/update", {"status": None}, "status"),
        ("j1/update", {"status": "QUEUED"}, "status"),
        ("j1/update", {"status": "TIMED_OUT"}, "status"),
        ("j1/update", {"status": "CANCELED"}, "status"),
        ("j1/update", {"status": "REMOVED"}, "status"),
        ("j1/update", {"status": "in_progress"}, "status"),
        ("j1/update", {"status": 1}, "status"),
        ("j1/update", {"status": "IN_PROGRESS", "expectedVersion": "1.0"}, "expectedVersion"),
        ("j1/update", {"status": "IN_PROGRESS", "expectedVersion": "one"}, "expectedVersion"),
        ("j1/update", {"status": "IN_PROGRESS", "clientToken": "t" * 65}, "clientToken"),
        ("j1/update", {"status": "IN_PROGRESS", "expectedVersion": True}, "expectedVersion"),
        ("j1/update", {"status": "IN_PROGRESS", "expectedVersion": 1.0}, "expectedVersion"),
        ("j1/update", {"status": "IN_PROGRESS", "expectedVersion": 2**63}, "expectedVersion"),
        ("j1/update", {"status": "IN_PROGRESS", "executionNumber": False}, "executionNumber"),
        ("j1/update", {"status": "IN_PROGRESS", "stepTimeoutInMinutes": 0}, "stepTimeoutIn"),
        ("j1/update", {"status": "IN_PROGRESS", "statusDetails": {"k": 2}}, "statusDetails"),
        (
            "j1/update",
            {"status": "IN_PROGRESS", "includeJobExecutionState": "yes"},
            "includeJobExecutionState",
        ),
        ("j1/update", {"status": "IN_PROGRESS", "includeJobDocument": 1}, "includeJobDocument"),
        ("j1/update", {"status": "IN_PROGRESS", "status_details": {}}, "status_details"),
        ("j1/update", {"status": "IN_PROGRESS", "clientToken": None}, "clientToken"),
        ("bad.job/get", {}, "jobId"),
        ("bad.job/update", {"status": "IN_PROGRESS"}, "jobId"),
        (f"{'j' * 65}/get", {}, "jobId"),
        ("$prev/get", {}, "jobId"),
    ],
)
def test_malformed_requests_are_invalid_request_naming_the_field(
    svc: JobsService, suffix: str, body: dict[str, Any], field: str
) -> None:
    jobs(svc, "j1")
    before = svc.executions_for_thing("dev1")
    request = {"clientToken": "t"} | body
    out = rejected(svc, suffix, request, "InvalidRequest")
    assert field in out["message"]
    assert out["clientToken"] == request["clientToken"]  # echoed verbatim, even null
    assert "executionState" not in out
    assert svc.executions_for_thing("dev1") == before


@pytest.mark.parametrize("thing", ["bad.name", "a b", "x" * 129, "ü"])
def test_malformed_thing_name_in_topic_is_invalid_request(svc: JobsService, thing: str) -> None:
    assert "thingName" in rejected(svc, "get", {}, "InvalidRequest", thing=thing)["message"]


@pytest.mark.parametrize(
    "details",
    [
        {"k": OK_VALUE},
        {"K:x_y-z": "ünïcødé ✓ and spaces"},
        {"k" * 128: "v"},
        {f"k{i}": "v" for i in range(30)},
        {},
    ],
)
def test_valid_status_details_are_accepted(svc: JobsService, details: dict[str, str]) -> None:
    jobs(svc, "j1")
    out = accepted(svc, "start-next", {"statusDetails": details})
    assert out["execution"].get("statusDetails", {}) == details
    assert ("statusDetails" in out["execution"]) == bool(details)  # none: no key over MQTT


@pytest.mark.parametrize("minutes", [1, 10080])
def test_step_timeout_bounds_are_accepted(svc: JobsService, minutes: int) -> None:
    jobs(svc, "j1")
    accepted(svc, "start-next", {"stepTimeoutInMinutes": minutes})
    accepted(svc, "j1/update", {"status": "IN_PROGRESS", "stepTimeoutInMinutes": minutes})


def test_only_update_may_cancel_the_step_timer_with_minus_one(svc: JobsService) -> None:
    jobs(svc, "j1")
    out = rejected(svc, "start-next", {"stepTimeoutInMinutes": -1}, "InvalidRequest")
    assert "stepTimeoutInMinutes must be 1-10080, not -1" in out["message"]
    assert status_of(svc, "j1") == "QUEUED"
    accepted(svc, "j1/update", {"status": "IN_PROGRESS", "stepTimeoutInMinutes": -1})


def test_client_token_of_64_characters_is_the_longest(svc: JobsService) -> None:
    assert accepted(svc, "get", {"clientToken": "t" * 64})["clientToken"] == "t" * 64
    out = rejected(svc, "get", {"clientToken": "t" * 65}, "InvalidRequest")
    assert out["clientToken"] == "t" * 65  # still echoed, so the client can correlate it


@pytest.mark.parametrize(("given", "ok"), [("2", True), ("3", False), (2, True), ("02", True)])
def test_expected_version_may_be_a_numeric_string(svc: JobsService, given: Any,
                                                  ok: bool) -> None:
    """AWS's embedded C Jobs library sends ``"expectedVersion":"2"`` (``Jobs_UpdateMsg``)."""
    jobs(svc, "j1")
    svc.start_next("dev1")
    out = reply(svc, "j1/update", {"status": "SUCCEEDED", "expectedVersion": given})
    assert out.topic.endswith("/accepted" if ok else "/rejected"), out
    if not ok:
        assert out.payload["code"] == "VersionMismatch"


def test_direct_device_calls_validate_like_mqtt(svc: JobsService) -> None:
    jobs(svc, "j1")
    cases: list[tuple[Any, str]] = [
        (lambda: svc.start_next("dev1", status_details={"k": ""}), "statusDetails"),
        (lambda: svc.start_next("dev1", step_timeout_minutes=True), "stepTimeoutInMinutes"),
        (
            lambda: svc.describe_execution("dev1", "j1", include_job_document=1),  # type: ignore[arg-type]
            "includeJob",
        ),
        (lambda: svc.describe_execution("dev1", "j 1"), "jobId"),
        (lambda: svc.update_execution("dev1", "j1", status="QUEUED"), "status"),
        (lambda: svc.update_execution("dev1", "$next", status="SUCCEEDED"), "jobId"),
        (lambda: svc.get_pending("dev/1"), "thingName"),
    ]
    for call, field in cases:
        error = control_error("InvalidRequest", call)
        assert field in error.message
        assert error.execution_state is None


def test_device_requests_for_an_unknown_thing_are_resource_not_found(svc: JobsService) -> None:
    for suffix, body in [
        ("get", {}),
        ("start-next", {}),
        ("j1/get", {}),
        ("$next/get", {}),
        ("j1/update", {"status": "IN_PROGRESS"}),
    ]:
        out = rejected(svc, suffix, body, "ResourceNotFound", thing="ghost")
        assert "ghost" in out["message"]


# ==================================================================== get / start-next / describe


def test_get_pending_lists_in_progress_first_then_queued_in_creation_order(
    svc: JobsService,
) -> None:
    jobs(svc, "j1", "j2", "j3", "j4")  # same second: creation order must break the tie
    assert accepted(svc, "get") == {
        "inProgressJobs": [],
        "queuedJobs": [
            {
                "jobId": j,
                "queuedAt": int(T0),
                "lastUpdatedAt": int(T0),
                "versionNumber": 1,
                "executionNumber": 1,
            }
            for j in ("j1", "j2", "j3", "j4")
        ],
        "timestamp": int(T0),
    }
    svc.update_execution("dev1", "j3", status="IN_PROGRESS")
    svc.update_execution("dev1", "j2", status="IN_PROGRESS")
    out = svc.get_pending("dev1")
    assert [s["jobId"] for s in out["inProgressJobs"]] == ["j2", "j3"]
    assert [s["jobId"] for s in out["queuedJobs"]] == ["j1", "j4"]
    assert "startedAt" in out["inProgressJobs"][0]
    assert all("startedAt" not in s for s in out["queuedJobs"])


def test_get_pending_is_empty_lists_with_nothing_pending(svc: JobsService) -> None:
    assert svc.get_pending("dev1") == {"inProgressJobs": [], "queuedJobs": []}
    jobs(svc, "j1")
    make_status(svc, "j1", "SUCCEEDED")
    assert svc.get_pending("dev1") == {"inProgressJobs": [], "queuedJobs": []}


def test_get_pending_and_notify_list_at_most_ten(svc: JobsService) -> None:
    for i in range(12):
        publishes = svc.create_job(f"j{i:02}", ["dev1"], DOC)
    notify = publishes[0].payload["jobs"]
    assert [s["jobId"] for s in notify["QUEUED"]] == [f"j{i:02}" for i in range(10)]
    svc.update_execution("dev1", "j11", status="IN_PROGRESS")
    svc.update_execution("dev1", "j10", status="IN_PROGRESS")
    out = svc.get_pending("dev1")
    assert [s["jobId"] for s in out["inProgressJobs"]] == ["j10", "j11"]
    assert [s["jobId"] for s in out["queuedJobs"]] == [f"j{i:02}" for i in range(8)]
    publishes = svc.create_job("j12", ["dev1"], DOC)
    assert kinds(publishes) == ["notify"]  # set changed, though the 11th+ are not listed
    listed = publishes[0].payload["jobs"]
    assert len(listed["IN_PROGRESS"]) + len(listed["QUEUED"]) == 10


def test_start_next_with_nothing_pending_has_no_execution_key(svc: JobsService) -> None:
    out = accepted(svc, "start-next", {"clientToken": "a", "stepTimeoutInMinutes": 5})
    assert out == {"timestamp": int(T0), "clientToken": "a"}
    assert svc.next_deadline() is None


def test_start_next_claims_the_queued_head(svc: JobsService, clock: Clock) -> None:
    jobs(svc, "j1", "j2")
    clock.advance(30)
    out = accepted(svc, "start-next", {"statusDetails": {"step": "download"}})
    assert out["execution"] == {
        "jobId": "j1",
        "status": "IN_PROGRESS",
        "statusDetails": {"step": "download"},
        "queuedAt": int(T0),
        "startedAt": int(T0) + 30,
        "lastUpdatedAt": int(T0) + 30,
        "versionNumber": 2,
        "executionNumber": 1,
        "jobDocument": DOC,
    }
    assert "approximateSecondsBeforeTimedOut" not in out["execution"]
    assert svc.execution("j1", "dev1") == out["execution"] | {"thingName": "dev1"}


def test_executions_carry_no_thing_name_over_mqtt_and_no_empty_status_details(
        svc: JobsService) -> None:
    """As AWS's captures show; the HTTP data plane's execution keeps thingName (boto3's shape)."""
    jobs(svc, "j1")
    over_http = svc.start_next("dev1")[0]["execution"]
    over_mqtt = accepted(svc, "j1/get")["execution"]
    notify_next = send(svc, "j1/update", {"status": "SUCCEEDED"})[-1].payload
    jobs(svc, "j2")

    assert over_http["thingName"] == "dev1"
    assert "statusDetails" not in over_http
    assert "thingName" not in over_mqtt and "statusDetails" not in over_mqtt
    assert {k: v for k, v in over_http.items() if k != "thingName"} == over_mqtt
    assert notify_next == {"timestamp": int(T0)}
    head = send(svc, "j2/get")[0].payload["execution"]
    assert "thingName" not in head and "statusDetails" not in head
    assert svc.execution("j1", "dev1")["statusDetails"] == {}  # the Python API: always there


def test_start_next_returns_an_in_progress_head_unchanged(svc: JobsService, clock: Clock) -> None:
    jobs(svc, "j1", "j2")
    first = svc.start_next("dev1", status_details={"a": "1"})[0]["execution"]
    clock.advance(10)
    again, publishes = svc.start_next("dev1", status_details={"b": "2"})
    assert again["execution"] == first
    assert publishes == []
    assert svc.execution("j1", "dev1")["versionNumber"] == 2


def test_start_next_applies_a_step_timeout_to_an_in_progress_head(
    svc: JobsService, clock: Clock
) -> None:
    jobs(svc, "j1")
    svc.start_next("dev1")
    assert svc.next_deadline() is None
    clock.advance(100)
    svc.start_next("dev1", step_timeout_minutes=3)
    assert svc.next_deadline() == int(T0) + 100 + 180
    assert svc.execution("j1", "dev1")["versionNumber"] == 2


def test_start_next_prefers_an_in_progress_execution_over_older_queued(svc: JobsService) -> None:
    jobs(svc, "j1", "j2")
    svc.update_execution("dev1", "j2", status="IN_PROGRESS", status_details={"x": "y"})
    out = svc.start_next("dev1")[0]["execution"]
    assert (out["jobId"], out["status"], out["statusDetails"]) == ("j2", "IN_PROGRESS", {"x": "y"})
    assert status_of(svc, "j1") == "QUEUED"


def test_describe_execution(svc: JobsService) -> None:
    jobs(svc, "j1")
    out = accepted(svc, "j1/get", {"clientToken": "d"})
    assert out["execution"]["jobDocument"] == DOC  # includeJobDocument defaults to true
    assert "startedAt" not in out["execution"]
    assert out["execution"]["status"] == "QUEUED"
    out = accepted(svc, "j1/get", {"includeJobDocument": False, "executionNumber": 1})
    assert "jobDocument" not in out["execution"]
    assert svc.describe_execution("dev1", "j1", include_job_document=False) == {
        "execution": out["execution"] | {"thingName": "dev1"}
    }
    rejected(svc, "j1/get", {"executionNumber": 2}, "ResourceNotFound")
    rejected(svc, "j2/get", {}, "ResourceNotFound")
    rejected(svc, "j1/get", {}, "ResourceNotFound", thing="dev2")


@pytest.mark.parametrize("status", TERMINAL)
def test_describe_returns_terminal_executions_normally(
    svc: JobsService, clock: Clock, status: str
) -> None:
    jobs(svc, "j1")
    make_status(svc, "j1", status, clock=clock)
    out = accepted(svc, "j1/get")
    assert out["execution"]["status"] == status


def test_describe_next_is_the_head_or_empty(svc: JobsService) -> None:
    assert accepted(svc, "$next/get", {"clientToken": "n"}) == {
        "timestamp": int(T0),
        "clientToken": "n",
    }
    jobs(svc, "j1", "j2")
    assert accepted(svc, "$next/get")["execution"]["jobId"] == "j1"
    svc.update_execution("dev1", "j2", status="IN_PROGRESS")
    head = accepted(svc, "$next/get", {"includeJobDocument": False, "executionNumber": 99})
    assert head["execution"]["jobId"] == "j2"
    assert "jobDocument" not in head["execution"]
    assert svc.describe_execution("dev1", "$next")["execution"]["jobDocument"] == DOC


# ==================================================================== update


@pytest.mark.parametrize("start", ["QUEUED", "IN_PROGRESS"])
@pytest.mark.parametrize("target", ["IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED"])
def test_update_from_a_pending_state(
    svc: JobsService, clock: Clock, start: str, target: str
) -> None:
    jobs(svc, "j1")
    if start == "IN_PROGRESS":
        make_status(svc, "j1", "IN_PROGRESS")
    version = svc.execution("j1", "dev1")["versionNumber"]
    clock.advance(5)
    out = accepted(svc, "j1/update", {"status": target, "includeJobExecutionState": True})
    assert out["executionState"] == {
        "status": target,
        "statusDetails": {},
        "versionNumber": version + 1,
    }
    record = svc.execution("j1", "dev1")
    assert record["lastUpdatedAt"] == int(clock.now)
    if start == "QUEUED" and target != "IN_PROGRESS":
        assert "startedAt" not in record  # finished without ever starting
    else:
        assert "startedAt" in record


@pytest.mark.parametrize("terminal", TERMINAL)
@pytest.mark.parametrize("target", ["IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED"])
def test_update_from_a_terminal_state_is_invalid_state_transition(
    svc: JobsService, clock: Clock, terminal: str, target: str
) -> None:
    jobs(svc, "j1")
    make_status(svc, "j1", terminal, clock=clock)
    before = svc.execution("j1", "dev1")
    out = rejected(svc, "j1/update", {"status": target}, "InvalidStateTransition")
    assert out["executionState"] == {
        "status": terminal,
        "statusDetails": before["statusDetails"],
        "versionNumber": before["versionNumber"],
    }
    assert svc.execution("j1", "dev1") == before


def test_update_version_check(svc: JobsService) -> None:
    jobs(svc, "j1")
    out = rejected(
        svc, "j1/update", {"status": "IN_PROGRESS", "expectedVersion": 2}, "VersionMismatch"
    )
    assert out["executionState"] == {"status": "QUEUED", "statusDetails": {}, "versionNumber": 1}
    accepted(svc, "j1/update", {"status": "IN_PROGRESS", "expectedVersion": 1})
    accepted(svc, "j1/update", {"status": "IN_PROGRESS", "expectedVersion": 2})
    accepted(svc, "j1/update", {"status": "SUCCEEDED", "expectedVersion": 3})
    # On a terminal execution the version is checked before the transition.
    out = rejected(svc, "j1/update", {"status": "FAILED", "expectedVersion": 1}, "VersionMismatch")
    assert out["executionState"]["status"] == "SUCCEEDED"
    rejected(svc, "j1/update", {"status": "FAILED", "expectedVersion": 4}, "InvalidStateTransition")


def test_every_accepted_update_bumps_the_version(svc: JobsService) -> None:
    jobs(svc, "j1")
    versions = [svc.execution("j1", "dev1")["versionNumber"]]
    svc.start_next("dev1")
    versions.append(svc.execution("j1", "dev1")["versionNumber"])
    for progress in ("10", "50", "90"):
        svc.update_execution("dev1", "j1", status="IN_PROGRESS", status_details={"p": progress})
        versions.append(svc.execution("j1", "dev1")["versionNumber"])
    svc.update_execution("dev1", "j1", status="SUCCEEDED")
    versions.append(svc.execution("j1", "dev1")["versionNumber"])
    assert versions == [1, 2, 3, 4, 5, 6]


def test_status_details_are_kept_when_omitted_and_replaced_when_given(svc: JobsService) -> None:
    jobs(svc, "j1")
    svc.start_next("dev1", status_details={"a": "1", "b": "2"})
    svc.update_execution("dev1", "j1", status="IN_PROGRESS")
    assert svc.execution("j1", "dev1")["statusDetails"] == {"a": "1", "b": "2"}
    svc.update_execution("dev1", "j1", status="IN_PROGRESS", status_details={"c": "3"})
    assert svc.execution("j1", "dev1")["statusDetails"] == {"c": "3"}
    svc.update_execution("dev1", "j1", status="SUCCEEDED", status_details={})
    assert svc.execution("j1", "dev1")["statusDetails"] == {}


def test_update_response_includes_only_what_was_asked(svc: JobsService) -> None:
    jobs(svc, "j1")
    assert accepted(svc, "j1/update", {"status": "IN_PROGRESS"}) == {"timestamp": int(T0)}
    out = accepted(svc, "j1/update", {"status": "IN_PROGRESS", "includeJobDocument": True})
    assert out == {"jobDocument": DOC, "timestamp": int(T0)}
    response, _ = svc.update_execution(
        "dev1",
        "j1",
        status="IN_PROGRESS",
        include_job_execution_state=True,
        include_job_document=True,
    )
    assert response == {
        "executionState": {"status": "IN_PROGRESS", "statusDetails": {}, "versionNumber": 4},
        "jobDocument": DOC,
    }


def test_update_execution_number_must_be_the_existing_one(svc: JobsService) -> None:
    jobs(svc, "j1")
    rejected(svc, "j1/update", {"status": "IN_PROGRESS", "executionNumber": 2}, "ResourceNotFound")
    rejected(svc, "j1/update", {"status": "IN_PROGRESS", "executionNumber": 0}, "ResourceNotFound")
    accepted(svc, "j1/update", {"status": "IN_PROGRESS", "executionNumber": 1})


def test_update_of_an_unknown_or_deleted_execution_is_resource_not_found(svc: JobsService) -> None:
    rejected(svc, "j1/update", {"status": "IN_PROGRESS"}, "ResourceNotFound")
    jobs(svc, "j1")
    rejected(svc, "j1/update", {"status": "IN_PROGRESS"}, "ResourceNotFound", thing="dev2")
    svc.delete_job("j1", force=True)
    out = rejected(svc, "j1/update", {"status": "IN_PROGRESS"}, "ResourceNotFound")
    assert "executionState" not in out


# ==================================================================== notifications


def notify_jobs(publish: Publish) -> dict[str, list[str]]:
    assert publish.topic.endswith("/notify")
    return {
        status: [s["jobId"] for s in items] for status, items in publish.payload["jobs"].items()
    }


def test_new_job_on_an_empty_thing_sends_notify_then_notify_next(svc: JobsService) -> None:
    publishes = svc.create_job("j1", ["dev1"], DOC)
    assert [p.topic for p in publishes] == [topic("dev1", "notify"), topic("dev1", "notify-next")]
    notify, notify_next = publishes
    summary = {
        "jobId": "j1",
        "queuedAt": int(T0),
        "lastUpdatedAt": int(T0),
        "versionNumber": 1,
        "executionNumber": 1,
    }
    assert notify.payload == {"timestamp": int(T0), "jobs": {"QUEUED": [summary]}}
    assert notify_next.payload == {
        "timestamp": int(T0),
        "execution": summary | {"status": "QUEUED", "jobDocument": DOC},
    }


def test_second_queued_job_sends_notify_only(svc: JobsService) -> None:
    jobs(svc, "j1")
    publishes = svc.create_job("j2", ["dev1"], DOC)
    assert kinds(publishes) == ["notify"]
    assert notify_jobs(publishes[0]) == {"QUEUED": ["j1", "j2"]}


def test_start_next_of_the_head_sends_no_notification(svc: JobsService) -> None:
    jobs(svc, "j1", "j2")
    assert kinds(send(svc, "start-next")) == ["accepted"]


def test_progress_update_of_the_head_sends_no_notification(svc: JobsService) -> None:
    jobs(svc, "j1")
    svc.start_next("dev1")
    out = send(svc, "j1/update", {"status": "IN_PROGRESS", "statusDetails": {"p": "5"}})
    assert kinds(out) == ["accepted"]


def test_head_done_with_another_queued_sends_both(svc: JobsService) -> None:
    jobs(svc, "j1", "j2")
    svc.start_next("dev1")
    out = send(svc, "j1/update", {"status": "SUCCEEDED"})
    assert kinds(out) == ["accepted", "notify", "notify-next"]
    assert notify_jobs(out[1]) == {"QUEUED": ["j2"]}
    assert out[2].payload["execution"]["jobId"] == "j2"
    assert out[2].payload["execution"]["jobDocument"] == DOC


def test_last_one_done_sends_empty_notify_and_bare_notify_next(
    svc: JobsService, clock: Clock
) -> None:
    jobs(svc, "j1")
    svc.start_next("dev1")
    clock.advance(60)
    out = send(svc, "j1/update", {"status": "FAILED"})
    assert kinds(out) == ["accepted", "notify", "notify-next"]
    assert out[1].payload == {"timestamp": int(T0) + 60, "jobs": {}}
    assert out[2].payload == {"timestamp": int(T0) + 60}


def test_non_head_done_sends_notify_only(svc: JobsService) -> None:
    jobs(svc, "j1", "j2")
    out = send(svc, "j2/update", {"status": "REJECTED"})
    assert kinds(out) == ["accepted", "notify"]
    assert notify_jobs(out[1]) == {"QUEUED": ["j1"]}


def test_non_head_starting_becomes_head_and_sends_notify_next_only(svc: JobsService) -> None:
    jobs(svc, "j1", "j2")
    out = send(svc, "j2/update", {"status": "IN_PROGRESS"})
    assert kinds(out) == ["accepted", "notify-next"]
    assert out[1].payload["execution"]["jobId"] == "j2"
    assert out[1].payload["execution"]["status"] == "IN_PROGRESS"
    # Among IN_PROGRESS executions the older one leads, so starting j1 moves the head back.
    out = send(svc, "j1/update", {"status": "IN_PROGRESS"})
    assert kinds(out) == ["accepted", "notify-next"]
    assert out[1].payload["execution"]["jobId"] == "j1"
    # A newer one starting behind the head changes neither the set nor the head.
    jobs(svc, "j3")
    assert kinds(send(svc, "j3/update", {"status": "IN_PROGRESS"})) == ["accepted"]


def test_notify_lists_in_progress_before_queued(svc: JobsService) -> None:
    jobs(svc, "j1", "j2", "j3")
    svc.start_next("dev1")
    out = svc.create_job("j4", ["dev1"], DOC)
    assert notify_jobs(out[0]) == {"IN_PROGRESS": ["j1"], "QUEUED": ["j2", "j3", "j4"]}
    assert "status" not in out[0].payload["jobs"]["IN_PROGRESS"][0]
    assert "startedAt" in out[0].payload["jobs"]["IN_PROGRESS"][0]
    assert "startedAt" not in out[0].payload["jobs"]["QUEUED"][0]


def test_rejected_requests_send_no_notification(svc: JobsService) -> None:
    jobs(svc, "j1")
    make_status(svc, "j1", "SUCCEEDED")
    assert kinds(send(svc, "j1/update", {"status": "FAILED"})) == ["rejected"]


def test_control_plane_mutations_notify_each_affected_thing(svc: JobsService) -> None:
    out = svc.create_job("j1", ["dev1", "dev2", "dev1"], DOC)
    assert [p.topic for p in out] == [
        topic("dev1", "notify"),
        topic("dev1", "notify-next"),
        topic("dev2", "notify"),
        topic("dev2", "notify-next"),
    ]
    svc.create_job("j2", ["dev1"], DOC)
    out = svc.cancel_job("j1")
    assert [p.topic for p in out] == [
        topic("dev1", "notify"),
        topic("dev1", "notify-next"),
        topic("dev2", "notify"),
        topic("dev2", "notify-next"),
    ]
    assert out[1].payload["execution"]["jobId"] == "j2"
    assert out[3].payload == {"timestamp": int(T0)}
    out = svc.delete_job("j2", force=True)
    assert [p.payload for p in out] == [{"timestamp": int(T0), "jobs": {}}, {"timestamp": int(T0)}]


def test_control_changes_that_leave_pending_lists_alone_send_nothing(svc: JobsService) -> None:
    jobs(svc, "j1", "j2")
    make_status(svc, "j1", "SUCCEEDED")
    assert svc.delete_job_execution("j1", "dev1", 1) == []
    svc.start_next("dev1")
    assert svc.cancel_job("j2") == []  # its only execution runs on (no force)


# ==================================================================== timers


def test_step_timeout_times_the_execution_out(svc: JobsService, clock: Clock) -> None:
    jobs(svc, "j1", "j2")
    svc.start_next("dev1", step_timeout_minutes=2)
    deadline = int(T0) + 120
    assert svc.next_deadline() == deadline
    clock.now = deadline - 0.5
    assert svc.tick() == []
    clock.now = deadline
    out = svc.tick()
    assert kinds(out) == ["notify", "notify-next"]
    assert out[1].payload["execution"]["jobId"] == "j2"
    record = svc.execution("j1", "dev1")
    assert (record["status"], record["versionNumber"]) == ("TIMED_OUT", 3)
    assert record["lastUpdatedAt"] == deadline
    assert svc.next_deadline() is None
    assert svc.tick() == []
    rejected(svc, "j1/update", {"status": "SUCCEEDED"}, "InvalidStateTransition")


def test_a_late_tick_still_times_out(svc: JobsService, clock: Clock) -> None:
    jobs(svc, "j1")
    svc.start_next("dev1", step_timeout_minutes=1)
    clock.advance(3600.9)
    assert kinds(svc.tick()) == ["notify", "notify-next"]
    assert svc.execution("j1", "dev1")["lastUpdatedAt"] == int(clock.now)


def test_step_timer_reset_cancel_and_clear(svc: JobsService, clock: Clock) -> None:
    jobs(svc, "j1")
    svc.update_execution("dev1", "j1", status="IN_PROGRESS", step_timeout_minutes=5)
    assert svc.next_deadline() == int(T0) + 300
    clock.advance(200)
    svc.update_execution("dev1", "j1", status="IN_PROGRESS")  # no value: timer unchanged
    assert svc.next_deadline() == int(T0) + 300
    svc.update_execution("dev1", "j1", status="IN_PROGRESS", step_timeout_minutes=10)
    assert svc.next_deadline() == int(T0) + 200 + 600  # a new value restarts it
    svc.update_execution("dev1", "j1", status="IN_PROGRESS", step_timeout_minutes=-1)
    assert svc.next_deadline() is None
    clock.advance(10_000)
    assert svc.tick() == []
    svc.update_execution("dev1", "j1", status="IN_PROGRESS", step_timeout_minutes=1)
    svc.update_execution("dev1", "j1", status="SUCCEEDED", step_timeout_minutes=1)
    assert svc.next_deadline() is None  # a terminal status ends the timer


def test_step_timeout_on_a_queued_to_terminal_update_sets_nothing(svc: JobsService) -> None:
    jobs(svc, "j1")
    svc.update_execution("dev1", "j1", status="FAILED", step_timeout_minutes=3)
    assert svc.next_deadline() is None


def test_job_in_progress_timeout_counts_from_start(svc: JobsService, clock: Clock) -> None:
    jobs(svc, "j1", in_progress_timeout_minutes=10)
    clock.advance(3600)
    assert svc.next_deadline() is None  # QUEUED executions never time out
    assert svc.tick() == []
    svc.start_next("dev1")
    started = int(clock.now)
    assert svc.next_deadline() == started + 600
    svc.update_execution("dev1", "j1", status="IN_PROGRESS", step_timeout_minutes=3)
    assert svc.next_deadline() == started + 180  # the earlier of the two
    svc.update_execution("dev1", "j1", status="IN_PROGRESS", step_timeout_minutes=30)
    assert svc.next_deadline() == started + 600  # the job limit still applies
    clock.now = started + 600
    assert kinds(svc.tick()) == ["notify", "notify-next"]
    assert status_of(svc, "j1") == "TIMED_OUT"
    assert svc.describe_job("j1")["jobProcessDetails"]["numberOfTimedOutThings"] == 1


def test_tick_times_out_several_things_at_once(svc: JobsService, clock: Clock) -> None:
    svc.create_job("j1", ["dev1", "dev2"], DOC, in_progress_timeout_minutes=1)
    svc.start_next("dev1")
    svc.start_next("dev2")
    clock.advance(60)
    out = svc.tick()
    assert [p.topic for p in out] == [
        topic("dev1", "notify"),
        topic("dev1", "notify-next"),
        topic("dev2", "notify"),
        topic("dev2", "notify-next"),
    ]
    assert svc.describe_job("j1")["status"] == "COMPLETED"


# ==================================================================== control plane


def test_create_thing_is_idempotent_and_validated(svc: JobsService) -> None:
    svc.create_job("j1", ["dev1"], DOC)
    svc.create_thing("dev1")
    assert status_of(svc, "j1") == "QUEUED"
    svc.create_thing("a:b_c-D9")
    for bad in ("", "a/b", "x" * 129, "a b"):
        control_error("InvalidRequest", svc.create_thing, bad)


def test_create_job_records_everything(svc: JobsService, clock: Clock) -> None:
    document = {"nested": {"list": [1, 2.5, None, True]}}
    svc.create_job(
        "job-1_A", ["dev2", "dev1"], document, in_progress_timeout_minutes=5, description="d"
    )
    document["nested"]["list"].clear()  # the service keeps its own copy
    assert svc.describe_job("job-1_A") == {
        "jobId": "job-1_A",
        "targetSelection": "SNAPSHOT",
        "status": "IN_PROGRESS",
        "targets": ["dev2", "dev1"],
        "document": {"nested": {"list": [1, 2.5, None, True]}},
        "createdAt": int(T0),
        "lastUpdatedAt": int(T0),
        "jobProcessDetails": {
            "numberOfQueuedThings": 2,
            "numberOfInProgressThings": 0,
            "numberOfSucceededThings": 0,
            "numberOfFailedThings": 0,
            "numberOfRejectedThings": 0,
            "numberOfTimedOutThings": 0,
            "numberOfRemovedThings": 0,
            "numberOfCanceledThings": 0,
        },
        "timeoutConfig": {"inProgressTimeoutInMinutes": 5},
        "description": "d",
    }
    assert [e["thingName"] for e in svc.executions_for_job("job-1_A")] == ["dev2", "dev1"]


@pytest.mark.parametrize(
    ("args", "kwargs", "code"),
    [
        (("j 1", ["dev1"], DOC), {}, "InvalidRequest"),
        (("j" * 65, ["dev1"], DOC), {}, "InvalidRequest"),
        (("j1", [], DOC), {}, "InvalidRequest"),
        (("j1", "dev1", DOC), {}, "InvalidRequest"),
        (("j1", ["dev/1"], DOC), {}, "InvalidRequest"),
        (("j1", ["dev1"], ["not", "an", "object"]), {}, "InvalidRequest"),
        (("j1", ["dev1"], {"x": object()}), {}, "InvalidRequest"),
        (("j1", ["dev1"], {"x": float("nan")}), {}, "InvalidRequest"),
        (("j1", ["dev1"], {"x": "y" * 32768}), {}, "InvalidRequest"),
        (("j1", ["dev1"], DOC), {"in_progress_timeout_minutes": 0}, "InvalidRequest"),
        (("j1", ["dev1"], DOC), {"in_progress_timeout_minutes": 10081}, "InvalidRequest"),
        (("j1", ["dev1"], DOC), {"in_progress_timeout_minutes": True}, "InvalidRequest"),
        (("j1", ["dev1"], DOC), {"description": "x" * 2029}, "InvalidRequest"),
        (("j1", ["dev1", "ghost"], DOC), {}, "ResourceNotFound"),
        (("j0", ["dev1"], DOC), {}, "ResourceAlreadyExists"),
    ],
)
def test_create_job_rejections_change_nothing(
    svc: JobsService, args: tuple[Any, ...], kwargs: dict[str, Any], code: str
) -> None:
    svc.create_job("j0", ["dev2"], DOC)
    control_error(code, svc.create_job, *args, **kwargs)
    assert [j["jobId"] for j in svc.list_jobs()] == ["j0"]
    assert svc.executions_for_thing("dev1") == []


def test_a_reused_job_id_starts_again_at_execution_number_one(
        svc: JobsService, clock: Clock) -> None:
    """AWS: "once a job execution is deleted, the executionNumber may be reused". The new
    execution is told apart by its queuedAt."""
    jobs(svc, "j1")
    old = svc.execution("j1", "dev1")
    svc.delete_job("j1", force=True)
    control_error("ResourceAlreadyExists", svc.create_job, "j1", ["dev1"], DOC)
    clock.advance(DELETION_SECONDS)
    svc.tick()
    svc.create_job("j1", ["dev1", "dev2"], DOC)
    new = svc.execution("j1", "dev1")
    assert (new["executionNumber"], svc.execution("j1", "dev2")["executionNumber"]) == (1, 1)
    assert new["queuedAt"] == old["queuedAt"] + int(DELETION_SECONDS)
    accepted(svc, "j1/update", {"status": "IN_PROGRESS", "executionNumber": 1})
    rejected(svc, "j1/get", {"executionNumber": 2}, "ResourceNotFound")


def test_cancel_job_cancels_queued_and_leaves_in_progress_running(
    svc: JobsService, clock: Clock
) -> None:
    svc.create_job("j1", ["dev1", "dev2"], DOC)
    svc.start_next("dev1")
    clock.advance(7)
    svc.cancel_job("j1", comment="bad build", reason_code="BAD_BUILD_2")
    assert status_of(svc, "j1", "dev1") == "IN_PROGRESS"
    queued = svc.execution("j1", "dev2")
    assert (queued["status"], queued["versionNumber"]) == ("CANCELED", 2)
    assert queued["lastUpdatedAt"] == int(clock.now)
    job = svc.describe_job("j1")
    assert (job["status"], job["comment"], job["reasonCode"]) == (
        "CANCELED",
        "bad build",
        "BAD_BUILD_2",
    )
    assert job["forceCanceled"] is False
    assert job["lastUpdatedAt"] == int(clock.now)
    # The running device may still finish; the job stays CANCELED.
    svc.update_execution("dev1", "j1", status="SUCCEEDED")
    assert svc.describe_job("j1")["status"] == "CANCELED"


def test_cancel_job_with_force_cancels_in_progress_too(svc: JobsService) -> None:
    jobs(svc, "j1")
    svc.start_next("dev1", step_timeout_minutes=5)
    svc.cancel_job("j1")
    out = svc.cancel_job("j1", force=True)  # a second, forced cancel is allowed
    assert kinds(out) == ["notify", "notify-next"]
    record = svc.execution("j1", "dev1")
    assert (record["status"], record["versionNumber"]) == ("CANCELED", 3)
    assert svc.next_deadline() is None
    assert svc.describe_job("j1")["forceCanceled"] is True
    rejected(svc, "j1/update", {"status": "SUCCEEDED"}, "InvalidStateTransition")


def test_cancel_job_rejections(svc: JobsService) -> None:
    control_error("ResourceNotFound", svc.cancel_job, "nope")
    jobs(svc, "j1", "j2")
    control_error("InvalidRequest", svc.cancel_job, "j1", reason_code="lower")
    control_error("InvalidRequest", svc.cancel_job, "j1", comment="x" * 2029)
    control_error("InvalidRequest", svc.cancel_job, "j1", force="yes")
    make_status(svc, "j2", "SUCCEEDED")
    assert svc.describe_job("j2")["status"] == "COMPLETED"
    control_error("InvalidStateTransition", svc.cancel_job, "j2")
    assert status_of(svc, "j1") == "QUEUED"


def test_delete_job_without_force_needs_a_completed_or_canceled_job(svc: JobsService) -> None:
    """DeleteJob: "you can only delete a job that's in a terminal state (COMPLETED or
    CANCELED)" unless force; the model's error for it is InvalidStateTransitionException."""
    svc.create_job("j1", ["dev1", "dev2"], DOC)
    error = control_error("InvalidStateTransition", svc.delete_job, "j1")
    assert "IN_PROGRESS" in error.message and "force" in error.message
    svc.start_next("dev1")
    control_error("InvalidStateTransition", svc.delete_job, "j1")
    assert status_of(svc, "j1") == "IN_PROGRESS"
    jobs(svc, "j2", "j3")
    svc.cancel_job("j2")
    make_status(svc, "j3", "FAILED")
    assert [svc.describe_job(j)["status"] for j in ("j2", "j3")] == ["CANCELED", "COMPLETED"]
    svc.delete_job("j2")
    svc.delete_job("j3")


def test_delete_job_passes_through_deletion_in_progress(svc: JobsService, clock: Clock) -> None:
    svc.create_job("j1", ["dev1", "dev2"], DOC)
    svc.start_next("dev1")
    out = svc.delete_job("j1", force=True)

    assert kinds(out) == ["notify", "notify-next"] * 2  # the executions are gone at once
    assert svc.executions_for_thing("dev1") == svc.executions_for_thing("dev2") == []
    assert svc.executions_for_job("j1") == []
    rejected(svc, "j1/get", {}, "ResourceNotFound")
    described = svc.describe_job("j1")
    assert described["status"] == "DELETION_IN_PROGRESS"
    assert [j["status"] for j in svc.list_jobs()] == ["DELETION_IN_PROGRESS"]
    control_error("InvalidStateTransition", svc.delete_job, "j1", force=True)
    control_error("InvalidStateTransition", svc.cancel_job, "j1")
    assert svc.next_deadline() == T0 + DELETION_SECONDS

    clock.advance(DELETION_SECONDS)
    assert svc.tick() == []
    control_error("ResourceNotFound", svc.describe_job, "j1")
    control_error("ResourceNotFound", svc.get_job_document, "j1")
    control_error("ResourceNotFound", svc.delete_job, "j1")
    assert svc.list_jobs() == [] and svc.next_deadline() is None


def test_cancel_job_execution(svc: JobsService) -> None:
    jobs(svc, "j1")
    control_error("VersionConflict", svc.cancel_job_execution, "j1", "dev1", expected_version=2)
    out = svc.cancel_job_execution("j1", "dev1", expected_version=1, status_details={"why": "x"})
    assert kinds(out) == ["notify", "notify-next"]
    record = svc.execution("j1", "dev1")
    assert (record["status"], record["statusDetails"], record["versionNumber"]) == (
        "CANCELED",
        {"why": "x"},
        2,
    )
    assert svc.describe_job("j1")["status"] == "COMPLETED"
    control_error("InvalidStateTransition", svc.cancel_job_execution, "j1", "dev1", force=True)


def test_cancel_job_execution_in_progress_needs_force(svc: JobsService) -> None:
    jobs(svc, "j1")
    svc.start_next("dev1", status_details={"a": "b"})
    control_error("InvalidStateTransition", svc.cancel_job_execution, "j1", "dev1")
    svc.cancel_job_execution("j1", "dev1", force=True)
    record = svc.execution("j1", "dev1")
    assert (record["status"], record["statusDetails"]) == ("CANCELED", {"a": "b"})


def test_cancel_job_execution_rejections(svc: JobsService) -> None:
    jobs(svc, "j1")
    control_error("ResourceNotFound", svc.cancel_job_execution, "j1", "dev2")
    control_error("ResourceNotFound", svc.cancel_job_execution, "j2", "dev1")
    control_error("ResourceNotFound", svc.cancel_job_execution, "j1", "ghost")
    too_many = {f"k{i}": "v" for i in range(11)}
    error = control_error(
        "InvalidRequest", svc.cancel_job_execution, "j1", "dev1", status_details=too_many
    )
    assert "statusDetails" in error.message
    control_error("InvalidRequest", svc.cancel_job_execution, "j1", "dev1", expected_version="1")
    assert status_of(svc, "j1") == "QUEUED"


def test_delete_job_execution(svc: JobsService) -> None:
    svc.create_job("j1", ["dev1", "dev2"], DOC)
    make_status(svc, "j1", "SUCCEEDED", thing="dev1")
    control_error("ResourceNotFound", svc.delete_job_execution, "j1", "dev1", 2)
    control_error("InvalidRequest", svc.delete_job_execution, "j1", "dev1", None)
    control_error("InvalidStateTransition", svc.delete_job_execution, "j1", "dev2", 1)
    assert svc.delete_job_execution("j1", "dev1", 1) == []
    control_error("ResourceNotFound", svc.execution, "j1", "dev1")
    rejected(svc, "j1/get", {}, "ResourceNotFound")
    # Deleting the last pending execution (with force) completes the job.
    out = svc.delete_job_execution("j1", "dev2", 1, force=True)
    assert [p.topic for p in out] == [topic("dev2", "notify"), topic("dev2", "notify-next")]
    job = svc.describe_job("j1")
    assert (job["status"], job["completedAt"]) == ("COMPLETED", int(T0))
    assert sum(job["jobProcessDetails"].values()) == 0


def test_delete_job_execution_in_progress_needs_force(svc: JobsService) -> None:
    jobs(svc, "j1")
    svc.start_next("dev1")
    control_error("InvalidStateTransition", svc.delete_job_execution, "j1", "dev1", 1)
    svc.delete_job_execution("j1", "dev1", 1, force=True)
    assert svc.executions_for_job("j1") == []


def test_job_completes_when_every_execution_ends(svc: JobsService, clock: Clock) -> None:
    svc.create_job("j1", ["dev1", "dev2"], DOC)
    make_status(svc, "j1", "SUCCEEDED", thing="dev1")
    job = svc.describe_job("j1")
    assert job["status"] == "IN_PROGRESS" and "completedAt" not in job
    clock.advance(42)
    make_status(svc, "j1", "REJECTED", thing="dev2")
    job = svc.describe_job("j1")
    assert (job["status"], job["completedAt"], job["lastUpdatedAt"]) == (
        "COMPLETED",
        int(T0) + 42,
        int(T0) + 42,
    )
    counts = job["jobProcessDetails"]
    assert (counts["numberOfSucceededThings"], counts["numberOfRejectedThings"]) == (1, 1)
    assert svc.list_jobs() == [
        {
            "jobId": "j1",
            "targetSelection": "SNAPSHOT",
            "status": "COMPLETED",
            "createdAt": int(T0),
            "lastUpdatedAt": int(T0) + 42,
            "completedAt": int(T0) + 42,
        }
    ]


def test_read_accessors_return_copies(svc: JobsService) -> None:
    jobs(svc, "j1")
    with pytest.raises(AttributeError):  # documents are immutable values
        svc.get_job_document("j1").text = "{}"  # type: ignore[misc]
    svc.execution("j1", "dev1")["statusDetails"]["x"] = "y"
    svc.describe_job("j1")["targets"].append("dev2")
    assert svc.get_job_document("j1") == DOC
    assert svc.execution("j1", "dev1")["statusDetails"] == {}
    assert svc.describe_job("j1")["targets"] == ["dev1"]
    details = {"a": "b"}
    svc.start_next("dev1", status_details=details)
    details["a"] = "changed"
    assert svc.execution("j1", "dev1")["statusDetails"] == {"a": "b"}


def test_execution_lookups(svc: JobsService) -> None:
    jobs(svc, "j1", "j2")
    svc.create_job("j3", ["dev2"], DOC)
    assert [e["jobId"] for e in svc.executions_for_thing("dev1")] == ["j1", "j2"]
    assert svc.executions_for_thing("dev2")[0]["jobDocument"] == DOC
    assert svc.execution("j1", "dev1", 1) == svc.execution("j1", "dev1")
    control_error("ResourceNotFound", svc.execution, "j1", "dev1", 2)
    control_error("ResourceNotFound", svc.execution, "j3", "dev1")
    control_error("ResourceNotFound", svc.executions_for_thing, "ghost")
    control_error("InvalidRequest", svc.executions_for_thing, "bad name")
    control_error("InvalidRequest", svc.execution, "j1", "dev1", True)


# ==================================================================== faults and history


def test_injected_faults_reject_matching_operations_without_changing_state(
    svc: JobsService,
) -> None:
    jobs(svc, "j1")
    svc.inject_rejections("InternalError", 2, {"start-next", "update"})
    accepted(svc, "get")  # not a matching operation: not consumed
    out = send(svc, "start-next", {"clientToken": "s"})
    assert kinds(out) == ["rejected"]
    assert out[0].payload == {
        "code": "InternalError",
        "message": out[0].payload["message"],
        "clientToken": "s",
        "timestamp": int(T0),
    }
    assert status_of(svc, "j1") == "QUEUED"
    control_error("InternalError", svc.update_execution, "dev1", "j1", status="SUCCEEDED")
    assert status_of(svc, "j1") == "QUEUED"
    assert accepted(svc, "start-next")["execution"]["status"] == "IN_PROGRESS"


def test_injected_faults_hit_before_validation_but_after_json(svc: JobsService) -> None:
    svc.inject_rejections("RequestThrottled", 1, {"get"})
    rejected(svc, "get", b"not json", "InvalidJson")
    rejected(svc, "bogus", {}, "InvalidTopic")
    rejected(svc, "get", {"unknown": 1}, "RequestThrottled")
    rejected(svc, "get", {"unknown": 1}, "InvalidRequest")


def test_any_future_code_can_be_injected(svc: JobsService) -> None:
    svc.inject_rejections("SomethingNewFromAws", 1, {"get"})
    assert rejected(svc, "get", {}, "SomethingNewFromAws")["message"]


def test_injected_faults_queue_in_order(svc: JobsService) -> None:
    svc.inject_rejections("RequestThrottled", 1)
    svc.inject_rejections("TerminalStateReached", 1, {"describe"})
    svc.inject_rejections("InternalError", 1, None)
    svc.inject_rejections("InternalError", 0)  # a no-op
    rejected(svc, "$next/get", {}, "RequestThrottled")
    rejected(svc, "get", {}, "InternalError")
    rejected(svc, "$next/get", {}, "TerminalStateReached")
    accepted(svc, "$next/get")
    codes = [entry.get("code") for _, _, entry in svc.history]
    assert codes == [
        "RequestThrottled",
        "InternalError",
        "TerminalStateReached",
        None,
    ]


@pytest.mark.parametrize(
    ("code", "count", "operations"),
    [
        ("", 1, None),
        ("VersionMismatch", 1, None),
        ("InvalidStateTransition", 1, None),
        ("InternalError", -1, None),
        ("InternalError", True, None),
        ("InternalError", 1, {"get", "delete"}),
    ],
)
def test_inject_rejections_refuses_misuse(
    svc: JobsService, code: str, count: int, operations: set[str] | None
) -> None:
    with pytest.raises(ValueError):
        svc.inject_rejections(code, count, operations)


def test_history_records_each_device_request_once(svc: JobsService) -> None:
    svc.create_job("j1", ["dev1"], DOC)  # control plane: not recorded
    send(svc, "get", {"clientToken": "x"})
    svc.start_next("dev1")
    send(svc, "j1/update", {"status": "SUCCEEDED", "clientToken": "y"})
    send(svc, "j1/update", {"status": "SUCCEEDED"})
    send(svc, "j1/get", {}, thing="ghost")
    send(svc, "$next/get", {})
    history = svc.history
    assert [(thing, op) for thing, op, _ in history] == [
        ("dev1", "get"),
        ("dev1", "start-next"),
        ("dev1", "update"),
        ("dev1", "update"),
        ("ghost", "describe"),
        ("dev1", "describe"),
    ]
    assert history[0][2] == {"inProgressJobs": [], "queuedJobs": history[0][2]["queuedJobs"]}
    assert history[2][2] == {}
    assert history[3][2]["code"] == "InvalidStateTransition"
    assert "executionState" in history[3][2]
    assert history[4][2]["code"] == "ResourceNotFound"
    assert history[5][2] == {}
    assert all("timestamp" not in entry and "clientToken" not in entry for _, _, entry in history)
    history.clear()  # a copy
    assert len(svc.history) == 6


def test_rejection_payload_shape() -> None:
    plain = Rejection("InvalidRequest", "bad")
    assert (str(plain), plain.to_payload()) == (
        "InvalidRequest: bad",
        {"code": "InvalidRequest", "message": "bad"},
    )
    state = {"status": "QUEUED", "statusDetails": {}, "versionNumber": 1}
    assert Rejection("VersionMismatch", "v", state).to_payload()["executionState"] == state


# ==================================================================== referees: SDK and botocore


def test_payloads_parse_with_the_aws_iot_device_sdk(svc: JobsService) -> None:
    iotjobs = pytest.importorskip("awsiot.iotjobs")
    created = svc.create_job("j1", ["dev1"], DOC) + svc.create_job("j2", ["dev1"], DOC)
    notify, notify_next = created[0], created[1]
    got = iotjobs.GetPendingJobExecutionsResponse.from_payload(
        accepted(svc, "get", {"clientToken": "a"})
    )
    assert got.client_token == "a" and got.queued_jobs[0].started_at is None
    assert got.queued_jobs[0].queued_at.timestamp() == int(T0)
    started = iotjobs.StartNextJobExecutionResponse.from_payload(accepted(svc, "start-next"))
    assert started.execution.job_document == DOC and started.execution.started_at is not None
    described = iotjobs.DescribeJobExecutionResponse.from_payload(accepted(svc, "j2/get"))
    assert described.execution.status == iotjobs.JobStatus.QUEUED
    updated = iotjobs.UpdateJobExecutionResponse.from_payload(
        accepted(svc, "j1/update", {"status": "SUCCEEDED", "includeJobExecutionState": True})
    )
    assert updated.execution_state.version_number == 3
    error = iotjobs.V2ErrorResponse.from_payload(
        rejected(svc, "j1/update", {"status": "FAILED", "clientToken": "b"})
    )
    assert (error.code, error.client_token) == (
        iotjobs.RejectedErrorCode.INVALID_STATE_TRANSITION,
        "b",
    )
    assert error.execution_state.status == "SUCCEEDED"
    changed = iotjobs.JobExecutionsChangedEvent.from_payload(notify.payload)
    assert changed.jobs["QUEUED"][0].job_id == "j1"
    nxt = iotjobs.NextJobExecutionChangedEvent.from_payload(notify_next.payload)
    assert nxt.execution.job_id == "j1"
    done = iotjobs.NextJobExecutionChangedEvent.from_payload(
        svc.update_execution("dev1", "j2", status="SUCCEEDED")[1][1].payload
    )
    assert done.execution is None and done.timestamp is not None


def test_response_keys_are_members_of_the_botocore_model(svc: JobsService) -> None:
    session = pytest.importorskip("botocore.session").get_session()
    model = session.get_service_model("iot-jobs-data")

    def members(shape: str) -> set[str]:
        return set(model.shape_for(shape).members)

    jobs(svc, "j1", "j2")
    svc.start_next("dev1", status_details={"a": "b"})
    pending = svc.get_pending("dev1")
    assert set(pending) == members("GetPendingJobExecutionsResponse")
    for summary in pending["inProgressJobs"] + pending["queuedJobs"]:
        assert set(summary) <= members("JobExecutionSummary")
        assert None not in summary.values()
    execution = svc.describe_execution("dev1", "j1")["execution"]
    assert set(execution) == members("JobExecution") - {"approximateSecondsBeforeTimedOut"}
    state = svc.update_execution(
        "dev1",
        "j1",
        status="IN_PROGRESS",
        include_job_execution_state=True,
        include_job_document=True,
    )[0]
    assert set(state) == members("UpdateJobExecutionResponse")
    assert set(state["executionState"]) == members("JobExecutionState")


# ==================================================================== properties


@given(st.text(max_size=40) | st.text(st.characters(codec="ascii"), min_size=1020, max_size=1030))
@settings(max_examples=150, deadline=None)
def test_status_details_values_follow_the_control_character_rule(value: str) -> None:
    """Any string is accepted iff it is 1-1024 chars with no Unicode category C* character."""
    svc = JobsService(Clock())
    svc.create_thing("t")
    svc.create_job("j", ["t"], DOC)
    ok = 1 <= len(value) <= 1024 and not any(
        unicodedata.category(ch).startswith("C") for ch in value
    )
    try:
        svc.update_execution("t", "j", status="IN_PROGRESS", status_details={"k": value})
    except Rejection as error:
        assert not ok and error.code == "InvalidRequest"
    else:
        assert ok


THINGS = ("t1", "t2", "t3")
JOB_IDS = tuple(f"job{i}" for i in range(13))
DETAILS = st.none() | st.dictionaries(
    st.sampled_from(["step", "progress", "k:1"]),
    st.sampled_from(["a", "50%", "done ✓"]),
    max_size=2,
)
STEP = st.none() | st.sampled_from([-1, 1, 2, 10])


class ServiceMachine(RuleBasedStateMachine):
    """Random device and control traffic; invariants checked after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.svc = JobsService(self.clock)
        for thing in THINGS:
            self.svc.create_thing(thing)
        self.records = self._records()
        self.pending = self._pending_view()
        self.step_publishes: list[Publish] = []
        self.request: tuple[str, Any] | None = None  # (request topic, clientToken or absent)
        self.tokens = 0

    # ------------------------------------------------------------ observations

    def _records(self) -> dict[tuple[str, str, int, int], dict[str, Any]]:
        """Executions by (thing, job, number, queuedAt): a job re-created under a deleted one's
        id starts again at number 1, later (the deletion takes a while)."""
        return {
            (r["thingName"], r["jobId"], r["executionNumber"], r["queuedAt"]): r
            for thing in THINGS
            for r in self.svc.executions_for_thing(thing)
        }

    def _pending_view(self) -> dict[str, tuple[set[tuple[str, int]], tuple[str, int] | None]]:
        """Per thing: the full pending set and the head, from control-plane records."""
        view = {}
        for thing in THINGS:
            records = [
                r
                for r in self.svc.executions_for_thing(thing)
                if r["status"] in ("QUEUED", "IN_PROGRESS")
            ]
            keys = {(r["jobId"], r["executionNumber"]) for r in records}
            head = self.svc.describe_execution(thing, "$next").get("execution")
            view[thing] = (keys, None if head is None else (head["jobId"], head["executionNumber"]))
        return view

    def _job(self, data: st.DataObject) -> str:
        """Mostly a job that exists (so requests reach deep states), sometimes any id."""
        existing: list[str] = [job["jobId"] for job in self.svc.list_jobs()]
        usual = data.draw(st.integers(0, 9)) > 0
        return data.draw(st.sampled_from(existing if existing and usual else JOB_IDS))

    def _execution(self, data: st.DataObject) -> tuple[str, str, int]:
        """Mostly an existing (thing, job, executionNumber), sometimes anything."""
        usual = data.draw(st.integers(0, 9)) > 0
        if self.records and usual:
            return data.draw(st.sampled_from(sorted(self.records)))[:3]
        return (data.draw(st.sampled_from(THINGS)), self._job(data), data.draw(st.integers(1, 2)))

    # ------------------------------------------------------------ control plane

    def _control(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            self.step_publishes = fn(*args, **kwargs)
        except Rejection as error:
            assert error.code in {
                "InvalidRequest",
                "ResourceNotFound",
                "ResourceAlreadyExists",
                "InvalidStateTransition",
                "VersionConflict",
            }, error
            self.step_publishes = []

    @initialize(timeout=st.none() | st.integers(1, 3))
    def first_jobs(self, timeout: int | None) -> None:
        """Start from two jobs, so that short runs too reach started and finished executions.
        (Two mutations in one step: their notifications are checked by the example tests.)"""
        self.svc.create_job(
            "job0", ["t1", "t2"], {"id": "job0"}, in_progress_timeout_minutes=timeout
        )
        self.svc.create_job("job1", ["t1"], {"id": "job1"})
        self.records, self.pending = self._records(), self._pending_view()

    @rule(
        job=st.sampled_from(JOB_IDS),
        things=st.lists(st.sampled_from(THINGS), min_size=1, max_size=3),
        timeout=st.none() | st.integers(1, 3),
    )
    def create_job(self, job: str, things: list[str], timeout: int | None) -> None:
        self._control(
            self.svc.create_job, job, things, {"id": job}, in_progress_timeout_minutes=timeout
        )

    @rule(data=st.data(), force=st.booleans())
    def cancel_job(self, data: st.DataObject, force: bool) -> None:
        self._control(self.svc.cancel_job, self._job(data), force=force)

    @rule(data=st.data(), force=st.booleans())
    def delete_job(self, data: st.DataObject, force: bool) -> None:
        self._control(self.svc.delete_job, self._job(data), force=force)

    @rule(
        data=st.data(),
        force=st.booleans(),
        version=st.none() | st.integers(1, 5),
        details=DETAILS,
    )
    def cancel_job_execution(
        self, data: st.DataObject, force: bool, version: int | None, details: Any
    ) -> None:
        thing, job, _ = self._execution(data)
        self._control(
            self.svc.cancel_job_execution,
            job,
            thing,
            force=force,
            expected_version=version,
            status_details=details,
        )

    @rule(data=st.data(), force=st.booleans())
    def delete_job_execution(self, data: st.DataObject, force: bool) -> None:
        thing, job, number = self._execution(data)
        self._control(self.svc.delete_job_execution, job, thing, number, force=force)

    @rule(seconds=st.sampled_from([0, 1, 30, 59.5, 60, 61, 119, 400]))
    def advance_and_tick(self, seconds: float) -> None:
        self.clock.advance(seconds)
        deadline = self.svc.next_deadline()
        self.step_publishes = self.svc.tick()
        after = self.svc.next_deadline()
        assert after is None or after > self.clock.now
        if deadline is not None and deadline <= self.clock.now:
            assert deadline != after  # the due execution timed out

    # ------------------------------------------------------------ device plane (MQTT)

    def _send(self, thing: str, suffix: str, body: dict[str, Any], token: bool) -> None:
        if token:
            self.tokens += 1
            body = body | {"clientToken": f"tok-{self.tokens}"}
        request_topic = topic(thing, suffix)
        self.request = (request_topic, body.get("clientToken"))
        self.step_publishes = self.svc.handle(request_topic, json.dumps(body).encode())

    @rule(thing=st.sampled_from(THINGS), token=st.booleans())
    def get(self, thing: str, token: bool) -> None:
        self._send(thing, "get", {}, token)

    @rule(thing=st.sampled_from(THINGS), details=DETAILS, step=STEP, token=st.booleans())
    def start_next(self, thing: str, details: Any, step: int | None, token: bool) -> None:
        body: dict[str, Any] = {}
        if details is not None:
            body["statusDetails"] = details
        if step is not None:
            body["stepTimeoutInMinutes"] = step
        self._send(thing, "start-next", body, token)

    @rule(
        data=st.data(),
        next_=st.booleans(),
        number=st.booleans(),
        include=st.none() | st.booleans(),
        token=st.booleans(),
    )
    def describe(
        self, data: st.DataObject, next_: bool, number: bool, include: bool | None, token: bool
    ) -> None:
        thing, job, execution_number = self._execution(data)
        body: dict[str, Any] = {} if include is None else {"includeJobDocument": include}
        if number:
            body["executionNumber"] = execution_number
        self._send(thing, f"{'$next' if next_ else job}/get", body, token)

    @rule(
        data=st.data(),
        status=st.sampled_from(["IN_PROGRESS", "IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED"]),
        details=DETAILS,
        version=st.sampled_from(["none", "right", "wrong"]),
        number=st.booleans(),
        step=STEP,
        include_state=st.booleans(),
        include_document=st.booleans(),
        token=st.booleans(),
    )
    def update(
        self,
        data: st.DataObject,
        status: str,
        details: Any,
        version: str,
        number: bool,
        step: int | None,
        include_state: bool,
        include_document: bool,
        token: bool,
    ) -> None:
        thing, job, execution_number = self._execution(data)
        body: dict[str, Any] = {
            "status": status,
            "includeJobExecutionState": include_state,
            "includeJobDocument": include_document,
        }
        if details is not None:
            body["statusDetails"] = details
        if step is not None:
            body["stepTimeoutInMinutes"] = step
        if number:
            body["executionNumber"] = execution_number
        current = next((r for key, r in self.records.items()
                        if key[:3] == (thing, job, execution_number)), None)
        if version != "none" and current is not None:
            body["expectedVersion"] = current["versionNumber"] + (version == "wrong")
        self._send(thing, f"{job}/update", body, token)

    @rule(
        thing=st.sampled_from(THINGS),
        suffix=st.sampled_from(["get", "start-next", "job0/get", "job0/update", "nope"]),
        raw=st.sampled_from([b"{", b"[]", b'{"bogus": 1}', b'{"status": "QUEUED"}', b"\xff"]),
    )
    def malformed(self, thing: str, suffix: str, raw: bytes) -> None:
        self.request = (topic(thing, suffix), None)
        self.step_publishes = self.svc.handle(topic(thing, suffix), raw)
        assert kinds(self.step_publishes) == ["rejected"]

    @rule(
        thing=st.sampled_from(THINGS),
        code=st.sampled_from(["RequestThrottled", "InternalError", "TerminalStateReached"]),
        operation=st.sampled_from(["get", "start-next", "describe", "update"]),
    )
    def injected_fault(self, thing: str, code: str, operation: str) -> None:
        self.svc.inject_rejections(code, 1, {operation})
        suffix, body = {
            "get": ("get", {}),
            "start-next": ("start-next", {}),
            "describe": ("$next/get", {}),
            "update": ("job0/update", {"status": "SUCCEEDED"}),
        }[operation]
        self._send(thing, suffix, body, True)
        assert kinds(self.step_publishes) == ["rejected"]
        assert self.step_publishes[0].payload["code"] == code

    # ------------------------------------------------------------ invariants

    @invariant()
    def step_is_consistent(self) -> None:
        """One invariant calling the checks in order: the reply is consumed before the
        notifications are compared (hypothesis does not promise an order among invariants)."""
        self.replies_are_well_formed()
        self.executions_only_move_forward()
        self.notifications_match_the_state()
        self.pending_lists_are_well_formed()

    def replies_are_well_formed(self) -> None:
        if self.request is None:
            return
        request_topic, token = self.request
        self.request = None
        first, rest = self.step_publishes[0], self.step_publishes[1:]
        assert first.topic in (request_topic + "/accepted", request_topic + "/rejected")
        assert_int(first.payload["timestamp"])
        assert first.payload.get("clientToken") == token
        assert ("clientToken" in first.payload) == (token is not None)
        if first.topic.endswith("/rejected"):
            assert rest == []
            has_state = first.payload["code"] in ("VersionMismatch", "InvalidStateTransition")
            assert ("executionState" in first.payload) == has_state
        self.step_publishes = rest

    def executions_only_move_forward(self) -> None:
        records = self._records()
        for key, old in self.records.items():
            new = records.get(key)
            if new is None:
                continue  # deleted
            if old["status"] not in ("QUEUED", "IN_PROGRESS"):
                assert new == old, "a terminal execution changed"
            elif new != old:
                assert new["versionNumber"] > old["versionNumber"], (old, new)
            else:
                assert new["versionNumber"] == old["versionNumber"]
            assert new["queuedAt"] == old["queuedAt"]
            assert new["lastUpdatedAt"] >= old["lastUpdatedAt"]
        for record in records.values():
            assert ("startedAt" in record) or record["status"] != "IN_PROGRESS"
            assert None not in record.values()
        for job in self.svc.list_jobs():
            statuses = {e["status"] for e in self.svc.executions_for_job(job["jobId"])}
            running = bool(statuses & {"QUEUED", "IN_PROGRESS"})
            if job["status"] == "IN_PROGRESS":
                assert running
            elif job["status"] == "COMPLETED":
                assert not running and "completedAt" in job
            elif job["status"] == "DELETION_IN_PROGRESS":
                assert statuses == set()
            else:
                assert job["status"] == "CANCELED" and "QUEUED" not in statuses
        self.records = records

    def notifications_match_the_state(self) -> None:
        publishes, self.step_publishes = self.step_publishes, []
        pending = self._pending_view()
        expected_topics = []
        for thing in THINGS:
            (old_set, old_head), (new_set, new_head) = self.pending[thing], pending[thing]
            if old_set != new_set:
                expected_topics.append(topic(thing, "notify"))
            if old_head != new_head:
                expected_topics.append(topic(thing, "notify-next"))
        assert sorted(p.topic for p in publishes) == sorted(expected_topics)
        for publish in publishes:
            thing = publish.topic.split("/")[2]
            assert_int(publish.payload["timestamp"])
            if publish.topic.endswith("/notify"):
                listed = self.svc.get_pending(thing)
                assert publish.payload["jobs"] == {
                    status: items
                    for status, items in (
                        ("IN_PROGRESS", listed["inProgressJobs"]),
                        ("QUEUED", listed["queuedJobs"]),
                    )
                    if items
                }
            else:
                head = self.svc.describe_execution(thing, "$next")
                if head:
                    head = {"execution": mqtt_execution(head["execution"])}
                assert publish.payload == {"timestamp": int(self.clock.now), **head}
        self.pending = pending

    def pending_lists_are_well_formed(self) -> None:
        for thing in THINGS:
            listed = self.svc.get_pending(thing)
            summaries = listed["inProgressJobs"] + listed["queuedJobs"]
            assert len(summaries) <= 10
            assert len(summaries) == min(10, len(self.pending[thing][0]))
            for summary in summaries:
                assert None not in summary.values()
                for key in ("queuedAt", "lastUpdatedAt", "versionNumber", "executionNumber"):
                    assert_int(summary[key])
            assert all("startedAt" in s for s in listed["inProgressJobs"])
            assert all("startedAt" not in s for s in listed["queuedJobs"])
            deadline = self.svc.next_deadline()
            assert deadline is None or isinstance(deadline, float)


ServiceMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestServiceMachine = ServiceMachine.TestCase
