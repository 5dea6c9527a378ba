"""The sandbox's AWS IoT policies, certificates and attachments, and how they reach the broker.

:class:`PolicyStore` is plain state with AWS's rules and no I/O: named policy documents
(:mod:`agent.sandbox.iot_policy` checks them), the certificates the sandbox issued (id = SHA-256
of the DER certificate, as AWS computes it; CN = the identity the broker knows), which thing each
certificate is attached to, and which policies are attached to which certificate. Policies
attach to *certificates*, as in AWS (``attach_policy(policyName=..., target=certificateArn)``);
a thing's certificates are found with ``list_thing_principals``.

:class:`Policies` serialises every call (HTTP threads, the stack) with a lock and, after each
change, hands the new :class:`~agent.sandbox.iot_policy.Grants` of every identity it touched to
``push`` (the broker), in the order the changes happened.

Decisions where AWS is silent (also in ``docs/fidelity.md``): detaching a policy that is not
attached succeeds; attaching one twice is a no-op; the sandbox keeps one version ("1") per
policy (no create_policy_version).
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from agent.sandbox._validate import Rejection
from agent.sandbox.iot_policy import Grants, Policy, grants, parse_policy

__all__ = ["MAX_POLICIES_PER_TARGET", "Certificate", "Policies", "PolicyStore"]

MAX_POLICIES_PER_TARGET: Final = 10
"""AWS IoT's quota: policies attached to one certificate."""

_POLICY_NAME: Final = re.compile(r"[\w+=,.@-]{1,128}")
_CERT_ID: Final = re.compile(r"[a-f0-9]{64}")

T = TypeVar("T")


@dataclass
class _Policy:
    name: str
    document: str
    parsed: Policy
    created: int
    generation: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class Certificate:
    """A certificate the sandbox issued: ``identity`` is its CN, the broker's user name."""

    certificate_id: str
    identity: str
    pem: str
    created: int


