"""Which program a step runs: safe for a root agent that takes its documents from the network.

A job document names a handler, a directory or a command; the device's config decides whether
any of that may run. Every refusal is a :class:`DocumentError` (the job is REJECTED and nothing
runs) whose reason names the setting that would allow it.

runHandler (``input.handler``, ``input.path``):

- ``path`` "default", empty or absent: a YAML handler of that name (its timeout, user and
  environment); else the file ``<handler_dir>/<handler>``, with the owner and mode checks YAML
  handler programs get; else, only if the name is in ``run_command.allow``, the program of that
  name on PATH (Device Client's ``echo`` sample).
- any other ``path``: only a directory listed in ``handler_paths`` (or ``handler_dir`` itself),
  and the file there passes the same checks.
- argv is Device Client's: the program, then ``runAsUser`` (an empty string when unset), then
  ``args``; handlers written for Device Client read the user from ``$1``. The step runs as the
  agent's user (or its YAML handler's ``user:``).

runCommand: the program must be in ``run_command.allow`` (a name found on PATH or an absolute
path; ``["*"]`` allows any); ``runAsUser`` must be the agent's own user or one listed in
``run_command.users``, and the agent switches to it itself, never through sudo.

The filesystem and the user database are reached through :class:`Host`, so the rules above are
tested with a fake one.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path
from typing import Protocol

from agent.config import SAFE_PATH, Config
from agent.documents.plan import DocumentError, Step
from agent.paths import program_problem

__all__ = ["Host", "SystemHost", "command_step", "handler_step"]

_MAX_FILE_NAME = 255


class Host(Protocol):
    """What lookup needs to know about the device."""

    def exists(self, path: Path) -> bool: ...

    def program_problem(self, program: Path) -> str | None: ...

    def which(self, name: str, search: str) -> str | None: ...

    def user_exists(self, name: str) -> bool: ...

    def agent_user(self) -> str | None: ...


class SystemHost:
    """This device."""

    def exists(self, path: Path) -> bool:
        return os.path.lexists(path)

    def program_problem(self, program: Path) -> str | None:
        return program_problem(program)

    def which(self, name: str, search: str) -> str | None:
        import shutil  # here, not at the top: shutil loads bz2 and lzma (0.65 MB of idle RSS)

        return shutil.which(name, path=search)

    def user_exists(self, name: str) -> bool:
        try:
            pwd.getpwnam(name)
        except KeyError:
            return False
        return True

    def agent_user(self) -> str | None:
        try:
            return pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:
            return None


def handler_step(name: str, handler: str, args: tuple[str, ...], path: str, run_as: str,
                 config: Config, host: Host, *, what: str = "handler") -> Step:
    """The runHandler step that runs ``handler``; ``what`` is how the document called it."""
    if (not handler or "/" in handler or handler in (".", "..") or "\0" in handler
            or len(handler) > _MAX_FILE_NAME):
        raise DocumentError(f"{what} {handler[:64]!r} must be a plain file name (no '/', not "
                            "'.' or '..')")
    _check_user(run_as, host)
    dc_args = (run_as, *args)  # Device Client's argv: runAsUser first, "" when unset
    if path in ("", "default"):
        yaml = config.handlers.get(handler)
        if yaml is not None:
            return Step(name, "handler", (*yaml.command, *dc_args), yaml.timeout, yaml.user,
                        yaml.environment, rerun=yaml.idempotent, handler=handler,
                        verify=(*yaml.verify, *dc_args) if yaml.verify else None)
        script = config.handler_dir / handler
        if host.exists(script):
            return _script(name, script, dc_args, config, host)
        if _allowed(handler, config.run_command.allow):
            search = _search_path(config)
            found = host.which(handler, search)
            if found is None:
                raise DocumentError(f"{what} {handler[:64]!r} is allowed by run_command.allow "
                                    f"but is not found on PATH ({search})")
            _check_program(Path(found), host)
            return Step(name, "program", (found, *dc_args), config.handler_timeout,
                        environment=config.handler_environment)
        known = ", ".join(sorted(config.handlers)) or "none"
        raise DocumentError(
            f"no handler for {what} {handler[:64]!r} on this device (configured: {known[:300]}; "
            f"no such script in handler_dir {str(config.handler_dir)[:200]}; not in "
            "run_command.allow, which would run it from PATH)")
    if not path.startswith("/"):
        raise DocumentError(f"path {path[:200]!r} must be an absolute directory listed in "
                            "handler_paths in the agent's config")
    directory = Path(os.path.normpath(path))
    allowed = {Path(os.path.normpath(d)) for d in (config.handler_dir, *config.handler_paths)}
    if directory not in allowed:
        raise DocumentError(f"path {path[:200]!r} is not one of this device's handler_paths: "
                            "add it to handler_paths in the agent's config to run handlers "
                            "from there")
    return _script(name, directory / handler, dc_args, config, host)


def command_step(name: str, argv: tuple[str, ...], run_as: str, config: Config,
                 host: Host) -> Step:
    """The runCommand step that runs ``argv`` (already split), if the config allows it."""
    program = argv[0]
    if "/" in program and not program.startswith("/"):
        raise DocumentError(f"runCommand program {program[:64]!r} must be a name found on PATH "
                            "or an absolute path")
    search = _search_path(config)
    resolved = program if program.startswith("/") else host.which(program, search)
    if not _command_allowed(program, resolved, config.run_command.allow, host, search):
        raise DocumentError(f"runCommand program {program[:64]!r} is not allowed on this "
                            "device: add it to run_command.allow in the agent's config")
    if resolved is None:
        raise DocumentError(f"runCommand program {program[:64]!r} is not found on PATH "
                            f"({search})")
    _check_program(Path(resolved), host)
    _check_user(run_as, host)
    user = None
    if run_as and run_as != host.agent_user():
        if run_as not in config.run_command.users:
            raise DocumentError(f"runAsUser {run_as[:64]!r} is not allowed for runCommand on "
                                "this device: add it to run_command.users in the agent's "
                                "config")
        user = run_as
    return Step(name, "command", (resolved, *argv[1:]), config.run_command.timeout, user,
                config.handler_environment)


def _script(name: str, script: Path, dc_args: tuple[str, ...], config: Config,
            host: Host) -> Step:
    """A Device Client style script: run again after an agent crash, as Device Client does
    (its reboot.sh and restart-services.sh tell a second run from the first themselves)."""
    _check_program(script, host)
    return Step(name, "script", (str(script), *dc_args), config.handler_timeout,
                environment=config.handler_environment, rerun=True)


def _check_program(program: Path, host: Host) -> None:
    problem = host.program_problem(program)
    if problem:
        raise DocumentError(f"{problem} (refused for this job; nothing ran)")


def _check_user(run_as: str, host: Host) -> None:
    if run_as and not host.user_exists(run_as):
        raise DocumentError(f"runAsUser {run_as[:64]!r}: no such user on this device")


def _command_allowed(program: str, resolved: str | None, allow: tuple[str, ...], host: Host,
                     search: str) -> bool:
    """Listed by the name given, by the path it resolves to, or (for an absolute path given)
    by a name that resolves to that same path."""
    if _allowed(program, allow) or (resolved is not None and resolved in allow):
        return True
    return program.startswith("/") and any(
        not entry.startswith("/") and host.which(entry, search) == program for entry in allow)


def _allowed(name: str, allow: tuple[str, ...]) -> bool:
    return "*" in allow or name in allow


def _search_path(config: Config) -> str:
    return config.handler_environment.get("PATH", SAFE_PATH)
