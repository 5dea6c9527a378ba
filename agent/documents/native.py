"""The agent's own form, ``{"operation": "<YAML handler>", "args": ["..."]}``: one step.

Only handlers declared in the config can be named; ``args`` are appended to the handler's
command as separate argv entries (never a shell). Other keys are allowed and reach the handler
with the rest of the document.
"""

from __future__ import annotations

from typing import Any

from agent.config import Config
from agent.documents.fields import args
from agent.documents.plan import Plan, Step

__all__ = ["parse"]


def parse(document: dict[str, Any], config: Config) -> Plan:
    """``document["operation"]`` is known to name a YAML handler."""
    operation = document["operation"]
    handler = config.handlers[operation]
    extra = args(document.get("args"))
    step = Step(operation, "handler", (*handler.command, *extra), handler.timeout, handler.user,
                handler.environment, rerun=handler.idempotent, handler=operation,
                verify=(*handler.verify, *extra) if handler.verify else None)
    return Plan("native", (step,), document)
