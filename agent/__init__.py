"""iot-jobs-agent: run AWS IoT Jobs on an edge device, with nothing lost.

Supported imports are the names in ``__all__``; everything else is internal.
"""

from agent.config import Config, MqttConfig, load_config
from agent.errors import (
    AgentError,
    CertificateValidationException,
    ConfigError,
    ConflictException,
    ConnectionFailedError,
    InvalidRequestException,
    InvalidResponseError,
    InvalidStateTransitionException,
    JobsServiceError,
    JournalError,
    NotAuthorizedError,
    RequestFailedError,
    RequestTimeoutError,
    ResourceNotFoundException,
    ServiceUnavailableException,
    TerminalStateException,
    ThrottlingException,
)


def __getattr__(name: str) -> str:
    """``__version__``, looked up on first use: importing importlib.metadata costs the daemon,
    which never needs its own version, about 2 MB of resident memory (issue 5's idle figure)."""
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        value = version("iot-jobs-agent")
    except PackageNotFoundError:  # running from a source tree that was never installed
        value = "0.0.0"
    globals()["__version__"] = value
    return value


__all__ = [
    "AgentError",
    "CertificateValidationException",
    "Config",
    "ConfigError",
    "ConflictException",
    "ConnectionFailedError",
    "InvalidRequestException",
    "InvalidResponseError",
    "InvalidStateTransitionException",
    "JobsServiceError",
    "JournalError",
    "MqttConfig",
    "NotAuthorizedError",
    "RequestFailedError",
    "RequestTimeoutError",
    "ResourceNotFoundException",
    "ServiceUnavailableException",
    "TerminalStateException",
    "ThrottlingException",
    "__version__",
    "load_config",
]
