"""AWS IoT policy documents: the subset the sandbox enforces, checked, and translated into
Mosquitto dynamic-security ACLs for one device. Pure: no I/O.

Supported (anything else is refused by name, never dropped; see :func:`parse_policy`):

* ``Version`` ``2012-10-17``; ``Statement``: one object or a list; ``Sid``; ``Effect``
  ``Allow``/``Deny``; ``Action``/``Resource``: a string or a list of strings.
* Actions ``iot:Connect``, ``iot:Publish``, ``iot:Subscribe``, ``iot:Receive`` and ``iot:*``.
* Resources ``*``; ``arn:aws:iot:<region>:<account>:topic/<topic>`` (Publish, Receive),
  ``...:topicfilter/<filter>`` (Subscribe), ``...:client/<client id>`` (Connect), where region
  and account are the sandbox's or ``*``. An action only ever matches its own resource type.
* ``*`` as any characters (including ``/``); ``${iot:Connection.Thing.ThingName}`` anywhere, and
  ``${iot:ClientId}`` as a whole client resource.

Evaluation is AWS's: an explicit Deny wins, then any Allow, else denied. The broker's ACLs are
MQTT patterns, which cannot say everything an AWS pattern says. Where they differ (each one also
listed in ``docs/fidelity.md``):

1. A ``*`` that is a whole topic level in the middle (``jobs/*/update``) becomes ``+``: it stands
   for exactly one level in the sandbox, for any number of levels in AWS (``jobs/a/b/update``
   matches in AWS only). Allow and Deny are both narrower than in AWS.
2. A ``*`` that is the whole last level (``jobs/*``) becomes ``#``, which also matches the parent
   topic itself (``jobs``); AWS's does not (it needs the ``/``).
3. A ``*`` that is part of a level (``sensor*``, ``*-cmd``) cannot be expressed at all: refused.
4. A ``*`` first level also stands for ``$aws`` (MQTT's wildcards never match a leading ``$``,
   AWS's ``*`` does), so ``topic/*`` reaches the reserved topics as in AWS. Other ``$`` topics
   (the broker's own ``$SYS``, ``$CONTROL``) are never granted.
5. In a ``topicfilter`` ARN, ``+`` and ``#`` are literal characters, as in AWS: without ``*``
   the filter must be subscribed exactly as written; combined with ``*`` they would act as
   wildcards in the broker, so that combination is refused. In a ``topic`` ARN they match
   nothing (no topic contains them), as in AWS.
6. ``iot:Connect`` cannot be checked by the broker at CONNECT time (Mosquitto asks no plugin
   about a certificate identity). It is evaluated for client id = thing name (the sandbox's
   convention): a device whose policies do not allow that gets no ACL at all, so it connects
   but every subscribe and publish is refused and nothing is delivered to it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from agent.sandbox._validate import Rejection
from agent.sandbox.dynsec import Acl

__all__ = [
    "ACTIONS",
    "COMMANDS_POLICY",
    "DEFAULT_POLICIES",
    "JOBS_POLICY",
    "THING_NAME",
    "Grants",
    "Policy",
    "Resource",
    "Statement",
    "grants",
    "parse_policy",
]

ACTIONS: Final = ("iot:Connect", "iot:Publish", "iot:Subscribe", "iot:Receive")
THING_NAME: Final = "${iot:Connection.Thing.ThingName}"
CLIENT_ID: Final = "${iot:ClientId}"
VERSION: Final = "2012-10-17"
MAX_DOCUMENT: Final = 2048
"""AWS IoT's limit: a policy document of at most 2048 characters, whitespace excluded."""

_ARN: Final = re.compile(r"arn:aws:iot:([^:]*):([^:]*):(topic|topicfilter|client)/(.*)",
                         re.DOTALL)
_VARIABLE: Final = re.compile(r"\$\{[^}]*\}")
_STATEMENT_KEYS: Final = frozenset({"Sid", "Effect", "Action", "Resource"})
_UNSUPPORTED_KEYS: Final = ("NotAction", "NotResource", "Condition", "Principal",
                            "NotPrincipal")
