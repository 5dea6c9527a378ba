"""The agent's YAML configuration: frozen dataclasses, one declaration per setting.

Loading happens in two steps (as uvicorn's ``Config``/``Config.load``): :func:`load_config`
parses and validates the *shape* of the file, reporting every problem with its YAML line;
:func:`check_files` then looks at the files the config names (existence, readability, key-file
mode), because a config is often written before the certificates are installed.

Each field's ``metadata`` carries its help text and, where the YAML form differs from the Python
type (durations written ``30s``/``10m``/``1h``), the parser. The generic builder below walks the
dataclasses, so adding a setting is one line in one place.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import re
import stat
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent.errors import ConfigError
from agent.hygiene import Secret
from agent.paths import (
    directory_problem,
    job_logs_dir,
    program_problem,
    state_dir_problem,
    state_dirs,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "SAFE_PATH",
    "SHIPPED_HANDLERS",
    "CommandsConfig",
    "Config",
    "HandlerConfig",
    "HandlerLimits",
    "MqttConfig",
    "RunCommandConfig",
    "check_files",
    "load_checked",
    "load_config",
    "parse_duration",
]

DEFAULT_CONFIG_PATH = Path("/etc/iot-jobs-agent/config.yaml")
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""The PATH every handler and command starts with, and where bare program names are looked up."""
SHIPPED_HANDLERS = Path(__file__).resolve().parent / "handlers"
"""The handlers the package installs (package data): Device Client's managed-template scripts."""

