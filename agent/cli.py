"""The ``iot-jobs-agent`` command.

Every user mistake ends as one line ``<ExceptionName>: <message>`` on stderr and an exit code a
supervisor can act on (sysexits): 78 for configuration errors, so systemd's
``RestartPreventExitStatus=78`` stops a crash loop on a bad config. A traceback means a bug.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from agent.config import DEFAULT_CONFIG_PATH, Config, check_files, load_config
from agent.errors import (
    AgentError,
    ConfigError,
    ConnectionFailedError,
    JournalError,
    RequestFailedError,
    RequestTimeoutError,
    SandboxError,
)
from agent.logs import configure_logging

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_TEMPFAIL",
    "EXIT_UNAVAILABLE",
    "main",
]

EXIT_OK = 0
EXIT_FAILURE = 1  # the service rejected the request
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: could not connect
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: timed out / not delivered; trying again may work
EXIT_CONFIG = 78  # EX_CONFIG: fix the configuration


def exit_code_for(exc: AgentError) -> int:
    if isinstance(exc, ConfigError):
        return EXIT_CONFIG
    if isinstance(exc, ConnectionFailedError):
        return EXIT_UNAVAILABLE
    if isinstance(exc, RequestTimeoutError | RequestFailedError | JournalError):
        return EXIT_TEMPFAIL
    return EXIT_FAILURE


def _load(path: Path) -> Config:
    config = load_config(path)
    problems = check_files(config)
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else "; ".join(problems), problems)
    return config


async def _pending(config: Config) -> dict[str, object]:
    from agent.connection import Connection  # imported late: keeps `--help` free of awscrt
    from agent.jobs import JobsClient

    connection = Connection(config.mqtt, config.client_id)
    jobs = JobsClient(connection, request_timeout=config.mqtt.request_timeout)
    async with connection:
        return await jobs.get_pending_job_executions(thingName=config.thing_name)


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    from agent.app import run_agent  # after the config: a config error needs none of it

    faulthandler.enable()  # a watchdog SIGABRT then shows where the loop was stuck

    level = "DEBUG" if args.verbose > 1 else config.log_level
    configure_logging(level, json_lines=config.log_format == "json")
    return asyncio.run(run_agent(config))


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
    print(f"{args.config}: OK (thing {config.thing_name}, handlers: {handlers}, "
          f"commands: {commands})")
    return EXIT_OK


def cmd_pending(args: argparse.Namespace) -> int:
    config = _load(args.config)
    result = asyncio.run(_pending(config))
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return EXIT_OK


def cmd_sandbox(args: argparse.Namespace) -> int:
    from agent.sandbox.demo import DEFAULT_SANDBOX_DIR, run_sandbox

    directory = DEFAULT_SANDBOX_DIR if args.dir is None else args.dir
    try:
        return run_sandbox(directory, once=args.once, agent=not args.no_agent)
    except RuntimeError as exc:  # the sandbox's own set-up failures (mosquitto/openssl missing)
        raise SandboxError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iot-jobs-agent", description="Run AWS IoT Jobs on this device.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output on stderr (-v info, -vv debug)")
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
