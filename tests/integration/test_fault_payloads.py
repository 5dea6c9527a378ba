"""Hostile payloads on every topic the agent listens to: it logs, carries on, and runs real jobs.

The agent's inputs from the network are the ``notify``/``notify-next`` streams and the replies to
its own requests (``<request topic>/accepted|rejected``). Anything can arrive there: a buggy or
compromised publisher with the service's rights, a truncated retransmission, a reply for somebody
else's request. None of it may crash the agent, wedge it, leave a traceback in the journal, or
start a job the service did not hand out; notifications are only a doorbell and replies only
count when they answer our own request.

Everything is real: Mosquitto, the emulator, the agent as a process. The payloads are generated
with hypothesis from the wire payloads the emulator itself produces (so truncations and
wrong-type mutations start from the real shapes), and published with
:meth:`Emulator.publish_raw` as the service identity, which may publish on every thing's topics.
One agent serves the barrage tests (starting one per example would take minutes); the tests that
corrupt a reply to the agent's own request start their own, since a bug there can stop it.
"""

from __future__ import annotations

import base64
import copy
import json
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.sandbox.document import dumps
from agent.sandbox.stack import Stack
from tests.conftest import Thing
from tests.integration.agent_harness import TERMINAL, AgentProcess, write_handler

pytestmark = pytest.mark.broker

# Every topic of the agent's thing that it subscribes to (the streams always, the replies while
# a request is in flight) or that a confused service could answer on; ``{job}`` is a job id.
THING_TOPICS = ("notify", "notify-next", "get/accepted", "get/rejected", "start-next/accepted",
                "{job}/get/accepted", "{job}/update/accepted", "{job}/update/rejected")
OTHER_TOPICS = ("notify", "notify-next")  # of another thing: the agent must never see them

SENTINEL_SIZE = 65_521  # no payloads() draw is this long (oversized ones are >= 90 KB)
BIG = (90_000, 100_000)  # "oversized": well under mosquitto's default message_size_limit
DEEP = 5_000  # arrays nested deeper than Python's json parser can recurse
# A deep nesting that the CRT's JSON parser (cJSON, limit 1000) still reads, so that it finds the
# clientToken and hands the reply over, but that Python's parser cannot (recursion limit 1000).
DEEP_BUT_CORRELATED = 990

_LOG_PROBLEM = re.compile(r"^\S+ (?:ERROR|CRITICAL) |Traceback \(most recent call last\)|"
                          r"^Exception in callback", re.MULTILINE)

Samples = dict[str, list[dict[str, Any]]]


def handlers_for(directory: Path, runs: Path) -> dict[str, dict[str, object]]:
    """``once`` records its run; ``gated`` records its run, reports progress until ``$1`` exists.

    Every handler appends ``$JOB_ID`` to ``runs``, so the file is the list of every job the agent
    ever started: a job started by a forged notification would show up there. ``gated`` goes
    quiet for a moment before it exits: a progress update still in flight when a handler ends
    has its request future cancelled by the agent, and the CRT then prints an InvalidStateError
    traceback when the reply comes; that race is not about payloads and is not tested here.
    """
    once = write_handler(directory, "once.sh", f'echo "$JOB_ID" >> {runs}\n')
    gated = write_handler(directory, "gated.sh", (
        f'echo "$JOB_ID" >> {runs}\n'
        "n=0\n"
        'while [ ! -e "$1" ]; do\n'
        "  n=$((n + 1))\n"
        '  echo "{\\"progress\\": $n}" >&"$JOB_PROGRESS_FD"\n'
        "  sleep 0.05\n"
        "done\n"
        "sleep 0.6\n"  # > progress_interval: no update in flight at exit
        "echo gate opened\n"))
    return {"once": {"command": [str(once)], "timeout": "20s"},
            "gated": {"command": [str(gated)], "timeout": "20s"}}


def log_problems(text: str, context: int = 25) -> list[str]:
    """ERROR/CRITICAL lines and tracebacks, each with the ``context`` lines after it.

    The agent's formatter never prints a traceback itself: one in the log comes from an
    exception that escaped into asyncio or the interpreter.
    """
    lines = text.splitlines()
    return ["\n".join(line[:400] for line in lines[i:i + context])
            for i, line in enumerate(lines) if _LOG_PROBLEM.search(line)]


