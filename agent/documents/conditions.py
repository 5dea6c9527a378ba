"""Device Client's ``conditions``, evaluated (Device Client parses them and never checks them).

``[{"key": "operatingSystem", "value": ["ubuntu", "debian"], "type": "stringEqual"}]``: the
device's fact ``operatingSystem`` (from ``device_facts:`` in the config) must be one of the
values. ``stringEqual`` is the only type Device Client knows, and the default. A job for other
devices is REJECTED before anything runs, with a reason that names the fact; so is a condition on
a fact this device does not define, because "unknown" is not "true".
"""

from __future__ import annotations

from collections.abc import Mapping

from agent.documents.fields import text
from agent.documents.plan import DocumentError

__all__ = ["check_conditions"]

_MAX_SHOWN = 200


def check_conditions(value: object, facts: Mapping[str, str]) -> None:
    """Raise :class:`DocumentError` unless every condition holds for ``facts``."""
    if value is None:
        return
    if not isinstance(value, list):
        raise DocumentError('"conditions" must be a list of {"key", "value", "type"}')
    for i, condition in enumerate(value):
        where = f"conditions[{i}]"
        if not isinstance(condition, dict):
            raise DocumentError(f'{where} must be an object {{"key", "value", "type"}}')
        key = text(condition.get("key"), f"{where}.key")
        kind = condition.get("type", "stringEqual")
        if kind != "stringEqual":
            raise DocumentError(f"{where}.type {str(kind)[:40]!r} is not supported (only "
                                "stringEqual)")
        wanted = condition.get("value")
        if isinstance(wanted, str):
            wanted = [wanted]
        if not isinstance(wanted, list) or not wanted or not all(
                isinstance(w, str) for w in wanted):
            raise DocumentError(f"{where}.value must be a non-empty list of strings")
        if key not in facts:
            raise DocumentError(f"condition on {key[:64]!r}: this device does not define that "
                                "fact (add it to device_facts in the agent's config)")
        if facts[key] not in wanted:
            shown = ", ".join(repr(w) for w in wanted)
            if len(shown) > _MAX_SHOWN:
                shown = shown[:_MAX_SHOWN] + "..."
            raise DocumentError(f"condition not met: {key[:64]} is {facts[key][:64]!r} on this "
                                f"device; the job wants one of {shown}")
