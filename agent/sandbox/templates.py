"""The AWS managed job templates, as the sandbox's control plane serves them. No I/O.

``list_managed_job_templates``, ``describe_managed_job_template`` and ``create_job(
jobTemplateArn="arn:aws:iot:<region>::jobtemplate/AWS-<Name>:1.0", documentParameters={...})``.

Sources, as exactly as they are published: the eight job documents are the AWS IoT developer
guide's ("Managed template remote actions and job documents"), kept as AWS serves them (compact
JSON, the same key order). The guide publishes ``describe-managed-job-template`` output for
AWS-Download-File only; its four parameter definitions are copied from it, and runAsUser and
pathToHandler are the same in every template (the guide says so). The definitions of
``packages``, ``services`` and ``command`` are reconstructed in the same form from the guide's
descriptions of those parameters; so are the list descriptions of AWS-Install-Application,
AWS-Start-Application and AWS-Run-Command, which the guide does not print.

Substitution follows the guide: every ``${aws:iot:parameter:NAME}`` in the document becomes the
value given for NAME. Decisions where AWS is silent: a required parameter that is missing, a
parameter the template does not have, and a value that does not match the parameter's ``regex``
are each an ``InvalidRequestException`` naming it; an optional parameter that is omitted becomes
an empty string (what Device Client then reads as "unset"). Values are put into the parsed
document's strings, so a quote or a backslash in a value can never change the document's shape.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Any, Final

from agent.sandbox._validate import Rejection

__all__ = ["TEMPLATES", "VERSION", "Template", "describe", "from_arn", "summaries"]

VERSION: Final = "1.0"
ENVIRONMENTS: Final = ("LINUX",)
_PLACEHOLDER: Final = re.compile(r"\$\{aws:iot:parameter:([a-zA-Z0-9_-]+)\}")
_ARN: Final = re.compile(r"arn:aws:iot:([a-z0-9-]+)::jobtemplate/([A-Za-z0-9_-]+):([0-9.]+)")

_RUN_AS_USER: Final = {
    "key": "runAsUser",
    "description": "Execute handler as another user. If not specified, then handler is executed "
                   "as the same user as device client.",
    "regex": "(.){0,256}", "example": "user1", "optional": True}
_PATH_TO_HANDLER: Final = {
    "key": "pathToHandler",
    "description": "Path to handler on the device. If not specified, then device client will use "
                   "the current working directory.",
    "regex": "(.){0,4096}", "example": "/path/to/handler/script", "optional": True}


def _required(key: str, description: str, example: str) -> dict[str, Any]:
    return {"key": key, "description": description, "regex": "(.*?)", "example": example,
            "optional": False}


@dataclass(frozen=True)
class Template:
    name: str
    description: str
    parameters: tuple[dict[str, Any], ...]
    document: dict[str, Any]

    def arn(self, region: str) -> str:
        return f"arn:aws:iot:{region}::jobtemplate/{self.name}:{VERSION}"

    def substitute(self, given: object) -> dict[str, Any]:
        """The job document for ``documentParameters`` ``given`` (see the module docstring)."""
        if given is None:
            given = {}
        if not isinstance(given, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in given.items()):
            raise Rejection("InvalidRequest", "documentParameters must map names to strings")
        known = {p["key"]: p for p in self.parameters}
        for key, value in given.items():
            if key not in known:
                raise Rejection("InvalidRequest", f"documentParameters: {self.name} has no "
                                f"parameter {key!r} (it has {', '.join(known)})")
            if not value or re.fullmatch(known[key]["regex"], value) is None:
                raise Rejection("InvalidRequest", f"documentParameters: the value of {key} "
                                f"does not match {known[key]['regex']}")
        for parameter in self.parameters:
            if not parameter["optional"] and parameter["key"] not in given:
                raise Rejection("InvalidRequest", f"documentParameters: {self.name} needs the "
                                f"parameter {parameter['key']} ({parameter['description']})")
        return _replace(copy.deepcopy(self.document), given)


def _replace(value: Any, given: dict[str, str]) -> Any:
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: given.get(m.group(1), ""), value)
    if isinstance(value, list):
        return [_replace(item, given) for item in value]
    if isinstance(value, dict):
        return {key: _replace(item, given) for key, item in value.items()}
    return value


def _handler(name: str, handler: str, *args: str) -> dict[str, Any]:
    """A template's document: one runHandler step, the optional path and runAsUser."""
    given: dict[str, Any] = {"handler": handler}
    if args:
        given["args"] = [f"${{aws:iot:parameter:{a}}}" for a in args]
    given["path"] = "${aws:iot:parameter:pathToHandler}"
    return {"version": "1.0", "steps": [{"action": {
        "name": name, "type": "runHandler", "input": given,
        "runAsUser": "${aws:iot:parameter:runAsUser}"}}]}


