"""AWS IoT Commands end to end: boto3 -> sandbox HTTP -> MQTT 5 -> the real agent -> boto3.

Real agent processes, real handlers, the real broker and emulator; every boto3 answer is also
refereed against botocore's model (``sandbox_client``).
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.sandbox.commands import NO_RESPONSE
from agent.sandbox.iot_policy import JOBS_POLICY
from agent.sandbox.stack import Stack
from tests.conftest import Thing
from tests.integration.agent_harness import AgentProcess, write_handler
from tests.integration.test_boto3_referee import sandbox_client

pytestmark = pytest.mark.broker

ENDED = {"SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT"}


class Cloud:
    """boto3 against the sandbox, for one test's thing."""

    def __init__(self, thing: Thing) -> None:
        stack = thing.stack
        self.thing = thing
        self.iot = sandbox_client("iot", stack.control_endpoint, stack.region)
        self.data = sandbox_client("iot-jobs-data", stack.data_endpoint, stack.region)
        self.target = self.iot.describe_thing(thingName=thing.name)["thingArn"]

    def command(self, suffix: str, document: Any, content_type: str = "application/json"
                ) -> str:
        content = document if isinstance(document, bytes) else json.dumps(document).encode()
        return str(self.iot.create_command(
            commandId=self.thing.j(suffix),
            payload={"content": content, "contentType": content_type})["commandArn"])

    def start(self, command_arn: str, timeout: int = 30, **kwargs: Any) -> str:
        return str(self.data.start_command_execution(
            targetArn=self.target, commandArn=command_arn, executionTimeoutSeconds=timeout,
            **kwargs)["executionId"])

    def get(self, execution_id: str) -> dict[str, Any]:
        execution = self.iot.get_command_execution(executionId=execution_id,
                                                   targetArn=self.target)
        return {k: v for k, v in execution.items() if k != "ResponseMetadata"}

    def wait(self, execution_id: str, statuses: set[str] = ENDED,
             timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            execution = self.get(execution_id)
            if execution["status"] in statuses or time.monotonic() > deadline:
                return execution
            time.sleep(0.02)

    def updates(self, execution_id: str) -> list[tuple[Any, str | None]]:
        """What the device sent for ``execution_id`` and how each was answered."""
        history = self.thing.emulator.call_commands(lambda s: s.history)
        return [(update, code) for _, eid, update, code in history if eid == execution_id]


@pytest.fixture
def cloud(thing: Thing) -> Cloud:
    return Cloud(thing)


def commands_agent(thing: Thing, tmp_path: Path, handlers: dict[str, str], *,
                   commands: dict[str, Any] | None = None, **settings: Any) -> AgentProcess:
    directory = tmp_path / "handlers"
    config = {name: {"command": [str(write_handler(directory, f"{name}.sh", body))],
                     "timeout": "20s"} for name, body in handlers.items()}
    for name in settings.pop("idempotent", ()):
        config[name]["idempotent"] = True
    return AgentProcess(thing.stack, thing.name, tmp_path / "agent", config,
                        commands={"enabled": True, **(commands or {})}, **settings)


def ready(agent: AgentProcess) -> AgentProcess:
    """Started, READY and subscribed to its Commands topics (use in ``with``)."""
    if agent.process is None:
        agent.start()
    agent.wait_ready()
    agent.wait_log("commands subscribed")
    return agent


def runs(tmp_path: Path) -> list[str]:
    path = tmp_path / "runs"
    return path.read_text().splitlines() if path.exists() else []


def counting(tmp_path: Path, body: str = "") -> str:
    return f'echo "$*" >> {tmp_path / "runs"}\n{body}'


def test_a_command_runs_its_handler_and_boto3_reads_the_result(thing: Thing, cloud: Cloud,
                                                               tmp_path: Path) -> None:
    blob = base64.b64encode(b"\x00\xffraw").decode()
    evidence = tmp_path / "env"
    handler = f"""env > {evidence}
echo "hello $*"
echo "to stderr" >&2
echo '{{"result": {{"answer": 42, "healthy": true, "raw": {{"bin": "{blob}"}}}}}}' \
  >&"$JOB_PROGRESS_FD"
"""
    with ready(commands_agent(thing, tmp_path, {"echo": handler})) as agent:
        command = cloud.command("hello", {"operation": "echo", "args": ["a", "b c"]})
        execution_id = cloud.start(command, timeout=25)
        execution = cloud.wait(execution_id)
        assert agent.stop() == 0
    assert execution["status"] == "SUCCEEDED", agent.log()
    assert "statusReason" not in execution
    result = execution["result"]
    assert result["exitCode"] == {"S": "0"}
    assert result["outputHead"]["S"] == "hello a b c\nto stderr\n"
    assert result["answer"] == {"S": "42"} and result["healthy"] == {"B": True}
    assert result["raw"] == {"BIN": b"\x00\xffraw"}  # botocore decodes the blob
    assert execution["commandArn"] == command and execution["targetArn"] == cloud.target
    assert execution["executionTimeoutSeconds"] == 25
    assert [code for _, code in cloud.updates(execution_id)] == [None]  # one update, accepted
    env = dict(line.split("=", 1) for line in evidence.read_text().splitlines() if "=" in line)
    assert env["COMMAND_EXECUTION_ID"] == env["JOB_ID"] == execution_id
    assert env["THING_NAME"] == thing.name
    # The timeout came from the MQTT 5 message expiry interval:
    assert f"command received execution_id={execution_id} handler=echo timeout=2" in agent.log()
    log = tmp_path / "agent" / "state" / "logs" / f"command-{execution_id}.log"
    assert "to stderr" in log.read_text()


def test_requests_it_cannot_run_are_rejected_with_a_reason(thing: Thing, cloud: Cloud,
                                                           tmp_path: Path) -> None:
    cases = {
        "unknown": ({"operation": "format-disk"}, "application/json", "UNKNOWN_OPERATION"),
        "not-json": (b"reboot now", "application/json", "INVALID_PAYLOAD"),
        "bad-args": ({"operation": "echo", "args": "x"}, "application/json", "INVALID_PAYLOAD"),
        "cbor": (b"\xa1\x61a\x01", "application/cbor", "UNSUPPORTED_FORMAT"),
        "text": (b"hello", "text/plain", "UNSUPPORTED_FORMAT"),
    }
    agent = commands_agent(thing, tmp_path, {"echo": counting(tmp_path)},
                           commands={"formats": ["json", "cbor", "generic"]})
    with ready(agent):
        executions = {name: cloud.start(cloud.command(name, doc, kind))
                      for name, (doc, kind, _) in cases.items()}
        ended = {name: cloud.wait(e) for name, e in executions.items()}
    for name, (_, _, code) in cases.items():
        assert ended[name]["status"] == "REJECTED", (name, agent.log())
        assert ended[name]["statusReason"]["reasonCode"] == code, name
        assert ended[name]["statusReason"]["reasonDescription"]
    assert "format-disk" in ended["unknown"]["statusReason"]["reasonDescription"]
    assert runs(tmp_path) == []


def test_off_by_default_the_cloud_times_the_execution_out(thing: Thing, cloud: Cloud,
                                                          tmp_path: Path) -> None:
    write_handler(tmp_path / "h", "echo.sh", counting(tmp_path))
    handlers = {"echo": {"command": [str(tmp_path / "h" / "echo.sh")]}}
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent", handlers) as agent:
        agent.wait_ready()
        execution_id = cloud.start(cloud.command("off", {"operation": "echo"}), timeout=1)
        assert cloud.get(execution_id)["status"] == "CREATED"
        execution = cloud.wait(execution_id, timeout=10)
        assert agent.stop() == 0
    assert execution["status"] == "TIMED_OUT"
    assert execution["statusReason"]["reasonCode"] == NO_RESPONSE
    assert "commands" not in agent.log()
    assert runs(tmp_path) == []


def test_a_request_delivered_again_is_answered_from_the_journal(thing: Thing, cloud: Cloud,
                                                                tmp_path: Path) -> None:
    with ready(commands_agent(thing, tmp_path, {"echo": counting(tmp_path, "echo out")})) \
            as agent:
        command = cloud.command("twice", {"operation": "echo", "args": ["once"]})
        execution_id = cloud.start(command)
        first = cloud.wait(execution_id)
        topic = f"$aws/commands/things/{thing.name}/executions/{execution_id}/request/json"
        thing.emulator.publish_raw(topic, json.dumps({"operation": "echo"}).encode())
        agent.wait_log(f"command request delivered again execution_id={execution_id}")
        deadline = time.monotonic() + 10
        while len(cloud.updates(execution_id)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert agent.stop() == 0
    assert first["status"] == "SUCCEEDED"
    assert runs(tmp_path) == ["once"]
    (sent, code), (resent, again) = cloud.updates(execution_id)
    assert (code, resent, again) == (None, sent, "InvalidStateTransition")
    assert cloud.get(execution_id) == first


def test_updates_are_paced_and_data_conflict_is_retried(thing: Thing, cloud: Cloud,
                                                        tmp_path: Path) -> None:
    handler = ('echo \'{"step": "one"}\' >&"$JOB_PROGRESS_FD"\nsleep 1.5\n'
               'echo \'{"step": "two"}\' >&"$JOB_PROGRESS_FD"\nsleep 0.5\n')
    with ready(commands_agent(thing, tmp_path, {"slow": handler})) as agent:
        execution_id = cloud.start(cloud.command("slow", {"operation": "slow"}))
        running = cloud.wait(execution_id, {"IN_PROGRESS"})
        thing.emulator.call_commands(lambda s: s.inject_rejections("DataConflict", 2))
        execution = cloud.wait(execution_id)
        assert agent.stop() == 0
    assert running["status"] == "IN_PROGRESS" and running["result"]["step"] == {"S": "one"}
    assert execution["status"] == "SUCCEEDED", agent.log()
    updates = cloud.updates(execution_id)
    statuses = [(u["status"] if u else None, code) for u, code in updates]
    assert statuses[0] == ("IN_PROGRESS", None)
    assert statuses[-1] == ("SUCCEEDED", None)
    assert [code for _, code in statuses].count("DataConflict") == 2
    assert "command update failed, retrying" in agent.log()


def test_time_runs_out_before_and_during_a_run(thing: Thing, cloud: Cloud,
                                               tmp_path: Path) -> None:
    agent = commands_agent(thing, tmp_path, {"nap": counting(tmp_path, 'sleep "$1"')},
                           commands={"max_concurrent": 1})
    with ready(agent):
        long_one = cloud.start(cloud.command("long", {"operation": "nap", "args": ["5"]}),
                               timeout=2)
        queued = cloud.start(cloud.command("queued", {"operation": "nap", "args": ["0"]}),
                             timeout=1)
        cloud.wait(long_one), cloud.wait(queued)
        time.sleep(1.5)  # the cloud's own timers have fired, the device has reported since
        during, before = cloud.get(long_one), cloud.get(queued)
        assert agent.stop() == 0
    assert before["status"] == "TIMED_OUT"
    assert before["statusReason"]["reasonCode"] == "EXPIRED_BEFORE_START"
    # The device stopped the handler at the execution's timeout and said so, whether before or
    # after the cloud's timer (a device may report after a cloud-set TIMED_OUT):
    assert during["status"] == "TIMED_OUT"
    assert during["statusReason"]["reasonCode"] == "EXECUTION_TIMEOUT", agent.log()
    assert runs(tmp_path) == ["5"]


@pytest.mark.parametrize("idempotent", [False, True])
def test_a_command_interrupted_by_a_crash(thing: Thing, cloud: Cloud, tmp_path: Path,
                                          idempotent: bool) -> None:
    marker = tmp_path / "first"
    body = counting(tmp_path, f'if [ ! -e {marker} ]; then touch {marker}; sleep 30; fi\n')
    agent = commands_agent(thing, tmp_path, {"work": body},
                           idempotent=["work"] if idempotent else [])
    with ready(agent):
        execution_id = cloud.start(cloud.command("crash", {"operation": "work"}), timeout=60)
        agent.wait_log("command handler started")
        agent.kill()
        agent.start()
        execution = cloud.wait(execution_id)
        assert agent.stop() == 0
    if idempotent:
        assert execution["status"] == "SUCCEEDED", agent.log()
        assert runs(tmp_path) == ["", ""]
    else:
        assert execution["status"] == "FAILED", agent.log()
        assert execution["statusReason"]["reasonCode"] == "INTERRUPTED"
        assert runs(tmp_path) == [""]


def test_a_persistent_session_keeps_a_command_sent_while_the_agent_was_down(
        thing: Thing, cloud: Cloud, tmp_path: Path) -> None:
    agent = commands_agent(thing, tmp_path, {"echo": counting(tmp_path)})
    config = yaml.safe_load(agent.config_path.read_text())
    config["mqtt"]["session_expiry"] = "1m"
    agent.config_path.write_text(yaml.safe_dump(config))
    with ready(agent):
        assert agent.stop() == 0  # the broker keeps the session and queues for it
        execution_id = cloud.start(cloud.command("later", {"operation": "echo", "args": ["q"]}))
        time.sleep(0.5)
        assert cloud.get(execution_id)["status"] == "CREATED"
        agent.start()
        execution = cloud.wait(execution_id)
        assert agent.stop() == 0
    assert execution["status"] == "SUCCEEDED", agent.log()
    assert runs(tmp_path) == ["q"]
    assert "rejoined_session=True" in agent.log()


def test_a_policy_without_commands_is_one_error_per_topic_until_it_is_fixed(
        thing: Thing, cloud: Cloud, tmp_path: Path) -> None:
    """Commands' subscriptions are refused by the broker's AWS IoT policy like the Jobs ones:
    one ERROR naming each topic filter and iot:Subscribe, jobs unaffected, and a fixed policy
    takes effect without a restart."""
    agent = commands_agent(thing, tmp_path, {"echo": counting(tmp_path)})
    thing.stack.set_policy(thing.name, JOBS_POLICY)  # the jobs half of the default policies
    root = f"$aws/commands/things/{thing.name}/executions/+"
    refused = [f"{root}/request/json", f"{root}/response/accepted/json",
               f"{root}/response/rejected/json"]
    with agent:  # (READY would wait up to a minute for the Commands subscriptions)
        for topic_filter in refused:
            agent.wait_log(f"must allow iot:Subscribe on topicfilter/{topic_filter}")
        job = thing.j("still-runs")
        thing.emulator.create_job(job, [thing.name], {"operation": "echo", "args": ["job"]})
        assert agent.wait_status(job)["status"] == "SUCCEEDED", agent.log()
        assert "commands subscribed" not in agent.log()
        thing.stack.set_policy(thing.name, None)  # the default policies: Commands too
        agent.wait_log("commands subscribed")
        execution = cloud.wait(cloud.start(cloud.command("fixed", {"operation": "echo",
                                                                   "args": ["cmd"]})))
        assert agent.stop() == 0
    assert execution["status"] == "SUCCEEDED", agent.log()
    assert runs(tmp_path) == ["job", "cmd"]
    errors = [line for line in agent.log().splitlines() if "ERROR" in line]
    for topic_filter in refused:
        assert sum(f"topicfilter/{topic_filter}" in line for line in errors) == 1, errors
    assert "now allows iot:Subscribe on" in agent.log()


def test_garbage_on_the_commands_topics_is_ignored(thing: Thing, cloud: Cloud,
                                                   tmp_path: Path) -> None:
    root = f"$aws/commands/things/{thing.name}/executions"
    garbage = [
        (f"{root}/no-such/response/accepted/json", b"{not json"),
        (f"{root}/no-such/response/rejected/json", b'{"error": 5}'),
        (f"{root}/bad$id/request/json", b'{"operation": "echo"}'),
        (f"{root}/x/request/xml", b"<operation/>"),
        (f"{root}/x/response/json", b"\xff" * 70000),
    ]
    with ready(commands_agent(thing, tmp_path, {"echo": counting(tmp_path)})) as agent:
        for topic, payload in garbage:
            thing.emulator.publish_raw(topic, payload)
        agent.wait_log("ignoring a message on an unknown commands topic")
        execution = cloud.wait(cloud.start(cloud.command("after", {"operation": "echo",
                                                                   "args": ["ok"]})))
        assert agent.stop() == 0
    assert execution["status"] == "SUCCEEDED", agent.log()
    assert runs(tmp_path) == ["ok"]
    assert "Traceback" not in agent.log()


def test_a_broker_restart_mid_command_loses_nothing(own_stack: Stack, tmp_path: Path) -> None:
    """The session is lost with the broker: subscriptions come back, the result is delivered."""
    assert own_stack.broker is not None and own_stack.emulator is not None
    name = "cmd-reconnecting"
    own_stack.thing(name)
    thing = Thing(name, own_stack.dir / "things" / name / "agent.yaml", own_stack)
    cloud = Cloud(thing)
    gate = tmp_path / "gate"
    agent = commands_agent(thing, tmp_path, {
        "wait": counting(tmp_path, f"while [ ! -e {gate} ]; do sleep 0.1; done\n")})
    with ready(agent):
        first = cloud.start(cloud.command("mid", {"operation": "wait", "args": ["1"]}))
        cloud.wait(first, {"IN_PROGRESS"})
        own_stack.broker.restart()
        agent.wait_log("disconnected", 10)
        gate.touch()  # the handler ends while the agent may still be reconnecting
        assert cloud.wait(first, timeout=60)["status"] == "SUCCEEDED", agent.log()
        deadline = time.monotonic() + 30
        while agent.log().count("commands subscribed") < 2:
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.05)
        second = cloud.wait(cloud.start(cloud.command("after", {"operation": "wait",
                                                                "args": ["2"]})))
        assert agent.stop() == 0
    assert second["status"] == "SUCCEEDED", agent.log()
    assert runs(tmp_path) == ["1", "2"]