_THING_NAME = re.compile(r"[a-zA-Z0-9:_-]{1,128}")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object) -> float:
    """``30s``/``10m``/``1h``/``250ms`` or a bare number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 10m or 1h")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.fullmatch(value.strip())):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError(f"expected a duration like 30s, 10m or 1h, got {value!r}")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def _thing_name(value: object) -> str:
    if not isinstance(value, str) or not _THING_NAME.fullmatch(value):
        raise ValueError(
            f"expected 1-128 characters of letters, digits, ':', '_' or '-', got {value!r}"
        )
    return value


def _port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"expected a port number 1-65535, got {value!r}")
    return value


def _setting(help: str, *, parse: Callable[[object], Any] | None = None, **kw: Any) -> Any:
    return field(metadata={"help": help, "parse": parse}, **kw)


@dataclass(frozen=True)
class MqttConfig:
    """How to reach AWS IoT Core (or the sandbox broker) over mutually authenticated TLS."""

    endpoint: str = _setting("ATS data endpoint, e.g. abc123-ats.iot.eu-west-1.amazonaws.com")
    cert: Path = _setting("device certificate (PEM)")
    key: Path = _setting("device private key (PEM); must not be readable by group or others")
    ca: Path | None = _setting("CA bundle to trust (AmazonRootCA1.pem); system store if unset",
                               default=None)
    port: int = _setting("broker port; always explicit (8883 for AWS IoT mTLS)", default=8883,
                         parse=_port)
    client_id: str | None = _setting("MQTT client id; defaults to thing_name", default=None)
    keep_alive: float = _setting("MQTT keep-alive; AWS IoT accepts 30s-20m", default=60.0,
                                 parse=parse_duration)
    connect_timeout: float = _setting(
        "how long a one-shot command waits for the first connection", default=45.0,
        parse=parse_duration)
    request_timeout: float = _setting("how long a Jobs request waits for its reply",
                                      default=30.0, parse=parse_duration)
    reconnect_min: float = _setting("first reconnect delay (then exponential, full jitter)",
                                    default=1.0, parse=parse_duration)
    reconnect_max: float = _setting("longest reconnect delay", default=120.0,
                                    parse=parse_duration)
    # The SDK's builder applies AWS IoT Core's per-connection limits on the client side: at most
    # 100 operations (PUBLISH, SUBSCRIBE, UNSUBSCRIBE) per second, by spacing them >= 10 ms apart,
    # and 512 KiB/s. Over a real link each operation waits a round trip for the previous one, so
    # the spacing rarely bites; on loopback it is all one would measure (issue 5, bench/). Keep
    # it for AWS IoT; the sandbox's Jobs emulator (the service side) and the benchmarks lift it.
    iot_core_limits: bool = _setting(
        "keep the SDK's client-side AWS IoT Core limits (100 operations/s, 512 KiB/s); false "
        "only for a broker without them, such as a local Mosquitto", default=True)
    # Without it (0) the agent starts each run with a clean session and asks the broker to keep
    # it for an hour across network drops only (agent.connection.SESSION_EXPIRY); a clean stop
    # ends it. Set, the session (subscriptions, QoS 1 messages sent to us while we are away;
    # AWS IoT: 1 hour by default, up to 7 days) also outlives a restart or a crash: a command
    # sent meanwhile is still delivered.
    session_expiry: float = _setting(
        "keep this device's MQTT session (subscriptions and messages queued while it is "
        "offline) for this long across restarts too; 0 = a clean session at each start, kept "
        "1h across network drops only", default=0.0, parse=parse_duration)

    def __repr__(self) -> str:
        # Paths are not secrets, but key *contents* never appear anywhere; keep the repr short.
        return f"MqttConfig(endpoint={self.endpoint!r}, port={self.port}, cert={str(self.cert)!r})"


def _command(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        raise ValueError("expected a list like [/usr/lib/iot-jobs-agent/handlers/x.sh, --flag] "
                         "(a command is never run through a shell)")
    if not isinstance(value, list) or not value or not all(
            isinstance(a, str) and a and "\0" not in a for a in value):
        raise ValueError("expected a non-empty list of strings")
    if not value[0].startswith("/"):
        raise ValueError(f"the program must be an absolute path, got {value[0]!r}")
    return tuple(value)


def _environment(value: object) -> dict[str, str]:
    """NAME: value, or NAME: {value: ..., secret: true} for a value that is redacted from the
    job's log, the agent's log and statusDetails wherever the handler prints it (a
    :class:`agent.hygiene.Secret`)."""
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of NAME: value, got {_kind(value)}")
    out: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"{key!r} is not a valid environment variable name")
        secret = False
        if isinstance(item, dict):
            unknown = set(item) - {"value", "secret"}
            if unknown or "value" not in item or not isinstance(item.get("secret", False), bool):
                raise ValueError(f"{key}: expected a string or {{value: ..., secret: true}}, "
                                 f"got {_kind(item)}")
            item, secret = item["value"], item.get("secret", False)
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise ValueError(f"{key}: expected a string or {{value: ..., secret: true}}, got "
                             f"{_kind(item)}")
        out[key] = Secret(item) if secret else str(item)
    return out


def _user(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[a-z_][a-z0-9_.-]*\$?", value):
        raise ValueError(f"expected a user name, got {value!r}")
    return value


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a whole number of at least 1, got {value!r}")
    return value


def _log_level(value: object) -> str:
    if not isinstance(value, str) or value.upper() not in _LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(_LOG_LEVELS).lower()}, got {value!r}")
    return value.upper()


def _log_format(value: object) -> str:
    if value not in ("text", "json"):
        raise ValueError(f"expected text or json, got {value!r}")
    return str(value)


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _execution(value: object) -> str:
    if value not in ("auto", "systemd", "local", "helper"):
        raise ValueError(f"expected auto, helper, systemd or local, got {value!r}")
    return str(value)


def _programs(value: object) -> tuple[str, ...]:
    """run_command.allow: program names (looked up on PATH), absolute paths, or "*"."""
    if not isinstance(value, list) or not all(isinstance(a, str) and a for a in value):
        raise ValueError('expected a list of program names or absolute paths, or ["*"]')
    for item in value:
        if "\0" in item or ("/" in item and not item.startswith("/")):
            raise ValueError(f"{item!r}: write a program name (found on PATH) or an absolute "
                             "path")
    return tuple(value)


def _users(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of user names, got {_kind(value)}")
    return tuple(_user(item) for item in value)


def _directories(value: object) -> tuple[Path, ...]:
    if not isinstance(value, list) or not all(isinstance(d, str) and d for d in value):
        raise ValueError("expected a list of directories")
    return tuple(Path(d) for d in value)


def _facts(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of fact: value, got {_kind(value)}")
    out: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{key!r} is not a fact name")
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise ValueError(f"{key}: expected a string, got {_kind(item)}")
        out[key] = str(item)
    return out


_SIZE = re.compile(r"(\d+)([KMGT]?)", re.IGNORECASE)
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)%")
_PROTECT_SYSTEM = ("no", "yes", "full", "strict")


def _size(value: object) -> str:
    """memory_max: bytes, with K/M/G/T (1024-based, as systemd reads them), or a % of RAM."""
    text = str(value).strip() if isinstance(value, str | int) and not isinstance(value, bool) \
        else ""
    if (size := _SIZE.fullmatch(text)) and int(size.group(1)) > 0:
        return text.upper()
    if (m := _PERCENT.fullmatch(text)) and 0 < float(m.group(1)) <= 100:
        return text
    raise ValueError(f"expected a size such as 256M, 1G or 50% (of the RAM), got {value!r}")


def _cpu_quota(value: object) -> str:
    """cpu_quota: CPU time per wall-clock time, 100% being one whole CPU (200%: two)."""
    m = _PERCENT.fullmatch(value.strip()) if isinstance(value, str) else None
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(f"expected a percentage such as 50% (half a CPU) or 200% (two), got "
                         f"{value!r}")
    return value.strip()


def _protect_system(value: object) -> str:
    """protect_system: systemd's ProtectSystem= (YAML reads a bare yes/no as a boolean)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value not in _PROTECT_SYSTEM:
        raise ValueError(f"expected one of {', '.join(_PROTECT_SYSTEM)}, got {value!r}")
    return str(value)


