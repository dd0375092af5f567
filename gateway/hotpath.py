"""The hot path: credit checks and heartbeats answered before any other layer of the app.

`GET /v1/usage` and `POST /v1/sessions/{id}/heartbeat` are most of a voice
product's traffic. This is the outermost ASGI layer of the app
(`gateway.app.LedgerApp`): it answers the common, well-formed case of these
two routes itself, with no middleware stack, no routing, no dependency
injection, and it keeps every guarantee of the slow path, by the same code:
the same authentication (`TokenVerifier`, with its cache of verified tokens),
the same bound on requests in flight (`InFlight`), the same shard call, the
same response models, the same errors (`error_problem`), the same request id
in `X-Request-ID`, the same log line and metrics (`log_request`).

It only ever takes the happy path of *parsing*: a request it does not fully
understand (no or malformed bearer token, a query string, an `Idempotency-Key`,
a body that is not a whole, small, valid heartbeat in its first message, a
request on the internal listener, the bound on requests in flight reached) is
handed to the full app untouched (a body it has read is replayed), which
answers it exactly as before, errors included.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from fastapi import FastAPI
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actors.errors import DomainError
from gateway.asgi import header, replaying
from gateway.auth import TokenVerifier, bearer_token
from gateway.errors import ApiError, error_problem
from gateway.metrics import Metrics
from gateway.middleware import (
    MAX_BODY_BYTES,
    InFlight,
    close_with,
    is_utf8_text,
    log_request,
    request_id_of,
)
from gateway.routes import sessions
from gateway.runtime import Runtime
from gateway.schemas import HeartbeatRequest, HeartbeatResponse, Usage
from gateway.shards import ShardClient

USAGE_PATH = "/v1/usage"
HEARTBEAT_ROUTE = "/v1/sessions/{session_id}/heartbeat"
_HEARTBEAT_PATH = re.compile(r"^/v1/sessions/([^/]+)/heartbeat$")
_JSON_HEADERS = [(b"content-type", b"application/json")]


class HotPathMiddleware:
    """Answers well-formed credit checks and heartbeats itself; everything else goes to `app`."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        fastapi: FastAPI,
        in_flight: InFlight,
        metrics: Metrics,
        read_timeout_s: float,
        internal_port: int | None = None,
    ) -> None:
        self.app = app
        self._fastapi = fastapi
        self._in_flight = in_flight
        self._metrics = metrics
        self._read_timeout_s = read_timeout_s
        self._internal_port = internal_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["query_string"] or self._on_internal_listener(scope):
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        if method == "GET" and path == USAGE_PATH:
            if _has_body(scope):
                await self.app(scope, receive, send)
                return
            user_id = await self._user(scope)
            if user_id is None:
                await self.app(scope, receive, send)
                return
            if not self._in_flight.take(internal=False):
                await self.app(scope, receive, send)  # it answers the 503 (it finds the bound reached)
                return
            await self._respond(scope, send, USAGE_PATH, user_id, Usage.from_view, self._shards().usage)
            return
        if method == "POST" and (match := _HEARTBEAT_PATH.match(path)) is not None:
            await self._heartbeat(scope, receive, send, match.group(1))
            return
        await self.app(scope, receive, send)

    async def _heartbeat(self, scope: Scope, receive: Receive, send: Send, raw_session_id: str) -> None:
        # Counted in flight before its body is read, as the app counts it: a client that trickles
        # bodies holds slots, and meets the bound.
        if not self._in_flight.take(internal=False):
            await self.app(scope, receive, send)  # it answers the 503 (it finds the bound reached)
            return
        try:
            async with asyncio.timeout(self._read_timeout_s):
                first = await receive()
        except TimeoutError:
            self._in_flight.give_back(internal=False)
            detail = f"the request body did not arrive within {self._read_timeout_s:g} s"
            started = time.perf_counter()
            await close_with(send, 408, "request_timeout", detail)
            log_request(
                self._metrics,
                "POST",
                HEARTBEAT_ROUTE,
                408,
                time.perf_counter() - started,
                user_id=None,
                error_code="request_timeout",
            )
            return
        receive = _replaying_message(first, receive)
        session_id, seq = _heartbeat_input(scope, raw_session_id, first)
        user_id = await self._user(scope) if session_id is not None else None
        if user_id is None or session_id is None:
            self._in_flight.give_back(internal=False)
            await self.app(scope, receive, send)
            return

        def heartbeat(user: str, request_id: str) -> Awaitable[Any]:
            return self._shards().heartbeat(user, session_id, seq=seq, request_id=request_id, idem=None)

        await self._respond(scope, send, HEARTBEAT_ROUTE, user_id, HeartbeatResponse.from_view, heartbeat)

    def _on_internal_listener(self, scope: Scope) -> bool:
        server = scope.get("server")
        return self._internal_port is not None and server is not None and server[1] == self._internal_port

    async def _user(self, scope: Scope) -> str | None:
        """The authenticated user, or None when the app should answer (it will say why)."""
        token = bearer_token(header(scope, b"authorization"))
        if token is None:
            return None
        verifier: TokenVerifier = self._fastapi.state.token_verifier
        try:
            return await verifier.verify(token)
        except Exception:  # the app verifies it again and answers the error its own way
            return None

    def _shards(self) -> ShardClient:
        runtime: Runtime = self._fastapi.state.runtime
        return runtime.shards

    async def _respond(
        self,
        scope: Scope,
        send: Send,
        route: str,
        user_id: str,
        render: Callable[[Any], BaseModel],
        call: Callable[..., Awaitable[Any]],
    ) -> None:
        """Sends `render` of the shard's answer to `call`, or the error it raised as a problem; logged
        and measured as the app's own requests are. The request holds a slot in flight: given back."""
        request_id = request_id_of(scope)
        tokens = structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        status, error_code = 500, None
        try:
            try:
                arguments = (user_id,) if route == USAGE_PATH else (user_id, request_id)
                body = render(await call(*arguments)).model_dump_json().encode()
                status = 200
                headers = [
                    *_JSON_HEADERS,
                    (b"content-length", str(len(body)).encode()),
                    (b"x-request-id", request_id.encode()),
                ]
            except Exception as exc:  # answered as the app's own handlers would
                problem = error_problem(exc)
                status, body = problem.status_code, bytes(problem.body)
                error_code = exc.code if isinstance(exc, DomainError | ApiError) else "internal"
                headers = [*problem.raw_headers, (b"x-request-id", request_id.encode())]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        finally:
            self._in_flight.give_back(internal=False)
            log_request(
                self._metrics,
                scope["method"],
                route,
                status,
                time.perf_counter() - started,
                user_id=user_id,
                error_code=error_code,
            )
            structlog.contextvars.reset_contextvars(**tokens)


