"""Wire payload -> boto3 shape conversion, strict in both directions, checked by botocore."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import (
    ConflictException,
    InvalidRequestException,
    InvalidResponseError,
    JobsServiceError,
    error_from_rejection,
)
from agent.jobs import shapes
from tests.conftest import boto3_shape_errors

EXECUTION = {
    "jobId": "j1", "thingName": "t", "status": "IN_PROGRESS", "statusDetails": {"a": "b"},
    "queuedAt": 1700000000, "startedAt": 1700000005, "lastUpdatedAt": 1700000009,
    "versionNumber": 3, "executionNumber": 1, "jobDocument": {"operation": "x", "args": [1]},
}


def test_execution_converts_document_to_boto3_string_and_keeps_ints() -> None:
    out = shapes.execution(EXECUTION)
    assert out["jobDocument"] == '{"operation":"x","args":[1]}'
    assert out["queuedAt"] == 1700000000 and type(out["queuedAt"]) is int
    assert boto3_shape_errors("DescribeJobExecution", {"execution": out}) == ""


def test_absent_keys_stay_absent_and_unknown_keys_are_dropped() -> None:
    raw = {k: v for k, v in EXECUTION.items() if k != "startedAt"}
    raw["somethingNew"] = 1
    raw["startedAt"] = None
    out = shapes.execution(raw)
    assert "startedAt" not in out
    assert "somethingNew" not in out


def test_whole_float_seconds_are_ints_fractional_and_millis_are_refused() -> None:
    base = {"jobId": "j", "versionNumber": 1, "executionNumber": 1}
    assert shapes.summary({**base, "queuedAt": 1700000000.0})["queuedAt"] == 1700000000
    with pytest.raises(InvalidResponseError, match="whole epoch seconds"):
        shapes.summary({**base, "queuedAt": 1700000000.5})
    with pytest.raises(InvalidResponseError, match="milliseconds"):
        shapes.summary({**base, "queuedAt": 1700000000000})
    with pytest.raises(InvalidResponseError, match="queuedAt"):
        shapes.summary({**base, "queuedAt": "yesterday"})
    with pytest.raises(InvalidResponseError, match="versionNumber"):
        shapes.summary({**base, "versionNumber": True})


@pytest.mark.parametrize("missing", ["jobId", "versionNumber", "executionNumber"])
def test_summary_without_what_the_agent_decides_on_is_malformed(missing: str) -> None:
    raw = {"jobId": "j", "versionNumber": 1, "executionNumber": 1}
    del raw[missing]
    with pytest.raises(InvalidResponseError, match=f"has no {missing}"):
        shapes.summary(raw)


@pytest.mark.parametrize("payload", [
    {"inProgressJobs": "nope"},
    {"queuedJobs": [{"queuedAt": 1}]},
    {"queuedJobs": [5]},
])
def test_malformed_pending_reply(payload: dict[str, Any]) -> None:
    with pytest.raises(InvalidResponseError):
        shapes.get_pending_response(payload)


def test_pending_reply_without_lists_is_empty_lists() -> None:
    assert shapes.get_pending_response({"timestamp": 1}) == {"inProgressJobs": [],
                                                            "queuedJobs": []}


def test_update_response_shapes() -> None:
    out = shapes.update_response({"executionState": {"status": "SUCCEEDED", "statusDetails": {},
                                                     "versionNumber": 4},
                                  "jobDocument": {"a": 1}, "timestamp": 5, "clientToken": "x"})
    assert out == {"executionState": {"status": "SUCCEEDED", "statusDetails": {},
                                      "versionNumber": 4}, "jobDocument": '{"a":1}'}
    assert boto3_shape_errors("UpdateJobExecution", out) == ""


def test_rejection_mapping() -> None:
    code, message, state = shapes.error_fields({
        "code": "VersionMismatch", "message": "expected 2", "clientToken": "t",
        "executionState": {"status": "QUEUED", "statusDetails": {}, "versionNumber": 1}})
    exc = error_from_rejection(code, message, execution_state=state, client_token="t")
    assert isinstance(exc, ConflictException)
    assert exc.executionState == {"status": "QUEUED", "statusDetails": {}, "versionNumber": 1}
    unknown = error_from_rejection("BrandNew", "hm")
    assert type(unknown) is JobsServiceError and unknown.code == "BrandNew"
    with pytest.raises(InvalidResponseError):
        shapes.error_fields({"message": "no code"})
    assert shapes.error_fields({"code": "InternalError"})[1] == "InternalError"


def test_notify_events() -> None:
    body = shapes.notify_event({"timestamp": 9, "jobs": {"QUEUED": [
        {"jobId": "a", "queuedAt": 1, "lastUpdatedAt": 1, "versionNumber": 1,
         "executionNumber": 1}]}})
    assert body == {"timestamp": 9, "jobs": {"QUEUED": [{"jobId": "a", "queuedAt": 1,
                                                         "lastUpdatedAt": 1, "versionNumber": 1,
                                                         "executionNumber": 1}]}}
    assert shapes.notify_event({"timestamp": 9, "jobs": {}}) == {"timestamp": 9, "jobs": {}}
    assert shapes.notify_next_event({"timestamp": 9}) == {"timestamp": 9}
    with pytest.raises(InvalidResponseError):
        shapes.notify_event({"jobs": {"WEIRD": []}})


def test_request_builders_only_send_what_was_given() -> None:
    assert shapes.start_next_request() == {}
    assert shapes.update_request("SUCCEEDED") == {"status": "SUCCEEDED"}
    assert shapes.update_request("IN_PROGRESS", {"k": "v"}, -1, 0, True, False, 2) == {
        "status": "IN_PROGRESS", "statusDetails": {"k": "v"}, "stepTimeoutInMinutes": -1,
        "expectedVersion": 0, "includeJobExecutionState": True, "includeJobDocument": False,
        "executionNumber": 2}


@given(st.dictionaries(st.text(max_size=130), st.text(max_size=1100), max_size=4))
def test_status_details_validation_agrees_with_the_model(details: dict[str, str]) -> None:
    """Our check accepts exactly what the model allows (key pattern, value 1-1024, no \\p{C})."""
    import re
    import unicodedata

    valid = all(
        re.fullmatch(r"[a-zA-Z0-9:_-]{1,128}", k) and 1 <= len(v) <= 1024
        and not any(unicodedata.category(c).startswith("C") for c in v)
        for k, v in details.items())
    try:
        shapes.update_request("FAILED", details)
    except InvalidRequestException:
        assert not valid
    else:
        assert valid