def _absolute_paths(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(d, str) and d for d in value):
        raise ValueError("expected a list of absolute paths")
    for item in value:
        if not item.startswith("/") or any(c in item for c in "\0\n\"' "):
            raise ValueError(f"{item!r}: expected an absolute path without spaces or quotes")
    return tuple(value)


@dataclass(frozen=True)
class HandlerLimits:
    """What a handler's transient unit gets (systemd backend), as systemd property strings.

    Outside systemd (the local backend) none of these can be enforced; ``check-config`` and the
    agent's start say so rather than pretending.
    """

    memory_max: str | None = None
    cpu_quota: str | None = None
    tasks_max: int | None = None
    protect_system: str | None = None
    read_write_paths: tuple[str, ...] = ()
    private_network: bool = False
    private_tmp: bool = False

    def properties(self) -> list[str]:
        """``Name=value`` unit properties, for ``systemd-run -p``."""
        props = []
        if self.memory_max:
            props.append(f"MemoryMax={self.memory_max}")
        if self.cpu_quota:
            props.append(f"CPUQuota={self.cpu_quota}")
        if self.tasks_max:
            props.append(f"TasksMax={self.tasks_max}")
        if self.protect_system:
            props.append(f"ProtectSystem={self.protect_system}")
        if self.read_write_paths:
            props.append("ReadWritePaths=" + " ".join(self.read_write_paths))
        if self.private_network:
            props.append("PrivateNetwork=yes")
        if self.private_tmp:
            props.append("PrivateTmp=yes")
        return props


