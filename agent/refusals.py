"""Refused topics, diagnosed: which IoT policy action a broker's refusal points at. No I/O.

AWS IoT answers an operation outside the device's policy with reason code 0x87 (*not
authorized*) in the SUBACK or PUBACK, and sometimes closes the connection instead. A device
that only logs "subscribe failed" or waits for a reply that never comes leaves its owner to
guess; this module turns each refusal into one line that names the topic and the policy action
to grant (``iot:Subscribe`` on a ``topicfilter``, ``iot:Publish`` or ``iot:Receive`` on a
``topic``), and :class:`RefusalLog` says it once, not on every retry of the sync loop.

What can be detected, and how (README, "Refused topics"):

* a refused SUBACK (``iot:Subscribe``) and a refused PUBACK (``iot:Publish``): exactly;
* ``iot:Receive`` missing: the broker grants the subscription and accepts the request, and then
  silently drops the reply. Only a pattern says so: requests on one topic that keep timing out
  while the connection stayed up and nothing ever arrived on their reply topics;
* a connection closed by the broker while a SUBSCRIBE or PUBLISH was unanswered: AWS IoT's other
  way of refusing. A DISCONNECT with *not authorized* says so exactly; a bare hang-up only
  suggests it, so it is a warning the first time and an error when it happens again on the
  same topic (the client re-sends the operation after reconnecting, so a policy refusal repeats
  and a network blip does not).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

__all__ = ["ACTIONS", "NOT_AUTHORIZED", "RefusalLog", "is_policy_refusal", "refusal_line"]

log = logging.getLogger("agent.policy")

NOT_AUTHORIZED = 0x87
UNSPECIFIED_ERROR = 0x80  # what an MQTT 3.1.1 SUBACK failure (0x80) becomes; AWS uses it too

ACTIONS = {
    "subscribe": ("iot:Subscribe", "topicfilter"),
    "publish": ("iot:Publish", "topic"),
    "receive": ("iot:Receive", "topic"),
}
"""Operation -> (the IoT policy action it needs, the resource type of its ARN)."""


def is_policy_refusal(code: int) -> bool:
    """Whether a SUBACK/PUBACK/DISCONNECT reason code means "your policy does not allow this"."""
    return code in (NOT_AUTHORIZED, UNSPECIFIED_ERROR)


def _reason_name(code: int) -> str:
    names = {0x80: "unspecified error", 0x83: "implementation specific error",
             0x87: "not authorized", 0x8F: "topic filter invalid", 0x90: "topic name invalid",
             0x97: "quota exceeded", 0x99: "payload format invalid"}
    return f"{names.get(code, 'refused')} (0x{code:02X})"


def refusal_line(operation: str, topic: str, code: int) -> str:
    """One line for a refused ``operation`` (subscribe, publish) on ``topic``.

    >>> refusal_line("subscribe", "$aws/things/t/jobs/notify", 0x87)
    'the broker refused to subscribe to $aws/things/t/jobs/notify: not authorized (0x87); the \
device\\'s IoT policy must allow iot:Subscribe on topicfilter/$aws/things/t/jobs/notify'
    """
    action, resource = ACTIONS[operation]
    verb = "subscribe to" if operation == "subscribe" else "accept a publish on"
    line = f"the broker refused to {verb} {topic}: {_reason_name(code)}"
    if is_policy_refusal(code):
        line += f"; the device's IoT policy must allow {action} on {resource}/{topic}"
    return line


def receive_line(topics: list[str], timeouts: int) -> str:
    """Requests accepted by the broker whose replies never arrive: the iot:Receive pattern."""
    return (f"no reply ever arrived on {' or '.join(topics)}: {timeouts} requests timed out "
            "although the broker accepted them and the connection stayed up; the device's IoT "
            f"policy probably does not allow iot:Receive on topic/{topics[0]} (or the Jobs "
            "service is not answering)")


@dataclass
class RefusalLog:
    """Logs each refusal as one ERROR line, once, until the same operation succeeds again.

    The sync loop retries a refused request with backoff for as long as the agent runs; the
    first refusal is the news, the retries are not (they go to DEBUG).
    """

    _said: set[tuple[str, str]] = field(default_factory=set)
    _hangups: dict[str, int] = field(default_factory=dict)

    def refused(self, operation: str, topic: str, code: int) -> str:
        line = refusal_line(operation, topic, code)
        self._report((operation, topic), line)
        return line

    def no_reply(self, topics: list[str], timeouts: int) -> str:
        line = receive_line(topics, timeouts)
        self._report(("receive", topics[0]), line)
        return line

    def allowed(self, operation: str, topic: str) -> None:
        """The operation went through (a fixed policy): a later refusal is news again."""
        if (operation, topic) in self._said:
            self._said.discard((operation, topic))
            log.info("the broker now allows %s on %s", ACTIONS[operation][0], topic)
        self._hangups.pop(topic, None)

    def disconnected(self, unanswered: list[tuple[str, str]], code: int | None,
                     error: str) -> str | None:
        """The broker closed the connection; ``unanswered`` lists (operation, topic) in flight.

        Returns the line logged, or None when nothing points at a policy.
        """
        if code is not None and is_policy_refusal(code):
            if unanswered:
                operation, topic = unanswered[0]
                return self.refused(operation, topic, code)
            line = (f"the broker closed the connection: {_reason_name(code)}; check that the "
                    "device's IoT policy allows iot:Connect for this client id and every topic "
                    "it uses")
            self._report(("connect", ""), line)
            return line
        if not unanswered or code is not None:
            self._hangups.clear()
            return None
        operation, topic = unanswered[0]
        action, resource = ACTIONS[operation]
        seen = self._hangups.get(topic, 0) + 1
        self._hangups = {topic: seen}
        line = (f"the broker closed the connection ({error}) while a {operation.upper()} on "
                f"{topic} was unanswered; AWS IoT does this when the device's IoT policy does "
                f"not allow {action} on {resource}/{topic}")
        if seen < 2:
            log.warning("%s (once is not proof: watching for a repeat)", line)
            return line
        self._report((operation, topic), line + f" (happened {seen} times in a row)")
        return line

    def _report(self, key: tuple[str, str], line: str) -> None:
        if key in self._said:
            log.debug("%s (again)", line)
        else:
            self._said.add(key)
            log.error("%s", line)
