"""The AWS managed templates, as a console user meets them: boto3 against the sandbox's control
plane (every raw answer checked against botocore's model), then each template end to end through
the real agent process with the shipped handlers, as ``iot-jobs-agent sandbox`` configures them:
downloads from a loopback HTTP server, packages and services with the stand-ins, the reboot with
the stand-in reboot command.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from agent.sandbox.demo import sandbox_settings
from agent.sandbox.stack import Stack
from agent.sandbox.standins import StandIns
from agent.sandbox.templates import TEMPLATES
from tests.conftest import Thing, Web
from tests.integration.agent_harness import AgentProcess, NotifySocket
from tests.integration.test_boto3_referee import README, _user_env, sandbox_client

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def iot(stack: Stack) -> Any:
    return sandbox_client("iot", stack.control_endpoint, stack.region)


def template_arn(stack: Stack, name: str) -> str:
    return f"arn:aws:iot:{stack.region}::jobtemplate/{name}:1.0"


def thing_arn(thing: Thing) -> str:
    stack = thing.stack
    return f"arn:aws:iot:{stack.region}:{stack.account_id}:thing/{thing.name}"


def create(iot: Any, thing: Thing, job: str, template: str, **parameters: str) -> str:
    job_id = thing.j(job)
    iot.create_job(jobId=job_id, targets=[thing_arn(thing)],
                   jobTemplateArn=template_arn(thing.stack, template),
                   documentParameters=parameters)
    return job_id


def error(call: Any, **kwargs: Any) -> tuple[str, str]:
    with pytest.raises(ClientError) as info:
        call(**kwargs)
    return info.value.response["Error"]["Code"], info.value.response["Error"]["Message"]


# ----------------------------------------------------------------------------- control plane


def test_list_and_describe_the_managed_templates(iot: Any, stack: Stack) -> None:
    listed = iot.list_managed_job_templates()["managedJobTemplates"]
    assert [t["templateName"] for t in listed] == sorted(TEMPLATES)
    assert len(listed) == 8
    assert listed[0] == {
        "templateArn": f"arn:aws:iot:{stack.region}::jobtemplate/AWS-Download-File:1.0",
        "templateName": "AWS-Download-File",
        "description": "A managed job template for downloading a file.",
        "environments": ["LINUX"], "templateVersion": "1.0"}
    one = iot.list_managed_job_templates(templateName="AWS-Reboot")["managedJobTemplates"]
    assert [t["templateName"] for t in one] == ["AWS-Reboot"]
    pages = iot.get_paginator("list_managed_job_templates").paginate(
        PaginationConfig={"PageSize": 3})
    assert [t["templateName"] for p in pages for t in p["managedJobTemplates"]] == \
        sorted(TEMPLATES)

    described = iot.describe_managed_job_template(templateName="AWS-Download-File")
    assert described["documentParameters"][0] == {
        "key": "downloadUrl", "description": "URL of file to download.", "regex": "(.*?)",
        "example": "http://www.example.com/index.html", "optional": False}
    assert [(p["key"], p["optional"]) for p in described["documentParameters"]] == [
        ("downloadUrl", False), ("filePath", False), ("runAsUser", True),
        ("pathToHandler", True)]
    # The document exactly as AWS's developer guide prints it.
    assert described["document"] == (
        '{"version":"1.0","steps":[{"action":{"name":"Download-File","type":"runHandler",'
        '"input":{"handler":"download-file.sh","args":["${aws:iot:parameter:downloadUrl}",'
        '"${aws:iot:parameter:filePath}"],"path":"${aws:iot:parameter:pathToHandler}"},'
        '"runAsUser":"${aws:iot:parameter:runAsUser}"}}]}')
    run = iot.describe_managed_job_template(templateName="AWS-Run-Command",
                                            templateVersion="1.0")
    assert [p["key"] for p in run["documentParameters"]] == ["command", "runAsUser"]
    assert json.loads(run["document"])["steps"][0]["action"]["type"] == "runCommand"
    assert error(iot.describe_managed_job_template, templateName="AWS-Nope")[0] == \
        "ResourceNotFoundException"
    assert error(iot.describe_managed_job_template, templateName="AWS-Reboot",
                 templateVersion="2.0")[0] == "ResourceNotFoundException"
    assert error(iot.describe_managed_job_template, templateName="AWS-Reboot",
                 templateVersion="latest")[0] == "InvalidRequestException"


def test_create_job_substitutes_the_parameters(iot: Any, thing: Thing) -> None:
    job_id = create(iot, thing, "dl", "AWS-Download-File", downloadUrl="https://h/a?b=\"c\"",
                    filePath="/tmp/x")
    document = json.loads(iot.get_job_document(jobId=job_id)["document"])
    action = document["steps"][0]["action"]
    assert action["input"] == {"handler": "download-file.sh", "args": ["https://h/a?b=\"c\"",
                                                                       "/tmp/x"], "path": ""}
    assert action["runAsUser"] == ""  # omitted optional parameters become empty strings
    before = iot.get_job_document(jobId=job_id, beforeSubstitution=True)["document"]
    assert "${aws:iot:parameter:downloadUrl}" in before
    job = iot.describe_job(jobId=job_id)["job"]
    assert job["jobTemplateArn"] == template_arn(thing.stack, "AWS-Download-File")
    assert job["documentParameters"] == {"downloadUrl": "https://h/a?b=\"c\"",
                                         "filePath": "/tmp/x"}
    assert job["description"] == "A managed job template for downloading a file."
    reboot = create(iot, thing, "rb", "AWS-Reboot", runAsUser="root")
    assert json.loads(iot.get_job_document(jobId=reboot)["document"])["steps"][0]["action"][
        "runAsUser"] == "root"


@pytest.mark.parametrize(("kwargs", "code", "message"), [
    ({"template": "AWS-Download-File", "documentParameters": {"filePath": "/x"}},
     "InvalidRequestException", "needs the parameter downloadUrl"),
    ({"template": "AWS-Reboot", "documentParameters": {"reboot": "now"}},
     "InvalidRequestException", "AWS-Reboot has no parameter 'reboot'"),
    ({"template": "AWS-Run-Command", "documentParameters": {"command": "echo",
                                                             "runAsUser": "u" * 300}},
     "InvalidRequestException", "the value of runAsUser does not match (.){0,256}"),
    ({"template": "AWS-Reboot", "document": "{}"}, "InvalidRequestException",
     "either document or jobTemplateArn"),
    ({"documentParameters": {"a": "b"}, "document": "{}"}, "InvalidRequestException",
     "documentParameters can only be used with a jobTemplateArn"),
    ({"template": "AWS-Format-Disk"}, "ResourceNotFoundException", "does not exist"),
    ({"arn": "arn:aws:iot:eu-west-9::jobtemplate/AWS-Reboot:1.0"}, "ResourceNotFoundException",
     "does not exist"),
    ({"arn": "arn:aws:iot:us-east-1:123456789012:jobtemplate/mine"},
     "ResourceNotFoundException", "AWS managed templates only"),
])
def test_create_job_from_a_template_refuses(iot: Any, thing: Thing, kwargs: dict[str, Any],
                                            code: str, message: str) -> None:
    arguments: dict[str, Any] = {"jobId": thing.j("bad"), "targets": [thing_arn(thing)]}
    if "template" in kwargs:
        arguments["jobTemplateArn"] = template_arn(thing.stack, kwargs.pop("template"))
    if "arn" in kwargs:
        arguments["jobTemplateArn"] = kwargs.pop("arn")
    got = error(iot.create_job, **arguments, **kwargs)
    assert got[0] == code and message in got[1], got


# ----------------------------------------------------------------------------- end to end


@pytest.fixture
def server(web: Web) -> str:
    (web.root / "firmware.bin").write_bytes(bytes(range(256)) * 64)
    return web.url


def sandboxed_agent(thing: Thing, tmp_path: Path) -> tuple[AgentProcess, StandIns]:
    """The agent configured as ``iot-jobs-agent sandbox`` configures it."""
    settings = sandbox_settings(tmp_path / "sandbox")
    agent = AgentProcess(thing.stack, thing.name, tmp_path / "agent", settings.pop("handlers"),
                         **settings)
    return agent, StandIns(tmp_path / "sandbox" / "stand-ins")


def test_download_file_template(iot: Any, thing: Thing, tmp_path: Path, server: str) -> None:
    agent, _ = sandboxed_agent(thing, tmp_path)
    target = tmp_path / "device" / "firmware.bin"
    with agent:
        agent.wait_ready()
        ok = create(iot, thing, "dl", "AWS-Download-File",
                    downloadUrl=f"{server}/firmware.bin?X-Amz-Signature=s3cr3t",
                    filePath=str(target))
        done = agent.wait_status(ok)
        expired = create(iot, thing, "expired", "AWS-Download-File",
                         downloadUrl=f"{server}/expired/firmware.bin?X-Amz-Expires=60",
                         filePath=str(target))
        failed = agent.wait_status(expired)
    assert done["status"] == "SUCCEEDED", done
    assert target.read_bytes() == bytes(range(256)) * 64
    assert done["statusDetails"]["outputHead"].startswith(f"downloaded {server}/firmware.bin ")
    assert "s3cr3t" not in json.dumps(done["statusDetails"]) + agent.log()
    assert failed["status"] == "FAILED"
    reason = failed["statusDetails"]["reason"]
    assert reason.startswith("exit code 1: download of ") and "A presigned URL has expired" in \
        reason
    assert "presigned URL has expired" in failed["statusDetails"]["stderr"]
    assert target.read_bytes() == bytes(range(256)) * 64  # the old file is untouched


def test_package_and_service_templates(iot: Any, thing: Thing, tmp_path: Path) -> None:
    agent, stand_ins = sandboxed_agent(thing, tmp_path)
    jobs = [("AWS-Install-Application", {"packages": "jq nginx"}, "SUCCEEDED"),
            ("AWS-Remove-Application", {"packages": "jq"}, "SUCCEEDED"),
            ("AWS-Install-Application", {"packages": "no-such-package"}, "FAILED"),
            ("AWS-Install-Application", {"packages": "jq --force-yes"}, "FAILED"),
            ("AWS-Start-Application", {"services": "nginx demo"}, "SUCCEEDED"),
            ("AWS-Stop-Application", {"services": "demo"}, "SUCCEEDED"),
            ("AWS-Restart-Application", {"services": "nginx"}, "SUCCEEDED"),
            ("AWS-Stop-Application", {"services": "iot-jobs-agent"}, "FAILED")]
    results = []
    with agent:
        agent.wait_ready()
        for i, (template, parameters, _) in enumerate(jobs):
            results.append(agent.wait_status(create(iot, thing, f"t{i}", template,
                                                    **parameters)))
    assert [r["status"] for r in results] == [expected for *_, expected in jobs], results
    assert stand_ins.read("installed-packages") == ["nginx"]
    assert stand_ins.read("running") == ["nginx.service"]
    assert "Unable to locate package no-such-package" in results[2]["statusDetails"]["reason"]
    assert "refusing package name '--force-yes'" in results[3]["statusDetails"]["reason"]
    assert "refusing to stop iot-jobs-agent.service" in results[7]["statusDetails"]["reason"]
    assert [line.split()[:2] for line in stand_ins.read("log")] == [
        ["apt-get", "install"], ["apt-get", "remove"], ["apt-get", "install"],
        ["systemctl", "start"], ["systemctl", "start"], ["systemctl", "stop"],
        ["systemctl", "restart"]]


def test_run_command_template(iot: Any, thing: Thing, tmp_path: Path) -> None:
    agent, _ = sandboxed_agent(thing, tmp_path)
    marker = tmp_path / "made, by a job"
    with agent:
        agent.wait_ready()
        ok = agent.wait_status(create(iot, thing, "touch", "AWS-Run-Command",
                                      command=f"touch,{str(marker).replace(',', chr(92) + ',')}"))
        refused = agent.wait_status(create(iot, thing, "rm", "AWS-Run-Command",
                                           command="rm,-rf,/tmp/x"))
        shell = agent.wait_status(create(iot, thing, "sh", "AWS-Run-Command",
                                         command="echo,$(touch /tmp/pwned-by-job);x"))
    assert ok["status"] == "SUCCEEDED" and marker.exists(), ok
    assert refused["status"] == "REJECTED"
    assert refused["statusDetails"]["reason"] == (
        "runCommand program 'rm' is not allowed on this device: add it to run_command.allow in "
        "the agent's config")
    assert shell["status"] == "SUCCEEDED"
    assert shell["statusDetails"]["outputHead"] == "$(touch /tmp/pwned-by-job);x"
    assert not Path("/tmp/pwned-by-job").exists()


def test_reboot_template_with_the_stand_in(iot: Any, thing: Thing, tmp_path: Path) -> None:
    agent, stand_ins = sandboxed_agent(thing, tmp_path)
    with agent:
        agent.wait_ready()
        job = create(iot, thing, "reboot", "AWS-Reboot")
        assert agent.process is not None
        agent.process.wait(30)  # the stand-in reboot stops the agent, as a shutdown would
        rebooting = thing.emulator.execution(job, thing.name)
        assert rebooting["status"] == "IN_PROGRESS"
        assert rebooting["statusDetails"] == {"step": "rebooting", "handler": "Reboot"}
        agent.stop()
        agent.start()  # the next boot
        execution = agent.wait_status(job)
        time.sleep(0.5)
    assert execution["status"] == "SUCCEEDED", execution
    assert execution["statusDetails"]["reason"] == "rebooted as the handler asked"
    assert stand_ins.read("log") == ["reboot"]  # once: never a reboot loop


def test_restart_the_agent_itself(iot: Any, thing: Thing, tmp_path: Path) -> None:
    settings = sandbox_settings(tmp_path / "sandbox")
    systemd = NotifySocket(tmp_path / "notify")
    agent = AgentProcess(thing.stack, thing.name, tmp_path / "agent", settings.pop("handlers"),
                         notify_socket=systemd.path, **settings)
    stand_ins = StandIns(tmp_path / "sandbox" / "stand-ins")
    with agent:
        agent.wait_ready()
        assert agent.process is not None
        pid = agent.process.pid
        job = create(iot, thing, "restart", "AWS-Restart-Application",
                     services="nginx iot-jobs-agent")
        execution = agent.wait_status(job)
        agent.wait_log("recovering job_id=" + job)
        assert agent.process.pid == pid and agent.process.poll() is None
        assert agent.log().count("ready thing=") == 2  # the agent restarted, once
        assert agent.stop() == 0
    systemd.collect_until("STOPPING=1")  # everything up to the final stop
    systemd.close()
    # systemd sees a reload of the same process, not a stop it would end with SIGKILL
    kinds = [m.split("\n")[0] for m in systemd.messages if not m.startswith(("STATUS=",
                                                                              "WATCHDOG"))]
    assert kinds == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"], systemd.messages
    assert execution["status"] == "SUCCEEDED", execution
    assert execution["statusDetails"] == {"reason": "the agent restarted as the step asked",
                                          "step": "restarted"}
    assert stand_ins.read("log") == ["systemctl restart nginx"]
    sent = [u.get("executionState", {}).get("statusDetails", {}).get("step") for u in
            agent.updates()]
    assert "restarting the agent" in sent  # heard before the agent went down


# ----------------------------------------------------------------------------- the README


def test_the_readme_template_example_runs_in_the_sandbox(tmp_path: Path) -> None:
    """`iot-jobs-agent sandbox --no-agent`, the agent from .sandbox/agent.yaml, and the README's
    managed-template example, exactly as a user runs them."""
    text = README.read_text()
    section = text[text.index("### In the sandbox"):]
    example = re.search(r"```python\n(.*?)```", section, re.S)
    assert example, "the README section has no python example"
    sandbox = subprocess.Popen([sys.executable, "-m", "agent", "sandbox", "--dir", ".sandbox",
                                "--no-agent"], cwd=tmp_path, env=_user_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    agent = None
    try:
        info = tmp_path / ".sandbox" / "sandbox.json"
        deadline = time.monotonic() + 120
        while not info.exists() and sandbox.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert info.exists(), "the sandbox wrote no sandbox.json"
        check = subprocess.run([sys.executable, "-m", "agent", "check-config", "--config",
                                ".sandbox/agent.yaml"], cwd=tmp_path, env=_user_env(),
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stderr  # every new setting the sandbox writes
        agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config",
                                  ".sandbox/agent.yaml"], cwd=tmp_path, env=_user_env(),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        run = subprocess.run([sys.executable, "-c", example.group(1)], cwd=tmp_path,
                             env=_user_env(), capture_output=True, text=True, timeout=120)
    finally:
        log = ""
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            log = agent.communicate(timeout=60)[1]
        sandbox.send_signal(signal.SIGINT)
        sandbox.communicate(timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr + log
    lines = run.stdout.splitlines()
    assert lines[:8] == [f"{t.name} - {t.description}" for t in
                         sorted(TEMPLATES.values(), key=lambda t: t.name)]
    expected = ("SUCCEEDED apt-get: install jq htop | Setting up jq (stand-in) ... | Setting up "
                "htop (stand-in) ...")
    assert lines[8] == expected
    assert f"# {expected}" in section  # the README shows what it prints
