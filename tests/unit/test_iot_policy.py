"""AWS IoT policy documents -> Mosquitto dynamic-security ACLs (agent.sandbox.iot_policy).

The translation is checked two ways: example by example (each documented approximation), and
against AWS's own matching rule with hypothesis: an ACL the sandbox grants never lets a device
do on a topic what AWS would refuse there, beyond the one documented exception (a trailing
``*`` also matching the parent topic).
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.sandbox._validate import Rejection
from agent.sandbox.dynsec import Acl
from agent.sandbox.iot_policy import (
    COMMANDS_POLICY,
    DEFAULT_POLICIES,
    JOBS_POLICY,
    THING_NAME,
    Grants,
    grants,
    parse_policy,
)

REGION, ACCOUNT = "us-east-1", "123456789012"
ARN = f"arn:aws:iot:{REGION}:{ACCOUNT}:"
CONNECT = {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}


def doc(*statements: dict[str, Any], version: str | None = "2012-10-17") -> str:
    out: dict[str, Any] = {"Statement": list(statements)}
    if version is not None:
        out["Version"] = version
    return json.dumps(out)


def parse(text: str) -> Any:
    return parse_policy(text, region=REGION, account=ACCOUNT)


def grant(*statements: dict[str, Any], thing: str | None = "t1",
          client_id: str = "t1") -> Grants:
    return grants([parse(doc(*statements))], thing=thing, client_id=client_id)


def allow(action: str | list[str], *resources: str) -> dict[str, Any]:
    return {"Effect": "Allow", "Action": action, "Resource": list(resources)}


def deny(action: str | list[str], *resources: str) -> dict[str, Any]:
    return {"Effect": "Deny", "Action": action, "Resource": list(resources)}


def topics(acls: tuple[Acl, ...], kind: str) -> set[str]:
    return {a.topic for a in acls if a.acltype == kind}


# ------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(("text", "words"), [
    ("not json", "not JSON"),
    ("[]", "JSON object"),
    (json.dumps({"Version": "2012-10-17"}), "Statement"),
    (json.dumps({"Version": "2012-10-17", "Statement": []}), "Statement"),
    (doc(CONNECT, version="2008-10-17"), "Version"),
    (json.dumps({"Statement": [CONNECT], "Extra": 1}), "unknown policy element"),
    (doc({"Action": "iot:Connect", "Resource": "*"}), "Effect is required"),
    (doc({"Effect": "Allow", "Resource": "*"}), "Action is required"),
    (doc({"Effect": "Allow", "Action": "iot:Connect"}), "Resource is required"),
    (doc({"Effect": "Maybe", "Action": "iot:Connect", "Resource": "*"}), "Allow or Deny"),
    (doc({**CONNECT, "Foo": 1}), "unknown element"),
    (doc({**CONNECT, "Action": [1]}), "list of strings"),
    (doc({**CONNECT, "Action": []}), "list of strings"),
    (doc({**CONNECT, "Resource": "topic/x"}), "not an AWS IoT ARN"),
    (doc(CONNECT, *[allow("iot:Publish", f"{ARN}topic/{'x' * 60}/{i}") for i in range(30)]),
     "2048"),
])
def test_what_aws_refuses_is_a_malformed_policy(text: str, words: str) -> None:
    with pytest.raises(Rejection) as info:
        parse(text)
    assert info.value.code == "MalformedPolicy"
    assert words in info.value.message


@pytest.mark.parametrize(("statement", "words"), [
    ({**CONNECT, "Condition": {"Bool": {"iot:Connection.Thing.IsAttached": "true"}}},
     "Condition is not supported"),
    ({"Effect": "Allow", "NotAction": "iot:Publish", "Resource": "*"}, "NotAction"),
    ({**CONNECT, "NotResource": "*"}, "NotResource"),
    (allow("iot:RetainPublish", f"{ARN}topic/a"), "'iot:RetainPublish' is not supported"),
    (allow("iot:Pub*", f"{ARN}topic/a"), "'iot:Pub*'"),
    (allow("iot:GetThingShadow", f"{ARN}thing/t1"), "iot:GetThingShadow"),
    (allow("iot:Publish", f"{ARN}topic/sensors/temp*"), "inside a topic level ('temp*')"),
    (allow("iot:Publish", f"{ARN}topic/a/*x/b"), "inside a topic level"),
    (allow("iot:Publish", f"{ARN}topic/a/?"), "? wildcard"),
    (allow("iot:Publish", f"{ARN}topic/${{iot:ClientId}}/x"), "${iot:ClientId} is not"),
    (allow("iot:Publish", f"{ARN}topic/${{iot:Connection.Thing.Attributes[x]}}"),
     "Attributes[x]"),
    (allow("iot:Subscribe", f"{ARN}topicfilter/a/+/*"), "mixes * with a literal + or #"),
    (allow("iot:Publish", "arn:aws:iot:eu-west-1:123456789012:topic/a"), "region 'eu-west-1'"),
    (allow("iot:Publish", "arn:aws:iot:us-east-1:999999999999:topic/a"),
     "account '999999999999'"),
    (allow("iot:Publish", f"{ARN}thing/t1"), "not a topic, topicfilter or client ARN"),
])
def test_what_the_sandbox_cannot_enforce_is_refused_by_name(statement: dict[str, Any],
                                                             words: str) -> None:
    with pytest.raises(Rejection) as info:
        parse(doc(statement))
    assert info.value.code == "InvalidRequest"
    assert words in info.value.message
    assert "subset" in info.value.message


def test_lenient_forms_are_accepted() -> None:
    single = json.dumps({"Version": "2012-10-17", "Id": "x", "Statement": {
        "Sid": "one", "Effect": "Allow", "Action": "iot:*",
        "Resource": "arn:aws:iot:*:*:topic/a"}})
    spaced = doc(CONNECT, allow("iot:Publish", *[f"{ARN}topic/{i}" for i in range(10)]))
    spaced = spaced.replace(",", "," + " " * 100)  # whitespace does not count towards 2048

    assert len(parse(single).statements) == 1
    assert parse(doc(CONNECT, version=None)).statements[0].effect == "Allow"
    assert len(spaced) > 2048 and parse(spaced).statements


# ------------------------------------------------------------------------------ the defaults


def test_default_policies_fit_aws_limits_and_let_a_device_use_only_its_own_jobs_topics() -> None:
    for text in DEFAULT_POLICIES.values():
        assert len("".join(text.split())) <= 2048

    out = grants([parse(JOBS_POLICY), parse(COMMANDS_POLICY)], thing="t1", client_id="t1")

    j = "$aws/things/t1/jobs/"
    c = "$aws/commands/things/t1/executions/+/"
    assert out.connect and out.deny == ()
    assert topics(out.allow, "publishClientSend") == {
        j + "get", j + "start-next", j + "+/get", j + "+/update", c + "response/json"}
    assert topics(out.allow, "publishClientReceive") == {
        j + "notify", j + "notify-next", c + "request/#", c + "response/accepted/json",
        c + "response/rejected/json",
        *(f"{j}{op}/{answer}" for op in ("get", "start-next", "+/get", "+/update")
          for answer in ("accepted", "rejected"))}
    assert topics(out.allow, "subscribePattern") == {
        "$aws/things/t1/jobs/#", "$aws/commands/things/t1/executions/#"}
    assert topics(out.allow, "subscribeLiteral") == set()


# ------------------------------------------------------------------------------ translation


def test_each_action_uses_its_own_resource_type() -> None:
    out = grant(CONNECT, allow("iot:*", f"{ARN}topic/a/b", f"{ARN}topicfilter/c/d",
                               f"{ARN}client/x"))

    assert set(out.allow) == {Acl("publishClientSend", "a/b"),
                              Acl("publishClientReceive", "a/b"),
                              Acl("subscribeLiteral", "c/d")}


@pytest.mark.parametrize(("resource", "expected"), [
    ("a/b", {"a/b"}),
    ("a/*/c", {"a/+/c"}),              # 1: one level in the sandbox, any number in AWS
    ("a/*", {"a/#"}),                  # 2: also matches "a" itself
    ("*", {"#", "$aws/#"}),            # 4: AWS's * reaches the reserved topics too
    ("*/status", {"+/status", "$aws/status"}),
    ("a/+/c", set()),                  # 5: no topic contains +, AWS matches nothing either
    ("a/#", set()),
    ("$SYS/broker/load", set()),       # the broker's own $ topics are never granted
    ("$CONTROL/dynamic-security/v1", set()),
    (f"$aws/things/{THING_NAME}/jobs/*", {"$aws/things/t1/jobs/#"}),
    (f"{THING_NAME}-x/*/y", {"t1-x/+/y"}),
])
def test_topic_resources_become_mqtt_patterns(resource: str, expected: set[str]) -> None:
    out = grant(CONNECT, allow("iot:Publish", f"{ARN}topic/{resource}"))
    assert topics(out.allow, "publishClientSend") == expected


@pytest.mark.parametrize(("resource", "kind", "expected"), [
    ("a/+/c", "subscribeLiteral", {"a/+/c"}),      # + and # are literal: exactly this filter
    ("a/#", "subscribeLiteral", {"a/#"}),
    ("a/*", "subscribePattern", {"a/#"}),
    ("a/*/c", "subscribePattern", {"a/+/c"}),
    ("*", "subscribePattern", {"#", "$aws/#"}),
    ("$CONTROL/#", "subscribeLiteral", set()),
])
def test_topicfilter_resources(resource: str, kind: str, expected: set[str]) -> None:
    out = grant(CONNECT, allow("iot:Subscribe", f"{ARN}topicfilter/{resource}"))
    assert topics(out.allow, kind) == expected
    assert {a.acltype for a in out.allow} <= {kind}


def test_resource_star_grants_everything_but_the_brokers_own_topics() -> None:
    out = grant(allow("iot:*", "*"))
    assert out.connect
    for kind in ("publishClientSend", "publishClientReceive", "subscribePattern"):
        assert topics(out.allow, kind) == {"#", "$aws/#"}


def test_deny_statements_go_to_the_deny_role() -> None:
    out = grant(CONNECT, allow("iot:Publish", f"{ARN}topic/a/*"),
                deny("iot:Publish", f"{ARN}topic/a/secret"))
    assert out.deny == (Acl("publishClientSend", "a/secret"),)
    assert out.allow == (Acl("publishClientSend", "a/#"),)


def test_the_thing_variable_needs_a_thing() -> None:
    statement = allow("iot:Publish", f"{ARN}topic/{THING_NAME}/x", f"{ARN}topic/fixed")
    assert topics(grant(CONNECT, statement, thing="dev").allow, "publishClientSend") == {
        "dev/x", "fixed"}
    assert topics(grant(CONNECT, statement, thing=None).allow, "publishClientSend") == {"fixed"}


@pytest.mark.parametrize(("statements", "client_id", "thing", "connect"), [
    ([], "t1", "t1", False),
    ([allow("iot:Connect", f"{ARN}client/t1")], "t1", "t1", True),
    ([allow("iot:Connect", f"{ARN}client/other")], "t1", "t1", False),
    ([allow("iot:Connect", f"{ARN}client/t*")], "t1", "t1", True),
    ([allow("iot:Connect", f"{ARN}client/{THING_NAME}")], "t1", "t1", True),
    ([allow("iot:Connect", f"{ARN}client/{THING_NAME}")], "t1", None, False),
    ([allow("iot:Connect", f"{ARN}client/${{iot:ClientId}}")], "anything", None, True),
    ([allow("iot:Connect", f"{ARN}topic/t1")], "t1", "t1", False),
    ([CONNECT, deny("iot:Connect", f"{ARN}client/t1")], "t1", "t1", False),
    ([allow("iot:*", "*")], "t1", "t1", True),
])
def test_connect_is_evaluated_for_the_client_id(statements: list[dict[str, Any]],
                                                client_id: str, thing: str | None,
                                                connect: bool) -> None:
    everything = allow("iot:Publish", f"{ARN}topic/x")
    out = grant(*statements, everything, thing=thing, client_id=client_id) if statements \
        else grants([parse(doc(everything))], thing=thing, client_id=client_id)
    assert out.connect is connect
    if not connect:
        assert out == Grants(False, (), ())  # connected but may do nothing


# ------------------------------------------------------------------------------ vs AWS's rule


def aws_matches(pattern: str, topic: str) -> bool:
    """AWS IoT's resource matching: ``*`` is any run of characters, ``/`` included."""
    regex = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, topic, re.DOTALL) is not None