@dataclass(frozen=True)
class HandlerConfig:
    """One program the agent may run; a job's ``operation`` names it."""

    command: tuple[str, ...] = _setting(
        "program and fixed arguments; the job document's args are appended (no shell)",
        parse=_command)
    timeout: float = _setting("longest run; then SIGTERM to its process group, SIGKILL after "
                              "kill_grace", default=3600.0, parse=parse_duration)
    user: str | None = _setting("run as this user (the agent must run as root)", default=None,
                                parse=_user)
    environment: dict[str, str] = _setting(
        "extra environment variables for the handler: NAME: value, or NAME: {value: ..., "
        "secret: true} to redact the value from logs and statusDetails wherever the handler "
        "prints it", default_factory=dict, parse=_environment)
    idempotent: bool = _setting("safe to run again from the start if the agent died while it "
                                "ran (otherwise such a run is reported FAILED)", default=False)
    verify: tuple[str, ...] | None = _setting(
        "after a reboot the handler asked for, run this to decide SUCCEEDED/FAILED",
        default=None, parse=_command)
    # Enforced under systemd only (each run is a transient unit); see HandlerLimits.
    memory_max: str | None = _setting(
        "MemoryMax= of the run's unit (256M, 1G, 50%); past it the kernel's OOM killer ends the "
        "run and the job FAILS 'killed by the OOM killer'", default=None, parse=_size)
    cpu_quota: str | None = _setting("CPUQuota= of the run's unit (50%: half a CPU)",
                                     default=None, parse=_cpu_quota)
    tasks_max: int | None = _setting("TasksMax=: processes and threads the run may have at once",
                                     default=None, parse=_positive_int)
    protect_system: str | None = _setting(
        "ProtectSystem= of the run's unit: yes (/usr, /boot read-only), full (and /etc), strict "
        "(the whole tree but read_write_paths)", default=None, parse=_protect_system)
    read_write_paths: tuple[str, ...] = _setting(
        "ReadWritePaths=: what stays writable under protect_system", default=(),
        parse=_absolute_paths)
    private_network: bool = _setting("PrivateNetwork=: the run sees only a loopback device",
                                     default=False)
    private_tmp: bool = _setting("PrivateTmp=: the run gets its own /tmp and /var/tmp",
                                 default=False)

    @property
    def program(self) -> Path:
        return Path(self.command[0])

    @property
    def limits(self) -> HandlerLimits | None:
        limits = HandlerLimits(**{f.name: getattr(self, f.name)
                                  for f in dataclasses.fields(HandlerLimits)})
        return None if limits == HandlerLimits() else limits


_COMMAND_FORMATS = ("json", "cbor", "generic")


