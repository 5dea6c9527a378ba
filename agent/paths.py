"""Whether a program or directory the config names may be trusted, and whether the agent's own
state directories are private: the one place that decides both.

A root agent runs the programs its config names. Whoever can replace such a program, or any
directory on the way to it, or the target of a symlink on that way, can run code as root. So
every path is walked from ``/`` down, component by component, following each symlink to its
target (whose directories are walked in turn); every directory and the file itself must be
owned by root or by the agent's user and writable by nobody else. A sticky world-writable
directory such as ``/tmp`` is refused too: its entries come and go (tmpfiles cleans it, a reboot
empties it), and whoever creates a missing one first owns it.

The state directories hold the journal (which names process groups recovery signals) and the
per-job logs (which root appends to): they must belong to the agent's user and be closed to
others. ``state_dir``, its ``jobs/`` and ``commands/`` are 0711: others may pass through, to
reach a work directory that belongs to them (a ``user:`` handler's ``$JOB_WORK_DIR``), but may not
list them; every entry in them is private by its own mode. ``logs/`` is 0750.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LOGS_MODE", "STATE_MODE", "StateDir", "directory_problem", "ensure_state_dir",
           "job_work_dir", "program_problem", "state_dir_problem", "state_dirs", "trusted_uids"]

STATE_MODE = 0o711
"""state_dir, jobs/, commands/: traverse-only for others (see the module docstring)."""
LOGS_MODE = 0o750
"""logs/ and LOGS_DIRECTORY: the agent's group may read the job logs, nobody else."""
_MAX_LINKS = 40  # as the kernel's MAXSYMLINKS
_MISSING = " does not exist: "


def trusted_uids() -> frozenset[int]:
    """Who may own what the agent runs: root and the agent's own user."""
    return frozenset({0, os.geteuid()})


def program_problem(program: Path | str, kind: str = "handler program", *,
                    missing_ok: bool = False) -> str | None:
    """Why ``program`` must not be run (None if it may): missing, not an executable regular
    file, or open to tampering anywhere along its path (see the module docstring).

    ``missing_ok``: a program that does not exist (behind directories that are safe, so only
    root can add it) is no problem yet; running it will fail and say so.
    """
    problem, info, real = _walk(Path(program), kind)
    if problem is not None:
        if missing_ok and _MISSING in problem:
            return None
        return problem
    assert info is not None
    if not stat.S_ISREG(info.st_mode):
        return f"{kind} {program} is not a regular file"
    if not os.access(real, os.X_OK):
        return f"{kind} {program} is not executable: run `chmod 755 {real}`"
    return None


def directory_problem(directory: Path | str, kind: str = "directory") -> str | None:
    """Why programs in ``directory`` must not be run (None if they may): anyone who can add or
    replace a file there, or replace a directory on the way, can run code as the agent."""
    problem, info, _ = _walk(Path(directory), kind, "create it or fix the path")
    if problem is not None:
        return problem
    assert info is not None
    if not stat.S_ISDIR(info.st_mode):
        return f"{directory} is not a directory"
    return None


def _walk(path: Path, kind: str, fix_missing: str = "install it or fix the path",
          ) -> tuple[str | None, os.stat_result | None, str]:
    """Resolve ``path`` by hand, checking each directory passed and the final target.

    Returns (problem, the final target's stat, the final target's real path).
    """
    if not path.is_absolute():
        return f"{kind} {path} must be an absolute path", None, str(path)
    uids = trusted_uids()
    current = "/"
    pending = [p for p in path.parts[1:]]
    links = 0
    via = ""
    try:
        info = os.lstat(current)
    except OSError as exc:
        return f"{kind} {path} cannot be checked: / : {exc.strerror}", None, current
    while True:
        problem = _tamper(kind, path, current, info, uids, final=not pending, via=via)
        if problem is not None:
            return problem, None, current
        if not pending:
            return None, info, current
        name = pending.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            current = os.path.dirname(current) or "/"
            info = os.lstat(current)
            continue
        candidate = os.path.join(current, name)
        try:
            info = os.lstat(candidate)
        except FileNotFoundError:
            what = f"{kind} {path}" + (f" (through {via})" if via else "")
            return f"{what}{_MISSING}{fix_missing}", None, candidate
        except OSError as exc:
            return f"{kind} {path} cannot be checked: {candidate}: {exc.strerror}", None, \
                candidate
        if stat.S_ISLNK(info.st_mode):
            links += 1
            if links > _MAX_LINKS:
                return f"{kind} {path}: too many symlinks (a loop?) at {candidate}", None, \
                    candidate
            target = os.readlink(candidate)
            via = f"symlink {candidate} -> {target}"
            if target.startswith("/"):
                current = "/"
                info = os.lstat(current)
            else:
                info = os.lstat(current)
            pending[:0] = [p for p in Path(target).parts if p != "/"]
            continue
        if pending and not stat.S_ISDIR(info.st_mode):
            return f"{kind} {path}: {candidate} is not a directory", None, candidate
        current = candidate