def mqtt_matches(pattern: str, topic: str) -> bool:
    """MQTT 5 section 4.7 (what Mosquitto's ACL check does), written out independently."""
    if topic.startswith("$") and pattern[:1] in ("+", "#"):
        return False
    p, t = pattern.split("/"), topic.split("/")
    for i, level in enumerate(p):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(p) == len(t)


LEVEL = st.sampled_from(["a", "b", "$aws", ""])
TOPICS = st.lists(LEVEL, min_size=1, max_size=5).map("/".join)
PATTERNS = st.lists(st.sampled_from(["a", "b", "$aws", "*"]), min_size=1, max_size=4).map(
    "/".join)


@given(PATTERNS, TOPICS)
def test_a_granted_topic_is_one_aws_grants_too(pattern: str, topic: str) -> None:
    out = grant(CONNECT, allow("iot:Publish", f"{ARN}topic/{pattern}"))
    granted = any(mqtt_matches(p, topic) for p in topics(out.allow, "publishClientSend"))
    parent = pattern.endswith("/*") and aws_matches(pattern[:-2], topic)
    if granted:
        assert aws_matches(pattern, topic) or parent, (pattern, topic)


@given(PATTERNS, TOPICS)
def test_aws_grants_are_kept_when_each_star_is_one_level(pattern: str, topic: str) -> None:
    levels = pattern.split("/")
    one_per_star = len(levels) == len(topic.split("/")) or levels[-1] == "*"
    out = grant(CONNECT, allow("iot:Publish", f"{ARN}topic/{pattern}"))
    granted = any(mqtt_matches(p, topic) for p in topics(out.allow, "publishClientSend"))
    single = all(lv == "*" or lv == tv for lv, tv in zip(levels, topic.split("/"),
                                                         strict=False))
    if aws_matches(pattern, topic) and one_per_star and single:
        assert granted, (pattern, topic)
