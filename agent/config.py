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

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "Config",
    "MqttConfig",
    "check_files",
    "load_config",
    "parse_duration",
]

DEFAULT_CONFIG_PATH = Path("/etc/iot-jobs-agent/config.yaml")

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

    def __repr__(self) -> str:
        # Paths are not secrets, but key *contents* never appear anywhere; keep the repr short.
        return f"MqttConfig(endpoint={self.endpoint!r}, port={self.port}, cert={str(self.cert)!r})"


@dataclass(frozen=True)
class Config:
    """The whole agent configuration (``/etc/iot-jobs-agent/config.yaml``)."""

    thing_name: str = _setting("the AWS IoT thing this device is", parse=_thing_name)
    mqtt: MqttConfig = _setting("connection to AWS IoT Core")
    source: Path | None = field(default=None, compare=False, metadata={"internal": True})

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or self.thing_name


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
                if f.default is dataclasses.MISSING:
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
    return dataclasses.replace(config, mqtt=resolved, source=path)


def check_files(config: Config) -> list[str]:
    """Problems with the files the config names, one actionable line each (empty if fine)."""
    problems: list[str] = []
    mqtt = config.mqtt
    for name, file in (("mqtt.cert", mqtt.cert), ("mqtt.key", mqtt.key), ("mqtt.ca", mqtt.ca)):
        if file is None:
            continue
        try:
            st = file.stat()
            with file.open("rb"):
                pass
        except FileNotFoundError:
            problems.append(f"{name}: file {file} does not exist: install it there or fix the path")
            continue
        except PermissionError:
            problems.append(f"{name}: file {file} is not readable by uid {os.getuid()}: "
                            "fix its owner or mode")
            continue
        except OSError as exc:
            problems.append(f"{name}: file {file} cannot be read: {exc.strerror}")
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"{name}: {file} is not a regular file")
        elif name == "mqtt.key" and st.st_mode & 0o077:
            problems.append(
                f"{name}: private key {file} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}): run `chmod 600 {file}`")
    return problems