def log_since(agent: AgentProcess, mark: int) -> str:
    return agent.log_path.read_bytes()[mark:].decode(errors="replace")


def log_mark(agent: AgentProcess) -> int:
    return agent.log_path.stat().st_size if agent.log_path.exists() else 0


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 20.0,
             agent: AgentProcess | None = None) -> None:
    """Poll ``predicate``; fail fast (with the log) if ``agent`` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if agent is not None and agent.process is not None and agent.process.poll() is not None:
            raise AssertionError(f"agent exited {agent.process.returncode} while waiting: "
                                 f"{what}:\n{agent.log()[-5000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting: {what}")
        time.sleep(0.05)


def wait_terminal(agent: AgentProcess, job: str, timeout: float = 30.0) -> dict[str, Any]:
    """Like :meth:`AgentProcess.wait_status`, but a dead agent fails at once, not after 30 s."""
    emulator = agent.emulator
    wait_for(lambda: emulator.execution(job, agent.thing)["status"] in TERMINAL,
             f"{job} to end", timeout, agent)
    return emulator.execution(job, agent.thing)


def wait_log_since(agent: AgentProcess, mark: int, text: str, timeout: float = 20.0) -> None:
    wait_for(lambda: text in log_since(agent, mark), f"{text!r} logged", timeout, agent)


def real_wire_payloads(stack: Stack, thing: str, jobs: tuple[str, str]) -> Samples:
    """What the emulator really publishes, by topic suffix (job ids replaced by ``{job}``).

    ``thing`` is driven through the device API in-process: two jobs queued, the pending list,
    a describe, a start-next, a rejected and an accepted update, and a throttled ``get``. The
    thing ends with ``jobs[0]`` IN_PROGRESS (no step timer) and ``jobs[1]`` QUEUED, and stays
    so: it has no agent, and the agent under test must never touch another thing's jobs.
    """
    emulator = stack.emulator
    assert emulator is not None
    active, queued = jobs
    prefix = f"$aws/things/{thing}/jobs/"
    samples: Samples = {}

    def keep(publishes: list[Any]) -> None:
        for pub in publishes:
            suffix = pub.topic.removeprefix(prefix)
            for job in jobs:
                suffix = suffix.replace(f"{job}/", "{job}/")
            samples.setdefault(suffix, []).append(json.loads(dumps(pub.payload)))  # as sent

    def device(topic: str, body: dict[str, Any]) -> None:
        raw = json.dumps({"clientToken": str(uuid.uuid4()), **body}).encode()
        keep(emulator.call(lambda s: s.handle(prefix + topic, raw)))

    keep(emulator.call(lambda s: s.create_job(active, [thing], {"operation": "once"})))
    keep(emulator.call(lambda s: s.create_job(queued, [thing], {"operation": "once",
                                                                "args": ["x"]})))
    device("get", {})
    device(f"{active}/get", {"includeJobDocument": True})
    device("start-next", {"statusDetails": {"step": "starting"}})
    device(f"{active}/update", {"status": "IN_PROGRESS", "expectedVersion": 99,
                                "includeJobExecutionState": True})
    device(f"{active}/update", {"status": "IN_PROGRESS", "expectedVersion": 2,
                                "statusDetails": {"progress": "50"},
                                "includeJobExecutionState": True, "includeJobDocument": True})
    emulator.inject_rejections("RequestThrottled", 1, {"get"})
    device("get", {})
    missing = {"notify", "notify-next", "get/accepted", "get/rejected", "start-next/accepted",
               "{job}/get/accepted", "{job}/update/accepted", "{job}/update/rejected"}
    missing -= set(samples)
    assert not missing, f"the emulator published no {sorted(missing)}: {samples}"
    return samples


# --------------------------------------------------------------------------- strategies

def _wrong_values() -> st.SearchStrategy[Any]:
    """Values of the wrong type or range for any field of the Jobs wire format."""
    scalars = st.one_of(
        st.none(), st.booleans(), st.text(max_size=40),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([-1, 0, 1.5, 2**63, 10**13, 1_764_340_000_123, "1764340000", "",
                         "QUEUED", "IN_PROGRESS", "$next", "../../notify", "\x00", "\ud800"]),
    )
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=12)


def _paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a JSON tree (the root is ``()``)."""
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, (*path, i))


