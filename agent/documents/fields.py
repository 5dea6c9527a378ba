"""Reading the values of a job document: strict where a mistake could run the wrong thing,
lenient where AWS's own tools disagree with each other (booleans as strings or as JSON)."""

from __future__ import annotations

from typing import Any

from agent.documents.plan import MAX_ARG_LENGTH, MAX_ARGS, DocumentError

__all__ = ["args", "boolean", "line_count", "text"]


def args(value: object, where: str = '"args"') -> tuple[str, ...]:
    """A list of strings, each handed to the program as one argv entry (never a shell)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise DocumentError(f"{where} must be a list of strings")
    if len(value) > MAX_ARGS:
        raise DocumentError(f"{where} has {len(value)} items; at most {MAX_ARGS} are allowed")
    for i, arg in enumerate(value):
        if not isinstance(arg, str):
            raise DocumentError(f"{where}[{i}] must be a string, got {type(arg).__name__}")
        if "\0" in arg or len(arg) > MAX_ARG_LENGTH:
            raise DocumentError(f"{where}[{i}] has a NUL byte or is over {MAX_ARG_LENGTH} chars")
    return tuple(value)


def boolean(value: object, where: str) -> bool:
    """``"true"``/``"false"`` (what Device Client reads) or JSON booleans (what its README
    shows); absent is false. Anything else is a mistake worth rejecting, not guessing."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise DocumentError(f'{where} must be true or false (or the strings "true"/"false"), '
                        f"got {_show(value)}")


def line_count(value: object, where: str) -> int | None:
    """``allowStdErr``: a whole number of lines, 0 or more (a numeric string too)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DocumentError(f"{where} must be a whole number of lines (0 or more), "
                            f"got {_show(value)}")
    return value


def text(value: object, where: str, *, required: bool = True) -> str:
    """A string; empty counts as absent. Returns "" for an absent optional value."""
    if value is None or value == "":
        if required:
            raise DocumentError(f"{where} is missing")
        return ""
    if not isinstance(value, str):
        raise DocumentError(f"{where} must be a string, got {_show(value)}")
    if "\0" in value:
        raise DocumentError(f"{where} has a NUL byte")
    return value


def _show(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."
