"""The agent's doorbell: notifications wake a sync; refused streams fall back to polling."""

from __future__ import annotations

import asyncio
import types
from collections.abc import AsyncIterator
from typing import Any

import pytest

import agent.app
from agent.app import Agent
from agent.jobs import JobsEvent


class FakeJobs:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[JobsEvent] = asyncio.Queue()

    async def events(self) -> AsyncIterator[JobsEvent]:
        while True:
            yield await self.queue.get()


class FakeDispatcher:
    def __init__(self) -> None:
        self.wakes: list[str] = []

    def wake(self, reason: str) -> None:
        self.wakes.append(reason)


def test_refused_streams_poll_until_granted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent.app, "REFUSED_POLL", 0.05)
    config: Any = types.SimpleNamespace(poll_interval=300.0)

    async def body() -> list[list[str]]:
        app = Agent(config)
        jobs, dispatcher = FakeJobs(), FakeDispatcher()
        pump = asyncio.ensure_future(app._pump_events(jobs, dispatcher))  # type: ignore[arg-type]
        seen = []
        jobs.queue.put_nowait(JobsEvent("subscribed", {"stream": "notify"}))
        jobs.queue.put_nowait(JobsEvent("subscription-halted", {"stream": "notify-next"}))
        async with asyncio.timeout(10):  # two polls, however loaded the machine
            while dispatcher.wakes.count("refused-streams-poll") < 2:
                await asyncio.sleep(0.01)
        seen.append(list(dispatcher.wakes))
        jobs.queue.put_nowait(JobsEvent("subscribed", {"stream": "notify-next"}))
        await asyncio.sleep(0.02)
        dispatcher.wakes.clear()
        await asyncio.sleep(0.15)
        seen.append(list(dispatcher.wakes))
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
        return seen

    while_refused, after = asyncio.run(body())
    assert while_refused[0] == "subscribed"
    assert while_refused.count("refused-streams-poll") >= 2  # every REFUSED_POLL seconds
    assert after == []  # granted again: back to the normal safety poll (the dispatcher's)