def _replace(value: Any, path: tuple[Any, ...], new: Any, *, delete: bool = False) -> Any:
    if not path:
        return new
    out = copy.deepcopy(value)
    parent = out
    for step in path[:-1]:
        parent = parent[step]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return out


def _dumps(value: Any) -> bytes:
    # NaN/Infinity and lone surrogates are what a sloppy encoder really produces; keep them.
    return json.dumps(value).encode("utf-8", "surrogatepass")


@st.composite
def _mutated(draw: st.DrawFn, samples: Samples) -> bytes:
    """A real payload with one field replaced by a wrong type (or removed, or wrapped)."""
    payload = draw(st.sampled_from(sorted(samples)).flatmap(lambda k: st.sampled_from(samples[k])))
    places = list(_paths(payload))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(places))
        action = draw(st.sampled_from(["replace", "delete", "wrap"]))
        if action == "delete" and path:
            payload = _replace(payload, path, None, delete=True)
        elif action == "wrap":
            payload = _replace(payload, path, [_get(payload, path)])
        else:
            payload = _replace(payload, path, draw(_wrong_values()))
        places = list(_paths(payload))
    return _dumps(payload)


def _get(value: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        value = value[step]
    return value


@st.composite
def _truncated(draw: st.DrawFn, samples: Samples) -> bytes:
    """A real payload cut short, as a broken retransmission would deliver it."""
    raw = _dumps(draw(st.sampled_from(sorted(samples)).flatmap(
        lambda k: st.sampled_from(samples[k]))))
    return raw[:draw(st.integers(0, len(raw) - 1))]


@st.composite
def _unknown_token(draw: st.DrawFn, samples: Samples) -> bytes:
    """A well-formed reply answering a request nobody made (or with a token of the wrong type)."""
    replies = sorted(k for k in samples if k.endswith(("accepted", "rejected")))
    payload = dict(draw(st.sampled_from(replies).flatmap(lambda k: st.sampled_from(samples[k]))))
    payload["clientToken"] = draw(st.one_of(st.uuids().map(str), st.text(max_size=80),
                                            _wrong_values()))
    return _dumps(payload)


@st.composite
def _oversized(draw: st.DrawFn, samples: Samples) -> bytes:
    """~100 KB: valid JSON with a huge field or list, or random bytes."""
    size = draw(st.integers(*BIG))
    kind = draw(st.sampled_from(["field", "list", "bytes"]))
    if kind == "bytes":
        return random.Random(draw(st.integers(0, 2**32))).randbytes(size)
    payload = dict(draw(st.sampled_from(sorted(samples)).flatmap(
        lambda k: st.sampled_from(samples[k]))))
    if kind == "field":
        payload[draw(st.sampled_from(["pad", "clientToken", "execution", "jobs"]))] = "x" * size
    else:
        summary = {"jobId": "ghost", "queuedAt": 1, "lastUpdatedAt": 1, "versionNumber": 1,
                   "executionNumber": 1}  # 96 bytes as JSON
        many = [summary] * (size // 98)
        key = draw(st.sampled_from(["queuedJobs", "inProgressJobs", "jobs"]))
        payload[key] = {"QUEUED": many} if key == "jobs" else many
    return _dumps(payload)


@st.composite
def _bad_utf8(draw: st.DrawFn, samples: Samples) -> bytes:
    """A real payload with an invalid UTF-8 sequence spliced in (often inside a string)."""
    raw = _dumps(draw(st.sampled_from(sorted(samples)).flatmap(
        lambda k: st.sampled_from(samples[k]))))
    bad = draw(st.sampled_from([b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xc0\xaf", b"\xed\xa0\x80",
                                b"\xf4\x90\x80\x80", b"\x80", b"\xe2\x82"]))
    at = draw(st.integers(0, len(raw)))
    return raw[:at] + bad + raw[at:]


@st.composite
def _deeply_nested(draw: st.DrawFn) -> bytes:
    """Nested garbage, up to far deeper than any parser recurses; closed or not."""
    depth = draw(st.one_of(st.integers(1, 50), st.integers(900, DEEP)))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
    inner = opener * depth + b"1" + (closer * depth if draw(st.booleans()) else b"")
    return b'{"execution": ' + inner + b"}" if draw(st.booleans()) else inner


def _other_things_payloads(samples: Samples, thing: str) -> st.SearchStrategy[bytes]:
    """Well-formed notifications that name another thing (theirs, unchanged) or a ghost job."""
    notes = samples["notify"] + samples["notify-next"]
    ghosts = [_replace(n, ("execution", "jobId"), f"ghost-{i}") for i, n in
              enumerate(samples["notify-next"]) if "execution" in n]
    mine = [_replace(n, ("execution", "thingName"), thing) for n in ghosts]
    return st.sampled_from(notes + ghosts + mine).map(_dumps)


def payloads(samples: Samples, thing: str) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=512),
        _truncated(samples),
        _mutated(samples),
        _unknown_token(samples),
        _oversized(samples),
        _bad_utf8(samples),
        _deeply_nested(),
        _other_things_payloads(samples, thing),
        _wrong_values().map(_dumps),
    )


