"""The ``iot`` control plane over plain HTTP: the part of ``boto3.client("iot")`` jobs need
(and, from :mod:`agent.sandbox.http_commands`, the AWS IoT Commands operations).

Jobs (create, describe, list, cancel, delete, get_job_document), job executions (describe, list
per thing and per job, cancel, delete), things (create, describe, list) and the AWS managed job
templates (list, describe, and create_job from one with documentParameters:
:mod:`agent.sandbox.templates`), on the same
:class:`JobsService` the MQTT front serves, always through :meth:`Emulator.call`: a job created
here reaches a device's ``notify-next`` like one created by a test.

Shapes follow botocore's ``iot`` model, not the service's internal dicts: targets are thing ARNs
(``arn:aws:iot:<region>:<account>:thing/<name>``), the document travels as a JSON string, times
are ``timestamp`` members (epoch seconds, which botocore turns into ``datetime``), an execution's
statusDetails sit under ``detailsMap``.

Decisions where the service and AWS differ or AWS is silent:

* Error names are the model's, per operation. A service code the operation's model does not list
  becomes ``InvalidRequestException`` with the code leading the message (cancelling a COMPLETED
  job: CancelJob has no InvalidStateTransitionException).
* DeleteJob without ``force`` of a job that is not COMPLETED or CANCELED is
  ``InvalidStateTransitionException`` as AWS documents it; the job is DELETION_IN_PROGRESS
  (``describe_job``, ``list_jobs``) for a few seconds before its id is free again.
* Only what a jobs sandbox needs is supported: SNAPSHOT jobs with an inline ``document`` or an
  AWS managed template's ``jobTemplateArn``, thing targets, ``timeoutConfig``; things with
  attributes but no types or billing groups (asking for one is ``ResourceNotFoundException``:
  the sandbox has none). Any other member is refused with
  ``InvalidRequestException`` naming it, never silently dropped.
* The document is stored as compact JSON (:class:`~agent.sandbox.document.Document`) and
  handed back so by ``get_job_document``: the whitespace of the string given to ``create_job``
  is not kept.
* A target ARN must carry the sandbox's region and account: a script that builds ARNs for a real
  account must not look as if it worked. ``describe_thing`` hands out the right ``thingArn``.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Final

from agent.sandbox import templates
from agent.sandbox.document import Document
from agent.sandbox.emulator import Emulator
from agent.sandbox.http import HttpFront, Request, Route, page, parse_int, query_bool
from agent.sandbox.http_commands import command_routes
from agent.sandbox.http_policies import POLICY_ERRORS, policy_routes
from agent.sandbox.policies import Policies
from agent.sandbox.service import JobsService, Publish, Rejection

__all__ = ["ACCOUNT_ID", "ERRORS", "REGION", "control_plane"]

REGION: Final = "us-east-1"
ACCOUNT_ID: Final = "123456789012"

ERRORS: Final = {
    "InvalidRequest": ("InvalidRequestException", 400),
    "ResourceNotFound": ("ResourceNotFoundException", 404),
    "ResourceAlreadyExists": ("ResourceAlreadyExistsException", 409),
    "VersionConflict": ("VersionConflictException", 409),
    "InvalidStateTransition": ("InvalidStateTransitionException", 409),
    "RequestThrottled": ("ThrottlingException", 400),  # sic: the iot model says 400
    "InternalError": ("ServiceUnavailableException", 503),
}
"""Service code -> (exception, status), from botocore's ``iot`` model."""

_EXECUTION_STATUSES: Final = frozenset({"QUEUED", "IN_PROGRESS", "SUCCEEDED", "FAILED",
                                        "TIMED_OUT", "REJECTED", "REMOVED", "CANCELED"})
_ATTRIBUTE_NAME: Final = re.compile(r"[a-zA-Z0-9_.,@/:#-]{1,128}")
_ATTRIBUTE_VALUE: Final = re.compile(r"[a-zA-Z0-9_.,@/:#=\[\]-]{0,800}")

_BASE = frozenset({"InvalidRequestException", "ResourceNotFoundException",
                   "ThrottlingException", "ServiceUnavailableException"})
