"""Config loading: every problem reported, with its YAML line, in words a user can act on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.config import check_files, load_config, parse_duration
from agent.errors import ConfigError

GOOD = """\
thing_name: my-thing
mqtt:
  endpoint: abc123-ats.iot.eu-west-1.amazonaws.com
  port: 8883
  cert: certs/device.pem.crt
  key: certs/private.pem.key
  ca: certs/AmazonRootCA1.pem
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return info.value.problems


def test_good_config_resolves_paths_against_its_directory(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    assert config.thing_name == "my-thing"
    assert config.client_id == "my-thing"  # defaults to the thing name
    assert config.mqtt.port == 8883
    assert config.mqtt.cert == tmp_path / "certs/device.pem.crt"
    assert config.mqtt.ca == tmp_path / "certs/AmazonRootCA1.pem"
    assert config.mqtt.request_timeout == 30.0


def test_commands_are_off_by_default_and_checked(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    assert not config.commands.enabled
    assert config.commands.formats == ("json",)
    assert config.mqtt.session_expiry == 0.0
    config = load_config(write(tmp_path, GOOD + "  session_expiry: 1h\ncommands:\n  enabled: "
                                               "true\n  formats: [json, generic, json]\n"))
    assert config.commands.enabled and config.commands.formats == ("json", "generic")
    assert config.mqtt.session_expiry == 3600.0
    found = problems(tmp_path, GOOD + "commands:\n  enable: true\n  formats: [xml]\n"
                                      "  max_concurrent: 0\n")
    assert found == [
        f"{tmp_path / 'config.yaml'}:9: commands.enable: unknown setting (did you mean "
        "'enabled'?)",
        f"{tmp_path / 'config.yaml'}:10: commands.formats: expected a list of json, cbor, "
        "generic, got ['xml']",
        f"{tmp_path / 'config.yaml'}:11: commands.max_concurrent: expected a whole number of at "
        "least 1, got 0"]


def test_durations_and_optional_keys(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD + "  client_id: other\n  keep_alive: 5m\n"
                                               "  request_timeout: 1500ms\n"))
    assert config.client_id == "other"
    assert config.mqtt.keep_alive == 300.0
    assert config.mqtt.request_timeout == 1.5


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30.0), ("10m", 600.0), ("1h", 3600.0), ("2d", 172800.0), ("250ms", 0.25), (5, 5.0),
    ("1.5s", 1.5),
])
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "10 minutes", "-1s", True, [], "1y"])
def test_parse_duration_rejects(text: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_every_problem_is_reported_with_its_line(tmp_path: Path) -> None:
    found = problems(tmp_path, """\
thing_name: bad/name
mqtt:
  endpoint: x
  prot: 8883
  port: "8883"
  cert: certs/device.pem.crt
  keep_alive: often
colour: blue
""")
    path = tmp_path / "config.yaml"
    assert f"{path}:1: thing_name: expected 1-128 characters" in found[0]
    text = "\n".join(found)
    assert f"{path}:4: mqtt.prot: unknown setting (did you mean 'port'?)" in text
    assert f"{path}:5: mqtt.port: expected a port number" in text
    assert f"{path}:7: mqtt.keep_alive: expected a duration" in text
    assert f"{path}:8: colour: unknown setting" in text
    assert "missing required setting 'key'" in text
    assert len(found) == 6


def test_missing_sections(tmp_path: Path) -> None:
    found = problems(tmp_path, "thing_name: t\n")
    assert found == [f"{tmp_path / 'config.yaml'}:1: (top level): missing required setting "
                     "'mqtt' (connection to AWS IoT Core)"]


def test_wrong_shapes(tmp_path: Path) -> None:
    assert "expected a mapping of settings, got a list" in problems(tmp_path, "- a\n- b\n")[0]
    assert "mqtt: expected a mapping" in problems(tmp_path, "thing_name: t\nmqtt: 5\n")[0]
    assert "must not be empty" in problems(tmp_path, GOOD.replace(
        "endpoint: abc123-ats.iot.eu-west-1.amazonaws.com", "endpoint:"))[0]


def test_empty_file(tmp_path: Path) -> None:
    assert any("missing required setting 'thing_name'" in p for p in problems(tmp_path, ""))


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "thing_name: a\nmqtt:\n  endpoint: [oops\n"))
    assert str(info.value).startswith(f"{tmp_path / 'config.yaml'}:")
    assert "not valid YAML" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")


def test_check_files(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    path = tmp_path / "config.yaml"
    assert [p.split(": ")[0:2] for p in check_files(config)] == [
        [f"{path}:5", "mqtt.cert"], [f"{path}:6", "mqtt.key"], [f"{path}:7", "mqtt.ca"]]
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("device.pem.crt", "private.pem.key", "AmazonRootCA1.pem"):
        (certs / name).write_text("x")
    (certs / "private.pem.key").chmod(0o640)
    found = check_files(config)
    assert len(found) == 1
    assert "mode 0640" in found[0] and "chmod 600" in found[0]
    (certs / "private.pem.key").chmod(0o600)
    assert check_files(config) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_key(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("device.pem.crt", "private.pem.key", "AmazonRootCA1.pem"):
        (certs / name).write_text("x")
    (certs / "private.pem.key").chmod(0o000)
    assert "not readable" in check_files(config)[0]