# --------------------------------------------------------------------------- the shared agent

@dataclass
class Rig:
    """One agent for one thing, and another thing with jobs the agent must never run."""

    thing: Thing
    agent: AgentProcess
    runs: Path
    other: str
    other_jobs: tuple[str, str]
    samples: Samples
    dir: Path
    real_jobs: list[str] = field(default_factory=list)

    def topic(self, suffix: str, job: str = "ghost-job", thing: str | None = None) -> str:
        return f"$aws/things/{thing or self.thing.name}/jobs/{suffix.format(job=job)}"

    def ran(self) -> list[str]:
        return self.runs.read_text().splitlines() if self.runs.exists() else []

    def drain(self, label: str) -> None:
        """Wait until everything published so far has reached the agent.

        The emulator publishes in order on one connection; these two malformed notifications go
        last and prove that the notify streams were delivered and rejected with a log line.
        """
        emulator = self.thing.emulator
        mark = log_mark(self.agent)
        utf8 = b"\xff" * SENTINEL_SIZE
        wrong = json.dumps({"execution": {"jobId": 7}, "sentinel": label}).encode()
        emulator.publish_raw(self.topic("notify"), utf8)
        emulator.publish_raw(self.topic("notify-next"), wrong)
        wait_log_since(self.agent, mark,
                       f"ignoring malformed notify message bytes={SENTINEL_SIZE} ")
        wait_log_since(self.agent, mark,
                       f"ignoring malformed notify-next message bytes={len(wrong)} ")

    def record(self, name: str, published: list[tuple[str, bytes]]) -> Path:
        """The barrage, for replaying a failure (one JSON line per message, payload base64)."""
        path = self.dir / f"{name}.jsonl"
        with path.open("w") as out:
            for topic, payload in published:
                out.write(json.dumps({"topic": topic,
                                      "payload": base64.b64encode(payload).decode()}) + "\n")
        return path


@pytest.fixture(scope="module")
def rig(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """The module's agent (built like conftest's ``thing``, but once for the module)."""
    assert stack.emulator is not None
    suffix = uuid.uuid4().hex[:6]
    name, other = f"fault-payloads-{suffix}", f"fault-other-{suffix}"
    thing = Thing(name, stack.thing(name), stack)
    stack.emulator.create_thing(other)
    other_jobs = (f"other-active-{suffix}", f"other-queued-{suffix}")
    samples = real_wire_payloads(stack, other, other_jobs)
    directory = tmp_path_factory.mktemp("fault-payloads")
    runs = directory / "runs"
    agent = AgentProcess(stack, name, directory / "agent",
                         handlers_for(directory / "handlers", runs))
    with agent:
        agent.wait_ready()
        yield Rig(thing, agent, runs, other, other_jobs, samples, directory)


_SETTINGS = settings(deadline=None, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                            HealthCheck.large_base_example])


def check_survived(rig: Rig, mark: int, where: Path) -> None:
    """The agent is alive and its log since ``mark`` has no traceback, ERROR or CRITICAL."""
    assert rig.agent.process is not None
    assert rig.agent.process.poll() is None, (
        f"agent exited {rig.agent.process.returncode}; barrage in {where}:\n"
        f"{log_since(rig.agent, mark)[-5000:]}")
    problems = log_problems(log_since(rig.agent, mark))
    assert not problems, f"barrage in {where}:\n" + "\n--\n".join(problems[:5])


