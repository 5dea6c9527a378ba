"""The sandbox's policy store (agent.sandbox.policies): AWS's rules for policies, certificates
and attachments, and the pushes that keep the broker in step. No broker here: see
tests/integration/test_policies.py for the same rules through boto3 and Mosquitto."""

from __future__ import annotations

import json

import pytest

from agent.sandbox._validate import Rejection
from agent.sandbox.iot_policy import JOBS_POLICY, THING_NAME, Grants
from agent.sandbox.policies import Certificate, Policies, PolicyStore

REGION, ACCOUNT = "us-east-1", "123456789012"
PREFIX = f"arn:aws:iot:{REGION}:{ACCOUNT}:"
CERT_A, CERT_B = "a" * 64, "b" * 64
PUBLISH_X = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"},
    {"Effect": "Allow", "Action": "iot:Publish",
     "Resource": f"arn:aws:iot:*:*:topic/{THING_NAME}/x"}]})


def store() -> PolicyStore:
    out = PolicyStore(region=REGION, account_id=ACCOUNT)
    out.add_certificate(Certificate(CERT_A, "dev-a", "PEM-A", 100))
    out.add_certificate(Certificate(CERT_B, "dev-b", "PEM-B", 100))
    return out


def code(exc: pytest.ExceptionInfo[Rejection]) -> str:
    return exc.value.code


def test_policy_lifecycle() -> None:
    s = store()
    created = s.create_policy("p1", PUBLISH_X, 5)

    assert created == {"policyName": "p1", "policyArn": PREFIX + "policy/p1",
                       "policyDocument": PUBLISH_X, "policyVersionId": "1"}
    got = s.get_policy("p1")
    assert (got["policyDocument"], got["defaultVersionId"], got["creationDate"]) == (
        PUBLISH_X, "1", 5)
    s.create_policy("p0", PUBLISH_X, 6)
    assert [p["policyName"] for p in s.list_policies()] == ["p0", "p1"]
    assert [p["policyName"] for p in s.list_policies(ascending=False)] == ["p1", "p0"]
    with pytest.raises(Rejection) as info:
        s.create_policy("p1", PUBLISH_X, 7)
    assert code(info) == "ResourceAlreadyExists"
    assert s.delete_policy("p1") == set()
    with pytest.raises(Rejection) as info:
        s.get_policy("p1")
    assert code(info) == "ResourceNotFound"


@pytest.mark.parametrize(("name", "document", "expected"), [
    ("bad name", PUBLISH_X, "InvalidRequest"),
    ("x" * 129, PUBLISH_X, "InvalidRequest"),
    ("ok", "{", "MalformedPolicy"),
    ("ok", None, "MalformedPolicy"),
])
def test_create_policy_refusals(name: str, document: object, expected: str) -> None:
    with pytest.raises(Rejection) as info:
        store().create_policy(name, document, 0)
    assert code(info) == expected


def test_attach_detach_and_what_they_touch() -> None:
    s = store()
    s.create_policy("p", PUBLISH_X, 0)
    cert_a = s.certificate_arn(CERT_A)

    assert s.attach_policy("p", cert_a) == {"dev-a"}
    assert s.attach_policy("p", cert_a) == {"dev-a"}  # twice: still once
    assert s.attached_policies(cert_a) == [{"policyName": "p", "policyArn": PREFIX + "policy/p"}]
    assert s.targets_for_policy("p") == [cert_a]
    with pytest.raises(Rejection) as info:
        s.delete_policy("p")
    assert code(info) == "DeleteConflict"
    assert s.detach_policy("p", cert_a) == {"dev-a"}
    assert s.detach_policy("p", cert_a) == {"dev-a"}  # not attached: fine
    assert s.attached_policies(cert_a) == []
    s.delete_policy("p")


@pytest.mark.parametrize(("target", "expected", "words"), [
    (f"{PREFIX}thing/dev-a", "InvalidRequest", "list_thing_principals"),
    (f"{PREFIX}cert/{'c' * 64}", "ResourceNotFound", "does not exist"),
    ("arn:aws:iot:eu-west-1:1:cert/" + CERT_A, "InvalidRequest", "not a certificate ARN"),
    (None, "InvalidRequest", "certificate ARN"),
])
def test_targets_are_certificates_of_this_sandbox(target: object, expected: str,
                                                  words: str) -> None:
    s = store()
    s.create_policy("p", PUBLISH_X, 0)
    with pytest.raises(Rejection) as info:
        s.attach_policy("p", target)
    assert code(info) == expected
    assert words in info.value.message


def test_detach_of_an_unknown_policy_is_invalid_request() -> None:
    """DetachPolicy's model has no ResourceNotFoundException."""
    with pytest.raises(Rejection) as info:
        store().detach_policy("nope", PREFIX + "cert/" + CERT_A)
    assert code(info) == "InvalidRequest"


def test_at_most_ten_policies_per_certificate() -> None:
    s = store()
    cert = s.certificate_arn(CERT_A)
    for i in range(11):
        s.create_policy(f"p{i}", PUBLISH_X, 0)
    for i in range(10):
        s.attach_policy(f"p{i}", cert)
    with pytest.raises(Rejection) as info:
        s.attach_policy("p10", cert)
    assert code(info) == "LimitExceeded"


def test_grants_are_the_union_of_a_certificates_policies_for_its_thing() -> None:
    s = store()
    s.create_policy("jobs", JOBS_POLICY, 0)
    s.create_policy("x", PUBLISH_X, 0)
    cert_a = s.certificate_arn(CERT_A)
    assert s.grants("dev-a") == Grants(False, (), ())  # nothing attached: nothing allowed

    s.attach_policy("x", cert_a)
    assert s.grants("dev-a") == Grants(True, (), ())  # ${thing} unresolved: matches nothing
    assert s.attach_thing_principal("thing-a", CERT_A) == {"dev-a"}
    assert {a.topic for a in s.grants("dev-a").allow} == {"thing-a/x"}

    s.attach_policy("jobs", cert_a)
    topics = {a.topic for a in s.grants("dev-a").allow}
    assert {"thing-a/x", "$aws/things/thing-a/jobs/get"} <= topics
    assert s.grants("dev-b") == Grants(False, (), ())  # the other certificate is untouched
    assert s.thing_principals("thing-a") == [cert_a]
    assert s.thing_principals("thing-b") == []


def test_describe_certificate() -> None:
    described = store().describe_certificate(CERT_A)
    assert described["certificateArn"] == PREFIX + "cert/" + CERT_A
    assert (described["status"], described["certificatePem"]) == ("ACTIVE", "PEM-A")
    with pytest.raises(Rejection):
        store().describe_certificate("c" * 64)


def test_policies_push_only_changes_and_in_order() -> None:
    pushed: list[tuple[str, bool, int]] = []
    policies = Policies(store(), lambda who, g: pushed.append((who, g.connect, len(g.allow))))
    policies.call(lambda s: s.create_policy("x", PUBLISH_X, 0))
    cert_a = policies.call(lambda s: s.certificate_arn(CERT_A))

    policies.change(lambda s: s.attach_thing_principal("thing-a", CERT_A))
    policies.change(lambda s: s.attach_policy("x", cert_a))
    policies.change(lambda s: s.attach_policy("x", cert_a))  # no change: no push
    policies.change(lambda s: s.detach_policy("x", cert_a))

    assert pushed == [("dev-a", False, 0), ("dev-a", True, 1), ("dev-a", False, 0)]
