"""The sandbox's HTTP fronts, shared parts: routing, restJson errors, a loopback server.

``http_control.py`` serves the ``iot`` control plane and ``http_data.py`` the ``iot-jobs-data``
data plane, each on its own port, so that code written for ``boto3.client("iot")`` and
``boto3.client("iot-jobs-data")`` runs unchanged against the sandbox with ``endpoint_url=``.
Both speak botocore's ``rest-json`` protocol as boto3 expects it:

* the operation is the HTTP method plus a path template (``/things/{thingName}/jobs``), the
  routes being written by hand from botocore's models because botocore is a test dependency
  only; path labels arrive percent-encoded (botocore encodes ``/`` and ``$`` too);
* booleans and integers in the query string are ``true``/``false`` and decimal text;
* an error is a JSON body ``{"message": ...}`` plus the header ``x-amzn-ErrorType`` naming the
  exception, with the status the model gives it; botocore reads the header first and raises the
  client's own modeled exception (``client.exceptions.ResourceNotFoundException``...).

Every request that reads or changes Jobs state runs through :meth:`Emulator.call`, i.e. on the
emulator's thread: the MQTT front sees the same state, and a mutation's ``notify``/``notify-next``
go out exactly as for an MQTT request.

Requests are signed by boto3 (SigV4) but the signature is never checked: the servers bind to
127.0.0.1 and are for the local sandbox only.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

from agent.sandbox._validate import Rejection, parse_request
from agent.sandbox.document import dumps

__all__ = [
    "HttpFront",
    "Reply",
    "Request",
    "Route",
    "page",
    "query_bool",
    "query_int",
]

log = logging.getLogger("agent.sandbox.http")

LOOPBACK: Final = "127.0.0.1"
_MAX_BODY: Final = 1 << 20
"""Request bodies are small (a job document is at most 32 KiB); refuse anything absurd."""


@dataclass(frozen=True)
class Request:
    """One parsed request: percent-decoded path labels, the query string, the JSON body."""

    path: dict[str, str]
    query: dict[str, str]
    body: dict[str, Any]


@dataclass(frozen=True)
class Reply:
    """A response with a status other than 200 (DeleteCommand's 202/204), body optional."""

    status: int
    body: dict[str, Any] | None = None


Handler = Callable[[Request], "dict[str, Any] | Reply | None"]
"""Returns the response body (``None`` = an operation without output: empty 200)."""


@dataclass(frozen=True)
class Route:
    """One operation: ``METHOD /a/{label}/c`` and the members it accepts.

    ``query`` and ``body`` list the members the sandbox supports; anything else the request
    carries is ``InvalidRequestException`` naming it, rather than silently ignored (a script that
    asks for a presigned URL or a rollout rate must learn the sandbox does not do that).
    ``errors`` are the exception names the operation's model lists; a service code that maps to
    another one is answered as the front's ``InvalidRequest`` exception (None: any mapped name
    may go out). ``error_map`` replaces the front's code -> (exception, status) table for this
    operation (the Commands operations name their errors differently from the Jobs ones).
    """

    method: str
    template: str
    handler: Handler
    query: frozenset[str] = frozenset()
    body: frozenset[str] = frozenset()
    errors: frozenset[str] | None = None
    error_map: Mapping[str, tuple[str, int]] | None = None
    _segments: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_segments", tuple(self.template.strip("/").split("/")))

    def match(self, method: str, segments: Sequence[str]) -> dict[str, str] | None:
        """The path labels when ``method`` and ``segments`` (already decoded) fit, else None."""
        if method != self.method or len(segments) != len(self._segments):
            return None
        labels: dict[str, str] = {}
        for pattern, value in zip(self._segments, segments, strict=True):
            if pattern.startswith("{"):
                labels[pattern[1:-1]] = value
            elif pattern != value:
                return None
        return labels


def query_bool(request: Request, name: str) -> bool | None:
    """A boolean query member (botocore sends ``true``/``false``); None when absent."""
    value = request.query.get(name)
    if value is None:
        return None
    if value not in ("true", "false"):
        raise Rejection("InvalidRequest", f"{name} must be true or false, not {value!r}")
    return value == "true"


def query_int(request: Request, name: str, low: int | None = None,
              high: int | None = None) -> int | None:
    """An integer query member, range-checked; None when absent."""
    return parse_int(request.query.get(name), name, low, high)


def parse_int(text: str | None, name: str, low: int | None = None,
              high: int | None = None) -> int | None:
    """Decimal text as an int within ``[low, high]``; None passes."""
    if text is None:
        return None
    try:
        value = int(text, 10)
    except ValueError:
        raise Rejection("InvalidRequest", f"{name} must be an integer, not {text!r}") from None
    if (low is not None and value < low) or (high is not None and value > high):
        raise Rejection("InvalidRequest", f"{name} must be between {low} and {high}")
    return value


def page(items: list[Any], request: Request, key: str, *, token: str = "nextToken",
         size: str = "maxResults", next_token: str = "nextToken", default: int = 250,
         most: int = 250) -> dict[str, Any]:
    """One page of a List* answer: ``maxResults`` (1-``most``, else ``default``) items from the
    offset in ``nextToken`` (or the members named ``size``, ``token`` and ``next_token``:
    ``pageSize``, ``marker``, ``nextMarker`` for the policy operations).

    The token is the offset as text: opaque to boto3's paginators, which only echo it back.
    """
    count = query_int(request, size, 1, most) or default
    given = request.query.get(token)
    start = 0
    if given is not None:
        if not given.isdigit() or int(given) > len(items):
            raise Rejection("InvalidRequest", f"{token} {given!r} is not one this API issued")
        start = int(given)
    out: dict[str, Any] = {key: items[start:start + count]}
    if start + count < len(items):
        out[next_token] = str(start + count)
    return out


class HttpFront:
    """One restJson API on a loopback port, served by a ThreadingHTTPServer in daemon threads.

    Args:
        name: For logs and thread names (``iot``, ``iot-jobs-data``).
        routes: The operations; the first match wins.
        errors: Service :class:`Rejection` code -> ``(exception name, HTTP status)`` as the
            model gives them. An unlisted code goes out unchanged with status 400, so a fault
            injected with a code AWS may add later reaches boto3 as a plain ``ClientError``.
        internal: What an unexpected server-side exception is answered with (the model's
            catch-all of the API), after logging the traceback.
    """

    def __init__(self, name: str, routes: Sequence[Route],
                 errors: Mapping[str, tuple[str, int]], *, internal: tuple[str, int]) -> None:
        self.name = name
        self._routes = tuple(routes)
        self._errors = dict(errors)
        self._internal = internal
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>``, what ``boto3.client(..., endpoint_url=)`` takes."""
        if self._server is None:
            raise RuntimeError(f"the {self.name} HTTP front is not running")
        return f"http://{LOOPBACK}:{self._server.server_port}"

    def start(self, port: int = 0) -> HttpFront:
        """Bind 127.0.0.1:``port`` (0: a free one) and serve in a daemon thread."""
        handler = type("Handler", (_RequestHandler,), {"front": self})
        server = ThreadingHTTPServer((LOOPBACK, port), handler)
        server.daemon_threads = True
        server.block_on_close = False
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"http-{self.name}", daemon=True)
        self._thread.start()
        log.info("sandbox HTTP front serving api=%s endpoint=%s", self.name, self.endpoint)
        return self

    def stop(self) -> None:
        """Stop accepting requests; requests in flight finish on their daemon threads."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    # ------------------------------------------------------------------ one request

    def respond(self, method: str, target: str, raw_body: bytes
                ) -> tuple[int, dict[str, str], bytes]:
        """Serve one request: ``(status, extra headers, body)``. No socket: tests may call it."""
        url = urlsplit(target)
        segments = [unquote(s) for s in url.path.strip("/").split("/")]
        route: Route | None = None
        labels: dict[str, str] | None = None
        for candidate in self._routes:
            labels = candidate.match(method, segments)
            if labels is not None:
                route = candidate
                break
        if route is None or labels is None:
            return _error(404, "UnknownOperationException",
                          f"{method} {url.path} is not an operation of the sandbox's {self.name}")
        try:
            query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            body = parse_request(raw_body) if raw_body.strip() else {}
            for where, given, allowed in (("query", query, route.query),
                                          ("body", body, route.body)):
                extra = sorted(set(given) - allowed)
                if extra:
                    raise Rejection("InvalidRequest", f"{', '.join(extra)} ({where}) is not "
                                                      "supported by the sandbox")
            result = route.handler(Request(labels, query, body))
        except Rejection as rejection:
            return self._rejection(route, rejection)
        except Exception:
            log.exception("sandbox HTTP front failed api=%s request=%s %s", self.name, method,
                          url.path)
            name, status = self._internal
            return _error(status, name, "the sandbox failed to serve this request (see its log)")
        status = 200
        if isinstance(result, Reply):
            status, result = result.status, result.body
        if result is None:
            return status, {}, b""
        return status, {"Content-Type": "application/json"}, dumps(result).encode()

    def _rejection(self, route: Route, rejection: Rejection) -> tuple[int, dict[str, str], bytes]:
        """The service's code as the model's exception; the original code leads the message
        whenever the names differ (``VersionMismatch: ...`` as InvalidStateTransitionException),
        unless the route's own ``error_map`` made the choice (InvalidRequest is simply
        ValidationException there)."""
        errors = route.error_map or self._errors
        name, status = errors.get(rejection.code, (rejection.code, 400))
        fallback = route.errors is not None and name not in route.errors
        if fallback:
            name, status = errors["InvalidRequest"]
        message = rejection.message
        if (route.error_map is None or fallback) \
                and name not in (rejection.code, f"{rejection.code}Exception"):
            message = f"{rejection.code}: {message}"
        extra = {} if rejection.execution_state is None else {
            "executionState": rejection.execution_state}
        return _error(status, name, message, extra)


def _error(status: int, name: str, message: str,
           extra: dict[str, Any] | None = None) -> tuple[int, dict[str, str], bytes]:
    body = {"message": message, **(extra or {})}
    headers = {"Content-Type": "application/json", "x-amzn-ErrorType": name}
    return status, headers, json.dumps(body).encode()


class _RequestHandler(BaseHTTPRequestHandler):
    """Hands each request to its :class:`HttpFront`; HTTP/1.1 keep-alive, as botocore pools."""

    front: HttpFront
    protocol_version = "HTTP/1.1"
    timeout = 120  # an idle keep-alive connection frees its thread after this
    # TCP_NODELAY: the headers and the body go out as two writes, and with Nagle's algorithm
    # the body waited for the client's delayed ACK of the headers: 40 ms per boto3 call on
    # loopback (measured by bench section 7's start_command_execution).
    disable_nagle_algorithm = True

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            status, headers, body = _error(413, "InvalidRequestException",
                                           f"request body over {_MAX_BODY} bytes")
            self.close_connection = True
        else:
            raw = self.rfile.read(length) if length else b""
            status, headers, body = self.front.respond(self.command, self.path, raw)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = _serve

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)