def _command_formats(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(v in _COMMAND_FORMATS for v in value):
        raise ValueError(f"expected a list of {', '.join(_COMMAND_FORMATS)}, got {value!r}")
    return tuple(dict.fromkeys(value))


@dataclass(frozen=True)
class CommandsConfig:
    """AWS IoT Commands: one request to this device over MQTT, answered within seconds."""

    enabled: bool = _setting(
        "subscribe to this thing's AWS IoT Commands requests (an account that never used "
        "Commands may refuse the subscription, so it is off by default)", default=False)
    formats: tuple[str, ...] = _setting(
        "request topics to subscribe to: json (runs documents), cbor and generic (answered "
        "REJECTED unless the payload is a JSON document)", default=("json",),
        parse=_command_formats)
    max_concurrent: int = _setting(
        "commands run at the same time; their own limit, so a long job never holds a command "
        "past its timeout", default=4, parse=_positive_int)


@dataclass(frozen=True)
class RunCommandConfig:
    """What a ``runCommand`` step (AWS-Run-Command, Device Client documents) may start.

    Nothing by default: a job document comes from the network and the agent runs as root, so
    each program is an explicit choice, and ``["*"]`` (AWS-Run-Command's full power) is one too.
    """

    allow: tuple[str, ...] = _setting(
        'programs a runCommand step may start: names (looked up on PATH) or absolute paths; '
        '["*"] allows any program. Also the bare handler names a runHandler step may take from '
        "PATH", default=(), parse=_programs)
    users: tuple[str, ...] = _setting(
        "users a runCommand step's runAsUser may name (the agent switches user itself, never "
        "through sudo); the agent's own user is always allowed", default=(), parse=_users)
    timeout: float = _setting("longest run of a runCommand step", default=3600.0,
                              parse=parse_duration)


@dataclass(frozen=True)
class Config:
    """The whole agent configuration (``/etc/iot-jobs-agent/config.yaml``)."""

    thing_name: str = _setting("the AWS IoT thing this device is", parse=_thing_name)
    mqtt: MqttConfig = _setting("connection to AWS IoT Core")
    handlers: dict[str, HandlerConfig] = _setting(
        "operation name -> handler; only these ever run", default_factory=dict)
    state_dir: Path = _setting("journal, per-job logs and work directories",
                               default=Path("/var/lib/iot-jobs-agent"))
    max_concurrent_jobs: int = _setting("jobs run at the same time", default=1,
                                        parse=_positive_int)
    commands: CommandsConfig = _setting("AWS IoT Commands (off by default)",
                                        default_factory=CommandsConfig)
    poll_interval: float = _setting("safety poll for pending jobs, in case a notification was "
                                    "lost", default=300.0, parse=parse_duration)
    progress_interval: float = _setting("at most one progress update per job per interval",
                                        default=10.0, parse=parse_duration)
    shutdown_grace: float = _setting("on SIGTERM, how long running handlers may finish",
                                     default=60.0, parse=parse_duration)
    kill_grace: float = _setting("between SIGTERM and SIGKILL of a handler", default=10.0,
                                 parse=parse_duration)
    max_attempts: int = _setting("crash-loop guard: starts of one job's handler before it is "
                                 "reported FAILED", default=3, parse=_positive_int)
    retention: float = _setting("how long finished jobs stay in the journal, with their logs",
                                default=30 * 86400.0, parse=parse_duration)
    max_records: int = _setting("finished jobs kept in the journal at most", default=10000,
                                parse=_positive_int)
    handler_dir: Path = _setting(
        "where Device Client style handler scripts live (a runHandler step whose path is "
        "\"default\" or empty); default: the handlers shipped with the package",
        default=SHIPPED_HANDLERS)
    handler_paths: tuple[Path, ...] = _setting(
        "other directories a job document's runHandler path may name; any other path is "
        "REJECTED", default=(), parse=_directories)
    handler_timeout: float = _setting("longest run of a handler_dir (or handler_paths) script",
                                      default=3600.0, parse=parse_duration)
    handler_environment: dict[str, str] = _setting(
        "extra environment variables for steps without a YAML handler (handler_dir scripts, "
        "runCommand)", default_factory=dict, parse=_environment)
    run_command: RunCommandConfig = _setting("what runCommand steps may run",
                                             default_factory=RunCommandConfig)
    device_facts: dict[str, str] = _setting(
        "facts about this device that job document conditions are checked against",
        default_factory=dict, parse=_facts)
    reboot_command: tuple[str, ...] = _setting(
        "what runs when a handler asks for a reboot (exit code 194)",
        default=("/usr/bin/systemctl", "reboot"), parse=_command)
    reboot_timeout: float = _setting("a reboot that has not happened after this is a failure",
                                     default=300.0, parse=parse_duration)
    boot_id_path: Path = _setting("where the kernel's boot id is read (tests point it elsewhere)",
                                  default=Path("/proc/sys/kernel/random/boot_id"))
    log_level: str = _setting("debug, info, warning or error", default="INFO", parse=_log_level)
    log_format: str = _setting("text (journald-aware) or json (one object per line)",
                               default="text", parse=_log_format)
    execution: str = _setting(
        "where handlers run: auto (through the privileged helper when the agent is not root "
        "and the helper's socket exists; a transient systemd unit per run when the agent is a "
        "systemd service as root; else local), helper, systemd, or local (the agent is a child "
        "subreaper and kills what a job leaves)", default="auto", parse=_execution)
    helper_socket: Path = _setting(
        "the privileged helper's socket (iot-jobs-agent-helper.socket)",
        default=Path("/run/iot-jobs-agent-helper.sock"))
    metrics_file: Path | None = _setting(
        "node exporter textfile (e.g. /var/lib/prometheus/node-exporter/iot-jobs-agent.prom), "
        "rewritten atomically when a figure changes; unset: no metrics", default=None)
    source: Path | None = field(default=None, compare=False, metadata={"internal": True})

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or self.thing_name

    def uses_helper(self) -> bool:
        """Whether this (unprivileged) agent starts its handlers through the privileged helper:
        ``execution: helper``, or ``auto`` when not root and the helper's socket exists."""
        return self.execution == "helper" or (
            self.execution == "auto" and os.geteuid() != 0 and self.helper_socket.exists())


# --------------------------------------------------------------------------- loading


class _Lines:
    """YAML line numbers by key path, so every message can point into the file."""

    def __init__(self, root: yaml.Node | None) -> None:
        self._lines: dict[tuple[str, ...], int] = {}
        if root is not None:
            self._walk(root, ())

    def _walk(self, node: yaml.Node, path: tuple[str, ...]) -> None:
        self._lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = (*path, str(key.value))
                self._walk(value, sub)
                self._lines[(*sub, "<key>")] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._walk(item, (*path, str(index)))

    def key(self, path: tuple[str, ...]) -> int:
        return self._lines.get((*path, "<key>")) or self.value(path)

    def value(self, path: tuple[str, ...]) -> int:
        while path not in self._lines and path:
            path = path[:-1]
        return self._lines.get(path, 1)


class _Builder:
    def __init__(self, source: str, lines: _Lines) -> None:
        self.source = source
        self.lines = lines
        self._problems: list[tuple[int, str]] = []

    def problem(self, path: tuple[str, ...], message: str, *, at_key: bool = False) -> None:
        line = self.lines.key(path) if at_key else self.lines.value(path)
        where = ".".join(path) or "(top level)"
        self._problems.append((line, f"{self.source}:{line}: {where}: {message}"))

    @property
    def problems(self) -> list[str]:
        """In file order, as a reader fixes them."""
        return [text for _, text in sorted(self._problems, key=lambda p: p[0])]

    def build(self, cls: type[Any], data: object, path: tuple[str, ...]) -> Any:
        if not isinstance(data, dict):
            self.problem(path, f"expected a mapping of settings, got {_kind(data)}")
            return None
        fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
        for key in data:
            if key not in fields:
                hint = _closest(str(key), fields)
                self.problem((*path, str(key)), "unknown setting" + (
                    f" (did you mean '{hint}'?)" if hint else f"; known: {', '.join(fields)}"),
                    at_key=True)
        values: dict[str, Any] = {}
        hints = typing.get_type_hints(cls)
        for name, f in fields.items():
            sub = (*path, name)
            if name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    self.problem(path, f"missing required setting '{name}' ({f.metadata['help']})")
                continue
            value = self.value(hints[name], f, data[name], sub)
            if value is not None or data[name] is None:
                values[name] = value
        try:
            return cls(**values)
        except TypeError:  # a required setting was missing or invalid: already reported
            return None

    def value(self, hint: Any, f: dataclasses.Field[Any], raw: object,
              path: tuple[str, ...]) -> Any:
        optional = _is_optional(hint)
        base = _strip_optional(hint)
        if raw is None:
            if optional:
                return None
            self.problem(path, "must not be empty")
            return None
        parse = f.metadata.get("parse")
        try:
            if parse is not None:
                return parse(raw)
            if dataclasses.is_dataclass(base):
                return self.build(base, raw, path)
            if typing.get_origin(base) is dict:
                item_type = typing.get_args(base)[1]
                if not isinstance(raw, dict):
                    raise ValueError(f"expected a mapping, got {_kind(raw)}")
                items = {str(k): self.build(item_type, v, (*path, str(k)))
                         for k, v in raw.items()}
                return {k: v for k, v in items.items() if v is not None}
            if base is Path:
                if not isinstance(raw, str) or not raw:
                    raise ValueError(f"expected a file path, got {_kind(raw)}")
                return Path(raw)
            if base is str:
                if not isinstance(raw, str) or not raw:
                    raise ValueError(f"expected a non-empty string, got {_kind(raw)}")
                return raw
            if base is int:
                if isinstance(raw, bool) or not isinstance(raw, int):
                    raise ValueError(f"expected a whole number, got {_kind(raw)}")
                return raw
            if base is bool:
                if not isinstance(raw, bool):
                    raise ValueError(f"expected true or false, got {_kind(raw)}")
                return raw
        except ValueError as exc:
            self.problem(path, str(exc))
            return None
        raise TypeError(f"no parser for {hint!r}")  # a programming error, not a user one


def _is_optional(hint: Any) -> bool:
    return isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)