def _tamper(kind: str, path: Path, where: str, info: os.stat_result, uids: frozenset[int], *,
            final: bool, via: str) -> str | None:
    """Owned by a trusted user and writable by nobody else; for a directory on the way, the
    sticky bit does not help (module docstring)."""
    if final:
        subject = f"{kind} {path}" + (f" (through {via}, target {where})" if via else "")
        fix_target = where
    else:
        subject = f"{kind} {path}: directory {where} on its path" + (
            f" (through {via})" if via else "")
        fix_target = where
    if info.st_uid not in uids:
        return (f"{subject} is owned by uid {info.st_uid}, not root or the agent's user: run "
                f"`chown root {fix_target}` (and check what it holds), or move the file to a "
                f"directory owned by root")
    mode = stat.S_IMODE(info.st_mode)
    if info.st_mode & 0o022:
        if stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX:
            return (f"{subject} is writable by others (mode {mode:04o}; sticky, but anyone may "
                    f"create what is missing there): move it to a directory that only root "
                    f"can write, such as /usr/local/lib")
        return (f"{subject} is writable by group or others (mode {mode:04o}): run "
                f"`chmod go-w {fix_target}`")
    return None


# --------------------------------------------------------------------------- state directories


def job_work_dir(state_dir: Path | str, stem: str, *, command: bool = False) -> Path:
    """A job execution's (``<job>.<n>``) or a command's work directory: where the runner puts
    it, and what recovery recognises a leftover handler by (its ``$JOB_WORK_DIR``)."""
    return Path(state_dir) / ("commands" if command else "jobs") / stem


@dataclass(frozen=True)
class StateDir:
    """One directory the agent keeps private: where, how open it may be, and who it is."""

    path: Path
    mode: int  # created with exactly this mode; an existing one may be stricter
    what: str  # how messages name it: "state_dir", "state_dir/jobs", "LOGS_DIRECTORY"


def job_logs_dir(state_dir: Path | str) -> Path:
    """Where per-job logs go: where systemd's LogsDirectory= points, else ``state_dir/logs``."""
    return Path(os.environ.get("LOGS_DIRECTORY", "") or Path(state_dir) / "logs")


def state_dirs(state_dir: Path, logs: Path | None = None) -> list[StateDir]:
    """The agent's private directories, parents first; ``logs``: LOGS_DIRECTORY if set."""
    base = Path(state_dir)
    dirs = [StateDir(base, STATE_MODE, "state_dir"),
            StateDir(base / "jobs", STATE_MODE, "state_dir/jobs"),
            StateDir(base / "commands", STATE_MODE, "state_dir/commands"),
            StateDir(base / "logs", LOGS_MODE, "state_dir/logs")]
    if logs is not None and Path(logs) != base / "logs":
        dirs.append(StateDir(Path(logs), LOGS_MODE, "LOGS_DIRECTORY"))
    return dirs


def state_dir_problem(entry: StateDir) -> str | None:
    """Why an existing state directory must not be used (None if it may, or is missing).

    Anyone who can write it can plant a journal naming any process group (recovery signals it)
    or a log symlink (root appends to its target), so it must be a real directory owned by the
    agent's user and grant others nothing beyond ``entry.mode``.
    """
    try:
        info = os.lstat(entry.path)
    except (FileNotFoundError, NotADirectoryError):
        return None  # created at start (or its creation fails and says why)
    except OSError as exc:
        return f"{entry.what} {entry.path} cannot be checked: {exc.strerror}"
    if stat.S_ISLNK(info.st_mode):
        return (f"{entry.what} {entry.path} is a symlink: point the setting at the real "
                f"directory, or replace the link with a directory owned by uid {os.geteuid()}")
    if not stat.S_ISDIR(info.st_mode):
        return f"{entry.what} {entry.path} is not a directory: remove it or fix state_dir"
    if info.st_uid != os.geteuid():
        return (f"{entry.what} {entry.path} is owned by uid {info.st_uid}, not the agent's user "
                f"(uid {os.geteuid()}): run `chown -R {os.geteuid()} {entry.path}` if its "
                f"content is the agent's, else move it aside")
    extra = stat.S_IMODE(info.st_mode) & ~entry.mode
    if extra:
        return (f"{entry.what} {entry.path} is open to others (mode "
                f"{stat.S_IMODE(info.st_mode):04o}, at most {entry.mode:04o}): run "
                f"`chmod {entry.mode:04o} {entry.path}`")
    return None


def ensure_state_dir(entry: StateDir) -> None:
    """Create ``entry`` with exactly its mode, or check an existing one and open it up to that
    mode (an older agent made state_dir 0700; ``user:`` handlers need to pass through).

    Raises :class:`OSError` for what the filesystem refuses and :class:`PermissionError` with
    :func:`state_dir_problem`'s text for a directory that must not be used.
    """
    with contextlib.suppress(FileExistsError):
        os.mkdir(entry.path, entry.mode)
    problem = state_dir_problem(entry)
    if problem is not None:
        raise PermissionError(problem)
    fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, entry.mode)
    finally:
        os.close(fd)
