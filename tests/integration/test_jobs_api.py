"""Every Jobs device operation and every rejection, end to end.

Real parts only: the agent's JobsClient on the real awscrt MQTT5 client, over mutual TLS to a real
Mosquitto with per-thing ACLs, answered by the emulator. Every response is checked against
botocore's ``iot-jobs-data`` output shape and against the emulator's own state.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from agent.errors import (
    ConflictException,
    InvalidRequestException,
    InvalidStateTransitionException,
    JobsServiceError,
    ResourceNotFoundException,
    ServiceUnavailableException,
    TerminalStateException,
    ThrottlingException,
)
from tests.conftest import Thing, boto3_shape_errors, broad_jobs_policy, open_client, run

pytestmark = pytest.mark.broker

DOC = {"operation": "run-script", "args": ["--fast"]}


def expected_summary(execution: dict[str, Any]) -> dict[str, Any]:
    """What boto3 would return for the emulator's record: only the summary keys present."""
    keys = ("jobId", "queuedAt", "startedAt", "lastUpdatedAt", "versionNumber", "executionNumber")
    return {k: execution[k] for k in keys if k in execution}


def test_get_pending_empty(thing: Thing) -> None:
    async def body() -> dict[str, Any]:
        async with open_client(thing.config) as jobs:
            return await jobs.get_pending_job_executions(thingName=thing.name)

    result = run(body())
    assert result == {"inProgressJobs": [], "queuedJobs": []}
    assert boto3_shape_errors("GetPendingJobExecutions", result) == ""


def test_get_pending_matches_service_state(thing: Thing) -> None:
    for i in range(3):
        thing.emulator.create_job(thing.j(f"job-{i}"), [thing.name], {**DOC, "n": i})

    async def body() -> tuple[dict[str, Any], dict[str, Any]]:
        async with open_client(thing.config) as jobs:
            started = await jobs.start_next_pending_job_execution(thingName=thing.name)
            return started, await jobs.get_pending_job_executions(thingName=thing.name)

    started, pending = run(body())
    assert started["execution"]["jobId"] == thing.j("job-0")
    want = {
        "inProgressJobs": [
            expected_summary(thing.emulator.execution(thing.j("job-0"), thing.name))
        ],
        "queuedJobs": [
            expected_summary(thing.emulator.execution(thing.j(f"job-{i}"), thing.name))
            for i in (1, 2)
        ],
    }
    assert pending == want
    for item in pending["queuedJobs"]:
        assert "startedAt" not in item  # absent, never None
        assert all(type(item[k]) is int for k in ("queuedAt", "lastUpdatedAt", "versionNumber"))
    assert type(pending["inProgressJobs"][0]["startedAt"]) is int
    assert boto3_shape_errors("GetPendingJobExecutions", pending) == ""


def test_start_next_claims_head_and_returns_document(thing: Thing) -> None:
    thing.emulator.create_job(thing.j("first"), [thing.name], DOC)
    thing.emulator.create_job(thing.j("second"), [thing.name], DOC)

    async def body() -> list[dict[str, Any]]:
        async with open_client(thing.config) as jobs:
            a = await jobs.start_next_pending_job_execution(
                thingName=thing.name, statusDetails={"step": "claimed"}, stepTimeoutInMinutes=5
            )
            b = await jobs.start_next_pending_job_execution(thingName=thing.name)
            return [a, b]

    a, b = run(body())
    execution = a["execution"]
    assert execution["jobId"] == thing.j("first")
    assert execution["status"] == "IN_PROGRESS"
    assert execution["statusDetails"] == {"step": "claimed"}
    assert "thingName" not in execution  # MQTT carries none (AWS's captures); HTTP does
    assert execution["versionNumber"] == 2  # queued = 1, claim = 2
    # boto3 hands the document out as a JSON string; the MQTT object is converted, not dropped.
    assert isinstance(execution["jobDocument"], str)
    assert json.loads(execution["jobDocument"]) == DOC
    # The head is still IN_PROGRESS, so start-next returns it again, unchanged.
    assert b["execution"]["jobId"] == thing.j("first")
    assert b["execution"]["versionNumber"] == 2
    for result in (a, b):
        assert boto3_shape_errors("StartNextPendingJobExecution", result) == ""


