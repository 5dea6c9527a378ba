"""What a reload applies, what waits for a restart, and that a broken config is refused whole."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import yaml

from agent.config import CommandsConfig, Config, HandlerConfig, MqttConfig, load_config
from agent.reload import RESTART_SETTINGS, plan_reload, reread


def base(**changes: object) -> Config:
    config = Config(thing_name="t1", mqtt=MqttConfig(endpoint="e", cert=Path("c"), key=Path("k")),
                    handlers={"a": HandlerConfig(command=("/bin/true",)),
                              "b": HandlerConfig(command=("/bin/false",))})
    return dataclasses.replace(config, **changes)


def test_nothing_changed() -> None:
    plan = plan_reload(base(), base())
    assert (plan.applied, plan.restart, plan.summary) == ((), (), "no changes")
    assert plan.config == base()


def test_handlers_and_limits_apply_now() -> None:
    new = base(handlers={"a": HandlerConfig(command=("/bin/true",), timeout=5.0),
                         "c": HandlerConfig(command=("/bin/echo",))},
               max_concurrent_jobs=3, poll_interval=60.0, log_level="DEBUG")
    plan = plan_reload(base(), new)
    assert plan.applied == ("handlers.a changed", "handlers.b removed", "handlers.c added",
                            "max_concurrent_jobs", "poll_interval", "log_level")
    assert plan.restart == ()
    assert plan.config == new


def test_identity_connection_and_journal_wait_for_a_restart() -> None:
    old = base()
    new = base(thing_name="t2", mqtt=dataclasses.replace(old.mqtt, endpoint="x", port=443),
               state_dir=Path("/elsewhere"), boot_id_path=Path("/b"), log_format="json",
               max_attempts=5, commands=CommandsConfig(enabled=True))
    plan = plan_reload(old, new)
    assert plan.restart == ("thing_name", "mqtt.endpoint", "mqtt.port", "state_dir",
                            "commands", "boot_id_path", "log_format")
    assert plan.applied == ("max_attempts",)
    for name in RESTART_SETTINGS:  # the running values stay
        assert getattr(plan.config, name) == getattr(old, name)
    assert plan.config.max_attempts == 5
    assert plan.summary == ("applied max_attempts; needs a restart to change thing_name, "
                            "mqtt.endpoint, mqtt.port, state_dir, commands, boot_id_path, "
                            "log_format")


def write_config(tmp_path: Path, **settings: object) -> Path:
    tmp_path.joinpath("certs").mkdir(exist_ok=True)
    for name in ("c.pem", "k.pem"):
        tmp_path.joinpath("certs", name).write_text("x")
    tmp_path.joinpath("certs", "k.pem").chmod(0o600)
    data = {"thing_name": "t1", "mqtt": {"endpoint": "e", "port": 8883, "cert": "certs/c.pem",
                                         "key": "certs/k.pem"},
            "state_dir": "state", "handlers": {"a": {"command": ["/bin/true"]}}, **settings}
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_reread_applies_a_good_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_config(tmp_path)
    running = load_config(path)
    write_config(tmp_path, handlers={"a": {"command": ["/bin/true"]},
                                     "b": {"command": ["/bin/echo"]}},
                 mqtt={"endpoint": "e", "port": 8883, "cert": "certs/c.pem",
                       "key": "certs/k.pem", "keep_alive": "2m"})
    with caplog.at_level(logging.INFO, logger="agent.reload"):
        outcome = reread(running)
    assert outcome.ok and outcome.config is not None
    assert set(outcome.config.handlers) == {"a", "b"}
    assert outcome.config.mqtt == running.mqtt
    assert outcome.message == "applied handlers.b added; needs a restart to change mqtt.keep_alive"
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning == [f"configuration reload: mqtt.keep_alive changed in {path} but take "
                       "effect only at a restart (systemctl restart iot-jobs-agent); still using "
                       "the running values"]


@pytest.mark.parametrize("breakage", ["yaml", "unknown-key", "missing-program"])
def test_reread_refuses_a_broken_file_whole(tmp_path: Path, breakage: str,
                                            caplog: pytest.LogCaptureFixture) -> None:
    path = write_config(tmp_path)
    running = load_config(path)
    if breakage == "yaml":
        path.write_text("thing_name: [unclosed\n")
    elif breakage == "unknown-key":
        write_config(tmp_path, max_concurent_jobs=2, handlers={"z": {"command": ["/bin/true"]}})
    else:
        write_config(tmp_path, handlers={"z": {"command": ["/nonexistent/handler"]}})
    with caplog.at_level(logging.INFO, logger="agent.reload"):
        outcome = reread(running)
    assert not outcome.ok and outcome.config is None
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors[-1].startswith("reload refused: 1 problem(s) in ")
    assert errors[-1].endswith("still running the previous configuration")
    expected = {"yaml": "not valid YAML", "unknown-key": "did you mean 'max_concurrent_jobs'",
                "missing-program": "/nonexistent/handler does not exist"}[breakage]
    assert expected in errors[0] and expected in outcome.message


def test_reread_of_a_removed_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_config(tmp_path)
    running = load_config(path)
    path.unlink()
    outcome = reread(running)
    assert not outcome.ok and "does not exist" in outcome.message