def _template(name: str, description: str, action: str, handler: str,
              *required: tuple[str, str, str]) -> Template:
    return Template(f"AWS-{name}", description,
                    (*(_required(*r) for r in required), _RUN_AS_USER, _PATH_TO_HANDLER),
                    _handler(action, handler, *(r[0] for r in required)))


def _packages(verb: str) -> tuple[str, str, str]:
    return ("packages", f"Space separated list of packages to {verb}.", "package1 package2")


def _services(verb: str) -> tuple[str, str, str]:
    return ("services", f"Space separated list of services to {verb}.", "service1 service2")


TEMPLATES: Final = {t.name: t for t in (
    _template("Download-File", "A managed job template for downloading a file.",
              "Download-File", "download-file.sh",
              ("downloadUrl", "URL of file to download.", "http://www.example.com/index.html"),
              ("filePath", "Path on the device where downloaded file is written.",
               "/path/to/file")),
    _template("Install-Application", "A managed job template for installing one or more "
              "applications.", "Install-Application", "install-packages.sh",
              _packages("install")),
    _template("Remove-Application", "A managed job template for uninstalling one or more "
              "applications.", "Remove-Application", "remove-packages.sh", _packages("remove")),
    _template("Start-Application", "A managed job template for starting one or more system "
              "services.", "Start-Application", "start-services.sh", _services("start")),
    _template("Stop-Application", "A managed job template for stopping one or more system "
              "services.", "Stop-Application", "stop-services.sh", _services("stop")),
    _template("Restart-Application", "A managed job template for restarting one or more system "
              "services.", "Restart-Application", "restart-services.sh", _services("restart")),
    _template("Reboot", "A managed job template for rebooting the device.", "Reboot",
              "reboot.sh"),
    Template("AWS-Run-Command", "A managed job template for running a shell command.", (
        _required("command", "A comma separated string of command. Any comma contained in the "
                  "command itself must be escaped.", "ls,-l,/tmp"), _RUN_AS_USER),
        {"version": "1.0", "steps": [{"action": {
            "name": "Run-Command", "type": "runCommand",
            "input": {"command": "${aws:iot:parameter:command}"},
            "runAsUser": "${aws:iot:parameter:runAsUser}"}}]}),
)}
"""The eight managed templates by name."""


def summaries(region: str, name: str | None = None) -> list[dict[str, Any]]:
    """ListManagedJobTemplates' ``managedJobTemplates``, by name; one name if given."""
    return [{"templateArn": t.arn(region), "templateName": t.name, "description": t.description,
             "environments": list(ENVIRONMENTS), "templateVersion": VERSION}
            for t in sorted(TEMPLATES.values(), key=lambda t: t.name)
            if name in (None, t.name)]


def describe(region: str, name: str, version: str | None = None) -> dict[str, Any]:
    """DescribeManagedJobTemplate's answer."""
    if version is not None and not re.match(r"^[1-9]+.[0-9]+", version):
        raise Rejection("InvalidRequest", f"templateVersion {version!r} is not a version like 1.0")
    template = TEMPLATES.get(name)
    if template is None or version not in (None, VERSION):
        what = name if version is None else f"{name} version {version}"
        raise Rejection("ResourceNotFound", f"managed job template {what} does not exist")
    return {"templateName": template.name, "templateArn": template.arn(region),
            "description": template.description, "templateVersion": VERSION,
            "environments": list(ENVIRONMENTS),
            "documentParameters": [dict(p) for p in template.parameters],
            "document": json.dumps(template.document, separators=(",", ":"))}


def from_arn(arn: object, region: str) -> Template:
    """The managed template a CreateJob ``jobTemplateArn`` names."""
    if not isinstance(arn, str):
        raise Rejection("InvalidRequest", "jobTemplateArn must be a string")
    match = _ARN.fullmatch(arn)
    if match is None:
        raise Rejection("ResourceNotFound", f"job template {arn} does not exist: the sandbox has "
                        f"AWS managed templates only (arn:aws:iot:{region}::jobtemplate/"
                        f"AWS-<Name>:{VERSION})")
    arn_region, name, version = match.groups()
    template = TEMPLATES.get(name)
    if arn_region != region or template is None or version != VERSION:
        raise Rejection("ResourceNotFound", f"managed job template {arn} does not exist in "
                        f"{region}")
    return template
