"""The ``iot-jobs-agent`` command.

Every user mistake ends as one line ``<ExceptionName>: <message>`` on stderr and an exit code a
supervisor can act on (sysexits): 78 for configuration errors, so systemd's
``RestartPreventExitStatus=78`` stops a crash loop on a bad config. A traceback means a bug.

The inspection commands (``status``, ``jobs``, ``log``) only read: the journal through
:mod:`agent.inspect`, the running agent's state file through :mod:`agent.statefile`; they never
talk to the agent, so an idle agent stays asleep. ``status`` exits as ``systemctl status`` does:
0 running, 3 not running, 4 cannot tell.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent._version import __version__
from agent.config import DEFAULT_CONFIG_PATH, Config, check_files, load_checked, load_config
from agent.errors import (
    AgentError,
    ConfigError,
    ConnectionFailedError,
    JournalError,
    NotAuthorizedError,
    NotReadableError,
    RequestFailedError,
    RequestTimeoutError,
    SandboxError,
    UnknownJobError,
)
from agent.logs import configure_logging

if TYPE_CHECKING:
    from agent.inspect import Target

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILURE",
    "EXIT_NOINPUT",
    "EXIT_NOPERM",
    "EXIT_NOT_RUNNING",
    "EXIT_OK",
    "EXIT_STATUS_UNKNOWN",
    "EXIT_TEMPFAIL",
    "EXIT_UNAVAILABLE",
    "main",
]

EXIT_OK = 0
EXIT_FAILURE = 1  # the service rejected the request; no such job in the journal
EXIT_NOT_RUNNING = 3  # status: the agent is not running (LSB, as systemctl status)
EXIT_STATUS_UNKNOWN = 4  # status: cannot tell (the state file or journal is unreadable)
EXIT_NOINPUT = 66  # EX_NOINPUT: the journal (or a job's log) is missing or unreadable
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: could not connect
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: timed out / not delivered; trying again may work
EXIT_NOPERM = 77  # EX_NOPERM: the broker refused a publish/subscribe (the IoT policy)
EXIT_CONFIG = 78  # EX_CONFIG: fix the configuration


def exit_code_for(exc: AgentError) -> int:
    if isinstance(exc, ConfigError):
        return EXIT_CONFIG
    if isinstance(exc, ConnectionFailedError):
        return EXIT_UNAVAILABLE
    if isinstance(exc, NotReadableError):
        return EXIT_NOINPUT
    if isinstance(exc, UnknownJobError):
        return EXIT_FAILURE
    if isinstance(exc, NotAuthorizedError):
        return EXIT_NOPERM
    if isinstance(exc, RequestTimeoutError | RequestFailedError | JournalError):
        return EXIT_TEMPFAIL
    return EXIT_FAILURE


def _load(path: Path) -> Config:
    return load_checked(path)


async def _pending(config: Config) -> dict[str, object]:
    from agent.connection import Connection  # imported late: keeps `--help` free of awscrt
    from agent.jobs import JobsClient

    connection = Connection(config.mqtt, config.client_id)
    jobs = JobsClient(connection, request_timeout=config.mqtt.request_timeout)
    async with connection:
        return await jobs.get_pending_job_executions(thingName=config.thing_name)


def _without_python_ssl() -> None:
    """Keep Python's ``ssl`` out of the daemon: 5 MB of its idle RSS (issue 12).

    awscrt does TLS in C; nothing in ``run`` uses Python's ``ssl``. But asyncio imports it
    whenever it can, and with it OpenSSL's libssl and libcrypto, mapped and relocated. asyncio
    (``base_events``, ``sslproto``, ``selector_events``) treats a missing ``ssl`` as "no TLS
    support", so marking it missing before asyncio is first imported leaves it out. Only for
    ``run``, and only when nothing imported asyncio (and so ``ssl``) already.
    """
    if "asyncio" not in sys.modules:
        sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]  # then "import ssl" fails


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    _without_python_ssl()
    # Imported after the config: a config error needs none of it.
    import asyncio

    from agent.app import EXIT_RESTART, run_agent

    faulthandler.enable()  # a watchdog SIGABRT then shows where the loop was stuck

    level = "DEBUG" if args.verbose > 1 else config.log_level
    configure_logging(level, json_lines=config.log_format == "json")
    code = asyncio.run(run_agent(config))
    if code == EXIT_RESTART:  # a job step asked for it: the same command, in the same process
        command = [sys.executable, "-m", "agent", *sys.argv[1:]]
        logging.getLogger("agent.app").info("restarting: %s", " ".join(command))
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, command)
    return code


def cmd_helper(args: argparse.Namespace) -> int:
    import asyncio

    from agent.helper import run_helper

    configure_logging("INFO")
    return asyncio.run(run_helper(args.config, args.socket, args.agent_user))


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    problems = check_files(config)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return EXIT_CONFIG
    handlers = ", ".join(sorted(config.handlers)) or "none"
    commands = "on (" + ", ".join(config.commands.formats) + ")" if config.commands.enabled \
        else "off"
    from agent.runner import format_duration
    session = (f"kept {format_duration(config.mqtt.session_expiry)} across restarts"
               if config.mqtt.session_expiry > 0 else "clean at each start")
    from agent.hygiene import Secret
    secrets = sorted(f"{where}.{name}" for where, env in (
        ("handler_environment", config.handler_environment),
        *((f"handlers.{n}.environment", h.environment) for n, h in config.handlers.items()))
        for name, value in env.items() if isinstance(value, Secret))
    hidden = (f", secret environment (redacted from logs and statusDetails): "
              f"{', '.join(secrets)}") if secrets else ""
    print(f"{args.config}: OK (thing {config.thing_name}, handlers: {handlers}, "
          f"commands: {commands}, mqtt session: {session}{hidden})")
    return EXIT_OK


def cmd_pending(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if args.verbose == 0:  # a refusal is the error line itself; the log would say it twice
        logging.getLogger("agent.policy").setLevel(logging.CRITICAL)
    import asyncio

    result = asyncio.run(_pending(config))
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return EXIT_OK


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _target(path: Path) -> Target:
    """Where the agent's state is, from its config; from a broken config too (with a warning),
    so that a person who broke it still sees what the running agent does."""
    from agent.inspect import Target

    try:
        return Target.of(load_config(path))
    except ConfigError:
        if not path.is_file() or not os.access(path, os.R_OK):
            raise  # no config at all: one line saying so
        target = Target.lenient(path)
        print(f"warning: {path} has problems (see `iot-jobs-agent check-config`); its "
              f"state_dir is {target.state_dir}", file=sys.stderr)
        return target


def cmd_status(args: argparse.Namespace) -> int:
    from agent.inspect import status_report
    from agent.views import render_status

    config = _target(args.config)
    now = time.time()
    try:
        report = status_report(config, now)
    except NotReadableError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_STATUS_UNKNOWN
    if args.json:
        _print_json(report)
    else:
        print("\n".join(render_status(report, now)))
    return EXIT_OK if report["running"] else EXIT_NOT_RUNNING


def cmd_jobs(args: argparse.Namespace) -> int:
    from agent.inspect import JournalReader, executions, journal_path, logs_dir
    from agent.statefile import read_state, state_path
    from agent.views import render_jobs

    config = _target(args.config)
    with JournalReader(journal_path(config.state_dir)) as db:
        found = executions(db, limit=args.limit or None, status=args.status)
    logs = logs_dir(config.state_dir, read_state(state_path(config.state_dir)))
    items = [e.to_json(logs) for e in found]
    if args.json:
        _print_json(items)
    else:
        print("\n".join(render_jobs(items, time.time())))
    return EXIT_OK


_JOB_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def cmd_log(args: argparse.Namespace) -> int:
    from agent.inspect import JournalReader, copy_log, execution, journal_path, log_path, logs_dir
    from agent.procfs import boot_id
    from agent.statefile import liveness, read_state, state_path

    if not _JOB_ID.fullmatch(args.job_id):
        raise UnknownJobError(f"{args.job_id!r} is not a job id (1-64 letters, digits, '_', '-')")
    config = _target(args.config)
    state_file = state_path(config.state_dir)
    with JournalReader(journal_path(config.state_dir)) as db:
        found = execution(db, args.job_id, args.execution)
        path = log_path(logs_dir(config.state_dir, read_state(state_file)), found.job_id,
                        found.execution_number, found.archived_id)

        def running() -> bool:
            current = execution(db, found.job_id, found.execution_number)
            return current.active and liveness(
                read_state(state_file), current_boot=lambda: boot_id(config.boot_id_path)).running

        follow = args.follow and running()
        if not path.exists() and not follow:
            raise NotReadableError(
                f"no log for job {found.job_id} execution {found.execution_number} at {path}: "
                + ("its handler has not started yet" if found.active
                   else "its handler never ran, or the log was removed"))
        copy_log(path, sys.stdout.buffer, running if follow else None)
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    from agent.inspect import Target
    from agent.statefile import liveness, read_state, state_path

    path = state_path(Target.lenient(args.config).state_dir)
    state = read_state(path)
    alive = liveness(state)
    if state is None or not alive.running or (args.pid and state.get("pid") != args.pid):
        if args.pid:
            os.kill(args.pid, signal.SIGHUP)
            print(f"sent SIGHUP to pid {args.pid}; no state file of it at {path}, so its "
                  "verdict is only in its log")
            return EXIT_OK
        print(f"the agent is not running ({alive.why})", file=sys.stderr)
        return EXIT_NOT_RUNNING
    before = (state.get("reload") or {}).get("generation", 0)
    os.kill(int(state["pid"]), signal.SIGHUP)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        state = read_state(path)
        verdict = (state or {}).get("reload") or {}
        if verdict.get("generation", 0) > before:
            if verdict.get("ok"):
                print(f"reloaded {(state or {}).get('config')}: {verdict.get('message')}")
                return EXIT_OK
            print(f"reload refused: {verdict.get('message')}; the agent keeps running its "
                  "previous configuration (every problem is in its log)", file=sys.stderr)
            return EXIT_CONFIG
        if not liveness(state).running:
            print("the agent stopped before it answered the reload", file=sys.stderr)
            return EXIT_FAILURE
    print(f"the agent did not answer the reload within {args.timeout:g}s; see its log",
          file=sys.stderr)
    return EXIT_TEMPFAIL


def cmd_sandbox(args: argparse.Namespace) -> int:
    from agent.sandbox.demo import default_directory, run_sandbox

    directory = default_directory() if args.dir is None else args.dir
    policy = None
    if args.policy is not None:
        try:
            policy = args.policy.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--policy {args.policy}: cannot read it ({exc})") from None
    try:
        return run_sandbox(directory, once=args.once, agent=not args.no_agent, policy=policy,
                           policy_name=None if args.policy is None else str(args.policy))
    except RuntimeError as exc:  # the sandbox's own set-up failures (mosquitto/openssl missing)
        raise SandboxError(str(exc)) from exc


_STATUSES = ("QUEUED", "IN_PROGRESS", "SUCCEEDED", "FAILED", "TIMED_OUT", "REJECTED",
             "REMOVED", "CANCELED")


def _status(text: str) -> str:
    if text.upper() not in _STATUSES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a job execution status; one of "
                                         f"{', '.join(_STATUSES)}")
    return text.upper()


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def _positive(text: str) -> int:
    value = _count(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter, told the terminal's width rather than asking ``shutil``.

    argparse imports ``shutil`` for that when it builds each parser, and ``shutil`` imports
    ``bz2`` and ``lzma``: 0.65 MB of the daemon's idle RSS (issue 12). The same answer as
    ``shutil.get_terminal_size``: ``$COLUMNS``, else the terminal's, else 80.
    """

    def __init__(self, prog: str, **kwargs: Any) -> None:
        if kwargs.get("width") is None:
            try:
                columns = int(os.environ.get("COLUMNS", "0")) or \
                    os.get_terminal_size(sys.__stdout__.fileno()).columns
            except (AttributeError, ValueError, OSError):
                columns = 80
            kwargs["width"] = (columns or 80) - 2
        super().__init__(prog, **kwargs)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser (and its subcommands' parsers) with :class:`_Formatter`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="iot-jobs-agent", description="Run AWS IoT Jobs on this device.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output on stderr (-v info, -vv debug)")
    parser.add_argument("-V", "--version", action="version",
                        version=f"iot-jobs-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH,
                       help=f"agent config file (default {DEFAULT_CONFIG_PATH})")

    p = sub.add_parser("run", help="run the agent: execute this thing's jobs until stopped")
    with_config(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate the config file and the files it names; "
                                            "print every problem with its line")
    with_config(p)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("pending", help="print this thing's pending job executions as JSON "
                                       "(boto3 get_pending_job_executions shape)")
    with_config(p)
    p.set_defaults(func=cmd_pending)

    p = sub.add_parser("status", help="is the agent running and connected, what is it doing; "
                                      "exit 0 running, 3 not running, 4 cannot tell")
    with_config(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("jobs", help="job executions in the journal, newest first")
    with_config(p)
    p.add_argument("--json", action="store_true",
                   help="print a JSON list (boto3's key names: jobId, executionNumber, status)")
    p.add_argument("--limit", type=_count, default=20, metavar="N",
                   help="at most N executions (default 20; 0 for all)")
    p.add_argument("--status", type=_status, metavar="S",
                   help="only this status: IN_PROGRESS, SUCCEEDED, FAILED, REJECTED...")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("log", help="a job's handler output (its newest execution by default)")
    with_config(p)
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--execution", type=_positive, metavar="N", help="this execution number")
    p.add_argument("--follow", "-f", action="store_true",
                   help="keep printing while the job runs; return when it ends")
    p.set_defaults(func=cmd_log)

    p = sub.add_parser("reload", help="make the running agent re-read its config (SIGHUP) and "
                                      "wait for its verdict: exit 0 applied, 78 refused")
    with_config(p)
    p.add_argument("--pid", type=_positive, metavar="PID",
                   help="the agent's pid (systemd's $MAINPID), if its state file is not found")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long to wait for the verdict (default 30)")
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("helper", help="the privileged helper (root): starts configured "
                                      "handlers for the unprivileged agent (systemd starts it "
                                      "from iot-jobs-agent-helper.socket)")
    with_config(p)
    p.add_argument("--socket", type=Path, default=None, metavar="PATH",
                   help="listen here instead of on the socket systemd passes")
    p.add_argument("--agent-user", default="iot-jobs-agent", metavar="USER",
                   help="the agent's user, allowed to connect besides root")
    p.set_defaults(func=cmd_helper)

    # Not `from agent.sandbox.demo import DEFAULT_SANDBOX_DIR` for the default: that imports the
    # whole sandbox (broker, emulator, HTTP fronts) into every agent process, 2.8 MB of resident
    # memory and ~30 ms of start-up for one path (issue 5's benchmarks). cmd_sandbox resolves it.
    p = sub.add_parser("sandbox", help="run a local AWS IoT Jobs sandbox (mosquitto + emulator)")
    p.add_argument("--dir", type=Path, default=None,
                   help="where certificates, configs and logs go (default .sandbox)")
    p.add_argument("--once", action="store_true",
                   help="run the demo job, then exit 0 if it SUCCEEDED")
    p.add_argument("--no-agent", action="store_true",
                   help="run only the cloud side (broker + emulator); run the agent yourself")
    p.add_argument("--policy", type=Path, default=None, metavar="FILE",
                   help="an AWS IoT policy document (JSON) to attach to the sandbox thing "
                        "instead of the default ones (see the README for the supported subset)")
    p.set_defaults(func=cmd_sandbox)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    levels = {0: "ERROR", 1: "INFO"}
    configure_logging(levels.get(args.verbose, "DEBUG"))
    try:
        return int(args.func(args))
    except AgentError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        return 130