def test_start_next_with_nothing_pending_has_no_execution_key(thing: Thing) -> None:
    async def body() -> dict[str, Any]:
        async with open_client(thing.config) as jobs:
            return await jobs.start_next_pending_job_execution(thingName=thing.name)

    assert run(body()) == {}


def test_describe_by_id_next_and_without_document(thing: Thing) -> None:
    thing.emulator.create_job(thing.j("d1"), [thing.name], DOC)
    thing.emulator.create_job(thing.j("d2"), [thing.name], DOC)

    async def body() -> list[dict[str, Any]]:
        async with open_client(thing.config) as jobs:
            return [
                await jobs.describe_job_execution(jobId=thing.j("d2"), thingName=thing.name),
                await jobs.describe_job_execution(jobId="$next", thingName=thing.name),
                await jobs.describe_job_execution(
                    jobId=thing.j("d1"),
                    thingName=thing.name,
                    includeJobDocument=False,
                    executionNumber=1,
                ),
            ]

    by_id, nxt, bare = run(body())
    assert by_id["execution"]["jobId"] == thing.j("d2")
    assert by_id["execution"]["status"] == "QUEUED"
    assert "startedAt" not in by_id["execution"]
    assert nxt["execution"]["jobId"] == thing.j("d1")  # oldest queued is next
    assert "jobDocument" not in bare["execution"]
    assert bare["execution"]["executionNumber"] == 1
    for result in (by_id, nxt, bare):
        assert boto3_shape_errors("DescribeJobExecution", result) == ""


def test_describe_next_with_nothing_pending(thing: Thing) -> None:
    async def body() -> dict[str, Any]:
        async with open_client(thing.config) as jobs:
            return await jobs.describe_job_execution(jobId="$next", thingName=thing.name)

    assert run(body()) == {}


def test_update_lifecycle_and_versioning(thing: Thing) -> None:
    thing.emulator.create_job(thing.j("u1"), [thing.name], DOC)

    async def body() -> list[Any]:
        async with open_client(thing.config) as jobs:
            progress = await jobs.update_job_execution(
                jobId=thing.j("u1"),
                thingName=thing.name,
                status="IN_PROGRESS",
                statusDetails={"progress": "40"},
                expectedVersion=1,
                includeJobExecutionState=True,
            )
            done = await jobs.update_job_execution(
                jobId=thing.j("u1"),
                thingName=thing.name,
                status="SUCCEEDED",
                expectedVersion=2,
                includeJobExecutionState=True,
                includeJobDocument=True,
            )
            plain = {}
            try:
                await jobs.update_job_execution(
                    jobId=thing.j("u1"), thingName=thing.name, status="IN_PROGRESS"
                )
            except InvalidStateTransitionException as exc:
                plain = {"code": exc.code, "state": exc.execution_state}
            return [progress, done, plain]

    progress, done, rejected = run(body())
    assert progress == {
        "executionState": {
            "status": "IN_PROGRESS",
            "statusDetails": {"progress": "40"},
            "versionNumber": 2,
        }
    }
    # statusDetails omitted on the second update: unchanged, not cleared.
    assert done["executionState"] == {
        "status": "SUCCEEDED",
        "statusDetails": {"progress": "40"},
        "versionNumber": 3,
    }
    assert done["jobDocument"] == '{"operation":"run-script","args":["--fast"]}'
    assert rejected["code"] == "InvalidStateTransition"
    assert rejected["state"]["status"] == "SUCCEEDED"
    for result in (progress, done):
        assert boto3_shape_errors("UpdateJobExecution", result) == ""
    assert thing.emulator.execution(thing.j("u1"), thing.name)["status"] == "SUCCEEDED"


def test_update_without_include_flags_returns_empty(thing: Thing) -> None:
    thing.emulator.create_job(thing.j("u2"), [thing.name], DOC)

    async def body() -> dict[str, Any]:
        async with open_client(thing.config) as jobs:
            return await jobs.update_job_execution(
                jobId=thing.j("u2"),
                thingName=thing.name,
                status="REJECTED",
                statusDetails={"reason": "no handler"},
            )

    assert run(body()) == {}
    assert thing.emulator.execution(thing.j("u2"), thing.name)["status"] == "REJECTED"