_THING_ERRORS = _BASE | {"ResourceAlreadyExistsException"}
_TRANSITION = _BASE | {"InvalidStateTransitionException"}
_TEMPLATE_ERRORS = frozenset({"InvalidRequestException", "ResourceNotFoundException",
                              "ThrottlingException", "InternalServerException"})


def _invalid(message: str) -> Rejection:
    return Rejection("InvalidRequest", message)


def _thing_names(service: JobsService) -> list[str]:
    """Every registered thing (on the emulator thread, like every other call)."""
    return service.things()


def _thing_exists(service: JobsService, name: str) -> bool:
    try:
        service.executions_for_thing(name)
    except Rejection as rejection:
        if rejection.code == "ResourceNotFound":
            return False
        raise
    return True


@dataclass(frozen=True)
class _Thing:
    """Registry data the Jobs service does not keep; created on first sight of a thing and never
    changed, so a handler may read one it got back from ``Emulator.call``."""

    thing_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    attributes: dict[str, str] = field(default_factory=dict)
    version: int = 1


class _ControlPlane:
    """The handlers. ``_registry`` is only read and written inside ``Emulator.call``, i.e. on
    the emulator's thread, like the service itself."""

    def __init__(self, emulator: Emulator, region: str, account_id: str) -> None:
        self._emulator = emulator
        self._prefix = f"arn:aws:iot:{region}:{account_id}:"
        self._region = region
        self._registry: dict[str, _Thing] = {}

    # ------------------------------------------------------------------ helpers

    def _arn(self, kind: str, name: str) -> str:
        return f"{self._prefix}{kind}/{name}"

    def _target(self, arn: object) -> str:
        """The thing name of a target ARN of this sandbox's region and account."""
        if not isinstance(arn, str):
            raise _invalid("targets must be thing ARNs (strings)")
        if arn.startswith(self._prefix + "thing/"):
            return arn[len(self._prefix) + len("thing/"):]
        if arn.startswith(self._prefix + "thinggroup/"):
            raise _invalid(f"target {arn}: the sandbox has no thing groups; target things")
        raise _invalid(f"target {arn!r} is not a thing ARN of this sandbox "
                       f"({self._prefix}thing/<name>)")

    def _thing(self, service: JobsService, name: str) -> _Thing:
        if not _thing_exists(service, name):
            raise Rejection("ResourceNotFound", f"thing {name} does not exist")
        return self._registry.setdefault(name, _Thing())

    def _job_ref(self, job: dict[str, Any]) -> dict[str, Any]:
        """CreateJob's and CancelJob's answer."""
        out = {"jobArn": self._arn("job", job["jobId"]), "jobId": job["jobId"]}
        if job.get("description") is not None:
            out["description"] = job["description"]
        return out

    def _execution(self, record: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "jobId": record["jobId"],
            "status": record["status"],
            "statusDetails": {"detailsMap": record["statusDetails"]},
            "thingArn": self._arn("thing", record["thingName"]),
        }
        out.update(_execution_summary(record))  # status again, then the times and number
        out["versionNumber"] = record["versionNumber"]
        return out

    # ------------------------------------------------------------------ jobs

    def create_job(self, request: Request) -> dict[str, Any]:
        job_id, body = request.path["jobId"], request.body
        targets = body.get("targets")
        if not isinstance(targets, list) or not targets:
            raise _invalid("targets must be a non-empty list of thing ARNs")
        things = [self._target(arn) for arn in targets]
        if body.get("targetSelection", "SNAPSHOT") != "SNAPSHOT":
            raise _invalid("targetSelection: the sandbox runs SNAPSHOT jobs only")
        template = None
        if body.get("jobTemplateArn") is not None:
            if body.get("document") is not None:
                raise _invalid("give either document or jobTemplateArn, not both")
            managed = templates.from_arn(body["jobTemplateArn"], self._region)
            parameters = body.get("documentParameters") or {}
            document = managed.substitute(parameters)
            template = (body["jobTemplateArn"], dict(parameters), managed.document)
        elif body.get("documentParameters") is not None:
            raise _invalid("documentParameters can only be used with a jobTemplateArn naming an "
                           "AWS managed template")
        else:
            document = _document(body.get("document"))
        timeout = body.get("timeoutConfig")
        if timeout is not None and (not isinstance(timeout, dict)
                                    or set(timeout) - {"inProgressTimeoutInMinutes"}):
            raise _invalid("timeoutConfig takes inProgressTimeoutInMinutes only")
        minutes = (timeout or {}).get("inProgressTimeoutInMinutes")
        description = body.get("description")
        if description is None and template is not None:  # as AWS's CLI example shows
            description = templates.from_arn(template[0], self._region).description

        def create(s: JobsService) -> list[Publish]:
            return s.create_job(job_id, things, document, in_progress_timeout_minutes=minutes,
                                description=description, template=template)

        self._emulator.call(create)
        return self._job_ref({"jobId": job_id, "description": description})

    def describe_job(self, request: Request) -> dict[str, Any]:
        job_id = request.path["jobId"]
        query_bool(request, "beforeSubstitution")  # checked; nothing is ever substituted
        job = self._emulator.call(lambda s: s.describe_job(job_id))
        job.pop("document")
        job["targets"] = [self._arn("thing", t) for t in job["targets"]]
        return {"job": {"jobArn": self._arn("job", job_id), **job}}

    def list_jobs(self, request: Request) -> dict[str, Any]:
        status = request.query.get("status")
        selection = request.query.get("targetSelection")
        if status is not None and status not in (
                "IN_PROGRESS", "CANCELED", "COMPLETED", "DELETION_IN_PROGRESS", "SCHEDULED"):
            raise _invalid(f"status {status!r} is not a job status")
        if selection is not None and selection not in ("SNAPSHOT", "CONTINUOUS"):
            raise _invalid(f"targetSelection {selection!r} must be SNAPSHOT or CONTINUOUS")
        jobs = [
            {"jobArn": self._arn("job", job["jobId"]), **job}
            for job in self._emulator.call(lambda s: s.list_jobs())
            if status in (None, job["status"]) and selection in (None, job["targetSelection"])
        ]
        return page(jobs, request, "jobs")

    def cancel_job(self, request: Request) -> dict[str, Any]:
        job_id, body = request.path["jobId"], request.body
        force = bool(query_bool(request, "force"))

        def cancel(s: JobsService) -> tuple[dict[str, Any], list[Publish]]:
            publishes = s.cancel_job(job_id, force=force, comment=body.get("comment"),
                                     reason_code=body.get("reasonCode"))
            return self._job_ref(s.describe_job(job_id)), publishes

        return self._emulator.call(cancel)[0]

    def delete_job(self, request: Request) -> None:
        job_id = request.path["jobId"]
        force = bool(query_bool(request, "force"))

        self._emulator.call(lambda s: s.delete_job(job_id, force=force))

    def get_job_document(self, request: Request) -> dict[str, Any]:
        job_id = request.path["jobId"]
        before = bool(query_bool(request, "beforeSubstitution"))
        document = self._emulator.call(
            lambda s: s.get_job_document(job_id, before_substitution=before))
        return {"document": document.text}

    # ------------------------------------------------------------------ managed templates

    def list_managed_job_templates(self, request: Request) -> dict[str, Any]:
        name = request.query.get("templateName")
        return page(templates.summaries(self._region, name), request, "managedJobTemplates")

    def describe_managed_job_template(self, request: Request) -> dict[str, Any]:
        return templates.describe(self._region, request.path["templateName"],
                                  request.query.get("templateVersion"))

    # ------------------------------------------------------------------ job executions

    def describe_job_execution(self, request: Request) -> dict[str, Any]:
        job_id, thing = request.path["jobId"], request.path["thingName"]
        number = parse_int(request.query.get("executionNumber"), "executionNumber")
        record = self._emulator.call(lambda s: s.execution(job_id, thing, number))
        return {"execution": self._execution(record)}

    def list_for_thing(self, request: Request) -> dict[str, Any]:
        thing = request.path["thingName"]
        status = _status_filter(request)
        job_id = request.query.get("jobId")
        records = self._emulator.call(lambda s: s.executions_for_thing(thing))
        summaries = [{"jobId": r["jobId"], "jobExecutionSummary": _execution_summary(r)}
                     for r in records
                     if status in (None, r["status"]) and job_id in (None, r["jobId"])]
        return page(summaries, request, "executionSummaries")

    def list_for_job(self, request: Request) -> dict[str, Any]:
        job_id = request.path["jobId"]
        status = _status_filter(request)
        records = self._emulator.call(lambda s: s.executions_for_job(job_id))
        summaries = [{"thingArn": self._arn("thing", r["thingName"]),
                      "jobExecutionSummary": _execution_summary(r)}
                     for r in records if status in (None, r["status"])]
        return page(summaries, request, "executionSummaries")

    def cancel_job_execution(self, request: Request) -> None:
        job_id, thing, body = request.path["jobId"], request.path["thingName"], request.body
        force = bool(query_bool(request, "force"))
        self._emulator.call(lambda s: s.cancel_job_execution(
            job_id, thing, force=force, expected_version=body.get("expectedVersion"),
            status_details=body.get("statusDetails")))

    def delete_job_execution(self, request: Request) -> None:
        job_id, thing = request.path["jobId"], request.path["thingName"]
        number = parse_int(request.path["executionNumber"], "executionNumber")
        assert number is not None  # a path label is never absent
        force = bool(query_bool(request, "force"))
        self._emulator.call(lambda s: s.delete_job_execution(job_id, thing, number, force=force))

    # ------------------------------------------------------------------ things

    def create_thing(self, request: Request) -> dict[str, Any]:
        name, body = request.path["thingName"], request.body
        for member, kind in (("thingTypeName", "thing type"), ("billingGroupName",
                                                               "billing group")):
            if member in body:
                raise Rejection("ResourceNotFound", f"{kind} {body[member]!r} does not exist "
                                                    f"(the sandbox has no {kind}s)")
        attributes = _attributes(body.get("attributePayload"))

        def create(s: JobsService) -> str:
            existed = _thing_exists(s, name)
            s.create_thing(name)
            thing = self._registry.setdefault(name, _Thing() if existed
                                              else _Thing(attributes=attributes))
            if existed and thing.attributes != attributes:
                raise Rejection("ResourceAlreadyExists",
                                f"thing {name} already exists with different attributes")
            return thing.thing_id

        thing_id = self._emulator.call(create)
        return {"thingName": name, "thingArn": self._arn("thing", name), "thingId": thing_id}

    def describe_thing(self, request: Request) -> dict[str, Any]:
        name = request.path["thingName"]
        thing = self._emulator.call(lambda s: self._thing(s, name))
        return {"defaultClientId": name, "thingName": name, "thingId": thing.thing_id,
                "thingArn": self._arn("thing", name), "attributes": dict(thing.attributes),
                "version": thing.version}

    def list_things(self, request: Request) -> dict[str, Any]:
        key, value = request.query.get("attributeName"), request.query.get("attributeValue")
        prefix = bool(query_bool(request, "usePrefixAttributeValue"))
        if request.query.get("thingTypeName") is not None:
            return {"things": []}  # the sandbox has no thing types

        def listing(s: JobsService) -> list[tuple[str, _Thing]]:
            return [(name, self._thing(s, name)) for name in _thing_names(s)]

        def wanted(thing: _Thing) -> bool:
            if key is None:
                return True
            have = thing.attributes.get(key)
            return have is not None and (value is None or have == value
                                         or (prefix and have.startswith(value)))

        things = [{"thingName": name, "thingArn": self._arn("thing", name),
                   "attributes": dict(thing.attributes), "version": thing.version}
                  for name, thing in self._emulator.call(listing) if wanted(thing)]
        return page(things, request, "things")


