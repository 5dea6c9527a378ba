"""Job documents held as text (agent.sandbox.document) and the broker's dynsec commands
(agent.sandbox.dynsec): pure parts, no broker."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.jobs.shapes import document_text
from agent.sandbox._validate import Rejection
from agent.sandbox.document import MAX_DOCUMENT_CHARS, Document, _compact, dumps
from agent.sandbox.dynsec import Acl, config_document, grant_commands

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=20)
OBJECTS = st.dictionaries(st.text(max_size=6), JSON, max_size=5)


@given(OBJECTS, st.sampled_from([None, 0, 2]), st.booleans())
def test_the_scanner_accepts_what_json_writes_and_keeps_it_intact(
        value: dict[str, Any], indent: int | None, ascii_only: bool) -> None:
    text = json.dumps(value, indent=indent, ensure_ascii=ascii_only)
    compact = _compact(text)
    assert json.loads(compact) == json.loads(text)
    assert _compact(compact) == compact  # idempotent
    assert not any(c in compact for c in "\n\r\t")  # only escaped, inside strings


@pytest.mark.parametrize("text", [
    "", "[]", '"x"', "{", "}", '{"a"}', '{"a":1,}', '{"a":[1,]}', '{"a":01}', "{a:1}",
    '{"a":1}x', '{"a":1 "b":2}', '{"a":[1 2]}', '{]', '{"a":}', '{"a":tru}', '{"a":"\x01"}',
    '{"a":"\\x"}', '{"a":[}', '{"a":{]}', '{"a":1}}',
])
def test_the_scanner_refuses_what_is_not_one_json_object(text: str) -> None:
    with pytest.raises(Rejection) as info:
        _compact(text)
    assert info.value.code == "InvalidRequest"
    with pytest.raises(ValueError):  # and Python's parser agrees it is no JSON object
        if not isinstance(json.loads(text), dict):
            raise ValueError


def test_documents_read_as_boto3_writes_them() -> None:
    value = {"operation": "run", "nested": {"ünïcode": [1, 2.5, None]}}
    for given_text in (json.dumps(value), json.dumps(value, indent=4, ensure_ascii=False)):
        document = Document.from_text(given_text)
        assert document.text == document_text(value)  # what the agent writes for MQTT's object
        assert document == value and document == Document.from_value(value)
    assert Document.from_value({"a": "\ud800"}).text == '{"a":"\\ud800"}'  # encodable


def test_a_document_deeper_than_any_parser_is_kept_verbatim() -> None:
    deep = '{"x": ' + "[" * 15000 + "]" * 15000 + "}"
    document = Document.from_text(deep)

    payload = dumps({"execution": {"jobId": "j", "jobDocument": document}, "timestamp": 1})

    assert document.text == deep.replace(" ", "")
    assert payload == '{"execution": {"jobId": "j", "jobDocument": ' + document.text + \
        '}, "timestamp": 1}'
    assert document != {"x": []}  # compared without raising RecursionError


@pytest.mark.parametrize(("text", "words"), [
    (None, "string"), ('"x"', "JSON object"), ("[1]", "JSON object"), ("{", "not JSON"),
    ("{" + '"a":' * 1 + '"' + "x" * MAX_DOCUMENT_CHARS + '"}', "32768"),
])
def test_bad_documents_are_invalid_requests(text: object, words: str) -> None:
    with pytest.raises(Rejection) as info:
        Document.from_text(text)
    assert info.value.code == "InvalidRequest" and words in info.value.message


def test_dumps_refuses_what_is_not_json() -> None:
    with pytest.raises(TypeError):
        dumps({"x": object()})


# ------------------------------------------------------------------------------ dynsec


def test_first_grant_creates_the_client_later_ones_move_it_then_drop_old_roles() -> None:
    deny, allow = [Acl("publishClientSend", "a/secret")], [Acl("publishClientSend", "a/#")]

    first = grant_commands("dev", deny, allow, generation=1)
    second = grant_commands("dev", [], allow, generation=2)

    assert [c["command"] for c in first] == ["createRole", "createRole", "createClient"]
    assert first[0]["acls"] == [{"acltype": "publishClientSend", "topic": "a/secret",
                                 "allow": False}]
    assert first[2]["roles"] == [{"rolename": "policy-deny:dev:1", "priority": 1},
                                 {"rolename": "policy-allow:dev:1", "priority": 0}]
    assert [c["command"] for c in second] == ["createRole", "createRole", "modifyClient",
                                              "deleteRole", "deleteRole"]
    assert [c["rolename"] for c in second[3:]] == ["policy-deny:dev:1", "policy-allow:dev:1"]


def test_the_initial_configuration_denies_all_but_the_fixed_identities() -> None:
    config = config_document({"svc": [Acl("subscribePattern", "$aws/#")]})
    assert config["defaultACLAccess"] == {"publishClientSend": False,
                                          "publishClientReceive": False,
                                          "subscribe": False, "unsubscribe": True}
    assert config["clients"] == [{"username": "svc", "roles": [{"rolename": "fixed:svc"}]}]
    with pytest.raises(ValueError):
        Acl("publish", "x")