_AWS_ONLY_STAR: Final = "$aws"

_ANY = "arn:aws:iot:*:*:"
_J = f"{_ANY}topic/$aws/things/{THING_NAME}/jobs/"
_C = f"{_ANY}topic/$aws/commands/things/{THING_NAME}/executions/*/"
JOBS_POLICY: Final = json.dumps({
    "Version": VERSION,
    "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": f"{_ANY}client/{THING_NAME}"},
        {"Effect": "Allow", "Action": "iot:Publish",
         "Resource": [_J + "get", _J + "start-next", _J + "*/get", _J + "*/update"]},
        {"Effect": "Allow", "Action": "iot:Subscribe",
         "Resource": f"{_ANY}topicfilter/$aws/things/{THING_NAME}/jobs/*"},
        {"Effect": "Allow", "Action": "iot:Receive",
         "Resource": [_J + "notify", _J + "notify-next",
                      *(f"{_J}{request}/{answer}" for request in ("get", "start-next", "*/get",
                                                                  "*/update")
                        for answer in ("accepted", "rejected"))]},
    ],
}, indent=2)
"""What every sandbox thing gets unless told otherwise, part 1: AWS's usual device policy for
Jobs. The device may write only request topics (``get``, ``start-next``, ``<job>/get``,
``<job>/update``) and read only answers and notifications, all of its own thing."""

COMMANDS_POLICY: Final = json.dumps({
    "Version": VERSION,
    "Statement": [
        {"Effect": "Allow", "Action": "iot:Publish", "Resource": _C + "response/json"},
        {"Effect": "Allow", "Action": "iot:Subscribe",
         "Resource": f"{_ANY}topicfilter/$aws/commands/things/{THING_NAME}/executions/*"},
        {"Effect": "Allow", "Action": "iot:Receive",
         "Resource": [_C + "request/*", _C + "response/accepted/json",
                      _C + "response/rejected/json"]},
    ],
}, indent=2)
"""Part 2, for AWS IoT Commands (``commands-api.md``'s minimal policy): publish a response,
read requests and the answers to responses. Two documents because one would pass AWS's 2048
character limit."""

DEFAULT_POLICIES: Final = {"sandbox-jobs-device": JOBS_POLICY,
                           "sandbox-commands-device": COMMANDS_POLICY}
"""Created at start-up and attached to every certificate the sandbox issues for a thing."""


@dataclass(frozen=True)
class Resource:
    """One resource of a statement: ``kind`` is ``topic``, ``topicfilter``, ``client`` or
    ``any`` (the resource ``*``); ``path`` is what follows ``<kind>/``, variables unresolved."""

    kind: str
    path: str


@dataclass(frozen=True)
class Statement:
    effect: str
    actions: frozenset[str]
    resources: tuple[Resource, ...]


@dataclass(frozen=True)
class Policy:
    statements: tuple[Statement, ...]


@dataclass(frozen=True)
class Grants:
    """What one device may do: ``connect`` for client id = its thing name, and the broker ACLs
    of its deny and allow roles (empty when it may not connect)."""

    connect: bool
    deny: tuple[Acl, ...]
    allow: tuple[Acl, ...]


def _malformed(message: str) -> Rejection:
    return Rejection("MalformedPolicy", message)


def _unsupported(message: str) -> Rejection:
    return Rejection("InvalidRequest", f"{message} (the sandbox supports a subset of AWS IoT "
                                       "policies; see the README)")