def _execution_summary(record: dict[str, Any]) -> dict[str, Any]:
    out = {"status": record["status"], "queuedAt": record["queuedAt"]}
    if "startedAt" in record:
        out["startedAt"] = record["startedAt"]
    out.update(lastUpdatedAt=record["lastUpdatedAt"], executionNumber=record["executionNumber"])
    return out


def _status_filter(request: Request) -> str | None:
    status = request.query.get("status")
    if status is not None and status not in _EXECUTION_STATUSES:
        raise _invalid(f"status {status!r} is not a job execution status")
    return status


def _document(text: object) -> Document:
    """CreateJob's ``document``: a JSON object as a string (documentSource is not supported)."""
    if text is None:
        raise _invalid("document is required: the sandbox does not fetch documentSource")
    return Document.from_text(text)


def _attributes(payload: object) -> dict[str, str]:
    """CreateThing's ``attributePayload.attributes``, checked against the model's patterns."""
    if payload is None:
        return {}
    if not isinstance(payload, dict) or set(payload) - {"attributes", "merge"}:
        raise _invalid("attributePayload takes attributes (and merge)")
    attributes = payload.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise _invalid("attributePayload.attributes must be a map of strings")
    for key, value in attributes.items():
        if not isinstance(key, str) or not _ATTRIBUTE_NAME.fullmatch(key):
            raise _invalid(f"attribute name {key!r} must be 1-128 of [a-zA-Z0-9_.,@/:#-]")
        if not isinstance(value, str) or not _ATTRIBUTE_VALUE.fullmatch(value):
            raise _invalid(f"attribute {key!r}: value must be 0-800 of [a-zA-Z0-9_.,@/:#=[]-]")
    return dict(attributes)


