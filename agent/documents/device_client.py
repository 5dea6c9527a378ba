"""Device Client's schema, ``"version": "1.0"``: what the AWS console, the CLI and the AWS
managed templates create.

``steps`` (each ``{"action": {...}}``) run in order, then ``finalStep``; an action is
``runHandler`` (``input.handler``, ``input.args``, ``input.path``) or ``runCommand``
(``input.command``), with ``runAsUser``, ``ignoreStepFailure`` and ``allowStdErr``;
``includeStdOut`` and ``conditions`` sit at the top. Booleans are accepted as the strings
``"true"``/``"false"`` (what Device Client reads) and as JSON booleans (what its README shows).
Unknown keys (``_comment``...) are ignored. Anything that cannot run as written rejects the
whole document before its first step runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from agent.config import Config
from agent.documents.command import split_command
from agent.documents.conditions import check_conditions
from agent.documents.fields import args, boolean, line_count, text
from agent.documents.lookup import Host, command_step, handler_step
from agent.documents.plan import MAX_STEPS, DocumentError, Plan, Step, label

__all__ = ["VERSION", "parse"]

VERSION = "1.0"


def parse(document: dict[str, Any], config: Config, host: Host) -> Plan:
    version = document.get("version")
    if version != VERSION:
        raise DocumentError(f'"version" {str(version)[:20]!r} is not supported: this agent runs '
                            f'Device Client\'s schema "{VERSION}" and its own form')
    check_conditions(document.get("conditions"), config.device_facts)
    include_stdout = boolean(document.get("includeStdOut"), '"includeStdOut"')
    steps = document.get("steps")
    if not isinstance(steps, list) or not steps:
        raise DocumentError('"steps" must be a non-empty list of {"action": {...}}')
    final = document.get("finalStep")
    total = len(steps) + (final is not None)
    if total > MAX_STEPS:
        raise DocumentError(f"the document has {total} steps; at most {MAX_STEPS} are allowed")
    planned = [_step(item, f"steps[{i}]", config, host) for i, item in enumerate(steps)]
    if final is not None:
        planned.append(_step(final, "finalStep", config, host))
    return Plan("device-client", tuple(planned), document, final=final is not None,
                include_stdout=include_stdout)


def _step(item: object, where: str, config: Config, host: Host) -> Step:
    action = item.get("action") if isinstance(item, dict) else None
    if not isinstance(action, dict):
        raise DocumentError(f'{where} must be an object {{"action": {{...}}}}')
    where += ".action"
    name = label(action.get("name"), where)
    kind = action.get("type")
    given = action.get("input")
    if not isinstance(given, dict):
        raise DocumentError(f'{where}.input must be an object')
    run_as = text(action.get("runAsUser"), f"{where}.runAsUser", required=False)
    if kind == "runHandler":
        step = handler_step(name, text(given.get("handler"), f"{where}.input.handler"),
                            args(given.get("args"), f"{where}.input.args"),
                            text(given.get("path"), f"{where}.input.path", required=False),
                            run_as, config, host)
    elif kind == "runCommand":
        argv = split_command(text(given.get("command"), f"{where}.input.command"))
        step = command_step(name, argv, run_as, config, host)
    else:
        raise DocumentError(f'{where}.type must be "runHandler" or "runCommand", got '
                            f"{str(kind)[:40]!r}")
    return dataclasses.replace(
        step, ignore_failure=boolean(action.get("ignoreStepFailure"),
                                     f"{where}.ignoreStepFailure"),
        allow_stderr=line_count(action.get("allowStdErr"), f"{where}.allowStdErr"))
