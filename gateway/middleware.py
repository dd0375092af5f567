"""ASGI middleware: request ids with one canonical log line per request, the bound on requests in
flight in this process, and the body-size bound.

Pure ASGI (not `BaseHTTPMiddleware`), so nothing is copied or buffered
beyond what the bound allows, and the route template is visible in the scope
once routing has run.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.asgi import BodyTooLarge, header, read_body, replaying
from gateway.auth import INTERNAL_PATH_PREFIX, is_user_id
from gateway.errors import PROBLEM_CONTENT_TYPE, problem, problem_bytes
from gateway.metrics import Metrics

log = structlog.get_logger("gateway.request")

MAX_BODY_BYTES = 16 * 1024
# Billing providers' events are larger (a Stripe subscription with its items is often 10-20 KiB).
WEBHOOK_PATH_PREFIX = "/webhooks/"
WEBHOOK_MAX_BODY_BYTES = 256 * 1024
# An oversized body that streams in is read (and dropped) up to this much more, so the
# client is still listening when the 413 arrives; past it the connection is simply closed.
DRAIN_BYTES_MAX = 1024 * 1024
# A request's head, and then its whole body, must each arrive within this by default
# (LEDGER_REQUEST_READ_TIMEOUT_S; 16 KiB take milliseconds on any real link).
REQUEST_READ_TIMEOUT_S = 10.0
# Health, readiness and metrics: answered on every listener, and never refused for load.
OPS_PATHS = ("/healthz", "/readyz", "/metrics")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class RequestLogMiddleware:
    """Binds `request_id` for every log line of the request, answers it in `X-Request-ID`, logs once."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500
        error_code: str | None = None
        is_problem = False
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status, error_code, is_problem
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.setdefault("headers", [])
                is_problem = (b"content-type", PROBLEM_CONTENT_TYPE.encode()) in headers
                headers.append((b"x-request-id", request_id.encode("ascii")))
            elif is_problem and message["type"] == "http.response.body" and error_code is None:
                error_code = _problem_code(message.get("body", b""))  # errors are few and small
            await send(message)

        root_path = scope.get("root_path", "")
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                log_request(
                    self.metrics,
                    scope["method"],
                    _template(scope, root_path),
                    status,
                    time.perf_counter() - started,
                    user_id=state.get("user_id") or _path_user(scope),
                    error_code=error_code,
                )


def _template(scope: Scope, root_path: str) -> str:
    """The route a request matched (its template, so the label's values are few), the prefix of a
    mount it went to (`/docs/static`), or `unmatched`."""
    route = scope.get("route")
    if route is not None:
        return str(route.path)
    mounted = scope.get("root_path", "")
    return (
        mounted[len(root_path) :] if mounted != root_path and mounted.startswith(root_path) else "unmatched"
    )


def _path_user(scope: Scope) -> str | None:
    """The user an internal route names in its path (`/internal/v1/users/{user_id}/...`), when it
    is a valid user id (anything else was refused, and is not worth a log field)."""
    user_id = scope.get("path_params", {}).get("user_id")
    return user_id if is_user_id(user_id) else None


def request_id_of(scope: Scope) -> str:
    """The client's `X-Request-ID` when it is a sane one, else a new id."""
    incoming = header(scope, b"x-request-id")
    return incoming if incoming and _REQUEST_ID.match(incoming) else uuid.uuid4().hex


def log_request(
    metrics: Metrics,
    method: str,
    template: str,
    status: int,
    duration_s: float,
    *,
    user_id: str | None,
    error_code: str | None,
) -> None:
    """A request's metrics and its one log line (with the request id bound in the context)."""
    metrics.observe_request(method, template, status, duration_s)
    if error_code is not None:
        metrics.errors.labels(error_code).inc()
    log.info(
        "request",
        method=method,
        route=template,
        status=status,
        duration_ms=round(duration_s * 1000, 2),
        user_id=user_id,
        error_code=error_code,
    )


def _problem_code(body: bytes) -> str:
    try:
        code = json.loads(body).get("code")
    except (ValueError, AttributeError):
        return "unreadable"
    return code if isinstance(code, str) else "unreadable"


