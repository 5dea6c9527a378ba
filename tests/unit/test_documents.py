"""The plan layer: every document form becomes the same plan, or a clear rejection.

A fake :class:`Host` stands for the device (files in handler_dir, programs on PATH, users), so
the lookup rules are tested exhaustively here; tests/integration/test_documents.py runs the same
documents through the real agent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import SAFE_PATH, Config, HandlerConfig, MqttConfig, RunCommandConfig
from agent.documents import DocumentError, Plan, judge, plan_document, plan_job
from agent.documents.command import split_command
from agent.documents.plan import MAX_STEPS, Step

HANDLER_DIR = Path("/usr/lib/agent/handlers")


@dataclass
class FakeHost:
    files: set[str] = field(default_factory=lambda: {
        f"{HANDLER_DIR}/download-file.sh", f"{HANDLER_DIR}/reboot.sh",
        f"{HANDLER_DIR}/unsafe.sh", "/opt/dc/jobs/custom.sh"})
    programs: dict[str, str] = field(default_factory=lambda: {
        "echo": "/usr/bin/echo", "touch": "/usr/bin/touch", "mkdir": "/usr/bin/mkdir"})
    users: set[str] = field(default_factory=lambda: {"root", "pi", "agent"})
    searched: list[str] = field(default_factory=list)

    def exists(self, path: Path) -> bool:
        return str(path) in self.files

    def program_problem(self, program: Path) -> str | None:
        if program.name == "unsafe.sh":
            return f"handler program {program} is writable by group or others"
        if str(program) not in self.files and str(program) not in self.programs.values():
            return f"handler program {program} does not exist: install it or fix the path"
        return None

    def which(self, name: str, search: str) -> str | None:
        self.searched.append(search)
        return self.programs.get(name)

    def user_exists(self, name: str) -> bool:
        return name in self.users

    def agent_user(self) -> str | None:
        return "agent"


def config(**settings: Any) -> Config:
    defaults: dict[str, Any] = {
        "thing_name": "t", "mqtt": MqttConfig(endpoint="e", cert=Path("c"), key=Path("k")),
        "handlers": {"reboot": HandlerConfig(command=("/usr/lib/x/reboot.sh",)),
                     "run": HandlerConfig(command=("/usr/lib/x/run.sh", "--fixed"), timeout=600,
                                          idempotent=True, environment={"A": "1"}),
                     "upgrade": HandlerConfig(command=("/usr/lib/x/upgrade.sh",), user="pi",
                                              verify=("/usr/lib/x/check.sh",))},
        "handler_dir": HANDLER_DIR, "handler_timeout": 120.0,
    }
    return Config(**{**defaults, **settings})


def plan(document: Any, cfg: Config | None = None, host: FakeHost | None = None) -> Plan:
    return plan_job(json.dumps(document), cfg or config(), host or FakeHost())


def rejected(document: Any, cfg: Config | None = None, host: FakeHost | None = None) -> str:
    with pytest.raises(DocumentError) as info:
        plan(document, cfg, host)
    return str(info.value)


def dc(*actions: dict[str, Any], **top: Any) -> dict[str, Any]:
    """A Device Client document with one step per action."""
    return {"version": "1.0", "steps": [{"action": a} for a in actions], **top}


def handler(name: str = "Download", handler: str = "download-file.sh",
            args: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    given: dict[str, Any] = {"handler": handler, "args": args or [], "path": "default"}
    given.update(extra.pop("input", {}))
    return {"name": name, "type": "runHandler", "input": given, **extra}


def command(text: str, name: str = "Run", **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "runCommand", "input": {"command": text}, **extra}


ALLOW_SOME = RunCommandConfig(allow=("echo", "/usr/bin/touch"), users=("pi",))

# ----------------------------------------------------------------------------- the native form


def test_native_document_is_one_step_with_the_handler_settings() -> None:
    p = plan({"operation": "run", "args": ["a b", "$(x)"], "extra": 1})
    assert p.form == "native" and not p.device_client and p.operation == "run"
    (step,) = p.steps
    assert step.argv == ("/usr/lib/x/run.sh", "--fixed", "a b", "$(x)")
    assert (step.kind, step.timeout, step.rerun, dict(step.environment)) == (
        "handler", 600, True, {"A": "1"})
    assert p.document == {"operation": "run", "args": ["a b", "$(x)"], "extra": 1}
    verify = plan({"operation": "upgrade", "args": ["v2"]}).steps[0]
    assert verify.user == "pi" and verify.verify == ("/usr/lib/x/check.sh", "v2")


@pytest.mark.parametrize(("text", "reason"), [
    (None, "no document"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ("{}", 'no "operation"'),
    ('{"operation": 5}', 'no "operation"'),
    ('{"operation": "format"}', "no handler for operation 'format' on this device "
                                "(configured: reboot, run, upgrade"),
    ('{"operation": "run", "args": "x"}', '"args" must be a list'),
    ('{"operation": "run", "args": [1]}', '"args"[0] must be a string'),
    ('{"operation": "run", "args": ["a\\u0000b"]}', "NUL byte"),
    (json.dumps({"operation": "run", "args": ["x" * 5000]}), "over 4096"),
    (json.dumps({"operation": "run", "args": ["x"] * 300}), "at most 256"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
])
def test_invalid_documents(text: str | None, reason: str) -> None:
    with pytest.raises(DocumentError) as info:
        plan_job(text, config(), FakeHost())
    assert reason in str(info.value)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
                    max_leaves=10))
def test_any_json_document_is_a_plan_or_a_clear_rejection(value: object) -> None:
    """No document, however odd, crashes the dispatcher: it is planned or refused."""
    try:
        p = plan_document(value, config(), FakeHost())
    except DocumentError as exc:
        assert str(exc)
    else:
        assert p.steps and all(isinstance(a, str) for s in p.steps for a in s.argv)


@given(st.fixed_dictionaries({"version": st.just("1.0")}, optional={
    "steps": st.lists(st.fixed_dictionaries({"action": st.fixed_dictionaries({}, optional={
        "name": st.text(max_size=5), "type": st.sampled_from(["runHandler", "runCommand", "x"]),
        "input": st.fixed_dictionaries({}, optional={
            "handler": st.sampled_from(["reboot.sh", "echo", "../x", "", 3]),
            "command": st.text(max_size=12), "path": st.sampled_from(["default", "", "/tmp"]),
            "args": st.lists(st.text(max_size=5), max_size=3)}),
        "runAsUser": st.sampled_from(["", "pi", "nobody-here", 7]),
        "ignoreStepFailure": st.sampled_from(["true", "false", True, 1, None]),
        "allowStdErr": st.sampled_from([0, 3, "2", -1, "x", None])})}), max_size=3),
    "includeStdOut": st.sampled_from(["true", False, "maybe"])}))
def test_any_device_client_document_is_a_plan_or_a_clear_rejection(doc: dict[str, Any]) -> None:
    cfg = config(run_command=ALLOW_SOME)
    try:
        p = plan_document(doc, cfg, FakeHost())
    except DocumentError as exc:
        assert str(exc)
    else:
        assert p.form == "device-client" and len(p.steps) == len(doc["steps"])


# ----------------------------------------------------------------------------- the old flat form


def test_flat_form_naming_a_yaml_handler_is_the_native_form() -> None:
    assert plan({"operation": "reboot", "path": "default"}).form == "native"
    # a native document may carry a "version" of its own; "steps" make it Device Client's
    assert plan({"operation": "reboot", "version": "2"}).form == "native"
    assert plan({"operation": "reboot", "version": "1.0", "steps": [
        {"action": handler()}]}).form == "device-client"
    assert "is not supported" in rejected({"operation": "nope", "version": "2"})


def test_flat_form_runs_the_script_with_device_client_argv() -> None:
    p = plan({"operation": "download-file.sh", "args": ["http://h/f", "/tmp/f"],
              "path": "default", "allowStdErr": 2, "includeStdOut": "true"})
    assert p.form == "flat" and p.device_client and p.include_stdout
    (step,) = p.steps
    assert step.argv == (f"{HANDLER_DIR}/download-file.sh", "", "http://h/f", "/tmp/f")
    assert (step.kind, step.allow_stderr, step.rerun, step.timeout) == ("script", 2, True, 120)


def test_flat_form_with_an_unknown_operation_is_rejected_like_the_native_one() -> None:
    assert "no handler for operation 'nope.sh' on this device" in rejected(
        {"operation": "nope.sh"})


# ----------------------------------------------------------------------------- Device Client


def test_device_client_steps_then_final_step() -> None:
    doc = dc(handler("One", args=["u", "f"], runAsUser="pi", ignoreStepFailure="true",
                     allowStdErr=2),
             command("mkdir,-p,/var/tmp/new\\,dir", name="Two"),
             finalStep={"action": handler("Last", "reboot.sh")}, includeStdOut=True,
             _comment="ignored", unknown={"also": "ignored"})
    p = plan(doc, config(run_command=RunCommandConfig(allow=("mkdir",))))
    assert p.form == "device-client" and p.final and p.include_stdout
    assert [s.name for s in p.steps] == ["One", "Two", "Last"]
    one, two, last = p.steps
    assert one.argv == (f"{HANDLER_DIR}/download-file.sh", "pi", "u", "f")
    assert one.user is None  # runHandler: the user is the handler's argument, not a switch
    assert (one.ignore_failure, one.allow_stderr) == (True, 2)
    assert two.argv == ("/usr/bin/mkdir", "-p", "/var/tmp/new,dir") and two.kind == "command"
    assert (two.rerun, two.ignore_failure, two.allow_stderr) == (False, False, None)
    assert last.argv == (f"{HANDLER_DIR}/reboot.sh", "")
    assert p.operation == "One (+2 steps)" and p.timeout == 120 * 2 + 3600


@pytest.mark.parametrize(("value", "expected"), [
    ("true", True), ("false", False), (True, True), (False, False), ("TRUE", True),
    (" false ", False), (None, False)])
def test_booleans_as_strings_and_as_json(value: object, expected: bool) -> None:
    action = handler(ignoreStepFailure=value) if value is not None else handler()
    p = plan(dc(action, includeStdOut=value))
    assert p.steps[0].ignore_failure is expected and p.include_stdout is expected


@pytest.mark.parametrize("value", ["yes", 1, 0, "1", [], {}])
def test_other_booleans_are_rejected(value: object) -> None:
    assert "ignoreStepFailure must be true or false" in rejected(
        dc(handler(ignoreStepFailure=value)))
    assert "\"includeStdOut\" must be true or false" in rejected(
        dc(handler(), includeStdOut=value))


@pytest.mark.parametrize(("value", "expected"), [(0, 0), (3, 3), ("2", 2), (None, None)])
def test_allow_stderr_values(value: object, expected: int | None) -> None:
    action = handler(allowStdErr=value) if value is not None else handler()
    assert plan(dc(action)).steps[0].allow_stderr == expected


@pytest.mark.parametrize("value", [-1, "x", 1.5, True, [1]])
def test_bad_allow_stderr_is_rejected(value: object) -> None:
    assert "allowStdErr must be a whole number" in rejected(dc(handler(allowStdErr=value)))


@pytest.mark.parametrize(("doc", "reason"), [
    ({"version": "2.0", "steps": []}, '"version" \'2.0\' is not supported'),
    ({"version": 1.0, "steps": []}, "is not supported"),
    ({"version": "1.0"}, '"steps" must be a non-empty list'),
    ({"version": "1.0", "steps": []}, '"steps" must be a non-empty list'),
    ({"version": "1.0", "steps": [{"name": "x"}]}, 'steps[0] must be an object {"action"'),
    (dc({"name": "x", "type": "runScript", "input": {}}),
     'steps[0].action.type must be "runHandler" or "runCommand"'),
    (dc({"name": "x", "type": "runHandler"}), "steps[0].action.input must be an object"),
    (dc(handler(input={"handler": ""})), "steps[0].action.input.handler is missing"),
    (dc(handler(input={"args": "a"})), "steps[0].action.input.args must be a list"),
    (dc(command("")), "input.command is missing"),
    (dc(handler(runAsUser=5)), "runAsUser must be a string"),
    (dc(handler(), finalStep="cleanup"), 'finalStep must be an object {"action"'),
])
def test_invalid_device_client_documents(doc: dict[str, Any], reason: str) -> None:
    assert reason in rejected(doc, config(run_command=ALLOW_SOME))


def test_step_names_are_cleaned_for_status_details() -> None:
    p = plan(dc(handler("bad\nname\x00" + "x" * 300), handler(name="")))
    assert p.steps[0].name == "badname" + "x" * 121
    assert p.steps[1].name == "steps[1].action"  # no name: where it is in the document


# ----------------------------------------------------------------------------- conditions


def test_conditions_met_unmet_and_unknown() -> None:
    facts = config(device_facts={"operatingSystem": "debian", "arch": "arm64"})
    cond = [{"key": "operatingSystem", "value": ["ubuntu", "debian"], "type": "stringEqual"},
            {"key": "arch", "value": ["arm64"]}]  # type defaults to stringEqual
    assert plan(dc(handler(), conditions=cond), facts).steps
    reason = rejected(dc(handler(), conditions=[{"key": "arch", "value": ["x86_64"]}]), facts)
    assert reason == ("condition not met: arch is 'arm64' on this device; the job wants one of "
                      "'x86_64'")
    reason = rejected(dc(handler(), conditions=[{"key": "model", "value": ["g2"]}]), facts)
    assert "condition on 'model': this device does not define that fact" in reason
    assert "device_facts" in reason


@pytest.mark.parametrize(("conditions", "reason"), [
    ({"key": "a"}, '"conditions" must be a list'),
    (["a"], "conditions[0] must be an object"),
    ([{"value": ["x"]}], "conditions[0].key is missing"),
    ([{"key": "a", "value": ["x"], "type": "stringNotEqual"}], "is not supported"),
    ([{"key": "a", "value": []}], "conditions[0].value must be a non-empty list"),
    ([{"key": "a", "value": [1]}], "conditions[0].value must be a non-empty list"),
])
def test_malformed_conditions(conditions: object, reason: str) -> None:
    assert reason in rejected(dc(handler(), conditions=conditions),
                              config(device_facts={"a": "x"}))


# ----------------------------------------------------------------------------- runCommand


@pytest.mark.parametrize(("text", "argv"), [
    ("echo", ("echo",)),
    ("echo,hello world", ("echo", "hello world")),
    ("mkdir, -p ,/var/tmp/new\\,dir", ("mkdir", "-p", "/var/tmp/new,dir")),
    ("echo,a\\,b\\,c,d", ("echo", "a,b,c", "d")),
    ("echo,,x,", ("echo", "", "x", "")),
    ("echo,back\\slash\\n", ("echo", "back\\slash\\n")),
    ("echo,$(reboot);rm -rf /", ("echo", "$(reboot);rm -rf /")),
    ("  echo  ,x", ("echo", "x")),
])
def test_command_splitting(text: str, argv: tuple[str, ...]) -> None:
    assert split_command(text) == argv


@pytest.mark.parametrize(("text", "reason"), [
    (",x", "no program"),
    ("echo hello", "contains whitespace; separate the arguments with commas (echo,hello)"),
    ("echo," + ",".join(["x"] * 300), "at most 256"),
])
def test_bad_commands(text: str, reason: str) -> None:
    with pytest.raises(DocumentError, match=None) as info:
        split_command(text)
    assert reason in str(info.value)


def test_run_command_is_refused_unless_allowed() -> None:
    reason = rejected(dc(command("touch,/tmp/x")))
    assert reason == ("runCommand program 'touch' is not allowed on this device: add it to "
                      "run_command.allow in the agent's config")


@pytest.mark.parametrize(("allow", "text", "argv"), [
    (("echo",), "echo,hi", ("/usr/bin/echo", "hi")),  # by name
    (("/usr/bin/touch",), "touch,/tmp/x", ("/usr/bin/touch", "/tmp/x")),  # by resolved path
    (("echo",), "/usr/bin/echo,hi", ("/usr/bin/echo", "hi")),  # path of an allowed name
    (("*",), "mkdir,-p,/d", ("/usr/bin/mkdir", "-p", "/d")),  # the explicit opt-in
    (("*",), "/opt/tool/run,x", ("/opt/tool/run", "x")),
])
def test_run_command_allowed(allow: tuple[str, ...], text: str, argv: tuple[str, ...]) -> None:
    host = FakeHost()
    host.programs["tool"] = "/opt/tool/run"
    step = plan(dc(command(text)), config(run_command=RunCommandConfig(allow=allow)),
                host).steps[0]
    assert step.argv == argv and step.kind == "command" and step.user is None


@pytest.mark.parametrize(("allow", "text", "reason"), [
    (("echo",), "/tmp/echo,hi", "is not allowed"),  # same name, another file
    (("echo",), "bin/echo,hi", "must be a name found on PATH or an absolute path"),
    (("*",), "nonexistent,x", "is not found on PATH (/usr/local/sbin"),
    (("touch",), "touch\\,x", "is not allowed"),
])
def test_run_command_refused(allow: tuple[str, ...], text: str, reason: str) -> None:
    assert reason in rejected(dc(command(text)), config(run_command=RunCommandConfig(
        allow=allow)))


def test_run_command_users() -> None:
    cfg = config(run_command=RunCommandConfig(allow=("echo",), users=("pi",)))
    assert plan(dc(command("echo,x", runAsUser="pi")), cfg).steps[0].user == "pi"
    assert plan(dc(command("echo,x", runAsUser="agent")), cfg).steps[0].user is None
    assert plan(dc(command("echo,x", runAsUser="")), cfg).steps[0].user is None
    assert "runAsUser 'root' is not allowed for runCommand on this device: add it to " \
           "run_command.users" in rejected(dc(command("echo,x", runAsUser="root")), cfg)
    assert rejected(dc(command("echo,x", runAsUser="ghost")), cfg) == \
        "runAsUser 'ghost': no such user on this device"


def test_search_path_follows_handler_environment() -> None:
    host = FakeHost()
    cfg = config(run_command=RunCommandConfig(allow=("echo",)),
                 handler_environment={"PATH": "/stand-ins:/usr/bin"})
    plan(dc(command("echo,x")), cfg, host)
    plan(dc(command("echo,x")), config(run_command=RunCommandConfig(allow=("echo",))), host)
    assert host.searched == ["/stand-ins:/usr/bin", SAFE_PATH]


# ----------------------------------------------------------------------------- runHandler lookup


def test_yaml_handler_by_name_gets_its_settings_and_device_client_argv() -> None:
    step = plan(dc(handler("Up", "upgrade", ["v2"], runAsUser="pi"))).steps[0]
    assert step.argv == ("/usr/lib/x/upgrade.sh", "pi", "v2")
    assert (step.kind, step.user, step.handler) == ("handler", "pi", "upgrade")
    assert step.verify == ("/usr/lib/x/check.sh", "pi", "v2")


@pytest.mark.parametrize("name", ["../../bin/sh", "../reboot.sh", "a/b", "..", ".", "x" * 256])
def test_handler_names_must_be_plain_file_names(name: str) -> None:
    assert "must be a plain file name" in rejected(dc(handler(handler=name)))


@pytest.mark.parametrize("path", ["default", "", None])
def test_default_path_means_handler_dir(path: str | None) -> None:
    action = handler(input={"path": path}) if path is not None else {
        "name": "D", "type": "runHandler", "input": {"handler": "download-file.sh"}}
    assert plan(dc(action)).steps[0].argv[0] == f"{HANDLER_DIR}/download-file.sh"


def test_explicit_paths_only_from_handler_paths() -> None:
    doc = dc(handler(handler="custom.sh", input={"path": "/opt/dc/jobs/"}))
    assert rejected(doc) == ("path '/opt/dc/jobs/' is not one of this device's handler_paths: add "
                             "it to handler_paths in the agent's config to run handlers from "
                             "there")
    step = plan(doc, config(handler_paths=(Path("/opt/dc/jobs"),))).steps[0]
    assert step.argv == ("/opt/dc/jobs/custom.sh", "") and step.kind == "script"
    sneaky = dc(handler(handler="custom.sh", input={"path": "/opt/dc/jobs/../../../etc"}))
    assert "is not one of this device's handler_paths" in rejected(
        sneaky, config(handler_paths=(Path("/opt/dc/jobs"),)))
    assert "must be an absolute directory" in rejected(
        dc(handler(input={"path": "jobs"})), config(handler_paths=(Path("/opt/dc/jobs"),)))
    # handler_dir named explicitly is the same as "default"
    assert plan(dc(handler(input={"path": f"{HANDLER_DIR}/"}))).steps[0].kind == "script"


def test_unsafe_script_is_rejected_naming_the_problem() -> None:
    reason = rejected(dc(handler(handler="unsafe.sh")))
    assert "is writable by group or others" in reason and "nothing ran" in reason


def test_bare_name_from_path_only_if_allowed() -> None:
    echo = dc(handler("Echo", "echo", ["hi"], input={"path": ""}))
    reason = rejected(echo)
    assert "no handler for handler 'echo'" in reason and "run_command.allow" in reason
    step = plan(echo, config(run_command=RunCommandConfig(allow=("echo",)))).steps[0]
    assert step.argv == ("/usr/bin/echo", "", "hi") and step.kind == "program"
    assert not step.rerun
    assert "is allowed by run_command.allow but is not found on PATH" in rejected(
        dc(handler(handler="ghost")), config(run_command=RunCommandConfig(allow=("*",))))


def test_run_as_user_that_does_not_exist_is_rejected() -> None:
    assert rejected(dc(handler(runAsUser="nobody-at-all"))) == \
        "runAsUser 'nobody-at-all': no such user on this device"


# ----------------------------------------------------------------------------- size


def test_32_kb_document_and_100_steps() -> None:
    cfg = config(run_command=RunCommandConfig(allow=("echo",)))
    steps = [command(f"echo,{i}", name=f"s{i}") for i in range(MAX_STEPS - 1)]
    doc = dc(*steps, finalStep={"action": command("echo,done", name="final")})
    doc["_comment"] = "x" * (32 * 1024 - len(json.dumps(doc)) - 20)
    assert 31 * 1024 < len(json.dumps(doc)) <= 32 * 1024
    p = plan(doc, cfg)
    assert len(p.steps) == MAX_STEPS and p.steps[-1].name == "final"
    doc = dc(*steps, command("echo,one more"), finalStep={"action": command("echo,done")})
    assert rejected(doc, cfg) == "the document has 101 steps; at most 100 are allowed"


# ----------------------------------------------------------------------------- judging a step


def test_judge_by_exit_code_and_allowed_stderr() -> None:
    plain = Step("s", "script", ("/x",), 1.0)
    strict = Step("s", "script", ("/x",), 1.0, allow_stderr=2)
    assert judge(plain, "succeeded", "exit code 0", 50).ok  # no allowStdErr: exit code decides
    assert not judge(plain, "failed", "exit code 3", 0).ok
    assert judge(strict, "succeeded", "exit code 0", 2).ok
    verdict = judge(strict, "succeeded", "exit code 0", 3)
    assert not verdict.ok and verdict.reason == "3 lines on stderr; allowStdErr allows 2"
    # allowStdErr never turns a failure into a success (Device Client's defect)
    assert not judge(strict, "failed", "exit code 1", 0).ok
    assert not judge(strict, "timed_out", "timed out after 1s", 0).ok
    assert judge(Step("s", "script", ("/x",), 1.0, allow_stderr=0), "succeeded", "", 0).ok