def test_version_mismatch_is_conflict_with_execution_state(thing: Thing) -> None:
    thing.emulator.create_job(thing.j("v1"), [thing.name], DOC)

    async def body() -> ConflictException:
        async with open_client(thing.config) as jobs:
            with pytest.raises(ConflictException) as info:
                await jobs.update_job_execution(
                    jobId=thing.j("v1"),
                    thingName=thing.name,
                    status="IN_PROGRESS",
                    expectedVersion=7,
                )
            return info.value

    exc = run(body())
    assert exc.code == "VersionMismatch"
    assert exc.execution_state == {"status": "QUEUED", "statusDetails": {}, "versionNumber": 1}
    assert exc.executionState == exc.execution_state
    assert exc.client_token  # correlated by our token
    assert (
        thing.emulator.execution(thing.j("v1"), thing.name)["versionNumber"] == 1
    )  # nothing changed


def test_unknown_job_is_resource_not_found(thing: Thing) -> None:
    async def body() -> list[JobsServiceError]:
        errors = []
        async with open_client(thing.config) as jobs:
            for call in (
                jobs.describe_job_execution(jobId=thing.j("nope"), thingName=thing.name),
                jobs.update_job_execution(
                    jobId=thing.j("nope"), thingName=thing.name, status="FAILED"
                ),
            ):
                with pytest.raises(ResourceNotFoundException) as info:
                    await call
                errors.append(info.value)
        return errors

    for exc in run(body()):
        assert exc.code == "ResourceNotFound"
        assert exc.message


def test_deleted_execution_is_resource_not_found(thing: Thing) -> None:
    thing.emulator.create_job(thing.j("gone"), [thing.name], DOC)
    thing.emulator.delete_job(thing.j("gone"), force=True)  # still IN_PROGRESS: needs force

    async def body() -> None:
        async with open_client(thing.config) as jobs:
            with pytest.raises(ResourceNotFoundException):
                await jobs.update_job_execution(
                    jobId=thing.j("gone"), thingName=thing.name, status="SUCCEEDED"
                )
            assert await jobs.get_pending_job_executions(thingName=thing.name) == {
                "inProgressJobs": [],
                "queuedJobs": [],
            }

    run(body())


@pytest.mark.parametrize(
    ("code", "exc_type"),
    [
        ("RequestThrottled", ThrottlingException),
        ("InternalError", ServiceUnavailableException),
        ("TerminalStateReached", TerminalStateException),
        ("InvalidRequest", InvalidRequestException),
        ("SomethingNewFromAws", JobsServiceError),
    ],
)
def test_rejection_codes_map_to_boto3_exceptions(
    thing: Thing, code: str, exc_type: type[JobsServiceError]
) -> None:
    thing.emulator.create_job(thing.j("r1"), [thing.name], DOC)
    thing.emulator.inject_rejections(code, 1)

    async def body() -> tuple[JobsServiceError, dict[str, Any]]:
        async with open_client(thing.config) as jobs:
            with pytest.raises(JobsServiceError) as info:
                await jobs.describe_job_execution(jobId=thing.j("r1"), thingName=thing.name)
            # The fault was one-shot: the very next request goes through.
            return info.value, await jobs.describe_job_execution(
                jobId=thing.j("r1"), thingName=thing.name
            )

    exc, after = run(body())
    assert type(exc) is exc_type
    assert exc.code == code
    assert after["execution"]["jobId"] == thing.j("r1")