def parse_policy(text: object, *, region: str, account: str) -> Policy:
    """Check a policy document and return it parsed.

    Raises:
        Rejection: ``MalformedPolicy`` for what AWS refuses too (not JSON, no Effect, a
            resource that is not an ARN...); ``InvalidRequest`` naming the feature for what AWS
            accepts but the sandbox cannot enforce (Condition, NotAction, another action, a
            ``*`` inside a topic level, another policy variable, another region or account).
    """
    if not isinstance(text, str):
        raise _malformed("policyDocument must be a JSON string")
    if len("".join(text.split())) > MAX_DOCUMENT:
        raise _malformed(f"the policy document is over {MAX_DOCUMENT} characters "
                         "(whitespace excluded)")
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _malformed(f"the policy document is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise _malformed("the policy document must be a JSON object")
    extra = sorted(set(document) - {"Version", "Statement", "Id"})
    if extra:
        raise _malformed(f"unknown policy element {extra[0]!r}")
    if document.get("Version", VERSION) != VERSION:
        raise _malformed(f"Version must be {VERSION!r}")
    raw = document.get("Statement")
    statements = [raw] if isinstance(raw, dict) else raw
    if not isinstance(statements, list) or not statements:
        raise _malformed("Statement must be an object or a non-empty list of objects")
    return Policy(tuple(_statement(s, i, region, account) for i, s in enumerate(statements)))


def _strings(value: object, what: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
        raise _malformed(f"{what} must be a string or a non-empty list of strings")
    return list(items)


def _statement(raw: object, index: int, region: str, account: str) -> Statement:
    where = f"Statement[{index}]"
    if not isinstance(raw, dict):
        raise _malformed(f"{where} must be an object")
    for key in _UNSUPPORTED_KEYS:
        if key in raw:
            raise _unsupported(f"{where}: {key} is not supported")
    extra = sorted(set(raw) - _STATEMENT_KEYS)
    if extra:
        raise _malformed(f"{where}: unknown element {extra[0]!r}")
    for key in ("Effect", "Action", "Resource"):
        if key not in raw:
            raise _malformed(f"{where}: {key} is required")
    effect = raw["Effect"]
    if effect not in ("Allow", "Deny"):
        raise _malformed(f"{where}: Effect must be Allow or Deny, not {effect!r}")
    actions: set[str] = set()
    for action in _strings(raw["Action"], f"{where}.Action"):
        if action == "iot:*":
            actions.update(ACTIONS)
        elif action in ACTIONS:
            actions.add(action)
        else:
            raise _unsupported(f"{where}: action {action!r} is not supported "
                               f"(only {', '.join(ACTIONS)} and iot:*)")
    resources = tuple(_resource(r, f"{where}.Resource", region, account)
                      for r in _strings(raw["Resource"], f"{where}.Resource"))
    return Statement(effect, frozenset(actions), resources)


def _resource(text: str, where: str, region: str, account: str) -> Resource:
    if text == "*":
        return Resource("any", "*")
    match = _ARN.fullmatch(text)
    if match is None:
        if text.startswith("arn:aws:iot:"):
            raise _unsupported(f"{where}: resource {text!r} is not a topic, topicfilter or "
                               "client ARN")
        raise _malformed(f"{where}: resource {text!r} is not an AWS IoT ARN")
    arn_region, arn_account, kind, path = match.groups()
    for given, own, what in ((arn_region, region, "region"), (arn_account, account, "account")):
        if given not in ("*", own):
            raise _unsupported(f"{where}: resource {text!r} names {what} {given!r}; the "
                               f"sandbox is {what} {own!r} (write it, or *)")
    for variable in _VARIABLE.findall(path):
        if variable == THING_NAME or (variable == CLIENT_ID and kind == "client"
                                      and path == CLIENT_ID):
            continue
        raise _unsupported(f"{where}: policy variable {variable} is not supported here (only "
                           f"{THING_NAME}, and {CLIENT_ID} as a whole client resource)")
    if "?" in path:
        raise _unsupported(f"{where}: the ? wildcard in {text!r} is not supported")
    if kind != "client":
        _check_levels(path, kind, where, text)
    return Resource(kind, path)


def _check_levels(path: str, kind: str, where: str, text: str) -> None:
    levels = path.split("/")
    for level in levels:
        if "*" in level and level != "*":
            raise _unsupported(f"{where}: {text!r} has a * inside a topic level ({level!r}); "
                               "the broker matches whole levels only (write * as a level)")
    if kind == "topicfilter" and "*" in levels and any(c in path for c in "+#"):
        raise _unsupported(f"{where}: {text!r} mixes * with a literal + or #, which the "
                           "broker would read as wildcards")


# ---------------------------------------------------------------------------- translation


def grants(policies: Iterable[Policy], *, thing: str | None, client_id: str) -> Grants:
    """The broker ACLs of a device whose certificate has ``policies`` attached.

    ``thing``: the thing the certificate is attached to; None when attached to none, in which
    case ``${iot:Connection.Thing.ThingName}`` resolves to nothing and every resource using it
    matches nothing, as in AWS. ``client_id``: the one iot:Connect is evaluated for (the
    sandbox's convention: the certificate's CN, which is also the thing's name).
    """
    statements = [s for policy in policies for s in policy.statements]
    if not _connect_allowed(statements, client_id, thing):
        return Grants(False, (), ())
    deny: set[Acl] = set()
    allow: set[Acl] = set()
    for statement in statements:
        target = deny if statement.effect == "Deny" else allow
        for action in statement.actions:
            for resource in statement.resources:
                target.update(_acls(action, resource, thing))
    return Grants(True, tuple(sorted(deny)), tuple(sorted(allow)))


def _connect_allowed(statements: list[Statement], client_id: str, thing: str | None) -> bool:
    matching = [s.effect for s in statements if "iot:Connect" in s.actions
                and any(_client_matches(r, client_id, thing) for r in s.resources)]
    return "Allow" in matching and "Deny" not in matching


def _client_matches(resource: Resource, client_id: str, thing: str | None) -> bool:
    if resource.kind == "any":
        return True
    if resource.kind != "client":
        return False
    if resource.path == CLIENT_ID:
        return True
    path = _substitute(resource.path, thing)
    if path is None:
        return False
    pattern = ".*".join(re.escape(part) for part in path.split("*"))
    return re.fullmatch(pattern, client_id, re.DOTALL) is not None


def _substitute(path: str, thing: str | None) -> str | None:
    if THING_NAME not in path:
        return path
    return None if thing is None else path.replace(THING_NAME, thing)


_ACL_TYPE: Final = {"iot:Publish": "publishClientSend", "iot:Receive": "publishClientReceive"}


def _acls(action: str, resource: Resource, thing: str | None) -> list[Acl]:
    if action == "iot:Connect":
        return []
    if action == "iot:Subscribe":
        if resource.kind == "any":
            return [Acl("subscribePattern", p) for p in _patterns("*")]
        if resource.kind != "topicfilter":
            return []
        path = _substitute(resource.path, thing)
        if path is None:
            return []
        if "*" not in path.split("/"):
            return [Acl("subscribeLiteral", path)] if _grantable(path) else []
        return [Acl("subscribePattern", p) for p in _patterns(path)]
    kind = _ACL_TYPE[action]
    if resource.kind not in ("any", "topic"):
        return []
    path = _substitute(resource.path, thing)
    if path is None or any(c in path for c in "+#"):
        return []  # no topic name contains + or #: AWS matches nothing either
    return [Acl(kind, p) for p in _patterns(path)]


def _patterns(path: str) -> list[str]:
    """The MQTT patterns standing for an AWS pattern whose ``*`` are whole levels (or ``*``)."""
    levels = path.split("/")
    last = len(levels) - 1
    mqtt = ["#" if (level == "*" and i == last) else "+" if level == "*" else level
            for i, level in enumerate(levels)]
    out = ["/".join(mqtt)]
    if levels[0] == "*":
        out.append("/".join([_AWS_ONLY_STAR, *mqtt[1:]]) if last else _AWS_ONLY_STAR + "/#")
    return [p for p in out if _grantable(p)]


def _grantable(topic: str) -> bool:
    """Never a ``$`` topic but ``$aws``: the broker's own (``$SYS``, ``$CONTROL``) stay shut."""
    first = topic.split("/", 1)[0]
    return not first.startswith("$") or first == _AWS_ONLY_STAR
