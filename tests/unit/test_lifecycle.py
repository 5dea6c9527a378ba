"""The lifecycle decisions, exhaustively: step timeouts, version conflicts."""

from __future__ import annotations

import itertools

import pytest

from agent.jobs.shapes import STATUSES, TERMINAL_STATUSES
from agent.lifecycle import MAX_STEP_MINUTES, Conflict, resolve_conflict, step_timeout_minutes


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
