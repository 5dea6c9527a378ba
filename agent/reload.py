"""``systemctl reload iot-jobs-agent`` (SIGHUP): which settings of a re-read config apply now.

The decision is plain code (:func:`plan_reload`); the agent (:mod:`agent.app`) reads the file,
refuses it whole if :func:`agent.config.load_checked` finds any problem (the running
configuration stays, the problems are logged), and otherwise runs with the plan's config.

What applies to a running agent: handlers (to jobs claimed from now on; a running job keeps the
handler it started with), limits and intervals, retention, the reboot command, the log level,
the metrics file. What does not, and is named in the log as needing a restart: the identity and
the connection (``thing_name``, ``mqtt``), where the journal lives (``state_dir``), where the
boot id is read (recovery compares it with what the journal recorded), the log format, and
AWS IoT Commands (``commands``: its subscriptions are made with the connection; commands run
from now on do use the reloaded handlers and limits).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from agent.config import Config, load_checked
from agent.errors import ConfigError

__all__ = ["RESTART_SETTINGS", "Outcome", "ReloadPlan", "plan_reload", "reread"]

log = logging.getLogger("agent.reload")

RESTART_SETTINGS = ("thing_name", "mqtt", "state_dir", "boot_id_path", "log_format", "commands")
"""Top-level settings a running agent keeps until it restarts."""


@dataclass(frozen=True)
class ReloadPlan:
    config: Config  # what the agent runs with from now on
    applied: tuple[str, ...]  # changed settings that apply now
    restart: tuple[str, ...]  # changed settings that wait for a restart

    @property
    def summary(self) -> str:
        parts = []
        if self.applied:
            parts.append("applied " + ", ".join(self.applied))
        if self.restart:
            parts.append("needs a restart to change " + ", ".join(self.restart))
        return "; ".join(parts) or "no changes"


def _changes(old: Config, new: Config) -> list[str]:
    """Every changed setting, ``mqtt.port`` and ``handlers.x added`` precise."""
    out: list[str] = []
    for f in dataclasses.fields(Config):
        if f.metadata.get("internal"):
            continue
        before, after = getattr(old, f.name), getattr(new, f.name)
        if before == after:
            continue
        if f.name == "mqtt":
            out += [f"mqtt.{g.name}" for g in dataclasses.fields(before)
                    if getattr(before, g.name) != getattr(after, g.name)]
        elif f.name == "handlers":
            for name in sorted(set(before) | set(after)):
                if name not in after:
                    out.append(f"handlers.{name} removed")
                elif name not in before:
                    out.append(f"handlers.{name} added")
                elif before[name] != after[name]:
                    out.append(f"handlers.{name} changed")
        else:
            out.append(f.name)
    return out


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    """Apply what ``new`` changes, except :data:`RESTART_SETTINGS`, which keep ``old``'s."""
    changes = _changes(old, new)
    restart = tuple(c for c in changes if c.split(".")[0] in RESTART_SETTINGS)
    applied = tuple(c for c in changes if c not in restart)
    effective = dataclasses.replace(new, **{name: getattr(old, name)
                                            for name in RESTART_SETTINGS})
    return ReloadPlan(effective, applied, restart)


@dataclass(frozen=True)
class Outcome:
    """What :func:`reread` decided: the config to run with (None: refused) and why."""

    config: Config | None
    message: str

    @property
    def ok(self) -> bool:
        return self.config is not None


def reread(current: Config) -> Outcome:
    """Read ``current.source`` again and log the verdict, one line per problem or change.

    A config with any problem is refused whole (a half-applied config is a config nobody
    wrote); the caller keeps ``current``.
    """
    path = current.source
    log.info("reloading the configuration path=%s", path)
    try:
        if path is None:
            raise ConfigError("the agent was not started from a config file")
        new = load_checked(path)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("reload refused: %s", problem)
        log.error("reload refused: %d problem(s) in %s; still running the previous "
                  "configuration", len(exc.problems), path)
        return Outcome(None, f"{len(exc.problems)} problem(s), the first: {exc.problems[0]}")
    plan = plan_reload(current, new)
    log.info("configuration reloaded path=%s %s", path, plan.summary)
    if plan.restart:
        log.warning("configuration reload: %s changed in %s but take effect only at a restart "
                    "(systemctl restart iot-jobs-agent); still using the running values",
                    ", ".join(plan.restart), path)
    return Outcome(plan.config, plan.summary)
