"""Every exception the agent raises, in one tree.

Callers catch by meaning, not by where an error came from::

    AgentError
    ├── ConfigError                      bad config file, missing/unsafe cert or key (exit 78)
    ├── ConnectionFailedError            could not reach or stay connected to the MQTT broker
    │   └── CertificateValidationException   the TLS handshake was refused (certificate, key or CA)
    ├── RequestTimeoutError              no reply to a Jobs request within the timeout
    ├── JournalError                     the local journal cannot be read or written (disk full)
    ├── NotReadableError                 a file an inspection command reads (the journal, the
    │                                    agent's state file) is missing or unreadable
    ├── UnknownJobError                  the journal has no such job execution
    ├── SandboxError                     the local sandbox could not start (missing tool, port)
    ├── RequestFailedError               the request never reached the service (broker refused
    │   │                                the publish, client stopped); retrying may help
    │   └── NotAuthorizedError           the broker refused a publish or subscription: the
    │                                    device's IoT policy lacks iot:Publish/iot:Subscribe
    └── JobsServiceError                 the Jobs (or Commands) service answered "rejected";
                                         names follow boto3
        ├── InvalidRequestException          InvalidTopic, InvalidJson, InvalidRequest, or a
        │                                    parameter we refused before sending
        ├── ResourceNotFoundException        ResourceNotFound
        ├── ThrottlingException              RequestThrottled
        ├── ServiceUnavailableException      InternalError
        ├── InvalidStateTransitionException  InvalidStateTransition (carries executionState)
        ├── TerminalStateException           TerminalStateReached
        ├── ConflictException                VersionMismatch (carries executionState); for
        │                                    Commands, DataConflict (updates too close together)
        └── InvalidResponseError             the reply itself is malformed (not the model's shape)

The Jobs service errors use botocore's ``iot-jobs-data`` exception names so code written against
``boto3.client("iot-jobs-data")`` reads the same against this agent. An unknown rejection code
still raises ``JobsServiceError`` with that ``code``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AgentError",
    "CertificateValidationException",
    "ConfigError",
    "ConflictException",
    "ConnectionFailedError",
    "InvalidRequestException",
    "InvalidResponseError",
    "InvalidStateTransitionException",
    "JobsServiceError",
    "JournalError",
    "NotAuthorizedError",
    "NotReadableError",
    "RequestFailedError",
    "RequestTimeoutError",
    "ResourceNotFoundException",
    "SandboxError",
    "ServiceUnavailableException",
    "TerminalStateException",
    "ThrottlingException",
    "UnknownJobError",
    "error_from_rejection",
]


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(AgentError):
    """The configuration cannot be used as written; the message says what to change.

    ``problems`` lists every problem found (each already a one-line message with its location),
    so ``check-config`` can print them all rather than stopping at the first.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems if problems is not None else [message]


class ConnectionFailedError(AgentError):
    """The MQTT connection could not be made or was lost for longer than allowed."""


class CertificateValidationException(ConnectionFailedError):
    """The TLS handshake failed: the broker refused our certificate or we refused the broker's.

    Named after botocore's ``iot-jobs-data`` error. Over MQTT a bad certificate does not get a
    "rejected" reply: the TLS handshake fails instead, 10-30 s after the attempt.
    """

    code = "CertificateValidation"


class RequestTimeoutError(AgentError):
    """No accepted/rejected reply arrived in time. The request may or may not have taken effect."""

    def __init__(self, message: str, operation: str = "") -> None:
        super().__init__(message)
        self.operation = operation


class RequestFailedError(AgentError):
    """The request could not be delivered (publish refused by the broker, client shut down)."""

    def __init__(self, message: str, operation: str = "") -> None:
        super().__init__(message)
        self.operation = operation


class NotAuthorizedError(RequestFailedError):
    """The broker answered *not authorized*: the device's IoT policy does not allow ``action``
    (``iot:Publish`` or ``iot:Subscribe``) on ``topic``. Retrying will not help until the policy
    is changed."""

    def __init__(self, message: str, operation: str = "", *, action: str = "",
                 topic: str = "") -> None:
        super().__init__(message, operation)
        self.action = action
        self.topic = topic


class JournalError(AgentError):
    """The journal under ``state_dir`` cannot be read or written (disk full, permissions)."""


class NotReadableError(AgentError):
    """An inspection command (``status``, ``jobs``, ``log``) cannot read what it needs: no
    journal yet, a permission problem, a corrupt file. The message names the file and the fix."""


class UnknownJobError(AgentError):
    """The journal has no record of this job (or of this execution of it): never run on this
    device, or pruned after ``retention``."""


class SandboxError(AgentError):
    """The local sandbox could not start: mosquitto or openssl missing, a port in use."""


class JobsServiceError(AgentError):
    """The Jobs service rejected a request.

    Attributes mirror the MQTT ErrorResponse: ``code`` (the wire code, e.g. ``VersionMismatch``),
    ``message``, ``client_token`` and, for VersionMismatch/InvalidStateTransition,
    ``execution_state`` (a boto3-shaped JobExecutionState dict), so a caller can decide without
    asking the service again.
    """

    codes: tuple[str, ...] = ()

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        execution_state: dict[str, Any] | None = None,
        client_token: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code if code is not None else (self.codes[0] if self.codes else "Unknown")
        self.execution_state = execution_state
        self.client_token = client_token

    @property
    def executionState(self) -> dict[str, Any] | None:
        return self.execution_state


class InvalidRequestException(JobsServiceError):
    codes = ("InvalidRequest", "InvalidTopic", "InvalidJson")


class ResourceNotFoundException(JobsServiceError):
    codes = ("ResourceNotFound",)


class ThrottlingException(JobsServiceError):
    codes = ("RequestThrottled",)


class ServiceUnavailableException(JobsServiceError):
    codes = ("InternalError",)


class InvalidStateTransitionException(JobsServiceError):
    codes = ("InvalidStateTransition",)


class TerminalStateException(JobsServiceError):
    codes = ("TerminalStateReached",)


class ConflictException(JobsServiceError):
    codes = ("VersionMismatch", "DataConflict")


class InvalidResponseError(JobsServiceError):
    """A reply that does not fit the service model: wrong types, missing keys, not JSON."""

    codes = ("InvalidResponse",)


_BY_CODE: dict[str, type[JobsServiceError]] = {
    code: cls
    for cls in (
        InvalidRequestException,
        ResourceNotFoundException,
        ThrottlingException,
        ServiceUnavailableException,
        InvalidStateTransitionException,
        TerminalStateException,
        ConflictException,
    )
    for code in cls.codes
}


def error_from_rejection(
    code: str,
    message: str,
    *,
    execution_state: dict[str, Any] | None = None,
    client_token: str | None = None,
) -> JobsServiceError:
    """Build the boto3-named exception for a rejected reply's ``code``."""
    cls = _BY_CODE.get(code, JobsServiceError)
    return cls(message, code=code, execution_state=execution_state, client_token=client_token)