# --------------------------------------------------------------------------- tests

def test_barrage_on_every_topic_is_logged_and_survived(rig: Rig) -> None:
    """Hundreds of hostile messages, then a real job: it runs once, and only it ever ran.

    The barrage includes well-formed notifications for jobs that do not exist, for another
    thing's jobs (in the body, and on that thing's own topics) and replies carrying unknown
    clientTokens: none may start anything, since only the service's pending list does.
    """
    emulator = rig.thing.emulator
    mark = log_mark(rig.agent)
    future_job = rig.thing.j("after-barrage")
    topics = [rig.topic(t, job) for t in THING_TOPICS for job in ("ghost-job", future_job)]
    topics += [rig.topic(t, thing=rig.other) for t in OTHER_TOPICS]
    published: list[tuple[str, bytes]] = []

    @settings(_SETTINGS, max_examples=200)
    @given(topic=st.sampled_from(topics), payload=payloads(rig.samples, rig.thing.name))
    @example(topic=rig.topic("notify"), payload=b"[" * DEEP)
    @example(topic=rig.topic("notify-next"),
             payload=b'{"execution": ' + b"[" * 995 + b"]" * 995 + b"}")
    @example(topic=rig.topic("get/accepted"), payload=b"[" * DEEP)
    @example(topic=rig.topic("notify"), payload=b"")
    @example(topic=rig.topic("notify-next"), payload=b"null")
    def blast(topic: str, payload: bytes) -> None:
        published.append((topic, payload))
        emulator.publish_raw(topic, payload)

    blast()
    where = rig.record("barrage", published)
    rig.drain("after-barrage")

    # The agent still works: a real job queued now runs, once, to SUCCEEDED.
    emulator.create_job(future_job, [rig.thing.name], {"operation": "once"})
    rig.real_jobs.append(future_job)
    execution = wait_terminal(rig.agent, future_job)
    assert execution["status"] == "SUCCEEDED", (execution, where)
    assert execution["statusDetails"]["outcome"] == "succeeded"
    time.sleep(0.5)  # a duplicate start would show up in the runs file by now
    assert rig.ran() == rig.real_jobs, f"jobs started: {rig.ran()}; barrage in {where}"
    mine = {e["jobId"]: e["status"] for e in emulator.executions_for_thing(rig.thing.name)}
    assert mine == {future_job: "SUCCEEDED"}
    # The other thing's jobs were never touched: still as real_wire_payloads left them.
    assert emulator.execution(rig.other_jobs[0], rig.other)["status"] == "IN_PROGRESS"
    assert emulator.execution(rig.other_jobs[1], rig.other)["status"] == "QUEUED"

    log = log_since(rig.agent, mark)
    assert "ignoring malformed notify message" in log
    assert "ignoring message for another thing" not in log  # not even subscribed to them
    check_survived(rig, mark, where)


