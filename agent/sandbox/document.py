"""Job documents as the emulator keeps them: compact JSON text, never walked recursively.

A document nested a few hundred levels deep is valid JSON that AWS accepts, and an emulator
that copies or serialises it recursively dies of RecursionError on every request that carries
it (``copy.deepcopy`` gives up near 330 levels, ``json`` near 1,000), leaving the thing stuck.
So the emulator holds each document as a :class:`Document`: its compact text, checked once when
the job is created, copied by reference (it is immutable) and spliced verbatim into every MQTT
and HTTP payload by :func:`dumps`. Nothing on the way from ``create_job`` to the device recurses
into it.

The text is the one boto3 hands out (``json.dumps(value, separators=(",", ":"),
ensure_ascii=False)``, as ``agent.jobs.shapes.document_text`` writes it), so the MQTT and HTTP
planes agree byte for byte. A document too deep for Python's parser is compacted by an iterative
scanner instead: whitespace between tokens dropped, everything else as given.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Final

from agent.sandbox._validate import Rejection

__all__ = ["MAX_DOCUMENT_CHARS", "Document", "dumps"]

MAX_DOCUMENT_CHARS: Final = 32768
"""CreateJob's ``document``: at most 32768 characters (botocore's ``iot`` model)."""

_TOKEN: Final = re.compile(r"""
    (?P<space>[ \t\n\r]+)
  | (?P<string>"(?:[^"\\\x00-\x1f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*")
  | (?P<number>-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)
  | (?P<literal>true|false|null)
  | (?P<punct>[{}\[\]:,])
""", re.VERBOSE)


_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def _invalid(message: str) -> Rejection:
    return Rejection("InvalidRequest", message)


class Document:
    """An immutable job document (a JSON object) held as compact JSON text.

    It compares equal to another Document with the same text, and to the plain JSON value it
    holds (so a test may write ``execution["jobDocument"] == {"operation": "x"}``).
    """

    __slots__ = ("text",)

    text: str

    def __init__(self, text: str) -> None:
        object.__setattr__(self, "text", text)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("a Document is immutable")

    @classmethod
    def from_text(cls, text: object) -> Document:
        """CreateJob's ``document`` string, checked: a JSON object of at most 32768 characters.

        Raises:
            Rejection: ``InvalidRequest`` saying what is wrong.
        """
        if not isinstance(text, str) or len(text) > MAX_DOCUMENT_CHARS:
            raise _invalid(f"document must be a string of at most {MAX_DOCUMENT_CHARS} "
                           "characters")
        try:
            value = json.loads(text)
        except RecursionError:
            return cls(_compact(text))  # deeper than Python's parser goes: still valid JSON?
        except ValueError as exc:
            raise _invalid(f"document is not JSON: {exc}") from None
        return cls.from_value(value)

    @classmethod
    def from_value(cls, value: object) -> Document:
        """A document given as a Python value (the emulator's Python API, tests)."""
        if isinstance(value, Document):
            return value
        if not isinstance(value, dict):
            raise _invalid("document must be a JSON object")
        try:
            text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
            text.encode()
        except UnicodeEncodeError:  # a lone surrogate: keep it, escaped, as AWS would carry it
            text = json.dumps(value, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise _invalid(f"document is not JSON-serialisable: {exc}") from None
        if len(text) > MAX_DOCUMENT_CHARS:
            raise _invalid(f"document is {len(text)} characters, at most {MAX_DOCUMENT_CHARS}")
        return cls(text)

    def value(self) -> Any:
        """The document as Python objects (raises RecursionError for a very deep one)."""
        return json.loads(self.text)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Document):
            return self.text == other.text
        try:
            return bool(self.value() == other)
        except RecursionError:
            return False

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        shown = self.text if len(self.text) <= 80 else self.text[:77] + "..."
        return f"Document({shown})"

    def __deepcopy__(self, memo: dict[int, Any]) -> Document:
        return self  # immutable


def _compact(text: str) -> str:
    """Check that ``text`` is one JSON object, without recursion; return it without whitespace
    (and with any lone surrogate escaped, so that it encodes as UTF-8).

    Raises:
        Rejection: ``InvalidRequest`` naming the offset where it stops being JSON.
    """
    out: list[str] = []
    stack: list[str] = []  # the closing bracket of every open container
    state = "start"  # start | value | first-value | key | first-key | colon | next | done
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise _invalid(f"document is not JSON: unexpected character at offset {pos}")
        kind, token, at, pos = match.lastgroup, match.group(), match.start(), match.end()
        if kind == "space":
            continue
        if state == "done":
            raise _invalid(f"document is not JSON: extra data at offset {at}")
        if (state in ("first-value", "first-key", "next") and stack
                and token == stack[-1]):  # the end of a container
            stack.pop()
        elif state in ("start", "value", "first-value"):
            if state == "start" and token != "{":
                raise _invalid("document must be a JSON object")
            if token in ("{", "["):
                stack.append("}" if token == "{" else "]")
                out.append(token)
                state = "first-key" if token == "{" else "first-value"
                continue
            if kind not in ("string", "number", "literal"):
                raise _invalid(f"document is not JSON: unexpected {token!r} at offset {at}")
        elif state in ("key", "first-key"):
            if kind != "string":
                raise _invalid(f"document is not JSON: expected a key at offset {at}")
            out.append(token)
            state = "colon"
            continue
        elif (state, token) in (("colon", ":"), ("next", ",")):
            out.append(token)
            state = "value" if token == ":" or stack[-1] == "]" else "key"
            continue
        else:
            raise _invalid(f"document is not JSON: unexpected {token!r} at offset {at}")
        out.append(token)
        state = "next" if stack else "done"
    if state != "done":
        raise _invalid("document is not JSON: it ends too early")
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", "".join(out))


def dumps(payload: Any) -> str:
    """``json.dumps(payload)`` with every :class:`Document` in it spliced in as its text.

    The payload around the documents is shallow (an execution, a reply), so ``json`` may walk
    it; the documents themselves are never parsed or walked again.
    """
    documents: list[Document] = []
    marker = f"@@document-{uuid.uuid4().hex}-"

    def placeholder(value: object) -> str:
        if not isinstance(value, Document):
            raise TypeError(f"{type(value).__name__} is not JSON-serialisable")
        documents.append(value)
        return f"{marker}{len(documents) - 1}@@"

    text = json.dumps(payload, default=placeholder)
    for i, document in enumerate(documents):
        text = text.replace(f'"{marker}{i}@@"', document.text, 1)
    return text
