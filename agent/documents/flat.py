"""Device Client's old flat form: ``{"operation": "x.sh", "args": [...], "path": "default"}``.

Used when a document has no ``version`` and its ``operation`` names no YAML handler (then it is
the native form): one runHandler step whose name and handler are ``operation``. Device Client no
longer develops this form; jobs written for it years ago still arrive.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from agent.config import Config
from agent.documents.fields import args, boolean, line_count, text
from agent.documents.lookup import Host, handler_step
from agent.documents.plan import Plan, label

__all__ = ["parse"]


def parse(document: dict[str, Any], config: Config, host: Host) -> Plan:
    operation = text(document.get("operation"), '"operation"')
    step = handler_step(label(operation, "operation"), operation,
                        args(document.get("args")),
                        text(document.get("path"), '"path"', required=False),
                        text(document.get("runAsUser"), '"runAsUser"', required=False),
                        config, host, what="operation")
    step = dataclasses.replace(step, allow_stderr=line_count(document.get("allowStdErr"),
                                                             '"allowStdErr"'))
    return Plan("flat", (step,), document,
                include_stdout=boolean(document.get("includeStdOut"), '"includeStdOut"'))
