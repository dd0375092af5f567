"""ASGI middleware: request ids with one canonical log line per request, and the body-size bound.

Pure ASGI (not `BaseHTTPMiddleware`), so nothing is copied or buffered
beyond what the bound allows, and the route template is visible in the scope
once routing has run.
"""

from __future__ import annotations

import re
import time
import uuid

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.asgi import BodyTooLarge, read_body, replaying
from gateway.auth import INTERNAL_PATH_PREFIX
from gateway.errors import PROBLEM_CONTENT_TYPE, problem, problem_bytes
from gateway.metrics import Metrics

log = structlog.get_logger("gateway.request")

MAX_BODY_BYTES = 16 * 1024
# An oversized body that streams in is read (and dropped) up to this much more, so the
# client is still listening when the 413 arrives; past it the connection is simply closed.
DRAIN_BYTES_MAX = 1024 * 1024
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
        incoming = _header(scope, b"x-request-id")
        request_id = incoming if incoming and _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode("ascii")))
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                duration_s = time.perf_counter() - started
                route = scope.get("route")
                template = getattr(route, "path", None) or "unmatched"
                self.metrics.observe_request(scope["method"], template, status, duration_s)
                log.info(
                    "request",
                    method=scope["method"],
                    route=template,
                    status=status,
                    duration_ms=round(duration_s * 1000, 2),
                    user_id=state.get("user_id"),
                )


class ListenerMiddleware:
    """With a separate internal listener, each listener serves only its own routes (404 otherwise).

    The listener is the local port the connection came in on (`scope["server"]`): `/internal/`
    routes answer only there, user routes only on the public port; health, readiness and
    metrics answer on both."""

    SHARED_PATHS = ("/healthz", "/readyz", "/metrics")

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


class BodyLimitMiddleware:
    """Answers 413 `payload_too_large` to any body over `max_bytes`, before the app reads it."""

    def __init__(self, app: ASGIApp, *, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send)
            return
        try:
            body = await read_body(receive, max_bytes=self.max_bytes)
        except BodyTooLarge:
            await _drain(receive, DRAIN_BYTES_MAX)
            await self._refuse(send)
            return
        if body is None:
            return  # the client went away
        await self.app(scope, replaying(body, receive), send)

    async def _refuse(self, send: Send) -> None:
        body = problem_bytes(
            413, "payload_too_large", f"request bodies are limited to {self.max_bytes} bytes"
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
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


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None
