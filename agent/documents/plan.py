"""What every job document becomes before anything runs: a :class:`Plan` of :class:`Step`.

The three document forms (the native ``{"operation", "args"}``, Device Client's schema
``version: "1.0"`` and its old flat form) each parse into this one shape, so the dispatcher, the
runner and the journal never ask which form a job came in. A step says everything that is needed
to run it and to judge it: argv, user, timeout, environment, whether its failure is ignored, how
many stderr lines it may print, whether it may be run again after an agent crash. Plain data, no
I/O.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "MAX_ARGS",
    "MAX_ARG_LENGTH",
    "MAX_STEPS",
    "DocumentError",
    "Plan",
    "Step",
    "StepKind",
    "Verdict",
    "judge",
    "label",
]

MAX_ARGS = 256
MAX_ARG_LENGTH = 4096
MAX_STEPS = 100
"""Steps in one plan, finalStep included. A 32 KB document could carry about 400; a job that
needs more than 100 steps is better split, and a bound keeps the journal and the progress
updates of one job small."""
_MAX_NAME = 128

StepKind = Literal["handler", "script", "program", "command"]
"""``handler``: a YAML handler; ``script``: a file in handler_dir or handler_paths; ``program``:
a bare handler name found on PATH (allowed by run_command.allow); ``command``: runCommand."""


class DocumentError(ValueError):
    """The job document cannot be run; the message is the REJECTED reason shown to operators."""


@dataclass(frozen=True)
class Step:
    """One program to run, and how to judge it."""

    name: str  # the action's name (Device Client) or the operation (native); for status and logs
    kind: StepKind
    argv: tuple[str, ...]
    timeout: float
    user: str | None = None  # run as this user (the agent switches itself; None: its own user)
    environment: Mapping[str, str] = field(default_factory=dict)
    ignore_failure: bool = False  # ignoreStepFailure: a failure does not end the plan
    allow_stderr: int | None = None  # allowStdErr: at most this many stderr lines (None: any)
    rerun: bool = False  # run again from the start if the agent died while it ran
    verify: tuple[str, ...] | None = None  # after a reboot it asked for, this decides
    handler: str | None = None  # the YAML handler's name, when it is one


@dataclass(frozen=True)
class Plan:
    """A job document, checked and resolved: the steps run in order until one fails.

    ``final`` says the last step is Device Client's ``finalStep``, which therefore runs only when
    every step before it succeeded (or failed with ``ignoreStepFailure``). ``device_client``
    plans also report Device Client's statusDetails keys (``stdout``, ``stderr``).
    """

    form: Literal["native", "device-client", "flat"]
    steps: tuple[Step, ...]
    document: dict[str, Any]
    final: bool = False
    include_stdout: bool = False

    @property
    def device_client(self) -> bool:
        """Report Device Client's statusDetails keys too (its dashboards read them)."""
        return self.form != "native"

    @property
    def reports_steps(self) -> bool:
        """Name the step in statusDetails and logs. The native form's one step is the job."""
        return self.form != "native"

    @property
    def operation(self) -> str:
        """One word for the journal and the logs: the handler, or the first step's name."""
        first = self.steps[0].name
        return first if len(self.steps) == 1 else f"{first} (+{len(self.steps) - 1} steps)"

    @property
    def timeout(self) -> float:
        """The longest the whole plan may take: what the job's step timer must cover."""
        return sum(step.timeout for step in self.steps)


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str


def judge(step: Step, outcome: str, reason: str, stderr_lines: int) -> Verdict:
    """Did ``step`` succeed? As Device Client documents it, not as its code behaves.

    The run must have ended with exit 0 (a signal, a timeout, a cancellation or a failure to
    start never succeed); with ``allowStdErr: N`` it also may not have printed more than N lines
    on stderr. Without ``allowStdErr`` the exit code alone decides.
    """
    if outcome != "succeeded":
        return Verdict(False, reason)
    if step.allow_stderr is not None and stderr_lines > step.allow_stderr:
        return Verdict(False, f"{stderr_lines} lines on stderr; allowStdErr allows "
                              f"{step.allow_stderr}")
    return Verdict(True, reason)


def label(text: object, fallback: str) -> str:
    """A name fit for statusDetails and logs: printable, at most 128 characters."""
    if not isinstance(text, str):
        return fallback
    clean = "".join(ch for ch in text if unicodedata.category(ch)[0] != "C").strip()
    return clean[:_MAX_NAME] or fallback