def test_barrage_while_a_job_runs_does_not_disturb_it(rig: Rig) -> None:
    """Garbage and lies about the running job (replies on its update topics, a replayed QUEUED
    notify-next, "nothing pending") while its handler runs and reports progress: the handler is
    neither stopped nor started again, and the job ends SUCCEEDED once with the real details."""
    emulator = rig.thing.emulator
    mark = log_mark(rig.agent)
    job = rig.thing.j("gated")
    gate = rig.dir / f"gate-{job}"
    emulator.create_job(job, [rig.thing.name], {"operation": "gated", "args": [str(gate)]})
    rig.real_jobs.append(job)
    wait_for(lambda: emulator.execution(job, rig.thing.name)["status"] != "QUEUED",
             f"{job} to be claimed", agent=rig.agent)
    # Progress updates are flowing: the agent has requests in flight on <job>/update now.
    wait_for(lambda: "progress" in emulator.execution(job, rig.thing.name)["statusDetails"],
             "progress reported", agent=rig.agent)
    assert rig.ran().count(job) == 1

    running = emulator.execution(job, rig.thing.name)
    replay = {"timestamp": int(time.time()), "execution": {
        **{k: running[k] for k in ("jobId", "thingName", "queuedAt", "lastUpdatedAt",
                                   "executionNumber")},
        "status": "QUEUED", "versionNumber": 1, "statusDetails": {},
        "jobDocument": {"operation": "gated", "args": [str(gate)]}}}
    lies = [
        replay,
        {"timestamp": int(time.time())},  # notify-next: nothing pending any more
        {"timestamp": int(time.time()), "jobs": {}},  # notify: nothing pending
        {"clientToken": str(uuid.uuid4()), "code": "TerminalStateReached", "message": "gone",
         "executionState": {"status": "CANCELED", "versionNumber": 99}},
        {"clientToken": str(uuid.uuid4()), "code": "VersionMismatch",
         "executionState": {"status": "IN_PROGRESS", "versionNumber": 99}},
        {"clientToken": str(uuid.uuid4()),
         "executionState": {"status": "CANCELED", "statusDetails": {}, "versionNumber": 99}},
    ]
    topics = [rig.topic(t, job) for t in ("{job}/update/accepted", "{job}/update/rejected",
                                          "notify", "notify-next", "{job}/get/accepted")]
    published: list[tuple[str, bytes]] = []

    @settings(_SETTINGS, max_examples=80)
    @given(topic=st.sampled_from(topics),
           payload=st.one_of(st.sampled_from(lies).map(_dumps),
                             payloads(rig.samples, rig.thing.name)))
    @example(topic=rig.topic("notify"), payload=b"[" * DEEP)
    def blast(topic: str, payload: bytes) -> None:
        published.append((topic, payload))
        emulator.publish_raw(topic, payload)

    blast()
    where = rig.record("while-running", published)
    rig.drain("while-running")
    time.sleep(0.5)  # let the syncs those notifications triggered finish
    assert emulator.execution(job, rig.thing.name)["status"] == "IN_PROGRESS", where
    assert "stopping handler" not in log_since(rig.agent, mark), where

    gate.touch()
    execution = wait_terminal(rig.agent, job)
    assert execution["status"] == "SUCCEEDED", (execution, where)
    details = execution["statusDetails"]
    assert details["outcome"] == "succeeded"
    assert details["reason"] == "exit code 0"
    assert details["exitCode"] == "0"
    assert details["outputHead"].rstrip().endswith("gate opened")  # short: no outputTail
    assert "progress" not in details  # the final report replaced the progress details
    assert all(1 <= len(v) <= 1024 for v in details.values())
    time.sleep(0.5)
    assert rig.ran() == rig.real_jobs, f"jobs started: {rig.ran()}; barrage in {where}"
    log = log_since(rig.agent, mark)
    assert log.count(f"handler finished job_id={job} ") == 1
    check_survived(rig, mark, where)


@pytest.mark.parametrize("kind", ["notify", "notify-next"])
def test_deeply_nested_notification_is_logged_as_malformed(rig: Rig, kind: str) -> None:
    """JSON nested deeper than the parser recurses is malformed JSON like any other.

    ``json.loads`` raises ``RecursionError`` (not a ``ValueError``) for it; if that escapes
    the stream callback, asyncio prints a traceback and the message is dropped without a word.
    """
    mark = log_mark(rig.agent)
    payload = b"[" * DEEP if kind == "notify" else b'{"execution": ' + b"[" * DEEP + b"}"
    rig.thing.emulator.publish_raw(rig.topic(kind), payload)
    rig.drain(f"deep-{kind}")
    log = log_since(rig.agent, mark)
    assert f"ignoring malformed {kind} message bytes={len(payload)} " in log, log[-3000:]
    check_survived(rig, mark, rig.dir)


# --------------------------------------------------------------------------- corrupted replies
#
# Each builder gets the agent's clientToken, the thing, the job and, for a request the emulator
# did serve first, its real reply; it returns the bytes published on ``<request>/accepted``.

Reply = Callable[[str, str, str, dict[str, Any] | None], bytes]


def _deep(token: str, thing: str, job: str, real: dict[str, Any] | None) -> bytes:
    nest = DEEP_BUT_CORRELATED
    return (f'{{"clientToken": "{token}", "queuedJobs": '.encode() + b"[" * nest + b"]" * nest
            + b"}")


