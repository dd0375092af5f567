"""The hot path: credit checks and heartbeats answered without FastAPI's routing, dependency
injection and response validation.

`GET /v1/usage` and `POST /v1/sessions/{id}/heartbeat` are most of a voice
product's traffic. Profiled at 100 requests/s, FastAPI's machinery was ~40% of
the gateway's CPU per request; this pure ASGI middleware answers the common,
well-formed case of these two routes directly: the same authentication, the
same shard call, the same response models, serialized by pydantic-core.

It only ever takes the happy path of *parsing*: a request it does not fully
understand (no or malformed bearer token, a query string, an `Idempotency-Key`,
a body that is not a valid heartbeat) is handed to the FastAPI app untouched,
which answers it exactly as before, errors included. Once it has called the
shard, it answers itself, with the same problem+json as the app's handlers.

It sits innermost, after the request-id, in-flight, body-size and listener
middleware, so every request still gets those; it sets `scope["route"]` to the
FastAPI route it stands in for, so logs and metrics label it the same.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.asgi import header, read_body, replaying
from gateway.auth import TokenVerifier, bearer_token
from gateway.errors import error_problem
from gateway.routes import sessions, usage
from gateway.runtime import Runtime
from gateway.schemas import HeartbeatRequest, HeartbeatResponse, Usage
from gateway.shards import ShardClient

USAGE_PATH = "/v1/usage"
HEARTBEAT_ROUTE = "/v1/sessions/{session_id}/heartbeat"
_HEARTBEAT_PATH = re.compile(r"^/v1/sessions/([^/]+)/heartbeat$")
_JSON_HEADERS = [(b"content-type", b"application/json")]

T = TypeVar("T")


class HotPathMiddleware:
    """Answers well-formed credit checks and heartbeats itself; everything else goes to `app`."""

    def __init__(self, app: ASGIApp, *, fastapi: FastAPI) -> None:
        self.app = app
        self._fastapi = fastapi
        # The routes themselves, as FastAPI puts them in `scope["route"]`.
        self._routes = {
            (route_method, route.path): route
            for route in (*usage.router.routes, *sessions.router.routes)
            if isinstance(route, APIRoute)
            for route_method in route.methods or ()
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["query_string"]:
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        if method == "GET" and path == USAGE_PATH:
            user_id = await self._user(scope)
            if user_id is not None:
                scope["route"] = self._routes["GET", USAGE_PATH]
                shards = self._shards()
                await self._answer(scope, receive, send, Usage.from_view, shards.usage(user_id))
                return
        elif method == "POST" and (match := _HEARTBEAT_PATH.match(path)) is not None:
            body = await read_body(receive)
            if body is None:
                return  # the client went away
            receive = replaying(body, receive)
            session_id, seq = _heartbeat_input(scope, match.group(1), body)
            user_id = await self._user(scope) if session_id is not None else None
            if user_id is not None and session_id is not None:
                scope["route"] = self._routes["POST", HEARTBEAT_ROUTE]
                request_id = scope.get("state", {}).get("request_id")
                answer = self._shards().heartbeat(
                    user_id, session_id, seq=seq, request_id=request_id, idem=None
                )
                await self._answer(scope, receive, send, HeartbeatResponse.from_view, answer)
                return
        await self.app(scope, receive, send)

    async def _user(self, scope: Scope) -> str | None:
        """The authenticated user, or None when the app should answer (it will say why)."""
        token = bearer_token(header(scope, b"authorization"))
        if token is None:
            return None
        verifier: TokenVerifier = self._fastapi.state.token_verifier
        try:
            user_id = await verifier.verify(token)
        except Exception:  # the app verifies it again and answers the error its own way
            return None
        scope.setdefault("state", {})["user_id"] = user_id
        return user_id

    def _shards(self) -> ShardClient:
        runtime: Runtime = self._fastapi.state.runtime
        return runtime.shards

    async def _answer(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        render: Callable[[T], BaseModel],
        answer: Awaitable[T],
    ) -> None:
        """Sends `render(await answer)` (the shard's answer), or the error it raised as a problem."""
        try:
            model = render(await answer)
        except Exception as exc:  # answered as the app's own handlers would
            await error_problem(exc)(scope, receive, send)
            return
        body = model.model_dump_json().encode()
        headers = [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _heartbeat_input(scope: Scope, raw_session_id: str, body: bytes) -> tuple[str | None, int | None]:
    """The canonical session id and `seq` of a heartbeat the hot path can take, else (None, None)."""
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
