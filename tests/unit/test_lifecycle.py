"""The lifecycle decisions, exhaustively: documents, step timeouts, version conflicts."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import HandlerConfig
from agent.jobs.shapes import STATUSES, TERMINAL_STATUSES
from agent.lifecycle import (
    MAX_STEP_MINUTES,
    Conflict,
    DocumentError,
    parse_document,
    resolve_conflict,
    step_timeout_minutes,
)

HANDLERS = {"reboot": HandlerConfig(command=("/usr/lib/x/reboot.sh",)),
            "run": HandlerConfig(command=("/usr/lib/x/run.sh", "--fixed"), timeout=600)}


def test_valid_document() -> None:
    work = parse_document('{"operation": "run", "args": ["a b", "$(x)"], "extra": 1}', HANDLERS)
    assert work.operation == "run"
    assert work.argv == ["/usr/lib/x/run.sh", "--fixed", "a b", "$(x)"]
    assert work.document == {"operation": "run", "args": ["a b", "$(x)"], "extra": 1}
    assert parse_document('{"operation": "reboot"}', HANDLERS).args == ()


@pytest.mark.parametrize(("text", "reason"), [
    (None, "no document"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ("{}", 'no "operation"'),
    ('{"operation": 5}', 'no "operation"'),
    ('{"operation": "format"}', "no handler for operation 'format' on this device "
                                "(configured: reboot, run)"),
    ('{"operation": "run", "args": "x"}', '"args" must be a list'),
    ('{"operation": "run", "args": [1]}', '"args"[0] must be a string'),
    ('{"operation": "run", "args": ["a\\u0000b"]}', "NUL byte"),
    (json.dumps({"operation": "run", "args": ["x" * 5000]}), "over 4096"),
    (json.dumps({"operation": "run", "args": ["x"] * 300}), "at most 256"),
])
def test_invalid_documents(text: str | None, reason: str) -> None:
    with pytest.raises(DocumentError, match=None) as info:
        parse_document(text, HANDLERS)
    assert reason in str(info.value)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
                    max_leaves=10))
def test_any_json_document_is_either_work_or_a_clear_rejection(value: object) -> None:
    """No document, however odd, crashes the dispatcher: it runs a known handler or is refused."""
    try:
        work = parse_document(json.dumps(value), HANDLERS)
    except DocumentError as exc:
        assert str(exc)
    else:
        assert work.operation in HANDLERS
        assert all(isinstance(a, str) for a in work.args)


@pytest.mark.parametrize(("seconds", "minutes"), [
    (1, 2), (59, 2), (60, 2), (61, 3), (600, 11), (13 * 60, 14), (14 * 60, MAX_STEP_MINUTES),
    (3600, MAX_STEP_MINUTES), (7 * 86400, MAX_STEP_MINUTES), (0, 1),
])
def test_step_timeout(seconds: float, minutes: int) -> None:
    assert step_timeout_minutes(seconds) == minutes


STATES = [None, {}] + [
    {"status": s, "statusDetails": d, "versionNumber": 5}
    for s, d in itertools.product(sorted(STATUSES), [{}, {"progress": "40"}])]


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("desired", ["IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED"])
@pytest.mark.parametrize("details", [None, {"progress": "40"}])
def test_every_conflict_is_decided(state: dict[str, object] | None, desired: str,
                                   details: dict[str, str] | None) -> None:
    decision = resolve_conflict(desired, details, state)
    status = (state or {}).get("status")
    if not state:
        assert decision is Conflict.GONE
    elif status == desired and (details is None or state["statusDetails"] == details):
        assert decision is Conflict.ALREADY_APPLIED
    elif status in TERMINAL_STATUSES or status == "QUEUED":
        assert decision is Conflict.GONE  # never overwrite what the cloud decided
    else:
        assert status == "IN_PROGRESS" and decision is Conflict.RETRY


def test_absurdly_nested_document_is_rejected_not_a_crash() -> None:
    with pytest.raises(DocumentError, match="not valid JSON"):
        parse_document("[" * 100_000 + "]" * 100_000, HANDLERS)
