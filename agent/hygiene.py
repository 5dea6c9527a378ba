"""What a handler prints, made safe to keep and to show: secrets redacted, terminal controls
neutralised.

A handler's output reaches a file that an operator ``cat``s or follows (``iot-jobs-agent log
--follow``) on a terminal, the agent's own log and the job's statusDetails in the cloud. A
handler that echoes an escape sequence could rewrite what the operator sees (hide lines, retitle
the window, in some terminals worse); one that echoes its environment would publish a token.
So the per-job log shows every control character except newline and tab as text (``\\x1b``,
C1 controls as ``\\u009b``), and every value the config marks secret
(``environment: {NAME: {value: ..., secret: true}}``) becomes ``***`` before the output is
stored anywhere, also when the handler's writes split it across pipe reads.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

__all__ = ["MASK", "Neutraliser", "Redactor", "Secret", "neutralise", "secrets_of"]

MASK = "***"
_MASK = MASK.encode()
# C0 controls but \t and \n, DEL, and C1 controls as UTF-8 encodes them (U+0080-U+009F).
_CONTROL = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]|\xc2[\x80-\x9f]")


class Secret(str):
    """An environment value the config marks ``secret: true``: a str everywhere (the handler
    gets it as it is), shown as ``'***'`` by ``repr`` so that no log line of a config or a
    request can carry it, and redacted from whatever the handler prints (:class:`Redactor`)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(MASK)


def secrets_of(environment: Mapping[str, str]) -> tuple[bytes, ...]:
    """The secret values of ``environment``, as the bytes a handler would print."""
    return tuple({value.encode(): None for value in environment.values()
                  if isinstance(value, Secret) and value})


def _escape(match: re.Match[bytes]) -> bytes:
    found = match.group()
    return b"\\x%02x" % found[0] if len(found) == 1 else b"\\u%04x" % found[1]


def neutralise(data: bytes) -> bytes:
    """``data`` with terminal controls shown as text (``\\x1b[31m`` instead of red)."""
    return _CONTROL.sub(_escape, data)


class Neutraliser:
    """:func:`neutralise` for a stream: a C1 control split between two reads is still seen."""

    def __init__(self) -> None:
        self._carry = b""

    def feed(self, data: bytes) -> bytes:
        data = self._carry + data
        self._carry = b""
        if data.endswith(b"\xc2"):
            data, self._carry = data[:-1], b"\xc2"
        return neutralise(data)

    def flush(self) -> bytes:
        rest, self._carry = self._carry, b""
        return rest


class Redactor:
    """Replaces each secret in a stream with ``***``.

    The end of each read that could be the start of a secret is held back until the next read
    (or :meth:`flush`) shows whether it is, so a secret written in pieces is caught too; what
    is held is less than twice the longest secret.
    """

    def __init__(self, secrets: Iterable[bytes]) -> None:
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._pattern = re.compile(b"|".join(re.escape(s) for s in self._secrets)) \
            if self._secrets else None
        self._carry = b""

    def __bool__(self) -> bool:
        return self._pattern is not None

    def feed(self, data: bytes) -> bytes:
        if self._pattern is None:
            return data
        data = self._carry + data
        # Kept back: the longest end that may begin a secret, and any match reaching into it
        # (a shorter secret may be the start of a longer one).
        keep = len(data) - self._partial(data)
        out, last = bytearray(), 0
        for match in self._pattern.finditer(data):
            if match.end() > keep:
                keep = match.start()
                break
            out += data[last:match.start()] + _MASK
            last = match.end()
        out += data[last:keep]
        self._carry = data[keep:]
        return bytes(out)

    def flush(self) -> bytes:
        """The end of the stream: what was held back, redacted as it stands."""
        rest, self._carry = self._carry, b""
        return self.line(rest)

    def line(self, data: bytes) -> bytes:
        """A whole piece on its own (a progress line), not part of the stream."""
        return self._pattern.sub(_MASK, data) if self._pattern is not None else data

    def text(self, text: str) -> str:
        """A str on its own (a value parsed from a progress line: JSON may have escaped the
        secret's characters in the line itself)."""
        if self._pattern is None:
            return text
        return self.line(text.encode("utf-8", "surrogateescape")).decode(
            "utf-8", "surrogateescape")

    def _partial(self, data: bytes) -> int:
        """How many bytes at the end of ``data`` begin a secret."""
        longest = 0
        for secret in self._secrets:
            for size in range(min(len(secret) - 1, len(data)), longest, -1):
                if data.endswith(secret[:size]):
                    longest = size
                    break
        return longest