class PolicyStore:
    """Policies, certificates and attachments of one sandbox account. Not thread-safe.

    Mutations return the identities (certificate CNs) whose grants may have changed.
    """

    def __init__(self, *, region: str, account_id: str) -> None:
        self.region = region
        self.account_id = account_id
        self._prefix = f"arn:aws:iot:{region}:{account_id}:"
        self._policies: dict[str, _Policy] = {}
        self._certificates: dict[str, Certificate] = {}
        self._thing_of: dict[str, str] = {}  # certificate id -> thing
        self._attached: dict[str, list[str]] = {}  # certificate id -> policy names, in order

    # ------------------------------------------------------------------ ARNs

    def policy_arn(self, name: str) -> str:
        return f"{self._prefix}policy/{name}"

    def certificate_arn(self, certificate_id: str) -> str:
        return f"{self._prefix}cert/{certificate_id}"

    # ------------------------------------------------------------------ policies

    def create_policy(self, name: str, document: object, now: int) -> dict[str, Any]:
        """CreatePolicy's answer. ``ResourceAlreadyExists`` for a name in use."""
        _check_name(name)
        parsed = parse_policy(document, region=self.region, account=self.account_id)
        if name in self._policies:
            raise Rejection("ResourceAlreadyExists", f"policy {name} already exists")
        assert isinstance(document, str)  # parse_policy refused anything else
        self._policies[name] = _Policy(name, document, parsed, now)
        return {"policyName": name, "policyArn": self.policy_arn(name),
                "policyDocument": document, "policyVersionId": "1"}

    def get_policy(self, name: str) -> dict[str, Any]:
        policy = self._policy(name)
        return {"policyName": name, "policyArn": self.policy_arn(name),
                "policyDocument": policy.document, "defaultVersionId": "1",
                "creationDate": policy.created, "lastModifiedDate": policy.created,
                "generationId": policy.generation}

    def list_policies(self, *, ascending: bool = True) -> list[dict[str, str]]:
        names = sorted(self._policies, reverse=not ascending)
        return [{"policyName": n, "policyArn": self.policy_arn(n)} for n in names]

    def delete_policy(self, name: str) -> set[str]:
        """``DeleteConflict`` while it is attached to anything, as in AWS."""
        self._policy(name)
        targets = self.targets_for_policy(name)
        if targets:
            raise Rejection("DeleteConflict", f"policy {name} is attached to {len(targets)} "
                                              f"target(s), e.g. {targets[0]}; detach it first")
        del self._policies[name]
        return set()

    # ------------------------------------------------------------------ certificates

    def add_certificate(self, certificate: Certificate) -> str:
        """Register a certificate the sandbox issued; returns its ARN (idempotent)."""
        if not _CERT_ID.fullmatch(certificate.certificate_id):
            raise ValueError(f"not a certificate id: {certificate.certificate_id!r}")
        self._certificates.setdefault(certificate.certificate_id, certificate)
        self._attached.setdefault(certificate.certificate_id, [])
        return self.certificate_arn(certificate.certificate_id)

    def attach_thing_principal(self, thing: str, certificate_id: str) -> set[str]:
        """Attach a certificate to a thing (exclusively: one thing per certificate)."""
        certificate = self._certificate_by_id(certificate_id)
        self._thing_of[certificate_id] = thing
        return {certificate.identity}

    def thing_principals(self, thing: str) -> list[str]:
        return [self.certificate_arn(c) for c, t in sorted(self._thing_of.items()) if t == thing]

    def describe_certificate(self, certificate_id: str) -> dict[str, Any]:
        certificate = self._certificate_by_id(certificate_id)
        return {"certificateArn": self.certificate_arn(certificate_id),
                "certificateId": certificate_id, "status": "ACTIVE",
                "certificatePem": certificate.pem, "ownedBy": self.account_id,
                "creationDate": certificate.created, "lastModifiedDate": certificate.created,
                "customerVersion": 1, "generationId": certificate_id[:32],
                "certificateMode": "DEFAULT"}

    # ------------------------------------------------------------------ attachments

    def attach_policy(self, name: str, target: object) -> set[str]:
        self._policy(name)
        certificate = self._target(target)
        attached = self._attached[certificate.certificate_id]
        if name not in attached:
            if len(attached) >= MAX_POLICIES_PER_TARGET:
                raise Rejection("LimitExceeded", f"{target} already has "
                                                 f"{MAX_POLICIES_PER_TARGET} policies attached")
            attached.append(name)
        return {certificate.identity}

    def detach_policy(self, name: str, target: object) -> set[str]:
        if name not in self._policies:
            # DetachPolicy's model has no ResourceNotFoundException.
            raise Rejection("InvalidRequest", f"policy {name} does not exist")
        certificate = self._target(target)
        attached = self._attached[certificate.certificate_id]
        if name in attached:
            attached.remove(name)
        return {certificate.identity}

    def attached_policies(self, target: object) -> list[dict[str, str]]:
        certificate = self._target(target)
        return [{"policyName": n, "policyArn": self.policy_arn(n)}
                for n in self._attached[certificate.certificate_id]]

    def targets_for_policy(self, name: str) -> list[str]:
        self._policy(name)
        return [self.certificate_arn(c) for c, names in sorted(self._attached.items())
                if name in names]

    # ------------------------------------------------------------------ enforcement

    def grants(self, identity: str) -> Grants:
        """What the broker must let ``identity`` (a certificate CN) do: the union of its
        certificates' policies, evaluated for the thing each is attached to."""
        policies: list[Policy] = []
        thing: str | None = None
        for certificate_id, certificate in sorted(self._certificates.items()):
            if certificate.identity != identity:
                continue
            thing = self._thing_of.get(certificate_id, thing)
            policies += [self._policies[n].parsed for n in self._attached[certificate_id]]
        return grants(policies, thing=thing, client_id=identity)

    # ------------------------------------------------------------------ internals

    def _policy(self, name: str) -> _Policy:
        _check_name(name)
        policy = self._policies.get(name)
        if policy is None:
            raise Rejection("ResourceNotFound", f"policy {name} does not exist")
        return policy

    def _certificate_by_id(self, certificate_id: str) -> Certificate:
        certificate = self._certificates.get(certificate_id)
        if certificate is None:
            raise Rejection("ResourceNotFound", f"certificate {certificate_id} does not exist")
        return certificate

    def _target(self, target: object) -> Certificate:
        """A target ARN: a certificate of this sandbox (the only principal it has)."""
        if not isinstance(target, str) or not target:
            raise Rejection("InvalidRequest", "target must be a certificate ARN")
        if target.startswith(self._prefix + "cert/"):
            return self._certificate_by_id(target[len(self._prefix) + len("cert/"):])
        if target.startswith(self._prefix + "thing/"):
            raise Rejection("InvalidRequest", f"target {target} is a thing: policies attach to "
                                              "its certificate (list_thing_principals)")
        raise Rejection("InvalidRequest", f"target {target!r} is not a certificate ARN of this "
                                          f"sandbox ({self._prefix}cert/<certificateId>)")


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not _POLICY_NAME.fullmatch(name):
        raise Rejection("InvalidRequest", f"policyName {name!r} must be 1-128 characters of "
                                          "[a-zA-Z0-9_+=,.@-]")


class Policies:
    """A :class:`PolicyStore` behind a lock, keeping the broker in step with it.

    ``push(identity, grants)`` is called (under the lock, so in order) for every identity whose
    grants changed since its last push.
    """

    def __init__(self, store: PolicyStore, push: Callable[[str, Grants], None]) -> None:
        self.store = store
        self._push = push
        self._lock = threading.Lock()
        self._pushed: dict[str, Grants] = {}

    def call(self, fn: Callable[[PolicyStore], T]) -> T:
        """Run ``fn`` under the lock: a read, or a change no identity's grants depend on."""
        with self._lock:
            return fn(self.store)

    def change(self, fn: Callable[[PolicyStore], set[str]]) -> None:
        """Run a mutation that returns the identities it touched, and push what changed for
        them before returning."""
        with self._lock:
            for identity in sorted(fn(self.store)):
                new = self.store.grants(identity)
                if self._pushed.get(identity) != new:
                    self._push(identity, new)
                    self._pushed[identity] = new
