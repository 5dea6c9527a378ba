"""Fixtures shared by the integration tests: boto3 clients of the session stack, refereed."""

from __future__ import annotations

from typing import Any

import pytest

from agent.sandbox.stack import Stack
from tests.integration.test_boto3_referee import sandbox_client


@pytest.fixture(scope="session")
def iot(stack: Stack) -> Any:
    """``boto3.client("iot")`` on the sandbox; every raw answer checked against the model."""
    return sandbox_client("iot", stack.control_endpoint, stack.region)


@pytest.fixture(scope="session")
def data(stack: Stack) -> Any:
    """``boto3.client("iot-jobs-data")`` on the sandbox, refereed likewise."""
    return sandbox_client("iot-jobs-data", stack.data_endpoint, stack.region)