def _strip_optional(hint: Any) -> Any:
    if _is_optional(hint):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0]
    return hint


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def _closest(name: str, options: typing.Iterable[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return match[0] if match else None


def load_config(path: Path | str) -> Config:
    """Read and validate ``path``; raise :class:`ConfigError` listing every problem found.

    Relative file paths inside the config are resolved against the config file's directory, so a
    config and its certificates can travel together (the sandbox relies on this).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist: create it (see config/agent.yaml) "
            "or pass --config PATH") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable by this user "
                          f"(uid {os.getuid()}): fix its permissions") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{line}: not valid YAML: {reason}") from None
    builder = _Builder(str(path), _Lines(root))
    if data is None:
        data = {}
    config = builder.build(Config, data, ())
    if builder.problems or config is None:
        problems = builder.problems or [f"{path}: not a valid configuration"]
        summary = problems[0] if len(problems) == 1 else (
            f"{len(problems)} problems in {path}: " + "; ".join(problems))
        raise ConfigError(summary, problems)
    base = path.resolve().parent
    mqtt = config.mqtt
    resolved = dataclasses.replace(
        mqtt,
        cert=base / mqtt.cert,
        key=base / mqtt.key,
        ca=base / mqtt.ca if mqtt.ca is not None else None,
    )
    metrics = base / config.metrics_file if config.metrics_file is not None else None
    return dataclasses.replace(config, mqtt=resolved, state_dir=base / config.state_dir,
                               metrics_file=metrics, handler_dir=base / config.handler_dir,
                               handler_paths=tuple(base / d for d in config.handler_paths),
                               source=path)


def load_checked(path: Path | str, *, state: bool = True) -> Config:
    """:func:`load_config`, then :func:`check_files`: what ``run`` and a reload accept
    (``state=False``: the privileged helper, whose state directories are the agent's).

    Raises one :class:`ConfigError` carrying every problem (``.problems``).
    """
    config = load_config(path)
    problems = check_files(config, state=state)
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else "; ".join(problems), problems)
    return config


def check_files(config: Config, *, state: bool = True) -> list[str]:
    """Problems with the files the config names, one actionable line each (empty if fine).

    Checks what a running agent would trip over later: certificates and key readable, the key
    private (mode 0600), every program the config names (handlers, ``verify``,
    ``reboot_command``, ``run_command.allow``, the handler directories) present and safe from
    tampering along its whole path, and the state directories private (:mod:`agent.paths`).
    """
    lines = _source_lines(config)

    def report(path: tuple[str | int, ...], message: str) -> None:
        """``path`` names the setting; an int is an index into a list (``allow[2]``)."""
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
        if config.source is None:
            problems.append(f"{where}: {message}")
        else:
            line = lines.value(tuple(str(p) for p in path))
            problems.append(f"{config.source}:{line}: {where}: {message}")

    problems: list[str] = []
    mqtt = config.mqtt
    for name, file in (("cert", mqtt.cert), ("key", mqtt.key), ("ca", mqtt.ca)):
        if file is None:
            continue
        st = _stat_readable(file, lambda m, n=name: report(("mqtt", n), m))
        if st is not None and name == "key" and st.st_mode & 0o077:
            report(("mqtt", name), f"private key {file} is accessible by group or others "
                                   f"(mode {stat.S_IMODE(st.st_mode):04o}): run `chmod 600 {file}`")
    for name, handler in config.handlers.items():
        for setting, argv in (("command", handler.command), ("verify", handler.verify)):
            if argv and (problem := program_problem(Path(argv[0]))):
                report(("handlers", name, setting),
                       problem if setting == "command" else f"verify: {problem}")
        if handler.user is not None:
            _check_user(config, handler.user, "handlers", "remove the setting",
                        lambda m, n=name: report(("handlers", n, "user"), m))
        if handler.limits is not None and config.execution == "local":
            first = handler.limits.properties()[0].split("=")[0]
            report(("handlers", name), f"{first}= and the other unit limits need the systemd "
                                       "backend: set execution: auto (or systemd) and run the "
                                       "agent as a systemd service, or remove them")
    if problem := program_problem(Path(config.reboot_command[0]), "reboot_command program",
                                  missing_ok=True):
        report(("reboot_command",), problem)
    _check_documents(config, report)
    if state:
        _check_state_dirs(config, report)
    return problems


def _check_user(config: Config, user: str, what: str, remove: str,
                report: Callable[[str], None]) -> None:
    """A user ``what`` (handlers, commands) run as: it must exist, and the agent must be able
    to switch to it: as root, or through the privileged helper (which checks the same config
    as root)."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        report(f"no such user {user!r}: create it or {remove}")
        return
    may_switch = os.geteuid() == 0 or config.uses_helper()
    if not may_switch and entry.pw_uid != os.geteuid():
        report(f"running {what} as {user!r} needs the agent to run as root or the privileged "
               "helper (iot-jobs-agent-helper.socket)")


def _check_state_dirs(config: Config,
                      report: Callable[[tuple[str | int, ...], str], None]) -> None:
    """Existing state directories must be the agent's and private (missing ones are created
    so at start)."""
    for entry in state_dirs(config.state_dir, job_logs_dir(config.state_dir)):
        if problem := state_dir_problem(entry):
            report(("state_dir",), problem)


def _check_documents(config: Config,
                     report: Callable[[tuple[str | int, ...], str], None]) -> None:
    """The settings Device Client documents and managed templates depend on.

    The shipped handler_dir is not checked here: it is wherever pip put the package (a
    checkout under /tmp, a user's venv), a place the user never chose, and a device that runs
    no Device Client documents must still start. A job that would run a script from it is
    REJECTED with the same path check (agent.documents.lookup) and says what to move.
    """
    directories: list[tuple[tuple[str | int, ...], Path]] = []
    if config.handler_dir != SHIPPED_HANDLERS:
        directories.append((("handler_dir",), config.handler_dir))
    directories += [(("handler_paths", i), d) for i, d in enumerate(config.handler_paths)]
    for where, directory in directories:
        problem = directory_problem(directory)
        if problem:
            report(where, problem)
    search = config.handler_environment.get("PATH", SAFE_PATH)
    for i, program in enumerate(config.run_command.allow):
        if program == "*":
            continue
        import shutil  # here, not at the top: shutil loads bz2 and lzma (0.65 MB of idle RSS)

        found = program if program.startswith("/") else shutil.which(program, path=search)
        if found is None or not os.access(found, os.X_OK) or os.path.isdir(found):
            hint = "install it or fix the path" if program.startswith("/") else \
                f"install it, or write its absolute path (PATH is {search})"
            report(("run_command", "allow", i),
                   f"program {program!r} is not found on this device: {hint}")
        elif problem := program_problem(Path(found), "runCommand program"):
            report(("run_command", "allow", i), problem)
    for i, user in enumerate(config.run_command.users):
        _check_user(config, user, "commands", "remove it from the list",
                    lambda m, i=i: report(("run_command", "users", i), m))


def _stat_readable(file: Path, report: Callable[[str], None]) -> os.stat_result | None:
    try:
        st = file.stat()
        with file.open("rb"):
            pass
    except FileNotFoundError:
        report(f"file {file} does not exist: install it there or fix the path")
        return None
    except PermissionError:
        report(f"file {file} is not readable by uid {os.getuid()}: fix its owner or mode")
        return None
    except OSError as exc:
        report(f"file {file} cannot be read: {exc.strerror}")
        return None
    if not stat.S_ISREG(st.st_mode):
        report(f"{file} is not a regular file")
        return None
    return st


def _source_lines(config: Config) -> _Lines:
    if config.source is None:
        return _Lines(None)
    try:
        return _Lines(yaml.compose(config.source.read_text(encoding="utf-8"),
                                   Loader=yaml.SafeLoader))
    except (OSError, yaml.YAMLError):
        return _Lines(None)
