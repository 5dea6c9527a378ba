"""Job documents -> plans: the one seam every document form goes through.

:func:`plan_job` turns a job document, in any of the forms AWS's tools and this agent use, into
a :class:`Plan` before anything runs, or raises :class:`DocumentError` with the REJECTED reason.
One module per form, behind this function:

- :mod:`~agent.documents.native`: ``{"operation": "<YAML handler>", "args": [...]}``;
- :mod:`~agent.documents.device_client`: Device Client's schema ``"version": "1.0"`` (the AWS
  console, CLI and managed templates), with :mod:`~agent.documents.conditions` and
  :mod:`~agent.documents.command` (runCommand's comma-separated argv);
- :mod:`~agent.documents.flat`: Device Client's old ``{"operation": "x.sh", "path": ...}``.

Which program a step may run is decided by :mod:`~agent.documents.lookup`, against the config.
"""

from __future__ import annotations

import json
from typing import Any

from agent.config import Config
from agent.documents import device_client, flat, native
from agent.documents.lookup import Host, SystemHost
from agent.documents.plan import DocumentError, Plan, Step, Verdict, judge

__all__ = ["DocumentError", "Host", "Plan", "Step", "SystemHost", "Verdict", "judge",
           "plan_document", "plan_job"]


def plan_job(text: str | None, config: Config, host: Host | None = None) -> Plan:
    """The plan for a job document as the service sends it (a JSON string)."""
    if text is None:
        raise DocumentError("the job has no document")
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
        raise DocumentError("the job document is not valid JSON") from None
    return plan_document(document, config, host)


def plan_document(document: Any, config: Config, host: Host | None = None) -> Plan:
    """The plan for a parsed document (the journal keeps them parsed)."""
    if not isinstance(document, dict):
        raise DocumentError("the job document must be a JSON object like "
                            '{"operation": "<handler>", "args": []}')
    host = host or SystemHost()
    operation = document.get("operation")
    yaml_handler = isinstance(operation, str) and operation in config.handlers
    if "steps" in document or ("version" in document and not yaml_handler):
        return device_client.parse(document, config, host)
    if not isinstance(operation, str) or not operation:
        raise DocumentError('the job document has no "operation" naming a handler (nor '
                            '"version" and "steps", Device Client\'s schema)')
    if yaml_handler:  # even with a "version" of its own: the native form came first
        return native.parse(document, config)
    return flat.parse(document, config, host)