def control_plane(emulator: Emulator, *, region: str = REGION, account_id: str = ACCOUNT_ID,
                  policies: Policies | None = None) -> HttpFront:
    """The control plane's routes over ``emulator``'s service; start it with ``.start(port)``.

    With ``policies``, also the policy and certificate operations (:mod:`.http_policies`)."""
    api = _ControlPlane(emulator, region, account_id)
    q = frozenset
    force = q({"force"})
    list_query = q({"maxResults", "nextToken"})
    routes = [
        Route("PUT", "/jobs/{jobId}", api.create_job, errors=_BASE | {
            "ResourceAlreadyExistsException"}, body=q({
                "targets", "document", "description", "timeoutConfig", "targetSelection",
                "jobTemplateArn", "documentParameters"})),
        Route("GET", "/managed-job-templates", api.list_managed_job_templates,
              errors=_TEMPLATE_ERRORS, query=list_query | {"templateName"}),
        Route("GET", "/managed-job-templates/{templateName}", api.describe_managed_job_template,
              errors=_TEMPLATE_ERRORS, query=q({"templateVersion"})),
        Route("GET", "/jobs", api.list_jobs, errors=_BASE,
              query=list_query | {"status", "targetSelection"}),
        Route("GET", "/jobs/{jobId}", api.describe_job, errors=_BASE,
              query=q({"beforeSubstitution"})),
        Route("PUT", "/jobs/{jobId}/cancel", api.cancel_job, errors=_BASE, query=force,
              body=q({"reasonCode", "comment"})),
        Route("DELETE", "/jobs/{jobId}", api.delete_job, errors=_TRANSITION, query=force),
        Route("GET", "/jobs/{jobId}/job-document", api.get_job_document, errors=_BASE,
              query=q({"beforeSubstitution"})),
        Route("GET", "/jobs/{jobId}/things", api.list_for_job, errors=_BASE,
              query=list_query | {"status"}),
        Route("GET", "/things/{thingName}/jobs/{jobId}", api.describe_job_execution,
              errors=_BASE, query=q({"executionNumber"})),
        Route("GET", "/things/{thingName}/jobs", api.list_for_thing, errors=_BASE,
              query=list_query | {"status", "jobId"}),
        Route("PUT", "/things/{thingName}/jobs/{jobId}/cancel", api.cancel_job_execution,
              errors=_TRANSITION | {"VersionConflictException"}, query=force,
              body=q({"expectedVersion", "statusDetails"})),
        Route("DELETE", "/things/{thingName}/jobs/{jobId}/executionNumber/{executionNumber}",
              api.delete_job_execution, errors=_TRANSITION, query=force),
        Route("POST", "/things/{thingName}", api.create_thing, errors=_THING_ERRORS,
              body=q({"thingTypeName", "attributePayload", "billingGroupName"})),
        Route("GET", "/things/{thingName}", api.describe_thing, errors=_BASE),
        Route("GET", "/things", api.list_things, errors=_BASE, query=list_query | {
            "attributeName", "attributeValue", "usePrefixAttributeValue", "thingTypeName"}),
        *command_routes(emulator, region, account_id),
    ]
    if policies is not None:
        routes += policy_routes(policies, lambda name: emulator.call(
            lambda s: _thing_exists(s, name)))
    return HttpFront("iot", routes, ERRORS | POLICY_ERRORS,
                     internal=("InternalFailureException", 500))