def test_service_side_invalid_request_and_invalid_topic(thing: Thing) -> None:
    """The emulator's own validation, reached by skipping the client's (``_request``).

    ``no-such-api`` is no request topic: only a policy granting all of ``jobs/*`` lets the
    device publish there and read the InvalidTopic answer (the default policy refuses it)."""
    thing.stack.set_policy(thing.name, broad_jobs_policy())
    thing.emulator.create_job(thing.j("iv"), [thing.name], DOC)
    prefix = f"$aws/things/{thing.name}/jobs"

    async def body() -> list[InvalidRequestException]:
        out = []
        async with open_client(thing.config) as jobs:
            for topic, payload in (
                (f"{prefix}/{thing.j('iv')}/update", {"status": "DONE"}),
                (
                    f"{prefix}/{thing.j('iv')}/update",
                    {"status": "FAILED", "statusDetails": {"k": "a\nb"}},
                ),
                (f"{prefix}/start-next", {"stepTimeoutInMinutes": 0}),
                (f"{prefix}/no-such-api", {}),
            ):
                with pytest.raises(InvalidRequestException) as info:
                    await jobs._request("raw", thing.name, topic, payload)
                out.append(info.value)
        return out

    errors = run(body())
    assert [e.code for e in errors] == [
        "InvalidRequest",
        "InvalidRequest",
        "InvalidRequest",
        "InvalidTopic",
    ]
    assert all(e.message for e in errors)
    assert thing.emulator.execution(thing.j("iv"), thing.name)["status"] == "QUEUED"


@pytest.mark.parametrize(
    "call",
    [
        {"op": "get", "thingName": "bad/name"},
        {"op": "get", "thingName": ""},
        {"op": "get", "thingName": "x" * 129},
        {"op": "describe", "jobId": "bad job"},
        {"op": "describe", "jobId": "j" * 65},
        {"op": "update", "status": "DONE"},
        {"op": "update", "status": "QUEUED"},
        {"op": "update", "status": "FAILED", "statusDetails": {"k": "line\nbreak"}},
        {"op": "update", "status": "FAILED", "statusDetails": {"k": "v" * 1025}},
        {"op": "update", "status": "FAILED", "statusDetails": {"k": ""}},
        {"op": "update", "status": "FAILED", "statusDetails": {"bad key": "v"}},
        {"op": "update", "status": "FAILED", "statusDetails": {"k": 5}},
        {"op": "update", "status": "FAILED", "expectedVersion": True},
        {"op": "update", "status": "FAILED", "stepTimeoutInMinutes": 0},
        {"op": "start", "stepTimeoutInMinutes": 10081},
        {"op": "describe", "jobId": "ok", "includeJobDocument": "yes"},
    ],
)
def test_parameters_validated_before_sending(thing: Thing, call: dict[str, Any]) -> None:
    before = len(thing.emulator.call(lambda s: list(s.history)))

    async def body() -> InvalidRequestException:
        async with open_client(thing.config) as jobs:
            args = dict(call)
            op = args.pop("op")
            args.setdefault("thingName", thing.name)
            fn = {
                "get": jobs.get_pending_job_executions,
                "start": jobs.start_next_pending_job_execution,
                "describe": jobs.describe_job_execution,
                "update": jobs.update_job_execution,
            }[op]
            if op == "update":
                args.setdefault("jobId", "ok")
            with pytest.raises(InvalidRequestException) as info:
                await fn(**args)
            return info.value

    exc = run(body())
    assert exc.code == "InvalidRequest"
    assert str(exc)  # says which parameter
    assert len(thing.emulator.call(lambda s: list(s.history))) == before  # nothing was sent


def test_concurrent_requests_are_correlated(thing: Thing) -> None:
    ids = [thing.j(f"c{i}") for i in range(12)]
    for job_id in ids:
        thing.emulator.create_job(job_id, [thing.name], {"operation": "n", "id": job_id})

    async def body() -> list[dict[str, Any]]:
        async with open_client(thing.config) as jobs:
            return await asyncio.gather(
                *(jobs.describe_job_execution(jobId=job_id, thingName=thing.name) for job_id in ids)
            )

    results = run(body())
    assert [r["execution"]["jobId"] for r in results] == ids
    assert [json.loads(r["execution"]["jobDocument"])["id"] for r in results] == ids


def test_get_pending_lists_at_most_ten(thing: Thing) -> None:
    for i in range(12):
        thing.emulator.create_job(thing.j(f"many-{i:02d}"), [thing.name], DOC)

    async def body() -> dict[str, Any]:
        async with open_client(thing.config) as jobs:
            return await jobs.get_pending_job_executions(thingName=thing.name)

    result = run(body())
    assert [s["jobId"] for s in result["queuedJobs"]] == [
        thing.j(f"many-{i:02d}") for i in range(10)
    ]
