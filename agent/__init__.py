"""iot-jobs-agent: run AWS IoT Jobs on an edge device, with nothing lost.

Supported imports are the names in ``__all__``; everything else is internal.
"""

from agent._version import __version__
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
    RequestFailedError,
    RequestTimeoutError,
    ResourceNotFoundException,
    ServiceUnavailableException,
    TerminalStateException,
    ThrottlingException,
)

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
    "RequestFailedError",
    "RequestTimeoutError",
    "ResourceNotFoundException",
    "ServiceUnavailableException",
    "TerminalStateException",
    "ThrottlingException",
    "__version__",
    "load_config",
]
