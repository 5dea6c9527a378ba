"""``runCommand``'s ``input.command``: one string, argv items separated by commas.

Device Client's rules, which AWS-Run-Command's documentation repeats ("any comma contained in
the command itself must be escaped"): ``\\,`` is a literal comma, every item is trimmed of
surrounding whitespace, and the program (the first item) contains no whitespace. There is never
a shell: ``echo,$(reboot)`` prints ``$(reboot)``.
"""

from __future__ import annotations

from agent.documents.plan import MAX_ARG_LENGTH, MAX_ARGS, DocumentError

__all__ = ["split_command"]


def split_command(command: str) -> tuple[str, ...]:
    """``"mkdir,-p,/var/tmp/a\\,b"`` -> ``("mkdir", "-p", "/var/tmp/a,b")``."""
    items: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(command):
        ch = command[i]
        if ch == "\\" and command.startswith(",", i + 1):
            current.append(",")
            i += 2
            continue
        if ch == ",":
            items.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
        i += 1
    items.append("".join(current).strip())
    program = items[0]
    if not program:
        raise DocumentError("runCommand: the command has no program before its first comma")
    if any(ch.isspace() for ch in program):
        hint = ",".join(program.split())
        raise DocumentError(f"runCommand: the program {program[:64]!r} contains whitespace; "
                            f"separate the arguments with commas ({hint[:64]})")
    if len(items) > MAX_ARGS + 1:
        raise DocumentError(f"runCommand: {len(items) - 1} arguments; at most {MAX_ARGS}")
    if any(len(item) > MAX_ARG_LENGTH for item in items):
        raise DocumentError(f"runCommand: an argument is over {MAX_ARG_LENGTH} chars")
    return tuple(items)