class ListenerMiddleware:
    """With a separate internal listener, each listener serves only its own routes (404 otherwise).

    The listener is the local port the connection came in on (`scope["server"]`): `/internal/`
    routes answer only there, user routes only on the public port; health, readiness and
    metrics answer on both."""

    SHARED_PATHS = OPS_PATHS

    def __init__(self, app: ASGIApp, *, internal_port: int) -> None:
        self.app = app
        self._internal_port = internal_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.SHARED_PATHS:
            server = scope.get("server")
            on_internal = server is not None and server[1] == self._internal_port
            if scope["path"].startswith(INTERNAL_PATH_PREFIX) != on_internal:
                response = problem(404, "not_found", "Not Found")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class InFlight:
    """The requests in flight in this process, user and internal ones counted apart: internal calls
    (billing, ops) have a budget of their own, so a flood of user requests, signed or not, cannot
    crowd out the webhooks that change plans and add credits."""

    def __init__(self, *, max_requests: int, metrics: Metrics) -> None:
        self.max_requests = max_requests
        self._metrics = metrics
        self._count = {False: 0, True: 0}

    def take(self, *, internal: bool) -> bool:
        """Count one more request in flight; False (nothing counted) at the bound."""
        if self._count[internal] >= self.max_requests:
            return False
        self._count[internal] += 1
        self._metrics.requests_in_flight.inc()
        return True

    def give_back(self, *, internal: bool) -> None:
        self._count[internal] -= 1
        self._metrics.requests_in_flight.dec()


class ConcurrencyLimitMiddleware:
    """At most `max_requests` user requests, and as many internal ones, in flight in this process;
    past it, 503 `unavailable` with `Retry-After` at once, before any work (nothing was changed).

    Streams are not counted (each is a long-lived request bounded by its shard's watcher limit),
    nor are health, readiness and metrics, which must answer when the process is busiest."""

    EXEMPT_PATHS = (*OPS_PATHS, "/v1/usage/stream")
    RETRY_AFTER_S = 1

    def __init__(self, app: ASGIApp, *, in_flight: InFlight) -> None:
        self.app = app
        self._in_flight = in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        internal = scope["path"].startswith(INTERNAL_PATH_PREFIX)
        if not self._in_flight.take(internal=internal):
            response = problem(
                503,
                "unavailable",
                f"this gateway process is at its bound of {self._in_flight.max_requests} requests in flight",
                headers={"Retry-After": str(self.RETRY_AFTER_S)},
            )
            await response(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self._in_flight.give_back(internal=internal)


class BodyLimitMiddleware:
    """Reads the whole body before the app runs: 413 `payload_too_large` past `max_bytes`, and
    408 `request_timeout` if it has not all arrived within `read_timeout_s` (so a client that
    trickles its body cannot hold one of the process's request slots for long). A body that is
    not UTF-8 text is 422 `invalid_request`, whatever the route."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int = MAX_BODY_BYTES,
        webhook_max_bytes: int = WEBHOOK_MAX_BODY_BYTES,
        read_timeout_s: float = REQUEST_READ_TIMEOUT_S,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.webhook_max_bytes = webhook_max_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = (
            self.webhook_max_bytes if scope["path"].startswith(WEBHOOK_PATH_PREFIX) else self.max_bytes
        )
        declared = header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
            await self._too_large(send, max_bytes)
            return
        too_large = False
        try:
            # One deadline for reading the body and, past the bound, draining it.
            async with asyncio.timeout(self.read_timeout_s):
                try:
                    body = await read_body(receive, max_bytes=max_bytes)
                except BodyTooLarge as exc:
                    too_large = True
                    if not exc.ended:
                        await _drain(receive, DRAIN_BYTES_MAX)
        except TimeoutError:
            if too_large:
                await self._too_large(send, max_bytes)
            else:
                detail = f"the request body did not arrive within {self.read_timeout_s:g} s"
                await close_with(send, 408, "request_timeout", detail)
            return
        if too_large:
            await self._too_large(send, max_bytes)
            return
        if body is None:
            return  # the client went away
        if body and not is_utf8_text(body):
            # JSON is UTF-8 (RFC 8259); a parser that guesses (UTF-16, say) must not get to guess.
            await close_with(send, 422, "invalid_request", "the request body is not UTF-8 JSON")
            return
        await self.app(scope, replaying(body, receive), send)

    async def _too_large(self, send: Send, max_bytes: int) -> None:
        detail = f"request bodies are limited to {max_bytes} bytes"
        await close_with(send, 413, "payload_too_large", detail)


def is_utf8_text(body: bytes) -> bool:
    """UTF-8 with no NUL byte (JSON text has none; UTF-16 and UTF-32 of JSON always do)."""
    if b"\x00" in body:
        return False
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


async def close_with(send: Send, status: int, code: str, detail: str) -> None:
    """A problem+json answer that closes the connection (the rest of the body is not read)."""
    body = problem_bytes(status, code, detail)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _drain(receive: Receive, limit_bytes: int) -> None:
    seen = 0
    while seen <= limit_bytes:
        message = await receive()
        seen += len(message.get("body", b""))
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return
