"""Shared fixtures: a real PKI, a real mutual-TLS Mosquitto and the Jobs emulator.

One stack serves the whole session (each test gets its own thing, so tests cannot see each
other's jobs); tests that restart or break the broker build their own with ``own_stack``.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import re
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import botocore.session
import pytest
from botocore.validate import ParamValidator

from agent.config import Config, load_config
from agent.connection import Connection
from agent.jobs import JobsClient
from agent.sandbox.stack import Stack

_SESSION = botocore.session.get_session()


def _safe_temproot() -> None:
    """Keep pytest's tmp_path out of /tmp: the agent refuses to run a program whose path
    passes through a directory others can write, and a sticky /tmp is such a directory
    (agent.paths). The tests' handlers live in tmp_path, so its root must be private."""
    if os.environ.get("PYTEST_DEBUG_TEMPROOT"):
        return
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ija-tests"
    root.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.environ["PYTEST_DEBUG_TEMPROOT"] = str(root)


_safe_temproot()

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    """Run one async test body (the project has no pytest-asyncio dependency)."""
    return asyncio.run(coro)  # type: ignore[arg-type]


@dataclass
class Thing:
    name: str
    config_path: Path
    stack: Stack

    def j(self, job_id: str) -> str:
        """A job id unique to this test (job ids are global in the shared emulator)."""
        return f"{job_id}-{self.name[-6:]}"

    @property
    def config(self) -> Config:
        return load_config(self.config_path)

    @property
    def emulator(self) -> Any:
        return self.stack.emulator


def broad_jobs_policy(thing: str = "${iot:Connection.Thing.ThingName}") -> str:
    """A policy as many AWS accounts write it: every Jobs topic of the thing, both ways (so
    the device may also publish on topics that map to no API, and read their rejections)."""
    topics = f"arn:aws:iot:*:*:topic/$aws/things/{thing}/jobs/*"
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "iot:Connect", "Resource": "arn:aws:iot:*:*:client/*"},
        {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"], "Resource": topics},
        {"Effect": "Allow", "Action": "iot:Subscribe",
         "Resource": f"arn:aws:iot:*:*:topicfilter/$aws/things/{thing}/jobs/*"}]})


def unique_thing_name(request: pytest.FixtureRequest) -> str:
    base = re.sub(r"[^a-zA-Z0-9_-]", "-", request.node.name)[:50]
    return f"{base}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("stack")) as s:
        yield s


@pytest.fixture
def own_stack(tmp_path: Path) -> Iterator[Stack]:
    """A private broker + emulator, for tests that restart or break them."""
    with Stack(tmp_path / "stack") as s:
        yield s


@pytest.fixture
def thing(stack: Stack, request: pytest.FixtureRequest) -> Thing:
    name = unique_thing_name(request)
    return Thing(name, stack.thing(name), stack)


@contextlib.asynccontextmanager
async def open_client(config: Config, *, streams: bool = False,
                      request_timeout: float | None = None) -> AsyncIterator[JobsClient]:
    """A connected :class:`JobsClient` for ``config``'s thing, stopped on exit."""
    connection = Connection(config.mqtt, config.client_id)
    jobs = JobsClient(connection, request_timeout=request_timeout or config.mqtt.request_timeout)
    if streams:
        jobs.open_streams(config.thing_name)
    async with connection:
        yield jobs


def boto3_shape_errors(operation: str, response: dict[str, Any]) -> str:
    """botocore's own verdict on ``response`` as the output of ``operation`` ('' = valid).

    botocore validates *inputs* with ParamValidator; pointing it at the output shape checks
    every key is modeled, every type matches (long = int, string = str) and required keys exist.
    """
    model = _SESSION.get_service_model("iot-jobs-data")
    shape = model.operation_model(operation).output_shape
    report = ParamValidator().validate(response, shape)
    return report.generate_report() if report.has_errors() else ""


@dataclass
class Web:
    """A loopback HTTP server for downloads: files from ``root``; ``/expired...`` answers 403 as
    S3 does for a stale presigned URL; ``/go...`` redirects to a ``file://`` URL."""

    url: str
    root: Path


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Web]:
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self) -> None:
            if self.path.startswith("/expired"):
                self.send_error(403, "Request has expired")
            elif self.path.startswith("/go"):
                self.send_response(302)
                self.send_header("Location", "file:///etc/passwd")
                self.end_headers()
            else:
                super().do_GET()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Web(f"http://127.0.0.1:{server.server_port}", root)
    finally:
        server.shutdown()
        server.server_close()