def _has_body(scope: Scope) -> bool:
    length = header(scope, b"content-length")
    return (length is not None and length != "0") or header(scope, b"transfer-encoding") is not None


def _replaying_message(first: Message, receive: Receive) -> Receive:
    """A `receive` that hands the app `first` (already received) once, then defers to `receive`."""
    if first["type"] == "http.request" and not first.get("more_body", False):
        return replaying(first.get("body", b""), receive)
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return first
        return await receive()

    return replay


def _heartbeat_input(scope: Scope, raw_session_id: str, first: Message) -> tuple[str | None, int | None]:
    """The canonical session id and `seq` of a heartbeat the hot path can take (its whole body, small
    UTF-8 JSON, in `first`), else (None, None)."""
    try:
        return _parsed_heartbeat(scope, raw_session_id, first)
    except Exception:  # anything odd (JSON nested too deep for the parser, say): the app answers it
        return None, None


def _parsed_heartbeat(scope: Scope, raw_session_id: str, first: Message) -> tuple[str | None, int | None]:
    if first["type"] != "http.request" or first.get("more_body", False):
        return None, None
    body = first.get("body", b"")
    if len(body) > MAX_BODY_BYTES or (body and not is_utf8_text(body)):
        return None, None
    if header(scope, b"idempotency-key") is not None:
        return None, None
    session_id = sessions.canonical_session_id(raw_session_id)
    if session_id is None:
        return None, None
    if not body:
        return session_id, None
    content_type = header(scope, b"content-type")
    if content_type is None or content_type.partition(";")[0].strip().lower() != "application/json":
        return None, None
    try:
        parsed = json.loads(body)
        if not isinstance(parsed, dict):
            return None, None
        return session_id, HeartbeatRequest.model_validate(parsed).seq
    except (ValueError, ValidationError):
        return None, None