def _summary_without_numbers(token: str, thing: str, job: str,
                             real: dict[str, Any] | None) -> bytes:
    return json.dumps({"clientToken": token, "timestamp": int(time.time()),
                       "inProgressJobs": [{"jobId": f"ghost-{job}"}], "queuedJobs": []}).encode()


def _execution_without_version(token: str, thing: str, job: str,
                               real: dict[str, Any] | None) -> bytes:
    now = int(time.time())
    return json.dumps({"clientToken": token, "timestamp": now, "execution": {
        "jobId": job, "thingName": thing, "status": "QUEUED", "executionNumber": 1,
        "queuedAt": now, "lastUpdatedAt": now, "statusDetails": {},
        "jobDocument": {"operation": "once"}}}).encode()


def _update_without_state(token: str, thing: str, job: str,
                          real: dict[str, Any] | None) -> bytes:
    assert real is not None
    return json.dumps({k: v for k, v in real.items() if k != "executionState"}).encode()


@pytest.mark.parametrize(("request_topic", "serve_first", "must_run", "reply"), [
    pytest.param("get", False, True, _deep, id="get-accepted-nested-990-deep"),
    pytest.param("get", False, True, _summary_without_numbers,
                 id="get-accepted-summary-without-numbers"),
    pytest.param("{job}/get", False, True, _execution_without_version,
                 id="describe-accepted-no-version"),
    pytest.param("{job}/update", True, False, _update_without_state,
                 id="claim-accepted-no-execution-state"),
])
def test_malformed_reply_to_the_agents_own_request_is_survived(
        thing: Thing, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request_topic: str,
        serve_first: bool, must_run: bool, reply: Reply) -> None:
    """A reply that does answer the agent's request (its clientToken) but is malformed.

    Replies with unknown tokens never reach the agent's code (the CRT drops them), so this is
    the one way a malformed reply gets in: the emulator answers the agent's first matching
    request with ``reply``, either instead of serving it (the request did nothing: the agent
    must retry and run the job, once) or after serving it (the claim happened in the cloud but
    the reply lacks the new version: the agent may run the job or leave it to the step timer,
    but never run it twice). Either way the agent must stay up: a reply is data, not a reason
    to stop the device's only job runner.
    """
    emulator = thing.emulator
    job = thing.j("reply")
    topic = f"$aws/things/{thing.name}/jobs/{request_topic.format(job=job)}"
    serve = emulator.service.handle
    corrupted = threading.Event()

    def handle(request: str, payload: bytes) -> list[Any]:  # runs on the emulator's thread
        if request != topic or corrupted.is_set():
            return serve(request, payload)
        corrupted.set()
        token = json.loads(payload)["clientToken"]
        real, rest = None, []
        if serve_first:
            answer, *rest = serve(request, payload)
            assert answer.topic == f"{request}/accepted", answer
            real = answer.payload
        emulator.publish_raw(f"{request}/accepted", reply(token, thing.name, job, real))
        return rest  # the notifications the real request caused, if any

    runs = tmp_path / "runs"
    # Queued before the agent starts: its start-up sync takes the job through the pending list,
    # a describe and the claim (a job queued while it runs is claimed from notify-next, with
    # neither get nor describe).
    monkeypatch.setattr(emulator.service, "handle", handle)
    emulator.create_job(job, [thing.name], {"operation": "once"})
    with AgentProcess(thing.stack, thing.name, tmp_path / "agent",
                      handlers_for(tmp_path / "handlers", runs)) as agent:
        wait_for(corrupted.is_set, f"the agent to request {topic}", agent=agent)
        if must_run:
            execution = wait_terminal(agent, job)
            assert execution["status"] == "SUCCEEDED", execution
        else:
            time.sleep(2.5)  # past the first sync retry (backoff starts at 1 s)
        time.sleep(0.3)
        assert agent.process is not None and agent.process.poll() is None, agent.log()[-3000:]
        ran = runs.read_text().splitlines() if runs.exists() else []
        assert ran == [job] if must_run else ran in ([], [job]), ran
        problems = log_problems(agent.log())
        assert not problems, "\n--\n".join(problems[:5])
