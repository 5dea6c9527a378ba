"""The ``iot`` control plane's policy operations, for :func:`.http_control.control_plane`.

``create_policy``, ``get_policy``, ``list_policies``, ``delete_policy``, ``attach_policy``,
``detach_policy``, ``list_attached_policies``, ``list_targets_for_policy``,
``list_thing_principals`` and ``describe_certificate``, on the stack's
:class:`~agent.sandbox.policies.Policies`: an attach or detach reaches the broker before the
HTTP answer goes out, so the next MQTT packet of that device is already judged by it.

These operations page with ``marker``/``pageSize``/``nextMarker`` (ListThingPrincipals with
``nextToken``/``maxResults``), as their models say; the marker is the offset as text, opaque to
boto3's paginators.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

from agent.sandbox.http import Request, Route, page, query_bool
from agent.sandbox.policies import Policies, PolicyStore
from agent.sandbox.service import Rejection

__all__ = ["POLICY_ERRORS", "policy_routes"]

POLICY_ERRORS: Final = {
    "MalformedPolicy": ("MalformedPolicyException", 400),
    "DeleteConflict": ("DeleteConflictException", 409),
    "LimitExceeded": ("LimitExceededException", 410),
}
"""Service code -> (exception, status) for the policy operations, from botocore's ``iot``."""

_COMMON: Final = frozenset({"InvalidRequestException", "ThrottlingException",
                            "UnauthorizedException", "ServiceUnavailableException",
                            "InternalFailureException"})
_FOUND: Final = _COMMON | {"ResourceNotFoundException"}


def _marker_page(items: list[Any], request: Request, key: str) -> dict[str, Any]:
    return page(items, request, key, token="marker", size="pageSize", next_token="nextMarker")


class _PolicyApi:
    def __init__(self, policies: Policies, clock: Callable[[], float]) -> None:
        self._policies = policies
        self._clock = clock

    def _read(self, fn: Callable[[PolicyStore], Any]) -> Any:
        return self._policies.call(fn)

    def create_policy(self, request: Request) -> dict[str, Any]:
        name, body = request.path["policyName"], request.body
        if body.get("tags"):
            raise Rejection("InvalidRequest", "tags are not supported by the sandbox")
        now = int(self._clock())
        return self._read(lambda s: s.create_policy(name, body.get("policyDocument"), now))

    def get_policy(self, request: Request) -> dict[str, Any]:
        name = request.path["policyName"]
        return self._read(lambda s: s.get_policy(name))

    def list_policies(self, request: Request) -> dict[str, Any]:
        ascending = query_bool(request, "isAscendingOrder")
        items = self._read(lambda s: s.list_policies(ascending=ascending is not False))
        return _marker_page(items, request, "policies")

    def delete_policy(self, request: Request) -> None:
        name = request.path["policyName"]
        self._policies.change(lambda s: s.delete_policy(name))

    def attach_policy(self, request: Request) -> None:
        name, target = request.path["policyName"], request.body.get("target")
        self._policies.change(lambda s: s.attach_policy(name, target))

    def detach_policy(self, request: Request) -> None:
        name, target = request.path["policyName"], request.body.get("target")
        self._policies.change(lambda s: s.detach_policy(name, target))

    def list_attached_policies(self, request: Request) -> dict[str, Any]:
        target = request.path["target"]
        query_bool(request, "recursive")  # checked; a certificate has nothing to recurse into
        items = self._read(lambda s: s.attached_policies(target))
        return _marker_page(items, request, "policies")

    def list_targets_for_policy(self, request: Request) -> dict[str, Any]:
        name = request.path["policyName"]
        return _marker_page(self._read(lambda s: s.targets_for_policy(name)), request, "targets")

    def list_thing_principals(self, request: Request, exists: Callable[[str], bool]
                              ) -> dict[str, Any]:
        thing = request.path["thingName"]
        if not exists(thing):
            raise Rejection("ResourceNotFound", f"thing {thing} does not exist")
        return page(self._read(lambda s: s.thing_principals(thing)), request, "principals")

    def describe_certificate(self, request: Request) -> dict[str, Any]:
        certificate_id = request.path["certificateId"]
        return {"certificateDescription": self._read(
            lambda s: s.describe_certificate(certificate_id))}


def policy_routes(policies: Policies, thing_exists: Callable[[str], bool], *,
                  clock: Callable[[], float] = time.time) -> list[Route]:
    """The routes; ``thing_exists`` answers whether the Jobs service knows a thing."""
    api = _PolicyApi(policies, clock)
    q = frozenset
    markers = q({"marker", "pageSize"})
    return [
        Route("POST", "/policies/{policyName}", api.create_policy, body=q({
            "policyDocument", "tags"}), errors=_COMMON | {"ResourceAlreadyExistsException",
                                                         "MalformedPolicyException"}),
        Route("GET", "/policies/{policyName}", api.get_policy, errors=_FOUND),
        Route("GET", "/policies", api.list_policies, query=markers | {"isAscendingOrder"},
              errors=_COMMON),
        Route("DELETE", "/policies/{policyName}", api.delete_policy,
              errors=_FOUND | {"DeleteConflictException"}),
        Route("PUT", "/target-policies/{policyName}", api.attach_policy, body=q({"target"}),
              errors=_FOUND | {"LimitExceededException"}),
        Route("POST", "/target-policies/{policyName}", api.detach_policy, body=q({"target"}),
              errors=_COMMON | {"LimitExceededException"}),
        Route("POST", "/attached-policies/{target}", api.list_attached_policies,
              query=markers | {"recursive"}, errors=_FOUND | {"LimitExceededException"}),
        Route("POST", "/policy-targets/{policyName}", api.list_targets_for_policy,
              query=markers, errors=_FOUND | {"LimitExceededException"}),
        Route("GET", "/things/{thingName}/principals",
              lambda request: api.list_thing_principals(request, thing_exists),
              query=q({"nextToken", "maxResults"}), errors=_FOUND),
        Route("GET", "/certificates/{certificateId}", api.describe_certificate, errors=_FOUND),
    ]
